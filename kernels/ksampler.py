"""ComfyUI's KSampler below the node: schedule, noise, latent scaling, start noise, inpaint
blending and the sampler call (``nodes.py: common_ksampler``, ``comfy/sample.py``,
``comfy/samplers.py: CFGGuider.sample`` and ``KSAMPLER.sample``).

One copy for the KSampler nodes (driving the interpreter's guider) and a plan's sample stage
(driving the compiled denoiser), so plans cannot drift from the interpreter.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from kiln.kernels.batching import prepare_mask, repeat_to_batch_size
from kiln.kernels.cfg import Denoiser, Prediction
from kiln.kernels.fused.dispatch import DEFAULT_MODE
from kiln.kernels.model_sampling import LatentFormat
from kiln.kernels.noise import prepare_noise
from kiln.kernels.samplers import get_sampler
from kiln.kernels.samplers.stepper import STEP_MODE
from kiln.kernels.schedules import advanced_sigmas, ksampler_sigmas

# ComfyUI builds "ddim" as euler with inpaint_options={"random": True}: the noise that re-noises
# the kept region of an inpainted latent is drawn from seed + 1 instead of reusing the start noise.
RANDOM_INPAINT_NOISE_SAMPLERS = frozenset({"ddim"})
# KSamplerAdvanced's switches, spelled as its widgets spell them.
ENABLE, DISABLE = "enable", "disable"

# callback(step, denoised, x, total_steps), called before step ``step`` updates x.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, int], None]
# Called before each evaluation of the denoiser (a benchmark's count of model calls).
ModelCall = Callable[[], None]
# prepare(noise, latent_image, denoise_mask): what the denoiser resolves once per run, in
# sampler space (the guider's conditioning, an inpainting UNet's extra channels).
Prepare = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None]


def ksampler_schedule(model_sampling, settings: Mapping[str, Any]) -> tuple[torch.Tensor, bool]:
    """(sigmas, whether to add noise) for KSampler's settings (sampler_name, scheduler, steps,
    denoise) or KSamplerAdvanced's (sampler_name, scheduler, steps, add_noise, start_at_step,
    end_at_step, return_with_leftover_noise)."""
    sampler_name, scheduler, steps = settings["sampler_name"], settings["scheduler"], int(settings["steps"])
    if "start_at_step" not in settings:
        return ksampler_sigmas(model_sampling, sampler_name, scheduler, steps, float(settings["denoise"])), True
    sigmas = ksampler_sigmas(model_sampling, sampler_name, scheduler, steps, 1.0)
    sigmas = advanced_sigmas(sigmas, int(settings["start_at_step"]), int(settings["end_at_step"]),
                             settings["return_with_leftover_noise"] == ENABLE)
    return sigmas, settings["add_noise"] == ENABLE


def sample_latent(model: Denoiser, latent_format: LatentFormat, latent: torch.Tensor, *, sampler_name: str,
                  sigmas: torch.Tensor, seed: int, device: torch.device | str, add_noise: bool = True,
                  batch_index=None, noise_mask: torch.Tensor | None = None, prepare: Prepare | None = None,
                  callback: StepCallback | None = None, step_mode: str = DEFAULT_MODE,
                  on_model_call: ModelCall | None = None) -> torch.Tensor:
    """A raw LATENT's ``samples`` sampled over ``sigmas``: raw latent out, on ``device``.

    One CPU noise draw for the batch (per-item draws with ``batch_index``), none without
    ``add_noise``; an all-zero latent with another channel count is widened to the model's and
    left unscaled; ``noise_mask`` becomes the denoise mask; ``prepare`` runs once on the
    sampler-space latent before the first step.
    """
    channels = latent_format.channels
    if latent.shape[1] != channels and torch.count_nonzero(latent) == 0:
        latent = repeat_to_batch_size(latent, channels, dim=1)
    if add_noise:
        noise = prepare_noise(latent, seed, batch_index)
    else:
        noise = torch.zeros(latent.size(), dtype=latent.dtype, layout=latent.layout, device="cpu")
    if sigmas.shape[-1] == 0:   # nothing to sample: the latent comes back unchanged
        return latent
    noise = noise.to(device=device, dtype=torch.float32)
    x0 = latent.to(device=device, dtype=torch.float32)
    sigmas = sigmas.to(device)
    denoise_mask = None if noise_mask is None else prepare_mask(noise_mask, x0.shape).to(device)
    if torch.count_nonzero(x0) > 0:   # ComfyUI: "Don't shift the empty latent image."
        x0 = latent_format.process_in(x0)
    if prepare is not None:
        prepare(noise, x0, denoise_mask)
    samples = ksampler_sample(model, sampler_name, sigmas, noise, x0, seed=seed, denoise_mask=denoise_mask,
                              callback=callback, step_mode=step_mode, on_model_call=on_model_call)
    return latent_format.process_out(samples.to(torch.float32))


def start_latent(model_sampling, sigmas: torch.Tensor, noise: torch.Tensor,
                 latent_image: torch.Tensor) -> torch.Tensor:
    """x at ``sigmas[0]``: ``noise*sqrt(1+s0^2)`` when the schedule starts at sigma_max, else
    ``noise*s0``; plus the latent."""
    return model_sampling.noise_scaling(sigmas[0], noise, latent_image, model_sampling.is_max_denoise(sigmas))


class InpaintDenoiser(Denoiser):
    """ComfyUI's ``KSamplerX0Inpaint``: with a denoise mask, the kept region (mask 0) is replaced by
    the original latent noised to the current sigma before the model call, and by the original
    latent itself in the returned prediction, so only the masked region is generated. The blend
    applies to the guided prediction, so the prediction comes back combined (the CFG++ samplers
    still get the raw negative one, as ComfyUI's post-CFG hook sees it)."""

    def __init__(self, model: Denoiser, latent_image: torch.Tensor, noise: torch.Tensor,
                 on_call: ModelCall | None = None):
        self.inner_model = model
        self.latent_image = latent_image
        self.noise = noise
        self.on_call = on_call

    @property
    def model_sampling(self):
        return self.inner_model.model_sampling

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, *, denoise_mask: torch.Tensor | None = None,
                **extra_args) -> Prediction:
        if self.on_call is not None:
            self.on_call()
        if denoise_mask is None:
            return self.inner_model.predict(x, sigma, **extra_args)
        latent_mask = 1.0 - denoise_mask
        sigma_b = sigma.reshape([sigma.shape[0]] + [1] * (self.noise.ndim - 1))
        kept = self.model_sampling.noise_scaling(sigma_b, self.noise, self.latent_image)
        x = x * denoise_mask + kept * latent_mask
        inner = self.inner_model.predict(x, sigma, **extra_args)
        denoised = inner.denoised * denoise_mask + self.latent_image * latent_mask
        return Prediction(denoised, inner.uncond, inner.scale, combined=True)


