//! HAProxy's agent-check, answered from herald's own state (`--agent-listen`). HAProxy
//! connects to the agent port every `agent-inter` and reads one ASCII line; herald
//! answers with what a balancer should do with it (HAProxy configuration manual,
//! "agent-check"):
//!
//! - `up ready N% maxconn:M`: take new connections, weighted by headroom N, the least
//!   of connections against `--max-connections`, descriptors against the fd limit, and
//!   resident memory against `--max-memory`; HAProxy queues past M instead of herald
//!   refusing.
//! - `drain`: keep the current clients, send no new ones. Said while a shutdown drain
//!   runs, while the operator asked for it (SIGUSR1 toggles), while accept() fails for
//!   lack of descriptors (a live process that cannot accept must not look healthy), and
//!   while messages through Redis do not come back (delivery is broken here).
//!
//! Pure: the reactor gathers the numbers and writes the line.

/// What the agent reply is made of, read off the server when HAProxy asks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    pub draining: bool,
    /// SIGUSR1: the operator took this process out of rotation.
    pub operator_drain: bool,
    /// accept() failed for lack of descriptors within the last moments.
    pub accept_failing: bool,
    /// With Redis: the delivery probe did not come back.
    pub delivery_broken: bool,
    pub connections: usize,
    pub max_connections: usize,
    pub open_fds: u64,
    pub fd_limit: u64,
    pub resident_bytes: Option<u64>,
    pub max_memory: Option<u64>,
}

impl Load {
    /// Why this process should get no new connections, if it should not.
    pub fn drain_reason(&self) -> Option<&'static str> {
        if self.draining {
            Some("shutting down")
        } else if self.operator_drain {
            Some("drain requested (SIGUSR1)")
        } else if self.accept_failing {
            Some("accept() is failing for lack of descriptors")
        } else if self.delivery_broken {
            Some("messages through Redis are not coming back")
        } else {
            None
        }
    }

    /// Headroom in percent: the scarcest of connections, descriptors and memory.
    pub fn weight(&self) -> u64 {
        // Whole percent of what is left, in integers (0.1 in floats floors to 9%).
        let free = |used: u64, limit: u64| match limit {
            0 => 0,
            _ => limit.saturating_sub(used).saturating_mul(100) / limit,
        };
        let mut headroom = free(self.connections as u64, self.max_connections as u64)
            .min(free(self.open_fds, self.fd_limit));
        if let (Some(rss), Some(max)) = (self.resident_bytes, self.max_memory) {
            headroom = headroom.min(free(rss, max));
        }
        headroom
    }

    /// The line HAProxy reads.
    pub fn reply(&self) -> String {
        match self.drain_reason() {
            Some(_) => "drain\n".to_string(),
            None => format!(
                "up ready {}% maxconn:{}\n",
                self.weight(),
                self.max_connections
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load() -> Load {
        Load {
            connections: 250,
            max_connections: 1000,
            open_fds: 300,
            fd_limit: 2000,
            ..Load::default()
        }
    }

    #[test]
    fn ready_reports_the_scarcest_headroom() {
        assert_eq!(load().reply(), "up ready 75% maxconn:1000\n");
        let fds = Load {
            open_fds: 1800,
            ..load()
        };
        assert_eq!(fds.weight(), 10);
        let memory = Load {
            resident_bytes: Some(900),
            max_memory: Some(1000),
            ..load()
        };
        assert_eq!(memory.weight(), 10);
        let full = Load {
            connections: 1200,
            ..load()
        };
        assert_eq!(full.weight(), 0);
    }

    #[test]
    fn every_reason_to_drain_says_drain() {
        for l in [
            Load {
                draining: true,
                ..load()
            },
            Load {
                operator_drain: true,
                ..load()
            },
            Load {
                accept_failing: true,
                ..load()
            },
            Load {
                delivery_broken: true,
                ..load()
            },
        ] {
            assert_eq!(l.reply(), "drain\n", "{l:?}");
            assert!(l.drain_reason().is_some());
        }
        assert_eq!(load().drain_reason(), None);
    }
}
