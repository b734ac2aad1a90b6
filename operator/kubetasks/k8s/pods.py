"""This release's pods: a deleted or failed pod's workers are declared dead at once.

Every replica watches the pods of its own release (the Deployment's label
selector, in its own namespace), so a pod deleted while the operator has no
leader is still seen, and a replica coming up compares a fresh listing with
the workers registered under that selector (a deletion while no replica ran
produced no event anyone saw). Recovery acts only on workers whose pod this
selector matches: another release sharing the namespace and the database
registers its workers under its own selector, and they are never touched.

The watch runs in a daemon thread of its own (the client is synchronous and
a watch blocks for its whole timeout), handing events to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubetasks.k8s.kube import Kube
from kubetasks.store import DB_ERRORS, Store, objects, workers

log = logging.getLogger("kubetasks.k8s.pods")


class PodWatcher:
    def __init__(self, store: Store, kube: Kube, namespace: str, selector: str) -> None:
        self.store = store
        self.kube = kube
        self.namespace = namespace
        self.selector = selector
        self.released = 0

    async def release(self, pod: str, reason: str) -> int:
        """Declare this release's live workers of ``pod`` dead and hand their tasks back."""
        n = 0
        # One transaction: a worker declared dead never keeps tasks running.
        async with self.store.transaction() as conn:
            dead = await objects.workers_of_pod_dead(
                self.store,
                pod=pod,
                namespace=self.namespace,
                selector=self.selector,
                reason=reason,
                conn=conn,
            )
            for w in dead:
                n += await workers.release_worker(
                    self.store,
                    worker_id=w["worker_id"],
                    mode="lost",
                    reason=f"worker lost: {reason}",
                    conn=conn,
                )
        if n:
            log.warning("%s: released %d of its tasks", reason, n)
        self.released += n
        return n

    async def reconcile(self, workers: list[Any], pods: list[dict[str, Any]]) -> None:
        """Workers of this release whose pod is not in the listing, or failed, are dead.

        ``workers`` must be read before the pods are listed: a worker that
        registers after the listing has a pod the listing may not show yet."""
        listed = {p["name"]: p["phase"] for p in pods}
        for w in workers:
            pod = w["pod_id"]
            if pod not in listed:
                await self.release(pod, f"pod {pod} no longer exists")
            elif listed[pod] == "Failed":
                await self.release(pod, f"pod {pod} failed")

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                live = await objects.live_workers_of_release(
                    self.store, namespace=self.namespace, selector=self.selector
                )
                pods, rv = await self.kube.list_pods(self.namespace, self.selector)
                await self.reconcile(live, pods)
                delay = 0.5
                await self._watch(rv, stop)
            except (ApiException, *DB_ERRORS) as exc:
                log.warning(
                    "pod watch of %s (%s) failed (%r); listing again", self.namespace, self.selector, exc
                )
            except Exception as exc:
                if type(exc).__module__.startswith("urllib3"):
                    log.warning("pod watch of %s interrupted (%r); listing again", self.namespace, exc)
                else:
                    raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 10.0)

    async def _watch(self, rv: str, stop: asyncio.Event) -> None:
        """Follow events from ``rv`` until an error (the caller lists again) or ``stop``."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, str, str | None] | BaseException | None] = asyncio.Queue()
        halt = threading.Event()

        def pump(since: str) -> None:
            try:
                while not halt.is_set():
                    for item in self.kube.watch_pods(self.namespace, self.selector, since, halt):
                        loop.call_soon_threadsafe(queue.put_nowait, item[:3])
                        since = item[3]
            except BaseException as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            else:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=pump, args=(rv,), name="kubetasks-pod-watch", daemon=True).start()
        try:
            while not stop.is_set():
                getter = asyncio.ensure_future(queue.get())
                stopper = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if getter not in done:
                    getter.cancel()
                    return
                item = getter.result()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                kind, name, phase = item
                if kind == "DELETED":
                    await self.release(name, f"pod {name} was deleted")
                elif phase == "Failed":
                    await self.release(name, f"pod {name} failed")
        finally:
            halt.set()
