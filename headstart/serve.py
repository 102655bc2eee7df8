"""``headstart serve``: a run behind HTTP, with concurrent requests batched through the network.

Framework: FastAPI on uvicorn (``pip install 'headstart[serve]'``). FastAPI is well kept and widely used,
async (the batcher below is an asyncio task beside the requests, no extra process), parses multipart
uploads (python-multipart) and describes its endpoints as OpenAPI (``/docs``) with no extra work;
uvicorn is its usual server and stops gracefully on Ctrl-C. LitServe batches by itself too, but brings
its own worker processes and a larger dependency tree for what one asyncio task does here.

Endpoints:

* ``POST /predict`` -- one image, as a multipart upload (``-F file=@photo.jpg``) or as the raw request
  body (``--data-binary @photo.jpg``); ``?top_k=N`` classes listed (default 1). Answers
  ``{"label", "probability", "top_k": [[label, p], ...], "file"}``.
* ``GET /health`` -- ``{"status": "ok", ...}`` with counts of requests, batches and the queue.
* ``GET /metadata`` -- classes, engine, limits and the model card (:mod:`headstart.model_card`).

How a request flows: its body is read up to ``max_bytes`` (more: 413); the image is decoded and
preprocessed in a worker thread (:meth:`~headstart.predictor.Predictor.prepare`: bad bytes are a 4xx JSON
error naming what was wrong, a decompression bomb is refused from its header with 413); the tensor
joins an asyncio queue; one *batcher* task takes up to ``max_batch`` queued images, waiting at most
``max_wait_ms`` after the first for others (only while other requests' images are being decoded, so a
lone request never waits), runs the network on them in its one forward thread and resolves each
request's future with its row. Every error is ``{"error": "..."}`` with a 4xx/5xx status;
nothing a client sends stops the server. One log line per request on stderr (time, client, method,
path, status, milliseconds) unless ``quiet``.

``$HEADSTART_SERVE_IDLE_EXIT`` (seconds): stop by itself after that long without a request (for
tests and scripts that must not leave a server behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .data import ImageDecodeError
from .data.decode import max_pixels
from .errors import UsageError
from .predictor import Predictor, Prepared

IDLE_EXIT_ENV = "HEADSTART_SERVE_IDLE_EXIT"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers allowed on top of --max-bytes
UPLOAD_NAME = "<upload>"


@dataclass
class ServeSettings:
    """The server's limits and behaviour (``headstart serve``'s options)."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_bytes: int = 20 * 2**20
    quiet: bool = False
    idle_exit_s: float | None = None  # stop after this long without a request

    def check(self) -> None:
        """Refuse values that cannot work, naming the option."""
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise UsageError(f"--max-batch must be a whole number >= 1 (1: no batching); got {self.max_batch}")
        if not math.isfinite(self.max_wait_ms) or self.max_wait_ms < 0:
            raise UsageError(f"--max-wait-ms must be a number of milliseconds >= 0; got {self.max_wait_ms}")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise UsageError(f"--max-bytes must be a whole number of bytes >= 1, e.g. 20971520 (20 MiB); "
                             f"got {self.max_bytes}")
        if self.idle_exit_s is not None and not self.idle_exit_s > 0:
            raise UsageError(f"${IDLE_EXIT_ENV} must be a number of seconds > 0; got {self.idle_exit_s}")


def idle_exit_from_env() -> float | None:
    """``$HEADSTART_SERVE_IDLE_EXIT`` in seconds, or None when unset."""
    value = os.environ.get(IDLE_EXIT_ENV, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"${IDLE_EXIT_ENV} must be a number of seconds, e.g. 300; got '{value}'") from None


# ------------------------------------------------------------------------------------------ batching


@dataclass
class BatchStats:
    """What the batcher has done so far."""

    batches: int = 0
    images: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it

    def add(self, size: int) -> None:
        self.batches += 1
        self.images += size
        self.largest = max(self.largest, size)
        self.sizes[size] = self.sizes.get(size, 0) + 1


