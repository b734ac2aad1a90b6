"""The `kubetasks` command: run a pod's process, migrate, and inspect tasks.

Every option that the Helm chart sets has an environment-variable fallback,
shown by ``--help``, so the chart's contract is documented in one place.
Exit codes: 0 success, 1 a failure the message explains (task not found,
server unreachable), 2 bad usage or bad input (named field and limit).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import logging
import os
import signal
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
from kubetasks.config import settings_help, validate_database_url
from kubetasks.errors import KubetasksError, TaskNotFound, ValidationError
from kubetasks.statuses import STATUSES

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
schedules_cli = typer.Typer(
    help="Cron schedules (@app.periodic, CronJobLock, or made here at runtime).", no_args_is_help=True
)
cli.add_typer(schedules_cli, name="schedules")
locks_cli = typer.Typer(help="Named job locks: list them, force-release a stuck one.", no_args_is_help=True)
cli.add_typer(locks_cli, name="locks")
bulk_cli = typer.Typer(
    help="Retry, cancel or delete every task a filter matches (--dry-run prints the count).",
    no_args_is_help=True,
)
cli.add_typer(bulk_cli, name="bulk")

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
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table (as -o json).")]
OUTPUTS = ("table", "wide", "json")
#: How this command prints its listing (set by -o; one command per process).
_OUTPUT = {"mode": "table"}


def _set_output(value: str) -> str:
    if value not in OUTPUTS:
        raise typer.BadParameter(f"must be one of {', '.join(OUTPUTS)}, got {value!r}")
    _OUTPUT["mode"] = value
    return value


OutputOpt = Annotated[
    str,
    typer.Option(
        "-o", "--output", callback=_set_output,
        help="table (wraps long cells, never cuts them), wide (one line per row, any width) or json.",
    ),
]  # fmt: skip


def _json_out(as_json: bool) -> bool:
    return as_json or _OUTPUT["mode"] == "json"


def _table(*headers: str, title: str | None = None) -> Table:
    """A table whose cells wrap rather than lose characters: ids and names stay whole."""
    t = Table(title=title)
    for h in headers:
        t.add_column(h, overflow="fold")
    return t


def _show(renderable: Any) -> None:
    if _OUTPUT["mode"] == "wide":
        Console(width=100_000, soft_wrap=True).print(renderable)
    else:
        out.print(renderable)


# The TaskFilter criteria (kubetasks.filters), shared by `tasks list` and `bulk`.
StatusOpt = Annotated[list[str] | None, typer.Option("--status", help="Repeat for several.")]
HandlerOpt = Annotated[list[str] | None, typer.Option("--handler", help="Repeat for several.")]
QueueOpt = Annotated[list[str] | None, typer.Option("--queue", help="Repeat for several.")]
TagOpt = Annotated[list[str] | None, typer.Option("--tag", help="Tasks carrying all these tags.")]
AfterOpt = Annotated[str | None, typer.Option("--created-after", help="ISO 8601 with an offset (inclusive).")]
BeforeOpt = Annotated[
    str | None, typer.Option("--created-before", help="ISO 8601 with an offset (exclusive).")
]
ParentOpt = Annotated[int | None, typer.Option("--parent", help="The direct children of this task.")]
RootOpt = Annotated[int | None, typer.Option("--root", help="This workflow: the task and its descendants.")]
WorkerOpt = Annotated[str | None, typer.Option("--worker", help="The worker id that last ran it.")]
PodOpt = Annotated[str | None, typer.Option("--pod", help="The pod that last ran it.")]
RunAfterOpt = Annotated[
    str | None,
    typer.Option(
        "--run-after",
        help="Due (run_at) at or after: ISO 8601 with an offset; with --status pending, the delayed tasks.",
    ),
]
RunBeforeOpt = Annotated[
    str | None, typer.Option("--run-before", help="Due (run_at) before: ISO 8601 with an offset (exclusive).")
]
CursorOpt = Annotated[str | None, typer.Option("--cursor", help="Continue a listing (its next cursor).")]


def task_filter(**options: Any) -> Any:
    """A ``TaskFilter`` from CLI options (None and empty lists: not given); bad values are
    refused naming the option."""
    from kubetasks.filters import TaskFilter  # noqa: PLC0415

    params: dict[str, str | list[str]] = {}
    for key, value in options.items():
        if value is None or value == []:
            continue
        params[key] = [str(v) for v in value] if isinstance(value, list) else str(value)
    try:
        return TaskFilter.from_params(params)
    except ValidationError as exc:
        raise ValidationError("--" + exc.field.replace("_", "-"), exc.message) from None


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
        s = app.settings
        return await do_migrate(s.direct_url or s.database_url, pooled=not s.direct_url)

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
        services = (runtime.pod_services(app) + _dashboard_service(app)) if pod_services else []
        await runtime.serve(app, services)

    try:
        import uvloop  # noqa: PLC0415

        uvloop.install()
    except ImportError:
        pass
    run_async(go)


def _dashboard_service(app: App) -> list[tuple[str, Any]]:
    """The dashboard, when KUBETASKS_DASHBOARD_PORT asks for it: added here, because only the
    CLI may import it (an import contract keeps FastAPI out of the library)."""
    if not app.settings.dashboard_port:
        return []
    app.settings.dashboard_ready()  # a missing token fails the pod now, naming the variable
    from kubetasks.dashboard import server  # noqa: PLC0415

    async def dashboard_service(stop: asyncio.Event, _worker: object) -> None:
        await server.serve(app, stop)

    return [("dashboard", dashboard_service)]


@cli.command(epilog=settings_help())
def worker(
    app: AppOpt = None,
    database_url: DbOpt = None,
    queues: Annotated[
        str | None,
        typer.Option(
            envvar="KUBETASKS_QUEUES",
            help="Comma-separated, in priority order. Unset: the queues of the app's handlers; "
            "'*' (last): every queue holding tasks of its handlers.",
        ),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(envvar="KUBETASKS_CONCURRENCY", help="Tasks run at once.")
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="KUBETASKS_LOG_LEVEL")] = "info",
) -> None:
    """Run workers only, until SIGTERM/SIGINT (a second signal stops at once)."""
    _worker_command(app, database_url, queues, concurrency, log_level, pod_services=False)


@cli.command(epilog=settings_help())
def run(
    app: AppOpt = None,
    database_url: DbOpt = None,
    queues: Annotated[
        str | None,
        typer.Option(
            envvar="KUBETASKS_QUEUES",
            help="Comma-separated, in priority order. Unset: the queues of the app's handlers; "
            "'*' (last): every queue holding tasks of its handlers.",
        ),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(envvar="KUBETASKS_CONCURRENCY", help="Tasks run at once.")
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="KUBETASKS_LOG_LEVEL")] = "info",
) -> None:
    """The one process a pod runs: migrations, workers, recovery, scheduler, operator."""
    _worker_command(app, database_url, queues, concurrency, log_level, pod_services=True)


@cli.command()
def dashboard(
    app: AppOpt = None,
    database_url: DbOpt = None,
    port: Annotated[
        int | None,
        typer.Option(envvar="KUBETASKS_DASHBOARD_PORT", help="Port to listen on (0 or unset: 8080)."),
    ] = None,
    addr: Annotated[
        str | None,
        typer.Option(envvar="KUBETASKS_DASHBOARD_ADDR", help="Address to bind (default 127.0.0.1)."),
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="KUBETASKS_LOG_LEVEL")] = "info",
) -> None:
    """Serve the web dashboard and its HTTP API (/api/v1) until SIGTERM/SIGINT.

    Read-only unless KUBETASKS_DASHBOARD_WRITES=true. Authentication:
    KUBETASKS_DASHBOARD_AUTH=token (default; the bearer token in
    KUBETASKS_DASHBOARD_TOKEN), proxy (trust KUBETASKS_DASHBOARD_USER_HEADER
    from an authenticating proxy) or none. KUBETASKS_DASHBOARD_HIDE_PAYLOADS=true
    never shows payloads, results or tracebacks. With --app, schedules
    triggered from the page get their handlers' options.
    """
    from kubetasks.dashboard import server  # noqa: PLC0415
    from kubetasks.store import migrate as do_migrate  # noqa: PLC0415
    from kubetasks.store import retry_connection_errors  # noqa: PLC0415

    setup_logging(log_level)
    the_app = load_app(app, database_url)
    overrides: dict[str, Any] = {"dashboard_addr": addr}
    if port:
        overrides["dashboard_port"] = port
    the_app.configure(**overrides)

    async def go() -> None:
        the_app.settings.dashboard_ready()
        s = the_app.settings
        await retry_connection_errors(
            lambda: do_migrate(s.direct_url or s.database_url, pooled=not s.direct_url), what="migrating"
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(bound: int) -> None:
            err.print(f"dashboard: http://{the_app.settings.dashboard_addr}:{bound}/", highlight=False)

        try:
            await server.serve(the_app, stop, ready=ready)
        finally:
            await the_app.close()

    run_async(go)


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
    retry_delay: Annotated[
        float | None,
        typer.Option(help="Seconds before the first retry (default: the handler's, else the app's)."),
    ] = None,
    backoff: Annotated[
        float | None, typer.Option(help="Factor each later retry's delay grows by (1-10).")
    ] = None,
    max_retry_delay: Annotated[
        float | None, typer.Option(help="Longest delay between retries, seconds.")
    ] = None,
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
                retry_delay=retry_delay, backoff=backoff, max_retry_delay=max_retry_delay,
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
    status: StatusOpt = None,
    handler: HandlerOpt = None,
    queue: QueueOpt = None,
    tag: TagOpt = None,
    created_after: AfterOpt = None,
    created_before: BeforeOpt = None,
    parent: ParentOpt = None,
    root: RootOpt = None,
    worker: WorkerOpt = None,
    pod: PodOpt = None,
    run_after: RunAfterOpt = None,
    run_before: RunBeforeOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    cursor: CursorOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = "table",
    database_url: DbOpt = None,
) -> None:
    """List tasks, newest first, filtered; --cursor continues where the last page ended."""
    flt = _cli_filter(
        status=status, queue=queue, handler=handler, tag=tag, created_after=created_after,
        created_before=created_before, parent=parent, root=root, worker=worker, pod=pod, run_after=run_after,
        run_before=run_before,
    )  # fmt: skip
    page = _with_app(None, database_url, lambda a: a.find_tasks(flt, cursor=cursor, limit=limit))
    if _json_out(as_json):
        items = [dataclasses.asdict(t) for t in page.items]
        out.print_json(json.dumps({"items": items, "next_cursor": page.next_cursor}, default=_json_default))
        return
    table = _table("ID", "HANDLER", "QUEUE", "STATUS", "ATTEMPTS", "PROGRESS", "POD", "CREATED")
    for r in page.items:
        table.add_row(
            str(r.id), r.handler, r.queue, r.status, f"{r.attempts_spent}/{r.max_attempts}",
            _progress(r.progress, r.progress_stage), r.pod_id or "", _fmt_time(r.created_at),
        )  # fmt: skip
    _show(table)
    more = f" (more: --cursor {page.next_cursor})" if page.next_cursor else ""
    out.print(f"{len(page.items)} shown{more}", highlight=False, soft_wrap=True)


def _progress(percent: int | None, stage: str | None) -> str:
    """A PROGRESS cell: the percentage, then the stage its report named."""
    shown = "" if percent is None else f"{percent}%"
    return f"{shown} {stage}".strip() if stage else shown


def _cli_filter(**options: Any) -> Any:
    try:
        return task_filter(**options)
    except ValidationError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@tasks_cli.command("count")
def tasks_count(
    by: Annotated[str, typer.Option(help="handler, queue, tag or status.")] = "handler",
    status: StatusOpt = None,
    handler: HandlerOpt = None,
    queue: QueueOpt = None,
    tag: TagOpt = None,
    created_after: AfterOpt = None,
    created_before: BeforeOpt = None,
    parent: ParentOpt = None,
    root: RootOpt = None,
    worker: WorkerOpt = None,
    pod: PodOpt = None,
    run_after: RunAfterOpt = None,
    run_before: RunBeforeOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = "table",
    database_url: DbOpt = None,
) -> None:
    """Count the matching tasks per handler, queue, tag or status, and status."""
    flt = _cli_filter(
        status=status, queue=queue, handler=handler, tag=tag, created_after=created_after,
        created_before=created_before, parent=parent, root=root, worker=worker, pod=pod, run_after=run_after,
        run_before=run_before,
    )  # fmt: skip
    counts = _with_app(None, database_url, lambda a: a.count_tasks(by, flt))
    if _json_out(as_json):
        out.print_json(json.dumps(counts))
        return
    table = _table(by.upper(), *(st.upper() for st in STATUSES), "TOTAL")
    for key, c in counts.items():
        table.add_row(key, *(str(c.get(st, 0)) for st in STATUSES), str(sum(c.values())))
    _show(table)


@tasks_cli.command("get")
def tasks_get(
    task_id: int, as_json: JsonOpt = False, output: OutputOpt = "table", database_url: DbOpt = None
) -> None:
    """Show one task, with its attempts and events."""

    async def fetch(a: App) -> tuple[TaskRecord, list[dict[str, Any]], list[dict[str, Any]]]:
        return await a.get_task(task_id), await a.get_attempts(task_id), await a.get_events(task_id)

    rec, attempts, events = _with_app(None, database_url, fetch)
    if _json_out(as_json):
        d = _record_json(rec)
        d["attempts"] = [{k: str(v) if v is not None else None for k, v in a.items()} for a in attempts]
        d["events"] = [{k: str(v) if v is not None else None for k, v in e.items()} for e in events]
        out.print_json(json.dumps(d, default=str))
        return
    for k, v in _record_json(rec).items():
        if v not in (None, "", []):
            out.print(f"[bold]{k}[/bold]: {json.dumps(v) if isinstance(v, dict | list) else v}")
    if attempts:
        table = _table("ATTEMPT", "OUTCOME", "POD", "STARTED", "DURATION", "ERROR")
        for a in attempts:
            dur = a["duration_s"]
            table.add_row(
                str(a["attempt"]), a["outcome"], a["pod_id"] or "", _fmt_time(a["started_at"]),
                "" if dur is None else f"{dur:.3f}s", (a["error"] or "")[:80],
            )  # fmt: skip
        _show(table)
    if events:
        et = _table("AT", "EVENT", "ATTEMPT", "POD", "DETAIL")
        for e in events:
            et.add_row(
                e["at"].isoformat(timespec="milliseconds"), e["kind"],
                "" if e["attempt"] is None else str(e["attempt"]), e["pod_id"] or "",
                (e["detail"] or "")[:80],
            )  # fmt: skip
        _show(et)


@tasks_cli.command("tree")
def tasks_tree(
    task_id: int,
    max_children: Annotated[
        int, typer.Option(min=1, help="Children shown per task; the rest are counted by status.")
    ] = 50,
    as_json: JsonOpt = False,
    output: OutputOpt = "table",
    database_url: DbOpt = None,
) -> None:
    """Show a workflow: its tree, counts by status, times, retries and critical path (marked *)."""
    from rich.markup import escape  # noqa: PLC0415
    from rich.tree import Tree  # noqa: PLC0415

    from kubetasks import workflows  # noqa: PLC0415

    summary = _with_app(None, database_url, lambda a: a.workflow_summary(task_id))
    if _json_out(as_json):
        out.print_json(json.dumps(summary.to_dict()))
        return

    def text(node: workflows.WorkflowNode) -> str:
        line = escape(workflows.label(node))
        return f"[bold]* {line}[/bold]" if node.on_critical_path else f"  {line}"

    view = Tree(text(summary.root))
    stack = [(summary.root, view)]
    while stack:
        node, branch = stack.pop()
        shown = sorted(node.children, key=lambda c: (not c.on_critical_path, c.id))[:max_children]
        for child in sorted(shown, key=lambda c: c.id):
            stack.append((child, branch.add(text(child))))
        rest = [c for c in node.children if c not in shown]
        if rest:
            counts: dict[str, int] = {}
            for c in rest:
                counts[c.status] = counts.get(c.status, 0) + 1
            more = ", ".join(f"{n} {st}" for st, n in sorted(counts.items()))
            branch.add(f"  ... {len(rest)} more: {more}")
    _show(view)
    out.print(
        f"{summary.tasks} task(s): " + ", ".join(f"{n} {st}" for st, n in summary.counts.items())
        + f"; total {summary.total_s:.3f}s, wall {summary.wall_s:.3f}s, retries {summary.retries}",
        highlight=False,
    )  # fmt: skip
    path = " -> ".join(f"#{i}" for i in summary.critical_path)
    out.print(f"critical path ({summary.critical_path_s:.3f}s): {path}", highlight=False)


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
    """Hold a pending task, or ask a running one to pause.

    A running task's handler sees the request (task.pause_requested) and may pause at a
    checkpoint; otherwise the task is paused when the attempt ends, or, if that attempt
    finishes it, the request is moot. `tasks get` shows which happened."""

    async def act(a: App) -> tuple[str | None, TaskRecord]:
        return await a.pause_task(task_id), await a.get_task(task_id)

    how, rec = _with_app(None, database_url, act)
    if how == "requested":
        out.print(
            f"task {task_id} is running: asked to pause; it pauses at a checkpoint of its handler, "
            "or when this attempt ends"
        )
    elif how == "paused":
        out.print(f"task {task_id} paused")
    else:
        out.print(f"task {task_id} is {rec.status}: nothing to pause")
        raise typer.Exit(1)


@tasks_cli.command("resume")
def tasks_resume(task_id: int, database_url: DbOpt = None) -> None:
    """Release a paused task, or withdraw the pause asked of a running one."""

    async def act(a: App) -> tuple[str | None, TaskRecord]:
        return await a.resume_task(task_id), await a.get_task(task_id)

    how, rec = _with_app(None, database_url, act)
    if how == "withdrawn":
        out.print(f"task {task_id} is running: no longer asked to pause")
    elif how == "resumed":
        out.print(f"task {task_id} resumed")
    else:
        out.print(f"task {task_id} is {rec.status}: not paused, nor asked to pause")
        raise typer.Exit(1)


@tasks_cli.command("delete")
def tasks_delete(
    older_than: Annotated[float, typer.Option(help="Seconds since they finished.")] = 86400.0,
    database_url: DbOpt = None,
) -> None:
    """Delete finished tasks."""
    n = _with_app(None, database_url, lambda a: a.delete_tasks(older_than=older_than))
    out.print(f"{n} task(s) deleted")


def _bulk(
    action: str,
    flt: Any,
    dry_run: bool,
    up_to_id: int | None,
    batch_size: int,
    database_url: str | None,
    **extra: Any,
) -> None:
    async def go(a: App) -> Any:
        verb = {"retry": a.bulk_retry, "cancel": a.bulk_cancel, "delete": a.bulk_delete}[action]
        return await verb(flt, dry_run=dry_run, up_to_id=up_to_id, batch_size=batch_size, **extra)

    res = _with_app(None, database_url, go)
    done = {"retry": "retried", "cancel": "cancelled", "delete": "deleted"}[action]
    if res.dry_run:
        out.print(res.count)
        if res.count:
            err.print(
                f"{res.count} task(s) would be {done} (ids up to {res.up_to_id}); run again without "
                f"--dry-run and with --up-to-id {res.up_to_id} to act on these and no later ones",
                highlight=False,
            )
        return
    extra_text = f", {res.descendants} unfinished descendant(s) with them" if res.descendants else ""
    out.print(f"{res.count} task(s) {done}{extra_text} in {res.batches} batch(es)", highlight=False)


DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print how many tasks match; change nothing.")]
UpToOpt = Annotated[
    int | None, typer.Option("--up-to-id", help="Touch no task newer than this id (a dry run prints it).")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, max=10000, help="Tasks per statement.")]


@bulk_cli.command("retry")
def bulk_retry(
    status: StatusOpt = None,
    handler: HandlerOpt = None,
    queue: QueueOpt = None,
    tag: TagOpt = None,
    created_after: AfterOpt = None,
    created_before: BeforeOpt = None,
    parent: ParentOpt = None,
    root: RootOpt = None,
    worker: WorkerOpt = None,
    pod: PodOpt = None,
    run_after: RunAfterOpt = None,
    run_before: RunBeforeOpt = None,
    dry_run: DryRunOpt = False,
    up_to_id: UpToOpt = None,
    batch_size: BatchOpt = 1000,
    database_url: DbOpt = None,
) -> None:
    """Start over every failed task the filter matches (--status cancelled for cancelled ones)."""
    flt = _cli_filter(
        status=status, queue=queue, handler=handler, tag=tag, created_after=created_after,
        created_before=created_before, parent=parent, root=root, worker=worker, pod=pod, run_after=run_after,
        run_before=run_before,
    )  # fmt: skip
    _bulk("retry", flt, dry_run, up_to_id, batch_size, database_url)


@bulk_cli.command("cancel")
def bulk_cancel(
    status: StatusOpt = None,
    handler: HandlerOpt = None,
    queue: QueueOpt = None,
    tag: TagOpt = None,
    created_after: AfterOpt = None,
    created_before: BeforeOpt = None,
    parent: ParentOpt = None,
    root: RootOpt = None,
    worker: WorkerOpt = None,
    pod: PodOpt = None,
    run_after: RunAfterOpt = None,
    run_before: RunBeforeOpt = None,
    dry_run: DryRunOpt = False,
    up_to_id: UpToOpt = None,
    batch_size: BatchOpt = 1000,
    reason: Annotated[str, typer.Option(help="Recorded on each task.")] = "cancelled by a bulk action",
    database_url: DbOpt = None,
) -> None:
    """Cancel every unfinished task the filter matches, with its unfinished descendants."""
    flt = _cli_filter(
        status=status, queue=queue, handler=handler, tag=tag, created_after=created_after,
        created_before=created_before, parent=parent, root=root, worker=worker, pod=pod, run_after=run_after,
        run_before=run_before,
    )  # fmt: skip
    _bulk("cancel", flt, dry_run, up_to_id, batch_size, database_url, reason=reason)


@bulk_cli.command("delete")
def bulk_delete(
    status: StatusOpt = None,
    handler: HandlerOpt = None,
    queue: QueueOpt = None,
    tag: TagOpt = None,
    created_after: AfterOpt = None,
    created_before: BeforeOpt = None,
    parent: ParentOpt = None,
    root: RootOpt = None,
    worker: WorkerOpt = None,
    pod: PodOpt = None,
    run_after: RunAfterOpt = None,
    run_before: RunBeforeOpt = None,
    dry_run: DryRunOpt = False,
    up_to_id: UpToOpt = None,
    batch_size: BatchOpt = 1000,
    database_url: DbOpt = None,
) -> None:
    """Delete every finished task the filter matches, with its events and attempts."""
    flt = _cli_filter(
        status=status, queue=queue, handler=handler, tag=tag, created_after=created_after,
        created_before=created_before, parent=parent, root=root, worker=worker, pod=pod, run_after=run_after,
        run_before=run_before,
    )  # fmt: skip
    _bulk("delete", flt, dry_run, up_to_id, batch_size, database_url)


def _when(option: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationError(
            option, f"must be an ISO 8601 date and time with an offset, got {text!r}"
        ) from None
    if t.tzinfo is None:
        raise ValidationError(option, "must have an offset (2026-11-30T12:00:00+00:00)")
    return t


def _audit_page(kind: str, page: Any, as_json: bool, columns: list[tuple[str, str]]) -> None:
    if _json_out(as_json):
        out.print_json(
            json.dumps({"items": page.items, "next_cursor": page.next_cursor}, default=_json_default)
        )
        return
    table = _table(*(title for title, _ in columns))
    for item in page.items:
        table.add_row(*("" if item.get(k) is None else _cell(item.get(k)) for _, k in columns))
    _show(table)
    more = f" (more: --cursor {page.next_cursor})" if page.next_cursor else ""
    out.print(f"{len(page.items)} {kind} shown{more}", highlight=False, soft_wrap=True)


def _cell(v: object) -> str:
    if isinstance(v, datetime):
        return v.isoformat(timespec="milliseconds")
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


@cli.command()
def events(
    task: Annotated[int | None, typer.Option(help="One task's events.")] = None,
    root: RootOpt = None,
    worker: WorkerOpt = None,
    pod: PodOpt = None,
    kind: Annotated[list[str] | None, typer.Option(help="Repeat for several (retried, failed, ...).")] = None,
    since: Annotated[str | None, typer.Option(help="ISO 8601 with an offset (inclusive).")] = None,
    until: Annotated[str | None, typer.Option(help="ISO 8601 with an offset (exclusive).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 100,
    cursor: CursorOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = "table",
    database_url: DbOpt = None,
) -> None:
    """Recorded events across tasks, newest first: by task, workflow, worker, pod, kind, time."""
    page = _with_app(
        None, database_url,
        lambda a: a.query_events(
            task=task, root=root, worker=worker, pod=pod, kind=kind or None,
            since=_when("--since", since), until=_when("--until", until), cursor=cursor, limit=limit,
        ),
    )  # fmt: skip
    _audit_page(
        "event(s)", page, as_json,
        [("ID", "id"), ("AT", "at"), ("TASK", "task_id"), ("EVENT", "kind"), ("ATTEMPT", "attempt"),
         ("POD", "pod_id"), ("DETAIL", "detail")],
    )  # fmt: skip


@cli.command()
def attempts(
    task: Annotated[int | None, typer.Option(help="One task's attempts.")] = None,
    root: RootOpt = None,
    worker: WorkerOpt = None,
    pod: PodOpt = None,
    outcome: Annotated[
        list[str] | None, typer.Option(help="Repeat for several (failed, timeout, ...).")
    ] = None,
    since: Annotated[str | None, typer.Option(help="ISO 8601 with an offset (inclusive).")] = None,
    until: Annotated[str | None, typer.Option(help="ISO 8601 with an offset (exclusive).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 100,
    cursor: CursorOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = "table",
    database_url: DbOpt = None,
) -> None:
    """Ended attempts across tasks, newest task first: by task, workflow, worker, pod, outcome, time."""
    page = _with_app(
        None, database_url,
        lambda a: a.query_attempts(
            task=task, root=root, worker=worker, pod=pod, outcome=outcome or None,
            since=_when("--since", since), until=_when("--until", until), cursor=cursor, limit=limit,
        ),
    )  # fmt: skip
    _audit_page(
        "attempt(s)", page, as_json,
        [("TASK", "task_id"), ("ATTEMPT", "attempt"), ("OUTCOME", "outcome"), ("POD", "pod_id"),
         ("STARTED", "started_at"), ("FINISHED", "finished_at"), ("ERROR", "error")],
    )  # fmt: skip


@cli.command("retention")
def retention_cmd(
    succeeded: Annotated[
        float | None,
        typer.Option(
            envvar="KUBETASKS_RETENTION_SUCCEEDED", help="Seconds succeeded tasks are kept; 0: for ever."
        ),
    ] = None,
    failed: Annotated[
        float | None,
        typer.Option(envvar="KUBETASKS_RETENTION_FAILED", help="Seconds failed tasks are kept; 0: for ever."),
    ] = None,
    cancelled: Annotated[
        float | None,
        typer.Option(
            envvar="KUBETASKS_RETENTION_CANCELLED", help="Seconds cancelled tasks are kept; 0: for ever."
        ),
    ] = None,
    database_url: DbOpt = None,
) -> None:
    """Run one retention pass now: delete finished tasks (workflow trees whole) kept long enough."""
    the_app = load_app(None, database_url)
    the_app.configure(retention_succeeded=succeeded, retention_failed=failed, retention_cancelled=cancelled)

    async def go() -> Any:
        try:
            return await the_app.run_retention()
        finally:
            await the_app.close()

    res = run_async(go)
    if not res.ran:
        err.print(
            "retention is off (every status kept for ever) or a pass runs elsewhere now", highlight=False
        )
        raise typer.Exit(1)
    more = "" if res.done else "; more are left for the next pass"
    out.print(
        ", ".join(f"{n} {st}" for st, n in res.deleted.items())
        + f" deleted in {res.batches} batch(es){more}",
        highlight=False,
    )


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
def stats(as_json: JsonOpt = False, output: OutputOpt = "table", database_url: DbOpt = None) -> None:
    """Counts per queue and status, oldest pending age, running per worker, unserved handlers."""
    data = _with_app(None, database_url, lambda a: a.stats())
    if _json_out(as_json):
        out.print_json(json.dumps(data))
        return
    table = _table("QUEUE", "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "PAUSED", "SUSPENDED",
                  "OLDEST DUE")  # fmt: skip
    for q, info in sorted(data["queues"].items()):
        c = info["counts"]
        age = info["oldest_pending_s"]
        table.add_row(
            q + (" (paused)" if info["paused"] else ""),
            *(str(c.get(s, 0)) for s in STATUSES),
            "" if age is None else f"{age:.1f}s",
        )  # fmt: skip
    _show(table)
    wt = _table("POD", "WORKER", "STATUS", "QUEUES", "RUNNING", "LEASE LEFT")
    for w in data["workers"]:
        wt.add_row(
            w["pod_id"], w["worker_id"], w["status"], ",".join(w["queues"]),
            f"{w['running']}/{w['concurrency']}", f"{w['lease_left_s']:.1f}s",
        )  # fmt: skip
    _show(wt)
    if data["unserved"]:
        ut = _table("HANDLER", "QUEUE", "WAITING", "WHY", title="Pending tasks no active worker serves")
        for u in data["unserved"]:
            ut.add_row(u["handler"], u["queue"], str(u["tasks"]), u["message"])
        _show(ut)


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


@schedules_cli.command("list")
def schedules_list(
    as_json: JsonOpt = False,
    output: OutputOpt = "table",
    history: Annotated[int, typer.Option(min=0, max=100, help="Recent runs to show per schedule.")] = 0,
    database_url: DbOpt = None,
) -> None:
    """Schedules with their next run, last result and job-lock holder."""
    from kubetasks import cron  # noqa: PLC0415

    rows = _with_app(None, database_url, lambda a: cron.statuses(a, history=history))
    if _json_out(as_json):
        out.print_json(json.dumps([dataclasses.asdict(r) for r in rows], default=_json_default))
        return
    table = _table("NAME", "SCHEDULE", "TIMEZONE", "SUSPEND", "POLICY", "HOLDER", "LAST SCHEDULE", "NEXT",
                  "LAST RESULT", "MISSED", "SOURCE")  # fmt: skip
    for r in rows:
        result = r.last_result or ""
        if r.last_outcome == "skipped" and r.last_reason:
            result = f"{result} (last tick skipped: {r.last_reason})".strip()
        table.add_row(
            r.name, r.cron, r.timezone,
            "true" if r.suspend else f"paused by {r.paused_by}" if r.paused else "false",
            r.concurrency_policy,
            r.holder or "", _fmt_time(r.last_scheduled_at), _fmt_time(r.next_at), result,
            str(r.missed_total), r.source + (" (orphaned)" if r.orphaned else ""),
        )  # fmt: skip
    _show(table)
    if history:
        for r in rows:
            if not r.history:
                continue
            ht = _table("TICK", "OUTCOME", "TASK", "STATUS", "HOLDER / REASON", title=r.name)
            for h in r.history:
                ht.add_row(
                    _fmt_time(h.tick_at) + (" (manual)" if h.manual else ""), h.outcome,
                    "" if h.task_id is None else str(h.task_id), h.status or "",
                    " ".join(x for x in (h.holder, h.reason) if x),
                )  # fmt: skip
            _show(ht)


@schedules_cli.command("trigger")
def schedules_trigger(
    name: Annotated[str, typer.Argument(help="The schedule to run now.")],
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Run a schedule now, respecting concurrencyPolicy Forbid; prints the task id.

    With --app the run gets the handler's own options (timeout, attempts);
    without it, the App defaults. Exit code 1 when the run was refused.
    """
    from kubetasks import cron  # noqa: PLC0415

    res = _with_app(app, database_url, lambda a: cron.trigger(a, name))
    if res.outcome == "enqueued":
        out.print(res.task_id)
        return
    holder = f" (holder {res.holder})" if res.holder else ""
    err.print(f"schedule {name} not run: {res.reason or res.outcome}{holder}")
    raise typer.Exit(1)


