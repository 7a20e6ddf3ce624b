//! Signals come first (ARCHITECTURE.md): a SIGTERM that has landed is acted on before
//! any input handled after it, in the same poll pass or the same read. Regression test
//! for a `GET /health` sent on an idle keep-alive connection just after SIGTERM being
//! answered `200 ok` without `Connection: close`, because epoll returned the
//! connection's event ahead of the signal pipe's and events were handled in that order.
//!
//! The second-signal case (exit 1 at once) is `drain::second_signal_exits_at_once`.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use crate::util::{Herald, TIMEOUT};

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";

const ROUNDS: usize = 40;

/// What the client saw after sending its request just behind the SIGTERM.
#[derive(Debug)]
enum Outcome {
    /// EOF with no response: the drain closed the idle connection first.
    Closed,
    /// Reset with no response: closed first, with our request unread in its buffer.
    Reset,
    /// `503` with `Connection: close`, then EOF: handled as part of the drain.
    Draining,
    /// Anything else: answered as if the signal had not landed, or no clean end.
    Bad(String),
}

/// Status and whether the response says `Connection: close`, from a response's bytes.
fn status_and_close(bytes: &[u8]) -> Option<(u16, bool)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let close = lines.filter_map(|l| l.split_once(':')).any(|(n, v)| {
        n.trim().eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
    });
    Some((status, close))
}

/// One fresh herald: an idle keep-alive connection, SIGTERM, at once a second request on
/// that connection, then everything until the connection ends. Waits for herald to exit.
fn one_round(round: usize) -> Outcome {
    let mut herald = Herald::start(&[]);
    let mut conn = herald.http();
    conn.stream.set_nodelay(true).unwrap();
    let first = conn.exchange(HEALTH);
    assert_eq!(first.status, 200, "round {round}: {}", first.text());
    assert_eq!(first.header("Connection"), None, "round {round}");

    herald.signal(libc::SIGTERM);
    let sent = conn.stream.write_all(HEALTH);

    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let ended = loop {
        match conn.stream.read(&mut chunk) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        }
    };
    let outcome = match (ended, got.is_empty()) {
        (Ok(()), true) => Outcome::Closed,
        (Err(e), true) if e.kind() == ErrorKind::ConnectionReset => Outcome::Reset,
        (Ok(()), false) => match status_and_close(&got) {
            Some((503, true)) => Outcome::Draining,
            _ => Outcome::Bad(format!(
                "round {round}: answered {:?}",
                String::from_utf8_lossy(&got)
            )),
        },
        (Err(e), _) => Outcome::Bad(format!(
            "round {round}: no clean end ({e}; the send: {sent:?}) after {:?}",
            String::from_utf8_lossy(&got)
        )),
    };

    let status = herald
        .wait(TIMEOUT)
        .unwrap_or_else(|| panic!("round {round}: herald did not exit after SIGTERM"));
    assert!(
        status.success(),
        "round {round}: {status:?}\n{}",
        herald.log()
    );
    outcome
}

#[test]
fn a_request_right_after_sigterm_is_answered_as_draining() {
    let start = Instant::now();
    let (mut closed, mut reset, mut draining) = (0, 0, 0);
    let mut bad = Vec::new();
    for round in 0..ROUNDS {
        match one_round(round) {
            Outcome::Closed => closed += 1,
            Outcome::Reset => reset += 1,
            Outcome::Draining => draining += 1,
            Outcome::Bad(what) => bad.push(what),
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{ROUNDS} rounds are taking too long ({round} done)"
        );
    }
    println!(
        "request right after SIGTERM, {ROUNDS} rounds: closed unanswered {} \
         (EOF {closed}, reset {reset}), 503 + Connection: close {draining}, bad {}",
        closed + reset,
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "{} of {ROUNDS} requests sent after SIGTERM were answered as if it had not \
         landed:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
