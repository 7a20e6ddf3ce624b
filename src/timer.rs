//! Per-connection deadlines. Each connection has a small table, one slot per `Timer`
//! kind; the server keeps every armed deadline in one ordered set. Arming a slot that is
//! already armed replaces the old entry, so the set never holds stale deadlines and a
//! reused slab key cannot inherit a dead connection's timer. O(log n) per change, and
//! only state changes touch it: bytes arriving on a WebSocket just update `last_seen`.
//! `now` is always passed in, never read here.

use std::collections::BTreeSet;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// The HTTP request head must be complete by then (`--handshake-timeout`).
    Request,
    /// A keep-alive HTTP connection may sit idle between requests until then.
    Idle,
    /// Time to check whether a WebSocket has been silent for `--ping-interval`.
    Ping,
    /// A ping went unanswered for `--pong-timeout`.
    Pong,
    /// Our close frame went out; the peer has until then to finish the handshake.
    CloseGrace,
    /// The WebSocket's token grant expires: its private subscriptions end.
    Grant,
}

const KINDS: usize = 6;

impl Timer {
    const ALL: [Timer; KINDS] = [
        Timer::Request,
        Timer::Idle,
        Timer::Ping,
        Timer::Pong,
        Timer::CloseGrace,
        Timer::Grant,
    ];

    fn slot(self) -> usize {
        match self {
            Timer::Request => 0,
            Timer::Idle => 1,
            Timer::Ping => 2,
            Timer::Pong => 3,
            Timer::CloseGrace => 4,
            Timer::Grant => 5,
        }
    }
}

/// A deadline as nanoseconds since the `Timers`' origin: 8 bytes where an `Instant` takes
/// 16, in every connection's table and in the ordered set (which holds one entry per
/// idle WebSocket, so this is memory per connection twice over).
type Tick = NonZeroU64;

/// One connection's armed deadlines.
#[derive(Debug, Default)]
pub struct TimerTable([Option<Tick>; KINDS]);

impl TimerTable {
    pub fn is_armed(&self, kind: Timer) -> bool {
        self.0[kind.slot()].is_some()
    }
}

/// Every armed deadline of every connection, ordered by time.
#[derive(Debug)]
pub struct Timers {
    origin: Instant,
    set: BTreeSet<(Tick, u32, Timer)>,
}

impl Default for Timers {
    fn default() -> Timers {
        Timers {
            origin: Instant::now(),
            set: BTreeSet::new(),
        }
    }
}

impl Timers {
    fn tick(&self, at: Instant) -> Tick {
        let ns = at.saturating_duration_since(self.origin).as_nanos();
        Tick::new(u64::try_from(ns).unwrap_or(u64::MAX).max(1)).unwrap_or(Tick::MIN)
    }

    fn instant(&self, tick: Tick) -> Instant {
        self.origin + Duration::from_nanos(tick.get())
    }

    /// Slab keys fit 32 bits: a process holds at most a few million descriptors.
    fn key(key: usize) -> u32 {
        u32::try_from(key).unwrap_or(u32::MAX)
    }

    pub fn arm(&mut self, table: &mut TimerTable, key: usize, kind: Timer, at: Instant) {
        let at = self.tick(at);
        if let Some(old) = table.0[kind.slot()].replace(at) {
            self.set.remove(&(old, Self::key(key), kind));
        }
        self.set.insert((at, Self::key(key), kind));
    }

    pub fn disarm(&mut self, table: &mut TimerTable, key: usize, kind: Timer) {
        if let Some(old) = table.0[kind.slot()].take() {
            self.set.remove(&(old, Self::key(key), kind));
        }
    }

    pub fn disarm_all(&mut self, table: &mut TimerTable, key: usize) {
        for kind in Timer::ALL {
            self.disarm(table, key, kind);
        }
    }

    /// What is left of each armed timer in `table` at `now` (a live upgrade carries them
    /// as durations: the new process has another clock origin).
    pub fn remaining(&self, table: &TimerTable, now: Instant) -> Vec<(Timer, Duration)> {
        Timer::ALL
            .into_iter()
            .filter_map(|kind| {
                let at = self.instant(table.0[kind.slot()]?);
                Some((kind, at.saturating_duration_since(now)))
            })
            .collect()
    }

    /// The earliest deadline, for the poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.set.first().map(|&(at, _, _)| self.instant(at))
    }

    /// Take one deadline that has passed at `now`, clearing its slot in `table_of(key)`.
    pub fn pop_expired<'a>(
        &mut self,
        now: Instant,
        table_of: impl FnOnce(usize) -> Option<&'a mut TimerTable>,
    ) -> Option<(usize, Timer)> {
        let &(at, key, kind) = self.set.first()?;
        if at > self.tick(now) {
            return None;
        }
        self.set.pop_first();
        let key = key as usize;
        if let Some(table) = table_of(key) {
            table.0[kind.slot()] = None;
        }
        Some((key, kind))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.set.len()
    }
}

/// Poll timeout until `deadline`, rounded up to whole milliseconds: epoll counts in
/// milliseconds, and rounding down would wake the loop just before the deadline, find
/// nothing due, and spin.
pub fn poll_timeout(now: Instant, deadline: Option<Instant>) -> Option<Duration> {
    let wait = deadline?.saturating_duration_since(now);
    let ms = wait.as_nanos().div_ceil(1_000_000);
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rearming_replaces_and_expiry_is_in_order() {
        let mut timers = Timers::default();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut a = TimerTable::default();
        let mut b = TimerTable::default();
        timers.arm(&mut a, 1, Timer::Ping, t0 + 5 * s);
        timers.arm(&mut b, 2, Timer::Request, t0 + 2 * s);
        timers.arm(&mut a, 1, Timer::Ping, t0 + 3 * s); // replaces t0+5s
        assert_eq!(timers.len(), 2);
        assert_eq!(timers.next_deadline(), Some(t0 + 2 * s));
        assert_eq!(timers.pop_expired(t0 + s, |_| None), None);

        let mut tables = [TimerTable::default(), a, b];
        let now = t0 + 10 * s;
        let first = timers.pop_expired(now, |k| Some(&mut tables[k]));
        assert_eq!(first, Some((2, Timer::Request)));
        assert!(!tables[2].is_armed(Timer::Request));
        let second = timers.pop_expired(now, |k| Some(&mut tables[k]));
        assert_eq!(second, Some((1, Timer::Ping)));
        assert_eq!(timers.pop_expired(now, |k| Some(&mut tables[k])), None);
    }

    #[test]
    fn disarming_all_leaves_nothing_behind() {
        let mut timers = Timers::default();
        let t0 = Instant::now();
        let mut a = TimerTable::default();
        timers.arm(&mut a, 7, Timer::Ping, t0);
        timers.arm(&mut a, 7, Timer::Pong, t0);
        timers.arm(&mut a, 7, Timer::CloseGrace, t0);
        timers.disarm(&mut a, 7, Timer::Pong);
        assert_eq!(timers.len(), 2);
        timers.disarm_all(&mut a, 7);
        assert_eq!(timers.len(), 0);
        assert_eq!(timers.next_deadline(), None);
    }

    #[test]
    fn poll_timeout_rounds_up() {
        let t0 = Instant::now();
        let d = poll_timeout(t0, Some(t0 + Duration::from_micros(1500))).unwrap();
        assert_eq!(d, Duration::from_millis(2));
        assert_eq!(
            poll_timeout(t0 + Duration::from_secs(1), Some(t0)),
            Some(Duration::ZERO)
        );
        assert_eq!(poll_timeout(t0, None), None);
    }
}
