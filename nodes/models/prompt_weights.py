"""Prompt tokenization for the interpreter: ComfyUI's syntax and chunking
(kiln.kernels.prompt_syntax) with textual-inversion embeddings loaded from the embeddings
folders (``comfy/sd1_clip.py``: ``load_embed``).

A token is an ``int`` id or, for an embedding, a 1-D tensor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Sequence, Union

import torch

from kiln.kernels import prompt_syntax
from kiln.nodes.models.tokenizer import encode_words

Token = Union[int, torch.Tensor]
Chunk = list[tuple[Token, float]]

_EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")


@dataclass(frozen=True)
class ChunkSpec:
    """How one text encoder's tokenizer pads and which embeddings it accepts."""

    pad_token: int            # EOS (49407) for CLIP-L, 0 for OpenCLIP H / bigG
    embedding_size: int       # 768 / 1024 / 1280
    embedding_key: str        # key picked from multi-encoder embedding files ("clip_l", "clip_g", ...)


def tokenize_with_weights(text: str, spec: ChunkSpec, embedding_dirs: Sequence[str] = ()) -> list[Chunk]:
    """The prompt as 77-token chunks of (token, weight), as ComfyUI's ``SDTokenizer`` builds them."""
    return prompt_syntax.tokenize_with_weights(text, encode_words, spec.pad_token,
                                               partial(_embedding_tokens, spec=spec, dirs=embedding_dirs))


def _embedding_tokens(name: str, *, spec: ChunkSpec, dirs: Sequence[str]) -> tuple[list[torch.Tensor], str]:
    """The vectors of embedding ``name`` and the text left over after it (``embedding:x, more``)."""
    words = name.split()
    if not words:
        raise ValueError("prompt contains 'embedding:' without an embedding name")
    name, leftover = words[0], " ".join(words[1:])
    embed = load_embedding(name, dirs, spec)
    if embed is None:
        stripped = name.strip(",")
        if len(stripped) < len(name):
            embed = load_embedding(stripped, dirs, spec)
            leftover = f"{name[len(stripped):]} {leftover}"
            name = stripped
    if embed is None:
        # ComfyUI only logs a warning and drops the word; an unknown name is almost always a typo.
        searched = ", ".join(dirs) or "no embeddings folder configured"
        raise ValueError(f"embedding {name!r} not found (searched: {searched})")
    vectors = [embed] if embed.ndim == 1 else list(embed.reshape(-1, embed.shape[-1]))
    return vectors, leftover


def _embedding_file(name: str, dirs: Sequence[str]) -> str | None:
    """First file named ``name`` (or ``name`` + a known extension) in the folders or their subfolders."""
    for top in dirs:
        for root, _, _ in sorted(os.walk(top, followlinks=True)):
            root = os.path.abspath(root)
            path = os.path.abspath(os.path.join(root, name))
            if os.path.commonpath((root, path)) != root:  # no escaping the folder with ../
                continue
            for candidate in (path, *(path + ext for ext in _EMBEDDING_EXTENSIONS)):
                if os.path.isfile(candidate):
                    return candidate
    return None


def load_embedding(name: str, dirs: Sequence[str], spec: ChunkSpec) -> torch.Tensor | None:
    """Textual-inversion vectors ``[n, size]`` from an A1111/ComfyUI embedding file, or None if absent."""
    path = _embedding_file(name, dirs)
    if path is None:
        return None
    try:
        if path.lower().endswith(".safetensors"):
            import safetensors.torch
            data = safetensors.torch.load_file(path, device="cpu")
        else:
            data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # a corrupt or pickled-object file: say which one
        raise ValueError(f"cannot read embedding file {path}: {exc}") from exc
    return _embedding_tensor(data, spec, path)


def _embedding_tensor(data, spec: ChunkSpec, path: str) -> torch.Tensor:
    """Pick the vectors out of the known embedding file layouts (ComfyUI's ``load_embed`` order)."""
    if isinstance(data, dict) and "string_to_param" in data:
        return next(iter(data["string_to_param"].values()))
    if isinstance(data, list):
        rows = [t.reshape(-1, t.shape[-1]) for entry in data for t in entry.values()
                if t.shape[-1] == spec.embedding_size]
        return torch.cat(rows)
    if isinstance(data, dict) and data:
        if spec.embedding_key in data:
            return data[spec.embedding_key]
        for suffix in (".string_to_param.*", f".{spec.embedding_key}"):  # LoRA-bundled embeddings
            bundled = [v for k, v in data.items() if k.startswith("bundle_emb.") and k.endswith(suffix)]
            if bundled:
                return torch.cat(bundled)
        return next(iter(data.values()))
    raise ValueError(f"embedding file {path} holds no tensors")
