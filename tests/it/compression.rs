//! permessage-deflate (RFC 7692) through the real server: the offers real clients make,
//! one compressed frame per publish beside the plain one, the bytes each subscriber gets,
//! a compression bomb, and a real client library that negotiates it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::Value;

use crate::util::{
    DEBIAN_PYTHON, Herald, TIMEOUT, masked_frame, raw_close_code, raw_ws_with, read_raw_frame,
    require_python_module,
};

/// What Chromium sends (and python-websockets, and Node's ws), exactly.
const CHROMIUM: &str = "permessage-deflate; client_max_window_bits";
/// What Firefox sends, exactly.
const FIREFOX: &str = "permessage-deflate";
/// herald's answer to either.
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// A WebSocket opened by hand with this `Sec-WebSocket-Extensions` offer (none if empty);
/// returns the stream and the 101's extension header, if any.
fn offer(herald: &Herald, path: &str, extensions: &str) -> (TcpStream, Option<String>) {
    let headers = match extensions {
        "" => String::new(),
        offer => format!("Sec-WebSocket-Extensions: {offer}\r\n"),
    };
    let stream = TcpStream::connect(herald.addr).expect("connect");
    let (stream, head) = raw_ws_with(stream, path, &headers);
    let answer = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))
        .map(str::to_string);
    (stream, answer)
}

/// A realistic JSON payload of about 1 KiB: what an application publishes.
fn payload_1k() -> String {
    let rows: Vec<String> = (0..12)
        .map(|i| {
            format!(
                r#"{{"id":{i},"symbol":"SYM{i}","bid":{}.25,"ask":{}.5,"venue":"XNYS","ts":"2026-12-01T10:00:0{}Z"}}"#,
                100 + i,
                100 + i,
                i % 10
            )
        })
        .collect();
    format!(r#"{{"type":"quotes","rows":[{}]}}"#, rows.join(","))
}

/// A server frame's payload as the application sees it: inflated when RSV1 says so, with
/// the tail put back (RFC 7692 §7.2.2).
fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
    let mut d = Decompress::new_with_window_bits(false, 15);
    let mut out = Vec::with_capacity(1 << 16);
    while (d.total_in() as usize) < input.len() || out.len() == out.capacity() {
        out.reserve(out.capacity());
        let at = d.total_in() as usize;
        d.decompress_vec(&input[at..], &mut out, FlushDecompress::Sync)
            .expect("inflates");
    }
    out
}

/// `data` deflated as a client does: a fresh raw stream, sync-flushed, tail removed.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new_with_window_bits(Compression::default(), false, 15);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&[0x00, 0x00, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// The next data frame: (first byte, payload).
fn next_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    loop {
        let (first, payload) = read_raw_frame(stream).expect("a frame");
        if first & 0x0f != 0x9 {
            return (first, payload);
        }
    }
}

#[test]
fn chromium_and_firefox_offers_are_answered_on_ws_and_echo() {
    let herald = Herald::start(&[]);
    for path in ["/ws", "/echo"] {
        for browser in [CHROMIUM, FIREFOX] {
            let (_, answer) = offer(&herald, path, browser);
            assert_eq!(answer.as_deref(), Some(ANSWER), "{path}: {browser}");
        }
        // Unknown extensions are passed over, the deflate offer after them taken.
        let (_, answer) = offer(
            &herald,
            path,
            &format!("x-webkit-deflate-frame, {CHROMIUM}"),
        );
        assert_eq!(answer.as_deref(), Some(ANSWER));
        let (_, answer) = offer(&herald, path, "");
        assert_eq!(answer, None);
    }
    // A window the shared frames cannot keep to is declined on /ws, honoured on /echo.
    let narrow = "permessage-deflate; server_max_window_bits=10";
    assert_eq!(offer(&herald, "/ws", narrow).1, None);
    assert_eq!(
        offer(&herald, "/echo", narrow).1,
        Some(format!("{ANSWER}; server_max_window_bits=10"))
    );
    assert_eq!(
        offer(&herald, "/ws", &format!("{narrow}, {FIREFOX}"))
            .1
            .as_deref(),
        Some(ANSWER)
    );
    // 8 bits cannot be made by zlib; a malformed offer is declined, not half answered.
    for declined in [
        "permessage-deflate; server_max_window_bits=8",
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; server_no_context_takeover=yes",
        "permessage-deflate; unheard_of",
    ] {
        assert_eq!(offer(&herald, "/echo", declined).1, None, "{declined}");
    }
}

