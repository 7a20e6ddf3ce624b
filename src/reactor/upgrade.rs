//! The live upgrade (SIGUSR2): at a pass boundary the loop writes its whole state into an
//! anonymous file (`memfd_create`), clears close-on-exec on the listeners, every client
//! socket and that file, blocks the signals herald handles, and `execve`s the binary path
//! it resolved at start, with the same argv. Same PID: supervisord and systemd see
//! nothing. The new binary finds the file's descriptor in `HERALD_UPGRADE_FD`, installs
//! its signal handlers, unblocks the signals (one that landed in the gap is delivered
//! then, not lost to a default action), and either carries on with every connection
//! (`restore`) or, when it cannot use the body, drains the inherited sockets paced, as a
//! shutdown would, while it serves new connections (`fallback`).
//!
//! The format is `handover.rs`'s; this file owns the descriptors and the system calls.
//! Not carried, and handled: a publish or read still at Redis when the bounded wait for
//! it ends (that connection is closed after its pending bytes), and the Redis links
//! themselves (the new process reconnects; members resume from their places).

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::{error, info, warn};
use mio::Interest;
use mio::net::{TcpListener, TcpStream};

use super::{Server, Socket};
use crate::auth::Grant;
use crate::close::Reject;
use crate::config::Config;
use crate::conn::{CLOSE_GRACE, ClientAddr, ConnId, Session, State};
use crate::drain::Pacer;
use crate::handover::{self, BODY_VERSION, Body, Envelope, Kind};
use crate::http::parse::Response;
use crate::timer::Timer;
use crate::topic::Patterns;
use crate::ws::codec::{self, Ws};
use crate::ws::protocol;
use crate::ws::protocol::OpError;

/// Where the new process finds the state file's descriptor.
pub const STATE_FD_VAR: &str = "HERALD_UPGRADE_FD";
/// Tests only (documented in the README): the old process writes the body under this
/// version instead of `BODY_VERSION`, so the new one must take the fallback, as it would
/// for a binary of another format.
pub const TEST_BODY_VERSION_VAR: &str = "HERALD_UPGRADE_TEST_BODY_VERSION";
/// How long an upgrade waits for publishes and reads at Redis to be answered before it
/// goes anyway (those connections are then closed after their pending bytes).
pub const QUIESCE: Duration = Duration::from_secs(1);
/// The signals herald handles: blocked across `execve` (their handlers reset to the
/// default action there, which would end the process).
const HANDLED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGUSR2];

/// The binary and argv to execute, resolved once at start: after a package upgrade
/// `/proc/self/exe` still names the old inode, the path the new file.
#[derive(Debug)]
pub struct Exe {
    path: PathBuf,
    args: Vec<OsString>,
}

impl Exe {
    pub fn resolve() -> Option<Exe> {
        match std::env::current_exe() {
            Ok(path) => Some(Exe {
                path,
                args: std::env::args_os().collect(),
            }),
            Err(e) => {
                warn!("cannot resolve herald's own path ({e}): SIGUSR2 upgrades are off");
                None
            }
        }
    }
}

fn sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in HANDLED {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn block_signals() -> libc::sigset_t {
    let set = sigset();
    // SAFETY: both pointers point at sigsets we own.
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    }
}

fn set_mask(mask: &libc::sigset_t) {
    // SAFETY: the pointer points at a sigset we own.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, mask, std::ptr::null_mut());
    }
}

