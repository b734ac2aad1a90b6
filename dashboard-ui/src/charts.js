// Time-series charts (uPlot) and the workflow graph (dagre lays it out, Preact draws the SVG).
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { Graph, layout } from "@dagrejs/dagre";
import { useEffect, useRef } from "preact/hooks";
import { html, fmtSeconds } from "./ui.js";

const COLORS = {
  succeeded: "#2e9d5b",
  failed: "#d64545",
  cancelled: "#8a8f98",
  pending: "#3f7be0",
  due: "#8b5cf6",
  running: "#e09b2d",
  held: "#8a8f98",
  p50: "#3f7be0",
  p95: "#e09b2d",
  p99: "#d64545",
};

// series: [{label, key, color, bars?}], points: [{at, [key]: value}]
export function TimeChart({ title, points, series, yLabel, log, seconds, height = 180, testid, range }) {
  const box = useRef(null);
  const plot = useRef(null);
  useEffect(() => {
    if (!box.current || !points) return undefined;
    const xs = points.map((p) => new Date(p.at || p.minute).getTime() / 1000);
    const data = [xs, ...series.map((s) => points.map((p) => (p[s.key] === null ? null : p[s.key])))];
    const width = Math.max(280, box.current.clientWidth || 480);
    const opts = {
      width,
      height,
      legend: { show: true },
      cursor: { drag: { x: false, y: false } },
      scales: {
        // The whole window, however few points it has (a quiet hour is a flat line, not a zoom on one point).
        x: range ? { time: true, range: () => range } : { time: true },
        y: log ? { distr: 3 } : { range: (u, min, max) => [0, Math.max(1, max)] },
      },
      axes: [
        {},
        {
          label: yLabel,
          size: 60,
          values: seconds ? (u, vals) => vals.map((v) => fmtSeconds(v)) : undefined,
        },
      ],
      series: [
        {},
        ...series.map((s) => ({
          label: s.label,
          stroke: s.color || COLORS[s.key] || "#555",
          fill: s.bars ? (s.color || COLORS[s.key]) + "55" : undefined,
          width: 1.5,
          paths: s.bars ? uPlot.paths.bars({ size: [0.8, 40] }) : undefined,
          points: { show: !!s.points, size: 4 },
          spanGaps: false,
          value: seconds ? (u, v) => (v === null ? "–" : fmtSeconds(v)) : undefined,
        })),
      ],
    };
    if (plot.current) plot.current.destroy();
    plot.current = new uPlot(opts, data, box.current);
    return () => {
      if (plot.current) plot.current.destroy();
      plot.current = null;
    };
  }, [points, series.map((s) => s.key).join(","), range && range.join(",")]);
  return html`<figure class="chart" data-testid=${testid}>
    <figcaption>${title}</figcaption>
    <div ref=${box}></div>
  </figure>`;
}

const NODE_W = 170;
const NODE_H = 46;

// nodes: [{id, parent_id, handler, status, run_s, on_critical_path}]; path: the critical path's ids.
// Solid edges: a parent spawned a child. Dashed: along the critical path, a child that was
// spawned only after a sibling ended (the parent waited for that sibling first).
export function WorkflowGraph({ nodes, path, onOpen }) {
  const g = new Graph({ multigraph: true });
  g.setGraph({ rankdir: "TB", nodesep: 24, ranksep: 46, marginx: 12, marginy: 12 });
  g.setDefaultEdgeLabel(() => ({}));
  const ids = new Set(nodes.map((n) => n.id));
  const byId = new Map(nodes.map((n) => [String(n.id), n]));
  const onPath = new Set();
  for (let i = 0; i + 1 < path.length; i++) onPath.add(`${path[i]}>${path[i + 1]}`);
  for (const n of nodes) g.setNode(String(n.id), { width: NODE_W, height: NODE_H });
  for (const n of nodes) {
    if (n.parent_id !== null && ids.has(n.parent_id)) g.setEdge(String(n.parent_id), String(n.id), { kind: "spawn" }, "spawn");
  }
  for (let i = 0; i + 1 < path.length; i++) {
    const a = byId.get(String(path[i]));
    const b = byId.get(String(path[i + 1]));
    if (a && b && a.parent_id === b.parent_id) g.setEdge(String(a.id), String(b.id), { kind: "after" }, "after");
  }
  layout(g);
  const { width, height } = g.graph();
  const edges = g.edges().map((e) => {
    const pts = g.edge(e).points;
    const critical = onPath.has(`${e.v}>${e.w}`);
    const d = pts.map((p, i) => `${i ? "L" : "M"}${p.x.toFixed(1)},${p.y.toFixed(1)}`).join(" ");
    const cls = "edge" + (e.name === "after" ? " after" : "") + (critical ? " critical" : "");
    return html`<path class=${cls} d=${d} data-edge=${`${e.v}>${e.w}`} />`;
  });
  const boxes = g.nodes().map((id) => {
    const n = byId.get(id);
    const p = g.node(id);
    const x = p.x - NODE_W / 2;
    const y = p.y - NODE_H / 2;
    const label = n.handler.length > 22 ? n.handler.slice(0, 21) + "…" : n.handler;
    return html`<g
      class=${"node st-" + n.status + (n.on_critical_path ? " critical" : "")}
      data-task=${n.id}
      data-critical=${n.on_critical_path ? "true" : "false"}
      transform=${`translate(${x.toFixed(1)},${y.toFixed(1)})`}
      onClick=${() => onOpen && onOpen(n.id)}
      role="link"
      tabindex="0"
    >
      <title>#${n.id} ${n.handler} (${n.status}, ${fmtSeconds(n.run_s)})</title>
      <rect width=${NODE_W} height=${NODE_H} rx="6" />
      <text x="8" y="18" class="n-title">#${n.id} ${label}</text>
      <text x="8" y="36" class="n-sub">${n.status} · ${fmtSeconds(n.run_s)}</text>
    </g>`;
  });
  return html`<div class="graph-wrap">
    <svg class="graph" data-testid="workflow-graph" width=${Math.ceil(width)} height=${Math.ceil(height)}
      viewBox=${`0 0 ${Math.ceil(width)} ${Math.ceil(height)}`}>
      ${edges}${boxes}
    </svg>
  </div>`;
}
