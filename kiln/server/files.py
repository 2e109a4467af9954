"""The server's folders (output, input, temp) and the one place that turns a client's
``type``/``subfolder``/``filename`` into a path inside them (``server.py: view_image``,
``image_upload``), never outside: ``..``, absolute names, NUL bytes and symlinks that leave
the folder are refused with ComfyUI's status codes."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from kiln.runtime.images import PREVIEW_FOLDER

TYPES = ("output", "input", "temp")
PRIVATE_PREFIX = ".kiln"   # names of the server's own files in its folders, never served
_ANNOTATIONS = {"[output]": "output", "[input]": "input", "[temp]": "temp"}


class Refused(Exception):
    """A request for a path the server will not touch; ``status`` is the HTTP code ComfyUI answers."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Folders:
    output: Path
    input: Path

    @property
    def temp(self) -> Path:
        """kiln writes PreviewImage's files under the output folder (``kiln.runtime.images``)."""
        return self.output / PREVIEW_FOLDER

    def root(self, type_name: str | None) -> Path:
        kind = type_name or "output"
        if kind not in TYPES:
            raise Refused(400, f"unknown type {kind!r}: expected output, input or temp")
        return Path(os.path.realpath({"output": self.output, "input": self.input, "temp": self.temp}[kind]))

    def existing_file(self, filename: str, type_name: str | None, subfolder: str | None) -> Path:
        """The file ``/view`` serves: 400 for a bad name or type, 403 outside the folder, 404 absent."""
        filename, annotated = _annotation(filename)
        _check_name(filename)
        root = self.root(annotated or type_name)
        folder = _inside(root, subfolder or "", 403)
        path = folder / os.path.basename(filename)
        if _private(root, path):
            raise Refused(404, "no such file")
        if os.path.realpath(path) != str(path) and not _is_within(root, Path(os.path.realpath(path))):
            raise Refused(403, "the file links outside the folder")
        if not path.is_file():
            raise Refused(404, "no such file")
        return path

    def upload_target(self, filename: str, type_name: str | None, subfolder: str | None) -> tuple[Path, str]:
        """(folder, kind) an upload goes to; 400 when the name or subfolder would leave it."""
        _check_name(filename)
        kind = type_name or "input"
        root = self.root(kind)
        folder = _inside(root, os.path.normpath(subfolder or ""), 400)
        if not _is_within(root, Path(os.path.abspath(folder / filename))):
            raise Refused(400, "the file name leaves the folder")
        if _private(root, folder / filename):
            raise Refused(400, f"names starting with {PRIVATE_PREFIX} belong to the server")
        return folder, kind


def _annotation(filename: str) -> tuple[str, str | None]:
    for suffix, kind in _ANNOTATIONS.items():
        if filename.endswith(suffix):
            return filename[:-len(suffix)].rstrip(), kind
    return filename, None


def _check_name(filename: str) -> None:
    if not filename or "\0" in filename or filename[0] in "/\\" or ".." in filename or os.path.isabs(filename):
        raise Refused(400, "bad file name")


def _private(root: Path, path: Path) -> bool:
    """One of the server's own files (history, auto-compiled plans), which clients never touch."""
    return any(part.startswith(PRIVATE_PREFIX) for part in path.relative_to(root).parts)


def _is_within(root: Path, path: Path) -> bool:
    return os.path.commonpath((str(root), str(path))) == str(root)


def _inside(root: Path, subfolder: str, status: int) -> Path:
    if "\0" in subfolder:
        raise Refused(400, "bad subfolder")
    folder = Path(os.path.realpath(root / subfolder))
    if not _is_within(root, folder):
        raise Refused(status, "the subfolder leaves the folder")
    return folder


def free_name(folder: Path, filename: str, content: bytes) -> tuple[str, bool]:
    """ComfyUI's upload naming without ``overwrite``: the same bytes reuse the existing name
    (duplicate: nothing written), else ``name (1).ext``, ``name (2).ext``, ..."""
    stem, ext = os.path.splitext(filename)
    digest = hashlib.sha256(content).hexdigest()
    name, i = filename, 1
    while (folder / name).exists():
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest:
            return name, True
        name = f"{stem} ({i}){ext}"
        i += 1
    return name, False
