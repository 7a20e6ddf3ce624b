//! Several herald processes sharing topics through a real redis-server, which each test
//! starts on its own loopback port (`scripts/test` installs it).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::util::{Client, Herald, HttpConn, eventually, next_json, require, send_json};

pub struct RedisServer {
    child: Child,
    pub(crate) port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = crate::util::free_port();
        RedisServer::on(port)
    }

    pub(crate) fn on(port: u16) -> RedisServer {
        require("redis-server", "redis-server");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        assert!(
            eventually(Duration::from_secs(10), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "redis-server did not start"
        );
        RedisServer { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Send raw RESP, as another client of this Redis would.
    fn send(&self, resp: &[u8]) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(resp).unwrap();
        let mut reply = [0u8; 64];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read(&mut reply);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn herald_with(redis: &RedisServer, extra: &[&str]) -> Herald {
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str()];
    args.extend_from_slice(extra);
    let herald = Herald::start(&args);
    assert!(
        eventually(Duration::from_secs(10), || herald.metric("herald_redis_up")
            == 1.0),
        "no Redis link"
    );
    herald
}

fn ids(ws: &mut Client, n: usize) -> Vec<(u64, u64)> {
    (0..n)
        .map(|_| {
            let m = next_json(ws);
            assert_eq!(m["op"], "message", "{m}");
            (m["id"].as_u64().unwrap(), m["data"].as_u64().unwrap())
        })
        .collect()
}

/// Read `up-a`'s messages to the end of `all` (the subscriber joined after some were
/// published): the ids must be exactly the tail of `all`. Returns how many it got.
fn ids_after(ws: &mut Client, all: &[u64]) -> usize {
    let first = next_json(ws);
    assert_eq!(first["op"], "message", "{first}");
    let start = first["id"].as_u64().unwrap();
    let want: Vec<u64> = all.iter().copied().filter(|&id| id >= start).collect();
    let mut got = vec![start];
    while got.len() < want.len() {
        let m = next_json(ws);
        assert_eq!(m["op"], "message", "{m}");
        got.push(m["id"].as_u64().unwrap());
    }
    assert_eq!(got, want);
    expect_nothing_pending(ws);
    got.len()
}

fn expect_nothing_pending(ws: &mut Client) {
    send_json(ws, json!({"op":"ping"}));
    assert_eq!(next_json(ws), json!({"op":"pong"}));
}

#[test]
fn three_processes_deliver_every_message_once_in_one_order_with_the_same_ids() {
    let redis = RedisServer::start();
    let heralds: Vec<Herald> = (0..3).map(|_| herald_with(&redis, &[])).collect();
    // `subscribed` comes only once Redis has confirmed the channel, so publishing right
    // after it must not miss anything.
    let mut subs: Vec<Client> = heralds
        .iter()
        .flat_map(|h| [h.subscriber("shared"), h.subscriber("shared")])
        .collect();
    let mut apis: Vec<HttpConn> = heralds.iter().map(Herald::http).collect();
    for i in 1..=30u64 {
        let reply = apis[(i % 3) as usize].publish("shared", &i.to_string());
        assert_eq!(reply["id"], i, "ids are global per topic");
        assert_eq!(
            reply["delivered"], 3,
            "three processes received it: {reply}"
        );
    }
    let want: Vec<(u64, u64)> = (1..=30).map(|i| (i, i)).collect();
    for (n, ws) in subs.iter_mut().enumerate() {
        assert_eq!(ids(ws, 30), want, "subscriber {n}");
        expect_nothing_pending(ws);
    }
    // A client publish goes through Redis too.
    let url = redis.url();
    let client_pub = Herald::start(&["--redis", &url, "--client-publish", "shared"]);
    assert!(eventually(Duration::from_secs(10), || client_pub
        .metric("herald_redis_up")
        == 1.0));
    let mut writer = client_pub.ws("/ws");
    send_json(
        &mut writer,
        json!({"op":"publish","topic":"shared","data":31}),
    );
    for ws in subs.iter_mut() {
        assert_eq!(ids(ws, 1), [(31, 31)]);
    }
}

#[test]
fn a_big_topic_over_two_processes_loses_nothing() {
    let redis = RedisServer::start();
    let a = herald_with(&redis, &[]);
    let b = herald_with(&redis, &[]);
    let mut subs: Vec<Client> = (0..3000)
        .map(|i| {
            if i % 2 == 0 {
                a.subscriber("big")
            } else {
                b.subscriber("big")
            }
        })
        .collect();
    let (mut api_a, mut api_b) = (a.http(), b.http());
    for i in 1..=200u64 {
        let api = if i % 2 == 0 { &mut api_a } else { &mut api_b };
        assert_eq!(api.publish("big", &i.to_string())["delivered"], 2);
    }
    let want: Vec<(u64, u64)> = (1..=200).map(|i| (i, i)).collect();
    for (n, ws) in subs.iter_mut().enumerate() {
        assert_eq!(ids(ws, 200), want, "subscriber {n}");
    }
    for h in [&a, &b] {
        assert_eq!(h.metric("herald_messages_delivered_total"), 300_000.0);
        assert_eq!(
            h.metric("herald_redis_channels"),
            1.0,
            "one Redis subscription per process"
        );
    }
}

#[test]
fn redis_going_away_means_503_and_connected_clients_stay_then_it_all_comes_back() {
    let redis = RedisServer::start();
    let port = redis.port;
    let herald = herald_with(&redis, &[]);
    let mut sub = herald.ws("/ws?topics=weather");
    let subscribed = next_json(&mut sub);
    let first_epoch = subscribed["epoch"].as_str().expect("an epoch").to_string();
    assert_eq!(herald.publish("weather", "1")["id"], 1);
    assert_eq!(ids(&mut sub, 1), [(1, 1)]);

    drop(redis);
    assert!(eventually(Duration::from_secs(5), || herald
        .metric("herald_redis_up")
        == 0.0));
    let body = r#"{"topic":"weather","data":2}"#;
    let r = herald.request(&format!(
        "POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    assert_eq!((r.status, r.text().as_str()), (503, "redis unavailable\n"));
    assert_eq!(
        herald.request("GET /health HTTP/1.1\r\n\r\n").text(),
        "ok (redis down)\n"
    );
    expect_nothing_pending(&mut sub);
    // The log reader thread may trail the state change by a moment.
    let logged = || herald.log().contains("redis: down");
    assert!(
        eventually(Duration::from_secs(2), logged),
        "{}",
        herald.log()
    );

    let _redis = RedisServer::on(port);
    assert!(
        eventually(Duration::from_secs(10), || herald.metric("herald_redis_up")
            == 1.0
            && herald.metric("herald_redis_channels") == 1.0),
        "not back: {}",
        herald.log()
    );
    // A fresh Redis lost the topic's history and starts its ids again, in a new epoch.
    // The connected client is not fed ids that start over: it is told to reconnect,
    // and its resume says what it lost.
    let reply = herald.publish("weather", "3");
    assert_eq!(reply["delivered"], 1);
    let hint = next_json(&mut sub);
    assert_eq!(hint["op"], "reconnect", "{hint}");
    match sub.read().expect("the close frame") {
        tungstenite::Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let mut back = herald.ws("/ws");
    send_json(
        &mut back,
        json!({"op":"subscribe","topic":"weather","since":1,"epoch":first_epoch}),
    );
    let reply = next_json(&mut back);
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_ne!(reply["epoch"], first_epoch);
    // The message that told it was kept in the new epoch's history.
    let m = next_json(&mut back);
    assert_eq!(
        (m["topic"].as_str(), m["data"].as_u64()),
        (Some("weather"), Some(3))
    );
    // One log line per state change: up, down, up.
    let ups = || herald.log().matches("redis: up").count() == 2;
    assert!(eventually(Duration::from_secs(2), ups), "{}", herald.log());
}

#[test]
fn herald_starts_without_redis_and_connects_when_it_appears() {
    let port = crate::util::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let herald = Herald::start(&["--redis", &url]);
    assert_eq!(
        herald.request("GET /health HTTP/1.1\r\n\r\n").text(),
        "ok (redis down)\n"
    );
    let mut sub = herald.subscriber("early");
    let body = r#"{"topic":"early","data":1}"#;
    let r = herald.request(&format!(
        "POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    assert_eq!(r.status, 503);
    let _redis = RedisServer::on(port);
    // Both links: the subscription one may be ready while the command one still waits
    // out its backoff.
    let ready =
        || herald.metric("herald_redis_up") == 1.0 && herald.metric("herald_redis_channels") == 1.0;
    assert!(eventually(Duration::from_secs(10), ready));
    assert_eq!(herald.publish("early", "2")["delivered"], 1);
    assert_eq!(ids(&mut sub, 1), [(1, 2)]);
}

#[test]
fn a_malformed_message_resets_the_link_and_service_continues() {
    let redis = RedisServer::start();
    let herald = herald_with(&redis, &[]);
    let mut sub = herald.subscriber("t");
    // Another Redis client publishes something that is not "<id> <json>" on our channel.
    redis.send(b"*3\r\n$7\r\nPUBLISH\r\n$8\r\nherald:t\r\n$7\r\ngarbage\r\n");
    assert!(eventually(Duration::from_secs(5), || herald
        .metric("herald_redis_errors_total")
        == 1.0));
    assert!(
        eventually(Duration::from_secs(10), || herald.metric("herald_redis_up")
            == 1.0
            && herald.metric("herald_redis_channels") == 1.0),
        "the link did not come back"
    );
    assert_eq!(herald.publish("t", "7")["delivered"], 1);
    assert_eq!(ids(&mut sub, 1), [(1, 7)]);
    let logged = || herald.log().contains("resetting it");
    assert!(
        eventually(Duration::from_secs(2), logged),
        "{}",
        herald.log()
    );
}

#[test]
fn pipelined_requests_behind_a_publish_are_answered_in_order() {
    let redis = RedisServer::start();
    let herald = herald_with(&redis, &[]);
    let body = r#"{"topic":"p","data":1}"#;
    let publish = format!(
        "POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut conn = herald.http();
    conn.send(
        format!("{publish}GET /health HTTP/1.1\r\n\r\n{publish}GET /nope HTTP/1.1\r\n\r\n")
            .as_bytes(),
    );
    let r1 = conn.response();
    assert_eq!((r1.status, r1.json()["id"].as_u64()), (200, Some(1)));
    assert_eq!(conn.response().text(), "ok (redis up)\n");
    assert_eq!(conn.response().json()["id"], 2);
    assert_eq!(conn.response().status, 404);
}

#[test]
fn reuse_port_lets_two_processes_share_one_port() {
    let redis = RedisServer::start();
    let port = crate::util::free_port();
    let listen = format!("127.0.0.1:{port}");
    let spawn = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(["--listen", &listen, "--reuse-port", "--redis", &redis.url()]);
        Herald::spawn(cmd)
    };
    let (a, b) = (spawn(), spawn());
    assert_eq!(a.addr, b.addr);
    let sockets = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .filter(|l| l.to_string_lossy().starts_with("socket:"))
            .count()
    };
    // Listener, Redis links, the signal pipe: counted before any client connects, once
    // both processes have their Redis links.
    let linked = || a.log().contains("redis: up") && b.log().contains("redis: up");
    assert!(eventually(Duration::from_secs(10), linked));
    let (base_a, base_b) = (sockets(a.pid()), sockets(b.pid()));
    let clients: Vec<Client> = (0..60).map(|_| a.subscriber("shared-port")).collect();
    let (sa, sb) = (sockets(a.pid()) - base_a, sockets(b.pid()) - base_b);
    assert_eq!(sa + sb, 60, "{sa} + {sb}");
    assert!(
        sa > 0 && sb > 0,
        "the kernel sent every connection to one process: {sa} / {sb}"
    );
    // And through Redis they are one service.
    let reply = HttpConn::connect(a.addr).publish("shared-port", "1");
    assert_eq!(reply["delivered"], 2);
    drop(clients);
}

/// Issue 17 with `--redis`: the upgraded process reconnects, resubscribes, and its
/// members resume from their places, so a stream published through another process
/// across the upgrade arrives whole: every id once, in order, and no extra reply.
#[test]
fn after_a_live_upgrade_delivery_through_redis_loses_and_repeats_nothing() {
    let redis = RedisServer::start();
    let a = herald_with(&redis, &[]);
    let b = herald_with(&redis, &[]);
    let mut subs: Vec<Client> = (0..3).map(|_| a.subscriber("up")).collect();
    let addr = b.addr;
    let publishing = std::thread::spawn(move || {
        let mut conn = HttpConn::connect(addr);
        (0..150u64)
            .map(|i| {
                let id = conn.publish("up", &i.to_string())["id"].as_u64().unwrap();
                std::thread::sleep(Duration::from_millis(10));
                id
            })
            .collect::<Vec<u64>>()
    });
    // And publishes on the upgrading process itself, two pipelined at a time on one
    // keep-alive connection: the upgrade waits for those at Redis, and every one is
    // answered, in order.
    let addr_a = a.addr;
    let local = std::thread::spawn(move || {
        let mut conn = HttpConn::connect(addr_a);
        let mut ids = Vec::new();
        let one = |i: u64| {
            let body = format!(r#"{{"topic":"up-a","data":{i}}}"#);
            format!(
                "POST /publish HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        for i in 0..60u64 {
            conn.send(format!("{}{}", one(2 * i), one(2 * i + 1)).as_bytes());
            for _ in 0..2 {
                let r = conn.response();
                assert_eq!(r.status, 200, "{}", r.text());
                ids.push(r.json()["id"].as_u64().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ids
    });
    let mut sub_a = a.subscriber("up-a");
    std::thread::sleep(Duration::from_millis(300));
    a.signal(libc::SIGUSR2);
    assert!(
        eventually(Duration::from_secs(20), || {
            let m = a.metrics();
            m.get("herald_upgrades_total{result=\"carried\"}") == Some(&1.0)
                && m.get("herald_redis_up") == Some(&1.0)
        }),
        "{}",
        a.log()
    );
    let sent = publishing.join().unwrap();
    let local_ids = local
        .join()
        .expect("every publish on the upgraded process was answered");
    assert_eq!(local_ids, (1..=120).collect::<Vec<u64>>());
    assert!(ids_after(&mut sub_a, &local_ids) > 0);
    assert_eq!(sent, (1..=150).collect::<Vec<u64>>());
    for ws in &mut subs {
        let got: Vec<u64> = ids(ws, 150).into_iter().map(|(id, _)| id).collect();
        assert_eq!(got, sent);
        expect_nothing_pending(ws);
    }
}
