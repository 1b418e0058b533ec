// gpumgr status page: polls /v1/status and draws it. No framework, no build step.
// Every string from the broker is data: it only ever reaches the page as a text
// node or an attribute value, never as markup.
"use strict";

const POLL_MS = 2000;
const TIMEOUT_MS = 5000;
const EVENTS_SHOWN = 25;
const STATUS_URL = new URL("../v1/status", document.baseURI).href;
const REQUESTS_URL = new URL("../v1/requests", document.baseURI).href;
const PALETTE_SIZE = 8;
const BAD_EVENTS = new Set(["eviction_failed", "refusal", "render_lost", "process_crash",
                            "process_start_failed", "oom_retry"]);
const WARN_EVENTS = new Set(["eviction", "render_interrupted"]);
const GOOD_EVENTS = new Set(["load"]);

let lastGood = null;        // {doc, at}: the last document drawn
let updates = 0;            // successful draws (tests wait on this)
const openDetails = new Set();  // <details> the reader opened survive redraws

// ---- small helpers ---------------------------------------------------------

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") el.className = value;
    else if (key === "data") for (const [k, v] of Object.entries(value)) el.dataset[k] = String(v);
    else if (key === "style") Object.assign(el.style, value);  // CSSOM: allowed by the CSP
    else el.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));  // strings become text nodes
  }
  return el;
}

const obj = (v) => (v && typeof v === "object" && !Array.isArray(v) ? v : {});
const arr = (v) => (Array.isArray(v) ? v : []);
const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

function mib(v) {
  const n = num(v);
  if (n === null) return "–";
  return n >= 10240 ? `${(n / 1024).toFixed(1)} GiB` : `${Math.round(n).toLocaleString("en")} MiB`;
}

function duration(seconds) {
  const s = num(seconds);
  if (s === null) return "–";
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  const m = Math.floor(s / 60), hrs = Math.floor(m / 60), days = Math.floor(hrs / 24);
  if (days) return `${days} d ${hrs % 24} h`;
  if (hrs) return `${hrs} h ${m % 60} min`;
  return `${m} min ${Math.floor(s % 60)} s`;
}

// The broker's clock, estimated from its last GPU sample, so that "12 s ago"
// does not depend on the reader's clock being right.
function serverNow(doc) {
  const gpu = obj(doc.gpu);
  const sampled = Date.parse(gpu.sampled_at);
  const age = num(gpu.age_ms);
  if (Number.isFinite(sampled) && age !== null) return { now: sampled + age };
  return { now: Date.now() };
}

function ago(iso, clock) {
  const t = Date.parse(iso);
  if (!Number.isFinite(t)) return "never";
  const s = Math.max(0, (clock.now - t) / 1000);
  return s < 1 ? "just now" : `${duration(s)} ago`;
}

function clockTime(iso) {
  const t = Date.parse(iso);
  if (!Number.isFinite(t)) return "–";
  return new Date(t).toLocaleTimeString("en-GB", { hour12: false });
}

// Colours follow the consumer's place in the sorted list, so they stay put.
function colourIndex(names) {
  const sorted = [...names].sort();
  return (name) => sorted.indexOf(name) % PALETTE_SIZE;
}

function pill(text, kind) {
  return h("span", { class: `pill ${kind || ""}` }, text);
}

function details(key, summary, lines) {
  const el = h("details", { data: { key } }, h("summary", null, summary),
               h("pre", null, lines.join("\n")));
  if (openDetails.has(key)) el.open = true;
  el.addEventListener("toggle", () => (el.open ? openDetails.add(key) : openDetails.delete(key)));
  return el;
}

// ---- sections --------------------------------------------------------------

