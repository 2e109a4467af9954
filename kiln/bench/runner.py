"""``kiln bench``: build the study, check every cell's workflow before anything runs, run the
references, then the cells engine by engine (one compiled plan per backend, precision and
static shape), writing results after each cell and the report at the end or on Ctrl-C."""
from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from kiln.api import apply_overrides, check_device
from kiln.bench.axes import Axis, engine_axis, parse_axis, parse_seeds
from kiln.bench.engines import InterpreterEngine, PlanEngine, RunOutput, Target, find_target
from kiln.bench.fidelity import compare
from kiln.bench.measure import PeakMemory, counting_flops, peak_tflops, release_memory, time_stats
from kiln.bench.report import write_report
from kiln.bench.results import Results
from kiln.bench.study import Cell, Engine, Sample, Study, parse_reference, runtime_widget
from kiln.compiler.graph import Graph
from kiln.compiler.pipeline import compile_workflow
from kiln.compiler.validate import validate
from kiln.compiler.workflow import load_workflow
from kiln.kernels.errors import KilnError, Problem
from kiln.kernels.settings import Settings
from kiln.nodes import registry
from kiln.nodes.folders import ModelFolders
from kiln.progress import ProgressBars

INTERRUPTED = 130


@dataclass
class BenchOptions:
    workflow: Path
    output: Path
    x: str | None = None
    y: str | None = None
    z: str | None = None
    backend: str | None = None
    dtype: str | None = None
    device: str | None = None
    node: str | None = None
    seeds: str | None = None
    reference: str | None = None
    repeat: int = 3
    warmup: int = 1
    peak_tflops: float | None = None
    output_node: str | None = None
    sets: dict[tuple[str, str], Any] = field(default_factory=dict)
    models: Path | None = None
    extra_model_paths: Path | None = None
    input_dir: Path | None = None
    plans: Path | None = None
    resume: bool = False
    quiet: bool = False
    settings: Settings = field(default_factory=Settings)


def run_bench(options: BenchOptions) -> int:
    """Run (or resume) the study; 0 when every cell ran, 130 when stopped with Ctrl-C."""
    study = build_study(options)
    folders = ModelFolders.from_models_dir(options.models, options.extra_model_paths)
    cells = study.cells()
    graphs = _validated(study, cells, folders, options.input_dir)
    target = find_target(graphs[study.sample(cells[0], study.seeds_or_default()[0]).key], options.output_node)
    results = Results.open(options.output, _describe(study, cells, target, options), study.fingerprint(),
                           options.resume)
    done = results.done()
    todo = [cell for cell in cells if cell.name not in done]
    bench = _Bench(study, options, folders, graphs, target, results)
    stopped = False
    try:
        bench.run(todo)
    except KeyboardInterrupt:
        stopped = True
    finally:
        bench.close()
        pending = [_pending(cell) for cell in cells if cell.name not in results.done()]
        page = write_report(results.with_pending([c.name for c in cells], pending), options.output)
    finished = len(results.done())
    if stopped:
        print(f"kiln bench: stopped; {finished} of {len(cells)} cells finished (report: {page}); the same "
              "command with --resume continues", file=sys.stderr)
        return INTERRUPTED
    print(page)
    return 0


def build_study(options: BenchOptions) -> Study:
    """The workflow (``--set`` applied) and its axes, each checked against it."""
    if options.repeat < 1 or options.warmup < 0:
        raise KilnError([Problem("invalid_option", "--repeat needs 1 or more timed runs, --warmup 0 or more",
                                 input_name="--repeat" if options.repeat < 1 else "--warmup",
                                 found=str(options.repeat if options.repeat < 1 else options.warmup))])
    graph = apply_overrides(load_workflow(options.workflow), seed=None, overrides=options.sets)
    axes: list[Axis] = []
    for role, text in (("x", options.x), ("y", options.y), ("z", options.z)):
        if text is not None:
            axes.append(parse_axis(f"--{role}", text, role, graph, options.node))
    for name in ("backend", "dtype", "device"):
        text = getattr(options, name)
        if text is not None:
            axes.append(engine_axis(f"--{name}", name, text))
    named = [(axis.node_id, axis.input_name) if not axis.engine else axis.name for axis in axes]
    if len(set(named)) != len(named):
        twice = next(a.name for a, n in zip(axes, named) if named.count(n) > 1)
        raise KilnError([Problem("invalid_axis", "one input is on two axes", input_name=twice,
                                 expected="each input, backend, dtype and device on one axis at most", found=twice)])
    seeds = parse_seeds(options.seeds) if options.seeds is not None else None
    reference = parse_reference(options.reference, axes, graph, options.node)
    return Study(graph, str(options.workflow), axes, seeds, reference, options.repeat, options.warmup)


