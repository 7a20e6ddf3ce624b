//! `herald check`: can this host, and these deployment files, hold N connections? Reads
//! the live limits and sysctls (`Host::read`, the only I/O here besides reading the
//! files), then decides with pure functions: each finding says what was measured, what N
//! needs, and the exact command or config line that closes a gap.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{CheckArgs, Config, ListenFrom};
use crate::rlimit::{FD_RESERVE, default_max_connections};

/// Memory to budget per connection: herald's own ~0.4 KiB (README, measured) plus the
/// kernel's ~5 KiB per socket, with headroom for buffers of active connections.
const BYTES_PER_CONNECTION: u64 = 8 * 1024;
/// systemd's default hard RLIMIT_NOFILE for services (since v240) when a unit sets none.
const SYSTEMD_DEFAULT_NOFILE: u64 = 524_288;
/// supervisord's default `minfds` and `stopwaitsecs`.
const SUPERVISOR_DEFAULT_MINFDS: u64 = 1024;
const SUPERVISOR_DEFAULT_STOPWAIT: u64 = 10;
/// systemd's default TimeoutStopSec.
const SYSTEMD_DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(90);
/// HAProxy's defaults for a server's `weight` and `agent-inter`.
const HAPROXY_DEFAULT_WEIGHT: u64 = 1;
const HAPROXY_DEFAULT_AGENT_INTER: Duration = Duration::from_secs(2);
/// Below this `weight`, the agent's percentages lose too much to rounding: HAProxy sets
/// the weight to weight × N / 100 in integers, so at weight 1 anything under 100% is 0.
const HAPROXY_MIN_AGENT_WEIGHT: u64 = 10;

/// The host's limits, as read at this moment.
#[derive(Debug, Clone, Default)]
pub struct Host {
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    pub file_max: Option<u64>,
    pub nr_open: Option<u64>,
    pub somaxconn: Option<u64>,
    pub tcp_max_syn_backlog: Option<u64>,
    pub port_range: Option<(u64, u64)>,
    pub mem_available_kib: Option<u64>,
    pub mem_total_kib: Option<u64>,
    /// `net.ipv4.tcp_wmem`: a TCP socket's send buffer (min, default, max), in bytes; the
    /// kernel autotunes it between the last two unless SO_SNDBUF is set.
    pub tcp_wmem: Option<(u64, u64, u64)>,
    /// `net.core.wmem_max`: the cap on what SO_SNDBUF may ask for (before doubling).
    pub wmem_max: Option<u64>,
    /// `None`: the kernel has no such setting (before Linux 5.14).
    pub tcp_migrate_req: Option<u64>,
}

impl Host {
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux only
    pub fn read() -> Host {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit struct into the valid pointer we pass.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
        let sysctl = |name: &str| -> Option<String> {
            std::fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/"))).ok()
        };
        let number = |name: &str| sysctl(name).and_then(|s| s.trim().parse().ok());
        let port_range = sysctl("net.ipv4.ip_local_port_range").and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u64>().ok());
            Some((it.next()??, it.next()??))
        });
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let meminfo_kib = |key: &str| {
            meminfo
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        };
        let tcp_wmem = sysctl("net.ipv4.tcp_wmem").and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u64>().ok());
            Some((it.next()??, it.next()??, it.next()??))
        });
        Host {
            nofile_soft: if ok { lim.rlim_cur as u64 } else { 0 },
            nofile_hard: if ok { lim.rlim_max as u64 } else { 0 },
            file_max: number("fs.file-max"),
            nr_open: number("fs.nr_open"),
            somaxconn: number("net.core.somaxconn"),
            tcp_max_syn_backlog: number("net.ipv4.tcp_max_syn_backlog"),
            port_range,
            mem_available_kib: meminfo_kib("MemAvailable:"),
            mem_total_kib: meminfo_kib("MemTotal:"),
            tcp_wmem,
            wmem_max: number("net.core.wmem_max"),
            tcp_migrate_req: number("net.ipv4.tcp_migrate_req"),
        }
    }
}

/// herald's settings that the checks compare against: one herald process as its flags,
/// or a deployment file, run it.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub drain_timeout: Duration,
    pub drain_spread: Duration,
    pub ping_interval: Duration,
    pub backlog: u64,
    pub listen: SocketAddr,
    pub agent_listen: Option<SocketAddr>,
    pub reuse_port: bool,
    /// `--sndbuf`; `None`: the kernel's autotuned send buffers.
    pub sndbuf: Option<u64>,
    /// Whether `listen` came from `--listen`, `HOST`, `PORT` alone or the default.
    pub listen_from: ListenFrom,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            drain_timeout: cfg.drain_timeout,
            drain_spread: cfg.drain_spread,
            ping_interval: cfg.ping_interval,
            backlog: cfg.backlog.max(0) as u64,
            listen: cfg.listen,
            agent_listen: cfg.agent_listen,
            reuse_port: cfg.reuse_port,
            sndbuf: cfg.sndbuf.map(|b| b as u64),
            listen_from: cfg.listen_from,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Fail,
    /// Worth knowing; does not fail the check.
    Note,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub verdict: Verdict,
    pub what: String,
    /// Commands or config lines that close the gap.
    pub fix: Vec<String>,
}

impl Finding {
    fn ok(what: String) -> Finding {
        Finding {
            verdict: Verdict::Ok,
            what,
            fix: Vec::new(),
        }
    }
    fn fail(what: String, fix: Vec<String>) -> Finding {
        Finding {
            verdict: Verdict::Fail,
            what,
            fix,
        }
    }
    fn note(what: String) -> Finding {
        Finding::note_with(what, Vec::new())
    }
    fn note_with(what: String, fix: Vec<String>) -> Finding {
        Finding {
            verdict: Verdict::Note,
            what,
            fix,
        }
    }
    fn judge(good: bool, what: String, fix: Vec<String>) -> Finding {
        if good {
            Finding::ok(what)
        } else {
            Finding::fail(what, fix)
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Fail => "FAIL",
            Verdict::Note => "note",
        };
        write!(f, "{tag}  {}", self.what)?;
        for fix in &self.fix {
            write!(f, "\n        fix: {fix}")?;
        }
        Ok(())
    }
}

/// Descriptors herald needs for `n` connections.
fn fds_needed(n: u64) -> u64 {
    n + FD_RESERVE
}

/// The host's side: limits, sysctls, memory.
pub fn assess_host(host: &Host, n: u64, settings: &Settings) -> Vec<Finding> {
    let need = fds_needed(n);
    let mut out = Vec::new();
    out.push(Finding::judge(
        host.nofile_hard >= need,
        format!(
            "open files: hard limit {} for {need} descriptors ({n} connections + {FD_RESERVE} reserve); \
             herald raises its soft limit ({}) to the hard limit at start",
            host.nofile_hard, host.nofile_soft
        ),
        vec![
            format!("in a shell: ulimit -Hn {need} && ulimit -Sn {need}   (or: prlimit --pid <PID> --nofile={need}:{need})"),
            format!("systemd: LimitNOFILE={need}"),
            format!("supervisord: minfds={need} in [supervisord]"),
            format!("for login sessions: '* hard nofile {need}' in /etc/security/limits.conf"),
        ],
    ));
    if let Some(nr_open) = host.nr_open {
        out.push(Finding::judge(
            nr_open >= need,
            format!("fs.nr_open {nr_open} (the ceiling for any process's fd limit) for {need}"),
            vec![format!("sysctl -w fs.nr_open={}", need.max(1_048_576))],
        ));
    }
    if let Some(file_max) = host.file_max {
        // HAProxy on the same host holds two descriptors per client (client and server side).
        let system_need = need * 3;
        out.push(Finding::judge(
            file_max >= system_need,
            format!("fs.file-max {file_max} for {system_need} descriptors system-wide (herald, plus HAProxy's two per client)"),
            vec![format!("sysctl -w fs.file-max={}", system_need.max(2_097_152))],
        ));
    }
    if let Some(somaxconn) = host.somaxconn {
        out.push(Finding::judge(
            somaxconn >= settings.backlog,
            format!("net.core.somaxconn {somaxconn} for a listen backlog of {} (the kernel caps it silently)", settings.backlog),
            vec![format!("sysctl -w net.core.somaxconn={}", settings.backlog)],
        ));
    }
    if let Some(syn) = host.tcp_max_syn_backlog {
        out.push(Finding::judge(
            syn >= settings.backlog,
            format!(
                "net.ipv4.tcp_max_syn_backlog {syn} for a reconnect storm of {} pending handshakes",
                settings.backlog
            ),
            vec![format!(
                "sysctl -w net.ipv4.tcp_max_syn_backlog={}",
                settings.backlog
            )],
        ));
    }
    if let Some((lo, hi)) = host.port_range {
        let ports = hi.saturating_sub(lo) + 1;
        out.push(Finding::judge(
            ports >= n,
            format!(
                "net.ipv4.ip_local_port_range {lo}-{hi}: {ports} source ports per (proxy address, herald address) pair, \
                 for {n} proxied connections"
            ),
            vec![
                "sysctl -w net.ipv4.ip_local_port_range=\"10240 65535\"".to_string(),
                "past ~64,000: run herald on several ports, or give HAProxy several loopback source addresses (see haproxy/haproxy.cfg)".to_string(),
            ],
        ));
    }
    out.push(assess_migrate_req(
        host.tcp_migrate_req,
        settings.reuse_port,
    ));
    if let Some(kib) = host.mem_available_kib {
        let need_kib = n * BYTES_PER_CONNECTION / 1024;
        out.push(Finding::judge(
            kib >= need_kib,
            format!("memory: {} MiB available for about {} MiB ({} KiB per connection, herald and kernel)", kib / 1024, need_kib / 1024, BYTES_PER_CONNECTION / 1024),
            vec!["a larger host, or more hosts sharing topics through Redis".to_string()],
        ));
    }
    out.extend(assess_send_buffers(host, n, settings.sndbuf));
    out
}

