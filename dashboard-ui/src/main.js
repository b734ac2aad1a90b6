// The shell: session, navigation (hash routes, so the server serves one file), live indicator.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { call, liveState, onLiveState } from "./api.js";
import { Login, Overview, Pods, Queues, Schedules, Task, Tasks, Workflow } from "./pages.js";
import { html, useSession } from "./ui.js";
import "./style.css";

function route() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query] = raw.split("?");
  const parts = path.split("/").filter(Boolean);
  return { page: parts[0] || "overview", arg: parts[1], query: query || "" };
}

const NAV = [
  ["overview", "Overview"],
  ["tasks", "Tasks"],
  ["schedules", "Schedules"],
  ["queues", "Queues"],
  ["pods", "Pods"],
];

function Live() {
  const [state, setState] = useState(liveState());
  useEffect(() => onLiveState(setState), []);
  return html`<span class=${"live live-" + state} data-testid="live" title="updates pushed by the server">
    ${state === "live" ? "● live" : "○ " + state}</span>`;
}

// `#token=<token>`: the link `make demo` prints logs in once and leaves no token in the address bar.
async function loginFromFragment() {
  const m = location.hash.match(/^#token=([^&]+)/);
  if (!m) return;
  history.replaceState(null, "", location.pathname + location.search + "#/");
  try {
    await call("session", { method: "POST", body: { token: decodeURIComponent(m[1]) } });
  } catch {
    // the login form will ask
  }
}

function App() {
  const [r, setR] = useState(route());
  const [session, refresh] = useSession();
  useEffect(() => {
    const on = () => setR(route());
    window.addEventListener("hashchange", on);
    return () => window.removeEventListener("hashchange", on);
  }, []);
  if (!session) return html`<p class="boot">Loading…</p>`;
  if (!session.user) return html`<${Login} refresh=${refresh} />`;
  let page;
  switch (r.page) {
    case "tasks": page = html`<${Tasks} query=${r.query} session=${session} />`; break;
    case "task": page = html`<${Task} id=${r.arg} session=${session} key=${r.arg} />`; break;
    case "workflow": page = html`<${Workflow} id=${r.arg} key=${r.arg} />`; break;
    case "schedules": page = html`<${Schedules} session=${session} />`; break;
    case "queues": page = html`<${Queues} session=${session} />`; break;
    case "pods": page = html`<${Pods} />`; break;
    default: page = html`<${Overview} session=${session} />`;
  }
  const logout = async () => {
    await call("session", { method: "DELETE" });
    refresh();
  };
  return html`<div class="shell">
    <header>
      <a class="brand" href="#/">kubetasks</a>
      <nav>${NAV.map(([p, label]) => html`<a href=${"#/" + p} class=${r.page === p || (p === "tasks" && r.page === "task") ? "on" : ""}>${label}</a>`)}</nav>
      <span class="spacer"></span>
      ${session.writes ? null : html`<span class="ro" data-testid="read-only" title="actions are off on this dashboard">read-only</span>`}
      <${Live} />
      <span class="user">${session.user}</span>
      ${session.auth === "token" ? html`<button class="link" onClick=${logout}>log out</button>` : null}
    </header>
    <main>${page}</main>
  </div>`;
}

loginFromFragment().finally(() => render(html`<${App} />`, document.getElementById("app")));
