//! `--statsd`: a real UDP listener in the test plays the StatsD / DogStatsD agent and
//! parses every line herald sends; what the lines say is held against `/metrics`.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{Herald, TIMEOUT, next_json};

/// One parsed StatsD line: `name:value|type` and, in DogStatsD, `|#tag,tag`.
#[derive(Debug, Clone)]
struct Line {
    name: String,
    value: f64,
    kind: char,
    tags: Option<Vec<String>>,
}

fn parse_line(line: &str) -> Line {
    let (name, rest) = line
        .split_once(':')
        .unwrap_or_else(|| panic!("no ':' in {line:?}"));
    let mut fields = rest.split('|');
    let value = fields.next().unwrap_or_default();
    let value: f64 = value
        .parse()
        .unwrap_or_else(|_| panic!("bad value in {line:?}"));
    let kind = match fields.next() {
        Some("c") => 'c',
        Some("g") => 'g',
        other => panic!("bad type {other:?} in {line:?}"),
    };
    let tags = fields.next().map(|t| {
        t.strip_prefix('#')
            .unwrap_or_else(|| panic!("bad field in {line:?}"))
            .split(',')
            .map(str::to_string)
            .collect()
    });
    assert!(fields.next().is_none(), "extra fields in {line:?}");
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c)),
        "bad name in {line:?}"
    );
    Line {
        name: name.to_string(),
        value,
        kind,
        tags,
    }
}

/// The agent: a UDP socket on loopback that collects herald's lines.
struct Agent {
    socket: UdpSocket,
    lines: Vec<Line>,
    datagrams: usize,
}

impl Agent {
    fn bind() -> Agent {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Agent {
            socket,
            lines: Vec::new(),
            datagrams: 0,
        }
    }

    fn addr(&self) -> String {
        self.socket.local_addr().unwrap().to_string()
    }

    /// Collect datagrams for `how_long`.
    fn listen(&mut self, how_long: Duration) {
        let start = Instant::now();
        while start.elapsed() < how_long {
            self.receive_one();
        }
    }

    /// Collect until `done` holds (at most `TIMEOUT`); panics if it never does.
    fn until(&mut self, what: &str, mut done: impl FnMut(&Agent) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < TIMEOUT,
                "{what}: not seen in {TIMEOUT:?}; got {:#?}",
                self.lines
            );
            self.receive_one();
        }
    }

    fn receive_one(&mut self) {
        let mut buf = [0u8; 65536];
        if let Ok(n) = self.socket.recv(&mut buf) {
            assert!(n <= 1432, "a datagram of {n} bytes");
            let text = std::str::from_utf8(&buf[..n]).expect("UTF-8 datagram");
            self.lines.extend(text.lines().map(parse_line));
            self.datagrams += 1;
        }
    }

    /// The counter's deltas added up.
    fn sum(&self, name: &str) -> f64 {
        self.lines
            .iter()
            .filter(|l| l.name == name && l.kind == 'c')
            .map(|l| l.value)
            .sum()
    }

    fn last_gauge(&self, name: &str) -> Option<f64> {
        self.lines
            .iter()
            .rev()
            .find(|l| l.name == name && l.kind == 'g')
            .map(|l| l.value)
    }
}

/// `/metrics` with each series' type: series → (kind, value).
fn typed_metrics(herald: &Herald) -> HashMap<String, (String, f64)> {
    let r = herald.request("GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    let text = r.text();
    let mut kinds = HashMap::new();
    let mut out = HashMap::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').unwrap();
            kinds.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            let kind = kinds.get(name).cloned().expect("a TYPE line");
            out.insert(series.to_string(), (kind, value.parse().unwrap()));
        }
    }
    out
}

/// A `/metrics` series as plain StatsD names it: `herald_x{k="v"}` → `herald.x.k.v`.
fn plain_name(series: &str) -> String {
    let (name, labels) = match series.split_once('{') {
        Some((n, l)) => (n, l.trim_end_matches('}')),
        None => (series, ""),
    };
    let mut out = format!("herald.{}", name.strip_prefix("herald_").unwrap_or(name));
    for label in labels.split(',').filter(|l| !l.is_empty()) {
        let (k, v) = label.split_once('=').unwrap();
        out.push_str(&format!(".{k}.{}", v.trim_matches('"')));
    }
    out
}

