//! Answering the WebSocket opening handshake ourselves (RFC 6455 §4.2), from a request
//! `http.rs` already parsed: which checks apply, in which order, and the 101 response.
//! Owning this front door is what lets bytes pipelined behind the GET reach the
//! WebSocket, which `tungstenite::accept` would refuse. It also picks the
//! permessage-deflate offer to accept, if any (RFC 7692; the rules are `ws::deflate`'s).

use tungstenite::handshake::derive_accept_key;

use crate::close::Reject;
use crate::http::{Method, Request, Response};
use crate::ws::deflate::{self, Agreement, SHARED_WINDOW};
use crate::ws::protocol::Kind;

/// Check an upgrade request; on success return the `Sec-WebSocket-Accept` value.
pub fn check(req: &Request, allowed_origins: Option<&[String]>) -> Result<String, Reject> {
    if req.method != Method::Get {
        return Err(Reject::MethodNotAllowed("GET"));
    }
    let wants_websocket = req.upgrade.as_deref().is_some_and(|u| {
        u.split(',')
            .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
    });
    if !wants_websocket || !req.connection_upgrade || req.ws_version.as_deref() != Some("13") {
        return Err(Reject::UpgradeRequired);
    }
    if !req.http11 {
        return Err(Reject::bad_request("WebSocket needs HTTP/1.1"));
    }
    let key = req.ws_key.as_deref().unwrap_or("");
    if !is_websocket_key(key) {
        return Err(Reject::bad_request(
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ));
    }
    // Browsers always send Origin; other clients may omit it (and could forge it anyway),
    // so the list restricts browsers, which is what it is for.
    if let (Some(allowed), Some(origin)) = (allowed_origins, req.origin.as_deref()) {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if !allowed.contains(&origin) {
            return Err(Reject::Forbidden("origin not allowed"));
        }
    }
    Ok(derive_accept_key(key.as_bytes()))
}

/// §4.1: the key is a base64-encoded 16-byte value: 22 symbols and `==`.
fn is_websocket_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b.ends_with(b"==")
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// The permessage-deflate offer to accept. On `/ws` only offers that let us use the
/// shared frames' window: a message is compressed once for every subscriber, so a client
/// that asks for a smaller `server_max_window_bits` would need a compression of its own;
/// that offer is declined (its next one may do, or it gets plain frames). Browsers,
/// python-websockets and Node's ws never ask. `/echo` compresses for one peer anyway, so
/// there any window zlib can make is fine (Autobahn's 13.* cases ask for 9 bits).
pub fn deflate(req: &Request, kind: Kind) -> Option<Agreement> {
    let offers = req.ws_extensions.as_deref()?;
    match kind {
        Kind::Topics => deflate::negotiate(offers, |w| w == SHARED_WINDOW),
        Kind::Echo => deflate::negotiate(offers, |_| true),
    }
}

/// The 101; `extensions`: the accepted extension, as `deflate` answered it.
pub fn switching_protocols(accept: String, extensions: Option<&str>) -> Response {
    let response = Response::new(101, "", Vec::new())
        .header("Upgrade", "websocket")
        .header("Connection", "Upgrade")
        .header("Sec-WebSocket-Accept", accept);
    match extensions {
        Some(value) => response.header("Sec-WebSocket-Extensions", value),
        None => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Parsed, parse};

    fn request(extra: &str) -> Request {
        let raw = format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
        );
        match parse(raw.as_bytes(), 0).unwrap() {
            Parsed::Complete(r, _) => *r,
            other => panic!("{other:?}"),
        }
    }

    const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

    #[test]
    fn the_rfc_example_key_gives_the_rfc_accept() {
        let req = request(&format!("{KEY}Sec-WebSocket-Version: 13\r\n"));
        assert_eq!(check(&req, None).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn deflate_is_answered_with_no_context_takeover_and_ws_keeps_the_shared_window() {
        let offer = |value: &str| {
            request(&format!(
                "{KEY}Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: {value}\r\n"
            ))
        };
        let chromium = offer("permessage-deflate; client_max_window_bits");
        let firefox = offer("permessage-deflate");
        for req in [&chromium, &firefox] {
            for kind in [Kind::Topics, Kind::Echo] {
                let agreed = deflate(req, kind).unwrap();
                assert_eq!(
                    agreed.response,
                    "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
                );
                assert_eq!(agreed.window, SHARED_WINDOW);
            }
        }
        let narrow = offer("permessage-deflate; server_max_window_bits=10");
        assert_eq!(deflate(&narrow, Kind::Topics), None);
        assert_eq!(deflate(&narrow, Kind::Echo).unwrap().window.bits(), 10);
        let without = request(&format!("{KEY}Sec-WebSocket-Version: 13\r\n"));
        assert_eq!(deflate(&without, Kind::Topics), None);
        let response = switching_protocols("x".into(), Some("permessage-deflate")).encode(false);
        let text = String::from_utf8(response).unwrap();
        assert!(
            text.contains("\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"),
            "{text}"
        );
        let plain = String::from_utf8(switching_protocols("x".into(), None).encode(false)).unwrap();
        assert!(!plain.contains("Extensions"), "{plain}");
    }

    #[test]
    fn wrong_version_or_missing_upgrade_is_426() {
        let req = request(&format!("{KEY}Sec-WebSocket-Version: 8\r\n"));
        assert_eq!(check(&req, None), Err(Reject::UpgradeRequired));
        let mut req = request(&format!("{KEY}Sec-WebSocket-Version: 13\r\n"));
        req.upgrade = None;
        assert_eq!(check(&req, None), Err(Reject::UpgradeRequired));
    }

    #[test]
    fn bad_key_is_400_and_foreign_origin_403() {
        let req = request("Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n");
        assert!(matches!(check(&req, None), Err(Reject::BadRequest(_))));
        let allowed = vec!["https://app.example".to_string()];
        let ok = request(&format!(
            "{KEY}Sec-WebSocket-Version: 13\r\nOrigin: https://APP.example\r\n"
        ));
        assert!(check(&ok, Some(&allowed)).is_ok());
        let evil = request(&format!(
            "{KEY}Sec-WebSocket-Version: 13\r\nOrigin: https://evil.example\r\n"
        ));
        assert_eq!(
            check(&evil, Some(&allowed)),
            Err(Reject::Forbidden("origin not allowed"))
        );
    }
}
