// herald.js in Node (the `ws` package as its WebSocket): delivery, resume, gaps, the
// reconnect hint, dead connections, publishing online and offline, tokens, and callbacks
// that throw. Against the scripted FakeHerald where a behaviour must be forced, against the
// real binary where it can be shown.

import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Herald, HeraldError } from "../herald.js";
import { FakeHerald } from "./fake.js";
import { freePort, mintToken, publish, sleep, startHerald, stop, until } from "./helpers.js";

const fast = { WebSocket, minDelay: 20, maxDelay: 200 };

function collect(herald, topic) {
  const got = [];
  const sub = herald.subscribe(topic, (data, meta) => got.push({ data, ...meta }));
  return { got, sub };
}

test("each id once and in order: duplicates are dropped, a hole is a gap", async () => {
  const fake = await new FakeHerald().start();
  const herald = new Herald(fake.url, fast);
  const gaps = [];
  herald.on("gap", (topic, info) => gaps.push({ topic, ...info }));
  try {
    const { got, sub } = collect(herald, "t");
    const conn = await fake.nextConnection();
    await until(() => sub.active, 2000, "subscribed");
    for (const id of [1, 2, 2, 3, 1, 4]) fake.message(conn, "t", id);
    fake.message(conn, "other", 9); // not subscribed: ignored
    await until(() => got.length >= 4, 2000, "4 messages");
    fake.message(conn, "t", 7); // 5 and 6 never came
    await until(() => got.length >= 5, 2000, "the 5th message");
    assert.deepEqual(got.map((m) => m.id), [1, 2, 3, 4, 7]);
    assert.deepEqual(got[0], { data: 1, topic: "t", id: 1, epoch: "e1" });
    assert.equal(herald.stats.duplicates, 2);
    assert.deepEqual(gaps, [{ topic: "t", reason: "missed", since: 4, id: 7, epoch: "e1" }]);
  } finally {
    herald.close();
    await fake.stop();
  }
});

test("a reconnect resumes with since/epoch; recovered:false is a gap, and ids start over", async () => {
  const fake = await new FakeHerald().start();
  const herald = new Herald(fake.url, fast);
  const gaps = [];
  const states = [];
  herald.on("gap", (topic, info) => gaps.push({ topic, ...info }));
  herald.on("state", (s) => states.push(s));
  try {
    const { got, sub } = collect(herald, "t");
    let conn = await fake.nextConnection();
    await fake.opOn(conn, (o) => o.op === "subscribe");
    await sleep(50);
    for (const id of [1, 2, 3]) fake.message(conn, "t", id);
    await until(() => got.length === 3, 2000, "3 messages");
    assert.deepEqual(sub.position, { epoch: "e1", id: 3 });

    // The server goes away; the client resumes, the server replays 3 (a duplicate) to 5.
    fake.last = 5;
    conn.ws.close(1001);
    conn = await fake.nextConnection();
    const resume = await fake.opOn(conn, (o) => o.op === "subscribe");
    assert.deepEqual(resume, { op: "subscribe", topic: "t", since: 3, epoch: "e1" });
    await sleep(50);
    for (const id of [3, 4, 5, 6]) fake.message(conn, "t", id);
    await until(() => got.length === 6, 2000, "6 messages");
    assert.deepEqual(got.map((m) => m.id), [1, 2, 3, 4, 5, 6]);
    assert.deepEqual(gaps, []);

    // A server that lost its history (new epoch): gap, then the new epoch's ids from 1.
    fake.onOp = (c, op) => {
      if (op.op !== "subscribe") return false;
      fake.send(c, { op: "subscribed", topic: "t", epoch: "e2", id: 2, recovered: false });
      fake.message(c, "t", 1, "new-1");
      fake.message(c, "t", 2, "new-2");
      return true;
    };
    conn.ws.close(1001);
    conn = await fake.nextConnection();
    assert.deepEqual(await fake.opOn(conn, (o) => o.op === "subscribe"), { op: "subscribe", topic: "t", since: 6, epoch: "e1" });
    await until(() => got.length === 8, 2000, "the new epoch's messages");
    fake.message(conn, "t", 3, "new-3");
    await until(() => got.length === 9, 2000, "a live message in the new epoch");
    assert.deepEqual(gaps, [{ topic: "t", reason: "epoch", since: 6, epoch: "e1", newEpoch: "e2", id: 2 }]);
    assert.deepEqual(got.slice(6).map((m) => [m.id, m.epoch, m.data]), [[1, "e2", "new-1"], [2, "e2", "new-2"], [3, "e2", "new-3"]]);
    assert.deepEqual(states, ["open", "reconnecting", "open", "reconnecting", "open"]);
  } finally {
    herald.close();
    await fake.stop();
  }
});

