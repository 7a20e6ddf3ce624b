//! Command line and environment, in two stages (as ripgrep does): `Args` holds the raw
//! values clap parsed; `Config` holds validated, derived values the server uses. Nothing
//! here touches a socket; `max_connections` stays `None` until the fd limit is known.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::pubsub::history::Limits;
use crate::topic::Patterns;

/// Default bind address when neither `--listen`, `HOST` nor `PORT` says otherwise.
const DEFAULT_HOST: &str = "127.0.0.1";
const DEFAULT_PORT: u16 = 8080;
/// With `PORT` and neither `HOST` nor `--listen`: a platform (Heroku, Fly, Render) says
/// which port its router connects to, from outside, on any interface.
const PORT_ONLY_HOST: &str = "0.0.0.0";
/// `--sndbuf`'s bounds. Less than a page saves nothing worth having and costs a `sendmsg`
/// per fragment of each frame (the kernel raises anything under ~2.3 KiB to its floor,
/// SOCK_MIN_SNDBUF, anyway); setsockopt takes a C int.
const MIN_SNDBUF: usize = 4096;
const MAX_SNDBUF: usize = i32::MAX as usize;

#[derive(Parser, Debug)]
#[command(
    name = "herald",
    version,
    about = "WebSocket push server: publish over HTTP, subscribe over WebSocket.",
    after_help = "Every flag can also be set by its HERALD_* variable. PORT and HOST are \
                  honoured too (PaaS convention) and lose to --listen / HERALD_LISTEN; \
                  PORT alone binds 0.0.0.0:$PORT."
)]
pub struct Args {
    /// Address to bind [default: 127.0.0.1:8080; $HOST:$PORT when those are set;
    /// 0.0.0.0:$PORT when only PORT is, as on Heroku, Fly or Render]
    #[arg(long, env = "HERALD_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,

