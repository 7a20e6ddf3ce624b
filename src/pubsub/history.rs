//! Per-topic message history, so that a client which reconnects can resume what it
//! missed, for a herald that runs without Redis (with Redis, ids and history live there:
//! `redis.rs`). Every topic has an *epoch*, an opaque string that stays the same for as
//! long as the topic's history is continuous; within an epoch, ids are one apart. A
//! client asks for everything after id N in epoch E (`resume`) and is told whether that
//! is all it missed (`Recovered`) or why not (`Gap`, `EpochChanged`), never a silent gap.
//!
//! It owns the topics' epochs and last ids (local id assignment), the kept messages as the
//! very frames the fan-out queues (`Bytes`: history adds no copy), their bounds — `size`
//! per topic, `ttl` per message, `memory` for the whole process, oldest first across
//! topics — and a versioned snapshot that carries all of it across a restart.
//!
//! It never does I/O (the snapshot is encoded to and decoded from bytes; the caller owns
//! the file), never reads the monotonic clock (`now` comes in; the wall clock is read
//! only by `wall_clock_seed`, to name epochs), never frames a message (the caller frames
//! with the id it is handed), and knows of subscribers only the hold the pipeline takes
//! on a topic while it has some (`retain`/`release`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque, vec_deque};
use std::fmt;
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use slab::Slab;

use crate::topic;

/// Bytes a kept message is counted for beyond its frame, so that the memory cap bounds
/// RSS and not just payloads: its slot in its topic's deque, two slots in the global
/// queue (compaction lets stale slots grow to as many as live ones), and the frame
/// allocation's own overhead. Deque capacity left over after growth can add up to the
/// first two terms again; that is not counted, so the cap is never an overstatement.
pub const MESSAGE_OVERHEAD: usize =
    size_of::<Message>() + 2 * size_of::<Queued>() + FRAME_ALLOCATION_OVERHEAD;

/// A frame's allocation beyond its length, in bytes: the shared header `Bytes` creates
/// once a second handle exists (24 bytes) and malloc's rounding and bookkeeping.
const FRAME_ALLOCATION_OVERHEAD: usize = 40;

/// Stale slots (left behind by size evictions, which take a message from the middle of
/// the global queue) tolerated beyond one per live message before the queue is
/// compacted. Compaction is O(queue); waiting until stale ≥ live + this slack makes it
/// O(1) amortized per append, and the slack keeps a near-empty history from compacting
/// on every append.
const COMPACT_SLACK: usize = 64;

/// Longest epoch a snapshot may carry, in bytes; ours have at most 33 ("{seed}-{n}" in hex).
const MAX_EPOCH_LEN: usize = 64;

/// Ids reach clients as JSON numbers, which JavaScript reads as doubles: past 2^53 − 1
/// they lose precision. A snapshot whose ids go past it is refused.
const MAX_ID: u64 = (1 << 53) - 1;

/// The first bytes of every snapshot.
const SNAPSHOT_MAGIC: &[u8; 8] = b"HRLDHIST";

/// The snapshot format this build writes and reads. Bump it when the layout changes, and
/// also when the hub's message envelope does: snapshots carry frames, and an old frame
/// restored into a newer herald would reach clients in the old shape.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Magic, version (u32), body length (u64), body CRC-32 (u32).
const HEADER_LEN: usize = SNAPSHOT_MAGIC.len() + 4 + 8 + 4;

/// The bounds on what is kept. Defaults belong to the flags (`--history-size`,
/// `--history-ttl`, `--history-memory`), not here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Messages kept per topic; past it the topic's oldest goes (an eviction by `size`).
    /// 0 turns history off: nothing is stored, but topics still get epochs and ids.
    pub size: usize,
    /// The longest a message is kept: `expire` drops it once it has been kept this long
    /// (an eviction by `ttl`). A released topic's record also lingers this long after
    /// its last subscriber left. A ttl past `Instant`'s range means forever.
    pub ttl: Duration,
    /// Bytes the whole process may hold, counted as frame length + `MESSAGE_OVERHEAD`
    /// per message; past it the oldest messages across all topics go (an eviction by
    /// `memory`). A message that could not fit alone is not kept, and takes its topic's
    /// older messages with it (they would sit before a hole). 0 keeps nothing.
    pub memory: usize,
}

/// Evictions so far, by the bound that caused them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evictions {
    pub size: u64,
    pub ttl: u64,
    pub memory: u64,
}

/// Where a topic stands: what a client needs to resume from later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Rc<str>,
    pub last_id: u64,
}

/// A message just appended: its id and epoch, and its frame back for the fan-out.
#[derive(Debug, Clone)]
pub struct Appended {
    pub id: u64,
    /// Read by the tests; the pipeline names epochs from `position` instead.
    #[cfg_attr(not(test), allow(dead_code))]
    pub epoch: Rc<str>,
    pub frame: Bytes,
}

/// A kept message.
#[derive(Debug, Clone)]
pub struct Message {
    id: u64,
    at: Instant,
    /// The framed WebSocket message, shared with the subscribers' queues.
    frame: Bytes,
    /// Where the `data` JSON sits in `frame`. u32, half the size of a `Range<usize>`:
    /// `keep` refuses a frame of 4 GiB or more.
    data: (u32, u32),
}

impl Message {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// When it was appended (or, after a restore, the same age before the restore).
    #[cfg(test)]
    pub fn appended_at(&self) -> Instant {
        self.at
    }

    /// The frame to queue to a client as is.
    pub fn frame(&self) -> &Bytes {
        &self.frame
    }

    /// The message's `data` JSON, for `/history`, without re-encoding.
    pub fn data(&self) -> &[u8] {
        &self.frame[self.data.0 as usize..self.data.1 as usize]
    }

    /// The same, as a shared handle on the frame (no copy).
    #[cfg(test)]
    pub fn data_bytes(&self) -> Bytes {
        self.frame.slice(self.data.0 as usize..self.data.1 as usize)
    }

    fn cost(&self) -> usize {
        self.frame.len() + MESSAGE_OVERHEAD
    }
}

/// Kept messages of one topic, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Messages<'h>(vec_deque::Iter<'h, Message>);

impl<'h> Iterator for Messages<'h> {
    type Item = &'h Message;

    fn next(&mut self) -> Option<&'h Message> {
        self.0.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for Messages<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back()
    }
}

impl ExactSizeIterator for Messages<'_> {}

/// Whether a resume got the client everything it missed, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Same epoch and every id after the client's is still held: the messages are
    /// exactly what it missed (none when it missed nothing).
    Recovered,
    /// Same epoch, but some ids after the client's were evicted: the messages are what
    /// is left after them.
    Gap,
    /// The client's position is not from this epoch: another epoch (the record was
    /// dropped and the topic came back, or the process lost its history), or ids this
    /// epoch never issued (past its last id, or before it began). Ids from another
    /// epoch mean nothing here, so the messages are everything the current epoch holds.
    EpochChanged,
}

/// The answer to a resume: the outcome, the position to resume from next time, and the
/// messages to replay, oldest first.
#[derive(Debug, Clone)]
pub struct Resume<'h> {
    pub outcome: Outcome,
    pub position: Position,
    pub messages: Messages<'h>,
}

impl Resume<'_> {
    pub fn recovered(&self) -> bool {
        self.outcome == Outcome::Recovered
    }
}

/// Why a snapshot was refused. The caller logs it and sets the file aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    /// The bytes do not start with the magic: not a history snapshot at all.
    NotASnapshot,
    /// Written by a build with another format version.
    UnsupportedVersion { found: u32, supported: u32 },
    /// Shorter than its header says (or than a header): the write was cut off.
    Truncated { expected: u64, found: u64 },
    /// Longer than its header says.
    TrailingBytes { expected: u64, found: u64 },
    /// The body's CRC-32 does not match the header's: bytes changed after writing.
    ChecksumMismatch { stored: u32, computed: u32 },
    /// Intact, but it breaks a rule of the format: not written by this format's writer.
    Malformed(String),
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("history snapshot: ")?;
        match self {
            SnapshotError::NotASnapshot => f.write_str("not a herald history snapshot"),
            SnapshotError::UnsupportedVersion { found, supported } => write!(
                f,
                "format version {found}, but this build reads version {supported} only"
            ),
            SnapshotError::Truncated { expected, found } => {
                write!(f, "truncated: {found} bytes where {expected} were expected")
            }
            SnapshotError::TrailingBytes { expected, found } => {
                write!(
                    f,
                    "{found} bytes, longer than the {expected} its header says"
                )
            }
            SnapshotError::ChecksumMismatch { stored, computed } => write!(
                f,
                "corrupt: body checksum is {computed:08x}, the header says {stored:08x}"
            ),
            SnapshotError::Malformed(what) => write!(f, "malformed: {what}"),
        }
    }
}

impl std::error::Error for SnapshotError {}

