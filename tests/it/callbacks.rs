//! The application decides (issue 18): connect and subscribe callbacks to `--auth-url`,
//! and webhooks to `--webhook-url`, against a real HTTP application (`auth_app.py`,
//! Python's stdlib server with a thread per connection) that authenticates by the session
//! cookie and checks herald's signature as the README says applications should.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;

use crate::util::{
    Client, DEBIAN_PYTHON, Herald, HttpConn, TIMEOUT, eventually, free_port, next_json,
    require_python_module, send_json, without_position,
};

const SECRET: &str = "the-app-and-herald-share-this";
const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

/// The application, stopped (by its PID) when dropped.
struct App {
    child: Child,
    addr: SocketAddr,
}

impl App {
    fn start(args: &[&str]) -> App {
        // Debian's python3 with its standard library (the app uses only that).
        require_python_module("http.server", "python3");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/auth_app.py");
        let mut child = Command::new(DEBIAN_PYTHON)
            .arg(script)
            .arg(SECRET)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the test application");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(TIMEOUT).unwrap_or_default();
        let port: u16 = match line.trim().strip_prefix("PORT ").map(str::parse) {
            Some(Ok(p)) => p,
            _ => {
                let _ = child.kill();
                panic!("the test application did not start: {line:?}");
            }
        };
        App {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn stats(&self) -> Value {
        let mut conn = HttpConn::connect(self.addr);
        let r = conn.exchange(b"GET /stats HTTP/1.1\r\nHost: app\r\n\r\n");
        assert_eq!(r.status, 200);
        r.json()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn herald(app_url: &str, extra: &[&str]) -> Herald {
    let mut args = vec![
        "--auth-url",
        app_url,
        "--auth-secret",
        SECRET,
        "--private-topics",
        "user:*,team:*,vip:*",
    ];
    args.extend_from_slice(extra);
    Herald::start(&args)
}

/// A WebSocket opened with `Cookie: session=NAME`.
fn ws_as(h: &Herald, path: &str, session: &str) -> Result<Client, tungstenite::Error> {
    let stream = TcpStream::connect(h.addr).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut req = format!("ws://{}{path}", h.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Cookie",
        format!("theme=dark; session={session}").parse().unwrap(),
    );
    tungstenite::client::client(req, stream)
        .map(|(ws, _)| ws)
        .map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => panic!("blocking socket"),
        })
}

/// The raw answer to an upgrade with this cookie: status, body, and whether it closed.
fn refused_upgrade(h: &Herald, session: &str) -> (u16, String, bool) {
    let mut conn = h.http();
    let raw = format!("GET /ws HTTP/1.1\r\nHost: t\r\n{UPGRADE}Cookie: session={session}\r\n\r\n");
    let r = conn.exchange(raw.as_bytes());
    let closed = conn.is_closed();
    (r.status, r.text().trim_end().to_string(), closed)
}

fn subscribe(ws: &mut Client, topic: &str) -> Value {
    send_json(ws, json!({"op":"subscribe","topic":topic}));
    next_json(ws)
}

#[test]
fn a_cookie_authenticated_connection_gets_the_apps_grant() {
    let app = App::start(&[]);
    let h = herald(&app.url("/auth"), &["--client-publish", "public"]);
    let mut ws = ws_as(&h, "/ws?topics=user:42", "alice").expect("alice is let in");
    assert_eq!(
        without_position(next_json(&mut ws)),
        json!({"op":"subscribed","topic":"user:42","sub":"42"})
    );
    // The grant's patterns: team:7:* covers team:7:x; user:43 is someone else's.
    assert_eq!(subscribe(&mut ws, "team:7:x")["op"], "subscribed");
    let other = subscribe(&mut ws, "user:43");
    assert_eq!(other["error"], "forbidden", "{other}");
    // The grant's publish claim.
    send_json(&mut ws, json!({"op":"publish","topic":"chat:42","data":1}));
    send_json(&mut ws, json!({"op":"ping"}));
    assert_eq!(
        next_json(&mut ws)["op"],
        "pong",
        "chat:42 publish accepted silently"
    );
    // What the application was sent: the cookie, and only the forwarded headers.
    let stats = app.stats();
    assert_eq!(stats["requests"], 1);
    assert_eq!(stats["forged"], 0, "herald's signature verifies");
    let asked = &stats["last_connect"];
    assert_eq!(asked["path"], "/ws?topics=user:42");
    assert_eq!(asked["remote_addr"], "127.0.0.1");
    assert_eq!(
        asked["headers"],
        json!({"cookie": "theme=dark; session=alice"}),
        "only --auth-forward-headers (cookie, authorization) go to the app"
    );
    let m = h.metrics();
    assert_eq!(m["herald_auth_allowed_total"], 1.0);
    assert_eq!(m["herald_auth_refused_total"], 0.0);
}

#[test]
fn the_apps_401_and_403_reach_the_client_with_their_reason() {
    let app = App::start(&[]);
    let h = herald(&app.url("/auth"), &[]);
    let (status, body, closed) = refused_upgrade(&h, "banned");
    assert_eq!(
        (status, body.as_str()),
        (403, "banned user"),
        "the first line only"
    );
    assert!(closed, "a refused upgrade closes");
    let (status, body, _) = refused_upgrade(&h, "nobody");
    assert_eq!((status, body.as_str()), (401, "no session"));
    assert_eq!(h.metric("herald_auth_refused_total"), 2.0);
    assert_eq!(app.stats()["forged"], 0);
}

#[test]
fn a_slow_app_times_out_into_503_and_close() {
    let app = App::start(&["--delay-ms", "3000"]);
    let h = herald(&app.url("/auth"), &["--auth-timeout", "0.5"]);
    let start = Instant::now();
    let (status, body, closed) = refused_upgrade(&h, "alice");
    assert_eq!((status, body.as_str()), (503, "authentication unavailable"));
    assert!(closed);
    assert!(
        start.elapsed() < Duration::from_millis(2900),
        "answered at the timeout, not when the app answered: {:?}",
        start.elapsed()
    );
    assert_eq!(h.metric("herald_auth_timeouts_total"), 1.0);
    assert_eq!(h.metric("herald_auth_unavailable_total"), 1.0);
    // The loop was not held up meanwhile, and the next handshake is asked afresh.
    let r = h.request("GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
}

#[test]
fn an_app_that_is_down_means_503_never_allow() {
    let port = free_port();
    let h = herald(&format!("http://127.0.0.1:{port}/auth"), &[]);
    for _ in 0..3 {
        let (status, body, closed) = refused_upgrade(&h, "alice");
        assert_eq!(
            (status, body.as_str(), closed),
            (503, "authentication unavailable", true)
        );
    }
    assert_eq!(h.metric("herald_auth_unavailable_total"), 3.0);
    assert_eq!(h.metric("herald_auth_allowed_total"), 0.0);
}

#[test]
fn the_app_rejects_a_forged_signature() {
    let app = App::start(&[]);
    // herald under another secret: the app's check fails, so alice is not let in.
    let h = Herald::start(&[
        "--auth-url",
        &app.url("/auth"),
        "--auth-secret",
        "not-the-shared-secret-at-all",
    ]);
    let (status, body, _) = refused_upgrade(&h, "alice");
    assert_eq!((status, body.as_str()), (401, "bad signature"));
    assert_eq!(app.stats()["forged"], 1);
    // A request made by hand without herald's signature fails too; herald's own, under
    // the shared secret, passes (the other tests).
    let body = r#"{"headers":{"cookie":"session=alice"},"path":"/ws","remote_addr":"1.2.3.4"}"#;
    let mut conn = HttpConn::connect(app.addr);
    let raw = format!(
        "POST /auth HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n\
         X-Herald-Timestamp: 1700000000\r\nX-Herald-Signature: sha256=00\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(conn.exchange(raw.as_bytes()).status, 401);
    assert_eq!(app.stats()["forged"], 2);
}

#[test]
fn auth_subscribe_asks_the_app_once_per_topic_per_connection() {
    let app = App::start(&[]);
    let h = herald(&app.url("/auth"), &["--auth-subscribe"]);
    let mut ws = ws_as(&h, "/ws", "alice").expect("alice is let in");
    // In the grant: no question.
    assert_eq!(subscribe(&mut ws, "user:42")["op"], "subscribed");
    assert_eq!(app.stats()["subscribe_asks"], 0);
    // Beyond it: the app says yes to vip:lounge...
    assert_eq!(subscribe(&mut ws, "vip:lounge")["op"], "subscribed");
    assert_eq!(app.stats()["subscribe_asks"], 1);
    send_json(&mut ws, json!({"op":"unsubscribe","topic":"vip:lounge"}));
    assert_eq!(next_json(&mut ws)["op"], "unsubscribed");
    assert_eq!(subscribe(&mut ws, "vip:lounge")["op"], "subscribed");
    // ...and no to vip:backstage; both answers are kept for the connection.
    for _ in 0..2 {
        let no = subscribe(&mut ws, "vip:backstage");
        assert_eq!(no["error"], "forbidden", "{no}");
    }
    assert_eq!(app.stats()["subscribe_asks"], 2, "each answer cached");
    // Public topics never ask.
    assert_eq!(subscribe(&mut ws, "news")["op"], "subscribed");
    assert_eq!(app.stats()["subscribe_asks"], 2);
    // A second connection asks again: the cache is per connection.
    let mut other = ws_as(&h, "/ws", "alice").expect("alice again");
    assert_eq!(subscribe(&mut other, "vip:lounge")["op"], "subscribed");
    assert_eq!(app.stats()["subscribe_asks"], 3);
}

/// Upgrade requests written on `n` sockets at once; returns how many got 101.
fn storm(addr: SocketAddr, n: usize) -> usize {
    let mut socks = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let raw = format!("GET /ws HTTP/1.1\r\nHost: t\r\n{UPGRADE}Cookie: session=alice\r\n\r\n");
        s.write_all(raw.as_bytes()).unwrap();
        socks.push(s);
    }
    socks
        .into_iter()
        .filter(|s| {
            let mut c = HttpConn::from_stream(s.try_clone().unwrap());
            c.try_response().is_ok_and(|r| r.status == 101)
        })
        .count()
}

#[test]
fn two_thousand_simultaneous_handshakes_never_exceed_the_concurrency_at_the_app() {
    let app = App::start(&["--delay-ms", "2"]);
    let h = herald(
        &app.url("/auth"),
        &["--auth-concurrency", "4", "--handshake-timeout", "120"],
    );
    let opened = storm(h.addr, 2000);
    assert_eq!(opened, 2000, "every handshake waited its turn and got in");
    let stats = app.stats();
    assert_eq!(stats["requests"], 2000);
    let max = stats["max_in_flight"].as_u64().unwrap();
    assert!((1..=4).contains(&max), "the app saw {max} requests at once");
    assert!(h.metric("herald_auth_in_flight_max") <= 4.0);
    assert_eq!(h.metric("herald_auth_allowed_total"), 2000.0);
}

#[test]
fn a_client_that_leaves_while_queued_costs_the_app_nothing() {
    let app = App::start(&["--delay-ms", "1500"]);
    let h = herald(&app.url("/auth"), &["--auth-concurrency", "1"]);
    // The first holds the one slot; the next ten queue behind it and hang up.
    let mut first = TcpStream::connect(h.addr).unwrap();
    let raw = format!("GET /ws HTTP/1.1\r\nHost: t\r\n{UPGRADE}Cookie: session=alice\r\n\r\n");
    first.write_all(raw.as_bytes()).unwrap();
    assert!(eventually(TIMEOUT, || h.metric("herald_auth_in_flight") == 1.0));
    for _ in 0..10 {
        let mut s = TcpStream::connect(h.addr).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
    }
    assert!(eventually(TIMEOUT, || h
        .metric("herald_auth_abandoned_total")
        == 10.0));
    first.set_read_timeout(Some(TIMEOUT)).unwrap();
    let r = HttpConn::from_stream(first).response();
    assert_eq!(r.status, 101);
    assert_eq!(
        app.stats()["requests"],
        1,
        "the ones who left were never asked about"
    );
}

fn hook_events(app: &App) -> Vec<Value> {
    let stats = app.stats();
    stats["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["events"].as_array().unwrap().clone())
        .collect()
}

#[test]
fn webhooks_arrive_batched_and_signed() {
    let app = App::start(&[]);
    let h = Herald::start(&[
        "--webhook-url",
        &app.url("/hook"),
        "--auth-secret",
        SECRET,
        "--presence",
        "room:*",
    ]);
    let mut ws = h.ws("/ws?topics=a,b,c,room:1");
    for _ in 0..4 {
        next_json(&mut ws);
    }
    assert!(eventually(TIMEOUT, || hook_events(&app).len() >= 5));
    let stats = app.stats();
    assert_eq!(stats["forged"], 0, "every webhook verified");
    let first = &stats["hooks"][0];
    assert!(first["time_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert!(
        first["events"].as_array().unwrap().len() >= 2,
        "one POST carries several events: {first}"
    );
    let names: Vec<(String, String)> = hook_events(&app)
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().into(),
                e["topic"].as_str().unwrap().into(),
            )
        })
        .collect();
    for topic in ["a", "b", "c", "room:1"] {
        assert!(
            names.contains(&("topic_occupied".into(), topic.into())),
            "{names:?}"
        );
    }
    assert!(
        names.contains(&("member_added".into(), "room:1".into())),
        "{names:?}"
    );
    // A second subscriber is no news; the last one leaving is.
    let mut second = h.subscriber("a");
    second.close(None).ok();
    drop(ws);
    assert!(eventually(TIMEOUT, || {
        let events = hook_events(&app);
        let vacated = events
            .iter()
            .filter(|e| e["name"] == "topic_vacated")
            .count();
        let removed = events.iter().any(|e| e["name"] == "member_removed");
        vacated == 4 && removed
    }));
    let occupied = hook_events(&app)
        .iter()
        .filter(|e| e["name"] == "topic_occupied")
        .count();
    assert_eq!(occupied, 4, "the second subscriber of a sent nothing");
}

#[test]
fn webhooks_are_retried_while_the_app_is_down_and_overflow_is_counted() {
    let port = free_port();
    let h = Herald::start(&[
        "--webhook-url",
        &format!("http://127.0.0.1:{port}/hook"),
        "--auth-secret",
        SECRET,
        "--webhook-queue",
        "8",
    ]);
    let topics: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    let mut ws = h.ws(&format!("/ws?topics={}", topics.join(",")));
    for _ in 0..20 {
        next_json(&mut ws);
    }
    assert!(eventually(TIMEOUT, || {
        h.metric("herald_webhook_failed_attempts_total") >= 2.0
    }));
    let m = h.metrics();
    assert_eq!(
        m["herald_webhook_events_dropped_total"], 12.0,
        "20 events, room for 8"
    );
    assert_eq!(m["herald_webhook_queued"], 8.0);
    assert!(h.log().contains("webhooks: queue full"), "{}", h.log());
    // The app comes up: the kept events arrive, in order, signed.
    let app = App::start(&["--port", &port.to_string()]);
    assert!(eventually(Duration::from_secs(60), || hook_events(&app)
        .len()
        == 8));
    let got: Vec<Value> = hook_events(&app)
        .iter()
        .map(|e| e["topic"].clone())
        .collect();
    let expected: Vec<Value> = topics[..8].iter().map(|t| json!(t)).collect();
    assert_eq!(got, expected);
    assert_eq!(app.stats()["forged"], 0);
    assert!(eventually(TIMEOUT, || {
        h.metric("herald_webhook_events_delivered_total") == 8.0
    }));
}

#[test]
fn a_drain_refuses_queued_handshakes_and_does_not_wait_for_the_app() {
    let app = App::start(&["--delay-ms", "20000"]);
    let mut h = herald(
        &app.url("/auth"),
        &[
            "--auth-concurrency",
            "1",
            "--auth-timeout",
            "30",
            "--drain-timeout",
            "2",
        ],
    );
    let raw = format!("GET /ws HTTP/1.1\r\nHost: t\r\n{UPGRADE}Cookie: session=alice\r\n\r\n");
    let mut conns: Vec<HttpConn> = (0..4)
        .map(|_| {
            let mut c = h.http();
            c.send(raw.as_bytes());
            c
        })
        .collect();
    assert!(eventually(TIMEOUT, || h.metric("herald_auth_queued") == 3.0));
    let start = Instant::now();
    h.signal(15);
    // The three still queued are refused at once, with the drain's 503.
    let refused = conns
        .iter_mut()
        .filter_map(|c| c.try_response().ok())
        .filter(|r| r.status == 503 && r.text().trim_end() == "draining")
        .count();
    assert_eq!(refused, 3);
    // The one at the app is abandoned at --drain-timeout, not after the app's 20 s.
    let status = h.wait(Duration::from_secs(10)).expect("herald exits");
    assert!(status.success(), "{status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(app.stats()["requests"], 1);
}

#[test]
fn a_client_cannot_queue_unbounded_questions_for_the_app() {
    let app = App::start(&["--delay-ms", "1000"]);
    let h = herald(&app.url("/auth"), &["--auth-subscribe"]);
    let mut ws = ws_as(&h, "/ws", "alice").expect("alice is let in");
    for i in 0..20 {
        send_json(
            &mut ws,
            json!({"op":"subscribe","topic":format!("vip:t{i}")}),
        );
    }
    // 16 are asked (MAX_ASKS_PER_CONNECTION); the 4 beyond are refused at once, before
    // any answer from the app (which takes a second each).
    let mut errors = Vec::new();
    for _ in 0..20 {
        errors.push(
            next_json(&mut ws)["error"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    assert_eq!(&errors[..4], ["busy", "busy", "busy", "busy"], "{errors:?}");
    assert!(errors[4..].iter().all(|e| e == "forbidden"), "{errors:?}");
    assert_eq!(app.stats()["subscribe_asks"], 16);
}

fn count(app: &App, name: &str, topic: &str) -> usize {
    hook_events(app)
        .iter()
        .filter(|e| e["name"] == name && e["topic"] == topic)
        .count()
}

#[test]
fn with_redis_a_topic_is_occupied_and_vacated_once_for_the_cluster() {
    let redis = crate::redis::RedisServer::start();
    let app = App::start(&[]);
    let hook = app.url("/hook");
    let args = [
        "--webhook-url",
        hook.as_str(),
        "--auth-secret",
        SECRET,
        "--presence",
        "lobby",
        "--token-secret",
        SECRET,
    ];
    let h1 = crate::redis::herald_with(&redis, &args);
    let h2 = crate::redis::herald_with(&redis, &args);
    let ws1 = h1.subscriber("room");
    let ws2 = h2.subscriber("room");
    assert!(eventually(TIMEOUT, || count(
        &app,
        "topic_occupied",
        "room"
    ) == 1));
    drop(ws1);
    // h1 has no subscriber left, h2 still has one: no news. Give a wrong event time to come.
    assert!(eventually(TIMEOUT, || h1.metric("herald_topics") == 0.0));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&app, "topic_vacated", "room"), 0);
    drop(ws2);
    assert!(eventually(TIMEOUT, || count(&app, "topic_vacated", "room") == 1));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        count(&app, "topic_occupied", "room"),
        1,
        "each sent once, by one process"
    );
    assert_eq!(count(&app, "topic_vacated", "room"), 1);

    // User 42 in the lobby through both processes: added once, removed once, by whichever
    // process saw the first arrival and the last departure.
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "42", "exp": 4_000_000_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let path = format!("/ws?topics=lobby&token={token}");
    let mut a = h1.ws(&path);
    let mut b = h2.ws(&path);
    next_json(&mut a);
    next_json(&mut b);
    let members = |name| {
        hook_events(&app)
            .iter()
            .filter(|e| e["name"] == name && e["topic"] == "lobby" && e["member"] == "42")
            .count()
    };
    assert!(eventually(TIMEOUT, || members("member_added") == 1));
    drop(a);
    assert!(eventually(TIMEOUT, || h1.metric("herald_topics") == 0.0));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(members("member_removed"), 0, "still there through h2");
    drop(b);
    assert!(eventually(TIMEOUT, || members("member_removed") == 1));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!((members("member_added"), members("member_removed")), (1, 1));

    // A process that dies with the only subscriber: another one's sweep reports the topic
    // vacated once the dead one's membership expires (15 s, swept every 5 s).
    let _solo = h1.subscriber("solo");
    assert!(eventually(TIMEOUT, || count(
        &app,
        "topic_occupied",
        "solo"
    ) == 1));
    drop(h1); // SIGKILL: no leave is ever sent
    assert!(eventually(Duration::from_secs(60), || {
        count(&app, "topic_vacated", "solo") == 1
    }));
    assert_eq!(app.stats()["forged"], 0);
}

#[test]
fn cookies_sent_in_several_headers_reach_the_app_joined() {
    let app = App::start(&[]);
    let h = herald(
        &app.url("/auth"),
        &["--auth-forward-headers", "cookie,x-tenant"],
    );
    let mut conn = h.http();
    let raw = format!(
        "GET /ws HTTP/1.1\r\nHost: t\r\n{UPGRADE}Cookie: theme=dark\r\nCookie: session=alice\r\n\
         X-Tenant: acme\r\nAuthorization: Bearer not-forwarded\r\n\r\n"
    );
    assert_eq!(conn.exchange(raw.as_bytes()).status, 101);
    assert_eq!(
        app.stats()["last_connect"]["headers"],
        json!({"cookie": "theme=dark; session=alice", "x-tenant": "acme"})
    );
}

#[test]
fn a_valid_token_needs_no_callback_and_an_invalid_one_is_the_apps_to_judge() {
    let port = free_port(); // no application at all
    let h = herald(
        &format!("http://127.0.0.1:{port}/auth"),
        &["--token-secret", SECRET],
    );
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "42", "exp": 4_000_000_000u64, "topics": ["user:42"]}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut ws = h.ws(&format!("/ws?topics=user:42&token={token}"));
    assert_eq!(next_json(&mut ws)["op"], "subscribed");
    assert_eq!(h.metric("herald_auth_requests_total"), 0.0);
    let mut conn = h.http();
    let raw = format!("GET /ws?token=forged HTTP/1.1\r\nHost: t\r\n{UPGRADE}\r\n");
    assert_eq!(
        conn.exchange(raw.as_bytes()).status,
        503,
        "asked, and the app is down"
    );
}

/// A live upgrade (SIGUSR2) carries what the application decided and what it has not yet
/// been told: the connection's grant and its cached subscribe answers (nothing is asked
/// again), the webhooks still undelivered (the app was down; they arrive from the new
/// binary), and every counter.
#[test]
fn a_live_upgrade_carries_grants_cached_answers_and_undelivered_webhooks() {
    use crate::upgrade::{install, metrics_of, scratch, start_from, upgrade_to};
    let app = App::start(&[]);
    let hooks_port = free_port();
    let dir = scratch("callbacks");
    let exe = dir.join("herald");
    install(&exe, "cb-old");
    let hook_url = format!("http://127.0.0.1:{hooks_port}/hook");
    let h = start_from(
        &exe,
        &[
            "--auth-url",
            &app.url("/auth"),
            "--auth-secret",
            SECRET,
            "--private-topics",
            "user:*,team:*,vip:*",
            "--auth-subscribe",
            "--webhook-url",
            &hook_url,
        ],
        &[],
    );
    let mut ws = ws_as(&h, "/ws?topics=user:42", "alice").expect("alice is let in");
    assert_eq!(next_json(&mut ws)["op"], "subscribed");
    assert_eq!(subscribe(&mut ws, "vip:lounge")["op"], "subscribed");
    assert_eq!(subscribe(&mut ws, "news")["op"], "subscribed");
    let before = app.stats();
    assert_eq!(
        (
            before["requests"].as_u64(),
            before["subscribe_asks"].as_u64()
        ),
        (Some(2), Some(1))
    );
    // Nothing listens on the webhook port: the occupied events wait, retried.
    assert!(eventually(TIMEOUT, || {
        metrics_of(&h)
            .get("herald_webhook_failed_attempts_total")
            .is_some_and(|v| *v >= 1.0)
    }));
    let old = metrics_of(&h);

    let new = upgrade_to(&h, &exe, "cb-new");
    for (name, value) in old.iter().filter(|(k, _)| {
        (k.starts_with("herald_auth_") || k.starts_with("herald_webhook_")) && k.ends_with("_total")
    }) {
        let now = new.get(name).copied().unwrap_or(0.0);
        assert!(
            now >= *value,
            "{name} went from {value} to {now} across the upgrade"
        );
    }
    assert!(
        new["herald_webhook_queued"] >= 3.0,
        "the undelivered events came along: {new:?}"
    );

    // The grant and the cached answer: the application is asked nothing new.
    send_json(&mut ws, json!({"op":"unsubscribe","topic":"vip:lounge"}));
    assert_eq!(next_json(&mut ws)["op"], "unsubscribed");
    assert_eq!(subscribe(&mut ws, "vip:lounge")["op"], "subscribed");
    assert_eq!(subscribe(&mut ws, "team:7:x")["op"], "subscribed");
    let after = app.stats();
    assert_eq!(
        (after["requests"].as_u64(), after["subscribe_asks"].as_u64()),
        (Some(2), Some(1)),
        "nothing asked again after the upgrade"
    );
    // A topic neither granted nor answered is still the application's to decide.
    assert_eq!(subscribe(&mut ws, "user:43")["error"], "forbidden");
    assert_eq!(app.stats()["subscribe_asks"], 2);
    assert_eq!(h.publish("news", "1")["delivered"], 1);
    assert_eq!(next_json(&mut ws)["op"], "message");

    // The webhook application comes up: the old binary's events arrive from the new one.
    let hooks = App::start(&["--port", &hooks_port.to_string()]);
    assert!(
        eventually(Duration::from_secs(40), || {
            let events = hook_events(&hooks);
            ["user:42", "vip:lounge", "news"].iter().all(|t| {
                events
                    .iter()
                    .any(|e| e["name"] == "topic_occupied" && e["topic"] == *t)
            })
        }),
        "carried events: {:?}\n{}",
        hook_events(&hooks),
        h.log()
    );
    assert_eq!(hooks.stats()["forged"], 0);
    let _ = std::fs::remove_dir_all(&dir);
}
