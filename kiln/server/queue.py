"""ComfyUI's prompt queue (``execution.py: PromptQueue`` + ``server.py: post_prompt``): a min-heap
on (number, prompt_id), so ``front`` (a negated number) jumps ahead of everything queued; one
item runs at a time per worker; pending items can be deleted or cleared."""
from __future__ import annotations

import asyncio
import heapq
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(order=True)
class Job:
    """One queued prompt, as ComfyUI lists it: ``[number, prompt_id, prompt, extra_data, outputs]``."""

    number: float
    prompt_id: str
    prompt: dict = field(compare=False)
    extra_data: dict = field(compare=False)
    outputs: list[str] = field(compare=False)
    graph: Any = field(compare=False, repr=False)    # the validated kiln.compiler.graph.Graph

    def wire(self) -> list:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    @property
    def client_id(self) -> str | None:
        return self.extra_data.get("client_id")


class PromptQueue:
    """The pending heap and the running jobs; ``on_change`` runs after every change (the
    front's ``status`` broadcast)."""

    def __init__(self, on_change: Callable[[], None] = lambda: None):
        self._heap: list[Job] = []
        self._running: dict[str, Job] = {}
        self._counter = 0
        self._on_change = on_change
        self._available = asyncio.Condition()

    def number(self, number: Any, front: bool) -> float:
        """ComfyUI's priority: a given ``number`` as is, else the next counter (negated for ``front``)."""
        if number is not None:
            return float(number)
        value = -self._counter if front else self._counter
        self._counter += 1
        return value

    async def put(self, job: Job) -> None:
        async with self._available:
            heapq.heappush(self._heap, job)
            self._available.notify()
        self._on_change()

    async def get(self) -> Job:
        """The next job by priority, now counted as running."""
        async with self._available:
            await self._available.wait_for(lambda: bool(self._heap))
            job = heapq.heappop(self._heap)
            self._running[job.prompt_id] = job
        self._on_change()
        return job

    def done(self, job: Job) -> None:
        self._running.pop(job.prompt_id, None)
        self._on_change()

    def pending(self) -> list[Job]:
        """In heap order, as ComfyUI lists them (not sorted)."""
        return list(self._heap)

    def running(self) -> list[Job]:
        return list(self._running.values())

    def is_running(self, prompt_id: str) -> bool:
        return prompt_id in self._running

    @property
    def remaining(self) -> int:
        return len(self._heap) + len(self._running)

    def delete(self, prompt_ids) -> None:
        wanted = set(prompt_ids)
        kept = [job for job in self._heap if job.prompt_id not in wanted]
        if len(kept) != len(self._heap):
            self._heap = kept
            heapq.heapify(self._heap)
            self._on_change()

    def clear(self) -> None:
        self._heap = []
        self._on_change()
