"""The eager interpreter: runs a validated graph node by node with the nodes' own functions.

It is the reference every compiled plan is checked against and the engine of constant
folding. Values are freed as soon as their last consumer has run; a failing node is
reported with its id, class_type and the exception, never as a bare traceback.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from kiln.compiler.graph import Graph, Link
from kiln.compiler.node_cache import NodeCache, signatures
from kiln.kernels.errors import InputError, Interrupted, KilnError, Problem
from kiln.nodes import registry
from kiln.nodes.registry import RunContext, UiOutput
from kiln.runtime.images import WrittenImages


@dataclass
class NodeTiming:
    node_id: str
    class_type: str
    seconds: float


class RunEvents:
    """What a caller hears from a run (the server's messages). ``executing`` may raise
    ``Interrupted`` to stop before the node."""

    def cached(self, node_ids: list[str]) -> None:
        """The nodes whose outputs come from the cache, before anything runs."""

    def executing(self, node_id: str) -> None:
        """A node is about to run."""

    def executed(self, node_id: str, ui: UiOutput) -> None:
        """An output node's results (also for one answered from the cache)."""


@dataclass
class RunResult(WrittenImages):
    outputs: dict[str, tuple] = field(default_factory=dict)   # the output nodes' results
    timings: list[NodeTiming] = field(default_factory=list)


def run_graph(graph: Graph, ctx: RunContext, *, targets: list[str] | None = None,
              keep: set[str] | None = None, cache: NodeCache | None = None,
              events: RunEvents | None = None) -> RunResult:
    """Evaluate the nodes ``targets`` (default: the output nodes) depend on.

    ``keep`` names nodes whose outputs are returned in ``RunResult.outputs`` besides the targets.
    With a ``cache``, nodes whose input signature it holds are not run again, and the outputs of
    the nodes that run are stored in it (``kiln.compiler.node_cache``).
    """
    defs = {node_id: registry.get(node.class_type) for node_id, node in graph.nodes.items()}
    if targets is None:
        targets = [node_id for node_id, d in defs.items() if d is not None and d.output_node]
    order = graph.topological_order(targets)
    keep = set(targets) | (keep or set())
    remaining_uses = Counter((link.node_id, link.slot) for node_id in order for _, link in graph.nodes[node_id].links())
    values: dict[str, tuple] = {}
    result = RunResult()
    events = events or RunEvents()
    sigs = signatures(graph, order, ctx.input_dir) if cache is not None else {}
    events.cached([node_id for node_id in order if sigs.get(node_id) in cache] if cache is not None else [])
    with torch.inference_mode():
        for node_id in order:
            node = graph.nodes[node_id]
            node_def = defs[node_id]
            entry = cache.get(sigs[node_id]) if cache is not None else None
            if entry is not None:
                values[node_id] = entry.outputs
                if entry.ui is not None:
                    result.images[node_id] = list(entry.ui.images)
                    events.executed(node_id, entry.ui)
                _release(graph, node, remaining_uses, values, keep)
                continue
            kwargs = {name: (values[v.node_id][v.slot] if isinstance(v, Link) else v)
                      for name, v in node.inputs.items() if node_def.input(name) is not None}
            events.executing(node_id)
            ctx.node_id = node_id
            start = time.perf_counter()
            try:
                out = node_def.function(ctx, **kwargs) if node_def.needs_context else node_def.function(**kwargs)
            except (KilnError, Interrupted):
                raise
            except InputError as exc:
                raise KilnError([Problem("exception_during_execution", exc.message, node_id=node_id,
                                         class_type=node.class_type, title=node.title, input_name=exc.input_name,
                                         expected=exc.expected, found=exc.found)]) from exc
            except Exception as exc:  # reported with the node named; --debug shows the traceback
                raise KilnError([Problem("exception_during_execution", f"{type(exc).__name__}: {exc}",
                                         node_id=node_id, class_type=node.class_type,
                                         title=node.title)]) from exc
            result.timings.append(NodeTiming(node_id, node.class_type, time.perf_counter() - start))
            ui = out if isinstance(out, UiOutput) else None
            if ui is not None:
                result.images[node_id] = list(ui.images)
                events.executed(node_id, ui)
                out = ()
            values[node_id] = tuple(out) if out is not None else ()
            if cache is not None:
                cache.put(sigs[node_id], values[node_id], ui, node_def.outputs)
            _release(graph, node, remaining_uses, values, keep)
    if cache is not None:
        cache.trim(set(sigs.values()))
    result.outputs = {node_id: values[node_id] for node_id in keep if node_id in values}
    return result


def _release(graph: Graph, node, remaining_uses: Counter, values: dict, keep: set[str]) -> None:
    """Free each output after its last consumer ran: a slot no later node reads (a checkpoint's
    CLIP once the prompts are encoded) as soon as that happens, the node's outputs with their last."""
    for _, link in node.links():
        remaining_uses[link.node_id, link.slot] -= 1
        if remaining_uses[link.node_id, link.slot] or link.node_id in keep or link.node_id not in values:
            continue
        if any(remaining_uses[link.node_id, slot] for slot in range(len(values[link.node_id]))):
            values[link.node_id] = tuple(None if slot == link.slot else value   # a new tuple: a cache may
                                         for slot, value in enumerate(values[link.node_id]))  # hold the old
        else:
            del values[link.node_id]
