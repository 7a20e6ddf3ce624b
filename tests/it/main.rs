//! Integration tests: each runs the built `herald` binary on an ephemeral loopback port.

mod agent;
mod auth;
mod callbacks;

mod cluster;
mod compression;
mod deploy;
mod drain;
mod echo;
mod fuzz;
mod history;
mod hostile;
mod http;
mod layout;
mod limits;
mod liveness;
mod overload;
mod package;
mod platform;

mod per_ip;
mod presence;
mod probe;
mod redis;
mod redis_history;
mod restarts;
mod sentinel;
mod signals;
mod statsd;
mod topics;
mod upgrade;
mod util;
