//! The client side of every scenario: one thread, one mio loop, many WebSocket
//! connections. Each socket is read into one large buffer per thread and frames are
//! scanned in place, so receiving costs a read syscall per burst and no allocation per
//! message. A connection keeps bytes of its own only while a frame or the handshake
//! response is partial. With --deflate each handshake offers permessage-deflate as
//! Chromium does, and compressed frames are inflated by the thread's one inflater (the
//! server takes no context over between messages, so one serves every connection).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flate2::{Decompress, FlushDecompress};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

use crate::frames;
use crate::ids::IdSet;
use crate::stats::{self, Buckets, Tally, histogram, now_ns};

/// Handshakes a thread keeps in flight when connecting "as fast as possible": more would
/// only overflow the server's listen backlog and turn into SYN retransmits.
const MAX_IN_FLIGHT: usize = 1000;
/// A handshake not answered by then is a failure ("timeout").
const HANDSHAKE_TIMEOUT_NS: u64 = 10_000_000_000;
const SCRATCH_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Mode {
    /// Handshake, then hold the connection.
    Connect,
    /// Handshake on a `?topics=` path, wait for `subscribed`, count messages.
    Subscribe,
    /// Closed loop: send a binary message of `size` bytes, wait for it to come back.
    Echo { size: usize },
}

/// What one thread does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThreadPlan {
    pub target: SocketAddr,
    pub host: String,
    pub path: String,
    pub mode: Mode,
    pub connections: usize,
    /// Connection attempts per second for this thread; 0 = as fast as possible.
    pub rate: f64,
    pub sources: Vec<IpAddr>,
    /// Reconnect (with backoff and jitter) whenever a connection ends (storm).
    pub reconnect: bool,
    /// The longest reconnect backoff, in ms (the jitter is drawn below it).
    pub backoff_max_ms: u64,
    /// storm --resume: the topic whose epoch and last id each client keeps, and resumes
    /// from (`?resume=topic~since~epoch`) when it reconnects.
    pub resume: Option<String>,
    /// capacity: count, per message id, receptions within this latency.
    pub bound_us: Option<u64>,
    /// deploy: honour the server's `{"op":"reconnect","after_ms":X}`: a client told so
    /// reconnects no sooner than X ms after the hint, plus a jitter of its own (up to
    /// 100 ms), as herald.js does. Hints are counted either way.
    #[serde(default)]
    pub hints: bool,
    /// Offer permessage-deflate and inflate what comes compressed.
    #[serde(default)]
    pub deflate: bool,
    /// More handshake header lines, each ending in CRLF (`--header`: a session cookie
    /// for `--auth-url`).
    #[serde(default)]
    pub headers: String,
}

/// The longest reconnect hint obeyed (herald.js's cap too): a hint is the server's, and a
/// wrong one must not park a client for good.
const HINT_CAP_MS: u64 = 600_000;
/// A hinted reconnect's own jitter, on top of the hint.
const HINT_JITTER_NS: u64 = 100_000_000;

/// Shared between a worker's threads and its main thread.
#[derive(Default)]
pub struct Control {
    pub stop: AtomicBool,
    /// Connections done with their first attempt: usable (connected or subscribed, per
    /// mode) or failed.
    pub settled: AtomicU64,
    pub usable: AtomicU64,
    pub received: AtomicU64,
    /// storm --resume: receptions a client already had (included in `received`).
    pub duplicates: AtomicU64,
    /// storm --resume: the ids the publisher had acknowledged, told by the driver before
    /// it stops the worker; each client is checked against them as the thread finishes.
    pub acked: Mutex<Option<IdSet>>,
}

#[derive(Debug, PartialEq)]
enum State {
    Connecting,
    Handshaking,
    /// 101 received; in Subscribe mode, waiting for `subscribed`.
    Open,
    Subscribed,
}

struct Conn {
    stream: TcpStream,
    state: State,
    /// Partial handshake response or partial frame.
    partial: Vec<u8>,
    out: Vec<u8>,
    started_ns: u64,
    last_id: u64,
    source: IpAddr,
    attempt: u32,
    /// First attempt settled (counted in `Control::settled`).
    settled: bool,
    /// Which of the thread's clients this connection is (an index into `Client::clients`).
    client: usize,
    /// The handshake asked to resume (storm --resume).
    resuming: bool,
    /// A resumed subscription not caught up yet: (the id its `subscribed` named, when
    /// that reply came).
    catch_up: Option<(u64, u64)>,
    /// The server's reconnect hint: not before this (CLOCK_MONOTONIC ns).
    hint_until: Option<u64>,
    /// The 101 accepted permessage-deflate.
    deflate: bool,
}

/// A reconnect waiting for its time.
struct Due {
    at: u64,
    source: IpAddr,
    attempt: u32,
    client: usize,
    /// The hint it waits for, if any (its end, ns).
    hint_until: Option<u64>,
}

/// One client across its connections, when it reconnects (storm).
#[derive(Default)]
struct Position {
    /// Subscribed before: its next subscription is a reconnection.
    joined: bool,
    /// storm --resume: the topic's epoch as last told, and the last id received in it.
    epoch: Option<String>,
    last_id: u64,
    /// The id the first `subscribed` named: nothing at or below it was promised.
    floor: Option<u64>,
    /// Its epoch changed at some point.
    changed: bool,
    /// Every id received, per epoch.
    seen: Vec<(String, IdSet)>,
    /// Times its subscribed connection ended.
    disconnects: u32,
}

