"""runtime.mapped_pages: a session's weight-file pages are given back after packing, its outputs unchanged; a
mapping with a page written through it (copied on write) is left alone."""
from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime import mapped_pages
from runtime.providers import session_options

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")

K, N, BLOCK = 4096, 4096, 32


def matmulnbits_graph(directory: Path) -> Path:
    """One 4-bit MatMulNBits at accuracy level 4 (the kernel that packs its weights), weights in an external file."""
    rng = np.random.default_rng(0)
    blocks = K // BLOCK
    weights = [
        numpy_helper.from_array(rng.integers(0, 256, (N, blocks, BLOCK // 2), dtype=np.uint8), "w"),
        numpy_helper.from_array(rng.uniform(0.01, 0.02, (N, blocks)).astype(np.float32), "scales"),
        numpy_helper.from_array(rng.integers(0, 256, (N, blocks // 2), dtype=np.uint8), "zero_points"),
    ]
    node = helper.make_node("MatMulNBits", ["x", "w", "scales", "zero_points"], ["y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    path = directory / "g.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    return path


def test_a_packed_sessions_file_pages_are_given_back_and_its_outputs_stay(tmp_path):
    path = matmulnbits_graph(tmp_path)
    session = ort.InferenceSession(str(path), session_options(1, "CPUExecutionProvider"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
    before = session.run(None, {"x": x})[0]
    assert mapped_pages.clean_mappings(tmp_path)  # ORT keeps the scales' (and zero points') mapping, resident, after packing

    assert mapped_pages.release(tmp_path) > 0
    assert mapped_pages.clean_mappings(tmp_path) == []  # none of its pages resident now
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], before)
    assert mapped_pages.clean_mappings(tmp_path) == []  # nothing read back in: the kernel runs on its packed copy


def test_a_written_page_of_a_private_mapping_is_kept(tmp_path):
    data = tmp_path / "w.data"
    data.write_bytes(bytes(range(256)) * 64)
    with data.open("rb") as f:
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private and writable, as ORT maps weights
    untouched_sum = sum(view[4096 * 3 : 4096 * 3 + 16])  # a clean resident page beside it
    view[10] = 7
    mapped_pages.release(tmp_path)
    assert view[10] == 7  # the mapping has a page of its own: left alone
    assert sum(view[4096 * 3 : 4096 * 3 + 16]) == untouched_sum
    view.close()
