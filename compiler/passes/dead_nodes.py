"""Dead-node elimination."""
from __future__ import annotations

from dataclasses import replace

from kiln.compiler.stages import Compilation
from kiln.nodes import registry


def dead_nodes(c: Compilation) -> Compilation:
    """Keep exactly the nodes some output node (SaveImage, PreviewImage) depends on.

    Guarantees: every remaining node is an output node or an ancestor of one; links of the
    remaining nodes all point at remaining nodes. The source workflow is left as written.
    """
    outputs = [node_id for node_id, node in c.graph.nodes.items()
               if registry.get(node.class_type).output_node]
    live = c.graph.topological_order(outputs)
    return replace(c, graph=replace(c.graph, nodes={node_id: c.graph.nodes[node_id] for node_id in live}))
