//! The open-files limit: every connection is a file descriptor. At start herald raises
//! its RLIMIT_NOFILE soft limit to the hard limit (the most an unprivileged process may
//! take) and derives the default `--max-connections` from the result.

use std::io;

/// Descriptors kept back from `--max-connections`: the listener, epoll, the signal pipe,
/// stdio, the socket a refused connection needs for its 503, and room for later needs
/// (Redis). Running out of these would turn refusals into silent accept failures.
pub const FD_RESERVE: u64 = 64;

#[derive(Debug, Clone, Copy)]
pub struct NoFile {
    /// Soft limit found at start.
    pub before: u64,
    /// Soft limit now.
    pub soft: u64,
    pub hard: u64,
}

/// Raise the soft limit to the hard limit. A hard limit of "infinity" is capped at
/// `fs.nr_open`, the kernel's real ceiling, since setrlimit refuses more.
// rlim_t is u64 on Linux but not everywhere; the casts are for the other platforms.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile() -> io::Result<NoFile> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct into the valid pointer we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur as u64;
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        target = nr_open().unwrap_or(1 << 20) as libc::rlim_t;
    }
    if target > lim.rlim_cur {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one valid rlimit struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            let err = io::Error::last_os_error();
            log::warn!("could not raise the open-files limit from {before} to {target}: {err}");
        } else {
            lim.rlim_cur = target;
        }
    }
    Ok(NoFile {
        before,
        soft: lim.rlim_cur as u64,
        hard: lim.rlim_max as u64,
    })
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `--max-connections` when not given: the soft limit minus the reserve.
pub fn default_max_connections(soft: u64) -> usize {
    usize::try_from(soft.saturating_sub(FD_RESERVE).max(1)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_keeps_a_reserve() {
        assert_eq!(default_max_connections(20_000), 19_936);
        assert_eq!(default_max_connections(10), 1);
    }
}
