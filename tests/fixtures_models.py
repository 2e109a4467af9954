"""Tiny random-weight model files for tests (real single-file layouts, see ``models/synthetic.py``)."""
from __future__ import annotations

from pathlib import Path

from kiln.nodes.models.synthetic import write_checkpoint, write_vae


def tiny_checkpoint(tmp_dir: str | Path, arch: str, **kwargs) -> Path:
    """A tiny ``arch`` ("sd1" | "sd2" | "sdxl") checkpoint in ``tmp_dir``; kwargs as ``write_checkpoint``
    (seed, dtype, inpainting, v_prediction)."""
    tag = "".join(f"-{k}={v}" for k, v in sorted(kwargs.items()))
    return write_checkpoint(Path(tmp_dir) / f"{arch}{tag}.safetensors", arch, **kwargs)


def tiny_vae(tmp_dir: str | Path, prefix: str = "", seed: int = 0) -> Path:
    """A tiny standalone VAE (LDM layout, keys under ``prefix``) in ``tmp_dir``."""
    return write_vae(Path(tmp_dir) / f"vae{prefix.rstrip('.')}-{seed}.safetensors", prefix=prefix, seed=seed)
