//! The operator's probes: commands that look at a running deployment from outside, as
//! its clients do. `live` is `herald check --live` (a deployment checked end to end),
//! `tail` is `herald tail` (a subscriber for a terminal), and `client` the blocking
//! WebSocket and HTTP client under both. None of it runs inside the server: these are
//! separate processes with blocking sockets and timeouts, and the server's modules
//! never use them.

pub mod client;
pub mod live;
pub mod tail;
