"""CLIP BPE tokenizer, ComfyUI prompt weighting and 77-token chunking."""
import random

import pytest
import safetensors.torch
import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

from kiln.kernels.clip_bpe import ClipBpe, clip_vocabulary, read_merges
from kiln.kernels.prompt_syntax import parse_parentheses, parse_prompt, token_weights
from kiln.nodes.models.prompt_weights import ChunkSpec, tokenize_with_weights
from kiln.nodes.models.tokenizer import BOS_TOKEN, EOS_TOKEN, clip_merge_file, encode_words

SD1 = ChunkSpec(pad_token=EOS_TOKEN, embedding_size=768, embedding_key="clip_l")
SD2 = ChunkSpec(pad_token=0, embedding_size=1024, embedding_key="clip_h")

PROMPTS = [
    "a photo of a cat",
    "masterpiece, best quality, 1girl, red hair, looking at viewer",
    "highly-detailed portrait's of an astronaut riding a horse on mars, 8k, trending on artstation",
    "café naïve résumé 東京 🙂",
    "RAW photo, (film grain:1.2), f/1.8, 50mm, ISO-400 -- don't",
]


def _random_prompts(count: int, seed: int = 0) -> list[str]:
    """Prompts mixing words, digits, punctuation runs, contractions, odd whitespace and non-Latin text."""
    rng = random.Random(seed)
    pieces = ["cat", "Photo", "don't", "it's", "we'll", "8k", "1girl", "f/1.8", "--", "!!!", "...", ",", "'",
              "\t", "\n\n", "  ", "\u00a0", "café", "ÉCOLE", "東京", "🙂🙂", "naïve", "straße", "İstanbul",
              "x'y'z", "<|endoftext|>", "<|startoftext|>", "a<|endoftext|>b", "(weighted:1.2)", "über-détaillé",
              "٣٤٥", "ﬁne", "e\u0301", "Ω≈ç√", "\x00"]
    return ["".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12)))
            for _ in range(count)]


def test_known_ids():
    assert encode_words("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert encode_words("hello world") == [3306, 1002]
    assert encode_words("") == []


def test_vocabulary_layout():
    merges = read_merges(clip_merge_file())
    vocab = clip_vocabulary(merges)
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == BOS_TOKEN and vocab["<|endoftext|>"] == EOS_TOKEN
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["Ā"] == 188  # byte 0 -> U+0100


def test_merge_file_must_be_clip_merges():
    with pytest.raises(ValueError, match="not a gzipped CLIP merge file"):
        ClipBpe(b"not gzip")


@pytest.mark.parametrize("text", PROMPTS)
def test_matches_openclip_simple_tokenizer(text):
    assert encode_words(text) == SimpleTokenizer().encode(text)


def test_matches_transformers_clip_tokenizer():
    """The tokenizer ComfyUI loads (transformers' CLIPTokenizer on the same vocabulary), over
    unicode, whitespace, contractions and special-token text."""
    merges = read_merges(clip_merge_file())
    reference = CLIPTokenizer(vocab=clip_vocabulary(merges), merges=merges)
    for text in PROMPTS + _random_prompts(300):
        assert encode_words(text) == reference(text, add_special_tokens=False)["input_ids"], text


def test_case_and_whitespace_do_not_matter():
    assert encode_words("  A   Photo\n of a\tCAT  ") == encode_words("a photo of a cat")
    assert encode_words("cat,dog") == encode_words("cat , dog")


def test_special_token_text_is_the_special_token():
    assert encode_words("hello<|endoftext|>world") == [3306, EOS_TOKEN, 1002]


@pytest.mark.parametrize("text, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (b) c", [("a ", 1.0), ("b", 1.1), (" c", 1.0)]),
    ("(b:1.5)", [("b", 1.5)]),
    ("((b))", [("b", 1.1 * 1.1)]),
    ("(((b)))", [("b", 1.1 * 1.1 * 1.1)]),
    ("((b):0.5)", [("b", 0.5 * 1.1)]),
    ("(a (b:2.0) c:0.5)", [("a ", 0.5), ("b", 2.0), (" c", 0.5)]),
    ("(a:b:1.2)", [("a:b", 1.2)]),
    ("(a:foo)", [("a:foo", 1.1)]),
    ("(:1.2)", [(":1.2", 1.1)]),
    ("(b: 1.25 )", [("b", 1.25)]),
    ("[b]", [("[b]", 1.0)]),
    ("a (b", [("a ", 1.0), ("(b", 1.0)]),
    ("a) b", [("a) b", 1.0)]),
    ("()", []),
])
def test_token_weights(text, expected):
    got = token_weights(text, 1.0)
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [w for _, w in got] == [w for _, w in expected]  # exact floats, as ComfyUI computes them


