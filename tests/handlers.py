"""Handlers for tests that only need one registered.

A plain (``def``) handler must be importable by module and name (it runs in
a child process), so a lambda is refused at registration; these stand in.
"""

from __future__ import annotations

from kubetasks import TaskContext


async def noop(task: TaskContext) -> None:
    return None


async def one(task: TaskContext) -> int:
    return 1
