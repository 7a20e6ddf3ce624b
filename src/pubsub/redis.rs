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

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::encode::encode_borrowed;
use redis_protocol::resp2::types::{BorrowedFrame, OwnedFrame};

use crate::pubsub::cluster::{self, Range, Redirect};

pub const COMMAND_TOKEN: Token = Token(usize::MAX - 3);
pub const SUBSCRIPTION_TOKEN: Token = Token(usize::MAX - 4);
/// The link to one Sentinel (with `--redis-sentinel`): where the master is, and
/// `+switch-master` when it moves.
pub const SENTINEL_TOKEN: Token = Token(usize::MAX - 6);

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

/// With `--redis-wait-replicas`: how long WAIT waits for the replicas (under
/// `REPLY_TIMEOUT`, so a WAIT never looks like a stuck link).
const WAIT_TIMEOUT_MS: &str = "1000";
/// A data link that fails asks the Sentinels again where the master is, at most this
/// often (a `+switch-master` missed while no Sentinel link was up is found this way).
const SENTINEL_REASK: Duration = Duration::from_secs(1);

/// Cluster shards beyond the first get tokens below this, two each.
const SHARD_TOKENS_BELOW: usize = usize::MAX - 16;
/// The most Cluster masters herald follows (each has two links and two tokens).
pub const MAX_SHARDS: usize = 64;
/// The lowest token any Redis link uses: every other token owner stays below it (the
/// reactor checks the app client's range against it).
pub const LOWEST_TOKEN: usize = SHARD_TOKENS_BELOW - 2 * MAX_SHARDS;

/// The tokens of node `index`'s command and subscription links.
fn node_tokens(index: usize) -> (Token, Token) {
    if index == 0 {
        (COMMAND_TOKEN, SUBSCRIPTION_TOKEN)
    } else {
        let base = SHARD_TOKENS_BELOW - 2 * index;
        (Token(base), Token(base - 1))
    }
}

/// Whether `token` is one of the Redis links' (the reactor hands those to `on_ready`).
pub fn owns(token: Token) -> bool {
    token == COMMAND_TOKEN
        || token == SUBSCRIPTION_TOKEN
        || token == SENTINEL_TOKEN
        || (LOWEST_TOKEN..SHARD_TOKENS_BELOW).contains(&token.0)
}

/// Channels per SUBSCRIBE command when subscribing again after a reconnect.
const SUBSCRIBE_BATCH: usize = 512;

/// The epoch, set to the candidate ARGV[1] (and the stream cleared) when it is missing.
/// KEYS: [1] id counter, [2] epoch key, [3] history stream, [4] the master generation
/// (`<prefix>gen`, set with Sentinel only: see `GEN_LUA`). An epoch ends in `.<gen>`
/// while there is a generation; one from an earlier master is replaced by a fresh epoch,
/// keeping the stream (what the new master holds, which resumes from the old epoch get,
/// with `recovered:false`). Shared by both scripts: a macro, so each script is one
/// literal and a publish formats none of it.
///
/// On a Cluster shard (ARGV[6], this master's replication id, not empty) KEYS[4] is per
/// topic instead: the replication id of the master that last vouched for its epoch. A
/// master promoted from that one (ARGV[7], its `master_replid2`) gives the topic a fresh
/// epoch, as above; a master the slot migrated to (MIGRATE copies every key as it is)
/// only vouches for it from now on.
macro_rules! epoch_lua {
    () => {
        "local epoch = redis.call('GET', KEYS[2]) local gen = redis.call('GET', KEYS[4]) \
     local shard = ARGV[6] ~= '' local fresh = ARGV[1] \
     if gen and not shard then fresh = fresh .. '.' .. gen end \
     if not epoch then epoch = fresh redis.call('SET', KEYS[2], epoch) \
     redis.call('DEL', KEYS[3]) \
     elseif shard and gen == ARGV[7] then epoch = fresh redis.call('SET', KEYS[2], epoch) \
     elseif gen and not shard and string.sub(epoch, -(#gen + 1)) ~= '.' .. gen then \
     epoch = fresh redis.call('SET', KEYS[2], epoch) end \
     if shard and gen ~= ARGV[6] then redis.call('SET', KEYS[4], ARGV[6]) end \
     local t = redis.call('TIME') local ms = t[1] * 1000 + math.floor(t[2] / 1000) "
    };
}

/// INCR the topic's id, append to its history (ARGV[3] entries at most, ARGV[4] ms), and
/// PUBLISH (or SPUBLISH: ARGV[5]) "<id> <epoch> <data>" on its channel (KEYS[5]),
/// atomically.
const PUBLISH_LUA: &str = concat!(
    epoch_lua!(),
    "local id = redis.call('INCR', KEYS[1]) \
     if tonumber(ARGV[3]) > 0 then \
     redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], id .. '-0', 't', ms, 'd', ARGV[2]) \
     redis.call('PEXPIRE', KEYS[3], ARGV[4]) end \
     local n = redis.call(ARGV[5], KEYS[5], id .. ' ' .. epoch .. ' ' .. ARGV[2]) \
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

/// Run on a master when a link to it opens (Sentinel only): KEYS [1] the replication id
/// of the master that last set the generation, [2] the generation; ARGV [1] this master's
/// replication id (INFO's `master_replid`), [2] a fresh generation. A promoted replica,
/// or a master restarted without its data, has a replication id of its own, so the first
/// herald to reach it starts a new generation, and with it a new epoch for every topic:
/// replication is asynchronous, so what clients saw from the old master may be missing
/// here, and ids would be reused.
const GEN_LUA: &str = "if redis.call('GET', KEYS[1]) ~= ARGV[1] then \
     redis.call('SET', KEYS[1], ARGV[1]) redis.call('SET', KEYS[2], ARGV[2]) end \
     return redis.call('GET', KEYS[2])";

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
    /// `--redis-sentinel` and `--redis-master`: the master is found, and followed, there
    /// (`addr` is then unused).
    pub sentinel: Option<SentinelConfig>,
    /// `--redis-wait-replicas`: replicas that must have a publish before it is
    /// acknowledged (0: no WAIT).
    pub wait_replicas: u32,
    /// `--redis-cluster`: seed nodes (host:port) of a Redis Cluster (`addr` unused).
    pub cluster: Option<Vec<String>>,
}

/// `--redis-cluster HOST:PORT,...`: at least one seed.
pub fn cluster_seeds(list: &str) -> Result<Vec<String>, String> {
    let mut seeds = Vec::new();
    for addr in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                seeds.push(addr.to_string());
            }
            _ => return Err(format!("--redis-cluster: {addr:?} is not HOST:PORT")),
        }
    }
    if seeds.is_empty() {
        return Err("--redis-cluster names no node".into());
    }
    Ok(seeds)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelConfig {
    /// host:port of each Sentinel, tried in turn.
    pub addrs: Vec<String>,
    /// The master's name at the Sentinels.
    pub master: String,
}

/// `--redis-sentinel HOST:PORT,...` with `--redis-master NAME`: both or neither.
pub fn sentinel_config(
    list: Option<&str>,
    master: Option<&str>,
) -> Result<Option<SentinelConfig>, String> {
    let (list, master) = match (list, master) {
        (None, None) => return Ok(None),
        (Some(_), None) => return Err("--redis-sentinel needs --redis-master NAME".into()),
        (None, Some(_)) => return Err("--redis-master needs --redis-sentinel".into()),
        (Some(list), Some(master)) => (list, master),
    };
    let mut addrs = Vec::new();
    for addr in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                addrs.push(addr.to_string());
            }
            _ => return Err(format!("--redis-sentinel: {addr:?} is not HOST:PORT")),
        }
    }
    if addrs.is_empty() {
        return Err("--redis-sentinel names no Sentinel".into());
    }
    if master.is_empty() || master.contains(char::is_whitespace) {
        return Err(format!("--redis-master: {master:?} is not a master name"));
    }
    Ok(Some(SentinelConfig {
        addrs,
        master: master.to_string(),
    }))
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
        sentinel: None,
        wait_replicas: 0,
        cluster: None,
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
    /// A `script` finished: its reply as strings (an integer, a bulk string, or an array of
    /// them, flattened), or the error.
    Script {
        tag: u64,
        result: Result<Vec<String>, String>,
    },
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
    /// A publish; the tag names the HTTP response waiting for it, if any (none when a
    /// WAIT follows: the answer is the WAIT's).
    Publish(Option<u64>),
    /// The WAIT after a publish (`--redis-wait-replicas`).
    Wait(Option<u64>),
    /// A read for a subscription.
    Read(u64),
    /// The delivery probe's PUBLISH (its reply, a count, tells nothing).
    Probe,
    /// A presence change, heartbeat or sync (its reply tells nothing).
    Presence,
    /// A presence read.
    PresenceRead(u64),
    /// Another module's script (`script`), whose reply goes back by tag.
    Script(u64),
    /// `CLUSTER SLOTS`.
    Slots,
    /// `ASKING` before a command redirected by `ASK` (its `OK` tells nothing).
    Asking,
}

/// What a Cluster shard asks of the `Redis` above it, beside its `Event`s.
#[derive(Debug)]
enum Internal {
    /// A command answered with a redirection: send `bytes` again where it says.
    Redirect {
        redirect: Redirect,
        pending: Pending,
        bytes: Vec<u8>,
    },
    /// The reply to `ask_slots`.
    Slots(Result<Vec<Range>, String>),
    /// The shard no longer serves this topic's channel (its slot moved): Redis ended our
    /// subscription, or refused it (`MOVED` on the subscription link: `None`, every topic
    /// is routed again).
    Unrouted(Option<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Down,
    Connecting,
    /// Connected; waiting for the link's `steps`.
    Handshaking,
    Ready,
}

/// A handshake reply awaited, in the order the commands went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// AUTH, SELECT, PING: `OK` or `PONG`.
    Ok,
    /// `INFO replication` (Sentinel): the link must have reached a master.
    Master,
    /// The generation script's answer (`GEN_LUA`).
    Generation,
    /// `SENTINEL get-master-addr-by-name`.
    MasterAddr,
    /// The Sentinel's confirmation of `SUBSCRIBE +switch-master`.
    Watching,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Command,
    Subscription,
    Sentinel,
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
    steps: VecDeque<Step>,
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
            steps: VecDeque::new(),
        }
    }

    fn name(&self) -> &'static str {
        match self.role {
            Role::Command => "command",
            Role::Subscription => "subscription",
            Role::Sentinel => "sentinel",
        }
    }
}

