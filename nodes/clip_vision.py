"""CLIP vision nodes (``nodes.py``: CLIPVisionLoader, CLIPVisionEncode)."""
from __future__ import annotations

from kiln.kernels.errors import InputError
from kiln.nodes.loaders import load_once
from kiln.nodes.registry import COMBO, SOCKET, RunContext, node


def load_clip_vision_file(ctx: RunContext, name: str, input_name: str):
    """The CLIP_VISION in the ``clip_vision`` folder's ``name`` (loaded once per run)."""
    from kiln.nodes.models.checkpoint import ModelFileError, load_state_dict
    from kiln.nodes.models.clip_vision import load_clip_vision

    path = ctx.models.resolve("clip_vision", name)
    try:
        return load_once(ctx, ("clip_vision", str(path), ctx.device),
                         lambda: load_clip_vision(load_state_dict(path), device=ctx.device))
    except ModelFileError as error:
        raise InputError(input_name, f"{name}: {error.message}", expected="a CLIP vision encoder (ViT-L, ViT-H, "
                         "ViT-bigG)", found=str(path)) from None


@node("CLIPVisionLoader", [COMBO("clip_name", (), folder="clip_vision")], ("CLIP_VISION",), category="loaders",
      needs_context=True, display_name="Load CLIP Vision")
def clip_vision_loader(ctx: RunContext, clip_name: str):
    return (load_clip_vision_file(ctx, clip_name, "clip_name"),)


@node("CLIPVisionEncode", [SOCKET("clip_vision", "CLIP_VISION"), SOCKET("image", "IMAGE"),
                           COMBO("crop", ("center", "none"))],
      ("CLIP_VISION_OUTPUT",), category="conditioning", display_name="CLIP Vision Encode")
def clip_vision_encode(clip_vision, image, crop: str):
    return (clip_vision.encode_image(image, crop=crop == "center"),)
