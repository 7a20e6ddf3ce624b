//! Socket helpers without policy: the listener with our backlog, the send buffer of an
//! accepted socket, and the immediate refusal written to a connection we will not keep.

use std::io::{self, Write};
use std::net::SocketAddr;

use log::{info, warn};
use mio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Bind a nonblocking listener. mio's own `bind` listens with a backlog of 128, which a
/// reconnect storm overflows at once; the kernel still caps ours at net.core.somaxconn.
/// With `reuse_port`, several processes bind the same port (SO_REUSEPORT) and the kernel
/// spreads new connections over them.
pub fn listen(addr: SocketAddr, backlog: i32, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // A restarted herald must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// The listener systemd passed (socket activation: `LISTEN_FDS`, `LISTEN_PID`), if any.
/// While herald restarts, the kernel keeps queueing connections on it, so none is
/// refused.
pub fn inherited() -> io::Result<Option<TcpListener>> {
    let Some(fd) = sd_notify::listen_fds()?.next() else {
        return Ok(None);
    };
    // SAFETY: systemd passed us this descriptor (LISTEN_PID is our pid) and nothing else
    // in the process owns it; from here the listener is its only owner.
    let std = unsafe { <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    std.set_nonblocking(true)?;
    Ok(Some(TcpListener::from_std(std)))
}

/// `--sndbuf`: SO_SNDBUF on every accepted socket. Without it the kernel starts a socket at
/// net.ipv4.tcp_wmem's default and autotunes it up to its maximum (4 MiB on most hosts),
/// all of which a client that stops reading can fill before its bytes reach our queue and
/// `--send-queue-limit` starts counting. Setting it turns autotuning off for the socket.
#[derive(Debug)]
pub struct SendBuffer {
    bytes: Option<usize>,
    /// What the kernel made of it has been logged (the first socket says it for all).
    reported: bool,
    /// A failure has been logged: once is enough, the next socket would say the same.
    warned: bool,
}

impl SendBuffer {
    pub fn new(bytes: Option<usize>) -> SendBuffer {
        SendBuffer {
            bytes,
            reported: false,
            warned: false,
        }
    }

    /// A failure is not fatal: that socket keeps the kernel's autotuned buffer.
    pub fn apply(&mut self, stream: &TcpStream) {
        let Some(bytes) = self.bytes else {
            return;
        };
        let socket = SockRef::from(stream);
        match socket.set_send_buffer_size(bytes) {
            Err(e) if !self.warned => {
                self.warned = true;
                warn!(
                    "--sndbuf {bytes}: setting SO_SNDBUF failed ({e}); such sockets keep the \
                     kernel's send buffer (logged once)"
                );
            }
            Err(_) => {}
            Ok(()) if !self.reported => {
                self.reported = true;
                // Linux doubles the value (the bookkeeping overhead) and caps the request
                // at net.core.wmem_max first; say what a socket really got.
                match socket.send_buffer_size() {
                    Ok(got) if got < 2 * bytes => warn!(
                        "--sndbuf {bytes}: the kernel gives each socket {got} bytes of send \
                         buffer, capped by net.core.wmem_max (sysctl -w net.core.wmem_max={bytes})"
                    ),
                    Ok(got) => info!(
                        "--sndbuf {bytes}: each socket gets {got} bytes of send buffer \
                         (Linux doubles it)"
                    ),
                    Err(e) => warn!("--sndbuf {bytes}: reading SO_SNDBUF back failed: {e}"),
                }
            }
            Ok(()) => {}
        }
    }
}

/// Best effort, nonblocking: a response small enough to fit any send buffer, then the
/// socket is dropped. Used where keeping the connection is what we cannot afford.
pub fn refuse(mut stream: TcpStream, response: &[u8]) {
    let _ = stream.write(response);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Descriptors this process has open (Linux: entries of /proc/self/fd).
pub fn open_fds() -> Option<u64> {
    // One of them is the directory handle reading it.
    Some(
        std::fs::read_dir("/proc/self/fd")
            .ok()?
            .count()
            .saturating_sub(1) as u64,
    )
}

/// accept() errors that mean "out of descriptors or memory": retrying at once would spin.
pub fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
