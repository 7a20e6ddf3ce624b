//! Redis Cluster's addressing, without I/O: a key's hash slot (CRC16/XMODEM of the key,
//! or of its `{hash tag}`, mod 16384), the slot map from `CLUSTER SLOTS`, and the
//! redirections a node answers with (`MOVED`, `ASK`, `TRYAGAIN`). The links, and what
//! is sent where, are `redis.rs`'s.
//!
//! herald names every key and sharded channel of a topic with the topic as its hash tag
//! (`herald:id:{news}`, `herald:h:{news}`, `herald:{news}`), so one topic's counter,
//! stream, epoch and channel share a slot and the publish script runs on one node.

use redis_protocol::resp2::types::OwnedFrame;

/// Redis Cluster's slot count.
pub const SLOTS: usize = 16384;

/// CRC16/XMODEM (polynomial 0x1021, initial 0), as Redis's `crc16.c`; bitwise, which is
/// fast enough for one topic name per publish (a table would be 512 bytes to save
/// nanoseconds).
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key`: the part between the first `{` and the next `}` when that is not
/// empty, else the whole key (the Cluster specification's `HASH_SLOT`).
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS as u16
}

/// The slot every key of `topic` is in (they all carry `{topic}`).
pub fn topic_slot(topic: &str) -> u16 {
    slot(format!("{{{topic}}}").as_bytes())
}

/// One range of `CLUSTER SLOTS`: slots `start..=end` served by the master at `addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub start: u16,
    pub end: u16,
    pub addr: String,
}

/// `CLUSTER SLOTS`: `[[start, end, [host, port, id, ...], replicas...], ...]`. A node
/// that announces no host (`""`, or `?`) is at the address we asked.
pub fn parse_slots(frame: &OwnedFrame, asked: &str) -> Result<Vec<Range>, String> {
    let bad = || format!("unexpected CLUSTER SLOTS reply {frame:?}");
    let OwnedFrame::Array(ranges) = frame else {
        return Err(bad());
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let OwnedFrame::Array(items) = range else {
            return Err(bad());
        };
        let (
            Some(OwnedFrame::Integer(start)),
            Some(OwnedFrame::Integer(end)),
            Some(OwnedFrame::Array(master)),
        ) = (items.first(), items.get(1), items.get(2))
        else {
            return Err(bad());
        };
        let (Ok(start), Ok(end)) = (u16::try_from(*start), u16::try_from(*end)) else {
            return Err(bad());
        };
        if start > end || usize::from(end) >= SLOTS {
            return Err(bad());
        }
        let (Some(OwnedFrame::BulkString(host)), Some(OwnedFrame::Integer(port))) =
            (master.first(), master.get(1))
        else {
            return Err(bad());
        };
        let host = std::str::from_utf8(host).map_err(|_| bad())?;
        let port = u16::try_from(*port).map_err(|_| bad())?;
        let addr = if host.is_empty() || host == "?" {
            let asked_host = asked.rsplit_once(':').map_or(asked, |(h, _)| h);
            format!("{asked_host}:{port}")
        } else if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        out.push(Range { start, end, addr });
    }
    if out.is_empty() {
        return Err("CLUSTER SLOTS names no slot: is the cluster created?".into());
    }
    Ok(out)
}

/// What a node's error reply asks of us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// The slot lives at `addr` now: update the map and send there.
    Moved { slot: u16, addr: String },
    /// This one command goes to `addr`, after `ASKING` (a slot being migrated).
    Ask { slot: u16, addr: String },
    /// A multi-key command during a migration whose keys are split: try again shortly.
    TryAgain,
}

/// `MOVED 3999 127.0.0.1:6381`, `ASK 3999 127.0.0.1:6381`, `TRYAGAIN ...`; `None` for
/// every other error.
pub fn parse_redirect(error: &str) -> Option<Redirect> {
    let mut parts = error.split(' ');
    let kind = parts.next()?;
    if kind == "TRYAGAIN" {
        return Some(Redirect::TryAgain);
    }
    let slot: u16 = parts.next()?.parse().ok()?;
    let addr = parts.next()?.to_string();
    if usize::from(slot) >= SLOTS || !addr.contains(':') {
        return None;
    }
    match kind {
        "MOVED" => Some(Redirect::Moved { slot, addr }),
        "ASK" => Some(Redirect::Ask { slot, addr }),
        _ => None,
    }
}

