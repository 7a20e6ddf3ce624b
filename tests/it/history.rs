//! History and resume without Redis: epochs and last ids in `subscribed`, the resume op
//! and `?resume=`, `GET /history`, the bounds (size, ttl, memory), `--state-dir` across a
//! SIGTERM and a SIGKILL, private topics, the seam between replay and live messages, and
//! the resume metrics. Every herald here is the real binary on loopback.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::util::{
    Client, Herald, HttpConn, HttpResponse, TIMEOUT, eventually, free_port, next_json, send_json,
};

// ---- helpers -----------------------------------------------------------------------

/// `herald --listen 127.0.0.1:PORT ARGS...`: a fixed port, so a restart comes back where
/// its clients reconnect (herald binds with SO_REUSEADDR, as the other restart tests
/// rely on).
fn start_on(port: u16, args: &[&str]) -> Herald {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(args);
    Herald::spawn(cmd)
}

/// A fresh, empty directory for one test's state files.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-history-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn state_file(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!("herald-{port}.history"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A WebSocket to `addr`, or why not (for clients that retry while nothing listens).
fn try_ws(addr: SocketAddr, path: &str) -> Result<Client, String> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let url = format!("ws://{addr}{path}");
    let (ws, response) =
        tungstenite::client::client(url.as_str(), stream).map_err(|e| e.to_string())?;
    if response.status() != 101 {
        return Err(format!("status {}", response.status()));
    }
    Ok(ws)
}

