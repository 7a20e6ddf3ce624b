//! Redis Cluster with sharded pub/sub (issue 19): a real 3-master cluster on loopback
//! (`redis-server --cluster-enabled yes` ×3, `redis-cli --cluster create`), two heralds
//! with `--redis-cluster`, topics over every shard, and a slot migrated under traffic.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::sentinel::{Node, Published, Seen, cli, publisher, redis_node, scratch_dir, subscriber};
use crate::util::{Client, Herald, eventually, free_ports, next_json, require};

/// Three masters, no replicas, every slot assigned, `cluster_state:ok` on each.
fn cluster(dir: &Path) -> Vec<Node> {
    cluster_of(dir, 0)
}

/// `count` consecutive free ports for Cluster nodes, whose bus ports (each port + 10000)
/// are free too and below the kernel's ephemeral range: a bus port inside it can be
/// taken as the source port of one of the thousands of connections other tests make,
/// and that node then fails to start.
fn cluster_ports(count: u16) -> u16 {
    const BUS_OFFSET: u16 = 10_000;
    let ephemeral: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    for _ in 0..10_000 {
        let base = free_ports(count);
        let bus = base + BUS_OFFSET;
        if bus + count <= ephemeral
            && (bus..bus + count).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        {
            return base;
        }
    }
    panic!("no {count} ports with free bus ports below {ephemeral}");
}

