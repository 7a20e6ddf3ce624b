//! The WebSocket session handler: what a WebSocket's bytes and timers mean once the
//! upgrade is done. It opens sessions (token, `?topics=`, `?presence=`), decodes frames
//! through the codec, executes the client's ops (subscribe, unsubscribe, publish, ping,
//! auth, presence), keeps each session's token grant and ends the private subscriptions
//! a grant no longer covers, pings silent peers, and closes WebSockets from our side
//! (drain, slow consumers, protocol errors) behind what is already queued to them.
//!
//! It owns the rules sessions live by (limits, private topics, who may publish, the token
//! verifier) and the zlib state every session shares (the one inflater of compressed
//! client messages, the compressors of `/echo`); the sessions themselves live in the
//! connection table, their topics in the hub. It never touches a socket: replies are
//! queued through the table, and closing only moves a connection's state along for the
//! loop to finish.

use std::cell::RefCell;
use std::mem;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::{debug, info};
use tungstenite::Message;

use crate::auth::{self, Grant, TokenError, Verifier};
use crate::close::CloseReason;
use crate::config::Config;
use crate::conn::{CLOSE_GRACE, ConnId, Conns, Session, State};
use crate::limits::{OpBudget, OpVerdict, Rate, Refused};
use crate::metrics::Counters;
use crate::pubsub::Fanout;
use crate::pubsub::hub::{MAX_TOPICS_PER_CONNECTION, SubscribeError};
use crate::pubsub::pipeline::PubSub;
use crate::timer::Timer;
use crate::topic::Patterns;
use crate::ws::codec::{self as ws, Ws, WsEvent};
use crate::ws::deflate::{Deflater, Inflater};
use crate::ws::protocol::{self, Kind, Op, OpError};

/// A WebSocket handshake that was accepted (defined with the table, which holds it while
/// the application is asked).
pub use crate::conn::Opening;

/// The rules every session lives by, taken from the configuration once.
pub struct Sessions {
    max_message_size: usize,
    ping_interval: Duration,
    pong_timeout: Duration,
    private_topics: Patterns,
    client_publish: Patterns,
    tokens: Option<Arc<Verifier>>,
    /// `--client-op-rate` and `--client-op-burst`.
    op_rate: Rate,
    /// What the op budgets' millisecond clocks count from.
    origin: Instant,
    /// Shared by every session, borrowed for one call at a time (never across another).
    zlib: RefCell<Zlib>,
}

/// The zlib streams of all sessions: no context is taken over between messages (RFC 7692
/// §7.1.1), so no session needs its own.
struct Zlib {
    /// Every compressed client message, on any connection, is inflated here.
    inflater: Inflater,
    /// `/echo`'s compressed replies (published messages are compressed in the pipeline).
    deflater: Deflater,
}

impl Sessions {
    pub fn new(cfg: &Config) -> Sessions {
        Sessions {
            max_message_size: cfg.max_message_size,
            ping_interval: cfg.ping_interval,
            pong_timeout: cfg.pong_timeout,
            private_topics: cfg.private_topics.clone(),
            client_publish: cfg.client_publish.clone(),
            tokens: cfg.tokens.clone(),
            op_rate: cfg.limits.ops,
            origin: Instant::now(),
            zlib: RefCell::new(Zlib {
                inflater: Inflater::default(),
                deflater: Deflater::new(cfg.compression_min_size),
            }),
        }
    }

    pub fn verify_token(&self, token: &str) -> Result<Grant, TokenError> {
        match &self.tokens {
            Some(v) => v.verify(token),
            None => Err(TokenError::Invalid("this server accepts no tokens".into())),
        }
    }

    // ---- opening ---------------------------------------------------------------------

