"""Terminal progress: one tqdm bar per key (a node, a sampler stage, the compile), and the
per-node time summary. The one adapter every ``(key, step, total)`` progress callback uses."""
from __future__ import annotations

import sys

from tqdm import tqdm


class ProgressBars:
    """``bars(key, step, total, label=None)``: a bar per key, restarted when the key changes or
    its count goes back; closed when it reaches its total (or by ``close``)."""

    def __init__(self, unit: str = "step", leave: bool = True):
        self._unit, self._leave = unit, leave
        self._bar: tqdm | None = None
        self._key: str | None = None

    def __call__(self, key: str, step: int, total: int, label: str | None = None) -> None:
        if self._bar is None or self._key != key or step < self._bar.n:
            self.close()
            self._key = key
            self._bar = tqdm(total=total, desc=key, unit=self._unit, file=sys.stderr, leave=self._leave,
                             dynamic_ncols=True)
        if label is not None:
            self._bar.set_description(label)
        self._bar.update(step - self._bar.n)
        if step >= total:
            self.close()

    def node_step(self, node_id: str, step: int, total: int) -> None:
        """The interpreter's ``progress(node id, step, total)``."""
        self(f"node {node_id}", step, total)

    def stage_step(self, stage: str, index: int, total: int) -> None:
        """The compiler's ``progress(stage name, index, total)`` before each stage compiles."""
        self("compiling", index, total, label=f"compiling {stage}")

    def load_step(self, stage: str, index: int, total: int) -> None:
        """``load_plan``'s ``progress(stage name, index, total)`` before each artifact loads."""
        self("loading", index, total, label=f"loading {stage}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def timing_summary(timings) -> str:
    """``time per node: 4 KSampler 3.21s, 8 VAEDecode 0.40s, ... total 3.9s``"""
    parts = [f"{t.node_id} {t.class_type} {t.seconds:.2f}s" for t in timings]
    total = sum(t.seconds for t in timings)
    return "time per node: " + ", ".join(parts) + f"; total {total:.2f}s"
