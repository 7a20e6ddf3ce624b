//! With `--redis` and `--webhook-url`: whether a topic is occupied anywhere in the
//! cluster, and whether a presence member is there, decided once. Each process is a
//! member of a topic's Redis set while it has local subscribers (and of a (topic, member)
//! set while that member has local connections there); a script adds or removes it and
//! says whether that made the set go from empty to not (topic_occupied, member_added) or
//! back (topic_vacated, member_removed). Redis runs one script at a time, so exactly one
//! process sees each transition, and that process sends the webhook.
//!
//! A process that dies holds its memberships until its liveness key expires
//! (`OCCUPANCY_TTL`, refreshed by every script it runs and by its sweep every third of
//! it); each script drops members whose key is gone, and the sweep walks the set of
//! occupied topics a batch at a time, so a topic only a dead process held is vacated (and
//! reported, by the sweeping process) within about `OCCUPANCY_TTL` plus one walk. After
//! Redis comes back, a process joins again under a new member name: its old name expires
//! with the topics it left while Redis was away, which are then vacated by the sweep.
//!
//! Pure: it builds the scripts' keys and arguments and reads their replies; the pipeline
//! sends them through the Redis link (`Redis::script`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a process's memberships outlive its last word to Redis.
pub const OCCUPANCY_TTL: Duration = Duration::from_secs(15);
/// Topics the sweep looks at per run.
const SWEEP_BATCH: usize = 200;

/// Drop members of the set KEYS[1] whose liveness key (ARGV[3] .. member) is gone;
/// how many were dropped. Also refreshes this process's liveness key KEYS[3].
macro_rules! occupancy_lua {
    () => {
        "redis.call('SET', KEYS[3], '1', 'PX', ARGV[2]) \
         local function clean(k) local n = 0 \
         for _, m in ipairs(redis.call('SMEMBERS', k)) do \
         if redis.call('EXISTS', ARGV[3] .. m) == 0 then redis.call('SREM', k, m) n = n + 1 end end \
         return n end "
    };
}

/// KEYS: [1] the topic's set, [2] the set of occupied topics, [3] this process's liveness
/// key. ARGV: [1] this process, [2] TTL ms, [3] liveness key prefix, [4] the topic.
/// Returns 1: occupied now; 2: vacated (by dead members) then occupied; 0: no news.
const JOIN_LUA: &str = concat!(
    occupancy_lua!(),
    "local dead = clean(KEYS[1]) local before = redis.call('SCARD', KEYS[1]) \
     redis.call('SADD', KEYS[1], ARGV[1]) redis.call('SADD', KEYS[2], ARGV[4]) \
     if before > 0 then return 0 end if dead > 0 then return 2 end return 1"
);

/// Same keys. Returns 1: vacated now; 0: no news.
const LEAVE_LUA: &str = concat!(
    occupancy_lua!(),
    "local had = redis.call('SREM', KEYS[1], ARGV[1]) + clean(KEYS[1]) \
     if redis.call('SCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[4]) \
     if had > 0 then return 1 end end return 0"
);

/// KEYS: [1] the set of occupied topics, [2] the sweep's cursor, [3] this process's
/// liveness key. ARGV: [1] this process (unused), [2] TTL ms, [3] liveness key prefix,
/// [4] the topic sets' key prefix, [5] batch. Returns the topics vacated by dead members.
const SWEEP_LUA: &str = concat!(
    occupancy_lua!(),
    "local r = redis.call('SSCAN', KEYS[1], redis.call('GET', KEYS[2]) or '0', 'COUNT', ARGV[5]) \
     redis.call('SET', KEYS[2], r[1]) local out = {} \
     for _, t in ipairs(r[2]) do local k = ARGV[4] .. t local dead = clean(k) \
     if redis.call('SCARD', k) == 0 then redis.call('SREM', KEYS[1], t) \
     if dead > 0 then out[#out + 1] = t end end end return out"
);

/// A script to send: its text, keys and arguments, and the tag its reply will carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub script: &'static str,
    pub keys: Vec<String>,
    pub args: Vec<String>,
    pub tag: u64,
}

