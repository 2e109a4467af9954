"""KSAMPLER.sample (start noise, inpaint blending) and the KSampler nodes end to end."""
from __future__ import annotations

import math

import pytest
import torch
from test_guider import FakeModel
from toy_denoiser import ToyDenoiser
from vectors import meta, tensors

from kiln.kernels.ksampler import ksampler_sample, start_latent
from kiln.kernels.model_sampling import LatentFormat
from kiln.kernels.schedules import ksampler_sigmas
from kiln.nodes.latent import empty_latent_image, latent_from_batch
from kiln.nodes.registry import RunContext
from kiln.nodes.sampling import ksampler, ksampler_advanced

PATH_RUNS = sorted(meta("samplers")["ksampler_path"])


@pytest.mark.parametrize("run", PATH_RUNS)
def test_ksampler_path_matches_comfyui(run):
    t = tensors("samplers")
    info = meta("samplers")["ksampler_path"][run]
    sampler, sched, denoise, kind = run.split("/")
    sigmas = t[f"ksampler_path/sigmas/{run}"]
    noise = t["input/noise_seed42_1x4x8x8"]
    latent = torch.zeros_like(noise) if kind == "txt2img" else t["input/img2img_latent_image"]
    model = ToyDenoiser()

    # The schedule is the one ComfyUI's KSampler computes for these settings.
    steps = int(sched.removeprefix("karras").removeprefix("normal"))
    ours = ksampler_sigmas(model.model_sampling, sampler, sched.rstrip("0123456789"), steps,
                           float(denoise.removeprefix("denoise")))
    assert torch.allclose(ours, sigmas, rtol=1e-6, atol=0)
    assert model.model_sampling.is_max_denoise(sigmas) == info["max_denoise"]

    x_init = start_latent(model.model_sampling, sigmas, noise, latent)
    assert torch.equal(x_init, t[f"ksampler_path/x_init/{run}"])
    final = ksampler_sample(model, sampler, sigmas.clone(), noise, latent, seed=42)
    assert (final - t[f"ksampler_path/final/{run}"]).abs().max() <= 1e-4
    assert model.calls == info["model_calls"]


def test_callback_reports_every_step_before_its_update():
    t = tensors("samplers")
    sigmas = t["ksampler_path/sigmas/euler/karras10/denoise1.0/txt2img"]
    noise = t["input/noise_seed42_1x4x8x8"]
    seen = []
    ksampler_sample(ToyDenoiser(), "euler", sigmas, noise, torch.zeros_like(noise), seed=42,
                    callback=lambda i, den, x, total: seen.append((i, x.clone(), total)))
    assert [(i, total) for i, _, total in seen] == [(i, 10) for i in range(10)]
    assert torch.equal(seen[0][1], t["ksampler_path/x_init/euler/karras10/denoise1.0/txt2img"])


def _masked_euler(model, sigmas, noise, inpaint_noise, latent, mask):
    """Independent inpainting Euler loop: the kept region tracks the noised original latent."""
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2) + latent if model.model_sampling.is_max_denoise(sigmas) \
        else noise * sigmas[0] + latent
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        x_in = x * mask + (latent + inpaint_noise * s) * (1 - mask)
        den = model(x_in, s.reshape(1), model_options={}) * mask + latent * (1 - mask)
        x = x + (x - den) / s * (sigmas[i + 1] - s)
    return x


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_inpaint_mask_blending(sampler):
    t = tensors("samplers")
    sigmas = t["ksampler_path/sigmas/euler/normal20/denoise0.5/img2img"]
    noise = t["input/noise_seed42_1x4x8x8"]
    latent = t["input/img2img_latent_image"]
    mask = torch.zeros_like(latent)
    mask[..., 2:6, 1:5] = 1.0
    out = ksampler_sample(ToyDenoiser(), sampler, sigmas, noise, latent, seed=42, denoise_mask=mask)
    # ddim re-noises the kept region with noise drawn from seed + 1.
    inpaint_noise = noise if sampler == "euler" else torch.randn(noise.shape, generator=torch.Generator().manual_seed(43))
    expected = _masked_euler(ToyDenoiser(), sigmas, noise, inpaint_noise, latent, mask)
    assert (out - expected).abs().max() < 1e-5
    assert (out - latent)[mask == 0].abs().max() < 1e-5
    assert (out - latent)[mask == 1].abs().min() > 1e-3
    # An all-ones mask is the unmasked computation, bit for bit.
    ones = ksampler_sample(ToyDenoiser(), sampler, sigmas, noise, latent, seed=42, denoise_mask=torch.ones_like(latent))
    assert torch.equal(ones, ksampler_sample(ToyDenoiser(), sampler, sigmas, noise, latent, seed=42))


