//! The signature on every request herald makes to the application (callbacks and
//! webhooks), so the application can reject forgeries and replays.
//!
//! What is signed, exactly: the ASCII decimal Unix time in seconds (`X-Herald-Timestamp`),
//! a `.`, then the request body byte for byte. The signature is HMAC-SHA256 of that under
//! `--auth-secret`, sent as `X-Herald-Signature: sha256=<64 lowercase hex digits>`. The
//! timestamp is inside the MAC, so a captured request cannot be replayed later with a
//! fresh timestamp; the application refuses timestamps older than its window (the README
//! suggests 5 minutes) and compares signatures in constant time. Stripe and Slack sign
//! webhooks the same way, so applications often have the code already.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const TIMESTAMP_HEADER: &str = "X-Herald-Timestamp";
pub const SIGNATURE_HEADER: &str = "X-Herald-Signature";

/// `sha256=<hex>` of `timestamp + "." + body` under `secret`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    // HMAC takes a key of any length (RFC 2104 §3), so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in digest {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 15)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rfc_4231_test_case_2() {
        // RFC 4231 §4.3 (test case 2): the HMAC underneath is the standard one.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn signs_timestamp_dot_body() {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"k").unwrap();
        mac.update(b"1700000000.{\"a\":1}");
        let expected: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            signature(b"k", 1_700_000_000, br#"{"a":1}"#),
            format!("sha256={expected}")
        );
        assert_ne!(
            signature(b"k", 1_700_000_001, br#"{"a":1}"#),
            signature(b"k", 1_700_000_000, br#"{"a":1}"#),
            "the timestamp is signed"
        );
        assert_ne!(
            signature(b"other", 1_700_000_000, br#"{"a":1}"#),
            signature(b"k", 1_700_000_000, br#"{"a":1}"#)
        );
    }
}