/// Heroku's router closes a connection that has carried nothing for this long (its
/// documented idle timeout, which a WebSocket's pings reset).
const HEROKU_IDLE_TIMEOUT: Duration = Duration::from_secs(55);

/// The platforms (PaaS) `herald check` recognises, by the variable each sets in every
/// process it runs.
const PLATFORMS: &[(&str, &str)] = &[
    ("Heroku", "DYNO"),
    ("Fly.io", "FLY_APP_NAME"),
    ("Render", "RENDER"),
];

/// What the environment says about the platform herald runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Platform {
    /// The platform's name and its marker as `VAR=value`.
    pub name: Option<(&'static str, String)>,
    /// `PORT`, where the platform's router connects.
    pub port: Option<String>,
}

impl Platform {
    pub fn read(env: &dyn Fn(&str) -> Option<String>) -> Platform {
        let name = PLATFORMS.iter().find_map(|(name, var)| {
            env(var)
                .filter(|v| !v.is_empty())
                .map(|v| (*name, format!("{var}={v}")))
        });
        Platform {
            name,
            port: env("PORT").filter(|p| !p.is_empty()),
        }
    }
}

/// The platform's side: which one this is, whether its router can reach the address
/// herald binds, the connection budget its fd limit allows (a platform's limit is fixed
/// by the plan, so the fix is more processes), and its router's idle timeout against
/// `--ping-interval`.
pub fn assess_platform(p: &Platform, host: &Host, n: u64, settings: &Settings) -> Vec<Finding> {
    let mut out = Vec::new();
    let markers = PLATFORMS
        .iter()
        .map(|(_, var)| *var)
        .collect::<Vec<_>>()
        .join(", ");
    out.push(Finding::note(match &p.name {
        Some((name, marker)) => format!("platform: {name} ({marker})"),
        None => format!("platform: none recognised (no {markers} in the environment)"),
    }));
    let listen = settings.listen;
    out.push(match (&p.port, settings.listen_from) {
        (Some(port), ListenFrom::PortOnly) => Finding::ok(format!(
            "PORT={port}: herald binds {listen}, every interface, where the platform's router connects"
        )),
        (Some(port), from) => {
            let why = match from {
                ListenFrom::Flag => "--listen (or HERALD_LISTEN) wins over PORT",
                _ => "HOST is set, so PORT only gives the port",
            };
            let reachable = !listen.ip().is_loopback() && port == &listen.port().to_string();
            let what = format!("PORT={port}, but herald binds {listen}: {why}");
            match (&p.name, reachable) {
                (Some((name, _)), false) => Finding::fail(
                    format!("{what}; {name}'s router connects to $PORT from outside and cannot reach it"),
                    vec![
                        "unset HERALD_LISTEN and HOST (and drop --listen): PORT alone binds 0.0.0.0:$PORT".to_string(),
                        format!("or --listen 0.0.0.0:{port}"),
                    ],
                ),
                _ => Finding::note(what),
            }
        }
        (None, _) => Finding::note(format!("PORT is not set: herald binds {listen}")),
    });
    // herald raises its soft limit to the hard one and keeps FD_RESERVE back.
    let budget = default_max_connections(host.nofile_hard) as u64;
    let what = format!(
        "connection budget: fd limit {} (hard) gives up to {budget} connections per process \
         ({FD_RESERVE} descriptors kept back), for {n}",
        host.nofile_hard
    );
    out.push(match &p.name {
        Some((name, _)) => Finding::judge(
            budget >= n,
            what,
            vec![format!(
                "{name} fixes the fd limit per instance: run {} instances sharing topics through --redis",
                n.div_ceil(budget.max(1))
            )],
        ),
        None => Finding::note(what),
    });
    if let Some(("Heroku", _)) = &p.name {
        out.push(Finding::judge(
            settings.ping_interval < HEROKU_IDLE_TIMEOUT,
            format!(
                "--ping-interval {}s against Heroku's router idle timeout of {}s: a quiet WebSocket must see a ping first",
                settings.ping_interval.as_secs(),
                HEROKU_IDLE_TIMEOUT.as_secs()
            ),
            vec!["--ping-interval 25".to_string()],
        ));
    }
    out
}

/// The largest power of two no greater than `x` (0 for 0).
fn power_of_two_below(x: u64) -> u64 {
    if x == 0 { 0 } else { 1 << x.ilog2() }
}

/// Kernel send buffers: a client that stops reading leaves herald's bytes in its socket's
/// send buffer, up to the buffer's size, before any reach herald's queue and
/// `--send-queue-limit` starts counting. Without `--sndbuf` that is `tcp_wmem`'s maximum
/// (autotuned up to it, 4 MiB by default); with it, twice `--sndbuf` (Linux doubles it),
/// capped at `wmem_max` first. N slow consumers pinning more than the host's memory is a
/// note, not a failure: it takes every client stalling at once under heavy traffic, and
/// the kernel's `tcp_mem` ceiling puts all of TCP under pressure before memory runs out.
fn assess_send_buffers(host: &Host, n: u64, sndbuf: Option<u64>) -> Option<Finding> {
    let mem = host.mem_total_kib? * 1024;
    let (per_connection, source) = match sndbuf {
        Some(asked) => {
            let granted = asked.min(host.wmem_max.unwrap_or(asked));
            let capped = if granted < asked {
                format!(", capped by net.core.wmem_max {granted}")
            } else {
                String::new()
            };
            (
                2 * granted,
                format!("--sndbuf {asked}, doubled by Linux{capped}"),
            )
        }
        None => {
            let (_, default, max) = host.tcp_wmem?;
            (
                max,
                format!(
                    "net.ipv4.tcp_wmem's maximum: sockets start at {} KiB and the kernel grows them up to it",
                    default / 1024
                ),
            )
        }
    };
    let total = n.saturating_mul(per_connection);
    let what = format!(
        "kernel send buffers: a client that stops reading pins up to {} KiB ({source}) before --send-queue-limit starts counting; \
         {n} connections x {} KiB = {} MiB against the host's {} MiB",
        per_connection / 1024,
        per_connection / 1024,
        total >> 20,
        mem >> 20
    );
    if total <= mem {
        return Some(Finding::ok(what));
    }
    // The largest --sndbuf (a power of two, 4 KiB to 64 KiB) whose doubled size fits N times.
    let fitting = power_of_two_below(mem / n.max(1) / 2).clamp(4096, 65536);
    let mut fix = vec![format!(
        "herald --sndbuf {fitting}   (HERALD_SNDBUF={fitting}: at most {} KiB per connection, {} MiB for {n})",
        2 * fitting / 1024,
        n.saturating_mul(2 * fitting) >> 20
    )];
    if sndbuf.is_none()
        && let Some((min, default, _)) = host.tcp_wmem
    {
        let max = power_of_two_below(mem / n.max(1)).max(min.max(4096));
        fix.push(format!(
            "sysctl -w net.ipv4.tcp_wmem=\"{min} {} {max}\"   (every TCP socket on the host, HAProxy's too)",
            default.min(max)
        ));
    }
    Some(Finding::note_with(
        format!("{what}: slow consumers could pin more kernel memory than the host has"),
        fix,
    ))
}

/// `net.ipv4.tcp_migrate_req`: when a `--reuse-port` process closes its listener to
/// drain, the connections in its accept queue move to the port's other listeners (1) or
/// are reset (0). Only rolling restarts with `--reuse-port` need it; they fail without.
fn assess_migrate_req(value: Option<u64>, reuse_port: bool) -> Finding {
    let fix = vec![
        "sysctl -w net.ipv4.tcp_migrate_req=1".to_string(),
        "and to keep it: net.ipv4.tcp_migrate_req = 1 in /etc/sysctl.d/90-herald.conf (systemd/sysctl.d/ ships it)".to_string(),
    ];
    let why = "a --reuse-port process that drains hands the connections waiting in its accept queue to the others";
    match value {
        Some(1) => Finding::ok(format!("net.ipv4.tcp_migrate_req 1: {why}")),
        Some(v) if reuse_port => Finding::fail(
            format!("net.ipv4.tcp_migrate_req {v} with --reuse-port: each rolling restart resets the connections waiting in the restarted process's accept queue"),
            fix,
        ),
        Some(v) => Finding::note_with(
            format!("net.ipv4.tcp_migrate_req {v}: fine without --reuse-port; with it, each rolling restart resets the connections waiting in the restarted process's accept queue"),
            fix,
        ),
        None if reuse_port => Finding::fail(
            "net.ipv4.tcp_migrate_req is missing (Linux before 5.14) and herald runs with --reuse-port: each rolling restart resets the connections in the restarted process's accept queue".into(),
            vec!["Linux 5.14 or later, or one port per process (supervisor/herald-redis.conf) with HAProxy's agent-check".to_string()],
        ),
        None => Finding::note(
            "net.ipv4.tcp_migrate_req is missing (Linux before 5.14): rolling restarts with --reuse-port would reset queued connections".into(),
        ),
    }
}

/// A parsed `key = value` file: supervisord's INI or a systemd unit.
#[derive(Debug, Default)]
struct Ini {
    /// (section, key, value), in order.
    entries: Vec<(String, String, String)>,
}

impl Ini {
    fn parse(text: &str) -> Ini {
        let mut section = String::new();
        let mut entries = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.trim().to_string();
            } else if let Some((k, v)) = line.split_once('=') {
                // supervisord allows `value ; comment`.
                let v = v.split(" ;").next().unwrap_or(v);
                entries.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
            }
        }
        Ini { entries }
    }

    fn get(&self, section: impl Fn(&str) -> bool, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(s, k, _)| section(s) && k == key)
            .map(|(_, _, v)| v.as_str())
    }

    fn all<'a>(&'a self, section: &'a str, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.entries
            .iter()
            .filter(move |(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
    }
}

