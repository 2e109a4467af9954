"""ComfyUI's WebSocket wire format (``server.py: send``, ``protocol.py: BinaryEventTypes``):
JSON text frames ``{"type", "data"}`` and binary frames that start with a big-endian event type."""
from __future__ import annotations

import io
import json
import struct
import time

from PIL import Image

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
_IMAGE_FORMATS = {"JPEG": 1, "PNG": 2}
MAX_PREVIEW_RESOLUTION = 512


def timestamp() -> int:
    """Milliseconds since the epoch, as ComfyUI stamps its execution messages."""
    return int(time.time() * 1000)


def text_frame(event: str, data: dict) -> str:
    return json.dumps({"type": event, "data": data})


def preview_frame(image: Image.Image, metadata: dict | None = None, image_format: str = "JPEG") -> bytes:
    """A sampler preview: JPEG quality 95 shrunk to fit 512x512, as ComfyUI encodes it; with
    ``metadata`` (clients that declared ``supports_preview_metadata``) the type-4 frame."""
    image = image.copy()
    image.thumbnail((MAX_PREVIEW_RESOLUTION, MAX_PREVIEW_RESOLUTION), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, quality=95)
    data = buffer.getvalue()
    if metadata is None:
        return struct.pack(">II", PREVIEW_IMAGE, _IMAGE_FORMATS[image_format]) + data
    meta = json.dumps({**metadata, "image_type": f"image/{image_format.lower()}"}).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + data