/// A hash tag whose slot is in `owned` (true per slot a node serves), for that node's
/// delivery-probe channel: `probe-0`, `probe-1`, ... the first that lands there. Bounded:
/// a node owning any slot is hit within a few tries per 16384/its slots.
pub fn probe_tag(owned: impl Fn(u16) -> bool) -> Option<String> {
    (0..200_000u32)
        .map(|n| format!("probe-{n}"))
        .find(|tag| owned(slot(tag.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_cluster_specification() {
        // The specification's CRC16 check value, and slots redis-cli reports
        // (`CLUSTER KEYSLOT`).
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"herald:id:{news}"), slot(b"herald:{news}"));
        assert_eq!(slot(b"herald:id:{news}"), topic_slot("news"));
        // An empty tag, or none closed, hashes the whole key.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(slot(b"foo{bar"), crc16(b"foo{bar") % 16384);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn cluster_slots_parse_into_ranges_and_strangers_are_errors() {
        let int = |n| OwnedFrame::Integer(n);
        let bulk = |s: &str| OwnedFrame::BulkString(s.as_bytes().to_vec());
        let node = |host: &str, port| OwnedFrame::Array(vec![bulk(host), int(port), bulk("id")]);
        let reply = OwnedFrame::Array(vec![
            OwnedFrame::Array(vec![int(0), int(5460), node("127.0.0.1", 7001)]),
            OwnedFrame::Array(vec![int(5461), int(16383), node("", 7002), node("x", 1)]),
        ]);
        assert_eq!(
            parse_slots(&reply, "10.0.0.1:7000"),
            Ok(vec![
                Range {
                    start: 0,
                    end: 5460,
                    addr: "127.0.0.1:7001".into()
                },
                Range {
                    start: 5461,
                    end: 16383,
                    addr: "10.0.0.1:7002".into()
                },
            ])
        );
        let backwards =
            OwnedFrame::Array(vec![OwnedFrame::Array(vec![int(9), int(3), node("h", 1)])]);
        assert!(parse_slots(&backwards, "h:1").is_err());
        let beyond = OwnedFrame::Array(vec![OwnedFrame::Array(vec![
            int(0),
            int(16384),
            node("h", 1),
        ])]);
        assert!(parse_slots(&beyond, "h:1").is_err());
        assert!(parse_slots(&OwnedFrame::Array(vec![]), "h:1").is_err());
        assert!(parse_slots(&int(1), "h:1").is_err());
    }

    #[test]
    fn redirects_parse_and_other_errors_are_not_redirects() {
        assert_eq!(
            parse_redirect("MOVED 3999 127.0.0.1:6381"),
            Some(Redirect::Moved {
                slot: 3999,
                addr: "127.0.0.1:6381".into()
            })
        );
        assert_eq!(
            parse_redirect("ASK 1 h:2"),
            Some(Redirect::Ask {
                slot: 1,
                addr: "h:2".into()
            })
        );
        assert_eq!(
            parse_redirect("TRYAGAIN Multiple keys request during rehashing of slot"),
            Some(Redirect::TryAgain)
        );
        assert_eq!(parse_redirect("MOVED 99999 h:1"), None);
        assert_eq!(parse_redirect("MOVED x h:1"), None);
        assert_eq!(parse_redirect("OOM command not allowed"), None);
        assert_eq!(parse_redirect("ERR"), None);
    }

    #[test]
    fn a_probe_tag_lands_in_the_slots_asked_for() {
        let tag = probe_tag(|s| (100..200).contains(&s)).unwrap();
        assert!((100..200).contains(&slot(tag.as_bytes())));
        assert_eq!(probe_tag(|_| false), None);
    }
}
