//! Limits per client address, and who may say what a client's address is.
//!
//! Behind HAProxy every peer is the proxy. A peer inside `--trusted-proxies` may name the
//! client: in a PROXY protocol v2 header (`http::proxy`) before its first HTTP byte, or in
//! `X-Forwarded-For` on an upgrade request; anyone else is its own client, and what it
//! claims is ignored (XFF) or refused (a PROXY header). This module holds the rules
//! (`Trusted`, the CIDR list, and `forwarded_client`, the XFF walk) and the per-address
//! table the connection table keeps: open connections per address
//! (`--max-connections-per-ip`) and a token bucket of connects (`--connect-rate-per-ip`,
//! `--connect-burst-per-ip`). The op budget of one WebSocket (`--client-op-rate`) is a
//! token bucket too (`OpBudget`).
//!
//! Memory is bounded: an address with open connections has an entry (at most one per
//! connection); an address with none keeps its entry only until its bucket has refilled
//! (a full bucket is the same as no entry), and idle entries are swept when their number
//! doubles, and capped at `MAX_IDLE_ADDRESSES` (past it the oldest-looking go first:
//! forgetting one only hands that address a fresh bucket). IPv6 clients are counted by
//! their /64, the block one subscriber gets: per address, a /64 would be 2^64 clients.
//! Pure: `now` is passed in.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::time::Instant;

/// Addresses with no open connection whose bucket we still remember, at most. Each entry
/// is about 48 bytes of table, so the cap is a few MiB however many addresses connect.
pub const MAX_IDLE_ADDRESSES: usize = 65_536;
/// Idle entries are swept (full buckets forgotten) when they reach this, or twice what
/// the last sweep left, whichever is more: amortised O(1) per connect.
const SWEEP_FLOOR: usize = 1024;
/// How far below empty a WebSocket's op budget may fall before it is closed with 1008:
/// every op spends a token, refused ones too, so a client is closed once it has sent this
/// many ops more than its budget allowed without slowing down ("persists").
pub const OP_OVERDRAFT: f32 = 10.0;

/// A network: an address and a prefix length (`10.0.0.0/8`, `::1/128`, or a bare address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR network"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0-{max}"))?,
        };
        Ok(Cidr {
            net: net.to_canonical(),
            prefix,
        })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), self.prefix, 32)
                    == masked(u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(net.into(), self.prefix, 128) == masked(ip.into(), self.prefix, 128)
            }
            _ => false,
        }
    }
}

/// The top `prefix` bits of a `width`-bit address.
fn masked(bits: u128, prefix: u8, width: u32) -> u128 {
    let drop = width - u32::from(prefix);
    if drop >= 128 { 0 } else { bits >> drop }
}

/// `--trusted-proxies`: the peers that may name the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trusted(Vec<Cidr>);

impl Trusted {
    /// A comma-separated list; `none` (or empty) trusts nobody.
    pub fn parse(list: &str) -> Result<Trusted, String> {
        if list.trim().eq_ignore_ascii_case("none") {
            return Ok(Trusted::default());
        }
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Cidr::from_str)
            .collect::<Result<Vec<_>, _>>()
            .map(Trusted)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}

