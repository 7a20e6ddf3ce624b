//! The blocking client under `herald check --live` and `herald tail`: URLs, the steps of
//! a connection (DNS, TCP, TLS, WebSocket upgrade) one function each so the check can
//! time and judge each, a minimal HTTP/1.1 request, and reading a WebSocket up to a
//! deadline. Blocking sockets with timeouts, never the event loop: these are commands an
//! operator runs, one connection at a time.
//!
//! It owns no policy: what a failure means for a deployment is `live.rs`'s to say, what
//! to do after a close is `tail.rs`'s.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::Uri;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// The most of an HTTP answer we read: enough for any refusal line and the start of
/// `/metrics`; the rest is not needed to judge it.
const MAX_HTTP_ANSWER: usize = 64 * 1024;
/// The largest WebSocket message either command accepts (herald's own default
/// `--max-message-size` is 64 KiB; a replay comes one message per frame).
const MAX_WS_MESSAGE: usize = 16 << 20;

/// What a URL says about where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `wss://` or `https://`.
    pub tls: bool,
    /// As written, without brackets for IPv6.
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

/// Which schemes a URL may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    WebSocket,
    Http,
}

impl Target {
    pub fn parse(url: &str, kind: Kind) -> Result<Target, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: not a URL ({e})"))?;
        let tls = match (kind, uri.scheme_str()) {
            (Kind::WebSocket, Some("ws")) | (Kind::Http, Some("http")) => false,
            (Kind::WebSocket, Some("wss")) | (Kind::Http, Some("https")) => true,
            (Kind::WebSocket, _) => return Err(format!("{url}: expected ws:// or wss://")),
            (Kind::Http, _) => return Err(format!("{url}: expected http:// or https://")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{url}: no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/");
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        Ok(Target {
            tls,
            host,
            port,
            path,
        })
    }

    fn default_port(&self) -> bool {
        self.port == if self.tls { 443 } else { 80 }
    }

    /// `host[:port]`, as a Host header or a URL writes it.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The web origin a page on this host has (RFC 6454): what a browser sends as
    /// `Origin`, and where the site's plain HTTP paths are.
    pub fn origin(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority())
    }

    /// The same host and port, another path (the public site's `/publish`, say).
    pub fn with_path(&self, path: &str) -> Target {
        Target {
            path: path.to_string(),
            ..self.clone()
        }
    }

    pub fn ws_url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}{}", self.authority(), self.path)
    }

    pub fn http_url(&self) -> String {
        format!("{}{}", self.origin(), self.path)
    }
}

/// The TLS client settings: the system's CA bundle plus `ca_file`, TLS 1.2 and 1.3, and
/// ALPN `http/1.1` only, as a browser's WebSocket offers (an HTTP/2 answer could not
/// carry the upgrade).
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    // Unreadable entries in the bundle are skipped, as curl does; the count decides.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let certs =
            CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut added = 0;
        for cert in certs {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("{}: no PEM certificate in it", path.display()));
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted certificates: the system has no CA bundle (install ca-certificates) \
             and no --ca-file was given"
                .into(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A connection, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// DNS: every address of the target, in the resolver's order.
pub fn resolve(target: &Target) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", target.host))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{} has no address", target.host));
    }
    Ok(addrs)
}

/// TCP: the first address that accepts within `timeout`, as a browser falls back.
pub fn tcp(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, String> {
    let mut errors = Vec::new();
    for addr in addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(stream) => {
                // Small frames (ops, pongs) must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                stream
                    .set_read_timeout(Some(timeout))
                    .and_then(|()| stream.set_write_timeout(Some(timeout)))
                    .map_err(|e| format!("{addr}: {e}"))?;
                return Ok(stream);
            }
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// TLS: the handshake, done here so it can be timed apart from the upgrade. Returns the
/// stream and what was agreed (`TLSv1_3, http/1.1`).
pub fn tls(
    tcp: TcpStream,
    target: &Target,
    config: &Arc<ClientConfig>,
    timeout: Duration,
) -> Result<(Stream, String), String> {
    let name = ServerName::try_from(target.host.clone())
        .map_err(|e| format!("{}: not a TLS server name ({e})", target.host))?;
    let mut conn = ClientConnection::new(config.clone(), name).map_err(|e| format!("TLS: {e}"))?;
    let mut tcp = tcp;
    let start = Instant::now();
    // Each round trip is bounded by the socket's timeout; the rounds by the count.
    for _ in 0..32 {
        if !conn.is_handshaking() {
            break;
        }
        if start.elapsed() > timeout {
            return Err(format!("TLS handshake not done after {timeout:?}"));
        }
        conn.complete_io(&mut tcp).map_err(|e| tls_error(&e))?;
    }
    if conn.is_handshaking() {
        return Err("TLS handshake did not finish".into());
    }
    let version = conn
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    let alpn = match conn.alpn_protocol() {
        Some(p) => String::from_utf8_lossy(p).into_owned(),
        None => "no ALPN".into(),
    };
    if conn.alpn_protocol().is_some_and(|p| p != b"http/1.1") {
        return Err(format!(
            "the server chose ALPN {alpn}, which cannot carry a WebSocket upgrade"
        ));
    }
    Ok((
        Stream::Tls(Box::new(StreamOwned::new(conn, tcp))),
        format!("{version}, {alpn}"),
    ))
}

fn tls_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "TLS handshake timed out".into(),
        // `openssl req -x509` marks its certificate CA:TRUE, which WebPKI (and so rustls)
        // refuses as a server's own certificate, trusted or not.
        _ if e.to_string().contains("CaUsedAsEndEntity") => format!(
            "TLS: {e}: the server's certificate is a CA certificate (as `openssl req -x509` \
             makes by default); serve a leaf certificate signed by it, or make the \
             self-signed one with `-addext basicConstraints=critical,CA:FALSE`"
        ),
        _ => format!("TLS: {e}"),
    }
}

