"""Runtime LoRAs: a LoraLoader whose file or strengths are runtime inputs patches the plan's
weights when it runs, so at compile time its outputs are its inputs."""
from __future__ import annotations

from dataclasses import replace

from kiln.compiler.graph import Link, Node
from kiln.compiler.stages import Compilation
from kiln.kernels.errors import KilnError, Problem
from kiln.nodes import registry

# A runtime LoRA node's outputs, by slot, and the input each passes through at compile time.
_PASSES_THROUGH = ("model", "clip")


def runtime_loras(c: Compilation) -> Compilation:
    """Take every node of plan kind ``lora`` that has a runtime input out of the graph: its
    readers read its model (and clip) inputs instead, so the plan is compiled with the weights
    before it and the runtime applies the LoRA named at run time (``kiln.runtime.kinds.lora``).

    Guarantees: ``runtime_loras`` lists those nodes in execution order, their model and clip
    inputs naming the loader outputs whose weights they patch; none remains in the graph and no
    link points at one. A LoRA node with only constant inputs
    downstream of one is refused: it would be merged into the weights first, so the two LoRAs
    would be added in another order than ComfyUI adds them.
    """
    with_inputs = {i.node_id for i in c.inputs}
    order = c.graph.topological_order()
    chosen = [node_id for node_id in order if node_id in with_inputs and _is_lora(c.graph.nodes[node_id])]
    if not chosen:
        return c
    _refuse_constant_loras_after(c, chosen, order)
    substitute = {Link(node_id, slot): c.graph.nodes[node_id].inputs[name]
                  for node_id in chosen for slot, name in enumerate(_PASSES_THROUGH)
                  if name in c.graph.nodes[node_id].inputs}

    def through(value):
        while isinstance(value, Link) and value in substitute:
            value = substitute[value]
        return value

    nodes = {node_id: replace(node, inputs={k: through(v) for k, v in node.inputs.items()})
             for node_id, node in c.graph.nodes.items() if node_id not in chosen}
    loras = [c.graph.nodes[node_id] for node_id in chosen]
    return replace(c, graph=replace(c.graph, nodes=nodes),
                   runtime_loras=tuple(replace(n, inputs={k: through(v) for k, v in n.inputs.items()}) for n in loras))


def _is_lora(node: Node) -> bool:
    plan = registry.get(node.class_type).plan
    return plan is not None and plan.kind == "lora"


def _refuse_constant_loras_after(c: Compilation, chosen: list[str], order: list[str]) -> None:
    downstream = set(chosen)
    problems = []
    for node_id in order:
        node = c.graph.nodes[node_id]
        if node_id in downstream or not any(link.node_id in downstream for _, link in node.links()):
            continue
        downstream.add(node_id)
        if _is_lora(node) and node_id not in chosen:
            source = next(link.node_id for _, link in node.links() if link.node_id in chosen)
            problems.append(Problem(
                "unsupported_in_plan", f"a LoRA with constant inputs after the runtime LoRA of node {source} "
                "would be merged into the plan's weights before it, adding the two in another order than "
                "ComfyUI", node_id=node_id, class_type=node.class_type, title=node.title,
                expected=f"the runtime LoRA (node {source}) last on its model, or --input "
                f"{node_id}.lora_name so this one is applied at run time too", found=f"{node.class_type} after it"))
    if problems:
        raise KilnError(problems)
