//! Graceful shutdown as a small state machine, decided without I/O. The first SIGTERM or
//! SIGINT starts a drain with a deadline; a second one means "now". The reactor does the
//! steps (PRODUCT.md order: health 503, listener closed, queued messages delivered ahead
//! of each close frame, close 1001, exit) and asks here when it may stop.
//!
//! The WebSockets are not closed at once: a `Pacer` spreads their closes evenly over
//! `--drain-spread`, so the clients reach the next server a few at a time instead of all
//! in one instant, and gives each a reconnect hint drawn from `--reconnect-jitter`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::id::ConnId;

/// The shortest wait between two batches of closes: the loop wakes at most this often
/// for the pacer, however many sockets there are.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    Serving,
    Draining {
        started: Instant,
        deadline: Instant,
        /// With Redis, WebSockets close once Redis answers our PING (everything
        /// published before the drain has come back to us), or at this deadline.
        redis_until: Option<Instant>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSignal {
    /// Begin the drain now.
    StartDrain,
    /// A signal arrived during a drain: the operator wants out at once.
    ExitNow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Every connection is gone.
    Drained,
    /// `--drain-timeout` passed with connections left; they are abandoned.
    DeadlinePassed,
}

impl Drain {
    pub fn on_signal(&mut self, now: Instant, timeout: Duration) -> OnSignal {
        match self {
            Drain::Serving => {
                *self = Drain::Draining {
                    started: now,
                    deadline: now + timeout,
                    redis_until: None,
                };
                OnSignal::StartDrain
            }
            Drain::Draining { .. } => OnSignal::ExitNow,
        }
    }

    pub fn is_draining(&self) -> bool {
        matches!(self, Drain::Draining { .. })
    }

    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Drain::Serving => None,
            Drain::Draining { deadline, .. } => Some(*deadline),
        }
    }

    /// When the drain began.
    pub fn started(&self) -> Option<Instant> {
        match self {
            Drain::Serving => None,
            Drain::Draining { started, .. } => Some(*started),
        }
    }

    /// Hold the WebSockets' close frames until Redis answers, or until `until`.
    pub fn await_redis(&mut self, until: Instant) {
        if let Drain::Draining { redis_until, .. } = self {
            *redis_until = Some(until);
        }
    }

    /// Until when the close frames wait for Redis, if they do.
    pub fn redis_wait(&self) -> Option<Instant> {
        match self {
            Drain::Serving => None,
            Drain::Draining { redis_until, .. } => *redis_until,
        }
    }

    /// Redis answered (or the wait is over): the WebSockets close now.
    pub fn redis_done(&mut self) {
        if let Drain::Draining { redis_until, .. } = self {
            *redis_until = None;
        }
    }

    /// Whether the process may exit, given how many connections remain.
    pub fn finished(&self, now: Instant, open_connections: usize) -> Option<Finished> {
        let deadline = self.deadline()?;
        if open_connections == 0 {
            Some(Finished::Drained)
        } else if now >= deadline {
            Some(Finished::DeadlinePassed)
        } else {
            None
        }
    }
}

/// The open WebSockets of a drain, closed in an even stream from `start` to
/// `start + spread`: the k-th of N at `start + spread * k / N`.
#[derive(Debug)]
pub struct Pacer {
    start: Instant,
    spread: Duration,
    /// Still to close, in order, with the serial that proves a key still names them.
    queue: VecDeque<(ConnId, u64)>,
    total: usize,
    /// Popped so far (closed, or found already gone).
    taken: usize,
    last_batch: Option<Instant>,
}

impl Pacer {
    pub fn new(start: Instant, spread: Duration, open: Vec<(ConnId, u64)>) -> Pacer {
        Pacer {
            start,
            spread,
            total: open.len(),
            queue: open.into(),
            taken: 0,
            last_batch: None,
        }
    }

    /// When the k-th close is due.
    fn due_at(&self, k: usize) -> Instant {
        let share = self.spread.as_secs_f64() * k as f64 / self.total.max(1) as f64;
        self.start + Duration::from_secs_f64(share)
    }

    /// The WebSockets whose close is due at `now`, taken off the queue. At most one
    /// batch per `BATCH_INTERVAL`.
    pub fn due(&mut self, now: Instant) -> Vec<(ConnId, u64)> {
        if self.last_batch.is_some_and(|t| now < t + BATCH_INTERVAL) {
            return Vec::new();
        }
        let mut batch = Vec::new();
        while self.taken < self.total && self.due_at(self.taken) <= now {
            match self.queue.pop_front() {
                Some(next) => batch.push(next),
                None => break,
            }
            self.taken += 1;
        }
        if !batch.is_empty() {
            self.last_batch = Some(now);
        }
        batch
    }

