//! Every way herald refuses an HTTP request or ends a WebSocket, and what each one puts on
//! the wire. This is the one place that maps reasons to statuses and close codes: both
//! matches are exhaustive, so a new reason cannot reach a peer without a decision here.

use std::borrow::Cow;

use tungstenite::protocol::frame::coding::CloseCode;

use crate::limits::Limit;

/// Why an HTTP request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// The bytes are not HTTP, or the request breaks a rule (the text says which).
    BadRequest(Cow<'static, str>),
    /// `/publish` without the right `Authorization: Bearer` key.
    Unauthorized,
    /// `--require-token`: a WebSocket handshake without a valid token (why, in one line).
    TokenRequired(String),
    /// Not allowed for this peer: a foreign `Origin`, or keyless publish from afar.
    Forbidden(&'static str),
    NotFound,
    /// `GET /presence` for a topic that keeps none (not in `--presence`).
    NoPresence,
    /// The path exists; the method does not. Carries the `Allow` header value.
    MethodNotAllowed(&'static str),
    /// `Transfer-Encoding` bodies; herald reads `Content-Length` bodies only.
    LengthRequired,
    /// A body larger than `--max-message-size`.
    PayloadTooLarge,
    /// A WebSocket path without a usable upgrade (missing headers, version not 13).
    UpgradeRequired,
    /// A request head larger than `http::MAX_HEAD_BYTES` or with too many headers.
    HeadersTooLarge,
    /// The server is shutting down.
    Draining,
    /// `--max-connections` reached.
    AtCapacity,
    /// Redis is down or refused the publish: nothing was (surely) delivered.
    RedisUnavailable,
    /// A per-address limit (`--max-connections-per-ip`, `--connect-rate-per-ip`).
    Limited(Limit),
    /// A PROXY protocol header where none may be, or none where one must be, or a broken
    /// one (the text says which).
    Proxy(&'static str),
    /// A live upgrade began while the application was still deciding on this handshake.
    Upgrading,
    /// `--auth-url` answered 401 or 403: that status and the application's one-line
    /// reason. The connection closes: bytes pipelined behind the upgrade were frames.
    AppRefused(u16, String),
    /// `--auth-url` answered anything else, too late, or not at all: never an accidental
    /// allow, and the connection closes.
    AppUnavailable,
}

impl Reject {
    pub fn bad_request(why: impl Into<Cow<'static, str>>) -> Reject {
        Reject::BadRequest(why.into())
    }

    /// What this refusal puts on the wire: status, a one-line reason, whether the
    /// connection must close because the byte stream can no longer be trusted, and any
    /// headers the status calls for. `http::Response::refuse` writes it out.
    pub fn refusal(&self) -> Refusal<'_> {
        let (status, line, close): (u16, &str, bool) = match self {
            Reject::BadRequest(why) => (400, why, true),
            Reject::Unauthorized => (401, "missing or wrong API key", false),
            Reject::TokenRequired(why) => (401, why, false),
            Reject::Forbidden(why) => (403, why, false),
            Reject::NotFound => (404, "no such endpoint", false),
            Reject::NoPresence => (404, "this topic keeps no presence (see --presence)", false),
            Reject::MethodNotAllowed(_) => (405, "method not allowed here", false),
            Reject::LengthRequired => (411, "send the body with Content-Length", true),
            Reject::PayloadTooLarge => (413, "body larger than --max-message-size", true),
            Reject::UpgradeRequired => (426, "WebSocket upgrade required (version 13)", false),
            Reject::HeadersTooLarge => (431, "request head too large", true),
            Reject::Draining => (503, "draining", true),
            Reject::AtCapacity => (503, "server at connection capacity", true),
            Reject::RedisUnavailable => (503, "redis unavailable", false),
            Reject::Limited(Limit::ConnectionsPerIp) => {
                (429, "too many connections from your address", true)
            }
            Reject::Limited(Limit::ConnectRate) => {
                (429, "connecting too often from your address", true)
            }
            Reject::Proxy(why) => (400, why, true),

            Reject::AppRefused(status, why) => (*status, why.as_str(), true),
            Reject::AppUnavailable => (503, "authentication unavailable", true),
            Reject::Upgrading => (503, "server upgrading: connect again", true),
        };
        let headers = match self {
            Reject::Unauthorized => vec![("WWW-Authenticate", "Bearer")],
            Reject::MethodNotAllowed(allow) => vec![("Allow", *allow)],
            Reject::UpgradeRequired => {
                vec![("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")]
            }
            // RFC 6585 §4: when to try again. A bucket refills within seconds.
            Reject::Limited(Limit::ConnectRate) => vec![("Retry-After", "1")],
            _ => Vec::new(),
        };
        Refusal {
            status,
            line,
            close,
            headers,
        }
    }
}

/// A refusal's wire form, independent of how HTTP responses are encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal<'a> {
    pub status: u16,
    pub line: &'a str,
    /// The connection closes after this response.
    pub close: bool,
    pub headers: Vec<(&'static str, &'static str)>,
}

/// Why herald ends a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Shutdown (drain).
    GoingAway,
    /// The peer broke RFC 6455: unmasked frame, reserved bits, bad opcode, bad
    /// fragmentation, oversized or fragmented control frame.
    Protocol,
    /// A binary message on `/ws`, whose protocol is JSON text.
    Unsupported,
    /// Text that is not UTF-8.
    InvalidUtf8,
    /// A message marked compressed (RSV1, permessage-deflate) that does not inflate:
    /// RFC 7692 §8 fails the connection; its payload is not what its frame says, as
    /// with 1007's bad UTF-8.
    BadCompression,
    /// The subscriber does not read fast enough (`--send-queue-limit`).
    SlowConsumer,
    /// A frame or message larger than `--max-message-size`.
    TooBig,
    /// Ops past `--client-op-rate` after being told `rate_limited` (`limits::OP_OVERDRAFT`).
    RateLimited,
    /// A failure of ours; should not happen.
    Internal,
}

