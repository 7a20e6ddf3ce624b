//! Sharing topics with other herald processes through Redis pub/sub, inside the one event
//! loop: two nonblocking connections, one for commands (publish) and one for
//! subscriptions, spoken in RESP2 through the `redis-protocol` codec. No thread, no
//! blocking call.
//!
//! Publishing runs a Lua script that, in one atomic step, increments the topic's id
//! counter, appends the message to the topic's history stream, and publishes
//! `"<id> <epoch> <data>"` to the topic's channel, so every process sees one order per
//! topic, the same id for the same message, and one history. herald delivers to its own
//! subscribers only what comes back on the subscription link.
//!
//! History lives in Redis: a stream per topic (`<prefix>h:<topic>`, entry ids `<id>-0`,
//! trimmed with `MAXLEN ~` and expiring `--history-ttl` after the last publish) and an
//! epoch key (`<prefix>epoch:<topic>`). The first script to find the epoch key missing
//! (a new topic, or a Redis that lost its data) sets a fresh epoch and clears the stream,
//! so a history that may have lost messages never keeps the epoch it had. A resume reads
//! the topic's position and what it missed with one more script on the command link
//! (`read_history`).
//!
//! This module owns the sockets and the protocol; what a reply means for clients is
//! decided by the server from the `Event`s returned here. When Redis goes away, links
//! reconnect with capped, jittered backoff, each state change is logged once, pending
//! publishes fail (the server answers 503), and the server subscribes again to every topic
//! it still has. A malformed or unexpected reply resets the link it came on.

use std::collections::{HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::encode::encode_borrowed;
use redis_protocol::resp2::types::{BorrowedFrame, OwnedFrame};

pub const COMMAND_TOKEN: Token = Token(usize::MAX - 3);
pub const SUBSCRIPTION_TOKEN: Token = Token(usize::MAX - 4);

/// Reconnect delays: full jitter between 0 and min(MAX, MIN × 2^attempt).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A command unanswered this long means Redis (or the path to it) is stuck: reset.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// A reply still incomplete past this size is not one Redis would send us: reset.
const MAX_PENDING_INPUT: usize = 64 * 1024 * 1024;
/// How often the delivery probe goes around: PUBLISH on the command link, back on the
/// subscription link.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// A probe not back within this is a broken delivery path, even with both links up (the
/// failure Centrifugo #1189 describes: delivery stopped while health stayed green).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Channels per SUBSCRIBE command when subscribing again after a reconnect.
const SUBSCRIBE_BATCH: usize = 512;

/// The epoch, set to the candidate ARGV[1] (and the stream cleared) when it is missing.
/// KEYS: [1] id counter, [2] epoch key, [3] history stream. Shared by both scripts: a
/// macro, so each script is one literal and a publish formats none of it.
macro_rules! epoch_lua {
    () => {
        "local epoch = redis.call('GET', KEYS[2]) \
     if not epoch then epoch = ARGV[1] redis.call('SET', KEYS[2], epoch) \
     redis.call('DEL', KEYS[3]) end \
     local t = redis.call('TIME') local ms = t[1] * 1000 + math.floor(t[2] / 1000) "
    };
}

/// INCR the topic's id, append to its history (ARGV[3] entries at most, ARGV[4] ms), and
/// PUBLISH "<id> <epoch> <data>" on its channel (KEYS[4]), atomically.
const PUBLISH_LUA: &str = concat!(
    epoch_lua!(),
    "local id = redis.call('INCR', KEYS[1]) \
     if tonumber(ARGV[3]) > 0 then \
     redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], id .. '-0', 't', ms, 'd', ARGV[2]) \
     redis.call('PEXPIRE', KEYS[3], ARGV[4]) end \
     local n = redis.call('PUBLISH', KEYS[4], id .. ' ' .. epoch .. ' ' .. ARGV[2]) \
     return {id, n}"
);

/// The topic's epoch and last id and, when ARGV[2] >= 0, the messages after id ARGV[2]
/// that are younger than ARGV[3] ms (at most ARGV[4]), as a flat list of id, data. A
/// position from another epoch (ARGV[5], when given) means nothing here: then every
/// message the stream holds comes back.
const READ_LUA: &str = concat!(
    epoch_lua!(),
    "local last = tonumber(redis.call('GET', KEYS[1]) or '0') \
     local since = tonumber(ARGV[2]) local out = {} \
     if since >= 0 and ARGV[5] ~= '' and ARGV[5] ~= epoch then since = 0 end \
     if since >= 0 and since < last then \
     local oldest = ms - tonumber(ARGV[3]) \
     local rows = redis.call('XRANGE', KEYS[3], (since + 1) .. '-0', '+', 'COUNT', ARGV[4]) \
     for _, row in ipairs(rows) do local f = row[2] \
     if tonumber(f[2]) >= oldest then out[#out + 1] = row[1] out[#out + 1] = f[4] end end end \
     return {epoch, last, out}"
);

/// Presence, shared: KEYS [1] the zset of live processes (score: the ms their entries
/// are good until), [2] the merged hash (member -> connections everywhere), [3] this
/// process's hash (member -> its connections here). ARGV [1] this process, [2] the TTL
/// in ms, [3] the topic's channel, [4] --presence-max-members, [5] the prefix of every
/// process's hash key. `rebuild` sums the live processes' hashes into the merged one and
/// publishes the joins and leaves that made, within the cap; `sweep` drops processes
/// past their TTL (killed, or cut off), then rebuilds. The dead processes' keys are
/// named from ARGV, so these scripts need one Redis, not a cluster.
macro_rules! presence_lua {
    () => {
        "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) \
     local ttl = tonumber(ARGV[2]) local max = tonumber(ARGV[4]) \
     local function event(kind, m) redis.call('PUBLISH', ARGV[3], '!' .. kind .. ' ' .. m) end \
     local function live() \
     if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end \
     redis.call('ZADD', KEYS[1], now + ttl, ARGV[1]) end \
     local function keep() for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, 2 * ttl) end end \
     local function rebuild() \
     local old = redis.call('HGETALL', KEYS[2]) redis.call('DEL', KEYS[2]) \
     for _, p in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do \
     local h = redis.call('HGETALL', ARGV[5] .. p) \
     for i = 1, #h, 2 do redis.call('HINCRBY', KEYS[2], h[i], h[i + 1]) end end \
     local was = {} for i = 1, #old, 2 do was[old[i]] = true end \
     if #old / 2 <= max then for i = 1, #old, 2 do \
     if redis.call('HEXISTS', KEYS[2], old[i]) == 0 then event('leave', old[i]) end end end \
     if redis.call('HLEN', KEYS[2]) <= max then \
     for _, m in ipairs(redis.call('HKEYS', KEYS[2])) do \
     if not was[m] then event('join', m) end end end end \
     local function sweep() \
     local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now) \
     for _, d in ipairs(dead) do redis.call('ZREM', KEYS[1], d) redis.call('DEL', ARGV[5] .. d) end \
     if #dead > 0 then rebuild() end end "
    };
}

/// One connection came (ARGV[7] = 1) or went (-1) as member ARGV[6]: a join when it
/// is the member's first connection anywhere, a leave when its last. O(1).
const PRESENCE_CHANGE_LUA: &str = concat!(
    presence_lua!(),
    "live() local m = ARGV[6] local d = tonumber(ARGV[7]) \
     if redis.call('HINCRBY', KEYS[3], m, d) <= 0 then redis.call('HDEL', KEYS[3], m) end \
     local before = redis.call('HLEN', KEYS[2]) \
     local n = redis.call('HINCRBY', KEYS[2], m, d) \
     if n <= 0 then redis.call('HDEL', KEYS[2], m) \
     if d < 0 and before <= max then event('leave', m) end \
     elseif n == 1 and d == 1 and before + 1 <= max then event('join', m) end \
     keep() return 1"
);

/// The heartbeat: this process is alive for another TTL; the dead are swept.
const PRESENCE_BEAT_LUA: &str = concat!(presence_lua!(), "live() sweep() keep() return 1");

/// After a reconnect (Redis may have lost everything): this process's hash is set to
/// ARGV[6..] (member, connections, ...), and the merged hash rebuilt.
const PRESENCE_SYNC_LUA: &str = concat!(
    presence_lua!(),
    "live() redis.call('DEL', KEYS[3]) \
     for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end \
     sweep() rebuild() keep() return 1"
);

/// Who is there, once the dead are swept: {count, [member, conns, ...]} within the
/// cap, {count} past it.
const PRESENCE_READ_LUA: &str = concat!(
    presence_lua!(),
    "sweep() local n = redis.call('HLEN', KEYS[2]) \
     if n <= max then return {n, redis.call('HGETALL', KEYS[2])} end return {n}"
);

/// Where Redis is and how to speak to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// host:port
    pub addr: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
    /// Channel and key prefix, so several deployments can share one Redis.
    pub prefix: String,
    /// Messages kept per topic's stream (0: none), and for how long.
    pub history_size: usize,
    pub history_ttl: Duration,
    /// `--presence-ttl` and `--presence-max-members`.
    pub presence_ttl: Duration,
    pub presence_max: usize,
}

