// weir's live service map: polls `weir ui`'s /api/flows for new flows (from every node),
// folds them into the model, redraws, and lists the flows of what was clicked.
import { Model } from "./model.js";
import { render } from "./render.js";

const model = new Model();
let since = 0;
let selected = null; // {kind, id}

const $ = (id) => document.getElementById(id);

function end(e) {
  const who = e.pod || e.ip;
  return e.port ? `${who}:${e.port}` : who;
}

function showPanel() {
  const tbody = $("flows").querySelector("tbody");
  tbody.replaceChildren();
  if (!selected) return;
  const item = selected.kind === "edge" ? model.edges.get(selected.id) : model.nodes.get(selected.id);
  if (!item) return;
  $("panel-title").textContent =
    selected.kind === "edge" ? `${item.src} → ${item.dst}` : `${item.id}`;
  const want = $("verdict").value;
  const words = $("filter").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  for (const f of [...item.flows].reverse()) {
    if (want && f.verdict !== want) continue;
    // Every word somewhere in the flow (pods, ports, Service, reason, policies).
    const text = JSON.stringify(f).toLowerCase();
    if (!words.every((w) => text.includes(w))) continue;
    const tr = document.createElement("tr");
    tr.className = `flow ${f.verdict}`;
    const reason = f.reason_text ? `${f.reason}: ${f.reason_text}` : f.reason;
    const policies = (f.policies || []).join(", ");
    for (const text of [
      f.time.slice(11, 23),
      `${end(f.source)} → ${end(f.destination)} ${f.protocol}${f.service ? ` (${f.service})` : ""}`,
      f.verdict,
      policies ? `${reason} (${policies})` : reason,
    ]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    tbody.append(tr);
  }
}

function redraw() {
  render($("svg"), model, selected && selected.id, (kind, id) => {
    selected = { kind, id };
    redraw();
    showPanel();
  });
}

async function poll() {
  try {
    const r = await fetch(`api/flows?since=${since}`);
    const page = await r.json();
    for (const f of page.flows) model.add(f);
    since = page.next;
    $("cluster").textContent = page.cluster ? `cluster ${page.cluster}` : "";
    $("status").textContent = `${page.nodes} node(s), ${model.edges.size} edge(s), ${page.unreachable.length ? `unreachable: ${page.unreachable.join(", ")}` : "live"}`;
    if (page.flows.length) {
      redraw();
      showPanel();
    }
  } catch (e) {
    $("status").textContent = `not answering: ${e}`;
  }
  setTimeout(poll, 1000);
}

$("verdict").addEventListener("change", showPanel);
$("filter").addEventListener("input", showPanel);
redraw();
poll();