function drawHeader(doc) {
  const broker = obj(doc.broker);
  document.getElementById("version").textContent = broker.version ? `v${broker.version}` : "";
  const mode = broker.mode || obj(doc.scheduler).mode;
  const modeEl = document.getElementById("mode");
  modeEl.textContent = mode ? `${mode} · up ${duration(broker.uptime_s)}` : "";
  modeEl.hidden = !mode;
  const reload = document.getElementById("reload-error");
  reload.hidden = !broker.last_reload_error;
  reload.textContent = broker.last_reload_error
    ? `The last config reload failed; still running the previous config: ${broker.last_reload_error}` : "";
  // The box as a load balancer sees it (absent from an older broker's status).
  const balancer = obj(broker.balancer);
  const phaseEl = document.getElementById("phase");
  phaseEl.hidden = !balancer.phase;
  phaseEl.textContent = balancer.phase ? `${balancer.box ? `${balancer.box} · ` : ""}${balancer.phase}` : "";
  phaseEl.className = `pill ${{ serving: "good", leaving: "warn", draining: "bad" }[balancer.phase] || ""}`;
  phaseEl.dataset.phase = balancer.phase || "";
  document.getElementById("config-loaded").textContent = broker.config_loaded_at
    ? `Config loaded ${clockTime(broker.config_loaded_at)}.` : "";
}

function vramBar({ label, total, used, segments, headroom }) {
  const pct = (v) => `${Math.max(0, Math.min(100, (100 * v) / total))}%`;
  const attributed = segments.reduce((sum, s) => sum + s.mib, 0);
  const other = Math.max(0, used - attributed);
  const bar = h("div", { class: "bar", role: "img",
                         "aria-label": `${label}: ${mib(used)} of ${mib(total)} used` });
  for (const s of segments) {
    bar.append(h("div", { class: `seg c${s.colour}`, title: `${s.name}: ${mib(s.mib)}`,
                          data: { consumer: s.name, mib: s.mib }, style: { width: pct(s.mib) } }));
  }
  if (other > 0) {
    bar.append(h("div", { class: "seg other", title: `not attributed to a consumer: ${mib(other)}`,
                          data: { other: "", mib: other }, style: { width: pct(other) } }));
  }
  if (headroom !== null && headroom > 0 && headroom < total) {
    bar.append(h("div", { class: "headroom", title: `headroom kept free: ${mib(headroom)}`,
                          style: { left: pct(total - headroom) } }));
  }
  const free = Math.max(0, total - used);
  return h("div", { class: "gpu" },
    h("div", { class: "gpu-head" },
      h("span", { class: "gpu-name" }, label),
      h("span", { class: "gpu-used" }, h("strong", null, mib(used)), ` of ${mib(total)}`,
        h("span", { class: "muted" }, ` · ${mib(free)} free`))),
    bar);
}

function legend(segments, other, headroom) {
  const items = segments.map((s) =>
    h("li", null, h("span", { class: `swatch c${s.colour}` }), s.name, h("span", { class: "muted" }, mib(s.mib))));
  if (other > 0) {
    items.push(h("li", null, h("span", { class: "swatch other" }), "other",
                 h("span", { class: "muted" }, mib(other))));
  }
  if (headroom !== null) {
    items.push(h("li", null, h("span", { class: "swatch headroom-swatch" }), "headroom",
                 h("span", { class: "muted" }, mib(headroom))));
  }
  return h("ul", { class: "legend" }, items);
}

// The consumers that live on one card (a consumer on several under each).
function cardConsumers(index, consumers, colour) {
  const names = Object.entries(consumers).filter(([, c]) => arr(obj(c).gpu).includes(index))
    .map(([n]) => n);
  return h("ul", { class: "legend card-consumers", data: { card: index ?? "?" } },
    names.length ? names.map((n) => h("li", { data: { consumer: n } },
                                      h("span", { class: `swatch c${colour(n)}` }), n))
      : h("li", { class: "muted" }, "no consumer lives here"));
}

