//! `herald check --live`: a deployment checked end to end, from outside, as a browser
//! and an application use it. Through the public URL: DNS, TCP, TLS, the upgrade (with
//! the page's `Origin`), a subscribe to a random probe topic; through the internal
//! publish URL: a publish; then the delivery, and the server's ping within its interval
//! (a proxy that cuts silent WebSockets sooner shows here). Last, the public origin must
//! not pass herald's own API (`/publish`, `/metrics`, `/history`) to herald.
//!
//! Each step is timed and becomes a `Finding` (the plain `herald check`'s), printed as it
//! happens; a failed step says what to fix and ends the chain after it. The judgements
//! are pure functions, tested below; `run` does the I/O.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use serde_json::Value;
use tungstenite::WebSocket;

use crate::check::{Finding, Verdict};
use crate::config::LiveArgs;
use crate::probe::client::{
    self, Event, HttpAnswer, HttpError, Kind, Stream, Target, UpgradeError,
};

/// The probe topics' prefix: a topic an application never uses.
const PROBE_PREFIX: &str = "herald-check.";
/// herald pings once a socket has been silent for the interval, when its loop next wakes
/// for the timer (later on a busy process), and the ping crosses the proxy: allow this
/// much past the interval, plus a tenth of it.
const PING_GRACE: Duration = Duration::from_secs(1);

fn finding(verdict: Verdict, what: String, fix: Vec<String>) -> Finding {
    Finding { verdict, what, fix }
}

fn ok(what: String) -> Finding {
    finding(Verdict::Ok, what, Vec::new())
}

fn fail(what: String, fix: &[&str]) -> Finding {
    finding(
        Verdict::Fail,
        what,
        fix.iter().map(|s| s.to_string()).collect(),
    )
}

/// `12.3 ms`, `4.56 s`: a step's latency.
fn took(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// How long a ping may take: the interval, the grace, a tenth of the interval.
pub fn ping_deadline(interval: Duration) -> Duration {
    interval + PING_GRACE + interval / 10
}

/// What waiting for the server's ping gave, `silent` after our last frame.
#[derive(Debug)]
pub enum PingWait {
    Pinged {
        silent: Duration,
    },
    Cut {
        silent: Duration,
        why: String,
    },
    Closed {
        silent: Duration,
        code: u16,
        reason: String,
    },
    Nothing {
        waited: Duration,
    },
}

pub fn judge_ping(wait: &PingWait, interval: Duration) -> Finding {
    let expected = format!(
        "herald --ping-interval {}s (pass --ping-interval if it runs with another)",
        interval.as_secs()
    );
    let limit = ping_deadline(interval);
    match wait {
        PingWait::Pinged { silent } if *silent <= limit => ok(format!(
            "ping       {:>9}  after that long silent (interval {}s)",
            took(*silent),
            interval.as_secs()
        )),
        PingWait::Pinged { silent } => fail(
            format!(
                "ping       came after {}, later than {}",
                took(*silent),
                took(limit)
            ),
            &[&expected],
        ),
        PingWait::Cut { silent, why } => fail(
            format!(
                "ping       none: the connection was cut after {} of silence, before \
                 the ping ({why})",
                took(*silent)
            ),
            &[
                "something between cuts WebSockets silent for less than herald's ping \
                 interval: HAProxy's `timeout tunnel` (haproxy/haproxy.cfg ships 1h), a \
                 load balancer's idle timeout (Heroku's router: 55 s), a firewall's idle \
                 timer; raise it well above --ping-interval, or lower --ping-interval",
            ],
        ),
        PingWait::Closed {
            silent,
            code,
            reason,
        } => fail(
            format!(
                "ping       none: the server closed with {code} {reason:?} after {} of \
                 silence",
                took(*silent)
            ),
            &["1001 means herald is draining: check again once it is back"],
        ),
        PingWait::Nothing { waited } => fail(
            format!("ping       none within {}", took(*waited)),
            &[
                &expected,
                "a proxy that answers pings itself, or drops them, hides herald's liveness \
                 checks: pass WebSocket frames through untouched",
            ],
        ),
    }
}

/// Whether the public origin's answer to one of herald's own API paths shows the request
/// reached herald: any success, or exactly the answer herald itself gives that request
/// (`own`, asked at the internal address), unless that answer is herald's 404 (the path
/// is not served there, e.g. `/metrics` under `--metrics-listen`).
pub fn judge_public_path(
    label: &str,
    url: &str,
    public: &Result<HttpAnswer, HttpError>,
    own: Option<&HttpAnswer>,
) -> Finding {
    let fix: &[&str] = &[
        "refuse herald's API at the proxy, as haproxy/haproxy.cfg does: \
         `http-request deny deny_status 403 if { path /publish /metrics /history }`",
        "through a proxy every peer looks like loopback to herald, which without \
         --api-key trusts loopback to publish and read history",
    ];
    let answer = match public {
        // Nothing to judge: the chain above says why the public URL cannot be reached.
        Err(HttpError::Connect(e)) => {
            return finding(
                Verdict::Note,
                format!("{label:<10} not checked: no connection to {url} ({e})"),
                Vec::new(),
            );
        }
        // Asked, and the connection was dropped: a proxy may refuse that way.
        Err(HttpError::Answer(e)) => {
            return ok(format!("{label:<10} not answered through {url} ({e})"));
        }
        Ok(a) => a,
    };
    let status = answer.status;
    if (200..300).contains(&status) {
        return fail(
            format!(
                "{label:<10} reachable through {url}: {status} {}",
                answer.line()
            ),
            fix,
        );
    }
    if own.is_some_and(|own| own == answer && own.status != 404) {
        return fail(
            format!(
                "{label:<10} reaches herald through {url}: {status} {:?} is herald's own \
                 answer (guarded by its key alone)",
                answer.line()
            ),
            fix,
        );
    }
    ok(format!(
        "{label:<10} blocked through {url}: {status} {}",
        answer.line()
    ))
}

/// The fixes for an upgrade the server answered with `status`.
fn upgrade_fixes(status: u16) -> &'static [&'static str] {
    match status {
        403 => &[
            "herald refuses this Origin: add it to --allowed-origins (or pass --origin \
             with one that is allowed); a 403 from the proxy means its rules refuse the path",
        ],
        401 => &["herald wants a token (--require-token): add ?token=... to the URL"],
        503 => &[
            "no herald behind the proxy is up (HAProxy: no server UP in backend herald), \
             or herald is draining or at --max-connections",
        ],
        _ => &[
            "the proxy does not pass this WebSocket to herald: route the path with \
             `Upgrade: websocket` to it (haproxy.cfg: `use_backend herald if websocket \
             herald_path`)",
        ],
    }
}

