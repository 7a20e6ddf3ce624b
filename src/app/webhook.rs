//! Webhooks (`--webhook-url`): the events the application hears about (a topic gaining
//! its first subscriber or losing its last; with presence, a member's first connection
//! and its last), queued, batched and retried. Pure: it says what batch to send and when;
//! the app client sends it.
//!
//! One batch is in flight at a time, so the application receives events in the order they
//! happened. A batch goes when `BATCH_WINDOW` has passed since its first event or it holds
//! `BATCH_MAX` events. A batch that fails (no 2xx, a timeout, the application down) is
//! sent again, the same events in the same order, after a backoff that doubles up to
//! `BACKOFF_MAX`; events arriving meanwhile wait behind it. The queue holds at most
//! `--webhook-queue` events: past it, new events are dropped, counted
//! (`herald_webhook_events_dropped_total`) and logged, never silently.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use log::{info, warn};
use serde_json::json;

/// Events in one POST at most.
pub const BATCH_MAX: usize = 100;
/// How long the first event of a batch waits for others to join it.
pub const BATCH_WINDOW: Duration = Duration::from_millis(50);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// At most one overflow warning per this interval (each says how many were dropped).
const DROP_WARN_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    TopicOccupied,
    TopicVacated,
    MemberAdded,
    MemberRemoved,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::TopicOccupied => "topic_occupied",
            Kind::TopicVacated => "topic_vacated",
            Kind::MemberAdded => "member_added",
            Kind::MemberRemoved => "member_removed",
        }
    }
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct HookCounters {
    pub events: u64,
    pub delivered: u64,
    pub batches: u64,
    pub failed_attempts: u64,
    pub dropped: u64,
}

#[derive(Debug)]
pub struct Webhooks {
    capacity: usize,
    /// Encoded events (JSON objects), oldest first, not yet in a batch.
    queue: VecDeque<String>,
    /// When the oldest queued event arrived.
    first_at: Option<Instant>,
    /// The batch being sent or waiting to be sent again.
    batch: Option<Vec<String>>,
    in_flight: bool,
    retry_at: Option<Instant>,
    attempt: u32,
    dropped_unlogged: u64,
    last_drop_warning: Option<Instant>,
    pub counters: HookCounters,
}

impl Webhooks {
    pub fn new(capacity: usize) -> Webhooks {
        Webhooks {
            capacity,
            queue: VecDeque::new(),
            first_at: None,
            batch: None,
            in_flight: false,
            retry_at: None,
            attempt: 0,
            dropped_unlogged: 0,
            last_drop_warning: None,
            counters: HookCounters::default(),
        }
    }

    /// An event happened. `member` for the member events.
    pub fn push(&mut self, kind: Kind, topic: &str, member: Option<&str>, now: Instant) {
        self.counters.events += 1;
        let waiting = self.queue.len() + self.batch.as_ref().map_or(0, Vec::len);
        if waiting >= self.capacity {
            self.counters.dropped += 1;
            self.dropped_unlogged += 1;
            if self
                .last_drop_warning
                .is_none_or(|t| now.duration_since(t) >= DROP_WARN_INTERVAL)
            {
                warn!(
                    "webhooks: queue full ({} events): dropped {} event(s); the application \
                     is not taking them (herald_webhook_events_dropped_total)",
                    self.capacity, self.dropped_unlogged
                );
                self.dropped_unlogged = 0;
                self.last_drop_warning = Some(now);
            }
            return;
        }
        let event = match member {
            Some(m) => json!({"name": kind.name(), "topic": topic, "member": m}),
            None => json!({"name": kind.name(), "topic": topic}),
        };
        self.queue.push_back(event.to_string());
        self.first_at.get_or_insert(now);
    }

    /// A live upgrade: the events not yet delivered, the batch being sent (or waiting to
    /// be sent again) first, in order.
    pub fn undelivered(&self) -> Vec<String> {
        let batch = self.batch.iter().flatten();
        batch.chain(&self.queue).cloned().collect()
    }

    /// The new binary takes over what the old one had not delivered. A batch that was in
    /// flight goes again, so the application may see it twice (as after any retry).
    pub fn carry(&mut self, events: Vec<String>, counters: HookCounters, now: Instant) {
        self.counters = counters;
        if !events.is_empty() {
            self.queue.extend(events);
            self.first_at = Some(now);
        }
    }

