"""The HTTP/WebSocket front: ComfyUI's routes, shapes and status codes (``server.py``), the
queue, the history, the messages; the jobs themselves go to a ``WorkerPool``.

Every route is mounted at ``/`` and under ``/api``, as ComfyUI mounts them.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import mimetypes
import os
import platform
import sys
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from aiohttp import web
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from kiln.nodes.registry import RunContext
from kiln.runtime.files import atomic_file
from kiln.server.catalogue import node_info, object_info
from kiln.server.files import Folders, Refused, free_name
from kiln.server.history import History
from kiln.server.plans import PlanCatalog
from kiln.server.pool import WorkerPool
from kiln.server.protocol import preview_frame, text_frame, timestamp
from kiln.server.queue import Job, PromptQueue
from kiln.server.runner import Outcome, execution_error
from kiln.compiler.ui_workflow import is_ui_workflow
from kiln.server.validation import Refusal, check_prompt, error

log = logging.getLogger("kiln.serve")

# Without a client_id these still go to every socket (ComfyUI's broadcast messages); the rest not at all.
_BROADCAST_WITHOUT_CLIENT = frozenset({"progress", "execution_interrupted"})
_FORCED_DOWNLOAD = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}


@dataclass(frozen=True)
class FrontConfig:
    output_dir: Path
    input_dir: Path
    max_upload_mb: float = 100.0
    api_key: str | None = None


class _Client:
    """One WebSocket, its messages sent in order by one task."""

    def __init__(self, ws: web.WebSocketResponse):
        self.ws = ws
        self.flags: dict = {}
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump())

    def send(self, frame: str | bytes) -> None:
        self._outbox.put_nowait(frame)

    async def _pump(self) -> None:
        while True:
            frame = await self._outbox.get()
            try:
                if isinstance(frame, bytes):
                    await self.ws.send_bytes(frame)
                else:
                    await self.ws.send_str(frame)
            except (ConnectionError, RuntimeError):   # the client went away; the server keeps serving
                return

    def close(self) -> None:
        self._task.cancel()


class Front:
    """The server's state and routes: ``app()`` builds the aiohttp application."""

    def __init__(self, config: FrontConfig, context: RunContext, pool: WorkerPool, plans: PlanCatalog):
        self.config = config
        self.context = context          # the models and input folder, for validation and object_info
        self.pool = pool
        self.plans = plans
        self.folders = Folders(Path(os.path.realpath(config.output_dir)), Path(os.path.realpath(config.input_dir)))
        self.folders.output.mkdir(parents=True, exist_ok=True)
        self.folders.input.mkdir(parents=True, exist_ok=True)
        self.history = History(self.folders.output)
        self.queue = PromptQueue(self._status_changed)
        self.clients: dict[str, _Client] = {}
        self.current: dict[str, str] = {}     # running prompt id -> node running
        self._schedulers: list[asyncio.Task] = []

    # --- the app ------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=int(
            self.config.max_upload_mb * 1024 * 1024))
        routes = [
            web.get("/ws", self.websocket), web.get("/prompt", self.get_prompt), web.post("/prompt", self.post_prompt),
            web.get("/queue", self.get_queue), web.post("/queue", self.post_queue),
            web.post("/interrupt", self.interrupt), web.post("/free", self.free),
            web.get("/history", self.get_history), web.get("/history/{prompt_id}", self.get_history_item),
            web.post("/history", self.post_history), web.get("/view", self.view),
            web.post("/upload/image", self.upload_image), web.post("/upload/mask", self.upload_mask),
            web.get("/object_info", self.get_object_info), web.get("/object_info/{node_class}", self.get_node_info),
            web.get("/system_stats", self.system_stats), web.get("/embeddings", self.embeddings),
            web.get("/models", self.model_folders), web.get("/models/{folder}", self.models),
            web.get("/features", self.features), web.get("/kiln/plans", self.kiln_plans),
        ]
        api = web.Application()
        api.add_routes(routes)
        app.add_routes([web.get("/", self.index), *routes])
        app.add_subapp("/api", api)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self._schedulers = [asyncio.ensure_future(self._schedule()) for _ in range(self.pool.capacity)]

    async def _stop(self, app: web.Application) -> None:
        for task in self._schedulers:
            task.cancel()
        for client in self.clients.values():
            client.close()
            await client.ws.close()
        await self.pool.close()
        self.history.close()

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """No traceback ever reaches a client: anything unexpected is logged and answered 500."""
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:   # noqa: BLE001
            log.exception("kiln serve: %s %s failed", request.method, request.path)
            return web.json_response({"error": error("server_error", "the server failed to answer this request")},
                                     status=500)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        """``--api-key``: every route wants ``Authorization: Bearer <key>`` (or ``?token=`` for the
        WebSocket, which browsers cannot give headers); a loopback server refuses cross-origin
        requests from browsers, as ComfyUI does."""
        key = self.config.api_key
        if key is not None:
            header = request.headers.get("Authorization", "")
            if header != f"Bearer {key}" and request.query.get("token") != key:
                return web.json_response({"error": error("unauthorized", "a valid API key is required")}, status=401)
        origin = request.headers.get("Origin")
        host = request.headers.get("Host", "").split(":")[0]
        if origin and host in ("127.0.0.1", "localhost", "::1"):
            origin_host = origin.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
            if origin_host != host:
                return web.Response(status=403)
        return await handler(request)

    # --- queue and messages ---------------------------------------------------------------------
    def _status(self) -> dict:
        return {"status": {"exec_info": {"queue_remaining": self.queue.remaining}}}

    def _status_changed(self) -> None:
        self._broadcast(text_frame("status", self._status()))

    def _broadcast(self, frame: str | bytes) -> None:
        for client in self.clients.values():
            client.send(frame)

    def send(self, job: Job, event: str, data: dict) -> None:
        """A job's message, to its client; without one only the broadcast kinds go (to everyone)."""
        if event == "executing":
            self.current[job.prompt_id] = data.get("node")
        sid = job.client_id
        if sid is None:
            if event in _BROADCAST_WITHOUT_CLIENT:
                self._broadcast(text_frame(event, data))
            return
        client = self.clients.get(sid)
        if client is not None:
            client.send(text_frame(event, data))

    def preview(self, job: Job, image, node_id: str) -> None:
        targets = [self.clients[job.client_id]] if job.client_id in self.clients else (
            list(self.clients.values()) if job.client_id is None else [])
        for client in targets:
            metadata = None
            if client.flags.get("supports_preview_metadata"):
                metadata = {"node_id": node_id, "prompt_id": job.prompt_id, "display_node_id": node_id,
                            "parent_node_id": node_id, "real_node_id": node_id}
            client.send(preview_frame(image, metadata))

    async def _schedule(self) -> None:
        while True:
            job = await self.queue.get()
            try:
                outcome = await self.pool.run(job, self)
            except Exception as failure:   # noqa: BLE001 - a broken worker fails the job, not the server
                log.exception("kiln serve: worker failed on prompt %s", job.prompt_id)
                outcome = Outcome("error", messages=[["execution_error", {
                    "prompt_id": job.prompt_id, "timestamp": timestamp(),
                    **execution_error(job, self.current.get(job.prompt_id), [], f"{type(failure).__name__}: {failure}",
                                      type(failure).__name__)}]])
                self.send(job, "execution_error", outcome.messages[0][1])
            self._record(job, outcome)
            self.current.pop(job.prompt_id, None)
            self.queue.done(job)
            if job.client_id is not None:
                self.send(job, "executing", {"node": None, "prompt_id": job.prompt_id})

    def _record(self, job: Job, outcome: Outcome) -> None:
        meta = {node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
                for node in outcome.outputs}
        self.history.add(job.prompt_id, {
            "prompt": job.wire(), "outputs": outcome.outputs,
            "status": {"status_str": "success" if outcome.status == "success" else "error",
                       "completed": outcome.status == "success", "messages": outcome.messages},
            "meta": meta, "kiln": {"engine": outcome.engine,
                                   **({"worker": outcome.worker} if outcome.worker else {})}})

    # --- routes: prompts ------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text="kiln serve: ComfyUI's API (POST /prompt, GET /history, /view, /ws ...)\n")

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self.queue.remaining}})

    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as failure:
            return _refused(Refusal(error("invalid_prompt", "the request body is not valid JSON", str(failure)), {}))
        if not isinstance(body, dict) or "prompt" not in body:
            return _refused(Refusal(error("no_prompt", "No prompt provided", "No prompt provided"), {}))
        extra_data = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
        if "client_id" in body:
            extra_data = {**extra_data, "client_id": body["client_id"]}
        try:
            number = self.queue.number(body.get("number"), bool(body.get("front")))
        except (TypeError, ValueError):
            return _refused(Refusal(error("invalid_prompt", "number must be a number", repr(body.get("number"))), {}))
        loop = asyncio.get_running_loop()
        try:
            graph, outputs, node_errors = await loop.run_in_executor(
                None, check_prompt, body["prompt"], self.context.models, self.context.input_dir)
        except Refusal as refusal:
            return _refused(refusal)
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        if is_ui_workflow(body["prompt"]):   # the editor's graph: run its API form, keep it for the PNGs
            pnginfo = {"workflow": body["prompt"], **(extra_data.get("extra_pnginfo") or {})}
            extra_data = {**extra_data, "extra_pnginfo": pnginfo}
        await self.queue.put(Job(number, prompt_id, graph.source, extra_data, outputs, graph))
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def get_queue(self, request: web.Request) -> web.Response:
        return web.json_response({"queue_running": [job.wire() for job in self.queue.running()],
                                  "queue_pending": [job.wire() for job in self.queue.pending()]})

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        if body.get("clear"):
            self.queue.clear()
        if isinstance(body.get("delete"), list):
            self.queue.delete(str(i) for i in body["delete"])
        return web.Response(status=200)

    async def interrupt(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        prompt_id = body.get("prompt_id")
        if prompt_id is None:
            self.pool.interrupt()
        elif self.queue.is_running(str(prompt_id)):
            self.pool.interrupt(str(prompt_id))
        return web.Response(status=200)

    async def free(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        asyncio.ensure_future(self.pool.free(bool(body.get("unload_models")), bool(body.get("free_memory"))))
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        try:
            max_items = int(request.query["max_items"]) if "max_items" in request.query else None
            offset = int(request.query.get("offset", -1))
        except ValueError:
            return web.Response(status=400)
        return web.json_response(self.history.items(max_items, offset))

    async def get_history_item(self, request: web.Request) -> web.Response:
        return web.json_response(self.history.get(request.match_info["prompt_id"]))

    async def post_history(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        if body.get("clear"):
            self.history.clear()
        if isinstance(body.get("delete"), list):
            self.history.delete(str(i) for i in body["delete"])
        return web.Response(status=200)

    # --- routes: files ----------------------------------------------------------------------------
    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        if "filename" not in query:
            return web.Response(status=404)
        try:
            path = self.folders.existing_file(query["filename"], query.get("type"), query.get("subfolder"))
        except Refused as refused:
            return web.Response(status=refused.status)
        headers = {"Content-Disposition": f'filename="{path.name}"'}
        channel = query.get("channel", "rgba")
        if "preview" in query:
            fmt, _, rest = query["preview"].partition(";")
            if fmt not in ("webp", "jpeg") or "a" in query.get("channel", ""):
                fmt = "webp"
            quality = int(rest) if rest.isdigit() else 90
            with Image.open(path) as image:
                if fmt == "jpeg" or channel == "rgb":
                    image = image.convert("RGB")
                return web.Response(body=_encode(image, fmt, quality=quality), content_type=f"image/{fmt}",
                                    headers=headers)
        if channel == "rgb":
            with Image.open(path) as image:
                return web.Response(body=_encode(image.convert("RGB"), "png"), content_type="image/png",
                                    headers=headers)
        if channel == "a":
            with Image.open(path) as image:
                alpha = image.getchannel("A") if image.mode == "RGBA" else Image.new("L", image.size, 255)
                out = Image.new("RGBA", image.size)
                out.putalpha(alpha)
                return web.Response(body=_encode(out, "png"), content_type="image/png", headers=headers)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type in _FORCED_DOWNLOAD:
            content_type = "application/octet-stream"
        return web.FileResponse(path, headers={**headers, "Content-Type": content_type})

    async def upload_image(self, request: web.Request) -> web.Response:
        post = await request.post()
        return self._store_upload(post, None)

    async def upload_mask(self, request: web.Request) -> web.Response:
        post = await request.post()
        try:
            reference = json.loads(post.get("original_ref") or "")
            original = self.folders.existing_file(reference["filename"], reference.get("type", "output"),
                                                  reference.get("subfolder"))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return web.Response(status=400)
        except Refused as refused:
            return web.Response(status=refused.status)
        return self._store_upload(post, original)

    def _store_upload(self, post, original: Path | None) -> web.Response:
        """ComfyUI's ``image_upload``: the file (or, for a mask, the original image with the upload's
        alpha) written inside the chosen folder, under a free name unless ``overwrite``."""
        image = post.get("image")
        if image is None or not hasattr(image, "file") or not image.filename:
            return web.Response(status=400)
        subfolder = post.get("subfolder", "") or ""
        try:
            folder, kind = self.folders.upload_target(image.filename, post.get("type"), subfolder)
        except Refused as refused:
            return web.Response(status=refused.status)
        content = image.file.read()
        if original is not None:
            content = _with_alpha_of(original, content)
            if content is None:
                return web.Response(status=400)
        folder.mkdir(parents=True, exist_ok=True)
        name, duplicate = image.filename, False
        if post.get("overwrite") not in ("true", "1"):
            name, duplicate = free_name(folder, image.filename, content)
        if not duplicate:
            with atomic_file(folder / name) as f:
                f.write(content)
        return web.json_response({"name": name, "subfolder": subfolder, "type": kind})

    # --- routes: discovery ------------------------------------------------------------------------
    async def get_object_info(self, request: web.Request) -> web.Response:
        info = await asyncio.get_running_loop().run_in_executor(None, object_info, self.context)
        return web.json_response(info)

    async def get_node_info(self, request: web.Request) -> web.Response:
        from kiln.nodes import registry

        definition = registry.get(request.match_info["node_class"])
        return web.json_response({} if definition is None else
                                 {definition.class_type: node_info(definition, self.context)})

    async def system_stats(self, request: web.Request) -> web.Response:
        import torch

        total, free = _memory()
        devices = [{"name": "cpu", "type": "cpu", "index": None, "vram_total": total, "vram_free": free,
                    "torch_vram_total": 0, "torch_vram_free": 0}]
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                free_b, total_b = torch.cuda.mem_get_info(index)
                reserved = torch.cuda.memory_reserved(index)
                devices.append({"name": torch.cuda.get_device_name(index), "type": "cuda", "index": index,
                                "vram_total": total_b, "vram_free": free_b, "torch_vram_total": reserved,
                                "torch_vram_free": reserved - torch.cuda.memory_allocated(index)})
        return web.json_response({"system": {
            "os": os.name, "ram_total": total, "ram_free": free, "comfyui_version": f"kiln {metadata.version('kiln')}",
            "python_version": sys.version, "pytorch_version": torch.__version__, "embedded_python": False,
            "argv": sys.argv, "platform": platform.platform()}, "devices": devices})

    async def embeddings(self, request: web.Request) -> web.Response:
        models = self.context.models
        names = models.list("embeddings", (".safetensors", ".pt", ".pth", ".bin")) if models is not None else []
        return web.json_response([os.path.splitext(name)[0] for name in names])

    async def model_folders(self, request: web.Request) -> web.Response:
        models = self.context.models
        return web.json_response(sorted(models.paths) if models is not None else [])

    async def models(self, request: web.Request) -> web.Response:
        models, folder = self.context.models, request.match_info["folder"]
        if models is None or folder not in models.paths:
            return web.Response(status=404)
        return web.json_response(models.list(folder))

    async def features(self, request: web.Request) -> web.Response:
        return web.json_response({"supports_preview_metadata": True,
                                  "max_upload_size": int(self.config.max_upload_mb * 1024 * 1024)})

    async def kiln_plans(self, request: web.Request) -> web.Response:
        return web.json_response(self.plans.listing())

    # --- the WebSocket ------------------------------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        previous = self.clients.pop(sid, None)
        if previous is not None:
            previous.close()
        client = self.clients[sid] = _Client(ws)
        client.send(text_frame("status", {**self._status(), "sid": sid}))
        for job in self.queue.running():
            if job.client_id == sid and self.current.get(job.prompt_id) is not None:
                client.send(text_frame("executing", {"node": self.current[job.prompt_id], "prompt_id": job.prompt_id}))
        try:
            async for message in ws:
                if message.type != web.WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(message.data)
                except json.JSONDecodeError:
                    continue
                if isinstance(data, dict) and data.get("type") == "feature_flags":
                    client.flags = data.get("data") if isinstance(data.get("data"), dict) else {}
                    client.send(text_frame("feature_flags", {"supports_preview_metadata": True,
                                                             "max_upload_size": int(self.config.max_upload_mb
                                                                                    * 1024 * 1024)}))
        finally:
            if self.clients.get(sid) is client:
                del self.clients[sid]
            client.close()
        return ws


def _refused(refusal: Refusal) -> web.Response:
    return web.json_response(refusal.body(), status=400)


async def _json_or_empty(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _with_alpha_of(original: Path, upload: bytes) -> bytes | None:
    """``/upload/mask``: the original image (its text chunks kept) with the upload's alpha channel."""
    try:
        with Image.open(original) as image, Image.open(io.BytesIO(upload)) as mask:
            info = PngInfo()
            for key, value in getattr(image, "text", {}).items():
                info.add_text(key, value)
            rgba = image.convert("RGBA")
            rgba.putalpha(mask.convert("RGBA").getchannel("A"))
            return _encode(rgba, "png", compress_level=4, pnginfo=info)
    except (OSError, ValueError):
        return None


def _memory() -> tuple[int, int]:
    """(total, available) RAM in bytes, from /proc/meminfo where there is one."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, KeyError, ValueError, IndexError):
        return 0, 0
