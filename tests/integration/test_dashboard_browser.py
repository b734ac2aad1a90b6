"""The dashboard's page in a real Chromium (Debian's chromium package, driven by Playwright;
nothing downloads a browser), against a real dashboard server, worker and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from kubetasks import App
from tests.integration.dashboard_helpers import (
    TOKEN,
    Dash,
    finished,
    running_dashboard,
    running_worker,
)
from tests.support import until

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCRIPT = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
WAIT_MS = 20_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if shutil.which("chromium") is None:
        pytest.fail(
            "Debian's chromium is not installed: `make chromium` (apt-get install chromium)", pytrace=False
        )
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        await b.close()


@pytest.fixture
async def dash(db_url: str) -> AsyncIterator[Dash]:
    async with running_dashboard(db_url, dashboard_writes=True) as d:
        yield d


async def open_page(browser: Browser, d: Dash, route: str = "#/") -> Page:
    """Log in the way `make demo`'s link does (#token=...), then go to ``route``."""
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(d.url + "#token=" + TOKEN)
    await expect(page.get_by_test_id("live")).to_have_text("● live")
    assert "token" not in page.url  # the fragment is dropped at once
    await page.goto(d.url + route)
    page.errors = errors  # type: ignore[attr-defined]
    return page


async def test_overview_renders_with_data(browser: Browser, dash: Dash, db_url: str) -> None:
    """After real runs the overview shows their counts, the failure, the busiest handlers and
    four drawn charts, from the rollups."""
    async with running_worker(db_url) as w:
        ids = [await w.enqueue("dash.ok", {"i": i}) for i in range(7)]
        bad = await w.enqueue("dash.fail", {"msg": "card declined"})
        await until(lambda: finished(w, *ids, bad), 60, "the tasks")
    page = await open_page(browser, dash)
    await expect(page.get_by_test_id("succeeded-total")).to_have_text("7")
    await expect(page.get_by_test_id("failed-total")).to_have_text("1")
    failures = page.get_by_test_id("failures")
    await expect(failures.get_by_role("link", name=f"#{bad}")).to_be_visible()
    await expect(failures).to_contain_text("card declined")
    for chart in ("chart-throughput", "chart-depth", "chart-wait", "chart-run"):
        await expect(page.get_by_test_id(chart).locator("canvas")).to_have_count(1)
    await expect(page.get_by_role("link", name="dash.ok")).to_be_visible()
    assert page.errors == []  # type: ignore[attr-defined]


async def test_a_filter_narrows_the_list(browser: Browser, dash: Dash) -> None:
    """Clicking a status narrows the table to it; a queue filter narrows it further."""
    await dash.app.store.pool.execute(
        "INSERT INTO tasks (handler, queue, status, attempt, finished_at, error) SELECT 'dash.ok', "
        "CASE WHEN g % 2 = 0 THEN 'red' ELSE 'blue' END, "
        "CASE WHEN g % 3 = 0 THEN 'failed' ELSE 'succeeded' END, "
        "1, now(), CASE WHEN g % 3 = 0 THEN 'nope' END FROM generate_series(1, 30) g"
    )
    page = await open_page(browser, dash, "#/tasks")
    rows = page.get_by_test_id("task-table").locator("tbody tr")
    await expect(rows).to_have_count(30)
    await page.get_by_test_id("status-filter").get_by_role("button", name="failed").click()
    await expect(rows).to_have_count(10)
    await page.get_by_label("queue").fill("red")
    await page.get_by_role("button", name="Filter").click()
    await expect(rows).to_have_count(5)
    assert "status=failed" in page.url and "queue=red" in page.url
    for cells in await rows.all():
        await expect(cells.locator("td").nth(2)).to_have_text("red")
        await expect(cells.locator("td").nth(3)).to_have_text("failed")


