"""Shared by the bench apps: where a latency handler writes its sample.

A latency job carries ``t``, the enqueuer's ``time.time()`` just before the
enqueue call; the handler appends ``start - t`` (seconds), the warm-up flag, its
job id and ``t`` itself to the file named by BENCH_LATENCY_FILE (run.py later
reads each job's completion time from the system's own tables by that id).
Enqueuer and workers run on the same host, so their wall clocks are the same clock.
"""

from __future__ import annotations

import os
import time

_fd: int | None = None


def record(t: float, warm: bool, job_id: int) -> None:
    start = time.time()
    global _fd  # noqa: PLW0603 - one append-only descriptor per process
    if _fd is None:
        path = os.environ.get("BENCH_LATENCY_FILE")
        if not path:
            return
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # One short write on an O_APPEND descriptor: lines from several processes never interleave.
    os.write(_fd, f"{start - t:.6f} {int(warm)} {job_id} {t!r}\n".encode())
