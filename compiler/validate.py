"""Validation of a parsed workflow before anything runs, collecting every problem.

Follows ComfyUI's ``validate_prompt``/``validate_inputs``: unknown class types anywhere are
errors; inputs are checked on the nodes an output node depends on; constants are converted
as ComfyUI converts them (``int()``/``float()``/``str()``), then range- and choice-checked;
links must point at an existing node and output slot of the expected type; files named by
loaders must exist in the folders searched. The result is a graph with converted constants.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from kiln.kernels.errors import KilnError, Problem, did_you_mean, short_repr
from kiln.compiler.graph import Graph, Link, Node
from kiln.nodes import registry
from kiln.nodes.folders import IMAGE_EXTENSIONS, ModelFolders, ModelNotFound, list_files
from kiln.nodes.registry import InputSpec, NodeDef

_CONVERTERS = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


def validate(graph: Graph, models: ModelFolders | None = None, input_dir: str | Path | None = None) -> Graph:
    """Return ``graph`` with its constants converted, or raise KilnError listing every problem."""
    problems: list[Problem] = []
    known = registry.all_nodes()
    defs = node_defs(graph, problems)
    outputs = [node_id for node_id, d in defs.items() if d.output_node]
    if not outputs and not problems:
        problems.append(Problem("prompt_no_outputs", "Prompt has no outputs",
                                expected="at least one of " + ", ".join(
                                    sorted(c for c, d in known.items() if d.output_node)),
                                found=", ".join(sorted({n.class_type for n in graph.nodes.values()}))))
    try:
        needed = graph.topological_order(outputs)
    except ValueError as cycle:   # still check every node, so each problem is told at once
        problems.append(Problem("dependency_cycle", f"the workflow has a cycle: {cycle}"))
        needed = list(graph.nodes)

    checked: dict[str, Node] = dict(graph.nodes)
    for node_id in needed:
        node_def = defs.get(node_id)
        if node_def is not None:
            checked[node_id] = _check_node(graph, graph.nodes[node_id], node_def, defs, models,
                                           input_dir, problems)
    if problems:
        raise KilnError(problems)
    return replace(graph, nodes=checked)


def node_defs(graph: Graph, problems: list[Problem]) -> dict[str, NodeDef]:
    """Each node's catalogue definition; a problem for each class_type kiln does not have."""
    known = registry.all_nodes()
    defs = {}
    for node in graph.nodes.values():
        node_def = known.get(node.class_type)
        if node_def is None:
            problems.append(Problem("missing_node_type", f"node type {node.class_type!r} is not supported by kiln",
                                    node_id=node.id, class_type=node.class_type, title=node.title,
                                    hint=did_you_mean(node.class_type, known)))
        else:
            defs[node.id] = node_def
    return defs


def _check_node(graph: Graph, node: Node, node_def: NodeDef, defs: dict[str, NodeDef],
                models: ModelFolders | None, input_dir: str | Path | None,
                problems: list[Problem]) -> Node:
    converted = dict(node.inputs)

    misuse = node_def.misuse_hint(node.inputs) if node_def.misuse_hint is not None else None

    def problem(code: str, message: str, spec: InputSpec, **kw: Any) -> None:
        if misuse:
            kw["hint"] = f"{kw['hint']} {misuse}" if kw.get("hint") else misuse
        problems.append(Problem(code, message, node_id=node.id, class_type=node.class_type,
                                title=node.title, input_name=spec.name, **kw))

    for spec in node_def.inputs:
        if spec.name not in node.inputs:
            if not spec.optional:
                problem("required_input_missing", "required input is missing", spec,
                        expected=_describe(spec))
            continue
        value = node.inputs[spec.name]
        if isinstance(value, Link):
            _check_link(graph, value, spec, defs, problem)
            continue
        if not spec.is_widget:
            problem("invalid_input_type", "input must be linked to another node's output", spec,
                    expected=f"a link [node_id, slot] to a {spec.type} output", found=short_repr(value))
            continue
        ok, value = _convert(value, spec, problem)
        if ok and spec.folder is not None:
            _check_file(value, spec, models, input_dir, problem)
        converted[spec.name] = value
    return replace(node, inputs=converted)


