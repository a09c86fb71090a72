// jobtree dashboard: four views of one follower's JSON (/api/*), redrawn whenever the server
// pushes `ledger` on /api/stream. No scheduling logic here: the server's views say everything.
"use strict";

const CLASSES = ["owned", "shared", "borrowed", "unfunded", "spare"];
const view = document.getElementById("view");
const live = document.getElementById("live");
const tip = document.getElementById("tip");
let current = null;   // {name, arg}
let drawing = false, again = false;

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

function colour(owner) {
  // FNV-1a, then a murmur finaliser: owners that differ in one character get distant hues.
  let h = 2166136261;
  for (const ch of owner) h = Math.imul(h ^ ch.charCodeAt(0), 16777619);
  h ^= h >>> 16; h = Math.imul(h, 2246822507); h ^= h >>> 13; h = Math.imul(h, 3266489909); h ^= h >>> 16;
  h >>>= 0;
  return `hsl(${h % 360}, 62%, ${38 + (h >>> 12) % 18}%)`;
}

function when(iso) {
  if (!iso) return "—";
  return iso.replace("T", " ").replace("Z", " UTC");
}

function runLink(key) {
  return `<a href="#/runs/${esc(key)}" data-run-link="${esc(key)}">${esc(key)}</a>`;
}

function route() {
  const parts = (location.hash || "#/fleet").slice(2).split("/");
  const name = parts[0] || "fleet";
  const arg = parts.length >= 3 ? `${decodeURIComponent(parts[1])}/${decodeURIComponent(parts[2])}` : null;
  return {name: ["fleet", "budgets", "queue", "runs"].includes(name) ? name : "fleet", arg};
}

async function getJSON(path) {
  const r = await fetch(path, {cache: "no-store"});
  const doc = await r.json();
  if (!r.ok) throw new Error(doc.error || `${path}: HTTP ${r.status}`);
  return doc;
}

async function redraw() {
  if (drawing) { again = true; return; }
  drawing = true;
  try {
    do {
      again = false;
      current = route();
      for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.dataset.view === current.name);
      try {
        let doc;
        if (current.name === "runs" && current.arg) {
          doc = await getJSON(`/api/runs/${current.arg}`);
          view.innerHTML = drawRun(doc);
        } else {
          doc = await getJSON(`/api/${current.name}`);
          view.innerHTML = {fleet: drawFleet, budgets: drawBudgets, queue: drawQueue, runs: drawRuns}[current.name](doc);
        }
        document.body.dataset.sequence = doc.sequence;
        document.body.dataset.view = current.name;
        document.body.dataset.route = location.hash;  // what was drawn (tests wait for it)
      } catch (e) {
        view.innerHTML = `<p class="error">${esc(e.message)}</p>`;
      }
    } while (again);
  } finally {
    drawing = false;
  }
}

// --- fleet ---------------------------------------------------------------------------------

function cell(cls, owner, attrs = "") {
  return `<span class="cell ${cls}"${owner ? ` style="--c:${colour(owner)}"` : ""}${attrs}></span>`;
}

function drawFleet(doc) {
  const nodes = doc.domains.reduce((n, d) => n + d.nodes.length, 0);
  const legend = CLASSES.map((c) => `<span><span class="cell ${c}" style="--c:#57606a"></span>${c}</span>`).join("")
    + `<span>${cell("", "")}free</span><span>${cell("fenced", "")}fenced</span>`
    + doc.owners.map((o) => `<span>${cell("owned", o)}${esc(o)}</span>`).join("");
  let out = `<h2>Fleet <span class="muted">${nodes} nodes · ${when(doc.time)}</span></h2>
    <div class="legend">${legend}</div><div class="${nodes > 300 ? "dense" : ""}">`;
  for (const d of doc.domains) {
    const counts = CLASSES.filter((c) => d.classes[c]).map((c) => `${d.classes[c]} ${c}`).concat([`${d.free} free`]);
    out += `<div class="card" data-domain="${esc(d.name)}"><div class="domain-head"><h3>${esc(d.name)}</h3>
      <span class="muted">${d.gpus} GPUs: ${counts.join(", ")}</span></div><div class="nodes">`;
    for (const n of d.nodes) {
      const state = n.state.toLowerCase();
      out += `<div class="node ${state}" data-node="${esc(n.name)}" data-tip="${esc(n.name)} · ${esc(n.flavor)} · ${esc(n.state)}">`;
      n.slots.forEach((s, i) => {
        if (s === null) {
          out += cell(n.state === "Fenced" ? "fenced" : "", "", ` data-tip="${esc(n.name)}#${i} · ${n.state === "Fenced" ? "fenced" : "free"}"`);
        } else {
          const h = doc.holders[s];
          out += cell(h.class, h.owner, ` data-run="${esc(h.run)}" data-lease="${esc(h.lease)}"`
            + ` data-tip="${esc(n.name)}#${i} · ${esc(h.run)} (${esc(h.owner)})\nlease ${esc(h.lease)} · ${h.class}"`);
        }
      });
      out += `</div>`;
    }
    out += `</div></div>`;
  }
  return out + `</div>`;
}

