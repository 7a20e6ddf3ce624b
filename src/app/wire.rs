//! HTTP/1.1 as herald speaks it to the application: the `http://` URL of a callback or
//! webhook, the signed POST, and the response read back with `httparse` (fixed
//! `Content-Length` or chunked bodies). Pure: bytes in, values out.

use std::net::{SocketAddr, ToSocketAddrs};

use crate::app::sign;

/// A response head larger than this is not one an auth endpoint sends: the exchange fails.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Nor a body larger than this (a grant is a few hundred bytes).
pub const MAX_RESPONSE_BODY: usize = 256 * 1024;
const MAX_HEADERS: usize = 64;

/// Where to send requests: resolved once at start, so the loop never waits for DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// The `Host` header.
    pub host: String,
    /// Path and query.
    pub path: String,
}

/// `http://host[:port][/path]`. No TLS: the application is expected on the same host or
/// private network (put a local proxy in front for anything else).
pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{url}: expected http://host[:port]/path"));
    }
    let with_port = if authority.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty() && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())
    }) && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: resolves to nothing"))?;
    Ok(Target {
        addr,
        host: authority.to_string(),
        path: path.to_string(),
    })
}

/// The signed `POST` of `body` (JSON) to `target`, keeping the connection open.
pub fn encode_request(target: &Target, secret: &[u8], timestamp: u64, body: &[u8]) -> Vec<u8> {
    let signature = sign::signature(secret, timestamp, body);
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(
        format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: herald\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             {}: {timestamp}\r\n{}: {signature}\r\n\r\n",
            target.path,
            target.host,
            body.len(),
            sign::TIMESTAMP_HEADER,
            sign::SIGNATURE_HEADER,
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// One complete response from the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// The application will close the connection (or the response was HTTP/1.0).
    pub close: bool,
}

/// `Ok(None)`: need more bytes. `Ok(Some((answer, used)))`: one response, `used` bytes of
/// `buf`. `Err`: not a response we can use; the connection must go.
pub fn parse_response(buf: &[u8]) -> Result<Option<(Answer, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            return Err("response head too large".into());
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response ({e})")),
    };
    let status = resp.code.unwrap_or(0);
    let mut close = resp.version == Some(0);
    let mut length = None;
    let mut chunked = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or("bad Content-Length")?;
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    // 1xx (100 Continue) carries no body and another response follows.
    if (100..200).contains(&status) {
        return match parse_response(&buf[head..])? {
            Some((answer, used)) => Ok(Some((answer, head + used))),
            None => Ok(None),
        };
    }
    if chunked {
        return match dechunk(&buf[head..])? {
            Some((body, used)) => Ok(Some((
                Answer {
                    status,
                    body,
                    close,
                },
                head + used,
            ))),
            None => Ok(None),
        };
    }
    let Some(length) = length else {
        // RFC 9112 §6.3: without a length, the body runs to the end of the connection.
        // We do not wait for that: only 204 and 304 have no body by definition.
        if status == 204 || status == 304 {
            return Ok(Some((
                Answer {
                    status,
                    body: Vec::new(),
                    close,
                },
                head,
            )));
        }
        return Err("response without Content-Length or chunked body".into());
    };
    if length > MAX_RESPONSE_BODY {
        return Err("response body too large".into());
    }
    if buf.len() < head + length {
        return Ok(None);
    }
    let body = buf[head..head + length].to_vec();
    Ok(Some((
        Answer {
            status,
            body,
            close,
        },
        head + length,
    )))
}

/// A chunked body (RFC 9112 §7.1): the joined chunks and the bytes used, trailers skipped.
fn dechunk(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = find_crlf(&buf[pos..]) else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[pos..pos + eol]).map_err(|_| "bad chunk size")?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        pos += eol + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(eol) = find_crlf(&buf[pos..]) else {
                    return Ok(None);
                };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, pos)));
                }
            }
        }
        if body.len() + size > MAX_RESPONSE_BODY {
            return Err("response body too large".into());
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        pos += size + 2;
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// The first line of a refusal's body, as the reason a client is shown: printable ASCII,
/// at most 200 bytes, or `fallback` when the application gave none.
pub fn reason_line(body: &[u8], fallback: &str) -> String {
    let text = String::from_utf8_lossy(body);
    // A JSON body `{"reason":"..."}` or `{"error":"..."}` is common; take its text.
    let from_json = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            ["reason", "error", "message"]
                .iter()
                .find_map(|k| v.get(k).and_then(|s| s.as_str()).map(str::to_string))
        });
    let line = from_json.unwrap_or_else(|| text.lines().next().unwrap_or("").to_string());
    let clean: String = line
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(200)
        .collect();
    let clean = clean.trim();
    if clean.is_empty() {
        fallback.to_string()
    } else {
        clean.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_resolve_with_default_port_and_path() {
        let t = parse_url("http://127.0.0.1:9000/herald/auth?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(t.host, "127.0.0.1:9000");
        assert_eq!(t.path, "/herald/auth?x=1");
        let t = parse_url("http://127.0.0.1").unwrap();
        assert_eq!(t.addr.port(), 80);
        assert_eq!(t.path, "/");
        assert!(parse_url("https://127.0.0.1/").is_err());
        assert!(parse_url("http://user@127.0.0.1/").is_err());
    }

    #[test]
    fn requests_carry_length_timestamp_and_signature() {
        let t = parse_url("http://127.0.0.1:1/a").unwrap();
        let req = encode_request(&t, b"s", 42, b"{}");
        let text = String::from_utf8(req).unwrap();
        assert!(text.starts_with("POST /a HTTP/1.1\r\nHost: 127.0.0.1:1\r\n"));
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.contains("X-Herald-Timestamp: 42\r\n"));
        let sig = sign::signature(b"s", 42, b"{}");
        assert!(text.contains(&format!("X-Herald-Signature: {sig}\r\n")));
        assert!(text.ends_with("\r\n\r\n{}"));
    }

    #[test]
    fn responses_parse_by_length_and_by_chunks() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1";
        let (a, used) = parse_response(r).unwrap().unwrap();
        assert_eq!(
            (a.status, a.body.as_slice(), a.close),
            (200, &b"{}"[..], false)
        );
        assert_eq!(used, r.len() - 8);
        assert_eq!(parse_response(&r[..20]).unwrap(), None);
        let r = b"HTTP/1.0 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope";
        let (a, _) = parse_response(r).unwrap().unwrap();
        assert!(a.close && a.status == 403);
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n";
        let (a, used) = parse_response(r).unwrap().unwrap();
        assert_eq!((a.body.as_slice(), used), (&b"abcde"[..], r.len()));
        assert_eq!(parse_response(&r[..r.len() - 1]).unwrap(), None);
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        let r = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
        let (a, used) = parse_response(r).unwrap().unwrap();
        assert_eq!((a.status, used), (204, r.len()));
    }

    #[test]
    fn reasons_are_one_clean_line() {
        assert_eq!(reason_line(b"banned user\nmore", "x"), "banned user");
        assert_eq!(
            reason_line(br#"{"reason":"no session"}"#, "x"),
            "no session"
        );
        assert_eq!(
            reason_line(b"", "refused by the application"),
            "refused by the application"
        );
        assert_eq!(reason_line(b"a\r\x07b", "x"), "ab");
    }
}
