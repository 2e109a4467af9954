"""A content-addressed cache of compiled stage artifacts, so identical stages compile once.

The key covers everything the AOTInductor build depends on: the exported graph's code, its
input signature (names, symbolic shapes, strides, dtypes, devices of weights and inputs),
the dynamic ranges, the Inductor settings, the target, the host CPU's vector ISA and the torch
version. Weight *values* are not part of it: artifacts are built with the weights left out
(``package_constants_in_so=False``) and filled in from the plan, so two checkpoints of one
architecture share their artifacts. Lives under the settings' cache folder
(``kiln.kernels.settings.Settings.artifact_cache``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from torch.export import ExportedProgram

from kiln.compiler.lower.export import INDUCTOR_CONFIGS, aoti_compile
from kiln.runtime.artifacts import write_atomically
from kiln.runtime.manifest import ARTIFACT_SUFFIXES

# Bump when lowering changes what an identical graph compiles to.
LOWERING_VERSION = 1


def artifact_key(ep: ExportedProgram, target: dict) -> str:
    digest = hashlib.sha256()
    placeholders = [(n.name, str(n.meta["val"].shape), str(n.meta["val"].dtype), str(n.meta["val"].device),
                     str(n.meta["val"].stride())) for n in ep.graph.nodes if n.op == "placeholder"]
    ranges = sorted((str(sym), str(r)) for sym, r in ep.range_constraints.items())
    for part in (f"kiln-lowering {LOWERING_VERSION}", torch.__version__, torch.backends.cpu.get_cpu_capability(),
                 json.dumps(target, sort_keys=True), json.dumps(INDUCTOR_CONFIGS, sort_keys=True),
                 ep.graph_module.code, str(ep.graph_signature), json.dumps(placeholders), json.dumps(ranges)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def compiled_artifact(ep: ExportedProgram, target: dict, cache: Path,
                      build: Callable[[ExportedProgram], bytes] = aoti_compile) -> tuple[bytes, bool]:
    """(artifact bytes, whether they came from ``cache``); ``build`` makes them on a miss: the
    ``.pt2`` of AOTInductor, or ``onnx_compile``'s ``.onnx`` (the target's backend is in the key)."""
    path = cache / "compiled" / f"{artifact_key(ep, target)}{ARTIFACT_SUFFIXES[target['backend']]}"
    if path.is_file():
        return path.read_bytes(), True
    data = build(ep)
    write_atomically(path, data)
    return data, False
