"""CLIP vision encoders (ViT-L, ViT-H, ViT-bigG) from the file itself, run as ComfyUI runs them
(``comfy/clip_vision.py``, ``comfy/clip_model.py``).

transformers' ``CLIPVisionModelWithProjection`` holds the weights (HF names; OpenCLIP's
``visual.*`` files are renamed as ComfyUI's ``convert_to_transformers`` does). Numerics follow
ComfyUI on CPU: embeddings and encoder layers stored in fp16 and computed in fp32, the pre/post
layer norms and the projection kept in fp32, and the plain (eager) attention of
``attention_basic``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from kiln.kernels.errors import Problem
from kiln.nodes.models.clip import openclip_block
from kiln.nodes.models.detect import ModelFileError, describe_keys
from kiln.nodes.plan import NeedsStaticShapes, is_static

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
_FP32_PARTS = ("vision_model.pre_layrnorm.", "vision_model.post_layernorm.", "visual_projection.")


def clip_preprocess(image: torch.Tensor, size: int = 224, crop: bool = True) -> torch.Tensor:
    """IMAGE [B,H,W,C] in [0,1] -> normalised pixels [B,3,size,size] (``clip_preprocess``):
    antialiased bicubic to cover ``size`` then a center crop (or straight to size x size),
    quantised to 8 bits, then CLIP's mean/std."""
    if not is_static(*image.shape):
        raise NeedsStaticShapes(Problem("unsupported_in_plan", "CLIP vision's resize and center crop to "
                                        f"{size} px are worked out from concrete image sizes", input_name="image",
                                        expected="an image of the size the plan was compiled from",
                                        found="run-time sizes"))
    image = image[:, :, :, :3] if image.shape[3] > 3 else image
    image = image.movedim(-1, 1)
    if not (image.shape[2] == size and image.shape[3] == size):
        if crop:
            scale = size / min(image.shape[2], image.shape[3])
            scale_size = (round(scale * image.shape[2]), round(scale * image.shape[3]))
        else:
            scale_size = (size, size)
        image = torch.nn.functional.interpolate(image, size=scale_size, mode="bicubic", antialias=True)
        h, w = (image.shape[2] - size) // 2, (image.shape[3] - size) // 2
        image = image[:, :, h:h + size, w:w + size]
    image = torch.clip(255.0 * image, 0, 255).round() / 255.0
    # per channel with Python scalars (the same float32 values as tensors of them): a plan's
    # module then holds no tensor made from data inside its code
    return torch.stack([(image[:, c] - MEAN[c]) / STD[c] for c in range(3)], dim=1)


def _from_openclip(sd: dict[str, torch.Tensor], prefix: str = "visual.") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        fixed = {"class_embedding": "vision_model.embeddings.class_embedding",
                 "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                 "positional_embedding": "vision_model.embeddings.position_embedding.weight",
                 "ln_pre.weight": "vision_model.pre_layrnorm.weight", "ln_pre.bias": "vision_model.pre_layrnorm.bias",
                 "ln_post.weight": "vision_model.post_layernorm.weight",
                 "ln_post.bias": "vision_model.post_layernorm.bias"}
        if name in fixed:
            out[fixed[name]] = v
        elif name == "proj":
            out["visual_projection.weight"] = v.transpose(0, 1).contiguous()
        else:
            openclip_block(name, v, "vision_model.encoder.layers.", out)
    return out


def vision_config(sd: dict[str, torch.Tensor]) -> CLIPVisionConfig:
    """ComfyUI's configs by depth (48 layers: bigG, 32: H, 24: L; all 16 heads, ViT-L with
    quick_gelu); smaller test encoders use 16-wide heads and exact GELU."""
    layers = len({m[1] for k in sd if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))})
    width = sd["vision_model.embeddings.class_embedding"].shape[0]
    patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise ModelFileError(f"CLIP vision position embeddings ({positions}) are not a square grid plus a class token")
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        projection_dim=sd["visual_projection.weight"].shape[0], num_hidden_layers=layers,
        num_attention_heads=16 if width >= 256 else max(1, width // 16), image_size=side * patch,
        patch_size=patch, hidden_act="quick_gelu" if layers == 24 else "gelu", layer_norm_eps=1e-5)
    config._attn_implementation = "eager"
    return config


@dataclass(frozen=True)
class ClipVisionOutput:
    """CLIP_VISION_OUTPUT: ``last_hidden_state`` (not normed), ``penultimate_hidden_states``
    (layer n-2's output), ``image_embeds`` (projected, post-normed class token)."""

    last_hidden_state: torch.Tensor
    penultimate_hidden_states: torch.Tensor
    image_embeds: torch.Tensor


class ClipVision:
    """CLIP_VISION: the encoder and the image size its position embeddings were trained for."""

    def __init__(self, model: CLIPVisionModelWithProjection):
        self.model = model
        self.image_size = model.config.image_size

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def projection_dim(self) -> int:
        return self.model.config.projection_dim

    def encode_pixels(self, pixel_values: torch.Tensor) -> ClipVisionOutput:
        vm = self.model.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        penultimate_index = len(vm.encoder.layers) - 2
        penultimate = None
        for i, layer in enumerate(vm.encoder.layers):
            x = layer(x, None)
            if i == penultimate_index:
                penultimate = x
        embeds = self.model.visual_projection(vm.post_layernorm(x[:, 0, :]))
        return ClipVisionOutput(x, penultimate, embeds)

    def encode_image(self, image: torch.Tensor, crop: bool = True, size: int | None = None) -> ClipVisionOutput:
        """``ClipVisionModel.encode_image`` (``size`` overrides the model's, as IPAdapter_plus does)."""
        pixels = clip_preprocess(image.to(self.model.device), size=size or self.image_size, crop=crop).float()
        return self.encode_pixels(pixels)


def load_clip_vision(sd: dict[str, torch.Tensor], *, device="cpu") -> ClipVision:
    """A CLIP vision encoder from a file's tensors (HF ``vision_model.*`` or OpenCLIP ``visual.*``)."""
    if "visual.transformer.resblocks.0.attn.in_proj_weight" in sd:
        sd = _from_openclip(sd)
    else:
        sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
    needed = ("vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
              "vision_model.embeddings.position_embedding.weight", "visual_projection.weight",
              "vision_model.encoder.layers.0.mlp.fc1.weight")
    if not all(k in sd for k in needed):
        raise ModelFileError(f"expected a CLIP vision encoder (vision_model.* or visual.* keys), "
                             f"found {describe_keys(sd) if sd else 'none of them'}")
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    config = vision_config(sd)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    weights = {k: (v if k.startswith(_FP32_PARTS) else v.to(torch.float16)).to(device=device, dtype=torch.float32)
               for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelFileError(f"CLIP vision weights do not fit the encoder: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    embeddings = model.vision_model.embeddings
    positions = torch.arange(embeddings.num_positions, device=device).unsqueeze(0)
    embeddings.register_buffer("position_ids", positions, persistent=False)
    return ClipVision(model.eval().requires_grad_(False))
