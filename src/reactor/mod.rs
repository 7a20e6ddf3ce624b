//! The event loop: one thread, one `mio::Poll`, every socket nonblocking, and every
//! system call herald makes while serving. `run` reads like a table of contents: poll,
//! handle signals, dispatch readiness, fire timers, accept, flush queued output, reap
//! closed connections, advance the drain.
//!
//! The loop owns the sockets and the order of work; what bytes and timers *mean* is
//! decided by the handlers it calls: the front door (`http::front`) for HTTP, the session
//! handler (`session`) for WebSockets, the publish pipeline (`pubsub`) for messages and
//! Redis events. Handlers only queue bytes and move states along in the connection table;
//! the loop then gives each dirty connection one vectored write per pass (as Redis defers
//! writes to `beforeSleep`): HTTP responses first, then the commands to Redis, then the
//! pass's messages, queued and written in time slices; it registers WRITABLE only for a
//! connection the kernel could not take everything from,
//! and removes connections that ended only after the pass, so a reused slab key never
//! receives a stale event.

mod net;
mod state;
pub mod upgrade;

use std::io::{self, Read};
use std::mem;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::{debug, error, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_mio::v1_0::Signals;

use crate::close::Reject;
use crate::config::Config;
use crate::conn::{CLOSE_GRACE, ConnId, Conns, State};
use crate::drain::{Drain, Finished, Jitter, OnSignal, Pacer};
use crate::http::Response;
use crate::http::front::{Env, Front, Rules};
use crate::metrics::Counters;
use crate::outq::Flushed;
use crate::pubsub::PubSub;
use crate::pubsub::history::History;
use crate::pubsub::redis::{self, Event};
use crate::rlimit::NoFile;
use crate::session::Sessions;
use crate::statsd::Reporter;
use crate::timer::{self, Timer};

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
const AGENT: Token = Token(usize::MAX - 5);
/// `--metrics-listen`.
const METRICS: Token = Token(usize::MAX - 8);
// The application client's tokens lie below every Redis link's: a shared token would
// hand one's readiness to the other (`redis::owns` is asked first).
const _: () = assert!(crate::app::client::TOKEN_TOP < redis::LOWEST_TOKEN);
/// Scrapers accepted per wakeup on `--metrics-listen` (Prometheus makes one connection per
/// scrape), and how many may be open beyond `--max-connections`: a server at capacity is
/// when its metrics matter most.
const METRICS_ACCEPTS_PER_PASS: usize = 16;
const METRICS_RESERVE: usize = 16;
/// Agent-check connections answered per wakeup (HAProxy makes one per server per
/// `agent-inter`; more is someone else).
const AGENT_ACCEPTS_PER_PASS: usize = 16;
/// How long after an accept() failure for lack of descriptors the agent still says
/// `drain`: a few of HAProxy's default 2 s checks see it.
const ACCEPT_FAILURE_MEMORY: Duration = Duration::from_secs(5);

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
/// shared and written vectored, so a larger slice costs no copies).
const WRITE_BUDGET: usize = 256 * 1024;
/// How long one pass may spend writing to WebSockets before it polls again: the bound on
/// how long a publish that arrives mid-fan-out waits to be read. A poll costs ~1 µs, so
/// a slice this long costs under 1% in extra syscalls.
const FANOUT_SLICE: Duration = Duration::from_micros(200);
/// Read the clock once per this many writes (each takes 2–20 µs).
const FANOUT_CLOCK_EVERY: usize = 16;
/// After accept() fails for lack of descriptors, accepting pauses this long: a timer,
/// not a retry loop, so the process stays idle while it sits at its fd limit.
const ACCEPT_PAUSE: Duration = Duration::from_millis(250);
/// At most one log line per this interval for accept failures.
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(1);
/// How long a drain waits for Redis to hand over messages accepted before it began.
const DRAIN_REDIS_WAIT: Duration = Duration::from_secs(1);

/// Whether and when to accept.
#[derive(Debug, Default)]
struct Accepting {
    /// The listener may have connections waiting (edge-triggered: no new event will say so).
    ready: bool,
    /// Out of descriptors: do not try before this.
    paused_until: Option<Instant>,
    last_warning: Option<Instant>,
    /// The last accept() that failed for lack of descriptors.
    last_failure: Option<Instant>,
}

/// A client socket, kept by the loop beside its record in the connection table (same key).
#[derive(Debug)]
struct Socket {
    stream: TcpStream,
    /// What mio has registered for it.
    registered: Interest,
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

pub struct Server {
    poll: Poll,
    events: Events,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    /// The self-pipe that wakes `poll` when a signal lands.
    signals: Signals,
    /// Set by the signal handler itself, so the loop can see a signal without a system
    /// call before it answers anything (the pipe's event may only come next pass).
    signalled: Arc<AtomicBool>,
    /// A second signal asked to exit now: the exit code.
    exit: Option<i32>,
    /// `--agent-listen`: HAProxy's agent-check.
    agent: Option<TcpListener>,
    /// `--metrics-listen`: `/metrics` away from the public port.
    metrics: Option<TcpListener>,
    /// A descriptor held in reserve, so the agent can still accept HAProxy's check (and
    /// say `drain`) when the process is out of descriptors.
    spare_fd: Option<std::fs::File>,
    /// SIGUSR1: the agent says `drain` until the next SIGUSR1.
    operator_drain: bool,
    max_memory: Option<u64>,
    accepting: Accepting,
    nofile: NoFile,
    max_connections: usize,
    handshake_timeout: Duration,
    drain_timeout: Duration,
    /// Encoded once: the answer to connections beyond `max_connections`.
    at_capacity: Bytes,
    /// The one buffer every socket is read into.
    scratch: Vec<u8>,
    /// Readiness of this pass, copied out of `events` so handlers may borrow `self`.
    ready: Vec<Ready>,
    /// Connections whose read budget ran out with input possibly left.
    unread: Vec<ConnId>,
    /// After a live upgrade with Redis: HTTP connections whose input waits until the new
    /// process's first Redis connection attempt has ended, as accepting does at start, so
    /// a publish pipelined across the upgrade is not answered 503 while the link comes up.
    /// `None` once that wait is over.
    held_for_redis: Option<Vec<ConnId>>,
    /// What Redis reported this pass, for the handlers.
    redis_events: Vec<Event>,
    /// Messages from Redis not yet queued to their subscribers: held until the publish
    /// responses of the pass are written (`flush_websockets`), or until an event that must see
    /// them delivered first.
    redis_messages: Vec<Event>,
    /// `--state-dir`'s file, where the history goes when the process ends.
    state_file: Option<PathBuf>,

    /// Client sockets, indexed by their connection's key (`None` where there is none).
    sockets: Vec<Option<Socket>>,
    conns: Conns,
    front: Front,
    sessions: Sessions,
    pubsub: PubSub,
    drain: Drain,
    /// The drain's paced closes, once they have begun.
    pacer: Option<Pacer>,
    drain_spread: Duration,
    /// Reconnect hints, for the drain and for subscribers that missed messages.
    jitter: Jitter,
    counters: Counters,
    /// `--statsd`: what the last report sent, and the socket reports go out on.
    statsd: Option<Statsd>,
    /// Live upgrade (`upgrade.rs`): the binary to execute, resolved at start; when the
    /// upgrade asked for by SIGUSR2 goes at the latest; the paced drain of sockets
    /// inherited from a binary whose state this one could not use.
    exe: Option<upgrade::Exe>,
    upgrade_at: Option<Instant>,
    inherited_pacer: Option<Pacer>,
}

/// `--statsd`'s state in the loop.
#[derive(Debug)]
struct Statsd {
    reporter: Reporter,
    socket: std::net::UdpSocket,
    /// The last send failed: logged once at warn, until one goes through again.
    failing: bool,
}

impl Server {
    /// `inherited`: what the old binary left, when this process is the new binary of a
    /// live upgrade (taken once the server exists).
    pub fn bind(
        cfg: Config,
        nofile: NoFile,
        max_connections: usize,
        inherited: &mut Option<Result<crate::handover::Envelope, String>>,
    ) -> io::Result<Server> {
        let poll = Poll::new()?;
        let fds = match inherited {
            Some(Ok(e)) => (e.listener, e.agent, e.metrics),
            _ => (None, None, None),
        };
        let carried = upgrade::listener(fds.0);
        let mut listener = match carried {
            Some(l) => {
                info!("using the listener the previous binary passed (live upgrade)");
                l
            }
            None => match net::inherited()? {
                Some(l) => {
                    info!("using the listener passed by systemd (socket activation)");
                    l
                }
                None => net::listen(cfg.listen, cfg.backlog, cfg.reuse_port)?,
            },
        };
        net::set_client_options(&listener, cfg.sndbuf);
        let local_addr = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let agent = match cfg.agent_listen {
            Some(addr) => {
                let mut l = match upgrade::listener(fds.1) {
                    Some(l) => l,
                    None => net::listen(addr, 64, false)?,
                };
                poll.registry()
                    .register(&mut l, AGENT, Interest::READABLE)?;
                info!("agent-check on {}", l.local_addr()?);
                Some(l)
            }
            None => None,
        };
        let statsd = match &cfg.statsd {
            Some(settings) => {
                let socket = net::statsd_socket(settings.target)?;
                info!(
                    "StatsD: every {} s to {} ({})",
                    settings.interval.as_secs(),
                    settings.target,
                    if settings.tags.is_some() {
                        "DogStatsD tags"
                    } else {
                        "plain, no tags"
                    }
                );
                Some(Statsd {
                    reporter: Reporter::new(settings.clone(), Instant::now()),
                    socket,
                    failing: false,
                })
            }
            None => None,
        };
        let metrics = match cfg.metrics_listen {
            Some(addr) => {
                let mut l = match upgrade::listener(fds.2) {
                    Some(l) => l,
                    None => net::listen(addr, 64, false)?,
                };
                poll.registry()
                    .register(&mut l, METRICS, Interest::READABLE)?;
                info!("metrics on http://{}/metrics", l.local_addr()?);
                Some(l)
            }
            None => None,
        };
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGUSR2])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let signalled = Arc::new(AtomicBool::new(false));
        for signal in [SIGTERM, SIGINT] {
            signal_hook::flag::register(signal, Arc::clone(&signalled))?;
        }
        // Handlers are in place: a signal the old binary blocked across `execve` lands now.
        upgrade::unblock_signals();
        let rules = Rules::new(&cfg, nofile.soft, max_connections);
        let now = Instant::now();
        let state_file = match (&cfg.state_dir, &cfg.redis) {
            (Some(dir), None) => Some(state::path(dir, cfg.listen.port())),
            (Some(_), Some(_)) => {
                info!("--state-dir is not used with --redis: history lives in Redis");
                None
            }
            (None, _) => None,
        };
        let seed = crate::pubsub::history::wall_clock_seed();
        let history = match (inherited.as_ref(), &state_file) {
            (Some(Ok(e)), _) => History::restore(&e.history, cfg.history, seed, now)
                .unwrap_or_else(|why| {
                    warn!("upgrade: the history handed over is unusable ({why}); new epochs");
                    History::new(cfg.history, seed)
                }),
            (_, Some(file)) => state::load(file, cfg.history, now),
            (_, None) => History::new(cfg.history, seed),
        };
        let mut server = Server {
            poll,
            events: Events::with_capacity(EVENTS_CAPACITY),
            listener: Some(listener),
            local_addr,
            signals,
            signalled,
            exit: None,
            spare_fd: agent
                .as_ref()
                .and_then(|_| std::fs::File::open("/dev/null").ok()),
            agent,
            metrics,
            operator_drain: false,
            max_memory: cfg.max_memory,
            accepting: Accepting {
                ready: true,
                ..Accepting::default()
            },
            nofile,
            max_connections,
            handshake_timeout: cfg.handshake_timeout,
            drain_timeout: cfg.drain_timeout,
            at_capacity: Bytes::from(Response::refuse(&Reject::AtCapacity).encode(false)),
            scratch: vec![0; SCRATCH_BYTES],
            ready: Vec::with_capacity(EVENTS_CAPACITY),
            unread: Vec::new(),
            held_for_redis: None,
            redis_events: Vec::new(),
            redis_messages: Vec::new(),
            state_file,
            sockets: Vec::new(),
            conns: Conns::new(crate::limits::Addresses::new(cfg.limits.clone())),
            front: Front::new(rules),
            sessions: Sessions::new(&cfg),
            pubsub: PubSub::new(&cfg, history, now),
            drain: Drain::Serving,
            pacer: None,
            drain_spread: cfg.drain_spread,
            jitter: Jitter::new(
                cfg.reconnect_jitter,
                crate::pubsub::history::wall_clock_seed(),
            ),
            counters: Counters::default(),
            statsd,
            exe: upgrade::Exe::resolve(),
            upgrade_at: None,
            inherited_pacer: None,
        };
        match inherited.take() {
            Some(Ok(envelope)) => server.adopt(envelope, &cfg, now),
            Some(Err(why)) => error!("upgrade: the state file cannot be read ({why})"),
            None => {}
        }
        Ok(server)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serve until a drain completes (exit code 0) or a second signal cuts it (1).
    /// Only reactor-fatal errors (poll itself failing) return `Err`.
    pub fn run(mut self) -> io::Result<i32> {
        let code = loop {
            self.wait()?;
            let now = Instant::now();
            self.check_signals(now);
            self.read_leftovers(now);
            self.dispatch(now);
            if let Some(code) = self.exit {
                break code;
            }
            self.fire_timers(now);
            self.report_statsd(now, false);
            self.service_redis(now);
            self.accept_connections(now);
            self.service_app(now);
            self.flush_responses(now);
            self.flush_redis(now);
            self.flush_websockets(now);
            self.reap_dead();
            self.close_due_inherited(now);
            self.upgrade_if_due(now);
            if let Some(code) = self.advance_drain(now) {
                break code;
            }
        };
        // The counts since the last report, which would otherwise die with the process.
        self.report_statsd(Instant::now(), true);
        self.save_state(Instant::now());
        self.pubsub.app().exit_report();
        Ok(code)
    }

    /// Leave the history for the next start. Also after a second signal: "exit now"
    /// abandons clients, not what they could resume.
    fn save_state(&self, now: Instant) {
        let Some(file) = &self.state_file else {
            return;
        };
        let snapshot = self.pubsub.snapshot(now);
        match state::save(file, &snapshot) {
            Ok(()) => info!(
                "saved history to {} ({} bytes)",
                file.display(),
                snapshot.len()
            ),
            Err(e) => warn!("cannot save history to {}: {e}", file.display()),
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let held_done =
            self.held_for_redis.is_some() && self.pubsub.redis().is_none_or(redis::Redis::settled);
        let busy =
            self.conns.has_dirty() || !self.unread.is_empty() || held_done || self.accept_due(now);
        let timeout = if busy {
            Some(Duration::ZERO)
        } else {
            let accept_resume = self.accepting.paused_until.filter(|_| self.accepting.ready);
            let next = [
                self.conns.next_deadline(),
                self.pubsub.next_deadline(),
                accept_resume,
                self.drain.deadline(),
                self.pubsub.redis().and_then(redis::Redis::next_deadline),
                self.drain.redis_wait(),
                self.pacer.as_ref().and_then(Pacer::next_deadline),
                self.statsd.as_ref().map(|s| s.reporter.next_deadline()),
                self.pubsub.app().next_deadline(),
                self.upgrade_at,
                self.inherited_pacer.as_ref().and_then(Pacer::next_deadline),
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

    /// The handlers' view of the world, borrowed from the loop's fields.
    fn env(&mut self) -> (&mut Front, Env<'_>) {
        let env = Env {
            conns: &mut self.conns,
            pubsub: &mut self.pubsub,
            counters: &mut self.counters,
            sessions: &self.sessions,
            draining: self.drain.is_draining(),
        };
        (&mut self.front, env)
    }

    /// Handle this pass's readiness events (signals were handled before them).
    fn dispatch(&mut self, now: Instant) {
        let mut ready = mem::take(&mut self.ready);
        ready.clear();
        ready.extend(self.events.iter().map(|e| Ready {
            token: e.token(),
            readable: e.is_readable() || e.is_read_closed() || e.is_error(),
            writable: e.is_writable(),
            hup: e.is_read_closed() || e.is_error(),
        }));
        for &Ready {
            token,
            readable,
            writable,
            hup,
        } in &ready
        {
            if self.exit.is_some() {
                break;
            }
            match token {
                LISTENER => self.accepting.ready = true,
                AGENT => self.answer_agents(now),
                METRICS => self.accept_scrapers(now),
                // Seen through `signalled` already; this only empties the pipe.
                SIGNALS => self.on_signals(now),
                t if redis::owns(t) => {
                    if let Some(r) = self.pubsub.redis_mut() {
                        r.on_ready(token, self.poll.registry(), now, &mut self.redis_events);
                    }
                    self.handle_redis_events(now);
                }
                token if self.pubsub.app().owns(token) => {
                    let app = self.pubsub.app_mut();
                    app.on_ready(token, self.poll.registry(), now);
                }
                Token(key) => {
                    let id = ConnId(key);
                    if writable {
                        self.conns.mark_dirty(id);
                    }
                    if readable {
                        self.on_readable(id, now, hup);
                    }
                }
            }
        }
        self.ready = ready;
    }

    // ---- signals ---------------------------------------------------------------------

    /// A signal that has landed is acted on before any request or message is handled, so
    /// nothing is answered as if it had not (health would say 200 after SIGTERM). The
    /// flag costs one atomic load: checked at the top of every pass and before each read.
    fn check_signals(&mut self, now: Instant) {
        if self.signalled.load(Ordering::Relaxed) {
            self.on_signals(now);
        }
    }

    fn on_signals(&mut self, now: Instant) {
        self.signalled.store(false, Ordering::Relaxed);
        let pending: Vec<i32> = self.signals.pending().collect();
        for signal in pending {
            if signal == SIGUSR2 {
                self.request_upgrade(now);
                continue;
            }
            if signal == SIGUSR1 {
                self.operator_drain = !self.operator_drain;
                info!(
                    "SIGUSR1: the agent-check now says {}",
                    if self.operator_drain {
                        "drain"
                    } else {
                        "ready"
                    }
                );
                continue;
            }
            match self.drain.on_signal(now, self.drain_timeout) {
                OnSignal::StartDrain => self.start_drain(now),
                OnSignal::ExitNow => {
                    warn!(
                        "second signal: exiting now, abandoning {} connections and {} queued bytes",
                        self.conns.len(),
                        self.conns.queued_bytes()
                    );
                    self.exit = Some(1);
                    return;
                }
            }
        }
    }

    // ---- the agent-check ---------------------------------------------------------------

    /// HAProxy asks: one line of state, then the connection ends.
    fn answer_agents(&mut self, now: Instant) {
        let Some(agent) = self.agent.as_ref() else {
            return;
        };
        for _ in 0..AGENT_ACCEPTS_PER_PASS {
            match agent.accept() {
                Ok((stream, _)) => {
                    let line = self.load(now).reply();
                    net::refuse(stream, line.as_bytes());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if net::is_resource_exhaustion(&e) && self.spare_fd.is_some() => {
                    // Out of descriptors: the reserve one makes room to say so.
                    self.accepting.last_failure = Some(now);
                    self.spare_fd = None;
                    if let Ok((stream, _)) = agent.accept() {
                        net::refuse(stream, self.load(now).reply().as_bytes());
                    }
                    self.spare_fd = std::fs::File::open("/dev/null").ok();
                }
                Err(e) => {
                    debug!("agent accept: {e}");
                    return;
                }
            }
        }
        // Edge-triggered: what is left raises no new event; it waits for the next check.
    }

    /// `--metrics-listen`: scrapers are connections like any other, marked so that the
    /// front door answers them `/metrics` and `/health` only.
    fn accept_scrapers(&mut self, now: Instant) {
        for _ in 0..METRICS_ACCEPTS_PER_PASS {
            let Some(listener) = self.metrics.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer, now, true),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("metrics accept: {e}");
                    return;
                }
            }
        }
        // Edge-triggered: any left wait for the next scraper's event.
    }

    fn load(&self, now: Instant) -> crate::agent::Load {
        let (_, resident_bytes) = crate::metrics::process_usage();
        crate::agent::Load {
            draining: self.drain.is_draining(),
            operator_drain: self.operator_drain,
            accept_failing: self
                .accepting
                .last_failure
                .is_some_and(|t| now.duration_since(t) < ACCEPT_FAILURE_MEMORY),
            delivery_broken: self
                .pubsub
                .redis()
                .is_some_and(redis::Redis::delivery_broken),
            connections: self.conns.len(),
            max_connections: self.max_connections,
            open_fds: net::open_fds().unwrap_or(self.conns.len() as u64),
            fd_limit: self.nofile.soft,
            resident_bytes,
            max_memory: self.max_memory,
        }
    }

    // ---- accepting -------------------------------------------------------------------

    fn accept_due(&self, now: Instant) -> bool {
        self.accepting.ready
            && self.listener.is_some()
            // With Redis, not before its first connection attempt has ended: connections
            // wait in the backlog (or go to the other processes on the port) rather than
            // have their publishes answered 503 "redis unavailable" in the first moments.
            && self.pubsub.redis().is_none_or(redis::Redis::settled)
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
                Ok((stream, peer)) => self.admit(stream, peer, now, false),
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
                        self.accepting.last_failure = Some(now);
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

    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr, now: Instant, metrics: bool) {
        let reserve = if metrics { METRICS_RESERVE } else { 0 };
        if self.conns.len() >= self.max_connections + reserve {
            self.counters.rejected_at_capacity += 1;
            net::refuse(stream, &self.at_capacity);
            return;
        }
        // A trusted proxy's clients are checked once it names them (front door).
        if !self.conns.addresses.is_trusted(peer.ip())
            && let Err(limit) = self.conns.addresses.check(peer.ip(), now)
        {
            self.counters.refusals.bump(limit.refused());
            debug!("refused {peer}: {}", limit.refused().label());
            let reject = Reject::Limited(limit);
            net::refuse(stream, &Response::refuse(&reject).encode(false));
            return;
        }
        let id = self.conns.next_id();
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, id.token(), Interest::READABLE)
        {
            warn!("register {peer}: {e}");
            return;
        }
        let id = self.conns.insert(peer, now);
        self.conns[id].metrics_port = metrics;
        if self.sockets.len() <= id.0 {
            self.sockets.resize_with(id.0 + 1, || None);
        }
        self.sockets[id.0] = Some(Socket {
            stream,
            registered: Interest::READABLE,
        });
        self.counters.accepted += 1;
        self.conns
            .arm(id, Timer::Request, now + self.handshake_timeout);
        // Read what arrived with the connection now rather than a pass later. A short read
        // may stop here even if a FIN waits behind the data: the socket was registered
        // first, and epoll re-polls a registered socket at every wait, so the FIN still
        // raises its event.
        self.on_readable(id, now, false);
    }

    // ---- reading ---------------------------------------------------------------------

    fn read_leftovers(&mut self, now: Instant) {
        if self.held_for_redis.is_some() && self.pubsub.redis().is_none_or(redis::Redis::settled) {
            let held = self.held_for_redis.take().unwrap_or_default();
            self.unread.extend(held);
        }
        for id in mem::take(&mut self.unread) {
            self.on_readable(id, now, true);
        }
    }

    /// Read until the socket is empty (edge-triggered) or the budget is spent. `to_end`:
    /// keep reading past a short read, because a FIN (EOF) may be waiting behind the data
    /// and it raises no event of its own.
    fn on_readable(&mut self, id: ConnId, now: Instant, to_end: bool) {
        if let Some(held) = self.held_for_redis.as_mut()
            && self.conns.get(id).is_some_and(|c| c.session().is_none())
        {
            if !held.contains(&id) {
                held.push(id);
            }
            return;
        }
        let mut scratch = mem::take(&mut self.scratch);
        let mut total = 0;
        while let Some(conn) = self.conns.get(id) {
            if matches!(conn.state, State::Dead) {
                break;
            }
            let Some(Some(socket)) = self.sockets.get_mut(id.0) else {
                break;
            };
            match socket.stream.read(&mut scratch) {
                Ok(0) => {
                    self.on_eof(id, now);
                    break;
                }
                Ok(n) => {
                    if self.signalled.load(Ordering::Relaxed) {
                        self.on_input_after_signal(id, &scratch[..n], now);
                        if self.exit.is_some() {
                            break;
                        }
                    } else {
                        self.on_input(id, &scratch[..n], now);
                    }
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
                    self.kill(id, now);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// A signal landed before these bytes were read (its handler ran as `read` returned):
    /// the drain starts first, and the bytes are handled as part of it. Bytes of a request
    /// are kept as a request in progress, which the drain answers with `Connection: close`,
    /// rather than left unseen on a connection it would close as idle.
    fn on_input_after_signal(&mut self, id: ConnId, input: &[u8], now: Instant) {
        let conn = &mut self.conns[id];
        let request = matches!(conn.state, State::ReadingRequest);
        if request {
            conn.partial.extend_from_slice(input);
        }
        self.on_signals(now);
        if self.exit.is_none() {
            self.on_input(id, if request { &[] } else { input }, now);
        }
    }

    /// Input goes to the handler for what the connection is now.
    fn on_input(&mut self, id: ConnId, input: &[u8], now: Instant) {
        match self.conns[id].state {
            State::ReadingRequest | State::AwaitingRedis { .. } => {
                let (front, mut env) = self.env();
                front.on_input(&mut env, id, input, now);
            }
            State::Open(_) | State::Closing(_) => self.sessions.on_input(
                &mut self.conns,
                &mut self.pubsub,
                &mut self.counters,
                id,
                input,
                now,
            ),
            State::AwaitingApp(_) => {
                if !crate::app::gate::hold_input(&mut self.conns, id, input) {
                    self.kill(id, now);
                }
            }
            // Nothing more is wanted from this peer; reading only watches for its FIN.
            State::Finishing | State::Lingering | State::Dead => {}
        }
    }

    fn on_eof(&mut self, id: ConnId, now: Instant) {
        let (front, mut env) = self.env();
        front.on_eof(&mut env, id, now);
    }

    // ---- timers ----------------------------------------------------------------------

    fn fire_timers(&mut self, now: Instant) {
        self.pubsub.expire(now);
        while let Some((id, kind)) = self.conns.pop_expired(now) {
            match kind {
                Timer::Request => {
                    self.counters.handshake_timeouts += 1;
                    debug!("request timeout: {}", self.conns[id].peer);
                    self.kill(id, now);
                }
                Timer::Idle => {
                    self.counters.idle_timeouts += 1;
                    self.kill(id, now);
                }
                Timer::Ping => self.sessions.on_ping_timer(&mut self.conns, id, now),
                Timer::Pong => {
                    self.counters.pong_timeouts += 1;
                    debug!("no answer to ping: {}", self.conns[id].peer);
                    self.abort(id, now);
                }
                Timer::CloseGrace => self.abort(id, now),
                Timer::Grant => {
                    self.sessions
                        .on_grant_timer(&mut self.conns, &mut self.pubsub, id, now)
                }
            }
        }
    }

    /// `--statsd`: when a report is due (or `now` at exit), send what `/metrics` would
    /// say, as StatsD lines. Each datagram is sent once: a full socket buffer or an absent
    /// agent loses that sample, never the loop's time.
    fn report_statsd(&mut self, now: Instant, at_exit: bool) {
        if !self
            .statsd
            .as_ref()
            .is_some_and(|s| at_exit || s.reporter.due(now))
        {
            return;
        }
        let exposition = {
            let (front, env) = self.env();
            front.render_metrics(&env)
        };
        let Some(statsd) = &mut self.statsd else {
            return;
        };
        let target = statsd.reporter.settings().target;
        for datagram in statsd.reporter.report(&exposition, now) {
            match statsd.socket.send_to(&datagram, target) {
                Ok(_) => {
                    if mem::take(&mut statsd.failing) {
                        info!("StatsD: reports reach {target} again");
                    }
                }
                Err(e) if statsd.failing => debug!("StatsD: report to {target} lost: {e}"),
                Err(e) => {
                    statsd.failing = true;
                    warn!("StatsD: report to {target} lost ({e}); it is not retried");
                }
            }
        }
    }

    // ---- writing ---------------------------------------------------------------------

    // One vectored write per dirty connection, in three steps: every HTTP connection first
    // (a publisher's response goes out before the fan-out it caused), then the commands to
    // Redis (`flush_redis`), then the fan-out: this pass's messages are queued to their
    // subscribers and WebSockets are written for at most `FANOUT_SLICE`. Those left wait
    // for the next pass, which polls without sleeping, so a publish that arrives during a
    // long fan-out is read and answered within a slice instead of behind thousands of
    // writes. A connection the kernel would not fully take asks for WRITABLE; one that
    // used its budget is retried next pass.

    fn flush_responses(&mut self, now: Instant) {
        for id in self.conns.take_urgent() {
            self.flush_one(id, now);
        }
    }

    /// After the responses and the commands to Redis: queue what was published, here and
    /// through Redis, then write to WebSockets for one slice.
    fn flush_websockets(&mut self, now: Instant) {
        self.sessions
            .deliver_pending(&mut self.conns, &mut self.pubsub, &mut self.counters, now);
        self.deliver_redis_messages(now);
        let start = Instant::now();
        let mut flushed = 0usize;
        while let Some(id) = self.conns.next_fanout() {
            self.flush_one(id, now);
            flushed += 1;
            if flushed % FANOUT_CLOCK_EVERY == 0 && start.elapsed() >= FANOUT_SLICE {
                self.counters.fanout_slices += 1;
                break;
            }
        }
    }

    fn flush_one(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        conn.dirty = false;
        if matches!(conn.state, State::Dead) {
            return;
        }
        let Some(Some(socket)) = self.sockets.get_mut(id.0) else {
            return;
        };
        let syscalls = &mut self.counters.write_syscalls;
        match conn
            .out
            .write_to(&mut net::Send(&socket.stream), WRITE_BUDGET, syscalls)
        {
            Ok(Flushed::Drained) => {
                if matches!(conn.state, State::Finishing) {
                    if conn.peer_shut {
                        self.kill(id, now);
                        return;
                    }
                    // FIN after the last byte, then wait for the peer's: closing now
                    // with unread input would send RST and could destroy our answer.
                    let _ = socket.stream.shutdown(std::net::Shutdown::Write);
                    conn.state = State::Lingering;
                    self.conns.arm(id, Timer::CloseGrace, now + CLOSE_GRACE);
                }
            }
            Ok(Flushed::Blocked) => {}
            Ok(Flushed::Budget) => self.conns.mark_dirty(id),
            Err(e) => {
                debug!("write {}: {e}", conn.peer);
                self.kill(id, now);
                return;
            }
        }
        self.update_interest(id, now);
    }

    fn update_interest(&mut self, id: ConnId, now: Instant) {
        let wanted = if self.conns[id].wants_writable() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let Some(Some(socket)) = self.sockets.get_mut(id.0) else {
            return;
        };
        if wanted != socket.registered {
            match self
                .poll
                .registry()
                .reregister(&mut socket.stream, id.token(), wanted)
            {
                Ok(()) => socket.registered = wanted,
                Err(e) => {
                    warn!("reregister {}: {e}", self.conns[id].peer);
                    self.kill(id, now);
                }
            }
        }
    }

    // ---- ending connections ----------------------------------------------------------

    /// End a connection now: it leaves its topics, and is removed after this pass.
    fn kill(&mut self, id: ConnId, now: Instant) {
        self.pubsub.leave(self.conns.kill(id), now);
    }

    /// End a connection whose peer stopped taking part (no pong, no close reply in the
    /// grace time). If the kernel still holds bytes the peer has not taken, with a reset
    /// rather than a FIN: a FIN would leave them in an orphaned socket until the kernel
    /// gave up on a peer that reads nothing, up to the whole send buffer per slow
    /// consumer, for minutes. A peer that took everything gets the ordinary close.
    fn abort(&mut self, id: ConnId, now: Instant) {
        if let Some(Some(socket)) = self.sockets.get(id.0)
            && net::unacknowledged(&socket.stream) > 0
        {
            let _ = socket2::SockRef::from(&socket.stream).set_linger(Some(Duration::ZERO));
        }
        self.kill(id, now);
    }

    fn reap_dead(&mut self) {
        for id in self.conns.take_reap() {
            let Some(conn) = self.conns.remove(id) else {
                continue;
            };
            self.counters.undelivered_bytes += conn.out.len() as u64;
            // Dropping the stream closes the descriptor.
            if let Some(mut socket) = self.sockets.get_mut(id.0).and_then(Option::take) {
                let _ = self.poll.registry().deregister(&mut socket.stream);
            }
        }
    }

    // ---- Redis -----------------------------------------------------------------------

    fn service_redis(&mut self, now: Instant) {
        if let Some(r) = self.pubsub.redis_mut() {
            r.tick(now, self.poll.registry(), &mut self.redis_events);
        }
        self.handle_redis_events(now);
        if self.drain.redis_wait().is_some_and(|t| now >= t) {
            warn!("redis did not answer the drain's PING in time; closing WebSockets now");
            self.close_all_websockets(now);
        }
    }

    fn flush_redis(&mut self, now: Instant) {
        if let Some(r) = self.pubsub.redis_mut() {
            r.flush(self.poll.registry(), now, &mut self.redis_events);
        }
        self.handle_redis_events(now);
    }

    /// Each Redis event goes to the handler it concerns.
    fn handle_redis_events(&mut self, now: Instant) {
        let mut events = mem::take(&mut self.redis_events);
        for event in events.drain(..) {
            match event {
                Event::Published { tag, result } => {
                    let (front, mut env) = self.env();
                    front.on_publish_result(&mut env, tag, result, now);
                }
                // Queued to subscribers once this pass's responses are written: a publish's
                // answer may leave before messages that arrived with it, which nothing
                // depends on.
                message @ Event::Message { .. } => self.redis_messages.push(message),
                other => {
                    // Everything else sees the messages before it delivered: a read's
                    // reply, Redis going down, the drain's pong.
                    self.deliver_redis_messages(now);
                    self.on_redis_event(other, now);
                }
            }
        }
        self.redis_events = events;
    }

    fn on_redis_event(&mut self, event: Event, now: Instant) {
        match event {
            Event::Published { .. } | Event::Message { .. } => {}
            Event::Confirmed { topic } => self.pubsub.on_confirmed(&mut self.conns, &topic, now),
            Event::SubscriptionReady => self.pubsub.resubscribe(),
            Event::Read { tag, result } => {
                if let Some(read) = self.pubsub.on_read(&mut self.conns, tag, result) {
                    let (front, mut env) = self.env();
                    front.on_history_read(&mut env, read, now);
                }
            }
            Event::PresenceRead { tag, result } => {
                let answer =
                    self.pubsub
                        .on_presence_read(&mut self.conns, &mut self.counters, tag, result);
                if let Some(answer) = answer {
                    let (front, mut env) = self.env();
                    front.on_presence_read(&mut env, answer, now);
                }
            }
            Event::Presence {
                topic,
                join,
                member,
            } => self.pubsub.on_presence_event(&topic, join, &member),
            Event::Up => self.pubsub.on_redis_up(now),
            Event::Delivery(_) => {}
            Event::Script { tag, result } => self.pubsub.on_script(tag, result, now),
            Event::Down => self.pubsub.on_redis_down(&mut self.conns),
            Event::Pong => {
                if self.drain.redis_wait().is_some() {
                    self.close_all_websockets(now);
                }
            }
        }
    }

    /// Queue the held messages from Redis to their subscribers, in arrival order.
    fn deliver_redis_messages(&mut self, now: Instant) {
        for event in mem::take(&mut self.redis_messages) {
            let Event::Message {
                topic,
                id,
                epoch,
                data,
            } = event
            else {
                continue;
            };
            let mut fanout = self.pubsub.deliver(
                &mut self.conns,
                &mut self.counters,
                &topic,
                (id, &epoch),
                &data,
            );
            for lost in std::mem::take(&mut fanout.lost) {
                let after_ms = self.jitter.draw();
                self.sessions.going_away(
                    &mut self.conns,
                    &mut self.pubsub,
                    &mut self.counters,
                    lost,
                    after_ms,
                    now,
                );
            }
            self.sessions.close_slow(
                &mut self.conns,
                &mut self.pubsub,
                &mut self.counters,
                fanout,
                now,
            );
        }
    }

    // ---- the application (`--auth-url`, `--webhook-url`) -------------------------------

    /// After this pass's handshakes were read: expire callbacks past their deadline, send
    /// what is due (in a drain, handshakes still queued are refused instead), and hand
    /// the answers to `app::gate`.
    fn service_app(&mut self, now: Instant) {
        let mut answered = Vec::new();
        let app = self.pubsub.app_mut();
        if !app.asks_connect() && !app.hooks_on() {
            return;
        }
        app.tick(self.poll.registry(), now);
        if self.drain.is_draining() {
            app.drain(&mut answered);
        }
        let conns = &self.conns;
        let live = |id, serial| {
            conns
                .same(id, serial)
                .is_some_and(|c| matches!(c.state, State::AwaitingApp(_) | State::Open(_)))
        };
        app.flush(self.poll.registry(), now, live, &mut answered);
        for a in answered {
            let (_, mut env) = self.env();
            crate::app::gate::on_answer(&mut env, a, now);
        }
    }

    // ---- drain -----------------------------------------------------------------------

    /// PRODUCT.md's order: health turns 503 (the drain state says so from now on), the
    /// listener closes, every WebSocket gets 1001 behind the messages already queued to
    /// it, idle HTTP connections close, busy ones close after their response.
    fn start_drain(&mut self, now: Instant) {
        info!(
            "draining {} connections (deadline {} s)",
            self.conns.len(),
            self.drain_timeout.as_secs()
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
            .pubsub
            .redis_mut()
            .is_some_and(|r| r.is_up() && r.ping_subscription());
        if waiting_for_redis {
            self.drain.await_redis(now + DRAIN_REDIS_WAIT);
        } else {
            self.close_all_websockets(now);
        }
        for id in self.conns.ids() {
            let conn = &self.conns[id];
            let between_requests = conn.partial.is_empty();
            match conn.state {
                // Accepted, its first request not read yet: let it arrive (it is answered
                // with `Connection: close`), bounded by the request timer and the drain.
                State::ReadingRequest
                    if between_requests && conn.timers.is_armed(Timer::Request) => {}
                State::ReadingRequest if between_requests && conn.out.is_empty() => {
                    self.kill(id, now)
                }
                // Its last response is still going out; the connection ends after it.
                State::ReadingRequest if between_requests => {
                    self.pubsub.leave(self.conns.finish(id, now), now)
                }
                // A request in progress gets its answer with `Connection: close`.
                _ => {}
            }
        }
    }

    /// Drain step 4 for WebSockets: 1001 behind every message already queued, spread
    /// over `--drain-spread` (the pacer decides who goes when).
    fn close_all_websockets(&mut self, now: Instant) {
        self.drain.redis_done();
        if self.pacer.is_some() {
            return;
        }
        let open: Vec<(ConnId, u64)> = self
            .conns
            .ids()
            .into_iter()
            .filter(|&id| self.conns[id].is_open())
            .map(|id| (id, self.conns[id].serial))
            .collect();
        info!(
            "closing {} WebSockets over {:.1} s, each told to reconnect after {}-{} ms",
            open.len(),
            self.drain_spread.as_secs_f64(),
            self.jitter.range().0,
            self.jitter.range().1
        );
        self.pacer = Some(Pacer::new(now, self.drain_spread, open));
        self.close_due_websockets(now);
    }

    /// The pacer's batch that is due now.
    fn close_due_websockets(&mut self, now: Instant) {
        let Some(pacer) = self.pacer.as_mut() else {
            return;
        };
        let batch = pacer.due(now);
        let was_done = pacer.is_done();
        self.send_away(&batch, now);
        if was_done && !batch.is_empty() {
            let total = self.pacer.as_ref().map_or(0, Pacer::total);
            let took = self
                .drain
                .started()
                .map_or(0.0, |t| (now - t).as_secs_f64());
            info!(
                "drain: {total} WebSockets closed in {took:.2} s ({:.0} closes/s)",
                total as f64 / took.max(0.001)
            );
        }
    }

    /// A paced batch of WebSockets (the drain's, or an upgrade fallback's): each still open
    /// gets its `reconnect` hint, drawn from `--reconnect-jitter`, and 1001.
    fn send_away(&mut self, batch: &[(ConnId, u64)], now: Instant) {
        for &(id, serial) in batch {
            if self.conns.same(id, serial).is_some_and(|c| c.is_open()) {
                let after_ms = self.jitter.draw();
                self.sessions.going_away(
                    &mut self.conns,
                    &mut self.pubsub,
                    &mut self.counters,
                    id,
                    after_ms,
                    now,
                );
            }
        }
    }

    fn advance_drain(&mut self, now: Instant) -> Option<i32> {
        self.close_due_websockets(now);
        match self.drain.finished(now, self.conns.len())? {
            Finished::Drained => info!("drained; exiting"),
            Finished::DeadlinePassed => warn!(
                "drain timeout: abandoning {} connections and {} queued bytes",
                self.conns.len(),
                self.conns.queued_bytes()
            ),
        }
        Some(0)
    }
}
