//! The publisher: `POST /publish` over keep-alive HTTP/1.1 at a paced rate. Each message's
//! `data` is `[send timestamp ns, "padding"]`, so subscribers can measure end-to-end
//! latency on the shared CLOCK_MONOTONIC, and every acknowledged publish is counted: the
//! expected deliveries are acknowledged publishes × subscribers. The ids the replies give
//! (herald's `{"delivered":K,"id":N}`) are kept too, for storm --resume to check each
//! client against.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::ids::IdSet;
use crate::stats::now_ns;

#[derive(Debug, Clone)]
pub struct Pace {
    /// Publishes per second at the start and (ramping linearly) at the end.
    pub from: f64,
    pub to: f64,
    pub duration: Duration,
}

#[derive(Debug, Default, Clone)]
pub struct Published {
    /// Publishes answered 200.
    pub acked: u64,
    /// Publishes refused or lost (connection errors, non-200).
    pub failed: u64,
    /// Of `failed`: slots when no connection could be opened (refused, mostly, while a
    /// server restarts), and replies 503 (a draining server, or one at capacity).
    pub no_connection: u64,
    pub unavailable: u64,
    /// Connections opened (the first, then one after each that ended).
    pub connections: u64,
    /// The ids of the acknowledged publishes, when the replies carry them.
    pub acked_ids: IdSet,
    /// Times an acknowledged id was not above every id acknowledged before it: the
    /// server's ids started over (a restart that lost them), so `acked_ids` mixes epochs.
    pub id_resets: u64,
    /// Sum of the `delivered` (or, with Redis, process) counts in the replies.
    pub delivered: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// Publish to `topic` at `pace` until it ends or `stop` is set. Requests go out on
/// schedule, pipelined on one keep-alive connection, whatever the server's reply time:
/// a publisher that waited for each reply would lower the offered load exactly when the
/// server is busiest. Replies are read on a second thread. Through a restarting server
/// it keeps going: a connection the server ended (a 503 while draining says `Connection:
/// close`) or that broke is replaced before the next publish, a refused connection is
/// tried again at the next one. Requests without a 200 reply count as failed; they are
/// not sent again (each publish has its own slot in the schedule).
pub fn run(
    target: SocketAddr,
    topic: &str,
    payload: usize,
    pace: &Pace,
    stop: &AtomicBool,
) -> Published {
    let mut out = Published {
        first_ns: now_ns(),
        ..Published::default()
    };
    let padding = "x".repeat(payload.saturating_sub(24).max(1));
    let start = now_ns();
    let total_ns = pace.duration.as_nanos() as u64;
    let mut conn: Option<Conn> = None;
    let mut scheduled = 0u64;
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
    while !stop.load(Ordering::Relaxed) {
        let when = due(scheduled as f64);
        if when >= start + total_ns {
            break;
        }
        let now = now_ns();
        if when > now {
            std::thread::sleep(Duration::from_nanos((when - now).min(50_000_000)));
            continue;
        }
        scheduled += 1;
        // The server ended the connection (its reader saw the end): writing into it would
        // lose this publish, so take a new one.
        if conn.as_ref().is_some_and(|c| c.reader.is_finished())
            && let Some(c) = conn.take()
        {
            c.close(&mut out);
        }
        if conn.is_none() {
            conn = Conn::open(target);
            if conn.is_some() {
                out.connections += 1;
            }
        }
        let Some(c) = conn.as_mut() else {
            out.failed += 1;
            out.no_connection += 1;
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let body = format!(r#"{{"topic":"{topic}","data":[{},"{padding}"]}}"#, now_ns());
        let request = format!(
            "POST /publish HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if c.stream.write_all(request.as_bytes()).is_ok() {
            c.sent += 1;
        } else {
            out.failed += 1;
            if let Some(c) = conn.take() {
                c.close(&mut out);
            }
        }
    }
    if let Some(c) = conn.take() {
        c.close(&mut out);
    }
    out.last_ns = now_ns();
    out
}

/// Run the publisher on its own thread.
pub fn spawn(
    target: SocketAddr,
    topic: String,
    payload: usize,
    pace: Pace,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Published> {
    std::thread::spawn(move || run(target, &topic, payload, &pace, &stop))
}

#[derive(Debug, Default)]
struct Replies {
    ok: u64,
    other: u64,
    unavailable: u64,
    delivered: u64,
    /// Acknowledged ids in the order they came, as a set, and how often one was not
    /// above the one before.
    ids: IdSet,
    first_id: Option<u64>,
    last_id: Option<u64>,
    resets: u64,
}

struct Conn {
    stream: TcpStream,
    sent: u64,
    reader: std::thread::JoinHandle<Replies>,
}

impl Conn {
    fn open(target: SocketAddr) -> Option<Conn> {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok()?;
        stream.set_nodelay(true).ok()?;
        let mut reading = stream.try_clone().ok()?;
        reading
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        let reader = std::thread::spawn(move || read_replies(&mut reading));
        Some(Conn {
            stream,
            sent: 0,
            reader,
        })
    }

    /// Stop sending, wait for the replies still due, and count them.
    fn close(self, out: &mut Published) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let replies = self.reader.join().unwrap_or_default();
        out.acked += replies.ok;
        out.delivered += replies.delivered;
        out.unavailable += replies.unavailable;
        out.failed += self.sent.saturating_sub(replies.ok);
        // Connections are used one after another, so their ids follow each other.
        if let (Some(first), Some(before)) = (replies.first_id, out.acked_ids.max())
            && first <= before
        {
            out.id_resets += 1;
        }
        out.id_resets += replies.resets;
        out.acked_ids.extend(&replies.ids);
    }
}

/// Read responses in order until the connection ends.
fn read_replies(stream: &mut TcpStream) -> Replies {
    let mut r = Replies::default();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Take every complete response in the buffer.
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
            if head.starts_with("http/1.1 200") {
                r.ok += 1;
                r.delivered += crate::frames::number_after(body, b"\"delivered\":").unwrap_or(0);
                if let Some(id) = crate::frames::number_after(body, b"\"id\":") {
                    if r.last_id.is_some_and(|last| id <= last) {
                        r.resets += 1;
                    }
                    r.first_id.get_or_insert(id);
                    r.last_id = Some(id);
                    r.ids.insert(id);
                }
            } else if head.starts_with("http/1.1 503") {
                r.other += 1;
                r.unavailable += 1;
            } else if !head.starts_with("http/1.1 100") {
                r.other += 1;
            }
            at = head_end + 4 + len;
        }
        buf.drain(..at);
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return r,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn replies_give_acknowledged_ids_and_count_503s() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            for (status, body) in [
                ("200 OK", r#"{"delivered":3,"id":7}"#),
                ("200 OK", r#"{"delivered":3,"id":8}"#),
                ("503 Service Unavailable", "draining"),
                ("200 OK", r#"{"delivered":1,"id":2}"#),
            ] {
                let r = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(r.as_bytes()).unwrap();
            }
        });
        let mut stream = TcpStream::connect(addr).unwrap();
        let r = read_replies(&mut stream);
        server.join().unwrap();
        assert_eq!((r.ok, r.unavailable, r.other, r.delivered), (3, 1, 1, 7));
        assert_eq!((r.first_id, r.last_id, r.resets), (Some(7), Some(2), 1));
        assert_eq!((r.ids.len(), r.ids.max()), (3, Some(8)));
    }
}