// --- budgets -------------------------------------------------------------------------------

function spark(points, cap, endAt, exhausts) {
  // Remaining GPU-hours (capped) or GPU-hours burned (uncapped) over time, with the projection.
  if (!points.length) return "";
  const w = 260, h = 48;
  const t = points.map((p) => Date.parse(p[0]));
  const t1 = Math.max(t[t.length - 1], exhausts ? Date.parse(exhausts) : 0) || t[0] + 1;
  const t0 = t[0] === t1 ? t1 - 3600e3 : t[0];
  const vals = points.map((p) => cap ? Math.max(0, cap - p[1]) : p[1]);
  const top = Math.max(cap || 0, ...vals, 1e-9);
  const x = (v) => ((v - t0) / (t1 - t0)) * (w - 4) + 2;
  const y = (v) => h - 3 - (v / top) * (h - 6);
  const line = points.map((p, i) => `${x(t[i]).toFixed(1)},${y(vals[i]).toFixed(1)}`).join(" ");
  let proj = "";
  if (cap && exhausts) {
    proj = `<line x1="${x(t[t.length - 1]).toFixed(1)}" y1="${y(vals[vals.length - 1]).toFixed(1)}" x2="${x(Date.parse(exhausts)).toFixed(1)}" y2="${y(0)}" stroke="#cf222e" stroke-dasharray="3 3"/>`;
  }
  const now = `<circle cx="${x(t[t.length - 1]).toFixed(1)}" cy="${y(vals[vals.length - 1]).toFixed(1)}" r="2.5" fill="#0969da"><title>now: ${vals[vals.length - 1].toFixed(2)} GPU-hours ${cap ? "left" : "burned"}</title></circle>`;
  return `<svg class="burn" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" role="img" aria-label="burn-down">
    <rect width="${w}" height="${h}" fill="#f6f8fa"/><polyline fill="none" stroke="#0969da" stroke-width="1.6" points="${line}"/>${proj}${now}</svg>`;
}

