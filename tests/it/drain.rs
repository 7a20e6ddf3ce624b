//! SIGTERM / SIGINT: the drain order of PRODUCT.md, observed from outside.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::util::{Client, Herald, HttpConn};

/// Publish over one keep-alive connection until the server stops accepting; return the
/// ids it acknowledged, in order.
fn publish_until_refused(addr: std::net::SocketAddr, accepted: Arc<AtomicU64>) -> Vec<u64> {
    let mut conn = HttpConn::connect(addr);
    let mut ids = Vec::new();
    for i in 0..3000u64 {
        let body = format!(r#"{{"topic":"d","data":{i}}}"#);
        let raw = format!(
            "POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if conn.stream.write_all(raw.as_bytes()).is_err() {
            break;
        }
        let Ok(r) = conn.try_response() else { break };
        if r.status != 200 {
            break;
        }
        ids.push(r.json()["id"].as_u64().unwrap());
        accepted.fetch_add(1, Ordering::SeqCst);
    }
    ids
}

/// Every message until the close frame; returns (ids, close code).
/// Message ids until the close frame, checking the drain's reconnect hint: one, the
/// last text frame before the close, within `--reconnect-jitter`'s default 0-2000 ms.
fn read_until_close(ws: &mut Client) -> (Vec<u64>, CloseCode) {
    let mut ids = Vec::new();
    let mut hint: Option<u64> = None;
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                assert!(hint.is_none(), "a frame after the reconnect hint: {v}");
                if v["op"] == "reconnect" {
                    hint = Some(v["after_ms"].as_u64().expect("after_ms"));
                } else {
                    ids.push(v["id"].as_u64().unwrap());
                }
            }
            Message::Close(frame) => {
                let code = frame.expect("close code").code;
                if code == CloseCode::Away {
                    let after = hint.expect("no reconnect hint before 1001");
                    assert!(after <= 2000, "hint {after} ms is outside 0-2000");
                }
                return (ids, code);
            }
            _ => {}
        }
    }
}

#[test]
fn sigterm_drain_delivers_every_accepted_message_then_1001_and_exits_0() {
    let herald = Herald::start(&["--drain-timeout", "10"]);
    let mut subs: Vec<Client> = (0..1000).map(|_| herald.subscriber("d")).collect();

    // A health request that is half sent when the signal lands.
    let mut prober = HttpConn::connect(herald.addr);
    prober.send(b"GET /health HTTP/1.1\r\nHost: t\r\n");

    let accepted = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (addr, accepted) = (herald.addr, accepted.clone());
        std::thread::spawn(move || publish_until_refused(addr, accepted))
    };
    let start = Instant::now();
    while accepted.load(Ordering::SeqCst) < 200 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "publisher too slow"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let signalled = Instant::now();
    let acked_before = accepted.load(Ordering::SeqCst) as usize;
    herald.signal(libc::SIGTERM);

    // 2. New connections are refused (which also shows the drain has begun).
    let refused = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        TcpStream::connect(herald.addr).is_err()
    });
    assert!(refused, "the listener still accepts during the drain");

    // 1. /health answers 503, with Connection: close, to a request in progress.
    prober.send(b"\r\n");
    let health = prober.response();
    assert_eq!((health.status, health.text().as_str()), (503, "draining\n"));
    assert_eq!(health.header("Connection"), Some("close"));

    // 3 + 4. Every message accepted while a subscriber was open, in order, then 1001.
    // Publishes on connections already open are still answered during the drain (with
    // `Connection: close`); a subscriber closed early in the spread does not get those
    // accepted after its close, which its resume would recover.
    let acked = publisher.join().unwrap();
    assert!(acked.len() >= 200);
    assert!(
        acked.windows(2).all(|w| w[1] == w[0] + 1),
        "ids must count up by one"
    );
    for (n, ws) in subs.iter_mut().enumerate() {
        let (ids, code) = read_until_close(ws);
        assert_eq!(code, CloseCode::Away, "subscriber {n}");
        assert!(
            acked.starts_with(&ids) && ids.len() >= acked_before,
            "subscriber {n} missed accepted messages: {} of {} (before the signal: {acked_before})",
            ids.len(),
            acked.len()
        );
    }

    // 5. Exit 0 within the deadline.
    let mut herald = herald;
    let status = herald
        .wait(Duration::from_secs(12))
        .expect("herald did not exit");
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "drain took {:?}",
        signalled.elapsed()
    );
    let log = herald.log();
    assert!(
        log.contains("draining 1002 connections") || log.contains("draining"),
        "{log}"
    );
}

