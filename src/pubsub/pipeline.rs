//! The publish pipeline: what happens between "publish this" and frames queued on
//! subscribers. It owns the hub (topics, subscribers, local ids), the Redis link when
//! there is one, and the `subscribed` replies held until Redis confirms a channel.
//!
//! Locally, a publish takes the next id and its frame is queued on every subscriber.
//! Through Redis, the publish goes to Redis and the frame is queued when the message
//! comes back on the subscription link, with the id Redis assigned for every process.
//!
//! It never touches a socket: it queues bytes through the connection table, and hands
//! back the subscribers a message made slow consumers, for the session handler to close.
//! The Redis link's I/O methods (`on_ready`, `tick`, `flush`) are called by the loop only.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::conn::{ConnId, Conns, Ended};
use crate::metrics::{Counters, RedisGauges};
use crate::pubsub::hub::{Hub, Joined, Left, Published, SubscribeError};
use crate::pubsub::redis::{Redis, RedisConfig};
use crate::ws::protocol;

/// What a fan-out did: how many subscribers it reached, and which of them it pushed past
/// `--send-queue-limit` (to be closed as slow consumers; usually none, and no allocation).
#[derive(Debug, Default)]
pub struct Fanout {
    pub reached: usize,
    pub slow: Vec<ConnId>,
}

pub struct PubSub {
    hub: Hub,
    redis: Option<Redis>,
    /// `subscribed` replies held until Redis confirms the topic's channel, so a client
    /// never misses a message published right after it was told it is subscribed.
    pending_acks: HashMap<String, Vec<(ConnId, u64)>>,
    /// `--send-queue-limit`: past it, a subscriber is a slow consumer.
    send_queue_limit: usize,
}

impl PubSub {
    pub fn new(redis: Option<RedisConfig>, send_queue_limit: usize, now: Instant) -> PubSub {
        PubSub {
            hub: Hub::default(),
            redis: redis.map(|c| Redis::new(c, now)),
            pending_acks: HashMap::new(),
            send_queue_limit,
        }
    }

    // ---- publishing ------------------------------------------------------------------

