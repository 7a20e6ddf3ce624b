//! Test harness: start the real `herald` binary on an ephemeral loopback port, talk to it
//! with a real WebSocket client (tungstenite) and raw HTTP/1.1 over TCP, read its log and
//! its /metrics. Every wait is bounded.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub type Client = WebSocket<TcpStream>;

pub struct Herald {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Herald {
    /// `herald --listen 127.0.0.1:0 ARGS...`
    pub fn start(args: &[&str]) -> Herald {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(["--listen", "127.0.0.1:0"]).args(args);
        Herald::spawn(cmd)
    }

    /// Run a prepared command (e.g. under `prlimit`); it must log "listening on ADDR".
    pub fn spawn(mut cmd: Command) -> Herald {
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start herald");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match rx.recv_timeout(TIMEOUT) {
            Ok(addr) => addr.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!("herald did not start:\n{}", log.lock().unwrap());
            }
        };
        Herald { child, addr, log }
    }

    /// The exit status, if the process has ended (it should not have).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Open a WebSocket on `path` (e.g. "/ws?topics=a").
    pub fn ws(&self, path: &str) -> Client {
        let stream = TcpStream::connect(self.addr).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let url = format!("ws://{}{}", self.addr, path);
        let (ws, response) = tungstenite::client::client(url.as_str(), stream).expect("handshake");
        assert_eq!(response.status(), 101);
        ws
    }

    /// Open `/ws?topics=TOPIC` and consume the `subscribed` confirmation.
    pub fn subscriber(&self, topic: &str) -> Client {
        let mut ws = self.ws(&format!("/ws?topics={topic}"));
        let reply = next_json(&mut ws);
        assert_eq!(reply["op"], "subscribed", "{reply}");
        assert_eq!(reply["topic"], topic);
        ws
    }

    pub fn http(&self) -> HttpConn {
        HttpConn::connect(self.addr)
    }

    /// One request on a fresh connection.
    pub fn request(&self, raw: &str) -> HttpResponse {
        let mut conn = self.http();
        conn.send(raw.as_bytes());
        conn.response()
    }

    /// POST /publish on a fresh connection; returns the parsed reply.
    pub fn publish(&self, topic: &str, data: &str) -> Value {
        self.http().publish(topic, data)
    }

    /// Current /metrics as name{labels} → value.
    pub fn metrics(&self) -> HashMap<String, f64> {
        let r = self.request("GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(r.status, 200);
        parse_metrics(&r.text())
    }

    pub fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    /// Send `sig` to this herald.
    pub fn signal(&self, sig: i32) {
        assert!(
            signal(self.child.id(), sig),
            "herald {} is gone",
            self.child.id()
        );
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(TIMEOUT + TIMEOUT).expect("herald did not exit")
    }

    /// Wait up to `limit` for the process to exit.
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_exit(&mut self.child, limit)
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// kill(2) `pid` with `sig`; false if there is no such process. Tests only signal
/// processes they (or a supervisor they started) spawned.
pub fn signal(pid: u32, sig: i32) -> bool {
    // SAFETY: kill(2) takes plain integers and has no memory effects.
    unsafe { libc::kill(pid as i32, sig) == 0 }
}

pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Next text message, parsed as JSON (pings and pongs are skipped).
pub fn next_json<S: Read + Write>(ws: &mut WebSocket<S>) -> Value {
    loop {
        match ws.read().expect("read message") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

pub fn send_json(ws: &mut Client, value: Value) {
    ws.send(Message::text(value.to_string())).expect("send");
}

/// Read until the server's close frame; return its code.
pub fn close_code(ws: &mut Client) -> CloseCode {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => return frame.code,
            Ok(Message::Close(None)) => panic!("close without a code"),
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

/// A raw HTTP/1.1 client connection: what is sent is exactly what the test wrote.
pub struct HttpConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> HttpConn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        HttpConn::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> HttpConn {
        HttpConn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).expect("send");
    }

    /// Send one request and read its response.
    pub fn exchange(&mut self, raw: &[u8]) -> HttpResponse {
        self.send(raw);
        self.response()
    }

    pub fn publish(&mut self, topic: &str, data: &str) -> Value {
        let body = format!(r#"{{"topic":"{topic}","data":{data}}}"#);
        let raw = format!(
            "POST /publish HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.send(raw.as_bytes());
        let r = self.response();
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// The response head at the front of the buffer (body still empty) and its length in
    /// bytes. The head stays in the buffer.
    fn read_head(&mut self) -> std::io::Result<(HttpResponse, usize)> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok((
            HttpResponse {
                status,
                headers,
                body: Vec::new(),
            },
            head_end,
        ))
    }

    /// Read one response (Content-Length framed).
    pub fn response(&mut self) -> HttpResponse {
        match self.try_response() {
            Ok(r) => r,
            Err(e) => panic!(
                "reading a response: {e}; have {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Read one response, or the error that ended the connection first.
    pub fn try_response(&mut self) -> std::io::Result<HttpResponse> {
        let (
            HttpResponse {
                status, headers, ..
            },
            head_end,
        ) = self.read_head()?;
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().expect("content-length"));
        while self.buf.len() < head_end + len {
            self.fill()?;
        }
        let body = self.buf[head_end..head_end + len].to_vec();
        self.buf.drain(..head_end + len);
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }

    /// True if the server closed the connection (EOF) with nothing more to read.
    pub fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        self.buf.is_empty() && matches!(self.stream.read(&mut byte), Ok(0) | Err(_))
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

impl HttpConn {
    /// Read the head of a response to HEAD (no body follows, whatever its length says).
    pub fn response_head_only(&mut self) -> u16 {
        let (head, head_end) = self.read_head().expect("read response head");
        self.buf.drain(..head_end);
        head.status
    }
}

/// A WebSocket opened by hand, for sending bytes no well-behaved client would: returns
/// the stream right after the 101 head.
pub fn raw_ws(addr: SocketAddr, path: &str) -> TcpStream {
    raw_ws_on(TcpStream::connect(addr).expect("connect"), path)
}

/// `raw_ws` on a stream connected already (with its own socket options, say).
pub fn raw_ws_on(stream: TcpStream, path: &str) -> TcpStream {
    raw_ws_with(stream, path, "").0
}

/// `raw_ws_on` with more request headers (each ending in CRLF); returns the 101's head
/// too.
pub fn raw_ws_with(mut stream: TcpStream, path: &str, headers: &str) -> (TcpStream, String) {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         {headers}\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("101 head");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    (stream, String::from_utf8_lossy(&head).into_owned())
}

/// A client frame: `first` is FIN/RSV/opcode, the payload is masked.
pub fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0xa1, 0x5b, 0x03, 0xe7];
    let mut out = vec![first];
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
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// One server frame: (first byte, payload), or `None` at EOF.
pub fn read_raw_frame(stream: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).ok()?;
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).ok()?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).ok()?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).ok()?;
    Some((head[0], payload))
}

/// Read server frames until a close frame; its code, or `None` if the stream ended.
pub fn raw_close_code(stream: &mut TcpStream) -> Option<u16> {
    loop {
        let (first, payload) = read_raw_frame(stream)?;
        if first & 0x0f == 0x8 {
            return Some(u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

/// Poll a condition for up to `limit`.
pub fn eventually(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    ok()
}

/// `n` consecutive loopback ports nothing listens on, for servers a test starts later;
/// returns the first. They are chosen below the kernel's ephemeral range: a port from
/// inside it could be taken, between this check and the server's bind, as the source
/// port of some outgoing connection (the tests make thousands). Each call hands out new
/// ports, so concurrent tests never get the same ones.
pub fn free_ports(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const LOW: u16 = 10_000;
    let high: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    let span = high.saturating_sub(LOW).max(n + 1);
    // Start somewhere different in each test process.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        (std::process::id() % u32::from(span)) as u16 + 1,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(n, Ordering::SeqCst) % (span - n);
        let base = LOW + offset;
        if (base..base + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} free loopback ports between {LOW} and {high}");
}

pub fn free_port() -> u16 {
    free_ports(1)
}

/// Fail at once, in one line naming the Debian package, if `program` is not on PATH
/// (`scripts/test` installs the packages before it builds; this covers a bare
/// `cargo test`). Call it before spawning `program`.
pub fn require(program: &str, package: &str) {
    use std::os::unix::fs::PermissionsExt;
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    assert!(
        found,
        "{program} is not installed (not on PATH): install the Debian package {package} \
         (scripts/test installs it)"
    );
}

/// Debian's own Python, which imports Debian's `python3-*` packages whatever `python3`
/// comes first on PATH (a pyenv shim, a virtualenv).
pub const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// Fail at once, naming the Debian package, if Debian's Python cannot import `module`
/// (`scripts/test` installs it).
pub fn require_python_module(module: &str, package: &str) {
    let imported = Command::new(DEBIAN_PYTHON)
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        imported,
        "{DEBIAN_PYTHON} cannot import {module}: install the Debian package {package} \
         (scripts/test installs it)"
    );
}

/// A `subscribed` reply with its position checked and taken out: `epoch` a non-empty
/// string and `id` a number. What remains is compared by the caller.
pub fn without_position(mut reply: serde_json::Value) -> serde_json::Value {
    let epoch = reply["epoch"].as_str().unwrap_or_default().to_string();
    assert!(!epoch.is_empty(), "no epoch in {reply}");
    assert!(reply["id"].is_u64(), "no id in {reply}");
    let map = reply.as_object_mut().expect("a JSON object");
    map.remove("epoch");
    map.remove("id");
    reply
}

/// supervisord in the foreground with configuration `conf`, its own log, pid file and
/// child logs in `dir`, herald's build directory first on the children's PATH, and `env`
/// for the programs it starts. Returns the process and its log's path.
pub fn spawn_supervisord(
    conf: &std::path::Path,
    dir: &std::path::Path,
    env: &[(&str, String)],
) -> (Child, std::path::PathBuf) {
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_herald"))
        .parent()
        .expect("the herald binary has a directory");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = dir.join("supervisord.log");
    let child = Command::new("supervisord")
        .arg("--nodaemon")
        .arg("-c")
        .arg(conf)
        .arg("--logfile")
        .arg(&log)
        .arg("--pidfile")
        .arg(dir.join("supervisord.pid"))
        .arg("--childlogdir")
        .arg(dir)
        // The shipped minfds (262144) exceeds this host's hard fd limit (20000), and
        // supervisord refuses to start below its minfds.
        .args(["--minfds", "8192"])
        .env("PATH", path)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start supervisord");
    (child, log)
}
