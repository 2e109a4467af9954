"""Which cells share an engine: interpreter cells by dtype and device; plan cells by backend,
dtype, device, static shape and the values a plan cannot take at run time, each such group
served by one compiled plan whose runtime inputs are the other axes' widgets (kept in
``plans/`` for ``--resume`` and for deploying the winner)."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.bench.progress import StudyProgress
from kiln.bench.results import Results
from kiln.bench.study import Cell, Engine, Study, plan_input
from kiln.compiler.graph import Graph
from kiln.compiler.pipeline import compile_workflow
from kiln.kernels.errors import KilnError
from kiln.kernels.settings import Settings
from kiln.nodes import registry


@dataclass(frozen=True)
class PlanTarget:
    """Where and how a group's plan is compiled."""

    folder: Path
    models: Path | None
    extra_model_paths: Path | None
    input_dir: Path | None
    settings: Settings


def group_cells(study: Study, cells: list[Cell]) -> list[tuple[Engine, list[Cell]]]:
    """The cells by engine (interpreter groups first), in study order within each."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        static = () if cell.engine.backend == "interpreter" else tuple(sorted(
            (f"{n}.{i}", json.dumps(v)) for (n, i), v in cell.overrides.items()
            if not plan_input(study.graph, n, i)))
        groups.setdefault((cell.engine.backend != "interpreter", cell.engine.label, static), []).append(cell)
    return [(cells[0].engine, cells) for _, cells in sorted(groups.items(), key=lambda item: item[0])]


def group_plan(study: Study, engine: Engine, cells: list[Cell], workflow: Graph, results: Results,
               target: PlanTarget, progress: StudyProgress) -> dict:
    """The group's plan record (``plan``: its path, relative to the report folder when inside it,
    ``compile_s``; or ``fallback``: why no plan
    serves it), compiled unless a stopped run of the study already did."""
    inputs = runtime_inputs(study, cells)
    key = hashlib.sha256(json.dumps([workflow.source, inputs, engine.as_dict()], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    path = target.folder / f"{engine.backend}-{engine.dtype}-{engine.device.replace(':', '')}-{key}.plan"
    record = results.group(key)
    if record is None or (record["plan"] is not None and not (results.folder / record["plan"]).is_file()):
        record = _compile(engine, workflow, inputs, path, target, progress)
        if record["plan"] is not None and path.is_relative_to(results.folder):
            record["plan"] = str(path.relative_to(results.folder))   # the report folder may move
        results.add_group(key, record)
    return record


def runtime_inputs(study: Study, cells: list[Cell]) -> list[str]:
    """``--input`` declarations for the axis widgets a plan takes at run time (numbers with the
    range the cells span)."""
    inputs = []
    for axis in study.axes:
        if axis.engine or not plan_input(study.graph, axis.node_id, axis.input_name):
            continue
        spec = registry.get(study.graph.nodes[axis.node_id].class_type).input(axis.input_name)
        values = [cell.values[axis.name] for cell in cells]
        span = f"={min(values)}..{max(values)}" if spec.type in ("INT", "FLOAT") else ""
        inputs.append(f"{axis.node_id}.{axis.input_name}{span}")
    return inputs


def _compile(engine: Engine, workflow: Graph, inputs: list[str], path: Path, target: PlanTarget,
             progress: StudyProgress) -> dict:
    record = {"backend": engine.backend, "dtype": engine.dtype, "device": engine.device, "inputs": inputs,
              "plan": str(path), "compile_s": None, "fallback": None}
    start = time.perf_counter()
    try:
        compile_workflow(workflow.source, models=target.models, extra_model_paths=target.extra_model_paths,
                         input_dir=target.input_dir, inputs=inputs, device=engine.device, dtype=engine.dtype,
                         backend=engine.backend, output=path, settings=target.settings,
                         progress=lambda stage, i, n: progress.compiling(engine.label, stage, i, n))
    except KilnError as error:
        record.update(plan=None, fallback=f"no {engine.backend} plan: " + "; ".join(
            p.format() for p in error.problems))
        return record
    finally:
        progress.close_bars()
    record["compile_s"] = time.perf_counter() - start
    return record
