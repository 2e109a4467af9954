"""CLIP's byte-level BPE tokenizer, built from its merge list with the ``tokenizers`` library.

Both the interpreter (kiln.nodes) and the plan runtime (kiln.runtime, which must not import
transformers) tokenize prompts, and they must agree token for token, so the one tokenizer
lives on the floor both import. It is the fast ``CLIPTokenizer`` transformers builds for
ComfyUI's ``comfy/sd1_tokenizer`` (NFC, whitespace runs to one space, lower case, CLIP's split
pattern, byte-level symbols, ``</w>`` word ends), rebuilt from OpenAI's merge file
(``bpe_simple_vocab_16e6.txt.gz``, shipped by open-clip-torch and stored inside plans) the way
OpenAI's CLIP derives its vocabulary: byte symbols, their ``</w>`` forms, one entry per merge,
then the two special tokens. SD1, SD2 (OpenCLIP ViT-H) and SDXL all use this vocabulary.
"""
from __future__ import annotations

import gzip

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

BOS_TOKEN = 49406  # <|startoftext|>
EOS_TOKEN = 49407  # <|endoftext|>
VOCAB_SIZE = 49408
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Merges CLIP uses: the file's first line is a header, then 49152 - 256 - 2 merge rules.
NUM_MERGES = 49152 - 256 - 2
SPLIT_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for raw bytes, in CLIP's vocabulary order.

    Printable Latin-1 bytes map to themselves and come first; the rest (controls, space, ...)
    map to code points from 256 up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def read_merges(merge_file: bytes) -> list[tuple[str, str]]:
    """CLIP's ordered merge rules from the gzipped merge file's bytes; ValueError if it is not one."""
    try:
        lines = gzip.decompress(merge_file).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a gzipped CLIP merge file ({exc})") from None
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"not a CLIP merge file: expected {NUM_MERGES} merge rules of two symbols")
    return merges


def clip_vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id (49408 entries) for CLIP's merge rules."""
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab


class ClipBpe:
    """Prompt text -> CLIP token ids (no BOS/EOS), as ComfyUI slices them out of ``tokenizer(word)``."""

    def __init__(self, merge_file: bytes):
        merges = read_merges(merge_file)
        model = models.BPE(vocab=clip_vocabulary(merges), merges=merges, unk_token=SPECIAL_TOKENS[1],
                           continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        # Written in a prompt, the special tokens' text is the special token (not lower-cased first).
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
        self._tokenizer = tokenizer

    def encode_words(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids
