"""Module stages: a fused chain of tensor nodes as one exportable ``nn.Module``.

Each supported node is an op computing what the node's eager function computes, with the same
float operations, but written so ``torch.export`` can keep batch and spatial sizes symbolic:
sizes derived from the input (``ImageScaleBy``'s rounding, ``VAEEncode``'s crop) are computed
with integer arithmetic the shape solver can follow, and anything that needs concrete sizes
raises ``NeedsStaticShapes`` while tracing so lowering can retry with fixed sizes (or refuse
when the sizes are runtime inputs).
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any, Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import statically_known_true

from kiln.compiler.errors import KilnError, Problem
from kiln.compiler.graph import Link, Node
from kiln.compiler.lower.lanczos import coefficients, pil_lanczos
from kiln.compiler.stages import StageInput, flatten, unflatten
from kiln.nodes.models.tokenizer import BOS_TOKEN, EOS_TOKEN
from kiln.nodes.models.upscale_model import OVERLAP, TILE, tiled_scale
from kiln.nodes.resize import center_crop_to_aspect, common_upscale

# Resize methods that are one F.interpolate call; those needing concrete sizes: bislerp (the
# interpreter's gathers by computed indices, exported as is) and lanczos (PIL's 8-bit filter,
# reproduced in compiler/lower/lanczos.py, for images only).
INTERPOLATE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic")
STATIC_METHODS = ("bislerp", "lanczos")


class NeedsStaticShapes(Exception):
    """Raised while tracing with symbolic sizes when an op can only work with concrete ones."""

    def __init__(self, problem: Problem):
        super().__init__(problem.format())
        self.problem = problem


def _problem(node: Node, message: str, **kw) -> Problem:
    return Problem("unsupported_in_plan", message, node_id=node.id, class_type=node.class_type,
                   title=node.title, **kw)


def _is_static(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def scaled_size(size, scale: float, node: Node, what: str):
    """``round(size * scale)`` as ComfyUI computes it; for a symbolic size only when the product
    is provably a whole number (then no rounding is involved), else ``NeedsStaticShapes``."""
    if isinstance(size, int):
        return round(size * scale)
    ratio = Fraction(scale)
    if statically_known_true((size * ratio.numerator) % ratio.denominator == 0):
        return (size * ratio.numerator) // ratio.denominator
    raise NeedsStaticShapes(_problem(node, f"the {what} times {scale} is not always a whole number of pixels, "
                                     "so the rounded size cannot follow a runtime size", input_name="scale_by"))


def crop_to_multiple(pixels: torch.Tensor, ratio: int) -> torch.Tensor:
    """``kiln.nodes.vae.crop_to_multiple`` (centre crop of NHWC to multiples of ``ratio``) for
    symbolic sizes: a gather by index keeps the crop offset a runtime value."""
    for dim in (1, 2):
        size = pixels.shape[dim]
        if statically_known_true(size % ratio == 0):
            continue
        kept = (size // ratio) * ratio
        if isinstance(size, int):
            pixels = pixels.narrow(dim, (size % ratio) // 2, kept)
        else:
            index = torch.arange(kept, device=pixels.device) + (size % ratio) // 2
            pixels = pixels.index_select(dim, index)
    return pixels


# --- ops: one per node type ------------------------------------------------------------
class _Op(nn.Module):
    """One chain member: ``forward(**socket values) -> its output socket value``."""

    def __init__(self, node: Node):
        super().__init__()
        self.node_id = node.id
        self.node = node


class VaeDecode(_Op):
    def __init__(self, node: Node, vae):
        super().__init__(node)
        self.vae = vae.model

    def forward(self, samples: dict) -> torch.Tensor:
        z = samples["samples"].to(self.vae.dtype)
        x = self.vae.decoder(self.vae.post_quant_conv(z)).float()
        return torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0).movedim(1, -1)


class VaeEncode(_Op):
    def __init__(self, node: Node, vae):
        super().__init__(node)
        self.vae = vae.model
        self.ratio = vae.downscale_ratio

    def forward(self, pixels: torch.Tensor) -> dict:
        pixels = crop_to_multiple(pixels[:, :, :, :3], self.ratio)
        x = (pixels.movedim(-1, 1) * 2.0 - 1.0).to(self.vae.dtype)
        moments = self.vae.quant_conv(self.vae.encoder(x))
        return {"samples": moments[:, :moments.shape[1] // 2].float()}


class UpscaleWithModel(_Op):
    """ImageUpscaleWithModel: one model call when the image fits in one 512 px tile, else
    ComfyUI's overlapping feathered tiles (the interpreter's ``tiled_scale``, unrolled over the
    tile positions, so the image size must be concrete)."""

    def __init__(self, node: Node, descriptor):
        super().__init__(node)
        self.model = descriptor.model
        self.scale = descriptor.scale
        self.call = (lambda x: self.model(x)) if descriptor.size_requirements.none else descriptor
        self.largest = 0   # the largest side seen at concrete sizes (lowering's walk over the size range)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        batch, height, width = image.shape[0], image.shape[1], image.shape[2]
        if _is_static(height, width):
            self.largest = max(self.largest, height, width)
            fits = height <= TILE and width <= TILE
        else:
            # Symbolic sizes (a runtime size input): the shape walk ran the op at the range's ends,
            # so when the largest image it saw fits one tile, every size in the range does.
            fits = 0 < self.largest <= TILE
            if fits:
                torch._check(height <= TILE)
                torch._check(width <= TILE)
        if not fits and not _is_static(batch, height, width):
            raise NeedsStaticShapes(_problem(
                self.node, f"images larger than {TILE}x{TILE} are upscaled in tiles, which needs concrete sizes",
                input_name="image", expected=f"at most {TILE}x{TILE} pixels, or a constant size",
                found="a size set at run time"))
        alpha = None
        if image.shape[-1] == 4:
            image, alpha = image[..., :3], image[..., 3:4]
        pixels = image.movedim(-1, -3).float()
        if fits:
            out = self.call(pixels)
        else:
            out = tiled_scale(pixels, self.call, tile=TILE, overlap=OVERLAP, upscale_amount=self.scale,
                              output_device=pixels.device)
        out = torch.clamp(out, min=0, max=1.0).movedim(-3, -1)
        if alpha is not None:
            alpha = common_upscale(alpha.movedim(-1, -3).to(out), out.shape[2], out.shape[1], "bilinear", "disabled")
            out = torch.cat((out, alpha.movedim(-3, -1)), dim=-1)
        return out


class Resize(_Op):
    """ImageScale(By) / LatentUpscale(By): ``common_upscale`` to a size computed as the node does."""

    def __init__(self, node: Node, method: str, size: Callable[[Any, Any], tuple], crop: str, latent: bool):
        super().__init__(node)
        allowed = (*INTERPOLATE_METHODS, *STATIC_METHODS)
        if method not in allowed:
            raise KilnError([_problem(node, f"the {method!r} method cannot be compiled", input_name="upscale_method",
                                      expected="one of " + ", ".join(allowed), found=repr(method))])
        self.method, self.size, self.crop, self.latent = method, size, crop, latent

    def forward(self, **inputs) -> Any:
        value = inputs["samples" if self.latent else "image"]
        samples = value["samples"] if self.latent else value.movedim(-1, 1)
        height, width = samples.shape[-2], samples.shape[-1]
        size = self.size(height, width)
        if size is None:
            return value
        out_width, out_height = size
        if self.crop == "center" and not _is_static(height, width):
            raise NeedsStaticShapes(_problem(self.node, "a centre crop needs concrete sizes", input_name="crop"))
        if self.method in STATIC_METHODS and not _is_static(*samples.shape[-2:], out_width, out_height):
            raise NeedsStaticShapes(_problem(self.node, f"the {self.method} filter's weights depend on the sizes, "
                                             "which must be concrete", input_name="upscale_method"))
        if self.method == "lanczos":
            out = self._lanczos(samples, out_width, out_height)
        else:
            out = common_upscale(samples, out_width, out_height, self.method, self.crop)
        return {**value, "samples": out} if self.latent else out.movedim(1, -1)

    def _lanczos(self, samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
        if samples.shape[1] not in (1, 3):
            raise KilnError([_problem(self.node, "lanczos is compiled for RGB and one-channel images only",
                                      input_name="image", expected="1 or 3 channels",
                                      found=f"{samples.shape[1]} channels")])
        if self.crop == "center":
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


class ClipTextEncode(_Op):
    """CLIPTextEncode on a runtime prompt, given as tokens per text encoder
    (kiln.runtime.prompts.tokenize_prompt): ComfyUI's ``encode_token_weights`` per encoder, and
    for SDXL CLIP-L and CLIP-G hidden states side by side with CLIP-G's pooled output. The empty
    prompt is always encoded and ``torch.where`` applies the weights, which equals encoding it
    only when some weight is not 1."""

    def __init__(self, node: Node, clip):
        super().__init__(node)
        self.keys = list(clip.encoders)
        self.encoders = nn.ModuleList(clip.encoders.values())
        self.layers = [encoder.resolve_layer(clip.layer_idx) for encoder in self.encoders]
        self.sdxl = clip.arch == "sdxl"

    def forward(self, text: torch.Tensor) -> list:
        encoded = {key: self._encode(encoder, layer, tokens)
                   for key, encoder, layer, tokens in zip(self.keys, self.encoders, self.layers, text)}
        if self.sdxl:
            cond = torch.cat([encoded["l"][0], encoded["g"][0]], dim=-1)
            pooled = encoded["g"][1]
        else:
            ((cond, pooled),) = encoded.values()
        return [[cond, {"pooled_output": pooled}]]

    @staticmethod
    def _encode(enc, layer, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = enc.spec
        ids, weights = text[..., 0].long(), text[..., 1].float().unsqueeze(-1)
        count, length = ids.shape
        empty = torch.full((1, length), spec.pad_token, dtype=ids.dtype, device=ids.device)
        empty[0, 0], empty[0, 1] = BOS_TOKEN, EOS_TOKEN
        last, hidden, pooled, projected = enc(torch.cat([ids, empty]), layer)
        if layer is None:
            z = last
        else:
            z = enc.model.text_model.final_layer_norm(hidden) if spec.norm_hidden else hidden
        z = z.float()
        chunks, z_empty = z[:count], z[count:]
        chunks = torch.where(weights != 1.0, (chunks - z_empty) * weights + z_empty, chunks)
        pooled = (projected if spec.projected_pooled else pooled)[0:1].float()
        return chunks.reshape(1, count * length, -1), pooled


class ToUint8(_Op):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """SaveImage's ``np.clip(255. * i, 0, 255).astype(np.uint8)``: truncation, not rounding."""
        return (images * 255.0).clamp(0, 255).to(torch.uint8)


