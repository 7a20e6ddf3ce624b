//! Integration tests: each runs the built `herald` binary on an ephemeral loopback port.

mod auth;
mod deploy;
mod drain;
mod echo;
mod fuzz;
mod hostile;
mod http;
mod limits;
mod liveness;
mod overload;
mod redis;
mod topics;
mod util;
