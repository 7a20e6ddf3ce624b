//! `/ws` topics and `POST /publish`.

use serde_json::{Value, json};
use tungstenite::Message;

use crate::util::{Client, Herald, next_json, send_json, without_position};

fn expect_message(ws: &mut Client, topic: &str, id: u64, data: Value) {
    let m = next_json(ws);
    assert_eq!(m, json!({"op":"message","topic":topic,"id":id,"data":data}));
}

/// `{"op":"ping"}` → `{"op":"pong"}` proves nothing else was queued before it.
fn expect_nothing_pending(ws: &mut Client) {
    send_json(ws, json!({"op":"ping"}));
    assert_eq!(next_json(ws), json!({"op":"pong"}));
}

#[test]
fn two_subscribers_get_exactly_the_published_messages_in_order() {
    let herald = Herald::start(&[]);
    let mut a = herald.ws("/ws");
    send_json(&mut a, json!({"op":"subscribe","topic":"news"}));
    assert_eq!(
        without_position(next_json(&mut a)),
        json!({"op":"subscribed","topic":"news"})
    );
    let mut b = herald.subscriber("news");

    let mut api = herald.http();
    for i in 1..=5u64 {
        let reply = api.publish("news", &format!(r#"{{"n":{i}}}"#));
        assert_eq!(reply, json!({"id": i, "delivered": 2}));
    }
    // A message on another topic reaches neither.
    assert_eq!(api.publish("sport", "1")["delivered"], 0);
    for ws in [&mut a, &mut b] {
        for i in 1..=5u64 {
            expect_message(ws, "news", i, json!({"n": i}));
        }
        expect_nothing_pending(ws);
    }

    send_json(&mut a, json!({"op":"unsubscribe","topic":"news"}));
    assert_eq!(
        next_json(&mut a),
        json!({"op":"unsubscribed","topic":"news"})
    );
    assert_eq!(
        api.publish("news", r#""after""#),
        json!({"id": 6, "delivered": 1})
    );
    expect_message(&mut b, "news", 6, json!("after"));
    expect_nothing_pending(&mut a);
}

#[test]
fn query_topics_subscribe_at_connect_and_publish_reaches_several_topics() {
    let herald = Herald::start(&[]);
    let mut ws = herald.ws("/ws?topics=a,user%3A42");
    assert_eq!(
        without_position(next_json(&mut ws)),
        json!({"op":"subscribed","topic":"a"})
    );
    assert_eq!(
        without_position(next_json(&mut ws)),
        json!({"op":"subscribed","topic":"user:42"})
    );
    let body = r#"{"topics":["a","user:42","nobody"],"data":[1,2]}"#;
    let raw = format!(
        "POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let reply = herald.request(&raw).json();
    assert_eq!(reply["delivered"], 2);
    assert_eq!(reply["ids"]["a"], 1);
    assert_eq!(reply["ids"]["user:42"], 1);
    expect_message(&mut ws, "a", 1, json!([1, 2]));
    expect_message(&mut ws, "user:42", 1, json!([1, 2]));

    let r = herald.request("GET /ws?topics=bad%20name HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
    assert_eq!(r.status, 400, "{}", r.text());
}

#[test]
fn two_thousand_subscribers_each_receive_all_hundred_messages_in_order() {
    let herald = Herald::start(&[]);
    let mut subs: Vec<Client> = (0..2000).map(|_| herald.subscriber("big")).collect();
    let mut api = herald.http();
    for i in 1..=100u64 {
        let reply = api.publish("big", &i.to_string());
        assert_eq!(reply, json!({"id": i, "delivered": 2000}));
    }
    for (n, ws) in subs.iter_mut().enumerate() {
        for i in 1..=100u64 {
            let m = next_json(ws);
            assert_eq!(
                (m["id"].as_u64(), m["data"].as_u64()),
                (Some(i), Some(i)),
                "subscriber {n}"
            );
        }
    }
    assert_eq!(herald.metric("herald_messages_delivered_total"), 200_000.0);
    // 2,000 writes cannot fit one 200 µs slice: the fan-out went on over several passes,
    // and the order above held across them.
    assert!(herald.metric("herald_fanout_slices_total") > 0.0);
}

/// A subscriber whose receive buffer is set small before it connects, so the kernel
/// advertises a small window and herald's writes to it block early and end mid-frame.
fn small_window_subscriber(herald: &Herald, topic: &str) -> Client {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&herald.addr.into()).unwrap();
    let stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let url = format!("ws://{}/ws?topics={topic}", herald.addr);
    let (mut ws, _) = tungstenite::client::client(url.as_str(), stream).expect("handshake");
    assert_eq!(next_json(&mut ws)["op"], "subscribed");
    ws
}

#[test]
fn pipelined_publishes_reach_stalled_and_reading_subscribers_whole_and_in_order() {
    // Half the subscribers read nothing until every publish is answered, so their sockets
    // (4 KiB windows, 8 KiB send buffers) fill and flushes end mid-frame; the other half read as they go. Every publish
    // is answered while the fan-out is still being written, and every subscriber gets
    // every message, whole and in order.
    let herald = Herald::start(&["--send-queue-limit", "16777216", "--sndbuf", "4096"]);
    let mut subs: Vec<Client> = (0..100)
        .map(|_| small_window_subscriber(&herald, "pipe"))
        .chain((0..100).map(|_| herald.subscriber("pipe")))
        .collect();
    let padding = "x".repeat(3000);
    let count = 300u64;
    let mut raw = Vec::new();
    for i in 1..=count {
        let body = format!(r#"{{"topic":"pipe","data":[{i},"{padding}"]}}"#);
        raw.extend_from_slice(
            format!(
                "POST /publish HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    let mut api = herald.http();
    api.send(&raw);
    let (stalled, reading) = subs.split_at_mut(100);
    let mut next = vec![1u64; reading.len()];
    for i in 1..=count {
        let reply = api.response();
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["id"], i);
        // Read a little on the reading half between responses.
        for (n, ws) in reading.iter_mut().enumerate() {
            if next[n] <= i {
                let m = next_json(ws);
                assert_eq!(m["data"][0], next[n], "reading subscriber {n}");
                next[n] += 1;
            }
        }
    }
    for (n, ws) in reading.iter_mut().enumerate() {
        for i in next[n]..=count {
            assert_eq!(next_json(ws)["data"][0], i, "reading subscriber {n}");
        }
    }
    for (n, ws) in stalled.iter_mut().enumerate() {
        for i in 1..=count {
            let m = next_json(ws);
            assert_eq!(
                (m["id"].as_u64(), m["data"][0].as_u64()),
                (Some(i), Some(i)),
                "stalled subscriber {n}"
            );
            assert_eq!(m["data"][1].as_str().map(str::len), Some(3000));
        }
    }
    assert_eq!(herald.metric("herald_slow_consumers_total"), 0.0);
}

#[test]
fn bad_ops_get_an_error_and_the_connection_stays_open() {
    let herald = Herald::start(&[]);
    let mut ws = herald.ws("/ws");
    for (op, code) in [
        ("not json", "bad_json"),
        (r#"{"op":"dance"}"#, "unknown_op"),
        (r#"{"op":"subscribe","topic":"no spaces"}"#, "bad_topic"),
        (r#"{"op":"subscribe"}"#, "bad_topic"),
        (r#"{"op":"publish","topic":"t","data":1}"#, "forbidden"),
    ] {
        ws.send(Message::text(op)).unwrap();
        let reply = next_json(&mut ws);
        assert_eq!(reply["op"], "error", "{op}");
        assert_eq!(reply["error"], code, "{op}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    expect_nothing_pending(&mut ws);
    assert_eq!(herald.metric("herald_op_errors_total"), 5.0);
}

#[test]
fn client_publish_follows_exact_and_prefix_patterns() {
    let herald = Herald::start(&["--client-publish", "chat,room:*"]);
    let mut listener = herald.ws("/ws?topics=chat,room:1,chatter,other");
    for _ in 0..4 {
        assert_eq!(next_json(&mut listener)["op"], "subscribed");
    }
    let mut client = herald.ws("/ws");
    for (topic, allowed) in [
        ("chat", true),
        ("room:1", true),
        ("chatter", false),
        ("other", false),
    ] {
        send_json(
            &mut client,
            json!({"op":"publish","topic":topic,"data":{"from":"client"}}),
        );
        if allowed {
            let m = next_json(&mut listener);
            assert_eq!(
                (m["topic"].as_str(), m["data"]["from"].as_str()),
                (Some(topic), Some("client"))
            );
        } else {
            let e = next_json(&mut client);
            assert_eq!(e["error"], "forbidden", "{topic}");
        }
    }
    expect_nothing_pending(&mut listener);
    expect_nothing_pending(&mut client);
}

#[test]
fn binary_on_ws_closes_with_1003_and_other_subscribers_are_unaffected() {
    let herald = Herald::start(&[]);
    let mut good = herald.subscriber("t");
    let mut bad = herald.subscriber("t");
    bad.send(Message::binary(vec![1u8, 2, 3])).unwrap();
    assert_eq!(
        crate::util::close_code(&mut bad),
        tungstenite::protocol::frame::coding::CloseCode::Unsupported
    );
    assert_eq!(herald.publish("t", "1")["delivered"], 1);
    expect_message(&mut good, "t", 1, json!(1));
}

#[test]
fn frames_sent_in_the_same_write_as_the_upgrade_belong_to_the_websocket() {
    use std::io::{Read, Write};
    let herald = Herald::start(&[]);
    let mut stream = std::net::TcpStream::connect(herald.addr).unwrap();
    stream.set_read_timeout(Some(crate::util::TIMEOUT)).unwrap();
    let mut bytes = b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .to_vec();
    bytes.extend(crate::util::masked_frame(
        0x81,
        br#"{"op":"subscribe","topic":"early"}"#,
    ));
    bytes.extend(crate::util::masked_frame(0x81, br#"{"op":"ping"}"#));
    stream.write_all(&bytes).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "));
    let (_, first) = crate::util::read_raw_frame(&mut stream).unwrap();
    let first: serde_json::Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(
        without_position(first),
        json!({"op":"subscribed","topic":"early"})
    );
    let (_, second) = crate::util::read_raw_frame(&mut stream).unwrap();
    assert_eq!(second, br#"{"op":"pong"}"#);
}