async def test_retry_from_the_page_changes_the_task_in_the_database(browser: Browser, dash: Dash) -> None:
    """Retry on a failed task's page puts it back to pending in PostgreSQL; a bulk retry counts first,
    then retries exactly the counted tasks."""
    rows = await dash.app.store.pool.fetch(
        "INSERT INTO tasks (handler, queue, status, attempt, finished_at, error) "
        "SELECT 'dash.ok', 'billing', 'failed', 1, now(), 'timeout' FROM generate_series(1, 4) RETURNING id"
    )
    one, *rest = [int(r["id"]) for r in rows]
    page = await open_page(browser, dash, f"#/task/{one}")
    await expect(page.get_by_test_id("task-status")).to_have_text("failed")
    await page.get_by_role("button", name="Retry").click()
    await expect(page.get_by_test_id("task-status")).to_have_text("pending")
    rec = await dash.app.get_task(one)
    assert rec.status == "pending" and rec.error is None
    assert (await dash.app.get_events(one))[-1]["kind"] == "requeued"

    await page.goto(dash.url + "#/tasks?queue=billing&status=failed")
    bulk = page.get_by_test_id("bulk")
    await bulk.get_by_role("button", name="Count").click()
    await expect(bulk).to_contain_text("3 task(s) match")
    await bulk.get_by_role("button", name="Retry 3 task(s)").click()
    await expect(bulk).to_contain_text("Done: 3")
    assert {(await dash.app.get_task(i)).status for i in rest} == {"pending"}


async def test_a_task_no_worker_serves_says_why_it_waits(browser: Browser, dash: Dash) -> None:
    """With no worker up, a pending task's page says why it waits; once the parking pass parked
    it the list marks it parked and the queue page counts it."""
    tid = await dash.app.enqueue("dash.nobody", {}, queue="orphans")
    page = await open_page(browser, dash, f"#/task/{tid}")
    await expect(page.get_by_test_id("task-status")).to_have_text("pending")
    waiting = page.get_by_test_id("waiting")
    await expect(waiting).to_contain_text("no active worker serves handler 'dash.nobody' in queue 'orphans'")
    await expect(waiting).not_to_contain_text("(parked)")
    await dash.app.store.run("park_unserved", [], 0.0, True, 1000)
    await page.reload()
    await expect(page.get_by_test_id("waiting")).to_contain_text("Waiting (parked)")
    await page.goto(dash.url + "#/tasks?queue=orphans")
    row = page.get_by_test_id("task-table").locator(f"tr[data-task='{tid}']")
    await expect(row.locator("td").nth(3)).to_have_text("pending parked")
    await page.goto(dash.url + "#/queues")
    cells = page.get_by_test_id("queues").locator("tr[data-queue='orphans'] td")
    await expect(cells.nth(3)).to_have_text("1")  # pending
    await expect(cells.nth(4)).to_have_text("1")  # parked
    await page.goto(dash.url + "#/pods")
    unserved = page.get_by_test_id("unserved")
    await expect(unserved).to_contain_text("1 task(s) wait: no active worker serves handler 'dash.nobody'")
    assert page.errors == []  # type: ignore[attr-defined]


async def test_a_workflow_graph_shows_its_critical_path(browser: Browser, dash: Dash, db_url: str) -> None:
    """The graph draws every task of the workflow and marks exactly the critical path: root, the
    slowest first-stage fetch, the merge after it."""
    async with running_worker(db_url) as w:
        root = await w.enqueue("dash.flow", {})
        await until(lambda: finished(w, root), 60, "the workflow")
        summary = await w.workflow_summary(root)
    page = await open_page(browser, dash, f"#/workflow/{root}")
    graph = page.get_by_test_id("workflow-graph")
    await expect(graph.locator("g.node")).to_have_count(5)
    critical = graph.locator('g.node[data-critical="true"]')
    await expect(critical).to_have_count(3)
    marked = [int(x) for x in await critical.evaluate_all("els => els.map(e => e.dataset.task)")]
    assert sorted(marked) == sorted(summary.critical_path)
    path = summary.critical_path
    edges = await graph.locator("path.edge.critical").evaluate_all("els => els.map(e => e.dataset.edge)")
    assert sorted(edges) == sorted(f"{a}>{b}" for a, b in itertools.pairwise(path))
    await expect(page.get_by_test_id("critical-path")).to_contain_text(" → ".join(f"#{i}" for i in path))
    await graph.locator(f'g.node[data-task="{path[1]}"]').click()
    await expect(page.get_by_test_id("task-status")).to_have_text("succeeded")
    assert page.url.endswith(f"#/task/{path[1]}")


