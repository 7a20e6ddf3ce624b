//! permessage-deflate (RFC 7692), without per-connection state: the offer a client makes
//! in `Sec-WebSocket-Extensions` and our answer to it, a compressor that makes each
//! message a fresh raw deflate stream, and the one inflater every connection's compressed
//! messages go through, under a cap on the inflated size.
//!
//! Our answer always carries `server_no_context_takeover` and `client_no_context_takeover`
//! (§7.1.1): no LZ77 window is kept between messages in either direction, so a published
//! message is compressed once, into one frame every subscriber that negotiated the
//! extension gets, and an idle connection holds no zlib state at all. What a connection
//! keeps is one byte, its `Window`. The codec (`codec.rs`) frames and unframes; this file
//! only deflates and inflates. No sockets, no clock.

use std::num::NonZeroU8;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
const NAME: &str = "permessage-deflate";
/// The LZ77 window of every frame compressed once for many subscribers: zlib's largest,
/// the default of every client (RFC 7692 §7.1.2.1).
pub const SHARED_WINDOW: Window = Window::MAX;
/// zlib's default level. For a 1 KiB JSON message (bench/payloads/quotes-1k.json), with
/// zlib-rs: level 1 takes 4 µs and leaves 650 bytes of 1,079, level 6 12 µs for 521,
/// level 9 14 µs for 517. The message is compressed once however many receive it, so the
/// bytes saved on every delivery are worth the 8 µs.
const LEVEL: u32 = 6;
/// What an inflater appends to a message before inflating it, and a compressor's sync
/// flush leaves at its end, to be removed (§7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// The first output buffer of an inflate, before it doubles (up to the cap).
const INFLATE_START: usize = 4096;

/// The LZ77 window, in bits, our compressed frames to one connection use: what the
/// client allowed with `server_max_window_bits`, 15 without it. zlib's raw deflate goes
/// no lower than 9 bits, so an offer of 8 is declined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window(NonZeroU8);

impl Window {
    pub const MIN_BITS: u8 = 9;
    pub const MAX_BITS: u8 = 15;
    pub const MAX: Window = Window(NonZeroU8::new(Window::MAX_BITS).unwrap());

    /// `bits` if zlib can compress with that window (9 to 15).
    pub fn new(bits: u8) -> Option<Window> {
        (Window::MIN_BITS..=Window::MAX_BITS)
            .contains(&bits)
            .then(|| NonZeroU8::new(bits).map(Window))
            .flatten()
    }

    pub fn bits(self) -> u8 {
        self.0.get()
    }
}

/// An accepted offer: the window our frames to this client use, and the header value
/// that says so in the 101.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    pub window: Window,
    pub response: String,
}

/// Read a client's `Sec-WebSocket-Extensions` (all its values joined with commas) and
/// accept the first `permessage-deflate` offer we can honour, RFC 7692 §5 and §7.1:
/// several offers may come in order of preference, and an offer we cannot honour, or one
/// with an unknown, repeated or malformed parameter, is declined, not answered in part.
/// `window_ok` says which server windows this endpoint can compress with. `None`: no
/// offer accepted, and the 101 names no extension.
pub fn negotiate(header: &str, window_ok: impl Fn(Window) -> bool) -> Option<Agreement> {
    split_outside_quotes(header, ',')
        .filter_map(|element| parse_offer(element, &window_ok))
        .next()
}

/// One offer of the list: `permessage-deflate; param; param=value`, if it is ours and
/// acceptable.
fn parse_offer(element: &str, window_ok: &impl Fn(Window) -> bool) -> Option<Agreement> {
    let mut parts = split_outside_quotes(element, ';');
    if !parts.next()?.trim().eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut server_max_window_bits: Option<u8> = None;
    let mut seen = [false; 4];
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(param_value(v.trim())?)),
            None => (param.trim(), None),
        };
        // §7.1: each parameter at most once, each with the value its definition allows.
        let index = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            "server_max_window_bits" => {
                server_max_window_bits = Some(window_bits(value.as_deref()?)?);
                2
            }
            "client_max_window_bits" => {
                // With a value, the client will use no more than that; our inflater's
                // 15 bits read any window, so the value only has to be well formed.
                if let Some(v) = value.as_deref() {
                    window_bits(v)?;
                }
                3
            }
            _ => return None,
        };
        if std::mem::replace(&mut seen[index], true) {
            return None;
        }
    }
    // §7.1.2.1: the server compresses with at most the window the client asked for; we
    // use exactly that, or decline when we cannot (8 bits, or a window this endpoint does
    // not compress with).
    let window = match server_max_window_bits {
        Some(bits) => Window::new(bits)?,
        None => SHARED_WINDOW,
    };
    if !window_ok(window) {
        return None;
    }
    let mut response = format!("{NAME}; server_no_context_takeover; client_no_context_takeover");
    // Named only when offered: §7.1.2.1 forbids it in the answer otherwise.
    if server_max_window_bits.is_some() {
        response.push_str(&format!("; server_max_window_bits={}", window.bits()));
    }
    Some(Agreement { window, response })
}

