"""The axes of a study: ``--x sampler_name=euler,dpmpp_2m``, ``--y 3.steps=8..32:8``,
``--z backend=interpreter,onnx``, the engine lists (``--backend``, ``--dtype``, ``--device``),
``--seeds`` and ``--reference``.

A widget axis names ``NODE.INPUT``, or a bare input name when one node of the workflow has that
widget (``--node`` picks the node when several do). Values are a comma list, a JSON list (for
values with commas: ``--x 6.text='["a fox, red", "a cat"]'``) or ranges ``lo..hi[:step]``.
Whether each value suits its widget is the interpreter's validation's to say (``study.py``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from kiln.compiler.graph import Graph, Link
from kiln.kernels.errors import KilnError, Problem, did_you_mean
from kiln.nodes import registry

BACKENDS = ("interpreter", "onnx", "aoti")
DTYPES = ("fp32", "fp16", "bf16")
ENGINE_AXES = ("backend", "dtype", "device")
_RANGE = re.compile(r"^\s*(-?[0-9.]+)\s*\.\.\s*(-?[0-9.]+)\s*(?::\s*([0-9.]+))?\s*$")
_EXAMPLE = "e.g. --x sampler_name=euler,dpmpp_2m, --y 3.steps=8..32:8 or --z backend=interpreter,onnx"


@dataclass(frozen=True)
class Axis:
    """One dimension of the study: a widget (``node_id``/``input_name``) or an engine setting."""

    name: str                  # as the user wrote it: "sampler_name", "3.cfg", "backend"
    values: tuple
    role: str                  # "x" | "y" | "z" | "extra"
    node_id: str | None = None
    input_name: str | None = None

    @property
    def engine(self) -> bool:
        return self.node_id is None

    def as_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "node_id": self.node_id, "input_name": self.input_name,
                "values": list(self.values)}


def parse_axis(option: str, text: str, role: str, graph: Graph, default_node: str | None) -> Axis:
    """``NAME=VALUES`` given to ``option`` (``--x``...) as an Axis of ``graph``, or KilnError."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name or not raw.strip():
        raise _error(option, text, "an axis needs NAME=VALUES", _EXAMPLE)
    values = parse_values(option, name, raw)
    if name in ENGINE_AXES:
        return Axis(name, tuple(_engine_values(option, name, values)), role)
    node_id, input_name = resolve_widget(option, name, graph, default_node)
    return Axis(name, tuple(values), role, node_id, input_name)


def engine_axis(option: str, name: str, text: str) -> Axis:
    """``--backend interpreter,onnx`` (and ``--dtype``, ``--device``) as an extra axis."""
    return Axis(name, tuple(_engine_values(option, name, parse_values(option, name, text))), "extra")


def parse_values(option: str, name: str, raw: str) -> list:
    """A comma list of JSON scalars or plain strings, ranges ``lo..hi[:step]``, or a JSON list."""
    raw = raw.strip()
    if raw.startswith("["):
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as error:
            raise _error(option, f"{name}={raw}", f"the list is not JSON: {error.msg}", _EXAMPLE) from error
    else:
        values = []
        for item in raw.split(","):
            match = _RANGE.match(item)
            values.extend(_expand(option, name, match) if match else [_scalar(item.strip())])
    if not values or any(isinstance(v, (list, dict)) or v == "" for v in values):
        raise _error(option, f"{name}={raw}", "every value must be a number, true/false or text", _EXAMPLE)
    if len({json.dumps(v) for v in values}) != len(values):
        raise _error(option, f"{name}={raw}", "a value is given twice", "each value once")
    return values


def parse_seeds(text: str) -> list[int]:
    values = parse_values("--seeds", "seed", text)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 64 for v in values):
        raise _error("--seeds", text, "seeds are whole numbers from 0 to 2^64-1", "e.g. --seeds 1,2,3 or 1..4")
    return values