#[test]
fn a_publish_reaches_compressing_and_plain_subscribers_each_with_the_right_bytes() {
    let herald = Herald::start(&[]);
    let mut deflating: Vec<TcpStream> = Vec::new();
    for browser in [CHROMIUM, FIREFOX] {
        let (stream, answer) = offer(&herald, "/ws?topics=quotes", browser);
        assert_eq!(answer.as_deref(), Some(ANSWER));
        deflating.push(stream);
    }
    let (mut plain, answer) = offer(&herald, "/ws?topics=quotes", "");
    assert_eq!(answer, None);
    let mut library = herald.subscriber("quotes");
    for stream in deflating.iter_mut().chain([&mut plain]) {
        let (first, subscribed) = next_frame(stream);
        // Replies to ops are plain text frames.
        assert_eq!(first, 0x81);
        let reply: Value = serde_json::from_slice(&subscribed).unwrap();
        assert_eq!(reply["op"], "subscribed");
    }
    let data = payload_1k();
    assert!((900..1200).contains(&data.len()), "{}", data.len());
    let reply = herald.publish("quotes", &data);
    assert_eq!(reply["delivered"], 4);
    let (first, expected) = next_frame(&mut plain);
    assert_eq!(first, 0x81, "the plain subscriber gets a plain text frame");
    let message: Value = serde_json::from_slice(&expected).unwrap();
    assert_eq!(
        message["data"],
        serde_json::from_str::<Value>(&data).unwrap()
    );
    let mut compressed = Vec::new();
    for stream in &mut deflating {
        let (first, payload) = next_frame(stream);
        assert_eq!(first, 0xc1, "FIN, RSV1, text");
        assert_eq!(
            inflate(&payload),
            expected,
            "inflates to the plain frame's bytes"
        );
        compressed.push(payload);
    }
    // One compression, the same bytes to both.
    assert_eq!(compressed[0], compressed[1]);
    assert!(
        compressed[0].len() * 3 < expected.len(),
        "{} of {} bytes",
        compressed[0].len(),
        expected.len()
    );
    let got = crate::util::next_json(&mut library);
    assert_eq!(got, message);
    let metrics = herald.metrics();
    assert_eq!(metrics["herald_messages_compressed_total"], 1.0);
    assert_eq!(metrics["herald_deliveries_compressed_total"], 2.0);
    assert_eq!(metrics["herald_websockets_deflate"], 2.0);

    // Below --compression-min-size (256 bytes): plain to everyone, RSV1 clear.
    herald.publish("quotes", r#"{"small":true}"#);
    for stream in deflating.iter_mut().chain([&mut plain]) {
        let (first, payload) = next_frame(stream);
        assert_eq!(first, 0x81);
        let message: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(message["data"]["small"], true);
    }
    assert_eq!(herald.metric("herald_messages_compressed_total"), 1.0);
}

#[test]
fn the_minimum_size_is_a_flag_and_no_compression_declines_every_offer() {
    let herald = Herald::start(&["--compression-min-size", "4096"]);
    let (mut stream, answer) = offer(&herald, "/ws?topics=t", CHROMIUM);
    assert_eq!(answer.as_deref(), Some(ANSWER));
    next_frame(&mut stream);
    herald.publish("t", &payload_1k());
    assert_eq!(next_frame(&mut stream).0, 0x81, "1 KiB is under 4096 bytes");

    let off = Herald::start(&["--no-compression"]);
    let off_too = Herald::start(&["--compression=false"]);
    let by_env = |name: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(["--listen", "127.0.0.1:0"]).env(name, "false");
        if name == "HERALD_NO_COMPRESSION" {
            cmd.env(name, "true");
        }
        Herald::spawn(cmd)
    };
    let (off_by_env, off_by_env_too) = (
        by_env("HERALD_NO_COMPRESSION"),
        by_env("HERALD_COMPRESSION"),
    );
    for herald in [&off, &off_too, &off_by_env, &off_by_env_too] {
        for path in ["/ws?topics=t", "/echo"] {
            let (_, answer) = offer(herald, path, CHROMIUM);
            assert_eq!(answer, None, "{path}");
        }
        let (mut stream, _) = offer(herald, "/ws?topics=t", CHROMIUM);
        next_frame(&mut stream);
        herald.publish("t", &payload_1k());
        assert_eq!(next_frame(&mut stream).0, 0x81);
        // A compressed frame where nothing was negotiated is a protocol error.
        let (mut stream, _) = offer(herald, "/echo", CHROMIUM);
        stream
            .write_all(&masked_frame(0xc1, &deflate(b"hello")))
            .unwrap();
        assert_eq!(raw_close_code(&mut stream), Some(1002));
    }
}

#[test]
fn echo_inflates_and_answers_compressed() {
    let herald = Herald::start(&[]);
    let (mut stream, _) = offer(&herald, "/echo", CHROMIUM);
    let data = payload_1k();
    stream
        .write_all(&masked_frame(0xc1, &deflate(data.as_bytes())))
        .unwrap();
    let (first, payload) = next_frame(&mut stream);
    assert_eq!(first, 0xc1);
    assert_eq!(inflate(&payload), data.as_bytes());
    // Fragmented: RSV1 on the first frame only; a plain message in between is fine.
    let compressed = deflate(data.as_bytes());
    let (a, b) = compressed.split_at(compressed.len() / 2);
    let mut bytes = masked_frame(0x41, a);
    bytes.extend(masked_frame(0x80, b));
    bytes.extend(masked_frame(0x82, b"plain"));
    stream.write_all(&bytes).unwrap();
    let (first, payload) = next_frame(&mut stream);
    assert_eq!((first, inflate(&payload)), (0xc1, data.into_bytes()));
    assert_eq!(next_frame(&mut stream), (0x82, b"plain".to_vec()));
    // RSV1 on a continuation is a protocol error.
    let mut bytes = masked_frame(0x41, a);
    bytes.extend(masked_frame(0xc0, b));
    stream.write_all(&bytes).unwrap();
    assert_eq!(raw_close_code(&mut stream), Some(1002));
}

