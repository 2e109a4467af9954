"""Access to ../shared/comfyui_vectors (reference tensors from ComfyUI's own code)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

VECTORS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "comfyui_vectors"


def _require() -> None:
    if not VECTORS_DIR.is_dir():
        pytest.fail(f"ComfyUI reference vectors not found at {VECTORS_DIR}")


@functools.lru_cache(maxsize=None)
def tensors(name: str) -> dict[str, torch.Tensor]:
    _require()
    return load_file(str(VECTORS_DIR / f"{name}.safetensors"))


@functools.lru_cache(maxsize=None)
def meta(name: str) -> dict:
    _require()
    return json.loads((VECTORS_DIR / f"{name}.json").read_text())