def resolve_widget(option: str, name: str, graph: Graph, default_node: str | None) -> tuple[str, str]:
    """(node id, input) for ``NODE.INPUT`` or a bare input name, refused when it names no widget."""
    node_id, dot, input_name = name.partition(".")
    if dot:
        node = graph.nodes.get(node_id)
        if node is None:
            raise _error(option, name, "the workflow has no such node", "one of " + ", ".join(sorted(graph.nodes)),
                         hint=did_you_mean(node_id, graph.nodes))
        _check_widget(option, node_id, node, input_name)
        return node_id, input_name
    candidates = [node_id for node_id, node in graph.nodes.items() if name in _widgets(node.class_type)]
    if default_node is not None:
        node = graph.nodes.get(default_node)
        if node is None:
            raise _error("--node", default_node, "the workflow has no such node",
                         "one of " + ", ".join(sorted(graph.nodes)))
        _check_widget(option, default_node, node, name)
        return default_node, name
    if len(candidates) == 1:
        node = graph.nodes[candidates[0]]
        _check_widget(option, candidates[0], node, name)
        return candidates[0], name
    if candidates:
        listed = ", ".join(f"{n} ({graph.nodes[n].class_type})" for n in candidates)
        raise _error(option, name, f"several nodes have a {name!r} widget: {listed}",
                     f"NODE.{name} (e.g. {candidates[0]}.{name}) or --node {candidates[0]}")
    widgets = sorted({w for node in graph.nodes.values() for w in _widgets(node.class_type)})
    raise _error(option, name, "no node of the workflow has this widget",
                 f"NODE.INPUT, an input of {', '.join(widgets)}, or {', '.join(ENGINE_AXES)}",
                 hint=did_you_mean(name, [*widgets, *ENGINE_AXES]))


def _widgets(class_type: str) -> list[str]:
    definition = registry.get(class_type)
    return [spec.name for spec in definition.inputs if spec.is_widget] if definition is not None else []


def _check_widget(option: str, node_id: str, node, input_name: str) -> None:
    class_type, title = node.class_type, node.title
    if registry.get(class_type) is None:
        raise KilnError([Problem("missing_node_type", f"node type {class_type!r} is not supported by kiln",
                                 node_id=node_id, class_type=class_type, title=title, hint=f"({option})")])
    widgets = _widgets(class_type)
    if input_name not in widgets:
        raise KilnError([Problem("invalid_axis", f"{class_type} has no widget {input_name!r}", node_id=node_id,
                                 class_type=class_type, title=title, input_name=input_name,
                                 expected="one of " + ", ".join(widgets), found=input_name,
                                 hint=" ".join(filter(None, [did_you_mean(input_name, widgets), f"({option})"])))])
    value = node.inputs.get(input_name)
    if isinstance(value, (Link, list)):
        raise KilnError([Problem("invalid_axis", "the value comes from another node's output, not a widget",
                                 node_id=node_id, class_type=class_type, title=title, input_name=input_name,
                                 expected="a widget value", found=f"a link to node {_source(value)}",
                                 hint=f"({option}: vary that node's input instead)")])


def _source(value) -> str:
    return value.node_id if isinstance(value, Link) else str(value[0])


def _engine_values(option: str, name: str, values: list) -> list:
    choices = {"backend": BACKENDS, "dtype": DTYPES}.get(name)
    for value in values:
        ok = value in choices if choices else isinstance(value, str) and re.fullmatch(r"cpu|cuda(:\d+)?", value)
        if not ok:
            raise _error(option, f"{name}={value}", f"unknown {name}",
                         "one of " + ", ".join(choices) if choices else "cpu or cuda[:N]",
                         hint=did_you_mean(value, choices or ("cpu", "cuda")))
    return values


def _expand(option: str, name: str, match: re.Match) -> list:
    lo, hi, step = (_scalar(g) if g is not None else None for g in match.groups())
    numbers = all(isinstance(v, (int, float)) for v in (lo, hi) + ((step,) if step is not None else ()))
    if not numbers:
        raise _error(option, match.group(0), "a range needs numbers: lo..hi[:step]", "e.g. 8..32:8")
    if step is None:
        if not (isinstance(lo, int) and isinstance(hi, int)):
            raise _error(option, match.group(0), "a range of non-whole numbers needs a step", "e.g. 5..7:0.5")
        step = 1
    if step <= 0 or hi < lo:
        raise _error(option, match.group(0), "a range runs upwards by a positive step", "lo <= hi, step > 0")
    count = int((hi - lo) / step + 1e-9) + 1
    if count > 1000:
        raise _error(option, match.group(0), "a range of more than 1000 values", "a coarser step")
    whole = all(isinstance(v, int) for v in (lo, hi, step))
    return [lo + i * step if whole else round(lo + i * step, 10) for i in range(count)]


def _scalar(text: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (int, float, bool, str)) else text


def _error(option: str, found: str, message: str, expected: str, hint: str | None = None) -> KilnError:
    return KilnError([Problem("invalid_axis", message, input_name=option, expected=expected, found=repr(found),
                              hint=hint)])