/// VmRSS and VmHWM (the peak) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn a_compression_bomb_gets_1009_and_costs_no_more_than_the_limit() {
    const LIMIT: usize = 2 << 20;
    let herald = Herald::start(&["--max-message-size", &LIMIT.to_string()]);
    // 1 GiB of zeros in about 1 MB: 1 MiB of zeros deflated and sync-flushed is a run of
    // whole blocks that starts afresh, so 1,024 copies in a row inflate to 1 GiB.
    let mib = {
        let mut c = Compress::new_with_window_bits(Compression::best(), false, 15);
        let mut out = Vec::with_capacity(1 << 16);
        c.compress_vec(&vec![0u8; 1 << 20], &mut out, FlushCompress::Sync)
            .unwrap();
        out
    };
    let two = inflate(&[mib.clone(), mib[..mib.len() - 4].to_vec()].concat());
    assert_eq!(
        two.len(),
        2 << 20,
        "copies of the block inflate one after another"
    );
    let mut bomb = mib.repeat(1024);
    bomb.truncate(bomb.len() - 4);
    assert!(
        bomb.len() < LIMIT,
        "the frame itself is within the limit: {}",
        bomb.len()
    );

    let (mut stream, answer) = offer(&herald, "/ws", CHROMIUM);
    assert_eq!(answer.as_deref(), Some(ANSWER));
    let (rss_before, _) = memory_kib(herald.pid());
    stream.write_all(&masked_frame(0xc1, &bomb)).unwrap();
    assert_eq!(raw_close_code(&mut stream), Some(1009));
    let (rss_after, peak) = memory_kib(herald.pid());
    // The frame is held (1 MB) and unmasked (1 MB), and inflates into at most the limit
    // (2 MiB): a few MiB, where inflating it all would have taken 1 GiB.
    assert!(
        peak < rss_before + 16 * 1024,
        "peak {peak} KiB against {rss_before} KiB before"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "{rss_after} KiB after, {rss_before} KiB before"
    );
    assert_eq!(
        herald.metrics()["herald_websocket_closes_total{code=\"1009\"}"],
        1.0
    );
    // herald is fine: the next client is served.
    let mut ws = herald.ws("/echo");
    ws.send(tungstenite::Message::text("still here")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("still here"));
}

/// A client on python-websockets (Debian's python3-websockets), compression left at its
/// default ("deflate"): it prints the 101's extension header, then each message it gets.
const PYTHON_CLIENT: &str = r#"
import asyncio, json, sys
import websockets

async def main(url, count):
    async with websockets.connect(url) as ws:
        print(json.dumps({"extensions": ws.response_headers.get("Sec-WebSocket-Extensions"),
                          "negotiated": [type(e).__name__ for e in ws.extensions]}), flush=True)
        for _ in range(count + 1):  # the subscribed reply, then the messages
            print(await asyncio.wait_for(ws.recv(), 10), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"#;

#[test]
fn python_websockets_negotiates_compression_and_receives_messages() {
    require_python_module("websockets", "python3-websockets");
    let herald = Herald::start(&[]);
    const COUNT: usize = 5;
    let mut child = Command::new(DEBIAN_PYTHON)
        .args([
            "-c",
            PYTHON_CLIENT,
            &format!("ws://{}/ws?topics=py", herald.addr),
            &COUNT.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python3");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut next = || -> Value {
        match rx.recv_timeout(TIMEOUT) {
            Ok(line) => serde_json::from_str(&line).expect("JSON from the client"),
            Err(_) => {
                let _ = child.kill();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("the python client said nothing more: {err}");
            }
        }
    };
    let hello = next();
    assert_eq!(hello["extensions"], ANSWER);
    assert_eq!(hello["negotiated"][0], "PerMessageDeflate");
    assert_eq!(next()["op"], "subscribed");
    let data = payload_1k();
    for _ in 0..COUNT {
        herald.publish("py", &data);
    }
    for id in 1..=COUNT {
        let message = next();
        assert_eq!(message["id"], id as u64);
        assert_eq!(
            message["data"],
            serde_json::from_str::<Value>(&data).unwrap()
        );
    }
    // They went compressed: the client inflated every one.
    assert_eq!(
        herald.metric("herald_deliveries_compressed_total"),
        COUNT as f64
    );
    let status = child.wait().expect("python3 exits");
    assert!(status.success(), "{status}");
}