/// What a set is about: a topic, or a presence member on a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Topic(String),
    Member { topic: String, member: String },
}

impl Entry {
    /// Its name in the registry the sweep walks: topic names have no space (the topic
    /// alphabet), so "topic member" splits back at the first one.
    fn name(&self) -> String {
        match self {
            Entry::Topic(t) => t.clone(),
            Entry::Member { topic, member } => format!("{topic} {member}"),
        }
    }

    fn from_name(members: bool, name: String) -> Entry {
        match name.split_once(' ') {
            Some((topic, member)) if members => Entry::Member {
                topic: topic.to_string(),
                member: member.to_string(),
            },
            _ => Entry::Topic(name),
        }
    }

    /// The registry (`occ-topics` or `occ-members`) and the sets' key prefix.
    fn keys(&self, p: &str) -> (String, String) {
        match self {
            Entry::Topic(_) => (format!("{p}occ-topics"), format!("{p}occ:")),
            Entry::Member { .. } => (format!("{p}occ-members"), format!("{p}occm:")),
        }
    }
}

/// A transition this process must report: the entry became occupied (true) or empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct News {
    pub entry: Entry,
    pub occupied: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Asked {
    Join(Entry),
    Leave(Entry),
    /// Of the member registry (true) or the topic one.
    Sweep(bool),
}

#[derive(Debug)]
pub struct Occupancy {
    prefix: String,
    /// This process's member name in the sets: its Redis instance and a generation, new
    /// after each reconnect.
    member: String,
    instance: String,
    generation: u64,
    asked: HashMap<u64, Asked>,
    next_tag: u64,
    sweep_at: Instant,
}

impl Occupancy {
    pub fn new(prefix: &str, instance: &str, now: Instant) -> Occupancy {
        Occupancy {
            prefix: prefix.to_string(),
            member: format!("{instance}.0"),
            instance: instance.to_string(),
            generation: 0,
            asked: HashMap::new(),
            next_tag: 0,
            sweep_at: now,
        }
    }

    pub fn join(&mut self, entry: Entry) -> Call {
        self.call(JOIN_LUA, Asked::Join(entry))
    }

    pub fn leave(&mut self, entry: Entry) -> Call {
        self.call(LEAVE_LUA, Asked::Leave(entry))
    }

    /// Redis is (again) up: from now on this process is a new member, so that whatever
    /// it left while Redis was away expires with the old one. The caller joins every
    /// local topic again.
    pub fn renew(&mut self, now: Instant) {
        self.generation += 1;
        self.member = format!("{}.{}", self.instance, self.generation);
        self.asked.clear();
        self.sweep_at = now;
    }

    pub fn next_sweep(&self) -> Instant {
        self.sweep_at
    }

    /// The sweeps of both registries (and the heartbeat), when due.
    pub fn sweep(&mut self, now: Instant) -> Option<[Call; 2]> {
        if now < self.sweep_at {
            return None;
        }
        self.sweep_at = now + OCCUPANCY_TTL / 3;
        Some([
            self.call(SWEEP_LUA, Asked::Sweep(false)),
            self.call(SWEEP_LUA, Asked::Sweep(true)),
        ])
    }

    /// A script's reply came back: the news it carries for this process to report. `None`
    /// when the tag is not ours.
    pub fn on_reply(&mut self, tag: u64, reply: Result<Vec<String>, String>) -> Option<Vec<News>> {
        let asked = self.asked.remove(&tag)?;
        let Ok(reply) = reply else {
            // Refused or Redis lost: the renewal after a reconnect makes up for joins and
            // leaves; a lost sweep is repeated at the next one.
            return Some(Vec::new());
        };
        let code = reply.first().map(String::as_str);
        let news = |entry, occupied| News { entry, occupied };
        Some(match asked {
            Asked::Join(entry) => match code {
                Some("1") => vec![news(entry, true)],
                Some("2") => vec![news(entry.clone(), false), news(entry, true)],
                _ => Vec::new(),
            },
            Asked::Leave(entry) => match code {
                Some("1") => vec![news(entry, false)],
                _ => Vec::new(),
            },
            Asked::Sweep(members) => reply
                .into_iter()
                .map(|name| news(Entry::from_name(members, name), false))
                .collect(),
        })
    }

