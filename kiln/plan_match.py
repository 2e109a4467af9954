"""Whether a compiled plan serves a workflow, and with which runtime input values (``kiln serve``
answering prompts from plans, ``kiln bench`` serving a group's cells from one plan).

A workflow matches a plan when it is the plan's source workflow with the same nodes, classes and
links, differing only in values the plan takes at run time; whether those values have the right
type and lie inside the compiled range is ``kiln.runtime.executor.bind_inputs``'s to say.
"""
from __future__ import annotations

from typing import Any

from kiln.runtime.manifest import Manifest


def clean_node(node: Any) -> dict:
    """A prompt node as {class_type, inputs}, whatever else it carries (``_meta``) or lacks."""
    if not isinstance(node, dict):
        return {}
    inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
    return {"class_type": node.get("class_type"), "inputs": inputs}


def match_values(manifest: Manifest, prompt: dict, graph) -> dict | None:
    """The runtime input values of ``prompt`` for the plan, or None when anything else differs.

    Values compare as validation converted them (``graph``), so ``7`` and ``7.0`` are one cfg."""
    source = manifest.workflow
    if set(source) != set(prompt):
        return None
    runtime = {(i.node_id, i.input_name): i.name for i in manifest.inputs}
    values = {}
    for node_id, planned in source.items():
        a, b = clean_node(planned), clean_node(prompt[node_id])
        if a["class_type"] != b["class_type"] or set(a["inputs"]) != set(b["inputs"]):
            return None
        node = graph.nodes.get(node_id)
        for name, planned_value in a["inputs"].items():
            given = node.inputs.get(name, b["inputs"][name]) if node is not None else b["inputs"][name]
            if (node_id, name) in runtime:
                values[runtime[(node_id, name)]] = given
            elif not _same(planned_value, b["inputs"][name], given):
                return None
    return values


def _same(planned: Any, raw: Any, converted: Any) -> bool:
    if isinstance(planned, list):   # a link [node id, slot]
        return isinstance(raw, list) and [str(x) for x in planned] == [str(x) for x in raw]
    if isinstance(planned, bool) or isinstance(converted, bool):
        return planned == converted and type(planned) is type(converted)
    if isinstance(planned, (int, float)) and isinstance(converted, (int, float)):
        return float(planned) == float(converted)
    return planned == converted
