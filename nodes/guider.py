"""The CFG guider: ComfyUI's ``CFGGuider`` + ``sampling_function`` (comfy/samplers.py) for a MODEL handle.

Conditioning is preprocessed once per sampling run as ComfyUI's ``process_conds`` does (areas,
masks, timestep ranges, per-cond model inputs: cross-attention context, SDXL ``y``, the
inpainting ``c_concat``; every positive area gets a negative twin with the same area).
Each denoiser call then evaluates every cond on its (feathered) area, batches all entries
whose shapes allow it into one ``apply_model`` call (ComfyUI's order: reversed, so
[uncond, cond]) and averages the predictions weighted by their masks; both sides go to the
samplers as a ``kiln.kernels.cfg.Prediction``, whose step kernels combine them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kiln.kernels.batching import repeat_to_batch_size, resize_to_batch_size
from kiln.kernels.cfg import Denoiser, Prediction, skips_uncond
from kiln.kernels.inpaint import concat_cond
from kiln.kernels.sdxl import size_options
from kiln.nodes.resize import common_upscale

if TYPE_CHECKING:
    from kiln.nodes.models.controlnet import Control

# Linear feather (latent px) on area edges that are not on the image border.
_AREA_FUZZ = 8
# count starts here so regions no cond covers divide to 0 instead of NaN.
_COUNT_EPS = 1e-37


# --- conditioning preprocessing (comfy/samplers.py: process_conds) -------------------------
@dataclass(frozen=True)
class _Cond:
    """One conditioning entry, resolved against the latent size and encoded for the model."""

    context: torch.Tensor                   # cross-attention tokens [b, T, C]
    y: torch.Tensor | None                  # SDXL vector cond (pooled text + size embeddings)
    c_concat: torch.Tensor | None           # inpainting UNet extra channels, full latent size
    area: tuple[int, int, int, int] | None  # (h, w, y, x) in latent px
    strength: float
    mask: torch.Tensor | None               # [b, h, w] at latent size
    mask_strength: float
    sigma_start: float | None               # skipped while sigma > sigma_start
    sigma_end: float | None                 # skipped while sigma < sigma_end
    control: Control | None = None          # ControlNet(s) applied to this entry
    control_to_uncond: bool = False         # ControlNetApply's: the negative side gets it too


def _mask_bounds(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """``set_area_to_bounds``: the mask's bounding box as an area, at least 8x8 (``get_mask_aabb``)."""
    bounds = mask.abs().amax(dim=0)
    if not bool((bounds != 0).any()):
        return (8, 8, 0, 0)
    ys, xs = torch.where(bounds != 0)
    y0, x0 = int(ys.min()), int(xs.min())
    return (max(8, int(ys.max()) - y0 + 1), max(8, int(xs.max()) - x0 + 1), y0, x0)


def _concat_cond(model, d: dict, noise: torch.Tensor, latent_image: torch.Tensor,
                 denoise_mask: torch.Tensor | None) -> torch.Tensor:
    """``BaseModel.concat_cond`` for inpainting UNets: [mask (1 ch), masked latent image]."""
    mask = d.get("concat_mask", denoise_mask)
    image = d.get("concat_latent_image")
    image = latent_image if image is None else model.latent_format.process_in(image)
    if image.shape[1:] != noise.shape[1:]:
        image = common_upscale(image, noise.shape[-1], noise.shape[-2], "bilinear", "center")
    image = resize_to_batch_size(image, noise.shape[0])
    if mask is not None:
        if mask.ndim == noise.ndim:
            mask = mask[:, :1]
        mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:]))
        if mask.shape[-2:] != noise.shape[-2:]:
            mask = common_upscale(mask, noise.shape[-1], noise.shape[-2], "bilinear", "center")
        mask = resize_to_batch_size(mask.round(), noise.shape[0])
    return concat_cond(noise, image, mask)


def _prepare_cond(model, tensor: torch.Tensor, d: dict, noise: torch.Tensor, latent_image: torch.Tensor,
                  denoise_mask: torch.Tensor | None) -> _Cond:
    h, w = noise.shape[2], noise.shape[3]
    area = d.get("area")
    if area is not None and area[0] == "percentage":
        _, ah, aw, ay, ax = area
        area = (max(1, round(ah * h)), max(1, round(aw * w)), round(ay * h), round(ax * w))
    mask = d.get("mask")
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
        if tuple(mask.shape[1:]) != (h, w):
            mask = common_upscale(mask.unsqueeze(1), w, h, "bilinear", "disabled").squeeze(1)
        if d.get("set_area_to_bounds", False):
            area = _mask_bounds(mask)

    ms = model.model_sampling
    sigma_start = ms.percent_to_sigma(d["start_percent"]) if "start_percent" in d else None
    sigma_end = ms.percent_to_sigma(d["end_percent"]) if "end_percent" in d else None

    y = model.encode_adm(d.get("pooled_output"), **size_options(d, h, w))
    c_concat = None
    if model.in_channels > model.latent_format.channels:
        c_concat = _concat_cond(model, d, noise, latent_image, denoise_mask)
    return _Cond(context=tensor, y=y, c_concat=c_concat, area=tuple(area) if area is not None else None,
                 strength=d.get("strength", 1.0), mask=mask, mask_strength=d.get("mask_strength", 1.0),
                 sigma_start=sigma_start, sigma_end=sigma_end, control=d.get("control"),
                 control_to_uncond=d.get("control_apply_to_uncond", False))