test("the reconnect hint: never back before after_ms", async () => {
  const fake = await new FakeHerald().start();
  const herald = new Herald(fake.url, { ...fast, minDelay: 50 });
  const retries = [];
  herald.on("retry", (r) => retries.push(r));
  try {
    const conn = await fake.nextConnection();
    await until(() => herald.state === "open", 2000, "open");
    const next = fake.nextConnection(5000);
    const sent = Date.now();
    fake.send(conn, { op: "reconnect", after_ms: 700 });
    conn.ws.close(1001);
    const again = await next;
    const waited = again.at - sent;
    assert.ok(waited >= 700, `came back after ${waited} ms, before the 700 ms hint`);
    assert.ok(waited < 700 + 50 + 300, `came back only after ${waited} ms`);
    assert.equal(retries.length, 1);
    assert.equal(retries[0].hinted, true);
    assert.equal(retries[0].code, 1001);
  } finally {
    herald.close();
    await fake.stop();
  }
});

test("a connection that goes silent is detected by ping and replaced", async () => {
  const fake = await new FakeHerald().start();
  const herald = new Herald(fake.url, { ...fast, idleTimeout: 200, pongTimeout: 200 });
  const retries = [];
  herald.on("retry", (r) => retries.push(r));
  try {
    const { got } = collect(herald, "t");
    const conn = await fake.nextConnection();
    await until(() => herald.state === "open", 2000, "open");
    await sleep(50);
    fake.message(conn, "t", 1);
    // While herald answers, idle probes are answered and nothing happens.
    await sleep(700);
    assert.equal(fake.conns.length, 1);
    assert.ok(conn.ops.filter((o) => o.op === "ping").length >= 3, "idle probes were sent");
    // Now the peer answers nothing and never closes: the client must give up on it.
    fake.silent = true;
    const silentAt = Date.now();
    const next = fake.nextConnection(3000);
    const again = await next;
    fake.silent = false;
    const took = again.at - silentAt;
    assert.ok(took >= 200 && took < 1500, `replaced after ${took} ms`);
    assert.equal(retries[0].reason, "no answer to ping");
    assert.equal(retries[0].code, 1006);
    await until(() => herald.state === "open", 2000, "open again");
    // It resumed where it was.
    assert.deepEqual(await fake.opOn(again, (o) => o.op === "subscribe"), { op: "subscribe", topic: "t", since: 1, epoch: "e1" });
    assert.deepEqual(got.map((m) => m.id), [1]);
  } finally {
    herald.close();
    await fake.stop();
  }
});

test("offline publishes are queued up to publishQueue, sent in order on connect, and the rest rejected", async () => {
  const port = await freePort(); // nothing listens yet
  const herald = new Herald(`ws://127.0.0.1:${port}/ws`, { ...fast, publishQueue: 2 });
  const errors = [];
  herald.on("error", (e) => errors.push(e));
  let fake;
  try {
    const p1 = herald.publish("chat", { n: 1 });
    const p2 = herald.publish("chat", { n: 2 });
    const p3 = herald.publish("chat", { n: 3 });
    await assert.rejects(p3, (e) => e instanceof HeraldError && e.code === "queue_full" && e.topic === "chat");
    await assert.rejects(herald.publish("bad topic", 1), { code: "bad_topic" });
    await assert.rejects(herald.publish("chat", undefined), { code: "bad_data" });
    fake = await new FakeHerald({ port }).start();
    await Promise.all([p1, p2]);
    const sent = fake.ops.filter((o) => o.op === "publish").map((o) => o.data.n);
    assert.deepEqual(sent, [1, 2]);
    // Online, a publish goes at once.
    await herald.publish("chat", { n: 4 });
    assert.deepEqual(fake.ops.filter((o) => o.op === "publish").map((o) => o.data.n), [1, 2, 4]);
    // One the server never confirms (no pong) is rejected when the connection drops.
    fake.silent = true;
    const p5 = herald.publish("chat", { n: 5 });
    await until(() => fake.ops.some((o) => o.op === "publish" && o.data.n === 5), 2000, "publish 5");
    fake.conns[0].ws.close(1011);
    await assert.rejects(p5, { code: "connection_lost" });
    fake.silent = false;
    // close() rejects what waits.
    herald.close();
    await assert.rejects(herald.publish("chat", 6), { code: "closed" });
    assert.deepEqual(errors, []);
  } finally {
    herald.close();
    await fake?.stop();
  }
});

