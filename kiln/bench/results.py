"""``results.json`` and ``results.csv``: every number of every finished cell and the exact
workflow it ran, rewritten (atomically) after each cell, so a stopped study loses nothing that
finished and ``--resume`` knows where to go on.

JSON has no infinity: a PSNR of identical images is written as the string ``"inf"`` and read
back as ``float("inf")``.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from kiln.kernels.errors import KilnError, Problem
from kiln.runtime.files import atomic_file

FORMAT = 1
RESULTS, CSV = "results.json", "results.csv"
_MEASURES = ("psnr", "ssim", "latent_rmse")
_AGAINST = {"reference": "ref", "fp32_interpreter": "fp32"}


class Results:
    """The study's results file: its description, the plans compiled, the references run and the cells done."""

    def __init__(self, folder: Path, data: dict):
        self.folder, self.data = folder, data

    @classmethod
    def open(cls, folder: Path, study: dict, fingerprint: str, resume: bool) -> "Results":
        """A new results file, or with ``resume`` the one in ``folder`` if the same study wrote it."""
        path = folder / RESULTS
        if path.exists():
            if not resume:
                raise KilnError([Problem("report_exists", "the report folder already holds a study",
                                         input_name="-o", expected="--resume to continue it, or another folder",
                                         found=str(path))])
            data = load(path)
            if data.get("fingerprint") != fingerprint:
                raise KilnError([Problem("report_exists", "the report folder holds another study (other workflow, "
                                         "axes, seeds, reference or repeats)", input_name="--resume",
                                         expected="the command that started it", found=str(path))])
            data["study"] = {**study, "created": data["study"].get("created", study.get("created"))}
            return cls(folder, data)
        return cls(folder, {"kiln_bench": FORMAT, "fingerprint": fingerprint, "study": study, "groups": {},
                            "references": {}, "cells": []})

    # --- what is done -----------------------------------------------------------------------
    def done(self) -> set[str]:
        return {cell["name"] for cell in self.data["cells"] if cell["status"] == "done"}

    def add_cell(self, cell: dict) -> None:
        self.data["cells"] = [c for c in self.data["cells"] if c["name"] != cell["name"]] + [cell]
        mark_pareto(self.data["cells"])
        self.save()

    def reference(self, key: str) -> dict | None:
        return self.data["references"].get(key)

    def add_reference(self, key: str, record: dict) -> None:
        self.data["references"][key] = record
        self.save()

    def group(self, key: str) -> dict | None:
        return self.data["groups"].get(key)

    def add_group(self, key: str, record: dict) -> None:
        self.data["groups"][key] = record
        self.save()

    def with_pending(self, names: list[str], pending: list[dict]) -> dict:
        """The results with cells not run yet listed (status pending) in study order, for the report."""
        cells = {cell["name"]: cell for cell in [*pending, *self.data["cells"]]}
        return {**self.data, "cells": [cells[name] for name in names if name in cells]}

    # --- files --------------------------------------------------------------------------------
    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.folder / RESULTS) as f:
            f.write(dumps(self.data).encode())
        with atomic_file(self.folder / CSV) as f:
            f.write(to_csv(self.data).encode())


def dumps(data: dict) -> str:
    return json.dumps(_finite(data), indent=1, ensure_ascii=False) + "\n"


def load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(), parse_constant=float)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KilnError([Problem("report_unreadable", f"results.json cannot be read: {error}", input_name="--resume",
                                 expected="a results.json written by kiln bench", found=str(path))]) from error
    if not isinstance(data, dict) or data.get("kiln_bench") != FORMAT:
        raise KilnError([Problem("report_unreadable", "not a results.json of this kiln bench", input_name="--resume",
                                 expected=f"kiln_bench format {FORMAT}", found=str(path))])
    return _infinite(data)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _infinite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (float(v) if k in _MEASURES and v in ("inf", "-inf") else _infinite(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_infinite(v) for v in value]
    return value


def mark_pareto(cells: list[dict]) -> None:
    """``pareto``: no other finished cell is both faster and closer to the reference (PSNR)."""
    scored = [(c, c["time_s"]["median"], c["fidelity"]["reference"]["psnr"]) for c in cells
              if c["status"] == "done" and c["fidelity"]["reference"]["psnr"] is not None]
    for cell in cells:
        cell["pareto"] = False
    for cell, seconds, psnr in scored:
        cell["pareto"] = not any(t <= seconds and p >= psnr and (t < seconds or p > psnr) for _, t, p in scored)


def to_csv(data: dict) -> str:
    axes = [axis["name"] for axis in data["study"]["axes"]]
    header = ["cell", *axes, "engine", "ran_on", "fallback", "seeds", "time_median_s",
              "time_min_s", "time_max_s", "time_stdev_s", "compile_s", "steps", "model_calls", "ms_per_model_call",
              "peak_memory_mib", "memory_kind", "gflops", "floor_pct",
              *[f"{short}_{m}" for short in _AGAINST.values() for m in _MEASURES], "pareto", "image", "workflow"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for cell in data["cells"]:
        if cell["status"] != "done":
            continue
        times = cell["time_s"]
        engine = cell["engine"]
        writer.writerow([cell["name"], *[cell["values"].get(a) for a in axes],
                         f"{engine['backend']}/{engine['dtype']}/{engine['device']}",
                         cell["ran_on"], cell["fallback"] or "", " ".join(map(str, cell["seeds"])),
                         times["median"], times["min"], times["max"], times["stdev"], cell["compile_s"],
                         cell["steps"], cell["model_calls"], cell["ms_per_model_call"], cell["peak_memory_mib"],
                         cell["memory_kind"], cell["gflops"], cell["floor_pct"],
                         *[cell["fidelity"][against][m] for against in _AGAINST for m in _MEASURES],
                         cell["pareto"], cell["image"], json.dumps(cell["workflow"], ensure_ascii=False)])
    return out.getvalue()
