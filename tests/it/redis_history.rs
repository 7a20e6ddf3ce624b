//! History and resume through Redis: herald processes sharing one real redis-server (each
//! test starts its own), the epoch and stream Redis keeps per topic, the seam between what
//! a read returns and what arrives live, and `/history` answered once Redis has replied.
//!
//! Every message published here carries its own id as its data (each topic is fresh, and
//! only the test publishes to it), so a delivery is checked by id and data at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::redis::{RedisServer, herald_with};
use crate::util::{
    Client, Herald, TIMEOUT, close_code, eventually, free_port, next_json, send_json,
};

/// The next frame, which must be a `subscribed` reply.
fn reply(ws: &mut Client) -> Value {
    let m = next_json(ws);
    assert_eq!(m["op"], "subscribed", "{m}");
    m
}

fn epoch_of(reply: &Value) -> String {
    let epoch = reply["epoch"].as_str().unwrap_or_default().to_string();
    assert!(!epoch.is_empty(), "no epoch in {reply}");
    epoch
}

/// The resume op: everything after `since` in `epoch`, then live.
fn resume(ws: &mut Client, topic: &str, since: u64, epoch: &str) {
    send_json(
        ws,
        json!({"op":"subscribe","topic":topic,"since":since,"epoch":epoch}),
    );
}

/// The next `n` frames, which must be messages on `topic`; their ids (data == id checked).
fn messages(ws: &mut Client, topic: &str, n: usize) -> Vec<u64> {
    (0..n)
        .map(|_| {
            let m = next_json(ws);
            message_id(&m, topic)
        })
        .collect()
}

fn message_id(m: &Value, topic: &str) -> u64 {
    assert_eq!(
        (&m["op"], &m["topic"]),
        (&json!("message"), &json!(topic)),
        "{m}"
    );
    let id = m["id"].as_u64().unwrap_or_else(|| panic!("no id: {m}"));
    assert_eq!(m["data"], id, "the data is the id it was published as: {m}");
    id
}

fn run(ids: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    ids.collect()
}

/// Nothing else is queued: the next frame is the answer to a ping.
fn expect_nothing_pending(ws: &mut Client) {
    send_json(ws, json!({"op":"ping"}));
    assert_eq!(next_json(ws), json!({"op":"pong"}));
}

/// The next text frame as JSON, or `None` if nothing comes within `wait`.
fn next_json_within(ws: &mut Client, wait: Duration) -> Option<Value> {
    ws.get_mut().set_read_timeout(Some(wait)).unwrap();
    let got = loop {
        match ws.read() {
            Ok(Message::Text(t)) => break Some(serde_json::from_str(t.as_str()).expect("JSON")),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(other) => panic!("expected text, got {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break None;
            }
            Err(e) => panic!("read message: {e}"),
        }
    };
    ws.get_mut().set_read_timeout(Some(TIMEOUT)).unwrap();
    got
}

/// Message ids on `topic` from a client that has everything up to `after`, until one at
/// or past `last` arrives or nothing comes for 5 s (then the caller's check says what is
/// missing). Bounded in count too.
fn ids_until(ws: &mut Client, topic: &str, after: u64, last: u64) -> Vec<u64> {
    let mut got = Vec::new();
    if after >= last {
        return got;
    }
    let limit = (last - after) as usize + 100;
    while got.len() < limit {
        let Some(m) = next_json_within(ws, Duration::from_secs(5)) else {
            break;
        };
        assert!(
            m["op"] == "message",
            "expected messages up to {last} after {after}; after {} of them (the last {:?}) \
             came {m}",
            got.len(),
            got.last()
        );
        let id = message_id(&m, topic);
        got.push(id);
        if id >= last {
            break;
        }
    }
    got
}

/// `got` is exactly `from..=to`; otherwise say where it first differs, not all of it.
fn assert_run(got: &[u64], from: u64, to: u64, what: &str) {
    let want = if from <= to {
        run(from..=to)
    } else {
        Vec::new()
    };
    if got == want.as_slice() {
        return;
    }
    let at = got
        .iter()
        .zip(&want)
        .position(|(g, w)| g != w)
        .unwrap_or(got.len().min(want.len()));
    let around = |v: &[u64]| v[at.saturating_sub(3)..(at + 4).min(v.len())].to_vec();
    panic!(
        "{what}: expected ids {from}..={to} ({} of them), got {} ids; first difference at \
         index {at}: got …{:?}…, want …{:?}…",
        want.len(),
        got.len(),
        around(got),
        around(&want),
    );
}

