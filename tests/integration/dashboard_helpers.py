"""A real dashboard server (uvicorn on a free loopback port) on the test's event loop, and a
real worker beside it, for the API and browser tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kubetasks import App
from kubetasks.dashboard import server
from tests.integration.apps import dashapp
from tests.integration.helpers import RunningWorker

TOKEN = "dashboard-test-token-0123456789"


@dataclass
class Dash:
    url: str
    app: App


@contextlib.asynccontextmanager
async def running_dashboard(db_url: str, **settings: Any) -> AsyncIterator[Dash]:
    """``kubetasks dashboard`` in this process: token auth with TOKEN unless told otherwise."""
    opts: dict[str, Any] = {
        "dashboard_auth": "token", "dashboard_token": TOKEN, "dashboard_rollup_interval": 0.3,
        "pod_id": "dashboard-test",
    }  # fmt: skip
    opts.update(settings)
    app = App(database_url=db_url, strict_handlers=False, **opts)
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.serve(app, stop, port=0, ready=bound.set_result))
    try:
        done, _ = await asyncio.wait({task, bound}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            await task  # raises why it could not start
        assert bound.done(), "the dashboard did not start within 30 s"
        yield Dash(f"http://127.0.0.1:{bound.result()}/", app)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 20)
        await app.close()


def worker_app(db_url: str, pod: str = "dash-pod-1") -> App:
    a = App(database_url=db_url, pod_id=pod, heartbeat_interval=0.5, lease_ttl=3.0, concurrency=8)
    a.add_tasks_from(dashapp.app)
    return a


@contextlib.asynccontextmanager
async def running_worker(db_url: str, pod: str = "dash-pod-1") -> AsyncIterator[App]:
    a = worker_app(db_url, pod)
    await a.open()
    try:
        async with RunningWorker(a):
            yield a
    finally:
        await a.close()


async def finished(app: App, *ids: int) -> bool:
    for i in ids:
        if (await app.get_task(i)).status not in ("succeeded", "failed", "cancelled"):
            return False
    return True
