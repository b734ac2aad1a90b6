"""The composition root: `kubetasks run`, the one process every pod runs, composed of services.

The worker (with its lease and recoverer) always runs. Beside it, each
optional service is a coroutine ``run(stop)`` started here and stopped when
the worker stops: the scheduler (cron), the health/metrics server and, when a
Kubernetes API can be reached, the operator. Any service that ends on its
own stops the whole process loudly -- a pod with a dead scheduler must
restart, not limp on.

Signals: the first SIGTERM/SIGINT starts a graceful stop (the worker's
shutdown grace applies), a second one cuts the grace short.

``pod_services`` decides which services a pod runs and ``serve`` runs them; the CLI
only parses its options, loads the app and adds the dashboard (which only it may import).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from kubetasks import cron, retention
from kubetasks.app import App
from kubetasks.store import migrate, retry_connection_errors
from kubetasks.worker import Worker

log = logging.getLogger("kubetasks.runtime")

#: A service: given the process's stop event and its worker, run until stop is set.
Service = Callable[[asyncio.Event, Worker], Coroutine[Any, Any, None]]


@dataclass
class Runtime:
    app: App
    worker: Worker
    services: dict[str, Service] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    force: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, name: str, service: Service) -> None:
        self.services[name] = service

    def signal(self) -> None:
        if self.stop.is_set():
            self.force.set()
        self.stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.signal)
        side: dict[str, asyncio.Task[None]] = {}
        try:
            main = asyncio.create_task(self.worker.run(self.stop, self.force), name="kubetasks-worker")
            await _first(main, self.worker.ready.wait())
            for name, service in self.services.items():
                side[name] = asyncio.create_task(service(self.stop, self.worker), name=f"kubetasks-{name}")
            while not main.done():
                done, _ = await asyncio.wait({main, *side.values()}, return_when=asyncio.FIRST_COMPLETED)
                for name, t in list(side.items()):
                    if t in done:
                        del side[name]
                        if not self.stop.is_set():
                            exc = t.exception() if not t.cancelled() else None
                            log.error("service %s ended unexpectedly (%r); stopping the process", name, exc)
                            self.stop.set()
                            await main
                            raise RuntimeError(f"service {name} ended unexpectedly") from exc
            await main
        finally:
            self.stop.set()
            for t in side.values():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(t), 10)
                t.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


async def _first(main: asyncio.Task[None], ready: Awaitable[bool]) -> None:
    """Wait until the worker is ready, or raise at once if it died starting."""
    ready_t = asyncio.ensure_future(ready)
    done, _ = await asyncio.wait({main, ready_t}, return_when=asyncio.FIRST_COMPLETED)
    if main in done:
        ready_t.cancel()
        await main  # raises the start-up error
        raise RuntimeError("the worker stopped while starting")


def pod_services(app: App) -> list[tuple[str, Service]]:
    """The services `kubetasks run` adds beside the worker: the scheduler (every pod schedules
    code periodics and CronJobLock rows alike), retention, the operator when a cluster can be
    reached, and the health/metrics server when its port is set."""
    services: list[tuple[str, Service]] = [("scheduler", cron.Scheduler(app).run)]
    # Every pod offers; one pass per interval runs, one batch at a time across the cluster.
    services.append(("retention", retention.Retention(lambda: app.store, app.settings).run))
    # The Kubernetes client, kopf and aiohttp take ~0.5 s to import: a worker that runs neither
    # service starts without them (start-up time is recovery time when a pod is replaced).
    if app.settings.kubernetes_reachable():
        from kubetasks.k8s.operator import Operator  # noqa: PLC0415

        services.append(("operator", Operator(app).run))
    if app.settings.metrics_enabled:
        from kubetasks import health  # noqa: PLC0415

        services.append(("health", health.serve))
    return services


async def serve(app: App, services: list[tuple[str, Any]]) -> None:
    """Migrate (waiting for the database), then run the worker and ``services`` until a stop."""
    s = app.settings
    await retry_connection_errors(
        lambda: migrate(s.direct_url or s.database_url, pooled=not s.direct_url), what="migrating"
    )
    try:
        rt = Runtime(app, Worker(app))
        for name, service in services:
            rt.add(name, service)
        await rt.run()
    finally:
        await app.close()
