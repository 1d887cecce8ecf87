"""A build's progress on disk, so that an interrupted compile (Ctrl-C, a killed process, the end of a working
session: a 7B takes hours on a laptop's cores) goes on where it stopped with `tandem compile --resume`: the blocks
finished so far with what the manifest needs of each, and the calibration samples carried on to the next block."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from runtime.manifest import TensorSpec

STATE = ".build-state.json"

BlockResult = tuple[dict[str, TensorSpec], dict[str, TensorSpec], dict[str, str]]  # inputs, outputs, quantization


class BuildState:
    """Finished blocks of the build in `root`, for the recipe and source named by `key` (another key: none)."""

    def __init__(self, root: Path, key: dict[str, Any]) -> None:
        self.root, self.key = root, key
        self.finished: dict[str, BlockResult] = {}
        self._samples: str | None = None
        state = root / STATE
        if state.is_file():
            saved = json.loads(state.read_text())
            if saved["key"] == key and all((root / "graphs" / f"{name}.onnx").is_file() for name in saved["finished"]):
                self.finished = {name: _result(r) for name, r in saved["finished"].items()}
                self._samples = saved["samples"]

    def samples(self) -> list[np.ndarray] | None:
        """The calibration samples the first unfinished block takes (None: none saved, they start from the text)."""
        if not self._samples:
            return None
        with np.load(self.root / self._samples) as data:
            return [data[f"arr_{i}"] for i in range(len(data.files))]

    def record(self, finished: dict[str, BlockResult], samples: list[np.ndarray] | None) -> None:
        """Blocks now finished, and the samples the next block takes. The samples go to a new file first, then the
        state naming it replaces the old state: a kill at any point leaves a state and the samples it names."""
        if samples is not None:
            self._samples = f".build-samples.{len(finished)}.npz"
            _replace(self.root / self._samples, lambda f: np.savez(f, *samples))
        self.finished = dict(finished)
        data = {"key": self.key, "samples": self._samples, "finished": {name: _plain(r) for name, r in finished.items()}}
        _replace(self.root / STATE, lambda f: f.write(json.dumps(data).encode()))
        self._remove(keep=self._samples)

    def clear(self) -> None:
        (self.root / STATE).unlink(missing_ok=True)
        self._remove(keep=None)

    def _remove(self, keep: str | None) -> None:
        for old in self.root.glob(".build-samples.*.npz"):
            if old.name != keep:
                old.unlink()


def resumable(root: Path) -> bool:
    return (root / STATE).is_file()


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _plain(result: BlockResult) -> list:
    inputs, outputs, described = result
    return [{n: s.model_dump() for n, s in inputs.items()}, {n: s.model_dump() for n, s in outputs.items()}, described]


def _result(plain: list) -> BlockResult:
    inputs, outputs, described = plain
    return ({n: TensorSpec(**s) for n, s in inputs.items()}, {n: TensorSpec(**s) for n, s in outputs.items()}, described)
