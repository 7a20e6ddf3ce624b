//! Counters the loop bumps as things happen, and the Prometheus text exposition of them
//! together with gauges read off the server at scrape time. Nothing here is per message
//! beyond an integer add.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Counters are carried across a live upgrade (`handover.rs`), so they stay continuous.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Counters {
    pub accepted: u64,
    /// Refused at `--max-connections` with a 503.
    pub rejected_at_capacity: u64,
    /// accept() failures (EMFILE, ENFILE, ...).
    pub accept_errors: u64,
    /// HTTP responses by status (101 counts WebSocket upgrades).
    pub responses: BTreeMap<u16, u64>,
    /// Messages accepted for publishing, one per topic.
    pub published: u64,
    /// Message frames queued to subscribers.
    pub delivered: u64,
    /// Published messages compressed (once each) for permessage-deflate subscribers.
    pub compressed: u64,
    /// Of `delivered`, the frames that went compressed.
    pub delivered_compressed: u64,
    /// Vectored writes (sendmsg) to clients: with many messages per pass, far fewer than `delivered`.
    pub write_syscalls: u64,
    /// Passes whose fan-out ran out of its time slice and went on in the next pass.
    pub fanout_slices: u64,
    pub slow_consumers: u64,
    /// Queued bytes thrown away: a slow consumer's backlog, a dead peer's queue.
    pub undelivered_bytes: u64,
    /// WebSockets we closed, by close code.
    pub ws_closed: BTreeMap<u16, u64>,
    /// `error` replies sent to WebSocket clients.
    pub op_errors: u64,
    /// Messages that came back from Redis (whether or not anyone here listened).
    pub redis_messages: u64,
    pub handshake_timeouts: u64,
    pub idle_timeouts: u64,
    pub pong_timeouts: u64,
    /// Refusals by limits per client address, op rate, subscription cap and PROXY rules.
    pub refusals: crate::limits::Refusals,
    /// Live upgrades (SIGUSR2) by result.
    #[serde(default)]
    pub upgrades: Upgrades,
}

/// `herald_upgrades_total` by result.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct Upgrades {
    /// The new binary took every connection and all state.
    pub carried: u64,
    /// The new binary could not use the state: the inherited sockets were drained.
    pub fallback: u64,
    /// `execve` failed: the old binary went on serving.
    pub failed: u64,
}

/// The build this process runs: the crate version, and a fixed-width tag a packager (or a
/// test) may patch into the binary's bytes to tell two builds apart.
pub fn build() -> (&'static str, String) {
    let tag = std::hint::black_box(BUILD_TAG);
    let tag = tag
        .strip_prefix("HERALD-BUILD-TAG[")
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or("")
        .trim_end_matches('_');
    (env!("CARGO_PKG_VERSION"), tag.to_string())
}

/// 16 bytes between the brackets; `_` pads, and reads as nothing.
static BUILD_TAG: &str = "HERALD-BUILD-TAG[________________]";

/// The limits' state, read at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct LimitGauges {
    pub subscriptions: usize,
    /// `--max-subscriptions`; 0: no cap.
    pub max_subscriptions: usize,
    /// Client addresses the per-address table holds (bounded).
    pub addresses: usize,
}

/// The Redis links' state, read at scrape time.
#[derive(Debug, Default)]
pub struct RedisGauges {
    pub up: bool,
    /// The delivery probe's last verdict (`None` before the first, or while down).
    pub delivery_ok: Option<bool>,
    pub channels: usize,
    pub in_flight: usize,
    pub reconnects: u64,
    pub errors: u64,
    /// With Sentinel: masters followed, and publishes WAIT found under-replicated.
    pub failovers: u64,
    pub unreplicated: u64,
    /// With Cluster: commands sent again where a redirection said.
    pub redirects: u64,
}

/// What history holds and what it let go, read at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct HistoryGauges {
    pub messages: usize,
    /// Counted against `--history-memory`.
    pub bytes: usize,
    pub evicted_size: u64,
    pub evicted_ttl: u64,
    pub evicted_memory: u64,
}

/// Resumes answered, by outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumes {
    pub recovered: u64,
    /// Same epoch, but messages after the client's id were gone.
    pub gap: u64,
    pub epoch_changed: u64,
    /// Redis could not be asked: answered `recovered:false`.
    pub unavailable: u64,
}

/// Values read at scrape time.
#[derive(Debug, Default)]
pub struct Gauges {
    pub connections: usize,
    pub websockets: usize,
    /// Of those, the ones that negotiated permessage-deflate.
    pub websockets_deflate: usize,
    pub topics: usize,
    pub queued_bytes: usize,
    pub fd_limit: u64,
    pub max_connections: usize,
    pub draining: bool,
    /// With --redis.
    pub redis: Option<RedisGauges>,
    /// Without --redis (with it, history lives in Redis).
    pub history: Option<HistoryGauges>,
    pub resumes: Resumes,
    pub limits: LimitGauges,
    /// This process's user + system CPU time and resident memory, when readable.
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
}

