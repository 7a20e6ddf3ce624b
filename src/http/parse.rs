//! HTTP/1.1 requests in, responses out, as pure functions over bytes. `parse` takes what
//! has arrived and says "need more", "here is one request and how many bytes it used", or
//! why the bytes can never be a request. Routing lives in `api.rs`, the
//! connection-level handling in `front.rs`, sockets in the reactor.

use std::fmt::Write as _;

use crate::close::Reject;

/// Largest request head (request line + headers) we wait for; past it the answer is 431.
/// 8 KiB is what nginx and HAProxy accept by default, and far above any real client.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers in one request; more is 431 as well.
pub const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Other,
}

/// The parts of a request herald looks at, copied out of the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    /// HTTP/1.1 (true) or HTTP/1.0.
    pub http11: bool,
    /// The client wants the connection kept open after the response.
    pub keep_alive: bool,
    /// `Connection` lists `upgrade`.
    pub connection_upgrade: bool,
    pub upgrade: Option<String>,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    /// `Sec-WebSocket-Extensions`, every occurrence joined by commas (RFC 9110 §5.3).
    pub ws_extensions: Option<String>,
    pub origin: Option<String>,
    pub authorization: Option<String>,
    /// `If-None-Match`, for the embedded assets' ETags.
    pub if_none_match: Option<String>,
    /// `X-Forwarded-For`, every occurrence joined by commas in order (believed only from
    /// `--trusted-proxies`, on upgrades: `limits::forwarded_client`).
    pub forwarded_for: Option<String>,

    /// Every header of a `GET` (names lower-cased), for `--auth-forward-headers`; empty
    /// for other methods, so a publish allocates nothing more.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// Value of `name` in the query string, undecoded (topic names need no escaping).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request head yet; keep the bytes and read more.
    Partial,
    /// The head is complete and acceptable; its body has not fully arrived.
    /// `expect_continue`: the client waits for `100 Continue` before sending it.
    AwaitingBody { expect_continue: bool },
    /// One request, and how many bytes of the input it took (head + body).
    Complete(Box<Request>, usize),
}

