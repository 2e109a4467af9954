"""Where a server's plans come from: a folder, or an object-store URI every machine of a cluster
can read (``s3://bucket/plans``, ``gs://...``, ``file:///shared/plans``; fsspec, with the
store's own package such as s3fs). A URI's plans are copied once into a local folder (the
kiln cache), where they are memory-mapped like any plan; a changed object is fetched again."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kiln.kernels.errors import KilnError, Problem
from kiln.kernels.settings import Settings
from kiln.runtime.files import atomic_file

_CHUNK = 16 * 2 ** 20


def is_uri(location: str) -> bool:
    return "://" in location


def local_plans(location: str | Path, settings: Settings) -> Path:
    """The local folder holding the plans of ``location`` (the folder itself when it is one)."""
    if not is_uri(str(location)):
        folder = Path(location)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(str(location))
        objects = {path: info for path, info in fs.find(root, detail=True).items() if path.endswith(".plan")}
    except (ImportError, ValueError, OSError) as failure:   # ImportError: the store's package (s3fs, gcsfs)
        raise KilnError([Problem("plans_uri", "cannot list the plans", input_name="--plans", found=str(location),
                                 hint=f"({type(failure).__name__}: {failure})")]) from None
    folder = settings.artifact_cache / "plans" / hashlib.sha256(str(location).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for path, info in sorted(objects.items()):
        _fetch(fs, path, info, folder / Path(path).name)
    return folder


def _fetch(fs, path: str, info: dict, target: Path) -> None:
    """Copy one plan unless the copy there came from the same object (size and ETag/mtime)."""
    stamp = json.dumps({key: str(info.get(key)) for key in ("size", "ETag", "etag", "mtime", "LastModified")},
                       sort_keys=True)
    marker = target.with_suffix(".plan.source")
    if target.is_file() and marker.is_file() and marker.read_text() == stamp:
        return
    with fs.open(path, "rb") as source, atomic_file(target) as copy:
        while chunk := source.read(_CHUNK):
            copy.write(chunk)
    marker.write_text(stamp)
