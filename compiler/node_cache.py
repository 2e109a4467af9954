"""Node outputs kept between runs, with ComfyUI's cache semantics (``comfy_execution/caching.py``):
a node whose class_type and inputs are unchanged -- its links compared by their sources'
signatures, recursively; an input image by its file's size and modification time, as
``LoadImage.IS_CHANGED`` hashes the file -- is not run again, so a resubmitted graph returns at
once and a changed prompt re-runs only what depends on it. Entries the latest run did not use are
dropped least recently used first beyond ``max_models`` model outputs or ``max_bytes`` bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from kiln.compiler.graph import Graph, Link
from kiln.nodes import registry

# Socket types whose values are models (what --max-models counts).
MODEL_TYPES = frozenset({"MODEL", "CLIP", "VAE", "UPSCALE_MODEL"})


@dataclass
class Entry:
    outputs: tuple
    ui: Any            # the node's UiOutput, or None
    models: int        # model-typed outputs held
    nbytes: int        # tensor and parameter bytes held


def signatures(graph: Graph, order: list[str], input_dir: str | None) -> dict[str, str]:
    """Each node's input signature (a digest), dependencies first."""
    out: dict[str, str] = {}
    for node_id in order:
        node = graph.nodes[node_id]
        definition = registry.get(node.class_type)
        parts = []
        for name, value in sorted(node.inputs.items()):
            if isinstance(value, Link):
                parts.append([name, "link", out[value.node_id], value.slot])
                continue
            spec = definition.input(name) if definition is not None else None
            parts.append([name, type(value).__name__, repr(value)])
            if spec is not None and spec.folder == "input" and input_dir:
                parts.append([name, "file", _file_state(os.path.join(input_dir, str(value)))])
        digest = hashlib.sha256(json.dumps([node.class_type, parts]).encode()).hexdigest()
        out[node_id] = digest
    return out


def _file_state(path: str) -> list:
    try:
        stat = os.stat(path)
    except OSError:
        return []
    return [stat.st_size, stat.st_mtime_ns]


class NodeCache:
    """``signature -> Entry``, least recently used first."""

    def __init__(self, max_models: int | None = None, max_bytes: int | None = None):
        self.max_models, self.max_bytes = max_models, max_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def __contains__(self, signature: str) -> bool:
        return signature in self._entries

    def get(self, signature: str) -> Entry | None:
        entry = self._entries.get(signature)
        if entry is not None:
            self._entries.move_to_end(signature)
        return entry

    def put(self, signature: str, outputs: tuple, ui: Any, output_types: tuple[str, ...]) -> None:
        models = sum(1 for t in output_types if t in MODEL_TYPES)
        self._entries[signature] = Entry(outputs, ui, models, _nbytes(outputs, set()))
        self._entries.move_to_end(signature)

    def trim(self, keep: set[str]) -> None:
        """Drop least recently used entries outside ``keep`` (the latest run's) until within bounds."""
        for signature in [s for s in self._entries if s not in keep]:
            if self._within_bounds():
                return
            del self._entries[signature]

    def _within_bounds(self) -> bool:
        entries = self._entries.values()
        return ((self.max_models is None or sum(e.models for e in entries) <= self.max_models)
                and (self.max_bytes is None or sum(e.nbytes for e in entries) <= self.max_bytes))

    def clear(self) -> None:
        self._entries.clear()

    def stats(self) -> dict:
        entries = self._entries.values()
        return {"entries": len(self._entries), "models": sum(e.models for e in entries),
                "bytes": sum(e.nbytes for e in entries)}


def _nbytes(value: Any, seen: set[int]) -> int:
    """Bytes of the tensors a value holds (modules' parameters and buffers included), each once."""
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, torch.nn.Module):
        return sum(_nbytes(t, seen) for t in (*value.parameters(), *value.buffers()))
    if isinstance(value, dict):
        return sum(_nbytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v, seen) for v in value)
    if hasattr(value, "__dict__"):   # model handles that hold modules (Clip, upscaler descriptors)
        return sum(_nbytes(v, seen) for v in vars(value).values())
    return 0
