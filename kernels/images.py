"""Float pixels to 8 bits as ComfyUI's SaveImage converts them (``np.clip(255. * i, 0, 255).astype(np.uint8)``):
truncation, not rounding. One copy for saved PNGs, PIL round trips and the plans' compiled final decode."""
from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float [0,1] pixels (any shape) as uint8; uint8 pixels as they are."""
    if images.dtype == torch.uint8:
        return images
    return (images * 255.0).clamp(0, 255).to(torch.uint8)
