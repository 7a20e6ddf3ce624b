//! `herald tail URL TOPIC...`: a subscriber for a terminal. stdout gets one JSON line per
//! message, as herald sent it, and at the end of each connection one
//! `{"op":"close","code":N,"reason":"..."}` line (1006 when it ended without a close
//! frame, RFC 6455 §7.1.5); stderr gets what happened meanwhile (subscribed, gaps,
//! reconnects). With `--follow` it reconnects, after the server's
//! `{"op":"reconnect","after_ms":X}` hint when one came and with backoff otherwise, and
//! resumes every topic from the last id it printed (`?resume=topic~id~epoch`), so across
//! a restart that kept history nothing is missed and nothing printed twice.
//!
//! The resume bookkeeping (`Positions`) and the backoff are pure and tested below; `run`
//! does the I/O through `client.rs`.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use serde::Deserialize;
use tungstenite::{Message, WebSocket};

use crate::config::TailArgs;
use crate::probe::client::{self, Event, Kind, Stream, Target, UpgradeError};

/// The backoff's window: attempt n waits a random time in [MIN, min(MAX, MIN·2^(n+1))],
/// herald.js's schedule, so tails cut together (a deploy) come back spread out.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that stayed open this long starts the backoff over.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Where each topic stands: its epoch and the last id printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    pub epoch: Option<String>,
    pub last: Option<u64>,
}

/// What to make of a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Print,
    /// At or below the last id printed: already seen (a replay's seam).
    Duplicate,
}

/// Every topic's position, in the order given on the command line.
#[derive(Debug, Clone)]
pub struct Positions {
    topics: Vec<(String, Position)>,
}

impl Positions {
    pub fn new(topics: &[String]) -> Positions {
        let mut list: Vec<(String, Position)> = Vec::new();
        for t in topics {
            if !list.iter().any(|(name, _)| name == t) {
                list.push((t.clone(), Position::default()));
            }
        }
        Positions { topics: list }
    }

    fn get(&mut self, topic: &str) -> Option<&mut Position> {
        self.topics
            .iter_mut()
            .find(|(name, _)| name == topic)
            .map(|(_, p)| p)
    }

    /// The query that (re)subscribes every topic: `topics=` for those never subscribed,
    /// `resume=topic~id~epoch` for the others (README, Resume).
    pub fn query(&self) -> String {
        let mut fresh = Vec::new();
        let mut resume = Vec::new();
        for (topic, p) in &self.topics {
            match (&p.epoch, p.last) {
                (Some(epoch), Some(last)) if !epoch.is_empty() => {
                    resume.push(format!("{topic}~{last}~{}", percent_encode(epoch)))
                }
                _ => fresh.push(topic.clone()),
            }
        }
        let mut parts = Vec::new();
        if !fresh.is_empty() {
            parts.push(format!("topics={}", fresh.join(",")));
        }
        if !resume.is_empty() {
            parts.push(format!("resume={}", resume.join(",")));
        }
        parts.join("&")
    }

    /// A `subscribed` reply. Returns a warning for stderr when the resume could not
    /// vouch for what was missed.
    pub fn subscribed(&mut self, reply: &Subscribed) -> Option<String> {
        let p = self.get(&reply.topic)?;
        let warning = match reply.recovered {
            Some(false) => Some(format!(
                "{}: resume from id {} not recovered{}: messages may be missing",
                reply.topic,
                p.last.map_or("-".into(), |l| l.to_string()),
                match &p.epoch {
                    Some(old) if *old != reply.epoch =>
                        format!(" (epoch {old} is gone, now {})", reply.epoch),
                    _ => String::new(),
                }
            )),
            _ => None,
        };
        let same_epoch = p.epoch.as_deref() == Some(reply.epoch.as_str());
        match (reply.recovered.is_some(), same_epoch) {
            // A resume in the same epoch: the replay follows our last id.
            (true, true) => {}
            // A new epoch: its ids mean nothing next to ours; print what comes.
            (true, false) => p.last = None,
            // A plain subscribe: live messages come after the topic's last id.
            (false, _) => p.last = reply.id,
        }
        p.epoch = Some(reply.epoch.clone());
        warning
    }