    /// The upgrade was accepted: queue the 101, start the session, subscribe `?topics=`
    /// (private ones only with a grant), and read any frames that came with the request.
    #[allow(clippy::too_many_arguments)] // the session's whole world, each part distinct
    pub fn open(
        &self,
        conns: &mut Conns,
        pubsub: &mut PubSub,
        counters: &mut Counters,
        id: ConnId,
        opening: Opening,
        rest: &[u8],
        now: Instant,
    ) {
        let Opening {
            kind,
            accept,
            topics,
            resume,
            grant,
            presence,
            deflate,
        } = opening;
        *counters.responses.entry(101).or_default() += 1;
        let extensions = deflate.as_ref().map(|a| a.response.as_str());
        let response = crate::http::upgrade::switching_protocols(accept, extensions);
        conns.queue(id, Bytes::from(response.encode(false)));
        conns.disarm(id, Timer::Request);
        conns.disarm(id, Timer::Idle);
        let ws = Ws::new(self.max_message_size, deflate.map(|a| a.window));
        let ops = OpBudget::new(self.op_rate, self.ms(now));
        let mut session = Session::new(ws, kind, ops, now);
        let mut notes = Vec::new();
        match grant {
            Some(Ok(g)) => {
                conns.arm(id, Timer::Grant, grant_deadline(&g, now));
                info!("{}: token accepted for sub {:?}", conns[id].peer, g.sub);
                session.grant = Some(Box::new(g));
            }
            Some(Err(e)) => notes.push(protocol::error(&OpError::new(e.code(), e.message()))),
            None => {}
        }
        // Private topics need the grant, to resume as to subscribe; the others go on.
        let asked = topics
            .into_iter()
            .map(|t| (t, None))
            .chain(resume.into_iter().map(|(t, r)| (t, Some(r))));
        let (topics, refused): (Vec<_>, Vec<_>) =
            asked.partition(|(t, _)| self.may_subscribe(&session, t));
        for (topic, _) in refused {
            notes.push(protocol::error(&forbidden(&topic)));
        }
        conns[id].state = State::Open(Box::new(session));
        conns.arm(id, Timer::Ping, now + self.ping_interval);
        // Errors about the token and refused topics count like the same errors later.
        counters.op_errors += notes.len() as u64;
        for note in notes {
            conns.queue(id, note);
        }
        // `?topics=` was capped at the per-connection limit when it was parsed.
        for (topic, resume) in topics {
            let watch = presence.contains(&topic);
            if let Err(SubscribeError::AtCapacity) =
                pubsub.subscribe(conns, id, &topic, (resume.as_ref(), watch), now)
            {
                let e = at_capacity(counters, &topic);
                conns.queue(id, op_error(counters, e));
            }
        }
        conns.mark_dirty(id);
        if !rest.is_empty() {
            self.on_input(conns, pubsub, counters, id, rest, now);
        }
    }

    // ---- input -----------------------------------------------------------------------

    /// Bytes from a WebSocket peer (`Open` or `Closing`).
    pub fn on_input(
        &self,
        conns: &mut Conns,
        pubsub: &mut PubSub,
        counters: &mut Counters,
        id: ConnId,
        mut input: &[u8],
        now: Instant,
    ) {
        // Any byte from the peer is a sign of life.
        conns.disarm(id, Timer::Pong);
        loop {
            let conn = &mut conns[id];
            let (event, open) = {
                // Released before the event is acted on (an echo borrows it again).
                let inflater = &mut self.zlib.borrow_mut().inflater;
                match &mut conn.state {
                    State::Open(s) => {
                        s.last_seen = now;
                        (s.ws.read(&mut input, &mut conn.out, inflater), true)
                    }
                    State::Closing(s) => (s.ws.read(&mut input, &mut conn.out, inflater), false),
                    _ => return,
                }
            };
            match event {
                WsEvent::NeedMore => break,
                // Messages that cross our close frame are dropped, as RFC 6455 §1.4 allows.
                WsEvent::Message(_) if !open => continue,
                WsEvent::Message(Message::Text(text)) => {
                    self.on_text(conns, pubsub, counters, id, text.as_str(), now)
                }
                WsEvent::Message(Message::Binary(data)) => {
                    self.on_binary(conns, pubsub, counters, id, &data, now)
                }
                WsEvent::Message(_) => continue,
                WsEvent::Closed => {
                    pubsub.leave(conns.finish(id, now), now);
                    break;
                }
                WsEvent::Fail(reason) if open => {
                    debug!("closing {} with {:?}", conns[id].peer, reason);
                    self.close(conns, pubsub, counters, id, reason, now);
                    break;
                }
                // Garbage after our close frame: nothing more to say to this peer.
                WsEvent::Fail(_) => {
                    pubsub.leave(conns.finish(id, now), now);
                    break;
                }
            }
        }
        // Pongs and close replies that tungstenite wrote into the queue; everything else
        // that queues output marks the connection itself.
        if conns.get(id).is_some_and(|c| !c.out.is_empty()) {
            conns.mark_dirty(id);
        }
    }

