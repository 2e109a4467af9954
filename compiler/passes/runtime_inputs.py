"""Runtime inputs: the widget values a plan takes when it runs; every other value is a constant."""
from __future__ import annotations

from dataclasses import replace

from kiln.kernels.errors import KilnError, Problem, did_you_mean
from kiln.compiler.graph import Link
from kiln.compiler.stages import Compilation
from kiln.nodes import registry
from kiln.nodes.registry import InputSpec
from kiln.runtime.manifest import RuntimeInput

_EXAMPLE = "e.g. --input 6.text or --input 5.width=512..1024"


def runtime_inputs(c: Compilation) -> Compilation:
    """Resolve the ``--input NODE.INPUT[=lo..hi]`` declarations, plus every seeded node's seed widget.

    Guarantees: each RuntimeInput names a widget of a node in the graph whose workflow value is a
    constant (its default); INT/FLOAT inputs carry a range inside the node's own min/max that
    holds the default (the declared ``lo..hi``, else the node's); COMBO inputs list their
    choices; a file name a plan opens at run time (a LoraLoader's ``lora_name``) is a STRING.
    Inputs come in execution order, then the node's input order. Unknown nodes or inputs,
    link-only sockets, linked widgets, other file names, ranges on non-numbers, bad or
    duplicate declarations are refused, all at once.
    """
    problems: list[Problem] = []
    declared: dict[tuple[str, str], tuple[float, float] | None] = {}
    for text in c.options.inputs:
        parsed = _parse(text, problems)
        if parsed is None:
            continue
        node_id, input_name, bounds = parsed
        if (node_id, input_name) in declared:
            problems.append(Problem("invalid_runtime_input", "declared twice", node_id=node_id,
                                    input_name=input_name, found=f"--input {text}"))
        declared[(node_id, input_name)] = bounds
    for node_id, node in c.graph.nodes.items():
        node_def = registry.get(node.class_type)
        if node_def.seed is not None:
            declared.setdefault((node_id, node_def.seed), None)

    found: list[RuntimeInput] = []
    for (node_id, input_name), bounds in declared.items():
        runtime_input = _resolve(c, node_id, input_name, bounds, problems)
        if runtime_input is not None:
            found.append(runtime_input)
    if problems:
        raise KilnError(problems)
    order = {node_id: i for i, node_id in enumerate(c.graph.topological_order())}

    def position(i: RuntimeInput) -> tuple[int, int]:
        names = [s.name for s in registry.get(c.graph.nodes[i.node_id].class_type).inputs]
        return order[i.node_id], names.index(i.input_name)

    return replace(c, inputs=tuple(sorted(found, key=position)))


def _parse(text: str, problems: list[Problem]) -> tuple[str, str, tuple[float, float] | None] | None:
    target, has_range, span = text.partition("=")
    node_id, dot, input_name = target.strip().partition(".")
    lo, dots, hi = span.partition("..")
    if not node_id or not dot or not input_name or (has_range and not dots):
        problems.append(Problem("invalid_runtime_input", "--input needs NODE.INPUT or NODE.INPUT=lo..hi",
                                expected=_EXAMPLE, found=repr(text)))
        return None
    if not has_range:
        return node_id, input_name, None
    try:
        return node_id, input_name, (_number(lo), _number(hi))
    except ValueError:
        problems.append(Problem("invalid_runtime_input", "a range needs two numbers, lo..hi", node_id=node_id,
                                input_name=input_name, expected=_EXAMPLE, found=repr(span)))
        return None


def _number(text: str) -> float:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


def _resolve(c: Compilation, node_id: str, input_name: str, bounds: tuple[float, float] | None,
             problems: list[Problem]) -> RuntimeInput | None:
    node = c.graph.nodes.get(node_id)
    if node is None:
        why = ("no output node depends on it" if c.graph.source and node_id in c.graph.source
               else "it is not in the workflow")
        problems.append(Problem("invalid_runtime_input", f"cannot take node {node_id} as an input: {why}",
                                node_id=node_id, input_name=input_name,
                                expected="a node of " + ", ".join(c.graph.topological_order()), found=node_id))
        return None
    node_def = registry.get(node.class_type)

    def refuse(message: str, **kw) -> None:
        problems.append(Problem("invalid_runtime_input", message, node_id=node_id, class_type=node.class_type,
                                title=node.title, input_name=input_name, **kw))

    spec = node_def.input(input_name)
    widgets = [s.name for s in node_def.inputs if s.is_widget]
    if spec is None:
        refuse(f"{node.class_type} has no input {input_name!r}", expected="one of " + ", ".join(widgets),
               found=input_name, hint=did_you_mean(input_name, widgets))
        return None
    if not spec.is_widget:
        refuse(f"a {spec.type} socket carries another node's output, not a value",
               expected="a widget input: " + ", ".join(widgets), found=spec.type)
        return None
    value = node.inputs.get(input_name, spec.default)
    if isinstance(value, Link):
        refuse(f"the value comes from node {value.node_id} (output {value.slot}); declare that node's input instead",
               found=f"[{value.node_id!r}, {value.slot}]")
        return None
    file_input = spec.folder is not None
    if file_input and input_name not in (node_def.plan.runtime_widgets if node_def.plan else {}):
        refuse("file names are fixed when the plan is compiled (the models and images are built into it)",
               expected="a number, text or option input, or a LoraLoader's lora_name",
               found=f"{spec.type} of {spec.folder} files")
        return None
    low, high = spec.min, spec.max
    if bounds is not None:
        if spec.type not in ("INT", "FLOAT"):
            refuse("only INT and FLOAT inputs take a range", expected=f"--input {node_id}.{input_name}",
                   found=f"a {spec.type} input with a range")
            return None
        if spec.type == "INT" and any(b != int(b) for b in bounds):
            refuse("an INT range needs whole numbers", found=f"{bounds[0]}..{bounds[1]}")
            return None
        low, high = (int(b) if spec.type == "INT" else float(b) for b in bounds)
        if low > high or (spec.min is not None and low < spec.min) or (spec.max is not None and high > spec.max):
            refuse("the range must be lo <= hi inside the node's own limits",
                   expected=f"within {spec.min}..{spec.max}", found=f"{low}..{high}")
            return None
        if not low <= value <= high:
            refuse("the workflow's value (the plan's default) lies outside the range",
                   expected=f"{low}..{high}", found=repr(value))
            return None
    # A file a plan opens at run time (a LoRA): any name of its folder then, not today's list.
    return RuntimeInput(name=f"{node_id}.{input_name}", node_id=node_id, input_name=input_name,
                        type="STRING" if file_input else spec.type, default=value,
                        min=low if spec.type in ("INT", "FLOAT") else None,
                        max=high if spec.type in ("INT", "FLOAT") else None,
                        choices=None if file_input else _choices(spec), seed=input_name == node_def.seed)


def _choices(spec: InputSpec) -> list | None:
    static = spec.type == "COMBO" and spec.choices is not None and not callable(spec.choices)
    return list(spec.choices) if static else None
