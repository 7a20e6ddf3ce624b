//! The connection table: every client connection's record (what it awaits, its partial
//! input, its output queue, its timers) in one slab whose keys are the mio tokens, plus
//! the lists the loop works through after each pass: connections with output to write
//! (`urgent` and `fanout`) and connections to remove (`reap`).
//!
//! Handlers change connections only through this table: they queue bytes, move a state
//! along, arm timers, or end a connection. The sockets are not here: the reactor keeps
//! them beside the table under the same keys, so nothing but the loop can make a system
//! call, and every handler can be driven in a test with no socket at all. Ending a
//! connection only marks it `Dead` and lists it; the reactor removes it after the pass,
//! so a slab key is never reused within one.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Index, IndexMut};
use std::time::{Duration, Instant};

use bytes::Bytes;
use slab::Slab;

use crate::auth::{Grant, TokenError};
pub use crate::id::ConnId;
use crate::limits::{Addresses, Limit, OpBudget};
use crate::outq::OutQueue;
use crate::timer::{Timer, TimerTable, Timers};
use crate::ws::codec::Ws;
use crate::ws::deflate::Agreement;
use crate::ws::protocol::{Kind, Resume};

/// After our close frame or FIN, how long the peer has to finish before we cut it.
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// A WebSocket handshake that was accepted: what it asked for.
#[derive(Debug)]
pub struct Opening {
    pub kind: Kind,
    pub accept: String,
    /// `?topics=`, validated.
    pub topics: Vec<String>,
    /// `?resume=`: topics to subscribe from where the client left off.
    pub resume: Vec<(String, Resume<'static>)>,
    /// The outcome of `?token=`, if one was given.
    pub grant: Option<Result<Grant, TokenError>>,
    /// `?presence=`: topics (among those subscribed) whose join/leave events it wants.
    pub presence: Vec<String>,
    /// The permessage-deflate offer accepted, if any.
    pub deflate: Option<Agreement>,
}

#[derive(Debug)]
pub enum State {
    /// Awaiting an HTTP request; `Conn::partial` holds any part that has arrived.
    ReadingRequest,
    /// A publish is at Redis. Pipelined requests behind it are still read and executed,
    /// but their responses wait in the group `tag` names and go out in request order when
    /// the last Redis reply arrives.
    AwaitingRedis { tag: u64 },
    /// An accepted upgrade waits for the application's answer (`--auth-url`); bytes that
    /// arrive meanwhile (frames pipelined behind the request) wait in `Conn::partial`.
    AwaitingApp(Box<Opening>),
    /// A WebSocket in use.
    Open(Box<Session>),
    /// Our close frame is queued or sent; awaiting the peer's (or the grace timer).
    Closing(Box<Session>),
    /// Awaiting an empty output queue, then the write side closes.
    Finishing,
    /// Our side is shut; awaiting the peer's FIN (or the grace timer) so that closing
    /// the socket cannot reset data the peer has not read yet.
    Lingering,
    /// Awaiting removal at the end of this loop pass.
    Dead,
}

/// One open WebSocket: its protocol state, what it is for (`/ws` topics or `/echo`),
/// when it last showed life, and its token grant. Its topics are the hub's to know.
#[derive(Debug)]
pub struct Session {
    pub ws: Ws,
    pub kind: Kind,
    /// Last time any byte arrived; the ping timer measures silence from here.
    pub last_seen: Instant,
    /// What the client's token allows, once it presented a valid one.
    pub grant: Option<Box<Grant>>,
    /// Its budget of client ops (`--client-op-rate`).
    pub ops: OpBudget,
}

impl Session {
    pub fn new(ws: Ws, kind: Kind, ops: OpBudget, now: Instant) -> Session {
        Session {
            ws,
            kind,
            last_seen: now,
            grant: None,
            ops,
        }
    }
}

/// Who the client is, as far as the per-address limits go (`limits.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    /// A peer outside `--trusted-proxies`: the client itself, counted under its address.
    Peer,
    /// A trusted proxy's connection before its first byte: a PROXY header may come.
    ProxyUnread,
    /// A trusted proxy's own connection (a health check, a PROXY LOCAL header, a local
    /// tool): no client address was named, so no per-address limit applies. An upgrade's
    /// `X-Forwarded-For` may still name one.
    ProxyOwn,
    /// Named by a trusted proxy's PROXY header, for the whole connection; counted.
    Forwarded(IpAddr),
    /// Named by a trusted proxy's `X-Forwarded-For` on an upgrade; counted. A proxy may
    /// reuse a connection for another client's requests, so the next upgrade names again.
    ForwardedFor(IpAddr),
}

