//! The PROXY protocol, version 2 (HAProxy's `send-proxy-v2`): the binary header a proxy
//! sends before any byte of the client's, naming the client's address. Pure: bytes in,
//! "need more", the header, or why it is not one. Whether to believe it (the peer must be
//! in `--trusted-proxies`) is the front door's call.
//!
//! Why v2 and not X-Forwarded-For alone: it is read once per connection before any HTTP
//! byte, so it covers every request and is known before the first one is parsed; and
//! unlike v1's text line, its 12-byte signature can never begin an HTTP request, so a
//! connection that carries none is told apart at its first bytes. v1 (`send-proxy`) is
//! recognised only to be refused with a reason.
//!
//! Layout (haproxy.org/download/2.6/doc/proxy-protocol.txt §2.2): the signature, one byte
//! of version (high nibble, 2) and command (0 LOCAL, 1 PROXY), one byte of family (high
//! nibble: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) and transport, a big-endian u16 length of
//! what follows: the addresses (12 bytes for INET, 36 for INET6), then TLVs we skip.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest header we wait for: the addresses plus TLVs such as HAProxy's unique id or
/// TLS details. §2.2 lets a header run to 64 KiB; no proxy we front sends more than a few
/// hundred bytes, and a trusted peer that does is misconfigured.
pub const MAX_HEADER_BYTES: usize = 4096;

const V1_PREFIX: &[u8] = b"PROXY ";

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prelude {
    /// Not enough bytes to tell; keep them and read more.
    NeedMore,
    /// No PROXY header: the connection starts with its own bytes.
    None,
    /// A header `len` bytes long. `client`: the source address of a PROXY command over
    /// IPv4 or IPv6; `None` for LOCAL (the proxy's own connection, e.g. a health check)
    /// and for families without an IP address (UNSPEC, UNIX).
    Header { client: Option<IpAddr>, len: usize },
}

/// Why the bytes are a broken or unsupported header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// `PROXY TCP4 ...`: version 1.
    Version1,
    /// The signature, then a version other than 2 or a command other than LOCAL/PROXY.
    BadVersion,
    /// The address block is shorter than its family needs.
    Truncated,
    TooLong,
}

impl ProxyError {
    pub fn text(self) -> &'static str {
        match self {
            ProxyError::Version1 => {
                "PROXY protocol v1 is not supported: use send-proxy-v2 in HAProxy"
            }
            ProxyError::BadVersion => "PROXY protocol header: not version 2 LOCAL or PROXY",
            ProxyError::Truncated => "PROXY protocol header: address block too short",
            ProxyError::TooLong => "PROXY protocol header too long",
        }
    }
}

/// Whether `buf` (a connection's first bytes) begins with a PROXY header, or with
/// something that starts like one (v1 included, to refuse it clearly).
pub fn looks_like_proxy(buf: &[u8]) -> bool {
    let n = buf.len().min(SIGNATURE.len());
    let m = buf.len().min(V1_PREFIX.len());
    n > 0 && (buf[..n] == SIGNATURE[..n] || buf[..m] == V1_PREFIX[..m])
}