    fn on_binary(
        &self,
        conns: &mut Conns,
        pubsub: &mut PubSub,
        counters: &mut Counters,
        id: ConnId,
        data: &[u8],
        now: Instant,
    ) {
        let Some(session) = conns[id].session() else {
            return;
        };
        match session.kind {
            Kind::Echo => {
                let frame = session
                    .ws
                    .frame(false, data, &mut self.zlib.borrow_mut().deflater);
                conns.queue(id, frame);
            }
            Kind::Topics => self.close(conns, pubsub, counters, id, CloseReason::Unsupported, now),
        }
    }

    fn on_text(
        &self,
        conns: &mut Conns,
        pubsub: &mut PubSub,
        counters: &mut Counters,
        id: ConnId,
        text: &str,
        now: Instant,
    ) {
        let topics = conns[id].session().is_some_and(|s| s.kind == Kind::Topics);
        if topics && self.over_op_rate(conns, pubsub, counters, id, now) {
            return;
        }
        let State::Open(session) = &conns[id].state else {
            return;
        };
        if session.kind == Kind::Echo {
            let frame =
                session
                    .ws
                    .frame(true, text.as_bytes(), &mut self.zlib.borrow_mut().deflater);
            conns.queue(id, frame);
            return;
        }
        let reply = match protocol::parse_op(text) {
            Ok(Op::Subscribe(topic, resume, watch)) if !self.may_subscribe(session, &topic) => {
                if !self.asks_app(pubsub, session, &topic) {
                    op_error(counters, forbidden(&topic))
                } else {
                    // `--auth-subscribe`: the answer subscribes or refuses (`app::gate`).
                    let sub = session.grant.as_ref().and_then(|g| g.sub.as_deref());
                    let asked = (resume.map(crate::app::owned_resume), watch);
                    let asker = (id, conns[id].serial);
                    if pubsub.app_mut().ask_subscribe(asker, sub, &topic, asked) {
                        return;
                    }
                    op_error(
                        counters,
                        OpError::new("busy", "too many subscribes waiting for the application"),
                    )
                }
            }
            Ok(Op::Subscribe(topic, resume, watch)) => {
                match pubsub.subscribe(conns, id, &topic, (resume.as_ref(), watch), now) {
                    Ok(()) => return,
                    Err(SubscribeError::TooManyTopics) => op_error(
                        counters,
                        OpError::new(
                            "too_many_topics",
                            format!("at most {MAX_TOPICS_PER_CONNECTION} topics per connection"),
                        ),
                    ),
                    Err(SubscribeError::AtCapacity) => {
                        let e = at_capacity(counters, &topic);
                        op_error(counters, e)
                    }
                }
            }
            Ok(Op::Unsubscribe(topic)) => {
                pubsub.unsubscribe(id, &topic, now);
                protocol::unsubscribed(&topic, None)
            }
            Ok(Op::Ping) => protocol::pong(),
            // Who is subscribed is as private as what is published: a grant is checked
            // again, since a subscriber keeps its topic only while its grant covers it.
            Ok(Op::Presence(topic)) if !self.may_subscribe(session, &topic) => {
                op_error(counters, forbidden(&topic))
            }
            Ok(Op::Presence(topic)) => match pubsub.presence_query(conns, id, &topic, now) {
                Ok(()) => return,
                Err(e) => op_error(counters, e),
            },
            Ok(Op::Auth(token)) => {
                let token = token.into_owned();
                self.on_auth(conns, pubsub, counters, id, &token, now);
                return;
            }
            Ok(Op::Publish(topic, _))
                if !self.client_publish.matches(&topic)
                    && !session
                        .grant
                        .as_ref()
                        .is_some_and(|g| g.publish.matches(&topic)) =>
            {
                op_error(
                    counters,
                    OpError::new("forbidden", format!("clients may not publish to {topic:?}")),
                )
            }
            Ok(Op::Publish(topic, data)) => {
                if !pubsub.through_redis() {
                    pubsub.publish_local(counters, &topic, data, now);
                    return;
                }
                if pubsub.publish_to_redis(&topic, data.get(), None, now) {
                    counters.published += 1;
                    return;
                }
                op_error(
                    counters,
                    OpError::new("unavailable", "redis unavailable: not published"),
                )
            }
            Err(e) => op_error(counters, e),
        };
        conns.queue(id, reply);
    }

