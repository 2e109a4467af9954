"""A ``kiln serve`` process for the tests (127.0.0.1, a free port, started and stopped by them)
and the API client code ComfyUI users write against it."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests
import websocket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``kiln serve`` in a child process; ``url`` answers once it is up."""

    def __init__(self, models: Path, input_dir: Path, output_dir: Path, *args: str, cache: Path | None = None,
                 timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = output_dir
        self.argv = [sys.executable, "-m", "kiln.cli", "serve", "--models", str(models), "--input-dir",
                     str(input_dir), "--output-dir", str(output_dir), "--port", str(self.port), *args]
        env = dict(os.environ)
        if cache is not None:
            env["KILN_CACHE_DIR"] = str(cache)
        self.log = open(output_dir.parent / f"serve-{self.port}.log", "wb")
        self.process = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.started = time.monotonic()
        try:
            self.ready_after = self._wait_until_up(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self, timeout: float = 120.0) -> float:
        while time.monotonic() - self.started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {self.process.returncode}: {self.read_log()}")
            try:
                requests.get(self.url + "/prompt", timeout=1)
                return time.monotonic() - self.started
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"kiln serve did not answer within {timeout} s: {self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return (self.output_dir.parent / f"serve-{self.port}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    # --- the client a ComfyUI API user writes ---------------------------------------------------
    def queue_prompt(self, workflow: dict, client_id: str | None = None, **extra) -> dict:
        body = {"prompt": workflow, "client_id": client_id or str(uuid.uuid4()), **extra}
        response = requests.post(self.url + "/prompt", json=body, timeout=60)
        response.raise_for_status()
        return response.json()

    def wait_for_history(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll ``/history/{id}`` every 0.5 s until the prompt is there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = requests.get(f"{self.url}/history/{prompt_id}", timeout=10).json()
            if prompt_id in history:
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish: {self.read_log()}")

    def first_image(self, entry: dict) -> bytes:
        """``outputs[first node id]["images"][0]`` through ``/view`` with filename and type only."""
        first = next(iter(entry["outputs"].values()))["images"][0]
        response = requests.get(self.url + "/view", params={"filename": first["filename"], "type": first["type"]},
                                timeout=30)
        response.raise_for_status()
        return response.content


class Socket:
    """A ``websocket-client`` connection collecting the JSON messages."""

    def __init__(self, server: Server, client_id: str | None = None):
        self.client_id = client_id or uuid.uuid4().hex
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}",
                                              timeout=300)
        self.messages: list[dict] = []
        self.binary: list[bytes] = []

    def until(self, predicate, timeout: float = 300.0) -> dict:
        """Read messages until one satisfies ``predicate``; returns it (all kept in ``messages``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = self.ws.recv()
            if isinstance(frame, bytes):
                self.binary.append(frame)
                continue
            message = json.loads(frame)
            self.messages.append(message)
            if predicate(message):
                return message
        raise TimeoutError("no such message")

    def until_done(self, prompt_id: str) -> dict:
        """ComfyUI's "done" signal API clients wait for: ``executing`` with ``node: null``."""
        return self.until(lambda m: m["type"] == "executing" and m["data"]["node"] is None
                          and m["data"].get("prompt_id") == prompt_id)

    def close(self) -> None:
        self.ws.close()
