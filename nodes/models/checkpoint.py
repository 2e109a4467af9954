"""Model files -> models: ComfyUI's ``CheckpointLoaderSimple`` and ``VAELoader``.

Files are read without running code: safetensors directly, torch pickles only through
``torch.load(weights_only=True)``.  Anything unreadable or unsupported raises ModelFileError
naming the file, what was expected and what was found.
"""
from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from kiln.nodes.models.detect import SD2_CLIP_PREFIXES, VAE_PREFIX, ModelFileError, detect_model
from kiln.nodes.models.unet import DiffusionModel, build_diffusion_model
from kiln.nodes.models.vae import Vae, build_vae
from kiln.nodes.values import ClipHandle
from kiln.runtime.tensor_files import read_tensors

__all__ = ["ModelFileError", "load_state_dict", "read_torch_file", "load_checkpoint", "load_vae"]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@contextmanager
def _about(path: Path) -> Iterator[None]:
    """Attach ``path`` to ModelFileErrors raised by code that only saw tensors."""
    try:
        yield
    except ModelFileError as e:
        if e.path is None:
            e.path = path
        raise


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """torch's own diagnosis, without its advice to retry with ``weights_only=False``."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text[text.index(marker) + len(marker):]
    return text.strip().split("\n\n")[0].split(". Please use")[0].strip() or type(error).__name__


def read_torch_file(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(e)
        if "Unsupported global" in reason:
            raise ModelFileError("expected a torch checkpoint holding only tensors; it holds other Python "
                                 f"objects, which kiln does not unpickle ({reason})", path) from None
        raise ModelFileError(f"expected a torch checkpoint, found unreadable data ({reason})", path) from None
    except Exception as e:  # zip/pickle corruption surfaces as many exception types
        raise ModelFileError(f"expected a torch checkpoint, found unreadable data ({_first_line(e)})", path) from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model file (a ``.ckpt``'s ``state_dict`` entry unwrapped), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError("expected a model file, found nothing at this path", path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:   # each tensor in memory of its own: the builders free each once converted
            sd = read_tensors(path)
        except (ValueError, OSError) as e:
            raise ModelFileError(f"expected a safetensors file, found unreadable data ({_first_line(e)})",
                                 path) from None
    elif suffix in TORCH_SUFFIXES:
        obj = read_torch_file(path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ModelFileError(f"expected a dict of tensors, found a {type(obj).__name__}", path)
        sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    else:
        raise ModelFileError(f"expected a {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)} file, "
                             f"found {suffix or 'no extension'!r}", path)
    if not sd:
        raise ModelFileError("expected model tensors, found none", path)
    return sd


def _build_clip(sd: dict[str, torch.Tensor], arch: str, device, embedding_dirs: Sequence[str]) -> ClipHandle:
    from kiln.nodes.models.clip import build_clip

    if arch == "sd2":  # SD2 saved in the sgm layout: same OpenCLIP keys under another prefix
        legacy, sgm = SD2_CLIP_PREFIXES
        for key in [k for k in sd if k.startswith(sgm)]:
            sd[legacy + key[len(sgm):]] = sd.pop(key)
    try:
        return build_clip(sd, arch, device=device, embedding_dirs=embedding_dirs)
    except ValueError as e:
        raise ModelFileError(f"text encoder: {e}") from None


def load_checkpoint(path: str | Path, *, device="cpu", dtype: torch.dtype = torch.float32,
                    vae_dtype: torch.dtype = torch.float32, embedding_dirs: Sequence[str] = (),
                    ) -> tuple[DiffusionModel, ClipHandle | None, Vae | None]:
    """(MODEL, CLIP, VAE) of a single-file SD1/SD2/SDXL checkpoint, as ``CheckpointLoaderSimple``.

    CLIP / VAE are None when the file carries no text encoder / VAE weights (ComfyUI warns and
    leaves them out too).  The UNet runs in ``dtype`` (ComfyUI: fp32 on CPU); the VAE in
    ``vae_dtype``; the text encoder keeps ``build_clip``'s defaults (fp16 storage, fp32 compute).
    Each builder takes its tensors out of the file's dict as it converts them, so each weight is
    held once: SDXL's fp16 file and its fp32 UNet never sit in memory side by side.
    """
    path = Path(path)
    sd = load_state_dict(path)
    with _about(path):
        info = detect_model(sd)
        model = build_diffusion_model(sd, info, device=device, dtype=dtype)
        clip = _build_clip(sd, info.arch, device, embedding_dirs) if info.has_text_encoder else None
        vae_part = {k: sd.pop(k) for k in list(sd) if k.startswith(VAE_PREFIX)}
        vae = build_vae(vae_part, device=device, dtype=vae_dtype) if vae_part else None
    return model, clip, vae


def load_vae(path: str | Path, *, device="cpu", dtype: torch.dtype = torch.float32) -> Vae:
    """A standalone VAE file (LDM, ``first_stage_model.``-prefixed or diffusers layout), as ``VAELoader``."""
    path = Path(path)
    sd = load_state_dict(path)
    with _about(path):
        return build_vae(sd, device=device, dtype=dtype)