/// `GET /history?QUERY` on a fresh connection, which must answer 200.
fn history(h: &Herald, query: &str) -> Value {
    let r = h.request(&format!("GET /history?{query} HTTP/1.1\r\nHost: t\r\n\r\n"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn history_request(query: &str) -> String {
    format!("GET /history?{query} HTTP/1.1\r\nHost: t\r\n\r\n")
}

/// The `/history` answer expected for these ids (data == id).
fn history_json(
    topic: &str,
    epoch: &str,
    last: u64,
    recovered: bool,
    ids: impl IntoIterator<Item = u64>,
) -> Value {
    let messages: Vec<Value> = ids
        .into_iter()
        .map(|id| json!({"id": id, "data": id}))
        .collect();
    json!({"topic":topic,"epoch":epoch,"id":last,"recovered":recovered,"messages":messages})
}

fn publish_request(topic: &str, data: u64) -> String {
    let body = format!(r#"{{"topic":"{topic}","data":{data}}}"#);
    format!(
        "POST /publish HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn wait_redis(heralds: &[&Herald], up: bool) {
    let want = if up { 1.0 } else { 0.0 };
    for h in heralds {
        assert!(
            eventually(Duration::from_secs(10), || h.metric("herald_redis_up")
                == want),
            "herald_redis_up never became {want}: {}",
            h.log()
        );
    }
}

/// Publishes pipelined per batch, by round: Redis runs a batch in one go, so the seam
/// falls between batches, or anywhere with batches of one.
const BATCHES: [u64; 4] = [25, 1, 10, 50];

/// A publisher on its own thread and keep-alive connection, as fast as it can: ids
/// `first..=last` on a fresh topic, in pipelined batches, each reply's id checked.
struct Burst {
    acked: Arc<AtomicU64>,
    handle: JoinHandle<u64>,
}

impl Burst {
    /// Publishes go out `batch` at a time, pipelined on the connection.
    fn start(addr: SocketAddr, topic: &str, (first, last): (u64, u64), batch: u64) -> Burst {
        let acked = Arc::new(AtomicU64::new(first - 1));
        let progress = acked.clone();
        let topic = topic.to_string();
        let handle = std::thread::spawn(move || {
            let mut conn = crate::util::HttpConn::connect(addr);
            let mut next = first;
            while next <= last {
                let end = (next + batch - 1).min(last);
                let raw: String = (next..=end).map(|i| publish_request(&topic, i)).collect();
                conn.send(raw.as_bytes());
                for i in next..=end {
                    let r = conn.response();
                    assert_eq!(r.status, 200, "publish {i}: {}", r.text());
                    assert_eq!(r.json()["id"], i, "publish {i}");
                    progress.store(i, Ordering::SeqCst);
                }
                next = end + 1;
            }
            last
        });
        Burst { acked, handle }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Wait (bounded) until Redis has answered the publish of `id`; polled finely, so the
    /// subscription that follows lands inside the burst.
    fn wait_for(&self, id: u64) {
        let start = Instant::now();
        while self.acked() < id && !self.handle.is_finished() && start.elapsed() < TIMEOUT {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            self.acked() >= id,
            "the publisher stalled at {}",
            self.acked()
        );
    }

    /// The last id, once every publish has been answered.
    fn finish(self) -> u64 {
        match self.handle.join() {
            Ok(last) => last,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

#[test]
fn a_client_resumes_on_another_process_with_exactly_what_it_missed_then_live() {
    let redis = RedisServer::start();
    let a = herald_with(&redis, &[]);
    let b = herald_with(&redis, &[]);

    let mut ws = a.ws("/ws?topics=news");
    let first = reply(&mut ws);
    let epoch = epoch_of(&first);
    assert_eq!(
        first,
        json!({"op":"subscribed","topic":"news","epoch":epoch,"id":0})
    );
    for i in 1..=3u64 {
        assert_eq!(a.publish("news", &i.to_string())["id"], i);
    }
    assert_eq!(messages(&mut ws, "news", 3), run(1..=3));
    drop(ws);

    // Missed while away, published through either process.
    let (mut api_a, mut api_b) = (a.http(), b.http());
    for i in 4..=7u64 {
        let api = if i % 2 == 0 { &mut api_a } else { &mut api_b };
        assert_eq!(api.publish("news", &i.to_string())["id"], i);
    }

    let mut back = b.ws("/ws");
    resume(&mut back, "news", 3, &epoch);
    assert_eq!(
        reply(&mut back),
        json!({"op":"subscribed","topic":"news","epoch":epoch,"id":7,"recovered":true})
    );
    assert_eq!(messages(&mut back, "news", 4), run(4..=7));
    expect_nothing_pending(&mut back);
    // Then live, from either process.
    assert_eq!(api_a.publish("news", "8")["id"], 8);
    assert_eq!(api_b.publish("news", "9")["id"], 9);
    assert_eq!(messages(&mut back, "news", 2), run(8..=9));
    expect_nothing_pending(&mut back);

    // The same at connect time, by URL, from further back; and a client that missed nothing.
    let mut by_url = b.ws(&format!("/ws?resume=news~5~{epoch}"));
    assert_eq!(
        reply(&mut by_url),
        json!({"op":"subscribed","topic":"news","epoch":epoch,"id":9,"recovered":true})
    );
    assert_eq!(messages(&mut by_url, "news", 4), run(6..=9));
    expect_nothing_pending(&mut by_url);
    let mut current = a.ws(&format!("/ws?resume=news~9~{epoch}"));
    assert_eq!(
        reply(&mut current),
        json!({"op":"subscribed","topic":"news","epoch":epoch,"id":9,"recovered":true})
    );
    expect_nothing_pending(&mut current);

    assert_eq!(api_a.publish("news", "10")["delivered"], 2);
    for ws in [&mut back, &mut by_url, &mut current] {
        assert_eq!(messages(ws, "news", 1), [10]);
        expect_nothing_pending(ws);
    }
    assert_eq!(b.metric(r#"herald_resumes_total{result="recovered"}"#), 2.0);
    assert_eq!(a.metric(r#"herald_resumes_total{result="recovered"}"#), 1.0);
}

#[test]
fn redis_losing_its_data_changes_the_epoch_and_an_old_position_is_not_recovered() {
    let redis = RedisServer::start();
    let port = redis.port;
    let a = herald_with(&redis, &[]);
    let b = herald_with(&redis, &[]);
    for i in 1..=3u64 {
        assert_eq!(b.publish("r", &i.to_string())["id"], i);
    }
    // Subscribed at id 3, and still connected when Redis restarts: when the new epoch's
    // first message comes (ids start from 1 again), it is told to reconnect and resume.
    let mut ws = a.ws("/ws?topics=r");
    let first = reply(&mut ws);
    let old = epoch_of(&first);
    assert_eq!(
        first,
        json!({"op":"subscribed","topic":"r","epoch":old,"id":3})
    );
    assert_eq!(b.publish("r", "4")["id"], 4);
    assert_eq!(messages(&mut ws, "r", 1), [4]);

    // Killed (SIGKILL, by PID) with nothing saved: the new one starts empty.
    drop(redis);
    wait_redis(&[&a, &b], false);
    let _redis = RedisServer::on(port);
    wait_redis(&[&a, &b], true);
    assert!(
        eventually(Duration::from_secs(10), || a
            .metric("herald_redis_channels")
            == 1.0),
        "a did not subscribe again: {}",
        a.log()
    );

    let mut back = b.ws("/ws");
    resume(&mut back, "r", 4, &old);
    let answer = reply(&mut back);
    let new = epoch_of(&answer);
    assert_ne!(
        new, old,
        "the epoch must change when Redis lost the history"
    );
    assert_eq!(
        answer,
        json!({"op":"subscribed","topic":"r","epoch":new,"id":0,"recovered":false})
    );
    expect_nothing_pending(&mut back);
    // Meanwhile a client resumes on A, where `ws` is still live in the old epoch: it is
    // told the new epoch and id 0, so nothing that follows is missing for it.
    let mut early = a.ws(&format!("/ws?resume=r~4~{old}"));
    assert_eq!(
        reply(&mut early),
        json!({"op":"subscribed","topic":"r","epoch":new,"id":0,"recovered":false})
    );
    expect_nothing_pending(&mut early);

    // The new epoch's ids start again. A client that subscribed in it gets them; one
    // that was live in the old epoch cannot be given them as if nothing happened.
    for i in 1..=2u64 {
        assert_eq!(a.publish("r", &i.to_string())["id"], i);
    }
    assert_eq!(messages(&mut back, "r", 2), run(1..=2));
    assert_eq!(messages(&mut early, "r", 2), run(1..=2));
    expect_nothing_pending(&mut early);
    let hint = next_json(&mut ws);
    assert_eq!(hint["op"], "reconnect", "{hint}");
    assert!(
        hint["after_ms"].as_u64().is_some_and(|ms| ms <= 2000),
        "{hint}"
    );
    assert_eq!(close_code(&mut ws), CloseCode::Away);

    // It comes back with its old position: everything the new epoch holds, not recovered.
    let mut late = a.ws(&format!("/ws?resume=r~4~{old}"));
    assert_eq!(
        reply(&mut late),
        json!({"op":"subscribed","topic":"r","epoch":new,"id":2,"recovered":false})
    );
    assert_eq!(messages(&mut late, "r", 2), run(1..=2));
    expect_nothing_pending(&mut late);
    assert_eq!(
        history(&b, &format!("topic=r&since=4&epoch={old}")),
        history_json("r", &new, 2, false, 1..=2)
    );
    // A position in the new epoch recovers.
    let mut fresh = b.ws(&format!("/ws?resume=r~1~{new}"));
    assert_eq!(
        reply(&mut fresh),
        json!({"op":"subscribed","topic":"r","epoch":new,"id":2,"recovered":true})
    );
    assert_eq!(messages(&mut fresh, "r", 1), [2]);
    expect_nothing_pending(&mut fresh);
    assert_eq!(
        b.metric(r#"herald_resumes_total{result="epoch_changed"}"#),
        1.0
    );
    assert_eq!(
        a.metric(r#"herald_resumes_total{result="epoch_changed"}"#),
        2.0
    );
}

#[test]
fn history_through_redis_is_what_the_stream_holds_answered_in_request_order() {
    let redis = RedisServer::start();
    let a = herald_with(&redis, &[]);
    let b = herald_with(&redis, &[]);
    for i in 1..=5u64 {
        assert_eq!(a.publish("h", &i.to_string())["id"], i);
    }
    let all = history(&b, "topic=h&since=0");
    let epoch = all["epoch"].as_str().unwrap_or_default().to_string();
    assert!(!epoch.is_empty(), "{all}");
    assert_eq!(all, history_json("h", &epoch, 5, true, 1..=5));
    assert_eq!(
        history(&a, "topic=h&since=2"),
        history_json("h", &epoch, 5, true, 3..=5)
    );
    assert_eq!(
        history(&b, &format!("topic=h&since=2&epoch={epoch}")),
        history_json("h", &epoch, 5, true, 3..=5)
    );
    assert_eq!(
        history(&b, "topic=h&since=5"),
        history_json("h", &epoch, 5, true, [])
    );
    // Another epoch: everything the stream holds, not recovered.
    assert_eq!(
        history(&b, "topic=h&since=2&epoch=other"),
        history_json("h", &epoch, 5, false, 1..=5)
    );
    // A position past the last id was never issued.
    assert_eq!(
        history(&a, "topic=h&since=9"),
        history_json("h", &epoch, 5, false, [])
    );
    // Subscribers are told the same position.
    let mut ws = b.ws("/ws?topics=h");
    assert_eq!(
        reply(&mut ws),
        json!({"op":"subscribed","topic":"h","epoch":epoch,"id":5})
    );

    // Pipelined on one keep-alive connection: a read behind a publish sees it, and every
    // answer leaves in request order.
    let mut conn = a.http();
    let raw = [
        publish_request("h", 6),
        history_request("topic=h&since=5"),
        "GET /health HTTP/1.1\r\nHost: t\r\n\r\n".to_string(),
        publish_request("h", 7),
        history_request(&format!("topic=h&since=6&epoch={epoch}")),
        history_request("topic=h&since=0&epoch=other"),
    ]
    .concat();
    conn.send(raw.as_bytes());
    let published = conn.response();
    assert_eq!(
        (published.status, &published.json()["id"]),
        (200, &json!(6))
    );
    assert_eq!(
        conn.response().json(),
        history_json("h", &epoch, 6, true, [6])
    );
    assert_eq!(conn.response().text(), "ok (redis up)\n");
    assert_eq!(conn.response().json()["id"], 7);
    assert_eq!(
        conn.response().json(),
        history_json("h", &epoch, 7, true, [7])
    );
    assert_eq!(
        conn.response().json(),
        history_json("h", &epoch, 7, false, 1..=7)
    );
    // A read with nothing ahead of it still holds what is pipelined behind it.
    conn.send(
        [
            history_request("topic=h&since=7"),
            "GET /nope HTTP/1.1\r\nHost: t\r\n\r\n".to_string(),
            history_request("topic=h&since=6"),
        ]
        .concat()
        .as_bytes(),
    );
    assert_eq!(
        conn.response().json(),
        history_json("h", &epoch, 7, true, [])
    );
    assert_eq!(conn.response().status, 404);
    assert_eq!(
        conn.response().json(),
        history_json("h", &epoch, 7, true, [7])
    );
    assert_eq!(messages(&mut ws, "h", 2), [6, 7]);
    expect_nothing_pending(&mut ws);
}

/// Rounds of: a client has 1..=3 and leaves; a burst publishes 4..=2003 through A; while
/// it runs, the client resumes on B. It must get exactly 4..=2003, recovered.
#[test]
fn a_resume_during_a_burst_has_no_gap_and_no_duplicate_at_the_seam() {
    const ROUNDS: u64 = 10;
    const BURST: u64 = 2000;
    let redis = RedisServer::start();
    let size = ["--history-size", "5000"];
    let a = herald_with(&redis, &size);
    let b = herald_with(&redis, &size);
    let mut mid_burst = 0;
    for round in 0..ROUNDS {
        let topic = format!("seam{round}");
        // In even rounds B already has the topic's channel (another client is on it), so
        // the read starts at once; in odd rounds B subscribes to the channel first.
        let mut keeper = (round % 2 == 0).then(|| b.subscriber(&topic));
        let mut ws = a.ws(&format!("/ws?topics={topic}"));
        let epoch = epoch_of(&reply(&mut ws));
        for i in 1..=3u64 {
            assert_eq!(a.publish(&topic, &i.to_string())["id"], i);
        }
        assert_eq!(messages(&mut ws, &topic, 3), run(1..=3));
        drop(ws);

        let burst = Burst::start(a.addr, &topic, (4, 3 + BURST), BATCHES[round as usize % 4]);
        burst.wait_for(3 + 50 + round * 100);
        let before = burst.acked();
        let mut back = if round % 4 < 2 {
            let mut back = b.ws("/ws");
            resume(&mut back, &topic, 3, &epoch);
            back
        } else {
            b.ws(&format!("/ws?resume={topic}~3~{epoch}"))
        };
        let answer = reply(&mut back);
        let seam = answer["id"].as_u64().unwrap_or_else(|| panic!("{answer}"));
        assert_eq!(
            answer,
            json!({"op":"subscribed","topic":topic,"epoch":epoch,"id":seam,"recovered":true}),
            "round {round}"
        );
        assert!(
            seam >= before,
            "round {round}: told {seam}, but {before} was published before"
        );
        let last = burst.finish();
        if seam < last {
            mid_burst += 1;
        }
        let got = ids_until(&mut back, &topic, 3, last);
        assert_run(
            &got,
            4,
            last,
            &format!("round {round}, resumed from 3, told id {seam}"),
        );
        expect_nothing_pending(&mut back);
        if let Some(k) = keeper.as_mut() {
            let got = ids_until(k, &topic, 0, last);
            assert_run(&got, 1, last, &format!("round {round}, the other client"));
            expect_nothing_pending(k);
        }
    }
    assert!(
        mid_burst >= ROUNDS / 2,
        "only {mid_burst} of {ROUNDS} resumes landed inside the burst"
    );
}

/// Rounds of: a burst publishes 1..=2000 through A; while it runs a client subscribes
/// (no resume), on B mostly. It is told the topic's last id L, and its first message must
/// be L + 1, then every one after.
#[test]
fn a_plain_subscription_during_a_burst_starts_right_after_the_id_it_is_told() {
    const ROUNDS: u64 = 10;
    const BURST: u64 = 2000;
    let redis = RedisServer::start();
    let a = herald_with(&redis, &[]);
    let b = herald_with(&redis, &[]);
    let mut mid_burst = 0;
    for round in 0..ROUNDS {
        let topic = format!("plain{round}");
        let on = if round % 3 == 2 { &a } else { &b };
        // In even rounds the topic's channel is already there on that process.
        let mut keeper = (round % 2 == 0).then(|| on.subscriber(&topic));
        let burst = Burst::start(a.addr, &topic, (1, BURST), BATCHES[round as usize % 4]);
        burst.wait_for(50 + round * 100);
        let before = burst.acked();
        let mut ws = if round % 4 < 2 {
            on.ws(&format!("/ws?topics={topic}"))
        } else {
            let mut ws = on.ws("/ws");
            send_json(&mut ws, json!({"op":"subscribe","topic":topic}));
            ws
        };
        let answer = reply(&mut ws);
        let epoch = epoch_of(&answer);
        let seam = answer["id"].as_u64().unwrap_or_else(|| panic!("{answer}"));
        assert_eq!(
            answer,
            json!({"op":"subscribed","topic":topic,"epoch":epoch,"id":seam}),
            "round {round}"
        );
        assert!(
            seam >= before,
            "round {round}: told {seam}, but {before} was published before"
        );
        let last = burst.finish();
        if seam < last {
            mid_burst += 1;
        }
        let got = ids_until(&mut ws, &topic, seam, last);
        assert_run(
            &got,
            seam + 1,
            last,
            &format!("round {round}, subscribed at id {seam}"),
        );
        expect_nothing_pending(&mut ws);
        if let Some(k) = keeper.as_mut() {
            let got = ids_until(k, &topic, 0, last);
            assert_run(&got, 1, last, &format!("round {round}, the other client"));
            expect_nothing_pending(k);
        }
    }
    assert!(
        mid_burst >= ROUNDS / 2,
        "only {mid_burst} of {ROUNDS} subscriptions landed inside the burst"
    );
}

/// With Redis down, subscriptions are answered at once: no epoch, id 0, and a resume is
/// not recovered. Both for a Redis that went away and one that was never there.
#[test]
fn with_redis_down_a_subscription_is_answered_at_once_with_no_position() {
    let check = |h: &Herald, epoch: &str| {
        let started = Instant::now();
        let mut plain = h.ws("/ws?topics=d");
        assert_eq!(
            reply(&mut plain),
            json!({"op":"subscribed","topic":"d","epoch":"","id":0})
        );
        let mut by_op = h.ws("/ws");
        resume(&mut by_op, "w", 1, epoch);
        assert_eq!(
            reply(&mut by_op),
            json!({"op":"subscribed","topic":"w","epoch":"","id":0,"recovered":false})
        );
        let mut by_url = h.ws(&format!("/ws?resume=w~1~{epoch}"));
        assert_eq!(
            reply(&mut by_url),
            json!({"op":"subscribed","topic":"w","epoch":"","id":0,"recovered":false})
        );
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "answered after {took:?}");
        let r = h.request(&history_request("topic=w&since=1"));
        assert_eq!((r.status, r.text().as_str()), (503, "redis unavailable\n"));
        for ws in [&mut plain, &mut by_op, &mut by_url] {
            expect_nothing_pending(ws);
        }
        assert_eq!(
            h.metric(r#"herald_resumes_total{result="unavailable"}"#),
            2.0
        );
        plain
    };

    // A Redis that went away (killed by PID).
    let redis = RedisServer::start();
    let port = redis.port;
    let h = herald_with(&redis, &[]);
    let mut ws = h.ws("/ws?topics=w");
    let epoch = epoch_of(&reply(&mut ws));
    assert_eq!(h.publish("w", "1")["id"], 1);
    assert_eq!(messages(&mut ws, "w", 1), [1]);
    drop(redis);
    wait_redis(&[&h], false);
    let mut plain = check(&h, &epoch);
    // Back (empty): the subscription made while it was down is live.
    let _redis = RedisServer::on(port);
    wait_redis(&[&h], true);
    assert!(
        eventually(Duration::from_secs(10), || h
            .metric("herald_redis_channels")
            == 2.0),
        "{}",
        h.log()
    );
    assert_eq!(h.publish("d", "1")["id"], 1);
    assert_eq!(messages(&mut plain, "d", 1), [1]);

    // A Redis that was never there.
    let url = format!("redis://127.0.0.1:{}", free_port());
    let lonely = Herald::start(&["--redis", &url]);
    check(&lonely, &epoch);
}

/// `MAXLEN ~` keeps whole stream nodes (100 entries): with --history-size 5, 300
/// publishes leave a suffix of them. A resume from before it gets that suffix, not
/// recovered; one from inside it is recovered.
#[test]
fn a_resume_from_before_what_the_stream_kept_is_not_recovered() {
    let redis = RedisServer::start();
    let size = ["--history-size", "5"];
    let a = herald_with(&redis, &size);
    let b = herald_with(&redis, &size);
    let mut ws = b.ws("/ws?topics=trim");
    let epoch = epoch_of(&reply(&mut ws));
    drop(ws);
    let mut api = a.http();
    for i in 1..=300u64 {
        assert_eq!(api.publish("trim", &i.to_string())["id"], i);
    }
    let h = history(&b, &format!("topic=trim&since=1&epoch={epoch}"));
    let kept: Vec<u64> = h["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("{h}"))
        .iter()
        .map(|m| {
            let id = m["id"].as_u64().unwrap_or_else(|| panic!("{m}"));
            assert_eq!(m["data"], id);
            id
        })
        .collect();
    let oldest = *kept.first().unwrap_or_else(|| panic!("nothing kept: {h}"));
    assert!(
        oldest > 2 && kept.len() >= 5,
        "kept {} from {oldest}",
        kept.len()
    );
    assert_eq!(h, history_json("trim", &epoch, 300, false, oldest..=300));

    let mut back = b.ws("/ws");
    resume(&mut back, "trim", 1, &epoch);
    assert_eq!(
        reply(&mut back),
        json!({"op":"subscribed","topic":"trim","epoch":epoch,"id":300,"recovered":false})
    );
    assert_eq!(messages(&mut back, "trim", kept.len()), kept);
    expect_nothing_pending(&mut back);
    let mut inside = a.ws(&format!("/ws?resume=trim~297~{epoch}"));
    assert_eq!(
        reply(&mut inside),
        json!({"op":"subscribed","topic":"trim","epoch":epoch,"id":300,"recovered":true})
    );
    assert_eq!(messages(&mut inside, "trim", 3), [298, 299, 300]);
    expect_nothing_pending(&mut inside);
    assert_eq!(api.publish("trim", "301")["id"], 301);
    for ws in [&mut back, &mut inside] {
        assert_eq!(messages(ws, "trim", 1), [301]);
    }
    assert_eq!(b.metric(r#"herald_resumes_total{result="gap"}"#), 1.0);
}

/// Messages older than --history-ttl are not replayed, so a resume from before them is
/// not recovered; the epoch stays.
#[test]
fn a_resume_after_the_history_expired_is_not_recovered() {
    let redis = RedisServer::start();
    let ttl = ["--history-ttl", "1"];
    let a = herald_with(&redis, &ttl);
    let b = herald_with(&redis, &ttl);
    for i in 1..=3u64 {
        assert_eq!(a.publish("ttl", &i.to_string())["id"], i);
    }
    let fresh = history(&b, "topic=ttl&since=1");
    let epoch = fresh["epoch"].as_str().unwrap_or_default().to_string();
    assert_eq!(fresh, history_json("ttl", &epoch, 3, true, 2..=3));
    let expired = || history(&b, "topic=ttl&since=1") == history_json("ttl", &epoch, 3, false, []);
    assert!(
        eventually(Duration::from_secs(5), expired),
        "{}",
        history(&b, "topic=ttl&since=1")
    );
    let mut back = b.ws(&format!("/ws?resume=ttl~1~{epoch}"));
    assert_eq!(
        reply(&mut back),
        json!({"op":"subscribed","topic":"ttl","epoch":epoch,"id":3,"recovered":false})
    );
    expect_nothing_pending(&mut back);
    // Nothing missed is nothing missing, even with an empty stream.
    let mut current = a.ws(&format!("/ws?resume=ttl~3~{epoch}"));
    assert_eq!(
        reply(&mut current),
        json!({"op":"subscribed","topic":"ttl","epoch":epoch,"id":3,"recovered":true})
    );
    assert_eq!(a.publish("ttl", "4")["id"], 4);
    for ws in [&mut back, &mut current] {
        assert_eq!(messages(ws, "ttl", 1), [4]);
        expect_nothing_pending(ws);
    }
}
