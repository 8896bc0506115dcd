// The ccluster dashboard: one ES module, no build step, no dependencies (docs/dashboard.md).
//
// Every piece of data from the server (task ids, logs, transcripts, diffs, messages) is untrusted:
// it reaches the page only as text nodes (`textContent`, `createTextNode`) or attribute values,
// never as markup.

const API = "/api/v1";
const SVG_NS = "http://www.w3.org/2000/svg";

/** The states a plan node can be in, in the order the summary and the bars show them. */
const STATES = ["succeeded", "cached", "running", "retrying", "failed", "pending", "skipped", "cancelled"];

/** How far along a node is: a record older than an event says less. */
function progress(state) {
  if (state === "pending") return 0;
  if (state === "running" || state === "retrying") return 1;
  return 2;
}

/** What each event of a run's stream (docs/events.md) makes of its node's state. */
const STATE_OF_EVENT = {
  task_started: "running",
  task_retrying: "retrying",
  task_succeeded: "succeeded",
  task_deduplicated: "succeeded",
  task_cached: "cached",
  task_failed: "failed",
  task_skipped: "skipped",
  task_cancelled: "cancelled",
};

// ---------------------------------------------------------------------------------------------
// Small helpers

/** Makes an HTML element; `children` strings become text nodes (never markup). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Makes an SVG element. */
function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

const enc = encodeURIComponent;

function fmtCost(usd) {
  if (usd === null || usd === undefined) return "–";
  if (usd === 0) return "$0";
  if (usd < 0.01) return "$" + usd.toFixed(4);
  return "$" + usd.toFixed(2);
}

function fmtDuration(ms) {
  if (ms === null || ms === undefined || ms < 0) return "–";
  const sec = Math.floor(ms / 1000);
  if (sec < 60) return ms < 10000 ? (ms / 1000).toFixed(1) + "s" : sec + "s";
  const m = Math.floor(sec / 60);
  if (m < 60) return `${m}m ${String(sec % 60).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

function fmtTime(ms) {
  if (!ms) return "–";
  const d = new Date(ms);
  const today = new Date();
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  if (d.toDateString() === today.toDateString()) return time;
  return d.toLocaleDateString([], { year: "numeric", month: "short", day: "numeric" }) + " " + time;
}

function fmtTokens(n) {
  if (!n) return "0";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e4) return Math.round(n / 1e3) + "k";
  return String(n);
}

function fmtBytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1024 / 1024).toFixed(1) + " MiB";
}

/** A run's duration: for one in progress, up to now. */
function runDuration(run) {
  if (run.finished_ms) return run.finished_ms - run.started_ms;
  if (run.state === "running" && run.started_ms) return Date.now() - run.started_ms;
  return run.duration_ms;
}

/** Who or what started a run: `alice (cli)`, `alice (cli, GitHub Actions)`, or the server. */
function startedBy(run) {
  if (run.started_by === "server") return "server (dashboard/API)";
  return run.started_by || "unknown";
}

/** The plan task a node belongs to: `build[3]` → `build`. */
function taskOfNode(node) {
  const i = node.indexOf("[");
  return i < 0 ? node : node.slice(0, i);
}

function badge(state) {
  return h("span", { class: "badge", "data-state": state }, state);
}

/** A problem detail's text (`application/problem+json`), or the response's status. */
async function problemText(r) {
  try {
    const p = await r.json();
    return p.detail || p.title || `HTTP ${r.status}`;
  } catch {
    return `HTTP ${r.status}`;
  }
}

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function getJSON(path, signal) {
  const r = await fetch(API + path, { signal, headers: { accept: "application/json" } });
  if (!r.ok) throw new HttpError(r.status, await problemText(r));
  return r.json();
}

async function getText(path, signal) {
  const r = await fetch(API + path, { signal });
  if (!r.ok) throw new HttpError(r.status, await problemText(r));
  return r.text();
}

async function post(path, body) {
  const r = await fetch(API + path, {
    method: "POST",
    headers: { "content-type": "application/json", accept: "application/json" },
    body: JSON.stringify(body ?? {}),
  });
  if (!r.ok) throw new HttpError(r.status, await problemText(r));
  return r.json();
}

/** Calls `fn` at most once per `ms` (a number, or a function giving it), the last call winning. */
function throttle(fn, ms) {
  let timer = null;
  let last = 0;
  return () => {
    if (timer) return;
    const wait = Math.max(0, last + (typeof ms === "function" ? ms() : ms) - Date.now());
    timer = setTimeout(() => {
      timer = null;
      last = Date.now();
      fn();
    }, wait);
  };
}

/** A region that says something to screen readers and people alike. */
function notice(text, kind = "info") {
  return h("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

// ---------------------------------------------------------------------------------------------
// Routing: `#/`, `#/runs/{run}`, `#/runs/{run}/tasks/{node}`

const app = document.getElementById("app");
/** The page on screen: `{kind, run?, teardown()}`. */
let current = null;

function parseRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "runs" && parts[1]) {
    return { kind: "run", run: parts[1], node: parts[2] === "tasks" && parts[3] ? parts[3] : null };
  }
  return { kind: "runs" };
}

function route() {
  const r = parseRoute();
  if (r.kind === "run" && current && current.kind === "run" && current.run === r.run) {
    current.showTask(r.node);
    return;
  }
  if (current) current.teardown();
  app.replaceChildren();
  current = r.kind === "run" ? runPage(r.run, r.node) : runsPage();
}

window.addEventListener("hashchange", route);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && current && current.kind === "run" && current.panelOpen()) {
    e.preventDefault();
    current.closeTask();
  }
  if (e.key === "/" && !isEditable(e.target)) {
    const filter = document.getElementById("filter");
    if (filter) {
      e.preventDefault();
      filter.focus();
    }
  }
});

function isEditable(el) {
  return el && (el.tagName === "INPUT" || el.tagName === "SELECT" || el.tagName === "TEXTAREA");
}

/** Enter or Space on a focusable element that is not a button acts as a click. */
function activateOnKeys(el, fn) {
  el.addEventListener("click", fn);
  el.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      fn(e);
    }
  });
}

function header(...crumbs) {
  return h(
    "header",
    { class: "top" },
    h("a", { class: "brand", href: "#/" }, "ccluster"),
    h("nav", { "aria-label": "Breadcrumb" }, ...crumbs),
  );
}

// ---------------------------------------------------------------------------------------------
// The runs list