/// CPU seconds and resident bytes of this process, from /proc (Linux); `None` elsewhere.
/// Read at scrape time, so load tools can watch the server without knowing its PID.
pub fn process_usage() -> (Option<f64>, Option<u64>) {
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // Fields after the parenthesised name: utime and stime are the 12th and 13th.
    let cpu = stat.as_deref().and_then(|s| {
        let fields: Vec<&str> = s.get(s.rfind(')')? + 2..)?.split_whitespace().collect();
        let t: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        (ticks > 0).then(|| t / ticks as f64)
    });
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
            Some(pages * u64::try_from(page).ok()?)
        });
    (cpu, rss)
}

struct Out(String);

impl Out {
    fn metric(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.head(name, kind, help);
        let _ = writeln!(self.0, "{name} {value}");
    }

    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn by_label(&mut self, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
        self.head(name, "counter", help);
        for (key, value) in values {
            let _ = writeln!(self.0, "{name}{{{label}=\"{key}\"}} {value}");
        }
    }

    fn labelled(&mut self, name: &str, help: &str, label: &str, values: &BTreeMap<u16, u64>) {
        self.head(name, "counter", help);
        for (key, value) in values {
            let _ = writeln!(self.0, "{name}{{{label}=\"{key}\"}} {value}");
        }
    }
}

