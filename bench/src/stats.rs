//! What a run measured, mergeable across threads and worker processes: counters, failure
//! kinds, and histograms in microseconds that travel between processes as
//! (value, count) pairs.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// A histogram as it crosses a process boundary.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Buckets(pub Vec<(u64, u64)>);

impl Buckets {
    pub fn from(h: &Histogram<u64>) -> Buckets {
        Buckets(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for &(value, count) in &self.0 {
            h.saturating_record_n(value, count);
        }
    }
}

/// One thread's or one worker's tally.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Tally {
    pub attempted: u64,
    /// Handshakes answered 101.
    pub connected: u64,
    /// Connections whose subscription was confirmed.
    pub subscribed: u64,
    pub failures: BTreeMap<String, u64>,
    pub handshake_us: Buckets,
    pub received: u64,
    pub bytes: u64,
    /// Bytes of the frames that carried counted messages (header and payload as they
    /// came, compressed or not): the wire cost of the deliveries.
    #[serde(default)]
    pub message_bytes: u64,
    /// --deflate: handshakes whose 101 accepted permessage-deflate, and messages that
    /// came compressed (RSV1) and were inflated.
    #[serde(default)]
    pub deflate_negotiated: u64,
    #[serde(default)]
    pub compressed: u64,
    /// Ids skipped within a connection's stream (a gap in `id`).
    pub gaps: u64,
    pub latency_us: Buckets,
    pub echo_sent: u64,
    pub rtt_us: Buckets,
    /// Connections that ended while the run wanted them open.
    pub disconnects: u64,
    /// CLOCK_MONOTONIC ns: first connect attempt, last successful handshake, first
    /// disconnect, last (re)subscription confirmed.
    pub first_attempt_ns: Option<u64>,
    pub last_connected_ns: Option<u64>,
    pub first_disconnect_ns: Option<u64>,
    pub last_subscribed_ns: Option<u64>,
    /// When the last message arrived.
    pub last_received_ns: Option<u64>,
    /// The longest time between two messages arriving at one client thread (`upgrade`:
    /// the pause the server's upgrade caused), and when it ended.
    #[serde(default)]
    pub max_gap_ns: u64,
    /// capacity: per message id, how many subscribers received it within the bound.
    pub within_bound: BTreeMap<u64, u64>,
    /// This process's CPU seconds (user + system), filled in by the worker.
    pub cpu_seconds: f64,
    /// Reconnections (after a disconnect) whose subscription was confirmed, and when the
    /// first of them was.
    pub resubscribed: u64,
    pub first_resubscribed_ns: Option<u64>,
    /// storm --resume: what resuming did. Everything below stays zero without it.
    pub resume: ResumeTally,
    /// Clients that reconnect (storm, deploy): when they went and came back, and the
    /// server's reconnect hints.
    pub reconnect: ReconnectTally,
}

/// Width of the time buckets below: CLOCK_MONOTONIC ns / `BUCKET_NS`.
pub const BUCKET_NS: u64 = 100_000_000;

/// Reconnecting clients over time, and the hints `{"op":"reconnect","after_ms":X}` they
/// were given. Times are 100 ms buckets of the host-wide monotonic clock, so workers'
/// curves add up.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ReconnectTally {
    /// Subscribed connections that ended, per bucket.
    pub disconnects_at: BTreeMap<u64, u64>,
    /// Connection attempts by clients that had been subscribed before, per bucket.
    pub attempts_at: BTreeMap<u64, u64>,
    /// Reconnections whose subscription was confirmed, per bucket.
    pub resubscribed_at: BTreeMap<u64, u64>,
    /// Clients by how many times they were disconnected (0, 1, 2, ...).
    pub clients_by_disconnects: BTreeMap<u32, u64>,
    /// Hints received, and the least and greatest `after_ms`.
    pub hints: u64,
    pub hint_min_ms: Option<u64>,
    pub hint_max_ms: Option<u64>,
    /// Reconnects that waited for a hint (deploy honours them), the least time past the
    /// hint's end at which one was attempted, and attempts made before it ended (a bug
    /// of this tool if ever above zero).
    pub hinted_reconnects: u64,
    pub least_slack_ms: Option<u64>,
    pub early: u64,
}

impl ReconnectTally {
    pub fn merge(&mut self, o: &ReconnectTally) {
        for (mine, theirs) in [
            (&mut self.disconnects_at, &o.disconnects_at),
            (&mut self.attempts_at, &o.attempts_at),
            (&mut self.resubscribed_at, &o.resubscribed_at),
        ] {
            for (k, v) in theirs {
                *mine.entry(*k).or_default() += v;
            }
        }
        for (k, v) in &o.clients_by_disconnects {
            *self.clients_by_disconnects.entry(*k).or_default() += v;
        }
        self.hints += o.hints;
        self.hint_min_ms = min_opt(self.hint_min_ms, o.hint_min_ms);
        self.hint_max_ms = max_opt(self.hint_max_ms, o.hint_max_ms);
        self.hinted_reconnects += o.hinted_reconnects;
        self.least_slack_ms = min_opt(self.least_slack_ms, o.least_slack_ms);
        self.early += o.early;
    }

    /// Count one event at `now_ns` in `curve`.
    pub fn mark(curve: &mut BTreeMap<u64, u64>, now_ns: u64) {
        *curve.entry(now_ns / BUCKET_NS).or_default() += 1;
    }
}

