"""Image and latent resizing exactly as ComfyUI's ``comfy/utils.py: common_upscale``.

Shared by ImageScale/ImageScaleBy (pixels) and LatentUpscale/LatentUpscaleBy (latents), so
both take NCHW tensors. The float operations follow ComfyUI's order so results match bit for
bit: ``bislerp`` is ComfyUI's spherical interpolation of channel vectors, ``lanczos`` goes
through 8-bit PIL images (lossy by design, also for latents), everything else is a plain
``F.interpolate`` with torch's default ``align_corners``/``antialias``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch._subclasses.fake_tensor import unset_fake_temporarily

from kiln.kernels.errors import KilnError
from kiln.kernels.images import to_uint8
from kiln.kernels.lanczos import coefficients, pil_lanczos
from kiln.nodes.plan import NeedsStaticShapes, NodeModule, is_static, plan_problem, scaled_size

# Resize methods that are one F.interpolate call; those needing concrete sizes in a plan: bislerp
# (gathers by computed indices, exported as is) and lanczos (PIL's 8-bit filter, reproduced in
# kiln.kernels.lanczos, for images only).
INTERPOLATE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic")
STATIC_METHODS = ("bislerp", "lanczos")


def common_upscale(samples: torch.Tensor, width: int, height: int, upscale_method: str,
                   crop: str) -> torch.Tensor:
    """Resize NCHW ``samples`` to ``height`` x ``width``; ``crop="center"`` first trims the
    longer side so the aspect ratio matches the target (no letterboxing, no stretching)."""
    if crop == "center":
        samples = center_crop_to_aspect(samples, width, height)
    if upscale_method == "bislerp":
        return bislerp(samples, width, height)
    if upscale_method == "lanczos":
        return lanczos(samples, width, height)
    return F.interpolate(samples, size=(height, width), mode=upscale_method)


def center_crop_to_aspect(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    old_h, old_w = samples.shape[-2], samples.shape[-1]
    old_aspect = old_w / old_h
    new_aspect = width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return samples.narrow(-2, y, old_h - 2 * y).narrow(-1, x, old_w - 2 * x)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """PIL's LANCZOS filter per image on ``uint8(clip(255*x))`` pixels, back to ``/255`` floats.

    One channel becomes an "L" image, three "RGB", four "RGBA" (which PIL resizes with
    premultiplied alpha) -- the same PIL modes ComfyUI ends up with. Unlike ComfyUI, a
    one-channel input keeps its channel axis (ComfyUI returns [N,H,W] there).
    """
    hwc = samples.squeeze(1) if samples.shape[1] == 1 else samples.movedim(1, -1)
    out = []
    for image in hwc:
        pixels = to_uint8(image.cpu()).numpy()
        resized = np.array(Image.fromarray(pixels).resize((width, height), resample=Image.Resampling.LANCZOS))
        resized = torch.from_numpy(resized.astype(np.float32) / 255.0)
        out.append(resized.movedim(-1, 0) if resized.ndim == 3 else resized[None])
    return torch.stack(out).to(samples.device, samples.dtype)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Separable resize that slerps between the two neighbouring channel vectors (width first,
    then height), keeping each latent pixel's norm on the linear path between its neighbours'.

    Neighbours and weights come from bilinear interpolation of the source coordinates, so the
    sampling grid is exactly F.interpolate's (half-pixel centres, edges clamped).
    """
    dtype = samples.dtype
    x = samples.float()
    n, c, h, _ = x.shape

    lo, hi, ratio = _neighbours(x.shape[-1], width, x.device)
    rows = _slerp(_gather_channels_last(x, -1, lo), _gather_channels_last(x, -1, hi),
                  ratio.expand(n, 1, h, -1).movedim(1, -1).reshape(-1, 1))
    x = rows.reshape(n, h, width, c).movedim(-1, 1)

    lo, hi, ratio = _neighbours(h, height, x.device)
    lo, hi, ratio = (t.reshape(1, 1, -1, 1) for t in (lo, hi, ratio))
    cols = _slerp(_gather_channels_last(x, -2, lo), _gather_channels_last(x, -2, hi),
                  ratio.expand(n, 1, -1, width).movedim(1, -1).reshape(-1, 1))
    return cols.reshape(n, height, width, c).movedim(-1, 1).to(dtype)


