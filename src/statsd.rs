//! StatsD and DogStatsD export (`--statsd HOST:PORT`): every `--statsd-interval`, the
//! loop renders the same Prometheus exposition `/metrics` serves and hands it here; this
//! module turns it into StatsD lines (counters as their increase since the last report,
//! `|c`; gauges as their value, `|g`) packed into datagrams, and the loop sends each one
//! once on a nonblocking UDP socket. Nothing here does I/O or reads the clock.
//!
//! Reading the exposition rather than the counters themselves keeps one source of truth:
//! every series `/metrics` has, StatsD has, under the same name, with no second list to
//! keep in step. Names: `herald_messages_published_total` becomes
//! `<prefix>messages_published_total` (the `herald_` namespace gives way to the prefix,
//! `herald.` by default); other names (`process_cpu_seconds_total`) keep theirs after the
//! prefix. A labelled series (`herald_http_responses_total{status="200"}`) goes with its
//! labels as DogStatsD tags (`|#status:200`) when `--statsd-tags` is given, and with them
//! as name segments in plain StatsD (`herald.http_responses_total.status.200`), which has
//! no tags.
//!
//! Why not the `cadence` crate: its sinks own the socket and write as each metric is
//! emitted (`UdpMetricSink`: one `send` per line; `BufferedUdpMetricSink`: the tail of a
//! report waits in its buffer until the next report or a flush), so the I/O would happen
//! inside a library call rather than in the loop's own step, and this module could not be
//! tested without a socket. What it would save is the line format, `name:value|type|#tags`,
//! a few lines below; the deltas, the renaming and the packing are ours either way.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Largest datagram we send: a 1500-byte Ethernet MTU less IPv6 and UDP headers (and
/// some room for tunnels), so a report is never fragmented on a real network. DogStatsD
/// agents accept far larger ones; plain StatsD servers read one datagram at a time, lines
/// separated by `\n`.
pub const MAX_DATAGRAM: usize = 1432;
/// The longest `--statsd-prefix`, and the longest `--statsd-tags`: a line must fit in a
/// datagram with room to spare.
pub const MAX_PREFIX: usize = 100;
pub const MAX_TAGS: usize = 512;

/// `--statsd*`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub target: SocketAddr,
    pub interval: Duration,
    pub prefix: String,
    /// `Some`: DogStatsD, these tags on every line and labels as tags. `None`: plain StatsD.
    pub tags: Option<Vec<String>>,
}

