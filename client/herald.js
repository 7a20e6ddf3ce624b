// herald.js: the client for herald, the WebSocket push server. One dependency-free ES
// module, for browsers and for Node (pass `WebSocket` from the `ws` package on Node < 22).
//
// It keeps one WebSocket open to herald's /ws and hides its failures: reconnects with
// full-jitter exponential backoff (never before the server's reconnect hint), resumes every
// topic with since/epoch so callbacks see each message exactly once and in id order,
// reports a `gap` when herald says something may be missing, detects dead connections with
// application pings, and refreshes tokens before they expire. Nothing a callback throws
// reaches the socket handlers: it is reported through the `error` event.
//
// Wire protocol: README.md, "Protocol" and "Browser client". Every op that may fail is
// followed by {"op":"ping"}: herald answers ops in order, so an error that arrives before
// that op's pong is the op's own. This is how a client publish is confirmed or refused.

const TOPIC = /^[A-Za-z0-9_\-.:@/]{1,200}$/;
const HINT_CAP = 600000; // ms: the longest reconnect hint we obey

// Intervals and the hint run on a monotonic clock with sub-millisecond resolution: Date.now()
// floors to the millisecond and jumps with the wall clock, so a hint timed by it can end early.
const clock = () => (globalThis.performance ? globalThis.performance.now() : Date.now());

const DEFAULTS = {
  minDelay: 500,
  maxDelay: 30000,
  stableAfter: 5000,
  idleTimeout: 30000, // herald pings after 25 s of silence, and browsers never show us those
  pongTimeout: 10000,
  connectTimeout: 10000,
  publishQueue: 100,
  refreshBefore: 30000,
};

/** An error with herald's code (`forbidden`, `token_expired`, ...) or one of the client's. */
export class HeraldError extends Error {
  constructor(code, message, extra) {
    super(message || code);
    this.name = "HeraldError";
    this.code = code;
    if (extra) Object.assign(this, extra);
  }
}

/**
 * The wait before reconnect attempt `attempt` (0 for the first after a loss): uniform in
 * [minDelay, min(maxDelay, minDelay * 2^(attempt+1))].
 */
export function backoffDelay(attempt, minDelay = DEFAULTS.minDelay, maxDelay = DEFAULTS.maxDelay, random = Math.random) {
  const n = Math.min(Math.max(0, Math.floor(attempt) || 0), 40);
  const ceiling = Math.min(maxDelay, Math.max(minDelay, 1) * 2 ** (n + 1));
  return Math.min(maxDelay, minDelay + random() * Math.max(0, ceiling - minDelay));
}

/** A JWT's `exp` in ms, or undefined. The signature is herald's business, not ours. */
function tokenExp(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part)).exp;
    return typeof exp === "number" ? exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}

export class Herald {
  #url;
  #o;
  #WS;
  #on = new Map(); // event name -> Set of listeners
  #topics = new Map(); // topic -> its state (see subscribe)
  #queue = []; // publishes made while offline
  #c = null; // the current connection attempt or connection
  #state = "connecting";
  #everOpen = false;
  #closed = false;
  #attempt = 0;
  #retry = 0; // timer
  #notBefore = 0; // the reconnect hint, on clock()
  #token;
  #tokenExp;
  #tokenAt = 0;
  #refreshTimer = 0;
  #refreshing = false;
  #online = () => this.#onOnline();
  #stats = { delivered: 0, duplicates: 0, gaps: 0, reconnects: 0 };

