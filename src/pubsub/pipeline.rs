//! The publish pipeline: what happens between "publish this" and frames queued on
//! subscribers, and where a subscription starts. It owns the hub (topics and local
//! subscribers), the history (epochs, ids and kept messages, without Redis), the Redis
//! link when there is one, and the subscriptions waiting for Redis.
//!
//! Without Redis, a publish takes the topic's next id from history, is framed once, kept,
//! and queued on every subscriber; a subscribe (or resume) is answered at once from
//! history, so nothing can be published between the reply and the replay.
//!
//! Subscribers that negotiated permessage-deflate get the message compressed, and it is
//! compressed once: the first such member a fan-out meets has the compressed twin of the
//! frame made (one fresh deflate stream, no context kept), and every later one gets the
//! same `Bytes`. A topic with none of them costs no compression; history keeps the plain
//! frame, and replays (a resume's missed messages) go plain, as RFC 7692 allows.
//!
//! Through Redis, the publish goes to Redis (which assigns the id and keeps the history
//! stream) and the frame is queued when the message comes back on the subscription link.
//! A subscription there starts in three steps, so that there is no gap and no duplicate
//! at the seam: Redis confirms the channel; then a read returns the topic's epoch, last
//! id L and what a resume missed; then the reply and replay go out, followed by whatever
//! arrived on the channel meanwhile with an id above L, and the member turns live.
//!
//! It never touches a socket: it queues bytes through the connection table, and hands
//! back the subscribers a message made slow consumers, for the session handler to close.
//! The Redis link's I/O methods (`on_ready`, `tick`, `flush`) are called by the loop only.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use log::debug;
use serde_json::value::RawValue;

use crate::app::App;
use crate::app::webhook::Kind as Hook;
use crate::config::Config;
use crate::conn::{ConnId, Conns, Ended};
use crate::handover;
use crate::metrics::{Counters, HistoryGauges, RedisGauges, Resumes};
use crate::pubsub::history::{self, History, Outcome};
use crate::pubsub::hub::{self, Follow, Hub, Joined, Left, Published, SubscribeError};
use crate::pubsub::occupancy::{Call, Entry, News, Occupancy};
use crate::pubsub::presence::{self, Change, Presence};
use crate::pubsub::redis::{PresenceAnswer, Redis, RedisCounters, Stored};
use crate::ws::codec as ws;
use crate::ws::deflate::Deflater;
use crate::ws::protocol::{self, OpError, Position, Resume};

/// What a fan-out did: how many subscribers it reached, which of them it pushed past
/// `--send-queue-limit` (to be closed as slow consumers), and which missed messages they
/// cannot be given live (to be told to reconnect and resume). Usually both are empty,
/// with no allocation.
#[derive(Debug, Default)]
pub struct Fanout {
    pub reached: usize,
    pub slow: Vec<ConnId>,
    pub lost: Vec<ConnId>,
}

/// The epoch a `subscribed` reply names when Redis, which holds the epochs, cannot be
/// asked: no client position matches it, so a later resume is honestly `recovered:false`.
const UNKNOWN_EPOCH: &str = "";

/// Where a client asked to resume from, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LeftOff {
    since: u64,
    epoch: String,
}

/// A subscription waiting for Redis: to confirm the channel, then to answer the read.
#[derive(Debug)]
struct Waiting {
    conn: ConnId,
    serial: u64,
    from: Option<LeftOff>,
    /// Carried by a live upgrade: the client already has its `subscribed` reply, so a
    /// resume that recovers everything only replays (one that cannot still says so).
    quiet: bool,
}

/// Why a read was sent to Redis.
#[derive(Debug)]
enum Reader {
    /// Subscriptions to `topic` waiting for one read: sent for the first of them, it
    /// serves every later one it covers (a reconnect herd makes one read per topic, not
    /// one per client).
    Subscriptions {
        topic: String,
        /// The read's position: `None` asks for the topic's position only.
        since: Option<u64>,
        epoch: Option<String>,
        waiting: Vec<Waiting>,
    },
    /// `GET /history` through Redis: the front door's held response `group` waits for it.
    Http { group: u64 },
}

/// Messages that arrived on a topic while reads for it were at Redis. A subscription
/// whose read comes back replays from here the ones after the id its read saw.
#[derive(Debug, Default)]
struct Arrivals {
    reads: usize,
    /// In the order they came.
    frames: VecDeque<Arrival>,
}

/// A message that came on a channel: (id, epoch, frame).
type Arrival = (u64, String, Bytes);

/// A read's answer, shared by the subscriptions it serves.
#[derive(Clone, Copy)]
struct ReadAnswer<'a> {
    stored: &'a Stored,
    /// `stored.messages`, framed once.
    frames: &'a [(u64, Bytes)],
    arrived: &'a VecDeque<Arrival>,
}

/// Who waits for a presence read at Redis.
#[derive(Debug)]
enum PresenceReader {
    /// The `presence` op of this WebSocket.
    Ws {
        conn: ConnId,
        serial: u64,
        topic: String,
    },
    /// `GET /presence`: the front door's held response `group`.
    Http { group: u64, topic: String },
}

/// A `GET /presence` answer through Redis, for the front door.
pub struct HttpPresence {
    pub group: u64,
    pub topic: String,
    pub result: Result<presence::Snapshot, String>,
}

/// A `/history` answer through Redis, for the front door.
pub struct HttpRead {
    pub group: u64,
    pub result: Result<Stored, String>,
}

pub struct PubSub {
    hub: Hub,
    history: History,
    redis: Option<Redis>,
    /// Subscriptions waiting for Redis to confirm their topic's channel, so a client is
    /// never told it is subscribed before messages can reach it.
    pending_acks: HashMap<String, Vec<Waiting>>,
    /// Reads at Redis, by tag.
    reads: HashMap<u64, Reader>,
    next_read: u64,
    arrivals: HashMap<String, Arrivals>,
    /// `--send-queue-limit`: past it, a subscriber is a slow consumer.
    send_queue_limit: usize,
    resumes: Resumes,
    /// Local publishes of this pass whose frames are not yet queued to their subscribers:
    /// the reactor writes the publishers' responses first, then calls `fan_out_pending`.
    pending: Vec<Published>,
    /// Who is subscribed to the `--presence` topics.
    presence: Presence,
    /// Join/leave events of this pass, queued to their topics' watchers with the fan-out.
    presence_events: Vec<(String, Bytes)>,
    /// Presence reads at Redis, by tag (from the reads' sequence).
    presence_reads: HashMap<u64, PresenceReader>,
    /// With Redis: when this process next tells Redis it is alive on its presence topics.
    presence_beat_at: Instant,
    /// Compresses each published message once, for the subscribers that take it.
    deflater: Deflater,
    /// The application (`--auth-url`, `--webhook-url`): kept here beside the Redis link,
    /// the other party outside, so every handler that reaches the pipeline reaches it,
    /// and the webhook events come from where subscriptions start and end.
    app: App,
    /// With Redis and webhooks: whether topics are occupied cluster-wide.
    occupancy: Option<Occupancy>,
}

