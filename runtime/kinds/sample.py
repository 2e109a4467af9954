"""``sample`` (KSampler, KSamplerAdvanced): the interpreter's KSampler path
(``kiln.kernels.ksampler.sample_latent``: same schedule, CPU noise, latent scaling and sampler
loops) around the compiled denoiser, which evaluates the UNet on the CFG batch and combines it."""
from __future__ import annotations

from typing import Any, Callable

import torch

from kiln.kernels.cfg import Denoiser, Prediction
from kiln.kernels.inpaint import concat_cond
from kiln.kernels.ksampler import DISABLE, ENABLE, ksampler_schedule, sample_latent
from kiln.kernels.model_sampling import LatentFormat, ModelSamplingDiscrete
from kiln.kernels.samplers import SAMPLER_NAMES
from kiln.kernels.schedules import SCHEDULER_NAMES
from kiln.kernels.sdxl import sdxl_vector, size_options
from kiln.runtime.errors import PlanError
from kiln.runtime.kinds.base import StageKind
from kiln.runtime.prompts import common_length

_SIMPLE = ("denoise",)
_ADVANCED = ("add_noise", "start_at_step", "end_at_step", "return_with_leftover_noise")
# A guided sample stage's conditioning inputs: ``<side>.<entry>.<field>``.
GUIDED_PREFIXES = ("positive.", "negative.")
# Tensors computed from run-time images that the denoiser reads in place of its buffers
# (IP-Adapter embeds, ControlNet hints): ``bound.<env name>``, after the other tensors.
BOUND_PREFIX = "bound."


class CompiledDenoiser(Denoiser):
    """The samplers' denoiser around a compiled one returning (CFG-combined denoised, uncond
    denoised): the prediction comes back combined, with the uncond the CFG++ samplers step on.

    The module's inputs around cfg: the (cond, uncond) contexts before it; after it SDXL's ys,
    the bound tensors and an inpainting UNet's c_concat (built by ``prepare`` once the
    sampler-space latent is known), or for a guided denoiser every conditioning tensor, then the
    bound ones.
    """

    def __init__(self, run: Callable[..., list[torch.Tensor]], model_sampling: ModelSamplingDiscrete,
                 contexts: list[torch.Tensor], extra: list[torch.Tensor], cfg: float, device: torch.device,
                 inpaint: bool):
        self._run = run
        self.model_sampling = model_sampling
        self.cfg = cfg
        self._contexts, self._extra, self._inpaint = contexts, extra, inpaint
        self._cfg = torch.tensor(cfg, dtype=torch.float32, device=device)

    def prepare(self, noise: torch.Tensor, latent_image: torch.Tensor, denoise_mask: torch.Tensor | None) -> None:
        if self._inpaint:   # an inpainting UNet's extra channels: mask and masked latent image
            self._extra = [*self._extra, concat_cond(noise, latent_image, denoise_mask)]

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> Prediction:
        denoised, uncond = self._run(x, sigma, *self._contexts, self._cfg, *self._extra)
        return Prediction(denoised, uncond, self.cfg, combined=True)


def sdxl_y(params: dict, side: str, pooled: torch.Tensor, latent_shape) -> torch.Tensor:
    """SDXL's ``y`` for one side of a sample stage: ``params["<side>_options"]`` (constant size
    options of the conditioning entry) over the latent's size, as the interpreter's guider."""
    sizes = size_options(params[f"{side}_options"], latent_shape[-2], latent_shape[-1])
    return sdxl_vector(pooled.float(), sizes, int(params["embed_dim"]))


