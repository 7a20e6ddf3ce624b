//! Issue 17, live upgrade: SIGUSR2 makes herald `execve` the binary at its own path, in
//! place (same PID), handing every connection and all state to the new binary. These
//! tests start herald from a copy of the built binary in a scratch directory and, before
//! each SIGUSR2, rename over that path a copy whose build tag (a fixed-width placeholder
//! in the binary, `metrics::build`) is patched, so each upgrade runs a different binary
//! and the log (`herald 0.1.0 (build "round-3") taking over …`) says which one serves.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{
    Herald, HttpConn, TIMEOUT, eventually, masked_frame, parse_metrics, raw_ws_on, read_raw_frame,
};

const TAG: &[u8] = b"HERALD-BUILD-TAG[________________]";

pub(crate) fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-upgrade-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Write the built binary to `path` with build tag `tag` (at most 16 bytes), atomically.
pub(crate) fn install(path: &Path, tag: &str) {
    let mut bytes = std::fs::read(env!("CARGO_BIN_EXE_herald")).unwrap();
    let mut patched = TAG.to_vec();
    let inner = &mut patched[17..33];
    inner[..tag.len()].copy_from_slice(tag.as_bytes());
    let at: Vec<usize> = bytes
        .windows(TAG.len())
        .enumerate()
        .filter(|(_, w)| *w == TAG)
        .map(|(i, _)| i)
        .collect();
    assert!(!at.is_empty(), "the binary has no build tag placeholder");
    for i in at {
        bytes[i..i + TAG.len()].copy_from_slice(&patched);
    }
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, &bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub(crate) fn start_from(path: &Path, args: &[&str], env: &[(&str, &str)]) -> Herald {
    let mut cmd = Command::new(path);
    cmd.args(["--listen", "127.0.0.1:0"]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Herald::spawn(cmd)
}

pub(crate) fn metrics_of(herald: &Herald) -> HashMap<String, f64> {
    let mut c = HttpConn::connect(herald.addr);
    let r = c.exchange(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    parse_metrics(&r.text())
}

/// SIGUSR2, then wait until the log says build `tag` took over and serves (`/metrics`
/// answers, counting one more upgrade); returns that `/metrics`.
pub(crate) fn upgrade_to(herald: &Herald, path: &Path, tag: &str) -> HashMap<String, f64> {
    install(path, tag);
    let upgrades = |m: &HashMap<String, f64>| -> f64 {
        m.iter()
            .filter(|(k, _)| k.starts_with("herald_upgrades_total{"))
            .map(|(_, v)| v)
            .sum()
    };
    let before = upgrades(&metrics_of(herald));
    herald.signal(libc::SIGUSR2);
    let line = format!("(build \"{tag}\") taking over from the previous binary");
    let mut last = HashMap::new();
    let ok = eventually(Duration::from_secs(20), || {
        herald.log().contains(&line) && {
            last = metrics_of(herald);
            upgrades(&last) > before
        }
    });
    assert!(ok, "build {tag} did not take over:\n{}", herald.log());
    last
}

/// A `/ws` subscriber opened by hand; its frames are read at the end.
fn raw_subscriber(herald: &Herald, topic: &str) -> TcpStream {
    let s = TcpStream::connect(herald.addr).unwrap();
    raw_ws_on(s, &format!("/ws?topics={topic}"))
}

/// Every message id `stream` received on `topic` until it has `want` of them (or the
/// time runs out); panics on a close frame.
fn ids_received(stream: &mut TcpStream, topic: &str, want: usize) -> Vec<u64> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ids.len() < want && Instant::now() < deadline {
        let Some((first, payload)) = read_raw_frame(stream) else {
            break;
        };
        assert_ne!(first & 0x0f, 0x8, "a subscriber of {topic} saw a close");
        let v: Value = serde_json::from_slice(&payload).expect("a JSON text frame");
        match v["op"].as_str() {
            Some("message") => {
                assert_eq!(v["topic"], topic);
                ids.push(v["id"].as_u64().unwrap());
            }
            Some("subscribed") => {}
            other => panic!("unexpected {other:?}: {v}"),
        }
    }
    ids
}

/// Publishes from one keep-alive connection, two pipelined requests at a time, ~100 per
/// second, until stopped; returns the ids each topic got. Every publish must be answered.
fn publisher(
    addr: std::net::SocketAddr,
    topics: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<HashMap<String, Vec<u64>>> {
    std::thread::spawn(move || {
        let mut conn = HttpConn::connect(addr);
        conn.stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut ids: HashMap<String, Vec<u64>> = HashMap::new();
        let mut n = 0usize;
        // Bounded: at most 60 s of publishing.
        while !stop.load(Ordering::Relaxed) && n < 6000 {
            let mut raw = Vec::new();
            let batch: Vec<String> = (0..2).map(|i| format!("t{}", (n + i) % topics)).collect();
            for topic in &batch {
                let body = format!(r#"{{"topic":"{topic}","data":{n}}}"#);
                raw.extend_from_slice(
                    format!(
                        "POST /publish HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
            conn.send(&raw);
            for topic in batch {
                let r = conn.response();
                assert_eq!(r.status, 200, "{}", r.text());
                let id = r.json()["id"].as_u64().expect("an id");
                ids.entry(topic).or_default().push(id);
                n += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ids
    })
}

fn is_counter(series: &str) -> bool {
    series
        .split('{')
        .next()
        .is_some_and(|name| name.ends_with("_total"))
}

fn counter(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| *v)
        .sum()
}

#[test]
fn five_upgrades_in_a_row_carry_every_connection_and_message() {
    let dir = scratch("five");
    let bin = dir.join("herald");
    install(&bin, "round-0");
    let herald = start_from(&bin, &["--max-message-size", "65536"], &[]);
    let pid = herald.pid();
    const TOPICS: usize = 20;
    const SUBSCRIBERS: usize = 2000;
    let mut subs: Vec<(String, TcpStream)> = (0..SUBSCRIBERS)
        .map(|i| {
            let topic = format!("t{}", i % TOPICS);
            let s = raw_subscriber(&herald, &topic);
            (topic, s)
        })
        .collect();
    // Every subscription is in place before the first publish.
    assert!(eventually(TIMEOUT, || {
        counter(&metrics_of(&herald), "herald_subscriptions") as usize >= SUBSCRIBERS
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = publisher(herald.addr, TOPICS, stop.clone());
    let mut before = metrics_of(&herald);
    for round in 1..=5 {
        // A fragmented message in progress across the upgrade, on `/echo`.
        let mut echo = raw_ws_on(TcpStream::connect(herald.addr).unwrap(), "/echo");
        // And an HTTP request half sent.
        let mut half = TcpStream::connect(herald.addr).unwrap();
        half.set_read_timeout(Some(TIMEOUT)).unwrap();
        half.write_all(b"GET /health HTTP/1.1\r\nHo").unwrap();
        let first = format!("round {round}, first half; ");
        echo.write_all(&masked_frame(0x01, first.as_bytes()))
            .unwrap();
        std::thread::sleep(Duration::from_millis(150));
        let tag = format!("round-{round}");
        let after = upgrade_to(&herald, &bin, &tag);
        echo.write_all(&masked_frame(0x80, b"second half")).unwrap();
        let (op, payload) = read_raw_frame(&mut echo).expect("the echo");
        assert_eq!(op, 0x81, "a whole text message comes back");
        assert_eq!(
            String::from_utf8(payload).unwrap(),
            format!("{first}second half")
        );
        half.write_all(b"st: t\r\n\r\n").unwrap();
        let mut answer = HttpConn::from_stream(half);
        let r = answer.response();
        assert_eq!((r.status, r.text().trim()), (200, "ok"));
        assert_eq!(herald.pid(), pid);
        // Every counter series, whatever it counts, carries on from where it was.
        for (series, was) in before.iter().filter(|(k, _)| is_counter(k)) {
            let now = after.get(series).copied().unwrap_or(0.0);
            assert!(
                now >= *was,
                "{series} went backwards in round {round}: {was} -> {now}"
            );
        }
        assert!(counter(&after, "herald_messages_delivered_total") > 0.0);
        assert_eq!(
            after.get("herald_upgrades_total{result=\"carried\"}"),
            Some(&(round as f64))
        );
        before = after;
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    let published = publishing.join().expect("every publish was answered");
    let total: usize = published.values().map(Vec::len).sum();
    assert!(total > 100, "only {total} publishes");
    for (topic, stream) in &mut subs {
        let want = published.get(topic.as_str()).cloned().unwrap_or_default();
        let got = ids_received(stream, topic, want.len());
        assert_eq!(got, want, "subscriber of {topic}");
    }
    let log = herald.log();
    assert_eq!(
        log.matches("taking over from the previous binary").count(),
        5
    );
    assert!(!log.contains("cannot use the old binary's state"), "{log}");
    // Still the one process, the one we started.
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_slow_consumers_partly_written_frame_resumes_at_the_right_byte() {
    let dir = scratch("slow");
    let bin = dir.join("herald");
    install(&bin, "slow-0");
    let herald = start_from(&bin, &["--sndbuf", "4096"], &[]);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&herald.addr.into()).unwrap();
    let mut slow = raw_ws_on(socket.into(), "/ws?topics=big");
    let (_, subscribed) = read_raw_frame(&mut slow).unwrap();
    assert!(String::from_utf8_lossy(&subscribed).contains("subscribed"));
    // 20 messages of ~20 KB: far more than the kernel's buffers take, well under the
    // send-queue limit, so herald holds most of it with a frame partly written.
    let payload = "x".repeat(20_000);
    let mut conn = herald.http();
    for i in 0..20 {
        conn.publish("big", &format!("\"{i}:{payload}\""));
    }
    assert!(eventually(TIMEOUT, || counter(
        &metrics_of(&herald),
        "herald_send_queue_bytes"
    ) > 100_000.0));
    upgrade_to(&herald, &bin, "slow-1");
    for i in 20..25 {
        conn.publish("big", &format!("\"{i}:{payload}\""));
    }
    slow.set_read_timeout(Some(TIMEOUT)).unwrap();
    for i in 0..25u64 {
        let (first, frame) = read_raw_frame(&mut slow).expect("a frame");
        assert_eq!(first, 0x81);
        let v: Value = serde_json::from_slice(&frame).expect("an intact frame");
        assert_eq!(v["id"].as_u64(), Some(i + 1));
        assert_eq!(v["data"].as_str(), Some(format!("{i}:{payload}").as_str()));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_state_of_another_version_falls_back_to_a_drain_and_clients_resume() {
    let dir = scratch("fallback");
    let bin = dir.join("herald");
    install(&bin, "fb-0");
    // The old binary writes its body as version 999, which no binary reads.
    let herald = start_from(
        &bin,
        &["--drain-spread", "0.2", "--reconnect-jitter", "10-50"],
        &[("HERALD_UPGRADE_TEST_BODY_VERSION", "999")],
    );
    let mut ws = herald.subscriber("news");
    for i in 0..3 {
        herald.publish("news", &i.to_string());
    }
    let mut last = (0, String::new());
    for _ in 0..3 {
        let m = crate::util::next_json(&mut ws);
        last = (m["id"].as_u64().unwrap(), String::new());
    }
    let epoch = herald.request("GET /history?topic=news&since=0 HTTP/1.1\r\nHost: t\r\n\r\n");
    last.1 = epoch.json()["epoch"].as_str().unwrap().to_string();
    let m = upgrade_to(&herald, &bin, "fb-1");
    assert_eq!(
        m.get("herald_upgrades_total{result=\"fallback\"}"),
        Some(&1.0)
    );
    let hint = crate::util::next_json(&mut ws);
    assert_eq!(hint["op"], "reconnect", "{hint}");
    assert_eq!(
        crate::util::close_code(&mut ws),
        tungstenite::protocol::frame::coding::CloseCode::Away
    );
    herald.publish("news", "3");
    let mut again = herald.ws("/ws");
    crate::util::send_json(
        &mut again,
        serde_json::json!({"op":"subscribe","topic":"news","since":last.0,"epoch":last.1}),
    );
    let reply = crate::util::next_json(&mut again);
    assert_eq!(reply["recovered"], true, "{reply}");
    let missed = crate::util::next_json(&mut again);
    assert_eq!(missed["id"].as_u64(), Some(4), "{missed}");
    assert!(herald.log().contains("cannot use the old binary's state"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Handlers reset to the default action across `execve`: herald blocks the signals it
/// handles first, and the new binary unblocks them once its handlers are in place. A
/// SIGTERM with the SIGUSR2, or in the gap while the binary is replaced, still drains.
#[test]
fn sigterm_right_after_sigusr2_still_drains_gracefully() {
    for in_the_gap in [false, true] {
        let dir = scratch(&format!("term-{in_the_gap}"));
        let bin = dir.join("herald");
        install(&bin, "term-0");
        let mut herald = start_from(&bin, &["--drain-spread", "0"], &[]);
        let mut ws = herald.subscriber("a");
        install(&bin, "term-1");
        herald.signal(libc::SIGUSR2);
        if in_the_gap {
            // The old binary logs this just before it blocks signals and executes.
            assert!(eventually(TIMEOUT, || herald.log().contains("executing")));
        }
        herald.signal(libc::SIGTERM);
        assert_eq!(
            crate::util::close_code(&mut ws),
            tungstenite::protocol::frame::coding::CloseCode::Away,
            "in the gap: {in_the_gap}"
        );
        let status = herald.wait(Duration::from_secs(20)).expect("herald exits");
        assert!(status.success(), "{status:?}\n{}", herald.log());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A new binary that cannot start at all (here: a wrapper that gives it a flag it does not
/// know) still does right by every inherited socket: its pending bytes, `reconnect` and
/// 1001, never a silent drop. Then it exits, for its supervisor to restart.
#[test]
fn a_binary_that_cannot_start_still_closes_inherited_websockets_with_1001() {
    let dir = scratch("badflags");
    let bin = dir.join("herald");
    install(&bin, "bad-0");
    let mut herald = start_from(&bin, &[], &[]);
    let mut ws = herald.subscriber("a");
    let real = dir.join("herald-real");
    install(&real, "bad-1");
    let wrapper = dir.join("herald.new");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec {} --no-such-flag \"$@\"\n", real.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&wrapper, &bin).unwrap();
    herald.signal(libc::SIGUSR2);
    let hint = crate::util::next_json(&mut ws);
    assert_eq!(hint["op"], "reconnect", "{hint}");
    assert_eq!(
        crate::util::close_code(&mut ws),
        tungstenite::protocol::frame::coding::CloseCode::Away
    );
    let status = herald.wait(Duration::from_secs(20)).expect("it exits");
    assert!(!status.success());
    assert!(herald.log().contains("cannot start"), "{}", herald.log());
    let _ = std::fs::remove_dir_all(&dir);
}