/// The seed that makes this process's epochs differ from every earlier run's: the wall
/// clock at start, in nanoseconds since 1970. The only clock read in this module; tests
/// pass fixed seeds instead.
pub fn wall_clock_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Names new epochs "{seed}-{n}" in hex: unique within the process by `n`, and across
/// runs by the seed (which must differ between runs; the wall clock in ns does).
/// Rejected: random strings, which would need a random source and only be likely unique.
#[derive(Debug)]
struct Epochs {
    seed: u64,
    minted: u64,
}

impl Epochs {
    fn mint(&mut self) -> Rc<str> {
        self.minted += 1;
        Rc::from(format!("{:x}-{:x}", self.seed, self.minted))
    }
}

/// One topic's epoch, position and kept messages.
#[derive(Debug)]
struct Record {
    name: Rc<str>,
    epoch: Rc<str>,
    /// The id the epoch started after: it issued `base + 1 ..= last_id`.
    base: u64,
    last_id: u64,
    /// Kept messages, ids `last_id - len + 1 ..= last_id`: every eviction takes a
    /// topic's oldest, so what is left is always the newest run.
    entries: VecDeque<Message>,
    /// The pipeline holds the topic: it has local subscribers.
    retained: bool,
    /// When it was last released. Empty and unretained, the record lingers until then +
    /// ttl, so a client that drops off a quiet topic and comes back within the ttl still
    /// finds its epoch (and `recovered: true` if nothing was published meanwhile).
    released: Option<Instant>,
    /// The deadline of its slot in `lingering`, if it has one: at most one per record,
    /// so subscribe/unsubscribe churn on one topic cannot grow the heap.
    armed: Option<Instant>,
}

impl Record {
    fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            last_id: self.last_id,
        }
    }
}

/// A slot in the global queue: a message by its record's key and its id.
///
/// Slab keys are reused once a record is dropped, but a stale slot can never be taken for
/// a later record's message: a record is created with `base` = the process-wide count
/// of ids issued, which is at least every id any earlier record issued, so every id of
/// the later record is greater than the stale slot's.
#[derive(Debug, Clone, Copy)]
struct Queued {
    key: usize,
    id: u64,
}

pub struct History {
    limits: Limits,
    by_name: HashMap<Rc<str>, usize>,
    records: Slab<Record>,
    /// Every kept message in append order, which is time order across all topics, so
    /// its front is the oldest message of all: the next to expire and the first to go
    /// past the memory cap. Size evictions leave stale slots behind, skipped lazily and
    /// compacted away; the front is always kept live, so `next_expiry` is exact.
    queue: VecDeque<Queued>,
    /// Released records by the end of their linger, soonest first: at most one slot per
    /// record (`Record::armed`). A record released again while armed keeps its earlier
    /// slot, which re-arms for the later deadline when it comes due; a FIFO of one slot
    /// per release would be simpler and grow with every unsubscribe within the ttl.
    lingering: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Ids issued in this process, on any topic. A new epoch starts its ids here, so a
    /// topic's ids never go backwards even across a dropped record (as in the hub).
    published: u64,
    epochs: Epochs,
    /// The latest `now` seen. An earlier `now` is read as this one, so the queues stay
    /// in time order whatever the caller passes.
    clock: Option<Instant>,
    messages: usize,
    bytes: usize,
    evicted: Evictions,
}

impl History {
    /// An empty history; `seed` names its epochs (`wall_clock_seed()` in the server).
    pub fn new(limits: Limits, seed: u64) -> History {
        History {
            limits,
            by_name: HashMap::new(),
            records: Slab::new(),
            queue: VecDeque::new(),
            lingering: BinaryHeap::new(),
            published: 0,
            epochs: Epochs { seed, minted: 0 },
            clock: None,
            messages: 0,
            bytes: 0,
            evicted: Evictions::default(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    // ---- the pipeline's hold ---------------------------------------------------------

    /// Hold `topic`'s record while it has local subscribers (call on `Joined::NewTopic`),
    /// creating it, with a new epoch, if there is none. One hold, not a count: the hub
    /// counts subscribers. Returns where the topic stands, for the `subscribed` reply.
    pub fn retain(&mut self, topic: &str) -> Position {
        let key = self.key_or_create(topic);
        let record = &mut self.records[key];
        record.retained = true;
        record.position()
    }

    /// The topic lost its last local subscriber (`Left::TopicFreed`). Its messages stay
    /// until their ttl runs out, and its record stays while it has messages, and for at
    /// least ttl from now, so a client coming back within the ttl finds its epoch.
    pub fn release(&mut self, topic: &str, now: Instant) {
        let now = self.tick(now);
        if let Some(&key) = self.by_name.get(topic) {
            self.release_key(key, now);
        }
    }

    fn release_key(&mut self, key: usize, now: Instant) {
        let record = &mut self.records[key];
        record.retained = false;
        record.released = Some(now);
        if !self.drop_if_idle(key, now) {
            self.arm(key, now);
        }
    }

    /// Give an unretained record a slot at the end of its linger, unless it has one
    /// already (due no later: it re-arms then), or its linger is over (whatever empties
    /// it then drops it) or never ends.
    fn arm(&mut self, key: usize, now: Instant) {
        let record = &mut self.records[key];
        if record.retained || record.armed.is_some() {
            return;
        }
        let deadline = record.released.and_then(|t| t.checked_add(self.limits.ttl));
        if let Some(deadline) = deadline.filter(|&d| d > now) {
            record.armed = Some(deadline);
            self.lingering.push(Reverse((deadline, key)));
        }
    }

    // ---- appending -------------------------------------------------------------------

    /// Assign `topic`'s next id and keep the message. `frame` is called once with the id
    /// (the frame carries it, so it cannot be built before) and returns the framed
    /// message and the byte range of its `data` JSON inside the frame. The frame comes
    /// back in `Appended` for the fan-out. With history off nothing is kept, and a
    /// caller with nobody listening may return an empty frame.
    pub fn append(
        &mut self,
        topic: &str,
        now: Instant,
        frame: impl FnOnce(u64) -> (Bytes, Range<usize>),
    ) -> Appended {
        let now = self.tick(now);
        let key = self.key_or_create(topic);
        self.published += 1;
        let record = &mut self.records[key];
        record.last_id += 1;
        let (id, epoch) = (record.last_id, record.epoch.clone());
        let (frame, data) = frame(id);
        self.keep(key, id, frame.clone(), data, now);
        // A topic nobody holds whose message was not kept has nothing left to resume.
        self.drop_if_idle(key, now);
        Appended { id, epoch, frame }
    }

    /// Keep a message appended at `at`, then apply the bounds: the topic's size, then
    /// the process's memory, taking the oldest across topics.
    fn keep(&mut self, key: usize, id: u64, frame: Bytes, data: Range<usize>, at: Instant) {
        if self.limits.size == 0 {
            return;
        }
        let cost = frame.len().saturating_add(MESSAGE_OVERHEAD);
        if cost > self.limits.memory || u32::try_from(frame.len()).is_err() {
            // It could never fit: rather than flush every other topic's history for a
            // message that would have to go too, do not keep it. Its topic's older
            // messages go with it: kept ids must stay one run ending at the last id, or
            // a resume from before the hole would step over it as if recovered.
            while self.take_front(key).is_some() {
                self.evicted.memory += 1;
            }
            self.evicted.memory += 1;
            self.trim_stale_front();
            self.compact_if_stale();
            return;
        }
        debug_assert!(data.start <= data.end && data.end <= frame.len());
        // A bad range from the caller must not make `Message::data` panic later.
        let end = data.end.min(frame.len());
        let start = data.start.min(end);
        let record = &mut self.records[key];
        debug_assert!(record.entries.back().is_none_or(|m| m.id + 1 == id));
        record.entries.push_back(Message {
            id,
            at,
            frame,
            data: (start as u32, end as u32),
        });
        self.queue.push_back(Queued { key, id });
        self.messages += 1;
        self.bytes += cost;
        while self.records[key].entries.len() > self.limits.size {
            self.take_front(key);
            self.evicted.size += 1;
        }
        // That may have made the queue's front stale (the topic's oldest was the oldest).
        self.trim_stale_front();
        // The new message fits alone, so this stops before reaching it: only older
        // messages go, and its own record is never emptied here.
        while self.bytes > self.limits.memory {
            let Some((evicted, _)) = self.pop_oldest() else {
                break;
            };
            self.evicted.memory += 1;
            self.drop_if_idle(evicted, at);
        }
        self.compact_if_stale();
    }

    /// Keep the global queue within `2 × messages + COMPACT_SLACK` slots (the two slots
    /// per message `MESSAGE_OVERHEAD` counts), after appends and after expiry alike.
    fn compact_if_stale(&mut self) {
        if self.queue.len() > 2 * self.messages + COMPACT_SLACK {
            let records = &self.records;
            self.queue.retain(|&q| is_live(records, q));
        }
    }

    // ---- time ------------------------------------------------------------------------

    /// Drop messages kept for ttl and records whose linger ended with nothing left in
    /// them. Cheap when nothing is due: one look at each queue's front. Returns how many
    /// messages expired.
    pub fn expire(&mut self, now: Instant) -> usize {
        let now = self.tick(now);
        let mut expired = 0;
        while self
            .oldest()
            .is_some_and(|m| due(m.at, self.limits.ttl, now))
        {
            let Some((key, _)) = self.pop_oldest() else {
                break;
            };
            self.evicted.ttl += 1;
            expired += 1;
            self.drop_if_idle(key, now);
        }
        while let Some(&Reverse((deadline, key))) = self.lingering.peek() {
            if deadline > now {
                break;
            }
            self.lingering.pop();
            // A dropped record's slot may name a key reused since: act only on the
            // record's own slot, and then by its state.
            let Some(record) = self.records.get_mut(key) else {
                continue;
            };
            if record.armed != Some(deadline) {
                continue;
            }
            record.armed = None;
            if !self.drop_if_idle(key, now) {
                // Released again since it was armed: wait for the later deadline.
                self.arm(key, now);
            }
        }
        self.compact_if_stale();
        expired
    }

    /// When `expire` next has something to do, for the loop's poll timeout. It may be
    /// early (a lingering record was retained again since: one wakeup that finds
    /// nothing), never late.
    pub fn next_expiry(&self) -> Option<Instant> {
        let message = self
            .oldest()
            .and_then(|m| m.at.checked_add(self.limits.ttl));
        let record = self
            .lingering
            .peek()
            .map(|&Reverse((deadline, _))| deadline);
        match (message, record) {
            (Some(m), Some(r)) => Some(m.min(r)),
            (m, r) => m.or(r),
        }
    }

    // ---- reading ---------------------------------------------------------------------

    /// Where `topic` stands; `None` when it has no record (no subscribers here, nothing
    /// kept, no linger).
    pub fn position(&self, topic: &str) -> Option<Position> {
        self.record(topic).map(Record::position)
    }

    /// Every message kept for `topic`, oldest first (for `/history` without `since`).
    #[cfg(test)]
    pub fn messages_of(&self, topic: &str) -> Messages<'_> {
        self.record(topic)
            .map_or_else(Messages::default, |r| Messages(r.entries.iter()))
    }

    /// What a client that saw `topic` up to id `since` in `epoch` missed. `None` when
    /// the topic has no record: the pipeline retains a topic before resuming on it.
    pub fn resume(&self, topic: &str, epoch: &str, since: u64) -> Option<Resume<'_>> {
        let record = self.record(topic)?;
        let all = Messages(record.entries.iter());
        let (outcome, messages) =
            if *record.epoch != *epoch || since > record.last_id || since < record.base {
                (Outcome::EpochChanged, all)
            } else {
                // Kept ids are the newest run up to last_id: the client missed nothing we
                // no longer have iff that run starts at or before since + 1.
                match record.entries.front() {
                    Some(first) if first.id <= since + 1 => {
                        let skip = (since + 1 - first.id) as usize;
                        (Outcome::Recovered, Messages(record.entries.range(skip..)))
                    }
                    None if since == record.last_id => (Outcome::Recovered, all),
                    // Every kept id is past since + 1, so all of them are after `since`.
                    _ => (Outcome::Gap, all),
                }
            };
        Some(Resume {
            outcome,
            position: record.position(),
            messages,
        })
    }

    // ---- gauges ----------------------------------------------------------------------

    /// Messages kept, across all topics.
    pub fn messages(&self) -> usize {
        self.messages
    }

    /// Bytes counted against the memory cap: frame lengths + `MESSAGE_OVERHEAD` each.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn evictions(&self) -> Evictions {
        self.evicted
    }