def ksampler_sample(model: Denoiser, sampler_name: str, sigmas: torch.Tensor, noise: torch.Tensor,
                    latent_image: torch.Tensor, *, seed: int, denoise_mask: torch.Tensor | None = None,
                    callback: StepCallback | None = None, step_mode: str = DEFAULT_MODE,
                    on_model_call: ModelCall | None = None) -> torch.Tensor:
    """Run ``sampler_name`` over ``sigmas`` from ``noise`` around ``latent_image`` (sampler space).

    ``denoise_mask`` must already have the latent's shape (see ``kiln.kernels.batching.prepare_mask``).
    ``seed`` is forwarded as ``extra_args["seed"]``; ancestral/SDE noise samplers seed from it.
    """
    inpaint_noise = noise
    if denoise_mask is not None and sampler_name in RANDOM_INPAINT_NOISE_SAMPLERS:
        # torch.manual_seed (the global generator, as ComfyUI), drawn on the CPU.
        generator = torch.manual_seed(seed + 1)
        inpaint_noise = torch.randn(noise.shape, generator=generator, device="cpu").to(noise.dtype).to(noise.device)
    denoiser = InpaintDenoiser(model, latent_image, inpaint_noise, on_model_call)

    x = start_latent(model.model_sampling, sigmas, noise, latent_image)
    extra_args = {"seed": seed, "denoise_mask": denoise_mask, STEP_MODE: step_mode}

    k_callback = None
    if callback is not None:
        total_steps = len(sigmas) - 1

        def k_callback(state: dict) -> None:
            callback(state["i"], state["denoised"], state["x"], total_steps)

    samples = get_sampler(sampler_name)(denoiser, x, sigmas, extra_args=extra_args, callback=k_callback)
    return model.model_sampling.inverse_noise_scaling(sigmas[-1], samples)
