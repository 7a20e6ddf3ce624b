// herald.js and the console page in Debian's Chromium (headless, through playwright-core),
// against the real herald binary, which serves both from its embedded copies.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, readFileSync } from "node:fs";
import path from "node:path";
import {
  ARTIFACTS,
  appServer,
  CLIENT_DIR,
  REPO,
  launchChromium,
  mintToken,
  publish,
  sleep,
  startHerald,
  stop,
  tempDir,
  until,
  watchPage,
} from "./helpers.js";

let browser;
before(async () => {
  browser = await launchChromium();
});
after(async () => {
  await browser?.close();
});

// A document on herald's own origin (its /health text: a page served by Playwright's router
// would count as a public site, and Chromium's local network access checks would then block
// its WebSocket to 127.0.0.1), into which herald.js is imported from GET /herald.js.
async function testPage(h, { init } = {}) {
  const page = await browser.context.newPage();
  const problems = watchPage(page);
  if (init) await init(page);
  await page.goto(`${h.http}/health`);
  await page.evaluate(async () => {
    const { Herald } = await import("/herald.js");
    const seen = { messages: [], states: [], gaps: [], errors: [], retries: [] };
    window.seen = seen;
    window.open_ = (topic, options = {}) => {
      const h = new Herald("/ws", options);
      h.on("state", (s) => seen.states.push(s));
      h.on("gap", (topic, info) => seen.gaps.push({ topic, ...info }));
      h.on("error", (e) => seen.errors.push({ code: e.code, message: e.message, topic: e.topic }));
      h.on("retry", (r) => seen.retries.push(r));
      window.sub = h.subscribe(topic, (data, meta) => seen.messages.push({ data, ...meta }));
      window.herald = h;
    };
  });
  return { page, problems };
}

const seen = (page) => page.evaluate(() => window.seen);

test("herald serves this herald.js, and the console page", async () => {
  const h = await startHerald();
  try {
    const js = await fetch(`${h.http}/herald.js`);
    assert.equal(js.status, 200);
    assert.match(js.headers.get("content-type"), /^text\/javascript/);
    const served = Buffer.from(await js.arrayBuffer());
    const file = readFileSync(path.join(CLIENT_DIR, "herald.js"));
    assert.ok(served.equals(file), "the binary embeds a stale client/herald.js: rebuild herald (cargo build)");
    const page = await fetch(`${h.http}/`);
    const html = Buffer.from(await page.arrayBuffer());
    assert.ok(html.equals(readFileSync(path.join(CLIENT_DIR, "console.html"))), "stale client/console.html in the binary");
  } finally {
    await stop(h);
  }
});

test("the console page subscribes, shows messages from POST /publish, and publishes", async () => {
  const h = await startHerald(["--client-publish", "chat:*"]);
  const page = await browser.context.newPage();
  const problems = watchPage(page);
  try {
    await page.goto(`${h.http}/`);
    await page.waitForSelector('#state[data-state="open"]', { timeout: 10000 });
    assert.equal(await page.inputValue("#url"), `ws://127.0.0.1:${h.port}/ws`);
    const subscribe = async (topic) => {
      await page.fill("#topic", topic);
      await page.press("#topic", "Enter");
      await page.waitForSelector(`#topics li[data-topic="${topic}"]`);
      await page.waitForFunction((t) => window.heraldConsole.subs.get(t)?.sub.active, topic, { timeout: 5000 });
    };
    await subscribe("news");
    await subscribe("chat:room");
    const ids = [];
    for (const headline of ["hello", "herald is up", "third"]) ids.push((await publish(h, "news", { headline })).id);
    await page.waitForFunction(() => document.querySelectorAll("#log tr.message").length === 3, null, { timeout: 5000 });
    const rows = await page.$$eval("#log tr.message", (trs) => trs.map((tr) => [...tr.cells].slice(1).map((td) => td.textContent)));
    // Newest first.
    assert.deepEqual(rows.reverse(), [
      ["news", String(ids[0]), '{"headline":"hello"}'],
      ["news", String(ids[1]), '{"headline":"herald is up"}'],
      ["news", String(ids[2]), '{"headline":"third"}'],
    ]);
    assert.equal(await page.textContent('#topics li[data-topic="news"] .pos'), `#${ids[2]}`);
    assert.equal(await page.textContent("#count"), "3 messages");

    // Publish from the console where herald allows it, and see it arrive.
    await page.fill("#pub-topic", "chat:room");
    await page.fill("#pub-data", '{"text": "hi from the console"}');
    await page.click("#publish-form button");
    await page.waitForSelector("#pub-result.ok", { timeout: 5000 });
    await page.waitForFunction(() => [...document.querySelectorAll("#log tr.message")].some((tr) => tr.cells[1].textContent === "chat:room"), null, { timeout: 5000 });
    const chat = await page.$eval("#log tr.message", (tr) => [...tr.cells].slice(1).map((td) => td.textContent));
    assert.deepEqual(chat.slice(0, 1).concat(chat.slice(2)), ["chat:room", '{"text":"hi from the console"}']);

    // Where herald refuses, the console says so.
    await page.fill("#pub-topic", "news");
    await page.fill("#pub-data", "not allowed");
    await page.click("#publish-form button");
    await page.waitForSelector("#pub-result.bad", { timeout: 5000 });
    assert.match(await page.textContent("#pub-result"), /forbidden/);

    // Published data is shown as text, never as markup.
    await publish(h, "news", { headline: "<img src=x onerror=alert(1)>" });
    await page.waitForFunction(() => document.querySelectorAll("#log tr.message").length === 5, null, { timeout: 5000 });
    assert.equal(await page.$$eval("#log img", (x) => x.length), 0);

    mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: path.join(ARTIFACTS, "console.png"), fullPage: true });
    assert.deepEqual(problems, []);
  } finally {
    await page.close();
    await stop(h);
  }
});