function runsPage() {
  const abort = new AbortController();
  const runs = new Map(); // id → RunSummary
  let next = null;
  let events = null;
  let ticker = null;
  const filters = { repo: "", state: "" };

  const body = h("tbody");
  const status = h("div", { class: "status-line" });
  const more = h("button", { type: "button", id: "more", hidden: true }, "Older runs");
  const repoSelect = h("select", { id: "repo-filter", "aria-label": "Repository" }, h("option", { value: "" }, "all repositories"));
  const stateSelect = h(
    "select",
    { id: "state-filter", "aria-label": "State" },
    h("option", { value: "" }, "any state"),
    ...["running", "succeeded", "failed", "cancelled", "interrupted"].map((st) => h("option", { value: st }, st)),
  );

  const newRun = h("button", { type: "button", id: "new-run", "aria-expanded": "false", "aria-controls": "start-form" }, "Start a run…");
  const form = startForm();
  newRun.addEventListener("click", () => {
    form.el.hidden = !form.el.hidden;
    newRun.setAttribute("aria-expanded", String(!form.el.hidden));
    if (!form.el.hidden) form.focus();
  });

  document.title = "Runs · ccluster";
  app.append(
    header(h("span", {}, "Runs")),
    h(
      "main",
      { class: "runs" },
      h("div", { class: "toolbar" }, h("h1", {}, "Runs"), repoSelect, stateSelect, status, h("span", { class: "spring" }), newRun),
      form.el,
      h(
        "table",
        { class: "runs-table", id: "runs" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ...["State", "Workflow", "Repository", "Run", "Started", "Duration", "Cost", "Tasks", "Started by"].map((t) =>
              h("th", { scope: "col" }, t),
            ),
          ),
        ),
        body,
      ),
      more,
    ),
  );

  repoSelect.addEventListener("change", () => {
    filters.repo = repoSelect.value;
    reload();
  });
  stateSelect.addEventListener("change", () => {
    filters.state = stateSelect.value;
    reload();
  });
  more.addEventListener("click", () => load(next));

  function query(before) {
    const q = new URLSearchParams({ limit: "50" });
    if (filters.repo) q.set("repo", filters.repo);
    if (filters.state) q.set("state", filters.state);
    if (before) q.set("before", before);
    return "/runs?" + q;
  }

  function matches(run) {
    return (!filters.repo || run.repo === filters.repo) && (!filters.state || run.state === filters.state);
  }

  async function load(before) {
    try {
      const page = await getJSON(query(before), abort.signal);
      for (const run of page.runs) runs.set(run.id, run);
      next = page.next;
      status.replaceChildren();
      render();
    } catch (e) {
      if (e.name !== "AbortError") status.replaceChildren(notice(`Cannot list runs: ${e.message}`, "error"));
    }
  }

  function reload() {
    runs.clear();
    load(null);
  }

  const rows = new Map(); // run id → its <tr>, kept across updates (focus and hover stay on it)

  function cells(run) {
    const c = run.counts || {};
    const done = (c.succeeded || 0) + (c.cached || 0);
    return [
      h("td", {}, badge(run.state)),
      h("td", {}, h("a", { href: `#/runs/${enc(run.id)}`, tabindex: "-1" }, run.workflow || "workflow")),
      h("td", {}, run.repo),
      h("td", { class: "mono" }, run.id),
      h("td", {}, fmtTime(run.started_ms)),
      h("td", { class: "num duration" }, fmtDuration(runDuration(run))),
      h("td", { class: "num" }, fmtCost(run.cost_usd), run.budget_usd ? ` / ${fmtCost(run.budget_usd)}` : ""),
      h("td", {}, stateBar(c, 120), h("span", { class: "counts" }, `${done}/${c.total ?? "?"}`)),
      h(
        "td",
        {},
        startedBy(run),
        run.rehearsed ? h("span", { class: "tag" }, "rehearsal") : null,
      ),
    ];
  }

  function row(run) {
    let tr = rows.get(run.id);
    if (!tr) {
      tr = h("tr", { "data-run": run.id, tabindex: "0", class: "run-row" });
      activateOnKeys(tr, () => (location.hash = `#/runs/${enc(run.id)}`));
      rows.set(run.id, tr);
    }
    tr.setAttribute("data-state", run.state);
    tr.replaceChildren(...cells(run));
    return tr;
  }

  function render() {
    const sorted = [...runs.values()].filter(matches).sort((a, b) => (b.started_ms || 0) - (a.started_ms || 0) || (a.id < b.id ? 1 : -1));
    const trs = sorted.map(row);
    // Rows are moved only when the order changed: a row taken out of the page loses the focus.
    const same = trs.length === body.children.length && trs.every((tr, i) => body.children[i] === tr);
    if (!same) {
      const focused = document.activeElement?.dataset?.run;
      body.replaceChildren(...trs);
      if (!sorted.length) body.append(h("tr", {}, h("td", { colspan: "9", class: "empty" }, "No runs yet. Start one with `ccluster apply`.")));
      if (focused) rows.get(focused)?.focus();
    }
    more.hidden = !next;
    const repos = new Set([...runs.values()].map((r) => r.repo));
    for (const repo of repos) {
      if (![...repoSelect.options].some((o) => o.value === repo)) repoSelect.append(h("option", { value: repo }, repo));
    }
  }

  // The repositories served, for the filter (even before they have runs) and the form.
  getJSON("/repos", abort.signal)
    .then((repos) => {
      for (const r of repos) {
        if (![...repoSelect.options].some((o) => o.value === r.name)) repoSelect.append(h("option", { value: r.name }, r.name));
      }
      form.setRepos(repos);
    })
    .catch(() => {});

  load(null);

  // Runs appearing and changing, live.
  events = new EventSource(API + "/events");
  let renderQueued = false;
  events.addEventListener("run", (e) => {
    const run = JSON.parse(e.data);
    runs.set(run.id, run);
    // A busy run changes many times a second: the list is redrawn once per frame at most.
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      render();
    });
  });
  events.onerror = () => status.replaceChildren(notice("Live updates interrupted; reconnecting…", "warn"));
  events.onopen = () => status.replaceChildren();
  // Durations of runs in progress keep counting.
  ticker = setInterval(() => {
    for (const tr of body.querySelectorAll('tr[data-state="running"]')) {
      const run = runs.get(tr.dataset.run);
      if (run) tr.querySelector(".duration").textContent = fmtDuration(runDuration(run));
    }
  }, 1000);

  return {
    kind: "runs",
    teardown() {
      abort.abort();
      events?.close();
      clearInterval(ticker);
    },
  };
}

/**
 * One state for a group of nodes (a fan-out's box), as the graph endpoint computes it: a failure
 * shows first, then work going on, then work still to come.
 */
function groupState(c, total) {
  const n = (st) => c[st] || 0;
  if (!total) return "pending";
  if (n("failed")) return "failed";
  if (n("running") || n("retrying")) return "running";
  if (n("pending")) return "pending";
  if (n("cancelled")) return "cancelled";
  if (n("skipped") && !n("succeeded") && !n("cached")) return "skipped";
  return "succeeded";
}

/**
 * Starting a run from the page (`POST /api/v1/runs`), after checking its plan if wished
 * (`POST /api/v1/plan`: the plan's size, or the clusterfile's diagnostics with their places).
 */
function startForm() {
  const repo = h("select", { id: "start-repo", name: "repo" });
  const clusterfile = h("input", { id: "start-clusterfile", name: "clusterfile", value: "clusterfile.toml", required: true, spellcheck: "false" });
  const inputs = h("textarea", { id: "start-inputs", name: "inputs", rows: "2", placeholder: '{"name": "value"}', spellcheck: "false" });
  const rehearse = h("input", { id: "start-rehearse", type: "checkbox", checked: true });
  const fresh = h("input", { id: "start-fresh", type: "checkbox" });
  const planBtn = h("button", { type: "button", id: "start-plan" }, "Check the plan");
  const submit = h("button", { type: "submit", id: "start-submit", class: "primary" }, "Start");
  const result = h("div", { id: "start-result", role: "status" });
  const el = h(
    "form",
    { id: "start-form", class: "start-form", hidden: true, "aria-label": "Start a run" },
    h("label", {}, "Repository", repo),
    h("label", {}, "Clusterfile", clusterfile),
    h("label", { class: "wide" }, "Inputs (JSON, optional)", inputs),
    h("label", { class: "check" }, rehearse, " Rehearse: agents are answered by the scripted model (no key, no tokens)"),
    h("label", { class: "check" }, fresh, " Fresh: ignore cached results"),
    h("div", { class: "buttons" }, planBtn, submit),
    result,
  );

  function body() {
    let parsed = {};
    const text = inputs.value.trim();
    if (text) {
      parsed = JSON.parse(text); // a syntax error is said by the caller
      if (typeof parsed !== "object" || Array.isArray(parsed) || parsed === null) throw new Error("inputs must be a JSON object");
    }
    return { repo: repo.value || undefined, clusterfile: clusterfile.value.trim() || undefined, inputs: parsed };
  }

  async function send(path, extra) {
    let payload;
    try {
      payload = { ...body(), ...extra };
    } catch (e) {
      result.replaceChildren(notice(`The inputs are not valid: ${e.message}`, "error"));
      return null;
    }
    const r = await fetch(API + path, {
      method: "POST",
      headers: { "content-type": "application/json", accept: "application/json" },
      body: JSON.stringify(payload),
    });
    const answer = await r.json().catch(() => ({}));
    if (!r.ok) {
      const list = Array.isArray(answer.diagnostics) ? answer.diagnostics : [];
      result.replaceChildren(
        notice(answer.detail || answer.title || `HTTP ${r.status}`, "error"),
        list.length
          ? h(
              "ul",
              { class: "diagnostics" },
              ...list.map((d) =>
                h(
                  "li",
                  { "data-severity": d.severity ?? null },
                  h("span", { class: "mono" }, `${d.file ?? ""}${d.line ? `:${d.line}:${d.column ?? 1}` : ""}`),
                  ` ${d.severity ?? "error"}[${d.code ?? "?"}]: ${d.message ?? ""}`,
                  d.help ? h("span", { class: "muted" }, ` (${d.help})`) : null,
                ),
              ),
            )
          : null,
      );
      return null;
    }
    return answer;
  }

  planBtn.addEventListener("click", async () => {
    result.replaceChildren(notice("Planning…"));
    const plan = await send("/plan", {});
    if (!plan) return;
    const sum = plan.summary || {};
    result.replaceChildren(
      notice(
        `The plan is valid: ${sum.tasks ?? "?"} tasks, ${sum.nodes ?? "?"} plan nodes` +
          (sum.agent ? ` (${sum.agent} agent)` : "") +
          (sum.dynamic_maps ? `, ${sum.dynamic_maps} dynamic maps` : "") +
          ".",
      ),
    );
  });
  el.addEventListener("submit", async (e) => {
    e.preventDefault();
    submit.disabled = true;
    result.replaceChildren(notice("Starting…"));
    try {
      const started = await send("/runs", { rehearse: rehearse.checked, fresh: fresh.checked });
      if (started?.run) location.hash = `#/runs/${enc(started.run)}`;
    } catch (err) {
      result.replaceChildren(notice(`Cannot start the run: ${err.message}`, "error"));
    } finally {
      submit.disabled = false;
    }
  });

  return {
    el,
    focus: () => repo.focus(),
    setRepos(repos) {
      repo.replaceChildren(...repos.map((r) => h("option", { value: r.name }, r.name)));
    },
  };
}

