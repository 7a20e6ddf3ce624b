//! Output: a live progress line on stderr (terminals only), then a readable table, or one
//! JSON object with `--json`.

use std::io::Write;

use serde_json::{Map, Value, json};

use crate::stats::{Buckets, histogram};

fn is_tty() -> bool {
    // SAFETY: isatty has no preconditions.
    unsafe { libc::isatty(2) == 1 }
}

pub fn progress_line(text: &str) {
    if is_tty() {
        eprint!("\r\x1b[2K{text}");
        let _ = std::io::stderr().flush();
    }
}

pub fn progress_done() {
    if is_tty() {
        eprintln!();
    }
}

/// p50, p99, p99.9 and max of a latency histogram, in milliseconds.
pub fn percentiles(b: &Buckets) -> Value {
    let mut h = histogram();
    b.add_to(&mut h);
    if h.is_empty() {
        return json!(null);
    }
    let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

pub struct Report {
    pub scenario: &'static str,
    /// broadcast: the longest delivery gap (ns) and the connections that ended, for
    /// `upgrade` to report.
    pub upgrade_figures: Option<(u64, u64)>,
    rows: Vec<(String, String)>,
    json: Map<String, Value>,
}

impl Report {
    pub fn new(scenario: &'static str) -> Report {
        let mut json = Map::new();
        json.insert("scenario".into(), json!(scenario));
        Report {
            scenario,
            upgrade_figures: None,
            rows: Vec::new(),
            json,
        }
    }

    pub fn json_scenario(&mut self, scenario: &'static str) {
        self.json.insert("scenario".into(), json!(scenario));
    }

    /// A row for the table and a field of the JSON object.
    pub fn add(&mut self, key: &str, human: impl Into<String>, value: Value) {
        self.rows.push((key.to_string(), human.into()));
        self.json.insert(key.to_string(), value);
    }

    pub fn add_latency(&mut self, key: &str, b: &Buckets) {
        let v = percentiles(b);
        let human = if v.is_null() {
            "none recorded".to_string()
        } else {
            format!(
                "p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms",
                v["p50_ms"], v["p99_ms"], v["p999_ms"], v["max_ms"]
            )
        };
        self.add(key, human, v);
    }

    /// The JSON object, to a file.
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        std::fs::write(path, format!("{}\n", Value::Object(self.json.clone())))
    }

    pub fn print(self, as_json: bool) {
        if as_json {
            println!("{}", Value::Object(self.json));
            return;
        }
        println!("herald-bench {}", self.scenario);
        let width = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in self.rows {
            // A value of several lines (a histogram) keeps to its column.
            let mut lines = v.lines();
            println!("  {k:width$}  {}", lines.next().unwrap_or(""));
            for line in lines {
                println!("  {:width$}  {line}", "");
            }
        }
    }
}
