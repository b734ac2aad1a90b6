"""The README's code runs as written (issue 17 item 1), against a real PostgreSQL.

Python blocks headed ``# mypkg/tasks.py`` are concatenated into that module;
the other Python blocks run after it with its names in scope and top-level
``await``. Shell blocks run with bash in a directory holding ``mypkg``, the
``kubetasks`` of this checkout first on PATH, unless their first line says
why not (``# not run by tests/integration/test_readme.py: <why>``). A YAML
block must parse. The README's first example is the point: a handler in queue
"images" and ``kubetasks run`` with no queue setting must run its task.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from tests.integration.helpers import ROOT, wait_for

README = ROOT / "README.md"
MODULE_HEADER = "# mypkg/tasks.py"
SKIP_MARKER = "# not run by tests/integration/test_readme.py: "
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(README.read_text())]


def test_every_block_is_runnable_or_says_why_not() -> None:
    """Each fenced block has a language this test knows, and a shell block that is not run
    names the reason in its first line."""
    seen = set()
    for lang, body in blocks():
        assert lang in ("python", "sh", "yaml"), f"a README block in {lang or 'no language'!r}:\n{body}"
        seen.add(lang)
        first = body.splitlines()[0]
        if lang == "sh" and first.startswith("# not run"):
            assert first.startswith(SKIP_MARKER) and len(first) > len(SKIP_MARKER) + 10, first
        if lang == "yaml":
            assert isinstance(yaml.safe_load(body), dict)
    assert seen == {"python", "sh", "yaml"}


async def test_readme_blocks_run_as_written(db_url: str, tmp_path: Path) -> None:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    module = [body for lang, body in blocks() if lang == "python" and body.startswith(MODULE_HEADER)]
    (pkg / "tasks.py").write_text("\n".join(module))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASKS_")}
    env.update(
        KUBETASKS_DATABASE_URL=db_url,
        KUBETASKS_OPERATOR="false",  # no cluster here, whatever ~/.kube holds
        KUBETASKS_HEARTBEAT_INTERVAL="0.5",
        KUBETASKS_LEASE_TTL="2",
        KUBETASKS_POD_ID="readme-pod",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(tmp_path),
    )
    # Python blocks run in this process: the module imported with the README's settings.
    saved = {k: os.environ.get(k) for k in env if k.startswith("KUBETASKS_")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("KUBETASKS_")})
    sys.path.insert(0, str(tmp_path))
    sessions: list[subprocess.Popen[bytes]] = []
    try:
        mod = importlib.import_module("mypkg.tasks")
        app = mod.app
        names: dict[str, Any] = dict(vars(mod))
        for lang, body in blocks():
            if lang == "python" and not body.startswith(MODULE_HEADER):
                code = compile(body, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
                result = eval(code, names)
                if asyncio.iscoroutine(result):
                    await result
            elif lang == "sh" and not body.startswith(SKIP_MARKER):
                log = tmp_path / f"sh-{len(sessions)}.log"
                with open(log, "wb") as out:
                    # Its own session: a worker it starts in the background is stopped below.
                    proc = subprocess.Popen(
                        ["bash", "-e", "-c", body], cwd=tmp_path, env=env, stdout=out,
                        stderr=subprocess.STDOUT, start_new_session=True,
                    )  # fmt: skip
                sessions.append(proc)
                rc = await asyncio.to_thread(proc.wait, 120)
                assert rc == 0, f"README shell block failed ({rc}):\n{body}\n{log.read_text()[-3000:]}"
        assert isinstance(names["task_id"], int)
        conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
        try:

            async def ran() -> bool:
                n = await conn.fetchval(
                    "SELECT count(*) FROM tasks WHERE handler = 'images.resize' AND status = 'succeeded'"
                )
                return bool(n)

            # The task the shell block enqueued, in queue "images", run by `kubetasks run` with no
            # queue setting (on main it stayed pending: the worker served "default" only).
            await wait_for(ran, 60, "kubetasks run to run the README's images.resize task")
            row = await conn.fetchrow("SELECT queue, result FROM tasks WHERE status = 'succeeded'")
            assert row["queue"] == "images" and row["result"] == '{"ok": true}'
            # Every handler's queue, in registration order: "images", then "default" for the rest.
            served = await conn.fetchval("SELECT queues FROM workers WHERE status = 'active'")
            assert served == ["images", "default"]
        finally:
            await conn.close()
        await app.close()
    finally:
        for proc in sessions:
            await asyncio.to_thread(stop_session, proc.pid)
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mypkg.tasks", None)
        sys.modules.pop("mypkg", None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


pytestmark = pytest.mark.timeout(300)


def stop_session(sid: int) -> None:
    """SIGTERM what a shell block left running (a worker in the background), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(sid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + grace
        while time.monotonic() < end:
            try:
                os.killpg(sid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
