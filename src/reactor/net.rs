//! Socket helpers without policy: the listener with our backlog, and the immediate
//! refusal written to a connection we will not keep.

use std::io::{self, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, Socket, Type};

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

/// Best effort, nonblocking: a response small enough to fit any send buffer, then the
/// socket is dropped. Used where keeping the connection is what we cannot afford.
pub fn refuse(mut stream: TcpStream, response: &[u8]) {
    let _ = stream.write(response);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// accept() errors that mean "out of descriptors or memory": retrying at once would spin.
pub fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