  /**
   * @param {string} url ws://host/ws (http(s):// and, in a page, a path like "/ws" work too)
   * @param {object} [options] see herald.d.ts
   */
  constructor(url, options = {}) {
    const o = { ...DEFAULTS, ...options };
    for (const k of Object.keys(DEFAULTS)) {
      if (k === "refreshBefore" && o[k] === false) continue;
      if (typeof o[k] !== "number" || !(o[k] >= 0)) throw new TypeError(`herald: option ${k} must be a number >= 0`);
    }
    if (o.maxDelay < o.minDelay) throw new TypeError("herald: maxDelay must be >= minDelay");
    this.#WS = o.WebSocket || globalThis.WebSocket;
    if (typeof this.#WS !== "function") {
      throw new TypeError("herald: no WebSocket implementation; pass { WebSocket } (e.g. from the ws package)");
    }
    const base = globalThis.location && globalThis.location.href;
    const u = new URL(url, base);
    u.protocol = u.protocol.replace(/^http/, "ws");
    this.#url = u.href;
    this.#o = o;
    if (typeof o.token === "string") this.#setToken(o.token);
    globalThis.addEventListener?.("online", this.#online);
    this.#connect();
  }

  /** "connecting" | "open" | "reconnecting" | "closed" */
  get state() {
    return this.#state;
  }

  /** The topics subscribed to. */
  get topics() {
    return [...this.#topics.keys()];
  }

  /** Counters: messages delivered, duplicates dropped, gaps reported, connections lost. */
  get stats() {
    return { ...this.#stats };
  }

  // ---- events ---------------------------------------------------------------------------

  /** Listen to "state", "gap", "error" or "retry"; returns a function that stops it. */
  on(event, fn) {
    if (typeof fn !== "function") throw new TypeError("herald: on() needs a function");
    if (!this.#on.has(event)) this.#on.set(event, new Set());
    this.#on.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this.#on.get(event)?.delete(fn);
  }

  #emit(event, ...args) {
    const set = this.#on.get(event);
    if (set) for (const fn of [...set]) this.#call(fn, event === "error", ...args);
  }

  #report(err) {
    if (this.#on.get("error")?.size) this.#emit("error", err);
    else globalThis.console?.warn?.("herald:", err);
  }

  /** Run a user callback; what it throws (or its promise rejects with) goes to `error`. */
  #call(fn, quiet, ...args) {
    const fail = (e) => {
      if (quiet) globalThis.console?.error?.("herald: an error listener failed:", e);
      else this.#report(new HeraldError("callback", `a callback threw: ${e && e.message ? e.message : e}`, { cause: e }));
    };
    try {
      const r = fn(...args);
      if (r && typeof r.then === "function") r.then(undefined, fail);
    } catch (e) {
      fail(e);
    }
  }

  #setState(s, info) {
    if (this.#state === s) return;
    this.#state = s;
    this.#emit("state", s, info || {});
  }

  // ---- topics ---------------------------------------------------------------------------

  /**
   * Call `callback(data, {topic, id, epoch})` for each message on `topic`, once each, in id
   * order. `options.since` and `options.epoch` resume from a position kept elsewhere.
   */
  subscribe(topic, callback, options = {}) {
    if (typeof topic !== "string" || !TOPIC.test(topic)) {
      throw new TypeError(`herald: bad topic name ${JSON.stringify(topic)} (1-200 of A-Z a-z 0-9 _ - . : @ /)`);
    }
    if (typeof callback !== "function") throw new TypeError("herald: subscribe() needs a callback");
    if ((options.since === undefined) !== (options.epoch === undefined)) {
      throw new TypeError("herald: since and epoch go together");
    }
    if (this.#closed) throw new Error("herald: closed");
    let t = this.#topics.get(topic);
    if (!t) {
      t = {
        topic,
        subs: new Map(), // subscription -> callback
        epoch: options.epoch,
        id: options.since,
        active: false, // subscribed on the current connection
        loose: false, // accept the next id even if it skips some (after a reported gap)
        seen: false, // was active once: a fresh subscribe now may have missed messages
        ended: null, // why herald ended it or refused it (token_expired, forbidden, ...)
      };
      this.#topics.set(topic, t);
      const c = this.#c;
      if (c && c.openedAt) this.#sendSubscribe(c, t);
    }
    const self = this;
    const sub = {
      topic,
      get active() {
        return self.#topics.get(topic) === t && t.subs.has(sub) && t.active;
      },
      /** Where this topic stands: pass it back as {since: id, epoch} to resume later. */
      get position() {
        return { epoch: t.epoch, id: t.id };
      },
      unsubscribe: () => this.#unsubscribe(t, sub),
    };
    t.subs.set(sub, callback);
    return sub;
  }

  #unsubscribe(t, sub) {
    t.subs.delete(sub);
    if (t.subs.size || this.#topics.get(t.topic) !== t) return;
    this.#topics.delete(t.topic);
    const c = this.#c;
    if (c && c.openedAt) this.#send(c, { op: "unsubscribe", topic: t.topic });
  }

  #sendSubscribe(c, t) {
    const op = { op: "subscribe", topic: t.topic };
    t.resume = t.epoch !== undefined;
    if (t.resume) {
      op.since = t.id || 0;
      op.epoch = t.epoch;
    }
    t.active = false;
    t.ended = null;
    // Answers to subscribes sent before this one (unsubscribed since) are not ours.
    c.subs.set(t.topic, (c.subs.get(t.topic) || 0) + 1);
    this.#send(c, op);
    this.#ping(c, { kind: "subscribe", topic: t.topic });
  }

  /** True when this answer (subscribed, or an error) is for the latest subscribe sent. */
  #answered(c, topic) {
    const left = (c.subs.get(topic) || 0) - 1;
    if (left > 0) c.subs.set(topic, left);
    else c.subs.delete(topic);
    return left === 0;
  }

  #onSubscribed(c, m) {
    const t = this.#topics.get(m.topic);
    if (!this.#answered(c, m.topic) || !t) return;
    const epoch = typeof m.epoch === "string" ? m.epoch : undefined;
    const position = typeof m.id === "number" ? m.id : undefined;
    let gap;
    if (t.resume) {
      if (epoch !== t.epoch || m.recovered === false) {
        gap = { reason: epoch === t.epoch ? "history" : "epoch", since: t.id, epoch: t.epoch };
      }
    } else if (t.seen) {
      gap = { reason: "no_resume", since: t.id, epoch: t.epoch };
    }
    if (gap) {
      // What herald replays now is all we can have: accept it, then ids one apart again.
      t.id = undefined;
      t.loose = true;
    } else if (!t.resume) {
      // Epoch "" (Redis down): herald cannot say where the topic stands; take what comes.
      t.id = epoch === "" ? undefined : position;
    }
    t.epoch = epoch;
    t.active = t.seen = true;
    if (gap) this.#gap(t, { ...gap, newEpoch: epoch, id: position });
  }

  #gap(t, info) {
    this.#stats.gaps++;
    this.#emit("gap", t.topic, info);
  }