def _validated(study: Study, cells: list[Cell], folders: ModelFolders, input_dir) -> dict[str, Graph]:
    """Every sample's workflow (cells, references, baselines) checked by the interpreter's
    validation before anything runs: all problems at once, each with the cell it came from."""
    graphs: dict[str, Graph] = {}
    problems: dict[str, Problem] = {}
    for engine in sorted({cell.engine for cell in cells}, key=lambda e: e.label):
        try:
            check_device(engine.device, engine.dtype)
        except KilnError as error:
            problems.update((p.format(), p) for p in error.problems)
    for cell in cells:
        for seed in study.seeds_or_default():
            for sample in (study.sample(cell, seed), study.reference_sample(cell, seed),
                           study.baseline_sample(cell, seed)):
                if sample.key in graphs:
                    continue
                try:
                    graphs[sample.key] = validate(study.graph_of(sample), folders, input_dir)
                except KilnError as error:
                    for p in error.problems:
                        hint = " ".join(filter(None, [p.hint, f"(in cell {cell.name})"]))
                        problems.setdefault(p.format(), Problem(**{**p.__dict__, "hint": hint}))
    if problems:
        raise KilnError(problems.values())
    return graphs


class _Bench:
    """The runs of one ``kiln bench`` invocation."""

    def __init__(self, study: Study, options: BenchOptions, folders: ModelFolders, graphs: dict[str, Graph],
                 target: Target, results: Results):
        self.study, self.options, self.folders, self.graphs = study, options, folders, graphs
        self.target, self.results = target, results
        self.folder = options.output
        self.work = self.folder / ".work"
        self.input_dir = str(options.input_dir) if options.input_dir else None
        self.seeds = study.seeds_or_default()
        self.bars = ProgressBars(leave=False)
        self.total: tqdm | None = None

    # --- the whole study ----------------------------------------------------------------------
    def run(self, todo: list[Cell]) -> None:
        references = self._missing_references(todo)
        runs = len(references) + sum(len(self.seeds) * self.study.repeat + self.study.warmup for _ in todo)
        self.total = tqdm(total=runs, desc="kiln bench", unit="run", file=sys.stderr, disable=self.options.quiet,
                          dynamic_ncols=True, position=0)
        self._run_references(references)
        for engine, cells in self._groups(todo):
            self._run_group(engine, cells)

    def close(self) -> None:
        self.bars.close()
        if self.total is not None:
            self.total.close()
        shutil.rmtree(self.work, ignore_errors=True)

    def _advance(self, label: str) -> None:
        if self.total is not None:
            self.total.set_postfix_str(label, refresh=False)
            self.total.update()

    def _on_step(self, key: str, step: int, total: int) -> None:
        if not self.options.quiet:
            self.bars(f"  {key}", step, total)

    # --- references: the interpreter runs every cell is compared with -----------------------------
    def _missing_references(self, todo: list[Cell]) -> list[Sample]:
        needed: dict[str, Sample] = {}
        for cell in todo:
            for seed in self.seeds:
                for sample in (self.study.reference_sample(cell, seed), self.study.baseline_sample(cell, seed)):
                    needed.setdefault(sample.key, sample)
        return [s for key, s in needed.items() if not self._reference_stored(key)]

    def _reference_stored(self, key: str) -> bool:
        record = self.results.reference(key)
        return record is not None and all((self.folder / f).is_file() for f in record["images"])

    def _run_references(self, samples: list[Sample]) -> None:
        for engine in sorted({s.engine for s in samples}, key=lambda e: e.label):
            runner = self._interpreter(engine)
            try:
                for sample in (s for s in samples if s.engine == engine):
                    graph = self.graphs[sample.key]
                    with counting_flops() as flops:
                        out = runner.run(graph, self.target, self._on_step)
                    self._store_reference(sample, graph, out, flops.get_total_flops())
                    self._advance("reference")
            finally:
                runner.close()
                release_memory()

    def _store_reference(self, sample: Sample, graph: Graph, out: RunOutput, flops: int) -> None:
        images = [f"references/{sample.key}_{i}.png" for i in range(len(out.image_files))]
        for source, name in zip(out.image_files, images):
            _copy(source, self.folder / name)
        latent = None
        if out.latent is not None:
            latent = f"references/{sample.key}.safetensors"
            save_file({"latent": out.latent.contiguous()}, str(self.folder / latent))
        self.results.add_reference(sample.key, {"workflow": graph.source, "engine": sample.engine.as_dict(),
                                                "seed": sample.seed, "flops": flops, "images": images,
                                                "latent": latent})

    def _reference_outputs(self, key: str) -> tuple[list[np.ndarray], torch.Tensor | None, int]:
        record = self.results.reference(key)
        images = [np.asarray(Image.open(self.folder / f).convert("RGB")) for f in record["images"]]
        latent = load_file(str(self.folder / record["latent"]))["latent"] if record["latent"] else None
        return images, latent, record["flops"]

    # --- cells, engine by engine ------------------------------------------------------------------
    def _groups(self, todo: list[Cell]) -> list[tuple[Engine, list[Cell]]]:
        """Interpreter cells by engine; plan cells by engine and the values a plan cannot take at
        run time (each group is one compiled plan)."""
        groups: dict[tuple, list[Cell]] = {}
        for cell in todo:
            static = () if cell.engine.backend == "interpreter" else tuple(sorted(
                (f"{n}.{i}", json.dumps(v)) for (n, i), v in cell.overrides.items()
                if not runtime_widget(self.study.graph, n, i)))
            groups.setdefault((cell.engine.backend != "interpreter", cell.engine.label, static), []).append(cell)
        return [(cells[0].engine, cells) for _, cells in sorted(groups.items(), key=lambda item: item[0])]

    def _run_group(self, engine: Engine, cells: list[Cell]) -> None:
        if engine.backend == "interpreter":
            self._run_cells(self._interpreter(engine), cells, None, None)
            return
        plan, compile_s, fallback = self._plan(engine, cells)
        served, refused = list(cells), []
        if plan is not None:
            served, refused = self._split_by_plan(plan, cells)
            self._run_cells(plan, served, compile_s, None)
        if fallback is not None or refused:
            reason = fallback or "the plan compiled for this group does not serve it"
            self._run_cells(self._interpreter(engine), refused if plan is not None else cells, None, reason)

    def _split_by_plan(self, plan: PlanEngine, cells: list[Cell]) -> tuple[list[Cell], list[Cell]]:
        served, refused = [], []
        for cell in cells:
            try:
                for seed in self.seeds:
                    plan.values(self.graphs[self.study.sample(cell, seed).key])
                served.append(cell)
            except KilnError:
                refused.append(cell)
        return served, refused

    def _interpreter(self, engine: Engine) -> InterpreterEngine:
        return InterpreterEngine(engine.dtype, engine.device, self.folders, self.input_dir, self.work,
                                 self.options.settings)

    def _plan(self, engine: Engine, cells: list[Cell]) -> tuple[PlanEngine | None, float | None, str | None]:
        """The group's plan (compiled, or reused from a stopped run), its compile time, or why
        no plan serves the group (the reason its cells then run on the interpreter)."""
        first = self.graphs[self.study.sample(cells[0], self.seeds[0]).key]
        inputs = self._runtime_inputs(cells)
        key = hashlib.sha256(json.dumps([first.source, inputs, engine.as_dict()], sort_keys=True,
                                        default=str).encode()).hexdigest()[:12]
        plans = self.options.plans or self.folder / "plans"
        path = plans / f"{engine.backend}-{engine.dtype}-{engine.device.replace(':', '')}-{key}.plan"
        record = self.results.group(key)
        if record is None or (record["plan"] is not None and not path.is_file()):
            record = self._compile(engine, first, inputs, path)
            self.results.add_group(key, record)
        if record["fallback"] is not None:
            return None, None, record["fallback"]
        return PlanEngine(path, self.work, self.options.settings, self.folders.searched("loras"),
                          self.input_dir), record["compile_s"], None

    def _compile(self, engine: Engine, graph: Graph, inputs: list[str], path: Path) -> dict:
        self.bars.close()
        start = time.perf_counter()
        record = {"backend": engine.backend, "dtype": engine.dtype, "device": engine.device, "inputs": inputs,
                  "plan": str(path), "compile_s": None, "fallback": None}
        try:
            compile_workflow(graph.source, models=self.options.models, extra_model_paths=self.options.extra_model_paths,
                             input_dir=self.options.input_dir, inputs=inputs, device=engine.device,
                             dtype=engine.dtype, backend=engine.backend, output=path, settings=self.options.settings,
                             progress=None if self.options.quiet else
                             lambda stage, i, n: self.bars(f"  compiling {engine.label}", i, n, f"  compiling {stage}"))
        except KilnError as error:
            record.update(plan=None, fallback=f"no {engine.backend} plan: " + "; ".join(
                p.format() for p in error.problems))
            return record
        finally:
            self.bars.close()
        record["compile_s"] = time.perf_counter() - start
        return record

    def _runtime_inputs(self, cells: list[Cell]) -> list[str]:
        """``--input`` declarations for the widget axes a plan takes at run time (numbers with the
        range the cells span)."""
        inputs = []
        for axis in self.study.axes:
            if axis.engine or not runtime_widget(self.study.graph, axis.node_id, axis.input_name):
                continue
            spec = registry.get(self.study.graph.nodes[axis.node_id].class_type).input(axis.input_name)
            values = [cell.values[axis.name] for cell in cells]
            span = f"={min(values)}..{max(values)}" if spec.type in ("INT", "FLOAT") else ""
            inputs.append(f"{axis.node_id}.{axis.input_name}{span}")
        return inputs

    def _run_cells(self, runner, cells: list[Cell], compile_s: float | None, fallback: str | None) -> None:
        try:
            for cell in cells:
                self._run_cell(runner, cell, compile_s, fallback)
        finally:
            runner.close()
            release_memory()

    def _run_cell(self, runner, cell: Cell, compile_s: float | None, fallback: str | None) -> None:
        peak = PeakMemory(cell.engine.device)
        peak.reset()
        times, per_call, last = [], [], []
        for index, seed in enumerate(self.seeds):
            graph = self.graphs[self.study.sample(cell, seed).key]
            for _ in range(self.study.warmup if index == 0 else 0):
                runner.run(graph, self.target, self._on_step)
                self._advance(cell.name)
            for _ in range(self.study.repeat):
                out = runner.run(graph, self.target, self._on_step)
                times.append(out.seconds)
                if out.model_calls:
                    per_call.append(out.sampler_seconds / out.model_calls * 1000)
                self._advance(cell.name)
            last.append(out)
            _copy(out.image_files[0], self.folder / "cells" / cell.image_name(seed))
        self.results.add_cell(self._record(cell, runner, last, times, per_call, peak, compile_s, fallback))

    def _record(self, cell: Cell, runner, outs: list[RunOutput], times: list[float], per_call: list[float],
                peak: PeakMemory, compile_s: float | None, fallback: str | None) -> dict:
        images = [image for out in outs for image in out.images()]
        latents = [out.latent for out in outs]
        fidelity, flops = {}, None
        for against, sample_of in (("reference", self.study.reference_sample),
                                   ("fp32_interpreter", self.study.baseline_sample)):
            refs = [self._reference_outputs(sample_of(cell, seed).key) for seed in self.seeds]
            ref_images = [image for images_, _, _ in refs for image in images_]
            fidelity[against] = compare(images, ref_images, latents, [latent for _, latent, _ in refs])
            if against == "fp32_interpreter":
                flops = refs[0][2]
        median = statistics.median(times)
        tflops, _ = peak_tflops(cell.engine.device, cell.engine.dtype, self.options.peak_tflops)
        seeds = [s for s in self.seeds if s is not None]
        return {"name": cell.name, "values": cell.values, "engine": cell.engine.as_dict(), "ran_on": runner.ran_on,
                "fallback": fallback, "status": "done", "image": f"cells/{cell.image_name(self.seeds[0])}",
                "images": [f"cells/{cell.image_name(seed)}" for seed in self.seeds], "seeds": seeds,
                "time_s": time_stats(times), "compile_s": compile_s, "load_s": runner.load_seconds,
                "steps": outs[0].steps, "model_calls": outs[0].model_calls,
                "ms_per_model_call": statistics.median(per_call) if per_call else None,
                "peak_memory_mib": peak.peak_mib(), "memory_kind": peak.kind,
                "gflops": flops / 1e9 if flops is not None else None, "peak_tflops": tflops,
                "floor_pct": 100 * flops / (tflops * 1e12) / median if flops and tflops else None,
                "fidelity": fidelity, "pareto": False,
                "workflow": self.graphs[self.study.sample(cell, self.seeds[0]).key].source}


