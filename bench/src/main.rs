//! herald-bench: a load tool for WebSocket push servers, herald first among them.
//!
//! The driver (this process) plans a scenario, starts worker processes that hold the
//! connections (`worker.rs`), publishes when the scenario needs it (`publish.rs`),
//! watches the server (`observe.rs`) and prints what happened (`report.rs`). Every
//! scenario is bounded in count and time and stops by itself.

mod client;
mod frames;
mod ids;
mod observe;
mod publish;
mod report;
mod stats;
mod worker;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::json;

use client::{Mode, ThreadPlan};
use observe::Observer;
use publish::Pace;
use report::Report;
use worker::{WorkerPlan, Workers};

/// Descriptors a worker keeps back from its connections.
const FD_RESERVE: u64 = 100;

#[derive(Parser, Debug)]
#[command(
    name = "herald-bench",
    version,
    about = "Load tool for WebSocket push servers: connect, idle, broadcast, echo, capacity, storm, deploy.",
    after_help = "Conventions: subscribers open /ws?topics=TOPIC and wait for {\"op\":\"subscribed\"}; \
                  publishes are POST /publish {\"topic\":..,\"data\":[send_ns,\"pad\"]}; echo uses /echo; \
                  storm --resume reconnects with &resume=TOPIC~LAST_ID~EPOCH (epoch and ids from \
                  {\"op\":\"subscribed\",..,\"epoch\":..,\"id\":..} and each message), and so does \
                  deploy, whose clients also honour {\"op\":\"reconnect\",\"after_ms\":X}. \
                  Pin server and tool to different cores, e.g. taskset -c 0 herald / taskset -c 1 herald-bench."
)]
struct Cli {
    /// The server, as ws://HOST:PORT
    #[arg(long, default_value = "ws://127.0.0.1:8080", global = true)]
    url: String,
    /// Topic for subscribe scenarios
    #[arg(long, default_value = "bench", global = true)]
    topic: String,
    /// Client source addresses: a comma list and/or ranges like 127.0.0.2-127.0.0.254
    /// [default: 127.0.0.2-127.0.0.254 for a loopback server]
    #[arg(long, global = true)]
    sources: Option<String>,
    /// Worker processes [default: as many as the open-files limit requires]
    #[arg(long, global = true)]
    workers: Option<usize>,
    /// Client threads per worker process, each with its own event loop
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    /// The server's PID, to read its CPU and RSS from /proc [default: its /metrics]
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Print one JSON object instead of a table
    #[arg(long, global = true)]
    json: bool,
    /// Also write the JSON object to this file (the table, or --json, still goes to stdout)
    #[arg(long, global = true, value_name = "PATH")]
    json_file: Option<std::path::PathBuf>,
    /// Offer permessage-deflate on every handshake, as Chromium does
    /// (`permessage-deflate; client_max_window_bits`), and inflate compressed frames; the
    /// report counts the connections that negotiated it and the wire bytes per delivery
    #[arg(long, global = true)]
    deflate: bool,
    /// A header line for every handshake, e.g. "Cookie: session=alice" (repeatable)
    #[arg(long = "header", global = true, value_name = "LINE")]
    headers: Vec<String>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Open N connections at a rate (or as fast as possible): handshakes/s and latency
    Connect {
        #[arg(short = 'n', long, default_value_t = 1000)]
        connections: usize,
        /// Connection attempts per second; 0 = as fast as possible
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Seconds to hold the connections once open
        #[arg(long, default_value_t = 1.0)]
        hold: f64,
        /// The handshake's path (e.g. /ws?token=JWT)
        #[arg(long, default_value = "/ws")]
        path: String,
    },
    /// Hold N subscribed connections: server memory per connection
    Idle {
        #[arg(short = 'n', long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 2.0)]
        hold: f64,
    },
    /// N subscribers, a publisher at a rate (or ramping): deliveries/s, latency, loss
    Broadcast {
        #[arg(short = 'n', long, default_value_t = 1000)]
        connections: usize,
        /// Publishes per second
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Ramp linearly from --rate to this over the run
        #[arg(long)]
        ramp_to: Option<f64>,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Bytes of data per message
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Publish this file's JSON (after the send time) instead of --payload bytes of
        /// padding: a realistic message, e.g. bench/payloads/quotes-1k.json
        #[arg(long, value_name = "PATH")]
        payload_file: Option<std::path::PathBuf>,
        /// Seconds to wait for stragglers after the last publish
        #[arg(long, default_value_t = 5.0)]
        drain: f64,
        /// One publish at a time, as a web request handler that waits for its publish
        /// would: the next is sent once the previous reply has come and not before it is
        /// due, so --rate is a ceiling and a slow server lowers the rate achieved
        /// (publishes due meanwhile, beyond the one sent when the reply comes, are
        /// skipped and reported)
        #[arg(long)]
        sequential: bool,
    },
    /// C clients in a closed loop on /echo: messages/s and round trips
    Echo {
        #[arg(short = 'c', long, default_value_t = 50)]
        clients: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// Add subscribers step by step until 95% of broadcasts no longer reach everyone
    /// within the bound: the largest N that met it
    Capacity {
        #[arg(long, default_value_t = 1000)]
        step: usize,
        #[arg(long, default_value_t = 20_000)]
        max: usize,
        #[arg(long, default_value_t = 500)]
        bound_ms: u64,
        /// Publishes per second during each step
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Publishes per step
        #[arg(long, default_value_t = 40)]
        messages: u64,
    },
    /// N clients connected while the server restarts: time until all are back, and the
    /// messages published meanwhile that they missed
    Storm {
        #[arg(short = 'n', long, default_value_t = 1000)]
        connections: usize,
        /// Command that restarts the server (run with sh -c); without it, restart the
        /// server yourself within --timeout
        #[arg(long)]
        restart: Option<String>,
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        /// Publishes per second throughout
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Clients keep each topic's epoch and last id and reconnect with
        /// ?resume=TOPIC~ID~EPOCH; the report adds duplicates, recovered resumes, epoch
        /// changes and the time until every resumed client has caught up
        #[arg(long)]
        resume: bool,
        /// Longest reconnect backoff (full jitter below it): lower it to bring the
        /// clients back nearer at once, to measure the cost of a herd resuming
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..))]
        max_backoff_ms: u64,
    },
    /// Measure a deploy: N subscribers through --url (HAProxy's, say), a publisher at R/s
    /// on --publish-url, and a restart command (rolling, or plain) once they are settled:
    /// refused connections, disconnects and the way back, the reconnect rate per second,
    /// messages missed and duplicated (clients resume, as storm --resume)
    Deploy {
        #[arg(short = 'n', long, default_value_t = 1000)]
        connections: usize,
        /// Publishes per second, before, during and after the restart
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// Where to publish (POST /publish): comma-separated http://HOST:PORT, in order of
        /// preference. The publisher stays on one until it refuses a connection, answers
        /// 502/503/504 or ends the connection, then moves to the next, and sends the
        /// publish again [default: --url's host and port]
        #[arg(long)]
        publish_url: Option<String>,
        /// Command that restarts the servers (run with sh -c, its output to stderr): a
        /// rolling restart, or a plain one. Without it, restart them yourself within
        /// --timeout
        #[arg(long)]
        restart: Option<String>,
        /// Seconds with every subscriber settled and the publisher running before the
        /// restart
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
        /// The longest the restart command may run (it is then stopped), and then the
        /// longest to wait for every client to be back
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
        /// Seconds of publishing after every client is back
        #[arg(long, default_value_t = 2.0)]
        after: f64,
        /// Send a publish again (refused connection, 502/503/504, or no reply before its
        /// connection ended) until this many seconds after it was due; then it is lost
        #[arg(long, default_value_t = 30.0)]
        retry_for: f64,
        /// Longest reconnect backoff after a failed attempt (full jitter below it). A
        /// client told {"op":"reconnect","after_ms":X} waits X ms plus up to 100 ms
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..))]
        max_backoff_ms: u64,
        /// Reconnect without waiting for the server's reconnect hints (to compare)
        #[arg(long)]
        ignore_hints: bool,
    },
    /// A live upgrade under load: N subscribers and a publisher at R/s, SIGUSR2 to the
    /// server's --pid after --at seconds: the pause (longest gap between deliveries),
    /// publish-to-receive latency, closes and losses
    Upgrade {
        #[arg(short = 'n', long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// The herald process to upgrade
        #[arg(long)]
        pid: u32,
        /// Seconds of publishing before SIGUSR2
        #[arg(long, default_value_t = 3.0)]
        at: f64,
        #[arg(long, default_value_t = 8.0)]
        duration: f64,
        #[arg(long, default_value_t = 64)]
        payload: usize,
    },
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        plan: String,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Scenario::Worker { plan } = &cli.scenario {
        match serde_json::from_str(plan) {
            Ok(plan) => worker::serve(plan),
            Err(e) => {
                eprintln!("herald-bench worker: bad plan: {e}");
                std::process::exit(2);
            }
        }
        return;
    }
    match run(&cli) {
        Ok(report) => {
            if let Some(path) = &cli.json_file
                && let Err(e) = report.save(path)
            {
                eprintln!("herald-bench: {}: {e}", path.display());
            }
            report.print(cli.json);
        }
        Err(e) => {
            eprintln!("herald-bench: {e}");
            std::process::exit(2);
        }
    }
}

