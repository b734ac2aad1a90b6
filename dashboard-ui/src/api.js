// The page's only way to the server: JSON over fetch (relative URLs, so any path prefix works),
// the CSRF header on writes, and the server-sent event stream of changes.

const BASE = "api/v1/";

export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

function cookie(name) {
  for (const part of document.cookie.split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === name) return decodeURIComponent(v.join("="));
  }
  return "";
}

export async function call(path, { method = "GET", body, query } = {}) {
  let url = BASE + path;
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v === undefined || v === null || v === "") continue;
      for (const item of Array.isArray(v) ? v : [v]) q.append(k, String(item));
    }
    const s = q.toString();
    if (s) url += "?" + s;
  }
  const headers = { Accept: "application/json" };
  if (method !== "GET") {
    headers["X-CSRF-Token"] = cookie("kt_csrf");
    if (body !== undefined) headers["Content-Type"] = "application/json";
  }
  const res = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  let data = null;
  try {
    data = await res.json();
  } catch {
    data = null;
  }
  if (!res.ok) {
    const e = (data && data.error) || {};
    throw new ApiError(res.status, e.message || `HTTP ${res.status}`, e.field);
  }
  return data;
}

// One EventSource for the page; listeners get the set of topics that changed.
const listeners = new Set();
let source = null;
let state = "connecting";
const stateListeners = new Set();

function setState(s) {
  state = s;
  for (const fn of stateListeners) fn(s);
}

export function liveState() {
  return state;
}

export function onLiveState(fn) {
  stateListeners.add(fn);
  return () => stateListeners.delete(fn);
}

export function subscribe(fn) {
  listeners.add(fn);
  if (!source) openStream();
  return () => listeners.delete(fn);
}

function openStream() {
  source = new EventSource(BASE + "stream", { withCredentials: true });
  source.addEventListener("hello", () => setState("live"));
  source.addEventListener("change", (ev) => {
    let topics = [];
    try {
      topics = JSON.parse(ev.data).topics || [];
    } catch {
      topics = ["resync"];
    }
    window.__kubetasksEvents = (window.__kubetasksEvents || 0) + 1;
    for (const fn of listeners) fn(new Set(topics));
  });
  source.onerror = () => setState("reconnecting");
  source.onopen = () => setState("live");
}
