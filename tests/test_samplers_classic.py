"""Classic, DPM-Solver and DPM-Solver++ samplers against ComfyUI's toy-model runs
(tests/data/comfyui_vectors/samplers.*, README section 3)."""
import pytest
import torch

from kiln.kernels.noise import BrownianTreeNoiseSampler, default_noise_sampler
from kiln.kernels.samplers import get_sampler
from toy_denoiser import ToyDenoiser
from vectors import meta, tensors

OWNED = {
    "euler", "euler_ancestral", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
    "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu",
    "ddpm", "lcm", "ddim",
}
RUNS = sorted(k for k in meta("samplers")["runs"] if k.split("/")[0] in OWNED)
NOISY_RUNS = [k for k in RUNS if meta("samplers")["runs"][k].get("noise_draws")]
TOL = 1e-4


def _run(key, **options):
    """Run a vector case; returns (output, model, callback payloads)."""
    sigmas = tensors("samplers")[f"sigmas/{key}"]
    x0 = tensors("samplers")["input/noise_seed42_1x4x8x8"] * sigmas[0]
    model, seen = ToyDenoiser(), []
    out = get_sampler(key.split("/")[0])(model, x0, sigmas, {"seed": 42}, seen.append, True,
                                         **options)
    return out, model, seen


@pytest.mark.parametrize("key", RUNS)
def test_final_and_model_calls(key):
    info = meta("samplers")["runs"][key]
    sigmas_before = tensors("samplers")[f"sigmas/{key}"].clone()
    rng_state = torch.get_rng_state()
    out, model, seen = _run(key)
    assert (out - tensors("samplers")[f"final/{key}"]).abs().max() <= TOL
    assert model.calls == info["model_calls"]
    assert len(seen) == info["callback_calls"]
    assert (not torch.equal(torch.get_rng_state(), rng_state)) == info["torch_global_rng_consumed"]
    assert torch.equal(tensors("samplers")[f"sigmas/{key}"], sigmas_before)


@pytest.mark.parametrize("key", [k for k in RUNS if f"traj_denoised/{k}" in tensors("samplers")])
def test_trajectories(key):
    out, _, seen = _run(key)
    denoised = torch.cat([step["denoised"] for step in seen])
    x_after = torch.cat([step["x"] for step in seen[1:]] + [out])
    assert (denoised - tensors("samplers")[f"traj_denoised/{key}"]).abs().max() <= TOL
    assert (x_after - tensors("samplers")[f"traj_x_after_step/{key}"]).abs().max() <= TOL
    assert [step["i"] for step in seen] == list(range(len(seen)))


def _real_noise_sampler(key, x):
    info = meta("samplers")["runs"][key]
    if info["noise_draws"][0]["source"] == "default":
        return default_noise_sampler(x, seed=42)
    sigmas = tensors("samplers")[f"sigmas/{key}"]
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=42,
                                    cpu=not key.split("/")[0].endswith("_gpu"))


@pytest.mark.parametrize("key", NOISY_RUNS)
def test_noise_draws_match_comfyui(key):
    """The sampler asks for noise on ComfyUI's intervals and gets ComfyUI's draws."""
    x = tensors("samplers")["input/noise_seed42_1x4x8x8"]
    real, calls = _real_noise_sampler(key, x), []

    def recording(sigma, sigma_next):
        calls.append((float(sigma), float(sigma_next), real(sigma, sigma_next)))
        return calls[-1][2]

    _run(key, noise_sampler=recording)
    expected = meta("samplers")["runs"][key]["noise_draws"]
    draws = tensors("samplers")[f"noise_draws/{key}"]
    assert len(calls) == len(expected) == len(draws)
    for (sigma, sigma_next, noise), info, row in zip(calls, expected, draws):
        assert sigma == pytest.approx(info["sigma"], rel=1e-6)
        assert sigma_next == pytest.approx(info["sigma_next"], rel=1e-6)
        assert (noise[0] - row).abs().max() <= 1e-6


@pytest.mark.parametrize("key", NOISY_RUNS)
def test_injected_comfyui_noise_reproduces_final(key):
    """The step arithmetic alone (noise taken from the vectors) gives ComfyUI's result."""
    draws = iter(tensors("samplers")[f"noise_draws/{key}"])
    out, _, _ = _run(key, noise_sampler=lambda sigma, sigma_next: next(draws)[None])
    assert (out - tensors("samplers")[f"final/{key}"]).abs().max() <= TOL


def test_gpu_aliases_equal_cpu_tree_on_cpu():
    for name in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):
        assert torch.equal(_run(f"{name}/karras10")[0], _run(f"{name}_gpu/karras10")[0])


def test_seed_changes_stochastic_samplers_only():
    sigmas = tensors("samplers")["sigmas/euler/karras10"]
    x0 = tensors("samplers")["input/noise_seed42_1x4x8x8"] * sigmas[0]
    for name, stochastic in (("euler_ancestral", True), ("dpmpp_2m_sde", True), ("dpmpp_2m", False)):
        a = get_sampler(name)(ToyDenoiser(), x0, sigmas, {"seed": 42})
        b = get_sampler(name)(ToyDenoiser(), x0, sigmas, {"model_options": {}, "seed": 43})
        assert torch.equal(a, b) != stochastic


def test_single_sigma_returns_input_unchanged():
    x = torch.randn(1, 4, 8, 8)
    for name in ("euler", "dpm_fast", "dpm_adaptive", "dpmpp_sde", "dpmpp_3m_sde"):
        assert torch.equal(get_sampler(name)(ToyDenoiser(), x, torch.tensor([1.0]), {"seed": 1}), x)
