//! Hostile and broken input: every case gets its documented answer, and nothing else
//! on the server is disturbed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::{Herald, HttpConn, eventually, masked_frame, next_json, raw_close_code, raw_ws};

fn close_code_for(herald: &Herald, path: &str, bytes: &[u8]) -> Option<u16> {
    let mut ws = raw_ws(herald.addr, path);
    if path.starts_with("/ws?topics=") {
        // Skip the `subscribed` confirmation.
        crate::util::read_raw_frame(&mut ws).unwrap();
    }
    ws.write_all(bytes).unwrap();
    raw_close_code(&mut ws)
}

#[test]
fn each_protocol_breach_gets_its_close_code() {
    let herald = Herald::start(&["--max-message-size", "1000"]);
    let mut bystander = herald.subscriber("calm");
    let unmasked = [0x81, 0x02, b'h', b'i'];
    let mut fragmented_ping = masked_frame(0x09, b"x");
    fragmented_ping.extend(masked_frame(0x80, b"y"));
    let mut declared_huge = vec![0x82, 0x80 | 127];
    declared_huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
    declared_huge.extend_from_slice(&[1, 2, 3, 4]);
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        (
            "oversized frame",
            "/echo",
            masked_frame(0x82, &[0; 1001]),
            1009,
        ),
        ("frame declaring 1 TiB", "/echo", declared_huge, 1009),
        (
            "oversized fragmented message",
            "/echo",
            [
                masked_frame(0x01, &[b'a'; 600]),
                masked_frame(0x80, &[b'a'; 600]),
            ]
            .concat(),
            1009,
        ),
        (
            "invalid UTF-8",
            "/echo",
            masked_frame(0x81, &[0xc3, 0x28]),
            1007,
        ),
        (
            "invalid UTF-8 across fragments",
            "/echo",
            [
                masked_frame(0x01, &[0xe2, 0x82]),
                masked_frame(0x80, &[0x41]),
            ]
            .concat(),
            1007,
        ),
        (
            "binary on /ws",
            "/ws?topics=t",
            masked_frame(0x82, b"\x00"),
            1003,
        ),
        ("unmasked frame", "/echo", unmasked.to_vec(), 1002),
        ("RSV1 set", "/echo", masked_frame(0xc1, b"x"), 1002),
        ("RSV3 set", "/echo", masked_frame(0x91, b"x"), 1002),
        (
            "unknown data opcode",
            "/echo",
            masked_frame(0x83, b"x"),
            1002,
        ),
        (
            "unknown control opcode",
            "/echo",
            masked_frame(0x8b, b"x"),
            1002,
        ),
        ("fragmented control frame", "/echo", fragmented_ping, 1002),
        (
            "control frame over 125 bytes",
            "/echo",
            masked_frame(0x89, &[0; 126]),
            1002,
        ),
        (
            "continuation with nothing to continue",
            "/echo",
            masked_frame(0x80, b"x"),
            1002,
        ),
        (
            "new message inside a fragmented one",
            "/echo",
            [masked_frame(0x01, b"a"), masked_frame(0x81, b"b")].concat(),
            1002,
        ),
        (
            "close frame with a 1-byte payload",
            "/echo",
            masked_frame(0x88, &[3]),
            1002,
        ),
    ];
    for (what, path, bytes, want) in cases {
        assert_eq!(close_code_for(&herald, path, &bytes), Some(want), "{what}");
    }
    // The bystander never noticed.
    assert_eq!(herald.publish("calm", "1")["delivered"], 1);
    assert_eq!(next_json(&mut bystander)["id"], 1);
    let closes = herald.metrics();
    assert_eq!(closes["herald_websocket_closes_total{code=\"1002\"}"], 10.0);
}