function drawGpus(doc, colour) {
  const gpu = obj(doc.gpu);
  const consumers = obj(doc.consumers);
  const headroom = num(gpu.headroom_mib);
  const segments = Object.entries(consumers)
    .map(([name, c]) => ({ name, mib: num(obj(c).gpu_resident_mib) || 0, loaded: obj(c).loaded }))
    .filter((s) => s.loaded !== false && s.mib > 0)
    .map((s) => ({ ...s, colour: colour(s.name) }))
    .sort((a, b) => b.mib - a.mib);
  const gpus = arr(gpu.gpus).filter((g) => num(obj(g).memory_total_mib));
  const out = [];
  if (gpu.available === false || gpus.length === 0) {
    out.push(h("p", { class: "notice" }, "No GPU sample",
                gpu.error ? `: ${gpu.error}` : "", "."));
    if (segments.length) out.push(legend(segments, 0, headroom));
    return out;
  }
  // Resident sizes are not per GPU: split one GPU by consumer, or all of them together.
  const used = gpus.reduce((sum, g) => sum + (num(g.memory_used_mib) || 0), 0);
  const total = gpus.reduce((sum, g) => sum + num(g.memory_total_mib), 0);
  for (const g of gpus) {
    const name = `GPU ${g.index ?? "?"}${g.name ? ` · ${g.name}` : ""}`;
    const facts = [num(g.utilization_pct) !== null ? `${g.utilization_pct}% busy` : null,
                   num(g.temperature_c) !== null ? `${g.temperature_c} °C` : null].filter(Boolean);
    out.push(vramBar({ label: name, total: num(g.memory_total_mib), used: num(g.memory_used_mib) || 0,
                       segments: gpus.length === 1 ? segments : [],
                       headroom: gpus.length === 1 ? headroom : null }));
    if (facts.length) out.push(h("p", { class: "gpu-facts muted" }, facts.join(" · ")));
    if (gpus.length > 1) out.push(cardConsumers(g.index, consumers, colour));
  }
  const unplaced = Object.entries(consumers).filter(([, c]) => obj(c).gpu_auto && !arr(obj(c).gpu).length);
  if (gpus.length > 1 && unplaced.length) {
    out.push(h("p", { class: "card-unplaced small muted" }, "not placed yet (gpu: auto): ",
                unplaced.map(([n]) => n).join(", ")));
  }
  if (gpus.length > 1) {
    out.push(vramBar({ label: "All GPUs", total, used, segments, headroom: null }));
  }
  const attributed = segments.reduce((sum, s) => sum + s.mib, 0);
  out.push(legend(segments, Math.max(0, used - attributed), headroom));
  const procs = arr(gpu.processes).map(obj).sort((a, b) => (num(b.used_mib) || 0) - (num(a.used_mib) || 0));
  if (procs.length) {
    out.push(h("h3", null, "GPU processes"), h("table", { class: "procs" }, h("tbody", null, procs.map((p) =>
      h("tr", null,
        h("td", { class: "muted small" }, p.pid ?? "–"),
        h("td", { class: "proc-name", title: p.name ?? "" }, String(p.name ?? "?").split("/").pop()),
        h("td", { class: "num" }, mib(p.used_mib)))))));
  }
  const age = num(gpu.age_ms);
  if (age !== null && age > 10000) out.push(h("p", { class: "notice" }, `GPU sample is ${duration(age / 1000)} old.`));
  return out;
}

