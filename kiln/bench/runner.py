"""``kiln bench``: build the study, check every cell's workflow before anything runs, run the
references, then the cells engine by engine (one compiled plan per backend, precision and
static shape), writing results after each cell and the report at the end or on Ctrl-C."""
from __future__ import annotations

import shutil
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from kiln.api import apply_overrides, check_device
from kiln.bench.axes import Axis, engine_axis, parse_axis, parse_seeds
from kiln.bench.engines import InterpreterEngine, PlanEngine, RunOutput, Target, copy_image, find_target
from kiln.bench.fidelity import compare
from kiln.bench.measure import PeakMemory, peak_tflops, release_memory, time_stats
from kiln.bench.plan_groups import PlanTarget, group_cells, group_plan
from kiln.bench.progress import StudyProgress
from kiln.bench.references import References
from kiln.bench.report import write_report
from kiln.bench.results import Results
from kiln.bench.study import Cell, Engine, Study, parse_reference
from kiln.compiler.graph import Graph
from kiln.compiler.validate import validate
from kiln.compiler.workflow import load_workflow
from kiln.kernels.errors import KilnError, Problem
from kiln.kernels.settings import Settings
from kiln.nodes.folders import ModelFolders

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
                        hint = " ".join(filter(None, [p.hint, _origin(study, p, cell)]))
                        problems.setdefault(p.format(), Problem(**{**p.__dict__, "hint": hint}))
    if problems:
        raise KilnError(problems.values())
    return graphs


def _origin(study: Study, problem: Problem, cell: Cell) -> str:
    """Where a value came from: the axis that set it, else the cell (a value the workflow had)."""
    for axis in study.axes:
        if (axis.node_id, axis.input_name) == (problem.node_id, problem.input_name):
            return f"(from --{axis.role} {axis.name})" if axis.role != "extra" else f"(from --{axis.name})"
    if problem.node_id is not None and f"{problem.node_id}.{problem.input_name}" in study.reference:
        return "(from --reference)"
    return f"(in cell {cell.name})"


