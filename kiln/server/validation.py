"""``POST /prompt``'s checks, answered in ComfyUI's shapes (``execution.py: validate_prompt``):
a top-level ``error`` {type, message, details, extra_info} and per-node ``node_errors``, built
from kiln's own validation problems. As in ComfyUI, outputs whose inputs are fine still run when
others fail validation; only when none can run is the prompt refused (400)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from kiln.compiler.graph import Graph
from kiln.compiler.validate import validate
from kiln.compiler.workflow import parse_workflow
from kiln.kernels.errors import KilnError, Problem
from kiln.nodes import registry
from kiln.nodes.folders import ModelFolders


@dataclass
class Refusal(Exception):
    """A prompt that cannot run: the 400 body."""

    error: dict
    node_errors: dict

    def body(self) -> dict:
        return {"error": self.error, "node_errors": self.node_errors}


def error(kind: str, message: str, details: str = "", extra_info: dict | None = None) -> dict:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info or {}}


def _details(problem: Problem) -> str:
    parts = [f"expected {problem.expected}" if problem.expected is not None else "",
             f"found {problem.found}" if problem.found is not None else "", problem.hint or ""]
    return "; ".join(p for p in parts if p) or (problem.input_name or "")


def node_error(problem: Problem) -> dict:
    extra = {}
    if problem.input_name is not None:
        extra["input_name"] = problem.input_name
    if problem.found is not None:
        extra["received_value"] = problem.found
    return error(problem.code, problem.message, _details(problem), extra)


def check_prompt(prompt: object, models: ModelFolders | None, input_dir: str | None) -> tuple[Graph, list[str], dict]:
    """(validated graph of the outputs that can run, those outputs, node_errors of the others)."""
    if not isinstance(prompt, dict):
        raise Refusal(error("invalid_prompt", "the prompt must be an object of nodes",
                            f"found a {type(prompt).__name__}"), {})
    if not prompt:
        raise Refusal(error("prompt_no_outputs", "Prompt has no outputs", "the prompt holds no nodes"), {})
    try:
        graph = parse_workflow(prompt, name="prompt")
    except KilnError as failure:
        raise _refusal(failure.problems, None) from None
    try:
        validated = validate(graph, models, input_dir)
        return validated, _outputs(validated), {}
    except KilnError as failure:
        problems = failure.problems
    by_node: dict[str, list[Problem]] = {}
    for problem in problems:
        by_node.setdefault(problem.node_id or "", []).append(problem)
    if "" in by_node or any(p.code in ("missing_node_type", "invalid_prompt") for p in problems):
        raise _refusal(problems, graph)
    node_errors = {}
    runnable = []
    for output in _outputs(graph):
        ancestry = set(graph.topological_order([output]))
        failing = sorted(ancestry & set(by_node))
        if not failing:
            runnable.append(output)
        for node_id in failing:
            entry = node_errors.setdefault(node_id, {"errors": [node_error(p) for p in by_node[node_id]],
                                                      "dependent_outputs": [], "class_type":
                                                      graph.nodes[node_id].class_type})
            entry["dependent_outputs"].append(output)
    if not runnable:
        details = "\n".join(f"{e['message']}: {e['details']}" for n in node_errors.values() for e in n["errors"])
        raise Refusal(error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
                      node_errors)
    needed = set(graph.topological_order(runnable))
    subgraph = replace(graph, nodes={n: node for n, node in graph.nodes.items() if n in needed})
    return validate(subgraph, models, input_dir), runnable, node_errors


def _outputs(graph: Graph) -> list[str]:
    outputs = []
    for node_id, node in graph.nodes.items():
        definition = registry.get(node.class_type)
        if definition is not None and definition.output_node:
            outputs.append(node_id)
    return outputs


def _refusal(problems: list[Problem], graph: Graph | None) -> Refusal:
    """A prompt refused as a whole, with ComfyUI's type for the first problem that decides it."""
    for problem in problems:
        if problem.code == "missing_node_type":
            return Refusal(error("invalid_prompt", f"Cannot execute because node {problem.class_type} does not "
                                 f"exist.", f"Node ID '#{problem.node_id}'",
                                 {"kiln": [p.format() for p in problems]}), {})
    first = problems[0]
    if first.code == "prompt_no_outputs":
        return Refusal(error("prompt_no_outputs", "Prompt has no outputs", first.format()), {})
    return Refusal(error(first.code, first.message, first.format(), {"kiln": [p.format() for p in problems]}), {})
