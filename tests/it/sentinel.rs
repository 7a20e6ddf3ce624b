//! Redis Sentinel failover under traffic (issue 19): a master, a replica and three real
//! `redis-sentinel` processes on loopback, two heralds finding the master through them,
//! a publisher and a resuming subscriber on each herald. The master is killed (by its
//! PID); the test measures the failover as clients see it and prints it.

use std::collections::HashSet;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::Message;

use crate::util::{Herald, HttpConn, eventually, free_ports, require};

const MASTER: &str = "herald-master";

/// A redis-server or redis-sentinel this test started, killed (by PID) when dropped.
pub(crate) struct Node {
    child: Child,
    pub(crate) port: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

pub(crate) fn redis_node(port: u16, dir: &Path, extra: &[&str]) -> Node {
    require("redis-server", "redis-server");
    std::fs::create_dir_all(dir).expect("node dir");
    let port_s = port.to_string();
    let dir_s = dir.to_string_lossy().into_owned();
    let mut args = vec![
        "--port",
        &port_s,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir_s,
        // A replica joining syncs at once, not after the default 5 s wait for others.
        "--repl-diskless-sync-delay",
        "0",
    ];
    args.extend_from_slice(extra);
    let child = Command::new("redis-server")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let node = Node { child, port };
    assert!(
        eventually(Duration::from_secs(10), || cli(port, &["PING"]) == "PONG"),
        "redis-server on {port} did not start"
    );
    node
}

fn sentinel_node(port: u16, dir: &Path, master_port: u16) -> Node {
    require("redis-sentinel", "redis-sentinel");
    std::fs::create_dir_all(dir).expect("sentinel dir");
    // Sentinel rewrites its configuration file, so each has its own.
    let conf = dir.join("sentinel.conf");
    let text = format!(
        "port {port}\nbind 127.0.0.1\ndir {}\n\
         sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n\
         sentinel down-after-milliseconds {MASTER} 1000\n\
         sentinel failover-timeout {MASTER} 5000\n",
        dir.display()
    );
    std::fs::File::create(&conf)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .expect("sentinel.conf");
    let child = Command::new("redis-sentinel")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-sentinel");
    let node = Node { child, port };
    assert!(
        eventually(Duration::from_secs(10), || cli(port, &["PING"]) == "PONG"),
        "redis-sentinel on {port} did not start"
    );
    node
}

/// `redis-cli -p PORT ARGS...` (within 5 s), its output trimmed ("" if it could not run).
pub(crate) fn cli(port: u16, args: &[&str]) -> String {
    require("redis-cli", "redis-tools");
    // redis-cli has no timeout of its own: `timeout` bounds each call.
    Command::new("timeout")
        .args(["5", "redis-cli", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A field of `SENTINEL master NAME` (printed as alternate name and value lines).
fn sentinel_field(port: u16, field: &str) -> Option<String> {
    let out = cli(port, &["SENTINEL", "master", MASTER]);
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .find(|kv| kv[0] == field)
        .and_then(|kv| kv.get(1))
        .map(|v| v.to_string())
}

/// What one subscriber saw: every message's data and when it came, the epochs it was
/// told, and the resumes answered `recovered:false`.
#[derive(Default)]
pub(crate) struct Seen {
    pub(crate) data: HashSet<u64>,
    /// Every message's id, in arrival order.
    pub(crate) ids: Vec<u64>,
    pub(crate) arrivals: Vec<Instant>,
    pub(crate) epochs: Vec<String>,
    pub(crate) not_recovered: usize,
    pub(crate) connects: usize,
}

/// A subscriber that reconnects and resumes from its last position whenever herald
/// ends its connection, as herald.js does, until `stop`.
pub(crate) fn subscriber(
    herald_addr: std::net::SocketAddr,
    topic: &'static str,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Seen>>, JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = seen.clone();
    let handle = std::thread::spawn(move || {
        let mut position: Option<(u64, String)> = None;
        for _ in 0..500 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let path = match &position {
                Some((id, epoch)) => format!("/ws?resume={topic}~{id}~{epoch}"),
                None => format!("/ws?topics={topic}"),
            };
            let Ok(stream) = std::net::TcpStream::connect(herald_addr) else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
            let url = format!("ws://{herald_addr}{path}");
            let Ok((mut ws, _)) = tungstenite::client::client(url.as_str(), stream) else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            out.lock().unwrap().connects += 1;
            loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let text = match ws.read() {
                    Ok(Message::Text(t)) => t,
                    Ok(Message::Close(_)) => break,
                    Ok(_) => continue,
                    Err(tungstenite::Error::Io(e))
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                    {
                        continue;
                    }
                    Err(_) => break,
                };
                let Ok(m) = serde_json::from_str::<Value>(text.as_str()) else {
                    break;
                };
                let mut s = out.lock().unwrap();
                match m["op"].as_str() {
                    Some("subscribed") => {
                        let epoch = m["epoch"].as_str().unwrap_or_default().to_string();
                        if m["recovered"] == false {
                            s.not_recovered += 1;
                        }
                        let id = m["id"].as_u64().unwrap_or(0);
                        // A reply from a herald whose Redis is down names no epoch,
                        // and no position worth resuming from: keep the last real one.
                        if !epoch.is_empty() {
                            position = Some((id, epoch.clone()));
                        }
                        s.epochs.push(epoch);
                    }
                    Some("message") => {
                        if let (Some(id), Some(data)) = (m["id"].as_u64(), m["data"].as_u64()) {
                            s.data.insert(data);
                            s.ids.push(id);
                            s.arrivals.push(Instant::now());
                            if let Some(p) = position.as_mut() {
                                p.0 = id;
                            }
                        }
                    }
                    // Told to come back (a missed id, a new epoch): resume.
                    Some("reconnect") => break,
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    (seen, handle)
}

/// What the publisher saw: each acknowledged publish's data and when, and the 503s.
#[derive(Default)]
pub(crate) struct Published {
    pub(crate) acked: Vec<(u64, Instant)>,
    pub(crate) unavailable: usize,
    pub(crate) other: Vec<String>,
}

/// POST /publish data=1, 2, ... every 20 ms until `stop`, reconnecting when needed.
pub(crate) fn publisher(
    addr: std::net::SocketAddr,
    topic: &'static str,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Published>>, JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Published::default()));
    let out = seen.clone();
    let handle = std::thread::spawn(move || {
        let mut conn: Option<HttpConn> = None;
        for i in 1..=20_000u64 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let c = conn.get_or_insert_with(|| HttpConn::connect(addr));
            let body = format!(r#"{{"topic":"{topic}","data":{i}}}"#);
            let raw = format!(
                "POST /publish HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if c.stream.write_all(raw.as_bytes()).is_err() {
                conn = None;
                continue;
            }
            match c.try_response() {
                Ok(r) if r.status == 200 => out.lock().unwrap().acked.push((i, Instant::now())),
                Ok(r) if r.status == 503 => out.lock().unwrap().unavailable += 1,
                Ok(r) => out
                    .lock()
                    .unwrap()
                    .other
                    .push(format!("{} {}", r.status, r.text())),
                Err(_) => conn = None,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (seen, handle)
}

/// The data of every entry in `topic`'s history stream on the Redis at `port`.
fn stream_data(port: u16, topic: &str) -> HashSet<u64> {
    let out = cli(port, &["XRANGE", &format!("herald:h:{topic}"), "-", "+"]);
    let lines: Vec<&str> = out.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[0] == "d")
        .filter_map(|w| w[1].parse().ok())
        .collect()
}

/// The longest time without a message, from a second before `from` to the end.
fn longest_silence(arrivals: &[Instant], from: Instant, end: Instant) -> Duration {
    let start = from - Duration::from_secs(1);
    let mut last = start;
    let mut longest = Duration::ZERO;
    for &t in arrivals.iter().filter(|&&t| t >= start) {
        longest = longest.max(t.duration_since(last));
        last = t;
    }
    longest.max(end.duration_since(last))
}

#[test]
fn a_killed_master_fails_over_and_no_acknowledged_publish_is_lost() {
    failover(true);
}

/// Without WAIT the failover is the same for clients (new epoch, `recovered:false`,
/// subscriptions on the new master), and publishes are acknowledged again as soon as the
/// new master is up; what was acknowledged and not yet replicated is lost from history.
#[test]
fn without_wait_a_failover_still_renews_epochs_and_resubscribes() {
    failover(false);
}

fn failover(wait: bool) {
    let dir = scratch_dir(if wait { "sentinel-wait" } else { "sentinel" });
    let base = free_ports(6);
    let (master_port, replica_port) = (base, base + 1);
    let dead_sentinel = base + 5;
    let master = redis_node(master_port, &dir.join("master"), &[]);
    let replica_of = master_port.to_string();
    let replica = redis_node(
        replica_port,
        &dir.join("replica"),
        &["--replicaof", "127.0.0.1", &replica_of],
    );
    assert!(
        eventually(Duration::from_secs(20), || cli(
            replica_port,
            &["INFO", "replication"]
        )
        .contains("master_link_status:up")),
        "the replica did not sync"
    );
    let sentinels: Vec<Node> = (0..3)
        .map(|i| sentinel_node(base + 2 + i, &dir.join(format!("s{i}")), master_port))
        .collect();
    // Each Sentinel must know the replica and the two others before the master dies, or
    // there is no quorum to fail over.
    for s in &sentinels {
        assert!(
            eventually(Duration::from_secs(30), || {
                sentinel_field(s.port, "num-other-sentinels").as_deref() == Some("2")
                    && sentinel_field(s.port, "num-slaves").as_deref() == Some("1")
            }),
            "sentinel {} did not see its peers and the replica",
            s.port
        );
    }
    // The first Sentinel named is not running: herald goes on to the next.
    let list = std::iter::once(dead_sentinel)
        .chain(sentinels.iter().map(|s| s.port))
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec![
        "--redis-sentinel",
        list.as_str(),
        "--redis-master",
        MASTER,
        "--history-size",
        "100000",
        "--history-ttl",
        "600",
    ];
    if wait {
        args.extend(["--redis-wait-replicas", "1"]);
    }
    let heralds = [Herald::start(&args), Herald::start(&args)];
    for h in &heralds {
        assert!(
            eventually(Duration::from_secs(20), || h.metric("herald_redis_up")
                == 1.0),
            "herald did not reach the master:\n{}",
            h.log()
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let subs: Vec<_> = heralds
        .iter()
        .map(|h| subscriber(h.addr, "t", stop.clone()))
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || cli(
            master_port,
            &["PUBSUB", "NUMSUB", "herald:t"]
        )
        .ends_with("\n2")),
        "both heralds subscribe on the master"
    );
    let (published, pub_thread) = publisher(heralds[0].addr, "t", stop.clone());
    assert!(
        eventually(Duration::from_secs(20), || subs.iter().all(|(s, _)| s
            .lock()
            .unwrap()
            .data
            .len()
            >= 50)),
        "traffic flows before the failover"
    );
    let old_epoch = subs[0].0.lock().unwrap().epochs[0].clone();

    // Kill the master (SIGKILL to the PID of the process this test started).
    let killed_at = Instant::now();
    drop(master);
    assert!(
        eventually(Duration::from_secs(60), || cli(
            sentinels[0].port,
            &["SENTINEL", "get-master-addr-by-name", MASTER]
        )
        .ends_with(&replica_port.to_string())),
        "the Sentinels did not promote the replica"
    );
    let promoted_at = Instant::now();
    // WAIT 1 needs a replica, and the promoted one has none: until the old master comes
    // back (here at once, as a replica of the new one, which is what Sentinel makes of
    // it), publishes are delivered but answered 503.
    let new_master = replica_port.to_string();
    let _old_master = Some(redis_node(
        master_port,
        &dir.join("old-master"),
        &["--replicaof", "127.0.0.1", &new_master],
    ));
    assert!(
        eventually(Duration::from_secs(60), || published
            .lock()
            .unwrap()
            .acked
            .iter()
            .any(|&(_, t)| t > promoted_at)),
        "publishes are not acknowledged after the failover:\n{}",
        heralds[0].log()
    );
    let first_ack = published
        .lock()
        .unwrap()
        .acked
        .iter()
        .map(|&(_, t)| t)
        .find(|&t| t > killed_at)
        .expect("an acknowledgement after the kill");
    // Three more seconds of traffic; what was acknowledged since the failover must reach
    // every subscriber (live, or replayed on its resume).
    std::thread::sleep(Duration::from_secs(3));
    let acked_since: HashSet<u64> = published
        .lock()
        .unwrap()
        .acked
        .iter()
        .filter(|&&(_, t)| t > promoted_at)
        .map(|&(d, _)| d)
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || subs
            .iter()
            .all(|(s, _)| acked_since.is_subset(&s.lock().unwrap().data))),
        "a subscriber misses messages acknowledged after the failover"
    );
    // Clients end up subscribed on the master, through both heralds (checked while the
    // subscribers are connected: herald unsubscribes a topic nobody here wants). On a
    // loaded host the Sentinels may fail over once more, back to the old master's port,
    // once it has rejoined as a replica: the master is whichever they name now.
    let current_master = || -> u16 {
        cli(
            sentinels[0].port,
            &["SENTINEL", "get-master-addr-by-name", MASTER],
        )
        .lines()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
    };
    assert!(
        eventually(Duration::from_secs(20), || {
            let port = current_master();
            cli(port, &["ROLE"]).lines().next() == Some("master")
                && cli(port, &["PUBSUB", "NUMSUB", "herald:t"]).ends_with("\n2")
        }),
        "the heralds did not subscribe on the master: {} has {}; {} has {}\n{}",
        replica_port,
        cli(replica_port, &["PUBSUB", "CHANNELS"]),
        master_port,
        cli(master_port, &["PUBSUB", "CHANNELS"]),
        heralds[0].log()
    );
    let final_master = current_master();
    stop.store(true, Ordering::SeqCst);
    let end = Instant::now();
    pub_thread.join().expect("publisher");

    let published = published.lock().unwrap();
    assert!(
        published.other.is_empty(),
        "not 200 or 503: {:?}",
        published.other
    );
    let acked: HashSet<u64> = published.acked.iter().map(|&(d, _)| d).collect();
    // Every acknowledged publish is in the new master's history (WAIT 1), and reached
    // every subscriber.
    let stored = stream_data(final_master, "t");
    let lost_from_history: Vec<u64> = acked.difference(&stored).copied().collect();
    let mut silences = Vec::new();
    let mut lost_by_subscribers = 0;
    for (n, (seen, handle)) in subs.into_iter().enumerate() {
        handle.join().expect("subscriber");
        let s = seen.lock().unwrap();
        lost_by_subscribers += acked.difference(&s.data).count();
        silences.push(longest_silence(&s.arrivals, killed_at, end));
        // The subscriber was told: a new epoch, and `recovered:false` on its resume.
        eprintln!(
            "subscriber {n}: {} connections, epochs {:?}, {} resumes not recovered",
            s.connects, s.epochs, s.not_recovered
        );
        let new_epoch = s.epochs.last().cloned().unwrap_or_default();
        assert_ne!(
            new_epoch, old_epoch,
            "subscriber {n}: the epoch must change"
        );
        assert!(
            s.not_recovered >= 1,
            "subscriber {n} resumed across the failover as if nothing was lost"
        );
    }
    eprintln!(
        "master switches herald followed: {}",
        heralds[0].metric("herald_redis_failovers_total")
    );
    for h in &heralds {
        assert!(h.log().contains("the master moved"), "{}", h.log());
        assert!(h.metric("herald_redis_failovers_total") >= 1.0);
    }
    eprintln!(
        "sentinel failover ({}): promoted {:.1} s after the kill, first acknowledged publish \
         after {:.1} s; longest without delivery per subscriber: {}; 503s answered: {}; \
         acknowledged: {}; acknowledged then lost: {} from the new master's history, {} \
         from subscribers",
        if wait {
            "--redis-wait-replicas 1"
        } else {
            "no WAIT"
        },
        promoted_at.duration_since(killed_at).as_secs_f64(),
        first_ack.duration_since(killed_at).as_secs_f64(),
        silences
            .iter()
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        published.unavailable,
        acked.len(),
        lost_from_history.len(),
        lost_by_subscribers,
    );
    if wait {
        assert!(
            lost_from_history.is_empty(),
            "acknowledged, then lost by the failover: {lost_from_history:?}"
        );
        assert_eq!(lost_by_subscribers, 0);
    }
    assert!(published.unavailable > 0, "the failover answered no 503");
    drop(replica);
    drop(sentinels);
    let _ = std::fs::remove_dir_all(&dir);
}
