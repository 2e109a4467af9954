"""Executors for the five stage kinds (docs/plans.md, "Stage kinds").

``sample`` reproduces the interpreter's KSampler path (kiln.nodes.sampling.common_ksampler +
Guider.sample) step for step: same sigmas (kiln.kernels.schedules), same CPU noise
(kiln.kernels.noise.prepare_noise), same latent scaling and the same
kiln.kernels.ksampler.ksampler_sample loop; only the guided model call is the compiled
denoiser, which evaluates the UNet on the CFG batch and combines it.

A setting of a stage (``seed``, ``steps``, ``width``...) is read from the stage's inputs when
it is a runtime input there, else from its ``params``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from kiln.kernels.batching import prepare_mask
from kiln.kernels.clip_bpe import ClipBpe
from kiln.kernels.inpaint import concat_cond
from kiln.kernels.ksampler import ksampler_sample
from kiln.kernels.model_sampling import LatentFormat, ModelSamplingDiscrete
from kiln.kernels.noise import prepare_noise
from kiln.kernels.samplers import SAMPLER_NAMES
from kiln.kernels.schedules import SCHEDULER_NAMES, advanced_sigmas, ksampler_sigmas
from kiln.kernels.sdxl import sdxl_vector, size_options
from kiln.runtime.errors import PlanError
from kiln.runtime.images import write_pngs, write_previews
from kiln.runtime.manifest import RUNTIME_INPUT_PREFIX, Manifest, StageSpec, input_env_name
from kiln.runtime.prompts import common_length, tokenize_prompt

# (stage-local tensor inputs required, optional ones, settings: input or param)
_SAMPLE_SETTINGS = ("sampler_name", "scheduler", "steps", "cfg", "seed", "prediction", "scale_factor", "advanced")
_SIGNATURES: dict[str, tuple[tuple, tuple, tuple]] = {
    "tokenize": ((), (), ("text", "pad_tokens", "max_chunks", "vocabulary")),
    "sample": (("latent", "cond_context", "uncond_context"), ("cond_pooled", "uncond_pooled", "noise_mask"),
               _SAMPLE_SETTINGS),
    "module": ((), (), ()),
    "save_image": (("images",), (), ()),   # + filename_prefix, unless a preview
    "empty_latent": ((), (), ("width", "height", "batch_size", "channels")),
}
# Outputs per kind (module: any).
_OUTPUTS = {"tokenize": ("tokens",), "sample": ("samples",), "save_image": (), "empty_latent": ("samples",)}
_SIMPLE_SAMPLER = ("denoise",)
_GUIDED_PREFIXES = ("positive.", "negative.")   # a guided sample stage's conditioning inputs
_ADVANCED_SAMPLER = ("add_noise", "start_at_step", "end_at_step", "return_with_leftover_noise")
_ENABLE = ("enable", "disable")   # KSamplerAdvanced's widget values, kept as ComfyUI spells them


@dataclass
class StageContext:
    """What stages share during one plan run."""

    device: torch.device
    compiled: Mapping[str, Callable[..., list[torch.Tensor]]]   # stage name -> compiled artifact
    output_dir: str
    prompt: dict | None                                          # embedded into saved PNGs
    on_step: Callable[[str, int, int], None] | None = None       # (stage name, step, total)
    tokenizers: Mapping[str, ClipBpe] = field(default_factory=dict)  # vocabulary member -> tokenizer
    saved: list[str] = field(default_factory=list)
    previews: list[str] = field(default_factory=list)


def check_stage(stage: StageSpec) -> None:
    """Refuse a stage whose inputs or settings do not fit its kind (a compiler bug, said clearly)."""
    required, optional, settings = _SIGNATURES[stage.kind]
    if stage.kind == "sample":
        settings = settings + (_ADVANCED_SAMPLER if stage.params.get("advanced") else _SIMPLE_SAMPLER)
        if stage.params.get("guided"):   # conditioning tensors by entry instead of the two contexts
            required = ("latent",)
            optional = optional + tuple(n for n in stage.inputs if n.startswith(_GUIDED_PREFIXES))
    missing = [name for name in required if name not in stage.inputs]
    missing += [name for name in settings if name not in stage.inputs and name not in stage.params]
    if missing:
        raise PlanError("invalid_plan", f"{stage.describe()} lacks {', '.join(missing)}")
    if stage.kind != "module":
        unknown = [name for name in stage.inputs if name not in required + optional + settings]
        unknown += [name for name in stage.outputs if name not in _OUTPUTS[stage.kind]]
        if unknown:
            raise PlanError("invalid_plan", f"{stage.describe()} has inputs or outputs its kind does not take: "
                            f"{', '.join(unknown)}")
    if stage.kind == "save_image" and not stage.params.get("preview") and "filename_prefix" not in stage.params:
        raise PlanError("invalid_plan", f"{stage.describe()} lacks filename_prefix")
    if stage.kind == "module" and not stage.outputs:
        raise PlanError("invalid_plan", f"{stage.describe()} has no outputs")
    if stage.kind == "sample":
        pooled = [name for name in ("cond_pooled", "uncond_pooled") if name in stage.inputs]
        if pooled and (len(pooled) == 1 or not isinstance(stage.params.get("sdxl"), dict)):
            raise PlanError("invalid_plan", f"{stage.describe()} needs cond_pooled, uncond_pooled and the sdxl "
                            "param together")
        _check_choice(stage, "sampler_name", SAMPLER_NAMES)
        _check_choice(stage, "scheduler", SCHEDULER_NAMES)
        for name in ("add_noise", "return_with_leftover_noise"):
            _check_choice(stage, name, _ENABLE)


def check_dataflow(manifest: Manifest, constant_names) -> None:
    """Each stage is well formed and reads only values that exist by the time it runs."""
    available = set(constant_names) | {input_env_name(spec.name) for spec in manifest.inputs}
    for stage in manifest.stages:
        check_stage(stage)
        for env_name in stage.inputs.values():
            if env_name not in available:
                raise PlanError("invalid_plan", f"{stage.describe()} reads {env_name!r}, which no constant, "
                                "runtime input or earlier stage provides")
        available.update(stage.outputs.values())


def _check_choice(stage: StageSpec, name: str, choices) -> None:
    if name in stage.params and stage.params[name] not in choices:
        raise PlanError("invalid_plan", f"{stage.describe()} has an unknown {name}",
                        expected=f"one of {', '.join(choices)}", found=repr(stage.params[name]))


def run_stage(stage: StageSpec, args: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Run one stage on its inputs (stage-local names); returns its outputs by stage-local name."""
    return _EXECUTORS[stage.kind](stage, args, ctx)


