//! WebSocket, as pure protocol: the RFC 6455 codec (`codec`, tungstenite on a short leash),
//! permessage-deflate (`deflate`, RFC 7692: the offer, the answer, zlib) and herald's JSON
//! ops on `/ws` (`protocol`). No sockets, no connections, no clock: the session handler
//! (`session.rs`) feeds bytes in and queues what comes out.

pub mod codec;
pub mod deflate;
pub mod protocol;