impl ClientAddr {
    /// Counted in the per-address table (released when the connection is removed).
    fn counted(self) -> bool {
        matches!(
            self,
            ClientAddr::Peer | ClientAddr::Forwarded(_) | ClientAddr::ForwardedFor(_)
        )
    }
}

#[derive(Debug)]
pub struct Conn {
    pub peer: SocketAddr,
    pub state: State,
    /// Bytes of an incomplete HTTP request. Empty (no allocation) otherwise.
    pub partial: Vec<u8>,
    pub out: OutQueue,
    pub timers: TimerTable,
    /// Listed in the table's flush list this pass.
    pub dirty: bool,
    /// The peer sent FIN: nothing more will arrive, and no FIN needs awaiting.
    pub peer_shut: bool,
    /// `100 Continue` already went out for the request in progress.
    pub sent_continue: bool,
    /// Came in on `--metrics-listen`: it is answered `/metrics` and `/health` only.
    pub metrics_port: bool,
    /// Unique for the life of the process: a reply that arrives after its connection is
    /// gone must not reach another connection that reuses the slab key.
    pub serial: u64,
    /// Who the client is; see `client_ip`. Changed only through `Conns`, which keeps the
    /// per-address counts.
    client: ClientAddr,
}

impl Conn {
    fn new(peer: SocketAddr, client: ClientAddr, serial: u64) -> Conn {
        Conn {
            peer,
            client,
            metrics_port: false,
            state: State::ReadingRequest,
            partial: Vec::new(),
            out: OutQueue::default(),
            timers: TimerTable::default(),
            dirty: false,
            peer_shut: false,
            sent_continue: false,
            serial,
        }
    }

    /// Whether the loop should watch for WRITABLE: only while output waits, so an idle
    /// socket causes no wakeups (it is always watched for READABLE, to see a FIN or RST).
    pub fn wants_writable(&self) -> bool {
        !self.out.is_empty()
    }

    pub fn session(&self) -> Option<&Session> {
        match &self.state {
            State::Open(s) | State::Closing(s) => Some(s),
            _ => None,
        }
    }

