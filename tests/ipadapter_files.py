"""CLIP vision and IP-Adapter files for the tests, in the layouts the real ones use, and the
pack's attention numbering derived independently: from the checkpoint's LDM names (input blocks
by id, output blocks by id, then the middle block) mapped to diffusers' names by diffusers'
converter."""
from __future__ import annotations

import re

import torch

from lora_files import UNET, unet_diffusers_names


def clip_vision_state_dict(width: int = 32, layers: int = 3, projection: int = 24, seed: int = 0,
                           patch: int = 14, image: int = 224) -> dict[str, torch.Tensor]:
    """A ViT in transformers' CLIPVisionModelWithProjection names (what IP-Adapter's image_encoder ships)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    sd = {"vision_model.embeddings.class_embedding": rand(width, scale=0.5),
          "vision_model.embeddings.patch_embedding.weight": rand(width, 3, patch, patch),
          "vision_model.embeddings.position_embedding.weight": rand((image // patch) ** 2 + 1, width, scale=0.5),
          "vision_model.pre_layrnorm.weight": 1 + rand(width), "vision_model.pre_layrnorm.bias": rand(width),
          "vision_model.post_layernorm.weight": 1 + rand(width), "vision_model.post_layernorm.bias": rand(width),
          "visual_projection.weight": rand(projection, width, scale=0.3)}
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{p}self_attn.{name}.weight"] = rand(width, width, scale=0.2)
            sd[f"{p}self_attn.{name}.bias"] = rand(width)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = rand(4 * width, width, scale=0.2), rand(4 * width)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = rand(width, 4 * width, scale=0.2), rand(width)
        for norm in ("layer_norm1", "layer_norm2"):
            sd[f"{p}{norm}.weight"], sd[f"{p}{norm}.bias"] = 1 + rand(width), rand(width)
    return {k: v.half() for k, v in sd.items()}   # released encoders are fp16


def attention_sites(checkpoint: dict[str, torch.Tensor], config: dict, per_transformer_block: bool) -> list[tuple]:
    """[(module_key, [diffusers attn2 paths], block kind)] in the pack's registration order."""
    names = unet_diffusers_names(checkpoint, config)
    found: dict[tuple, set[int]] = {}
    for key in checkpoint:
        m = re.match(rf"{re.escape(UNET)}(input_blocks|output_blocks|middle_block)\.?(\d*)"
                     r"\.1\.transformer_blocks\.(\d+)\.attn2\.to_k\.weight$", key)
        if m:
            found.setdefault((m[1], int(m[2] or 0)), set()).add(int(m[3]))
    order = sorted(found, key=lambda b: ({"input_blocks": 0, "output_blocks": 1, "middle_block": 2}[b[0]], b[1]))
    sites, number = [], 0
    for kind, block in order:
        prefix = f"{kind}.{block}.1" if kind != "middle_block" else "middle_block.1"
        paths = [names[f"{prefix}.transformer_blocks.{t}.attn2.to_k.weight"].rsplit(".to_k.", 1)[0]
                 for t in sorted(found[(kind, block)])]
        groups = [[p] for p in paths] if per_transformer_block else [paths]
        for group in groups:
            sites.append((str(2 * number + 1), group, kind))
            number += 1
    return sites


def ipadapter_state_dict(kind: str, cross_dim: int, embedding_dim: int, attention_widths: list[int],
                         seed: int = 0, tokens: int = 4, resampler_dim: int = 128) -> dict[str, torch.Tensor]:
    """A .safetensors IP-Adapter: ``image_proj.*`` for ``kind`` (standard | plus | full) and
    ``ip_adapter.{2i+1}.to_k_ip/to_v_ip`` for each attention width."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    sd = {}
    if kind == "standard":
        sd.update({"image_proj.proj.weight": rand(tokens * cross_dim, embedding_dim), "image_proj.proj.bias":
                   rand(tokens * cross_dim), "image_proj.norm.weight": 1 + rand(cross_dim),
                   "image_proj.norm.bias": rand(cross_dim)})
    elif kind == "full":
        sd.update({"image_proj.proj.0.weight": rand(embedding_dim, embedding_dim), "image_proj.proj.0.bias":
                   rand(embedding_dim), "image_proj.proj.2.weight": rand(cross_dim, embedding_dim),
                   "image_proj.proj.2.bias": rand(cross_dim), "image_proj.proj.3.weight": 1 + rand(cross_dim),
                   "image_proj.proj.3.bias": rand(cross_dim)})
    else:
        d = resampler_dim
        sd.update({"image_proj.latents": rand(1, 16, d, scale=1.0), "image_proj.proj_in.weight": rand(d, embedding_dim),
                   "image_proj.proj_in.bias": rand(d), "image_proj.proj_out.weight": rand(cross_dim, d),
                   "image_proj.proj_out.bias": rand(cross_dim), "image_proj.norm_out.weight": 1 + rand(cross_dim),
                   "image_proj.norm_out.bias": rand(cross_dim)})
        for i in range(4):
            p = f"image_proj.layers.{i}."
            sd.update({p + "0.norm1.weight": 1 + rand(d), p + "0.norm1.bias": rand(d),
                       p + "0.norm2.weight": 1 + rand(d), p + "0.norm2.bias": rand(d),
                       p + "0.to_q.weight": rand(d, d), p + "0.to_kv.weight": rand(2 * d, d),
                       p + "0.to_out.weight": rand(d, d), p + "1.0.weight": 1 + rand(d), p + "1.0.bias": rand(d),
                       p + "1.1.weight": rand(4 * d, d), p + "1.3.weight": rand(d, 4 * d)})
    for i, width in enumerate(attention_widths):
        sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = rand(width, cross_dim, scale=0.3)
        sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = rand(width, cross_dim, scale=0.3)
    return {k: v.half() for k, v in sd.items()}
