"""DPM-Solver++ samplers as ComfyUI v0.3.64 runs them (``comfy/k_diffusion/sampling.py``):
dpmpp_2s_ancestral, dpmpp_2m, and the SDE family dpmpp_sde, dpmpp_2m_sde (midpoint or heun
solver), dpmpp_3m_sde. The ``_gpu`` names (aliases in ``kiln.kernels.samplers``) only build the
Brownian tree on the latent's device instead of the CPU, identical on CPU.

ComfyUI writes the SDE samplers in half-log-SNR form (lambda = -log sigma for eps/v models) and
draws their noise from a Brownian tree over [smallest non-zero sigma, largest sigma] seeded with
``extra_args["seed"]``. Each step is one ``expint`` / ``sde_multistep`` kernel with ComfyUI's
scalars.
"""
from __future__ import annotations

import torch

from ..noise import BrownianTreeNoiseSampler
from .common import get_ancestral_step
from .stepper import Stepper

_NO_NOISE = (0.0, 0.0, 0.0)


def _t(sigma):
    return sigma.log().neg()


def _sigma(t):
    return t.neg().exp()


def _sde_stepper(model, x, sigmas, extra_args, callback, noise_sampler, s_noise, cpu_tree):
    """The loop's Stepper drawing from the Brownian tree over the schedule (unless a noise
    sampler is given), on ComfyUI's SNR-safe sigmas; the model sampling and the scaled s_noise."""
    model_sampling = model.model_sampling
    if noise_sampler is None:
        noise_sampler = BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                 seed=(extra_args or {}).get("seed"), cpu=cpu_tree)
    run = Stepper(model, x, model_sampling.offset_first_sigma_for_snr(sigmas), extra_args, callback,
                  noise_sampler=noise_sampler)
    return run, model_sampling, s_noise * getattr(model_sampling, "noise_scale", 1.0)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                              eta=1.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(2S) to sigma_down plus ancestral noise (Euler when sigma_down is 0)."""
    run = Stepper(model, x, sigmas, extra_args, callback, noise_sampler=noise_sampler)
    for i, s, sn, sigma_down, sigma_up in run.ancestral_steps(eta):
        prediction = run.predict(x, s)
        if sigma_down == 0:
            noise = run.noise(i) if sn > 0 else None
            out, den = run("euler", (s, sigma_down - s, s_noise, sigma_up, 1.0), prediction, x=x, noise=noise,
                           store=run.den_store)
        else:
            t, t_next = _t(s), _t(sigma_down)
            h = t_next - t
            sigma_s = _sigma(t + 1 / 2 * h)
            x_2, den = run("expint", (sigma_s / _sigma(t), (-h * (1 / 2)).expm1(), 0.0, 0.0, *_NO_NOISE),
                           prediction, x=x, store=run.den_store)
            prediction = run.predict(x_2, sigma_s)
            noise = run.noise(i) if sn > 0 else None
            out = run("expint", (_sigma(t_next) / _sigma(t), (-h).expm1(), 0.0, 0.0, s_noise, sigma_up, 1.0),
                      prediction, x=x, noise=noise)[0]
        x = run.done(i, x, out, den)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M): second-order multistep, one model call per step; first order when there
    is no history and on the final step to 0."""
    run = Stepper(model, x, sigmas, extra_args, callback)
    old_denoised = None
    for i, s, sn in run.steps():
        prediction = run.predict(x, s)
        t, t_next = _t(s), _t(sn)
        h = t_next - t
        w_old = w_new = 0.0
        old = None
        if old_denoised is not None and sn != 0:
            r = (t - _t(run.sig[i - 1])) / h
            w_old, w_new, old = -(1 / (2 * r)), 1 + 1 / (2 * r), old_denoised
        out, den = run("expint", (_sigma(t_next) / _sigma(t), (-h).expm1(), w_old, w_new, *_NO_NOISE),
                       prediction, x=x, old=old, store=("den",))
        x, old_denoised = run.done(i, x, out, den), den
    return x