/// A message's frames during one fan-out: the plain one, and its compressed twin, made
/// when the first member that takes it comes up.
struct Frames<'a> {
    plain: &'a Bytes,
    /// `None` until asked for; then `Some(None)` when the message goes plain to all (too
    /// small, or no smaller compressed).
    deflated: Option<Option<Bytes>>,
}

impl<'a> Frames<'a> {
    fn new(plain: &'a Bytes) -> Frames<'a> {
        Frames {
            plain,
            deflated: None,
        }
    }

    /// The frame for a member, and whether it is the compressed one.
    fn pick(
        &mut self,
        deflate: bool,
        deflater: &mut Deflater,
        counters: &mut Counters,
    ) -> (&Bytes, bool) {
        if !deflate {
            return (self.plain, false);
        }
        let plain = self.plain;
        let deflated = self.deflated.get_or_insert_with(|| {
            let frame = ws::shared_deflate_frame(plain, deflater);
            counters.compressed += u64::from(frame.is_some());
            frame
        });
        match deflated {
            Some(frame) => (frame, true),
            None => (plain, false),
        }
    }
}

impl PubSub {
    pub fn new(cfg: &Config, history: History, now: Instant) -> PubSub {
        PubSub {
            hub: Hub::with_cap(cfg.max_subscriptions),
            history,
            redis: cfg.redis.clone().map(|c| Redis::new(c, now)),
            pending_acks: HashMap::new(),
            reads: HashMap::new(),
            next_read: 1,
            arrivals: HashMap::new(),
            send_queue_limit: cfg.send_queue_limit,
            resumes: Resumes::default(),
            pending: Vec::new(),
            presence: Presence::new(cfg.presence.clone()),
            presence_events: Vec::new(),
            presence_reads: HashMap::new(),
            presence_beat_at: now,
            deflater: Deflater::new(cfg.compression_min_size),
            app: App::new(cfg.app.as_ref()),
            occupancy: None,
        }
        .with_occupancy(now)
    }

    /// Webhooks through Redis: topic_occupied and topic_vacated are decided there.
    fn with_occupancy(mut self, now: Instant) -> PubSub {
        if let Some(r) = self.redis.as_ref().filter(|_| self.app.hooks_on()) {
            self.occupancy = Some(Occupancy::new(r.prefix(), r.instance(), now));
        }
        self
    }

    // ---- publishing ------------------------------------------------------------------

    pub fn through_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// Assign the topic's next id and keep the message in history; its frame goes to the
    /// topic's subscribers at `fan_out_pending`, after the publisher has its answer.
    /// Returns the id and how many subscribers it will reach.
    pub fn publish_local(
        &mut self,
        counters: &mut Counters,
        topic: &str,
        data: &RawValue,
        now: Instant,
    ) -> (u64, usize) {
        // Framed only when someone will read it: a subscriber here, or history.
        let wanted = self.hub.has_topic(topic) || self.history.limits().size > 0;
        let appended = self.history.append(topic, now, |id| {
            if wanted {
                hub::message_frame(topic, id, data.get())
            } else {
                (Bytes::new(), 0..0)
            }
        });
        counters.published += 1;
        let published = self.hub.published(topic, appended.id, appended.frame);
        let reach = self.hub.reach(&published);
        let id = published.id;
        if reach > 0 {
            self.pending.push(published);
        }
        (id, reach)
    }

    /// Queue this pass's local publishes to their subscribers, in publish order. A
    /// subscriber that joined after a message was published has its place past it (its
    /// `subscribed` reply or its replay covers it), so it gets nothing twice.
    pub fn fan_out_pending(&mut self, conns: &mut Conns, counters: &mut Counters) -> Fanout {
        let mut fanout = Fanout::default();
        let limit = self.send_queue_limit;
        for (topic, frame) in std::mem::take(&mut self.presence_events) {
            for watcher in self.presence.watchers(&topic) {
                if let Some(queued) = conns.queue_shared(watcher, &frame)
                    && queued > limit
                {
                    fanout.slow.push(watcher);
                }
            }
        }
        for published in std::mem::take(&mut self.pending) {
            let mut frames = Frames::new(&published.frame);
            self.hub.deliver(&published, |sub, deflate| {
                let (frame, compressed) = frames.pick(deflate, &mut self.deflater, counters);
                // The hub holds open sessions only; a miss would be our bug, not a reason
                // to die.
                let Some(queued) = conns.queue_shared(sub, frame) else {
                    debug_assert!(false, "hub names a connection that is gone");
                    return;
                };
                fanout.reached += 1;
                counters.delivered_compressed += u64::from(compressed);
                if queued > limit {
                    fanout.slow.push(sub);
                }
            });
        }
        counters.delivered += fanout.reached as u64;
        fanout
    }

    /// Hand a publish to Redis; `tag` names the HTTP response waiting for its reply (none
    /// for a client's publish). False when Redis is down: nothing was sent.
    pub fn publish_to_redis(
        &mut self,
        topic: &str,
        data: &str,
        tag: Option<u64>,
        now: Instant,
    ) -> bool {
        self.redis
            .as_mut()
            .is_some_and(|r| r.publish(topic, data, tag, now))
    }

