"""Sigma schedules, bit-compatible with ComfyUI v0.3.64 (``comfy/samplers.py``, ``comfy/k_diffusion``).

Every scheduler is ``(model_sampling, steps) -> float32 tensor`` of ``steps + 1`` sigmas ending
in 0 (ddim_uniform can be longer, see its docstring). The arithmetic follows ComfyUI's order of
operations (Python-float list building, float32 torch ops) so results match bit for bit.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy
import torch

from .samplers import DISCARD_PENULTIMATE_SIGMA_SAMPLERS
from .samplers.common import append_zero


def simple(model_sampling, steps: int) -> torch.Tensor:
    """Evenly strided entries of the 1000-entry sigma table, from the top."""
    table = model_sampling.sigmas
    stride = len(table) / steps
    sigs = [float(table[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.FloatTensor(sigs + [0.0])


def sgm_uniform(model_sampling, steps: int) -> torch.Tensor:
    """``normal`` with ``steps + 1`` timesteps and the last (t = 0) dropped."""
    return _timestep_spaced(model_sampling, steps, sgm=True)


def karras(model_sampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): uniform in sigma^(1/rho)."""
    sigma_min, sigma_max = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float32)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(model_sampling, steps: int) -> torch.Tensor:
    """Uniform in log sigma."""
    sigma_min, sigma_max = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float32).exp())


def ddim_uniform(model_sampling, steps: int) -> torch.Tensor:
    """Table entries 1, 1+s, 1+2s, ... (s = 1000 // steps), highest first, then 0.

    The stride does not divide 1000 for most step counts, so this can give more than
    ``steps`` intervals (30 steps -> 31), exactly as ComfyUI.
    """
    table = model_sampling.sigmas
    if math.isclose(float(table[1]), 0, abs_tol=0.00001):
        steps += 1
        sigs = []
    else:
        sigs = [0.0]
    stride = max(len(table) // steps, 1)
    sigs += [float(table[x]) for x in range(1, len(table), stride)]
    return torch.FloatTensor(sigs[::-1])


def beta(model_sampling, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """Timesteps at Beta(0.6, 0.6) quantiles (arXiv 2407.12173), consecutive duplicates dropped."""
    total_timesteps = len(model_sampling.sigmas) - 1
    quantiles = 1 - numpy.linspace(0, 1, steps, endpoint=False)
    import scipy.stats  # imported when the beta schedule needs it: scipy.stats adds seconds to every start

    timesteps = numpy.rint(scipy.stats.beta.ppf(quantiles, alpha, beta_) * total_timesteps)
    sigs = []
    last_t = -1
    for t in timesteps:
        if t != last_t:
            sigs.append(float(model_sampling.sigmas[int(t)]))
        last_t = t
    return torch.FloatTensor(sigs + [0.0])


def normal(model_sampling, steps: int) -> torch.Tensor:
    """``sigma(t)`` at timesteps evenly spaced from timestep(sigma_max) to timestep(sigma_min)."""
    return _timestep_spaced(model_sampling, steps, sgm=False)


def linear_quadratic(model_sampling, steps: int, threshold_noise: float = 0.025,
                     linear_steps: int | None = None) -> torch.Tensor:
    """Mochi's schedule on [0, 1] (linear, then quadratic after ``threshold_noise``) times sigma_max."""
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = step_diff / (linear_steps * quadratic_steps ** 2)
        linear_coef = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps ** 2)
        const = quadratic_coef * (linear_steps ** 2)
        quadratic = [quadratic_coef * (i ** 2) + linear_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - x for x in linear + quadratic + [1.0]]
    return torch.FloatTensor(schedule) * model_sampling.sigma_max.cpu()


def kl_optimal(model_sampling, steps: int) -> torch.Tensor:
    """Linear in atan(sigma) (AUTOMATIC1111 PR 15608). steps == 1 gives NaN (0/0) as in ComfyUI."""
    sigma_min, sigma_max = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    adj = torch.arange(steps, dtype=torch.float32).div_(steps - 1)
    sigmas = adj.new_zeros(steps + 1)
    sigmas[:-1] = (adj * math.atan(sigma_min) + (1 - adj) * math.atan(sigma_max)).tan_()
    return sigmas


def _timestep_spaced(model_sampling, steps: int, sgm: bool) -> torch.Tensor:
    start = model_sampling.timestep(model_sampling.sigma_max)
    end = model_sampling.timestep(model_sampling.sigma_min)
    append_final_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        # Schedules whose sigma(t_min) is ~0 already end at zero: take one more point instead.
        if math.isclose(float(model_sampling.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_final_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(model_sampling.sigma(t)) for t in timesteps]
    if append_final_zero:
        sigs.append(0.0)
    return torch.FloatTensor(sigs)


# ComfyUI's SCHEDULER_NAMES order (the KSampler widget list).
SCHEDULERS: dict[str, Callable[..., torch.Tensor]] = {
    "simple": simple,
    "sgm_uniform": sgm_uniform,
    "karras": karras,
    "exponential": exponential,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "normal": normal,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
}
SCHEDULER_NAMES = tuple(SCHEDULERS)


def calculate_sigmas(model_sampling, scheduler: str, steps: int) -> torch.Tensor:
    """The named scheduler's sigmas (KeyError for an unknown name)."""
    return SCHEDULERS[scheduler](model_sampling, steps)


def ksampler_sigmas(model_sampling, sampler_name: str, scheduler: str, steps: int,
                    denoise: float | None = 1.0) -> torch.Tensor:
    """The sigmas ComfyUI's ``KSampler(model, steps, sampler, scheduler, denoise)`` samples with.

    * dpm_2 / dpm_2_ancestral / uni_pc(_bh2): schedule for ``steps + 1``, drop the penultimate sigma.
    * ``denoise <= 0``: empty tensor (the sampler then returns the latent unchanged).
    * ``0 < denoise <= 0.9999``: the last ``steps + 1`` sigmas of an ``int(steps / denoise)``-step schedule.
    """
    def full_schedule(n: int) -> torch.Tensor:
        if sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            sigmas = calculate_sigmas(model_sampling, scheduler, n + 1)
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        return calculate_sigmas(model_sampling, scheduler, n)

    if denoise is None or denoise > 0.9999:
        return full_schedule(steps)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    return full_schedule(int(steps / denoise))[-(steps + 1):]


def advanced_sigmas(sigmas: torch.Tensor, start_at_step: int, end_at_step: int,
                    return_with_leftover_noise: bool) -> torch.Tensor:
    """KSamplerAdvanced's step window, in ComfyUI's order (``KSampler.sample``).

    1. ``end_at_step < len - 1``: keep ``sigmas[:end_at_step + 1]`` and, unless leftover noise is
       requested, force its last sigma to 0 (finish denoising at the cut).
    2. ``start_at_step < len - 1``: drop the first ``start_at_step`` sigmas.
       Otherwise there is nothing to sample: an **empty tensor** is returned, meaning
       "return the input latent unchanged" (the same contract as ``denoise <= 0``).
    The input tensor is never modified.
    """
    if end_at_step < len(sigmas) - 1:
        sigmas = sigmas[:end_at_step + 1].clone()
        if not return_with_leftover_noise:
            sigmas[-1] = 0
    if start_at_step >= len(sigmas) - 1:
        return sigmas[:0]
    return sigmas[start_at_step:]