def _sde_substep_row(s, lambda_s, lambda_to, sigma_to, eta, s_noise, w_old=0.0, w_new=0.0):
    """expint row of one dpmpp_sde move: an exponential-integrator SDE step from lambda_s to
    lambda_to with ancestral noise."""
    alpha_s = s * lambda_s.exp()
    alpha_to = sigma_to * lambda_to.exp()
    sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_to.neg().exp(), eta)
    h_ = sd.log().neg() - lambda_s
    return ((alpha_to / alpha_s) * (-h_).exp(), alpha_to * (-h_).expm1(), w_old, w_new, alpha_to, s_noise, su)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                     eta=1.0, s_noise=1.0, noise_sampler=None, r=1 / 2, cpu_tree=True):
    """DPM-Solver++ (stochastic, 2 stages per step); the step to sigma 0 returns the prediction."""
    if len(sigmas) <= 1:
        return x
    run, model_sampling, s_noise = _sde_stepper(model, x, sigmas, extra_args, callback, noise_sampler, s_noise,
                                                cpu_tree)
    lam, sigma_fn = model_sampling.sigma_to_half_log_snr, model_sampling.half_log_snr_to_sigma
    add_noise = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i, s, sn in run.steps():
        prediction = run.predict(x, s)
        if sn == 0:
            out, den = run("denoised", _NO_NOISE, prediction, x=x, store=run.den_store)
        else:
            lambda_s, lambda_t = lam(s), lam(sn)
            lambda_s_1 = lambda_s + r * (lambda_t - lambda_s)
            sigma_s_1 = sigma_fn(lambda_s_1)
            noise = run.noise_sampler(run.sigmas[i], run.dev(sigma_s_1)) if add_noise else None
            x_2, den = run("expint", _sde_substep_row(s, lambda_s, lambda_s_1, sigma_s_1, eta, s_noise),
                           prediction, x=x, noise=noise, store=("den",))
            prediction = run.predict(x_2, sigma_s_1)
            noise = run.noise(i) if add_noise else None
            out = run("expint", _sde_substep_row(s, lambda_s, lambda_t, sn, eta, s_noise, 1 - fac, fac),
                      prediction, x=x, old=den, noise=noise)[0]
        x = run.done(i, x, out, den)
    return x


def _sde_base(s, sn, lambda_s, lambda_t, eta):
    """h, h_eta, alpha_t and the first-order part (a, b) of the 2M/3M SDE update."""
    h = lambda_t - lambda_s
    h_eta = h * (eta + 1)
    alpha_t = sn * lambda_t.exp()
    return h, h_eta, alpha_t, sn / s * (-h * eta).exp(), alpha_t * (-h_eta).expm1().neg()


def _sde_noise_row(sn, h, eta, s_noise):
    return sn, (-2 * h * eta).expm1().neg().sqrt(), s_noise


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        eta=1.0, s_noise=1.0, noise_sampler=None, solver_type="midpoint", cpu_tree=True):
    """DPM-Solver++(2M) SDE; the step to sigma 0 returns the prediction."""
    if len(sigmas) <= 1:
        return x
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    run, model_sampling, s_noise = _sde_stepper(model, x, sigmas, extra_args, callback, noise_sampler, s_noise,
                                                cpu_tree)
    lam = model_sampling.sigma_to_half_log_snr
    old_denoised, h = None, None
    for i, s, sn in run.steps():
        prediction = run.predict(x, s)
        h_last = h
        if sn == 0:
            out, den = run("denoised", _NO_NOISE, prediction, x=x, store=("den",))
        else:
            noise = run.noise(i) if eta > 0 and s_noise > 0 else None
            h, h_eta, alpha_t, a, b = _sde_base(s, sn, lam(s), lam(sn), eta)
            c, mode = 0.0, 0
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    c = alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r)
                else:
                    c = 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r)
                mode = 1
            row = (a, b, c, 0.0, 0.0, 0.0, 0.0, *_sde_noise_row(sn, h, eta, s_noise))
            out, den = run("sde_multistep", row, prediction, x=x, h1=old_denoised, noise=noise, mode=mode,
                           store=("den",))
        x, old_denoised = run.done(i, x, out, den), den
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        eta=1.0, s_noise=1.0, noise_sampler=None, cpu_tree=True):
    """DPM-Solver++(3M) SDE (2M / first order while the history is short); the step to sigma 0
    returns the prediction."""
    if len(sigmas) <= 1:
        return x
    run, model_sampling, s_noise = _sde_stepper(model, x, sigmas, extra_args, callback, noise_sampler, s_noise,
                                                cpu_tree)
    lam = model_sampling.sigma_to_half_log_snr
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i, s, sn in run.steps():
        prediction = run.predict(x, s)
        if sn == 0:
            out, den = run("denoised", _NO_NOISE, prediction, x=x, store=("den",))
        else:
            noise = run.noise(i) if eta > 0 and s_noise > 0 else None
            h, h_eta, alpha_t, a, b = _sde_base(s, sn, lam(s), lam(sn), eta)
            c = r0 = r1 = r01 = p3 = 0.0
            mode = 0
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                c, r01, p3, mode = alpha_t * phi_2, r0 + r1, alpha_t * phi_3, 3
            elif h_1 is not None:
                r0 = h_1 / h
                c, mode = alpha_t * (h_eta.neg().expm1() / h_eta + 1), 2
            row = (a, b, c, r0, r1, r01, p3, *_sde_noise_row(sn, h, eta, s_noise))
            out, den = run("sde_multistep", row, prediction, x=x, h1=denoised_1, h2=denoised_2, noise=noise,
                           mode=mode, store=("den",))
        x = run.done(i, x, out, den)
        denoised_1, denoised_2 = den, denoised_1
        h_1, h_2 = h, h_1
    return x
