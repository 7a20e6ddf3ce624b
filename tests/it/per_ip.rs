//! Limits per client address (issue 16, part 4), with the real binary and the real
//! HAProxy running the shipped `haproxy/haproxy.cfg` (send-proxy-v2): loopback source
//! addresses 127.0.0.x stand for distinct clients, and herald trusts only 127.0.0.1
//! (HAProxy's side) to name them. Also the op rate, the subscription cap and
//! `--metrics-listen`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::{
    Herald, HttpConn, HttpResponse, TIMEOUT, eventually, free_port, next_json, parse_metrics,
    require, send_json,
};

const UPGRADE: &str = "GET /ws?topics=t HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\
                       Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                       Sec-WebSocket-Version: 13\r\n";

/// A TCP connection to `to` from the loopback address `127.0.0.{last}`.
fn connect_from(last: u8, to: SocketAddr) -> TcpStream {
    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0);
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&src.into()).expect("bind a loopback source");
    socket.connect(&to.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// An upgrade to `/ws?topics=t` from `127.0.0.{last}` with extra headers: the response
/// and, when it is 101, the open connection.
fn upgrade_from(last: u8, to: SocketAddr, headers: &str) -> (HttpResponse, HttpConn) {
    let mut conn = HttpConn::from_stream(connect_from(last, to));
    let r = conn.exchange(format!("{UPGRADE}{headers}\r\n").as_bytes());
    (r, conn)
}

/// A PROXY protocol v2 header as HAProxy writes it: PROXY, TCP over IPv4.
fn proxy_v2(client: Ipv4Addr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    h.extend_from_slice(&client.octets());
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&40_000u16.to_be_bytes());
    h.extend_from_slice(&8080u16.to_be_bytes());
    h
}

fn refusals(herald: &Herald, reason: &str) -> f64 {
    herald.metric(&format!("herald_refusals_total{{reason=\"{reason}\"}}"))
}

/// HAProxy with the shipped configuration in front of one herald.
struct HaProxy {
    child: Child,
    public: SocketAddr,
    stats: SocketAddr,
}

