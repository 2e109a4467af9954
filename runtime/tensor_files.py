"""safetensors files, read the two ways kiln needs.

A plan's members are viewed where they lie (``mapped_tensors``: tensors over a memory-mapped
buffer, no copy). A model file is read tensor by tensor into memory of each tensor's own
(``read_tensors``): a loader converts each one to its compute dtype and drops it, so the file never
sits in the process beside the converted model. (safetensors' ``load_file`` maps the file; the
mapping lives while any of its tensors does, and every page a conversion touched counts in the
process's memory: loading SD1.5 peaked 1.7 GB higher.) Each tensor read gets an anonymous
mapping of its own, given back to the system the moment the tensor is freed (a text encoder once
the prompts are encoded), where malloc would keep the freed blocks in its heap.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100_000_000   # safetensors' own limit


def parse_header(head: bytes, size: int) -> tuple[dict[str, tuple[torch.dtype, list[int], int, int]], int]:
    """The tensors a safetensors file of ``size`` bytes holds, from its first bytes ``head`` (at
    least 8, and the header when it is longer): name -> (dtype, shape, start, end) as offsets in the
    file, and how many bytes the header takes. ValueError says what is wrong."""
    if len(head) < 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack_from("<Q", head)
    if length > _MAX_HEADER or 8 + length > size:
        raise ValueError(f"header length {length} does not fit a {size}-byte file")
    if len(head) < 8 + length:
        return {}, 8 + length
    try:
        raw = json.loads(bytes(head[8:8 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON ({exc})") from None
    raw.pop("__metadata__", None)
    base, out = 8 + length, {}
    for name, entry in raw.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = [int(n) for n in entry["shape"]]
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name} has a malformed entry") from None
        count = 1
        for n in shape:
            count *= n
        if not 0 <= begin <= end <= size - base or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name} lies outside the file or has the wrong size")
        out[name] = (dtype, shape, base + begin, base + end)
    return out, base


def mapped_tensors(buffer, start: int, end: int) -> dict[str, torch.Tensor]:
    """The safetensors file in ``buffer[start:end]`` (a writable mapped buffer) as tensors viewing it."""
    entries, _ = parse_header(memoryview(buffer)[start:end], end - start)
    out = {}
    for name, (dtype, shape, begin, stop) in entries.items():
        count = (stop - begin) // dtype.itemsize
        flat = (torch.frombuffer(buffer, dtype=dtype, count=count, offset=start + begin) if count
                else torch.empty(0, dtype=dtype))
        out[name] = flat.reshape(shape)
    return out


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``path``, each read into memory of its own."""
    with open(path, "rb", buffering=0) as f:
        size = Path(path).stat().st_size
        head = f.read(8)
        _, base = parse_header(head, size)
        entries, _ = parse_header(head + f.read(base - 8), size)
        out = {}
        for name, (dtype, shape, begin, stop) in entries.items():
            if stop == begin:
                out[name] = torch.empty(shape, dtype=dtype)
                continue
            memory = mmap.mmap(-1, stop - begin)   # the tensor holds it; unmapped when the tensor dies
            view = memoryview(memory)
            f.seek(begin)
            while view:
                read = f.readinto(view)
                if not read:
                    raise ValueError(f"tensor {name} ends past the end of the file")
                view = view[read:]
            del view
            out[name] = torch.frombuffer(memory, dtype=dtype).reshape(shape)
    return out
