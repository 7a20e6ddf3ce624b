//! PaaS conventions (Heroku, Fly, Render): `PORT` alone binds every interface, `HOST` and
//! `--listen` win over it, and `herald check` reports the platform limits it can see.

use std::net::SocketAddr;
use std::process::{Command, Output};

use crate::util::{Herald, HttpConn, free_port, require};

/// Variables that would change what these tests see, whatever the environment they run in.
const PLATFORM_VARS: &[&str] = &[
    "PORT",
    "HOST",
    "HERALD_LISTEN",
    "DYNO",
    "FLY_APP_NAME",
    "RENDER",
];

fn herald_with(vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    for var in PLATFORM_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(vars.iter().copied());
    cmd
}

/// Whether the kernel has a TCP socket listening on `0.0.0.0:port` (what `ss -ltn` reads:
/// /proc/net/tcp, local address in hex, state 0A = LISTEN).
fn listening_on_any(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!("00000000:{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A")
    })
}

#[test]
fn port_alone_binds_every_interface_and_says_why() {
    let port = free_port();
    let herald = Herald::spawn(herald_with(&[("PORT", &port.to_string())]));
    assert_eq!(herald.addr, SocketAddr::from(([0, 0, 0, 0], port)));
    assert!(listening_on_any(port), "no listener on 0.0.0.0:{port}");
    assert!(
        herald.log().contains(&format!(
            "binding 0.0.0.0:{port}: PORT is set and neither HOST nor --listen is"
        )),
        "{}",
        herald.log()
    );
    // Reachable on loopback like any interface.
    let mut conn = HttpConn::connect(SocketAddr::from(([127, 0, 0, 1], port)));
    let r = conn.exchange(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
}

#[test]
fn host_or_listen_win_over_port() {
    let port = free_port();
    let herald = Herald::spawn(herald_with(&[
        ("PORT", &port.to_string()),
        ("HOST", "127.0.0.1"),
    ]));
    assert_eq!(herald.addr, SocketAddr::from(([127, 0, 0, 1], port)));
    assert!(!listening_on_any(port));
    assert!(!herald.log().contains("binding "), "{}", herald.log());
    drop(herald);

    for (flag, vars) in [
        (true, vec![("PORT", port.to_string())]),
        (
            false,
            vec![
                ("PORT", port.to_string()),
                ("HERALD_LISTEN", "127.0.0.1:0".to_string()),
            ],
        ),
    ] {
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut cmd = herald_with(&vars);
        if flag {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let herald = Herald::spawn(cmd);
        assert!(herald.addr.ip().is_loopback(), "{}", herald.addr);
        assert_ne!(herald.addr.port(), port);
        assert!(!herald.log().contains("binding "), "{}", herald.log());
    }
}

/// `herald ARGS` (a `check`) under a fixed fd limit, as a dyno has, with `vars` as the
/// only platform variables.
fn check(vars: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    require("prlimit", "util-linux");
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=10000:10000", "--", env!("CARGO_BIN_EXE_herald")])
        .args(args);
    for var in PLATFORM_VARS {
        cmd.env_remove(var);
    }
    let Output { status, stdout, .. } = cmd.envs(vars.iter().copied()).output().expect("prlimit");
    (status.code(), String::from_utf8_lossy(&stdout).into_owned())
}

#[test]
fn check_reports_the_platform_limits_it_sees() {
    let on_heroku = [("DYNO", "web.1"), ("PORT", "5000")];
    let (_, out) = check(&on_heroku, &["check", "--connections", "5000"]);
    for line in [
        "\nplatform:\n",
        "note  platform: Heroku (DYNO=web.1)",
        "ok    PORT=5000: herald binds 0.0.0.0:5000, every interface",
        "ok    connection budget: fd limit 10000 (hard) gives up to 9936 connections per process",
        "ok    --ping-interval 25s against Heroku's router idle timeout of 55s",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }

    // More connections than one dyno's descriptors, pings slower than the router's idle
    // timeout, and an address the router cannot reach: each fails with its fix.
    let (code, out) = check(
        &on_heroku,
        &[
            "--listen",
            "127.0.0.1:8080",
            "--ping-interval",
            "60",
            "check",
            "--connections",
            "20000",
        ],
    );
    assert_eq!(code, Some(1), "{out}");
    for line in [
        "FAIL  PORT=5000, but herald binds 127.0.0.1:8080: --listen (or HERALD_LISTEN) wins over PORT",
        "fix: or --listen 0.0.0.0:5000",
        "FAIL  connection budget: fd limit 10000 (hard) gives up to 9936 connections per process",
        "fix: Heroku fixes the fd limit per instance: run 3 instances sharing topics through --redis",
        "FAIL  --ping-interval 60s against Heroku's router idle timeout of 55s",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }

    let (_, out) = check(&[("FLY_APP_NAME", "push")], &["check"]);
    assert!(
        out.contains("note  platform: Fly.io (FLY_APP_NAME=push)"),
        "{out}"
    );
    assert!(
        out.contains("note  PORT is not set: herald binds 127.0.0.1:8080"),
        "{out}"
    );
    let (_, out) = check(&[], &["check"]);
    assert!(
        out.contains(
            "note  platform: none recognised (no DYNO, FLY_APP_NAME, RENDER in the environment)"
        ),
        "{out}"
    );
}

#[test]
fn the_procfile_serves_on_the_platforms_port() {
    // Heroku runs the `web` line with PORT set, in the app's directory, where its Rust
    // buildpack leaves target/release/herald; here that path is this build.
    let procfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Procfile"))
        .expect("Procfile");
    let web = procfile
        .lines()
        .find_map(|l| l.strip_prefix("web:"))
        .expect("a web process")
        .trim()
        .to_string();
    let app = std::env::temp_dir().join(format!("herald-procfile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&app);
    std::fs::create_dir_all(app.join("target/release")).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_herald"),
        app.join("target/release/herald"),
    )
    .unwrap();
    let port = free_port();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &format!("exec {web}")]).current_dir(&app);
    for var in PLATFORM_VARS {
        cmd.env_remove(var);
    }
    cmd.env("PORT", port.to_string()).env("DYNO", "web.1");
    let herald = Herald::spawn(cmd);
    assert_eq!(herald.addr, SocketAddr::from(([0, 0, 0, 0], port)));
    assert!(listening_on_any(port));
    drop(herald);
    let _ = std::fs::remove_dir_all(&app);
}
