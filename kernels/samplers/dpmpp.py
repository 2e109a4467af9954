"""DPM-Solver++ samplers as ComfyUI v0.3.64 runs them (``comfy/k_diffusion/sampling.py``).

dpmpp_2s_ancestral, dpmpp_2m, and the SDE family (dpmpp_sde, dpmpp_2m_sde, dpmpp_2m_sde_heun,
dpmpp_3m_sde and their ``_gpu`` names). ComfyUI writes the SDE samplers in half-log-SNR form
(lambda = -log sigma for eps/v models) and draws their noise from a Brownian tree over
[smallest non-zero sigma, largest sigma] seeded with ``extra_args["seed"]``; the ``_gpu``
names only build that tree on the latent's device instead of the CPU (identical on CPU).
"""
from __future__ import annotations

import torch

from ..noise import BrownianTreeNoiseSampler, default_noise_sampler
from .common import get_ancestral_step, to_d


def _callback(callback, x, i, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def _t(sigma):
    return sigma.log().neg()


def _sigma(t):
    return t.neg().exp()


def _brownian_noise(x, sigmas, extra_args, cpu):
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    return BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=extra_args.get("seed"), cpu=cpu)


def _sde_setup(model, sigmas, s_noise):
    """The model sampling, sigmas with ComfyUI's SNR-safe first entry, and the scaled s_noise."""
    model_sampling = model.model_sampling
    sigmas = model_sampling.offset_first_sigma_for_snr(sigmas)
    return model_sampling, sigmas, s_noise * getattr(model_sampling, "noise_scale", 1.0)


# --- step functions ----------------------------------------------------------------------------

def dpmpp_2s_ancestral_stage(x, denoised, sigma, sigma_down):
    """The midpoint (sigma_s, x_2) between sigma and sigma_down in t = -log sigma."""
    t, t_next = _t(sigma), _t(sigma_down)
    h = t_next - t
    s = t + 1 / 2 * h
    return _sigma(s), (_sigma(s) / _sigma(t)) * x - (-h * (1 / 2)).expm1() * denoised


