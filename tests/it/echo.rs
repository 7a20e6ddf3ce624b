//! `/echo`: RFC 6455 framing through the real server.

use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::{Bytes, Message};

use crate::util::{Herald, close_code};

const LIMIT: usize = 65536;

#[test]
fn echo_round_trips_text_and_binary_up_to_the_limit() {
    let herald = Herald::start(&["--max-message-size", &LIMIT.to_string()]);
    let mut ws = herald.ws("/echo");
    for size in [0, 1, 125, 126, 127, 1000, 65535, LIMIT] {
        let text: String = (0..size)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        ws.send(Message::text(text.clone())).unwrap();
        assert_eq!(
            ws.read().unwrap(),
            Message::text(text),
            "text of {size} bytes"
        );
        let binary: Vec<u8> = (0..size).map(|i| (i * 7 % 256) as u8).collect();
        ws.send(Message::binary(binary.clone())).unwrap();
        assert_eq!(
            ws.read().unwrap(),
            Message::binary(binary),
            "binary of {size} bytes"
        );
    }
}

#[test]
fn fragmented_messages_are_echoed_whole_with_a_ping_between_fragments() {
    let herald = Herald::start(&[]);
    let mut ws = herald.ws("/echo");
    let fragment = |data: &'static str, op: Data, fin: bool| {
        Message::Frame(Frame::message(
            Bytes::from_static(data.as_bytes()),
            OpCode::Data(op),
            fin,
        ))
    };
    ws.send(fragment("Hel", Data::Text, false)).unwrap();
    ws.send(Message::Ping(Bytes::from_static(b"mid"))).unwrap();
    ws.send(fragment("lo, ", Data::Continue, false)).unwrap();
    ws.send(fragment("world", Data::Continue, true)).unwrap();
    // The pong for the interleaved ping comes first, then the joined message.
    assert_eq!(
        ws.read().unwrap(),
        Message::Pong(Bytes::from_static(b"mid"))
    );
    assert_eq!(ws.read().unwrap(), Message::text("Hello, world"));

    ws.send(fragment("\x01\x02", Data::Binary, false)).unwrap();
    ws.send(fragment("\x03", Data::Continue, true)).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(vec![1u8, 2, 3]));
}

#[test]
fn one_byte_over_the_limit_closes_with_1009() {
    let herald = Herald::start(&["--max-message-size", "1000"]);
    let mut ws = herald.ws("/echo");
    ws.send(Message::binary(vec![0u8; 1000])).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(vec![0u8; 1000]));
    ws.send(Message::binary(vec![0u8; 1001])).unwrap();
    assert_eq!(close_code(&mut ws), CloseCode::Size);

    // The limit applies to the whole message, not just to each fragment.
    let mut ws = herald.ws("/echo");
    for fin in [false, true] {
        let half = Frame::message(
            Bytes::from(vec![b'x'; 600]),
            OpCode::Data(if fin { Data::Continue } else { Data::Text }),
            fin,
        );
        ws.send(Message::Frame(half)).unwrap();
    }
    assert_eq!(close_code(&mut ws), CloseCode::Size);
}

#[test]
fn the_close_handshake_completes_and_the_server_closes_tcp() {
    let herald = Herald::start(&[]);
    let mut ws = herald.ws("/echo");
    ws.close(None).unwrap();
    loop {
        match ws.read() {
            Ok(Message::Close(_)) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(herald.metric("herald_websockets"), 0.0);
}
