//! Topics and their local subscribers, indexed both ways as Redis's pubsub.c does: each
//! topic holds a slab of subscribing connections, and the hub keeps, per connection, the
//! slot it occupies in each of its topics. Joining and leaving are O(1) in the size of the
//! topic; a topic with no subscribers is freed. This is also the one place a message's
//! envelope is written: a message is framed once, and the caller hands the same `Bytes`
//! to every subscriber (or, to those whose connection negotiated permessage-deflate, the
//! same compressed `Bytes`: each member knows which it takes, so a fan-out never looks at
//! the connection). Ids and epochs are not the hub's: history (or Redis) assigns them.
//! No sockets here.

use std::collections::HashMap;
use std::rc::Rc;

use std::ops::Range;

use bytes::Bytes;
use slab::Slab;
use smallvec::SmallVec;

use crate::id::ConnId;
use crate::ws::codec as ws;

/// Most topics one connection may hold; each costs a little memory on both sides.
pub const MAX_TOPICS_PER_CONNECTION: usize = 256;

struct Topic {
    name: Rc<str>,
    subscribers: Slab<Member>,
    /// Through Redis: the epoch its members were last placed in, shared by all of them
    /// (one allocation per topic, not per member, and a pointer compare per message).
    epoch: Option<Rc<str>>,
}

impl Topic {
    fn epoch(&mut self, epoch: &str) -> Rc<str> {
        match &self.epoch {
            Some(e) if **e == *epoch => e.clone(),
            _ => self.epoch.insert(Rc::from(epoch)).clone(),
        }
    }
}

/// One subscriber of a topic.
#[derive(Debug, Clone)]
struct Member {
    conn: ConnId,
    /// Receives the topic's messages. A subscription being resumed through Redis is not
    /// live until its history has been read: what arrives meanwhile is replayed to it
    /// from the pipeline, in order, with nothing twice.
    live: bool,
    /// Through Redis: the epoch and the last id this member has been given. Messages
    /// come back on another connection than the read that placed it, in either order,
    /// so each member checks each message against its own place: an id at or below it
    /// is already delivered, the next one is delivered, anything else (an id skipped,
    /// another epoch) means it missed messages. `None` without Redis, where ids need no
    /// such check, or before anything placed it. (Two fields, not an `Option` of a pair:
    /// 8 bytes less per subscriber.)
    epoch: Option<Rc<str>>,
    last: u64,
    /// Its connection takes the shared compressed frame (permessage-deflate): a copy of
    /// what the connection negotiated, in what was padding.
    deflate: bool,
}

/// Where a message stands for one member (`Hub::follow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// The next message for it: deliver it.
    Next,
    /// It has this one already (it came with its resume's replay): skip it.
    Seen,
    /// It missed messages: another epoch, or an id skipped.
    Missed,
}

type Memberships = SmallVec<[Membership; 1]>;

/// A connection's membership in one topic: the topic's key and its slot there.
#[derive(Debug, Clone, Copy)]
struct Membership {
    topic: usize,
    slot: usize,
}

/// A message ready for fan-out: its id, its frame, and the topic (none when nobody here
/// listens): its key, and its name to check the key by, since a fan-out may run after
/// the topic lost its last subscriber and its key went to another.
pub struct Published {
    pub id: u64,
    pub frame: Bytes,
    topic: Option<(usize, Rc<str>)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubscribeError {
    TooManyTopics,
    /// `--max-subscriptions` reached in the whole process.
    AtCapacity,
}

/// How a subscribe changed things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// The connection was already subscribed (idempotent).
    Already,
    /// It joined a topic that had subscribers.
    Existing,
    /// Its subscription created the topic here: with Redis, time to SUBSCRIBE.
    NewTopic,
}

/// How an unsubscribe changed things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    NotSubscribed,
    Unsubscribed,
    /// It was the last subscriber: the topic is freed (with Redis, UNSUBSCRIBE).
    TopicFreed,
}

