"""The `kubetasks` command: run a pod's process, migrate, and inspect tasks.

Every option that the Helm chart sets has an environment-variable fallback,
shown by ``--help``, so the chart's contract is documented in one place.
Exit codes: 0 success, 1 a failure the message explains (task not found,
server unreachable), 2 bad usage or bad input (named field and limit).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from kubetasks import devenv
from kubetasks.app import App, TaskRecord
from kubetasks.config import validate_database_url
from kubetasks.errors import KubetasksError, TaskNotFound, ValidationError

cli = typer.Typer(
    name="kubetasks",
    help="A distributed task runner for Kubernetes, with PostgreSQL as the source of truth.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
tasks_cli = typer.Typer(help="Inspect and steer tasks.", no_args_is_help=True)
queues_cli = typer.Typer(help="Pause and resume queues.", no_args_is_help=True)
dev_cli = typer.Typer(help="Throwaway local PostgreSQL and Redis under .run/.", no_args_is_help=True)
cli.add_typer(tasks_cli, name="tasks")
cli.add_typer(queues_cli, name="queues")
cli.add_typer(dev_cli, name="dev")

out = Console()
err = Console(stderr=True)
T = TypeVar("T")

DbOpt = Annotated[
    str | None,
    typer.Option("--database-url", envvar="KUBETASKS_DATABASE_URL", help="postgresql:// URL."),
]
AppOpt = Annotated[
    str | None,
    typer.Option("--app", envvar="KUBETASKS_APP", help="The App to load, as module:attribute."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def load_app(spec: str | None, database_url: str | None) -> App:
    """Import ``module:attr``; without one, a bare App (admin verbs need no handlers)."""
    if spec:
        module_name, _, attr = spec.partition(":")
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValidationError("--app", f"cannot import {module_name!r}: {exc}") from None
        app = getattr(module, attr or "app", None)
        if not isinstance(app, App):
            raise ValidationError("--app", f"{spec!r} is not a kubetasks App")
    else:
        app = App(strict_handlers=False)
    if database_url:
        app.configure(
            database_url=validate_database_url(database_url, "--database-url / KUBETASKS_DATABASE_URL")
        )
    return app


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine, turning our errors into messages and exit codes."""
    try:
        return asyncio.run(fn())  # type: ignore[arg-type]
    except ValidationError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except TaskNotFound as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    except KubetasksError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        err.print(f"[red]error:[/red] database: {exc}")
        raise typer.Exit(1) from None


def _fmt_time(t: datetime | None) -> str:
    return "" if t is None else t.isoformat(timespec="seconds")


def _record_json(r: TaskRecord) -> dict[str, Any]:
    d = dict(r.__dict__)
    for k, v in d.items():
        if isinstance(v, datetime):
            d[k] = v.isoformat()
    return d


@cli.command()
def migrate(database_url: DbOpt = None) -> None:
    """Create or upgrade the schema (safe to run from several pods at once)."""
    from kubetasks.store import migrate as do_migrate  # noqa: PLC0415

    app = load_app(None, database_url)

    async def go() -> list[str]:
        return await do_migrate(app.settings.database_url)

    applied = run_async(go)
    out.print(f"applied: {', '.join(applied)}" if applied else "schema is current")


def _worker_command(
    app_spec: str | None,
    database_url: str | None,
    queues: str | None,
    concurrency: int | None,
    log_level: str,
    *,
    pod_services: bool,
) -> None:
    from kubetasks import runtime  # noqa: PLC0415
    from kubetasks import worker as worker_module  # noqa: PLC0415
    from kubetasks.store import migrate as do_migrate  # noqa: PLC0415

    setup_logging(log_level)
    if not app_spec:
        err.print("[red]error:[/red] --app: required (module:attribute, or KUBETASKS_APP)")
        raise typer.Exit(2)
    app = load_app(app_spec, database_url)
    overrides: dict[str, Any] = {}
    if queues:
        overrides["queues"] = tuple(q.strip() for q in queues.split(",") if q.strip())
    if concurrency:
        overrides["concurrency"] = concurrency
    app.configure(**overrides)

    async def go() -> None:
        await do_migrate(app.settings.database_url)
        try:
            rt = runtime.Runtime(app, worker_module.Worker(app))
            if pod_services:
                for name, service in runtime_services(app):
                    rt.add(name, service)
            await rt.run()
        finally:
            await app.close()

    try:
        import uvloop  # noqa: PLC0415

        uvloop.install()
    except ImportError:
        pass
    run_async(go)


def runtime_services(app: App) -> list[tuple[str, Any]]:
    """The services `kubetasks run` adds beside the worker (scheduler, health, operator)."""
    services: list[tuple[str, Any]] = []
    from kubetasks.k8s import kube  # noqa: PLC0415

    if kube.configured():
        from kubetasks.k8s.operator import Operator  # noqa: PLC0415

        services.append(("operator", Operator(app).run))
    if app.settings.metrics_port:
        from kubetasks import health  # noqa: PLC0415

        services.append(("health", health.serve))
    return services


