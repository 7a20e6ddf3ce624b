//! The application as herald's authority: connect and subscribe callbacks over HTTP
//! (`--auth-url`), and webhooks (`--webhook-url`). herald asks, the application decides,
//! from the session cookie it already issues; the loop never waits for it.
//!
//! `App` owns what is asked and of whom: each question gets a tag, the request goes
//! through a `client::Client` (the pool, the cap on requests in flight, the FIFO beyond
//! it, the deadlines), and its answer comes back as an `Answered` the handlers act on: the
//! front door opens or refuses the waiting upgrade, the session handler subscribes or
//! refuses. A callback's 200 carries the claims a token carries and becomes the same
//! `Grant`. Anything but 200, 401 or 403, and any failure or timeout, refuses: nothing is
//! ever allowed by accident.
//!
//! It never holds a socket of a client connection, and its own sockets are touched only in
//! `on_ready`, `tick` and `flush`, which only the reactor calls (as with the Redis link).

pub mod client;
pub mod gate;
pub mod sign;
pub mod webhook;
pub mod wire;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::{Registry, Token};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::Grant;
use crate::id::ConnId;
use crate::topic::Patterns;
use crate::ws::protocol::Resume;
use client::{Client, Done, Outcome};
use webhook::{Kind, Webhooks};
use wire::Target;

/// A callback grant without `exp` lasts for the connection; the grant timer still needs
/// an instant, so it is this far away.
const NO_EXPIRY_SECS: u64 = 10 * 365 * 24 * 3600;
/// Subscribe questions one connection may have at the application at once: a client
/// cannot queue unbounded work for the app by spraying private topic names.
pub const MAX_ASKS_PER_CONNECTION: u32 = 16;
/// Fewest bytes of `--auth-secret`: less is guessable offline from one signed request.
const MIN_SECRET: usize = 16;

/// The flags, grouped here so `config.rs` only flattens them in.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AppArgs {
    /// Ask this URL (http://) whether a WebSocket handshake may connect: herald POSTs the
    /// forwarded headers, path and remote address; 200 with a grant lets it in
    #[arg(long, env = "HERALD_AUTH_URL", value_name = "URL")]
    pub auth_url: Option<String>,

    /// Signs every callback and webhook: X-Herald-Signature is
    /// sha256=HMAC-SHA256(secret, timestamp + "." + body), X-Herald-Timestamp the Unix
    /// seconds (at least 16 bytes)
    #[arg(
        long,
        env = "HERALD_AUTH_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub auth_secret: Option<String>,

    /// Request headers forwarded to --auth-url (comma-separated, case-insensitive)
    #[arg(
        long,
        env = "HERALD_AUTH_FORWARD_HEADERS",
        value_name = "LIST",
        default_value = "cookie,authorization"
    )]
    pub auth_forward_headers: String,

    /// The longest herald waits for the application's answer (a callback, or a webhook
    /// batch); past it the handshake gets 503
    #[arg(
        long,
        env = "HERALD_AUTH_TIMEOUT",
        value_name = "SECS",
        default_value_t = 3.0
    )]
    pub auth_timeout: f64,

    /// A subscribe to a private topic the grant does not cover asks --auth-url too
    /// ({"sub","topic"} → 200 or 403); the answer is kept for the connection
    #[arg(long, env = "HERALD_AUTH_SUBSCRIBE")]
    pub auth_subscribe: bool,

    /// Most callback requests in flight at the application (one connection each); past
    /// it, handshakes wait in arrival order
    #[arg(
        long,
        env = "HERALD_AUTH_CONCURRENCY",
        value_name = "N",
        default_value_t = 32
    )]
    pub auth_concurrency: usize,

    /// POST events here (http://), batched and signed: topic_occupied, topic_vacated and,
    /// on --presence topics, member_added and member_removed
    #[arg(long, env = "HERALD_WEBHOOK_URL", value_name = "URL")]
    pub webhook_url: Option<String>,

    /// Webhook events held while the application does not take them; past it they are
    /// dropped, counted and logged
    #[arg(
        long,
        env = "HERALD_WEBHOOK_QUEUE",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub webhook_queue: usize,
}

/// The validated flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub secret: Vec<u8>,
    pub auth: Option<Target>,
    /// Lower-cased header names.
    pub forward: Vec<String>,
    pub timeout: Duration,
    pub subscribe: bool,
    pub concurrency: usize,
    pub webhook: Option<Target>,
    pub webhook_queue: usize,
}

