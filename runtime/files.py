"""Writing files so that nobody ever sees a partial one (outputs, the shared artifact cache)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

# The process' file creation mask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, exclusive: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write; it appears at ``path`` (folder created) only when the block
    finishes, via a temporary file in the same folder and a rename; on error it is removed.
    ``exclusive``: never replace a file already there (``FileExistsError``), so that processes
    writing into one folder (Ray replicas saving images) each claim a name of their own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kiln-", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)   # as open() would create it, not mkstemp's owner-only mode
        with os.fdopen(fd, "wb") as f:
            yield f
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def find_in_folders(name: str, folders, what: str) -> Path:
    """``name`` as a file in one of ``folders``: relative, without ``..`` (a request never names a
    file outside them; links placed inside them by the owner are followed, as ComfyUI does).
    Raises ``FileNotFoundError`` / ``ValueError`` with a message about ``what`` ("a LoRA")."""
    relative = PurePosixPath(name.replace("\\", "/"))
    if not name or relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"{what} name is a relative file name inside its folder, without '..'")
    for folder in folders:
        candidate = Path(folder) / relative
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no such file for {what}")
