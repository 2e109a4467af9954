"""The CFG guider (ComfyUI's CFGGuider + sampling_function) with a fake MODEL handle."""
from __future__ import annotations

import torch

from kiln.kernels.model_sampling import SD15_LATENT, ModelSamplingDiscrete
from kiln.nodes.conditioning import conditioning_combine, conditioning_set_area, conditioning_zero_out
from kiln.kernels.batching import prepare_mask
from kiln.nodes.guider import Guider


class FakeModel:
    """A MODEL handle whose prediction is a cheap per-sample function of x, sigma and its conds.

    Each output row depends only on its own row of every input, so batched and unbatched calls
    agree bit for bit, and the context's mean identifies which cond produced a row.
    """

    arch = "sd1"
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, in_channels: int = 4, adm: bool = False, latent_format=SD15_LATENT):
        self.in_channels = in_channels
        self.adm = adm
        self.latent_format = latent_format
        self.model_sampling = ModelSamplingDiscrete("eps")
        self.calls: list[dict] = []
        self.adm_calls: list[dict] = []

    def predict(self, x, sigma, context, y=None, c_concat=None):
        s = sigma.view(-1, 1, 1, 1)
        out = x / (1 + s * s) + 0.3 * torch.tanh(x) * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if y is not None:
            out = out + y.mean(dim=1).view(-1, 1, 1, 1)
        if c_concat is not None:
            out = out + c_concat.sum(dim=1, keepdim=True)
        return out

    def apply_model(self, x, sigma, context, y=None, c_concat=None, control=None, cond_or_uncond=(1, 0)):
        self.calls.append({"x": x.clone(), "sigma": sigma.clone(), "context": context.clone(),
                           "y": None if y is None else y.clone(),
                           "c_concat": None if c_concat is None else c_concat.clone()})
        return self.predict(x, sigma, context, y, c_concat)

    def encode_adm(self, pooled_output, *, width, height, crop_w, crop_h, target_width, target_height):
        if not self.adm:
            return None
        self.adm_calls.append({"width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h,
                               "target_width": target_width, "target_height": target_height})
        sizes = torch.tensor([[height, width, crop_h, crop_w, target_height, target_width]], dtype=torch.float32)
        return torch.cat([pooled_output, sizes / 1000.0], dim=1)


def cond(value: float, tokens: int = 77, dim: int = 8, **extra) -> list:
    return [(torch.full((1, tokens, dim), value), dict(extra))]


def _inputs(shape=(1, 4, 8, 8), sigma=2.5):
    x = torch.linspace(-2, 2, torch.Size(shape).numel()).reshape(shape)
    return x, torch.full((shape[0],), sigma)


def test_uncond_and_cond_share_one_call_uncond_first():
    model = FakeModel()
    guider = Guider(model, cond(1.0), cond(-1.0), cfg=7.5).prepare(*_noise_latent())
    x, sigma = _inputs()
    out = guider(x, sigma)
    assert len(model.calls) == 1
    call = model.calls[0]
    assert call["x"].shape[0] == 2
    assert call["context"][:, 0, 0].tolist() == [-1.0, 1.0]   # [uncond, cond]
    assert torch.equal(call["sigma"], torch.cat([sigma, sigma]))
    c = model.predict(x, sigma, torch.full((1, 77, 8), 1.0))
    u = model.predict(x, sigma, torch.full((1, 77, 8), -1.0))
    assert torch.equal(out, u + (c - u) * 7.5)


def test_cfg_one_skips_the_negative():
    model = FakeModel()
    guider = Guider(model, cond(1.0), cond(-1.0), cfg=1.0).prepare(*_noise_latent())
    x, sigma = _inputs()
    out = guider(x, sigma)
    assert len(model.calls) == 1 and model.calls[0]["x"].shape[0] == 1
    assert model.calls[0]["context"][0, 0, 0] == 1.0
    assert torch.equal(out, model.predict(x, sigma, torch.full((1, 77, 8), 1.0)))
    # cfg++ samplers switch the shortcut off: both sides run again.
    guider.predict(x, sigma, need_uncond=True)
    assert model.calls[1]["x"].shape[0] == 2


def test_prediction_hands_both_sides_to_the_samplers():
    model = FakeModel()
    guider = Guider(model, cond(1.0), cond(-1.0), cfg=3.0).prepare(*_noise_latent())
    x, sigma = _inputs()
    prediction = guider.predict(x, sigma)
    assert not prediction.combined and prediction.scale == 3.0
    assert torch.equal(prediction.uncond, model.predict(x, sigma, torch.full((1, 77, 8), -1.0)))
    assert torch.equal(prediction.cond, model.predict(x, sigma, torch.full((1, 77, 8), 1.0)))


def _noise_latent(shape=(1, 4, 8, 8)):
    return torch.zeros(shape), torch.zeros(shape)


