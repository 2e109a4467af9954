"""Runtime prompts: the plan runtime tokenizes like the interpreter, carries its vocabulary in the
plan, brings both prompts to one length as ComfyUI does, and refuses what it cannot take."""
from __future__ import annotations

import gzip

import pytest
import torch

from kiln.nodes.models.checkpoint import load_checkpoint
from kiln.nodes.models.tokenizer import clip_merge_file
from kiln.runtime.errors import PlanError
from kiln.runtime.executor import run_plan
from kiln.runtime.plan import load_plan
from kiln.runtime.prompts import VOCABULARY_MEMBER, common_length, pack_tokens, tokenize_prompt
from kiln.runtime.writer import PlanWriter
from kiln.kernels.clip_bpe import ClipBpe

PROMPTS = ["a photo of a cat", "a (red fox:1.3) in the ((snow)), \\(literal\\) [brackets]",
           "masterpiece " + ", ".join(f"tree {i}" for i in range(60)), "", "café 東京 🙂 <|endoftext|> done"]


@pytest.fixture(scope="module")
def bpe():
    return ClipBpe(clip_merge_file())


@pytest.mark.parametrize("ckpt", ["tiny-sd15.safetensors", "tiny-sd2-v.safetensors"])
def test_tokens_equal_the_interpreters(models_dir, bpe, ckpt):
    _, clip, _ = load_checkpoint(models_dir / "checkpoints" / ckpt)
    ((key, encoder),) = clip.encoders.items()
    for text in PROMPTS:
        got = tokenize_prompt(text, bpe, [encoder.spec.pad_token], 32, "6.text")
        assert torch.equal(got, pack_tokens(clip.tokenize(text)[key])[None]), text


def test_sdxl_tokens_per_encoder(models_dir, bpe):
    _, clip, _ = load_checkpoint(models_dir / "checkpoints" / "tiny-sdxl.safetensors")
    text = PROMPTS[2]
    pads = [encoder.spec.pad_token for encoder in clip.encoders.values()]
    expected = torch.stack([pack_tokens(chunks) for chunks in clip.tokenize(text).values()])
    assert torch.equal(tokenize_prompt(text, bpe, pads, 32, "6.text"), expected)


def test_packed_tokens_keep_ids_and_double_weights(bpe):
    tokens = tokenize_prompt("a (cat:1.3)", bpe, [49407], 32, "6.text")
    assert tokens.dtype == torch.float64 and tokens.shape == (1, 1, 77, 2)
    assert tokens[0, 0, :4, 0].tolist() == [49406, 320, 2368, 49407]
    assert tokens[0, 0, :4, 1].tolist() == [1.0, 1.0, 1.3, 1.0]


def test_refusals_name_the_input(bpe):
    with pytest.raises(PlanError, match=r"input '6\.text'.*longer than.*at most 2 chunks of 75 tokens.*found 3"):
        tokenize_prompt("cat " * 200, bpe, [49407], 2, "6.text")
    with pytest.raises(PlanError, match=r"input '7\.text'.*textual-inversion.*found embedding:style"):
        tokenize_prompt("a embedding:style cat", bpe, [49407], 32, "7.text")


def test_common_length_repeats_to_the_lcm():
    a, b = torch.randn(1, 154, 8), torch.randn(1, 231, 8)
    ra, rb = common_length([a, b], 77 * 8, "stage sample_3")
    assert ra.shape == rb.shape == (1, 462, 8)
    assert torch.equal(ra, a.repeat(1, 3, 1)) and torch.equal(rb, b.repeat(1, 2, 1))
    same = torch.randn(1, 77, 8)
    assert all(c is same for c in common_length([same, same], 77, "s"))
    with pytest.raises(PlanError, match=r"stage sample_3.*154 and 231.*at most 385 tokens.*found 462"):
        common_length([a, b], 385, "stage sample_3")


# --- a plan with a tokenize stage ------------------------------------------------------------
def _text_plan(path, vocabulary: bytes | None = None, member: str = VOCABULARY_MEMBER):
    writer = PlanWriter(path)
    if vocabulary is not None:
        writer.add_file(member, vocabulary)
    workflow = {"6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["4", 1]}}}
    return writer.write({
        "target": {"device": "cpu", "dtype": "fp32", "backend": "aoti"}, "workflow": workflow,
        "inputs": [{"name": "6.text", "node_id": "6", "input_name": "text", "type": "STRING", "default": "a fox"}],
        "stages": [{"name": "tokenize_6", "kind": "tokenize", "node_ids": ["6"], "inputs": {"text": "in.6.text"},
                    "outputs": {"tokens": "6.text.tokens"},
                    "params": {"pad_tokens": [0], "max_chunks": 4, "vocabulary": VOCABULARY_MEMBER}}],
        "folded": [], "dropped_models": []})


def test_plan_carries_its_vocabulary(tmp_path, bpe):
    plan = load_plan(_text_plan(tmp_path / "t.plan", clip_merge_file()))
    assert VOCABULARY_MEMBER in plan.manifest.members
    assert plan.tokenizers[VOCABULARY_MEMBER].encode_words("a red fox") == bpe.encode_words("a red fox")
    run_plan(plan, {"6.text": "a red fox"}, output_dir=tmp_path / "out")
    with pytest.raises(PlanError, match=r"input '6\.text'.*at most 4 chunks"):
        run_plan(plan, {"6.text": "fox " * 400}, output_dir=tmp_path / "out")


def test_writer_refuses_a_tokenize_stage_without_its_vocabulary(tmp_path):
    with pytest.raises(PlanError, match=r"stage tokenize_6 .*names vocabulary .*not a listed member"):
        _text_plan(tmp_path / "t.plan", None)
    assert not (tmp_path / "t.plan").exists()


def test_unusable_vocabulary_refused_at_load(tmp_path):
    path = _text_plan(tmp_path / "t.plan", gzip.compress(b"#version: 0.2\nnot merges\n"))
    with pytest.raises(PlanError, match=r"invalid_plan: stage tokenize_6 .*not a usable vocabulary"):
        load_plan(path)