/** A horizontal bar of counts per state (an SVG, `width` pixels wide). */
function stateBar(counts, width) {
  const total = STATES.reduce((n, st) => n + (counts[st] || 0), 0);
  const svg = s("svg", { class: "state-bar", width, height: 8, viewBox: `0 0 ${width} 8`, "aria-hidden": "true" });
  fillBar(svg, counts, total, 0, 0, width, 8);
  return svg;
}

/** Draws the stacked per-state rectangles of `counts` into `parent`. */
function fillBar(parent, counts, total, x, y, width, height) {
  parent.append(s("rect", { x, y, width, height, class: "bar-bg" }));
  if (!total) return;
  let at = x;
  for (const st of STATES) {
    const n = counts[st] || 0;
    if (!n) continue;
    const w = (n / total) * width;
    parent.append(s("rect", { x: at, y, width: Math.max(w, 1), height, "data-state": st, class: "bar" }));
    at += w;
  }
}

// ---------------------------------------------------------------------------------------------
// A run

const ROW_HEIGHT = 30; // the task list's rows, in CSS pixels (app.css .task-row)
const NODE_W = 180;
const NODE_H = 58;
const COL_GAP = 56;
const ROW_GAP = 18;
const PAD = 16;

function runPage(runId, initialNode) {
  const abort = new AbortController();
  const base = `/runs/${enc(runId)}`;
  /** Everything known about the run: the detail, the graph, and node states kept live. */
  const model = {
    run: null,
    graph: null,
    tasks: new Map(), // node → TaskRecord
    order: [], // nodes in plan order
    groupOf: new Map(), // node → group id
    kindOf: new Map(), // group id → kind
    // Node states from events, which may be ahead of the record read (a run in progress is read
    // from a snapshot its driver writes now and then).
    seen: new Map(), // node → {state, attempts, started_ms, finished_ms, message}
  };
  let events = null;
  let lastSeq = 0;
  let finished = false;
  let poller = null;
  let ticker = null;
  const filter = { text: "", group: "", state: "" };
  let panel = null; // the open task panel

  // --- layout
  const title = h("h1", { class: "run-title" }, runId);
  const runState = h("span", { id: "run-state" });
  const cancelBtn = h("button", { type: "button", id: "cancel", class: "danger", disabled: true }, "Cancel run");
  const retryBtn = h("button", { type: "button", id: "retry", disabled: true }, "Retry run");
  const actionMsg = h("span", { class: "action-msg", role: "status" });
  const summary = h("section", { id: "summary", "aria-label": "Summary" });
  const graphBox = h("div", { class: "graph", id: "graph", "aria-label": "Task graph" });
  const liveMsg = h("div", { class: "status-line" });

  const filterInput = h("input", { id: "filter", type: "search", placeholder: "Filter tasks ( / )", "aria-label": "Filter tasks" });
  const stateSelect = h(
    "select",
    { id: "task-state-filter", "aria-label": "Task state" },
    h("option", { value: "" }, "any state"),
    ...STATES.map((st) => h("option", { value: st }, st)),
  );
  const groupChip = h("button", { type: "button", class: "chip", hidden: true, title: "Show every task" });
  const listCount = h("span", { class: "list-count" });
  const viewport = h("div", { class: "task-list", id: "tasks", role: "list", "aria-label": "Tasks", tabindex: "-1" });
  const spacer = h("div", { class: "spacer" });
  const rowsBox = h("div", { class: "rows" });
  viewport.append(spacer, rowsBox);

  const tabs = {
    tasks: h("button", { type: "button", role: "tab", id: "tab-tasks", "aria-selected": "true" }, "Tasks"),
    report: h("button", { type: "button", role: "tab", id: "tab-report" }, "Report"),
    result: h("button", { type: "button", role: "tab", id: "tab-result" }, "Result diff"),
  };
  const tasksView = h(
    "div",
    { class: "tab-body", id: "tasks-view" },
    h("div", { class: "toolbar" }, filterInput, stateSelect, groupChip, listCount),
    h(
      "div",
      { class: "task-row task-head", "aria-hidden": "true" },
      h("span", {}),
      ...[
        ["Task"],
        ["State"],
        ["Tries"],
        ["Took", "num"],
        ["Cost", "num"],
        ["Message or output"],
      ].map(([label, cls]) => h("span", { class: cls ?? null }, label)),
    ),
    viewport,
  );
  const reportView = h("div", { class: "tab-body scroll", id: "report", hidden: true });
  const resultView = h("div", { class: "tab-body scroll", id: "result", hidden: true });

  const panelBox = h("aside", { id: "task-panel", hidden: true, "aria-label": "Task" });

  app.append(
    header(h("a", { href: "#/" }, "Runs"), h("span", { class: "sep" }, "/"), h("span", { class: "mono" }, runId)),
    h(
      "main",
      { class: "run" },
      h(
        "div",
        { class: "run-main" },
        h("div", { class: "run-head" }, title, runState, h("div", { class: "actions" }, actionMsg, cancelBtn, retryBtn)),
        summary,
        liveMsg,
        graphBox,
        h("div", { class: "tabs", role: "tablist" }, ...Object.values(tabs)),
        tasksView,
        reportView,
        resultView,
      ),
      panelBox,
    ),
  );

  for (const [name, btn] of Object.entries(tabs)) btn.addEventListener("click", () => selectTab(name));

  function selectTab(name) {
    for (const [n, btn] of Object.entries(tabs)) btn.setAttribute("aria-selected", String(n === name));
    tasksView.hidden = name !== "tasks";
    reportView.hidden = name !== "report";
    resultView.hidden = name !== "result";
    if (name === "tasks") renderRows();
    if (name === "report") loadReport();
    if (name === "result") loadResultDiff();
  }

  // --- actions
  cancelBtn.addEventListener("click", async () => {
    // Cancelling stops running work for good: the browser's own dialog asks first.
    if (!window.confirm(`Cancel run ${runId}? Its running tasks are stopped.`)) return;
    cancelBtn.disabled = true;
    actionMsg.textContent = "Cancelling…";
    try {
      const r = await post(`${base}/cancel`);
      actionMsg.textContent = `Cancel requested (${r.state ?? "cancelling"})`;
      refresh();
    } catch (e) {
      actionMsg.textContent = `Cannot cancel: ${e.message}`;
      renderHead();
    }
  });
  retryBtn.addEventListener("click", async () => {
    retryBtn.disabled = true;
    actionMsg.textContent = "Retrying…";
    try {
      const r = await post(`${base}/retry`);
      actionMsg.textContent = "Retry started";
      if (r.run && r.run !== runId) location.hash = `#/runs/${enc(r.run)}`;
      else {
        finished = false;
        model.seen.clear(); // the states seen were the last attempt's
        connect();
        refresh();
      }
    } catch (e) {
      actionMsg.textContent = `Cannot retry: ${e.message}`;
      renderHead();
    }
  });

  // --- data
  let waitedForRun = 0;
  async function refresh() {
    try {
      const [run, graph] = await Promise.all([getJSON(base, abort.signal), getJSON(`${base}/graph`, abort.signal)]);
      if (!model.run) liveMsg.replaceChildren();
      applyRun(run, graph);
    } catch (e) {
      if (e.name === "AbortError") return;
      if (!(e instanceof HttpError)) console.error(e);
      // A run just started from the page takes a moment to be recorded.
      if (!model.run && e.status === 404 && waitedForRun++ < 40) {
        liveMsg.replaceChildren(notice("Waiting for the run to start…"));
        setTimeout(refresh, 250);
        return;
      }
      if (!model.run) {
        liveMsg.replaceChildren(notice(e.status === 404 ? `No run ${runId}.` : `Cannot load the run: ${e.message}`, "error"));
      }
    }
  }
  // Node states come with the events; the full record (costs, messages) is read again now and
  // then, less often for a big run, whose record is big.
  const refreshSoon = throttle(refresh, () => (model.tasks.size > 2000 ? 5000 : 1500));

  function applyRun(run, graph) {
    const structureChanged = !model.graph || graphKey(graph) !== graphKey(model.graph);
    model.run = run;
    model.graph = graph;
    model.tasks = new Map(run.tasks.map((t) => [t.node, t]));
    model.order = [...run.tasks].sort((a, b) => (a.order ?? 0) - (b.order ?? 0)).map((t) => t.node);
    for (const [node, seen] of model.seen) {
      const t = model.tasks.get(node);
      if (!t) {
        model.tasks.set(node, { node, task: taskOfNode(node), order: model.order.length, ...seen });
        model.order.push(node);
      } else if (
        t.state === seen.state ||
        progress(t.state) > progress(seen.state) ||
        (t.attempts || 0) > (seen.attempts || 0)
      ) {
        model.seen.delete(node); // the record has caught up
      } else {
        Object.assign(t, seen); // the record is older than the events
      }
    }
    model.groupOf = new Map();
    model.kindOf = new Map();
    for (const g of graph.groups) {
      model.kindOf.set(g.id, g.kind);
      for (const n of g.nodes) model.groupOf.set(n, g.id);
    }
    if (run.state !== "running" || run.live === false) finished = true;
    if (structureChanged) drawGraph();
    renderAll();
    if (!finished && !events) connect();
    if (finished) stopLive();
  }

  function graphKey(graph) {
    return graph.groups.map((g) => `${g.id}:${g.count}:${g.layer}`).join(",") + "|" + graph.edges.map((e) => `${e.from}>${e.to}`).join(",");
  }

  /** The run's events, live: node states change as they come, details follow by refetching. */
  function connect() {
    if (events) return;
    const url = `${API}${base}/events${lastSeq ? `?after=${lastSeq}` : ""}`;
    events = new EventSource(url);
    events.onopen = () => liveMsg.replaceChildren();
    events.onerror = () => {
      if (finished) return stopLive();
      liveMsg.replaceChildren(notice("Live updates interrupted; reconnecting…", "warn"));
    };
    events.onmessage = (e) => onEvent(e);
    for (const type of [...Object.keys(STATE_OF_EVENT), "run_started", "task_progress", "map_expanded", "warning", "run_finished"]) {
      events.addEventListener(type, onEvent);
    }
  }

  function stopLive() {
    events?.close();
    events = null;
  }

  let pendingRender = false;
  function onEvent(e) {
    if (e.lastEventId) lastSeq = Math.max(lastSeq, Number(e.lastEventId) || 0);
    let ev;
    try {
      ev = JSON.parse(e.data);
    } catch {
      return;
    }
    const type = ev.event || e.type;
    const st = STATE_OF_EVENT[type];
    if (st && ev.task) {
      let t = model.tasks.get(ev.task);
      if (!t) {
        t = { node: ev.task, task: taskOfNode(ev.task), state: "pending", attempts: 0, order: model.order.length };
        model.tasks.set(ev.task, t);
        model.order.push(ev.task);
        if (!model.groupOf.has(ev.task)) model.groupOf.set(ev.task, taskOfNode(ev.task));
      }
      t.state = st;
      if (ev.attempt) t.attempts = Math.max(t.attempts || 0, ev.attempt);
      if (type === "task_started" && !t.started_ms) t.started_ms = ev.time_ms;
      if (st !== "running" && st !== "retrying") t.finished_ms = ev.time_ms;
      if (ev.message) t.message = ev.message;
      if (ev.reason) t.message = ev.reason;
      const { state, attempts, started_ms, finished_ms, message } = t;
      model.seen.set(ev.task, { state, attempts, started_ms, finished_ms, message });
      scheduleRender();
      refreshSoon();
    }
    if (type === "task_progress" && panel && panel.node === ev.task) panel.progress(ev);
    if (type === "map_expanded") refreshSoon();
    if (type === "run_finished") {
      finished = true;
      if (model.run) model.run.state = ev.state;
      stopLive();
      scheduleRender();
      // The archive is written as the run ends: read the final record a little later too.
      refresh();
      setTimeout(refresh, 1000);
    }
  }

  function scheduleRender() {
    if (pendingRender) return;
    pendingRender = true;
    requestAnimationFrame(() => {
      pendingRender = false;
      renderAll();
    });
  }

  function renderAll() {
    renderHead();
    renderSummary();
    updateGraph();
    renderRows();
    panel?.runChanged();
  }

  function counts() {
    const c = Object.fromEntries(STATES.map((st) => [st, 0]));
    for (const t of model.tasks.values()) c[t.state] = (c[t.state] || 0) + 1;
    return c;
  }

  function renderHead() {
    const run = model.run;
    if (!run) return;
    title.textContent = run.workflow || "workflow";
    document.title = `${run.workflow || "workflow"} · ${run.state} · ccluster`;
    runState.replaceChildren(badge(run.state), run.rehearsed ? h("span", { class: "tag" }, "rehearsal") : "");
    cancelBtn.disabled = !(run.state === "running" && run.live !== false);
    if (run.state !== "running" && actionMsg.textContent.startsWith("Cancel")) actionMsg.textContent = "";
    retryBtn.disabled = !["failed", "cancelled", "interrupted"].includes(run.state);
  }

  function renderSummary() {
    const run = model.run;
    if (!run) return;
    const c = counts();
    const total = model.tasks.size;
    const item = (label, value, state) =>
      h("div", { class: "stat", "data-stat": label, "data-state": state || null }, h("span", { class: "stat-value" }, value), h("span", { class: "stat-label" }, label));
    const cost = run.cost_usd ?? [...model.tasks.values()].reduce((n, t) => n + (t.cost_usd || 0), 0);
    const parts = [
      item("done", `${c.succeeded + c.cached}/${total}`, "succeeded"),
      item("running", String(c.running + c.retrying), "running"),
      item("failed", String(c.failed), "failed"),
      item("pending", String(c.pending), "pending"),
      c.skipped ? item("skipped", String(c.skipped), "skipped") : null,
      c.cancelled ? item("cancelled", String(c.cancelled), "cancelled") : null,
      item("cost", fmtCost(cost) + (run.budget_usd ? ` of ${fmtCost(run.budget_usd)}` : "")),
      run.budget_usd ? budgetMeter(cost, run.budget_usd) : null,
      item("tokens", fmtTokens(run.tokens)),
      h("div", { class: "stat" }, h("span", { class: "stat-value", id: "run-duration" }, fmtDuration(runDuration(run))), h("span", { class: "stat-label" }, "duration")),
      h(
        "div",
        { class: "stat wide" },
        h("span", { class: "stat-value small" }, `${fmtTime(run.started_ms)} · ${startedBy(run)}`),
        h("span", { class: "stat-label" }, `${run.repo} · ${run.clusterfile ?? ""}`),
      ),
      h("div", { class: "summary-bar" }, stateBar(c, 400)),
    ];
    summary.replaceChildren(...parts.filter(Boolean));
  }

  function budgetMeter(cost, budget) {
    return h("meter", { class: "budget", min: "0", max: String(budget), value: String(Math.min(cost, budget)), high: String(budget * 0.8), title: "Budget spent" });
  }

  // --- the graph: one box per group (a task and all its instances), columns by layer
  let groupEls = new Map(); // group id → {g, counts, bar}

  function drawGraph() {
    const graph = model.graph;
    groupEls = new Map();
    const layers = new Map();
    for (const g of graph.groups) {
      const l = g.layer ?? 0;
      if (!layers.has(l)) layers.set(l, []);
      layers.get(l).push(g);
    }
    const layerIds = [...layers.keys()].sort((a, b) => a - b);
    const pos = new Map();
    let maxRows = 0;
    layerIds.forEach((l, col) => {
      const groups = layers.get(l);
      maxRows = Math.max(maxRows, groups.length);
      groups.forEach((g, row) => pos.set(g.id, { x: PAD + col * (NODE_W + COL_GAP), y: PAD + row * (NODE_H + ROW_GAP) }));
    });
    const width = PAD * 2 + layerIds.length * NODE_W + Math.max(0, layerIds.length - 1) * COL_GAP;
    const height = PAD * 2 + maxRows * NODE_H + Math.max(0, maxRows - 1) * ROW_GAP;
    const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "group", "aria-label": "Task graph" });
    svg.append(
      s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 8 8", refX: "8", refY: "4", markerWidth: "7", markerHeight: "7", orient: "auto" }, s("path", { d: "M0,0 L8,4 L0,8 z", class: "arrow" }))),
    );
    const edges = s("g", { class: "edges" });
    for (const e of graph.edges) {
      const a = pos.get(e.from);
      const b = pos.get(e.to);
      if (!a || !b) continue;
      const x1 = a.x + NODE_W;
      const y1 = a.y + NODE_H / 2;
      const x2 = b.x;
      const y2 = b.y + NODE_H / 2;
      const dx = Math.max(24, (x2 - x1) / 2);
      edges.append(s("path", { d: `M${x1},${y1} C${x1 + dx},${y1} ${x2 - dx},${y2} ${x2},${y2}`, class: "edge", "data-from": e.from, "data-to": e.to, "marker-end": "url(#arrow)" }));
    }
    svg.append(edges);
    // Nodes in reading order (column by column), so Tab goes through them as the eye does.
    for (const l of layerIds) {
      for (const g of layers.get(l)) svg.append(groupNode(g, pos.get(g.id)));
    }
    graphBox.replaceChildren(svg);
    if (!graph.groups.length) graphBox.replaceChildren(notice("No tasks."));
  }

  function groupNode(g, p) {
    const single = g.count === 1 && g.nodes.length === 1;
    const attrs = {
      class: "node",
      "data-group": g.id,
      "data-kind": g.kind,
      tabindex: "0",
      role: "button",
      transform: `translate(${p.x},${p.y})`,
    };
    if (single) attrs["data-node"] = g.nodes[0];
    const el = s("g", attrs);
    const tooltip = s("title", {});
    el.append(tooltip, s("rect", { class: "node-box", width: NODE_W, height: NODE_H, rx: 6 }));
    el.append(s("rect", { class: "node-stripe", width: 5, height: NODE_H, rx: 2 }));
    el.append(s("text", { x: 14, y: 20, class: "node-name" }, clip(g.id, 20)));
    el.append(s("text", { x: NODE_W - 10, y: 20, class: "node-kind", "text-anchor": "end" }, g.kind));
    const countsText = s("text", { x: 14, y: 38, class: "node-counts" });
    const bar = s("g", {});
    el.append(countsText, bar);
    activateOnKeys(el, () => {
      if (single) openTask(g.nodes[0]);
      else showGroup(g.id);
    });
    groupEls.set(g.id, { el, countsText, bar, tooltip, single });
    return el;
  }

  function clip(text, n) {
    return text.length > n ? text.slice(0, n - 1) + "…" : text;
  }

  /** Node states change in place: no redraw, focus stays where it is. */
  function updateGraph() {
    if (!model.graph) return;
    const perGroup = new Map();
    for (const t of model.tasks.values()) {
      const gid = model.groupOf.get(t.node) ?? t.task ?? taskOfNode(t.node);
      if (!perGroup.has(gid)) perGroup.set(gid, {});
      const c = perGroup.get(gid);
      c[t.state] = (c[t.state] || 0) + 1;
    }
    for (const g of model.graph.groups) {
      const els = groupEls.get(g.id);
      if (!els) continue;
      const c = perGroup.get(g.id) || g.counts || {};
      const total = STATES.reduce((n, st) => n + (c[st] || 0), 0) || g.count;
      // A single task's box shows its own state (`retrying` too); a fan-out's, the aggregate.
      const state = els.single && model.tasks.get(g.nodes[0]) ? model.tasks.get(g.nodes[0]).state : groupState(c, total);
      els.el.setAttribute("data-state", state);
      els.el.setAttribute("data-count", String(total));
      const done = (c.succeeded || 0) + (c.cached || 0);
      let text;
      if (els.single) {
        const t = model.tasks.get(g.nodes[0]);
        text = state + (t && t.attempts > 1 ? ` · attempt ${t.attempts}` : "") + (t && t.cost_usd ? ` · ${fmtCost(t.cost_usd)}` : "");
      } else if (!total) {
        text = "instances to come"; // a map over a list a task has not made yet
      } else {
        const parts = [`${done}/${total} done`];
        if (c.running || c.retrying) parts.push(`${(c.running || 0) + (c.retrying || 0)} running`);
        if (c.failed) parts.push(`${c.failed} failed`);
        text = parts.join(" · ");
      }
      els.countsText.textContent = text;
      els.tooltip.textContent = `${g.id} (${g.kind}, ${total} task${total === 1 ? "" : "s"}): ` + STATES.filter((st) => c[st]).map((st) => `${c[st]} ${st}`).join(", ");
      els.el.setAttribute("aria-label", `${g.id}, ${g.kind}, ${els.countsText.textContent}`);
      els.bar.replaceChildren();
      fillBar(els.bar, c, total, 14, NODE_H - 14, NODE_W - 28, 6);
    }
  }

  // --- the task list: only the rows in view exist in the page
  let visibleNodes = [];
  let focusIndex = -1;

  function filtered() {
    const text = filter.text.toLowerCase();
    const out = [];
    for (const node of model.order) {
      const t = model.tasks.get(node);
      if (!t) continue;
      if (filter.group && (model.groupOf.get(node) ?? taskOfNode(node)) !== filter.group) continue;
      if (filter.state && t.state !== filter.state) continue;
      if (text && !node.toLowerCase().includes(text) && !(t.message || "").toLowerCase().includes(text)) continue;
      out.push(node);
    }
    return out;
  }

  function renderRows() {
    if (tasksView.hidden) return;
    visibleNodes = filtered();
    listCount.textContent = `${visibleNodes.length} of ${model.tasks.size} tasks`;
    groupChip.hidden = !filter.group;
    groupChip.textContent = filter.group ? `task: ${filter.group} ✕` : "";
    spacer.style.height = `${visibleNodes.length * ROW_HEIGHT}px`;
    const hadFocus = rowsBox.contains(document.activeElement) ? document.activeElement.dataset.node : null;
    const top = viewport.scrollTop;
    const view = viewport.clientHeight || 400;
    const first = Math.max(0, Math.floor(top / ROW_HEIGHT) - 10);
    const last = Math.min(visibleNodes.length, Math.ceil((top + view) / ROW_HEIGHT) + 10);
    const rows = [];
    for (let i = first; i < last; i++) rows.push(taskRow(visibleNodes[i], i));
    rowsBox.style.transform = `translateY(${first * ROW_HEIGHT}px)`;
    rowsBox.replaceChildren(...rows);
    if (hadFocus) rowsBox.querySelector(`[data-node="${CSS.escape(hadFocus)}"]`)?.focus({ preventScroll: true });
  }

  function taskRow(node, index) {
    const t = model.tasks.get(node);
    const selected = panel && panel.node === node;
    const row = h(
      "div",
      { class: "task-row", role: "listitem", tabindex: "0", "data-node": node, "data-state": t.state, "data-index": String(index), "aria-current": selected ? "true" : null },
      h("span", { class: "dot", "data-state": t.state, "aria-hidden": "true" }),
      h("span", { class: "t-node mono" }, node),
      h("span", { class: "t-state" }, t.state),
      h("span", { class: "t-attempts" }, t.attempts > 1 ? `×${t.attempts}` : ""),
      h("span", { class: "t-dur num" }, t.started_ms ? fmtDuration((t.finished_ms || Date.now()) - t.started_ms) : ""),
      h("span", { class: "t-cost num" }, t.cost_usd ? fmtCost(t.cost_usd) : ""),
      h("span", { class: "t-msg" }, t.message || (typeof t.output === "string" ? t.output : "")),
    );
    activateOnKeys(row, () => openTask(node));
    row.addEventListener("focus", () => (focusIndex = index));
    return row;
  }

  viewport.addEventListener("scroll", () => requestAnimationFrame(renderRows));
  viewport.addEventListener("keydown", (e) => {
    const keys = { ArrowDown: 1, ArrowUp: -1, PageDown: 10, PageUp: -10 };
    let to = null;
    if (e.key in keys) to = focusIndex + keys[e.key];
    if (e.key === "Home") to = 0;
    if (e.key === "End") to = visibleNodes.length - 1;
    if (to === null || !visibleNodes.length) return;
    e.preventDefault();
    focusRow(Math.max(0, Math.min(visibleNodes.length - 1, to)));
  });

  function focusRow(index) {
    focusIndex = index;
    const top = index * ROW_HEIGHT;
    if (top < viewport.scrollTop) viewport.scrollTop = top;
    else if (top + ROW_HEIGHT > viewport.scrollTop + viewport.clientHeight) viewport.scrollTop = top + ROW_HEIGHT - viewport.clientHeight;
    renderRows();
    rowsBox.querySelector(`[data-index="${index}"]`)?.focus({ preventScroll: true });
  }

  filterInput.addEventListener("input", () => {
    filter.text = filterInput.value;
    viewport.scrollTop = 0;
    renderRows();
  });
  stateSelect.addEventListener("change", () => {
    filter.state = stateSelect.value;
    viewport.scrollTop = 0;
    renderRows();
  });
  groupChip.addEventListener("click", () => {
    filter.group = "";
    renderRows();
  });

  /** A fan-out's box shows its instances in the task list. */
  function showGroup(gid) {
    filter.group = gid;
    selectTab("tasks");
    viewport.scrollTop = 0;
    renderRows();
    if (visibleNodes.length) focusRow(0);
  }

  // --- report and result diff
  async function loadReport() {
    reportView.replaceChildren(notice("Loading the report…"));
    try {
      const text = await getText(`${base}/report?format=markdown`, abort.signal);
      reportView.replaceChildren(
        h(
          "p",
          { class: "report-links" },
          "As ",
          h("a", { href: `${API}${base}/report?format=markdown`, target: "_blank", rel: "noopener" }, "markdown"),
          " or ",
          h("a", { href: `${API}${base}/report`, target: "_blank", rel: "noopener" }, "JSON"),
        ),
        markdownView(text),
      );
    } catch (e) {
      if (e.name !== "AbortError") reportView.replaceChildren(notice(`No report: ${e.message}`, "warn"));
    }
  }

  async function loadResultDiff() {
    resultView.replaceChildren(notice("Loading the result's diff…"));
    try {
      const text = await getText(`${base}/diff`, abort.signal);
      resultView.replaceChildren(diffView(text, "result-diff"));
    } catch (e) {
      if (e.name !== "AbortError") resultView.replaceChildren(notice(e.status === 404 ? "The run has no result diff (yet)." : `No result diff: ${e.message}`, "warn"));
    }
  }

  // --- the task panel
  let openedFrom = null; // the node whose panel was opened
  let returnFocus = null; // the element it was opened from, which gets the focus back

  function openTask(node) {
    openedFrom = node;
    returnFocus = document.activeElement?.closest?.("[data-node], [data-group]") ?? null;
    location.hash = `#/runs/${enc(runId)}/tasks/${enc(node)}`;
  }

  function showTask(node) {
    if (!node) {
      if (panel) {
        panel.close();
        panel = null;
      }
      panelBox.hidden = true;
      panelBox.replaceChildren();
      renderRows();
      // Focus goes back to where the panel was opened from.
      if (returnFocus?.isConnected) returnFocus.focus();
      else if (openedFrom) {
        // A row is redrawn as the list changes: the one showing the same node.
        const back =
          rowsBox.querySelector(`[data-node="${CSS.escape(openedFrom)}"]`) || graphBox.querySelector(`[data-node="${CSS.escape(openedFrom)}"]`);
        back?.focus();
      }
      return;
    }
    if (panel && panel.node === node) return;
    panel?.close();
    panelBox.hidden = false;
    panel = taskPanel(node);
    renderRows();
  }

  function closeTask() {
    location.hash = `#/runs/${enc(runId)}`;
  }

  function taskPanel(node) {
    const nodeBase = `${base}/tasks/${enc(node)}`;
    const panelAbort = new AbortController();
    let tab = null;
    let tabAbort = null;
    let detail = null;
    let attempt = null; // the attempt shown; null for the latest
    let timer = null;
    let transcriptRefresh = null;
    let sawAgent = false;
    let lastKey = null; // the node's state and attempts when last looked at

    const heading = h("h2", { tabindex: "-1", class: "mono" }, node);
    const stateEl = h("span", {});
    const closeBtn = h("button", { type: "button", class: "close", id: "close-panel", "aria-label": "Close the task panel (Esc)" }, "✕");
    const facts = h("dl", { class: "facts" });
    const attemptSelect = h("select", { id: "attempt", "aria-label": "Attempt" });
    const tabButtons = h("div", { class: "tabs", role: "tablist" });
    const body = h("div", { class: "panel-body" });
    panelBox.replaceChildren(h("div", { class: "panel-head" }, heading, stateEl, closeBtn), facts, h("div", { class: "panel-bar" }, tabButtons, attemptSelect), body);
    closeBtn.addEventListener("click", closeTask);
    attemptSelect.addEventListener("change", () => {
      attempt = attemptSelect.value ? Number(attemptSelect.value) : null;
      showTab(tab);
    });
    heading.focus();

    const kind = () => model.kindOf.get(model.groupOf.get(node) ?? taskOfNode(node));
    // The run's records (read again as the run goes, and moved on by its events) are fresher
    // than the task's detail, read once when the panel opened.
    const task = () => model.tasks.get(node) || detail?.task;
    const running = () => ["running", "retrying"].includes(task()?.state) && !finished;
    const attemptParam = () => (attempt ? `attempt=${attempt}` : "");

    function tabNames() {
      const names = [];
      if (kind() === "agent") names.push("transcript");
      names.push("log", "diff", "attempts", "artifacts", "output");
      return names;
    }

    function renderTabs() {
      tabButtons.replaceChildren(
        ...tabNames().map((name) => {
          const b = h("button", { type: "button", role: "tab", id: `tab-${name}`, "aria-selected": String(name === tab) }, name[0].toUpperCase() + name.slice(1));
          b.addEventListener("click", () => showTab(name));
          return b;
        }),
      );
    }

    async function load() {
      try {
        detail = await getJSON(nodeBase, panelAbort.signal);
        renderFacts();
        if (!tab) showTab(tabNames()[0]);
        else if (tab === "attempts" || tab === "artifacts" || tab === "output") showTab(tab);
      } catch (e) {
        if (e.name === "AbortError") return;
        facts.replaceChildren(notice(e.status === 404 ? `No task ${node} in this run.` : `Cannot load the task: ${e.message}`, "error"));
        if (!tab) showTab(tabNames()[0]);
      }
    }

    function renderFacts() {
      const t = task();
      if (!t) return;
      stateEl.replaceChildren(badge(t.state));
      const rows = [
        ["task", `${t.task ?? taskOfNode(node)} (${kind() ?? "?"})`],
        ["attempts", String(t.attempts ?? 0)],
        t.started_ms ? ["started", fmtTime(t.started_ms)] : null,
        t.started_ms ? ["duration", fmtDuration((t.finished_ms || Date.now()) - t.started_ms)] : null,
        t.exit_code !== null && t.exit_code !== undefined ? ["exit code", String(t.exit_code)] : null,
        t.class ? ["failure", t.class] : null,
        t.message ? ["message", t.message] : null,
        t.cost_usd ? ["cost", `${fmtCost(t.cost_usd)} · ${fmtTokens(t.tokens)} tokens`] : null,
        t.denials ? ["denials", String(t.denials)] : null,
        t.cached_from ? ["cached from", t.cached_from] : null,
        t.commit ? ["commit", t.commit.slice(0, 12)] : null,
      ].filter(Boolean);
      facts.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
      // Attempts that ended have records; a run in progress names the others by number only.
      const ended = new Map((detail?.attempts || []).map((a) => [a.attempt, a]));
      const numbers = detail?.attempt_numbers?.length ? detail.attempt_numbers : [...ended.keys()];
      const keep = attemptSelect.value;
      attemptSelect.replaceChildren(
        h("option", { value: "" }, "latest attempt"),
        ...numbers.map((n) => {
          const a = ended.get(n);
          return h("option", { value: String(n) }, `attempt ${n}${a ? (a.succeeded ? " ✓" : " ✗") : ""}`);
        }),
      );
      attemptSelect.value = keep;
      attemptSelect.hidden = numbers.length < 2;
    }

    function showTab(name) {
      tab = name;
      if (kind() === "agent") sawAgent = true;
      tabAbort?.abort();
      tabAbort = new AbortController();
      clearInterval(timer);
      timer = null;
      renderTabs();
      const signal = tabAbort.signal;
      if (name === "transcript") showTranscript(signal);
      else if (name === "log") showLog(signal);
      else if (name === "diff") showDiff(signal);
      else if (name === "attempts") showAttempts();
      else if (name === "artifacts") showArtifacts();
      else showOutput();
    }

    // The agent's transcript; refetched as its progress events come, and every few seconds.
    function showTranscript(signal) {
      const list = h("ol", { id: "transcript", class: "transcript", "aria-live": "polite" });
      const info = h("div", { class: "status-line" });
      body.replaceChildren(info, list);
      let shown = 0;
      const fetchIt = async () => {
        try {
          const entries = await getJSON(`${nodeBase}/transcript?${attemptParam()}`, signal);
          info.replaceChildren();
          if (entries.length === shown) return;
          const atBottom = body.scrollTop + body.clientHeight >= body.scrollHeight - 8;
          // Entries only grow for an attempt: add the new ones.
          if (entries.length < shown) {
            list.replaceChildren();
            shown = 0;
          }
          for (const entry of entries.slice(shown)) list.append(transcriptEntry(entry));
          shown = entries.length;
          if (!entries.length) info.replaceChildren(notice(running() ? "Waiting for the agent's first turn…" : "No transcript."));
          if (atBottom) body.scrollTop = body.scrollHeight;
        } catch (e) {
          if (e.name !== "AbortError") info.replaceChildren(notice(e.status === 404 ? "No transcript yet." : `Cannot load the transcript: ${e.message}`, "warn"));
        }
      };
      transcriptRefresh = throttle(fetchIt, 700);
      fetchIt();
      timer = setInterval(() => {
        if (running()) fetchIt();
      }, 3000);
    }

    function transcriptEntry(entry) {
      const label = entry.kind === "turn" && entry.turn ? `turn ${entry.turn}` : entry.kind === "result" && entry.turn ? `result · ${entry.turn} turns` : entry.kind.replace("_", " ");
      return h(
        "li",
        { class: "entry", "data-kind": entry.kind, "data-error": entry.is_error ? "true" : null },
        h("span", { class: "entry-kind" }, label),
        entry.time_ms ? h("span", { class: "entry-time" }, fmtTime(entry.time_ms)) : null,
        entry.cost_usd ? h("span", { class: "entry-cost" }, fmtCost(entry.cost_usd)) : null,
        entry.detail && !(entry.kind === "turn" && /^(turn )?\d+$/.test(entry.detail)) ? h("div", { class: "entry-detail" }, entry.detail) : null,
      );
    }

    // The attempt's log: its tail, then followed while the task runs.
    function showLog(signal) {
      const streamSelect = h(
        "select",
        { id: "log-stream", "aria-label": "Log stream" },
        ...["out", "err", "setup.out", "setup.err", "resolve.out", "resolve.err"].map((st) => h("option", { value: st }, st === "out" ? "stdout" : st === "err" ? "stderr" : st)),
      );
      const pre = h("pre", { id: "log", class: "log", tabindex: "0" });
      const info = h("div", { class: "status-line" });
      body.replaceChildren(h("div", { class: "toolbar" }, streamSelect, info), pre);
      let streamAbort = null;
      const start = () => {
        streamAbort?.abort();
        streamAbort = new AbortController();
        signal.addEventListener("abort", () => streamAbort.abort());
        pre.replaceChildren();
        followLog(streamSelect.value, pre, info, streamAbort.signal);
      };
      streamSelect.addEventListener("change", start);
      start();
    }

    async function followLog(stream, pre, info, signal) {
      const TAIL = 65536;
      const url = (offset, more) => `${nodeBase}/logs?stream=${enc(stream)}&offset=${offset}${more}${attempt ? `&attempt=${attempt}` : ""}`;
      const decoder = new TextDecoder();
      const append = (bytes) => {
        const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
        pre.append(document.createTextNode(decoder.decode(bytes, { stream: true })));
        // A followed log keeps its last ~1 MiB of text on the page.
        if (pre.childNodes.length > 400) pre.replaceChildren(document.createTextNode(pre.textContent.slice(-1_000_000)));
        if (atBottom) pre.scrollTop = pre.scrollHeight;
      };
      try {
        let r = await fetch(API + url(0, `&length=${TAIL}`), { signal });
        if (r.status === 404) {
          info.replaceChildren(notice(running() ? "No output yet." : "No such log.", "info"));
          if (!running()) return;
        } else if (!r.ok) throw new HttpError(r.status, await problemText(r));
        let offset = 0;
        if (r.ok) {
          const size = Number(r.headers.get("X-Log-Size") || 0);
          if (size > TAIL) {
            info.replaceChildren(notice(`Showing the last ${fmtBytes(TAIL)} of ${fmtBytes(size)}.`));
            offset = size - TAIL;
            r = await fetch(API + url(offset, `&length=${TAIL}`), { signal });
            if (!r.ok) throw new HttpError(r.status, await problemText(r));
          }
          const bytes = new Uint8Array(await r.arrayBuffer());
          append(bytes);
          offset += bytes.length;
        }
        // Follow while the attempt runs: the server streams new bytes until it ends.
        while (running() && !signal.aborted) {
          const f = await fetch(API + url(offset, "&follow=true"), { signal });
          if (!f.ok || !f.body) {
            await new Promise((res) => setTimeout(res, 1500));
            continue;
          }
          const reader = f.body.getReader();
          for (;;) {
            const { done, value } = await reader.read();
            if (done) break;
            append(value);
            offset += value.length;
          }
          await new Promise((res) => setTimeout(res, 500));
        }
        if (!pre.textContent) info.replaceChildren(notice("The log is empty."));
      } catch (e) {
        if (e.name !== "AbortError") info.replaceChildren(notice(`Cannot read the log: ${e.message}`, "warn"));
      }
    }

    async function showDiff(signal) {
      body.replaceChildren(notice("Loading the diff…"));
      try {
        const text = await getText(`${nodeBase}/diff?${attemptParam()}`, signal);
        body.replaceChildren(diffView(text, "diff"));
      } catch (e) {
        if (e.name === "AbortError") return;
        body.replaceChildren(
          h("div", { id: "diff", class: "diff empty" }, notice(e.status === 404 ? "This attempt changed no files (or has no workspace)." : `Cannot load the diff: ${e.message}`, "info")),
        );
      }
    }

    function showAttempts() {
      const attempts = detail?.attempts || [];
      if (!attempts.length) {
        // A run in progress has its attempts' records in its database, which only its driver
        // reads: the server knows their numbers, and their details once the run has ended.
        const numbers = detail?.attempt_numbers || [];
        return body.replaceChildren(
          numbers.length
            ? notice(`Attempt${numbers.length === 1 ? "" : "s"} ${numbers.join(", ")}: their details are shown once the run has ended.`)
            : notice("No attempt yet."),
        );
      }
      body.replaceChildren(
        h(
          "table",
          { id: "attempts", class: "attempts" },
          h("thead", {}, h("tr", {}, ...["#", "Started", "Took", "Outcome", "Exit", "Turns", "Cost", "Message"].map((t) => h("th", { scope: "col" }, t)))),
          h(
            "tbody",
            {},
            ...attempts.map((a) =>
              h(
                "tr",
                {},
                h("td", {}, String(a.attempt)),
                h("td", {}, fmtTime(a.started_ms)),
                h("td", { class: "num" }, a.finished_ms ? fmtDuration(a.finished_ms - a.started_ms) : "running"),
                h("td", {}, a.finished_ms ? badge(a.succeeded ? "succeeded" : "failed") : badge("running"), a.class ? ` ${a.class}` : ""),
                h("td", { class: "num" }, a.exit_code ?? (a.signal ? `signal ${a.signal}` : "")),
                h("td", { class: "num" }, a.usage?.turns ?? ""),
                h("td", { class: "num" }, a.usage ? fmtCost(a.usage.cost_usd) : ""),
                h("td", { class: "msg" }, a.message ?? ""),
              ),
            ),
          ),
        ),
      );
    }

    // The node's artifacts (patches, kept files, test reports), as links.
    async function showArtifacts() {
      const signal = tabAbort.signal;
      body.replaceChildren(notice("Loading the artifacts…"));
      try {
        const mine = await getJSON(`${base}/artifacts?node=${encodeURIComponent(node)}`, signal);
        const list = h("ul", { id: "artifacts", class: "artifacts" });
        for (const a of mine) {
          const href = `${API}${base}/artifacts/${enc(a.node)}/${a.attempt}/${a.path.split("/").map(enc).join("/")}`;
          list.append(
            h(
              "li",
              { "data-kind": a.kind ?? null },
              h("a", { href, target: "_blank", rel: "noopener" }, a.path),
              h("span", { class: "muted" }, ` ${a.kind ?? ""} · attempt ${a.attempt}${a.size !== null && a.size !== undefined ? ` · ${fmtBytes(a.size)}` : ""}`),
            ),
          );
        }
        body.replaceChildren(list);
        if (!mine.length) body.append(notice("No artifacts."));
      } catch (e) {
        if (e.name !== "AbortError") body.replaceChildren(notice(`Cannot list the artifacts: ${e.message}`, "warn"));
      }
    }

    function showOutput() {
      const t = task();
      const out = t?.output;
      body.replaceChildren(
        out === null || out === undefined
          ? notice("No output.")
          : h("pre", { id: "output", class: "output" }, typeof out === "string" ? out : JSON.stringify(out, null, 2)),
      );
    }

    const refreshDetail = throttle(load, 1500);
    load();

    return {
      node,
      close() {
        panelAbort.abort();
        tabAbort?.abort();
        clearInterval(timer);
      },
      /** A progress event of this node: its transcript has grown. */
      progress() {
        if (tab === "transcript") transcriptRefresh?.();
        refreshDetail();
      },
      /** The run's record was refetched: the task's facts may have changed. */
      runChanged() {
        // The kind (agent or not) is known once the graph is: the transcript tab may appear.
        if (kind() === "agent" && tab !== "transcript" && !sawAgent) {
          sawAgent = true;
          showTab("transcript");
        }
        renderFacts();
        const t = model.tasks.get(node);
        if (!t) return;
        const key = `${t.state}/${t.attempts}`;
        if (key === lastKey) return;
        const wasRunning = lastKey !== null && /^(running|retrying)\//.test(lastKey);
        const newAttempt = lastKey !== null && !lastKey.endsWith(`/${t.attempts}`);
        lastKey = key;
        refreshDetail();
        // A retry writes a log of its own: the latest attempt's is followed from its start.
        if (newAttempt && tab === "log" && !attempt) showTab("log");
        // A finished attempt now has its diff and its whole transcript.
        if (wasRunning && !running() && (tab === "diff" || tab === "transcript")) showTab(tab);
      },
    };
  }

  // Ticking durations of a run in progress.
  ticker = setInterval(() => {
    if (!model.run || finished) return;
    const d = document.getElementById("run-duration");
    if (d) d.textContent = fmtDuration(runDuration(model.run));
    // Running tasks' durations too (only the rows in view exist).
    for (const row of rowsBox.querySelectorAll('.task-row[data-state="running"], .task-row[data-state="retrying"]')) {
      const t = model.tasks.get(row.dataset.node);
      const cell = row.querySelector(".t-dur");
      if (t?.started_ms && cell) cell.textContent = fmtDuration(Date.now() - t.started_ms);
    }
  }, 1000);
  // A fallback when the event stream is unavailable: the record is read again now and then.
  poller = setInterval(() => {
    if (!finished) refresh();
  }, 5000);

  refresh();
  if (initialNode) showTask(initialNode);

  return {
    kind: "run",
    run: runId,
    showTask,
    closeTask,
    panelOpen: () => !!panel,
    teardown() {
      abort.abort();
      stopLive();
      panel?.close();
      clearInterval(ticker);
      clearInterval(poller);
    },
  };
}

