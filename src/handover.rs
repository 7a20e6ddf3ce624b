//! The live upgrade's state file (SIGUSR2): what the old binary hands the new one, as
//! bytes. Pure: no descriptors are opened or closed here, the reactor's `upgrade` module
//! does that.
//!
//! The file is an **envelope** that every version of herald must read, around a
//! **body** that only the same format version reads:
//!
//! ```text
//! envelope v1 (little-endian, never changed; a later version may only append)
//!   magic  "HRLDHAND"   u32 envelope version (1)
//!   i32 listener fd, i32 agent fd, i32 metrics fd       (-1: none)
//!   u32 n, then n times: i32 fd, u8 kind, u32 len, len bytes of pending output
//!   u32 len, len bytes: the history snapshot (its own versioned, checksummed format)
//!   u32 body version, u32 len, len bytes: the body
//! ```
//!
//! The envelope is what a new binary needs to do the right thing with every inherited
//! socket when it cannot use the body (another body version, a body that does not
//! decode, a config that no longer fits it): write each connection's pending bytes
//! exactly, then for a WebSocket the `reconnect` hint and 1001, paced like a drain, while
//! the history lets those clients resume with `recovered:true`. The body is JSON of the
//! structs below (serde, already a dependency; 10,000 connections encode in a few
//! milliseconds, see the README's figures): adding a carried field is one field here,
//! with `#[serde(default)]` if older files may lack it, or a new `BODY_VERSION` if its
//! absence would be wrong.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::metrics::{Counters, Resumes};

const MAGIC: &[u8; 8] = b"HRLDHAND";
pub const ENVELOPE_VERSION: u32 = 1;
/// The body's format. Bump it whenever a change to the structs below would make an older
/// or newer binary misread a body: the new binary then takes the fallback, safely.
pub const BODY_VERSION: u32 = 1;
/// Bounds on what a (possibly corrupt) file may make us allocate.
const MAX_CONNS: u32 = 4_000_000;

/// What a connection is, as far as the fallback must know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// HTTP: write what is pending, then close after it.
    Http,
    /// A `/ws` WebSocket: pending bytes, then `reconnect` and 1001.
    Topics,
    /// An `/echo` WebSocket: pending bytes, then 1001.
    Echo,
    /// A WebSocket whose close frame is already queued or sent: pending bytes, then wait
    /// for the peer's reply or the grace time.
    Closing,
    /// Ending (finishing or lingering): pending bytes, then close.
    Ending,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Http => 0,
            Kind::Topics => 1,
            Kind::Echo => 2,
            Kind::Closing => 3,
            Kind::Ending => 4,
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::Http,
            1 => Kind::Topics,
            2 => Kind::Echo,
            3 => Kind::Closing,
            4 => Kind::Ending,
            _ => return None,
        })
    }
}

/// One inherited socket, as the envelope carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub fd: i32,
    pub kind: Kind,
    /// Every byte queued and not yet written, from the exact byte the kernel took last.
    pub pending: Vec<u8>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub listener: Option<i32>,
    pub agent: Option<i32>,
    pub metrics: Option<i32>,
    pub sockets: Vec<Socket>,
    pub history: Vec<u8>,
    pub body_version: u32,
    pub body: Vec<u8>,
}

// ---- the body (BODY_VERSION 1) -------------------------------------------------------

/// Everything beside the sockets that the new binary continues with.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Body {
    /// In the envelope's order: `conns[i]` is `sockets[i]`.
    pub conns: Vec<Conn>,
    pub counters: Counters,
    pub pubsub: PubSubCounts,
    /// `--statsd`: each counter series' value at the last report, so the first report
    /// after the upgrade sends deltas, not whole counters.
    pub statsd_last: Vec<(String, f64)>,
    /// The application's counters and undelivered webhooks (`--auth-url`,
    /// `--webhook-url`), as `app::App::export` wrote them: kept opaque here, so this format
    /// does not depend on the application client's types.
    #[serde(default)]
    pub app: serde_json::Value,
    /// Wall-clock nanoseconds when the old binary stopped serving (its last pass ended),
    /// so the new one can log how long the pause was.
    #[serde(default)]
    pub stopped_at_ns: u64,
}