def _check_link(graph: Graph, link: Link, spec: InputSpec, defs: dict[str, NodeDef], problem) -> None:
    source = graph.nodes.get(link.node_id)
    if source is None:
        problem("bad_linked_input", f"links to node {link.node_id!r}, which is not in the workflow", spec,
                expected=f"a {spec.type} output", found=f"[{link.node_id!r}, {link.slot}]")
        return
    source_def = defs.get(link.node_id)
    if source_def is None:
        return   # the unknown source type is reported on its own
    if link.slot >= len(source_def.outputs):
        problem("bad_linked_input", f"links to output slot {link.slot} of node {link.node_id} "
                f"({source.class_type}), which has {len(source_def.outputs)} output(s)", spec,
                expected=f"slot 0..{len(source_def.outputs) - 1}", found=str(link.slot))
        return
    received = source_def.outputs[link.slot]
    if received != spec.type and "*" not in (received, spec.type):
        problem("return_type_mismatch", f"return type mismatch between linked nodes ({link.node_id} "
                f"{source.class_type} output {link.slot})", spec, expected=spec.type, found=received)


def _convert(value: Any, spec: InputSpec, problem) -> tuple[bool, Any]:
    if spec.type == "COMBO" and spec.folder is not None:
        return True, value   # a file name: checked against the folders by _check_file
    if spec.type == "COMBO":
        choices = list(spec.choices) if spec.choices is not None and not callable(spec.choices) else None
        if choices is not None and value not in choices:
            problem("value_not_in_list", "value not in list", spec, expected=f"one of {_list(choices)}",
                    found=short_repr(value), hint=did_you_mean(value, choices))
            return False, value
        return True, value
    try:
        value = _CONVERTERS[spec.type](value)   # ComfyUI converts exactly like this
    except (TypeError, ValueError, OverflowError):
        problem("invalid_input_type", f"failed to convert an input value to a {spec.type} value", spec,
                expected=spec.type, found=short_repr(value))
        return False, value
    if spec.min is not None and value < spec.min:
        problem("value_smaller_than_min", f"value {value} is smaller than min of {spec.min}", spec,
                expected=f">= {spec.min}", found=str(value))
        return False, value
    if spec.max is not None and value > spec.max:
        problem("value_bigger_than_max", f"value {value} is bigger than max of {spec.max}", spec,
                expected=f"<= {spec.max}", found=str(value))
        return False, value
    return True, value


def _check_file(name: Any, spec: InputSpec, models: ModelFolders | None, input_dir: str | Path | None,
                problem) -> None:
    if spec.folder == "input":
        folder = Path(input_dir) if input_dir is not None else None
        if folder is not None and (folder / str(name)).is_file():
            return
        available = list_files(folder, IMAGE_EXTENSIONS) if folder is not None else []
        where = str(folder) if folder is not None else "(no --input-dir given)"
        problem("value_not_in_list", f"input file not found in {where}", spec,
                expected=f"one of {_list(available)}" if available else "an image file in the input folder",
                found=short_repr(name), hint=did_you_mean(name, available))
        return
    folders = models if models is not None else ModelFolders()
    try:
        folders.resolve(spec.folder, str(name))
    except ModelNotFound as missing:
        searched = ", ".join(str(p) for p in missing.searched) or "(no --models folder given)"
        problem("value_not_in_list", f"{spec.folder} file not found; searched {searched}", spec,
                expected=f"one of {_list(missing.available)}" if missing.available
                else f"a model file in a {spec.folder}/ folder",
                found=short_repr(name), hint=did_you_mean(name, missing.available))


def _describe(spec: InputSpec) -> str:
    if spec.is_widget:
        return f"a {spec.type} value" + (f" (default {spec.default!r})" if spec.default is not None else "")
    return f"a link to a {spec.type} output"


def _list(choices: list, limit: int = 12) -> str:
    shown = ", ".join(repr(c) for c in choices[:limit])
    return f"[{shown}{', ...' if len(choices) > limit else ''}]"