/// The fields of a `subscribed` reply that resuming needs.
#[derive(Deserialize, Default)]
struct Subscribed {
    epoch: Option<String>,
    id: Option<u64>,
    recovered: Option<bool>,
}

struct Client<'a> {
    plan: &'a ThreadPlan,
    control: &'a Control,
    poll: Poll,
    conns: Slab<Conn>,
    tally: Tally,
    handshake: hdrhistogram::Histogram<u64>,
    latency: hdrhistogram::Histogram<u64>,
    rtt: hdrhistogram::Histogram<u64>,
    catch_up: hdrhistogram::Histogram<u64>,
    request: Vec<u8>,
    rng: u64,
    /// Reconnects waiting for their time.
    retry: Vec<Due>,
    /// Per client, when connections reconnect; empty otherwise.
    clients: Vec<Position>,
    /// Connections opened and not yet usable or ended.
    in_flight: usize,
    /// --deflate: the thread's inflater, reset per message, and its output buffer.
    inflater: Decompress,
    inflated: Vec<u8>,
}

/// What Chromium offers on every handshake.
const DEFLATE_OFFER: &str =
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
/// RFC 7692 §7.2.2: the tail a sender removes from each compressed message.
const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

fn upgrade_request(path: &str, host: &str, deflate: bool, headers: &str) -> Vec<u8> {
    let offer = if deflate { DEFLATE_OFFER } else { "" };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}{headers}\r\n"
    )
    .into_bytes()
}

/// Whether a 101's head accepted permessage-deflate.
fn accepts_deflate(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("sec-websocket-extensions")
                && value.trim_start().starts_with("permessage-deflate")
        })
    })
}

/// One compressed message's payload inflated into `out` (cleared first), as a
/// permessage-deflate client does: a fresh stream, the tail put back. False if it is not
/// deflate.
fn inflate(inflater: &mut Decompress, payload: &[u8], out: &mut Vec<u8>) -> bool {
    inflater.reset(false);
    out.clear();
    for part in [payload, &DEFLATE_TAIL[..]] {
        let start = inflater.total_in();
        loop {
            let used = (inflater.total_in() - start) as usize;
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(4096));
            }
            if inflater
                .decompress_vec(&part[used..], out, FlushDecompress::Sync)
                .is_err()
            {
                return false;
            }
            if (inflater.total_in() - start) as usize == part.len() && out.len() < out.capacity() {
                break;
            }
        }
    }
    true
}

/// `s` for a query string: everything but letters, digits and `-._` percent-encoded.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The subscribe path with `resume=topic~since~epoch` added.
fn resume_path(path: &str, topic: &str, since: u64, epoch: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!(
        "{path}{sep}resume={}~{since}~{}",
        percent_encode(topic),
        percent_encode(epoch)
    )
}

pub fn run(plan: &ThreadPlan, control: Arc<Control>, seed: u64) -> Tally {
    let request = upgrade_request(&plan.path, &plan.host, plan.deflate, &plan.headers);
    let mut client = Client {
        plan,
        control: &control,
        poll: Poll::new().expect("epoll"),
        conns: Slab::with_capacity(plan.connections),
        tally: Tally::default(),
        handshake: histogram(),
        latency: histogram(),
        rtt: histogram(),
        catch_up: histogram(),
        request,
        rng: seed | 1,
        retry: Vec::new(),
        clients: if plan.reconnect {
            (0..plan.connections).map(|_| Position::default()).collect()
        } else {
            Vec::new()
        },
        in_flight: 0,
        inflater: Decompress::new_with_window_bits(false, 15),
        inflated: Vec::new(),
    };
    client.run();
    client.finish()
}

