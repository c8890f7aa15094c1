// The xdp-lb dashboard: renders each update of /api/stream (one View a second) into the page,
// and sends changes as the same requests the CLI sends. Elements are created once per service and
// backend and then updated in place, so focus and a half-chosen scheduler survive updates.
"use strict";

const HEADER = { "content-type": "application/json", "x-xdp-lb-dashboard": "1" };
let current = null;
let updates = 0;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function fmt(v, digits) {
  if (v === null || v === undefined) return "–";
  return Number(v).toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 1 : digits });
}

// Sets a cell's text and its raw value (data-value), which the browser test compares.
function cell(td, value, text) {
  td.dataset.value = value === null || value === undefined ? "" : String(value);
  td.textContent = text === undefined ? fmt(value) : text;
}

async function post(path, body) {
  const headers = Object.assign({}, HEADER);
  const token = document.getElementById("token").value.trim();
  if (token) headers["authorization"] = "Bearer " + token;
  const r = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  let answer;
  try { answer = await r.json(); } catch (e) { answer = { ok: false, error: "HTTP " + r.status }; }
  return answer;
}

function say(id, answer, okText) {
  const p = document.getElementById(id);
  p.classList.toggle("error", !answer.ok);
  p.textContent = answer.ok ? okText : answer.error;
}

const COLUMNS = [
  ["health", "Health"], ["packets_per_s", "Packets/s"], ["new_flows_per_s", "New flows/s"], ["active_flows", "Active flows"],
  ["new_flow_share", "Share of new flows"], ["check_latency_us", "Check latency"], ["weight", "Weight"], ["drain", "Drain"],
];

function serviceTable(s) {
  const head = el("tr", {}, el("th", { scope: "col" }, "Backend"), ...COLUMNS.map(([k, t]) => el("th", { scope: "col", class: k === "health" || k === "drain" ? "" : "num" }, t)));
  const total = el("tr", { class: "total", "data-total": s.name }, el("td", {}, "all backends"));
  for (const [k] of COLUMNS) total.append(el("td", { class: "num", "data-field": k }));
  return el("table", { "data-service": s.name }, el("caption", {}), el("thead", {}, head), el("tbody", {}), el("tfoot", {}, total));
}

function backendRow(s, b) {
  const row = el("tr", { "data-backend": b.address });
  row.append(el("th", { scope: "row" }, b.address));
  for (const [k] of COLUMNS) {
    const td = el("td", { "data-field": k, class: k === "health" || k === "drain" ? "" : "num" });
    if (k === "drain") {
      const button = el("button", { type: "button", onclick: async () => {
        const drained = button.dataset.drained !== "true";
        button.disabled = true;
        say("change-result", await post("/api/drain", { service: s.name, backend: b.address, drained }),
          `backend ${b.address} ${drained ? "drained" : "undrained"}`);
        button.disabled = current && current.changes === "read-only";
      } });
      td.append(button);
    }
    row.append(td);
  }
  return row;
}

