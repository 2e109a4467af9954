"""ONNX plan stages, run by onnxruntime.

An ``.onnx`` artifact carries no weights of its own: each initializer is a by-name reference
that the session gets from the plan's memory-mapped weights (``add_external_initializers``), so
stages sharing a model share one stored copy, and stages sharing artifact and weights (both
samplers of HiRes fix) one session. Execution providers are picked per plan:
TensorRT, then CUDA, for a CUDA plan where onnxruntime-gpu offers them (CPU otherwise, with a
notice), CPU for a CPU plan; ``--provider`` forces one and fails clearly where it is missing.

Tensors go in and out through IO binding and DLPack, without copies: on a GPU provider the
torch side (sampler loop) and onnxruntime share torch's CUDA stream, so latents stay on the
device between steps and stages.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import torch

from kiln.runtime.errors import PlanError

CPU = "CPUExecutionProvider"
# Short names for --provider, in the order a CUDA plan prefers them.
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": CPU}
_GPU_PROVIDERS = (PROVIDERS["tensorrt"], PROVIDERS["cuda"])


def onnxruntime():
    """The onnxruntime module, or PlanError saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise PlanError("plan_backend_unavailable", "this plan runs with onnxruntime, which is not installed",
                        expected="the onnxruntime package", found="no module named onnxruntime",
                        hint="(pip install onnxruntime, or kiln[gpu] for CUDA)") from None
    return ort


def choose_providers(device: str, forced: str | None, available: list[str]) -> list[str]:
    """Execution providers for a plan targeting ``device``, best first, CPU last as the fallback
    for nodes a GPU provider cannot take. ``forced``: a short name (``cuda``) or a full one."""
    if forced is not None:
        name = PROVIDERS.get(forced.lower(), forced)
        if name not in available:
            raise PlanError("provider_unavailable", f"--provider {forced}: onnxruntime offers no {name} here",
                            expected=f"one of {', '.join(available)}", found=name,
                            hint="(GPU providers need kiln[gpu] (onnxruntime-gpu) and a GPU; "
                                 "or leave --provider out)")
        chosen = [name]
    elif device.startswith("cuda"):
        chosen = [p for p in _GPU_PROVIDERS if p in available][:1]
        if not chosen:
            print(f"kiln: notice: the plan targets {device} but onnxruntime offers no GPU provider here "
                  f"(available: {', '.join(available)}); running on {CPU}", file=sys.stderr)
    else:
        chosen = []
    if chosen == [PROVIDERS["tensorrt"]] and PROVIDERS["cuda"] in available:
        chosen.append(PROVIDERS["cuda"])   # for the subgraphs TensorRT does not take
    return chosen + ([CPU] if chosen != [CPU] else [])


def provider_device(providers: list[str], plan_device: str) -> torch.device:
    """Where the torch side keeps tensors: the plan's CUDA device when a GPU provider runs the
    graphs and torch can reach it, else the CPU (onnxruntime then copies at the graph's edge)."""
    if providers[0] in _GPU_PROVIDERS and torch.cuda.is_available():
        return torch.device(plan_device if plan_device.startswith("cuda") else "cuda")
    return torch.device("cpu")


class OnnxStage:
    """A session over one ``.onnx`` artifact: ``stage(*tensors) -> list of output tensors``,
    positionally, as the AOTInductor stages are called."""

    def __init__(self, model: bytes, weights: Mapping[str, torch.Tensor], providers: list[str],
                 device: torch.device, label: str, cache: Path):
        ort = onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3   # errors only: optimizer notes are not the user's business
        # Views of the plan's mapped weights, alive as long as the session. With ORT_ENABLE_ALL
        # onnxruntime re-lays them out into buffers of its own (measured: zero-copy sharing with
        # add_initializer works only with graph optimizations off, ~6x slower on the SD1.5 UNet).
        self._weights = [ort.OrtValue.from_dlpack(t.contiguous()) for t in weights.values()]
        options.add_external_initializers(list(weights), self._weights)
        self._device = device
        try:
            self._session = ort.InferenceSession(model, options, providers=_with_options(providers, device, cache))
        except Exception as exc:   # onnxruntime raises its own Fail/InvalidGraph/... types
            raise PlanError("invalid_plan", f"{label}: onnxruntime cannot load the artifact ({exc})") from exc
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._label = label
        self._ort = ort

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if len(tensors) != len(self._inputs):
            raise PlanError("invalid_plan", f"{self._label}: the artifact takes {len(self._inputs)} inputs",
                            expected=", ".join(self._inputs), found=f"{len(tensors)} tensors")
        binding = self._session.io_binding()
        inputs = [self._ort.OrtValue.from_dlpack(t.to(self._device).contiguous()) for t in tensors]
        for name, value in zip(self._inputs, inputs):
            binding.bind_ortvalue_input(name, value)
        index = self._device.index or 0
        for name in self._outputs:
            binding.bind_output(name, self._device.type, index)
        self._session.run_with_iobinding(binding)
        outputs = binding.get_outputs_as_ortvaluevector()
        return [torch.from_dlpack(outputs.dlpack_at(i)) for i in range(len(self._outputs))]


def _with_options(providers: list[str], device: torch.device, cache: Path) -> list:
    """GPU providers run on torch's current CUDA stream, so no synchronisation is needed; TensorRT
    keeps its engines in kiln's cache folder (building them takes minutes)."""
    if device.type != "cuda":
        return providers
    stream = str(torch.cuda.current_stream(device).cuda_stream)
    options = {"device_id": str(device.index or 0), "user_compute_stream": stream}
    tensorrt = {**options, "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache / "tensorrt")}
    return [(p, tensorrt if p == PROVIDERS["tensorrt"] else options) if p in _GPU_PROVIDERS else p for p in providers]