struct Target {
    addr: SocketAddr,
    host: String,
}

fn target(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or("--url must be ws://HOST:PORT")?;
    let host = rest.split('/').next().unwrap_or(rest).to_string();
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolves to nothing"))?;
    Ok(Target { addr, host })
}

fn parse_sources(spec: Option<&str>, target: SocketAddr) -> Result<Vec<IpAddr>, String> {
    let Some(spec) = spec else {
        return Ok(if target.ip().is_loopback() && target.is_ipv4() {
            (2..=254)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
                .collect()
        } else {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        });
    };
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.split_once('-') {
            Some((a, b)) => {
                let a: Ipv4Addr = a.parse().map_err(|_| format!("bad address {a}"))?;
                let b: Ipv4Addr = b.parse().map_err(|_| format!("bad address {b}"))?;
                out.extend((u32::from(a)..=u32::from(b)).map(|n| IpAddr::V4(n.into())));
            }
            None => out.push(item.parse().map_err(|_| format!("bad address {item}"))?),
        }
    }
    if out.is_empty() {
        return Err("--sources names no address".into());
    }
    Ok(out)
}

/// Split `n` connections over worker processes and their threads.
struct Planner<'a> {
    cli: &'a Cli,
    target: &'a Target,
    sources: Vec<IpAddr>,
}

