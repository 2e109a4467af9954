"""The study's progress on the terminal: a bar over all runs (references, warm-ups, timed runs)
with the ETA and the cell running, and below it a bar over the running sampler's steps or the
plan being compiled."""
from __future__ import annotations

import sys

from tqdm import tqdm

from kiln.progress import ProgressBars


class StudyProgress:
    def __init__(self, runs: int, quiet: bool):
        self.quiet = quiet
        self._total = tqdm(total=runs, desc="kiln bench", unit="run", file=sys.stderr, disable=quiet,
                           dynamic_ncols=True, position=0)
        self._bars = ProgressBars(leave=False)

    def advance(self, label: str) -> None:
        """A run finished (``label``: the cell, or "reference")."""
        self._total.set_postfix_str(label, refresh=False)
        self._total.update()

    def step(self, key: str, step: int, total: int) -> None:
        """A sampler step of the running run (the engines' ``on_step``)."""
        if not self.quiet:
            self._bars(f"  {key}", step, total)

    def compiling(self, label: str, stage: str, index: int, total: int) -> None:
        """The compiler's stage progress for the plan of ``label`` (an engine)."""
        if not self.quiet:
            self._bars(f"  compiling {label}", index, total, f"  compiling {stage}")

    def close_bars(self) -> None:
        self._bars.close()

    def close(self) -> None:
        self._bars.close()
        self._total.close()
