"""Noise streams against ComfyUI (tests/data/comfyui_vectors/noise.* and samplers.* noise_draws)."""
import pytest
import torch

from kiln.kernels.noise import BrownianTreeNoiseSampler, default_noise_sampler, prepare_noise
from vectors import meta, tensors


def _parse_key(key):
    parts = key.split("/")
    seed = int(parts[1].removeprefix("seed"))
    shape = [int(s) for s in parts[2].split("x")]
    batch_index = [int(s) for s in parts[3].removeprefix("inds").split("_")] if len(parts) > 3 else None
    return seed, shape, batch_index


@pytest.mark.parametrize("key", sorted(tensors("noise")))
def test_prepare_noise_bit_exact(key):
    seed, shape, batch_index = _parse_key(key)
    got = prepare_noise(torch.zeros(shape), seed, batch_index)
    assert got.dtype == torch.float32
    assert torch.equal(got, tensors("noise")[key])


def test_prepare_noise_follows_latent_dtype():
    ref = tensors("noise")["noise/seed42/1x4x8x8"]
    got = prepare_noise(torch.zeros([1, 4, 8, 8], dtype=torch.float16), 42)
    assert got.dtype == torch.float16 and torch.equal(got, ref.half())


def test_prepare_noise_accepts_full_seed_range():
    a = prepare_noise(torch.zeros([1, 4, 2, 2]), 2 ** 64 - 1)
    b = prepare_noise(torch.zeros([1, 4, 2, 2]), 2 ** 64 - 2)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    x = torch.zeros([1, 4, 2, 2])
    assert torch.equal(default_noise_sampler(x, seed=2 ** 64 - 1)(None, None), a)
    tree = BrownianTreeNoiseSampler(x, torch.tensor(0.03), torch.tensor(14.6), seed=2 ** 64 - 1)
    assert torch.isfinite(tree(torch.tensor(14.6), torch.tensor(3.0))).all()


def test_default_noise_sampler_continues_the_initial_noise_stream():
    x = torch.zeros([1, 4, 8, 8])
    sample = default_noise_sampler(x, seed=42)
    first, second = sample(None, None), sample(None, None)
    assert torch.equal(first, tensors("noise")["noise/seed42/1x4x8x8"])
    # One long stream: the second draw is the B=2 initial noise's second item.
    assert torch.equal(second[0], tensors("noise")["noise/seed42/2x4x8x8"][1])


def test_default_noise_sampler_does_not_touch_global_rng():
    torch.manual_seed(7)
    expected = torch.randn(3)
    torch.manual_seed(7)
    default_noise_sampler(torch.zeros(2, 4), seed=1)(None, None)
    assert torch.equal(torch.randn(3), expected)


def _runs_with_draws(source):
    runs = meta("samplers")["runs"]
    return sorted(k for k, r in runs.items() if r.get("noise_draws") and r["noise_draws"][0]["source"] == source)


@pytest.mark.parametrize("key", _runs_with_draws("default"))
def test_default_noise_sampler_reproduces_sampler_draws(key):
    draws = tensors("samplers")[f"noise_draws/{key}"]
    sample = default_noise_sampler(tensors("samplers")["input/noise_seed42_1x4x8x8"], seed=42)
    for row in draws:
        assert torch.equal(sample(None, None)[0], row)


@pytest.mark.parametrize("key", _runs_with_draws("brownian"))
def test_brownian_tree_reproduces_sampler_draws(key):
    x = tensors("samplers")["input/noise_seed42_1x4x8x8"]
    sigmas = tensors("samplers")[f"sigmas/{key}"]
    cpu = not key.split("/")[0].endswith("_gpu")
    sample = BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=42, cpu=cpu)
    draws = tensors("samplers")[f"noise_draws/{key}"]
    for info, row in zip(meta("samplers")["runs"][key]["noise_draws"], draws):
        got = sample(torch.tensor(info["sigma"]), torch.tensor(info["sigma_next"]))
        assert (got[0] - row).abs().max() <= 1e-6


def test_brownian_tree_is_query_order_independent_and_sign_aware():
    x = torch.zeros([1, 4, 4, 4])
    lo, mid, hi = torch.tensor(0.1), torch.tensor(1.0), torch.tensor(5.0)
    a = BrownianTreeNoiseSampler(x, lo, hi, seed=3)
    b = BrownianTreeNoiseSampler(x, lo, hi, seed=3)
    first = a(hi, mid)
    b(mid, lo)
    assert torch.equal(b(hi, mid), first)
    assert torch.allclose(a(mid, hi), -first)
    assert not torch.equal(BrownianTreeNoiseSampler(x, lo, hi, seed=4)(hi, mid), first)


def test_brownian_tree_per_item_seeds():
    x = torch.zeros([2, 4, 4, 4])
    lo, hi = torch.tensor(0.1), torch.tensor(5.0)
    batched = BrownianTreeNoiseSampler(x, lo, hi, seed=[3, 4])(hi, lo)
    single = BrownianTreeNoiseSampler(x[:1], lo, hi, seed=4)(hi, lo)
    assert batched.shape == x.shape and torch.equal(batched[1], single[0])