def _setting(stage: StageSpec, args: dict[str, Any], name: str) -> Any:
    value = args[name] if name in args else stage.params[name]
    return value.item() if isinstance(value, torch.Tensor) else value


# --- tokenize -----------------------------------------------------------------------------
def _tokenize(stage: StageSpec, args: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """A runtime prompt -> packed weighted tokens for the compiled CLIPTextEncode that follows."""
    source = stage.inputs.get("text", "")
    input_name = source[len(RUNTIME_INPUT_PREFIX):] if source.startswith(RUNTIME_INPUT_PREFIX) else "text"
    tokens = tokenize_prompt(str(_setting(stage, args, "text")), ctx.tokenizers[stage.params["vocabulary"]],
                             [int(t) for t in stage.params["pad_tokens"]], int(stage.params["max_chunks"]), input_name)
    return {"tokens": tokens}


# --- sample -------------------------------------------------------------------------------
class CompiledDenoiser:
    """The guided model call ``model(x, sigma, model_options=, seed=) -> denoised`` the samplers
    expect, around a compiled denoiser returning (CFG-combined denoised, uncond denoised).

    ``sampler_post_cfg_function`` hooks (the cfg++ samplers' uncond capture) run here, on the
    returned pair, as ComfyUI's cfg_function runs them; hooks get every argument but
    ``cond_denoised``, which the compiled module does not return. ``predict`` serves the fused
    sampler loops (kiln.kernels.fused) on CUDA: the CFG combine is already fused into the
    compiled module, so it hands back the combined prediction and no uncond.
    """

    combined_prediction = True

    def __init__(self, run: Callable[..., list[torch.Tensor]], model_sampling: ModelSamplingDiscrete,
                 contexts: list[torch.Tensor], extra: list[torch.Tensor], cfg: float, device: torch.device):
        self._run = run
        self.model_sampling = model_sampling
        self.cfg = cfg
        # The module's inputs around cfg: (cond, uncond) contexts before it; after it SDXL's ys and
        # an inpainting UNet's c_concat, or for a guided denoiser every conditioning tensor.
        self._contexts, self._extra = contexts, extra
        self._cfg = torch.tensor(cfg, dtype=torch.float32, device=device)

    def _call(self, x: torch.Tensor, sigma: torch.Tensor) -> list[torch.Tensor]:
        return self._run(x, sigma, *self._contexts, self._cfg, *self._extra)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict | None = None,
                 seed: int | None = None, **_: object) -> torch.Tensor:
        denoised, uncond_denoised = self._call(x, sigma)
        options = model_options or {}
        for hook in options.get("sampler_post_cfg_function", []):
            denoised = hook({"denoised": denoised, "uncond_denoised": uncond_denoised, "sigma": sigma,
                             "model_options": options, "input": x})
        return denoised

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> tuple[torch.Tensor, None]:
        denoised, _ = self._call(x, sigma)
        return denoised, None


