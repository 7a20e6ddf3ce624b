//! The handler for the application's answers: an upgrade that waited for `--auth-url`
//! opens with the grant or is refused; a subscribe that asked (`--auth-subscribe`)
//! subscribes or is refused, and the answer is kept in the session's grant. Also holds
//! the bytes a client sends while its upgrade waits.
//!
//! Every answer is checked against its connection's serial and state first: a client that
//! left while waiting, or whose key was reused since, gets nothing.

use std::time::Instant;

use bytes::Bytes;
use log::debug;

use crate::app::{Answered, Verdict};
use crate::auth::Grant;
use crate::close::Reject;
use crate::conn::{ConnId, Conns, State};
use crate::http::Response;
use crate::http::front::Env;
use crate::pubsub::hub::{MAX_TOPICS_PER_CONNECTION, SubscribeError};
use crate::topic::Patterns;
use crate::ws::protocol::{self, OpError};

/// Most bytes held from a client whose upgrade waits for the application (frames sent
/// behind the request); past it, the client is not waiting as a browser does: cut it.
const MAX_HELD_WHILE_ASKING: usize = 64 * 1024;
/// Answers kept per connection (`--auth-subscribe`), allowed and refused each; past it
/// they are not kept, and the next subscribe to such a topic asks again.
const MAX_CACHED_ANSWERS: usize = 256;

/// Bytes from a connection in `AwaitingApp`: kept for the session, if it opens.
pub fn hold_input(conns: &mut Conns, id: ConnId, input: &[u8]) -> bool {
    let conn = &mut conns[id];
    if conn.partial.len() + input.len() > MAX_HELD_WHILE_ASKING {
        debug!(
            "{}: too much input while its upgrade waits; closing",
            conn.peer
        );
        return false;
    }
    conn.partial.extend_from_slice(input);
    true
}

pub fn on_answer(env: &mut Env, answered: Answered, now: Instant) {
    match answered {
        Answered::Connect {
            id,
            serial,
            verdict,
        } => on_connect(env, (id, serial), verdict, now),
        Answered::Subscribe {
            id,
            serial,
            topic,
            resume,
            watch,
            allowed,
        } => {
            if env
                .conns
                .same(id, serial)
                .is_none_or(|c| !matches!(c.state, State::Open(_)))
            {
                return;
            }
            let Some(session) = env.conns[id].session_mut() else {
                return;
            };
            let grant = session.grant.get_or_insert_with(|| {
                Box::new(Grant {
                    sub: None,
                    exp: u64::MAX,
                    topics: Patterns::default(),
                    publish: Patterns::default(),
                    refused: Patterns::default(),
                })
            });
            if !allowed {
                if grant.refused.count() < MAX_CACHED_ANSWERS {
                    grant.refused.push_exact(&topic);
                }
                env.counters.op_errors += 1;
                let reply = protocol::error(&OpError::new(
                    "forbidden",
                    format!("the application refused the private topic {topic:?}"),
                ));
                env.conns.queue(id, reply);
                return;
            }
            if grant.topics.count() < MAX_CACHED_ANSWERS {
                grant.topics.push_exact(&topic);
            }
            let asked = (resume.as_ref(), watch);
            match env.pubsub.subscribe(env.conns, id, &topic, asked, now) {
                Ok(()) => env.conns.mark_dirty(id),
                Err(SubscribeError::TooManyTopics) => {
                    env.counters.op_errors += 1;
                    let reply = protocol::error(&OpError::new(
                        "too_many_topics",
                        format!("at most {MAX_TOPICS_PER_CONNECTION} topics per connection"),
                    ));
                    env.conns.queue(id, reply);
                }
                Err(SubscribeError::AtCapacity) => {
                    let e = crate::session::at_capacity(env.counters, &topic);
                    env.counters.op_errors += 1;
                    env.conns.queue(id, protocol::error(&e));
                }
            }
        }
    }
}

