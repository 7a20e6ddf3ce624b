//! Presence: who is subscribed to the topics that keep it (`--presence PATTERNS`), as
//! pure bookkeeping. A member is a token's `sub`, or `anon:<serial>` for a connection
//! without one; several connections of one `sub` are one member with a connection count.
//!
//! State lives here only, keyed by topic and connection, and only for topics that match
//! the patterns: a topic that does not keep presence costs nothing, and no connection or
//! session record grows a field for it. The pipeline calls `join`/`leave` beside the
//! hub's subscribe and unsubscribe, and is told when a member appears or disappears
//! *here* (its first or last local connection); with Redis, whether that is also the
//! first or last connection anywhere is Redis's to decide (`redis.rs`).
//!
//! Past `--presence-max-members`, a topic reports its count only, and no events are sent
//! for it: an event goes out only when the count is within the cap both before and
//! after the change (the join of member N+1 and the leave back to N are silent), so
//! a watcher that needs the list again asks for it.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use smallvec::SmallVec;

use crate::id::ConnId;
use crate::topic::Patterns;

/// `--presence`, `--presence-max-members`, `--presence-ttl`.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub patterns: Patterns,
    pub max_members: usize,
    /// With Redis: how long a process's entries outlive its last heartbeat.
    pub ttl: Duration,
}

/// One local connection's place in a presence topic.
#[derive(Debug, Clone)]
struct Entry {
    member: Rc<str>,
    /// Wants join/leave events (`"presence":true` on subscribe).
    watch: bool,
}

/// A presence topic's local state.
#[derive(Debug, Default)]
struct Room {
    conns: HashMap<ConnId, Entry>,
    /// Local members and their local connection counts.
    members: HashMap<Rc<str>, u32>,
}

/// A connection joined or left a presence topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub topic: Rc<str>,
    pub member: Rc<str>,
    /// The member appeared or disappeared here: its first or last local connection.
    pub edge: bool,
    /// The topic's local member count after the change.
    pub count: usize,
}

/// What a `presence` query answers: the count and, within the cap, the members with
/// their connection counts (sorted by `sub`, so answers compare).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub count: usize,
    /// `None` past the cap.
    pub members: Option<Vec<(String, u64)>>,
}

#[derive(Debug, Default)]
pub struct Presence {
    settings: Settings,
    rooms: HashMap<Rc<str>, Room>,
    /// The presence topics each connection is in (no entry when none).
    by_conn: HashMap<ConnId, SmallVec<[Rc<str>; 1]>>,
}

impl Presence {
    pub fn new(settings: Settings) -> Presence {
        Presence {
            settings,
            ..Presence::default()
        }
    }

    /// Whether `topic` keeps presence.
    pub fn applies(&self, topic: &str) -> bool {
        self.settings.patterns.matches(topic)
    }

    /// With Redis: how often this process says it is alive, a third of the TTL, so
    /// that two heartbeats may be lost before its members drop out.
    pub fn beat_interval(&self) -> Duration {
        self.settings.ttl / 3
    }

