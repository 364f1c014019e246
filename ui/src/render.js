// Draws the model as SVG: a column per namespace, a box per workload, a curve per edge
// (green: only allowed; red and dashed: something dropped; thick orange: TCP trouble), its
// rate and TCP health on the curve.

const NS = "http://www.w3.org/2000/svg";
const COL_W = 240, COL_GAP = 90, BOX_W = 180, BOX_H = 30, ROW_GAP = 22, TOP = 40;

function el(name, attrs = {}, text) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

/** Renders `model` into `svg`; `onPick(kind, id)` is called on a click. */
export function render(svg, model, selected, onPick) {
  svg.replaceChildren();
  const pos = new Map();
  const groups = model.groups();
  let maxRows = 1;
  groups.forEach((g, i) => {
    const x = 20 + i * (COL_W + COL_GAP);
    maxRows = Math.max(maxRows, g.nodes.length);
    const h = TOP + g.nodes.length * (BOX_H + ROW_GAP) + 10;
    const box = el("g", { class: "ns", "data-namespace": g.name });
    box.append(el("rect", { x, y: 10, width: COL_W, height: h, rx: 8 }));
    box.append(el("text", { class: "title", x: x + 10, y: 28 }, g.name));
    svg.append(box);
    g.nodes.forEach((n, j) => {
      const bx = x + (COL_W - BOX_W) / 2, by = TOP + 10 + j * (BOX_H + ROW_GAP);
      pos.set(n.id, { x: bx, y: by });
      const services = [...n.services].sort();
      const node = el("g", {
        class: `node${selected === n.id ? " selected" : ""}`,
        "data-id": n.id,
        "data-services": services.join(","),
      });
      node.append(el("rect", { x: bx, y: by, width: BOX_W, height: BOX_H }));
      node.append(el("text", { x: bx + 8, y: by + 19 }, n.label));
      if (services.length) {
        // The Services it backs, by name (they live in its namespace).
        const names = services.map((s) => s.split("/")[1]).join(", ");
        node.append(el("text", { class: "svc", x: bx + BOX_W - 8, y: by + 19, "text-anchor": "end" }, `svc ${names}`));
      }
      node.addEventListener("click", () => onPick("node", n.id));
      svg.append(node);
    });
  });
  const now = Date.now();
  for (const e of model.edges.values()) {
    const a = pos.get(e.src), b = pos.get(e.dst);
    if (!a || !b) continue;
    const x1 = a.x + BOX_W, y1 = a.y + BOX_H / 2 - (e.src === e.dst ? 8 : 0);
    let x2 = b.x, y2 = b.y + BOX_H / 2 + (e.src === e.dst ? 8 : 0);
    if (x2 <= x1) x2 = b.x + BOX_W; // same column or leftwards: back to its right side
    const mx = (x1 + x2) / 2 + (x2 === b.x + BOX_W ? 40 + Math.abs(y2 - y1) / 4 : 0);
    const verdict = e.dropped > 0 ? "denied" : "allowed";
    const health = model.health(e, now);
    const g = el("g", {
      class: `edge ${verdict}${health.troubled ? " troubled" : ""}${selected === e.id ? " selected" : ""}`,
      "data-src": e.src,
      "data-dst": e.dst,
      "data-allowed": e.allowed,
      "data-dropped": e.dropped,
      "data-tcp-connects": e.tcp.connects,
      "data-tcp-failures": e.tcp.failures,
    });
    const d = `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`;
    g.append(el("path", { d }));
    // A wide invisible stroke along it takes the clicks.
    g.append(el("path", { d, class: "hit" }));
    const rate = model.rate(e, now).toFixed(1);
    const label = `${[...e.ports].slice(0, 2).join(",")} ${rate}/s${e.dropped ? `, ${e.dropped} dropped` : ""}${health.text ? ` · ${health.text}` : ""}`;
    g.append(el("text", { x: mx - 40, y: (y1 + y2) / 2 - 4 }, label));
    g.addEventListener("click", () => onPick("edge", e.id));
    svg.append(g);
  }
  svg.setAttribute("width", 40 + groups.length * (COL_W + COL_GAP));
  svg.setAttribute("height", TOP + 40 + maxRows * (BOX_H + ROW_GAP));
}