/// The publish pipeline's counters.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PubSubCounts {
    pub resumes: Resumes,
    /// History's evictions: size, ttl, memory.
    pub evictions: (u64, u64, u64),
    /// The Redis link's reconnects and errors.
    pub redis: (u64, u64),
    /// Sentinel and Cluster: failovers, publishes refused for too few replicas, redirects.
    #[serde(default)]
    pub redis_ha: (u64, u64, u64),
    /// The Redis link's instance id (per-process presence entries are kept under it).
    #[serde(default)]
    pub redis_instance: Option<String>,
}

/// One connection's record.
#[derive(Debug, Serialize, Deserialize)]
pub struct Conn {
    pub peer: SocketAddr,
    pub client: Client,
    pub state: State,
    pub metrics_port: bool,
    pub peer_shut: bool,
    pub sent_continue: bool,
    /// Bytes of a request in progress.
    pub partial: Vec<u8>,
    /// Armed timers as (kind, milliseconds left).
    pub timers: Vec<(Timer, u64)>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum Client {
    Peer,
    ProxyUnread,
    ProxyOwn,
    Forwarded(IpAddr),
    ForwardedFor(IpAddr),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Timer {
    Request,
    Idle,
    Ping,
    Pong,
    CloseGrace,
    Grant,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum State {
    ReadingRequest,
    Open(Box<Session>),
    Closing(Box<Session>),
    Finishing,
    Lingering,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Session {
    pub echo: bool,
    pub ws: Ws,
    /// Milliseconds since its last byte arrived.
    pub silent_ms: u64,
    pub grant: Option<Grant>,
    /// The op budget's level (its refill restarts at the takeover).
    pub ops_level: f32,
    pub topics: Vec<Membership>,
}

/// The codec's state: input short of a frame, a fragmented message in progress, the
/// close handshake, the negotiated permessage-deflate window.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ws {
    pub input: Vec<u8>,
    pub message: Option<Fragments>,
    pub max_message_size: u32,
    pub close_sent: bool,
    pub close_received: bool,
    pub deflate: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fragments {
    pub text: bool,
    pub compressed: bool,
    pub payload: Vec<u8>,
    pub valid_utf8: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grant {
    pub sub: Option<String>,
    pub exp: u64,
    /// The patterns as `Patterns::parse` reads them.
    pub topics: String,
    pub publish: String,
    /// `--auth-subscribe`: private topics the application refused this connection.
    #[serde(default)]
    pub refused: String,
}

/// A subscription and where it stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Membership {
    pub topic: String,
    pub live: bool,
    /// Through Redis: the epoch and id it was last given.
    pub epoch: Option<String>,
    pub last: u64,
    /// On a presence topic: its member id, and whether it watches joins and leaves.
    pub presence: Option<(String, bool)>,
}

// ---- the envelope's bytes ------------------------------------------------------------

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        let pending: usize = self.sockets.iter().map(|s| s.pending.len() + 9).sum();
        let mut out = Vec::with_capacity(40 + pending + self.history.len() + self.body.len());
        out.extend_from_slice(MAGIC);
        put_u32(&mut out, ENVELOPE_VERSION);
        for fd in [self.listener, self.agent, self.metrics] {
            out.extend_from_slice(&fd.unwrap_or(-1).to_le_bytes());
        }
        put_u32(&mut out, self.sockets.len() as u32);
        for s in &self.sockets {
            out.extend_from_slice(&s.fd.to_le_bytes());
            out.push(s.kind.byte());
            put_bytes(&mut out, &s.pending);
        }
        put_bytes(&mut out, &self.history);
        put_u32(&mut out, self.body_version);
        put_bytes(&mut out, &self.body);
        out
    }

    /// A file that is not an envelope at all (another magic, another envelope version,
    /// cut short) is an error: then not even the sockets are known.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, String> {
        let mut r = Reader(bytes);
        if r.take(8)? != MAGIC {
            return Err("not a herald handover file".into());
        }
        let version = r.u32()?;
        if version != ENVELOPE_VERSION {
            return Err(format!(
                "envelope version {version}, expected {ENVELOPE_VERSION}"
            ));
        }
        let fd = |r: &mut Reader| -> Result<Option<i32>, String> {
            let v = r.i32()?;
            Ok((v >= 0).then_some(v))
        };
        let listener = fd(&mut r)?;
        let agent = fd(&mut r)?;
        let metrics = fd(&mut r)?;
        let n = r.u32()?;
        if n > MAX_CONNS {
            return Err(format!("{n} connections"));
        }
        let mut sockets = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let fd = r.i32()?;
            let kind = r.take(1)?[0];
            let kind = Kind::from_byte(kind).ok_or(format!("connection kind {kind}"))?;
            let pending = r.bytes()?.to_vec();
            if fd < 0 {
                return Err(format!("descriptor {fd}"));
            }
            sockets.push(Socket { fd, kind, pending });
        }
        let history = r.bytes()?.to_vec();
        let body_version = r.u32()?;
        let body = r.bytes()?.to_vec();
        Ok(Envelope {
            listener,
            agent,
            metrics,
            sockets,
            history,
            body_version,
            body,
        })
    }
}