/// `redis://[[user]:password@]host[:port][/db]`
pub fn parse_url(url: &str, prefix: &str) -> Result<RedisConfig, String> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or("the Redis URL must start with redis://")?;
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (Some(auth), rest),
        None => (None, rest),
    };
    let (hostport, db) = match rest.split_once('/') {
        Some((h, "")) => (h, 0),
        Some((h, db)) => (
            h,
            db.parse()
                .map_err(|_| format!("Redis database {db:?} is not a number"))?,
        ),
        None => (rest, 0),
    };
    if hostport.is_empty() {
        return Err("the Redis URL names no host".into());
    }
    let addr = if hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        hostport.to_string()
    } else {
        format!("{hostport}:6379")
    };
    let (username, password) = match auth.map(|a| a.split_once(':').unwrap_or(("", a))) {
        None => (None, None),
        Some(("", pass)) => (None, Some(pass.to_string())),
        Some((user, pass)) => (Some(user.to_string()), Some(pass.to_string())),
    };
    Ok(RedisConfig {
        addr,
        username,
        password,
        db,
        prefix: prefix.to_string(),
        history_size: 0,
        history_ttl: Duration::ZERO,
        presence_ttl: Duration::from_secs(15),
        presence_max: 1000,
    })
}

/// What happened on the links, for the server to act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A publish finished: the message's id and how many herald processes received it.
    Published {
        tag: u64,
        result: Result<(u64, u64), String>,
    },
    /// A message came back on a channel: deliver it locally.
    Message {
        topic: String,
        id: u64,
        epoch: String,
        data: String,
    },
    /// A read of a topic's position and history (`read_history`) finished.
    Read {
        tag: u64,
        result: Result<Stored, String>,
    },
    /// Redis confirmed our subscription to this topic's channel.
    Confirmed {
        topic: String,
    },
    /// The subscription link is (again) ready: subscribe to every local topic.
    SubscriptionReady,
    /// A presence read (`presence_read`) finished.
    PresenceRead {
        tag: u64,
        result: Result<PresenceAnswer, String>,
    },
    /// A member appeared in (`join`) or disappeared from a topic, anywhere.
    Presence {
        topic: String,
        join: bool,
        member: String,
    },
    /// Both links ready / one of them lost.
    Up,
    Down,
    /// Reply to `ping_subscription`: everything published before it has arrived.
    Pong,
    /// The delivery probe came back in time (true) or did not (false): a change only.
    Delivery(bool),
}

/// A topic's position and history as Redis holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub epoch: String,
    pub last_id: u64,
    /// Messages after the id asked for, oldest first: (id, data JSON).
    pub messages: Vec<(u64, String)>,
}

/// A presence read's answer: the member count and, within the cap, every member with
/// its connections across processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceAnswer {
    pub count: usize,
    pub members: Option<Vec<(String, u64)>>,
}

/// A command on the command link awaiting its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// A publish; the tag names the HTTP response waiting for it, if any.
    Publish(Option<u64>),
    /// A read for a subscription.
    Read(u64),
    /// The delivery probe's PUBLISH (its reply, a count, tells nothing).
    Probe,
    /// A presence change, heartbeat or sync (its reply tells nothing).
    Presence,
    /// A presence read.
    PresenceRead(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Down,
    Connecting,
    /// Connected; waiting for this many handshake replies (AUTH, SELECT).
    Handshaking(usize),
    Ready,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Command,
    Subscription,
}

struct Link {
    role: Role,
    token: Token,
    stream: Option<TcpStream>,
    phase: Phase,
    retry_at: Instant,
    /// When the connection attempt began: a handshake unanswered for `REPLY_TIMEOUT`
    /// resets the link.
    since: Instant,
    attempt: u32,
    input: Vec<u8>,
    output: Vec<u8>,
    wants_writable: bool,
}

impl Link {
    fn new(role: Role, token: Token, now: Instant) -> Link {
        Link {
            role,
            token,
            stream: None,
            phase: Phase::Down,
            retry_at: now,
            since: now,
            attempt: 0,
            input: Vec::new(),
            output: Vec::new(),
            wants_writable: false,
        }
    }

    fn name(&self) -> &'static str {
        match self.role {
            Role::Command => "command",
            Role::Subscription => "subscription",
        }
    }
}

#[derive(Debug, Default)]
pub struct RedisCounters {
    pub reconnects: u64,
    /// Links reset for a malformed or unexpected reply, or a stuck command.
    pub errors: u64,
}