    /// A message came back from Redis with the id Redis gave it: queue it locally, and
    /// keep it for the subscriptions whose reads are still at Redis.
    pub fn deliver(
        &mut self,
        conns: &mut Conns,
        counters: &mut Counters,
        topic: &str,
        (id, epoch): (u64, &str),
        data: &str,
    ) -> Fanout {
        counters.redis_messages += 1;
        if !self.hub.has_topic(topic) && !self.arrivals.contains_key(topic) {
            return Fanout::default();
        }
        let (frame, _) = hub::message_frame(topic, id, data);
        if let Some(a) = self.arrivals.get_mut(topic) {
            a.frames.push_back((id, epoch.to_string(), frame.clone()));
        }
        let published = self.hub.published(topic, id, frame);
        // Each member checks the message against its own place: a resume's replay may
        // already have given it this one (the read's reply can overtake the message on
        // the other link), and a message that does not follow means it missed some (an
        // id skipped while the subscription link was down, another epoch after Redis
        // lost its data). Those reconnect and resume; history says what they lost.
        let mut fanout = Fanout::default();
        let limit = self.send_queue_limit;
        let mut frames = Frames::new(&published.frame);
        self.hub
            .follow(&published, epoch, |sub, verdict, deflate| match verdict {
                Follow::Next => {
                    let (frame, compressed) = frames.pick(deflate, &mut self.deflater, counters);
                    if let Some(queued) = conns.queue_shared(sub, frame) {
                        fanout.reached += 1;
                        counters.delivered_compressed += u64::from(compressed);
                        if queued > limit {
                            fanout.slow.push(sub);
                        }
                    }
                }
                Follow::Seen => {}
                Follow::Missed => fanout.lost.push(sub),
            });
        counters.delivered += fanout.reached as u64;
        if !fanout.lost.is_empty() {
            debug!(
                "redis: {topic:?} id {id} in epoch {epoch}: {} subscribers missed messages",
                fanout.lost.len()
            );
        }
        fanout
    }

    // ---- subscribing -----------------------------------------------------------------

    /// Subscribe `id` to `topic`, from where the client left off if it says, and tell it
    /// where the topic stands: now (from history), or once Redis has answered. On a
    /// presence topic it joins as a member; `watch`: it gets the join/leave events.
    pub fn subscribe(
        &mut self,
        conns: &mut Conns,
        id: ConnId,
        topic: &str,
        (resume, watch): (Option<&Resume>, bool),
        now: Instant,
    ) -> Result<(), SubscribeError> {
        self.subscribe_topic(conns, id, topic, resume, now)?;
        if self.presence.applies(topic) {
            let member = presence::member_id(
                grant_sub(conns, id).as_deref(),
                self.anon_scope(),
                conns[id].serial,
            );
            if let Some(change) = self.presence.join(id, topic, &member, watch) {
                self.on_presence_change(true, change, now);
            }
        }
        Ok(())
    }

    fn subscribe_topic(
        &mut self,
        conns: &mut Conns,
        id: ConnId,
        topic: &str,
        resume: Option<&Resume>,
        now: Instant,
    ) -> Result<(), SubscribeError> {
        let from = resume.map(|r| LeftOff {
            since: r.since,
            epoch: r.epoch.to_string(),
        });
        // Whether it takes the compressed frames is its connection's to say, once.
        let deflate = conns
            .get(id)
            .and_then(|c| c.session())
            .is_some_and(|s| s.ws.takes_shared_deflate());
        let Some(redis) = self.redis.as_mut() else {
            let joined = self.hub.subscribe(id, topic, true, deflate)?;
            if joined == Joined::NewTopic {
                self.history.retain(topic);
                self.app.event(Hook::TopicOccupied, topic, None, now);
            }
            self.answer_from_history(conns, id, topic, from.as_ref());
            return Ok(());
        };
        // Through Redis the member turns live only once its read has come back.
        let joined = self.hub.subscribe(id, topic, false, deflate)?;
        if joined == Joined::Already {
            self.hub.set_live(id, topic, false);
        }
        if joined == Joined::NewTopic {
            redis.subscribe(topic);
            if let Some(o) = self.occupancy.as_mut() {
                send(redis, o.join(Entry::Topic(topic.to_string())), now);
            }
        }
        let waiting = Waiting {
            conn: id,
            serial: conns[id].serial,
            from,
            quiet: false,
        };
        if !redis.is_up() {
            // The subscription is recorded and will be made on reconnect; holding the
            // reply until then would only stall the client. Where the topic stands is
            // Redis's to say, so the reply cannot say it.
            self.answer_unknown(conns, topic, waiting);
        } else if redis.is_confirmed(topic) {
            self.start_read(conns, topic, waiting, now);
        } else {
            self.pending_acks
                .entry(topic.to_string())
                .or_default()
                .push(waiting);
        }
        Ok(())
    }

    /// Without Redis: the reply and the replay, from history, in one step.
    fn answer_from_history(
        &mut self,
        conns: &mut Conns,
        id: ConnId,
        topic: &str,
        from: Option<&LeftOff>,
    ) {
        let sub = grant_sub(conns, id);
        let Some(from) = from else {
            let at = self
                .history
                .position(topic)
                .unwrap_or_else(|| self.history.retain(topic));
            self.hub.set_place(id, topic, at.last_id);
            let reply = protocol::subscribed(topic, &position(&at, None), sub.as_deref());
            conns.queue(id, reply);
            return;
        };
        let Some(resume) = self.history.resume(topic, &from.epoch, from.since) else {
            // Retained on subscribe, so there is a record; answer as for a lost one.
            debug_assert!(false, "a subscribed topic has a history record");
            return;
        };
        count(&mut self.resumes, resume.outcome);
        self.hub.set_place(id, topic, resume.position.last_id);
        let at = position(&resume.position, Some(resume.recovered()));
        conns.queue(id, protocol::subscribed(topic, &at, sub.as_deref()));
        for message in resume.messages {
            conns.queue(id, message.frame().clone());
        }
    }

    /// Ask Redis where `topic` stands (and what the client missed), now that its channel
    /// is confirmed: everything published after the read executes comes on the channel.
    fn start_read(&mut self, conns: &mut Conns, topic: &str, waiting: Waiting, now: Instant) {
        // A read already at Redis answers this one too if it reads from no later: its
        // reply holds everything after the position it asked for, and what arrives on
        // the channel after it was sent is kept in `arrivals`.
        let covering = self.reads.values_mut().find(|r| match r {
            Reader::Subscriptions {
                topic: t,
                since,
                epoch,
                ..
            } if t == topic => match (&waiting.from, since) {
                (None, _) => true,
                (Some(f), Some(s)) => *s <= f.since && epoch.as_deref() == Some(&*f.epoch),
                (Some(_), None) => false,
            },
            _ => false,
        });
        if let Some(Reader::Subscriptions { waiting: list, .. }) = covering {
            list.push(waiting);
            return;
        }
        let Some(redis) = self.redis.as_mut() else {
            return;
        };
        let tag = self.next_read;
        self.next_read += 1;
        let (since, epoch) = match &waiting.from {
            Some(f) => (Some(f.since), Some(f.epoch.clone())),
            None => (None, None),
        };
        if !redis.read_history(topic, since, epoch.as_deref(), tag, now) {
            return self.answer_unknown(conns, topic, waiting);
        }
        self.arrivals.entry(topic.to_string()).or_default().reads += 1;
        let reader = Reader::Subscriptions {
            topic: topic.to_string(),
            since,
            epoch,
            waiting: vec![waiting],
        };
        self.reads.insert(tag, reader);
    }

