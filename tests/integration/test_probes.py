"""The probe server (/healthz, /readyz, /metrics) over real HTTP on a loopback port.

The worker behind it is a stand-in (tests/fakes.py): each check is flipped by
hand and read back through an HTTP client, no database needed. The same server
in a real `kubetasks run` process, against PostgreSQL: test_metrics.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import asyncpg

from kubetasks.health import HealthServer
from tests.fakes import SHIPPED, FakeWorker


async def _probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, json.loads(await r.text())


async def test_probes_report_each_check() -> None:
    w = FakeWorker()
    stop = asyncio.Event()
    done = asyncio.get_running_loop().create_future()
    worker_task = asyncio.ensure_future(done)
    server = HealthServer(w, stop=stop, worker_task=worker_task, db_cache_s=0.0)  # type: ignore[arg-type]
    port = await server.start("127.0.0.1", 0)
    try:
        code, body = await _probe(port, "/healthz")
        assert code == 200 and body["failed"] == []
        code, body = await _probe(port, "/readyz")
        assert code == 200, body
        assert body["checks"]["migrations"] == {"ok": True, "pending": []}

        assert w.opened_store is not None and w.lease is not None
        w.opened_store.applied = SHIPPED[:-1]
        code, body = await _probe(port, "/readyz")
        assert code == 503 and body["failed"] == ["migrations"]
        assert body["checks"]["migrations"]["pending"] == SHIPPED[-1:]

        w.opened_store.applied = list(SHIPPED)
        w.lease.lost = True
        code, body = await _probe(port, "/readyz")
        assert code == 503 and body["failed"] == ["lease"]
        w.lease.lost, w.lease.left = False, -0.5
        code, body = await _probe(port, "/readyz")
        assert code == 503 and body["failed"] == ["lease"]

        w.lease.left = 10.0
        w.opened_store.error = asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
        code, body = await _probe(port, "/readyz")
        assert code == 503 and body["failed"] == ["database"] and body["unknown"] == ["migrations"]
        assert "starting up" in body["checks"]["database"]["error"]
        w.opened_store.error, w.opened_store.delay = None, 5.0
        server.db_timeout_s = 0.1
        code, body = await _probe(port, "/readyz")
        assert code == 503 and "no answer within 0.1s" in body["checks"]["database"]["error"]
        w.opened_store.delay = 0.0

        stop.set()
        code, body = await _probe(port, "/readyz")
        assert code == 503 and body["failed"] == ["stopping"]

        done.set_result(None)
        await asyncio.sleep(0)
        code, body = await _probe(port, "/healthz")
        assert code == 503 and body["failed"] == ["worker"]
    finally:
        await server.close()


async def test_metrics_endpoint_serves_text_format() -> None:
    server = HealthServer(FakeWorker())  # type: ignore[arg-type]
    port = await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = await r.text()
            headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
            async with http.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as r:
                assert r.headers["Content-Type"].startswith("application/openmetrics-text")
                assert (await r.text()).rstrip().endswith("# EOF")
    finally:
        await server.close()
    assert "# TYPE kubetasks_lease_renewals_total counter" in text
    assert "kubetasks_process_resident_memory_bytes" in text
