// 200 clients whose herald drains at once (SIGTERM with --drain-spread 0): their reconnects
// must be spread over the backoff window, not one burst, and never before the server's
// reconnect hint. A second herald shares the port (--reuse-port), as in a deploy.

import { test } from "node:test";
import assert from "node:assert/strict";
import { performance } from "node:perf_hooks";
import WebSocket from "ws";
import { Herald } from "../herald.js";
import { startHerald, stop, until } from "./helpers.js";

const N = 200;

/** N clients on `url`, each with a WebSocket class that records when it is constructed. */
function clients(url, options = {}) {
  return Array.from({ length: N }, (_, i) => {
    const c = { i, attempts: [], hints: [], closes: [] };
    class Recording extends WebSocket {
      constructor(u) {
        super(u);
        c.attempts.push(performance.now());
        this.addEventListener("message", (e) => {
          if (String(e.data).includes('"op":"reconnect"')) c.hints.push({ at: performance.now(), ...JSON.parse(e.data) });
        });
      }
    }
    c.herald = new Herald(url, { WebSocket: Recording, ...options });
    c.herald.on("retry", (r) => c.closes.push({ at: performance.now(), ...r }));
    c.herald.subscribe("t", () => {});
    return c;
  });
}

/** Start herald A with the clients, then B on the same port, then drain A; returns the clients. */
async function drainOnce(t, extra) {
  const A = await startHerald(["--reuse-port", "--drain-spread", "0", ...extra]);
  t.after(() => stop(A, "SIGKILL"));
  const cs = clients(A.ws);
  t.after(() => cs.forEach((c) => c.herald.close()));
  await until(() => cs.every((c) => c.herald.state === "open"), 20000, `${N} clients open`);
  const B = await startHerald(["--reuse-port"], { port: A.port });
  t.after(() => stop(B, "SIGKILL"));
  const t0 = performance.now();
  const exited = await stop(A, "SIGTERM");
  assert.equal(exited.code, 0, A.log.slice(-2000));
  await until(() => cs.every((c) => c.herald.state === "open" && c.attempts.length >= 2), 20000, `${N} clients back on B`);
  // Every one of them is on B now.
  const metrics = await (await fetch(`${B.http}/metrics`)).text();
  return { cs, t0, metrics };
}

function spread(times, width) {
  const min = Math.min(...times);
  const sorted = [...times].sort((a, b) => a - b);
  const q = (p) => sorted[Math.floor(p * (sorted.length - 1))];
  const buckets = new Map();
  for (const x of times) {
    const k = Math.floor((x - min) / width);
    buckets.set(k, (buckets.get(k) || 0) + 1);
  }
  return { min, p10: q(0.1), p50: q(0.5), p90: q(0.9), max: sorted.at(-1), busiest: Math.max(...buckets.values()), buckets };
}

test(`${N} clients drained at once come back spread over the jitter window`, async (t) => {
  // Hints of 0 ms: all the spreading is the client's (up to minDelay = 500 ms).
  const { cs, t0 } = await drainOnce(t, ["--reconnect-jitter", "0-0"]);
  const back = cs.map((c) => c.attempts[1] - t0);
  const s = spread(back, 50);
  const report = `reconnects after SIGTERM (ms): min ${s.min.toFixed(0)} p10 ${s.p10.toFixed(0)} p50 ${s.p50.toFixed(0)} p90 ${s.p90.toFixed(0)} max ${s.max.toFixed(0)}; busiest 50 ms holds ${s.busiest} of ${N}`;
  t.diagnostic(report);
  for (const c of cs) {
    assert.equal(c.hints.length, 1, "each got one hint");
    assert.equal(c.hints[0].after_ms, 0);
    assert.equal(c.closes[0].hinted, true);
    assert.equal(c.closes[0].code, 1001);
  }
  // One burst would put them all in one 50 ms slot; uniform over 500 ms puts ~20 in each.
  assert.ok(s.busiest <= N * 0.25, report);
  assert.ok(s.p90 - s.p10 >= 250, report);
  assert.ok(s.max - s.min <= 500 + 250, report);
});

test(`${N} clients never come back before the reconnect hint`, async (t) => {
  const { cs } = await drainOnce(t, ["--reconnect-jitter", "1000-1000"]);
  const waits = cs.map((c) => c.attempts[1] - c.hints[0].at);
  const s = spread(waits, 50);
  const report = `reconnect after the 1000 ms hint (ms): min ${s.min.toFixed(0)} p10 ${s.p10.toFixed(0)} p50 ${s.p50.toFixed(0)} p90 ${s.p90.toFixed(0)} max ${s.max.toFixed(0)}; busiest 50 ms holds ${s.busiest}`;
  t.diagnostic(report);
  assert.ok(s.min >= 1000, report);
  assert.ok(s.max <= 1000 + 500 + 250, report);
  assert.ok(s.busiest <= N * 0.25, report);
});