/// A random probe topic, so concurrent checks and real topics never meet.
fn probe_topic() -> String {
    let r = RandomState::new().hash_one(std::process::id());
    format!("{PROBE_PREFIX}{r:016x}")
}

/// One of herald's API requests, asked through the public origin: label, path and
/// query, method, headers, body.
type ApiRequest<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a [(&'a str, &'a str)],
    &'a [u8],
);

/// The tally of the checks; each is printed as it is judged.
struct Report {
    passed: usize,
    failed: usize,
}

impl Report {
    fn add(&mut self, f: Finding) {
        match f.verdict {
            Verdict::Ok => self.passed += 1,
            Verdict::Fail => self.failed += 1,
            Verdict::Note => {}
        }
        println!("  {f}");
    }
}

struct Probe<'a> {
    args: &'a LiveArgs,
    public: Target,
    internal: Target,
    tls: Option<Arc<ClientConfig>>,
    timeout: Duration,
    interval: Duration,
    topic: String,
}

pub fn run(args: &LiveArgs, default_ping_interval: Duration) -> Result<i32, String> {
    let url = args.live.as_deref().ok_or("--live needs a URL")?;
    let publish = args
        .publish
        .as_deref()
        .ok_or("--live needs --publish URL")?;
    let public = Target::parse(url, Kind::WebSocket)?;
    let internal = Target::parse(publish, Kind::Http)?;
    let tls = if public.tls || internal.tls {
        Some(client::tls_config(args.ca_file.as_deref())?)
    } else {
        None
    };
    if args.timeout == 0 {
        return Err("--timeout must be at least 1 second".into());
    }
    let probe = Probe {
        args,
        public,
        internal,
        tls,
        timeout: Duration::from_secs(args.timeout),
        interval: args
            .ping_interval
            .map_or(default_ping_interval, Duration::from_secs),
        topic: probe_topic(),
    };
    if probe.interval.is_zero() {
        return Err("--ping-interval must be at least 1 second".into());
    }
    println!(
        "herald check --live {url}: publishing through {publish}, expecting a ping within \
         {}s",
        probe.interval.as_secs()
    );
    let mut report = Report {
        passed: 0,
        failed: 0,
    };
    if let Some(mut ws) = probe.websocket(&mut report) {
        // Say goodbye properly; a failure here changes no verdict.
        let _ = ws.close(None);
        let _ = ws.flush();
    }
    probe.public_paths(&mut report);
    let all = report.passed + report.failed;
    if report.failed == 0 {
        println!("\nall {all} checks passed");
        Ok(0)
    } else {
        println!("\n{} of {all} checks failed: see FAIL above", report.failed);
        Ok(1)
    }
}