/// storm --resume, per client (a client lives across its reconnections).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ResumeTally {
    /// The same (topic, epoch, id) received again by a client that already had it.
    pub duplicates: u64,
    /// Resumes answered `recovered:true`, `recovered:false`, or with no `recovered`.
    pub recovered: u64,
    pub not_recovered: u64,
    pub unanswered: u64,
    /// `subscribed` replies that carried an epoch other than the one the client had.
    pub epoch_changes: u64,
    /// `subscribed` replies with no epoch at all (a server without resume).
    pub no_epoch: u64,
    /// Resumed subscriptions that reached the id their `subscribed` reply named (the
    /// topic's last id when the client came back), when the last did, and how long each
    /// took from its `subscribed`.
    pub caught_up: u64,
    pub last_caught_up_ns: Option<u64>,
    pub catch_up_us: Buckets,
    /// Against the publisher's acknowledged ids (told to the workers before they stop):
    /// acknowledged ids above a client's first `subscribed` id that it never received,
    /// over the clients that stayed in one epoch (`checked`); clients that saw their epoch
    /// change, or ran without the list, are `unchecked`.
    pub missed_by_id: u64,
    pub checked: u64,
    pub unchecked: u64,
    /// The other way round, over the same clients: ids received above the first
    /// `subscribed` id that the publisher never saw acknowledged (a publish the server
    /// ran but whose reply was lost; sent again, it arrives twice, under two ids).
    #[serde(default)]
    pub unacked: u64,
}

impl ResumeTally {
    pub fn merge(&mut self, o: &ResumeTally) {
        self.duplicates += o.duplicates;
        self.recovered += o.recovered;
        self.not_recovered += o.not_recovered;
        self.unanswered += o.unanswered;
        self.epoch_changes += o.epoch_changes;
        self.no_epoch += o.no_epoch;
        self.caught_up += o.caught_up;
        self.last_caught_up_ns = max_opt(self.last_caught_up_ns, o.last_caught_up_ns);
        self.catch_up_us.0.extend_from_slice(&o.catch_up_us.0);
        self.missed_by_id += o.missed_by_id;
        self.checked += o.checked;
        self.unchecked += o.unchecked;
        self.unacked += o.unacked;
    }

    /// Resumes that got a `subscribed` reply.
    pub fn answered(&self) -> u64 {
        self.recovered + self.not_recovered + self.unanswered
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    a.max(b)
}

impl Tally {
    pub fn fail(&mut self, kind: &str) {
        *self.failures.entry(kind.to_string()).or_default() += 1;
    }

    pub fn merge(&mut self, o: &Tally) {
        self.attempted += o.attempted;
        self.connected += o.connected;
        self.subscribed += o.subscribed;
        for (k, v) in &o.failures {
            *self.failures.entry(k.clone()).or_default() += v;
        }
        self.handshake_us.0.extend_from_slice(&o.handshake_us.0);
        self.received += o.received;
        self.bytes += o.bytes;
        self.message_bytes += o.message_bytes;
        self.deflate_negotiated += o.deflate_negotiated;
        self.compressed += o.compressed;
        self.gaps += o.gaps;
        self.latency_us.0.extend_from_slice(&o.latency_us.0);
        self.echo_sent += o.echo_sent;
        self.rtt_us.0.extend_from_slice(&o.rtt_us.0);
        self.disconnects += o.disconnects;
        self.first_attempt_ns = min_opt(self.first_attempt_ns, o.first_attempt_ns);
        self.last_connected_ns = max_opt(self.last_connected_ns, o.last_connected_ns);
        self.first_disconnect_ns = min_opt(self.first_disconnect_ns, o.first_disconnect_ns);
        self.last_subscribed_ns = max_opt(self.last_subscribed_ns, o.last_subscribed_ns);
        self.last_received_ns = max_opt(self.last_received_ns, o.last_received_ns);
        self.max_gap_ns = self.max_gap_ns.max(o.max_gap_ns);
        for (id, n) in &o.within_bound {
            *self.within_bound.entry(*id).or_default() += n;
        }
        self.cpu_seconds += o.cpu_seconds;
        self.resubscribed += o.resubscribed;
        self.first_resubscribed_ns = min_opt(self.first_resubscribed_ns, o.first_resubscribed_ns);
        self.resume.merge(&o.resume);
        self.reconnect.merge(&o.reconnect);
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process on the host, so a
/// publisher's stamp can be compared with a subscriber's in another process.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// User + system CPU seconds of this process (all threads).
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_trip_and_merge() {
        let mut a = histogram();
        for v in 1..=1000 {
            a.record(v).unwrap();
        }
        let mut b = histogram();
        b.record(5000).unwrap();
        let mut t = Tally {
            latency_us: Buckets::from(&a),
            ..Tally::default()
        };
        t.merge(&Tally {
            latency_us: Buckets::from(&b),
            received: 1,
            ..Tally::default()
        });
        let json = serde_json::to_string(&t).unwrap();
        let back: Tally = serde_json::from_str(&json).unwrap();
        let mut h = histogram();
        back.latency_us.add_to(&mut h);
        assert_eq!(h.len(), 1001);
        // 3 significant digits: 5000 comes back as its bucket's highest equivalent value.
        assert!(h.equivalent(h.max(), 5000), "{}", h.max());
        assert!((495..=505).contains(&h.value_at_quantile(0.5)));
    }

    #[test]
    fn times_merge_as_first_and_last() {
        let mut t = Tally {
            first_attempt_ns: Some(10),
            last_connected_ns: Some(20),
            ..Tally::default()
        };
        t.merge(&Tally {
            first_attempt_ns: Some(5),
            last_connected_ns: Some(30),
            ..Tally::default()
        });
        t.merge(&Tally::default());
        assert_eq!(
            (t.first_attempt_ns, t.last_connected_ns),
            (Some(5), Some(30))
        );
    }
}
