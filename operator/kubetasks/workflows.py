"""Workflows: a handler spawns children and waits for them without holding a worker.

How it runs (replay): ``await task.wait(children)`` returns the children's
results when they have all ended. Until then it raises ``Suspend``; the worker
writes the task ``suspended`` with its attempt handed back, frees the slot and
the lease, and the child whose end completes the wait puts the parent back to
``pending`` (a trigger, in the same transaction as the child's end). The
handler then runs again *from the top*: ``spawn`` is idempotent per (parent,
spawn key) -- the n-th spawn of a run gets key ``#n`` unless given one -- so
the replay gets the same children back, already ended, and ``wait`` returns.
Hence a workflow handler must spawn the same children in the same order on
every run, and keep side effects before its last ``wait`` idempotent.

Failure policy per ``wait``: ``fail_fast`` (default) wakes the parent at the
first child that fails or is cancelled, cancels the other unfinished children
it waits for, and raises ``ChildFailed`` (a ``Fail``: the parent fails without
a retry, since a retry would find the same failed child); ``collect`` waits for
all and returns a ``ChildFailed`` instance in place of each failed child's
result, like ``asyncio.gather(..., return_exceptions=True)``.

The rest of this module is pure: the summary of a workflow tree (counts, total
and wall time, retries, critical path) from the rows ``workflow_tasks`` returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetasks.errors import Fail
from kubetasks.statuses import FINISHED

POLICIES = ("fail_fast", "collect")
TERMINAL = frozenset(FINISHED)


class Suspend(BaseException):
    """Raised by ``TaskContext.wait`` while children are unfinished; the worker catches it.

    A BaseException, so a handler's ``except Exception`` does not swallow it.
    """

    def __init__(self, child_ids: Sequence[int], policy: str) -> None:
        self.child_ids = list(child_ids)
        self.policy = policy
        super().__init__(f"waiting for {len(self.child_ids)} child task(s)")


class ChildFailed(Fail):
    """A child task that a parent waited for ended without success."""

    def __init__(self, child_id: int, handler: str, status: str, error: str | None) -> None:
        self.child_id = child_id
        self.handler = handler
        self.status = status
        self.error = error
        super().__init__(f"child task {child_id} ({handler}) {status}: {error or 'no error recorded'}")


# -- summary -------------------------------------------------------------


@dataclass
class WorkflowNode:
    """One task of a workflow tree; ``run_s`` is the time it spent running (all its runs)."""

    id: int
    parent_id: int | None
    handler: str
    status: str
    attempt: int  # the latest run's number
    run_s: float
    created_at: datetime
    finished_at: datetime | None
    started_at: datetime | None = None
    queue: str = ""
    spawn_key: str | None = None
    error: str | None = None
    progress: int | None = None
    progress_message: str | None = None
    runs: int = 0
    depth: int = 0
    children: list[WorkflowNode] = field(default_factory=list)
    on_critical_path: bool = False
    uncharged: int = 0  # runs that did not count as attempts (suspensions, graceful releases)

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> WorkflowNode:
        return cls(
            id=int(r["id"]),
            parent_id=None if r.get("parent_id") is None else int(r["parent_id"]),
            handler=r["handler"],
            status=r["status"],
            attempt=int(r.get("attempt") or 0),
            uncharged=int(r.get("uncharged") or 0),
            run_s=float(r.get("run_s") or 0.0),
            created_at=r["created_at"],
            finished_at=r.get("finished_at"),
            started_at=r.get("started_at"),
            queue=r.get("queue") or "",
            spawn_key=r.get("spawn_key"),
            error=r.get("error"),
            progress=r.get("progress"),
            progress_message=r.get("progress_message"),
            runs=int(r.get("runs") or 0),
            depth=int(r.get("depth") or 0),
        )

    def walk(self) -> Iterator[WorkflowNode]:
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def child_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.children:
            counts[c.status] = counts.get(c.status, 0) + 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent_id": self.parent_id,
            "handler": self.handler,
            "queue": self.queue,
            "status": self.status,
            "attempt": self.attempt,
            "runs": self.runs,
            "run_s": round(self.run_s, 6),
            "spawn_key": self.spawn_key,
            "error": self.error,
            "progress": self.progress,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "on_critical_path": self.on_critical_path,
            "children": [c.to_dict() for c in self.children],
        }


@dataclass
class WorkflowSummary:
    """A workflow at a glance.

    ``total_s`` sums every task's running time; ``wall_s`` runs from the root's
    creation to its end (or now). ``retries`` counts attempts spent beyond the
    first (suspensions and graceful releases hand theirs back). The critical
    path is the chain of dependent tasks with the largest summed running time
    (see ``critical_path``).
    """

    root: WorkflowNode
    counts: dict[str, int]
    tasks: int
    total_s: float
    wall_s: float
    retries: int
    critical_path: list[int]
    critical_path_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "root_id": self.root.id,
            "tasks": self.tasks,
            "counts": self.counts,
            "total_s": round(self.total_s, 6),
            "wall_s": round(self.wall_s, 6),
            "retries": self.retries,
            "critical_path": self.critical_path,
            "critical_path_s": round(self.critical_path_s, 6),
            "tree": self.root.to_dict(),
        }


def build_tree(rows: Sequence[Mapping[str, Any]]) -> WorkflowNode:
    """Nodes linked parent to children; the first row is the root, children in id order."""
    if not rows:
        raise ValueError("a workflow has at least its root task")
    nodes = [WorkflowNode.from_row(r) for r in rows]
    by_id = {n.id: n for n in nodes}
    root = nodes[0]
    for n in sorted(nodes[1:], key=lambda n: n.id):
        parent = by_id.get(n.parent_id) if n.parent_id is not None else None
        if parent is not None:
            parent.children.append(n)
    return root


def critical_path(root: WorkflowNode) -> tuple[float, list[int]]:
    """The longest chain of dependent running times, from the root down.

    A task depends on its parent (which spawned it); a child depends on a
    sibling that ended no later than the child was created -- the parent waited
    for that sibling before spawning it. So the value of a task is its own
    running time plus the largest sum over a chain of its children, each
    counted with its own value, recursively. Ties go to the earlier-created
    (then lower-id) task. Returns (seconds, task ids: each task followed by
    the path through its chain of children, in order).
    """
    value: dict[int, float] = {}
    path: dict[int, list[int]] = {}
    order = list(root.walk())
    for node in reversed(order):  # children before parents
        kids = sorted(node.children, key=lambda c: (c.created_at, c.id))
        ended = sorted((c for c in kids if c.finished_at is not None), key=lambda c: (c.finished_at, c.id))
        dp: dict[int, tuple[float, int | None]] = {}
        best: tuple[float, int | None] = (0.0, None)
        i = 0
        for c in kids:
            while i < len(ended) and ended[i].finished_at <= c.created_at:  # type: ignore[operator]
                x = ended[i]
                i += 1
                if x.id in dp and dp[x.id][0] > best[0]:
                    best = (dp[x.id][0], x.id)
            dp[c.id] = (value[c.id] + best[0], best[1])
        chain: list[int] = []
        total = 0.0
        if kids:
            j = max(range(len(kids)), key=lambda k: (dp[kids[k].id][0], -k))
            total = dp[kids[j].id][0]
            cur: int | None = kids[j].id
            while cur is not None:
                chain.append(cur)
                cur = dp[cur][1]
            chain.reverse()
        value[node.id] = node.run_s + total
        path[node.id] = [node.id] + [t for c in chain for t in path[c]]
    return value[root.id], path[root.id]


def summarize(rows: Sequence[Mapping[str, Any]], now: datetime | None = None) -> WorkflowSummary:
    """The summary of the tree whose root is ``rows[0]`` (``workflow_tasks`` order)."""
    root = build_tree(rows)
    nodes = list(root.walk())
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n.status] = counts.get(n.status, 0) + 1
    cp_s, cp = critical_path(root)
    on_path = set(cp)
    for n in nodes:
        n.on_critical_path = n.id in on_path
    end = root.finished_at or now or rows[0].get("db_now") or root.created_at
    return WorkflowSummary(
        root=root,
        counts=dict(sorted(counts.items())),
        tasks=len(nodes),
        total_s=sum(n.run_s for n in nodes),
        wall_s=max(0.0, (end - root.created_at).total_seconds()),
        retries=sum(max(0, n.attempt - n.uncharged - 1) for n in nodes),
        critical_path=cp,
        critical_path_s=cp_s,
    )


def label(node: WorkflowNode) -> str:
    """One line for a tree view: id, handler, status, time, progress, children's counts."""
    parts = [f"#{node.id} {node.handler}", node.status, f"{node.run_s:.3f}s"]
    if node.progress is not None and node.status not in TERMINAL:
        parts.append(f"{node.progress}%" + (f" {node.progress_message}" if node.progress_message else ""))
    if node.children:
        counts = ", ".join(f"{n} {s}" for s, n in node.child_counts().items())
        parts.append(f"[{len(node.children)} children: {counts}]")
    if node.error and node.status in ("failed", "cancelled"):
        parts.append(f"error: {node.error[:80]}")
    return "  ".join(parts)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()
