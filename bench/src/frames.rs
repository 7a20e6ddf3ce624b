//! WebSocket frames as a load tool needs them: scan server frames in place (no
//! allocation, no copy), build masked client frames, and pull the two numbers a benchmark
//! message carries (`id` and the send timestamp) straight out of the JSON bytes.

/// One frame at the start of `buf`: (first byte, payload, bytes used), or `None` when the
/// frame is not complete yet. Server frames are unmasked; a masked one is not unmasked
/// here (it would be a protocol error from a server, and the payload is only counted).
pub fn parse(buf: &[u8]) -> Option<(u8, &[u8], usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (first, second) = (buf[0], buf[1]);
    let mut at: usize = 2;
    let len = match second & 0x7f {
        126 => {
            let b = buf.get(2..4)?;
            at = 4;
            u16::from_be_bytes([b[0], b[1]]) as usize
        }
        127 => {
            let b = buf.get(2..10)?;
            at = 10;
            u64::from_be_bytes(b.try_into().ok()?) as usize
        }
        n => n as usize,
    };
    if second & 0x80 != 0 {
        at += 4;
    }
    let end = at.checked_add(len)?;
    let payload = buf.get(at..end)?;
    Some((first, payload, end))
}

/// A final client frame with `opcode`, masked as RFC 6455 requires of clients.
pub fn client_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x9e];
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
}

/// The unsigned integer right after the first `key` in `text` (spaces between allowed).
pub fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let mut start = text.windows(key.len()).position(|w| w == key)? + key.len();
    while text.get(start) == Some(&b' ') {
        start += 1;
    }
    let digits = text[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 {
        return None;
    }
    std::str::from_utf8(&text[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

/// (id, send timestamp in ns) of a herald-style message whose `data` is `[ts, ...]`.
pub fn message_id_and_stamp(payload: &[u8]) -> Option<(u64, u64)> {
    Some((
        number_after(payload, b"\"id\":")?,
        number_after(payload, b"\"data\":[")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_three_length_forms_and_waits_for_more() {
        let mut bytes = vec![0x81, 3, b'a', b'b', b'c'];
        bytes.extend([0x82, 126, 0x01, 0x00]);
        bytes.extend(vec![7u8; 256]);
        bytes.extend([0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        bytes.extend(vec![9u8; 65536]);
        let (first, payload, used) = parse(&bytes).unwrap();
        assert_eq!((first, payload, used), (0x81, &b"abc"[..], 5));
        let (_, payload, used2) = parse(&bytes[used..]).unwrap();
        assert_eq!((payload.len(), used2), (256, 260));
        let rest = &bytes[used + used2..];
        assert_eq!(parse(rest).unwrap().1.len(), 65536);
        for cut in 0..rest.len() {
            assert!(parse(&rest[..cut]).is_none(), "{cut}");
        }
    }

    #[test]
    fn finds_ids_and_stamps_in_message_json() {
        let m = br#"{"op":"message","topic":"b","id":42,"data":[123456789,"xxxx"]}"#;
        assert_eq!(message_id_and_stamp(m), Some((42, 123456789)));
        assert_eq!(
            number_after(br#"{"delivered": 3, "id": 7}"#, b"\"id\":"),
            Some(7)
        );
        assert_eq!(
            message_id_and_stamp(br#"{"op":"subscribed","topic":"b"}"#),
            None
        );
    }

    #[test]
    fn client_frames_are_masked() {
        let mut out = Vec::new();
        client_frame(0x1, b"hi", &mut out);
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x82);
        assert_eq!(out[6] ^ out[2], b'h');
    }
}
