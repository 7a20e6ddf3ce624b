//! herald's JSON protocol on `/ws`, as pure functions: client ops parsed from text, and
//! replies encoded as frames. What an op does is decided by the session handler
//! (`session.rs`); nothing here knows of connections or topics beyond their names.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::auth::Grant;
use crate::pubsub::presence::Snapshot;
use crate::topic;
use crate::ws::codec as ws;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/ws`: JSON ops, topics.
    Topics,
    /// `/echo`: every text and binary message comes back.
    Echo,
}

/// A client op on `/ws`, borrowing from the message text.
#[derive(Debug)]
pub enum Op<'a> {
    /// With `Some`, a resume: everything after `since` in `epoch`, then live messages.
    /// The flag is `"presence":true`: the client wants the topic's join/leave events.
    Subscribe(Cow<'a, str>, Option<Resume<'a>>, bool),
    Unsubscribe(Cow<'a, str>),
    Publish(Cow<'a, str>, &'a RawValue),
    Ping,
    /// Who is subscribed to the topic (`--presence` topics only).
    Presence(Cow<'a, str>),
    /// A (new) token: replaces the connection's grant.
    Auth(Cow<'a, str>),
}

/// Where a client left off in a topic: the last id it has, and the epoch that id is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume<'a> {
    pub since: u64,
    pub epoch: Cow<'a, str>,
}

/// A bad op: answered with an `error` message; the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: &'static str,
    pub message: Cow<'static, str>,
}

impl OpError {
    pub fn new(code: &'static str, message: impl Into<Cow<'static, str>>) -> OpError {
        OpError {
            code,
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
struct RawOp<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(default)]
    since: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
    #[serde(default)]
    presence: bool,
}

pub fn parse_op(text: &str) -> Result<Op<'_>, OpError> {
    let raw: RawOp = serde_json::from_str(text)
        .map_err(|e| OpError::new("bad_json", format!("not a JSON op object: {e}")))?;
    let op = raw
        .op
        .ok_or_else(|| OpError::new("bad_request", "missing \"op\""))?;
    let topic = || {
        let name = raw
            .topic
            .clone()
            .ok_or_else(|| OpError::new("bad_topic", "missing \"topic\""))?;
        topic::check_name(&name).map_err(|e| OpError::new("bad_topic", e))?;
        Ok::<_, OpError>(name)
    };
    match op.as_ref() {
        "subscribe" => {
            let resume = match (raw.since, raw.epoch) {
                (None, None) => None,
                (Some(since), Some(epoch)) => Some(Resume { since, epoch }),
                // An id means nothing without the epoch it belongs to: after a restart
                // that lost history, the same id names another message.
                (Some(_), None) => {
                    return Err(OpError::new(
                        "bad_request",
                        "\"since\" needs the \"epoch\" it came from",
                    ));
                }
                (None, Some(_)) => {
                    return Err(OpError::new("bad_request", "\"epoch\" needs \"since\""));
                }
            };
            Ok(Op::Subscribe(topic()?, resume, raw.presence))
        }
        "unsubscribe" => Ok(Op::Unsubscribe(topic()?)),
        "publish" => {
            let data = raw
                .data
                .ok_or_else(|| OpError::new("bad_request", "missing \"data\""))?;
            Ok(Op::Publish(topic()?, data))
        }
        "ping" => Ok(Op::Ping),
        "presence" => Ok(Op::Presence(topic()?)),
        "auth" => match raw.token {
            Some(token) => Ok(Op::Auth(token)),
            None => Err(OpError::new("bad_request", "missing \"token\"")),
        },
        other => Err(OpError::new("unknown_op", format!("unknown op {other:?}"))),
    }
}

#[derive(Serialize, Default)]
struct Reply<'a> {
    op: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

fn reply(r: &Reply) -> Bytes {
    let json = serde_json::to_vec(r).expect("serializing strings cannot fail");
    ws::text_frame(&json)
}

/// Where a topic stands when a subscription starts: its epoch and last id, and, for a
/// resume, whether everything the client missed follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position<'a> {
    pub epoch: &'a str,
    pub last_id: u64,
    pub recovered: Option<bool>,
}

/// `sub`: the user named by the connection's token, if it has one.
pub fn subscribed(topic: &str, at: &Position, sub: Option<&str>) -> Bytes {
    reply(&Reply {
        op: "subscribed",
        topic: Some(topic),
        epoch: Some(at.epoch),
        id: Some(at.last_id),
        recovered: at.recovered,
        sub,
        ..Reply::default()
    })
}

/// `reason`: why herald ended a subscription the client did not end (`token_expired`).
pub fn unsubscribed(topic: &str, reason: Option<&str>) -> Bytes {
    reply(&Reply {
        op: "unsubscribed",
        topic: Some(topic),
        reason,
        ..Reply::default()
    })
}

pub fn authenticated(grant: &Grant) -> Bytes {
    reply(&Reply {
        op: "authenticated",
        sub: grant.sub.as_deref(),
        exp: Some(grant.exp),
        ..Reply::default()
    })
}

/// The drain's hint, sent just before close 1001: come back after this many ms.
pub fn reconnect(after_ms: u64) -> Bytes {
    ws::text_frame(format!(r#"{{"op":"reconnect","after_ms":{after_ms}}}"#).as_bytes())
}

/// The answer to a `presence` query: the count, and the members within the cap (past
/// it, `members` is left out and `members_omitted` says so).
pub fn presence(topic: &str, snapshot: &Snapshot) -> Bytes {
    ws::text_frame(&presence_json(Some("presence"), topic, snapshot))
}

/// The `presence` answer's JSON, shared with `GET /presence` (which has no `op`).
pub fn presence_json(op: Option<&str>, topic: &str, snapshot: &Snapshot) -> Vec<u8> {
    #[derive(Serialize)]
    struct Member<'a> {
        sub: &'a str,
        conns: u64,
    }
    #[derive(Serialize)]
    struct Answer<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        op: Option<&'a str>,
        topic: &'a str,
        count: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        members: Option<Vec<Member<'a>>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        members_omitted: bool,
    }
    let members = snapshot.members.as_ref().map(|list| {
        list.iter()
            .map(|(sub, conns)| Member { sub, conns: *conns })
            .collect()
    });
    let answer = Answer {
        op,
        topic,
        count: snapshot.count,
        members_omitted: members.is_none(),
        members,
    };
    serde_json::to_vec(&answer).expect("serializing strings and numbers cannot fail")
}

/// A member appeared in a topic (`join: true`) or disappeared from it.
pub fn presence_event(join: bool, topic: &str, sub: &str) -> Bytes {
    reply(&Reply {
        op: if join { "join" } else { "leave" },
        topic: Some(topic),
        sub: Some(sub),
        ..Reply::default()
    })
}

pub fn pong() -> Bytes {
    Bytes::from_static(b"\x81\x0d{\"op\":\"pong\"}")
}

pub fn error(e: &OpError) -> Bytes {
    reply(&Reply {
        op: "error",
        error: Some(e.code),
        message: Some(&e.message),
        ..Reply::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_op() {
        assert!(
            matches!(parse_op(r#"{"op":"subscribe","topic":"a"}"#), Ok(Op::Subscribe(t, None, false)) if t == "a")
        );
        assert!(
            matches!(parse_op(r#"{"op":"subscribe","topic":"a","presence":true}"#), Ok(Op::Subscribe(t, None, true)) if t == "a")
        );
        assert!(
            matches!(parse_op(r#"{"op":"presence","topic":"a"}"#), Ok(Op::Presence(t)) if t == "a")
        );
        match parse_op(r#"{"op":"subscribe","topic":"a","since":41,"epoch":"e1"}"#).unwrap() {
            Op::Subscribe(t, Some(r), _) => {
                assert_eq!((t.as_ref(), r.since, r.epoch.as_ref()), ("a", 41, "e1"))
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(parse_op(r#"{"topic":"a","op":"unsubscribe"}"#), Ok(Op::Unsubscribe(t)) if t == "a")
        );
        assert!(matches!(
            parse_op(r#"{"op":"ping","extra":1}"#),
            Ok(Op::Ping)
        ));
        match parse_op(r#"{"op":"publish","topic":"a","data":{"k":[1,"x"]}}"#).unwrap() {
            Op::Publish(t, d) => assert_eq!((t.as_ref(), d.get()), ("a", r#"{"k":[1,"x"]}"#)),
            other => panic!("{other:?}"),
        }
        // Escapes in the topic are decoded before checking.
        assert!(
            matches!(parse_op(r#"{"op":"subscribe","topic":"\u0061"}"#), Ok(Op::Subscribe(t, None, _)) if t == "a")
        );
    }

    #[test]
    fn bad_ops_get_error_codes() {
        let code = |t: &str| parse_op(t).unwrap_err().code;
        assert_eq!(code("not json"), "bad_json");
        assert_eq!(code("[1,2]"), "bad_json");
        assert_eq!(code(r#"{"op":"dance"}"#), "unknown_op");
        assert_eq!(code(r#"{"op":"subscribe"}"#), "bad_topic");
        assert_eq!(code(r#"{"op":"presence"}"#), "bad_topic");
        assert_eq!(
            code(r#"{"op":"subscribe","topic":"a","presence":1}"#),
            "bad_json"
        );
        assert_eq!(code(r#"{"op":"subscribe","topic":"a b"}"#), "bad_topic");
        assert_eq!(code(r#"{"op":"publish","topic":"a"}"#), "bad_request");
        assert_eq!(code(r#"{"topic":"a"}"#), "bad_request");
        assert_eq!(
            code(r#"{"op":"subscribe","topic":"a","since":3}"#),
            "bad_request"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","topic":"a","epoch":"e"}"#),
            "bad_request"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","topic":"a","since":-1,"epoch":"e"}"#),
            "bad_json"
        );
    }

    #[test]
    fn replies_are_text_frames_of_json() {
        assert_eq!(&pong()[2..], br#"{"op":"pong"}"#);
        assert_eq!(pong()[1] as usize, pong().len() - 2);
        let e = error(&OpError::new("bad_json", "say \"hi\""));
        let v: serde_json::Value = serde_json::from_slice(&e[2..]).unwrap();
        assert_eq!(v["op"], "error");
        assert_eq!(v["error"], "bad_json");
        assert_eq!(v["message"], "say \"hi\"");
        let p = presence(
            "t",
            &Snapshot {
                count: 1,
                members: Some(vec![("42".into(), 2)]),
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&p[2..]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"presence","topic":"t","count":1,"members":[{"sub":"42","conns":2}]})
        );
        let p = presence_json(
            None,
            "t",
            &Snapshot {
                count: 5,
                members: None,
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"topic":"t","count":5,"members_omitted":true})
        );
        let e = presence_event(false, "t", "42");
        let v: serde_json::Value = serde_json::from_slice(&e[2..]).unwrap();
        assert_eq!(v, serde_json::json!({"op":"leave","topic":"t","sub":"42"}));
    }
}
