"""``kiln serve`` against the clients people point at ComfyUI: a live server on 127.0.0.1 (a free
port, started and stopped by the tests), ``requests`` and ``websocket-client``."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import requests
from PIL import Image

from kiln.api import run_workflow
from kiln.compiler.pipeline import compile_workflow
from kiln.kernels.settings import Settings
from plan_parity import PARITY
from serve_client import Server, Socket
from workflows import hires_fix, txt2img, variant


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


@pytest.fixture(scope="module")
def server(models_dir, input_dir, tmp_path_factory):
    running = Server(models_dir, input_dir, tmp_path_factory.mktemp("serve") / "output",
                     "--preview-method", "latent2rgb")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(models_dir, input_dir, tmp_path_factory):
    """``kiln run``'s images (the interpreter), by a name for the workflow."""
    folder = tmp_path_factory.mktemp("reference")

    def run(name: str, workflow: dict) -> bytes:
        result = run_workflow(workflow, models=models_dir, input_dir=input_dir, output_dir=folder / name)
        return open(result.saved[0], "rb").read()
    return run


# --- the typical API client -------------------------------------------------------------------
def test_api_client_gets_the_hires_fix_image_kiln_run_makes(server, reference):
    ui_workflow = {"nodes": [{"id": 9, "type": "SaveImage"}], "links": []}   # what a front end sends along
    prompt_id = server.queue_prompt(hires_fix(), extra_data={"extra_pnginfo": {"workflow": ui_workflow}})["prompt_id"]
    entry = server.wait_for_history(prompt_id)
    assert entry["status"] == {"status_str": "success", "completed": True, "messages": entry["status"]["messages"]}
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                            "execution_success"]
    assert list(entry["outputs"]) == ["9"] and entry["prompt"][1] == prompt_id
    image = entry["outputs"]["9"]["images"][0]
    assert image["type"] == "output" and image["subfolder"] == "" and image["filename"].startswith("hires_")
    png = server.first_image(entry)
    assert np.array_equal(_pixels(png), _pixels(reference("hires", hires_fix())))
    with Image.open(io.BytesIO(png)) as decoded:
        assert json.loads(decoded.text["prompt"]) == hires_fix()
        assert json.loads(decoded.text["workflow"]) == ui_workflow


def test_websocket_sequence_for_two_samplers(server):
    ws = Socket(server)
    try:
        status = ws.until(lambda m: m["type"] == "status")
        assert status["data"]["sid"] == ws.client_id and "queue_remaining" in status["data"]["status"]["exec_info"]
        workflow = variant(hires_fix(), "3", seed=11)
        prompt_id = server.queue_prompt(workflow, client_id=ws.client_id)["prompt_id"]
        ws.until_done(prompt_id)
    finally:
        ws.close()
    mine = [m for m in ws.messages if m["type"] != "status" and m["data"].get("prompt_id") == prompt_id]
    kinds = [m["type"] for m in mine]
    assert kinds[0] == "execution_start" and kinds[1] == "execution_cached"
    assert kinds[-3:] == ["executed", "execution_success", "executing"] and mine[-1]["data"]["node"] is None
    # the loaders, prompts and upscaler are cached from the first test; both samplers run again
    cached = set(mine[1]["data"]["nodes"])
    assert {"4", "6", "7", "10"} <= cached and "3" not in cached
    executing = [m["data"]["node"] for m in mine if m["type"] == "executing" and m["data"]["node"] is not None]
    assert executing.index("3") < executing.index("14") < executing.index("9")
    for node, steps in (("3", 12), ("14", 8)):   # denoise 0.5 keeps its 8 steps (of a 16-step schedule)
        values = [m["data"]["value"] for m in mine if m["type"] == "progress" and m["data"]["node"] == node]
        assert values == list(range(1, steps + 1)) and all(
            m["data"]["max"] == steps for m in mine if m["type"] == "progress" and m["data"]["node"] == node)
    executed = [m for m in mine if m["type"] == "executed"]
    assert [m["data"]["node"] for m in executed] == ["9"]
    assert executed[0]["data"]["output"]["images"][0]["type"] == "output"
    # --preview-method latent2rgb: a JPEG preview frame (event 1, format 1) per sampler step
    assert len(ws.binary) == 12 + 8
    assert all(frame[:8] == struct.pack(">II", 1, 1) and frame[8:10] == b"\xff\xd8" for frame in ws.binary)
    assert Image.open(io.BytesIO(ws.binary[0][8:])).size == (16, 16)   # the 128 px image's 16 px latent


