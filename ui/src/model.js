// The map's model: flows (as `weir observe -o json` prints them) folded into workloads
// grouped by namespace, and edges between them with what was seen on each: flows allowed
// and dropped, and the TCP health of the source's client sockets towards the destination
// (`tcp-health` records: connects, failures, retransmits, resets, smoothed RTT).

const RECENT = 200; // flows kept per edge for the panel
const RATE_WINDOW_MS = 10_000;
const TROUBLE_WINDOW_MS = 60_000; // an edge stays marked this long after trouble

/** The cluster of a flow's node ("cluster/node" when the map shows a clusterset), or "". */
export function clusterOf(flow) {
  const node = flow.node || "";
  return node.includes("/") ? node.split("/")[0] : "";
}

/**
 * The map node a flow end belongs to: a workload of a namespace, or outside the pods. In a
 * clusterset, a named pod is of the cluster whose node reported the flow (an agent names
 * only its own cluster's pods), so that the same namespace in two clusters is two groups.
 */
export function nodeOf(end, cluster = "") {
  if (end.pod) {
    const [podNs, name] = end.pod.split("/");
    const ns = cluster ? `${cluster}/${podNs}` : podNs;
    const workload = end.workload || name;
    return { id: `${ns}/${workload}`, group: ns, label: workload };
  }
  const kind = end.identity_kind && end.identity_kind !== "unknown" ? end.identity_kind : "outside";
  return { id: `:${kind}`, group: "(outside the pods)", label: kind };
}

export class Model {
  constructor() {
    this.nodes = new Map(); // id -> {id, group, label, flows: []}
    // "src->dst" -> {id, src, dst, allowed, dropped, ports, times, flows, tcp}
    this.edges = new Map();
  }

  add(flow) {
    // A reply travels the edge of its request: not an edge of its own.
    if (flow.is_reply && flow.verdict !== "dropped") return;
    const cluster = clusterOf(flow);
    const s = nodeOf(flow.source, cluster);
    const d = nodeOf(flow.destination, cluster);
    for (const n of [s, d]) {
      if (!this.nodes.has(n.id)) this.nodes.set(n.id, { ...n, flows: [], services: new Set() });
    }
    // The Services a workload backs: those of the flows that reached its pods.
    if (flow.service && flow.destination.pod) this.nodes.get(d.id).services.add(flow.service);
    const id = `${s.id}->${d.id}`;
    let e = this.edges.get(id);
    if (!e) {
      e = {
        id, src: s.id, dst: d.id, allowed: 0, dropped: 0, ports: new Set(), times: [], flows: [],
        tcp: { connects: 0, failures: 0, retransmits: 0, resets: 0, rttUs: 0, rttN: 0, troubleAt: 0 },
      };
      this.edges.set(id, e);
    }
    if (flow.tcp) {
      // TCP health: observed on the edge, neither allowed nor dropped.
      const t = flow.tcp;
      e.tcp.connects += t.connects;
      e.tcp.failures += t.connect_failures;
      e.tcp.retransmits += t.retransmits;
      e.tcp.resets += t.resets_sent + t.resets_received;
      if (t.rtt_us !== undefined) {
        // Weighted by the connections each mean is of.
        const n = t.rtt_samples || 1;
        e.tcp.rttUs += t.rtt_us * n;
        e.tcp.rttN += n;
      }
      if (t.connect_failures + t.retransmits + t.resets_sent + t.resets_received > 0) {
        e.tcp.troubleAt = Math.max(e.tcp.troubleAt, Date.parse(flow.time) || Date.now());
      }
    } else {
      if (flow.verdict === "dropped") e.dropped += 1;
      else e.allowed += 1;
      e.times.push(Date.parse(flow.time) || Date.now());
    }
    if (flow.destination.port) e.ports.add(`${flow.destination.port}/${flow.protocol}`);
    e.flows.push(flow);
    if (e.flows.length > RECENT) e.flows.shift();
    for (const n of [s.id, d.id]) {
      const nf = this.nodes.get(n).flows;
      nf.push(flow);
      if (nf.length > RECENT) nf.shift();
    }
  }

  /** Edge `e`'s TCP health in a few words ("" when nothing was seen), and whether it is
   * troubled (failed connects, resets or retransmits in the last minute, as of `now`). */
  health(e, now = Date.now()) {
    const t = e.tcp;
    const parts = [];
    if (t.failures) parts.push(`${t.failures} failed`);
    if (t.retransmits) parts.push(`${t.retransmits} rtx`);
    if (t.resets) parts.push(`${t.resets} rst`);
    if (t.rttN) parts.push(`rtt ${Math.round(t.rttUs / t.rttN)}µs`);
    return { text: parts.join(" "), troubled: now - t.troubleAt <= TROUBLE_WINDOW_MS };
  }

  /** Flows per second on edge `e` over the last ten seconds (as of `now`). */
  rate(e, now = Date.now()) {
    e.times = e.times.filter((t) => now - t <= RATE_WINDOW_MS);
    return e.times.length / (RATE_WINDOW_MS / 1000);
  }

  /** The namespaces (groups) with their nodes, sorted for a stable layout. */
  groups() {
    const g = new Map();
    for (const n of this.nodes.values()) {
      if (!g.has(n.group)) g.set(n.group, []);
      g.get(n.group).push(n);
    }
    return [...g.entries()]
      .sort(([a], [b]) => (a.startsWith("(") ? 1 : 0) - (b.startsWith("(") ? 1 : 0) || a.localeCompare(b))
      .map(([name, nodes]) => ({ name, nodes: nodes.sort((a, b) => a.label.localeCompare(b.label)) }));
  }
}
