//! The client side of every scenario: one thread, one mio loop, many WebSocket
//! connections. Each socket is read into one large buffer per thread and frames are
//! scanned in place, so receiving costs a read syscall per burst and no allocation per
//! message. A connection keeps bytes of its own only while a frame or the handshake
//! response is partial.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

use crate::frames;
use crate::stats::{Buckets, Tally, histogram, now_ns};

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
    /// capacity: count, per message id, receptions within this latency.
    pub bound_us: Option<u64>,
}

/// Shared between a worker's threads and its main thread.
#[derive(Default)]
pub struct Control {
    pub stop: AtomicBool,
    /// Connections done with their first attempt: usable (connected or subscribed, per
    /// mode) or failed.
    pub settled: AtomicU64,
    pub usable: AtomicU64,
    pub received: AtomicU64,
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
    request: Vec<u8>,
    rng: u64,
    /// Reconnects waiting for their time: (due ns, source, attempt).
    retry: Vec<(u64, IpAddr, u32)>,
    /// Connections opened and not yet usable or ended.
    in_flight: usize,
}

pub fn run(plan: &ThreadPlan, control: Arc<Control>, seed: u64) -> Tally {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        plan.path, plan.host
    )
    .into_bytes();
    let mut client = Client {
        plan,
        control: &control,
        poll: Poll::new().expect("epoll"),
        conns: Slab::with_capacity(plan.connections),
        tally: Tally::default(),
        handshake: histogram(),
        latency: histogram(),
        rtt: histogram(),
        request,
        rng: seed | 1,
        retry: Vec::new(),
        in_flight: 0,
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
                self.open(source, 0, now);
                opened += 1;
            }
            // Reconnects that are due.
            let mut i = 0;
            while i < self.retry.len() {
                if self.retry[i].0 <= now {
                    let (_, source, attempt) = self.retry.swap_remove(i);
                    self.open(source, attempt, now);
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
        self.tally
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn open(&mut self, source: IpAddr, attempt: u32, now: u64) {
        self.tally.attempted += 1;
        self.tally.first_attempt_ns = Some(self.tally.first_attempt_ns.map_or(now, |t| t.min(now)));
        let stream = match connect_from(source, self.plan.target) {
            Ok(s) => s,
            Err(e) => {
                self.tally.fail(failure_kind(&e));
                self.settle_first(attempt == 0);
                self.schedule_retry(source, attempt, now);
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

    fn schedule_retry(&mut self, source: IpAddr, attempt: u32, now: u64) {
        if !self.plan.reconnect || self.control.stop.load(Ordering::Relaxed) {
            return;
        }
        // Exponential backoff from 100 ms to 2 s, with full jitter: a restarted server
        // sees the reconnects spread out instead of one thundering herd.
        let cap = (100_000_000u64 << attempt.min(5)).min(2_000_000_000);
        let delay = self.random() % cap;
        self.retry.push((now + delay, source, attempt + 1));
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
            conn.out.extend_from_slice(&self.request);
        }
        self.flush(key);
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
            self.on_handshake(key, now);
        }
        let mut pending = Vec::new();
        while let Some((first, payload, used)) = frames::parse(&data[at..]) {
            at += used;
            match first & 0x0f {
                0x1 | 0x2 => {
                    self.on_message(key, payload, now);
                    // An echo reply may have failed the connection while writing.
                    if !self.conns.contains(key) {
                        return;
                    }
                }
                0x9 => frames::client_frame(0xA, payload, &mut pending),
                0x8 => return self.end(key, Some("server close")),
                _ => {}
            }
        }
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
                if let Some((id, stamp)) = frames::message_id_and_stamp(payload) {
                    let latency_us = (now.saturating_sub(stamp) / 1000).max(1);
                    let _ = self.latency.record(latency_us);
                    self.tally.received += 1;
                    self.tally.last_received_ns = Some(now);
                    self.control.received.fetch_add(1, Ordering::Relaxed);
                    let conn = &mut self.conns[key];
                    if conn.last_id > 0 && id > conn.last_id + 1 {
                        self.tally.gaps += id - conn.last_id - 1;
                    }
                    conn.last_id = id;
                    if let Some(bound) = self.plan.bound_us
                        && latency_us <= bound
                    {
                        *self.tally.within_bound.entry(id).or_default() += 1;
                    }
                } else if payload.starts_with(b"{\"op\":\"subscribed\"")
                    && self.conns[key].state == State::Open
                {
                    self.usable(key, now);
                }
            }
        }
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
            now,
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