test("500 messages across a SIGTERM restart with --state-dir: every id once, in order", async () => {
  const dir = tempDir("herald-state-");
  // History must reach back over the restart: ~100 publishes/s for up to ~3 s.
  const args = ["--state-dir", dir, "--drain-timeout", "5", "--history-size", "2000"];
  let h = await startHerald(args);
  const { page, problems } = await testPage(h);
  const accepted = []; // ids herald gave, in order
  let publisher;
  try {
    await page.evaluate(() => window.open_("feed"));
    await page.waitForFunction(() => window.sub.active, null, { timeout: 10000 });
    // The publisher runs all along: a publish refused or unanswered during the restart is
    // tried again until herald takes it, so 500 are taken in all.
    publisher = (async () => {
      for (let n = 1; n <= 500; n++) {
        for (let tries = 0; ; tries++) {
          assert.ok(tries < 1000, `publish ${n} never accepted`);
          try {
            const r = await publish(h, "feed", { n });
            accepted.push(r.id);
            break;
          } catch {
            await sleep(20);
          }
        }
        await sleep(8);
      }
    })();
    await until(() => accepted.length >= 150, 20000, "150 publishes");
    const exited = await stop(h, "SIGTERM");
    assert.equal(exited.code, 0, h.log.slice(-2000));
    const port = h.port;
    h = await startHerald(args, { port });
    await publisher;
    await page.waitForFunction(() => window.seen.messages.length >= 500, null, { timeout: 30000 }).catch(() => {});
    await sleep(200); // anything extra (a duplicate) would arrive now
    const s = await seen(page);
    const got = s.messages.map((m) => m.id);
    assert.equal(accepted.length, 500);
    const missing = accepted.filter((id) => !got.includes(id));
    assert.equal(got.length, 500, `received ${got.length} of 500; missing ${missing}; gaps ${JSON.stringify(s.gaps)}`);
    assert.deepEqual(got, accepted, "the page has every accepted id once, in order");
    assert.deepEqual(s.messages.map((m) => m.data.n), Array.from({ length: 500 }, (_, i) => i + 1));
    assert.equal(new Set(s.messages.map((m) => m.epoch)).size, 1, "one epoch: history survived");
    for (let i = 1; i < got.length; i++) assert.equal(got[i], got[i - 1] + 1, `ids one apart at ${i}`);
    assert.deepEqual(s.states, ["open", "reconnecting", "open"]);
    assert.equal(s.retries[0].code, 1001);
    assert.deepEqual(s.gaps, []);
    assert.deepEqual(s.errors, []);
    // A reconnect that comes before the new herald listens is refused, and Chromium logs
    // each refusal itself; anything else on the console is a problem.
    const refused = /WebSocket connection to .* failed: .*ERR_CONNECTION_REFUSED/;
    assert.deepEqual(problems.filter((p) => !refused.test(p)), []);
  } finally {
    await page.close();
    await stop(h);
  }
});