function drawEnvelope(b, e) {
  const cap = e.concurrency || 1;
  const seg = (n, cls) => n ? `<span class="cell ${cls}" style="--c:${colour(b.owner)};width:${(100 * n / cap).toFixed(2)}%;height:100%;border-radius:0"></span>` : "";
  const conc = `<div class="bar" title="${e.used} of ${e.concurrency} GPUs funded">${seg(e.funded.owned, "owned")}${seg(e.funded.shared, "shared")}${seg(e.funded.borrowed, "borrowed")}</div>`;
  let hours;
  if (e.maxGPUHours) {
    const pct = Math.min(100, 100 * e.gpuHours / e.maxGPUHours);
    const mark = e.windowElapsed === null ? "" : `<span class="mark" style="left:${(100 * e.windowElapsed).toFixed(1)}%" title="window elapsed"></span>`;
    hours = `<div class="bar"><span style="width:${pct.toFixed(1)}%;background:${pct >= 100 ? "#cf222e" : "#0969da"}"></span>${mark}</div>`;
  } else {
    hours = `<span class="muted">no GPU-hours cap</span>`;
  }
  let pace;
  if (e.maxGPUHours && e.leftGPUHours === 0) pace = "spent: it funds nothing more this window";
  else if (e.exhaustsAt) pace = `at ${e.fundedNow} GPUs it runs out at <b class="exhausts">${when(e.exhaustsAt)}</b>`;
  else if (e.windowEndsFirst) pace = `at ${e.fundedNow} GPUs the window ends (${when(e.windowEnd)}) first`;
  else if (e.maxGPUHours) pace = "nothing funded now: the hours last";
  else pace = `${e.fundedNow} GPUs funded now`;
  const lend = e.lending.allowed ? `lends to ${esc(e.lending.to.join(", ") || "anyone")}${e.lending.maxConcurrency !== null ? ` (at most ${e.lending.maxConcurrency} GPUs)` : ""}; ${e.lending.lentNow} GPUs lent now` : "does not lend";
  const window = e.windowStart || e.windowEnd ? `window ${when(e.windowStart)} → ${when(e.windowEnd)}${e.windowOpen ? "" : " (closed)"}` : "no window";
  return `<div class="card envelope" data-envelope="${esc(b.name)}/${esc(e.name)}">
    <h3>${esc(b.name)}/${esc(e.name)} <span class="muted">${esc(b.owner)} · ${esc(e.flavor)} · ${window}</span></h3>
    <div class="grid2">
      <span>Concurrency <b>${e.used}</b> of ${e.concurrency} GPUs <span class="muted">(headroom ${e.headroom})</span></span>${conc}
      <span>GPU-hours <b>${e.gpuHours.toFixed(2)}</b>${e.maxGPUHours ? ` of ${e.maxGPUHours}` : ""}</span>${hours}
      <span>Burn-down</span><span>${spark(e.burn, e.maxGPUHours, e.windowEnd, e.exhaustsAt)} <span class="pace">${pace}</span></span>
      <span>Lending</span><span class="muted">${lend}</span>
    </div></div>`;
}

function drawBudgets(doc) {
  let out = `<h2>Budgets <span class="muted">${when(doc.time)}</span></h2>`;
  for (const b of doc.budgets) for (const e of b.envelopes) out += drawEnvelope(b, e);
  out += `<h3>GPUs by owner</h3><table><tr><th>owner</th>${CLASSES.map((c) => `<th>${c}</th>`).join("")}<th>unfunded GPU-hours</th></tr>`;
  for (const o of doc.owners) {
    out += `<tr data-owner="${esc(o.owner)}"><td>${cell("owned", o.owner)} ${esc(o.owner)}</td>${CLASSES.map((c) => `<td>${o.gpus[c]}</td>`).join("")}<td>${o.unfundedGPUHours.toFixed(2)}</td></tr>`;
  }
  return out + `</table>`;
}

// --- queue ---------------------------------------------------------------------------------

function drawQueue(doc) {
  const reasons = Object.entries(doc.byReason).map(([r, n]) => `${n} ${r}`).join(", ") || "empty";
  let out = `<h2>Queue <span class="muted">${doc.runs.length} runs (${esc(reasons)}) · ${when(doc.time)}</span></h2>
    <table><tr><th>#</th><th>run</th><th>owner</th><th>phase</th><th>GPUs</th><th>since</th><th>ETA</th><th>why, and what would let it start</th></tr>`;
  for (const r of doc.runs) {
    const needs = r.needs.length ? `<ul class="needs">${r.needs.map((n) => `<li>${esc(n)}</li>`).join("")}</ul>` : "";
    out += `<tr data-queued="${esc(r.key)}"><td>${r.position}</td><td>${runLink(r.key)}</td><td>${esc(r.owner)}</td>
      <td><span class="pill ${esc(r.phase)}">${esc(r.phase)}</span> <span class="muted">${esc(r.reason)}</span></td>
      <td>${r.gpus} ${esc(r.flavor)}</td><td>${when(r.since)}</td><td class="eta">${when(r.eta)}</td><td>${esc(r.why)}${needs}</td></tr>`;
  }
  return out + `</table>`;
}

