//! HAProxy's agent-check (`--agent-listen`), on the real binary: the line herald answers
//! in each state, read from the agent port as HAProxy reads it; the Redis delivery probe
//! behind one of those states, with a real redis-server frozen, stopped, or cut off from
//! one process only; and the real HAProxy running the shipped `haproxy/haproxy.cfg`
//! (unedited, its addresses through the variables it reads), taking a process out of
//! rotation on SIGUSR1 and weighting new connections by headroom.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::util::{
    Client, Herald, HttpConn, eventually, free_port, next_json, parse_metrics, require, signal,
};

/// How long HAProxy may take to act on an agent answer: the shipped agent-inter (2 s),
/// with room for a loaded host.
const AGENT_SEEN: Duration = Duration::from_secs(8);

// ---- the agent ---------------------------------------------------------------------

/// herald with its agent on an ephemeral loopback port.
fn start(args: &[&str]) -> (Herald, SocketAddr) {
    let mut all = vec!["--agent-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let herald = Herald::start(&all);
    let agent = agent_of(&herald);
    (herald, agent)
}

/// The agent's address, from herald's log ("agent-check on ADDR", logged before
/// "listening on", so present once the process has started).
fn agent_of(herald: &Herald) -> SocketAddr {
    let log = herald.log();
    log.lines()
        .find_map(|l| l.split("agent-check on ").nth(1))
        .unwrap_or_else(|| panic!("no agent address in the log:\n{log}"))
        .trim()
        .parse()
        .expect("agent address")
}

/// One agent-check as HAProxy makes it: connect, read the line until herald closes.
fn try_ask(agent: SocketAddr, limit: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&agent, limit)?;
    stream.set_read_timeout(Some(limit))?;
    let mut line = String::new();
    stream.read_to_string(&mut line)?;
    Ok(line)
}