    /// When `due` next has something, for the poll timeout; `None` once all are taken.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        let at = self.due_at(self.taken);
        Some(match self.last_batch {
            Some(t) => at.max(t + BATCH_INTERVAL),
            None => at,
        })
    }

    pub fn is_done(&self) -> bool {
        self.queue.is_empty()
    }

    /// The WebSockets this drain set out to close.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// Reconnect hints: milliseconds drawn uniformly from `--reconnect-jitter`, for the
/// drain's closes and for subscribers told to resume after missed messages.
#[derive(Debug)]
pub struct Jitter {
    range: (u64, u64),
    rng: u64,
}

impl Jitter {
    pub fn new(range: (u64, u64), seed: u64) -> Jitter {
        // xorshift must not start at 0.
        Jitter {
            range,
            rng: seed | 1,
        }
    }

    pub fn range(&self) -> (u64, u64) {
        self.range
    }

    pub fn draw(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let (min, max) = self.range;
        min + self.rng % (max - min + 1)
    }
}

/// `--reconnect-jitter MIN-MAX` in milliseconds.
pub fn parse_jitter(text: &str) -> Result<(u64, u64), String> {
    let (min, max) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?}: give MIN-MAX in milliseconds"))?;
    let min: u64 = min
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: MIN is not a number"))?;
    let max: u64 = max
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: MAX is not a number"))?;
    if min > max {
        return Err(format!("{text:?}: MIN is above MAX"));
    }
    Ok((min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<(ConnId, u64)> {
        (0..n).map(|k| (ConnId(k), k as u64)).collect()
    }

    #[test]
    fn closes_are_spread_evenly_not_front_loaded() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, Duration::from_secs(2), ids(1000));
        // Count closes per 100 ms bucket over the spread, polling as the loop would.
        let mut buckets = vec![0usize; 21];
        let mut now = t0;
        while !p.is_done() {
            now = p.next_deadline().unwrap().max(now);
            let n = p.due(now).len();
            buckets[(now - t0).as_millis() as usize / 100] += n;
            assert!(now <= t0 + Duration::from_secs(2), "past the spread");
        }
        assert_eq!(buckets.iter().sum::<usize>(), 1000);
        // 50 per bucket on average; a batch boundary may move a few across.
        assert!(
            buckets[..20].iter().all(|&n| (40..=60).contains(&n)),
            "{buckets:?}"
        );
    }

    #[test]
    fn no_spread_closes_everything_at_once() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, Duration::ZERO, ids(10));
        assert_eq!(p.due(t0).len(), 10);
        assert!(p.is_done() && p.next_deadline().is_none());
    }

    #[test]
    fn hints_cover_the_jitter_range_and_stay_in_it() {
        let mut j = Jitter::new((100, 300), 7);
        let hints: Vec<u64> = (0..2000).map(|_| j.draw()).collect();
        assert!(hints.iter().all(|h| (100..=300).contains(h)));
        assert!(hints.iter().any(|&h| h < 120) && hints.iter().any(|&h| h > 280));
        assert_eq!(parse_jitter("0-2000"), Ok((0, 2000)));
        assert!(parse_jitter("5").is_err() && parse_jitter("9-3").is_err());
    }

    #[test]
    fn first_signal_drains_second_exits() {
        let t0 = Instant::now();
        let mut d = Drain::Serving;
        assert_eq!(d.finished(t0, 0), None);
        assert_eq!(
            d.on_signal(t0, Duration::from_secs(10)),
            OnSignal::StartDrain
        );
        assert!(d.is_draining());
        assert_eq!(d.on_signal(t0, Duration::from_secs(10)), OnSignal::ExitNow);
    }

    #[test]
    fn drain_ends_when_empty_or_at_the_deadline() {
        let t0 = Instant::now();
        let mut d = Drain::Serving;
        d.on_signal(t0, Duration::from_secs(10));
        assert_eq!(d.finished(t0 + Duration::from_secs(1), 5), None);
        assert_eq!(
            d.finished(t0 + Duration::from_secs(1), 0),
            Some(Finished::Drained)
        );
        assert_eq!(
            d.finished(t0 + Duration::from_secs(10), 5),
            Some(Finished::DeadlinePassed)
        );
    }
}
