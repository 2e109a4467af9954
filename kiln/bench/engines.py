"""Running one sample on an engine and timing it: the interpreter with its models kept loaded
between runs, or a loaded plan serving the cell's values as runtime inputs.

Both report the same things: wall time, time in the samplers, sampler steps, model calls (each
evaluation of a sampler's denoiser), the image the study looks at and the latent it was
decoded from.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from kiln.compiler.graph import Graph, Link
from kiln.compiler.interpreter import run_graph
from kiln.kernels.errors import KilnError, Problem
from kiln.kernels.settings import Settings
from kiln.nodes import registry
from kiln.nodes.folders import ModelFolders
from kiln.nodes.registry import RunContext
from kiln.plan_match import match_values
from kiln.runtime.executor import bind_inputs, run_plan
from kiln.runtime.plan import load_plan

# on_step(key, step, total): sampler progress of the run (a node id or a stage name).
StepHook = Callable[[str, int, int], None]
_SAMPLING = "sampling"


@dataclass(frozen=True)
class Target:
    """What the study looks at: the images of one output node, and the latent they were decoded from."""

    image_node: str
    latent: Link | None


@dataclass
class RunOutput:
    seconds: float
    sampler_seconds: float
    steps: int
    model_calls: int
    image_files: list[str]
    latent: torch.Tensor | None

    def images(self) -> list[np.ndarray]:
        """The images as they were saved (read before the engine's next run replaces them)."""
        return [np.asarray(Image.open(path).convert("RGB")) for path in self.image_files]


def find_target(graph: Graph, requested: str | None) -> Target:
    """``--output-node`` or the workflow's last output node; its latent: the ``samples`` of the
    VAEDecode its images come from (through image nodes such as upscales), if any."""
    outputs = [n for n in graph.topological_order() if registry.get(graph.nodes[n].class_type).output_node]
    if requested is not None and requested not in outputs:
        raise KilnError([Problem("invalid_axis", "--output-node names no output node of the workflow",
                                 input_name="--output-node", expected="one of " + ", ".join(outputs),
                                 found=requested)])
    image_node = requested or outputs[-1]
    link = graph.nodes[image_node].inputs.get("images")
    for _ in range(len(graph.nodes)):
        if not isinstance(link, Link):
            break
        node = graph.nodes[link.node_id]
        if node.class_type == "VAEDecode":
            samples = node.inputs.get("samples")
            return Target(image_node, samples if isinstance(samples, Link) else None)
        definition = registry.get(node.class_type)
        link = next((v for name, v in node.links() if definition.input(name).type == "IMAGE"), None)
    return Target(image_node, None)


class _Counts:
    """Steps and model calls of one run, forwarding sampler steps to the progress hook."""

    def __init__(self, on_step: StepHook | None):
        self.steps = self.model_calls = 0
        self._on_step = on_step

    def step(self, key: str, step: int, total: int) -> None:
        self.steps += 1
        if self._on_step is not None:
            self._on_step(key, step, total)

    def model_call(self) -> None:
        self.model_calls += 1


def copy_image(source: str, destination: Path) -> None:
    """Keep a run's PNG (with its workflow chunk: ``kiln run`` on it runs that sample again)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)


def _fresh(folder: Path) -> Path:
    """An empty scratch folder for a run's images (names restart at 00001)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


class InterpreterEngine:
    """The eager interpreter; loaded models stay in the context between runs (warm runs)."""

    ran_on = "interpreter"
    load_seconds = None

    def __init__(self, dtype: str, device: str, models: ModelFolders, input_dir: str | None, work: Path,
                 settings: Settings):
        self.work = work
        self.ctx = RunContext(models=models, input_dir=input_dir, output_dir=str(work), device=device, dtype=dtype,
                              keep_models=True, settings=settings)

    def run(self, graph: Graph, target: Target, on_step: StepHook | None = None) -> RunOutput:
        ctx, counts = self.ctx, _Counts(on_step)
        ctx.output_dir = str(_fresh(self.work))
        ctx.prompt = graph.source
        ctx.extra_pnginfo = {"workflow": graph.editor} if graph.editor is not None else None
        ctx.progress = lambda step, total: self._progress(counts, graph, step, total)
        ctx.on_model_call = counts.model_call
        keep = {target.latent.node_id} if target.latent is not None else set()
        start = time.perf_counter()
        result = run_graph(graph, ctx, keep=keep)
        seconds = time.perf_counter() - start
        sampler_seconds = sum(t.seconds for t in result.timings if _is_sampler(t.class_type))
        latent = None
        if target.latent is not None:
            value = result.outputs[target.latent.node_id][target.latent.slot]
            latent = value["samples"] if isinstance(value, dict) else None
        return RunOutput(seconds, sampler_seconds, counts.steps, counts.model_calls,
                         [image.path for image in result.images.get(target.image_node, [])], latent)

    def _progress(self, counts: _Counts, graph: Graph, step: int, total: int) -> None:
        if _is_sampler(graph.nodes[self.ctx.node_id].class_type):   # not an upscaler's tiles
            counts.step(self.ctx.node_id, step, total)

    def close(self) -> None:
        self.ctx.cache.clear()


class PlanEngine:
    """A compiled plan, loaded (weights prepacked, as a server runs it) once for its cells."""

    def __init__(self, path: Path, work: Path, settings: Settings, lora_dirs: list, input_dir: str | None):
        self.work, self.settings, self.lora_dirs, self.input_dir = work, settings, lora_dirs, input_dir
        start = time.perf_counter()
        self.plan = load_plan(path, settings=settings, prepack=True)
        self.load_seconds = time.perf_counter() - start
        self.ran_on = self.plan.manifest.target["backend"]
        self._kinds = {stage.name: stage.kind for stage in self.plan.manifest.stages}

    def values(self, graph: Graph) -> dict:
        """The plan's runtime input values for this sample's workflow; KilnError when the plan
        cannot serve it (anything but its runtime inputs differs, or a value outside its range)."""
        values = match_values(self.plan.manifest, graph.source, graph)
        if values is None:
            raise KilnError([Problem("plan_mismatch", "the plan compiled for the cell's group does not serve it")])
        bind_inputs(self.plan.manifest, values)
        return values

    def run(self, graph: Graph, target: Target, on_step: StepHook | None = None) -> RunOutput:
        counts = _Counts(on_step)
        latent_env = self._latent_env(target)
        values = self.values(graph)
        start = time.perf_counter()
        result = run_plan(self.plan, values, output_dir=_fresh(self.work), settings=self.settings,
                          on_step=lambda stage, step, total: self._progress(counts, stage, step, total),
                          on_model_call=counts.model_call, lora_dirs=self.lora_dirs, input_dir=self.input_dir,
                          prompt=graph.source, extra_pnginfo={"workflow": graph.editor} if graph.editor else None,
                          keep=[latent_env] if latent_env else [])
        seconds = time.perf_counter() - start
        sampler_seconds = sum(t.seconds for t in result.timings if t.kind == "sample")
        return RunOutput(seconds, sampler_seconds, counts.steps, counts.model_calls,
                         [image.path for image in result.images.get(target.image_node, [])],
                         result.kept.get(latent_env) if latent_env else None)

    def _progress(self, counts: _Counts, stage: str, step: int, total: int) -> None:
        if self._kinds.get(stage) == "sample":
            counts.step(stage, step, total)

    def _latent_env(self, target: Target) -> str | None:
        """Where the run leaves the latent the image is decoded from: a sampler stage's output."""
        if target.latent is None:
            return None
        for stage in self.plan.manifest.stages:
            if stage.kind == "sample" and target.latent.node_id in stage.node_ids:
                return stage.outputs.get("samples")
        return None

    def close(self) -> None:
        self.plan = None


def _is_sampler(class_type: str) -> bool:
    definition = registry.get(class_type)
    return definition is not None and definition.category == _SAMPLING
