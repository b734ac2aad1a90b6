// The pages. Each loads through useLive with the topics it shows, so the live stream
// refreshes exactly what changed and nothing polls.
import { useState, useEffect } from "preact/hooks";
import { call } from "./api.js";
import { TimeChart, WorkflowGraph } from "./charts.js";
import {
  ActionButton, Empty, ErrorBox, Json, STATUSES, Status, TaskLink, fmtAgo, fmtNumber, fmtSeconds,
  fmtTime, html, useLive,
} from "./ui.js";

const WINDOWS = [
  [15, "15 min"],
  [60, "1 hour"],
  [360, "6 hours"],
  [1440, "24 hours"],
];

function readOnlyTitle(session) {
  return session && !session.writes ? "read-only: the dashboard's operator has not allowed actions" : "";
}

// -- overview --------------------------------------------------------------------------------

export function Overview({ session }) {
  const [windowMin, setWindow] = useState(60);
  const [queue, setQueue] = useState("");
  const { data, error } = useLive(
    () => call("overview", { query: { window: windowMin, queue: queue || undefined } }),
    ["finished", "depth", "tasks"],
    [windowMin, queue],
  );
  if (!data) return html`<${ErrorBox} error=${error} />${error ? null : html`<p>Loading…</p>`}`;
  const series = data.series;
  const lastFull = series.length > 1 ? series[series.length - 2] : series[series.length - 1] || {};
  const perMin = lastFull ? (lastFull.succeeded + lastFull.failed + lastFull.cancelled) / data.step : 0;
  const all = data.all || {};
  const t = data.totals;
  const range = [new Date(series[0].at).getTime() / 1000, new Date(data.now).getTime() / 1000];
  return html`<section class="overview">
    <div class="toolbar">
      <h1>Overview</h1>
      <label>Window <select value=${windowMin} onChange=${(e) => setWindow(Number(e.target.value))}>
        ${WINDOWS.map(([v, l]) => html`<option value=${v}>${l}</option>`)}
      </select></label>
      <label>Queue <select value=${queue} onChange=${(e) => setQueue(e.target.value)}>
        <option value="">all queues</option>
        ${(data.queues || []).map((q) => html`<option value=${q.queue}>${q.queue}</option>`)}
      </select></label>
    </div>
    <${ErrorBox} error=${error} />
    <div class="cards" data-testid="kpis">
      <div class="card"><span class="k">Finished / min</span><span class="v">${fmtNumber(Math.round(perMin))}</span>
        <span class="s">last full ${data.step === 1 ? "minute" : `${data.step} min`}</span></div>
      <div class="card"><span class="k">Succeeded</span><span class="v ok" data-testid="succeeded-total">${fmtNumber(t.succeeded)}</span>
        <span class="s">in the window</span></div>
      <div class=${"card" + (t.failed ? " alarm" : "")}><span class="k">Failed</span>
        <span class="v bad" data-testid="failed-total">${fmtNumber(t.failed)}</span><span class="s">in the window</span></div>
      <div class="card"><span class="k">Pending due</span><span class="v">${fmtNumber(all.due)}</span>
        <span class="s">${fmtNumber(all.pending)} pending in all</span></div>
      <div class="card"><span class="k">Running</span><span class="v">${fmtNumber(data.workers.running)}</span>
        <span class="s">of ${fmtNumber(data.workers.slots)} slots, ${data.workers.pods} pods</span></div>
      <div class="card"><span class="k">Oldest due task waits</span><span class="v">${fmtSeconds(all.oldest_due_s)}</span>
        <span class="s">sampled ${data.depth_age_s === null ? "never" : fmtSeconds(data.depth_age_s) + " ago"}</span></div>
      <div class="card"><span class="k">Wait p95</span><span class="v">${fmtSeconds(t.wait_p95)}</span>
        <span class="s">due → start</span></div>
      <div class="card"><span class="k">Run p95</span><span class="v">${fmtSeconds(t.run_p95)}</span>
        <span class="s">start → finish</span></div>
    </div>
    <div class="charts">
      <${TimeChart} range=${range} testid="chart-throughput" title="Finished tasks per ${data.step === 1 ? "minute" : data.step + " minutes"}"
        points=${series} series=${[
          { label: "succeeded", key: "succeeded", bars: true },
          { label: "failed", key: "failed", bars: true },
          { label: "cancelled", key: "cancelled" },
        ]} />
      <${TimeChart} range=${range} testid="chart-depth" title="Queue depth"
        points=${data.depth} series=${[
          { label: "pending", key: "pending", points: true },
          { label: "due", key: "due", points: true },
          { label: "running", key: "running", points: true },
          { label: "held", key: "held", points: true },
        ]} />
      <${TimeChart} range=${range} testid="chart-wait" title="Wait, due → start" seconds log
        points=${series} series=${[
          { label: "p50", key: "wait_p50", points: true, color: "#3f7be0" },
          { label: "p95", key: "wait_p95", points: true, color: "#e09b2d" },
          { label: "p99", key: "wait_p99", points: true, color: "#d64545" },
        ]} />
      <${TimeChart} range=${range} testid="chart-run" title="Run time, start → finish" seconds log
        points=${series} series=${[
          { label: "p50", key: "run_p50", points: true, color: "#3f7be0" },
          { label: "p95", key: "run_p95", points: true, color: "#e09b2d" },
          { label: "p99", key: "run_p99", points: true, color: "#d64545" },
        ]} />
    </div>
    <div class="two">
      <div>
        <h2>Queues now</h2>
        ${data.queues.length ? html`<table data-testid="overview-queues">
          <thead><tr><th>queue</th><th>due</th><th>pending</th><th>running</th><th>held</th><th>oldest due</th></tr></thead>
          <tbody>${data.queues.map((q) => html`<tr>
            <td><a href=${"#/tasks?queue=" + encodeURIComponent(q.queue)}>${q.queue}</a></td>
            <td>${fmtNumber(q.due)}</td><td>${fmtNumber(q.pending)}</td><td>${fmtNumber(q.running)}</td>
            <td>${fmtNumber(q.held)}</td><td>${fmtSeconds(q.oldest_due_s)}</td></tr>`)}</tbody>
        </table>` : html`<${Empty}>No queue has unfinished tasks.</${Empty}>`}
        <h2>Busiest handlers</h2>
        ${data.handlers.length ? html`<table>
          <thead><tr><th>handler</th><th>queue</th><th>succeeded</th><th>failed</th><th>cancelled</th></tr></thead>
          <tbody>${data.handlers.slice(0, 12).map((r) => html`<tr>
            <td><a href=${"#/tasks?handler=" + encodeURIComponent(r.handler)}>${r.handler}</a></td><td>${r.queue}</td>
            <td>${fmtNumber(r.succeeded)}</td><td class=${r.failed ? "bad" : ""}>${fmtNumber(r.failed)}</td>
            <td>${fmtNumber(r.cancelled)}</td></tr>`)}</tbody>
        </table>` : html`<${Empty}>Nothing finished in this window.</${Empty}>`}
      </div>
      <div>
        <h2>Recent failures</h2>
        ${data.failures.length ? html`<table data-testid="failures">
          <thead><tr><th>task</th><th>handler</th><th>finished</th><th>error</th></tr></thead>
          <tbody>${data.failures.map((f) => html`<tr>
            <td><${TaskLink} id=${f.id} /></td><td>${f.handler}</td><td title=${fmtTime(f.finished_at)}>${fmtAgo(f.finished_at)}</td>
            <td class="error-text">${f.error}</td></tr>`)}</tbody>
        </table>` : html`<${Empty}>No failed task.</${Empty}>`}
      </div>
    </div>
  </section>`;
}

