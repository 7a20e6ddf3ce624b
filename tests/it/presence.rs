//! Presence (`--presence`): who is subscribed, asked over `/ws` and `GET /presence`, and
//! the join/leave events, on one process and across processes through a real Redis.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

use crate::redis::{RedisServer, herald_with};
use crate::util::{Client, Herald, eventually, next_json, send_json, signal};

const SECRET: &str = "a-test-secret-of-enough-length";

fn token(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = json!({"sub": sub, "exp": exp, "topics": ["user:*"]});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn server(extra: &[&str]) -> Herald {
    let mut args = vec![
        "--presence",
        "room:*,user:*",
        "--token-secret",
        SECRET,
        "--private-topics",
        "user:*",
    ];
    args.extend_from_slice(extra);
    Herald::start(&args)
}

/// `sub`'s WebSocket (anonymous with `None`) subscribed to `topic`, confirmation read.
fn join(h: &Herald, topic: &str, sub: Option<&str>, watch: bool) -> Client {
    let mut path = format!("/ws?topics={topic}");
    if let Some(sub) = sub {
        path += &format!("&token={}", token(sub));
    }
    if watch {
        path += &format!("&presence={topic}");
    }
    let mut ws = h.ws(&path);
    let reply = next_json(&mut ws);
    assert_eq!(reply["op"], "subscribed", "{reply}");
    ws
}

fn ask(ws: &mut Client, topic: &str) -> Value {
    send_json(ws, json!({"op":"presence","topic":topic}));
    next_json(ws)
}

fn get_presence(h: &Herald, topic: &str) -> Value {
    let r = h.request(&format!(
        "GET /presence?topic={topic} HTTP/1.1\r\nHost: x\r\n\r\n"
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Members as (sub, conns), named subs only (anonymous ids are per process and random).
fn named(answer: &Value) -> Vec<(String, u64)> {
    answer["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {answer}"))
        .iter()
        .map(|m| {
            (
                m["sub"].as_str().unwrap().to_string(),
                m["conns"].as_u64().unwrap(),
            )
        })
        .filter(|(s, _)| !s.starts_with("anon:"))
        .collect()
}

fn pairs(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(s, n)| (s.to_string(), *n)).collect()
}

/// Nothing queued ahead of a pong: no event was sent.
fn nothing_pending(ws: &mut Client) {
    send_json(ws, json!({"op":"ping"}));
    assert_eq!(next_json(ws), json!({"op":"pong"}));
}

/// Wait until `GET /presence` on `h` says `want` for the named members.
fn until_named(h: &Herald, topic: &str, want: &[(&str, u64)]) -> bool {
    eventually(Duration::from_secs(15), || {
        named(&get_presence(h, topic)) == pairs(want)
    })
}

#[test]
fn counts_and_members_follow_connects_second_tabs_and_disconnects() {
    let h = server(&[]);
    let mut a1 = join(&h, "room:1", Some("alice"), false);
    let got = ask(&mut a1, "room:1");
    assert_eq!(
        got,
        json!({"op":"presence","topic":"room:1","count":1,"members":[{"sub":"alice","conns":1}]})
    );
    let mut a2 = join(&h, "room:1", Some("alice"), false);
    let anon = join(&h, "room:1", None, false);
    let got = ask(&mut a2, "room:1");
    assert_eq!(got["count"], 2, "{got}");
    assert_eq!(named(&got), pairs(&[("alice", 2)]));
    let anon_id = got["members"][1]["sub"].as_str().unwrap().to_string();
    assert!(anon_id.starts_with("anon:"), "{got}");
    drop(anon);
    assert!(eventually(Duration::from_secs(10), || get_presence(
        &h, "room:1"
    )["count"]
        == 1));
    a1.close(None).unwrap();
    assert!(until_named(&h, "room:1", &[("alice", 1)]));
    drop(a2);
    assert!(eventually(Duration::from_secs(10), || get_presence(
        &h, "room:1"
    ) == json!({"topic":"room:1","count":0,"members":[]})));
}

#[test]
fn events_go_out_only_when_a_member_appears_or_disappears() {
    let h = server(&[]);
    let mut watcher = h.ws("/ws");
    send_json(
        &mut watcher,
        json!({"op":"subscribe","topic":"room:1","presence":true}),
    );
    assert_eq!(next_json(&mut watcher)["op"], "subscribed");
    let own = next_json(&mut watcher);
    assert_eq!(own["op"], "join", "a watcher sees its own arrival: {own}");
    // A subscriber that did not ask for events gets none.
    let mut quiet = join(&h, "room:1", Some("quiet"), false);
    assert_eq!(
        next_json(&mut watcher),
        json!({"op":"join","topic":"room:1","sub":"quiet"})
    );
    let a1 = join(&h, "room:1", Some("alice"), false);
    assert_eq!(
        next_json(&mut watcher),
        json!({"op":"join","topic":"room:1","sub":"alice"})
    );
    let mut a2 = join(&h, "room:1", Some("alice"), false);
    nothing_pending(&mut watcher);
    drop(a1);
    assert!(until_named(&h, "room:1", &[("alice", 1), ("quiet", 1)]));
    nothing_pending(&mut watcher);
    send_json(&mut a2, json!({"op":"unsubscribe","topic":"room:1"}));
    assert_eq!(
        next_json(&mut watcher),
        json!({"op":"leave","topic":"room:1","sub":"alice"})
    );
    nothing_pending(&mut quiet);
}

#[test]
fn past_the_cap_only_the_count_and_no_events() {
    let h = server(&["--presence-max-members", "2"]);
    let mut watcher = join(&h, "room:1", Some("w"), true);
    assert_eq!(next_json(&mut watcher)["sub"], "w");
    let _b = join(&h, "room:1", Some("bob"), false);
    assert_eq!(next_json(&mut watcher)["sub"], "bob");
    let carol = join(&h, "room:1", Some("carol"), false);
    nothing_pending(&mut watcher);
    let got = ask(&mut watcher, "room:1");
    assert_eq!(
        got,
        json!({"op":"presence","topic":"room:1","count":3,"members_omitted":true})
    );
    assert_eq!(get_presence(&h, "room:1")["members_omitted"], true);
    drop(carol);
    assert!(until_named(&h, "room:1", &[("bob", 1), ("w", 1)]));
    nothing_pending(&mut watcher);
}

#[test]
fn only_subscribers_may_ask_and_private_topics_need_a_grant() {
    let h = server(&[]);
    let mut ws = h.ws("/ws?topics=news");
    assert_eq!(next_json(&mut ws)["op"], "subscribed");
    let got = ask(&mut ws, "room:1");
    assert_eq!(
        (got["op"].clone(), got["error"].clone()),
        (json!("error"), json!("not_subscribed"))
    );
    assert_eq!(ask(&mut ws, "news")["error"], "presence_off");
    assert_eq!(ask(&mut ws, "user:1")["error"], "forbidden");
    assert_eq!(ask(&mut ws, "bad topic")["error"], "bad_topic");
    // With a grant and a subscription, a private topic answers.
    let mut granted = join(&h, "user:1", Some("alice"), false);
    assert_eq!(named(&ask(&mut granted, "user:1")), pairs(&[("alice", 1)]));
    // The connection stays open through all of it.
    nothing_pending(&mut ws);
}

#[test]
fn get_presence_follows_the_publish_rule() {
    let h = server(&["--api-key", "k3y"]);
    let _a = join(&h, "room:1", Some("alice"), false);
    let req = |auth: &str, q: &str| {
        h.request(&format!(
            "GET /presence{q} HTTP/1.1\r\nHost: x\r\n{auth}\r\n"
        ))
    };
    assert_eq!(req("", "?topic=room:1").status, 401);
    let ok = req("Authorization: Bearer k3y\r\n", "?topic=room:1");
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.json(),
        json!({"topic":"room:1","count":1,"members":[{"sub":"alice","conns":1}]})
    );
    let off = req("Authorization: Bearer k3y\r\n", "?topic=news");
    assert_eq!(off.status, 404);
    assert!(off.text().contains("--presence"), "{}", off.text());
    assert_eq!(req("Authorization: Bearer k3y\r\n", "").status, 400);
    // ?presence= may only name topics the connection asks for.
    let r = h.request(
        "GET /ws?topics=room:1&presence=room:2 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(r.status, 400, "{}", r.text());
}

/// The next event a watcher gets through Redis, past its own join: that one comes on the
/// channel the watcher is still subscribing to, and may come before or not at all.
fn next_event(ws: &mut Client, own: &str) -> Value {
    loop {
        let e = next_json(ws);
        if !(e["op"] == "join" && e["sub"] == own) {
            return e;
        }
    }
}

fn redis_pair(redis: &RedisServer, extra: &[&str]) -> (Herald, Herald) {
    let mut args = vec!["--presence", "room:*", "--token-secret", SECRET];
    args.extend_from_slice(extra);
    (herald_with(redis, &args), herald_with(redis, &args))
}

#[test]
fn with_redis_members_and_events_span_processes() {
    let redis = RedisServer::start();
    let (a, b) = redis_pair(&redis, &[]);
    let mut watcher = join(&a, "room:1", Some("w"), true);
    let a1 = join(&a, "room:1", Some("alice"), false);
    let alice = json!({"op":"join","topic":"room:1","sub":"alice"});
    assert_eq!(next_event(&mut watcher, "w"), alice);
    // alice's second connection, on the other process: the same member, no event.
    let b1 = join(&b, "room:1", Some("alice"), false);
    let mut bob = join(&b, "room:1", Some("bob"), false);
    assert_eq!(
        next_event(&mut watcher, "w"),
        json!({"op":"join","topic":"room:1","sub":"bob"})
    );
    let want = [("alice", 2), ("bob", 1), ("w", 1)];
    assert_eq!(named(&ask(&mut bob, "room:1")), pairs(&want));
    assert_eq!(named(&get_presence(&a, "room:1")), pairs(&want));
    assert_eq!(get_presence(&b, "room:1")["count"], 3);
    // alice leaves A but stays on B: no leave; bob's leave is the next event.
    drop(a1);
    assert!(until_named(
        &b,
        "room:1",
        &[("alice", 1), ("bob", 1), ("w", 1)]
    ));
    drop(bob);
    assert_eq!(
        next_event(&mut watcher, "w"),
        json!({"op":"leave","topic":"room:1","sub":"bob"})
    );
    drop(b1);
    assert_eq!(
        next_event(&mut watcher, "w"),
        json!({"op":"leave","topic":"room:1","sub":"alice"})
    );
    assert_eq!(named(&get_presence(&b, "room:1")), pairs(&[("w", 1)]));
}

#[test]
fn with_redis_a_killed_process_drops_its_members_within_the_ttl() {
    let redis = RedisServer::start();
    let (a, b) = redis_pair(&redis, &["--presence-ttl", "2"]);
    let mut watcher = join(&a, "room:1", Some("w"), true);
    let _bob = join(&b, "room:1", Some("bob"), false);
    let _both = (
        join(&a, "room:1", Some("carol"), false),
        join(&b, "room:1", Some("carol"), false),
    );
    assert_eq!(next_event(&mut watcher, "w")["sub"], "bob");
    assert_eq!(next_event(&mut watcher, "w")["sub"], "carol");
    assert_eq!(
        named(&get_presence(&a, "room:1")),
        pairs(&[("bob", 1), ("carol", 2), ("w", 1)])
    );
    assert!(signal(b.pid(), 9), "kill -9");
    // Gone within the TTL (2 s) and a heartbeat; carol stays with her connection on A.
    assert!(until_named(&a, "room:1", &[("carol", 1), ("w", 1)]));
    assert_eq!(
        next_event(&mut watcher, "w"),
        json!({"op":"leave","topic":"room:1","sub":"bob"})
    );
    nothing_pending(&mut watcher);
}

/// Wait until `h` says a live upgrade carried its state (and, with Redis, the link is
/// back).
fn upgraded(h: &Herald, redis: bool) -> bool {
    h.signal(libc::SIGUSR2);
    eventually(Duration::from_secs(20), || {
        let m = h.metrics();
        m.get("herald_upgrades_total{result=\"carried\"}") == Some(&1.0)
            && (!redis || m.get("herald_redis_up") == Some(&1.0))
    })
}

/// Issue 17: presence is carried by a live upgrade: the same members, no join or leave
/// told to anyone, and a watcher goes on hearing of later changes.
#[test]
fn a_live_upgrade_keeps_presence_without_events() {
    let h = server(&[]);
    let mut watcher = join(&h, "room:1", Some("w"), true);
    let _alice = join(&h, "room:1", Some("alice"), false);
    assert_eq!(next_event(&mut watcher, "w")["sub"], "alice");
    assert!(upgraded(&h, false), "{}", h.log());
    assert_eq!(
        named(&get_presence(&h, "room:1")),
        pairs(&[("alice", 1), ("w", 1)])
    );
    nothing_pending(&mut watcher);
    let _bob = join(&h, "room:1", Some("bob"), false);
    assert_eq!(
        next_event(&mut watcher, "w"),
        json!({"op":"join","topic":"room:1","sub":"bob"})
    );
}

/// With Redis the upgraded process keeps its instance id, so its members are not counted
/// twice (once under the old id until its TTL) and nobody is told they left.
#[test]
fn with_redis_a_live_upgrade_keeps_presence_without_events() {
    let redis = RedisServer::start();
    let (a, b) = redis_pair(&redis, &["--presence-ttl", "2"]);
    let mut watcher = join(&b, "room:1", Some("w"), true);
    let _alice = join(&a, "room:1", Some("alice"), false);
    assert_eq!(next_event(&mut watcher, "w")["sub"], "alice");
    assert!(upgraded(&a, true), "{}", a.log());
    let want = [("alice", 1), ("w", 1)];
    assert_eq!(named(&get_presence(&b, "room:1")), pairs(&want));
    // Past the TTL and a heartbeat: still there, and no event.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(named(&get_presence(&b, "room:1")), pairs(&want));
    nothing_pending(&mut watcher);
}