function drawScheduler(doc, clock) {
  const s = obj(doc.scheduler);
  const byKind = Object.entries(obj(s.queued_by_kind)).filter(([, n]) => num(n));
  const holders = arr(s.holders).map(obj);
  const stat = (label, value, id) => h("div", { class: "stat", id },
    h("span", { class: "stat-value" }, value ?? "–"), h("span", { class: "stat-label" }, label));
  const out = [h("div", { class: "stats" },
    stat("queued", num(s.queue_depth) ?? "–", "queue-depth"),
    stat("running", num(s.in_flight) ?? "–", "in-flight"),
    stat("jobs", num(s.total_jobs) ?? "–"),
    stat("rejected", num(s.rejected) ?? "–"))];
  out.push(h("div", { class: "kinds", id: "queue-by-kind" },
    byKind.length ? byKind.map(([kind, n]) => h("span", { class: "chip", data: { kind } }, `${kind} `, h("strong", null, n)))
                  : h("span", { class: "muted" }, "queue empty"),
    s.oldest_queued ? h("span", { class: "muted" }, ` · oldest waiting ${ago(s.oldest_queued, clock).replace(" ago", "")}`) : null));
  let holding;
  if (holders.length) {
    holding = h("ul", { class: "holders", id: "holders" }, holders.map((x) =>
      h("li", { data: { consumer: x.consumer ?? "" } },
        h("span", { class: "dot busy" }), h("strong", null, x.consumer ?? "?"),
        x.kind ? h("span", { class: "muted" }, ` ${x.kind}`) : null,
        ` for ${duration(num(x.held_ms) === null ? null : x.held_ms / 1000)}`,
        x.render ? h("span", { class: "muted" }, ` · render ${x.render}`) : null,
        x.state === "draining after the client left"
          ? h("span", { class: "muted" }, " · draining after the client left") : null)));
  } else if ("holders" in s || num(s.in_flight) === 0) {
    holding = h("p", { class: "muted", id: "holders" }, "The GPU is free.");
  } else {
    // A broker without `holders`: the consumers with active jobs say as much.
    const busy = Object.entries(obj(doc.consumers)).filter(([, c]) => num(obj(c).active));
    holding = busy.length
      ? h("ul", { class: "holders", id: "holders" }, busy.map(([name, c]) =>
          h("li", { data: { consumer: name } }, h("span", { class: "dot busy" }),
            h("strong", null, name), h("span", { class: "muted" }, ` ${c.active} active`))))
      : h("p", { class: "muted", id: "holders" }, `${s.in_flight} job(s) hold the GPU.`);
  }
  out.push(h("h3", null, "Holding the GPU"), holding);
  // capacity auto: why each waiting job waits (memory, exclusivity, a load in progress...).
  const waiting = arr(obj(s.budget).waiting).map(obj);
  if (waiting.length) {
    out.push(h("h3", null, "Waiting"), h("ul", { class: "holders", id: "waiting" }, waiting.map((w) =>
      h("li", { data: { consumer: w.consumer ?? "" } }, h("strong", null, w.consumer ?? "?"),
        w.kind ? h("span", { class: "muted" }, ` ${w.kind}`) : null,
        ` · ${w.reason ?? "not looked at yet"}`,
        w.detail ? h("span", { class: "muted" }, ` (${w.detail})`) : null))));
  }
  const line = (label, value) => h("div", null, h("dt", null, label), h("dd", null, value));
  out.push(h("dl", { class: "counters" },
    line("evictions", s.evictions ?? "–"),
    line("failed unloads", s.eviction_failures ?? "–"),
    line("OOM retries", s.oom_retries ?? "–"),
    line("last wait", num(s.last_wait_ms) === null ? "–" : duration(s.last_wait_ms / 1000)),
    line("last run", num(s.last_run_ms) === null ? "–" : duration(s.last_run_ms / 1000)),
    line("capacity", s.capacity ?? "–")));
  return out;
}

const HEALTH_KIND = { ok: "good", down: "bad", starting: "info", stopped: "idle", unknown: "idle" };
const PROCESS_KIND = { running: "good", starting: "info", stopping: "info", stopped: "idle", failed: "bad" };

function processCell(name, p) {
  if (!p || typeof p !== "object") return h("span", { class: "muted" }, "–");
  const bits = [pill(p.state || "?", PROCESS_KIND[p.state] || "idle")];
  const facts = [];
  if (p.pid !== undefined && p.pid !== null && ["starting", "running", "stopping"].includes(p.state)) facts.push(`pid ${p.pid}`);
  if (p.exit_code !== undefined && p.exit_code !== null) facts.push(`exit ${p.exit_code}`);
  if (num(p.restarts)) facts.push(`${p.restarts} restart${p.restarts === 1 ? "" : "s"}`);
  if (facts.length) bits.push(h("span", { class: "muted small" }, ` ${facts.join(" · ")}`));
  const stderr = arr(p.last_stderr).map(String);
  if (stderr.length) bits.push(details(`stderr:${name}`, "stderr", stderr));
  return bits;
}

