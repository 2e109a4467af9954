"""KSampler and KSamplerAdvanced (nodes.py: ``common_ksampler``).

The schedule, noise, latent scaling and sampler call are ``kiln.kernels.ksampler``'s (shared
with plans); guidance is :class:`kiln.nodes.guider.Guider`. The returned LATENT is the input
dict with new samples.
"""
from __future__ import annotations

from kiln.kernels.ksampler import DISABLE, ENABLE, ksampler_schedule, sample_latent
from kiln.kernels.samplers import SAMPLER_NAMES
from kiln.kernels.schedules import SCHEDULER_NAMES
from kiln.nodes.guider import Guider
from kiln.nodes.registry import COMBO, FLOAT, INT, SOCKET, PlanSpec, RunContext, node

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


def common_ksampler(ctx: RunContext, model, seed: int, cfg: float, settings: dict, positive: list,
                    negative: list, latent: dict) -> tuple:
    """Sample ``latent`` with the schedule ``settings`` describe; progress goes to ``ctx.progress(step, total)``."""
    sigmas, add_noise = ksampler_schedule(model.model_sampling, settings)
    callback = None
    if ctx.progress is not None or ctx.preview is not None:
        def callback(step, denoised, x, total_steps) -> None:
            if ctx.preview is not None:
                ctx.preview(denoised, model.latent_format)
            if ctx.progress is not None:
                ctx.progress(step + 1, total_steps)

    guider = Guider(model, positive, negative, cfg)
    samples = sample_latent(guider, model.latent_format, latent["samples"], sampler_name=settings["sampler_name"],
                            sigmas=sigmas, seed=seed, device=model.device, add_noise=add_noise,
                            batch_index=latent.get("batch_index"), noise_mask=latent.get("noise_mask"),
                            prepare=guider.prepare, callback=callback,
                            step_mode=ctx.settings.step_mode(reference=True), on_model_call=ctx.on_model_call)
    return ({**latent, "samples": samples.cpu()},)


@node("KSampler",
      [SOCKET("model", "MODEL"), INT("seed", 0, 0, _SEED_MAX), *_STEPS_CFG_SAMPLER, FLOAT("denoise", 1.0, 0.0, 1.0, 0.01)],
      ["LATENT"], category="sampling", seed="seed", foldable=False, needs_context=True,
      plan=PlanSpec("sample", runtime_widgets={"seed": "seed", "steps": "steps", "cfg": "cfg", "sampler_name": "sampler_name",
                                               "scheduler": "scheduler", "denoise": "denoise"}))
def ksampler(ctx: RunContext, *, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
             positive: list, negative: list, latent_image: dict, denoise: float) -> tuple:
    """Denoise ``latent_image`` from noise level ``denoise`` (1.0 = from pure noise) in ``steps`` steps."""
    settings = {"sampler_name": sampler_name, "scheduler": scheduler, "steps": steps, "denoise": denoise}
    return common_ksampler(ctx, model, seed, cfg, settings, positive, negative, latent_image)


@node("KSamplerAdvanced",
      [SOCKET("model", "MODEL"), COMBO("add_noise", (ENABLE, DISABLE), ENABLE), INT("noise_seed", 0, 0, _SEED_MAX),
       *_STEPS_CFG_SAMPLER, INT("start_at_step", 0, 0, 10000), INT("end_at_step", 10000, 0, 10000),
       COMBO("return_with_leftover_noise", (DISABLE, ENABLE), DISABLE)],
      ["LATENT"], category="sampling", seed="noise_seed", foldable=False, needs_context=True,
      plan=PlanSpec("sample", runtime_widgets={"add_noise": "add_noise", "noise_seed": "seed", "steps": "steps",
                                               "cfg": "cfg", "sampler_name": "sampler_name", "scheduler": "scheduler",
                                               "start_at_step": "start_at_step", "end_at_step": "end_at_step",
                                               "return_with_leftover_noise": "return_with_leftover_noise"}),
      display_name="KSampler (Advanced)")
def ksampler_advanced(ctx: RunContext, *, model, add_noise: str, noise_seed: int, steps: int, cfg: float,
                      sampler_name: str, scheduler: str, positive: list, negative: list, latent_image: dict,
                      start_at_step: int, end_at_step: int, return_with_leftover_noise: str) -> tuple:
    """Run only steps ``start_at_step .. end_at_step`` of a ``steps``-step schedule (chained samplers)."""
    settings = {"sampler_name": sampler_name, "scheduler": scheduler, "steps": steps, "add_noise": add_noise,
                "start_at_step": start_at_step, "end_at_step": end_at_step,
                "return_with_leftover_noise": return_with_leftover_noise}
    return common_ksampler(ctx, model, noise_seed, cfg, settings, positive, negative, latent_image)