/// Parse one request from the start of `buf`. Bodies must have a `Content-Length` no
/// larger than `max_body`; everything past the request is left for the next call (HTTP
/// pipelining) or, after an upgrade, for the WebSocket.
pub fn parse(buf: &[u8], max_body: usize) -> Result<Parsed, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(Reject::HeadersTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::HeadersTooLarge),
        Err(_) => return Err(Reject::bad_request("malformed HTTP request")),
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(Reject::HeadersTooLarge);
    }
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        Some("POST") => Method::Post,
        _ => Method::Other,
    };
    let http11 = req.version == Some(1);
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };

    let mut request = Request {
        method,
        path,
        query,
        http11,
        // HTTP/1.1 keeps the connection unless told `close`; 1.0 only when asked.
        keep_alive: http11,
        connection_upgrade: false,
        upgrade: None,
        ws_key: None,
        ws_version: None,
        ws_extensions: None,
        origin: None,
        authorization: None,
        if_none_match: None,
        forwarded_for: None,

        headers: Vec::new(),
        body: Vec::new(),
    };
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = || String::from_utf8_lossy(h.value).trim().to_string();
        let name = h.name;
        if request.method == Method::Get {
            request.headers.push((name.to_ascii_lowercase(), value()));
        }
        if name.eq_ignore_ascii_case("connection") {
            // A comma list: `keep-alive, Upgrade` is common from browsers.
            for token in String::from_utf8_lossy(h.value).split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("close") {
                    request.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    request.keep_alive = true;
                } else if token.eq_ignore_ascii_case("upgrade") {
                    request.connection_upgrade = true;
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or(Reject::bad_request("bad Content-Length"))?;
            // RFC 9112 §6.3: differing repeated lengths are an error, not a choice.
            if content_length.is_some_and(|old| old != n) {
                return Err(Reject::bad_request("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Reject::LengthRequired);
        } else if name.eq_ignore_ascii_case("upgrade") {
            request.upgrade = Some(value());
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            request.ws_key = Some(value());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            request.ws_version = Some(value());
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            let value = value();
            request.ws_extensions = Some(match request.ws_extensions.take() {
                Some(earlier) => format!("{earlier}, {value}"),
                None => value,
            });
        } else if name.eq_ignore_ascii_case("origin") {
            request.origin = Some(value());
        } else if name.eq_ignore_ascii_case("authorization") {
            request.authorization = Some(value());
        } else if name.eq_ignore_ascii_case("if-none-match") {
            request.if_none_match = Some(value());
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            let value = value();
            request.forwarded_for = Some(match request.forwarded_for.take() {
                Some(earlier) => format!("{earlier}, {value}"),
                None => value,
            });
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > max_body {
        return Err(Reject::PayloadTooLarge);
    }
    let total = head_len + body_len;
    if buf.len() < total {
        return Ok(Parsed::AwaitingBody {
            expect_continue: expect_continue && http11,
        });
    }
    request.body = buf[head_len..total].to_vec();
    Ok(Parsed::Complete(Box::new(request), total))
}

/// An HTTP response, encoded once into bytes for the connection's output queue.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// Send `Connection: close` and close after writing.
    pub close: bool,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
            close: false,
        }
    }

    /// A one-line plain-text response, the form every error takes.
    pub fn text(status: u16, line: &str) -> Response {
        let mut body = line.as_bytes().to_vec();
        body.push(b'\n');
        Response::new(status, "text/plain; charset=utf-8", body)
    }

    /// The response for a refusal, in the form `close.rs` decided.
    pub fn refuse(reject: &Reject) -> Response {
        let refusal = reject.refusal();
        let mut response = Response::text(refusal.status, refusal.line);
        response.close = refusal.close;
        for (name, value) in refusal.headers {
            response = response.header(name, value);
        }
        response
    }

    pub fn json(status: u16, body: Vec<u8>) -> Response {
        Response::new(status, "application/json", body)
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// Bytes on the wire. `head_only` answers a HEAD request: same headers, no body.
    pub fn encode(&self, head_only: bool) -> Vec<u8> {
        let mut head = String::with_capacity(160);
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\n",
            self.status,
            status_text(self.status)
        );
        if self.status != 101 {
            let _ = write!(head, "Content-Type: {}\r\n", self.content_type);
            let _ = write!(head, "Content-Length: {}\r\n", self.body.len());
        }
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        if self.close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_is_one_line_of_text() {
        for reject in Reject::examples() {
            let r = Response::refuse(&reject);
            let body = String::from_utf8(r.body.clone()).unwrap();
            assert!(
                body.ends_with('\n') && body.lines().count() == 1,
                "{reject:?}"
            );
            assert!(r.status >= 400, "{reject:?}");
        }
    }

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf, 1024).unwrap() {
            Parsed::Complete(r, n) => (*r, n),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_a_get_with_query_and_upgrade_headers() {
        let raw = b"GET /ws?topics=a,b HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n\
                    Upgrade: websocket\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\nrest";
        let (req, used) = complete(raw);
        assert_eq!(used, raw.len() - 4);
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.path, "/ws");
        assert_eq!(req.query_param("topics"), Some("a,b"));
        assert!(req.connection_upgrade && req.keep_alive);
        assert_eq!(req.upgrade.as_deref(), Some("websocket"));
        assert_eq!(req.ws_version.as_deref(), Some("13"));
        assert_eq!(req.ws_extensions, None);
    }

    #[test]
    fn repeated_extension_headers_join_into_one_list() {
        let raw = b"GET /ws HTTP/1.1\r\nSec-WebSocket-Extensions: permessage-deflate; bogus\r\n\
                    sec-websocket-extensions:  permessage-deflate \r\n\r\n";
        let (req, _) = complete(raw);
        assert_eq!(
            req.ws_extensions.as_deref(),
            Some("permessage-deflate; bogus, permessage-deflate")
        );
    }

    #[test]
    fn waits_for_the_whole_body() {
        let raw = b"POST /publish HTTP/1.1\r\nContent-Length: 5\r\n\r\nab";
        assert_eq!(
            parse(raw, 1024).unwrap(),
            Parsed::AwaitingBody {
                expect_continue: false
            }
        );
        let raw = b"POST /publish HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(
            parse(raw, 1024).unwrap(),
            Parsed::AwaitingBody {
                expect_continue: true
            }
        );
        assert_eq!(
            parse(b"POST /publish HTTP/1.1\r\nContent-Le", 1024).unwrap(),
            Parsed::Partial
        );
        let raw = b"POST /publish HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcdeGET";
        let (req, used) = complete(raw);
        assert_eq!(req.body, b"abcde");
        assert_eq!(&raw[used..], b"GET");
    }

    #[test]
    fn keep_alive_defaults_follow_the_version() {
        assert!(complete(b"GET / HTTP/1.1\r\n\r\n").0.keep_alive);
        assert!(
            !complete(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(!complete(b"GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(
            complete(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn refuses_what_can_never_be_a_request() {
        assert_eq!(
            parse(b"\x16\x03\x01\x00garbage\r\n\r\n", 10),
            Err(Reject::bad_request("malformed HTTP request"))
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(big.as_bytes(), 10), Err(Reject::HeadersTooLarge));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: y\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse(raw.as_bytes(), 10), Err(Reject::HeadersTooLarge));
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n";
        assert_eq!(parse(raw, 10), Err(Reject::PayloadTooLarge));
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(raw, 10), Err(Reject::LengthRequired));
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert!(matches!(parse(raw, 10), Err(Reject::BadRequest(_))));
    }

    #[test]
    fn encodes_close_and_head_responses() {
        let mut r = Response::text(404, "no such endpoint");
        r.close = true;
        let bytes = String::from_utf8(r.encode(false)).unwrap();
        assert!(bytes.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(bytes.contains("Content-Length: 17\r\n"));
        assert!(bytes.contains("Connection: close\r\n"));
        assert!(bytes.ends_with("\r\n\r\nno such endpoint\n"));
        let head = String::from_utf8(r.encode(true)).unwrap();
        assert!(head.ends_with("\r\n\r\n"));
    }
}
