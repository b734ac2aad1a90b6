"""Helpers shared by the test tiers, bench/ and e2e/: one copy of each.

* ``until``: wait for a condition (sync or async) under a deadline, failing with what
  was awaited. The machine is shared, so deadlines are generous and waits poll a
  condition rather than sleep a fixed time.
* ``cluster_env`` and ``cluster_script``: the tool paths and versions e2e/cluster/env.sh
  exports, and that directory's scripts (build.sh builds helm, kubeconform, kubectl,
  kube-apiserver... from their Go modules once, into ~/.cache/kubetasks).
* ``connect``, ``create_database`` and ``drop_database``: a connection on kubetasks'
  schema, and throwaway databases on a server ``kubetasks.devenv`` started.
* ``explain_claim`` and ``claim_plan_text``: the plan the claim (the function claim_batch)
  really ran, with its buffers, read through auto_explain.

The local PostgreSQL and Redis, and free ports, come from ``kubetasks.devenv`` (``up``,
``free_port``), which `make dev` uses too. Nothing here imports pytest: bench/ runs
without it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_DIR = ROOT / "e2e" / "cluster"


async def until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``cond`` (sync or async) until it returns something truthy, and return that; an
    AssertionError naming ``what`` once ``timeout`` seconds have passed without."""
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


def cluster_env() -> dict[str, str]:
    """The variables e2e/cluster/env.sh exports: tool paths (KUBETASKS_HELM, KUBETASKS_KUBECTL,
    ...), versions (K8S_VERSION, ...), the cache and run directories."""
    out = subprocess.run(
        ["bash", "-c", f". {CLUSTER_DIR / 'env.sh'} && env -0"], capture_output=True, text=True, check=True
    )
    pairs = (item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)
    prefixes = ("KUBETASKS_", "K8S_", "ETCD_", "HELM_", "KUBECONFORM_")
    return {k: v for k, v in pairs if k.startswith(prefixes)}


class ScriptFailed(RuntimeError):
    """A script of e2e/cluster/ exited non-zero; the message ends with its output."""


def cluster_script(
    name: str, *args: str, timeout: float = 3600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run e2e/cluster/``name`` (build.sh, schemas.sh, up.sh, ...); with ``check``, raise
    ScriptFailed with the tail of its output when it fails."""
    res = subprocess.run(
        ["bash", str(CLUSTER_DIR / name), *args], capture_output=True, text=True, timeout=timeout
    )
    if check and res.returncode != 0:
        raise ScriptFailed(
            f"e2e/cluster/{name} {' '.join(args)} exited {res.returncode}:\n"
            f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        )
    return res


async def connect(url: str) -> asyncpg.Connection:
    """A connection whose unqualified names are kubetasks' tables and functions."""
    return await asyncpg.connect(url, server_settings={"search_path": "kubetasks"})


_AUTO_EXPLAIN = (
    "LOAD 'auto_explain'",
    "SET auto_explain.log_nested_statements = on",
    "SET auto_explain.log_analyze = on",
    "SET auto_explain.log_buffers = on",
    "SET auto_explain.log_level = notice",
)


async def claim_plan_text(conn: asyncpg.Connection, *args: object, fmt: str = "json") -> tuple[str, float]:
    """Run the claim (``SELECT * FROM claim_batch(...)`` with its 11 ``args``) and return the plan
    of the statement inside it as it ran, in ``fmt`` (json or text), and its duration in ms. That
    is the function's cached generic plan under its settings: EXPLAIN of the call would show a
    function scan, and EXPLAIN of the statement a plan made apart. auto_explain sends it to this
    connection as a notice. The caller holds a transaction and rolls it back (the claim claims)."""
    notes: list[str] = []

    def listen(_conn: object, msg: Any) -> None:
        notes.append(str(msg.message))

    settings = (
        *_AUTO_EXPLAIN,
        f"SET auto_explain.log_format = {fmt}",
        "SET auto_explain.log_min_duration = 0",
    )
    for setting in settings:
        await conn.execute(setting)
    conn.add_log_listener(listen)
    try:
        await conn.fetch("SELECT * FROM claim_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)", *args)
    finally:
        await conn.execute("SET auto_explain.log_min_duration = -1")
        await asyncio.sleep(0)  # the notices are handed to listeners on the loop's next turn
        conn.remove_log_listener(listen)
    for note in notes:
        m = re.match(r"duration: ([0-9.]+) ms\s+plan:\s*(.*)", note, re.S)
        if m and "WITH me AS" in m.group(2):
            return m.group(2), float(m.group(1))
    raise AssertionError(f"no plan of the claim's statement among {len(notes)} notices: {notes[:2]}")


async def explain_claim(conn: asyncpg.Connection, *args: object) -> dict[str, Any]:
    """``claim_plan_text`` as EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) gives it (``Plan``), with
    auto_explain's duration as ``Execution Time``."""
    raw, ms = await claim_plan_text(conn, *args)
    plan: dict[str, Any] = json.loads(raw)
    plan["Execution Time"] = ms
    return plan


async def create_database(
    admin_url: str, name: str, *, template: str | None = None, replace: bool = False,
    settings: Mapping[str, str] | None = None,
) -> None:  # fmt: skip
    """CREATE DATABASE ``name`` (a copy of ``template``), dropping one of that name first with
    ``replace``, with ``settings`` as its defaults (ALTER DATABASE ... SET). Names and settings
    are the callers' own (letters, digits, ``_``), never user input."""
    conn = await asyncpg.connect(admin_url)
    try:
        if replace:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        tpl = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{tpl}')
        for key, value in (settings or {}).items():
            await conn.execute(f'ALTER DATABASE "{name}" SET {key} = {value}')
    finally:
        await conn.close()


async def drop_database(admin_url: str, name: str) -> None:
    """DROP DATABASE ``name`` if it exists, whoever is still connected to it."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
