//! Timeouts: slowloris, idle keep-alive, half-open peers, unfinished close handshakes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::util::{
    Herald, HttpConn, masked_frame, next_json, raw_close_code, raw_ws, read_raw_frame,
};

/// Block until the server closes `stream` (EOF or reset); return how long that took.
fn time_to_close(stream: &mut TcpStream, start: Instant) -> Duration {
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return start.elapsed(),
            Ok(_) => continue,
        }
    }
}

fn assert_between(took: Duration, low_ms: u64, high_ms: u64, what: &str) {
    assert!(
        took >= Duration::from_millis(low_ms) && took <= Duration::from_millis(high_ms),
        "{what}: closed after {took:?}, expected {low_ms}..{high_ms} ms"
    );
}

#[test]
fn a_slowloris_sending_a_byte_at_a_time_is_cut_at_the_handshake_timeout() {
    let herald = Herald::start(&["--handshake-timeout", "2"]);
    let mut stream = TcpStream::connect(herald.addr).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(time_to_close(&mut reader, start)));
    stream.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    // One more header byte every 200 ms, for at most 6 s, until the server hangs up.
    let took = loop {
        if let Ok(took) = rx.try_recv() {
            break took;
        }
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "slowloris still connected"
        );
        let _ = stream.write_all(b"X");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_between(took, 1900, 3000, "slowloris");
    assert_eq!(herald.metric("herald_handshake_timeouts_total"), 1.0);
}

#[test]
fn a_connection_that_never_speaks_is_closed() {
    let herald = Herald::start(&["--handshake-timeout", "1"]);
    let mut stream = TcpStream::connect(herald.addr).unwrap();
    assert_between(
        time_to_close(&mut stream, Instant::now()),
        900,
        2000,
        "silent connection",
    );
}

#[test]
fn idle_keep_alive_connections_close_after_the_keepalive_timeout() {
    let herald = Herald::start(&["--keepalive-timeout", "1"]);
    // Busy: a request every 400 ms keeps the connection for 3 s.
    let mut busy = HttpConn::connect(herald.addr);
    for _ in 0..8 {
        busy.send(b"GET /health HTTP/1.1\r\n\r\n");
        assert_eq!(busy.response().status, 200);
        std::thread::sleep(Duration::from_millis(400));
    }
    // Then idle: closed a second after the last response.
    busy.send(b"GET /health HTTP/1.1\r\n\r\n");
    assert_eq!(busy.response().status, 200);
    let took = time_to_close(&mut busy.stream, Instant::now());
    assert_between(took, 900, 2000, "idle keep-alive");
    assert_eq!(herald.metric("herald_idle_timeouts_total"), 1.0);
}

#[test]
fn a_peer_that_stops_answering_pings_is_closed_within_interval_plus_timeout() {
    let herald = Herald::start(&["--ping-interval", "1", "--pong-timeout", "1"]);
    // A half-open peer: it receives but never sends a byte.
    let mut dead = raw_ws(herald.addr, "/ws?topics=t");
    let start = Instant::now();
    let mut pings = 0;
    while let Some((first, _)) = read_raw_frame(&mut dead) {
        if first == 0x89 {
            pings += 1;
        }
    }
    let took = start.elapsed();
    assert!(pings >= 1, "no ping was sent");
    assert_between(took, 1900, 3000, "unanswered ping");
    assert_eq!(herald.metric("herald_pong_timeouts_total"), 1.0);
    assert_eq!(herald.metric("herald_topics"), 0.0);
}

#[test]
fn a_peer_that_answers_pings_stays_connected() {
    let herald = Herald::start(&["--ping-interval", "1", "--pong-timeout", "1"]);
    let mut alive = herald.subscriber("t");
    alive
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(3500) {
        // tungstenite answers each ping with a pong on the next read.
        match alive.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("connection lost: {e}"),
        }
    }
    assert!(pings >= 2, "expected pings every second, got {pings}");
    alive
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(herald.publish("t", "1")["delivered"], 1);
    assert_eq!(next_json(&mut alive)["id"], 1);
}

#[test]
fn an_unanswered_close_frame_is_cut_after_a_grace_period() {
    // During a drain every WebSocket gets 1001 and herald waits for the reply; a peer
    // that never sends one must not hold the process until --drain-timeout.
    let herald = Herald::start(&["--drain-timeout", "30"]);
    let mut ws = raw_ws(herald.addr, "/ws?topics=t");
    read_raw_frame(&mut ws).unwrap(); // subscribed
    herald.signal(libc::SIGTERM);
    let start = Instant::now();
    assert_eq!(raw_close_code(&mut ws), Some(1001));
    assert_between(
        time_to_close(&mut ws, start),
        2500,
        4500,
        "unanswered close",
    );
    let mut herald = herald;
    assert!(
        herald
            .wait(Duration::from_secs(3))
            .is_some_and(|s| s.success())
    );
}

#[test]
fn a_failed_peer_that_never_hangs_up_is_released_after_a_grace_period() {
    let herald = Herald::start(&[]);
    let mut ws = raw_ws(herald.addr, "/echo");
    ws.write_all(&masked_frame(0xc1, b"rsv")).unwrap();
    let start = Instant::now();
    assert_eq!(raw_close_code(&mut ws), Some(1002));
    // Our side got the close frame and a FIN at once (RFC 6455 §7.1.7)...
    assert!(time_to_close(&mut ws, start) < Duration::from_secs(1));
    // ...and although we keep our socket open, herald lets go of its own after a grace.
    assert!(crate::util::eventually(Duration::from_secs(2), || herald
        .metric("herald_connections")
        == 2.0));
    let released = crate::util::eventually(Duration::from_secs(5), || {
        herald.metric("herald_connections") == 1.0
    });
    assert!(
        released && start.elapsed() >= Duration::from_millis(2500),
        "released after {:?}",
        start.elapsed()
    );
    drop(ws);
}

#[test]
fn a_busy_pipelining_client_is_not_mistaken_for_a_slowloris() {
    // Every write ends halfway through the next request, for longer than the handshake
    // timeout: each request completes in time, so the connection must live on.
    let herald = Herald::start(&["--handshake-timeout", "1"]);
    let mut conn = HttpConn::connect(herald.addr);
    let request = "GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
    let (first, second) = request.split_at(10);
    conn.send(first.as_bytes());
    let start = Instant::now();
    let mut answered = 0;
    while start.elapsed() < Duration::from_millis(2500) {
        std::thread::sleep(Duration::from_millis(250));
        conn.send(format!("{second}{first}").as_bytes());
        assert_eq!(conn.response().status, 200, "after {:?}", start.elapsed());
        answered += 1;
    }
    assert!(answered >= 8);
}
