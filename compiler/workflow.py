"""Reading ComfyUI API-format workflow files into the graph IR.

API format: ``{"<id>": {"class_type": str, "inputs": {name: constant | [source_id, slot]},
"_meta": {"title": str}}}``. ComfyUI's UI format (top-level "nodes"/"links", what "Save"
writes) is converted to it first (``kiln.compiler.ui_workflow``), and a PNG that ComfyUI or
kiln wrote is read from its ``prompt`` text chunk (API), else its ``workflow`` chunk (UI).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.kernels.errors import KilnError, Problem, short_repr
from kiln.compiler.graph import Graph, Link, Node
from kiln.compiler.ui_workflow import is_ui_workflow, ui_to_api

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_workflow(path: str | Path) -> Graph:
    """A workflow file: API or UI JSON, or a PNG carrying one."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if data.startswith(PNG_SIGNATURE):
            return parse_workflow(png_workflow(path), name=str(path))
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise KilnError([Problem("invalid_prompt", f"workflow file {str(path)!r} does not exist")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KilnError([Problem("invalid_prompt", f"cannot read workflow file {str(path)!r}: {exc}")]) from None
    return parse_workflow(text, name=str(path))


def png_workflow(path: Path) -> str:
    """The JSON text of a PNG's ``prompt`` chunk (the API graph ComfyUI ran), else its
    ``workflow`` chunk (the editor's graph)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            chunks = dict(getattr(image, "text", {}) or {})
    except (OSError, UnidentifiedImageError) as exc:
        raise KilnError([Problem("invalid_prompt", f"cannot read the PNG {str(path)!r}: {exc}")]) from None
    for key in ("prompt", "workflow"):
        if chunks.get(key):
            return chunks[key]
    raise KilnError([Problem("invalid_prompt", f"{path} holds no workflow",
                             expected="a PNG that ComfyUI or kiln saved (text chunk 'prompt' or 'workflow')",
                             found="text chunks: " + (", ".join(sorted(chunks)) or "none"))])


def parse_workflow(text: str | dict, name: str = "workflow") -> Graph:
    """Parse API-format JSON (text or an already-decoded dict); collect every structural problem."""
    if isinstance(text, dict):
        data: Any = text
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KilnError([Problem("invalid_prompt", f"{name} is not valid JSON: {exc.msg} at line "
                                     f"{exc.lineno} column {exc.colno}")]) from None
    if not isinstance(data, dict):
        raise KilnError([Problem("invalid_prompt", f"{name} is not a workflow",
                                 expected="a JSON object mapping node ids to nodes",
                                 found=f"a JSON {type(data).__name__}")])
    if "prompt" in data and isinstance(data["prompt"], dict) and "class_type" not in data:
        data = data["prompt"]   # the body of a POST /prompt request
    editor = None
    if is_ui_workflow(data):
        editor, data = data, ui_to_api(data)
    problems: list[Problem] = []
    nodes: dict[str, Node] = {}
    for node_id, raw in data.items():
        node_id = str(node_id)
        if not isinstance(raw, dict):
            problems.append(Problem("invalid_prompt", "node entry is not an object", node_id=node_id,
                                    expected='{"class_type": ..., "inputs": {...}}', found=short_repr(raw)))
            continue
        class_type = raw.get("class_type")
        title = (raw.get("_meta") or {}).get("title") if isinstance(raw.get("_meta"), dict) else None
        if not isinstance(class_type, str) or not class_type:
            problems.append(Problem("invalid_prompt", "node is missing the class_type property",
                                    node_id=node_id, title=title, expected="a class_type string",
                                    found=short_repr(class_type)))
            continue
        raw_inputs = raw.get("inputs", {})
        if not isinstance(raw_inputs, dict):
            problems.append(Problem("invalid_prompt", "inputs is not an object", node_id=node_id,
                                    class_type=class_type, title=title, found=short_repr(raw_inputs)))
            continue
        inputs: dict[str, Any] = {}
        for input_name, value in raw_inputs.items():
            if isinstance(value, list):
                link = _parse_link(value)
                if link is None:
                    problems.append(Problem("bad_linked_input", "a link must be [source_node_id, output_slot]",
                                            node_id=node_id, class_type=class_type, title=title,
                                            input_name=input_name, expected="[node_id, slot]",
                                            found=short_repr(value)))
                    continue
                inputs[input_name] = link
            else:
                inputs[input_name] = value
        nodes[node_id] = Node(node_id, class_type, inputs, title)
    if problems:
        raise KilnError(problems)
    if not nodes:   # ComfyUI's words for an empty prompt
        raise KilnError([Problem("prompt_no_outputs", "Prompt has no outputs", found=f"{name} holds no nodes")])
    return Graph(nodes, source=data, editor=editor)


def _parse_link(value: list) -> Link | None:
    if len(value) != 2:
        return None
    source, slot = value
    if not isinstance(source, (str, int)) or isinstance(source, bool):
        return None
    if not isinstance(slot, int) or isinstance(slot, bool) or slot < 0:
        return None
    return Link(str(source), slot)
