"""ComfyUI's prompt syntax and 77-token chunking (``comfy/sd1_clip.py``: ``token_weights``,
``SDTokenizer.tokenize_with_weights``, ``load_embed``).

Syntax: ``(text)`` multiplies the weight by 1.1 per nesting level, ``(text:1.3)`` sets it (the
number after the *last* colon), ``\\(``/``\\)`` are literal parentheses. Square brackets are NOT
special in ComfyUI (they are plain text). ``embedding:name`` inserts a textual-inversion embedding
from the embeddings folders.

A prompt becomes a list of chunks, each ``[(token, weight), ...]`` of exactly 77 entries:
BOS + up to 75 tokens + EOS + padding. A token is an ``int`` id or, for an embedding, a 1-D tensor.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from kiln.nodes.models.tokenizer import BOS_TOKEN, EOS_TOKEN, encode_words

Token = Union[int, torch.Tensor]
Chunk = list[tuple[Token, float]]

_EMBEDDING_PREFIX = "embedding:"
_EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
# Words of at least this many tokens may be split across chunks; shorter ones move whole.
_MAX_WORD_LENGTH = 8
# Placeholders that hide escaped parentheses from the parser (ComfyUI's exact choice).
_ESC_CLOSE, _ESC_OPEN = "\0\1", "\0\2"


@dataclass(frozen=True)
class ChunkSpec:
    """How one text encoder's tokenizer pads and which embeddings it accepts."""

    pad_token: int            # EOS (49407) for CLIP-L, 0 for OpenCLIP H / bigG
    embedding_size: int       # 768 / 1024 / 1280
    embedding_key: str        # key picked from multi-encoder embedding files ("clip_l", "clip_g", ...)
    max_length: int = 77


def escape_important(text: str) -> str:
    return text.replace("\\)", _ESC_CLOSE).replace("\\(", _ESC_OPEN)


def unescape_important(text: str) -> str:
    return text.replace(_ESC_CLOSE, ")").replace(_ESC_OPEN, "(")


def parse_parentheses(text: str) -> list[str]:
    """Split into top-level runs: plain text and balanced ``( ... )`` groups (kept with parentheses).

    Unbalanced input is handled as ComfyUI does: a stray ``)`` at top level closes an empty group,
    an unclosed ``(`` leaves the rest of the text as one item.
    """
    items: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    items.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                items.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        items.append(current)
    return items


def token_weights(text: str, current_weight: float) -> list[tuple[str, float]]:
    """(segment, weight) pairs; each parenthesised group is weighted and parsed recursively."""
    out: list[tuple[str, float]] = []
    for item in parse_parentheses(text):
        if len(item) >= 2 and item[0] == "(" and item[-1] == ")":
            inner = item[1:-1]
            weight = current_weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += token_weights(inner, weight)
        else:
            out.append((item, current_weight))
    return out


def parse_prompt(text: str) -> list[tuple[str, float]]:
    """The weighted segments of a prompt, escapes resolved."""
    return [(unescape_important(seg), w) for seg, w in token_weights(escape_important(text), 1.0)]


def tokenize_with_weights(text: str, spec: ChunkSpec, embedding_dirs: Sequence[str] = ()) -> list[Chunk]:
    """The prompt as 77-token chunks of (token, weight), as ComfyUI's ``SDTokenizer`` builds them."""
    groups: list[Chunk] = []
    for segment, weight in parse_prompt(text):
        for word in _split_embeddings(segment):
            if word.startswith(_EMBEDDING_PREFIX):
                vectors, word = _embedding_tokens(word[len(_EMBEDDING_PREFIX):].strip("\n"), spec, embedding_dirs)
                groups.append([(v, weight) for v in vectors])
                if not word:
                    continue
            groups.append([(t, weight) for t in encode_words(word)])
    return _chunk(groups, spec)


def _split_embeddings(segment: str) -> list[str]:
    """Cut a segment before every `` embedding:``/``\\nembedding:`` (the separator is dropped)."""
    first, *rest = re.split(f" {_EMBEDDING_PREFIX}|\n{_EMBEDDING_PREFIX}", segment)
    words = [first] + [_EMBEDDING_PREFIX + r for r in rest]
    return [w for w in words if w]


def _chunk(groups: list[Chunk], spec: ChunkSpec) -> list[Chunk]:
    """Pack token groups into chunks; a group that does not fit moves to the next chunk whole,
    unless it is at least 8 tokens long, in which case it is split at the chunk boundary."""
    room = spec.max_length - 1  # the EOS always gets a slot
    batch: Chunk = [(BOS_TOKEN, 1.0)]
    chunks = [batch]
    for group in groups:
        splittable = len(group) >= _MAX_WORD_LENGTH
        while group:
            if len(group) + len(batch) > room:
                remaining = room - len(batch)
                if splittable:
                    batch.extend(group[:remaining])
                    batch.append((EOS_TOKEN, 1.0))
                    group = group[remaining:]
                else:
                    batch.append((EOS_TOKEN, 1.0))
                    batch.extend([(spec.pad_token, 1.0)] * remaining)
                batch = [(BOS_TOKEN, 1.0)]
                chunks.append(batch)
            else:
                batch.extend(group)
                group = []
    batch.append((EOS_TOKEN, 1.0))
    batch.extend([(spec.pad_token, 1.0)] * (spec.max_length - len(batch)))
    return chunks


def _embedding_tokens(name: str, spec: ChunkSpec, dirs: Sequence[str]) -> tuple[list[torch.Tensor], str]:
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
