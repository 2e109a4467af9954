"""The compiler pipeline: a workflow through the passes into one plan file.

    validate -> dead_nodes -> runtime_inputs -> runtime_loras -> merge_identical -> fold_constants
             -> partition_stages -> fuse_stages -> build_modules -> lower (plan file)

The order rules are data (``PASS_ORDER``, pairwise like torch.fx's ``this_before_that`` pass
constraints), checked whenever a pass list runs: ``runtime_inputs`` runs before
``merge_identical`` so a node whose widget is a runtime input is never merged with a twin that
only happens to hold the same value today, and so on.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

from kiln.compiler.passes import (build_modules, dead_nodes, fold_constants, fuse_stages, merge_identical,
                                  partition_stages, runtime_inputs, runtime_loras)
from kiln.compiler.stages import Compilation, CompileOptions
from kiln.compiler.validate import validate as validate_graph
from kiln.compiler.workflow import load_workflow, parse_workflow
from kiln.kernels.errors import KilnError, Problem
from kiln.kernels.settings import Settings
from kiln.nodes.folders import ModelFolders

Pass = Callable[[Compilation], Compilation]
# progress(stage name, index, total), before each stage compiles; on_pass(pass name, seconds).
Progress = Callable[[str, int, int], None]

BACKENDS = ("aoti", "onnx")
# The default per device type, by measurement (README, "Compiling plans"): on CPU onnxruntime
# ran full-size SD1.5 1.7-6x faster than the AOTInductor build (tiny models: a draw); CUDA is
# not measured yet.
DEFAULT_BACKENDS = {"cpu": "onnx", "cuda": "aoti"}


def validate(c: Compilation) -> Compilation:
    """The workflow is well-formed (``kiln.compiler.validate``), or every problem is raised at once.

    Guarantees: every node's class_type is in the catalogue; every required input is present;
    widget values are converted to their types and lie in range; every link points at an
    existing node's output of the input's type; model and image files exist.
    """
    return replace(c, graph=validate_graph(c.graph, c.options.models, c.options.input_dir))


PASSES: list[Pass] = [validate, dead_nodes, runtime_inputs, runtime_loras, merge_identical, fold_constants,
                      partition_stages, fuse_stages, build_modules]

# (earlier, later, why): where both are in a pass list, ``earlier`` must come first.
PASS_ORDER: list[tuple[Pass, Pass, str]] = [
    (validate, dead_nodes, "the other passes read converted, checked values"),
    (dead_nodes, runtime_inputs, "an --input on a node no output needs is refused, not compiled"),
    (runtime_inputs, merge_identical, "a node with a runtime input must never merge with a twin"),
    (merge_identical, fold_constants, "identical subgraphs fold (and load their models) once"),
    (runtime_inputs, fold_constants, "folding must know which nodes run at run time"),
    (runtime_inputs, runtime_loras, "a LoRA is applied at run time when one of its inputs is a runtime input"),
    (runtime_loras, merge_identical, "a runtime LoRA's readers must read the weights it patches before merging"),
    (fold_constants, partition_stages, "stages are made of the run-time nodes only"),
    (partition_stages, fuse_stages, "fusion merges stages"),
    (fuse_stages, build_modules, "a fused stage gets one module"),
]


def check_pass_order(passes: list[Pass]) -> None:
    """Refuse a pass list that breaks a ``PASS_ORDER`` rule, naming the rule (a programming error)."""
    position = {p: i for i, p in enumerate(passes)}
    for earlier, later, why in PASS_ORDER:
        if earlier in position and later in position and position[earlier] > position[later]:
            raise ValueError(f"pass {later.__name__} runs before {earlier.__name__}, which must come first: {why}")


def run_passes(c: Compilation, passes: Iterable[Pass] = PASSES,
               on_pass: Callable[[str, float], None] | None = None) -> Compilation:
    """Run ``passes`` in order; a failure names the pass and the passes that ran before it."""
    passes = list(passes)
    check_pass_order(passes)
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
                     backend: str | None = None, output: str | Path, settings: Settings = Settings(),
                     on_pass: Callable[[str, float], None] | None = None,
                     progress: Progress | None = None, weights: str = "fp32") -> Path:
    """Compile a workflow into a plan file at ``output`` (written atomically); ``backend``
    "aoti" or "onnx", by default the one measured faster on the device; ``weights`` "fp16"
    stores an fp32 plan's weights halved (upcast when the plan loads)."""
    backend = backend or default_backend(device)
    _check_target(device, dtype, backend, weights)
    graph = parse_workflow(workflow) if isinstance(workflow, dict) else load_workflow(workflow)
    options = CompileOptions(models=ModelFolders.from_models_dir(models, extra_model_paths),
                             input_dir=str(input_dir) if input_dir is not None else None,
                             device=device, dtype=dtype, backend=backend, inputs=tuple(inputs), settings=settings,
                             weights=None if weights == "fp32" else weights)
    c = run_passes(Compilation(graph, options), on_pass=on_pass)
    return _attempt("lower", [p.__name__ for p in PASSES], lambda: _lower(c, Path(output), settings, progress))


def default_backend(device: str) -> str:
    return DEFAULT_BACKENDS["cuda" if device.startswith("cuda") else "cpu"]


def _lower(c: Compilation, output: Path, settings: Settings, progress: Progress | None) -> Path:
    """Export and compile every stage and write the plan file (``kiln.compiler.lower``)."""
    from kiln.compiler.lower.lower import lower

    return lower(c.program(), output, settings.artifact_cache, progress)


def _attempt(name: str, done: list[str], step: Callable):
    before = ", ".join(done) if done else "none"
    header = f"compiler pass {name!r} failed (passes run before it: {before})"
    try:
        return step()
    except KilnError as error:
        raise KilnError([Problem("compile_failed", header), *error.problems]) from error
    except Exception as exc:   # a bug, not a user error: still named, --debug shows the traceback
        raise KilnError([Problem("compile_failed", f"{header}: {type(exc).__name__}: {exc}")]) from exc


def _check_target(device: str, dtype: str, backend: str, weights: str = "fp32") -> None:
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
    if weights not in ("fp32", "fp16") or (weights == "fp16" and dtype != "fp32"):
        problems.append(Problem("invalid_target", "--weights fp16 stores an fp32 plan's weights halved",
                                expected="--weights fp32, or fp16 with --dtype fp32",
                                found=f"--weights {weights} --dtype {dtype}"))
    if problems:
        raise KilnError(problems)
