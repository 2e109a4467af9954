"""ONNX stages optimized at compile time for onnxruntime's CPU provider.

onnxruntime optimizes a graph when a session opens (fusions, constant folding and the NCHWc
layout of MLAS's convolutions: ~19 s for the SD1.5 UNet on 2 cores) and copies the weights into
the layouts it chose. A plan is compiled once and opened many times, so ``kiln compile`` does that
once: it opens a session at ORT_ENABLE_ALL, has onnxruntime save the optimized graph, and the plan
stores that graph with the tensors it reads (re-laid weights in place of the originals). The
runtime opens it with optimizations off and onnxruntime maps those tensors from the plan file
itself (kiln.runtime.ort).

The saved graph is specific to the onnxruntime version and the CPU's NCHWc block size; the
target records both and the runtime refuses a plan made for others.

A LoRA applied at load patches original weights, so every stored tensor it may change (one made
from a ``patchable`` weight) must be a known re-layout of one original (kiln.runtime.ort_layouts):
found from the graph's structure where onnxruntime keeps the names (initializers it left alone,
constants it folded from a weight through reshapes and transposes), by content where the NCHWc
transform made a new tensor (a unique match), and checked bit for bit. A stage where that cannot
be shown is not optimized (``optimize_for_cpu`` says why); onnxruntime then optimizes it when the
plan loads, as it does for every stage of a GPU plan.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Mapping

import onnx
import torch
from onnx import numpy_helper

from kiln.compiler.lower.onnx_export import weight_reference
from kiln.runtime.ort import CPU, PLAN_FILE, onnxruntime, session_options
from kiln.runtime.ort_layouts import Relayout

# Ops a folded weight may pass through and still be the same numbers in another layout (a Cast
# only when it widens: fp16 text-encoder weights cast to fp32).
_MOVEMENT_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Identity", "Flatten", "Cast"}
_WIDER = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float64),
          (torch.float16, torch.float64), (torch.bfloat16, torch.float64)}
_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
           onnx.TensorProto.BFLOAT16: torch.bfloat16, onnx.TensorProto.DOUBLE: torch.float64,
           onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
           onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE}


@dataclass
class OptimizedGraph:
    model: bytes                       # the optimized graph; stored tensors are by-name references
    weights: dict[str, torch.Tensor]   # initializer name -> tensor the plan stores
    relayouts: dict[str, Relayout]     # stored initializers made from a patchable original weight


class NotOptimized(Exception):
    """Why a stage keeps its unoptimized graph."""


def optimize_for_cpu(model: bytes, weights: Mapping[str, torch.Tensor], patchable: Collection[str],
                     nchwc_block: int, scratch: Path) -> OptimizedGraph:
    """The stage graph ``model`` (initializers by name from ``weights``) optimized by onnxruntime
    for its CPU provider; NotOptimized when a stored tensor made from a ``patchable`` weight is not
    a known re-layout of it. ``scratch``: a folder for onnxruntime's output, which the returned
    tensors map (keep it until the plan is written)."""
    path = _saved_optimized(model, weights, scratch)
    optimized = onnx.load(str(path), load_external_data=False)
    original = onnx.load_model_from_string(model).graph
    values = _Values(path.parent)
    finder = _Sources(original, weights, set(patchable), nchwc_block)
    stored, layouts = {}, {}
    for index, tensor in enumerate(optimized.graph.initializer):
        if tensor.data_type not in _FLOAT_TYPES or finder.computed(tensor.name):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:   # shapes and constants stay in the graph
                value = values.tensor(tensor)
                optimized.graph.initializer[index].CopyFrom(numpy_helper.from_array(value.numpy(), tensor.name))
            continue
        value = values.tensor(tensor)
        layout = finder.layout(tensor.name, value)
        if layout is not None:
            layouts[tensor.name] = layout
        stored[tensor.name] = value
        optimized.graph.initializer[index].CopyFrom(weight_reference(tensor))
    return OptimizedGraph(optimized.SerializeToString(), stored, layouts)


def bind_to_plan(model: bytes, places: Mapping[str, tuple[int, int]]) -> bytes:
    """``model`` with each stored initializer pointing at its bytes in the plan file: ``places``
    maps initializer name -> (offset in the file, length); the file's name is ``PLAN_FILE``, which
    the runtime replaces with the plan's actual name (kiln.runtime.ort)."""
    graph = onnx.load_model_from_string(model)
    for tensor in graph.graph.initializer:
        if tensor.name not in places:
            continue
        offset, length = places[tensor.name]
        del tensor.external_data[:]
        for key, value in (("location", PLAN_FILE), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return graph.SerializeToString()


def _saved_optimized(model: bytes, weights: Mapping[str, torch.Tensor], scratch: Path) -> Path:
    """onnxruntime's optimized graph, saved as ``graph.onnx`` + ``tensors.bin`` in a new folder."""
    ort = onnxruntime()
    folder = Path(scratch)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "graph.onnx"
    options = session_options(ort, optimized=False)
    options.optimized_model_filepath = str(path)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "tensors.bin")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
    names = [t.name for t in onnx.load_model_from_string(model).graph.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL]
    tensors = [weights[name].detach().contiguous() for name in names]
    options.add_external_initializers(names, [ort.OrtValue.from_dlpack(t) for t in tensors])
    session = ort.InferenceSession(model, options, providers=[CPU])
    del session
    return path


