"""A plan file's container: the zip, its manifest, its members' bytes and their digests.

Separate from ``kiln.runtime.plan`` (which loads what the members hold) because it needs neither
torch nor onnxruntime: ``kiln run x.plan`` checks the digests while those import.
"""
from __future__ import annotations

import mmap
import struct
import threading
import zipfile
from pathlib import Path

import blake3

from kiln.runtime.errors import PlanError
from kiln.runtime.manifest import MANIFEST_MEMBER, WEIGHTS_MEMBER, Manifest, parse_manifest

ZIP_MAGIC = b"PK\x03\x04"
_ALTERED = "(the file was altered: copy it again, or recompile it with kiln compile)"
_LOCAL_HEADER = struct.Struct("<4s22xHH")   # signature, ..., file name length, extra length


class PlanFile:
    """A plan file opened for reading: its manifest, members and their bytes (memory-mapped).
    Needs neither torch nor onnxruntime, so ``kiln run`` opens the plan and checks its digests
    (``start_verifying``) while those import: ~0.5 s of a fresh process's first SD1.5 image."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise PlanError("invalid_plan", f"plan file {self.path} does not exist")
        with open(self.path, "rb") as f:
            head = f.read(4)
        if head != ZIP_MAGIC:
            raise PlanError("invalid_plan", f"{self.path} is not a kiln plan (not a zip file)",
                            expected="a .plan file written by `kiln compile`", found=f"a file starting with {head!r}",
                            hint="(make one with kiln compile workflow.json -o x.plan)")
        try:
            with zipfile.ZipFile(self.path) as zf:
                self.entries = {info.filename: info for info in zf.infolist()}
                if MANIFEST_MEMBER not in self.entries:
                    raise PlanError("invalid_plan", f"{self.path} is missing member {MANIFEST_MEMBER}")
                manifest = zf.read(MANIFEST_MEMBER)
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise PlanError("invalid_plan", f"{self.path} is truncated or damaged: its zip directory cannot be read",
                            found=str(exc), hint="(copy or download the plan again)") from None
        self.manifest: Manifest = parse_manifest(manifest)
        with open(self.path, "rb") as f:   # the map keeps its own handle
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)   # writable: torch.frombuffer wants it
        self._verifying: threading.Thread | None = None
        self._verified: list[BaseException | None] = []

    def start_verifying(self) -> None:
        """Check the members (``verify_members``) in a thread, on one core (the imports it overlaps
        take the other); ``verify_members`` then waits for it."""
        def verify() -> None:
            try:
                self._verify_members(threads=1)
                self._verified.append(None)
            except BaseException as error:   # re-raised in the caller's thread
                self._verified.append(error)

        self._verifying = threading.Thread(target=verify, name="kiln-verify-plan", daemon=True)
        self._verifying.start()



    def verify_members(self) -> None:
        """Every listed member present, stored, and matching its BLAKE3 digest; nothing unlisted; the
        weights where the graphs that read them from the file expect them."""
        if self._verifying is None:
            self._verify_members()
            return
        self._verifying.join()
        if self._verified[0] is not None:
            raise self._verified[0]

    def _verify_members(self, threads: int = blake3.blake3.AUTO) -> None:
        listed = self.manifest.members
        missing = [name for name in listed if name not in self.entries]
        if missing:
            raise PlanError("invalid_plan", f"the plan is missing member{plural(missing)} {', '.join(missing)}",
                            expected="every member its manifest lists", hint=_ALTERED)
        unlisted = [name for name in self.entries if name not in listed and name != MANIFEST_MEMBER]
        if unlisted:
            raise PlanError("invalid_plan", f"the plan has {'a member' if len(unlisted) == 1 else 'members'} "
                            f"its manifest does not list: {', '.join(unlisted)}", hint=_ALTERED)
        compressed = [name for name in listed if self.entries[name].compress_type != zipfile.ZIP_STORED]
        if compressed:
            raise PlanError("invalid_plan", f"member{plural(compressed)} {', '.join(compressed)} "
                            f"{'is' if len(compressed) == 1 else 'are'} compressed; kiln plans store members "
                            "uncompressed",
                            hint="(the file was re-zipped: copy the original, or recompile it with kiln compile)")
        bad = [(name, digest, self._digest(name, threads)) for name, digest in listed.items()]
        bad = [item for item in bad if item[1] != item[2]]
        if bad:
            names = ", ".join(name for name, _, _ in bad)
            raise PlanError("plan_member_mismatch",
                            f"member{plural(bad)} {names} do{'es' if len(bad) == 1 else ''} not match the manifest's "
                            "digest (damaged or modified)",
                            expected=f"BLAKE3 {bad[0][1][:16]}...", found=f"BLAKE3 {bad[0][2][:16]}...",
                            hint="(copy the plan again, or recompile it with kiln compile)")
        offset = self.manifest.weights_offset
        if offset is not None and self.member_range(WEIGHTS_MEMBER)[0] != offset:
            raise PlanError("invalid_plan", f"{WEIGHTS_MEMBER} is not where the plan's graphs read it (the file "
                            "was re-packed)", expected=f"offset {offset}",
                            found=f"offset {self.member_range(WEIGHTS_MEMBER)[0]}",
                            hint="(copy the plan file as it is, or recompile it with kiln compile)")

    def _digest(self, name: str, threads: int) -> str:
        """The member's digest; its pages are then dropped from this process (they stay in the page
        cache): a mapping that reads them for real, onnxruntime's or the weights', maps them again,
        and hashing must not count them twice in the process's memory."""
        start, end = self.member_range(name)
        digest = digest_of(self.member(name), threads=threads)
        page = mmap.PAGESIZE
        begin = start // page * page
        self._map.madvise(mmap.MADV_DONTNEED, begin, min(len(self._map), -(-end // page) * page) - begin)
        return digest

    def member_range(self, name: str) -> tuple[int, int]:
        """(start, end) byte offsets of a stored member's data in the file."""
        info = self.entries[name]
        try:
            signature, name_len, extra_len = _LOCAL_HEADER.unpack_from(self._map, info.header_offset)
        except struct.error:
            signature = None
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len if signature == ZIP_MAGIC else None
        if start is None or start + info.file_size > len(self._map):
            raise PlanError("invalid_plan", f"{self.path}: member {name} lies outside the file (truncated or damaged)")
        return start, start + info.file_size

    def member(self, name: str) -> memoryview:
        start, end = self.member_range(name)
        return memoryview(self._map)[start:end]


def digest_of(data, *, threads: int = blake3.blake3.AUTO) -> str:
    """The BLAKE3 hex digest of a bytes-like object: what a plan lists for each member. BLAKE3 on
    every core checks the SD1.5 weights in ~0.5 s where SHA-256 took 2.2 s, at the start of every run."""
    return blake3.blake3(data, max_threads=threads).hexdigest()


def plural(items) -> str:
    """The "s" of a count in a message: "member" for one, "members" for the others."""
    return "" if len(items) == 1 else "s"