  #onMessage(m) {
    const t = this.#topics.get(m.topic);
    if (!t || !t.active || typeof m.id !== "number") return;
    if (t.id !== undefined && m.id <= t.id) {
      this.#stats.duplicates++;
      return;
    }
    if (t.id !== undefined && !t.loose && m.id > t.id + 1) {
      this.#gap(t, { reason: "missed", since: t.id, id: m.id, epoch: t.epoch });
    }
    t.loose = false;
    t.id = m.id;
    this.#stats.delivered++;
    const meta = { topic: t.topic, id: m.id, epoch: t.epoch };
    for (const [s, fn] of [...t.subs]) if (t.subs.has(s)) this.#call(fn, false, m.data, meta);
  }

  #onUnsubscribed(c, m) {
    const t = this.#topics.get(m.topic);
    if (!t || !m.reason) return; // the answer to our own unsubscribe
    t.active = false;
    t.ended = m.reason;
    if (m.reason === "token_expired" && typeof this.#o.token === "function") {
      this.#refresh(c, "expired");
    } else {
      this.#report(new HeraldError(m.reason, `herald ended the subscription to ${m.topic} (${m.reason})`, { topic: m.topic, op: "subscribe" }));
    }
  }

  // ---- publishing -----------------------------------------------------------------------

  /**
   * Publish `data` to `topic` through the WebSocket (where herald allows client
   * publishes). Resolves once herald has taken it; rejects with a HeraldError: herald's
   * code (`forbidden`, ...), or `queue_full`, `connection_lost`, `closed`, `bad_topic`,
   * `bad_data`. While offline, up to `publishQueue` publishes wait for the connection.
   */
  publish(topic, data) {
    let entry;
    const p = new Promise((resolve, reject) => {
      entry = { kind: "publish", topic, resolve, reject };
    });
    p.catch(() => {}); // an ignored result is not an unhandled rejection
    const fail = (code, message) => {
      entry.reject(new HeraldError(code, message, { topic, op: "publish" }));
      return p;
    };
    if (this.#closed) return fail("closed", "herald: closed");
    if (typeof topic !== "string" || !TOPIC.test(topic)) return fail("bad_topic", `bad topic name ${JSON.stringify(topic)}`);
    try {
      entry.frame = JSON.stringify({ op: "publish", topic, data });
    } catch (e) {
      return fail("bad_data", `data is not JSON: ${e.message}`);
    }
    if (data === undefined) return fail("bad_data", "data is required");
    const c = this.#c;
    if (c && c.openedAt) this.#sendPublish(c, entry);
    else if (this.#queue.length < this.#o.publishQueue) this.#queue.push(entry);
    else return fail("queue_full", `not connected, and ${this.#o.publishQueue} publishes already wait`);
    return p;
  }

  #sendPublish(c, entry) {
    this.#sendRaw(c, entry.frame);
    this.#ping(c, entry);
  }

  // ---- the connection -------------------------------------------------------------------

  #connect() {
    if (this.#closed || this.#c) return;
    clearTimeout(this.#retry);
    this.#retry = 0;
    const wait = this.#notBefore - clock();
    if (wait > 0) {
      this.#retry = setTimeout(() => ((this.#retry = 0), this.#connect()), wait);
      return;
    }
    const c = { ws: null, pending: [], subs: new Map(), openedAt: 0, last: 0, hint: undefined };
    this.#c = c;
    c.timer = setTimeout(() => this.#lost(c, 1006, "connect timeout"), this.#o.connectTimeout);
    this.#getToken("connect").then(
      (token) => {
        if (this.#c !== c) return;
        const u = new URL(this.#url);
        if (token) u.searchParams.set("token", token);
        const ws = new this.#WS(u.href);
        c.ws = ws;
        ws.onopen = () => this.#onOpen(c);
        ws.onmessage = (e) => this.#onFrame(c, e.data);
        ws.onclose = (e) => this.#lost(c, e.code, e.reason);
        ws.onerror = () => {}; // a close event follows
      },
    ).catch((e) => {
      if (this.#c !== c) return;
      this.#report(e instanceof HeraldError ? e : new HeraldError("connect_failed", String(e && e.message ? e.message : e), { cause: e }));
      this.#lost(c, 1006, "connect failed");
    });
  }

  #onOpen(c) {
    if (this.#c !== c) return;
    clearTimeout(c.timer);
    c.openedAt = c.last = clock();
    const tick = Math.max(50, Math.min(1000, this.#o.idleTimeout / 4, this.#o.pongTimeout / 4));
    c.tick = setInterval(() => this.#checkAlive(c), tick);
    this.#ping(c, { kind: "connect" });
    for (const t of this.#topics.values()) this.#sendSubscribe(c, t);
    for (const entry of this.#queue.splice(0)) this.#sendPublish(c, entry);
    this.#everOpen = true;
    this.#setState("open", {});
  }

  #onFrame(c, data) {
    if (this.#c !== c) return;
    c.last = clock();
    let m;
    try {
      m = JSON.parse(typeof data === "string" ? data : String(data));
    } catch {
      return this.#report(new HeraldError("bad_frame", "herald sent a frame that is not JSON"));
    }
    if (!m || typeof m !== "object") return;
    switch (m.op) {
      case "message":
        return this.#onMessage(m);
      case "subscribed":
        return this.#onSubscribed(c, m);
      case "unsubscribed":
        return this.#onUnsubscribed(c, m);
      case "pong":
        return this.#onPong(c);
      case "error":
        return this.#onError(c, m);
      case "authenticated":
        return this.#onAuthenticated(c, m);
      case "reconnect": {
        // The server is going away: never come back before after_ms.
        const after = Math.min(HINT_CAP, Math.max(0, Number(m.after_ms) || 0));
        c.hint = after;
        this.#notBefore = clock() + after;
        return;
      }
    }
  }

  #ping(c, entry) {
    entry.at = clock();
    c.pending.push(entry);
    this.#send(c, { op: "ping" });
  }

  #onPong(c) {
    const e = c.pending.shift();
    if (e && e.kind === "publish" && !e.failed) e.resolve();
  }

  #onError(c, m) {
    const e = c.pending[0]; // the op this error answers: its pong has not come yet
    const mine = e && !e.failed;
    const err = new HeraldError(m.error || "error", m.message, mine ? { op: e.kind, topic: e.topic } : undefined);
    if (mine) {
      e.failed = true;
      if (e.kind === "publish") e.reject(err);
      if (e.kind === "subscribe") {
        const t = this.#topics.get(e.topic);
        if (this.#answered(c, e.topic) && t) t.ended = err.code;
      }
      if (e.kind === "connect" || e.kind === "auth") {
        // The token was refused: never offer it again. An expired one is replaced now.
        this.#token = undefined;
        if (err.code === "token_expired" && e.kind === "connect" && typeof this.#o.token === "function") {
          this.#refresh(c, "expired");
        }
      }
    }
    this.#report(err);
  }

  #onAuthenticated(c, m) {
    if (typeof m.exp === "number" && this.#token) {
      this.#tokenExp = m.exp * 1000;
      this.#scheduleRefresh();
    }
    // The new grant may cover what herald ended or refused: ask again.
    for (const t of this.#topics.values()) {
      if (!t.active && (t.ended === "token_expired" || t.ended === "forbidden" || t.ended === "not_granted")) {
        this.#sendSubscribe(c, t);
      }
    }
  }

  #checkAlive(c) {
    if (this.#c !== c) return;
    const now = clock();
    const o = this.#o;
    const oldest = c.pending[0];
    if (oldest && now - oldest.at > o.pongTimeout && now - c.last > o.pongTimeout) {
      return this.#lost(c, 1006, "no answer to ping");
    }
    if (!oldest && now - c.last > o.idleTimeout) this.#ping(c, { kind: "probe" });
  }

  #onOnline() {
    if (this.#closed) return;
    this.#attempt = 0;
    const c = this.#c;
    if (!c) this.#connect(); // waiting to retry: go now (the hint still holds)
    else if (c.openedAt && !c.pending.length) this.#ping(c, { kind: "probe" }); // still alive?
  }

  #send(c, obj) {
    this.#sendRaw(c, JSON.stringify(obj));
  }

  #sendRaw(c, text) {
    try {
      c.ws.send(text);
    } catch (e) {
      // The socket is closing; its close event will follow.
    }
  }

  #detach(c, code) {
    clearTimeout(c.timer);
    clearInterval(c.tick);
    const ws = c.ws;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      ws.onerror = () => {};
      try {
        if (ws.readyState < 2) ws.close(code);
      } catch {
        // already closing
      }
    }
  }

  #lost(c, code, reason) {
    if (this.#c !== c) return;
    this.#c = null;
    this.#detach(c);
    for (const t of this.#topics.values()) t.active = false;
    const why = "the connection closed before herald confirmed the publish: it may or may not have been published";
    for (const e of c.pending) {
      if (e.kind === "publish" && !e.failed) e.reject(new HeraldError("connection_lost", why, { topic: e.topic, op: "publish" }));
    }
    if (this.#closed) return;
    const now = clock();
    if (c.openedAt) {
      this.#stats.reconnects++;
      if (now - c.openedAt >= this.#o.stableAfter) this.#attempt = 0;
    }
    const hinted = c.hint !== undefined;
    // A hint is the server's own schedule: add only a little jitter of ours to it.
    const delay = hinted
      ? Math.max(0, this.#notBefore - now) + Math.random() * this.#o.minDelay
      : backoffDelay(this.#attempt++, this.#o.minDelay, this.#o.maxDelay);
    const info = { code, reason, attempt: this.#attempt, delay, hinted };
    this.#retry = setTimeout(() => ((this.#retry = 0), this.#connect()), delay);
    this.#setState(this.#everOpen ? "reconnecting" : "connecting", info);
    this.#emit("retry", info);
  }

  /** Close for good: no reconnect. Queued and unconfirmed publishes reject with `closed`. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#retry);
    clearTimeout(this.#refreshTimer);
    globalThis.removeEventListener?.("online", this.#online);
    const c = this.#c;
    this.#c = null;
    const closed = () => new HeraldError("closed", "herald: closed", { op: "publish" });
    if (c) {
      this.#detach(c, 1000);
      for (const e of c.pending) if (e.kind === "publish" && !e.failed) e.reject(closed());
    }
    for (const e of this.#queue.splice(0)) e.reject(closed());
    for (const t of this.#topics.values()) t.active = false;
    this.#setState("closed", {});
  }

  // ---- tokens ---------------------------------------------------------------------------

  /** The token to use: the string given, or the function's (called again when near exp). */
  #getToken(reason, force) {
    const tk = this.#o.token;
    if (tk == null) return Promise.resolve(undefined);
    if (typeof tk === "string") return Promise.resolve(tk);
    const left = this.#tokenExp === undefined ? 0 : this.#tokenExp - Date.now();
    if (!force && this.#token && left > Math.max(1000, this.#lead())) return Promise.resolve(this.#token);
    return Promise.resolve()
      .then(() => tk({ reason }))
      .then((token) => {
        if (typeof token !== "string" || !token) throw new Error("the token function returned no token");
        this.#setToken(token);
        return token;
      })
      .catch((e) => {
        throw new HeraldError("token_failed", `could not get a token: ${e && e.message ? e.message : e}`, { cause: e });
      });
  }

  /** How long before exp to refresh: refreshBefore, at most half the token's life. */
  #lead() {
    const rb = this.#o.refreshBefore;
    if (rb === false || this.#tokenExp === undefined) return 0;
    return Math.min(rb, (this.#tokenExp - this.#tokenAt) / 2);
  }

  #setToken(token) {
    this.#token = token;
    this.#tokenExp = tokenExp(token);
    this.#tokenAt = Date.now();
    this.#scheduleRefresh();
  }

  #scheduleRefresh() {
    clearTimeout(this.#refreshTimer);
    if (typeof this.#o.token !== "function" || this.#o.refreshBefore === false || this.#tokenExp === undefined || this.#closed) return;
    const wait = this.#tokenExp - this.#lead() - Date.now();
    this.#refreshTimer = setTimeout(() => {
      if (this.#tokenExp - this.#lead() - Date.now() > 1000) return this.#scheduleRefresh(); // clamped timer
      const c = this.#c;
      if (c && c.openedAt) this.#refresh(c, "refresh");
      // Not connected: the next connect fetches a fresh token.
    }, Math.min(Math.max(0, wait), 2 ** 31 - 1));
  }

  /** Fetch a fresh token and send it with the auth op (one refresh at a time). */
  #refresh(c, reason) {
    if (this.#refreshing) return;
    this.#refreshing = true;
    this.#getToken(reason, true)
      .then(
        (token) => {
          if (this.#c !== c || !c.openedAt) return;
          this.#send(c, { op: "auth", token });
          this.#ping(c, { kind: "auth" });
        },
        (e) => this.#report(e),
      )
      .finally(() => (this.#refreshing = false));
  }
}

export default Herald;