/// herald with one subscriber that never reads and 12 MB queued to it: a drain cannot
/// finish on its own.
fn with_stuck_subscriber(drain_timeout: &str) -> (Herald, Client) {
    let herald = Herald::start(&[
        "--drain-timeout",
        drain_timeout,
        "--send-queue-limit",
        "100000000",
    ]);
    let stuck = herald.subscriber("s");
    let mut api = herald.http();
    let big = format!("\"{}\"", "x".repeat(60_000));
    for _ in 0..200 {
        api.publish("s", &big);
    }
    (herald, stuck)
}

#[test]
fn drain_deadline_abandons_what_is_left_and_says_so() {
    let (herald, stuck) = with_stuck_subscriber("1");
    let start = Instant::now();
    herald.signal(libc::SIGTERM);
    let mut herald = herald;
    let status = herald.wait(Duration::from_secs(5)).expect("no exit");
    assert!(status.success());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let log = herald.log();
    assert!(
        log.contains("drain timeout: abandoning 1 connections"),
        "{log}"
    );
    drop(stuck);
}

#[test]
fn second_signal_exits_at_once() {
    let (herald, _stuck) = with_stuck_subscriber("30");
    herald.signal(libc::SIGINT);
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    herald.signal(libc::SIGTERM);
    let mut herald = herald;
    let status = herald.wait(Duration::from_secs(5)).expect("no exit");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(status.code(), Some(1));
    assert!(herald.log().contains("second signal"), "{}", herald.log());
}

#[test]
fn idle_keep_alive_connections_close_when_the_drain_starts() {
    let herald = Herald::start(&[]);
    let mut idle = herald.http();
    idle.send(b"GET /health HTTP/1.1\r\n\r\n");
    assert_eq!(idle.response().status, 200);
    let status = herald.terminate();
    assert!(status.success());
    assert!(idle.is_closed());
}

/// The paced drain seen from the clients: closes spread evenly over `--drain-spread`,
/// each one after a reconnect hint inside `--reconnect-jitter`.
#[test]
fn drain_closes_are_spread_and_each_client_gets_a_hint_first() {
    let herald = Herald::start(&[
        "--drain-timeout",
        "6",
        "--drain-spread",
        "2",
        "--reconnect-jitter",
        "100-300",
    ]);
    let n = 400;
    let subs: Vec<Client> = (0..n).map(|_| herald.subscriber("p")).collect();
    let signalled = Instant::now();
    herald.signal(libc::SIGTERM);
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut ws| {
            std::thread::spawn(move || {
                let mut hint = None;
                loop {
                    match ws.read().expect("read") {
                        Message::Text(t) => {
                            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                            assert_eq!(v["op"], "reconnect", "{v}");
                            hint = v["after_ms"].as_u64();
                        }
                        Message::Close(frame) => {
                            let code = frame.expect("a close code").code;
                            return (Instant::now(), hint, code);
                        }
                        _ => {}
                    }
                }
            })
        })
        .collect();
    let mut buckets = vec![0usize; 30];
    for reader in readers {
        let (at, hint, code) = reader.join().expect("reader");
        assert_eq!(code, CloseCode::Away);
        let hint = hint.expect("no reconnect hint before 1001");
        assert!((100..=300).contains(&hint), "hint {hint} ms");
        let bucket = (at - signalled).as_millis() as usize / 100;
        buckets[bucket.min(29)] += 1;
    }
    eprintln!("closes per 100 ms: {buckets:?}");
    // 400 closes over 2 s: 20 per 100 ms. Not front-loaded, not late, none left over.
    assert!(buckets[22..].iter().all(|&b| b == 0), "{buckets:?}");
    assert!(buckets[..20].iter().all(|&b| b <= 40), "{buckets:?}");
    let first_half: usize = buckets[..10].iter().sum();
    assert!((120..=280).contains(&first_half), "{buckets:?}");
    let mut herald = herald;
    assert!(herald.wait(Duration::from_secs(8)).expect("exit").success());
    let log = herald.log();
    assert!(log.contains("400 WebSockets closed in"), "{log}");
}
