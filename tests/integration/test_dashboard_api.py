"""The dashboard's HTTP API against the real PostgreSQL, over real HTTP (uvicorn on loopback):
every endpoint, filters and paging, bulk actions, permissions, bad input, live updates."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.dashboard_helpers import (
    TOKEN,
    Dash,
    finished,
    running_dashboard,
    running_worker,
)
from tests.support import until

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def dash(db_url: str) -> AsyncIterator[Dash]:
    async with running_dashboard(db_url, dashboard_writes=True) as d:
        yield d


def client(d: Dash, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=d.url, timeout=30, **kw)


def field(r: httpx.Response) -> str | None:
    body = r.json()
    assert set(body) == {"error"}, body
    return body["error"]["field"]  # type: ignore[no-any-return]


async def test_authentication_sessions_and_csrf(dash: Dash) -> None:
    """No credential: 401. A bearer token reads and writes (no CSRF: a browser never sends it on its
    own). The page's login sets an HttpOnly session cookie; a write riding on that cookie needs the
    CSRF header matching the kt_csrf cookie, and is refused from another origin."""
    [task_id] = await _seed_failed(dash)
    async with client(dash) as c:
        assert (await c.get("api/v1/tasks")).status_code == 401
        assert (await c.get("api/v1/tasks", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await c.get("api/v1/tasks", headers=AUTH)).status_code == 200
        s = (await c.get("api/v1/session")).json()
        assert s == {
            "user": None,
            "auth": "token",
            "writes": True,
            "payloads_hidden": False,
            "csrf_cookie": "kt_csrf",
            "csrf_header": "X-CSRF-Token",
        }
        csrf = c.cookies["kt_csrf"]
        bad = await c.post("api/v1/session", json={"token": "nope"})
        assert bad.status_code == 401 and "kt_session" not in c.cookies
        ok = await c.post("api/v1/session", json={"token": TOKEN})
        assert ok.status_code == 200 and ok.json()["user"] == "token"
        assert (
            "httponly" in ok.headers["set-cookie"].lower()
            and "samesite=strict" in ok.headers["set-cookie"].lower()
        )
        assert TOKEN not in ok.headers["set-cookie"]  # the cookie is an HMAC of the token, not the token
        assert (await c.get("api/v1/tasks")).status_code == 200

        no_csrf = await c.post(f"api/v1/tasks/{task_id}/retry")
        assert no_csrf.status_code == 403 and "X-CSRF-Token" in no_csrf.json()["error"]["message"]
        wrong = await c.post(f"api/v1/tasks/{task_id}/retry", headers={"X-CSRF-Token": "forged"})
        assert wrong.status_code == 403
        cross = await c.post(
            f"api/v1/tasks/{task_id}/retry", headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"}
        )
        assert cross.status_code == 403
        assert (await dash.app.get_task(task_id)).status == "failed"  # none of those wrote anything
        good = await c.post(f"api/v1/tasks/{task_id}/retry", headers={"X-CSRF-Token": csrf})
        assert good.status_code == 200 and good.json() == {
            "ok": True,
            "message": f"task {task_id} queued again",
        }
        assert (await dash.app.get_task(task_id)).status == "pending"

        assert (await c.delete("api/v1/session", headers={"X-CSRF-Token": csrf})).status_code == 200
        assert (await c.get("api/v1/tasks")).status_code == 401
    async with client(dash) as c:
        bearer_write = await c.post(f"api/v1/tasks/{task_id}/cancel", headers=AUTH)
        assert bearer_write.status_code == 200 and bearer_write.json()["ok"] is True


async def test_read_only_refuses_every_write_with_403(db_url: str) -> None:
    """Without KUBETASKS_DASHBOARD_WRITES every action is 403 and nothing changes; reads and
    dry runs still work."""
    async with running_dashboard(db_url) as d:
        [failed] = await _seed_failed(d)
        pending = await d.app.enqueue("dash.ok", {})
        await d.app.store.run(
            "schedule_upsert",
            "nightly",
            "0 3 * * *",
            "UTC",
            "dash.ok",
            "default",
            "{}",
            "Forbid",
            60,
            None,
            False,
            "code",
            None,
            None,
        )
        writes = [
            f"api/v1/tasks/{failed}/retry",
            f"api/v1/tasks/{pending}/cancel",
            f"api/v1/tasks/{pending}/pause",
            f"api/v1/tasks/{pending}/resume",
            "api/v1/queues/default/pause",
            "api/v1/queues/default/resume",
            "api/v1/schedules/nightly/trigger",
            "api/v1/schedules/nightly/pause",
            "api/v1/schedules/nightly/resume",
        ]
        async with client(d, headers=AUTH) as c:
            assert (await c.get("api/v1/session")).json()["writes"] is False
            for path in writes:
                r = await c.post(path)
                assert r.status_code == 403, (path, r.text)
                assert "read-only" in r.json()["error"]["message"]
            bulk = await c.post(
                "api/v1/tasks/bulk", json={"action": "cancel", "filter": {"queue": "default"}}
            )
            assert bulk.status_code == 403
            dry = await c.post(
                "api/v1/tasks/bulk",
                json={"action": "cancel", "filter": {"queue": "default"}, "dry_run": True},
            )
            assert dry.status_code == 200 and dry.json()["count"] == 1
        assert (await d.app.get_task(failed)).status == "failed"
        assert (await d.app.get_task(pending)).status == "pending"
        assert (await d.app.store.run("paused_queues")) == []
        [sched] = await d.app.store.run("schedules_status", ["nightly"])
        assert sched["paused"] is False and sched["last_task_id"] is None


async def test_every_endpoint_against_real_runs(dash: Dash, db_url: str) -> None:
    """Tasks run by a real worker -- successes, a failure, a workflow -- as every read endpoint
    shows them; actions on a task, a queue and a schedule change the database."""
    async with running_worker(db_url) as w:
        ok = await w.enqueue("dash.ok", {"who": "alice"}, tags=["batch-1"])
        bad = await w.enqueue("dash.fail", {"msg": "no such invoice"})
        flow = await w.enqueue("dash.flow", {})
        await until(lambda: finished(w, ok, bad, flow), 60, "the tasks and the workflow")
    await dash.app.store.run(
        "schedule_upsert",
        "every-minute",
        "* * * * *",
        "UTC",
        "dash.ok",
        "default",
        "{}",
        "Allow",
        60,
        None,
        False,
        "code",
        None,
        None,
    )
    async with client(dash, headers=AUTH) as c:

        async def get(path: str, **params: Any) -> Any:
            r = await c.get("api/v1/" + path, params=params)
            assert r.status_code == 200, (path, r.text)
            return r.json()

        page = await get("tasks")
        assert {t["id"] for t in page["items"]} >= {ok, bad, flow} and page["next_cursor"] is None
        detail = await get(f"tasks/{ok}")
        assert detail["status"] == "succeeded" and detail["payload"]["value"] == {"who": "alice"}
        assert detail["result"]["value"] == {"echo": {"who": "alice"}} and detail["tags"] == ["batch-1"]
        assert (await get(f"tasks/{bad}"))["error"] == "no such invoice"
        assert [a["outcome"] for a in await get(f"tasks/{bad}/attempts")] == ["failed"]
        assert [e["kind"] for e in await get(f"tasks/{bad}/events")] == ["created", "claimed", "failed"]
        assert await get(f"tasks/{ok}/payload") == {"who": "alice"}
        assert await get(f"tasks/{ok}/result") == {"echo": {"who": "alice"}}

        wf = await get(f"workflows/{flow}")
        assert wf["tasks"] == 5 and wf["counts"] == {"succeeded": 5}
        slowest = next(n["id"] for n in wf["nodes"] if n["parent_id"] == flow and n["run_s"] >= 0.5)
        merge = max(n["id"] for n in wf["nodes"] if n["parent_id"] == flow)
        assert wf["critical_path"] == [flow, slowest, merge]
        assert {n["id"] for n in wf["nodes"] if n["on_critical_path"]} == {flow, slowest, merge}
        tree = await get("tasks", root=flow)
        assert len(tree["items"]) == 5
        assert len((await get("tasks", parent=flow))["items"]) == 4

        ev = await get("events", kind="failed")
        assert [e["task_id"] for e in ev["items"]] == [bad]
        at = await get("attempts", pod="dash-pod-1", outcome="succeeded")
        assert {a["task_id"] for a in at["items"]} >= {ok, flow}
        assert {a["task_id"] for a in (await get("attempts", root=flow))["items"]} == {
            n["id"] for n in wf["nodes"]
        }

        workers = await get("workers")
        assert workers["live"] == [] and workers["stopped"][0]["pod_id"] == "dash-pod-1"
        [sched] = await get("schedules")
        assert sched["name"] == "every-minute" and sched["paused"] is False and sched["next_at"]

        await until(lambda: _overview_counts(c, 3), 30, "the rollup pass to count the finished tasks")
        ov = await get("overview", window=15)
        assert ov["totals"]["failed"] == 1 and ov["totals"]["succeeded"] >= 6
        assert ov["totals"]["run_p99"] is not None and ov["failures"][0]["id"] == bad
        assert {h["handler"] for h in ov["handlers"]} == {"dash.ok", "dash.fail", "dash.slow", "dash.flow"}
        assert len(ov["series"]) == 15 and ov["all"] is not None
        queues = await get("queues")  # listed for its finished tasks of the last hour
        assert [q["queue"] for q in queues] == ["default"] and queues[0]["pending"] == 0
        assert queues[0]["failed_1h"] == 1

        # Actions change the database.
        r = await c.post(f"api/v1/tasks/{bad}/retry")
        assert r.json()["ok"] is True and (await dash.app.get_task(bad)).status == "pending"
        r = await c.post(f"api/v1/tasks/{bad}/pause")
        assert r.json()["ok"] is True and (await dash.app.get_task(bad)).status == "paused"
        r = await c.post(f"api/v1/tasks/{bad}/resume")
        assert r.json()["ok"] is True and (await dash.app.get_task(bad)).status == "pending"
        r = await c.post(f"api/v1/tasks/{bad}/cancel")
        assert r.json()["ok"] is True and (await dash.app.get_task(bad)).status == "cancelled"
        r = await c.post(f"api/v1/tasks/{bad}/cancel")
        assert r.json() == {"ok": False, "message": f"task {bad} had already ended"}
        assert (await c.post("api/v1/queues/default/pause")).json()["ok"] is True
        assert await dash.app.store.run("paused_queues") and (await get("queues"))[0]["paused"] is True
        await c.post("api/v1/queues/default/resume")
        assert await dash.app.store.run("paused_queues") == []
        assert (await c.post("api/v1/schedules/every-minute/pause")).json()["ok"] is True
        [sched] = await get("schedules")
        assert (
            sched["paused"] is True and sched["paused_by"] == "dashboard:token" and sched["next_at"] is None
        )
        run = (await c.post("api/v1/schedules/every-minute/trigger")).json()
        assert run["ok"] is True and "task" in run["message"]
        assert (await c.post("api/v1/schedules/every-minute/resume")).json()["ok"] is True
        assert (await c.post("api/v1/schedules/nope/pause")).status_code == 404
        assert (await c.get("api/v1/tasks/999999999")).status_code == 404


async def _overview_counts(c: httpx.AsyncClient, n: int) -> bool:
    ov = (await c.get("api/v1/overview", params={"window": 15})).json()
    return int(ov["totals"]["succeeded"]) + int(ov["totals"]["failed"]) >= n


async def test_filters_paging_and_bad_input(dash: Dash, db_url: str) -> None:
    """Filters narrow, cursors page through every match once, and bad input is a 400 naming the field."""
    conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
    try:
        await conn.execute(
            "INSERT INTO tasks (handler, queue, status, finished_at, attempt, tags) SELECT "
            "CASE WHEN g % 10 = 0 THEN 'needle' ELSE 'hay' END, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, "
            "CASE WHEN g % 3 = 0 THEN 'failed' ELSE 'succeeded' END, now(), 1, "
            "CASE WHEN g % 5 = 0 THEN ARRAY['five'] ELSE '{}' END FROM generate_series(1, 300) g"
        )
        expected = {
            r["id"]
            for r in await conn.fetch("SELECT id FROM tasks WHERE handler = 'needle' AND status = 'failed'")
        }
    finally:
        await conn.close()
    async with client(dash, headers=AUTH) as c:
        seen: list[int] = []
        params: dict[str, Any] = {"handler": "needle", "status": "failed", "limit": 3}
        while True:
            r = await c.get("api/v1/tasks", params=params)
            assert r.status_code == 200
            seen += [t["id"] for t in r.json()["items"]]
            if r.json()["next_cursor"] is None:
                break
            params["cursor"] = r.json()["next_cursor"]
        assert seen == sorted(expected, reverse=True)
        both = (await c.get("api/v1/tasks", params=[("queue", "a"), ("tag", "five"), ("limit", 500)])).json()
        assert both["items"] and all(t["queue"] == "a" and "five" in t["tags"] for t in both["items"])
        multi = (await c.get("api/v1/tasks", params={"status": "failed,succeeded", "limit": 500})).json()
        assert len(multi["items"]) == 300

        bad = {
            "api/v1/tasks?colour=red": "colour",
            "api/v1/tasks?cursor=bm90LWEtY3Vyc29y": "cursor",
            "api/v1/tasks?limit=100000": "limit",
            "api/v1/tasks?limit=0": "limit",
            "api/v1/tasks?status=finished": "status",
            "api/v1/tasks?created_after=yesterday": "created_after",
            "api/v1/tasks?worker=me": "worker",
            "api/v1/tasks?root=abc": "root",
            "api/v1/events?kind=boom": "kind",
            "api/v1/events?cursor=x": "cursor",
            "api/v1/attempts?outcome=great": "outcome",
            "api/v1/attempts?limit=501": "limit",
            "api/v1/overview?window=7": "window",
            "api/v1/overview?window=60&queue=no%20spaces": "queue",
            "api/v1/tasks/0": "task_id",
            "api/v1/tasks/abc": "task_id",
            "api/v1/queues?extra=1": "extra",
        }
        for path, name in bad.items():
            r = await c.get(path)
            assert r.status_code == 400, (path, r.text)
            assert field(r) == name, (path, r.text)
            assert name in r.json()["error"]["message"]


async def test_bulk_actions_count_first_and_stay_within_the_count(dash: Dash, db_url: str) -> None:
    """A dry run counts; the confirmed run with its up_to_id touches those tasks and not one added
    later; bad bulk requests are 400s naming the field."""
    first = await _seed_failed(dash, n=5, queue="imports")
    async with client(dash, headers=AUTH) as c:
        dry = (
            await c.post(
                "api/v1/tasks/bulk", json={"action": "retry", "filter": {"queue": "imports"}, "dry_run": True}
            )
        ).json()
        assert (dry["count"], dry["up_to_id"], dry["dry_run"]) == (5, max(first), True)
        late = await _seed_failed(dash, n=2, queue="imports")
        done = (
            await c.post(
                "api/v1/tasks/bulk",
                json={"action": "retry", "filter": {"queue": ["imports"]}, "up_to_id": dry["up_to_id"]},
            )
        ).json()
        assert (done["count"], done["done"]) == (5, True)
        for i in first:
            assert (await dash.app.get_task(i)).status == "pending"
        for i in late:
            assert (await dash.app.get_task(i)).status == "failed"
        gone = (
            await c.post(
                "api/v1/tasks/bulk",
                json={"action": "cancel", "filter": {"queue": "imports", "status": "pending"}},
            )
        ).json()
        assert gone["count"] == 5
        deleted = (
            await c.post(
                "api/v1/tasks/bulk",
                json={
                    "action": "delete",
                    "filter": {"queue": "imports", "created_after": "2000-01-01T00:00:00+00:00"},
                },
            )
        ).json()
        assert deleted["count"] == 7

        for body, name in [
            ({"action": "explode", "filter": {"queue": "x"}}, "action"),
            ({"action": "retry", "filter": {}}, "filter"),
            ({"action": "retry", "filter": {"queue": "x", "size": "big"}}, "size"),
            ({"action": "delete", "filter": {"status": "running"}}, "status"),
            ({"action": "retry", "filter": {"created_before": "soon"}}, "created_before"),
            ({"action": "retry"}, "filter"),
            ({"action": "retry", "filter": {"queue": "x"}, "up_to_id": "many"}, "up_to_id"),
        ]:
            r = await c.post("api/v1/tasks/bulk", json=body)
            assert r.status_code == 400 and field(r) == name, (body, r.text)


async def test_payloads_capped_hidden_and_never_executed(db_url: str) -> None:
    """A large payload is not inlined (the full one is a link away); with payloads hidden neither
    the detail nor the full endpoints show one; a <script> payload comes back as data."""
    script = "<script>window.__pwned = 1</script><img src=x onerror=alert(1)>"
    async with running_dashboard(db_url) as d:
        small = await d.app.enqueue("dash.ok", {"html": script})
        big = await d.app.enqueue("dash.ok", {"blob": "x" * 100_000})
        async with client(d, headers=AUTH) as c:
            s = (await c.get(f"api/v1/tasks/{small}")).json()
            assert s["payload"] == {
                "value": {"html": script},
                "hidden": False,
                "truncated": False,
                "bytes": len(json.dumps({"html": script})),
            }
            assert (await c.get(f"api/v1/tasks/{small}")).headers["content-type"] == "application/json"
            b = (await c.get(f"api/v1/tasks/{big}")).json()
            assert b["payload"]["value"] is None and b["payload"]["truncated"] is True
            assert b["payload"]["bytes"] > 100_000
            assert (await c.get(f"api/v1/tasks/{big}/payload")).json() == {"blob": "x" * 100_000}
    async with running_dashboard(db_url, dashboard_hide_payloads=True) as d, client(d, headers=AUTH) as c:
        s = (await c.get(f"api/v1/tasks/{small}")).json()
        assert s["payload"]["hidden"] is True and s["payload"]["value"] is None and s["traceback"] is None
        assert script not in (await c.get(f"api/v1/tasks/{small}")).text
        assert (await c.get(f"api/v1/tasks/{small}/payload")).status_code == 403
        assert (await c.get("api/v1/session")).json()["payloads_hidden"] is True


async def test_errors_carry_no_stack_trace_query_or_setting(
    dash: Dash, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error is a 500 with a reference to the log: no traceback, no SQL, no URL, no token."""

    async def broken(task_id: int) -> None:
        raise RuntimeError(f"SELECT secret FROM {dash.app.settings.database_url}")

    monkeypatch.setattr(dash.app, "get_task", broken)
    async with client(dash, headers=AUTH) as c:
        r = await c.get("api/v1/tasks/1")
        assert r.status_code == 500
        text = r.text
        for leak in ("Traceback", "SELECT", "postgresql://", TOKEN, "RuntimeError", ".py"):
            assert leak not in text, text
        assert "internal error (ref " in r.json()["error"]["message"]
        assert r.headers["content-security-policy"].startswith("default-src 'self'")
        spec = (await c.get("api/v1/openapi.json")).text
        assert TOKEN not in spec and "postgresql://" not in spec