fn on_connect(env: &mut Env, (id, serial): (ConnId, u64), verdict: Verdict, now: Instant) {
    if env
        .conns
        .same(id, serial)
        .is_none_or(|c| !matches!(c.state, State::AwaitingApp(_)))
    {
        return;
    }
    let conn = &mut env.conns[id];
    let State::AwaitingApp(opening) = std::mem::replace(&mut conn.state, State::ReadingRequest)
    else {
        return;
    };
    let rest = std::mem::take(&mut conn.partial);
    let reject = match verdict {
        // A drain began while the application thought: no new WebSocket now.
        Verdict::Grant(_) if env.draining => Reject::Draining,
        Verdict::Grant(grant) => {
            // The session logs the grant at info as it opens ("token accepted").
            debug!("{}: the application allowed sub {:?}", conn.peer, grant.sub);
            let mut opening = *opening;
            opening.grant = Some(Ok(grant));
            env.sessions
                .open(env.conns, env.pubsub, env.counters, id, opening, &rest, now);
            return;
        }
        Verdict::Refuse(status, why) => Reject::AppRefused(status, why),
        Verdict::Unavailable(why) if why == "draining" => Reject::Draining,
        Verdict::Unavailable(_) => Reject::AppUnavailable,
    };
    let mut response = Response::refuse(&reject);
    response.close = true;
    *env.counters.responses.entry(response.status).or_default() += 1;
    env.conns.queue(id, Bytes::from(response.encode(false)));
    env.pubsub.leave(env.conns.finish(id, now), now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{World, client_frame, parse_frames};

    fn world() -> World {
        World::new(&[
            "--auth-url",
            "http://127.0.0.1:9/auth",
            "--auth-secret",
            "a-secret-of-16-bytes",
            "--private-topics",
            "user:*",
        ])
    }

    /// An upgrade for `/ws?topics=user:42` with a ping op pipelined behind it; returns
    /// the connection, waiting for the application.
    fn waiting(w: &mut World) -> ConnId {
        let id = w.connect();
        let mut request = b"GET /ws?topics=user:42 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
            Sec-WebSocket-Version: 13\r\nCookie: session=alice\r\n\r\n"
            .to_vec();
        request.extend_from_slice(&client_frame(0x1, br#"{"op":"ping"}"#));
        w.send(id, &request);
        assert!(matches!(w.conns[id].state, State::AwaitingApp(_)));
        assert!(
            w.take_output(id).is_empty(),
            "nothing is said before the app answers"
        );
        id
    }

    fn answer(w: &mut World, answered: Answered) {
        let mut env = Env {
            conns: &mut w.conns,
            pubsub: &mut w.pubsub,
            counters: &mut w.counters,
            sessions: &w.sessions,
            draining: w.draining,
        };
        on_answer(&mut env, answered, w.now);
    }

    fn grant() -> Grant {
        Grant {
            sub: Some("42".into()),
            exp: crate::auth::unix_now() + 3600,
            topics: Patterns::parse("user:42").unwrap(),
            publish: Patterns::default(),
            refused: Patterns::default(),
        }
    }

    #[test]
    fn a_grant_opens_the_waiting_upgrade_and_reads_what_came_behind_it() {
        let mut w = world();
        let id = waiting(&mut w);
        // A frame that arrives while the app thinks is held too.
        assert!(hold_input(
            &mut w.conns,
            id,
            &client_frame(0x1, br#"{"op":"ping"}"#)
        ));
        let serial = w.conns[id].serial;
        let verdict = Verdict::Grant(grant());
        answer(
            &mut w,
            Answered::Connect {
                id,
                serial,
                verdict,
            },
        );
        let wire = w.take_output(id);
        assert!(wire.starts_with(b"HTTP/1.1 101"));
        let head = wire.windows(4).position(|f| f == b"\r\n\r\n").unwrap() + 4;
        let replies: Vec<serde_json::Value> = parse_frames(&wire[head..])
            .iter()
            .map(|f| f.json())
            .collect();
        assert_eq!(replies[0]["op"], "subscribed", "the grant covers user:42");
        assert_eq!(replies[0]["sub"], "42");
        let pongs = replies.iter().filter(|r| r["op"] == "pong").count();
        assert_eq!(pongs, 2, "both pipelined pings answered: {replies:?}");
    }

    #[test]
    fn refusals_carry_the_status_and_close_and_stale_answers_are_ignored() {
        let mut w = world();
        let id = waiting(&mut w);
        let serial = w.conns[id].serial;
        // An answer for an earlier connection under the same key changes nothing.
        let verdict = Verdict::Grant(grant());
        answer(
            &mut w,
            Answered::Connect {
                id,
                serial: serial - 1,
                verdict,
            },
        );
        assert!(matches!(w.conns[id].state, State::AwaitingApp(_)));
        let verdict = Verdict::Refuse(403, "banned user".into());
        answer(
            &mut w,
            Answered::Connect {
                id,
                serial,
                verdict,
            },
        );
        let text = w.take_text(id);
        assert!(text.starts_with("HTTP/1.1 403 "), "{text}");
        assert!(
            text.contains("Connection: close") && text.ends_with("banned user\n"),
            "{text}"
        );
        assert!(matches!(w.conns[id].state, State::Finishing));

        let id = waiting(&mut w);
        let serial = w.conns[id].serial;
        let verdict = Verdict::Unavailable("timeout".into());
        answer(
            &mut w,
            Answered::Connect {
                id,
                serial,
                verdict,
            },
        );
        assert!(w.take_text(id).starts_with("HTTP/1.1 503 "));
    }

    #[test]
    fn a_grant_that_arrives_during_a_drain_opens_nothing() {
        let mut w = world();
        let id = waiting(&mut w);
        w.draining = true;
        let serial = w.conns[id].serial;
        let verdict = Verdict::Grant(grant());
        answer(
            &mut w,
            Answered::Connect {
                id,
                serial,
                verdict,
            },
        );
        let text = w.take_text(id);
        assert!(
            text.starts_with("HTTP/1.1 503 ") && text.contains("draining"),
            "{text}"
        );
    }

    #[test]
    fn too_much_input_while_waiting_is_refused() {
        let mut w = world();
        let id = waiting(&mut w);
        assert!(!hold_input(
            &mut w.conns,
            id,
            &vec![0; MAX_HELD_WHILE_ASKING]
        ));
    }
}
