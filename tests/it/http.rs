//! The HTTP side of the one port: keep-alive, pipelining, statuses, health, metrics.

use serde_json::json;

use crate::util::{Herald, next_json};

const UPGRADE: &str =
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[test]
fn hundred_sequential_requests_share_one_keep_alive_connection() {
    let herald = Herald::start(&[]);
    let mut conn = herald.http();
    for i in 0..100 {
        let raw = if i % 2 == 0 {
            "GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
        } else {
            "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n"
        };
        conn.send(raw.as_bytes());
        let r = conn.response();
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(
            r.header("Connection"),
            None,
            "request {i} must keep the connection"
        );
    }
    // Exactly one connection was used for all of it (plus the one asking now).
    assert_eq!(herald.metric("herald_connections_accepted_total"), 2.0);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let herald = Herald::start(&[]);
    let body = r#"{"topic":"p","data":"x"}"#;
    let raw = format!(
        "GET /health HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\nPOST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}\
         POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}GET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
        body.len(),
        body.len()
    );
    let mut conn = herald.http();
    // Byte by byte as well as in one write: the parser must not care where reads split.
    for chunked in [false, true] {
        let mut conn2;
        let c = if chunked {
            conn2 = herald.http();
            for b in raw.as_bytes() {
                conn2.send(std::slice::from_ref(b));
            }
            &mut conn2
        } else {
            conn.send(raw.as_bytes());
            &mut conn
        };
        let statuses: Vec<u16> = (0..5).map(|_| c.response().status).collect();
        assert_eq!(statuses, [200, 404, 200, 200, 200]);
        assert!(c.is_closed(), "Connection: close must end the connection");
    }
    let m = herald.metrics();
    assert_eq!(m["herald_messages_published_total"], 4.0);
}

#[test]
fn error_statuses_carry_a_one_line_reason() {
    let herald = Herald::start(&["--api-key", "sekrit", "--max-message-size", "100"]);
    let big_head = format!(
        "GET /health HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    let body = r#"{"topic":"t","data":1}"#;
    let cases: Vec<(String, u16)> = vec![
        ("\x16\x03\x01\x02\x00\x01\x00\x01\x7f\x03\x03garbage\r\n\r\n".to_string(), 400),
        (format!("POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len()), 401),
        (format!("POST /publish HTTP/1.1\r\nAuthorization: Bearer wrong\r\nContent-Length: {}\r\n\r\n{body}", body.len()), 401),
        ("GET /nowhere HTTP/1.1\r\n\r\n".to_string(), 404),
        ("GET /publish HTTP/1.1\r\n\r\n".to_string(), 405),
        ("POST /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_string(), 405),
        (format!("POST /publish HTTP/1.1\r\nAuthorization: Bearer sekrit\r\nContent-Length: 101\r\n\r\n{}", "x".repeat(101)), 413),
        ("GET /ws HTTP/1.1\r\n\r\n".to_string(), 426),
        (format!("GET /ws HTTP/1.1\r\n{UPGRADE}Sec-WebSocket-Version: 8\r\n\r\n"), 426),
        (big_head, 431),
        ("POST /publish HTTP/1.1\r\nAuthorization: Bearer sekrit\r\nContent-Length: 9\r\n\r\nnot json!".to_string(), 400),
    ];
    for (raw, want) in cases {
        let r = herald.request(&raw);
        let shown = &raw[..raw.len().min(60)];
        assert_eq!(r.status, want, "{shown:?} -> {}", r.text());
        let text = r.text();
        assert!(
            text.ends_with('\n') && text.trim().lines().count() == 1 && text.len() > 3,
            "{shown:?}: {text:?}"
        );
        if want == 426 {
            assert_eq!(r.header("Sec-WebSocket-Version"), Some("13"));
        }
        if want == 405 {
            assert!(r.header("Allow").is_some());
        }
    }
    // The right key publishes.
    let raw = format!(
        "POST /publish HTTP/1.1\r\nAuthorization: Bearer sekrit\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(herald.request(&raw).status, 200);
}

#[test]
fn publish_without_a_key_is_refused_from_a_non_loopback_peer() {
    // Bind the wildcard address and come in through a non-loopback local address, if the
    // machine has one; loopback peers are the only ones allowed without --api-key.
    let Some(ip) = non_loopback_local_ip() else {
        eprintln!("no non-loopback address on this machine; checking the loopback side only");
        let herald = Herald::start(&[]);
        assert_eq!(herald.publish("t", "1")["delivered"], 0);
        return;
    };
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(["--listen", "0.0.0.0:0"]);
    let herald = Herald::spawn(cmd);
    let addr = std::net::SocketAddr::new(ip, herald.addr.port());
    let mut conn = crate::util::HttpConn::connect(addr);
    let body = r#"{"topic":"t","data":1}"#;
    conn.send(
        format!(
            "POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(conn.response().status, 403);
}

fn non_loopback_local_ip() -> Option<std::net::IpAddr> {
    // Connecting a UDP socket sends nothing; it only picks the outgoing address.
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect("10.255.255.255:9").ok()?;
    let ip = sock.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn health_and_head_requests() {
    let herald = Herald::start(&[]);
    let r = herald.request("GET /health HTTP/1.1\r\n\r\n");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let mut conn = herald.http();
    conn.send(b"HEAD /health HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n");
    // The HEAD answer has a length but no body, so the next response follows directly.
    let head = conn.response_head_only();
    assert_eq!(head, 200);
    assert_eq!(conn.response().text(), "ok\n");
}

#[test]
fn expect_continue_gets_100_before_the_body() {
    let herald = Herald::start(&[]);
    let mut conn = herald.http();
    let body = r#"{"topic":"t","data":"big"}"#;
    conn.send(
        format!(
            "POST /publish HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(conn.response().status, 100);
    conn.send(body.as_bytes());
    assert_eq!(conn.response().json(), json!({"id":1,"delivered":0}));
}

#[test]
fn metrics_count_what_happened() {
    let herald = Herald::start(&[]);
    let mut a = herald.subscriber("m");
    let mut b = herald.subscriber("m");
    let _c = herald.subscriber("other");
    let mut api = herald.http();
    for _ in 0..3 {
        api.publish("m", "{}");
    }
    for ws in [&mut a, &mut b] {
        for _ in 0..3 {
            assert_eq!(next_json(ws)["op"], "message");
        }
    }
    herald.request("GET /nope HTTP/1.1\r\n\r\n");
    let m = herald.metrics();
    assert_eq!(m["herald_messages_published_total"], 3.0);
    assert_eq!(m["herald_messages_delivered_total"], 6.0);
    assert_eq!(m["herald_websockets"], 3.0);
    assert_eq!(m["herald_topics"], 2.0);
    // 3 WebSockets, the publisher, the 404 and this scrape.
    assert_eq!(m["herald_connections_accepted_total"], 6.0);
    // Open now: the same minus the 404's, once herald has seen that one close.
    let open = || herald.metric("herald_connections") == 5.0;
    assert!(crate::util::eventually(
        std::time::Duration::from_secs(5),
        open
    ));
    assert_eq!(m["herald_http_responses_total{status=\"101\"}"], 3.0);
    assert_eq!(m["herald_http_responses_total{status=\"404\"}"], 1.0);
    assert_eq!(m["herald_http_responses_total{status=\"200\"}"], 3.0);
    assert_eq!(m["herald_draining"], 0.0);
    for name in [
        "herald_slow_consumers_total",
        "herald_fd_limit",
        "herald_connections_accepted_total",
    ] {
        assert!(m.contains_key(name), "{name}");
    }
    drop(a);
    drop(b);
}