/// A herald flag's value in a command line (`--flag V` or `--flag=V`), or in a
/// `HERALD_FLAG=V` environment assignment.
fn herald_setting<'a>(command: &'a str, env: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = command.split_whitespace();
    let long = format!("--{flag}");
    while let Some(w) = words.next() {
        if w == long {
            return words.next();
        }
        if let Some(v) = w.strip_prefix(&long).and_then(|r| r.strip_prefix('=')) {
            return Some(v);
        }
    }
    let var = format!("HERALD_{}=", flag.to_uppercase().replace('-', "_"));
    env.split([',', ' '])
        .find_map(|a| a.trim().trim_matches('"').strip_prefix(var.as_str()))
        .map(|v| v.trim_matches('"'))
}

/// A herald switch (`--flag`, or `HERALD_FLAG` set to anything but a falsey value, as
/// clap reads it).
fn herald_flag(command: &str, env: &str, flag: &str) -> bool {
    let long = format!("--{flag}");
    if command.split_whitespace().any(|w| w == long) {
        return true;
    }
    let var = format!("HERALD_{}=", flag.to_uppercase().replace('-', "_"));
    env.split([',', ' '])
        .find_map(|a| a.trim().trim_matches('"').strip_prefix(var.as_str()))
        .map(|v| v.trim_matches('"').to_ascii_lowercase())
        .is_some_and(|v| !matches!(v.as_str(), "" | "0" | "n" | "no" | "f" | "false" | "off"))
}

/// Settings as a file runs herald: its command line and environment win over ours.
fn effective(settings: &Settings, command: &str, env: &str) -> Settings {
    let setting = |flag: &str| herald_setting(command, env, flag);
    let secs = |flag: &str, fallback: Duration| {
        setting(flag)
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(fallback)
    };
    let drain_timeout = secs("drain-timeout", settings.drain_timeout);
    // herald's rule: the spread defaults to half the drain timeout.
    let drain_spread = match setting("drain-spread").and_then(|v| v.parse::<f64>().ok()) {
        Some(s) if (0.0..=86_400.0).contains(&s) => Duration::from_secs_f64(s),
        _ if setting("drain-timeout").is_some() => drain_timeout / 2,
        _ => settings.drain_spread,
    };
    let addr = |flag: &str| setting(flag).and_then(|v| v.parse::<SocketAddr>().ok());
    Settings {
        drain_timeout,
        drain_spread,
        ping_interval: secs("ping-interval", settings.ping_interval),
        backlog: settings.backlog,
        listen: addr("listen").unwrap_or(settings.listen),
        agent_listen: addr("agent-listen").or(settings.agent_listen),
        reuse_port: herald_flag(command, env, "reuse-port") || settings.reuse_port,
        sndbuf: setting("sndbuf")
            .and_then(|v| v.parse().ok())
            .or(settings.sndbuf),
        listen_from: match addr("listen") {
            Some(_) => ListenFrom::Flag,
            None => settings.listen_from,
        },
    }
}

/// A supervisord `command` as the shell runs it for process `num`: `%(process_num)d`
/// filled in, a `/bin/sh -c '...'` wrapper taken off, `${NAME:-default}`, `${NAME}` and
/// `$((a + b))` expanded, double quotes removed. `vars` answers for `${NAME}`.
fn shell_expand(command: &str, num: u64, vars: &dyn Fn(&str) -> Option<String>) -> String {
    // %(process_num)d, %(process_num)02d: Python's %-format, digits only.
    let mut text = String::new();
    let mut rest = command;
    while let Some(i) = rest.find("%(process_num)") {
        text.push_str(&rest[..i]);
        let after = &rest[i + "%(process_num)".len()..];
        let spec_len = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        if after[spec_len..].starts_with('d') {
            let width: usize = after[..spec_len].parse().unwrap_or(0);
            text.push_str(&format!("{num:0width$}"));
            rest = &after[spec_len + 1..];
        } else {
            text.push_str("%(process_num)");
            rest = after;
        }
    }
    text.push_str(rest);
    let mut text = text.trim().to_string();
    for shell in ["/bin/sh -c ", "sh -c ", "/bin/bash -c ", "bash -c "] {
        if let Some(script) = text.strip_prefix(shell) {
            let script = script.trim();
            text = script
                .strip_prefix('\'')
                .and_then(|s| s.strip_suffix('\''))
                .unwrap_or(script)
                .to_string();
            break;
        }
    }
    // ${NAME:-default} and ${NAME}.
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let Some(end) = rest[i..].find('}') else {
            rest = &rest[i..];
            break;
        };
        let inner = &rest[i + 2..i + end];
        let (name, default) = inner.split_once(":-").unwrap_or((inner, ""));
        let value = vars(name).filter(|v| !v.is_empty());
        out.push_str(value.as_deref().unwrap_or(default));
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    // $((a + b - c)): integers only.
    let mut text = String::new();
    let mut rest = out.as_str();
    while let Some(i) = rest.find("$((") {
        text.push_str(&rest[..i]);
        let Some(end) = rest[i..].find("))") else {
            rest = &rest[i..];
            break;
        };
        let expr = &rest[i + 3..i + end];
        match arithmetic(expr) {
            Some(v) => text.push_str(&v.to_string()),
            None => text.push_str(&rest[i..i + end + 2]),
        }
        rest = &rest[i + end + 2..];
    }
    text.push_str(rest);
    text.replace('"', "")
}

/// `8080 + 1000 + 2`: sums and differences of integers.
fn arithmetic(expr: &str) -> Option<i64> {
    let mut total = 0i64;
    let mut sign = 1i64;
    let mut number = String::new();
    for c in expr.chars().chain(std::iter::once('+')) {
        match c {
            '0'..='9' => number.push(c),
            ' ' | '\t' => {}
            '+' | '-' => {
                if number.is_empty() {
                    // A sign before a number, or a second operator.
                    if c == '-' {
                        sign = -sign;
                    }
                    continue;
                }
                total += sign * number.parse::<i64>().ok()?;
                number.clear();
                sign = if c == '-' { -1 } else { 1 };
            }
            _ => return None,
        }
    }
    Some(total)
}