#[derive(Debug, Default)]
pub struct RedisCounters {
    pub reconnects: u64,
    /// Links reset for a malformed or unexpected reply, or a stuck command.
    pub errors: u64,
    /// Times the Sentinels named a new master.
    pub failovers: u64,
    /// Publishes answered 503 because WAIT found fewer replicas than required.
    pub unreplicated: u64,
    /// Cluster: commands sent again after `MOVED`, `ASK` or `TRYAGAIN`.
    pub redirects: u64,
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

/// One Redis master and herald's links to it: the whole of Redis for `--redis` and
/// `--redis-sentinel`, one shard of `--redis-cluster`.
struct Node {
    cfg: RedisConfig,
    command: Link,
    subscription: Link,
    /// With Sentinel: the link to one of them (`sentinel_at` in the list).
    sentinel: Link,
    sentinel_at: usize,
    /// When the Sentinels were last asked where the master is.
    sentinel_asked: Option<Instant>,
    /// Where the data links connect: `--redis`'s address, or the master the Sentinels
    /// named (`None` until they have).
    master: Option<String>,
    /// A master address the Sentinel link just learned, applied after its frames.
    learned: Option<String>,
    /// A publish's result waiting for its WAIT's reply.
    staged: Option<Result<(u64, u64), String>>,
    /// A Cluster shard: sharded pub/sub (SSUBSCRIBE, SPUBLISH) and `{topic}` keys.
    sharded: bool,
    /// Sharded: what the `Redis` above must act on (redirections, slot maps).
    internal: Vec<Internal>,
    /// Sharded: this master's `master_replid` and `master_replid2` (see `epoch_lua`),
    /// from `INFO replication` when a link opens; empty otherwise.
    replid: String,
    replid2: String,
    /// Commands sent on the command link, oldest first, with when they were sent.
    /// On a Cluster shard each also keeps its bytes, to send again where a redirection
    /// says (empty otherwise). Queue commands with `record`.
    in_flight: VecDeque<(Pending, Instant, Vec<u8>)>,
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

impl Node {
    /// `index` picks the node's tokens; `shard`: the address of this Cluster master.
    fn new(cfg: RedisConfig, now: Instant, index: usize, shard: Option<String>) -> Node {
        let probe_channel = match &shard {
            // A Cluster node's probe travels on a channel of a slot it serves, named
            // by `set_probe` once the slot map is known.
            Some(_) => String::new(),
            None => format!("{}!probe:{}", cfg.prefix, std::process::id()),
        };
        let master = match (&shard, &cfg.sentinel) {
            (Some(addr), _) => {
                info!("redis: connecting to Cluster master {addr}");
                Some(addr.clone())
            }
            (None, Some(s)) => {
                info!(
                    "redis: asking the Sentinels {} for master {:?} (channel prefix {:?})",
                    s.addrs.join(","),
                    s.master,
                    cfg.prefix
                );
                None
            }
            (None, None) => {
                info!(
                    "redis: connecting to {} (channel prefix {:?})",
                    cfg.addr, cfg.prefix
                );
                Some(cfg.addr.clone())
            }
        };
        let sharded = shard.is_some();
        let (command_token, subscription_token) = node_tokens(index);
        let mut redis = Node {
            cfg,
            sharded,
            internal: Vec::new(),
            replid: String::new(),
            replid2: String::new(),
            command: Link::new(Role::Command, command_token, now),
            subscription: Link::new(Role::Subscription, subscription_token, now),
            sentinel: Link::new(Role::Sentinel, SENTINEL_TOKEN, now),
            sentinel_at: 0,
            sentinel_asked: None,
            master,
            learned: None,
            staged: None,
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

    fn owns(&self, token: Token) -> bool {
        token == self.command.token
            || token == self.subscription.token
            || (self.cfg.sentinel.is_some() && token == self.sentinel.token)
    }

    fn addr_name(&self) -> &str {
        self.master.as_deref().unwrap_or("no master yet")
    }

    /// The command link is down after a failed attempt.
    fn command_failed(&self) -> bool {
        self.command.phase == Phase::Down && self.command.attempt > 0
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
        self.up
            || self.command.attempt > 0
            || self.subscription.attempt > 0
            || self.sentinel.attempt > 0
    }

    /// The links in use: the Sentinel link only with `--redis-sentinel`.
    fn roles(&self) -> &'static [Role] {
        if self.cfg.sentinel.is_some() {
            &[Role::Command, Role::Subscription, Role::Sentinel]
        } else {
            &[Role::Command, Role::Subscription]
        }
    }

    /// Where `role`'s link connects: a Sentinel, or the master (`None`: not known yet).
    fn addr(&self, role: Role) -> Option<String> {
        match (role, &self.cfg.sentinel) {
            (Role::Sentinel, Some(s)) => s.addrs.get(self.sentinel_at).cloned(),
            (Role::Sentinel, None) => None,
            _ => self.master.clone(),
        }
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
        let retries = self.roles().iter().filter_map(|&role| {
            let l = self.link(role);
            match l.phase {
                Phase::Down if self.addr(role).is_some() => Some(l.retry_at),
                Phase::Down => None,
                Phase::Connecting | Phase::Handshaking => Some(l.since + REPLY_TIMEOUT),
                Phase::Ready => None,
            }
        });
        let stuck = self.in_flight.front().map(|(_, at, _)| *at + REPLY_TIMEOUT);
        let probe = match self.probe.sent {
            Some((_, at)) => at + PROBE_TIMEOUT,
            None => self.probe.next_at,
        };
        let probe = (self.up && self.probe.subscribed).then_some(probe);
        retries.chain(stuck).chain(probe).min()
    }

    /// Reconnect links whose time has come; reset a link whose oldest command is stuck.
    pub fn tick(&mut self, now: Instant, registry: &Registry, events: &mut Vec<Event>) {
        for &role in self.roles() {
            let link = self.link(role);
            if link.phase == Phase::Down && link.retry_at <= now {
                if self.addr(role).is_some() {
                    self.connect(role, registry, now, events);
                }
            } else if matches!(link.phase, Phase::Connecting | Phase::Handshaking)
                && now.duration_since(link.since) >= REPLY_TIMEOUT
            {
                let why = "no answer to the handshake within 5 s";
                self.reset(role, why, registry, now, events);
            }
        }
        if self
            .in_flight
            .front()
            .is_some_and(|(_, at, _)| now.duration_since(*at) >= REPLY_TIMEOUT)
        {
            self.counters.errors += 1;
            self.reset(Role::Command, "no reply within 5 s", registry, now, events);
        }
        if self.tick_probe(now, events) {
            // Both links up and delivery broken: with Sentinel, maybe one link is on a
            // node that is no longer the master. Ask again; a new answer moves both.
            self.reask_sentinels(registry, now, events);
        }
    }

    /// Reconnect the Sentinel link (to the next Sentinel) so it asks where the master is,
    /// unless it asked less than `SENTINEL_REASK` ago or is not up.
    fn reask_sentinels(&mut self, registry: &Registry, now: Instant, events: &mut Vec<Event>) {
        if self.cfg.sentinel.is_some()
            && self.sentinel.phase == Phase::Ready
            && self
                .sentinel_asked
                .is_none_or(|at| now.duration_since(at) >= SENTINEL_REASK)
        {
            self.reset(Role::Sentinel, "asking again", registry, now, events);
            self.sentinel.retry_at = now;
        }
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

    /// Send the next probe when due; a probe overdue is a broken delivery (true).
    fn tick_probe(&mut self, now: Instant, events: &mut Vec<Event>) -> bool {
        if !self.up || !self.probe.subscribed {
            return false;
        }
        let mut lost = false;
        if let Some((_, at)) = self.probe.sent
            && now.duration_since(at) >= PROBE_TIMEOUT
        {
            self.probe.sent = None;
            self.probe.next_at = now;
            self.delivery(false, events);
            lost = true;
        }
        if self.probe.sent.is_none() && now >= self.probe.next_at {
            self.probe.seq += 1;
            let seq = self.probe.seq.to_string();
            let channel = self.probe.channel.clone();
            let start = self.command.output.len();
            let publish: &[u8] = if self.sharded {
                b"SPUBLISH"
            } else {
                b"PUBLISH"
            };
            command(
                &mut self.command.output,
                &[publish, channel.as_bytes(), seq.as_bytes()],
            );
            self.record(Pending::Probe, start, now);
            self.probe.sent = Some((self.probe.seq, now));
            self.probe.next_at = now + PROBE_INTERVAL;
        }
        lost
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
        let [id_key, epoch_key, stream, gen_key] = self.keys(topic);
        let channel = self.channel(topic);
        let epoch = self.fresh_epoch();
        let size = self.cfg.history_size.to_string();
        let ttl = self.cfg.history_ttl.as_millis().max(1).to_string();
        let publish: &[u8] = if self.sharded {
            b"SPUBLISH"
        } else {
            b"PUBLISH"
        };
        let start = self.command.output.len();
        command(
            &mut self.command.output,
            &[
                b"EVAL",
                PUBLISH_LUA.as_bytes(),
                b"5",
                id_key.as_bytes(),
                epoch_key.as_bytes(),
                stream.as_bytes(),
                gen_key.as_bytes(),
                channel.as_bytes(),
                epoch.as_bytes(),
                data.as_bytes(),
                size.as_bytes(),
                ttl.as_bytes(),
                publish,
                self.replid.as_bytes(),
                self.replid2.as_bytes(),
            ],
        );
        if self.cfg.wait_replicas == 0 {
            self.record(Pending::Publish(tag), start, now);
            return true;
        }
        // The publisher hears only once the replicas have it: a master that dies after
        // the EVAL but before replicating it answers nothing, and the link's reset
        // answers 503.
        let replicas = self.cfg.wait_replicas.to_string();
        command(
            &mut self.command.output,
            &[b"WAIT", replicas.as_bytes(), WAIT_TIMEOUT_MS.as_bytes()],
        );
        self.in_flight
            .push_back((Pending::Publish(None), now, Vec::new()));
        self.in_flight
            .push_back((Pending::Wait(tag), now, Vec::new()));
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
        let [id_key, epoch_key, stream, gen_key] = self.keys(topic);
        let epoch = self.fresh_epoch();
        let since = since.map_or("-1".to_string(), |n| n.to_string());
        let ttl = self.cfg.history_ttl.as_millis().to_string();
        // MAXLEN ~ may keep up to one stream node (100 entries) beyond the size.
        let count = (self.cfg.history_size + 100).to_string();
        let start = self.command.output.len();
        command(
            &mut self.command.output,
            &[
                b"EVAL",
                READ_LUA.as_bytes(),
                b"4",
                id_key.as_bytes(),
                epoch_key.as_bytes(),
                stream.as_bytes(),
                gen_key.as_bytes(),
                epoch.as_bytes(),
                since.as_bytes(),
                ttl.as_bytes(),
                count.as_bytes(),
                client_epoch.unwrap_or("").as_bytes(),
                self.replid.as_bytes(),
                self.replid2.as_bytes(),
            ],
        );
        self.record(Pending::Read(tag), start, now);
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
        let start = self.command.output.len();
        command(&mut self.command.output, &args);
        self.record(pending, start, now);
        true
    }

    /// Run another module's Lua `script` (EVAL) on the command link; the reply comes back
    /// as `Event::Script` with `tag`. Keys are named in full by the caller (see `prefix`).
    /// False when Redis is down.
    pub fn script(
        &mut self,
        script: &str,
        keys: &[&str],
        args: &[&str],
        tag: u64,
        now: Instant,
    ) -> bool {
        if !self.up {
            return false;
        }
        let count = keys.len().to_string();
        let mut parts: Vec<&[u8]> = vec![b"EVAL", script.as_bytes(), count.as_bytes()];
        parts.extend(keys.iter().chain(args).map(|a| a.as_bytes()));
        let start = self.command.output.len();
        command(&mut self.command.output, &parts);
        self.record(Pending::Script(tag), start, now);
        true
    }

    /// `--redis-prefix`: the start of every key and channel herald uses.
    pub fn prefix(&self) -> &str {
        &self.cfg.prefix
    }

    /// The topic's id counter, epoch key and history stream, and the master generation.
    /// On a Cluster shard each carries `{topic}`, so they share the topic's slot (the
    /// generation key too, which no one sets there: a shard's failover is not followed).
    fn keys(&self, topic: &str) -> [String; 4] {
        let p = &self.cfg.prefix;
        if self.sharded {
            return [
                format!("{p}id:{{{topic}}}"),
                format!("{p}epoch:{{{topic}}}"),
                format!("{p}h:{{{topic}}}"),
                format!("{p}gen:{{{topic}}}"),
            ];
        }
        [
            format!("{p}id:{topic}"),
            format!("{p}epoch:{topic}"),
            format!("{p}h:{topic}"),
            format!("{p}gen"),
        ]
    }

    /// The topic's channel: `<prefix><topic>`, or `<prefix>{<topic>}` on a shard.
    fn channel(&self, topic: &str) -> String {
        if self.sharded {
            format!("{}{{{topic}}}", self.cfg.prefix)
        } else {
            format!("{}{topic}", self.cfg.prefix)
        }
    }

    /// A command just written to the command link from `start`: await its reply.
    fn record(&mut self, pending: Pending, start: usize, now: Instant) {
        let bytes = if self.sharded {
            self.command.output[start..].to_vec()
        } else {
            Vec::new()
        };
        self.in_flight.push_back((pending, now, bytes));
    }

    /// An epoch to propose for a topic that has none: 16 hex digits, no space (it travels
    /// inside "<id> <epoch> <data>").
    fn fresh_epoch(&mut self) -> String {
        format!("{:016x}", self.next_random())
    }

    fn subscribe_verb(&self) -> &'static [u8] {
        if self.sharded {
            b"SSUBSCRIBE"
        } else {
            b"SUBSCRIBE"
        }
    }

    fn subscribe(&mut self, topic: &str) {
        if self.subscription.phase == Phase::Ready {
            let channel = self.channel(topic);
            let verb = self.subscribe_verb();
            command(&mut self.subscription.output, &[verb, channel.as_bytes()]);
        }
    }

    fn unsubscribe(&mut self, topic: &str) {
        self.confirmed.remove(topic);
        if self.subscription.phase == Phase::Ready {
            let channel = self.channel(topic);
            let verb: &[u8] = if self.sharded {
                b"SUNSUBSCRIBE"
            } else {
                b"UNSUBSCRIBE"
            };
            command(&mut self.subscription.output, &[verb, channel.as_bytes()]);
        }
    }

    /// Subscribe again to every local topic (after `Event::SubscriptionReady`). A shard
    /// takes one channel per SSUBSCRIBE: several must be in one slot.
    fn resubscribe<'a>(&mut self, topics: impl Iterator<Item = &'a str>) {
        let channels: Vec<String> = topics.map(|t| self.channel(t)).collect();
        let batch = if self.sharded { 1 } else { SUBSCRIBE_BATCH };
        for batch in channels.chunks(batch) {
            let mut args: Vec<&[u8]> = vec![self.subscribe_verb()];
            args.extend(batch.iter().map(|c| c.as_bytes()));
            command(&mut self.subscription.output, &args);
        }
    }

