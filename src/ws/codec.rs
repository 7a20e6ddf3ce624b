//! RFC 6455 framing, our own, on tungstenite's `FrameHeader`: unmasking, fragmentation,
//! UTF-8, control frames, the close handshake. It never touches the socket: it reads from
//! the slice the loop just read into its one shared scratch buffer, and what it writes
//! (pongs, close frames) lands in the connection's `OutQueue`, behind any broadcast frames
//! already there. An idle connection holds 16 bytes here and nothing on the heap: input
//! that stops mid-frame, or a fragmented message, lives in a `Pending` allocated for it
//! and freed as soon as the frame or message completes, so one large frame never leaves
//! a large buffer behind (tungstenite's read buffer only grows). Outgoing data frames are
//! encoded here once and shared as `Bytes`.
//!
//! With permessage-deflate negotiated (RFC 7692), RSV1 on a message's first frame means
//! its payload is compressed: the joined payload is inflated by the process's one
//! `Inflater`, under `--max-message-size`, before the message is handed on. The one byte
//! that says so, the connection's `Window`, fits in what was padding: 16 bytes still.

use std::io::Cursor;
use std::ops::Range;

use bytes::Bytes;
use tungstenite::Message;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};

use crate::close::CloseReason;
use crate::handover;
use crate::outq::OutQueue;
use crate::ws::deflate::{Deflater, InflateError, Inflater, SHARED_WINDOW, Window};

/// An unmasked server ping with no payload (RFC 6455 §5.5.2).
const PING: &[u8] = &[0x89, 0x00];
/// The longest payload a control frame may carry (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// What reading produced.
#[derive(Debug)]
pub enum WsEvent {
    /// A whole text or binary message (fragments already joined).
    Message(Message),
    /// The input is used up; a partial frame, if any, waits in the codec.
    NeedMore,
    /// The close handshake is complete: flush the queue and close the TCP stream.
    Closed,
    /// The peer broke the protocol; close with this reason.
    Fail(CloseReason),
}

/// One WebSocket's protocol state.
#[derive(Debug)]
pub struct Ws {
    pending: Option<Box<Pending>>,
    /// The largest message (and so frame) accepted, in bytes.
    max_message_size: u32,
    /// Our close frame is queued.
    close_sent: bool,
    /// The peer's close frame arrived: the handshake is over, nothing more is read.
    close_received: bool,
    /// permessage-deflate was negotiated: the window our compressed frames may use.
    deflate: Option<Window>,
}

/// What a connection holds between reads, only while it holds anything.
#[derive(Debug, Default)]
struct Pending {
    /// Input that does not make a whole frame yet, from `at` on.
    input: Vec<u8>,
    at: usize,
    /// A fragmented message in progress, unmasked: its first frame's kind, its payload so
    /// far, and (text) how much of it is known to be valid UTF-8.
    message: Option<Fragments>,
}

#[derive(Debug)]
struct Fragments {
    text: bool,
    /// RSV1 was set on its first frame: the payload is deflated, and its UTF-8 can only
    /// be checked once inflated.
    compressed: bool,
    payload: Vec<u8>,
    valid_utf8: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.at == self.input.len() && self.message.is_none()
    }
}

/// One frame found at the start of a buffer.
struct Frame {
    header: FrameHeader,
    /// Where its payload lies in the buffer; the frame ends where the payload does.
    payload: Range<usize>,
}

impl Ws {
    /// Bytes that arrived behind the HTTP request head are frames: the caller passes them
    /// to `read` like any later input. `deflate`: the window the handshake agreed on, if
    /// it agreed on permessage-deflate.
    pub fn new(max_message_size: usize, deflate: Option<Window>) -> Ws {
        Ws {
            pending: None,
            max_message_size: u32::try_from(max_message_size).unwrap_or(u32::MAX),
            close_sent: false,
            close_received: false,
            deflate,
        }
    }

    /// Its whole state, for a live upgrade (`handover.rs`).
    pub fn export(&self) -> handover::Ws {
        let (input, message) = match &self.pending {
            Some(p) => (
                p.input[p.at..].to_vec(),
                p.message.as_ref().map(|m| handover::Fragments {
                    text: m.text,
                    compressed: m.compressed,
                    payload: m.payload.clone(),
                    valid_utf8: m.valid_utf8,
                }),
            ),
            None => (Vec::new(), None),
        };
        handover::Ws {
            input,
            message,
            max_message_size: self.max_message_size,
            close_sent: self.close_sent,
            close_received: self.close_received,
            deflate: self.deflate.map(Window::bits),
        }
    }

