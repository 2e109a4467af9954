"""Terminal progress: one bar per sampler run, and the per-node time summary."""
from __future__ import annotations

import sys

from tqdm import tqdm


class SamplerProgress:
    """``(step, total)`` callback for RunContext.progress: one tqdm bar per node run."""

    def __init__(self, ctx, enabled: bool = True):
        self._ctx = ctx
        self._enabled = enabled
        self._bar: tqdm | None = None
        self._node: str | None = None

    def __call__(self, step: int, total: int) -> None:
        if not self._enabled:
            return
        if self._bar is None or self._node != self._ctx.node_id or step < self._bar.n:
            self.close()
            self._node = self._ctx.node_id
            self._bar = tqdm(total=total, desc=f"node {self._node}", unit="step", file=sys.stderr,
                             leave=True, dynamic_ncols=True)
        self._bar.update(step - self._bar.n)
        if step >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def timing_summary(timings) -> str:
    """``time per node: 4 KSampler 3.21s, 8 VAEDecode 0.40s, ... total 3.9s``"""
    parts = [f"{t.node_id} {t.class_type} {t.seconds:.2f}s" for t in timings]
    total = sum(t.seconds for t in timings)
    return "time per node: " + ", ".join(parts) + f"; total {total:.2f}s"