// --- runs ----------------------------------------------------------------------------------

function drawRuns(doc) {
  let out = `<h2>Runs <span class="muted">${doc.runs.length} · ${when(doc.time)}</span></h2><table><tr><th>run</th><th>owner</th><th>phase</th></tr>`;
  for (const r of doc.runs) out += `<tr><td>${runLink(r.key)}</td><td>${esc(r.owner)}</td><td><span class="pill ${esc(r.phase)}">${esc(r.phase)}</span></td></tr>`;
  return out + `</table>`;
}

function timeline(doc) {
  const leases = doc.leases;
  if (!leases.length) return `<p class="muted">No leases yet.</p>`;
  const now = Date.parse(doc.time);
  const t0 = Math.min(...leases.map((l) => Date.parse(l.start)));
  const t1 = Math.max(now, ...leases.map((l) => l.end ? Date.parse(l.end) : now), t0 + 1000);
  const w = 760, left = 150, rowH = 22, h = leases.length * rowH + 24;
  const x = (t) => left + ((t - t0) / (t1 - t0)) * (w - left - 10);
  let svg = `<svg class="timeline" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}">`;
  leases.forEach((l, i) => {
    const y = i * rowH + 4, a = x(Date.parse(l.start)), b = x(l.end ? Date.parse(l.end) : now);
    const fill = l.end ? "#afb8c1" : colour(l.owner);
    const label = `${l.mintReason}${l.end ? ` → ${l.closureReason || "closed"}` : ""}`;
    svg += `<text x="2" y="${y + 14}">${esc(l.name.split(".").slice(-1)[0])} g${l.group} ${esc(l.role)}</text>
      <rect data-lease="${esc(l.name)}" x="${a.toFixed(1)}" y="${y}" width="${Math.max(2, b - a).toFixed(1)}" height="${rowH - 6}" rx="3" fill="${fill}"><title>${esc(l.name)}: ${l.gpus} GPUs ${esc(l.class || "")} ${esc(label)}</title></rect>
      <text x="${(a + 4).toFixed(1)}" y="${y + 13}" fill="#fff">${l.gpus} · ${esc(label)}</text>`;
  });
  svg += `<text x="${left}" y="${h - 4}" class="muted">${when(new Date(t0).toISOString().replace(".000", ""))}</text>
    <text x="${w - 10}" y="${h - 4}" text-anchor="end">${when(doc.time)}</text></svg>`;
  return svg;
}

function forest(doc) {
  const f = doc.forest;
  if (f.nodes.length <= 1) return `<p class="muted">No follow edges.</p>`;
  const ups = {};
  for (const [u, d] of f.edges) (ups[d] = ups[d] || []).push(u);
  const depth = {};
  const level = (k, seen = new Set()) => {
    if (k in depth) return depth[k];
    if (seen.has(k)) return 0;
    seen.add(k);
    depth[k] = (ups[k] || []).reduce((m, u) => Math.max(m, level(u, seen) + 1), 0);
    return depth[k];
  };
  f.nodes.forEach((n) => level(n.key));
  const cols = {};
  for (const n of f.nodes) (cols[depth[n.key]] = cols[depth[n.key]] || []).push(n);
  const bw = 170, bh = 30, gx = 60, gy = 14, pos = {};
  Object.entries(cols).forEach(([c, ns]) => ns.forEach((n, i) => { pos[n.key] = [c * (bw + gx) + 4, i * (bh + gy) + 4]; }));
  const w = (Object.keys(cols).length) * (bw + gx), h = Math.max(...Object.values(cols).map((ns) => ns.length)) * (bh + gy) + 8;
  let svg = `<svg class="forest" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}"><defs><marker id="arr" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#6b7580"/></marker></defs>`;
  for (const [u, d] of f.edges) {
    const [ux, uy] = pos[u], [dx, dy] = pos[d];
    svg += `<line data-edge="${esc(u)}->${esc(d)}" x1="${ux + bw}" y1="${uy + bh / 2}" x2="${dx}" y2="${dy + bh / 2}" stroke="#6b7580" marker-end="url(#arr)"/>`;
  }
  const fills = {Running: "#dafbe1", Pending: "#fff8c5", Reserved: "#ddf4ff", Completed: "#e9e4ff", Failed: "#ffebe9"};
  for (const n of f.nodes) {
    const [x, y] = pos[n.key];
    const me = n.key === doc.run.key;
    svg += `<a href="#/runs/${esc(n.key)}"><rect data-forest-node="${esc(n.key)}" x="${x}" y="${y}" width="${bw}" height="${bh}" rx="5" fill="${fills[n.phase] || "#eef1f4"}" stroke="${me ? "#1d2329" : "#d9dee3"}" stroke-width="${me ? 2 : 1}"/>
      <text x="${x + 6}" y="${y + 13}">${esc(n.key)}</text><text x="${x + 6}" y="${y + 25}" fill="#6b7580">${esc(n.phase)}</text></a>`;
  }
  return svg + `</svg>`;
}