    /// The codec an old binary exported; `None` for a state this one could not have
    /// been in (a window zlib cannot make, fragments past the size limit).
    pub fn import(w: handover::Ws) -> Option<Ws> {
        let deflate = match w.deflate {
            Some(bits) => Some(Window::new(bits)?),
            None => None,
        };
        let message = match w.message {
            Some(m) if m.payload.len() > w.max_message_size as usize => return None,
            Some(m) if m.valid_utf8 > m.payload.len() => return None,
            Some(m) => Some(Fragments {
                text: m.text,
                compressed: m.compressed,
                payload: m.payload,
                valid_utf8: m.valid_utf8,
            }),
            None => None,
        };
        let pending = (!w.input.is_empty() || message.is_some()).then(|| {
            Box::new(Pending {
                input: w.input,
                at: 0,
                message,
            })
        });
        Some(Ws {
            pending,
            max_message_size: w.max_message_size,
            close_sent: w.close_sent,
            close_received: w.close_received,
            deflate,
        })
    }

    /// Whether permessage-deflate was negotiated.
    pub fn deflates(&self) -> bool {
        self.deflate.is_some()
    }

    /// Whether this peer takes the frames compressed once for every subscriber (it
    /// negotiated permessage-deflate with the shared frames' window).
    pub fn takes_shared_deflate(&self) -> bool {
        self.deflate == Some(SHARED_WINDOW)
    }

    /// A data frame for this peer alone (an echo): compressed with its window when it
    /// negotiated permessage-deflate and the message is worth it, else plain.
    pub fn frame(&self, text: bool, payload: &[u8], deflater: &mut Deflater) -> Bytes {
        let kind = if text { Data::Text } else { Data::Binary };
        match self.deflate.and_then(|w| deflater.compress(payload, w)) {
            Some(compressed) => encode(kind, true, &compressed),
            None => encode(kind, false, payload),
        }
    }

    /// Take the next event from `input`, advancing it. Call until `NeedMore`: two frames
    /// in one segment arrive as one readiness event. Compressed messages are inflated
    /// with `inflater`.
    pub fn read(
        &mut self,
        input: &mut &[u8],
        out: &mut OutQueue,
        inflater: &mut Inflater,
    ) -> WsEvent {
        // A loop, not recursion: a peer may send thousands of control frames in a row.
        loop {
            if self.close_received {
                *input = &[];
                return WsEvent::Closed;
            }
            let step = match self.pending.as_mut() {
                // Input left over from an earlier read: the new bytes join it.
                Some(p) if p.at < p.input.len() => {
                    p.input.extend_from_slice(input);
                    *input = &[];
                    let mut buffer = std::mem::take(&mut p.input);
                    let at = p.at;
                    let step = self.step(&buffer[at..], out, inflater);
                    let p = self.pending.get_or_insert_default();
                    match step {
                        Step::Used(n, _) => {
                            p.at = at + n;
                            if p.at < buffer.len() {
                                p.input = buffer;
                            } else {
                                // The buffer is all used: drop it rather than keep its size.
                                p.at = 0;
                            }
                        }
                        Step::Incomplete(need) => {
                            buffer.drain(..at);
                            buffer.reserve_exact(need.saturating_sub(buffer.len()));
                            p.input = buffer;
                            p.at = 0;
                        }
                        Step::Fail(_) => {}
                    }
                    step
                }
                _ => {
                    let step = self.step(input, out, inflater);
                    match step {
                        Step::Used(n, _) => *input = &input[n..],
                        Step::Incomplete(need) => {
                            if !input.is_empty() {
                                let p = self.pending.get_or_insert_default();
                                p.input = Vec::with_capacity(need.max(input.len()));
                                p.input.extend_from_slice(input);
                                p.at = 0;
                            }
                            *input = &[];
                        }
                        Step::Fail(_) => {}
                    }
                    step
                }
            };
            if self.pending.as_ref().is_some_and(|p| p.is_empty()) {
                self.pending = None;
            }
            match step {
                Step::Used(_, None) => continue,
                Step::Used(_, Some(event)) => return event,
                Step::Incomplete(_) => return WsEvent::NeedMore,
                Step::Fail(reason) => return WsEvent::Fail(reason),
            }
        }
    }