fn ask(agent: SocketAddr) -> String {
    try_ask(agent, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the agent on {agent} did not answer: {e}"))
}

/// `up ready N% maxconn:M\n` → (N, M); anything else → `None`.
fn ready(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("up ready ")?.strip_suffix('\n')?;
    let (weight, maxconn) = rest.split_once("% maxconn:")?;
    Some((weight.parse().ok()?, maxconn.parse().ok()?))
}

fn weight(agent: SocketAddr) -> u64 {
    let line = ask(agent);
    ready(&line)
        .unwrap_or_else(|| panic!("not a ready answer: {line:?}"))
        .0
}

#[test]
fn ready_carries_the_headroom_and_sigusr1_toggles_drain() {
    let (herald, agent) = start(&["--max-connections", "100"]);
    let line = ask(agent);
    let (idle, maxconn) = ready(&line).unwrap_or_else(|| panic!("{line:?}"));
    assert_eq!(maxconn, 100, "{line:?}");
    assert!(idle >= 95, "an idle herald has {idle}% headroom? {line:?}");

    // 50 of 100 connections taken: half the headroom is gone.
    let mut clients: Vec<Client> = (0..50).map(|_| herald.subscriber("load")).collect();
    let loaded = weight(agent);
    assert!(
        (40..=50).contains(&loaded),
        "50 connections of 100, the agent says {loaded}%"
    );
    clients.truncate(20);
    assert!(
        eventually(Duration::from_secs(5), || weight(agent) >= 75),
        "30 connections closed, the agent still says {}%",
        weight(agent)
    );

    // SIGUSR1: out of rotation, yet still serving its clients and new direct ones.
    herald.signal(libc::SIGUSR1);
    assert!(
        eventually(Duration::from_secs(2), || ask(agent) == "drain\n"),
        "after SIGUSR1 the agent says {:?}",
        ask(agent)
    );
    assert!(eventually(Duration::from_secs(2), || herald
        .log()
        .contains("SIGUSR1: the agent-check now says drain")));
    assert_eq!(herald.publish("load", "\"still served\"")["delivered"], 20);
    for ws in clients.iter_mut() {
        assert_eq!(next_json(ws)["data"], "still served");
    }
    let health = herald.request("GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(
        (health.status, health.text().trim_end()),
        (200, "ok"),
        "SIGUSR1 is not a shutdown: the health check stays green"
    );
    for _ in 0..3 {
        assert_eq!(
            ask(agent),
            "drain\n",
            "drain must hold until the next SIGUSR1"
        );
    }

    // A second SIGUSR1 brings it back.
    herald.signal(libc::SIGUSR1);
    assert!(
        eventually(Duration::from_secs(2), || ready(&ask(agent)).is_some()),
        "after a second SIGUSR1 the agent says {:?}",
        ask(agent)
    );
    assert!(eventually(Duration::from_secs(2), || herald
        .log()
        .contains("SIGUSR1: the agent-check now says ready")));
}

#[test]
fn a_shutdown_drain_says_drain_until_the_process_exits() {
    // Two WebSockets over a 20 s spread: the second is not due to close for 10 s, so
    // the drain lasts as long as the test needs it to.
    let (herald, agent) = start(&["--drain-timeout", "30", "--drain-spread", "20"]);
    let first = herald.subscriber("d");
    let second = herald.subscriber("d");
    assert!(ready(&ask(agent)).is_some());
    herald.signal(libc::SIGTERM);
    assert!(
        eventually(Duration::from_secs(2), || ask(agent) == "drain\n"),
        "after SIGTERM the agent says {:?}",
        ask(agent)
    );
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(ask(agent), "drain\n");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The last client leaves: the drain ends, the process exits 0, the agent is gone.
    drop(first);
    drop(second);
    let mut herald = herald;
    let status = herald.wait(Duration::from_secs(10)).expect("herald exited");
    assert!(status.success(), "{status:?}\n{}", herald.log());
    assert!(try_ask(agent, Duration::from_secs(1)).is_err());
}

/// herald under `prlimit --nofile=64:64` with room for far more connections than
/// descriptors, its agent on an ephemeral port, and a keep-alive connection to scrape.
fn at_the_fd_limit() -> (Herald, SocketAddr, HttpConn, Vec<TcpStream>) {
    require("prlimit", "util-linux");
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=64:64", "--", env!("CARGO_BIN_EXE_herald")]);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--agent-listen",
        "127.0.0.1:0",
        "--max-connections",
        "1000",
        "--handshake-timeout",
        "60",
    ]);
    let herald = Herald::spawn(cmd);
    let agent = agent_of(&herald);
    assert!(ready(&ask(agent)).is_some());
    let mut api = HttpConn::connect(herald.addr);
    // Far more connections than descriptors: the rest wait in the listen backlog.
    let held: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(herald.addr).unwrap())
        .collect();
    let failing = eventually(Duration::from_secs(5), || {
        api.send(b"GET /metrics HTTP/1.1\r\n\r\n");
        parse_metrics(&api.response().text())["herald_accept_errors_total"] >= 1.0
    });
    assert!(failing, "herald never ran out of descriptors");
    (herald, agent, api, held)
}

