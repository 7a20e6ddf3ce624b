//! Randomized abuse of a live server for a bounded time: valid requests and frames,
//! mutated and truncated, sent in random pieces, abandoned with FIN or RST. Passes when
//! the server is alive, still serves a normal client correctly, and holds no leaked
//! connections. The seed is printed; `HERALD_FUZZ_SEED=N` replays a run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::util::{Herald, eventually, masked_frame, next_json};

/// How long to fuzz, and at most how many connections.
const BUDGET: Duration = Duration::from_secs(6);
const MAX_CASES: usize = 5000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: small, deterministic, good enough to pick mutations.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn upgrade(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

fn corpus() -> Vec<Vec<u8>> {
    let publish = r#"{"topic":"fz","data":{"k":[1,2,"three"]}}"#;
    let post = format!(
        "POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{publish}",
        publish.len()
    );
    let ws_ops = [
        masked_frame(0x81, br#"{"op":"subscribe","topic":"fz"}"#),
        masked_frame(0x81, br#"{"op":"publish","topic":"fz","data":1}"#),
        masked_frame(0x81, br#"{"op":"ping"}"#),
        masked_frame(0x89, b"ping"),
        masked_frame(0x01, br#"{"op":"#),
        masked_frame(0x80, br#""unsubscribe","topic":"fz"}"#),
        masked_frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e']),
    ]
    .concat();
    vec![
        b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n".to_vec(),
        post.clone().into_bytes(),
        [post.as_bytes(), post.as_bytes()].concat(),
        b"POST /publish HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n{\"topic\":"
            .to_vec(),
        [upgrade("/ws?topics=fz,a"), ws_ops.clone()].concat(),
        [
            upgrade("/echo"),
            masked_frame(0x82, &[0xff; 300]),
            masked_frame(0x81, "héllo".as_bytes()),
        ]
        .concat(),
        [
            upgrade("/echo"),
            masked_frame(0x02, &[1; 70]),
            masked_frame(0x89, b""),
            masked_frame(0x80, &[2; 70]),
        ]
        .concat(),
    ]
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next() as u8;
            }
            2 => {
                let junk: Vec<u8> = (0..rng.below(40)).map(|_| rng.next() as u8).collect();
                out.splice(at..at, junk);
            }
            3 => {
                let end = (at + rng.below(64)).min(out.len());
                out.drain(at..end);
            }
            4 => out.truncate(at),
            5 => {
                let end = (at + rng.below(32)).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
            _ => {
                // Interesting numbers where lengths live.
                let i = rng.below(out.len().max(1));
                if i < out.len() {
                    out[i] = [0x00, 0x7e, 0x7f, 0x80, 0xff][rng.below(5)];
                }
            }
        }
    }
    out
}

fn throw(rng: &mut Rng, addr: std::net::SocketAddr, bytes: &[u8]) {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return;
    };
    stream
        .set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = (1 + rng.below(rest.len())).min(rest.len());
        if stream.write_all(&rest[..n]).is_err() {
            return;
        }
        rest = &rest[n..];
        if rng.below(4) == 0 {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
        }
    }
    if rng.below(2) == 0 {
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
}

#[test]
fn mutated_and_truncated_input_never_hurts_the_server() {
    let seed: u64 = std::env::var("HERALD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("fuzz seed {seed} (HERALD_FUZZ_SEED={seed} to replay)");
    let mut herald = Herald::start(&[
        "--handshake-timeout",
        "2",
        "--client-publish",
        "fz",
        "--max-message-size",
        "4096",
    ]);
    let mut bystander = herald.subscriber("calm");
    let corpus = corpus();
    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut cases = 0;
    while start.elapsed() < BUDGET && cases < MAX_CASES {
        if let Some(status) = herald.exited() {
            panic!(
                "herald died ({status}) after {cases} cases, seed {seed}:\n{}",
                herald.log()
            );
        }
        let seed_input = &corpus[rng.below(corpus.len())];
        let input = if rng.below(8) == 0 {
            seed_input.clone()
        } else {
            mutate(&mut rng, seed_input)
        };
        throw(&mut rng, herald.addr, &input);
        cases += 1;
    }
    eprintln!("{cases} cases in {:?}", start.elapsed());

    // Alive, and a normal client still gets correct service.
    assert_eq!(herald.request("GET /health HTTP/1.1\r\n\r\n").status, 200);
    let mut echo = herald.ws("/echo");
    echo.send(Message::text("still fine")).unwrap();
    assert_eq!(echo.read().unwrap(), Message::text("still fine"));
    drop(echo);
    assert_eq!(herald.publish("calm", "\"after\"")["delivered"], 1);
    let m = next_json(&mut bystander);
    assert_eq!(
        (m["topic"].as_str(), m["data"].as_str()),
        (Some("calm"), Some("after"))
    );

    // No leaked connections: only the bystander and the scrape remain.
    let settled = eventually(Duration::from_secs(8), || {
        herald.metric("herald_connections") == 2.0
    });
    assert!(
        settled,
        "leaked connections: {} (seed {seed})",
        herald.metric("herald_connections")
    );
    assert!(eventually(Duration::from_secs(2), || herald
        .metric("herald_topics")
        == 1.0));
}