/// A message herald sends itself through Redis, to prove delivery works end to end.
#[derive(Debug)]
struct Probe {
    /// `<prefix>!probe:<pid>`: `!` is not in the topic alphabet, so no topic's channel.
    channel: String,
    seq: u64,
    /// The probe out, and when it went.
    sent: Option<(u64, Instant)>,
    next_at: Instant,
    /// As last reported; `None` before the first verdict.
    ok: Option<bool>,
    /// Redis confirmed our subscription to the probe channel: before that a probe could
    /// only be lost, and would make a starting herald look broken.
    subscribed: bool,
}

pub struct Redis {
    cfg: RedisConfig,
    command: Link,
    subscription: Link,
    /// Commands sent on the command link, oldest first, with when they were sent.
    in_flight: VecDeque<(Pending, Instant)>,
    /// Topics Redis has confirmed a subscription for.
    confirmed: HashSet<String>,
    /// Both links ready, as last reported.
    up: bool,
    pings: usize,
    probe: Probe,
    pub counters: RedisCounters,
    rng: u64,
    /// This process among those sharing the Redis: names its presence entries.
    instance: String,
}

impl Redis {
    pub fn new(cfg: RedisConfig, now: Instant) -> Redis {
        let probe_channel = format!("{}!probe:{}", cfg.prefix, std::process::id());
        info!(
            "redis: connecting to {} (channel prefix {:?})",
            cfg.addr, cfg.prefix
        );
        let mut redis = Redis {
            cfg,
            command: Link::new(Role::Command, COMMAND_TOKEN, now),
            subscription: Link::new(Role::Subscription, SUBSCRIPTION_TOKEN, now),
            in_flight: VecDeque::new(),
            confirmed: HashSet::new(),
            up: false,
            pings: 0,
            probe: Probe {
                channel: probe_channel,
                seq: 0,
                sent: None,
                next_at: now,
                ok: None,
                subscribed: false,
            },
            counters: RedisCounters::default(),
            // Epoch candidates come from here: seeded by the clock as well as the pid, so
            // a restarted process cannot propose an epoch it proposed before.
            rng: (u64::from(std::process::id()) << 20 | 0x9e37) ^ clock_seed(),
            instance: String::new(),
        };
        redis.instance = format!("{:012x}", redis.next_random() >> 16);
        redis
    }