function drawConsumers(doc, colour, clock) {
  const rows = Object.entries(obj(doc.consumers)).map(([name, raw]) => {
    const c = obj(raw);
    const health = c.health || "unknown";
    const loaded = c.loaded === true ? "yes" : c.loaded === false ? "no" : "unknown";
    const renders = arr(c.renders).map(obj);
    // A cell with nothing to say is marked, so narrow screens can leave it out.
    const td = (label, ...content) => {
      const numeric = ["Active", "Requests", "Resident"].includes(label);
      const cell = h("td", { "data-label": label, class: numeric ? "num" : null }, ...content);
      if (cell.textContent === "–") cell.classList.add("empty");
      return cell;
    };
    const errors = num(c.errors);
    return h("tr", { data: { consumer: name, health, loaded, pin: c.pin === true ? "yes" : "no" } },
      td("Consumer", h("span", { class: `swatch c${colour(name)}` }), h("strong", null, name),
         c.url ? h("div", { class: "muted small url" }, c.url) : null),
      td("Driver", c.driver ? c.driver : h("span", { class: "muted" }, "–")),
      td("Health", pill(health, HEALTH_KIND[health] || "idle"),
         c.last_error && health !== "ok" ? h("div", { class: "error small" }, c.last_error) : null),
      td("Loaded", pill(loaded, loaded === "yes" ? "good" : "idle"),
         c.pin === true ? pill("pinned", "info pin") : null),
      td("Process", processCell(name, c.process)),
      td("Active", c.active ?? "–"),
      td("Requests", c.total_requests ?? "–",
        errors ? h("div", { class: "error small" }, `${errors} failed`) : null),
      td("Resident", c.loaded === false || !num(c.gpu_resident_mib)
        ? h("span", { class: "muted" }, "–") : mib(c.gpu_resident_mib)),
      td("Last used", c.last_used ? ago(c.last_used, clock) : h("span", { class: "muted" }, "never")),
      td("Render", renders.length
        ? h("ul", { class: "renders" }, renders.map((r) =>
            h("li", { title: r.prompt_id ?? "" }, h("code", null, String(r.prompt_id ?? "?").slice(0, 12)),
              ` ${duration(r.held_s)}`,
              r.state && r.state !== "running"
                ? h("span", { class: r.state === "stuck" ? "error small" : "small" }, ` ${r.state}`)
                : null)))
        : h("span", { class: "muted" }, "–")));
  });
  const body = document.querySelector("#consumers tbody");
  body.replaceChildren(...(rows.length ? rows
    : [h("tr", null, h("td", { colspan: 10, class: "muted" }, "No consumers configured."))]));
}

function eventKind(name) {
  if (BAD_EVENTS.has(name)) return "bad";
  if (WARN_EVENTS.has(name)) return "warn";
  if (GOOD_EVENTS.has(name)) return "good";
  return "idle";
}

function drawEvents(doc) {
  const events = arr(obj(doc.scheduler).recent_events).map(obj).slice(-EVENTS_SHOWN).reverse();
  const list = document.getElementById("events");
  if (!events.length) {
    list.replaceChildren(h("li", { class: "muted empty" }, "Nothing has happened yet."));
    return;
  }
  list.replaceChildren(...events.map((e) => h("li", { data: { event: e.event ?? "" } },
    h("time", { datetime: e.at ?? "" }, clockTime(e.at)),
    pill(String(e.event ?? "?").replace(/_/g, " "), eventKind(e.event)),
    h("span", { class: "ev-body" },
      e.consumer ? h("strong", null, e.consumer) : null,
      e.reason ? h("span", null, ` ${e.reason}`) : null,
      num(e.mib) ? h("span", { class: "muted" }, ` ${mib(e.mib)}`) : null,
      e.detail !== undefined && e.detail !== null && e.detail !== ""
        ? h("span", { class: "detail" }, typeof e.detail === "string" ? e.detail : JSON.stringify(e.detail)) : null))));
}

// ---- requests: the queue with positions, and cancel ------------------------

