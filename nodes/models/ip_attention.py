"""IP-Adapter terms inside the UNet's cross-attentions, as ComfyUI_IPAdapter_plus patches them
(``CrossAttentionPatch.py``: ``Attn2Replace``, ``ipadapter_attention``; ``IPAdapterPlus.py``:
the ``set_model_patch_replace`` calls of ``ipadapter_execute``).

Which attentions: every transformer of the input blocks, then of the output blocks, then of the
middle block, numbered in that order (``module_key`` 1, 3, 5, ...; SDXL numbers each transformer
block of a SpatialTransformer, SD1/SD2 one per SpatialTransformer). The middle block's patch is
registered under ``("middle", 1)`` while ComfyUI labels that block ``("middle", 0)``, so it never
fires: there is no IP term in the middle block, as in ComfyUI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kiln.kernels.errors import Problem
from kiln.nodes.models.ipadapter import IPAdapterPatch, tensor_to_size
from kiln.nodes.models.patching import ShallowCopy
from kiln.nodes.plan import NeedsStaticShapes, is_static


@dataclass
class CallState:
    """What ComfyUI's ``extra_options`` tell a patch during one UNet call."""

    sigma: torch.Tensor | float = 999999999.9   # the call's first sigma (a tensor: plans trace it)
    cond_or_uncond: tuple[int, ...] = (1, 0)     # per batch chunk: 0 cond, 1 uncond
    latent_shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Site:
    """One cross-attention the pack patches."""

    path: str                 # the attn2 module in the diffusers UNet
    block_type: str           # input | middle | output
    transformer_index: int    # SpatialTransformers run before it in a UNet call (the weight curves' t)
    module_key: str           # which to_k_ip / to_v_ip pair serves it
    fires: bool = True


