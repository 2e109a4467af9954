"""The compiler pipeline: a workflow through the passes into one plan file.

    validate -> dead_nodes -> runtime_inputs -> merge_identical -> fold_constants
             -> partition_stages -> fuse_stages -> build_modules -> lower (plan file)

``runtime_inputs`` runs before ``merge_identical`` so a node whose widget is a runtime input is
never merged with a twin that only happens to hold the same value today.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

from kiln.compiler.errors import KilnError, Problem
from kiln.compiler.passes import (build_modules, dead_nodes, fold_constants, fuse_stages, merge_identical,
                                  partition_stages, runtime_inputs)
from kiln.compiler.stages import Compilation, CompileOptions
from kiln.compiler.validate import validate as validate_graph
from kiln.compiler.workflow import load_workflow, parse_workflow
from kiln.nodes.folders import ModelFolders

Pass = Callable[[Compilation], Compilation]

BACKENDS = ("aoti", "onnx")
# The default per device type, by measurement (README, "Compiling plans"): on CPU onnxruntime
# ran full-size SD1.5 1.7-6x faster than the AOTInductor build (tiny models: a draw); CUDA is
# not measured yet.
DEFAULT_BACKENDS = {"cpu": "onnx", "cuda": "aoti"}


def validate(c: Compilation) -> Compilation:
    """The workflow is well-formed: known node types, inputs present, converted and in range,
    links typed, model and image files found (``kiln.compiler.validate``)."""
    return replace(c, graph=validate_graph(c.graph, c.options.models, c.options.input_dir))


PASSES: list[Pass] = [validate, dead_nodes, runtime_inputs, merge_identical, fold_constants,
                      partition_stages, fuse_stages, build_modules]


def run_passes(c: Compilation, passes: Iterable[Pass] = PASSES,
               on_pass: Callable[[str, float], None] | None = None) -> Compilation:
    """Run ``passes`` in order; a failure names the pass and the passes that ran before it."""
    done: list[str] = []
    for compiler_pass in passes:
        start = time.perf_counter()
        c = _attempt(compiler_pass.__name__, done, lambda: compiler_pass(c))
        done.append(compiler_pass.__name__)
        if on_pass is not None:
            on_pass(compiler_pass.__name__, time.perf_counter() - start)
    return c


def compile_workflow(workflow: str | Path | dict, *, models: str | Path | None = None,
                     extra_model_paths: str | Path | None = None, input_dir: str | Path | None = None,
                     inputs: Iterable[str] = (), device: str = "cpu", dtype: str = "fp32",
                     backend: str | None = None, output: str | Path, progress: bool = False) -> Path:
    """Compile an API-format workflow into a plan file at ``output`` (written atomically);
    ``backend`` "aoti" or "onnx", by default the one measured faster on the device."""
    backend = backend or default_backend(device)
    _check_target(device, dtype, backend)
    graph = parse_workflow(workflow) if isinstance(workflow, dict) else load_workflow(workflow)
    options = CompileOptions(models=ModelFolders.from_models_dir(models, extra_model_paths),
                             input_dir=str(input_dir) if input_dir is not None else None,
                             device=device, dtype=dtype, backend=backend, inputs=tuple(inputs))
    report = _report_pass if progress else None
    c = run_passes(Compilation(graph, options), on_pass=report)
    if progress:
        print(f"kiln compile: {len(c.stages)} stages: " + ", ".join(s.name for s in c.stages), file=sys.stderr)

    bar = StageProgress(enabled=progress)
    try:
        return _attempt("lower", [p.__name__ for p in PASSES], lambda: _lower(c, Path(output), bar))
    finally:
        bar.close()


def default_backend(device: str) -> str:
    return DEFAULT_BACKENDS["cuda" if device.startswith("cuda") else "cpu"]


def _lower(c: Compilation, output: Path, progress: "StageProgress") -> Path:
    """Export and compile every stage and write the plan file (``kiln.compiler.lower``)."""
    from kiln.compiler.lower.lower import lower

    return lower(c.program(), output, progress)


class StageProgress:
    """Lowering progress, ``progress(stage_name, index, total)`` before each stage compiles."""

    def __init__(self, enabled: bool = True):
        self._enabled = enabled
        self._bar = None

    def __call__(self, stage_name: str, index: int, total: int) -> None:
        if not self._enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="stage", file=sys.stderr, dynamic_ncols=True)
        self._bar.set_description(f"compiling {stage_name}")
        self._bar.update(index - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._bar.total - self._bar.n)
            self._bar.close()
            self._bar = None


def _attempt(name: str, done: list[str], step: Callable):
    before = ", ".join(done) if done else "none"
    header = f"compiler pass {name!r} failed (passes run before it: {before})"
    try:
        return step()
    except KilnError as error:
        raise KilnError([Problem("compile_failed", header), *error.problems]) from error
    except Exception as exc:   # a bug, not a user error: still named, --debug shows the traceback
        raise KilnError([Problem("compile_failed", f"{header}: {type(exc).__name__}: {exc}")]) from exc


def _report_pass(name: str, seconds: float) -> None:
    print(f"kiln compile: {name} {seconds:.2f}s", file=sys.stderr)


def _check_target(device: str, dtype: str, backend: str) -> None:
    import torch

    problems = []
    if backend not in BACKENDS:
        problems.append(Problem("invalid_target", "unknown backend", expected=" or ".join(BACKENDS), found=backend))
    if device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(Problem("invalid_target", "a CUDA plan is compiled on a machine with a CUDA device",
                                expected="--device cpu on this machine", found=device))
    elif device != "cpu" and not device.startswith("cuda"):
        problems.append(Problem("invalid_target", "unknown device", expected="cpu or cuda[:N]", found=device))
    if device == "cpu" and dtype == "fp16":
        problems.append(Problem("invalid_target", "fp16 inference on CPU is not supported",
                                expected="--dtype fp32 or bf16 on cpu, fp16 with --device cuda",
                                found="--device cpu --dtype fp16"))
    if backend == "onnx" and dtype == "bf16":
        problems.append(Problem("invalid_target", "the ONNX backend does not take bf16 (onnxruntime has no bf16 "
                                "convolution kernels)", expected="--dtype fp32 (or fp16 on cuda) with --backend "
                                "onnx, or --backend aoti for bf16", found="--backend onnx --dtype bf16"))
    if problems:
        raise KilnError(problems)
