//! Private topics and signed client tokens, with tokens minted in the tests as an
//! application would mint them.

use std::process::Command;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

use crate::util::{Client, Herald, eventually, next_json, require, send_json, without_position};

const SECRET: &str = "a-test-secret-of-enough-length";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims for user `sub`, granted `topics`, expiring `exp_in` seconds from now.
fn claims(sub: &str, topics: &[&str], exp_in: i64) -> Value {
    json!({"sub": sub, "exp": now() + exp_in, "topics": topics})
}

fn hs256(claims: &Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn server(extra: &[&str]) -> Herald {
    let mut args = vec!["--token-secret", SECRET, "--private-topics", "user:*,admin"];
    args.extend_from_slice(extra);
    Herald::start(&args)
}

fn subscribe(ws: &mut Client, topic: &str) -> Value {
    send_json(ws, json!({"op":"subscribe","topic":topic}));
    next_json(ws)
}

fn auth(ws: &mut Client, token: &str) -> Value {
    send_json(ws, json!({"op":"auth","token":token}));
    next_json(ws)
}

fn base64url(bytes: &[u8]) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn an_hs256_grant_opens_exactly_its_private_topics() {
    let herald = server(&[]);
    let token = hs256(&claims("42", &["user:42"], 60), SECRET);
    let mut ws = herald.ws(&format!("/ws?token={token}"));
    assert_eq!(
        without_position(subscribe(&mut ws, "user:42")),
        json!({"op":"subscribed","topic":"user:42","sub":"42"})
    );
    let refused = subscribe(&mut ws, "user:43");
    assert_eq!(
        (refused["op"].as_str(), refused["error"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    assert_eq!(
        subscribe(&mut ws, "news")["op"],
        "subscribed",
        "public topics stay public"
    );
    assert_eq!(herald.publish("user:42", "\"for 42\"")["delivered"], 1);
    assert_eq!(next_json(&mut ws)["data"], "for 42");
    assert_eq!(herald.publish("user:43", "\"for 43\"")["delivered"], 0);
    // The log reaches us through a thread that reads herald's stderr: wait for it.
    assert!(
        eventually(Duration::from_secs(5), || herald
            .log()
            .contains("token accepted for sub Some(\"42\")")),
        "{}",
        herald.log()
    );
}

#[test]
fn without_a_token_private_topics_are_forbidden_until_auth() {
    let herald = server(&[]);
    let mut ws = herald.ws("/ws");
    assert_eq!(subscribe(&mut ws, "admin")["error"], "forbidden");
    let reply = auth(&mut ws, &hs256(&claims("root", &["admin"], 60), SECRET));
    assert_eq!(
        (reply["op"].as_str(), reply["sub"].as_str()),
        (Some("authenticated"), Some("root"))
    );
    assert_eq!(subscribe(&mut ws, "admin")["op"], "subscribed");
}

#[test]
fn pattern_grants_cover_prefixes() {
    let herald = server(&[]);
    let token = hs256(&claims("7", &["user:7:*"], 60), SECRET);
    let mut ws = herald.ws(&format!("/ws?token={token}"));
    assert_eq!(subscribe(&mut ws, "user:7:feed")["op"], "subscribed");
    assert_eq!(subscribe(&mut ws, "user:7:mail")["op"], "subscribed");
    assert_eq!(subscribe(&mut ws, "user:70")["error"], "forbidden");
}

#[test]
fn an_rs256_grant_verified_with_a_generated_public_key() {
    require("openssl", "openssl");
    let dir = std::env::temp_dir().join(format!("herald-rs256-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = (dir.join("key.pem"), dir.join("public.pem"));
    assert!(
        Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .output()
            .unwrap()
            .status
            .success()
    );
    let out = Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let herald = Herald::start(&[
        "--token-public-key",
        public.to_str().unwrap(),
        "--private-topics",
        "user:*",
    ]);
    let signing = EncodingKey::from_rsa_pem(&std::fs::read(&key).unwrap()).unwrap();
    let token = encode(
        &Header::new(Algorithm::RS256),
        &claims("9", &["user:9"], 60),
        &signing,
    )
    .unwrap();
    let mut ws = herald.ws(&format!("/ws?token={token}"));
    assert_eq!(
        without_position(subscribe(&mut ws, "user:9")),
        json!({"op":"subscribed","topic":"user:9","sub":"9"})
    );

    // The classic confusion attack: HS256 "signed" with the public key as the secret.
    let public_pem = std::fs::read_to_string(&public).unwrap();
    let forged = hs256(&claims("9", &["user:*"], 60), &public_pem);
    let reply = auth(&mut ws, &forged);
    assert_eq!(reply["error"], "invalid_token", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("not accepted"),
        "{reply}"
    );
    assert_eq!(
        subscribe(&mut ws, "user:10")["error"],
        "forbidden",
        "the failed auth granted nothing"
    );
}

#[test]
fn bad_tokens_are_refused_with_the_right_code() {
    let herald = server(&[]);
    let mut ws = herald.ws("/ws");
    let cases = [
        (
            hs256(&claims("1", &["user:1"], -120), SECRET),
            "token_expired",
        ),
        (
            hs256(
                &json!({"sub":"1","exp": now() + 600, "nbf": now() + 300, "topics":["user:1"]}),
                SECRET,
            ),
            "invalid_token",
        ),
        (
            hs256(&claims("1", &["user:1"], 60), "some-other-secret-entirely"),
            "invalid_token",
        ),
        (
            hs256(&json!({"sub":"1","topics":["user:1"]}), SECRET),
            "invalid_token",
        ),
        (
            format!(
                "{}.{}.",
                base64url(br#"{"alg":"none","typ":"JWT"}"#),
                base64url(claims("1", &["user:1"], 60).to_string().as_bytes())
            ),
            "invalid_token",
        ),
        ("not.a.token".to_string(), "invalid_token"),
    ];
    for (token, code) in cases {
        let reply = auth(&mut ws, &token);
        assert_eq!(
            (reply["op"].as_str(), reply["error"].as_str()),
            (Some("error"), Some(code)),
            "{token}: {reply}"
        );
        assert_eq!(subscribe(&mut ws, "user:1")["error"], "forbidden");
    }
    // A bad token at connect: the connection opens and says why the token was refused.
    let bad = hs256(&claims("1", &["user:1"], 60), "some-other-secret-entirely");
    let mut ws = herald.ws(&format!("/ws?token={bad}&topics=news,user:1"));
    let first = next_json(&mut ws);
    assert_eq!(first["error"], "invalid_token", "{first}");
    assert_eq!(next_json(&mut ws)["error"], "forbidden");
    assert_eq!(
        without_position(next_json(&mut ws)),
        json!({"op":"subscribed","topic":"news"})
    );
    // Six refused auths and their six forbidden subscribes, then these two at connect.
    assert_eq!(herald.metric("herald_op_errors_total"), 14.0);
}

#[test]
fn an_expiring_grant_ends_private_subscriptions_and_auth_restores_them() {
    let herald = server(&[]);
    let token = hs256(&claims("5", &["user:5"], 2), SECRET);
    let mut ws = herald.ws(&format!("/ws?token={token}&topics=news,user:5"));
    assert_eq!(next_json(&mut ws)["topic"], "news");
    assert_eq!(
        without_position(next_json(&mut ws)),
        json!({"op":"subscribed","topic":"user:5","sub":"5"})
    );
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(6)))
        .unwrap();
    assert_eq!(
        next_json(&mut ws),
        json!({"op":"unsubscribed","topic":"user:5","reason":"token_expired"})
    );
    // The public subscription goes on; the private one is gone.
    assert_eq!(herald.publish("news", "1")["delivered"], 1);
    assert_eq!(next_json(&mut ws)["topic"], "news");
    assert_eq!(herald.publish("user:5", "2")["delivered"], 0);
    assert_eq!(subscribe(&mut ws, "user:5")["error"], "forbidden");
    // A fresh token restores the right to subscribe.
    let fresh = hs256(&claims("5", &["user:5"], 60), SECRET);
    assert_eq!(auth(&mut ws, &fresh)["op"], "authenticated");
    assert_eq!(subscribe(&mut ws, "user:5")["op"], "subscribed");
    assert_eq!(herald.publish("user:5", "3")["delivered"], 1);
}

#[test]
fn a_new_grant_ends_private_subscriptions_it_does_not_cover() {
    let herald = server(&[]);
    let mut ws = herald.ws(&format!(
        "/ws?token={}",
        hs256(&claims("5", &["user:*"], 60), SECRET)
    ));
    assert_eq!(subscribe(&mut ws, "user:6")["op"], "subscribed");
    assert_eq!(
        auth(&mut ws, &hs256(&claims("5", &["user:5"], 60), SECRET))["op"],
        "authenticated"
    );
    assert_eq!(
        next_json(&mut ws),
        json!({"op":"unsubscribed","topic":"user:6","reason":"not_granted"})
    );
}

#[test]
fn grants_may_allow_publishing() {
    let herald = server(&[]);
    let mut listener = herald.ws(&format!(
        "/ws?token={}",
        hs256(&claims("a", &["user:a"], 60), SECRET)
    ));
    assert_eq!(subscribe(&mut listener, "user:a")["op"], "subscribed");
    let grant = json!({"sub":"b","exp": now() + 60, "topics": [], "publish": ["user:a"]});
    let mut writer = herald.ws(&format!("/ws?token={}", hs256(&grant, SECRET)));
    send_json(
        &mut writer,
        json!({"op":"publish","topic":"user:a","data":"hi"}),
    );
    assert_eq!(next_json(&mut listener)["data"], "hi");
    send_json(
        &mut writer,
        json!({"op":"publish","topic":"user:b","data":"no"}),
    );
    assert_eq!(next_json(&mut writer)["error"], "forbidden");
}

#[test]
fn require_token_refuses_handshakes_without_a_valid_one() {
    let herald = server(&["--require-token"]);
    let handshake = |query: &str| {
        herald.request(&format!(
            "GET /ws{query} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ))
    };
    let r = handshake("");
    assert_eq!((r.status, r.text().as_str()), (401, "token required\n"));
    let expired = hs256(&claims("1", &[], -120), SECRET);
    let r = handshake(&format!("?token={expired}"));
    assert_eq!((r.status, r.text().as_str()), (401, "token expired\n"));
    let r = handshake(&format!(
        "?token={}",
        hs256(&claims("1", &[], 60), "some-other-secret-entirely")
    ));
    assert_eq!(r.status, 401);
    assert!(r.text().starts_with("invalid token"), "{}", r.text());
    let good = hs256(&claims("1", &["user:1"], 60), SECRET);
    assert_eq!(handshake(&format!("?token={good}")).status, 101);
}

#[test]
fn private_topics_need_a_key_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["--listen", "127.0.0.1:0", "--private-topics", "user:*"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-secret"));
}
