//! The server under test, watched from outside: its CPU seconds and resident memory,
//! from /proc when its PID is given, else from its /metrics (herald exports
//! `process_cpu_seconds_total` and `process_resident_memory_bytes`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub enum Observer {
    Pid(u32),
    Metrics(SocketAddr),
    Blind,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub cpu_seconds: Option<f64>,
    pub rss_bytes: Option<u64>,
}

impl Observer {
    pub fn new(pid: Option<u32>, target: SocketAddr) -> Observer {
        if let Some(pid) = pid {
            return Observer::Pid(pid);
        }
        let probe = Observer::Metrics(target);
        if probe.sample().rss_bytes.is_some() {
            probe
        } else {
            Observer::Blind
        }
    }

    pub fn sample(&self) -> Sample {
        match *self {
            Observer::Pid(pid) => from_proc(pid),
            Observer::Metrics(addr) => from_metrics(addr).unwrap_or_default(),
            Observer::Blind => Sample::default(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Observer::Pid(pid) => format!("/proc/{pid}"),
            Observer::Metrics(addr) => format!("http://{addr}/metrics"),
            Observer::Blind => "not observed (give --server-pid)".into(),
        }
    }
}

fn from_proc(pid: u32) -> Sample {
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let cpu = schedstat_seconds(pid).or_else(|| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let fields: Vec<&str> = s.get(s.rfind(')')? + 2..)?.split_whitespace().collect();
                Some(
                    (fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
                        / ticks as f64,
                )
            })
    });
    let rss = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page as u64);
    Sample {
        cpu_seconds: cpu,
        rss_bytes: rss,
    }
}

/// CPU time of every thread of `pid`, in nanoseconds from the scheduler's accounting
/// (`/proc/PID/task/TID/schedstat`, first field): /proc/PID/stat counts in 10 ms clock
/// ticks, too coarse for a run of a third of a second.
fn schedstat_seconds(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let text = std::fs::read_to_string(path).ok()?;
        ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

fn from_metrics(addr: SocketAddr) -> Option<Sample> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b' '))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    Some(Sample {
        cpu_seconds: value("process_cpu_seconds_total"),
        rss_bytes: value("process_resident_memory_bytes").map(|v| v as u64),
    })
}
