// The map's model without a browser: node ui/tests/model.mjs (exits non-zero on a failed
// check). In a clusterset (nodes named "cluster/node") the same namespace of two clusters
// is two groups; in one cluster, groups are namespaces.
import { Model } from "../src/model.js";

const flow = (node, src, dst) => ({
  node,
  time: "2026-12-06T00:00:00Z",
  verdict: "forwarded",
  protocol: "TCP",
  source: { pod: src, workload: src.split("/")[1].split("-")[0] },
  destination: { pod: dst, workload: dst.split("/")[1].split("-")[0], port: 80 },
});
const check = (what, got, want) => {
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    console.error(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
    process.exit(1);
  }
};

const set = new Model();
set.add(flow("c1/node-1", "default/client-1", "default/web-1"));
set.add(flow("c2/node-1", "default/client-2", "default/web-2"));
check("clusterset groups", set.groups().map((g) => g.name), ["c1/default", "c2/default"]);
check("clusterset nodes", [...set.nodes.keys()].sort(), ["c1/default/client", "c1/default/web", "c2/default/client", "c2/default/web"]);
check("clusterset edges", [...set.edges.keys()].sort(), ["c1/default/client->c1/default/web", "c2/default/client->c2/default/web"]);

const one = new Model();
one.add(flow("node-1", "default/client-1", "default/web-1"));
one.add(flow("node-2", "default/client-2", "default/web-2"));
check("cluster groups", one.groups().map((g) => g.name), ["default"]);
check("cluster edges", [...one.edges.keys()], ["default/client->default/web"]);
console.log("ok");
