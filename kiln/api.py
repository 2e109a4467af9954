"""kiln's public Python API."""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from kiln.compiler.graph import Graph
from kiln.compiler.interpreter import RunResult, run_graph
from kiln.compiler.validate import validate
from kiln.compiler.workflow import load_workflow, parse_workflow
from kiln.kernels.errors import KilnError, Problem
from kiln.kernels.settings import Settings
from kiln.nodes import registry
from kiln.nodes.folders import ModelFolders
from kiln.nodes.registry import RunContext

# progress(node id, step, total): sampler steps and upscale tiles of the node running.
NodeProgress = Callable[[str, int, int], None]


def run_workflow(workflow: str | Path | dict | Graph, *, models: str | Path | None = None,
                 extra_model_paths: str | Path | None = None, input_dir: str | Path | None = None,
                 output_dir: str | Path = "output", device: str = "cpu", dtype: str = "fp32",
                 seed: int | None = None, overrides: dict[tuple[str, str], Any] | None = None,
                 progress: NodeProgress | None = None, settings: Settings = Settings()) -> RunResult:
    """Validate then run a workflow (API or UI format, a dict, a file or a PNG carrying one)
    eagerly; SaveImage writes under ``output_dir``."""
    graph = workflow if isinstance(workflow, Graph) else \
        parse_workflow(workflow) if isinstance(workflow, dict) else load_workflow(workflow)
    graph = apply_overrides(graph, seed=seed, overrides=overrides or {})
    folders = ModelFolders.from_models_dir(models, extra_model_paths)
    graph = validate(graph, folders, input_dir)
    check_device(device, dtype)
    ctx = RunContext(models=folders, input_dir=str(input_dir) if input_dir else None,
                     output_dir=str(output_dir), device=device, dtype=dtype, prompt=graph.source, settings=settings,
                     extra_pnginfo={"workflow": graph.editor} if graph.editor is not None else None)
    if progress is not None:
        ctx.progress = lambda step, total: progress(ctx.node_id, step, total)
    return run_graph(graph, ctx)


def apply_overrides(graph: Graph, *, seed: int | None, overrides: dict[tuple[str, str], Any]) -> Graph:
    """Set ``--seed`` on every seeded node and ``--set NODE.INPUT=VALUE`` values (before validation).

    The returned graph's ``source`` (embedded in saved PNGs) carries the values actually run.
    """
    problems = []
    updates = dict(overrides)
    for (node_id, input_name) in overrides:
        if node_id not in graph.nodes:
            problems.append(Problem("invalid_prompt", "--set names a node that is not in the workflow",
                                    node_id=node_id, input_name=input_name,
                                    expected="one of " + ", ".join(sorted(graph.nodes)), found=node_id))
    if problems:
        raise KilnError(problems)
    if seed is not None:
        for node in graph.nodes.values():
            node_def = registry.get(node.class_type)
            if node_def is not None and node_def.seed is not None:
                updates[(node.id, node_def.seed)] = seed
    if not updates:
        return graph
    nodes = {node_id: replace(node, inputs=dict(node.inputs)) for node_id, node in graph.nodes.items()}
    source = copy.deepcopy(graph.source) if graph.source is not None else None
    for (node_id, input_name), value in updates.items():
        nodes[node_id].inputs[input_name] = value
        if source is not None and node_id in source:
            source[node_id].setdefault("inputs", {})[input_name] = value
    return replace(graph, nodes=nodes, source=source)


def check_device(device: str, dtype: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KilnError([Problem("invalid_device", "CUDA was requested but torch sees no CUDA device",
                                 expected="--device cpu on this machine", found=device)])
    if device == "cpu" and dtype == "fp16":
        raise KilnError([Problem("invalid_device", "fp16 inference on CPU is not supported",
                                 expected="--dtype fp32 or bf16 on cpu, fp16 with --device cuda",
                                 found="--device cpu --dtype fp16")])
