"""Metric definitions, the scrape-time collector and the readiness cache, without a database or a socket
(the probe server over real HTTP: tests/integration/test_probes.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetasks import metrics
from kubetasks.health import HealthServer
from kubetasks.leases import LeaseStats
from tests.fakes import FakeStore, FakeWorker


def scrape(collector: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry_for(collector, process=False)).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_record_outcome_counts_by_kind() -> None:
    def get(name: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, {"handler": "u.h", "queue": "uq"}) or 0.0

    names = ("succeeded", "failed", "retried", "timed_out")
    before = {n: get(f"kubetasks_tasks_{n}_total") for n in names}
    metrics.record_outcome("u.h", "uq", "succeeded", False)
    metrics.record_outcome("u.h", "uq", "retried", True)
    metrics.record_outcome("u.h", "uq", "failed", False)
    metrics.record_outcome("u.h", "uq", "timeout", True)  # a timeout with attempts left: retried
    metrics.record_outcome("u.h", "uq", "timeout", False)  # the last attempt timed out: failed
    assert get("kubetasks_tasks_succeeded_total") - before["succeeded"] == 1
    assert get("kubetasks_tasks_retried_total") - before["retried"] == 2
    assert get("kubetasks_tasks_failed_total") - before["failed"] == 2
    assert get("kubetasks_tasks_timed_out_total") - before["timed_out"] == 2


def test_task_series_are_what_a_counter_and_a_histogram_would_write() -> None:
    """The per-(handler, queue) counts, kept as plain numbers, are scraped as the series a
    prometheus_client Counter and Histogram fed the same events write (their _created aside)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    ref = CollectorRegistry()
    claimed = Counter("kubetasks_tasks_claimed", "x", ("handler", "queue"), registry=ref)
    run = Histogram(
        "kubetasks_task_run_duration_seconds",
        "x",
        ("handler",),
        buckets=metrics._DURATION_BUCKETS,
        registry=ref,
    )
    durations = [0.0, 0.001, 0.0011, 0.003, 0.25, 0.2500001, 7.0, 600.0, 601.0, 1e6]
    for queue in ("qa", "qb"):
        for d in durations:
            c = metrics.task_counters("eq.h", queue)
            c.claimed += 1
            c.run.observe(d)
            claimed.labels("eq.h", queue).inc()
            run.labels("eq.h").observe(d)

    def samples(reg: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(generate_latest(reg).decode())
            for s in fam.samples
            if s.labels.get("handler") == "eq.h"
            and not s.name.endswith("_created")
            and fam.name in ("kubetasks_tasks_claimed", "kubetasks_task_run_duration_seconds")
        }

    want = samples(ref)
    assert len(want) == 2 + len(metrics._DURATION_BUCKETS) + 3
    assert samples(metrics.REGISTRY) == want


def test_metric_names_are_prefixed_and_registry_is_our_own() -> None:
    from prometheus_client import REGISTRY as DEFAULT

    names = {fam.name for fam in metrics.REGISTRY.collect()}
    assert names >= {
        "kubetasks_lock_acquisitions",
        "kubetasks_cron_ticks",
        "kubetasks_claim_duration_seconds",
    }
    assert all(n.startswith("kubetasks_") for n in names)
    assert not names & {fam.name for fam in DEFAULT.collect()}


async def test_collector_reads_worker_lease_and_queues() -> None:
    w = FakeWorker()
    w.stats.fenced_out = 2
    w.running_attempts = 2
    assert w.lease is not None
    w.lease.stats = LeaseStats(renewals=7, failures=1, reaped_tasks=3, last_latency_s=0.004)
    q = metrics.QueueStats()
    assert w.opened_store is not None
    w.opened_store.depths = [{"queue": "default", "pending": 5, "due": 2, "oldest_due_age_s": 1.5}]
    w.opened_store.served = [{"queue": "default", "handler": "a.b"}]
    w.opened_store.unserved = [{"queue": "default", "handler": "x.y", "tasks": 3}]
    await q.refresh(w.opened_store)  # type: ignore[arg-type]
    m = scrape(metrics.WorkerCollector(w, q))  # type: ignore[arg-type]
    assert m[("kubetasks_fenced_out_writes_total", ())] == 2
    assert m[("kubetasks_tasks_running", ())] == 2
    assert m[("kubetasks_worker_slots", ())] == 4
    assert m[("kubetasks_tasks_recovered_total", ())] == 3
    assert m[("kubetasks_lease_renewals_total", ())] == 7
    assert m[("kubetasks_lease_renewal_failures_total", ())] == 1
    assert m[("kubetasks_lease_renewal_latency_seconds", ())] == 0.004
    assert m[("kubetasks_lease_live", ())] == 1
    assert m[("kubetasks_queue_pending_tasks", (("queue", "default"),))] == 5
    assert m[("kubetasks_queue_due_tasks", (("queue", "default"),))] == 2
    assert m[("kubetasks_queue_oldest_pending_age_seconds", (("queue", "default"),))] == 1.5
    assert m[("kubetasks_queue_pending_tasks", (("queue", "images"),))] == 0  # served and empty
    assert m[("kubetasks_unserved_tasks", (("handler", "x.y"), ("queue", "default")))] == 3
    assert [u.message for u in q.unserved] == [
        "no active worker serves handler 'x.y' in queue 'default'; served: a.b"
    ]
    assert m[("kubetasks_queue_stats_up", ())] == 1


async def test_queue_stats_are_cached_and_failures_hide_the_figures() -> None:
    store = FakeStore(depths=[{"queue": "a", "pending": 1, "due": 1, "oldest_due_age_s": None}])
    q = metrics.QueueStats(ttl=0.2)
    await asyncio.gather(*(q.refresh(store) for _ in range(5)))  # type: ignore[arg-type]
    await q.refresh(store)  # type: ignore[arg-type]
    assert store.calls["metrics_queue_depths"] == 1
    await asyncio.sleep(0.25)
    store.error = OSError("connection refused")
    await q.refresh(store)  # type: ignore[arg-type]
    assert store.calls["metrics_queue_depths"] == 2
    assert not q.ok and q.depths == [] and q.error is not None and "refused" in q.error
    m = scrape(metrics.WorkerCollector(FakeWorker(), q))  # type: ignore[arg-type]
    assert m[("kubetasks_queue_stats_up", ())] == 0
    assert not any(name == "kubetasks_queue_pending_tasks" for name, _ in m)


async def test_loop_monitor_sees_a_blocked_loop() -> None:
    mon = metrics.LoopMonitor(interval=0.05)
    stop = asyncio.Event()
    t = asyncio.create_task(mon.run(stop))
    await asyncio.sleep(0.01)
    time.sleep(0.2)  # block the loop on purpose
    await asyncio.sleep(0.1)
    stop.set()
    await t
    assert mon.max_lag_s >= 0.1
    assert mon.since_tick() < 1


async def test_readiness_is_cached() -> None:
    w = FakeWorker()
    server = HealthServer(w, db_cache_s=1.0)  # type: ignore[arg-type]
    for _ in range(5):
        assert (await server.check_db()).ok
    assert w.opened_store is not None and w.opened_store.calls["health_applied_migrations"] == 1