class _Bench:
    """The runs of one ``kiln bench`` invocation: references first, then the cells engine by engine."""

    def __init__(self, study: Study, options: BenchOptions, folders: ModelFolders, graphs: dict[str, Graph],
                 target: Target, results: Results):
        self.study, self.options, self.folders, self.graphs = study, options, folders, graphs
        self.target, self.results = target, results
        self.work = options.output / ".work"
        self.input_dir = str(options.input_dir) if options.input_dir else None
        self.seeds = study.seeds_or_default()
        self.references = References(study, results, graphs, target, self._interpreter)
        self.plans = PlanTarget(options.plans or options.output / "plans", options.models, options.extra_model_paths,
                                options.input_dir, options.settings)
        self.progress: StudyProgress | None = None

    def run(self, todo: list[Cell]) -> None:
        references = self.references.missing(todo)
        runs = len(references) + len(todo) * (len(self.seeds) * self.study.repeat + self.study.warmup)
        self.progress = StudyProgress(runs, self.options.quiet)
        self.references.run(references, self.progress)
        for engine, cells in group_cells(self.study, todo):
            self._run_group(engine, cells)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        shutil.rmtree(self.work, ignore_errors=True)

    def _interpreter(self, engine: Engine) -> InterpreterEngine:
        return InterpreterEngine(engine.dtype, engine.device, self.folders, self.input_dir, self.work,
                                 self.options.settings)

    def _graph(self, cell: Cell, seed: int | None) -> Graph:
        return self.graphs[self.study.sample(cell, seed).key]

    # --- a group of cells -----------------------------------------------------------------------
    def _run_group(self, engine: Engine, cells: list[Cell]) -> None:
        if engine.backend == "interpreter":
            self._run_cells(self._interpreter(engine), cells, None, None)
            return
        record = group_plan(self.study, engine, cells, self._graph(cells[0], self.seeds[0]), self.results,
                            self.plans, self.progress)
        refused, reason = cells, record["fallback"]
        if record["plan"] is not None:
            plan = PlanEngine(self.options.output / record["plan"], self.work, self.options.settings, self.folders.searched("loras"),
                              self.input_dir)
            served = [cell for cell in cells if self._serves(plan, cell)]
            refused = [cell for cell in cells if cell not in served]
            reason = "the plan compiled for this group does not serve it"
            self._run_cells(plan, served, record["compile_s"], None)
        if refused:
            self._run_cells(self._interpreter(engine), refused, None, reason)

    def _serves(self, plan: PlanEngine, cell: Cell) -> bool:
        try:
            for seed in self.seeds:
                plan.values(self._graph(cell, seed))
        except KilnError:
            return False
        return True

    def _run_cells(self, runner, cells: list[Cell], compile_s: float | None, fallback: str | None) -> None:
        try:
            for cell in cells:
                self._run_cell(runner, cell, compile_s, fallback)
        finally:
            runner.close()
            release_memory()

    # --- one cell -------------------------------------------------------------------------------
    def _run_cell(self, runner, cell: Cell, compile_s: float | None, fallback: str | None) -> None:
        peak = PeakMemory(cell.engine.device)
        peak.reset()
        times, per_call, last, images = [], [], [], []
        for index, seed in enumerate(self.seeds):
            graph = self._graph(cell, seed)
            for _ in range(self.study.warmup if index == 0 else 0):
                runner.run(graph, self.target, self.progress.step)
                self.progress.advance(cell.name)
            for _ in range(self.study.repeat):
                out = runner.run(graph, self.target, self.progress.step)
                times.append(out.seconds)
                if out.model_calls:
                    per_call.append(out.sampler_seconds / out.model_calls * 1000)
                self.progress.advance(cell.name)
            last.append(out)
            images.extend(out.images())   # before the next run's images take the scratch folder
            copy_image(out.image_files[0], self.options.output / "cells" / cell.image_name(seed))
        self.results.add_cell(self._record(cell, runner, last, images, times, per_call, peak, compile_s, fallback))

    def _record(self, cell: Cell, runner, outs: list[RunOutput], images: list, times: list[float],
                per_call: list[float], peak: PeakMemory, compile_s: float | None, fallback: str | None) -> dict:
        latents = [out.latent for out in outs]
        samples = {"reference": [self.study.reference_sample(cell, seed) for seed in self.seeds],
                   "fp32_interpreter": [self.study.baseline_sample(cell, seed) for seed in self.seeds]}
        stored = {s.key: self.references.outputs(s) for against in samples.values() for s in against}
        fidelity = {}
        for against, runs in samples.items():
            refs = [stored[s.key] for s in runs]
            fidelity[against] = compare(images, [image for ref, _, _ in refs for image in ref], latents,
                                        [latent for _, latent, _ in refs])
        flops = stored[samples["fp32_interpreter"][0].key][2]   # the cell's workflow at fp32
        median = statistics.median(times)
        tflops, _ = peak_tflops(cell.engine.device, cell.engine.dtype, self.options.peak_tflops)
        return {"name": cell.name, "values": cell.values, "engine": cell.engine.as_dict(), "ran_on": runner.ran_on,
                "fallback": fallback, "status": "done", "image": f"cells/{cell.image_name(self.seeds[0])}",
                "images": [f"cells/{cell.image_name(seed)}" for seed in self.seeds],
                "seeds": [s for s in self.seeds if s is not None],
                "time_s": time_stats(times), "compile_s": compile_s, "load_s": runner.load_seconds,
                "steps": outs[0].steps, "model_calls": outs[0].model_calls,
                "ms_per_model_call": statistics.median(per_call) if per_call else None,
                "peak_memory_mib": peak.peak_mib(), "memory_kind": peak.kind,
                "gflops": flops / 1e9, "peak_tflops": tflops,
                "floor_pct": 100 * flops / (tflops * 1e12) / median if flops and tflops else None,
                "fidelity": fidelity, "pareto": False, "workflow": self._graph(cell, self.seeds[0]).source}


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
