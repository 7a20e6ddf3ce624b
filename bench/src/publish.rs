//! The publisher: `POST /publish` over keep-alive HTTP/1.1 at a paced rate. Each message's
//! `data` is `[send timestamp ns, "padding"]` (or `[send timestamp ns, <a JSON payload>]`
//! with `broadcast --payload-file`), so subscribers can measure end-to-end
//! latency on the shared CLOCK_MONOTONIC, and every acknowledged publish is counted: the
//! expected deliveries are acknowledged publishes × subscribers. The ids the replies give
//! (herald's `{"delivered":K,"id":N}`) are kept too, for storm --resume and deploy to
//! check each client against.
//!
//! Every reply's response time (from writing the request to having read its whole
//! response) goes into a histogram. Requests are pipelined on schedule (open loop), or,
//! with `Plan::sequential`, sent one at a time as a web request handler that waits for its
//! publish would (closed loop, capped at the pace).
//!
//! Two ways to treat a publish that was not acknowledged: tried once and counted as
//! failed (broadcast, capacity, storm), or sent again until it is acknowledged or its time
//! is up (deploy, `Plan::retry_for`), as an application that must not lose a message
//! would. Both run the same loop.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::ids::IdSet;
use crate::stats::{Buckets, histogram, now_ns};

/// How long a reply may take before its connection is given up (the reader's timeout).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// After every server refused a connection, wait this long before trying them again.
const RECONNECT_PAUSE_NS: u64 = 50_000_000;
/// At the end, the longest wait for the replies still due.
const WIND_DOWN_NS: u64 = 12_000_000_000;

#[derive(Debug, Clone)]
pub struct Pace {
    /// Publishes per second at the start and (ramping linearly) at the end.
    pub from: f64,
    pub to: f64,
    pub duration: Duration,
}

/// What to publish, where, and what to do with a publish that was not acknowledged.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Servers in order of preference: the publisher stays on one until it refuses a
    /// connection, answers 502/503/504 or ends the connection, then moves to the next.
    pub targets: Vec<SocketAddr>,
    pub topic: String,
    /// Bytes of data per message.
    pub payload: usize,
    /// JSON to carry after the send time instead of `payload` bytes of padding
    /// (`broadcast --payload-file`): a realistic message, for compression.
    pub data: Option<String>,
    pub pace: Pace,
    /// Send a publish again (on the next server) when no connection could be opened, the
    /// reply was 502/503/504, or its connection ended before the reply, until this long
    /// after it was due; then it counts as failed. `None`: each publish is tried once.
    pub retry_for: Option<Duration>,
    /// One request at a time: the next publish is written only once the previous reply
    /// has been read, and never before its due time. A publish due while the previous
    /// one still waits for its reply goes out as soon as that reply comes; any further
    /// ones due meanwhile are skipped (`Published::skipped`), so the pace is a ceiling
    /// and a slow server lowers the rate achieved, with no catch-up burst after.
    pub sequential: bool,
}

