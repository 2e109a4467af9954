"""Random CLIP text-encoder weights laid out as in real single-file checkpoints (for tests/benchmarks).

Keys are generated from an architecture description, not exported from a library model, so the
loader in ``clip.py`` is tested against the layouts checkpoints really use:

- sd1:  ``cond_stage_model.transformer.text_model.*``  (HF CLIP-L layout, with ``position_ids``)
- sd2:  ``cond_stage_model.model.*``                   (OpenCLIP ViT-H: fused ``in_proj``, ``text_projection``)
- sdxl: ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L) and
        ``conditioner.embedders.1.model.*`` (OpenCLIP bigG)

Tiny widths (32/48/64) give 2/3/4 heads under ``clip.heads_for_width``; three layers each so that
the penultimate layer differs from the last one.
"""
from __future__ import annotations

import torch

from kiln.nodes.models.tokenizer import VOCAB_SIZE

_POSITIONS = 77

# encoder kind -> (width, layers) per size; the MLP is 4x wide, projections are square (as in ViT-H/bigG).
_SIZES = {
    "tiny": {"clip_l": (32, 3), "clip_h": (48, 3), "clip_g": (64, 3)},
    "full": {"clip_l": (768, 12), "clip_h": (1024, 24), "clip_g": (1280, 32)},
}

# arch -> [(checkpoint prefix, encoder kind, layout)]
_ARCH_ENCODERS = {
    "sd1": [("cond_stage_model.transformer.text_model.", "clip_l", "hf")],
    "sd2": [("cond_stage_model.model.", "clip_h", "openclip")],
    "sdxl": [("conditioner.embedders.0.transformer.text_model.", "clip_l", "hf"),
             ("conditioner.embedders.1.model.", "clip_g", "openclip")],
}


def _hf_shapes(width: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.token_embedding.weight": (VOCAB_SIZE, width),
        "embeddings.position_embedding.weight": (_POSITIONS, width),
    }
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (width, width)
            shapes[f"{p}self_attn.{proj}.bias"] = (width,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"] = (width,)
            shapes[f"{p}{norm}.bias"] = (width,)
        shapes[f"{p}mlp.fc1.weight"] = (4 * width, width)
        shapes[f"{p}mlp.fc1.bias"] = (4 * width,)
        shapes[f"{p}mlp.fc2.weight"] = (width, 4 * width)
        shapes[f"{p}mlp.fc2.bias"] = (width,)
    shapes["final_layer_norm.weight"] = (width,)
    shapes["final_layer_norm.bias"] = (width,)
    return shapes


def _openclip_shapes(width: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "token_embedding.weight": (VOCAB_SIZE, width),
        "positional_embedding": (_POSITIONS, width),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        shapes[f"{p}ln_1.weight"] = (width,)
        shapes[f"{p}ln_1.bias"] = (width,)
        shapes[f"{p}attn.in_proj_weight"] = (3 * width, width)
        shapes[f"{p}attn.in_proj_bias"] = (3 * width,)
        shapes[f"{p}attn.out_proj.weight"] = (width, width)
        shapes[f"{p}attn.out_proj.bias"] = (width,)
        shapes[f"{p}ln_2.weight"] = (width,)
        shapes[f"{p}ln_2.bias"] = (width,)
        shapes[f"{p}mlp.c_fc.weight"] = (4 * width, width)
        shapes[f"{p}mlp.c_fc.bias"] = (4 * width,)
        shapes[f"{p}mlp.c_proj.weight"] = (width, 4 * width)
        shapes[f"{p}mlp.c_proj.bias"] = (width,)
    shapes["ln_final.weight"] = (width,)
    shapes["ln_final.bias"] = (width,)
    shapes["text_projection"] = (width, width)  # used as x @ P (OpenCLIP), not a Linear weight
    shapes["logit_scale"] = ()
    return shapes


def _random(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Values that keep activations O(1): unit-ish norms, fan-in scaled matrices, small biases."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.endswith("logit_scale"):
        return torch.tensor(4.6052)
    if "norm" in name or "ln_" in name:
        return 1.0 + 0.1 * noise if name.endswith("weight") else 0.05 * noise
    if name.endswith("bias"):
        return 0.02 * noise
    if "embedding" in name:
        return 0.5 * noise
    return noise * shape[-1] ** -0.5


def clip_state_dict(arch: str, size: str = "tiny", generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The CLIP part of a synthetic ``arch`` ("sd1" | "sd2" | "sdxl") checkpoint, real key prefixes included."""
    if arch not in _ARCH_ENCODERS:
        raise ValueError(f"unknown CLIP arch {arch!r}; expected one of {sorted(_ARCH_ENCODERS)}")
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(_SIZES)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for prefix, kind, layout in _ARCH_ENCODERS[arch]:
        width, layers = _SIZES[size][kind]
        shapes = _hf_shapes(width, layers) if layout == "hf" else _openclip_shapes(width, layers)
        for name, shape in shapes.items():
            out[prefix + name] = _random(name, shape, generator).to(dtype)
        if layout == "hf":  # real SD1/SDXL checkpoints carry this buffer; loaders must ignore it
            out[prefix + "embeddings.position_ids"] = torch.arange(_POSITIONS).unsqueeze(0)
    return out