def test_parse_parentheses_keeps_groups():
    assert parse_parentheses("x (a (b)) y (c)") == ["x ", "(a (b))", " y ", "(c)"]


def test_escaped_parentheses_are_literal():
    assert parse_prompt(r"a \(b\) (c:1.3)") == [("a (b) ", 1.0), ("c", 1.3)]
    assert parse_prompt(r"(\(x\):0.7)") == [("(x)", 0.7)]


def _ids(chunk):
    return [t for t, _ in chunk]


def test_short_prompt_chunk():
    (chunk,) = tokenize_with_weights("a photo of a (cat:1.3)", SD1)
    assert len(chunk) == 77
    assert _ids(chunk)[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert _ids(chunk)[7:] == [EOS_TOKEN] * 70
    assert [w for _, w in chunk][:7] == [1.0, 1.0, 1.0, 1.0, 1.0, 1.3, 1.0]
    (chunk2,) = tokenize_with_weights("a photo of a (cat:1.3)", SD2)
    assert _ids(chunk2)[:7] == _ids(chunk)[:7] and _ids(chunk2)[7:] == [0] * 70


def test_long_segment_splits_at_chunk_boundary():
    chunks = tokenize_with_weights("cat " * 100, SD1)
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    assert _ids(chunks[0]) == [BOS_TOKEN] + [2368] * 75 + [EOS_TOKEN]
    assert _ids(chunks[1])[:27] == [BOS_TOKEN] + [2368] * 25 + [EOS_TOKEN]


def test_short_group_moves_whole_to_next_chunk():
    chunks = tokenize_with_weights("cat " * 74 + "(a red dog:1.2)", SD2)
    assert len(chunks) == 2
    assert _ids(chunks[0]) == [BOS_TOKEN] + [2368] * 74 + [EOS_TOKEN, 0]
    assert _ids(chunks[1])[:5] == [BOS_TOKEN] + encode_words("a red dog") + [EOS_TOKEN]
    assert [w for _, w in chunks[1]][:5] == [1.0, 1.2, 1.2, 1.2, 1.0]


def test_exactly_75_tokens_fit_one_chunk():
    (chunk,) = tokenize_with_weights("cat " * 75, SD1)
    assert _ids(chunk) == [BOS_TOKEN] + [2368] * 75 + [EOS_TOKEN]


def test_embedding_missing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'nope' not found"):
        tokenize_with_weights("a embedding:nope cat", SD1, [str(tmp_path)])


def test_embedding_vectors_and_leftover_text(tmp_path):
    vectors = torch.randn(2, 768, generator=torch.Generator().manual_seed(1))
    safetensors.torch.save_file({"emb_params": vectors}, str(tmp_path / "style.safetensors"))
    (chunk,) = tokenize_with_weights("a (embedding:style, cat:1.2)", SD1, [str(tmp_path)])
    ids = chunk[:6]
    assert _ids(ids)[:2] == [BOS_TOKEN, 320]
    assert torch.equal(ids[2][0], vectors[0]) and torch.equal(ids[3][0], vectors[1])
    assert ids[4][0] == 267 and ids[5][0] == 2368  # "," then "cat" (the comma is leftover text)
    assert [w for _, w in ids] == [1.0, 1.0, 1.2, 1.2, 1.2, 1.2]


def test_embedding_key_for_multi_encoder_files(tmp_path):
    l, g = torch.randn(1, 768), torch.randn(1, 1280)
    safetensors.torch.save_file({"clip_l": l, "clip_g": g}, str(tmp_path / "x.safetensors"))
    spec_g = ChunkSpec(pad_token=0, embedding_size=1280, embedding_key="clip_g")
    (chunk,) = tokenize_with_weights("embedding:x", spec_g, [str(tmp_path)])
    assert torch.equal(chunk[1][0], g[0])
