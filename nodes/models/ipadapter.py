"""IP-Adapter models as the ComfyUI_IPAdapter_plus node pack runs them (``IPAdapterPlus.py:
ipadapter_execute``, ``image_proj_models.py``, ``utils.py``, commit 9d076a3).

A file holds an image projection (standard/light: ``ImageProjModel``; plus / plus-face: the
``Resampler``; full face: ``MLPProjModel``) and bias-free ``to_k_ip``/``to_v_ip`` pairs, one per
cross-attention the pack patches. ``prepare`` turns reference images into the projected cond /
uncond tokens and an ``IPAdapterPatch``: what ``kiln.nodes.models.ip_attention`` adds to each
patched attention.
"""
from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field

import torch
from torch import nn

from kiln.nodes.models.detect import ModelFileError
from kiln.nodes.models.patching import Tensors

WEIGHT_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "style transfer precise", "composition precise")
COMBINE_EMBEDS = ("concat", "add", "subtract", "average", "norm average")
EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
CLIPVISION_SIZE = 224   # the pack encodes at 224 px whatever the encoder (Kolors aside)


def read_ipadapter(sd: dict, is_safetensors: bool, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """``ipadapter_model_loader``: ``{"image_proj": ..., "ip_adapter": ...}`` from a ``.bin``'s
    nested dicts or a ``.safetensors``' prefixed keys (``adapter_modules`` accepted)."""
    if is_safetensors:
        model: dict = {"image_proj": {}, "ip_adapter": {}}
        for key, value in sd.items():
            for prefix, part in (("image_proj.", "image_proj"), ("ip_adapter.", "ip_adapter"),
                                 ("adapter_modules.", "ip_adapter")):
                if key.startswith(prefix):
                    model[part][key[len(prefix):]] = value
    else:
        model = dict(sd)
        if "adapter_modules" in model:
            model["ip_adapter"] = model.pop("adapter_modules")
    if not isinstance(model.get("ip_adapter"), dict) or not model["ip_adapter"] \
            or not isinstance(model.get("image_proj"), dict):
        raise ModelFileError("expected an IP-Adapter (image_proj and ip_adapter weights), found "
                             + ", ".join(list(sd)[:3]))
    if "plusv2" in name.lower() or "unnorm" in name.lower() or "0.to_q_lora.down.weight" in model["ip_adapter"]:
        raise ModelFileError("found a FaceID IP-Adapter, which needs insightface; kiln does not support FaceID")
    return model


# --- the projection models (image_proj_models.py) -------------------------------------------
class ImageProjModel(nn.Module):
    def __init__(self, cross_attention_dim: int, clip_embeddings_dim: int, tokens: int):
        super().__init__()
        self.cross_attention_dim, self.tokens = cross_attention_dim, tokens
        self.proj = nn.Linear(clip_embeddings_dim, tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(image_embeds).reshape(-1, self.tokens, self.cross_attention_dim))


class MLPProjModel(nn.Module):
    def __init__(self, cross_attention_dim: int, clip_embeddings_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(clip_embeddings_dim, clip_embeddings_dim), nn.GELU(),
                                  nn.Linear(clip_embeddings_dim, cross_attention_dim),
                                  nn.LayerNorm(cross_attention_dim))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(image_embeds)


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.heads, -1).transpose(1, 2).reshape(b, self.heads, length, -1)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, length, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return self.to_out((weight @ v).permute(0, 2, 1, 3).reshape(b, length, -1))


class Resampler(nn.Module):
    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                                         nn.Linear(dim * ff_mult, dim, bias=False))])
            for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def _count(keys, template: str) -> int:
    n = 0
    while any(k.startswith(template.format(n)) for k in keys):
        n += 1
    return n


@dataclass(frozen=True)
class AdapterKind:
    """What ``ipadapter_execute`` reads off the file: ``full`` (MLP), ``plus`` (Resampler) or standard."""

    full: bool
    plus: bool
    cross_dim: int          # the UNet's cross-attention width its to_k_ip take
    embedding_dim: int      # the CLIP vision width (plus/full) or projection size (standard) it takes
    tokens: int

    @property
    def embeds(self) -> str:
        return "penultimate_hidden_states" if self.plus else "image_embeds"