test("after kill -9 and a restart, the page gets gap, then the new epoch's messages", async () => {
  const dir = tempDir("herald-state-");
  let h = await startHerald(["--state-dir", dir]);
  const { page } = await testPage(h);
  try {
    await page.evaluate(() => window.open_("feed"));
    await page.waitForFunction(() => window.sub.active, null, { timeout: 10000 });
    for (let n = 1; n <= 5; n++) await publish(h, "feed", { n });
    await page.waitForFunction(() => window.seen.messages.length === 5, null, { timeout: 5000 });
    const before = await seen(page);
    await stop(h, "SIGKILL");
    h = await startHerald(["--state-dir", dir], { port: h.port });
    await page.waitForFunction(() => window.seen.gaps.length > 0 && window.sub.active, null, { timeout: 15000 });
    const last = before.messages.at(-1);
    const r = await publish(h, "feed", { n: 6 });
    await page.waitForFunction(() => window.seen.messages.length === 6, null, { timeout: 5000 });
    const s = await seen(page);
    assert.equal(s.gaps.length, 1);
    assert.equal(s.gaps[0].topic, "feed");
    assert.equal(s.gaps[0].reason, "epoch");
    assert.equal(s.gaps[0].since, last.id);
    assert.equal(s.gaps[0].epoch, last.epoch);
    assert.notEqual(s.gaps[0].newEpoch, last.epoch);
    const m = s.messages.at(-1);
    assert.deepEqual([m.data.n, m.id, m.epoch], [6, r.id, s.gaps[0].newEpoch]);
    assert.deepEqual(s.states, ["open", "reconnecting", "open"]);
  } finally {
    await page.close();
    await stop(h);
  }
});

test("Chromium negotiates permessage-deflate and reads the frame herald compressed once", async () => {
  const h = await startHerald();
  const { page, problems } = await testPage(h);
  try {
    // A plain WebSocket: herald.js leaves compression to the browser, which offers
    // permessage-deflate on every handshake.
    await page.evaluate(
      () =>
        new Promise((resolve, reject) => {
          window.zipped = { extensions: null, messages: [] };
          const ws = new WebSocket(`ws://${location.host}/ws?topics=zipped`);
          ws.onmessage = (e) => {
            const m = JSON.parse(e.data);
            window.zipped.messages.push(m);
            if (m.op === "subscribed") {
              window.zipped.extensions = ws.extensions;
              resolve();
            }
          };
          ws.onerror = () => reject(new Error("WebSocket error"));
        }),
    );
    const ext = await page.evaluate(() => window.zipped.extensions);
    assert.equal(ext, "permessage-deflate; server_no_context_takeover; client_no_context_takeover");
    const data = {
      rows: Array.from({ length: 12 }, (_, i) => ({ id: i, symbol: `SYM${i}`, bid: 100 + i, ask: 100.5 + i, venue: "XNYS" })),
    };
    assert.ok(JSON.stringify(data).length > 256, "over --compression-min-size");
    await publish(h, "zipped", data);
    await page.waitForFunction(() => window.zipped.messages.some((m) => m.op === "message"), null, { timeout: 5000 });
    const got = (await page.evaluate(() => window.zipped.messages)).find((m) => m.op === "message");
    assert.deepEqual(got.data, data);
    // It went compressed (RSV1): the page saw it only after Chromium inflated it.
    const metrics = await (await fetch(`${h.http}/metrics`)).text();
    assert.match(metrics, /^herald_deliveries_compressed_total 1$/m);
    assert.match(metrics, /^herald_websockets_deflate 1$/m);
    assert.deepEqual(problems, []);
  } finally {
    await page.close();
    await stop(h);
  }
});