function drawRun(doc) {
  const r = doc.run;
  const total = CLASSES.reduce((n, c) => n + (c === "spare" ? 0 : r.funding[c]), 0) || 1;
  const split = CLASSES.filter((c) => r.funding[c]).map((c) => `${r.funding[c]} ${c}`).join(", ") || "none";
  const bar = `<div class="bar" style="max-width:420px">${["owned", "shared", "borrowed", "unfunded"].map((c) => r.funding[c] ? `<span class="cell ${c}" style="--c:${colour(r.owner)};width:${(100 * r.funding[c] / total).toFixed(1)}%;height:100%;border-radius:0"></span>` : "").join("")}</div>`;
  const queued = doc.queued ? `<div class="card queued"><b>Why it waits:</b> ${esc(doc.queued.why)}${doc.queued.eta ? ` · expected <b class="eta">${when(doc.queued.eta)}</b>` : ""}
    ${doc.queued.needs.length ? `<ul class="needs">${doc.queued.needs.map((n) => `<li>${esc(n)}</li>`).join("")}</ul>` : ""}</div>` : "";
  const events = doc.timeline.map((e) => `<tr><td>${when(e.at)}</td><td>${esc(e.what)}</td><td>${esc(e.lease)}</td><td>${e.gpus}</td></tr>`).join("");
  return `<h2>${esc(r.key)} <span class="pill ${esc(r.phase)}">${esc(r.phase)}</span> <span class="muted">${esc(r.reason)} · ${esc(r.owner)}</span></h2>
    ${queued}
    <div class="card"><ul class="explain">${doc.lines.map((l) => `<li>${esc(l)}</li>`).join("")}</ul></div>
    <div class="card"><h3>Funding split</h3><p>${split} <span class="muted">(width ${r.width.allocated} of ${r.width.desired} desired)</span></p>${bar}</div>
    <div class="card"><h3>Leases</h3>${timeline(doc)}
      <table><tr><th>at</th><th>what</th><th>lease</th><th>GPUs</th></tr>${events}</table></div>
    <div class="card"><h3>Forest</h3>${forest(doc)}</div>`;
}

// --- live ----------------------------------------------------------------------------------

function connect() {
  const source = new EventSource("/api/stream");
  source.addEventListener("ledger", (ev) => {
    const d = JSON.parse(ev.data);
    live.className = "live ok";
    live.textContent = `live · ledger ${d.sequence} · ${when(d.time)}`;
    redraw();
  });
  source.onerror = () => { live.className = "live down"; live.textContent = "reconnecting…"; };
}

view.addEventListener("mousemove", (ev) => {
  const t = ev.target.closest("[data-tip]");
  if (!t) { tip.hidden = true; return; }
  tip.textContent = t.dataset.tip;
  tip.style.left = `${ev.clientX + 12}px`;
  tip.style.top = `${ev.clientY + 12}px`;
  tip.hidden = false;
});
view.addEventListener("click", (ev) => {
  const t = ev.target.closest("[data-run]");
  if (t) location.hash = `#/runs/${t.dataset.run}`;
});
view.addEventListener("mouseleave", () => { tip.hidden = true; });
window.addEventListener("hashchange", redraw);
redraw();
connect();