    /// The reply when Redis cannot say where the topic stands: an unknown epoch, id 0,
    /// and for a resume `recovered:false`. The member turns live.
    fn answer_unknown(&mut self, conns: &mut Conns, topic: &str, waiting: Waiting) {
        if !self.still_subscribed(conns, &waiting, topic) {
            return;
        }
        let recovered = waiting.from.as_ref().map(|_| false);
        if recovered.is_some() {
            self.resumes.unavailable += 1;
        }
        let at = Position {
            epoch: UNKNOWN_EPOCH,
            last_id: 0,
            recovered,
        };
        let sub = grant_sub(conns, waiting.conn);
        conns.queue(
            waiting.conn,
            protocol::subscribed(topic, &at, sub.as_deref()),
        );
        self.hub.set_live(waiting.conn, topic, true);
    }

    fn still_subscribed(&self, conns: &Conns, waiting: &Waiting, topic: &str) -> bool {
        conns
            .same(waiting.conn, waiting.serial)
            .is_some_and(|c| c.is_open() && self.hub.is_subscribed(waiting.conn, topic))
    }

    /// Redis answered a read. A subscription's reply, replay and live messages go out
    /// now; a `/history` answer is handed back for the front door.
    pub fn on_read(
        &mut self,
        conns: &mut Conns,
        tag: u64,
        result: Result<Stored, String>,
    ) -> Option<HttpRead> {
        match self.reads.remove(&tag)? {
            Reader::Http { group } => Some(HttpRead { group, result }),
            Reader::Subscriptions { topic, waiting, .. } => {
                let arrived = self.arrivals.get_mut(&topic).map(|a| {
                    a.reads -= 1;
                    if a.reads == 0 {
                        std::mem::take(&mut a.frames)
                    } else {
                        a.frames.clone()
                    }
                });
                if self.arrivals.get(&topic).is_some_and(|a| a.reads == 0) {
                    self.arrivals.remove(&topic);
                }
                let arrived = arrived.unwrap_or_default();
                match result {
                    Ok(stored) => {
                        // Framed once for every subscription the read serves.
                        let frames: Vec<(u64, Bytes)> = stored
                            .messages
                            .iter()
                            .map(|(id, data)| (*id, hub::message_frame(&topic, *id, data).0))
                            .collect();
                        let read = ReadAnswer {
                            stored: &stored,
                            frames: &frames,
                            arrived: &arrived,
                        };
                        for w in waiting {
                            self.answer_from_redis(conns, &topic, w, &read);
                        }
                    }
                    Err(why) => {
                        debug!("redis: read for {topic:?} failed: {why}");
                        for w in waiting {
                            self.answer_unknown(conns, &topic, w);
                        }
                    }
                }
                None
            }
        }
    }

    fn answer_from_redis(
        &mut self,
        conns: &mut Conns,
        topic: &str,
        waiting: Waiting,
        read: &ReadAnswer,
    ) {
        let ReadAnswer {
            stored,
            frames,
            arrived,
        } = *read;
        if !self.still_subscribed(conns, &waiting, topic) {
            return;
        }
        // This subscription's share of the read: what follows its own position.
        let since = waiting.from.as_ref().map_or(stored.last_id, |f| f.since);
        let from_epoch = waiting
            .from
            .as_ref()
            .is_none_or(|f| f.epoch == stored.epoch);
        let mine: &[(u64, Bytes)] = if from_epoch {
            let start = frames.partition_point(|(id, _)| *id <= since);
            &frames[start..]
        } else {
            frames
        };
        let ids: Vec<u64> = mine.iter().map(|(id, _)| *id).collect();
        let outcome = waiting
            .from
            .as_ref()
            .map(|from| redis_outcome(from, &stored.epoch, stored.last_id, &ids));
        if let Some(outcome) = outcome {
            count(&mut self.resumes, outcome);
        }
        let at = Position {
            epoch: &stored.epoch,
            last_id: stored.last_id,
            recovered: outcome.map(|o| o == Outcome::Recovered),
        };
        let id = waiting.conn;
        let sub = grant_sub(conns, id);
        if !(waiting.quiet && outcome == Some(Outcome::Recovered)) {
            conns.queue(id, protocol::subscribed(topic, &at, sub.as_deref()));
        }
        if waiting.from.is_some() {
            for (_, frame) in mine {
                conns.queue(id, frame.clone());
            }
        }
        // What came on the channel while the read was at Redis: the ids after its place,
        // in order. Later ones, and ones still on their way, are checked live.
        let mut last = stored.last_id;
        for (msg_id, epoch, frame) in arrived {
            if *epoch == stored.epoch && *msg_id == last + 1 {
                conns.queue(id, frame.clone());
                last = *msg_id;
            }
        }
        self.hub.place(id, topic, &stored.epoch, last);
        self.hub.set_live(id, topic, true);
    }

    /// `GET /history` through Redis: the answer comes back from `on_read` with `group`.
    /// False when Redis is down.
    pub fn read_for_http(
        &mut self,
        topic: &str,
        since: u64,
        epoch: Option<&str>,
        group: u64,
        now: Instant,
    ) -> bool {
        let tag = self.next_read;
        let sent = self
            .redis
            .as_mut()
            .is_some_and(|r| r.read_history(topic, Some(since), epoch, tag, now));
        if sent {
            self.next_read += 1;
            self.reads.insert(tag, Reader::Http { group });
        }
        sent
    }

    /// `GET /history` without Redis.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Answered either way (unsubscribing from a topic one is not in is harmless).
    pub fn unsubscribe(&mut self, id: ConnId, topic: &str, now: Instant) {
        if self.hub.unsubscribe(id, topic) == Left::TopicFreed {
            self.forget_topics(vec![topic.to_string()], now);
        }
        if let Some(change) = self.presence.leave(id, topic) {
            self.on_presence_change(false, change, now);
        }
    }

    /// A connection ended: if it was an open WebSocket, it leaves every topic.
    pub fn leave(&mut self, ended: Ended, now: Instant) {
        if let Ended(Some(id)) = ended {
            self.leave_all(id, now);
        }
    }

    /// `id` leaves every topic (its WebSocket is closing).
    pub fn leave_all(&mut self, id: ConnId, now: Instant) {
        let freed = self.hub.unsubscribe_all(id);
        self.forget_topics(freed, now);
        for change in self.presence.leave_all(id) {
            self.on_presence_change(false, change, now);
        }
    }

    // ---- presence --------------------------------------------------------------------

