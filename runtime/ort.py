"""ONNX plan stages, run by onnxruntime.

An ``.onnx`` artifact carries no weights of its own. A CPU plan's graphs were optimized when the
plan was compiled (kiln.compiler.lower.ort_optimize): their initializers point at their bytes in
the plan file, which onnxruntime maps itself (no copy; pages shared by every stage that stores the
same tensor), and the session opens with graph optimizations off. Other graphs (GPU plans, a stage
the compiler could not optimize, weights stored as fp16) name each initializer, and the session
gets the tensors (``add_external_initializers``, which onnxruntime copies) and optimizes the graph
as it opens. So do a LoRA's patched tensors, in place of the mapped ones. Stages sharing artifact
and weights (both samplers of HiRes fix) share one session. Execution providers are picked per plan:
TensorRT, then CUDA, for a CUDA plan where onnxruntime-gpu offers them (CPU otherwise, with a
notice), CPU for a CPU plan; ``--provider`` forces one and fails clearly where it is missing.

Tensors go in and out through IO binding and DLPack, without copies: on a GPU provider the
torch side (sampler loop) and onnxruntime share torch's CUDA stream, so latents stay on the
device between steps and stages.
"""
from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from kiln.runtime.errors import PlanError

CPU = "CPUExecutionProvider"
# Short names for --provider, in the order a CUDA plan prefers them.
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": CPU}
_GPU_PROVIDERS = (PROVIDERS["tensorrt"], PROVIDERS["cuda"])

# The file name an optimized graph's initializers are read from, written by the compiler in place
# of the plan's name (which changes when the file is renamed) and replaced when the session opens:
# always this long, so replacing it in the serialized graph changes no protobuf length.
PLAN_FILE = "<kiln-plan-file>".ljust(320, "_")
_PROBE = Path(__file__).with_name("nchwc_probe.onnx")   # Conv 16 -> 1 channel, 1x1 filter
_PROBE_FILTER_BYTES = 16 * 4


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


def session_options(ort, *, optimized: bool, prepack: bool = True):
    """Session options for a graph optimized at compile time (``optimized``: nothing left to do)
    or not (onnxruntime applies every optimization, layout ones included, as the session opens).
    ``prepack``: onnxruntime packs each matrix weight for its kernels as the session opens (~1 s
    for the SD1.5 UNet on 2 cores, then each step ~20% faster): worth it for a session that runs
    many images, not for one. onnxruntime's threads are torch's (all cores, or what OMP_NUM_THREADS
    or a Ray replica's CPUs allow), so a process sharing a machine stays within its share."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_DISABLE_ALL if optimized else level.ORT_ENABLE_ALL
    options.log_severity_level = 3   # errors only: optimizer notes are not the user's business
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


@functools.lru_cache(maxsize=None)
def nchwc_block_size() -> int:
    """Channels per NCHWc block of onnxruntime's CPU convolutions here (0: no NCHWc layout; 16
    with AVX-512, 8 with AVX2): what a graph optimized on another machine must have been made for.
    Read off onnxruntime itself: it pads a one-output-channel filter to a whole block."""
    ort = onnxruntime()
    with tempfile.TemporaryDirectory(prefix="kiln-probe-") as tmp:
        options = session_options(ort, optimized=False)
        options.optimized_model_filepath = str(Path(tmp) / "probe.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "probe.bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "0")
        ort.InferenceSession(_PROBE.read_bytes(), options, providers=[CPU])
        data = Path(tmp) / "probe.bin"
        size = data.stat().st_size if data.is_file() else 0
    return size // _PROBE_FILTER_BYTES if size > _PROBE_FILTER_BYTES else 0


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
                 device: torch.device, label: str, cache: Path, *, plan_file: Path | None = None,
                 optimized: bool = False, prepack: bool = True):
        """``weights``: initializers given as tensors (all of them, or a LoRA's patched ones where
        the graph reads the others from ``plan_file``); ``optimized``: the graph was optimized at
        compile time; ``prepack``: see ``session_options``."""
        ort = onnxruntime()
        options = session_options(ort, optimized=optimized, prepack=prepack)
        if plan_file is not None:
            model = model.replace(PLAN_FILE.encode(), _location(plan_file.name).encode())
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(plan_file.resolve().parent))
        # Kept alive with the session, in case onnxruntime uses a tensor in place.
        self._weights = [ort.OrtValue.from_dlpack(t.contiguous()) for t in weights.values()]
        if weights:
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


def _location(name: str) -> str:
    """``name`` as a relative path exactly as long as ``PLAN_FILE`` ("./" repeated in front)."""
    pad = len(PLAN_FILE.encode()) - len(name.encode())
    if pad < 0 or pad == 1:
        raise PlanError("invalid_plan", "the plan's file name is too long to open its graphs",
                        expected=f"at most {len(PLAN_FILE)} bytes", found=f"{len(name.encode())} bytes")
    return ("./" * (pad // 2) if pad % 2 == 0 else ".//" + "./" * ((pad - 3) // 2)) + name