class Batcher:
    """Dynamic batching: requests queue their prepared images; one task scores them together.

    The task takes the first queued image, then whatever else arrives within ``max_wait_s`` (up to
    ``max_batch``), and runs ``score`` on the batch in its single forward thread, so the network never
    runs twice at once and the event loop keeps accepting requests meanwhile. Images that queued while
    a batch was running go together in the next one without waiting. It waits only while ``on_the_way()``
    says that more images are being decoded: a lone request is never held back for company that is not
    coming (with one client, batching costs no latency).
    """

    def __init__(self, score: Callable[[list[Prepared]], np.ndarray], max_batch: int, max_wait_s: float,
                 on_the_way: Callable[[], int] | None = None) -> None:
        self.score = score
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_the_way = on_the_way or (lambda: 1)
        self.stats = BatchStats()
        self._queue: asyncio.Queue[tuple[Prepared, asyncio.Future[np.ndarray]]] = asyncio.Queue()
        self._pending_get: asyncio.Task[Any] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="headstart-forward")
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="headstart-batcher")

    async def stop(self) -> None:
        """Cancel the task, fail what is still queued, and let the forward thread finish its batch."""
        for task in (self._task, self._pending_get):
            if task is not None:
                task.cancel()
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the server is stopping"))
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    async def submit(self, item: Prepared) -> np.ndarray:
        """The probabilities row of ``item``, once its batch has run."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._next(None)]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                wait = max(0.0, deadline - loop.time()) if self.on_the_way() > 0 else 0.0
                entry = await self._next(wait)
                if entry is None:
                    break
                batch.append(entry)
            live = [(item, future) for item, future in batch if not future.done()]  # a client that left
            if live:
                await self._score(loop, live)

    async def _next(self, timeout: float | None) -> Any:
        """The next queued entry, or None after ``timeout`` seconds. A get that timed out is kept for the
        next call, never cancelled, so no entry is ever lost between a wake-up and a timeout."""
        if self._pending_get is None and not self._queue.empty():
            return self._queue.get_nowait()
        if self._pending_get is not None and self._pending_get.done():
            entry, self._pending_get = self._pending_get.result(), None
            return entry
        if timeout == 0:
            return None
        if self._pending_get is None:
            self._pending_get = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({self._pending_get}, timeout=timeout)
        if not done:
            return None
        entry, self._pending_get = self._pending_get.result(), None
        return entry

    async def _score(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Prepared, Any]]) -> None:
        self.stats.add(len(batch))
        try:
            proba = await loop.run_in_executor(self._executor, self.score, [item for item, _ in batch])
        except Exception as exc:  # the batch's requests get a 500 each; the server goes on
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), row in zip(batch, proba):
            if not future.done():
                future.set_result(row)


# ------------------------------------------------------------------------------------------ the app


class _ServeError(Exception):
    """A request that gets a JSON error: ``status`` and the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(predictor: Predictor, settings: ServeSettings, *, card: dict[str, Any] | None = None,
               stop: Callable[[], None] | None = None) -> Any:
    """The FastAPI application serving ``predictor``.

    Args:
        card: the model card (``GET /metadata``); default built from the run (:func:`~headstart.model_card.model_card`).
        stop: called to stop the server when ``settings.idle_exit_s`` passes without a request.
    """
    settings.check()
    if card is None:
        from .model_card import model_card

        card = model_card(predictor.run)
    state = _State(predictor, settings)

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        state.batcher = Batcher(predictor.probabilities, settings.max_batch, settings.max_wait_ms / 1000,
                                on_the_way=lambda: state.preparing)
        state.batcher.start()
        watch = asyncio.get_running_loop().create_task(state.watch_idle(stop)) if settings.idle_exit_s else None
        try:
            yield
        finally:
            if watch is not None:
                watch.cancel()
            await state.batcher.stop()

    names = predictor.class_names
    app = FastAPI(title=f"headstart: {predictor.run.path.name}", lifespan=lifespan,
                  description=f"Classifies an image into one of {len(names)} classes: "
                              f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(422, _validation_message(exc))

    @app.post("/predict", openapi_extra=_PREDICT_BODY, summary="classify one image")
    async def predict(request: Request, top_k: int = Query(1, ge=1, description="classes listed, best first")
                      ) -> JSONResponse:
        try:
            return JSONResponse(await state.predict(request, top_k))
        except _ServeError as exc:
            return _error_response(exc.status, str(exc))
        except Exception as exc:  # never a traceback to the client, never a stopped server
            print(f"headstart serve: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return _error_response(500, f"internal error ({type(exc).__name__}); the server goes on")

    @app.get("/health", summary="is the server up")
    async def health() -> dict[str, Any]:
        return state.health()

    @app.get("/metadata", summary="classes, limits and the model card")
    async def metadata() -> dict[str, Any]:
        return {**state.describe(), "model_card": card}

    return _RequestLog(app, settings.quiet, state)


_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string",
                                                                                  "format": "binary"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


class _State:
    """What the endpoints share: the predictor, the batcher, counters, the time of the last request."""

    def __init__(self, predictor: Predictor, settings: ServeSettings) -> None:
        self.predictor = predictor
        self.settings = settings
        self.batcher: Batcher | None = None
        self.started = time.monotonic()
        self.last_request = time.monotonic()
        self.requests = 0
        self.errors = 0
        self.preparing = 0  # requests whose image is being decoded (the batcher waits only for those)
        self._local = threading.local()

    async def predict(self, request: Any, top_k: int) -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool

        data, name = await _read_image(request, self.settings.max_bytes)
        self.preparing += 1
        try:
            prepared = await run_in_threadpool(self._prepare, data, name)
        except ImageDecodeError as exc:
            raise _ServeError(_decode_status(exc), str(exc)) from None
        finally:
            self.preparing -= 1
        assert self.batcher is not None
        row = await self.batcher.submit(prepared)  # queued before any await: never between the two counts
        if not np.isfinite(row).all():
            raise _ServeError(422, f"{name}: the backbone gave non-finite features for this image; it cannot be "
                                   "scored")
        names = self.predictor.class_names
        order = np.argsort(-row, kind="stable")[:min(top_k, len(names))]
        return {"label": names[order[0]], "probability": float(row[order[0]]),
                "top_k": [[names[j], float(row[j])] for j in order], "file": name}

    def _prepare(self, data: bytes, name: str) -> Prepared:
        """Decode and preprocess in a worker thread, with one torch thread: requests run side by side, and
        small tensor operations split over all cores are slower than on one."""
        if not getattr(self._local, "single", False):
            import torch

            torch.set_num_threads(1)  # this thread only (OpenMP's setting is per thread)
            self._local.single = True
        return self.predictor.prepare(data, name)

    def describe(self) -> dict[str, Any]:
        """The run, its classes, what computes them, and the limits (``/metadata`` less the card)."""
        settings = self.settings
        return {"run": self.predictor.run.path.name, "classes": self.predictor.class_names,
                "engine": self.predictor.engine, "forward": self.predictor.forward,
                "limits": {"max_bytes": settings.max_bytes, "max_pixels": max_pixels(),
                           "max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms}}

    def health(self) -> dict[str, Any]:
        stats = self.batcher.stats if self.batcher else BatchStats()
        return {"status": "ok", "run": self.predictor.run.path.name, "engine": self.predictor.engine,
                "forward": self.predictor.forward, "classes": len(self.predictor.class_names),
                "requests": self.requests, "errors": self.errors,
                "batches": stats.batches, "images_scored": stats.images, "largest_batch": stats.largest,
                "mean_batch": round(stats.images / stats.batches, 2) if stats.batches else 0.0,
                "queued": self.batcher.queued if self.batcher else 0,
                "uptime_s": round(time.monotonic() - self.started, 1)}

    async def watch_idle(self, stop: Callable[[], None] | None) -> None:
        limit = self.settings.idle_exit_s
        assert limit is not None
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            if time.monotonic() - self.last_request > limit:
                print(f"headstart serve: no request for {limit:g} s (${IDLE_EXIT_ENV}); stopping", file=sys.stderr,
                      flush=True)
                if stop is not None:
                    stop()
                return


async def _read_image(request: Any, max_bytes: int) -> tuple[bytes, str]:
    """The uploaded image's bytes and a name for messages: a multipart file part, or the raw body."""
    content_type = request.headers.get("content-type", "")
    multipart = content_type.startswith("multipart/form-data")
    if content_type.startswith(("application/x-www-form-urlencoded", "text/")):
        raise _ServeError(415, f"a {content_type.split(';')[0]} body is not an image; send the image's bytes as the "
                               "body (--data-binary @photo.jpg) or as a multipart file part (-F file=@photo.jpg)")
    body = await _read_body(request, max_bytes + (MULTIPART_OVERHEAD if multipart else 0), max_bytes)
    if not multipart:
        name = request.headers.get("x-filename") or UPLOAD_NAME
        data = body
    else:
        data, name = await _file_part(request, body)
    if len(data) > max_bytes:
        raise _ServeError(413, f"{name}: the upload is {len(data):,} bytes, more than the server's limit of "
                               f"{max_bytes:,} (--max-bytes); send a smaller image")
    if not data:
        raise _ServeError(400, f"{name}: empty upload (0 bytes); send the image's bytes as the request body "
                               "or as a multipart file part named 'file'")
    return data, name


async def _read_body(request: Any, cap: int, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``cap`` bytes (or says it will)."""
    length = request.headers.get("content-length", "")
    too_large = _ServeError(413, f"request body larger than the server's limit of {max_bytes:,} bytes "
                                 "(--max-bytes); send a smaller image")
    if length.isdigit() and int(length) > cap:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _file_part(request: Any, body: bytes) -> tuple[bytes, str]:
    """The first file part of a multipart body already read (parsed from memory, nothing spooled to disk)."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=4, max_fields=16)
    except MultiPartException as exc:
        raise _ServeError(400, f"malformed multipart request ({exc}); send -F file=@photo.jpg") from None
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise _ServeError(400, "the multipart request has no file part; send the image as -F file=@photo.jpg")
        return await files[0].read(), files[0].filename or UPLOAD_NAME
    finally:
        await form.close()


def _decode_status(exc: ImageDecodeError) -> int:
    """413 for an image over the pixel limit, 400 for an empty one, 422 for bytes that are no usable image."""
    text = str(exc)
    if "image too large" in text:
        return 413
    return 400 if "empty file" in text else 422


def _validation_message(exc: Any) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {error.get('msg')} (got {error.get('input')!r})")
    return "; ".join(parts) + " -- e.g. /predict?top_k=3"


def _error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


class _RequestLog:
    """ASGI wrapper: one line per HTTP request on stderr (time, client, method, path, status, ms), unless quiet,
    and the request counts of ``/health``."""

    def __init__(self, app: Any, quiet: bool, state: _State) -> None:
        self.app = app
        self.quiet = quiet
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]
        self.state.last_request = time.monotonic()

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._count(status[0])
            if not self.quiet:
                self._log(scope, status[0], 1000 * (time.perf_counter() - start))

    def _count(self, status: int) -> None:
        self.state.requests += 1
        self.state.errors += status >= 400
        self.state.last_request = time.monotonic()

    @staticmethod
    def _log(scope: dict[str, Any], status: int, ms: float) -> None:
        query = scope.get("query_string", b"").decode("latin-1")
        path = scope.get("path", "") + (f"?{query}" if query else "")
        client = (scope.get("client") or ("-", 0))[0]
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with contextlib.suppress(OSError, ValueError):  # stderr gone: the request still counts
            print(f"{stamp} {client} {scope.get('method', '-')} {path} {status} {ms:.1f} ms", file=sys.stderr,
                  flush=True)


# ------------------------------------------------------------------------------------------ running


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free one), not yet listening (the server listens
    once the model is loaded); a busy port or an unknown address is a one-line UsageError."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0..65535 (0: any free port); got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--host '{host}' is not an address of this machine ({exc.strerror}); "
                         "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port "
                         "(--port 0 picks a free one)") from None
    return sock


def address_of(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def serve(predictor: Predictor, settings: ServeSettings, sock: socket.socket, *, card: dict[str, Any] | None = None,
          on_ready: Callable[[], None] | None = None) -> None:
    """Serve ``predictor`` on the bound ``sock`` (:func:`bind`) until Ctrl-C (SIGINT) or SIGTERM; then stop
    taking connections, finish the requests under way (at most 5 s) and stop the batcher.

    ``on_ready`` is called once the server accepts connections.
    """
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready()

    holder: list[Any] = []
    app = create_app(predictor, settings, card=card, stop=lambda: setattr(holder[0], "should_exit", True))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                            server_header=False, backlog=2048)
    server = _Server(config)
    holder.append(server)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def latency_summary(ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max of request latencies in milliseconds (what the tests and the benchmark print)."""
    values = np.sort(np.asarray(ms, dtype=np.float64))
    if not len(values):
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
            "p99": float(np.percentile(values, 99)), "max": float(values[-1])}