impl AppArgs {
    /// `None` when neither callbacks nor webhooks are configured.
    pub fn settings(&self) -> Result<Option<Settings>, String> {
        if self.auth_url.is_none() && self.webhook_url.is_none() {
            if self.auth_subscribe {
                return Err("--auth-subscribe needs --auth-url".into());
            }
            return Ok(None);
        }
        let secret = match &self.auth_secret {
            Some(s) if s.len() >= MIN_SECRET => s.as_bytes().to_vec(),
            Some(_) => return Err(format!("--auth-secret must be at least {MIN_SECRET} bytes")),
            None => {
                return Err(
                    "--auth-url and --webhook-url need --auth-secret, which signs every request"
                        .into(),
                );
            }
        };
        if !(self.auth_timeout > 0.0 && self.auth_timeout <= 60.0) {
            return Err("--auth-timeout must be more than 0 and at most 60 seconds".into());
        }
        if !(1..=client::MAX_POOL).contains(&self.auth_concurrency) {
            return Err(format!(
                "--auth-concurrency must be between 1 and {}",
                client::MAX_POOL
            ));
        }
        if self.auth_subscribe && self.auth_url.is_none() {
            return Err("--auth-subscribe needs --auth-url".into());
        }
        if self.webhook_queue == 0 {
            return Err("--webhook-queue must be at least 1".into());
        }
        let auth = match &self.auth_url {
            Some(url) => Some(wire::parse_url(url).map_err(|e| format!("--auth-url {e}"))?),
            None => None,
        };
        let webhook = match &self.webhook_url {
            Some(url) => Some(wire::parse_url(url).map_err(|e| format!("--webhook-url {e}"))?),
            None => None,
        };
        let forward = self
            .auth_forward_headers
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        Ok(Some(Settings {
            secret,
            auth,
            forward,
            timeout: Duration::from_secs_f64(self.auth_timeout),
            subscribe: self.auth_subscribe,
            concurrency: self.auth_concurrency,
            webhook,
            webhook_queue: self.webhook_queue,
        }))
    }
}

/// What the application decided about a handshake.
#[derive(Debug)]
pub enum Verdict {
    Grant(Grant),
    /// 401 or 403, with the application's one-line reason.
    Refuse(u16, String),
    /// Anything else, a timeout, the application down or draining: 503.
    Unavailable(String),
}

/// A question whose answer has come back.
#[derive(Debug)]
pub enum Answered {
    Connect {
        id: ConnId,
        serial: u64,
        verdict: Verdict,
    },
    Subscribe {
        id: ConnId,
        serial: u64,
        topic: String,
        resume: Option<Resume<'static>>,
        watch: bool,
        allowed: bool,
    },
}

#[derive(Debug)]
enum Ask {
    Connect {
        id: ConnId,
        serial: u64,
    },
    Subscribe {
        id: ConnId,
        serial: u64,
        topic: String,
        resume: Option<Resume<'static>>,
        watch: bool,
    },
}

impl Ask {
    fn asker(&self) -> (ConnId, u64) {
        match self {
            Ask::Connect { id, serial } | Ask::Subscribe { id, serial, .. } => (*id, *serial),
        }
    }
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct AuthCounters {
    allowed: u64,
    refused: u64,
    unavailable: u64,
    subscribe_allowed: u64,
    subscribe_refused: u64,
    abandoned: u64,
    max_in_flight: usize,
}

struct Auth {
    client: Client,
    forward: Vec<String>,
    subscribe: bool,
    asks: HashMap<u64, Ask>,
    /// Subscribe questions pending, by connection serial (absent: none).
    asking: HashMap<u64, u32>,
    counters: AuthCounters,
}

impl Auth {
    fn subscribe_settled(&mut self, serial: u64) {
        if let Some(n) = self.asking.get_mut(&serial) {
            *n -= 1;
            if *n == 0 {
                self.asking.remove(&serial);
            }
        }
    }
}

struct Hooks {
    client: Client,
    queue: Webhooks,
    /// The tag of the batch in flight.
    in_flight: Option<u64>,
}

/// The application's part of a live upgrade's state (`App::export`).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Carried {
    auth: Option<(AuthCounters, client::ClientCounters)>,
    hooks: Option<HookCounts>,
    /// Webhook events not yet delivered, oldest first.
    undelivered: Vec<String>,
}