/// Once the handlers are installed: a signal that landed while the old binary was
/// becoming this one is delivered now. (At a fresh start nothing was blocked.)
pub fn unblock_signals() {
    let set = sigset();
    // SAFETY: the pointer points at a sigset we own.
    unsafe {
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor we own; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        if libc::fcntl(fd, libc::F_SETFD, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An anonymous file holding `bytes`, rewound, open across exec.
fn memfd(bytes: &[u8]) -> io::Result<std::fs::File> {
    // SAFETY: the name is a NUL-terminated literal; flags 0: no MFD_CLOEXEC.
    let fd = unsafe { libc::memfd_create(c"herald-handover".as_ptr(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this descriptor; the File is its only owner.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(file)
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
}

/// Replace this process with `exe`; returns only when `execve` failed.
fn exec(exe: &Exe, state_fd: RawFd) -> io::Error {
    let path = match cstring(exe.path.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut argv = Vec::with_capacity(exe.args.len());
    for a in &exe.args {
        match cstring(a.as_bytes()) {
            Ok(c) => argv.push(c),
            Err(e) => return e,
        }
    }
    let mut envp = Vec::new();
    for (k, v) in std::env::vars_os() {
        if k == STATE_FD_VAR {
            continue;
        }
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        if let Ok(c) = CString::new(kv) {
            envp.push(c);
        }
    }
    match cstring(format!("{STATE_FD_VAR}={state_fd}").as_bytes()) {
        Ok(c) => envp.push(c),
        Err(e) => return e,
    }
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    // SAFETY: every pointer is to a NUL-terminated string kept alive above, and both
    // arrays end with a null pointer. On success nothing after this runs.
    unsafe {
        libc::execve(path.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
    }
    io::Error::last_os_error()
}

/// The state the old binary left, if this process is the new binary of an upgrade. The
/// variable is removed so that nothing else reads it. `Err`: the file was there but is
/// not an envelope at all; then not even the sockets are known.
pub fn take_inherited() -> Option<Result<Envelope, String>> {
    let value = std::env::var(STATE_FD_VAR).ok()?;
    // SAFETY: called once at start, before any thread exists.
    unsafe { std::env::remove_var(STATE_FD_VAR) };
    let Ok(fd) = value.parse::<RawFd>() else {
        return Some(Err(format!("{STATE_FD_VAR}={value:?} is not a descriptor")));
    };
    if fd <= 2 || !is_kind(fd, libc::S_IFREG) {
        return Some(Err(format!("{STATE_FD_VAR}={fd} is not a state file")));
    }
    // SAFETY: the old binary passed this descriptor for us alone; the File owns it now
    // and closes it when read.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut bytes = Vec::new();
    if let Err(e) = file.read_to_end(&mut bytes) {
        return Some(Err(format!("reading the state file: {e}")));
    }
    Some(Envelope::decode(&bytes))
}

/// Whether `fd` is open and of this file type (`S_IFSOCK`, `S_IFREG`): a corrupt file
/// must not make us adopt stdin or a descriptor we did not inherit.
fn is_kind(fd: RawFd, kind: libc::mode_t) -> bool {
    // SAFETY: fstat writes one stat into the struct we own.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == kind
    }
}

/// An inherited socket descriptor, if it is one.
fn adopt_fd<T: FromRawFd>(fd: RawFd) -> Option<T> {
    // SAFETY: the envelope names descriptors the old binary left open for us; each is
    // named once, and from here the returned value is its only owner.
    (fd > 2 && is_kind(fd, libc::S_IFSOCK)).then(|| unsafe { T::from_raw_fd(fd) })
}

/// An inherited listener (the public one, the agent's, the metrics one).
pub fn listener(fd: Option<RawFd>) -> Option<TcpListener> {
    let std: std::net::TcpListener = adopt_fd(fd?)?;
    std.set_nonblocking(true).ok()?;
    Some(TcpListener::from_std(std))
}

/// The new binary could not even start (its flags do not parse, it cannot bind): do what
/// can still be done for every inherited socket without a loop. Each gets its pending
/// bytes and, a WebSocket, `reconnect` and 1001, in one nonblocking write, then FIN.
pub fn abandon(inherited: Option<Result<Envelope, String>>, why: &str) {
    let Some(Ok(envelope)) = inherited else {
        return;
    };
    // To stderr directly: when the flags do not parse, the logger is not set up yet.
    eprintln!(
        "herald: live upgrade: this binary cannot start ({why}); closing {} inherited \
         connections with 1001",
        envelope.sockets.len()
    );
    for s in envelope.sockets {
        let Some(mut stream): Option<std::net::TcpStream> = adopt_fd(s.fd) else {
            continue;
        };
        let _ = stream.set_nonblocking(true);
        let mut bytes = s.pending;
        let mut close = crate::outq::OutQueue::default();
        if matches!(s.kind, Kind::Topics) {
            bytes.extend_from_slice(&protocol::reconnect(1000));
        }
        if matches!(s.kind, Kind::Topics | Kind::Echo) {
            Ws::new(125, None).close(crate::close::CloseReason::GoingAway, &mut close);
            bytes.extend_from_slice(&close.unsent());
        }
        let _ = stream.write(&bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}

impl Server {
    /// SIGUSR2: upgrade at the end of this pass, once no publish or read waits at Redis
    /// (at most `QUIESCE`).
    pub(super) fn request_upgrade(&mut self, now: Instant) {
        if self.drain.is_draining() {
            warn!("SIGUSR2 while draining: no upgrade");
        } else if self.exe.is_none() {
            warn!("SIGUSR2: herald's own path is unknown; no upgrade");
        } else if self.upgrade_at.is_none() {
            info!("SIGUSR2: upgrading to {}", self.exe_path());
            self.upgrade_at = Some(now + QUIESCE);
        }
    }

    fn exe_path(&self) -> String {
        self.exe
            .as_ref()
            .map_or(String::new(), |e| e.path.display().to_string())
    }

    /// At a pass boundary: go, if an upgrade is asked for and nothing waits at Redis.
    pub(super) fn upgrade_if_due(&mut self, now: Instant) {
        let Some(deadline) = self.upgrade_at else {
            return;
        };
        if self.drain.is_draining() {
            // A SIGTERM landed with the SIGUSR2: the drain wins, this binary finishes it.
            warn!("upgrade cancelled: a drain has begun");
            self.upgrade_at = None;
            return;
        }
        let waiting = self
            .conns
            .ids()
            .into_iter()
            .filter(|&id| matches!(self.conns[id].state, State::AwaitingRedis { .. }))
            .count()
            + self.pubsub.waiting_at_redis()
            + self.pubsub.app().questions();
        if waiting > 0 && now < deadline {
            return;
        }
        if waiting > 0 {
            warn!(
                "upgrade: {waiting} requests still wait for Redis or the application: HTTP \
                 connections waiting are closed after their pending bytes, handshakes the \
                 application is deciding are refused 503, subscribes it is deciding answered \
                 `unavailable`, resuming subscriptions told to reconnect, presence ops go \
                 unanswered"
            );
        }
        self.upgrade_at = None;
        let started = Instant::now();
        let envelope = self.handover(now);
        let bytes = envelope.encode();
        let fds: Vec<RawFd> = envelope
            .sockets
            .iter()
            .map(|s| s.fd)
            .chain(envelope.listener)
            .chain(envelope.agent)
            .chain(envelope.metrics)
            .collect();
        let result: io::Result<()> = memfd(&bytes).and_then(|file| {
            for &fd in &fds {
                set_cloexec(fd, false)?;
            }
            info!(
                "upgrade: {} connections, {} bytes of state in {:.1} ms; executing {}",
                envelope.sockets.len(),
                bytes.len(),
                started.elapsed().as_secs_f64() * 1000.0,
                self.exe_path()
            );
            let Some(exe) = self.exe.as_ref() else {
                return Err(io::Error::other("no binary path"));
            };
            let old = block_signals();
            let err = exec(exe, file.as_raw_fd());
            set_mask(&old);
            Err(err)
        });
        if let Err(e) = result {
            for &fd in &fds {
                let _ = set_cloexec(fd, true);
            }
            self.counters.upgrades.failed += 1;
            error!("upgrade failed ({e}); this binary goes on serving");
        }
    }

    /// Everything the new binary needs, read without changing anything (if `execve`
    /// fails, this process goes on as it was).
    fn handover(&self, now: Instant) -> Envelope {
        let mut sockets = Vec::with_capacity(self.conns.len());
        let mut conns = Vec::with_capacity(self.conns.len());
        // Past the wait, the application's answers cannot follow their askers (the new
        // binary's connection keys differ): a handshake is refused, a subscribe answered.
        let mut unanswered: HashMap<(ConnId, u64), Vec<&str>> = HashMap::new();
        for (id, serial, topic) in self.pubsub.app().subscribes_waiting() {
            unanswered.entry((id, serial)).or_default().push(topic);
        }
        for id in self.conns.ids() {
            let Some(Some(socket)) = self.sockets.get(id.0) else {
                continue;
            };
            let conn = &self.conns[id];
            let (kind, state) = match &conn.state {
                State::ReadingRequest => (Kind::Http, handover::State::ReadingRequest),
                // Past the wait for Redis: its held responses cannot be carried.
                State::AwaitingRedis { .. } | State::Finishing => {
                    (Kind::Ending, handover::State::Finishing)
                }
                State::Lingering => (Kind::Ending, handover::State::Lingering),
                State::AwaitingApp(_) => (Kind::Ending, handover::State::Finishing),
                State::Open(s) => (
                    if s.kind == protocol::Kind::Echo {
                        Kind::Echo
                    } else {
                        Kind::Topics
                    },
                    handover::State::Open(Box::new(self.export_session(id, s, now))),
                ),
                State::Closing(s) => (
                    Kind::Closing,
                    handover::State::Closing(Box::new(self.export_session(id, s, now))),
                ),
                State::Dead => continue,
            };
            let mut pending = conn.out.unsent();
            if matches!(conn.state, State::AwaitingApp(_)) {
                pending.extend(Response::refuse(&Reject::Upgrading).encode(false));
            }
            for topic in unanswered.get(&(id, conn.serial)).into_iter().flatten() {
                let e = OpError::new(
                    "unavailable",
                    format!(
                        "not subscribed to {topic:?}: the server was upgrading; subscribe again"
                    ),
                );
                pending.extend_from_slice(&codec::text_frame(&protocol::error(&e)));
            }
            sockets.push(handover::Socket {
                fd: socket.stream.as_raw_fd(),
                kind,
                pending,
            });
            let client = match conn.client() {
                ClientAddr::Peer => handover::Client::Peer,
                ClientAddr::ProxyUnread => handover::Client::ProxyUnread,
                ClientAddr::ProxyOwn => handover::Client::ProxyOwn,
                ClientAddr::Forwarded(ip) => handover::Client::Forwarded(ip),
                ClientAddr::ForwardedFor(ip) => handover::Client::ForwardedFor(ip),
            };
            let timers = self
                .conns
                .timers_left(id, now)
                .into_iter()
                .map(|(t, left)| (timer_out(t), left.as_millis() as u64))
                .collect();
            conns.push(handover::Conn {
                peer: conn.peer,
                client,
                state,
                metrics_port: conn.metrics_port,
                peer_shut: conn.peer_shut,
                sent_continue: conn.sent_continue,
                partial: conn.partial.clone(),
                timers,
            });
        }
        let body = Body {
            conns,
            counters: self.counters.clone(),
            app: self.pubsub.app().export(),
            pubsub: self.pubsub.counts(),
            statsd_last: self
                .statsd
                .as_ref()
                .map(|s| s.reporter.last())
                .unwrap_or_default(),
            stopped_at_ns: wall_ns(),
        };
        let body_version = std::env::var(TEST_BODY_VERSION_VAR)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(BODY_VERSION);
        Envelope {
            listener: self.listener.as_ref().map(AsRawFd::as_raw_fd),
            agent: self.agent.as_ref().map(AsRawFd::as_raw_fd),
            metrics: self.metrics.as_ref().map(AsRawFd::as_raw_fd),
            sockets,
            history: self.pubsub.snapshot(now),
            body_version,
            body: body.encode(),
        }
    }

    fn export_session(&self, id: ConnId, s: &Session, now: Instant) -> handover::Session {
        handover::Session {
            echo: s.kind == protocol::Kind::Echo,
            ws: s.ws.export(),
            silent_ms: now.saturating_duration_since(s.last_seen).as_millis() as u64,
            grant: s.grant.as_ref().map(|g| handover::Grant {
                sub: g.sub.clone(),
                exp: g.exp,
                topics: g.topics.spelled(),
                publish: g.publish.spelled(),
                refused: g.refused.spelled(),
            }),
            ops_level: s.ops.level(),
            topics: self.pubsub.export_topics(id),
        }
    }

    // ---- the new binary --------------------------------------------------------------

    /// Take over what the old binary left: every connection as it was, or, when the body
    /// cannot be used, a paced drain of the inherited sockets.
    pub(super) fn adopt(&mut self, envelope: Envelope, cfg: &Config, now: Instant) {
        let sockets = envelope.sockets.len();
        match Body::decode(&envelope, BODY_VERSION) {
            Ok(body) => {
                let started = Instant::now();
                if self.pubsub.redis().is_some() {
                    self.held_for_redis = Some(Vec::new());
                }
                self.counters = body.counters;
                self.pubsub.carry_counts(body.pubsub);
                self.pubsub.app_mut().carry(body.app, now);
                if let Some(s) = &mut self.statsd {
                    s.reporter.carry_last(body.statsd_last);
                }
                let mut refused = Vec::new();
                let mut lost = Vec::new();
                for (socket, conn) in envelope.sockets.into_iter().zip(body.conns) {
                    match self.restore(&socket, conn, now) {
                        Ok(true) => {}
                        Ok(false) => lost.push(socket.fd),
                        Err(why) => {
                            warn!("upgrade: connection on fd {} not carried: {why}", socket.fd);
                            refused.push(socket);
                        }
                    }
                }
                self.counters.upgrades.carried += 1;
                let paused_ms = wall_ns().saturating_sub(body.stopped_at_ns) as f64 / 1e6;
                info!(
                    "upgrade: carried {} of {sockets} connections in {:.1} ms, {paused_ms:.1} ms \
                     after the old binary's last pass{}",
                    sockets - refused.len(),
                    started.elapsed().as_secs_f64() * 1000.0,
                    if lost.is_empty() {
                        String::new()
                    } else {
                        format!("; {} are told to reconnect", lost.len())
                    }
                );
                self.drain_inherited(refused, cfg, now);
            }
            Err(why) => {
                self.counters.upgrades.fallback += 1;
                warn!(
                    "upgrade: cannot use the old binary's state ({why}); draining its {sockets} \
                     connections (reconnect, then 1001) while serving"
                );
                self.drain_inherited(envelope.sockets, cfg, now);
            }
        }
    }

    /// Register an inherited socket under a new key. `ours`: this binary's own format
    /// wrote it, so it is nonblocking already (O_NONBLOCK belongs to the open file, which
    /// `execve` keeps); from another version, it is set again.
    fn register(&mut self, fd: RawFd, ours: bool) -> Result<(ConnId, TcpStream), String> {
        let std: std::net::TcpStream = adopt_fd(fd).ok_or("not a socket")?;
        if !ours {
            std.set_nonblocking(true).map_err(|e| e.to_string())?;
        }
        let mut stream = TcpStream::from_std(std);
        let id = self.conns.next_id();
        self.poll
            .registry()
            .register(&mut stream, id.token(), Interest::READABLE)
            .map_err(|e| e.to_string())?;
        Ok((id, stream))
    }

    /// Whatever a client sent in the gap is read in the first pass: epoll reports a
    /// socket that is readable when it is added (`EPOLL_CTL_ADD` polls it once), edge-
    /// triggered or not, so no read is spent on the many that sent nothing.
    fn place_socket(&mut self, id: ConnId, stream: TcpStream) {
        if self.sockets.len() <= id.0 {
            self.sockets.resize_with(id.0 + 1, || None);
        }
        self.sockets[id.0] = Some(Socket {
            stream,
            registered: Interest::READABLE,
        });
    }

    /// One connection as it was. `Ok(false)`: carried, but a subscription could not be,
    /// so it is told to reconnect (and resumes from history).
    fn restore(
        &mut self,
        socket: &handover::Socket,
        conn: handover::Conn,
        now: Instant,
    ) -> Result<bool, String> {
        // Check what can be refused before the socket is taken.
        let session = match &conn.state {
            handover::State::Open(s) | handover::State::Closing(s) => {
                Some(Ws::import(s.ws.clone()).ok_or("a codec state this binary rejects")?)
            }
            _ => None,
        };
        let (id, stream) = self.register(socket.fd, true)?;
        let client = match conn.client {
            handover::Client::Peer => ClientAddr::Peer,
            handover::Client::ProxyUnread => ClientAddr::ProxyUnread,
            handover::Client::ProxyOwn => ClientAddr::ProxyOwn,
            handover::Client::Forwarded(ip) => ClientAddr::Forwarded(ip),
            handover::Client::ForwardedFor(ip) => ClientAddr::ForwardedFor(ip),
        };
        let id2 = self.conns.insert_carried(conn.peer, client, now);
        debug_assert_eq!(id, id2);
        self.place_socket(id, stream);
        let mut whole = true;
        let mut topics = Vec::new();
        {
            let c = &mut self.conns[id];
            c.metrics_port = conn.metrics_port;
            c.peer_shut = conn.peer_shut;
            c.sent_continue = conn.sent_continue;
            c.partial = conn.partial;
            c.state = match conn.state {
                handover::State::ReadingRequest => State::ReadingRequest,
                handover::State::Finishing => State::Finishing,
                handover::State::Lingering => State::Lingering,
                handover::State::Open(s) | handover::State::Closing(s) => {
                    let closing = s.ws.close_sent || s.ws.close_received;
                    let kind = if s.echo {
                        protocol::Kind::Echo
                    } else {
                        protocol::Kind::Topics
                    };
                    let ws = session.ok_or("no codec")?;
                    let silent = Duration::from_millis(s.silent_ms);
                    let last_seen = now.checked_sub(silent).unwrap_or(now);
                    let ops = self.sessions.op_budget(s.ops_level, now);
                    let mut session = Session::new(ws, kind, ops, last_seen);
                    session.grant = s.grant.and_then(|g| {
                        Some(Box::new(Grant {
                            sub: g.sub,
                            exp: g.exp,
                            topics: Patterns::parse(&g.topics).ok()?,
                            publish: Patterns::parse(&g.publish).ok()?,
                            refused: Patterns::parse(&g.refused).ok()?,
                        }))
                    });
                    topics = s.topics;
                    if closing {
                        State::Closing(Box::new(session))
                    } else {
                        State::Open(Box::new(session))
                    }
                }
            };
        }
        for (t, left) in conn.timers {
            self.conns
                .arm(id, timer_in(t), now + Duration::from_millis(left));
        }
        if !socket.pending.is_empty() {
            self.conns.queue(id, Bytes::from(socket.pending.clone()));
        }
        if self.conns[id].is_open() {
            whole = self.pubsub.restore_topics(&mut self.conns, id, topics);
            if !whole {
                let after_ms = self.jitter.draw();
                self.sessions.going_away(
                    &mut self.conns,
                    &mut self.pubsub,
                    &mut self.counters,
                    id,
                    after_ms,
                    now,
                );
            }
        }
        Ok(whole)
    }

    /// The fallback: each inherited socket gets its pending bytes; WebSockets then get
    /// `reconnect` and 1001, spread over `--drain-spread` as a drain's are; HTTP
    /// connections close after their bytes. The process goes on serving, so the clients
    /// come back here and resume from the history the envelope carried.
    fn drain_inherited(&mut self, sockets: Vec<handover::Socket>, cfg: &Config, now: Instant) {
        if sockets.is_empty() {
            return;
        }
        let mut open = Vec::new();
        for s in sockets {
            let (id, stream) = match self.register(s.fd, false) {
                Ok(x) => x,
                Err(why) => {
                    warn!("upgrade: fd {} cannot be adopted: {why}", s.fd);
                    continue;
                }
            };
            let peer = stream
                .peer_addr()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
            let id2 = self.conns.insert_carried(peer, ClientAddr::Peer, now);
            debug_assert_eq!(id, id2);
            self.place_socket(id, stream);
            if !s.pending.is_empty() {
                self.conns.queue(id, Bytes::from(s.pending));
            }
            let ws = |close_sent| {
                Ws::import(handover::Ws {
                    max_message_size: u32::try_from(cfg.max_message_size).unwrap_or(u32::MAX),
                    close_sent,
                    ..handover::Ws::default()
                })
            };
            let session = |kind, close_sent: bool| {
                ws(close_sent).map(|ws| {
                    Box::new(Session::new(
                        ws,
                        kind,
                        self.sessions.op_budget(0.0, now),
                        now,
                    ))
                })
            };
            match s.kind {
                Kind::Topics | Kind::Echo => {
                    let kind = if s.kind == Kind::Echo {
                        protocol::Kind::Echo
                    } else {
                        protocol::Kind::Topics
                    };
                    if let Some(session) = session(kind, false) {
                        self.conns[id].state = State::Open(session);
                        open.push((id, self.conns[id].serial));
                    } else {
                        self.kill(id, now);
                    }
                }
                Kind::Closing => {
                    if let Some(session) = session(protocol::Kind::Echo, true) {
                        self.conns[id].state = State::Closing(session);
                        self.conns.arm(id, Timer::CloseGrace, now + CLOSE_GRACE);
                    } else {
                        self.kill(id, now);
                    }
                }
                Kind::Http | Kind::Ending => {
                    let ended = self.conns.finish(id, now);
                    self.pubsub.leave(ended, now);
                }
            }
        }
        if !open.is_empty() {
            info!(
                "upgrade fallback: closing {} inherited WebSockets over {:.1} s",
                open.len(),
                self.drain_spread.as_secs_f64()
            );
            self.inherited_pacer = Some(Pacer::new(now, self.drain_spread, open));
        }
    }

    /// The fallback's paced closes that are due.
    pub(super) fn close_due_inherited(&mut self, now: Instant) {
        let Some(pacer) = self.inherited_pacer.as_mut() else {
            return;
        };
        let batch = pacer.due(now);
        if pacer.is_done() {
            self.inherited_pacer = None;
        }
        self.send_away(&batch, now);
    }
}

fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn timer_out(t: Timer) -> handover::Timer {
    match t {
        Timer::Request => handover::Timer::Request,
        Timer::Idle => handover::Timer::Idle,
        Timer::Ping => handover::Timer::Ping,
        Timer::Pong => handover::Timer::Pong,
        Timer::CloseGrace => handover::Timer::CloseGrace,
        Timer::Grant => handover::Timer::Grant,
    }
}

fn timer_in(t: handover::Timer) -> Timer {
    match t {
        handover::Timer::Request => Timer::Request,
        handover::Timer::Idle => Timer::Idle,
        handover::Timer::Ping => Timer::Ping,
        handover::Timer::Pong => Timer::Pong,
        handover::Timer::CloseGrace => Timer::CloseGrace,
        handover::Timer::Grant => Timer::Grant,
    }
}
