"""Reading input images as ComfyUI's LoadImage / LoadImageMask do (``nodes.py``), shared by the
nodes and plan runs: 8-bit values / 255, EXIF orientation applied, truncated files retried."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, ImageSequence, UnidentifiedImageError

# Multi-frame formats whose extra frames are not an animation (MPO: stereo/preview JPEGs).
_SINGLE_IMAGE_FORMATS = ("MPO",)


def pillow(fn, arg):
    """Retry once with truncated-file loading on, as ComfyUI's ``node_helpers.pillow`` does."""
    try:
        return fn(arg)
    except (OSError, UnidentifiedImageError, ValueError):
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return fn(arg)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def to_float(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image).astype(np.float32) / 255.0)


def read_image(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [F,H,W,3] and MASK [F,H,W] = 1 - alpha (a 64x64 zero mask without alpha).

    Frames of a multi-frame file are batched; frames whose size differs from the first are
    skipped. 32-bit integer ("I") images are divided by 255 before the RGB conversion clips them.
    """
    images, masks = [], []
    with pillow(Image.open, Path(path)) as img:
        for frame in ImageSequence.Iterator(img):
            frame = pillow(ImageOps.exif_transpose, frame)
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            if images and rgb.size != (images[0].shape[1], images[0].shape[0]):
                continue
            images.append(to_float(rgb))
            if "A" in frame.getbands():
                masks.append(1. - to_float(frame.getchannel("A")))
            elif frame.mode == "P" and "transparency" in frame.info:
                masks.append(1. - to_float(frame.convert("RGBA").getchannel("A")))
            else:
                masks.append(torch.zeros((64, 64), dtype=torch.float32))
        if len(images) > 1 and img.format not in _SINGLE_IMAGE_FORMATS:
            return torch.stack(images), torch.stack(masks)
    return images[0][None], masks[0][None]
