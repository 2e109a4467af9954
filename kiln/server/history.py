"""Finished prompts, kept in a small SQLite file in the output folder so a restart loses none
(``server.py: get_history`` shapes; ComfyUI caps the history at 10000 entries)."""
from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from kiln.server.files import PRIVATE_PREFIX

MAX_ENTRIES = 10000
FILE_NAME = f"{PRIVATE_PREFIX}-history.sqlite"


class History:
    """``{prompt_id: entry}`` in insertion order, persisted on every change."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(folder / FILE_NAME), check_same_thread=False)
        self._lock = threading.Lock()
        # WAL with NORMAL sync: a commit survives the process dying (a restart loses nothing) and
        # costs a fraction of a millisecond on the event loop instead of a few fsyncs.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._lock, self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS history "
                             "(seq INTEGER PRIMARY KEY AUTOINCREMENT, prompt_id TEXT UNIQUE, entry TEXT)")

    def add(self, prompt_id: str, entry: dict) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM history WHERE prompt_id = ?", (prompt_id,))
            self._db.execute("INSERT INTO history (prompt_id, entry) VALUES (?, ?)", (prompt_id, json.dumps(entry)))
            self._db.execute("DELETE FROM history WHERE seq < "
                             "(SELECT seq FROM history ORDER BY seq DESC LIMIT 1 OFFSET ?)", (MAX_ENTRIES - 1,))

    def get(self, prompt_id: str) -> dict:
        with self._lock:
            row = self._db.execute("SELECT entry FROM history WHERE prompt_id = ?", (prompt_id,)).fetchone()
        return {prompt_id: json.loads(row[0])} if row else {}

    def items(self, max_items: int | None = None, offset: int = -1) -> dict:
        """ComfyUI's ``get_history`` slicing: without an offset, ``max_items`` is the last N."""
        with self._lock:
            rows = self._db.execute("SELECT prompt_id, entry FROM history ORDER BY seq").fetchall()
        if offset < 0 and max_items is not None:
            offset = len(rows) - max_items
        out = {}
        for i, (prompt_id, entry) in enumerate(rows):
            if i >= offset:
                out[prompt_id] = json.loads(entry)
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    def delete(self, prompt_ids) -> None:
        with self._lock, self._db:
            self._db.executemany("DELETE FROM history WHERE prompt_id = ?", [(i,) for i in prompt_ids])

    def clear(self) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM history")

    def close(self) -> None:
        with self._lock:
            self._db.close()
