"""The history checker: what ran (the apps' history file) against what the database accepted.

Three sources, all real:

* the history file the scenario apps append to: every handler start and end
  as (task, attempt, worker, pod, pid, time);
* ``faultcheck.transitions``, filled by a trigger installed in the scenario's
  database (only there, never in the schema): every change of a task's status,
  attempt or worker, committed in the same transaction as the change, so it is
  exactly the history the database accepted;
* a ``Sampler`` reading the database while the faults happen: tasks running
  under a worker that is no longer active, and every final status it saw (a
  final status that later disappears -- a failover that lost a commit -- is a
  lost outcome).

`judge` turns them into the five figures every scenario asserts to be 0:

lost
    an acknowledged enqueue with no final status once the faults stopped and
    the deadline passed, or missing altogether, or a final status the sampler
    saw that the database no longer holds;
duplicates
    tasks with outcomes accepted from two runs: two terminal outcomes (a
    success or a failure), or two outcomes of one attempt;
started_twice
    (task, attempt) pairs started twice, by the history file or by the claims
    the database made (a fencing token handed out twice), except a run handed
    back by a graceful shutdown, which keeps its attempt number by design;
stale_running
    (task, attempt) seen ``running`` under a dead or superseded worker for
    longer than the lease TTL after it stopped;
attempts_spent
    attempts counted (worker lost, retried, failed, timed out) against a
    worker whose process did not die -- except the workers a scenario cut off
    or stopped on purpose (the single-worker partition and SIGSTOP), whose
    attempts count by design.

Beside them, two more are always asserted: ``phantom`` (an accepted success
that is not a run which ended on that worker with that attempt) and
``zombie_accepted`` (an outcome of a worker committed after the commit that
declared it dead or superseded: its late writes must be refused). Extras
are reported (deadlocks, live workers declared dead, registrations per pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

FINAL = ("succeeded", "failed", "cancelled")
HANDLER_OUTCOMES = ("retried", "failed", "timeout")
SPENT = ("worker_lost", *HANDLER_OUTCOMES)
GRACEFUL_REASON = "graceful shutdown"
FIGURES = ("lost", "duplicates", "started_twice", "stale_running", "attempts_spent")

INSTRUMENT = """
CREATE SCHEMA faultcheck;
CREATE TABLE faultcheck.transitions (
    seq         bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    task_id     bigint NOT NULL,
    handler     text NOT NULL,
    old_status  text NOT NULL,
    new_status  text NOT NULL,
    old_attempt integer NOT NULL,
    new_attempt integer NOT NULL,
    old_worker  uuid,
    new_worker  uuid
);
CREATE FUNCTION faultcheck.record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO faultcheck.transitions
        (task_id, handler, old_status, new_status, old_attempt, new_attempt, old_worker, new_worker)
    VALUES (NEW.id, NEW.handler, OLD.status, NEW.status, OLD.attempt, NEW.attempt,
            OLD.worker_id, NEW.worker_id);
    RETURN NULL;
END;
$$;
CREATE TRIGGER faultcheck_transitions AFTER UPDATE ON kubetasks.tasks FOR EACH ROW
    WHEN ((OLD.status, OLD.attempt, OLD.worker_id) IS DISTINCT FROM (NEW.status, NEW.attempt, NEW.worker_id))
    EXECUTE FUNCTION faultcheck.record();
CREATE TABLE faultcheck.worker_stops (worker_id uuid NOT NULL, status text NOT NULL);
CREATE FUNCTION faultcheck.record_stop() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO faultcheck.worker_stops VALUES (NEW.worker_id, NEW.status);
    RETURN NULL;
END;
$$;
CREATE TRIGGER faultcheck_worker_stops AFTER UPDATE ON kubetasks.workers FOR EACH ROW
    WHEN (OLD.status IN ('active', 'stopping') AND NEW.status NOT IN ('active', 'stopping'))
    EXECUTE FUNCTION faultcheck.record_stop();
