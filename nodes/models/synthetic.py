"""Random-weight single-file checkpoints in the real LDM layout, for tests and benchmarks.

UNet and VAE names/shapes are generated here from an architecture description following
``ldm/modules/diffusionmodules/openaimodel.py`` and ``model.py`` (not by converting a library
model back), so loading them checks the loader against the layout real checkpoints use.  The
text encoders come from ``synthetic_clip.clip_state_dict``; the UNet's cross-attention width and
SDXL's pooled width are read from those tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from kiln.nodes.models.detect import SD1_CLIP_PREFIX, SDXL_CLIP_G_PREFIX, SDXL_CLIP_L_PREFIX, UNET_PREFIX, VAE_PREFIX

Shapes = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, init kind: "w" | "b" | "norm_w" | "norm_b")


@dataclass(frozen=True)
class UnetArch:
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    depth: tuple[int, ...]          # transformer depth per level (0: no attention)
    depth_middle: int
    linear_proj: bool               # SD2/SDXL: Linear proj_in/out; SD1: 1x1 conv
    num_heads: int = -1             # SD1: fixed head count
    head_channels: int = -1         # SD2/SDXL: fixed head width
    adm_embed_dim: int | None = None  # SDXL: width of each size embedding (label_emb present)


@dataclass(frozen=True)
class VaeArch:
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int = 4


UNETS = {
    "tiny": {
        "sd1": UnetArch(32, (1, 2), 1, (1, 0), 1, False, num_heads=8),
        # Four levels of two res blocks, like SD2 itself, so output_blocks.11 (the v-prediction probe) exists.
        "sd2": UnetArch(64, (1, 1, 1, 1), 2, (1, 0, 0, 0), 1, True, head_channels=64),
        "sdxl": UnetArch(64, (1, 2), 1, (0, 2), 2, True, head_channels=64, adm_embed_dim=32),
    },
    "full": {
        "sd1": UnetArch(320, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1, False, num_heads=8),
        "sd2": UnetArch(320, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1, True, head_channels=64),
        "sdxl": UnetArch(320, (1, 2, 4), 2, (0, 2, 10), 10, True, head_channels=64, adm_embed_dim=256),
    },
}
VAES = {"tiny": VaeArch(32, (1, 1, 2, 2), 1), "full": VaeArch(128, (1, 2, 4, 4), 2)}


def _linear(shapes: Shapes, name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    shapes[name + ".weight"] = ((n_out, n_in), "w")
    if bias:
        shapes[name + ".bias"] = ((n_out,), "b")


def _conv(shapes: Shapes, name: str, n_in: int, n_out: int, k: int = 3) -> None:
    shapes[name + ".weight"] = ((n_out, n_in, k, k), "w")
    shapes[name + ".bias"] = ((n_out,), "b")


def _norm(shapes: Shapes, name: str, channels: int) -> None:
    shapes[name + ".weight"] = ((channels,), "norm_w")
    shapes[name + ".bias"] = ((channels,), "norm_b")


def _unet_resblock(shapes: Shapes, p: str, n_in: int, n_out: int, emb: int) -> None:
    _norm(shapes, p + "in_layers.0", n_in)
    _conv(shapes, p + "in_layers.2", n_in, n_out)
    _linear(shapes, p + "emb_layers.1", emb, n_out)
    _norm(shapes, p + "out_layers.0", n_out)
    _conv(shapes, p + "out_layers.3", n_out, n_out)
    if n_in != n_out:
        _conv(shapes, p + "skip_connection", n_in, n_out, k=1)


def _spatial_transformer(shapes: Shapes, p: str, ch: int, depth: int, context: int, linear: bool) -> None:
    """SpatialTransformer; inner width = heads * head width = ch for every SD family."""
    _norm(shapes, p + "norm", ch)
    for proj in ("proj_in", "proj_out"):
        if linear:
            _linear(shapes, p + proj, ch, ch)
        else:
            _conv(shapes, p + proj, ch, ch, k=1)
    for d in range(depth):
        b = f"{p}transformer_blocks.{d}."
        for attn, kv_in in (("attn1", ch), ("attn2", context)):
            _linear(shapes, f"{b}{attn}.to_q", ch, ch, bias=False)
            _linear(shapes, f"{b}{attn}.to_k", kv_in, ch, bias=False)
            _linear(shapes, f"{b}{attn}.to_v", kv_in, ch, bias=False)
            _linear(shapes, f"{b}{attn}.to_out.0", ch, ch)
        _linear(shapes, b + "ff.net.0.proj", ch, ch * 8)  # GEGLU: value and gate, 4x wide each
        _linear(shapes, b + "ff.net.2", ch * 4, ch)
        for n in ("norm1", "norm2", "norm3"):
            _norm(shapes, b + n, ch)


def unet_shapes(arch: UnetArch, context_dim: int, in_channels: int = 4, pooled_dim: int | None = None) -> Shapes:
    """Names (without prefix) and shapes of an openaimodel ``UNetModel``."""
    mc, emb = arch.model_channels, arch.model_channels * 4
    shapes: Shapes = {}
    _linear(shapes, "time_embed.0", mc, emb)
    _linear(shapes, "time_embed.2", emb, emb)
    if arch.adm_embed_dim is not None:
        _linear(shapes, "label_emb.0.0", pooled_dim + 6 * arch.adm_embed_dim, emb)
        _linear(shapes, "label_emb.0.2", emb, emb)
    _conv(shapes, "input_blocks.0.0", in_channels, mc)
    skips, ch, block = [mc], mc, 1
    levels = len(arch.channel_mult)
    for level, mult in enumerate(arch.channel_mult):
        for _ in range(arch.num_res_blocks):
            _unet_resblock(shapes, f"input_blocks.{block}.0.", ch, mc * mult, emb)
            ch = mc * mult
            if arch.depth[level]:
                _spatial_transformer(shapes, f"input_blocks.{block}.1.", ch, arch.depth[level], context_dim,
                                     arch.linear_proj)
            skips.append(ch)
            block += 1
        if level != levels - 1:
            _conv(shapes, f"input_blocks.{block}.0.op", ch, ch)
            skips.append(ch)
            block += 1
    _unet_resblock(shapes, "middle_block.0.", ch, ch, emb)
    _spatial_transformer(shapes, "middle_block.1.", ch, arch.depth_middle, context_dim, arch.linear_proj)
    _unet_resblock(shapes, "middle_block.2.", ch, ch, emb)
    block = 0
    for level in reversed(range(levels)):
        for i in range(arch.num_res_blocks + 1):
            _unet_resblock(shapes, f"output_blocks.{block}.0.", ch + skips.pop(), mc * arch.channel_mult[level], emb)
            ch = mc * arch.channel_mult[level]
            layer = 1
            if arch.depth[level]:
                _spatial_transformer(shapes, f"output_blocks.{block}.1.", ch, arch.depth[level], context_dim,
                                     arch.linear_proj)
                layer = 2
            if level and i == arch.num_res_blocks:
                _conv(shapes, f"output_blocks.{block}.{layer}.conv", ch, ch)
            block += 1
    _norm(shapes, "out.0", mc)
    _conv(shapes, "out.2", mc, 4)
    return shapes


def _vae_resblock(shapes: Shapes, p: str, n_in: int, n_out: int) -> None:
    _norm(shapes, p + "norm1", n_in)
    _conv(shapes, p + "conv1", n_in, n_out)
    _norm(shapes, p + "norm2", n_out)
    _conv(shapes, p + "conv2", n_out, n_out)
    if n_in != n_out:
        _conv(shapes, p + "nin_shortcut", n_in, n_out, k=1)


def _vae_mid(shapes: Shapes, p: str, ch: int) -> None:
    _vae_resblock(shapes, p + "mid.block_1.", ch, ch)
    _norm(shapes, p + "mid.attn_1.norm", ch)
    for name in ("q", "k", "v", "proj_out"):
        _conv(shapes, f"{p}mid.attn_1.{name}", ch, ch, k=1)
    _vae_resblock(shapes, p + "mid.block_2.", ch, ch)


def vae_shapes(arch: VaeArch) -> Shapes:
    """Names (without prefix) and shapes of an LDM ``AutoencoderKL`` (Encoder, Decoder, quant convs)."""
    shapes: Shapes = {}
    channels = [arch.ch * m for m in arch.ch_mult]
    z, levels = arch.z_channels, len(channels)
    _conv(shapes, "encoder.conv_in", 3, arch.ch)
    ch = arch.ch
    for i, out in enumerate(channels):
        for j in range(arch.num_res_blocks):
            _vae_resblock(shapes, f"encoder.down.{i}.block.{j}.", ch, out)
            ch = out
        if i != levels - 1:
            _conv(shapes, f"encoder.down.{i}.downsample.conv", ch, ch)
    _vae_mid(shapes, "encoder.", ch)
    _norm(shapes, "encoder.norm_out", ch)
    _conv(shapes, "encoder.conv_out", ch, 2 * z)
    _conv(shapes, "quant_conv", 2 * z, 2 * z, k=1)
    _conv(shapes, "post_quant_conv", z, z, k=1)
    _conv(shapes, "decoder.conv_in", z, ch)
    _vae_mid(shapes, "decoder.", ch)
    for i in reversed(range(levels)):
        for j in range(arch.num_res_blocks + 1):
            _vae_resblock(shapes, f"decoder.up.{i}.block.{j}.", ch, channels[i])
            ch = channels[i]
        if i != 0:
            _conv(shapes, f"decoder.up.{i}.upsample.conv", ch, ch)
    _norm(shapes, "decoder.norm_out", ch)
    _conv(shapes, "decoder.conv_out", ch, 3)
    return shapes


def randomize(shapes: Shapes, prefix: str, generator: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fan-in scaled weights (activations stay O(1) through deep stacks), small biases, unit norms."""
    out = {}
    for name, (shape, kind) in shapes.items():
        if kind == "norm_w":
            t = torch.ones(shape)
        elif kind == "norm_b":
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=generator)
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            t *= 0.02 if kind == "b" else fan_in ** -0.5
        out[prefix + name] = t.to(dtype)
    return out


