//! Answering the WebSocket opening handshake ourselves (RFC 6455 §4.2), from a request
//! `http.rs` already parsed: which checks apply, in which order, and the 101 response.
//! Owning this front door is what lets bytes pipelined behind the GET reach the
//! WebSocket, which `tungstenite::accept` would refuse.

use tungstenite::handshake::derive_accept_key;

use crate::close::Reject;
use crate::http::{Method, Request, Response};

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

pub fn switching_protocols(accept: String) -> Response {
    Response::new(101, "", Vec::new())
        .header("Upgrade", "websocket")
        .header("Connection", "Upgrade")
        .header("Sec-WebSocket-Accept", accept)
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
