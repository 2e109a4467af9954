"""Module stages: a fused chain of plan-capable nodes as one exportable ``nn.Module``.

Each member is the module its node's plan spec lowers to (``PlanSpec.lower``, written in
``kiln.nodes`` next to the node); the chain feeds them socket values rebuilt from its positional
tensors (``unflatten``) and returns the requested output fields (``flatten``; a bind node's
module returns its fields by name).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.compiler.graph import Link, Node
from kiln.compiler.stages import StageInput, flatten, unflatten
from kiln.kernels.errors import KilnError
from kiln.nodes.plan import plan_problem
from kiln.runtime.env import split_value


class Chain(nn.Module):
    """``forward(*tensors)`` in the stage's input order -> the requested output fields, in order."""

    def __init__(self, ops: list[nn.Module], sources: list[dict[str, Any]], output_types: dict[str, str],
                 outputs: list[tuple[str, int, str]]):
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.sources = sources            # per op: input name -> Link | StageInput
        self.output_types = output_types  # node id -> output socket type
        self.outputs = outputs            # (node id, slot, field)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values: dict[tuple[str, int], Any] = {}
        for op, sources in zip(self.ops, self.sources):
            args = {}
            for name, source in sources.items():
                if isinstance(source, Link):
                    args[name] = values[(source.node_id, source.slot)]
                else:
                    args[name] = unflatten(source.type, {f: tensors[i] for f, i in source.fields.items()})
            values[(op.node_id, 0)] = op(**args)
        result = []
        for node_id, slot, field in self.outputs:
            value = values[(node_id, slot)]
            # a bind node's module gives its bound fields by name
            fields = value if self.output_types[node_id] is None else flatten(self.output_types[node_id], value)[0]
            result.append(fields[field])
        return tuple(result)


def build_chain(steps: list[tuple[Node, Any, dict[str, Any]]], outputs: list[str]) -> Chain:
    """The module of a ``module`` stage from ``kiln.compiler.stages.chain_members`` and the
    stage's output names (``<node>.<slot>.<field>``)."""
    ops, sources, types = [], [], {}
    for node, definition, resolved in steps:
        if definition.plan is None or definition.plan.kind not in ("module", "bind"):
            raise KilnError([plan_problem(node, "this node cannot be compiled into a module stage",
                                          expected="a node whose plan spec is a module", found=node.class_type)])
        bind = definition.plan.kind == "bind"
        widgets = {k: v for k, v in resolved.items() if not isinstance(v, (Link, StageInput))}
        ops.append(definition.plan.lower(node, widgets))
        sources.append({k: v for k, v in resolved.items() if isinstance(v, (Link, StageInput))
                        and (not bind or k in definition.plan.sockets)})
        types[node.id] = None if bind else definition.outputs[0]
    return Chain(ops, sources, types, [split_value(name) for name in outputs]).eval()
