"""ComfyUI's prompt syntax and 77-token chunking (``comfy/sd1_clip.py``: ``token_weights``,
``SDTokenizer.tokenize_with_weights``), shared by the interpreter and the plan runtime.

Syntax: ``(text)`` multiplies the weight by 1.1 per nesting level, ``(text:1.3)`` sets it (the
number after the *last* colon), ``\\(``/``\\)`` are literal parentheses. Square brackets are NOT
special in ComfyUI (they are plain text). ``embedding:name`` inserts a textual-inversion
embedding; resolving the name to vectors is the caller's (``embedding`` below).

A prompt becomes a list of chunks, each ``[(token, weight), ...]`` of exactly 77 entries:
BOS + up to 75 tokens + EOS + padding. A token is an ``int`` id or an embedding vector.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from kiln.kernels.clip_bpe import BOS_TOKEN, EOS_TOKEN

Chunk = list[tuple[Any, float]]
# (name after "embedding:") -> (its vectors, the text left over after the name)
EmbeddingResolver = Callable[[str], tuple[list, str]]

EMBEDDING_PREFIX = "embedding:"
MAX_LENGTH = 77
# Words of at least this many tokens may be split across chunks; shorter ones move whole.
_MAX_WORD_LENGTH = 8
# Placeholders that hide escaped parentheses from the parser (ComfyUI's exact choice).
_ESC_CLOSE, _ESC_OPEN = "\0\1", "\0\2"


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


def tokenize_with_weights(text: str, encode_words: Callable[[str], list[int]], pad_token: int,
                          embedding: EmbeddingResolver) -> list[Chunk]:
    """The prompt as 77-token chunks of (token, weight), as ComfyUI's ``SDTokenizer`` builds them."""
    groups: list[Chunk] = []
    for segment, weight in parse_prompt(text):
        for word in split_embeddings(segment):
            if word.startswith(EMBEDDING_PREFIX):
                vectors, word = embedding(word[len(EMBEDDING_PREFIX):].strip("\n"))
                groups.append([(v, weight) for v in vectors])
                if not word:
                    continue
            groups.append([(t, weight) for t in encode_words(word)])
    return _chunk(groups, pad_token)


def split_embeddings(segment: str) -> list[str]:
    """Cut a segment before every `` embedding:``/``\\nembedding:`` (the separator is dropped)."""
    first, *rest = re.split(f" {EMBEDDING_PREFIX}|\n{EMBEDDING_PREFIX}", segment)
    words = [first] + [EMBEDDING_PREFIX + r for r in rest]
    return [w for w in words if w]


def _chunk(groups: list[Chunk], pad_token: int) -> list[Chunk]:
    """Pack token groups into chunks; a group that does not fit moves to the next chunk whole,
    unless it is at least 8 tokens long, in which case it is split at the chunk boundary."""
    room = MAX_LENGTH - 1  # the EOS always gets a slot
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
                    batch.extend([(pad_token, 1.0)] * remaining)
                batch = [(BOS_TOKEN, 1.0)]
                chunks.append(batch)
            else:
                batch.extend(group)
                group = []
    batch.append((EOS_TOKEN, 1.0))
    batch.extend([(pad_token, 1.0)] * (MAX_LENGTH - len(batch)))
    return chunks


def apply_weight(z: Any, z_empty: Any, weight: Any) -> Any:
    """Prompt weighting: move a token's embedding away from the empty prompt's by ``weight``."""
    return (z - z_empty) * weight + z_empty