async def test_openapi_describes_every_endpoint(dash: Dash) -> None:
    async with client(dash) as c:
        spec = (await c.get("api/v1/openapi.json")).json()
    paths = set(spec["paths"])
    for p in (
        "/api/v1/overview",
        "/api/v1/tasks",
        "/api/v1/tasks/bulk",
        "/api/v1/tasks/{task_id}",
        "/api/v1/tasks/{task_id}/attempts",
        "/api/v1/tasks/{task_id}/events",
        "/api/v1/tasks/{task_id}/payload",
        "/api/v1/tasks/{task_id}/result",
        "/api/v1/tasks/{task_id}/retry",
        "/api/v1/tasks/{task_id}/cancel",
        "/api/v1/tasks/{task_id}/pause",
        "/api/v1/tasks/{task_id}/resume",
        "/api/v1/workflows/{task_id}",
        "/api/v1/events",
        "/api/v1/attempts",
        "/api/v1/queues",
        "/api/v1/queues/{queue}/pause",
        "/api/v1/queues/{queue}/resume",
        "/api/v1/schedules",
        "/api/v1/schedules/{name}/trigger",
        "/api/v1/schedules/{name}/pause",
        "/api/v1/schedules/{name}/resume",
        "/api/v1/workers",
        "/api/v1/stream",
        "/api/v1/session",
    ):
        assert p in paths, p
    params = {p["name"] for p in spec["paths"]["/api/v1/tasks"]["get"]["parameters"]}
    assert params >= {
        "status",
        "queue",
        "handler",
        "tag",
        "created_after",
        "created_before",
        "parent",
        "root",
        "worker",
        "pod",
        "cursor",
        "limit",
    }
    assert all(op.get("summary") for ops in spec["paths"].values() for op in ops.values())