def _feather(size: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """Independent 1-D version of ComfyUI's area feather: linear ramp of min(8, size//4) px."""
    w = torch.ones(size, dtype=torch.float64)
    rr = min(8, size // 4)
    for t in range(rr):
        if at_start:
            w[t] *= (t + 1) / rr
        if at_end:
            w[size - 1 - t] *= (t + 1) / rr
    return w


def test_area_strength_and_feathering():
    model = FakeModel()
    full = cond(0.5)
    # 64x64 px area at (x=0, y=32) of a 128x128 image: latent (h=8, w=8, y=4, x=0) on 16x16.
    (area_c,) = conditioning_set_area(conditioning=cond(2.0), width=64, height=64, x=0, y=32, strength=0.5)
    assert area_c[0][1] == {"area": (8, 8, 4, 0), "strength": 0.5, "set_area_to_bounds": False}
    (positive,) = conditioning_combine(conditioning_1=full, conditioning_2=area_c)
    negative = cond(-1.0)
    shape = (1, 4, 16, 16)
    guider = Guider(model, positive, negative, cfg=2.0).prepare(*_noise_latent(shape))
    x, sigma = _inputs(shape)
    out = guider(x, sigma)

    # Two calls: full-size [uncond, cond], then the area crop [uncond twin, area cond].
    assert [c["x"].shape for c in model.calls] == [torch.Size([2, 4, 16, 16]), torch.Size([2, 4, 8, 8])]
    assert model.calls[1]["context"][:, 0, 0].tolist() == [-1.0, 2.0]

    mult = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    mult[..., 4:12, 0:8] = 0.5 * _feather(8, True, True)[:, None] * _feather(8, False, True)[None, :]
    pred = {v: model.predict(x, sigma, torch.full((1, 77, 8), v)).double() for v in (0.5, 2.0, -1.0)}
    cond_pred = (pred[0.5] + pred[2.0] * mult) / (1 + mult)
    uncond_pred = (pred[-1.0] + pred[-1.0] * mult) / (1 + mult)
    expected = uncond_pred + (cond_pred - uncond_pred) * 2.0
    assert (out.double() - expected).abs().max() < 1e-5
    # Outside the area only the full cond counts.
    assert torch.allclose(out[..., :4, :], expected[..., :4, :].float(), atol=1e-6)


def test_percentage_area_matches_pixel_area():
    x, sigma = _inputs((1, 4, 16, 16))
    results = []
    for area in [(8, 8, 4, 0), ("percentage", 0.5, 0.5, 0.25, 0.0)]:
        model = FakeModel()
        positive = cond(0.5) + cond(2.0, area=area, strength=0.5)
        guider = Guider(model, positive, cond(-1.0), cfg=2.0).prepare(*_noise_latent((1, 4, 16, 16)))
        results.append(guider(x, sigma))
    assert torch.equal(results[0], results[1])


def test_mask_cond_weights_by_mask_and_bounds():
    model = FakeModel()
    mask = torch.zeros(1, 16, 16)
    mask[:, 2:6, 3:7] = 1.0
    positive = cond(0.5) + cond(2.0, mask=mask, mask_strength=0.75, set_area_to_bounds=True)
    guider = Guider(model, positive, cond(-1.0), cfg=1.0).prepare(*_noise_latent((1, 4, 16, 16)))
    x, sigma = _inputs((1, 4, 16, 16))
    out = guider(x, sigma)
    # Bounds give an 8x8 crop at (y=2, x=3) (minimum size 8); weight = mask * mask_strength, no feather.
    assert [c["x"].shape[-2:] for c in model.calls] == [torch.Size([16, 16]), torch.Size([8, 8])]
    w = torch.zeros(1, 1, 16, 16)
    w[..., 2:6, 3:7] = 0.75
    a = model.predict(x, sigma, torch.full((1, 77, 8), 0.5))
    b = model.predict(x, sigma, torch.full((1, 77, 8), 2.0))
    assert torch.allclose(out, (a + b * w) / (1 + w), atol=1e-6)


def test_timestep_range_skips_cond_outside_its_sigmas():
    model = FakeModel()
    positive = cond(0.5) + cond(2.0, start_percent=0.5, end_percent=1.0)
    guider = Guider(model, positive, cond(-1.0), cfg=1.0).prepare(*_noise_latent())
    high = model.model_sampling.percent_to_sigma(0.5) * 1.5
    x, _ = _inputs()
    guider(x, torch.tensor([high]))
    assert model.calls[-1]["x"].shape[0] == 1           # second cond not active yet
    guider(x, torch.tensor([high / 3]))
    assert model.calls[-1]["x"].shape[0] == 2


def test_token_lengths_lcm_repeat_or_split():
    model = FakeModel()
    guider = Guider(model, cond(1.0, tokens=77), cond(-1.0, tokens=154), cfg=2.0).prepare(*_noise_latent())
    x, sigma = _inputs()
    guider(x, sigma)
    assert len(model.calls) == 1 and model.calls[0]["context"].shape == (2, 154, 8)
    positive = torch.full((1, 77, 8), 1.0)
    assert torch.equal(model.calls[0]["context"][1], positive.repeat(1, 2, 1)[0])
    model.calls.clear()
    guider = Guider(model, cond(1.0, tokens=77), cond(-1.0, tokens=385), cfg=2.0).prepare(*_noise_latent())
    guider(x, sigma)
    assert [c["context"].shape[1] for c in model.calls] == [77, 385]   # 5x > 4x limit: two calls


def test_sdxl_adm_sizes_default_to_latent_pixel_size():
    model = FakeModel(adm=True)
    pooled = torch.full((1, 4), 0.25)
    positive = cond(1.0, pooled_output=pooled)
    negative = cond(-1.0, pooled_output=pooled, width=1024, height=768, crop_w=16)
    guider = Guider(model, positive, negative, cfg=2.0).prepare(*_noise_latent((2, 4, 12, 10)))
    assert model.adm_calls == [
        {"width": 80, "height": 96, "crop_w": 0, "crop_h": 0, "target_width": 80, "target_height": 96},
        {"width": 1024, "height": 768, "crop_w": 16, "crop_h": 0, "target_width": 1024, "target_height": 768},
    ]
    x, sigma = _inputs((2, 4, 12, 10))
    guider(x, sigma)
    y = model.calls[0]["y"]
    assert y.shape == (4, 10)   # batch 2 x [uncond, cond]
    assert y[0, 4:].tolist() == torch.tensor([768, 1024, 0, 16, 768, 1024]).div(1000.0).tolist()
    assert y[2, 4:].tolist() == torch.tensor([96, 80, 0, 0, 96, 80]).div(1000.0).tolist()


def test_inpainting_model_concat_with_and_without_mask():
    model = FakeModel(in_channels=9)
    latent = torch.linspace(-1, 1, 4 * 64).reshape(1, 4, 8, 8)
    noise = torch.zeros_like(latent)
    pixel_mask = torch.zeros(1, 64, 64)
    pixel_mask[:, 16:48, 8:40] = 1.0
    mask = prepare_mask(pixel_mask, latent.shape)
    assert mask.shape == latent.shape
    guider = Guider(model, cond(1.0), cond(-1.0), cfg=2.0).prepare(noise, latent, mask)
    x, sigma = _inputs()
    guider(x, sigma)
    c_concat = model.calls[0]["c_concat"]
    assert c_concat.shape == (2, 5, 8, 8)
    assert torch.equal(c_concat[0, :1], mask[0, :1].round())
    assert torch.equal(c_concat[1, 1:], latent[0])

    model.calls.clear()
    Guider(model, cond(1.0), cond(-1.0), cfg=2.0).prepare(noise, latent, None)(x, sigma)
    c_concat = model.calls[0]["c_concat"]
    assert torch.equal(c_concat[:, 0], torch.ones(2, 8, 8))
    blank = torch.tensor([0.8223, -0.6876, 0.6364, 0.1380]).view(1, 4, 1, 1).expand(2, 4, 8, 8)
    assert torch.equal(c_concat[:, 1:], blank)


def test_prepare_mask_resizes_and_repeats():
    m = torch.zeros(64, 64)
    m[:32] = 1.0
    out = prepare_mask(m, torch.Size([3, 4, 8, 8]))
    assert out.shape == (3, 4, 8, 8) and out.dtype == torch.float32
    assert out[:, :, :4].eq(1).all() and out[:, :, 4:].eq(0).all()


def test_conditioning_zero_out_keeps_input():
    pooled = torch.ones(1, 4)
    c = cond(3.0, pooled_output=pooled, width=512)
    (out,) = conditioning_zero_out(conditioning=c)
    assert torch.equal(out[0][0], torch.zeros(1, 77, 8))
    assert torch.equal(out[0][1]["pooled_output"], torch.zeros(1, 4)) and out[0][1]["width"] == 512
    assert c[0][0][0, 0, 0] == 3.0 and torch.equal(c[0][1]["pooled_output"], pooled)


def test_inpainting_concat_from_cond_keys():
    """InpaintModelConditioning-style keys override the sampler's latent and mask."""
    model = FakeModel(in_channels=9)
    image = torch.linspace(-1, 1, 4 * 64).reshape(1, 4, 8, 8)
    pixel_mask = torch.zeros(1, 1, 64, 64)
    pixel_mask[..., 20:44, :30] = 1.0
    keys = {"concat_latent_image": image, "concat_mask": pixel_mask}
    guider = Guider(model, cond(1.0, **keys), cond(-1.0, **keys), cfg=2.0)
    guider.prepare(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), None)
    guider(*_inputs())
    c_concat = model.calls[0]["c_concat"][0]
    expected_mask = torch.nn.functional.interpolate(pixel_mask, size=(8, 8), mode="bilinear").round()
    assert torch.equal(c_concat[:1], expected_mask[0])
    assert torch.equal(c_concat[1:], image[0] * 0.18215)
