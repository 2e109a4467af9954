"""One Ray Serve replica of ``kiln serve --ray``: a worker as ``kiln serve`` has in-process (a
Runner with its node cache and warm plans), reached through a deployment handle. A job's
messages stream back as it runs (a generator method; cancelling the request interrupts the job);
``free`` reaches every replica (a broadcast). Plans are Serve's multiplexed models, so the router sends a plan's
prompts to a replica that has it loaded."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray import serve

from kiln.server.pool import Event, JobThreads
from kiln.server.queue import Job
from kiln.server.serve import ServeOptions, build_catalog, build_runner, model_folders, plans_folder

WARM_PLANS = 4   # plans each replica keeps loaded, least recently used dropped first


class WarmPlan:
    """A plan loaded in this replica; Serve drops it (``__del__``) when more than WARM_PLANS are."""

    def __init__(self, catalog, name: str):
        self.catalog, self.name, self.dropped = catalog, name, False

    def __del__(self):
        if not self.dropped:   # once: Serve calls it on eviction, Python again when collected
            self.dropped = True
            self.catalog.unload(self.name)


class KilnReplica:
    def __init__(self, options: ServeOptions):
        catalog = build_catalog(options, plans_folder(options))
        self.threads = JobThreads(build_runner(options, catalog, model_folders(options)))
        self.name = serve.get_replica_context().replica_id.unique_id

    @serve.multiplexed(max_num_models_per_replica=WARM_PLANS)
    async def warm_plan(self, name: str) -> WarmPlan:
        catalog = self.threads.runner.plans
        await asyncio.get_running_loop().run_in_executor(self.threads.executor, catalog.load, name)
        return WarmPlan(catalog, name)

    async def run(self, job: Job) -> AsyncIterator[Event]:
        plan = serve.get_multiplexed_model_id()
        if plan:
            await self.warm_plan(plan)
        async for event in self.threads.events(job):
            if event[0] == "outcome":
                event[1].worker = self.name
            yield event

    async def free(self, unload_models: bool, free_memory: bool) -> None:
        await self.threads.free(unload_models, free_memory)