/// §7.1.2: "a decimal integer value without leading zeroes between 8 to 15, inclusive".
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// A parameter's value: a token, or a quoted string unquoted (RFC 6455 §9.1 allows
/// both; RFC 7692 §7.1 says the unquoted text must be a token as well).
fn param_value(raw: &str) -> Option<String> {
    let value = match raw.strip_prefix('"') {
        Some(rest) => {
            let inner = rest.strip_suffix('"')?;
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.push(chars.next()?),
                    '"' => return None,
                    c => out.push(c),
                }
            }
            out
        }
        None => raw.to_string(),
    };
    let is_token = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    is_token.then_some(value)
}

/// The pieces of `text` between `sep`s that are not inside a quoted string.
fn split_outside_quotes(text: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let s = rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in s.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                c if c == sep && !quoted => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

/// Compressors, one per window in use (made on first use, reset for every message), and
/// the size below which a message is not worth compressing.
pub struct Deflater {
    min_size: usize,
    /// By window bits, 9 to 15.
    streams: [Option<Box<Compress>>; 7],
}

impl Deflater {
    /// `min_size`: `--compression-min-size`.
    pub fn new(min_size: usize) -> Deflater {
        Deflater {
            min_size,
            streams: Default::default(),
        }
    }

    /// `payload` as one fresh raw deflate stream with `window`, its sync flush's tail
    /// removed (§7.2.1): the payload of a frame with RSV1 set. `None` when the message
    /// should go as it is: smaller than the minimum, or no smaller compressed.
    pub fn compress(&mut self, payload: &[u8], window: Window) -> Option<Vec<u8>> {
        if payload.len() < self.min_size {
            return None;
        }
        let slot = &mut self.streams[usize::from(window.bits() - Window::MIN_BITS)];
        let stream = slot.get_or_insert_with(|| {
            Box::new(Compress::new_with_window_bits(
                Compression::new(LEVEL),
                false,
                window.bits(),
            ))
        });
        // No context takeover: every message starts from an empty window.
        stream.reset();
        // Enough for any payload in one call (deflate grows incompressible data by a few
        // bytes per 16 KiB block); more room is made if a call still runs out.
        let mut out = Vec::with_capacity(payload.len() + payload.len() / 1000 + 64);
        let start = stream.total_in();
        loop {
            let used = (stream.total_in() - start) as usize;
            stream
                .compress_vec(&payload[used..], &mut out, FlushCompress::Sync)
                .ok()?;
            // zlib's rule: the flush is complete when it left output space unused.
            if (stream.total_in() - start) as usize == payload.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if !out.ends_with(&TAIL) {
            return None;
        }
        out.truncate(out.len() - TAIL.len());
        (out.len() < payload.len()).then_some(out)
    }
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the cap (a compression bomb, or just too big).
    TooBig,
    /// It is not a deflate stream.
    Corrupt,
}

/// The one inflater of the process. Clients do not take context over either (we ask for
/// `client_no_context_takeover`), so each message is a stream of its own and one
/// inflater, reset per message, serves every connection. 15 bits reads every window.
#[derive(Default)]
pub struct Inflater {
    stream: Option<Box<Decompress>>,
}

impl Inflater {
    /// Inflate one message's payload (its frames' payloads joined, unmasked). The output
    /// grows by doubling from a few KiB and never past `limit` + 1 bytes: a message that
    /// would inflate further is refused as soon as it does, having cost no more memory.
    pub fn inflate(&mut self, compressed: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
        let stream = self
            .stream
            .get_or_insert_with(|| Box::new(Decompress::new_with_window_bits(false, 15)));
        stream.reset(false);
        let cap = limit.saturating_add(1);
        let mut out = Vec::with_capacity(INFLATE_START.min(cap));
        // §7.2.2: the tail the sender removed goes back on before inflating.
        for part in [compressed, &TAIL[..]] {
            let mut input = part;
            loop {
                if out.len() == out.capacity() {
                    if out.len() >= cap {
                        return Err(InflateError::TooBig);
                    }
                    out.reserve_exact(out.capacity().max(INFLATE_START).min(cap - out.len()));
                }
                let (before_in, before_out) = (stream.total_in(), out.len());
                let status = stream
                    .decompress_vec(input, &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                if out.len() > limit {
                    return Err(InflateError::TooBig);
                }
                input = &input[(stream.total_in() - before_in) as usize..];
                // A final block (BFINAL set) may end the stream before the tail.
                if status == Status::StreamEnd {
                    return Ok(out);
                }
                let room_left = out.len() < out.capacity();
                if input.is_empty() && room_left {
                    break;
                }
                if room_left && out.len() == before_out && stream.total_in() == before_in {
                    // Input left, room left, and nothing moved: not deflate.
                    return Err(InflateError::Corrupt);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(_: Window) -> bool {
        true
    }

    fn answer(header: &str) -> Option<String> {
        negotiate(header, any).map(|a| a.response)
    }

    const PLAIN: &str =
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn browsers_offers_are_accepted_without_context_takeover() {
        // Chromium (and python-websockets, Node's ws) and Firefox, exactly as sent.
        for offer in [
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate",
        ] {
            let agreed = negotiate(offer, any).unwrap();
            assert_eq!(agreed.response, PLAIN, "{offer}");
            assert_eq!(agreed.window, SHARED_WINDOW);
        }
    }

    #[test]
    fn the_first_acceptable_offer_wins_and_others_are_passed_over() {
        let offers = "x-webkit-deflate-frame, permessage-deflate; bogus_param, \
                      permessage-deflate; server_max_window_bits=10, permessage-deflate";
        let agreed = negotiate(offers, any).unwrap();
        assert_eq!(agreed.window.bits(), 10);
        assert_eq!(
            agreed.response,
            format!("{PLAIN}; server_max_window_bits=10")
        );
        // An endpoint that compresses with 15 bits only takes the next offer.
        let agreed = negotiate(offers, |w| w == SHARED_WINDOW).unwrap();
        assert_eq!(agreed.response, PLAIN);
        assert_eq!(negotiate("x-webkit-deflate-frame", any), None);
        assert_eq!(negotiate("", any), None);
    }

    #[test]
    fn window_bits_follow_rfc_7692_7_1_2() {
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits=15"),
            Some(format!("{PLAIN}; server_max_window_bits=15"))
        );
        // Quoted values are allowed; the unquoted text must still be a number.
        assert_eq!(
            answer(r#"permessage-deflate; server_max_window_bits="12""#),
            Some(format!("{PLAIN}; server_max_window_bits=12"))
        );
        // client_max_window_bits with or without a value; our inflater reads any window,
        // so the answer does not name it.
        assert_eq!(
            answer("permessage-deflate; client_max_window_bits=9"),
            Some(PLAIN.into())
        );
        // zlib cannot make 8-bit raw deflate streams: declined, whatever follows.
        assert_eq!(answer("permessage-deflate; server_max_window_bits=8"), None);
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits=8, permessage-deflate"),
            Some(PLAIN.into())
        );
        // Malformed values decline the offer.
        for bad in [
            "server_max_window_bits",
            "server_max_window_bits=",
            "server_max_window_bits=7",
            "server_max_window_bits=16",
            "server_max_window_bits=010",
            "server_max_window_bits=1a",
            "server_max_window_bits=\"\"",
            "client_max_window_bits=0",
            "client_max_window_bits=99999999999999999999",
            "server_no_context_takeover=1",
            "client_no_context_takeover=\"x\"",
            "client_max_window_bits; client_max_window_bits",
            "server_no_context_takeover; server_no_context_takeover",
            "client_max_window_bits=\"1\\",
            "mystery",
        ] {
            assert_eq!(answer(&format!("permessage-deflate; {bad}")), None, "{bad}");
        }
    }

    #[test]
    fn quoted_commas_and_semicolons_do_not_split() {
        let offers = r#"other; p="a,b;c", permessage-deflate; client_no_context_takeover"#;
        assert_eq!(answer(offers), Some(PLAIN.into()));
        let parts: Vec<&str> = split_outside_quotes(r#"a="x\",y",b"#, ',').collect();
        assert_eq!(parts, [r#"a="x\",y""#, "b"]);
    }

    fn inflate_raw(compressed: &[u8]) -> Vec<u8> {
        let mut d = Decompress::new_with_window_bits(false, 15);
        let mut input = compressed.to_vec();
        input.extend_from_slice(&TAIL);
        let mut out = Vec::with_capacity(1 << 20);
        d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        out
    }

    /// JSON-like text whose repeats lie 2.5 KiB apart: only windows of 12 bits or more
    /// reach back that far.
    fn far_repeats() -> Vec<u8> {
        let words = [
            "\"bid\":",
            "101.25,",
            "\"ask\":",
            "\"ACME\",",
            "{\"id\":",
            "true}",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut block = Vec::new();
        while block.len() < 2500 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            block.extend_from_slice(words[(seed % 6) as usize].as_bytes());
            block.extend_from_slice(format!("{}", seed % 1000).as_bytes());
        }
        block.repeat(3)
    }

    #[test]
    fn a_compressed_message_keeps_to_the_negotiated_window() {
        let json = far_repeats();
        let mut deflater = Deflater::new(256);
        let wide = deflater.compress(&json, SHARED_WINDOW).unwrap();
        for bits in Window::MIN_BITS..=Window::MAX_BITS {
            let window = Window::new(bits).unwrap();
            let compressed = deflater.compress(&json, window).unwrap();
            assert!(!compressed.ends_with(&TAIL));
            assert_eq!(inflate_raw(&compressed), json, "{bits}");
            // The window is the one asked for: below 12 bits the repeats are out of
            // reach and cost their full price; from 12 on they cost next to nothing.
            if bits < 12 {
                assert!(
                    compressed.len() > 2 * wide.len(),
                    "{bits}: {}",
                    compressed.len()
                );
            } else {
                assert!(
                    compressed.len() < wide.len() * 3 / 2,
                    "{bits}: {}",
                    compressed.len()
                );
            }
            // And the same again: nothing carried over from the last message.
            assert_eq!(deflater.compress(&json, window).unwrap(), compressed);
        }
        let mut inflater = Inflater::default();
        assert_eq!(inflater.inflate(&wide, json.len()).unwrap(), json);
    }

    #[test]
    fn small_or_incompressible_messages_are_left_alone() {
        let mut deflater = Deflater::new(256);
        assert_eq!(deflater.compress(&[b'a'; 255], SHARED_WINDOW), None);
        assert!(deflater.compress(&[b'a'; 256], SHARED_WINDOW).is_some());
        // Noise does not shrink: it goes as it is.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        assert_eq!(deflater.compress(&noise, SHARED_WINDOW), None);
        // An empty message compresses to RFC 7692's one byte (§7.2.3.6): no smaller.
        assert_eq!(Deflater::new(0).compress(b"", SHARED_WINDOW), None);
    }

    #[test]
    fn the_inflater_stops_at_the_cap_and_rejects_garbage() {
        let zeros = vec![0u8; 1 << 20];
        let mut deflater = Deflater::new(0);
        let bomb = deflater.compress(&zeros, SHARED_WINDOW).unwrap();
        assert!(bomb.len() < 2048, "{}", bomb.len());
        let mut inflater = Inflater::default();
        assert_eq!(
            inflater.inflate(&bomb, (1 << 20) - 1),
            Err(InflateError::TooBig)
        );
        // Exactly at the cap is fine, and the inflater is as good as new afterwards.
        assert_eq!(inflater.inflate(&bomb, 1 << 20).unwrap().len(), 1 << 20);
        assert_eq!(
            inflater.inflate(&[0xff, 0xff, 0xff], 1024),
            Err(InflateError::Corrupt)
        );
        let text = deflater
            .compress(b"hello hello hello", SHARED_WINDOW)
            .unwrap();
        assert_eq!(inflater.inflate(&text, 1024).unwrap(), b"hello hello hello");
        // A message the client ended with a final block (BFINAL) inflates too.
        let mut c = Compress::new_with_window_bits(Compression::new(6), false, 15);
        let mut fin = Vec::with_capacity(64);
        c.compress_vec(b"bye bye bye", &mut fin, FlushCompress::Finish)
            .unwrap();
        assert_eq!(inflater.inflate(&fin, 1024).unwrap(), b"bye bye bye");
    }

    #[test]
    fn windows_below_nine_bits_do_not_exist() {
        assert_eq!(Window::new(8), None);
        assert_eq!(Window::new(16), None);
        assert_eq!(Window::new(9).map(Window::bits), Some(9));
        assert_eq!(std::mem::size_of::<Option<Window>>(), 1);
    }
}