def patch_sites(unet, per_transformer_block: bool) -> list[Site]:
    """The patched attentions of a diffusers UNet, with ComfyUI's indices."""
    groups: dict[str, list] = {"input": [], "middle": [], "output": []}
    t = 0

    def visit(block_type: str, attentions, prefix: str) -> None:
        nonlocal t
        for j, transformer in enumerate(attentions):
            paths = [f"{prefix}.{j}.transformer_blocks.{b}.attn2" for b in range(len(transformer.transformer_blocks))]
            groups[block_type].append((paths, t))
            t += 1

    for i, block in enumerate(unet.down_blocks):
        visit("input", getattr(block, "attentions", []), f"down_blocks.{i}.attentions")
    visit("middle", getattr(unet.mid_block, "attentions", []), "mid_block.attentions")
    for i, block in enumerate(unet.up_blocks):
        visit("output", getattr(block, "attentions", []), f"up_blocks.{i}.attentions")
    sites, number = [], 0
    for block_type in ("input", "output", "middle"):
        for paths, index in groups[block_type]:
            keys = [number + b for b in range(len(paths))] if per_transformer_block else [number] * len(paths)
            number = keys[-1] + 1
            sites += [Site(p, block_type, index, str(2 * k + 1), block_type != "middle") for p, k in zip(paths, keys)]
    return sites


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """ComfyUI's ``attention_pytorch``: k and v take q's batch size (``view(b, -1, ...)``), so a
    batch of several reference images reads as their tokens side by side."""
    b, _, dim_head = q.shape
    dim_head //= heads
    q, k, v = (t.reshape(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)


def _weight(patch: IPAdapterPatch, site: Site, layers: int):
    """(weight, cond, uncond) for this attention, or None when the patch adds nothing here."""
    weight, t, kind = patch.weight, site.transformer_index, patch.weight_type
    cond, uncond = patch.embeds.cond, patch.embeds.uncond
    if kind == "ease in":
        weight = weight * (0.05 + 0.95 * (1 - t / layers))
    elif kind == "ease out":
        weight = weight * (0.05 + 0.95 * (t / layers))
    elif kind == "ease in-out":
        weight = weight * (0.05 + 0.95 * (1 - abs(t - (layers / 2)) / (layers / 2)))
    elif kind == "reverse in-out":
        weight = weight * (0.05 + 0.95 * (abs(t - (layers / 2)) / (layers / 2)))
    elif kind == "weak input" and site.block_type == "input":
        weight = weight * 0.2
    elif kind == "weak middle" and site.block_type == "middle":
        weight = weight * 0.2
    elif kind == "weak output" and site.block_type == "output":
        weight = weight * 0.2
    elif kind == "strong middle" and site.block_type in ("input", "output"):
        weight = weight * 0.2
    elif isinstance(weight, dict):
        if t not in weight:
            return None
        swap = False
        if kind == "style transfer precise":
            swap = (layers == 11 and t == 3) or (layers == 16 and t in (4, 5))
        elif kind == "composition precise":
            swap = (layers == 11 and t != 3) or (layers == 16 and t not in (4, 5))
        if swap:
            uncond, cond = cond, cond * 0
        weight = weight[t]
    if weight == 0:
        return None
    return weight, cond, uncond


def ip_term(patch: IPAdapterPatch, site: Site, q: torch.Tensor, heads: int, state: CallState):
    """``ipadapter_attention``: the term one patch adds to one attention's output (0 for none)."""
    module = patch.module
    resolved = _weight(patch, site, module.layers)
    if resolved is None:
        return 0
    weight, cond, uncond = resolved
    dtype = q.dtype
    cond_or_uncond = state.cond_or_uncond
    batch_prompt = q.shape[0] // len(cond_or_uncond)
    to_k, to_v = module.to_kvs[site.module_key + "_to_k_ip"], module.to_kvs[site.module_key + "_to_v_ip"]
    k_cond, k_uncond = to_k(cond).repeat(batch_prompt, 1, 1), to_k(uncond).repeat(batch_prompt, 1, 1)
    v_cond, v_uncond = to_v(cond).repeat(batch_prompt, 1, 1), to_v(uncond).repeat(batch_prompt, 1, 1)
    ip_k = torch.cat([(k_cond, k_uncond)[i] for i in cond_or_uncond], dim=0)
    ip_v = torch.cat([(v_cond, v_uncond)[i] for i in cond_or_uncond], dim=0)
    scaling = patch.embeds_scaling
    if scaling == "K+mean(V) w/ C penalty":
        weight = weight * (float(ip_k.shape[2]) / 1280.0)
        ip_k = ip_k * weight
        mean = torch.mean(ip_v, dim=1, keepdim=True)
        ip_v = (ip_v - mean) + mean * weight
        out = _attention(q, ip_k, ip_v, heads)
    elif scaling == "K+V w/ C penalty":
        weight = weight * (float(ip_k.shape[2]) / 1280.0)
        out = _attention(q, ip_k * weight, ip_v * weight, heads)
    elif scaling == "K+V":
        out = _attention(q, ip_k * weight, ip_v * weight, heads)
    else:
        out = _attention(q, ip_k, ip_v, heads) * weight
    if patch.masked:
        out = out * _mask(patch.embeds.mask, q.shape[1], out.shape[2], batch_prompt, len(cond_or_uncond),
                          state.latent_shape)
    return out.to(dtype=dtype)


def _mask(mask: torch.Tensor, seq_len: int, channels: int, batch_prompt: int, chunks: int,
          latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The attention mask at this attention's token grid (the pack's aspect-preserving fit); its
    sizes are worked out in Python, so a plan compiles it at concrete sizes only."""
    if not is_static(seq_len, batch_prompt, *latent_shape):
        raise NeedsStaticShapes(Problem("unsupported_in_plan", "an IP-Adapter attn_mask is fitted to the latent "
                                        "at a concrete size and batch", input_name="attn_mask",
                                        expected="a constant EmptyLatentImage size and batch_size",
                                        found="runtime sizes"))
    oh, ow = latent_shape[-2], latent_shape[-1]
    mask_h = oh / math.sqrt(oh * ow / seq_len)
    mask_h = int(mask_h) + int((seq_len % int(mask_h)) != 0)
    mask_w = seq_len // mask_h
    mask = F.interpolate(mask.unsqueeze(1), size=(mask_h, mask_w), mode="bilinear").squeeze(1)
    mask = tensor_to_size(mask, batch_prompt).repeat(chunks, 1, 1)
    mask = mask.view(mask.shape[0], -1, 1).repeat(1, 1, channels)
    length = mask_h * mask_w
    if length < seq_len:
        pad = seq_len - length
        mask = F.pad(mask, (0, 0, pad // 2, pad - pad // 2), value=0.0)
    elif length > seq_len:
        start = (length - seq_len) // 2
        mask = mask[:, start:start + seq_len, :]
    return mask


@dataclass
class IPAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` for a cross-attention, with every stacked patch's term
    added before ``to_out`` while sigma is inside that patch's window (``Attn2Replace``)."""

    terms: list[tuple[IPAdapterPatch, Site]]
    state: CallState = field(repr=False, default_factory=CallState)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        sigma = torch.as_tensor(self.state.sigma, dtype=torch.float64)
        for patch, site in self.terms:
            # ``sigma_end <= sigma <= sigma_start`` as a select, so a compiled denoiser keeps it:
            # the same values as adding the term only inside the window.
            inside = (sigma >= patch.sigma_end) & (sigma <= patch.sigma_start)
            out = torch.where(inside.to(out.device), out + ip_term(patch, site, query, attn.heads, self.state), out)
        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        return out / attn.rescale_output_factor


def install(unet, patches: tuple[IPAdapterPatch, ...], per_transformer_block: bool, state: CallState):
    """A shallow copy of ``unet`` whose patched cross-attentions run ``IPAttnProcessor``s."""
    terms: dict[str, list] = {}
    for patch in patches:
        for site in patch_sites(unet, per_transformer_block):
            if site.fires:
                terms.setdefault(site.path, []).append((patch, site))
    tree = ShallowCopy(unet)
    for path, site_terms in terms.items():
        tree.module(path).set_processor(IPAttnProcessor(site_terms, state))
    return tree.root


def check_fits(unet, patch: IPAdapterPatch, per_transformer_block: bool) -> None:
    """Every patched attention has its to_k_ip/to_v_ip pair, of the attention's width."""
    for site in patch_sites(unet, per_transformer_block):
        if not site.fires:
            continue
        name = site.module_key + "_to_k_ip"
        if name not in patch.module.to_kvs:
            raise ValueError(f"the IP-Adapter has no attention weights for {site.path} "
                             f"({site.module_key}.to_k_ip): it was made for another model")
        attention = unet.get_submodule(site.path)
        gives, takes = patch.module.to_kvs[name].out_features, attention.to_k.out_features
        if gives != takes:
            raise ValueError(f"the IP-Adapter's {site.module_key}.to_k_ip gives {gives} channels, {site.path} "
                             f"takes {takes}: it was made for another model")
