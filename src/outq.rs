//! A connection's outbound bytes, in order: HTTP responses, pongs, closes and broadcast
//! frames all go through here, so nothing can interleave on the socket. Chunks are
//! `Bytes`: a published frame is one allocation shared by every subscriber's queue.
//! The queue counts its bytes, which is what the slow-consumer limit measures. Beside it,
//! `write_buffer`: the nonblocking write of one plain buffer, for the Redis and application
//! links.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::Bytes;

/// Most chunks handed to one vectored write (`sendmsg`). Linux's IOV_MAX is 1024; 64 already covers
/// every realistic backlog between two loop passes.
const MAX_IOVECS: usize = 64;

#[derive(Debug, Default)]
pub struct OutQueue {
    chunks: VecDeque<Bytes>,
    /// Bytes of the front chunk already written.
    offset: usize,
    /// Unsent bytes in total.
    len: usize,
}

/// How a flush ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Everything was written.
    Drained,
    /// The socket would block: wait for WRITABLE.
    Blocked,
    /// The per-wakeup budget ran out with the socket still writable: try again next pass.
    Budget,
}

impl OutQueue {
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.len += chunk.len();
        self.chunks.push_back(chunk);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every unsent byte, from the exact byte the kernel took last (a live upgrade carries
    /// them, so a partly written frame resumes where it stopped).
    pub fn unsent(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for (i, chunk) in self.chunks.iter().enumerate() {
            out.extend_from_slice(if i == 0 { &chunk[self.offset..] } else { chunk });
        }
        out
    }

    /// Forget every chunk not yet started, keeping a partly written one so the peer still
    /// sees whole frames. Returns the bytes dropped.
    pub fn drop_unstarted(&mut self) -> usize {
        let keep = usize::from(self.offset > 0);
        let dropped: usize = self.chunks.iter().skip(keep).map(Bytes::len).sum();
        self.chunks.truncate(keep);
        self.len -= dropped;
        dropped
    }

    /// Write vectored (the reactor's writer is `sendmsg`) until the queue is empty, the
    /// socket would block, or `budget` bytes have gone out. One syscall carries many queued
    /// messages at once; `syscalls` counts the calls made.
    pub fn write_to(
        &mut self,
        w: &mut impl Write,
        budget: usize,
        syscalls: &mut u64,
    ) -> io::Result<Flushed> {
        let mut written = 0;
        while !self.chunks.is_empty() {
            if written >= budget {
                return Ok(Flushed::Budget);
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for (i, chunk) in self.chunks.iter().take(MAX_IOVECS).enumerate() {
                let start = if i == 0 { self.offset } else { 0 };
                slices[i] = IoSlice::new(&chunk[start..]);
                count += 1;
            }
            *syscalls += 1;
            let n = match w.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            written += n;
            self.consume(n);
        }
        // An empty queue holds no allocation: an idle connection would otherwise keep a
        // ring of at least four 32-byte handles for good (~130 bytes each, of the ~500 a
        // subscriber costs). Allocating it again on the next message is one malloc beside
        // a system call that costs a hundred times more.
        self.chunks = VecDeque::new();
        Ok(Flushed::Drained)
    }

    fn consume(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let rest = front.len() - self.offset;
            if n >= rest {
                n -= rest;
                self.offset = 0;
                self.chunks.pop_front();
            } else {
                self.offset += n;
                n = 0;
            }
        }
    }
}

/// Write as much of `output` as the nonblocking `sink` takes now, and remove what it
/// took: the links to Redis and to the application, whose output is one buffer. Ok when
/// all is written or the sink would block; the reason when the peer is gone (a zero-byte
/// write) or the write failed.
pub fn write_buffer(sink: &mut impl Write, output: &mut Vec<u8>) -> Result<(), String> {
    while !output.is_empty() {
        match sink.write(output) {
            Ok(0) => return Err("connection closed".to_string()),
            Ok(n) => {
                output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that accepts `cap` bytes per call, then would block after `calls` calls.
    struct Trickle {
        out: Vec<u8>,
        cap: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.calls == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls -= 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.cap - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_order_and_count() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"hello "));
        q.push(Bytes::from_static(b""));
        q.push(Bytes::from_static(b"big "));
        q.push(Bytes::from_static(b"world"));
        assert_eq!(q.len(), 15);
        let mut sock = Trickle {
            out: Vec::new(),
            cap: 4,
            calls: 2,
        };
        assert_eq!(
            q.write_to(&mut sock, usize::MAX, &mut 0).unwrap(),
            Flushed::Blocked
        );
        assert_eq!(sock.out, b"hello bi");
        assert_eq!(q.len(), 7);
        sock.calls = 10;
        assert_eq!(
            q.write_to(&mut sock, usize::MAX, &mut 0).unwrap(),
            Flushed::Drained
        );
        assert_eq!(sock.out, b"hello big world");
        assert!(q.is_empty());
    }

    #[test]
    fn budget_stops_a_flush_that_could_go_on() {
        let mut q = OutQueue::default();
        for _ in 0..10 {
            q.push(Bytes::from_static(b"0123456789"));
        }
        let mut sock = Trickle {
            out: Vec::new(),
            cap: 10,
            calls: 100,
        };
        assert_eq!(q.write_to(&mut sock, 30, &mut 0).unwrap(), Flushed::Budget);
        assert_eq!(sock.out.len(), 30);
        assert_eq!(q.len(), 70);
    }

    #[test]
    fn dropping_unstarted_chunks_keeps_the_partial_front() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"aaaa"));
        q.push(Bytes::from_static(b"bbbb"));
        let mut sock = Trickle {
            out: Vec::new(),
            cap: 2,
            calls: 1,
        };
        q.write_to(&mut sock, usize::MAX, &mut 0).unwrap();
        assert_eq!(q.drop_unstarted(), 4);
        assert_eq!(q.len(), 2);
        sock.calls = 5;
        sock.cap = 10;
        q.write_to(&mut sock, usize::MAX, &mut 0).unwrap();
        assert_eq!(sock.out, b"aaaa");
        // Nothing started: everything goes.
        q.push(Bytes::from_static(b"cc"));
        assert_eq!(q.drop_unstarted(), 2);
        assert!(q.is_empty());
    }
}