    /// A message on `topic` with `id`: print it, or drop it as seen.
    pub fn message(&mut self, topic: &str, id: u64) -> Verdict {
        let Some(p) = self.get(topic) else {
            return Verdict::Print;
        };
        if p.last.is_some_and(|last| id <= last) {
            return Verdict::Duplicate;
        }
        p.last = Some(id);
        Verdict::Print
    }
}

/// Epochs are opaque: encode everything but unreserved characters (RFC 3986 §2.3).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The fields of server frames that tail acts on.
#[derive(Debug, Deserialize)]
pub struct Frame {
    pub op: String,
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub epoch: Option<String>,
    #[serde(default)]
    pub recovered: Option<bool>,
    #[serde(default)]
    pub after_ms: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug)]
pub struct Subscribed {
    pub topic: String,
    pub epoch: String,
    pub id: Option<u64>,
    pub recovered: Option<bool>,
}

/// A message frame as one line: herald passes `data` through as the publisher wrote it,
/// and JSON allows raw newlines only as whitespace (inside strings they are escaped), so
/// turning them into spaces keeps the JSON and its meaning.
pub fn one_json_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// herald.js's backoff with a small generator of our own (no `rand` for one number).
pub struct Backoff {
    attempt: u32,
    state: u64,
}

impl Backoff {
    pub fn new(seed: u64) -> Backoff {
        Backoff {
            attempt: 0,
            state: seed | 1,
        }
    }

