//! For unit tests only: the handlers wired together as the reactor wires them, with no
//! socket and no clock. A test "connects" (a record in the connection table), feeds
//! bytes in as the loop would after a read, and takes out what would have been written.
//! The clock is `World::now`, moved by hand.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::config::Args;
use crate::conn::{ConnId, Conns, State};
use crate::http::front::{Env, Front, Rules};
use crate::metrics::Counters;
use crate::pubsub::PubSub;
use crate::pubsub::history::History;
use crate::session::Sessions;

pub struct World {
    pub conns: Conns,
    pub front: Front,
    pub sessions: Sessions,
    pub pubsub: PubSub,
    pub counters: Counters,
    pub draining: bool,
    pub now: Instant,
    next_port: u16,
}

/// A frame as a client receives it: opcode, RSV1 (permessage-deflate) and payload, as
/// it came (compressed when `rsv1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub opcode: u8,
    pub rsv1: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The payload as the application sees it: inflated when it came compressed, as a
    /// client of RFC 7692 does (the tail put back, a fresh stream per message).
    pub fn data(&self) -> Vec<u8> {
        if !self.rsv1 {
            return self.payload.clone();
        }
        let mut input = self.payload.clone();
        input.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
        let mut inflater = flate2::Decompress::new_with_window_bits(false, 15);
        let mut out = Vec::with_capacity(1 << 20);
        inflater
            .decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
            .expect("a compressed frame inflates");
        out
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.data()).expect("server text frames are JSON")
    }

    /// A close frame's status code.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 0x8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl World {
    /// herald configured by these flags, as on the command line.
    pub fn new(flags: &[&str]) -> World {
        let args = Args::try_parse_from(std::iter::once("herald").chain(flags.iter().copied()))
            .expect("test flags parse");
        let cfg = args.into_config(None, None).expect("test flags are valid");
        let now = Instant::now();
        let rules = Rules::new(&cfg, 1024, 1000);
        World {
            conns: Conns::new(crate::limits::Addresses::new(cfg.limits.clone())),
            front: Front::new(rules),
            sessions: Sessions::new(&cfg),
            pubsub: PubSub::new(&cfg, History::new(cfg.history, 7), now),
            counters: Counters::default(),
            draining: false,
            now,
            next_port: 40000,
        }
    }

    /// A connection from loopback.
    pub fn connect(&mut self) -> ConnId {
        self.connect_from("127.0.0.1")
    }

    pub fn connect_from(&mut self, ip: &str) -> ConnId {
        self.next_port += 1;
        let peer: SocketAddr = format!("{ip}:{}", self.next_port)
            .parse()
            .expect("an address");
        self.conns.insert(peer, self.now)
    }

    /// Bytes from the peer, routed to the handler for the connection's state, as the
    /// reactor's `on_input` does.
    pub fn send(&mut self, id: ConnId, bytes: &[u8]) {
        let now = self.now;
        match self.conns[id].state {
            State::ReadingRequest | State::AwaitingRedis { .. } => {
                let mut env = Env {
                    conns: &mut self.conns,
                    pubsub: &mut self.pubsub,
                    counters: &mut self.counters,
                    sessions: &self.sessions,
                    draining: self.draining,
                };
                self.front.on_input(&mut env, id, bytes, now);
            }
            State::Open(_) | State::Closing(_) => self.sessions.on_input(
                &mut self.conns,
                &mut self.pubsub,
                &mut self.counters,
                id,
                bytes,
                now,
            ),
            State::AwaitingApp(_) | State::Finishing | State::Lingering | State::Dead => {}
        }
        // The end of the reactor's pass: the publishes' frames reach their subscribers.
        self.sessions
            .deliver_pending(&mut self.conns, &mut self.pubsub, &mut self.counters, now);
    }

    /// Everything queued to the peer so far, as the socket would have received it.
    pub fn take_output(&mut self, id: ConnId) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut syscalls = 0;
        self.conns[id]
            .out
            .write_to(&mut wire, usize::MAX, &mut syscalls)
            .expect("a Vec takes every byte");
        wire
    }

    pub fn take_text(&mut self, id: ConnId) -> String {
        String::from_utf8(self.take_output(id)).expect("HTTP responses here are text")
    }

    /// Open a WebSocket on `path` (e.g. `/ws?topics=a`); the 101 is taken off the output.
    pub fn open(&mut self, path: &str) -> ConnId {
        self.open_with(path, "").0
    }

    /// `open`, offering permessage-deflate as Chromium does; true if it was accepted.
    pub fn open_deflate(&mut self, path: &str) -> (ConnId, bool) {
        let (id, head) = self.open_with(
            path,
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
        );
        (
            id,
            head.contains("Sec-WebSocket-Extensions: permessage-deflate"),
        )
    }

    /// `open` with more request headers (each ending in CRLF); returns the 101's head too.
    pub fn open_with(&mut self, path: &str, headers: &str) -> (ConnId, String) {
        let id = self.connect();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             {headers}\r\n"
        );
        self.send(id, request.as_bytes());
        let wire = self.take_output(id);
        let head_end = wire
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head")
            + 4;
        assert!(
            wire.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&wire)
        );
        // Frames that came right behind the 101 stay for the test to read.
        let rest = wire[head_end..].to_vec();
        self.conns[id].out.push(bytes::Bytes::from(rest));
        (id, String::from_utf8_lossy(&wire[..head_end]).into_owned())
    }

    /// A client text frame (masked, as RFC 6455 requires of clients).
    pub fn send_text(&mut self, id: ConnId, text: &str) {
        let frame = client_frame(0x1, text.as_bytes());
        self.send(id, &frame);
    }

    /// The frames queued to a WebSocket peer so far.
    pub fn frames(&mut self, id: ConnId) -> Vec<Frame> {
        parse_frames(&self.take_output(id))
    }

    /// The JSON of every text frame queued so far.
    pub fn messages(&mut self, id: ConnId) -> Vec<serde_json::Value> {
        self.frames(id)
            .iter()
            .filter(|f| f.opcode == 0x1)
            .map(Frame::json)
            .collect()
    }

    /// `POST /publish` from loopback on a fresh connection; returns the response text.
    pub fn publish(&mut self, body: &str) -> String {
        let id = self.connect();
        let request = format!(
            "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.send(id, request.as_bytes());
        self.take_text(id)
    }

    pub fn advance(&mut self, by: Duration) {
        self.now += by;
    }
}

/// A masked client frame with a fixed mask.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    client_frame_with(0x80 | opcode, payload)
}

/// A masked client frame whose first byte (FIN, RSV1-3, opcode) is `first`.
pub fn client_frame_with(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![first];
    match payload.len() {
        n @ 0..=125 => frame.push(0x80 | n as u8),
        n @ 126..=65535 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Unmasked server frames, in order (a trailing partial frame is a test failure).
pub fn parse_frames(mut wire: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while !wire.is_empty() {
        assert!(wire.len() >= 2, "truncated frame header");
        let opcode = wire[0] & 0x0f;
        assert_eq!(wire[1] & 0x80, 0, "server frames are not masked");
        let (len, header) = match wire[1] & 0x7f {
            126 => (u16::from_be_bytes([wire[2], wire[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(wire[2..10].try_into().expect("8 bytes")) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert!(wire.len() >= header + len, "truncated frame payload");
        frames.push(Frame {
            opcode,
            rsv1: wire[0] & 0x40 != 0,
            payload: wire[header..header + len].to_vec(),
        });
        wire = &wire[header + len..];
    }
    frames
}