    /// What anonymous member ids are unique within: this process, or with Redis, every
    /// process sharing it.
    fn anon_scope(&self) -> Option<&str> {
        self.redis.as_ref().map(Redis::instance)
    }

    /// A member appeared here (`join`) or disappeared. Without Redis that is the news:
    /// the watchers hear of it, within the cap. With Redis, Redis decides whether it is
    /// news anywhere, and the event comes back on the topic's channel.
    fn on_presence_change(&mut self, join: bool, change: Change, now: Instant) {
        if let Some(redis) = self.redis.as_mut() {
            // Every connection counts there: Redis sums them over processes. Down, this
            // is lost; the sync on reconnecting restores this process's members.
            let delta = if join { 1 } else { -1 };
            redis.presence_change(&change.topic, &change.member, delta, now);
            // Webhooks: the member's first or last connection here may be its first or
            // last anywhere; Redis decides, once.
            if let Some(o) = self.occupancy.as_mut().filter(|_| change.edge) {
                let entry = Entry::Member {
                    topic: change.topic.to_string(),
                    member: change.member.to_string(),
                };
                let call = if join { o.join(entry) } else { o.leave(entry) };
                send(redis, call, now);
            }
            return;
        }
        if !change.edge {
            return;
        }
        let hook = if join {
            Hook::MemberAdded
        } else {
            Hook::MemberRemoved
        };
        self.app
            .event(hook, &change.topic, Some(&change.member), now);
        // The count within the cap before and after: `change.count` is the one after.
        let busiest = change.count + usize::from(!join);
        if self.presence.listed(busiest) {
            let frame = protocol::presence_event(join, &change.topic, &change.member);
            self.presence_events.push((change.topic.to_string(), frame));
        }
    }

    /// The `presence` op from `id` (the session checked the grant): answered now from
    /// what is here, or with Redis once Redis has merged every process's members.
    pub fn presence_query(
        &mut self,
        conns: &mut Conns,
        id: ConnId,
        topic: &str,
        now: Instant,
    ) -> Result<(), OpError> {
        if !self.presence.applies(topic) {
            return Err(OpError::new(
                "presence_off",
                format!("{topic:?} keeps no presence (see --presence)"),
            ));
        }
        if !self.hub.is_subscribed(id, topic) {
            return Err(OpError::new(
                "not_subscribed",
                format!("only subscribers of {topic:?} may ask who is there"),
            ));
        }
        if self.redis.is_none() {
            let snapshot = self.presence.snapshot(topic);
            conns.queue(id, protocol::presence(topic, &snapshot));
            return Ok(());
        }
        let reader = PresenceReader::Ws {
            conn: id,
            serial: conns[id].serial,
            topic: topic.to_string(),
        };
        if self.presence_read(topic, reader, now) {
            Ok(())
        } else {
            Err(OpError::new(
                "unavailable",
                "redis unavailable: presence unknown",
            ))
        }
    }

    fn presence_read(&mut self, topic: &str, reader: PresenceReader, now: Instant) -> bool {
        let tag = self.next_read;
        let sent = self
            .redis
            .as_mut()
            .is_some_and(|r| r.presence_read(topic, tag, now));
        if sent {
            self.next_read += 1;
            self.presence_reads.insert(tag, reader);
        }
        sent
    }

    /// `GET /presence` through Redis: the answer comes back from `on_presence_read` with
    /// `group`. False when Redis is down.
    pub fn presence_for_http(&mut self, topic: &str, group: u64, now: Instant) -> bool {
        let reader = PresenceReader::Http {
            group,
            topic: topic.to_string(),
        };
        self.presence_read(topic, reader, now)
    }

    /// Redis answered a presence read: a WebSocket's answer goes out now; a
    /// `GET /presence` one is handed back for the front door.
    pub fn on_presence_read(
        &mut self,
        conns: &mut Conns,
        counters: &mut Counters,
        tag: u64,
        result: Result<PresenceAnswer, String>,
    ) -> Option<HttpPresence> {
        let result = result.map(|a| presence::Snapshot {
            count: a.count,
            members: a.members.map(|mut m| {
                m.sort_unstable();
                m
            }),
        });
        match self.presence_reads.remove(&tag)? {
            PresenceReader::Http { group, topic } => Some(HttpPresence {
                group,
                topic,
                result,
            }),
            PresenceReader::Ws {
                conn,
                serial,
                topic,
            } => {
                if conns.same(conn, serial).is_some_and(|c| c.is_open()) {
                    let reply = match result {
                        Ok(snapshot) => protocol::presence(&topic, &snapshot),
                        Err(_) => {
                            counters.op_errors += 1;
                            let e =
                                OpError::new("unavailable", "redis unavailable: presence unknown");
                            protocol::error(&e)
                        }
                    };
                    conns.queue(conn, reply);
                }
                None
            }
        }
    }

    /// A join or leave came on a topic's channel from Redis: its watchers here hear of it
    /// with this pass's fan-out.
    pub fn on_presence_event(&mut self, topic: &str, join: bool, member: &str) {
        if self.presence.watchers(topic).next().is_some() {
            let frame = protocol::presence_event(join, topic, member);
            self.presence_events.push((topic.to_string(), frame));
        }
    }

    /// Redis is (again) up: it may have lost this process's members, or missed changes
    /// while it was away; tell it again who is here.
    pub fn on_redis_up(&mut self, now: Instant) {
        let Some(redis) = self.redis.as_mut() else {
            return;
        };
        for topic in self.presence.topics() {
            redis.presence_sync(topic, self.presence.local_members(topic), now);
        }
        self.presence_beat_at = now + self.presence.beat_interval();
        if let Some(o) = self.occupancy.as_mut() {
            o.renew(now);
            for topic in self.hub.topic_names() {
                send(redis, o.join(Entry::Topic(topic.to_string())), now);
            }
            for topic in self.presence.topics() {
                for (member, _) in self.presence.local_members(topic) {
                    let (topic, member) = (topic.to_string(), member.to_string());
                    send(redis, o.join(Entry::Member { topic, member }), now);
                }
            }
        }
    }

    /// A script's reply from Redis: an occupancy transition this process reports.
    pub fn on_script(&mut self, tag: u64, result: Result<Vec<String>, String>, now: Instant) {
        let Some(news) = self
            .occupancy
            .as_mut()
            .and_then(|o| o.on_reply(tag, result))
        else {
            return;
        };
        for News { entry, occupied } in news {
            match (entry, occupied) {
                (Entry::Topic(t), true) => self.app.event(Hook::TopicOccupied, &t, None, now),
                (Entry::Topic(t), false) => self.app.event(Hook::TopicVacated, &t, None, now),
                (Entry::Member { topic, member }, join) => {
                    let hook = if join {
                        Hook::MemberAdded
                    } else {
                        Hook::MemberRemoved
                    };
                    self.app.event(hook, &topic, Some(&member), now);
                }
            }
        }
    }