pub fn render(c: &Counters, g: &Gauges) -> String {
    let mut o = Out(String::with_capacity(4096));
    o.metric(
        "herald_connections",
        "gauge",
        "Open client connections (HTTP and WebSocket).",
        g.connections,
    );
    o.metric(
        "herald_websockets",
        "gauge",
        "Open WebSocket connections.",
        g.websockets,
    );
    o.metric(
        "herald_websockets_deflate",
        "gauge",
        "Open WebSocket connections that negotiated permessage-deflate.",
        g.websockets_deflate,
    );
    o.metric(
        "herald_topics",
        "gauge",
        "Topics with at least one local subscriber.",
        g.topics,
    );
    o.metric(
        "herald_send_queue_bytes",
        "gauge",
        "Bytes queued to clients and not yet written.",
        g.queued_bytes,
    );
    o.metric(
        "herald_fd_limit",
        "gauge",
        "RLIMIT_NOFILE soft limit after raising it at start.",
        g.fd_limit,
    );
    o.metric(
        "herald_max_connections",
        "gauge",
        "Connections beyond this are refused with 503.",
        g.max_connections,
    );
    o.metric(
        "herald_draining",
        "gauge",
        "1 once a graceful shutdown has begun.",
        u8::from(g.draining),
    );
    if let Some(r) = &g.redis {
        o.metric(
            "herald_redis_up",
            "gauge",
            "1 while both Redis links are ready.",
            u8::from(r.up),
        );
        o.metric(
            "herald_redis_delivery_ok",
            "gauge",
            "1 while herald's probe goes through Redis and back in time; 0 once one did not.",
            u8::from(r.delivery_ok == Some(true)),
        );
        o.metric(
            "herald_redis_channels",
            "gauge",
            "Topic channels Redis has confirmed.",
            r.channels,
        );
        o.metric(
            "herald_redis_publishes_in_flight",
            "gauge",
            "Publishes awaiting Redis's reply.",
            r.in_flight,
        );
        o.metric(
            "herald_redis_reconnects_total",
            "counter",
            "Redis links lost and reconnected.",
            r.reconnects,
        );
        o.metric(
            "herald_redis_errors_total",
            "counter",
            "Redis links reset for a malformed or unexpected reply, or a stuck command.",
            r.errors,
        );
        o.metric(
            "herald_redis_failovers_total",
            "counter",
            "Times the Sentinels named a new master and herald moved to it.",
            r.failovers,
        );
        o.metric(
            "herald_redis_unreplicated_total",
            "counter",
            "Publishes answered 503 because fewer than --redis-wait-replicas replicas had them in time.",
            r.unreplicated,
        );
        o.metric(
            "herald_redis_redirects_total",
            "counter",
            "With --redis-cluster: commands sent again after MOVED, ASK or TRYAGAIN.",
            r.redirects,
        );
        o.metric(
            "herald_redis_messages_total",
            "counter",
            "Messages received from Redis.",
            c.redis_messages,
        );
    }
    if let Some(h) = &g.history {
        o.metric(
            "herald_history_messages",
            "gauge",
            "Messages kept in history for resumes, across all topics.",
            h.messages,
        );
        o.metric(
            "herald_history_bytes",
            "gauge",
            "Bytes of history counted against --history-memory.",
            h.bytes,
        );
        o.by_label(
            "herald_history_evictions_total",
            "Messages dropped from history, by the bound that dropped them.",
            "reason",
            &[
                ("size", h.evicted_size),
                ("ttl", h.evicted_ttl),
                ("memory", h.evicted_memory),
            ],
        );
    }
    let u = &c.upgrades;
    o.by_label(
        "herald_upgrades_total",
        "Live upgrades (SIGUSR2), by result (fallback: the inherited sockets were drained).",
        "result",
        &[
            ("carried", u.carried),
            ("fallback", u.fallback),
            ("failed", u.failed),
        ],
    );
    let r = &g.resumes;
    o.by_label(
        "herald_resumes_total",
        "Resumes answered, by result (recovered: nothing missed is missing).",
        "result",
        &[
            ("recovered", r.recovered),
            ("gap", r.gap),
            ("epoch_changed", r.epoch_changed),
            ("unavailable", r.unavailable),
        ],
    );
    o.metric(
        "herald_subscriptions",
        "gauge",
        "Subscriptions (connection x topic) held.",
        g.limits.subscriptions,
    );
    o.metric(
        "herald_max_subscriptions",
        "gauge",
        "--max-subscriptions: past it a subscribe gets `unavailable` (0: no cap).",
        g.limits.max_subscriptions,
    );
    o.metric(
        "herald_client_addresses",
        "gauge",
        "Client addresses tracked for the per-address limits (bounded).",
        g.limits.addresses,
    );
    let refusals: Vec<(&str, u64)> = crate::limits::Refused::ALL
        .iter()
        .map(|&r| (r.label(), c.refusals.get(r)))
        .collect();
    o.by_label(
        "herald_refusals_total",
        "Connections, ops and subscribes refused by a limit or a PROXY protocol rule, by reason.",
        "reason",
        &refusals,
    );
    if let Some(cpu) = g.cpu_seconds {
        let help = "User and system CPU time spent, in seconds.";
        o.metric("process_cpu_seconds_total", "counter", help, cpu);
    }
    if let Some(rss) = g.resident_bytes {
        o.metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss,
        );
    }
    o.metric(
        "herald_connections_accepted_total",
        "counter",
        "Connections accepted.",
        c.accepted,
    );
    o.metric(
        "herald_connections_rejected_total",
        "counter",
        "Connections refused with 503 at --max-connections.",
        c.rejected_at_capacity,
    );
    o.metric(
        "herald_accept_errors_total",
        "counter",
        "accept() failures such as EMFILE.",
        c.accept_errors,
    );
    o.labelled(
        "herald_http_responses_total",
        "HTTP responses by status.",
        "status",
        &c.responses,
    );
    o.metric(
        "herald_messages_published_total",
        "counter",
        "Messages accepted for publishing, per topic.",
        c.published,
    );
    o.metric(
        "herald_messages_delivered_total",
        "counter",
        "Message frames queued to subscribers.",
        c.delivered,
    );
    o.metric(
        "herald_messages_compressed_total",
        "counter",
        "Published messages compressed for permessage-deflate subscribers (once each).",
        c.compressed,
    );
    o.metric(
        "herald_deliveries_compressed_total",
        "counter",
        "Message frames queued to subscribers compressed (part of messages_delivered).",
        c.delivered_compressed,
    );
    o.metric(
        "herald_slow_consumers_total",
        "counter",
        "Clients closed for exceeding --send-queue-limit.",
        c.slow_consumers,
    );
    o.metric(
        "herald_write_syscalls_total",
        "counter",
        "Vectored writes (sendmsg) to clients; each carries every message queued since the last one.",
        c.write_syscalls,
    );
    o.metric(
        "herald_fanout_slices_total",
        "counter",
        "Loop passes whose writes to subscribers used up the time slice and went on in the next pass.",
        c.fanout_slices,
    );
    o.metric(
        "herald_undelivered_bytes_total",
        "counter",
        "Bytes queued to clients but discarded (slow consumers, dead or vanished peers).",
        c.undelivered_bytes,
    );
    o.labelled(
        "herald_websocket_closes_total",
        "WebSockets closed by herald, by close code.",
        "code",
        &c.ws_closed,
    );
    o.metric(
        "herald_op_errors_total",
        "counter",
        "error replies sent for bad client ops.",
        c.op_errors,
    );
    o.metric(
        "herald_handshake_timeouts_total",
        "counter",
        "Connections closed for an incomplete request head.",
        c.handshake_timeouts,
    );
    o.metric(
        "herald_idle_timeouts_total",
        "counter",
        "Idle keep-alive HTTP connections closed.",
        c.idle_timeouts,
    );
    o.metric(
        "herald_pong_timeouts_total",
        "counter",
        "WebSockets closed after an unanswered ping.",
        c.pong_timeouts,
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_help_type_and_values() {
        let mut c = Counters {
            published: 3,
            ..Counters::default()
        };
        c.responses.insert(404, 2);
        let text = render(
            &c,
            &Gauges {
                fd_limit: 1024,
                draining: true,
                ..Gauges::default()
            },
        );
        assert!(text.contains(
            "# TYPE herald_messages_published_total counter\nherald_messages_published_total 3\n"
        ));
        assert!(text.contains("herald_http_responses_total{status=\"404\"} 2\n"));
        assert!(text.contains("herald_fd_limit 1024\n"));
        assert!(text.contains("herald_draining 1\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