// The admin token stays in this page's memory only; with none, the broker
// decides (a loopback client may cancel when no admin_token is set).
function adminHeaders() {
  const token = document.getElementById("admin-token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function cancelRequest(id, button) {
  button.disabled = true;
  const note = document.getElementById("requests-note");
  try {
    const response = await fetch(`${REQUESTS_URL}/${encodeURIComponent(id)}`,
                                 { method: "DELETE", cache: "no-store", headers: adminHeaders() });
    let why = `HTTP ${response.status}`;
    try { why = JSON.parse(await response.text()).error?.message || why; } catch (_) { /* not JSON */ }
    note.textContent = response.ok ? `Cancelled ${id}.` : `Cancelling ${id} failed: ${why}`;
    note.dataset.outcome = response.ok ? "ok" : "refused";
  } catch (e) {
    note.textContent = `Cancelling ${id} failed: ${e.message || e}`;
    note.dataset.outcome = "failed";
  }
}

function requestRow(r) {
  const button = h("button", { type: "button", class: "cancel", data: { id: r.id ?? "" } }, "cancel");
  button.addEventListener("click", () => cancelRequest(String(r.id), button));
  const where = r.state === "queued" ? `#${r.position ?? "?"}` : String(r.state ?? "?");
  return h("li", { data: { id: r.id ?? "", state: r.state ?? "", position: r.position ?? "" } },
    h("span", { class: "pos" }, where), " ",
    h("code", { title: r.id ?? "" }, String(r.id ?? "?").slice(0, 16)), " ",
    h("strong", null, r.consumer ?? "?"), r.kind ? h("span", { class: "muted" }, ` ${r.kind}`) : null,
    r.cancel_requested ? h("span", { class: "muted small" }, " · cancelling") : null, " ",
    r.cancel_requested ? null : button);
}

function drawRequests(doc) {
  const queue = arr(obj(doc).queue).map(obj);
  const running = arr(obj(doc).running).map(obj);
  const list = document.getElementById("requests");
  const rows = [...queue, ...running].map(requestRow);
  list.replaceChildren(...(rows.length ? rows : [h("li", { class: "muted empty" }, "No requests.")]));
}

async function fetchRequests() {
  try {
    const response = await fetch(REQUESTS_URL, { cache: "no-store", headers: { Accept: "application/json" } });
    if (response.ok) drawRequests(JSON.parse(await response.text()));
  } catch (_) { /* the status poll reports the connection */ }
}

// ---- polling ---------------------------------------------------------------

function draw(doc) {
  const clock = serverNow(doc);
  const colour = colourIndex(Object.keys(obj(doc.consumers)));
  drawHeader(doc);
  document.getElementById("gpus").replaceChildren(...drawGpus(doc, colour));
  document.getElementById("scheduler").replaceChildren(...drawScheduler(doc, clock));
  drawConsumers(doc, colour, clock);
  drawEvents(doc);
}

function setConnection(ok, problem) {
  const conn = document.getElementById("conn");
  const banner = document.getElementById("banner");
  if (ok) {
    document.body.dataset.state = "live";
    conn.replaceChildren(h("span", { class: "dot live" }), `live · ${new Date().toLocaleTimeString("en-GB", { hour12: false })}`);
    banner.hidden = true;
    banner.textContent = "";
    return;
  }
  document.body.dataset.state = "unreachable";
  conn.replaceChildren(h("span", { class: "dot down" }), "offline");
  const since = lastGood ? ` Showing what it said at ${new Date(lastGood.at).toLocaleTimeString("en-GB", { hour12: false })}.` : "";
  banner.textContent = `Cannot reach gpumgr: ${problem}. Retrying every ${POLL_MS / 1000} s.${since}`;
  banner.hidden = false;
}

async function fetchStatus() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  try {
    const response = await fetch(STATUS_URL, { cache: "no-store", signal: abort.signal,
                                               headers: { Accept: "application/json" } });
    const text = await response.text();
    if (!response.ok) {
      let why = `it answered HTTP ${response.status}`;
      try { why += ` (${JSON.parse(text).error.message})`; } catch (_) { /* not our JSON */ }
      throw new Error(why);
    }
    try { return JSON.parse(text); } catch (_) { throw new Error("its answer was not JSON"); }
  } catch (e) {
    if (e.name === "AbortError") throw new Error(`no answer within ${TIMEOUT_MS / 1000} s`);
    if (e instanceof TypeError) throw new Error("the connection failed");
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

async function poll() {
  try {
    const doc = await fetchStatus();
    await fetchRequests();
    setConnection(true);
    lastGood = { doc, at: Date.now() };
    try {
      draw(doc);
    } catch (e) {  // a document this page does not understand: say so, keep polling
      console.error(e);
      const banner = document.getElementById("banner");
      banner.textContent = `The status could not be drawn: ${e.message || e}`;
      banner.hidden = false;
    }
    updates += 1;
    document.body.dataset.updates = String(updates);
  } catch (e) {
    setConnection(false, e.message || String(e));
  } finally {
    setTimeout(poll, POLL_MS);  // after the answer, so polls never pile up
  }
}

poll();