    /// With Redis, every third of the TTL: this process is alive on its presence topics.
    fn presence_beat(&mut self, now: Instant) {
        let Some(redis) = self.redis.as_mut() else {
            return;
        };
        if now < self.presence_beat_at {
            return;
        }
        self.presence_beat_at = now + self.presence.beat_interval();
        for topic in self.presence.topics() {
            redis.presence_beat(topic, now);
        }
    }

    /// Whether `topic` keeps presence (`GET /presence` refuses the others).
    pub fn keeps_presence(&self, topic: &str) -> bool {
        self.presence.applies(topic)
    }

    /// `GET /presence` without Redis.
    pub fn presence_snapshot(&self, topic: &str) -> presence::Snapshot {
        self.presence.snapshot(topic)
    }

    // ---- live upgrade ----------------------------------------------------------------

    /// WebSocket work waiting for Redis: subscriptions for their channel or their read,
    /// `presence` ops for their answer. A live upgrade waits for it (bounded), since
    /// replies at Redis cannot be carried.
    pub fn waiting_at_redis(&self) -> usize {
        self.reads.len()
            + self.presence_reads.len()
            + self.pending_acks.values().map(Vec::len).sum::<usize>()
    }

    /// `id`'s subscriptions and where each stands, for the handover.
    pub fn export_topics(&self, id: ConnId) -> Vec<handover::Membership> {
        self.hub
            .places(id)
            .into_iter()
            .map(|(topic, live, epoch, last)| handover::Membership {
                presence: self.presence.entry(id, &topic),
                topic,
                live,
                epoch,
                last,
            })
            .collect()
    }

    /// A carried connection's subscriptions, at the places it had. Without Redis the
    /// history came along, so each goes on live where it was. Through Redis, whatever
    /// Redis published while no process listened is read back: each member resumes from
    /// its place as after a reconnect, quietly when nothing is missing. False when one
    /// cannot be carried (a resume was at Redis): the caller tells the client to
    /// reconnect, and its resume says what it missed.
    pub fn restore_topics(
        &mut self,
        conns: &mut Conns,
        id: ConnId,
        topics: Vec<handover::Membership>,
    ) -> bool {
        let deflate = conns
            .get(id)
            .and_then(|c| c.session())
            .is_some_and(|s| s.ws.takes_shared_deflate());
        let mut whole = true;
        for m in topics {
            if crate::topic::check_name(&m.topic).is_err() {
                whole = false;
                continue;
            }
            let live = self.redis.is_none() || (m.live && m.epoch.is_none());
            let Ok(joined) = self.hub.subscribe(id, &m.topic, live, deflate) else {
                whole = false;
                continue;
            };
            if let Some((member, watch)) = &m.presence {
                // Already a member before the upgrade: nobody is told it joined.
                let _ = self.presence.join(id, &m.topic, member, *watch);
            }
            let Some(redis) = self.redis.as_mut() else {
                if joined == Joined::NewTopic {
                    self.history.retain(&m.topic);
                }
                self.hub.set_place(id, &m.topic, m.last);
                continue;
            };
            if joined == Joined::NewTopic {
                redis.subscribe(&m.topic);
            }
            match (m.live, m.epoch) {
                (true, Some(epoch)) => {
                    self.hub.place(id, &m.topic, &epoch, m.last);
                    let waiting = Waiting {
                        conn: id,
                        serial: conns[id].serial,
                        from: Some(LeftOff {
                            since: m.last,
                            epoch,
                        }),
                        quiet: true,
                    };
                    self.pending_acks.entry(m.topic).or_default().push(waiting);
                }
                (true, None) => {}
                (false, _) => whole = false,
            }
        }
        whole
    }

    /// The topics `id` is subscribed to.
    pub fn topics_of(&self, id: ConnId) -> Vec<String> {
        self.hub.names(id)
    }

    /// Topics that lost their last local subscriber: with Redis, stop receiving them;
    /// without, history keeps them until their messages expire.
    fn forget_topics(&mut self, freed: Vec<String>, now: Instant) {
        for topic in freed {
            match self.redis.as_mut() {
                Some(r) => {
                    r.unsubscribe(&topic);
                    if let Some(o) = self.occupancy.as_mut() {
                        send(r, o.leave(Entry::Topic(topic.clone())), now);
                    }
                }
                None => {
                    self.history.release(&topic, now);
                    self.app.event(Hook::TopicVacated, &topic, None, now);
                }
            }
            self.pending_acks.remove(&topic);
        }
    }

    /// Redis confirmed `topic`'s channel: the subscriptions waiting for it are read.
    pub fn on_confirmed(&mut self, conns: &mut Conns, topic: &str, now: Instant) {
        let Some(waiting) = self.pending_acks.remove(topic) else {
            return;
        };
        for w in waiting {
            if self.still_subscribed(conns, &w, topic) {
                self.start_read(conns, topic, w, now);
            }
        }
    }

    /// Redis went down: nothing will confirm or read for the waiting subscriptions;
    /// answer them all.
    pub fn on_redis_down(&mut self, conns: &mut Conns) {
        let waiting: Vec<(String, Vec<Waiting>)> = self.pending_acks.drain().collect();
        for (topic, list) in waiting {
            for w in list {
                self.answer_unknown(conns, &topic, w);
            }
        }
    }

    /// The subscription link is (again) ready: subscribe to every local topic.
    pub fn resubscribe(&mut self) {
        if let Some(r) = self.redis.as_mut() {
            r.resubscribe(self.hub.topic_names());
        }
    }

    // ---- time ------------------------------------------------------------------------

    /// When history next has messages to expire, or presence's heartbeat is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        let beat = (self.redis_up() && self.presence.topics().next().is_some())
            .then_some(self.presence_beat_at);
        let sweep = self
            .occupancy
            .as_ref()
            .filter(|_| self.redis_up())
            .map(Occupancy::next_sweep);
        self.history
            .next_expiry()
            .into_iter()
            .chain(beat)
            .chain(sweep)
            .min()
    }

    pub fn expire(&mut self, now: Instant) {
        self.history.expire(now);
        self.presence_beat(now);
        if let (Some(o), Some(r)) = (self.occupancy.as_mut(), self.redis.as_mut())
            && r.is_up()
            && let Some(calls) = o.sweep(now)
        {
            for call in calls {
                send(r, call, now);
            }
        }
    }