def _need_static(node: Node, *sizes) -> None:
    if not _is_static(*sizes):
        raise NeedsStaticShapes(_problem(node, "keeping the aspect ratio (a size of 0) needs concrete sizes"))


def _image_scale(node: Node, a: dict) -> _Op:
    def size(height, width):
        w, h = a["width"], a["height"]
        if w == 0 and h == 0:
            return None
        if w == 0 or h == 0:
            _need_static(node, height, width)
            w = w or max(1, round(width * h / height))
            h = h or max(1, round(height * w / width))
        return w, h
    return Resize(node, a["upscale_method"], size, a["crop"], latent=False)


def _image_scale_by(node: Node, a: dict) -> _Op:
    def size(height, width):
        return (scaled_size(width, a["scale_by"], node, "width"), scaled_size(height, a["scale_by"], node, "height"))
    return Resize(node, a["upscale_method"], size, "disabled", latent=False)


def _latent_upscale(node: Node, a: dict) -> _Op:
    def size(height, width):
        w, h = a["width"], a["height"]
        if w == 0 and h == 0:
            return None
        if w == 0 or h == 0:
            _need_static(node, height, width)
        if w == 0:
            h = max(64, h)
            w = max(64, round(width * h / height))
        elif h == 0:
            w = max(64, w)
            h = max(64, round(height * w / width))
        else:
            w, h = max(64, w), max(64, h)
        return w // 8, h // 8
    return Resize(node, a["upscale_method"], size, a["crop"], latent=True)


