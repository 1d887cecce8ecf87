"""ONNX graphs built op by op from the weights, in a dialect (runtime.manifest.Dialect): contrib, ORT's fused ops for
CPU/GPU EPs; static, standard ops only, for NPU compilers (batch 1; compiler.static_forms fixes the other shapes)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from compiler.plan import Block, GraphPlan
from runtime import manifest as names
from runtime.manifest import Dialect, ModelConfig

OPSET = 21
NORM_MEAN = ".mean"  # the static dialect's RMSNorm takes the mean of squares as a MatMul by this weight (left float)
Weights = Callable[[str], np.ndarray]
EXTERNAL_BYTES = 1024  # initializers this large go to the graph's external data file (as onnx.save_model's threshold)
ROW_BYTES = 1 << 26  # an external initializer is written ~64 MB of rows at a time (a transposed view copies only those)


class GraphBuilder:
    """Collects nodes, initializers and graph inputs/outputs; names intermediate values uniquely.

    data: the file that large initializers are written to as they come (the model's external data), so that
    a weight is held once, as the source gives it: a 7B's embedding table and lm_head are 2.2 GB each in
    float32, and in the model's protobuf (which copies bytes it is given) each took three copies."""

    def __init__(self, name: str, dialect: Dialect = "contrib", capacity: int = 0, data: BinaryIO | None = None) -> None:
        self.name = name
        self.data = data
        self.dialect = dialect
        self.capacity = capacity  # static dialect: the KV cache positions its attention reads
        self.proto = onnx.ModelProto()
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: dict[str, onnx.ValueInfoProto] = {}
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self.scope = ""  # the block being built; node names start with it (quantization selects nodes by block)

    def input(self, name: str, elem_type: int, shape: list[int | str]) -> str:
        if name not in self.inputs:
            self.inputs[name] = helper.make_tensor_value_info(name, elem_type, shape)
        return name

    def output(self, name: str, elem_type: int, shape: list[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer of the array's values in C order (a transposed view is fine)."""
        tensor = self.proto.graph.initializer.add()
        tensor.name, tensor.data_type = name, helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        if self.data is None or array.nbytes < EXTERNAL_BYTES:
            tensor.raw_data = np.ascontiguousarray(array).tobytes()
            return name
        offset = self.data.tell()
        rows = array.reshape(len(array), -1) if array.ndim > 1 else array
        step = max(1, ROW_BYTES // (rows[:1].nbytes or 1))
        for start in range(0, len(rows), step):
            self.data.write(memoryview(np.ascontiguousarray(rows[start : start + step])).cast("B"))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", Path(self.data.name).name), ("offset", offset), ("length", array.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        return name

    def const(self, values: list[int]) -> str:
        """A small int64 initializer (shapes, axes, split sizes)."""
        self._count += 1
        return self.weight(f"/{self.scope}/const_{self._count}", np.array(values, dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs) -> str | list[str]:
        self._count += 1
        if isinstance(outputs, int):
            outputs = [f"/{self.scope}/{op_type}_{self._count}/out{i}" for i in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outputs, name=f"/{self.scope}/{op_type}_{self._count}", domain=domain, **attrs)
        )
        return outputs[0] if len(outputs) == 1 else outputs

    def rename(self, old: str, new: str) -> str:
        """Give an intermediate value a graph-output name."""
        for node in self.nodes:
            node.output[:] = [new if o == old else o for o in node.output]
            node.input[:] = [new if i == old else i for i in node.input]
        return new

    def model(self) -> onnx.ModelProto:
        model, graph = self.proto, self.proto.graph
        graph.name = self.name
        graph.node.extend(self.nodes)
        graph.input.extend(self.inputs.values())
        graph.output.extend(self.outputs)
        model.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
        model.producer_name, model.ir_version = "tandem", 10
        return model


def make_rmsnorm(b: GraphBuilder, x: str, weight: np.ndarray, name: str, eps: float) -> str:
    if b.dialect == "contrib":
        return b.op("SimplifiedLayerNormalization", [x, b.weight(name, weight)], axis=-1, epsilon=eps, stash_type=1)
    # the mean of squares as a MatMul by 1/hidden: NPUs' A16W8 op sets have no ReduceMean
    mean = b.op("MatMul", [b.op("Mul", [x, x]), b.weight(name + NORM_MEAN, np.full((len(weight), 1), 1 / len(weight), np.float32))])
    rms = b.op("Sqrt", [b.op("Add", [mean, b.weight(f"{name}.epsilon", np.array(eps, dtype=np.float32))])])
    return b.op("Mul", [b.op("Div", [x, rms]), b.weight(name, weight)])


def make_linear(b: GraphBuilder, w: Weights, x: str, prefixes: list[str], bias: bool = False) -> str:
    """x @ W.T (+ b); several projections of the same input are packed into one MatMul."""
    weight = w(f"{prefixes[0]}.weight") if len(prefixes) == 1 else np.concatenate([w(f"{p}.weight") for p in prefixes])
    name = "+".join(prefixes)
    y = b.op("MatMul", [x, b.weight(f"{name}.weight.T", weight.T)])
    if bias:
        y = b.op("Add", [y, b.weight(f"{name}.bias", np.concatenate([w(f"{p}.bias") for p in prefixes]))])
    return y


def make_embed(b: GraphBuilder, w: Weights, cfg: ModelConfig, block: Block, x: str | None) -> str:
    ids = b.input(names.INPUT_IDS, TensorProto.INT64, ["batch", "sequence"])
    return b.op("Gather", [b.weight("model.embed_tokens.weight", w("model.embed_tokens.weight")), ids])


def make_attention(b: GraphBuilder, w: Weights, cfg: ModelConfig, block: Block, x: str) -> str:
    """RMSNorm, packed q/k/v with biases, RoPE + grouped-query attention over the in-place KV cache, o_proj, residual."""
    p = f"model.layers.{block.layer}"
    h = make_rmsnorm(b, x, w(f"{p}.input_layernorm.weight"), f"{p}.input_layernorm.weight", cfg.rms_norm_eps)
    qkv = make_linear(b, w, h, [f"{p}.self_attn.{n}_proj" for n in "qkv"], bias=True)
    cache_shape = ["batch", cfg.num_kv_heads, "capacity", cfg.head_dim]
    past = [b.input(names.past_name(kind, block.layer), TensorProto.FLOAT, cache_shape) for kind in ("key", "value")]
    present = [names.present_name(kind, block.layer) for kind in ("key", "value")]
    for name in present:
        b.output(name, TensorProto.FLOAT, cache_shape)
    rope_shape = ["max_positions", cfg.head_dim // 2]
    attn, *_ = b.op(
        "GroupQueryAttention",
        [
            qkv, "", "", *past,
            b.input(names.SEQLENS_K, TensorProto.INT32, ["batch"]),
            b.input(names.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
            b.input(names.COS_CACHE, TensorProto.FLOAT, rope_shape),
            b.input(names.SIN_CACHE, TensorProto.FLOAT, rope_shape),
        ],
        outputs=[f"{p}/attention", *present],
        domain="com.microsoft",
        num_heads=cfg.num_heads,
        kv_num_heads=cfg.num_kv_heads,
        scale=1.0 / math.sqrt(cfg.head_dim),
        do_rotary=1,
        rotary_interleaved=0,
    )
    return b.op("Add", [x, make_linear(b, w, attn, [f"{p}.self_attn.o_proj"])])


def attended(capacity: int) -> str:
    """The static attention's last bias dimension: the cache's positions and the new ones."""
    return f"sequence + {capacity}"


def make_static_attention(b: GraphBuilder, w: Weights, cfg: ModelConfig, block: Block, x: str) -> str:
    """make_attention at batch 1 in the ops NPU compilers take (compiler/npu_targets.yaml), rank 4 at most. The
    cache (past K/V, b.capacity positions) is read, never written: the new positions' K/V are outputs, which the
    runtime stores. One softmax over the past and new positions' scores; its two parts then weigh the past and new
    values, so the cache is never concatenated."""
    p = f"model.layers.{block.layer}"
    heads, kv_heads, d, capacity = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, b.capacity
    h = make_rmsnorm(b, x, w(f"{p}.input_layernorm.weight"), f"{p}.input_layernorm.weight", cfg.rms_norm_eps)
    qkv = make_linear(b, w, h, [f"{p}.self_attn.{n}_proj" for n in "qkv"], bias=True)
    q, k, v = b.op("Split", [qkv, b.const([heads * d, kv_heads * d, kv_heads * d])], outputs=3, axis=-1)
    cos, sin = (b.op("Reshape", [b.input(name, TensorProto.FLOAT, [1, "sequence", d]), b.const([-1, 1, d])])
                for name in (names.ROPE_COS, names.ROPE_SIN))  # [S, 1, d]

    def rope(t: str, count: int) -> str:  # [1, S, count * d] -> [S, count, d], rotated as Qwen2's rotate_half
        t = b.op("Reshape", [t, b.const([-1, count, d])])
        first, second = b.op("Split", [t, b.const([d // 2, d // 2])], outputs=2, axis=-1)
        return b.op("Add", [b.op("Mul", [t, cos]), b.op("Mul", [b.op("Concat", [second, first], axis=-1), sin])])

    new = {"key": b.op("Transpose", [rope(k, kv_heads)], perm=[1, 0, 2]),  # [kv_heads, S, d]
           "value": b.op("Transpose", [b.op("Reshape", [v, b.const([-1, kv_heads, d])])], perm=[1, 0, 2])}
    for kind, value in new.items():
        b.output(b.rename(b.op("Reshape", [value, b.const([1, kv_heads, -1, d])]), names.new_name(kind, block.layer)),
                 TensorProto.FLOAT, [1, kv_heads, "sequence", d])
    group = heads // kv_heads
    # the new positions' K/V for every query head ([heads, S, d]); the cache's stay per kv head (not copied)
    new = {kind: b.op("Reshape", [b.op("Expand", [b.op("Reshape", [value, b.const([kv_heads, 1, -1, d])]), b.const([1, group, 1, 1])]),
                                  b.const([heads, -1, d])]) for kind, value in new.items()}
    past = {kind: b.op("Reshape", [b.input(names.past_name(kind, block.layer), TensorProto.FLOAT, [1, kv_heads, capacity, d]),
                                   b.const([kv_heads, capacity, d])]) for kind in ("key", "value")}
    query = b.op("Transpose", [rope(q, heads)], perm=[1, 0, 2])  # [heads, S, d]
    grouped = b.op("Reshape", [query, b.const([kv_heads, -1, d])])  # a kv head's query heads one after another
    scale = b.weight(f"{p}/attention_scale", np.array(1.0 / math.sqrt(d), dtype=np.float32))
    to_past = b.op("Reshape", [b.op("MatMul", [grouped, b.op("Transpose", [past["key"]], perm=[0, 2, 1])]), b.const([heads, -1, capacity])])
    to_new = b.op("MatMul", [query, b.op("Transpose", [new["key"]], perm=[0, 2, 1])])  # [heads, S, S]
    # the width spelled as the sum, which ORT's symbolic shape inference (run by its quantizer) reads as one
    bias = b.input(names.ATTENTION_BIAS, TensorProto.FLOAT, [1, "sequence", attended(capacity)])
    probs = b.op("Softmax", [b.op("Add", [b.op("Mul", [b.op("Concat", [to_past, to_new], axis=-1), scale]), bias])], axis=-1)
    of_past, of_new = (b.op("Slice", [probs, b.const([start]), b.const([stop]), b.const([-1])])
                       for start, stop in ((0, capacity), (capacity, np.iinfo(np.int64).max)))
    from_past = b.op("MatMul", [b.op("Reshape", [of_past, b.const([kv_heads, -1, capacity])]), past["value"]])  # [kv_heads, group * S, d]
    attn = b.op("Add", [b.op("Reshape", [from_past, b.const([heads, -1, d])]), b.op("MatMul", [of_new, new["value"]])])  # [heads, S, d]
    attn = b.op("Reshape", [b.op("Transpose", [attn], perm=[1, 0, 2]), b.const([1, -1, heads * d])])
    return b.op("Add", [x, make_linear(b, w, attn, [f"{p}.self_attn.o_proj"])])


def make_ffn(b: GraphBuilder, w: Weights, cfg: ModelConfig, block: Block, x: str) -> str:
    """RMSNorm, SiLU(gate) * up, down, residual."""
    p = f"model.layers.{block.layer}"
    h = make_rmsnorm(b, x, w(f"{p}.post_attention_layernorm.weight"), f"{p}.post_attention_layernorm.weight", cfg.rms_norm_eps)
    gate = make_linear(b, w, h, [f"{p}.mlp.gate_proj"])
    up = make_linear(b, w, h, [f"{p}.mlp.up_proj"])
    act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
    return b.op("Add", [x, make_linear(b, w, act, [f"{p}.mlp.down_proj"])])


def make_head(b: GraphBuilder, w: Weights, cfg: ModelConfig, block: Block, x: str) -> str:
    """Final norm + lm_head, only at the positions in logits_index ([batch, k] -> logits [batch, k, vocab])."""
    index = b.input(names.LOGITS_INDEX, TensorProto.INT64, ["batch", "positions"])
    axes = b.weight("/head/axes", np.array([-1], dtype=np.int64))
    picked = b.op("GatherND", [x, b.op("Unsqueeze", [index, axes])], batch_dims=1)
    h = make_rmsnorm(b, picked, w("model.norm.weight"), "model.norm.weight", cfg.rms_norm_eps)
    return make_linear(b, w, h, ["lm_head"])


MAKERS = {
    "contrib": {"embed": make_embed, "attention": make_attention, "ffn": make_ffn, "head": make_head},
    "static": {"attention": make_static_attention, "ffn": make_ffn},  # recipe.Recipe refuses the others on static roles
}


def build_graph(
    graph: GraphPlan, w: Weights, cfg: ModelConfig, dialect: Dialect = "contrib", capacity: int = 0, data: BinaryIO | None = None,
) -> onnx.ModelProto:
    """capacity: the static dialect's KV cache positions (fixed in the graph; the sequence dimension is fixed later).
    data: where the large initializers go (GraphBuilder); None keeps them in the model."""
    b = GraphBuilder(graph.name, dialect, capacity, data)
    batch = 1 if dialect == "static" else "batch"
    x = None if graph.blocks[0].kind == "embed" else b.input(names.HIDDEN, TensorProto.FLOAT, [batch, "sequence", cfg.hidden_size])
    for block in graph.blocks:
        b.scope = block.name
        x = MAKERS[dialect][block.kind](b, w, cfg, block, x)
    if graph.blocks[-1].kind == "head":
        b.output(b.rename(x, names.LOGITS), TensorProto.FLOAT, ["batch", "positions", cfg.vocab_size])
    else:
        b.output(b.rename(x, names.HIDDEN_NEXT), TensorProto.FLOAT, [batch, "sequence", cfg.hidden_size])
    return b.model()


def rope_tables(hf_config: dict, capacity: int) -> np.ndarray:
    """cos/sin tables [2, capacity, head_dim/2] computed by transformers' own rotary embedding (scaling included)."""
    import torch
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    rotary = Qwen2RotaryEmbedding(Qwen2Config(**hf_config))
    positions = torch.arange(capacity)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    return np.stack([cos[0, :, :half].numpy(), sin[0, :, :half].numpy()]).astype(np.float32)
