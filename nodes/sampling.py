"""KSampler and KSamplerAdvanced (nodes.py: ``common_ksampler``).

Noise, schedule and guidance follow ComfyUI: one CPU noise draw for the batch (per-item
draws when the latent carries ``batch_index``), the KSampler's sigma schedule, CFG through
:class:`kiln.nodes.guider.Guider`. The returned LATENT is the input dict with new samples.
"""
from __future__ import annotations

import torch

from kiln.kernels.noise import prepare_noise
from kiln.kernels.samplers import SAMPLER_NAMES
from kiln.kernels.schedules import SCHEDULER_NAMES, advanced_sigmas, ksampler_sigmas
from kiln.kernels.batching import repeat_to_batch_size
from kiln.nodes.guider import Guider
from kiln.nodes.registry import COMBO, FLOAT, INT, SOCKET, RunContext, node

_STEPS_CFG_SAMPLER = (
    INT("steps", 20, 1, 10000),
    FLOAT("cfg", 8.0, 0.0, 100.0, 0.1, round=0.01),
    COMBO("sampler_name", SAMPLER_NAMES, SAMPLER_NAMES[0]),
    COMBO("scheduler", SCHEDULER_NAMES, SCHEDULER_NAMES[0]),
    SOCKET("positive", "CONDITIONING"),
    SOCKET("negative", "CONDITIONING"),
    SOCKET("latent_image", "LATENT"),
)
_SEED_MAX = 0xffffffffffffffff


def _fix_empty_latent_channels(model, latent: torch.Tensor) -> torch.Tensor:
    """An all-zero latent with the wrong channel count is widened to the model's latent channels."""
    channels = model.latent_format.channels
    if latent.shape[1] != channels and torch.count_nonzero(latent) == 0:
        latent = repeat_to_batch_size(latent, channels, dim=1)
    return latent


def common_ksampler(ctx: RunContext, model, seed: int, cfg: float, sampler_name: str, sigmas: torch.Tensor,
                    positive: list, negative: list, latent: dict, disable_noise: bool = False) -> tuple:
    """Sample ``latent`` over ``sigmas``; progress goes to ``ctx.progress(step, total)``."""
    latent_image = _fix_empty_latent_channels(model, latent["samples"])
    if disable_noise:
        noise = torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout, device="cpu")
    else:
        noise = prepare_noise(latent_image, seed, latent.get("batch_index"))

    callback = None
    if ctx.progress is not None:
        def callback(step: int, denoised: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
            ctx.progress(step + 1, total_steps)

    guider = Guider(model, positive, negative, cfg)
    samples = guider.sample(noise, latent_image, sampler_name, sigmas, seed=seed,
                            noise_mask=latent.get("noise_mask"), callback=callback)
    return ({**latent, "samples": samples.cpu()},)


@node("KSampler",
      [SOCKET("model", "MODEL"), INT("seed", 0, 0, _SEED_MAX), *_STEPS_CFG_SAMPLER, FLOAT("denoise", 1.0, 0.0, 1.0, 0.01)],
      ["LATENT"], category="sampling", seeded=True, foldable=False, needs_context=True)
def ksampler(ctx: RunContext, *, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
             positive: list, negative: list, latent_image: dict, denoise: float) -> tuple:
    """Denoise ``latent_image`` from noise level ``denoise`` (1.0 = from pure noise) in ``steps`` steps."""
    sigmas = ksampler_sigmas(model.model_sampling, sampler_name, scheduler, steps, denoise)
    return common_ksampler(ctx, model, seed, cfg, sampler_name, sigmas, positive, negative, latent_image)


@node("KSamplerAdvanced",
      [SOCKET("model", "MODEL"), COMBO("add_noise", ("enable", "disable"), "enable"), INT("noise_seed", 0, 0, _SEED_MAX),
       *_STEPS_CFG_SAMPLER, INT("start_at_step", 0, 0, 10000), INT("end_at_step", 10000, 0, 10000),
       COMBO("return_with_leftover_noise", ("disable", "enable"), "disable")],
      ["LATENT"], category="sampling", seeded=True, foldable=False, needs_context=True)
def ksampler_advanced(ctx: RunContext, *, model, add_noise: str, noise_seed: int, steps: int, cfg: float,
                      sampler_name: str, scheduler: str, positive: list, negative: list, latent_image: dict,
                      start_at_step: int, end_at_step: int, return_with_leftover_noise: str) -> tuple:
    """Run only steps ``start_at_step .. end_at_step`` of a ``steps``-step schedule (chained samplers)."""
    sigmas = ksampler_sigmas(model.model_sampling, sampler_name, scheduler, steps, 1.0)
    sigmas = advanced_sigmas(sigmas, start_at_step, end_at_step, return_with_leftover_noise == "enable")
    return common_ksampler(ctx, model, noise_seed, cfg, sampler_name, sigmas, positive, negative, latent_image,
                           disable_noise=add_noise == "disable")