    /// A shard's probe channel (`<prefix>!probe:<pid>:{<tag>}`, in a slot it serves):
    /// subscribed now if the link is ready, else when it is.
    fn set_probe(&mut self, tag: &str, pid: u32) {
        let channel = format!("{}!probe:{pid}:{{{tag}}}", self.cfg.prefix);
        if channel == self.probe.channel {
            return;
        }
        if self.subscription.phase == Phase::Ready && !self.probe.channel.is_empty() {
            let old = std::mem::take(&mut self.probe.channel);
            command(
                &mut self.subscription.output,
                &[b"SUNSUBSCRIBE", old.as_bytes()],
            );
        }
        self.probe.channel = channel;
        self.probe.subscribed = false;
        self.probe.sent = None;
        if self.subscription.phase == Phase::Ready {
            let channel = self.probe.channel.clone();
            command(
                &mut self.subscription.output,
                &[b"SSUBSCRIBE", channel.as_bytes()],
            );
        }
    }

    /// Ask the shard for the Cluster's slot map (`Internal::Slots`). False when its
    /// command link is not ready.
    fn ask_slots(&mut self, now: Instant) -> bool {
        if self.command.phase != Phase::Ready {
            return false;
        }
        let start = self.command.output.len();
        command(&mut self.command.output, &[b"CLUSTER", b"SLOTS"]);
        self.record(Pending::Slots, start, now);
        true
    }

    /// Send a redirected command here (after `ASKING` for an `ASK`). False when the
    /// command link is not ready: the caller fails it.
    fn resend(&mut self, pending: Pending, bytes: Vec<u8>, asking: bool, now: Instant) -> bool {
        if self.command.phase != Phase::Ready {
            return false;
        }
        if asking {
            let start = self.command.output.len();
            command(&mut self.command.output, &[b"ASKING"]);
            self.record(Pending::Asking, start, now);
        }
        self.command.output.extend_from_slice(&bytes);
        self.in_flight.push_back((pending, now, bytes));
        true
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
        let role = if token == self.command.token {
            Role::Command
        } else if token == self.sentinel.token {
            Role::Sentinel
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
            self.handshake(role, now);
        }
        self.read(role, registry, now, events);
    }

