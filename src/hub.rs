//! Topics and their subscribers, indexed both ways as Redis's pubsub.c does: each topic
//! holds a slab of subscribing connections, and each connection holds, per topic, the
//! slot it occupies there. Joining and leaving are O(1) in the size of the topic; a topic
//! with no subscribers is freed. Publishing encodes the message and frames it once; the
//! caller hands the same `Bytes` to every subscriber. No sockets here.

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;
use serde_json::value::RawValue;
use slab::Slab;

use crate::conn::ConnId;
use crate::ws;

/// Most topics one connection may hold; each costs a little memory on both sides.
pub const MAX_TOPICS_PER_CONNECTION: usize = 256;

struct Topic {
    name: Rc<str>,
    subscribers: Slab<ConnId>,
    /// Id of the last message published here.
    last_id: u64,
}

/// A connection's membership in one topic: the topic's key and its slot there.
#[derive(Debug, Clone, Copy)]
pub struct Membership {
    topic: usize,
    slot: usize,
}

/// A message ready for fan-out: its id, its frame, and the topic's key.
pub struct Published {
    pub id: u64,
    pub frame: Bytes,
    topic: Option<usize>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubscribeError {
    TooManyTopics,
}

#[derive(Default)]
pub struct Hub {
    by_name: HashMap<Rc<str>, usize>,
    topics: Slab<Topic>,
    /// Messages published in this process, on any topic. A topic created later starts
    /// its ids here, so a topic's ids never go backwards even after it was freed.
    published: u64,
}

impl Hub {
    /// Add `conn` to `name`. Returns false if it was already there (not an error:
    /// subscribing twice is idempotent).
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        memberships: &mut Vec<Membership>,
        name: &str,
    ) -> Result<bool, SubscribeError> {
        if let Some(&topic) = self.by_name.get(name)
            && memberships.iter().any(|m| m.topic == topic)
        {
            return Ok(false);
        }
        if memberships.len() >= MAX_TOPICS_PER_CONNECTION {
            return Err(SubscribeError::TooManyTopics);
        }
        let topic = match self.by_name.get(name) {
            Some(&topic) => topic,
            None => {
                let name: Rc<str> = Rc::from(name);
                let key = self.topics.insert(Topic {
                    name: name.clone(),
                    subscribers: Slab::new(),
                    last_id: self.published,
                });
                self.by_name.insert(name, key);
                key
            }
        };
        let slot = self.topics[topic].subscribers.insert(conn);
        memberships.push(Membership { topic, slot });
        Ok(true)
    }

    /// Remove the connection from `name`. Returns false if it was not subscribed.
    pub fn unsubscribe(&mut self, memberships: &mut Vec<Membership>, name: &str) -> bool {
        let Some(&topic) = self.by_name.get(name) else {
            return false;
        };
        let Some(i) = memberships.iter().position(|m| m.topic == topic) else {
            return false;
        };
        let membership = memberships.swap_remove(i);
        self.leave(membership);
        true
    }

    /// Remove the connection from every topic (it is closing).
    pub fn unsubscribe_all(&mut self, memberships: &mut Vec<Membership>) {
        for membership in memberships.drain(..) {
            self.leave(membership);
        }
        *memberships = Vec::new();
    }

    fn leave(&mut self, m: Membership) {
        let topic = &mut self.topics[m.topic];
        topic.subscribers.remove(m.slot);
        if topic.subscribers.is_empty() {
            let topic = self.topics.remove(m.topic);
            self.by_name.remove(&topic.name);
        }
    }

    /// Assign the next id on `name` and frame the message once. `data` is passed through
    /// as the client sent it (already validated JSON).
    pub fn publish(&mut self, name: &str, data: &RawValue) -> Published {
        self.published += 1;
        let topic = self.by_name.get(name).copied();
        let id = match topic {
            Some(key) => {
                let t = &mut self.topics[key];
                t.last_id += 1;
                t.last_id
            }
            // Nobody listens: the message still gets an id, from the process-wide count.
            None => self.published,
        };
        // Topic names need no JSON escaping (their alphabet has no quote or backslash).
        let payload = format!(
            r#"{{"op":"message","topic":"{name}","id":{id},"data":{}}}"#,
            data.get()
        );
        Published {
            id,
            frame: ws::text_frame(payload.as_bytes()),
            topic,
        }
    }

