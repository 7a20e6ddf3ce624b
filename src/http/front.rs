//! The front door: what an HTTP connection's bytes mean. It parses requests (pipelined
//! ones too) with `parse`, times their arrival (slowloris), routes them with `api`,
//! answers health and metrics, sends publishes into the pipeline, and hands accepted
//! upgrades to the session handler.
//!
//! It owns the responses held behind publishes at Redis: a connection's responses must
//! leave in request order, so while a publish waits for Redis, the requests pipelined
//! behind it are still executed but their answers wait in a `Group` until the last Redis
//! reply arrives. It never touches a socket: responses are queued through the connection
//! table, and a connection that must end is finished or killed there for the loop.

use std::collections::HashMap;
use std::mem;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::info;

use crate::close::Reject;
use crate::config::Config;
use crate::conn::{ClientAddr, ConnId, Conns, State};
use crate::http::api::{self, Policy, Route};
use crate::http::proxy::{self, Prelude};
use crate::http::{Method, Parsed, Request, Response, parse};
use crate::limits::Refused;
use crate::metrics::{self, Counters, Gauges};
use crate::pubsub::PubSub;
use crate::pubsub::history::History;
use crate::pubsub::pipeline::{HttpPresence, HttpRead};
use crate::pubsub::redis::Stored;
use crate::session::{Opening, Sessions};
use crate::timer::Timer;
use crate::ws::protocol;

/// Most requests one connection may have answered-but-not-sent behind a publish at
/// Redis; past it, parsing pauses until Redis replies.
const MAX_HELD_RESPONSES: usize = 1024;

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
    /// A `/history` read at Redis, for this topic since this id.
    history_pending: bool,
    history_topic: String,
    history_since: u64,
    history_epoch: Option<String>,
    /// A `GET /presence` read at Redis.
    presence_pending: bool,
}

impl Slot {
    fn new(response: Option<Response>, head_only: bool, keep_alive: bool) -> Slot {
        Slot {
            response,
            head_only,
            keep_alive,
            topics: Vec::new(),
            receivers: 0,
            history_pending: false,
            history_topic: String::new(),
            history_since: 0,
            history_epoch: None,
            presence_pending: false,
        }
    }
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

/// The settings the front door applies, taken from the configuration once.
pub struct Rules {
    pub api_key: Option<String>,
    pub allowed_origins: Option<Vec<String>>,
    pub max_message_size: usize,
    pub send_queue_limit: usize,
    pub handshake_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub require_token: bool,
    /// `GET /` serves the console page.
    pub console: bool,
    /// permessage-deflate may be accepted.
    pub compression: bool,
    /// For `/metrics`.
    pub fd_limit: u64,
    pub max_connections: usize,
    /// `--metrics-listen` is set: the main port does not answer `/metrics`.
    pub metrics_elsewhere: bool,
}

/// What a request may touch besides the front door's own state: the connections, the
/// publish pipeline, the counters, the session handler (upgrades), and whether a drain
/// has begun.
pub struct Env<'a> {
    pub conns: &'a mut Conns,
    pub pubsub: &'a mut PubSub,
    pub counters: &'a mut Counters,
    pub sessions: &'a Sessions,
    pub draining: bool,
}

pub struct Front {
    rules: Rules,
    /// Publishes waiting for Redis, by tag.
    awaiting: HashMap<u64, Group>,
    next_tag: u64,
}

impl Rules {
    /// The front door's share of the configuration, and the limits `/metrics` reports.
    pub fn new(cfg: &Config, fd_limit: u64, max_connections: usize) -> Rules {
        Rules {
            api_key: cfg.api_key.clone(),
            allowed_origins: cfg.allowed_origins.clone(),
            max_message_size: cfg.max_message_size,
            send_queue_limit: cfg.send_queue_limit,
            handshake_timeout: cfg.handshake_timeout,
            keepalive_timeout: cfg.keepalive_timeout,
            require_token: cfg.require_token,
            console: cfg.console,
            compression: cfg.compression,
            fd_limit,
            max_connections,
            metrics_elsewhere: cfg.metrics_listen.is_some(),
        }
    }
}