def _sample(stage: StageSpec, args: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    setting = lambda name: _setting(stage, args, name)  # noqa: E731
    sampler_name, scheduler, steps = setting("sampler_name"), setting("scheduler"), int(setting("steps"))
    model_sampling = ModelSamplingDiscrete(setting("prediction"))
    if setting("advanced"):
        sigmas = ksampler_sigmas(model_sampling, sampler_name, scheduler, steps, 1.0)
        sigmas = advanced_sigmas(sigmas, int(setting("start_at_step")), int(setting("end_at_step")),
                                 setting("return_with_leftover_noise") == "enable")
        add_noise = setting("add_noise") == "enable"
    else:
        sigmas = ksampler_sigmas(model_sampling, sampler_name, scheduler, steps, float(setting("denoise")))
        add_noise = True
    latent = args["latent"].cpu()
    seed = int(setting("seed"))
    if add_noise:
        noise = prepare_noise(latent, seed, stage.params.get("batch_index"))
    else:
        noise = torch.zeros(latent.size(), dtype=latent.dtype, layout=latent.layout, device="cpu")
    if sigmas.shape[-1] == 0:   # nothing to sample: the latent comes back unchanged
        return {"samples": latent}

    device = ctx.device
    latent_format = LatentFormat("plan", float(setting("scale_factor")))
    noise = noise.to(device=device, dtype=torch.float32)
    x0 = latent.to(device=device, dtype=torch.float32)
    sigmas = sigmas.to(device)
    mask = args.get("noise_mask")
    denoise_mask = None if mask is None else prepare_mask(mask, x0.shape).to(device)
    if torch.count_nonzero(x0) > 0:   # ComfyUI leaves the empty latent unscaled
        x0 = latent_format.process_in(x0)
    if stage.params.get("guided"):   # every conditioning tensor, in stage order, after cfg
        contexts, extra = [], [args[name].to(device) for name in stage.inputs if name.startswith(_GUIDED_PREFIXES)]
    else:
        contexts, extra = [args[name].to(device) for name in ("cond_context", "uncond_context")], []
    if "max_context_tokens" in stage.params:   # a runtime prompt: the denoiser takes equal lengths
        contexts = common_length(contexts, int(stage.params["max_context_tokens"]), stage.describe())
    if "sdxl" in stage.params:   # y from each side's pooled text and the sizes of this latent
        extra += [sdxl_y(stage.params["sdxl"], side, args[f"{side}_pooled"], latent.shape).to(device)
                  for side in ("cond", "uncond")]
    if stage.params.get("inpaint"):   # an inpainting UNet's extra channels: mask and masked latent image
        extra.append(concat_cond(noise, x0, denoise_mask))
    model = CompiledDenoiser(ctx.compiled[stage.name], model_sampling, contexts, extra, float(setting("cfg")), device)

    callback = None
    if ctx.on_step is not None:
        def callback(step: int, denoised: torch.Tensor, x: torch.Tensor, total: int) -> None:
            ctx.on_step(stage.name, step + 1, total)

    samples = ksampler_sample(model, sampler_name, sigmas, noise, x0, seed=seed, denoise_mask=denoise_mask,
                              callback=callback, model_options={})
    return {"samples": latent_format.process_out(samples.to(torch.float32)).cpu()}


def sdxl_y(params: dict, side: str, pooled: torch.Tensor, latent_shape) -> torch.Tensor:
    """SDXL's ``y`` for one side of a sample stage: ``params["<side>_options"]`` (constant size
    options of the conditioning entry) over the latent's size, as the interpreter's guider."""
    sizes = size_options(params[f"{side}_options"], latent_shape[-2], latent_shape[-1])
    return sdxl_vector(pooled.float(), sizes, int(params["embed_dim"]))


# --- module, save_image, empty_latent ----------------------------------------------------
def _module(stage: StageSpec, args: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    outputs = ctx.compiled[stage.name](*(_as_tensor(args[name], ctx.device) for name in stage.inputs))
    if len(outputs) != len(stage.outputs):
        raise PlanError("invalid_plan", f"{stage.describe()}: the artifact returned {len(outputs)} values",
                        expected=f"{len(stage.outputs)} ({', '.join(stage.outputs)})", found=str(len(outputs)))
    return dict(zip(stage.outputs, outputs))


def _as_tensor(value: Any, device: torch.device) -> torch.Tensor:
    """Runtime scalars reach compiled modules as 0-d tensors (int64 / float32 / bool)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, bool):
        return torch.tensor(value, device=device)
    dtype = torch.int64 if isinstance(value, int) else torch.float32
    return torch.tensor(value, dtype=dtype, device=device)


def _save_image(stage: StageSpec, args: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """SaveImage's files, or PreviewImage's temp previews (``params.preview``)."""
    if stage.params.get("preview"):
        ctx.previews.extend(write_previews(args["images"], ctx.output_dir, ctx.prompt, None))
    else:
        ctx.saved.extend(write_pngs(args["images"], str(_setting(stage, args, "filename_prefix")), ctx.output_dir,
                                    ctx.prompt, None, compress_level=4))
    return {}


def _empty_latent(stage: StageSpec, args: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """EmptyLatentImage: zeros at 1/8 of the pixel size (floored), on the CPU as ComfyUI."""
    width, height, batch, channels = (int(_setting(stage, args, name))
                                      for name in ("width", "height", "batch_size", "channels"))
    return {"samples": torch.zeros([batch, channels, height // 8, width // 8])}


_EXECUTORS: dict[str, Callable[[StageSpec, dict[str, Any], StageContext], dict[str, Any]]] = {
    "tokenize": _tokenize, "sample": _sample, "module": _module, "save_image": _save_image,
    "empty_latent": _empty_latent,
}
