//! herald-bench against a real herald, at small sizes: the tool must count correctly.
//! These are not performance assertions. `cargo test --workspace` builds both binaries
//! into the same target directory, which is where herald is looked for.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bench() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_herald-bench"))
}

fn herald_binary() -> PathBuf {
    let path = bench().with_file_name("herald");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

/// A loopback port nothing listens on, below the kernel's ephemeral range, so no outgoing
/// connection can take it before the server this test starts binds it.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const LOW: u16 = 10_000;
    let high: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    let span = high.saturating_sub(LOW).max(2);
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(span)) as u16 + 1;
    let _ = NEXT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..span {
        let port = LOW + NEXT.fetch_add(1, Ordering::SeqCst) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {high}");
}

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start() -> Server {
        let mut child = Command::new(herald_binary())
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start herald");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("herald did not start");
        Server {
            child,
            url: format!("ws://{addr}"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a scenario to completion; its JSON report.
fn run(url: &str, args: &[&str]) -> Value {
    let out = Command::new(bench())
        .args(["--url", url, "--json"])
        .args(args)
        .output()
        .expect("run herald-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "herald-bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn broadcast_counts_every_delivery() {
    let server = Server::start();
    let r = run(
        &server.url,
        &[
            "broadcast",
            "-n",
            "200",
            "--rate",
            "50",
            "--duration",
            "2",
            "--drain",
            "3",
        ],
    );
    assert_eq!(r["subscribers"], 200);
    let acked = r["published"]["acked"].as_u64().unwrap();
    assert!(acked >= 90, "{r}");
    assert_eq!(r["deliveries"]["expected"].as_u64(), Some(acked * 200));
    assert_eq!(
        r["deliveries"]["received"].as_u64(),
        Some(acked * 200),
        "{r}"
    );
    assert_eq!(r["lost"], 0);
    assert_eq!(
        r["publish-to-receive latency"]["count"].as_u64(),
        Some(acked * 200)
    );
    // Every reply's response time, pipelined.
    assert_eq!(
        r["publish response time"]["count"].as_u64(),
        Some(acked),
        "{r}"
    );
    assert_eq!(r["published"]["sequential"], false, "{r}");
    // herald's own /metrics fed the server figures.
    assert!(r["server RSS"].as_u64().is_some_and(|b| b > 0), "{r}");
}

#[test]
fn deflate_broadcasts_are_inflated_counted_and_smaller_on_the_wire() {
    let server = Server::start();
    let payload = concat!(env!("CARGO_MANIFEST_DIR"), "/payloads/quotes-1k.json");
    let broadcast = |deflate: bool| {
        let mut args = vec!["broadcast", "-n", "20", "--rate", "20", "--duration", "1"];
        args.extend(["--drain", "3", "--payload-file", payload]);
        if deflate {
            args.push("--deflate");
        }
        run(&server.url, &args)
    };
    let plain = broadcast(false);
    let zipped = broadcast(true);
    for r in [&plain, &zipped] {
        let acked = r["published"]["acked"].as_u64().unwrap();
        assert!(acked >= 10, "{r}");
        // Inflated, the messages still carry their id and send time: every one counted.
        assert_eq!(
            r["deliveries"]["received"].as_u64(),
            Some(acked * 20),
            "{r}"
        );
        assert_eq!(r["lost"], 0, "{r}");
    }
    let received = zipped["deliveries"]["received"].clone();
    assert_eq!(zipped["permessage-deflate"]["negotiated"], 20, "{zipped}");
    assert_eq!(
        zipped["permessage-deflate"]["compressed"], received,
        "{zipped}"
    );
    assert!(plain.get("permessage-deflate").is_none(), "{plain}");
    let wire = |r: &Value| r["wire bytes per delivery"].as_f64().unwrap();
    // A frame of the 1 KiB payload as it is, and compressed: well under it.
    assert!(wire(&plain) > 1000.0, "{plain}");
    assert!(wire(&zipped) < wire(&plain) * 0.75, "{zipped}");
}

#[test]
fn sequential_broadcast_sends_one_publish_at_a_time() {
    let server = Server::start();
    let r = run(
        &server.url,
        &[
            "broadcast",
            "-n",
            "50",
            "--rate",
            "50",
            "--duration",
            "1",
            "--sequential",
        ],
    );
    let p = &r["published"];
    let acked = p["acked"].as_u64().unwrap();
    assert_eq!(p["sequential"], true, "{r}");
    assert_eq!(p["max_in_flight"], 1, "{r}");
    // herald answers well within the 20 ms between publishes: few if any skipped.
    assert!(
        acked >= 40 && acked + p["skipped"].as_u64().unwrap() >= 50,
        "{r}"
    );
    assert_eq!(r["lost"], 0, "{r}");
    let t = &r["publish response time"];
    assert_eq!(t["count"].as_u64(), Some(acked), "{r}");
    assert!(t["p50_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{r}");
}

#[test]
fn a_subscriber_killed_mid_run_is_reported_as_loss() {
    let server = Server::start();
    let mut child = Command::new(bench())
        .args(["--url", &server.url, "--json", "--workers", "2"])
        .args([
            "broadcast",
            "-n",
            "200",
            "--rate",
            "50",
            "--duration",
            "4",
            "--drain",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run herald-bench");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut victim = None;
    let start = Instant::now();
    for line in stderr.lines().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("worker 1 pid ") {
            victim = rest
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<i32>().ok());
        }
        if line.starts_with("publishing") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never started publishing"
        );
    }
    let victim = victim.expect("worker 1's pid");
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: kill(2) on a worker process of the herald-bench this test started.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    let out = child.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).expect("report");
    let expected = r["deliveries"]["expected"].as_u64().unwrap();
    let received = r["deliveries"]["received"].as_u64().unwrap();
    let lost = r["lost"].as_u64().unwrap();
    // Half the subscribers vanished: everything published to them is lost, and said so.
    assert_eq!(lost, expected - received, "{r}");
    assert!(lost >= expected / 2 - 100, "loss hidden: {r}");
    assert_eq!(r["dead workers"][0][0], 1, "{r}");
}

#[test]
fn connect_echo_and_idle_count_what_they_did() {
    let server = Server::start();
    let r = run(&server.url, &["connect", "-n", "300", "--hold", "0.2"]);
    assert_eq!(r["connections"]["connected"], 300, "{r}");
    assert_eq!(r["failures"], serde_json::json!({}));
    assert!(r["handshakes/s"].as_f64().unwrap() > 0.0);
    assert_eq!(r["handshake latency"]["count"], 300);

    let r = run(&server.url, &["echo", "-c", "10", "--duration", "1"]);
    assert_eq!(r["clients"], 10);
    assert!(r["messages/s"].as_f64().unwrap() > 100.0, "{r}");
    assert!(r["round trip"]["count"].as_u64().unwrap() > 100);

    let r = run(&server.url, &["idle", "-n", "200", "--hold", "0.2"]);
    assert_eq!(r["subscribed connections"], 200);
    assert!(r["server KiB per connection"].as_f64().is_some(), "{r}");
    assert!(r["kernel KiB per socket"].as_f64().is_some(), "{r}");
}

#[test]
fn connection_failures_are_counted_by_kind() {
    // Nothing listens on this port: every attempt is refused, and the report says so.
    let port = free_port();
    let r = run(
        &format!("ws://127.0.0.1:{port}"),
        &["connect", "-n", "50", "--hold", "0"],
    );
    assert_eq!(r["connections"]["connected"], 0);
    assert_eq!(r["failures"]["refused"], 50, "{r}");
}

/// A herald that a shell command can restart on the same port: started through `sh`,
/// which writes its PID to a file and execs it, so the restart command can find it.
struct Restartable {
    dir: PathBuf,
    pidfile: PathBuf,
    port: u16,
    launch: String,
}

impl Restartable {
    fn start(name: &str, extra: &[&str]) -> Restartable {
        let dir = std::env::temp_dir().join(format!("herald-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("herald.pid");
        let port = free_port();
        let launch = format!(
            "sh -c 'echo $$ > {pid}; exec {bin} --listen 127.0.0.1:{port} {extra}' >/dev/null 2>&1 &",
            pid = pidfile.display(),
            bin = herald_binary().display(),
            extra = extra.join(" "),
        );
        assert!(
            Command::new("sh")
                .args(["-c", &launch])
                .status()
                .unwrap()
                .success()
        );
        let up = || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        let start = Instant::now();
        while !up() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "herald did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Restartable {
            dir,
            pidfile,
            port,
            launch,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// SIGTERM (herald drains), wait for the exit, start a new one on the same port.
    fn restart_command(&self) -> String {
        format!(
            "kill $(cat {pid}); while kill -0 $(cat {pid}) 2>/dev/null; do sleep 0.05; done; {launch}",
            pid = self.pidfile.display(),
            launch = self.launch
        )
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            // SAFETY: kill(2) takes plain integers; `pid` is the herald this test started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn storm_measures_the_way_back_after_a_restart() {
    let herald = Restartable::start("storm", &[]);
    let restart = herald.restart_command();
    let r = run(
        &herald.url(),
        &[
            "storm",
            "-n",
            "300",
            "--restart",
            &restart,
            "--timeout",
            "20",
            "--rate",
            "20",
        ],
    );
    drop(herald);
    assert_eq!(r["clients"], 300, "{r}");
    assert_eq!(r["disconnects"], 300, "{r}");
    assert!(
        r["all back within"]
            .as_f64()
            .is_some_and(|s| s > 0.0 && s < 20.0),
        "{r}"
    );
    // Messages published while clients were away are counted as missed, not hidden.
    let missed = r["missed across the restart"].as_u64().unwrap();
    assert!(r["published"]["acked"].as_u64().unwrap() > 0);
    assert!(
        missed > 0,
        "a restart with publishes in flight missed nothing? {r}"
    );
}

#[test]
fn storm_with_resume_misses_nothing_across_a_restart_that_keeps_state() {
    // --state-dir: the drain saves history and the next herald loads it, so every client
    // can resume where it was, in the same epoch.
    let state =
        std::env::temp_dir().join(format!("herald-bench-resume-state-{}", std::process::id()));
    std::fs::create_dir_all(&state).unwrap();
    let state_arg = format!("--state-dir {}", state.display());
    let herald = Restartable::start("resume", &[&state_arg]);
    let restart = herald.restart_command();
    let r = run(
        &herald.url(),
        &[
            "storm",
            "-n",
            "300",
            "--resume",
            "--restart",
            &restart,
            "--timeout",
            "20",
            "--rate",
            "20",
        ],
    );
    drop(herald);
    let _ = std::fs::remove_dir_all(&state);
    assert_eq!(r["clients"], 300, "{r}");
    assert_eq!(r["disconnects"], 300, "{r}");
    assert_eq!(
        r["subscribed without epoch"], 0,
        "server gave no epoch: {r}"
    );
    assert!(
        r["all back within"]
            .as_f64()
            .is_some_and(|s| s > 0.0 && s < 20.0),
        "{r}"
    );
    let acked = r["published"]["acked"].as_u64().unwrap();
    assert!(acked > 0, "{r}");
    // herald's publish replies carry ids, so every client was checked id by id.
    assert_eq!(r["published"]["acked_ids"].as_u64(), Some(acked), "{r}");
    assert_eq!(
        r["missed, by id and by count"]["checked_clients"], 300,
        "{r}"
    );
    assert_eq!(r["missed, by id and by count"]["by_id"], 0, "{r}");
    assert_eq!(r["missed across the restart"], 0, "{r}");
    assert_eq!(r["duplicate deliveries"], 0, "{r}");
    assert!(
        r["resumes"]["recovered"].as_u64().is_some_and(|n| n >= 300),
        "{r}"
    );
    assert_eq!(r["resumes"]["not_recovered"], 0, "{r}");
    assert_eq!(r["resumes"]["unanswered"], 0, "{r}");
    assert_eq!(r["epoch changes seen"], 0, "{r}");
    assert!(
        r["all caught up within"]
            .as_f64()
            .is_some_and(|s| s > 0.0 && s < 30.0),
        "{r}"
    );
}

#[test]
fn deploy_measures_a_restart_that_keeps_state_and_misses_nothing() {
    // One herald with --state-dir, restarted by SIGTERM: its drain tells every client when
    // to come back, saves history, and the next herald loads it, so every client resumes
    // where it was. A short spread and jitter keep the test short.
    let state =
        std::env::temp_dir().join(format!("herald-bench-deploy-state-{}", std::process::id()));
    std::fs::create_dir_all(&state).unwrap();
    let state_arg = format!("--state-dir {}", state.display());
    let herald = Restartable::start(
        "deploy",
        &[
            &state_arg,
            "--drain-spread",
            "1",
            "--reconnect-jitter",
            "100-600",
        ],
    );
    let restart = herald.restart_command();
    let publish_url = format!("http://127.0.0.1:{}", herald.port);
    let r = run(
        &herald.url(),
        &[
            "deploy",
            "-n",
            "300",
            "--rate",
            "20",
            "--publish-url",
            &publish_url,
            "--restart",
            &restart,
            "--settle",
            "1",
            "--timeout",
            "30",
            "--after",
            "1",
        ],
    );
    drop(herald);
    let _ = std::fs::remove_dir_all(&state);
    assert_eq!(r["clients"], 300, "{r}");
    assert_eq!(r["restart"]["exit_code"], 0, "{r}");
    assert_eq!(r["restart"]["timed_out"], false, "{r}");
    // Every client went once, was told when to come back, and waited for it.
    assert_eq!(r["disconnects"], 300, "{r}");
    assert_eq!(
        r["clients by disconnects"],
        serde_json::json!({"1": 300}),
        "{r}"
    );
    let hints = &r["reconnect hints"];
    assert_eq!(hints["received"], 300, "{r}");
    assert!(
        hints["after_ms_min"].as_u64().is_some_and(|m| m >= 100),
        "{r}"
    );
    assert!(
        hints["after_ms_max"].as_u64().is_some_and(|m| m <= 600),
        "{r}"
    );
    assert!(
        hints["hinted_reconnects"]
            .as_u64()
            .is_some_and(|n| n >= 300),
        "{r}"
    );
    assert_eq!(hints["early"], 0, "{r}");
    assert!(
        r["all back within"]
            .as_f64()
            .is_some_and(|s| s > 0.0 && s < 30.0),
        "{r}"
    );
    // The reconnect curve: every reconnection on it, and its peak/mean a finite number.
    let curve = &r["reconnect rate"];
    assert_eq!(curve["total"], r["reconnections"]["resubscribed"], "{r}");
    assert_eq!(curve["total"], 300, "{r}");
    let ratio = curve["peak_over_mean"]
        .as_f64()
        .expect("peak/mean reported");
    assert!(ratio.is_finite() && ratio >= 1.0, "{r}");
    assert_eq!(
        curve["histogram"].as_array().map(Vec::len),
        curve["seconds"].as_u64().map(|n| n as usize),
        "{r}"
    );
    assert!(r["targets"]["peak_within_2x_mean"].is_boolean(), "{r}");
    // The publisher retried through the restart: every publish was acknowledged in the
    // end, and what the restart refused is counted.
    let publishers = &r["refused, publishers"];
    assert_eq!(publishers["never_acked"], 0, "{r}");
    assert!(publishers["refused"].as_u64().is_some(), "{r}");
    let acked = r["published"]["acked"].as_u64().unwrap();
    assert!(acked > 0, "{r}");
    assert_eq!(r["published"]["acked_ids"].as_u64(), Some(acked), "{r}");
    assert!(
        r["refused, subscribers"]["refused"].as_u64().is_some(),
        "{r}"
    );
    // Nothing missed, nothing twice: every client checked id by id, every resume recovered.
    assert_eq!(r["subscribed without epoch"], 0, "{r}");
    assert_eq!(
        r["missed, by id and by count"]["checked_clients"], 300,
        "{r}"
    );
    assert_eq!(r["missed, by id and by count"]["by_id"], 0, "{r}");
    assert_eq!(r["missed across the restart"], 0, "{r}");
    assert_eq!(r["duplicate deliveries"], 0, "{r}");
    assert_eq!(r["resumes"]["not_recovered"], 0, "{r}");
    assert_eq!(r["targets"]["zero_missed"], true, "{r}");
}

#[test]
fn capacity_reports_the_largest_n_that_met_the_bound() {
    let server = Server::start();
    let r = run(
        &server.url,
        &[
            "capacity",
            "--step",
            "100",
            "--max",
            "300",
            "--rate",
            "20",
            "--messages",
            "10",
        ],
    );
    assert_eq!(r["largest N within bound"], 300, "{r}");
    assert_eq!(r["steps"].as_array().unwrap().len(), 3);
    // An impossible bound: nothing meets it.
    let r = run(
        &server.url,
        &[
            "capacity",
            "--step",
            "100",
            "--max",
            "300",
            "--bound-ms",
            "0",
            "--messages",
            "5",
        ],
    );
    assert_eq!(r["largest N within bound"], 0, "{r}");
}