    /// Act on the frame at the start of `buf`, if it is all there.
    fn step(&mut self, buf: &[u8], out: &mut OutQueue, inflater: &mut Inflater) -> Step {
        let frame = match self.parse(buf) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                return Step::Incomplete(match self.parse_header(buf) {
                    Ok(Some((hlen, len))) => hlen + len as usize,
                    _ => 0,
                });
            }
            Err(reason) => return Step::Fail(reason),
        };
        let end = frame.payload.end;
        match self.on_frame(frame, buf, out, inflater) {
            Ok(event) => Step::Used(end, event),
            Err(reason) => Step::Fail(reason),
        }
    }

    /// The header's length and the payload's, once the header is all there; an error for
    /// a header that breaks the rules whatever follows it.
    fn parse_header(&self, buf: &[u8]) -> Result<Option<(usize, u64)>, CloseReason> {
        let mut cursor = Cursor::new(buf);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(None),
            // A reserved opcode.
            Err(_) => return Err(CloseReason::Protocol),
        };
        // RFC 7692 §6.1: RSV1 marks a compressed message, on its first frame only, and
        // only where the extension was negotiated; control frames and continuations
        // never carry it. RSV2 and RSV3 mean nothing to us.
        let rsv1_allowed = self.deflate.is_some()
            && matches!(header.opcode, OpCode::Data(Data::Text | Data::Binary));
        if header.mask.is_none() || (header.rsv1 && !rsv1_allowed) || header.rsv2 || header.rsv3 {
            return Err(CloseReason::Protocol);
        }
        match header.opcode {
            OpCode::Control(_) if !header.is_final || len > MAX_CONTROL_PAYLOAD => {
                return Err(CloseReason::Protocol);
            }
            OpCode::Data(_) if len > u64::from(self.max_message_size) => {
                return Err(CloseReason::TooBig);
            }
            _ => {}
        }
        Ok(Some((cursor.position() as usize, len)))
    }

    fn parse(&self, buf: &[u8]) -> Result<Option<Frame>, CloseReason> {
        let Some((hlen, len)) = self.parse_header(buf)? else {
            return Ok(None);
        };
        // `len` is at most max_message_size (or 125) here, so it fits a usize.
        let end = hlen + len as usize;
        if buf.len() < end {
            return Ok(None);
        }
        let mut cursor = Cursor::new(buf);
        let Ok(Some((header, _))) = FrameHeader::parse(&mut cursor) else {
            return Err(CloseReason::Internal);
        };
        Ok(Some(Frame {
            header,
            payload: hlen..end,
        }))
    }

    fn on_frame(
        &mut self,
        frame: Frame,
        buf: &[u8],
        out: &mut OutQueue,
        inflater: &mut Inflater,
    ) -> Result<Option<WsEvent>, CloseReason> {
        let Frame { header, payload } = frame;
        let mask = header.mask.unwrap_or_default();
        let payload = &buf[payload];
        match header.opcode {
            OpCode::Control(Control::Ping) => {
                if !self.close_sent {
                    let mut pong = Vec::with_capacity(2 + payload.len());
                    pong.extend_from_slice(&[0x8a, payload.len() as u8]);
                    pong.extend(unmasked(payload, mask));
                    out.push(Bytes::from(pong));
                }
                Ok(None)
            }
            // Any byte proves life, which the caller noted when the bytes arrived.
            OpCode::Control(Control::Pong) => Ok(None),
            OpCode::Control(Control::Close) => {
                let payload: Vec<u8> = unmasked(payload, mask).collect();
                self.on_close(&payload, out)
            }
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(CloseReason::Protocol)
            }
            OpCode::Data(Data::Continue) => {
                let max = self.max_message_size as usize;
                let pending = self.pending.get_or_insert_default();
                let Some(message) = pending.message.as_mut() else {
                    return Err(CloseReason::Protocol);
                };
                if message.payload.len() + payload.len() > max {
                    return Err(CloseReason::TooBig);
                }
                message.payload.extend(unmasked(payload, mask));
                if message.text && !message.compressed {
                    message.valid_utf8 = check_utf8(&message.payload, message.valid_utf8)?;
                }
                if !header.is_final {
                    return Ok(None);
                }
                let Some(message) = pending.message.take() else {
                    return Err(CloseReason::Internal);
                };
                let payload = match message.compressed {
                    true => inflate(inflater, &message.payload, max)?,
                    false => message.payload,
                };
                complete(message.text, payload).map(Some)
            }
            OpCode::Data(kind @ (Data::Text | Data::Binary)) => {
                if self.pending.as_ref().is_some_and(|p| p.message.is_some()) {
                    return Err(CloseReason::Protocol);
                }
                let text = kind == Data::Text;
                let compressed = header.rsv1;
                let bytes: Vec<u8> = unmasked(payload, mask).collect();
                if header.is_final {
                    let bytes = match compressed {
                        true => inflate(inflater, &bytes, self.max_message_size as usize)?,
                        false => bytes,
                    };
                    return complete(text, bytes).map(Some);
                }
                let valid_utf8 = match text && !compressed {
                    true => check_utf8(&bytes, 0)?,
                    false => 0,
                };
                self.pending.get_or_insert_default().message = Some(Fragments {
                    text,
                    compressed,
                    payload: bytes,
                    valid_utf8,
                });
                Ok(None)
            }
        }
    }

    /// The peer's close frame: check it, answer it (echoing its code) unless ours went
    /// first, and end the handshake.
    fn on_close(
        &mut self,
        payload: &[u8],
        out: &mut OutQueue,
    ) -> Result<Option<WsEvent>, CloseReason> {
        let code = match payload {
            [] => None,
            [_] => return Err(CloseReason::Protocol),
            [hi, lo, reason @ ..] => {
                let code = u16::from_be_bytes([*hi, *lo]);
                if !CloseCode::from(code).is_allowed() {
                    return Err(CloseReason::Protocol);
                }
                if std::str::from_utf8(reason).is_err() {
                    return Err(CloseReason::InvalidUtf8);
                }
                Some(code)
            }
        };
        if !self.close_sent {
            self.close_sent = true;
            out.push(match code {
                Some(code) => {
                    let [hi, lo] = code.to_be_bytes();
                    Bytes::from(vec![0x88, 0x02, hi, lo])
                }
                None => Bytes::from_static(&[0x88, 0x00]),
            });
        }
        self.close_received = true;
        self.pending = None;
        Ok(Some(WsEvent::Closed))
    }

    /// Queue our close frame, once. Later reads still accept the peer's reply.
    pub fn close(&mut self, reason: CloseReason, out: &mut OutQueue) {
        if self.close_sent || self.close_received {
            return;
        }
        self.close_sent = true;
        let text = reason.text().as_bytes();
        let code: u16 = reason.code().into();
        let mut frame = Vec::with_capacity(4 + text.len());
        frame.extend_from_slice(&[0x88, 2 + text.len() as u8]);
        frame.extend_from_slice(&code.to_be_bytes());
        frame.extend_from_slice(text);
        out.push(Bytes::from(frame));
    }
}