    /// Required as `Authorization: Bearer KEY` on /publish. Without it, /publish is
    /// accepted from loopback peers only
    #[arg(
        long,
        env = "HERALD_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// Connections beyond this are answered 503 and closed [default: the fd limit minus a
    /// reserve]
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Largest client message and /publish body; larger frames close with 1009, larger
    /// bodies get 413
    #[arg(
        long,
        env = "HERALD_MAX_MESSAGE_SIZE",
        value_name = "BYTES",
        default_value_t = 65536
    )]
    pub max_message_size: usize,

    /// Ping a WebSocket that has been silent this long (keeps proxies' idle timers open)
    #[arg(
        long,
        env = "HERALD_PING_INTERVAL",
        value_name = "SECS",
        default_value_t = 25
    )]
    pub ping_interval: u64,

    /// Close a WebSocket that sent nothing for this long after a ping
    #[arg(
        long,
        env = "HERALD_PONG_TIMEOUT",
        value_name = "SECS",
        default_value_t = 20
    )]
    pub pong_timeout: u64,

    /// Close a connection whose HTTP request head is not complete after this long
    #[arg(
        long,
        env = "HERALD_HANDSHAKE_TIMEOUT",
        value_name = "SECS",
        default_value_t = 10
    )]
    pub handshake_timeout: u64,

    /// Close a keep-alive HTTP connection idle this long between requests
    #[arg(
        long,
        env = "HERALD_KEEPALIVE_TIMEOUT",
        value_name = "SECS",
        default_value_t = 60
    )]
    pub keepalive_timeout: u64,

    /// A subscriber with more unsent bytes than this is a slow consumer and is closed
    /// with 1008
    #[arg(
        long,
        env = "HERALD_SEND_QUEUE_LIMIT",
        value_name = "BYTES",
        default_value_t = 1_048_576
    )]
    pub send_queue_limit: usize,

    /// SO_SNDBUF on every accepted socket (Linux doubles it, and caps it at
    /// net.core.wmem_max): the most kernel memory a client that does not read can pin
    /// before --send-queue-limit starts counting. At least 4096 [default: the kernel's,
    /// autotuned up to net.ipv4.tcp_wmem's maximum, 4 MiB on most hosts]
    #[arg(long, env = "HERALD_SNDBUF", value_name = "BYTES")]
    pub sndbuf: Option<usize>,

    /// Longest a graceful shutdown (SIGTERM/SIGINT) may take
    #[arg(
        long,
        env = "HERALD_DRAIN_TIMEOUT",
        value_name = "SECS",
        default_value_t = 10
    )]
    pub drain_timeout: u64,

    /// Spread the drain's WebSocket closes evenly over this long, so clients come back to
    /// the other servers a few at a time [default: half of --drain-timeout, leaving the
    /// rest for the close handshakes]
    #[arg(long, env = "HERALD_DRAIN_SPREAD", value_name = "SECS")]
    pub drain_spread: Option<f64>,

    /// Before its close frame, each client is told to reconnect after a delay drawn from
    /// this range: {"op":"reconnect","after_ms":X}
    #[arg(
        long,
        env = "HERALD_RECONNECT_JITTER",
        value_name = "MIN-MAX",
        default_value = "0-2000"
    )]
    pub reconnect_jitter: String,

    /// Comma-separated origins allowed to open WebSockets; others get 403 [default: any]
    #[arg(long, env = "HERALD_ALLOWED_ORIGINS", value_name = "LIST")]
    pub allowed_origins: Option<String>,

    /// Comma-separated topics (exact names or `prefix*`) WebSocket clients may publish to
    /// [default: none]
    #[arg(long, env = "HERALD_CLIENT_PUBLISH", value_name = "PATTERNS")]
    pub client_publish: Option<String>,

    /// Comma-separated topics (exact names or `prefix*`) that need a token granting them
    #[arg(long, env = "HERALD_PRIVATE_TOPICS", value_name = "PATTERNS")]
    pub private_topics: Option<String>,

    /// Comma-separated topics (exact names or `prefix*`) that keep presence: who is
    /// subscribed, the `presence` op, `GET /presence` and join/leave events [default: none]
    #[arg(long, env = "HERALD_PRESENCE", value_name = "PATTERNS")]
    pub presence: Option<String>,

    /// Members a presence topic lists; past it, the topic reports its count only and
    /// sends no join/leave events
    #[arg(
        long,
        env = "HERALD_PRESENCE_MAX_MEMBERS",
        value_name = "N",
        default_value_t = 1000
    )]
    pub presence_max_members: usize,

    /// With --redis: how long a process's presence entries outlive its last heartbeat
    /// (heartbeats go every third of it), so a process that dies drops out within it
    #[arg(
        long,
        env = "HERALD_PRESENCE_TTL",
        value_name = "SECS",
        default_value_t = 15
    )]
    pub presence_ttl: u64,

    /// HS256 secret that signs client tokens (at least 16 bytes)
    #[arg(
        long,
        env = "HERALD_TOKEN_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub token_secret: Option<String>,

    /// PEM public key (RSA for RS256, EC P-256 for ES256) that verifies client tokens
    #[arg(long, env = "HERALD_TOKEN_PUBLIC_KEY", value_name = "FILE")]
    pub token_public_key: Option<PathBuf>,

    /// Refuse WebSocket handshakes without a valid token (401)
    #[arg(long, env = "HERALD_REQUIRE_TOKEN")]
    pub require_token: bool,

    /// Share topics with other herald processes through Redis:
    /// redis://[[user]:password@]host[:port][/db]
    #[arg(long, env = "HERALD_REDIS", value_name = "URL", hide_env_values = true)]
    pub redis: Option<String>,

    /// Prefix of herald's Redis channels and keys, so deployments can share one Redis
    #[arg(
        long,
        env = "HERALD_REDIS_PREFIX",
        value_name = "PREFIX",
        default_value = "herald:"
    )]
    pub redis_prefix: String,

    // ---- Redis high availability (issue 19) ----
    /// Find the Redis master through these Sentinels (HOST:PORT,...) and follow its
    /// failovers; with it, --redis gives only the credentials and database, not the host
    #[arg(long, env = "HERALD_REDIS_SENTINEL", value_name = "HOST:PORT,...")]
    pub redis_sentinel: Option<String>,

    /// The master's name as the Sentinels know it (with --redis-sentinel)
    #[arg(long, env = "HERALD_REDIS_MASTER", value_name = "NAME")]
    pub redis_master: Option<String>,

    /// Acknowledge a publish only once this many replicas have it (WAIT N, 1 s); a
    /// publish not replicated in time answers 503
    #[arg(
        long,
        env = "HERALD_REDIS_WAIT_REPLICAS",
        value_name = "N",
        default_value_t = 0
    )]
    pub redis_wait_replicas: u32,

    /// Share topics through a Redis Cluster found from these nodes (HOST:PORT,...),
    /// with sharded pub/sub: each topic's keys and channel live on its slot's master
    #[arg(long, env = "HERALD_REDIS_CLUSTER", value_name = "HOST:PORT,...")]
    pub redis_cluster: Option<String>,

    /// Bind with SO_REUSEPORT, so several processes can share one port (the kernel
    /// balances new connections between them)
    #[arg(long, env = "HERALD_REUSE_PORT")]
    pub reuse_port: bool,

    /// Messages kept per topic for clients to resume (0 turns history off). Keep at
    /// least a topic's rate times the longest a client is away in a deploy (the drain
    /// spread, the reconnect jitter, the herd coming back)
    #[arg(
        long,
        env = "HERALD_HISTORY_SIZE",
        value_name = "N",
        default_value_t = 1000
    )]
    pub history_size: usize,

    /// The longest a message is kept in history
    #[arg(
        long,
        env = "HERALD_HISTORY_TTL",
        value_name = "SECS",
        default_value_t = 300
    )]
    pub history_ttl: u64,

    /// Cap on the history of the whole process; past it the oldest messages across all
    /// topics go first (without --redis; with it, history lives in Redis)
    #[arg(
        long,
        env = "HERALD_HISTORY_MEMORY",
        value_name = "BYTES",
        default_value_t = 64 * 1024 * 1024
    )]
    pub history_memory: usize,

    /// Directory where a drain saves history (epochs, ids, messages) for the next start to
    /// load, so a clean restart loses nothing [default: none, history dies with the process]
    #[arg(long, env = "HERALD_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Answer HAProxy's agent-check on this address: `up ready N% maxconn:M` with herald's
    /// headroom, or `drain` (shutting down, SIGUSR1, out of descriptors, Redis delivery
    /// broken)
    #[arg(long, env = "HERALD_AGENT_LISTEN", value_name = "ADDR")]
    pub agent_listen: Option<String>,

    /// Resident memory the agent-check weight is measured against [default: memory does
    /// not count]
    #[arg(long, env = "HERALD_MAX_MEMORY", value_name = "BYTES")]
    pub max_memory: Option<u64>,

    /// Do not serve the console page at GET / (herald.js stays at /herald.js)
    #[arg(long, env = "HERALD_NO_CONSOLE")]
    pub no_console: bool,

    /// permessage-deflate (RFC 7692) with clients that offer it, as browsers do: each
    /// published message is compressed once for all of them. On unless --no-compression
    /// or --compression=false (of the two flags, the later wins) [default: true]
    #[arg(
        long,
        env = "HERALD_COMPRESSION",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
        overrides_with = "no_compression"
    )]
    pub compression: Option<bool>,

    /// Decline permessage-deflate: every frame goes uncompressed
    #[arg(long, env = "HERALD_NO_COMPRESSION", overrides_with = "compression")]
    pub no_compression: bool,

    /// Messages smaller than this go uncompressed (RSV1 clear), even to clients that
    /// negotiated compression: below a few hundred bytes deflate saves little
    #[arg(
        long,
        env = "HERALD_COMPRESSION_MIN_SIZE",
        value_name = "BYTES",
        default_value_t = 256
    )]
    pub compression_min_size: usize,

    /// Listen backlog (also capped by net.core.somaxconn)
    #[arg(long, env = "HERALD_BACKLOG", value_name = "N", default_value_t = 4096)]
    pub backlog: i32,

    /// Send metrics to this StatsD or DogStatsD agent over UDP, e.g. 127.0.0.1:8125: every
    /// series /metrics has, counters as their increase since the last report, gauges as
    /// their value [default: off]
    #[arg(long, env = "HERALD_STATSD", value_name = "HOST:PORT")]
    pub statsd: Option<String>,

    /// Seconds between StatsD reports (one more goes at exit)
    #[arg(
        long,
        env = "HERALD_STATSD_INTERVAL",
        value_name = "SECS",
        default_value_t = 10
    )]
    pub statsd_interval: u64,

    /// Put before every StatsD name, in place of the `herald_` of /metrics
    #[arg(
        long,
        env = "HERALD_STATSD_PREFIX",
        value_name = "PREFIX",
        default_value = "herald."
    )]
    pub statsd_prefix: String,

    /// DogStatsD: these tags on every line, and labels as tags (`|#status:200,env:prod`).
    /// Without it, plain StatsD: no tags, labels become name segments
    /// (`herald.http_responses_total.status.200`). `--statsd-tags=` is DogStatsD with no
    /// tags of its own
    #[arg(long, env = "HERALD_STATSD_TAGS", value_name = "K:V,...")]
    pub statsd_tags: Option<String>,

    // ---- limits per client address (limits.rs, http/proxy.rs) ----
    /// Peers (comma-separated CIDRs, or `none`) that may name the client: in a PROXY
    /// protocol v2 header (HAProxy send-proxy-v2) or X-Forwarded-For on an upgrade. Other
    /// peers are their own client; their X-Forwarded-For is ignored and a PROXY header
    /// refused. A trusted peer that names no client is not limited per address
    #[arg(
        long,
        env = "HERALD_TRUSTED_PROXIES",
        value_name = "CIDRS",
        default_value = "127.0.0.0/8,::1"
    )]
    pub trusted_proxies: String,

    /// Refuse a connection from a trusted proxy that does not begin with a PROXY v2
    /// header (catches a proxy without send-proxy-v2, which would make every client one)
    #[arg(long, env = "HERALD_REQUIRE_PROXY_PROTOCOL")]
    pub require_proxy_protocol: bool,

    /// Open connections per client address (IPv6: per /64); past it, 429. 0: no limit
    #[arg(
        long,
        env = "HERALD_MAX_CONNECTIONS_PER_IP",
        value_name = "N",
        default_value_t = 1000
    )]
    pub max_connections_per_ip: u32,

    /// New connections per second per client address, after a burst of
    /// --connect-burst-per-ip; past it, 429. 0: no limit
    #[arg(
        long,
        env = "HERALD_CONNECT_RATE_PER_IP",
        value_name = "R/s",
        default_value = "50/s"
    )]
    pub connect_rate_per_ip: String,

    /// New connections a client address may open at once (a token bucket's size)
    #[arg(
        long,
        env = "HERALD_CONNECT_BURST_PER_IP",
        value_name = "N",
        default_value_t = 1000
    )]
    pub connect_burst_per_ip: u32,

    /// Ops per second one WebSocket may send, after a burst of --client-op-burst; past
    /// it, {"op":"error","error":"rate_limited"}, and 1008 for a client that goes on
    /// (10 ops past its budget). 0: no limit
    #[arg(
        long,
        env = "HERALD_CLIENT_OP_RATE",
        value_name = "R/s",
        default_value = "50/s"
    )]
    pub client_op_rate: String,

    /// Ops one WebSocket may send at once
    #[arg(
        long,
        env = "HERALD_CLIENT_OP_BURST",
        value_name = "N",
        default_value_t = 300
    )]
    pub client_op_burst: u32,

    /// Subscriptions (connection x topic) in the whole process; past it a subscribe gets
    /// an `unavailable` error. 0: no cap
    #[arg(
        long,
        env = "HERALD_MAX_SUBSCRIPTIONS",
        value_name = "N",
        default_value_t = 1_000_000
    )]
    pub max_subscriptions: usize,

    /// Serve GET /metrics (and /health) on this address instead; the main port then
    /// answers /metrics with 404 [default: /metrics on the main port]
    #[arg(long, env = "HERALD_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// --auth-* and --webhook-*: the application decides (`app/mod.rs`).
    #[command(flatten)]
    pub app: crate::app::AppArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Check whether this host, and optionally deployment files, can hold N connections;
    /// print the fix for each gap. Exit 0 only when everything fits
    Check(CheckArgs),
    /// Subscribe to TOPICs and print each message as one JSON line; with --follow,
    /// reconnect and resume so nothing is missed or printed twice
    Tail(TailArgs),
}