    /// `now` on the op budgets' clock (milliseconds, wrapping).
    /// A carried session's op budget (live upgrade), at `level`.
    pub fn op_budget(&self, level: f32, now: Instant) -> OpBudget {
        OpBudget::with_level(level, self.ms(now))
    }

    fn ms(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.origin).as_millis() as u32
    }

    /// Spend one op of the session's budget (`--client-op-rate`). Past it the op is not
    /// executed: it is answered `rate_limited`, and a client that goes on regardless
    /// (`limits::OP_OVERDRAFT` ops past its budget) is closed with 1008. True when the op
    /// must not run.
    fn over_op_rate(
        &self,
        conns: &mut Conns,
        pubsub: &mut PubSub,
        counters: &mut Counters,
        id: ConnId,
        now: Instant,
    ) -> bool {
        let Some(session) = conns[id].session_mut() else {
            return true;
        };
        let now_ms = self.ms(now);
        match session.ops.spend(self.op_rate, now_ms) {
            OpVerdict::Serve => false,
            OpVerdict::Refuse => {
                counters.refusals.bump(Refused::OpRate);
                let e = OpError::new(
                    "rate_limited",
                    format!(
                        "more than {} ops per second: this op was not executed; slow down \
                         or be disconnected",
                        self.op_rate.per_sec
                    ),
                );
                conns.queue(id, op_error(counters, e));
                true
            }
            OpVerdict::Close => {
                counters.refusals.bump(Refused::OpRateClosed);
                info!(
                    "{}: ops past --client-op-rate; closing with 1008",
                    conns[id].peer
                );
                self.close(conns, pubsub, counters, id, CloseReason::RateLimited, now);
                true
            }
        }
    }

    // ---- grants ----------------------------------------------------------------------

    /// Public topics are open to all; a private one needs the session's grant.
    fn may_subscribe(&self, session: &Session, topic: &str) -> bool {
        !self.private_topics.matches(topic)
            || session
                .grant
                .as_ref()
                .is_some_and(|g| g.topics.matches(topic))
    }

    /// `--auth-subscribe`: a private topic the grant does not cover, and that the
    /// application has not refused this connection already, is the application's to decide.
    fn asks_app(&self, pubsub: &PubSub, session: &Session, topic: &str) -> bool {
        pubsub.app().asks_subscribe()
            && self.private_topics.matches(topic)
            && !session
                .grant
                .as_ref()
                .is_some_and(|g| g.refused.matches(topic))
    }

    /// A token presented with the `auth` op replaces the grant; private subscriptions
    /// the new grant does not cover end. A refused token leaves the old grant in place.
    fn on_auth(
        &self,
        conns: &mut Conns,
        pubsub: &mut PubSub,
        counters: &mut Counters,
        id: ConnId,
        token: &str,
        now: Instant,
    ) {
        let grant = match self.verify_token(token) {
            Ok(g) => g,
            Err(e) => {
                let reply = op_error(counters, OpError::new(e.code(), e.message()));
                return conns.queue(id, reply);
            }
        };
        if !conns[id].is_open() {
            return;
        }
        conns.arm(id, Timer::Grant, grant_deadline(&grant, now));
        info!("{}: token accepted for sub {:?}", conns[id].peer, grant.sub);
        let reply = protocol::authenticated(&grant);
        let keep = grant.topics.clone();
        if let Some(session) = conns[id].session_mut() {
            session.grant = Some(Box::new(grant));
        }
        conns.queue(id, reply);
        let reason = "not_granted";
        self.end_private_subscriptions(conns, pubsub, (id, now), |t| keep.matches(t), reason);
    }

    /// The grant ran out: private subscriptions end, public ones go on.
    pub fn on_grant_timer(&self, conns: &mut Conns, pubsub: &mut PubSub, id: ConnId, now: Instant) {
        let conn = &mut conns[id];
        let State::Open(session) = &mut conn.state else {
            return;
        };
        let Some(grant) = &session.grant else { return };
        if grant.exp > auth::unix_now() {
            // The wall clock moved: wait for the real expiry.
            let at = grant_deadline(grant, now);
            conns.arm(id, Timer::Grant, at);
            return;
        }
        debug!("{}: token for sub {:?} expired", conn.peer, grant.sub);
        session.grant = None;
        self.end_private_subscriptions(conns, pubsub, (id, now), |_| false, "token_expired");
    }

    /// Unsubscribe from every private topic `keep` refuses, telling the client why.
    fn end_private_subscriptions(
        &self,
        conns: &mut Conns,
        pubsub: &mut PubSub,
        (id, now): (ConnId, Instant),
        keep: impl Fn(&str) -> bool,
        reason: &str,
    ) {
        if !conns[id].is_open() {
            return;
        }
        let ended: Vec<String> = pubsub
            .topics_of(id)
            .into_iter()
            .filter(|t| self.private_topics.matches(t) && !keep(t))
            .collect();
        for topic in &ended {
            pubsub.unsubscribe(id, topic, now);
        }
        for topic in ended {
            conns.queue(id, protocol::unsubscribed(&topic, Some(reason)));
        }
    }

    // ---- liveness --------------------------------------------------------------------

    /// Ping only a WebSocket that has been silent for a whole interval: a chatty one is
    /// evidently alive, and its proxy's idle timer is being reset anyway.
    pub fn on_ping_timer(&self, conns: &mut Conns, id: ConnId, now: Instant) {
        let interval = self.ping_interval;
        let conn = &mut conns[id];
        let State::Open(session) = &conn.state else {
            return;
        };
        let silent_since = session.last_seen;
        if now.duration_since(silent_since) < interval {
            conns.arm(id, Timer::Ping, silent_since + interval);
            return;
        }
        ws::queue_ping(&mut conn.out);
        if !conn.timers.is_armed(Timer::Pong) {
            conns.arm(id, Timer::Pong, now + self.pong_timeout);
        }
        conns.arm(id, Timer::Ping, now + interval);
        conns.mark_dirty(id);
    }

    // ---- closing ---------------------------------------------------------------------

    /// Close from our side: leave every topic and queue the close frame behind what is
    /// already queued (so accepted messages arrive first). Then either give the peer
    /// `CLOSE_GRACE` to answer, or, if it broke the protocol, just flush and hang up.
    pub fn close(
        &self,
        conns: &mut Conns,
        pubsub: &mut PubSub,
        counters: &mut Counters,
        id: ConnId,
        reason: CloseReason,
        now: Instant,
    ) {
        let conn = &mut conns[id];
        let State::Open(mut session) = mem::replace(&mut conn.state, State::Dead) else {
            return;
        };
        pubsub.leave_all(id, now);
        if reason == CloseReason::SlowConsumer {
            // Its queue is what got it here; the close frame must not wait behind it.
            let dropped = conn.out.drop_unstarted();
            counters.slow_consumers += 1;
            counters.undelivered_bytes += dropped as u64;
            info!(
                "slow consumer {}: {dropped} queued bytes dropped, closing with 1008",
                conn.peer
            );
        }
        session.ws.close(reason, &mut conn.out);
        *counters.ws_closed.entry(reason.code().into()).or_default() += 1;
        conns.disarm(id, Timer::Ping);
        conns.disarm(id, Timer::Pong);
        if reason.awaits_reply() {
            conns[id].state = State::Closing(session);
            conns.arm(id, Timer::CloseGrace, now + CLOSE_GRACE);
            conns.mark_dirty(id);
        } else {
            // Not `Open` any more: it has already left its topics.
            let _ = conns.finish(id, now);
        }
    }

    /// Close the subscribers a fan-out pushed past `--send-queue-limit` (1008).
    /// The end of a pass's handling, once the publishers have their answers: queue this
    /// pass's local publishes to their subscribers, and close those it made slow.
    pub fn deliver_pending(
        &self,
        conns: &mut Conns,
        pubsub: &mut PubSub,
        counters: &mut Counters,
        now: Instant,
    ) {
        let fanout = pubsub.fan_out_pending(conns, counters);
        self.close_slow(conns, pubsub, counters, fanout, now);
    }

    pub fn close_slow(
        &self,
        conns: &mut Conns,
        pubsub: &mut PubSub,
        counters: &mut Counters,
        fanout: Fanout,
        now: Instant,
    ) {
        for sub in fanout.slow {
            self.close(conns, pubsub, counters, sub, CloseReason::SlowConsumer, now);
        }
    }

    /// Every open WebSocket gets 1001 at once, behind every message already queued to it
    /// (the drain goes through its pacer and `going_away` instead).
    #[cfg(test)]
    pub fn close_all(
        &self,
        conns: &mut Conns,
        pubsub: &mut PubSub,
        counters: &mut Counters,
        now: Instant,
    ) {
        for id in conns.ids() {
            if conns[id].is_open() {
                self.close(conns, pubsub, counters, id, CloseReason::GoingAway, now);
            }
        }
    }

    /// Drain, paced: tell a `/ws` client when to come back, then close it with 1001,
    /// both behind every message already queued to it. (`/echo` peers speak no JSON.)
    pub fn going_away(
        &self,
        conns: &mut Conns,
        pubsub: &mut PubSub,
        counters: &mut Counters,
        id: ConnId,
        after_ms: u64,
        now: Instant,
    ) {
        let Some(session) = conns.get(id).and_then(|c| c.session()) else {
            return;
        };
        if session.kind == Kind::Topics {
            conns.queue(id, protocol::reconnect(after_ms));
        }
        self.close(conns, pubsub, counters, id, CloseReason::GoingAway, now);
    }
}