def _copy(source: str, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)


def _pending(cell: Cell) -> dict:
    return {"name": cell.name, "values": cell.values, "engine": cell.engine.as_dict(), "status": "pending",
            "ran_on": None, "fallback": None, "image": None}


def _describe(study: Study, cells: list[Cell], target: Target, options: BenchOptions) -> dict:
    """The study as results.json and the report describe it."""
    engines = sorted({cell.engine for cell in cells}, key=lambda e: e.label)
    targets = sorted({(e.device, e.dtype) for e in engines})
    peaks = [(device, dtype, *peak_tflops(device, dtype, options.peak_tflops)) for device, dtype in targets]
    try:
        kiln_version = version("kiln")
    except PackageNotFoundError:
        kiln_version = "unknown"
    node = study.graph.nodes[target.image_node]
    return {"workflow_file": study.workflow_file, "kiln_version": kiln_version,
            "created": datetime.now().isoformat(timespec="seconds"),
            "axes": [axis.as_dict() for axis in study.axes], "seeds": study.seeds, "repeat": study.repeat,
            "warmup": study.warmup, "reference": study.describe_reference(),
            "peak_tflops": peaks[0][2], "peak_source": "; ".join(f"{device} {dtype}: {source}"
                                                                  for device, dtype, _, source in peaks),
            "device": ", ".join(sorted({e.device for e in engines})) + f" ({torch.get_num_threads()} threads)",
            "cells_total": len(cells), "images_of": f"node {target.image_node} ({node.class_type})",
            "torch": torch.__version__}