def _area_inside(inner: tuple, outer: tuple) -> bool:
    return (inner[2] >= outer[2] and inner[3] >= outer[3]
            and inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3])


def _add_matching_area(conds: list[_Cond], c: _Cond) -> None:
    """``create_cond_with_same_area_if_none``: give ``conds`` an entry on ``c``'s area, using the
    model inputs of the smallest entry that encloses it, so both CFG sides cover the same region."""
    if c.area is None:
        return
    smallest = None
    for other in conds:
        if other.area is None:
            if smallest is None:
                smallest = other
        elif _area_inside(c.area, other.area):
            if smallest is None or smallest.area is None \
                    or smallest.area[0] * smallest.area[1] > other.area[0] * other.area[1]:
                smallest = other
    if smallest is None or smallest.area == c.area:
        return
    conds.append(dataclasses.replace(c, context=smallest.context, y=smallest.y, c_concat=smallest.c_concat))


def prepare_conds(model, conds: dict[str, list], noise: torch.Tensor, latent_image: torch.Tensor,
                  denoise_mask: torch.Tensor | None) -> dict[str, list[_Cond]]:
    """CONDITIONING lists by name ("positive", "negative") -> resolved entries, as ``process_conds``."""
    out = {k: [_prepare_cond(model, t, d, noise, latent_image, denoise_mask) for t, d in v]
           for k, v in conds.items()}
    for k in out:
        for c in out[k]:
            for kk in out:
                if kk != k:
                    _add_matching_area(out[kk], c)
    for k in out:
        if k != "positive" and "positive" in out:
            _share_controls([c for c in out["positive"] if c.control_to_uncond], out[k])
    return out


def _share_controls(conds: list[_Cond], uncond: list[_Cond]) -> None:
    """``apply_empty_x_to_equal_area`` for ControlNetApply: full-area entries of the other side
    without a ControlNet take the positive side's, unless one of them already has one."""
    cond_controls = [c.control for c in conds if c.area is None and c.control is not None]
    if any(c.area is None and c.control is not None for c in uncond):
        return
    others = [i for i, c in enumerate(uncond) if c.area is None]
    for x, control in enumerate(cond_controls):
        if not others:
            return
        i = others[x % len(others)]
        uncond[i] = dataclasses.replace(uncond[i], control=control)


# --- one denoiser evaluation (comfy/samplers.py: calc_cond_batch) --------------------------
@dataclass
class _Entry:
    """One cond evaluated at the current x: its crop of x, weights and model inputs."""

    input_x: torch.Tensor
    mult: torch.Tensor
    area: tuple[int, int, int, int] | None
    context: torch.Tensor
    y: torch.Tensor | None
    c_concat: torch.Tensor | None
    slot: int   # index into the cond lists (0 positive, 1 negative)
    control: Control | None