    /// Tags are ours when they are odd: the pipeline's other script users (none yet) can
    /// take the even ones.
    fn call(&mut self, script: &'static str, asked: Asked) -> Call {
        self.next_tag += 2;
        let tag = self.next_tag | 1;
        let p = &self.prefix;
        let alive = format!("{p}alive:{}", self.member);
        let ttl = OCCUPANCY_TTL.as_millis().to_string();
        let (keys, args) = match &asked {
            Asked::Join(entry) | Asked::Leave(entry) => {
                let (registry, sets) = entry.keys(p);
                let name = entry.name();
                (
                    vec![format!("{sets}{name}"), registry, alive],
                    vec![self.member.clone(), ttl, format!("{p}alive:"), name],
                )
            }
            Asked::Sweep(members) => {
                let probe = match members {
                    true => Entry::Member {
                        topic: String::new(),
                        member: String::new(),
                    },
                    false => Entry::Topic(String::new()),
                };
                let (registry, sets) = probe.keys(p);
                let cursor = format!("{registry}-cursor");
                (
                    vec![registry, cursor, alive],
                    vec![
                        self.member.clone(),
                        ttl,
                        format!("{p}alive:"),
                        sets,
                        SWEEP_BATCH.to_string(),
                    ],
                )
            }
        };
        self.asked.insert(tag, asked);
        Call {
            script,
            keys,
            args,
            tag,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(t: &str) -> Entry {
        Entry::Topic(t.into())
    }

    #[test]
    fn replies_become_news_for_the_process_that_asked() {
        let now = Instant::now();
        let mut o = Occupancy::new("h:", "host-1", now);
        let join = o.join(topic("a"));
        assert_eq!(join.keys, ["h:occ:a", "h:occ-topics", "h:alive:host-1.0"]);
        assert_eq!(join.args[0], "host-1.0");
        let leave = o.leave(topic("a"));
        assert_eq!(
            o.on_reply(join.tag, Ok(vec!["1".into()])),
            Some(vec![News {
                entry: topic("a"),
                occupied: true
            }])
        );
        assert_eq!(o.on_reply(leave.tag, Ok(vec!["0".into()])), Some(vec![]));
        assert_eq!(o.on_reply(leave.tag, Ok(vec![])), None, "answered once");
        let [topics, members] = o.sweep(now).unwrap();
        assert!(o.sweep(now).is_none(), "not due again yet");
        assert_eq!(topics.keys[..2], ["h:occ-topics", "h:occ-topics-cursor"]);
        assert_eq!(members.args[3], "h:occm:");
        assert_eq!(
            o.on_reply(topics.tag, Ok(vec!["x".into()])),
            Some(vec![News {
                entry: topic("x"),
                occupied: false
            }])
        );
        let gone = Entry::Member {
            topic: "room".into(),
            member: "42 the answer".into(),
        };
        assert_eq!(
            o.on_reply(members.tag, Ok(vec!["room 42 the answer".into()])),
            Some(vec![News {
                entry: gone,
                occupied: false
            }]),
            "a member name may hold spaces; topic names cannot"
        );
        let rejoin = o.join(topic("b"));
        assert_eq!(
            o.on_reply(rejoin.tag, Ok(vec!["2".into()])),
            Some(vec![
                News {
                    entry: topic("b"),
                    occupied: false
                },
                News {
                    entry: topic("b"),
                    occupied: true
                }
            ])
        );
        let m = o.join(Entry::Member {
            topic: "room".into(),
            member: "7".into(),
        });
        assert_eq!(m.keys[..2], ["h:occm:room 7", "h:occ-members"]);
        o.renew(now);
        assert_eq!(
            o.join(topic("c")).args[0],
            "host-1.1",
            "a new member after a reconnect"
        );
    }
}