    pub fn through_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// Assign the next local id and queue the frame to every local subscriber.
    pub fn publish_local(
        &mut self,
        conns: &mut Conns,
        counters: &mut Counters,
        topic: &str,
        data: &RawValue,
    ) -> (u64, Fanout) {
        let published = self.hub.publish(topic, data);
        counters.published += 1;
        let fanout = self.fan_out(conns, counters, &published);
        (published.id, fanout)
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

    /// A message came back from Redis with the id Redis gave it: queue it locally.
    pub fn deliver(
        &mut self,
        conns: &mut Conns,
        counters: &mut Counters,
        topic: &str,
        id: u64,
        data: &str,
    ) -> Fanout {
        counters.redis_messages += 1;
        match self.hub.deliver(topic, id, data) {
            Some(published) => self.fan_out(conns, counters, &published),
            None => Fanout::default(),
        }
    }

    /// Queue one framed message to every local subscriber of its topic.
    fn fan_out(&self, conns: &mut Conns, counters: &mut Counters, published: &Published) -> Fanout {
        let mut fanout = Fanout::default();
        for sub in self.hub.subscribers(published) {
            // The hub holds open sessions only; a miss would be our bug, not a reason to die.
            let Some(queued) = conns.queue_shared(sub, &published.frame) else {
                debug_assert!(false, "hub names a connection that is gone");
                continue;
            };
            fanout.reached += 1;
            if queued > self.send_queue_limit {
                fanout.slow.push(sub);
            }
        }
        counters.delivered += fanout.reached as u64;
        fanout
    }

    // ---- subscribing -----------------------------------------------------------------

    /// Subscribe `id` to `topic` and confirm it (now, or once Redis has the channel).
    pub fn subscribe(
        &mut self,
        conns: &mut Conns,
        id: ConnId,
        topic: &str,
    ) -> Result<(), SubscribeError> {
        let joined = self.hub.subscribe(id, topic)?;
        self.confirm(conns, id, topic, joined);
        Ok(())
    }

    /// After a subscribe: confirm it to the client, or, for a topic Redis has not yet
    /// confirmed, hold the confirmation until it does.
    fn confirm(&mut self, conns: &mut Conns, id: ConnId, topic: &str, joined: Joined) {
        let hold = match self.redis.as_mut() {
            Some(r) => {
                if joined == Joined::NewTopic {
                    r.subscribe(topic);
                }
                // While Redis is down the subscription is recorded and will be made on
                // reconnect; holding the reply until then would only stall the client.
                r.is_up() && !r.is_confirmed(topic)
            }
            None => false,
        };
        if hold {
            let serial = conns[id].serial;
            self.pending_acks
                .entry(topic.to_string())
                .or_default()
                .push((id, serial));
        } else {
            conns.queue(id, subscribed_reply(conns, id, topic));
        }
    }

    /// Answered either way (unsubscribing from a topic one is not in is harmless).
    pub fn unsubscribe(&mut self, id: ConnId, topic: &str) {
        if self.hub.unsubscribe(id, topic) == Left::TopicFreed {
            self.forget_topics(vec![topic.to_string()]);
        }
    }

    /// A connection ended: if it was an open WebSocket, it leaves every topic.
    pub fn leave(&mut self, ended: Ended) {
        if let Ended(Some(id)) = ended {
            self.leave_all(id);
        }
    }

    /// `id` leaves every topic (its WebSocket is closing).
    pub fn leave_all(&mut self, id: ConnId) {
        let freed = self.hub.unsubscribe_all(id);
        self.forget_topics(freed);
    }

    /// The topics `id` is subscribed to.
    pub fn topics_of(&self, id: ConnId) -> Vec<String> {
        self.hub.names(id)
    }

    /// Topics that lost their last local subscriber: with Redis, stop receiving them.
    fn forget_topics(&mut self, freed: Vec<String>) {
        for topic in freed {
            if let Some(r) = self.redis.as_mut() {
                r.unsubscribe(&topic);
            }
            self.pending_acks.remove(&topic);
        }
    }

    /// Send the held `subscribed` replies for `topic` to connections still subscribed.
    pub fn release_acks(&mut self, conns: &mut Conns, topic: &str) {
        let Some(waiting) = self.pending_acks.remove(topic) else {
            return;
        };
        for (id, serial) in waiting {
            let still = conns
                .same(id, serial)
                .is_some_and(|c| c.is_open() && self.hub.is_subscribed(id, topic));
            if still {
                conns.queue(id, subscribed_reply(conns, id, topic));
            }
        }
    }

    /// Redis went down: nothing will confirm the held replies; send them all.
    pub fn release_all_acks(&mut self, conns: &mut Conns) {
        let topics: Vec<String> = self.pending_acks.keys().cloned().collect();
        for topic in topics {
            self.release_acks(conns, &topic);
        }
    }

    /// The subscription link is (again) ready: subscribe to every local topic.
    pub fn resubscribe(&mut self) {
        if let Some(r) = self.redis.as_mut() {
            r.resubscribe(self.hub.topic_names());
        }
    }

    // ---- the Redis link, for the loop ------------------------------------------------

    pub fn redis(&self) -> Option<&Redis> {
        self.redis.as_ref()
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

    pub fn redis_gauges(&self) -> Option<RedisGauges> {
        self.redis.as_ref().map(|r| RedisGauges {
            up: r.is_up(),
            channels: r.confirmed_count(),
            in_flight: r.in_flight(),
            reconnects: r.counters.reconnects,
            errors: r.counters.errors,
        })
    }
}

/// `subscribed`, with the user the connection's token names.
fn subscribed_reply(conns: &Conns, id: ConnId, topic: &str) -> Bytes {
    let sub = conns
        .get(id)
        .and_then(|c| c.session())
        .and_then(|s| s.grant.as_ref())
        .and_then(|g| g.sub.as_deref());
    protocol::subscribed(topic, sub)
}