async def test_live_stream_pushes_changes_without_polling(dash: Dash, db_url: str) -> None:
    """An open stream hears an enqueue (tasks) and, from the rollup pass, a finish (finished);
    a burst of enqueues arrives as a few coalesced events, not one per task."""
    async with client(dash, headers=AUTH) as c, c.stream("GET", "api/v1/stream") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events: asyncio.Queue[set[str]] = asyncio.Queue()

        async def read() -> None:
            kind = ""
            async for line in stream.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "change":
                    events.put_nowait(set(json.loads(line[6:])["topics"]))
                elif line.startswith("data: ") and kind == "hello":
                    events.put_nowait({"hello"})

        reader = asyncio.create_task(read())
        try:
            assert await asyncio.wait_for(events.get(), 10) == {"hello"}
            await dash.app.enqueue_many([_req(i) for i in range(200)])
            for _ in range(50):
                await dash.app.enqueue("dash.ok", {})
            heard: set[str] = set()
            async with asyncio.timeout(15):
                while "tasks" not in heard:
                    heard |= await events.get()
            await asyncio.sleep(1.5)
            burst = 1 + events.qsize()
            assert burst <= 8, f"{burst} events for 51 enqueue statements: not coalesced"
            async with running_worker(db_url) as w:
                t = await w.enqueue("dash.ok", {})
                await until(lambda: finished(w, t), 30, "the task")
                async with asyncio.timeout(20):
                    while "finished" not in await events.get():
                        pass
        finally:
            reader.cancel()