@schedules_cli.command("pause")
def schedules_pause(
    name: Annotated[str, typer.Argument(help="The schedule to pause.")],
    by: Annotated[str, typer.Option(help="Who paused it (shown by list).")] = "cli",
    database_url: DbOpt = None,
) -> None:
    """Stop a schedule's ticks until `schedules resume` (whatever its source's suspend says)."""
    changed = _with_app(None, database_url, lambda a: a.pause_schedule(name, by=by))
    out.print(f"schedule {name} paused" if changed else f"schedule {name} was already paused")


@schedules_cli.command("resume")
def schedules_resume(
    name: Annotated[str, typer.Argument(help="The schedule to resume.")], database_url: DbOpt = None
) -> None:
    """Let a paused schedule tick again, from now on (no catch-up run for the paused time)."""
    changed = _with_app(None, database_url, lambda a: a.resume_schedule(name))
    out.print(f"schedule {name} resumed" if changed else f"schedule {name} was not paused")


def _payload_option(payload: str | None) -> dict[str, Any] | None:
    if payload is None:
        return None
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ValidationError("--payload", f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError("--payload", "must be a JSON object")
    return data


ScheduleName = Annotated[str, typer.Argument(help="The schedule's name.")]
CronOpt = Annotated[str | None, typer.Option("--cron", help="Cron expression (5 fields, or 6 with seconds).")]
ScheduleHandlerOpt = Annotated[str | None, typer.Option("--handler", help="The handler each tick runs.")]
TzOpt = Annotated[str | None, typer.Option("--timezone", help="IANA time zone of the expression.")]
SQueueOpt = Annotated[str | None, typer.Option("--queue", help="Default: the handler's own queue.")]
PayloadOpt = Annotated[str | None, typer.Option("--payload", help="JSON object given to each run.")]
PolicyOpt = Annotated[
    str | None, typer.Option("--policy", help="Forbid (default: no overlapping runs) or Allow.")
]
LockTtlOpt = Annotated[int | None, typer.Option("--lock-ttl", help="Seconds of a Forbid run's job lock.")]
DeadlineOpt = Annotated[
    int | None, typer.Option("--starting-deadline", help="Seconds late a tick may start; later: missed.")
]
SuspendOpt = Annotated[bool | None, typer.Option("--suspend/--no-suspend", help="Created or set suspended.")]


@schedules_cli.command("create")
def schedules_create(
    name: ScheduleName,
    cron_expr: CronOpt = None,
    handler: ScheduleHandlerOpt = None,
    timezone: TzOpt = None,
    queue: SQueueOpt = None,
    payload: PayloadOpt = None,
    policy: PolicyOpt = None,
    lock_ttl: LockTtlOpt = None,
    starting_deadline: DeadlineOpt = None,
    suspend: SuspendOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Add a schedule at runtime: every pod's scheduler runs --handler once per tick."""
    if not cron_expr or not handler:
        err.print("[red]error:[/red] --cron and --handler: both are required")
        raise typer.Exit(2)
    data = _payload_option(payload)
    _with_app(
        None, database_url,
        lambda a: a.create_schedule(
            name, cron_expr, handler, timezone=timezone or "UTC", queue=queue, payload=data,
            concurrency_policy=policy or "Forbid", lock_ttl=lock_ttl, starting_deadline=starting_deadline,
            suspend=bool(suspend),
        ),
    )  # fmt: skip
    out.print(f"schedule {name} created")


@schedules_cli.command("update")
def schedules_update(
    name: ScheduleName,
    cron_expr: CronOpt = None,
    handler: ScheduleHandlerOpt = None,
    timezone: TzOpt = None,
    queue: SQueueOpt = None,
    payload: PayloadOpt = None,
    policy: PolicyOpt = None,
    lock_ttl: LockTtlOpt = None,
    starting_deadline: DeadlineOpt = None,
    suspend: SuspendOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Change a schedule made at runtime (one from code or a CronJobLock changes there)."""
    changes = {
        k: v
        for k, v in {
            "cron": cron_expr, "handler": handler, "timezone": timezone, "queue": queue,
            "payload": _payload_option(payload), "concurrency_policy": policy, "lock_ttl": lock_ttl,
            "starting_deadline": starting_deadline, "suspend": suspend,
        }.items()
        if v is not None
    }  # fmt: skip
    _with_app(None, database_url, lambda a: a.update_schedule(name, **changes))
    out.print(f"schedule {name} updated")


@schedules_cli.command("delete")
def schedules_delete(name: ScheduleName, database_url: DbOpt = None) -> None:
    """Delete a schedule made at runtime, with its tick history (its runs stay)."""
    _with_app(None, database_url, lambda a: a.delete_schedule(name))
    out.print(f"schedule {name} deleted")


@schedules_cli.command("prune")
def schedules_prune(dry_run: DryRunOpt = False, database_url: DbOpt = None) -> None:
    """Delete @app.periodic schedules that no active worker's code declares any more."""
    names = _with_app(None, database_url, lambda a: a.prune_schedules(dry_run=dry_run))
    for n in names:
        out.print(n, highlight=False)
    err.print(f"{len(names)} orphaned schedule(s) {'found' if dry_run else 'deleted'}", highlight=False)


RedisOpt = Annotated[
    str | None,
    typer.Option(
        "--redis-url", envvar="KUBETASKS_REDIS_URL", help="redis:// URL; unset: locks in PostgreSQL."
    ),
]


def _lock_app(database_url: str | None, redis_url: str | None) -> App:
    app = load_app(None, database_url)
    if redis_url:
        app.configure(redis_url=redis_url)
    return app


@locks_cli.command("list")
def locks_list(
    prefix: Annotated[str, typer.Option(help="Only locks whose name starts with this.")] = "",
    as_json: JsonOpt = False,
    output: OutputOpt = "table",
    database_url: DbOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Live job locks: name, holder, acquired and expiry (the backend's clock)."""
    the_app = _lock_app(database_url, redis_url)

    async def go() -> Any:
        try:
            return await the_app.list_locks(prefix)
        finally:
            await the_app.close()

    rows = run_async(go)
    if _json_out(as_json):
        out.print_json(json.dumps([r.as_dict() for r in rows]))
        return
    table = _table("NAME", "HOLDER", "ACQUIRED", "EXPIRES", "LEFT", "BACKEND")
    for r in rows:
        table.add_row(
            r.name, r.owner, _fmt_time(r.acquired_at), _fmt_time(r.expires_at),
            "never" if r.expires_at is None else f"{r.expires_in_s:.1f}s", r.backend,
        )  # fmt: skip
    _show(table)


@locks_cli.command("release")
def locks_release(
    name: Annotated[str, typer.Argument(help="The lock to release.")],
    owner: Annotated[
        str | None, typer.Option(help="Release only while this owner holds it (as `locks list` shows).")
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Release it: without this, only say who holds it.")
    ] = False,
    database_url: DbOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Force-release a job lock whoever holds it. Its holder may still be doing the work the
    lock protects (it learns of the loss at its next renewal), and another may start at once."""
    the_app = _lock_app(database_url, redis_url)

    async def go() -> tuple[Any, str | None]:
        try:
            held = [r for r in await the_app.list_locks(name) if r.name == name]
            if not yes or not held:
                return held, None
            return held, await the_app.force_release_lock(name, owner=owner or held[0].owner)
        finally:
            await the_app.close()

    held, taken = run_async(go)
    if not held:
        err.print(f"lock {name} is not held", highlight=False)
        raise typer.Exit(1)
    holder = held[0].owner
    warning = (
        f"WARNING: {holder} holds lock {name}; it may still be doing the work the lock protects. "
        "Released, it learns the loss at its next renewal, and another holder may start at once."
    )
    if not yes:
        err.print(warning + " Run again with --yes to release it.", highlight=False)
        raise typer.Exit(1)
    if taken is None:
        err.print(f"lock {name} changed hands or was released meanwhile: nothing released", highlight=False)
        raise typer.Exit(1)
    err.print(warning, highlight=False)
    out.print(f"lock {name} released (was held by {taken})", highlight=False)


def _json_default(v: object) -> object:
    return v.isoformat() if isinstance(v, datetime) else str(v)


def main() -> None:
    try:
        cli()
    except ValidationError as exc:  # raised while reading options, before any work
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