#[derive(Default)]
pub struct Hub {
    by_name: HashMap<Rc<str>, usize>,
    topics: Slab<Topic>,
    /// Each connection's memberships, indexed by its slab key (empty when it has none).
    /// One membership is held inline (no allocation): most connections have one topic.
    memberships: Vec<Memberships>,
    /// Memberships in all topics, and the most there may be (0: no cap).
    subscriptions: usize,
    max_subscriptions: usize,
}

impl Hub {
    /// A hub that refuses subscriptions past `max` (`--max-subscriptions`; 0: no cap).
    pub fn with_cap(max: usize) -> Hub {
        Hub {
            max_subscriptions: max,
            ..Hub::default()
        }
    }

    /// Memberships held now (a gauge, beside the cap).
    pub fn subscriptions(&self) -> (usize, usize) {
        (self.subscriptions, self.max_subscriptions)
    }

    /// Add `conn` to `name`; `live`: it receives messages from now on (else see
    /// `set_live`); `deflate`: it takes compressed frames. Subscribing twice is not an
    /// error (`Joined::Already`).
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        name: &str,
        live: bool,
        deflate: bool,
    ) -> Result<Joined, SubscribeError> {
        if self.memberships.len() <= conn.0 {
            self.memberships.resize_with(conn.0 + 1, Memberships::new);
        }
        let memberships = &mut self.memberships[conn.0];
        if let Some(&topic) = self.by_name.get(name)
            && memberships.iter().any(|m| m.topic == topic)
        {
            return Ok(Joined::Already);
        }
        if memberships.len() >= MAX_TOPICS_PER_CONNECTION {
            return Err(SubscribeError::TooManyTopics);
        }
        if self.max_subscriptions > 0 && self.subscriptions >= self.max_subscriptions {
            return Err(SubscribeError::AtCapacity);
        }
        self.subscriptions += 1;
        let mut joined = Joined::Existing;
        let topic = match self.by_name.get(name) {
            Some(&topic) => topic,
            None => {
                joined = Joined::NewTopic;
                let name: Rc<str> = Rc::from(name);
                let key = self.topics.insert(Topic {
                    name: name.clone(),
                    subscribers: Slab::new(),
                    epoch: None,
                });
                self.by_name.insert(name, key);
                key
            }
        };
        let slot = self.topics[topic].subscribers.insert(Member {
            conn,
            live,
            epoch: None,
            last: 0,
            deflate,
        });
        self.memberships[conn.0].push(Membership { topic, slot });
        Ok(joined)
    }

    /// Remove the connection from `name`.
    pub fn unsubscribe(&mut self, conn: ConnId, name: &str) -> Left {
        let Some(&topic) = self.by_name.get(name) else {
            return Left::NotSubscribed;
        };
        let Some(memberships) = self.memberships.get_mut(conn.0) else {
            return Left::NotSubscribed;
        };
        let Some(i) = memberships.iter().position(|m| m.topic == topic) else {
            return Left::NotSubscribed;
        };
        let membership = memberships.swap_remove(i);
        match self.leave(membership) {
            Some(_) => Left::TopicFreed,
            None => Left::Unsubscribed,
        }
    }

    /// Remove the connection from every topic (it is closing). Returns the topics that
    /// lost their last subscriber (no allocation when there are none).
    pub fn unsubscribe_all(&mut self, conn: ConnId) -> Vec<String> {
        let mut freed = Vec::new();
        let Some(memberships) = self.memberships.get_mut(conn.0) else {
            return freed;
        };
        // Release the allocation too: the slab key will be reused by another connection.
        for membership in std::mem::take(memberships) {
            if let Some(name) = self.leave(membership) {
                freed.push(name.to_string());
            }
        }
        freed
    }

    /// The topic's name if this membership was its last one.
    fn leave(&mut self, m: Membership) -> Option<Rc<str>> {
        self.subscriptions -= 1;
        let topic = &mut self.topics[m.topic];
        topic.subscribers.remove(m.slot);
        if topic.subscribers.is_empty() {
            let topic = self.topics.remove(m.topic);
            self.by_name.remove(&topic.name);
            return Some(topic.name);
        }
        None
    }

    /// A framed message, ready for fan-out to `name`'s local subscribers (if any).
    pub fn published(&self, name: &str, id: u64, frame: Bytes) -> Published {
        let topic = self
            .by_name
            .get_key_value(name)
            .map(|(name, &key)| (key, name.clone()));
        Published { id, frame, topic }
    }

    /// The topic's key, if it is still the topic `published` was for.
    fn key_of(&self, published: &Published) -> Option<usize> {
        let (key, name) = published.topic.as_ref()?;
        self.topics
            .get(*key)
            .filter(|t| Rc::ptr_eq(&t.name, name))
            .map(|_| *key)
    }

    /// How many members a local message will reach: the live ones placed before it.
    pub fn reach(&self, published: &Published) -> usize {
        self.key_of(published).map_or(0, |key| {
            self.topics[key]
                .subscribers
                .iter()
                .filter(|(_, m)| m.live && m.last < published.id)
                .count()
        })
    }

    /// Without Redis: hand `published` to `each` live member placed before it (with
    /// whether it takes compressed frames), moving each one's place to it. A member that
    /// joined since has its place at or past the message (its `subscribed` reply or
    /// replay covered it) and is skipped.
    pub fn deliver(&mut self, published: &Published, mut each: impl FnMut(ConnId, bool)) {
        let Some(key) = self.key_of(published) else {
            return;
        };
        let id = published.id;
        for (_, m) in self.topics[key].subscribers.iter_mut() {
            if m.live && m.last < id {
                m.last = id;
                each(m.conn, m.deflate);
            }
        }
    }

    /// Without Redis: `conn` has been given `name`'s messages up to `last_id`.
    pub fn set_place(&mut self, conn: ConnId, name: &str, last_id: u64) {
        if let Some(member) = self.member_mut(conn, name) {
            member.last = last_id;
        }
    }

    /// Whether any local connection is subscribed to `name`.
    pub fn has_topic(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Whether `conn`'s subscription to `name` receives messages from now on.
    pub fn set_live(&mut self, conn: ConnId, name: &str, live: bool) {
        if let Some(member) = self.member_mut(conn, name) {
            member.live = live;
        }
    }

    /// Through Redis: `conn` has been given `name`'s messages up to `last_id` in `epoch`.
    pub fn place(&mut self, conn: ConnId, name: &str, epoch: &str, last_id: u64) {
        let Some((topic, slot)) = self.member_key(conn, name) else {
            return;
        };
        let topic = &mut self.topics[topic];
        let epoch = topic.epoch(epoch);
        if let Some(member) = topic.subscribers.get_mut(slot) {
            member.epoch = Some(epoch);
            member.last = last_id;
        }
    }

    fn member_mut(&mut self, conn: ConnId, name: &str) -> Option<&mut Member> {
        let (topic, slot) = self.member_key(conn, name)?;
        self.topics[topic].subscribers.get_mut(slot)
    }

    fn member_key(&self, conn: ConnId, name: &str) -> Option<(usize, usize)> {
        let &topic = self.by_name.get(name)?;
        let slot = self
            .memberships_of(conn)
            .iter()
            .find(|m| m.topic == topic)?
            .slot;
        Some((topic, slot))
    }

    /// Through Redis: tell `each` live member of the topic of `published` (id
    /// `published.id`, in `epoch`) what the message is for it (and whether it takes
    /// compressed frames), its place moved past it when it is `Next`. A member nothing
    /// placed yet takes its place from this message.
    pub fn follow(
        &mut self,
        published: &Published,
        epoch: &str,
        mut each: impl FnMut(ConnId, Follow, bool),
    ) {
        let Some(key) = self.key_of(published) else {
            return;
        };
        let id = published.id;
        let topic = &mut self.topics[key];
        let epoch = topic.epoch(epoch);
        for (_, m) in topic.subscribers.iter_mut().filter(|(_, m)| m.live) {
            let verdict = match &m.epoch {
                Some(e) if Rc::ptr_eq(e, &epoch) || **e == *epoch => match id {
                    id if id <= m.last => Follow::Seen,
                    id if id == m.last + 1 => Follow::Next,
                    _ => Follow::Missed,
                },
                Some(_) => Follow::Missed,
                None => Follow::Next,
            };
            if verdict == Follow::Next {
                if m.epoch.is_none() {
                    m.epoch = Some(epoch.clone());
                }
                m.last = id;
            }
            each(m.conn, verdict, m.deflate);
        }
    }

    /// Every topic with local subscribers (to subscribe again after a Redis reconnect).
    pub fn topic_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.topics.iter().map(|(_, t)| &*t.name)
    }

    fn memberships_of(&self, conn: ConnId) -> &[Membership] {
        self.memberships.get(conn.0).map_or(&[], SmallVec::as_slice)
    }

    /// `conn`'s memberships as (topic, live, epoch, last id), for a live upgrade.
    pub fn places(&self, conn: ConnId) -> Vec<(String, bool, Option<String>, u64)> {
        self.memberships_of(conn)
            .iter()
            .filter_map(|m| {
                let topic = &self.topics[m.topic];
                let member = topic.subscribers.get(m.slot)?;
                let epoch = member.epoch.as_ref().map(|e| e.to_string());
                Some((topic.name.to_string(), member.live, epoch, member.last))
            })
            .collect()
    }

    /// The names of the topics `conn` is in.
    pub fn names(&self, conn: ConnId) -> Vec<String> {
        self.memberships_of(conn)
            .iter()
            .map(|m| self.topics[m.topic].name.to_string())
            .collect()
    }

    /// Whether `conn` is subscribed to `name`.
    pub fn is_subscribed(&self, conn: ConnId, name: &str) -> bool {
        self.by_name
            .get(name)
            .is_some_and(|&t| self.memberships_of(conn).iter().any(|m| m.topic == t))
    }

    /// The live subscribers of the topic of `published`.
    #[cfg(test)]
    pub fn subscribers(&self, published: &Published) -> impl Iterator<Item = ConnId> + '_ {
        self.key_of(published).into_iter().flat_map(|key| {
            self.topics[key]
                .subscribers
                .iter()
                .filter(|(_, m)| m.live)
                .map(|(_, m)| m.conn)
        })
    }

    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    #[cfg(test)]
    pub fn subscriber_count(&self, name: &str) -> usize {
        self.by_name
            .get(name)
            .map_or(0, |&k| self.topics[k].subscribers.len())
    }
}