// -- tasks -------------------------------------------------------------------------------------

const FILTER_FIELDS = [
  ["queue", "queue"], ["handler", "handler"], ["tag", "tag"], ["pod", "pod"], ["worker", "worker id"],
  ["parent", "parent id"], ["root", "workflow root id"], ["created_after", "created after (ISO)"],
  ["created_before", "created before (ISO)"],
];

function parseQuery(qs) {
  const out = {};
  for (const [k, v] of new URLSearchParams(qs || "")) {
    out[k] = out[k] ? out[k] + "," + v : v;
  }
  return out;
}

function toQuery(filter) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(filter)) if (v) q.set(k, v);
  return q.toString();
}

export function Tasks({ query, session }) {
  const filter = parseQuery(query);
  const [draft, setDraft] = useState(filter);
  const [search, setSearch] = useState("");
  const [items, setItems] = useState(null);
  const [cursor, setCursor] = useState(null);
  const [scanned, setScanned] = useState(null);
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const key = toQuery(filter);

  // A page is filled from as many bounded windows as it takes (at most eight per click).
  const fetchMore = async (from, into) => {
    setBusy(true);
    let got = into;
    let next = from;
    try {
      for (let i = 0; i < 8; i++) {
        const page = await call("tasks", { query: { ...filter, limit: 50, cursor: next || undefined } });
        got = got.concat(page.items);
        next = page.next_cursor;
        setScanned(page.scanned_from);
        if (!next || got.length - into.length >= 50) break;
      }
      setItems(got);
      setCursor(next);
      setError(null);
    } catch (e) {
      setError(e);
      setItems(got);
    } finally {
      setBusy(false);
    }
  };
  const live = useLive(async () => {
    await fetchMore(null, []);
    return true;
  }, ["tasks", "finished"], [key]);
  useEffect(() => setDraft(filter), [key]);

  const apply = (e) => {
    e.preventDefault();
    location.hash = "#/tasks" + (toQuery(draft) ? "?" + toQuery(draft) : "");
  };
  const toggleStatus = (st) => {
    const cur = new Set((filter.status || "").split(",").filter(Boolean));
    if (cur.has(st)) cur.delete(st);
    else cur.add(st);
    location.hash = "#/tasks?" + toQuery({ ...filter, status: [...cur].join(",") });
  };
  const onSearch = (e) => {
    e.preventDefault();
    const s = search.trim().replace(/^#/, "");
    if (/^\d+$/.test(s)) location.hash = "#/task/" + s;
    else if (s.startsWith("tag:")) location.hash = "#/tasks?" + toQuery({ ...filter, tag: s.slice(4) });
    else if (s) location.hash = "#/tasks?" + toQuery({ ...filter, handler: s });
  };
  const statuses = new Set((filter.status || "").split(",").filter(Boolean));
  return html`<section>
    <div class="toolbar">
      <h1>Tasks</h1>
      <form class="search" onSubmit=${onSearch}>
        <input placeholder="task id, handler or tag:name" value=${search} onInput=${(e) => setSearch(e.target.value)}
          aria-label="search" />
        <button type="submit">Go</button>
      </form>
    </div>
    <div class="chips" data-testid="status-filter">
      ${STATUSES.map((st) => html`<button type="button" class=${"chip st-" + st + (statuses.has(st) ? " on" : "")}
        aria-pressed=${statuses.has(st)} onClick=${() => toggleStatus(st)}>${st}</button>`)}
    </div>
    <form class="filters" onSubmit=${apply}>
      ${FILTER_FIELDS.map(([k, label]) => html`<label>${label}
        <input name=${k} value=${draft[k] || ""} onInput=${(e) => setDraft({ ...draft, [k]: e.target.value })} /></label>`)}
      <button type="submit">Filter</button>
      <a class="button" href="#/tasks">Clear</a>
    </form>
    <${Bulk} filter=${filter} session=${session} done=${live.reload} />
    <${ErrorBox} error=${error} />
    ${items === null ? html`<p>Loading…</p>` : html`<table class="tasks" data-testid="task-table">
      <thead><tr><th>id</th><th>handler</th><th>queue</th><th>status</th><th>attempts</th><th>pod</th>
        <th>created</th><th>took</th><th>error</th></tr></thead>
      <tbody>${items.map((t) => html`<tr data-task=${t.id}>
        <td><${TaskLink} id=${t.id} /></td><td>${t.handler}</td><td>${t.queue}</td><td><${Status} status=${t.status} />${t.parked
          ? html` <span class="badge parked" title="no active worker serves this handler in this queue">parked</span>` : null}</td>
        <td>${t.attempts_spent}/${t.max_attempts}</td><td>${t.pod_id || ""}</td>
        <td title=${fmtTime(t.created_at)}>${fmtAgo(t.created_at)}</td>
        <td>${t.finished_at && t.started_at ? fmtSeconds((new Date(t.finished_at) - new Date(t.started_at)) / 1000) : ""}</td>
        <td class="error-text">${t.error || ""}</td></tr>`)}</tbody>
    </table>`}
    ${items && !items.length && !cursor ? html`<${Empty}>No task matches.</${Empty}>` : null}
    ${cursor ? html`<p class="more">
      <button disabled=${busy} onClick=${() => fetchMore(cursor, items)}>${busy ? "Searching…" : "Load older"}</button>
      ${scanned ? html`<span class="muted"> searched down to task #${scanned}</span>` : null}</p>` : null}
  </section>`;
}

function Bulk({ filter, session, done }) {
  const [action, setAction] = useState("retry");
  const [count, setCount] = useState(null);
  const [progress, setProgress] = useState(null);
  const [error, setError] = useState(null);
  const crit = { ...filter };
  const body = (extra) => ({ action, filter: crit, ...extra });
  const dry = async () => {
    setError(null);
    setProgress(null);
    try {
      setCount(await call("tasks/bulk", { method: "POST", body: body({ dry_run: true }) }));
    } catch (e) {
      setError(e);
      setCount(null);
    }
  };
  const confirm = async () => {
    setError(null);
    let total = 0;
    let after = 0;
    try {
      for (;;) {
        const r = await call("tasks/bulk", {
          method: "POST", body: body({ dry_run: false, up_to_id: count.up_to_id, after_id: after }),
        });
        total += r.count;
        setProgress({ done: r.done, total, descendants: r.descendants });
        if (r.done) break;
        after = r.resume_after;
      }
      setCount(null);
      done && done();
    } catch (e) {
      setError(e);
    }
  };
  const verb = { retry: "Retry", cancel: "Cancel", delete: "Delete" }[action];
  return html`<div class="bulk" data-testid="bulk">
    <strong>Bulk action on the tasks this filter matches:</strong>
    <select value=${action} onChange=${(e) => { setAction(e.target.value); setCount(null); }} aria-label="bulk action">
      <option value="retry">retry (failed)</option>
      <option value="cancel">cancel (unfinished)</option>
      <option value="delete">delete (finished)</option>
    </select>
    <button onClick=${dry}>Count</button>
    ${count ? html`<span class="confirm">${fmtNumber(count.count)} task(s) match${count.up_to_id ? ` (up to #${count.up_to_id})` : ""}.
      ${count.count ? html`<button class="danger" disabled=${!session.writes} title=${readOnlyTitle(session)}
        onClick=${confirm}>${verb} ${fmtNumber(count.count)} task(s)</button>` : null}</span>` : null}
    ${progress ? html`<span class="msg ok" role="status">${progress.done ? "Done" : "Working"}: ${fmtNumber(progress.total)}
      ${action === "cancel" && progress.descendants ? ` (+${progress.descendants} descendants)` : ""}</span>` : null}
    <${ErrorBox} error=${error} />
  </div>`;
}

// -- one task -------------------------------------------------------------------------------------

function Timeline({ attempts, events, task }) {
  const rows = attempts.filter((a) => a.started_at);
  if (task.status === "running" && task.started_at) {
    rows.push({ attempt: task.attempt, started_at: task.started_at, finished_at: null, outcome: "running",
      pod_id: task.pod_id, worker_id: task.worker_id });
  }
  if (!rows.length) return html`<${Empty}>No attempt has started.</${Empty}>`;
  const now = Date.now();
  const t0 = Math.min(...rows.map((r) => new Date(r.started_at).getTime()));
  const t1 = Math.max(now, ...rows.map((r) => (r.finished_at ? new Date(r.finished_at).getTime() : now)));
  const span = Math.max(1, t1 - t0);
  const fenced = events.filter((e) => e.kind === "fenced_out");
  return html`<div class="timeline" data-testid="timeline">
    ${rows.map((r) => {
      const a = new Date(r.started_at).getTime();
      const b = r.finished_at ? new Date(r.finished_at).getTime() : now;
      const left = ((a - t0) / span) * 100;
      const width = Math.max(2, ((b - a) / span) * 100);
      const marks = fenced.filter((e) => e.attempt === r.attempt);
      return html`<div class="tl-row">
        <span class="tl-label">attempt ${r.attempt}<br /><small>${r.pod_id || "?"} · ${(r.worker_id || "").slice(0, 8)}</small></span>
        <span class="tl-track">
          <span class=${"tl-bar oc-" + r.outcome} style=${{ left: left + "%", width: width + "%" }}
            title=${`${r.outcome}: ${fmtTime(r.started_at)} → ${r.finished_at ? fmtTime(r.finished_at) : "now"}`}>
            ${r.outcome} ${fmtSeconds((b - a) / 1000)}</span>
          ${marks.map((m) => html`<span class="tl-fence" style=${{ left: ((new Date(m.at).getTime() - t0) / span) * 100 + "%" }}
            title=${"fenced-out write: " + (m.detail || "")}>✕</span>`)}
        </span>
      </div>`;
    })}
    ${fenced.length ? html`<p class="muted">✕ a write of this attempt refused after the task was taken from it (fenced out).</p>` : null}
  </div>`;
}

function Payload({ title, box, url, testid }) {
  if (!box) return null;
  if (box.hidden) return html`<div><h3>${title}</h3><p class="muted">hidden on this dashboard</p></div>`;
  if (box.truncated) {
    return html`<div><h3>${title}</h3><p class="muted">${fmtNumber(box.bytes)} bytes: too large to show here.
      <a href=${url} target="_blank" rel="noreferrer">Open it as JSON</a></p></div>`;
  }
  return html`<div data-testid=${testid}><h3>${title}</h3><${Json} value=${box.value} label=${title} /></div>`;
}

export function Task({ id, session }) {
  const { data, error, reload } = useLive(async () => {
    const [task, attempts, events] = await Promise.all([
      call(`tasks/${id}`), call(`tasks/${id}/attempts`), call(`tasks/${id}/events`),
    ]);
    return { task, attempts, events };
  }, ["tasks", "finished", "depth"], [id]);
  if (!data) return html`<${ErrorBox} error=${error} />${error ? null : html`<p>Loading…</p>`}`;
  const { task, attempts, events } = data;
  const ro = !session.writes;
  const title = readOnlyTitle(session);
  const w = task.worker;
  const hasChildren = Object.keys(task.children || {}).length > 0;
  return html`<section class="task">
    <div class="toolbar">
      <h1>Task #${task.id} <small>${task.handler}</small></h1>
      <span data-testid="task-status"><${Status} status=${task.status} /></span>
      <span class="actions">
        ${["failed", "cancelled"].includes(task.status) ? html`<${ActionButton} label="Retry" disabled=${ro} title=${title}
          action=${() => call(`tasks/${id}/retry`, { method: "POST" })} done=${reload} />` : null}
        ${["pending", "running", "paused", "suspended"].includes(task.status) ? html`<${ActionButton} label="Cancel" danger
          disabled=${ro} title=${title} action=${() => call(`tasks/${id}/cancel`, { method: "POST" })} done=${reload} />` : null}
        ${task.status === "pending" || (task.status === "running" && !task.pause_requested_at)
          ? html`<${ActionButton} label="Pause" disabled=${ro} title=${title}
          action=${() => call(`tasks/${id}/pause`, { method: "POST" })} done=${reload} />` : null}
        ${task.status === "paused" || task.pause_requested_at ? html`<${ActionButton} label="Resume" disabled=${ro} title=${title}
          action=${() => call(`tasks/${id}/resume`, { method: "POST" })} done=${reload} />` : null}
      </span>
    </div>
    <${ErrorBox} error=${error} />
    ${task.waiting ? html`<p class="waiting" role="status" data-testid="waiting">Waiting${task.parked ? " (parked)" : ""}:
      ${task.waiting}. It runs when a worker that serves it starts.</p>` : null}
    <dl class="facts">
      <dt>queue</dt><dd><a href=${"#/tasks?queue=" + encodeURIComponent(task.queue)}>${task.queue}</a> (priority ${task.priority})</dd>
      <dt>attempts</dt><dd>${task.attempts_spent} of ${task.max_attempts} spent (latest run #${task.attempt})</dd>
      <dt>created</dt><dd>${fmtTime(task.created_at)}</dd>
      <dt>due</dt><dd>${fmtTime(task.run_at)}</dd>
      <dt>started</dt><dd>${fmtTime(task.started_at)}</dd>
      <dt>finished</dt><dd>${fmtTime(task.finished_at)}</dd>
      <dt>pod / worker</dt><dd>${task.pod_id || "–"} ${task.worker_id ? html`<small>${task.worker_id}</small>` : null}</dd>
      ${w && task.status === "running" ? html`<dt>lease</dt><dd data-testid="lease">${w.status}, ${fmtSeconds(w.lease_left_s)} left
        (epoch ${w.epoch}, heartbeat ${fmtAgo(w.heartbeat_at)})</dd>` : null}
      ${task.progress !== null ? html`<dt>progress</dt><dd><progress max="100" value=${task.progress}></progress>
        ${task.progress}% ${task.progress_message || ""}</dd>` : null}
      ${task.tags.length ? html`<dt>tags</dt><dd>${task.tags.map((t) => html`<a class="tag" href=${"#/tasks?tag=" + encodeURIComponent(t)}>${t}</a> `)}</dd>` : null}
      ${task.parent_id ? html`<dt>parent</dt><dd><${TaskLink} id=${task.parent_id} /></dd>` : null}
      ${hasChildren ? html`<dt>children</dt><dd>${Object.entries(task.children).map(([s, n]) => `${n} ${s}`).join(", ")}
        · <a href=${"#/workflow/" + task.id}>workflow graph</a></dd>` : null}
      ${task.dedupe_key ? html`<dt>dedupe key</dt><dd>${task.dedupe_key}</dd>` : null}
    </dl>
    ${task.error ? html`<div class="error-block"><h3>Error</h3><pre>${task.error}</pre>
      ${task.traceback ? html`<details><summary>traceback</summary><pre>${task.traceback}</pre></details>` : null}</div>` : null}
    <h2>Attempts</h2>
    <${Timeline} attempts=${attempts} events=${events} task=${task} />
    ${attempts.length ? html`<table><thead><tr><th>#</th><th>outcome</th><th>pod</th><th>worker</th><th>started</th><th>took</th><th>error</th></tr></thead>
      <tbody>${attempts.map((a) => html`<tr><td>${a.attempt}</td><td><span class=${"badge oc-" + a.outcome}>${a.outcome}</span></td>
        <td>${a.pod_id || ""}</td><td><small>${(a.worker_id || "").slice(0, 8)}</small></td><td>${fmtTime(a.started_at)}</td>
        <td>${fmtSeconds(a.duration_s)}</td><td class="error-text">${a.error || ""}</td></tr>`)}</tbody></table>` : null}
    <div class="two">
      <${Payload} title="Payload" box=${task.payload} url=${`api/v1/tasks/${id}/payload`} testid="payload" />
      <${Payload} title="Result" box=${task.result} url=${`api/v1/tasks/${id}/result`} testid="result" />
    </div>
    <h2>Events</h2>
    <table data-testid="events"><thead><tr><th>at</th><th>event</th><th>attempt</th><th>pod</th><th>detail</th></tr></thead>
      <tbody>${events.map((e) => html`<tr class=${"ev-" + e.kind}><td>${fmtTime(e.at)}</td><td>${e.kind}</td>
        <td>${e.attempt ?? ""}</td><td>${e.pod_id || ""}</td><td>${e.detail || ""}</td></tr>`)}</tbody></table>
  </section>`;
}

// -- workflow -----------------------------------------------------------------------------------------

export function Workflow({ id }) {
  const { data, error } = useLive(() => call(`workflows/${id}`), ["tasks", "finished", "depth"], [id]);
  if (!data) return html`<${ErrorBox} error=${error} />${error ? null : html`<p>Loading…</p>`}`;
  const big = data.nodes.length > 400;
  return html`<section class="workflow">
    <div class="toolbar"><h1>Workflow #${data.root_id}</h1>
      <a href=${"#/tasks?root=" + data.root_id}>its tasks as a list</a></div>
    <${ErrorBox} error=${error} />
    <dl class="facts">
      <dt>tasks</dt><dd>${data.tasks}: ${Object.entries(data.counts).map(([s, n]) => `${n} ${s}`).join(", ")}</dd>
      <dt>time</dt><dd>${fmtSeconds(data.total_s)} running in all, ${fmtSeconds(data.wall_s)} wall</dd>
      <dt>retries</dt><dd>${data.retries}</dd>
      <dt>critical path</dt><dd data-testid="critical-path">${fmtSeconds(data.critical_path_s)}:${" "}
        ${data.critical_path.map((tid, i) => html`${i ? " → " : ""}<${TaskLink} id=${tid} />`)}</dd>
    </dl>
    ${data.truncated ? html`<p class="muted">Showing ${data.nodes.length} of ${data.tasks} tasks (the critical path always).</p>` : null}
    ${big ? html`<p class="muted">Too many tasks to draw; the list:</p>
      <table><tbody>${data.nodes.map((n) => html`<tr class=${n.on_critical_path ? "critical" : ""}>
        <td><${TaskLink} id=${n.id} /></td><td>${n.handler}</td><td><${Status} status=${n.status} /></td><td>${fmtSeconds(n.run_s)}</td></tr>`)}</tbody></table>`
      : html`<${WorkflowGraph} nodes=${data.nodes} path=${data.critical_path}
          onOpen=${(tid) => { location.hash = "#/task/" + tid; }} />
      <p class="legend"><span class="crit-swatch"></span> critical path: the chain of dependent tasks with the most
        running time · solid: spawned by · dashed: spawned after that sibling ended</p>`}
  </section>`;
}

// -- schedules ------------------------------------------------------------------------------------

export function Schedules({ session }) {
  const { data, error, reload } = useLive(() => call("schedules"), ["schedules", "tasks", "finished"], []);
  if (!data) return html`<${ErrorBox} error=${error} />${error ? null : html`<p>Loading…</p>`}`;
  const ro = !session.writes;
  const title = readOnlyTitle(session);
  const enc = (n) => n.split("/").map(encodeURIComponent).join("/");
  return html`<section>
    <div class="toolbar"><h1>Schedules</h1></div>
    <${ErrorBox} error=${error} />
    ${data.length ? html`<table data-testid="schedules">
      <thead><tr><th>name</th><th>schedule</th><th>state</th><th>next</th><th>last run</th><th>lock holder</th><th>missed</th><th></th></tr></thead>
      <tbody>${data.map((s) => html`<tr>
        <td>${s.name}<br /><small>${s.handler} · ${s.queue} · ${s.source}</small></td>
        <td><code>${s.cron}</code> <small>${s.timezone}, ${s.concurrency_policy}</small></td>
        <td>${s.paused ? html`<span class="badge st-paused">paused</span> <small>by ${s.paused_by}</small>`
          : s.suspend ? html`<span class="badge st-suspended">suspended</span>` : html`<span class="badge st-running">active</span>`}</td>
        <td>${s.next_at ? html`<span title=${fmtTime(s.next_at)}>${fmtAgo(s.next_at)}</span>` : "–"}</td>
        <td>${s.last_task_id ? html`<${TaskLink} id=${s.last_task_id} /> ${s.last_result ? html`<${Status} status=${s.last_result} />` : null}` : "–"}
          ${s.last_outcome === "skipped" ? html`<br /><small>last tick skipped: ${s.last_reason}</small>` : null}</td>
        <td>${s.holder || ""}</td><td>${s.missed_total}</td>
        <td class="actions">
          <${ActionButton} label="Run now" disabled=${ro} title=${title} done=${reload}
            action=${() => call(`schedules/${enc(s.name)}/trigger`, { method: "POST" })} />
          ${s.paused ? html`<${ActionButton} label="Resume" disabled=${ro} title=${title} done=${reload}
              action=${() => call(`schedules/${enc(s.name)}/resume`, { method: "POST" })} />`
            : html`<${ActionButton} label="Pause" disabled=${ro} title=${title} done=${reload}
              action=${() => call(`schedules/${enc(s.name)}/pause`, { method: "POST" })} />`}
        </td></tr>`)}</tbody></table>` : html`<${Empty}>No schedules: declare one with @app.periodic or a CronJobLock.</${Empty}>`}
  </section>`;
}

// -- queues -----------------------------------------------------------------------------------------

export function Queues({ session }) {
  const { data, error, reload } = useLive(() => call("queues"), ["tasks", "finished", "depth"], []);
  if (!data) return html`<${ErrorBox} error=${error} />${error ? null : html`<p>Loading…</p>`}`;
  const ro = !session.writes;
  const title = readOnlyTitle(session);
  return html`<section>
    <div class="toolbar"><h1>Queues</h1></div>
    <${ErrorBox} error=${error} />
    ${data.length ? html`<table data-testid="queues">
      <thead><tr><th>queue</th><th>state</th><th>due</th><th>pending</th><th title="pending, but no active worker serves their handler here">parked</th>
        <th>oldest due</th><th>running</th><th>paused tasks</th><th>waiting for children</th><th>workers (slots)</th><th>last hour ✓ / ✗ / cancelled</th><th></th></tr></thead>
      <tbody>${data.map((q) => html`<tr data-queue=${q.queue}>
        <td><a href=${"#/tasks?queue=" + encodeURIComponent(q.queue)}>${q.queue}</a></td>
        <td>${q.paused ? html`<span class="badge st-paused">paused</span>` : "claiming"}</td>
        <td>${fmtNumber(q.due)}</td><td>${fmtNumber(q.pending)}</td>
        <td class=${q.parked ? "bad" : ""}>${fmtNumber(q.parked)}</td><td>${fmtSeconds(q.oldest_due_s)}</td>
        <td>${fmtNumber(q.running)}</td><td>${fmtNumber(q.paused_tasks)}</td><td>${fmtNumber(q.suspended)}</td>
        <td class=${q.workers ? "" : q.due ? "bad" : ""}>${q.workers} (${q.slots})</td>
        <td>${fmtNumber(q.succeeded_1h)} / <span class=${q.failed_1h ? "bad" : ""}>${fmtNumber(q.failed_1h)}</span> / ${fmtNumber(q.cancelled_1h)}</td>
        <td class="actions">${q.paused
          ? html`<${ActionButton} label="Resume" disabled=${ro} title=${title} done=${reload}
              action=${() => call(`queues/${encodeURIComponent(q.queue)}/resume`, { method: "POST" })} />`
          : html`<${ActionButton} label="Pause" disabled=${ro} title=${title} done=${reload}
              action=${() => call(`queues/${encodeURIComponent(q.queue)}/pause`, { method: "POST" })} />`}</td>
      </tr>`)}</tbody></table>` : html`<${Empty}>No queue yet.</${Empty}>`}
  </section>`;
}

// -- pods -----------------------------------------------------------------------------------------

export function Pods() {
  const { data, error } = useLive(() => call("workers"), ["tasks", "finished", "depth"], []);
  if (!data) return html`<${ErrorBox} error=${error} />${error ? null : html`<p>Loading…</p>`}`;
  const pods = new Map();
  for (const w of data.live) {
    if (!pods.has(w.pod_id)) pods.set(w.pod_id, []);
    pods.get(w.pod_id).push(w);
  }
  return html`<section>
    <div class="toolbar"><h1>Pods and workers</h1></div>
    <${ErrorBox} error=${error} />
    ${data.unserved.length ? html`<div class="waiting" data-testid="unserved"><strong>Not served:</strong>
      ${data.unserved.map((u) => html`<p><a href=${"#/tasks?status=pending&handler=" + encodeURIComponent(u.handler)
        + "&queue=" + encodeURIComponent(u.queue)}>${u.tasks} task(s)</a> wait: ${u.message}</p>`)}</div>` : null}
    ${pods.size ? [...pods.entries()].map(([pod, ws]) => html`<div class="pod" data-pod=${pod}>
      <h2>${pod} <small>${ws[0].namespace || ""} ${ws[0].hostname ? "· " + ws[0].hostname : ""}</small></h2>
      <table><thead><tr><th>worker</th><th>slot</th><th>state</th><th>lease left</th><th>heartbeat</th><th>queues</th><th>handlers</th><th>running</th></tr></thead>
        <tbody>${ws.map((w) => html`<tr>
          <td><small>${w.worker_id}</small><br /><small>epoch ${w.epoch}, pid ${w.pid}</small></td><td>${w.pod_slot}</td>
          <td>${w.status}</td>
          <td class=${w.lease_left_s < 0 ? "bad" : ""}>${fmtSeconds(w.lease_left_s)}</td>
          <td>${fmtSeconds(w.heartbeat_age_s)} ago</td><td>${w.queues.join(", ")}</td>
          <td title=${w.handlers ? w.handlers.join(", ") : ""}>${w.handlers === null
            ? "every handler (earlier version)" : `${w.handlers.length} handler(s)`}</td>
          <td>${w.running_ids.length} / ${w.concurrency}<br />${w.running_ids.slice(0, 20).map((tid, i) =>
            html`<${TaskLink} id=${tid} /><small> ${w.running_handlers[i]}</small> `)}</td>
        </tr>`)}</tbody></table>
      <p><a href=${"#/tasks?pod=" + encodeURIComponent(pod)}>tasks this pod ran</a></p>
    </div>`) : html`<${Empty}>No live worker.</${Empty}>`}
    <h2>Recently stopped</h2>
    ${data.stopped.length ? html`<table><thead><tr><th>pod</th><th>worker</th><th>state</th><th>stopped</th><th>why</th></tr></thead>
      <tbody>${data.stopped.map((w) => html`<tr><td>${w.pod_id}</td><td><small>${w.worker_id}</small></td><td>${w.status}</td>
        <td title=${fmtTime(w.stopped_at)}>${fmtAgo(w.stopped_at)}</td><td>${w.stop_reason || ""}</td></tr>`)}</tbody></table>`
      : html`<${Empty}>None.</${Empty}>`}
  </section>`;
}

// -- login ----------------------------------------------------------------------------------------

export function Login({ refresh }) {
  const [token, setToken] = useState("");
  const [error, setError] = useState(null);
  const submit = async (e) => {
    e.preventDefault();
    try {
      await call("session", { method: "POST", body: { token } });
      setToken("");
      refresh();
    } catch (err) {
      setError(err);
    }
  };
  return html`<section class="login">
    <h1>kubetasks</h1>
    <form onSubmit=${submit}>
      <label>Dashboard token <input type="password" autocomplete="current-password" value=${token}
        onInput=${(e) => setToken(e.target.value)} /></label>
      <button type="submit">Log in</button>
    </form>
    <${ErrorBox} error=${error} />
    <p class="muted">The token is the dashboard's KUBETASKS_DASHBOARD_TOKEN (from its Secret).</p>
  </section>`;
}
