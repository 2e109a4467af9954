"""``GET /object_info``: kiln's node catalogue in ComfyUI's ``node_info`` shape, so front ends and
clients that list nodes and their widgets work unchanged (``server.py: node_info``)."""
from __future__ import annotations

from typing import Any

from kiln.nodes import registry
from kiln.nodes.registry import InputSpec, NodeDef


def object_info(context: Any) -> dict[str, dict]:
    """Every node, its file pickers listing the files ``context`` (models, input folder) holds."""
    return {class_type: node_info(definition, context) for class_type, definition in registry.all_nodes().items()}


def node_info(definition: NodeDef, context: Any) -> dict:
    required, optional = {}, {}
    for spec in definition.inputs:
        (optional if spec.optional else required)[spec.name] = _input_type(spec, definition, context)
    inputs = {"required": required, **({"optional": optional} if optional else {})}
    return {
        "input": inputs,
        "input_order": {key: list(value) for key, value in inputs.items()},
        "output": list(definition.outputs),
        "output_is_list": [False] * len(definition.outputs),
        "output_name": list(definition.output_names),
        "name": definition.class_type,
        "display_name": definition.display_name or definition.class_type,
        "description": (definition.function.__doc__ or "").strip().split("\n\n")[0],
        "python_module": definition.python_module,
        "category": definition.category or "sd",
        "output_node": definition.output_node,
    }


def _input_type(spec: InputSpec, definition: NodeDef, context: Any) -> list:
    if not spec.is_widget:
        return [spec.type]
    options: dict[str, Any] = {}
    if spec.default is not None:
        options["default"] = spec.default
    if spec.type in ("INT", "FLOAT"):
        options.update({k: v for k, v in (("min", spec.min), ("max", spec.max), ("step", spec.step)) if v is not None})
        if spec.round is not None:
            options["round"] = spec.round
        if spec.name == definition.seed:
            options["control_after_generate"] = True
    if spec.type == "STRING":
        options["multiline"] = spec.multiline
        if spec.multiline:
            options["dynamicPrompts"] = True
    if spec.type == "COMBO":
        choices = spec.choices(context) if callable(spec.choices) else spec.choices
        if spec.folder is not None and not callable(spec.choices):   # the folder's files, read now
            choices = context.models.list(spec.folder) if context.models is not None else []
        if spec.folder == "input":
            options["image_upload"] = True
        return [list(choices or []), options]
    return [spec.type, options]
