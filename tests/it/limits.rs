//! Start-up limits and the command line.

use std::process::Command;

use crate::util::{Herald, HttpConn, require};

#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux only
fn hard_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    if lim.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    } else {
        lim.rlim_max as u64
    }
}

#[test]
fn the_fd_soft_limit_is_raised_to_the_hard_limit() {
    let hard = hard_nofile();
    assert!(hard > 256, "this test needs a hard limit above 256");
    require("prlimit", "util-linux");
    let mut cmd = Command::new("prlimit");
    cmd.args([
        "--nofile=256:",
        "--",
        env!("CARGO_BIN_EXE_herald"),
        "--listen",
        "127.0.0.1:0",
    ]);
    let herald = Herald::spawn(cmd);
    let log = herald.log();
    assert!(log.contains(&format!("soft 256 raised to {hard}")), "{log}");
    assert_eq!(herald.metric("herald_fd_limit"), hard as f64);
    assert_eq!(herald.metric("herald_max_connections"), (hard - 64) as f64);
    // And the kernel agrees.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", herald.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().nth(3),
        Some(hard.to_string().as_str()),
        "{line}"
    );
}

#[test]
fn connections_past_the_limit_get_a_one_line_503() {
    let herald = Herald::start(&["--max-connections", "3"]);
    let _a = herald.subscriber("t");
    let _b = herald.subscriber("t");
    let mut third = HttpConn::connect(herald.addr);
    third.send(b"GET /health HTTP/1.1\r\n\r\n");
    assert_eq!(third.response().status, 200);
    let mut fourth = HttpConn::connect(herald.addr);
    let r = fourth.response();
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "server at connection capacity\n");
    assert!(fourth.is_closed());
    // The third connection's scrape sees the refusal.
    third.send(b"GET /metrics HTTP/1.1\r\n\r\n");
    let m = crate::util::parse_metrics(&third.response().text());
    assert_eq!(m["herald_connections_rejected_total"], 1.0);
}

#[test]
fn help_lists_every_flag_with_its_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "listen",
        "api-key",
        "max-connections",
        "max-message-size",
        "ping-interval",
        "pong-timeout",
        "handshake-timeout",
        "keepalive-timeout",
        "send-queue-limit",
        "sndbuf",
        "drain-timeout",
        "allowed-origins",
        "client-publish",
        "backlog",
        "redis",
        "redis-prefix",
        "reuse-port",
        "private-topics",
        "token-secret",
        "token-public-key",
        "require-token",
        "compression",
        "no-compression",
        "compression-min-size",
        "statsd",
        "statsd-interval",
        "statsd-prefix",
        "statsd-tags",
        "trusted-proxies",
        "require-proxy-protocol",
        "max-connections-per-ip",
        "connect-rate-per-ip",
        "connect-burst-per-ip",
        "client-op-rate",
        "client-op-burst",
        "max-subscriptions",
        "metrics-listen",
    ] {
        assert!(
            help.contains(&format!("--{flag}")),
            "--{flag} missing:\n{help}"
        );
        let var = format!("HERALD_{}", flag.to_uppercase().replace('-', "_"));
        assert!(help.contains(&var), "{var} missing:\n{help}");
    }
    for default in ["65536", "1048576", "4096", "127.0.0.1:8080"] {
        assert!(help.contains(default), "default {default} missing:\n{help}");
    }
}

#[test]
fn port_and_host_variables_choose_the_address_and_lose_to_listen() {
    let free = crate::util::free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.env("PORT", free.to_string()).env("HOST", "127.0.0.1");
    let herald = Herald::spawn(cmd);
    assert_eq!(herald.addr.port(), free);
    drop(herald);

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.env("PORT", free.to_string())
        .env("HERALD_LISTEN", "127.0.0.1:0");
    let herald = Herald::spawn(cmd);
    assert_ne!(herald.addr.port(), free);
}

#[test]
fn bad_flags_are_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["--listen", "127.0.0.1:0", "--client-publish", "no spaces"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--client-publish"));
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["--listen", "127.0.0.1:0"])
        .env("HERALD_SNDBUF", "1024")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--sndbuf 1024") && stderr.contains("4096"),
        "{stderr}"
    );
}
