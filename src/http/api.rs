//! Routing: which endpoint a parsed request asks for, and whether this peer may have it.
//! Pure: the front door executes the resulting `Route`, and
//! every refusal is a `Reject` whose wire form `close.rs` decides.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::close::Reject;
use crate::http::assets::Asset;
use crate::http::upgrade;
use crate::http::{Method, Request, Response};
use crate::pubsub::hub::MAX_TOPICS_PER_CONNECTION;
use crate::topic;
use crate::ws::deflate::Agreement;
use crate::ws::protocol::{Kind, Resume};

/// Most topics one `/publish` may name.
pub const MAX_PUBLISH_TOPICS: usize = 100;

#[derive(Debug)]
pub enum Route {
    Health,
    /// An embedded file (`/herald.js`, the console at `/`).
    Asset(Asset),
    Metrics,
    Publish(Publish),
    /// `GET /history?topic=t&since=N[&epoch=E]`.
    History {
        topic: String,
        since: u64,
        epoch: Option<String>,
    },
    Upgrade {
        kind: Kind,
        accept: String,
        topics: Vec<String>,
        /// `?resume=topic~since~epoch,...`: topics to subscribe from where the client
        /// left off.
        resume: Vec<(String, Resume<'static>)>,
        /// `?token=`: a JWT to verify (base64url and dots: nothing to decode).
        token: Option<String>,
        /// `?presence=a,b`: topics of `topics` or `resume` whose join/leave events the
        /// client wants.
        presence: Vec<String>,
        /// The permessage-deflate offer accepted, if any.
        deflate: Option<Agreement>,
    },
    /// `GET /presence?topic=t`.
    Presence {
        topic: String,
    },
}

#[derive(Debug)]
pub struct Publish {
    /// Validated and without duplicates, in the order given.
    pub topics: Vec<String>,
    pub data: Box<RawValue>,
}

/// What the router needs to know beyond the request.
pub struct Policy<'a> {
    pub api_key: Option<&'a str>,
    pub allowed_origins: Option<&'a [String]>,
    pub peer_is_loopback: bool,
    pub draining: bool,
    /// `GET /` serves the console page (`--no-console` turns it off).
    pub console: bool,
    /// permessage-deflate may be accepted (`--no-compression` turns it off).
    pub compression: bool,
}

/// `--metrics-listen`: its port answers `/metrics` and `/health` and nothing else, and
/// the main port no longer answers `/metrics` (`metrics_elsewhere`).
pub fn for_port(
    routed: Result<Route, Reject>,
    metrics_port: bool,
    metrics_elsewhere: bool,
) -> Result<Route, Reject> {
    match routed {
        Ok(Route::Metrics) if metrics_elsewhere && !metrics_port => Err(Reject::NotFound),
        ok @ Ok(Route::Metrics | Route::Health) => ok,
        _ if metrics_port => Err(Reject::NotFound),
        other => other,
    }
}