def _neighbours(old: int, new: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output index: left source index, right source index (clamped), blend ratio.
    Shapes [1,1,1,new]."""
    coords = torch.arange(old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1)
    left = F.interpolate(coords, size=(1, new), mode="bilinear")
    ratio = left - left.floor()
    right = coords + 1
    right[..., -1] -= 1
    right = F.interpolate(right, size=(1, new), mode="bilinear")
    return left.to(torch.int64), right.to(torch.int64), ratio


def _gather_channels_last(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Pick positions ``index`` along ``dim`` and flatten to [pixels, channels]."""
    shape = list(x.shape)
    shape[dim] = index.shape[dim]
    picked = x.gather(dim, index.expand(shape))
    return picked.movedim(1, -1).reshape(-1, x.shape[1])


def _slerp(b1: torch.Tensor, b2: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Slerp rows of ``b1`` towards ``b2`` by ``r`` ([N,1]); the result's norm is the linear
    blend of the two norms. Near-parallel pairs keep ``b1``; opposite pairs are lerped."""
    c = b1.shape[-1]
    n1 = torch.norm(b1, dim=-1, keepdim=True)
    n2 = torch.norm(b2, dim=-1, keepdim=True)
    u1 = b1 / n1
    u2 = b2 / n2
    u1[n1.expand(-1, c) == 0.0] = 0.0
    u2[n2.expand(-1, c) == 0.0] = 0.0

    dot = (u1 * u2).sum(1)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    rs = r.squeeze(1)
    res = (torch.sin((1.0 - rs) * omega) / so).unsqueeze(1) * u1 + (torch.sin(rs * omega) / so).unsqueeze(1) * u2
    res *= (n1 * (1.0 - r) + n2 * r).expand(-1, c)

    parallel = dot > 1 - 1e-5
    res[parallel] = b1[parallel]
    opposite = dot < 1e-5 - 1
    res[opposite] = (b1 * (1.0 - r) + b2 * r)[opposite]
    return res


# (height, width) of the input -> (width, height) of the output, or None for "unchanged".
SizeRule = Callable[[Any, Any], tuple | None]


def scale_by_size(node, scale_by: float) -> SizeRule:
    """ImageScaleBy's and LatentUpscaleBy's rule: each side times ``scale_by``, rounded."""
    def size(in_height, in_width):
        return scaled_size(in_width, scale_by, node, "width"), scaled_size(in_height, scale_by, node, "height")
    return size


def resize(value, method: str, size: SizeRule, crop: str, latent: bool, upscale=None):
    """An IMAGE (NHWC) or LATENT value resized to what ``size`` says, with ``upscale``
    (``common_upscale``'s signature; by default ``common_upscale`` itself)."""
    samples = value["samples"] if latent else value.movedim(-1, 1)
    target = size(samples.shape[-2], samples.shape[-1])
    if target is None:
        return value
    out = (upscale or common_upscale)(samples, target[0], target[1], method, crop)
    return {**value, "samples": out} if latent else out.movedim(1, -1)


class ResizeModule(NodeModule):
    """ImageScale(By) / LatentUpscale(By) in a plan: ``resize`` with the node's size rule (shared
    with its eager function); lanczos is the exportable ``kiln.kernels.lanczos`` filter whose
    weight matrices become stage buffers."""

    def __init__(self, node, method: str, size: SizeRule, crop: str, latent: bool):
        super().__init__(node)
        allowed = (*INTERPOLATE_METHODS, *STATIC_METHODS)
        if method not in allowed:
            raise KilnError([plan_problem(node, f"the {method!r} method cannot be compiled",
                                          input_name="upscale_method", expected="one of " + ", ".join(allowed),
                                          found=repr(method))])
        self.method, self.size, self.crop, self.latent = method, size, crop, latent

    def forward(self, **inputs) -> Any:
        return resize(inputs["samples" if self.latent else "image"], self.method, self.size, self.crop, self.latent,
                      self._upscale)

    def _upscale(self, samples: torch.Tensor, width, height, method: str, crop: str) -> torch.Tensor:
        if crop == "center" and not is_static(*samples.shape[-2:]):
            raise NeedsStaticShapes(plan_problem(self.node, "a centre crop needs concrete sizes", input_name="crop"))
        if method in STATIC_METHODS and not is_static(*samples.shape[-2:], width, height):
            raise NeedsStaticShapes(plan_problem(self.node, f"the {method} filter's weights depend on the "
                                                 "sizes, which must be concrete", input_name="upscale_method"))
        if method != "lanczos":
            return common_upscale(samples, width, height, method, crop)
        if samples.shape[1] not in (1, 3):
            raise KilnError([plan_problem(self.node, "lanczos is compiled for RGB and one-channel images only",
                                          input_name="image", expected="1 or 3 channels",
                                          found=f"{samples.shape[1]} channels")])
        if crop == "center":
            samples = center_crop_to_aspect(samples, width, height)
        return pil_lanczos(samples, width, height, self._lanczos_weights)

    def _lanczos_weights(self, in_size: int, out_size: int) -> torch.Tensor:
        """The coefficient matrix as a buffer (a stage weight, stored in the plan), made when
        lowering's shape walk first runs the op at these sizes, outside any fake-tensor mode."""
        name = f"lanczos_{in_size}_{out_size}"
        if name not in self._buffers:
            with unset_fake_temporarily():
                self.register_buffer(name, coefficients(in_size, out_size))
        return self._buffers[name]
