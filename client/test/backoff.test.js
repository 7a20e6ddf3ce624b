// The reconnect schedule: full-jitter exponential backoff between minDelay and maxDelay,
// reset after a stable connection.

import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Herald, backoffDelay } from "../herald.js";
import { FakeHerald } from "./fake.js";
import { until } from "./helpers.js";

test("every delay lies in [minDelay, min(maxDelay, minDelay * 2^(n+1))]", () => {
  for (const [min, max] of [[500, 30000], [100, 1000], [0, 50], [250, 250]]) {
    for (let n = 0; n < 30; n++) {
      const ceiling = Math.min(max, Math.max(min, 1) * 2 ** (n + 1));
      for (let i = 0; i < 500; i++) {
        const d = backoffDelay(n, min, max);
        assert.ok(d >= min && d <= ceiling && d <= max, `attempt ${n}: ${d} outside [${min}, ${ceiling}]`);
      }
      // The extremes of the random source are the bounds themselves.
      assert.equal(backoffDelay(n, min, max, () => 0), min);
      assert.equal(backoffDelay(n, min, max, () => 1), ceiling);
    }
  }
  // Defaults: 0.5 s and 30 s; silly attempt numbers are clamped, never NaN or Infinity.
  assert.equal(backoffDelay(0, undefined, undefined, () => 1), 1000);
  assert.equal(backoffDelay(1e9, undefined, undefined, () => 1), 30000);
  assert.equal(backoffDelay(-3, undefined, undefined, () => 0), 500);
  assert.equal(backoffDelay(NaN, undefined, undefined, () => 1), 1000);
});

test("the jitter spreads delays evenly over the whole window", () => {
  for (const n of [0, 3, 10]) {
    const min = 500;
    const ceiling = Math.min(30000, min * 2 ** (n + 1));
    const buckets = new Array(10).fill(0);
    const N = 20000;
    let sum = 0;
    for (let i = 0; i < N; i++) {
      const d = backoffDelay(n);
      sum += d;
      buckets[Math.min(9, Math.floor(((d - min) / (ceiling - min)) * 10))]++;
    }
    // Uniform: each tenth of the window holds about 10% (8-12% allowed at N = 20000).
    for (const [i, b] of buckets.entries()) {
      assert.ok(b > N * 0.08 && b < N * 0.12, `attempt ${n}: bucket ${i} holds ${b} of ${N}: ${buckets}`);
    }
    const mean = sum / N;
    assert.ok(Math.abs(mean - (min + ceiling) / 2) < (ceiling - min) * 0.02, `attempt ${n}: mean ${mean}`);
  }
});

test("the window doubles per attempt up to maxDelay", () => {
  const top = (n) => backoffDelay(n, 500, 30000, () => 1);
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 7].map(top), [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
});

test("options are checked", () => {
  assert.throws(() => new Herald("ws://127.0.0.1:1/ws", { WebSocket, minDelay: -1 }), /minDelay/);
  assert.throws(() => new Herald("ws://127.0.0.1:1/ws", { WebSocket, minDelay: 10, maxDelay: 5 }), /maxDelay/);
  assert.throws(() => new Herald("ws://127.0.0.1:1/ws", { WebSocket: undefined }).close(), /WebSocket/);
});

test("consecutive failures grow the delay; a stable connection resets it", async () => {
  // Each connection is closed by the server 20 ms after it opens, until `hold` is set.
  let hold = false;
  const fake = await new FakeHerald({
    onConnection: (c) => {
      if (!hold) setTimeout(() => c.ws.close(1011), 20);
    },
  }).start();
  const retries = [];
  const herald = new Herald(fake.url, { WebSocket, minDelay: 20, maxDelay: 400, stableAfter: 300 });
  herald.on("retry", (r) => retries.push(r));
  try {
    await until(() => retries.length >= 5, 10000, "5 retries");
    const first = retries.slice(0, 5);
    assert.deepEqual(first.map((r) => r.attempt), [1, 2, 3, 4, 5]);
    for (const [n, r] of first.entries()) {
      const ceiling = Math.min(400, 20 * 2 ** (n + 1));
      assert.ok(r.delay >= 20 && r.delay <= ceiling, `retry ${n}: ${r.delay} ms outside [20, ${ceiling}]`);
      assert.equal(r.hinted, false);
      assert.equal(r.code, 1011);
    }
    // Now a connection that stays up past stableAfter, then drops: back to attempt 1.
    hold = true;
    const conn = await fake.nextConnection(2000);
    await until(() => herald.state === "open", 2000, "open");
    await new Promise((r) => setTimeout(r, 400));
    const before = retries.length;
    conn.ws.close(1011);
    await until(() => retries.length > before, 2000, "a retry after the stable connection");
    const after = retries[before];
    assert.equal(after.attempt, 1, JSON.stringify(retries));
    assert.ok(after.delay >= 20 && after.delay <= 40, `reset delay ${after.delay}`);
  } finally {
    herald.close();
    await fake.stop();
  }
});
