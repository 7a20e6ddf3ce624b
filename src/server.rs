//! The event loop: one thread, one `mio::Poll`, every socket nonblocking. `run` reads
//! like a table of contents: poll, dispatch readiness, fire timers, accept, flush queued
//! output, reap closed connections, advance the drain. Connections live in a slab whose
//! keys are their tokens; a connection that ends mid-pass is only marked `Dead` and
//! removed after the pass, so a reused key can never receive a stale event.
//!
//! Writes are deferred, as Redis defers them to `beforeSleep`: handlers only queue bytes
//! and mark the connection dirty; each dirty connection gets one `writev` per pass, and
//! only one the kernel could not take registers for WRITABLE.

use std::collections::HashMap;
use std::io::{self, Read};
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use serde_json::value::RawValue;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use tungstenite::Message;

use crate::api::{self, Policy, Route};
use crate::auth::{self, Grant, TokenError};
use crate::close::{CloseReason, Reject};
use crate::config::Config;
use crate::conn::{Conn, ConnId, State};
use crate::drain::{Drain, Finished, OnSignal};
use crate::http::{self, Method, Parsed, Request, Response};
use crate::hub::{Hub, Joined, Left, Published, SubscribeError};
use crate::metrics::{self, Counters, Gauges};
use crate::net;
use crate::outq::Flushed;
use crate::redis::{self, Redis};
use crate::rlimit::NoFile;
use crate::session::{self, Kind, Op, OpError, Session};
use crate::timer::{self, Timer, Timers};
use crate::upgrade;
use crate::ws::{self, Ws, WsEvent};

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);

/// Readiness events taken per poll.
const EVENTS_CAPACITY: usize = 1024;
/// The one read buffer every connection reads into. 64 KiB holds any request head and
/// a typical burst of frames; a longer burst is read in several turns.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Connections accepted per wakeup, so that a connection storm cannot starve clients
/// already connected; the rest wait in the backlog for the next pass.
const ACCEPTS_PER_PASS: usize = 256;
/// Bytes read from one connection per pass before others get a turn.
const READ_BUDGET: usize = 256 * 1024;
/// Bytes written to one connection per pass (Redis uses 64 KiB per event; our frames are
/// shared and writev'd, so a larger slice costs no copies).
const WRITE_BUDGET: usize = 256 * 1024;
/// After our close frame or FIN, how long the peer has to finish before we cut it.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// After accept() fails for lack of descriptors, accepting pauses this long: a timer,
/// not a retry loop, so the process stays idle while it sits at its fd limit.
const ACCEPT_PAUSE: Duration = Duration::from_millis(250);
/// At most one log line per this interval for accept failures.
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(1);

/// Whether and when to accept.
#[derive(Debug, Default)]
struct Accepting {
    /// The listener may have connections waiting (edge-triggered: no new event will say so).
    ready: bool,
    /// Out of descriptors: do not try before this.
    paused_until: Option<Instant>,
    last_warning: Option<Instant>,
}

/// One readiness event, copied out of mio's `Events`.
#[derive(Debug, Clone, Copy)]
struct Ready {
    token: Token,
    readable: bool,
    writable: bool,
    /// The peer hung up (FIN or error) as well: read to the end, not just until a short read.
    hup: bool,
}

/// What to do after a request has been answered.
enum Next {
    /// Keep parsing: HTTP keep-alive, maybe a pipelined request.
    KeepReading,
    /// The connection left `ReadingRequest` (closing, or now a WebSocket).
    Stop,
    /// The request cannot be served before the publishes ahead of it are answered (an
    /// upgrade, or too many held responses): keep it, and the rest, for later.
    Hold,
}

/// Most requests one connection may have answered-but-not-sent behind a publish at
/// Redis; past it, parsing pauses until Redis replies.
const MAX_HELD_RESPONSES: usize = 1024;

/// One request's response, held behind a publish at Redis.
struct Slot {
    /// Ready now (any request but a publish), or built when Redis has replied.
    response: Option<Response>,
    head_only: bool,
    keep_alive: bool,
    /// A publish: each topic's id once Redis replies (`Err` if that publish failed).
    topics: Vec<(String, Option<Result<u64, ()>>)>,
    /// herald processes that received the messages (PUBLISH's count).
    receivers: u64,
}

/// A connection's responses held until its publishes come back from Redis.
struct Group {
    conn: ConnId,
    serial: u64,
    slots: Vec<Slot>,
    /// Redis replies still due.
    waiting: usize,
    /// A held response ends the connection: nothing after it is served.
    closing: bool,
}

/// A WebSocket handshake that was accepted: what it asked for.
struct Opening {
    kind: Kind,
    accept: String,
    /// `?topics=`, validated.
    topics: Vec<String>,
    /// The outcome of `?token=`, if one was given.
    grant: Option<Result<Grant, TokenError>>,
}

/// How long a drain waits for Redis to hand over messages accepted before it began.
const DRAIN_REDIS_WAIT: Duration = Duration::from_secs(1);

pub struct Server {
    poll: Poll,
    events: Events,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    signals: Signals,
    conns: Slab<Conn>,
    hub: Hub,
    timers: Timers,
    scratch: Vec<u8>,
    cfg: Config,
    nofile: NoFile,
    max_connections: usize,
    /// Encoded once: the answer to connections beyond `max_connections`.
    at_capacity: Bytes,
    counters: Counters,
    accepting: Accepting,
    drain: Drain,
    /// Readiness of this pass, copied out of `events` so handlers may borrow `self`.
    ready: Vec<Ready>,
    /// Connections with output to write this pass.
    dirty: Vec<ConnId>,
    /// Connections whose read budget ran out with input possibly left.
    unread: Vec<ConnId>,
    /// Connections to remove after this pass.
    reap: Vec<ConnId>,
    /// `--redis`: the links to Redis and what came back on them this pass.
    redis: Option<Redis>,
    redis_events: Vec<redis::Event>,
    /// Publishes waiting for Redis, by tag.
    awaiting: HashMap<u64, Group>,
    next_tag: u64,
    /// `subscribed` replies held until Redis confirms the topic's channel, so a client
    /// never misses a message published right after it was told it is subscribed.
    pending_acks: HashMap<String, Vec<(ConnId, u64)>>,
    next_serial: u64,
    /// Draining with Redis: WebSockets close once Redis answers our PING (everything
    /// published before has arrived), or at this deadline.
    drain_redis_until: Option<Instant>,
}