    /// The connections subscribed to the topic of `published`.
    pub fn subscribers(&self, published: &Published) -> impl Iterator<Item = ConnId> + '_ {
        published
            .topic
            .into_iter()
            .flat_map(|key| self.topics[key].subscribers.iter().map(|(_, &conn)| conn))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn ids_count_up_per_topic_and_never_go_back() {
        let mut hub = Hub::default();
        let mut a = Vec::new();
        hub.subscribe(ConnId(1), &mut a, "news").unwrap();
        assert_eq!(hub.publish("news", &raw("1")).id, 1);
        assert_eq!(hub.publish("news", &raw("2")).id, 2);
        assert_eq!(hub.publish("other", &raw("3")).id, 3);
        assert_eq!(hub.publish("news", &raw("4")).id, 3);
        hub.unsubscribe_all(&mut a);
        assert_eq!(hub.topic_count(), 0);
        hub.subscribe(ConnId(1), &mut a, "news").unwrap();
        assert!(hub.publish("news", &raw("5")).id > 3);
    }

    #[test]
    fn the_frame_is_one_text_frame_with_the_envelope() {
        let mut hub = Hub::default();
        let p = hub.publish("t", &raw(r#"{"x":[1,2]}"#));
        let body = br#"{"op":"message","topic":"t","id":1,"data":{"x":[1,2]}}"#;
        assert_eq!(p.frame[0], 0x81);
        assert_eq!(p.frame[1] as usize, body.len());
        assert_eq!(&p.frame[2..], body);
    }

    #[test]
    fn subscribe_is_idempotent_and_capped() {
        let mut hub = Hub::default();
        let mut m = Vec::new();
        assert_eq!(hub.subscribe(ConnId(0), &mut m, "a"), Ok(true));
        assert_eq!(hub.subscribe(ConnId(0), &mut m, "a"), Ok(false));
        assert_eq!(hub.subscriber_count("a"), 1);
        for i in 1..MAX_TOPICS_PER_CONNECTION {
            hub.subscribe(ConnId(0), &mut m, &format!("t{i}")).unwrap();
        }
        assert_eq!(
            hub.subscribe(ConnId(0), &mut m, "one-more"),
            Err(SubscribeError::TooManyTopics)
        );
        assert!(!hub.unsubscribe(&mut m, "never"));
    }

    /// Random joins and leaves against a naive map of sets.
    #[test]
    fn matches_a_naive_reference_under_churn() {
        let mut hub = Hub::default();
        let mut memberships: Vec<Vec<Membership>> = (0..20).map(|_| Vec::new()).collect();
        let mut reference: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let conn = (seed % 20) as usize;
            let topic = format!("t{}", (seed >> 8) % 7);
            if (seed >> 16) % 3 == 0 {
                let removed = hub.unsubscribe(&mut memberships[conn], &topic);
                let ref_removed = reference.get_mut(&topic).is_some_and(|s| s.remove(&conn));
                assert_eq!(removed, ref_removed);
            } else if (seed >> 16) % 97 == 1 {
                hub.unsubscribe_all(&mut memberships[conn]);
                reference.values_mut().for_each(|s| {
                    s.remove(&conn);
                });
            } else {
                let added = hub
                    .subscribe(ConnId(conn), &mut memberships[conn], &topic)
                    .unwrap();
                assert_eq!(
                    added,
                    reference.entry(topic.clone()).or_default().insert(conn)
                );
            }
            reference.retain(|_, s| !s.is_empty());
            assert_eq!(hub.topic_count(), reference.len());
        }
        for (topic, subs) in &reference {
            let p = hub.publish(topic, &raw("0"));
            let got: BTreeSet<usize> = hub.subscribers(&p).map(|c| c.0).collect();
            assert_eq!(&got, subs, "{topic}");
        }
    }
}
