//! The handler for the application's answers: an upgrade that waited for `--auth-url`
//! opens with the grant or is refused; a subscribe that asked (`--auth-subscribe`)
//! subscribes or is refused, and the answer is kept in the session's grant. Also holds
//! the bytes a client sends while its upgrade waits.
//!
//! Every answer is checked against its connection's serial and state first: a client that
//! left while waiting, or whose key was reused since, gets nothing.

use std::time::Instant;

use bytes::Bytes;
use log::{debug, info};

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
                grant.refused.push_exact(&topic);
                env.counters.op_errors += 1;
                let reply = protocol::error(&OpError::new(
                    "forbidden",
                    format!("the application refused the private topic {topic:?}"),
                ));
                env.conns.queue(id, reply);
                return;
            }
            grant.topics.push_exact(&topic);
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
            info!("{}: the application allowed sub {:?}", conn.peer, grant.sub);
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