/// `herald check`'s own flags (the check itself lives in `check.rs`).
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Connections the host should hold
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub connections: u64,
    /// A supervisord program file (or supervisord.conf) to check against herald's settings
    #[arg(long, value_name = "FILE")]
    pub supervisor: Option<PathBuf>,
    /// A systemd unit to check against herald's settings
    #[arg(long, value_name = "FILE")]
    pub systemd: Option<PathBuf>,
    /// An HAProxy configuration to check against herald's settings
    #[arg(long, value_name = "FILE")]
    pub haproxy: Option<PathBuf>,
    #[command(flatten)]
    pub live: LiveArgs,
}

/// `herald check --live`: a deployment checked end to end (`probe/live.rs`).
#[derive(clap::Args, Debug)]
pub struct LiveArgs {
    /// Check a deployment end to end instead of this host: connect to this public ws:// or
    /// wss:// URL as a browser would, publish through --publish, wait for the delivery
    #[arg(long, value_name = "URL", requires = "publish")]
    pub live: Option<String>,
    /// With --live: herald's internal /publish URL (http:// or https://)
    #[arg(long, value_name = "URL", requires = "live")]
    pub publish: Option<String>,
    /// With --live: the key herald's /publish wants
    #[arg(
        long,
        env = "HERALD_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// With --live: the server's --ping-interval; a ping must come within it (plus a
    /// grace) [default: herald's own, from --ping-interval or HERALD_PING_INTERVAL]
    #[arg(long, value_name = "SECS")]
    pub ping_interval: Option<u64>,
    /// With --live: the Origin header of the upgrade [default: the URL's origin]
    #[arg(long, value_name = "ORIGIN")]
    pub origin: Option<String>,
    /// With --live: trust this PEM certificate (or CA) too, besides the system's
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// With --live: the longest any one step may take
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub timeout: u64,
}