def adapter_kind(model: dict) -> AdapterKind:
    proj, layers = model["image_proj"], model["ip_adapter"]
    if "1.to_k_ip.weight" not in layers:
        raise ModelFileError("expected IP-Adapter attention weights (1.to_k_ip.weight, ...), found "
                             + ", ".join(list(layers)[:3]))
    full = "proj.3.weight" in proj
    plus = full or "latents" in proj or "perceiver_resampler.proj_in.weight" in proj
    if "perceiver_resampler.proj_in.weight" in proj:
        raise ModelFileError("found a Kolors FaceID IP-Adapter, which kiln does not support")
    cross_dim = layers["1.to_k_ip.weight"].shape[1]
    if full:
        return AdapterKind(True, True, cross_dim, proj["proj.0.weight"].shape[1], 257)
    if plus:
        return AdapterKind(False, True, cross_dim, proj["proj_in.weight"].shape[1], proj["latents"].shape[1])
    return AdapterKind(False, False, cross_dim, proj["proj.weight"].shape[1], proj["proj.weight"].shape[0] // cross_dim)


class IPAdapterModule(nn.Module):
    """The projection model and the ``to_kvs`` Linears (``IPAdapter`` + ``To_KV``), built from the file."""

    def __init__(self, model: dict, kind: AdapterKind):
        super().__init__()
        proj = model["image_proj"]
        if kind.full:
            self.image_proj_model = MLPProjModel(kind.cross_dim, kind.embedding_dim)
        elif kind.plus:
            dim = proj["latents"].shape[-1]
            self.image_proj_model = Resampler(dim, _count(proj, "layers.{}."), 64,
                                              proj["layers.0.0.to_q.weight"].shape[0] // 64, kind.tokens,
                                              kind.embedding_dim, proj["proj_out.weight"].shape[0])
        else:
            self.image_proj_model = ImageProjModel(kind.cross_dim, kind.embedding_dim, kind.tokens)
        missing, unexpected = self.image_proj_model.load_state_dict(proj, strict=False)
        if missing or unexpected:
            raise ModelFileError(f"the IP-Adapter's image projection does not fit its kind: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
        self.to_kvs = nn.ModuleDict()
        for key, value in model["ip_adapter"].items():
            linear = nn.Linear(value.shape[1], value.shape[0], bias=False)
            linear.weight.data = value.float()
            self.to_kvs[key.replace(".weight", "").replace(".", "_")] = linear

    @property
    def layers(self) -> int:
        """The pack's ``layers`` for the weight curves: 11 for SDXL adapters, else 16."""
        return 11 if "101_to_k_ip" in self.to_kvs else 16


def tensor_to_size(source: torch.Tensor, size: int) -> torch.Tensor:
    """Cut, or pad by repeating the last item, along the batch (the pack's ``tensor_to_size``)."""
    if source.shape[0] < size:
        return torch.cat((source, source[-1:].repeat([size - source.shape[0]] + [1] * (source.dim() - 1))), dim=0)
    return source[:size]


def combine(embeds: torch.Tensor, how: str) -> torch.Tensor:
    """``combine_embeds`` over the reference images (``concat`` keeps them all)."""
    if how == "add":
        return torch.sum(embeds, dim=0).unsqueeze(0)
    if how == "subtract":
        return (embeds[0] - torch.mean(embeds[1:], dim=0)).unsqueeze(0)
    if how == "average":
        return torch.mean(embeds, dim=0).unsqueeze(0)
    if how == "norm average":
        return torch.mean(embeds / torch.norm(embeds, dim=0, keepdim=True), dim=0).unsqueeze(0)
    return embeds


def layer_weights(weight: float, weight_type: str, is_sdxl: bool) -> float | dict[int, float]:
    """The dict weight types: weight per transformer index (``ipadapter_execute``)."""
    w = weight
    if weight_type == "style transfer":
        return {6: w} if is_sdxl else {i: w for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}
    if weight_type == "composition":
        return {3: w} if is_sdxl else {4: w * 0.25, 5: w}
    if weight_type == "strong style transfer":
        indices = (0, 1, 2, 4, 5, 6, 7, 8, 9, 10) if is_sdxl else (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
        return {i: w for i in indices}
    if weight_type in ("style and composition", "style transfer precise"):   # weight_composition == weight here
        if is_sdxl:
            return {3: w, 6: w}
        return {0: w, 1: w, 2: w, 3: w, 4: w * 0.25, 5: w, 9: w, 10: w, 11: w, 12: w, 13: w, 14: w, 15: w}
    if weight_type == "composition precise":
        if is_sdxl:
            return {0: w * .1, 1: w * .1, 2: w * .1, 3: w, 4: w * .1, 5: w * .1, 6: w, 7: w * .1, 8: w * .1,
                    9: w * .1, 10: w * .1}
        return {0: w, 1: w, 2: w, 3: w, 4: w * 0.25, 5: w, 6: w * .1, 7: w * .1, 8: w * .1, 9: w, 10: w, 11: w,
                12: w, 13: w, 14: w, 15: w}
    return weight


@dataclass(eq=False)
class IPAdapterPatch:
    """One applied IP-Adapter: its module, the projected tokens and how to weight them."""

    module: IPAdapterModule
    cond: InitVar[torch.Tensor]             # [images, tokens, cross_dim]
    uncond: InitVar[torch.Tensor]
    weight: float | dict[int, float]
    weight_type: str
    sigma_start: float
    sigma_end: float
    embeds_scaling: str = "V only"
    mask: InitVar[torch.Tensor | None] = None
    cond_alt: dict = field(default_factory=dict)
    embeds: Tensors = field(init=False)     # cond, uncond and the attn_mask if any, as buffers

    def __post_init__(self, cond: torch.Tensor, uncond: torch.Tensor, mask: torch.Tensor | None):
        self.embeds = Tensors(cond=cond, uncond=uncond, **({} if mask is None else {"mask": mask}))

    @property
    def masked(self) -> bool:
        return hasattr(self.embeds, "mask")


def prepare(model, file: dict, clip_vision, image: torch.Tensor, *, weight: float, weight_type: str,
            combine_embeds: str, start_at: float, end_at: float, embeds_scaling: str,
            image_negative: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> IPAdapterPatch:
    """``ipadapter_execute`` up to the attention patches: encode, combine, project."""
    kind = adapter_kind(file)
    if kind.cross_dim != model.unet.config.cross_attention_dim:
        raise ValueError(f"the IP-Adapter's attention takes {kind.cross_dim}-wide text tokens but this "
                         f"{model.arch} UNet's are {model.unet.config.cross_attention_dim} wide: it was made for "
                         "another model")
    have = clip_vision.width if kind.plus else clip_vision.projection_dim
    if have != kind.embedding_dim:
        raise ValueError(f"the IP-Adapter takes {kind.embedding_dim}-wide CLIP vision "
                         f"{'hidden states' if kind.plus else 'embeddings'} but this encoder gives {have}: "
                         "use the CLIP vision model it was trained with (ViT-H or ViT-bigG)")
    module = IPAdapterModule(file, kind).to(model.device, model.dtype)
    with torch.inference_mode():
        cond_tokens, uncond_tokens = reference_tokens(clip_vision, module, kind, image, image_negative,
                                                      combine_embeds, model.device, model.dtype)
    ms = model.model_sampling
    return IPAdapterPatch(module, cond_tokens, uncond_tokens,
                          layer_weights(weight, weight_type, model.arch == "sdxl"), weight_type,
                          ms.percent_to_sigma(start_at), ms.percent_to_sigma(end_at), embeds_scaling,
                          None if attn_mask is None else attn_mask.to(model.device, model.dtype))


def reference_tokens(clip_vision, module: IPAdapterModule, kind: AdapterKind, image: torch.Tensor,
                     image_negative: torch.Tensor | None, combine_embeds: str, device, dtype):
    """The projected (cond, uncond) tokens of the reference images: encode at 224 px, combine,
    project -- what ``prepare`` gives the patch and a plan computes from run-time images."""
    cond = getattr(clip_vision.encode_image(image, size=CLIPVISION_SIZE), kind.embeds)
    if kind.plus:
        negative = image_negative if image_negative is not None else torch.zeros([1, CLIPVISION_SIZE,
                                                                                    CLIPVISION_SIZE, 3])
        uncond = clip_vision.encode_image(negative, size=CLIPVISION_SIZE).penultimate_hidden_states
    elif image_negative is not None:
        uncond = clip_vision.encode_image(image_negative, size=CLIPVISION_SIZE).image_embeds
    else:
        uncond = torch.zeros_like(cond)
    uncond = tensor_to_size(uncond, cond.shape[0])
    cond, uncond = cond.to(device, dtype), uncond.to(device, dtype)
    if combine_embeds != "concat" and cond.shape[0] > 1:
        cond, uncond = combine(cond, combine_embeds), uncond[0].unsqueeze(0)
    project = module.image_proj_model
    return project(cond).to(device, dtype), project(uncond).to(device, dtype)
