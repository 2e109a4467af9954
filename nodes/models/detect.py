"""Read a single-file checkpoint's architecture from its tensor names and shapes.

Follows ComfyUI's ``comfy/model_detection.py: detect_unet_config`` (block counting, transformer
depths, proj_in rank, label_emb) and ``comfy/supported_models.py`` (head rules, latent formats,
``model_type``).  ComfyUI matches exact real sizes (model_channels 320, context 768/1024/2048);
kiln decides the family from the key layout instead, so tiny test checkpoints of the same layout
are recognised too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import torch

from kiln.kernels.model_sampling import SD15_LATENT, SDXL_LATENT, LatentFormat

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Text-encoder layouts of the supported families (key prefix -> what it is).
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_CLIP_PREFIXES = ("cond_stage_model.model.", "conditioner.embedders.0.model.")
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."

# Keys that identify model families kiln does not run (marker substring -> family).
_FOREIGN_MARKERS = (
    ("joint_blocks.0.context_block.", "an SD3 / MMDiT model"),
    ("double_blocks.0.img_attn.", "a Flux model"),
    ("transformer_blocks.0.attn.add_q_proj.", "a diffusers-layout SD3/Flux transformer"),
    ("clf.1.weight", "a Stable Cascade model"),
    ("time_stack.", "a Stable Video Diffusion model"),
    ("time_mix_blocks.", "a Stable Video Diffusion model"),
    ("lora_unet_", "a LoRA file"),
    ("lora_te_", "a LoRA file"),
    (".lora_down.", "a LoRA file"),
    ("down_blocks.0.resnets.0.conv1.weight", "a diffusers-layout model (not a single-file checkpoint)"),
    ("encoder.down.0.block.0.conv1.weight", "a standalone VAE (load it with VAELoader)"),
)


class ModelFileError(Exception):
    """A model file kiln cannot use: unreadable, corrupt, or of an unsupported architecture.

    ``path`` is filled in by the loader that opened the file, so the message names it.
    """

    def __init__(self, message: str, path: object = None):
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path is not None else self.message


@dataclass(frozen=True)
class UnetConfig:
    """ComfyUI's ``unet_config`` for an LDM UNet (lists in ComfyUI's order).

    ``transformer_depth`` has one entry per input res block, ``transformer_depth_output`` one per
    output block listed from the shallowest level (ComfyUI pops it from the end while building).
    ``transformer_depth_middle`` is -1 for a middle block without attention, -2 for none.
    """

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_output: tuple[int, ...]
    transformer_depth_middle: int
    context_dim: int | None
    use_linear_in_transformer: bool
    adm_in_channels: int | None
    temporal: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint is: family, UNet shape, parameterisation and latent format."""

    arch: str                      # "sd1" | "sd2" | "sdxl"
    unet: UnetConfig
    prediction: str                # "eps" | "v"
    latent_format: LatentFormat
    num_heads: int                 # fixed head count (SD1), or -1
    num_head_channels: int         # fixed head width (SD2, SDXL), or -1
    adm_embed_dim: int | None      # SDXL: width of each size embedding in ``y`` (256 in real SDXL)
    has_text_encoder: bool

    def heads(self, channels: int) -> int:
        """Attention heads of a transformer with ``channels`` channels (ComfyUI's rule)."""
        return self.num_heads if self.num_heads > 0 else channels // self.num_head_channels


def count_blocks(keys: Collection[str], template: str) -> int:
    """How many consecutive ``template.format(i)`` prefixes (i = 0, 1, ...) occur among ``keys``."""
    count = 0
    while any(k.startswith(template.format(count)) for k in keys):
        count += 1
    return count


def _transformer_info(sd: dict[str, torch.Tensor], keys: set[str], block: str):
    """(depth, context_dim, linear proj_in, temporal) of the SpatialTransformer at ``block``1, or None."""
    prefix = block + "1.transformer_blocks."
    if not any(k.startswith(prefix) for k in keys):
        return None
    depth = count_blocks(keys, prefix + "{}.")
    context_dim = sd[prefix + "0.attn2.to_k.weight"].shape[1]
    linear = sd[block + "1.proj_in.weight"].ndim == 2
    temporal = any(k.startswith((block + "1.time_stack.", block + "1.time_mix_blocks.")) for k in keys)
    return depth, context_dim, linear, temporal