    /// The topics with local members, for the Redis heartbeat and sync.
    pub fn topics(&self) -> impl Iterator<Item = &str> + '_ {
        self.rooms.keys().map(|t| &**t)
    }

    /// Whether a count is within `--presence-max-members`.
    pub fn listed(&self, count: usize) -> bool {
        count <= self.settings.max_members
    }

    /// `conn` (as `member`) subscribed to `topic`; `edge` in the change says whether the
    /// member is new here. Joining again changes nothing but `watch` (a repeated
    /// subscribe), and returns `None`, as a topic without presence does.
    pub fn join(&mut self, conn: ConnId, topic: &str, member: &str, watch: bool) -> Option<Change> {
        if !self.applies(topic) {
            return None;
        }
        let (name, room) = match self.rooms.get_key_value(topic) {
            Some((name, _)) => {
                let name = name.clone();
                let room = self.rooms.get_mut(&name).expect("just found");
                (name, room)
            }
            None => {
                let name: Rc<str> = Rc::from(topic);
                (name.clone(), self.rooms.entry(name).or_default())
            }
        };
        if let Some(entry) = room.conns.get_mut(&conn) {
            entry.watch = watch;
            return None;
        }
        let member: Rc<str> = match room.members.get_key_value(member) {
            Some((m, _)) => m.clone(),
            None => Rc::from(member),
        };
        room.conns.insert(
            conn,
            Entry {
                member: member.clone(),
                watch,
            },
        );
        self.by_conn.entry(conn).or_default().push(name.clone());
        let conns = room.members.entry(member.clone()).or_insert(0);
        *conns += 1;
        let edge = *conns == 1;
        Some(Change {
            topic: name,
            member,
            edge,
            count: room.members.len(),
        })
    }

    /// `conn`'s member id on `topic` and whether it watches, for a live upgrade.
    pub fn entry(&self, conn: ConnId, topic: &str) -> Option<(String, bool)> {
        let entry = self.rooms.get(topic)?.conns.get(&conn)?;
        Some((entry.member.to_string(), entry.watch))
    }

    /// `conn` left `topic`; `edge`: that was the member's last connection here. `None`
    /// when it was not there.
    pub fn leave(&mut self, conn: ConnId, topic: &str) -> Option<Change> {
        let topics = self.by_conn.get_mut(&conn)?;
        let i = topics.iter().position(|t| &**t == topic)?;
        let name = topics.swap_remove(i);
        if topics.is_empty() {
            self.by_conn.remove(&conn);
        }
        self.remove(conn, name)
    }

    /// `conn` left every presence topic (it is closing).
    pub fn leave_all(&mut self, conn: ConnId) -> Vec<Change> {
        let Some(topics) = self.by_conn.remove(&conn) else {
            return Vec::new();
        };
        topics
            .into_iter()
            .filter_map(|name| self.remove(conn, name))
            .collect()
    }

    fn remove(&mut self, conn: ConnId, name: Rc<str>) -> Option<Change> {
        let room = self.rooms.get_mut(&name)?;
        let entry = room.conns.remove(&conn)?;
        let conns = room.members.get_mut(&entry.member)?;
        *conns -= 1;
        let edge = *conns == 0;
        if edge {
            room.members.remove(&entry.member);
        }
        let count = room.members.len();
        if room.conns.is_empty() {
            self.rooms.remove(&name);
        }
        Some(Change {
            topic: name,
            member: entry.member,
            edge,
            count,
        })
    }

    #[cfg(test)]
    /// Whether `conn` is in `topic`'s presence (it subscribed, here).
    pub fn is_member(&self, conn: ConnId, topic: &str) -> bool {
        self.rooms
            .get(topic)
            .is_some_and(|r| r.conns.contains_key(&conn))
    }

    /// The local connections of `topic` that want its join/leave events.
    pub fn watchers(&self, topic: &str) -> impl Iterator<Item = ConnId> + '_ {
        self.rooms
            .get(topic)
            .into_iter()
            .flat_map(|r| r.conns.iter().filter(|(_, e)| e.watch).map(|(c, _)| *c))
    }

    /// The local members of `topic` and their connection counts.
    pub fn local_members(&self, topic: &str) -> impl Iterator<Item = (&str, u32)> + '_ {
        self.rooms
            .get(topic)
            .into_iter()
            .flat_map(|r| r.members.iter().map(|(m, n)| (&**m, *n)))
    }

    /// What a query answers without Redis.
    pub fn snapshot(&self, topic: &str) -> Snapshot {
        self.cap(
            self.local_members(topic)
                .map(|(m, n)| (m.to_string(), u64::from(n))),
        )
    }

    /// Members (each once) into a snapshot, listed only within the cap.
    pub fn cap(&self, members: impl Iterator<Item = (String, u64)>) -> Snapshot {
        let mut members: Vec<(String, u64)> = members.collect();
        let count = members.len();
        if !self.listed(count) {
            return Snapshot {
                count,
                members: None,
            };
        }
        members.sort_unstable();
        Snapshot {
            count,
            members: Some(members),
        }
    }

    #[cfg(test)]
    /// Presence topics with local members.
    pub fn topic_count(&self) -> usize {
        self.rooms.len()
    }
}

