"""A study: the workflow, its axes, and the cells they span.

A *cell* is one combination of axis values (the engine it runs on included); a *sample* is a
cell at one of ``--seeds`` (or at the workflow's own seeds). Every cell is compared with two
interpreter runs of the same seed: its *reference* (``--reference``, by default the fp32
interpreter at the largest step count) and its *baseline*, the fp32 interpreter with the cell's
own values, so a backend's or a precision's error shows apart from the sampler's.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from kiln.api import apply_overrides
from kiln.bench.axes import ENGINE_AXES, Axis, parse_values, resolve_widget
from kiln.compiler.graph import Graph
from kiln.kernels.errors import KilnError, Problem
from kiln.nodes import registry

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]")
_SHAPE_KINDS = ("empty_latent", "load_image")   # plan stage kinds whose widgets set tensor shapes
_MAX_NAME = 120


@dataclass(frozen=True)
class Engine:
    backend: str          # interpreter | onnx | aoti
    dtype: str
    device: str

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.dtype}/{self.device}"

    def as_dict(self) -> dict:
        return {"backend": self.backend, "dtype": self.dtype, "device": self.device}


@dataclass(frozen=True)
class Cell:
    name: str                                   # the image file stem: "sampler_name=euler,steps=8"
    values: dict[str, Any]                      # axis name -> value
    engine: Engine
    overrides: dict[tuple[str, str], Any]       # (node id, input) -> value

    def image_name(self, seed: int | None) -> str:
        return f"{self.name}.png" if seed is None else f"{self.name},seed={seed}.png"


@dataclass(frozen=True)
class Sample:
    """What one run computes: a workflow on an engine (cells, references and baselines alike)."""

    overrides: dict[tuple[str, str], Any]
    engine: Engine
    seed: int | None

    @property
    def key(self) -> str:
        """Names the run's stored image and latent (references/<key>.*)."""
        text = json.dumps([sorted((f"{n}.{i}", v) for (n, i), v in self.overrides.items()),
                           self.engine.as_dict(), self.seed], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Study:
    graph: Graph                                # the workflow (--set applied), not yet validated
    workflow_file: str
    axes: list[Axis]
    seeds: list[int] | None = None
    reference: dict[str, Any] = field(default_factory=dict)   # "backend"/"dtype"/"device" or "node.input"
    repeat: int = 3
    warmup: int = 1

    def cells(self) -> list[Cell]:
        """Every combination, the x axis varying fastest (the grid's reading order)."""
        ordered = list(reversed(self.axes))
        cells, names = [], set()
        for combo in itertools.product(*(axis.values for axis in ordered)):
            values = {axis.name: value for axis, value in zip(reversed(ordered), reversed(combo))}
            overrides = {(a.node_id, a.input_name): values[a.name] for a in self.axes if not a.engine}
            name = safe_file_stem(_file_stem(values), names)
            cells.append(Cell(name, values, self._engine(values), overrides))
        return cells

    def _engine(self, values: dict) -> Engine:
        return Engine(values.get("backend", "interpreter"), values.get("dtype", "fp32"), values.get("device", "cpu"))

    def seeds_or_default(self) -> list[int | None]:
        return list(self.seeds) if self.seeds else [None]

    def sample(self, cell: Cell, seed: int | None) -> Sample:
        return Sample(cell.overrides, cell.engine, seed)

    def reference_sample(self, cell: Cell, seed: int | None) -> Sample:
        engine = Engine("interpreter", self.reference.get("dtype", "fp32"),
                        self.reference.get("device", cell.engine.device))
        widgets = {tuple(k.split(".", 1)): v for k, v in self.reference.items() if k not in ENGINE_AXES}
        return Sample({**cell.overrides, **widgets}, engine, seed)

    def baseline_sample(self, cell: Cell, seed: int | None) -> Sample:
        return Sample(cell.overrides, Engine("interpreter", "fp32", cell.engine.device), seed)

    def graph_of(self, sample: Sample) -> Graph:
        """The sample's workflow, seeds and overrides applied (validated by the runner)."""
        return apply_overrides(self.graph, seed=sample.seed, overrides=sample.overrides)

    def describe_reference(self) -> str:
        engine = f"the {self.reference.get('dtype', 'fp32')} interpreter"
        if "device" in self.reference:
            engine += f" on {self.reference['device']}"
        widgets = [f"{self._axis_name(k)}={v}" for k, v in self.reference.items() if k not in ENGINE_AXES]
        return engine + (" at " + ", ".join(widgets) if widgets else ", each cell's own values")

    def _axis_name(self, key: str) -> str:
        for axis in self.axes:
            if not axis.engine and f"{axis.node_id}.{axis.input_name}" == key:
                return axis.name
        return key

    def fingerprint(self) -> str:
        """What makes two studies the same (``--resume`` refuses another)."""
        text = json.dumps([self.graph.source, [a.as_dict() for a in self.axes], self.seeds, self.reference,
                           self.repeat, self.warmup], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def parse_reference(text: str | None, axes: list[Axis], graph: Graph, default_node: str | None) -> dict[str, Any]:
    """``--reference steps=64,sampler_name=dpmpp_2m`` as {"3.steps": 64, ...}, engine keys as they
    are; by default the fp32 interpreter at each steps axis' largest value."""
    reference: dict[str, Any] = {}
    if text is None:
        for axis in axes:
            if axis.input_name == "steps":
                reference[f"{axis.node_id}.steps"] = max(axis.values)
        return reference
    for item in text.split(","):
        name, sep, raw = item.partition("=")
        name = name.strip()
        values = parse_values("--reference", name, raw) if sep else []
        if len(values) != 1:
            raise KilnError([Problem("invalid_axis", "--reference takes NAME=VALUE pairs, one value each",
                                     input_name="--reference", expected="e.g. --reference steps=64,sampler_name=euler",
                                     found=repr(item))])
        if name in ENGINE_AXES:
            if name == "backend" and values[0] != "interpreter":
                raise KilnError([Problem("invalid_axis", "the reference runs on the interpreter (ComfyUI's numerics)",
                                         input_name="--reference", expected="backend=interpreter",
                                         found=f"backend={values[0]}")])
            reference[name] = values[0]
            continue
        node_id, input_name = resolve_widget("--reference", name, graph, default_node)
        reference[f"{node_id}.{input_name}"] = values[0]
    reference.pop("backend", None)
    return reference


def plan_input(graph: Graph, node_id: str, input_name: str) -> bool:
    """Whether a study's plan takes this widget at run time: the node's plan spec allows it, and it
    does not set a tensor's shape. Sizes (EmptyLatentImage's, a loaded image) get a plan each,
    compiled at that size: a plan takes other sizes only inside a compiled range, and nodes such
    as lanczos resizes or tiled upscales compile only at one."""
    definition = registry.get(graph.nodes[node_id].class_type)
    plan = definition.plan if definition is not None else None
    return plan is not None and plan.kind not in _SHAPE_KINDS and input_name in plan.runtime_widgets


def _file_stem(values: dict) -> str:
    """``sampler_name=euler,steps=8``; ``workflow`` for a study without axes (the workflow as it is)."""
    return ",".join(f"{name}={_text(value)}" for name, value in values.items()) or "workflow"


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def safe_file_stem(stem: str, taken: set[str]) -> str:
    """``stem`` made safe as a file name (cells, grids): unsafe characters become ``_``; a long
    name, or one already in ``taken``, gets a digest of the original. Adds it to ``taken``."""
    safe = _UNSAFE.sub("_", stem)
    if len(safe) > _MAX_NAME or safe in taken:
        safe = safe[:_MAX_NAME] + "~" + hashlib.sha256(stem.encode()).hexdigest()[:8]
    taken.add(safe)
    return safe
