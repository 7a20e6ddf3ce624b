//! Private topics: who may subscribe where, decided by a JWT the application signs for
//! the client. A token is verified once, when it is presented (`?token=` or the `auth`
//! op), and becomes a `Grant` the session keeps: subscribes and publishes check the grant's
//! patterns, never the token, and fan-out does not change at all.
//!
//! Only the algorithms the configured keys imply are accepted: HS256 with
//! `--token-secret`, RS256 or ES256 with `--token-public-key` (by the key's type). A token
//! naming another algorithm is refused before any signature check, which is what defeats
//! `alg: none` and HS256 tokens "signed" with the public key.

use std::collections::HashSet;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

use crate::topic::Patterns;

/// Clock difference tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 5;

/// What a valid token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The user, as the application names it.
    pub sub: Option<String>,
    /// Unix seconds after which the grant is void.
    pub exp: u64,
    /// Private topics the client may subscribe to.
    pub topics: Patterns,
    /// Topics the client may publish to (on top of `--client-publish`).
    pub publish: Patterns,
    /// Private topics the application refused this connection (`--auth-subscribe`): not
    /// asked again. Empty, and unallocated, otherwise.
    pub refused: Patterns,
}

/// Why a token was refused; `code()` is the `error` the client sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Invalid(String),
    Expired,
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Invalid(_) => "invalid_token",
            TokenError::Expired => "token_expired",
        }
    }

    pub fn message(&self) -> String {
        match self {
            TokenError::Invalid(why) => format!("invalid token: {why}"),
            TokenError::Expired => "token expired".to_string(),
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: u64,
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// The configured keys, each with the one algorithm it implies.
pub struct Verifier {
    keys: Vec<(Algorithm, DecodingKey)>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algs: Vec<_> = self.keys.iter().map(|(a, _)| a).collect();
        write!(f, "Verifier({algs:?})")
    }
}

impl Verifier {
    /// `None` when no key is configured (then no topic can be private).
    pub fn new(
        secret: Option<&str>,
        public_key_pem: Option<&[u8]>,
    ) -> Result<Option<Verifier>, String> {
        let mut keys = Vec::new();
        if let Some(secret) = secret {
            if secret.len() < 16 {
                return Err("--token-secret must be at least 16 bytes".into());
            }
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(secret.as_bytes()),
            ));
        }
        if let Some(pem) = public_key_pem {
            let key = match (
                DecodingKey::from_rsa_pem(pem),
                DecodingKey::from_ec_pem(pem),
            ) {
                (Ok(rsa), _) => (Algorithm::RS256, rsa),
                (_, Ok(ec)) => (Algorithm::ES256, ec),
                (Err(e), _) => {
                    return Err(format!(
                        "--token-public-key is neither an RSA nor an EC public key in PEM: {e}"
                    ));
                }
            };
            keys.push(key);
        }
        Ok((!keys.is_empty()).then_some(Verifier { keys }))
    }

    /// Check the token's algorithm, signature, `exp` (required) and `nbf`; return what it
    /// grants.
    pub fn verify(&self, token: &str) -> Result<Grant, TokenError> {
        let header = decode_header(token)
            .map_err(|e| TokenError::Invalid(format!("unreadable header ({e})")))?;
        let Some((alg, key)) = self.keys.iter().find(|(alg, _)| *alg == header.alg) else {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} is not accepted here",
                header.alg
            )));
        };
        let mut validation = Validation::new(*alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::from(["exp".to_string()]);
        let data = decode::<Claims>(token, key, &validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
            jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                TokenError::Invalid("not valid yet (nbf)".into())
            }
            jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                TokenError::Invalid("bad signature".into())
            }
            jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(c) => {
                TokenError::Invalid(format!("missing claim {c}"))
            }
            other => TokenError::Invalid(format!("{other:?}")),
        })?;
        let claims = data.claims;
        let patterns = |list: &[String], what: &str| {
            Patterns::parse(&list.join(","))
                .map_err(|e| TokenError::Invalid(format!("claim {what}: {e}")))
        };
        Ok(Grant {
            sub: claims.sub,
            exp: claims.exp,
            topics: patterns(&claims.topics, "topics")?,
            publish: patterns(&claims.publish, "publish")?,
            refused: Patterns::default(),
        })
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
