//! The files herald serves itself, embedded in the binary: the browser client
//! (`GET /herald.js`, so a page can import it from the server it talks to) and the
//! console page (`GET /`, unless `--no-console`). Each has an ETag computed from its
//! bytes, so a browser revalidates cheaply and never runs a stale client after an
//! upgrade. Pure: the front door sends what `respond` returns.

use std::hash::{DefaultHasher, Hash, Hasher};

use crate::http::Response;

/// An embedded file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asset {
    Client,
    Console,
}

const CLIENT: &[u8] = include_bytes!("../../client/herald.js");
const CONSOLE: &[u8] = include_bytes!("../../client/console.html");

impl Asset {
    fn bytes(self) -> &'static [u8] {
        match self {
            Asset::Client => CLIENT,
            Asset::Console => CONSOLE,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Asset::Client => "text/javascript; charset=utf-8",
            Asset::Console => "text/html; charset=utf-8",
        }
    }

    /// A strong validator: a hash of the bytes, quoted as RFC 9110 §8.8.3 wants.
    pub fn etag(self) -> String {
        let mut h = DefaultHasher::new();
        self.bytes().hash(&mut h);
        format!("\"{:016x}\"", h.finish())
    }

    /// 200 with the file, or 304 when the client's copy is current.
    pub fn respond(self, if_none_match: Option<&str>) -> Response {
        let etag = self.etag();
        let current = if_none_match
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
        let response = if current {
            Response::new(304, self.content_type(), Vec::new())
        } else {
            Response::new(200, self.content_type(), self.bytes().to_vec())
        };
        // Revalidate every time: cheap with the ETag, and an upgraded herald's client
        // is picked up at once.
        let response = response
            .header("ETag", etag)
            .header("Cache-Control", "no-cache");
        match self {
            // The console runs only its own script and talks only to this server.
            Asset::Console => response.header(
                "Content-Security-Policy",
                "default-src 'self'; script-src 'self' 'unsafe-inline'; \
                 style-src 'self' 'unsafe-inline'; connect-src 'self' ws: wss:",
            ),
            // Any page may import the client from herald's origin (an ES module across
            // origins needs CORS); it carries no secret.
            Asset::Client => response.header("Access-Control-Allow-Origin", "*"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_current_etag_gets_304_and_another_gets_the_file() {
        let etag = Asset::Client.etag();
        assert_eq!(Asset::Client.respond(Some(&etag)).status, 304);
        assert!(Asset::Client.respond(Some(&etag)).body.is_empty());
        let full = Asset::Client.respond(Some("\"stale\""));
        assert_eq!((full.status, full.body.as_slice()), (200, CLIENT));
        assert_eq!(Asset::Console.respond(None).status, 200);
        assert_ne!(Asset::Client.etag(), Asset::Console.etag());
    }
}
