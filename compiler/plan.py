"""Partition: every block gets a role; adjacent blocks of one role may fuse into one graph."""
from __future__ import annotations

from dataclasses import dataclass

from compiler.recipe import Recipe
from runtime.manifest import BlockKind, Role


@dataclass(frozen=True)
class Block:
    kind: BlockKind
    layer: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}.{self.layer}"


@dataclass(frozen=True)
class GraphPlan:
    role: Role
    blocks: tuple[Block, ...]

    @property
    def name(self) -> str:
        first, last = self.blocks[0].name, self.blocks[-1].name
        return first if first == last else f"{first}-to-{last}"


def model_blocks(num_layers: int) -> list[Block]:
    layers = [Block(kind, i) for i in range(num_layers) for kind in ("attention", "ffn")]
    return [Block("embed"), *layers, Block("head")]


def plan(recipe: Recipe, num_layers: int) -> list[GraphPlan]:
    """The graphs to build, in the order they run."""
    roles = recipe.placement.model_dump()
    graphs: list[GraphPlan] = []
    for block in model_blocks(num_layers):
        role = roles[block.kind]
        if recipe.fuse and graphs and graphs[-1].role == role:
            graphs[-1] = GraphPlan(role, graphs[-1].blocks + (block,))
        else:
            graphs.append(GraphPlan(role, (block,)))
    return graphs
