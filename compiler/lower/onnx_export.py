"""ONNX artifacts: an exported stage program as an ``.onnx`` graph whose weights live in the plan.

The graph is translated from the same ``ExportedProgram`` the AOTInductor path compiles, so it
has the same inputs, outputs and dynamic dims. Every initializer becomes an external-data
reference named like the program's constant (``unet.conv_in.weight``): the runtime hands
onnxruntime the plan's memory-mapped weights by name (``SessionOptions.add_external_initializers``),
so several graphs share one stored copy and the ``.onnx`` bytes depend on the architecture only,
never on weight values (two checkpoints of one architecture share a cached artifact). Tiny
tensors are references too, unlike in the ``.pt2`` (where they are inlined into the code).

The exporter's own ONNX optimizer is off: it folds weight transposes into new, unnamed
initializers that would have to be stored per graph. onnxruntime does the same folding when
it creates the session (ORT_ENABLE_ALL), with no change in numerics.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import torch
from torch.export import ExportedProgram

from kiln.runtime.manifest import WEIGHTS_MEMBER

# The opset the exporter targets; recorded in the manifest's target (``onnx_opset``).
OPSET = 20


def onnx_compile(ep: ExportedProgram) -> bytes:
    """The ``.onnx`` bytes of ``ep``: checked with ``onnx.checker`` (full check, with the
    weights), then with every initializer turned into a by-name reference to the plan's weights
    and the exporter's per-node debug metadata (stack traces, ~70% of the bytes) dropped."""
    program = torch.onnx.export(_float_clamp_bounds(ep), dynamo=True, opset_version=OPSET, optimize=False,
                                verbose=False)
    with tempfile.TemporaryDirectory(prefix="kiln-onnx-") as tmp:
        path = Path(tmp) / "stage.onnx"
        program.save(path, external_data=True)
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
    for index, tensor in enumerate(model.graph.initializer):
        model.graph.initializer[index].CopyFrom(weight_reference(tensor))
    for node in model.graph.node:
        del node.metadata_props[:]
    return model.SerializeToString()


def initializer_names(data: bytes) -> list[str]:
    """The weights an ``.onnx`` artifact of ``onnx_compile`` asks the runtime for."""
    return [tensor.name for tensor in onnx.load_model_from_string(data).graph.initializer]


def weight_reference(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """An initializer with no data of its own: onnxruntime gets it by name from the plan."""
    ref = onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type,
                           data_location=onnx.TensorProto.EXTERNAL)
    entry = ref.external_data.add()
    entry.key, entry.value = "location", WEIGHTS_MEMBER
    return ref


def _float_clamp_bounds(ep: ExportedProgram) -> ExportedProgram:
    """``clamp(x, 0, 1.0)``, an int and a float bound: the exporter's type promotion turns the
    int into a tensor and then finds no overload (torch 2.14). With a float bound present the
    result is computed in floating point either way, so the int bound is rewritten as a float
    (in place: lowering exports each program once)."""
    changed = False
    for node in ep.graph.nodes:
        bounds = node.args[1:] if node.target is torch.ops.aten.clamp.default else ()
        if {type(b) for b in bounds} == {int, float}:
            node.args = (node.args[0], *(float(b) for b in bounds))
            changed = True
    if changed:
        ep.graph_module.recompile()
    return ep
