"""The dashboard's HTTP server: the API, the page, and the services beside them.

``create_app`` builds the ASGI application (FastAPI: the ``/api/v1`` router,
the built page from ``static/``, error handlers that never leak a stack trace,
security headers on every response). ``serve`` runs it with uvicorn on the
caller's event loop together with the live-update hub (``live``) and the
rollup pass (``rollups``) until ``stop`` is set: as the process of
``kubetasks dashboard``, or as a service of ``kubetasks run`` when
``KUBETASKS_DASHBOARD_PORT`` is set.

The page is a single HTML file plus hashed assets built by Vite at package
build time (see ``build_backend.py``) and shipped in the wheel; it loads
nothing from the network. Its Content-Security-Policy allows scripts and
styles from the dashboard's own origin only, so even markup that slipped into
the page could not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubetasks.app import App
from kubetasks.dashboard.api import Context, build_router
from kubetasks.dashboard.auth import Auth, Denied
from kubetasks.dashboard.live import Hub
from kubetasks.dashboard.rollups import Rollup
from kubetasks.errors import TaskNotFound, ValidationError
from kubetasks.schedules import ScheduleNotFound
from kubetasks.store import operations

log = logging.getLogger("kubetasks.dashboard")

#: `kubetasks dashboard` listens here when KUBETASKS_DASHBOARD_PORT is 0.
DEFAULT_PORT = 8080
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def static_dir() -> Path | None:
    """Where the built page is (None: the package was built without it)."""
    folder = Path(str(resources.files("kubetasks.dashboard") / "static"))
    return folder if (folder / "index.html").is_file() else None


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "field": field, "message": message}}, status_code=status)


def create_app(ctx: Context) -> FastAPI:
    api = FastAPI(
        title="kubetasks",
        summary="Tasks, workflows, schedules, queues and pods of a kubetasks installation.",
        version="1",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # Swagger UI loads from a CDN: the page must work without the network
        redoc_url=None,
    )
    api.include_router(build_router(ctx))

    @api.exception_handler(Denied)
    async def denied(_: Request, exc: Denied) -> JSONResponse:
        return _error(exc.status, exc.message)

    @api.exception_handler(ValidationError)
    async def invalid(_: Request, exc: ValidationError) -> JSONResponse:
        return _error(400, str(exc), exc.field)

    @api.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body")]
        field = ".".join(loc) or "request"
        return _error(400, f"{field}: {first.get('msg', 'invalid')}", field)

    @api.exception_handler(TaskNotFound)
    async def task_missing(_: Request, exc: TaskNotFound) -> JSONResponse:
        return _error(404, str(exc), "task_id")

    @api.exception_handler(ScheduleNotFound)
    async def schedule_missing(_: Request, exc: ScheduleNotFound) -> JSONResponse:
        return _error(404, str(exc), "name")

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @api.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        started = time.perf_counter()
        try:
            response: Response = await call_next(request)
        except Exception as exc:
            # Logged here with a reference; the caller gets the reference, never the trace.
            ref = secrets.token_hex(6)
            log.error(
                "dashboard request %s %s failed (ref %s)", request.method, request.url.path, ref, exc_info=exc
            )
            response = _error(500, f"internal error (ref {ref}, see the dashboard's log)")
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        if request.url.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
            # The server's time for this request (browsers' developer tools and bench/dashboard.py read it).
            response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
        return response

    @api.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    folder = static_dir()
    if folder is not None and (folder / "assets").is_dir():
        api.mount("/assets", StaticFiles(directory=folder / "assets"), name="assets")

    @api.get("/", include_in_schema=False)
    async def index() -> Response:
        if folder is None:
            return PlainTextResponse(
                "The dashboard's page was not built into this package (npm was not run); "
                "the API is at /api/v1.",
                status_code=503,
            )
        return FileResponse(folder / "index.html", headers={"Cache-Control": "no-cache"})

    return api


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the process's owner (``kubetasks run``'s
    runtime, ``kubetasks dashboard``) handles SIGTERM and sets ``stop``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(
    app: App,
    stop: asyncio.Event,
    *,
    port: int | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve the dashboard for ``app`` until ``stop`` is set; ``ready`` gets the bound port."""
    settings = app.settings.dashboard_ready()
    await app.open()
    # Polling (no LISTEN behind a transaction pooler): pages refetch every few seconds at most.
    hub = Hub(
        settings.direct_url, poll_every=max(5.0, settings.poll_interval),
        newest=lambda: operations.tasks_max_id(app.store),
    )  # fmt: skip
    ctx = Context(app=app, settings=settings, auth=Auth(settings), hub=hub, stop=stop)
    config = uvicorn.Config(
        create_app(ctx),
        host=settings.dashboard_addr,
        port=port if port is not None else (settings.dashboard_port or DEFAULT_PORT),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    server = _Server(config)
    rollup = Rollup(app.store, interval=settings.dashboard_rollup_interval)
    tasks = [
        asyncio.create_task(hub.run(stop), name="kubetasks-dashboard-hub"),
        asyncio.create_task(rollup.run(stop), name="kubetasks-dashboard-rollup"),
    ]
    serving = asyncio.create_task(server.serve(), name="kubetasks-dashboard-http")
    try:
        while not server.started:
            if serving.done():
                await serving  # raises: the port was taken, the address is wrong...
                raise RuntimeError("the dashboard's HTTP server stopped while starting")
            await asyncio.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1]
        log.info("dashboard listening on http://%s:%d/", settings.dashboard_addr, bound)
        if ready is not None:
            ready(int(bound))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({serving, stopper, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if serving in done and not stop.is_set():
            await serving
            raise RuntimeError("the dashboard's HTTP server stopped on its own")
        for t in tasks:
            if t in done and not stop.is_set():
                raise RuntimeError(f"{t.get_name()} ended on its own") from t.exception()
    finally:
        stop.set()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 10)
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