function renderServices(view) {
  const box = document.getElementById("services");
  const seen = new Set();
  for (const s of view.services) {
    seen.add(s.name);
    let table = box.querySelector(`table[data-service="${CSS.escape(s.name)}"]`);
    if (!table) { table = serviceTable(s); box.append(table); }
    const caption = table.querySelector("caption");
    caption.textContent = `${s.name} — ${s.vip} ${s.protocol}, ${s.mode}, ${s.scheduler}, ${s.state} — since start: ` +
      `${fmt(s.packets, 0)} packets, ${fmt(s.new_flows, 0)} flows`;
    caption.dataset.packets = String(s.packets);
    caption.dataset.newFlows = String(s.new_flows);
    const body = table.querySelector("tbody");
    const rows = new Set();
    for (const b of s.backends) {
      rows.add(b.address);
      let row = body.querySelector(`tr[data-backend="${CSS.escape(b.address)}"]`);
      if (!row) { row = backendRow(s, b); body.append(row); }
      const f = (k) => row.querySelector(`[data-field="${k}"]`);
      const health = b.drained ? "drained" : b.passive_down ? "down (passive)" : b.down && b.health !== "down" ? "down" : b.health;
      const badge = el("span", { class: "badge " + (b.down ? "down" : b.drained ? "drained" : b.health) }, health + (b.backup ? ", backup" : ""));
      f("health").replaceChildren(badge);
      f("health").dataset.value = b.health;
      cell(f("packets_per_s"), b.packets_per_s);
      cell(f("new_flows_per_s"), b.new_flows_per_s);
      cell(f("active_flows"), b.active_flows, fmt(b.active_flows, 0));
      const share = b.new_flow_share;
      f("new_flow_share").dataset.value = share === null ? "" : String(share);
      f("new_flow_share").replaceChildren(
        el("span", { class: "share", style: `width:${Math.round((share || 0) * 80)}px`, "aria-hidden": "true" }),
        " " + (share === null ? "–" : fmt(share * 100, 0) + " %"));
      cell(f("check_latency_us"), b.check_latency_us, b.check_latency_us === null ? "–" : fmt(b.check_latency_us / 1000, 2) + " ms");
      cell(f("weight"), b.weight, `${b.effective_weight}/${b.weight}`);
      const button = f("drain").querySelector("button");
      button.dataset.drained = String(b.drained);
      button.textContent = b.drained ? "Undrain" : "Drain";
      button.setAttribute("aria-label", `${b.drained ? "Undrain" : "Drain"} backend ${b.address} of ${s.name}`);
      button.disabled = view.changes === "read-only";
    }
    for (const row of body.querySelectorAll("tr[data-backend]")) if (!rows.has(row.dataset.backend)) row.remove();
    const t = (k) => table.querySelector(`tfoot [data-field="${k}"]`);
    cell(t("packets_per_s"), s.packets_per_s);
    cell(t("new_flows_per_s"), s.new_flows_per_s);
    cell(t("active_flows"), s.active_flows, fmt(s.active_flows, 0));
    cell(t("health"), s.state, s.state);
  }
  for (const table of box.querySelectorAll("table[data-service]")) if (!seen.has(table.dataset.service)) table.remove();
}

function renderReasons(view) {
  const body = document.querySelector("#reasons tbody");
  body.replaceChildren(...view.reasons.filter((r) => r.packets > 0).map((r) => {
    const row = el("tr", { "data-reason": r.reason }, el("th", { scope: "row" }, r.reason), el("td", { class: "num", "data-field": "packets" }), el("td", { class: "num", "data-field": "per_s" }));
    cell(row.children[1], r.packets, fmt(r.packets, 0));
    cell(row.children[2], r.per_s);
    return row;
  }));
}

function renderSchedulers(view) {
  const box = document.getElementById("schedulers");
  for (const s of view.services) {
    let div = box.querySelector(`div[data-service="${CSS.escape(s.name)}"]`);
    if (!div) {
      const id = "scheduler-" + s.name;
      const select = el("select", { id }, ...view.schedulers.map((n) => el("option", { value: n }, n)));
      select.value = s.scheduler;
      const apply = el("button", { type: "button", "aria-label": `Apply the scheduler to ${s.name}`, onclick: async () => {
        apply.disabled = true;
        say("change-result", await post("/api/scheduler", { service: s.name, scheduler: select.value }),
          `service ${s.name} now uses ${select.value}`);
        apply.disabled = current && current.changes === "read-only";
      } }, "Apply");
      div = el("div", { class: "scheduler", "data-service": s.name },
        el("label", { for: id }, `Scheduler of ${s.name}`), select, apply, el("span", { "data-field": "scheduler" }));
      box.append(div);
    }
    div.querySelector('[data-field="scheduler"]').textContent = "running: " + s.scheduler;
    div.querySelector("button").disabled = view.changes === "read-only";
  }
  for (const div of box.querySelectorAll("div[data-service]")) if (!view.services.some((s) => s.name === div.dataset.service)) div.remove();
}