#[test]
fn statsd_counters_add_up_to_metrics_and_gauges_match() {
    let mut agent = Agent::bind();
    let herald = Herald::start(&["--statsd", &agent.addr(), "--statsd-interval", "1"]);
    let mut ws = herald.subscriber("news");
    for n in 0..3 {
        assert_eq!(herald.publish("news", &n.to_string())["delivered"], 1);
        assert_eq!(next_json(&mut ws)["data"], n);
    }
    agent.until("the three publishes and the open WebSocket", |a| {
        a.sum("herald.messages_published_total") == 3.0
            && a.sum("herald.messages_delivered_total") == 3.0
            && a.last_gauge("herald.websockets") == Some(1.0)
    });
    let before = agent.lines.clone();
    let sum_before = |name: &str| {
        before
            .iter()
            .filter(|l| l.name == name)
            .map(|l| l.value)
            .sum::<f64>()
    };
    let scraped = typed_metrics(&herald);
    // Two more reports at least: everything the scrape saw has been reported by then.
    agent.listen(Duration::from_millis(2500));

    assert!(
        agent.lines.iter().all(|l| l.tags.is_none()),
        "plain StatsD carries no tags"
    );
    let mut checked = 0;
    for (series, (kind, value)) in &scraped {
        let name = plain_name(series);
        let lines: Vec<&Line> = agent.lines.iter().filter(|l| l.name == name).collect();
        assert!(!lines.is_empty(), "{series} never sent as {name}");
        let want = if kind == "counter" { 'c' } else { 'g' };
        assert!(lines.iter().all(|l| l.kind == want), "{name}: {lines:?}");
        if kind == "counter" {
            // Reports before the scrape add up to no more than it saw, reports after it
            // to no less (the scrape's own response is counted after it was rendered).
            let (low, high) = (sum_before(&name), agent.sum(&name));
            let slack = if name.contains("cpu_seconds") {
                1e-3
            } else {
                0.0
            };
            assert!(
                low <= value + slack && *value <= high + slack,
                "{name}: {low} (before) <= {value} (/metrics) <= {high} (after)"
            );
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} counters in /metrics");
    // What nothing after the scrape changes adds up exactly.
    for name in [
        "herald.messages_published_total",
        "herald.messages_delivered_total",
        "herald.connections_accepted_total",
    ] {
        let series = format!("herald_{}", name.trim_start_matches("herald."));
        assert_eq!(agent.sum(name), scraped[&series].1, "{name}");
    }
    assert_eq!(agent.sum("herald.messages_published_total"), 3.0);
    assert_eq!(agent.last_gauge("herald.websockets"), Some(1.0));
    assert_eq!(agent.last_gauge("herald.draining"), Some(0.0));
    assert_eq!(
        agent.last_gauge("herald.fd_limit"),
        Some(scraped["herald_fd_limit"].1)
    );
    assert!(
        agent.sum("herald.http_responses_total.status.200") >= 4.0,
        "three publishes and a scrape"
    );
}

#[test]
fn dogstatsd_tags_carry_labels_and_the_constant_tags() {
    let mut agent = Agent::bind();
    let herald = Herald::start(&[
        "--statsd",
        &agent.addr(),
        "--statsd-interval",
        "1",
        "--statsd-tags",
        "env:test,service:herald",
        "--statsd-prefix",
        "push.",
    ]);
    assert_eq!(
        herald
            .request("GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
            .status,
        404
    );
    agent.until("the 404 as a tag", |a| {
        a.lines.iter().any(|l| {
            l.name == "push.http_responses_total"
                && l.tags.as_ref().is_some_and(|t| t[0] == "status:404")
        })
    });
    for line in &agent.lines {
        let tags = line.tags.as_ref().expect("every line tagged");
        assert!(
            tags.ends_with(&["env:test".to_string(), "service:herald".to_string()]),
            "{line:?}"
        );
        assert!(line.name.starts_with("push."), "{line:?}");
        assert!(!line.name.contains(".status."), "labels are tags: {line:?}");
    }
    let published = agent
        .lines
        .iter()
        .find(|l| l.name == "push.messages_published_total")
        .expect("an unlabelled counter");
    assert_eq!(published.tags.as_ref().unwrap().len(), 2, "{published:?}");
}

#[test]
fn the_last_counts_go_out_at_exit() {
    let mut agent = Agent::bind();
    // No report would be due for an hour: what arrives is the one at exit.
    let herald = Herald::start(&["--statsd", &agent.addr(), "--statsd-interval", "3600"]);
    for n in 0..2 {
        herald.publish("nobody", &n.to_string());
    }
    agent.listen(Duration::from_millis(300));
    assert!(agent.lines.is_empty(), "{:?}", agent.lines);
    assert!(herald.terminate().success());
    agent.until("the report at exit", |a| {
        a.sum("herald.messages_published_total") == 2.0
    });
    assert_eq!(agent.last_gauge("herald.draining"), Some(1.0));
}

#[test]
fn an_absent_agent_costs_samples_not_service() {
    // A UDP port nobody listens on: each send may come back as "connection refused".
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let herald = Herald::start(&[
        "--statsd",
        &format!("127.0.0.1:{port}"),
        "--statsd-interval",
        "1",
    ]);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(3500) {
        let r = herald.request("GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(r.status, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = herald.log();
    let warnings = log.matches("it is not retried").count();
    assert!(warnings <= 1, "one warning, not one per report:\n{log}");
}

#[test]
fn bad_statsd_flags_are_refused_at_start() {
    for (flag, value) in [
        ("--statsd-tags", "env:prod|x"),
        ("--statsd-prefix", "a b"),
        ("--statsd-interval", "0"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["--listen", "127.0.0.1:0", "--statsd", "127.0.0.1:8125"])
            .args([flag, value])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{stderr}");
    }
}

/// Issue 17: a live upgrade carries what the last report sent, so the first report of the
/// new binary sends each counter's increase, not the whole counter again: the deltas
/// still add up to `/metrics`.
#[test]
fn statsd_deltas_stay_right_across_a_live_upgrade() {
    let mut agent = Agent::bind();
    let herald = Herald::start(&["--statsd", &agent.addr(), "--statsd-interval", "1"]);
    let published = plain_name("herald_messages_published_total");
    for n in 0..5 {
        herald.publish("nobody", &n.to_string());
    }
    agent.until("five publishes reported", |a| a.sum(&published) >= 5.0);
    herald.signal(libc::SIGUSR2);
    assert!(
        crate::util::eventually(TIMEOUT, || herald
            .metrics()
            .get("herald_upgrades_total{result=\"carried\"}")
            == Some(&1.0)),
        "{}",
        herald.log()
    );
    for n in 0..2 {
        herald.publish("nobody", &n.to_string());
    }
    agent.until("seven publishes reported", |a| a.sum(&published) >= 7.0);
    // Two more reports: nothing is counted twice.
    agent.listen(Duration::from_millis(2200));
    assert_eq!(agent.sum(&published), 7.0);
    assert_eq!(herald.metric("herald_messages_published_total"), 7.0);
}