"""

# A fault, not a check: claims by the workers of pods listed in faultcheck.slow_claims commit
# ``delay_s`` late (an I/O stall at commit time). The claim statement itself -- with its lease
# check -- runs at full speed; the sleep happens at COMMIT, in a deferred trigger, once per
# transaction, with the claimed rows locked, exactly like a commit waiting on a slow disk.
SLOW_CLAIMS = """
CREATE TABLE faultcheck.slow_claims (pod_id text PRIMARY KEY, delay_s float8 NOT NULL);
CREATE SEQUENCE faultcheck.claims_slowed;  -- counts even a claim that then rolls back
CREATE FUNCTION faultcheck.slow_claim() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d float8;
BEGIN
    SELECT s.delay_s INTO d FROM faultcheck.slow_claims s WHERE s.pod_id = NEW.pod_id;
    IF d IS NOT NULL AND current_setting('faultcheck.slept', true) IS DISTINCT FROM txid_current()::text THEN
        PERFORM set_config('faultcheck.slept', txid_current()::text, true);
        PERFORM nextval('faultcheck.claims_slowed');
        PERFORM pg_sleep(d);
    END IF;
    RETURN NULL;
END;
$$;
CREATE CONSTRAINT TRIGGER faultcheck_slow_claim AFTER UPDATE ON kubetasks.tasks
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.status = 'pending' AND NEW.status = 'running')
    EXECUTE FUNCTION faultcheck.slow_claim();
"""

STALE_SQL = """
SELECT t.id, t.attempt, t.worker_id::text AS w, w.status AS ws,
       extract(epoch FROM now() - coalesce(s.ts, w.stopped_at))::float8 AS stopped_for
FROM kubetasks.tasks t
JOIN kubetasks.workers w ON w.worker_id = t.worker_id
LEFT JOIN LATERAL (SELECT min(pg_xact_commit_timestamp(x.xmin)) AS ts
                   FROM faultcheck.worker_stops x WHERE x.worker_id = t.worker_id) s ON true
WHERE t.status = 'running' AND w.status NOT IN ('active', 'stopping')
  AND coalesce(s.ts, w.stopped_at) < now() - make_interval(secs => $1)