/// `herald tail` (`probe/tail.rs`).
#[derive(clap::Args, Debug)]
pub struct TailArgs {
    /// herald's WebSocket URL, ws:// or wss:// (e.g. wss://push.example.com/ws)
    #[arg(value_name = "URL")]
    pub url: String,
    /// Topics to subscribe to
    #[arg(value_name = "TOPIC", required = true)]
    pub topics: Vec<String>,
    /// Reconnect when the connection ends (with backoff, after the server's reconnect
    /// hint) and resume each topic from the last id printed
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// The Origin header of the upgrade [default: the URL's origin]
    #[arg(long, value_name = "ORIGIN")]
    pub origin: Option<String>,
    /// Trust this PEM certificate (or CA) too, besides the system's
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The longest a connection attempt (DNS, TCP, TLS, upgrade) may take
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub timeout: u64,
    /// Ping the server after this long with nothing from it; as long again with nothing,
    /// not even the pong, and the connection is lost
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub keepalive: u64,
}

/// Validated settings. Durations are `Duration`, lists are parsed, the address resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub listen_from: ListenFrom,
    pub api_key: Option<String>,
    /// `None` until `rlimit` derives it from the fd limit.
    pub max_connections: Option<usize>,
    pub max_message_size: usize,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub handshake_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub send_queue_limit: usize,
    /// `--sndbuf`: SO_SNDBUF for accepted sockets; `None` leaves the kernel's autotuning.
    pub sndbuf: Option<usize>,
    pub drain_timeout: Duration,
    pub drain_spread: Duration,
    /// Reconnect hints' range, in ms.
    pub reconnect_jitter: (u64, u64),
    /// Lower-cased origins; `None` accepts any.
    pub allowed_origins: Option<Vec<String>>,
    pub client_publish: Patterns,
    pub backlog: i32,
    pub redis: Option<crate::pubsub::redis::RedisConfig>,
    pub reuse_port: bool,
    pub private_topics: Patterns,
    pub presence: crate::pubsub::presence::Settings,
    /// Set when a token key is configured.
    pub tokens: Option<std::sync::Arc<crate::auth::Verifier>>,
    pub require_token: bool,
    pub history: Limits,
    pub state_dir: Option<PathBuf>,
    pub console: bool,
    /// permessage-deflate is offered back to clients that ask (`--no-compression`: not).
    pub compression: bool,
    /// `--compression-min-size`: smaller messages go uncompressed.
    pub compression_min_size: usize,
    pub agent_listen: Option<SocketAddr>,
    pub max_memory: Option<u64>,
    /// `--statsd*`; `None` without `--statsd`.
    pub statsd: Option<crate::statsd::Settings>,

    /// Trusted proxies and the per-address limits.
    pub limits: crate::limits::Settings,
    /// `--max-subscriptions`; 0: no cap.
    pub max_subscriptions: usize,
    pub metrics_listen: Option<SocketAddr>,
    /// Callbacks and webhooks to the application; `None` when neither is configured.
    pub app: Option<crate::app::Settings>,
}