class Sample(StageKind):
    """``inputs`` {latent, cond_context, uncond_context, [cond_pooled, uncond_pooled], [noise_mask]}
    (guided: ``<side>.<entry>.<field>`` instead of the contexts) plus any setting that is a runtime
    input; ``outputs`` {samples}: the sampled raw latent."""

    name = "sample"
    compiled = True
    required = ("latent", "cond_context", "uncond_context")
    optional = ("cond_pooled", "uncond_pooled", "noise_mask")
    settings = ("sampler_name", "scheduler", "steps", "cfg", "seed", "prediction", "scale_factor", "latent_channels")
    outputs = ("samples",)
    shown = ("sampler_name", "scheduler", "steps", "cfg", "denoise", "prediction", "start_at_step", "end_at_step",
             "inpaint")

    def signature(self, stage):
        required, optional = self.required, self.optional
        if stage.params.get("guided"):   # conditioning tensors by entry instead of the two contexts
            required = ("latent",)
            optional = optional + tuple(n for n in stage.inputs if n.startswith(GUIDED_PREFIXES))
        optional = optional + tuple(n for n in stage.inputs if n.startswith(BOUND_PREFIX))
        advanced = any(name in stage.inputs or name in stage.params for name in _ADVANCED)
        return required, optional, self.settings + (_ADVANCED if advanced else _SIMPLE)

    def check(self, stage):
        super().check(stage)
        pooled = [name for name in ("cond_pooled", "uncond_pooled") if name in stage.inputs]
        if pooled and (len(pooled) == 1 or not isinstance(stage.params.get("sdxl"), dict)):
            raise PlanError("invalid_plan", f"{stage.describe()} needs cond_pooled, uncond_pooled and the sdxl "
                            "param together")
        self.check_choice(stage, "sampler_name", SAMPLER_NAMES)
        self.check_choice(stage, "scheduler", SCHEDULER_NAMES)
        for name in ("add_noise", "return_with_leftover_noise"):
            self.check_choice(stage, name, (ENABLE, DISABLE))

    def run(self, stage, args, ctx):
        _, _, settings = self.signature(stage)
        values = {name: self.setting(stage, args, name) for name in settings}
        model_sampling = ModelSamplingDiscrete(values["prediction"])
        sigmas, add_noise = ksampler_schedule(model_sampling, values)
        latent = args["latent"].cpu()
        device = ctx.device
        if stage.params.get("guided"):   # every conditioning tensor, in stage order, after cfg
            contexts = []
            extra = [args[name].to(device) for name in stage.inputs if name.startswith(GUIDED_PREFIXES)]
        else:
            contexts, extra = [args[name].to(device) for name in ("cond_context", "uncond_context")], []
        if "max_context_tokens" in stage.params:   # a runtime prompt: the denoiser takes equal lengths
            contexts = common_length(contexts, int(stage.params["max_context_tokens"]), stage.describe())
        if "sdxl" in stage.params:   # y from each side's pooled text and the sizes of this latent
            extra += [sdxl_y(stage.params["sdxl"], side, args[f"{side}_pooled"], latent.shape).to(device)
                      for side in ("cond", "uncond")]
        extra += [args[name].to(device) for name in stage.inputs if name.startswith(BOUND_PREFIX)]
        model = CompiledDenoiser(ctx.compiled[stage.name], model_sampling, contexts, extra, float(values["cfg"]),
                                 device, inpaint=bool(stage.params.get("inpaint")))
        callback = None
        if ctx.on_step is not None or ctx.on_preview is not None:
            def callback(step: int, denoised: torch.Tensor, x: torch.Tensor, total: int) -> None:
                if ctx.on_preview is not None:
                    ctx.on_preview(stage.name, denoised, float(values["scale_factor"]))
                if ctx.on_step is not None:
                    ctx.on_step(stage.name, step + 1, total)

        latent_format = LatentFormat("plan", float(values["scale_factor"]), int(values["latent_channels"]))
        samples = sample_latent(model, latent_format, latent, sampler_name=values["sampler_name"], sigmas=sigmas,
                                seed=int(values["seed"]), device=device, add_noise=add_noise,
                                batch_index=stage.params.get("batch_index"), noise_mask=args.get("noise_mask"),
                                prepare=model.prepare, callback=callback,
                                step_mode=ctx.settings.step_mode(reference=False), on_model_call=ctx.on_model_call)
        return {"samples": samples.cpu()}

    def example_outputs(self, stage, inputs, *, module, min_batch, device):
        latent = inputs["latent"]
        shape = [max(min_batch, latent.shape[0]), *latent.shape[1:]]
        return {"samples": torch.zeros(shape, dtype=torch.float32, device=device)}

    def describe(self, stage):
        line = super().describe(stage)
        if "sdxl" in stage.params:
            line = ", ".join(filter(None, (line, "sdxl size conditioning built at run time")))
        return line
