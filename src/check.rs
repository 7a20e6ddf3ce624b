//! `herald check`: can this host, and these deployment files, hold N connections? Reads
//! the live limits and sysctls (`Host::read`, the only I/O here besides reading the
//! files), then decides with pure functions: each finding says what was measured, what N
//! needs, and the exact command or config line that closes a gap.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{CheckArgs, Config};
use crate::rlimit::FD_RESERVE;

/// Memory to budget per connection: herald's own ~0.9 KiB (README, measured) plus the
/// kernel's ~5 KiB per socket, with headroom for buffers of active connections.
const BYTES_PER_CONNECTION: u64 = 8 * 1024;
/// systemd's default hard RLIMIT_NOFILE for services (since v240) when a unit sets none.
const SYSTEMD_DEFAULT_NOFILE: u64 = 524_288;
/// supervisord's default `minfds` and `stopwaitsecs`.
const SUPERVISOR_DEFAULT_MINFDS: u64 = 1024;
const SUPERVISOR_DEFAULT_STOPWAIT: u64 = 10;
/// systemd's default TimeoutStopSec.
const SYSTEMD_DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(90);

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
        let mem_available_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        });
        Host {
            nofile_soft: if ok { lim.rlim_cur as u64 } else { 0 },
            nofile_hard: if ok { lim.rlim_max as u64 } else { 0 },
            file_max: number("fs.file-max"),
            nr_open: number("fs.nr_open"),
            somaxconn: number("net.core.somaxconn"),
            tcp_max_syn_backlog: number("net.ipv4.tcp_max_syn_backlog"),
            port_range,
            mem_available_kib,
        }
    }
}

/// herald's settings that the checks compare against.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub drain_timeout: Duration,
    pub ping_interval: Duration,
    pub backlog: u64,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            drain_timeout: cfg.drain_timeout,
            ping_interval: cfg.ping_interval,
            backlog: cfg.backlog.max(0) as u64,
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
        Finding {
            verdict: Verdict::Note,
            what,
            fix: Vec::new(),
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
    if let Some(kib) = host.mem_available_kib {
        let need_kib = n * BYTES_PER_CONNECTION / 1024;
        out.push(Finding::judge(
            kib >= need_kib,
            format!("memory: {} MiB available for about {} MiB ({} KiB per connection, herald and kernel)", kib / 1024, need_kib / 1024, BYTES_PER_CONNECTION / 1024),
            vec!["a larger host, or more hosts sharing topics through Redis".to_string()],
        ));
    }
    out
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

/// Settings as a file runs herald: its command line and environment win over ours.
fn effective(settings: &Settings, command: &str, env: &str) -> Settings {
    let secs = |flag: &str, fallback: Duration| {
        herald_setting(command, env, flag)
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(fallback)
    };
    Settings {
        drain_timeout: secs("drain-timeout", settings.drain_timeout),
        ping_interval: secs("ping-interval", settings.ping_interval),
        backlog: settings.backlog,
    }
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

pub fn assess_haproxy(
    text: &str,
    n: u64,
    settings: &Settings,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut tunnel: Vec<Duration> = Vec::new();
    let mut maxconn: Option<u64> = None;
    // (name, value, overrides the environment)
    let mut set: Vec<(String, String, bool)> = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            [s, ..]
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
            _ => {}
        }
    }
    let ping = settings.ping_interval;
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
    let mut sections: Vec<(String, Vec<Finding>)> =
        vec![("host".into(), assess_host(&Host::read(), n, settings))];
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
    };
    if let Some(path) = &args.supervisor {
        let text = with_supervisor_includes(path, &read(path)?)?;
        sections.push((
            path.display().to_string(),
            assess_supervisor(&text, n, settings),
        ));
    }
    if let Some(path) = &args.systemd {
        sections.push((
            path.display().to_string(),
            assess_systemd(&read(path)?, n, settings),
        ));
    }
    if let Some(path) = &args.haproxy {
        let env = |name: &str| std::env::var(name).ok();
        let text = read(path)?;
        sections.push((
            path.display().to_string(),
            assess_haproxy(&text, n, settings, &env),
        ));
    }
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
            ping_interval: Duration::from_secs(25),
            backlog: 4096,
        }
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
        assert!(fails(&assess_haproxy(good, 50_000, &settings(), &no_env)).is_empty());
        let bad = "global\n  maxconn 2000\ndefaults\n  timeout tunnel 30000\n";
        assert_eq!(
            fails(&assess_haproxy(bad, 50_000, &settings(), &no_env)).len(),
            2
        );
        assert_eq!(
            fails(&assess_haproxy("defaults\n", 10, &settings(), &no_env)).len(),
            2
        );
        // "${VAR}": the environment wins over presetenv, setenv wins over both.
        let preset =
            "global\n  presetenv MC 100000\n  maxconn \"${MC}\"\ndefaults\n  timeout tunnel 1h\n";
        assert!(fails(&assess_haproxy(preset, 50_000, &settings(), &no_env)).is_empty());
        let small = |name: &str| (name == "MC").then(|| "8000".to_string());
        assert_eq!(
            fails(&assess_haproxy(preset, 50_000, &settings(), &small)).len(),
            1
        );
        let forced = preset.replace("presetenv", "setenv");
        assert!(fails(&assess_haproxy(&forced, 50_000, &settings(), &small)).is_empty());
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
}