/// DNS, TCP and TLS (for `wss://`/`https://`) in one, for callers that need no timings.
pub fn connect(
    target: &Target,
    tls_config: Option<&Arc<ClientConfig>>,
    timeout: Duration,
) -> Result<Stream, String> {
    let tcp = tcp(&resolve(target)?, timeout)?;
    match (target.tls, tls_config) {
        (false, _) => Ok(Stream::Plain(tcp)),
        (true, Some(config)) => Ok(tls(tcp, target, config, timeout)?.0),
        (true, None) => Err("TLS is not set up".into()),
    }
}

/// Why an upgrade failed.
#[derive(Debug)]
pub enum UpgradeError {
    /// The server answered, with something other than 101.
    Refused {
        status: u16,
        body: String,
    },
    Other(String),
}

/// The WebSocket upgrade, with the headers a browser's page sends: `Origin`, and a
/// `User-Agent` that says who is asking.
pub fn upgrade(
    stream: Stream,
    target: &Target,
    origin: &str,
) -> Result<WebSocket<Stream>, UpgradeError> {
    let mut request = target
        .ws_url()
        .into_client_request()
        .map_err(|e| UpgradeError::Other(e.to_string()))?;
    let headers = request.headers_mut();
    let value = |v: &str| {
        v.parse()
            .map_err(|_| UpgradeError::Other(format!("{v:?} is not a header value")))
    };
    headers.insert("Origin", value(origin)?);
    headers.insert(
        "User-Agent",
        value(concat!("herald/", env!("CARGO_PKG_VERSION")))?,
    );
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE));
    match tungstenite::client::client_with_config(request, stream, Some(config)) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            let body = response
                .body()
                .as_deref()
                .map(|b| one_line(&String::from_utf8_lossy(b)))
                .unwrap_or_default();
            Err(UpgradeError::Refused {
                status: response.status().as_u16(),
                body,
            })
        }
        Err(tungstenite::HandshakeError::Failure(e)) => Err(UpgradeError::Other(e.to_string())),
        Err(tungstenite::HandshakeError::Interrupted(_)) => Err(UpgradeError::Other(
            "no answer to the upgrade in time".into(),
        )),
    }
}

/// What reading a WebSocket up to a deadline gave.
#[derive(Debug)]
pub enum Event {
    Text(String),
    /// A WebSocket ping from the server; its pong is on its way.
    Ping,
    /// The answer to a ping of ours.
    Pong,
    /// The server's close frame (code 1005 when it carried none).
    Closed {
        code: u16,
        reason: String,
    },
    /// The connection ended without a close frame (the reason, as read).
    Lost(String),
    /// Nothing by the deadline.
    Timeout,
}

/// The next text message, ping or end of `ws`, waiting no later than `deadline`.
pub fn next_event(ws: &mut WebSocket<Stream>, deadline: Instant) -> Event {
    // Each read waits for what is left; a read that times out with a frame half in keeps
    // the half, and the loop is bounded by the deadline and a count.
    for _ in 0..100_000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Event::Timeout;
        }
        if let Err(e) = ws.get_ref().tcp().set_read_timeout(Some(left)) {
            return Event::Lost(e.to_string());
        }
        match ws.read() {
            Ok(Message::Text(t)) => return Event::Text(t.as_str().to_string()),
            Ok(Message::Ping(_)) => {
                // tungstenite queued the pong; send it now, not at the next read.
                let _ = ws.flush();
                return Event::Ping;
            }
            Ok(Message::Close(frame)) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.as_str().to_string())
                });
                // Answer the close (tungstenite queued the reply) and let it go.
                let _ = ws.flush();
                return Event::Closed { code, reason };
            }
            Ok(Message::Pong(_)) => return Event::Pong,
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )) => return Event::Lost("the connection ended without a close frame".into()),
            Err(e) => return Event::Lost(e.to_string()),
        }
    }
    Event::Timeout
}

/// Send one text message.
pub fn send_text(ws: &mut WebSocket<Stream>, text: String) -> Result<(), String> {
    ws.send(Message::text(text)).map_err(|e| e.to_string())
}

/// An HTTP answer: status and the start of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
}