def _latent_upscale_by(node: Node, a: dict) -> _Op:
    def size(height, width):
        return (scaled_size(width, a["scale_by"], node, "width"), scaled_size(height, a["scale_by"], node, "height"))
    return Resize(node, a["upscale_method"], size, "disabled", latent=True)


_BUILDERS: dict[str, Callable[[Node, dict], _Op]] = {
    "VAEDecode": lambda node, a: VaeDecode(node, a["vae"]),
    "VAEEncode": lambda node, a: VaeEncode(node, a["vae"]),
    "ImageUpscaleWithModel": lambda node, a: UpscaleWithModel(node, a["upscale_model"]),
    "ImageScale": _image_scale,
    "ImageScaleBy": _image_scale_by,
    "LatentUpscale": _latent_upscale,
    "LatentUpscaleBy": _latent_upscale_by,
    "kiln.ImageToUint8": lambda node, a: ToUint8(node),
    "CLIPTextEncode": lambda node, a: ClipTextEncode(node, a["clip"]),
}


# --- the chain -----------------------------------------------------------------------------
class Chain(nn.Module):
    """``forward(*tensors)`` in the stage's input order -> the requested output fields, in order."""

    def __init__(self, ops: list[_Op], sources: list[dict[str, Any]], output_types: dict[str, str],
                 outputs: list[tuple[str, int, str]]):
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.sources = sources            # per op: input name -> Link | StageInput
        self.output_types = output_types  # node id -> output socket type
        self.outputs = outputs            # (node id, slot, field)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values: dict[tuple[str, int], Any] = {}
        for op, sources in zip(self.ops, self.sources):
            args = {}
            for name, source in sources.items():
                if isinstance(source, Link):
                    args[name] = values[(source.node_id, source.slot)]
                else:
                    args[name] = unflatten(source.type, {f: tensors[i] for f, i in source.fields.items()})
            values[(op.node_id, 0)] = op(**args)
        result = []
        for node_id, slot, field in self.outputs:
            fields, _ = flatten(self.output_types[node_id], values[(node_id, slot)])
            result.append(fields[field])
        return tuple(result)


def _split_output(name: str) -> tuple[str, int, str]:
    node_id, slot, field = name.split(".", 2)
    return node_id, int(slot), field


def build_chain(steps: list[tuple[Node, Any, dict[str, Any]]], outputs: list[str]) -> Chain:
    """The module of a ``module`` stage from ``kiln.compiler.stages.chain_members`` and the
    stage's output names (``<node>.<slot>.<field>``)."""
    ops, sources, types = [], [], {}
    for node, definition, resolved in steps:
        builder = _BUILDERS.get(node.class_type)
        if builder is None:
            raise KilnError([_problem(node, "this node cannot be compiled into a module stage",
                                      expected="one of " + ", ".join(_BUILDERS), found=node.class_type)])
        widgets = {k: v for k, v in resolved.items() if not isinstance(v, (Link, StageInput))}
        ops.append(builder(node, widgets))
        sources.append({k: v for k, v in resolved.items() if isinstance(v, (Link, StageInput))})
        types[node.id] = definition.outputs[0]
    return Chain(ops, sources, types, [_split_output(name) for name in outputs]).eval()
