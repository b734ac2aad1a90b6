"""The operator service: the Kubernetes side of a pod, beside its worker.

It runs in a thread of its own with its own event loop and small database
pools, sharing nothing with the worker but the database. In it, every
replica:

* watches its own release's pods and recovers the workers of those that go
  (pods.py);
* serves the admission webhook when ``webhook_port`` is set (webhook.py);
* contends for the leadership of its watch scope (leadership.py).

The leader alone, for as long as it holds the lease:

* runs kopf, which turns Task and CronJobLock events into rows and
  schedules (handlers.py, cronjoblocks.py). kopf's documented way to embed is
  its own thread and loop -- on exit it cancels every task of its loop that
  it did not start -- so each leadership term starts kopf in a fresh thread
  (and starts it again should it stop by itself while the term lasts);
* writes Task statuses (status.py) and CronJobLock statuses;
* compares every Task object with the rows when it takes over and every
  ``reconcile_interval`` seconds (handlers.reconcile_all).

kopf peering stays on beneath the lease as a second fence (a frozen former
leader's live peering record pauses the new leader's kopf until it expires).
Each replica draws its own peering priority (equal priorities freeze every
replica) and uses a short peering lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from typing import Any

import kopf

from kubetasks.app import App
from kubetasks.config import Settings
from kubetasks.k8s import cronjoblocks, handlers, kube, leadership, opcontext, pods, status, webhook
from kubetasks.store import Store

log = logging.getLogger("kubetasks.k8s.operator")


def watch_scope(settings: Settings) -> dict[str, Any]:
    """kopf's scope: the watched namespaces, or cluster-wide."""
    if settings.watch_namespaces:
        return {"namespaces": list(settings.watch_namespaces)}
    return {"clusterwide": True}


def make_settings(settings: Settings) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    # Equal priorities freeze every replica: draw one per process unless told.
    s.peering.priority = settings.peering_priority or random.randint(1, 2**30)
    s.peering.lifetime = settings.peering_lifetime
    s.peering.mandatory = False
    s.peering.name = settings.peering_name
    s.scanning.disabled = True
    s.posting.level = logging.WARNING
    s.networking.request_timeout = 60
    s.persistence.consistency_timeout = 0
    return s