/// The client a trusted peer's `X-Forwarded-For` names: each proxy appends the address it
/// got the request from, so the list is read from the right, past every trusted proxy,
/// to the first address that is not one. `None` when every address is a trusted proxy's
/// (or an entry is not an address): then the connection is the proxy's own.
pub fn forwarded_client(header: &str, trusted: &Trusted) -> Option<IpAddr> {
    for entry in header.rsplit(',') {
        let ip = parse_forwarded_entry(entry.trim())?.to_canonical();
        if !trusted.contains(ip) {
            return Some(ip);
        }
    }
    None
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`.
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    entry.split_once(':')?.0.parse().ok()
}

/// A rate in events per second, from `20/s`, `20` or `600/m`; 0 turns the limit off.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let (number, per) = match text.trim().split_once('/') {
        Some((n, "s")) => (n, 1.0),
        Some((n, "m")) => (n, 60.0),
        Some(_) => return Err(format!("{text:?}: write N/s or N/m")),
        None => (text.trim(), 1.0),
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a rate (N/s)"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{text:?}: a rate must be 0 or more"));
    }
    Ok(n / per)
}

/// A token bucket's settings: `burst` tokens at most, `per_sec` back every second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: f64,
}

impl Rate {
    pub fn is_off(&self) -> bool {
        self.per_sec <= 0.0
    }
}

/// A token bucket's state: its level when it was last touched, and when.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    level: f32,
    at: Instant,
}

impl Bucket {
    pub fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            level: rate.burst as f32,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (f64::from(self.level) + secs * rate.per_sec).min(rate.burst) as f32;
        self.at = now;
    }

    /// Take one token if there is one.
    pub fn take(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        if self.level >= 1.0 {
            self.level -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, now);
        f64::from(b.level) >= rate.burst
    }
}

/// What one WebSocket op gets (`OpBudget::spend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpVerdict {
    Serve,
    /// Answer `rate_limited`, do not execute it.
    Refuse,
    /// It persists: close with 1008.
    Close,
}

/// One WebSocket's budget of client ops (`--client-op-rate`, `--client-op-burst`): a
/// token bucket in 8 bytes, since every WebSocket's session holds one. Time is in
/// milliseconds since the session handler's origin, wrapping after 49.7 days: the gap
/// between two ops of one connection is measured modulo that, so only a connection
/// silent for 49.7 days could see its refill undercounted, by what it lacked then.
#[derive(Debug, Clone, Copy)]
pub struct OpBudget {
    level: f32,
    at_ms: u32,
}

impl OpBudget {
    pub fn new(rate: Rate, now_ms: u32) -> OpBudget {
        OpBudget {
            level: rate.burst as f32,
            at_ms: now_ms,
        }
    }

    /// Its level, for a live upgrade; the refill restarts from `now_ms` in the new process.
    pub fn level(&self) -> f32 {
        self.level
    }

    pub fn with_level(level: f32, now_ms: u32) -> OpBudget {
        OpBudget {
            level: if level.is_finite() { level } else { 0.0 },
            at_ms: now_ms,
        }
    }

    /// Every op spends a token, served or refused, so only sending slower than the rate
    /// earns service back; a client `OP_OVERDRAFT` ops past empty is closed.
    pub fn spend(&mut self, rate: Rate, now_ms: u32) -> OpVerdict {
        if rate.is_off() {
            return OpVerdict::Serve;
        }
        let secs = f64::from(now_ms.wrapping_sub(self.at_ms)) / 1000.0;
        self.at_ms = now_ms;
        let refilled = (f64::from(self.level) + secs * rate.per_sec).min(rate.burst);
        self.level = (refilled as f32 - 1.0).max(-OP_OVERDRAFT);
        match self.level {
            level if level >= 0.0 => OpVerdict::Serve,
            level if level > -OP_OVERDRAFT => OpVerdict::Refuse,
            _ => OpVerdict::Close,
        }
    }
}

/// A per-address limit that refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--max-connections-per-ip`.
    ConnectionsPerIp,
    /// `--connect-rate-per-ip` / `--connect-burst-per-ip`.
    ConnectRate,
}

impl Limit {
    pub fn refused(self) -> Refused {
        match self {
            Limit::ConnectionsPerIp => Refused::ConnectionsPerIp,
            Limit::ConnectRate => Refused::ConnectRate,
        }
    }
}

/// Why something was refused, for `herald_refusals_total{reason}` (never by address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    ConnectionsPerIp,
    ConnectRate,
    /// An op answered `rate_limited`.
    OpRate,
    /// A WebSocket closed with 1008 for persisting past its op rate.
    OpRateClosed,
    /// A subscribe answered `unavailable` at `--max-subscriptions`.
    Subscriptions,
    /// A PROXY header from a peer outside `--trusted-proxies`.
    ProxyUntrusted,
    /// `--require-proxy-protocol` and a trusted peer sent none.
    ProxyMissing,
    /// A trusted peer's PROXY header that does not parse.
    ProxyMalformed,
}

const REFUSED: usize = 8;