    /// The history, encoded for the state file.
    pub fn snapshot(&self, now: Instant) -> Vec<u8> {
        self.history.snapshot(now)
    }

    // ---- the Redis link, for the loop ------------------------------------------------

    pub fn redis(&self) -> Option<&Redis> {
        self.redis.as_ref()
    }

    pub fn app(&self) -> &App {
        &self.app
    }

    pub fn app_mut(&mut self) -> &mut App {
        &mut self.app
    }

    pub fn redis_mut(&mut self) -> Option<&mut Redis> {
        self.redis.as_mut()
    }

    pub fn redis_up(&self) -> bool {
        self.redis.as_ref().is_some_and(Redis::is_up)
    }

    // ---- gauges ----------------------------------------------------------------------

    pub fn topic_count(&self) -> usize {
        self.hub.topic_count()
    }

    /// Subscriptions held and `--max-subscriptions` (0: no cap).
    pub fn subscriptions(&self) -> (usize, usize) {
        self.hub.subscriptions()
    }

    pub fn resumes(&self) -> Resumes {
        self.resumes
    }

    /// The counts a live upgrade hands over: resumes, history's evictions (size, ttl,
    /// memory) and the Redis link's (reconnects, errors).
    pub fn counts(&self) -> handover::PubSubCounts {
        let e = self.history.evictions();
        let redis = self.redis.as_ref().map(Redis::counters).unwrap_or_default();
        handover::PubSubCounts {
            resumes: self.resumes,
            evictions: (e.size, e.ttl, e.memory),
            redis: (redis.reconnects, redis.errors),
            redis_ha: (redis.failovers, redis.unreplicated, redis.redirects),
            redis_instance: self.redis.as_ref().map(|r| r.instance().to_string()),
        }
    }

    pub fn carry_counts(&mut self, c: handover::PubSubCounts) {
        self.resumes = c.resumes;
        let (size, ttl, memory) = c.evictions;
        self.history
            .carry_evictions(history::Evictions { size, ttl, memory });
        if let Some(r) = self.redis.as_mut() {
            let (failovers, unreplicated, redirects) = c.redis_ha;
            let counts = RedisCounters {
                reconnects: c.redis.0,
                errors: c.redis.1,
                failovers,
                unreplicated,
                redirects,
            };
            r.carry(c.redis_instance.as_deref(), counts);
        }
    }

    pub fn history_gauges(&self) -> HistoryGauges {
        let e = self.history.evictions();
        HistoryGauges {
            messages: self.history.messages(),
            bytes: self.history.bytes(),
            evicted_size: e.size,
            evicted_ttl: e.ttl,
            evicted_memory: e.memory,
        }
    }

    pub fn redis_gauges(&self) -> Option<RedisGauges> {
        self.redis.as_ref().map(|r| RedisGauges {
            up: r.is_up(),
            delivery_ok: r.delivery_ok(),
            channels: r.confirmed_count(),
            in_flight: r.in_flight(),
            reconnects: r.counters().reconnects,
            errors: r.counters().errors,
            failovers: r.counters().failovers,
            unreplicated: r.counters().unreplicated,
            redirects: r.counters().redirects,
        })
    }
}

/// Whether a resume from `from` got everything from what Redis holds: the same epoch, a
/// position Redis issued, and every id after it still in the stream.
fn redis_outcome(from: &LeftOff, epoch: &str, last_id: u64, ids: &[u64]) -> Outcome {
    if from.epoch != epoch || from.since > last_id {
        return Outcome::EpochChanged;
    }
    let missed = last_id - from.since;
    let contiguous = ids
        .iter()
        .zip(from.since + 1..)
        .all(|(id, want)| *id == want);
    if contiguous && ids.len() as u64 == missed {
        Outcome::Recovered
    } else {
        Outcome::Gap
    }
}

fn count(resumes: &mut Resumes, outcome: Outcome) {
    match outcome {
        Outcome::Recovered => resumes.recovered += 1,
        Outcome::Gap => resumes.gap += 1,
        Outcome::EpochChanged => resumes.epoch_changed += 1,
    }
}

fn position(at: &history::Position, recovered: Option<bool>) -> Position<'_> {
    Position {
        epoch: &at.epoch,
        last_id: at.last_id,
        recovered,
    }
}

/// An occupancy script to Redis (lost when Redis is down: the renewal on reconnecting
/// makes up for it).
fn send(redis: &mut Redis, call: Call, now: Instant) {
    let keys: Vec<&str> = call.keys.iter().map(String::as_str).collect();
    let args: Vec<&str> = call.args.iter().map(String::as_str).collect();
    redis.script(call.script, &keys, &args, call.tag, now);
}