/// The one place a message's envelope is written; `data` is JSON, passed through as is.
/// Also returns where `data` lies in the frame, so history can hand it out without
/// writing it again.
pub fn message_frame(topic: &str, id: u64, data: &str) -> (Bytes, Range<usize>) {
    // Topic names need no JSON escaping (their alphabet has no quote or backslash).
    let payload = format!(r#"{{"op":"message","topic":"{topic}","id":{id},"data":{data}}}"#);
    let frame = ws::text_frame(payload.as_bytes());
    // The frame is its header, then the payload; `data` ends one byte (`}`) before it.
    let end = frame.len() - 1;
    (frame, end - data.len()..end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn only_live_members_receive_and_a_member_can_go_live() {
        let mut hub = Hub::default();
        hub.subscribe(ConnId(1), "t", true, false).unwrap();
        hub.subscribe(ConnId(2), "t", false, false).unwrap();
        let p = hub.published("t", 41, Bytes::from_static(b"x"));
        assert_eq!(hub.subscribers(&p).collect::<Vec<_>>(), [ConnId(1)]);
        hub.set_live(ConnId(2), "t", true);
        let mut got: Vec<ConnId> = hub.subscribers(&p).collect();
        got.sort();
        assert_eq!(got, [ConnId(1), ConnId(2)]);
        assert_eq!(hub.topic_names().collect::<Vec<_>>(), ["t"]);
        // Nobody here listens to another topic: nothing to fan out to.
        let elsewhere = hub.published("u", 1, Bytes::from_static(b"x"));
        assert_eq!(hub.subscribers(&elsewhere).count(), 0);
        assert!(hub.has_topic("t") && !hub.has_topic("u"));
    }

    #[test]
    fn each_member_says_whether_it_takes_compressed_frames() {
        let mut hub = Hub::default();
        hub.subscribe(ConnId(1), "t", true, true).unwrap();
        hub.subscribe(ConnId(2), "t", true, false).unwrap();
        let p = hub.published("t", 1, Bytes::from_static(b"x"));
        let mut got = Vec::new();
        hub.deliver(&p, |c, deflate| got.push((c, deflate)));
        got.sort();
        assert_eq!(got, [(ConnId(1), true), (ConnId(2), false)]);
        // The flag lives in what was padding: a member is as small as before.
        assert_eq!(std::mem::size_of::<Member>(), 40);
    }

    #[test]
    fn a_deferred_fan_out_skips_members_placed_past_it_and_topics_gone_since() {
        let mut hub = Hub::default();
        hub.subscribe(ConnId(1), "t", true, false).unwrap();
        hub.set_place(ConnId(1), "t", 6);
        let p7 = hub.published("t", 7, Bytes::from_static(b"x"));
        assert_eq!(hub.reach(&p7), 1);
        // Joined after 7 was published: its reply (or replay) said it is at 7.
        hub.subscribe(ConnId(2), "t", true, false).unwrap();
        hub.set_place(ConnId(2), "t", 7);
        let mut got = Vec::new();
        hub.deliver(&p7, |c, _| got.push(c));
        assert_eq!(got, [ConnId(1)]);
        // Delivered once only, however often asked.
        hub.deliver(&p7, |c, _| got.push(c));
        assert_eq!(got, [ConnId(1)]);
        // The topic emptied and its key went to another topic: nothing reaches it.
        let p8 = hub.published("t", 8, Bytes::from_static(b"x"));
        hub.unsubscribe_all(ConnId(1));
        hub.unsubscribe_all(ConnId(2));
        hub.subscribe(ConnId(3), "other", true, false).unwrap();
        assert_eq!(hub.reach(&p8), 0);
        hub.deliver(&p8, |c, _| got.push(c));
        assert_eq!(got, [ConnId(1)]);
    }

    #[test]
    fn each_member_follows_ids_from_its_own_place() {
        let mut hub = Hub::default();
        hub.subscribe(ConnId(1), "t", true, false).unwrap();
        hub.subscribe(ConnId(2), "t", true, false).unwrap();
        hub.place(ConnId(1), "t", "e1", 5);
        hub.place(ConnId(2), "t", "e1", 3);
        let follow = |hub: &mut Hub, id, epoch| {
            let p = hub.published("t", id, Bytes::from_static(b"x"));
            let mut v = Vec::new();
            hub.follow(&p, epoch, |c, f, _| v.push((c, f)));
            v.sort_by_key(|(c, _)| *c);
            v
        };
        let verdicts = |hub: &mut Hub, id, epoch| {
            follow(hub, id, epoch)
                .into_iter()
                .map(|(_, f)| f)
                .collect::<Vec<_>>()
        };
        // A late arrival the first already had; the next one for the second.
        assert_eq!(verdicts(&mut hub, 4, "e1"), [Follow::Seen, Follow::Next]);
        assert_eq!(verdicts(&mut hub, 6, "e1"), [Follow::Next, Follow::Missed]);
        // Another epoch: both missed what came before it.
        assert_eq!(
            verdicts(&mut hub, 1, "e2"),
            [Follow::Missed, Follow::Missed]
        );
        // A member nothing placed takes its place from the first message.
        hub.subscribe(ConnId(3), "t", true, false).unwrap();
        assert!(follow(&mut hub, 9, "e2").contains(&(ConnId(3), Follow::Next)));
        assert!(follow(&mut hub, 10, "e2").contains(&(ConnId(3), Follow::Next)));
    }

    #[test]
    fn the_frame_is_one_text_frame_with_the_envelope() {
        let (frame, data) = message_frame("t", 2, r#"{"x":[1,2]}"#);
        let body = br#"{"op":"message","topic":"t","id":2,"data":{"x":[1,2]}}"#;
        assert_eq!(frame[0], 0x81);
        assert_eq!(frame[1] as usize, body.len());
        assert_eq!(&frame[2..], body);
        assert_eq!(&frame[data], br#"{"x":[1,2]}"#);
        // A long message has a longer header; the range still finds the data.
        let long = format!(r#""{}""#, "y".repeat(300));
        let (frame, data) = message_frame("t", 3, &long);
        assert_eq!(frame[1], 126);
        assert_eq!(&frame[data], long.as_bytes());
    }

    #[test]
    fn subscribe_is_idempotent_and_capped() {
        let mut hub = Hub::default();
        assert_eq!(
            hub.subscribe(ConnId(0), "a", true, false),
            Ok(Joined::NewTopic)
        );
        assert_eq!(
            hub.subscribe(ConnId(0), "a", true, false),
            Ok(Joined::Already)
        );
        assert_eq!(
            hub.subscribe(ConnId(1), "a", true, false),
            Ok(Joined::Existing)
        );
        assert_eq!(hub.subscriber_count("a"), 2);
        for i in 1..MAX_TOPICS_PER_CONNECTION {
            hub.subscribe(ConnId(0), &format!("t{i}"), true, false)
                .unwrap();
        }
        assert_eq!(
            hub.subscribe(ConnId(0), "one-more", true, false),
            Err(SubscribeError::TooManyTopics)
        );
        assert_eq!(hub.unsubscribe(ConnId(0), "never"), Left::NotSubscribed);
    }

    #[test]
    fn subscriptions_past_the_process_cap_are_refused_until_some_leave() {
        let mut hub = Hub::with_cap(3);
        for (conn, topic) in [(0, "a"), (0, "b"), (1, "a")] {
            hub.subscribe(ConnId(conn), topic, true, false).unwrap();
        }
        assert_eq!(hub.subscriptions(), (3, 3));
        assert_eq!(
            hub.subscribe(ConnId(2), "a", true, false),
            Err(SubscribeError::AtCapacity)
        );
        // Subscribing again to what it holds is not a new subscription.
        assert_eq!(
            hub.subscribe(ConnId(0), "a", true, false),
            Ok(Joined::Already)
        );
        hub.unsubscribe(ConnId(0), "b");
        assert_eq!(
            hub.subscribe(ConnId(2), "a", true, false),
            Ok(Joined::Existing)
        );
        let _ = hub.unsubscribe_all(ConnId(0));
        assert_eq!(hub.subscriptions(), (2, 3));
    }

    /// Random joins and leaves against a naive map of sets.
    #[test]
    fn matches_a_naive_reference_under_churn() {
        let mut hub = Hub::default();
        let mut reference: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let conn = (seed % 20) as usize;
            let topic = format!("t{}", (seed >> 8) % 7);
            if (seed >> 16) % 3 == 0 {
                let left = hub.unsubscribe(ConnId(conn), &topic);
                let ref_removed = reference.get_mut(&topic).is_some_and(|s| s.remove(&conn));
                assert_eq!(left != Left::NotSubscribed, ref_removed);
                let ref_freed = ref_removed && reference[&topic].is_empty();
                assert_eq!(left == Left::TopicFreed, ref_freed);
            } else if (seed >> 16) % 97 == 1 {
                let mut freed = hub.unsubscribe_all(ConnId(conn));
                let mut ref_freed = Vec::new();
                for (name, s) in reference.iter_mut() {
                    if s.remove(&conn) && s.is_empty() {
                        ref_freed.push(name.clone());
                    }
                }
                freed.sort();
                assert_eq!(freed, ref_freed);
            } else {
                let joined = hub.subscribe(ConnId(conn), &topic, true, false).unwrap();
                let was_new_topic = !reference.contains_key(&topic);
                let added = reference.entry(topic.clone()).or_default().insert(conn);
                assert_eq!(joined != Joined::Already, added);
                assert_eq!(joined == Joined::NewTopic, was_new_topic);
            }
            reference.retain(|_, s| !s.is_empty());
            assert_eq!(hub.topic_count(), reference.len());
            let memberships: usize = reference.values().map(BTreeSet::len).sum();
            assert_eq!(hub.subscriptions().0, memberships);
        }
        for (topic, subs) in &reference {
            let p = hub.published(topic, 0, Bytes::new());
            let got: BTreeSet<usize> = hub.subscribers(&p).map(|c| c.0).collect();
            assert_eq!(&got, subs, "{topic}");
        }
    }
}
