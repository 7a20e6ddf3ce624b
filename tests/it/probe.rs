//! The operator's probes, run as an operator would: `herald check --live` through the
//! shipped HAProxy kit (plain, TLS, and with a `timeout tunnel` shorter than herald's ping
//! interval), and pointed at herald itself, whose API must not be public; `herald tail`
//! printing messages and the close, and `--follow` resuming across a restart.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::deploy::{HaProxy, repo, scratch_dir};
use crate::util::{Herald, eventually, free_port, require, wait_exit};

/// herald's ping interval in these tests: short, so a check waits seconds, not 25.
const PING: &str = "3";
/// The longest one `check --live` may run here: its steps, the ping's wait (3 s plus
/// grace), the public paths, on a loaded machine.
const CHECK_LIMIT: Duration = Duration::from_secs(90);

/// `herald check --live ARGS...`, bounded in time.
fn check_live(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["check", "--live"])
        .args(args)
        .env_remove("HERALD_API_KEY")
        .env_remove("HERALD_PING_INTERVAL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start herald check --live");
    if wait_exit(&mut child, CHECK_LIMIT).is_none() {
        let _ = child.kill();
        panic!("herald check --live ran past {CHECK_LIMIT:?}");
    }
    let o = child.wait_with_output().expect("check's output");
    // Shown with --nocapture: what an operator would read.
    eprintln!("{}", report(&o));
    o
}

fn report(o: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The report's line for `step`, which must be there.
fn line<'a>(out: &'a str, step: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(step))
        .unwrap_or_else(|| panic!("no line for {step} in:\n{out}"))
}

fn assert_ok(out: &str, step: &str) {
    let l = line(out, step);
    assert!(l.trim_start().starts_with("ok"), "{step} failed:\n{out}");
}

fn assert_fail(out: &str, step: &str) {
    let l = line(out, step);
    assert!(l.trim_start().starts_with("FAIL"), "{step} passed:\n{out}");
}

/// Every step of the chain passed with a measured latency.
fn assert_chain_ok(out: &str, steps: &[&str]) {
    for step in steps {
        assert_ok(out, step);
        let l = line(out, step);
        assert!(
            l.contains(" ms") || l.contains(" s "),
            "{step} has no latency: {l}"
        );
    }
}

const CHAIN: &[&str] = &["dns", "tcp", "upgrade", "subscribe", "publish", "deliver"];

/// A private CA and a certificate for `localhost` it signed, as a company's internal CA
/// issues them: (the CA's certificate, certificate + key for HAProxy). WebPKI, as
/// browsers, takes no CA certificate as a server's own, so the plain `openssl req -x509`
/// certificate (CA:TRUE) will not do.
fn private_ca(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    require("openssl", "openssl");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let openssl = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(o.status.success(), "openssl {args:?}: {}", report(&o));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=herald test CA",
        "-keyout",
        &path("ca.key"),
        "-out",
        &path("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &path("leaf.key"),
        "-out",
        &path("leaf.csr"),
    ]);
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=DNS:localhost\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path("leaf.csr"),
        "-CA",
        &path("ca.pem"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &path("leaf.ext"),
        "-out",
        &path("leaf.pem"),
    ]);
    let both = [
        std::fs::read(dir.join("leaf.pem")).unwrap(),
        std::fs::read(dir.join("leaf.key")).unwrap(),
    ]
    .concat();
    std::fs::write(dir.join("site.pem"), both).unwrap();
    (dir.join("ca.pem"), dir.join("site.pem"))
}

/// herald behind HAProxy running `config`: the public port, and with TLS its port and
/// the CA certificate to trust.
struct Kit {
    herald: Herald,
    _haproxy: HaProxy,
    public: u16,
    tls: Option<(u16, std::path::PathBuf)>,
}

fn kit(config: &Path, tls: bool, name: &str) -> Kit {
    let herald = Herald::start(&["--ping-interval", PING]);
    let public = free_port();
    let mut env = vec![
        ("HERALD_PUBLIC_BIND", format!("127.0.0.1:{public}")),
        ("HERALD_BACKEND", herald.addr.to_string()),
        // No application behind the site: its paths answer 503.
        ("HERALD_APP_BACKEND", "127.0.0.1:9".to_string()),
    ];
    let mut tls_port = None;
    if tls {
        let dir = scratch_dir(name);
        let (cert, pem) = private_ca(&dir);
        let port = free_port();
        env.push(("HERALD_TLS_BIND", format!("127.0.0.1:{port}")));
        env.push(("HERALD_TLS_CERT", pem.display().to_string()));
        tls_port = Some((port, cert));
    }
    let haproxy = HaProxy::start_with(config, &env);
    assert!(
        eventually(Duration::from_secs(20), || haproxy
            .herald_status()
            .starts_with("UP")),
        "HAProxy never saw herald up: {}",
        haproxy.herald_status()
    );
    Kit {
        herald,
        _haproxy: haproxy,
        public,
        tls: tls_port,
    }
}

