//! One client connection: its socket, what it is waiting for, its partial input (only
//! while a request is incomplete), its output queue and its timers. The state enum is
//! named by what the connection awaits; the readiness interest is derived from it.

use std::net::SocketAddr;

use mio::net::TcpStream;
use mio::{Interest, Token};

use crate::outq::OutQueue;
use crate::session::Session;
use crate::timer::TimerTable;

/// A connection's handle: its slab key, which is also its mio `Token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub usize);

impl ConnId {
    pub fn token(self) -> Token {
        Token(self.0)
    }
}

#[derive(Debug)]
pub enum State {
    /// Awaiting an HTTP request; `Conn::partial` holds any part that has arrived.
    ReadingRequest,
    /// A publish is at Redis. Pipelined requests behind it are still read and executed,
    /// but their responses wait in the group `tag` names and go out in request order when
    /// the last Redis reply arrives.
    AwaitingRedis { tag: u64 },
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

#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub state: State,
    /// Bytes of an incomplete HTTP request. Empty (no allocation) otherwise.
    pub partial: Vec<u8>,
    pub out: OutQueue,
    pub timers: TimerTable,
    /// What mio has registered for this socket.
    pub registered: Interest,
    /// Queued in the server's flush list this pass.
    pub dirty: bool,
    /// The peer sent FIN: nothing more will arrive, and no FIN needs awaiting.
    pub peer_shut: bool,
    /// `100 Continue` already went out for the request in progress.
    pub sent_continue: bool,
    /// Unique for the life of the process: a reply that arrives after its connection is
    /// gone must not reach another connection that reuses the slab key.
    pub serial: u64,
}

impl Conn {
    pub fn new(stream: TcpStream, peer: SocketAddr, serial: u64) -> Conn {
        Conn {
            stream,
            peer,
            state: State::ReadingRequest,
            partial: Vec::new(),
            out: OutQueue::default(),
            timers: TimerTable::default(),
            registered: Interest::READABLE,
            dirty: false,
            peer_shut: false,
            sent_continue: false,
            serial,
        }
    }

    /// Readable always (a peer's FIN or RST must be seen in every state); writable only
    /// while output waits, so an idle socket causes no wakeups.
    pub fn interest(&self) -> Interest {
        if self.out.is_empty() {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        }
    }

    pub fn session_mut(&mut self) -> Option<&mut Session> {
        match &mut self.state {
            State::Open(s) | State::Closing(s) => Some(s),
            _ => None,
        }
    }
}
