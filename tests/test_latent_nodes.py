"""LATENT nodes: shapes, values and the dict keys they carry, as ComfyUI's nodes.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.nodes.latent import (
    empty_latent_image,
    latent_from_batch,
    latent_upscale,
    latent_upscale_by,
    repeat_latent_batch,
    set_latent_noise_mask,
)
from kiln.nodes.registry import get


def _latent(b=1, h=8, w=12):
    return {"samples": torch.arange(b * 4 * h * w, dtype=torch.float32).reshape(b, 4, h, w)}


def test_empty_latent_floors_to_multiples_of_8():
    (out,) = empty_latent_image(width=100, height=64, batch_size=3)
    assert out.keys() == {"samples"}
    assert out["samples"].shape == (3, 4, 8, 12) and out["samples"].dtype == torch.float32
    assert out["samples"].count_nonzero() == 0


def test_node_declarations_match_comfyui():
    spec = get("EmptyLatentImage")
    assert [(i.name, i.default, i.min, i.max, i.step) for i in spec.inputs] == [
        ("width", 512, 16, 16384, 8), ("height", 512, 16, 16384, 8), ("batch_size", 1, 1, 4096, 1)]
    ks = get("KSampler")
    assert [i.name for i in ks.inputs] == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler",
                                           "positive", "negative", "latent_image", "denoise"]
    assert ks.input("seed").max == 0xffffffffffffffff and ks.input("cfg").round == 0.01
    assert ks.seed == "seed" and get("KSamplerAdvanced").seed == "noise_seed"
    assert not ks.foldable and ks.needs_context and ks.outputs == ("LATENT",)
    adv = get("KSamplerAdvanced")
    assert [i.name for i in adv.inputs] == ["model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name",
                                            "scheduler", "positive", "negative", "latent_image", "start_at_step",
                                            "end_at_step", "return_with_leftover_noise"]
    assert adv.input("end_at_step").default == 10000 and adv.input("return_with_leftover_noise").default == "disable"
    assert get("LatentUpscale").input("upscale_method").choices == (
        "nearest-exact", "bilinear", "area", "bicubic", "bislerp")


def test_latent_upscale_sizes_and_aspect():
    lat = _latent(h=8, w=12)
    (out,) = latent_upscale(samples=lat, upscale_method="nearest-exact", width=0, height=128, crop="disabled")
    assert out["samples"].shape == (1, 4, 16, 24)          # width follows the aspect: 192 px
    assert torch.equal(out["samples"], F.interpolate(lat["samples"], size=(16, 24), mode="nearest-exact"))
    (out,) = latent_upscale(samples=lat, upscale_method="bilinear", width=20, height=0, crop="disabled")
    assert out["samples"].shape == (1, 4, 8, 8)            # both sides clamped to 64 px
    (out,) = latent_upscale(samples=lat, upscale_method="bilinear", width=96, height=0, crop="disabled")
    assert out["samples"].shape == (1, 4, 8, 12)           # height follows the aspect: 64 px
    (out,) = latent_upscale(samples=lat, upscale_method="area", width=0, height=0, crop="disabled")
    assert out is lat
    (out,) = latent_upscale(samples=lat, upscale_method="bilinear", width=64, height=64, crop="center")
    assert torch.equal(out["samples"], F.interpolate(lat["samples"][..., 2:10], size=(8, 8), mode="bilinear"))


def test_latent_upscale_by_rounds_and_keeps_keys():
    lat = {**_latent(h=8, w=12), "batch_index": [4]}
    (out,) = latent_upscale_by(samples=lat, upscale_method="bicubic", scale_by=1.3)
    assert out["samples"].shape == (1, 4, 10, 16) and out["batch_index"] == [4]
    assert torch.equal(out["samples"], F.interpolate(lat["samples"], size=(10, 16), mode="bicubic"))


def test_set_latent_noise_mask_reshapes():
    lat = _latent()
    (out,) = set_latent_noise_mask(samples=lat, mask=torch.ones(2, 64, 96))
    assert out["noise_mask"].shape == (2, 1, 64, 96) and "noise_mask" not in lat
    (out,) = set_latent_noise_mask(samples=lat, mask=torch.ones(64, 96))
    assert out["noise_mask"].shape == (1, 1, 64, 96)


def test_repeat_latent_batch_indices_and_masks():
    lat = _latent(b=2)
    (out,) = repeat_latent_batch(samples=lat, amount=3)
    assert out["samples"].shape == (6, 4, 8, 12) and torch.equal(out["samples"][4:], lat["samples"])
    assert "batch_index" not in out
    (out,) = repeat_latent_batch(samples={**lat, "batch_index": [2, 3]}, amount=3)
    assert out["batch_index"] == [2, 3, 4, 5, 6, 7]
    one_mask = torch.ones(1, 1, 64, 96)
    (out,) = repeat_latent_batch(samples={**lat, "noise_mask": one_mask}, amount=3)
    assert out["noise_mask"] is one_mask
    two_masks = torch.rand(2, 1, 64, 96)
    (out,) = repeat_latent_batch(samples={**lat, "noise_mask": two_masks}, amount=2)
    assert torch.equal(out["noise_mask"], torch.cat([two_masks, two_masks]))


def test_latent_from_batch_clamps_and_records_index():
    lat = _latent(b=4)
    (out,) = latent_from_batch(samples=lat, batch_index=2, length=5)
    assert torch.equal(out["samples"], lat["samples"][2:4]) and out["batch_index"] == [2, 3]
    (out,) = latent_from_batch(samples=lat, batch_index=9, length=1)
    assert torch.equal(out["samples"], lat["samples"][3:4]) and out["batch_index"] == [3]
    (out,) = latent_from_batch(samples={**lat, "batch_index": [10, 11, 12, 13]}, batch_index=1, length=2)
    assert out["batch_index"] == [11, 12]
    masks = torch.rand(2, 1, 8, 8)
    (out,) = latent_from_batch(samples={**lat, "noise_mask": masks}, batch_index=1, length=2)
    assert torch.equal(out["noise_mask"], torch.cat([masks[1:2], masks[0:1]]))   # masks tiled to the batch
    (out,) = latent_from_batch(samples={**lat, "noise_mask": masks[:1]}, batch_index=3, length=1)
    assert torch.equal(out["noise_mask"], masks[:1])