/// The user the connection's token names, for `subscribed`.
fn grant_sub(conns: &Conns, id: ConnId) -> Option<String> {
    conns
        .get(id)
        .and_then(|c| c.session())
        .and_then(|s| s.grant.as_ref())
        .and_then(|g| g.sub.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::World;

    fn from(since: u64, epoch: &str) -> LeftOff {
        LeftOff {
            since,
            epoch: epoch.into(),
        }
    }

    #[test]
    fn a_redis_resume_is_recovered_only_with_every_id_after_since() {
        let e = "e1";
        let outcome =
            |since, epoch, last, ids: &[u64]| redis_outcome(&from(since, epoch), e, last, ids);
        assert_eq!(outcome(3, e, 6, &[4, 5, 6]), Outcome::Recovered);
        assert_eq!(outcome(6, e, 6, &[]), Outcome::Recovered);
        // The stream was trimmed past the client's position.
        assert_eq!(outcome(3, e, 6, &[5, 6]), Outcome::Gap);
        // Expired in the middle, or a hole: not everything.
        assert_eq!(outcome(3, e, 6, &[4, 6]), Outcome::Gap);
        assert_eq!(outcome(3, "e0", 6, &[1, 2]), Outcome::EpochChanged);
        // A position Redis never issued.
        assert_eq!(outcome(9, e, 6, &[]), Outcome::EpochChanged);
    }

    #[test]
    fn a_local_resume_replays_exactly_what_was_missed_then_goes_live() {
        let mut w = World::new(&[]);
        let a = w.open("/ws?topics=t");
        let first = w.messages(a).remove(0);
        let epoch = first["epoch"].as_str().unwrap().to_string();
        assert_eq!(first["id"], 0);
        for n in 1..=3 {
            w.publish(&format!(r#"{{"topic":"t","data":{n}}}"#));
        }
        let seen = w.messages(a);
        assert_eq!(seen.len(), 3);
        // A second client saw up to id 1 and comes back.
        let b = w.open(&format!("/ws?resume=t~1~{epoch}"));
        let got = w.messages(b);
        assert_eq!(got[0]["op"], "subscribed");
        assert_eq!(
            (got[0]["recovered"].clone(), got[0]["id"].clone()),
            (true.into(), 3.into())
        );
        let ids: Vec<u64> = got[1..].iter().map(|m| m["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, [2, 3]);
        w.publish(r#"{"topic":"t","data":4}"#);
        assert_eq!(w.messages(b)[0]["id"], 4);
        assert_eq!(w.pubsub.resumes().recovered, 1);
    }

    #[test]
    fn a_resume_from_another_epoch_is_not_recovered() {
        let mut w = World::new(&[]);
        let a = w.open("/ws");
        w.send_text(
            a,
            r#"{"op":"subscribe","topic":"t","since":5,"epoch":"nope"}"#,
        );
        let got = w.messages(a);
        assert_eq!(got[0]["recovered"], false);
        assert_ne!(got[0]["epoch"], "nope");
        assert_eq!(w.pubsub.resumes().epoch_changed, 1);
    }

    const SECRET: &str = "a-secret-of-32-bytes-for-tests!!";

    fn token(sub: &str) -> String {
        let claims = serde_json::json!({"sub": sub, "exp": crate::auth::unix_now() + 600});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn presence_world(max: &str) -> World {
        World::new(&[
            "--presence",
            "room:*",
            "--presence-max-members",
            max,
            "--token-secret",
            SECRET,
        ])
    }

    fn ask(w: &mut World, id: ConnId, topic: &str) -> serde_json::Value {
        w.send_text(id, &format!(r#"{{"op":"presence","topic":"{topic}"}}"#));
        w.messages(id).remove(0)
    }

    #[test]
    fn presence_counts_a_sub_once_with_its_connections() {
        let mut w = presence_world("1000");
        let a1 = w.open(&format!("/ws?topics=room:1&token={}", token("alice")));
        let a2 = w.open(&format!("/ws?topics=room:1&token={}", token("alice")));
        let anon = w.open("/ws?topics=room:1");
        for id in [a1, a2, anon] {
            let _ = w.messages(id);
        }
        let got = ask(&mut w, a1, "room:1");
        assert_eq!(got["count"], 2, "{got}");
        let members = got["members"].as_array().unwrap();
        assert_eq!(members[0]["sub"], "alice");
        assert_eq!(members[0]["conns"], 2);
        assert!(members[1]["sub"].as_str().unwrap().starts_with("anon:"));
        w.send_text(a2, r#"{"op":"unsubscribe","topic":"room:1"}"#);
        let got = ask(&mut w, a1, "room:1");
        assert_eq!(got["members"][0]["conns"], 1);
    }

    #[test]
    fn watchers_hear_of_first_joins_and_last_leaves_only() {
        let mut w = presence_world("1000");
        let watcher = w.open("/ws");
        w.send_text(
            watcher,
            r#"{"op":"subscribe","topic":"room:1","presence":true}"#,
        );
        let got = w.messages(watcher);
        assert_eq!(got[0]["op"], "subscribed");
        // Its own arrival, as everyone's.
        assert_eq!(got[1]["op"], "join");
        let a1 = w.open(&format!("/ws?topics=room:1&token={}", token("alice")));
        let got = w.messages(watcher);
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0],
            serde_json::json!({"op":"join","topic":"room:1","sub":"alice"})
        );
        let a2 = w.open(&format!("/ws?topics=room:1&token={}", token("alice")));
        assert!(w.messages(watcher).is_empty(), "a second tab is no news");
        let now = w.now;
        w.pubsub.leave_all(a1, now);
        w.sessions
            .deliver_pending(&mut w.conns, &mut w.pubsub, &mut w.counters, now);
        assert!(w.messages(watcher).is_empty());
        w.send_text(a2, r#"{"op":"unsubscribe","topic":"room:1"}"#);
        let got = w.messages(watcher);
        assert_eq!(
            got[0],
            serde_json::json!({"op":"leave","topic":"room:1","sub":"alice"})
        );
        // A subscriber that did not ask hears nothing.
        assert!(w.messages(a1).iter().all(|m| m["op"] != "join"));
    }

    #[test]
    fn past_the_cap_a_topic_reports_its_count_and_sends_no_events() {
        let mut w = presence_world("2");
        let watcher = w.open("/ws?topics=room:1&presence=room:1");
        let _ = w.messages(watcher);
        let b = w.open(&format!("/ws?topics=room:1&token={}", token("bob")));
        assert_eq!(w.messages(watcher)[0]["sub"], "bob");
        let _c = w.open(&format!("/ws?topics=room:1&token={}", token("carol")));
        assert!(w.messages(watcher).is_empty(), "member 3 of 2: silent");
        let got = ask(&mut w, watcher, "room:1");
        assert_eq!(got["count"], 3);
        assert_eq!(got["members_omitted"], true);
        assert!(got.get("members").is_none());
        w.send_text(b, r#"{"op":"unsubscribe","topic":"room:1"}"#);
        assert!(w.messages(watcher).is_empty(), "back to 2 from 3: silent");
        assert_eq!(
            ask(&mut w, watcher, "room:1")["members"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn only_subscribers_of_presence_topics_may_ask() {
        let mut w = presence_world("1000");
        let id = w.open("/ws?topics=news");
        let _ = w.messages(id);
        assert_eq!(ask(&mut w, id, "room:1")["error"], "not_subscribed");
        assert_eq!(ask(&mut w, id, "news")["error"], "presence_off");
        assert_eq!(w.pubsub.presence.topic_count(), 0, "news keeps nothing");
    }

    #[test]
    fn a_topic_keeps_its_history_after_its_last_subscriber_leaves() {
        let mut w = World::new(&[]);
        let a = w.open("/ws?topics=t");
        let epoch = w.messages(a)[0]["epoch"].as_str().unwrap().to_string();
        let now = w.now;
        w.sessions
            .close_all(&mut w.conns, &mut w.pubsub, &mut w.counters, now);
        assert_eq!(w.pubsub.topic_count(), 0);
        // Published while nobody here listens: kept for whoever comes back.
        w.publish(r#"{"topic":"t","data":"while away"}"#);
        let b = w.open(&format!("/ws?resume=t~0~{epoch}"));
        let got = w.messages(b);
        assert_eq!(got[0]["recovered"], true);
        assert_eq!(got[1]["data"], "while away");
    }
}
