"""Where the front's jobs run: one small interface, so the workers can move (to Ray Serve
replicas, ``kiln.server.ray_pool``) without the front changing. ``capacity`` jobs run at once;
messages stream back through the ``MessageSink`` while a job runs."""
from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import AsyncIterator
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


# A job's events as they happen: ("message", event, data), ("preview", image, node_id), and last
# ("outcome", Outcome, None). Plain tuples, so they cross process boundaries (Ray) as they are.
Event = tuple


class JobThreads:
    """Runs jobs on ``runner`` in a worker thread, so an event loop never blocks on model work;
    the jobs' stop flags, for interrupts."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-worker")
        self._stops: dict[str, threading.Event] = {}

    async def events(self, job: Job) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        stop = self._stops[job.prompt_id] = threading.Event()

        def emit(event: str, data: dict) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("message", event, data))

        def emit_preview(image, node_id: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("preview", image, node_id))

        # the future settles through call_soon_threadsafe too, so its callback comes after every message
        running = loop.run_in_executor(self.executor, self.runner.run, job, emit, stop, emit_preview)
        running.add_done_callback(lambda _: events.put_nowait(("finished", None, None)))
        try:
            while (item := await events.get())[0] != "finished":
                yield item
            yield "outcome", await running, None
        finally:
            stop.set()   # the consumer went away (a cancelled request): stop at the next step
            del self._stops[job.prompt_id]

    def interrupt(self, prompt_id: str | None = None) -> None:
        for running, stop in list(self._stops.items()):
            if prompt_id is None or running == prompt_id:
                stop.set()

    async def free(self, unload_models: bool, free_memory: bool) -> None:
        await asyncio.get_running_loop().run_in_executor(self.executor, self.runner.free, unload_models, free_memory)

    def close(self) -> None:
        self.interrupt()
        self.executor.shutdown(wait=True, cancel_futures=True)


async def consume(events: AsyncIterator[Event], sink: MessageSink, job: Job) -> Outcome:
    """Hand a job's messages and previews to the front as they come; its outcome once the stream ends."""
    outcome = None
    async for kind, first, second in events:
        if kind == "outcome":
            outcome = first
        elif kind == "preview":
            sink.preview(job, first, second)
        else:
            sink.send(job, first, second)
    if outcome is None:
        raise RuntimeError("the worker's stream ended without an outcome")
    return outcome


class LocalPool(WorkerPool):
    """One worker thread in this process."""

    def __init__(self, runner: Runner):
        self.threads = JobThreads(runner)

    async def run(self, job: Job, sink: MessageSink) -> Outcome:
        return await consume(self.threads.events(job), sink, job)

    def interrupt(self, prompt_id: str | None = None) -> None:
        self.threads.interrupt(prompt_id)

    async def free(self, unload_models: bool, free_memory: bool) -> None:
        await self.threads.free(unload_models, free_memory)

    async def close(self) -> None:
        self.threads.close()