def dpmpp_2s_ancestral_step(x, denoised_2, sigma, sigma_down):
    """DPM-Solver++(2S) update to sigma_down with the midpoint prediction."""
    t, t_next = _t(sigma), _t(sigma_down)
    h = t_next - t
    return (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2


def dpmpp_2m_step(x, denoised, old_denoised, sigma_prev, sigma, sigma_next):
    """DPM-Solver++(2M); first order when there is no history or at the final step to 0."""
    t, t_next = _t(sigma), _t(sigma_next)
    h = t_next - t
    if old_denoised is None or sigma_next == 0:
        return (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised
    h_last = t - _t(sigma_prev)
    r = h_last / h
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d


def dpmpp_sde_substep(x, denoised, sigma, lambda_s, lambda_to, sigma_to, eta, noise, s_noise):
    """One exponential-integrator SDE move from lambda_s to lambda_to with ancestral noise.

    Used for both stages of dpmpp_sde (to the midpoint, then to sigma_next); ``noise`` is
    None when nothing is added (eta or s_noise is 0).
    """
    alpha_s = sigma * lambda_s.exp()
    alpha_to = sigma_to * lambda_to.exp()
    sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_to.neg().exp(), eta)
    h_ = sd.log().neg() - lambda_s
    out = (alpha_to / alpha_s) * (-h_).exp() * x - alpha_to * (-h_).expm1() * denoised
    if noise is not None:
        out = out + alpha_to * noise * s_noise * su
    return out


def dpmpp_2m_sde_step(x, denoised, old_denoised, sigma, sigma_next, lambda_s, lambda_t, h_last,
                      noise, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE update; returns (x, h) so the caller can keep h for the next step."""
    h = lambda_t - lambda_s
    h_eta = h * (eta + 1)
    alpha_t = sigma_next * lambda_t.exp()
    x = sigma_next / sigma * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
    if old_denoised is not None:
        r = h_last / h
        if solver_type == "heun":
            x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
        else:
            x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
    if noise is not None:
        x = x + noise * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
    return x, h


def dpmpp_3m_sde_step(x, denoised, denoised_1, denoised_2, sigma, sigma_next, lambda_s, lambda_t,
                      h_1, h_2, noise, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE update (2M / 1st order while history is short); returns (x, h)."""
    h = lambda_t - lambda_s
    h_eta = h * (eta + 1)
    alpha_t = sigma_next * lambda_t.exp()
    x = sigma_next / sigma * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
    if h_2 is not None:
        r0 = h_1 / h
        r1 = h_2 / h
        d1_0 = (denoised - denoised_1) / r0
        d1_1 = (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        phi_3 = phi_2 / h_eta - 0.5
        x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
    elif h_1 is not None:
        r = h_1 / h
        d = (denoised - denoised_1) / r
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        x = x + (alpha_t * phi_2) * d
    if noise is not None:
        x = x + noise * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
    return x, h


# --- samplers ----------------------------------------------------------------------------------

@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                              eta=1.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(2S) to sigma_down plus ancestral noise (Euler when sigma_down is 0)."""
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _callback(callback, x, i, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            sigma_s, x_2 = dpmpp_2s_ancestral_stage(x, denoised, sigmas[i], sigma_down)
            denoised_2 = model(x_2, sigma_s * s_in, **extra_args)
            x = dpmpp_2s_ancestral_step(x, denoised_2, sigmas[i], sigma_down)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M): second-order multistep, one model call per step."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        sigma_prev = sigmas[i - 1] if i > 0 else None
        x = dpmpp_2m_step(x, denoised, old_denoised, sigma_prev, sigmas[i], sigmas[i + 1])
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                     eta=1.0, s_noise=1.0, noise_sampler=None, r=1 / 2):
    """DPM-Solver++ (stochastic, 2 stages per step); the step to sigma 0 returns the prediction."""
    return _dpmpp_sde(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, r, cpu_tree=True)


@torch.no_grad()
def sample_dpmpp_sde_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None,
                         eta=1.0, s_noise=1.0, noise_sampler=None, r=1 / 2):
    return _dpmpp_sde(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, r, cpu_tree=False)


def _dpmpp_sde(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, r, cpu_tree):
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = _brownian_noise(x, sigmas, extra_args, cpu_tree)
    s_in = x.new_ones([x.shape[0]])
    model_sampling, sigmas, s_noise = _sde_setup(model, sigmas, s_noise)
    add_noise = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s = model_sampling.sigma_to_half_log_snr(sigmas[i])
        lambda_t = model_sampling.sigma_to_half_log_snr(sigmas[i + 1])
        lambda_s_1 = lambda_s + r * (lambda_t - lambda_s)
        sigma_s_1 = model_sampling.half_log_snr_to_sigma(lambda_s_1)
        noise = noise_sampler(sigmas[i], sigma_s_1) if add_noise else None
        x_2 = dpmpp_sde_substep(x, denoised, sigmas[i], lambda_s, lambda_s_1, sigma_s_1, eta, noise, s_noise)
        denoised_2 = model(x_2, sigma_s_1 * s_in, **extra_args)
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if add_noise else None
        x = dpmpp_sde_substep(x, denoised_d, sigmas[i], lambda_s, lambda_t, sigmas[i + 1], eta, noise, s_noise)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        eta=1.0, s_noise=1.0, noise_sampler=None, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE; the step to sigma 0 returns the prediction."""
    return _dpmpp_2m_sde(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, solver_type, True)


@torch.no_grad()
def sample_dpmpp_2m_sde_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None,
                            eta=1.0, s_noise=1.0, noise_sampler=None, solver_type="midpoint"):
    return _dpmpp_2m_sde(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, solver_type, False)


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, disable=None,
                             eta=1.0, s_noise=1.0, noise_sampler=None, solver_type="heun"):
    return _dpmpp_2m_sde(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, solver_type, True)


@torch.no_grad()
def sample_dpmpp_2m_sde_heun_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                 eta=1.0, s_noise=1.0, noise_sampler=None, solver_type="heun"):
    return _dpmpp_2m_sde(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, solver_type, False)


def _dpmpp_2m_sde(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, solver_type, cpu_tree):
    if len(sigmas) <= 1:
        return x
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = _brownian_noise(x, sigmas, extra_args, cpu_tree)
    s_in = x.new_ones([x.shape[0]])
    model_sampling, sigmas, s_noise = _sde_setup(model, sigmas, s_noise)
    old_denoised, h = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        h_last = h
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s = model_sampling.sigma_to_half_log_snr(sigmas[i])
            lambda_t = model_sampling.sigma_to_half_log_snr(sigmas[i + 1])
            noise = noise_sampler(sigmas[i], sigmas[i + 1]) if eta > 0 and s_noise > 0 else None
            x, h = dpmpp_2m_sde_step(x, denoised, old_denoised, sigmas[i], sigmas[i + 1], lambda_s, lambda_t,
                                     h_last, noise, eta, s_noise, solver_type)
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        eta=1.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(3M) SDE; the step to sigma 0 returns the prediction."""
    return _dpmpp_3m_sde(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, cpu_tree=True)


@torch.no_grad()
def sample_dpmpp_3m_sde_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None,
                            eta=1.0, s_noise=1.0, noise_sampler=None):
    return _dpmpp_3m_sde(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, cpu_tree=False)


def _dpmpp_3m_sde(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, cpu_tree):
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = _brownian_noise(x, sigmas, extra_args, cpu_tree)
    s_in = x.new_ones([x.shape[0]])
    model_sampling, sigmas, s_noise = _sde_setup(model, sigmas, s_noise)
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s = model_sampling.sigma_to_half_log_snr(sigmas[i])
            lambda_t = model_sampling.sigma_to_half_log_snr(sigmas[i + 1])
            noise = noise_sampler(sigmas[i], sigmas[i + 1]) if eta > 0 and s_noise > 0 else None
            x, h = dpmpp_3m_sde_step(x, denoised, denoised_1, denoised_2, sigmas[i], sigmas[i + 1],
                                     lambda_s, lambda_t, h_1, h_2, noise, eta, s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x