/// `K="V",K2="V2"`, as supervisord's `environment=` writes it.
fn supervisor_environment(env: &str) -> Vec<(String, String)> {
    env.split(',')
        .filter_map(|a| a.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// The herald processes a supervisord file runs, each as its command line and
/// environment set it (`numprocs` of them per program). `env` is supervisord's own
/// environment, which its programs inherit.
fn supervisor_runs(
    text: &str,
    settings: &Settings,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<Settings> {
    let ini = Ini::parse(text);
    let mut programs: Vec<&str> = Vec::new();
    for (section, _, _) in &ini.entries {
        if section.starts_with("program:") && !programs.contains(&section.as_str()) {
            programs.push(section);
        }
    }
    let mut runs = Vec::new();
    for program in programs {
        let here = |s: &str| s == program;
        let Some(command) = ini.get(here, "command").filter(|c| c.contains("herald")) else {
            continue;
        };
        let environment = ini.get(here, "environment").unwrap_or("");
        let assigned = supervisor_environment(environment);
        let vars = |name: &str| {
            assigned
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .or_else(|| env(name))
        };
        let number = |key: &str, default: u64| {
            ini.get(here, key)
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let start = number("numprocs_start", 0);
        for num in start..start + number("numprocs", 1).clamp(1, 1024) {
            let expanded = shell_expand(command, num, &vars);
            runs.push(effective(settings, &expanded, environment));
        }
    }
    runs
}

/// The herald process a systemd unit runs.
fn systemd_runs(text: &str, settings: &Settings) -> Vec<Settings> {
    let ini = Ini::parse(text);
    let Some(exec) = ini.get(|s| s == "Service", "ExecStart") else {
        return Vec::new();
    };
    let env: String = ini
        .all("Service", "Environment")
        .collect::<Vec<_>>()
        .join(" ");
    vec![effective(settings, exec, &env)]
}

pub fn assess_supervisor(text: &str, n: u64, settings: &Settings) -> Vec<Finding> {
    let ini = Ini::parse(text);
    let mut out = Vec::new();
    let program = |s: &str| s.starts_with("program:");
    if ini.get(program, "command").is_none() && ini.get(|s| s == "supervisord", "minfds").is_none()
    {
        out.push(Finding::fail(
            "no [program:...] with a command, and no [supervisord] section".into(),
            Vec::new(),
        ));
        return out;
    }
    if let Some(command) = ini.get(program, "command") {
        let env = ini.get(program, "environment").unwrap_or("");
        let s = effective(settings, command, env);
        let drain = s.drain_timeout.as_secs();
        let stopwait = ini
            .get(program, "stopwaitsecs")
            .and_then(|v| v.parse().ok())
            .unwrap_or(SUPERVISOR_DEFAULT_STOPWAIT);
        out.push(Finding::judge(
            stopwait > drain,
            format!("stopwaitsecs {stopwait} against herald's --drain-timeout {drain}: supervisord sends SIGKILL when it runs out"),
            vec![format!("stopwaitsecs={}", drain + 20)],
        ));
        let signal = ini
            .get(program, "stopsignal")
            .unwrap_or("TERM")
            .to_ascii_uppercase();
        out.push(Finding::judge(
            matches!(signal.as_str(), "TERM" | "INT"),
            format!("stopsignal {signal}: herald drains on TERM or INT"),
            vec!["stopsignal=TERM".to_string()],
        ));
    }
    match ini.get(|s| s == "supervisord", "minfds") {
        Some(v) => {
            let minfds = v.parse().unwrap_or(0);
            let need = fds_needed(n);
            out.push(Finding::judge(
                minfds >= need,
                format!("minfds {minfds} for {need} descriptors: supervisord's children inherit its limit"),
                vec![format!("minfds={need} in [supervisord]")],
            ));
        }
        None if ini.entries.iter().any(|(s, _, _)| s == "supervisord") => out.push(Finding::fail(
            format!("[supervisord] has no minfds: the default {SUPERVISOR_DEFAULT_MINFDS} is inherited by herald"),
            vec![format!("minfds={} in [supervisord]", fds_needed(n))],
        )),
        None => out.push(Finding::note(format!(
            "minfds lives in [supervisord] of the main supervisord.conf; it must be at least {}",
            fds_needed(n)
        ))),
    }
    out
}

pub fn assess_systemd(text: &str, n: u64, settings: &Settings) -> Vec<Finding> {
    let ini = Ini::parse(text);
    let mut out = Vec::new();
    let Some(exec) = ini.get(|s| s == "Service", "ExecStart") else {
        out.push(Finding::fail("no [Service] ExecStart=".into(), Vec::new()));
        return out;
    };
    let env: String = ini
        .all("Service", "Environment")
        .collect::<Vec<_>>()
        .join(" ");
    let s = effective(settings, exec, &env);
    let drain = s.drain_timeout;
    let stop = ini
        .get(|s| s == "Service", "TimeoutStopSec")
        .map(parse_systemd_time)
        .unwrap_or(Some(SYSTEMD_DEFAULT_STOP_TIMEOUT));
    out.push(match stop {
        Some(stop) => Finding::judge(
            stop > drain,
            format!("TimeoutStopSec {}s against herald's --drain-timeout {}s: systemd sends SIGKILL when it runs out", stop.as_secs(), drain.as_secs()),
            vec![format!("TimeoutStopSec={}s", drain.as_secs() + 20)],
        ),
        None => Finding::fail("TimeoutStopSec is not a duration systemd accepts".into(), vec![format!("TimeoutStopSec={}s", drain.as_secs() + 20)]),
    });
    let need = fds_needed(n);
    let nofile = match ini.get(|s| s == "Service", "LimitNOFILE") {
        None => Some(SYSTEMD_DEFAULT_NOFILE),
        Some("infinity") => Some(u64::MAX),
        // `soft:hard`: herald raises soft to hard, so the hard value is what counts.
        Some(v) => v.rsplit(':').next().and_then(|h| h.trim().parse().ok()),
    };
    out.push(Finding::judge(
        nofile.is_some_and(|l| l >= need),
        format!(
            "LimitNOFILE {} for {need} descriptors",
            nofile.map_or("unreadable".into(), |l| l.to_string())
        ),
        vec![format!("LimitNOFILE={need}")],
    ));
    let signal = ini
        .get(|s| s == "Service", "KillSignal")
        .unwrap_or("SIGTERM");
    out.push(Finding::judge(
        matches!(signal, "SIGTERM" | "SIGINT" | "TERM" | "INT" | "15" | "2"),
        format!("KillSignal {signal}: herald drains on SIGTERM or SIGINT"),
        vec!["KillSignal=SIGTERM".to_string()],
    ));
    let kind = ini.get(|s| s == "Service", "Type").unwrap_or("simple");
    if kind != "notify" {
        out.push(Finding::note(format!(
            "Type={kind}: with Type=notify systemd knows when herald is listening"
        )));
    }
    out
}

/// HAProxy expands `"${NAME}"` from its environment, which `presetenv` fills in only
/// where unset and `setenv` overrides. `env` is the process environment.
fn haproxy_value(
    word: &str,
    env: &dyn Fn(&str) -> Option<String>,
    set: &[(String, String, bool)],
) -> String {
    let word = word.trim_matches('"');
    let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) else {
        return word.to_string();
    };
    let forced = set.iter().rev().find(|(n, _, force)| n == name && *force);
    let preset = set.iter().find(|(n, _, force)| n == name && !*force);
    forced
        .map(|(_, v, _)| v.clone())
        .or_else(|| env(name))
        .or_else(|| preset.map(|(_, v, _)| v.clone()))
        .unwrap_or_default()
}

/// What a `server` or `default-server` line says about checks; `None`: not said.
#[derive(Debug, Clone, Default)]
struct ServerOpts {
    agent_check: Option<bool>,
    agent_port: Option<String>,
    agent_addr: Option<String>,
    agent_inter: Option<String>,
    weight: Option<String>,
}

impl ServerOpts {
    fn parse(
        words: &[&str],
        env: &dyn Fn(&str) -> Option<String>,
        set: &[(String, String, bool)],
    ) -> ServerOpts {
        let mut opts = ServerOpts::default();
        let mut it = words.iter();
        while let Some(&w) = it.next() {
            let mut value = || it.next().map(|v| haproxy_value(v, env, set));
            match w {
                "agent-check" => opts.agent_check = Some(true),
                "no-agent-check" => opts.agent_check = Some(false),
                "agent-port" => opts.agent_port = value(),
                "agent-addr" => opts.agent_addr = value(),
                "agent-inter" => opts.agent_inter = value(),
                "weight" => opts.weight = value(),
                _ => {}
            }
        }
        opts
    }

    /// `self` with what `later` says on top.
    fn then(&self, later: &ServerOpts) -> ServerOpts {
        ServerOpts {
            agent_check: later.agent_check.or(self.agent_check),
            agent_port: later.agent_port.clone().or(self.agent_port.clone()),
            agent_addr: later.agent_addr.clone().or(self.agent_addr.clone()),
            agent_inter: later.agent_inter.clone().or(self.agent_inter.clone()),
            weight: later.weight.clone().or(self.weight.clone()),
        }
    }
}

#[derive(Debug)]
struct HaServer {
    backend: String,
    name: String,
    /// As written, `${VAR}` expanded: `127.0.0.1:8080`, `host:8080`.
    addr: String,
    opts: ServerOpts,
}

impl HaServer {
    fn port(&self) -> Option<u16> {
        self.addr.rsplit_once(':')?.1.parse().ok()
    }
}

/// `.if defined(NAME)`: HAProxy's conditional blocks, as far as this file needs them (any
/// other condition counts as true).
fn haproxy_condition(
    cond: &str,
    env: &dyn Fn(&str) -> Option<String>,
    set: &[(String, String, bool)],
) -> bool {
    match cond
        .trim()
        .strip_prefix("defined(")
        .and_then(|c| c.strip_suffix(')'))
    {
        Some(name) => set.iter().any(|(n, _, _)| n == name.trim()) || env(name.trim()).is_some(),
        None => true,
    }
}

/// `herald`: the processes as the deployment files run them (or as herald's own flags
/// say, when no file is given); HAProxy's server lines are checked against them.
pub fn assess_haproxy(
    text: &str,
    n: u64,
    herald: &[Settings],
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut section_name = String::new();
    let mut tunnel: Vec<Duration> = Vec::new();
    let mut maxconn: Option<u64> = None;
    // (name, value, overrides the environment)
    let mut set: Vec<(String, String, bool)> = Vec::new();
    let mut defaults_server = ServerOpts::default();
    let mut backend_server = ServerOpts::default();
    let mut servers: Vec<HaServer> = Vec::new();
    // One entry per open `.if`: (this branch is taken, an earlier branch was).
    let mut blocks: Vec<(bool, bool)> = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        let active = blocks.iter().all(|&(taken, _)| taken);
        match words.as_slice() {
            [".if", ..] => {
                let taken = active && haproxy_condition(&line[3..], env, &set);
                blocks.push((taken, taken));
                continue;
            }
            [".elif", ..] => {
                if let Some((taken, done)) = blocks.pop() {
                    let outer = blocks.iter().all(|&(t, _)| t);
                    let now = outer && !done && haproxy_condition(&line[5..], env, &set);
                    blocks.push((now, done || now || taken));
                }
                continue;
            }
            [".else"] => {
                if let Some((_, done)) = blocks.pop() {
                    let outer = blocks.iter().all(|&(t, _)| t);
                    blocks.push((outer && !done, true));
                }
                continue;
            }
            [".endif"] => {
                blocks.pop();
                continue;
            }
            _ if !active => continue,
            _ => {}
        }
        match words.as_slice() {
            [] => {}
            [s, rest @ ..]
                if matches!(
                    *s,
                    "global"
                        | "defaults"
                        | "frontend"
                        | "backend"
                        | "listen"
                        | "userlist"
                        | "peers"
                        | "resolvers"
                        | "program"
                        | "http-errors"
                        | "ring"
                        | "cache"
                ) =>
            {
                section = s.to_string();
                section_name = rest.first().unwrap_or(&"").to_string();
                if section == "defaults" {
                    defaults_server = ServerOpts::default();
                }
                backend_server = defaults_server.clone();
            }
            ["presetenv", name, value, ..] => {
                set.push((name.to_string(), value.to_string(), false))
            }
            ["setenv", name, value, ..] => set.push((name.to_string(), value.to_string(), true)),
            ["timeout", "tunnel", value, ..] => {
                match parse_haproxy_time(&haproxy_value(value, env, &set)) {
                    Some(d) => tunnel.push(d),
                    None => out.push(Finding::fail(
                        format!("timeout tunnel {value}: not a duration"),
                        Vec::new(),
                    )),
                }
            }
            ["maxconn", value, ..] if section == "global" => {
                maxconn = haproxy_value(value, env, &set).parse().ok()
            }
            ["default-server", opts @ ..] => {
                let opts = ServerOpts::parse(opts, env, &set);
                if section == "defaults" {
                    defaults_server = defaults_server.then(&opts);
                    backend_server = defaults_server.clone();
                } else {
                    backend_server = backend_server.then(&opts);
                }
            }
            ["server", name, addr, opts @ ..]
                if matches!(section.as_str(), "backend" | "listen") =>
            {
                servers.push(HaServer {
                    backend: section_name.clone(),
                    name: name.to_string(),
                    addr: haproxy_value(addr, env, &set),
                    opts: backend_server.then(&ServerOpts::parse(opts, env, &set)),
                })
            }
            _ => {}
        }
    }
    let ping = herald
        .iter()
        .map(|s| s.ping_interval)
        .max()
        .unwrap_or(Duration::from_secs(25));
    match tunnel.iter().min() {
        Some(&shortest) => out.push(Finding::judge(
            shortest >= ping * 2,
            format!(
                "timeout tunnel {}s against herald's --ping-interval {}s: an idle WebSocket is cut unless pings come well within it",
                shortest.as_secs(),
                ping.as_secs()
            ),
            vec![format!("timeout tunnel {}s", (ping * 4).as_secs().max(3600))],
        )),
        None => out.push(Finding::fail(
            "no `timeout tunnel`: WebSockets would be cut by `timeout client`/`timeout server`".into(),
            vec!["timeout tunnel 1h   (in defaults or the herald backend)".to_string()],
        )),
    }
    match maxconn {
        Some(m) => out.push(Finding::judge(
            m >= n,
            format!("HAProxy global maxconn {m} for {n} connections"),
            vec![format!("maxconn {n}   (in global; HAProxy sizes its own fd limit from it)")],
        )),
        None => out.push(Finding::fail(
            "HAProxy global maxconn is not set: its default depends on its fd limit and may be small".into(),
            vec![format!("maxconn {n}   (in global)")],
        )),
    }
    out.extend(assess_agent(&servers, herald));
    out
}

/// HAProxy's agent-check against herald's `--agent-listen`: every server line that
/// points at herald (in a backend named `herald...`, or at a port herald listens on)
/// asks the agent of the process behind it, often enough, with a weight the agent's
/// percentages can scale.
fn assess_agent(servers: &[HaServer], herald: &[Settings]) -> Vec<Finding> {
    let mut out = Vec::new();
    let listens = |port: Option<u16>| herald.iter().any(|s| Some(s.listen.port()) == port);
    let ours: Vec<&HaServer> = servers
        .iter()
        .filter(|s| s.backend.starts_with("herald") || listens(s.port()))
        .collect();
    let agents: Vec<SocketAddr> = herald.iter().filter_map(|s| s.agent_listen).collect();
    let agent_list = || {
        agents
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if ours.is_empty() {
        out.push(Finding::note(
            "no server line points at herald (no backend named herald*, no server on its --listen port): agent-check not checked".into(),
        ));
        return out;
    }
    if agents.is_empty() && ours.iter().all(|s| s.opts.agent_check != Some(true)) {
        out.push(Finding::note_with(
            "no agent-check, and herald runs without --agent-listen: HAProxy learns of a drain only when /health turns 503 (fall x inter later), SIGUSR1 takes nothing out of rotation, and the weights ignore herald's headroom".into(),
            vec![
                "herald --agent-listen 127.0.0.1:9080   (HERALD_AGENT_LISTEN; the shipped files use herald's port + 1000)".to_string(),
                "server herald1 127.0.0.1:8080 check weight 100 agent-check agent-port 9080 agent-inter 2s".to_string(),
            ],
        ));
        return out;
    }
    for server in ours {
        let label = format!(
            "server {}/{} ({})",
            server.backend, server.name, server.addr
        );
        // The process behind this server line, when herald's settings say which.
        let behind = herald
            .iter()
            .find(|s| Some(s.listen.port()) == server.port());
        let expected = behind.map_or(agents.first().copied(), |s| s.agent_listen);
        if server.opts.agent_check != Some(true) {
            match expected {
                Some(agent) => out.push(Finding::fail(
                    format!("{label}: no agent-check, but herald answers one on {agent}: HAProxy never sees its drain (shutdown, SIGUSR1, no descriptors, broken Redis delivery) or its headroom"),
                    vec![format!("server {} {} check weight 100 agent-check agent-port {} agent-inter 2s", server.name, server.addr, agent.port())],
                )),
                None => out.push(Finding::note(format!(
                    "{label}: no agent-check (the herald on this port runs without --agent-listen)"
                ))),
            }
            continue;
        }
        let Some(port_text) = &server.opts.agent_port else {
            out.push(Finding::fail(
                format!(
                    "{label}: agent-check without agent-port: HAProxy refuses the configuration"
                ),
                vec![format!(
                    "agent-port {}",
                    expected.map_or("<herald's --agent-listen port>".to_string(), |a| a
                        .port()
                        .to_string())
                )],
            ));
            continue;
        };
        let port: Option<u16> = port_text.parse().ok();
        match (behind, expected) {
            (_, None) if herald.iter().any(|s| s.reuse_port) => out.push(Finding::note(format!(
                "{label}: agent-check on port {port_text}, but herald runs with --reuse-port and no --agent-listen: HAProxy ignores an agent it cannot reach (no harm), and behind one shared port an agent could not speak for one process anyway"
            ))),
            (_, None) => out.push(Finding::fail(
                format!("{label}: agent-check on port {port_text}, but herald runs without --agent-listen: HAProxy ignores an agent it cannot reach, so drain and weights never reach it"),
                vec![format!("herald --agent-listen 127.0.0.1:{port_text}   (HERALD_AGENT_LISTEN=127.0.0.1:{port_text})")],
            )),
            (Some(process), Some(agent)) => out.push(Finding::judge(
                port == Some(agent.port()),
                format!("{label}: agent-port {port_text} against the --agent-listen {agent} of the herald on port {}", process.listen.port()),
                vec![format!("agent-port {}", agent.port())],
            )),
            (None, Some(_)) => out.push(Finding::judge(
                agents.iter().any(|a| Some(a.port()) == port),
                format!("{label}: agent-port {port_text} against herald's --agent-listen {}", agent_list()),
                vec![format!(
                    "agent-port {}",
                    agents
                        .iter()
                        .map(|a| a.port().to_string())
                        .collect::<Vec<_>>()
                        .join(" or ")
                )],
            )),
        }
        // No agent to ask: what follows is moot.
        let Some(agent) = expected else {
            continue;
        };
        // Where HAProxy connects: agent-addr, else the server's own address.
        let host = server
            .opts
            .agent_addr
            .clone()
            .or_else(|| server.addr.rsplit_once(':').map(|(h, _)| h.to_string()));
        let ip = host
            .as_deref()
            .and_then(|h| h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok());
        if let Some(ip) = ip
            && !agent.ip().is_unspecified()
            && ip != agent.ip()
        {
            out.push(Finding::fail(
                format!(
                    "{label}: HAProxy asks the agent at {ip}, but herald's agent listens on {agent}"
                ),
                vec![format!(
                    "agent-addr {}   (or herald --agent-listen {ip}:{})",
                    agent.ip(),
                    agent.port()
                )],
            ));
        }
        let weight_text = server.opts.weight.clone();
        let weight = weight_text
            .as_deref()
            .map_or(Some(HAPROXY_DEFAULT_WEIGHT), |w| w.parse().ok());
        out.push(Finding::judge(
            weight.is_some_and(|w| w >= HAPROXY_MIN_AGENT_WEIGHT),
            format!(
                "{label}: weight {} for the agent's percentages (HAProxy sets weight x N% in integers: at weight 1 anything under 100% is 0, no new connections)",
                weight_text.as_deref().unwrap_or("1 (default)")
            ),
            vec!["weight 100".to_string()],
        ));
        let inter = match &server.opts.agent_inter {
            None => Some(HAPROXY_DEFAULT_AGENT_INTER),
            Some(t) => parse_haproxy_time(t),
        };
        let spread = behind
            .map(|s| s.drain_spread)
            .or_else(|| herald.iter().map(|s| s.drain_spread).min())
            .unwrap_or_default();
        match inter {
            None => out.push(Finding::fail(
                format!("{label}: agent-inter {}: not a duration", server.opts.agent_inter.as_deref().unwrap_or("")),
                vec!["agent-inter 2s".to_string()],
            )),
            Some(inter) if spread.is_zero() => out.push(Finding::note(format!(
                "{label}: agent-inter {}ms with --drain-spread 0: a drain closes every WebSocket at once, before HAProxy reads `drain`",
                inter.as_millis()
            ))),
            Some(inter) => out.push(Finding::judge(
                inter <= spread,
                format!(
                    "{label}: agent-inter {}ms against herald's --drain-spread {}ms: HAProxy should read `drain` before most of a drain's closes",
                    inter.as_millis(),
                    spread.as_millis()
                ),
                vec![format!(
                    "agent-inter {}ms   (or a longer --drain-spread)",
                    spread.as_millis().min(2000)
                )],
            )),
        }
        if behind.map_or(herald.iter().any(|s| s.reuse_port), |s| s.reuse_port) {
            out.push(Finding::note(format!(
                "{label}: herald runs with --reuse-port: the kernel, not HAProxy, picks the process behind this port, so one process's agent speaks for all of them (use one port per process for agent-check)"
            )));
        }
    }
    out
}

/// `100ms`, `30s`, `5m`, `1h`, `1d`; a bare number is milliseconds (HAProxy's rule).
fn parse_haproxy_time(v: &str) -> Option<Duration> {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let num: u64 = num.parse().ok()?;
    let ms = match unit {
        "" | "ms" => num,
        "us" => return Some(Duration::from_micros(num)),
        "s" => num * 1000,
        "m" => num * 60_000,
        "h" => num * 3_600_000,
        "d" => num * 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// `90`, `30s`, `2min 30s`, `1h`, `500ms`, `infinity` (systemd.time(7), the common subset).
fn parse_systemd_time(v: &str) -> Option<Duration> {
    if v == "infinity" {
        return Some(Duration::MAX);
    }
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    for part in v.split_whitespace() {
        let split = part.find(|c: char| !c.is_ascii_digit())?;
        let (num, unit) = part.split_at(split);
        let num: u64 = num.parse().ok()?;
        total += match unit {
            "ms" | "msec" => Duration::from_millis(num),
            "s" | "sec" | "second" | "seconds" => Duration::from_secs(num),
            "m" | "min" | "minute" | "minutes" => Duration::from_secs(num * 60),
            "h" | "hr" | "hour" | "hours" => Duration::from_secs(num * 3600),
            _ => return None,
        };
    }
    Some(total)
}

/// The file followed by the files its `[include] files =` names (relative to its
/// directory; `*` in a file name matches as a shell would), as supervisord reads them.
fn with_supervisor_includes(path: &std::path::Path, text: &str) -> Result<String, String> {
    let mut all = text.to_string();
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let ini = Ini::parse(text);
    for pattern in ini.all("include", "files").flat_map(str::split_whitespace) {
        let full = dir.join(pattern);
        let parent = full.parent().unwrap_or(dir);
        let name = full.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let mut matches: Vec<PathBuf> = match name.split_once('*') {
            None => vec![full.clone()],
            Some((prefix, suffix)) => std::fs::read_dir(parent)
                .map_err(|e| format!("{}: {e}", parent.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    n.starts_with(prefix) && n.ends_with(suffix)
                })
                .collect(),
        };
        matches.sort();
        for file in matches {
            let included =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            all.push('\n');
            all.push_str(&included);
        }
    }
    Ok(all)
}

/// Run every check that applies, print the findings; true when everything fits.
pub fn run(args: &CheckArgs, settings: &Settings) -> Result<bool, String> {
    let n = args.connections;
    let env = |name: &str| std::env::var(name).ok();
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
    };
    // The herald processes as the deployment files run them; herald's own flags when no
    // file is given. The host and HAProxy are checked against these.
    let mut runs: Vec<Settings> = Vec::new();
    let mut files: Vec<(String, Vec<Finding>)> = Vec::new();
    if let Some(path) = &args.supervisor {
        let text = with_supervisor_includes(path, &read(path)?)?;
        runs.extend(supervisor_runs(&text, settings, &env));
        files.push((
            path.display().to_string(),
            assess_supervisor(&text, n, settings),
        ));
    }
    if let Some(path) = &args.systemd {
        let text = read(path)?;
        runs.extend(systemd_runs(&text, settings));
        files.push((
            path.display().to_string(),
            assess_systemd(&text, n, settings),
        ));
    }
    if runs.is_empty() {
        runs.push(*settings);
    }
    if let Some(path) = &args.haproxy {
        let text = read(path)?;
        files.push((
            path.display().to_string(),
            assess_haproxy(&text, n, &runs, &env),
        ));
    }
    // The host holds every process's connections: one without --sndbuf autotunes.
    let sndbuf = runs.iter().map(|s| s.sndbuf).collect::<Option<Vec<u64>>>();
    let host_settings = Settings {
        reuse_port: runs.iter().any(|s| s.reuse_port),
        sndbuf: sndbuf.and_then(|all| all.into_iter().max()),
        ..*settings
    };
    let host = Host::read();
    let platform = Platform::read(&env);
    let mut sections = vec![
        ("host".to_string(), assess_host(&host, n, &host_settings)),
        (
            "platform".to_string(),
            assess_platform(&platform, &host, n, settings),
        ),
    ];
    sections.extend(files);
    println!(
        "herald check: {n} connections (drain timeout {}s, ping interval {}s, backlog {})",
        settings.drain_timeout.as_secs(),
        settings.ping_interval.as_secs(),
        settings.backlog
    );
    let mut fits = true;
    for (name, findings) in &sections {
        println!("\n{name}:");
        for f in findings {
            fits &= f.verdict != Verdict::Fail;
            println!("  {f}");
        }
    }
    println!(
        "\n{}",
        if fits {
            "everything fits"
        } else {
            "some things do not fit: see FAIL above"
        }
    );
    Ok(fits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            drain_timeout: Duration::from_secs(10),
            drain_spread: Duration::from_secs(5),
            ping_interval: Duration::from_secs(25),
            backlog: 4096,
            listen: "127.0.0.1:8080".parse().unwrap(),
            agent_listen: None,
            reuse_port: false,
            sndbuf: None,
            listen_from: ListenFrom::Default,
        }
    }

    fn platform(vars: &[(&str, &str)]) -> Platform {
        Platform::read(&|name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    fn host_with_nofile(hard: u64) -> Host {
        Host {
            nofile_soft: 1024,
            nofile_hard: hard,
            ..Host::default()
        }
    }

    #[test]
    fn platform_is_recognised_by_its_marker_and_port_alone_binds_every_interface() {
        let p = platform(&[("DYNO", "web.1"), ("PORT", "5000")]);
        assert_eq!(p.name, Some(("Heroku", "DYNO=web.1".to_string())));
        let on_port = Settings {
            listen: "0.0.0.0:5000".parse().unwrap(),
            listen_from: ListenFrom::PortOnly,
            ..settings()
        };
        let found = assess_platform(&p, &host_with_nofile(10_000), 5000, &on_port);
        let text: Vec<String> = found.iter().map(|f| f.to_string()).collect();
        assert!(
            text[0].contains("platform: Heroku (DYNO=web.1)"),
            "{text:?}"
        );
        assert!(
            text[1].starts_with("ok    PORT=5000: herald binds 0.0.0.0:5000"),
            "{text:?}"
        );
        assert!(
            text[2].starts_with("ok    connection budget: fd limit 10000 (hard) gives up to 9936"),
            "{text:?}"
        );
        assert!(
            text[3].starts_with("ok    --ping-interval 25s against Heroku"),
            "{text:?}"
        );
        assert!(found.iter().all(|f| f.verdict != Verdict::Fail));

        assert_eq!(
            platform(&[("FLY_APP_NAME", "push")]).name.unwrap().0,
            "Fly.io"
        );
        assert_eq!(platform(&[("RENDER", "true")]).name.unwrap().0, "Render");
        assert_eq!(platform(&[("PORT", "5000")]).name, None);
    }

    #[test]
    fn platform_failures_name_their_fix() {
        let p = platform(&[("DYNO", "web.1"), ("PORT", "5000")]);
        // --listen on loopback: Heroku's router cannot reach it.
        let slow_pings = Settings {
            ping_interval: Duration::from_secs(60),
            listen_from: ListenFrom::Flag,
            ..settings()
        };
        let found = assess_platform(&p, &host_with_nofile(10_000), 20_000, &slow_pings);
        let fails: Vec<String> = found
            .iter()
            .filter(|f| f.verdict == Verdict::Fail)
            .map(|f| f.to_string())
            .collect();
        assert_eq!(fails.len(), 3, "{fails:?}");
        assert!(
            fails[0].contains("PORT=5000, but herald binds 127.0.0.1:8080")
                && fails[0].contains("fix: or --listen 0.0.0.0:5000"),
            "{fails:?}"
        );
        assert!(
            fails[1].contains("run 3 instances sharing topics through --redis"),
            "{fails:?}"
        );
        assert!(fails[2].contains("fix: --ping-interval 25"), "{fails:?}");
        // Off a platform the same facts are notes: the host section judges the fd limit.
        let found = assess_platform(
            &platform(&[("PORT", "5000")]),
            &host_with_nofile(10_000),
            20_000,
            &slow_pings,
        );
        assert!(
            found.iter().all(|f| f.verdict == Verdict::Note),
            "{found:?}"
        );
    }

    fn with_agent(agent: &str) -> Settings {
        Settings {
            agent_listen: Some(agent.parse().unwrap()),
            ..settings()
        }
    }

    fn notes(findings: &[Finding]) -> Vec<&str> {
        findings
            .iter()
            .filter(|f| f.verdict == Verdict::Note)
            .map(|f| f.what.as_str())
            .collect()
    }

    fn fails(findings: &[Finding]) -> Vec<&str> {
        findings
            .iter()
            .filter(|f| f.verdict == Verdict::Fail)
            .map(|f| f.what.as_str())
            .collect()
    }

    #[test]
    fn a_roomy_host_fits_and_a_tight_one_gets_fixes() {
        let roomy = Host {
            nofile_soft: 1024,
            nofile_hard: 1 << 20,
            file_max: Some(9_000_000),
            nr_open: Some(1 << 20),
            somaxconn: Some(4096),
            tcp_max_syn_backlog: Some(4096),
            port_range: Some((1024, 65535)),
            mem_available_kib: Some(16 << 20),
            mem_total_kib: Some(16 << 20),
            tcp_wmem: Some((4096, 16384, 4 << 20)),
            wmem_max: Some(212_992),
            tcp_migrate_req: Some(1),
        };
        assert!(fails(&assess_host(&roomy, 50_000, &settings())).is_empty());
        let tight = Host {
            nofile_hard: 4096,
            somaxconn: Some(128),
            port_range: Some((32768, 60999)),
            ..roomy
        };
        let found = assess_host(&tight, 50_000, &settings());
        let failed = fails(&found);
        assert_eq!(failed.len(), 3, "{failed:?}");
        let fd = found
            .iter()
            .find(|f| f.what.starts_with("open files"))
            .unwrap();
        assert!(
            fd.fix.iter().any(|f| f.contains("LimitNOFILE=50064")),
            "{fd}"
        );
        assert!(found.iter().any(|f| {
            f.fix
                .iter()
                .any(|x| x == "sysctl -w net.core.somaxconn=4096")
        }));
    }

    /// Issue 14: a slow consumer fills its kernel send buffer (4 MiB autotuned) before
    /// --send-queue-limit counts; N of them may pin more than the host's memory.
    #[test]
    fn kernel_send_buffers_past_the_hosts_memory_are_noted_with_the_fix() {
        let host = Host {
            mem_total_kib: Some(24 << 20),
            tcp_wmem: Some((4096, 16384, 4 << 20)),
            wmem_max: Some(212_992),
            ..Host::default()
        };
        // 5,000 x 4 MiB = 19.5 GiB fits in 24 GiB; 10,000 x 4 MiB does not.
        let fits = assess_send_buffers(&host, 5_000, None).unwrap();
        assert_eq!(fits.verdict, Verdict::Ok, "{fits}");
        let over = assess_send_buffers(&host, 10_000, None).unwrap();
        assert_eq!(over.verdict, Verdict::Note, "{over}");
        assert!(over.what.contains("4096 KiB"), "{over}");
        assert!(over.what.contains("40000 MiB"), "{over}");
        assert_eq!(
            over.fix,
            vec![
                "herald --sndbuf 65536   (HERALD_SNDBUF=65536: at most 128 KiB per connection, 1250 MiB for 10000)".to_string(),
                "sysctl -w net.ipv4.tcp_wmem=\"4096 16384 2097152\"   (every TCP socket on the host, HAProxy's too)".to_string(),
            ]
        );
        // --sndbuf: twice the value counts, not tcp_wmem.
        let small = assess_send_buffers(&host, 10_000, Some(65536)).unwrap();
        assert_eq!(small.verdict, Verdict::Ok, "{small}");
        assert!(small.what.contains("128 KiB"), "{small}");
        // ... capped at net.core.wmem_max before it is doubled: 2 x 212992 per connection.
        let capped = assess_send_buffers(&host, 10_000, Some(8 << 20)).unwrap();
        assert_eq!(capped.verdict, Verdict::Ok, "{capped}");
        assert!(capped.what.contains("416 KiB"), "{capped}");
        assert!(capped.what.contains("wmem_max 212992"), "{capped}");
        // Too many even at 64 KiB: a smaller --sndbuf, and no sysctl (SO_SNDBUF ignores it).
        let tight = Host {
            mem_total_kib: Some(1 << 20),
            ..host.clone()
        };
        let crowded = assess_send_buffers(&tight, 100_000, Some(65536)).unwrap();
        assert_eq!(crowded.verdict, Verdict::Note, "{crowded}");
        assert_eq!(crowded.fix.len(), 1, "{crowded}");
        assert!(
            crowded.fix[0].starts_with("herald --sndbuf 4096 "),
            "{crowded}"
        );
        // Nothing known, nothing said.
        assert!(assess_send_buffers(&Host::default(), 10_000, None).is_none());
        let no_wmem = Host {
            tcp_wmem: None,
            ..host.clone()
        };
        assert!(assess_send_buffers(&no_wmem, 10_000, None).is_none());
        assert!(assess_send_buffers(&no_wmem, 10_000, Some(65536)).is_some());
        // It is a note: the host check still passes.
        let roomy = Host {
            nofile_hard: 1 << 20,
            ..host
        };
        let found = assess_host(&roomy, 10_000, &settings());
        assert!(fails(&found).is_empty(), "{found:?}");
        assert!(
            notes(&found)
                .iter()
                .any(|n| n.starts_with("kernel send buffers"))
        );
    }

    #[test]
    fn a_files_sndbuf_counts_for_the_host() {
        let unit = "[Service]\nExecStart=/usr/local/bin/herald --sndbuf 65536\n";
        assert_eq!(systemd_runs(unit, &settings())[0].sndbuf, Some(65536));
        let env = "[Service]\nExecStart=/usr/local/bin/herald\nEnvironment=HERALD_SNDBUF=32768\n";
        assert_eq!(systemd_runs(env, &settings())[0].sndbuf, Some(32768));
        let plain = "[Service]\nExecStart=/usr/local/bin/herald\n";
        assert_eq!(systemd_runs(plain, &settings())[0].sndbuf, None);
    }

    #[test]
    fn supervisor_stopwaitsecs_must_outlast_the_drain() {
        let short = "[program:herald]\ncommand=herald --drain-timeout 10\nstopwaitsecs=10\n";
        let found = assess_supervisor(short, 1000, &settings());
        assert!(
            fails(&found)
                .iter()
                .any(|w| w.starts_with("stopwaitsecs 10")),
            "{found:?}"
        );
        // The file's own --drain-timeout counts, not ours.
        let long_drain = "[program:herald]\ncommand=herald --drain-timeout=40\nstopwaitsecs=30\n";
        assert!(!fails(&assess_supervisor(long_drain, 1000, &settings())).is_empty());
        let env_drain = "[program:herald]\ncommand=herald\nenvironment=HERALD_DRAIN_TIMEOUT=\"5\"\nstopwaitsecs=8 ; comment\n";
        assert!(fails(&assess_supervisor(env_drain, 1000, &settings())).is_empty());
        let no_minfds =
            "[supervisord]\nlogfile=/tmp/x\n[program:herald]\ncommand=herald\nstopwaitsecs=30\n";
        assert_eq!(
            fails(&assess_supervisor(no_minfds, 1000, &settings())).len(),
            1
        );
    }

    #[test]
    fn systemd_units_are_checked_for_stop_timeout_and_fds() {
        let good = "[Service]\nType=notify\nExecStart=/usr/local/bin/herald\nTimeoutStopSec=1min\nLimitNOFILE=1048576\n";
        assert!(fails(&assess_systemd(good, 100_000, &settings())).is_empty());
        let bad = "[Service]\nExecStart=/usr/local/bin/herald --drain-timeout 30\nTimeoutStopSec=20s\nLimitNOFILE=1024:4096\nKillSignal=SIGKILL\n";
        assert_eq!(fails(&assess_systemd(bad, 100_000, &settings())).len(), 3);
    }

    #[test]
    fn haproxy_tunnel_timeout_and_maxconn() {
        let no_env = |_: &str| None;
        let good = "global\n  maxconn 100000\ndefaults\n  timeout tunnel 1h # long\n";
        assert!(fails(&assess_haproxy(good, 50_000, &[settings()], &no_env)).is_empty());
        let bad = "global\n  maxconn 2000\ndefaults\n  timeout tunnel 30000\n";
        assert_eq!(
            fails(&assess_haproxy(bad, 50_000, &[settings()], &no_env)).len(),
            2
        );
        assert_eq!(
            fails(&assess_haproxy("defaults\n", 10, &[settings()], &no_env)).len(),
            2
        );
        // "${VAR}": the environment wins over presetenv, setenv wins over both.
        let preset =
            "global\n  presetenv MC 100000\n  maxconn \"${MC}\"\ndefaults\n  timeout tunnel 1h\n";
        assert!(fails(&assess_haproxy(preset, 50_000, &[settings()], &no_env)).is_empty());
        let small = |name: &str| (name == "MC").then(|| "8000".to_string());
        assert_eq!(
            fails(&assess_haproxy(preset, 50_000, &[settings()], &small)).len(),
            1
        );
        let forced = preset.replace("presetenv", "setenv");
        assert!(fails(&assess_haproxy(&forced, 50_000, &[settings()], &small)).is_empty());
    }

    /// The shipped sysctl drop-in and systemd unit give a host room for 50,000
    /// connections by herald's own rules (the numbers in the files must agree).
    #[test]
    fn the_shipped_sysctl_and_unit_fit_fifty_thousand() {
        let sysctl = Ini::parse(include_str!("../systemd/sysctl.d/90-herald.conf"));
        let get = |k: &str| sysctl.get(|_| true, k).map(str::to_string);
        let num = |k: &str| get(k).and_then(|v| v.parse().ok());
        let range = get("net.ipv4.ip_local_port_range").unwrap();
        let (lo, hi) = range.split_once(' ').unwrap();
        let unit = Ini::parse(include_str!("../systemd/herald.service"));
        let nofile: u64 = unit
            .get(|s| s == "Service", "LimitNOFILE")
            .unwrap()
            .parse()
            .unwrap();
        let host = Host {
            nofile_soft: 1024,
            nofile_hard: nofile,
            file_max: num("fs.file-max"),
            nr_open: num("fs.nr_open"),
            somaxconn: num("net.core.somaxconn"),
            tcp_max_syn_backlog: num("net.ipv4.tcp_max_syn_backlog"),
            port_range: Some((lo.trim().parse().unwrap(), hi.trim().parse().unwrap())),
            mem_available_kib: Some(1 << 20),
            mem_total_kib: Some(1 << 20),
            tcp_wmem: None,
            wmem_max: None,
            tcp_migrate_req: num("net.ipv4.tcp_migrate_req"),
        };
        assert!(
            host.nr_open.unwrap() >= nofile,
            "LimitNOFILE above fs.nr_open cannot be set"
        );
        let found = assess_host(&host, 50_000, &settings());
        assert!(fails(&found).is_empty(), "{:?}", fails(&found));
    }

    #[test]
    fn durations_parse_like_their_programs_do() {
        assert_eq!(parse_haproxy_time("500"), Some(Duration::from_millis(500)));
        assert_eq!(parse_haproxy_time("55s"), Some(Duration::from_secs(55)));
        assert_eq!(parse_haproxy_time("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_haproxy_time("1x"), None);
        assert_eq!(parse_systemd_time("90"), Some(Duration::from_secs(90)));
        assert_eq!(
            parse_systemd_time("2min 30s"),
            Some(Duration::from_secs(150))
        );
        assert_eq!(parse_systemd_time("infinity"), Some(Duration::MAX));
        assert_eq!(parse_systemd_time("soon"), None);
    }
    #[test]
    fn tcp_migrate_req_matters_with_reuse_port_only() {
        let reuse = Settings {
            reuse_port: true,
            ..settings()
        };
        let host = |v| Host {
            nofile_hard: 1 << 20,
            tcp_migrate_req: v,
            ..Host::default()
        };
        let finding = |h: &Host, s: &Settings| {
            assess_host(h, 100, s)
                .into_iter()
                .find(|f| f.what.contains("tcp_migrate_req"))
                .unwrap()
        };
        let off = finding(&host(Some(0)), &reuse);
        assert_eq!(off.verdict, Verdict::Fail, "{off}");
        assert!(
            off.fix
                .iter()
                .any(|f| f == "sysctl -w net.ipv4.tcp_migrate_req=1"),
            "{off}"
        );
        // Without --reuse-port it is worth knowing, not a failure; the fix is still shown.
        let note = finding(&host(Some(0)), &settings());
        assert_eq!(note.verdict, Verdict::Note, "{note}");
        assert!(!note.fix.is_empty());
        assert_eq!(finding(&host(Some(1)), &reuse).verdict, Verdict::Ok);
        assert_eq!(finding(&host(None), &reuse).verdict, Verdict::Fail);
        assert_eq!(finding(&host(None), &settings()).verdict, Verdict::Note);
    }

    #[test]
    fn supervisor_commands_expand_as_the_shell_would() {
        let cmd = r#"/bin/sh -c 'exec herald --listen "127.0.0.1:$((${HERALD_PORT_BASE:-8080} + %(process_num)d))" --agent-listen "127.0.0.1:$((${BASE} + 1000 - 2 + %(process_num)02d))"'"#;
        let vars = |name: &str| (name == "BASE").then(|| "8000".to_string());
        assert_eq!(
            shell_expand(cmd, 3, &vars),
            "exec herald --listen 127.0.0.1:8083 --agent-listen 127.0.0.1:9001"
        );
        let base = |name: &str| (name == "HERALD_PORT_BASE").then(|| "7000".to_string());
        assert!(shell_expand(cmd, 1, &base).contains("--listen 127.0.0.1:7001"));
        assert_eq!(arithmetic("8080 + 1000 - 1"), Some(9079));
        assert_eq!(arithmetic("8080 * 2"), None);
        assert!(herald_flag(
            "herald --reuse-port --redis x",
            "",
            "reuse-port"
        ));
        assert!(herald_flag(
            "herald",
            "HERALD_REUSE_PORT=\"true\"",
            "reuse-port"
        ));
        assert!(!herald_flag("herald", "HERALD_REUSE_PORT=0", "reuse-port"));
    }

    /// The shipped supervisor files run herald's agent at its port + 1000.
    #[test]
    fn the_shipped_supervisor_files_run_an_agent_per_process() {
        let no_env = |_: &str| None;
        let one = supervisor_runs(
            include_str!("../supervisor/herald.conf"),
            &settings(),
            &no_env,
        );
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].agent_listen, Some("127.0.0.1:9080".parse().unwrap()));
        assert_eq!(one[0].drain_spread, Duration::from_secs(5));
        let redis = include_str!("../supervisor/herald-redis.conf");
        let runs = supervisor_runs(redis, &settings(), &no_env);
        let pairs: Vec<(u16, Option<u16>)> = runs
            .iter()
            .map(|s| (s.listen.port(), s.agent_listen.map(|a| a.port())))
            .collect();
        assert_eq!(pairs, vec![(8081, Some(9081)), (8082, Some(9082))]);
        let moved = |name: &str| match name {
            "HERALD_PORT_BASE" => Some("10000".to_string()),
            "HERALD_AGENT_PORT_BASE" => Some("11000".to_string()),
            _ => None,
        };
        let runs = supervisor_runs(redis, &settings(), &moved);
        assert_eq!(runs[1].listen.port(), 10002);
        assert_eq!(runs[1].agent_listen.map(|a| a.port()), Some(11002));
        let unit = systemd_runs(include_str!("../systemd/herald.service"), &settings());
        assert_eq!(
            unit[0].agent_listen,
            Some("127.0.0.1:9080".parse().unwrap())
        );
    }

    const AGENT_CFG: &str = "global\n  maxconn 1000\n  presetenv PORT 9080\ndefaults\n  timeout tunnel 1h\nbackend herald\n  default-server weight 100 agent-check agent-inter 2s\n  server h1 127.0.0.1:8080 check agent-port \"${PORT}\"\n";

    #[test]
    fn haproxy_agent_check_matches_herald_agent_listen() {
        let no_env = |_: &str| None;
        let agent = [with_agent("127.0.0.1:9080")];
        let found = assess_haproxy(AGENT_CFG, 100, &agent, &no_env);
        assert!(fails(&found).is_empty(), "{:?}", fails(&found));
        for what in [
            "agent-port 9080 against",
            "weight 100",
            "agent-inter 2000ms",
        ] {
            assert!(
                found
                    .iter()
                    .any(|f| f.verdict == Verdict::Ok && f.what.contains(what)),
                "{what}: {found:?}"
            );
        }
        // Another port, from the environment.
        let other = |name: &str| (name == "PORT").then(|| "9090".to_string());
        let found = assess_haproxy(AGENT_CFG, 100, &agent, &other);
        let wrong = found
            .iter()
            .find(|f| f.verdict == Verdict::Fail)
            .expect("a wrong agent-port fails");
        assert!(wrong.what.contains("agent-port 9090"), "{wrong}");
        assert_eq!(wrong.fix, vec!["agent-port 9080".to_string()]);
        // herald without --agent-listen: the agent-check asks nobody.
        let found = assess_haproxy(AGENT_CFG, 100, &[settings()], &no_env);
        assert_eq!(fails(&found).len(), 1, "{found:?}");
        assert!(fails(&found)[0].contains("without --agent-listen"));
        // herald with an agent, HAProxy without agent-check.
        let plain = "global\n  maxconn 1000\ndefaults\n  timeout tunnel 1h\nbackend herald\n  server h1 127.0.0.1:8080 check\n";
        let found = assess_haproxy(plain, 100, &agent, &no_env);
        let missing = found
            .iter()
            .find(|f| f.verdict == Verdict::Fail)
            .expect("no agent-check fails");
        assert!(
            missing.fix[0].contains("agent-check agent-port 9080"),
            "{missing}"
        );
        // Neither: a note says what is missed, nothing fails.
        let found = assess_haproxy(plain, 100, &[settings()], &no_env);
        assert!(fails(&found).is_empty());
        assert!(notes(&found).iter().any(|n| n.contains("SIGUSR1")));
    }

    #[test]
    fn haproxy_agent_weight_interval_address_and_port_are_checked() {
        let no_env = |_: &str| None;
        let agent = [with_agent("127.0.0.1:9080")];
        let assess = |cfg: &str| assess_haproxy(cfg, 100, &agent, &no_env);
        // The default weight of 1 turns every percentage below 100 into 0.
        let found = assess(&AGENT_CFG.replace("weight 100 ", ""));
        assert_eq!(fails(&found).len(), 1, "{found:?}");
        assert!(fails(&found)[0].contains("weight 1 (default)"));
        // An agent-inter longer than the drain spread (5 s).
        let found = assess(&AGENT_CFG.replace("agent-inter 2s", "agent-inter 10s"));
        assert_eq!(fails(&found).len(), 1, "{found:?}");
        assert!(
            fails(&found)[0].contains("agent-inter 10000ms against herald's --drain-spread 5000ms")
        );
        // The default agent-inter (2 s) against a spread of 1 s.
        let quick = [Settings {
            drain_spread: Duration::from_secs(1),
            ..with_agent("127.0.0.1:9080")
        }];
        let found = assess_haproxy(
            &AGENT_CFG.replace(" agent-inter 2s", ""),
            100,
            &quick,
            &no_env,
        );
        assert_eq!(fails(&found).len(), 1, "{found:?}");
        // agent-check with no agent-port: HAProxy refuses to start.
        let found = assess(&AGENT_CFG.replace(" agent-port \"${PORT}\"", ""));
        assert!(
            fails(&found)
                .iter()
                .any(|f| f.contains("without agent-port")),
            "{found:?}"
        );
        // The agent asked on another address than herald's agent listens on.
        let found =
            assess(&AGENT_CFG.replace("check agent-port", "check agent-addr 10.0.0.9 agent-port"));
        assert!(
            fails(&found).iter().any(|f| f.contains("10.0.0.9")),
            "{found:?}"
        );
        // An agent on 0.0.0.0 answers on every address.
        let any = [with_agent("0.0.0.0:9080")];
        let cfg = AGENT_CFG.replace("check agent-port", "check agent-addr 10.0.0.9 agent-port");
        assert!(fails(&assess_haproxy(&cfg, 100, &any, &no_env)).is_empty());
        // no-agent-check on a server undoes default-server's agent-check.
        let found =
            assess(&AGENT_CFG.replace("check agent-port", "check no-agent-check agent-port"));
        assert!(
            fails(&found).iter().any(|f| f.contains("no agent-check")),
            "{found:?}"
        );
        // --reuse-port without agents (one shared port): the agent-check is moot, a note.
        let shared_port = [Settings {
            reuse_port: true,
            ..settings()
        }];
        let found = assess_haproxy(AGENT_CFG, 100, &shared_port, &no_env);
        assert!(fails(&found).is_empty(), "{found:?}");
        assert!(
            notes(&found)
                .iter()
                .any(|n| n.contains("--reuse-port and no --agent-listen"))
        );
        // --reuse-port: one agent for several processes is only a note.
        let shared = [Settings {
            reuse_port: true,
            ..with_agent("127.0.0.1:9080")
        }];
        let found = assess_haproxy(AGENT_CFG, 100, &shared, &no_env);
        assert!(fails(&found).is_empty());
        assert!(notes(&found).iter().any(|n| n.contains("--reuse-port")));
    }

    /// The shipped haproxy.cfg against the shipped supervisor files: one process as
    /// shipped, two once the environment names the second (and the agent ports follow).
    #[test]
    fn the_shipped_haproxy_cfg_agrees_with_the_shipped_supervisor_files() {
        let cfg = include_str!("../haproxy/haproxy.cfg");
        let no_env = |_: &str| None;
        let one = supervisor_runs(
            include_str!("../supervisor/herald.conf"),
            &settings(),
            &no_env,
        );
        let found = assess_haproxy(cfg, 10_000, &one, &no_env);
        assert!(fails(&found).is_empty(), "{:?}", fails(&found));
        assert!(
            !found.iter().any(|f| f.what.contains("herald2")),
            "herald2 is inside .if defined(HERALD_BACKEND2)"
        );
        let two = supervisor_runs(
            include_str!("../supervisor/herald-redis.conf"),
            &settings(),
            &no_env,
        );
        let env = |name: &str| {
            match name {
                "HERALD_BACKEND" => Some("127.0.0.1:8081"),
                "HERALD_AGENT_PORT" => Some("9081"),
                "HERALD_BACKEND2" => Some("127.0.0.1:8082"),
                _ => None,
            }
            .map(str::to_string)
        };
        let found = assess_haproxy(cfg, 10_000, &two, &env);
        assert!(fails(&found).is_empty(), "{:?}", fails(&found));
        assert_eq!(
            found
                .iter()
                .filter(|f| f.what.contains("agent-port 908"))
                .count(),
            2,
            "{found:?}"
        );
        // Forgetting HERALD_AGENT_PORT leaves herald1 asking process 1's agent on 9080.
        let forgot = |name: &str| env(name).filter(|_| name != "HERALD_AGENT_PORT");
        let found = assess_haproxy(cfg, 10_000, &two, &forgot);
        assert_eq!(fails(&found).len(), 1, "{found:?}");
        assert!(
            fails(&found)[0].contains("agent-port 9080 against the --agent-listen 127.0.0.1:9081")
        );
    }
}
