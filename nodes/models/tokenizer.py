"""Offline CLIP BPE tokenizer, equal to the ``CLIPTokenizer`` ComfyUI loads from ``comfy/sd1_tokenizer``.

ComfyUI ships OpenAI's CLIP vocabulary as ``vocab.json``/``merges.txt``; the same merges ship inside
open-clip-torch (``bpe_simple_vocab_16e6.txt.gz``). The vocabulary is rebuilt from them the way
OpenAI's CLIP does it (byte symbols, their ``</w>`` forms, one entry per merge, then the two
special tokens), so no hub download is needed. SD1, SD2 (OpenCLIP ViT-H) and SDXL (both encoders)
all use this one vocabulary.
"""
from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = 49406  # <|startoftext|>
EOS_TOKEN = 49407  # <|endoftext|>
VOCAB_SIZE = 49408
# Merges used by CLIP: the file's first line is a header, then 49152 - 256 - 2 merge rules.
_NUM_MERGES = 49152 - 256 - 2


def _bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError("open-clip-torch is needed for the CLIP BPE merges but is not installed")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for raw bytes, in CLIP's vocabulary order.

    Printable Latin-1 bytes map to themselves and come first; the rest (controls, space, ...)
    map to code points from 256 up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id, 49408 entries) and its ordered BPE merge rules."""
    lines = gzip.open(_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab, merges


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """The shared transformers ``CLIPTokenizer`` (built once; BPE runs in the tokenizers library)."""
    vocab, merges = clip_vocab_and_merges()
    # transformers 5 takes the vocabulary and merges themselves (vocab_file= would be ignored).
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    if tok("")["input_ids"] != [BOS_TOKEN, EOS_TOKEN]:
        raise RuntimeError("CLIP tokenizer does not produce the expected BOS/EOS ids")
    return tok


def encode_words(text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS (what ComfyUI slices out of ``tokenizer(word)``)."""
    return clip_tokenizer().backend_tokenizer.encode(text, add_special_tokens=False).ids