fn op_error(counters: &mut Counters, e: OpError) -> Bytes {
    counters.op_errors += 1;
    protocol::error(&e)
}

/// The error for a subscribe past `--max-subscriptions`.
pub(crate) fn at_capacity(counters: &mut Counters, topic: &str) -> OpError {
    counters.refusals.bump(Refused::Subscriptions);
    OpError::new(
        "unavailable",
        format!("not subscribed to {topic:?}: the server holds its most subscriptions"),
    )
}

/// The error for a private topic the connection has no grant for.
fn forbidden(topic: &str) -> OpError {
    OpError::new(
        "forbidden",
        format!("no grant for the private topic {topic:?}"),
    )
}

/// The monotonic instant at which `grant` expires (it is stated in Unix seconds).
fn grant_deadline(grant: &Grant, now: Instant) -> Instant {
    now + Duration::from_secs(grant.exp.saturating_sub(auth::unix_now()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::conn::State;
    use crate::testkit::World;
    use crate::timer::Timer;

    #[test]
    fn subscribe_receive_unsubscribe() {
        let mut w = World::new(&[]);
        let id = w.open("/ws");
        w.send_text(id, r#"{"op":"subscribe","topic":"a"}"#);
        assert_eq!(w.messages(id)[0]["op"], "subscribed");
        w.publish(r#"{"topic":"a","data":"x"}"#);
        assert_eq!(w.messages(id)[0]["data"], "x");
        w.send_text(id, r#"{"op":"unsubscribe","topic":"a"}"#);
        assert_eq!(w.messages(id)[0]["op"], "unsubscribed");
        w.publish(r#"{"topic":"a","data":"y"}"#);
        assert!(w.messages(id).is_empty());
        assert_eq!(w.pubsub.topic_count(), 0);
    }

    #[test]
    fn bad_ops_get_errors_and_the_connection_stays() {
        let mut w = World::new(&[]);
        let id = w.open("/ws");
        w.send_text(id, "not json");
        w.send_text(id, r#"{"op":"dance"}"#);
        let got = w.messages(id);
        assert_eq!(got[0]["error"], "bad_json");
        assert_eq!(got[1]["error"], "unknown_op");
        assert!(matches!(w.conns[id].state, State::Open(_)));
        assert_eq!(w.counters.op_errors, 2);
    }

    #[test]
    fn a_private_topic_needs_a_grant() {
        let mut w = World::new(&[
            "--private-topics",
            "user:*",
            "--token-secret",
            "a-secret-of-32-bytes-for-tests!!",
        ]);
        let id = w.open("/ws?topics=user:1,public");
        let got = w.messages(id);
        assert_eq!(got[0]["op"], "error");
        assert_eq!(got[0]["error"], "forbidden");
        assert_eq!(got[1]["op"], "subscribed");
        assert_eq!(got[1]["topic"], "public");
    }

    #[test]
    fn a_binary_frame_on_ws_closes_with_1003() {
        let mut w = World::new(&[]);
        let id = w.open("/ws");
        let frame = crate::testkit::client_frame(0x2, b"\x00\x01");
        w.send(id, &frame);
        let frames = w.frames(id);
        assert_eq!(frames.last().and_then(|f| f.close_code()), Some(1003));
        assert!(matches!(w.conns[id].state, State::Finishing));
    }

    #[test]
    fn a_slow_consumer_gets_1008_and_its_backlog_is_dropped() {
        let mut w = World::new(&["--send-queue-limit", "2000"]);
        let slow = w.open("/ws?topics=t");
        let fine = w.open("/ws?topics=t");
        let _ = w.frames(slow);
        let data = format!(r#""{}""#, "x".repeat(500));
        for _ in 0..5 {
            w.publish(&format!(r#"{{"topic":"t","data":{data}}}"#));
            // `fine` reads everything; `slow` reads nothing.
            let _ = w.frames(fine);
        }
        assert_eq!(w.counters.slow_consumers, 1);
        assert!(matches!(w.conns[slow].state, State::Closing(_)));
        // The close frame did not wait behind the dropped backlog.
        let frames = w.frames(slow);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0].close_code(), Some(1008));
        assert!(matches!(w.conns[fine].state, State::Open(_)));
    }

    #[test]
    fn drain_close_frames_follow_the_messages_already_queued() {
        let mut w = World::new(&[]);
        let id = w.open("/ws?topics=t");
        w.publish(r#"{"topic":"t","data":1}"#);
        let now = w.now;
        w.sessions
            .close_all(&mut w.conns, &mut w.pubsub, &mut w.counters, now);
        let frames = w.frames(id);
        let kinds: Vec<(u8, Option<u16>)> =
            frames.iter().map(|f| (f.opcode, f.close_code())).collect();
        assert_eq!(kinds, [(1, None), (1, None), (8, Some(1001))]);
        assert_eq!(frames[1].json()["op"], "message");
        assert_eq!(w.pubsub.topic_count(), 0);
    }

    /// A JSON message's data of about 1 KiB, as an application would publish it.
    fn big_data() -> String {
        let item = r#"{"symbol":"ACME","bid":101.25,"ask":101.5,"venue":"XNYS"}"#;
        format!("[{}]", vec![item; 16].join(","))
    }

    #[test]
    fn a_publish_is_compressed_once_for_every_deflate_subscriber() {
        let mut w = World::new(&[]);
        let (z1, accepted) = w.open_deflate("/ws?topics=t");
        assert!(accepted);
        let (z2, _) = w.open_deflate("/ws?topics=t");
        let plain = w.open("/ws?topics=t");
        for id in [z1, z2, plain] {
            let subscribed = w.frames(id);
            // Replies to ops go plain.
            assert!(!subscribed[0].rsv1);
        }
        w.publish(&format!(r#"{{"topic":"t","data":{}}}"#, big_data()));
        let (f1, f2, fp) = (w.frames(z1), w.frames(z2), w.frames(plain));
        assert!(f1[0].rsv1 && f2[0].rsv1 && !fp[0].rsv1);
        assert_eq!(f1[0].payload, f2[0].payload);
        assert!(f1[0].payload.len() * 3 < fp[0].payload.len());
        assert_eq!(f1[0].data(), fp[0].payload);
        assert_eq!(w.counters.compressed, 1);
        assert_eq!(w.counters.delivered_compressed, 2);
        // Below --compression-min-size, everyone gets the plain frame.
        w.publish(r#"{"topic":"t","data":"small"}"#);
        assert!(!w.frames(z1)[0].rsv1);
        assert_eq!(w.counters.compressed, 1);
    }

    #[test]
    fn a_topic_without_deflate_subscribers_costs_no_compression() {
        let mut w = World::new(&[]);
        let plain = w.open("/ws?topics=t");
        let _ = w.frames(plain);
        w.publish(&format!(r#"{{"topic":"t","data":{}}}"#, big_data()));
        assert!(!w.frames(plain)[0].rsv1);
        assert_eq!(w.counters.compressed, 0);
    }

    #[test]
    fn with_no_compression_offers_are_declined() {
        let mut w = World::new(&["--no-compression"]);
        let (id, accepted) = w.open_deflate("/ws?topics=t");
        assert!(!accepted);
        let _ = w.frames(id);
        w.publish(&format!(r#"{{"topic":"t","data":{}}}"#, big_data()));
        assert!(!w.frames(id)[0].rsv1);
    }

    /// A client's compressed message: the deflated payload in one frame with RSV1 set.
    fn compressed_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut c =
            flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 15);
        let mut deflated = Vec::with_capacity(payload.len() + 64);
        c.compress_vec(payload, &mut deflated, flate2::FlushCompress::Sync)
            .unwrap();
        deflated.truncate(deflated.len() - 4);
        crate::testkit::client_frame_with(0xc0 | opcode, &deflated)
    }

    #[test]
    fn compressed_ops_are_inflated_and_answered() {
        let mut w = World::new(&[]);
        let (id, _) = w.open_deflate("/ws");
        w.send(
            id,
            &compressed_frame(0x1, br#"{"op":"subscribe","topic":"z"}"#),
        );
        assert_eq!(w.messages(id)[0]["op"], "subscribed");
        // Without the extension, RSV1 is a protocol error.
        let plain = w.open("/ws");
        w.send(plain, &compressed_frame(0x1, br#"{"op":"ping"}"#));
        assert_eq!(
            w.frames(plain).last().and_then(|f| f.close_code()),
            Some(1002)
        );
    }

    #[test]
    fn a_message_that_inflates_past_the_limit_gets_1009_and_garbage_1007() {
        let mut w = World::new(&["--max-message-size", "4096"]);
        let (id, _) = w.open_deflate("/ws");
        // 1 MiB of spaces compresses to about 1 KiB: small on the wire, far too big.
        let bomb = compressed_frame(0x1, &vec![b' '; 1 << 20]);
        assert!(bomb.len() < 4096);
        w.send(id, &bomb);
        assert_eq!(w.frames(id).last().and_then(|f| f.close_code()), Some(1009));
        let (id, _) = w.open_deflate("/ws");
        w.send(
            id,
            &crate::testkit::client_frame_with(0xc1, &[0xff, 0xfe, 0xfd]),
        );
        assert_eq!(w.frames(id).last().and_then(|f| f.close_code()), Some(1007));
    }

    #[test]
    fn echo_answers_compressed_when_negotiated_and_worth_it() {
        let mut w = World::new(&[]);
        let (id, _) = w.open_deflate("/echo");
        let text = big_data();
        w.send(id, &compressed_frame(0x1, text.as_bytes()));
        let frames = w.frames(id);
        assert!(frames[0].rsv1 && frames[0].opcode == 0x1);
        assert_eq!(frames[0].data(), text.as_bytes());
        w.send(id, &compressed_frame(0x2, b"tiny"));
        let frames = w.frames(id);
        assert!(!frames[0].rsv1 && frames[0].opcode == 0x2);
        assert_eq!(frames[0].payload, b"tiny");
        // An /echo peer may ask for a narrower window; its replies keep to it.
        let (id, head) = w.open_with(
            "/echo",
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9\r\n",
        );
        assert!(head.contains("server_max_window_bits=9"), "{head}");
        w.send_text(id, &text);
        let frames = w.frames(id);
        assert!(frames[0].rsv1);
        assert_eq!(frames[0].data(), text.as_bytes());
    }

    #[test]
    fn only_a_silent_socket_is_pinged() {
        let mut w = World::new(&["--ping-interval", "10"]);
        let id = w.open("/ws");
        w.advance(Duration::from_secs(6));
        w.send_text(id, r#"{"op":"ping"}"#);
        let _ = w.frames(id);
        // Ten seconds after opening, but only four since the client spoke: no ping.
        w.advance(Duration::from_secs(4));
        let now = w.now;
        w.sessions.on_ping_timer(&mut w.conns, id, now);
        assert!(w.frames(id).is_empty());
        assert!(!w.conns[id].timers.is_armed(Timer::Pong));
        // Silent for a whole interval: pinged, and the pong timer runs.
        w.advance(Duration::from_secs(6));
        let now = w.now;
        w.sessions.on_ping_timer(&mut w.conns, id, now);
        let frames = w.frames(id);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].opcode, 0x9);
        assert!(w.conns[id].timers.is_armed(Timer::Pong));
    }
}
