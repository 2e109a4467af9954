"""Common-subexpression elimination on the workflow graph."""
from __future__ import annotations

from dataclasses import replace

from kiln.compiler.graph import Link, Node
from kiln.compiler.stages import Compilation
from kiln.nodes import registry


def merge_identical(c: Compilation) -> Compilation:
    """Merge nodes with the same class_type and the same inputs (links compared after their
    sources were merged), so two loaders of one file load it once and identical prompt
    encodes run once.

    Guarantees: no two remaining mergeable nodes are identical (the fixed point: nodes are
    visited dependencies first, so a node's sources are already canonical when it is keyed);
    seeded nodes (each draws its own noise), output nodes and nodes with a runtime input are
    never merged; consumers of a merged node read its surviving twin (the first in dependency order).
    """
    pinned = {i.node_id for i in c.inputs}
    canonical: dict[str, str] = {}
    by_key: dict[tuple, str] = {}
    nodes: dict[str, Node] = {}
    for node_id in c.graph.topological_order():
        node = c.graph.nodes[node_id]
        inputs = {name: Link(canonical[v.node_id], v.slot) if isinstance(v, Link) else v
                  for name, v in node.inputs.items()}
        node = replace(node, inputs=inputs)
        node_def = registry.get(node.class_type)
        canonical[node_id] = node_id
        if node_def.seed is not None or node_def.output_node or node_id in pinned:
            nodes[node_id] = node
            continue
        key = (node.class_type,) + tuple(sorted(
            (name, _key(value)) for name, value in inputs.items() if node_def.input(name) is not None))
        twin = by_key.setdefault(key, node_id)
        canonical[node_id] = twin
        if twin == node_id:
            nodes[node_id] = node
    return replace(c, graph=replace(c.graph, nodes=nodes))


def _key(value) -> tuple:
    """Hashable and type-exact (1 and 1.0 and True stay different)."""
    if isinstance(value, Link):
        return ("link", value.node_id, value.slot)
    return (type(value).__name__, repr(value))