def test_free_forgets_the_cached_models(server):
    workflow = variant(txt2img(), "3", seed=55)
    server.wait_for_history(server.queue_prompt(workflow)["prompt_id"])
    assert requests.post(server.url + "/free", json={"unload_models": True}).status_code == 200
    again = server.wait_for_history(server.queue_prompt(variant(workflow, "3", seed=56))["prompt_id"])
    assert next(m[1]["nodes"] for m in again["status"]["messages"] if m[0] == "execution_cached") == []


def test_an_identical_prompt_returns_at_once_from_the_cache(server):
    workflow = variant(txt2img(), "3", seed=101)
    first = server.wait_for_history(server.queue_prompt(workflow)["prompt_id"])
    files = set(os.listdir(server.output_dir))
    started = time.monotonic()
    again = server.wait_for_history(server.queue_prompt(workflow)["prompt_id"])
    assert again["outputs"] == first["outputs"] and set(os.listdir(server.output_dir)) == files   # no new file
    cached = next(m[1]["nodes"] for m in again["status"]["messages"] if m[0] == "execution_cached")
    assert sorted(cached) == sorted(workflow) and time.monotonic() - started < 5


# --- refusals --------------------------------------------------------------------------------
def test_the_editors_format_is_run_as_its_api_form(server, reference):
    """A UI-format graph posted to /prompt (ComfyUI's own server refuses it): the API form runs,
    the history and the PNG's prompt chunk hold it, the PNG's workflow chunk the editor's graph."""
    from ui_files import UiWorkflow

    ui = UiWorkflow(txt2img(seed=31)).data()
    entry = server.wait_for_history(server.queue_prompt(ui)["prompt_id"])
    assert entry["status"]["status_str"] == "success"
    assert entry["prompt"][2]["3"]["inputs"]["seed"] == 31 and entry["prompt"][2]["3"]["class_type"] == "KSampler"
    png = server.first_image(entry)
    assert np.array_equal(_pixels(png), _pixels(reference("ui", txt2img(seed=31))))
    with Image.open(io.BytesIO(png)) as decoded:
        assert json.loads(decoded.text["workflow"]) == ui
        assert json.loads(decoded.text["prompt"])["3"]["inputs"]["seed"] == 31


def test_bad_prompts_are_refused_in_comfyuis_shape_and_nothing_is_queued(server):
    url = server.url + "/prompt"
    bad = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_prompt"
    assert requests.post(url, json={"client_id": "x"}).json()["error"]["type"] == "no_prompt"
    assert requests.post(url, json={"prompt": [1, 2]}).json()["error"]["type"] == "invalid_prompt"
    empty = requests.post(url, json={"prompt": {}}).json()["error"]
    assert (empty["type"], empty["message"]) == ("prompt_no_outputs", "Prompt has no outputs")
    unknown = txt2img()
    unknown["30"] = {"class_type": "FancyNode", "inputs": {}}
    body = requests.post(url, json={"prompt": unknown}).json()
    assert body["error"]["message"] == "Cannot execute because node FancyNode does not exist."
    assert body["error"]["details"] == "Node ID '#30'" and body["node_errors"] == {}
    missing = variant(txt2img(), "4", ckpt_name="nope.safetensors")
    response = requests.post(url, json={"prompt": missing})
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    error = body["node_errors"]["4"]
    assert error["class_type"] == "CheckpointLoaderSimple" and error["dependent_outputs"] == ["9"]
    assert error["errors"][0]["type"] == "value_not_in_list"
    assert error["errors"][0]["extra_info"]["input_name"] == "ckpt_name"
    assert requests.get(server.url + "/queue").json() == {"queue_running": [], "queue_pending": []}