impl Front {
    pub fn new(rules: Rules) -> Front {
        Front {
            rules,
            awaiting: HashMap::new(),
            next_tag: 1,
        }
    }

    /// Bytes from a connection in `ReadingRequest` or `AwaitingRedis`.
    pub fn on_input(&mut self, env: &mut Env, id: ConnId, input: &[u8], now: Instant) {
        if env.conns[id].client() == ClientAddr::ProxyUnread {
            return self.on_prelude(env, id, input, now);
        }
        let conn = &mut env.conns[id];
        // Parse straight from the scratch slice unless part of a request is already held.
        let mut held = mem::take(&mut conn.partial);
        if !held.is_empty() {
            held.extend_from_slice(input);
        }
        let data: &[u8] = if held.is_empty() { input } else { &held };
        let mut pos = 0;
        loop {
            if env.conns[id].out.len() > self.rules.send_queue_limit {
                // Pipelining requests without reading the answers: a slow consumer too.
                env.counters.slow_consumers += 1;
                info!(
                    "{} sends requests but does not read the responses; closing",
                    env.conns[id].peer
                );
                env.pubsub.leave(env.conns.kill(id), now);
                return;
            }
            let rest = &data[pos..];
            match parse(rest, self.rules.max_message_size) {
                Ok(Parsed::Complete(req, used)) => {
                    let start = pos;
                    pos += used;
                    env.conns[id].sent_continue = false;
                    // The next request's clock starts at its own first byte.
                    env.conns.disarm(id, Timer::Request);
                    match self.on_request(env, id, *req, &data[pos..], now) {
                        Next::KeepReading => continue,
                        Next::Stop => return,
                        // Not now: this request and what follows wait for Redis's replies.
                        Next::Hold => {
                            env.conns[id].partial = data[start..].to_vec();
                            return;
                        }
                    }
                }
                Ok(partial @ (Parsed::Partial | Parsed::AwaitingBody { .. })) => {
                    let conn = &mut env.conns[id];
                    if let Parsed::AwaitingBody {
                        expect_continue: true,
                    } = partial
                        && !conn.sent_continue
                    {
                        conn.sent_continue = true;
                        env.conns
                            .queue(id, Bytes::from_static(b"HTTP/1.1 100 Continue\r\n\r\n"));
                    }
                    self.keep_partial(env.conns, id, rest, now);
                    return;
                }
                Err(reject) => {
                    // No PROXY header is read here: one is either a trusted proxy's, read
                    // before any HTTP byte (`on_prelude`), or not to be believed.
                    let reject = if proxy::looks_like_proxy(rest) {
                        env.counters.refusals.bump(Refused::ProxyUntrusted);
                        Reject::Proxy(
                            "PROXY protocol header not accepted: only from --trusted-proxies, \
                             before any HTTP byte",
                        )
                    } else {
                        reject
                    };
                    self.respond(env, id, Response::refuse(&reject), false, now);
                    return;
                }
            }
        }
    }