    /// The evictions an old binary counted (live upgrade), on top of any this one's
    /// restore counted.
    pub fn carry_evictions(&mut self, e: Evictions) {
        self.evicted.size += e.size;
        self.evicted.ttl += e.ttl;
        self.evicted.memory += e.memory;
    }

    /// Topic records: topics held, with messages kept, or lingering.
    pub fn topics(&self) -> usize {
        self.records.len()
    }

    // ---- internals -------------------------------------------------------------------

    fn tick(&mut self, now: Instant) -> Instant {
        let now = self.clock.map_or(now, |c| c.max(now));
        self.clock = Some(now);
        now
    }

    fn record(&self, topic: &str) -> Option<&Record> {
        self.by_name.get(topic).map(|&key| &self.records[key])
    }

    fn key_or_create(&mut self, topic: &str) -> usize {
        if let Some(&key) = self.by_name.get(topic) {
            return key;
        }
        let name: Rc<str> = Rc::from(topic);
        let key = self.records.insert(Record {
            name: name.clone(),
            epoch: self.epochs.mint(),
            base: self.published,
            last_id: self.published,
            entries: VecDeque::new(),
            retained: false,
            released: None,
            armed: None,
        });
        self.by_name.insert(name, key);
        key
    }

    /// Drop the record at `key` if nothing needs it any more: not held, nothing kept,
    /// linger over. True when it was dropped.
    fn drop_if_idle(&mut self, key: usize, now: Instant) -> bool {
        let Some(record) = self.records.get(key) else {
            return false;
        };
        let lingering = record
            .released
            .is_some_and(|t| !due(t, self.limits.ttl, now));
        if record.retained || !record.entries.is_empty() || lingering {
            return false;
        }
        let record = self.records.remove(key);
        self.by_name.remove(&record.name);
        true
    }

    /// The oldest kept message of all (the queue's front is kept live).
    fn oldest(&self) -> Option<&Message> {
        let q = self.queue.front()?;
        let oldest = self.records.get(q.key)?.entries.front();
        debug_assert_eq!(oldest.map(|m| m.id), Some(q.id));
        oldest
    }

    /// Take the oldest kept message of all, with its record's key.
    fn pop_oldest(&mut self) -> Option<(usize, Message)> {
        let q = self.queue.pop_front()?;
        let message = self.take_front(q.key);
        debug_assert_eq!(message.as_ref().map(|m| m.id), Some(q.id));
        self.trim_stale_front();
        Some((q.key, message?))
    }

    fn take_front(&mut self, key: usize) -> Option<Message> {
        let message = self.records[key].entries.pop_front()?;
        self.messages -= 1;
        self.bytes -= message.cost();
        Some(message)
    }

    fn trim_stale_front(&mut self) {
        while let Some(&q) = self.queue.front() {
            if is_live(&self.records, q) {
                break;
            }
            self.queue.pop_front();
        }
    }

    // ---- snapshot --------------------------------------------------------------------