#[derive(Debug, Default, Clone)]
pub struct Published {
    /// Publishes answered 200.
    pub acked: u64,
    /// Publishes that never got a 200: refused or lost, or (retrying) still not
    /// acknowledged when their time was up.
    pub failed: u64,
    /// Connection attempts that failed (refused, mostly, while a server restarts), and
    /// replies 503 (a draining server, or one at capacity). Tried once, every publish
    /// slot that found no connection is one of `no_connection`.
    pub no_connection: u64,
    pub unavailable: u64,
    /// Of `no_connection`: refused (ECONNREFUSED).
    pub refused: u64,
    /// Requests whose connection ended before their reply. Retrying, they are sent again,
    /// and a server that had run one before it went away delivers that message twice (a
    /// new id: no subscriber sees a duplicate id).
    pub unanswered: u64,
    /// Requests sent again (retrying), and acknowledged publishes that needed more than
    /// one send.
    pub retries: u64,
    pub retried_acked: u64,
    /// The longest from a publish's due time to its 200.
    pub longest_wait_ns: u64,
    /// Connections opened (the first, then one after each that ended), and those opened
    /// on another server than the connection before.
    pub connections: u64,
    pub failovers: u64,
    /// Acknowledged publishes per target, in `Plan::targets` order.
    pub acked_by_target: Vec<u64>,
    /// The ids of the acknowledged publishes, when the replies carry them.
    pub acked_ids: IdSet,
    /// Times an acknowledged id was not above every id acknowledged before it: the
    /// server's ids started over (a restart that lost them, or servers that do not share
    /// ids), so `acked_ids` mixes epochs.
    pub id_resets: u64,
    /// Sum of the `delivered` (or, with Redis, process) counts in the replies.
    pub delivered: u64,
    /// Response time of every reply read (whatever its status), in µs: from writing
    /// the request to having read its whole response. Pipelined, it includes the wait
    /// behind the requests ahead of it on the connection.
    pub response_us: Buckets,
    /// Sequential: publishes due while the one before was still unanswered, beyond the
    /// one sent when its reply came, and those still due when the pace ended: never
    /// sent (not failures: the server's reply time kept them from being offered).
    pub skipped: u64,
    /// The most requests that were ever unanswered at once, over all connections.
    pub max_in_flight: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// Publish to `topic` at `pace` on one server, each publish tried once, until the pace
/// ends or `stop` is set.
pub fn run(
    target: SocketAddr,
    topic: &str,
    payload: usize,
    pace: &Pace,
    stop: &AtomicBool,
) -> Published {
    run_plan(
        &Plan {
            targets: vec![target],
            topic: topic.to_string(),
            payload,
            data: None,
            pace: pace.clone(),
            retry_for: None,
            sequential: false,
        },
        stop,
    )
}

/// `run` on its own thread.
pub fn spawn(
    target: SocketAddr,
    topic: String,
    payload: usize,
    pace: Pace,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Published> {
    std::thread::spawn(move || run(target, &topic, payload, &pace, &stop))
}

/// `run_plan` on its own thread.
pub fn spawn_plan(plan: Plan, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Published> {
    std::thread::spawn(move || run_plan(&plan, &stop))
}

/// Publish as `plan` says until its pace ends or `stop` is set. Requests go out on
/// schedule, pipelined on one keep-alive connection, whatever the server's reply time: a
/// publisher that waited for each reply would lower the offered load exactly when the
/// server is busiest. Replies are read on a second thread per connection and matched to
/// their requests in order as they come. Through a restarting server it keeps going: a
/// connection the server ended (a 503 while draining says `Connection: close`) or that
/// broke is replaced before the next publish, and a refused connection is tried again
/// at the next one (retrying: on the next server, and the publish with it).
pub fn run_plan(plan: &Plan, stop: &AtomicBool) -> Published {
    let mut p = Publisher {
        plan,
        after_stamp: match &plan.data {
            Some(json) => json.clone(),
            None => format!("\"{}\"", "x".repeat(plan.payload.saturating_sub(24).max(1))),
        },
        retry_for_ns: plan.retry_for.map(|d| d.as_nanos() as u64),
        books: Books {
            out: Published {
                first_ns: now_ns(),
                acked_by_target: vec![0; plan.targets.len()],
                ..Published::default()
            },
            ..Books::default()
        },
        conn: None,
        retiring: Vec::new(),
        at: 0,
        last_target: None,
        next_connect_ns: 0,
    };
    p.run(stop);
    p.books.out.last_ns = now_ns();
    p.books.out.response_us = Buckets::from(&p.books.response);
    p.books.out
}

/// One publish: when it was due, when it was first sent (its stamp), when last written,
/// and how often.
#[derive(Debug, Clone, Copy)]
struct Slot {
    due_ns: u64,
    stamp_ns: u64,
    sent_ns: u64,
    sends: u32,
}

impl Slot {
    fn due(due_ns: u64) -> Slot {
        Slot {
            due_ns,
            stamp_ns: 0,
            sent_ns: 0,
            sends: 0,
        }
    }
}

/// One HTTP response, and when its last byte was read.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Reply {
    status: u16,
    id: Option<u64>,
    delivered: u64,
    at_ns: u64,
}

struct Conn {
    stream: TcpStream,
    target: usize,
    in_flight: VecDeque<Slot>,
    replies: Receiver<Reply>,
    /// Its reader is done (the connection ended): no more replies.
    ended: bool,
    /// No more requests on it: it answered 5xx (retrying) or is being closed.
    retire: bool,
}

/// The counts, and the publishes waiting to be sent again.
struct Books {
    out: Published,
    pending: VecDeque<Slot>,
    max_id: Option<u64>,
    /// Response times, µs.
    response: Histogram<u64>,
}

impl Default for Books {
    fn default() -> Books {
        Books {
            out: Published::default(),
            pending: VecDeque::new(),
            max_id: None,
            response: histogram(),
        }
    }
}

struct Publisher<'a> {
    plan: &'a Plan,
    /// The JSON after the stamp in `data`: a padding string, or the payload file.
    after_stamp: String,
    retry_for_ns: Option<u64>,
    books: Books,
    conn: Option<Conn>,
    /// Connections no longer written to, whose last replies may still come.
    retiring: Vec<Conn>,
    /// The target in use (or to try next).
    at: usize,
    last_target: Option<usize>,
    /// Retrying, after every target refused: no connection attempt before this.
    next_connect_ns: u64,
}

impl Publisher<'_> {
    fn run(&mut self, stop: &AtomicBool) {
        let pace = &self.plan.pace;
        let start = now_ns();
        let end = start + pace.duration.as_nanos() as u64;
        // The i-th publish is due when the integral of the rate reaches i.
        let due = |i: f64| -> u64 {
            let (a, b, t) = (pace.from, pace.to, pace.duration.as_secs_f64());
            if (b - a).abs() < 1e-9 || t == 0.0 {
                return start + (i / a.max(1e-9) * 1e9) as u64;
            }
            // rate(x) = a + (b-a)x/t; solve a x + (b-a)x²/(2t) = i for x.
            let k = (b - a) / (2.0 * t);
            let x = (-a + (a * a + 4.0 * k * i).max(0.0).sqrt()) / (2.0 * k);
            start + (x * 1e9) as u64
        };
        let mut scheduled = 0u64;
        // Retrying: once the schedule is over, the publishes still pending get until then.
        let mut wind_down: Option<u64> = None;
        loop {
            self.collect();
            let now = now_ns();
            if wind_down.is_none() && (stop.load(Ordering::Relaxed) || due(scheduled as f64) >= end)
            {
                let Some(limit) = self.retry_for_ns else {
                    break;
                };
                // Publishes already due but not sent yet (no connection) are owed too.
                while due(scheduled as f64) <= now && due(scheduled as f64) < end {
                    self.books
                        .pending
                        .push_back(Slot::due(due(scheduled as f64)));
                    scheduled += 1;
                }
                wind_down = Some(now + limit.min(WIND_DOWN_NS));
            }
            if let Some(deadline) = wind_down {
                let idle = self.books.pending.is_empty()
                    && self.conn.as_ref().is_none_or(|c| c.in_flight.is_empty())
                    && self.retiring.iter().all(|c| c.in_flight.is_empty());
                if idle || now >= deadline {
                    break;
                }
            }
            // Retrying and no server would take a connection a moment ago: wait.
            if self.conn.is_none() && now < self.next_connect_ns {
                self.wait(self.next_connect_ns);
                continue;
            }
            if self.plan.sequential {
                // The previous request is still unanswered: wait for its reply.
                if self.in_flight() > 0 {
                    // (On a connection that is being retired, no channel to wait on.)
                    let span = if self.conn.is_some() {
                        50_000_000
                    } else {
                        1_000_000
                    };
                    self.wait(now + span);
                    continue;
                }
                // The pace is over for a publisher that fell behind it too.
                if wind_down.is_none() && now >= end {
                    while due(scheduled as f64) < end {
                        self.books.out.skipped += 1;
                        scheduled += 1;
                    }
                    continue;
                }
                // Of the publishes that came due while it waited, the latest goes now.
                while wind_down.is_none()
                    && due(scheduled as f64 + 1.0) <= now
                    && due(scheduled as f64 + 1.0) < end
                {
                    self.books.out.skipped += 1;
                    scheduled += 1;
                }
            }
            let slot = if let Some(s) = self.books.pending.pop_front() {
                s
            } else if wind_down.is_none() && due(scheduled as f64) <= now {
                let at = due(scheduled as f64);
                scheduled += 1;
                Slot::due(at)
            } else {
                let next = if wind_down.is_none() {
                    due(scheduled as f64)
                } else {
                    now + 50_000_000
                };
                self.wait(next);
                continue;
            };
            self.send(slot, now);
        }
        // What is still owed is lost.
        let left = self.books.pending.len() as u64;
        self.books.out.failed += left;
        self.books.pending.clear();
        if let Some(c) = self.conn.take() {
            self.retire(c);
        }
        let deadline = now_ns() + WIND_DOWN_NS;
        while !self.retiring.is_empty() && now_ns() < deadline {
            self.collect();
            std::thread::sleep(Duration::from_millis(5));
        }
        for c in std::mem::take(&mut self.retiring) {
            // Replies that never came (a reader stuck past its timeout): lost.
            self.books.out.unanswered += c.in_flight.len() as u64;
            self.books.out.failed += c.in_flight.len() as u64;
        }
        self.books.out.failed += self.books.pending.len() as u64;
    }