function renderEvents(view) {
  const list = document.getElementById("events");
  list.replaceChildren(...view.events.map((e) => {
    const when = new Date(e.unix_ms);
    return el("li", { "data-kind": e.kind, "data-service": e.service || "", "data-backend": e.backend || "", "data-seq": String(e.seq) },
      el("time", { datetime: when.toISOString() }, when.toLocaleTimeString("en-GB", { hour12: false }) + "." + String(when.getMilliseconds()).padStart(3, "0")),
      el("span", { class: "kind " + e.kind }, e.kind),
      [e.service, e.backend].filter(Boolean).join(" ") + ": " + e.message);
  }));
  if (!view.events.length) list.append(el("li", {}, "no transitions yet"));
}

function renderDestinations(view) {
  const select = document.getElementById("explain-destination");
  const want = view.services.map((s) => s.vip + " " + s.protocol).join(",");
  if (select.dataset.services === want) return;
  select.dataset.services = want;
  const chosen = select.value;
  select.replaceChildren(...view.services.map((s) => el("option", { value: s.vip, "data-protocol": s.protocol }, `${s.name} (${s.vip})`)));
  if (chosen) select.value = chosen;
}

// Newest sampled requests shown, over all replicas.
const TRACES_SHOWN = 12;

function micros(us) {
  return us >= 1000 ? fmt(us / 1000, 2) + " ms" : fmt(us, 1) + " µs";
}

// The recent requests offered in "A request's path": newest first, over all replicas, each
// keyed by its replica's backend address and sequence number. The one picked is kept even after
// it leaves the gateways' buffers, so its explanation stays on screen.
const RECENT_OFFERED = 20;
let picked = null;

function traceKey(t) {
  return t.backend + "#" + t.seq;
}

function stageSpans(stages) {
  return stages.map((s) => el("span", { class: "stage " + s.verdict, "data-stage": s.stage, "data-verdict": s.verdict },
    `${s.stage}: ${s.verdict}${s.reason ? " (" + s.reason + ")" : ""} ${micros(s.us)}`));
}

function renderRecent(traces) {
  const select = document.getElementById("explain-recent");
  // Only requests whose client is known can be explained at L4 (older replicas do not say).
  const offered = traces.filter((t) => t.client).slice(0, RECENT_OFFERED);
  const want = offered.map(traceKey).join(",");
  if (select.dataset.offered === want) return;
  select.dataset.offered = want;
  // The list changes every second: rebuilding it must not take away what the user chose.
  const options = offered.map((t) => {
    const o = el("option", { value: traceKey(t) }, `${t.method} ${t.host}${t.path} → ${t.status} from ${t.client} via ${t.backend}`);
    o.trace = t;
    return o;
  });
  if (picked && !offered.some((t) => traceKey(t) === traceKey(picked))) {
    const o = el("option", { value: traceKey(picked) }, `${picked.method} ${picked.host}${picked.path} → ${picked.status} from ${picked.client} via ${picked.backend}`);
    o.trace = picked;
    options.unshift(o);
  }
  const first = el("option", { value: "" }, offered.length ? `pick one of ${offered.length} sampled requests` : "none sampled yet");
  select.replaceChildren(first, ...options);
  select.value = picked ? traceKey(picked) : "";
}