    pub fn session_mut(&mut self) -> Option<&mut Session> {
        match &mut self.state {
            State::Open(s) | State::Closing(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// The client's address: the one a trusted proxy named (PROXY v2 header, or
    /// `X-Forwarded-For` on the upgrade), else the TCP peer's. What per-address limits
    /// count, and what an application is told as the client's `remote_addr`.
    pub fn client_ip(&self) -> IpAddr {
        match self.client {
            ClientAddr::Forwarded(ip) | ClientAddr::ForwardedFor(ip) => ip,
            _ => self.peer.ip().to_canonical(),
        }
    }

    pub fn client(&self) -> ClientAddr {
        self.client
    }
}

/// A connection that just ended while subscribed to topics (it was `Open`). The hub must
/// be told, so the caller hands this to `PubSub::leave`; dropping it would leave the
/// connection's memberships behind.
#[must_use = "pass an ended connection to PubSub::leave so it leaves its topics"]
#[derive(Debug)]
pub struct Ended(pub Option<ConnId>);

#[derive(Debug, Default)]
pub struct Conns {
    slab: Slab<Conn>,
    /// Every armed deadline of every connection.
    timers: Timers,
    /// Connections with output to write: HTTP exchanges (a publisher's response) first,
    /// every pass, then WebSockets in the order they were listed, a slice per pass (see
    /// `next_fanout`), so a publish is answered before its fan-out is written.
    urgent: Vec<ConnId>,
    fanout: VecDeque<(ConnId, u64)>,
    /// Connections to remove after this pass.
    reap: Vec<ConnId>,
    next_serial: u64,
    /// Open connections and connect buckets per client address, kept by `insert`,
    /// `name_client` and `remove`, so every way a connection ends releases its count.
    pub addresses: Addresses,
}

impl Conns {
    pub fn new(addresses: Addresses) -> Conns {
        Conns {
            addresses,
            ..Conns::default()
        }
    }

    /// The id the next `insert` will use, so the socket can be registered under it first.
    pub fn next_id(&self) -> ConnId {
        ConnId(self.slab.vacant_key())
    }

    /// A new connection from `peer`. A trusted proxy's waits for its first bytes; any
    /// other peer is counted under its own address (`Addresses::check` said it may come).
    pub fn insert(&mut self, peer: SocketAddr, now: Instant) -> ConnId {
        self.next_serial += 1;
        let client = if self.addresses.is_trusted(peer.ip()) {
            ClientAddr::ProxyUnread
        } else {
            self.addresses.count(peer.ip(), now);
            ClientAddr::Peer
        };
        ConnId(self.slab.insert(Conn::new(peer, client, self.next_serial)))
    }

    /// A connection carried over by a live upgrade, with the client it had: counted again
    /// (not checked: it is already here), so the per-address table is rebuilt.
    pub fn insert_carried(&mut self, peer: SocketAddr, client: ClientAddr, now: Instant) -> ConnId {
        self.next_serial += 1;
        if client.counted() {
            let ip = match client {
                ClientAddr::Forwarded(ip) | ClientAddr::ForwardedFor(ip) => ip,
                _ => peer.ip().to_canonical(),
            };
            self.addresses.count(ip, now);
        }
        ConnId(self.slab.insert(Conn::new(peer, client, self.next_serial)))
    }

    /// A trusted proxy named the client (`Some`), in its PROXY header (`header`) or in
    /// `X-Forwarded-For`, or said it is its own connection (`None`). A named client is
    /// checked against the per-address limits and counted; refused, the connection stays
    /// the proxy's own, for the caller to answer 429.
    pub fn name_client(
        &mut self,
        id: ConnId,
        (ip, header): (Option<IpAddr>, bool),
        now: Instant,
    ) -> Result<(), Limit> {
        let Some(conn) = self.slab.get_mut(id.0) else {
            return Ok(());
        };
        if conn.client.counted() {
            self.addresses.release(conn.client_ip());
        }
        conn.client = ClientAddr::ProxyOwn;
        let Some(ip) = ip else {
            return Ok(());
        };
        self.addresses.check(ip, now)?;
        self.addresses.count(ip, now);
        conn.client = if header {
            ClientAddr::Forwarded(ip)
        } else {
            ClientAddr::ForwardedFor(ip)
        };
        Ok(())
    }

    pub fn get(&self, id: ConnId) -> Option<&Conn> {
        self.slab.get(id.0)
    }

    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.slab.get_mut(id.0)
    }

    /// The connection `id` names if it is still the one with `serial`.
    pub fn same(&self, id: ConnId, serial: u64) -> Option<&Conn> {
        self.get(id).filter(|c| c.serial == serial)
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn ids(&self) -> Vec<ConnId> {
        self.slab.iter().map(|(k, _)| ConnId(k)).collect()
    }

    pub fn websockets(&self) -> usize {
        self.slab.iter().filter(|(_, c)| c.is_open()).count()
    }

    /// Open WebSockets that negotiated permessage-deflate.
    pub fn websockets_deflate(&self) -> usize {
        self.slab
            .iter()
            .filter(|(_, c)| c.is_open() && c.session().is_some_and(|s| s.ws.deflates()))
            .count()
    }

    pub fn queued_bytes(&self) -> usize {
        self.slab.iter().map(|(_, c)| c.out.len()).sum()
    }

    // ---- output ----------------------------------------------------------------------

    /// List the connection for the flush (once).
    pub fn mark_dirty(&mut self, id: ConnId) {
        if let Some(conn) = self.slab.get_mut(id.0)
            && !conn.dirty
        {
            conn.dirty = true;
            if conn.session().is_some() {
                self.fanout.push_back((id, conn.serial));
            } else {
                self.urgent.push(id);
            }
        }
    }

    /// Queue bytes behind whatever the connection already has queued.
    pub fn queue(&mut self, id: ConnId, bytes: Bytes) {
        if let Some(conn) = self.slab.get_mut(id.0) {
            conn.out.push(bytes);
        }
        self.mark_dirty(id);
    }

    /// Queue a shared frame (a published message) and list the connection for the flush,
    /// with one slab lookup: this is the fan-out's inner loop. Returns the queue's length
    /// after, or `None` when there is no such connection.
    pub fn queue_shared(&mut self, id: ConnId, frame: &Bytes) -> Option<usize> {
        let conn = self.slab.get_mut(id.0)?;
        conn.out.push(frame.clone());
        if !conn.dirty {
            conn.dirty = true;
            self.fanout.push_back((id, conn.serial));
        }
        Some(conn.out.len())
    }

    /// The HTTP connections to flush, all of them, before any WebSocket; the reactor
    /// clears each one's `dirty` as it goes.
    pub fn take_urgent(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.urgent)
    }

    /// The next WebSocket to flush, in the order they were listed. The reactor takes as
    /// many as its time slice allows and leaves the rest for the next pass, whose poll
    /// then reads (and answers) publishes that arrived meanwhile. An entry whose
    /// connection ended and whose key was reused since is skipped.
    pub fn next_fanout(&mut self) -> Option<ConnId> {
        while let Some((id, serial)) = self.fanout.pop_front() {
            if self.same(id, serial).is_some() {
                return Some(id);
            }
        }
        None
    }

    pub fn has_dirty(&self) -> bool {
        !self.urgent.is_empty() || !self.fanout.is_empty()
    }

    // ---- timers ----------------------------------------------------------------------

    pub fn arm(&mut self, id: ConnId, kind: Timer, at: Instant) {
        if let Some(conn) = self.slab.get_mut(id.0) {
            self.timers.arm(&mut conn.timers, id.0, kind, at);
        }
    }

    pub fn disarm(&mut self, id: ConnId, kind: Timer) {
        if let Some(conn) = self.slab.get_mut(id.0) {
            self.timers.disarm(&mut conn.timers, id.0, kind);
        }
    }

    /// `id`'s armed timers and what is left of each (live upgrade).
    pub fn timers_left(&self, id: ConnId, now: Instant) -> Vec<(Timer, Duration)> {
        self.slab
            .get(id.0)
            .map(|c| self.timers.remaining(&c.timers, now))
            .unwrap_or_default()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// One timer that has expired at `now`, if any.
    pub fn pop_expired(&mut self, now: Instant) -> Option<(ConnId, Timer)> {
        let slab = &mut self.slab;
        self.timers
            .pop_expired(now, |k| slab.get_mut(k).map(|c| &mut c.timers))
            .map(|(k, kind)| (ConnId(k), kind))
    }

    // ---- ending ----------------------------------------------------------------------

    /// End a connection now: mark it `Dead` and list it for reaping after this pass.
    pub fn kill(&mut self, id: ConnId) -> Ended {
        let Some(conn) = self.slab.get_mut(id.0) else {
            return Ended(None);
        };
        if matches!(conn.state, State::Dead) {
            return Ended(None);
        }
        let was_open = conn.is_open();
        conn.state = State::Dead;
        self.reap.push(id);
        Ended(was_open.then_some(id))
    }

    /// The exchange is over: write what is queued, then close our side. A peer that will
    /// not take even that much is cut after `CLOSE_GRACE`.
    pub fn finish(&mut self, id: ConnId, now: Instant) -> Ended {
        let Some(conn) = self.slab.get_mut(id.0) else {
            return Ended(None);
        };
        let was_open = conn.is_open();
        conn.state = State::Finishing;
        for kind in [Timer::Request, Timer::Idle, Timer::Ping, Timer::Pong] {
            self.timers.disarm(&mut conn.timers, id.0, kind);
        }
        self.timers
            .arm(&mut conn.timers, id.0, Timer::CloseGrace, now + CLOSE_GRACE);
        self.mark_dirty(id);
        Ended(was_open.then_some(id))
    }

    /// The connections ended this pass, for the reactor to remove.
    pub fn take_reap(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.reap)
    }

    /// Take the record out of the table, with its timers disarmed.
    pub fn remove(&mut self, id: ConnId) -> Option<Conn> {
        let mut conn = self.slab.try_remove(id.0)?;
        self.timers.disarm_all(&mut conn.timers, id.0);
        if conn.client.counted() {
            self.addresses.release(conn.client_ip());
        }
        Some(conn)
    }
}

impl Index<ConnId> for Conns {
    type Output = Conn;

    fn index(&self, id: ConnId) -> &Conn {
        &self.slab[id.0]
    }
}

impl IndexMut<ConnId> for Conns {
    fn index_mut(&mut self, id: ConnId) -> &mut Conn {
        &mut self.slab[id.0]
    }
}
