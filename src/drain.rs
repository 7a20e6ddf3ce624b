//! Graceful shutdown as a small state machine, decided without I/O. The first SIGTERM or
//! SIGINT starts a drain with a deadline; a second one means "now". The reactor does the
//! steps (PRODUCT.md order: health 503, listener closed, queued messages delivered ahead
//! of each close frame, close 1001, exit) and asks here when it may stop.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    Serving,
    Draining {
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

#[cfg(test)]
mod tests {
    use super::*;

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