/// Read a connection's first bytes.
pub fn parse(buf: &[u8]) -> Result<Prelude, ProxyError> {
    let v1 = buf.len().min(V1_PREFIX.len());
    if v1 > 0 && buf[..v1] == V1_PREFIX[..v1] {
        return if v1 == V1_PREFIX.len() {
            Err(ProxyError::Version1)
        } else {
            Ok(Prelude::NeedMore)
        };
    }
    let sig = buf.len().min(SIGNATURE.len());
    if buf[..sig] != SIGNATURE[..sig] {
        return Ok(Prelude::None);
    }
    if buf.len() < 16 {
        return Ok(Prelude::NeedMore);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 || command > 1 {
        return Err(ProxyError::BadVersion);
    }
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body;
    if len > MAX_HEADER_BYTES {
        return Err(ProxyError::TooLong);
    }
    // The family and its address length are checked before the whole header is in, so
    // a header that can never be valid is refused at once.
    let family = buf[13] >> 4;
    let needed = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if command == 1 && body < needed {
        return Err(ProxyError::Truncated);
    }
    if buf.len() < len {
        return Ok(Prelude::NeedMore);
    }
    let a = &buf[16..len];
    let client = match (command, family) {
        (1, 1) => Some(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
        (1, 2) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[..16]);
            Some(IpAddr::V6(Ipv6Addr::from(octets)).to_canonical())
        }
        _ => None,
    };
    Ok(Prelude::Header { client, len })
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A PROXY v2 header as HAProxy writes one: PROXY over TCP, source and destination.
    pub fn header(src: IpAddr, dst: IpAddr, tlvs: &[u8]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.push(0x21);
        let mut addrs = Vec::new();
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.push(0x11);
                addrs.extend_from_slice(&s.octets());
                addrs.extend_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                out.push(0x21);
                addrs.extend_from_slice(&s.octets());
                addrs.extend_from_slice(&d.octets());
            }
            _ => panic!("one family"),
        }
        addrs.extend_from_slice(&40000u16.to_be_bytes());
        addrs.extend_from_slice(&8080u16.to_be_bytes());
        addrs.extend_from_slice(tlvs);
        out.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        out.extend_from_slice(&addrs);
        out
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_and_v6_headers_name_the_client() {
        let h = header(ip("203.0.113.9"), ip("10.0.0.1"), &[]);
        assert_eq!(
            parse(&h),
            Ok(Prelude::Header {
                client: Some(ip("203.0.113.9")),
                len: 28
            })
        );
        let h = header(ip("2001:db8::7"), ip("2001:db8::1"), &[]);
        assert_eq!(
            parse(&h),
            Ok(Prelude::Header {
                client: Some(ip("2001:db8::7")),
                len: 52
            })
        );
        // TLVs after the addresses are skipped; what follows the header is not consumed.
        let mut h = header(
            ip("198.51.100.2"),
            ip("10.0.0.1"),
            &[0x05, 0x00, 0x02, b'i', b'd'],
        );
        let len = h.len();
        h.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            parse(&h),
            Ok(Prelude::Header {
                client: Some(ip("198.51.100.2")),
                len
            })
        );
    }

    #[test]
    fn local_and_unspec_name_no_client() {
        // HAProxy's health checks: LOCAL, family UNSPEC, no addresses.
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(
            parse(&local),
            Ok(Prelude::Header {
                client: None,
                len: 16
            })
        );
        let mut unspec = SIGNATURE.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0x00, 0x00]);
        assert_eq!(
            parse(&unspec),
            Ok(Prelude::Header {
                client: None,
                len: 16
            })
        );
    }

    #[test]
    fn a_header_split_across_reads_waits_for_the_rest() {
        let h = header(ip("192.0.2.44"), ip("10.0.0.1"), &[]);
        for cut in 1..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(Prelude::NeedMore), "cut at {cut}");
        }
        assert!(matches!(parse(&h), Ok(Prelude::Header { .. })));
    }

    #[test]
    fn http_and_bad_headers_are_told_apart() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Ok(Prelude::None));
        assert_eq!(parse(b"G"), Ok(Prelude::None));
        // An HTTP request may begin with an empty line; the signature's NUL tells.
        assert_eq!(parse(b"\r\n\r\nGET"), Ok(Prelude::None));
        assert_eq!(parse(b"\r\n\r\n"), Ok(Prelude::NeedMore));
        assert_eq!(parse(b"PROPFIND / HTTP/1.1"), Ok(Prelude::None));
        assert_eq!(parse(b"PROX"), Ok(Prelude::NeedMore));
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
            Err(ProxyError::Version1)
        );
        // A bad signature is no header at all.
        let mut bad = header(ip("192.0.2.1"), ip("10.0.0.1"), &[]);
        bad[8] = b'X';
        assert_eq!(parse(&bad), Ok(Prelude::None));
        let mut v1 = header(ip("192.0.2.1"), ip("10.0.0.1"), &[]);
        v1[12] = 0x11;
        assert_eq!(parse(&v1), Err(ProxyError::BadVersion));
        let mut cmd = header(ip("192.0.2.1"), ip("10.0.0.1"), &[]);
        cmd[12] = 0x22;
        assert_eq!(parse(&cmd), Err(ProxyError::BadVersion));
        // INET with a 4-byte address block.
        let mut short = SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert_eq!(parse(&short), Err(ProxyError::Truncated));
        let mut long = SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&long), Err(ProxyError::TooLong));
        assert!(looks_like_proxy(&SIGNATURE[..3]));
        assert!(looks_like_proxy(b"PROXY TCP4"));
        assert!(!looks_like_proxy(b"GET /"));
    }
}
