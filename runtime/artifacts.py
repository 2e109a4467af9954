"""Compiled stage artifacts: AOTInductor ``.pt2`` packages whose weights live in the plan.

The AOTI loader only opens files, so each artifact is extracted once to a cache folder keyed
by its digest (re-hashed when reused, so a damaged cache file is rewritten, never run).
Loading goes through ``torch._C._aoti.AOTIModelPackageLoader`` directly: the public
``torch._inductor.aoti_load_package`` wrapper imports Inductor (sympy and friends, ~2 s) just
to unflatten a call spec that for kiln's stages is always "tensors in, tensors out".
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from kiln.runtime.errors import PlanError
from kiln.runtime.files import atomic_file
from kiln.runtime.plan_file import digest_of

_MODEL_NAME = "model"   # the name aoti_compile_and_package gives a single-model package


def cached_artifact(data, digest: str, cache: Path) -> Path:
    """A file under ``cache`` holding ``data`` (bytes-like whose digest is ``digest``), written atomically if needed."""
    path = cache / "aoti" / f"{digest}.pt2"
    if path.is_file() and path.stat().st_size == len(data) and digest_of(path.read_bytes()) == digest:
        return path
    write_atomically(path, data)
    return path


def write_atomically(path: Path, data) -> None:
    """``data`` (bytes-like) at ``path``, never seen half-written (a cache shared by processes)."""
    with atomic_file(path) as f:
        f.write(data)


def _device_index(device: torch.device) -> int:
    return -1 if device.index is None else device.index


def open_package(path: str | Path, device: torch.device) -> "torch._C._aoti.AOTIModelPackageLoader":
    return torch._C._aoti.AOTIModelPackageLoader(str(path), _MODEL_NAME, False, 1, _device_index(device))


def constant_fqns(path: str | Path, device: torch.device | str = "cpu") -> list[str]:
    """The constants (weights) a package compiled without them expects ``load_constants`` to fill."""
    return list(open_package(path, torch.device(device)).get_constant_fqns())


class CompiledStage:
    """A loaded artifact with its constants filled from the plan's weights.

    ``user_managed=True`` makes the loader use the given tensors in place (no copy), so this
    object keeps them alive for as long as the compiled code may run.
    """

    def __init__(self, path: str | Path, constants: Mapping[str, torch.Tensor], device: torch.device,
                 label: str):
        self._loader = open_package(path, device)
        wanted = set(self._loader.get_constant_fqns())
        missing, extra = sorted(wanted - set(constants)), sorted(set(constants) - wanted)
        if missing or extra:
            raise PlanError("invalid_plan", f"{label}: the artifact's weights do not match the manifest",
                            expected=f"constants {sorted(wanted)[:8]}",
                            found=f"missing {missing[:8]}, unexpected {extra[:8]}")
        self._constants = dict(constants)
        self._loader.load_constants(self._constants, False, True, True)

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return list(self._loader.boxed_run(list(tensors)))   # boxed_run empties the list it gets