/// The webhooks' counters, and their client's.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct HookCounts(webhook::HookCounters, client::ClientCounters);

/// Callbacks and webhooks; both absent when neither is configured (then every method is
/// a cheap no-op).
pub struct App {
    secret: Vec<u8>,
    auth: Option<Auth>,
    hooks: Option<Hooks>,
    next_tag: u64,
    rng: u64,
    done: Vec<Done>,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

impl App {
    pub fn new(settings: Option<&Settings>) -> App {
        let Some(s) = settings else {
            return App {
                secret: Vec::new(),
                auth: None,
                hooks: None,
                next_tag: 1,
                rng: 1,
                done: Vec::new(),
            };
        };
        let auth = s.auth.clone().map(|target| {
            info!(
                "auth callbacks to http://{}{} ({} in flight at most, {:?} timeout)",
                target.host, target.path, s.concurrency, s.timeout
            );
            Auth {
                client: Client::new("auth", target, s.concurrency, s.timeout, client::TOKEN_TOP),
                forward: s.forward.clone(),
                subscribe: s.subscribe,
                asks: HashMap::new(),
                asking: HashMap::new(),
                counters: AuthCounters::default(),
            }
        });
        let hooks = s.webhook.clone().map(|target| {
            info!("webhooks to http://{}{}", target.host, target.path);
            Hooks {
                client: Client::new(
                    "webhook",
                    target,
                    1,
                    s.timeout,
                    client::TOKEN_TOP - client::MAX_POOL,
                ),
                queue: Webhooks::new(s.webhook_queue),
                in_flight: None,
            }
        });
        App {
            secret: s.secret.clone(),
            auth,
            hooks,
            next_tag: 1,
            rng: crate::pubsub::history::wall_clock_seed() | 1,
            done: Vec::new(),
        }
    }

    // ---- callbacks (pure) --------------------------------------------------------------

    /// Handshakes must be asked about.
    pub fn asks_connect(&self) -> bool {
        self.auth.is_some()
    }

    /// Subscribes beyond the grant are asked about (`--auth-subscribe`).
    pub fn asks_subscribe(&self) -> bool {
        self.auth.as_ref().is_some_and(|a| a.subscribe)
    }

    /// Ask whether the handshake of `id` may connect; the answer comes as
    /// `Answered::Connect`.
    pub fn ask_connect(
        &mut self,
        (id, serial): (ConnId, u64),
        headers: &[(String, String)],
        path: &str,
        remote_addr: IpAddr,
    ) {
        let tag = self.tag();
        let Some(auth) = self.auth.as_mut() else {
            return;
        };
        // A header sent more than once is joined, as RFC 9110 §5.3 allows, and cookies as
        // RFC 6265 §5.4 writes them (HTTP/2 front ends split `Cookie` into several).
        let mut forwarded = serde_json::Map::new();
        for (name, value) in headers.iter().filter(|(n, _)| auth.forward.contains(n)) {
            let joined = match forwarded.get(name).and_then(|v| v.as_str()) {
                Some(earlier) if name == "cookie" => format!("{earlier}; {value}"),
                Some(earlier) => format!("{earlier}, {value}"),
                None => value.clone(),
            };
            forwarded.insert(name.clone(), json!(joined));
        }
        let headers = forwarded;
        let body = json!({
            "headers": headers,
            "path": path,
            "remote_addr": remote_addr.to_string(),
        });
        let request = wire::encode_request(
            auth.client.target(),
            &self.secret,
            crate::auth::unix_now(),
            body.to_string().as_bytes(),
        );
        auth.client.submit(tag, request);
        auth.asks.insert(tag, Ask::Connect { id, serial });
    }