/// Three masters with `replicas` replicas each.
fn cluster_of(dir: &Path, replicas: u16) -> Vec<Node> {
    require("redis-cli", "redis-tools");
    let count = 3 * (1 + replicas);
    let base = cluster_ports(count);
    let nodes: Vec<Node> = (0..count)
        .map(|i| {
            let d = dir.join(format!("n{i}"));
            let conf = d.join("nodes.conf").to_string_lossy().into_owned();
            redis_node(
                base + i,
                &d,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let created = Command::new("timeout")
        .args(["60", "redis-cli", "--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", &replicas.to_string()])
        .arg("--cluster-yes")
        .output()
        .expect("redis-cli --cluster create");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    for n in &nodes {
        assert!(
            eventually(Duration::from_secs(30), || cli(
                n.port,
                &["CLUSTER", "INFO"]
            )
            .contains("cluster_state:ok")),
            "the cluster did not form"
        );
        assert!(
            eventually(Duration::from_secs(30), || {
                let info = cli(n.port, &["INFO", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
            }),
            "a replica did not sync"
        );
    }
    nodes
}

fn cluster_herald(seeds: &str) -> Herald {
    let h = Herald::start(&["--redis-cluster", seeds, "--history-size", "10000"]);
    assert!(
        eventually(Duration::from_secs(20), || h.metric("herald_redis_up")
            == 1.0),
        "herald did not reach the cluster:\n{}",
        h.log()
    );
    h
}

/// The node (index) holding `topic`'s id counter.
fn owner_of(nodes: &[Node], topic: &str) -> Option<usize> {
    let key = format!("herald:id:{{{topic}}}");
    nodes
        .iter()
        .position(|n| cli(n.port, &["EXISTS", &key]) == "1")
}

#[test]
fn three_shards_deliver_every_message_once_in_order_with_the_same_ids_on_two_heralds() {
    let dir = scratch_dir("cluster");
    let nodes = cluster(&dir);
    // One herald is given one seed and finds the rest; the other all of them.
    let all = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect::<Vec<_>>()
        .join(",");
    let heralds = [
        cluster_herald(&format!("127.0.0.1:{}", nodes[1].port)),
        cluster_herald(&all),
    ];
    let topics: Vec<String> = (0..24).map(|i| format!("t{i}")).collect();
    let list = topics.join(",");
    let mut subs: Vec<Client> = heralds
        .iter()
        .map(|h| {
            let mut ws = h.ws(&format!("/ws?topics={list}"));
            for _ in &topics {
                let reply = next_json(&mut ws);
                assert_eq!(reply["op"], "subscribed", "{reply}");
            }
            ws
        })
        .collect();
    let mut apis = [heralds[0].http(), heralds[1].http()];
    for round in 1..=10u64 {
        for (n, topic) in topics.iter().enumerate() {
            let data = round * 100 + n as u64;
            let reply = apis[(round as usize + n) % 2].publish(topic, &data.to_string());
            assert_eq!(reply["id"], round, "{topic}: ids count per topic: {reply}");
            assert_eq!(reply["delivered"], 2, "both heralds received it: {reply}");
        }
    }
    // Every message once, in its topic's order, with the same ids on both heralds.
    for (h, ws) in subs.iter_mut().enumerate() {
        let mut got: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
        for _ in 0..topics.len() * 10 {
            let m: Value = next_json(ws);
            assert_eq!(m["op"], "message", "{m}");
            let topic = m["topic"].as_str().unwrap_or_default().to_string();
            got.entry(topic).or_default().push((
                m["id"].as_u64().unwrap_or(0),
                m["data"].as_u64().unwrap_or(0),
            ));
        }
        for (n, topic) in topics.iter().enumerate() {
            let want: Vec<(u64, u64)> = (1..=10).map(|r| (r, r * 100 + n as u64)).collect();
            assert_eq!(got.get(topic), Some(&want), "herald {h}, {topic}");
        }
    }
    // The topics are spread over every shard, and each shard carries the sharded
    // channels of its own topics, one subscription per herald.
    let mut per_shard = [0usize; 3];
    for topic in &topics {
        let owner = owner_of(&nodes, topic).expect("a topic's keys are on one node");
        per_shard[owner] += 1;
        let channel = format!("herald:{{{topic}}}");
        assert_eq!(
            cli(nodes[owner].port, &["PUBSUB", "SHARDNUMSUB", &channel]),
            format!("{channel}\n2"),
            "{topic}"
        );
    }
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "topics per shard: {per_shard:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A subscriber on each herald, subscribed, and a publisher to the first whose messages
/// reach them: (the stop flag, the subscribers, the publisher).
#[allow(clippy::type_complexity)]
fn flowing(
    heralds: &[Herald],
    topic: &'static str,
) -> (
    Arc<AtomicBool>,
    Vec<(Arc<Mutex<Seen>>, JoinHandle<()>)>,
    (Arc<Mutex<Published>>, JoinHandle<()>),
) {
    let stop = Arc::new(AtomicBool::new(false));
    let subs: Vec<_> = heralds
        .iter()
        .map(|h| subscriber(h.addr, topic, stop.clone()))
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || subs.iter().all(|(s, _)| !s
            .lock()
            .unwrap()
            .epochs
            .is_empty())),
        "the subscribers are subscribed before the first publish"
    );
    let publishing = publisher(heralds[0].addr, topic, stop.clone());
    assert!(
        eventually(Duration::from_secs(20), || subs.iter().all(|(s, _)| s
            .lock()
            .unwrap()
            .data
            .len()
            >= 20)),
        "traffic flows"
    );
    (stop, subs, publishing)
}

#[test]
fn a_slot_migrated_during_traffic_loses_nothing() {
    let dir = scratch_dir("cluster-migrate");
    let nodes = cluster(&dir);
    let seed = format!("127.0.0.1:{}", nodes[0].port);
    let heralds = [cluster_herald(&seed), cluster_herald(&seed)];
    let topic = "moving";
    let (stop, subs, (published, pub_thread)) = flowing(&heralds, topic);
    let from = owner_of(&nodes, topic).expect("the topic's keys");
    let to = (from + 1) % 3;
    let slot = cli(
        nodes[from].port,
        &["CLUSTER", "KEYSLOT", &format!("{{{topic}}}")],
    );
    let id = |i: usize| cli(nodes[i].port, &["CLUSTER", "MYID"]);
    let (from_id, to_id) = (id(from), id(to));
    let (from_port, to_port) = (nodes[from].port, nodes[to].port);
    // The migration, as `redis-cli --cluster reshard` does it, with pauses so that
    // publishes meet the slot in each state.
    let started = Instant::now();
    assert_eq!(
        cli(
            to_port,
            &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]
        ),
        "OK"
    );
    assert_eq!(
        cli(
            from_port,
            &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]
        ),
        "OK"
    );
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..100 {
        let keys = cli(from_port, &["CLUSTER", "GETKEYSINSLOT", &slot, "1"]);
        if keys.is_empty() {
            break;
        }
        // One key at a time: the topic's keys are apart for a while (TRYAGAIN).
        let to_port_s = to_port.to_string();
        let moved = cli(
            from_port,
            &[
                "MIGRATE",
                "127.0.0.1",
                &to_port_s,
                "",
                "0",
                "5000",
                "KEYS",
                &keys,
            ],
        );
        assert_eq!(moved, "OK", "MIGRATE {keys}");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    for port in [to_port, from_port, nodes[(from + 2) % 3].port] {
        assert_eq!(
            cli(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]),
            "OK"
        );
    }
    let migrated = Instant::now();
    assert!(
        eventually(Duration::from_secs(20), || owner_of(&nodes, topic)
            == Some(to)),
        "the keys moved"
    );
    // Traffic goes on; then everything acknowledged must have reached both
    // subscribers, once each, in id order.
    assert!(
        eventually(Duration::from_secs(30), || published
            .lock()
            .unwrap()
            .acked
            .iter()
            .filter(|&&(_, t)| t > migrated)
            .count()
            >= 50),
        "publishes are not acknowledged after the migration:\n{}",
        heralds[0].log()
    );
    let acked: Vec<u64> = published
        .lock()
        .unwrap()
        .acked
        .iter()
        .map(|&(d, _)| d)
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || subs.iter().all(|(s, _)| {
            let s = s.lock().unwrap();
            acked.iter().all(|d| s.data.contains(d))
        })),
        "a subscriber misses acknowledged messages: {}\n{}",
        subs.iter()
            .map(|(s, _)| {
                let s = s.lock().unwrap();
                let missing: Vec<&u64> = acked.iter().filter(|d| !s.data.contains(d)).collect();
                format!(
                    "missing {missing:?}, {} connects, last ids {:?}",
                    s.connects,
                    &s.ids[s.ids.len().saturating_sub(5)..]
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        heralds[1].log()
    );
    // Both heralds' subscriptions are on the new owner now (the subscribers are still
    // connected).
    let channel = format!("herald:{{{topic}}}");
    assert!(
        eventually(Duration::from_secs(10), || cli(
            to_port,
            &["PUBSUB", "SHARDNUMSUB", &channel]
        ) == format!("{channel}\n2")),
        "subscriptions did not follow the slot"
    );
    stop.store(true, Ordering::SeqCst);
    pub_thread.join().expect("publisher");
    let published = published.lock().unwrap();
    assert!(published.other.is_empty(), "{:?}", published.other);
    let mut reconnects = Vec::new();
    for (n, (seen, handle)) in subs.into_iter().enumerate() {
        handle.join().expect("subscriber");
        let s = seen.lock().unwrap();
        assert!(
            s.ids.windows(2).all(|w| w[1] == w[0] + 1),
            "subscriber {n}: ids not once each in order: {:?}",
            s.ids
        );
        reconnects.push(s.connects - 1);
    }
    eprintln!(
        "cluster migration of slot {slot} in {:.1} s: {} publishes acknowledged, {} answered \
         503, 0 lost; subscriber reconnects (to resume): {reconnects:?}",
        migrated.duration_since(started).as_secs_f64(),
        acked.len(),
        published.unavailable,
    );
    assert_eq!(
        published.unavailable, 0,
        "a migration is no reason for a 503"
    );
    // The publishes met the migration: redirected, not merely lucky.
    let redirects = heralds[0].metric("herald_redis_redirects_total");
    eprintln!("publishing herald: {redirects} commands redirected");
    assert!(redirects > 0.0, "{}", heralds[0].log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_shard_failover_starts_new_epochs_and_subscriptions_follow_the_promoted_replica() {
    let dir = scratch_dir("cluster-failover");
    let mut nodes = cluster_of(&dir, 1);
    let seed = format!("127.0.0.1:{}", nodes[0].port);
    let heralds = [cluster_herald(&seed), cluster_herald(&seed)];
    let topic = "falls";
    let (stop, subs, (published, pub_thread)) = flowing(&heralds, topic);
    // Replication is asynchronous: the replica may lack the last messages, and would
    // hand their ids out again. Kill the topic's master (by PID, as it is dropped).
    let owner = owner_of(&nodes, topic).expect("the topic's master");
    let killed_at = Instant::now();
    drop(nodes.remove(owner));
    assert!(
        eventually(Duration::from_secs(60), || owner_of(&nodes, topic)
            .is_some()),
        "no replica was promoted"
    );
    let promoted_at = Instant::now();
    let promoted = owner_of(&nodes, topic).expect("the promoted replica");
    assert!(
        eventually(Duration::from_secs(60), || published
            .lock()
            .unwrap()
            .acked
            .iter()
            .filter(|&&(_, t)| t > promoted_at)
            .count()
            >= 50),
        "publishes are not acknowledged after the failover:\n{}",
        heralds[0].log()
    );
    let acked_since: Vec<u64> = published
        .lock()
        .unwrap()
        .acked
        .iter()
        .filter(|&&(_, t)| t > promoted_at)
        .map(|&(d, _)| d)
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || subs.iter().all(|(s, _)| {
            let s = s.lock().unwrap();
            acked_since.iter().all(|d| s.data.contains(d))
        })),
        "a subscriber misses messages acknowledged after the failover"
    );
    let channel = format!("herald:{{{topic}}}");
    assert!(
        eventually(Duration::from_secs(20), || cli(
            nodes[promoted].port,
            &["PUBSUB", "SHARDNUMSUB", &channel]
        ) == format!("{channel}\n2")),
        "the subscriptions did not follow the promoted replica"
    );
    stop.store(true, Ordering::SeqCst);
    pub_thread.join().expect("publisher");
    let first_ack = published
        .lock()
        .unwrap()
        .acked
        .iter()
        .map(|&(_, t)| t)
        .find(|&t| t > killed_at)
        .expect("an acknowledgement after the kill");
    for (n, (seen, handle)) in subs.into_iter().enumerate() {
        handle.join().expect("subscriber");
        let s = seen.lock().unwrap();
        // The promoted replica's epoch is new, and the resume across it says so.
        assert_ne!(
            s.epochs.first(),
            s.epochs.last(),
            "subscriber {n}: {:?}",
            s.epochs
        );
        assert!(
            s.not_recovered >= 1,
            "subscriber {n} was told nothing was lost"
        );
    }
    eprintln!(
        "cluster shard failover: replica promoted {:.1} s after the kill, first acknowledged \
         publish after {:.1} s, {} publishes answered 503",
        promoted_at.duration_since(killed_at).as_secs_f64(),
        first_ack.duration_since(killed_at).as_secs_f64(),
        published.lock().unwrap().unavailable,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