impl Refused {
    pub const ALL: [Refused; REFUSED] = [
        Refused::ConnectionsPerIp,
        Refused::ConnectRate,
        Refused::OpRate,
        Refused::OpRateClosed,
        Refused::Subscriptions,
        Refused::ProxyUntrusted,
        Refused::ProxyMissing,
        Refused::ProxyMalformed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refused::ConnectionsPerIp => "max_connections_per_ip",
            Refused::ConnectRate => "connect_rate_per_ip",
            Refused::OpRate => "client_op_rate",
            Refused::OpRateClosed => "client_op_rate_closed",
            Refused::Subscriptions => "max_subscriptions",
            Refused::ProxyUntrusted => "proxy_header_untrusted",
            Refused::ProxyMissing => "proxy_header_missing",
            Refused::ProxyMalformed => "proxy_header_malformed",
        }
    }

    fn index(self) -> usize {
        match self {
            Refused::ConnectionsPerIp => 0,
            Refused::ConnectRate => 1,
            Refused::OpRate => 2,
            Refused::OpRateClosed => 3,
            Refused::Subscriptions => 4,
            Refused::ProxyUntrusted => 5,
            Refused::ProxyMissing => 6,
            Refused::ProxyMalformed => 7,
        }
    }
}

/// Refusals counted by reason.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Refusals([u64; REFUSED]);

impl Refusals {
    pub fn bump(&mut self, why: Refused) {
        self.0[why.index()] += 1;
    }

    pub fn get(&self, why: Refused) -> u64 {
        self.0[why.index()]
    }
}

/// The settings of the per-address rules, from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub trusted: Trusted,
    /// `--require-proxy-protocol`: a trusted peer must begin with a PROXY v2 header.
    pub require_proxy: bool,
    /// 0: no limit.
    pub max_per_ip: u32,
    pub connect: Rate,
    pub ops: Rate,
}

impl Default for Settings {
    /// Nothing trusted, nothing limited (tests that build a table by hand).
    fn default() -> Settings {
        let off = Rate {
            per_sec: 0.0,
            burst: 0.0,
        };
        Settings {
            trusted: Trusted::default(),
            require_proxy: false,
            max_per_ip: 0,
            connect: off,
            ops: off,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    conns: u32,
    bucket: Bucket,
}

/// Open connections and connect buckets per client address.
#[derive(Debug, Default)]
pub struct Addresses {
    pub settings: Settings,
    table: HashMap<IpAddr, Entry>,
    /// Entries with no open connection.
    idle: usize,
    /// Sweep when `idle` reaches this.
    sweep_at: usize,
}

/// The table's key: the address itself, an IPv6 one by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

impl Addresses {
    pub fn new(settings: Settings) -> Addresses {
        Addresses {
            settings,
            table: HashMap::new(),
            idle: 0,
            sweep_at: SWEEP_FLOOR,
        }
    }

    fn enabled(&self) -> bool {
        self.settings.max_per_ip > 0 || !self.settings.connect.is_off()
    }

    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.settings.trusted.contains(ip)
    }

    /// Entries held (a gauge).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// May `ip` open one more connection now? Takes a connect token when it may; the
    /// caller then `count`s the connection.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Result<(), Limit> {
        if !self.enabled() {
            return Ok(());
        }
        let k = key(ip);
        if !self.table.contains_key(&k) {
            self.make_room(now);
            self.idle += 1;
        }
        let connect = self.settings.connect;
        let entry = self.table.entry(k).or_insert(Entry {
            conns: 0,
            bucket: Bucket::full(connect, now),
        });
        let max = self.settings.max_per_ip;
        if max > 0 && entry.conns >= max {
            return Err(Limit::ConnectionsPerIp);
        }
        if !connect.is_off() && !entry.bucket.take(connect, now) {
            return Err(Limit::ConnectRate);
        }
        Ok(())
    }

    /// One more open connection from `ip` (after `check`).
    pub fn count(&mut self, ip: IpAddr, now: Instant) {
        if !self.enabled() {
            return;
        }
        let connect = self.settings.connect;
        let entry = self.table.entry(key(ip)).or_insert_with(|| {
            self.idle += 1;
            Entry {
                conns: 0,
                bucket: Bucket::full(connect, now),
            }
        });
        if entry.conns == 0 {
            self.idle -= 1;
        }
        entry.conns += 1;
    }