    /// Send `slot` on the current connection, opening one if needed.
    fn send(&mut self, mut slot: Slot, now: u64) {
        if let Some(limit) = self.retry_for_ns
            && now > slot.due_ns + limit
        {
            self.books.out.failed += 1;
            return;
        }
        if self.conn.is_none() && !self.connect(now) {
            if self.retry_for_ns.is_some() {
                self.books.pending.push_front(slot);
            } else {
                self.books.out.failed += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        }
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        if slot.stamp_ns == 0 {
            slot.stamp_ns = now_ns();
        }
        let body = format!(
            r#"{{"topic":"{}","data":[{},{}]}}"#,
            self.plan.topic, slot.stamp_ns, self.after_stamp
        );
        let request = format!(
            "POST /publish HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if slot.sends > 0 {
            self.books.out.retries += 1;
        }
        slot.sends += 1;
        slot.sent_ns = now_ns();
        if c.stream.write_all(request.as_bytes()).is_ok() {
            c.in_flight.push_back(slot);
            let n = self.in_flight() as u64;
            self.books.out.max_in_flight = self.books.out.max_in_flight.max(n);
        } else {
            self.books.lost(slot, self.retry_for_ns, now);
            if let Some(c) = self.conn.take() {
                self.retire(c);
            }
        }
    }

    /// Requests unanswered, on every connection.
    fn in_flight(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.in_flight.len())
            + self
                .retiring
                .iter()
                .map(|c| c.in_flight.len())
                .sum::<usize>()
    }

