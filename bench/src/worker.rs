//! Worker processes. One process's fd table holds ~20,000 sockets on a typical host, so
//! a run needing more spreads its connections over several processes: the driver starts
//! this same binary as `herald-bench worker --plan JSON`, one per share. A worker runs
//! one client thread per plan, prints `PROGRESS {json}` lines while it runs, and on
//! `STOP` (or end of stdin) prints `RESULT {json}` and exits. An `ACKED {json}` line
//! before `STOP` gives it the ids the publisher had acknowledged (storm --resume), for
//! each client to be checked against. A worker that dies reports
//! nothing, and the driver counts what its connections should have received as lost.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client::{self, Control, ThreadPlan};
use crate::ids::IdSet;
use crate::stats::{Tally, cpu_seconds};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerPlan {
    pub threads: Vec<ThreadPlan>,
}

impl WorkerPlan {
    pub fn connections(&self) -> usize {
        self.threads.iter().map(|t| t.connections).sum()
    }
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct Progress {
    pub settled: u64,
    pub usable: u64,
    pub received: u64,
    /// Receptions a client already had (storm --resume), included in `received`.
    pub duplicates: u64,
}

/// The worker side: run the plan until told to stop.
pub fn serve(plan: WorkerPlan) {
    raise_fd_limit();
    let control = Arc::new(Control::default());
    let threads: Vec<_> = plan
        .threads
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let control = control.clone();
            let seed = u64::from(std::process::id()) << 16 | i as u64;
            std::thread::spawn(move || client::run(&t, control, seed))
        })
        .collect();
    {
        let control = control.clone();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                match line {
                    Ok(l) if l.trim() == "STOP" => break,
                    Ok(l) => {
                        if let Some(json) = l.strip_prefix("ACKED ") {
                            let ids: Option<IdSet> = serde_json::from_str(json).ok();
                            *control.acked.lock().unwrap_or_else(|e| e.into_inner()) = ids;
                        }
                    }
                    Err(_) => break,
                }
            }
            control.stop.store(true, Ordering::SeqCst);
        });
    }
    let mut out = std::io::stdout();
    while !control.stop.load(Ordering::SeqCst) {
        let p = Progress {
            settled: control.settled.load(Ordering::Relaxed),
            usable: control.usable.load(Ordering::Relaxed),
            received: control.received.load(Ordering::Relaxed),
            duplicates: control.duplicates.load(Ordering::Relaxed),
        };
        let _ = writeln!(
            out,
            "PROGRESS {}",
            serde_json::to_string(&p).unwrap_or_default()
        );
        let _ = out.flush();
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut tally = Tally::default();
    for t in threads {
        if let Ok(part) = t.join() {
            tally.merge(&part);
        }
    }
    tally.cpu_seconds = cpu_seconds();
    let _ = writeln!(
        out,
        "RESULT {}",
        serde_json::to_string(&tally).unwrap_or_default()
    );
    let _ = out.flush();
}

/// Soft fd limit up to the hard limit, as herald itself does.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux only
    let soft = lim.rlim_cur as u64;
    soft
}

struct Handle {
    child: Child,
    stdin: Option<ChildStdin>,
    connections: usize,
    progress: Arc<Mutex<Progress>>,
    result: Arc<Mutex<Option<Tally>>>,
}

/// The driver's side: the running workers.
pub struct Workers {
    handles: Vec<Handle>,
}

pub struct Finished {
    pub tally: Tally,
    /// (worker index, its connections) for workers that died without a result.
    pub dead: Vec<(usize, usize)>,
}

impl Workers {
    pub fn spawn(plans: Vec<WorkerPlan>) -> Workers {
        let exe = std::env::current_exe().expect("own executable");
        let handles = plans
            .into_iter()
            .enumerate()
            .map(|(i, plan)| {
                let connections = plan.connections();
                let mut child = Command::new(&exe)
                    .arg("worker")
                    .arg("--plan")
                    .arg(serde_json::to_string(&plan).expect("plan serializes"))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("start worker");
                eprintln!("worker {i} pid {} connections {connections}", child.id());
                let stdout = child.stdout.take().expect("worker stdout");
                let progress = Arc::new(Mutex::new(Progress::default()));
                let result = Arc::new(Mutex::new(None));
                let (p, r) = (progress.clone(), result.clone());
                std::thread::spawn(move || {
                    for line in BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        if let Some(json) = line.strip_prefix("PROGRESS ") {
                            if let Ok(v) = serde_json::from_str(json) {
                                *p.lock().unwrap_or_else(|e| e.into_inner()) = v;
                            }
                        } else if let Some(json) = line.strip_prefix("RESULT ") {
                            *r.lock().unwrap_or_else(|e| e.into_inner()) =
                                serde_json::from_str(json).ok();
                        }
                    }
                });
                let stdin = child.stdin.take();
                Handle {
                    child,
                    stdin,
                    connections,
                    progress,
                    result,
                }
            })
            .collect();
        Workers { handles }
    }

    pub fn connections(&self) -> usize {
        self.handles.iter().map(|h| h.connections).sum()
    }

    pub fn progress(&self) -> Progress {
        let mut sum = Progress::default();
        for h in &self.handles {
            let p = *h.progress.lock().unwrap_or_else(|e| e.into_inner());
            sum.settled += p.settled;
            sum.usable += p.usable;
            sum.received += p.received;
            sum.duplicates += p.duplicates;
        }
        sum
    }

    /// Give every worker the publisher's acknowledged ids, before `stop`.
    pub fn tell_acked(&mut self, ids: &IdSet) {
        let line = serde_json::to_string(ids).expect("ids serialize");
        for h in &mut self.handles {
            if let Some(stdin) = h.stdin.as_mut() {
                let _ = writeln!(stdin, "ACKED {line}");
            }
        }
    }

    /// Wait until every connection's first attempt has settled (or `limit` passes).
    pub fn wait_settled(&self, limit: Duration, label: &str) -> Progress {
        let start = Instant::now();
        let total = self.connections() as u64;
        loop {
            let p = self.progress();
            crate::report::progress_line(&format!(
                "{label}: {}/{total} settled, {} usable",
                p.settled, p.usable
            ));
            if p.settled >= total || start.elapsed() >= limit {
                crate::report::progress_done();
                return p;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Tell every worker to stop and collect their results.
    pub fn stop(mut self) -> Finished {
        for h in &mut self.handles {
            if let Some(mut stdin) = h.stdin.take() {
                let _ = writeln!(stdin, "STOP");
            }
        }
        let mut tally = Tally::default();
        let mut dead = Vec::new();
        for (i, h) in self.handles.iter_mut().enumerate() {
            let _ = h.child.wait();
            // The reader thread may still be taking the last line.
            let deadline = Instant::now() + Duration::from_secs(2);
            let result = loop {
                if let Some(t) = h.result.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    break Some(t);
                }
                if Instant::now() >= deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            match result {
                Some(t) => tally.merge(&t),
                None => dead.push((i, h.connections)),
            }
        }
        Finished { tally, dead }
    }
}