    /// Everything needed to carry on after a restart. The format, all integers little
    /// endian:
    ///
    /// ```text
    /// header  magic "HRLDHIST", version u32, body length u64, body CRC-32 u32
    /// body    published u64                  ids issued so far (the process counter)
    ///         topics u32, then per topic:
    ///           name    u16 length + bytes
    ///           epoch   u8 length + bytes
    ///           base u64, last_id u64        the epoch issued base+1 ..= last_id
    ///           kept u32                     its messages are last_id-kept+1 ..= last_id
    ///         messages u64, then per message, oldest first across all topics:
    ///           topic u32                    index in the table above
    ///           age u64                      ns since it was appended, at `now`
    ///           data start u32, end u32      the `data` JSON's range in the frame
    ///           frame u32 length + bytes
    /// ```
    ///
    /// Binary, not JSON: frames are binary (a WebSocket header, then the payload), and
    /// JSON would carry them as base64 or arrays of numbers at two to four times the
    /// size, all parsed into a tree first. Length-prefixed fields write frames verbatim
    /// and read with bounds checks alone. The CRC catches what a parser cannot, such as a
    /// flipped digit in an id. Messages go in the global order, ids implied, so a restore
    /// rebuilds the oldest-first queue in one pass and cannot get topics' ids out of order.
    pub fn snapshot(&self, now: Instant) -> Vec<u8> {
        let now = self.clock.map_or(now, |c| c.max(now));
        let mut out = Vec::with_capacity(HEADER_LEN + self.bytes);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        put_u32(&mut out, SNAPSHOT_VERSION);
        // Length and checksum are filled in once the body is written.
        out.extend_from_slice(&[0; 12]);

        put_u64(&mut out, self.published);
        put_u32(&mut out, self.records.len() as u32);
        let mut index = HashMap::with_capacity(self.records.len());
        for (i, (key, record)) in self.records.iter().enumerate() {
            index.insert(key, i as u32);
            // Topic names are at most 200 bytes (`topic::MAX_TOPIC_LEN`); epochs ours.
            debug_assert!(record.name.len() <= u16::MAX as usize);
            put_u16(&mut out, record.name.len() as u16);
            out.extend_from_slice(record.name.as_bytes());
            out.push(record.epoch.len() as u8);
            out.extend_from_slice(record.epoch.as_bytes());
            put_u64(&mut out, record.base);
            put_u64(&mut out, record.last_id);
            put_u32(&mut out, record.entries.len() as u32);
        }
        put_u64(&mut out, self.messages as u64);
        for &q in self.queue.iter().filter(|&&q| is_live(&self.records, q)) {
            let record = &self.records[q.key];
            let m = &record.entries[(q.id - record.entries[0].id) as usize];
            let age = now.saturating_duration_since(m.at).as_nanos();
            put_u32(&mut out, index[&q.key]);
            put_u64(&mut out, u64::try_from(age).unwrap_or(u64::MAX));
            put_u32(&mut out, m.data.0);
            put_u32(&mut out, m.data.1);
            put_u32(&mut out, m.frame.len() as u32);
            out.extend_from_slice(&m.frame);
        }

        let body_len = (out.len() - HEADER_LEN) as u64;
        let crc = crc32(&out[HEADER_LEN..]);
        out[12..20].copy_from_slice(&body_len.to_le_bytes());
        out[20..24].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Rebuild a history from `snapshot`, under `limits` (which may differ from the
    /// writer's: what no longer fits is evicted and counted), with `seed` naming new
    /// epochs. Topics keep their epochs, ids and messages; ages are measured from `now`,
    /// so the time the process was down does not count towards the ttl. No subscriber
    /// survives a restart: every record starts released at `now`, and lingers.
    pub fn restore(
        snapshot: &[u8],
        limits: Limits,
        seed: u64,
        now: Instant,
    ) -> Result<History, SnapshotError> {
        let mut r = Reader(open(snapshot)?);
        let mut h = History::new(limits, seed);
        h.clock = Some(now);

        h.published = r.u64("the id counter")?;
        if h.published > MAX_ID {
            return Err(malformed(format!(
                "id counter {} is past 2^53",
                h.published
            )));
        }
        let topics = r.u32("the topic count")? as usize;
        // (key, first kept id, kept, seen so far). No capacity from the count: it is
        // untrusted until the bytes behind it have been read.
        let mut table: Vec<(usize, u64, u32, u32)> = Vec::new();
        for i in 0..topics {
            let len = r.u16("a topic name")? as usize;
            let name = std::str::from_utf8(r.take(len, "a topic name")?)
                .map_err(|_| malformed(format!("topic {i}: name is not UTF-8")))?;
            topic::check_name(name).map_err(|e| malformed(format!("topic {name:?}: {e}")))?;
            let len = r.u8("an epoch")? as usize;
            let epoch = r.take(len, "an epoch")?;
            let epoch_ok = (1..=MAX_EPOCH_LEN).contains(&epoch.len())
                && epoch
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-');
            if !epoch_ok {
                return Err(malformed(format!("topic {name:?}: bad epoch")));
            }
            let base = r.u64("a topic")?;
            let last_id = r.u64("a topic")?;
            let kept = r.u32("a topic")?;
            if base > last_id || last_id > h.published || u64::from(kept) > last_id - base {
                return Err(malformed(format!(
                    "topic {name:?}: ids {base}..={last_id} with {kept} kept \
                     and {} issued in all",
                    h.published
                )));
            }
            if h.by_name.contains_key(name) {
                return Err(malformed(format!("topic {name:?} appears twice")));
            }
            let name: Rc<str> = Rc::from(name);
            // Held while it is rebuilt, so no record is dropped halfway; released below.
            let key = h.records.insert(Record {
                name: name.clone(),
                epoch: Rc::from(std::str::from_utf8(epoch).expect("checked ASCII")),
                base,
                last_id,
                entries: VecDeque::new(),
                retained: true,
                released: None,
                armed: None,
            });
            h.by_name.insert(name, key);
            table.push((key, last_id - u64::from(kept) + 1, kept, 0));
        }

        let count = r.u64("the message count")?;
        let kept: u64 = table.iter().map(|t| u64::from(t.2)).sum();
        if count != kept {
            return Err(malformed(format!(
                "{count} messages, but the topics keep {kept}"
            )));
        }
        let mut previous_age = u64::MAX;
        for n in 0..count {
            let t = r.u32("a message")? as usize;
            let age = r.u64("a message")?;
            let (start, end) = (r.u32("a message")?, r.u32("a message")?);
            let len = r.u32("a message")? as usize;
            let frame = r.take(len, "a message's frame")?;
            let Some(slot) = table.get_mut(t) else {
                return Err(malformed(format!("message {n}: no topic {t}")));
            };
            if slot.3 == slot.2 {
                return Err(malformed(format!(
                    "message {n}: its topic keeps {}",
                    slot.2
                )));
            }
            if age > previous_age {
                return Err(malformed(format!(
                    "message {n}: younger than the one before"
                )));
            }
            if start > end || end as usize > len {
                return Err(malformed(format!(
                    "message {n}: data {start}..{end} outside its {len}-byte frame"
                )));
            }
            previous_age = age;
            let (key, id) = (slot.0, slot.1 + u64::from(slot.3));
            slot.3 += 1;
            // Past its ttl already, or older than this machine's monotonic clock can
            // express (a snapshot from before a reboot): it has expired.
            match now.checked_sub(Duration::from_nanos(age)) {
                // Restored with history off: dropped for the size bound, and counted.
                Some(at) if !due(at, limits.ttl, now) && limits.size == 0 => {
                    h.evicted.size += 1;
                }
                Some(at) if !due(at, limits.ttl, now) => {
                    // Its own allocation, not a slice of `snapshot`: one long-lived
                    // message would otherwise pin the whole file in memory.
                    let frame = Bytes::copy_from_slice(frame);
                    h.keep(key, id, frame, start as usize..end as usize, at);
                }
                _ => h.evicted.ttl += 1,
            }
        }
        if !r.0.is_empty() {
            return Err(malformed(format!(
                "{} bytes after the last message",
                r.0.len()
            )));
        }
        for (key, ..) in table {
            h.release_key(key, now);
        }
        Ok(h)
    }
}

/// Whether a slot names a message still kept (see `Queued` on reused keys).
fn is_live(records: &Slab<Record>, q: Queued) -> bool {
    records.get(q.key).is_some_and(|r| {
        r.entries.front().is_some_and(|first| first.id <= q.id) && q.id <= r.last_id
    })
}

/// Whether something that began at `since` has lasted `ttl` by `now`.
fn due(since: Instant, ttl: Duration, now: Instant) -> bool {
    since
        .checked_add(ttl)
        .is_some_and(|deadline| deadline <= now)
}

// ---- snapshot encoding -------------------------------------------------------------

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn malformed(what: String) -> SnapshotError {
    SnapshotError::Malformed(what)
}

/// Check the header and the checksum; the body, if they hold.
fn open(snapshot: &[u8]) -> Result<&[u8], SnapshotError> {
    let found = snapshot.len() as u64;
    let magic_len = SNAPSHOT_MAGIC.len().min(snapshot.len());
    if snapshot.is_empty() || snapshot[..magic_len] != SNAPSHOT_MAGIC[..magic_len] {
        return Err(SnapshotError::NotASnapshot);
    }
    if snapshot.len() < HEADER_LEN {
        let expected = HEADER_LEN as u64;
        return Err(SnapshotError::Truncated { expected, found });
    }
    let version = u32::from_le_bytes(snapshot[8..12].try_into().expect("4 bytes"));
    if version != SNAPSHOT_VERSION {
        let supported = SNAPSHOT_VERSION;
        return Err(SnapshotError::UnsupportedVersion {
            found: version,
            supported,
        });
    }
    let body_len = u64::from_le_bytes(snapshot[12..20].try_into().expect("8 bytes"));
    let stored = u32::from_le_bytes(snapshot[20..24].try_into().expect("4 bytes"));
    let body = &snapshot[HEADER_LEN..];
    let expected = (HEADER_LEN as u64).saturating_add(body_len);
    if found < expected {
        return Err(SnapshotError::Truncated { expected, found });
    }
    if found > expected {
        return Err(SnapshotError::TrailingBytes { expected, found });
    }
    let computed = crc32(body);
    if computed != stored {
        return Err(SnapshotError::ChecksumMismatch { stored, computed });
    }
    Ok(body)
}

/// Reads a snapshot body front to back; running out is a malformed body (the header's
/// length and checksum held, so the writer wrote it short).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], SnapshotError> {
        if self.0.len() < n {
            return Err(malformed(format!("ends inside {what}")));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, SnapshotError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self, what: &str) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self, what: &str) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
}

