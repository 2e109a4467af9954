"""The editor's (UI-format) workflow -> the API prompt, as ComfyUI's front end builds it
(``graphToPrompt``; ../shared/COMFYUI_SERVER_NOTES.md section 10).

UI format: ``nodes`` (id, type, mode, inputs [{name, type, link, widget}], widgets_values,
title), ``links`` ([id, origin, origin_slot, target, target_slot, type], or objects with those
fields), optional ``definitions.subgraphs``. Widget values are positional over the node's
widget inputs in the catalogue's order; the seed widget is followed by its
``control_after_generate`` value, and an image-upload combo (LoadImage) adds the upload
button's value at the end. Reroutes and PrimitiveNodes are resolved into their targets, Notes
dropped, muted nodes (mode 2) dropped and bypassed ones (mode 4) passed through by type;
subgraph instances are expanded with ids ``"<instance>:<inner>"``. The saved seed is the one
the first run uses, as ComfyUI's first Queue after opening the file uses it; its
``control_after_generate`` mode goes to the node's ``_meta`` and ``after_generate`` applies it
between runs, as ComfyUI does between queued prompts.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

from kiln.kernels.errors import KilnError, Problem, short_repr
from kiln.nodes import registry
from kiln.nodes.registry import NodeDef

CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
CONTROL_META = "control_after_generate"   # _meta key: {widget: mode}
# The front end draws random seeds below 2**50 (the largest integer a JS double steps through by 1).
_RANDOM_LIMIT = 1125899906842624
MUTED, BYPASSED = 2, 4
GROUP_NODE_PREFIXES = ("workflow>", "workflow/")   # extra.groupNodes instances
UI_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
# A subgraph definition's boundary: links from its input node and into its output node.
SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = "-10", "-20"


def is_ui_workflow(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


@dataclass(frozen=True)
class _Link:
    origin: str
    slot: int
    target: str
    target_slot: int
    type: str


def _parse_link(raw) -> tuple[int, _Link] | None:
    if isinstance(raw, list) and len(raw) >= 6:
        link_id, origin, slot, target, target_slot, kind = raw[:6]
    elif isinstance(raw, dict):
        link_id, origin, slot, target, target_slot, kind = (raw.get(k) for k in (
            "id", "origin_id", "origin_slot", "target_id", "target_slot", "type"))
    else:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (link_id, slot, target_slot)) \
            or origin is None or target is None:
        return None
    return link_id, _Link(str(origin), slot, str(target), target_slot, str(kind))


class _Level:
    """One level of the editor's graph: the top level, or a subgraph instance's definition."""

    def __init__(self, data: dict, prefix: str, received: dict[int, Any], problems: list[Problem]):
        self.prefix, self.received = prefix, received   # a subgraph's input slot -> resolved source
        self.nodes: dict[str, dict] = {}
        for raw in data.get("nodes") or []:
            if isinstance(raw, dict) and "id" in raw:
                self.nodes[str(raw["id"])] = raw
            else:
                problems.append(Problem("invalid_prompt", "a UI node is not an object with an id",
                                        found=short_repr(raw)))
        self.links: dict[int, _Link] = {}
        for raw in data.get("links") or []:
            parsed = _parse_link(raw)
            if parsed is None:
                problems.append(Problem("invalid_prompt", "a UI link is neither [id, origin, slot, target, slot, "
                                        "type] nor an object with those fields", found=short_repr(raw)))
            else:
                self.links[parsed[0]] = parsed[1]
        self.expanded: dict[str, dict[int, Any]] = {}   # subgraph instance -> its outputs' sources


def ui_to_api(data: dict) -> dict:
    """The API prompt ``{id: {"inputs", "class_type", "_meta": {"title"}}}`` of a UI workflow;
    KilnError listing every problem (widget lists that do not fit their node, malformed links)."""
    problems: list[Problem] = []
    subgraphs = {str(s.get("id")): s for s in (data.get("definitions") or {}).get("subgraphs") or []
                 if isinstance(s, dict)}
    converter = _Converter(subgraphs, problems)
    converter.emit(_Level(data, "", {}, problems))
    if problems:
        raise KilnError(problems)
    return converter.prompt


class _Converter:
    def __init__(self, subgraphs: dict[str, dict], problems: list[Problem]):
        self.subgraphs, self.problems = subgraphs, problems
        self.prompt: dict[str, dict] = {}
        self.catalogue = registry.all_nodes()

    def emit(self, level: _Level) -> None:
        for node_id, node in level.nodes.items():
            kind = node.get("type")
            if kind in UI_ONLY or node.get("mode") in (MUTED, BYPASSED):
                continue
            if kind in self.subgraphs:
                self._expand(level, node_id)
            elif isinstance(kind, str) and kind.startswith(GROUP_NODE_PREFIXES):
                self.problems.append(Problem(
                    "invalid_prompt", "a group node (the editor's older grouping) is not expanded by kiln",
                    node_id=level.prefix + node_id, class_type=kind, title=node.get("title"),
                    expected="its nodes ungrouped, or the group converted to a subgraph, in the editor",
                    found=f"group node {kind!r}"))
            else:
                self.prompt[level.prefix + node_id] = self._api_node(level, node_id, node)

    def _expand(self, level: _Level, node_id: str) -> dict[int, Any]:
        """Emit a subgraph instance's nodes (once); its output slots' sources."""
        if node_id not in level.expanded:
            level.expanded[node_id] = {}
            node = level.nodes[node_id]
            received = {slot: self._resolve(level, level.links[entry["link"]])
                        for slot, entry in enumerate(node.get("inputs") or [])
                        if isinstance(entry, dict) and entry.get("link") in level.links}
            inner = _Level(self.subgraphs[node["type"]], f"{level.prefix}{node_id}:", received, self.problems)
            self.emit(inner)
            level.expanded[node_id] = {link.target_slot: self._resolve(inner, link) for link in inner.links.values()
                                       if link.target == SUBGRAPH_OUTPUT}
        return level.expanded[node_id]

    def _resolve(self, level: _Level, link: _Link):
        """A link's source as an API link ``[id, slot]``, ``("value", v)`` (a PrimitiveNode's), or
        None (its source is muted or missing). Reroutes and bypassed nodes are passed through."""
        seen = set()
        while (link.origin, link.slot) not in seen:
            seen.add((link.origin, link.slot))
            if link.origin == SUBGRAPH_INPUT:
                return level.received.get(link.slot)
            source = level.nodes.get(link.origin)
            if source is None or source.get("mode") == MUTED:
                return None
            kind = source.get("type")
            if kind == "PrimitiveNode":   # its value, and the control after it if any
                values = source.get("widgets_values") or []
                control = values[1] if len(values) > 1 and values[1] in CONTROL_VALUES else None
                return ("value", values[0], control) if values else None
            if kind == "Reroute" or source.get("mode") == BYPASSED:
                link = _passed_through(level, source, link)
                if link is None:
                    return None
                continue
            if kind in UI_ONLY:
                return None
            if kind in self.subgraphs:
                return self._expand(level, link.origin).get(link.slot)
            return [level.prefix + link.origin, link.slot]
        return None   # a loop of reroutes

    def _api_node(self, level: _Level, node_id: str, node: dict) -> dict:
        kind = str(node.get("type"))
        definition = self.catalogue.get(kind)
        title = node.get("title") or (definition.display_name if definition else None) or kind
        inputs: dict[str, Any] = {}
        controls: dict[str, str] = {}
        values = node.get("widgets_values")
        if isinstance(values, dict):    # some nodes store their widgets by name
            inputs.update(values)
        elif isinstance(values, list) and definition is not None:
            inputs.update(self._widgets(level.prefix + node_id, title, definition, values, controls))
        for entry in node.get("inputs") or []:
            if not isinstance(entry, dict) or entry.get("link") is None or not entry.get("name"):
                continue
            link = level.links.get(entry["link"])
            source = self._resolve(level, link) if link is not None else None
            controls.pop(entry["name"], None)
            if source is None:
                inputs.pop(entry["name"], None)
            elif isinstance(source, tuple):
                inputs[entry["name"]] = source[1]
                if source[2] is not None and definition is not None and entry["name"] == definition.seed:
                    controls[entry["name"]] = source[2]
            else:
                inputs[entry["name"]] = source
        meta = {"title": title, **({CONTROL_META: controls} if controls else {})}
        return {"inputs": inputs, "class_type": kind, "_meta": meta}

    def _widgets(self, node_id: str, title: str, definition: NodeDef, values: list,
                 controls: dict[str, str]) -> dict[str, Any]:
        """Positional widget values -> inputs (fewer values than widgets: the rest keep their defaults)."""
        specs = [spec for spec in definition.inputs if spec.is_widget]
        out, index = {}, 0
        for spec in specs:
            if index >= len(values):
                break
            out[spec.name] = values[index]
            index += 1
            if spec.name == definition.seed and index < len(values) and values[index] in CONTROL_VALUES:
                controls[spec.name] = values[index]   # control_after_generate
                index += 1
        uploads = any(spec.folder == "input" for spec in specs)
        if len(values) - index > (1 if uploads else 0):
            names = [s.name + (", control_after_generate" if s.name == definition.seed else "") for s in specs]
            self.problems.append(Problem(
                "invalid_prompt", f"widgets_values has {len(values)} values, more than the node's widgets take",
                node_id=node_id, class_type=definition.class_type, title=title,
                expected=", ".join(names + (["upload"] if uploads else [])), found=short_repr(values)))
        return out


def _passed_through(level: _Level, node: dict, link: _Link) -> _Link | None:
    """A Reroute's input link, or a bypassed node's input link of the output's type (the same
    slot first)."""
    inputs = [e if isinstance(e, dict) else {} for e in node.get("inputs") or []]
    linked = [e for e in inputs if e.get("link") in level.links]
    if node.get("type") == "Reroute":
        return level.links[linked[0]["link"]] if linked else None
    if link.slot < len(inputs) and inputs[link.slot] in linked and inputs[link.slot].get("type") == link.type:
        return level.links[inputs[link.slot]["link"]]
    match = next((e for e in linked if e.get("type") == link.type), None)
    return level.links[match["link"]] if match else None


def after_generate(prompt: dict, rng: random.Random) -> dict:
    """The prompt the next run uses: each ``control_after_generate`` widget changed as ComfyUI's
    front end changes it after queueing (``fixed`` keeps it; ``increment``/``decrement`` step by 1
    within the widget's range; ``randomize`` draws from the range, below 2**50)."""
    catalogue = registry.all_nodes()
    out = copy.deepcopy(prompt)
    for node in out.values():
        definition = catalogue.get(node.get("class_type"))
        for name, mode in ((node.get("_meta") or {}).get(CONTROL_META) or {}).items():
            spec = definition.input(name) if definition is not None else None
            value = node.get("inputs", {}).get(name)
            if spec is None or not isinstance(value, int) or isinstance(value, bool):
                continue
            low, high = int(spec.min or 0), int(min(spec.max, _RANDOM_LIMIT) if spec.max is not None else _RANDOM_LIMIT)
            if mode == "increment":
                value = min(value + 1, int(spec.max) if spec.max is not None else value + 1)
            elif mode == "decrement":
                value = max(value - 1, low)
            elif mode == "randomize":
                value = rng.randrange(low, high)
            node["inputs"][name] = value
    return out
