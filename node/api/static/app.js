// teammesh dashboard: plain JS, no build step. Live data comes from /v1/events
// (server-sent events, authenticated by the session cookie); writes send the
// X-Teammesh-Dashboard header the API requires of cookie-authenticated requests.
"use strict";

const MAX_TASK_ROWS = 200;
const tasks = new Map(); // id -> task JSON
let kindsShown = "";

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "title") node.title = v;
    else if (k === "width") node.style.width = v; // CSSOM: allowed by the page's CSP
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  }
  return node;
}

function short(id) {
  if (!id) return "";
  return id.length > 14 ? id.slice(0, 6) + "…" + id.slice(-6) : id;
}

function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fillDl(dl, rows) {
  dl.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function renderOverview(o) {
  const n = o.node;
  $("#team").textContent = n.team ? `team ${n.team.name} · ${n.team.members} members` : "no team";
  fillDl($("#node"), [
    ["peer id", el("span", { class: "mono", title: n.peer_id }, short(n.peer_id))],
    ["slots", `${n.free_slots} free of ${n.slots}`],
    ["peers", `${n.live_peers} live, ${n.connected_peers} connected`],
    ["reachable", n.reachable ? "yes (peers dialled in)" : "not yet"],
    ["", n.reachability_note],
    ["version", n.version],
    ["uptime", `${Math.round(n.uptime_s)} s`],
  ]);

  const peers = o.peers || [];
  $("#peer-count").textContent = `(${peers.length} live)`;
  $("#peers tbody").replaceChildren(...peers.map((p) => {
    const load = Math.round((p.load || 0) * 100);
    const reach = p.self ? "this node"
      : p.pull ? "pull mode (not dialable)"
      : p.connected ? (p.dialled_us ? "connected (dialled us)" : "connected") : "not connected";
    const health = p.self ? "–"
      : p.breaker === "open" ? "breaker open"
      : p.health == null ? "no tasks yet" : `${Math.round(p.health * 100)}%` +
        (p.rtt_ms != null ? ` · ${p.rtt_ms} ms` : "");
    return el("tr", { "data-peer": p.peer_id },
      el("td", { class: "id", title: p.peer_id }, short(p.peer_id) + (p.self ? " (you)" : "")),
      el("td", {}, `${p.free_slots} / ${p.slots}`),
      el("td", {}, el("span", { class: "bar", title: `${load}%` },
        el("span", { width: `${load}%` })), ` ${load}%`),
      el("td", {}, p.queue),
      el("td", {}, p.cores),
      el("td", {}, health),
      el("td", {}, reach),
      el("td", { title: (p.kinds || []).join(", ") }, (p.kinds || []).length),
      el("td", {}, p.version));
  }));

  const t = o.tasks || {};
  const c = t.counters || {};
  $("#counts").dataset.done = c.done ?? 0;
  $("#counts").dataset.cancelled = c.cancelled ?? 0;
  fillDl($("#counts"), [
    ["submitted", c.submitted ?? 0], ["done", c.done ?? 0], ["failed", c.failed ?? 0],
    ["cancelled", c.cancelled ?? 0], ["retries", c.retries ?? 0],
    ["cache hits", c.cache_hits ?? 0], ["waiting here", t.queued_here ?? 0],
  ]);
  const kinds = (t.kinds || []).join(",");
  if (kinds !== kindsShown) {
    kindsShown = kinds;
    const select = $("#kind");
    const current = select.value;
    select.replaceChildren(...(t.kinds || []).map((k) => el("option", { value: k }, k)));
    if (current && (t.kinds || []).includes(current)) select.value = current;
    else if ((t.kinds || []).includes("hash.sha256")) select.value = "hash.sha256";
  }

  const f = o.files || {};
  if (!f.enabled) {
    fillDl($("#files"), [["files", "not enabled on this node"]]);
  } else {
    const s = f.summary;
    fillDl($("#files"), [
      ["store", `${bytes(s.used_bytes)} of ${s.limit_bytes ? bytes(s.limit_bytes) : "no limit"}`],
      ["pinned files", s.pins],
      ["R2 mirror", s.mirror],
      ["mirror backlog", `${f.mirror_backlog} file(s) waiting`],
      ["mirrored", `${s.mirrored} uploaded, ${s.mirror_failures} failed attempts`],
      ["fetched", `local ${s.fetched_local}, peers ${s.fetched_peers}, ipfs ${s.fetched_ipfs}, r2 ${s.fetched_r2}`],
    ]);
    $("#pins").replaceChildren(...(f.pins || []).map((p) => el("li", { title: p.cid }, p.cid)));
  }

  const b = o.bridge || {};
  if (!b.configured) {
    fillDl($("#bridge"), [["bridge", "not configured (tasks stay in the mesh)"]]);
  } else {
    const h = b.health;
    fillDl($("#bridge"), [
      ["url", b.url],
      ["health", h ? (h.ok ? `ok · version ${h.version}` : "answering, not ok")
        : b.error ? el("span", { class: "error" }, b.error) : "checking…"],
      ["circuit breaker", b.breaker || "closed (not used yet)"],
      ["round trip", b.rtt_ms != null ? `${b.rtt_ms} ms (a busy member's queue is weighed against it)` : "–"],
      ["pull mode", b.pull ? "yes: this node takes work from the bridge" : "no"],
      ["checked", b.checked ? new Date(b.checked * 1000).toLocaleTimeString() : "–"],
    ]);
  }
}

function taskDetail(t) {
  if (t.state === "failed" || t.state === "cancelled") return el("span", { class: "error" }, t.error || "");
  if (t.state === "queued") return t.waiting_reason || "waiting to be placed";
  if (t.state === "running") return t.waiting_reason || `attempt ${t.attempts.length}`;
  if (t.state === "done") {
    let out = t.output;
    if (out && typeof out === "object") out = JSON.stringify(out);
    out = out == null ? "" : String(out);
    return el("span", { class: "mono", title: out }, out.length > 80 ? out.slice(0, 80) + "…" : out);
  }
  return "";
}

function where(t) {
  const running = (t.attempts || []).filter((a) => a.ended == null).map((a) => a.peer);
  if (t.state === "running" && running.length) return "on " + running.map(short).join(", ");
  if (t.executed_by && t.state !== "done") return "on " + t.executed_by.split(",").map(short).join(", ");
  if (t.executed_by) return "by " + t.executed_by.split(",").map(short).join(", ") + (t.cached ? " (cache)" : "");
  return t.where;
}

function renderTasks() {
  const rows = [...tasks.values()].sort((a, b) => (a.id < b.id ? 1 : -1)).slice(0, MAX_TASK_ROWS);
  $("#tasks tbody").replaceChildren(...rows.map((t) => {
    const tm = t.timings || {};
    const took = tm.finished && tm.submitted ? `${((tm.finished - tm.submitted) * 1000).toFixed(0)} ms` : "";
    return el("tr", { "data-task": t.id, "data-state": t.state },
      el("td", { class: "id", title: t.id }, short(t.id)),
      el("td", {}, t.kind),
      el("td", { class: "state-" + t.state }, t.state),
      el("td", {}, where(t)),
      el("td", {}, taskDetail(t)),
      el("td", {}, took),
      el("td", {}, t.state === "queued" || t.state === "running"
        ? el("button", { type: "button", class: "link cancel", "data-cancel": t.id }, "cancel")
        : ""));
  }));
}

async function cancelTask(id) {
  try {
    const t = await api("POST", `/v1/tasks/${encodeURIComponent(id)}/cancel`);
    tasks.set(t.id, t);
    renderTasks();
  } catch (err) {
    const result = $("#submit-result");
    result.textContent = `cancel ${id}: ${err.message}`;
    result.className = "error";
  }
}

function connect() {
  const live = $("#live");
  const source = new EventSource("/v1/events");
  source.addEventListener("open", () => { live.textContent = "live"; live.className = "pill on"; });
  source.addEventListener("error", () => {
    live.textContent = "reconnecting…"; live.className = "pill off";
  });
  source.addEventListener("overview", (e) => renderOverview(JSON.parse(e.data)));
  source.addEventListener("tasks", (e) => {
    for (const t of JSON.parse(e.data)) tasks.set(t.id, t);
    renderTasks();
  });
  source.addEventListener("task", (e) => {
    const t = JSON.parse(e.data);
    tasks.set(t.id, t);
    renderTasks();
  });
}

async function api(method, path, body) {
  const resp = await fetch(path, {
    method, credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-Teammesh-Dashboard": "1" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error((data.error && data.error.message) || `HTTP ${resp.status}`);
  return data;
}

function b64(text) {
  const bytesIn = new TextEncoder().encode(text);
  let bin = "";
  for (const b of bytesIn) bin += String.fromCharCode(b);
  return btoa(bin);
}

function setupForm() {
  $("#submit").addEventListener("submit", async (e) => {
    e.preventDefault();
    const result = $("#submit-result");
    let params;
    try {
      params = JSON.parse($("#params").value || "{}");
    } catch (err) {
      result.textContent = "params must be JSON: " + err.message;
      result.className = "error";
      return;
    }
    try {
      const t = await api("POST", "/v1/tasks", {
        kind: $("#kind").value, input_b64: b64($("#input").value), params,
        where: $("#where").value,
      });
      tasks.set(t.id, t);
      renderTasks();
      result.textContent = `submitted ${t.id}`;
      result.className = "muted";
      result.dataset.task = t.id;
    } catch (err) {
      result.textContent = err.message;
      result.className = "error";
    }
  });
  $("#tasks").addEventListener("click", (e) => {
    const id = e.target instanceof Element ? e.target.getAttribute("data-cancel") : null;
    if (id) cancelTask(id);
  });
  $("#logout").addEventListener("click", async () => {
    await api("POST", "/logout").catch(() => null);
    location.reload();
  });
}

setupForm();
connect();