/// CRC-32 as in zlib and PNG (reflected, polynomial 0xEDB88320), one table lookup per
/// byte. It detects every error burst up to 32 bits long, so any single corrupted byte.
/// Hand-written rather than a crate: twenty lines, checked against the standard value.
fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::codec as ws;
    use std::collections::{BTreeMap, HashSet};

    const SEED: u64 = 0x1234_5678_9abc_def0;

    fn limits(size: usize, ttl_ms: u64, memory: usize) -> Limits {
        Limits {
            size,
            ttl: Duration::from_millis(ttl_ms),
            memory,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Frames as the hub does (`message_frame`): `data` is the payload's last JSON value,
    /// followed only by the envelope's closing brace, whatever the header's length.
    fn envelope(topic: &str, data: &str) -> impl FnOnce(u64) -> (Bytes, Range<usize>) {
        let (topic, data) = (topic.to_string(), data.to_string());
        move |id| {
            let payload =
                format!(r#"{{"op":"message","topic":"{topic}","id":{id},"data":{data}}}"#);
            let frame = ws::text_frame(payload.as_bytes());
            let end = frame.len() - 1;
            (frame, end - data.len()..end)
        }
    }

    fn ids(messages: Messages<'_>) -> Vec<u64> {
        messages.map(Message::id).collect()
    }

    impl History {
        /// Every invariant the structure relies on, checked the slow way.
        fn assert_consistent(&self) {
            let mut messages = 0;
            let mut bytes = 0;
            for (key, r) in &self.records {
                assert_eq!(self.by_name[&r.name], key);
                assert!(r.base <= r.last_id && r.last_id <= self.published);
                assert!(r.entries.len() <= self.limits.size);
                let first = r.last_id + 1 - r.entries.len() as u64;
                for (i, m) in r.entries.iter().enumerate() {
                    assert_eq!(m.id, first + i as u64, "kept ids are the newest run");
                    assert!(m.data.0 <= m.data.1 && m.data.1 as usize <= m.frame.len());
                }
                assert!(first > r.base || r.entries.is_empty());
                messages += r.entries.len();
                bytes += r.entries.iter().map(Message::cost).sum::<usize>();
            }
            assert_eq!(self.by_name.len(), self.records.len());
            assert_eq!((self.messages, self.bytes), (messages, bytes));
            assert!(self.bytes <= self.limits.memory);
            let live: Vec<Queued> = self
                .queue
                .iter()
                .copied()
                .filter(|&q| is_live(&self.records, q))
                .collect();
            assert_eq!(
                live.len(),
                self.messages,
                "every kept message is queued once"
            );
            assert!(
                self.queue
                    .front()
                    .is_none_or(|&q| is_live(&self.records, q))
            );
            assert!(self.queue.len() <= 2 * self.messages + COMPACT_SLACK);
            let at = |q: &Queued| {
                let r = &self.records[q.key];
                r.entries[(q.id - r.entries[0].id) as usize].at
            };
            assert!(live.windows(2).all(|w| at(&w[0]) <= at(&w[1])));
        }
    }

    // ---- resume ----------------------------------------------------------------------

    #[test]
    fn resume_returns_exactly_the_ids_after_since_and_recovers() {
        let now = Instant::now();
        let mut h = History::new(limits(10, 60_000, 1 << 20), SEED);
        let start = h.retain("news");
        for i in 0..5 {
            h.append("news", now, envelope("news", &i.to_string()));
        }
        let r = h.resume("news", &start.epoch, start.last_id + 2).unwrap();
        assert_eq!(r.outcome, Outcome::Recovered);
        assert!(r.recovered());
        assert_eq!(r.position.last_id, start.last_id + 5);
        assert_eq!(r.position.epoch, start.epoch);
        let data: Vec<&[u8]> = r.messages.clone().map(Message::data).collect();
        assert_eq!(data, [b"2", b"3", b"4"]);
        let l = start.last_id;
        assert_eq!(ids(r.messages), [l + 3, l + 4, l + 5]);
    }

    #[test]
    fn resume_at_the_last_id_recovers_nothing_to_replay() {
        let now = Instant::now();
        let mut h = History::new(limits(10, 60_000, 1 << 20), SEED);
        h.retain("t");
        let last = h.append("t", now, envelope("t", "1"));
        let r = h.resume("t", &last.epoch, last.id).unwrap();
        assert_eq!((r.outcome, r.messages.len()), (Outcome::Recovered, 0));
        // Also with nothing ever published: a fresh subscriber's position resumes.
        let p = h.retain("quiet");
        let r = h.resume("quiet", &p.epoch, p.last_id).unwrap();
        assert_eq!((r.outcome, r.messages.len()), (Outcome::Recovered, 0));
    }

    #[test]
    fn resume_from_before_what_is_kept_is_a_gap_with_what_is_left() {
        let now = Instant::now();
        let mut h = History::new(limits(3, 60_000, 1 << 20), SEED);
        let start = h.retain("t");
        for i in 0..6 {
            h.append("t", now, envelope("t", &i.to_string()));
        }
        let l = start.last_id;
        let r = h.resume("t", &start.epoch, l + 1).unwrap();
        assert_eq!(r.outcome, Outcome::Gap);
        assert!(!r.recovered());
        assert_eq!(ids(r.messages), [l + 4, l + 5, l + 6]);
        // One id short of the kept run is enough to recover.
        let r = h.resume("t", &start.epoch, l + 3).unwrap();
        assert_eq!(r.outcome, Outcome::Recovered);
        assert_eq!(ids(r.messages), [l + 4, l + 5, l + 6]);
    }

    #[test]
    fn resume_with_another_epoch_returns_everything_the_current_one_holds() {
        let now = Instant::now();
        let mut h = History::new(limits(10, 60_000, 1 << 20), SEED);
        let start = h.retain("t");
        h.append("t", now, envelope("t", "1"));
        h.append("t", now, envelope("t", "2"));
        let r = h
            .resume("t", "some-other-epoch", start.last_id + 1)
            .unwrap();
        assert_eq!(r.outcome, Outcome::EpochChanged);
        assert_eq!(r.position.epoch, start.epoch);
        assert_eq!(ids(r.messages), [start.last_id + 1, start.last_id + 2]);
    }

    #[test]
    fn resume_naming_ids_the_epoch_never_issued_is_an_epoch_change() {
        let now = Instant::now();
        let mut h = History::new(limits(10, 60_000, 1 << 20), SEED);
        // Another topic's ids move the process counter, so "t" starts its epoch after 2.
        h.append("other", now, envelope("other", "0"));
        h.append("other", now, envelope("other", "0"));
        let start = h.retain("t");
        assert_eq!(start.last_id, 2);
        h.append("t", now, envelope("t", "1"));
        for since in [4, 100, 1] {
            let r = h.resume("t", &start.epoch, since).unwrap();
            assert_eq!(r.outcome, Outcome::EpochChanged, "since {since}");
            assert_eq!(ids(r.messages), [3]);
        }
        assert!(h.resume("never-seen", &start.epoch, 0).is_none());
    }

    #[test]
    fn data_range_names_the_json_inside_the_frame() {
        let now = Instant::now();
        let mut h = History::new(limits(10, 60_000, 1 << 20), SEED);
        h.retain("t");
        // Long enough for the 16-bit extended length header (RFC 6455 §5.2).
        let long = format!(r#"{{"text":"{}"}}"#, "x".repeat(300));
        for data in [r#"{"a":[1,2]}"#, &long] {
            let appended = h.append("t", now, envelope("t", data));
            let m = h.messages_of("t").last().unwrap();
            assert_eq!(m.data(), data.as_bytes());
            assert_eq!(&m.data_bytes()[..], data.as_bytes());
            assert_eq!(m.frame(), &appended.frame, "the fan-out's frame, shared");
        }
    }

    // ---- bounds ----------------------------------------------------------------------

    #[test]
    fn each_topic_keeps_at_most_size_messages() {
        let now = Instant::now();
        let mut h = History::new(limits(2, 60_000, 1 << 20), SEED);
        for i in 0..5 {
            h.append("a", now, envelope("a", &i.to_string()));
        }
        h.append("b", now, envelope("b", "0"));
        assert_eq!(ids(h.messages_of("a")), [4, 5]);
        assert_eq!(ids(h.messages_of("b")), [6]);
        assert_eq!(h.messages(), 3);
        assert_eq!(
            h.evictions(),
            Evictions {
                size: 3,
                ..Evictions::default()
            }
        );
        h.assert_consistent();
    }

    #[test]
    fn messages_expire_after_ttl_and_next_expiry_says_when() {
        let t0 = Instant::now();
        let mut h = History::new(limits(10, 100, 1 << 20), SEED);
        h.retain("t");
        assert_eq!(h.next_expiry(), None);
        h.append("t", t0, envelope("t", "1"));
        h.append("t", t0 + ms(30), envelope("t", "2"));
        assert_eq!(h.next_expiry(), Some(t0 + ms(100)));
        assert_eq!(h.expire(t0 + ms(99)), 0);
        assert_eq!(h.expire(t0 + ms(100)), 1);
        assert_eq!(ids(h.messages_of("t")), [2]);
        assert_eq!(h.next_expiry(), Some(t0 + ms(130)));
        assert_eq!(h.expire(t0 + ms(500)), 1);
        assert_eq!((h.messages(), h.bytes(), h.evictions().ttl), (0, 0, 2));
        assert_eq!(h.next_expiry(), None, "a held record does not linger");
        assert!(h.position("t").is_some());
    }

    #[test]
    fn memory_cap_evicts_the_oldest_across_topics() {
        let t0 = Instant::now();
        let frame_len = envelope("a", "0")(1).0.len();
        let cap = 3 * (frame_len + MESSAGE_OVERHEAD);
        let mut h = History::new(limits(10, 60_000, cap), SEED);
        // Both start their epochs at 0, so each topic's ids are 1, 2, 3 …
        h.retain("a");
        h.retain("b");
        h.append("a", t0, envelope("a", "0"));
        h.append("b", t0 + ms(1), envelope("b", "0"));
        h.append("a", t0 + ms(2), envelope("a", "0"));
        assert_eq!(h.bytes(), cap);
        // Over the cap: the oldest of all, a's 1, goes.
        h.append("b", t0 + ms(3), envelope("b", "0"));
        assert_eq!(ids(h.messages_of("a")), [2]);
        assert_eq!(ids(h.messages_of("b")), [1, 2]);
        // Then b's 1, though a is the topic that grew.
        h.append("a", t0 + ms(4), envelope("a", "0"));
        assert_eq!(ids(h.messages_of("a")), [2, 3]);
        assert_eq!(ids(h.messages_of("b")), [2]);
        let memory_only = Evictions {
            memory: 2,
            ..Evictions::default()
        };
        assert_eq!(h.evictions(), memory_only);
        h.assert_consistent();
    }

    #[test]
    fn a_message_too_big_for_the_whole_cap_is_not_kept_nor_flushes_other_topics() {
        let now = Instant::now();
        let mut h = History::new(limits(10, 60_000, 1000), SEED);
        let p = h.retain("t");
        h.append("t", now, envelope("t", "1"));
        h.append("u", now, envelope("u", "1"));
        let huge = format!("\"{}\"", "x".repeat(1000));
        let appended = h.append("t", now, envelope("t", &huge));
        assert!(
            appended.frame.len() > 1000,
            "the fan-out still gets its frame"
        );
        assert_eq!(ids(h.messages_of("u")), [2]);
        // t's older message goes too: kept, it would sit before a hole.
        assert_eq!(h.messages_of("t").len(), 0);
        assert_eq!(h.evictions().memory, 2);
        let r = h.resume("t", &p.epoch, p.last_id + 1).unwrap();
        assert_eq!(r.outcome, Outcome::Gap, "never a silent gap");
        h.assert_consistent();
    }

    #[test]
    fn history_off_stores_nothing_but_ids_stay_one_apart_in_an_epoch() {
        let now = Instant::now();
        let mut h = History::new(limits(0, 60_000, 1 << 20), SEED);
        let start = h.retain("t");
        let got: Vec<Appended> = (0..3)
            .map(|_| h.append("t", now, envelope("t", "1")))
            .collect();
        let l = start.last_id;
        assert_eq!(
            got.iter().map(|a| a.id).collect::<Vec<_>>(),
            [l + 1, l + 2, l + 3]
        );
        assert!(got.iter().all(|a| a.epoch == start.epoch));
        assert_eq!(
            (h.messages(), h.bytes(), h.evictions()),
            (0, 0, Evictions::default())
        );
        let r = h.resume("t", &start.epoch, l + 1).unwrap();
        assert_eq!((r.outcome, r.messages.len()), (Outcome::Gap, 0));
        let r = h.resume("t", &start.epoch, l + 3).unwrap();
        assert_eq!(r.outcome, Outcome::Recovered);
        // Nobody holds "u" and nothing is kept: no record survives, but ids still rise.
        let first = h.append("u", now, envelope("u", "1"));
        let second = h.append("u", now, envelope("u", "1"));
        assert!(second.id > first.id && second.epoch != first.epoch);
        assert_eq!(h.topics(), 1);
    }

    // ---- records ---------------------------------------------------------------------

    #[test]
    fn a_released_topic_keeps_its_history_until_the_ttl_runs_out() {
        let t0 = Instant::now();
        let mut h = History::new(limits(10, 100, 1 << 20), SEED);
        let start = h.retain("t");
        h.append("t", t0, envelope("t", "1"));
        h.release("t", t0 + ms(10));
        h.expire(t0 + ms(99));
        let r = h.resume("t", &start.epoch, start.last_id).unwrap();
        assert_eq!((r.outcome, r.messages.len()), (Outcome::Recovered, 1));
        // The message expires at 100; the record lingers to 110 (release + ttl), so a
        // client that saw the message still resumes in its epoch.
        h.expire(t0 + ms(100));
        let r = h.resume("t", &start.epoch, start.last_id + 1).unwrap();
        assert_eq!((r.outcome, r.messages.len()), (Outcome::Recovered, 0));
        assert_eq!(h.next_expiry(), Some(t0 + ms(110)));
        h.expire(t0 + ms(110));
        assert_eq!((h.topics(), h.next_expiry()), (0, None));
        assert!(h.position("t").is_none());
    }

    #[test]
    fn a_retained_topic_keeps_its_epoch_with_nothing_kept() {
        let t0 = Instant::now();
        let mut h = History::new(limits(10, 100, 1 << 20), SEED);
        let start = h.retain("t");
        h.append("t", t0, envelope("t", "1"));
        h.expire(t0 + ms(10_000));
        assert_eq!(h.messages(), 0);
        assert_eq!(h.position("t").unwrap().epoch, start.epoch);
    }

    #[test]
    fn a_dropped_topic_comes_back_in_a_new_epoch_with_ids_still_rising() {
        let t0 = Instant::now();
        let mut h = History::new(limits(10, 100, 1 << 20), SEED);
        let before = h.retain("t");
        let last = h.append("t", t0, envelope("t", "1"));
        h.append("other", t0, envelope("other", "1"));
        h.release("t", t0);
        h.expire(t0 + ms(100));
        assert!(
            h.position("t").is_none(),
            "no subscribers, no messages: no record"
        );
        let after = h.retain("t");
        assert_ne!(after.epoch, before.epoch);
        assert!(after.last_id > last.id);
        let next = h.append("t", t0 + ms(100), envelope("t", "1"));
        assert_eq!(next.id, after.last_id + 1);
        let r = h.resume("t", &before.epoch, last.id).unwrap();
        assert_eq!(r.outcome, Outcome::EpochChanged);
        assert_eq!(ids(r.messages), [next.id]);
    }

    #[test]
    fn retaining_again_within_the_linger_keeps_the_epoch() {
        let t0 = Instant::now();
        let mut h = History::new(limits(10, 100, 1 << 20), SEED);
        let start = h.retain("t");
        h.release("t", t0);
        assert_eq!(h.retain("t"), start);
        // The linger's slot comes due, finds the record held, and leaves it.
        h.expire(t0 + ms(1000));
        assert_eq!(h.position("t"), Some(start));
    }

    #[test]
    fn an_earlier_now_is_read_as_the_latest_seen() {
        let t0 = Instant::now();
        let mut h = History::new(limits(10, 100, 1 << 20), SEED);
        h.retain("t");
        h.append("t", t0 + ms(50), envelope("t", "1"));
        h.append("t", t0, envelope("t", "2"));
        let at: Vec<Instant> = h.messages_of("t").map(Message::appended_at).collect();
        assert_eq!(at, [t0 + ms(50), t0 + ms(50)]);
        h.assert_consistent();
    }

    #[test]
    fn stale_queue_slots_are_compacted_away() {
        let now = Instant::now();
        let mut h = History::new(limits(1, 3_600_000, 1 << 20), SEED);
        h.retain("t");
        for _ in 0..10_000 {
            h.append("t", now, envelope("t", "1"));
        }
        assert_eq!(h.messages(), 1);
        assert!(h.queue.len() <= 2 + COMPACT_SLACK, "{}", h.queue.len());
        h.assert_consistent();
    }

    #[test]
    fn epochs_differ_within_a_process_and_across_seeds() {
        let mut a = Epochs { seed: 1, minted: 0 };
        let mut b = Epochs {
            seed: 0x11,
            minted: 0,
        };
        let names: Vec<Rc<str>> = (0..20).flat_map(|_| [a.mint(), b.mint()]).collect();
        let unique: HashSet<&Rc<str>> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        assert_eq!(&*names[0], "1-1");
        assert!(wall_clock_seed() > 0);
    }

    // ---- against a naive reference ---------------------------------------------------

    struct RefTopic {
        /// Which creation of the topic this is: a new one is a new epoch.
        generation: u64,
        base: u64,
        last_id: u64,
        retained: bool,
        released: Option<Instant>,
    }

    struct RefMessage {
        topic: String,
        id: u64,
        at: Instant,
        frame: Bytes,
    }

    /// History the obvious way: one Vec of every kept message in append order, scanned.
    struct Reference {
        limits: Limits,
        published: u64,
        generations: u64,
        topics: BTreeMap<String, RefTopic>,
        kept: Vec<RefMessage>,
        evicted: Evictions,
    }

    impl Reference {
        fn new(limits: Limits) -> Reference {
            Reference {
                limits,
                published: 0,
                generations: 0,
                topics: BTreeMap::new(),
                kept: Vec::new(),
                evicted: Evictions::default(),
            }
        }

        fn due(&self, since: Instant, now: Instant) -> bool {
            since.checked_add(self.limits.ttl).is_some_and(|d| d <= now)
        }

        fn topic(&mut self, name: &str) -> &mut RefTopic {
            if !self.topics.contains_key(name) {
                self.generations += 1;
                let t = RefTopic {
                    generation: self.generations,
                    base: self.published,
                    last_id: self.published,
                    retained: false,
                    released: None,
                };
                self.topics.insert(name.to_string(), t);
            }
            self.topics.get_mut(name).unwrap()
        }

        fn bytes(&self) -> usize {
            self.kept
                .iter()
                .map(|m| m.frame.len() + MESSAGE_OVERHEAD)
                .sum()
        }

        fn append(&mut self, name: &str, frame: Bytes, now: Instant) -> u64 {
            let t = self.topic(name);
            t.last_id += 1;
            let id = t.last_id;
            self.published += 1;
            self.keep(RefMessage {
                topic: name.to_string(),
                id,
                at: now,
                frame,
            });
            self.collect(now);
            id
        }

        fn keep(&mut self, m: RefMessage) {
            if self.limits.size == 0 {
                return;
            }
            if m.frame.len() + MESSAGE_OVERHEAD > self.limits.memory {
                let before = self.kept.len();
                self.kept.retain(|k| k.topic != m.topic);
                self.evicted.memory += 1 + (before - self.kept.len()) as u64;
                return;
            }
            let name = m.topic.clone();
            self.kept.push(m);
            while self.kept.iter().filter(|k| k.topic == name).count() > self.limits.size {
                let i = self.kept.iter().position(|k| k.topic == name).unwrap();
                self.kept.remove(i);
                self.evicted.size += 1;
            }
            while self.bytes() > self.limits.memory {
                self.kept.remove(0);
                self.evicted.memory += 1;
            }
        }

        fn retain(&mut self, name: &str) {
            self.topic(name).retained = true;
        }

        fn release(&mut self, name: &str, now: Instant) {
            if let Some(t) = self.topics.get_mut(name) {
                t.retained = false;
                t.released = Some(now);
            }
            self.collect(now);
        }

        fn expire(&mut self, now: Instant) {
            let before = self.kept.len();
            let ttl = self.limits.ttl;
            self.kept
                .retain(|m| m.at.checked_add(ttl).is_none_or(|d| d > now));
            self.evicted.ttl += (before - self.kept.len()) as u64;
            self.collect(now);
        }

        /// Drop every record nothing needs: not held, nothing kept, linger over.
        fn collect(&mut self, now: Instant) {
            let ttl = self.limits.ttl;
            let kept = &self.kept;
            self.topics.retain(|name, t| {
                let lingering = t
                    .released
                    .is_some_and(|r| r.checked_add(ttl).is_none_or(|d| d > now));
                t.retained || lingering || kept.iter().any(|m| m.topic == *name)
            });
        }

        /// What a restart does: fresh counters, the new limits applied to what was kept
        /// oldest first, and every record released at `now`.
        fn restore(&mut self, limits: Limits, now: Instant) {
            self.limits = limits;
            self.evicted = Evictions::default();
            for t in self.topics.values_mut() {
                t.retained = true;
            }
            for m in std::mem::take(&mut self.kept) {
                if self.due(m.at, now) {
                    self.evicted.ttl += 1;
                } else if self.limits.size == 0 {
                    self.evicted.size += 1;
                } else {
                    self.keep(m);
                }
            }
            for t in self.topics.values_mut() {
                t.retained = false;
                t.released = Some(now);
            }
            self.collect(now);
        }

        fn resume(&self, name: &str, same_epoch: bool, since: u64) -> Option<(Outcome, Vec<u64>)> {
            let t = self.topics.get(name)?;
            let held: Vec<u64> = self
                .kept
                .iter()
                .filter(|m| m.topic == name)
                .map(|m| m.id)
                .collect();
            if !same_epoch || since > t.last_id || since < t.base {
                return Some((Outcome::EpochChanged, held));
            }
            let missed: Vec<u64> = (since + 1..=t.last_id).collect();
            if missed.iter().all(|id| held.contains(id)) {
                return Some((Outcome::Recovered, missed));
            }
            Some((
                Outcome::Gap,
                held.into_iter().filter(|&id| id > since).collect(),
            ))
        }

        /// The soonest moment something is due: a message's ttl, an idle record's linger.
        fn next_event(&self) -> Option<Instant> {
            let messages = self
                .kept
                .iter()
                .filter_map(|m| m.at.checked_add(self.limits.ttl));
            let records = self.topics.iter().filter_map(|(name, t)| {
                let idle = !t.retained && !self.kept.iter().any(|m| m.topic == *name);
                t.released.filter(|_| idle)?.checked_add(self.limits.ttl)
            });
            messages.chain(records).min()
        }
    }

    /// The epoch each reference generation was seen with, and every epoch seen.
    #[derive(Default)]
    struct SeenEpochs {
        by_generation: BTreeMap<u64, Rc<str>>,
        seen: HashSet<Rc<str>>,
    }

    fn compare(h: &History, r: &Reference, epochs: &mut SeenEpochs) {
        h.assert_consistent();
        assert_eq!(h.topics(), r.topics.len());
        assert_eq!((h.messages(), h.bytes()), (r.kept.len(), r.bytes()));
        assert_eq!(h.evictions(), r.evicted);
        for (name, t) in &r.topics {
            let p = h.position(name).unwrap();
            assert_eq!(p.last_id, t.last_id, "{name}");
            match epochs.by_generation.get(&t.generation) {
                Some(epoch) => assert_eq!(&p.epoch, epoch, "{name} kept its epoch"),
                None => {
                    assert!(
                        epochs.seen.insert(p.epoch.clone()),
                        "{name}: a reused epoch"
                    );
                    epochs.by_generation.insert(t.generation, p.epoch);
                }
            }
            let got: Vec<(u64, &Bytes)> = h.messages_of(name).map(|m| (m.id, &m.frame)).collect();
            let want: Vec<(u64, &Bytes)> = r
                .kept
                .iter()
                .filter(|m| m.topic == *name)
                .map(|m| (m.id, &m.frame))
                .collect();
            assert_eq!(got, want, "{name}");
        }
        if let Some(due) = r.next_event() {
            assert!(
                h.next_expiry().is_some_and(|n| n <= due),
                "would sleep past {due:?}"
            );
        }
    }

    /// Random appends, holds, releases, time steps, resumes and restarts, under bounds
    /// of every kind, against the reference.
    #[test]
    fn matches_a_naive_reference_under_a_random_workload() {
        let configs = [
            limits(4, 100, 2000),
            limits(2, 1000, 1 << 20),
            limits(0, 50, 1 << 20),
            limits(1000, 3_600_000, 3000),
            limits(3, 0, 1000),
            limits(5, 200, 0),
            // The occasional big message cannot fit at all.
            limits(6, 300, 700),
            Limits {
                size: 8,
                ttl: Duration::MAX,
                memory: 5000,
            },
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let start = Instant::now();
        // That the workload reaches every outcome and every kind of eviction.
        let mut outcomes = [0; 3];
        let mut evicted = Evictions::default();
        let mut count = |e: Evictions| {
            evicted.size += e.size;
            evicted.ttl += e.ttl;
            evicted.memory += e.memory;
        };
        for (c, &config) in configs.iter().enumerate() {
            let mut h = History::new(config, SEED);
            let mut r = Reference::new(config);
            let mut epochs = SeenEpochs::default();
            let mut now = start;
            let mut restarts = 0;
            for step in 0..5_000 {
                let roll = next();
                let topic = format!("t{}", (roll >> 8) % 6);
                match roll % 100 {
                    0..=44 => {
                        let big = if (roll >> 24) % 10 == 0 { 600 } else { 0 };
                        let len = big + (roll >> 16) as usize % 120;
                        let data = format!("\"{}\"", "a".repeat(len));
                        let appended = h.append(&topic, now, envelope(&topic, &data));
                        let id = r.append(&topic, appended.frame.clone(), now);
                        assert_eq!(appended.id, id, "config {c} step {step}");
                    }
                    45..=59 => {
                        h.retain(&topic);
                        r.retain(&topic);
                    }
                    60..=74 => {
                        h.release(&topic, now);
                        r.release(&topic, now);
                    }
                    75..=89 => {
                        now += ms((roll >> 16) % 40);
                        h.expire(now);
                        r.expire(now);
                    }
                    90..=97 => {
                        let Some(p) = h.position(&topic) else {
                            assert!(r.resume(&topic, true, 0).is_none());
                            continue;
                        };
                        let same = (roll >> 16) % 4 != 0;
                        let epoch = if same { &*p.epoch } else { "elsewhere" };
                        let since = (p.last_id + 3).saturating_sub((roll >> 20) % 12);
                        let got = h.resume(&topic, epoch, since).unwrap();
                        outcomes[got.outcome as usize] += 1;
                        let got = (got.outcome, ids(got.messages));
                        assert_eq!(Some(got), r.resume(&topic, same, since), "step {step}");
                    }
                    _ => {
                        // A restart, sometimes under other limits.
                        let limits = configs[(roll >> 16) as usize % configs.len()];
                        let limits = if (roll >> 24) % 2 == 0 {
                            config
                        } else {
                            limits
                        };
                        restarts += 1;
                        count(h.evictions());
                        let snapshot = h.snapshot(now);
                        h = History::restore(&snapshot, limits, SEED + restarts, now).unwrap();
                        r.restore(limits, now);
                    }
                }
                compare(&h, &r, &mut epochs);
            }
            count(h.evictions());
        }
        assert!(outcomes.iter().all(|&n| n > 50), "{outcomes:?}");
        let Evictions { size, ttl, memory } = evicted;
        assert!(size > 50 && ttl > 50 && memory > 50, "{evicted:?}");
    }

    // ---- snapshot --------------------------------------------------------------------

    /// Two topics with messages at different ages, one held, one released and lingering.
    fn sample(t0: Instant) -> History {
        let mut h = History::new(limits(3, 1000, 1 << 20), SEED);
        h.retain("news");
        h.retain("chat/1");
        h.append("news", t0, envelope("news", "1"));
        h.append("chat/1", t0 + ms(10), envelope("chat/1", r#"{"m":"hi"}"#));
        for i in 0..3 {
            h.append("news", t0 + ms(20 + i), envelope("news", &i.to_string()));
        }
        h.release("chat/1", t0 + ms(30));
        h
    }

    #[test]
    fn a_snapshot_round_trip_keeps_epochs_ids_messages_and_ages() {
        let t0 = Instant::now();
        let h = sample(t0);
        let taken = t0 + ms(40);
        let bytes = h.snapshot(taken);
        // The new process starts later; the downtime does not age the messages.
        let later = taken + Duration::from_secs(5);
        let restored = History::restore(&bytes, h.limits(), SEED + 1, later).unwrap();
        restored.assert_consistent();
        assert_eq!(restored.topics(), 2);
        assert_eq!(
            (restored.messages(), restored.bytes()),
            (h.messages(), h.bytes())
        );
        assert_eq!(restored.evictions(), Evictions::default());
        for topic in ["news", "chat/1"] {
            let p = h.position(topic).unwrap();
            assert_eq!(restored.position(topic), Some(p.clone()));
            let before: Vec<_> = h
                .messages_of(topic)
                .map(|m| (m.id, m.frame.clone(), m.data, taken - m.at))
                .collect();
            let after: Vec<_> = restored
                .messages_of(topic)
                .map(|m| (m.id, m.frame.clone(), m.data, later - m.at))
                .collect();
            assert_eq!(before, after, "{topic}");
            // A client that saw everything before the first kept message loses nothing.
            let first = before[0].0;
            let r = restored.resume(topic, &p.epoch, first - 1).unwrap();
            assert_eq!(r.outcome, Outcome::Recovered);
        }
        // The oldest kept message is chat/1's, 30 ms old when the snapshot was taken.
        assert_eq!(restored.next_expiry(), Some(later + ms(1000 - 30)));
        // The id counter came along: a new topic's ids are past every old one.
        let mut restored = restored;
        let fresh = restored.append("new", later, envelope("new", "1"));
        assert!(fresh.id > h.published);
        assert!(
            !h.by_name
                .keys()
                .any(|t| h.position(t).unwrap().epoch == fresh.epoch)
        );
    }

    #[test]
    fn a_restore_applies_the_new_limits_and_counts_what_they_evict() {
        let t0 = Instant::now();
        let h = sample(t0);
        let bytes = h.snapshot(t0 + ms(40));
        let smaller = limits(2, 1000, 1 << 20);
        let restored = History::restore(&bytes, smaller, SEED + 1, t0 + ms(40)).unwrap();
        assert_eq!(ids(restored.messages_of("news")), [3, 4]);
        assert_eq!(restored.evictions().size, 1);
        let shorter = limits(3, 25, 1 << 20);
        let restored = History::restore(&bytes, shorter, SEED + 1, t0 + ms(40)).unwrap();
        assert_eq!(ids(restored.messages_of("news")), [2, 3, 4]);
        assert_eq!(restored.messages_of("chat/1").len(), 0);
        assert_eq!(restored.evictions().ttl, 1);
        // Its message expired, but the record lingers: its epoch is not lost.
        assert_eq!(restored.position("chat/1"), h.position("chat/1"));
        restored.assert_consistent();
    }

    #[test]
    fn a_snapshot_of_nothing_restores_to_nothing() {
        let now = Instant::now();
        let h = History::new(limits(3, 1000, 1 << 20), SEED);
        let restored = History::restore(&h.snapshot(now), h.limits(), SEED, now).unwrap();
        assert_eq!((restored.topics(), restored.messages()), (0, 0));
    }

    #[test]
    fn wrong_magic_version_and_length_are_named() {
        let now = Instant::now();
        let good = sample(now).snapshot(now);
        let l = sample(now).limits();
        let restore = |b: &[u8]| History::restore(b, l, SEED, now).err();
        assert_eq!(restore(b"{\"json\":1}"), Some(SnapshotError::NotASnapshot));
        assert_eq!(restore(b""), Some(SnapshotError::NotASnapshot));
        let mut v2 = good.clone();
        v2[8] = 2;
        assert_eq!(
            restore(&v2),
            Some(SnapshotError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        );
        let cut = restore(&good[..good.len() - 1]).unwrap();
        assert!(matches!(cut, SnapshotError::Truncated { .. }), "{cut}");
        let mut longer = good.clone();
        longer.push(0);
        let extra = restore(&longer).unwrap();
        assert!(
            matches!(extra, SnapshotError::TrailingBytes { .. }),
            "{extra}"
        );
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let err = restore(&flipped).unwrap();
        assert!(matches!(err, SnapshotError::ChecksumMismatch { .. }));
        assert!(
            err.to_string().starts_with("history snapshot: corrupt"),
            "{err}"
        );
    }

    #[test]
    fn every_truncation_and_flipped_byte_fails_cleanly() {
        let now = Instant::now();
        let good = sample(now).snapshot(now);
        let l = sample(now).limits();
        for len in 0..good.len() {
            assert!(
                History::restore(&good[..len], l, SEED, now).is_err(),
                "cut at {len}"
            );
        }
        for i in 0..good.len() {
            for mask in [0x01, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= mask;
                assert!(
                    History::restore(&bad, l, SEED, now).is_err(),
                    "byte {i} ^ {mask}"
                );
            }
        }
    }

    /// The checksum stops random corruption before the parser sees it; so that the
    /// parser itself never panics either, mutate bodies and seal them with a valid header.
    #[test]
    fn resealed_mutations_are_refused_or_restore_consistently() {
        let now = Instant::now();
        let good = sample(now).snapshot(now);
        let l = sample(now).limits();
        let body = &good[HEADER_LEN..];
        let seal = |body: &[u8]| {
            let mut out = good[..12].to_vec();
            put_u64(&mut out, body.len() as u64);
            put_u32(&mut out, crc32(body));
            out.extend_from_slice(body);
            out
        };
        assert!(History::restore(&seal(body), l, SEED, now).is_ok());
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let (mut refused, mut accepted) = (0, 0);
        for _ in 0..3_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut bad = body.to_vec();
            for k in 0..1 + seed % 3 {
                let i = (seed >> (8 + 8 * k)) as usize % bad.len();
                bad[i] = (seed >> (40 + k)) as u8;
            }
            if seed % 5 == 0 {
                bad.truncate((seed >> 12) as usize % bad.len());
            }
            match History::restore(&seal(&bad), l, SEED, now) {
                Ok(h) => {
                    h.assert_consistent();
                    accepted += 1;
                }
                Err(SnapshotError::Malformed(_)) => refused += 1,
                Err(other) => panic!("a sealed body failed the header: {other}"),
            }
        }
        assert!(
            refused > 0 && accepted > 0,
            "{refused} refused, {accepted} accepted"
        );
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }
}