    /// A uniform draw in [0, 1) (xorshift64*).
    fn unit(&mut self) -> f64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        (self.state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The wait before the next attempt. A hint from the server replaces the window (and
    /// does not advance it): at least `after_ms`, plus up to MIN of our own.
    pub fn next(&mut self, hint: Option<Duration>) -> Duration {
        if let Some(after) = hint {
            return after + BACKOFF_MIN.mul_f64(self.unit());
        }
        let top = BACKOFF_MIN
            .saturating_mul(2u32.saturating_pow(self.attempt.min(16) + 1))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        BACKOFF_MIN + (top - BACKOFF_MIN).mul_f64(self.unit())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// How one connection ended.
enum End {
    /// The server's close frame.
    Closed { code: u16, reason: String },
    /// Without a close frame, after the upgrade.
    Lost(String),
    /// No connection at all (DNS, TCP, TLS, the upgrade refused).
    Failed(String),
}

pub fn run(args: &TailArgs) -> Result<i32, String> {
    let target = Target::parse(&args.url, Kind::WebSocket)?;
    for topic in &args.topics {
        crate::topic::check_name(topic).map_err(|e| format!("topic {topic:?}: {e}"))?;
    }
    if args.timeout == 0 || args.keepalive == 0 {
        return Err("--timeout and --keepalive must be at least 1 second".into());
    }
    // Its default, 30 s, is a little over herald's default --ping-interval (25 s), so a
    // default herald's own pings come first and tail sends none.
    let keepalive = Duration::from_secs(args.keepalive);
    let tls = if target.tls {
        Some(client::tls_config(args.ca_file.as_deref())?)
    } else {
        None
    };
    let origin = args.origin.clone().unwrap_or_else(|| target.origin());
    let timeout = Duration::from_secs(args.timeout);
    let mut positions = Positions::new(&args.topics);
    let seed = RandomState::new().hash_one(std::process::id());
    let mut backoff = Backoff::new(seed);
    loop {
        let mut hint = None;
        let opened = Instant::now();
        let end = session(
            &target,
            tls.as_ref(),
            &origin,
            timeout,
            keepalive,
            &mut positions,
            &mut hint,
        );
        let (code, reason) = match &end {
            End::Closed { code, reason } => (Some(*code), reason.clone()),
            End::Lost(why) => (Some(1006), why.clone()),
            End::Failed(why) => {
                eprintln!("herald tail: {why}");
                (None, String::new())
            }
        };
        if let Some(code) = code {
            let line = serde_json::json!({"op": "close", "code": code, "reason": reason});
            emit(&line.to_string());
        }
        if !args.follow {
            return Ok(match end {
                End::Closed { code, .. } if code == 1000 || code == 1001 => 0,
                _ => 1,
            });
        }
        if opened.elapsed() >= STABLE_AFTER {
            backoff.reset();
        }
        let wait = backoff.next(hint);
        eprintln!(
            "herald tail: reconnecting in {} ms{}",
            wait.as_millis(),
            if hint.is_some() {
                " (the server's hint)"
            } else {
                ""
            }
        );
        std::thread::sleep(wait);
    }
}

/// One connection: open, subscribe or resume, print until it ends.
fn session(
    target: &Target,
    tls: Option<&Arc<ClientConfig>>,
    origin: &str,
    timeout: Duration,
    keepalive: Duration,
    positions: &mut Positions,
    hint: &mut Option<Duration>,
) -> End {
    let mut with_query = target.clone();
    let sep = if target.path.contains('?') { '&' } else { '?' };
    with_query.path = format!("{}{sep}{}", target.path, positions.query());
    let stream = match client::connect(&with_query, tls, timeout) {
        Ok(s) => s,
        Err(e) => return End::Failed(format!("{}: {e}", target.ws_url())),
    };
    let mut ws = match client::upgrade(stream, &with_query, origin) {
        Ok(ws) => ws,
        Err(UpgradeError::Refused { status, body }) => {
            return End::Failed(format!("{}: answered {status} {body}", target.ws_url()));
        }
        Err(UpgradeError::Other(e)) => return End::Failed(format!("{}: {e}", target.ws_url())),
    };
    eprintln!("herald tail: connected to {}", target.ws_url());
    let mut last_heard = Instant::now();
    let mut pinged = false;
    loop {
        let deadline = if pinged {
            last_heard + keepalive * 2
        } else {
            last_heard + keepalive
        };
        match client::next_event(&mut ws, deadline) {
            Event::Text(text) => {
                last_heard = Instant::now();
                pinged = false;
                handle(&text, positions, hint);
            }
            Event::Ping | Event::Pong => {
                last_heard = Instant::now();
                pinged = false;
            }
            Event::Closed { code, reason } => return End::Closed { code, reason },
            Event::Lost(why) => return End::Lost(why),
            Event::Timeout if pinged => {
                return End::Lost(format!(
                    "nothing from the server for {}s, not even a pong",
                    (keepalive * 2).as_secs()
                ));
            }
            Event::Timeout => {
                pinged = true;
                if let Err(e) = ping(&mut ws) {
                    return End::Lost(e);
                }
            }
        }
    }
}

/// One line on stdout, flushed, so a pipe reads each message when it comes. A reader
/// that went away (`herald tail ... | head -3`) ends tail quietly, as it ends `tail -f`.
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

fn ping(ws: &mut WebSocket<Stream>) -> Result<(), String> {
    ws.send(Message::Ping(Default::default()))
        .map_err(|e| e.to_string())
}

/// One text frame: a message to print, or news for stderr.
fn handle(text: &str, positions: &mut Positions, hint: &mut Option<Duration>) {
    let Ok(frame) = serde_json::from_str::<Frame>(text) else {
        eprintln!("herald tail: not JSON: {}", client::one_line(text));
        return;
    };
    match frame.op.as_str() {
        "message" => {
            let (Some(topic), Some(id)) = (&frame.topic, frame.id) else {
                emit(&one_json_line(text));
                return;
            };
            if positions.message(topic, id) == Verdict::Print {
                emit(&one_json_line(text));
            }
        }
        "subscribed" => {
            let (Some(topic), Some(epoch)) = (frame.topic, frame.epoch) else {
                return;
            };
            let reply = Subscribed {
                topic,
                epoch,
                id: frame.id,
                recovered: frame.recovered,
            };
            eprintln!(
                "herald tail: subscribed {} (epoch {}, id {}{})",
                reply.topic,
                reply.epoch,
                reply.id.map_or("-".into(), |i| i.to_string()),
                match reply.recovered {
                    Some(true) => ", recovered",
                    Some(false) => ", not recovered",
                    None => "",
                }
            );
            if let Some(warning) = positions.subscribed(&reply) {
                eprintln!("herald tail: {warning}");
            }
        }
        "reconnect" => {
            *hint = frame.after_ms.map(Duration::from_millis);
            eprintln!(
                "herald tail: the server asks to reconnect after {} ms",
                frame.after_ms.unwrap_or(0)
            );
        }
        "error" => eprintln!(
            "herald tail: error {}: {}",
            frame.error.unwrap_or_default(),
            frame.message.unwrap_or_default()
        ),
        _ => eprintln!("herald tail: {}", one_json_line(text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(topic: &str, epoch: &str, id: u64, recovered: Option<bool>) -> Subscribed {
        Subscribed {
            topic: topic.into(),
            epoch: epoch.into(),
            id: Some(id),
            recovered,
        }
    }

    #[test]
    fn a_resume_prints_each_id_once_across_the_seam() {
        let mut p = Positions::new(&["a".into(), "b".into(), "a".into()]);
        assert_eq!(p.query(), "topics=a,b");
        assert_eq!(p.subscribed(&sub("a", "E1", 4, None)), None);
        assert_eq!(p.subscribed(&sub("b", "F/1", 0, None)), None);
        // Live messages after the topic's last id.
        assert_eq!(p.message("a", 5), Verdict::Print);
        assert_eq!(p.message("a", 6), Verdict::Print);
        assert_eq!(p.query(), "resume=a~6~E1,b~0~F%2F1");
        // Reconnected: the replay repeats 6 at the seam, then goes on.
        assert_eq!(p.subscribed(&sub("a", "E1", 8, Some(true))), None);
        assert_eq!(p.message("a", 6), Verdict::Duplicate);
        assert_eq!(p.message("a", 7), Verdict::Print);
        assert_eq!(p.message("a", 8), Verdict::Print);
        assert_eq!(p.message("b", 1), Verdict::Print);
    }

    #[test]
    fn a_lost_epoch_warns_and_prints_the_new_ids() {
        let mut p = Positions::new(&["a".into()]);
        p.subscribed(&sub("a", "E1", 0, None));
        assert_eq!(p.message("a", 1), Verdict::Print);
        assert_eq!(p.message("a", 2), Verdict::Print);
        let warning = p.subscribed(&sub("a", "E2", 1, Some(false))).unwrap();
        assert!(
            warning.contains("not recovered") && warning.contains("E1"),
            "{warning}"
        );
        // The new epoch's id 1 is another message than the old epoch's.
        assert_eq!(p.message("a", 1), Verdict::Print);
        // Same epoch, history ran short: warned, and ids still dedupe.
        let warning = p.subscribed(&sub("a", "E2", 9, Some(false))).unwrap();
        assert!(!warning.contains("gone"), "{warning}");
        assert_eq!(p.message("a", 1), Verdict::Duplicate);
    }

    #[test]
    fn backoff_grows_within_its_window_and_a_hint_sets_the_floor() {
        let mut b = Backoff::new(7);
        for n in 0..10u32 {
            let top = BACKOFF_MIN.saturating_mul(2u32.pow(n + 1)).min(BACKOFF_MAX);
            let wait = b.next(None);
            assert!(wait >= BACKOFF_MIN && wait <= top, "attempt {n}: {wait:?}");
        }
        let hinted = b.next(Some(Duration::from_millis(1500)));
        assert!(hinted >= Duration::from_millis(1500));
        assert!(hinted <= Duration::from_millis(2000));
        b.reset();
        assert!(b.next(None) <= BACKOFF_MIN * 2);
    }

    #[test]
    fn pretty_data_becomes_one_line_of_the_same_json() {
        let text =
            "{\"op\":\"message\",\"topic\":\"t\",\"id\":1,\"data\":{\n  \"a\": \"x\\ny\"\r\n}}";
        let line = one_json_line(text);
        assert!(!line.contains('\n') && !line.contains('\r'));
        let before: serde_json::Value = serde_json::from_str(text).unwrap();
        let after: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(before, after);
    }
}
