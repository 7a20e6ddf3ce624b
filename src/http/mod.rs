//! HTTP on the one port. Pure parts: request parsing and response encoding (`parse`),
//! routing and access rules (`api`), upgrade validation (`upgrade`), and the files herald
//! serves itself (`assets`). The front door
//! (`front`) is the handler that applies them to a connection's bytes.

pub mod api;
pub mod assets;
pub mod front;
pub mod parse;
pub mod proxy;
pub mod upgrade;

pub use parse::{Method, Parsed, Request, Response, parse};