class Operator:
    def __init__(self, app: App) -> None:
        self.app = app
        self.settings = app.settings
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.leadership: leadership.Leadership | None = None

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
            self._error = exc
            log.exception("operator thread failed")

    async def _main(self) -> None:
        logging.getLogger("kopf").setLevel(self.settings.kopf_log_level.upper())
        s = self.settings
        stop = asyncio.Event()
        bridge = asyncio.create_task(self._bridge_stop(stop), name="kubetasks-operator-stop")
        # No connection at start: a database that is down must not stop the process.
        store = Store(s.database_url, min_size=0, max_size=4, pooled=s.transaction_pooled)
        await store.open()
        k = kube.Kube(instance=self.settings.pod_id)
        self.leadership = lead = leadership.Leadership(
            s.direct_url or s.database_url, leadership.scope_of(s.watch_namespaces), s.pod_id,
            s.leader_timeout, pooled=not s.direct_url,
        )  # fmt: skip
        services: dict[str, asyncio.Task[None]] = {
            "leadership": asyncio.create_task(
                lead.run(stop, lambda term_stop: self._lead(store, k, term_stop))
            )
        }
        if s.pod_selector and s.pod_namespace:
            watcher = pods.PodWatcher(store, k, s.pod_namespace, s.pod_selector)
            services["pods"] = asyncio.create_task(watcher.run(stop))
        if s.webhook_port:
            # A Task whose handler no active worker serves is admitted with a warning saying so.
            server = webhook.WebhookServer(
                s, k, lambda spec: handlers.unserved_warning(self.app, store, spec)
            )
            services["webhook"] = asyncio.create_task(server.run(stop))
        try:
            done, _ = await asyncio.wait(services.values(), return_when=asyncio.FIRST_COMPLETED)
            for name, t in services.items():
                if t in done and not stop.is_set():
                    raise RuntimeError(f"operator service {name} ended unexpectedly") from t.exception()
        finally:
            stop.set()
            await asyncio.wait(services.values(), timeout=25)
            self._stop.set()  # also ends the bridge's thread when a service failed
            bridge.cancel()
            lead.close()
            await store.close()

    async def _bridge_stop(self, stop: asyncio.Event) -> None:
        """The process's stop (a threading.Event) as this loop's asyncio.Event."""
        await asyncio.to_thread(self._stop.wait)
        stop.set()

    async def _lead(self, store: Store, k: kube.Kube, term_stop: asyncio.Event) -> None:
        """What the leader runs, until ``term_stop``."""
        s = self.settings
        assert self.leadership is not None
        ctx = opcontext.OperatorContext(
            app=self.app, store=store, kube=k, namespaces=s.watch_namespaces, fence=self.leadership.valid
        )
        writer = status.StatusWriter(
            ctx, s.direct_url, resync_every=s.status_resync_interval, poll_every=s.poll_interval
        )
        refresher = cronjoblocks.CronStatusRefresher(ctx)
        jobs = [
            asyncio.create_task(self._kopf(term_stop), name="kubetasks-kopf"),
            asyncio.create_task(writer.run(term_stop), name="kubetasks-status-writer"),
            asyncio.create_task(refresher.run(term_stop), name="kubetasks-cron-status"),
            asyncio.create_task(self._reconcile(ctx, term_stop), name="kubetasks-reconcile"),
        ]
        try:
            done, _ = await asyncio.wait([*jobs, asyncio.ensure_future(term_stop.wait())],
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            for t in jobs:
                if t in done and not term_stop.is_set():
                    raise RuntimeError(f"{t.get_name()} ended while leading") from t.exception()
        finally:
            term_stop.set()
            await asyncio.wait(jobs, timeout=15)
            for t in jobs:
                t.cancel()

    async def _reconcile(self, ctx: opcontext.OperatorContext, stop: asyncio.Event) -> None:
        """Objects against rows: when the term starts, then every ``reconcile_interval`` s."""
        delay = self.settings.reconcile_interval
        while not stop.is_set():
            try:
                counts = await handlers.reconcile_all(ctx)
                if counts["ingested"] or counts["cancelled"]:
                    log.info("reconciled Task objects with rows: %s", counts)
                delay = self.settings.reconcile_interval
            except opcontext.NotLeading:
                return
            except Exception as exc:
                if not handlers.is_retryable(exc):
                    log.exception("reconciling Task objects failed")
                else:
                    log.warning("reconciling Task objects failed (%r); again shortly", exc)
                delay = min(self.settings.reconcile_interval, 2.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _kopf(self, term_stop: asyncio.Event) -> None:
        """kopf in a fresh thread for this term; started again if it stops by itself."""
        while not term_stop.is_set():
            flag = threading.Event()
            run = threading.Thread(target=self._kopf_thread, args=(flag,), name="kubetasks-kopf", daemon=True)
            run.start()
            while run.is_alive() and not term_stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(term_stop.wait(), 0.5)
            flag.set()
            await asyncio.to_thread(run.join, 15)
            if not term_stop.is_set():
                log.error("kopf stopped while this process leads; starting it again")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(term_stop.wait(), 2.0)

    def _kopf_thread(self, flag: threading.Event) -> None:
        try:
            asyncio.run(self._kopf_main(flag))
        except BaseException as exc:
            if not (flag.is_set() and isinstance(exc, asyncio.CancelledError)):
                log.exception("kopf failed")

    async def _kopf_main(self, flag: threading.Event) -> None:
        s = self.settings
        assert self.leadership is not None
        store = Store(s.database_url, min_size=0, max_size=4, pooled=s.transaction_pooled)
        await store.open()
        ctx = opcontext.OperatorContext(
            app=self.app,
            store=store,
            kube=kube.Kube(instance=self.settings.pod_id),
            namespaces=s.watch_namespaces,
            fence=self.leadership.valid,
        )
        registry = kopf.OperatorRegistry()
        handlers.register(registry, ctx)
        try:
            await kopf.operator(
                registry=registry, settings=make_settings(s), stop_flag=flag, **watch_scope(s)
            )
        finally:
            for t in ctx.ttl_timers.values():
                t.cancel()
            await store.close()