@cli.command()
def worker(
    app: AppOpt = None,
    database_url: DbOpt = None,
    queues: Annotated[
        str | None,
        typer.Option(envvar="KUBETASKS_QUEUES", help="Comma-separated, in priority order."),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(envvar="KUBETASKS_CONCURRENCY", help="Tasks run at once.")
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="KUBETASKS_LOG_LEVEL")] = "info",
) -> None:
    """Run workers only, until SIGTERM/SIGINT (a second signal stops at once)."""
    _worker_command(app, database_url, queues, concurrency, log_level, pod_services=False)


@cli.command()
def run(
    app: AppOpt = None,
    database_url: DbOpt = None,
    queues: Annotated[
        str | None,
        typer.Option(envvar="KUBETASKS_QUEUES", help="Comma-separated, in priority order."),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(envvar="KUBETASKS_CONCURRENCY", help="Tasks run at once.")
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="KUBETASKS_LOG_LEVEL")] = "info",
) -> None:
    """The one process a pod runs: migrations, workers, recovery, scheduler, operator."""
    _worker_command(app, database_url, queues, concurrency, log_level, pod_services=True)


@cli.command()
def enqueue(
    name: Annotated[str, typer.Argument(help="The handler to run.")],
    payload: Annotated[str, typer.Option(help="The payload, a JSON object.")] = "{}",
    delay: Annotated[float | None, typer.Option(help="Seconds to wait before running.")] = None,
    queue: Annotated[str | None, typer.Option()] = None,
    priority: Annotated[int | None, typer.Option()] = None,
    max_attempts: Annotated[int | None, typer.Option()] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds per attempt.")] = None,
    dedupe_key: Annotated[str | None, typer.Option()] = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Add a task; prints its id."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        err.print(f"[red]error:[/red] --payload: not valid JSON: {exc}")
        raise typer.Exit(2) from None
    the_app = load_app(app, database_url)

    async def go() -> int:
        try:
            return await the_app.enqueue(
                name, data, delay=delay, queue=queue, priority=priority,
                max_attempts=max_attempts, timeout=timeout, dedupe_key=dedupe_key,
            )  # fmt: skip
        finally:
            await the_app.close()

    out.print(run_async(go))


def _with_app(app_spec: str | None, database_url: str | None, fn: Callable[[App], Awaitable[T]]) -> T:
    the_app = load_app(app_spec, database_url)

    async def go() -> T:
        try:
            return await fn(the_app)
        finally:
            await the_app.close()

    return run_async(go)


@tasks_cli.command("list")
def tasks_list(
    status: Annotated[list[str] | None, typer.Option(help="Repeat for several.")] = None,
    handler: Annotated[list[str] | None, typer.Option()] = None,
    queue: Annotated[list[str] | None, typer.Option()] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Tasks carrying all these tags.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    as_json: JsonOpt = False,
    database_url: DbOpt = None,
) -> None:
    """List tasks, newest first."""
    page = _with_app(
        None, database_url,
        lambda a: a.list_tasks(
            status=status or None, handler=handler or None, queue=queue or None, tags=tag or None,
            limit=limit, offset=offset,
        ),
    )  # fmt: skip
    if as_json:
        out.print_json(json.dumps({"total": page.total, "has_more": page.has_more,
                                   "items": [_record_json(r) for r in page.items]}))  # fmt: skip
        return
    table = Table("ID", "HANDLER", "QUEUE", "STATUS", "ATTEMPTS", "PROGRESS", "POD", "CREATED")
    for r in page.items:
        table.add_row(
            str(r.id), r.handler, r.queue, r.status, f"{r.attempt}/{r.max_attempts}",
            "" if r.progress is None else f"{r.progress}%", r.pod_id or "", _fmt_time(r.created_at),
        )  # fmt: skip
    out.print(table)
    out.print(f"{len(page.items)} of {page.total}" + (" (more: use --offset)" if page.has_more else ""))


@tasks_cli.command("get")
def tasks_get(task_id: int, as_json: JsonOpt = False, database_url: DbOpt = None) -> None:
    """Show one task, with its attempts."""

    async def fetch(a: App) -> tuple[TaskRecord, list[dict[str, Any]]]:
        return await a.get_task(task_id), await a.get_attempts(task_id)

    rec, attempts = _with_app(None, database_url, fetch)
    if as_json:
        d = _record_json(rec)
        d["attempts"] = [{k: str(v) if v is not None else None for k, v in a.items()} for a in attempts]
        out.print_json(json.dumps(d, default=str))
        return
    for k, v in _record_json(rec).items():
        if v not in (None, "", []):
            out.print(f"[bold]{k}[/bold]: {json.dumps(v) if isinstance(v, dict | list) else v}")
    if attempts:
        table = Table("ATTEMPT", "OUTCOME", "POD", "STARTED", "DURATION", "ERROR")
        for a in attempts:
            dur = a["duration_s"]
            table.add_row(
                str(a["attempt"]), a["outcome"], a["pod_id"] or "", _fmt_time(a["started_at"]),
                "" if dur is None else f"{dur:.3f}s", (a["error"] or "")[:80],
            )  # fmt: skip
        out.print(table)


@tasks_cli.command("cancel")
def tasks_cancel(task_id: int, database_url: DbOpt = None) -> None:
    """Cancel a pending, paused or running task."""
    ok = _with_app(None, database_url, lambda a: a.cancel(task_id))
    out.print(f"task {task_id} cancelled" if ok else f"task {task_id} had already ended")
    if not ok:
        raise typer.Exit(1)


@tasks_cli.command("retry")
def tasks_retry(
    task_id: Annotated[int | None, typer.Argument()] = None,
    handler: Annotated[str | None, typer.Option(help="Retry every failed task of this handler.")] = None,
    database_url: DbOpt = None,
) -> None:
    """Run a failed or cancelled task again (or all failed tasks of a handler)."""
    n = _with_app(None, database_url, lambda a: a.retry(task_id, handler=handler))
    out.print(f"{n} task(s) queued again")
    if task_id is not None and n == 0:
        raise typer.Exit(1)


@tasks_cli.command("pause")
def tasks_pause(task_id: int, database_url: DbOpt = None) -> None:
    """Hold a pending task."""
    ok = _with_app(None, database_url, lambda a: a.pause_task(task_id))
    out.print(f"task {task_id} paused" if ok else f"task {task_id} is not pending")
    if not ok:
        raise typer.Exit(1)


@tasks_cli.command("resume")
def tasks_resume(task_id: int, database_url: DbOpt = None) -> None:
    """Release a paused task."""
    ok = _with_app(None, database_url, lambda a: a.resume_task(task_id))
    out.print(f"task {task_id} resumed" if ok else f"task {task_id} is not paused")
    if not ok:
        raise typer.Exit(1)


@tasks_cli.command("delete")
def tasks_delete(
    older_than: Annotated[float, typer.Option(help="Seconds since they finished.")] = 86400.0,
    database_url: DbOpt = None,
) -> None:
    """Delete finished tasks."""
    n = _with_app(None, database_url, lambda a: a.delete_tasks(older_than=older_than))
    out.print(f"{n} task(s) deleted")


@queues_cli.command("pause")
def queue_pause(queue: str, database_url: DbOpt = None) -> None:
    """Stop claiming from a queue (running tasks go on)."""
    _with_app(None, database_url, lambda a: a.pause_queue(queue))
    out.print(f"queue {queue} paused")


@queues_cli.command("resume")
def queue_resume(queue: str, database_url: DbOpt = None) -> None:
    """Claim from a paused queue again."""
    _with_app(None, database_url, lambda a: a.resume_queue(queue))
    out.print(f"queue {queue} resumed")


@cli.command()
def stats(as_json: JsonOpt = False, database_url: DbOpt = None) -> None:
    """Counts per queue and status, oldest pending age, running per worker."""
    data = _with_app(None, database_url, lambda a: a.stats())
    if as_json:
        out.print_json(json.dumps(data))
        return
    table = Table("QUEUE", "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "PAUSED", "OLDEST DUE")
    for q, info in sorted(data["queues"].items()):
        c = info["counts"]
        age = info["oldest_pending_s"]
        table.add_row(
            q + (" (paused)" if info["paused"] else ""),
            *(str(c.get(s, 0)) for s in ("pending", "running", "succeeded", "failed", "cancelled", "paused")),
            "" if age is None else f"{age:.1f}s",
        )  # fmt: skip
    out.print(table)
    wt = Table("POD", "WORKER", "STATUS", "QUEUES", "RUNNING", "LEASE LEFT")
    for w in data["workers"]:
        wt.add_row(
            w["pod_id"], w["worker_id"][:8], w["status"], ",".join(w["queues"]),
            f"{w['running']}/{w['concurrency']}", f"{w['lease_left_s']:.1f}s",
        )  # fmt: skip
    out.print(wt)


@dev_cli.command("up")
def dev_up() -> None:
    """Start (or find running) PostgreSQL and Redis; print their URLs."""
    try:
        state = devenv.up()
    except devenv.DevEnvError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    from kubetasks.store import migrate as do_migrate  # noqa: PLC0415

    asyncio.run(do_migrate(state.database_url))
    for line in devenv.env_lines(state):
        out.print(line, highlight=False, soft_wrap=True)


@dev_cli.command("env")
def dev_env() -> None:
    """Print export lines for the running servers (for `eval`)."""
    state = devenv.load_state()
    if state is None:
        err.print("[red]error:[/red] nothing is running: `kubetasks dev up` first")
        raise typer.Exit(1)
    for line in devenv.env_lines(state):
        print(line)


@dev_cli.command("down")
def dev_down() -> None:
    """Stop the local servers and delete their data."""
    devenv.down()
    out.print("stopped")


def main() -> None:
    try:
        cli()
    except ValidationError as exc:  # raised while reading options, before any work
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