    /// This process's name among those sharing the Redis (random, not the pid: pids
    /// repeat across hosts and restarts).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Live upgrade: go on as the process the old binary was, so its presence entries in
    /// Redis stay this process's (before the first connection is made).
    pub fn carry_instance(&mut self, instance: &str) {
        if instance.len() == 12 && instance.bytes().all(|b| b.is_ascii_hexdigit()) {
            self.instance = instance.to_string();
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The first connection attempt has come to an end: both links up, or one failed.
    pub fn settled(&self) -> bool {
        self.up || self.command.attempt > 0 || self.subscription.attempt > 0
    }

    pub fn is_confirmed(&self, topic: &str) -> bool {
        self.confirmed.contains(topic)
    }

    pub fn confirmed_count(&self) -> usize {
        self.confirmed.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The next time `tick` has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let retries = [&self.command, &self.subscription]
            .into_iter()
            .filter_map(|l| match l.phase {
                Phase::Down => Some(l.retry_at),
                Phase::Connecting | Phase::Handshaking(_) => Some(l.since + REPLY_TIMEOUT),
                Phase::Ready => None,
            });
        let stuck = self.in_flight.front().map(|&(_, at)| at + REPLY_TIMEOUT);
        let probe = match self.probe.sent {
            Some((_, at)) => at + PROBE_TIMEOUT,
            None => self.probe.next_at,
        };
        let probe = (self.up && self.probe.subscribed).then_some(probe);
        retries.chain(stuck).chain(probe).min()
    }

    /// Reconnect links whose time has come; reset a link whose oldest command is stuck.
    pub fn tick(&mut self, now: Instant, registry: &Registry, events: &mut Vec<Event>) {
        for role in [Role::Command, Role::Subscription] {
            let link = self.link(role);
            if link.phase == Phase::Down && link.retry_at <= now {
                self.connect(role, registry, now, events);
            } else if matches!(link.phase, Phase::Connecting | Phase::Handshaking(_))
                && now.duration_since(link.since) >= REPLY_TIMEOUT
            {
                let why = "no answer to the handshake within 5 s";
                self.reset(role, why, registry, now, events);
            }
        }
        if self
            .in_flight
            .front()
            .is_some_and(|&(_, at)| now.duration_since(at) >= REPLY_TIMEOUT)
        {
            self.counters.errors += 1;
            self.reset(Role::Command, "no reply within 5 s", registry, now, events);
        }
        self.tick_probe(now, events);
    }

    /// Whether the last probe came back in time (`None`: no verdict yet, or down).
    pub fn delivery_ok(&self) -> Option<bool> {
        self.probe.ok
    }

    /// Both links are up, yet a probe did not come back: the silent failure. (Redis down
    /// is loud, and shared by every process: it is not a reason to move clients.)
    pub fn delivery_broken(&self) -> bool {
        self.up && self.probe.ok == Some(false)
    }

    /// Send the next probe when due; a probe overdue is a broken delivery.
    fn tick_probe(&mut self, now: Instant, events: &mut Vec<Event>) {
        if !self.up || !self.probe.subscribed {
            return;
        }
        if let Some((_, at)) = self.probe.sent
            && now.duration_since(at) >= PROBE_TIMEOUT
        {
            self.probe.sent = None;
            self.probe.next_at = now;
            self.delivery(false, events);
        }
        if self.probe.sent.is_none() && now >= self.probe.next_at {
            self.probe.seq += 1;
            let seq = self.probe.seq.to_string();
            let channel = self.probe.channel.clone();
            command(
                &mut self.command.output,
                &[b"PUBLISH", channel.as_bytes(), seq.as_bytes()],
            );
            self.in_flight.push_back((Pending::Probe, now));
            self.probe.sent = Some((self.probe.seq, now));
            self.probe.next_at = now + PROBE_INTERVAL;
        }
    }

    fn delivery(&mut self, ok: bool, events: &mut Vec<Event>) {
        if self.probe.ok == Some(ok) {
            return;
        }
        if ok {
            info!("redis: delivery works (the probe came back)");
        } else {
            warn!(
                "redis: delivery broken: a probe did not come back within {} s",
                PROBE_TIMEOUT.as_secs()
            );
        }
        self.probe.ok = Some(ok);
        events.push(Event::Delivery(ok));
    }

    /// Queue a publish. False when Redis is down: the caller answers 503.
    pub fn publish(&mut self, topic: &str, data: &str, tag: Option<u64>, now: Instant) -> bool {
        if !self.up {
            return false;
        }
        let [id_key, epoch_key, stream] = self.keys(topic);
        let channel = format!("{}{topic}", self.cfg.prefix);
        let epoch = self.fresh_epoch();
        let size = self.cfg.history_size.to_string();
        let ttl = self.cfg.history_ttl.as_millis().max(1).to_string();
        command(
            &mut self.command.output,
            &[
                b"EVAL",
                PUBLISH_LUA.as_bytes(),
                b"4",
                id_key.as_bytes(),
                epoch_key.as_bytes(),
                stream.as_bytes(),
                channel.as_bytes(),
                epoch.as_bytes(),
                data.as_bytes(),
                size.as_bytes(),
                ttl.as_bytes(),
            ],
        );
        self.in_flight.push_back((Pending::Publish(tag), now));
        true
    }

    /// Queue a read of `topic`'s epoch and last id and, with `since`, of the messages
    /// after it (all of them if `epoch` is not the topic's). The answer is `Event::Read`
    /// with this `tag`. False when Redis is down.
    pub fn read_history(
        &mut self,
        topic: &str,
        since: Option<u64>,
        client_epoch: Option<&str>,
        tag: u64,
        now: Instant,
    ) -> bool {
        if !self.up {
            return false;
        }
        let [id_key, epoch_key, stream] = self.keys(topic);
        let epoch = self.fresh_epoch();
        let since = since.map_or("-1".to_string(), |n| n.to_string());
        let ttl = self.cfg.history_ttl.as_millis().to_string();
        // MAXLEN ~ may keep up to one stream node (100 entries) beyond the size.
        let count = (self.cfg.history_size + 100).to_string();
        command(
            &mut self.command.output,
            &[
                b"EVAL",
                READ_LUA.as_bytes(),
                b"3",
                id_key.as_bytes(),
                epoch_key.as_bytes(),
                stream.as_bytes(),
                epoch.as_bytes(),
                since.as_bytes(),
                ttl.as_bytes(),
                count.as_bytes(),
                client_epoch.unwrap_or("").as_bytes(),
            ],
        );
        self.in_flight.push_back((Pending::Read(tag), now));
        true
    }

    // ---- presence ----------------------------------------------------------------------

    /// One connection of `member` came (`delta` 1) or went (-1) on `topic`. False when
    /// Redis is down (the sync after reconnecting makes up for it).
    pub fn presence_change(&mut self, topic: &str, member: &str, delta: i8, now: Instant) -> bool {
        let delta = delta.to_string();
        self.presence_script(
            PRESENCE_CHANGE_LUA,
            topic,
            &[member, &delta],
            Pending::Presence,
            now,
        )
    }

    /// This process is alive on `topic` for another TTL; sweep the dead.
    pub fn presence_beat(&mut self, topic: &str, now: Instant) -> bool {
        self.presence_script(PRESENCE_BEAT_LUA, topic, &[], Pending::Presence, now)
    }

    /// Replace this process's members of `topic` with `members` (after a reconnect).
    pub fn presence_sync<'a>(
        &mut self,
        topic: &str,
        members: impl Iterator<Item = (&'a str, u32)>,
        now: Instant,
    ) -> bool {
        let pairs: Vec<String> = members
            .flat_map(|(m, n)| [m.to_string(), n.to_string()])
            .collect();
        let args: Vec<&str> = pairs.iter().map(String::as_str).collect();
        self.presence_script(PRESENCE_SYNC_LUA, topic, &args, Pending::Presence, now)
    }

    /// Ask who is on `topic`, across processes: `Event::PresenceRead` with `tag`.
    pub fn presence_read(&mut self, topic: &str, tag: u64, now: Instant) -> bool {
        self.presence_script(
            PRESENCE_READ_LUA,
            topic,
            &[],
            Pending::PresenceRead(tag),
            now,
        )
    }

    fn presence_script(
        &mut self,
        script: &str,
        topic: &str,
        extra: &[&str],
        pending: Pending,
        now: Instant,
    ) -> bool {
        if !self.up {
            return false;
        }
        let p = &self.cfg.prefix;
        let (live, merged) = (
            format!("{p}presence:{topic}"),
            format!("{p}presence-all:{topic}"),
        );
        let per_process = format!("{p}presence:{topic}:");
        let mine = format!("{per_process}{}", self.instance);
        let channel = format!("{p}{topic}");
        let ttl = self.cfg.presence_ttl.as_millis().max(1).to_string();
        let max = self.cfg.presence_max.to_string();
        let mut args: Vec<&[u8]> = vec![
            b"EVAL",
            script.as_bytes(),
            b"3",
            live.as_bytes(),
            merged.as_bytes(),
            mine.as_bytes(),
            self.instance.as_bytes(),
            ttl.as_bytes(),
            channel.as_bytes(),
            max.as_bytes(),
            per_process.as_bytes(),
        ];
        args.extend(extra.iter().map(|a| a.as_bytes()));
        command(&mut self.command.output, &args);
        self.in_flight.push_back((pending, now));
        true
    }

    /// The topic's id counter, epoch key and history stream.
    fn keys(&self, topic: &str) -> [String; 3] {
        let p = &self.cfg.prefix;
        [
            format!("{p}id:{topic}"),
            format!("{p}epoch:{topic}"),
            format!("{p}h:{topic}"),
        ]
    }

    /// An epoch to propose for a topic that has none: 16 hex digits, no space (it travels
    /// inside "<id> <epoch> <data>").
    fn fresh_epoch(&mut self) -> String {
        format!("{:016x}", self.next_random())
    }

    pub fn subscribe(&mut self, topic: &str) {
        if self.subscription.phase == Phase::Ready {
            let channel = format!("{}{topic}", self.cfg.prefix);
            command(
                &mut self.subscription.output,
                &[b"SUBSCRIBE", channel.as_bytes()],
            );
        }
    }

    pub fn unsubscribe(&mut self, topic: &str) {
        self.confirmed.remove(topic);
        if self.subscription.phase == Phase::Ready {
            let channel = format!("{}{topic}", self.cfg.prefix);
            command(
                &mut self.subscription.output,
                &[b"UNSUBSCRIBE", channel.as_bytes()],
            );
        }
    }

    /// Subscribe again to every local topic (after `Event::SubscriptionReady`).
    pub fn resubscribe<'a>(&mut self, topics: impl Iterator<Item = &'a str>) {
        let channels: Vec<String> = topics.map(|t| format!("{}{t}", self.cfg.prefix)).collect();
        for batch in channels.chunks(SUBSCRIBE_BATCH) {
            let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
            args.extend(batch.iter().map(|c| c.as_bytes()));
            command(&mut self.subscription.output, &args);
        }
    }

    /// PING on the subscription link: Redis answers after every message published before
    /// it has been sent to us. False when the link is not ready.
    pub fn ping_subscription(&mut self) -> bool {
        if self.subscription.phase != Phase::Ready {
            return false;
        }
        command(&mut self.subscription.output, &[b"PING"]);
        self.pings += 1;
        true
    }

    /// Readiness on one of our tokens.
    pub fn on_ready(
        &mut self,
        token: Token,
        registry: &Registry,
        now: Instant,
        events: &mut Vec<Event>,
    ) {
        let role = if token == COMMAND_TOKEN {
            Role::Command
        } else {
            Role::Subscription
        };
        if self.link(role).phase == Phase::Connecting {
            let link = self.link_mut(role);
            let Some(stream) = link.stream.as_ref() else {
                return;
            };
            match stream.take_error() {
                Ok(Some(e)) | Err(e) => {
                    return self.reset(role, &e.to_string(), registry, now, events);
                }
                Ok(None) => {}
            }
            if stream.peer_addr().is_err() {
                return; // still connecting
            }
            self.handshake(role);
        }
        self.read(role, registry, now, events);
    }

    /// Write what the loop queued this pass.
    pub fn flush(&mut self, registry: &Registry, now: Instant, events: &mut Vec<Event>) {
        for role in [Role::Command, Role::Subscription] {
            let link = self.link_mut(role);
            let Some(stream) = link.stream.as_mut() else {
                continue;
            };
            if link.phase == Phase::Connecting {
                continue;
            }
            let mut failed = None;
            while !link.output.is_empty() {
                match stream.write(&link.output) {
                    Ok(0) => {
                        failed = Some("connection closed".to_string());
                        break;
                    }
                    Ok(n) => {
                        link.output.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            if let Some(why) = failed {
                self.reset(role, &why, registry, now, events);
                continue;
            }
            let wants = !link.output.is_empty();
            if wants != link.wants_writable {
                let interest = if wants {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                if registry.reregister(stream, link.token, interest).is_ok() {
                    link.wants_writable = wants;
                }
            }
        }
    }

    fn link(&self, role: Role) -> &Link {
        match role {
            Role::Command => &self.command,
            Role::Subscription => &self.subscription,
        }
    }

    fn link_mut(&mut self, role: Role) -> &mut Link {
        match role {
            Role::Command => &mut self.command,
            Role::Subscription => &mut self.subscription,
        }
    }

    fn connect(&mut self, role: Role, registry: &Registry, now: Instant, events: &mut Vec<Event>) {
        let addr = match self.cfg.addr.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(addr)) => addr,
            Ok(None) | Err(_) => {
                return self.reset(role, "cannot resolve the address", registry, now, events);
            }
        };
        let link = self.link_mut(role);
        let mut stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => return self.reset(role, &e.to_string(), registry, now, events),
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = registry.register(&mut stream, link.token, interest) {
            return self.reset(role, &e.to_string(), registry, now, events);
        }
        let _ = stream.set_nodelay(true);
        link.stream = Some(stream);
        link.phase = Phase::Connecting;
        link.since = now;
        link.wants_writable = true;
        link.input.clear();
        link.output.clear();
    }

    /// Connected: authenticate and choose the database before anything else.
    fn handshake(&mut self, role: Role) {
        let (user, pass, db) = (
            self.cfg.username.clone(),
            self.cfg.password.clone(),
            self.cfg.db,
        );
        let link = self.link_mut(role);
        let mut expected = 0;
        match (&user, &pass) {
            (Some(u), Some(p)) => command(&mut link.output, &[b"AUTH", u.as_bytes(), p.as_bytes()]),
            (None, Some(p)) => command(&mut link.output, &[b"AUTH", p.as_bytes()]),
            _ => {}
        }
        if pass.is_some() {
            expected += 1;
        }
        // Pub/sub ignores databases; ids live in the command link's one.
        if role == Role::Command && db != 0 {
            command(&mut link.output, &[b"SELECT", db.to_string().as_bytes()]);
            expected += 1;
        }
        // A link is ready when Redis has answered, not when TCP connected: a frozen Redis
        // still completes connections from its kernel backlog.
        command(&mut link.output, &[b"PING"]);
        expected += 1;
        link.phase = Phase::Handshaking(expected);
    }

    fn ready(&mut self, role: Role, events: &mut Vec<Event>) {
        let link = self.link_mut(role);
        link.phase = Phase::Ready;
        link.attempt = 0;
        debug!("redis: {} link ready", link.name());
        if role == Role::Subscription {
            let channel = self.probe.channel.clone();
            command(
                &mut self.link_mut(role).output,
                &[b"SUBSCRIBE", channel.as_bytes()],
            );
            events.push(Event::SubscriptionReady);
        }
        self.report(events, None);
    }

    /// Log and report a change of the combined state, once per change.
    fn report(&mut self, events: &mut Vec<Event>, why: Option<&str>) {
        let up = self.command.phase == Phase::Ready && self.subscription.phase == Phase::Ready;
        if up == self.up {
            return;
        }
        self.up = up;
        if up {
            info!("redis: up ({})", self.cfg.addr);
            events.push(Event::Up);
        } else {
            // A probe out when the link went down proves nothing either way.
            self.probe.sent = None;
            self.probe.ok = None;
            warn!(
                "redis: down ({}): {}; /publish answers 503 until it is back",
                self.cfg.addr,
                why.unwrap_or("lost")
            );
            events.push(Event::Down);
        }
    }

    /// Close the link and plan its reconnect. Publishes in flight on the command link
    /// fail: Redis may or may not have run them, and the publisher must be told.
    fn reset(
        &mut self,
        role: Role,
        why: &str,
        registry: &Registry,
        now: Instant,
        events: &mut Vec<Event>,
    ) {
        let jitter = self.next_random();
        let link = self.link_mut(role);
        if let Some(mut stream) = link.stream.take() {
            let _ = registry.deregister(&mut stream);
        }
        let was_connected = link.phase != Phase::Down;
        link.phase = Phase::Down;
        link.input = Vec::new();
        link.output = Vec::new();
        let cap = BACKOFF_MIN
            .saturating_mul(1 << link.attempt.min(10))
            .min(BACKOFF_MAX);
        let delay = Duration::from_nanos(jitter % (cap.as_nanos() as u64).max(1))
            .max(Duration::from_millis(20));
        link.retry_at = now + delay;
        link.attempt += 1;
        if was_connected {
            self.counters.reconnects += 1;
            debug!(
                "redis: {} link reset: {why}; retrying in {delay:?}",
                self.link(role).name()
            );
        }
        match role {
            Role::Command => {
                for (pending, _) in self.in_flight.drain(..) {
                    let why = || "redis unavailable".to_string();
                    match pending {
                        Pending::Publish(Some(tag)) => events.push(Event::Published {
                            tag,
                            result: Err(why()),
                        }),
                        Pending::Publish(None) | Pending::Probe | Pending::Presence => {}
                        Pending::PresenceRead(tag) => events.push(Event::PresenceRead {
                            tag,
                            result: Err(why()),
                        }),
                        Pending::Read(tag) => events.push(Event::Read {
                            tag,
                            result: Err(why()),
                        }),
                    }
                }
            }
            Role::Subscription => {
                self.confirmed.clear();
                self.pings = 0;
                self.probe.subscribed = false;
                self.probe.sent = None;
            }
        }
        self.report(events, Some(why));
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn read(&mut self, role: Role, registry: &Registry, now: Instant, events: &mut Vec<Event>) {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let link = self.link_mut(role);
            let Some(stream) = link.stream.as_mut() else {
                return;
            };
            match stream.read(&mut chunk) {
                Ok(0) => {
                    return self.reset(role, "connection closed by Redis", registry, now, events);
                }
                Ok(n) => link.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.reset(role, &e.to_string(), registry, now, events),
            }
        }
        // Take every whole frame; a partial one waits for more bytes. The buffer is taken
        // out only so `on_frame` may borrow `self`; it goes back with its capacity.
        let mut input = std::mem::take(&mut self.link_mut(role).input);
        let mut at = 0;
        let outcome = loop {
            match decode(&input[at..]) {
                Ok(Some((frame, used))) => {
                    at += used;
                    if let Err(why) = self.on_frame(role, frame, events) {
                        break Err(why);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(format!("malformed reply: {e:?}")),
            }
        };
        match outcome {
            Ok(()) if input.len() - at > MAX_PENDING_INPUT => {
                self.counters.errors += 1;
                self.reset(role, "reply too large", registry, now, events);
            }
            Ok(()) => {
                input.drain(..at);
                self.link_mut(role).input = input;
            }
            Err(why) => {
                self.counters.errors += 1;
                warn!(
                    "redis: {} link: {why}; resetting it",
                    self.link(role).name()
                );
                self.reset(role, &why, registry, now, events);
            }
        }
    }

    fn on_frame(
        &mut self,
        role: Role,
        frame: OwnedFrame,
        events: &mut Vec<Event>,
    ) -> Result<(), String> {
        if let Phase::Handshaking(left) = self.link(role).phase {
            return match frame {
                OwnedFrame::SimpleString(ref s) if s == b"OK" || s == b"PONG" => {
                    self.link_mut(role).phase = Phase::Handshaking(left - 1);
                    if left == 1 {
                        self.ready(role, events);
                    }
                    Ok(())
                }
                OwnedFrame::Error(e) => Err(format!("handshake refused: {e}")),
                other => Err(format!("unexpected handshake reply {other:?}")),
            };
        }
        match role {
            Role::Command => {
                let Some((pending, _)) = self.in_flight.pop_front() else {
                    return Err(format!("reply {frame:?} to no command"));
                };
                let tag = match pending {
                    Pending::Probe => return Ok(()),
                    Pending::Presence => {
                        if let OwnedFrame::Error(e) = frame {
                            warn!("redis: presence update refused: {e}");
                        }
                        return Ok(());
                    }
                    Pending::PresenceRead(tag) => {
                        let result = match frame {
                            OwnedFrame::Error(e) => {
                                warn!("redis: presence read refused: {e}");
                                Err(e)
                            }
                            other => Ok(parse_presence(other)?),
                        };
                        events.push(Event::PresenceRead { tag, result });
                        return Ok(());
                    }
                    Pending::Publish(tag) => tag,
                    Pending::Read(tag) => {
                        let result = match frame {
                            OwnedFrame::Error(e) => {
                                warn!("redis: history read refused: {e}");
                                Err(e)
                            }
                            other => Ok(parse_stored(other)?),
                        };
                        events.push(Event::Read { tag, result });
                        return Ok(());
                    }
                };
                let result = match frame {
                    OwnedFrame::Array(ref items) => match items.as_slice() {
                        [OwnedFrame::Integer(id), OwnedFrame::Integer(n)] if *id > 0 && *n >= 0 => {
                            Ok((*id as u64, *n as u64))
                        }
                        _ => return Err(format!("unexpected publish reply {frame:?}")),
                    },
                    // Redis refused this command (out of memory, scripting disabled...):
                    // that publish fails; the link is fine.
                    OwnedFrame::Error(e) => {
                        warn!("redis: publish refused: {e}");
                        Err(e)
                    }
                    other => return Err(format!("unexpected publish reply {other:?}")),
                };
                if let Some(tag) = tag {
                    events.push(Event::Published { tag, result });
                }
                Ok(())
            }
            Role::Subscription => self.on_push(frame, events),
        }
    }

    /// Frames on the subscription link: messages, (un)subscribe confirmations, pongs.
    fn on_push(&mut self, frame: OwnedFrame, events: &mut Vec<Event>) -> Result<(), String> {
        let OwnedFrame::Array(items) = frame else {
            return Err(format!(
                "unexpected frame on the subscription link: {frame:?}"
            ));
        };
        let kind = match items.first() {
            Some(OwnedFrame::BulkString(k)) => k.as_slice(),
            _ => {
                return Err(format!(
                    "unexpected frame on the subscription link: {items:?}"
                ));
            }
        };
        let channel_topic = |i: usize| -> Result<String, String> {
            let Some(OwnedFrame::BulkString(ch)) = items.get(i) else {
                return Err("channel missing".into());
            };
            let ch = std::str::from_utf8(ch).map_err(|_| "channel is not UTF-8".to_string())?;
            ch.strip_prefix(self.cfg.prefix.as_str())
                .map(str::to_string)
                .ok_or_else(|| format!("channel {ch:?} lacks our prefix"))
        };
        let is_probe = matches!(items.get(1), Some(OwnedFrame::BulkString(ch)) if *ch == self.probe.channel.as_bytes());
        if is_probe {
            if kind == b"subscribe" {
                self.probe.subscribed = true;
            }
            if kind == b"message"
                && let Some(OwnedFrame::BulkString(seq)) = items.get(2)
                && let Some((sent, _)) = self.probe.sent
                && std::str::from_utf8(seq).ok().and_then(|s| s.parse().ok()) == Some(sent)
            {
                self.probe.sent = None;
                self.delivery(true, events);
            }
            return Ok(());
        }
        match kind {
            b"message" => {
                let topic = channel_topic(1)?;
                let Some(OwnedFrame::BulkString(payload)) = items.get(2) else {
                    return Err("message without payload".into());
                };
                // A presence event, which no message payload can look like (they begin
                // with an id's digit).
                if let Some((join, member)) = parse_presence_event(payload)? {
                    events.push(Event::Presence {
                        topic,
                        join,
                        member,
                    });
                    return Ok(());
                }
                let (id, epoch, data) = parse_payload(payload)?;
                events.push(Event::Message {
                    topic,
                    id,
                    epoch,
                    data,
                });
            }
            b"subscribe" => {
                let topic = channel_topic(1)?;
                self.confirmed.insert(topic.clone());
                events.push(Event::Confirmed { topic });
            }
            b"unsubscribe" => {}
            b"pong" if self.pings > 0 => {
                self.pings -= 1;
                events.push(Event::Pong);
            }
            _ => {
                return Err(format!(
                    "unexpected frame on the subscription link: {items:?}"
                ));
            }
        }
        Ok(())
    }
}

/// `"<id> <epoch> <json>"`, as the publish script writes it. The JSON is checked: it is
/// spliced into every client's frame as is.
fn parse_payload(payload: &[u8]) -> Result<(u64, String, String), String> {
    let text =
        std::str::from_utf8(payload).map_err(|_| "message payload is not UTF-8".to_string())?;
    let mut parts = text.splitn(3, ' ');
    let (Some(id), Some(epoch), Some(data)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("message payload is not \"<id> <epoch> <data>\"".into());
    };
    let id: u64 = id
        .parse()
        .map_err(|_| format!("message id {id:?} is not a number"))?;
    if epoch.is_empty() {
        return Err("message without an epoch".into());
    }
    check_json(data)?;
    Ok((id, epoch.to_string(), data.to_string()))
}

/// `"!join <member>"` or `"!leave <member>"`; `None` for anything not starting `!`.
fn parse_presence_event(payload: &[u8]) -> Result<Option<(bool, String)>, String> {
    let Some(rest) = payload.strip_prefix(b"!") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(rest).map_err(|_| "presence event is not UTF-8".to_string())?;
    match text.split_once(' ') {
        Some(("join", m)) if !m.is_empty() => Ok(Some((true, m.to_string()))),
        Some(("leave", m)) if !m.is_empty() => Ok(Some((false, m.to_string()))),
        _ => Err(format!("unexpected presence event {text:?}")),
    }
}

/// The presence read's reply: `[count, [member, conns, ...]]`, or `[count]` past the cap.
fn parse_presence(frame: OwnedFrame) -> Result<PresenceAnswer, String> {
    let bad = || format!("unexpected presence reply {frame:?}");
    let OwnedFrame::Array(items) = &frame else {
        return Err(bad());
    };
    let count = match items.first() {
        Some(OwnedFrame::Integer(n)) if *n >= 0 => *n as usize,
        _ => return Err(bad()),
    };
    let members = match items.get(1) {
        None => None,
        Some(OwnedFrame::Array(flat)) => {
            let mut members = Vec::with_capacity(flat.len() / 2);
            for pair in flat.chunks(2) {
                let [OwnedFrame::BulkString(m), OwnedFrame::BulkString(n)] = pair else {
                    return Err(bad());
                };
                let m = std::str::from_utf8(m).map_err(|_| bad())?;
                let n = std::str::from_utf8(n)
                    .ok()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(bad)?;
                members.push((m.to_string(), n));
            }
            Some(members)
        }
        Some(_) => return Err(bad()),
    };
    Ok(PresenceAnswer { count, members })
}

fn check_json(data: &str) -> Result<(), String> {
    serde_json::from_str::<&serde_json::value::RawValue>(data)
        .map(|_| ())
        .map_err(|e| format!("message data is not JSON: {e}"))
}

/// The read script's reply: `[epoch, last id, [id-0, data, id-0, data, ...]]`.
fn parse_stored(frame: OwnedFrame) -> Result<Stored, String> {
    let bad = || format!("unexpected history reply {frame:?}");
    let OwnedFrame::Array(items) = &frame else {
        return Err(bad());
    };
    let [
        OwnedFrame::BulkString(epoch),
        OwnedFrame::Integer(last),
        OwnedFrame::Array(flat),
    ] = items.as_slice()
    else {
        return Err(bad());
    };
    let epoch = String::from_utf8(epoch.clone()).map_err(|_| bad())?;
    let last_id = u64::try_from(*last).map_err(|_| bad())?;
    let mut messages = Vec::with_capacity(flat.len() / 2);
    for pair in flat.chunks(2) {
        let [OwnedFrame::BulkString(entry), OwnedFrame::BulkString(data)] = pair else {
            return Err(bad());
        };
        let id = std::str::from_utf8(entry)
            .ok()
            .and_then(|e| e.strip_suffix("-0"))
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(bad)?;
        let data = String::from_utf8(data.clone()).map_err(|_| bad())?;
        check_json(&data)?;
        messages.push((id, data));
    }
    Ok(Stored {
        epoch,
        last_id,
        messages,
    })
}

/// Some bits of the wall clock, to seed the epoch generator.
fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Append one command (an array of bulk strings) to `out`.
fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    let parts: Vec<BorrowedFrame> = args.iter().map(|a| BorrowedFrame::BulkString(a)).collect();
    let frame = BorrowedFrame::Array(&parts);
    let start = out.len();
    out.resize(start + frame.encode_len(false), 0);
    let written = encode_borrowed(&mut out[start..], &frame, false)
        .expect("the buffer was sized for the frame");
    out.truncate(start + written);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_carry_host_port_auth_and_db() {
        let c = parse_url("redis://127.0.0.1:6390/2", "h:").unwrap();
        assert_eq!(
            (c.addr.as_str(), c.db, c.password.as_deref()),
            ("127.0.0.1:6390", 2, None)
        );
        let c = parse_url("redis://:s3cret@redis.internal", "h:").unwrap();
        assert_eq!(
            (c.addr.as_str(), c.password.as_deref(), c.username),
            ("redis.internal:6379", Some("s3cret"), None)
        );
        let c = parse_url("redis://app:pw@10.0.0.5:7000/", "h:").unwrap();
        assert_eq!(
            (c.username.as_deref(), c.password.as_deref(), c.db),
            (Some("app"), Some("pw"), 0)
        );
        assert!(parse_url("http://x", "h:").is_err());
        assert!(parse_url("redis://x/db", "h:").is_err());
        assert!(parse_url("redis://", "h:").is_err());
    }

    #[test]
    fn commands_are_resp_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        command(&mut out, &[b"SUBSCRIBE", b"h:news"]);
        assert_eq!(out, b"*2\r\n$9\r\nSUBSCRIBE\r\n$6\r\nh:news\r\n");
    }

    #[test]
    fn presence_events_and_reads_parse_and_strangers_are_errors() {
        assert_eq!(
            parse_presence_event(b"!join 42"),
            Ok(Some((true, "42".into())))
        );
        assert_eq!(
            parse_presence_event(b"!leave anon:ab.7"),
            Ok(Some((false, "anon:ab.7".into())))
        );
        assert_eq!(parse_presence_event(b"7 e1 {}"), Ok(None));
        assert!(parse_presence_event(b"!dance 42").is_err());
        assert!(parse_presence_event(b"!join ").is_err());
        let bulk = |s: &str| OwnedFrame::BulkString(s.as_bytes().to_vec());
        let listed = OwnedFrame::Array(vec![
            OwnedFrame::Integer(1),
            OwnedFrame::Array(vec![bulk("42"), bulk("2")]),
        ]);
        assert_eq!(
            parse_presence(listed),
            Ok(PresenceAnswer {
                count: 1,
                members: Some(vec![("42".into(), 2)])
            })
        );
        let capped = OwnedFrame::Array(vec![OwnedFrame::Integer(5000)]);
        assert_eq!(parse_presence(capped).unwrap().members, None);
        let odd = OwnedFrame::Array(vec![
            OwnedFrame::Integer(1),
            OwnedFrame::Array(vec![bulk("42")]),
        ]);
        assert!(parse_presence(odd).is_err());
        assert!(parse_presence(bulk("x")).is_err());
    }

    #[test]
    fn payloads_are_an_id_and_json() {
        assert_eq!(
            parse_payload(br#"7 e1 {"a":[1,2]}"#),
            Ok((7, "e1".to_string(), r#"{"a":[1,2]}"#.to_string()))
        );
        // Spaces inside the JSON stay in the data.
        assert_eq!(
            parse_payload(br#"8 e1 {"a": "b c"}"#),
            Ok((8, "e1".to_string(), r#"{"a": "b c"}"#.to_string()))
        );
        assert!(parse_payload(b"7").is_err());
        assert!(parse_payload(b"7 {}").is_err());
        assert!(parse_payload(b"x e {}").is_err());
        assert!(parse_payload(b"7 e {not json").is_err());
        assert!(parse_payload(&[0xff, b' ', b'1']).is_err());
    }

    fn redis() -> Redis {
        let cfg = parse_url("redis://127.0.0.1:1", "h:").unwrap();
        Redis::new(cfg, Instant::now())
    }

    #[test]
    fn pushes_become_events_and_strangers_are_errors() {
        let mut r = redis();
        let mut events = Vec::new();
        let bulk = |s: &str| OwnedFrame::BulkString(s.as_bytes().to_vec());
        let push = |items: Vec<OwnedFrame>| OwnedFrame::Array(items);
        r.on_push(
            push(vec![
                bulk("subscribe"),
                bulk("h:news"),
                OwnedFrame::Integer(1),
            ]),
            &mut events,
        )
        .unwrap();
        r.on_push(
            push(vec![bulk("message"), bulk("h:news"), bulk("3 e7 \"hi\"")]),
            &mut events,
        )
        .unwrap();
        assert_eq!(
            events,
            [
                Event::Confirmed {
                    topic: "news".into()
                },
                Event::Message {
                    topic: "news".into(),
                    id: 3,
                    epoch: "e7".into(),
                    data: "\"hi\"".into()
                }
            ]
        );
        assert!(r.is_confirmed("news"));
        assert!(
            r.on_push(
                push(vec![bulk("message"), bulk("other:news"), bulk("1 e 1")]),
                &mut events
            )
            .is_err()
        );
        assert!(
            r.on_push(
                push(vec![bulk("message"), bulk("h:news"), bulk("garbage")]),
                &mut events
            )
            .is_err()
        );
        assert!(r.on_push(OwnedFrame::Integer(1), &mut events).is_err());
        // A pong nobody asked for is unexpected too.
        assert!(
            r.on_push(push(vec![bulk("pong"), bulk("")]), &mut events)
                .is_err()
        );
    }

    #[test]
    fn publish_replies_match_the_oldest_command() {
        let mut r = redis();
        r.command.phase = Phase::Ready;
        r.subscription.phase = Phase::Ready;
        r.up = true;
        let now = Instant::now();
        assert!(r.publish("t", "1", Some(10), now));
        assert!(r.publish("t", "2", None, now));
        assert!(r.publish("t", "3", Some(12), now));
        let mut events = Vec::new();
        let reply =
            |id, n| OwnedFrame::Array(vec![OwnedFrame::Integer(id), OwnedFrame::Integer(n)]);
        r.on_frame(Role::Command, reply(5, 2), &mut events).unwrap();
        r.on_frame(Role::Command, reply(6, 2), &mut events).unwrap();
        r.on_frame(Role::Command, OwnedFrame::Error("OOM".into()), &mut events)
            .unwrap();
        assert_eq!(
            events,
            [
                Event::Published {
                    tag: 10,
                    result: Ok((5, 2))
                },
                Event::Published {
                    tag: 12,
                    result: Err("OOM".into())
                }
            ]
        );
        // A reply with nothing waiting for it means we lost track: an error.
        assert!(r.on_frame(Role::Command, reply(7, 1), &mut events).is_err());
        // The EVAL went out as one command per publish.
        assert_eq!(
            r.command.output.windows(4).filter(|w| w == b"EVAL").count(),
            3
        );
    }

    #[test]
    fn history_replies_parse_into_positions_and_messages() {
        let bulk = |s: &str| OwnedFrame::BulkString(s.as_bytes().to_vec());
        let reply = OwnedFrame::Array(vec![
            bulk("e1"),
            OwnedFrame::Integer(7),
            OwnedFrame::Array(vec![bulk("6-0"), bulk("{\"a\":1}"), bulk("7-0"), bulk("2")]),
        ]);
        assert_eq!(
            parse_stored(reply),
            Ok(Stored {
                epoch: "e1".into(),
                last_id: 7,
                messages: vec![(6, "{\"a\":1}".into()), (7, "2".into())],
            })
        );
        let odd = OwnedFrame::Array(vec![
            bulk("e1"),
            OwnedFrame::Integer(7),
            OwnedFrame::Array(vec![bulk("6-0")]),
        ]);
        assert!(parse_stored(odd).is_err());
        let not_json = OwnedFrame::Array(vec![
            bulk("e1"),
            OwnedFrame::Integer(1),
            OwnedFrame::Array(vec![bulk("1-0"), bulk("{oops")]),
        ]);
        assert!(parse_stored(not_json).is_err());
        assert!(parse_stored(OwnedFrame::Integer(3)).is_err());
    }

    #[test]
    fn reads_and_publishes_share_the_command_links_order() {
        let mut r = redis();
        r.command.phase = Phase::Ready;
        r.subscription.phase = Phase::Ready;
        r.up = true;
        let now = Instant::now();
        assert!(r.publish("t", "1", Some(10), now));
        assert!(r.read_history("t", Some(0), Some("e1"), 77, now));
        let mut events = Vec::new();
        let published = OwnedFrame::Array(vec![OwnedFrame::Integer(1), OwnedFrame::Integer(1)]);
        r.on_frame(Role::Command, published, &mut events).unwrap();
        let read = OwnedFrame::Array(vec![
            OwnedFrame::BulkString(b"e1".to_vec()),
            OwnedFrame::Integer(1),
            OwnedFrame::Array(vec![]),
        ]);
        r.on_frame(Role::Command, read, &mut events).unwrap();
        assert_eq!(
            events,
            [
                Event::Published {
                    tag: 10,
                    result: Ok((1, 1))
                },
                Event::Read {
                    tag: 77,
                    result: Ok(Stored {
                        epoch: "e1".into(),
                        last_id: 1,
                        messages: vec![],
                    })
                }
            ]
        );
    }
}