/// A process that cannot accept must look unhealthy to the balancer (Ratchet #1056):
/// while herald sits at its fd limit, with clients waiting in its backlog, HAProxy's
/// agent-check must read `drain`. An agent that does not answer changes nothing in
/// HAProxy, so an answer is what this needs.
#[test]
fn at_the_fd_limit_the_agent_still_answers_drain() {
    let (herald, agent, _api, held) = at_the_fd_limit();
    for _ in 0..3 {
        match try_ask(agent, Duration::from_secs(2)) {
            Ok(line) => assert_eq!(line, "drain\n", "at the fd limit"),
            Err(e) => panic!(
                "at its fd limit herald's agent did not answer within 2 s ({e}): HAProxy \
                 ignores an agent it cannot read and keeps its last weight\n{}",
                herald.log()
            ),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(held);
}

/// After the last accept() that failed for lack of descriptors, the agent says `drain`
/// for a few seconds (so that one of HAProxy's checks sees it), then `ready` again.
#[test]
fn after_running_out_of_descriptors_the_agent_says_drain_for_a_while() {
    let (_herald, agent, _api, held) = at_the_fd_limit();
    // Freed: accepting resumes, the backlog's clients (gone) are accepted and closed.
    drop(held);
    let freed = Instant::now();
    let mut first = None;
    let answered = eventually(Duration::from_secs(3), || {
        first = try_ask(agent, Duration::from_millis(500)).ok();
        first.is_some()
    });
    assert!(
        answered,
        "the agent did not answer after descriptors were freed"
    );
    assert_eq!(
        first.as_deref(),
        Some("drain\n"),
        "just after accept() failed"
    );
    assert!(
        eventually(Duration::from_secs(10), || ready(&ask(agent)).is_some()),
        "the agent still says {:?} 10 s after descriptors were freed",
        ask(agent)
    );
    let took = freed.elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "ready again after {took:?}: accept failures are remembered for 5 s"
    );
}

// ---- herald check ------------------------------------------------------------------

/// `herald check --haproxy` reads the shipped haproxy.cfg as HAProxy would (its
/// variables from the environment) and compares its agent-check with herald's flags.
#[test]
fn herald_check_compares_the_agent_check_with_herald_flags() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("haproxy/haproxy.cfg");
    let check = |agent: &str, env: &[(&str, &str)]| {
        let o = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["--backlog", "1024", "--agent-listen", agent])
            .args(["check", "--connections", "100", "--haproxy"])
            .arg(&cfg)
            .env_remove("HERALD_LISTEN")
            .envs(env.iter().copied())
            .output()
            .expect("herald check");
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code(), out)
    };
    let (code, out) = check("127.0.0.1:9999", &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(
            "FAIL  server herald/herald1 (127.0.0.1:8080): agent-port 9080 against the \
             --agent-listen 127.0.0.1:9999 of the herald on port 8080"
        ) && out.contains("fix: agent-port 9999"),
        "{out}"
    );
    assert!(out.contains("net.ipv4.tcp_migrate_req"), "{out}");
    let (code, out) = check("127.0.0.1:9999", &[("HERALD_AGENT_PORT", "9999")]);
    assert_eq!(code, Some(0), "{out}");
    for line in [
        "ok    server herald/herald1 (127.0.0.1:8080): agent-port 9999",
        "ok    server herald/herald1 (127.0.0.1:8080): weight 100",
        "ok    server herald/herald1 (127.0.0.1:8080): agent-inter 2000ms against herald's --drain-spread 5000ms",
    ] {
        assert!(out.contains(line), "{line} not checked:\n{out}");
    }
}

// ---- the Redis delivery probe ------------------------------------------------------

