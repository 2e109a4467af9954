"""Run-wide choices a user makes once: read from the environment by the CLI only, then passed
down explicitly (``RunContext.settings``, ``run_plan(settings=)``, ``compile_workflow(settings=)``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from kiln.kernels.errors import KilnError, Problem
from kiln.kernels.fused.dispatch import DEFAULT_MODE, MODES

# KILN_FUSED's accepted spellings -> step kernel mode (kiln.kernels.fused.dispatch).
_STEP_KERNEL_ALIASES = {"": "auto", "1": "auto", "on": "auto", "true": "auto", "auto": "auto",
                        "0": "off", "off": "off", "false": "off", "triton": "triton", "check": "check"}


@dataclass(frozen=True)
class Settings:
    """``step_kernels``: how sampler steps run (``auto``: Triton on CUDA in plans, torch twins
    elsewhere; ``off``; ``triton``; ``check``: Triton and twin side by side, failing on a mismatch).
    ``cache_dir``: where compiled artifacts are cached (None: ``~/.cache/kiln``)."""

    step_kernels: str = DEFAULT_MODE
    cache_dir: Path | None = None

    def __post_init__(self):
        if self.step_kernels not in MODES:
            raise ValueError(f"step kernel mode {self.step_kernels!r}: expected one of {', '.join(MODES)}")

    def step_mode(self, *, reference: bool) -> str:
        """The step-kernel mode for a sampler run. The reference interpreter (``reference``) keeps
        eager torch's arithmetic under ``auto``: ComfyUI's numbers exactly, on CUDA too, where a
        compiled Triton kernel may contract a multiply-add into an FMA; plans take the kernels."""
        return "off" if reference and self.step_kernels == "auto" else self.step_kernels

    @property
    def artifact_cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else Path.home() / ".cache" / "kiln"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "Settings":
        """``KILN_FUSED`` (auto/1/on, off/0, triton, check) and ``KILN_CACHE_DIR`` (else
        ``$XDG_CACHE_HOME/kiln``); a bad value is a user error naming the variable."""
        raw = environ.get("KILN_FUSED", "auto")
        mode = _STEP_KERNEL_ALIASES.get(raw.strip().lower())
        if mode is None:
            raise KilnError([Problem("invalid_setting", "unknown step kernel mode", input_name="KILN_FUSED",
                                     expected="auto (1, on), off (0), triton or check", found=repr(raw))])
        cache = environ.get("KILN_CACHE_DIR")
        if not cache and environ.get("XDG_CACHE_HOME"):
            cache = os.path.join(environ["XDG_CACHE_HOME"], "kiln")
        return cls(step_kernels=mode, cache_dir=Path(cache) if cache else None)