class _Values:
    """Initializer values of a saved graph: inline ones decoded, external ones mapped from its file."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._maps: dict[str, mmap.mmap] = {}

    def tensor(self, proto: onnx.TensorProto) -> torch.Tensor:
        if proto.data_location != onnx.TensorProto.EXTERNAL:
            return torch.from_numpy(numpy_helper.to_array(proto).copy())
        info = {entry.key: entry.value for entry in proto.external_data}
        data = self._map(info["location"])
        dtype = _DTYPES[proto.data_type]
        length = int(info["length"])
        flat = torch.frombuffer(data, dtype=dtype, count=length // dtype.itemsize, offset=int(info.get("offset", 0)))
        return flat.reshape(list(proto.dims))

    def _map(self, location: str) -> mmap.mmap:
        if location not in self._maps:
            with open(self.folder / location, "rb") as f:
                self._maps[location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[location]


class _Sources:
    """Where the optimized graph's tensors come from, read off the original graph."""

    def __init__(self, graph: onnx.GraphProto, weights: Mapping[str, torch.Tensor], patchable: set[str],
                 nchwc_block: int):
        self.weights = {t.name: weights[t.name] for t in graph.initializer   # the plan's tensors; others
                        if t.data_location == onnx.TensorProto.EXTERNAL}        # are constants of the graph
        self.patchable = patchable & set(self.weights)
        self.block = nchwc_block
        self.producers = {out: node for node in graph.node for out in node.output}
        self._upstream: dict[str, frozenset[str]] = {}
        self._fingerprints: dict[int, list[str]] | None = None

    def computed(self, name: str) -> bool:
        """A value of the original graph that no weight flows into (a folded constant: shapes,
        the timestep frequencies): it stays in the graph itself."""
        return name not in self.weights and name in self.producers and not self.upstream(name)

    def upstream(self, name: str) -> frozenset[str]:
        """The original initializers ``name`` is computed from."""
        if name in self.weights:
            return frozenset([name])
        if name not in self._upstream:
            node = self.producers.get(name)
            found: frozenset[str] = frozenset()
            for source in (node.input if node is not None else ()):
                if source:
                    found |= self.upstream(source)
            self._upstream[name] = found
        return self._upstream[name]

    def layout(self, name: str, value: torch.Tensor) -> Relayout | None:
        """How a stored tensor derives from the patchable weight it is made from; None when no
        patchable weight flows into it. NotOptimized when one does but not as a known layout."""
        if name in self.weights:
            if torch.equal(self.weights[name].reshape(-1), value.reshape(-1)):
                same_shape = tuple(self.weights[name].shape) == tuple(value.shape)
                return None if same_shape or name not in self.patchable else self._relayout(name, "reshape", value)
            if name in self.patchable:
                raise NotOptimized(f"onnxruntime changed the values of weight {name}")
            return None
        if name in self.producers:
            sources = self.upstream(name) & self.patchable
            if not sources:
                return None
            source = self._moved_from(name)
            found = source is not None and self._match(source, value, ("reshape", "transpose"))
            if not found:
                raise NotOptimized(f"folded tensor {name} is computed from weight {sorted(sources)[0]}, "
                                   "not only re-laid")
            return found
        matches = self._content_matches(value)
        if len(matches) == 1:
            return matches[0] if matches[0].source in self.patchable else None
        if not self.patchable or (matches and not {m.source for m in matches} & self.patchable):
            return None
        raise NotOptimized(f"tensor {name} made by onnxruntime is not a unique re-layout of one weight "
                           f"({len(matches)} found)")

    def _moved_from(self, name: str) -> str | None:
        """The weight ``name`` is made from through data-movement ops only, else None."""
        while name not in self.weights:
            node = self.producers.get(name)
            if node is None or node.op_type not in _MOVEMENT_OPS:
                return None
            if any(self.upstream(extra) for extra in node.input[1:] if extra):
                return None   # a shape or permutation that itself depends on a weight
            name = node.input[0]
        return name

    def _match(self, source: str, value: torch.Tensor, layouts) -> Relayout | None:
        weight = self.weights[source]
        for layout in layouts:
            try:
                candidate = self._relayout(source, layout, value)
                if torch.equal(candidate.apply(weight), value):
                    return candidate
            except (ValueError, RuntimeError):
                continue
        return None

    def _relayout(self, source: str, layout: str, value: torch.Tensor) -> Relayout:
        block = self.block if layout.startswith("nchwc") else 0
        dtypes = (self.weights[source].dtype, value.dtype)
        if dtypes[0] != dtypes[1] and dtypes not in _WIDER:
            raise ValueError(f"{source}: a {dtypes[0]} weight stored as {dtypes[1]} loses precision")
        cast = tuple(str(d).removeprefix("torch.") for d in dtypes) if dtypes[0] != dtypes[1] else ()
        return Relayout(source, layout, tuple(self.weights[source].shape), tuple(value.shape), block, cast)

    def _content_matches(self, value: torch.Tensor) -> list[Relayout]:
        """Weights ``value`` is a re-layout of (same numbers, any order, zero padding allowed)."""
        matches = []
        for source in self._same_numbers(value):
            weight = self.weights[source]
            layouts = {1: ("pad", "reshape"), 2: ("reshape", "transpose"),
                       4: ("nchwc", "nchwc_unblocked_input", "reshape")}.get(weight.dim(), ("reshape",))
            found = self._match(source, value, layouts)
            if found is not None:
                matches.append(found)
        return matches

    def _same_numbers(self, value: torch.Tensor) -> list[str]:
        """Weights whose bit patterns sum as ``value``'s do (order-free, and zero padding adds 0)."""
        if self._fingerprints is None:
            self._fingerprints = {}
            for name, weight in self.weights.items():
                if weight.is_floating_point():
                    self._fingerprints.setdefault(_fingerprint(weight), []).append(name)
        return self._fingerprints.get(_fingerprint(value), [])


def _fingerprint(tensor: torch.Tensor) -> int:
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return int(tensor.detach().contiguous().view(bits).to(torch.int64).sum()) + (tensor.dtype.itemsize << 60)
