//! A nonblocking HTTP/1.1 client to the application, inside the event loop: a small pool
//! of keep-alive connections, a cap on requests in flight (one per connection, no
//! pipelining: a slow answer must not hold up the ones behind it), a FIFO of requests
//! waiting for a free connection, and a deadline per request.
//!
//! Like the Redis link, its queueing methods (`submit`, `next_deadline`) are pure, and
//! `on_ready`, `tick` and `flush` do its socket I/O; only the reactor calls those. Results
//! come back as `Done { tag, outcome }`; the caller owns what a tag means.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::time::{Duration, Instant};

use log::debug;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::app::wire::{self, Answer, Target};

/// The highest mio token the clients use; each takes a range below it. Above it are the
/// reactor's own tokens and the Redis links' (down to `redis::LOWEST_TOKEN`, which the
/// reactor checks at compile time). The connection slab's keys never come near (they are
/// bounded by the fd limit).
pub const TOKEN_TOP: usize = usize::MAX - 256;
/// Most connections one client may hold (`--auth-concurrency`'s ceiling).
pub const MAX_POOL: usize = 1024;
/// Bytes read from the application per read call.
const READ_CHUNK: usize = 16 * 1024;

/// How an exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A complete response, whatever its status.
    Answer(Answer),
    /// No answer within the deadline.
    Timeout,
    /// Could not connect, or the connection failed or closed before the answer, or the
    /// answer was not HTTP we can read.
    Failed(String),
}

#[derive(Debug)]
pub struct Done {
    pub tag: u64,
    pub outcome: Outcome,
}

#[derive(Debug)]
struct Job {
    tag: u64,
    request: Vec<u8>,
    /// Already retried once on a fresh connection.
    retried: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No socket.
    Closed,
    /// connect() in progress.
    Connecting,
    /// Connected, no request.
    Idle,
    /// Request written or being written; awaiting the answer.
    Busy,
}