/// How one step through the input went.
enum Step {
    /// A whole frame of this many bytes, and what it produced (if anything yet).
    Used(usize, Option<WsEvent>),
    /// The frame is not all there; its whole length, when the header says it already.
    Incomplete(usize),
    Fail(CloseReason),
}

/// A client payload with its mask undone.
fn unmasked(payload: &[u8], mask: [u8; 4]) -> impl Iterator<Item = u8> + '_ {
    payload
        .iter()
        .enumerate()
        .map(move |(i, b)| b ^ mask[i & 3])
}

/// How far `bytes` is valid UTF-8, checking from `from` (a char boundary): an error for a
/// sequence no continuation can mend, but not for one cut short at the end, which the
/// next fragment may complete.
fn check_utf8(bytes: &[u8], from: usize) -> Result<usize, CloseReason> {
    match std::str::from_utf8(&bytes[from..]) {
        Ok(_) => Ok(bytes.len()),
        Err(e) if e.error_len().is_none() => Ok(from + e.valid_up_to()),
        Err(_) => Err(CloseReason::InvalidUtf8),
    }
}

/// A compressed message's payload, inflated: a message that inflates past the limit is
/// as too big as one that arrived that size (1009), however small it came.
fn inflate(inflater: &mut Inflater, compressed: &[u8], max: usize) -> Result<Vec<u8>, CloseReason> {
    inflater.inflate(compressed, max).map_err(|e| match e {
        InflateError::TooBig => CloseReason::TooBig,
        InflateError::Corrupt => CloseReason::BadCompression,
    })
}