impl Kit {
    fn publish_url(&self) -> String {
        format!("http://{}/publish", self.herald.addr)
    }
}

#[test]
fn check_live_passes_through_the_shipped_haproxy() {
    let kit = kit(&repo("haproxy/haproxy.cfg"), false, "live-plain");
    let before = kit.herald.metric("herald_messages_published_total");
    let o = check_live(&[
        &format!("ws://127.0.0.1:{}/ws", kit.public),
        "--publish",
        &kit.publish_url(),
        "--ping-interval",
        PING,
    ]);
    let out = report(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_chain_ok(&out, CHAIN);
    assert_ok(&out, "ping");
    for path in ["/publish", "/metrics", "/history"] {
        assert_ok(&out, path);
        assert!(line(&out, path).contains("403"), "{out}");
    }
    assert!(out.contains("all 10 checks passed"), "{out}");
    // The probe really went through herald.
    assert!(kit.herald.metric("herald_messages_published_total") > before);
}

#[test]
fn check_live_passes_over_tls_and_fails_on_an_untrusted_certificate() {
    let kit = kit(&repo("haproxy/haproxy.cfg"), true, "live-tls");
    let (port, cert) = kit.tls.clone().expect("TLS listener");
    let url = format!("wss://localhost:{port}/ws");
    let publish = kit.publish_url();
    let o = check_live(&[
        &url,
        "--publish",
        &publish,
        "--ping-interval",
        PING,
        "--ca-file",
        cert.to_str().unwrap(),
    ]);
    let out = report(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_chain_ok(&out, CHAIN);
    assert_chain_ok(&out, &["tls"]);
    assert!(line(&out, "tls").contains("http/1.1"), "{out}");
    assert_ok(&out, "ping");
    // The public origin of a wss:// URL is https://, where the API is refused too.
    for path in ["/publish", "/metrics", "/history"] {
        assert!(
            line(&out, path).contains(&format!("https://localhost:{port}: 403")),
            "{out}"
        );
    }
    assert!(out.contains("all 11 checks passed"), "{out}");

    // tail over the same wss://.
    let tail = Tail::start(&[&url, "secure", "--ca-file", cert.to_str().unwrap()]);
    tail.await_stderr("subscribed secure", 1);
    assert_eq!(
        kit.herald.publish("secure", r#""over tls""#)["delivered"],
        1
    );
    tail.await_messages(1);
    assert_eq!(tail.messages()[0]["data"], "over tls");
    drop(tail);

    // Without the certificate to trust, TLS fails and says how to fix it.
    let o = check_live(&[&url, "--publish", &publish, "--ping-interval", PING]);
    let out = report(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert_fail(&out, "tls");
    assert!(out.contains("--ca-file"), "{out}");
    assert!(
        !out.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("upgrade")),
        "the chain went on past a failed TLS:\n{out}"
    );
}

#[test]
fn check_live_fails_when_the_tunnel_timeout_is_shorter_than_the_ping_interval() {
    let shipped = std::fs::read_to_string(repo("haproxy/haproxy.cfg")).unwrap();
    let wrong = "    timeout tunnel 2s\n";
    let edited = shipped.replacen("    timeout tunnel 1h\n", wrong, 1);
    assert!(
        edited.contains(wrong),
        "the shipped haproxy.cfg no longer says `timeout tunnel 1h`"
    );
    let dir = scratch_dir("live-tunnel");
    let config = dir.join("haproxy.cfg");
    std::fs::write(&config, edited).unwrap();
    let kit = kit(&config, false, "live-tunnel");
    let o = check_live(&[
        &format!("ws://127.0.0.1:{}/ws", kit.public),
        "--publish",
        &kit.publish_url(),
        "--ping-interval",
        PING,
    ]);
    let out = report(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    // Everything else works: only the ping fails, and it names the cause.
    assert_chain_ok(&out, CHAIN);
    assert_fail(&out, "ping");
    assert!(line(&out, "ping").contains("cut after"), "{out}");
    assert!(out.contains("timeout tunnel"), "{out}");
    assert!(out.contains("1 of 10 checks failed"), "{out}");
}

#[test]
fn check_live_fails_when_herald_api_answers_on_the_public_url() {
    // No proxy: the "public" URL is herald itself, whose API answers anyone there. With
    // a key, /publish refuses the probe's keyless request, but as herald does: exposed.
    let herald = Herald::start(&["--ping-interval", PING, "--api-key", "sesame"]);
    let o = check_live(&[
        &format!("ws://{}/ws", herald.addr),
        "--publish",
        &format!("http://{}/publish", herald.addr),
        "--ping-interval",
        PING,
        "--api-key",
        "sesame",
    ]);
    let out = report(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert_chain_ok(&out, CHAIN);
    assert_ok(&out, "ping");
    assert_fail(&out, "/publish");
    assert!(line(&out, "/publish").contains("401"), "{out}");
    assert_fail(&out, "/metrics");
    assert!(line(&out, "/metrics").contains("200"), "{out}");
    assert!(out.contains("http-request deny"), "{out}");

    // And the publish step itself fails, naming the key, when the key is wrong.
    let o = check_live(&[
        &format!("ws://{}/ws", herald.addr),
        "--publish",
        &format!("http://{}/publish", herald.addr),
        "--ping-interval",
        PING,
        "--api-key",
        "wrong",
    ]);
    let out = report(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert_fail(&out, "publish");
    assert!(out.contains("--api-key"), "{out}");
}

// ---- herald tail ---------------------------------------------------------------------

/// A running `herald tail`, its stdout and stderr gathered line by line.
struct Tail {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    exited: Option<std::process::ExitStatus>,
}

fn gather(pipe: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

impl Tail {
    fn start(args: &[&str]) -> Tail {
        let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("tail")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start herald tail");
        let stdout = gather(child.stdout.take().unwrap());
        let stderr = gather(child.stderr.take().unwrap());
        Tail {
            child,
            stdout,
            stderr,
            exited: None,
        }
    }

    fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// stdout's lines, each parsed as JSON (each must be).
    fn json(&self) -> Vec<Value> {
        self.stdout()
            .iter()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON line: {l}: {e}"))
            })
            .collect()
    }

    fn messages(&self) -> Vec<Value> {
        self.json()
            .into_iter()
            .filter(|v| v["op"] == "message")
            .collect()
    }

    /// Wait until stderr has said `text` `n` times.
    fn await_stderr(&self, text: &str, n: usize) {
        assert!(
            eventually(Duration::from_secs(30), || self
                .stderr()
                .matches(text)
                .count()
                >= n),
            "tail never said {text:?} {n} times:\n{}",
            self.stderr()
        );
    }

    fn await_messages(&self, n: usize) {
        assert!(
            eventually(Duration::from_secs(30), || self.messages().len() >= n),
            "tail printed {} of {n} messages:\n{}\nstderr:\n{}",
            self.messages().len(),
            self.stdout().join("\n"),
            self.stderr()
        );
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// herald on a port of our choosing, so a second one can take it after the first.
fn herald_on(port: u16, args: &[&str]) -> Herald {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(args);
    Herald::spawn(cmd)
}

/// POST a raw body to /publish; the reply.
fn publish_raw(herald: &Herald, body: &str) -> Value {
    let raw = format!(
        "POST /publish HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = herald.request(&raw);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn tail_prints_one_json_line_per_message_and_the_close() {
    let herald = Herald::start(&["--drain-spread", "0"]);
    let mut tail = Tail::start(&[&format!("ws://{}/ws", herald.addr), "news", "alerts"]);
    tail.await_stderr("subscribed news", 1);
    tail.await_stderr("subscribed alerts", 1);
    herald.publish("news", r#""first""#);
    // Data written over several lines, as a publisher may, still prints as one line.
    publish_raw(
        &herald,
        "{\"topic\":\"alerts\",\"data\":{\n  \"level\": \"high\"\n}}",
    );
    herald.publish("news", r#"{"n":2}"#);
    tail.await_messages(3);
    let status = herald.terminate();
    assert!(status.success(), "{status:?}");
    let exit = wait_exit(&mut tail.child, Duration::from_secs(30)).expect("tail exited");
    tail.exited = Some(exit);
    assert_eq!(exit.code(), Some(0), "stderr:\n{}", tail.stderr());

    let lines = tail.json();
    assert_eq!(lines.len(), 4, "{lines:?}");
    let brief: Vec<(String, u64)> = lines[..3]
        .iter()
        .map(|v| {
            assert_eq!(v["op"], "message", "{v}");
            (
                v["topic"].as_str().unwrap().to_string(),
                v["id"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        brief,
        [("news".into(), 1), ("alerts".into(), 1), ("news".into(), 2)]
    );
    assert_eq!(lines[0]["data"], "first");
    assert_eq!(lines[1]["data"]["level"], "high");
    // The close frame ends it: 1001, herald going away.
    assert_eq!(lines[3]["op"], "close");
    assert_eq!(lines[3]["code"], 1001);
    assert_eq!(lines[3]["reason"], "server shutting down");
    assert!(
        tail.stderr().contains("reconnect after"),
        "{}",
        tail.stderr()
    );
}

#[test]
fn tail_follow_gets_every_id_once_across_a_restart() {
    let port = free_port();
    let dir = scratch_dir("tail-follow");
    let state = dir.to_str().unwrap();
    // The hint keeps tail away for 3 s: long enough to publish to the new process
    // before tail is back, so those messages can only come by the resume.
    let args = [
        "--state-dir",
        state,
        "--drain-spread",
        "0",
        "--reconnect-jitter",
        "3000-3000",
    ];
    let old = herald_on(port, &args);
    let url = format!("ws://127.0.0.1:{port}/ws");
    let tail = Tail::start(&["--follow", &url, "feed"]);
    tail.await_stderr("subscribed feed", 1);
    for n in 1..=5 {
        assert_eq!(old.publish("feed", &n.to_string())["delivered"], 1);
    }
    tail.await_messages(5);

    let restart = Instant::now();
    assert!(old.terminate().success());
    let new = herald_on(port, &args);
    for n in 6..=10 {
        let reply = new.publish("feed", &n.to_string());
        assert_eq!(
            reply["id"], n,
            "history did not survive the restart: {reply}"
        );
        assert_eq!(
            reply["delivered"],
            0,
            "tail was back {:?} after the restart, before the publishes it should have \
             missed",
            restart.elapsed()
        );
    }
    tail.await_stderr("recovered", 1);
    for n in 11..=12 {
        assert_eq!(new.publish("feed", &n.to_string())["delivered"], 1);
    }
    tail.await_messages(12);
    // Anything late or doubled would show up here.
    std::thread::sleep(Duration::from_millis(500));

    let ids: Vec<u64> = tail
        .messages()
        .iter()
        .map(|v| v["id"].as_u64().expect("an id"))
        .collect();
    assert_eq!(ids, (1..=12).collect::<Vec<u64>>(), "{}", tail.stderr());
    let data: Vec<u64> = tail
        .messages()
        .iter()
        .map(|v| v["data"].as_u64().expect("data"))
        .collect();
    assert_eq!(data, ids);
    // Between the two connections, herald's close.
    let closes: Vec<Value> = tail
        .json()
        .into_iter()
        .filter(|v| v["op"] == "close")
        .collect();
    assert_eq!(closes.len(), 1, "{closes:?}");
    assert_eq!(closes[0]["code"], 1001);
    let stderr = tail.stderr();
    assert!(stderr.contains("the server's hint"), "{stderr}");
    assert!(!stderr.contains("not recovered"), "{stderr}");
}

#[test]
fn tail_keeps_a_quiet_connection_with_its_own_pings() {
    // herald would ping only after a minute; tail pings after 1 s of silence, and its
    // pongs must count as news, or it would call the connection lost after 2 s.
    let herald = Herald::start(&["--ping-interval", "60"]);
    let tail = Tail::start(&[
        "--follow",
        "--keepalive",
        "1",
        &format!("ws://{}/ws", herald.addr),
        "quiet",
    ]);
    tail.await_stderr("subscribed quiet", 1);
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(
        herald.publish("quiet", "1")["delivered"],
        1,
        "{}",
        tail.stderr()
    );
    tail.await_messages(1);
    assert!(
        !tail.json().iter().any(|v| v["op"] == "close"),
        "{:?}\n{}",
        tail.stdout(),
        tail.stderr()
    );
    assert_eq!(
        tail.stderr().matches("connected to").count(),
        1,
        "{}",
        tail.stderr()
    );
}

#[test]
fn check_live_sends_the_pages_origin_and_names_allowed_origins_when_refused() {
    // The URL's own origin is what a page on that site sends; herald allows another.
    let herald = Herald::start(&["--allowed-origins", "https://app.example"]);
    let o = check_live(&[
        &format!("ws://{}/ws", herald.addr),
        "--publish",
        &format!("http://{}/publish", herald.addr),
    ]);
    let out = report(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert_fail(&out, "upgrade");
    assert!(line(&out, "upgrade").contains("403"), "{out}");
    assert!(out.contains("--allowed-origins"), "{out}");
    assert!(
        !out.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("subscribe")),
        "the chain went on past a refused upgrade:\n{out}"
    );
}
