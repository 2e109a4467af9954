"""Sigma schedules against ComfyUI's own KSampler.sigmas (tests/data/comfyui_vectors/schedules.*)."""
import pytest
import torch

from kiln.kernels.model_sampling import ModelSamplingDiscrete
from kiln.kernels.schedules import SCHEDULER_NAMES, advanced_sigmas, ksampler_sigmas
from vectors import meta, tensors

SCHEDULE_KEYS = sorted(meta("schedules")["schedules"])


def test_scheduler_names_in_comfyui_order():
    assert list(SCHEDULER_NAMES) == meta("schedules")["scheduler_names"]


@pytest.mark.parametrize("key", SCHEDULE_KEYS)
def test_ksampler_schedule_matches_comfyui(key):
    info = meta("schedules")["schedules"][key]
    expected = tensors("schedules")[f"sched/{key}"]
    sampler = "dpm_2" if info["group"] == "discard_penultimate" else "euler"
    got = ksampler_sigmas(ModelSamplingDiscrete("eps"), sampler, info["scheduler"], info["steps"], info["denoise"])
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    # README tolerance; karras differs by one ulp on one entry across CPU ISAs (AVX2 vs AVX512 pow).
    assert torch.all((got[~nan] - expected[~nan]).abs() <= 1e-6 + 1e-6 * expected[~nan].abs())


def test_v_prediction_gives_identical_schedules():
    eps, v = ModelSamplingDiscrete("eps"), ModelSamplingDiscrete("v")
    for name in SCHEDULER_NAMES:
        assert torch.equal(ksampler_sigmas(eps, "euler", name, 10, 1.0), ksampler_sigmas(v, "euler", name, 10, 1.0))


def test_denoise_zero_or_negative_gives_empty_schedule():
    ms = ModelSamplingDiscrete("eps")
    assert ksampler_sigmas(ms, "euler", "karras", 10, 0.0).numel() == 0
    assert ksampler_sigmas(ms, "euler", "karras", 10, -0.5).numel() == 0


def test_denoise_truncation_uses_int_of_steps_over_denoise():
    ms = ModelSamplingDiscrete("eps")
    # 8 / 0.6 = 13.33 -> a 13-step schedule, last 9 sigmas.
    full = ksampler_sigmas(ms, "euler", "normal", 13, 1.0)
    assert torch.equal(ksampler_sigmas(ms, "euler", "normal", 8, 0.6), full[-9:])


def _karras20():
    return ksampler_sigmas(ModelSamplingDiscrete("eps"), "euler", "karras", 20, 1.0)


def test_advanced_end_cut_forces_zero_unless_leftover_noise():
    sigmas = _karras20()
    original = sigmas.clone()
    full_denoise = advanced_sigmas(sigmas, 0, 10, return_with_leftover_noise=False)
    leftover = advanced_sigmas(sigmas, 0, 10, return_with_leftover_noise=True)
    assert torch.equal(full_denoise[:-1], sigmas[:10]) and full_denoise[-1] == 0
    assert torch.equal(leftover, sigmas[:11])
    assert torch.equal(sigmas, original)


def test_advanced_zeroing_happens_before_start_slicing():
    sigmas = _karras20()
    out = advanced_sigmas(sigmas, 5, 10, return_with_leftover_noise=False)
    assert torch.equal(out[:-1], sigmas[5:10]) and out[-1] == 0 and len(out) == 6


def test_advanced_end_beyond_schedule_keeps_schedule_and_leftover_flag_is_moot():
    sigmas = _karras20()
    assert torch.equal(advanced_sigmas(sigmas, 3, 10000, return_with_leftover_noise=False), sigmas[3:])
    assert torch.equal(advanced_sigmas(sigmas, 3, 20, return_with_leftover_noise=True), sigmas[3:])


def test_advanced_start_at_or_past_last_interval_means_latent_unchanged():
    sigmas = _karras20()
    assert advanced_sigmas(sigmas, 20, 10000, return_with_leftover_noise=False).numel() == 0
    assert advanced_sigmas(sigmas, 10, 10, return_with_leftover_noise=True).numel() == 0
    assert len(advanced_sigmas(sigmas, 19, 10000, return_with_leftover_noise=False)) == 2