"""


async def install(conn: asyncpg.Connection) -> None:
    await conn.execute(INSTRUMENT)


@dataclass
class Run:
    kind: str
    task: int
    attempt: int
    worker: str
    pod: str
    pid: int
    at: float


def read_history(path: Path) -> list[Run]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        kind, task, attempt, worker, pod, pid, at = line.split()
        out.append(Run(kind, int(task), int(attempt), worker, pod, int(pid), float(at)))
    return out


class Sampler:
    """Reads the database every ``interval`` seconds until stopped; survives the database going away."""

    def __init__(self, url: str, ttl: float, interval: float = 0.25) -> None:
        self.url = url
        self.ttl = ttl
        self.interval = interval
        self.stale: dict[tuple[int, int], dict[str, Any]] = {}
        self.seen_final: dict[int, str] = {}
        self.samples = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="faults-sampler")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def sample(self, conn: asyncpg.Connection) -> None:
        for r in await conn.fetch(STALE_SQL, self.ttl):
            self.stale.setdefault((r["id"], r["attempt"]), dict(r))
        for r in await conn.fetch(
            "SELECT id, status FROM kubetasks.tasks WHERE status = ANY($1::text[])", list(FINAL)
        ):
            self.seen_final.setdefault(r["id"], r["status"])
        self.samples += 1

    async def _run(self) -> None:
        conn: asyncpg.Connection | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.url, timeout=2, command_timeout=2)
                await self.sample(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                self.failures += 1
                if conn is not None:
                    conn.terminate()
                conn = None
                del exc
            except asyncpg.InternalClientError:
                self.failures += 1
                conn = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)


@dataclass
class Exemption:
    """Attempts charged to workers of ``pid`` registered before ``until`` (database time) count by design."""

    pid: int
    until: dt.datetime
    why: str


@dataclass
class Figures:
    lost: int = 0
    duplicates: int = 0
    started_twice: int = 0
    stale_running: int = 0
    attempts_spent: int = 0
    phantom: int = 0
    zombie_accepted: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def five(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in FIGURES}

    def failing(self) -> dict[str, str]:
        """Each non-zero asserted figure, with examples."""
        return {
            k: f"{k}={getattr(self, k)}: {self.details.get(k)}"
            for k in (*FIGURES, "phantom", "zombie_accepted")
            if getattr(self, k)
        }


def _sample(items: Any, n: int = 8) -> list[Any]:
    return sorted(items)[:n]


async def judge(
    conn: asyncpg.Connection,
    *,
    acked: set[int],
    history: Path,
    sampler: Sampler,
    ttl: float,
    died_pids: set[int],
    exemptions: list[Exemption],
    deadlocks_before: int,
) -> Figures:
    f = Figures()
    runs = read_history(history)
    tasks = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT id, status, attempt, worker_id::text AS w, handler FROM kubetasks.tasks"
        )
    }
    trans = await conn.fetch(
        "SELECT task_id, handler, old_status, new_status, old_attempt, new_attempt, "
        "old_worker::text AS ow, new_worker::text AS nw, at, pg_xact_commit_timestamp(xmin) AS cts "
        "FROM faultcheck.transitions ORDER BY seq"
    )
    attempts = await conn.fetch(
        "SELECT task_id, attempt, worker_id::text AS w, outcome, error, "
        "pg_xact_commit_timestamp(xmin) AS cts FROM kubetasks.task_attempts ORDER BY id"
    )
    workers = await conn.fetch(
        "SELECT worker_id::text AS w, pod_id, pid, status, stop_reason, started_at, stopped_at "
        "FROM kubetasks.workers"
    )

    # -- lost --------------------------------------------------------------
    missing = {i for i in acked if i not in tasks}
    unfinished = {i for i in acked if i in tasks and tasks[i]["status"] not in FINAL}
    regressed = {i for i in sampler.seen_final if i not in tasks or tasks[i]["status"] not in FINAL}
    lost = missing | unfinished | regressed
    f.lost = len(lost)
    f.details["lost"] = {
        "missing": _sample(missing),
        "unfinished": [(i, tasks[i]["status"], tasks[i]["attempt"]) for i in _sample(unfinished)],
        "final_then_not": _sample(regressed),
    }

    # -- accepted duplicates ----------------------------------------------
    accepted: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for t in trans:
        if t["old_status"] == "running" and t["new_status"] == "succeeded":
            accepted[t["task_id"]].append((t["old_attempt"], "succeeded"))
    for a in attempts:
        if a["outcome"] in HANDLER_OUTCOMES:
            accepted[a["task_id"]].append((a["attempt"], a["outcome"]))
    dups = {}
    for tid, outs in accepted.items():
        terminal = [o for o in outs if o[1] in ("succeeded", "failed")]
        per_attempt = Counter(a for a, _ in outs)
        if len(terminal) > 1 or any(n > 1 for n in per_attempt.values()):
            dups[tid] = outs
    f.duplicates = len(dups)
    f.details["duplicates"] = {k: dups[k] for k in _sample(dups)}

    # -- (task, attempt) started twice ------------------------------------
    graceful = {(a["task_id"], a["attempt"]) for a in attempts if a["error"] == GRACEFUL_REASON}
    starts = Counter((r.task, r.attempt) for r in runs if r.kind == "start")
    claims = Counter(
        (t["task_id"], t["new_attempt"])
        for t in trans
        if t["new_status"] == "running" and t["old_status"] != "running"
    )
    twice_run = {k for k, n in starts.items() if n > 1} - graceful
    twice_claim = {k for k, n in claims.items() if n > 1} - graceful
    f.started_twice = len(twice_run | twice_claim)
    by_pair: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)
    for r in runs:
        if r.kind == "start" and (r.task, r.attempt) in twice_run:
            by_pair[(r.task, r.attempt)].append((r.worker[:8], r.pid))
    f.details["started_twice"] = {
        "runs": {k: by_pair[k] for k in _sample(by_pair)},
        "claims_of_one_attempt": _sample(twice_claim),
    }

    # -- running under a non-active worker past the TTL -------------------
    for r in await conn.fetch(STALE_SQL, ttl):
        sampler.stale.setdefault((r["id"], r["attempt"]), dict(r))
    f.stale_running = len(sampler.stale)
    f.details["stale_running"] = [
        (k, v["ws"], round(v["stopped_for"], 1)) for k, v in sorted(sampler.stale.items())[:8]
    ]

    # -- attempts spent without a process death -----------------------------
    excused: dict[str, str] = {}
    for w in workers:
        if w["pid"] in died_pids:
            excused[w["w"]] = "killed"
        for e in exemptions:
            if w["pid"] == e.pid and w["started_at"] <= e.until:
                excused[w["w"]] = e.why
    spent = [a for a in attempts if a["outcome"] in SPENT and a["w"] not in excused]
    f.attempts_spent = len(spent)
    pods = {w["w"]: w["pod_id"] for w in workers}
    f.details["attempts_spent"] = Counter(
        f"{a['outcome']}: {a['error']}"[:100] + f" [worker of {pods.get(a['w'])}]" for a in spent
    ).most_common(5)
    f.extra["attempts_excused"] = sum(1 for a in attempts if a["outcome"] in SPENT and a["w"] in excused)

    # -- an accepted success that no run of that attempt and worker ended ----
    ends = {(r.task, r.attempt, r.worker) for r in runs if r.kind == "end"}
    phantom = {
        i for i, t in tasks.items() if t["status"] == "succeeded" and (i, t["attempt"], t["w"]) not in ends
    }
    f.phantom = len(phantom)
    f.details["phantom"] = _sample(phantom)

    # -- an outcome accepted from a worker already declared dead or superseded ----
    # Compared by commit time (track_commit_timestamp): a write that passed its fence before
    # the death holds the row the death must release, so it always commits first.
    died_at = {
        r["w"]: r["ts"]
        for r in await conn.fetch(
            "SELECT worker_id::text AS w, min(pg_xact_commit_timestamp(xmin)) AS ts "
            "FROM faultcheck.worker_stops GROUP BY worker_id"
        )
    }
    late = dt.timedelta(milliseconds=10)
    zombie = {
        (t["task_id"], t["old_attempt"])
        for t in trans
        if t["old_status"] == "running"
        and t["new_status"] == "succeeded"
        and t["ow"] in died_at
        and t["cts"] > died_at[t["ow"]] + late
    } | {
        (a["task_id"], a["attempt"])
        for a in attempts
        if a["outcome"] in HANDLER_OUTCOMES and a["w"] in died_at and a["cts"] > died_at[a["w"]] + late
    }
    f.zombie_accepted = len(zombie)
    f.details["zombie_accepted"] = _sample(zombie)

    # -- extras --------------------------------------------------------------
    deadlocks = await conn.fetchval(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    )
    f.extra["deadlocks"] = int(deadlocks or 0) - deadlocks_before
    declared = [w for w in workers if w["stop_reason"] == "lease expired" and w["w"] not in excused]
    f.extra["live_declared_dead"] = len(declared)
    f.details["live_declared_dead"] = [(w["pod_id"], w["w"][:8], str(w["stopped_at"])) for w in declared[:8]]
    f.extra["registrations_per_pod_max"] = max(Counter(w["pod_id"] for w in workers).values(), default=0)
    f.extra["tasks"] = len(acked)
    f.extra["runs"] = sum(1 for r in runs if r.kind == "start")
    f.extra["failed"] = sum(1 for i in acked if i in tasks and tasks[i]["status"] == "failed")
    f.extra["sampler"] = f"{sampler.samples} ok/{sampler.failures} failed"
    f.details["transitions"] = trans  # for scenario-specific checks (not printed)
    f.details["workers"] = workers
    return f