def detect_unet_config(sd: dict[str, torch.Tensor], prefix: str = UNET_PREFIX) -> UnetConfig | None:
    """ComfyUI's ``detect_unet_config`` for LDM UNets; None when there is no LDM UNet under ``prefix``."""
    keys = {k for k in sd if k.startswith(prefix)}
    conv_in = prefix + "input_blocks.0.0.weight"
    if conv_in not in keys:
        return None
    model_channels, in_channels = sd[conv_in].shape[:2]
    out_key = prefix + "out.2.weight"
    out_channels = sd[out_key].shape[0] if out_key in keys else 4
    adm_key = prefix + "label_emb.0.0.weight"
    adm_in_channels = sd[adm_key].shape[1] if adm_key in keys else None

    num_res_blocks: list[int] = []
    channel_mult: list[int] = []
    depth: list[int] = []
    depth_out: list[int] = []
    context_dim, linear, temporal = None, False, False
    res_blocks, mult = 0, 0
    n_blocks = count_blocks(keys, prefix + "input_blocks.{}.")
    for i in range(n_blocks):
        block_in = f"{prefix}input_blocks.{i}."
        # Output blocks mirror input blocks: walk them from the last one up.
        block_out = f"{prefix}output_blocks.{n_blocks - i - 1}."
        if block_in + "0.op.weight" in keys:  # a downsample closes a level
            num_res_blocks.append(res_blocks)
            channel_mult.append(mult)
            res_blocks, mult = 0, 0
            info = _transformer_info(sd, keys, block_out)
            depth_out.append(info[0] if info else 0)
            continue
        if block_in + "0.in_layers.0.weight" in keys:
            res_blocks += 1
            mult = sd[block_in + "0.out_layers.3.weight"].shape[0] // model_channels
            info = _transformer_info(sd, keys, block_in)
            depth.append(info[0] if info else 0)
            if info and context_dim is None:
                _, context_dim, linear, temporal = info
        if block_out + "0.in_layers.0.weight" in keys:
            info = _transformer_info(sd, keys, block_out)
            depth_out.append(info[0] if info else 0)
    num_res_blocks.append(res_blocks)
    channel_mult.append(mult)

    if prefix + "middle_block.1.proj_in.weight" in keys:
        depth_middle = count_blocks(keys, prefix + "middle_block.1.transformer_blocks.{}.")
    elif prefix + "middle_block.0.in_layers.0.weight" in keys:
        depth_middle = -1
    else:
        depth_middle = -2
    return UnetConfig(
        in_channels=int(in_channels), out_channels=int(out_channels), model_channels=int(model_channels),
        channel_mult=tuple(channel_mult), num_res_blocks=tuple(num_res_blocks),
        transformer_depth=tuple(depth), transformer_depth_output=tuple(depth_out),
        transformer_depth_middle=depth_middle, context_dim=None if context_dim is None else int(context_dim),
        use_linear_in_transformer=linear, adm_in_channels=None if adm_in_channels is None else int(adm_in_channels),
        temporal=temporal,
    )