    /// Ask whether `sub` may subscribe to `topic`; the answer comes as
    /// `Answered::Subscribe`, with what the subscribe asked for. False (nothing asked)
    /// when the connection has `MAX_ASKS_PER_CONNECTION` questions pending already.
    pub fn ask_subscribe(
        &mut self,
        (id, serial): (ConnId, u64),
        sub: Option<&str>,
        topic: &str,
        (resume, watch): (Option<Resume<'static>>, bool),
    ) -> bool {
        let tag = self.tag();
        let Some(auth) = self.auth.as_mut() else {
            return false;
        };
        let pending = auth.asking.entry(serial).or_default();
        if *pending >= MAX_ASKS_PER_CONNECTION {
            return false;
        }
        *pending += 1;
        let body = json!({"sub": sub, "topic": topic});
        let request = wire::encode_request(
            auth.client.target(),
            &self.secret,
            crate::auth::unix_now(),
            body.to_string().as_bytes(),
        );
        auth.client.submit(tag, request);
        auth.asks.insert(
            tag,
            Ask::Subscribe {
                id,
                serial,
                topic: topic.to_string(),
                resume,
                watch,
            },
        );
        true
    }

    /// A drain began: handshakes not yet sent to the application are answered 503 now
    /// rather than after the queue ahead of them (those in flight keep their deadline).
    pub fn drain(&mut self, out: &mut Vec<Answered>) {
        let Some(auth) = self.auth.as_mut() else {
            return;
        };
        let mut refused = Vec::new();
        auth.client.retain_queued(|tag| {
            let connect = matches!(auth.asks.get(&tag), Some(Ask::Connect { .. }));
            if connect {
                refused.push(tag);
            }
            !connect
        });
        for tag in refused {
            if let Some(Ask::Connect { id, serial }) = auth.asks.remove(&tag) {
                out.push(Answered::Connect {
                    id,
                    serial,
                    verdict: Verdict::Unavailable("draining".into()),
                });
            }
        }
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    // ---- webhooks (pure) ---------------------------------------------------------------

    pub fn hooks_on(&self) -> bool {
        self.hooks.is_some()
    }

    /// Questions to the application still unanswered (a live upgrade waits for them).
    pub fn questions(&self) -> usize {
        self.auth.as_ref().map_or(0, |a| a.asks.len())
    }

    /// The subscribes still waiting for the application: (connection, serial, topic).
    pub fn subscribes_waiting(&self) -> Vec<(ConnId, u64, &str)> {
        let Some(auth) = self.auth.as_ref() else {
            return Vec::new();
        };
        let waiting = auth.asks.values().filter_map(|ask| match ask {
            Ask::Subscribe {
                id, serial, topic, ..
            } => Some((*id, *serial, topic.as_str())),
            Ask::Connect { .. } => None,
        });
        waiting.collect()
    }

    /// What a live upgrade carries: the counters, and the webhooks not yet delivered
    /// (`Carried`, as JSON for the state file's body).
    pub fn export(&self) -> serde_json::Value {
        let carried = Carried {
            auth: self.auth.as_ref().map(|a| (a.counters, a.client.counters)),
            hooks: self
                .hooks
                .as_ref()
                .map(|h| HookCounts(h.queue.counters, h.client.counters)),
            undelivered: self
                .hooks
                .as_ref()
                .map_or_else(Vec::new, |h| h.queue.undelivered()),
        };
        serde_json::to_value(carried).unwrap_or_default()
    }

    /// The new binary takes over what `export` gave (the parts this configuration has:
    /// webhooks carried to a binary without `--webhook-url` are dropped, and logged).
    pub fn carry(&mut self, carried: serde_json::Value, now: Instant) {
        if carried.is_null() {
            return; // an old binary's state, from before the application client
        }
        let carried: Carried = match serde_json::from_value(carried) {
            Ok(c) => c,
            Err(e) => {
                warn!(
                    "upgrade: the application client's state is unreadable ({e}); its counters start again"
                );
                return;
            }
        };
        if let (Some(a), Some((counters, client))) = (self.auth.as_mut(), carried.auth) {
            a.counters = counters;
            a.client.counters = client;
        }
        match (self.hooks.as_mut(), carried.hooks) {
            (Some(h), Some(HookCounts(counters, client))) => {
                h.client.counters = client;
                h.queue.carry(carried.undelivered, counters, now);
            }
            (None, _) if !carried.undelivered.is_empty() => warn!(
                "upgrade: {} webhook events not delivered are dropped: this binary has no \
                 --webhook-url",
                carried.undelivered.len()
            ),
            _ => {}
        }
    }

    pub fn event(&mut self, kind: Kind, topic: &str, member: Option<&str>, now: Instant) {
        if let Some(h) = self.hooks.as_mut() {
            h.queue.push(kind, topic, member, now);
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        let auth = self.auth.as_ref().and_then(|a| a.client.next_deadline());
        let hooks = self.hooks.as_ref().and_then(|h| {
            [h.client.next_deadline(), h.queue.next_deadline()]
                .into_iter()
                .flatten()
                .min()
        });
        [auth, hooks].into_iter().flatten().min()
    }

    pub fn owns(&self, token: Token) -> bool {
        self.auth.as_ref().is_some_and(|a| a.client.owns(token))
            || self.hooks.as_ref().is_some_and(|h| h.client.owns(token))
    }

    // ---- I/O (the reactor's calls only) ------------------------------------------------

    pub fn on_ready(&mut self, token: Token, registry: &Registry, now: Instant) {
        let mut done = std::mem::take(&mut self.done);
        if let Some(a) = self.auth.as_mut().filter(|a| a.client.owns(token)) {
            a.client.on_ready(token, registry, now, &mut done);
        } else if let Some(h) = self.hooks.as_mut().filter(|h| h.client.owns(token)) {
            h.client.on_ready(token, registry, now, &mut done);
        }
        self.done = done;
    }

    pub fn tick(&mut self, registry: &Registry, now: Instant) {
        let mut done = std::mem::take(&mut self.done);
        if let Some(a) = self.auth.as_mut() {
            a.client.tick(now, registry, &mut done);
        }
        if let Some(h) = self.hooks.as_mut() {
            h.client.tick(now, registry, &mut done);
        }
        self.done = done;
    }

    /// Send what is due (queued callbacks whose asker is still `live`, a webhook batch),
    /// and turn the exchanges that ended into `Answered` for the handlers.
    pub fn flush(
        &mut self,
        registry: &Registry,
        now: Instant,
        live: impl Fn(ConnId, u64) -> bool,
        out: &mut Vec<Answered>,
    ) {
        let mut done = std::mem::take(&mut self.done);
        if let Some(h) = self.hooks.as_mut()
            && h.in_flight.is_none()
            && let Some(body) = h.queue.next_batch(now, unix_ms())
        {
            self.next_tag += 1;
            let tag = self.next_tag;
            let request = wire::encode_request(
                h.client.target(),
                &self.secret,
                crate::auth::unix_now(),
                &body,
            );
            h.client.submit(tag, request);
            h.in_flight = Some(tag);
        }
        if let Some(a) = self.auth.as_mut() {
            // A client that left while its question waited costs the app nothing.
            let asks = &mut a.asks;
            let asking = &mut a.asking;
            let counters = &mut a.counters;
            let wanted = |tag| {
                let Some(ask) = asks.get(&tag) else {
                    return false;
                };
                let (id, serial) = ask.asker();
                if live(id, serial) {
                    return true;
                }
                if matches!(ask, Ask::Subscribe { .. }) {
                    if let Some(n) = asking.get_mut(&serial) {
                        *n -= 1;
                        if *n == 0 {
                            asking.remove(&serial);
                        }
                    }
                }
                asks.remove(&tag);
                counters.abandoned += 1;
                false
            };
            a.client.flush(registry, now, &mut done, wanted);
            a.counters.max_in_flight = a.counters.max_in_flight.max(a.client.in_flight());
        }
        if let Some(h) = self.hooks.as_mut() {
            h.client.flush(registry, now, &mut done, |_| true);
        }
        for d in done.drain(..) {
            self.settle(d, now, out);
        }
        self.done = done;
    }

    fn settle(&mut self, done: Done, now: Instant, out: &mut Vec<Answered>) {
        if let Some(h) = self.hooks.as_mut()
            && h.in_flight == Some(done.tag)
        {
            h.in_flight = None;
            let ok = matches!(&done.outcome, Outcome::Answer(a) if (200..300).contains(&a.status));
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            h.queue.on_result(ok, self.rng, now);
            return;
        }
        let Some(auth) = self.auth.as_mut() else {
            return;
        };
        let Some(ask) = auth.asks.remove(&done.tag) else {
            return;
        };
        match ask {
            Ask::Connect { id, serial } => {
                let verdict = verdict(done.outcome);
                match &verdict {
                    Verdict::Grant(_) => auth.counters.allowed += 1,
                    Verdict::Refuse(..) => auth.counters.refused += 1,
                    Verdict::Unavailable(why) => {
                        auth.counters.unavailable += 1;
                        warn_unavailable(why);
                    }
                }
                out.push(Answered::Connect {
                    id,
                    serial,
                    verdict,
                });
            }
            Ask::Subscribe {
                id,
                serial,
                topic,
                resume,
                watch,
            } => {
                auth.subscribe_settled(serial);
                // Only a 200 allows; a failure refuses now and is not kept, so a later
                // subscribe asks again.
                let allowed = matches!(&done.outcome, Outcome::Answer(a) if a.status == 200);
                if allowed {
                    auth.counters.subscribe_allowed += 1;
                } else {
                    auth.counters.subscribe_refused += 1;
                }
                out.push(Answered::Subscribe {
                    id,
                    serial,
                    topic,
                    resume,
                    watch,
                    allowed,
                });
            }
        }
    }

    /// At exit: webhook events that will never be delivered are said, not lost silently.
    pub fn exit_report(&self) {
        let pending = self.hooks.as_ref().map_or(0, |h| h.queue.pending());
        if pending > 0 {
            warn!("webhooks: exiting with {pending} event(s) undelivered");
        }
    }

    // ---- metrics -----------------------------------------------------------------------

    /// This module's lines of `/metrics` (nothing when it is off).
    pub fn render_metrics(&self, out: &mut String) {
        let mut line = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        if let Some(a) = &self.auth {
            let c = &a.counters;
            let k = &a.client.counters;
            line(
                "herald_auth_allowed_total",
                "counter",
                "Handshakes the application allowed (200).",
                c.allowed,
            );
            line(
                "herald_auth_refused_total",
                "counter",
                "Handshakes the application refused (401 or 403).",
                c.refused,
            );
            line(
                "herald_auth_unavailable_total",
                "counter",
                "Handshakes answered 503: the application failed, timed out, was down, or answered something else.",
                c.unavailable,
            );
            line(
                "herald_auth_timeouts_total",
                "counter",
                "Callback requests without an answer in --auth-timeout.",
                k.timeouts,
            );
            line(
                "herald_auth_requests_total",
                "counter",
                "Callback requests sent to the application.",
                k.requests,
            );
            line(
                "herald_auth_connects_total",
                "counter",
                "Connections opened to --auth-url.",
                k.connects,
            );
            line(
                "herald_auth_subscribe_allowed_total",
                "counter",
                "--auth-subscribe questions answered 200.",
                c.subscribe_allowed,
            );
            line(
                "herald_auth_subscribe_refused_total",
                "counter",
                "--auth-subscribe questions refused or failed.",
                c.subscribe_refused,
            );
            line(
                "herald_auth_abandoned_total",
                "counter",
                "Queued callbacks dropped unsent because the client left.",
                c.abandoned,
            );
            line(
                "herald_auth_in_flight",
                "gauge",
                "Callback requests at the application now.",
                a.client.in_flight() as u64,
            );
            line(
                "herald_auth_in_flight_max",
                "gauge",
                "Most callback requests ever at the application at once.",
                c.max_in_flight as u64,
            );
            line(
                "herald_auth_queued",
                "gauge",
                "Callbacks waiting for a free connection (--auth-concurrency).",
                a.client.queued() as u64,
            );
        }
        if let Some(h) = &self.hooks {
            let c = &h.queue.counters;
            line(
                "herald_webhook_events_total",
                "counter",
                "Webhook events that happened.",
                c.events,
            );
            line(
                "herald_webhook_events_delivered_total",
                "counter",
                "Webhook events the application took (2xx).",
                c.delivered,
            );
            line(
                "herald_webhook_events_dropped_total",
                "counter",
                "Webhook events dropped because the queue was full (--webhook-queue).",
                c.dropped,
            );
            line(
                "herald_webhook_batches_total",
                "counter",
                "Webhook POSTs the application took.",
                c.batches,
            );
            line(
                "herald_webhook_failed_attempts_total",
                "counter",
                "Webhook POSTs that failed and will be retried.",
                c.failed_attempts,
            );
            line(
                "herald_webhook_queued",
                "gauge",
                "Webhook events not yet delivered.",
                h.queue.pending() as u64,
            );
        }
    }
}

/// A connect callback's outcome as a decision. Only a 200 with readable claims allows.
fn verdict(outcome: Outcome) -> Verdict {
    let answer = match outcome {
        Outcome::Answer(a) => a,
        Outcome::Timeout => return Verdict::Unavailable("timeout".into()),
        Outcome::Failed(why) => return Verdict::Unavailable(why),
    };
    match answer.status {
        200 => match grant(&answer.body) {
            Ok(g) => Verdict::Grant(g),
            Err(why) => Verdict::Unavailable(format!("unusable grant: {why}")),
        },
        401 => Verdict::Refuse(401, wire::reason_line(&answer.body, "unauthorized")),
        403 => Verdict::Refuse(403, wire::reason_line(&answer.body, "forbidden")),
        other => Verdict::Unavailable(format!("the application answered {other}")),
    }
}

/// The claims of a 200, as a token's would be.
fn grant(body: &[u8]) -> Result<Grant, String> {
    let claims: Claims = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let patterns = |list: &[String], what: &str| {
        Patterns::parse(&list.join(",")).map_err(|e| format!("{what}: {e}"))
    };
    Ok(Grant {
        sub: claims.sub,
        exp: claims
            .exp
            .unwrap_or_else(|| crate::auth::unix_now() + NO_EXPIRY_SECS),
        topics: patterns(&claims.topics, "topics")?,
        publish: patterns(&claims.publish, "publish")?,
        refused: Patterns::default(),
    })
}

fn warn_unavailable(why: &str) {
    // Per handshake would flood the log in a storm against a dead app; debug is enough
    // with the counter, and one line per second at most says it at warn.
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = crate::auth::unix_now();
    if LAST.swap(now, Ordering::Relaxed) != now {
        warn!("auth callback failed: {why}; handshakes get 503 (herald_auth_unavailable_total)");
    }
}

/// A `Resume` kept while the application answers.
pub fn owned_resume(r: Resume<'_>) -> Resume<'static> {
    Resume {
        since: r.since,
        epoch: std::borrow::Cow::Owned(r.epoch.into_owned()),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::Answer;

    fn answer(status: u16, body: &str) -> Outcome {
        Outcome::Answer(Answer {
            status,
            body: body.as_bytes().to_vec(),
            close: false,
        })
    }

    #[test]
    fn only_a_200_with_claims_allows() {
        let v = verdict(answer(
            200,
            r#"{"sub":"42","topics":["user:42","team:7:*"]}"#,
        ));
        let Verdict::Grant(g) = v else {
            panic!("{v:?}")
        };
        assert_eq!(g.sub.as_deref(), Some("42"));
        assert!(g.topics.matches("user:42") && g.topics.matches("team:7:x"));
        assert!(!g.topics.matches("user:43"));
        assert!(
            g.exp > crate::auth::unix_now() + 3600,
            "no exp: the connection's life"
        );
        let v = verdict(answer(403, "banned"));
        assert!(
            matches!(&v, Verdict::Refuse(403, why) if why == "banned"),
            "{v:?}"
        );
        assert!(matches!(verdict(answer(401, "")), Verdict::Refuse(401, _)));
        for (status, body) in [
            (200, "not json"),
            (200, r#"{"topics":["bad topic"]}"#),
            (500, ""),
            (302, ""),
            (201, "{}"),
        ] {
            let v = verdict(answer(status, body));
            assert!(
                matches!(v, Verdict::Unavailable(_)),
                "{status} {body}: {v:?}"
            );
        }
        assert!(matches!(verdict(Outcome::Timeout), Verdict::Unavailable(_)));
        assert!(matches!(
            verdict(Outcome::Failed("refused".into())),
            Verdict::Unavailable(_)
        ));
    }

    #[test]
    fn flags_need_a_secret_and_sane_limits() {
        let base = AppArgs {
            auth_url: Some("http://127.0.0.1:9/auth".into()),
            auth_secret: Some("a-secret-of-16-bytes".into()),
            auth_forward_headers: "Cookie, X-Tenant".into(),
            auth_timeout: 3.0,
            auth_concurrency: 32,
            webhook_queue: 10,
            ..AppArgs::default()
        };
        let s = base.settings().unwrap().unwrap();
        assert_eq!(s.forward, ["cookie", "x-tenant"]);
        assert!(
            AppArgs {
                auth_secret: None,
                ..base.clone()
            }
            .settings()
            .is_err()
        );
        assert!(
            AppArgs {
                auth_secret: Some("short".into()),
                ..base.clone()
            }
            .settings()
            .is_err()
        );
        assert!(
            AppArgs {
                auth_concurrency: 0,
                ..base.clone()
            }
            .settings()
            .is_err()
        );
        assert!(
            AppArgs {
                auth_timeout: 0.0,
                ..base.clone()
            }
            .settings()
            .is_err()
        );
        assert!(AppArgs::default().settings().unwrap().is_none());
        assert!(
            AppArgs {
                auth_subscribe: true,
                ..AppArgs::default()
            }
            .settings()
            .is_err()
        );
    }
}
