"""CFG++ samplers (ComfyUI ``sample_*_cfg_pp``): step with the *unconditional* prediction.

CFG++ (Chung et al. 2024) renoises along the unconditional denoised estimate while still
landing on the guided one, so these samplers need ``uncond_denoised`` from inside the CFG
combine.  They get it as ComfyUI does: a ``sampler_post_cfg_function`` hook that records it
(with ``disable_cfg1_optimization`` so the uncond pass also runs at cfg 1).
"""
from __future__ import annotations

import torch

from kiln.kernels.noise import default_noise_sampler
from kiln.kernels.samplers.common import get_ancestral_step, to_d


class UncondCapture:
    """Post-CFG hook that remembers the latest ``uncond_denoised`` and passes ``denoised`` on."""

    def __init__(self):
        self.uncond_denoised: torch.Tensor | None = None

    def __call__(self, args: dict) -> torch.Tensor:
        self.uncond_denoised = args["uncond_denoised"]
        return args["denoised"]


def with_uncond_capture(extra_args: dict | None) -> tuple[dict, UncondCapture]:
    """Copies of ``extra_args``/``model_options`` with the capture hook appended.

    Same effect as ComfyUI's ``set_model_options_post_cfg_function(..., disable_cfg1_optimization=True)``
    on a copied ``model_options``; the caller's dicts are left untouched.
    """
    extra_args = {} if extra_args is None else dict(extra_args)
    model_options = dict(extra_args.get("model_options", {}))
    capture = UncondCapture()
    model_options["sampler_post_cfg_function"] = model_options.get("sampler_post_cfg_function", []) + [capture]
    model_options["disable_cfg1_optimization"] = True
    extra_args["model_options"] = model_options
    return extra_args, capture


def _ones_batch(x: torch.Tensor) -> torch.Tensor:
    return x.new_ones([x.shape[0]])


# --- Euler (ancestral) CFG++ ------------------------------------------------------------------

def euler_ancestral_cfg_pp_step(x, denoised, uncond_denoised, sigma, sigma_next, lambda_fn,
                                noise=None, eta=1.0, s_noise=1.0):
    """One DDIM-style CFG++ step in half-log-SNR form (alpha = sigma * exp(lambda), 1 for eps)."""
    alpha_s = sigma * lambda_fn(sigma).exp()
    alpha_t = sigma_next * lambda_fn(sigma_next).exp()
    d = to_d(x, sigma, alpha_s * uncond_denoised)
    sigma_down, sigma_up = get_ancestral_step(sigma / alpha_s, sigma_next / alpha_t, eta=eta)
    sigma_down = alpha_t * sigma_down
    x = alpha_t * denoised + sigma_down * d
    if noise is not None:
        x = x + alpha_t * noise * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                  eta=1.0, s_noise=1.0, noise_sampler=None):
    extra_args, capture = with_uncond_capture(extra_args)
    if noise_sampler is None and eta > 0 and s_noise > 0:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    lambda_fn = model.model_sampling.sigma_to_half_log_snr
    s_in = _ones_batch(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if eta > 0 and s_noise > 0 else None
        x = euler_ancestral_cfg_pp_step(x, denoised, capture.uncond_denoised, sigmas[i], sigmas[i + 1],
                                        lambda_fn, noise, eta, s_noise)
    return x


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """ComfyUI: the ancestral variant with eta = 0 and s_noise = 0 (no noise drawn)."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args, callback, disable,
                                         eta=0.0, s_noise=0.0)


# --- DPM-Solver++(2S) ancestral CFG++ -----------------------------------------------------------

def dpmpp_2s_midpoint(x, denoised, uncond_denoised, sigma, sigma_down):
    """Half-step state (and its sigma) where the second model evaluation happens.

    CFG++ shifts x by the guidance (denoised - uncond) before stepping toward ``denoised``.
    """
    t, t_next = sigma.log().neg(), sigma_down.log().neg()
    h = t_next - t
    s = t + 0.5 * h
    sigma_s = s.neg().exp()
    x_2 = (sigma_s / t.neg().exp()) * (x + (denoised - uncond_denoised)) - (-h * 0.5).expm1() * denoised
    return x_2, sigma_s


def dpmpp_2s_ancestral_cfg_pp_step(x, denoised, uncond_denoised, denoised_2, uncond_denoised_2, sigma,
                                   sigma_down, sigma_up, noise=None, s_noise=1.0):
    """Finish the 2S step from the midpoint prediction, then add the ancestral noise.

    As in ComfyUI the final shift uses the *midpoint's* uncond (its hook overwrote the first one);
    with ``sigma_down == 0`` the step is ``denoised + d * 0`` on the first uncond.
    """
    if sigma_down == 0:
        x = denoised + to_d(x, sigma, uncond_denoised) * sigma_down
    else:
        t, t_next = sigma.log().neg(), sigma_down.log().neg()
        h = t_next - t
        x = (t_next.neg().exp() / t.neg().exp()) * (x + (denoised - uncond_denoised_2)) - (-h).expm1() * denoised_2
    if noise is not None:
        x = x + noise * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                     eta=1.0, s_noise=1.0, noise_sampler=None):
    extra_args, capture = with_uncond_capture(extra_args)
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = _ones_batch(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        uncond_denoised = capture.uncond_denoised
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        denoised_2 = None
        if sigma_down != 0:
            x_2, sigma_s = dpmpp_2s_midpoint(x, denoised, uncond_denoised, sigmas[i], sigma_down)
            denoised_2 = model(x_2, sigma_s * s_in, **extra_args)
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if sigmas[i + 1] > 0 else None
        x = dpmpp_2s_ancestral_cfg_pp_step(x, denoised, uncond_denoised, denoised_2, capture.uncond_denoised,
                                           sigmas[i], sigma_down, sigma_up, noise, s_noise)
    return x


# --- DPM-Solver++(2M) CFG++ -----------------------------------------------------------------------

def dpmpp_2m_cfg_pp_step(x, denoised, uncond_denoised, old_uncond_denoised, sigma, sigma_next, sigma_prev):
    """2M multistep on the uncond estimate; first and last steps are first order."""
    t, t_next = sigma.log().neg(), sigma_next.log().neg()
    h = t_next - t
    if old_uncond_denoised is None or sigma_next == 0:
        denoised_mix = -torch.exp(-h) * uncond_denoised
    else:
        r = (t - sigma_prev.log().neg()) / h
        denoised_mix = (-torch.exp(-h) * uncond_denoised
                        - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond_denoised))
    return denoised + denoised_mix + torch.exp(-h) * x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args, capture = with_uncond_capture(extra_args)
    s_in = _ones_batch(x)
    old_uncond_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        sigma_prev = sigmas[i - 1] if i > 0 else None
        x = dpmpp_2m_cfg_pp_step(x, denoised, capture.uncond_denoised, old_uncond_denoised,
                                 sigmas[i], sigmas[i + 1], sigma_prev)
        old_uncond_denoised = capture.uncond_denoised
    return x
