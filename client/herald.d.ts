// Types for herald.js, the client for the herald WebSocket push server.

export type State = "connecting" | "open" | "reconnecting" | "closed";

/** Why the token function is called. */
export interface TokenContext {
  /** "connect": before a connection (when the last token is missing or near its exp);
   *  "refresh": before exp, on a live connection; "expired": herald said token_expired. */
  reason: "connect" | "refresh" | "expired";
}

export interface HeraldOptions {
  /** A JWT, or a function returning one (called on connect, before exp, on token_expired). */
  token?: string | ((ctx: TokenContext) => string | Promise<string>);
  /** A WebSocket implementation (e.g. `ws` on Node < 22); defaults to globalThis.WebSocket. */
  WebSocket?: unknown;
  /** Backoff floor in ms (default 500): attempt n waits uniformly in
   *  [minDelay, min(maxDelay, minDelay * 2^(n+1))]. */
  minDelay?: number;
  /** Backoff ceiling in ms (default 30000). */
  maxDelay?: number;
  /** A connection open this long (ms, default 5000) resets the backoff. */
  stableAfter?: number;
  /** With no frame from herald for this long (ms, default 30000), send {"op":"ping"}. */
  idleTimeout?: number;
  /** A ping unanswered this long (ms, default 10000), with nothing else heard, means the
   *  connection is dead: reconnect. */
  pongTimeout?: number;
  /** Token fetch plus WebSocket handshake must finish within this (ms, default 10000). */
  connectTimeout?: number;
  /** Publishes kept while not connected (default 100; 0 rejects them at once). */
  publishQueue?: number;
  /** Refresh a token this long before its exp (ms, default 30000, at most half its life);
   *  false: only on connect and when herald says token_expired. */
  refreshBefore?: number | false;
}

/** Where a message sits in its topic. */
export interface Meta {
  topic: string;
  id: number;
  /** The history epoch the id belongs to (ids restart in a new epoch). */
  epoch: string | undefined;
}

export interface Position {
  epoch: string | undefined;
  id: number | undefined;
}

export interface Subscription {
  readonly topic: string;
  /** Subscribed on the current connection. */
  readonly active: boolean;
  /** The last id delivered (or the topic's position at subscribe) and its epoch. */
  readonly position: Position;
  unsubscribe(): void;
}

export interface SubscribeOptions {
  /** Resume after this id of `epoch` (both or neither): e.g. a position saved earlier. */
  since?: number;
  epoch?: string;
}

export interface GapInfo {
  /** "epoch": herald lost its history (restart without --state-dir, kill -9);
   *  "history": history no longer reaches back to `since`;
   *  "missed": ids skipped on a live connection; "no_resume": resubscribed without an epoch. */
  reason: "epoch" | "history" | "missed" | "no_resume";
  /** The last id delivered before the gap, and its epoch. */
  since: number | undefined;
  epoch: string | undefined;
  /** For a resume: the epoch now and the topic's last id at resubscribe (replayed
   *  messages up to it follow); for "missed": the id that arrived. */
  newEpoch?: string;
  id?: number;
}

export interface StateInfo {
  code?: number;
  reason?: string;
  attempt?: number;
  delay?: number;
  hinted?: boolean;
}

export interface RetryInfo {
  /** Close code (1006 for a failed or timed-out connection) and reason. */
  code: number;
  reason: string;
  /** Consecutive attempts so far. */
  attempt: number;
  /** ms until the next attempt. */
  delay: number;
  /** The delay follows the server's reconnect hint. */
  hinted: boolean;
}

export class HeraldError extends Error {
  /** herald's code (bad_json, bad_request, unknown_op, bad_topic, forbidden, too_many_topics,
   *  invalid_token, token_expired, unavailable, not_granted) or the client's (callback,
   *  queue_full, connection_lost, closed, bad_data, token_failed, connect_failed, bad_frame). */
  code: string;
  /** The op it answers, when known: "publish", "subscribe", "auth", "connect". */
  op?: string;
  topic?: string;
  cause?: unknown;
}

export interface Stats {
  delivered: number;
  duplicates: number;
  gaps: number;
  reconnects: number;
}

export class Herald {
  constructor(url: string, options?: HeraldOptions);
  readonly state: State;
  readonly topics: string[];
  readonly stats: Stats;
  subscribe<T = unknown>(
    topic: string,
    callback: (data: T, meta: Meta) => void | Promise<void>,
    options?: SubscribeOptions,
  ): Subscription;
  /** Resolves once herald has taken the publish; rejects with a HeraldError. */
  publish(topic: string, data: unknown): Promise<void>;
  on(event: "state", fn: (state: State, info: StateInfo) => void): () => void;
  on(event: "gap", fn: (topic: string, info: GapInfo) => void): () => void;
  on(event: "error", fn: (err: HeraldError) => void): () => void;
  on(event: "retry", fn: (info: RetryInfo) => void): () => void;
  off(event: string, fn: (...args: any[]) => void): void;
  /** Close for good. */
  close(): void;
}

/** The backoff schedule: ms to wait before attempt `attempt` (0-based). */
export function backoffDelay(attempt: number, minDelay?: number, maxDelay?: number, random?: () => number): number;

export default Herald;