    /// A connection from `ip` ended.
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(entry) = self.table.get_mut(&key(ip))
            && entry.conns > 0
        {
            entry.conns -= 1;
            if entry.conns == 0 {
                self.idle += 1;
            }
        }
    }

    /// Open connections counted for `ip`'s address.
    #[cfg(test)]
    pub fn connections(&self, ip: IpAddr) -> u32 {
        self.table.get(&key(ip)).map_or(0, |e| e.conns)
    }

    /// Before a new entry: forget idle entries whose bucket is full again once there are
    /// enough to be worth a pass, and keep the idle ones under the cap.
    fn make_room(&mut self, now: Instant) {
        if self.idle < self.sweep_at && self.idle < MAX_IDLE_ADDRESSES {
            return;
        }
        let connect = self.settings.connect;
        self.table
            .retain(|_, e| e.conns > 0 || !e.bucket.is_full(connect, now));
        self.idle = self.table.values().filter(|e| e.conns == 0).count();
        if self.idle >= MAX_IDLE_ADDRESSES {
            // A flood of distinct addresses: forget the fullest buckets (closest to
            // forgotten anyway) until a quarter of the cap is free.
            let mut idle: Vec<(f32, IpAddr)> = self
                .table
                .iter()
                .filter(|(_, e)| e.conns == 0)
                .map(|(k, e)| {
                    let mut b = e.bucket;
                    b.refill(connect, now);
                    (b.level, *k)
                })
                .collect();
            idle.sort_by(|a, b| b.0.total_cmp(&a.0));
            let excess = self.idle - MAX_IDLE_ADDRESSES * 3 / 4;
            for (_, k) in idle.into_iter().take(excess) {
                self.table.remove(&k);
            }
            self.idle -= excess;
        }
        self.sweep_at = (self.idle * 2).max(SWEEP_FLOOR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_match_their_networks_only() {
        let t = Trusted::parse("10.0.0.0/8, 127.0.0.1, fd00::/8").unwrap();
        assert!(t.contains(ip("10.200.3.4")));
        assert!(t.contains(ip("127.0.0.1")));
        assert!(!t.contains(ip("127.0.0.2")));
        assert!(t.contains(ip("fd12::1")));
        assert!(!t.contains(ip("fe80::1")));
        // IPv4-mapped IPv6 (a dual-stack listener) is the IPv4 address.
        assert!(t.contains(ip("::ffff:10.1.1.1")));
        assert!(Trusted::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(!Trusted::parse("none").unwrap().contains(ip("127.0.0.1")));
        for bad in ["10.0.0.0/33", "nope", "::/129", "1.2.3.4/x"] {
            assert!(Trusted::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_read_from_the_right_past_trusted_proxies() {
        let t = Trusted::parse("127.0.0.0/8,10.0.0.0/8").unwrap();
        // The client forged the first entry; the proxy appended the real one.
        assert_eq!(
            forwarded_client("6.6.6.6, 203.0.113.7", &t),
            Some(ip("203.0.113.7"))
        );
        assert_eq!(
            forwarded_client("203.0.113.7, 10.1.1.1", &t),
            Some(ip("203.0.113.7"))
        );
        assert_eq!(
            forwarded_client("[2001:db8::5]:443", &t),
            Some(ip("2001:db8::5"))
        );
        assert_eq!(
            forwarded_client("198.51.100.1:5000", &t),
            Some(ip("198.51.100.1"))
        );
        assert_eq!(forwarded_client("127.0.0.1", &t), None);
        assert_eq!(forwarded_client("unknown", &t), None);
    }

    #[test]
    fn rates_parse_per_second_and_per_minute() {
        assert_eq!(parse_rate("20/s").unwrap(), 20.0);
        assert_eq!(parse_rate("5").unwrap(), 5.0);
        assert_eq!(parse_rate("120/m").unwrap(), 2.0);
        assert_eq!(parse_rate("0").unwrap(), 0.0);
        for bad in ["-1/s", "x/s", "5/h", "inf"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    /// The bucket against a naive reference: count tokens by hand over a timeline.
    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let rate = Rate {
            per_sec: 10.0,
            burst: 5.0,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(rate, t0);
        let taken = (0..8).filter(|_| b.take(rate, t0)).count();
        assert_eq!(taken, 5);
        // 100 ms is one token at 10/s.
        assert!(b.take(rate, t0 + Duration::from_millis(100)));
        assert!(!b.take(rate, t0 + Duration::from_millis(150)));
        // However long it waits, it holds the burst at most.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| b.take(rate, later)).count(), 5);
        // A steady 10/s for a second, from full: all 10 plus the burst.
        let mut b = Bucket::full(rate, t0);
        let mut naive_tokens = 5.0_f64;
        let mut served = 0;
        for i in 0..30u64 {
            let at = t0 + Duration::from_millis(i * 50);
            if i > 0 {
                naive_tokens = (naive_tokens + 0.5).min(5.0);
            }
            let naive = naive_tokens >= 1.0;
            if naive {
                naive_tokens -= 1.0;
            }
            assert_eq!(b.take(rate, at), naive, "at {i}");
            served += usize::from(naive);
        }
        // 5 at once, then one per 100 ms over 1.45 s.
        assert_eq!(served, 5 + 14);
    }

    #[test]
    fn an_op_flood_is_refused_then_closed_and_a_pause_restores_service() {
        let rate = Rate {
            per_sec: 10.0,
            burst: 3.0,
        };
        let t0 = 1000;
        let mut budget = OpBudget::new(rate, t0);
        let verdicts: Vec<OpVerdict> = (0..20).map(|_| budget.spend(rate, t0)).collect();
        assert_eq!(&verdicts[..3], &[OpVerdict::Serve; 3]);
        let refused = verdicts.iter().filter(|v| **v == OpVerdict::Refuse).count();
        assert_eq!(refused, OP_OVERDRAFT as usize - 1);
        assert_eq!(verdicts[3 + refused], OpVerdict::Close);
        // One that stops after a few refusals and waits them out is served again.
        let mut budget = OpBudget::new(rate, t0);
        for _ in 0..5 {
            budget.spend(rate, t0);
        }
        assert_eq!(budget.spend(rate, t0 + 400), OpVerdict::Serve);
        // Across the u32 wrap the gap is still right.
        let mut budget = OpBudget::new(rate, u32::MAX - 50);
        for _ in 0..5 {
            budget.spend(rate, u32::MAX - 50);
        }
        assert_eq!(budget.spend(rate, 350), OpVerdict::Serve);
        let off = Rate {
            per_sec: 0.0,
            burst: 0.0,
        };
        assert_eq!(OpBudget::new(off, t0).spend(off, t0), OpVerdict::Serve);
    }

    fn settings(max: u32, per_sec: f64, burst: f64) -> Settings {
        Settings {
            max_per_ip: max,
            connect: Rate { per_sec, burst },
            ..Settings::default()
        }
    }

    #[test]
    fn connections_per_address_are_capped_and_released() {
        let mut a = Addresses::new(settings(2, 0.0, 0.0));
        let now = Instant::now();
        let one = ip("192.0.2.1");
        for _ in 0..2 {
            assert_eq!(a.check(one, now), Ok(()));
            a.count(one, now);
        }
        assert_eq!(a.check(one, now), Err(Limit::ConnectionsPerIp));
        assert_eq!(a.check(ip("192.0.2.2"), now), Ok(()));
        a.release(one);
        assert_eq!(a.check(one, now), Ok(()));
        // IPv6 by /64: two addresses of one block are one client.
        let (v6a, v6b) = (ip("2001:db8:1:2::a"), ip("2001:db8:1:2::b"));
        a.count(v6a, now);
        a.count(v6b, now);
        assert_eq!(
            a.check(ip("2001:db8:1:2::c"), now),
            Err(Limit::ConnectionsPerIp)
        );
        assert_eq!(a.check(ip("2001:db8:1:3::c"), now), Ok(()));
    }

    #[test]
    fn connects_per_address_follow_the_bucket() {
        let mut a = Addresses::new(settings(0, 2.0, 3.0));
        let t0 = Instant::now();
        let x = ip("198.51.100.9");
        let ok = (0..5).filter(|_| a.check(x, t0).is_ok()).count();
        assert_eq!(ok, 3);
        assert_eq!(a.check(x, t0), Err(Limit::ConnectRate));
        assert_eq!(a.check(x, t0 + Duration::from_millis(500)), Ok(()));
        // Another address has its own bucket.
        assert_eq!(a.check(ip("198.51.100.10"), t0), Ok(()));
    }

    #[test]
    fn the_table_forgets_refilled_addresses_and_stays_capped_under_a_flood() {
        let mut a = Addresses::new(settings(10, 1.0, 5.0));
        let t0 = Instant::now();
        let kept = ip("203.0.113.1");
        a.check(kept, t0).unwrap();
        a.count(kept, t0);
        // Many addresses connect once and go.
        for i in 0..(MAX_IDLE_ADDRESSES as u32 + 5000) {
            let v = IpAddr::V4((0x0a00_0000 + i).into());
            a.check(v, t0).unwrap();
        }
        assert!(a.len() <= MAX_IDLE_ADDRESSES + 1, "{}", a.len());
        // The address with an open connection was never forgotten.
        assert_eq!(a.connections(kept), 1);
        // Once their buckets are full again, the next sweep drops them all: only the
        // addresses that connected since remain.
        let later = t0 + Duration::from_secs(10);
        let fresh = MAX_IDLE_ADDRESSES as u32 / 4 + 100;
        for i in 0..fresh {
            let v = IpAddr::V4((0x0b00_0000 + i).into());
            a.check(v, later).unwrap();
        }
        assert!(a.len() <= fresh as usize + 1, "{}", a.len());
        assert_eq!(a.connections(kept), 1);
    }

    #[test]
    fn with_no_limits_nothing_is_kept() {
        let mut a = Addresses::new(Settings::default());
        let now = Instant::now();
        for _ in 0..100 {
            a.check(ip("192.0.2.1"), now).unwrap();
            a.count(ip("192.0.2.1"), now);
        }
        assert_eq!(a.len(), 0);
    }
}

/// The rules as the handlers apply them: through the front door and the session handler,
/// wired as the reactor wires them (`testkit`), with no socket.
#[cfg(test)]
mod wired {
    use std::net::IpAddr;
    use std::time::Duration;

    use crate::conn::{ClientAddr, State};
    use crate::http::proxy::tests::header;
    use crate::testkit::World;

    const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                           Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                           Sec-WebSocket-Version: 13\r\n";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxied(client: &str) -> Vec<u8> {
        header(ip(client), ip("127.0.0.1"), &[])
    }

    #[test]
    fn a_trusted_proxys_header_names_the_client_even_in_pieces() {
        let mut w = World::new(&[]);
        let id = w.connect();
        let mut bytes = proxied("203.0.113.5");
        bytes.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        for chunk in bytes.chunks(5) {
            w.send(id, chunk);
        }
        assert!(w.take_text(id).starts_with("HTTP/1.1 200"));
        assert_eq!(w.conns[id].client_ip(), ip("203.0.113.5"));
        assert_eq!(w.conns.addresses.connections(ip("203.0.113.5")), 1);
        // However it ends (here: finished after a response, as a drain does), removing
        // the record releases the count.
        let _ = w.conns.finish(id, w.now);
        assert_eq!(w.conns.addresses.connections(ip("203.0.113.5")), 1);
        w.conns.remove(id);
        assert_eq!(w.conns.addresses.connections(ip("203.0.113.5")), 0);
        // LOCAL (a health check) names nobody: the proxy's own connection.
        let check = w.connect();
        let mut local = crate::http::proxy::SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        local.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        w.send(check, &local);
        assert!(w.take_text(check).starts_with("HTTP/1.1 200"));
        assert_eq!(w.conns[check].client(), ClientAddr::ProxyOwn);
    }

    #[test]
    fn a_proxy_header_from_an_untrusted_peer_is_refused() {
        let mut w = World::new(&[]);
        let id = w.connect_from("198.51.100.7");
        let mut bytes = proxied("10.9.9.9");
        bytes.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        w.send(id, &bytes);
        let out = w.take_text(id);
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert!(out.contains("--trusted-proxies"), "{out}");
        assert_eq!(w.conns[id].client_ip(), ip("198.51.100.7"));
        assert_eq!(w.counters.refusals.get(super::Refused::ProxyUntrusted), 1);
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_peers_and_only_on_upgrades() {
        let mut w = World::new(&["--max-connections-per-ip", "1"]);
        // From a trusted peer: the rightmost untrusted address is the client.
        let xff = "X-Forwarded-For: 6.6.6.6, 203.0.113.8\r\n";
        let (a, _) = w.open_with("/ws", xff);
        assert_eq!(w.conns[a].client_ip(), ip("203.0.113.8"));
        // A second WebSocket for that client is one too many.
        let b = w.connect();
        w.send(b, format!("{UPGRADE}{xff}\r\n").as_bytes());
        let out = w.take_text(b);
        assert!(out.starts_with("HTTP/1.1 429"), "{out}");
        assert!(
            out.contains("too many connections from your address"),
            "{out}"
        );
        // From an untrusted peer, the header is ignored: the peer is the client.
        let c = w.connect_from("192.0.2.50");
        w.send(c, format!("{UPGRADE}{xff}\r\n").as_bytes());
        assert!(w.take_text(c).starts_with("HTTP/1.1 101"));
        assert_eq!(w.conns[c].client_ip(), ip("192.0.2.50"));
        // The first one ends: its address may connect again.
        let _ = w.conns.kill(a);
        for id in w.conns.take_reap() {
            w.conns.remove(id);
        }
        let d = w.connect();
        w.send(d, format!("{UPGRADE}{xff}\r\n").as_bytes());
        assert!(w.take_text(d).starts_with("HTTP/1.1 101"));
    }

    #[test]
    fn a_proxy_connection_reused_for_another_client_names_it_at_its_upgrade() {
        let mut w = World::new(&[
            "--require-token",
            "--token-secret",
            "a-secret-of-32-bytes-for-tests!!",
        ]);
        let id = w.connect();
        // Refused with 401, keep-alive: the proxy may send the next client's request here.
        w.send(
            id,
            format!("{UPGRADE}X-Forwarded-For: 192.0.2.1\r\n\r\n").as_bytes(),
        );
        assert!(w.take_text(id).starts_with("HTTP/1.1 401"));
        assert_eq!(w.conns[id].client_ip(), ip("192.0.2.1"));
        w.send(
            id,
            format!("{UPGRADE}X-Forwarded-For: 192.0.2.2\r\n\r\n").as_bytes(),
        );
        assert!(w.take_text(id).starts_with("HTTP/1.1 401"));
        assert_eq!(w.conns[id].client_ip(), ip("192.0.2.2"));
        assert_eq!(w.conns.addresses.connections(ip("192.0.2.1")), 0);
        assert_eq!(w.conns.addresses.connections(ip("192.0.2.2")), 1);
    }

    #[test]
    fn require_proxy_protocol_refuses_a_trusted_peer_without_a_header() {
        let mut w = World::new(&["--require-proxy-protocol"]);
        let id = w.connect();
        w.send(id, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        let out = w.take_text(id);
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert!(out.contains("--require-proxy-protocol"), "{out}");
        let ok = w.connect();
        let mut bytes = proxied("203.0.113.9");
        bytes.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        w.send(ok, &bytes);
        assert!(w.take_text(ok).starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn the_metrics_port_answers_metrics_and_health_only() {
        let mut w = World::new(&["--metrics-listen", "127.0.0.1:0"]);
        let main = w.connect();
        w.send(main, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(w.take_text(main).starts_with("HTTP/1.1 404"));
        let scrape = w.connect();
        w.conns[scrape].metrics_port = true;
        w.send(scrape, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let out = w.take_text(scrape);
        assert!(out.starts_with("HTTP/1.1 200") && out.contains("herald_refusals_total"));
        w.send(scrape, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(w.take_text(scrape).starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn an_op_flood_gets_rate_limited_then_1008() {
        let mut w = World::new(&["--client-op-rate", "10/s", "--client-op-burst", "5"]);
        let id = w.open("/ws");
        for _ in 0..5 {
            w.send_text(id, r#"{"op":"ping"}"#);
        }
        assert!(w.messages(id).iter().all(|m| m["op"] == "pong"));
        w.send_text(id, r#"{"op":"ping"}"#);
        assert_eq!(w.messages(id)[0]["error"], "rate_limited");
        // Waiting earns it back.
        w.advance(Duration::from_millis(300));
        w.send_text(id, r#"{"op":"ping"}"#);
        assert_eq!(w.messages(id)[0]["op"], "pong");
        // Persisting closes it.
        for _ in 0..20 {
            w.send_text(id, r#"{"op":"ping"}"#);
        }
        let frames = w.frames(id);
        assert_eq!(frames.last().and_then(|f| f.close_code()), Some(1008));
        assert!(matches!(w.conns[id].state, State::Closing(_)));
        assert_eq!(w.counters.refusals.get(super::Refused::OpRateClosed), 1);
    }

    #[test]
    fn subscriptions_past_the_cap_are_unavailable_at_connect_and_later() {
        let mut w = World::new(&["--max-subscriptions", "2"]);
        let a = w.open("/ws?topics=x,y,z");
        let got = w.messages(a);
        assert_eq!(got[2]["error"], "unavailable", "{got:?}");
        let b = w.open("/ws");
        w.send_text(b, r#"{"op":"subscribe","topic":"x"}"#);
        assert_eq!(w.messages(b)[0]["error"], "unavailable");
        w.send_text(a, r#"{"op":"unsubscribe","topic":"x"}"#);
        let _ = w.messages(a);
        w.send_text(b, r#"{"op":"subscribe","topic":"x"}"#);
        assert_eq!(w.messages(b)[0]["op"], "subscribed");
        assert_eq!(w.pubsub.subscriptions(), (2, 2));
    }
}