pub fn route(req: &Request, policy: &Policy) -> Result<Route, Reject> {
    let read_only = |route| match req.method {
        Method::Get | Method::Head => Ok(route),
        _ => Err(Reject::MethodNotAllowed("GET, HEAD")),
    };
    match req.path.as_str() {
        "/health" => read_only(Route::Health),
        "/herald.js" => read_only(Route::Asset(Asset::Client)),
        "/" if policy.console => read_only(Route::Asset(Asset::Console)),
        "/metrics" => read_only(Route::Metrics),
        "/publish" => {
            if req.method != Method::Post {
                return Err(Reject::MethodNotAllowed("POST"));
            }
            authorize_publish(req, policy)?;
            parse_publish(&req.body).map(Route::Publish)
        }
        "/history" => {
            // History is what was published: the same rule as publishing guards it, so a
            // private topic's messages never leak through it.
            let topic = guarded_topic_query(req, policy)?;
            let since = match req.query_param("since") {
                None | Some("") => 0,
                Some(n) => n
                    .parse()
                    .map_err(|_| Reject::bad_request("?since= must be a message id"))?,
            };
            let epoch = req
                .query_param("epoch")
                .filter(|e| !e.is_empty())
                .map(str::to_string);
            Ok(Route::History {
                topic,
                since,
                epoch,
            })
        }
        "/presence" => {
            // Who is subscribed to a private topic is as private as its messages: the
            // rule that guards publishing and history guards this too.
            let topic = guarded_topic_query(req, policy)?;
            Ok(Route::Presence { topic })
        }
        "/ws" | "/echo" => {
            let kind = if req.path == "/ws" {
                Kind::Topics
            } else {
                Kind::Echo
            };
            let accept = upgrade::check(req, policy.allowed_origins)?;
            if policy.draining {
                return Err(Reject::Draining);
            }
            let mut topics = match (kind, req.query_param("topics")) {
                (Kind::Topics, Some(list)) => parse_topic_list(list, "topics")?,
                _ => Vec::new(),
            };
            let resume = match (kind, req.query_param("resume")) {
                (Kind::Topics, Some(list)) => parse_resume_list(list)?,
                _ => Vec::new(),
            };
            // A topic named in both is resumed, not subscribed twice.
            topics.retain(|t| !resume.iter().any(|(r, _)| r == t));
            if topics.len() + resume.len() > MAX_TOPICS_PER_CONNECTION {
                return Err(Reject::bad_request(format!(
                    "more than {MAX_TOPICS_PER_CONNECTION} topics"
                )));
            }
            let token = req
                .query_param("token")
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            let presence = match (kind, req.query_param("presence")) {
                (Kind::Topics, Some(list)) => parse_topic_list(list, "presence")?,
                _ => Vec::new(),
            };
            let asked = |p: &String| topics.contains(p) || resume.iter().any(|(r, _)| r == p);
            if let Some(stray) = presence.iter().find(|p| !asked(p)) {
                return Err(Reject::bad_request(format!(
                    "?presence= names {stray:?}, which is in neither ?topics= nor ?resume="
                )));
            }
            let deflate = match policy.compression {
                true => upgrade::deflate(req, kind),
                false => None,
            };
            Ok(Route::Upgrade {
                kind,
                accept,
                topics,
                resume,
                token,
                presence,
                deflate,
            })
        }
        _ => Err(Reject::NotFound),
    }
}

/// A `GET`/`HEAD` endpoint about one topic (`?topic=`), guarded by the publish rule.
fn guarded_topic_query(req: &Request, policy: &Policy) -> Result<String, Reject> {
    if !matches!(req.method, Method::Get | Method::Head) {
        return Err(Reject::MethodNotAllowed("GET, HEAD"));
    }
    authorize_publish(req, policy)?;
    let topic = req
        .query_param("topic")
        .and_then(percent_decode)
        .ok_or_else(|| Reject::bad_request("missing ?topic="))?;
    topic::check_name(&topic)
        .map_err(|e| Reject::bad_request(format!("?topic= {topic:?}: {e}")))?;
    Ok(topic)
}

