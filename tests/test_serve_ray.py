"""``kiln serve --ray``: the same API with the jobs on Ray Serve replicas, on a local Ray cluster
the server starts (2 replicas of one CPU each, tiny fixtures). Run with ``--ray`` (CI does)."""
from __future__ import annotations

import io
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from kiln.compiler.pipeline import compile_workflow
from kiln.kernels.settings import Settings
from kiln.runtime.executor import run_plan
from kiln.runtime.plan import load_plan
from PIL import Image
from serve_client import Server, Socket
from workflows import txt2img, variant

from kiln.api import run_workflow

pytestmark = pytest.mark.ray
REPLICA_TITLE = re.compile(rb"ServeReplica:kiln-[^:]+:kiln-worker")


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def _slow(seed: int) -> dict:
    return variant(variant(txt2img(), "3", seed=seed, steps=40), "5", width=96, height=96)


@pytest.fixture(scope="module")
def plans(models_dir, tmp_path_factory, compiled_cache) -> Path:
    folder = tmp_path_factory.mktemp("ray-plans")
    compile_workflow(txt2img(), models=models_dir, backend="onnx", output=folder / "t2i.plan",
                     settings=Settings(cache_dir=compiled_cache))
    return folder


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-serve") / "output"


@pytest.fixture(scope="module")
def server(models_dir, input_dir, output_dir, plans, compiled_cache):
    running = Server(models_dir, input_dir, output_dir, "--ray", "--replicas", "2", "--plans", f"file://{plans}",
                     cache=compiled_cache, timeout=300)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(models_dir, input_dir, tmp_path_factory):
    """``kiln run``'s image, on one thread as each replica (--cpus-per-replica 1) runs: thread
    counts split float reductions differently."""
    folder = tmp_path_factory.mktemp("ray-reference")

    def run(name: str, workflow: dict) -> np.ndarray:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = run_workflow(workflow, models=models_dir, input_dir=input_dir, output_dir=folder / name)
        finally:
            torch.set_num_threads(threads)
        return _pixels(Path(result.saved[0]).read_bytes())
    return run


def _replicas() -> dict[int, int]:
    """pid -> CPU ticks used so far, of this machine's replica processes."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if REPLICA_TITLE.search(Path(f"/proc/{pid}/cmdline").read_bytes()):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                found[int(pid)] = int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return found


def test_two_clients_run_at_once_on_two_replicas_with_kiln_runs_images(server, reference):
    workflows = {"a": _slow(11), "b": _slow(12)}
    sockets = {name: Socket(server) for name in workflows}
    ids = {}
    try:
        submitters = [threading.Thread(target=lambda n=name: ids.__setitem__(
            n, server.queue_prompt(workflows[n], client_id=sockets[n].client_id)["prompt_id"])) for name in workflows]
        for thread in submitters:
            thread.start()
        for thread in submitters:
            thread.join()
        for name, ws in sockets.items():
            ws.until_done(ids[name])
    finally:
        for ws in sockets.values():
            ws.close()
    entries = {name: server.wait_for_history(ids[name]) for name in workflows}
    windows = {}
    for name, entry in entries.items():
        assert entry["status"]["status_str"] == "success", entry["status"]
        stamps = {m[0]: m[1]["timestamp"] for m in entry["status"]["messages"]}
        windows[name] = (stamps["execution_start"], stamps["execution_success"])
        kinds = [m["type"] for m in sockets[name].messages if m["data"].get("prompt_id") == ids[name]]
        assert kinds[0] == "execution_start" and kinds[-2:] == ["execution_success", "executing"]
        assert "progress" in kinds and "executed" in kinds
        assert np.array_equal(_pixels(server.first_image(entry)), reference(name, workflows[name]))
    assert windows["a"][0] < windows["b"][1] and windows["b"][0] < windows["a"][1], windows   # overlapped
    assert entries["a"]["kiln"]["worker"] != entries["b"]["kiln"]["worker"]


def test_a_plans_prompts_go_to_the_replica_that_holds_it(server, plans, compiled_cache, tmp_path):
    workers, images = [], []
    for seed in (21, 22, 23, 24):
        entry = server.wait_for_history(server.queue_prompt(variant(txt2img(), "3", seed=seed))["prompt_id"])
        assert entry["kiln"]["engine"] == "plan t2i"
        workers.append(entry["kiln"]["worker"])
        images.append(_pixels(server.first_image(entry)))
    assert len(set(workers)) == 1, workers
    assert [p["hits"] for p in requests.get(server.url + "/kiln/plans").json()] == [4]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the replica runs (onnxruntime sessions follow torch's count)
    try:
        plan = load_plan(plans / "t2i.plan", settings=Settings(cache_dir=compiled_cache))
        for seed, image in zip((21, 22, 23, 24), images):   # kiln run t2i.plan --seed N
            saved = run_plan(plan, {"3.seed": seed}, output_dir=tmp_path / str(seed)).saved[0]
            assert np.array_equal(image, _pixels(Path(saved).read_bytes()))
    finally:
        torch.set_num_threads(threads)


def test_interrupt_reaches_the_replica_running_the_prompt(server):
    ws = Socket(server)
    try:
        prompt_id = server.queue_prompt(variant(_slow(31), "3", steps=400), client_id=ws.client_id)["prompt_id"]
        ws.until(lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == prompt_id)
        assert requests.post(server.url + "/interrupt", json={"prompt_id": prompt_id}).status_code == 200
        interrupted = ws.until(lambda m: m["type"] == "execution_interrupted")
        ws.until_done(prompt_id)
    finally:
        ws.close()
    assert interrupted["data"]["prompt_id"] == prompt_id and interrupted["data"]["node_id"] == "3"
    assert server.wait_for_history(prompt_id)["status"]["status_str"] == "error"


def test_a_replica_killed_mid_job_is_retried_on_another(server, reference):
    workflow = variant(_slow(41), "3", steps=80)
    ws = Socket(server)
    try:
        prompt_id = server.queue_prompt(workflow, client_id=ws.client_id)["prompt_id"]
        ws.until(lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == prompt_id)
        before = _replicas()
        time.sleep(1.0)
        after = _replicas()
        busy = max(after, key=lambda pid: after[pid] - before.get(pid, 0))
        os.kill(busy, signal.SIGKILL)
        ws.until_done(prompt_id)
    finally:
        ws.close()
    entry = server.wait_for_history(prompt_id)
    assert entry["status"]["status_str"] == "success", entry["status"]
    starts = [m for m in ws.messages if m["type"] == "execution_start" and m["data"]["prompt_id"] == prompt_id]
    assert len(starts) == 2   # the second attempt's, on the other replica
    assert np.array_equal(_pixels(server.first_image(entry)), reference("killed", workflow))


def test_a_restarted_front_keeps_history(server, models_dir, input_dir, output_dir, plans, compiled_cache):
    history = requests.get(server.url + "/history").json()
    assert len(history) >= 8
    server.stop()
    again = Server(models_dir, input_dir, output_dir, "--ray", "--plans", str(plans), cache=compiled_cache,
                   timeout=300)
    try:
        assert requests.get(again.url + "/history").json() == history
        entry = again.wait_for_history(again.queue_prompt(variant(txt2img(), "3", seed=51))["prompt_id"])
        assert entry["kiln"]["engine"] == "plan t2i"
        assert len(requests.get(again.url + "/history").json()) == len(history) + 1
    finally:
        again.stop()