def test_a_failing_output_leaves_the_others_running(server):
    workflow = txt2img()
    workflow["20"] = {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "bad"}}
    workflow["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0]}}   # no vae
    answer = server.queue_prompt(workflow)
    assert list(answer["node_errors"]) == ["21"] and answer["node_errors"]["21"]["dependent_outputs"] == ["20"]
    entry = server.wait_for_history(answer["prompt_id"])
    assert list(entry["outputs"]) == ["9"]


def test_a_failing_job_reports_execution_error_and_the_server_keeps_serving(server, input_dir):
    broken = input_dir / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    try:
        workflow = txt2img()
        workflow["10"] = {"class_type": "LoadImage", "inputs": {"image": "broken.png"}}
        workflow["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
        workflow["3"]["inputs"]["latent_image"] = ["11", 0]
        entry = server.wait_for_history(server.queue_prompt(workflow)["prompt_id"])
    finally:
        broken.unlink()
    assert entry["status"]["status_str"] == "error" and not entry["status"]["completed"]
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_id"] == "10" and error["node_type"] == "LoadImage" and error["traceback"] == []
    assert "exception_during_execution" in error["exception_message"]
    ok = server.wait_for_history(server.queue_prompt(variant(txt2img(), "3", seed=77))["prompt_id"])
    assert ok["status"]["status_str"] == "success"


# --- queue and interrupt ----------------------------------------------------------------------
def _slow(seed: int) -> dict:
    return variant(variant(txt2img(), "3", seed=seed, steps=60), "5", width=128, height=128)


def test_queue_order_with_three_clients_and_front(server):
    ws = Socket(server)
    try:
        blocker = server.queue_prompt(_slow(1), client_id=ws.client_id)["prompt_id"]
        ws.until(lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == blocker)
        answers: dict[str, str] = {}

        def submit(name: str, **extra) -> None:
            answers[name] = server.queue_prompt(variant(txt2img(), "3", seed=hash(name) % 1000), **extra)["prompt_id"]

        threads = [threading.Thread(target=submit, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
            thread.join()
        submit("c", front=True)
        pending = requests.get(server.url + "/queue").json()
        assert [item[1] for item in pending["queue_running"]] == [blocker]
        assert {item[1] for item in pending["queue_pending"]} == set(answers.values())
        entries = {name: server.wait_for_history(pid) for name, pid in answers.items()}
    finally:
        ws.close()
    started = {name: next(m[1]["timestamp"] for m in e["status"]["messages"] if m[0] == "execution_start")
               for name, e in entries.items()}
    assert sorted(started, key=started.get) == ["c", "a", "b"]
    numbers = {name: e["prompt"][0] for name, e in entries.items()}
    assert numbers["c"] < 0 < numbers["a"] < numbers["b"]


def test_interrupt_stops_the_running_prompt(server):
    ws = Socket(server)
    try:
        prompt_id = server.queue_prompt(_slow(2), client_id=ws.client_id)["prompt_id"]
        ws.until(lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == prompt_id)
        assert requests.post(server.url + "/interrupt", json={"prompt_id": "not-running"}).status_code == 200
        assert requests.post(server.url + "/interrupt").status_code == 200
        interrupted = ws.until(lambda m: m["type"] == "execution_interrupted")
        ws.until_done(prompt_id)
    finally:
        ws.close()
    assert interrupted["data"]["prompt_id"] == prompt_id and interrupted["data"]["node_id"] == "3"
    entry = server.wait_for_history(prompt_id)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    steps = [m["data"]["value"] for m in ws.messages if m["type"] == "progress" and m["data"]["prompt_id"] == prompt_id]
    assert steps and max(steps) < 60


# --- files -----------------------------------------------------------------------------------
def test_view_and_upload_never_leave_their_folders(server, tmp_path):
    view = server.url + "/view"
    assert requests.get(view, params={"filename": "../serve.log"}).status_code == 400
    assert requests.get(view, params={"filename": "/etc/passwd"}).status_code == 400
    assert requests.get(view, params={"filename": "x.png\0.txt"}).status_code == 400
    assert requests.get(view, params={"filename": "passwd", "subfolder": "../../../../etc"}).status_code == 403
    assert requests.get(view, params={"filename": "x.png", "type": "nowhere"}).status_code == 400
    assert requests.get(view, params={"filename": "absent.png"}).status_code == 404
    assert requests.get(view).status_code == 404
    secret = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(secret)
    os.symlink(secret, server.output_dir / "link.png")
    assert requests.get(view, params={"filename": "link.png"}).status_code == 403
    assert (server.output_dir / ".kiln-history.sqlite").is_file()
    assert requests.get(view, params={"filename": ".kiln-history.sqlite"}).status_code == 404   # the server's own
    upload = server.url + "/upload/image"
    png = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(png, format="PNG")
    refused = requests.post(upload, files={"image": ("../evil.png", png.getvalue())})
    assert refused.status_code == 400
    refused = requests.post(upload, files={"image": ("ok.png", png.getvalue())}, data={"subfolder": "../.."})
    assert refused.status_code == 400
    refused = requests.post(upload, files={"image": (".kiln-history.sqlite", png.getvalue())}, data={"type": "output"})
    assert refused.status_code == 400
    first = requests.post(upload, files={"image": ("up.png", png.getvalue())}).json()
    assert first == {"name": "up.png", "subfolder": "", "type": "input"}
    assert requests.post(upload, files={"image": ("up.png", png.getvalue())}).json()["name"] == "up.png"   # same bytes
    other = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(other, format="PNG")
    assert requests.post(upload, files={"image": ("up.png", other.getvalue())}).json()["name"] == "up (1).png"
    got = requests.get(view, params={"filename": "up.png", "type": "input"})
    assert got.status_code == 200 and got.content == png.getvalue()


def test_uploads_over_the_limit_are_refused(models_dir, input_dir, tmp_path):
    small = Server(models_dir, input_dir, tmp_path / "output", "--max-upload-mb", "0.01")
    try:
        response = requests.post(small.url + "/upload/image", files={"image": ("big.png", b"\0" * 20000)})
        assert response.status_code == 413
        assert not (input_dir / "big.png").exists()
    finally:
        small.stop()


def test_mask_upload_puts_the_alpha_on_the_original(server, input_dir):
    original = input_dir / "masked-original.png"
    Image.new("RGB", (4, 4), (200, 100, 50)).save(original)
    mask = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    mask.putpixel((1, 1), (0, 0, 0, 255))
    data = io.BytesIO()
    mask.save(data, format="PNG")
    answer = requests.post(server.url + "/upload/mask", files={"image": ("masked.png", data.getvalue())},
                           data={"original_ref": json.dumps({"filename": "masked-original.png", "type": "input"})})
    assert answer.status_code == 200 and answer.json()["name"] == "masked.png"
    with Image.open(input_dir / "masked.png") as result:
        assert result.mode == "RGBA" and result.getpixel((1, 1)) == (200, 100, 50, 255)
        assert result.getpixel((0, 0)) == (200, 100, 50, 0)


# --- discovery -----------------------------------------------------------------------------------
def test_object_info_models_and_stats(server):
    info = requests.get(server.url + "/object_info").json()
    ks = info["KSampler"]
    assert ks["input"]["required"]["seed"] == ["INT", {"default": 0, "min": 0, "max": 2 ** 64 - 1, "step": 1,
                                                       "control_after_generate": True}]
    assert ks["input"]["required"]["model"] == ["MODEL"] and ks["output"] == ["LATENT"]
    assert "euler" in ks["input"]["required"]["sampler_name"][0] and ks["category"] == "sampling"
    assert ks["input_order"]["required"][:3] == ["model", "seed", "steps"]
    ckpt = info["CheckpointLoaderSimple"]
    assert "tiny-sd15.safetensors" in ckpt["input"]["required"]["ckpt_name"][0]
    assert ckpt["display_name"] == "Load Checkpoint" and ckpt["output"] == ["MODEL", "CLIP", "VAE"]
    assert info["LoadImage"]["input"]["required"]["image"][1]["image_upload"] is True
    assert info["SaveImage"]["output_node"] is True
    assert requests.get(server.url + "/api/object_info/KSampler").json() == {"KSampler": ks}
    assert requests.get(server.url + "/object_info/Nope").json() == {}
    assert "tiny-sd15.safetensors" in requests.get(server.url + "/models/checkpoints").json()
    assert requests.get(server.url + "/models/nope").status_code == 404
    assert isinstance(requests.get(server.url + "/embeddings").json(), list)
    stats = requests.get(server.url + "/system_stats").json()
    assert stats["system"]["ram_total"] > 0 and stats["devices"][0]["type"] == "cpu"
    assert requests.get(server.url + "/prompt").json() == {"exec_info": {"queue_remaining": 0}}


def test_an_api_key_guards_every_route(models_dir, input_dir, tmp_path):
    guarded = Server(models_dir, input_dir, tmp_path / "output", "--api-key", "s3cret")
    try:
        assert requests.get(guarded.url + "/prompt").status_code == 401
        assert requests.get(guarded.url + "/object_info/KSampler").status_code == 401
        assert requests.get(guarded.url + "/prompt", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        guarded.stop()


# --- history across restarts -----------------------------------------------------------------------
def test_a_restart_keeps_history_and_images(models_dir, input_dir, tmp_path):
    first = Server(models_dir, input_dir, tmp_path / "output")
    try:
        prompt_id = first.queue_prompt(variant(txt2img(), "3", seed=5))["prompt_id"]
        entry = first.wait_for_history(prompt_id)
    finally:
        first.stop()
    second = Server(models_dir, input_dir, tmp_path / "output")
    try:
        assert requests.get(f"{second.url}/history/{prompt_id}").json() == {prompt_id: entry}
        assert second.first_image(entry)
        assert list(requests.get(second.url + "/history", params={"max_items": 1}).json()) == [prompt_id]
    finally:
        second.stop()


# --- answering from plans ------------------------------------------------------------------------
def test_a_plan_serves_matching_prompts_with_the_interpreters_image(models_dir, input_dir, tmp_path, reference,
                                                                   compiled_cache):
    plans = tmp_path / "plans"
    compile_workflow(txt2img(), models=models_dir, backend="onnx", output=plans / "t2i.plan",
                     settings=Settings(cache_dir=compiled_cache))
    served = Server(models_dir, input_dir, tmp_path / "output", "--plans", str(plans), cache=compiled_cache)
    try:
        assert [p["name"] for p in requests.get(served.url + "/kiln/plans").json()] == ["t2i"]
        workflow = variant(txt2img(), "3", seed=1234)
        entry = served.wait_for_history(served.queue_prompt(workflow)["prompt_id"])
        assert entry["kiln"]["engine"] == "plan t2i"
        other = served.wait_for_history(served.queue_prompt(variant(workflow, "3", steps=5))["prompt_id"])
        assert other["kiln"]["engine"] == "interpreter"   # steps are not a runtime input of this plan
        assert [p["hits"] for p in requests.get(served.url + "/kiln/plans").json()] == [1]
        got = _pixels(served.first_image(entry))
    finally:
        served.stop()
    want = _pixels(reference("plan-t2i", workflow))
    assert np.abs(got - want).max() <= PARITY["fp32"][1]


def test_compile_auto_compiles_a_repeated_workflow_and_serves_it(models_dir, input_dir, tmp_path, compiled_cache):
    served = Server(models_dir, input_dir, tmp_path / "output", "--compile", "auto", "--compile-after", "2",
                    cache=compiled_cache)
    try:
        for seed in (1, 2):
            entry = served.wait_for_history(served.queue_prompt(variant(txt2img(), "3", seed=seed))["prompt_id"])
            assert entry["kiln"]["engine"] == "interpreter"
        deadline = time.monotonic() + 600
        while not [p for p in requests.get(served.url + "/kiln/plans").json() if "name" in p]:
            assert time.monotonic() < deadline, served.read_log()
            time.sleep(1)
        entry = served.wait_for_history(served.queue_prompt(variant(txt2img(), "3", seed=3))["prompt_id"])
        assert entry["kiln"]["engine"].startswith("plan auto-")
    finally:
        served.stop()


def test_the_server_answers_soon_after_start(server):
    assert server.ready_after < 30   # the benchmark measures it; this only catches a hang
    assert uuid.UUID(server.queue_prompt(variant(txt2img(), "3", seed=9))["prompt_id"])


# --- kiln serve --ray without a cluster (tests/test_serve_ray.py runs one) -----------------------
def _serve_refusal(models_dir, input_dir, tmp_path, *args, env=None) -> str:
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "serve", "--models", str(models_dir), "--input-dir",
                             str(input_dir), "--output-dir", str(tmp_path / "output"), "--port", "0", *args],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_ray_without_ray_installed_says_how_to_install_it(models_dir, input_dir, tmp_path):
    missing = tmp_path / "no-ray" / "ray"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    stderr = _serve_refusal(models_dir, input_dir, tmp_path, "--ray", env={"PYTHONPATH": str(missing.parent)})
    assert "needs Ray Serve" in stderr and "pip install 'kiln[ray]'" in stderr


@pytest.mark.parametrize(("args", "says"), [
    (("--ray", "--compile", "auto"), "--compile auto is not available with --ray"),
    (("--replicas", "2"), "need --ray"),
    (("--ray", "--replicas", "2", "--max-replicas", "1"), "--max-replicas at least --replicas"),
    (("--plans", "nosuchstore://bucket/plans"), "cannot list the plans"),
])
def test_ray_and_plan_storage_options_are_checked_before_serving(models_dir, input_dir, tmp_path, args, says):
    assert says in _serve_refusal(models_dir, input_dir, tmp_path, *args)