impl HaProxy {
    fn start(herald: SocketAddr, agent: SocketAddr) -> HaProxy {
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
            .env("HERALD_BACKEND", herald.to_string())
            .env("HERALD_AGENT_PORT", agent.port().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let haproxy = HaProxy {
            child,
            public,
            stats,
        };
        // Its health checks go through the PROXY protocol too (a LOCAL header): herald
        // must answer them for the server to be UP with a layer-7 OK.
        assert!(
            eventually(Duration::from_secs(15), || {
                let row = haproxy.server();
                row.get("status").map(String::as_str) == Some("UP")
                    && row.get("check_status").map(String::as_str) == Some("L7OK")
            }),
            "herald never passed HAProxy's health check: {:?}",
            haproxy.server()
        );
        haproxy
    }

    /// The stats CSV row of `herald/herald1`, by column.
    fn server(&self) -> HashMap<String, String> {
        let Ok(mut stream) = TcpStream::connect(self.stats) else {
            return HashMap::new();
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = String::new();
        if stream.write_all(b"GET /;csv HTTP/1.0\r\n\r\n").is_err()
            || stream.read_to_string(&mut answer).is_err()
        {
            return HashMap::new();
        }
        let Some((head, body)) = answer.split_once("\r\n\r\n") else {
            return HashMap::new();
        };
        let csv = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            crate::deploy::dechunk(body)
        } else {
            body.to_string()
        };
        let mut lines = csv.lines();
        let Some(header) = lines.next() else {
            return HashMap::new();
        };
        let names: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[0] == "herald" && f[1] == "herald1")
            .map(|f| {
                names
                    .iter()
                    .zip(f)
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// herald trusting only 127.0.0.1 (HAProxy) to name clients, with its agent, behind the
/// shipped HAProxy.
fn behind_haproxy(flags: &[&str]) -> (Herald, HaProxy) {
    let agent: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let agent_text = agent.to_string();
    let mut args = vec![
        "--trusted-proxies",
        "127.0.0.1",
        "--agent-listen",
        agent_text.as_str(),
    ];
    args.extend_from_slice(flags);
    let herald = Herald::start(&args);
    let haproxy = HaProxy::start(herald.addr, agent);
    (herald, haproxy)
}

#[test]
fn connections_per_client_address_are_capped_through_haproxy_and_released_on_close() {
    let (herald, haproxy) = behind_haproxy(&["--max-connections-per-ip", "2"]);
    // Each of 127.0.0.2's connections forges another X-Forwarded-For: the PROXY header
    // HAProxy writes is what herald believes.
    let (a, _a) = upgrade_from(2, haproxy.public, "X-Forwarded-For: 198.51.100.1\r\n");
    assert_eq!(a.status, 101, "{}", a.text());
    let (b, b_conn) = upgrade_from(2, haproxy.public, "X-Forwarded-For: 198.51.100.2\r\n");
    assert_eq!(b.status, 101, "{}", b.text());
    let (third, _) = upgrade_from(2, haproxy.public, "X-Forwarded-For: 198.51.100.3\r\n");
    assert_eq!(third.status, 429, "{}", third.text());
    assert_eq!(third.text(), "too many connections from your address\n");
    // A plain request names no client in X-Forwarded-For; only the PROXY header can have
    // counted this connection as 127.0.0.2's.
    let mut js = HttpConn::from_stream(connect_from(2, haproxy.public));
    let r = js.exchange(b"GET /herald.js HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 429, "{}", r.text());
    // Another client address is another client, behind the same proxy.
    let (other, _other) = upgrade_from(3, haproxy.public, "");
    assert_eq!(other.status, 101, "{}", other.text());
    assert_eq!(refusals(&herald, "max_connections_per_ip"), 2.0);
    assert!(herald.metric("herald_client_addresses") >= 2.0);
    // One of 127.0.0.2's connections ends: it may open another.
    drop(b_conn);
    assert!(
        eventually(Duration::from_secs(5), || herald
            .metric("herald_websockets")
            == 2.0),
        "the closed WebSocket is still counted"
    );
    let (again, _again) = upgrade_from(2, haproxy.public, "");
    assert_eq!(again.status, 101, "{}", again.text());
}

#[test]
fn connect_rate_per_client_address_through_haproxy_is_a_bucket_that_refills() {
    let (herald, haproxy) = behind_haproxy(&[
        "--connect-rate-per-ip",
        "1/s",
        "--connect-burst-per-ip",
        "3",
    ]);
    // A burst of three, kept open, then the fourth is refused with when to retry.
    let mut open = Vec::new();
    let start = Instant::now();
    for _ in 0..3 {
        let (r, conn) = upgrade_from(4, haproxy.public, "");
        assert_eq!(r.status, 101, "{}", r.text());
        open.push(conn);
    }
    let (fourth, _) = upgrade_from(4, haproxy.public, "");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "the burst took {:?}: too slow to test a 1/s refill",
        start.elapsed()
    );
    assert_eq!(fourth.status, 429, "{}", fourth.text());
    assert_eq!(fourth.header("Retry-After"), Some("1"));
    assert_eq!(refusals(&herald, "connect_rate_per_ip"), 1.0);
    // Another address has its own bucket.
    let (other, _other) = upgrade_from(5, haproxy.public, "");
    assert_eq!(other.status, 101);
    // A second later the bucket holds one more.
    std::thread::sleep(Duration::from_millis(1200));
    let (later, _later) = upgrade_from(4, haproxy.public, "");
    assert_eq!(later.status, 101, "{}", later.text());
}

#[test]
fn what_an_untrusted_peer_claims_is_ignored_or_refused() {
    let herald = Herald::start(&[
        "--trusted-proxies",
        "127.0.0.1",
        "--max-connections-per-ip",
        "1",
    ]);
    // 127.0.0.6 is not a trusted proxy: X-Forwarded-For from it names nobody, so its
    // second WebSocket counts against its own address whatever the header says.
    let (first, _first) = upgrade_from(6, herald.addr, "X-Forwarded-For: 203.0.113.1\r\n");
    assert_eq!(first.status, 101);
    let (second, _) = upgrade_from(6, herald.addr, "X-Forwarded-For: 203.0.113.2\r\n");
    assert_eq!(second.status, 429, "{}", second.text());
    // A PROXY header from it is refused with the reason.
    let mut forged = HttpConn::from_stream(connect_from(7, herald.addr));
    let mut bytes = proxy_v2(Ipv4Addr::new(203, 0, 113, 9));
    bytes.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = forged.exchange(&bytes);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("--trusted-proxies"), "{}", r.text());
    assert!(forged.is_closed());
    assert_eq!(refusals(&herald, "proxy_header_untrusted"), 1.0);
    // From the trusted 127.0.0.1, the same header is believed, even in two pieces.
    let mut proxied = HttpConn::connect(herald.addr);
    let header = proxy_v2(Ipv4Addr::new(203, 0, 113, 9));
    proxied.send(&header[..7]);
    std::thread::sleep(Duration::from_millis(100));
    proxied.send(&header[7..]);
    let r = proxied.exchange(format!("{UPGRADE}\r\n").as_bytes());
    assert_eq!(r.status, 101, "{}", r.text());
    let mut again = HttpConn::connect(herald.addr);
    again.send(&proxy_v2(Ipv4Addr::new(203, 0, 113, 9)));
    let r = again.exchange(format!("{UPGRADE}\r\n").as_bytes());
    assert_eq!(r.status, 429, "{}", r.text());
}

#[test]
fn an_op_flood_is_rate_limited_then_closed_with_1008_and_others_go_on() {
    let herald = Herald::start(&["--client-op-rate", "5/s", "--client-op-burst", "5"]);
    let mut calm = herald.subscriber("t");
    let mut flood = herald.ws("/ws");
    // Sent at once, without reading: far more than 5 per second.
    for _ in 0..40 {
        send_json(&mut flood, json!({"op":"ping"}));
    }
    let mut pongs = 0;
    let mut limited = 0;
    let code = loop {
        match flood.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                match v["op"].as_str() {
                    Some("pong") => pongs += 1,
                    Some("error") => {
                        assert_eq!(v["error"], "rate_limited", "{v}");
                        limited += 1;
                    }
                    _ => panic!("unexpected {v}"),
                }
            }
            Ok(tungstenite::Message::Close(Some(frame))) => break u16::from(frame.code),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(code, 1008);
    // The burst of 5, plus what refilled while the 40 arrived (a loaded machine is slow).
    assert!((5..=15).contains(&pongs), "{pongs} pongs");
    assert!(limited >= 5, "{limited} rate_limited errors");
    assert_eq!(refusals(&herald, "client_op_rate_closed"), 1.0);
    // The calm subscriber was not touched.
    assert_eq!(herald.publish("t", "1")["delivered"], 1);
    assert_eq!(next_json(&mut calm)["op"], "message");
    // A client told `rate_limited` that waits is served again.
    // Twelve at once: the burst, then refusals, short of the 10 that would close it.
    let mut patient = herald.ws("/ws");
    for _ in 0..12 {
        send_json(&mut patient, json!({"op":"ping"}));
    }
    let replies: Vec<_> = (0..12).map(|_| next_json(&mut patient)).collect();
    assert!(
        replies.iter().any(|r| r["error"] == "rate_limited"),
        "{replies:?}"
    );
    // Seven tokens below empty at worst; at 5/s, 2.5 s refills the whole burst.
    std::thread::sleep(Duration::from_millis(2500));
    send_json(&mut patient, json!({"op":"ping"}));
    assert_eq!(next_json(&mut patient)["op"], "pong");
}

#[test]
fn subscriptions_past_the_cap_are_unavailable_until_some_end() {
    let herald = Herald::start(&["--max-subscriptions", "3"]);
    let mut a = herald.ws("/ws?topics=a,b,c,d");
    let replies: Vec<_> = (0..4).map(|_| next_json(&mut a)).collect();
    let refused: Vec<_> = replies.iter().filter(|r| r["op"] == "error").collect();
    assert_eq!(refused.len(), 1, "{replies:?}");
    assert_eq!(refused[0]["error"], "unavailable");
    let m = herald.metrics();
    assert_eq!(m["herald_subscriptions"], 3.0);
    assert_eq!(m["herald_max_subscriptions"], 3.0);
    let mut b = herald.ws("/ws");
    send_json(&mut b, json!({"op":"subscribe","topic":"e"}));
    assert_eq!(next_json(&mut b)["error"], "unavailable");
    // A resume is a subscribe too.
    send_json(
        &mut b,
        json!({"op":"subscribe","topic":"a","since":0,"epoch":"x"}),
    );
    assert_eq!(next_json(&mut b)["error"], "unavailable");
    // An unsubscribe makes room for one.
    send_json(&mut a, json!({"op":"unsubscribe","topic":"a"}));
    assert_eq!(next_json(&mut a)["op"], "unsubscribed");
    send_json(&mut b, json!({"op":"subscribe","topic":"e"}));
    assert_eq!(next_json(&mut b)["op"], "subscribed");
    // A connection that ends gives back all of its.
    drop(a);
    assert!(
        eventually(Duration::from_secs(5), || herald
            .metric("herald_subscriptions")
            == 1.0),
        "a closed connection's subscriptions are still counted"
    );
    for topic in ["f", "g"] {
        send_json(&mut b, json!({"op":"subscribe","topic":topic}));
        assert_eq!(next_json(&mut b)["op"], "subscribed");
    }
    assert_eq!(refusals(&herald, "max_subscriptions"), 3.0);
}

#[test]
fn metrics_listen_serves_metrics_apart_and_the_main_port_stops() {
    let port = free_port();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let herald = Herald::start(&["--metrics-listen", &metrics_addr.to_string()]);
    assert!(
        herald
            .log()
            .contains(&format!("metrics on http://{metrics_addr}/metrics"))
    );
    let main = herald.request("GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(main.status, 404);
    let mut scrape = HttpConn::connect(metrics_addr);
    let r = scrape.exchange(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    let m = parse_metrics(&r.text());
    assert_eq!(m["herald_max_subscriptions"], 1_000_000.0);
    // Keep-alive: the scraper's connection is one of them.
    assert!(m["herald_connections"] >= 1.0);
    let r = scrape.exchange(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    let r = scrape.exchange(b"GET /ws HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 404);
    let r = scrape.exchange(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(
        parse_metrics(&r.text())["herald_http_responses_total{status=\"404\"}"],
        2.0
    );
}

#[test]
fn require_proxy_protocol_refuses_a_trusted_peer_without_a_header() {
    let herald = Herald::start(&["--require-proxy-protocol"]);
    let r = herald.request("GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 400);
    assert!(
        r.text().contains("--require-proxy-protocol"),
        "{}",
        r.text()
    );
    let mut conn = HttpConn::connect(herald.addr);
    let mut bytes = proxy_v2(Ipv4Addr::new(192, 0, 2, 77));
    bytes.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(conn.exchange(&bytes).status, 200);
    let r = conn.exchange(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    let m = parse_metrics(&r.text());
    assert_eq!(
        m["herald_refusals_total{reason=\"proxy_header_missing\"}"],
        1.0
    );
}
