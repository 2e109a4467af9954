"""Access to tests/data/comfyui_vectors: reference tensors produced by ComfyUI's own code
(generator commit and contents in that folder's README)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

VECTORS_DIR = Path(__file__).resolve().parent / "data" / "comfyui_vectors"


@functools.lru_cache(maxsize=None)
def tensors(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(VECTORS_DIR / f"{name}.safetensors"))


@functools.lru_cache(maxsize=None)
def meta(name: str) -> dict:
    return json.loads((VECTORS_DIR / f"{name}.json").read_text())