/// A whole message, as the session takes it.
fn complete(text: bool, payload: Vec<u8>) -> Result<WsEvent, CloseReason> {
    if text {
        let text = String::from_utf8(payload).map_err(|_| CloseReason::InvalidUtf8)?;
        Ok(WsEvent::Message(Message::text(text)))
    } else {
        Ok(WsEvent::Message(Message::binary(payload)))
    }
}

/// Queue a ping frame (shared static bytes, no allocation).
pub fn queue_ping(out: &mut OutQueue) {
    out.push(Bytes::from_static(PING));
}

pub fn text_frame(payload: &[u8]) -> Bytes {
    encode(Data::Text, false, payload)
}

/// The compressed twin of a frame `text_frame` made (a published message), for every
/// subscriber that takes the shared deflate window; `None` when the message is better
/// sent as it is (small, or no smaller compressed).
pub fn shared_deflate_frame(plain: &[u8], deflater: &mut Deflater) -> Option<Bytes> {
    // Our own server frames: unmasked, the length in 7, 7 + 16 or 7 + 64 bits.
    let header_len = match plain.get(1)? & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let kind = match plain.first()? & 0x0f {
        0x1 => Data::Text,
        0x2 => Data::Binary,
        _ => return None,
    };
    let compressed = deflater.compress(plain.get(header_len..)?, SHARED_WINDOW)?;
    Some(encode(kind, true, &compressed))
}

