"""The operator service: kopf in a thread of its own, beside the worker.

kopf's documented way to embed is its own thread and event loop: when it
exits it cancels every task of its loop that it did not start, and it must
not replace the process's signal handlers. So the kopf side gets its own
small asyncpg pool (pools are bound to their loop) and shares nothing with
the worker but the database. The status writer runs in the same thread,
started before kopf so kopf's exit does not cancel it.

kopf peering keeps one replica handling object events; every replica runs
workers. Each replica takes a random peering priority (equal priorities
freeze every replica) and a short peering lifetime, so a crashed leader is
replaced in seconds rather than the default minute. The status writer is
elected separately, by a Postgres advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
from typing import Any

import kopf

from kubetasks.app import App
from kubetasks.k8s import cronjoblocks, handlers, kube, status, webhook
from kubetasks.store import Store

log = logging.getLogger("kubetasks.k8s.operator")


def watch_scope() -> dict[str, Any]:
    """KUBETASKS_WATCH_NAMESPACES (comma list) or cluster-wide."""
    raw = os.environ.get("KUBETASKS_WATCH_NAMESPACES", "").strip()
    if raw:
        return {"namespaces": [n.strip() for n in raw.split(",") if n.strip()]}
    return {"clusterwide": True}


def make_settings() -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    # Equal priorities freeze every replica: draw one per process unless told.
    s.peering.priority = int(os.environ.get("KUBETASKS_PEERING_PRIORITY") or random.randint(1, 2**30))
    s.peering.lifetime = int(os.environ.get("KUBETASKS_PEERING_LIFETIME", "10"))
    s.peering.mandatory = False
    s.peering.name = os.environ.get("KUBETASKS_PEERING_NAME", "default")
    s.scanning.disabled = True
    s.posting.level = logging.WARNING
    s.networking.request_timeout = 60
    s.persistence.consistency_timeout = 0
    selector = os.environ.get("KUBETASKS_POD_SELECTOR")
    if selector:
        s.watching.label_selectors["v1", "pods"] = selector
    return s


class Operator:
    def __init__(self, app: App) -> None:
        self.app = app
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.writer: status.StatusWriter | None = None

    async def run(self, stop: asyncio.Event, _worker: object = None) -> None:
        thread = threading.Thread(target=self._thread_main, name="kubetasks-operator", daemon=True)
        thread.start()
        try:
            while thread.is_alive() and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
        finally:
            self._stop.set()
            await asyncio.to_thread(thread.join, 30)
        if self._error is not None and not stop.is_set():
            raise RuntimeError("the operator thread failed") from self._error

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            if self._stop.is_set() and isinstance(exc, asyncio.CancelledError):
                # kopf cancels what its loop started while it ran (our writers' inner
                # tasks among them) when it exits: expected on a stop, not a failure.
                return
            self._error = exc
            log.exception("operator thread failed")

    async def _main(self) -> None:
        # kopf logs every handler success at INFO: one line per object event.
        logging.getLogger("kopf").setLevel(os.environ.get("KUBETASKS_KOPF_LOG_LEVEL", "WARNING").upper())
        s = self.app.settings
        store = Store(s.database_url, min_size=1, max_size=4)
        await store.open()
        k = kube.Kube()
        selector = os.environ.get("KUBETASKS_POD_SELECTOR")
        ctx = handlers.OperatorContext(app=self.app, store=store, kube=k, pod_selector=selector)
        writer_stop = asyncio.Event()
        self.writer = status.StatusWriter(s.database_url, store, k)
        writer = asyncio.create_task(self.writer.run(writer_stop), name="kubetasks-status-writer")
        refresher = cronjoblocks.CronStatusRefresher(self.app, store, k)
        writer_is_leader = self.writer
        cron_status = asyncio.create_task(
            refresher.run(writer_stop, lambda: writer_is_leader.is_leader), name="kubetasks-cron-status"
        )
        await self._reconcile_pods(ctx)
        registry = kopf.OperatorRegistry()
        handlers.register(registry, ctx)
        webhook.register(registry)
        try:
            await kopf.operator(
                registry=registry,
                settings=make_settings(),
                stop_flag=self._stop,
                ready_flag=self._ready,
                **watch_scope(),
            )
        finally:
            writer_stop.set()
            await asyncio.wait([writer, cron_status], timeout=10)
            for t in ctx.ttl_timers.values():
                t.cancel()
            await store.close()

    async def _reconcile_pods(self, ctx: handlers.OperatorContext) -> None:
        """Deletions that happened while no operator ran produce no event: compare with a listing."""
        namespace = os.environ.get("POD_NAMESPACE")
        if not (ctx.pod_selector and namespace):
            return
        try:
            pods = set(await ctx.kube.list_pods(namespace, ctx.pod_selector))
        except Exception as exc:
            log.warning("could not list pods to reconcile workers: %r", exc)
            return
        for w in await ctx.store.run("live_workers_in_namespace", namespace):
            if w["pod_id"] not in pods:
                n = await ctx.store.run("release_pod", w["pod_id"], f"pod {w['pod_id']} no longer exists")
                log.warning("pod %s is gone: released %d of its tasks", w["pod_id"], n)
