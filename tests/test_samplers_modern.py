"""The newer ComfyUI samplers (CFG++, multistep, RES, ER-SDE, SEEDS, SA-Solver, UniPC) vs ComfyUI vectors.

Each run starts from ``noise * sigmas[0]`` with the toy denoiser at cfg 2 and ``seed = 42``
(vectors README, section 3) and uses the real seeded noise sampler, so draws must match too.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from kiln.kernels.samplers import get_sampler
from toy_denoiser import ToyDenoiser
from vectors import meta, tensors

TOLERANCE = 1e-4  # vectors README: fp32 samplers with reproduced noise

DETERMINISTIC = ["euler_cfg_pp", "dpmpp_2m_cfg_pp", "ipndm", "ipndm_v", "deis", "gradient_estimation",
                 "gradient_estimation_cfg_pp", "uni_pc", "uni_pc_bh2"]
# sampler -> module whose default_noise_sampler it uses (the step-kernel loops: their Stepper's)
NOISY = {
    "euler_ancestral_cfg_pp": "stepper", "dpmpp_2s_ancestral_cfg_pp": "stepper",
    "res_multistep_ancestral": "stepper", "res_multistep_ancestral_cfg_pp": "stepper",
    "er_sde": "stepper", "seeds_2": "seeds", "seeds_3": "seeds",
    "sa_solver": "sa_solver", "sa_solver_pece": "sa_solver",
}
# eta = 0: ComfyUI draws noise it multiplies by 0; kiln skips those draws.
ZERO_WEIGHT_NOISE = ["res_multistep", "res_multistep_cfg_pp"]
ALL = DETERMINISTIC + list(NOISY) + ZERO_WEIGHT_NOISE


def _run(name, monkeypatch=None, module=None):
    """Run ``name`` on its karras10 vector inputs; returns (final, model, callbacks, draws)."""
    key = f"{name}/karras10"
    vec = tensors("samplers")
    sigmas = vec[f"sigmas/{key}"].clone()
    x = vec["input/noise_seed42_1x4x8x8"] * sigmas[0]
    draws = []
    if monkeypatch is not None:
        mod = importlib.import_module(f"kiln.kernels.samplers.{module}")
        real = mod.default_noise_sampler

        def recording(x_like, seed=None):
            assert seed == 42
            sampler = real(x_like, seed=seed)

            def draw(sigma, sigma_next):
                noise = sampler(sigma, sigma_next)
                draws.append((float(sigma), float(sigma_next), noise))
                return noise
            return draw
        monkeypatch.setattr(mod, "default_noise_sampler", recording)
    model = ToyDenoiser()
    callbacks = []
    final = get_sampler(name)(model, x, sigmas, {"seed": 42}, callbacks.append)
    return final, model, callbacks, draws


@pytest.mark.parametrize("name", ALL)
def test_final_and_model_calls_match_comfyui(name):
    final, model, callbacks, _ = _run(name)
    run = meta("samplers")["runs"][f"{name}/karras10"]
    err = (final - tensors("samplers")[f"final/{name}/karras10"]).abs().max().item()
    assert err <= TOLERANCE, f"{name}: max |kiln - comfyui| = {err:.3g}"
    assert model.calls == run["model_calls"]
    assert [c["i"] for c in callbacks] == list(range(run["callback_calls"]))


@pytest.mark.parametrize("name", list(NOISY))
def test_noise_draws_match_comfyui(name, monkeypatch):
    _, _, _, draws = _run(name, monkeypatch, NOISY[name])
    run = meta("samplers")["runs"][f"{name}/karras10"]
    assert [v for s, n, _ in draws for v in (s, n)] == pytest.approx(
        [v for d in run["noise_draws"] for v in (d["sigma"], d["sigma_next"])], rel=1e-6)
    expected = tensors("samplers")[f"noise_draws/{name}/karras10"]
    assert torch.equal(torch.cat([noise for _, _, noise in draws]), expected)


@pytest.mark.parametrize("name", ZERO_WEIGHT_NOISE)
def test_zero_weight_noise_is_not_drawn(name, monkeypatch):
    final, _, _, draws = _run(name, monkeypatch, "stepper")
    assert draws == []
    assert torch.equal(final, tensors("samplers")[f"final/{name}/karras10"])


def test_ddim_is_euler():
    ddim, _, _, _ = _run("ddim")
    euler, _, _, _ = _run("euler")
    assert torch.equal(ddim, euler)
    assert (ddim - tensors("samplers")["final/ddim/karras10"]).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2"])
def test_uni_pc_uses_discarded_penultimate_sigmas_and_leaves_them_alone(name):
    vec = tensors("samplers")
    sigmas = vec[f"sigmas/{name}/karras10"].clone()
    before = sigmas.clone()
    assert torch.allclose(sigmas, torch.tensor(meta("samplers")["runs"][f"{name}/karras10"]["sigmas"]))
    final = get_sampler(name)(ToyDenoiser(), vec["input/noise_seed42_1x4x8x8"] * sigmas[0], sigmas,
                              {"seed": 42})
    assert torch.equal(sigmas, before)  # ComfyUI writes 0.001 into sigmas[-1]; kiln does not
    assert (final - vec[f"final/{name}/karras10"]).abs().max().item() <= TOLERANCE


def test_uni_pc_variants_differ():
    bh1, _, _, _ = _run("uni_pc")
    bh2, _, _, _ = _run("uni_pc_bh2")
    assert (bh1 - bh2).abs().max().item() > 1e-3


class _Recording(ToyDenoiser):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.asked = []

    def predict(self, x, sigma, *, need_uncond=False, **extra):
        self.asked.append(need_uncond)
        return super().predict(x, sigma, need_uncond=need_uncond, **extra)


@pytest.mark.parametrize("name", ["euler_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp",
                                  "res_multistep_cfg_pp", "gradient_estimation_cfg_pp"])
def test_cfg_pp_samplers_ask_for_the_uncond_prediction_and_leave_extra_args_alone(name):
    """ComfyUI's CFG++ samplers set disable_cfg1_optimization: the negative side runs even at cfg 1."""
    extra_args = {"seed": 42}
    sigmas = tensors("samplers")[f"sigmas/{name}/karras10"]
    model = _Recording(cfg=1.0)
    get_sampler(name)(model, torch.zeros(1, 4, 8, 8), sigmas, extra_args)
    assert model.asked and all(model.asked)
    assert extra_args == {"seed": 42}
    plain = _Recording(cfg=1.0)
    get_sampler(name.replace("_cfg_pp", ""))(plain, torch.zeros(1, 4, 8, 8), sigmas, {"seed": 42})
    assert plain.asked and not any(plain.asked)
