"""LATENT nodes (nodes.py): empty latents, resizing, noise masks, batch slicing and repeating.

LATENT dicts hold raw VAE latents; every node returns a shallow copy so keys it does not
touch (``batch_index``, ``noise_mask``) travel on exactly as in ComfyUI.
"""
from __future__ import annotations

import math

import torch

from kiln.nodes.plan import need_static
from kiln.nodes.registry import COMBO, FLOAT, INT, SOCKET, PlanSpec, node
from kiln.nodes.resize import ResizeModule, resize, scale_by_size

MAX_RESOLUTION = 16384
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
CROP_METHODS = ("disabled", "center")
# EmptyLatentImage always makes 4 channels; the sampler widens an empty latent for other models.
EMPTY_LATENT_CHANNELS = 4


@node("EmptyLatentImage",
      [INT("width", 512, 16, MAX_RESOLUTION, 8), INT("height", 512, 16, MAX_RESOLUTION, 8),
       INT("batch_size", 1, 1, 4096)],
      ["LATENT"], category="latent",
      plan=PlanSpec("empty_latent", runtime_widgets={"width": "width", "height": "height", "batch_size": "batch_size"},
                    params={"channels": EMPTY_LATENT_CHANNELS}), display_name="Empty Latent Image")
def empty_latent_image(*, width: int, height: int, batch_size: int) -> tuple:
    """Zeros at 1/8 of the pixel size (floored, as ComfyUI)."""
    return ({"samples": torch.zeros([batch_size, EMPTY_LATENT_CHANNELS, height // 8, width // 8])},)


def latent_upscale_size(node, width: int, height: int):
    """LatentUpscale's rule, in latent units: a pixel size with each side at least 64; a 0 side
    follows the aspect ratio, both 0 is a no-op."""
    def size(in_height, in_width):
        w, h = width, height
        if w == 0 and h == 0:
            return None
        if w == 0 or h == 0:
            need_static(node, "keeping the aspect ratio (a size of 0) needs concrete sizes", in_height, in_width)
        if w == 0:
            h = max(64, h)
            w = max(64, round(in_width * h / in_height))
        elif h == 0:
            w = max(64, w)
            h = max(64, round(in_height * w / in_width))
        else:
            w, h = max(64, w), max(64, h)
        return w // 8, h // 8
    return size


@node("LatentUpscale",
      [SOCKET("samples", "LATENT"), COMBO("upscale_method", UPSCALE_METHODS, UPSCALE_METHODS[0]),
       INT("width", 512, 0, MAX_RESOLUTION, 8), INT("height", 512, 0, MAX_RESOLUTION, 8),
       COMBO("crop", CROP_METHODS, CROP_METHODS[0])],
      ["LATENT"], category="latent",
      plan=PlanSpec("module", computes=("samples",), lower=lambda node, w: ResizeModule(
          node, w["upscale_method"], latent_upscale_size(node, w["width"], w["height"]), w["crop"], latent=True)),
      display_name="Upscale Latent")
def latent_upscale(*, samples: dict, upscale_method: str, width: int, height: int, crop: str) -> tuple:
    """Resize to a pixel size (each side at least 64); a 0 side follows the aspect ratio."""
    return (resize(samples, upscale_method, latent_upscale_size(None, width, height), crop, latent=True),)


@node("LatentUpscaleBy",
      [SOCKET("samples", "LATENT"), COMBO("upscale_method", UPSCALE_METHODS, UPSCALE_METHODS[0]),
       FLOAT("scale_by", 1.5, 0.01, 8.0, 0.01)],
      ["LATENT"], category="latent",
      plan=PlanSpec("module", computes=("samples",), lower=lambda node, w: ResizeModule(
          node, w["upscale_method"], scale_by_size(node, w["scale_by"]), "disabled", latent=True)),
      display_name="Upscale Latent By")
def latent_upscale_by(*, samples: dict, upscale_method: str, scale_by: float) -> tuple:
    """Resize by a factor; the latent size is rounded to nearest."""
    return (resize(samples, upscale_method, scale_by_size(None, scale_by), "disabled", latent=True),)


@node("SetLatentNoiseMask", [SOCKET("samples", "LATENT"), SOCKET("mask", "MASK")], ["LATENT"],
      category="latent/inpaint", display_name="Set Latent Noise Mask")
def set_latent_noise_mask(*, samples: dict, mask: torch.Tensor) -> tuple:
    """Attach a [B,1,H,W] mask: the sampler regenerates only where it is 1."""
    return ({**samples, "noise_mask": mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))},)


@node("RepeatLatentBatch", [SOCKET("samples", "LATENT"), INT("amount", 1, 1, 64)], ["LATENT"],
      category="latent/batch", display_name="Repeat Latent Batch")
def repeat_latent_batch(*, samples: dict, amount: int) -> tuple:
    """Tile the batch ``amount`` times; ``batch_index`` continues past the source range so each
    copy gets its own noise."""
    s = dict(samples)
    s["samples"] = samples["samples"].repeat((amount, 1, 1, 1))
    # A one-item mask is left alone (it broadcasts); ComfyUI repeats larger ones as they are.
    if "noise_mask" in samples and samples["noise_mask"].shape[0] > 1:
        s["noise_mask"] = samples["noise_mask"].repeat((amount, 1, 1, 1))
    if "batch_index" in s:
        index = s["batch_index"]
        offset = max(index) - min(index) + 1
        s["batch_index"] = index + [x + i * offset for i in range(1, amount) for x in index]
    return (s,)


@node("LatentFromBatch",
      [SOCKET("samples", "LATENT"), INT("batch_index", 0, 0, 63), INT("length", 1, 1, 64)],
      ["LATENT"], category="latent/batch", display_name="Latent From Batch")
def latent_from_batch(*, samples: dict, batch_index: int, length: int) -> tuple:
    """Slice the batch, clamped to its size; records ``batch_index`` so the noise matches the
    slice's position in the full batch."""
    s = dict(samples)
    lat = samples["samples"]
    batch_index = min(lat.shape[0] - 1, batch_index)
    length = min(lat.shape[0] - batch_index, length)
    s["samples"] = lat[batch_index:batch_index + length].clone()
    if "noise_mask" in samples:
        masks = samples["noise_mask"]
        if masks.shape[0] == 1:
            s["noise_mask"] = masks.clone()
        else:
            if masks.shape[0] < lat.shape[0]:
                masks = masks.repeat(math.ceil(lat.shape[0] / masks.shape[0]), 1, 1, 1)[:lat.shape[0]]
            s["noise_mask"] = masks[batch_index:batch_index + length].clone()
    if "batch_index" in samples:
        s["batch_index"] = samples["batch_index"][batch_index:batch_index + length]
    else:
        s["batch_index"] = list(range(batch_index, batch_index + length))
    return (s,)