    /// Write what the loop queued this pass.
    pub fn flush(&mut self, registry: &Registry, now: Instant, events: &mut Vec<Event>) {
        for &role in self.roles() {
            let link = self.link_mut(role);
            let Some(stream) = link.stream.as_mut() else {
                continue;
            };
            if link.phase == Phase::Connecting {
                continue;
            }
            if let Err(why) = crate::outq::write_buffer(stream, &mut link.output) {
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
            Role::Sentinel => &self.sentinel,
        }
    }

    fn link_mut(&mut self, role: Role) -> &mut Link {
        match role {
            Role::Command => &mut self.command,
            Role::Subscription => &mut self.subscription,
            Role::Sentinel => &mut self.sentinel,
        }
    }

    fn connect(&mut self, role: Role, registry: &Registry, now: Instant, events: &mut Vec<Event>) {
        let Some(target) = self.addr(role) else {
            return;
        };
        let addr = match target.to_socket_addrs().map(|mut a| a.next()) {
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
        link.steps.clear();
    }

    /// Connected: authenticate and choose the database before anything else.
    fn handshake(&mut self, role: Role, now: Instant) {
        if role == Role::Sentinel {
            let name = self
                .cfg
                .sentinel
                .as_ref()
                .map(|s| s.master.clone())
                .unwrap_or_default();
            self.sentinel_asked = Some(now);
            let link = &mut self.sentinel;
            // The answer first, then the subscription: after SUBSCRIBE a RESP2
            // connection takes no other command.
            command(
                &mut link.output,
                &[b"SENTINEL", b"get-master-addr-by-name", name.as_bytes()],
            );
            command(&mut link.output, &[b"SUBSCRIBE", b"+switch-master"]);
            link.steps = VecDeque::from([Step::MasterAddr, Step::Watching]);
            link.phase = Phase::Handshaking;
            return;
        }
        let (user, pass, db) = (
            self.cfg.username.clone(),
            self.cfg.password.clone(),
            self.cfg.db,
        );
        let sentinel = self.cfg.sentinel.is_some();
        let sharded = self.sharded;
        let link = self.link_mut(role);
        link.steps.clear();
        match (&user, &pass) {
            (Some(u), Some(p)) => command(&mut link.output, &[b"AUTH", u.as_bytes(), p.as_bytes()]),
            (None, Some(p)) => command(&mut link.output, &[b"AUTH", p.as_bytes()]),
            _ => {}
        }
        if pass.is_some() {
            link.steps.push_back(Step::Ok);
        }
        // Pub/sub ignores databases; ids live in the command link's one.
        if role == Role::Command && db != 0 {
            command(&mut link.output, &[b"SELECT", db.to_string().as_bytes()]);
            link.steps.push_back(Step::Ok);
        }
        // The Sentinels' answer may be stale (a failover under way): a link that reached
        // a replica is reset, and asks them again.
        if sentinel || sharded {
            command(&mut link.output, &[b"INFO", b"replication"]);
            link.steps.push_back(Step::Master);
        }
        // A link is ready when Redis has answered, not when TCP connected: a frozen Redis
        // still completes connections from its kernel backlog.
        command(&mut link.output, &[b"PING"]);
        link.steps.push_back(Step::Ok);
        link.phase = Phase::Handshaking;
    }

    /// A handshake reply, checked against the step it answers.
    fn on_step(&mut self, role: Role, frame: OwnedFrame) -> Result<(), String> {
        let Some(step) = self.link_mut(role).steps.pop_front() else {
            return Err(format!("handshake reply {frame:?} to nothing"));
        };
        match (step, frame) {
            (_, OwnedFrame::Error(e)) => Err(format!("handshake refused: {e}")),
            (Step::Ok, OwnedFrame::SimpleString(s)) if s == b"OK" || s == b"PONG" => Ok(()),
            (Step::Master, OwnedFrame::BulkString(info)) => {
                let (replid, replid2) = master_ids(&info)?;
                if self.sharded {
                    // No process-wide generation on a Cluster: each publish and read
                    // carries the ids (`epoch_lua`).
                    self.replid = replid;
                    self.replid2 = replid2;
                } else if role == Role::Command {
                    let fresh = self.fresh_epoch();
                    let p = &self.cfg.prefix;
                    let (replid_key, gen_key) = (format!("{p}gen:replid"), format!("{p}gen"));
                    command(
                        &mut self.command.output,
                        &[
                            b"EVAL",
                            GEN_LUA.as_bytes(),
                            b"2",
                            replid_key.as_bytes(),
                            gen_key.as_bytes(),
                            replid.as_bytes(),
                            fresh.as_bytes(),
                        ],
                    );
                    // Answered after the PING already sent: no publish goes out before.
                    self.command.steps.push_back(Step::Generation);
                }
                Ok(())
            }
            (Step::Generation, OwnedFrame::BulkString(generation)) => {
                debug!(
                    "redis: master generation {}",
                    String::from_utf8_lossy(&generation)
                );
                Ok(())
            }
            (Step::MasterAddr, OwnedFrame::Array(items)) => match items.as_slice() {
                [OwnedFrame::BulkString(host), OwnedFrame::BulkString(port)] => {
                    self.learned = Some(host_port(host, port)?);
                    Ok(())
                }
                _ => Err(format!("unexpected master address {items:?}")),
            },
            (Step::MasterAddr, OwnedFrame::Null) => {
                Err("this Sentinel does not know the master".into())
            }
            (Step::Watching, OwnedFrame::Array(items)) if matches!(items.first(), Some(OwnedFrame::BulkString(k)) if k == b"subscribe") => {
                Ok(())
            }
            (step, other) => Err(format!("unexpected reply {other:?} to {step:?}")),
        }
    }

    /// A message on the Sentinel link: `+switch-master <name> <old ip> <old port> <new ip>
    /// <new port>`; another master's is ignored.
    fn on_sentinel_push(&mut self, frame: OwnedFrame) -> Result<(), String> {
        let bad = || format!("unexpected frame on the sentinel link: {frame:?}");
        let OwnedFrame::Array(items) = &frame else {
            return Err(bad());
        };
        let [
            OwnedFrame::BulkString(kind),
            OwnedFrame::BulkString(channel),
            OwnedFrame::BulkString(payload),
        ] = items.as_slice()
        else {
            return Err(bad());
        };
        if kind != b"message" || channel != b"+switch-master" {
            return Err(bad());
        }
        let text = std::str::from_utf8(payload).map_err(|_| bad())?;
        let parts: Vec<&str> = text.split(' ').collect();
        let [name, _, _, ip, port] = parts.as_slice() else {
            return Err(bad());
        };
        if self
            .cfg
            .sentinel
            .as_ref()
            .is_some_and(|s| s.master == *name)
        {
            info!("redis: the Sentinels switched master {name:?}: {text}");
            self.learned = Some(host_port(ip.as_bytes(), port.as_bytes())?);
        }
        Ok(())
    }

    /// Point the data links at the master the Sentinels named: links to another address
    /// are reset, links down retry now.
    fn follow_master(&mut self, registry: &Registry, now: Instant, events: &mut Vec<Event>) {
        let Some(addr) = self.learned.take() else {
            return;
        };
        // Just answered: a data link reset below must not ask again.
        self.sentinel_asked = Some(now);
        if self.master.as_deref() != Some(addr.as_str()) {
            match self.master.replace(addr.clone()) {
                Some(old) => {
                    self.counters.failovers += 1;
                    warn!("redis: the master moved from {old} to {addr}; reconnecting");
                }
                None => info!("redis: the Sentinels name {addr} as the master"),
            }
            for role in [Role::Command, Role::Subscription] {
                if self.link(role).phase != Phase::Down {
                    self.reset(role, "the master moved", registry, now, events);
                }
            }
        }
        for role in [Role::Command, Role::Subscription] {
            let link = self.link_mut(role);
            if link.phase == Phase::Down {
                link.retry_at = link.retry_at.min(now);
            }
        }
    }

    fn ready(&mut self, role: Role, events: &mut Vec<Event>) {
        let link = self.link_mut(role);
        link.phase = Phase::Ready;
        link.attempt = 0;
        debug!("redis: {} link ready", link.name());
        if role == Role::Subscription {
            let channel = self.probe.channel.clone();
            if !channel.is_empty() {
                let verb = self.subscribe_verb();
                command(&mut self.link_mut(role).output, &[verb, channel.as_bytes()]);
            }
            events.push(Event::SubscriptionReady);
        }
        self.report(events, None);
    }

    /// A command that will not be answered: whoever waits for it hears `why`.
    fn fail(&mut self, pending: Pending, why: &str, events: &mut Vec<Event>) {
        let why = || why.to_string();
        match pending {
            Pending::Publish(Some(tag)) | Pending::Wait(Some(tag)) => {
                events.push(Event::Published {
                    tag,
                    result: Err(why()),
                })
            }
            Pending::Publish(None)
            | Pending::Wait(None)
            | Pending::Probe
            | Pending::Presence
            | Pending::Asking => {}
            Pending::Slots => self.internal.push(Internal::Slots(Err(why()))),
            Pending::Script(tag) => events.push(Event::Script {
                tag,
                result: Err(why()),
            }),
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

    /// Log and report a change of the combined state, once per change.
    fn report(&mut self, events: &mut Vec<Event>, why: Option<&str>) {
        let up = self.command.phase == Phase::Ready && self.subscription.phase == Phase::Ready;
        if up == self.up {
            return;
        }
        self.up = up;
        let addr = self.master.as_deref().unwrap_or("master not known yet");
        if up {
            info!("redis: up ({addr})");
            events.push(Event::Up);
        } else {
            // A probe out when the link went down proves nothing either way.
            self.probe.sent = None;
            self.probe.ok = None;
            warn!(
                "redis: down ({addr}): {}; /publish answers 503 until it is back",
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
        link.steps.clear();
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
                self.staged = None;
                let pending: Vec<Pending> = self.in_flight.drain(..).map(|(p, ..)| p).collect();
                for pending in pending {
                    self.fail(pending, "redis unavailable", events);
                }
            }
            Role::Subscription => {
                self.confirmed.clear();
                self.pings = 0;
                self.probe.subscribed = false;
                self.probe.sent = None;
            }
            Role::Sentinel => {
                // The next Sentinel in the list, at once when the link was only asked to
                // ask again.
                let n = self.cfg.sentinel.as_ref().map_or(1, |s| s.addrs.len());
                self.sentinel_at = (self.sentinel_at + 1) % n.max(1);
                return;
            }
        }
        // A data link lost with Sentinel: the master may have moved while no
        // `+switch-master` reached us; ask again.
        self.reask_sentinels(registry, now, events);
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
        // A master address the Sentinel link learned is followed once its frames are in.
        self.follow_master(registry, now, events);
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
        if self.link(role).phase == Phase::Handshaking {
            self.on_step(role, frame)?;
            if self.link(role).steps.is_empty() {
                self.ready(role, events);
            }
            return Ok(());
        }
        match role {
            Role::Sentinel => self.on_sentinel_push(frame),
            Role::Command => {
                // The master we write to became a replica (an old master back after a
                // failover): nothing more will succeed here.
                if let OwnedFrame::Error(e) = &frame
                    && e.starts_with("READONLY")
                {
                    return Err(format!("the master is now a replica: {e}"));
                }
                let Some((pending, _, bytes)) = self.in_flight.pop_front() else {
                    return Err(format!("reply {frame:?} to no command"));
                };
                // A shard that does not serve the command's slot (any more, or not yet)
                // says where to go: the `Redis` above sends it there.
                if self.sharded
                    && let OwnedFrame::Error(e) = &frame
                    && let Some(redirect) = cluster::parse_redirect(e)
                {
                    self.internal.push(Internal::Redirect {
                        redirect,
                        pending,
                        bytes,
                    });
                    return Ok(());
                }
                let tag = match pending {
                    Pending::Probe | Pending::Asking => return Ok(()),
                    Pending::Slots => {
                        let addr = self.master.clone().unwrap_or_default();
                        let slots = match &frame {
                            OwnedFrame::Error(e) => Err(e.to_string()),
                            other => cluster::parse_slots(other, &addr),
                        };
                        self.internal.push(Internal::Slots(slots));
                        return Ok(());
                    }
                    Pending::Wait(tag) => {
                        let Some(staged) = self.staged.take() else {
                            return Err(format!("WAIT reply {frame:?} with no publish"));
                        };
                        let want = i64::from(self.cfg.wait_replicas);
                        let result = match (frame, staged) {
                            (OwnedFrame::Integer(n), Ok(r)) if n >= want => Ok(r),
                            (OwnedFrame::Integer(n), Ok(_)) => {
                                self.counters.unreplicated += 1;
                                warn!("redis: a publish reached {n} of {want} replicas in time");
                                Err(format!("replicated to {n} of {want} replicas"))
                            }
                            (OwnedFrame::Integer(_), Err(e)) | (OwnedFrame::Error(e), _) => Err(e),
                            (other, _) => return Err(format!("unexpected WAIT reply {other:?}")),
                        };
                        if let Some(tag) = tag {
                            events.push(Event::Published { tag, result });
                        }
                        return Ok(());
                    }
                    Pending::Presence => {
                        if let OwnedFrame::Error(e) = frame {
                            warn!("redis: presence update refused: {e}");
                        }
                        return Ok(());
                    }
                    Pending::PresenceRead(tag) => {
                        let result = answer(frame, "presence read", parse_presence)?;
                        events.push(Event::PresenceRead { tag, result });
                        return Ok(());
                    }
                    Pending::Script(tag) => {
                        let result = answer(frame, "script", flatten)?;
                        events.push(Event::Script { tag, result });
                        return Ok(());
                    }
                    Pending::Publish(tag) => tag,
                    Pending::Read(tag) => {
                        let result = answer(frame, "history read", parse_stored)?;
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
                // With WAIT, the answer is the WAIT's, next.
                if matches!(self.in_flight.front(), Some((Pending::Wait(_), ..))) {
                    self.staged = Some(result);
                } else if let Some(tag) = tag {
                    events.push(Event::Published { tag, result });
                }
                Ok(())
            }
            Role::Subscription => self.on_push(frame, events),
        }
    }

    /// Frames on the subscription link: messages, (un)subscribe confirmations, pongs.
    fn on_push(&mut self, frame: OwnedFrame, events: &mut Vec<Event>) -> Result<(), String> {
        let items = match frame {
            OwnedFrame::Array(items) => items,
            // A shard refusing an SSUBSCRIBE for a slot it does not serve.
            OwnedFrame::Error(e)
                if self.sharded
                    && matches!(cluster::parse_redirect(&e), Some(Redirect::Moved { .. })) =>
            {
                self.internal.push(Internal::Unrouted(None));
                return Ok(());
            }
            // Sharded subscriptions alone may leave PING its plain reply.
            OwnedFrame::SimpleString(s) if self.sharded && s == b"PONG" && self.pings > 0 => {
                self.pings -= 1;
                events.push(Event::Pong);
                return Ok(());
            }
            other => {
                return Err(format!(
                    "unexpected frame on the subscription link: {other:?}"
                ));
            }
        };
        let kind = match items.first() {
            Some(OwnedFrame::BulkString(k)) => match k.as_slice() {
                b"smessage" if self.sharded => b"message".as_slice(),
                b"ssubscribe" if self.sharded => b"subscribe",
                b"sunsubscribe" if self.sharded => b"unsubscribe",
                b"message" | b"subscribe" | b"unsubscribe" if self.sharded => {
                    return Err(format!("unsharded {items:?} on a shard"));
                }
                k => k,
            },
            _ => {
                return Err(format!(
                    "unexpected frame on the subscription link: {items:?}"
                ));
            }
        };
        let sharded = self.sharded;
        let channel_topic = |i: usize| -> Result<String, String> {
            let Some(OwnedFrame::BulkString(ch)) = items.get(i) else {
                return Err("channel missing".into());
            };
            let ch = std::str::from_utf8(ch).map_err(|_| "channel is not UTF-8".to_string())?;
            let topic = ch
                .strip_prefix(self.cfg.prefix.as_str())
                .ok_or_else(|| format!("channel {ch:?} lacks our prefix"))?;
            if !sharded {
                return Ok(topic.to_string());
            }
            topic
                .strip_prefix('{')
                .and_then(|t| t.strip_suffix('}'))
                .map(str::to_string)
                .ok_or_else(|| format!("channel {ch:?} is not a topic's shard channel"))
        };
        let is_probe = matches!(items.get(1), Some(OwnedFrame::BulkString(ch)) if *ch == self.probe.channel.as_bytes());
        if is_probe {
            if kind == b"subscribe" {
                self.probe.subscribed = true;
            }
            // The probe's slot moved: the map is stale.
            if kind == b"unsubscribe" && sharded {
                self.probe.subscribed = false;
                self.probe.sent = None;
                self.internal.push(Internal::Unrouted(None));
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
            // Ours (an unsubscribe removed it from `confirmed` first), or a shard ending
            // a subscription whose slot it no longer serves.
            b"unsubscribe" => {
                if sharded
                    && let Ok(topic) = channel_topic(1)
                    && self.confirmed.remove(&topic)
                {
                    self.internal.push(Internal::Unrouted(Some(topic)));
                }
            }
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

/// How soon a command answered `TRYAGAIN` (its keys split by a slot migration) goes again,
/// and how many times before it fails.
const TRYAGAIN_DELAY: Duration = Duration::from_millis(20);
const TRYAGAIN_MAX: u32 = 250;
const TRYAGAIN_MEMORY: Duration = Duration::from_secs(10);
/// The slot map is asked for again at most this often (after a redirection, a moved
/// subscription, or a failed ask).
const SLOTS_REFRESH_MIN: Duration = Duration::from_millis(100);
/// While a master serving slots is unreachable, the map is asked for this often: its
/// replica's promotion shows there.
const SLOTS_REFRESH_DOWN: Duration = Duration::from_secs(1);
/// `owner` of a slot no known master serves.
const NO_OWNER: u8 = u8::MAX;

/// Redis as the pipeline sees it: one node (`--redis`, `--redis-sentinel`), or every
/// master of a Cluster (`--redis-cluster`), each topic routed to the master of its slot,
/// with sharded pub/sub so a topic's messages stay within its shard.
pub struct Redis {
    nodes: Vec<Node>,
    cluster: Option<Cluster>,
}

/// The Cluster's routing state.
struct Cluster {
    seeds: Vec<String>,
    seed_at: usize,
    /// Per slot, the index in `nodes` of its master (`NO_OWNER` until the map says).
    owner: Vec<u8>,
    known: bool,
    /// A `CLUSTER SLOTS` is out; `stale`: one should be.
    asking: bool,
    stale: bool,
    asked_at: Option<Instant>,
    /// When this started: the first map is due from then.
    since: Instant,
    /// Every topic subscribed here, to route again when slots move.
    topics: HashSet<String>,
    /// Topics whose subscription a shard ended or refused: subscribed again where the
    /// next map says.
    unrouted: HashSet<String>,
    /// Commands answered `TRYAGAIN`, to send again to the same node: (when, node, what,
    /// bytes).
    retries: VecDeque<(Instant, usize, Pending, Vec<u8>)>,
    /// How often each of those commands (by its bytes: a publish's carry a fresh epoch
    /// candidate, so they are unique) met `TRYAGAIN`, and when first; forgotten after
    /// `TRYAGAIN_MEMORY`.
    tries: HashMap<Vec<u8>, (u32, Instant)>,
    /// The nodes serving at least one slot, from `owner` (kept beside it: the loop asks
    /// every pass, and `owner` has 16384 entries).
    serving: Vec<usize>,
    /// Every master serving slots is up, as last reported.
    up: bool,
    /// Pongs still due for `ping_subscription` (one per shard).
    pongs: usize,
}

impl Redis {
    pub fn new(cfg: RedisConfig, now: Instant) -> Redis {
        let Some(seeds) = cfg.cluster.clone() else {
            return Redis {
                nodes: vec![Node::new(cfg, now, 0, None)],
                cluster: None,
            };
        };
        info!(
            "redis: Cluster through {} (channel prefix {:?}; sharded pub/sub)",
            seeds.join(","),
            cfg.prefix
        );
        let first = seeds.first().cloned().unwrap_or_default();
        Redis {
            nodes: vec![Node::new(cfg, now, 0, Some(first))],
            cluster: Some(Cluster {
                seeds,
                seed_at: 0,
                owner: vec![NO_OWNER; cluster::SLOTS],
                known: false,
                asking: false,
                stale: true,
                asked_at: None,
                since: now,
                topics: HashSet::new(),
                unrouted: HashSet::new(),
                retries: VecDeque::new(),
                tries: HashMap::new(),
                serving: Vec::new(),
                up: false,
                pongs: 0,
            }),
        }
    }

    fn node0(&self) -> &Node {
        &self.nodes[0]
    }

    /// The node `topic` goes to: the one, or its slot's master (`None`: not known yet).
    fn route(&self, topic: &str) -> Option<usize> {
        match &self.cluster {
            None => Some(0),
            Some(c) => {
                let owner = c.owner[usize::from(cluster::topic_slot(topic))];
                (owner != NO_OWNER).then_some(usize::from(owner))
            }
        }
    }

    fn routed(&mut self, topic: &str) -> Option<&mut Node> {
        let i = self.route(topic)?;
        self.nodes.get_mut(i)
    }

    pub fn instance(&self) -> &str {
        self.node0().instance()
    }

    /// `--redis-prefix`: the start of every key and channel herald uses.
    pub fn prefix(&self) -> &str {
        self.node0().prefix()
    }

    /// Run another module's Lua script (`Node::script`). Its keys are not routed by slot,
    /// so it goes to the one node: such scripts are refused with `--redis-cluster` at
    /// start (config.rs).
    pub fn script(
        &mut self,
        script: &str,
        keys: &[&str],
        args: &[&str],
        tag: u64,
        now: Instant,
    ) -> bool {
        self.nodes[0].script(script, keys, args, tag, now)
    }

    pub fn is_up(&self) -> bool {
        match &self.cluster {
            None => self.node0().is_up(),
            Some(c) => c.up,
        }
    }

    pub fn settled(&self) -> bool {
        self.is_up() || self.nodes.iter().any(Node::settled)
    }

    pub fn is_confirmed(&self, topic: &str) -> bool {
        self.route(topic)
            .and_then(|i| self.nodes.get(i))
            .is_some_and(|n| n.is_confirmed(topic))
    }

    pub fn confirmed_count(&self) -> usize {
        self.nodes.iter().map(Node::confirmed_count).sum()
    }

    pub fn in_flight(&self) -> usize {
        self.nodes.iter().map(Node::in_flight).sum()
    }

    /// Live upgrade: go on as the process the old binary was (`Node::carry_instance`),
    /// and from its counts (kept on the first node; `counters` sums them).
    pub fn carry(&mut self, instance: Option<&str>, counts: RedisCounters) {
        let node = &mut self.nodes[0];
        if let Some(instance) = instance {
            node.carry_instance(instance);
        }
        let c = &mut node.counters;
        c.reconnects += counts.reconnects;
        c.errors += counts.errors;
        c.failovers += counts.failovers;
        c.unreplicated += counts.unreplicated;
        c.redirects += counts.redirects;
    }

    /// The links' counters, summed over shards.
    pub fn counters(&self) -> RedisCounters {
        let mut sum = RedisCounters::default();
        for n in &self.nodes {
            sum.reconnects += n.counters.reconnects;
            sum.errors += n.counters.errors;
            sum.failovers += n.counters.failovers;
            sum.unreplicated += n.counters.unreplicated;
            sum.redirects += n.counters.redirects;
        }
        sum
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        let nodes = self.nodes.iter().filter_map(Node::next_deadline);
        let cluster = self.cluster.as_ref().and_then(|c| {
            let retry = c.retries.front().map(|r| r.0);
            // Only with a link to ask on: otherwise the links' own deadlines wake us, and
            // one becoming ready asks at once.
            let can_ask = self.nodes.iter().any(|n| n.command.phase == Phase::Ready);
            let refresh = (c.stale && !c.asking && can_ask)
                .then(|| c.asked_at.map_or(c.since, |at| at + SLOTS_REFRESH_MIN));
            let lost = self.serving_down() && can_ask && !c.asking;
            let recheck = lost.then(|| c.asked_at.map_or(c.since, |at| at + SLOTS_REFRESH_DOWN));
            let refresh = refresh.into_iter().chain(recheck).min();
            retry.into_iter().chain(refresh).min()
        });
        nodes.chain(cluster).min()
    }

    pub fn tick(&mut self, now: Instant, registry: &Registry, events: &mut Vec<Event>) {
        for i in 0..self.nodes.len() {
            let mut own = Vec::new();
            self.nodes[i].tick(now, registry, &mut own);
            self.absorb(i, own, now, events);
        }
        self.tick_cluster(now, events);
    }

    /// The nodes that count: every one, or a Cluster's masters that serve slots (a node
    /// whose slots all moved away keeps its links, and a probe no longer in its slots).
    fn counted(&self) -> impl Iterator<Item = &Node> {
        let serving = self.cluster.as_ref().map(|c| &c.serving);
        self.nodes
            .iter()
            .enumerate()
            .filter(move |(i, _)| serving.is_none_or(|s| s.contains(i)))
            .map(|(_, n)| n)
    }

    pub fn delivery_ok(&self) -> Option<bool> {
        let verdicts: Vec<Option<bool>> = self.counted().map(Node::delivery_ok).collect();
        if verdicts.contains(&Some(false)) {
            Some(false)
        } else if verdicts.iter().all(|v| *v == Some(true)) {
            Some(true)
        } else {
            None
        }
    }

    pub fn delivery_broken(&self) -> bool {
        self.counted().any(Node::delivery_broken)
    }

    pub fn publish(&mut self, topic: &str, data: &str, tag: Option<u64>, now: Instant) -> bool {
        self.routed(topic)
            .is_some_and(|n| n.publish(topic, data, tag, now))
    }

    pub fn read_history(
        &mut self,
        topic: &str,
        since: Option<u64>,
        client_epoch: Option<&str>,
        tag: u64,
        now: Instant,
    ) -> bool {
        self.routed(topic)
            .is_some_and(|n| n.read_history(topic, since, client_epoch, tag, now))
    }

    pub fn presence_change(&mut self, topic: &str, member: &str, delta: i8, now: Instant) -> bool {
        self.routed(topic)
            .is_some_and(|n| n.presence_change(topic, member, delta, now))
    }

    pub fn presence_beat(&mut self, topic: &str, now: Instant) -> bool {
        self.routed(topic)
            .is_some_and(|n| n.presence_beat(topic, now))
    }

    pub fn presence_sync<'a>(
        &mut self,
        topic: &str,
        members: impl Iterator<Item = (&'a str, u32)>,
        now: Instant,
    ) -> bool {
        self.routed(topic)
            .is_some_and(|n| n.presence_sync(topic, members, now))
    }

    pub fn presence_read(&mut self, topic: &str, tag: u64, now: Instant) -> bool {
        self.routed(topic)
            .is_some_and(|n| n.presence_read(topic, tag, now))
    }

    pub fn subscribe(&mut self, topic: &str) {
        if let Some(c) = self.cluster.as_mut() {
            c.topics.insert(topic.to_string());
        }
        if let Some(n) = self.routed(topic) {
            n.subscribe(topic);
        }
    }

    pub fn unsubscribe(&mut self, topic: &str) {
        if let Some(c) = self.cluster.as_mut() {
            c.topics.remove(topic);
            c.unrouted.remove(topic);
        }
        if let Some(n) = self.routed(topic) {
            n.unsubscribe(topic);
        }
    }

    /// After `Event::SubscriptionReady`. A Cluster's shards are subscribed again by
    /// `absorb`, each to its own topics, and report no such event.
    pub fn resubscribe<'a>(&mut self, topics: impl Iterator<Item = &'a str>) {
        if self.cluster.is_none() {
            self.nodes[0].resubscribe(topics);
        }
    }

    /// PING every shard's subscription link: one `Event::Pong` once all have answered.
    pub fn ping_subscription(&mut self) -> bool {
        let Some(c) = self.cluster.as_mut() else {
            return self.nodes[0].ping_subscription();
        };
        let serving = c.serving.clone();
        // All or none: a pong counted for a ping not sent would end the wait early.
        let ready = |i: &usize| {
            self.nodes
                .get(*i)
                .is_some_and(|n| n.subscription.phase == Phase::Ready)
        };
        if serving.is_empty() || !serving.iter().all(ready) {
            return false;
        }
        for &i in &serving {
            self.nodes[i].ping_subscription();
        }
        if let Some(c) = self.cluster.as_mut() {
            c.pongs += serving.len();
        }
        true
    }

    pub fn on_ready(
        &mut self,
        token: Token,
        registry: &Registry,
        now: Instant,
        events: &mut Vec<Event>,
    ) {
        let Some(i) = self.nodes.iter().position(|n| n.owns(token)) else {
            return;
        };
        let mut own = Vec::new();
        self.nodes[i].on_ready(token, registry, now, &mut own);
        self.absorb(i, own, now, events);
        self.tick_cluster(now, events);
    }

    pub fn flush(&mut self, registry: &Registry, now: Instant, events: &mut Vec<Event>) {
        for i in 0..self.nodes.len() {
            let mut own = Vec::new();
            self.nodes[i].flush(registry, now, &mut own);
            self.absorb(i, own, now, events);
        }
    }

    /// Node `i`'s events: passed on as they are for one node; for a Cluster, what is the
    /// whole's (up, down, the drain's pong) is decided here, and the shard's own
    /// requests (redirections, slot maps) are carried out.
    fn absorb(&mut self, i: usize, own: Vec<Event>, now: Instant, events: &mut Vec<Event>) {
        if self.cluster.is_none() {
            events.extend(own);
            return;
        }
        for event in own {
            match event {
                Event::Up => {}
                // A master lost: maybe failed over to a replica. The map will say.
                Event::Down => {
                    if let Some(c) = self.cluster.as_mut() {
                        c.stale = true;
                    }
                }
                Event::SubscriptionReady => self.shard_subscription_ready(i),
                Event::Pong => {
                    if let Some(c) = self.cluster.as_mut() {
                        c.pongs = c.pongs.saturating_sub(1);
                        if c.pongs == 0 {
                            events.push(Event::Pong);
                        }
                    }
                }
                other => events.push(other),
            }
        }
        let internal = std::mem::take(&mut self.nodes[i].internal);
        for request in internal {
            self.carry_out(i, request, now, events);
        }
        self.report_cluster(events);
    }

    /// Shard `i`'s subscription link is (again) ready: its probe, and its topics.
    fn shard_subscription_ready(&mut self, i: usize) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let topics: Vec<String> = c
            .topics
            .iter()
            .filter(|t| usize::from(c.owner[usize::from(cluster::topic_slot(t))]) == i)
            .cloned()
            .collect();
        let tag = c
            .known
            .then(|| cluster::probe_tag(|s| usize::from(c.owner[usize::from(s)]) == i))
            .flatten();
        let node = &mut self.nodes[i];
        if let Some(tag) = tag {
            node.set_probe(&tag, std::process::id());
        }
        node.resubscribe(topics.iter().map(String::as_str));
    }

    fn carry_out(&mut self, i: usize, request: Internal, now: Instant, events: &mut Vec<Event>) {
        match request {
            Internal::Redirect {
                redirect,
                pending,
                bytes,
            } => {
                // A probe is this node's own: redirected, it proves nothing about it.
                if pending == Pending::Probe {
                    return;
                }
                self.nodes[i].counters.redirects += 1;
                debug!("redis: {} answered {redirect:?}", self.nodes[i].addr_name());
                let (slot, addr, asking) = match redirect {
                    Redirect::Moved { slot, addr } => (slot, addr, false),
                    Redirect::Ask { slot, addr } => (slot, addr, true),
                    Redirect::TryAgain => {
                        let Some(c) = self.cluster.as_mut() else {
                            return;
                        };
                        let tries = c.tries.entry(bytes.clone()).or_insert((0, now));
                        tries.0 += 1;
                        if tries.0 > TRYAGAIN_MAX {
                            self.nodes[i].fail(pending, "redis cluster: slot migration", events);
                        } else {
                            c.retries
                                .push_back((now + TRYAGAIN_DELAY, i, pending, bytes));
                        }
                        return;
                    }
                };
                let Some(j) = self.node_at(&addr, now) else {
                    self.nodes[i].fail(pending, "redis cluster: too many masters", events);
                    return;
                };
                if let Some(c) = self.cluster.as_mut()
                    && !asking
                {
                    c.owner[usize::from(slot)] = j as u8;
                    c.serving = serving_nodes(&c.owner);
                    c.stale = true;
                }
                if !self.nodes[j].resend(pending, bytes, asking, now) {
                    self.nodes[j].fail(pending, "redis unavailable", events);
                }
            }
            Internal::Slots(Ok(ranges)) => self.apply_slots(ranges, now),
            Internal::Slots(Err(why)) => {
                warn!(
                    "redis: no slot map from {}: {why}",
                    self.nodes[i].addr_name()
                );
                if let Some(c) = self.cluster.as_mut() {
                    c.asking = false;
                    c.stale = true;
                }
            }
            Internal::Unrouted(topic) => {
                if let Some(c) = self.cluster.as_mut() {
                    c.stale = true;
                    match topic {
                        Some(t) => {
                            c.unrouted.insert(t);
                        }
                        None => c.unrouted.extend(c.topics.iter().cloned()),
                    }
                }
            }
        }
    }

    /// The index of the node for the master at `addr`, started if new.
    fn node_at(&mut self, addr: &str, now: Instant) -> Option<usize> {
        if let Some(i) = self
            .nodes
            .iter()
            .position(|n| n.master.as_deref() == Some(addr))
        {
            return Some(i);
        }
        if self.nodes.len() >= MAX_SHARDS {
            warn!("redis: more than {MAX_SHARDS} Cluster masters; {addr} is not used");
            return None;
        }
        let cfg = self.nodes[0].cfg.clone();
        let i = self.nodes.len();
        self.nodes
            .push(Node::new(cfg, now, i, Some(addr.to_string())));
        Some(i)
    }

    /// A new slot map: topics whose slot moved (or whose subscription a shard ended)
    /// subscribe where it says now, and each shard probes a slot of its own.
    fn apply_slots(&mut self, ranges: Vec<Range>, now: Instant) {
        let mut owner = vec![NO_OWNER; cluster::SLOTS];
        for r in &ranges {
            let Some(j) = self.node_at(&r.addr, now) else {
                continue;
            };
            for slot in r.start..=r.end {
                owner[usize::from(slot)] = j as u8;
            }
        }
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let old = std::mem::replace(&mut c.owner, owner);
        c.known = true;
        c.asking = false;
        c.stale = false;
        let mut moved: Vec<(String, u8, u8)> = Vec::new();
        for t in &c.topics {
            let slot = usize::from(cluster::topic_slot(t));
            if old[slot] != c.owner[slot] || c.unrouted.contains(t) {
                moved.push((t.clone(), old[slot], c.owner[slot]));
            }
        }
        c.unrouted.clear();
        c.serving = serving_nodes(&c.owner);
        let serving = c.serving.clone();
        debug!(
            "redis: slot map of {} ranges over {} masters",
            ranges.len(),
            serving.len()
        );
        for (topic, from, to) in moved {
            if from != to
                && let Some(n) = self.nodes.get_mut(usize::from(from))
            {
                n.unsubscribe(&topic);
            }
            if let Some(n) = self.nodes.get_mut(usize::from(to)) {
                n.subscribe(&topic);
            }
        }
        for i in serving {
            let Some(c) = self.cluster.as_ref() else {
                return;
            };
            if let Some(tag) = cluster::probe_tag(|s| usize::from(c.owner[usize::from(s)]) == i) {
                self.nodes[i].set_probe(&tag, std::process::id());
            }
        }
    }

    /// Ask for the slot map when it is stale; send again what `TRYAGAIN` held back; move
    /// the first node to the next seed while no map is known and it cannot connect.
    fn tick_cluster(&mut self, now: Instant, events: &mut Vec<Event>) {
        let down = self.serving_down();
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if down
            && c.known
            && c.asked_at
                .is_none_or(|at| now.duration_since(at) >= SLOTS_REFRESH_DOWN)
        {
            c.stale = true;
        }
        if !c.known && self.nodes[0].command_failed() && c.seeds.len() > 1 {
            c.seed_at = (c.seed_at + 1) % c.seeds.len();
            self.nodes[0].master = Some(c.seeds[c.seed_at].clone());
        }
        let due = c.stale
            && !c.asking
            && c.asked_at
                .is_none_or(|at| now.duration_since(at) >= SLOTS_REFRESH_MIN);
        if due
            && let Some(n) = self
                .nodes
                .iter_mut()
                .find(|n| n.command.phase == Phase::Ready)
            && n.ask_slots(now)
        {
            c.asking = true;
            c.asked_at = Some(now);
        }
        while let Some(c) = self.cluster.as_mut()
            && c.retries.front().is_some_and(|r| r.0 <= now)
        {
            let Some((_, j, pending, bytes)) = c.retries.pop_front() else {
                break;
            };
            if !self.nodes[j].resend(pending, bytes, false, now) {
                self.nodes[j].fail(pending, "redis unavailable", events);
            }
        }
        if let Some(c) = self.cluster.as_mut() {
            c.tries
                .retain(|_, &mut (_, first)| now.duration_since(first) < TRYAGAIN_MEMORY);
        }
        self.report_cluster(events);
    }

    /// A master serving slots is not up.
    fn serving_down(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| {
            c.serving
                .iter()
                .any(|&i| self.nodes.get(i).is_none_or(|n| !n.is_up()))
        })
    }

    /// Up once the map is known and every master serving slots is up; one event per
    /// change.
    fn report_cluster(&mut self, events: &mut Vec<Event>) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let serving = c.serving.len();
        let up = c.known
            && serving > 0
            && c.serving
                .iter()
                .all(|&i| self.nodes.get(i).is_some_and(Node::is_up));
        if let Some(c) = self.cluster.as_mut()
            && c.up != up
        {
            c.up = up;
            if up {
                info!("redis: Cluster up ({serving} masters)");
                events.push(Event::Up);
            } else {
                warn!("redis: Cluster down (a master is unreachable); /publish answers 503");
                events.push(Event::Down);
            }
        }
    }
}

/// The nodes `owner` names, each once, in order.
fn serving_nodes(owner: &[u8]) -> Vec<usize> {
    let mut seen = [false; 256];
    for &o in owner {
        seen[usize::from(o)] = o != NO_OWNER;
    }
    (0..seen.len()).filter(|&i| seen[i]).collect()
}

/// `role:master`, the `master_replid` and the `master_replid2` (empty if absent) from
/// `INFO replication`; a replica is an error.
fn master_ids(info: &[u8]) -> Result<(String, String), String> {
    let text = std::str::from_utf8(info).map_err(|_| "INFO is not UTF-8".to_string())?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    match field("role") {
        Some("master") => {}
        Some(other) => return Err(format!("reached a {other}, not the master")),
        None => return Err("INFO replication names no role".into()),
    }
    let id = |name: &str| field(name).filter(|id| id.bytes().all(|b| b.is_ascii_alphanumeric()));
    let replid2 = id("master_replid2").unwrap_or_default().to_string();
    match id("master_replid") {
        Some(replid) if !replid.is_empty() => Ok((replid.to_string(), replid2)),
        _ => Err("INFO replication names no master_replid".into()),
    }
}

/// A Sentinel's host and port as one address (IPv6 in brackets).
fn host_port(host: &[u8], port: &[u8]) -> Result<String, String> {
    let host = std::str::from_utf8(host).map_err(|_| "master host is not UTF-8".to_string())?;
    let port: u16 = std::str::from_utf8(port)
        .ok()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("master port {port:?} is not a port"))?;
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("master host {host:?} is not a host"));
    }
    Ok(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
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

/// A reply that Redis may refuse: `Ok(Err(reason))` for an error reply (that command
/// failed, the link is fine; logged as `what` refused), `Ok(Ok(parsed))` otherwise, and
/// `Err` when the reply is not one `parse` understands (the link is reset).
fn answer<T>(
    frame: OwnedFrame,
    what: &str,
    parse: impl FnOnce(OwnedFrame) -> Result<T, String>,
) -> Result<Result<T, String>, String> {
    match frame {
        OwnedFrame::Error(e) => {
            warn!("redis: {what} refused: {e}");
            Ok(Err(e))
        }
        other => parse(other).map(Ok),
    }
}

/// A script's reply as strings: integers and bulk strings, nested arrays flattened.
fn flatten(frame: OwnedFrame) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut stack = vec![frame];
    while let Some(f) = stack.pop() {
        match f {
            OwnedFrame::Integer(n) => out.push(n.to_string()),
            OwnedFrame::BulkString(b) | OwnedFrame::SimpleString(b) => {
                out.push(String::from_utf8(b).map_err(|_| "script reply is not UTF-8".to_string())?)
            }
            OwnedFrame::Array(items) => stack.extend(items.into_iter().rev()),
            OwnedFrame::Null => {}
            other => return Err(format!("unexpected script reply {other:?}")),
        }
    }
    Ok(out)
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

    fn redis() -> Node {
        let cfg = parse_url("redis://127.0.0.1:1", "h:").unwrap();
        Node::new(cfg, Instant::now(), 0, None)
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
    fn sentinel_flags_come_in_pairs_of_valid_addresses() {
        assert_eq!(sentinel_config(None, None), Ok(None));
        let c = sentinel_config(Some("127.0.0.1:26379, s2:26380"), Some("mymaster"))
            .unwrap()
            .unwrap();
        assert_eq!(c.addrs, ["127.0.0.1:26379", "s2:26380"]);
        assert_eq!(c.master, "mymaster");
        assert!(sentinel_config(Some("127.0.0.1:26379"), None).is_err());
        assert!(sentinel_config(None, Some("m")).is_err());
        assert!(sentinel_config(Some("127.0.0.1"), Some("m")).is_err());
        assert!(sentinel_config(Some(","), Some("m")).is_err());
        assert!(sentinel_config(Some("h:1"), Some("a b")).is_err());
    }

    #[test]
    fn only_a_master_with_a_replication_id_passes_the_role_check() {
        let master = b"# Replication\r\nrole:master\r\nconnected_slaves:1\r\n\
            master_replid:8b0c6f1e2d\r\nmaster_replid2:0000\r\n";
        assert_eq!(master_ids(master), Ok(("8b0c6f1e2d".into(), "0000".into())));
        let replica = b"# Replication\r\nrole:slave\r\nmaster_host:127.0.0.1\r\n";
        assert!(master_ids(replica).unwrap_err().contains("slave"));
        assert!(master_ids(b"role:master\r\n").is_err());
        assert!(master_ids(&[0xff]).is_err());
        assert_eq!(
            host_port(b"127.0.0.1", b"6380"),
            Ok("127.0.0.1:6380".into())
        );
        assert_eq!(host_port(b"::1", b"6380"), Ok("[::1]:6380".into()));
        assert!(host_port(b"127.0.0.1", b"http").is_err());
        assert!(host_port(b"", b"1").is_err());
    }

    fn sentinel_redis() -> Node {
        let mut cfg = parse_url("redis://sentinel", "h:").unwrap();
        cfg.sentinel = sentinel_config(Some("127.0.0.1:1"), Some("m")).unwrap();
        Node::new(cfg, Instant::now(), 0, None)
    }

    #[test]
    fn the_sentinel_names_the_master_and_switches_it() {
        let mut r = sentinel_redis();
        assert_eq!(
            r.addr(Role::Command),
            None,
            "no master before the Sentinels say"
        );
        let now = Instant::now();
        r.handshake(Role::Sentinel, now);
        assert_eq!(r.sentinel.phase, Phase::Handshaking);
        let bulk = |s: &str| OwnedFrame::BulkString(s.as_bytes().to_vec());
        let mut events = Vec::new();
        let addr = OwnedFrame::Array(vec![bulk("127.0.0.1"), bulk("7001")]);
        r.on_frame(Role::Sentinel, addr, &mut events).unwrap();
        assert_eq!(r.learned.as_deref(), Some("127.0.0.1:7001"));
        r.master = r.learned.take();
        let confirmed = OwnedFrame::Array(vec![
            bulk("subscribe"),
            bulk("+switch-master"),
            OwnedFrame::Integer(1),
        ]);
        r.on_frame(Role::Sentinel, confirmed, &mut events).unwrap();
        assert_eq!(r.sentinel.phase, Phase::Ready);
        let switch = |text: &str| {
            OwnedFrame::Array(vec![bulk("message"), bulk("+switch-master"), bulk(text)])
        };
        r.on_frame(
            Role::Sentinel,
            switch("other 127.0.0.1 7001 127.0.0.1 7009"),
            &mut events,
        )
        .unwrap();
        assert_eq!(r.learned, None, "another master's switch is not ours");
        r.on_frame(
            Role::Sentinel,
            switch("m 127.0.0.1 7001 127.0.0.1 7002"),
            &mut events,
        )
        .unwrap();
        assert_eq!(r.learned.as_deref(), Some("127.0.0.1:7002"));
        assert!(
            r.on_frame(Role::Sentinel, switch("m 127.0.0.1"), &mut events)
                .is_err()
        );
        // A Sentinel that does not know the master is asked no further.
        let mut r = sentinel_redis();
        r.handshake(Role::Sentinel, now);
        assert!(
            r.on_frame(Role::Sentinel, OwnedFrame::Null, &mut events)
                .is_err()
        );
    }

    #[test]
    fn a_data_link_checks_the_role_and_the_command_link_sets_the_generation() {
        let mut r = sentinel_redis();
        r.master = Some("127.0.0.1:7001".into());
        r.handshake(Role::Command, Instant::now());
        let mut events = Vec::new();
        let info = OwnedFrame::BulkString(b"role:master\r\nmaster_replid:abc\r\n".to_vec());
        r.on_frame(Role::Command, info, &mut events).unwrap();
        let pong = OwnedFrame::SimpleString(b"PONG".to_vec());
        r.on_frame(Role::Command, pong, &mut events).unwrap();
        assert_eq!(
            r.command.phase,
            Phase::Handshaking,
            "the generation is awaited"
        );
        assert!(
            r.command.output.windows(3).any(|w| w == b"abc"),
            "GEN_LUA went with the replication id"
        );
        let generation = OwnedFrame::BulkString(b"0123".to_vec());
        r.on_frame(Role::Command, generation, &mut events).unwrap();
        assert_eq!(r.command.phase, Phase::Ready);
        // The subscription link on a replica is refused.
        r.handshake(Role::Subscription, Instant::now());
        let replica = OwnedFrame::BulkString(b"role:slave\r\n".to_vec());
        assert!(
            r.on_frame(Role::Subscription, replica, &mut events)
                .is_err()
        );
    }

    #[test]
    fn a_lost_probe_with_both_links_up_asks_the_sentinels_again() {
        let poll = mio::Poll::new().unwrap();
        let mut r = sentinel_redis();
        let start = Instant::now();
        r.command.phase = Phase::Ready;
        r.subscription.phase = Phase::Ready;
        r.sentinel.phase = Phase::Ready;
        r.up = true;
        r.probe.subscribed = true;
        r.sentinel_asked = Some(start);
        r.probe.sent = Some((1, start));
        let mut events = Vec::new();
        r.tick(start + Duration::from_secs(1), poll.registry(), &mut events);
        assert_eq!(
            r.sentinel.phase,
            Phase::Ready,
            "the probe is not overdue yet"
        );
        r.tick(start + PROBE_TIMEOUT, poll.registry(), &mut events);
        assert!(events.contains(&Event::Delivery(false)));
        assert_ne!(
            r.sentinel.phase,
            Phase::Ready,
            "the Sentinel link asks again"
        );
        assert_eq!(r.sentinel_at, 0, "the next Sentinel (of one)");
        assert!(
            r.up,
            "the data links stay up: the agent reports the broken delivery"
        );
    }

    #[test]
    fn with_wait_a_publish_is_answered_by_its_wait() {
        let mut r = redis();
        r.cfg.wait_replicas = 1;
        r.command.phase = Phase::Ready;
        r.subscription.phase = Phase::Ready;
        r.up = true;
        let now = Instant::now();
        assert!(r.publish("t", "1", Some(1), now));
        assert!(r.publish("t", "2", Some(2), now));
        assert!(r.publish("t", "3", Some(3), now));
        assert_eq!(
            r.command.output.windows(4).filter(|w| w == b"WAIT").count(),
            3
        );
        let mut events = Vec::new();
        let reply =
            |id, n| OwnedFrame::Array(vec![OwnedFrame::Integer(id), OwnedFrame::Integer(n)]);
        r.on_frame(Role::Command, reply(1, 1), &mut events).unwrap();
        assert!(events.is_empty(), "not before the WAIT");
        r.on_frame(Role::Command, OwnedFrame::Integer(1), &mut events)
            .unwrap();
        r.on_frame(Role::Command, reply(2, 1), &mut events).unwrap();
        r.on_frame(Role::Command, OwnedFrame::Integer(0), &mut events)
            .unwrap();
        r.on_frame(Role::Command, OwnedFrame::Error("OOM".into()), &mut events)
            .unwrap();
        r.on_frame(Role::Command, OwnedFrame::Integer(1), &mut events)
            .unwrap();
        assert_eq!(
            events,
            [
                Event::Published {
                    tag: 1,
                    result: Ok((1, 1))
                },
                Event::Published {
                    tag: 2,
                    result: Err("replicated to 0 of 1 replicas".into())
                },
                Event::Published {
                    tag: 3,
                    result: Err("OOM".into())
                },
            ]
        );
        assert_eq!(r.counters.unreplicated, 1);
        // A demoted master fails the link, and so every publish in flight.
        assert!(r.publish("t", "4", Some(4), now));
        let readonly = OwnedFrame::Error("READONLY You can't write against a replica.".into());
        assert!(r.on_frame(Role::Command, readonly, &mut events).is_err());
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