    /// A trusted proxy's first bytes: a PROXY v2 header naming the client (or LOCAL, its
    /// own connection), else HTTP straight away (refused with `--require-proxy-protocol`).
    /// The header may come in pieces; it is held in `partial` under the request timer.
    fn on_prelude(&mut self, env: &mut Env, id: ConnId, input: &[u8], now: Instant) {
        let conn = &mut env.conns[id];
        let mut data = mem::take(&mut conn.partial);
        data.extend_from_slice(input);
        let refused = match proxy::parse(&data) {
            Ok(Prelude::NeedMore) => {
                env.conns[id].partial = data;
                return;
            }
            Ok(Prelude::None) if env.conns.addresses.settings.require_proxy => {
                env.counters.refusals.bump(Refused::ProxyMissing);
                Reject::Proxy(
                    "a PROXY protocol v2 header is required from this peer \
                     (--require-proxy-protocol)",
                )
            }
            Ok(Prelude::None) => {
                let _ = env.conns.name_client(id, (None, true), now);
                return self.on_input(env, id, &data, now);
            }
            Ok(Prelude::Header { client, len }) => {
                // A proxy behind a proxy: its address says nothing; XFF may, at upgrade.
                let client = client.filter(|ip| !env.conns.addresses.is_trusted(*ip));
                match env.conns.name_client(id, (client, true), now) {
                    Ok(()) if data.len() > len => return self.on_input(env, id, &data[len..], now),
                    Ok(()) => return,
                    Err(limit) => {
                        env.counters.refusals.bump(limit.refused());
                        Reject::Limited(limit)
                    }
                }
            }
            Err(e) => {
                env.counters.refusals.bump(Refused::ProxyMalformed);
                Reject::Proxy(e.text())
            }
        };
        if env.conns[id].client() == ClientAddr::ProxyUnread {
            let _ = env.conns.name_client(id, (None, true), now);
        }
        self.respond(env, id, Response::refuse(&refused), false, now);
    }

    /// A trusted proxy's upgrade without a PROXY header: its `X-Forwarded-For` names the
    /// WebSocket's client, who is then held to the per-address limits.
    fn forwarded_upgrade(
        &mut self,
        env: &mut Env,
        id: ConnId,
        req: &Request,
        now: Instant,
    ) -> Result<(), Reject> {
        if !matches!(
            env.conns[id].client(),
            ClientAddr::ProxyOwn | ClientAddr::ForwardedFor(_)
        ) {
            return Ok(());
        }
        let trusted = &env.conns.addresses.settings.trusted;
        let client = req
            .forwarded_for
            .as_deref()
            .and_then(|h| crate::limits::forwarded_client(h, trusted));
        env.conns
            .name_client(id, (client, false), now)
            .map_err(|limit| {
                env.counters.refusals.bump(limit.refused());
                Reject::Limited(limit)
            })
    }

    /// The peer sent FIN on an HTTP connection.
    pub fn on_eof(&mut self, env: &mut Env, id: ConnId, now: Instant) {
        let conn = &mut env.conns[id];
        conn.peer_shut = true;
        let ended = match conn.state {
            // The peer may have half-closed after its request; let the answer go out.
            State::ReadingRequest if !conn.out.is_empty() => env.conns.finish(id, now),
            // The answer still goes out when Redis replies; then the connection ends.
            State::Finishing | State::AwaitingRedis { .. } => return,
            _ => env.conns.kill(id),
        };
        env.pubsub.leave(ended, now);
    }

    /// Hold the start of an incomplete request, and time its arrival: the head must be
    /// complete within `--handshake-timeout` of its first byte (slowloris).
    fn keep_partial(&self, conns: &mut Conns, id: ConnId, rest: &[u8], now: Instant) {
        if rest.is_empty() {
            conns.disarm(id, Timer::Request);
            conns.arm(id, Timer::Idle, now + self.rules.keepalive_timeout);
            return;
        }
        conns[id].partial = rest.to_vec();
        conns.disarm(id, Timer::Idle);
        if !conns[id].timers.is_armed(Timer::Request) {
            conns.arm(id, Timer::Request, now + self.rules.handshake_timeout);
        }
    }