/// A redis-server of this test's own, so that it can be frozen (SIGSTOP) by its PID.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        require("redis-server", "redis-server");
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let redis = Redis { child, port };
        assert!(
            eventually(Duration::from_secs(10), || TcpStream::connect(redis.addr())
                .is_ok()),
            "redis-server did not start"
        );
        redis
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn signal(&self, sig: i32) {
        assert!(signal(self.child.id(), sig), "redis-server is gone");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// herald with Redis at `url` and its agent, once the probe has come back.
fn herald_with_redis(url: &str) -> (Herald, SocketAddr) {
    let (herald, agent) = start(&["--redis", url]);
    assert!(
        eventually(Duration::from_secs(10), || delivery(&herald)
            == (1.0, 1.0, "ok (redis up)".into())),
        "the delivery probe never came back: {:?}\n{}",
        delivery(&herald),
        herald.log()
    );
    (herald, agent)
}

/// (herald_redis_up, herald_redis_delivery_ok, /health's text).
fn delivery(herald: &Herald) -> (f64, f64, String) {
    let m = herald.metrics();
    let health = herald.request("GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(health.status, 200, "{}", health.text());
    (
        m["herald_redis_up"],
        m["herald_redis_delivery_ok"],
        health.text().trim_end().to_string(),
    )
}

/// Redis frozen (SIGSTOP): the links stay connected and nothing comes back. Within a
/// probe interval and timeout (2 s + 3 s) the agent says `drain`, with the links still
/// up; thawed (SIGCONT), everything is back.
#[test]
fn a_frozen_redis_turns_the_agent_to_drain_and_a_thawed_one_back() {
    let redis = Redis::start();
    let url = format!("redis://{}", redis.addr());
    let (herald, agent) = herald_with_redis(&url);
    assert!(ready(&ask(agent)).is_some());

    redis.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let drained = eventually(Duration::from_secs(8), || ask(agent) == "drain\n");
    let took = frozen.elapsed();
    assert!(drained, "Redis frozen 8 s, the agent says {:?}", ask(agent));
    // Checked at once: the command link gives up on its unanswered probe after 5 s.
    let state = delivery(&herald);
    assert!(
        took <= Duration::from_secs(6),
        "drain only {took:?} after Redis froze"
    );
    assert_eq!(
        state,
        (1.0, 0.0, "ok (redis up, delivery broken)".into()),
        "links up, delivery broken"
    );
    assert!(eventually(Duration::from_secs(2), || herald
        .log()
        .contains(
            "redis: delivery broken: a probe did not come back within 3 s"
        )));

    redis.signal(libc::SIGCONT);
    assert!(
        eventually(Duration::from_secs(8), || {
            ready(&ask(agent)).is_some() && delivery(&herald) == (1.0, 1.0, "ok (redis up)".into())
        }),
        "Redis thawed, yet: agent {:?}, {:?}",
        ask(agent),
        delivery(&herald)
    );
}

/// The probe's first round after the links come up must not report a failure: a false
/// "delivery broken" at every start or reconnect is a warning operators learn to ignore,
/// and, for that moment, a `drain`.
#[test]
fn the_delivery_probe_raises_no_false_alarm_at_start() {
    let redis = Redis::start();
    let url = format!("redis://{}", redis.addr());
    let (herald, _agent) = herald_with_redis(&url);
    // Past a probe timeout (3 s) and an interval (2 s) after the links came up.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(herald.metric("herald_redis_delivery_ok"), 1.0);
    let log = herald.log();
    assert!(
        !log.contains("delivery broken"),
        "a healthy Redis was reported broken:\n{log}"
    );
}

/// Redis stopped: every process sees it at once (it is shared), so it is no reason to
/// move clients between processes. Were it `drain`, every server would drain together
/// and HAProxy would answer 503 to every new client. /health says "redis down" and
/// /publish answers 503; the agent stays `ready`.
#[test]
fn redis_down_is_not_drain() {
    let redis = Redis::start();
    let url = format!("redis://{}", redis.addr());
    let (herald, agent) = herald_with_redis(&url);
    drop(redis);
    assert!(
        eventually(Duration::from_secs(5), || delivery(&herald)
            == (0.0, 0.0, "ok (redis down)".into())),
        "{:?}",
        delivery(&herald)
    );
    // Longer than a probe interval and timeout: the agent never says drain.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let line = ask(agent);
        assert!(
            ready(&line).is_some(),
            "Redis down, the agent says {line:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = r#"{"topic":"t","data":1}"#;
    let r = herald.request(&format!(
        "POST /publish HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    assert_eq!(r.status, 503, "{}", r.text());
}

/// A TCP relay to Redis that can stop passing what Redis sends down subscription links
/// (the connections whose client said SUBSCRIBE), while everything else flows: commands
/// are answered, messages never arrive. The failure Centrifugo #1189 describes, for one
/// process only.
struct Relay {
    addr: SocketAddr,
    mute: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let mute = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (mute_all, stop_all) = (mute.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop_all.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let subscription = Arc::new(AtomicBool::new(false));
                let tick = Some(Duration::from_millis(20));
                for s in [&client, &server] {
                    s.set_read_timeout(tick).unwrap();
                    s.set_nodelay(true).unwrap();
                }
                let up = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (sub, stop) = (subscription.clone(), stop_all.clone());
                std::thread::spawn(move || {
                    pump(up.0, up.1, &stop, |bytes| {
                        if String::from_utf8_lossy(bytes)
                            .to_ascii_uppercase()
                            .contains("SUBSCRIBE")
                        {
                            sub.store(true, Ordering::SeqCst);
                        }
                        false
                    })
                });
                let (mute, stop) = (mute_all.clone(), stop_all.clone());
                std::thread::spawn(move || {
                    pump(server, client, &stop, |_| {
                        subscription.load(Ordering::SeqCst) && mute.load(Ordering::SeqCst)
                    })
                });
            }
        });
        Relay { addr, mute, stop }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Copy `from` to `to` until either ends or `stop`. `hold(bytes)` (also asked with no
/// bytes) says to stop reading for now: what Redis sends waits in its buffers.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    stop: &AtomicBool,
    mut hold: impl FnMut(&[u8]) -> bool,
) {
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::SeqCst) {
        if hold(&[]) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hold(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// One process's subscription link stops delivering while its links stay up and its
/// publishes are answered: that process says `drain` for as long as it lasts (its
/// health stays 200, which is why the agent must say it), the other stays `ready`.
#[test]
fn a_process_whose_messages_stop_coming_back_drains_alone() {
    let redis = Redis::start();
    let relay = Relay::start(redis.addr());
    let (cut, cut_agent) = herald_with_redis(&format!("redis://{}", relay.addr));
    let (fine, fine_agent) = herald_with_redis(&format!("redis://{}", redis.addr()));
    let mut elsewhere = fine.subscriber("news");

    relay.mute.store(true, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(8), || ask(cut_agent) == "drain\n"),
        "messages stopped 8 s ago, the agent says {:?}",
        ask(cut_agent)
    );
    // It lasts: past the command link's 5 s reply timeout, over several probe rounds.
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        assert_eq!(ask(cut_agent), "drain\n", "{}", cut.log());
        assert!(
            ready(&ask(fine_agent)).is_some(),
            "the other process drains too"
        );
        assert_eq!(
            delivery(&cut),
            (1.0, 0.0, "ok (redis up, delivery broken)".into())
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Its publishes still go out: only what comes back is lost.
    assert_eq!(cut.publish("news", "\"sent anyway\"")["delivered"], 1);
    assert_eq!(next_json(&mut elsewhere)["data"], "sent anyway");

    relay.mute.store(false, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(8), || {
            ready(&ask(cut_agent)).is_some() && delivery(&cut) == (1.0, 1.0, "ok (redis up)".into())
        }),
        "delivery back, yet: agent {:?}, {:?}",
        ask(cut_agent),
        delivery(&cut)
    );
}

// ---- the real HAProxy, with the shipped haproxy.cfg --------------------------------

/// HAProxy running `haproxy/haproxy.cfg` as shipped, its two herald servers pointed at
/// `one` and `two` (and their agents) through the variables the file reads.
struct HaProxy {
    child: Child,
    public: SocketAddr,
    stats: SocketAddr,
}

impl HaProxy {
    fn start(one: (SocketAddr, SocketAddr), two: (SocketAddr, SocketAddr)) -> HaProxy {
        require("haproxy", "haproxy");
        let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let stats: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("haproxy/haproxy.cfg");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(cfg)
            .env("HERALD_PUBLIC_BIND", public.to_string())
            .env("HERALD_STATS_BIND", stats.to_string())
            // This host's hard fd limit cannot hold the shipped 100000 (2 fds each).
            .env("HERALD_HAPROXY_MAXCONN", "4000")
            .env("HERALD_APP_BACKEND", "127.0.0.1:9")
            .env("HERALD_BACKEND", one.0.to_string())
            .env("HERALD_AGENT_PORT", one.1.port().to_string())
            .env("HERALD_BACKEND2", two.0.to_string())
            .env("HERALD_AGENT_PORT2", two.1.port().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let haproxy = HaProxy {
            child,
            public,
            stats,
        };
        assert!(
            eventually(Duration::from_secs(10), || haproxy
                .server("herald1")
                .is_some()),
            "haproxy did not start"
        );
        haproxy
    }

    /// The stats CSV row of a server of the herald backend, by column name.
    fn server(&self, name: &str) -> Option<HashMap<String, String>> {
        // HTTP/1.0: the body ends with the connection.
        let mut stream = TcpStream::connect(self.stats).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        stream.write_all(b"GET /;csv HTTP/1.0\r\n\r\n").ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let (head, body) = answer.split_once("\r\n\r\n")?;
        let csv = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            crate::deploy::dechunk(body)
        } else {
            body.to_string()
        };
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.len() >= 2 && f[0] == "herald" && f[1] == name)
            .map(|f| {
                header
                    .iter()
                    .zip(f)
                    .map(|(h, v)| (h.to_string(), v.to_string()))
                    .collect()
            })
    }

    /// What a failed assertion should show of a server.
    fn brief(&self, server: &str) -> String {
        ["status", "weight", "slim", "scur", "last_agt"]
            .map(|c| format!("{c}={:?}", self.column(server, c)))
            .join(" ")
    }

    fn column(&self, server: &str, column: &str) -> String {
        self.server(server)
            .and_then(|row| row.get(column).cloned())
            .unwrap_or_default()
    }

    /// A WebSocket through the public frontend, retrying while HAProxy finds a server.
    fn subscribe(&self, topic: &str) -> Client {
        crate::deploy::subscribe_through(self.public, topic)
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn websockets(herald: &Herald) -> u64 {
    herald.metric("herald_websockets") as u64
}

/// Two heralds behind the shipped HAProxy, both seen UP and answering their agents.
fn two_behind_haproxy(args: &[&str]) -> (Herald, Herald, HaProxy) {
    let (one, one_agent) = start(args);
    let (two, two_agent) = start(args);
    let haproxy = HaProxy::start((one.addr, one_agent), (two.addr, two_agent));
    let seen = eventually(AGENT_SEEN, || {
        ["herald1", "herald2"].iter().all(|s| {
            haproxy.column(s, "status") == "UP"
                && haproxy.column(s, "last_agt").contains("via agent : up")
        })
    });
    assert!(
        seen,
        "HAProxy does not see both heralds up through their agents: {:?} / {:?}",
        haproxy.brief("herald1"),
        haproxy.brief("herald2")
    );
    (one, two, haproxy)
}

#[test]
fn haproxy_sends_no_new_clients_to_a_process_drained_with_sigusr1() {
    let (one, two, haproxy) = two_behind_haproxy(&[]);
    // leastconn spreads the first clients over both.
    let mut clients: Vec<Client> = Vec::new();
    while websockets(&one) < 2 {
        assert!(clients.len() < 10, "leastconn never chose herald1");
        clients.push(haproxy.subscribe("rotation"));
    }
    let on_one = websockets(&one);
    let on_two = websockets(&two);

    one.signal(libc::SIGUSR1);
    assert!(
        eventually(AGENT_SEEN, || haproxy
            .column("herald1", "status")
            .starts_with("DRAIN")),
        "HAProxy did not see herald1's drain: {:?}",
        haproxy.brief("herald1")
    );
    for _ in 0..10 {
        clients.push(haproxy.subscribe("rotation"));
    }
    assert_eq!(
        (websockets(&one), websockets(&two)),
        (on_one, on_two + 10),
        "every new client goes to herald2"
    );
    // herald1's clients stay connected through HAProxy and still receive.
    assert_eq!(one.publish("rotation", "\"to one\"")["delivered"], on_one);
    let mut received = 0;
    for ws in clients.iter_mut() {
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        if let Ok(tungstenite::Message::Text(t)) = ws.read() {
            assert!(t.as_str().contains("to one"), "{t}");
            received += 1;
        }
    }
    assert_eq!(received, on_one, "herald1's clients through HAProxy");

    // Back in rotation: the emptier herald1 gets new clients again.
    one.signal(libc::SIGUSR1);
    assert!(
        eventually(AGENT_SEEN, || haproxy.column("herald1", "status") == "UP"),
        "HAProxy did not see herald1 back: {:?}",
        haproxy.brief("herald1")
    );
    for _ in 0..4 {
        clients.push(haproxy.subscribe("rotation"));
    }
    assert!(
        websockets(&one) > on_one,
        "herald1 got none of 4 new clients after its second SIGUSR1"
    );
}

#[test]
fn haproxy_weights_send_new_clients_to_the_emptier_process() {
    let (one, two, haproxy) = two_behind_haproxy(&["--max-connections", "100"]);
    // 90 of herald1's 100 connections are taken by clients HAProxy knows nothing of
    // (they came directly): leastconn alone would split new clients evenly.
    let busy: Vec<Client> = (0..90).map(|_| one.subscriber("busy")).collect();
    let weights = || {
        (
            haproxy.column("herald1", "weight").parse::<u64>().ok(),
            haproxy.column("herald2", "weight").parse::<u64>().ok(),
        )
    };
    let applied = eventually(
        AGENT_SEEN,
        || matches!(weights(), (Some(w1), Some(w2)) if w1 <= 10 && w2 >= 90),
    );
    assert!(
        applied,
        "HAProxy's weights are {:?} with herald1 90% full",
        weights()
    );
    // maxconn:100 from the agent is HAProxy's limit per server now.
    assert_eq!(haproxy.column("herald1", "slim"), "100");
    assert_eq!(haproxy.column("herald2", "slim"), "100");

    let before = (websockets(&one), websockets(&two));
    let new: Vec<Client> = (0..20).map(|_| haproxy.subscribe("fresh")).collect();
    let landed = (websockets(&one) - before.0, websockets(&two) - before.1);
    eprintln!("20 new clients through HAProxy: {landed:?} on (herald1 at 10%, herald2 at ~100%)");
    assert_eq!(landed.0 + landed.1, 20);
    assert!(
        landed.0 <= 4 && landed.1 >= 16,
        "20 new clients landed {landed:?} on (herald1 at 10%, herald2 at ~100%)"
    );
    drop((busy, new));
}
