//! Integration tests: each runs the built `herald` binary on an ephemeral loopback port.

mod drain;
mod echo;
mod http;
mod limits;
mod topics;
mod util;