// A picked request: its 5-tuple and HTTP request go into the form, its recorded pipeline is
// shown, and the form is explained (L4 by the daemon's explain, L7 by the replica's router).
function pickRecent(t) {
  picked = t;
  const service = current && current.services.find((s) => s.backends.some((b) => b.address === t.backend));
  document.getElementById("explain-source").value = t.client;
  if (service) {
    document.getElementById("explain-destination").value = service.vip;
    document.getElementById("explain-protocol").value = service.protocol;
  }
  const method = document.getElementById("explain-method");
  if (![...method.options].some((o) => o.value === t.method)) method.append(el("option", { value: t.method }, t.method));
  method.value = t.method;
  document.getElementById("explain-host").value = t.host;
  document.getElementById("explain-path").value = t.path;
  const p = document.getElementById("explain-trace");
  p.hidden = false;
  p.dataset.backend = t.backend;
  p.dataset.seq = String(t.seq);
  p.dataset.route = t.route || "";
  p.dataset.status = String(t.status);
  const when = new Date(t.unix_ms).toLocaleTimeString("en-GB", { hour12: false });
  p.replaceChildren(
    `Recorded by replica ${t.backend} (${t.replica}) at ${when}: ${t.method} ${t.host}${t.path} from ${t.client} → ` +
    `${t.route ? "route " + t.route + " → pool " + (t.pool || "–") : "no route"}, ${t.status}, ${micros(t.total_us)}. Its pipeline: `,
    ...stageSpans(t.stages));
  document.getElementById("explain-form").requestSubmit();
}

function renderGateways(view) {
  const gateways = view.gateways || [];
  document.body.dataset.gateways = String(gateways.length);
  if (!gateways.length) return;
  document.getElementById("pipeline-absent").hidden = true;
  const l7 = document.getElementById("explain-l7");
  if (l7.dataset.gateway === "none") {
    l7.dataset.gateway = "connected";
    l7.classList.remove("absent");
    l7.textContent = "Explain a request: its replica's router answers with the route and pool.";
  }
  document.getElementById("gateways").replaceChildren(...gateways.map((g) => el("li",
    { "data-backend": g.backend, "data-state": g.unreachable ? "unreachable" : "ok", class: g.unreachable ? "down" : "" },
    `replica ${g.backend} (admin ${g.admin}): ` + (g.unreachable ? "unreachable: " + g.unreachable
      : `sampling ${fmt((g.sampling || 0) * 100, 2)} % of requests`))));
  const all = gateways.flatMap((g) => g.traces.map((t) => Object.assign({ backend: g.backend }, t)))
    .sort((a, b) => b.unix_ms - a.unix_ms || b.seq - a.seq);
  renderRecent(all);
  const traces = all.slice(0, TRACES_SHOWN);
  const table = document.getElementById("traces");
  table.hidden = false;
  table.querySelector("tbody").replaceChildren(...traces.map((t) => {
    const stages = el("td", { class: "stages" }, ...stageSpans(t.stages));
    return el("tr", { "data-seq": String(t.seq), "data-backend": t.backend, "data-route": t.route || "", "data-status": String(t.status) },
      el("td", { class: "request" }, `${t.method} ${t.host}${t.path}`),
      el("td", { class: "num" }, String(t.status)),
      el("td", {}, t.route ? `${t.route} → ${t.pool || "–"}` : "no route"),
      stages,
      el("td", { class: "num" }, micros(t.total_us)));
  }));
  if (!traces.length) table.querySelector("tbody").append(el("tr", {}, el("td", { colspan: "5" }, "no sampled request yet")));
}

async function explainL7(backend) {
  const p = document.getElementById("explain-l7");
  if (!current || !(current.gateways || []).length) return;
  const method = document.getElementById("explain-method").value;
  const host = document.getElementById("explain-host").value.trim();
  const path = document.getElementById("explain-path").value.trim() || "/";
  delete p.dataset.route;
  if (!backend) { p.textContent = "No backend was chosen, so no gateway decides."; return; }
  const answer = await post("/api/route", { backend, method, host, path });
  p.classList.toggle("error", !answer.ok);
  if (!answer.ok) { p.textContent = answer.error; p.dataset.route = ""; return; }
  const r = answer.data;
  const request = `${method} ${host}${path}`;
  p.dataset.route = r.route || "";
  p.dataset.outcome = r.outcome;
  if (r.outcome === "found") {
    const ups = r.upstreams.map((u) => `${u.address} ${u.healthy ? "up" : "down"}`).join(", ");
    p.textContent = `${backend}'s gateway: ${request} → route ${r.route} → pool ${r.pool || "–"} (${ups || "no upstream"}), config generation ${r.version}`;
  } else if (r.outcome === "method_not_allowed") {
    p.textContent = `${backend}'s gateway: ${request} → 405, the matching route allows ${r.allowed.join(", ")}`;
  } else {
    p.textContent = `${backend}'s gateway: ${request} → no route (404)`;
  }
}

