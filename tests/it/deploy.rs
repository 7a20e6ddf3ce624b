//! The deployment kit, tested as shipped: the real HAProxy, supervisord and
//! systemd-analyze read the files in `haproxy/`, `supervisor/` and `systemd/` unedited.
//! Ports and paths are chosen through the environment variables the files themselves
//! read. `scripts/test` installs the programs from Debian's packages.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;

use crate::util::{
    Client, Herald, HttpConn, close_code, eventually, free_port, next_json, require,
    spawn_supervisord, wait_exit,
};

/// The shipped supervisord.conf has one control socket path; one supervisord at a time.
static SUPERVISORD: Mutex<()> = Mutex::new(());

pub(crate) fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

pub(crate) fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A self-signed certificate for `localhost`: (certificate, certificate + key for HAProxy).
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    require("openssl", "openssl");
    let (cert, key, pem) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("site.pem"),
    );
    let o = run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]));
    assert!(o.status.success(), "{}", text(&o));
    let both = [std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap()].concat();
    std::fs::write(&pem, both).unwrap();
    (cert, pem)
}

// ---- the programs ------------------------------------------------------------------

pub(crate) struct HaProxy {
    child: Child,
    stats: SocketAddr,
}

impl HaProxy {
    pub(crate) fn start(env: &[(&str, String)]) -> HaProxy {
        HaProxy::start_with(&repo("haproxy/haproxy.cfg"), env)
    }

    /// HAProxy on another configuration (the shipped one, edited by a test).
    pub(crate) fn start_with(config: &Path, env: &[(&str, String)]) -> HaProxy {
        require("haproxy", "haproxy");
        let stats: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(config)
            .env("HERALD_STATS_BIND", stats.to_string())
            // This host's hard fd limit cannot hold the shipped 100000 (2 fds each).
            .env("HERALD_HAPROXY_MAXCONN", "4000")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let haproxy = HaProxy { child, stats };
        assert!(
            eventually(Duration::from_secs(10), || TcpStream::connect(stats)
                .is_ok()),
            "haproxy did not start"
        );
        haproxy
    }

    /// The `status` column of the stats CSV for herald's server: "UP", "DOWN", ...
    pub(crate) fn herald_status(&self) -> String {
        self.server_status("herald1")
    }

    fn server_status(&self, server: &str) -> String {
        // HTTP/1.0: the body ends with the connection (HAProxy would chunk a 1.1 answer).
        let Ok(mut stream) = TcpStream::connect(self.stats) else {
            return "unreachable".into();
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = String::new();
        if stream.write_all(b"GET /;csv HTTP/1.0\r\n\r\n").is_err()
            || stream.read_to_string(&mut answer).is_err()
        {
            return "unreachable".into();
        }
        let Some((head, body)) = answer.split_once("\r\n\r\n") else {
            return "unreachable".into();
        };
        let csv = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        let header: Vec<&str> = csv
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = header
            .iter()
            .position(|h| *h == "status")
            .expect("status column");
        csv.lines()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.len() > col && f[0] == "herald" && f[1] == server)
            .map(|f| f[col].to_string())
            .unwrap_or_default()
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Undo HTTP/1.1 chunked transfer coding: `<hex size>\r\n<data>\r\n` ... `0\r\n\r\n`.
pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
    out
}

/// The application's own web server: answers every request with `app`.
struct App {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl App {
    fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\napp\n",
                );
            }
        });
        App { addr, stop }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// supervisord with the shipped supervisord.conf (which includes herald.conf). Its own
/// log, pid file and child logs go to `dir` through supervisord's command-line flags.
struct Supervisord {
    child: Child,
    log: PathBuf,
}

impl Supervisord {
    /// supervisord with the shipped `config` (relative to the repository) and extra
    /// environment for the programs it starts.
    fn start(dir: &Path, config: &str, env: &[(&str, String)]) -> Supervisord {
        require("supervisord", "supervisor");
        require("supervisorctl", "supervisor");
        assert!(
            Path::new("/var/log/supervisor").is_dir(),
            "herald.conf logs to /var/log/supervisor (Debian's supervisor package creates it)"
        );
        let (child, log) = spawn_supervisord(&repo(config), dir, env);
        Supervisord { child, log }
    }

    fn ctl(&self, args: &[&str]) -> Output {
        run(Command::new("supervisorctl")
            .arg("-c")
            .arg(repo("supervisor/supervisord.conf"))
            .args(args))
    }

