"""Execution-provider resolution: a role's preference chain against what this onnxruntime build offers."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from runtime.errors import TandemError
from runtime.manifest import RoleSpec

log = logging.getLogger("tandem")


@dataclass
class Placement:
    """Where one graph ended up, and why the EPs before it in its chain were passed over."""

    graph: str
    role: str
    requested: list[str]
    provider: str
    skipped: list[str] = field(default_factory=list)

    @property
    def fell_back(self) -> bool:
        return self.provider != self.requested[0]


def create_session(
    graph: str, path: Path, role: str, chain: RoleSpec, options: ort.SessionOptions
) -> tuple[ort.InferenceSession, Placement]:
    """Create the session on the first EP of the chain that is available and accepts the graph."""
    available = set(ort.get_available_providers())
    placement = Placement(graph, role, [p.name for p in chain.providers], provider="")
    for spec in chain.providers:
        if spec.ort_name not in available:
            placement.skipped.append(f"{spec.name}: not in this onnxruntime build")
            continue
        providers = [(spec.ort_name, dict(spec.options))]
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # an EP that rejects the graph: try the next one in the chain
            placement.skipped.append(f"{spec.name}: {str(e).strip().splitlines()[0][:200]}")
            continue
        placement.provider = spec.name
        if placement.fell_back:
            log.warning("graph %s (role %s): %s -> runs on %s", graph, role, "; ".join(placement.skipped), spec.name)
        return session, placement
    raise TandemError(f"graph {graph} ({path.name}): no execution provider of role {role} can run it: {'; '.join(placement.skipped)}")