impl HttpAnswer {
    /// The body's first line, as herald's refusals are.
    pub fn line(&self) -> String {
        one_line(&self.body)
    }
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// No connection to send it on (DNS, TCP, TLS).
    Connect(String),
    /// Sent, and the connection failed or closed before a whole answer head.
    Answer(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Connect(e) | HttpError::Answer(e) => f.write_str(e),
        }
    }
}

/// One request on its own connection (`Connection: close`), answered within `timeout`.
pub fn http_request(
    target: &Target,
    tls_config: Option<&Arc<ClientConfig>>,
    method: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<HttpAnswer, HttpError> {
    let mut stream = connect(target, tls_config, timeout).map_err(HttpError::Connect)?;
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: herald/{}\r\n",
        target.path,
        target.authority(),
        env!("CARGO_PKG_VERSION")
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream
        .write_all(&[head.as_bytes(), body].concat())
        .and_then(|()| stream.flush())
        .map_err(|e| HttpError::Answer(format!("sending the request: {e}")))?;
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut chunk = [0u8; 8192];
    while got.len() < MAX_HTTP_ANSWER && Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            // A TLS peer that closes without close_notify (HAProxy often does) has still
            // sent what it sent.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !got.is_empty() => break,
            Err(e) if got.is_empty() => {
                return Err(HttpError::Answer(format!("reading the answer: {e}")));
            }
            Err(_) => break,
        }
        if answer_complete(&got) {
            break;
        }
    }
    parse_answer(&got).map_err(HttpError::Answer)
}

/// Whether `got` holds a whole Content-Length-framed answer (so a server that keeps the
/// connection open anyway is not waited for).
fn answer_complete(got: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(got) {
        Ok(httparse::Status::Complete(head)) => response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| {
                std::str::from_utf8(h.value)
                    .ok()?
                    .trim()
                    .parse::<usize>()
                    .ok()
            })
            .is_some_and(|len| got.len() >= head + len),
        _ => false,
    }
}

/// Status and body of the bytes of an answer (chunked bodies joined).
pub fn parse_answer(got: &[u8]) -> Result<HttpAnswer, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(got) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if got.is_empty() => {
            return Err("the connection closed with no answer".into());
        }
        Ok(httparse::Status::Partial) => return Err("the answer ended mid-head".into()),
        Err(e) => return Err(format!("not an HTTP answer ({e})")),
    };
    let status = response.code.unwrap_or(0);
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let rest = &got[head..];
    let body = if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        dechunk(rest)
    } else {
        let len = header("content-length")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(rest.len());
        rest[..len.min(rest.len())].to_vec()
    };
    Ok(HttpAnswer {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A chunked body's data, as far as it goes.
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok());
        let Some(size) = size.filter(|&s| s > 0) else {
            break;
        };
        let start = eol + 2;
        let end = (start + size).min(rest.len());
        out.extend_from_slice(&rest[start..end]);
        rest = rest.get(end + 2..).unwrap_or_default();
    }
    out
}

/// The first line of `text`, trimmed and at most 200 characters, for a report.
pub fn one_line(text: &str) -> String {
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let line = line.trim();
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_port_path_and_origin() {
        let t = Target::parse("wss://push.example.com/ws", Kind::WebSocket).unwrap();
        assert_eq!(
            t,
            Target {
                tls: true,
                host: "push.example.com".into(),
                port: 443,
                path: "/ws".into()
            }
        );
        assert_eq!(t.origin(), "https://push.example.com");
        assert_eq!(
            t.with_path("/publish").http_url(),
            "https://push.example.com/publish"
        );
        let t = Target::parse("ws://127.0.0.1:8080/ws?token=x", Kind::WebSocket).unwrap();
        assert_eq!((t.port, t.path.as_str()), (8080, "/ws?token=x"));
        assert_eq!(t.origin(), "http://127.0.0.1:8080");
        let t = Target::parse("ws://[::1]:9000", Kind::WebSocket).unwrap();
        assert_eq!((t.host.as_str(), t.path.as_str()), ("::1", "/"));
        assert_eq!(t.ws_url(), "ws://[::1]:9000/");
        let t = Target::parse("http://10.0.0.5:8080/publish", Kind::Http).unwrap();
        assert_eq!((t.tls, t.port), (false, 8080));
        assert!(Target::parse("http://x/ws", Kind::WebSocket).is_err());
        assert!(Target::parse("ws://x/publish", Kind::Http).is_err());
        assert!(Target::parse("not a url", Kind::Http).is_err());
    }

    #[test]
    fn answers_are_parsed_with_any_framing() {
        let a = parse_answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nforbidden+extra")
            .unwrap();
        assert_eq!((a.status, a.body.as_str()), (403, "forbidden"));
        let a = parse_answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(a.body, "abcde");
        let a = parse_answer(b"HTTP/1.0 503 Service Unavailable\r\n\r\n<html>no server").unwrap();
        assert_eq!((a.status, a.line().as_str()), (503, "<html>no server"));
        assert!(parse_answer(b"").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nConte").is_err());
        assert!(answer_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        ));
        assert!(!answer_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok"
        ));
    }
}