/// Encode one final, unmasked server frame: header and payload in one allocation. `rsv1`:
/// the payload is deflated (RFC 7692 §6).
fn encode(kind: Data, rsv1: bool, payload: &[u8]) -> Bytes {
    let header = FrameHeader {
        is_final: true,
        rsv1,
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
            match ws.read(&mut input, out, &mut Inflater::default()) {
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
            let mut ws = Ws::new(1024, None);
            let mut out = OutQueue::default();
            let mut events = drain(&mut ws, &bytes[..split], &mut out);
            events.extend(drain(&mut ws, &bytes[split..], &mut out));
            let texts: Vec<&str> = events.iter().map(text).collect();
            assert_eq!(texts, ["hello", "world"], "split at {split}");
        }
    }

    /// Live upgrade: a codec exported at any byte of a fragmented message (with a
    /// partial frame) and imported into a new one reads on as if nothing happened.
    #[test]
    fn an_exported_codec_resumes_mid_frame_and_mid_message() {
        let mut bytes = client_frame(0x01, "héllo, ".as_bytes());
        bytes.extend(client_frame(0x00, b"wor"));
        bytes.extend(client_frame(0x80, b"ld"));
        for split in 0..bytes.len() {
            let mut ws = Ws::new(1024, Window::new(12));
            let mut out = OutQueue::default();
            let mut events = drain(&mut ws, &bytes[..split], &mut out);
            let state = ws.export();
            let mut again = Ws::import(state.clone()).expect("a state it exported");
            assert_eq!(again.export(), state);
            events.extend(drain(&mut again, &bytes[split..], &mut out));
            assert_eq!(
                events.iter().map(text).collect::<Vec<_>>(),
                ["héllo, world"]
            );
        }
        // What no binary could have exported is refused, not trusted.
        let bad = handover::Ws {
            deflate: Some(3),
            ..handover::Ws::default()
        };
        assert!(Ws::import(bad).is_none());
    }

    #[test]
    fn fragments_with_a_ping_between_are_joined_and_the_ping_answered() {
        let mut bytes = client_frame(0x01, b"hel");
        bytes.extend(client_frame(0x89, b"p"));
        bytes.extend(client_frame(0x80, b"lo"));
        let mut ws = Ws::new(1024, None);
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
        let mut ws = Ws::new(1024, None);
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
            let mut ws = Ws::new(1024, None);
            let events = drain(&mut ws, &bytes, &mut OutQueue::default());
            assert!(
                matches!(events.last(), Some(WsEvent::Fail(r)) if *r == want),
                "{bytes:x?}: {events:?}"
            );
        }
        let mut ws = Ws::new(10, None);
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

    fn wire(out: &mut OutQueue) -> Vec<u8> {
        let mut wire = Vec::new();
        out.write_to(&mut wire, usize::MAX, &mut 0).unwrap();
        wire
    }

    fn fails_with(bytes: &[u8], max: usize) -> Option<CloseReason> {
        let mut ws = Ws::new(max, None);
        match drain(&mut ws, bytes, &mut OutQueue::default()).last() {
            Some(WsEvent::Fail(r)) => Some(*r),
            _ => None,
        }
    }

    #[test]
    fn close_codes_are_echoed_when_allowed_and_refused_when_not() {
        for code in [
            1000u16, 1001, 1003, 1007, 1011, 1012, 3000, 3999, 4000, 4999,
        ] {
            let mut ws = Ws::new(1024, None);
            let mut out = OutQueue::default();
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(b"bye");
            let events = drain(&mut ws, &client_frame(0x88, &payload), &mut out);
            assert!(matches!(events.as_slice(), [WsEvent::Closed]), "{code}");
            let [hi, lo] = code.to_be_bytes();
            assert_eq!(wire(&mut out), [0x88, 0x02, hi, lo], "{code}");
        }
        for code in [
            0u16, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2999, 5000, 65535,
        ] {
            let frame = client_frame(0x88, &code.to_be_bytes());
            assert_eq!(
                fails_with(&frame, 1024),
                Some(CloseReason::Protocol),
                "{code}"
            );
        }
        // A one-byte payload cannot hold a code; the reason must be UTF-8.
        assert_eq!(
            fails_with(&client_frame(0x88, &[0x03]), 1024),
            Some(CloseReason::Protocol)
        );
        let bad_reason = client_frame(0x88, &[0x03, 0xe8, 0xff]);
        assert_eq!(
            fails_with(&bad_reason, 1024),
            Some(CloseReason::InvalidUtf8)
        );
        // An empty close is answered with an empty close.
        let mut ws = Ws::new(1024, None);
        let mut out = OutQueue::default();
        drain(&mut ws, &client_frame(0x88, b""), &mut out);
        assert_eq!(wire(&mut out), [0x88, 0x00]);
    }

    #[test]
    fn after_the_peers_close_nothing_more_is_read() {
        let mut bytes = client_frame(0x88, &[0x03, 0xe8]);
        bytes.extend(client_frame(0x81, b"late"));
        bytes.extend(client_frame(0x89, b"p"));
        let mut ws = Ws::new(1024, None);
        let mut out = OutQueue::default();
        let events = drain(&mut ws, &bytes, &mut out);
        assert!(matches!(events.as_slice(), [WsEvent::Closed]), "{events:?}");
        assert_eq!(wire(&mut out), [0x88, 0x02, 0x03, 0xe8]);
        let mut input: &[u8] = &client_frame(0x81, b"more");
        assert!(matches!(
            ws.read(&mut input, &mut out, &mut Inflater::default()),
            WsEvent::Closed
        ));
    }

    #[test]
    fn after_our_close_pings_are_not_answered_and_the_peers_close_ends_it() {
        let mut ws = Ws::new(1024, None);
        let mut out = OutQueue::default();
        ws.close(CloseReason::GoingAway, &mut out);
        wire(&mut out);
        let mut bytes = client_frame(0x89, b"p");
        bytes.extend(client_frame(0x81, b"crossing"));
        bytes.extend(client_frame(0x88, &[0x03, 0xe9]));
        let events = drain(&mut ws, &bytes, &mut out);
        // The text crossed our close; the session drops it. No pong, no second close.
        assert_eq!(text(&events[0]), "crossing");
        assert!(matches!(events[1], WsEvent::Closed));
        assert!(wire(&mut out).is_empty());
    }

    #[test]
    fn fragmentation_rules() {
        // A continuation with nothing to continue; a new message inside a fragmented one.
        assert_eq!(
            fails_with(&client_frame(0x80, b"x"), 1024),
            Some(CloseReason::Protocol)
        );
        let mut nested = client_frame(0x01, b"a");
        nested.extend(client_frame(0x81, b"b"));
        assert_eq!(fails_with(&nested, 1024), Some(CloseReason::Protocol));
        // Control frames: never fragmented, at most 125 bytes, allowed between fragments.
        assert_eq!(
            fails_with(&client_frame(0x0a, b""), 1024),
            Some(CloseReason::Protocol)
        );
        let long_ping = client_frame(0x89, &[0; 126]);
        assert_eq!(fails_with(&long_ping, 1024), Some(CloseReason::Protocol));
        let mut bytes = client_frame(0x02, &[1, 2]);
        bytes.extend(client_frame(0x8a, b"pong"));
        bytes.extend(client_frame(0x00, &[3]));
        bytes.extend(client_frame(0x89, b""));
        bytes.extend(client_frame(0x80, &[4]));
        let mut ws = Ws::new(1024, None);
        let mut out = OutQueue::default();
        let events = drain(&mut ws, &bytes, &mut out);
        assert!(
            matches!(events.as_slice(), [WsEvent::Message(Message::Binary(b))] if b[..] == [1, 2, 3, 4]),
            "{events:?}"
        );
        assert_eq!(wire(&mut out), [0x8a, 0x00]);
        // Empty fragments are fine; the limit counts the joined message.
        let mut bytes = client_frame(0x01, b"");
        bytes.extend(client_frame(0x00, b""));
        bytes.extend(client_frame(0x80, b"ok"));
        let events = drain(&mut Ws::new(1024, None), &bytes, &mut OutQueue::default());
        assert_eq!(text(&events[0]), "ok");
        let mut big = client_frame(0x01, &[b'a'; 8]);
        big.extend(client_frame(0x80, &[b'a'; 8]));
        assert_eq!(fails_with(&big, 15), Some(CloseReason::TooBig));
        assert_eq!(fails_with(&big, 16), None);
    }

    #[test]
    fn utf8_may_split_across_fragments_and_fails_as_soon_as_it_cannot_be_mended() {
        let word = "κόσμε".as_bytes();
        for split in 0..=word.len() {
            let mut bytes = client_frame(0x01, &word[..split]);
            bytes.extend(client_frame(0x80, &word[split..]));
            let events = drain(&mut Ws::new(1024, None), &bytes, &mut OutQueue::default());
            assert_eq!(text(&events[0]), "κόσμε", "split at {split}");
        }
        // An impossible byte fails on its fragment, before the message is final.
        let first = client_frame(0x01, &[b'a', 0xc0, 0xaf]);
        assert_eq!(fails_with(&first, 1024), Some(CloseReason::InvalidUtf8));
        // A sequence cut short at the end of the message fails at the end.
        let mut bytes = client_frame(0x01, b"a");
        bytes.extend(client_frame(0x80, &[0xce]));
        assert_eq!(fails_with(&bytes, 1024), Some(CloseReason::InvalidUtf8));
    }

    #[test]
    fn a_large_frame_leaves_no_buffer_behind() {
        let payload = vec![b'z'; 60_000];
        let bytes = client_frame(0x81, &payload);
        let mut ws = Ws::new(1 << 20, None);
        let mut out = OutQueue::default();
        let mut events = Vec::new();
        for chunk in bytes.chunks(1000) {
            events.extend(drain(&mut ws, chunk, &mut out));
        }
        assert_eq!(text(&events[0]).len(), 60_000);
        assert!(ws.pending.is_none(), "nothing held once the frame is read");
        // Mid-frame, the pending input holds just what the frame needs.
        drain(&mut ws, &bytes[..30_000], &mut out);
        let held = ws.pending.as_ref().map(|p| p.input.capacity());
        assert!(held.is_some_and(|c| c <= bytes.len()), "{held:?}");
        drain(&mut ws, &bytes[30_000..], &mut out);
        assert!(ws.pending.is_none());
        assert_eq!(std::mem::size_of::<Ws>(), 16);
    }

    /// `payload` deflated as a client does (fresh stream, sync flush, tail removed).
    fn deflated(payload: &[u8]) -> Vec<u8> {
        let mut c =
            flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 15);
        let mut out = Vec::with_capacity(payload.len() + 64);
        c.compress_vec(payload, &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        out.truncate(out.len() - 4);
        out
    }

    fn deflate_ws(max: usize) -> Ws {
        Ws::new(max, Some(SHARED_WINDOW))
    }

    #[test]
    fn rsv1_marks_a_compressed_message_on_its_first_frame_only() {
        let hello = deflated("κόσμε, κόσμε, κόσμε".as_bytes());
        // Whole, and split over fragments anywhere: RSV1 on the first frame only.
        let events = drain(
            &mut deflate_ws(1024),
            &client_frame(0xc1, &hello),
            &mut OutQueue::default(),
        );
        assert_eq!(text(&events[0]), "κόσμε, κόσμε, κόσμε");
        for split in 0..=hello.len() {
            let mut bytes = client_frame(0x41, &hello[..split]);
            bytes.extend(client_frame(0x89, b"ping between"));
            bytes.extend(client_frame(0x80, &hello[split..]));
            let mut out = OutQueue::default();
            let events = drain(&mut deflate_ws(1024), &bytes, &mut out);
            assert_eq!(text(&events[0]), "κόσμε, κόσμε, κόσμε", "split at {split}");
        }
        // Binary too; and an uncompressed message on the same connection is plain.
        let mut bytes = client_frame(0xc2, &deflated(&[7; 300]));
        bytes.extend(client_frame(0x82, b"as is"));
        let events = drain(&mut deflate_ws(1024), &bytes, &mut OutQueue::default());
        assert!(matches!(&events[0], WsEvent::Message(Message::Binary(b)) if b[..] == [7; 300]));
        assert!(matches!(&events[1], WsEvent::Message(Message::Binary(b)) if b[..] == *b"as is"));
    }

    #[test]
    fn rsv1_where_it_does_not_belong_is_a_protocol_error() {
        let fails =
            |bytes: &[u8]| match drain(&mut deflate_ws(1024), bytes, &mut OutQueue::default())
                .last()
            {
                Some(WsEvent::Fail(r)) => Some(*r),
                _ => None,
            };
        // On a continuation, on control frames, and RSV2/RSV3 anyway.
        let mut continued = client_frame(0x41, &deflated(b"abc")[..1]);
        continued.extend(client_frame(0xc0, &deflated(b"abc")[1..]));
        assert_eq!(fails(&continued), Some(CloseReason::Protocol));
        assert_eq!(fails(&client_frame(0xc9, b"")), Some(CloseReason::Protocol));
        assert_eq!(fails(&client_frame(0xca, b"")), Some(CloseReason::Protocol));
        assert_eq!(
            fails(&client_frame(0xc8, &[0x03, 0xe8])),
            Some(CloseReason::Protocol)
        );
        assert_eq!(
            fails(&client_frame(0xa1, b"x")),
            Some(CloseReason::Protocol)
        );
        // Not negotiated: RSV1 is a protocol error even on a data frame.
        assert_eq!(
            fails_with(&client_frame(0xc1, &deflated(b"x")), 1024),
            Some(CloseReason::Protocol)
        );
        // Inflated, the text must still be UTF-8; the inflated size is what counts.
        assert_eq!(
            fails(&client_frame(0xc1, &deflated(&[0xff, 0xfe]))),
            Some(CloseReason::InvalidUtf8)
        );
        let wide = deflated(&[b'a'; 2000]);
        assert!(wide.len() < 100);
        let too_big = drain(
            &mut deflate_ws(1999),
            &client_frame(0xc1, &wide),
            &mut OutQueue::default(),
        );
        assert!(matches!(
            too_big.last(),
            Some(WsEvent::Fail(CloseReason::TooBig))
        ));
        assert_eq!(
            fails(&client_frame(0xc1, b"\xff\xff")),
            Some(CloseReason::BadCompression)
        );
        // Still 16 bytes with the extension's byte.
        assert_eq!(std::mem::size_of::<Ws>(), 16);
    }

    #[test]
    fn frames_to_a_deflate_peer_are_compressed_when_worth_it() {
        let mut deflater = Deflater::new(256);
        let text = "the same words again and again, ".repeat(20);
        let frame = deflate_ws(1024).frame(true, text.as_bytes(), &mut deflater);
        assert_eq!(frame[0], 0xc1, "FIN, RSV1, text");
        let plain = Ws::new(1024, None).frame(true, text.as_bytes(), &mut deflater);
        assert_eq!(plain, text_frame(text.as_bytes()));
        let small = deflate_ws(1024).frame(false, b"small", &mut deflater);
        assert_eq!(small[..2], [0x82, 5]);
        // The shared twin of a published frame is the same compression.
        let shared = shared_deflate_frame(&text_frame(text.as_bytes()), &mut deflater).unwrap();
        assert_eq!(shared, frame);
        assert_eq!(
            shared_deflate_frame(&text_frame(b"small"), &mut deflater),
            None
        );
    }

    #[test]
    fn our_close_is_queued_once() {
        let mut ws = Ws::new(1024, None);
        let mut out = OutQueue::default();
        ws.close(CloseReason::GoingAway, &mut out);
        ws.close(CloseReason::GoingAway, &mut out);
        let mut wire = Vec::new();
        out.write_to(&mut wire, usize::MAX, &mut 0).unwrap();
        assert_eq!(&wire[..4], [0x88, 2 + 20, 0x03, 0xe9]);
        assert_eq!(wire.len(), 4 + 20);
    }
}
