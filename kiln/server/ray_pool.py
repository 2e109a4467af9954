"""``kiln serve --ray``: the front (queue, history, WebSocket) stays in this process; the jobs run
on a Ray Serve deployment of ``KilnReplica`` workers, one job per replica at a time, their
messages streamed back to the front as they run.

A prompt that matches a plan names it as the request's multiplexed model, so Serve's router
prefers a free replica that already holds it. A replica that dies mid-job (its process killed,
its node lost) fails the request with a Ray actor error: the job runs once more on another
replica, and fails with ``execution_error`` naming the reason if that one dies too."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from pathlib import Path

from kiln.kernels.errors import KilnError, Problem
from kiln.server.plan_storage import is_uri
from kiln.server.plans import PlanCatalog
from kiln.server.pool import MessageSink, WorkerPool, consume
from kiln.server.protocol import timestamp
from kiln.server.queue import Job
from kiln.server.runner import Outcome, interrupted
from kiln.server.serve import RayOptions, ServeOptions

log = logging.getLogger("kiln.serve")
ATTEMPTS = 2   # a job whose replica dies runs once more


class ReplicaLost(RuntimeError):
    """The replicas running a job died ``ATTEMPTS`` times."""


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise KilnError([Problem("ray_missing", "kiln serve --ray needs Ray Serve, which is not installed",
                                 input_name="--ray", hint="install it with: pip install 'kiln[ray]'")]) from None
    return ray, serve


def refusals(options: ServeOptions) -> list[Problem]:
    """What ``--ray`` cannot do with these options."""
    if options.compile == "auto":
        return [Problem("ray_compile_auto", "--compile auto is not available with --ray: each replica would "
                        "compile on its own", input_name="--compile", found="auto",
                        hint="compile with 'kiln compile' and serve the folder or URI with --plans")]
    return []


class _Transcript:
    """A sink that passes a job's messages on and remembers what history keeps of them, so that a
    job whose stream was cancelled (interrupted) is recorded as the runner would have."""

    def __init__(self, sink: MessageSink):
        self.sink = sink
        self.outcome = Outcome("interrupted")
        self.nodes: list[str] = []

    def send(self, job: Job, event: str, data: dict) -> None:
        if event == "executing" and data.get("node") is not None:
            self.nodes.append(data["node"])
        elif event == "executed":
            self.outcome.outputs[data["node"]] = data["output"]
        if "timestamp" in data:   # the runner stamps the messages history keeps
            self.outcome.messages.append([event, data])
        self.sink.send(job, event, data)

    def preview(self, job: Job, image, node_id: str) -> None:
        self.sink.preview(job, image, node_id)

    def interrupted(self, job: Job) -> Outcome:
        data = {"prompt_id": job.prompt_id, "timestamp": timestamp(),
                **interrupted(job, self.nodes[-1] if self.nodes else None, self.nodes[:-1])}
        self.send(job, "execution_interrupted", data)
        return self.outcome


def _absolute(options: ServeOptions) -> ServeOptions:
    resolve = lambda path: None if path is None else Path(path).resolve()
    plans = options.plans if options.plans is None or is_uri(options.plans) else str(resolve(options.plans))
    return dataclasses.replace(options, models=resolve(options.models), input_dir=resolve(options.input_dir),
                               output_dir=resolve(options.output_dir),
                               extra_model_paths=resolve(options.extra_model_paths), plans=plans)


class RayPool(WorkerPool):
    def __init__(self, handle, app: str, catalog: PlanCatalog, capacity: int, started_cluster: bool):
        self.handle = handle.options(stream=True)
        self.control = handle
        self.app = app
        self.catalog = catalog
        self.capacity = capacity
        self.started_cluster = started_cluster
        self._streams: dict = {}   # prompt id -> the running request's stream

    @classmethod
    def start(cls, options: ServeOptions, ray_options: RayOptions, catalog: PlanCatalog) -> RayPool:
        """Join (or start) the cluster and deploy the replicas; returns once they are up."""
        problems = refusals(options)
        if problems:
            raise KilnError(problems)
        ray, serve = _import_ray()
        from kiln.server.ray_replica import KilnReplica

        started = ray_options.address == "local"
        # Ray puts the driver's working directory on its workers' sys.path (and starts them there),
        # where a folder such as a kiln checkout's kernels/ would shadow an installed package:
        # start it from an empty folder of kiln's own
        empty = options.settings.artifact_cache / "ray-workdir"
        empty.mkdir(parents=True, exist_ok=True)
        with contextlib.chdir(empty):
            ray.init(address=ray_options.address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=True)
        options = _absolute(options)   # replicas run elsewhere: no path relative to this process
        serve.start(proxy_location="Disabled")
        scaling = ({"num_replicas": ray_options.replicas} if ray_options.max_replicas is None else
                   {"autoscaling_config": {"min_replicas": ray_options.replicas,
                                           "max_replicas": ray_options.max_replicas,
                                           "target_ongoing_requests": 1}})
        deployment = serve.deployment(KilnReplica, name="kiln-worker").options(
            max_ongoing_requests=1, ray_actor_options={"num_cpus": ray_options.cpus_per_replica,
                                                       "num_gpus": ray_options.gpus_per_replica},
            **scaling)
        app = f"kiln-{socket.gethostname()}-{options.port}"   # each front its own replicas
        handle = serve.run(deployment.bind(options), name=app, route_prefix=None)
        capacity = ray_options.max_replicas or ray_options.replicas
        log.info("kiln serve: %d Ray Serve replica%s (%s)", capacity, "" if capacity == 1 else "s",
                 ray_options.address)
        return cls(handle, app, catalog, capacity, started)

    async def run(self, job: Job, sink: MessageSink) -> Outcome:
        import ray.exceptions

        match = self.catalog.match(job.prompt, job.graph)
        if match is not None:
            self.catalog.count_hit(match[0])
        handle = self.handle.options(multiplexed_model_id=match[0].name if match else "")
        failure: Exception | None = None
        for attempt in range(1, ATTEMPTS + 1):
            transcript = _Transcript(sink)
            self._streams[job.prompt_id] = stream = handle.run.remote(job)
            try:
                return await consume(stream, transcript, job)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as lost:
                failure = lost
                log.warning("kiln serve: the replica running prompt %s stopped (attempt %d of %d): %s",
                            job.prompt_id, attempt, ATTEMPTS, lost)
            except (ray.exceptions.TaskCancelledError, asyncio.CancelledError):
                if not stream.cancelled():
                    raise
                return transcript.interrupted(job)
            finally:
                del self._streams[job.prompt_id]
        raise ReplicaLost(f"the Ray replica running it stopped {ATTEMPTS} times; last: "
                          f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}")

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Cancel the request: the replica's stream ends and its job stops at its next step (a
        control call would wait behind the job, each replica taking one request at a time)."""
        for running, stream in list(self._streams.items()):
            if prompt_id is None or running == prompt_id:
                stream.cancel()

    async def free(self, unload_models: bool, free_memory: bool) -> None:
        await self.control.broadcast("free", unload_models, free_memory).results_async(return_exceptions=True)

    async def close(self) -> None:
        from ray import serve

        await asyncio.get_running_loop().run_in_executor(None, self._shutdown, serve)

    def _shutdown(self, serve) -> None:
        import ray

        serve.delete(self.app)
        if self.started_cluster:
            serve.shutdown()
            ray.shutdown()
