"""ModelSamplingDiscrete, CFG combine and latent formats against ComfyUI
(tests/data/comfyui_vectors/schedules.* and cfg_scaling.*)."""
import pytest
import torch

from kiln.kernels.cfg import Prediction, cfg_combine, skips_uncond
from kiln.kernels.model_sampling import SD15_LATENT, SDXL_LATENT, ModelSamplingDiscrete
from vectors import meta, tensors


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sigma_tables_bit_exact(prediction):
    ms = ModelSamplingDiscrete(prediction)
    assert torch.equal(ms.sigmas, tensors("schedules")["sigmas_table"])
    assert torch.equal(ms.log_sigmas, tensors("schedules")["log_sigmas_table"])
    info = meta("schedules")["model_sampling"][f"sd15_{prediction}"]
    assert float(ms.sigma_min) == info["sigma_min"] and float(ms.sigma_max) == info["sigma_max"]


def test_timestep_is_nearest_discrete_index():
    t = tensors("schedules")
    got = ModelSamplingDiscrete().timestep(t["timestep_probe_sigma"])
    assert torch.equal(got, t["timestep_of_probe_sigma"])


def test_sigma_interpolates_log_sigmas_with_clamping():
    t = tensors("schedules")
    assert torch.equal(ModelSamplingDiscrete().sigma(t["sigma_probe_timestep"]), t["sigma_of_probe_timestep"])


@pytest.mark.parametrize("percent", ["0.0", "0.2", "0.5", "0.8", "1.0"])
def test_percent_to_sigma(percent):
    assert ModelSamplingDiscrete().percent_to_sigma(float(percent)) == meta("schedules")["percent_to_sigma"][percent]


def test_max_denoise_detection():
    ms = ModelSamplingDiscrete()
    assert ms.is_max_denoise(torch.tensor([14.614643096923828, 0.0]))  # karras' first sigma, 1 ulp above
    assert ms.is_max_denoise(torch.tensor([20.0, 0.0]))
    assert not ms.is_max_denoise(torch.tensor([1.5481600761413574, 0.0]))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_parameterisation_vectors(prediction):
    t = tensors("cfg_scaling")
    ms, pre = ModelSamplingDiscrete(prediction), f"sd15_{prediction}/"
    x, sigma = t["in/x"], t["in/sigma"]
    got = {
        "calculate_input": ms.calculate_input(sigma, x),
        "calculate_denoised": ms.calculate_denoised(sigma, t["in/model_output"], x),
        "noise_scaling": ms.noise_scaling(sigma, x, t["in/latent_image"], False),
        "noise_scaling_max_denoise": ms.noise_scaling(sigma, x, t["in/latent_image"], True),
        "noise_scaling_scalar_sigma_max_denoise": ms.noise_scaling(t["in/sigma_scalar"], x, t["in/latent_image"], True),
        "inverse_noise_scaling": ms.inverse_noise_scaling(sigma, x),
    }
    for name, value in got.items():
        assert (value - t[pre + name]).abs().max() <= 1e-6, name


@pytest.mark.parametrize("scale", ["1.0", "3.5", "7.5"])
def test_cfg_combine_vectors(scale):
    """ComfyUI's cfg_function, as every step kernel (and its twin) forms it from a Prediction."""
    t = tensors("cfg_scaling")
    out = cfg_combine(t["cfg/cond_pred"], t["cfg/uncond_pred"], float(scale))
    assert (out - t[f"cfg/cfg_function_scale{scale}"]).abs().max() <= 1e-6
    assert torch.equal(Prediction(t["cfg/cond_pred"], t["cfg/uncond_pred"], float(scale)).denoised, out)


def test_a_combined_prediction_is_used_as_is():
    cond, uncond = torch.full([1, 2], 3.0), torch.full([1, 2], 1.0)
    assert torch.equal(Prediction(cond, uncond, 2.0, combined=True).denoised, cond)
    assert torch.equal(Prediction(cond, None, 2.0).denoised, cond)   # the cfg == 1 shortcut: cond alone


def test_cfg1_shortcut_matches_comfyui_facts():
    facts = meta("cfg_scaling")["facts"]
    assert skips_uncond(1.0) == (not facts["cfg1_conds_evaluated(cond,uncond)"][1])
    assert skips_uncond(1.0000000001) == facts["cfg_isclose_1_shortcut_at_1.0000000001"][0]
    assert not skips_uncond(1.0, need_uncond=True)   # CFG++: ComfyUI's disable_cfg1_optimization
    assert not skips_uncond(1.5)


@pytest.mark.parametrize("fmt", [SD15_LATENT, SDXL_LATENT])
def test_latent_formats(fmt):
    t = tensors("cfg_scaling")
    assert fmt.scale_factor == meta("cfg_scaling")["latent_formats"][fmt.name]["scale_factor"]
    for op in ("process_in", "process_out"):
        expected = t[f"latent_format/{fmt.name}/{op}"]
        got = getattr(fmt, op)(t["latent_format/in"])
        assert torch.all((got - expected).abs() <= 1e-7 * expected.abs())