function render(view) {
  current = view;
  updates += 1;
  document.body.dataset.updates = String(updates);
  document.body.dataset.changes = view.changes;
  document.getElementById("connection").textContent = "live, updated " + new Date(view.unix_ms).toLocaleTimeString("en-GB", { hour12: false });
  document.getElementById("config").textContent = "config: " + view.config_path + (view.config_rejected_edit ? " (EDITED ON DISK, and the reload REJECTED it: fix or revert the edit; drain, undrain and weight still work): " + view.config_rejected_edit : view.config_changed_on_disk ? " (EDITED ON DISK: reload first)" : "");
  document.getElementById("token-box").hidden = view.changes !== "need-token";
  renderServices(view);
  renderReasons(view);
  renderSchedulers(view);
  renderEvents(view);
  renderDestinations(view);
  renderGateways(view);
}

function connect() {
  const source = new EventSource("/api/stream");
  source.onmessage = (m) => render(JSON.parse(m.data));
  source.addEventListener("failure", (m) => { document.getElementById("connection").textContent = "daemon unavailable: " + JSON.parse(m.data); });
  source.onerror = () => { document.getElementById("connection").textContent = "disconnected, retrying…"; };
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("explain-pick").addEventListener("click", () => {
    const octet = () => 1 + Math.floor(Math.random() * 254);
    document.getElementById("explain-source").value = `198.51.100.${octet()}:${1024 + Math.floor(Math.random() * 64000)}`;
  });
  document.getElementById("explain-recent").addEventListener("change", (e) => {
    const option = e.target.selectedOptions[0];
    if (option && option.trace) pickRecent(option.trace);
  });
  document.getElementById("explain-destination").addEventListener("change", (e) => {
    const option = e.target.selectedOptions[0];
    if (option) document.getElementById("explain-protocol").value = option.dataset.protocol;
  });
  document.getElementById("explain-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const p = document.getElementById("explain-l4");
    const answer = await post("/api/explain", {
      source: document.getElementById("explain-source").value.trim(),
      destination: document.getElementById("explain-destination").value,
      protocol: document.getElementById("explain-protocol").value,
    });
    p.classList.toggle("error", !answer.ok);
    if (!answer.ok) { p.textContent = answer.error; delete p.dataset.backend; return; }
    const x = answer.data;
    p.dataset.backend = x.backend || "";
    p.textContent = `${x.service} → ${x.backend || "no backend"} (${x.reason}${x.slot !== undefined ? `, slot ${x.slot} of ${x.ring_size}` : ""}): ${x.explanation}`;
    // A picked request was really served by a replica: say whether the L4 decision names it
    // (it may not after a scheduler change or a failover, and the page says so).
    const source = document.getElementById("explain-source").value.trim();
    const mine = picked && picked.client === source;
    p.classList.toggle("disagrees", Boolean(mine && x.backend !== picked.backend));
    if (mine) {
      p.dataset.agrees = String(x.backend === picked.backend);
      p.append(x.backend === picked.backend ? ` — the replica that served this request.`
        : ` — but ${picked.backend} served this request (the ring or the backends' state changed since).`);
    } else {
      delete p.dataset.agrees;
    }
    await explainL7(x.backend);
  });
  connect();
});