impl Probe<'_> {
    /// The chain through the public WebSocket; stops at the first failed step. Returns
    /// the connection when it is still open.
    fn websocket(&self, report: &mut Report) -> Option<WebSocket<Stream>> {
        let t = self.timeout;
        let public = &self.public;
        let start = Instant::now();
        let addrs = match client::resolve(public) {
            Ok(a) => a,
            Err(e) => {
                report.add(fail(
                    format!("dns        {e}"),
                    &["check the name (`getent hosts NAME`) and the resolver"],
                ));
                return None;
            }
        };
        let names: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        report.add(ok(format!(
            "dns        {:>9}  {} → {}",
            took(start.elapsed()),
            public.host,
            names.join(", ")
        )));

        let start = Instant::now();
        let tcp = match client::tcp(&addrs, t) {
            Ok(s) => s,
            Err(e) => {
                report.add(fail(
                    format!("tcp        {e}"),
                    &[
                        "nothing accepts there: is the proxy listening on that port, and \
                       does the firewall let it through?",
                    ],
                ));
                return None;
            }
        };
        let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        report.add(ok(format!(
            "tcp        {:>9}  connected to {peer}",
            took(start.elapsed())
        )));

        let stream = match (&self.tls, public.tls) {
            (Some(config), true) => {
                let start = Instant::now();
                match client::tls(tcp, public, config, t) {
                    Ok((s, agreed)) => {
                        report.add(ok(format!(
                            "tls        {:>9}  {agreed}, certificate valid for {}",
                            took(start.elapsed()),
                            public.host
                        )));
                        s
                    }
                    Err(e) => {
                        report.add(fail(
                            format!("tls        {e}"),
                            &["the certificate must name this host, be current and chain \
                               to a trusted CA (a private CA or self-signed: pass --ca-file)"],
                        ));
                        return None;
                    }
                }
            }
            _ => {
                println!("  --    tls        none (ws://)");
                Stream::Plain(tcp)
            }
        };

        let origin = self.args.origin.clone().unwrap_or_else(|| public.origin());
        let start = Instant::now();
        let mut ws = match client::upgrade(stream, public, &origin) {
            Ok(ws) => ws,
            Err(UpgradeError::Refused { status, body }) => {
                report.add(fail(
                    format!("upgrade    answered {status} {body:?}, not 101"),
                    upgrade_fixes(status),
                ));
                return None;
            }
            Err(UpgradeError::Other(e)) => {
                report.add(fail(
                    format!("upgrade    {e}"),
                    &[
                        "the proxy must pass `Connection: Upgrade` and `Upgrade: websocket` \
                       through, over HTTP/1.1",
                    ],
                ));
                return None;
            }
        };
        report.add(ok(format!(
            "upgrade    {:>9}  101, Origin {origin}",
            took(start.elapsed())
        )));

        // Subscribe, and from here time the silence the ping must end.
        let start = Instant::now();
        let op = serde_json::json!({"op": "subscribe", "topic": self.topic}).to_string();
        if let Err(e) = client::send_text(&mut ws, op) {
            report.add(fail(format!("subscribe  sending: {e}"), &[]));
            return None;
        }
        let last_sent = Instant::now();
        match self.await_json(&mut ws, start + t, |v| {
            v["op"] == "subscribed" && v["topic"] == self.topic.as_str() || v["op"] == "error"
        }) {
            Ok(v) if v["op"] == "subscribed" => {
                report.add(ok(format!(
                    "subscribe  {:>9}  {} (epoch {}, id {})",
                    took(start.elapsed()),
                    self.topic,
                    v["epoch"].as_str().unwrap_or("?"),
                    v["id"]
                )));
            }
            Ok(v) => {
                report.add(fail(
                    format!("subscribe  answered {v}"),
                    &[
                        "herald refused the probe topic: with --require-token or private \
                       topics matching herald-check.*, add ?token=... to the URL",
                    ],
                ));
                return None;
            }
            Err(e) => {
                report.add(fail(format!("subscribe  {e}"), &[]));
                return None;
            }
        }

        // Publish through the internal URL, and wait for it on the public connection.
        let nonce = format!("{:016x}", RandomState::new().hash_one(self.topic.as_str()));
        let body = serde_json::json!({
            "topic": self.topic,
            "data": {"probe": nonce, "by": "herald check --live"},
        })
        .to_string();
        let bearer = self.args.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(b) = &bearer {
            headers.push(("Authorization", b.as_str()));
        }
        let start = Instant::now();
        let answer = client::http_request(
            &self.internal,
            self.tls.as_ref(),
            "POST",
            &headers,
            body.as_bytes(),
            t,
        );
        let published = start.elapsed();
        match answer {
            Ok(a) if a.status == 200 => {
                let v: Value = serde_json::from_str(&a.body).unwrap_or(Value::Null);
                report.add(ok(format!(
                    "publish    {:>9}  {}: id {}, delivered {}",
                    took(published),
                    self.internal.http_url(),
                    v["id"],
                    v["delivered"]
                )));
            }
            Ok(a) => {
                let fix: &[&str] = match a.status {
                    401 => &["herald wants its API key: pass --api-key (or HERALD_API_KEY)"],
                    403 => &["herald takes keyless publishes from loopback only: pass \
                              --api-key, with herald run with one"],
                    _ => &["--publish must be herald's own /publish, on its internal address"],
                };
                report.add(fail(
                    format!(
                        "publish    {} answered {} {:?}",
                        self.internal.http_url(),
                        a.status,
                        a.line()
                    ),
                    fix,
                ));
                return None;
            }
            Err(e) => {
                report.add(fail(
                    format!("publish    {}: {e}", self.internal.http_url()),
                    &["--publish must reach herald's internal address from here"],
                ));
                return None;
            }
        }
        match self.await_json(&mut ws, start + t, |v| {
            v["op"] == "message" && v["topic"] == self.topic.as_str()
        }) {
            Ok(v) if v["data"]["probe"] == nonce.as_str() => {
                report.add(ok(format!(
                    "deliver    {:>9}  since the publish began (id {})",
                    took(start.elapsed()),
                    v["id"]
                )));
            }
            Ok(v) => {
                report.add(fail(
                    format!("deliver    another message came: {v}"),
                    &["someone else publishes to the probe topic"],
                ));
                return None;
            }
            Err(e) => {
                report.add(fail(
                    format!("deliver    {e}"),
                    &[
                        "herald took the publish but the public connection did not get it: \
                       with several herald processes, they must share topics (--redis); \
                       or --publish names another deployment than the public URL",
                    ],
                ));
                return None;
            }
        }

        // Stay silent and wait for the server's ping.
        let wait = self.await_ping(&mut ws, last_sent);
        let alive = matches!(wait, PingWait::Pinged { .. });
        report.add(judge_ping(&wait, self.interval));
        alive.then_some(ws)
    }

    /// The next JSON text that `wanted` accepts, before `deadline`.
    fn await_json(
        &self,
        ws: &mut WebSocket<Stream>,
        deadline: Instant,
        wanted: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        loop {
            match client::next_event(ws, deadline) {
                Event::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    if wanted(&v) {
                        return Ok(v);
                    }
                }
                Event::Ping | Event::Pong => continue,
                Event::Closed { code, reason } => {
                    return Err(format!("the server closed with {code} {reason:?}"));
                }
                Event::Lost(why) => return Err(format!("connection lost: {why}")),
                Event::Timeout => return Err(format!("no answer within {:?}", self.timeout)),
            }
        }
    }

    fn await_ping(&self, ws: &mut WebSocket<Stream>, last_sent: Instant) -> PingWait {
        let deadline = last_sent + ping_deadline(self.interval);
        println!(
            "        … waiting up to {} for the server's ping",
            took(deadline.saturating_duration_since(Instant::now()))
        );
        loop {
            let event = client::next_event(ws, deadline);
            let silent = last_sent.elapsed();
            return match event {
                Event::Ping => PingWait::Pinged { silent },
                Event::Text(_) | Event::Pong => continue,
                Event::Closed { code, reason } => PingWait::Closed {
                    silent,
                    code,
                    reason,
                },
                Event::Lost(why) => PingWait::Cut { silent, why },
                Event::Timeout => PingWait::Nothing { waited: silent },
            };
        }
    }

    /// herald's own API must not answer through the public origin.
    fn public_paths(&self, report: &mut Report) {
        let body = serde_json::json!({
            "topic": self.topic,
            "data": {"probe": "public", "by": "herald check --live"},
        })
        .to_string();
        let history = format!("/history?topic={}&since=0", self.topic);
        let json = [("Content-Type", "application/json")];
        let checks: [ApiRequest; 3] = [
            ("/publish", "/publish", "POST", &json, body.as_bytes()),
            ("/metrics", "/metrics", "GET", &[], b""),
            ("/history", history.as_str(), "GET", &[], b""),
        ];
        // herald's internal address, from the publish URL.
        for (label, path, method, headers, body) in checks {
            let target = self.public.with_path(path);
            let public = client::http_request(
                &target,
                self.tls.as_ref(),
                method,
                headers,
                body,
                self.timeout,
            );
            // Only worth asking herald when the public answer is not already damning.
            let own = match &public {
                Ok(a) if !(200..300).contains(&a.status) => client::http_request(
                    &self.internal.with_path(path),
                    self.tls.as_ref(),
                    method,
                    headers,
                    body,
                    self.timeout,
                )
                .ok(),
                _ => None,
            };
            report.add(judge_public_path(
                label,
                &target.origin(),
                &public,
                own.as_ref(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> HttpAnswer {
        HttpAnswer {
            status,
            body: body.into(),
        }
    }

    #[test]
    fn a_ping_within_the_interval_passes_and_a_cut_names_the_tunnel_timeout() {
        let i = Duration::from_secs(25);
        let on_time = PingWait::Pinged {
            silent: Duration::from_millis(25_300),
        };
        assert_eq!(judge_ping(&on_time, i).verdict, Verdict::Ok);
        let late = PingWait::Pinged {
            silent: Duration::from_secs(40),
        };
        assert_eq!(judge_ping(&late, i).verdict, Verdict::Fail);
        let cut = judge_ping(
            &PingWait::Cut {
                silent: Duration::from_secs(10),
                why: "eof".into(),
            },
            i,
        );
        assert_eq!(cut.verdict, Verdict::Fail);
        assert!(cut.fix[0].contains("timeout tunnel"), "{cut}");
        let none = judge_ping(
            &PingWait::Nothing {
                waited: ping_deadline(i),
            },
            i,
        );
        assert_eq!(none.verdict, Verdict::Fail);
        assert!(none.fix[0].contains("--ping-interval 25s"), "{none}");
        assert_eq!(ping_deadline(i), Duration::from_millis(28_500));
    }

    #[test]
    fn herald_api_answers_through_the_public_origin_fail() {
        let url = "https://push.example.com";
        let judge = |public: Result<HttpAnswer, HttpError>, own: Option<HttpAnswer>| {
            judge_public_path("/publish", url, &public, own.as_ref()).verdict
        };
        // The proxy's refusal, whatever herald would have said.
        let haproxy = answer(403, "<html><body><h1>403 Forbidden</h1>");
        let herald_401 = answer(401, "missing or wrong API key");
        assert_eq!(
            judge(Ok(haproxy.clone()), Some(herald_401.clone())),
            Verdict::Ok
        );
        assert_eq!(
            judge(Err(HttpError::Answer("reset".into())), None),
            Verdict::Ok
        );
        // No connection at all proves nothing either way.
        assert_eq!(
            judge(Err(HttpError::Connect("refused".into())), None),
            Verdict::Note
        );
        // Success is reachable, and so is herald's own refusal passed through.
        assert_eq!(judge(Ok(answer(200, "{\"id\":1}")), None), Verdict::Fail);
        assert_eq!(
            judge(Ok(herald_401.clone()), Some(herald_401)),
            Verdict::Fail
        );
        // herald's own 404 (not served on that port) is not reachable.
        let not_here = answer(404, "no such endpoint");
        assert_eq!(judge(Ok(not_here.clone()), Some(not_here)), Verdict::Ok);
    }

    #[test]
    fn probe_topics_are_valid_and_differ() {
        let (a, b) = (probe_topic(), probe_topic());
        assert!(crate::topic::check_name(&a).is_ok(), "{a}");
        assert_ne!(a, b);
    }
}