impl CloseReason {
    pub fn code(self) -> CloseCode {
        match self {
            CloseReason::GoingAway => CloseCode::Away,
            CloseReason::Protocol => CloseCode::Protocol,
            CloseReason::Unsupported => CloseCode::Unsupported,
            CloseReason::InvalidUtf8 | CloseReason::BadCompression => CloseCode::Invalid,
            CloseReason::SlowConsumer | CloseReason::RateLimited => CloseCode::Policy,
            CloseReason::TooBig => CloseCode::Size,
            CloseReason::Internal => CloseCode::Error,
        }
    }

    /// Whether to wait for the peer's close frame after sending ours. A peer that broke
    /// the protocol is not waited for: RFC 6455 §7.1.7 ("Fail the WebSocket Connection")
    /// sends the close frame and closes TCP, and its decoder state can no longer be
    /// trusted with more input anyway.
    pub fn awaits_reply(self) -> bool {
        match self {
            CloseReason::GoingAway
            | CloseReason::SlowConsumer
            | CloseReason::RateLimited
            | CloseReason::Internal => true,
            CloseReason::Protocol
            | CloseReason::Unsupported
            | CloseReason::InvalidUtf8
            | CloseReason::BadCompression
            | CloseReason::TooBig => false,
        }
    }

    /// The close frame's reason text (at most 123 bytes by RFC 6455 §5.5).
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::GoingAway => "server shutting down",
            CloseReason::Protocol => "protocol error",
            CloseReason::Unsupported => "binary messages are not accepted here",
            CloseReason::InvalidUtf8 => "text is not valid UTF-8",
            CloseReason::BadCompression => "compressed message does not inflate",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::TooBig => "message too big",
            CloseReason::RateLimited => "too many ops: rate limit exceeded",
            CloseReason::Internal => "internal error",
        }
    }
}

#[cfg(test)]
impl Reject {
    /// One of each, for tests that check every refusal.
    pub fn examples() -> Vec<Reject> {
        vec![
            Reject::bad_request("bad"),
            Reject::Unauthorized,
            Reject::TokenRequired("token required".into()),
            Reject::Forbidden("origin not allowed"),
            Reject::NotFound,
            Reject::NoPresence,
            Reject::MethodNotAllowed("GET"),
            Reject::LengthRequired,
            Reject::PayloadTooLarge,
            Reject::UpgradeRequired,
            Reject::HeadersTooLarge,
            Reject::Draining,
            Reject::AtCapacity,
            Reject::RedisUnavailable,
            Reject::Limited(Limit::ConnectionsPerIp),
            Reject::Limited(Limit::ConnectRate),
            Reject::Proxy("PROXY protocol header from an untrusted peer"),
            Reject::AppRefused(403, "banned".into()),
            Reject::AppUnavailable,
            Reject::Upgrading,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_is_one_line_of_text() {
        for reject in Reject::examples() {
            let r = reject.refusal();
            assert!(!r.line.is_empty() && !r.line.contains('\n'), "{reject:?}");
            assert!(r.status >= 400, "{reject:?}");
        }
    }

    #[test]
    fn close_reasons_use_the_product_codes() {
        let codes: Vec<u16> = [
            CloseReason::GoingAway,
            CloseReason::Protocol,
            CloseReason::Unsupported,
            CloseReason::InvalidUtf8,
            CloseReason::BadCompression,
            CloseReason::SlowConsumer,
            CloseReason::TooBig,
            CloseReason::RateLimited,
            CloseReason::Internal,
        ]
        .iter()
        .map(|r| r.code().into())
        .collect();
        assert_eq!(
            codes,
            [1001, 1002, 1003, 1007, 1007, 1008, 1009, 1008, 1011]
        );
    }
}
