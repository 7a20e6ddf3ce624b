// A scripted stand-in for herald, for the behaviours a real server cannot be made to show on
// demand (duplicates, holes, a connection that goes silent). It speaks the same JSON ops.
// Tests against the real binary are in the other files.

import { WebSocketServer } from "ws";
import { freePort } from "./helpers.js";

export class FakeHerald {
  /** `onOp(conn, op)` may answer an op itself; return true to skip the default answer. */
  constructor({ port, onOp, onConnection } = {}) {
    this.port = port;
    this.onOp = onOp;
    this.onConnection = onConnection;
    this.conns = [];
    this.ops = []; // every op received, with the connection's index
    this.silent = false; // when true, answer nothing (a dead peer that keeps the socket)
    this.epoch = "e1";
    this.last = 0;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  async start() {
    this.port ??= await freePort();
    this.wss = new WebSocketServer({ port: this.port, host: "127.0.0.1" });
    await new Promise((resolve, reject) => {
      this.wss.once("listening", resolve);
      this.wss.once("error", reject);
    });
    this.wss.on("connection", (ws, req) => {
      const conn = { ws, index: this.conns.length, url: req.url, at: Date.now(), ops: [] };
      this.conns.push(conn);
      ws.on("message", (raw) => {
        const op = JSON.parse(String(raw));
        conn.ops.push(op);
        this.ops.push({ conn: conn.index, ...op });
        if (this.silent) return;
        if (this.onOp?.(conn, op)) return;
        this.answer(conn, op);
      });
      this.onConnection?.(conn);
    });
    return this;
  }

  answer(conn, op) {
    const send = (m) => conn.ws.send(JSON.stringify(m));
    switch (op.op) {
      case "ping":
        return send({ op: "pong" });
      case "subscribe":
        return send({ op: "subscribed", topic: op.topic, epoch: this.epoch, id: this.last, ...(op.epoch !== undefined ? { recovered: true } : {}) });
      case "unsubscribe":
        return send({ op: "unsubscribed", topic: op.topic });
    }
  }

  send(conn, m) {
    conn.ws.send(JSON.stringify(m));
  }

  message(conn, topic, id, data = id) {
    this.send(conn, { op: "message", topic, id, data });
  }

  /** Resolves with the next connection (bounded). */
  nextConnection(ms = 5000) {
    const have = this.conns.length;
    return new Promise((resolve, reject) => {
      const end = Date.now() + ms;
      const poll = () => {
        if (this.conns.length > have) return resolve(this.conns[have]);
        if (Date.now() > end) return reject(new Error(`no new connection within ${ms} ms`));
        setTimeout(poll, 5);
      };
      poll();
    });
  }

  /** Resolves once connection `conn` has received an op matching `pred` (bounded). */
  opOn(conn, pred, ms = 5000) {
    return new Promise((resolve, reject) => {
      const end = Date.now() + ms;
      const poll = () => {
        const op = conn.ops.find(pred);
        if (op) return resolve(op);
        if (Date.now() > end) return reject(new Error(`no matching op within ${ms} ms; got ${JSON.stringify(conn.ops)}`));
        setTimeout(poll, 5);
      };
      poll();
    });
  }

  async stop() {
    for (const c of this.conns) c.ws.terminate();
    await new Promise((r) => this.wss.close(r));
  }
}