impl Args {
    /// Validate and derive. `host`/`port` are the PaaS variables, passed in so tests need
    /// no process environment.
    pub fn into_config(self, host: Option<String>, port: Option<String>) -> Result<Config, String> {
        let (listen, listen_from) =
            resolve_listen(self.listen.as_deref(), host.as_deref(), port.as_deref())?;
        if self.max_message_size == 0 {
            return Err("--max-message-size must be at least 1".into());
        }
        if self.send_queue_limit == 0 {
            return Err("--send-queue-limit must be at least 1".into());
        }
        if let Some(bytes) = self.sndbuf
            && !(MIN_SNDBUF..=MAX_SNDBUF).contains(&bytes)
        {
            return Err(format!(
                "--sndbuf {bytes}: must be between {MIN_SNDBUF} and {MAX_SNDBUF} bytes \
                 (less than a page saves nothing and costs a write per fragment)"
            ));
        }
        if self.max_connections == Some(0) {
            return Err("--max-connections must be at least 1".into());
        }
        for (flag, secs) in [
            ("--ping-interval", self.ping_interval),
            ("--pong-timeout", self.pong_timeout),
            ("--handshake-timeout", self.handshake_timeout),
            ("--keepalive-timeout", self.keepalive_timeout),
        ] {
            if secs == 0 {
                return Err(format!("{flag} must be at least 1 second"));
            }
        }
        if self.history_size > 0 && self.history_ttl == 0 {
            return Err("--history-ttl must be at least 1 second (or --history-size 0)".into());
        }
        if let Some(dir) = &self.state_dir
            && !dir.is_dir()
        {
            return Err(format!(
                "--state-dir {}: not a directory (create it, writable by herald)",
                dir.display()
            ));
        }
        let drain_timeout = Duration::from_secs(self.drain_timeout);
        let drain_spread = match self.drain_spread {
            None => drain_timeout / 2,
            Some(s) if !(0.0..=86_400.0).contains(&s) => {
                return Err("--drain-spread must be between 0 and 86400 seconds".into());
            }
            Some(s) => Duration::from_secs_f64(s),
        };
        if drain_spread > drain_timeout {
            return Err(format!(
                "--drain-spread ({} s) must not exceed --drain-timeout ({} s): the last \
                 clients would be cut instead of closed",
                drain_spread.as_secs_f64(),
                self.drain_timeout
            ));
        }
        let reconnect_jitter = crate::drain::parse_jitter(&self.reconnect_jitter)
            .map_err(|e| format!("--reconnect-jitter {e}"))?;
        let agent_listen = match &self.agent_listen {
            Some(text) => Some(
                text.to_socket_addrs()
                    .map_err(|e| format!("--agent-listen {text}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("--agent-listen {text} resolves to nothing"))?,
            ),
            None => None,
        };
        let statsd = match &self.statsd {
            Some(text) => {
                let target = text
                    .to_socket_addrs()
                    .map_err(|e| format!("--statsd {text}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("--statsd {text} resolves to nothing"))?;
                Some(crate::statsd::Settings::new(
                    target,
                    self.statsd_interval,
                    &self.statsd_prefix,
                    self.statsd_tags.as_deref(),
                )?)
            }
            None => None,
        };
        let limits = self.limit_settings()?;
        let metrics_listen = match &self.metrics_listen {
            Some(text) => Some(
                text.to_socket_addrs()
                    .map_err(|e| format!("--metrics-listen {text}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("--metrics-listen {text} resolves to nothing"))?,
            ),
            None => None,
        };
        if self.backlog < 1 {
            return Err("--backlog must be at least 1".into());
        }
        let api_key = match self.api_key {
            Some(key) if key.is_empty() => return Err("--api-key must not be empty".into()),
            other => other,
        };
        let allowed_origins = self.allowed_origins.map(|list| {
            list.split(',')
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect()
        });
        let client_publish = match self.client_publish {
            Some(list) => Patterns::parse(&list).map_err(|e| format!("--client-publish: {e}"))?,
            None => Patterns::default(),
        };
        if self.redis_cluster.is_some() {
            // Presence's scripts name other processes' keys from their arguments (not
            // single-slot); WAIT after a redirected publish is not followed; Sentinel
            // and Cluster are two ways to find a master.
            if self.presence.is_some() {
                return Err("--presence needs one Redis: it is not supported with \
                            --redis-cluster"
                    .into());
            }
            // So do the webhooks' occupancy scripts (a set of processes per topic, and
            // each process's liveness key).
            if self.app.webhook_url.is_some() {
                return Err("--webhook-url needs one Redis (or Sentinel): it is not \
                            supported with --redis-cluster"
                    .into());
            }
            if self.redis_wait_replicas > 0 || self.redis_sentinel.is_some() {
                return Err("--redis-cluster goes without --redis-wait-replicas and \
                            --redis-sentinel"
                    .into());
            }
        }
        let redis_url = match (&self.redis, &self.redis_sentinel, &self.redis_cluster) {
            (Some(url), _, _) => Some(url.clone()),
            // Sentinels (or the Cluster) name the hosts; a URL would only carry
            // credentials and a database.
            (None, Some(_), _) | (None, None, Some(_)) => Some("redis://sentinel".to_string()),
            (None, None, None) => None,
        };
        let redis = match &redis_url {
            Some(url) => {
                let mut redis = crate::pubsub::redis::parse_url(url, &self.redis_prefix)
                    .map_err(|e| format!("--redis: {e}"))?;
                redis.sentinel = crate::pubsub::redis::sentinel_config(
                    self.redis_sentinel.as_deref(),
                    self.redis_master.as_deref(),
                )?;
                redis.wait_replicas = self.redis_wait_replicas;
                redis.cluster = match &self.redis_cluster {
                    Some(list) => Some(crate::pubsub::redis::cluster_seeds(list)?),
                    None => None,
                };
                if redis.cluster.is_some() && redis.db != 0 {
                    return Err("--redis-cluster: a Cluster has only database 0".into());
                }
                // With Redis, history lives there: every process reads the same streams.
                redis.history_size = self.history_size;
                redis.history_ttl = Duration::from_secs(self.history_ttl);
                redis.presence_ttl = Duration::from_secs(self.presence_ttl);
                redis.presence_max = self.presence_max_members;
                Some(redis)
            }
            None if self.redis_master.is_some() || self.redis_wait_replicas > 0 => {
                return Err("--redis-master and --redis-wait-replicas need --redis or \
                            --redis-sentinel"
                    .into());
            }
            None => None,
        };
        let public_key = match &self.token_public_key {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| format!("--token-public-key {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let tokens =
            crate::auth::Verifier::new(self.token_secret.as_deref(), public_key.as_deref())?
                .map(std::sync::Arc::new);
        let private_topics = match &self.private_topics {
            Some(list) => Patterns::parse(list).map_err(|e| format!("--private-topics: {e}"))?,
            None => Patterns::default(),
        };
        let app = self.app.settings()?;
        let callbacks = app.as_ref().is_some_and(|a| a.auth.is_some());
        if tokens.is_none() && !callbacks && (self.private_topics.is_some() || self.require_token) {
            return Err(
                "--private-topics and --require-token need --token-secret, --token-public-key \
                 or --auth-url"
                    .into(),
            );
        }
        let presence_patterns = match &self.presence {
            Some(list) => Patterns::parse(list).map_err(|e| format!("--presence: {e}"))?,
            None => Patterns::default(),
        };
        if self.presence_ttl == 0 {
            return Err("--presence-ttl must be at least 1 second".into());
        }
        Ok(Config {
            private_topics,
            presence: crate::pubsub::presence::Settings {
                patterns: presence_patterns,
                max_members: self.presence_max_members,
                ttl: Duration::from_secs(self.presence_ttl),
            },
            tokens,
            require_token: self.require_token,
            redis,
            reuse_port: self.reuse_port,
            listen,
            listen_from,
            api_key,
            max_connections: self.max_connections,
            max_message_size: self.max_message_size,
            ping_interval: Duration::from_secs(self.ping_interval),
            pong_timeout: Duration::from_secs(self.pong_timeout),
            handshake_timeout: Duration::from_secs(self.handshake_timeout),
            keepalive_timeout: Duration::from_secs(self.keepalive_timeout),
            send_queue_limit: self.send_queue_limit,
            sndbuf: self.sndbuf,
            drain_timeout,
            drain_spread,
            reconnect_jitter,
            allowed_origins,
            client_publish,
            backlog: self.backlog,
            history: Limits {
                size: self.history_size,
                ttl: Duration::from_secs(self.history_ttl),
                memory: self.history_memory,
            },
            state_dir: self.state_dir,
            console: !self.no_console,
            compression: !self.no_compression && self.compression != Some(false),
            compression_min_size: self.compression_min_size,
            agent_listen,
            max_memory: self.max_memory,
            statsd,

            limits,
            max_subscriptions: self.max_subscriptions,
            metrics_listen,
            app,
        })
    }

    fn limit_settings(&self) -> Result<crate::limits::Settings, String> {
        use crate::limits::{Rate, Settings, Trusted, parse_rate};
        let trusted =
            Trusted::parse(&self.trusted_proxies).map_err(|e| format!("--trusted-proxies: {e}"))?;
        let rate = |flag: &str, text: &str, burst: u32| -> Result<Rate, String> {
            let per_sec = parse_rate(text).map_err(|e| format!("{flag}: {e}"))?;
            if per_sec > 0.0 && burst == 0 {
                return Err(format!("{flag} needs a burst of at least 1"));
            }
            Ok(Rate {
                per_sec,
                burst: f64::from(burst),
            })
        };
        Ok(Settings {
            trusted,
            require_proxy: self.require_proxy_protocol,
            max_per_ip: self.max_connections_per_ip,
            connect: rate(
                "--connect-rate-per-ip",
                &self.connect_rate_per_ip,
                self.connect_burst_per_ip,
            )?,
            ops: rate(
                "--client-op-rate",
                &self.client_op_rate,
                self.client_op_burst,
            )?,
        })
    }
}

/// Where the listen address came from, for the log line that says why and for `herald
/// check`'s platform report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenFrom {
    /// `--listen` or `HERALD_LISTEN`.
    Flag,
    /// `HOST` (and perhaps `PORT`).
    HostEnv,
    /// `PORT` alone: every interface, because a platform's router (Heroku, Fly, Render)
    /// connects from outside the container and could never reach 127.0.0.1.
    PortOnly,
    /// Nothing set: loopback, for HAProxy on the same host.
    Default,
}

/// `--listen` wins; otherwise `HOST` and `PORT` fill in whichever half they name, and
/// `PORT` alone binds every interface (`PORT_ONLY_HOST`).
fn resolve_listen(
    listen: Option<&str>,
    host: Option<&str>,
    port: Option<&str>,
) -> Result<(SocketAddr, ListenFrom), String> {
    let host = host.filter(|h| !h.is_empty());
    let port = port.filter(|p| !p.is_empty());
    let from = match (listen, host, port) {
        (Some(_), _, _) => ListenFrom::Flag,
        (None, Some(_), _) => ListenFrom::HostEnv,
        (None, None, Some(_)) => ListenFrom::PortOnly,
        (None, None, None) => ListenFrom::Default,
    };
    let text = match listen {
        Some(addr) => addr.to_string(),
        None => {
            let host = match from {
                ListenFrom::PortOnly => PORT_ONLY_HOST,
                _ => host.unwrap_or(DEFAULT_HOST),
            };
            let port = match port {
                Some(p) => p
                    .parse::<u16>()
                    .map_err(|_| format!("PORT={p} is not a port"))?,
                None => DEFAULT_PORT,
            };
            // An IPv6 host needs brackets in the socket-address form.
            if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }
        }
    };
    let addr = text
        .to_socket_addrs()
        .map_err(|e| format!("listen address {text}: {e}"))?
        .next()
        .ok_or_else(|| format!("listen address {text} resolves to nothing"))?;
    Ok((addr, from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("herald").chain(extra.iter().copied())).unwrap()
    }

    #[test]
    fn redis_sentinel_cluster_and_wait_flags_are_checked_together() {
        let refused = |extra: &[&str]| args(extra).into_config(None, None).is_err();
        let sentinel = ["--redis-sentinel", "127.0.0.1:26379", "--redis-master", "m"];
        let cfg = args(&sentinel).into_config(None, None).unwrap();
        let redis = cfg.redis.unwrap();
        assert_eq!(redis.sentinel.unwrap().master, "m");
        assert!(refused(&["--redis-sentinel", "127.0.0.1:26379"]));
        assert!(refused(&["--redis-master", "m"]));
        assert!(refused(&["--redis-wait-replicas", "1"]));
        let cfg = args(&["--redis-cluster", "127.0.0.1:7000,127.0.0.1:7001"])
            .into_config(None, None)
            .unwrap();
        assert_eq!(cfg.redis.unwrap().cluster.unwrap().len(), 2);
        assert!(refused(&[
            "--redis-cluster",
            "127.0.0.1:7000",
            "--presence",
            "room*"
        ]));
        assert!(refused(&[
            "--redis-cluster",
            "h:1",
            "--redis-wait-replicas",
            "1"
        ]));
        assert!(refused(&[
            "--redis-cluster",
            "h:1",
            "--redis",
            "redis://x/2"
        ]));
        assert!(refused(&["--redis-cluster", "nowhere"]));
        assert!(refused(&[
            "--redis-cluster",
            "127.0.0.1:7000",
            "--auth-secret",
            "s",
            "--webhook-url",
            "http://127.0.0.1:9/hooks",
        ]));
    }

    #[test]
    fn listen_defaults_to_loopback_8080() {
        let cfg = args(&[]).into_config(None, None).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:8080".parse().unwrap());
    }

    #[test]
    fn host_and_port_fill_in_when_listen_is_absent() {
        let cfg = args(&[])
            .into_config(Some("0.0.0.0".into()), Some("9000".into()))
            .unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(cfg.listen_from, ListenFrom::HostEnv);
        // PORT alone, as a platform sets it: every interface, so its router can connect.
        let cfg = args(&[]).into_config(None, Some("9001".into())).unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:9001".parse().unwrap());
        assert_eq!(cfg.listen_from, ListenFrom::PortOnly);
        let cfg = args(&[])
            .into_config(Some(String::new()), Some("9001".into()))
            .unwrap();
        assert_eq!(
            cfg.listen,
            "0.0.0.0:9001".parse().unwrap(),
            "an empty HOST is unset"
        );
        let cfg = args(&[])
            .into_config(Some("::1".into()), Some("9002".into()))
            .unwrap();
        assert_eq!(cfg.listen, "[::1]:9002".parse().unwrap());
    }

    #[test]
    fn explicit_listen_beats_host_and_port() {
        let cfg = args(&["--listen", "127.0.0.2:7000"])
            .into_config(Some("0.0.0.0".into()), Some("9000".into()))
            .unwrap();
        assert_eq!(cfg.listen, "127.0.0.2:7000".parse().unwrap());
        assert_eq!(cfg.listen_from, ListenFrom::Flag);
        let cfg = args(&["--listen", "127.0.0.2:7000"])
            .into_config(None, Some("9000".into()))
            .unwrap();
        assert_eq!(cfg.listen, "127.0.0.2:7000".parse().unwrap());
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_name() {
        let err = args(&[])
            .into_config(None, Some("http".into()))
            .unwrap_err();
        assert!(err.contains("PORT"), "{err}");
        let err = args(&["--ping-interval", "0"])
            .into_config(None, None)
            .unwrap_err();
        assert!(err.contains("--ping-interval"), "{err}");
        let err = args(&["--client-publish", "bad topic"])
            .into_config(None, None)
            .unwrap_err();
        assert!(err.contains("--client-publish"), "{err}");
    }

    #[test]
    fn sndbuf_defaults_to_the_kernel_and_refuses_less_than_a_page() {
        assert_eq!(args(&[]).into_config(None, None).unwrap().sndbuf, None);
        let cfg = args(&["--sndbuf", "65536"])
            .into_config(None, None)
            .unwrap();
        assert_eq!(cfg.sndbuf, Some(65536));
        assert_eq!(
            args(&["--sndbuf", "4096"])
                .into_config(None, None)
                .unwrap()
                .sndbuf,
            Some(4096)
        );
        for bad in ["4095", "0", "2147483648"] {
            let err = args(&["--sndbuf", bad])
                .into_config(None, None)
                .unwrap_err();
            assert!(err.contains("--sndbuf") && err.contains("4096"), "{err}");
        }
        // Not a number: clap refuses it, naming the flag.
        let err = Args::try_parse_from(["herald", "--sndbuf", "64k"]).unwrap_err();
        assert!(err.to_string().contains("--sndbuf"), "{err}");
    }

    #[test]
    fn compression_is_on_unless_turned_off_and_the_last_flag_wins() {
        let on = |extra: &[&str]| args(extra).into_config(None, None).unwrap().compression;
        assert!(on(&[]));
        assert!(on(&["--compression"]));
        assert!(!on(&["--no-compression"]));
        assert!(on(&["--no-compression", "--compression"]));
        assert!(!on(&["--compression", "--no-compression"]));
        assert!(!on(&["--compression=false"]));
        assert!(!on(&["--compression=no"]));
        assert!(on(&["--compression=true"]));
        let cfg = args(&["--compression-min-size", "1024"])
            .into_config(None, None)
            .unwrap();
        assert_eq!(cfg.compression_min_size, 1024);
        assert_eq!(
            args(&[])
                .into_config(None, None)
                .unwrap()
                .compression_min_size,
            256
        );
    }

    #[test]
    fn limit_flags_have_protective_defaults_and_can_be_turned_off() {
        let cfg = args(&[]).into_config(None, None).unwrap();
        let l = &cfg.limits;
        assert!(l.trusted.contains("127.0.0.1".parse().unwrap()));
        assert!(!l.trusted.contains("10.0.0.1".parse().unwrap()));
        assert_eq!(l.max_per_ip, 1000);
        assert_eq!((l.connect.per_sec, l.connect.burst), (50.0, 1000.0));
        assert_eq!((l.ops.per_sec, l.ops.burst), (50.0, 300.0));
        assert_eq!(cfg.max_subscriptions, 1_000_000);
        assert_eq!(cfg.metrics_listen, None);
        let cfg = args(&[
            "--trusted-proxies",
            "none",
            "--max-connections-per-ip",
            "0",
            "--connect-rate-per-ip",
            "0",
            "--client-op-rate",
            "120/m",
            "--metrics-listen",
            "127.0.0.1:9100",
        ])
        .into_config(None, None)
        .unwrap();
        assert!(!cfg.limits.trusted.contains("127.0.0.1".parse().unwrap()));
        assert!(cfg.limits.connect.is_off());
        assert_eq!(cfg.limits.ops.per_sec, 2.0);
        assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        for (flag, value) in [
            ("--trusted-proxies", "10.0.0.0/40"),
            ("--connect-rate-per-ip", "fast"),
            ("--client-op-rate", "3/h"),
        ] {
            let err = args(&[flag, value]).into_config(None, None).unwrap_err();
            assert!(err.contains(flag), "{err}");
        }
    }

    #[test]
    fn origins_are_normalised() {
        let cfg = args(&["--allowed-origins", "https://A.example/, http://b.example"])
            .into_config(None, None)
            .unwrap();
        assert_eq!(
            cfg.allowed_origins.unwrap(),
            vec![
                "https://a.example".to_string(),
                "http://b.example".to_string()
            ]
        );
    }
}