    /// Open a connection: to the current target (tried once, without retrying), or to
    /// each target in turn from the current one until one takes it (retrying).
    fn connect(&mut self, now: u64) -> bool {
        let n = self.plan.targets.len();
        let tries = if self.retry_for_ns.is_some() { n } else { 1 };
        for _ in 0..tries {
            let target = self.at % n.max(1);
            match Conn::open(self.plan.targets[target], target) {
                Ok(c) => {
                    self.books.out.connections += 1;
                    if self.last_target.is_some_and(|t| t != target) {
                        self.books.out.failovers += 1;
                    }
                    self.last_target = Some(target);
                    self.at = target;
                    self.conn = Some(c);
                    return true;
                }
                Err(e) => {
                    self.books.out.no_connection += 1;
                    if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        self.books.out.refused += 1;
                    }
                    if self.retry_for_ns.is_some() {
                        self.at = (target + 1) % n;
                    }
                }
            }
        }
        if self.retry_for_ns.is_some() {
            self.next_connect_ns = now + RECONNECT_PAUSE_NS;
        }
        false
    }

    /// Stop writing to `c`; its replies still count as they come.
    fn retire(&mut self, mut c: Conn) {
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        c.retire = true;
        if self.retry_for_ns.is_some() && self.at == c.target {
            self.at = (c.target + 1) % self.plan.targets.len().max(1);
        }
        self.retiring.push(c);
    }

    /// Take every reply that has come, on every connection; settle connections that
    /// ended.
    fn collect(&mut self) {
        let now = now_ns();
        let retry_for = self.retry_for_ns;
        if let Some(c) = self.conn.as_mut() {
            self.books.take_replies(c, retry_for, now);
            if c.ended || c.retire {
                // The server ended it, or said to go elsewhere: the next publish needs a
                // new connection (writing into this one would lose it).
                if let Some(c) = self.conn.take() {
                    self.retire(c);
                }
            }
        }
        let mut i = 0;
        while i < self.retiring.len() {
            self.books
                .take_replies(&mut self.retiring[i], retry_for, now);
            if self.retiring[i].ended {
                let c = self.retiring.swap_remove(i);
                for slot in c.in_flight {
                    self.books.out.unanswered += 1;
                    self.books.lost(slot, retry_for, now);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Wait until `until` (at most 50 ms), taking replies as they come.
    fn wait(&mut self, until: u64) {
        let now = now_ns();
        let span = Duration::from_nanos(until.saturating_sub(now).clamp(100_000, 50_000_000));
        let retry_for = self.retry_for_ns;
        match self.conn.as_mut() {
            Some(c) => match c.replies.recv_timeout(span) {
                Ok(r) => self.books.on_reply(c, r, retry_for, now_ns()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => c.ended = true,
            },
            None => std::thread::sleep(span),
        }
    }
}

impl Books {
    fn take_replies(&mut self, c: &mut Conn, retry_for: Option<u64>, now: u64) {
        loop {
            match c.replies.try_recv() {
                Ok(r) => self.on_reply(c, r, retry_for, now),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    c.ended = true;
                    return;
                }
            }
        }
    }

    /// A reply answers the oldest request in flight on its connection.
    fn on_reply(&mut self, c: &mut Conn, r: Reply, retry_for: Option<u64>, now: u64) {
        let Some(slot) = c.in_flight.pop_front() else {
            return; // a reply to nothing we sent
        };
        let us = r.at_ns.saturating_sub(slot.sent_ns) / 1000;
        self.response.saturating_record(us.max(1));
        match r.status {
            200 => {
                let out = &mut self.out;
                out.acked += 1;
                if let Some(n) = out.acked_by_target.get_mut(c.target) {
                    *n += 1;
                }
                out.delivered += r.delivered;
                if slot.sends > 1 {
                    out.retried_acked += 1;
                }
                out.longest_wait_ns = out.longest_wait_ns.max(now.saturating_sub(slot.due_ns));
                if let Some(id) = r.id {
                    if self.max_id.is_some_and(|m| id <= m) {
                        out.id_resets += 1;
                    }
                    self.max_id = Some(self.max_id.map_or(id, |m| m.max(id)));
                    out.acked_ids.insert(id);
                }
            }
            502..=504 => {
                if r.status == 503 {
                    self.out.unavailable += 1;
                }
                if retry_for.is_some() {
                    c.retire = true;
                }
                self.lost(slot, retry_for, now);
            }
            _ => self.out.failed += 1,
        }
    }

    /// `slot` was not acknowledged: sent again if there is time, else failed.
    fn lost(&mut self, slot: Slot, retry_for: Option<u64>, now: u64) {
        match retry_for {
            Some(limit) if now <= slot.due_ns + limit => self.pending.push_back(slot),
            _ => self.out.failed += 1,
        }
    }
}

impl Conn {
    fn open(target: SocketAddr, index: usize) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        stream.set_nodelay(true)?;
        let mut reading = stream.try_clone()?;
        reading.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || read_replies(&mut reading, &tx));
        Ok(Conn {
            stream,
            target: index,
            in_flight: VecDeque::new(),
            replies: rx,
            ended: false,
            retire: false,
        })
    }
}

/// Read responses in order until the connection ends (or the receiver is gone), sending
/// each one on.
fn read_replies(stream: &mut TcpStream, tx: &Sender<Reply>) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let at_ns = now_ns();
        for reply in take_responses(&mut buf, at_ns) {
            if tx.send(reply).is_err() {
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The complete responses at the start of `buf`, removed from it (`100 Continue` skipped),
/// each stamped `at_ns` (when the bytes that completed it were read).
fn take_responses(buf: &mut Vec<u8>, at_ns: u64) -> Vec<Reply> {
    let mut replies = Vec::new();
    let mut at = 0;
    while let Some(end) = buf[at..].windows(4).position(|w| w == b"\r\n\r\n") {
        let head_end = at + end;
        let head = String::from_utf8_lossy(&buf[at..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("content-length:")
                    .map(|v| v.trim().to_string())
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if buf.len() < head_end + 4 + len {
            break;
        }
        let body = &buf[head_end + 4..head_end + 4 + len];
        let status: u16 = head
            .strip_prefix("http/1.1 ")
            .or_else(|| head.strip_prefix("http/1.0 "))
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        if status != 100 {
            replies.push(Reply {
                status,
                id: (status == 200)
                    .then(|| crate::frames::number_after(body, b"\"id\":"))
                    .flatten(),
                delivered: if status == 200 {
                    crate::frames::number_after(body, b"\"delivered\":").unwrap_or(0)
                } else {
                    0
                },
                at_ns,
            });
        }
        at = head_end + 4 + len;
    }
    buf.drain(..at);
    replies
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[test]
    fn a_constant_pace_publishes_the_right_count() {
        // No server: every publish fails, but the schedule is what is tested.
        let stop = AtomicBool::new(false);
        let pace = Pace {
            from: 50.0,
            to: 50.0,
            duration: Duration::from_millis(400),
        };
        let p = run("127.0.0.1:9".parse().unwrap(), "t", 64, &pace, &stop);
        assert!((18..=21).contains(&(p.acked + p.failed)), "{p:?}");
        assert_eq!(p.no_connection, p.failed, "{p:?}");
        assert_eq!(p.refused, p.failed, "{p:?}");
    }

    #[test]
    fn replies_give_acknowledged_ids_and_count_503s() {
        let mut buf = Vec::new();
        for (status, body) in [
            ("200 OK", r#"{"delivered":3,"id":7}"#),
            ("100 Continue", ""),
            ("200 OK", r#"{"delivered":3,"id":8}"#),
            ("503 Service Unavailable", "draining"),
            ("200 OK", r#"{"delivered":1,"id":2}"#),
        ] {
            let len = if body.is_empty() {
                String::new()
            } else {
                format!("Content-Length: {}\r\n", body.len())
            };
            buf.extend(format!("HTTP/1.1 {status}\r\n{len}\r\n{body}").bytes());
        }
        // A partial response stays in the buffer.
        buf.extend(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{\"de");
        let r = take_responses(&mut buf, 5);
        assert!(r.iter().all(|r| r.at_ns == 5));
        let statuses: Vec<u16> = r.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [200, 200, 503, 200]);
        assert_eq!(
            r.iter().map(|r| (r.id, r.delivered)).collect::<Vec<_>>(),
            [(Some(7), 3), (Some(8), 3), (None, 0), (Some(2), 1)]
        );
        assert!(buf.starts_with(b"HTTP/1.1 200 OK\r\nContent-Length: 5"));
    }

    /// A server on `listener` that answers `script` (per connection, per request: a status
    /// line and body) then closes; a connection beyond the script is answered 200 with
    /// ids counting up. The request count it saw.
    fn scripted(
        listener: std::net::TcpListener,
        script: Vec<Vec<(&'static str, &'static str)>>,
        connections: usize,
    ) -> std::thread::JoinHandle<u64> {
        std::thread::spawn(move || {
            let mut requests = 0;
            let mut next_id = 1;
            for i in 0..connections {
                let (stream, _) = listener.accept().unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut w = stream.try_clone().unwrap();
                let mut r = std::io::BufReader::new(stream);
                let answers = script.get(i).cloned();
                let mut k = 0;
                loop {
                    // One request: head, then Content-Length bytes.
                    let mut len = 0;
                    let mut line = String::new();
                    let mut got = false;
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            break;
                        }
                        got = true;
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    if !got {
                        break;
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    requests += 1;
                    let (status, text) = match &answers {
                        Some(a) => (a[k].0.to_string(), a[k].1.to_string()),
                        None => {
                            next_id += 1;
                            (
                                "200 OK".into(),
                                format!(r#"{{"delivered":1,"id":{}}}"#, next_id - 1),
                            )
                        }
                    };
                    k += 1;
                    let reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    w.write_all(reply.as_bytes()).unwrap();
                    if answers.as_ref().is_some_and(|a| k >= a.len()) {
                        break; // as a draining herald closes after its 503
                    }
                }
            }
            requests
        })
    }

    #[test]
    fn retrying_resends_503s_and_refusals_on_the_next_server_until_acknowledged() {
        // The first server answers 503 to its first request and closes; the second is
        // refused (nothing listens); the first then takes everything.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let good = listener.local_addr().unwrap();
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let server = scripted(
            listener,
            vec![vec![("503 Service Unavailable", "draining")]],
            2,
        );
        let stop = AtomicBool::new(false);
        let plan = Plan {
            targets: vec![good, dead],
            topic: "t".into(),
            payload: 64,
            data: None,
            pace: Pace {
                from: 20.0,
                to: 20.0,
                duration: Duration::from_millis(500),
            },
            retry_for: Some(Duration::from_secs(5)),
            sequential: false,
        };
        let p = run_plan(&plan, &stop);
        let requests = server.join().unwrap();
        assert_eq!(p.failed, 0, "{p:?}");
        assert_eq!(p.acked, 10, "{p:?}");
        assert_eq!(p.unavailable, 1, "{p:?}");
        assert!(p.refused >= 1 && p.refused == p.no_connection, "{p:?}");
        assert!(p.retries >= 1 && p.retried_acked >= 1, "{p:?}");
        assert_eq!(p.acked_by_target, [10, 0], "{p:?}");
        assert_eq!((p.acked_ids.len(), p.id_resets), (10, 0), "{p:?}");
        assert_eq!(requests, 10 + p.retries, "{p:?}");
    }

    /// A server that answers each request `delay` after reading it (200, ids counting
    /// up), on one connection at a time. Before answering it looks for bytes of a next
    /// request: the requests it saw and how many arrived while one was unanswered.
    fn slow(
        listener: std::net::TcpListener,
        delay: Duration,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<(u64, u64)> {
        std::thread::spawn(move || {
            let (mut requests, mut overlapped) = (0, 0);
            listener.set_nonblocking(true).unwrap();
            while !stop.load(Ordering::SeqCst) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                stream.set_nonblocking(false).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut w = stream.try_clone().unwrap();
                let mut r = std::io::BufReader::new(stream);
                let mut line = String::new();
                let mut len = 0;
                while !stop.load(Ordering::SeqCst) {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(_) if line.is_empty() => continue, // timeout: idle
                        Err(e) => panic!("{e}"),
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line != "\r\n" {
                        continue;
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    requests += 1;
                    std::thread::sleep(delay);
                    let mut peek = [0u8; 1];
                    r.get_ref().set_nonblocking(true).unwrap();
                    let next = matches!(r.get_ref().peek(&mut peek), Ok(n) if n > 0);
                    r.get_ref().set_nonblocking(false).unwrap();
                    if next || !r.buffer().is_empty() {
                        overlapped += 1;
                    }
                    let text = format!(r#"{{"delivered":1,"id":{requests}}}"#);
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    w.write_all(reply.as_bytes()).unwrap();
                }
            }
            (requests, overlapped)
        })
    }

    fn sequential_plan(addr: SocketAddr, rate: f64, ms: u64) -> Plan {
        Plan {
            targets: vec![addr],
            topic: "t".into(),
            payload: 64,
            data: None,
            pace: Pace {
                from: rate,
                to: rate,
                duration: Duration::from_millis(ms),
            },
            retry_for: None,
            sequential: true,
        }
    }

    #[test]
    fn sequential_waits_for_each_reply_and_skips_what_came_due_meanwhile() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let server = slow(listener, Duration::from_millis(45), done.clone());
        // 50/s for 600 ms: 30 due, 20 ms apart; each reply takes 45 ms or more.
        let p = run_plan(&sequential_plan(addr, 50.0, 600), &AtomicBool::new(false));
        done.store(true, Ordering::SeqCst);
        let (requests, overlapped) = server.join().unwrap();
        assert_eq!(
            overlapped, 0,
            "a request came while one was unanswered: {p:?}"
        );
        assert_eq!(p.max_in_flight, 1, "{p:?}");
        assert_eq!(requests, p.acked, "{p:?}");
        assert_eq!(p.failed, 0, "{p:?}");
        assert!((6..=14).contains(&p.acked), "{p:?}");
        assert!((30..=31).contains(&(p.acked + p.skipped)), "{p:?}");
        let mut h = histogram();
        p.response_us.add_to(&mut h);
        assert_eq!(h.len(), p.acked, "{p:?}");
        assert!(h.min() >= 45_000, "{}", h.min());
    }

    #[test]
    fn sequential_to_a_fast_server_keeps_the_pace_and_no_more() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let server = slow(listener, Duration::from_millis(1), done.clone());
        let start = std::time::Instant::now();
        let p = run_plan(&sequential_plan(addr, 50.0, 400), &AtomicBool::new(false));
        let took = start.elapsed();
        done.store(true, Ordering::SeqCst);
        let (requests, overlapped) = server.join().unwrap();
        assert_eq!((overlapped, p.max_in_flight), (0, 1), "{p:?}");
        // 20 due, none skipped, and none sent before its time: the last is due at 380 ms.
        assert!((20..=21).contains(&p.acked), "{p:?}");
        assert_eq!((requests, p.skipped, p.failed), (p.acked, 0, 0), "{p:?}");
        assert!(took >= Duration::from_millis(380), "{took:?}");
        let mut h = histogram();
        p.response_us.add_to(&mut h);
        assert_eq!(h.len(), p.acked, "{p:?}");
        assert!(
            h.value_at_quantile(0.5) >= 1_000,
            "{}",
            h.value_at_quantile(0.5)
        );
    }

    #[test]
    fn tried_once_a_503_is_a_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = scripted(
            listener,
            vec![vec![("503 Service Unavailable", "draining")]],
            2,
        );
        let stop = AtomicBool::new(false);
        let pace = Pace {
            from: 20.0,
            to: 20.0,
            duration: Duration::from_millis(500),
        };
        let p = run(addr, "t", 64, &pace, &stop);
        server.join().unwrap();
        assert_eq!((p.acked, p.failed, p.unavailable), (9, 1, 1), "{p:?}");
        assert_eq!(p.retries, 0, "{p:?}");
    }
}
