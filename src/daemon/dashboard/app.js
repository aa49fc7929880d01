// The dashboard: the status as the daemon pushes it (/events, Server-Sent Events), drawn as the seed's instance grid.
"use strict";
let report = null;
let open = null;
// The issue whose runs the detail view shows: read again only when another one is opened.
let historyFor = null;

const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
};

const ago = (at) => {
  if (!at) return "-";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(at)) / 1000));
  return s < 60 ? `${s}s ago` : s < 3600 ? `${Math.floor(s / 60)}m ago` : `${Math.floor(s / 3600)}h ago`;
};

async function act(slot, what) {
  if (what === "stop" && !window.confirm(`Stop ${slot}?`)) return;
  const r = await fetch(`/api/slots/${encodeURIComponent(slot)}/${what}`, { method: "POST", headers: { "X-Autodev": "1" } });
  if (!r.ok) alert(await r.text());
}

function card(s) {
  const stop = el("button", { textContent: "Stop", "data-stop": s.slot });
  stop.onclick = (ev) => { ev.stopPropagation(); act(s.slot, "stop"); };
  const resume = el("button", { textContent: "Resume", "data-resume": s.slot });
  resume.onclick = (ev) => { ev.stopPropagation(); act(s.slot, "resume"); };
  const pr = s.pr && s.pr.url ? el("a", { href: s.pr.url, textContent: `PR #${s.pr.number}`, rel: "noreferrer" }) : "";
  const c = el("div", { class: "card", "data-slot": s.slot },
    el("h2", {}, s.slot, el("span", { class: `state ${s.state}`, textContent: s.state.replace("_", " ") })),
    el("div", { class: "task", textContent: s.issue
      ? `#${s.issue} ${s.held_elsewhere ? `held by ${s.held_elsewhere}: ` : ""}${s.progress_message || s.reason || ""}`
      : "free" }),
    el("div", { class: "bar" }, el("div", { style: `width:${s.progress || 0}%` })),
    el("div", { class: "facts", textContent:
      `cpu ${s.cpu_percent == null ? "-" : s.cpu_percent.toFixed(0) + "%"} · mem ${s.memory_mb == null ? "-" : s.memory_mb.toFixed(0) + "M"} · beat ${ago(s.heartbeat_at)} · ` +
      `${s.cost_usd == null ? "" : (s.cost_estimated ? "~" : "") + "$" + s.cost_usd.toFixed(2)}` }, " ", pr),
    el("pre", { textContent: (s.console_preview || []).slice(-6).join("\n") }));
  if (["in_progress", "starting", "stale"].includes(s.state)) c.append(stop);
  if (["failed", "abandoned", "waiting"].includes(s.state)) c.append(resume);
  c.onclick = () => { open = s.slot; detail(); };
  return c;
}

async function detail() {
  const box = document.getElementById("detail");
  const s = report && report.slots.find((x) => x.slot === open);
  if (!s) { box.hidden = true; return; }
  box.hidden = false;
  document.getElementById("detail-title").textContent = `${s.slot} · ${s.state} · ${s.issue ? "#" + s.issue : "free"}`;
  document.getElementById("detail-facts").textContent =
    `branch ${s.branch || "-"} · run ${s.run_id || "-"} · ${s.reason || ""}`;
  document.getElementById("detail-console").textContent = (s.console_preview || []).join("\n");
  if (s.issue && historyFor !== `${s.slot}#${s.issue}`) {
    historyFor = `${s.slot}#${s.issue}`;
    const r = await fetch(`/api/history?issue=${s.issue}`);
    const runs = r.ok ? await r.json() : [];
    document.getElementById("detail-history").replaceChildren(...runs.map((h) =>
      el("li", { textContent: `${h.ended_at} ${h.state} ${h.end_cause || ""} ${h.reason || ""}` })));
  }
}

function draw() {
  const s = report.summary;
  const rate = s.success_rate == null ? "-" : Math.round(s.success_rate * 100) + "%";
  document.getElementById("summary").textContent =
    `instances ${s.instances_total} · healthy ${s.instances_healthy} · stale ${s.instances_stale} · ` +
    `tasks ${s.tasks_total} · completed ${s.tasks_completed} · in progress ${s.tasks_in_progress} · success ${rate}` +
    (report.queued && report.queued.length ? ` · ${report.queued.length} queued` : "") +
    (report.autopilot ? " · autopilot on" : "");
  document.getElementById("warnings").textContent = (report.warnings || []).join(" · ");
  document.getElementById("grid").replaceChildren(...report.slots.map(card));
  if (open) detail();
}

document.getElementById("detail-close").onclick = () => {
  open = null;
  historyFor = null;
  document.getElementById("detail").hidden = true;
};
const events = new EventSource("/events");
events.onmessage = (m) => { report = JSON.parse(m.data); draw(); };
events.onerror = () => { document.getElementById("summary").textContent = "connection lost; retrying…"; };
