"""ComfyUI's ``KSAMPLER.sample`` (comfy/samplers.py): start noise, inpaint blending, the sampler call.

Everything here works in sampler space: ``latent_image`` has already been through the
model's ``process_latent_in`` (or is the all-zero empty latent, which ComfyUI leaves alone).
``model`` is any denoiser ``model(x, sigma, **extra_args) -> denoised`` with ``.model_sampling``.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from kiln.kernels.samplers import get_sampler

# ComfyUI builds "ddim" as euler with inpaint_options={"random": True}: the noise that re-noises
# the kept region of an inpainted latent is drawn from seed + 1 instead of reusing the start noise.
RANDOM_INPAINT_NOISE_SAMPLERS = frozenset({"ddim"})

# callback(step, denoised, x, total_steps), called before step ``step`` updates x.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, int], None]


def start_latent(model_sampling, sigmas: torch.Tensor, noise: torch.Tensor,
                 latent_image: torch.Tensor) -> torch.Tensor:
    """x at ``sigmas[0]``: ``noise*sqrt(1+s0^2)`` when the schedule starts at sigma_max, else ``noise*s0``; plus the latent."""
    return model_sampling.noise_scaling(sigmas[0], noise, latent_image, model_sampling.is_max_denoise(sigmas))


class InpaintDenoiser:
    """ComfyUI's ``KSamplerX0Inpaint``: with a denoise mask, the kept region (mask 0) is replaced by
    the original latent noised to the current sigma before the model call, and by the original
    latent itself in the returned prediction, so only the masked region is generated."""

    def __init__(self, model, latent_image: torch.Tensor, noise: torch.Tensor):
        self.inner_model = model
        self.latent_image = latent_image
        self.noise = noise

    @property
    def model_sampling(self):
        return self.inner_model.model_sampling

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, denoise_mask: torch.Tensor | None = None,
                 model_options: dict | None = None, seed: int | None = None) -> torch.Tensor:
        if denoise_mask is None:
            return self.inner_model(x, sigma, model_options=model_options, seed=seed)
        latent_mask = 1.0 - denoise_mask
        sigma_b = sigma.reshape([sigma.shape[0]] + [1] * (self.noise.ndim - 1))
        kept = self.model_sampling.noise_scaling(sigma_b, self.noise, self.latent_image)
        x = x * denoise_mask + kept * latent_mask
        out = self.inner_model(x, sigma, model_options=model_options, seed=seed)
        return out * denoise_mask + self.latent_image * latent_mask


def ksampler_sample(model, sampler_name: str, sigmas: torch.Tensor, noise: torch.Tensor,
                    latent_image: torch.Tensor, *, seed: int, denoise_mask: torch.Tensor | None = None,
                    callback: StepCallback | None = None, model_options: dict | None = None) -> torch.Tensor:
    """Run ``sampler_name`` over ``sigmas`` from ``noise`` around ``latent_image`` (sampler space).

    ``denoise_mask`` must already have the latent's shape (see ``kiln.kernels.batching.prepare_mask``).
    ``seed`` is forwarded as ``extra_args["seed"]``; ancestral/SDE noise samplers seed from it.
    """
    inpaint_noise = noise
    if denoise_mask is not None and sampler_name in RANDOM_INPAINT_NOISE_SAMPLERS:
        # torch.manual_seed (the global generator, as ComfyUI), drawn on the CPU.
        generator = torch.manual_seed(seed + 1)
        inpaint_noise = torch.randn(noise.shape, generator=generator, device="cpu").to(noise.dtype).to(noise.device)
    denoiser = InpaintDenoiser(model, latent_image, inpaint_noise)

    x = start_latent(model.model_sampling, sigmas, noise, latent_image)
    extra_args = {"model_options": dict(model_options or {}), "seed": seed, "denoise_mask": denoise_mask}

    k_callback = None
    if callback is not None:
        total_steps = len(sigmas) - 1

        def k_callback(state: dict) -> None:
            callback(state["i"], state["denoised"], state["x"], total_steps)

    fused = fused_loop(model, sampler_name, x, denoise_mask, extra_args["model_options"])
    if fused is not None:
        samples = fused(model, x, sigmas, extra_args, callback=k_callback)
    else:
        samples = get_sampler(sampler_name)(denoiser, x, sigmas, extra_args=extra_args, callback=k_callback)
    return model.model_sampling.inverse_noise_scaling(sigmas[-1], samples)


def fused_loop(model, sampler_name: str, x: torch.Tensor, denoise_mask: torch.Tensor | None,
               model_options: dict) -> Callable | None:
    """The fused sampler loop (kiln.kernels.fused) to run instead of the eager sampler, or None.

    Only for a model offering ``predict`` (a compiled plan's denoiser), and only where a Triton
    kernel would run: on CUDA, or where ``KILN_FUSED=triton`` asks for the kernels anyway (tests
    run them interpreted on the CPU). Elsewhere the kernels' twins would compute exactly the eager
    samplers' numbers, so Triton is not even imported. Never with an inpaint mask (the fused loops
    call the model directly), CFG hooks, KILN_FUSED=off, or a cfg++ sampler for a model whose
    prediction comes CFG-combined (``combined_prediction``: those loops need the uncond one).
    """
    if not hasattr(model, "predict") or denoise_mask is not None:
        return None
    if not x.is_cuda and os.environ.get("KILN_FUSED") != "triton":
        return None
    from kiln.kernels.fused.dispatch import backend
    from kiln.kernels.fused.loop import fusable_options
    from kiln.kernels.fused.samplers import get_fused_sampler

    if backend(x) == "twin" or not fusable_options(model_options):
        return None
    if getattr(model, "combined_prediction", False) and "cfg_pp" in sampler_name:
        return None
    return get_fused_sampler(sampler_name)