    fn on_request(
        &mut self,
        env: &mut Env,
        id: ConnId,
        req: Request,
        rest: &[u8],
        now: Instant,
    ) -> Next {
        let draining = env.draining;
        let policy = Policy {
            api_key: self.rules.api_key.as_deref(),
            allowed_origins: self.rules.allowed_origins.as_deref(),
            // The client's address, not the proxy's: a request HAProxy relays from afar
            // is not a loopback one.
            peer_is_loopback: is_loopback(env.conns[id].client_ip()),
            draining,
            console: self.rules.console,
            compression: self.rules.compression,
        };
        let head_only = req.method == Method::Head;
        if let State::AwaitingRedis { tag } = env.conns[id].state {
            let full = self
                .awaiting
                .get(&tag)
                .is_none_or(|g| g.closing || g.slots.len() >= MAX_HELD_RESPONSES);
            if full || req.upgrade.is_some() {
                return Next::Hold;
            }
        }
        let mut routed = api::for_port(
            api::route(&req, &policy),
            env.conns[id].metrics_port,
            self.rules.metrics_elsewhere,
        );
        if req.upgrade.is_some()
            && routed.is_ok()
            && let Err(reject) = self.forwarded_upgrade(env, id, &req, now)
        {
            routed = Err(reject);
        }
        let mut response = match routed {
            Err(reject) => Response::refuse(&reject),
            Ok(Route::Health) if draining => Response::refuse(&Reject::Draining),
            Ok(Route::Asset(asset)) => asset.respond(req.if_none_match.as_deref()),
            Ok(Route::Health) => match env.pubsub.redis() {
                None => Response::text(200, "ok"),
                Some(r) if r.delivery_broken() => {
                    Response::text(200, "ok (redis up, delivery broken)")
                }
                Some(r) if r.is_up() => Response::text(200, "ok (redis up)"),
                Some(_) => Response::text(200, "ok (redis down)"),
            },
            Ok(Route::Metrics) => Response::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                self.render_metrics(env),
            ),
            Ok(Route::Publish(p)) if env.pubsub.through_redis() => {
                return self.publish_through_redis(env, id, p, (req.keep_alive, head_only), now);
            }
            Ok(Route::Publish(p)) => {
                let mut ids = Vec::with_capacity(p.topics.len());
                let mut delivered = 0;
                for topic in p.topics {
                    let (msg_id, reach) =
                        env.pubsub.publish_local(env.counters, &topic, &p.data, now);
                    delivered += reach;
                    ids.push((topic, msg_id));
                }
                api::publish_reply(&ids, delivered)
            }
            Ok(Route::History {
                topic,
                since,
                epoch,
            }) if env.pubsub.through_redis() => {
                let query = (topic, since, epoch);
                return self.history_through_redis(
                    env,
                    id,
                    query,
                    (req.keep_alive, head_only),
                    now,
                );
            }
            Ok(Route::History {
                topic,
                since,
                epoch,
            }) => local_history_reply(env.pubsub.history(), &topic, since, epoch.as_deref()),
            Ok(Route::Presence { topic }) if !env.pubsub.keeps_presence(&topic) => {
                Response::refuse(&Reject::NoPresence)
            }
            Ok(Route::Presence { topic }) if env.pubsub.through_redis() => {
                return self.presence_through_redis(
                    env,
                    id,
                    topic,
                    (req.keep_alive, head_only),
                    now,
                );
            }
            Ok(Route::Presence { topic }) => {
                let snapshot = env.pubsub.presence_snapshot(&topic);
                Response::json(200, protocol::presence_json(None, &topic, &snapshot))
            }
            Ok(Route::Upgrade {
                kind,
                accept,
                topics,
                resume,
                token,
                presence,
                deflate,
            }) => {
                let grant = token.map(|t| env.sessions.verify_token(&t));
                // `--auth-url`: without a valid token, the application decides.
                if env.pubsub.app().asks_connect() && !matches!(grant, Some(Ok(_))) {
                    let opening = Opening {
                        kind,
                        accept,
                        topics,
                        resume,
                        grant: None,
                        presence,
                        deflate,
                    };
                    self.ask_app(env, id, &req, opening, rest, now);
                    return Next::Stop;
                }
                match (&grant, self.rules.require_token) {
                    (Some(Ok(_)), _) | (_, false) => {
                        let opening = Opening {
                            kind,
                            accept,
                            topics,
                            resume,
                            grant,
                            presence,
                            deflate,
                        };
                        env.sessions.open(
                            env.conns,
                            env.pubsub,
                            env.counters,
                            id,
                            opening,
                            rest,
                            now,
                        );
                        return Next::Stop;
                    }
                    (None, true) => {
                        Response::refuse(&Reject::TokenRequired("token required".into()))
                    }
                    (Some(Err(e)), true) => Response::refuse(&Reject::TokenRequired(e.message())),
                }
            }
        };
        // While draining, every response says the connection ends (PRODUCT.md).
        response.close |= !req.keep_alive || draining;
        self.respond(env, id, response, head_only, now)
    }

    /// Hold the upgrade (and what came behind it) while the application is asked; the
    /// answer opens or refuses it (`app::gate`). The request timer bounds the wait, also
    /// in the queue behind `--auth-concurrency`.
    fn ask_app(
        &mut self,
        env: &mut Env,
        id: ConnId,
        req: &Request,
        opening: Opening,
        rest: &[u8],
        now: Instant,
    ) {
        let conn = &mut env.conns[id];
        let asker = (id, conn.serial);
        let remote = conn.client_ip();
        let path = match &req.query {
            Some(q) => format!("{}?{q}", req.path),
            None => req.path.clone(),
        };
        conn.state = State::AwaitingApp(Box::new(opening));
        conn.partial = rest.to_vec();
        env.conns
            .arm(id, Timer::Request, now + self.rules.handshake_timeout);
        env.pubsub
            .app_mut()
            .ask_connect(asker, &req.headers, &path, remote);
    }

    /// Send each topic's message to Redis. The response waits for the replies, in a group
    /// with the responses of any requests pipelined behind it (`on_publish_result`).
    fn publish_through_redis(
        &mut self,
        env: &mut Env,
        id: ConnId,
        p: api::Publish,
        (keep_alive, head_only): (bool, bool),
        now: Instant,
    ) -> Next {
        if !env.pubsub.redis_up() {
            return self.redis_unavailable(env, id, (keep_alive, head_only), now);
        }
        let tag = self.group_of(env.conns, id);
        for topic in &p.topics {
            env.pubsub
                .publish_to_redis(topic, p.data.get(), Some(tag), now);
        }
        if let Some(group) = self.awaiting.get_mut(&tag) {
            group.waiting += p.topics.len();
            let mut slot = Slot::new(None, head_only, keep_alive);
            slot.topics = p.topics.into_iter().map(|t| (t, None)).collect();
            group.slots.push(slot);
        }
        Next::KeepReading
    }

    /// 503: what needs Redis cannot be done while it is down.
    fn redis_unavailable(
        &mut self,
        env: &mut Env,
        id: ConnId,
        (keep_alive, head_only): (bool, bool),
        now: Instant,
    ) -> Next {
        let mut response = Response::refuse(&Reject::RedisUnavailable);
        response.close |= !keep_alive || env.draining;
        self.respond(env, id, response, head_only, now)
    }

    /// The group holding `id`'s responses behind Redis, begun now if there is none.
    fn group_of(&mut self, conns: &mut Conns, id: ConnId) -> u64 {
        let conn = &mut conns[id];
        if let State::AwaitingRedis { tag } = conn.state {
            return tag;
        }
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

    /// `GET /history` through Redis: read there; the response waits in the group, in
    /// request order, like a publish's.
    fn history_through_redis(
        &mut self,
        env: &mut Env,
        id: ConnId,
        (topic, since, epoch): (String, u64, Option<String>),
        (keep_alive, head_only): (bool, bool),
        now: Instant,
    ) -> Next {
        if !env.pubsub.redis_up() {
            return self.redis_unavailable(env, id, (keep_alive, head_only), now);
        }
        let tag = self.group_of(env.conns, id);
        env.pubsub
            .read_for_http(&topic, since, epoch.as_deref(), tag, now);
        let epoch = epoch.filter(|e| !e.is_empty());
        if let Some(group) = self.awaiting.get_mut(&tag) {
            group.waiting += 1;
            let mut slot = Slot::new(None, head_only, keep_alive);
            slot.history_pending = true;
            slot.history_topic = topic;
            slot.history_since = since;
            slot.history_epoch = epoch;
            group.slots.push(slot);
        }
        Next::KeepReading
    }

    /// `GET /presence` through Redis: every process's members, merged there; the
    /// response waits in the group, in request order.
    fn presence_through_redis(
        &mut self,
        env: &mut Env,
        id: ConnId,
        topic: String,
        (keep_alive, head_only): (bool, bool),
        now: Instant,
    ) -> Next {
        if !env.pubsub.redis_up() {
            return self.redis_unavailable(env, id, (keep_alive, head_only), now);
        }
        let tag = self.group_of(env.conns, id);
        env.pubsub.presence_for_http(&topic, tag, now);
        if let Some(group) = self.awaiting.get_mut(&tag) {
            group.waiting += 1;
            let mut slot = Slot::new(None, head_only, keep_alive);
            slot.presence_pending = true;
            group.slots.push(slot);
        }
        Next::KeepReading
    }

    /// Redis answered a `GET /presence` held in a group.
    pub fn on_presence_read(&mut self, env: &mut Env, read: HttpPresence, now: Instant) {
        let Some(group) = self.awaiting.get_mut(&read.group) else {
            return;
        };
        if let Some(slot) = group.slots.iter_mut().find(|s| s.presence_pending) {
            slot.presence_pending = false;
            slot.response = Some(match read.result {
                Ok(snapshot) => {
                    Response::json(200, protocol::presence_json(None, &read.topic, &snapshot))
                }
                Err(_) => Response::refuse(&Reject::RedisUnavailable),
            });
        }
        group.waiting = group.waiting.saturating_sub(1);
        self.settle(env, read.group, now);
    }

    /// One Redis reply to a publish. Replies come in the order the publishes were sent,
    /// so each fills the first topic still waiting. The last one sends the group's
    /// responses in request order and lets the connection read on.
    pub fn on_publish_result(
        &mut self,
        env: &mut Env,
        tag: u64,
        result: Result<(u64, u64), String>,
        now: Instant,
    ) {
        let Some(group) = self.awaiting.get_mut(&tag) else {
            return;
        };
        let outcome = match result {
            Ok((msg_id, receivers)) => {
                env.counters.published += 1;
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
        self.settle(env, tag, now);
    }

    /// Redis answered a `/history` read held in a group: its response is ready.
    pub fn on_history_read(&mut self, env: &mut Env, read: HttpRead, now: Instant) {
        let Some(group) = self.awaiting.get_mut(&read.group) else {
            return;
        };
        // Reads are answered in the order they were sent: the first still waiting.
        if let Some(slot) = group.slots.iter_mut().find(|s| s.history_pending) {
            slot.history_pending = false;
            slot.response = Some(match read.result {
                Ok(stored) => redis_history_reply(
                    &slot.history_topic,
                    (slot.history_since, slot.history_epoch.as_deref()),
                    &stored,
                ),
                Err(_) => Response::refuse(&Reject::RedisUnavailable),
            });
        }
        group.waiting = group.waiting.saturating_sub(1);
        self.settle(env, read.group, now);
    }

    /// Once every Redis reply of a group is in, send its responses in request order and
    /// let the connection read on.
    fn settle(&mut self, env: &mut Env, tag: u64, now: Instant) {
        if self.awaiting.get(&tag).is_none_or(|g| g.waiting > 0) {
            return;
        }
        let Some(group) = self.awaiting.remove(&tag) else {
            return;
        };
        let Some(conn) = env.conns.same(group.conn, group.serial) else {
            return;
        };
        if !matches!(conn.state, State::AwaitingRedis { tag: t } if t == tag) {
            return;
        }
        env.conns[group.conn].state = State::ReadingRequest;
        let count = group.slots.len();
        for (n, slot) in group.slots.into_iter().enumerate() {
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
                None => Response::refuse(&Reject::RedisUnavailable),
            };
            // A drain that began while these waited ends the connection after the last
            // of them, not the first: every publish Redis ran gets its answer.
            response.close |= !slot.keep_alive || (env.draining && n + 1 == count);
            if let Next::Stop = self.respond(env, group.conn, response, slot.head_only, now) {
                return;
            }
        }
        if env.conns[group.conn].peer_shut {
            env.pubsub.leave(env.conns.finish(group.conn, now), now);
        } else {
            // Requests held behind the group (an upgrade, or more than the cap).
            self.on_input(env, group.conn, &[], now);
        }
    }

    fn respond(
        &mut self,
        env: &mut Env,
        id: ConnId,
        response: Response,
        head_only: bool,
        now: Instant,
    ) -> Next {
        if let State::AwaitingRedis { tag } = env.conns[id].state
            && let Some(group) = self.awaiting.get_mut(&tag)
        {
            // Behind a publish at Redis: this response waits its turn.
            let close = response.close;
            group.closing |= close;
            group
                .slots
                .push(Slot::new(Some(response), head_only, !close));
            return if close { Next::Stop } else { Next::KeepReading };
        }
        *env.counters.responses.entry(response.status).or_default() += 1;
        env.conns.queue(id, Bytes::from(response.encode(head_only)));
        if response.close {
            env.pubsub.leave(env.conns.finish(id, now), now);
            Next::Stop
        } else {
            Next::KeepReading
        }
    }

    /// The `/metrics` text; also what the loop turns into StatsD reports.
    pub fn render_metrics(&self, env: &Env) -> String {
        let (cpu_seconds, resident_bytes) = metrics::process_usage();
        let gauges = Gauges {
            connections: env.conns.len(),
            websockets: env.conns.websockets(),
            websockets_deflate: env.conns.websockets_deflate(),
            topics: env.pubsub.topic_count(),
            queued_bytes: env.conns.queued_bytes(),
            fd_limit: self.rules.fd_limit,
            max_connections: self.rules.max_connections,
            draining: env.draining,
            cpu_seconds,
            resident_bytes,
            redis: env.pubsub.redis_gauges(),
            history: (!env.pubsub.through_redis()).then(|| env.pubsub.history_gauges()),
            resumes: env.pubsub.resumes(),
            limits: metrics::LimitGauges {
                subscriptions: env.pubsub.subscriptions().0,
                max_subscriptions: env.pubsub.subscriptions().1,
                addresses: env.conns.addresses.len(),
            },
        };
        let mut text = metrics::render(env.counters, &gauges);
        env.pubsub.app().render_metrics(&mut text);
        text
    }
}

/// `GET /history` without Redis. Without `epoch`, `since` is read in the current one.
fn local_history_reply(
    history: &History,
    topic: &str,
    since: u64,
    epoch: Option<&str>,
) -> Response {
    let Some(at) = history.position(topic) else {
        return history_reply(topic, None, 0, false, std::iter::empty());
    };
    let epoch = epoch.unwrap_or(&at.epoch);
    match history.resume(topic, epoch, since) {
        Some(r) => {
            let recovered = r.recovered();
            let messages = r.messages.map(|m| (m.id(), m.data()));
            history_reply(
                topic,
                Some(&r.position.epoch),
                r.position.last_id,
                recovered,
                messages,
            )
        }
        None => history_reply(topic, None, 0, false, std::iter::empty()),
    }
}

/// `GET /history` through Redis: the read returned what follows `since`.
fn redis_history_reply(
    topic: &str,
    (since, epoch): (u64, Option<&str>),
    stored: &Stored,
) -> Response {
    let missed = stored.last_id.saturating_sub(since);
    let recovered = epoch.is_none_or(|e| e == stored.epoch)
        && since <= stored.last_id
        && stored.messages.len() as u64 == missed
        && stored
            .messages
            .first()
            .is_none_or(|(id, _)| *id == since + 1);
    let messages = stored.messages.iter().map(|(id, d)| (*id, d.as_bytes()));
    history_reply(
        topic,
        Some(&stored.epoch),
        stored.last_id,
        recovered,
        messages,
    )
}

/// `{"topic":"t","epoch":"E","id":L,"recovered":bool,"messages":[{"id":N,"data":...}]}`;
/// `epoch` is null for a topic with no history at all. Each `data` is spliced in as
/// kept: it was checked as JSON when it was published.
fn history_reply<'a>(
    topic: &str,
    epoch: Option<&str>,
    last_id: u64,
    recovered: bool,
    messages: impl Iterator<Item = (u64, &'a [u8])>,
) -> Response {
    let epoch = serde_json::to_string(&epoch).unwrap_or_else(|_| "null".into());
    let mut body = format!(
        r#"{{"topic":"{topic}","epoch":{epoch},"id":{last_id},"recovered":{recovered},"messages":["#
    )
    .into_bytes();
    for (i, (id, data)) in messages.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(format!(r#"{{"id":{id},"data":"#).as_bytes());
        body.extend_from_slice(data);
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    Response::json(200, body)
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

#[cfg(test)]
mod tests {
    use crate::conn::State;
    use crate::testkit::World;
    use crate::timer::Timer;

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let mut w = World::new(&[]);
        let id = w.connect();
        w.send(
            id,
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        let out = w.take_text(id);
        let ok = out.find("HTTP/1.1 200").expect("health answered");
        let missing = out.find("HTTP/1.1 404").expect("404 answered");
        assert!(ok < missing, "{out}");
        assert!(matches!(w.conns[id].state, State::ReadingRequest));
        // Between requests only the keep-alive idle timer runs.
        assert!(w.conns[id].timers.is_armed(Timer::Idle));
        assert!(!w.conns[id].timers.is_armed(Timer::Request));
    }

    #[test]
    fn a_partial_head_waits_under_the_request_timer() {
        let mut w = World::new(&[]);
        let id = w.connect();
        w.send(id, b"GET /hea");
        assert!(w.take_output(id).is_empty());
        assert!(w.conns[id].timers.is_armed(Timer::Request));
        w.send(id, b"lth HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(w.take_text(id).starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn while_draining_health_is_503_and_the_connection_ends() {
        let mut w = World::new(&[]);
        w.draining = true;
        let id = w.connect();
        w.send(id, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        let out = w.take_text(id);
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        assert!(out.contains("Connection: close\r\n"), "{out}");
        assert!(matches!(w.conns[id].state, State::Finishing));
    }

    #[test]
    fn a_publish_reaches_subscribers_and_reports_the_count() {
        let mut w = World::new(&[]);
        let sub = w.open("/ws?topics=news");
        assert_eq!(w.messages(sub)[0]["op"], "subscribed");
        let reply = w.publish(r#"{"topic":"news","data":{"n":1}}"#);
        assert!(reply.ends_with(r#"{"delivered":1,"id":1}"#), "{reply}");
        let got = w.messages(sub);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["op"], "message");
        assert_eq!(got[0]["data"]["n"], 1);
        assert_eq!(w.counters.delivered, 1);
    }

    #[test]
    fn keyless_publish_from_afar_is_forbidden() {
        let mut w = World::new(&[]);
        let id = w.connect_from("10.1.2.3");
        let body = r#"{"topic":"news","data":1}"#;
        let request = format!(
            "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        w.send(id, request.as_bytes());
        assert!(w.take_text(id).starts_with("HTTP/1.1 403"));
        assert_eq!(w.counters.published, 0);
    }

    #[test]
    fn a_pipeliner_that_reads_nothing_is_cut_as_a_slow_consumer() {
        let mut w = World::new(&["--send-queue-limit", "1000"]);
        let id = w.connect();
        let many = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100);
        w.send(id, many.as_bytes());
        assert!(matches!(w.conns[id].state, State::Dead));
        assert_eq!(w.counters.slow_consumers, 1);
    }
}