async def test_a_live_update_appears_without_reload(browser: Browser, dash: Dash, db_url: str) -> None:
    """With the tasks page open, a task enqueued elsewhere appears, then shows as succeeded when a
    worker runs it, pushed by the server: the page is never reloaded and polls nothing."""
    page = await open_page(browser, dash, "#/tasks")
    await expect(page.get_by_test_id("task-table")).to_be_visible()
    await page.evaluate("window.__sameDocument = true")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    # Opening the page may fetch the list once more after the table first shows (1 run in 3
    # here): wait for 1.5 s without a fetch before watching. A page that polls never gets there.
    loop = asyncio.get_running_loop()
    seen, quiet_since, deadline = -1, loop.time(), loop.time() + 15
    while loop.time() - quiet_since < 1.5:
        assert loop.time() < deadline, f"the page keeps fetching: {requests[-5:]}"
        if len(requests) != seen:
            seen, quiet_since = len(requests), loop.time()
        await asyncio.sleep(0.1)
    requests.clear()
    pushed = await page.evaluate("window.__kubetasksEvents || 0")
    await asyncio.sleep(3)
    pushed = await page.evaluate("window.__kubetasksEvents || 0") - pushed
    fetched = [u for u in requests if "/api/v1/" in u]
    # Idle, the page fetches nothing by itself: a fetch here must follow a change the server pushed.
    assert not fetched or pushed > 0, fetched
    new = await dash.app.enqueue("dash.ok", {"hello": "live"})
    row = page.locator(f'tr[data-task="{new}"]')
    await expect(row).to_be_visible()
    await expect(row).to_contain_text("pending")
    async with running_worker(db_url) as w:
        await until(lambda: finished(w, new), 30, "the task")
        await expect(row).to_contain_text("succeeded")
    assert await page.evaluate("window.__sameDocument") is True
    assert await page.evaluate("window.__kubetasksEvents") >= 2


async def test_a_script_payload_stays_inert(browser: Browser, dash: Dash) -> None:
    """Markup in a payload, a result, an error and a tag-like handler input shows as text: no script
    runs, no element is created from it, on the task page, the list and the overview."""
    app: App = dash.app
    shown = await app.enqueue("dash.ok", {"html": SCRIPT})
    [failed] = await app.store.pool.fetch(
        "INSERT INTO tasks (handler, queue, status, attempt, finished_at, error, result) "
        "VALUES ('dash.fail', 'default', 'failed', 1, now(), $1, $2) RETURNING id",
        SCRIPT,
        json.dumps({"r": SCRIPT}),
    )
    page = await open_page(browser, dash, f"#/task/{shown}")
    await expect(page.get_by_test_id("payload")).to_contain_text(json.dumps(SCRIPT))  # JSON, as text
    await page.goto(dash.url + f"#/task/{failed['id']}")
    await expect(page.locator(".error-block pre")).to_have_text(SCRIPT)
    await expect(page.get_by_test_id("result")).to_contain_text("window.__pwned = 1")
    await page.goto(dash.url + "#/tasks")
    await expect(page.get_by_test_id("task-table")).to_contain_text("window.__pwned = 2")
    await page.goto(dash.url + "#/")
    await expect(page.get_by_test_id("failures")).to_contain_text("window.__pwned = 1")
    await asyncio.sleep(0.5)
    assert await page.evaluate("window.__pwned") is None
    assert await page.locator("img").count() == 0
    assert await page.locator("main script").count() == 0


async def test_read_only_page_offers_no_working_action(browser: Browser, db_url: str) -> None:
    """Without writes the page says read-only, its action buttons are disabled, and the task stays failed."""
    async with running_dashboard(db_url) as d:
        [row] = await d.app.store.pool.fetch(
            "INSERT INTO tasks (handler, status, attempt, finished_at, error) "
            "VALUES ('dash.ok', 'failed', 1, now(), 'x') RETURNING id"
        )
        page = await open_page(browser, d, f"#/task/{row['id']}")
        await expect(page.get_by_test_id("read-only")).to_be_visible()
        await expect(page.get_by_role("button", name="Retry")).to_be_disabled()
        assert (await d.app.get_task(row["id"])).status == "failed"