def _req(i: int) -> Any:
    from kubetasks import EnqueueRequest

    return EnqueueRequest("dash.ok", {"i": i})


async def test_proxy_mode_trusts_its_header_only(db_url: str) -> None:
    """Behind an authenticating proxy: no header, 401; the header's user is who acts, and is recorded."""
    async with running_dashboard(
        db_url,
        dashboard_auth="proxy",
        dashboard_token="",
        dashboard_writes=True,
        dashboard_user_header="X-Auth-Request-User",
    ) as d:
        await d.app.store.run(
            "schedule_upsert",
            "hourly",
            "0 * * * *",
            "UTC",
            "dash.ok",
            "default",
            "{}",
            "Forbid",
            60,
            None,
            False,
            "code",
            None,
            None,
        )
        async with client(d) as c:
            assert (await c.get("api/v1/queues")).status_code == 401
            assert (
                await c.get("api/v1/queues", headers=AUTH)
            ).status_code == 401  # the token means nothing here
            user = {"X-Auth-Request-User": "alice@example.com"}
            assert (await c.get("api/v1/session", headers=user)).json()["user"] == "alice@example.com"
            await c.get("api/v1/session")  # the CSRF cookie
            r = await c.post(
                "api/v1/schedules/hourly/pause", headers={**user, "X-CSRF-Token": c.cookies["kt_csrf"]}
            )
            assert r.status_code == 200, r.text
        [s] = await d.app.store.run("schedules_status", ["hourly"])
        assert s["paused_by"] == "dashboard:alice@example.com"