/// The member a connection counts as: its token's `sub`, or an id of its own,
/// `anon:<serial>`, or with Redis `anon:<process>.<serial>` (`scope`), since serials
/// repeat across processes.
pub fn member_id(sub: Option<&str>, scope: Option<&str>, serial: u64) -> String {
    match (sub, scope) {
        (Some(sub), _) => sub.to_string(),
        (None, None) => format!("anon:{serial}"),
        (None, Some(scope)) => format!("anon:{scope}.{serial}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(max: usize) -> Presence {
        Presence::new(Settings {
            patterns: Patterns::parse("room:*").unwrap(),
            max_members: max,
            ttl: Duration::from_secs(15),
        })
    }

    fn c(n: usize) -> ConnId {
        ConnId(n)
    }

    #[test]
    fn only_matching_topics_keep_presence() {
        let mut p = presence(10);
        assert_eq!(p.join(c(1), "news", "42", true), None);
        assert_eq!(p.leave(c(1), "news"), None);
        assert_eq!(p.topic_count(), 0);
        assert!(p.by_conn.is_empty());
        assert!(p.join(c(1), "room:1", "42", true).is_some());
        assert_eq!(p.topic_count(), 1);
    }

    #[test]
    fn a_member_appears_with_its_first_connection_and_goes_with_its_last() {
        let mut p = presence(10);
        let edge = |c: Option<Change>| c.map(|c| c.edge);
        let joined = p.join(c(1), "room:1", "42", false).unwrap();
        assert_eq!(
            (&*joined.member, joined.edge, joined.count),
            ("42", true, 1)
        );
        // A second tab of the same sub: no new member, two connections.
        assert_eq!(edge(p.join(c(2), "room:1", "42", false)), Some(false));
        assert_eq!(edge(p.join(c(3), "room:1", "7", false)), Some(true));
        assert_eq!(
            p.snapshot("room:1").members.unwrap(),
            [("42".to_string(), 2), ("7".to_string(), 1)]
        );
        // Joining again is idempotent.
        assert_eq!(p.join(c(2), "room:1", "42", true), None);
        assert_eq!(p.snapshot("room:1").count, 2);
        assert_eq!(edge(p.leave(c(1), "room:1")), Some(false));
        let left = p.leave_all(c(2));
        assert_eq!(left.len(), 1);
        assert_eq!(
            (&*left[0].member, left[0].edge, left[0].count),
            ("42", true, 1)
        );
        assert_eq!(p.leave(c(2), "room:1"), None, "already gone");
        assert_eq!(edge(p.leave(c(3), "room:1")), Some(true));
        assert_eq!(p.topic_count(), 0);
        assert!(p.by_conn.is_empty());
    }

    #[test]
    fn watchers_are_the_connections_that_asked() {
        let mut p = presence(10);
        p.join(c(1), "room:1", "a", true);
        p.join(c(2), "room:1", "b", false);
        p.join(c(3), "room:2", "a", true);
        let mut w: Vec<_> = p.watchers("room:1").collect();
        w.sort_by_key(|c| c.0);
        assert_eq!(w, [c(1)]);
        assert!(p.is_member(c(2), "room:1"));
        assert!(!p.is_member(c(2), "room:2"));
    }

    #[test]
    fn past_the_cap_only_the_count() {
        let mut p = presence(2);
        for n in 0..3 {
            p.join(c(n), "room:1", &format!("u{n}"), false);
        }
        let s = p.snapshot("room:1");
        assert_eq!((s.count, s.members), (3, None));
        p.leave(c(0), "room:1");
        assert_eq!(p.snapshot("room:1").members.unwrap().len(), 2);
        assert!(p.listed(2) && !p.listed(3));
    }

    /// Against a naive reference: a list of (conn, topic, member) triples.
    #[test]
    fn matches_a_naive_reference_under_random_churn() {
        let mut p = presence(1000);
        let mut reference: Vec<(usize, String, String)> = Vec::new();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..5000 {
            let conn = (next() % 20) as usize;
            let topic = format!("room:{}", next() % 3);
            let member = format!("u{}", conn % 7);
            let had = |r: &[(usize, String, String)], m: &str| {
                r.iter().any(|(_, t, mm)| *t == topic && mm == m)
            };
            match next() % 3 {
                0 | 1 => {
                    let before = had(&reference, &member);
                    let was_in = reference
                        .iter()
                        .any(|(cc, t, _)| *cc == conn && *t == topic);
                    let change = p.join(c(conn), &topic, &member, false);
                    if !was_in {
                        reference.push((conn, topic.clone(), member.clone()));
                    }
                    assert_eq!(
                        change.as_ref().map(|c| c.edge),
                        (!was_in).then_some(!before)
                    );
                }
                _ => {
                    let was_in = reference
                        .iter()
                        .any(|(cc, t, _)| *cc == conn && *t == topic);
                    let change = p.leave(c(conn), &topic);
                    reference.retain(|(cc, t, _)| !(*cc == conn && *t == topic));
                    let gone = !had(&reference, &member);
                    assert_eq!(change.map(|c| c.edge), was_in.then_some(gone));
                }
            }
            let mut want: HashMap<String, u64> = HashMap::new();
            for (_, t, m) in &reference {
                if *t == topic {
                    *want.entry(m.clone()).or_default() += 1;
                }
            }
            let mut want: Vec<_> = want.into_iter().collect();
            want.sort_unstable();
            assert_eq!(p.snapshot(&topic).members.unwrap(), want);
        }
    }
}
