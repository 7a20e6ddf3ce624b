// Test helpers: the real herald binary on loopback ports, Chromium through playwright-core,
// HS256 tokens, publishing over HTTP. Every wait is bounded; every process started here is
// stopped by its PID.

import { spawn, execFileSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const CLIENT_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const REPO = path.resolve(CLIENT_DIR, "..");
export const ARTIFACTS = path.join(CLIENT_DIR, "test-artifacts");

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Poll `ok` until it is truthy or `ms` pass; returns its last value. */
export async function until(ok, ms, what = "condition", step = 25) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    const v = await ok();
    if (v) return v;
    await sleep(step);
  }
  const v = await ok();
  if (!v) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
  return v;
}

export function heraldBin() {
  const bin = process.env.HERALD_BIN || path.join(REPO, "target", "debug", "herald");
  if (!existsSync(bin)) {
    throw new Error(`herald binary not found at ${bin}: run cargo build (or set HERALD_BIN)`);
  }
  return bin;
}

let help;
/** Whether this herald binary has `flag` (the server grows flags while the client is built). */
export function heraldHas(flag) {
  help ??= execFileSync(heraldBin(), ["--help"], { encoding: "utf8" });
  return help.includes(flag);
}

// Ports below the kernel's ephemeral range, so no outgoing connection can take one between
// our check and herald's bind; each call moves on, so the tests never share one.
const LOW = 10000;
const HIGH = (() => {
  try {
    return Number(readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").split(/\s+/)[0]) || 32768;
  } catch {
    return 32768;
  }
})();
let next = LOW + ((process.pid * 7919) % (HIGH - LOW - 100));

function bindable(port) {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once("error", () => resolve(false));
    s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
  });
}

export async function freePort() {
  for (let i = 0; i < 2000; i++) {
    next = next + 1 >= HIGH ? LOW : next + 1;
    if (await bindable(next)) return next;
  }
  throw new Error("no free loopback port");
}

const running = new Set();
process.on("exit", () => {
  for (const h of running) {
    try {
      process.kill(h.pid, "SIGKILL");
    } catch {
      // gone
    }
  }
});

/** Start herald on 127.0.0.1:port with `args`; resolves once /health answers. */
export async function startHerald(args = [], { port } = {}) {
  port ??= await freePort();
  const proc = spawn(heraldBin(), ["--listen", `127.0.0.1:${port}`, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "info" },
  });
  const h = {
    proc,
    pid: proc.pid,
    port,
    http: `http://127.0.0.1:${port}`,
    ws: `ws://127.0.0.1:${port}/ws`,
    log: "",
    exited: null,
  };
  const keep = (d) => {
    h.log += d;
    if (h.log.length > 1 << 20) h.log = h.log.slice(-(1 << 19));
  };
  proc.stdout.on("data", keep);
  proc.stderr.on("data", keep);
  h.exit = new Promise((resolve) =>
    proc.once("exit", (code, signal) => {
      running.delete(h);
      h.exited = { code, signal };
      resolve(h.exited);
    }),
  );
  running.add(h);
  try {
    await until(async () => {
      if (h.exited) throw new Error(`herald exited at start (${JSON.stringify(h.exited)}):\n${h.log}`);
      try {
        const r = await fetch(`${h.http}/health`);
        return r.ok;
      } catch {
        return false;
      }
    }, 10000, `herald on port ${port}`);
  } catch (e) {
    await stop(h, "SIGKILL");
    throw e;
  }
  return h;
}

/** Send `signal` to herald by PID and wait (bounded) for it to exit; SIGKILL if it won't. */
export async function stop(h, signal = "SIGTERM", ms = 15000) {
  if (!h || h.exited) return h?.exited;
  try {
    process.kill(h.pid, signal);
  } catch {
    // already gone
  }
  let timer;
  const late = new Promise((r) => (timer = setTimeout(() => r("timeout"), ms)));
  const outcome = await Promise.race([h.exit, late]);
  clearTimeout(timer);
  if (outcome === "timeout") {
    try {
      process.kill(h.pid, "SIGKILL");
    } catch {
      // gone
    }
    await h.exit;
    throw new Error(`herald ${h.pid} did not exit within ${ms} ms of ${signal}:\n${h.log.slice(-4000)}`);
  }
  return h.exited;
}

/** POST /publish; resolves to herald's JSON reply, or throws with the status. */
export async function publish(h, topic, data) {
  const r = await fetch(`${h.http}/publish`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ topic, data }),
  });
  const text = await r.text();
  if (!r.ok) throw Object.assign(new Error(`publish: ${r.status} ${text.trim()}`), { status: r.status });
  return JSON.parse(text);
}

const b64url = (b) => Buffer.from(b).toString("base64url");

/** An HS256 JWT signed with `secret`. */
export function mintToken(secret, claims) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

export function tempDir(prefix) {
  return mkdtempSync(path.join(os.tmpdir(), prefix));
}

export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

/**
 * Debian's Chromium, headless, with a fresh profile; never a downloaded browser. Returns
 * a persistent context (its pages) and a `close` that also removes the profile.
 */
export async function launchChromium() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} not found: install the Debian package chromium (apt-get install chromium)`);
  }
  const { chromium } = await import("playwright-core");
  const profile = tempDir("herald-chromium-");
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1200, height: 800 },
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  return {
    context,
    async close() {
      await context.close().catch(() => {});
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** Collect a page's console errors and page errors, for failure messages. */
export function watchPage(page) {
  const out = [];
  page.on("console", (m) => {
    // Browsers ask every site for /favicon.ico; herald has none.
    if (m.location().url.endsWith("/favicon.ico")) return;
    if (m.type() === "error" || m.type() === "warning") out.push(`console.${m.type()}: ${m.text()}`);
  });
  page.on("pageerror", (e) => out.push(`pageerror: ${e.message}`));
  return out;
}

/**
 * An application's web server on its own loopback port, as in a deployment behind one
 * origin: it serves `pages` ({"/path": html}) itself and passes /herald.js and WebSocket
 * upgrades on /ws through to herald, byte for byte.
 */
export async function appServer(h, pages) {
  const http = await import("node:http");
  const sockets = new Set();
  const server = http.createServer(async (req, res) => {
    if (pages[req.url] !== undefined) {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      return res.end(pages[req.url]);
    }
    if (req.url === "/herald.js") {
      const r = await fetch(`${h.http}/herald.js`);
      res.writeHead(r.status, { "content-type": r.headers.get("content-type") });
      return res.end(Buffer.from(await r.arrayBuffer()));
    }
    res.writeHead(404).end();
  });
  server.on("upgrade", (req, client, head) => {
    const upstream = net.connect(h.port, "127.0.0.1", () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
      upstream.write(lines.join("\r\n") + "\r\n\r\n");
      upstream.write(head);
      upstream.pipe(client);
      client.pipe(upstream);
    });
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("error", () => {});
      s.on("close", () => {
        sockets.delete(s);
        client.destroy();
        upstream.destroy();
      });
    }
  });
  const port = await freePort();
  await new Promise((resolve) => server.listen(port, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${port}`,
    async close() {
      for (const s of sockets) s.destroy();
      const closed = new Promise((r) => server.close(r));
      server.closeAllConnections(); // the browser's idle keep-alive ones too
      await closed;
    },
  };
}