/// With a key: `Authorization: Bearer KEY`, compared in constant time. Without one:
/// loopback peers only, so a fresh install is not an open relay.
fn authorize_publish(req: &Request, policy: &Policy) -> Result<(), Reject> {
    match policy.api_key {
        Some(key) => {
            let given = req
                .authorization
                .as_deref()
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim())
                .unwrap_or("");
            if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
                Ok(())
            } else {
                Err(Reject::Unauthorized)
            }
        }
        None if policy.peer_is_loopback => Ok(()),
        None => Err(Reject::Forbidden(
            "publish from a non-loopback peer needs --api-key",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    #[serde(borrow, default)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    topics: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

fn parse_publish(body: &[u8]) -> Result<Publish, Reject> {
    let body: PublishBody = serde_json::from_slice(body)
        .map_err(|e| Reject::bad_request(format!("body is not a publish object: {e}")))?;
    let names: Vec<Cow<str>> = match (body.topic, body.topics) {
        (Some(t), None) => vec![t],
        (None, Some(ts)) if !ts.is_empty() => ts,
        (None, Some(_)) => return Err(Reject::bad_request("\"topics\" is empty")),
        (Some(_), Some(_)) => {
            return Err(Reject::bad_request(
                "give \"topic\" or \"topics\", not both",
            ));
        }
        (None, None) => return Err(Reject::bad_request("missing \"topic\"")),
    };
    if names.len() > MAX_PUBLISH_TOPICS {
        return Err(Reject::bad_request(format!(
            "more than {MAX_PUBLISH_TOPICS} topics"
        )));
    }
    let mut topics: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        topic::check_name(&name).map_err(|e| Reject::bad_request(format!("{name:?}: {e}")))?;
        if !topics.iter().any(|t| *t == name) {
            topics.push(name.into_owned());
        }
    }
    let data = body
        .data
        .ok_or_else(|| Reject::bad_request("missing \"data\""))?;
    Ok(Publish {
        topics,
        data: data.to_owned(),
    })
}

/// `?topics=a,b` (percent-encoding allowed, since browsers' encodeURIComponent uses it).
/// `?topics=` or `?presence=` (`param`): comma-separated names, without duplicates.
fn parse_topic_list(list: &str, param: &str) -> Result<Vec<String>, Reject> {
    let decoded = percent_decode(list)
        .ok_or_else(|| Reject::bad_request(format!("bad percent-encoding in ?{param}=")))?;
    let mut topics: Vec<String> = Vec::new();
    for name in decoded.split(',').filter(|s| !s.is_empty()) {
        topic::check_name(name)
            .map_err(|e| Reject::bad_request(format!("?{param}= {name:?}: {e}")))?;
        if !topics.iter().any(|t| t == name) {
            topics.push(name.to_string());
        }
    }
    if topics.len() > MAX_TOPICS_PER_CONNECTION {
        return Err(Reject::bad_request(format!(
            "more than {MAX_TOPICS_PER_CONNECTION} topics"
        )));
    }
    Ok(topics)
}

/// `?resume=topic~since~epoch,...`: `~` is not in the topic alphabet and needs no
/// percent-encoding in a URL (RFC 3986 unreserved), and epochs are plain tokens.
fn parse_resume_list(list: &str) -> Result<Vec<(String, Resume<'static>)>, Reject> {
    let decoded = percent_decode(list)
        .ok_or_else(|| Reject::bad_request("bad percent-encoding in ?resume="))?;
    let mut out: Vec<(String, Resume<'static>)> = Vec::new();
    for item in decoded.split(',').filter(|s| !s.is_empty()) {
        let bad = || Reject::bad_request(format!("?resume= {item:?}: give topic~since~epoch"));
        let mut parts = item.split('~');
        let (Some(name), Some(since), Some(epoch), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        topic::check_name(name)
            .map_err(|e| Reject::bad_request(format!("?resume= {name:?}: {e}")))?;
        let since: u64 = since.parse().map_err(|_| bad())?;
        if epoch.is_empty() {
            return Err(bad());
        }
        if !out.iter().any(|(t, _)| t == name) {
            let epoch = epoch.to_string().into();
            out.push((name.to_string(), Resume { since, epoch }));
        }
    }
    if out.len() > MAX_TOPICS_PER_CONNECTION {
        return Err(Reject::bad_request(format!(
            "more than {MAX_TOPICS_PER_CONNECTION} topics"
        )));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `{"id":N,"delivered":K}`; a multi-topic publish adds `"ids"`, each topic's own id,
/// and `id` is the first topic's.
pub fn publish_reply(ids: &[(String, u64)], delivered: usize) -> Response {
    let mut body =
        serde_json::json!({ "id": ids.first().map_or(0, |(_, id)| *id), "delivered": delivered });
    if ids.len() > 1 {
        body["ids"] = ids
            .iter()
            .map(|(t, id)| (t.clone(), serde_json::Value::from(*id)))
            .collect();
    }
    Response::json(200, body.to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Parsed, parse};

    fn req(raw: &str) -> Request {
        match parse(raw.as_bytes(), 1 << 16).unwrap() {
            Parsed::Complete(r, _) => *r,
            other => panic!("{other:?}"),
        }
    }

    fn policy(api_key: Option<&str>, loopback: bool) -> Policy<'_> {
        Policy {
            api_key,
            allowed_origins: None,
            peer_is_loopback: loopback,
            draining: false,
            console: true,
            compression: true,
        }
    }

    fn post(body: &str, auth: &str) -> Request {
        req(&format!(
            "POST /publish HTTP/1.1\r\n{auth}Content-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    }

    #[test]
    fn routes_and_methods() {
        let p = policy(None, true);
        assert!(matches!(
            route(&req("GET /health HTTP/1.1\r\n\r\n"), &p),
            Ok(Route::Health)
        ));
        assert!(matches!(
            route(&req("HEAD /metrics HTTP/1.1\r\n\r\n"), &p),
            Ok(Route::Metrics)
        ));
        assert_eq!(
            route(&req("GET /nope HTTP/1.1\r\n\r\n"), &p).unwrap_err(),
            Reject::NotFound
        );
        assert_eq!(
            route(&req("GET /publish HTTP/1.1\r\n\r\n"), &p).unwrap_err(),
            Reject::MethodNotAllowed("POST")
        );
        assert_eq!(
            route(&req("DELETE /health HTTP/1.1\r\n\r\n"), &p).unwrap_err(),
            Reject::MethodNotAllowed("GET, HEAD")
        );
        assert_eq!(
            route(&req("GET /ws HTTP/1.1\r\n\r\n"), &p).unwrap_err(),
            Reject::UpgradeRequired
        );
    }

    #[test]
    fn publish_needs_the_key_or_a_loopback_peer() {
        let body = r#"{"topic":"a","data":1}"#;
        assert!(route(&post(body, ""), &policy(None, true)).is_ok());
        assert!(matches!(
            route(&post(body, ""), &policy(None, false)),
            Err(Reject::Forbidden(_))
        ));
        let keyed = policy(Some("s3cret"), false);
        assert_eq!(
            route(&post(body, ""), &keyed).unwrap_err(),
            Reject::Unauthorized
        );
        assert_eq!(
            route(&post(body, "Authorization: Bearer s3cre\r\n"), &keyed).unwrap_err(),
            Reject::Unauthorized
        );
        assert_eq!(
            route(&post(body, "Authorization: Basic s3cret\r\n"), &keyed).unwrap_err(),
            Reject::Unauthorized
        );
        assert!(route(&post(body, "Authorization: bearer s3cret\r\n"), &keyed).is_ok());
    }

    #[test]
    fn publish_bodies_are_validated() {
        let p = policy(None, true);
        let bad = |b: &str| matches!(route(&post(b, ""), &p), Err(Reject::BadRequest(_)));
        assert!(bad("nope"));
        assert!(bad(r#"{"topic":"a"}"#));
        assert!(bad(r#"{"data":1}"#));
        assert!(bad(r#"{"topic":"a b","data":1}"#));
        assert!(bad(r#"{"topics":[],"data":1}"#));
        assert!(bad(r#"{"topic":"a","topics":["b"],"data":1}"#));
        assert!(bad(r#"{"topic":"a","data":1,"extra":2}"#));
        match route(
            &post(r#"{"topics":["a","b","a"],"data":{"x":null}}"#, ""),
            &p,
        )
        .unwrap()
        {
            Route::Publish(pb) => {
                assert_eq!(pb.topics, ["a", "b"]);
                assert_eq!(pb.data.get(), r#"{"x":null}"#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_upgrade_accepts_deflate_only_while_compression_is_on() {
        let upgrade = req(
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
        );
        let deflate = |p: &Policy| match route(&upgrade, p) {
            Ok(Route::Upgrade { deflate, .. }) => deflate.map(|a| a.window.bits()),
            other => panic!("{other:?}"),
        };
        let mut p = policy(None, true);
        assert_eq!(deflate(&p), Some(15));
        p.compression = false;
        assert_eq!(deflate(&p), None);
    }

    #[test]
    fn query_topics_are_decoded_and_checked() {
        assert_eq!(
            parse_topic_list("a,user%3A42,,a", "topics").unwrap(),
            ["a", "user:42"]
        );
        assert!(parse_topic_list("a,b%20c", "topics").is_err());
        assert!(parse_topic_list("%zz", "topics").is_err());
    }

    #[test]
    fn publish_reply_shapes() {
        let one = publish_reply(&[("a".into(), 7)], 3);
        assert_eq!(one.body, br#"{"delivered":3,"id":7}"#);
        let two = publish_reply(&[("a".into(), 7), ("b".into(), 2)], 5);
        let v: serde_json::Value = serde_json::from_slice(&two.body).unwrap();
        assert_eq!(v["ids"]["b"], 2);
        assert_eq!(v["id"], 7);
    }
}