    /// When `next_batch` will have something to say, if ever without new events.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.in_flight {
            return None;
        }
        if self.batch.is_some() {
            return self.retry_at;
        }
        self.first_at.map(|t| t + BATCH_WINDOW)
    }

    /// The body of the batch to POST now, if one is due. `unix_ms` stamps it.
    pub fn next_batch(&mut self, now: Instant, unix_ms: u64) -> Option<Vec<u8>> {
        if self.in_flight {
            return None;
        }
        if self.batch.is_some() {
            if self.retry_at.is_some_and(|t| now < t) {
                return None;
            }
        } else {
            let due = self.queue.len() >= BATCH_MAX
                || self.first_at.is_some_and(|t| now >= t + BATCH_WINDOW);
            if !due || self.queue.is_empty() {
                return None;
            }
            let n = self.queue.len().min(BATCH_MAX);
            self.batch = Some(self.queue.drain(..n).collect());
            self.first_at = (!self.queue.is_empty()).then_some(now);
        }
        let events = self.batch.as_ref()?.join(",");
        self.in_flight = true;
        Some(format!(r#"{{"time_ms":{unix_ms},"events":[{events}]}}"#).into_bytes())
    }

    /// The batch in flight was answered (`ok`: a 2xx) or failed.
    pub fn on_result(&mut self, ok: bool, jitter: u64, now: Instant) {
        self.in_flight = false;
        if ok {
            let n = self.batch.take().map_or(0, |b| b.len());
            self.counters.delivered += n as u64;
            self.counters.batches += 1;
            if self.attempt > 0 {
                info!(
                    "webhooks: delivered again after {} failed attempts",
                    self.attempt
                );
            }
            self.attempt = 0;
            self.retry_at = None;
            return;
        }
        self.counters.failed_attempts += 1;
        let cap = BACKOFF_MIN
            .saturating_mul(1 << self.attempt.min(10))
            .min(BACKOFF_MAX);
        // Half fixed, half jitter: processes that lost the same app do not retry in step.
        let half = cap / 2;
        let delay = half + Duration::from_nanos(jitter % (half.as_nanos() as u64).max(1));
        if self.attempt == 0 {
            warn!("webhooks: delivery failed; retrying with backoff (up to {BACKOFF_MAX:?})");
        }
        self.attempt += 1;
        self.retry_at = Some(now + delay);
    }

    /// Events not yet delivered (queued, and in the batch being tried).
    pub fn pending(&self) -> usize {
        self.queue.len() + self.batch.as_ref().map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(w: &mut Webhooks, now: Instant) -> Option<serde_json::Value> {
        w.next_batch(now, 7)
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn events_wait_for_the_window_then_go_together() {
        let t0 = Instant::now();
        let mut w = Webhooks::new(10);
        w.push(Kind::TopicOccupied, "a", None, t0);
        w.push(Kind::MemberAdded, "a", Some("42"), t0);
        assert!(body(&mut w, t0).is_none(), "the window is open");
        assert_eq!(w.next_deadline(), Some(t0 + BATCH_WINDOW));
        let b = body(&mut w, t0 + BATCH_WINDOW).unwrap();
        assert_eq!(b["time_ms"], 7);
        assert_eq!(b["events"][0]["name"], "topic_occupied");
        assert_eq!(b["events"][1]["member"], "42");
        assert!(body(&mut w, t0 + BATCH_WINDOW).is_none(), "one in flight");
        w.on_result(true, 0, t0);
        assert_eq!((w.pending(), w.counters.delivered), (0, 2));
    }

    #[test]
    fn a_failed_batch_is_retried_whole_after_a_growing_backoff() {
        let t0 = Instant::now();
        let mut w = Webhooks::new(10);
        w.push(Kind::TopicVacated, "a", None, t0);
        let first = body(&mut w, t0 + BATCH_WINDOW).unwrap();
        w.push(Kind::TopicOccupied, "b", None, t0);
        w.on_result(false, 0, t0);
        let retry = w.next_deadline().unwrap();
        assert!(retry > t0 && body(&mut w, t0).is_none());
        let again = body(&mut w, retry).unwrap();
        assert_eq!(
            again["events"], first["events"],
            "the same events, not merged"
        );
        w.on_result(false, 0, retry);
        assert!(
            w.next_deadline().unwrap() - retry > retry - t0,
            "backoff grows"
        );
    }

    #[test]
    fn overflow_is_counted_and_nothing_past_capacity_is_kept() {
        let t0 = Instant::now();
        let mut w = Webhooks::new(3);
        for i in 0..5 {
            w.push(Kind::TopicOccupied, &format!("t{i}"), None, t0);
        }
        assert_eq!((w.pending(), w.counters.dropped), (3, 2));
    }
}
