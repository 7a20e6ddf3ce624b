//! tungstenite, kept on a short leash. A `WebSocketContext` (read buffer size 0) applies
//! RFC 6455: unmasking, fragmentation, UTF-8, control frames, the close handshake. It
//! never touches the socket: it reads through `Io` from the slice the loop just read into
//! its one shared scratch buffer, and what it writes (pongs, close frames) lands in the
//! connection's `OutQueue`, behind any broadcast frames already there. An idle connection
//! therefore holds no read or write buffer; tungstenite allocates one only while a frame
//! is partial. Outgoing data frames are encoded here once and shared as `Bytes`.

use std::io::{self, Read, Write};

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, FrameHeader};
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Error, Message};

use crate::close::CloseReason;
use crate::outq::OutQueue;

/// An unmasked server ping with no payload (RFC 6455 §5.5.2).
const PING: &[u8] = &[0x89, 0x00];

/// The stream tungstenite sees: input from the scratch slice, output into our queue.
struct Io<'i, 'o> {
    input: &'i [u8],
    out: &'o mut OutQueue,
}

impl Read for Io<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Never Ok(0): tungstenite would take that for the peer closing the TCP stream.
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Io<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.push(Bytes::copy_from_slice(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What reading produced.
#[derive(Debug)]
pub enum WsEvent {
    /// A whole text or binary message (fragments already joined).
    Message(Message),
    /// The input is used up; a partial frame, if any, waits inside tungstenite.
    NeedMore,
    /// The close handshake is complete: flush the queue and close the TCP stream.
    Closed,
    /// The peer broke the protocol; close with this reason.
    Fail(CloseReason),
}

/// One WebSocket's protocol state.
#[derive(Debug)]
pub struct Ws {
    ctx: WebSocketContext,
}

impl Ws {
    /// Bytes that arrived behind the HTTP request head are frames: the caller passes them
    /// to `read` like any later input.
    pub fn new(max_message_size: usize) -> Ws {
        let config = WebSocketConfig::default()
            // Our scratch buffer does the reading; tungstenite grows its own buffer only
            // to hold a partial frame (NOTES.md: 0.4 KiB per idle connection this way).
            .read_buffer_size(0)
            .write_buffer_size(0)
            .max_message_size(Some(max_message_size))
            .max_frame_size(Some(max_message_size));
        Ws {
            ctx: WebSocketContext::new(Role::Server, Some(config)),
        }
    }

    /// Take the next event from `input`, advancing it. Call until `NeedMore`: two frames
    /// in one segment arrive as one readiness event.
    pub fn read(&mut self, input: &mut &[u8], out: &mut OutQueue) -> WsEvent {
        // A loop, not recursion: a peer may send thousands of control frames in a row.
        loop {
            let mut io = Io {
                input,
                out: &mut *out,
            };
            let result = self.ctx.read(&mut io);
            *input = io.input;
            return match result {
                // Pings were answered and a peer's close was replied to inside tungstenite
                // (the reply reaches our queue on the next read); pongs only prove life,
                // which the caller already noted when bytes arrived.
                Ok(Message::Close(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {
                    continue;
                }
                Ok(msg) => WsEvent::Message(msg),
                Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A pong or close reply may still be waiting for its write turn.
                    match self.ctx.flush(&mut Io { input: &[], out }) {
                        Err(Error::ConnectionClosed) => WsEvent::Closed,
                        _ => WsEvent::NeedMore,
                    }
                }
                Err(Error::ConnectionClosed | Error::AlreadyClosed) => WsEvent::Closed,
                Err(err) => match CloseReason::from_ws_error(&err) {
                    Some(reason) => WsEvent::Fail(reason),
                    None => WsEvent::Closed,
                },
            };
        }
    }

    /// Queue our close frame. Later reads still accept the peer's reply.
    pub fn close(&mut self, reason: CloseReason, out: &mut OutQueue) {
        let frame = CloseFrame {
            code: reason.code(),
            reason: reason.text().into(),
        };
        // Writing into our queue cannot fail; an error here only means a close frame was
        // already sent or received, and then there is nothing more to send.
        let _ = self.ctx.close(&mut Io { input: &[], out }, Some(frame));
    }
}

/// Queue a ping frame (shared static bytes, no allocation).
pub fn queue_ping(out: &mut OutQueue) {
    out.push(Bytes::from_static(PING));
}

pub fn text_frame(payload: &[u8]) -> Bytes {
    frame(Data::Text, payload)
}

pub fn binary_frame(payload: &[u8]) -> Bytes {
    frame(Data::Binary, payload)
}

/// Encode one final, unmasked server frame: header and payload in one allocation.
fn frame(kind: Data, payload: &[u8]) -> Bytes {
    let header = FrameHeader {
        is_final: true,
        opcode: OpCode::Data(kind),
        ..FrameHeader::default()
    };
    let mut out = Vec::with_capacity(header.len(payload.len() as u64) + payload.len());
    header
        .format(payload.len() as u64, &mut out)
        .expect("formatting a frame header into a Vec cannot fail");
    out.extend_from_slice(payload);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as a browser would send it.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn drain(ws: &mut Ws, bytes: &[u8], out: &mut OutQueue) -> Vec<WsEvent> {
        let mut input = bytes;
        let mut events = Vec::new();
        loop {
            match ws.read(&mut input, out) {
                WsEvent::NeedMore => return events,
                e @ (WsEvent::Closed | WsEvent::Fail(_)) => {
                    events.push(e);
                    return events;
                }
                e => events.push(e),
            }
        }
    }

    fn text(e: &WsEvent) -> &str {
        match e {
            WsEvent::Message(Message::Text(t)) => t.as_str(),
            other => panic!("not text: {other:?}"),
        }
    }

    #[test]
    fn frames_split_anywhere_and_pipelined_are_all_read() {
        let mut bytes = client_frame(0x81, b"hello");
        bytes.extend(client_frame(0x81, b"world"));
        for split in 0..bytes.len() {
            let mut ws = Ws::new(1024);
            let mut out = OutQueue::default();
            let mut events = drain(&mut ws, &bytes[..split], &mut out);
            events.extend(drain(&mut ws, &bytes[split..], &mut out));
            let texts: Vec<&str> = events.iter().map(text).collect();
            assert_eq!(texts, ["hello", "world"], "split at {split}");
        }
    }

    #[test]
    fn fragments_with_a_ping_between_are_joined_and_the_ping_answered() {
        let mut bytes = client_frame(0x01, b"hel");
        bytes.extend(client_frame(0x89, b"p"));
        bytes.extend(client_frame(0x80, b"lo"));
        let mut ws = Ws::new(1024);
        let mut out = OutQueue::default();
        let events = drain(&mut ws, &bytes, &mut out);
        assert_eq!(events.iter().map(text).collect::<Vec<_>>(), ["hello"]);
        // The pong went into our queue: 0x8A, length 1, payload "p".
        let mut wire = Vec::new();
        out.write_to(&mut wire, usize::MAX, &mut 0).unwrap();
        assert_eq!(wire, [0x8a, 0x01, b'p']);
    }

    #[test]
    fn peer_close_is_answered_then_reported_closed() {
        let mut ws = Ws::new(1024);
        let mut out = OutQueue::default();
        let events = drain(&mut ws, &client_frame(0x88, &[0x03, 0xe8]), &mut out);
        assert!(matches!(events.as_slice(), [WsEvent::Closed]), "{events:?}");
        let mut wire = Vec::new();
        out.write_to(&mut wire, usize::MAX, &mut 0).unwrap();
        assert_eq!(wire, [0x88, 0x02, 0x03, 0xe8]);
    }

    #[test]
    fn protocol_breaches_map_to_close_reasons() {
        let cases: [(Vec<u8>, CloseReason); 5] = [
            (vec![0x81, 0x01, b'x'], CloseReason::Protocol), // unmasked
            (client_frame(0xc1, b"x"), CloseReason::Protocol), // RSV1
            (client_frame(0x83, b"x"), CloseReason::Protocol), // reserved opcode
            (client_frame(0x09, b"x"), CloseReason::Protocol), // fragmented ping
            (client_frame(0x81, &[0xff, 0xfe]), CloseReason::InvalidUtf8),
        ];
        for (bytes, want) in cases {
            let mut ws = Ws::new(1024);
            let events = drain(&mut ws, &bytes, &mut OutQueue::default());
            assert!(
                matches!(events.last(), Some(WsEvent::Fail(r)) if *r == want),
                "{bytes:x?}: {events:?}"
            );
        }
        let mut ws = Ws::new(10);
        let events = drain(
            &mut ws,
            &client_frame(0x82, &[0; 11]),
            &mut OutQueue::default(),
        );
        assert!(matches!(
            events.last(),
            Some(WsEvent::Fail(CloseReason::TooBig))
        ));
    }

    #[test]
    fn our_close_is_queued_once() {
        let mut ws = Ws::new(1024);
        let mut out = OutQueue::default();
        ws.close(CloseReason::GoingAway, &mut out);
        ws.close(CloseReason::GoingAway, &mut out);
        let mut wire = Vec::new();
        out.write_to(&mut wire, usize::MAX, &mut 0).unwrap();
        assert_eq!(&wire[..4], [0x88, 2 + 20, 0x03, 0xe9]);
        assert_eq!(wire.len(), 4 + 20);
    }
}
