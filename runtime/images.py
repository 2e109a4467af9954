"""Saving images as ComfyUI's SaveImage and PreviewImage do, shared by the nodes and plan runs.

File naming follows ``folder_paths.get_save_image_path`` (``<prefix>_<counter:05>_.png``,
counters continuing after the files already there) so kiln's outputs sit next to ComfyUI's
and diff cleanly; pixels are ``uint8(clip(255*x))`` (truncation). PNGs are written to a
temporary name and renamed, never left half-written.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from datetime import datetime

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from kiln.kernels.images import to_uint8
from kiln.runtime.files import atomic_file

PREVIEW_FOLDER = ".preview"   # under the output dir: kiln's stand-in for ComfyUI's temp/ folder


@dataclass(frozen=True)
class SavedImage:
    """One PNG an output node wrote: its path, and the ``filename``/``subfolder``/``type`` ComfyUI's
    ``executed`` message and ``/view`` use (type ``output`` for SaveImage, ``temp`` for previews)."""

    path: str
    filename: str
    subfolder: str
    type: str

    def ui(self) -> dict:
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


@dataclass
class WrittenImages:
    """What a run's output nodes wrote, by node id (the interpreter's and a plan's results)."""

    images: dict[str, list[SavedImage]] = field(default_factory=dict)

    @property
    def saved(self) -> list[str]:
        """SaveImage's PNGs, in order."""
        return [image.path for images in self.images.values() for image in images if image.type == "output"]

    @property
    def previews(self) -> list[str]:
        """PreviewImage's, under ``.preview/``."""
        return [image.path for images in self.images.values() for image in images if image.type == "temp"]


def write_previews(images: torch.Tensor, output_dir: str, prompt: dict | None,
                   extra_pnginfo: dict | None) -> list[SavedImage]:
    """PreviewImage: ComfyUI's temp previews (``ComfyUI_temp_<5 letters>_NNNNN_.png``, compress
    level 1), written under ``<output_dir>/.preview/``."""
    prefix = "ComfyUI_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
    return write_pngs(images, prefix, os.path.join(output_dir, PREVIEW_FOLDER), prompt, extra_pnginfo,
                      compress_level=1, kind="temp")


def write_pngs(images: torch.Tensor, filename_prefix: str, output_dir: str, prompt: dict | None,
               extra_pnginfo: dict | None, *, compress_level: int, kind: str = "output") -> list[SavedImage]:
    """ComfyUI's SaveImage body: one PNG per batch entry of NHWC ``images`` (float [0,1] or uint8)
    with tEXt chunks ``prompt`` and each ``extra_pnginfo`` key (JSON)."""
    folder, filename, counter = save_image_path(filename_prefix, output_dir,
                                                images[0].shape[1], images[0].shape[0])
    subfolder = os.path.relpath(folder, os.path.abspath(output_dir))
    subfolder = "" if subfolder == "." else subfolder
    metadata = PngInfo()
    if prompt is not None:
        metadata.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        metadata.add_text(key, json.dumps(value))
    saved = []
    for batch_number, image in enumerate(images):
        pixels = Image.fromarray(to_uint8(image.cpu()).numpy())
        while True:   # another process saving into the folder may take a counter first
            name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            path = os.path.join(folder, name)
            try:
                with atomic_file(path, exclusive=True) as f:
                    pixels.save(f, format="PNG", pnginfo=metadata, compress_level=compress_level)
                break
            except FileExistsError:
                counter += 1
        saved.append(SavedImage(path, name, subfolder, kind))
        counter += 1
    return saved


def save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0,
                    image_height: int = 0) -> tuple[str, str, int]:
    """(folder, file name stem, first free counter) for a prefix such as ``"sub/name_%width%"``.

    Expands the frontend's ``%date:yyyy-MM-dd%`` and the backend's ``%width%``, ``%height%``,
    ``%year%`` ... tokens; ``%NodeTitle.widget%`` tokens (which need the UI graph) stay as text.
    The counter is one past the largest ``<stem>_<digits>`` already in the folder.
    """
    filename_prefix = expand_tokens(filename_prefix, image_width, image_height, datetime.now())
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    output_dir = os.path.abspath(output_dir)
    folder = os.path.join(output_dir, subfolder)
    if os.path.commonpath((output_dir, os.path.abspath(folder))) != output_dir:
        raise ValueError(f"filename_prefix {filename_prefix!r} would save outside the output folder {output_dir}")
    os.makedirs(folder, exist_ok=True)
    return folder, filename, _next_counter(folder, filename)


def _next_counter(folder: str, filename: str) -> int:
    stem = os.path.normcase(filename)
    highest = 0
    for entry in os.listdir(folder):
        head = entry[:len(filename) + 1]
        if os.path.normcase(head[:-1]) != stem or head[-1:] != "_":
            continue
        try:
            highest = max(highest, int(entry[len(filename) + 1:].split("_")[0]))
        except ValueError:
            pass
    return highest + 1


_DATE_TOKEN = re.compile(r"%date:([^%]+)%")
_DATE_PART = re.compile(r"yyyy|yy|dd?|MM?|hh?|mm?|ss?")


def expand_tokens(prefix: str, width: int, height: int, now: datetime) -> str:
    """``%date:...%``, ``%width%``, ``%height%``, ``%year%`` ... ``%second%`` substituted in a prefix."""
    prefix = _DATE_TOKEN.sub(lambda m: _DATE_PART.sub(lambda p: _date_part(p.group(0), now), m.group(1)), prefix)
    if "%" not in prefix:
        return prefix
    for token, value in (("%width%", str(width)), ("%height%", str(height)), ("%year%", str(now.year)),
                         ("%month%", f"{now.month:02}"), ("%day%", f"{now.day:02}"),
                         ("%hour%", f"{now.hour:02}"), ("%minute%", f"{now.minute:02}"),
                         ("%second%", f"{now.second:02}")):
        prefix = prefix.replace(token, value)
    return prefix


def _date_part(part: str, now: datetime) -> str:
    if part == "yyyy":
        return str(now.year)
    if part == "yy":
        return str(now.year)[2:]
    value = {"d": now.day, "M": now.month, "h": now.hour, "m": now.minute, "s": now.second}[part[0]]
    return f"{value:02}" if len(part) == 2 else str(value)