impl Planner<'_> {
    fn plans(
        &self,
        mode: Mode,
        path: &str,
        n: usize,
        rate: f64,
        reconnect: bool,
        bound_us: Option<u64>,
    ) -> Vec<WorkerPlan> {
        let per_process = (worker::raise_fd_limit().saturating_sub(FD_RESERVE) as usize).max(1);
        let workers = self.cli.workers.unwrap_or(n.div_ceil(per_process)).max(1);
        let threads = self.cli.threads.max(1);
        let slots = workers * threads;
        (0..workers)
            .map(|w| WorkerPlan {
                threads: (0..threads)
                    .map(|t| {
                        let slot = w * threads + t;
                        let share = n / slots + usize::from(slot < n % slots);
                        let mut sources = self.sources.clone();
                        let shift = slot % sources.len();
                        sources.rotate_left(shift);
                        ThreadPlan {
                            target: self.target.addr,
                            host: self.target.host.clone(),
                            path: path.to_string(),
                            mode,
                            connections: share,
                            rate: rate * share as f64 / n.max(1) as f64,
                            sources,
                            reconnect,
                            backoff_max_ms: 2000,
                            resume: None,
                            bound_us,
                            hints: false,
                            deflate: self.cli.deflate,
                            headers: self
                                .cli
                                .headers
                                .iter()
                                .map(|h| format!("{h}\r\n"))
                                .collect(),
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn run(cli: &Cli) -> Result<Report, String> {
    let target = target(&cli.url)?;
    let planner = Planner {
        cli,
        target: &target,
        sources: parse_sources(cli.sources.as_deref(), target.addr)?,
    };
    let observer = Observer::new(cli.server_pid, target.addr);
    let subscribe_path = format!("/ws?topics={}", cli.topic);
    let tool_start = stats::cpu_seconds();
    let mut report = match &cli.scenario {
        Scenario::Connect {
            connections,
            rate,
            hold,
            path,
        } => {
            let cpu_before = observer.sample();
            let workers = Workers::spawn(planner.plans(
                Mode::Connect,
                path,
                *connections,
                *rate,
                false,
                None,
            ));
            let limit = 60.0
                + if *rate > 0.0 {
                    *connections as f64 / rate
                } else {
                    0.0
                };
            workers.wait_settled(Duration::from_secs_f64(limit), "connect");
            // The server's CPU for the handshakes alone: sampled before the hold.
            let cpu_after = observer.sample();
            std::thread::sleep(Duration::from_secs_f64(*hold));
            let fin = workers.stop();
            let t = &fin.tally;
            let elapsed = match (t.first_attempt_ns, t.last_connected_ns) {
                (Some(a), Some(b)) if b > a => secs(b - a),
                _ => 0.0,
            };
            let mut r = Report::new("connect");
            r.add(
                "connections",
                format!("{} connected of {} attempted", t.connected, t.attempted),
                json!({"attempted": t.attempted, "connected": t.connected}),
            );
            r.add("failures", format!("{:?}", t.failures), json!(t.failures));
            r.add(
                "all connected in",
                format!("{elapsed:.3} s"),
                json!(elapsed),
            );
            let rate = if elapsed > 0.0 {
                t.connected as f64 / elapsed
            } else {
                0.0
            };
            r.add("handshakes/s", format!("{rate:.0}"), json!(rate));
            r.add_latency("handshake latency", &t.handshake_us);
            add_server_cpu(
                &mut r,
                cpu_before,
                cpu_after,
                t.connected as f64,
                "handshakes",
            );
            add_tool(&mut r, &fin, tool_start);
            r
        }
        Scenario::Idle { connections, hold } => {
            let before = observer.sample();
            let slab_before = slab_kib();
            let workers = Workers::spawn(planner.plans(
                Mode::Subscribe,
                &subscribe_path,
                *connections,
                0.0,
                false,
                None,
            ));
            let p = workers.wait_settled(Duration::from_secs(120), "idle");
            // Let allocations settle (queued confirmations written, buffers released).
            std::thread::sleep(Duration::from_secs(1));
            let after = observer.sample();
            let slab_after = slab_kib();
            std::thread::sleep(Duration::from_secs_f64(*hold));
            let fin = workers.stop();
            let mut r = Report::new("idle");
            r.add(
                "subscribed connections",
                p.usable.to_string(),
                json!(p.usable),
            );
            r.add(
                "failures",
                format!("{:?}", fin.tally.failures),
                json!(fin.tally.failures),
            );
            r.add(
                "server observed via",
                observer.describe(),
                json!(observer.describe()),
            );
            match (before.rss_bytes, after.rss_bytes) {
                (Some(a), Some(b)) if p.usable > 0 => {
                    let per = (b as f64 - a as f64) / p.usable as f64 / 1024.0;
                    r.add(
                        "server RSS",
                        format!("{} KiB -> {} KiB", a / 1024, b / 1024),
                        json!({"before_bytes": a, "after_bytes": b}),
                    );
                    r.add("server KiB per connection", format!("{per:.2}"), json!(per));
                }
                _ => r.add("server KiB per connection", "not observed", json!(null)),
            }
            // The kernel's socket memory is outside any RSS. Over loopback both ends of
            // every connection live on this host, so half the Slab growth is the server's.
            if let (Some(a), Some(b), true) =
                (slab_before, slab_after, target.addr.ip().is_loopback())
            {
                if p.usable > 0 {
                    let per = (b as f64 - a as f64) / (2.0 * p.usable as f64);
                    r.add(
                        "kernel KiB per socket",
                        format!("{per:.2} (estimate: Slab growth / 2N)"),
                        json!(per),
                    );
                }
            }
            add_tool(&mut r, &fin, tool_start);
            r
        }
        Scenario::Broadcast {
            connections,
            rate,
            ramp_to,
            duration,
            payload,
            payload_file,
            drain,
            sequential,
        } => {
            let pace = Pace {
                from: *rate,
                to: ramp_to.unwrap_or(*rate),
                duration: Duration::from_secs_f64(*duration),
            };
            let data = match payload_file {
                Some(path) => Some(read_payload(path)?),
                None => None,
            };
            broadcast(
                cli,
                &planner,
                &observer,
                &subscribe_path,
                *connections,
                pace,
                (*payload, data),
                *drain,
                *sequential,
                tool_start,
            )?
        }
        Scenario::Upgrade {
            connections,
            rate,
            pid,
            at,
            duration,
            payload,
        } => {
            let pace = Pace {
                from: *rate,
                to: *rate,
                duration: Duration::from_secs_f64(*duration),
            };
            let (pid, at) = (*pid, *at);
            let signal = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs_f64(at));
                std::process::Command::new("kill")
                    .args(["-USR2", &pid.to_string()])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            });
            let mut r = broadcast(
                cli,
                &planner,
                &observer,
                &subscribe_path,
                *connections,
                pace,
                (*payload, None),
                5.0,
                false,
                tool_start,
            )?;
            let signalled = signal.join().unwrap_or(false);
            r.scenario = "upgrade";
            r.json_scenario("upgrade");
            r.add(
                "signalled",
                format!(
                    "SIGUSR2 to {pid} after {at} s: {}",
                    if signalled { "sent" } else { "FAILED" }
                ),
                json!(signalled),
            );
            let (gap, closes) = r.upgrade_figures.unwrap_or_default();
            r.add(
                "pause",
                format!(
                    "{:.1} ms (longest gap between deliveries at one client thread)",
                    gap as f64 / 1e6
                ),
                json!(gap as f64 / 1e6),
            );
            r.add(
                "closes",
                format!("{closes} connections ended"),
                json!(closes),
            );
            r
        }
        Scenario::Echo {
            clients,
            size,
            duration,
        } => {
            let workers = Workers::spawn(planner.plans(
                Mode::Echo { size: *size },
                "/echo",
                *clients,
                0.0,
                false,
                None,
            ));
            workers.wait_settled(Duration::from_secs(60), "echo");
            let cpu0 = observer.sample();
            let (r0, t0) = (workers.progress().received, Instant::now());
            while t0.elapsed().as_secs_f64() < *duration {
                std::thread::sleep(Duration::from_millis(250));
                let rx = workers.progress().received - r0;
                report::progress_line(&format!(
                    "echo: {:.0} msg/s",
                    rx as f64 / t0.elapsed().as_secs_f64()
                ));
            }
            report::progress_done();
            let (r1, took) = (workers.progress().received, t0.elapsed().as_secs_f64());
            let cpu1 = observer.sample();
            let fin = workers.stop();
            let mut r = Report::new("echo");
            r.add(
                "clients",
                format!("{} connected", fin.tally.connected),
                json!(fin.tally.connected),
            );
            let per_sec = (r1 - r0) as f64 / took;
            r.add(
                "messages/s",
                format!("{per_sec:.0} ({size}-byte binary, closed loop)"),
                json!(per_sec),
            );
            r.add_latency("round trip", &fin.tally.rtt_us);
            add_server_cpu(&mut r, cpu0, cpu1, (r1 - r0) as f64, "messages");
            add_tool(&mut r, &fin, tool_start);
            r
        }
        Scenario::Capacity {
            step,
            max,
            bound_ms,
            rate,
            messages,
        } => capacity(
            &planner,
            &subscribe_path,
            cli,
            *step,
            *max,
            *bound_ms,
            *rate,
            *messages,
            tool_start,
        )?,
        Scenario::Storm {
            connections,
            restart,
            timeout,
            rate,
            resume,
            max_backoff_ms,
        } => storm(
            &planner,
            &observer,
            &subscribe_path,
            cli,
            StormPlan {
                n: *connections,
                restart: restart.as_deref(),
                timeout: *timeout,
                rate: *rate,
                resume: *resume,
                max_backoff_ms: *max_backoff_ms,
            },
            tool_start,
        )?,
        Scenario::Deploy {
            connections,
            rate,
            publish_url,
            restart,
            settle,
            timeout,
            after,
            retry_for,
            max_backoff_ms,
            ignore_hints,
        } => deploy(
            &planner,
            &observer,
            &subscribe_path,
            cli,
            DeployPlan {
                n: *connections,
                rate: *rate,
                publish: publish_targets(publish_url.as_deref(), target.addr)?,
                restart: restart.as_deref(),
                settle: *settle,
                timeout: *timeout,
                after: *after,
                retry_for: *retry_for,
                max_backoff_ms: *max_backoff_ms,
                hints: !*ignore_hints,
            },
            tool_start,
        )?,
        Scenario::Worker { .. } => unreachable!("handled in main"),
    };
    report.add("target", cli.url.clone(), json!(cli.url));
    Ok(report)
}

/// The kernel's slab memory (`Slab:` in /proc/meminfo), in KiB.
fn slab_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find(|l| l.starts_with("Slab:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn add_tool(r: &mut Report, fin: &worker::Finished, tool_start: f64) {
    let cpu = fin.tally.cpu_seconds + stats::cpu_seconds() - tool_start;
    r.add(
        "tool CPU",
        format!("{cpu:.2} s (driver and workers)"),
        json!(cpu),
    );
    if !fin.dead.is_empty() {
        let lost_conns: usize = fin.dead.iter().map(|(_, c)| c).sum();
        r.add(
            "dead workers",
            format!(
                "{:?}: their {lost_conns} connections reported nothing",
                fin.dead
            ),
            json!(fin.dead),
        );
    }
}

fn add_server_cpu(r: &mut Report, a: observe::Sample, b: observe::Sample, units: f64, what: &str) {
    if let (Some(x), Some(y)) = (a.cpu_seconds, b.cpu_seconds) {
        let per_million = if units > 0.0 {
            (y - x) / (units / 1e6)
        } else {
            0.0
        };
        r.add(
            "server CPU",
            format!("{:.2} s, {per_million:.3} s per million {what}", y - x),
            json!({"seconds": y - x, "per_million": per_million}),
        );
    }
    if let Some(rss) = b.rss_bytes {
        r.add("server RSS", format!("{} KiB", rss / 1024), json!(rss));
    }
}

/// Subscribers, then a paced publisher; every acknowledged publish is expected at every
/// subscriber, and what did not arrive is reported as lost.
#[allow(clippy::too_many_arguments)]
fn broadcast(
    cli: &Cli,
    planner: &Planner,
    observer: &Observer,
    path: &str,
    n: usize,
    pace: Pace,
    (payload, data): (usize, Option<String>),
    drain: f64,
    sequential: bool,
    tool_start: f64,
) -> Result<Report, String> {
    let workers = Workers::spawn(planner.plans(Mode::Subscribe, path, n, 0.0, false, None));
    let ready = workers.wait_settled(Duration::from_secs(120), "subscribe");
    if ready.usable == 0 {
        workers.stop();
        return Err("no subscriber could connect".into());
    }
    let subscribers = ready.usable;
    let cpu0 = observer.sample();
    eprintln!("publishing to {subscribers} subscribers");
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = publish::spawn_plan(
        publish::Plan {
            targets: vec![planner.target.addr],
            topic: cli.topic.clone(),
            payload,
            data,
            pace: pace.clone(),
            retry_for: None,
            sequential,
        },
        stop.clone(),
    );
    let start = Instant::now();
    while !publisher.is_finished() {
        std::thread::sleep(Duration::from_millis(250));
        let rx = workers.progress().received;
        report::progress_line(&format!(
            "broadcast: {:.0} deliveries/s",
            rx as f64 / start.elapsed().as_secs_f64()
        ));
    }
    let published = publisher.join().map_err(|_| "publisher panicked")?;
    let expected = published.acked * subscribers;
    let drain_start = Instant::now();
    while workers.progress().received < expected && drain_start.elapsed().as_secs_f64() < drain {
        std::thread::sleep(Duration::from_millis(20));
    }
    report::progress_done();
    let cpu1 = observer.sample();
    let fin = workers.stop();
    let t = &fin.tally;
    // From the first publish to the last message received: neither the publisher's own
    // wind-down nor the drain wait after the last delivery counts.
    let last = t.last_received_ns.unwrap_or(published.last_ns);
    let window = secs(last.saturating_sub(published.first_ns)).max(1e-9);
    let mut r = Report::new("broadcast");
    r.add("subscribers", subscribers.to_string(), json!(subscribers));
    let per_second = published.acked as f64 / window;
    let mode = if sequential {
        format!(
            "; sequential, {} skipped while a reply was awaited",
            published.skipped
        )
    } else {
        String::new()
    };
    r.add(
        "published",
        format!(
            "{} acknowledged, {} failed, at {per_second:.0}/s{mode}",
            published.acked, published.failed
        ),
        json!({
            "acked": published.acked,
            "failed": published.failed,
            "per_second": per_second,
            "sequential": sequential,
            "skipped": published.skipped,
            "max_in_flight": published.max_in_flight,
        }),
    );
    r.add_latency("publish response time", &published.response_us);
    r.add(
        "deliveries",
        format!("{} received of {expected} expected", t.received),
        json!({"received": t.received, "expected": expected}),
    );
    let lost = expected.saturating_sub(t.received);
    r.add(
        "lost",
        format!("{lost} (expected - received; {} id gaps seen)", t.gaps),
        json!(lost),
    );
    let per_sec = t.received as f64 / window;
    r.add("deliveries/s", format!("{per_sec:.0}"), json!(per_sec));
    r.add_latency("publish-to-receive latency", &t.latency_us);
    add_wire(&mut r, t, subscribers, cli.deflate);
    add_server_cpu(&mut r, cpu0, cpu1, t.received as f64, "deliveries");
    add_tool(&mut r, &fin, tool_start);
    r.upgrade_figures = Some((t.max_gap_ns, t.disconnects));
    Ok(r)
}

/// A `--payload-file`: JSON, on one line (it goes into the publish body as it is).
fn read_payload(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    Ok(value.to_string())
}

/// What the messages cost on the wire: frame bytes (header and payload as sent) per
/// delivery, and with --deflate how many connections negotiated it and how many
/// deliveries came compressed.
fn add_wire(r: &mut Report, t: &stats::Tally, subscribers: u64, deflate: bool) {
    if t.received > 0 {
        let per = t.message_bytes as f64 / t.received as f64;
        r.add(
            "wire bytes per delivery",
            format!("{per:.1} (message frames, header and payload as sent)"),
            json!(per),
        );
    }
    if deflate {
        r.add(
            "permessage-deflate",
            format!(
                "negotiated by {} of {subscribers}; {} of {} deliveries compressed",
                t.deflate_negotiated, t.compressed, t.received
            ),
            json!({
                "negotiated": t.deflate_negotiated,
                "compressed": t.compressed,
                "received": t.received,
            }),
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn capacity(
    planner: &Planner,
    path: &str,
    cli: &Cli,
    step: usize,
    max: usize,
    bound_ms: u64,
    rate: f64,
    messages: u64,
    tool_start: f64,
) -> Result<Report, String> {
    let mut best = 0usize;
    let mut steps = Vec::new();
    let mut n = step.max(1);
    let mut tool_cpu = 0.0;
    while n <= max {
        let workers = Workers::spawn(planner.plans(
            Mode::Subscribe,
            path,
            n,
            0.0,
            false,
            Some(bound_ms * 1000),
        ));
        let ready = workers.wait_settled(Duration::from_secs(120), &format!("capacity {n}"));
        let stop = Arc::new(AtomicBool::new(false));
        let pace = Pace {
            from: rate,
            to: rate,
            duration: Duration::from_secs_f64(messages as f64 / rate),
        };
        let published = publish::run(planner.target.addr, &cli.topic, 64, &pace, &stop);
        let expected = published.acked * ready.usable;
        let t0 = Instant::now();
        while workers.progress().received < expected
            && t0.elapsed() < Duration::from_millis(2000 + bound_ms)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let fin = workers.stop();
        tool_cpu += fin.tally.cpu_seconds;
        let everyone = fin
            .tally
            .within_bound
            .values()
            .filter(|&&c| c >= n as u64)
            .count() as u64;
        let share = if published.acked > 0 {
            everyone as f64 / published.acked as f64
        } else {
            0.0
        };
        let p99 = report::percentiles(&fin.tally.latency_us)["p99_ms"].clone();
        eprintln!(
            "capacity: {n} subscribers ({} usable): {:.1}% of broadcasts reached all within {bound_ms} ms, p99 {p99} ms",
            ready.usable,
            share * 100.0
        );
        steps.push(json!({"subscribers": n, "usable": ready.usable, "share_within_bound": share, "p99_ms": p99}));
        if share < 0.95 || ready.usable < n as u64 {
            break;
        }
        best = n;
        n += step;
    }
    let mut r = Report::new("capacity");
    r.add(
        "largest N within bound",
        format!("{best} subscribers (95% of broadcasts reach all within {bound_ms} ms)"),
        json!(best),
    );
    r.add("steps", format!("{} measured", steps.len()), json!(steps));
    let cpu = tool_cpu + stats::cpu_seconds() - tool_start;
    r.add("tool CPU", format!("{cpu:.2} s"), json!(cpu));
    Ok(r)
}

/// What `storm` was asked to do.
struct StormPlan<'a> {
    n: usize,
    restart: Option<&'a str>,
    timeout: f64,
    rate: f64,
    resume: bool,
    max_backoff_ms: u64,
}

fn storm(
    planner: &Planner,
    observer: &Observer,
    path: &str,
    cli: &Cli,
    plan: StormPlan,
    tool_start: f64,
) -> Result<Report, String> {
    let StormPlan {
        n,
        restart,
        timeout,
        rate,
        resume,
        max_backoff_ms,
    } = plan;
    let workers = Workers::spawn(reconnecting_plans(
        planner,
        path,
        n,
        resume.then_some(cli.topic.as_str()),
        max_backoff_ms,
        false,
    ));
    let ready = workers.wait_settled(Duration::from_secs(120), "storm: connecting");
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Pace {
        from: rate,
        to: rate,
        duration: Duration::from_secs_f64(timeout + 5.0),
    };
    let publisher = publish::spawn(
        planner.target.addr,
        cli.topic.clone(),
        64,
        pace,
        stop.clone(),
    );
    std::thread::sleep(Duration::from_secs(1));
    match restart {
        Some(cmd) => {
            eprintln!("storm: restarting the server: {cmd}");
            let status = std::process::Command::new("sh")
                .args(["-c", cmd])
                .status()
                .map_err(|e| format!("{cmd}: {e}"))?;
            if !status.success() {
                eprintln!("storm: restart command exited with {status}");
            }
        }
        None => eprintln!("storm: restart the server now (waiting up to {timeout} s)"),
    }
    let mut lowest = ready.usable;
    let recovered = wait_all_back(
        &workers,
        ready.usable,
        Duration::from_secs_f64(timeout),
        "storm",
        true,
        &mut lowest,
    );
    // A second of traffic with everyone back, then count.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let published = publisher.join().map_err(|_| "publisher panicked")?;
    let expected = published.acked * ready.usable;
    let fin = finish_deliveries(workers, &published, expected, resume);
    let t = &fin.tally;
    let mut r = Report::new("storm");
    r.add(
        "clients",
        format!("{} subscribed before the restart", ready.usable),
        json!(ready.usable),
    );
    add_way_back(&mut r, t, recovered, timeout, resume);
    add_published(&mut r, &published);
    if !resume {
        let lost = expected.saturating_sub(t.received);
        r.add(
            "missed across the restart",
            format!("{lost} of {expected} deliveries (published while clients were away)"),
            json!(lost),
        );
    } else {
        add_resume(&mut r, t, expected, recovered);
    }
    r.add(
        "server observed via",
        observer.describe(),
        json!(observer.describe()),
    );
    add_tool(&mut r, &fin, tool_start);
    Ok(r)
}

/// Subscribers that reconnect whenever their connection ends (storm, deploy), with
/// backoff up to `max_backoff_ms`; with `resume`, each keeps the topic's epoch and last
/// id and resumes from there; with `hints`, each honours the server's reconnect hint.
fn reconnecting_plans(
    planner: &Planner,
    path: &str,
    n: usize,
    resume: Option<&str>,
    max_backoff_ms: u64,
    hints: bool,
) -> Vec<WorkerPlan> {
    let mut plans = planner.plans(Mode::Subscribe, path, n, 0.0, true, None);
    for t in plans.iter_mut().flat_map(|p| p.threads.iter_mut()) {
        t.backoff_max_ms = max_backoff_ms;
        t.resume = resume.map(str::to_string);
        t.hints = hints;
    }
    plans
}

/// Wait (up to `limit`) until every one of the `ready` clients is subscribed again: after
/// at least one was seen away when `need_dip` (the restart is still to come or under
/// way), or at once when everyone is there. `lowest` keeps the fewest seen subscribed.
fn wait_all_back(
    workers: &Workers,
    ready: u64,
    limit: Duration,
    label: &str,
    need_dip: bool,
    lowest: &mut u64,
) -> bool {
    let start = Instant::now();
    let mut went_down = !need_dip;
    let recovered = loop {
        let p = workers.progress();
        *lowest = (*lowest).min(p.usable);
        went_down |= p.usable < ready;
        report::progress_line(&format!("{label}: {}/{ready} subscribed", p.usable));
        if went_down && p.usable >= ready {
            break true;
        }
        if start.elapsed() > limit {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    report::progress_done();
    recovered
}

/// Once the publisher has stopped: wait for the `expected` deliveries (longer when
/// resumed clients may still be replaying what they missed), give every client the
/// acknowledged ids to be checked against (unless they mix epochs), stop the workers.
fn finish_deliveries(
    mut workers: Workers,
    published: &publish::Published,
    expected: u64,
    resume: bool,
) -> worker::Finished {
    let drain = Duration::from_secs(if resume { 10 } else { 3 });
    let t0 = Instant::now();
    while {
        let p = workers.progress();
        p.received.saturating_sub(p.duplicates) < expected
    } && t0.elapsed() < drain
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    if resume && !published.acked_ids.is_empty() && published.id_resets == 0 {
        workers.tell_acked(&published.acked_ids);
    }
    workers.stop()
}

/// storm's and deploy's rows on the way back: disconnects, failed attempts, the time
/// until all were back, and when the reconnections came.
fn add_way_back(r: &mut Report, t: &stats::Tally, recovered: bool, timeout: f64, resume: bool) {
    r.add(
        "disconnects",
        t.disconnects.to_string(),
        json!(t.disconnects),
    );
    r.add(
        "failures",
        format!(
            "{:?} (connection attempts, first ones and reconnects)",
            t.failures
        ),
        json!(t.failures),
    );
    let back = match (t.first_disconnect_ns, t.last_subscribed_ns) {
        (Some(a), Some(b)) if recovered && b > a => Some(secs(b - a)),
        _ => None,
    };
    r.add(
        "all back within",
        back.map_or_else(
            || {
                if t.disconnects == 0 && recovered {
                    "no client was disconnected".to_string()
                } else {
                    format!("not all back within {timeout} s")
                }
            },
            |s| {
                if resume {
                    format!("{s:.3} s after the first disconnect (the last subscribed reply)")
                } else {
                    format!("{s:.3} s after the first disconnect")
                }
            },
        ),
        json!(back),
    );
    match (t.first_disconnect_ns, t.first_resubscribed_ns) {
        (Some(down), Some(first)) if first > down => {
            let last = t.last_subscribed_ns.unwrap_or(first).max(first);
            let (a, b) = (secs(first - down), secs(last - down));
            r.add(
                "reconnections",
                format!(
                    "{} subscribed again, the first {a:.3} s and the last {b:.3} s after the first disconnect ({:.3} s apart)",
                    t.resubscribed,
                    b - a
                ),
                json!({"resubscribed": t.resubscribed, "first_s": a, "last_s": b, "spread_s": b - a}),
            );
        }
        _ => r.add(
            "reconnections",
            format!("{} subscribed again", t.resubscribed),
            json!({"resubscribed": t.resubscribed}),
        ),
    }
}

/// What the publisher did, as storm and deploy report it.
fn add_published(r: &mut Report, published: &publish::Published) {
    r.add(
        "published",
        format!(
            "{} acknowledged, {} refused or failed during the restart ({} found no connection, {} answered 503; {} connections)",
            published.acked,
            published.failed,
            published.no_connection,
            published.unavailable,
            published.connections
        ),
        json!({
            "acked": published.acked,
            "failed": published.failed,
            "no_connection": published.no_connection,
            "unavailable": published.unavailable,
            "connections": published.connections,
            "acked_ids": published.acked_ids.len(),
            "last_acked_id": published.acked_ids.max(),
            "id_resets": published.id_resets,
        }),
    );
    r.add_latency("publish response time", &published.response_us);
}

/// Deliveries missed by resuming clients.
struct Missed {
    /// The greater of the two counts below.
    missed: u64,
    /// Expected deliveries minus unique ones received.
    by_count: u64,
    /// Acknowledged ids never received, over the clients that could be checked.
    by_id: Option<u64>,
    /// Deliveries received, duplicates not counted.
    unique: u64,
}

/// Two lower bounds on what was missed; neither can hide the other. By count, a delivery
/// of a publish whose reply was lost would offset a miss; by id, only clients that stayed
/// in one epoch can be checked.
fn missed(t: &stats::Tally, expected: u64) -> Missed {
    let rt = &t.resume;
    let unique = t.received.saturating_sub(rt.duplicates);
    let by_count = expected.saturating_sub(unique);
    let by_id = (rt.checked > 0).then_some(rt.missed_by_id);
    Missed {
        missed: by_count.max(by_id.unwrap_or(0)),
        by_count,
        by_id,
        unique,
    }
}

/// storm --resume's rows: misses counted two ways, duplicates, how resumes were answered,
/// and the time until every resumed client had caught up.
fn add_resume(r: &mut Report, t: &stats::Tally, expected: u64, all_back: bool) {
    let rt = &t.resume;
    let Missed {
        missed,
        by_count,
        by_id,
        unique,
    } = missed(t, expected);
    r.add(
        "missed across the restart",
        format!(
            "{missed} of {expected} deliveries (by id: {}; by count: {by_count}, expected - received + duplicates)",
            match by_id {
                Some(m) => format!(
                    "{m} acknowledged ids never received, over {} clients{}",
                    rt.checked,
                    if rt.unchecked > 0 {
                        format!(" ({} not checked: their epoch changed)", rt.unchecked)
                    } else {
                        String::new()
                    }
                ),
                None => "not checked (no ids in the publish replies, or they started over)".into(),
            }
        ),
        json!(missed),
    );
    r.add(
        "missed, by id and by count",
        format!(
            "{} by id, {by_count} by count",
            by_id.map_or_else(|| "unchecked".to_string(), |m| m.to_string())
        ),
        json!({
            "by_id": by_id,
            "by_count": by_count,
            "checked_clients": rt.checked,
            "unchecked_clients": rt.unchecked,
            "received": t.received,
            "unique": unique,
        }),
    );
    r.add(
        "duplicate deliveries",
        format!(
            "{} (the same topic, epoch and id received twice by one client)",
            rt.duplicates
        ),
        json!(rt.duplicates),
    );
    r.add(
        "resumes",
        format!(
            "{} recovered:true, {} recovered:false, {} with no \"recovered\" in the reply",
            rt.recovered, rt.not_recovered, rt.unanswered
        ),
        json!({"recovered": rt.recovered, "not_recovered": rt.not_recovered, "unanswered": rt.unanswered}),
    );
    r.add(
        "epoch changes seen",
        format!(
            "{} (subscribed replies naming another epoch than the client's)",
            rt.epoch_changes
        ),
        json!(rt.epoch_changes),
    );
    r.add(
        "subscribed without epoch",
        if rt.no_epoch > 0 {
            format!(
                "{}: the server does not support resume; those clients came back without it",
                rt.no_epoch
            )
        } else {
            "0".to_string()
        },
        json!(rt.no_epoch),
    );
    let answered = rt.answered();
    let caught_up = match (t.first_disconnect_ns, rt.last_caught_up_ns) {
        (Some(a), Some(b)) if all_back && answered > 0 && rt.caught_up >= answered && b > a => {
            Some(secs(b - a))
        }
        _ => None,
    };
    r.add(
        "all caught up within",
        caught_up.map_or_else(
            || format!("{} of {answered} resumes caught up", rt.caught_up),
            |s| {
                format!(
                    "{s:.3} s after the first disconnect (every resume had reached the id its subscribed reply named)"
                )
            },
        ),
        json!(caught_up),
    );
    r.add_latency("catch-up after resume", &rt.catch_up_us);
}

/// What `deploy` was asked to do.
struct DeployPlan<'a> {
    n: usize,
    rate: f64,
    publish: Vec<SocketAddr>,
    restart: Option<&'a str>,
    settle: f64,
    timeout: f64,
    after: f64,
    retry_for: f64,
    max_backoff_ms: u64,
    hints: bool,
}

/// `--publish-url`: comma-separated `http://HOST:PORT` (or `ws://`, or bare HOST:PORT).
fn publish_targets(spec: Option<&str>, default: SocketAddr) -> Result<Vec<SocketAddr>, String> {
    let Some(spec) = spec else {
        return Ok(vec![default]);
    };
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let rest = ["http://", "ws://"]
            .iter()
            .find_map(|p| item.strip_prefix(p))
            .unwrap_or(item);
        let host = rest.split('/').next().unwrap_or(rest);
        let addr = host
            .to_socket_addrs()
            .map_err(|e| format!("--publish-url {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("--publish-url {host} resolves to nothing"))?;
        out.push(addr);
    }
    if out.is_empty() {
        return Err("--publish-url names no server".into());
    }
    Ok(out)
}

/// How the restart command went.
struct RestartRun {
    /// Its exit code (None: killed by a signal, or stopped at the timeout).
    code: Option<i32>,
    timed_out: bool,
    started_ns: u64,
    ended_ns: u64,
}

/// Run `cmd` with `sh -c` in a process group of its own, its output on our stderr (the
/// JSON report owns stdout), for at most `limit`; past that the group gets SIGTERM, then
/// SIGKILL. `lowest` keeps the fewest clients seen subscribed meanwhile.
fn run_restart(
    cmd: &str,
    limit: Duration,
    workers: &Workers,
    ready: u64,
    lowest: &mut u64,
) -> Result<RestartRun, String> {
    use std::os::fd::AsFd;
    use std::os::unix::process::CommandExt;
    let stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("stderr: {e}"))?;
    let started_ns = stats::now_ns();
    let mut child = std::process::Command::new("sh")
        .args(["-c", cmd])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(stderr))
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{cmd}: {e}"))?;
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(e) => {
                eprintln!("deploy: waiting for the restart command: {e}");
                break None;
            }
        }
        let p = workers.progress();
        *lowest = (*lowest).min(p.usable);
        report::progress_line(&format!(
            "deploy: restarting ({:.0} s): {}/{ready} subscribed",
            start.elapsed().as_secs_f64(),
            p.usable
        ));
        if start.elapsed() > limit && !timed_out {
            timed_out = true;
            eprintln!("deploy: the restart command ran past {limit:?}: stopping it");
            // SAFETY: kill(2) on the process group this function created for the command.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
        }
        if start.elapsed() > limit + Duration::from_secs(5) {
            // SAFETY: as above.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    report::progress_done();
    Ok(RestartRun {
        code: status.and_then(|s| s.code()),
        timed_out,
        started_ns,
        ended_ns: stats::now_ns(),
    })
}

/// A per-second curve of events, from its first non-empty second to its last.
struct Curve {
    /// The first second's offset from the reference time, and the counts from there.
    first_s: i64,
    per_second: Vec<u64>,
}

impl Curve {
    /// `buckets` (100 ms, `stats::BUCKET_NS`) summed per second counted from `t0_ns`.
    fn new(buckets: &std::collections::BTreeMap<u64, u64>, t0_ns: u64) -> Curve {
        let base = (t0_ns / stats::BUCKET_NS) as i64;
        let per_bucket = (1_000_000_000 / stats::BUCKET_NS) as i64;
        let mut seconds = std::collections::BTreeMap::<i64, u64>::new();
        for (&b, &n) in buckets {
            if n > 0 {
                *seconds
                    .entry((b as i64 - base).div_euclid(per_bucket))
                    .or_default() += n;
            }
        }
        let (Some(&first), Some(&last)) = (seconds.keys().next(), seconds.keys().next_back())
        else {
            return Curve {
                first_s: 0,
                per_second: Vec::new(),
            };
        };
        Curve {
            first_s: first,
            per_second: (first..=last)
                .map(|s| seconds.get(&s).copied().unwrap_or(0))
                .collect(),
        }
    }

    fn total(&self) -> u64 {
        self.per_second.iter().sum()
    }

    /// (peak, the second it was in)
    fn peak(&self) -> (u64, i64) {
        self.per_second
            .iter()
            .enumerate()
            .max_by_key(|&(i, &n)| (n, std::cmp::Reverse(i)))
            .map_or((0, 0), |(i, &n)| (n, self.first_s + i as i64))
    }

    /// Mean per second over the whole curve (first to last non-empty second), and over
    /// the non-empty seconds only.
    fn means(&self) -> (Option<f64>, Option<f64>) {
        let total = self.total() as f64;
        let active = self.per_second.iter().filter(|&&n| n > 0).count();
        let mean = (!self.per_second.is_empty()).then(|| total / self.per_second.len() as f64);
        let active_mean = (active > 0).then(|| total / active as f64);
        (mean, active_mean)
    }

    /// One line per second: offset, count, a bar scaled to the peak.
    fn histogram(&self, width: usize) -> Vec<String> {
        let (peak, _) = self.peak();
        self.per_second
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let bar = if peak > 0 {
                    (n as usize * width).div_ceil(peak as usize)
                } else {
                    0
                };
                format!(
                    "{:>+4} s {n:>6} {}",
                    self.first_s + i as i64,
                    "#".repeat(bar)
                )
            })
            .collect()
    }

    fn json(&self) -> serde_json::Value {
        let (peak, peak_at) = self.peak();
        let (mean, active_mean) = self.means();
        let ratio = |m: Option<f64>| m.filter(|&m| m > 0.0).map(|m| peak as f64 / m);
        json!({
            "first_s": self.first_s,
            "per_second": self.per_second,
            "total": self.total(),
            "peak": peak,
            "peak_at_s": peak_at,
            "seconds": self.per_second.len(),
            "mean": mean,
            "peak_over_mean": ratio(mean),
            "active_seconds": self.per_second.iter().filter(|&&n| n > 0).count(),
            "active_mean": active_mean,
            "active_peak_over_mean": ratio(active_mean),
        })
    }
}

fn deploy(
    planner: &Planner,
    observer: &Observer,
    path: &str,
    cli: &Cli,
    plan: DeployPlan,
    tool_start: f64,
) -> Result<Report, String> {
    let DeployPlan {
        n,
        rate,
        publish,
        restart,
        settle,
        timeout,
        after,
        retry_for,
        max_backoff_ms,
        hints,
    } = plan;
    for (flag, v) in [
        ("--settle", settle),
        ("--timeout", timeout),
        ("--after", after),
        ("--retry-for", retry_for),
    ] {
        if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) {
            return Err(format!("{flag} must be between 0 and 86400 seconds"));
        }
    }
    if !(rate.is_finite() && rate > 0.0 && rate <= 1e6) {
        return Err("--rate must be above 0 (and at most 1000000)".into());
    }
    let workers = Workers::spawn(reconnecting_plans(
        planner,
        path,
        n,
        Some(&cli.topic),
        max_backoff_ms,
        hints,
    ));
    let ready = workers.wait_settled(Duration::from_secs(120), "deploy: subscribing");
    if ready.usable == 0 {
        workers.stop();
        return Err(format!("no subscriber could connect through {}", cli.url));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = publish::spawn_plan(
        publish::Plan {
            targets: publish.clone(),
            topic: cli.topic.clone(),
            payload: 64,
            data: None,
            pace: Pace {
                from: rate,
                to: rate,
                // Ends by `stop`; this only bounds it.
                duration: Duration::from_secs_f64(settle + 2.0 * timeout + after + 10.0),
            },
            retry_for: Some(Duration::from_secs_f64(retry_for)),
            sequential: false,
        },
        stop.clone(),
    );
    eprintln!(
        "deploy: {} subscribed, publishing {rate}/s to {publish:?}",
        ready.usable
    );
    std::thread::sleep(Duration::from_secs_f64(settle));
    let limit = Duration::from_secs_f64(timeout);
    let mut lowest = ready.usable;
    let command = match restart {
        Some(cmd) => {
            eprintln!("deploy: restarting: {cmd}");
            Some(run_restart(
                cmd,
                limit,
                &workers,
                ready.usable,
                &mut lowest,
            )?)
        }
        None => {
            eprintln!("deploy: restart the servers now (waiting up to {timeout} s)");
            None
        }
    };
    let recovered = wait_all_back(
        &workers,
        ready.usable,
        limit,
        "deploy: coming back",
        command.is_none(),
        &mut lowest,
    );
    std::thread::sleep(Duration::from_secs_f64(after));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let published = publisher.join().map_err(|_| "publisher panicked")?;
    let expected = published.acked * ready.usable;
    let fin = finish_deliveries(workers, &published, expected, true);
    let t = &fin.tally;
    let rt = &t.reconnect;

    let mut r = Report::new("deploy");
    r.add(
        "clients",
        format!(
            "{} subscribed before the restart ({n} asked for)",
            ready.usable
        ),
        json!(ready.usable),
    );
    if let Some(c) = &command {
        let took = secs(c.ended_ns - c.started_ns);
        r.add(
            "restart",
            format!(
                "{}: {} after {took:.1} s",
                restart.unwrap_or(""),
                match (c.timed_out, c.code) {
                    (true, _) => format!("stopped at the {timeout} s timeout"),
                    (false, Some(code)) => format!("exited {code}"),
                    (false, None) => "killed by a signal".to_string(),
                }
            ),
            json!({"command": restart, "exit_code": c.code, "timed_out": c.timed_out, "seconds": took}),
        );
    }
    // Refused: a TCP refusal, or a handshake answered with something else than 101 (a
    // proxy with no server to send it to answers 503).
    let tcp_refused = t.failures.get("refused").copied().unwrap_or(0);
    let rejected: std::collections::BTreeMap<&str, u64> = t
        .failures
        .iter()
        .filter_map(|(k, &v)| Some((k.strip_prefix("rejected ")?, v)))
        .collect();
    let sub_refused = tcp_refused + rejected.values().sum::<u64>();
    let sub_failed: u64 = t.failures.values().sum();
    r.add(
        "refused, subscribers",
        format!(
            "{sub_refused} of {} connection attempts ({tcp_refused} refused by TCP, rejected by HTTP status: {rejected:?}); {sub_failed} failed in all",
            t.attempted
        ),
        json!({"refused": sub_refused, "tcp_refused": tcp_refused, "rejected": rejected, "failed": sub_failed, "attempted": t.attempted}),
    );
    let pub_refused = published.refused + published.unavailable;
    r.add(
        "refused, publishers",
        format!(
            "{pub_refused}: {} connections refused, {} publishes answered 503 ({} other connection failures, {} requests unanswered as their connection ended); {} sent again, {} acknowledged after a resend, {} never acknowledged",
            published.refused,
            published.unavailable,
            published.no_connection - published.refused,
            published.unanswered,
            published.retries,
            published.retried_acked,
            published.failed
        ),
        json!({
            "refused": pub_refused,
            "connections_refused": published.refused,
            "answered_503": published.unavailable,
            "connection_failures": published.no_connection,
            "unanswered": published.unanswered,
            "resent": published.retries,
            "acked_after_resend": published.retried_acked,
            "never_acked": published.failed,
            "longest_wait_s": secs(published.longest_wait_ns),
            "failovers": published.failovers,
            "acked_by_target": publish
                .iter()
                .zip(&published.acked_by_target)
                .map(|(a, n)| (a.to_string(), *n))
                .collect::<std::collections::BTreeMap<_, _>>(),
        }),
    );
    add_way_back(&mut r, t, recovered, timeout, true);
    r.add(
        "most away at once",
        format!(
            "{} of {} clients (sampled every 100 ms)",
            ready.usable - lowest,
            ready.usable
        ),
        json!(ready.usable - lowest),
    );
    let by_count: std::collections::BTreeMap<String, u64> = rt
        .clients_by_disconnects
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    r.add(
        "clients by disconnects",
        by_count
            .iter()
            .map(|(k, v)| format!("{v} disconnected {k}x"))
            .collect::<Vec<_>>()
            .join(", "),
        json!(by_count),
    );
    r.add(
        "reconnect hints",
        format!(
            "{} received{}; {} reconnects waited for one{}{}",
            rt.hints,
            match (rt.hint_min_ms, rt.hint_max_ms) {
                (Some(a), Some(b)) => format!(" (after_ms {a}-{b})"),
                _ => String::new(),
            },
            rt.hinted_reconnects,
            rt.least_slack_ms.map_or(String::new(), |s| format!(
                ", the soonest {s} ms after its hint"
            )),
            if hints {
                format!(", {} early", rt.early)
            } else {
                " (--ignore-hints)".to_string()
            }
        ),
        json!({
            "received": rt.hints,
            "after_ms_min": rt.hint_min_ms,
            "after_ms_max": rt.hint_max_ms,
            "honoured": hints,
            "hinted_reconnects": rt.hinted_reconnects,
            "least_slack_ms": rt.least_slack_ms,
            "early": rt.early,
        }),
    );
    // The curves count seconds from the first disconnect (or the restart's start).
    let t0 = t
        .first_disconnect_ns
        .or(command.as_ref().map(|c| c.started_ns))
        .unwrap_or_else(stats::now_ns);
    let reconnects = Curve::new(&rt.resubscribed_at, t0);
    let (peak, peak_at) = reconnects.peak();
    let (mean, active_mean) = reconnects.means();
    let ratio = mean.filter(|&m| m > 0.0).map(|m| peak as f64 / m);
    let active_ratio = active_mean.filter(|&m| m > 0.0).map(|m| peak as f64 / m);
    let mut human = match (mean, ratio) {
        (Some(m), Some(q)) => format!(
            "peak {peak}/s at {peak_at:+} s, mean {m:.1}/s over {} s (peak/mean {q:.2}); over the {} s with any, mean {:.1}/s (peak/mean {:.2})",
            reconnects.per_second.len(),
            reconnects.per_second.iter().filter(|&&n| n > 0).count(),
            active_mean.unwrap_or(0.0),
            active_ratio.unwrap_or(0.0),
        ),
        _ => "no reconnection".to_string(),
    };
    for line in reconnects.histogram(40) {
        human.push('\n');
        human.push_str(&line);
    }
    let mut curve = reconnects.json();
    curve["histogram"] = json!(reconnects.histogram(40));
    r.add(
        "reconnect rate",
        format!("{human}\n(subscriptions confirmed after a disconnect, per second after the first disconnect)"),
        curve,
    );
    let attempts = Curve::new(&rt.attempts_at, t0);
    let closes = Curve::new(&rt.disconnects_at, t0);
    r.add(
        "reconnect attempts per second",
        format!(
            "peak {}/s; {:?} from {:+} s",
            attempts.peak().0,
            attempts.per_second,
            attempts.first_s
        ),
        attempts.json(),
    );
    r.add(
        "disconnects per second",
        format!(
            "peak {}/s; {:?} from {:+} s",
            closes.peak().0,
            closes.per_second,
            closes.first_s
        ),
        closes.json(),
    );
    add_published(&mut r, &published);
    add_resume(&mut r, t, expected, recovered);
    r.add(
        "delivered, never acknowledged",
        format!(
            "{} deliveries of ids the publisher never saw a 200 for, over {} clients (publishes the server ran but whose reply was lost: sent again, they arrived twice under two ids)",
            t.resume.unacked, t.resume.checked
        ),
        json!(t.resume.unacked),
    );
    r.add_latency("publish-to-receive latency", &t.latency_us);
    let missed = missed(t, expected).missed;
    let within = ratio.map(|q| q <= 2.0);
    r.add(
        "targets",
        format!(
            "0 refused: {} ({sub_refused} subscriber, {pub_refused} publisher); 0 missed: {} ({missed}); no second above 2x the mean: {}",
            met(sub_refused + pub_refused == 0),
            met(missed == 0 && published.failed == 0),
            within.map_or("no reconnections", met)
        ),
        json!({
            "zero_refused": sub_refused + pub_refused == 0,
            "zero_missed": missed == 0 && published.failed == 0,
            "peak_within_2x_mean": within,
        }),
    );
    r.add(
        "server observed via",
        observer.describe(),
        json!(observer.describe()),
    );
    add_tool(&mut r, &fin, tool_start);
    Ok(r)
}

fn met(yes: bool) -> &'static str {
    if yes { "met" } else { "NOT met" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_curve_sums_seconds_from_the_reference_and_measures_its_peak() {
        let t0 = 1_000 * stats::BUCKET_NS + 50_000_000; // inside bucket 1000
        let mut b = std::collections::BTreeMap::new();
        // Seconds +1 (two buckets), +2 nothing, +3.
        b.insert(1010, 3);
        b.insert(1019, 1);
        b.insert(1035, 8);
        let c = Curve::new(&b, t0);
        assert_eq!((c.first_s, c.per_second.clone()), (1, vec![4, 0, 8]));
        assert_eq!(c.peak(), (8, 3));
        let (mean, active) = c.means();
        assert_eq!((mean, active), (Some(4.0), Some(6.0)));
        let j = c.json();
        assert_eq!(j["peak_over_mean"], 2.0);
        assert_eq!(
            c.histogram(4),
            ["  +1 s      4 ##", "  +2 s      0 ", "  +3 s      8 ####"]
        );
        let empty = Curve::new(&std::collections::BTreeMap::new(), t0);
        assert_eq!(empty.means(), (None, None));
        assert!(empty.json()["peak_over_mean"].is_null());
    }

    #[test]
    fn publish_urls_are_a_list_of_servers() {
        let d: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(publish_targets(None, d).unwrap(), [d]);
        let l = publish_targets(Some("http://127.0.0.1:8081, 127.0.0.1:8082/publish"), d).unwrap();
        assert_eq!(
            l,
            [
                "127.0.0.1:8081".parse().unwrap(),
                "127.0.0.1:8082".parse::<SocketAddr>().unwrap()
            ]
        );
        assert!(publish_targets(Some(" , "), d).is_err());
    }
}