impl Client<'_> {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut scratch = vec![0u8; SCRATCH_BYTES];
        let start = now_ns();
        let mut opened = 0usize;
        let mut last_sweep = start;
        while !self.control.stop.load(Ordering::Relaxed) {
            let now = now_ns();
            // New connections, on schedule.
            while opened < self.plan.connections {
                let due = if self.plan.rate > 0.0 {
                    start + (opened as f64 / self.plan.rate * 1e9) as u64
                } else {
                    now
                };
                if due > now || self.in_flight >= MAX_IN_FLIGHT {
                    break;
                }
                let source = self.plan.sources[opened % self.plan.sources.len().max(1)];
                self.open(source, 0, opened, now);
                opened += 1;
            }
            // Reconnects that are due.
            let mut i = 0;
            while i < self.retry.len() {
                if self.retry[i].at <= now {
                    let due = self.retry.swap_remove(i);
                    self.note_reconnect_attempt(&due, now);
                    self.open(due.source, due.attempt, due.client, now);
                } else {
                    i += 1;
                }
            }
            if now - last_sweep > 100_000_000 {
                self.sweep_handshake_timeouts(now);
                last_sweep = now;
            }
            let timeout = if opened < self.plan.connections && self.plan.rate > 0.0 {
                1
            } else {
                10
            };
            match self
                .poll
                .poll(&mut events, Some(Duration::from_millis(timeout)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("poll: {e}"),
            }
            for event in events.iter() {
                let key = event.token().0;
                if event.is_writable() {
                    self.on_writable(key);
                }
                let hup = event.is_read_closed() || event.is_error();
                if event.is_readable() || hup {
                    self.on_readable(key, &mut scratch, hup);
                }
            }
        }
    }

    fn finish(mut self) -> Tally {
        self.tally.handshake_us = Buckets::from(&self.handshake);
        self.tally.latency_us = Buckets::from(&self.latency);
        self.tally.rtt_us = Buckets::from(&self.rtt);
        if self.plan.resume.is_some() {
            self.tally.resume.catch_up_us = Buckets::from(&self.catch_up);
            self.check_against_acked();
        }
        for st in &self.clients {
            *self
                .tally
                .reconnect
                .clients_by_disconnects
                .entry(st.disconnects)
                .or_default() += 1;
        }
        self.tally
    }

    /// A reconnect is attempted: on the curve if its client had been subscribed, and
    /// checked against the hint it waited for.
    fn note_reconnect_attempt(&mut self, due: &Due, now: u64) {
        let rt = &mut self.tally.reconnect;
        if self.clients.get(due.client).is_some_and(|st| st.joined) {
            stats::ReconnectTally::mark(&mut rt.attempts_at, now);
        }
        if let Some(until) = due.hint_until {
            rt.hinted_reconnects += 1;
            if now < until {
                rt.early += 1;
            }
            let slack = now.saturating_sub(until) / 1_000_000;
            rt.least_slack_ms = Some(rt.least_slack_ms.map_or(slack, |s| s.min(slack)));
        }
    }

    /// storm --resume: every acknowledged id above a client's first `subscribed` id that
    /// the client never received is missed. Only a client that stayed in one epoch can be
    /// checked this way: the publisher's ids do not say which epoch they belong to.
    fn check_against_acked(&mut self) {
        let acked = self
            .control
            .acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let r = &mut self.tally.resume;
        for st in &self.clients {
            let Some(floor) = st.floor else {
                continue; // never subscribed: nothing was promised to it
            };
            match (&acked, &st.epoch) {
                (Some(acked), Some(epoch)) if !st.changed => {
                    let empty = IdSet::default();
                    let have = st
                        .seen
                        .iter()
                        .find(|(e, _)| e == epoch)
                        .map_or(&empty, |(_, s)| s);
                    r.missed_by_id += acked.missing_from(have, floor);
                    r.unacked += have.missing_from(acked, floor);
                    r.checked += 1;
                }
                _ => r.unchecked += 1,
            }
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn open(&mut self, source: IpAddr, attempt: u32, client: usize, now: u64) {
        self.tally.attempted += 1;
        self.tally.first_attempt_ns = Some(self.tally.first_attempt_ns.map_or(now, |t| t.min(now)));
        let stream = match connect_from(source, self.plan.target) {
            Ok(s) => s,
            Err(e) => {
                self.tally.fail(failure_kind(&e));
                self.settle_first(attempt == 0);
                self.schedule_retry(source, attempt, client, now, None);
                return;
            }
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let conn = entry.insert(Conn {
            stream,
            state: State::Connecting,
            partial: Vec::new(),
            out: Vec::new(),
            started_ns: now,
            last_id: 0,
            source,
            attempt,
            settled: attempt > 0,
            client,
            resuming: false,
            catch_up: None,
            hint_until: None,
            deflate: false,
        });
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut conn.stream, Token(key), interest)
        {
            self.tally.fail(failure_kind(&e));
            self.conns.remove(key);
            self.settle_first(attempt == 0);
            return;
        }
        self.in_flight += 1;
    }

    fn settle_first(&mut self, first: bool) {
        if first {
            self.control.settled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reconnect `client` later: after its hint when it has one (and hints are
    /// honoured), else after a backoff.
    fn schedule_retry(
        &mut self,
        source: IpAddr,
        attempt: u32,
        client: usize,
        now: u64,
        hint_until: Option<u64>,
    ) {
        if !self.plan.reconnect || self.control.stop.load(Ordering::Relaxed) {
            return;
        }
        if let Some(until) = hint_until.filter(|_| self.plan.hints) {
            let jitter = self.random() % HINT_JITTER_NS;
            self.retry.push(Due {
                at: until.max(now) + jitter,
                source,
                attempt: attempt + 1,
                client,
                hint_until: Some(until),
            });
            return;
        }
        // Exponential backoff from 100 ms to --max-backoff-ms (2 s unless told), with
        // full jitter: a restarted server sees the reconnects spread out instead of one
        // thundering herd.
        let max = self
            .plan
            .backoff_max_ms
            .saturating_mul(1_000_000)
            .max(1_000_000);
        let cap = (100_000_000u64 << attempt.min(5)).min(max);
        let delay = self.random() % cap;
        self.retry.push(Due {
            at: now + delay,
            source,
            attempt: attempt + 1,
            client,
            hint_until: None,
        });
    }

    fn on_writable(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.state == State::Connecting {
            match conn.stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return self.end(key, Some(failure_kind(&e))),
            }
            if conn.stream.peer_addr().is_err() {
                return; // not connected yet
            }
            conn.state = State::Handshaking;
            let client = conn.client;
            match self.resume_request(client) {
                Some(request) => {
                    let conn = &mut self.conns[key];
                    conn.resuming = true;
                    conn.out.extend_from_slice(&request);
                }
                None => self.conns[key].out.extend_from_slice(&self.request),
            }
        }
        self.flush(key);
    }

    /// storm --resume: a client that knows its epoch asks for what came after its last id.
    fn resume_request(&self, client: usize) -> Option<Vec<u8>> {
        let topic = self.plan.resume.as_deref()?;
        let st = self.clients.get(client)?;
        let epoch = st.epoch.as_deref()?;
        let path = resume_path(&self.plan.path, topic, st.last_id, epoch);
        Some(upgrade_request(
            &path,
            &self.plan.host,
            self.plan.deflate,
            &self.plan.headers,
        ))
    }

    fn flush(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        while !conn.out.is_empty() {
            match conn.stream.write(&conn.out) {
                Ok(n) => {
                    conn.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.end(key, Some(failure_kind(&e))),
            }
        }
    }

    /// Read until a short read, or to EOF when the event said the server hung up (a FIN
    /// behind the data raises no event of its own).
    fn on_readable(&mut self, key: usize, scratch: &mut [u8], to_end: bool) {
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            if conn.state == State::Connecting {
                // Readable before writable: the connection failed (RST) or data raced
                // ahead; let the writable path decide.
                if let Ok(Some(e)) = conn.stream.take_error() {
                    return self.end(key, Some(failure_kind(&e)));
                }
                return;
            }
            match conn.stream.read(scratch) {
                Ok(0) => return self.end(key, Some("closed")),
                Ok(n) => {
                    let now = now_ns();
                    self.tally.bytes += n as u64;
                    self.on_bytes(key, &scratch[..n], now);
                    // A short read emptied the socket; a later arrival is a new event.
                    if n < scratch.len() && !to_end {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.end(key, Some(failure_kind(&e))),
            }
        }
    }

    fn on_bytes(&mut self, key: usize, input: &[u8], now: u64) {
        let conn = &mut self.conns[key];
        let mut held = std::mem::take(&mut conn.partial);
        let data: &[u8] = if held.is_empty() {
            input
        } else {
            held.extend_from_slice(input);
            &held
        };
        let mut at = 0;
        if self.conns[key].state == State::Handshaking {
            let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                self.conns[key].partial = data.to_vec();
                return;
            };
            if !data.starts_with(b"HTTP/1.1 101") {
                let status = std::str::from_utf8(&data[9..12.min(data.len())])
                    .unwrap_or("???")
                    .to_string();
                return self.end(key, Some(&format!("rejected {status}")));
            }
            at = end + 4;
            if self.plan.deflate && accepts_deflate(&data[..end]) {
                self.conns[key].deflate = true;
                self.tally.deflate_negotiated += 1;
            }
            self.on_handshake(key, now);
        }
        let mut pending = Vec::new();
        let mut inflated = std::mem::take(&mut self.inflated);
        while let Some((first, payload, used)) = frames::parse(&data[at..]) {
            at += used;
            match first & 0x0f {
                0x1 | 0x2 => {
                    let compressed = first & 0x40 != 0;
                    let message = if !compressed {
                        payload
                    } else if !self.conns[key].deflate {
                        self.inflated = inflated;
                        return self.end(key, Some("RSV1 without permessage-deflate"));
                    } else if inflate(&mut self.inflater, payload, &mut inflated) {
                        &inflated[..]
                    } else {
                        self.inflated = inflated;
                        return self.end(key, Some("bad deflate data"));
                    };
                    let counted = self.tally.received;
                    self.on_message(key, message, now);
                    if self.tally.received > counted {
                        self.tally.message_bytes += used as u64;
                        self.tally.compressed += u64::from(compressed);
                    }
                    // An echo reply may have failed the connection while writing.
                    if !self.conns.contains(key) {
                        self.inflated = inflated;
                        return;
                    }
                }
                0x9 => frames::client_frame(0xA, payload, &mut pending),
                0x8 => {
                    self.inflated = inflated;
                    return self.end(key, Some("server close"));
                }
                _ => {}
            }
        }
        self.inflated = inflated;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if at < data.len() {
            conn.partial = data[at..].to_vec();
        }
        if !pending.is_empty() {
            conn.out.extend_from_slice(&pending);
            self.flush(key);
        }
    }

    fn on_handshake(&mut self, key: usize, now: u64) {
        let conn = &mut self.conns[key];
        conn.state = State::Open;
        self.tally.connected += 1;
        self.tally.last_connected_ns = Some(now);
        let _ = self
            .handshake
            .record(((now - conn.started_ns) / 1000).max(1));
        match self.plan.mode {
            Mode::Connect => self.usable(key, now),
            Mode::Subscribe => {}
            Mode::Echo { size } => {
                self.usable(key, now);
                self.send_echo(key, size, now);
            }
        }
    }

    /// The connection is what the scenario needs (subscribed, or open).
    fn usable(&mut self, key: usize, now: u64) {
        let conn = &mut self.conns[key];
        if let Some(st) = self.clients.get_mut(conn.client) {
            if st.joined {
                self.tally.resubscribed += 1;
                self.tally.first_resubscribed_ns =
                    Some(self.tally.first_resubscribed_ns.map_or(now, |t| t.min(now)));
                stats::ReconnectTally::mark(&mut self.tally.reconnect.resubscribed_at, now);
            }
            st.joined = true;
        }
        conn.state = State::Subscribed;
        conn.last_id = 0;
        self.in_flight -= 1;
        self.tally.subscribed += 1;
        self.tally.last_subscribed_ns = Some(now);
        if !conn.settled {
            conn.settled = true;
            self.control.settled.fetch_add(1, Ordering::Relaxed);
        }
        self.control.usable.fetch_add(1, Ordering::Relaxed);
    }

    fn send_echo(&mut self, key: usize, size: usize, now: u64) {
        let mut payload = vec![b'x'; size.max(8)];
        payload[..8].copy_from_slice(&now.to_be_bytes());
        let conn = &mut self.conns[key];
        frames::client_frame(0x2, &payload, &mut conn.out);
        self.tally.echo_sent += 1;
        self.flush(key);
    }

    fn on_message(&mut self, key: usize, payload: &[u8], now: u64) {
        match self.plan.mode {
            Mode::Echo { size } => {
                if payload.len() >= 8 {
                    let sent = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
                    let _ = self.rtt.record((now.saturating_sub(sent) / 1000).max(1));
                }
                self.tally.received += 1;
                self.control.received.fetch_add(1, Ordering::Relaxed);
                if !self.control.stop.load(Ordering::Relaxed) {
                    self.send_echo(key, size, now);
                }
            }
            Mode::Subscribe | Mode::Connect => {
                if payload.starts_with(b"{\"op\":\"subscribed\"") {
                    if self.conns[key].state == State::Open {
                        if self.plan.resume.is_some() {
                            self.note_subscribed(key, payload, now);
                        }
                        self.usable(key, now);
                    }
                } else if payload.starts_with(b"{\"op\":\"reconnect\"") {
                    self.note_hint(key, payload, now);
                } else if let Some((id, stamp)) = frames::message_id_and_stamp(payload) {
                    let latency_us = (now.saturating_sub(stamp) / 1000).max(1);
                    let _ = self.latency.record(latency_us);
                    self.tally.received += 1;
                    if let Some(prev) = self.tally.last_received_ns {
                        self.tally.max_gap_ns = self.tally.max_gap_ns.max(now.saturating_sub(prev));
                    }
                    self.tally.last_received_ns = Some(now);
                    self.control.received.fetch_add(1, Ordering::Relaxed);
                    if !self.note_resumable_message(key, id, now) {
                        let conn = &mut self.conns[key];
                        if conn.last_id > 0 && id > conn.last_id + 1 {
                            self.tally.gaps += id - conn.last_id - 1;
                        }
                        conn.last_id = id;
                    }
                    if let Some(bound) = self.plan.bound_us
                        && latency_us <= bound
                    {
                        *self.tally.within_bound.entry(id).or_default() += 1;
                    }
                }
            }
        }
    }

    /// storm --resume: where the topic stands, from a `subscribed` reply. A client keeps
    /// its last id while the epoch stays (what it missed follows the reply); a new epoch
    /// starts it over at 0, since ids from the old one name other messages now.
    fn note_subscribed(&mut self, key: usize, payload: &[u8], now: u64) {
        let reply: Subscribed = serde_json::from_slice(payload).unwrap_or_default();
        let conn = &mut self.conns[key];
        let r = &mut self.tally.resume;
        let Some(st) = self.clients.get_mut(conn.client) else {
            return;
        };
        let last = reply.id.unwrap_or(0);
        st.floor.get_or_insert(last);
        // An empty epoch is no epoch: nothing could be resumed with it.
        let Some(epoch) = reply.epoch.filter(|e| !e.is_empty()) else {
            r.no_epoch += 1;
            return;
        };
        if conn.resuming {
            match reply.recovered {
                Some(true) => r.recovered += 1,
                Some(false) => r.not_recovered += 1,
                None => r.unanswered += 1,
            }
        }
        match st.epoch.as_deref() {
            Some(e) if e == epoch => {}
            Some(_) => {
                r.epoch_changes += 1;
                st.changed = true;
                st.epoch = Some(epoch);
                st.last_id = 0;
            }
            None => {
                st.epoch = Some(epoch);
                st.last_id = last;
            }
        }
        if conn.resuming {
            if st.last_id >= last {
                r.caught_up += 1;
                r.last_caught_up_ns = r.last_caught_up_ns.max(Some(now));
                let _ = self.catch_up.record(1);
            } else {
                conn.catch_up = Some((last, now));
            }
        }
    }

    /// storm --resume: a message, keyed by the client's epoch. False when there is no
    /// epoch to key it by (no --resume, or a server that gives none).
    fn note_resumable_message(&mut self, key: usize, id: u64, now: u64) -> bool {
        if self.plan.resume.is_none() {
            return false;
        }
        let conn = &mut self.conns[key];
        let Some(st) = self.clients.get_mut(conn.client) else {
            return false;
        };
        let Some(epoch) = st.epoch.as_deref() else {
            return false;
        };
        let i = match st.seen.iter().position(|(e, _)| e == epoch) {
            Some(i) => i,
            None => {
                st.seen.push((epoch.to_string(), IdSet::default()));
                st.seen.len() - 1
            }
        };
        let r = &mut self.tally.resume;
        if !st.seen[i].1.insert(id) {
            r.duplicates += 1;
            self.control.duplicates.fetch_add(1, Ordering::Relaxed);
        } else if st.last_id > 0 && id > st.last_id + 1 {
            self.tally.gaps += id - st.last_id - 1;
        }
        st.last_id = st.last_id.max(id);
        if let Some((target, since)) = conn.catch_up
            && st.last_id >= target
        {
            conn.catch_up = None;
            r.caught_up += 1;
            r.last_caught_up_ns = r.last_caught_up_ns.max(Some(now));
            let _ = self
                .catch_up
                .record((now.saturating_sub(since) / 1000).max(1));
        }
        true
    }

    /// `{"op":"reconnect","after_ms":X}`: the server is going away; come back no sooner
    /// than X ms from now (capped at `HINT_CAP_MS`; no number means now).
    fn note_hint(&mut self, key: usize, payload: &[u8], now: u64) {
        let after_ms = frames::number_after(payload, b"\"after_ms\":")
            .unwrap_or(0)
            .min(HINT_CAP_MS);
        let rt = &mut self.tally.reconnect;
        rt.hints += 1;
        rt.hint_min_ms = Some(rt.hint_min_ms.map_or(after_ms, |m| m.min(after_ms)));
        rt.hint_max_ms = Some(rt.hint_max_ms.map_or(after_ms, |m| m.max(after_ms)));
        self.conns[key].hint_until = Some(now + after_ms * 1_000_000);
    }

    fn sweep_handshake_timeouts(&mut self, now: u64) {
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state != State::Subscribed && now - c.started_ns > HANDSHAKE_TIMEOUT_NS
            })
            .map(|(k, _)| k)
            .collect();
        for key in late {
            self.end(key, Some("timeout"));
        }
    }

    /// A connection ended. Before it was usable that is a failure of `kind`; after, a
    /// disconnect. Either way a storm reconnects it.
    fn end(&mut self, key: usize, kind: Option<&str>) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        let now = now_ns();
        if conn.state == State::Subscribed {
            if !self.control.stop.load(Ordering::Relaxed) {
                self.tally.disconnects += 1;
                self.tally.first_disconnect_ns =
                    Some(self.tally.first_disconnect_ns.map_or(now, |t| t.min(now)));
                self.control.usable.fetch_sub(1, Ordering::Relaxed);
                stats::ReconnectTally::mark(&mut self.tally.reconnect.disconnects_at, now);
                if let Some(st) = self.clients.get_mut(conn.client) {
                    st.disconnects += 1;
                }
            }
        } else {
            self.in_flight -= 1;
            if let Some(kind) = kind {
                self.tally.fail(kind);
            }
            if !conn.settled {
                self.control.settled.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.schedule_retry(
            conn.source,
            if conn.state == State::Subscribed {
                0
            } else {
                conn.attempt
            },
            conn.client,
            now,
            conn.hint_until,
        );
    }
}

/// A nonblocking connect from `source` (port chosen by the kernel).
fn connect_from(source: IpAddr, target: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if source.is_ipv4() == target.is_ipv4() && !source.is_unspecified() {
        socket.bind(&SocketAddr::new(source, 0).into())?;
    }
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

fn failure_kind(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset => "reset",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::AddrNotAvailable => "no free source port",
        io::ErrorKind::BrokenPipe => "broken pipe",
        _ if e.raw_os_error() == Some(libc::EMFILE) => "out of descriptors (tool)",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server side of a handshake in a scripted server: read the request head, answer
    /// 101. Returns the request line.
    fn fake_upgrade(stream: &mut std::net::TcpStream) -> String {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut first = String::new();
        reader.read_line(&mut first).unwrap();
        let mut line = first.clone();
        while line != "\r\n" {
            line.clear();
            if reader.read_line(&mut line).unwrap() == 0 {
                break;
            }
        }
        stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            )
            .unwrap();
        first.trim_end().to_string()
    }
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::time::Instant;

    #[test]
    fn a_deflate_answer_is_recognised_and_compressed_frames_inflate() {
        assert!(accepts_deflate(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
              sec-websocket-extensions: permessage-deflate; server_no_context_takeover"
        ));
        assert!(!accepts_deflate(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket"
        ));
        let request = String::from_utf8(upgrade_request("/ws", "h", true, "")).unwrap();
        assert!(request.contains(DEFLATE_OFFER) && request.ends_with("\r\n\r\n"));
        // The one inflater serves message after message (no context between them).
        let text = br#"{"op":"message","topic":"t","id":1,"data":[1,"xxxxxxxxxxxxxxxxxxxxxxxx"]}"#;
        let mut c =
            flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 15);
        let mut deflated = Vec::with_capacity(256);
        c.compress_vec(text, &mut deflated, flate2::FlushCompress::Sync)
            .unwrap();
        deflated.truncate(deflated.len() - 4);
        let mut inflater = Decompress::new_with_window_bits(false, 15);
        let mut out = Vec::new();
        for _ in 0..3 {
            assert!(inflate(&mut inflater, &deflated, &mut out));
            assert_eq!(out, text);
        }
        assert!(!inflate(&mut inflater, &[0xff, 0xff], &mut out));
    }

    #[test]
    fn resume_paths_carry_the_position_percent_encoded() {
        assert_eq!(
            resume_path("/ws?topics=t", "t", 41, "a b/c~d"),
            "/ws?topics=t&resume=t~41~a%20b%2Fc%7Ed"
        );
        assert_eq!(
            resume_path("/ws", "x.y", 0, "E-1_2"),
            "/ws?resume=x.y~0~E-1_2"
        );
    }

    fn text(json: &str) -> Vec<u8> {
        let mut f = vec![0x81, json.len() as u8];
        f.extend_from_slice(json.as_bytes());
        f
    }

    fn message(id: u64) -> Vec<u8> {
        text(&format!(
            r#"{{"op":"message","topic":"t","id":{id},"data":[{},"x"]}}"#,
            now_ns()
        ))
    }

    /// A server that answers each connection in turn with its frames, then closes it (the
    /// last one it holds until the client goes); the request lines it was sent.
    fn scripted_server(script: Vec<Vec<u8>>) -> (SocketAddr, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut requests = Vec::new();
            let last = script.len() - 1;
            for (i, frames) in script.into_iter().enumerate() {
                let (mut stream, _) = listener.accept().unwrap();
                requests.push(fake_upgrade(&mut stream));
                stream.write_all(&frames).unwrap();
                if i == last {
                    let mut sink = Vec::new();
                    let _ = stream.read_to_end(&mut sink);
                }
            }
            requests
        });
        (addr, server)
    }

    fn resume_plan(target: SocketAddr) -> ThreadPlan {
        ThreadPlan {
            target,
            host: "test".into(),
            path: "/ws?topics=t".into(),
            mode: Mode::Subscribe,
            connections: 1,
            rate: 0.0,
            sources: vec![IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)],
            reconnect: true,
            backoff_max_ms: 50,
            resume: Some("t".into()),
            bound_us: None,
            hints: false,
            deflate: false,
            headers: String::new(),
        }
    }

    /// Run one client against `script` until it has received `messages`, then tell it the
    /// acknowledged ids and stop it.
    fn run_script(script: Vec<Vec<u8>>, messages: u64, acked: &[u64]) -> (Tally, Vec<String>) {
        let (addr, server) = scripted_server(script);
        let control = Arc::new(Control::default());
        let plan = resume_plan(addr);
        let c = control.clone();
        let client = std::thread::spawn(move || run(&plan, c, 7));
        let start = Instant::now();
        while control.received.load(Ordering::Relaxed) < messages {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "messages never came"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut ids = IdSet::default();
        for &id in acked {
            ids.insert(id);
        }
        *control.acked.lock().unwrap() = Some(ids);
        control.stop.store(true, Ordering::SeqCst);
        let tally = client.join().unwrap();
        (tally, server.join().unwrap())
    }

    #[test]
    fn a_resumed_client_asks_for_what_followed_and_counts_duplicates_and_misses() {
        let first = [
            text(r#"{"op":"subscribed","topic":"t","epoch":"E 1","id":0}"#),
            message(1),
            message(2),
            message(4),
            message(5),
        ]
        .concat();
        // Recovered, and 5 again: a duplicate.
        let second = [
            text(r#"{"op":"subscribed","topic":"t","epoch":"E 1","id":7,"recovered":true}"#),
            message(5),
            message(6),
            message(7),
        ]
        .concat();
        let (t, requests) = run_script(vec![first, second], 7, &[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(requests[0], "GET /ws?topics=t HTTP/1.1");
        assert_eq!(requests[1], "GET /ws?topics=t&resume=t~5~E%201 HTTP/1.1");
        let r = &t.resume;
        assert_eq!((t.received, r.duplicates, t.gaps), (7, 1, 1), "{t:?}");
        assert_eq!((r.recovered, r.not_recovered, r.unanswered), (1, 0, 0));
        assert_eq!((r.epoch_changes, r.no_epoch), (0, 0));
        assert_eq!((r.caught_up, t.resubscribed, t.disconnects), (1, 1, 1));
        // Id 3 never came.
        assert_eq!((r.missed_by_id, r.checked, r.unchecked), (1, 1, 0));
        assert_eq!(r.unacked, 0);
    }

    #[test]
    fn ids_received_but_never_acknowledged_are_counted() {
        // The publisher saw 200s for 1, 2 and 4 only: 3 was run, but its reply was lost.
        let only = [
            text(r#"{"op":"subscribed","topic":"t","epoch":"E","id":0}"#),
            message(1),
            message(2),
            message(3),
            message(4),
        ]
        .concat();
        let (t, _) = run_script(vec![only], 4, &[1, 2, 4]);
        let r = &t.resume;
        assert_eq!((r.unacked, r.missed_by_id, r.checked), (1, 0, 1), "{t:?}");
    }

    #[test]
    fn a_new_epoch_starts_the_client_over_and_is_not_checked_by_id() {
        let first = [
            text(r#"{"op":"subscribed","topic":"t","epoch":"A","id":3}"#),
            message(4),
            message(5),
        ]
        .concat();
        // History lost: another epoch, its ids from 1 again (not duplicates of A's).
        let second = [
            text(r#"{"op":"subscribed","topic":"t","epoch":"B","id":2,"recovered":false}"#),
            message(1),
            message(2),
        ]
        .concat();
        let third = text(r#"{"op":"subscribed","topic":"t","epoch":"B","id":2,"recovered":true}"#);
        let (t, requests) = run_script(vec![first, second, third], 4, &[4, 5]);
        assert_eq!(requests[1], "GET /ws?topics=t&resume=t~5~A HTTP/1.1");
        assert_eq!(requests[2], "GET /ws?topics=t&resume=t~2~B HTTP/1.1");
        let r = &t.resume;
        assert_eq!((t.received, r.duplicates, t.gaps), (4, 0, 0), "{t:?}");
        assert_eq!((r.recovered, r.not_recovered, r.epoch_changes), (1, 1, 1));
        assert_eq!((r.caught_up, t.resubscribed), (2, 2));
        assert_eq!((r.checked, r.unchecked), (0, 1));
    }

    /// A server that subscribes its first client, tells it to come back after `after_ms`
    /// and closes with 1001; then holds the second connection. (How long after the hint
    /// the second connection came, the second request line.)
    fn hinting_server(
        after_ms: u64,
    ) -> (
        SocketAddr,
        std::sync::mpsc::Receiver<()>,
        std::thread::JoinHandle<(Duration, String)>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (back, came_back) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            let handshake = fake_upgrade;
            let (mut one, _) = listener.accept().unwrap();
            handshake(&mut one);
            one.write_all(&text(
                r#"{"op":"subscribed","topic":"t","epoch":"E","id":0}"#,
            ))
            .unwrap();
            one.write_all(&message(1)).unwrap();
            one.write_all(&text(&format!(
                r#"{{"op":"reconnect","after_ms":{after_ms}}}"#
            )))
            .unwrap();
            let hinted = Instant::now();
            one.write_all(&[0x88, 2, 0x03, 0xe9]).unwrap(); // close 1001
            drop(one);
            let (mut two, _) = listener.accept().unwrap();
            let waited = hinted.elapsed();
            let request = handshake(&mut two);
            two.write_all(&text(
                r#"{"op":"subscribed","topic":"t","epoch":"E","id":1,"recovered":true}"#,
            ))
            .unwrap();
            let _ = back.send(());
            let mut sink = Vec::new();
            let _ = two.read_to_end(&mut sink);
            (waited, request)
        });
        (addr, came_back, server)
    }

    #[test]
    fn a_hinted_client_waits_for_the_hint_before_it_reconnects() {
        let (addr, came_back, server) = hinting_server(400);
        let control = Arc::new(Control::default());
        let mut plan = resume_plan(addr);
        plan.hints = true;
        let c = control.clone();
        let client = std::thread::spawn(move || run(&plan, c, 7));
        came_back
            .recv_timeout(Duration::from_secs(10))
            .expect("the client never came back");
        std::thread::sleep(Duration::from_millis(100));
        control.stop.store(true, Ordering::SeqCst);
        let t = client.join().unwrap();
        let (waited, request) = server.join().unwrap();
        assert!(waited >= Duration::from_millis(400), "{waited:?}");
        assert!(waited < Duration::from_millis(2000), "{waited:?}");
        assert_eq!(request, "GET /ws?topics=t&resume=t~1~E HTTP/1.1");
        let rt = &t.reconnect;
        assert_eq!(
            (rt.hints, rt.hint_min_ms, rt.hint_max_ms),
            (1, Some(400), Some(400))
        );
        assert_eq!((rt.hinted_reconnects, rt.early), (1, 0), "{rt:?}");
        assert!(rt.least_slack_ms.is_some_and(|s| s < 150), "{rt:?}");
        assert_eq!((t.disconnects, t.resubscribed), (1, 1));
        assert_eq!(rt.disconnects_at.values().sum::<u64>(), 1);
        assert_eq!(rt.attempts_at.values().sum::<u64>(), 1);
        assert_eq!(rt.resubscribed_at.values().sum::<u64>(), 1);
        assert_eq!(rt.clients_by_disconnects.get(&1), Some(&1));
    }

    #[test]
    fn without_an_epoch_a_client_reconnects_as_before() {
        let first = [
            text(r#"{"op":"subscribed","topic":"t","epoch":"","id":0}"#),
            message(1),
        ]
        .concat();
        let second = [text(r#"{"op":"subscribed","topic":"t"}"#), message(2)].concat();
        let (t, requests) = run_script(vec![first, second], 2, &[1, 2]);
        assert_eq!(requests[1], "GET /ws?topics=t HTTP/1.1");
        assert_eq!((t.resume.no_epoch, t.resume.recovered), (2, 0));
        assert_eq!((t.resume.checked, t.resume.unchecked), (0, 1));
    }
}
