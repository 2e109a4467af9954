"""ONNX graphs optimized at compile time for onnxruntime's CPU provider: the re-layouts kiln records
for LoRAs, on small graphs with the layer kinds of the real models (convolutions with blocked and
unblocked inputs and a padded output, linear layers, norm scales)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from kiln.compiler.lower.ort_optimize import NotOptimized, bind_to_plan, optimize_for_cpu
from kiln.runtime.ort import CPU, PLAN_FILE, nchwc_block_size, session_options
from kiln.runtime.ort_layouts import LAYOUTS, Relayout, relaid

BLOCK = nchwc_block_size()
pytestmark = pytest.mark.skipif(BLOCK == 0, reason="onnxruntime has no NCHWc layout on this CPU")


@pytest.mark.parametrize("layout,shape", [("nchwc", (20, 24, 3, 3)), ("nchwc", (4, 16, 1, 1)),
                                          ("nchwc_unblocked_input", (20, 3, 3, 3)), ("transpose", (7, 5)),
                                          ("reshape", (6, 1, 1)), ("pad", (3,))])
def test_each_layout_takes_the_weight_back(layout, shape):
    weight = torch.randn(shape)
    stored_numel = {"nchwc": lambda: _ceil(shape[0]) * _ceil(shape[1]) * shape[2] * shape[3],
                    "nchwc_unblocked_input": lambda: _ceil(shape[0]) * shape[1] * shape[2] * shape[3],
                    "pad": lambda: _ceil(shape[0])}.get(layout, lambda: weight.numel())()
    relayout = Relayout("w", layout, shape, (stored_numel,), BLOCK if layout.startswith("nchwc") else 0)
    stored = relayout.apply(weight)
    assert stored.numel() == stored_numel
    assert torch.equal(relayout.original(stored), weight)
    assert Relayout.from_json(relayout.to_json()) == relayout
    with pytest.raises(ValueError, match="unknown layout"):
        Relayout("w", "rot90", shape, shape)
    assert set(LAYOUTS) >= {layout}


def test_a_patched_weight_relaid_is_what_onnxruntime_makes_of_it(tmp_path):
    """The stored tensors of an optimized graph, with weights changed and re-laid by kiln, give the
    outputs of the graph optimized from the changed weights (what a LoRA applied at load relies on)."""
    model, weights = _small_model()
    optimized = optimize_for_cpu(model, weights, set(weights), BLOCK, tmp_path / "a")
    layouts = {layout.layout for layout in optimized.relayouts.values()}
    assert {"nchwc", "nchwc_unblocked_input", "transpose", "pad"} <= layouts, layouts
    sources = {layout.source for layout in optimized.relayouts.values()}
    assert {"conv1.weight", "conv2.weight", "conv3.weight", "conv3.bias", "linear.weight"} <= sources
    for name, layout in optimized.relayouts.items():   # what the compiler stored is what onnxruntime made
        assert torch.equal(layout.apply(weights[layout.source]), optimized.weights[name])

    generator = torch.Generator().manual_seed(1)
    patched = {name: w + 0.1 * torch.randn(w.shape, generator=generator) for name, w in weights.items()}
    expected = _run(model, patched, optimized=False)
    given = relaid(patched, optimized.weights, optimized.relayouts)
    assert set(given) == set(optimized.weights) - {n for n in optimized.weights if _unpatched(n, optimized, weights)}
    assert np.array_equal(_run(optimized.model, {**optimized.weights, **given}, optimized=True), expected)
    assert not np.array_equal(_run(optimized.model, optimized.weights, optimized=True), expected)


def test_a_weight_kept_in_fp16_is_relaid_with_its_cast(tmp_path):
    """A text encoder's fp16 weight cast to fp32 and transposed for a MatMul (what kiln's cast-on-use
    layers export): folded by onnxruntime into one fp32 tensor, re-laid by kiln from a patched fp16
    weight to the same numbers."""
    io = helper.make_tensor_value_info
    nodes = [helper.make_node("Cast", ["proj.weight"], ["w32"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["w32"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    weight = _reference("proj.weight", [5, 3])
    weight.data_type = TensorProto.FLOAT16
    graph = helper.make_graph(nodes, "g", [io("x", TensorProto.FLOAT, [2, 3])], [io("y", TensorProto.FLOAT, [2, 5])],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]).SerializeToString()
    weights = {"proj.weight": torch.randn(5, 3).half()}
    optimized = optimize_for_cpu(model, weights, {"proj.weight"}, BLOCK, tmp_path / "a")
    (layout,) = optimized.relayouts.values()
    assert (layout.layout, layout.cast) == ("transpose", ("float16", "float32"))
    patched = {"proj.weight": (weights["proj.weight"].float() * 1.5).half()}
    x = torch.randn(2, 3)
    session = _session(optimized.model, relaid(patched, optimized.weights, optimized.relayouts))
    reference = _session(model, patched, optimized=False)
    assert np.array_equal(session.run(None, {"x": x.numpy()})[0], reference.run(None, {"x": x.numpy()})[0])
    assert torch.equal(layout.original(optimized.weights[next(iter(optimized.relayouts))]), weights["proj.weight"])


def test_a_graph_bound_to_the_plan_reads_its_tensors_at_the_offsets_given(tmp_path):
    model, weights = _small_model()
    optimized = optimize_for_cpu(model, weights, set(), BLOCK, tmp_path / "a")
    blob, places = bytearray(b"header-bytes"), {}
    for name, tensor in optimized.weights.items():
        places[name] = (len(blob), tensor.numel() * tensor.element_size())
        blob += tensor.numpy().tobytes()
    bound = bind_to_plan(optimized.model, places)
    graph = onnx.load_model_from_string(bound).graph
    for tensor in graph.initializer:
        if tensor.name in places:
            entries = {e.key: e.value for e in tensor.external_data}
            assert entries == {"location": PLAN_FILE, "offset": str(places[tensor.name][0]),
                               "length": str(places[tensor.name][1])}
    plan = tmp_path / "x.plan"
    plan.write_bytes(bytes(blob))
    from kiln.runtime.ort import OnnxStage

    stage = OnnxStage(bound, {}, [CPU], torch.device("cpu"), "stage", tmp_path, plan_file=plan, optimized=True)
    x = torch.randn(1, 3, 6, 6)
    assert np.array_equal(stage(x)[0].numpy(), _run(model, weights, optimized=False, x=x))


def test_a_weight_folded_into_other_numbers_is_not_optimized(tmp_path):
    """A patchable weight that onnxruntime multiplies into a new tensor cannot be re-laid by kiln:
    the stage keeps its unoptimized graph."""
    w = helper.make_tensor_value_info
    nodes = [helper.make_node("Mul", ["scale.weight", "two"], ["scaled"]),
             helper.make_node("MatMul", ["x", "scaled"], ["y"])]
    constants = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), _reference("scale.weight", [4, 4])]
    graph = helper.make_graph(nodes, "g", [w("x", TensorProto.FLOAT, [2, 4])], [w("y", TensorProto.FLOAT, [2, 4])],
                              constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    weights = {"scale.weight": torch.randn(4, 4)}
    with pytest.raises(NotOptimized, match="scale.weight"):
        optimize_for_cpu(model.SerializeToString(), weights, {"scale.weight"}, BLOCK, tmp_path / "a")
    assert optimize_for_cpu(model.SerializeToString(), weights, set(), BLOCK, tmp_path / "b").relayouts == {}


# --- helpers -------------------------------------------------------------------------------------
def _ceil(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _unpatched(name, optimized, weights) -> bool:
    """Stored tensors no weight flows into (none in this graph)."""
    return name not in weights and name not in optimized.relayouts


def _reference(name: str, dims) -> TensorProto:
    """An initializer given by name (as kiln's exported graphs hold them)."""
    tensor = TensorProto(name=name, dims=dims, data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "weights.safetensors"
    return tensor


def _small_model() -> tuple[bytes, dict[str, torch.Tensor]]:
    """conv 3->32 (input channels unblocked), a norm-like scale after its activation, conv 32->32 3x3,
    conv 32->4 (padded output), a linear layer on the flattened channels (MatMul with a transposed weight)."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"conv1.weight": [32, 3, 3, 3], "conv1.bias": [32], "norm.weight": [32], "conv2.weight": [32, 32, 3, 3],
              "conv2.bias": [32], "conv3.weight": [4, 32, 1, 1], "conv3.bias": [4], "linear.weight": [6, 4]}
    weights = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    nodes = [helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", TensorProto.INT64, [2],
                                                                                  [1, 2])),
             helper.make_node("Unsqueeze", ["norm.weight", "axes"], ["scale"]),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("Mul", ["a1", "scale"], ["r1"]),
             helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c2", "conv3.weight", "conv3.bias"], ["c3"]),
             helper.make_node("Transpose", ["c3"], ["nhwc"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["linear.weight"], ["linear_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["nhwc", "linear_t"], ["y"])]
    io = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "small", [io("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [io("y", TensorProto.FLOAT, [1, 6, 6, 6])],
                              [_reference(name, shape) for name, shape in shapes.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return model.SerializeToString(), weights


def _session(model: bytes, weights: dict[str, torch.Tensor], *, optimized: bool = True):
    options = session_options(onnxruntime, optimized=optimized)
    values = [onnxruntime.OrtValue.from_dlpack(t.contiguous()) for t in weights.values()]
    options.add_external_initializers(list(weights), values)
    return onnxruntime.InferenceSession(model, options, providers=[CPU])


def _run(model: bytes, weights: dict[str, torch.Tensor], *, optimized: bool, x: torch.Tensor | None = None):
    session = _session(model, weights, optimized=optimized)
    x = torch.linspace(-1, 1, 108).reshape(1, 3, 6, 6) if x is None else x
    return session.run(None, {"x": x.numpy()})[0]