test("publishQueue: 0 rejects offline publishes at once", async () => {
  const port = await freePort();
  const herald = new Herald(`ws://127.0.0.1:${port}/ws`, { ...fast, publishQueue: 0 });
  try {
    await assert.rejects(herald.publish("chat", 1), { code: "queue_full" });
  } finally {
    herald.close();
  }
});

test("against herald: an allowed publish resolves and arrives; a refused one rejects with forbidden", async () => {
  const h = await startHerald(["--client-publish", "chat:*"]);
  const herald = new Herald(h.ws, fast);
  const errors = [];
  herald.on("error", (e) => errors.push(e));
  try {
    const { got } = collect(herald, "chat:1");
    await until(() => herald.state === "open", 5000, "open");
    await herald.publish("chat:1", { text: "hi" });
    await until(() => got.length === 1, 2000, "the message");
    assert.deepEqual(got[0].data, { text: "hi" });
    const refused = herald.publish("news", { text: "no" });
    await assert.rejects(refused, (e) => e.code === "forbidden" && e.topic === "news" && e.op === "publish");
    assert.equal(errors.length, 1);
    assert.equal(errors[0].code, "forbidden");
    // The refusal was attributed to the right op: later publishes still resolve.
    await Promise.all([herald.publish("chat:1", 2), herald.publish("chat:1", 3)]);
    await until(() => got.length === 3, 2000, "two more");
  } finally {
    herald.close();
    await stop(h);
  }
});

test("against herald: a callback that throws is reported through error, and delivery goes on", async () => {
  const h = await startHerald();
  const herald = new Herald(h.ws, fast);
  const errors = [];
  herald.on("error", (e) => errors.push(e));
  herald.on("state", () => {
    throw new Error("state listener bug");
  });
  try {
    const got = [];
    herald.subscribe("t", (data) => {
      got.push(data);
      if (data === 2) throw new Error("boom");
    });
    herald.subscribe("t", async (data) => {
      if (data === 3) throw new Error("async boom");
    });
    await until(() => herald.state === "open", 5000, "open");
    await sleep(100);
    for (const n of [1, 2, 3, 4]) await publish(h, "t", n);
    await until(() => got.length === 4, 2000, "4 messages");
    await until(() => errors.length >= 3, 2000, "3 errors");
    assert.deepEqual(got, [1, 2, 3, 4]);
    assert.deepEqual(errors.map((e) => [e.code, e.cause?.message]), [
      ["callback", "state listener bug"],
      ["callback", "boom"],
      ["callback", "async boom"],
    ]);
  } finally {
    herald.close();
    await stop(h);
  }
});

test("against herald: a private topic without a grant is refused with its topic; an auth with a token opens it", async () => {
  const secret = "a-test-secret-of-32-bytes-long!!";
  const h = await startHerald(["--token-secret", secret, "--private-topics", "user:*"]);
  let grant = false;
  const herald = new Herald(h.ws, {
    ...fast,
    // A 4 s token is refreshed at half its life, 2 s in.
    token: async () => mintToken(secret, { sub: "42", exp: Math.floor(Date.now() / 1000) + 4, topics: grant ? ["user:42"] : [] }),
  });
  const errors = [];
  herald.on("error", (e) => errors.push(e));
  try {
    const { got } = collect(herald, "user:42");
    await until(() => errors.length === 1, 5000, "the refusal");
    assert.equal(errors[0].code, "forbidden");
    assert.equal(errors[0].topic, "user:42");
    assert.equal(errors[0].op, "subscribe");
    grant = true; // the refreshed token covers the topic: the client asks again
    await until(async () => {
      await publish(h, "user:42", "hello");
      return got.length > 0;
    }, 8000, "a message on the private topic");
    assert.equal(got[0].data, "hello");
  } finally {
    herald.close();
    await stop(h);
  }
});