#[derive(Debug)]
struct Conn {
    stream: Option<TcpStream>,
    phase: Phase,
    job: Option<(Job, Instant)>,
    output: Vec<u8>,
    input: Vec<u8>,
    /// The connection has answered before: if it closes before answering a new request,
    /// the application probably closed it idle in the meantime, and one retry is safe.
    reused: bool,
    registered: Interest,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            stream: None,
            phase: Phase::Closed,
            job: None,
            output: Vec::new(),
            input: Vec::new(),
            reused: false,
            registered: Interest::READABLE,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct ClientCounters {
    pub requests: u64,
    pub timeouts: u64,
    pub failures: u64,
    pub connects: u64,
}

#[derive(Debug)]
pub struct Client {
    name: &'static str,
    target: Target,
    timeout: Duration,
    /// Tokens `first_token - i` for connection `i`.
    first_token: usize,
    pool: Vec<Conn>,
    queue: VecDeque<Job>,
    pub counters: ClientCounters,
}

impl Client {
    /// `concurrency` connections at most (each carries one request at a time).
    pub fn new(
        name: &'static str,
        target: Target,
        concurrency: usize,
        timeout: Duration,
        first_token: usize,
    ) -> Client {
        let size = concurrency.clamp(1, MAX_POOL);
        Client {
            name,
            target,
            timeout,
            first_token,
            pool: (0..size).map(|_| Conn::new()).collect(),
            queue: VecDeque::new(),
            counters: ClientCounters::default(),
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Whether `token` is one of this client's connections.
    pub fn owns(&self, token: Token) -> bool {
        token.0 <= self.first_token && self.first_token - token.0 < self.pool.len()
    }

    /// Queue a request (already encoded, signed); it goes out in FIFO order when a
    /// connection is free, at the next `flush`.
    pub fn submit(&mut self, tag: u64, request: Vec<u8>) {
        self.queue.push_back(Job {
            tag,
            request,
            retried: false,
        });
    }

    /// Drop queued requests `keep` refuses (their asker is gone): they never reach the
    /// application. Requests in flight are left to finish; their answers are discarded.
    pub fn retain_queued(&mut self, mut keep: impl FnMut(u64) -> bool) {
        self.queue.retain(|j| keep(j.tag));
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn in_flight(&self) -> usize {
        self.pool.iter().filter(|c| c.job.is_some()).count()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.pool
            .iter()
            .filter_map(|c| c.job.as_ref().map(|(_, at)| *at))
            .min()
    }

    // ---- I/O (the reactor's calls only) ----------------------------------------------

    /// Requests past their deadline fail; their connections close (a late answer must
    /// not be taken for the next request's).
    pub fn tick(&mut self, now: Instant, registry: &Registry, done: &mut Vec<Done>) {
        for i in 0..self.pool.len() {
            if self.pool[i]
                .job
                .as_ref()
                .is_some_and(|(_, deadline)| now >= *deadline)
            {
                self.counters.timeouts += 1;
                if let Some((job, _)) = self.pool[i].job.take() {
                    done.push(Done {
                        tag: job.tag,
                        outcome: Outcome::Timeout,
                    });
                }
                self.close(i, registry);
            }
        }
    }

    /// Readiness on one of our tokens.
    pub fn on_ready(
        &mut self,
        token: Token,
        registry: &Registry,
        now: Instant,
        done: &mut Vec<Done>,
    ) {
        let i = self.first_token - token.0;
        if i >= self.pool.len() {
            return;
        }
        if self.pool[i].phase == Phase::Connecting {
            let Some(stream) = self.pool[i].stream.as_ref() else {
                return;
            };
            match stream.take_error() {
                Ok(Some(e)) | Err(e) => return self.fail(i, &e.to_string(), registry, done),
                Ok(None) => {}
            }
            if stream.peer_addr().is_err() {
                return; // still connecting
            }
            self.pool[i].phase = Phase::Busy;
        }
        self.write(i, registry, done);
        self.read(i, registry, now, done);
    }

    /// Start queued requests on free connections, in order. A request whose asker is
    /// gone (`wanted` says no) is dropped as it comes up, unsent: checked then rather than
    /// every pass, so a long queue costs nothing while it waits.
    pub fn flush(
        &mut self,
        registry: &Registry,
        now: Instant,
        done: &mut Vec<Done>,
        mut wanted: impl FnMut(u64) -> bool,
    ) {
        for i in 0..self.pool.len() {
            if self.pool[i].job.is_some() {
                continue;
            }
            let job = loop {
                match self.queue.pop_front() {
                    Some(job) if wanted(job.tag) => break Some(job),
                    Some(_) => continue,
                    None => break None,
                }
            };
            let Some(job) = job else {
                break;
            };
            self.start(i, job, registry, now, done);
        }
    }

    fn start(
        &mut self,
        i: usize,
        job: Job,
        registry: &Registry,
        now: Instant,
        done: &mut Vec<Done>,
    ) {
        self.counters.requests += 1;
        let conn = &mut self.pool[i];
        conn.output = job.request.clone();
        conn.input.clear();
        conn.job = Some((job, now + self.timeout));
        if conn.phase == Phase::Idle {
            conn.phase = Phase::Busy;
            self.write(i, registry, done);
            return;
        }
        // No connection (or a dead one): a new one.
        self.close_socket(i, registry);
        let token = Token(self.first_token - i);
        let mut stream = match TcpStream::connect(self.target.addr) {
            Ok(s) => s,
            Err(e) => return self.fail(i, &format!("connect: {e}"), registry, done),
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = registry.register(&mut stream, token, interest) {
            return self.fail(i, &format!("register: {e}"), registry, done);
        }
        let _ = stream.set_nodelay(true);
        self.counters.connects += 1;
        let conn = &mut self.pool[i];
        conn.stream = Some(stream);
        conn.registered = interest;
        conn.phase = Phase::Connecting;
        conn.reused = false;
    }

    fn write(&mut self, i: usize, registry: &Registry, done: &mut Vec<Done>) {
        let conn = &mut self.pool[i];
        if conn.phase != Phase::Busy {
            return;
        }
        let Some(stream) = conn.stream.as_mut() else {
            return;
        };
        if let Err(why) = crate::outq::write_buffer(stream, &mut conn.output) {
            return self.lost(i, &why, registry, done);
        }
        let wanted = if conn.output.is_empty() {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        if wanted != conn.registered {
            let token = Token(self.first_token - i);
            if registry.reregister(stream, token, wanted).is_ok() {
                conn.registered = wanted;
            }
        }
    }

    fn read(&mut self, i: usize, registry: &Registry, now: Instant, done: &mut Vec<Done>) {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            let conn = &mut self.pool[i];
            let Some(stream) = conn.stream.as_mut() else {
                return;
            };
            match stream.read(&mut chunk) {
                Ok(0) => return self.lost(i, "closed by the application", registry, done),
                Ok(n) => {
                    conn.input.extend_from_slice(&chunk[..n]);
                    if conn.input.len() > wire::MAX_RESPONSE_BODY + 64 * 1024 {
                        return self.fail(i, "response too large", registry, done);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.lost(i, &e.to_string(), registry, done),
            }
        }
        self.parse(i, registry, now, done);
    }

    fn parse(&mut self, i: usize, registry: &Registry, _now: Instant, done: &mut Vec<Done>) {
        let conn = &mut self.pool[i];
        if conn.input.is_empty() {
            return;
        }
        if conn.job.is_none() {
            // Bytes nobody asked for: this connection cannot be trusted.
            return self.fail(i, "unsolicited bytes", registry, done);
        }
        match wire::parse_response(&conn.input) {
            Ok(None) => {}
            Ok(Some((answer, used))) => {
                // Anything past the answer, or a request the app answered before reading
                // all of it, leaves the connection in an unknown state: not reused.
                let close = answer.close || used != conn.input.len() || !conn.output.is_empty();
                if let Some((job, _)) = conn.job.take() {
                    done.push(Done {
                        tag: job.tag,
                        outcome: Outcome::Answer(answer),
                    });
                }
                conn.input.clear();
                conn.reused = true;
                conn.phase = Phase::Idle;
                if close {
                    self.close(i, registry);
                }
            }
            Err(why) => self.fail(i, &why, registry, done),
        }
    }

    /// The connection ended before the answer. On a reused connection that had answered
    /// nothing of this request, the application most likely closed it while idle: try
    /// once more on a fresh one. Otherwise the request fails.
    fn lost(&mut self, i: usize, why: &str, registry: &Registry, done: &mut Vec<Done>) {
        let conn = &mut self.pool[i];
        let retry = conn.reused && conn.input.is_empty();
        match conn.job.take() {
            Some((mut job, _)) if retry && !job.retried => {
                job.retried = true;
                self.close(i, registry);
                self.queue.push_front(job);
            }
            Some(job) => {
                self.pool[i].job = Some(job);
                self.fail(i, why, registry, done);
            }
            None => self.close(i, registry),
        }
    }

    fn fail(&mut self, i: usize, why: &str, registry: &Registry, done: &mut Vec<Done>) {
        if let Some((job, _)) = self.pool[i].job.take() {
            self.counters.failures += 1;
            debug!(
                "{}: request to {} failed: {why}",
                self.name, self.target.host
            );
            done.push(Done {
                tag: job.tag,
                outcome: Outcome::Failed(why.to_string()),
            });
        }
        self.close(i, registry);
    }

    fn close(&mut self, i: usize, registry: &Registry) {
        self.close_socket(i, registry);
        let conn = &mut self.pool[i];
        conn.phase = Phase::Closed;
        conn.output = Vec::new();
        conn.input = Vec::new();
        conn.reused = false;
    }

    fn close_socket(&mut self, i: usize, registry: &Registry) {
        if let Some(mut stream) = self.pool[i].stream.take() {
            let _ = registry.deregister(&mut stream);
        }
    }
}