def _has_prefix(sd: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def text_encoder_layout(sd: dict[str, torch.Tensor]) -> str | None:
    """Which family's text encoder keys the checkpoint carries ("sd1" | "sd2" | "sdxl" |
    "sdxl_refiner"), or None when it has none."""
    if _has_prefix(sd, SDXL_CLIP_G_PREFIX) and _has_prefix(sd, SDXL_CLIP_L_PREFIX):
        return "sdxl"
    if _has_prefix(sd, "conditioner.embedders.0.model.") and _has_prefix(sd, UNET_PREFIX + "label_emb."):
        return "sdxl_refiner"
    if any(_has_prefix(sd, p) for p in SD2_CLIP_PREFIXES):
        return "sd2"
    if _has_prefix(sd, SD1_CLIP_PREFIX):
        return "sd1"
    return None


def describe_keys(sd: dict[str, torch.Tensor]) -> str:
    """A short description of what a state dict looks like, for error messages."""
    for marker, family in _FOREIGN_MARKERS:
        if any(marker in k for k in sd):
            return family
    if not sd:
        return "no tensors"
    sample = ", ".join(repr(k) for k in list(sd)[:3])
    return f"{len(sd)} tensors of an unknown layout (e.g. {sample})"


def _family(sd: dict[str, torch.Tensor], unet: UnetConfig) -> str:
    """The family from the text-encoder layout and ``label_emb`` (not from real-size numbers)."""
    clip = text_encoder_layout(sd)
    if unet.adm_in_channels is not None:
        if clip in ("sdxl", None):
            return "sdxl"
        names = {"sdxl_refiner": "an SDXL refiner", "sd2": "an SD2.1 unCLIP model"}
        raise ModelFileError(f"found {names.get(clip, 'a class-conditioned UNet')} "
                             f"(label_emb with {unet.adm_in_channels} inputs); "
                             "supported are SD1.x, SD2.x and SDXL base checkpoints")
    if clip == "sdxl":
        raise ModelFileError("found SDXL text encoders but no UNet label_emb (an SDXL checkpoint needs both)")
    if clip in ("sd1", "sd2"):
        return clip
    # No text encoder: SD2 is the family with linear transformer projections.
    return "sd2" if unet.use_linear_in_transformer else "sd1"


def _prediction(sd: dict[str, torch.Tensor], arch: str, unet: UnetConfig) -> str:
    """ComfyUI's ``model_type``: SD1 is always EPS; SD2 uses its norm-bias heuristic; SDXL a ``v_pred`` key."""
    if arch == "sd2":
        key = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
        if unet.in_channels == 4 and key in sd and torch.std(sd[key], unbiased=False) > 0.09:
            return "v"
        return "eps"
    if arch == "sdxl":
        for key, what in (("edm_mean", "Playground v2.5 (EDM)"), ("edm_vpred.sigma_max", "EDM v-prediction"),
                          ("ztsnr", "zero-terminal-SNR")):
            if key in sd:
                raise ModelFileError(f"found an SDXL checkpoint with {what} sampling ({key!r} key), "
                                     "which kiln does not support")
        return "v" if "v_pred" in sd else "eps"
    return "eps"


def _check_supported(unet: UnetConfig) -> None:
    if unet.temporal:
        raise ModelFileError("found a Stable Video Diffusion UNet (temporal layers); not supported")
    if unet.in_channels not in (4, 9) or unet.out_channels != 4:
        raise ModelFileError(f"expected a UNet with 4 (or 9, inpainting) input and 4 output channels, "
                             f"found {unet.in_channels} in / {unet.out_channels} out")
    if unet.context_dim is None:
        raise ModelFileError("found a UNet without cross-attention (no transformer blocks)")
    if unet.transformer_depth_middle < 1:
        raise ModelFileError("found a UNet whose middle block has no transformer; not supported")


def _sdxl_adm_embed_dim(sd: dict[str, torch.Tensor], adm_in_channels: int) -> int:
    """Width of each size embedding in SDXL's ``y`` = (label_emb inputs - pooled width) / 6.

    The pooled width is CLIP-G's projection; without text encoder weights kiln assumes
    ComfyUI's fixed 256-wide embeddings instead.
    """
    proj_key = SDXL_CLIP_G_PREFIX + "text_projection"
    if proj_key not in sd:
        if adm_in_channels <= 6 * 256:
            raise ModelFileError(f"SDXL label_emb takes {adm_in_channels} inputs and there is no CLIP-G "
                                 "text_projection to tell the pooled width (real SDXL: 2816 = 1280 + 6*256)")
        return 256
    pooled = sd[proj_key].shape[-1]
    embed_dim, rest = divmod(adm_in_channels - pooled, 6)
    if rest or embed_dim <= 0 or embed_dim % 2:
        raise ModelFileError(f"SDXL label_emb takes {adm_in_channels} inputs, which is not pooled text "
                             f"({pooled}) + 6 even-sized size embeddings")
    return embed_dim


def detect_model(sd: dict[str, torch.Tensor]) -> ModelInfo:
    """Classify a full single-file checkpoint; ModelFileError names what was found if unsupported."""
    unet = detect_unet_config(sd)
    if unet is None:
        raise ModelFileError("expected a Stable Diffusion checkpoint (UNet keys "
                             f"'{UNET_PREFIX}input_blocks.*'), found {describe_keys(sd)}")
    _check_supported(unet)
    arch = _family(sd, unet)
    adm_embed_dim = _sdxl_adm_embed_dim(sd, unet.adm_in_channels) if arch == "sdxl" else None
    sd1 = arch == "sd1"
    return ModelInfo(
        arch=arch, unet=unet, prediction=_prediction(sd, arch, unet),
        latent_format=SDXL_LATENT if arch == "sdxl" else SD15_LATENT,
        num_heads=8 if sd1 else -1, num_head_channels=-1 if sd1 else 64,
        adm_embed_dim=adm_embed_dim, has_text_encoder=text_encoder_layout(sd) is not None,
    )


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    """Where a tensor's data starts; equal for a tensor and the views converters make of it."""
    return t.untyped_storage().data_ptr(), t.storage_offset()


def converted_state(source: dict[str, torch.Tensor], converted: dict[str, torch.Tensor], *, device,
                    dtype=lambda stored: stored) -> dict[str, torch.Tensor]:
    """A module's state dict from a converter's output, each tensor moved to ``device`` and
    ``dtype`` (a dtype, or a function of the tensor's own) as it is taken: ``source`` (the file's
    tensors) is emptied first, so each file tensor is freed once converted and a checkpoint's fp16
    tensors never sit beside all of its fp32 modules."""
    source.clear()
    target = dtype if callable(dtype) else (lambda stored: dtype)
    return {k: (v := converted.pop(k)).to(device=device, dtype=target(v.dtype)) for k in list(converted)}


def check_conversion(source: dict[str, torch.Tensor], converted: dict[str, torch.Tensor | None],
                     expected: dict[str, torch.Size], what: str) -> None:
    """Strict loading: every source tensor used, every module tensor present with its shape.

    ``source`` are the file's tensors for one component, ``converted`` the converter's output,
    ``expected`` the module's own names and shapes.
    """
    used = {storage_key(t) for t in converted.values() if t is not None}
    unused = [k for k, t in source.items() if storage_key(t) not in used]
    missing = [k for k in expected if converted.get(k) is None]
    unexpected = [k for k in converted if k not in expected]
    wrong = [f"{k} {tuple(converted[k].shape)} (expected {tuple(s)})" for k, s in expected.items()
             if converted.get(k) is not None and converted[k].shape != s]
    problems = []
    for label, items in (("unused tensors", unused), ("missing tensors", missing),
                         ("unexpected tensors", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ModelFileError(f"the {what} weights do not match the architecture read from them; "
                             + "; ".join(problems))
