"""`make demo`: the main job on a local environment, start to finish.

Starts PostgreSQL and Redis under .run/, runs `kubetasks run` on
examples/app.py in the background, enqueues the example tasks, shows their
progress until every one has ended, prints a summary and stops the worker
with SIGTERM (a graceful stop). Exit code 0 only if every task succeeded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from kubetasks import App, EnqueueRequest, devenv
from kubetasks.store import migrate

ROOT = Path(__file__).resolve().parent.parent
console = Console()

EXAMPLES = [
    EnqueueRequest("images.resize", {"image": f"s3://bucket/{i}.png"}, tags=["demo"]) for i in range(1, 6)
] + [
    EnqueueRequest("reports.checksum", {"text": "kubetasks"}, tags=["demo"]),
    EnqueueRequest("flaky.fetch", {"url": "https://example.invalid/data"}, tags=["demo"]),
    EnqueueRequest("orders.validate", {"total": 42}, priority=10, tags=["demo"]),
    EnqueueRequest("images.resize", {"image": "s3://bucket/later.png", "width": 320}, delay=2, tags=["demo"]),
]


def table(records: list) -> Table:  # type: ignore[type-arg]
    t = Table("ID", "HANDLER", "STATUS", "ATTEMPTS", "PROGRESS", "RESULT / ERROR", title="kubetasks demo")
    colours = {"succeeded": "green", "failed": "red", "running": "yellow", "pending": "cyan"}
    for r in records:
        detail = r.error if r.status == "failed" else ("" if r.result is None else str(r.result))
        progress = "" if r.progress is None else f"{r.progress}% {r.progress_message or ''}"
        c = colours.get(r.status, "white")
        t.add_row(
            str(r.id),
            r.handler,
            f"[{c}]{r.status}[/{c}]",
            f"{r.attempt}/{r.max_attempts}",
            progress,
            detail[:60],
        )
    return t


async def main() -> int:
    console.print("[bold]1.[/bold] starting PostgreSQL and Redis under .run/ ...")
    state = devenv.up()
    await migrate(state.database_url)
    console.print(f"   {state.database_url}\n   {state.redis_url}")
    demo_db = "kubetasks_demo"
    import asyncpg

    admin = await asyncpg.connect(state.admin_url())
    await admin.execute(f"DROP DATABASE IF EXISTS {demo_db} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {demo_db}")
    await admin.close()
    url = state.admin_url(demo_db)
    await migrate(url)

    console.print("[bold]2.[/bold] starting a worker: kubetasks run --app examples.app:app")
    log = open(ROOT / ".run" / "demo-worker.log", "wb")  # noqa: SIM115
    env = dict(os.environ, KUBETASKS_DATABASE_URL=url, KUBETASKS_REDIS_URL=state.redis_url,
               KUBETASKS_POD_ID="demo-pod", PYTHONPATH=str(ROOT))  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "kubetasks", "run", "--app", "examples.app:app", "--concurrency", "8"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    from examples.app import app as example_app

    app = App(database_url=url)
    app.add_tasks_from(example_app)
    try:
        console.print(f"[bold]3.[/bold] enqueueing {len(EXAMPLES)} example tasks")
        ids = await app.enqueue_many(EXAMPLES)
        console.print("[bold]4.[/bold] watching them run")
        end = asyncio.get_running_loop().time() + 60
        with Live(console=console, refresh_per_second=8) as live:
            while True:
                records = [await app.get_task(i) for i in ids]
                live.update(table(records))
                if all(r.status in ("succeeded", "failed", "cancelled") for r in records):
                    break
                if worker.poll() is not None:
                    raise SystemExit(
                        f"the worker exited early (code {worker.returncode}); see .run/demo-worker.log"
                    )
                if asyncio.get_running_loop().time() > end:
                    raise SystemExit("tasks did not finish within 60 s; see .run/demo-worker.log")
                await asyncio.sleep(0.15)
        ok = sum(r.status == "succeeded" for r in records)
        retried = sum(r.attempt - 1 for r in records)
        console.print(
            f"\n[bold]summary:[/bold] {ok} of {len(records)} tasks succeeded, "
            f"{retried} retr{'y' if retried == 1 else 'ies'} along the way"
        )
        stats = await app.stats()
        console.print(f"queues: {stats['queues']}")
        return 0 if ok == len(records) else 1
    finally:
        console.print("[bold]5.[/bold] stopping the worker (SIGTERM, graceful)")
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(40)
        except subprocess.TimeoutExpired:
            worker.kill()
            code = worker.wait()
        console.print(f"   worker exited with code {code}")
        await app.close()
        console.print(
            "\nTry it by hand:  eval $(.venv/bin/kubetasks dev env) && "
            ".venv/bin/kubetasks worker --app examples.app:app\n"
            "                 .venv/bin/kubetasks enqueue images.resize --app examples.app:app "
            '--payload \'{"image": "x.png"}\''
        )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(asyncio.run(main()))
