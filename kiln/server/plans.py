"""Answering from plans: the compiled plans a server knows, which submitted workflow each one
serves, and compiling a workflow in the background once it has been submitted often enough.

A workflow matches a plan as ``kiln.plan_match`` says; anything else runs on the interpreter: a
plan is never used for a workflow it was not compiled for.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kiln.kernels.errors import KilnError
from kiln.kernels.settings import Settings
from kiln.nodes import registry
from kiln.plan_match import clean_node, match_values
from kiln.runtime.executor import bind_inputs
from kiln.runtime.manifest import Manifest
from kiln.runtime.plan import LoadedPlan, PlanReader, load_plan

log = logging.getLogger("kiln.serve")


@dataclass
class PlanEntry:
    name: str
    path: Path
    manifest: Manifest
    source: str                      # "folder" (--plans) or "compiled" (--compile auto)
    hits: int = 0
    loaded: LoadedPlan | None = None


@dataclass
class _Submissions:
    prompts: list[dict] = field(default_factory=list)
    state: str = "counting"          # counting | compiling | compiled | refused
    reason: str | None = None


class PlanCatalog:
    """The plans under ``folder`` (read at start), plus those ``--compile auto`` adds there."""

    def __init__(self, folder: Path | None, settings: Settings, *, compile_after: int | None = None,
                 compiler: Callable[[dict, list[str], Path], Path] | None = None):
        self.folder = folder
        self.settings = settings
        self.compile_after = compile_after
        self._compiler = compiler
        self._entries: dict[str, PlanEntry] = {}
        self._submissions: dict[str, _Submissions] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        if folder is not None and folder.is_dir():
            for path in sorted(folder.glob("*.plan")):
                self._add(path, "folder")

    def _add(self, path: Path, source: str) -> None:
        try:
            manifest = PlanReader(path).manifest
        except KilnError as error:
            log.warning("kiln serve: skipping plan %s: %s", path, error)
            return
        with self._lock:
            self._entries[path.stem] = PlanEntry(path.stem, path, manifest, source)

    # --- matching ---------------------------------------------------------------------------
    def match(self, prompt: dict, graph) -> tuple[PlanEntry, dict] | None:
        """The plan serving ``prompt`` (as validated into ``graph``) and its runtime input values."""
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            values = match_values(entry.manifest, prompt, graph)
            if values is None:
                continue
            try:
                bind_inputs(entry.manifest, values)
            except KilnError:   # a value outside the compiled range: the interpreter serves it
                continue
            return entry, values
        return None

    def loaded(self, entry: PlanEntry) -> LoadedPlan:
        """The entry's plan, loaded on its first hit and kept."""
        with self._lock:
            entry.hits += 1
            return self._load(entry)

    def count_hit(self, entry: PlanEntry) -> None:
        """A prompt for ``entry`` went to a worker elsewhere (a Ray replica)."""
        with self._lock:
            entry.hits += 1

    def load(self, name: str) -> None:
        """Load the plan ``name`` before its first prompt (a Ray replica warming it)."""
        with self._lock:
            self._load(self._entries[name])

    def _load(self, entry: PlanEntry) -> LoadedPlan:
        if entry.loaded is None:
            entry.loaded = load_plan(entry.path, settings=self.settings)
        return entry.loaded

    def unload(self, name: str) -> None:
        """Drop the loaded plan ``name`` (its next prompt loads it again)."""
        with self._lock:
            self._entries[name].loaded = None

    def listing(self) -> list[dict]:
        with self._lock:
            entries = list(self._entries.values())
            pending = [{"workflow": key[:16], "state": s.state, "submissions": len(s.prompts), "reason": s.reason}
                       for key, s in self._submissions.items() if s.state != "compiled"]
        return [{"name": e.name, "path": str(e.path), "source": e.source, "hits": e.hits,
                 "loaded": e.loaded is not None, "target": e.manifest.target,
                 "inputs": [i.name for i in e.manifest.inputs]} for e in entries] + \
            ([{"pending": pending}] if pending else [])

    # --- --compile auto -----------------------------------------------------------------------
    def submitted(self, prompt: dict, graph) -> None:
        """Count a workflow the interpreter served; compile it after ``compile_after`` submissions."""
        if self.compile_after is None or self._compiler is None or self.folder is None:
            return
        key = shape_key(prompt)
        with self._lock:
            record = self._submissions.setdefault(key, _Submissions())
            if record.state != "counting":
                return
            record.prompts.append(prompt)
            if len(record.prompts) < self.compile_after:
                return
            inputs, refusal = runtime_inputs_for(record.prompts)
            if refusal is not None:
                record.state, record.reason = "refused", refusal
                return
            record.state = "compiling"
        thread = threading.Thread(target=self._compile, args=(key, record, prompt, inputs), daemon=True,
                                  name="kiln-compile")
        self._threads.append(thread)
        thread.start()

    def _compile(self, key: str, record: _Submissions, prompt: dict, inputs: list[str]) -> None:
        path = self.folder / f"auto-{key[:16]}.plan"
        try:
            self._compiler(prompt, inputs, path)
        except KilnError as error:
            record.state, record.reason = "refused", "; ".join(p.format() for p in error.problems)[:500]
            log.warning("kiln serve: not compiling workflow %s: %s", key[:16], record.reason)
            return
        except Exception as error:   # noqa: BLE001 - a compile bug must not take the server down
            record.state, record.reason = "refused", f"{type(error).__name__}: {error}"
            log.exception("kiln serve: compiling workflow %s failed", key[:16])
            return
        self._add(path, "compiled")
        record.state = "compiled"

    def wait_for_compiles(self, timeout: float | None = None) -> None:
        for thread in list(self._threads):
            thread.join(timeout)


def shape_key(prompt: dict) -> str:
    """The workflow with its sampler seeds left out: submissions that differ only in seeds share it."""
    shape = {}
    for node_id, node in sorted(prompt.items()):
        node = clean_node(node)
        definition = registry.get(node["class_type"] or "")
        seed = definition.seed if definition is not None else None
        shape[node_id] = [node["class_type"], {k: v for k, v in sorted(node["inputs"].items()) if k != seed}]
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()


def runtime_inputs_for(prompts: list[dict]) -> tuple[list[str], str | None]:
    """``--input`` declarations for the widgets that varied across ``prompts`` (seeds are runtime
    inputs anyway), or a reason not to compile when one varied that no plan can take."""
    inputs, refused = [], []
    first = prompts[0]
    for node_id, node in sorted(first.items()):
        node = clean_node(node)
        definition = registry.get(node["class_type"] or "")
        for name, value in node["inputs"].items():
            if isinstance(value, list) or definition is None or name == definition.seed:
                continue
            if all(clean_node(p.get(node_id))["inputs"].get(name) == value for p in prompts[1:]):
                continue
            if definition.plan is not None and name in definition.plan.runtime_widgets:
                inputs.append(f"{node_id}.{name}")
            else:
                refused.append(f"{node_id}.{name} ({node['class_type']})")
    if refused:
        return [], "values a plan cannot take at run time change between submissions: " + ", ".join(refused)
    return inputs, None
