//! Socket helpers without policy: the listener with our backlog and the options its
//! accepted sockets inherit (TCP_NODELAY, `--sndbuf`), the immediate refusal written to a
//! connection we will not keep, the `sendmsg` writer every flush uses, and the UDP socket
//! StatsD reports go out on.

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

/// Options every client socket gets, set once on the listener: Linux copies them to each
/// socket it accepts, which saves a system call per connection. A failure is logged and
/// not fatal: sockets then keep the kernel's behaviour.
///
/// - TCP_NODELAY: push messages are small, and latency matters more than packet count.
/// - `--sndbuf`: SO_SNDBUF. Without it the kernel starts a socket at net.ipv4.tcp_wmem's
///   default and autotunes it up to its maximum (4 MiB on most hosts), all of which a
///   client that stops reading can fill before its bytes reach our queue and
///   `--send-queue-limit` starts counting. Setting it turns autotuning off.
pub fn set_client_options(listener: &TcpListener, sndbuf: Option<usize>) {
    let socket = SockRef::from(listener);
    if let Err(e) = socket.set_tcp_nodelay(true) {
        warn!("TCP_NODELAY on the listener: {e}; messages may wait for Nagle's delay");
    }
    let Some(bytes) = sndbuf else {
        return;
    };
    if let Err(e) = socket.set_send_buffer_size(bytes) {
        warn!(
            "--sndbuf {bytes}: setting SO_SNDBUF failed ({e}); sockets keep the kernel's send buffer"
        );
        return;
    }
    // Linux doubles the value (the bookkeeping overhead) and caps the request at
    // net.core.wmem_max first; say what a socket really gets.
    match socket.send_buffer_size() {
        Ok(got) if got < 2 * bytes => warn!(
            "--sndbuf {bytes}: the kernel gives each socket {got} bytes of send buffer, capped \
             by net.core.wmem_max (sysctl -w net.core.wmem_max={bytes})"
        ),
        Ok(got) => info!(
            "--sndbuf {bytes}: each socket gets {got} bytes of send buffer (Linux doubles it)"
        ),
        Err(e) => warn!("--sndbuf {bytes}: reading SO_SNDBUF back failed: {e}"),
    }
}

/// The UDP socket StatsD reports go out on: any port of the agent's family, nonblocking,
/// so a full socket buffer loses a report instead of stalling the loop. Not connected:
/// the kernel then reports no ICMP "port unreachable" back to us, so an agent that is
/// down costs its samples and nothing else, as StatsD intends (a connected socket would
/// turn every other send into ECONNREFUSED).
pub fn statsd_socket(agent: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let any: SocketAddr = if agent.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
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

/// Best effort, nonblocking: a response small enough to fit any send buffer, then the
/// socket is dropped. Used where keeping the connection is what we cannot afford.
pub fn refuse(mut stream: TcpStream, response: &[u8]) {
    let _ = stream.write(response);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Bytes written to the socket that the peer has not acknowledged yet (SIOCOUTQ); 0 when
/// it cannot be read.
pub fn unacknowledged(stream: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut bytes: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer, which points at one.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut bytes) };
    if rc == 0 { bytes.max(0) as usize } else { 0 }
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

/// A socket written with `sendmsg` rather than `writev`: the same iovecs, but straight
/// into the socket layer, past the VFS's file-position lock and dispatch (~7% of the
/// kernel's time per delivery in a profile of a 5,000-subscriber fan-out).
pub struct Send<'a>(pub &'a TcpStream);

impl io::Write for Send<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        socket2::SockRef::from(self.0).send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_the_listeners_client_options() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), 16, false).unwrap();
        set_client_options(&listener, Some(16384));
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let accepted = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert!(accepted.nodelay().unwrap());
        // Linux doubles SO_SNDBUF.
        assert_eq!(SockRef::from(&accepted).send_buffer_size().unwrap(), 32768);
    }
}
