"""Noise sources with ComfyUI's exact random streams.

* ``prepare_noise``: the KSampler's initial noise (``comfy/sample.py``), drawn from torch's
  *global* CPU generator re-seeded with the seed, one draw for the whole batch.
* ``default_noise_sampler``: ancestral noise (``comfy/k_diffusion/sampling.py``), a fresh
  generator seeded with the same seed, so its first draw equals the initial noise.
* ``BrownianTreeNoiseSampler``: SDE noise from a torchsde Brownian tree in sigma time.

Seeds are passed to torch unchanged (0 .. 2**64-1 as ComfyUI's seed widget allows).
"""
from __future__ import annotations

from typing import Callable, Sequence

import warnings

import torch
import torchsde

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """Initial noise shaped like ``latent`` (always generated on the CPU, in the latent's dtype).

    With ``batch_index`` (a latent taken from a larger batch) row j is the ``batch_index[j]``-th
    single-item draw of the stream, so a sub-batch sees the noise its items had in the full batch.
    """
    generator = torch.manual_seed(seed)  # ComfyUI re-seeds the global generator; keep that side effect
    if batch_index is None:
        return torch.randn(latent.size(), dtype=latent.dtype, layout=latent.layout,
                           generator=generator, device="cpu")
    wanted = set(batch_index)
    item_shape = [1] + list(latent.size())[1:]
    draws = {}
    for i in range(max(wanted) + 1):
        draw = torch.randn(item_shape, dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")
        if i in wanted:
            draws[i] = draw
    return torch.cat([draws[i] for i in batch_index], dim=0)


def default_noise_sampler(x: torch.Tensor, seed: int | None = None) -> NoiseSampler:
    """Successive standard-normal draws shaped like ``x`` from a private generator.

    ``seed=None`` falls back to torch's global generator, as ComfyUI does.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)

    def sample(sigma, sigma_next):
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return sample


def _sorted(a, b):
    """(low, high, sign) where sign is -1 if the pair came in descending order."""
    return (a, b, 1) if a < b else (b, a, -1)


class _BatchedBrownianTree:
    """One torchsde tree (or one per batch item when given a list of seeds), queried on any interval."""

    def __init__(self, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, seed=None, cpu: bool = True):
        self.cpu_tree = cpu
        t0, t1, self.sign = _sorted(t0, t1)
        w0 = torch.zeros_like(x)
        self.batched = isinstance(seed, (tuple, list))
        if seed is None:
            seeds = (torch.randint(0, 2 ** 63 - 1, ()).item(),)
        elif self.batched:
            if len(seed) != x.shape[0]:
                raise ValueError("a list of Brownian tree seeds needs one seed per batch item")
            seeds = tuple(seed)
            w0 = w0[0]
        else:
            seeds = (seed,)
        if self.cpu_tree:
            t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
        self.trees = tuple(torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds)

    def __call__(self, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
        t0, t1, sign = _sorted(t0, t1)
        device, dtype = t0.device, t0.dtype
        if self.cpu_tree:
            t0, t1 = t0.detach().cpu().float(), t1.detach().cpu().float()
        with warnings.catch_warnings():
            # torchsde stores the bounds rounded and warns when a float32 sigma lands a hair
            # outside them; it clamps the query, exactly as in ComfyUI, so the warning is noise.
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(t0, t1) for tree in self.trees]).to(device=device, dtype=dtype)
        w = w * (self.sign * sign)
        return w if self.batched else w[0]


class BrownianTreeNoiseSampler:
    """Unit-variance Brownian increments ``(W(s_next) - W(s)) / sqrt(|s_next - s|)`` in sigma time.

    The tree makes the noise depend only on the seed and the queried interval, not on how many
    or which steps are taken, which is what ComfyUI's SDE samplers rely on.
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed=None,
                 transform: Callable[[torch.Tensor], torch.Tensor] = lambda s: s, cpu: bool = True):
        self.transform = transform
        t0 = transform(torch.as_tensor(sigma_min))
        t1 = transform(torch.as_tensor(sigma_max))
        self.tree = _BatchedBrownianTree(x, t0, t1, seed, cpu=cpu)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t0 = self.transform(torch.as_tensor(sigma))
        t1 = self.transform(torch.as_tensor(sigma_next))
        return self.tree(t0, t1) / (t1 - t0).abs().sqrt()
