"""Where the front's jobs run: one small interface, so the workers can move (to Ray Serve
replicas) without the front changing. ``capacity`` jobs run at once; messages stream back
through the ``MessageSink`` while a job runs."""
from __future__ import annotations

import abc
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from kiln.server.queue import Job
from kiln.server.runner import Outcome, Runner


class MessageSink(Protocol):
    """The front's side: called on the event loop."""

    def send(self, job: Job, event: str, data: dict) -> None: ...

    def preview(self, job: Job, image, node_id: str) -> None: ...


class WorkerPool(abc.ABC):
    capacity: int = 1

    @abc.abstractmethod
    async def run(self, job: Job, sink: MessageSink) -> Outcome:
        """Run ``job`` to its end (success, error or interrupted) while messages go to ``sink``."""

    @abc.abstractmethod
    def interrupt(self, prompt_id: str | None = None) -> None:
        """Stop the running job ``prompt_id`` (any running job when None) at its next step."""

    @abc.abstractmethod
    async def free(self, unload_models: bool, free_memory: bool) -> None:
        """``POST /free``, applied after the running job."""

    async def close(self) -> None:
        """Let go of the workers."""


class LocalPool(WorkerPool):
    """One worker thread in this process, so the event loop never blocks on model work."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-worker")
        self._stops: dict[str, threading.Event] = {}

    async def run(self, job: Job, sink: MessageSink) -> Outcome:
        loop = asyncio.get_running_loop()
        stop = self._stops[job.prompt_id] = threading.Event()

        def emit(event: str, data: dict) -> None:
            loop.call_soon_threadsafe(sink.send, job, event, data)

        def emit_preview(image, node_id: str) -> None:
            loop.call_soon_threadsafe(sink.preview, job, image, node_id)

        try:
            return await loop.run_in_executor(self._executor, self.runner.run, job, emit, stop, emit_preview)
        finally:
            del self._stops[job.prompt_id]

    def interrupt(self, prompt_id: str | None = None) -> None:
        for running, stop in list(self._stops.items()):
            if prompt_id is None or running == prompt_id:
                stop.set()

    async def free(self, unload_models: bool, free_memory: bool) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.free, unload_models, free_memory)

    async def close(self) -> None:
        self.interrupt()
        self._executor.shutdown(wait=True, cancel_futures=True)
