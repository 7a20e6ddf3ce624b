//! herald: a WebSocket push server. Applications publish over HTTP; clients subscribe
//! to topics over WebSocket. One process is one single-threaded mio event loop.
//!
//! `main` parses flags, raises the fd limit, binds, and runs the loop; any error that
//! stops the start is printed once.

mod agent;
mod app;
mod auth;
mod check;
mod close;
mod config;
mod conn;
mod drain;
mod handover;
mod http;
mod id;
mod limits;
mod metrics;
mod outq;
mod probe;
mod pubsub;
mod reactor;
mod rlimit;
mod session;
mod statsd;
#[cfg(test)]
mod testkit;
mod timer;
mod topic;
mod ws;

use clap::Parser;
use log::info;

fn main() {
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("herald: {e}");
            std::process::exit(2);
        }
    }
}

fn run() -> Result<i32, String> {
    // A live upgrade's new binary: the old one's sockets must be handled even if this one
    // cannot start.
    let mut inherited = reactor::upgrade::take_inherited();
    if matches!(std::env::args().nth(1).as_deref(), Some("--version" | "-V")) {
        let (version, build) = metrics::build();
        // Untagged, exactly what clap would print (the package test reads it).
        match build.as_str() {
            "" => println!("herald {version}"),
            tag => println!("herald {version} (build {tag})"),
        }
        return Ok(0);
    }
    let mut args = match config::Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            reactor::upgrade::abandon(inherited, "its flags do not parse");
            e.exit()
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let (version, build) = metrics::build();
    if inherited.is_some() {
        info!("herald {version} (build {build:?}) taking over from the previous binary (SIGUSR2)");
    }
    let command = args.command.take();
    if let Some(config::Command::Tail(tail)) = &command {
        return probe::tail::run(tail);
    }
    let cfg = match args.into_config(std::env::var("HOST").ok(), std::env::var("PORT").ok()) {
        Ok(cfg) => cfg,
        Err(e) => {
            reactor::upgrade::abandon(inherited, &e);
            return Err(e);
        }
    };
    if let Some(config::Command::Check(check)) = command {
        if check.live.live.is_some() {
            return probe::live::run(&check.live, cfg.ping_interval);
        }
        let fits = check::run(&check, &check::Settings::from_config(&cfg))?;
        return Ok(if fits { 0 } else { 1 });
    }

    let nofile =
        rlimit::raise_nofile().map_err(|e| format!("reading the open-files limit: {e}"))?;
    let max_connections = cfg
        .max_connections
        .unwrap_or_else(|| rlimit::default_max_connections(nofile.soft));
    info!(
        "open-files limit: soft {} raised to {} (hard {}); max connections {}",
        nofile.before, nofile.soft, nofile.hard, max_connections
    );

    let listen = cfg.listen;
    if cfg.listen_from == config::ListenFrom::PortOnly {
        info!(
            "binding {listen}: PORT is set and neither HOST nor --listen is, so every \
             interface (a platform's router connects from outside; set HOST=127.0.0.1 to \
             stay on loopback)"
        );
    }
    let server = match reactor::Server::bind(cfg, nofile, max_connections, &mut inherited) {
        Ok(server) => server,
        Err(e) => {
            let why = format!("cannot listen on {listen}: {e}");
            reactor::upgrade::abandon(inherited, &why);
            return Err(why);
        }
    };
    info!("listening on {}", server.local_addr());
    // Under systemd (Type=notify) this is what ends "activating": the port is bound.
    let status = format!("listening on {}", server.local_addr());
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]) {
        log::warn!("sd_notify READY=1 failed: {e}");
    }
    server.run().map_err(|e| format!("event loop failed: {e}"))
}
