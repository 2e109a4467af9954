"""Plans from an object-store URI (fsspec): copied once into the kiln cache, again when the object changes."""
from __future__ import annotations

import os

import pytest
from kiln.kernels.errors import KilnError
from kiln.kernels.settings import Settings

from kiln.server.plan_storage import local_plans


def test_a_uris_plans_are_copied_once_and_again_when_changed(tmp_path):
    store = tmp_path / "store" / "plans"
    (store / "nested").mkdir(parents=True)
    (store / "a.plan").write_bytes(b"first")
    (store / "nested" / "b.plan").write_bytes(b"second")
    (store / "notes.txt").write_text("not a plan")
    settings = Settings(cache_dir=tmp_path / "cache")

    folder = local_plans(f"file://{store}", settings)
    assert sorted(p.name for p in folder.glob("*.plan")) == ["a.plan", "b.plan"]
    assert (folder / "a.plan").read_bytes() == b"first" and not (folder / "notes.txt").exists()
    copied = (folder / "a.plan").stat().st_mtime_ns

    os.utime(folder / "a.plan", ns=(copied - 10 ** 9, copied - 10 ** 9))   # so a new copy would show
    assert local_plans(f"file://{store}", settings) == folder
    assert (folder / "a.plan").stat().st_mtime_ns == copied - 10 ** 9      # unchanged object: not copied

    (store / "a.plan").write_bytes(b"changed!")
    local_plans(f"file://{store}", settings)
    assert (folder / "a.plan").read_bytes() == b"changed!"


def test_a_folder_is_used_where_it_is(tmp_path):
    assert local_plans(tmp_path / "plans", Settings(cache_dir=tmp_path / "cache")) == tmp_path / "plans"


def test_an_unknown_store_is_refused_naming_it(tmp_path):
    with pytest.raises(KilnError, match="cannot list the plans.*nosuch://bucket"):
        local_plans("nosuch://bucket/plans", Settings(cache_dir=tmp_path / "cache"))