test("a token function that fails is reported, and the client retries", async () => {
  const fake = await new FakeHerald().start();
  let calls = 0;
  const herald = new Herald(fake.url, {
    ...fast,
    token: () => {
      calls++;
      if (calls < 3) throw new Error("auth service down");
      return "t.e.st";
    },
  });
  const errors = [];
  herald.on("error", (e) => errors.push(e));
  try {
    const conn = await fake.nextConnection();
    assert.equal(new URL(conn.url, "ws://x").searchParams.get("token"), "t.e.st");
    assert.deepEqual(errors.map((e) => [e.code, e.cause?.message]), [
      ["token_failed", "auth service down"],
      ["token_failed", "auth service down"],
    ]);
  } finally {
    herald.close();
    await fake.stop();
  }
});

test("against herald: unsubscribe stops delivery; subscribing again at once is not confused by the old answers", async () => {
  const h = await startHerald();
  const herald = new Herald(h.ws, fast);
  try {
    const a = collect(herald, "t");
    const b = collect(herald, "t"); // two callbacks, one server subscription
    await until(() => a.sub.active && b.sub.active, 5000, "subscribed");
    await publish(h, "t", 1);
    await until(() => a.got.length === 1 && b.got.length === 1, 2000, "both callbacks");
    b.sub.unsubscribe();
    assert.equal(b.sub.active, false);
    await publish(h, "t", 2);
    await until(() => a.got.length === 2, 2000, "the remaining callback");
    a.sub.unsubscribe();
    assert.deepEqual(herald.topics, []);
    const c = collect(herald, "t"); // subscribe, unsubscribe and subscribe are all in flight
    await until(() => c.sub.active, 5000, "subscribed again");
    const r = await publish(h, "t", 3);
    assert.equal(r.delivered, 1);
    await until(() => c.got.length === 1, 2000, "the new subscription");
    await sleep(100);
    assert.deepEqual([a.got.length, b.got.length, c.got.map((m) => m.data)], [2, 1, [3]]);
  } finally {
    herald.close();
    await stop(h);
  }
});

test("close() from inside a callback is safe, and final", async () => {
  const h = await startHerald();
  const herald = new Herald(h.ws, fast);
  const states = [];
  const errors = [];
  herald.on("state", (s) => states.push(s));
  herald.on("error", (e) => errors.push(e));
  try {
    const got = [];
    const sub = herald.subscribe("t", (data) => {
      got.push(data);
      herald.close();
    });
    await until(() => sub.active, 5000, "subscribed");
    await publish(h, "t", 1);
    await until(() => herald.state === "closed", 2000, "closed");
    await publish(h, "t", 2);
    await sleep(300);
    assert.deepEqual(got, [1]);
    assert.deepEqual(states, ["open", "closed"]);
    assert.deepEqual(errors, []);
    assert.throws(() => herald.subscribe("u", () => {}), /closed/);
  } finally {
    herald.close();
    await stop(h);
  }
});

test("an unknown epoch (\"\", Redis down) takes the first id as it comes; its resume is a gap", async () => {
  const fake = await new FakeHerald().start();
  fake.epoch = "";
  const herald = new Herald(fake.url, fast);
  const gaps = [];
  herald.on("gap", (topic, info) => gaps.push(info.reason));
  try {
    const { got, sub } = collect(herald, "t");
    let conn = await fake.nextConnection();
    await until(() => sub.active, 2000, "subscribed");
    for (const id of [5000, 5001]) fake.message(conn, "t", id);
    await until(() => got.length === 2, 2000, "2 messages");
    assert.deepEqual(gaps, []);
    fake.epoch = "e9";
    fake.onOp = (c, op) => {
      if (op.op !== "subscribe") return false;
      fake.send(c, { op: "subscribed", topic: "t", epoch: "e9", id: 5003, recovered: false });
      return true;
    };
    conn.ws.close(1001);
    conn = await fake.nextConnection();
    assert.deepEqual(await fake.opOn(conn, (o) => o.op === "subscribe"), { op: "subscribe", topic: "t", since: 5001, epoch: "" });
    await until(() => gaps.length === 1, 2000, "the gap");
    assert.deepEqual(gaps, ["epoch"]);
  } finally {
    herald.close();
    await fake.stop();
  }
});