/** A private topic fed all along while 3-second tokens expire and are replaced. */
async function privateTopicSurvives(options) {
  const secret = "browser-test-secret-0123456789ab";
  const h = await startHerald(["--token-secret", secret, "--private-topics", "user:*"]);
  const reasons = [];
  const { page, problems } = await testPage(h, {
    init: (p) =>
      p.exposeFunction("mint", (reason) => {
        reasons.push(reason);
        return mintToken(secret, { sub: "42", exp: Math.floor(Date.now() / 1000) + 3, topics: ["user:42"] });
      }),
  });
  const accepted = [];
  try {
    await page.evaluate((o) => window.open_("user:42", { ...o, token: ({ reason }) => window.mint(reason) }), options);
    await page.waitForFunction(() => window.sub.active, null, { timeout: 10000 });
    const end = Date.now() + 8000; // past two expiries
    while (Date.now() < end) {
      accepted.push((await publish(h, "user:42", { n: accepted.length + 1 })).id);
      await sleep(40);
    }
    await page.waitForFunction((n) => window.seen.messages.length >= n, accepted.length, { timeout: 10000 }).catch(() => {});
    await sleep(200);
    const s = await seen(page);
    assert.deepEqual(s.messages.map((m) => m.id), accepted, "every message on the private topic once, in order");
    assert.deepEqual(s.gaps, []);
    assert.deepEqual(s.states, ["open"], "the connection itself stayed up");
    return { reasons, s, problems };
  } finally {
    await page.close();
    await stop(h);
  }
}

test("a private topic with a token callback: refreshed before exp, nothing lost", async () => {
  const { reasons, s, problems } = await privateTopicSurvives({});
  assert.equal(reasons[0], "connect");
  assert.ok(reasons.filter((r) => r === "refresh").length >= 2, `token calls: ${reasons}`);
  assert.ok(!reasons.includes("expired"), `token calls: ${reasons}`);
  assert.deepEqual(s.errors, []);
  assert.deepEqual(problems, []);
});

test("a private topic with a token callback survives expiry: token_expired, refresh, resume", async () => {
  const { reasons, s } = await privateTopicSurvives({ refreshBefore: false });
  assert.equal(reasons[0], "connect");
  assert.ok(reasons.filter((r) => r === "expired").length >= 2, `token calls: ${reasons}`);
  assert.deepEqual(s.errors, []);
});

test("the browser's online event reconnects at once, whatever the backoff", async () => {
  let h = await startHerald();
  const { page } = await testPage(h);
  try {
    await page.evaluate(() => window.open_("feed", { minDelay: 20000, maxDelay: 30000 }));
    await page.waitForFunction(() => window.sub.active, null, { timeout: 10000 });
    await stop(h, "SIGKILL");
    await page.waitForFunction(() => window.herald.state === "reconnecting", null, { timeout: 5000 });
    const { delay } = (await seen(page)).retries[0];
    assert.ok(delay >= 20000, `backoff ${delay}`);
    h = await startHerald([], { port: h.port });
    const t0 = Date.now();
    await page.evaluate(() => window.dispatchEvent(new Event("online")));
    await page.waitForFunction(() => window.herald.state === "open" && window.sub.active, null, { timeout: 5000 });
    assert.ok(Date.now() - t0 < 3000, `back after ${Date.now() - t0} ms`);
    const r = await publish(h, "feed", "after");
    await page.waitForFunction((id) => window.seen.messages.some((m) => m.id === id), r.id, { timeout: 5000 });
  } finally {
    await page.close();
    await stop(h);
  }
});

test("the README's example page works as printed", async () => {
  const example = readFileSync(path.join(CLIENT_DIR, "example.html"), "utf8");
  const readme = readFileSync(path.join(REPO, "README.md"), "utf8");
  assert.ok(readme.includes(example.trim()), "README.md must contain client/example.html verbatim");
  const h = await startHerald(["--client-publish", "chat:*"]);
  const app = await appServer(h, { "/": example });
  const page = await browser.context.newPage();
  const problems = watchPage(page);
  try {
    await page.goto(`${app.url}/`);
    await page.waitForFunction(() => document.getElementById("state").textContent === "open", null, { timeout: 10000 });
    await until(async () => (await publish(h, "news", { headline: "it works" })).delivered > 0, 5000, "a news subscriber");
    await page.waitForFunction(() => document.querySelector("#news li")?.textContent.endsWith("it works"), null, { timeout: 5000 });
    await page.fill("#text", "hello lobby");
    await page.press("#text", "Enter");
    await page.waitForFunction(() => document.querySelector("#lobby li")?.textContent === "hello lobby", null, { timeout: 5000 });
    assert.deepEqual(problems, []);
  } finally {
    await page.close();
    await app.close();
    await stop(h);
  }
});