# --- nodes ---------------------------------------------------------------------------------
def _conds():
    return ([(torch.full((1, 77, 8), 1.0), {})], [(torch.full((1, 77, 8), -1.0), {})])


def _reference_euler(model, x, sigmas, cfg):
    """Euler with CFG computed straight from the fake model's prediction function."""
    c_ctx, u_ctx = torch.full((1, 77, 8), 1.0), torch.full((1, 77, 8), -1.0)
    for i in range(len(sigmas) - 1):
        s = sigmas[i] * torch.ones(x.shape[0])
        c, u = model.predict(x, s, c_ctx), model.predict(x, s, u_ctx)
        den = u + (c - u) * cfg
        x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def test_ksampler_node_txt2img_end_to_end():
    model = FakeModel()
    positive, negative = _conds()
    (latent,) = empty_latent_image(width=64, height=72, batch_size=2)
    progress = []
    ctx = RunContext(progress=lambda i, n: progress.append((i, n)))
    (out,) = ksampler(ctx, model=model, seed=7, steps=4, cfg=6.5, sampler_name="euler", scheduler="normal",
                      positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    sigmas = ksampler_sigmas(model.model_sampling, "euler", "normal", 4, 1.0)
    noise = torch.randn([2, 4, 9, 8], generator=torch.Generator().manual_seed(7))
    x0 = noise * torch.sqrt(1.0 + sigmas[0] ** 2.0)
    assert torch.equal(model.calls[0]["x"][:2], x0)        # txt2img start: noise * sqrt(1 + s0^2)
    expected = _reference_euler(model, x0, sigmas, 6.5) / 0.18215
    assert out["samples"].shape == (2, 4, 9, 8)
    assert (out["samples"] - expected).abs().max() < 1e-5
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len(model.calls) == 4


@pytest.mark.parametrize("sampler,calls", [("euler", 4), ("heun", 7), ("dpmpp_2m", 4), ("dpm_2", 7)])
def test_every_model_evaluation_is_reported(sampler, calls):
    """``on_model_call`` (kiln bench's count): once per denoiser evaluation, whatever the sampler
    (heun and dpm_2 evaluate twice per step but the last, which steps to sigma 0)."""
    model = FakeModel()
    positive, negative = _conds()
    (latent,) = empty_latent_image(width=64, height=64, batch_size=1)
    counted = []
    ctx = RunContext(on_model_call=lambda: counted.append(len(model.calls)))
    ksampler(ctx, model=model, seed=7, steps=4, cfg=6.5, sampler_name=sampler, scheduler="normal",
             positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    assert len(counted) == calls == len(model.calls)
    assert counted == list(range(calls))   # each reported before its evaluation


def test_ksampler_node_img2img_starts_at_denoise_sigma():
    model = FakeModel()
    positive, negative = _conds()
    raw = torch.linspace(-3, 3, 256).reshape(1, 4, 8, 8)
    (out,) = ksampler(RunContext(), model=model, seed=3, steps=5, cfg=2.0, sampler_name="euler",
                      scheduler="karras", positive=positive, negative=negative,
                      latent_image={"samples": raw}, denoise=0.5)
    sigmas = ksampler_sigmas(model.model_sampling, "euler", "karras", 5, 0.5)
    assert len(sigmas) == 6 and float(sigmas[0]) < float(model.model_sampling.sigma_max)
    noise = torch.randn([1, 4, 8, 8], generator=torch.Generator().manual_seed(3))
    assert float(model.calls[0]["sigma"][0]) == float(sigmas[0])
    assert torch.equal(model.calls[0]["x"][:1], noise * sigmas[0] + raw * 0.18215)
    expected = _reference_euler(model, noise * sigmas[0] + raw * 0.18215, sigmas, 2.0) / 0.18215
    assert (out["samples"] - expected).abs().max() < 1e-5


class _ShiftedFormat(LatentFormat):
    """A latent format with a shift, so scaling an all-zero latent would be visible."""

    def process_in(self, latent):
        return latent * 2.0 + 1.0

    def process_out(self, latent):
        return (latent - 1.0) / 2.0


def test_empty_latent_is_not_shifted_but_content_is():
    fmt = _ShiftedFormat("shifted", 2.0)
    positive, negative = _conds()
    sigma0 = ksampler_sigmas(FakeModel().model_sampling, "euler", "simple", 2, 1.0)[0]
    noise = torch.randn([1, 4, 8, 8], generator=torch.Generator().manual_seed(0))
    for raw, start in [(torch.zeros(1, 4, 8, 8), noise * torch.sqrt(1.0 + sigma0 ** 2.0)),
                       (torch.full((1, 4, 8, 8), 0.5), noise * torch.sqrt(1.0 + sigma0 ** 2.0) + 2.0)]:
        model = FakeModel(latent_format=fmt)
        ksampler(RunContext(), model=model, seed=0, steps=2, cfg=2.0, sampler_name="euler", scheduler="simple",
                 positive=positive, negative=negative, latent_image={"samples": raw}, denoise=1.0)
        assert torch.equal(model.calls[0]["x"][:1], start)


def test_batch_index_selects_the_items_noise_and_keys_pass_through():
    model = FakeModel()
    positive, negative = _conds()
    (full,) = empty_latent_image(width=64, height=64, batch_size=4)
    (sub,) = latent_from_batch(samples=full, batch_index=1, length=2)
    sub["noise_mask"] = torch.ones(1, 1, 64, 64)
    (out,) = ksampler(RunContext(), model=model, seed=11, steps=1, cfg=1.0, sampler_name="euler",
                      scheduler="simple", positive=positive, negative=negative, latent_image=sub, denoise=1.0)
    g = torch.Generator().manual_seed(11)
    draws = [torch.randn([1, 4, 8, 8], generator=g) for _ in range(3)]
    sigma0 = ksampler_sigmas(model.model_sampling, "euler", "simple", 1, 1.0)[0]
    assert torch.equal(model.calls[0]["x"], torch.cat(draws[1:3]) * torch.sqrt(1.0 + sigma0 ** 2.0))
    assert out["batch_index"] == [1, 2] and out["noise_mask"] is sub["noise_mask"]


def test_ksampler_advanced_windows_and_noise_switch():
    positive, negative = _conds()
    raw = torch.linspace(-1, 1, 256).reshape(1, 4, 8, 8)
    latent = {"samples": raw, "batch_index": [0]}
    args = dict(noise_seed=5, steps=6, cfg=3.0, sampler_name="euler", scheduler="normal",
                positive=positive, negative=negative, latent_image=latent)
    full = ksampler_sigmas(FakeModel().model_sampling, "euler", "normal", 6, 1.0)

    model = FakeModel()
    (out,) = ksampler_advanced(RunContext(), model=model, add_noise="disable", start_at_step=2, end_at_step=4,
                               return_with_leftover_noise="enable", **args)
    assert len(model.calls) == 2
    assert torch.equal(model.calls[0]["x"][:1], raw * 0.18215)      # no noise added: x = latent
    assert [float(c["sigma"][0]) for c in model.calls] == [float(full[2]), float(full[3])]
    expected = _reference_euler(model, raw * 0.18215, full[2:5], 3.0) / 0.18215
    assert (out["samples"] - expected).abs().max() < 1e-5 and out["batch_index"] == [0]

    model = FakeModel()
    (out,) = ksampler_advanced(RunContext(), model=model, add_noise="enable", start_at_step=0, end_at_step=3,
                               return_with_leftover_noise="disable", **args)
    assert len(model.calls) == 3
    window = full[:4].clone()
    window[-1] = 0.0                                  # leftover noise disabled: finish at sigma 0
    noise = torch.randn([1, 4, 8, 8], generator=torch.Generator().manual_seed(5))
    x0 = noise * torch.sqrt(1.0 + full[0] ** 2.0) + raw * 0.18215
    assert torch.equal(model.calls[0]["x"][:1], x0)
    expected = _reference_euler(model, x0, window, 3.0) / 0.18215
    assert (out["samples"] - expected).abs().max() < 1e-5

    model = FakeModel()
    (out,) = ksampler_advanced(RunContext(), model=model, add_noise="enable", start_at_step=6, end_at_step=10000,
                               return_with_leftover_noise="disable", **args)
    assert model.calls == [] and out["samples"] is raw


def test_ksampler_node_inpaint_keeps_unmasked_latent():
    model = FakeModel()
    positive, negative = _conds()
    raw = torch.linspace(-1, 1, 256).reshape(1, 4, 8, 8)
    mask = torch.zeros(64, 64)
    mask[16:48, 16:48] = 1.0
    (out,) = ksampler(RunContext(), model=model, seed=1, steps=3, cfg=4.0, sampler_name="euler",
                      scheduler="normal", positive=positive, negative=negative,
                      latent_image={"samples": raw, "noise_mask": mask.reshape(1, 1, 64, 64)}, denoise=0.8)
    keep = torch.ones(1, 4, 8, 8, dtype=torch.bool)
    keep[..., 2:6, 2:6] = False
    assert (out["samples"] - raw)[keep].abs().max() < 1e-5
    assert (out["samples"] - raw)[~keep].abs().min() > 1e-3