#[test]
fn bad_json_and_unknown_ops_keep_the_connection() {
    let herald = Herald::start(&[]);
    let mut ws = herald.ws("/ws");
    let cases = [
        ("{", "bad_json"),
        ("42", "bad_json"),
        (r#""a string""#, "bad_json"),
        (r#"{"op":"subscribe","topic":42}"#, "bad_json"),
        (r#"{"op":"fly"}"#, "unknown_op"),
        (r#"{"op":"publish","topic":"t"}"#, "bad_request"),
    ];
    for (text, _) in cases {
        ws.send(tungstenite::Message::text(text)).unwrap();
    }
    for (text, code) in cases {
        assert_eq!(next_json(&mut ws)["error"], code, "{text}");
    }
    crate::util::send_json(&mut ws, json!({"op":"subscribe","topic":"still-here"}));
    assert_eq!(next_json(&mut ws)["op"], "subscribed");
}

#[test]
fn foreign_origins_are_refused_at_the_handshake() {
    let herald = Herald::start(&[
        "--allowed-origins",
        "https://app.example,http://localhost:3000",
    ]);
    let handshake = |origin: &str| {
        herald
            .request(&format!(
                "GET /ws HTTP/1.1\r\nHost: t\r\nOrigin: {origin}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ))
            .status
    };
    assert_eq!(handshake("https://evil.example"), 403);
    assert_eq!(handshake("https://app.example.evil.example"), 403);
    // The 101 response has no body; `request` reads just its head.
    assert_eq!(handshake("https://app.example"), 101);
    assert_eq!(handshake("http://localhost:3000"), 101);
}

#[test]
fn abandoned_and_reset_connections_are_cleaned_up() {
    let herald = Herald::start(&[]);
    let mut bystander = herald.subscriber("t");
    let mut conns = Vec::new();
    // Mid-request, mid-body, mid-frame, mid-fragmented-message, and idle WebSockets.
    let mut c = TcpStream::connect(herald.addr).unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\nHo").unwrap();
    conns.push(c);
    let mut c = TcpStream::connect(herald.addr).unwrap();
    c.write_all(b"POST /publish HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"top")
        .unwrap();
    conns.push(c);
    let mut c = raw_ws(herald.addr, "/echo");
    c.write_all(&masked_frame(0x81, b"hello")[..4]).unwrap();
    conns.push(c);
    let mut c = raw_ws(herald.addr, "/ws?topics=t");
    c.write_all(&masked_frame(0x01, b"{\"op\":")).unwrap();
    conns.push(c);
    conns.push(raw_ws(herald.addr, "/ws?topics=t"));
    assert!(eventually(Duration::from_secs(5), || herald
        .metric("herald_connections")
        == 7.0));
    // Half of them vanish politely (FIN), half with a reset (RST).
    for (i, c) in conns.into_iter().enumerate() {
        if i % 2 == 0 {
            socket2::SockRef::from(&c)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        drop(c);
    }
    assert!(
        eventually(Duration::from_secs(5), || herald
            .metric("herald_connections")
            == 2.0),
        "connections left behind: {}",
        herald.metric("herald_connections")
    );
    assert_eq!(herald.metric("herald_topics"), 1.0);
    assert_eq!(herald.publish("t", "\"ok\"")["delivered"], 1);
    assert_eq!(next_json(&mut bystander)["data"], "ok");
}

#[test]
fn non_http_bytes_get_400_and_close() {
    let herald = Herald::start(&[]);
    let mut conn = HttpConn::connect(herald.addr);
    conn.send(b"SSH-2.0-OpenSSH_9.2\r\n\r\n");
    let r = conn.response();
    assert_eq!(r.status, 400);
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(conn.is_closed());
    let start = Instant::now();
    let mut conn = HttpConn::connect(herald.addr);
    conn.send(&[0u8, 0xff, 0x13, 0x37, b'\r', b'\n', b'\r', b'\n']);
    assert_eq!(conn.response().status, 400);
    assert!(start.elapsed() < Duration::from_secs(2));
}

/// Found by the fuzz test: after a breach, more bytes from the same peer reached
/// tungstenite, whose decoder was left mid-frame, and a debug assertion inside it took the
/// process down. A peer that breaks the protocol now gets its close frame and a FIN, and
/// nothing more it sends is parsed.
#[test]
fn bytes_after_a_protocol_breach_are_not_parsed() {
    let herald = Herald::start(&["--max-message-size", "1000"]);
    let mut declared_huge = vec![0x82, 0x80 | 127];
    declared_huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
    declared_huge.extend_from_slice(&[1, 2, 3, 4]);
    for (bad, code) in [
        (declared_huge, 1009),
        (masked_frame(0x82, &[0; 1001]), 1009),
        (vec![0x81, 0x01, b'x'], 1002),
        (masked_frame(0x81, &[0xff]), 1007),
    ] {
        let mut ws = raw_ws(herald.addr, "/echo");
        ws.write_all(&bad).unwrap();
        assert_eq!(raw_close_code(&mut ws), Some(code));
        // The server has acted on the breach; now more frames, valid and not.
        let _ = ws.write_all(
            &[
                masked_frame(0x81, b"more"),
                vec![0xff; 64],
                masked_frame(0x88, &[3, 232]),
            ]
            .concat(),
        );
        let mut rest = Vec::new();
        let _ = ws.read_to_end(&mut rest);
        assert!(
            rest.is_empty(),
            "the server answered after failing the connection: {rest:?}"
        );
    }
    assert_eq!(herald.request("GET /health HTTP/1.1\r\n\r\n").status, 200);
}

#[test]
fn a_client_pipelining_without_reading_is_cut_off() {
    let herald = Herald::start(&["--send-queue-limit", "100000"]);
    let mut hog = TcpStream::connect(herald.addr).unwrap();
    hog.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let burst = "GET /metrics HTTP/1.1\r\n\r\n".repeat(100);
    for _ in 0..100 {
        if hog.write_all(burst.as_bytes()).is_err() {
            break;
        }
    }
    assert!(eventually(Duration::from_secs(5), || herald
        .metric("herald_slow_consumers_total")
        == 1.0));
    assert!(eventually(Duration::from_secs(5), || herald
        .metric("herald_connections")
        == 1.0));
}

/// Found by the fuzz test: data and the peer's FIN arriving in one readiness event. A
/// short read used to end the read burst, and the FIN behind the data, which raises no
/// event of its own, went unseen: the connection stayed until its next ping.
#[test]
fn data_and_fin_together_still_end_the_connection() {
    let herald = Herald::start(&[]);
    let mut peers = Vec::new();
    for _ in 0..20 {
        let mut ws = raw_ws(herald.addr, "/ws");
        let mut bytes = masked_frame(0x81, br#"{"op":"subscribe","topic":"bye"}"#);
        bytes.extend(masked_frame(0x81, br#"{"op":"ping"}"#));
        ws.write_all(&bytes).unwrap();
        ws.shutdown(std::net::Shutdown::Write).unwrap();
        peers.push(ws);
    }
    let released = eventually(Duration::from_secs(2), || {
        herald.metric("herald_connections") == 1.0
    });
    assert!(
        released,
        "{} connections left",
        herald.metric("herald_connections")
    );
    assert_eq!(herald.metric("herald_topics"), 0.0);
}