/// Retry `try_ws` until it works, for up to `limit`.
fn ws_retrying(addr: SocketAddr, path: &str, limit: Duration) -> Client {
    let start = Instant::now();
    loop {
        match try_ws(addr, path) {
            Ok(ws) => return ws,
            Err(e) => {
                assert!(
                    start.elapsed() < limit,
                    "no WebSocket at {addr} after {limit:?}: {e}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// `{"op":"subscribe","topic":T}`: returns the reply.
fn subscribe(ws: &mut Client, topic: &str) -> Value {
    send_json(ws, json!({"op":"subscribe","topic":topic}));
    next_json(ws)
}

/// The resume op: returns the reply.
fn resume(ws: &mut Client, topic: &str, since: u64, epoch: &str) -> Value {
    send_json(
        ws,
        json!({"op":"subscribe","topic":topic,"since":since,"epoch":epoch}),
    );
    next_json(ws)
}

/// A topic's (epoch, last id) from its `subscribed` reply.
fn position(reply: &Value) -> (String, u64) {
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let epoch = reply["epoch"].as_str().expect("an epoch").to_string();
    assert!(!epoch.is_empty(), "{reply}");
    (epoch, reply["id"].as_u64().expect("an id"))
}

/// Subscribe at connect: the connection and where the topic stands.
fn subscribe_at_connect(herald: &Herald, topic: &str) -> (Client, String, u64) {
    let mut ws = herald.ws(&format!("/ws?topics={topic}"));
    let reply = next_json(&mut ws);
    assert_eq!(reply["topic"], topic, "{reply}");
    let (epoch, id) = position(&reply);
    (ws, epoch, id)
}

/// The `subscribed` reply a resume must get.
fn resumed(topic: &str, epoch: &str, id: u64, recovered: bool) -> Value {
    json!({"op":"subscribed","topic":topic,"epoch":epoch,"id":id,"recovered":recovered})
}

/// The next message; it must be a `message` on `topic`.
fn next_message(ws: &mut Client, topic: &str) -> Value {
    let m = next_json(ws);
    assert_eq!(
        (m["op"].as_str(), m["topic"].as_str()),
        (Some("message"), Some(topic)),
        "{m}"
    );
    m
}

/// The next `ids.len()` messages must be exactly those ids, in order; returns them.
fn expect_ids(ws: &mut Client, topic: &str, ids: std::ops::RangeInclusive<u64>) -> Vec<Value> {
    ids.map(|want| {
        let m = next_message(ws, topic);
        assert_eq!(m["id"].as_u64(), Some(want), "{m}");
        m
    })
    .collect()
}

/// Publish `n` messages `{"tag":tag,"i":i}` to `topic`; their ids, which must count up
/// by one.
fn publish_n(conn: &mut HttpConn, topic: &str, tag: &str, n: usize) -> Vec<u64> {
    let ids: Vec<u64> = (0..n)
        .map(|i| {
            let data = json!({"tag":tag,"i":i}).to_string();
            conn.publish(topic, &data)["id"].as_u64().unwrap()
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    ids
}

/// Publish a marker and check it is the very next message `ws` gets, with the next id:
/// nothing else (no extra replay, no duplicate) was queued before it.
fn expect_marker_next(conn: &mut HttpConn, ws: &mut Client, topic: &str, last: u64) {
    let id = conn.publish(topic, r#""marker""#)["id"].as_u64().unwrap();
    assert_eq!(id, last + 1, "the marker's id");
    let m = next_message(ws, topic);
    assert_eq!(
        (m["id"].as_u64(), &m["data"]),
        (Some(id), &json!("marker")),
        "{m}"
    );
}

fn get(addr: SocketAddr, path: &str, headers: &str) -> HttpResponse {
    HttpConn::connect(addr)
        .exchange(format!("GET {path} HTTP/1.1\r\nHost: t\r\n{headers}\r\n").as_bytes())
}

/// `GET /history?QUERY` from loopback without a key; must be 200.
fn history(addr: SocketAddr, query: &str) -> Value {
    let r = get(addr, &format!("/history?{query}"), "");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// The messages a `/history` reply (or a replay) holds, as `{"id":..,"data":..}`.
fn history_messages(ids: &[u64], tag: &str, first_i: usize) -> Vec<Value> {
    ids.iter()
        .enumerate()
        .map(|(k, id)| json!({"id":id,"data":{"tag":tag,"i":first_i + k}}))
        .collect()
}

fn metric(m: &std::collections::HashMap<String, f64>, name: &str) -> f64 {
    *m.get(name).unwrap_or_else(|| panic!("no metric {name}"))
}

fn resumes(herald: &Herald) -> [u64; 4] {
    let m = herald.metrics();
    ["recovered", "gap", "epoch_changed", "unavailable"]
        .map(|r| metric(&m, &format!("herald_resumes_total{{result=\"{r}\"}}")) as u64)
}

fn evictions(herald: &Herald) -> [u64; 3] {
    let m = herald.metrics();
    ["size", "ttl", "memory"].map(|r| {
        metric(
            &m,
            &format!("herald_history_evictions_total{{reason=\"{r}\"}}"),
        ) as u64
    })
}

// ---- 1. resume what was missed -----------------------------------------------------

#[test]
fn history_a_resume_gets_exactly_what_was_missed_in_order_by_op_and_at_connect() {
    let herald = Herald::start(&[]);
    let mut api = herald.http();
    let (ws, epoch, first) = subscribe_at_connect(&herald, "r1");
    assert_eq!(first, 0, "a fresh herald's new topic starts at 0");
    drop(ws);

    // Nothing missed: recovered, nothing replayed.
    let mut ws = herald.ws("/ws");
    assert_eq!(
        resume(&mut ws, "r1", first, &epoch),
        resumed("r1", &epoch, first, true)
    );
    expect_marker_next(&mut api, &mut ws, "r1", first);
    drop(ws);
    let mut last = first + 1;

    // The op form: 50 missed, all of them, in order, then live.
    let ids = publish_n(&mut api, "r1", "op", 50);
    assert_eq!(ids, (last + 1..=last + 50).collect::<Vec<_>>());
    let mut ws = herald.ws("/ws");
    assert_eq!(
        resume(&mut ws, "r1", last, &epoch),
        resumed("r1", &epoch, last + 50, true)
    );
    let got = expect_ids(&mut ws, "r1", last + 1..=last + 50);
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m["data"], json!({"tag":"op","i":i}), "{m}");
    }
    last += 50;
    expect_marker_next(&mut api, &mut ws, "r1", last);
    last += 1;
    drop(ws);

    // The ?resume= form at connect.
    let ids = publish_n(&mut api, "r1", "url", 50);
    assert_eq!(ids, (last + 1..=last + 50).collect::<Vec<_>>());
    let mut ws = herald.ws(&format!("/ws?resume=r1~{last}~{epoch}"));
    assert_eq!(next_json(&mut ws), resumed("r1", &epoch, last + 50, true));
    let got = expect_ids(&mut ws, "r1", last + 1..=last + 50);
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m["data"], json!({"tag":"url","i":i}), "{m}");
    }
    last += 50;
    expect_marker_next(&mut api, &mut ws, "r1", last);
    last += 1;

    // A topic in both ?topics= and ?resume= is resumed once, not also subscribed.
    drop(ws);
    publish_n(&mut api, "r1", "both", 3);
    let mut ws = herald.ws(&format!("/ws?topics=r1,other&resume=r1~{last}~{epoch}"));
    // ?topics= are answered first, then the resumes.
    let replies = [next_json(&mut ws), next_json(&mut ws)];
    assert_eq!(replies[0]["topic"], "other", "{}", replies[0]);
    assert_eq!(position(&replies[0]).1, last + 3);
    assert_eq!(replies[1], resumed("r1", &epoch, last + 3, true));
    expect_ids(&mut ws, "r1", last + 1..=last + 3);
    expect_marker_next(&mut api, &mut ws, "r1", last + 3);

    assert_eq!(resumes(&herald), [4, 0, 0, 0]);
}

// ---- 2. a gap ------------------------------------------------------------------------

#[test]
fn history_a_since_older_than_history_is_not_recovered_and_gets_what_is_left() {
    let herald = Herald::start(&["--history-size", "10"]);
    let mut api = herald.http();
    let (ws, epoch, first) = subscribe_at_connect(&herald, "g");
    drop(ws);
    let ids = publish_n(&mut api, "g", "g", 30);
    let last = *ids.last().unwrap();
    assert_eq!(last, first + 30);

    let mut ws = herald.ws("/ws");
    assert_eq!(
        resume(&mut ws, "g", first, &epoch),
        resumed("g", &epoch, last, false)
    );
    let got = expect_ids(&mut ws, "g", last - 9..=last);
    for (k, m) in got.iter().enumerate() {
        assert_eq!(m["data"], json!({"tag":"g","i":20 + k}), "{m}");
    }
    expect_marker_next(&mut api, &mut ws, "g", last);
    drop(ws);
    let last = last + 1;

    // The same through ?resume=: what is left after a gap, same epoch.
    let mut ws = herald.ws(&format!("/ws?resume=g~{}~{epoch}", first + 5));
    assert_eq!(next_json(&mut ws), resumed("g", &epoch, last, false));
    expect_ids(&mut ws, "g", last - 9..=last);
    drop(ws);

    // /history says the same, with or without the epoch (without: the current one).
    let held: Vec<u64> = (last - 9..=last).collect();
    let mut messages = history_messages(&held[..9], "g", 21);
    messages.push(json!({"id":last,"data":"marker"}));
    let want = json!({"topic":"g","epoch":epoch,"id":last,"recovered":false,"messages":messages});
    assert_eq!(
        history(herald.addr, &format!("topic=g&since={first}&epoch={epoch}")),
        want
    );
    assert_eq!(
        history(herald.addr, &format!("topic=g&since={first}")),
        want
    );
    // A since inside what is held: recovered, and only what follows it.
    let tail = json!({"topic":"g","epoch":epoch,"id":last,"recovered":true,
        "messages":messages[6..]});
    assert_eq!(
        history(
            herald.addr,
            &format!("topic=g&since={}&epoch={epoch}", last - 4)
        ),
        tail
    );
    // A topic with no history at all.
    assert_eq!(
        history(herald.addr, "topic=never&since=0"),
        json!({"topic":"never","epoch":null,"id":0,"recovered":false,"messages":[]})
    );
    assert_eq!(resumes(&herald), [0, 2, 0, 0]);
}

// ---- 3. another epoch ----------------------------------------------------------------

#[test]
fn history_a_wrong_epoch_is_not_recovered_and_gets_the_current_epoch_and_all_it_holds() {
    let herald = Herald::start(&[]);
    let mut api = herald.http();
    let (ws, epoch, first) = subscribe_at_connect(&herald, "e");
    drop(ws);
    let ids = publish_n(&mut api, "e", "e", 5);
    let last = *ids.last().unwrap();

    // An id means nothing without its epoch, and the other way round.
    let mut ws = herald.ws("/ws");
    for op in [
        json!({"op":"subscribe","topic":"e","since":3}),
        json!({"op":"subscribe","topic":"e","epoch":epoch}),
    ] {
        send_json(&mut ws, op.clone());
        let r = next_json(&mut ws);
        assert_eq!(
            (&r["op"], &r["error"]),
            (&json!("error"), &json!("bad_request")),
            "{op}: {r}"
        );
    }
    for bad in [
        "e~3",
        "e~x~E",
        "e~3~",
        "e~~E",
        "e~1~E~more",
        "bad%20name~1~E",
    ] {
        let r = herald.request(&format!(
            "GET /ws?resume={bad} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        ));
        assert_eq!(r.status, 400, "?resume={bad}: {}", r.text());
    }

    assert_eq!(
        resume(&mut ws, "e", last - 1, "not-the-epoch"),
        resumed("e", &epoch, last, false)
    );
    let got = expect_ids(&mut ws, "e", first + 1..=last);
    assert_eq!(got[0]["data"], json!({"tag":"e","i":0}));
    expect_marker_next(&mut api, &mut ws, "e", last);
    drop(ws);
    let last = last + 1;

    // The right epoch with an id it never issued (past its last) is another epoch too.
    let mut ws = herald.ws(&format!("/ws?resume=e~{}~{epoch}", last + 100));
    assert_eq!(next_json(&mut ws), resumed("e", &epoch, last, false));
    expect_ids(&mut ws, "e", first + 1..=last);
    drop(ws);

    let r = history(herald.addr, "topic=e&since=3&epoch=zzz");
    assert_eq!(
        (&r["epoch"], &r["id"], &r["recovered"]),
        (&json!(epoch), &json!(last), &json!(false))
    );
    assert_eq!(r["messages"].as_array().unwrap().len() as u64, last - first);
    assert_eq!(resumes(&herald), [0, 0, 2, 0]);
}

// ---- 4 + 5. restarts -----------------------------------------------------------------

/// Publish `{"i":n}` to `topic` over keep-alive connections until `stop`, reconnecting
/// after 503s, refusals and resets; bounded in count and time. Returns the acknowledged
/// ids in order; `count` follows their number as they come.
fn publisher(
    addr: SocketAddr,
    topic: &'static str,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
) -> JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut acked = Vec::new();
        let mut conn: Option<HttpConn> = None;
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst)
            && start.elapsed() < Duration::from_secs(60)
            && n < 200_000
        {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match TcpStream::connect(addr) {
                    Ok(s) => {
                        s.set_read_timeout(Some(TIMEOUT)).unwrap();
                        conn.insert(HttpConn::from_stream(s))
                    }
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                },
            };
            let body = json!({"topic":topic,"data":{"i":n}}).to_string();
            n += 1;
            let raw = format!(
                "POST /publish HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if c.stream.write_all(raw.as_bytes()).is_err() {
                conn = None;
                continue;
            }
            match c.try_response() {
                Ok(r) if r.status == 200 => {
                    acked.push(r.json()["id"].as_u64().expect("an id"));
                    count.fetch_add(1, Ordering::SeqCst);
                }
                Ok(r) if r.status == 503 => {
                    conn = None;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(r) => panic!("publish answered {}: {}", r.status, r.text()),
                Err(_) => conn = None,
            }
        }
        acked
    })
}

/// What one subscriber saw across a restart.
struct Across {
    /// Ids before the restart, and how that connection ended (a close code, if any).
    before: Vec<u64>,
    close: Option<CloseCode>,
    /// The drain's `{"op":"reconnect","after_ms":X}` hint, if one came.
    hint: Option<u64>,
    /// The resume's reply, and every id after it, up to and including the "end" marker.
    reply: Value,
    after: Vec<u64>,
}

/// Read `ws` until its server goes, then reconnect (retrying until a server listens) and
/// resume from the last id seen, by op or by `?resume=`; read until the "end" marker.
fn across_restart(
    mut ws: Client,
    addr: SocketAddr,
    topic: &'static str,
    (epoch, first): (String, u64),
    by_op: bool,
) -> JoinHandle<Across> {
    std::thread::spawn(move || {
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut before = Vec::new();
        let mut hint = None;
        let close = loop {
            match ws.read() {
                Ok(Message::Text(t)) => {
                    let m: Value = serde_json::from_str(t.as_str()).unwrap();
                    if m["op"] == "reconnect" {
                        assert_eq!(hint, None, "a second hint: {m}");
                        hint = Some(m["after_ms"].as_u64().expect("after_ms"));
                        continue;
                    }
                    assert_eq!(m["op"], "message", "{m}");
                    assert_eq!(hint, None, "a message after the reconnect hint: {m}");
                    before.push(m["id"].as_u64().unwrap());
                }
                Ok(Message::Close(frame)) => {
                    // Answer the close, so the drain need not wait for us.
                    let _ = ws.flush();
                    break frame.map(|f| f.code);
                }
                Ok(_) => {}
                Err(_) => break None,
            }
        };
        drop(ws);
        // A well-behaved client waits as it was told before it comes back.
        if let Some(ms) = hint {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let since = before.last().copied().unwrap_or(first);
        let path = if by_op {
            "/ws".to_string()
        } else {
            format!("/ws?resume={topic}~{since}~{epoch}")
        };
        let mut ws = ws_retrying(addr, &path, Duration::from_secs(30));
        let reply = if by_op {
            resume(&mut ws, topic, since, &epoch)
        } else {
            next_json(&mut ws)
        };
        let mut after = Vec::new();
        loop {
            let m = next_message(&mut ws, topic);
            after.push(m["id"].as_u64().unwrap());
            if m["data"] == "end" {
                break;
            }
        }
        Across {
            before,
            close,
            hint,
            reply,
            after,
        }
    })
}

/// Whether `ids` are `from, from + 1, ...`: nothing missing, nothing repeated.
fn is_run(ids: &[u64], from: u64) -> bool {
    ids.iter().zip(from..).all(|(&id, want)| id == want)
}

fn wait_for(count: &AtomicUsize, at_least: usize, what: &str) {
    assert!(
        eventually(Duration::from_secs(30), || count.load(Ordering::SeqCst)
            >= at_least),
        "{what}: only {} publishes acknowledged",
        count.load(Ordering::SeqCst)
    );
}

const RESTART_SUBSCRIBERS: usize = 20;

/// What `restart` saw: each subscriber's view, the acknowledged ids, the first herald's
/// epoch and first id, the "end" marker's id, the first herald's log, the new herald.
struct Restart {
    seen: Vec<Across>,
    acked: Vec<u64>,
    epoch: String,
    first: u64,
    end: u64,
    old_log: String,
    new: Herald,
    file: PathBuf,
    dir: PathBuf,
}

/// 20 subscribers and a publisher; herald gets `sig`; a new herald starts on the same
/// port and state dir; the subscribers resume (half by op, half by `?resume=`).
fn restart(sig: i32, name: &str) -> Restart {
    let port = free_port();
    let dir = scratch_dir(name);
    let file = state_file(&dir, port);
    let dir_arg = dir.to_str().unwrap().to_string();
    // The drain paces its closes and hints each client when to come back: kept short
    // here (the pacing has its own tests), but honoured.
    let args = [
        "--state-dir",
        &dir_arg,
        "--history-size",
        "100000",
        "--drain-spread",
        "1",
        "--reconnect-jitter",
        "0-500",
    ];
    let mut old = start_on(port, &args);
    assert!(old.log().contains("no saved history"), "{}", old.log());
    let addr = old.addr;

    let mut subs = Vec::new();
    let mut at = None;
    for _ in 0..RESTART_SUBSCRIBERS {
        let (ws, epoch, first) = subscribe_at_connect(&old, "restart");
        match &at {
            None => at = Some((epoch, first)),
            Some(a) => assert_eq!(a, &(epoch, first)),
        }
        subs.push(ws);
    }
    let (epoch, first) = at.unwrap();
    let seen: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(i, ws)| across_restart(ws, addr, "restart", (epoch.clone(), first), i % 2 == 0))
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let publishing = publisher(addr, "restart", stop.clone(), count.clone());
    wait_for(&count, 200, "before the restart");
    old.signal(sig);
    let status = old
        .wait(Duration::from_secs(20))
        .expect("herald did not exit");
    if sig == libc::SIGTERM {
        assert!(status.success(), "{status:?}");
        // Written atomically: the file and nothing else (no temporary left behind).
        let names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(names, std::slice::from_ref(&file));
    }
    let old_log = old.log();
    drop(old);

    let new = start_on(port, &args);
    let listening = count.load(Ordering::SeqCst);
    wait_for(&count, listening + 200, "after the restart");
    stop.store(true, Ordering::SeqCst);
    let acked = publishing.join().unwrap();
    let end = new.publish("restart", r#""end""#)["id"].as_u64().unwrap();
    let seen: Vec<Across> = seen.into_iter().map(|s| s.join().unwrap()).collect();
    // (last id seen before, the resume reply's id) per subscriber.
    let resumed_at: Vec<(u64, u64)> = seen
        .iter()
        .map(|s| {
            let since = s.before.last().copied().unwrap_or(first);
            (since, s.reply["id"].as_u64().unwrap_or(0))
        })
        .collect();
    eprintln!(
        "{name}: {} acks ({listening} when the new herald listened), end at {end}; \
         (last id seen, reply id) per subscriber: {resumed_at:?}",
        acked.len()
    );
    Restart {
        seen,
        acked,
        epoch,
        first,
        end,
        old_log,
        new,
        file,
        dir,
    }
}

#[test]
fn history_survives_a_sigterm_restart_with_state_dir_every_ack_exactly_once_recovered() {
    let r = restart(libc::SIGTERM, "sigterm");
    assert!(r.old_log.contains("saved history to"), "{}", r.old_log);
    let log = r.new.log();
    assert!(
        log.contains("loaded history from") && log.contains("1 topics"),
        "{log}"
    );
    assert!(
        !r.file.exists(),
        "the state file was not removed once loaded"
    );

    assert!(r.acked.windows(2).all(|w| w[1] > w[0]), "acks out of order");
    let (lo, hi) = (r.acked[0], *r.acked.last().unwrap());
    assert_eq!(lo, r.first + 1);
    assert_eq!(r.end, hi + 1, "the new herald's ids continue the old ones");
    for (n, s) in r.seen.iter().enumerate() {
        assert_eq!(s.close, Some(CloseCode::Away), "subscriber {n}");
        assert!(
            s.hint.is_some_and(|ms| ms <= 500),
            "subscriber {n}: {:?}",
            s.hint
        );
        let since = s.before.last().copied().unwrap_or(r.first);
        assert_eq!(s.reply["recovered"], true, "subscriber {n}: {}", s.reply);
        assert_eq!(
            s.reply["epoch"],
            r.epoch.as_str(),
            "subscriber {n}: {}",
            s.reply
        );
        assert!(s.reply["id"].as_u64().unwrap() >= since, "{}", s.reply);
        let all: Vec<u64> = s.before.iter().chain(&s.after).copied().collect();
        assert!(
            is_run(&all, r.first + 1) && all.last() == Some(&r.end),
            "subscriber {n} did not get {}..={} exactly once: {} before ending at {:?}, {} after from {:?}",
            r.first + 1,
            r.end,
            s.before.len(),
            s.before.last(),
            s.after.len(),
            s.after.first()
        );
    }
    // Every acknowledged id lies in that run, which each subscriber got exactly once.
    assert!(lo > r.first && hi < r.end);
    let [recovered, gap, changed, unavailable] = resumes(&r.new);
    assert_eq!(
        (recovered, gap, changed, unavailable),
        (RESTART_SUBSCRIBERS as u64, 0, 0, 0)
    );
    let _ = std::fs::remove_dir_all(&r.dir);
}

#[test]
fn history_after_a_sigkill_restart_is_not_recovered_and_has_a_new_epoch() {
    let r = restart(libc::SIGKILL, "sigkill");
    assert!(!r.old_log.contains("saved history to"), "{}", r.old_log);
    assert!(r.new.log().contains("no saved history"), "{}", r.new.log());
    assert!(!r.file.exists());

    // The new process counts ids from 1 again: split the acks where they go back.
    let split = r
        .acked
        .windows(2)
        .position(|w| w[1] <= w[0])
        .expect("the new herald's ids start over")
        + 1;
    let (old_acks, new_acks) = r.acked.split_at(split);
    assert!(is_run(old_acks, r.first + 1), "acks before the kill");
    assert!(is_run(new_acks, 1), "acks after the restart");
    assert_eq!(r.end, *new_acks.last().unwrap() + 1);

    let new_epoch = r.seen[0].reply["epoch"].as_str().unwrap().to_string();
    assert_ne!(new_epoch, r.epoch);
    for (n, s) in r.seen.iter().enumerate() {
        assert_eq!(
            s.close, None,
            "subscriber {n}: a killed server sends no close"
        );
        // What it got before is a run; the crash may have lost the tail of it.
        assert!(
            is_run(&s.before, r.first + 1),
            "subscriber {n} before the kill"
        );
        assert_eq!(s.reply["op"], "subscribed", "{}", s.reply);
        assert_eq!(s.reply["recovered"], false, "subscriber {n}: {}", s.reply);
        assert_eq!(
            s.reply["epoch"],
            new_epoch.as_str(),
            "subscriber {n}: {}",
            s.reply
        );
        // Another epoch: everything the new one holds, then live, each once.
        assert!(
            is_run(&s.after, 1) && s.after.last() == Some(&r.end),
            "subscriber {n} after the restart: {} ids from {:?} to {:?}",
            s.after.len(),
            s.after.first(),
            s.after.last()
        );
    }
    let [recovered, gap, changed, unavailable] = resumes(&r.new);
    assert_eq!(
        (recovered, gap, changed, unavailable),
        (0, 0, RESTART_SUBSCRIBERS as u64, 0)
    );
    let _ = std::fs::remove_dir_all(&r.dir);
}

#[test]
fn history_is_saved_even_when_a_second_signal_cuts_the_drain() {
    let port = free_port();
    let dir = scratch_dir("second-signal");
    let dir_arg = dir.to_str().unwrap().to_string();
    let args = [
        "--state-dir",
        &dir_arg,
        "--history-size",
        "5",
        "--drain-timeout",
        "30",
        "--send-queue-limit",
        "100000000",
    ];
    let mut old = start_on(port, &args);
    let mut api = old.http();
    let (ws, epoch, first) = subscribe_at_connect(&old, "h");
    drop(ws);
    publish_n(&mut api, "h", "h", 3);
    // A subscriber that never reads, with more queued than the kernel takes: the drain
    // cannot finish on its own.
    let (_stuck, _, _) = subscribe_at_connect(&old, "stuck");
    let big = format!("\"{}\"", "x".repeat(60_000));
    for _ in 0..200 {
        api.publish("stuck", &big);
    }
    drop(api);
    old.signal(libc::SIGTERM);
    assert!(
        eventually(TIMEOUT, || old.log().contains("draining")),
        "{}",
        old.log()
    );
    old.signal(libc::SIGTERM);
    let status = old.wait(TIMEOUT).expect("herald did not exit");
    assert_eq!(status.code(), Some(1), "a second signal exits 1");
    assert!(old.log().contains("saved history to"), "{}", old.log());
    drop(old);

    let new = start_on(port, &args);
    let mut ws = new.ws(&format!("/ws?resume=h~{first}~{epoch}"));
    assert_eq!(next_json(&mut ws), resumed("h", &epoch, first + 3, true));
    expect_ids(&mut ws, "h", first + 1..=first + 3);
    drop(new);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- 6. a state file that cannot be used ---------------------------------------------

/// The one `.bad-<unix time>` file set aside for `file`, and its contents.
fn set_aside(dir: &Path, file: &Path, from: u64, to: u64) -> Vec<u8> {
    let name = file.file_name().unwrap().to_str().unwrap();
    let prefix = format!("{name}.bad-");
    let aside: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&prefix)
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let suffix = aside[0].file_name().unwrap().to_str().unwrap()[prefix.len()..].to_string();
    let secs: u64 = suffix
        .parse()
        .unwrap_or_else(|_| panic!("suffix {suffix:?}"));
    assert!((from..=to).contains(&secs), "{secs} not in {from}..={to}");
    std::fs::read(&aside[0]).unwrap()
}

#[test]
fn history_a_corrupt_state_file_is_set_aside_and_herald_starts_fresh() {
    // Garbage where the snapshot should be.
    let port = free_port();
    let dir = scratch_dir("garbage");
    let file = state_file(&dir, port);
    let garbage = b"this is not a herald history snapshot\n".repeat(10);
    std::fs::write(&file, &garbage).unwrap();
    let dir_arg = dir.to_str().unwrap().to_string();
    let before = unix_now();
    let herald = start_on(port, &["--state-dir", &dir_arg]);
    let log = herald.log();
    assert!(
        log.contains("not a herald history snapshot") && log.contains("moved to"),
        "{log}"
    );
    assert!(!file.exists());
    assert_eq!(set_aside(&dir, &file, before, unix_now()), garbage);
    let (ws, _, id) = subscribe_at_connect(&herald, "fresh");
    assert_eq!(id, 0);
    assert_eq!(herald.publish("fresh", "1")["id"], 1);
    drop(ws);
    assert!(herald.terminate().success());
    assert!(file.exists(), "the drain saves a new state file");
    let _ = std::fs::remove_dir_all(&dir);

    // A real snapshot with one byte changed: the checksum catches it.
    let port = free_port();
    let dir = scratch_dir("flipped");
    let file = state_file(&dir, port);
    let dir_arg = dir.to_str().unwrap().to_string();
    let herald = start_on(port, &["--state-dir", &dir_arg]);
    let (ws, old_epoch, _) = subscribe_at_connect(&herald, "kept");
    herald.publish("kept", r#""a message to keep""#);
    drop(ws);
    assert!(herald.terminate().success());
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x20;
    std::fs::write(&file, &bytes).unwrap();
    let before = unix_now();
    let herald = start_on(port, &["--state-dir", &dir_arg]);
    let log = herald.log();
    assert!(
        log.contains("corrupt: body checksum") && log.contains("moved to"),
        "{log}"
    );
    assert!(!file.exists());
    assert_eq!(set_aside(&dir, &file, before, unix_now()), bytes);
    let (_ws, epoch, id) = subscribe_at_connect(&herald, "kept");
    assert_ne!(epoch, old_epoch);
    assert_eq!(id, 0);
    assert_eq!(
        history(herald.addr, "topic=kept&since=0")["messages"],
        json!([])
    );

    // A truncated one (a cut-off write) is set aside too.
    drop(herald);
    let port = free_port();
    let file2 = state_file(&dir, port);
    std::fs::write(&file2, &bytes[..bytes.len() / 2]).unwrap();
    let herald = start_on(port, &["--state-dir", &dir_arg]);
    assert!(
        herald.log().contains("truncated") && herald.log().contains("moved to"),
        "{}",
        herald.log()
    );
    assert!(!file2.exists());
    assert_eq!(herald.publish("x", "1")["id"], 1);
    drop(herald);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- 7. bounds -----------------------------------------------------------------------

#[test]
fn history_size_bound_keeps_the_newest_n() {
    let herald = Herald::start(&["--history-size", "5"]);
    let mut api = herald.http();
    let (ws, epoch, first) = subscribe_at_connect(&herald, "s5");
    drop(ws);
    let ids = publish_n(&mut api, "s5", "s", 12);
    let last = *ids.last().unwrap();
    let m = herald.metrics();
    assert_eq!(metric(&m, "herald_history_messages"), 5.0);
    assert_eq!(evictions(&herald), [7, 0, 0]);

    let held = history_messages(&ids[7..], "s", 7);
    assert_eq!(
        history(
            herald.addr,
            &format!("topic=s5&since={first}&epoch={epoch}")
        ),
        json!({"topic":"s5","epoch":epoch,"id":last,"recovered":false,"messages":held})
    );
    // The oldest held is since + 1: everything missed is there.
    assert_eq!(
        history(
            herald.addr,
            &format!("topic=s5&since={}&epoch={epoch}", last - 5)
        ),
        json!({"topic":"s5","epoch":epoch,"id":last,"recovered":true,"messages":held})
    );
    let mut ws = herald.ws("/ws");
    assert_eq!(
        resume(&mut ws, "s5", last - 6, &epoch),
        resumed("s5", &epoch, last, false)
    );
    expect_ids(&mut ws, "s5", last - 4..=last);
    expect_marker_next(&mut api, &mut ws, "s5", last);
    assert_eq!(evictions(&herald), [8, 0, 0]);
    assert_eq!(herald.metric("herald_history_messages"), 5.0);
}

#[test]
fn history_size_zero_keeps_nothing_but_topics_keep_epochs_and_ids() {
    let herald = Herald::start(&["--history-size", "0"]);
    let mut api = herald.http();
    let (ws, epoch, first) = subscribe_at_connect(&herald, "off");
    drop(ws);
    publish_n(&mut api, "off", "o", 3);
    assert_eq!(herald.metric("herald_history_messages"), 0.0);
    assert_eq!(evictions(&herald), [0, 0, 0]);
    assert_eq!(
        history(
            herald.addr,
            &format!("topic=off&since={first}&epoch={epoch}")
        ),
        json!({"topic":"off","epoch":epoch,"id":first + 3,"recovered":false,"messages":[]})
    );
    // Nothing missed is recovered even with nothing kept; anything missed is a gap.
    let mut ws = herald.ws("/ws");
    assert_eq!(
        resume(&mut ws, "off", first + 3, &epoch),
        resumed("off", &epoch, first + 3, true)
    );
    let mut gap = herald.ws(&format!("/ws?resume=off~{}~{epoch}", first + 1));
    assert_eq!(
        next_json(&mut gap),
        resumed("off", &epoch, first + 3, false)
    );
    expect_marker_next(&mut api, &mut ws, "off", first + 3);
    let m = next_message(&mut gap, "off");
    assert_eq!(
        m["data"], "marker",
        "nothing replayed before the live marker: {m}"
    );
    assert_eq!(resumes(&herald), [1, 1, 0, 0]);
}

#[test]
fn history_a_message_too_big_for_the_memory_cap_is_not_kept_and_leaves_an_honest_gap() {
    let herald = Herald::start(&["--history-memory", "3000"]);
    let mut api = herald.http();
    let (ws, epoch, first) = subscribe_at_connect(&herald, "big");
    drop(ws);
    let ids = publish_n(&mut api, "big", "b", 3);
    assert_eq!(herald.metric("herald_history_messages"), 3.0);
    let big = format!("\"{}\"", "z".repeat(4000));
    let big_id = api.publish("big", &big)["id"].as_u64().unwrap();
    assert_eq!(big_id, ids[2] + 1);
    // Not kept, and the older ones went with it: kept ids stay one run up to the last.
    assert_eq!(herald.metric("herald_history_messages"), 0.0);
    assert_eq!(evictions(&herald), [0, 0, 4]);
    let mut ws = herald.ws("/ws");
    assert_eq!(
        resume(&mut ws, "big", first, &epoch),
        resumed("big", &epoch, big_id, false)
    );
    drop(ws);
    let small = api.publish("big", "1")["id"].as_u64().unwrap();
    assert_eq!(small, big_id + 1);
    let mut ws = herald.ws(&format!("/ws?resume=big~{big_id}~{epoch}"));
    assert_eq!(next_json(&mut ws), resumed("big", &epoch, small, true));
    assert_eq!(next_message(&mut ws, "big")["id"], small);
    let mut ws = herald.ws(&format!("/ws?resume=big~{}~{epoch}", ids[2]));
    assert_eq!(next_json(&mut ws), resumed("big", &epoch, small, false));
    assert_eq!(next_message(&mut ws, "big")["id"], small);
    expect_marker_next(&mut api, &mut ws, "big", small);
}

#[test]
fn history_a_restart_under_smaller_limits_keeps_epochs_and_ids_and_evicts_to_fit() {
    let port = free_port();
    let dir = scratch_dir("smaller");
    let dir_arg = dir.to_str().unwrap().to_string();
    let old = start_on(port, &["--state-dir", &dir_arg]);
    let mut api = old.http();
    let (ws, epoch, first) = subscribe_at_connect(&old, "t");
    assert_eq!(first, 0);
    drop(ws);
    publish_n(&mut api, "t", "t", 20);
    let u_id = api.publish("u", r#""u""#)["id"].as_u64().unwrap();
    assert_eq!(u_id, 21, "a new topic's ids go on from the process count");
    let u_epoch = history(old.addr, "topic=u&since=0")["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    drop(api);
    assert!(old.terminate().success());

    let new = start_on(port, &["--state-dir", &dir_arg, "--history-size", "5"]);
    assert!(new.log().contains("2 topics, 6 messages"), "{}", new.log());
    assert_eq!(evictions(&new), [15, 0, 0]);
    let mut api = new.http();
    let mut ws = new.ws("/ws");
    assert_eq!(
        resume(&mut ws, "t", 0, &epoch),
        resumed("t", &epoch, 20, false)
    );
    expect_ids(&mut ws, "t", 16..=20);
    let mut ws2 = new.ws(&format!("/ws?resume=t~15~{epoch}"));
    assert_eq!(next_json(&mut ws2), resumed("t", &epoch, 20, true));
    expect_ids(&mut ws2, "t", 16..=20);
    expect_marker_next(&mut api, &mut ws2, "t", 20);
    assert_eq!(next_message(&mut ws, "t")["id"], 21);
    let mut ws3 = new.ws(&format!("/ws?resume=u~20~{u_epoch}"));
    assert_eq!(next_json(&mut ws3), resumed("u", &u_epoch, 21, true));
    assert_eq!(next_message(&mut ws3, "u")["data"], "u");
    // The process count came back too: a new topic does not reuse ids.
    let (_v, _, v_first) = subscribe_at_connect(&new, "v");
    assert_eq!(v_first, 22);
    drop(new);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn history_ttl_bound_expires_messages_and_then_idle_topics() {
    let herald = Herald::start(&["--history-ttl", "1"]);
    let mut api = herald.http();
    let mut published = 0u64;

    // A topic that keeps a subscriber: its messages expire, its record (and epoch) stays.
    let (mut keeper, epoch, first) = subscribe_at_connect(&herald, "kept");
    assert_eq!(first, 0);
    publish_n(&mut api, "kept", "k", 3);
    published += 3;
    expect_ids(&mut keeper, "kept", 1..=3);
    // Another that loses its subscriber before anything is published.
    let (ws, gone_epoch, gone_first) = subscribe_at_connect(&herald, "gone");
    assert_eq!(gone_first, published);
    drop(ws);
    publish_n(&mut api, "gone", "g", 2);
    published += 2;

    assert!(
        eventually(Duration::from_secs(5), || herald
            .metric("herald_history_messages")
            == 0.0),
        "messages outlived their ttl"
    );
    // Nothing held, and the record of the topic nobody holds is gone (its linger ended).
    assert!(
        eventually(Duration::from_secs(5), || history(
            herald.addr,
            "topic=gone&since=0"
        )["epoch"]
            .is_null()),
        "the idle topic's record outlived its ttl: {}",
        history(herald.addr, "topic=gone&since=0")
    );
    assert_eq!(evictions(&herald), [0, 5, 0]);

    // The held topic: same epoch, nothing left after since → a gap, nothing replayed.
    assert_eq!(
        history(herald.addr, &format!("topic=kept&since=0&epoch={epoch}")),
        json!({"topic":"kept","epoch":epoch,"id":3,"recovered":false,"messages":[]})
    );
    let mut ws = herald.ws("/ws");
    assert_eq!(
        resume(&mut ws, "kept", 0, &epoch),
        resumed("kept", &epoch, 3, false)
    );
    // Having seen everything, nothing is missing even though nothing is held.
    let mut ws2 = herald.ws("/ws");
    assert_eq!(
        resume(&mut ws2, "kept", 3, &epoch),
        resumed("kept", &epoch, 3, true)
    );
    // Ids go on from the topic's own last id; the process count is only where new
    // epochs start.
    let id = api.publish("kept", r#""marker""#)["id"].as_u64().unwrap();
    published += 1;
    assert_eq!(id, 4);
    for ws in [&mut ws, &mut ws2, &mut keeper] {
        let m = next_message(ws, "kept");
        assert_eq!((m["id"].as_u64(), &m["data"]), (Some(id), &json!("marker")));
    }

    // The dropped topic comes back with a new epoch, its ids from the process count.
    let mut ws = herald.ws("/ws");
    let reply = resume(&mut ws, "gone", gone_first + 2, &gone_epoch);
    let (new_epoch, new_last) = position(&reply);
    assert_ne!(new_epoch, gone_epoch);
    assert_eq!(reply, resumed("gone", &new_epoch, published, false));
    assert_eq!(new_last, published);
    expect_marker_next(&mut api, &mut ws, "gone", published);
    assert_eq!(resumes(&herald), [1, 1, 1, 0]);
}

#[test]
fn history_memory_bound_holds_evicting_the_oldest_across_topics() {
    const TOPICS: usize = 1000;
    const ROUNDS: usize = 100;
    const CAP: usize = 2 << 20;
    let herald = Herald::start(&["--history-memory", &CAP.to_string()]);
    let rss_before = herald.metric("process_resident_memory_bytes");
    let (peak, kept_bytes) = fill(&herald, TOPICS, ROUNDS, Some(CAP));
    let rss_after = herald.metric("process_resident_memory_bytes");
    let m = herald.metrics();
    let kept = metric(&m, "herald_history_messages") as usize;
    let [size, ttl, memory] = evictions(&herald);
    eprintln!(
        "memory cap {CAP}: {kept} messages ({kept_bytes} bytes, peak {peak}) held of {}; \
         RSS {:.1} MiB -> {:.1} MiB",
        TOPICS * ROUNDS,
        rss_before / 1048576.0,
        rss_after / 1048576.0
    );
    assert!(peak <= CAP && kept_bytes <= CAP);
    assert!(kept > 0 && memory > 0);
    assert_eq!((size, ttl, memory as usize + kept), (0, 0, TOPICS * ROUNDS));
    assert!(
        rss_after - rss_before < (CAP + (48 << 20)) as f64,
        "RSS grew from {rss_before} to {rss_after}"
    );

    // Oldest first across topics: what is held is exactly the newest `kept` messages in
    // publish order (round by round, topic by topic).
    let mut held = 0;
    let oldest_kept = TOPICS * ROUNDS - kept;
    let mut conn = herald.http();
    for t in 0..TOPICS {
        let r =
            conn.exchange(format!("GET /history?topic=m{t}&since=0 HTTP/1.1\r\n\r\n").as_bytes());
        assert_eq!(r.status, 200);
        let r = r.json();
        let rounds: Vec<usize> = r["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["data"]["r"].as_u64().unwrap() as usize)
            .collect();
        let want: Vec<usize> = (0..ROUNDS)
            .filter(|r| r * TOPICS + t >= oldest_kept)
            .collect();
        assert_eq!(rounds, want, "topic m{t}");
        held += rounds.len();
    }
    assert_eq!(held, kept);
}

#[test]
fn history_rss_follows_what_history_holds() {
    const TOPICS: usize = 1000;
    const ROUNDS: usize = 100;
    let herald = Herald::start(&[]);
    let rss_before = herald.metric("process_resident_memory_bytes");
    let (_, kept_bytes) = fill(&herald, TOPICS, ROUNDS, None);
    let rss_after = herald.metric("process_resident_memory_bytes");
    let kept = herald.metric("herald_history_messages") as usize;
    let growth = rss_after - rss_before;
    eprintln!(
        "{TOPICS} topics x {ROUNDS} messages of 64 bytes: history holds {kept} messages, \
         {:.1} MiB counted; RSS {:.1} MiB -> {:.1} MiB (+{:.1} MiB, {:.2}x the count)",
        kept_bytes as f64 / 1048576.0,
        rss_before / 1048576.0,
        rss_after / 1048576.0,
        growth / 1048576.0,
        growth / kept_bytes as f64
    );
    assert_eq!(kept, TOPICS * ROUNDS);
    assert_eq!(evictions(&herald), [0, 0, 0]);
    assert!(
        growth < 3.0 * kept_bytes as f64 + (32 << 20) as f64,
        "RSS grew by {growth} bytes for {kept_bytes} bytes of history"
    );
}

/// Publish `rounds` messages of 64 bytes of data to each of `topics` topics (`m0`..),
/// round by round, 100 topics per request. With a cap, herald_history_bytes is checked
/// against it as it goes. Returns the largest and the last herald_history_bytes seen.
fn fill(herald: &Herald, topics: usize, rounds: usize, cap: Option<usize>) -> (usize, usize) {
    let mut conn = herald.http();
    let mut peak = 0;
    for r in 0..rounds {
        for chunk in (0..topics).collect::<Vec<_>>().chunks(100) {
            let names: Vec<String> = chunk.iter().map(|t| format!("m{t}")).collect();
            // {"r":NN,"pad":"..."} padded to 64 bytes.
            let head = format!(r#"{{"r":{r},"pad":""#);
            let data = format!("{head}{}\"}}", "x".repeat(64 - head.len() - 2));
            assert_eq!(data.len(), 64);
            let body = json!({"topics":names,"data":serde_json::from_str::<Value>(&data).unwrap()})
                .to_string();
            let raw = format!(
                "POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let resp = conn.exchange(raw.as_bytes());
            assert_eq!(resp.status, 200, "{}", resp.text());
        }
        if let Some(cap) = cap.filter(|_| r % 10 == 9) {
            let bytes = herald.metric("herald_history_bytes") as usize;
            assert!(bytes <= cap, "{bytes} bytes held past the cap of {cap}");
            peak = peak.max(bytes);
        }
    }
    let bytes = herald.metric("herald_history_bytes") as usize;
    (peak.max(bytes), bytes)
}

// ---- 8. access -----------------------------------------------------------------------

const SECRET: &str = "a-test-secret-of-enough-length";

fn token(sub: &str, topics: &[&str]) -> String {
    let exp = unix_now() + 600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub":sub,"exp":exp,"topics":topics}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Ping and expect the pong next: nothing else was queued to `ws` before it.
fn expect_nothing_queued(ws: &mut Client) {
    send_json(ws, json!({"op":"ping"}));
    let r = next_json(ws);
    assert_eq!(r, json!({"op":"pong"}), "expected nothing before the pong");
}

#[test]
fn history_a_private_topic_resumes_only_with_a_grant() {
    let herald = Herald::start(&["--token-secret", SECRET, "--private-topics", "user:*"]);
    let mut api = herald.http();
    let ids = publish_n(&mut api, "user:1", "p", 3);
    let h = history(herald.addr, "topic=user:1&since=0");
    let epoch = h["epoch"].as_str().unwrap().to_string();
    assert_eq!(h["id"], 3);
    assert_eq!(h["messages"], json!(history_messages(&ids, "p", 0)));

    let is_forbidden = |r: &Value| r["op"] == "error" && r["error"] == "forbidden";
    // No token: the op and ?resume= are refused, and nothing leaks.
    let mut ws = herald.ws("/ws");
    let r = resume(&mut ws, "user:1", 0, &epoch);
    assert!(is_forbidden(&r), "{r}");
    let mut at_connect = herald.ws(&format!("/ws?resume=user:1~0~{epoch}"));
    let r = next_json(&mut at_connect);
    assert!(is_forbidden(&r), "{r}");
    api.publish("user:1", r#""live""#);
    expect_nothing_queued(&mut ws);
    expect_nothing_queued(&mut at_connect);

    // Another user's grant: refused too.
    let other = token("2", &["user:2"]);
    let mut ws = herald.ws(&format!("/ws?token={other}"));
    let r = resume(&mut ws, "user:1", 0, &epoch);
    assert!(is_forbidden(&r), "{r}");
    let mut ws2 = herald.ws(&format!("/ws?token={other}&resume=user:1~0~{epoch}"));
    let r = next_json(&mut ws2);
    assert!(is_forbidden(&r), "{r}");
    expect_nothing_queued(&mut ws);
    expect_nothing_queued(&mut ws2);

    // The grant: both forms resume.
    let grant = token("1", &["user:1"]);
    let mut ws = herald.ws(&format!("/ws?token={grant}&resume=user:1~0~{epoch}"));
    let want =
        json!({"op":"subscribed","topic":"user:1","epoch":epoch,"id":4,"recovered":true,"sub":"1"});
    assert_eq!(next_json(&mut ws), want);
    expect_ids(&mut ws, "user:1", 1..=4);
    let mut ws = herald.ws(&format!("/ws?token={grant}"));
    assert_eq!(resume(&mut ws, "user:1", 2, &epoch), want);
    expect_ids(&mut ws, "user:1", 3..=4);
    expect_nothing_queued(&mut ws);
    assert_eq!(resumes(&herald), [2, 0, 0, 0]);
}

fn non_loopback_local_ip() -> Option<std::net::IpAddr> {
    // Connecting a UDP socket sends nothing; it only picks the outgoing address.
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect("10.255.255.255:9").ok()?;
    let ip = sock.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn history_endpoint_has_the_publish_access_rule() {
    // Without a key: loopback only.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(["--listen", "0.0.0.0:0"]);
    let herald = Herald::spawn(cmd);
    let port = herald.addr.port();
    let loopback = SocketAddr::from(([127, 0, 0, 1], port));
    HttpConn::connect(loopback).publish("h", "1");
    assert_eq!(history(loopback, "topic=h&since=0")["id"], 1);
    match non_loopback_local_ip() {
        Some(ip) => {
            let r = get(SocketAddr::new(ip, port), "/history?topic=h&since=0", "");
            assert_eq!(r.status, 403, "{}", r.text());
            assert!(!r.text().contains("messages"));
        }
        None => eprintln!("no non-loopback address on this machine; loopback side only"),
    }
    drop(herald);

    // With a key: the key, from anywhere.
    let herald = Herald::start(&["--api-key", "sekrit"]);
    let body = r#"{"topic":"h","data":1}"#;
    let r = herald.request(&format!(
        "POST /publish HTTP/1.1\r\nAuthorization: Bearer sekrit\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    assert_eq!(r.status, 200);
    let path = "/history?topic=h&since=0";
    let key = "Authorization: Bearer sekrit\r\n";
    for bad in [
        "",
        "?since=1",
        "?topic=bad%20name",
        "?topic=h&since=x",
        "?topic=h&since=-1",
    ] {
        let r = get(herald.addr, &format!("/history{bad}"), key);
        assert_eq!(r.status, 400, "/history{bad}: {}", r.text());
    }
    assert_eq!(get(herald.addr, path, "").status, 401);
    assert_eq!(
        get(herald.addr, path, "Authorization: Bearer wrong\r\n").status,
        401
    );
    assert_eq!(
        get(herald.addr, path, "Authorization: Bearer sekri\r\n").status,
        401
    );
    let r = get(herald.addr, path, "Authorization: Bearer sekrit\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["messages"], json!([{"id":1,"data":1}]));
}

// ---- 9. the seam ---------------------------------------------------------------------

/// Publish `n` messages `{"r":round,"i":i}` as fast as one pipelining connection can;
/// returns their ids.
fn burst(addr: SocketAddr, topic: &'static str, round: usize, n: usize) -> JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let mut conn = HttpConn::connect(addr);
        let mut ids = Vec::with_capacity(n);
        for batch in (0..n).collect::<Vec<_>>().chunks(50) {
            let mut raw = String::new();
            for i in batch {
                let body = json!({"topic":topic,"data":{"r":round,"i":i}}).to_string();
                raw.push_str(&format!(
                    "POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ));
            }
            conn.send(raw.as_bytes());
            for _ in batch {
                let r = conn.response();
                assert_eq!(r.status, 200, "{}", r.text());
                ids.push(r.json()["id"].as_u64().unwrap());
            }
        }
        ids
    })
}

#[test]
fn history_a_resume_during_a_burst_has_no_gap_and_no_duplicate_at_the_seam() {
    const ROUNDS: usize = 20;
    const BURST: usize = 2000;
    let herald = Herald::start(&["--history-size", "10000"]);
    let (mut live_epoch, mut mid_burst, mut replayed) = (None, 0, 0);
    for round in 0..ROUNDS {
        let (mut ws, epoch, start) = subscribe_at_connect(&herald, "seam");
        match &live_epoch {
            None => live_epoch = Some(epoch.clone()),
            Some(e) => assert_eq!(e, &epoch, "round {round}: the epoch changed"),
        }
        let publishing = burst(herald.addr, "seam", round, BURST);
        // Read a little of the burst live, then drop off and resume at once.
        let seen = 1 + round * 37 % 200;
        expect_ids(&mut ws, "seam", start + 1..=start + seen as u64);
        drop(ws);
        let since = start + seen as u64;
        let mut ws = if round % 2 == 0 {
            let mut ws = herald.ws("/ws");
            send_json(
                &mut ws,
                json!({"op":"subscribe","topic":"seam","since":since,"epoch":epoch}),
            );
            ws
        } else {
            herald.ws(&format!("/ws?resume=seam~{since}~{epoch}"))
        };
        let reply = next_json(&mut ws);
        let (_, at) = position(&reply);
        assert_eq!(reply, resumed("seam", &epoch, at, true), "round {round}");
        let end = start + BURST as u64;
        let got = expect_ids(&mut ws, "seam", since + 1..=end);
        assert_eq!(
            got.last().unwrap()["data"],
            json!({"r":round,"i":BURST - 1})
        );
        let ids = publishing.join().unwrap();
        assert_eq!(ids, (start + 1..=end).collect::<Vec<_>>(), "round {round}");
        expect_nothing_queued(&mut ws);
        if at < end {
            mid_burst += 1;
        }
        if at > since {
            replayed += 1;
        }
    }
    eprintln!("seam: {mid_burst} of {ROUNDS} resumes landed mid-burst, {replayed} had a replay");
    assert!(
        mid_burst > 0 && replayed > 0,
        "no resume met both a replay and live messages: {mid_burst} mid-burst, {replayed} replayed"
    );
    assert_eq!(resumes(&herald), [ROUNDS as u64, 0, 0, 0]);
}

// ---- 10. a slow consumer -------------------------------------------------------------

#[test]
fn history_a_slow_consumer_closed_with_1008_resumes_what_it_missed() {
    let herald = Herald::start(&["--send-queue-limit", "65536", "--history-size", "100000"]);
    let mut api = herald.http();
    let (mut slow, epoch, first) = subscribe_at_connect(&herald, "slow");
    // It reads nothing while 4 KB messages pile up, until herald gives up on it.
    let data = format!("\"{}\"", "y".repeat(4000));
    let mut last = first;
    let mut cut_at = None;
    for _ in 0..20_000 {
        let r = api.publish("slow", &data);
        last = r["id"].as_u64().unwrap();
        if r["delivered"] == 0 {
            cut_at = Some(last);
            break;
        }
    }
    let cut_at = cut_at.expect("the slow consumer was never cut off");
    // More that it misses while gone.
    for _ in 0..5 {
        last = api.publish("slow", &data)["id"].as_u64().unwrap();
    }
    assert_eq!(herald.metric("herald_slow_consumers_total"), 1.0);

    // What reached it before the 1008, then the close.
    let mut got = Vec::new();
    let code = loop {
        match slow.read().expect("read until the close") {
            Message::Text(t) => {
                let m: Value = serde_json::from_str(t.as_str()).unwrap();
                got.push(m["id"].as_u64().unwrap());
            }
            Message::Close(frame) => break frame.map(|f| f.code),
            _ => {}
        }
    };
    assert_eq!(code, Some(CloseCode::Policy));
    let _ = slow.flush();
    drop(slow);
    assert!(
        is_run(&got, first + 1),
        "what it got is not a run from {}",
        first + 1
    );
    let since = got.last().copied().unwrap_or(first);
    assert!(since < cut_at, "it got {since}, the cut was at {cut_at}");
    eprintln!(
        "slow consumer: got {} messages before 1008 at id {cut_at}; resumes from {since} to {last}",
        got.len()
    );

    let mut ws = herald.ws(&format!("/ws?resume=slow~{since}~{epoch}"));
    assert_eq!(next_json(&mut ws), resumed("slow", &epoch, last, true));
    expect_ids(&mut ws, "slow", since + 1..=last);
    expect_marker_next(&mut api, &mut ws, "slow", last);
}

// ---- 11. metrics ---------------------------------------------------------------------

#[test]
fn history_resume_metrics_count_each_outcome() {
    let herald = Herald::start(&["--history-size", "5"]);
    let mut api = herald.http();
    assert_eq!(resumes(&herald), [0, 0, 0, 0]);
    assert_eq!(herald.metric("herald_history_messages"), 0.0);
    assert_eq!(herald.metric("herald_history_bytes"), 0.0);
    let (ws, epoch, first) = subscribe_at_connect(&herald, "mt");
    drop(ws);
    let mut ws = herald.ws("/ws");
    assert_eq!(subscribe(&mut ws, "mt")["op"], "subscribed");
    assert_eq!(
        resumes(&herald),
        [0, 0, 0, 0],
        "a plain subscribe is no resume"
    );

    publish_n(&mut api, "mt", "a", 3);
    // recovered: by op, and at connect
    let mut r1 = herald.ws("/ws");
    assert_eq!(resume(&mut r1, "mt", first, &epoch)["recovered"], true);
    let mut r2 = herald.ws(&format!("/ws?resume=mt~{}~{epoch}", first + 1));
    assert_eq!(next_json(&mut r2)["recovered"], true);
    assert_eq!(resumes(&herald), [2, 0, 0, 0]);

    // gap: 10 more with room for 5
    publish_n(&mut api, "mt", "b", 10);
    let mut r3 = herald.ws("/ws");
    let reply = resume(&mut r3, "mt", first + 3, &epoch);
    assert_eq!(reply, resumed("mt", &epoch, first + 13, false));
    assert_eq!(resumes(&herald), [2, 1, 0, 0]);

    // epoch changed: another epoch, and an id this epoch never issued
    let mut r4 = herald.ws("/ws?resume=mt~1~other");
    assert_eq!(next_json(&mut r4), resumed("mt", &epoch, first + 13, false));
    let mut r5 = herald.ws("/ws");
    assert_eq!(
        resume(&mut r5, "mt", first + 14, &epoch),
        resumed("mt", &epoch, first + 13, false)
    );
    expect_ids(&mut r5, "mt", first + 9..=first + 13);
    assert_eq!(resumes(&herald), [2, 1, 2, 0]);

    // /history reads do not count as resumes
    history(
        herald.addr,
        &format!("topic=mt&since={first}&epoch={epoch}"),
    );
    history(herald.addr, "topic=mt&since=1&epoch=other");
    assert_eq!(resumes(&herald), [2, 1, 2, 0]);

    // A resume of a topic the connection is already in is still a resume.
    assert_eq!(
        resume(&mut r5, "mt", first + 13, &epoch),
        resumed("mt", &epoch, first + 13, true)
    );
    assert_eq!(resumes(&herald), [3, 1, 2, 0]);
    let m = herald.metrics();
    assert_eq!(metric(&m, "herald_history_messages"), 5.0);
    assert!(metric(&m, "herald_history_bytes") > 0.0);
    assert_eq!(evictions(&herald), [8, 0, 0]);
    drop(ws);
}