def _entry(c: _Cond, x: torch.Tensor, sigma: torch.Tensor, slot: int) -> _Entry | None:
    """``get_area_and_mult``: crop x to the cond's area and build its weight (mask * strength, edges feathered)."""
    if c.sigma_start is not None and sigma[0] > c.sigma_start:
        return None
    if c.sigma_end is not None and sigma[0] < c.sigma_end:
        return None
    area = None
    input_x = x
    if c.area is not None:
        h, w, y0, x0 = c.area
        h, w = min(x.shape[2] - y0, h), min(x.shape[3] - x0, w)
        area = (h, w, y0, x0)
        input_x = x.narrow(2, y0, h).narrow(3, x0, w)
    if c.mask is not None:
        mask = c.mask[:input_x.shape[0]]
        if area is not None:
            mask = mask.narrow(1, area[2], area[0]).narrow(2, area[3], area[1])
        mask = mask * c.mask_strength
        mask = mask.unsqueeze(1).repeat((input_x.shape[0] // mask.shape[0], input_x.shape[1], 1, 1))
    else:
        mask = torch.ones_like(input_x)
    mult = mask * c.strength
    if c.mask is None and area is not None:
        for i in range(2):
            size, offset = area[i], area[2 + i]
            rr = min(_AREA_FUZZ, mult.shape[2 + i] // 4)
            if offset != 0:
                for t in range(rr):
                    mult.narrow(i + 2, t, 1).mul_((1.0 / rr) * (t + 1))
            if size + offset < x.shape[2 + i]:
                for t in range(rr):
                    mult.narrow(i + 2, size - 1 - t, 1).mul_((1.0 / rr) * (t + 1))

    batch = x.shape[0]
    c_concat = c.c_concat
    if c_concat is not None and area is not None:
        c_concat = c_concat.narrow(2, area[2], area[0]).narrow(3, area[3], area[1])
    return _Entry(input_x=input_x, mult=mult, area=area, slot=slot, control=c.control,
                  context=repeat_to_batch_size(c.context, batch),
                  y=None if c.y is None else repeat_to_batch_size(c.y, batch),
                  c_concat=None if c_concat is None else repeat_to_batch_size(c_concat, batch))


def _can_batch(a: _Entry, b: _Entry) -> bool:
    """ComfyUI's ``can_concat_cond``: same crop shape and concatenable model inputs. Context
    lengths may differ when the LCM needs at most 4x repetition (``CONDCrossAttn.can_concat``)."""
    if a.input_x.shape != b.input_x.shape or a.control is not b.control:
        return False
    s1, s2 = a.context.shape, b.context.shape
    if s1 != s2:
        if s1[0] != s2[0] or s1[2] != s2[2]:
            return False
        if math.lcm(s1[1], s2[1]) // min(s1[1], s2[1]) > 4:
            return False
    for t1, t2 in ((a.y, b.y), (a.c_concat, b.c_concat)):
        if (t1 is None) != (t2 is None) or (t1 is not None and t1.shape != t2.shape):
            return False
    return True


def _cat_context(contexts: list[torch.Tensor]) -> torch.Tensor:
    """``CONDCrossAttn.concat``: repeat each along tokens to the LCM length (attention is unchanged)."""
    length = contexts[0].shape[1]
    for c in contexts[1:]:
        length = math.lcm(length, c.shape[1])
    return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in contexts])


def calc_cond_batch(model, cond_lists: list[list[_Cond] | None], x: torch.Tensor,
                    sigma: torch.Tensor) -> list[torch.Tensor]:
    """Mask-weighted average prediction of each cond list (None -> zeros, the cfg==1 shortcut)."""
    outs = [torch.zeros_like(x) for _ in cond_lists]
    counts = [torch.ones_like(x) * _COUNT_EPS for _ in cond_lists]
    to_run = [e for slot, conds in enumerate(cond_lists) if conds is not None
              for e in (_entry(c, x, sigma, slot) for c in conds) if e is not None]
    while to_run:
        first = to_run[0]
        # All compatible entries in one call, in reverse list order (ComfyUI: [uncond, cond]).
        batch_ids = [i for i in range(len(to_run)) if _can_batch(to_run[i], first)][::-1]
        batch = [to_run.pop(i) for i in batch_ids]
        ys = [e.y for e in batch]
        concats = [e.c_concat for e in batch]
        input_x, sigmas = torch.cat([e.input_x for e in batch]), torch.cat([sigma] * len(batch))
        context = _cat_context([e.context for e in batch])
        y = None if ys[0] is None else torch.cat(ys)
        control = None if first.control is None else first.control.get_control(input_x, sigmas, context, y,
                                                                                len(batch), model)
        output = model.apply_model(input_x, sigmas, context=context, y=y,
                                   c_concat=None if concats[0] is None else torch.cat(concats),
                                   control=control, cond_or_uncond=tuple(e.slot for e in batch)).chunk(len(batch))
        for e, o in zip(batch, output):
            out, count = outs[e.slot], counts[e.slot]
            if e.area is not None:
                h, w, y0, x0 = e.area
                out = out.narrow(2, y0, h).narrow(3, x0, w)
                count = count.narrow(2, y0, h).narrow(3, x0, w)
            out += o * e.mult
            count += e.mult
    for out, count in zip(outs, counts):
        out /= count
    return outs


# --- the guider ----------------------------------------------------------------------------
class Guider(Denoiser):
    """Classifier-free guidance around a MODEL handle (ComfyUI's ``CFGGuider``):
    ``prepare`` resolves the conditioning for one sampling run, ``predict`` evaluates every
    entry (``calc_cond_batch``) and hands both sides to the samplers, whose step kernels combine
    them as ``cfg_function`` does."""

    def __init__(self, model, positive: list, negative: list, cfg: float):
        self.model = model
        self.positive = positive
        self.negative = negative
        self.cfg = cfg
        self._conds: dict[str, list[_Cond]] | None = None

    @property
    def model_sampling(self):
        return self.model.model_sampling

    def prepare(self, noise: torch.Tensor, latent_image: torch.Tensor,
                denoise_mask: torch.Tensor | None = None) -> "Guider":
        """Resolve the conditioning for this latent (sampler-space ``latent_image``, prepared mask)."""
        self._conds = prepare_conds(self.model, {"positive": self.positive, "negative": self.negative},
                                    noise, latent_image, denoise_mask)
        return self

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, *, need_uncond: bool = False, **_) -> Prediction:
        if self._conds is None:
            raise RuntimeError("Guider.prepare() must run before the guider is called")
        negative = None if skips_uncond(self.cfg, need_uncond) else self._conds["negative"]
        cond_pred, uncond_pred = calc_cond_batch(self.model, [self._conds["positive"], negative], x, sigma)
        return Prediction(cond_pred, None if negative is None else uncond_pred, self.cfg)