/** A unified diff as lines, added and removed ones coloured; very long diffs are cut. */
function diffView(text, id) {
  const MAX_LINES = 20000;
  const lines = text.split("\n");
  if (lines.length && lines[lines.length - 1] === "") lines.pop();
  const pre = h("pre", { id, class: "diff", tabindex: "0" });
  let files = 0;
  let added = 0;
  let removed = 0;
  const frag = document.createDocumentFragment();
  lines.forEach((line, i) => {
    let cls = "ctx";
    if (line.startsWith("diff --git") || line.startsWith("index ") || line.startsWith("new file") || line.startsWith("deleted file")) cls = "meta";
    else if (line.startsWith("+++") || line.startsWith("---")) cls = "file";
    else if (line.startsWith("@@")) cls = "hunk";
    else if (line.startsWith("+")) cls = "add";
    else if (line.startsWith("-")) cls = "del";
    if (line.startsWith("diff --git")) files++;
    if (cls === "add") added++;
    if (cls === "del") removed++;
    const start = line.startsWith("diff --git") && i > 0 ? " file-start" : "";
    if (i < MAX_LINES) frag.append(h("span", { class: `line ${cls}${start}` }, line + "\n"));
  });
  pre.append(frag);
  const stats = h(
    "p",
    { class: "diff-stats" },
    `${files} file${files === 1 ? "" : "s"} changed, `,
    h("span", { class: "add" }, `+${added}`),
    " ",
    h("span", { class: "del" }, `−${removed}`),
    lines.length > MAX_LINES ? ` (showing the first ${MAX_LINES} of ${lines.length} lines)` : "",
  );
  if (!lines.length) return h("div", { id, class: "diff empty" }, notice("The diff is empty."));
  return h("div", { class: "diff-wrap" }, stats, pre);
}

