"""PlanWriter: the compiler's way to write a plan file (the reader's schema lives in manifest.py).

Members are stored uncompressed and each starts on a 64-byte boundary (padding goes into the
local header's extra field, as Android's zipalign does), so the runtime can memory-map the
weights straight out of the zip with every tensor aligned. Weights are deduplicated by
content: the UNet two sampler stages share is stored once and both stages' constant maps
point at the same keys; identical artifacts (one denoiser for both stages) are one member.
The weights member is written first: an artifact that addresses its tensors in the file itself
(an optimized ONNX graph) is completed once their offsets are known (``bind``), and the manifest
records where the member starts. The file appears at its destination only when complete
(temporary file in the same folder, then ``os.replace``).
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors.torch import save_file

from kiln.kernels.settings import Settings
from kiln.runtime.artifacts import cached_artifact, constant_fqns
from kiln.runtime.plan_file import digest_of
from kiln.runtime.dataflow import check_dataflow
from kiln.runtime.kinds import KINDS
from kiln.runtime.manifest import (CONSTANTS_MEMBER, FORMAT, FORMAT_VERSION, MANIFEST_MEMBER, WEIGHTS_MEMBER,
                                   artifact_member, manifest_from_dict)
from kiln.runtime.ort_layouts import Relayout

# (artifact bytes, initializer name -> (offset in the plan file, length)) -> the artifact reading them there
Binder = Callable[[bytes, Mapping[str, tuple[int, int]]], bytes]

MEMBER_ALIGNMENT = 64
_PADDING_EXTRA_ID = 0xD935   # zipalign's extra-field id: ignored by every zip reader
_LOCAL_HEADER_SIZE = 30
_ZIP64_LOCAL_EXTRA_SIZE = 20   # what zipfile appends to the local header of a zip64 member


class PlanWriter:
    """Collect a plan's artifacts, weights and constants; ``write(manifest)`` writes the zip.

    Typical use by lowering::

        writer = PlanWriter("hires.plan")     # PlanWriter(path, backend="onnx") for .onnx artifacts
        for stage in program.stages:          # compiled ones
            writer.add_artifact(stage.name, pt2_path, stage.module.state_dict())
        writer.add_constants(program.constants)
        writer.write({"target": ..., "workflow": ..., "inputs": [...], "stages": [...],
                      "folded": [...], "dropped_models": [...]})
    """

    def __init__(self, path: str | os.PathLike, backend: str = "aoti", cache: Path | None = None,
                 fp16_weights: bool = False):
        self.path = Path(path)
        self.backend = backend
        self.fp16_weights = fp16_weights   # fp32 weights stored as fp16 (the runtime upcasts them at load)
        self.cache = Settings().artifact_cache if cache is None else Path(cache)   # where .pt2 packages are opened
        self._artifacts: dict[str, bytes] = {}               # stage -> artifact bytes
        self._members: dict[str, str] = {}                   # stage -> artifact member (shared if identical)
        self._constant_names: dict[str, dict[str, str]] = {}  # stage -> FQN -> weights key
        self._weights: dict[str, torch.Tensor] = {}          # weights key -> tensor
        self._weight_keys: dict[tuple, str] = {}             # content key -> weights key
        self._constants: dict[str, torch.Tensor] = {}
        self._files: dict[str, bytes] = {}                   # other members (tokenizer vocabularies)
        self._optimized: dict[str, dict[str, Relayout]] = {}  # stage -> relayouts, for optimized ONNX graphs
        self._binders: dict[str, Binder] = {}

    def add_artifact(self, stage_name: str, artifact: bytes | str | os.PathLike,
                     weights: Mapping[str, torch.Tensor], device: str = "cpu",
                     constant_names: Iterable[str] | None = None, *,
                     relayouts: Mapping[str, Relayout] | None = None, bind: Binder | None = None) -> dict[str, str]:
        """Store the stage's artifact and the weights it was compiled without.

        ``weights`` maps constant FQNs to tensors and may hold more than the artifact needs (a
        whole state dict): only the FQNs the artifact asks for are kept, ``constant_names``
        when given (ONNX: its initializers), else what the ``.pt2`` package lists when opened on
        ``device`` (the compile target). ``relayouts`` (possibly empty) marks a graph optimized
        at compile time and says which of its weights were re-laid (kiln.runtime.ort_layouts);
        ``bind`` completes the artifact once its weights' places in the file are known. Returns
        the stage's ``constant_names`` (FQN -> weights key).
        """
        data = artifact if isinstance(artifact, bytes) else Path(artifact).read_bytes()
        fqns = (list(constant_names) if constant_names is not None
                else constant_fqns(cached_artifact(data, digest_of(data), self.cache), device))
        missing = [fqn for fqn in fqns if fqn not in weights]
        if missing:
            raise ValueError(f"stage {stage_name}: the artifact needs weights that were not given: {missing[:8]}")
        names = {fqn: self._add_weight(stage_name, fqn, weights[fqn]) for fqn in fqns}
        same = next((stage for stage, blob in self._artifacts.items()   # a bound artifact: also the same weights
                     if blob == data and (bind is None or self._constant_names[stage] == names)), None)
        self._members[stage_name] = (self._members[same] if same is not None
                                     else artifact_member(stage_name, self.backend))
        self._artifacts[stage_name] = data
        self._constant_names[stage_name] = names
        if relayouts is not None:
            self._optimized[stage_name] = dict(relayouts)
        if bind is not None:
            self._binders[stage_name] = bind
        return names

    def add_constants(self, constants: Mapping[str, torch.Tensor]) -> None:
        """Folded environment values (``const.<node>.<slot>.<field>`` -> tensor)."""
        for name, tensor in constants.items():
            self._constants[name] = _storable(tensor)

    def add_file(self, member: str, data: bytes) -> None:
        """Another member stored as is (a tokenizer vocabulary a ``tokenize`` stage names)."""
        self._files[member] = bytes(data)

    def write(self, manifest: Mapping) -> Path:
        """Fill in format, versions, artifacts, constant maps and member hashes; validate; write.

        ``manifest`` holds target, workflow, inputs, stages (dicts per docs/plans.md, without
        ``artifact``/``constant_names``), folded and dropped_models.
        """
        if manifest["target"]["backend"] != self.backend:
            raise ValueError(f"the manifest's backend {manifest['target']['backend']!r} is not the writer's "
                             f"{self.backend!r}")
        data = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION,
                "kiln_version": metadata.version("kiln"), "torch_version": torch.__version__,
                "stages": [self._stage_entry(dict(stage)) for stage in manifest["stages"]]}
        unused = set(self._artifacts) - {stage["name"] for stage in data["stages"]}
        if unused:
            raise ValueError(f"artifacts were added for stages the manifest does not list: {sorted(unused)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.path.parent, prefix=".kiln-plan-") as scratch:
            weights = _safetensors_file(self._weights, Path(scratch) / "w")
            tmp = Path(scratch) / "plan.zip"
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
                weights_at = _write_aligned(zf, WEIGHTS_MEMBER, weights)
                places = _tensor_places(weights, weights_at) if self._binders else {}
                members = {WEIGHTS_MEMBER: weights,
                           CONSTANTS_MEMBER: _safetensors_file(self._constants, Path(scratch) / "c"), **self._files}
                for stage_name, blob in self._artifacts.items():
                    if stage_name in self._binders:
                        blob = self._binders[stage_name](blob, {fqn: places[key] for fqn, key
                                                                in self._constant_names[stage_name].items()})
                    members[self._members[stage_name]] = blob   # identical artifacts: one member
                data["members"] = {name: _digest(content) for name, content in members.items()}
                if self._binders:
                    data["weights_offset"] = weights_at
                checked = manifest_from_dict(data)
                check_dataflow(checked, self._constants)
                for name, content in {**members, MANIFEST_MEMBER: checked.to_json()}.items():
                    if name != WEIGHTS_MEMBER:
                        _write_aligned(zf, name, content)
            os.replace(tmp, self.path)
        return self.path

    def _stage_entry(self, stage: dict) -> dict:
        name = stage.get("name")
        kind = KINDS.get(stage.get("kind"))
        if kind is not None and kind.compiled:
            if name not in self._artifacts:
                raise ValueError(f"stage {name} ({stage.get('kind')}) has no artifact: call add_artifact first")
            stage.update(artifact=self._members[name], constant_names=self._constant_names[name])
            if name in self._optimized:
                stage.update(optimized=True, relayouts={init: layout.to_json()
                                                        for init, layout in self._optimized[name].items()})
        else:
            stage.update(artifact=None, constant_names={})
        return stage

    def _add_weight(self, stage_name: str, fqn: str, tensor: torch.Tensor) -> str:
        tensor = _storable(tensor)
        if self.fp16_weights and tensor.dtype == torch.float32:
            tensor = tensor.half()
        digest = digest_of(tensor.reshape(-1).view(torch.uint8).numpy())
        content = (str(tensor.dtype), tuple(tensor.shape), digest)
        key = self._weight_keys.get(content)
        if key is None:
            key = fqn if fqn not in self._weights else f"{stage_name}/{fqn}"
            self._weights[key] = tensor
            self._weight_keys[content] = key
        return key


def _storable(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def _safetensors_file(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """safetensors refuses tensors sharing storage (views of one weight): those are copied."""
    seen, unshared = set(), {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        unshared[name] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    save_file(unshared, str(path))
    return path


def _digest(content: bytes | Path) -> str:
    if isinstance(content, bytes):
        return digest_of(content)
    with open(content, "rb") as f:   # a safetensors file: never empty
        return digest_of(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def _tensor_places(path: Path, data_start: int) -> dict[str, tuple[int, int]]:
    """Tensor name -> (offset in the plan file, length) of a safetensors file written at ``data_start``."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = data_start + 8 + header_len
    return {name: (base + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"}


def _write_aligned(zf: zipfile.ZipFile, name: str, content: bytes | Path) -> int:
    """Add a stored member whose data starts at a multiple of MEMBER_ALIGNMENT in the file; returns
    where its data starts."""
    size = len(content) if isinstance(content, bytes) else content.stat().st_size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT   # zipfile's own rule for a member of known size
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    header = _LOCAL_HEADER_SIZE + len(name.encode("utf-8")) + (_ZIP64_LOCAL_EXTRA_SIZE if zip64 else 0)
    pad = -(zf.fp.tell() + header) % MEMBER_ALIGNMENT
    if pad < 4:   # an extra field is at least its 4-byte id + length
        pad += MEMBER_ALIGNMENT
    info.extra = struct.pack("<HH", _PADDING_EXTRA_ID, pad - 4) + bytes(pad - 4)
    with zf.open(info, "w", force_zip64=zip64) as dest:
        start = zf.fp.tell()
        if isinstance(content, bytes):
            dest.write(content)
        else:
            with open(content, "rb") as src:
                shutil.copyfileobj(src, dest, 1 << 24)
    return start