    fn herald_pid(&self) -> Option<u32> {
        self.pid_of("herald")
    }

    fn pid_of(&self, program: &str) -> Option<u32> {
        let o = self.ctl(&["pid", program]);
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .ok()
            .filter(|&p| p > 0)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Supervisord {
    fn drop(&mut self) {
        crate::util::signal(self.child.id(), libc::SIGTERM);
        if wait_exit(&mut self.child, Duration::from_secs(40)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn healthy(addr: SocketAddr) -> bool {
    let Ok(stream) = TcpStream::connect(addr) else {
        return false;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut conn = HttpConn::from_stream(stream);
    conn.send(b"GET /health HTTP/1.1\r\n\r\n");
    conn.try_response().is_ok_and(|r| r.status == 200)
}

/// Subscribe through the public frontend, retrying while HAProxy or herald come up.
pub(crate) fn subscribe_through(public: SocketAddr, topic: &str) -> Client {
    let start = Instant::now();
    loop {
        let attempt = TcpStream::connect(public).ok().and_then(|stream| {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let url = format!("ws://{public}/ws?topics={topic}");
            tungstenite::client::client(url.as_str(), stream)
                .ok()
                .map(|(ws, _)| ws)
        });
        if let Some(mut ws) = attempt
            && let Ok(tungstenite::Message::Text(t)) = ws.read()
            && t.as_str().contains("subscribed")
        {
            return ws;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "could not subscribe through HAProxy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn publish_to(herald: SocketAddr, topic: &str, data: &str) -> serde_json::Value {
    HttpConn::connect(herald).publish(topic, data)
}

// ---- the tests ---------------------------------------------------------------------

#[test]
fn haproxy_accepts_the_shipped_config_plain_and_with_tls() {
    require("haproxy", "haproxy");
    let o = run(Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(repo("haproxy/haproxy.cfg")));
    assert!(o.status.success(), "{}", text(&o));
    let dir = scratch_dir("haproxy-check");
    let (_, pem) = self_signed(&dir);
    let o = run(Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(repo("haproxy/haproxy.cfg"))
        .env("HERALD_TLS_CERT", &pem));
    assert!(o.status.success(), "{}", text(&o));
    // The check is real: a missing certificate is an error.
    let o = run(Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(repo("haproxy/haproxy.cfg"))
        .env("HERALD_TLS_CERT", dir.join("missing.pem")));
    assert!(!o.status.success());
}

#[test]
fn systemd_analyze_verifies_the_shipped_units() {
    require("systemd-analyze", "systemd");
    require("unshare", "util-linux");
    require("mount", "mount");
    // `verify` insists that ExecStart's /usr/local/bin/herald exists. Rather than install
    // into the host, bind-mount a directory holding this build over /usr/local/bin in a
    // private mount namespace. The templates are verified through instance names. A socket
    // unit is verified with the service it activates, found beside it.
    let dir = scratch_dir("systemd");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_herald"), dir.join("bin/herald")).unwrap();
    for (template, instance) in [
        ("herald@.service", "herald@8080.service"),
        ("herald@.socket", "herald@8080.socket"),
    ] {
        std::os::unix::fs::symlink(repo(&format!("systemd/{template}")), dir.join(instance))
            .unwrap();
    }
    let script = format!(
        "mount --bind {bin} /usr/local/bin && systemd-analyze verify {unit} {socket} {instance} {instance_socket}",
        bin = dir.join("bin").display(),
        unit = repo("systemd/herald.service").display(),
        socket = repo("systemd/herald.socket").display(),
        instance = dir.join("herald@8080.service").display(),
        instance_socket = dir.join("herald@8080.socket").display(),
    );
    let o = run(Command::new("unshare").args(["--mount", "sh", "-c", &script]));
    // verify exits 0 even for directives it ignores; a clean unit prints nothing.
    assert!(
        o.status.success() && text(&o).trim().is_empty(),
        "{}",
        text(&o)
    );
}

#[test]
fn sd_notify_says_ready_once_listening_and_stopping_on_sigterm() {
    use std::os::unix::net::UnixDatagram;
    let dir = scratch_dir("notify");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &socket_path);
    let herald = Herald::spawn(cmd);
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("READY=1");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready.contains(&format!("STATUS=listening on {}", herald.addr)),
        "{ready:?}"
    );
    herald.signal(libc::SIGTERM);
    let n = socket.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "STOPPING=1");
    let mut herald = herald;
    assert!(
        herald
            .wait(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
}

fn check(args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_herald")).args(args))
}

#[test]
fn check_reports_a_low_fd_limit_with_its_fixes() {
    require("prlimit", "util-linux");
    let o = run(Command::new("prlimit").args([
        "--nofile=512:512",
        "--",
        env!("CARGO_BIN_EXE_herald"),
        "check",
        "--connections",
        "1000",
    ]));
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("FAIL  open files: hard limit 512 for 1064 descriptors"),
        "{out}"
    );
    assert!(
        out.contains("LimitNOFILE=1064")
            && out.contains("minfds=1064")
            && out.contains("ulimit -Hn 1064"),
        "{out}"
    );
}

#[test]
fn check_catches_a_stopwaitsecs_shorter_than_the_drain() {
    let dir = scratch_dir("check-sup");
    let file = dir.join("herald.conf");
    std::fs::write(
        &file,
        "[program:herald]\ncommand=herald --drain-timeout 20\nstopwaitsecs=15\n",
    )
    .unwrap();
    let o = check(&[
        "--backlog",
        "128",
        "check",
        "--connections",
        "100",
        "--supervisor",
        file.to_str().unwrap(),
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("FAIL  stopwaitsecs 15 against herald's --drain-timeout 20"),
        "{out}"
    );
    assert!(out.contains("fix: stopwaitsecs=40"), "{out}");
}

#[test]
fn check_passes_against_the_shipped_files() {
    // 10,000 connections with a backlog of 1024 fit this host; the files must agree with
    // each other and with herald's defaults (drain 10 s, ping 25 s).
    let o = check(&[
        "--backlog",
        "1024",
        "check",
        "--connections",
        "10000",
        "--supervisor",
        repo("supervisor/supervisord.conf").to_str().unwrap(),
        "--systemd",
        repo("systemd/herald.service").to_str().unwrap(),
        "--haproxy",
        repo("haproxy/haproxy.cfg").to_str().unwrap(),
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for line in [
        "stopwaitsecs 30",
        "minfds 262144",
        "TimeoutStopSec 30s",
        "LimitNOFILE 1048576",
        "timeout tunnel 3600s",
        "maxconn 100000",
    ] {
        assert!(out.contains(line), "{line} not checked:\n{out}");
    }
    let o = check(&[
        "check",
        "--connections",
        "100",
        "--systemd",
        repo("systemd/herald@.service").to_str().unwrap(),
    ]);
    assert!(
        text(&o).contains("ok    TimeoutStopSec 30s"),
        "{}",
        text(&o)
    );
}

#[test]
fn supervisord_and_haproxy_run_herald_through_a_crash_and_a_deploy() {
    let _one_at_a_time = SUPERVISORD.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("e2e");
    let herald: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let app = App::start();
    let haproxy = HaProxy::start(&[
        ("HERALD_PUBLIC_BIND", public.to_string()),
        ("HERALD_BACKEND", herald.to_string()),
        ("HERALD_APP_BACKEND", app.addr.to_string()),
    ]);
    let sup = Supervisord::start(
        &dir,
        "supervisor/supervisord.conf",
        &[("HERALD_LISTEN", herald.to_string())],
    );
    assert!(
        eventually(Duration::from_secs(20), || healthy(herald)),
        "herald did not start under supervisord:\n{}",
        sup.log()
    );
    assert!(
        eventually(Duration::from_secs(10), || haproxy
            .herald_status()
            .starts_with("UP")),
        "HAProxy never saw herald up"
    );

    // Routing: WebSockets to herald, the rest to the app, herald's API refused.
    let mut ws = subscribe_through(public, "e2e");
    assert_eq!(publish_to(herald, "e2e", "\"hello\"")["delivered"], 1);
    assert_eq!(next_json(&mut ws)["data"], "hello");
    let page = HttpConn::connect(public).exchange(b"GET / HTTP/1.1\r\nHost: site\r\n\r\n");
    assert_eq!((page.status, page.text().as_str()), (200, "app\n"));
    let body = r#"{"topic":"e2e","data":"evil"}"#;
    let raw = format!(
        "POST /publish HTTP/1.1\r\nHost: site\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(
        HttpConn::connect(public).exchange(raw.as_bytes()).status,
        403
    );
    assert_eq!(
        HttpConn::connect(public)
            .exchange(b"GET /metrics HTTP/1.1\r\nHost: site\r\n\r\n")
            .status,
        403
    );
    assert_eq!(
        HttpConn::connect(public)
            .exchange(b"GET /history?topic=e2e HTTP/1.1\r\nHost: site\r\n\r\n")
            .status,
        403
    );
    // The browser client comes from herald itself, importable from any page.
    let client =
        HttpConn::connect(public).exchange(b"GET /herald.js HTTP/1.1\r\nHost: site\r\n\r\n");
    assert_eq!(client.status, 200);
    assert!(
        client.text().contains("export class Herald"),
        "not herald.js"
    );
    assert_eq!(client.header("Access-Control-Allow-Origin"), Some("*"));

    // Crash: kill -9, supervisord restarts it, clients reconnect and receive again.
    let first = sup.herald_pid().expect("herald pid");
    assert!(crate::util::signal(first, libc::SIGKILL));
    assert!(
        ws.read().is_err() || ws.read().is_err(),
        "the WebSocket outlived its server"
    );
    let restarted = eventually(Duration::from_secs(15), || {
        sup.herald_pid().is_some_and(|p| p != first) && healthy(herald)
    });
    assert!(
        restarted,
        "supervisord did not restart herald:\n{}",
        sup.log()
    );
    assert!(
        sup.log()
            .contains("exited: herald (terminated by SIGKILL; not expected)"),
        "{}",
        sup.log()
    );
    let mut ws = subscribe_through(public, "e2e");
    assert_eq!(publish_to(herald, "e2e", "\"again\"")["delivered"], 1);
    assert_eq!(next_json(&mut ws)["data"], "again");
    assert!(eventually(Duration::from_secs(10), || haproxy
        .herald_status()
        .starts_with("UP")));

    // Deploy: supervisorctl stop drains herald. A request caught mid-way keeps the drain
    // open long enough to watch HAProxy take the server out.
    let mut caught = HttpConn::connect(herald);
    caught.send(b"GET /health HTTP/1.1\r\nHost: t\r\n");
    std::thread::sleep(Duration::from_millis(100));
    let stopper = std::thread::spawn(|| {
        let start = Instant::now();
        let o = run(Command::new("supervisorctl")
            .arg("-c")
            .arg(repo("supervisor/supervisord.conf"))
            .args(["stop", "herald"]));
        (start.elapsed(), text(&o))
    });
    assert_eq!(close_code(&mut ws), CloseCode::Away);
    let marked_down = eventually(Duration::from_secs(8), || {
        haproxy.herald_status().starts_with("DOWN")
    });
    assert!(
        marked_down,
        "HAProxy did not mark herald down during the drain: {}",
        haproxy.herald_status()
    );
    caught.send(b"\r\n");
    let r = caught.response();
    assert_eq!(
        (r.status, r.text().as_str(), r.header("Connection")),
        (503, "draining\n", Some("close"))
    );
    drop(caught);
    let (took, said) = stopper.join().unwrap();
    assert!(said.contains("herald: stopped"), "{said}");
    assert!(
        took < Duration::from_secs(30),
        "stop took {took:?}: stopwaitsecs ran out"
    );
    let log = sup.log();
    let last_stop = log
        .lines()
        .rev()
        .find(|l| l.contains("stopped: herald"))
        .unwrap_or_default();
    assert!(
        last_stop.contains("(exit status 0)"),
        "herald was not left to exit on its own: {last_stop}\n{log}"
    );

    // And back: start, HAProxy sees it, clients reconnect.
    let o = sup.ctl(&["start", "herald"]);
    assert!(text(&o).contains("herald: started"), "{}", text(&o));
    assert!(eventually(Duration::from_secs(10), || haproxy
        .herald_status()
        .starts_with("UP")));
    let mut ws = subscribe_through(public, "e2e");
    assert_eq!(publish_to(herald, "e2e", "\"back\"")["delivered"], 1);
    assert_eq!(next_json(&mut ws)["data"], "back");
    drop(app);
}

/// A TLS client: `openssl s_client` does TLS (verifying our certificate) and the test
/// speaks WebSocket over its stdin and stdout.
struct TlsPipe {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

impl TlsPipe {
    fn connect(addr: SocketAddr, ca: &Path) -> TlsPipe {
        require("openssl", "openssl");
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &addr.to_string(),
                "-servername",
                "localhost",
            ])
            .args(["-verify_return_error", "-quiet", "-nocommands", "-CAfile"])
            .arg(ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_client");
        let (stdin, stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
        TlsPipe {
            child,
            stdin,
            stdout,
        }
    }
}

impl Read for TlsPipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stdout.read(buf)
    }
}

impl Write for TlsPipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stdin.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stdin.flush()
    }
}

impl Drop for TlsPipe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_tls_variant_carries_wss_to_herald() {
    let herald = Herald::start(&[]);
    let dir = scratch_dir("tls");
    let (cert, pem) = self_signed(&dir);
    let (public, tls) = (free_port(), free_port());
    let _haproxy = HaProxy::start(&[
        ("HERALD_PUBLIC_BIND", format!("127.0.0.1:{public}")),
        ("HERALD_TLS_BIND", format!("127.0.0.1:{tls}")),
        ("HERALD_TLS_CERT", pem.display().to_string()),
        ("HERALD_BACKEND", herald.addr.to_string()),
        ("HERALD_APP_BACKEND", "127.0.0.1:9".to_string()),
    ]);
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls}").parse().unwrap();
    assert!(eventually(Duration::from_secs(10), || TcpStream::connect(
        tls_addr
    )
    .is_ok()));
    let pipe = TlsPipe::connect(tls_addr, &cert);
    let (mut wss, response) = tungstenite::client::client("ws://localhost/ws?topics=secure", pipe)
        .expect("wss handshake through HAProxy");
    assert_eq!(response.status(), 101);
    assert_eq!(next_json(&mut wss)["op"], "subscribed");
    assert!(eventually(Duration::from_secs(5), || herald
        .metric("herald_websockets")
        == 1.0));
    assert_eq!(herald.publish("secure", "\"over tls\"")["delivered"], 1);
    assert_eq!(next_json(&mut wss)["data"], "over tls");
    // Plain HTTP on the public port is sent to HTTPS.
    let r = HttpConn::connect(format!("127.0.0.1:{public}").parse().unwrap())
        .exchange(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(r.status, 301);
    assert!(
        r.header("Location")
            .is_some_and(|l| l.starts_with("https://localhost"))
    );
}

#[test]
fn haproxy_balances_two_processes_that_share_topics_through_redis() {
    let _one_at_a_time = SUPERVISORD.lock().unwrap_or_else(|e| e.into_inner());
    let redis = crate::redis::RedisServer::start();
    let dir = scratch_dir("e2e-redis");
    // Process N listens on base + N.
    let base = crate::util::free_ports(3);
    let (one, two): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{}", base + 1).parse().unwrap(),
        format!("127.0.0.1:{}", base + 2).parse().unwrap(),
    );
    let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let app = App::start();
    let haproxy = HaProxy::start(&[
        ("HERALD_PUBLIC_BIND", public.to_string()),
        ("HERALD_BACKEND", one.to_string()),
        ("HERALD_BACKEND2", two.to_string()),
        ("HERALD_APP_BACKEND", app.addr.to_string()),
    ]);
    // The multi-process form of the kit: supervisord-redis.conf runs herald-redis.conf.
    let sup = Supervisord::start(
        &dir,
        "supervisor/supervisord-redis.conf",
        &[
            ("HERALD_PORT_BASE", base.to_string()),
            ("HERALD_REDIS", redis.url()),
        ],
    );
    assert!(
        eventually(Duration::from_secs(20), || healthy(one) && healthy(two)),
        "{}",
        sup.log()
    );
    let both_up = || {
        haproxy.server_status("herald1").starts_with("UP")
            && haproxy.server_status("herald2").starts_with("UP")
    };
    // Two passed checks a second apart bring a server up; a loaded machine (the whole
    // suite at once) can make herald's /health or HAProxy's checks slow, so allow time,
    // and say what HAProxy and herald said if it never happens.
    assert!(
        eventually(Duration::from_secs(30), both_up),
        "HAProxy does not see both processes: herald1 {:?} (health {}), herald2 {:?} \
         (health {})\n{}",
        haproxy.server_status("herald1"),
        healthy(one),
        haproxy.server_status("herald2"),
        healthy(two),
        sup.log()
    );

    // leastconn spreads the clients over both processes.
    let mut clients: Vec<Client> = (0..6).map(|_| subscribe_through(public, "multi")).collect();
    let websockets = |addr: SocketAddr| {
        let mut conn = HttpConn::connect(addr);
        crate::util::parse_metrics(&conn.exchange(b"GET /metrics HTTP/1.1\r\n\r\n").text())["herald_websockets"]
    };
    assert!(
        websockets(one) > 0.0 && websockets(two) > 0.0,
        "{} / {}",
        websockets(one),
        websockets(two)
    );
    for (n, (addr, data)) in [(one, "\"to one\""), (two, "\"to two\"")]
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            publish_to(addr, "multi", data)["delivered"],
            2,
            "both processes receive it"
        );
        for ws in clients.iter_mut() {
            let m = next_json(ws);
            assert_eq!(
                (m["id"].as_u64(), m["data"].as_str()),
                (Some(n as u64 + 1), Some(data.trim_matches('"')))
            );
        }
    }

    // Kill one process: its clients lose their connection and come back through HAProxy.
    let victim = sup
        .pid_of("herald-redis:herald-1")
        .expect("pid of process 1");
    assert!(crate::util::signal(victim, libc::SIGKILL));
    // Redis may not have noticed the dead process's subscription yet: it can count 1 or 2.
    let after = publish_to(two, "multi", "\"after\"");
    assert!(
        after["delivered"].as_u64().is_some_and(|d| d >= 1),
        "{after}"
    );
    let mut lost = 0;
    for ws in clients.iter_mut() {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => assert!(t.as_str().contains("after"), "{t}"),
            _ => {
                lost += 1;
                *ws = subscribe_through(public, "multi");
            }
        }
    }
    assert!(lost > 0, "no client was on the killed process");
    let reply = publish_to(two, "multi", "\"flowing\"");
    assert!(
        reply["delivered"].as_u64().is_some_and(|d| d >= 1),
        "{reply}"
    );
    for ws in clients.iter_mut() {
        assert_eq!(next_json(ws)["data"], "flowing");
    }
    // supervisord brought the killed process back. (Waiting for RUNNING also keeps the
    // teardown's SIGTERM out of the fork-to-exec window of a fresh respawn, where
    // supervisord's own handler, still in the child, would swallow it.)
    let running = || {
        String::from_utf8_lossy(&sup.ctl(&["status", "herald-redis:herald-1"]).stdout)
            .contains("RUNNING")
    };
    assert!(
        eventually(Duration::from_secs(10), || running() && healthy(one)),
        "{}",
        sup.log()
    );
    drop(app);
}

/// Issue 17: `supervisorctl signal USR2 herald` upgrades in place: the shipped config,
/// the same PID RUNNING, the WebSocket still open and served by the new binary.
#[test]
fn supervisorctl_signal_usr2_upgrades_herald_in_place() {
    let _one_at_a_time = SUPERVISORD.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("usr2");
    let herald: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let sup = Supervisord::start(
        &dir,
        "supervisor/supervisord.conf",
        &[("HERALD_LISTEN", herald.to_string())],
    );
    assert!(
        eventually(Duration::from_secs(20), || healthy(herald)),
        "herald did not start under supervisord:\n{}",
        sup.log()
    );
    // Past startsecs: supervisord counts it as started.
    let running = || text(&sup.ctl(&["status", "herald"])).contains("RUNNING");
    assert!(
        eventually(Duration::from_secs(10), running),
        "{}",
        sup.log()
    );
    let pid = sup.herald_pid().expect("supervisord knows herald's pid");
    let url = format!("ws://{herald}/ws?topics=usr2");
    let stream = TcpStream::connect(herald).unwrap();
    stream.set_read_timeout(Some(crate::util::TIMEOUT)).unwrap();
    let (mut ws, _) = tungstenite::client::client(url.as_str(), stream).expect("handshake");
    assert_eq!(next_json(&mut ws)["op"], "subscribed");
    let signalled = sup.ctl(&["signal", "USR2", "herald"]);
    assert!(signalled.status.success(), "{}", text(&signalled));
    let carried = || {
        let mut conn = HttpConn::connect(herald);
        let m = crate::util::parse_metrics(
            &conn
                .exchange(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
                .text(),
        );
        m.get("herald_upgrades_total{result=\"carried\"}") == Some(&1.0)
    };
    assert!(
        eventually(Duration::from_secs(20), carried),
        "no upgrade:\n{}",
        sup.log()
    );
    assert_eq!(sup.herald_pid(), Some(pid));
    let status = text(&sup.ctl(&["status", "herald"]));
    assert!(
        status.contains("RUNNING") && status.contains(&format!("pid {pid}")),
        "{status}"
    );
    assert_eq!(publish_to(herald, "usr2", "\"after\"")["delivered"], 1);
    let m = next_json(&mut ws);
    assert_eq!(
        (m["op"].as_str(), m["data"].as_str()),
        (Some("message"), Some("after"))
    );
}