def _width(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """Hidden width of the text encoder under ``prefix`` (its final LayerNorm)."""
    for key in (prefix + "text_model.final_layer_norm.weight", prefix + "ln_final.weight"):
        if key in sd:
            return sd[key].shape[0]
    raise ValueError(f"no final layer norm under {prefix!r} in the synthetic text encoder")


def _text_dims(clip: dict[str, torch.Tensor], arch: str) -> tuple[int, int | None]:
    """(UNet cross-attention width, pooled width) the text encoders of ``arch`` produce."""
    if arch == "sd1":
        return _width(clip, SD1_CLIP_PREFIX), None
    if arch == "sd2":
        return _width(clip, "cond_stage_model.model."), None
    pooled = clip[SDXL_CLIP_G_PREFIX + "text_projection"].shape[-1]
    return _width(clip, SDXL_CLIP_L_PREFIX) + _width(clip, SDXL_CLIP_G_PREFIX), pooled


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """Write next to the target, then rename: never a half-written model file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return path


def checkpoint_state_dict(arch: str, *, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float16,
                          inpainting: bool = False, v_prediction: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a synthetic single-file checkpoint (UNet, VAE and text encoders)."""
    from kiln.nodes.models.synthetic_clip import clip_state_dict

    if size not in UNETS or arch not in UNETS[size]:
        raise ValueError(f"no synthetic {size!r} {arch!r} checkpoint; archs {sorted(UNETS['tiny'])}, "
                         f"sizes {sorted(UNETS)}")
    generator = torch.Generator().manual_seed(seed)
    clip = clip_state_dict(arch, size, generator=generator, dtype=dtype)
    context_dim, pooled_dim = _text_dims(clip, arch)
    unet = unet_shapes(UNETS[size][arch], context_dim, 9 if inpainting else 4, pooled_dim)
    sd = {**randomize(unet, UNET_PREFIX, generator, dtype),
          **randomize(vae_shapes(VAES[size]), VAE_PREFIX, generator, dtype), **clip}
    if v_prediction:
        _mark_v_prediction(sd, arch, inpainting, generator)
    return sd


def _mark_v_prediction(sd: dict[str, torch.Tensor], arch: str, inpainting: bool,
                       generator: torch.Generator) -> None:
    """Make ComfyUI's ``model_type`` choose V_PREDICTION the way real checkpoints do."""
    if arch == "sdxl":
        sd["v_pred"] = torch.tensor([])
        return
    probe = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    if arch != "sd2" or inpainting or probe not in sd:
        raise ValueError(f"ComfyUI cannot detect v-prediction for a {arch} {'inpainting ' * inpainting}"
                         "checkpoint of this layout")
    # SD2-v's trained norm bias is what ComfyUI's heuristic keys on: std > 0.09.
    sd[probe] = (0.2 * torch.randn(sd[probe].shape, generator=generator)).to(sd[probe].dtype)


def write_checkpoint(path: str | Path, arch: str, *, size: str = "tiny", seed: int = 0,
                     dtype: torch.dtype = torch.float16, inpainting: bool = False,
                     v_prediction: bool = False) -> Path:
    """Write a random-weight ``arch`` ("sd1" | "sd2" | "sdxl") checkpoint as .safetensors.

    "tiny" loads and runs in well under a second; "full" is the real architecture (SD1.5:
    860M-parameter UNet, 12-layer CLIP-L) for benchmarks.
    """
    sd = checkpoint_state_dict(arch, size=size, seed=seed, dtype=dtype, inpainting=inpainting,
                               v_prediction=v_prediction)
    return _save(sd, Path(path))


def write_vae(path: str | Path, *, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float16,
              prefix: str = "") -> Path:
    """Write a random-weight standalone VAE (LDM layout, keys under ``prefix``) as .safetensors."""
    generator = torch.Generator().manual_seed(seed)
    return _save(randomize(vae_shapes(VAES[size]), prefix, generator, dtype), Path(path))
