"""LoRA files for the tests, written from a checkpoint's own tensors in the layouts trainers save
(kohya over LDM or diffusers names, diffusers' attention processors, PEFT, LyCORIS), and the
reference merge they must equal: the checkpoint with ΔW added to its LDM weights by formula,
written out as a checkpoint of its own (no kiln code involved)."""
from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

UNET = "model.diffusion_model."
CLIP_KINDS = {"self_attn.q_proj": "self_attn_q_proj", "self_attn.k_proj": "self_attn_k_proj",
              "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj",
              "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2"}


def read(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def factors(shape: torch.Size, rank: int, generator: torch.Generator, scale: float = 0.05):
    """(up, down) of a rank-``rank`` patch of a Linear [out, in] or conv [out, in, k, k] weight
    (LoCon: the k×k kernel in ``down``, a 1×1 ``up``)."""
    up_shape = (shape[0], rank) + ((1, 1) if len(shape) == 4 else ())
    down_shape = (rank,) + tuple(shape[1:])
    return (torch.randn(up_shape, generator=generator) * scale, torch.randn(down_shape, generator=generator) * scale)


def lora_delta(up: torch.Tensor, down: torch.Tensor, shape, alpha: float | None, strength: float) -> torch.Tensor:
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    return (strength * scale) * (up.flatten(1).float() @ down.flatten(1).float()).reshape(shape)


def unet_diffusers_names(sd: dict[str, torch.Tensor], config: dict) -> dict[str, str]:
    """LDM name (without the prefix) -> diffusers name, from diffusers' own converter."""
    source = {k: v for k, v in sd.items() if k.startswith(UNET)}
    converted = convert_ldm_unet_checkpoint(source, config)
    by_id = {id(v): k for k, v in converted.items()}
    return {k[len(UNET):]: by_id[id(v)] for k, v in source.items() if id(v) in by_id}


def openclip_slice(name: str, width: int) -> tuple[str, slice | None]:
    """Where a transformers-layout CLIP weight (layers.{b}.{kind}) lives in an OpenCLIP tower."""
    block, kind = name.split(".", 1)
    base = f"transformer.resblocks.{block}."
    part = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
    if kind in part:
        i = part[kind]
        return base + "attn.in_proj_weight", slice(i * width, (i + 1) * width)
    return base + {"self_attn.out_proj": "attn.out_proj.weight", "mlp.fc1": "mlp.c_fc.weight",
                   "mlp.fc2": "mlp.c_proj.weight"}[kind], None


def add_into(merged: dict[str, torch.Tensor], key: str, rows: slice | None, delta: torch.Tensor) -> None:
    """merged[key] (fp32) += delta, on ``rows`` of a fused weight when given."""
    weight = merged[key].float().clone()
    if rows is None:
        weight += delta
    else:
        weight[rows] += delta
    merged[key] = weight
