// Shared pieces: htm bound to Preact, formatters, and the hook every page loads its data with.
// Every value shown goes through Preact as text: nothing here ever sets HTML.
import { h } from "preact";
import { useCallback, useEffect, useRef, useState } from "preact/hooks";
import htm from "htm";
import { call, subscribe } from "./api.js";

export const html = htm.bind(h);

export const STATUSES = ["pending", "running", "succeeded", "failed", "cancelled", "paused", "suspended"];

export function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { hour12: false });
}

export function fmtAgo(iso, now = Date.now()) {
  if (!iso) return "";
  const s = (now - new Date(iso).getTime()) / 1000;
  return fmtSeconds(Math.abs(s)) + (s >= 0 ? " ago" : " from now");
}

export function fmtSeconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "–";
  if (s < 0.001) return "<1 ms";
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  return `${(s / 86400).toFixed(1)} d`;
}

export function fmtNumber(n) {
  if (n === null || n === undefined) return "–";
  return Number(n).toLocaleString();
}

export function Status({ status }) {
  return html`<span class=${"badge st-" + status}>${status}</span>`;
}

export function TaskLink({ id }) {
  return html`<a href=${"#/task/" + id}>#${id}</a>`;
}

export function Json({ value, label }) {
  let text;
  try {
    text = JSON.stringify(value, null, 2);
  } catch {
    text = String(value);
  }
  return html`<pre class="json" aria-label=${label || "JSON"}>${text}</pre>`;
}

export function ErrorBox({ error }) {
  if (!error) return null;
  return html`<div class="error" role="alert">
    ${error.field ? html`<strong>${error.field}</strong>: ` : null}${error.message}
  </div>`;
}

export function Empty({ children }) {
  return html`<p class="empty">${children}</p>`;
}

// Load with `fetcher` now and again whenever the live stream says one of `topics` changed
// (at most once a second), keeping the last data while a reload runs.
export function useLive(fetcher, topics, deps) {
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);
  const last = useRef(0);
  const timer = useRef(null);
  const seq = useRef(0);
  const load = useCallback(async () => {
    const mine = ++seq.current;
    last.current = Date.now();
    try {
      const d = await fetcher();
      if (mine === seq.current) {
        setData(d);
        setError(null);
      }
    } catch (e) {
      if (mine === seq.current) setError(e);
    }
  }, deps);
  useEffect(() => {
    load();
    const off = subscribe((changed) => {
      if (!changed.has("resync") && !topics.some((t) => changed.has(t))) return;
      const wait = Math.max(0, 1000 - (Date.now() - last.current));
      clearTimeout(timer.current);
      timer.current = setTimeout(load, wait);
    });
    return () => {
      off();
      clearTimeout(timer.current);
    };
  }, [load]);
  return { data, error, reload: load };
}

export function useSession() {
  const [session, setSession] = useState(null);
  const refresh = useCallback(async () => {
    try {
      setSession(await call("session"));
    } catch (e) {
      setSession({ user: null, auth: "token", writes: false, error: e });
    }
  }, []);
  useEffect(() => {
    refresh();
  }, []);
  return [session, refresh];
}

// A button that runs an action, shows its answer and reports it to `done`.
export function ActionButton({ label, action, disabled, title, danger, done }) {
  const [busy, setBusy] = useState(false);
  const [msg, setMsg] = useState(null);
  const run = async () => {
    setBusy(true);
    setMsg(null);
    try {
      const r = await action();
      setMsg({ ok: r && r.ok !== false, text: (r && r.message) || "done" });
      if (done) done(r);
    } catch (e) {
      setMsg({ ok: false, text: e.message });
    } finally {
      setBusy(false);
    }
  };
  return html`<span class="action">
    <button class=${danger ? "danger" : ""} disabled=${disabled || busy} title=${title || ""} onClick=${run}>
      ${busy ? "…" : label}
    </button>
    ${msg ? html`<span class=${msg.ok ? "msg ok" : "msg bad"} role="status">${msg.text}</span>` : null}
  </span>`;
}