impl Settings {
    /// Check the prefix and tags (the address is resolved by the caller).
    pub fn new(
        target: SocketAddr,
        interval_secs: u64,
        prefix: &str,
        tags: Option<&str>,
    ) -> Result<Settings, String> {
        if interval_secs == 0 {
            return Err("--statsd-interval must be at least 1 second".into());
        }
        if prefix.len() > MAX_PREFIX
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(format!(
                "--statsd-prefix {prefix:?}: at most {MAX_PREFIX} of A-Z a-z 0-9 _ . -"
            ));
        }
        let tags = match tags {
            None => None,
            Some(list) if list.len() > MAX_TAGS => {
                return Err(format!("--statsd-tags: at most {MAX_TAGS} bytes"));
            }
            Some(list) => Some(
                list.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(|t| {
                        // `|` ends the line's fields, `#` and `@` start others, `,`
                        // separates tags: none may appear inside one.
                        if t.chars().any(|c| {
                            c.is_whitespace() || c.is_control() || matches!(c, '|' | '#' | '@')
                        }) || t.starts_with(':')
                        {
                            Err(format!("--statsd-tags: {t:?} is not a tag (key:value)"))
                        } else {
                            Ok(t.to_string())
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(Settings {
            target,
            interval: Duration::from_secs(interval_secs),
            prefix: prefix.to_string(),
            tags,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// One series of the exposition.
#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    kind: Kind,
    labels: Vec<(&'a str, String)>,
    /// The series as `/metrics` spells it, the key its last value is kept under.
    series: &'a str,
    value: f64,
}

/// The series of a Prometheus text exposition (as `metrics::render` writes it: `# TYPE`
/// before each family, `name{k="v",...} value` lines). Lines it cannot read are skipped:
/// a series missing from one report is better than no report. Families other than
/// counters are sent as gauges.
fn samples(text: &str) -> Vec<Sample<'_>> {
    let mut kinds: HashMap<&str, Kind> = HashMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                let kind = if kind.trim() == "counter" {
                    Kind::Counter
                } else {
                    Kind::Gauge
                };
                kinds.insert(name, kind);
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if !value.is_finite() {
            continue;
        }
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => match rest.strip_suffix('}').and_then(parse_labels) {
                Some(labels) => (name, labels),
                None => continue,
            },
            None => (series, Vec::new()),
        };
        out.push(Sample {
            name,
            kind: kinds.get(name).copied().unwrap_or(Kind::Gauge),
            labels,
            series,
            value,
        });
    }
    out
}

/// `k="v",k2="v2"` (the braces' inside), with `\"`, `\\` and `\n` unescaped.
fn parse_labels(text: &str) -> Option<Vec<(&str, String)>> {
    let mut labels = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(labels)
}

/// What may appear in a StatsD name segment or tag: a name is dotted segments and a line
/// is `name:value|type|#tags`, so `:` `|` `#` `,` `@` and whitespace may not; anything
/// else unusual becomes `_` too. In plain names `.` would add a level, so it goes as well.
fn clean(text: &str, keep_dot: bool) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '/') || (keep_dot && c == '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A value as StatsD reads it: integers without a point, others to a millionth (a CPU
/// time's delta is a float's subtraction; its last digits are noise).
fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{}", (value * 1e6).round() / 1e6)
    }
}

/// Keeps what the last report sent, so the next sends each counter's increase.
#[derive(Debug)]
pub struct Reporter {
    settings: Settings,
    /// Each counter series' value at the last report (a series first seen counts from 0:
    /// every counter starts at 0 with the process, so the deltas add up to `/metrics`).
    last: HashMap<String, f64>,
    next: Instant,
}

impl Reporter {
    pub fn new(settings: Settings, now: Instant) -> Reporter {
        let next = now + settings.interval;
        Reporter {
            settings,
            last: HashMap::new(),
            next,
        }
    }

    /// What the last report sent, for a live upgrade, and taking it back.
    pub fn last(&self) -> Vec<(String, f64)> {
        self.last.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    pub fn carry_last(&mut self, last: Vec<(String, f64)>) {
        self.last = last.into_iter().collect();
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// When the next report is due.
    pub fn next_deadline(&self) -> Instant {
        self.next
    }

    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// One report from the exposition `/metrics` would serve now: the datagrams to send,
    /// each at most `MAX_DATAGRAM` bytes (a line longer than that, which the limits on the
    /// prefix and tags prevent, would go alone). The next report is due an interval after
    /// `now`: after a stall the loop sends one report, not one per interval missed.
    pub fn report(&mut self, exposition: &str, now: Instant) -> Vec<Vec<u8>> {
        self.next = now + self.settings.interval;
        let mut lines = Vec::new();
        for sample in samples(exposition) {
            let value = match sample.kind {
                Kind::Gauge => sample.value,
                Kind::Counter => {
                    let last = self.last.insert(sample.series.to_string(), sample.value);
                    match last {
                        // A counter that went down was reset (none of ours is): all of
                        // its value is new.
                        Some(last) if sample.value >= last => sample.value - last,
                        _ => sample.value,
                    }
                }
            };
            lines.push(self.line(&sample, value));
        }
        pack(&lines)
    }

    fn line(&self, sample: &Sample, value: f64) -> String {
        let bare = sample.name.strip_prefix("herald_").unwrap_or(sample.name);
        let mut line = format!("{}{}", self.settings.prefix, clean(bare, false));
        if self.settings.tags.is_none() {
            for (key, value) in &sample.labels {
                let _ = write!(line, ".{}.{}", clean(key, false), clean(value, false));
            }
        }
        let kind = match sample.kind {
            Kind::Counter => "c",
            Kind::Gauge => "g",
        };
        let _ = write!(line, ":{}|{kind}", number(value));
        if let Some(constant) = &self.settings.tags {
            let tags: Vec<String> = sample
                .labels
                .iter()
                .map(|(k, v)| format!("{}:{}", clean(k, false), clean(v, true)))
                .chain(constant.iter().cloned())
                .collect();
            if !tags.is_empty() {
                let _ = write!(line, "|#{}", tags.join(","));
            }
        }
        line
    }
}

/// Lines joined by `\n` into as few datagrams as fit under `MAX_DATAGRAM`.
fn pack(lines: &[String]) -> Vec<Vec<u8>> {
    let mut datagrams: Vec<Vec<u8>> = Vec::new();
    let mut current: Vec<u8> = Vec::with_capacity(MAX_DATAGRAM);
    for line in lines {
        let needed = line.len() + usize::from(!current.is_empty());
        if !current.is_empty() && current.len() + needed > MAX_DATAGRAM {
            datagrams.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(b'\n');
        }
        current.extend_from_slice(line.as_bytes());
    }
    if !current.is_empty() {
        datagrams.push(current);
    }
    datagrams
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Counters, Gauges, render};

    fn settings(tags: Option<&str>) -> Settings {
        Settings::new("127.0.0.1:8125".parse().unwrap(), 10, "herald.", tags).unwrap()
    }

    fn lines(datagrams: &[Vec<u8>]) -> Vec<String> {
        datagrams
            .iter()
            .flat_map(|d| {
                String::from_utf8(d.clone())
                    .unwrap()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    const TEXT: &str = "# HELP herald_connections Open.\n# TYPE herald_connections gauge\n\
        herald_connections 3\n# TYPE herald_messages_published_total counter\n\
        herald_messages_published_total 5\n# TYPE herald_http_responses_total counter\n\
        herald_http_responses_total{status=\"200\"} 7\n\
        herald_http_responses_total{status=\"404\"} 1\n\
        # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 0.1\n";

    #[test]
    fn plain_statsd_sends_counters_as_deltas_and_labels_as_name_segments() {
        let t0 = Instant::now();
        let mut r = Reporter::new(settings(None), t0);
        assert_eq!(
            lines(&r.report(TEXT, t0)),
            [
                "herald.connections:3|g",
                "herald.messages_published_total:5|c",
                "herald.http_responses_total.status.200:7|c",
                "herald.http_responses_total.status.404:1|c",
                "herald.process_cpu_seconds_total:0.1|c",
            ]
        );
        let later = TEXT
            .replace("published_total 5", "published_total 9")
            .replace("} 7", "} 10")
            .replace("connections 3", "connections 2")
            .replace("seconds_total 0.1", "seconds_total 0.13");
        assert_eq!(
            lines(&r.report(&later, t0 + Duration::from_secs(10))),
            [
                "herald.connections:2|g",
                "herald.messages_published_total:4|c",
                "herald.http_responses_total.status.200:3|c",
                "herald.http_responses_total.status.404:0|c",
                "herald.process_cpu_seconds_total:0.03|c",
            ]
        );
    }

    #[test]
    fn dogstatsd_sends_labels_and_the_constant_tags_as_tags() {
        let t0 = Instant::now();
        let mut r = Reporter::new(settings(Some("env:prod, region:eu-1")), t0);
        let got = lines(&r.report(TEXT, t0));
        assert_eq!(got[0], "herald.connections:3|g|#env:prod,region:eu-1");
        assert_eq!(
            got[2],
            "herald.http_responses_total:7|c|#status:200,env:prod,region:eu-1"
        );
        // An empty list is DogStatsD with no constant tags: labels still go as tags.
        let mut r = Reporter::new(settings(Some("")), t0);
        let got = lines(&r.report(TEXT, t0));
        assert_eq!(got[0], "herald.connections:3|g");
        assert_eq!(got[2], "herald.http_responses_total:7|c|#status:200");
    }

    #[test]
    fn a_report_is_packed_into_datagrams_under_the_limit_that_lose_no_line() {
        let mut c = Counters::default();
        for status in 100..400 {
            c.responses.insert(status, u64::from(status));
        }
        let text = render(&c, &Gauges::default());
        let t0 = Instant::now();
        let mut r = Reporter::new(settings(Some("service:herald")), t0);
        let datagrams = r.report(&text, t0);
        assert!(datagrams.len() > 10, "{}", datagrams.len());
        for d in &datagrams {
            assert!(d.len() <= MAX_DATAGRAM, "{}", d.len());
            assert!(!d.ends_with(b"\n") && !d.starts_with(b"\n"));
        }
        let sent = lines(&datagrams);
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count();
        assert_eq!(sent.len(), series);
        assert!(
            sent.contains(&"herald.http_responses_total:399|c|#status:399,service:herald".into())
        );
    }

    #[test]
    fn every_series_of_the_real_exposition_is_sent_with_its_type() {
        // A series in every family: a labelled family with no label value has none.
        let mut c = Counters::default();
        c.responses.insert(200, 1);
        c.ws_closed.insert(1000, 1);
        let text = render(&c, &Gauges::default());
        let t0 = Instant::now();
        let mut r = Reporter::new(settings(None), t0);
        let sent = lines(&r.report(&text, t0));
        for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (name, kind) = family.split_once(' ').unwrap();
            let kind = if kind == "counter" { "c" } else { "g" };
            let statsd = format!("herald.{}", name.strip_prefix("herald_").unwrap_or(name));
            assert!(
                sent.iter()
                    .any(|l| l.starts_with(&statsd) && l.ends_with(&format!("|{kind}"))),
                "{name} ({kind}) not sent: {sent:?}"
            );
        }
    }

    #[test]
    fn label_values_cannot_break_the_line_format() {
        let text =
            "# TYPE herald_x_total counter\nherald_x_total{reason=\"a:b|c#d,e f.g\\\"h\"} 2\n";
        let t0 = Instant::now();
        let plain = lines(&Reporter::new(settings(None), t0).report(text, t0));
        assert_eq!(plain, ["herald.x_total.reason.a_b_c_d_e_f_g_h:2|c"]);
        let dog = lines(&Reporter::new(settings(Some("")), t0).report(text, t0));
        assert_eq!(dog, ["herald.x_total:2|c|#reason:a_b_c_d_e_f.g_h"]);
    }

    #[test]
    fn a_counter_that_goes_down_counts_from_zero_again() {
        let t0 = Instant::now();
        let mut r = Reporter::new(settings(None), t0);
        let text = |v: u32| format!("# TYPE herald_n_total counter\nherald_n_total {v}\n");
        assert_eq!(lines(&r.report(&text(10), t0)), ["herald.n_total:10|c"]);
        assert_eq!(lines(&r.report(&text(4), t0)), ["herald.n_total:4|c"]);
    }

    #[test]
    fn the_next_report_is_an_interval_after_the_last() {
        let t0 = Instant::now();
        let mut r = Reporter::new(settings(None), t0);
        assert!(!r.due(t0));
        assert_eq!(r.next_deadline(), t0 + Duration::from_secs(10));
        let late = t0 + Duration::from_secs(35);
        assert!(r.due(late));
        r.report("", late);
        assert_eq!(r.next_deadline(), late + Duration::from_secs(10));
        assert!(r.report("", late).is_empty());
    }

    #[test]
    fn bad_settings_are_refused_with_the_flag_named() {
        let at = "127.0.0.1:8125".parse().unwrap();
        for (interval, prefix, tags, flag) in [
            (0, "herald.", None, "--statsd-interval"),
            (10, "her ald", None, "--statsd-prefix"),
            (10, "a:b", None, "--statsd-prefix"),
            (10, "herald.", Some("env:prod|x"), "--statsd-tags"),
            (10, "herald.", Some("env #1"), "--statsd-tags"),
            (10, "herald.", Some(":nokey"), "--statsd-tags"),
        ] {
            let err = Settings::new(at, interval, prefix, tags).unwrap_err();
            assert!(err.contains(flag), "{err}");
        }
        let ok = Settings::new(at, 1, "", Some("env:prod,,canary")).unwrap();
        assert_eq!(ok.tags.unwrap(), ["env:prod", "canary"]);
        assert_eq!(ok.prefix, "");
    }
}
