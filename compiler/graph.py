"""The workflow graph IR: nodes with constant or linked inputs, in ComfyUI's API shape."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass(frozen=True)
class Link:
    """A reference to output ``slot`` of node ``node_id``."""

    node_id: str
    slot: int


@dataclass
class Node:
    id: str
    class_type: str
    inputs: dict[str, Any] = field(default_factory=dict)   # name -> constant | Link
    title: str | None = None

    def links(self) -> Iterator[tuple[str, Link]]:
        for name, value in self.inputs.items():
            if isinstance(value, Link):
                yield name, value


@dataclass
class Graph:
    nodes: dict[str, Node]
    source: dict | None = None     # the API workflow as read, embedded into saved PNGs
    editor: dict | None = None     # the editor's (UI-format) graph it was converted from: the PNGs' workflow chunk

    def topological_order(self, roots: list[str] | None = None) -> list[str]:
        """Nodes reachable backwards from ``roots`` (default: all), dependencies first.

        Raises ValueError naming the cycle if there is one; links to missing nodes are skipped
        (validation reports them).
        """
        order: list[str] = []
        state: dict[str, int] = {}   # 1 = on the stack, 2 = done

        def visit(node_id: str, path: list[str]) -> None:
            mark = state.get(node_id)
            if mark == 2:
                return
            if mark == 1:
                cycle = path[path.index(node_id):] + [node_id]
                raise ValueError(" -> ".join(cycle))
            state[node_id] = 1
            for _, link in self.nodes[node_id].links():
                if link.node_id in self.nodes:
                    visit(link.node_id, path + [node_id])
            state[node_id] = 2
            order.append(node_id)

        for node_id in sorted(roots if roots is not None else self.nodes, key=_numeric_first):
            visit(node_id, [])
        return order


def _numeric_first(node_id: str) -> tuple:
    """Order ids as ComfyUI users read them: 2 before 10, then non-numeric ids."""
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)
