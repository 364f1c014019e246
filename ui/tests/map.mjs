// Drives `weir ui` in headless Chromium (playwright-core, Debian's /usr/bin/chromium):
//   node tests/map.mjs URL EXPECT.json [SCREENSHOT.png]
// EXPECT: {"workloads": ["ns/name", ...], "denied": ["ns/src", "ns/dst"], "reason": "...",
//          "policy": "ns/name", "connected": ["ns/src", "ns/dst"],
//          "service": ["ns/workload", "ns/service"]}.
// Checks that the map shows the workloads, that the edge `denied` is marked as dropping,
// that clicking it lists its drops with the reason and the policy, and that the edges carry
// TCP health: connects on `connected`, failed connects on `denied`, that the panel's filter
// narrows the flows, and that workload `service[0]` shows it backs `service[1]`; prints what
// it saw as JSON and exits non-zero on a failed check.
import { chromium } from "playwright-core";
import { readFileSync } from "node:fs";

const [url, expectPath, shot] = process.argv.slice(2);
const want = JSON.parse(readFileSync(expectPath, "utf8"));
const browser = await chromium.launch({
  executablePath: process.env.WEIR_CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-background-networking"],
});
const seen = {};
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 800 } });
  await page.goto(url);
  for (const w of want.workloads) {
    await page.locator(`g.node[data-id="${w}"]`).waitFor({ timeout: 20000 });
  }
  seen.workloads = await page.locator("g.node").evaluateAll((ns) => ns.map((n) => n.dataset.id));
  const [src, dst] = want.denied;
  const edge = page.locator(`g.edge.denied[data-src="${src}"][data-dst="${dst}"]`);
  await edge.waitFor({ timeout: 20000 });
  seen.denied_edge = await edge.getAttribute("data-dropped");
  await edge.locator("text").click();
  const rows = page.locator("#flows tbody tr.flow.dropped");
  await rows.first().waitFor({ timeout: 10000 });
  seen.title = await page.locator("#panel-title").textContent();
  seen.rows = await rows.evaluateAll((rs) => rs.map((r) => r.textContent));
  if (!seen.rows.some((r) => r.includes(want.reason) && r.includes(want.policy))) {
    throw new Error(`no dropped flow with ${want.reason} by ${want.policy} in the panel`);
  }
  // The panel's filter: every row left names the policy; a word nothing has leaves none.
  await page.locator("#filter").fill(want.policy);
  const named = await page.locator("#flows tbody tr").evaluateAll((rs) => rs.map((r) => r.textContent));
  if (!named.length || !named.every((r) => r.includes(want.policy))) {
    throw new Error(`filtering by ${want.policy} left ${JSON.stringify(named)}`);
  }
  await page.locator("#filter").fill("no-such-thing");
  if ((await page.locator("#flows tbody tr").count()) !== 0) throw new Error("the filter matched nothing yet left rows");
  await page.locator("#filter").fill("");
  // A workload shows the Services it backs.
  const backs = await page.locator(`g.node[data-id="${want.service[0]}"]`).getAttribute("data-services");
  if (!backs.split(",").includes(want.service[1])) throw new Error(`${want.service[0]} backs ${backs}, not ${want.service[1]}`);
  seen.services = backs;
  // TCP health on the edges (the agents report it every few seconds).
  const connected = `g.edge[data-src="${want.connected[0]}"][data-dst="${want.connected[1]}"]`;
  await page.waitForFunction(
    ([ok, denied]) => {
      const c = document.querySelector(ok), d = document.querySelector(denied);
      return c && d && Number(c.dataset.tcpConnects) > 0 && Number(d.dataset.tcpFailures) > 0;
    },
    [connected, `g.edge[data-src="${src}"][data-dst="${dst}"]`],
    { timeout: 20000 },
  );
  seen.connected_edge = await page.locator(connected).locator("text").textContent();
  seen.denied_label = await edge.locator("text").textContent();
  // Live: the map updates without a reload (the status line counts edges).
  seen.status = await page.locator("#status").textContent();
  if (shot) await page.screenshot({ path: shot, fullPage: true });
  console.log(JSON.stringify({ ok: true, ...seen }));
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: String(e), ...seen }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