impl Server {
    pub fn bind(cfg: Config, nofile: NoFile, max_connections: usize) -> io::Result<Server> {
        let poll = Poll::new()?;
        let cfg_redis = cfg.redis.clone();
        let mut listener = net::listen(cfg.listen, cfg.backlog, cfg.reuse_port)?;
        let local_addr = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        Ok(Server {
            poll,
            events: Events::with_capacity(EVENTS_CAPACITY),
            listener: Some(listener),
            local_addr,
            signals,
            conns: Slab::new(),
            hub: Hub::default(),
            timers: Timers::default(),
            scratch: vec![0; SCRATCH_BYTES],
            at_capacity: Bytes::from(Reject::AtCapacity.response().encode(false)),
            cfg,
            nofile,
            max_connections,
            counters: Counters::default(),
            accepting: Accepting {
                ready: true,
                ..Accepting::default()
            },
            drain: Drain::Serving,
            ready: Vec::with_capacity(EVENTS_CAPACITY),
            dirty: Vec::new(),
            unread: Vec::new(),
            reap: Vec::new(),
            redis: cfg_redis.map(|c| Redis::new(c, Instant::now())),
            redis_events: Vec::new(),
            awaiting: HashMap::new(),
            next_tag: 1,
            pending_acks: HashMap::new(),
            next_serial: 1,
            drain_redis_until: None,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serve until a drain completes (exit code 0) or a second signal cuts it (1).
    /// Only reactor-fatal errors (poll itself failing) return `Err`.
    pub fn run(mut self) -> io::Result<i32> {
        loop {
            self.wait()?;
            let now = Instant::now();
            self.read_leftovers(now);
            if let Some(code) = self.dispatch(now) {
                return Ok(code);
            }
            self.fire_timers(now);
            self.service_redis(now);
            self.accept_connections(now);
            self.flush_dirty(now);
            self.flush_redis(now);
            self.reap_dead();
            if let Some(code) = self.advance_drain(now) {
                return Ok(code);
            }
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let busy = !self.dirty.is_empty() || !self.unread.is_empty() || self.accept_due(now);
        let timeout = if busy {
            Some(Duration::ZERO)
        } else {
            let accept_resume = self.accepting.paused_until.filter(|_| self.accepting.ready);
            let next = [
                self.timers.next_deadline(),
                accept_resume,
                self.drain.deadline(),
                self.redis.as_ref().and_then(Redis::next_deadline),
                self.drain_redis_until,
            ]
            .into_iter()
            .flatten()
            .min();
            timer::poll_timeout(now, next)
        };
        match self.poll.poll(&mut self.events, timeout) {
            // A signal landing interrupts epoll_wait; it arrives as an event next time.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            other => other,
        }
    }

    /// Handle this pass's readiness events. Returns an exit code on a second signal.
    fn dispatch(&mut self, now: Instant) -> Option<i32> {
        let mut ready = mem::take(&mut self.ready);
        ready.clear();
        ready.extend(self.events.iter().map(|e| Ready {
            token: e.token(),
            readable: e.is_readable() || e.is_read_closed() || e.is_error(),
            writable: e.is_writable(),
            hup: e.is_read_closed() || e.is_error(),
        }));
        let mut exit = None;
        for &Ready {
            token,
            readable,
            writable,
            hup,
        } in &ready
        {
            match token {
                LISTENER => self.accepting.ready = true,
                SIGNALS => exit = exit.or(self.on_signals(now)),
                redis::COMMAND_TOKEN | redis::SUBSCRIPTION_TOKEN => {
                    if let Some(r) = self.redis.as_mut() {
                        r.on_ready(token, self.poll.registry(), now, &mut self.redis_events);
                    }
                    self.drain_redis_events(now);
                }
                Token(key) => {
                    let id = ConnId(key);
                    if writable {
                        self.mark_dirty(id);
                    }
                    if readable {
                        self.on_readable(id, now, hup);
                    }
                }
            }
        }
        self.ready = ready;
        exit
    }

    // ---- accepting -------------------------------------------------------------------

    fn accept_due(&self, now: Instant) -> bool {
        self.accepting.ready
            && self.listener.is_some()
            && self.accepting.paused_until.is_none_or(|t| now >= t)
    }

    fn accept_connections(&mut self, now: Instant) {
        if !self.accept_due(now) {
            return;
        }
        self.accepting.paused_until = None;
        let Some(listener) = self.listener.take() else {
            return;
        };
        // If the budget runs out, `ready` stays set and the next pass goes on accepting.
        for _ in 0..ACCEPTS_PER_PASS {
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accepting.ready = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.counters.accept_errors += 1;
                    if net::is_resource_exhaustion(&e) {
                        self.warn_accept(now, &e);
                        self.accepting.paused_until = Some(now + ACCEPT_PAUSE);
                        break;
                    }
                    // ECONNABORTED and friends: that one connection is gone; go on.
                    debug!("accept: {e}");
                }
            }
        }
        self.listener = Some(listener);
    }

    fn warn_accept(&mut self, now: Instant, err: &io::Error) {
        let due = self
            .accepting
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_WARN_INTERVAL);
        if due {
            self.accepting.last_warning = Some(now);
            warn!(
                "accept failed: {err}; {} connections open, fd limit {}; pausing accepts for {} ms",
                self.conns.len(),
                self.nofile.soft,
                ACCEPT_PAUSE.as_millis()
            );
        }
    }

    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr, now: Instant) {
        if self.conns.len() >= self.max_connections {
            self.counters.rejected_at_capacity += 1;
            net::refuse(stream, &self.at_capacity);
            return;
        }
        // Push messages are small and latency matters more than packet count.
        stream.set_nodelay(true).ok();
        let entry = self.conns.vacant_entry();
        let id = ConnId(entry.key());
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, id.token(), Interest::READABLE)
        {
            warn!("register {peer}: {e}");
            return;
        }
        let conn = entry.insert(Conn::new(stream, peer, self.next_serial));
        self.next_serial += 1;
        self.counters.accepted += 1;
        let deadline = now + self.cfg.handshake_timeout;
        self.timers
            .arm(&mut conn.timers, id.0, Timer::Request, deadline);
        // Edge-triggered: bytes that arrived with the connection raise no new event.
        self.on_readable(id, now, true);
    }

    // ---- reading ---------------------------------------------------------------------

    fn read_leftovers(&mut self, now: Instant) {
        for id in mem::take(&mut self.unread) {
            self.on_readable(id, now, true);
        }
    }

    /// Read until the socket is empty (edge-triggered) or the budget is spent. `to_end`:
    /// keep reading past a short read, because a FIN (EOF) may be waiting behind the data
    /// and it raises no event of its own.
    fn on_readable(&mut self, id: ConnId, now: Instant, to_end: bool) {
        let mut scratch = mem::take(&mut self.scratch);
        let mut total = 0;
        while let Some(conn) = self.conns.get_mut(id.0) {
            if matches!(conn.state, State::Dead) {
                break;
            }
            match conn.stream.read(&mut scratch) {
                Ok(0) => {
                    self.on_eof(id, now);
                    break;
                }
                Ok(n) => {
                    self.on_input(id, &scratch[..n], now);
                    total += n;
                    if total >= READ_BUDGET {
                        self.unread.push(id);
                        break;
                    }
                    // A short read emptied the socket: skip the read that would only say
                    // EAGAIN. Data arriving later raises a new edge-triggered event.
                    if n < scratch.len() && !to_end {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("read {}: {e}", conn.peer);
                    self.kill(id);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    fn on_input(&mut self, id: ConnId, input: &[u8], now: Instant) {
        match self.conns[id.0].state {
            State::ReadingRequest | State::AwaitingRedis { .. } => {
                self.on_http_input(id, input, now)
            }
            State::Open(_) | State::Closing(_) => self.on_ws_input(id, input, now),
            // Nothing more is wanted from this peer; reading only watches for its FIN.
            State::Finishing | State::Lingering | State::Dead => {}
        }
    }

    fn on_eof(&mut self, id: ConnId, now: Instant) {
        let conn = &mut self.conns[id.0];
        conn.peer_shut = true;
        match conn.state {
            // The peer may have half-closed after its request; let the answer go out.
            State::ReadingRequest if !conn.out.is_empty() => self.finish(id, now),
            // The answer still goes out when Redis replies; then the connection ends.
            State::Finishing | State::AwaitingRedis { .. } => {}
            _ => self.kill(id),
        }
    }

    // ---- HTTP ------------------------------------------------------------------------

    fn on_http_input(&mut self, id: ConnId, input: &[u8], now: Instant) {
        let conn = &mut self.conns[id.0];
        // Parse straight from the scratch slice unless part of a request is already held.
        let mut held = mem::take(&mut conn.partial);
        if !held.is_empty() {
            held.extend_from_slice(input);
        }
        let data: &[u8] = if held.is_empty() { input } else { &held };
        let mut pos = 0;
        loop {
            if self.conns[id.0].out.len() > self.cfg.send_queue_limit {
                // Pipelining requests without reading the answers: a slow consumer too.
                self.counters.slow_consumers += 1;
                info!(
                    "{} sends requests but does not read the responses; closing",
                    self.conns[id.0].peer
                );
                self.kill(id);
                return;
            }
            let rest = &data[pos..];
            match http::parse(rest, self.cfg.max_message_size) {
                Ok(Parsed::Complete(req, used)) => {
                    let start = pos;
                    pos += used;
                    let conn = &mut self.conns[id.0];
                    conn.sent_continue = false;
                    // The next request's clock starts at its own first byte.
                    self.timers.disarm(&mut conn.timers, id.0, Timer::Request);
                    match self.on_request(id, *req, &data[pos..], now) {
                        Next::KeepReading => continue,
                        Next::Stop => return,
                        // Not now: this request and what follows wait for Redis's replies.
                        Next::Hold => {
                            self.conns[id.0].partial = data[start..].to_vec();
                            return;
                        }
                    }
                }
                Ok(partial @ (Parsed::Partial | Parsed::AwaitingBody { .. })) => {
                    let conn = &mut self.conns[id.0];
                    if let Parsed::AwaitingBody {
                        expect_continue: true,
                    } = partial
                        && !conn.sent_continue
                    {
                        conn.sent_continue = true;
                        conn.out
                            .push(Bytes::from_static(b"HTTP/1.1 100 Continue\r\n\r\n"));
                        self.mark_dirty(id);
                    }
                    self.keep_partial(id, rest, now);
                    return;
                }
                Err(reject) => {
                    self.respond(id, reject.response(), false, now);
                    return;
                }
            }
        }
    }

    /// Hold the start of an incomplete request, and time its arrival: the head must be
    /// complete within `--handshake-timeout` of its first byte (slowloris).
    fn keep_partial(&mut self, id: ConnId, rest: &[u8], now: Instant) {
        let conn = &mut self.conns[id.0];
        if rest.is_empty() {
            self.timers.disarm(&mut conn.timers, id.0, Timer::Request);
            let deadline = now + self.cfg.keepalive_timeout;
            self.timers
                .arm(&mut conn.timers, id.0, Timer::Idle, deadline);
            return;
        }
        conn.partial = rest.to_vec();
        self.timers.disarm(&mut conn.timers, id.0, Timer::Idle);
        if conn.timers.get(Timer::Request).is_none() {
            let deadline = now + self.cfg.handshake_timeout;
            self.timers
                .arm(&mut conn.timers, id.0, Timer::Request, deadline);
        }
    }

    fn on_request(&mut self, id: ConnId, req: Request, rest: &[u8], now: Instant) -> Next {
        let draining = self.drain.is_draining();
        let policy = Policy {
            api_key: self.cfg.api_key.as_deref(),
            allowed_origins: self.cfg.allowed_origins.as_deref(),
            peer_is_loopback: is_loopback(self.conns[id.0].peer.ip()),
            draining,
        };
        let head_only = req.method == Method::Head;
        if let State::AwaitingRedis { tag } = self.conns[id.0].state {
            let full = self
                .awaiting
                .get(&tag)
                .is_none_or(|g| g.closing || g.slots.len() >= MAX_HELD_RESPONSES);
            if full || req.upgrade.is_some() {
                return Next::Hold;
            }
        }
        let mut response = match api::route(&req, &policy) {
            Err(reject) => reject.response(),
            Ok(Route::Health) if draining => Reject::Draining.response(),
            Ok(Route::Health) => match &self.redis {
                None => Response::text(200, "ok"),
                Some(r) if r.is_up() => Response::text(200, "ok (redis up)"),
                Some(_) => Response::text(200, "ok (redis down)"),
            },
            Ok(Route::Metrics) => Response::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                self.render_metrics(),
            ),
            Ok(Route::Publish(p)) if self.redis.is_some() => {
                return self.publish_through_redis(id, p, req.keep_alive, head_only, now);
            }
            Ok(Route::Publish(p)) => {
                let mut ids = Vec::with_capacity(p.topics.len());
                let mut delivered = 0;
                for topic in p.topics {
                    let (id, reached) = self.publish(&topic, &p.data, now);
                    delivered += reached;
                    ids.push((topic, id));
                }
                api::publish_reply(&ids, delivered)
            }
            Ok(Route::Upgrade {
                kind,
                accept,
                topics,
                token,
            }) => {
                let grant = token.map(|t| self.verify_token(&t));
                match (&grant, self.cfg.require_token) {
                    (Some(Ok(_)), _) | (_, false) => {
                        let opening = Opening {
                            kind,
                            accept,
                            topics,
                            grant,
                        };
                        self.open_websocket(id, opening, rest, now);
                        return Next::Stop;
                    }
                    (None, true) => Reject::TokenRequired("token required".into()).response(),
                    (Some(Err(e)), true) => Reject::TokenRequired(e.message()).response(),
                }
            }
        };
        // While draining, every response says the connection ends (PRODUCT.md).
        response.close |= !req.keep_alive || draining;
        self.respond(id, response, head_only, now)
    }

    /// Send each topic's message to Redis. The response waits for the replies, in a group
    /// with the responses of any requests pipelined behind it (`on_publish_result`).
    fn publish_through_redis(
        &mut self,
        id: ConnId,
        p: api::Publish,
        keep_alive: bool,
        head_only: bool,
        now: Instant,
    ) -> Next {
        let Some(r) = self.redis.as_mut().filter(|r| r.is_up()) else {
            let mut response = Reject::RedisUnavailable.response();
            response.close |= !keep_alive || self.drain.is_draining();
            return self.respond(id, response, head_only, now);
        };
        let conn = &mut self.conns[id.0];
        let tag = match conn.state {
            State::AwaitingRedis { tag } => tag,
            _ => {
                let tag = self.next_tag;
                self.next_tag += 1;
                conn.state = State::AwaitingRedis { tag };
                let group = Group {
                    conn: id,
                    serial: conn.serial,
                    slots: Vec::new(),
                    waiting: 0,
                    closing: false,
                };
                self.awaiting.insert(tag, group);
                tag
            }
        };
        for topic in &p.topics {
            r.publish(topic, p.data.get(), Some(tag), now);
        }
        if let Some(group) = self.awaiting.get_mut(&tag) {
            group.waiting += p.topics.len();
            group.slots.push(Slot {
                response: None,
                head_only,
                keep_alive,
                topics: p.topics.into_iter().map(|t| (t, None)).collect(),
                receivers: 0,
            });
        }
        Next::KeepReading
    }

    /// One Redis reply to a publish. Replies come in the order the publishes were sent,
    /// so each fills the first topic still waiting. The last one sends the group's
    /// responses in request order and lets the connection read on.
    fn on_publish_result(&mut self, tag: u64, result: Result<(u64, u64), String>, now: Instant) {
        let Some(group) = self.awaiting.get_mut(&tag) else {
            return;
        };
        let outcome = match result {
            Ok((msg_id, receivers)) => {
                self.counters.published += 1;
                Ok((msg_id, receivers))
            }
            Err(_) => Err(()),
        };
        'fill: for slot in &mut group.slots {
            for (_, result) in &mut slot.topics {
                if result.is_none() {
                    *result = Some(outcome.map(|(msg_id, _)| msg_id));
                    slot.receivers += outcome.map_or(0, |(_, n)| n);
                    break 'fill;
                }
            }
        }
        group.waiting = group.waiting.saturating_sub(1);
        if group.waiting > 0 {
            return;
        }
        let Some(group) = self.awaiting.remove(&tag) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(group.conn.0) else {
            return;
        };
        let ours = matches!(conn.state, State::AwaitingRedis { tag: t } if t == tag);
        if conn.serial != group.serial || !ours {
            return;
        }
        conn.state = State::ReadingRequest;
        let draining = self.drain.is_draining();
        for slot in group.slots {
            let mut response = match slot.response {
                Some(ready) => ready,
                None if slot.topics.iter().all(|(_, r)| matches!(r, Some(Ok(_)))) => {
                    let ids: Vec<(String, u64)> = slot
                        .topics
                        .into_iter()
                        .map(|(t, r)| (t, r.and_then(Result::ok).unwrap_or(0)))
                        .collect();
                    api::publish_reply(&ids, slot.receivers as usize)
                }
                None => Reject::RedisUnavailable.response(),
            };
            response.close |= !slot.keep_alive || draining;
            if let Next::Stop = self.respond(group.conn, response, slot.head_only, now) {
                return;
            }
        }
        if self.conns[group.conn.0].peer_shut {
            self.finish(group.conn, now);
        } else {
            // Requests held behind the group (an upgrade, or more than the cap).
            self.on_http_input(group.conn, &[], now);
        }
    }

    fn respond(&mut self, id: ConnId, response: Response, head_only: bool, now: Instant) -> Next {
        if let State::AwaitingRedis { tag } = self.conns[id.0].state
            && let Some(group) = self.awaiting.get_mut(&tag)
        {
            // Behind a publish at Redis: this response waits its turn.
            let close = response.close;
            group.closing |= close;
            group.slots.push(Slot {
                response: Some(response),
                head_only,
                keep_alive: !close,
                topics: Vec::new(),
                receivers: 0,
            });
            return if close { Next::Stop } else { Next::KeepReading };
        }
        *self.counters.responses.entry(response.status).or_default() += 1;
        self.conns[id.0]
            .out
            .push(Bytes::from(response.encode(head_only)));
        self.mark_dirty(id);
        if response.close {
            self.finish(id, now);
            Next::Stop
        } else {
            Next::KeepReading
        }
    }

    // ---- WebSocket -------------------------------------------------------------------

    fn open_websocket(&mut self, id: ConnId, opening: Opening, rest: &[u8], now: Instant) {
        let Opening {
            kind,
            accept,
            topics,
            grant,
        } = opening;
        *self.counters.responses.entry(101).or_default() += 1;
        let conn = &mut self.conns[id.0];
        conn.out.push(Bytes::from(
            upgrade::switching_protocols(accept).encode(false),
        ));
        self.timers.disarm(&mut conn.timers, id.0, Timer::Request);
        self.timers.disarm(&mut conn.timers, id.0, Timer::Idle);
        let mut session = Session::new(Ws::new(self.cfg.max_message_size), kind, now);
        let mut notes = Vec::new();
        match grant {
            Some(Ok(g)) => {
                self.timers.arm(
                    &mut conn.timers,
                    id.0,
                    Timer::Grant,
                    grant_deadline(&g, now),
                );
                info!("{}: token accepted for sub {:?}", conn.peer, g.sub);
                session.grant = Some(Box::new(g));
            }
            Some(Err(e)) => notes.push(session::error(&OpError::new(e.code(), e.message()))),
            None => {}
        }
        // Private topics need the grant; the others subscribe as usual.
        let (topics, refused): (Vec<&String>, Vec<&String>) = topics
            .iter()
            .partition(|t| may_subscribe(&self.cfg.private_topics, &session, t));
        for topic in refused {
            notes.push(session::error(&forbidden(topic)));
        }
        // `?topics=` was capped at the per-connection limit when it was parsed.
        let joined: Vec<(&String, Joined)> = topics
            .into_iter()
            .filter_map(|t| {
                self.hub
                    .subscribe(id, &mut session.memberships, t)
                    .ok()
                    .map(|j| (t, j))
            })
            .collect();
        conn.state = State::Open(Box::new(session));
        self.timers.arm(
            &mut conn.timers,
            id.0,
            Timer::Ping,
            now + self.cfg.ping_interval,
        );
        // Errors about the token and refused topics count like the same errors later.
        self.counters.op_errors += notes.len() as u64;
        for note in notes {
            self.queue(id, note);
        }
        for (topic, joined) in joined {
            self.joined(id, topic, joined);
        }
        self.mark_dirty(id);
        if !rest.is_empty() {
            self.on_ws_input(id, rest, now);
        }
    }

    /// After a subscribe: confirm it to the client, or, for a topic Redis has not yet
    /// confirmed, hold the confirmation until it does.
    fn joined(&mut self, id: ConnId, topic: &str, joined: Joined) {
        let hold = match self.redis.as_mut() {
            Some(r) => {
                if joined == Joined::NewTopic {
                    r.subscribe(topic);
                }
                // While Redis is down the subscription is recorded and will be made on
                // reconnect; holding the reply until then would only stall the client.
                r.is_up() && !r.is_confirmed(topic)
            }
            None => false,
        };
        if hold {
            let serial = self.conns[id.0].serial;
            self.pending_acks
                .entry(topic.to_string())
                .or_default()
                .push((id, serial));
        } else {
            let reply = self.subscribed_reply(id, topic);
            self.queue(id, reply);
        }
    }

    /// `subscribed`, with the user the connection's token names.
    fn subscribed_reply(&self, id: ConnId, topic: &str) -> Bytes {
        let sub = match &self.conns[id.0].state {
            State::Open(s) => s.grant.as_ref().and_then(|g| g.sub.as_deref()),
            _ => None,
        };
        session::subscribed(topic, sub)
    }

    fn verify_token(&self, token: &str) -> Result<Grant, TokenError> {
        match &self.cfg.tokens {
            Some(v) => v.verify(token),
            None => Err(TokenError::Invalid("this server accepts no tokens".into())),
        }
    }

    /// A token presented with the `auth` op replaces the grant; private subscriptions
    /// the new grant does not cover end. A refused token leaves the old grant in place.
    fn on_auth(&mut self, id: ConnId, token: &str, now: Instant) {
        let grant = match self.verify_token(token) {
            Ok(g) => g,
            Err(e) => {
                let reply = self.op_error(OpError::new(e.code(), e.message()));
                return self.queue(id, reply);
            }
        };
        let conn = &mut self.conns[id.0];
        let State::Open(session) = &mut conn.state else {
            return;
        };
        self.timers.arm(
            &mut conn.timers,
            id.0,
            Timer::Grant,
            grant_deadline(&grant, now),
        );
        info!("{}: token accepted for sub {:?}", conn.peer, grant.sub);
        let reply = session::authenticated(&grant);
        let keep = grant.topics.clone();
        session.grant = Some(Box::new(grant));
        self.queue(id, reply);
        self.end_private_subscriptions(id, |t| keep.matches(t), "not_granted");
    }

    /// The grant ran out: private subscriptions end, public ones go on.
    fn on_grant_timer(&mut self, id: ConnId, now: Instant) {
        let conn = &mut self.conns[id.0];
        let State::Open(session) = &mut conn.state else {
            return;
        };
        let Some(grant) = &session.grant else { return };
        if grant.exp > auth::unix_now() {
            // The wall clock moved: wait for the real expiry.
            let at = grant_deadline(grant, now);
            self.timers.arm(&mut conn.timers, id.0, Timer::Grant, at);
            return;
        }
        debug!("{}: token for sub {:?} expired", conn.peer, grant.sub);
        session.grant = None;
        self.end_private_subscriptions(id, |_| false, "token_expired");
    }

    /// Unsubscribe from every private topic `keep` refuses, telling the client why.
    fn end_private_subscriptions(&mut self, id: ConnId, keep: impl Fn(&str) -> bool, reason: &str) {
        let State::Open(session) = &mut self.conns[id.0].state else {
            return;
        };
        let ended: Vec<String> = self
            .hub
            .names(&session.memberships)
            .into_iter()
            .filter(|t| self.cfg.private_topics.matches(t) && !keep(t))
            .collect();
        let mut freed = Vec::new();
        for topic in &ended {
            if self.hub.unsubscribe(&mut session.memberships, topic) == Left::TopicFreed {
                freed.push(topic.clone());
            }
        }
        self.forget_topics(freed);
        for topic in ended {
            self.queue(id, session::unsubscribed(&topic, Some(reason)));
        }
    }

    /// Send the held `subscribed` replies for `topic` to connections still subscribed.
    fn release_acks(&mut self, topic: &str) {
        let Some(waiting) = self.pending_acks.remove(topic) else {
            return;
        };
        for (id, serial) in waiting {
            let still = match self.conns.get(id.0) {
                Some(c) if c.serial == serial => match &c.state {
                    State::Open(s) => self.hub.is_subscribed(&s.memberships, topic),
                    _ => false,
                },
                _ => false,
            };
            if still {
                let reply = self.subscribed_reply(id, topic);
                self.queue(id, reply);
            }
        }
    }

    /// Topics that lost their last local subscriber: with Redis, stop receiving them.
    fn forget_topics(&mut self, freed: Vec<String>) {
        for topic in freed {
            if let Some(r) = self.redis.as_mut() {
                r.unsubscribe(&topic);
            }
            self.pending_acks.remove(&topic);
        }
    }

    fn on_ws_input(&mut self, id: ConnId, mut input: &[u8], now: Instant) {
        let conn = &mut self.conns[id.0];
        // Any byte from the peer is a sign of life.
        self.timers.disarm(&mut conn.timers, id.0, Timer::Pong);
        loop {
            let conn = &mut self.conns[id.0];
            let (event, open) = match &mut conn.state {
                State::Open(s) => {
                    s.last_seen = now;
                    (s.ws.read(&mut input, &mut conn.out), true)
                }
                State::Closing(s) => (s.ws.read(&mut input, &mut conn.out), false),
                _ => return,
            };
            match event {
                WsEvent::NeedMore => break,
                // Messages that cross our close frame are dropped, as RFC 6455 §1.4 allows.
                WsEvent::Message(_) if !open => continue,
                WsEvent::Message(Message::Text(text)) => self.on_text(id, text.as_str(), now),
                WsEvent::Message(Message::Binary(data)) => self.on_binary(id, &data, now),
                WsEvent::Message(_) => continue,
                WsEvent::Closed => {
                    self.finish(id, now);
                    break;
                }
                WsEvent::Fail(reason) if open => {
                    debug!("closing {} with {:?}", self.conns[id.0].peer, reason);
                    self.close_websocket(id, reason, now);
                    break;
                }
                // Garbage after our close frame: nothing more to say to this peer.
                WsEvent::Fail(_) => {
                    self.finish(id, now);
                    break;
                }
            }
        }
        // Pongs and close replies that tungstenite wrote into the queue; everything else
        // that queues output marks the connection itself.
        if self.conns.get(id.0).is_some_and(|c| !c.out.is_empty()) {
            self.mark_dirty(id);
        }
    }

    fn on_binary(&mut self, id: ConnId, data: &[u8], now: Instant) {
        let Some(session) = self.conns[id.0].session_mut() else {
            return;
        };
        match session.kind {
            Kind::Echo => self.queue(id, ws::binary_frame(data)),
            Kind::Topics => self.close_websocket(id, CloseReason::Unsupported, now),
        }
    }

    fn on_text(&mut self, id: ConnId, text: &str, now: Instant) {
        let conn = &mut self.conns[id.0];
        let State::Open(session) = &mut conn.state else {
            return;
        };
        if session.kind == Kind::Echo {
            self.queue(id, ws::text_frame(text.as_bytes()));
            return;
        }
        let reply = match session::parse_op(text) {
            Ok(Op::Subscribe(topic))
                if !may_subscribe(&self.cfg.private_topics, session, &topic) =>
            {
                self.op_error(forbidden(&topic))
            }
            Ok(Op::Subscribe(topic)) => {
                match self.hub.subscribe(id, &mut session.memberships, &topic) {
                    Ok(joined) => {
                        self.joined(id, &topic, joined);
                        return;
                    }
                    Err(SubscribeError::TooManyTopics) => self.op_error(OpError::new(
                        "too_many_topics",
                        format!(
                            "at most {} topics per connection",
                            crate::hub::MAX_TOPICS_PER_CONNECTION
                        ),
                    )),
                }
            }
            Ok(Op::Unsubscribe(topic)) => {
                if self.hub.unsubscribe(&mut session.memberships, &topic) == Left::TopicFreed {
                    self.forget_topics(vec![topic.to_string()]);
                }
                session::unsubscribed(&topic, None)
            }
            Ok(Op::Ping) => session::pong(),
            Ok(Op::Auth(token)) => {
                let token = token.into_owned();
                self.on_auth(id, &token, now);
                return;
            }
            Ok(Op::Publish(topic, _))
                if !self.cfg.client_publish.matches(&topic)
                    && !session
                        .grant
                        .as_ref()
                        .is_some_and(|g| g.publish.matches(&topic)) =>
            {
                self.op_error(OpError::new(
                    "forbidden",
                    format!("clients may not publish to {topic:?}"),
                ))
            }
            Ok(Op::Publish(topic, data)) => {
                let Some(r) = self.redis.as_mut() else {
                    self.publish(&topic, data, now);
                    return;
                };
                if r.publish(&topic, data.get(), None, now) {
                    self.counters.published += 1;
                    return;
                }
                self.op_error(OpError::new(
                    "unavailable",
                    "redis unavailable: not published",
                ))
            }
            Err(e) => self.op_error(e),
        };
        self.queue(id, reply);
    }

    fn op_error(&mut self, e: OpError) -> Bytes {
        self.counters.op_errors += 1;
        session::error(&e)
    }

    /// Assign an id and queue the frame to every local subscriber. Returns the id and the
    /// number of subscribers reached.
    fn publish(&mut self, topic: &str, data: &RawValue, now: Instant) -> (u64, usize) {
        let published = self.hub.publish(topic, data);
        self.counters.published += 1;
        let reached = self.fan_out(&published, now);
        (published.id, reached)
    }

    /// Queue one framed message to every local subscriber of its topic; close the ones it
    /// makes slow consumers. Returns how many it reached.
    fn fan_out(&mut self, published: &Published, now: Instant) -> usize {
        let mut reached = 0;
        let mut slow = Vec::new();
        for sub in self.hub.subscribers(published) {
            // The hub holds open sessions only; a miss would be our bug, not a reason to die.
            let Some(conn) = self.conns.get_mut(sub.0) else {
                debug_assert!(false, "hub names a connection that is gone");
                continue;
            };
            conn.out.push(published.frame.clone());
            reached += 1;
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(sub);
            }
            if conn.out.len() > self.cfg.send_queue_limit {
                slow.push(sub);
            }
        }
        self.counters.delivered += reached as u64;
        for sub in slow {
            self.close_websocket(sub, CloseReason::SlowConsumer, now);
        }
        reached
    }

    // ---- Redis -----------------------------------------------------------------------

    fn service_redis(&mut self, now: Instant) {
        if let Some(r) = self.redis.as_mut() {
            r.tick(now, self.poll.registry(), &mut self.redis_events);
        }
        self.drain_redis_events(now);
        if self.drain_redis_until.is_some_and(|t| now >= t) {
            warn!("redis did not answer the drain's PING in time; closing WebSockets now");
            self.close_all_websockets(now);
        }
    }

    fn flush_redis(&mut self, now: Instant) {
        if let Some(r) = self.redis.as_mut() {
            r.flush(self.poll.registry(), now, &mut self.redis_events);
        }
        self.drain_redis_events(now);
    }

    fn drain_redis_events(&mut self, now: Instant) {
        let mut events = mem::take(&mut self.redis_events);
        for event in events.drain(..) {
            match event {
                redis::Event::Published { tag, result } => self.on_publish_result(tag, result, now),
                redis::Event::Message { topic, id, data } => {
                    self.counters.redis_messages += 1;
                    if let Some(published) = self.hub.deliver(&topic, id, &data) {
                        self.fan_out(&published, now);
                    }
                }
                redis::Event::Confirmed { topic } => self.release_acks(&topic),
                redis::Event::SubscriptionReady => {
                    if let Some(r) = self.redis.as_mut() {
                        r.resubscribe(self.hub.topic_names());
                    }
                }
                redis::Event::Up => {}
                redis::Event::Down => {
                    let topics: Vec<String> = self.pending_acks.keys().cloned().collect();
                    for topic in topics {
                        self.release_acks(&topic);
                    }
                }
                redis::Event::Pong => {
                    if self.drain_redis_until.is_some() {
                        self.close_all_websockets(now);
                    }
                }
            }
        }
        self.redis_events = events;
    }

    /// Close from our side: leave every topic and queue the close frame behind what is
    /// already queued (so accepted messages arrive first). Then either give the peer
    /// `CLOSE_GRACE` to answer, or, if it broke the protocol, just flush and hang up.
    fn close_websocket(&mut self, id: ConnId, reason: CloseReason, now: Instant) {
        let conn = &mut self.conns[id.0];
        let State::Open(mut session) = mem::replace(&mut conn.state, State::Dead) else {
            return;
        };
        let freed = self.hub.unsubscribe_all(&mut session.memberships);
        if reason == CloseReason::SlowConsumer {
            // Its queue is what got it here; the close frame must not wait behind it.
            let dropped = conn.out.drop_unstarted();
            self.counters.slow_consumers += 1;
            self.counters.undelivered_bytes += dropped as u64;
            info!(
                "slow consumer {}: {dropped} queued bytes dropped, closing with 1008",
                conn.peer
            );
        }
        session.ws.close(reason, &mut conn.out);
        *self
            .counters
            .ws_closed
            .entry(reason.code().into())
            .or_default() += 1;
        self.timers.disarm(&mut conn.timers, id.0, Timer::Ping);
        self.timers.disarm(&mut conn.timers, id.0, Timer::Pong);
        if reason.awaits_reply() {
            conn.state = State::Closing(session);
            self.timers
                .arm(&mut conn.timers, id.0, Timer::CloseGrace, now + CLOSE_GRACE);
            self.mark_dirty(id);
        } else {
            self.finish(id, now);
        }
        self.forget_topics(freed);
    }

    /// The exchange is over: write what is queued, then close our side. A peer that will
    /// not take even that much is cut after `CLOSE_GRACE`.
    fn finish(&mut self, id: ConnId, now: Instant) {
        self.leave_session(id);
        let conn = &mut self.conns[id.0];
        conn.state = State::Finishing;
        for kind in [Timer::Request, Timer::Idle, Timer::Ping, Timer::Pong] {
            self.timers.disarm(&mut conn.timers, id.0, kind);
        }
        self.timers
            .arm(&mut conn.timers, id.0, Timer::CloseGrace, now + CLOSE_GRACE);
        self.mark_dirty(id);
    }

    /// Take the connection out of `Open`/`Closing`, leaving its topics.
    fn leave_session(&mut self, id: ConnId) {
        let conn = &mut self.conns[id.0];
        if let State::Open(mut session) = mem::replace(&mut conn.state, State::Dead) {
            let freed = self.hub.unsubscribe_all(&mut session.memberships);
            self.forget_topics(freed);
        }
    }

    fn queue(&mut self, id: ConnId, frame: Bytes) {
        self.conns[id.0].out.push(frame);
        self.mark_dirty(id);
    }

    // ---- timers ----------------------------------------------------------------------

    fn fire_timers(&mut self, now: Instant) {
        while let Some((key, kind)) = self
            .timers
            .pop_expired(now, |k| self.conns.get_mut(k).map(|c| &mut c.timers))
        {
            let id = ConnId(key);
            match kind {
                Timer::Request => {
                    self.counters.handshake_timeouts += 1;
                    debug!("request timeout: {}", self.conns[key].peer);
                    self.kill(id);
                }
                Timer::Idle => {
                    self.counters.idle_timeouts += 1;
                    self.kill(id);
                }
                Timer::Ping => self.on_ping_timer(id, now),
                Timer::Pong => {
                    self.counters.pong_timeouts += 1;
                    debug!("no answer to ping: {}", self.conns[key].peer);
                    self.kill(id);
                }
                Timer::CloseGrace => self.kill(id),
                Timer::Grant => self.on_grant_timer(id, now),
            }
        }
    }

    /// Ping only a WebSocket that has been silent for a whole interval: a chatty one is
    /// evidently alive, and its proxy's idle timer is being reset anyway.
    fn on_ping_timer(&mut self, id: ConnId, now: Instant) {
        let interval = self.cfg.ping_interval;
        let conn = &mut self.conns[id.0];
        let State::Open(session) = &conn.state else {
            return;
        };
        let silent_since = session.last_seen;
        if now.duration_since(silent_since) < interval {
            self.timers
                .arm(&mut conn.timers, id.0, Timer::Ping, silent_since + interval);
            return;
        }
        ws::queue_ping(&mut conn.out);
        if conn.timers.get(Timer::Pong).is_none() {
            self.timers.arm(
                &mut conn.timers,
                id.0,
                Timer::Pong,
                now + self.cfg.pong_timeout,
            );
        }
        self.timers
            .arm(&mut conn.timers, id.0, Timer::Ping, now + interval);
        self.mark_dirty(id);
    }

    // ---- writing ---------------------------------------------------------------------

    fn mark_dirty(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(id.0)
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push(id);
        }
    }

    /// One writev per dirty connection. A connection the kernel would not fully take
    /// asks for WRITABLE; one that used its budget is retried next pass.
    fn flush_dirty(&mut self, now: Instant) {
        let dirty = mem::take(&mut self.dirty);
        for &id in &dirty {
            let Some(conn) = self.conns.get_mut(id.0) else {
                continue;
            };
            conn.dirty = false;
            if matches!(conn.state, State::Dead) {
                continue;
            }
            let syscalls = &mut self.counters.write_syscalls;
            match conn.out.write_to(&mut conn.stream, WRITE_BUDGET, syscalls) {
                Ok(Flushed::Drained) => {
                    if matches!(conn.state, State::Finishing) {
                        if conn.peer_shut {
                            self.kill(id);
                            continue;
                        }
                        // FIN after the last byte, then wait for the peer's: closing now
                        // with unread input would send RST and could destroy our answer.
                        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                        conn.state = State::Lingering;
                        self.timers.arm(
                            &mut conn.timers,
                            id.0,
                            Timer::CloseGrace,
                            now + CLOSE_GRACE,
                        );
                    }
                }
                Ok(Flushed::Blocked) => {}
                Ok(Flushed::Budget) => {
                    conn.dirty = true;
                    self.dirty.push(id);
                }
                Err(e) => {
                    debug!("write {}: {e}", conn.peer);
                    self.kill(id);
                    continue;
                }
            }
            self.update_interest(id);
        }
    }

    fn update_interest(&mut self, id: ConnId) {
        let conn = &mut self.conns[id.0];
        let wanted = conn.interest();
        if wanted != conn.registered {
            match self
                .poll
                .registry()
                .reregister(&mut conn.stream, id.token(), wanted)
            {
                Ok(()) => conn.registered = wanted,
                Err(e) => {
                    warn!("reregister {}: {e}", conn.peer);
                    self.kill(id);
                }
            }
        }
    }

    // ---- ending connections ----------------------------------------------------------

    /// End a connection now: leave its topics, mark it for reaping after this pass.
    fn kill(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get(id.0) else {
            return;
        };
        if matches!(conn.state, State::Dead) {
            return;
        }
        self.leave_session(id);
        self.reap.push(id);
    }

    fn reap_dead(&mut self) {
        for id in mem::take(&mut self.reap) {
            let Some(mut conn) = self.conns.try_remove(id.0) else {
                continue;
            };
            self.counters.undelivered_bytes += conn.out.len() as u64;
            self.timers.disarm_all(&mut conn.timers, id.0);
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
    }

    // ---- signals and drain -----------------------------------------------------------

    fn on_signals(&mut self, now: Instant) -> Option<i32> {
        let count = self.signals.pending().count();
        for _ in 0..count {
            match self.drain.on_signal(now, self.cfg.drain_timeout) {
                OnSignal::StartDrain => self.start_drain(now),
                OnSignal::ExitNow => {
                    warn!(
                        "second signal: exiting now, abandoning {} connections and {} queued bytes",
                        self.conns.len(),
                        self.queued_bytes()
                    );
                    return Some(1);
                }
            }
        }
        None
    }

    /// PRODUCT.md's order: health turns 503 (the drain state says so from now on), the
    /// listener closes, every WebSocket gets 1001 behind the messages already queued to
    /// it, idle HTTP connections close, busy ones close after their response.
    fn start_drain(&mut self, now: Instant) {
        info!(
            "draining {} connections (deadline {} s)",
            self.conns.len(),
            self.cfg.drain_timeout.as_secs()
        );
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Stopping]) {
            warn!("sd_notify STOPPING=1 failed: {e}");
        }
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        // With Redis, messages accepted before the drain may still be on their way back to
        // us: PING the subscription link, and close WebSockets once Redis answers (it
        // answers after everything published before the PING has been sent to us).
        let waiting_for_redis = self
            .redis
            .as_mut()
            .is_some_and(|r| r.is_up() && r.ping_subscription());
        if waiting_for_redis {
            self.drain_redis_until = Some(now + DRAIN_REDIS_WAIT);
        } else {
            self.close_all_websockets(now);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let id = ConnId(key);
            let conn = &self.conns[key];
            let between_requests = conn.partial.is_empty();
            match conn.state {
                State::ReadingRequest if between_requests && conn.out.is_empty() => self.kill(id),
                // Its last response is still going out; the connection ends after it.
                State::ReadingRequest if between_requests => self.finish(id, now),
                // A request in progress gets its answer with `Connection: close`.
                _ => {}
            }
        }
    }

    /// Drain step 4 for WebSockets: close 1001, behind every message already queued.
    fn close_all_websockets(&mut self, now: Instant) {
        self.drain_redis_until = None;
        let open: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Open(_)))
            .map(|(k, _)| k)
            .collect();
        for key in open {
            self.close_websocket(ConnId(key), CloseReason::GoingAway, now);
        }
    }

    fn advance_drain(&mut self, now: Instant) -> Option<i32> {
        match self.drain.finished(now, self.conns.len())? {
            Finished::Drained => info!("drained; exiting"),
            Finished::DeadlinePassed => warn!(
                "drain timeout: abandoning {} connections and {} queued bytes",
                self.conns.len(),
                self.queued_bytes()
            ),
        }
        Some(0)
    }

    // ---- metrics ---------------------------------------------------------------------

    fn queued_bytes(&self) -> usize {
        self.conns.iter().map(|(_, c)| c.out.len()).sum()
    }

    fn render_metrics(&self) -> String {
        let (cpu_seconds, resident_bytes) = metrics::process_usage();
        let gauges = Gauges {
            connections: self.conns.len(),
            websockets: self
                .conns
                .iter()
                .filter(|(_, c)| matches!(c.state, State::Open(_)))
                .count(),
            topics: self.hub.topic_count(),
            queued_bytes: self.queued_bytes(),
            fd_limit: self.nofile.soft,
            max_connections: self.max_connections,
            draining: self.drain.is_draining(),
            cpu_seconds,
            resident_bytes,
            redis: self.redis.as_ref().map(|r| metrics::RedisGauges {
                up: r.is_up(),
                channels: r.confirmed_count(),
                in_flight: r.in_flight(),
                reconnects: r.counters.reconnects,
                errors: r.counters.errors,
            }),
        };
        metrics::render(&self.counters, &gauges)
    }
}

/// Loopback, including IPv4-mapped IPv6 (`::ffff:127.0.0.1`) from a dual-stack listener.
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
    }
}

/// The error for a private topic the connection has no grant for.
fn forbidden(topic: &str) -> OpError {
    OpError::new(
        "forbidden",
        format!("no grant for the private topic {topic:?}"),
    )
}

/// The monotonic instant at which `grant` expires (it is stated in Unix seconds).
fn grant_deadline(grant: &Grant, now: Instant) -> Instant {
    now + Duration::from_secs(grant.exp.saturating_sub(auth::unix_now()))
}

/// Public topics are open to all; a private one needs the session's grant.
fn may_subscribe(private: &crate::topic::Patterns, session: &Session, topic: &str) -> bool {
    !private.matches(topic)
        || session
            .grant
            .as_ref()
            .is_some_and(|g| g.topics.matches(topic))
}