async def test_the_dashboard_refuses_to_start_without_a_token(db_url: str) -> None:
    from kubetasks.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        async with running_dashboard(db_url, dashboard_token=""):
            pass
    assert exc.value.field == "KUBETASKS_DASHBOARD_TOKEN"


async def _seed_failed(d: Dash, n: int = 1, queue: str = "default") -> list[int]:
    rows = await d.app.store.pool.fetch(
        "INSERT INTO tasks (handler, queue, status, attempt, error, finished_at) "
        "SELECT 'dash.fail', $1, 'failed', 1, 'boom', now() FROM generate_series(1, $2::int) RETURNING id",
        queue,
        n,
    )
    return [int(r["id"]) for r in rows]


async def test_a_task_no_worker_serves_says_why_it_waits(dash: Dash, db_url: str) -> None:
    """A pending task whose handler no active worker serves: its page says why it waits, from
    the workers (before the parking pass ran) and once parked; the listing marks it parked and
    the queue page counts it among the pending and apart as parked. A served one says nothing."""
    async with running_worker(db_url) as w, client(dash, headers=AUTH) as c:
        served = await w.enqueue("dash.ok", {}, delay=3600)
        lost = await dash.app.enqueue("dash.nobody", {})

        async def get(path: str) -> Any:
            r = await c.get(f"/api/v1/{path}")
            assert r.status_code == 200, r.text
            return r.json()

        t = await get(f"tasks/{lost}")
        assert t["status"] == "pending"
        assert "no active worker serves handler 'dash.nobody' in queue 'default'" in t["waiting"], t
        assert (await get(f"tasks/{served}"))["waiting"] is None

        async def parked() -> bool:
            await dash.app.store.run("park_unserved", [], 0.0, True, 1000)
            return bool((await get(f"tasks/{lost}"))["parked"])

        await until(parked, 30, "the parking pass to park the unserved task")
        t = await get(f"tasks/{lost}")
        assert t["status"] == "pending" and t["waiting"], t
        assert not (await get(f"tasks/{served}"))["parked"]
        items = {i["id"]: i for i in (await get("tasks?status=pending&limit=50"))["items"]}
        assert items[lost]["parked"] is True and items[served]["parked"] is False
        (q,) = [q for q in await get("queues") if q["queue"] == "default"]
        assert q["parked"] == 1 and q["pending"] == 2, q
        pods = await get("workers")
        assert [(u["handler"], u["queue"], u["tasks"]) for u in pods["unserved"]] == [
            ("dash.nobody", "default", 1)
        ]
        assert "dash.nobody" in pods["unserved"][0]["message"]
        (me,) = pods["live"]
        assert "dash.ok" in me["handlers"] and "dash.nobody" not in me["handlers"]


async def test_api_responses_carry_the_servers_time(dash: Dash) -> None:
    """Every API response, refusals included, says how long the server took (Server-Timing, read
    by browsers' developer tools and bench/dashboard.py); the page itself does not."""
    async with client(dash) as c:
        for r in (await c.get("/api/v1/tasks", headers=AUTH), await c.get("/api/v1/tasks")):
            kind, dur = r.headers["server-timing"].split(";dur=")
            assert kind == "app" and 0 <= float(dur) < 60_000, r.headers
        assert (await c.get("/api/v1/tasks")).status_code == 401
        assert "server-timing" not in (await c.get("/")).headers