impl Body {
    pub fn encode(&self) -> Vec<u8> {
        // Plain data (no maps with non-string keys): serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The body, if this binary reads its version and it decodes, with one record per
    /// inherited socket.
    pub fn decode(envelope: &Envelope, expected_version: u32) -> Result<Body, String> {
        if envelope.body_version != expected_version {
            return Err(format!(
                "body version {}, this binary reads {expected_version}",
                envelope.body_version
            ));
        }
        let body: Body = serde_json::from_slice(&envelope.body).map_err(|e| e.to_string())?;
        if body.conns.len() != envelope.sockets.len() {
            return Err(format!(
                "{} connection records for {} sockets",
                body.conns.len(),
                envelope.sockets.len()
            ));
        }
        Ok(body)
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len() as u32);
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("handover file cut short".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self) -> Result<i32, String> {
        let b = self.take(4)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            listener: Some(3),
            agent: None,
            metrics: Some(9),
            sockets: vec![
                Socket {
                    fd: 10,
                    kind: Kind::Topics,
                    pending: b"\x81\x05hello".to_vec(),
                },
                Socket {
                    fd: 11,
                    kind: Kind::Http,
                    pending: Vec::new(),
                },
            ],
            history: b"history".to_vec(),
            body_version: BODY_VERSION,
            body: Body {
                conns: vec![],
                ..Body::default()
            }
            .encode(),
        }
    }

    #[test]
    fn the_envelope_round_trips() {
        let e = sample();
        assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(Envelope::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(Envelope::decode(&bad).is_err());
        // A huge length is refused without allocating it.
        let mut huge = bytes[..28].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Envelope::decode(&huge).is_err());
    }

    #[test]
    fn another_body_version_or_a_mismatched_body_is_refused() {
        let mut e = sample();
        // Two sockets, no records.
        assert!(Body::decode(&e, BODY_VERSION).is_err());
        e.body = Body {
            conns: vec![],
            ..Body::default()
        }
        .encode();
        e.sockets.clear();
        assert!(Body::decode(&e, BODY_VERSION).is_ok());
        assert!(Body::decode(&e, BODY_VERSION + 1).is_err());
        e.body = b"{not json".to_vec();
        assert!(Body::decode(&e, BODY_VERSION).is_err());
    }
}
