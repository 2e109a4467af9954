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
SD1_CLIP = "cond_stage_model.transformer.text_model.encoder.layers."
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


def kohya_everything(base: dict, strength_model: float, strength_clip: float, generator):
    """A kohya LoRA over every UNet weight (LoRA on matrices and kernels, ``.diff`` on vectors)
    and every CLIP-L layer, with the merged checkpoint it must equal."""
    lora, merged = {}, dict(base)
    for i, (key, weight) in enumerate((k, v) for k, v in base.items() if k.startswith(UNET)):
        name = "lora_unet_" + key[len(UNET):].rsplit(".", 1)[0].replace(".", "_")
        if key.endswith(".bias") or weight.dim() == 1:
            diff = torch.randn(weight.shape, generator=generator) * 0.01
            suffix = ".diff_b" if key.endswith(".bias") else ".diff"
            lora[name + suffix] = diff
            add_into(merged, key, None, strength_model * diff.float())
            continue
        up, down = factors(weight.shape, 2, generator)
        alpha = 1.0 if i % 2 else None
        lora.update({name + ".lora_up.weight": up, name + ".lora_down.weight": down})
        if alpha is not None:
            lora[name + ".alpha"] = torch.tensor(alpha)
        add_into(merged, key, None, lora_delta(up, down, weight.shape, alpha, strength_model))
    for key in [k for k in base if k.startswith(SD1_CLIP) and k.endswith(".weight")]:
        block, kind = key[len(SD1_CLIP):-len(".weight")].split(".", 1)
        if kind not in CLIP_KINDS:
            continue
        up, down = factors(base[key].shape, 3, generator)
        name = f"lora_te_text_model_encoder_layers_{block}_{CLIP_KINDS[kind]}"
        lora.update({name + ".lora_up.weight": up, name + ".lora_down.weight": down,
                     name + ".alpha": torch.tensor(1.5)})
        add_into(merged, key, None, lora_delta(up, down, base[key].shape, 1.5, strength_clip))
    return lora, merged


def with_loras(workflow: dict, *loras: tuple[str, float, float]) -> dict:
    """``workflow`` with LoraLoaders chained between its checkpoint and its users."""
    model, clip = ["4", 0], ["4", 1]
    for i, (name, strength_model, strength_clip) in enumerate(loras):
        node_id = str(30 + i)
        workflow[node_id] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": name, "strength_model": strength_model,
            "strength_clip": strength_clip}}
        model, clip = [node_id, 0], [node_id, 1]
    workflow["3"]["inputs"]["model"] = model
    workflow["6"]["inputs"]["clip"] = clip
    workflow["7"]["inputs"]["clip"] = clip
    return workflow


def whole_unet_lora(base: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A kohya LoRA over every matrix and kernel of a checkpoint's UNet (made for that model only)."""
    lora = {}
    for ldm in (k for k in base if k.startswith(UNET) and base[k].dim() > 1):
        up, down = factors(base[ldm].shape, 2, generator)
        name = "lora_unet_" + ldm[len(UNET):-len(".weight")].replace(".", "_")
        lora.update({name + ".lora_up.weight": up, name + ".lora_down.weight": down})
    return lora