/**
 * The markdown `ccluster report` writes, as elements: headings, paragraphs, lists, tables, fenced
 * code, `<details>` with a `<summary>`, and inline code and bold. Built from text nodes only: the
 * report quotes task ids, paths and messages, which are untrusted.
 */
function markdownView(text) {
  const root = h("div", { class: "md", id: "report-body" });
  const stack = [root];
  const here = () => stack[stack.length - 1];
  const lines = text.split("\n");
  let para = [];
  const flush = () => {
    if (para.length) here().append(h("p", {}, ...inline(para.join(" "))));
    para = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let m;
    if (line.startsWith("```")) {
      flush();
      const code = [];
      while (++i < lines.length && !lines[i].startsWith("```")) code.push(lines[i]);
      here().append(h("pre", { class: "md-code" }, code.join("\n")));
    } else if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) {
      flush();
      here().append(h(`h${Math.min(6, m[1].length + 1)}`, {}, ...inline(m[2])));
    } else if ((m = /^<details><summary>(.*)<\/summary>\s*$/.exec(line))) {
      flush();
      const details = h("details", {}, h("summary", {}, ...inline(m[1])));
      here().append(details);
      stack.push(details);
    } else if (/^<\/details>\s*$/.test(line)) {
      flush();
      if (stack.length > 1) stack.pop();
    } else if (line.startsWith("|")) {
      flush();
      const rows = [];
      for (; i < lines.length && lines[i].startsWith("|"); i++) rows.push(cellsOf(lines[i]));
      i--;
      here().append(table(rows));
    } else if (/^[-*] /.test(line)) {
      flush();
      const list = h("ul", {});
      for (; i < lines.length && /^[-*] /.test(lines[i]); i++) list.append(h("li", {}, ...inline(lines[i].slice(2))));
      i--;
      here().append(list);
    } else if (!line.trim()) {
      flush();
    } else {
      para.push(line.trim());
    }
  }
  flush();
  return root;

  function cellsOf(row) {
    return row
      .trim()
      .replace(/^\|/, "")
      .replace(/\|$/, "")
      .split(/(?<!\\)\|/)
      .map((c) => c.trim().replace(/\\\|/g, "|"));
  }

  function table(rows) {
    const isRule = (r) => r.every((c) => /^:?-+:?$/.test(c));
    const align = rows.length > 1 && isRule(rows[1]) ? rows[1].map((c) => (c.endsWith(":") ? "right" : null)) : [];
    const head = rows.length > 1 && isRule(rows[1]) ? rows[0] : null;
    const bodyRows = head ? rows.slice(2) : rows;
    return h(
      "table",
      { class: "md-table" },
      head ? h("thead", {}, h("tr", {}, ...head.map((c, k) => h("th", { class: align[k] ? "num" : null }, ...inline(c))))) : null,
      h("tbody", {}, ...bodyRows.map((r) => h("tr", {}, ...r.map((c, k) => h("td", { class: align[k] ? "num" : null }, ...inline(c)))))),
    );
  }

  /** Inline code (backticks or `<code>`), bold, and plain text. */
  function inline(s) {
    const out = [];
    const re = /`([^`]+)`|<code>(.*?)<\/code>|\*\*(.+?)\*\*/g;
    let at = 0;
    let m;
    while ((m = re.exec(s))) {
      if (m.index > at) out.push(s.slice(at, m.index));
      if (m[1] !== undefined) out.push(h("code", {}, m[1]));
      else if (m[2] !== undefined) out.push(h("code", {}, m[2]));
      else out.push(h("strong", {}, ...inline(m[3])));
      at = re.lastIndex;
    }
    if (at < s.length) out.push(s.slice(at));
    return out;
  }
}


route();
