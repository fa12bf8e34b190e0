//! The wire protocol of `herald_net::proto`: frames and their limits at the edge, the streaming
//! decoder, reassembly, the per-peer session, and a two-node simulation over a lossy link.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_net::Error;
use herald_net::proto::*;
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------------
// Helpers

const A: [u8; 16] = [0xaa; 16];
const B: [u8; 16] = [0xbb; 16];

fn header(conversation: u8, from_initiator: bool, sequence: u64) -> MessageHeader {
    MessageHeader {
        conversation_id: [conversation; 16],
        from_initiator,
        sequence,
        source_service: "//orders/source".into(),
        target_service: "//orders/target".into(),
        contract: "//orders/contract".into(),
        message_type: "//orders/submit".into(),
        target_broker_instance: None,
        lifetime_deadline_secs: 0,
    }
}

fn fragment(header: MessageHeader, body: &[u8], offset: usize, len: usize) -> Frame {
    Frame::Message(MessageFragment {
        header,
        body_bytes: body.len() as u32,
        fragment_offset: offset as u32,
        fragment: body[offset..offset + len].to_vec(),
    })
}

fn body_of(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn samples() -> Vec<Frame> {
    let mut pinned = header(3, false, 7);
    pinned.target_broker_instance = Some([0x5c; 16]);
    pinned.lifetime_deadline_secs = 1_900_000_000;
    vec![
        Frame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            broker_instance: A,
        }),
        fragment(header(1, true, 1), b"hello, world", 0, 12),
        fragment(pinned, &body_of(100, 1), 40, 30),
        fragment(header(2, true, u64::MAX), b"", 0, 0),
        Frame::Ack(Ack {
            conversation_id: [1; 16],
            from_initiator: true,
            sequence: 41,
            broker_instance: B,
        }),
        Frame::Error(ErrorFrame {
            conversation_id: [1; 16],
            from_initiator: false,
            code: -8490,
            description: "service //orders/target not found".into(),
        }),
        Frame::GoAway,
    ]
}

fn encode_all(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        frame.encode(&mut out).expect("sample frames encode");
    }
    out
}

/// Decodes a stream fed in the given chunk sizes (cycled); panics on a decode error.
fn decode_in_chunks(bytes: &[u8], sizes: &mut dyn FnMut() -> usize) -> Vec<Frame> {
    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (mut chunk, after) = rest.split_at(sizes().clamp(1, rest.len()));
        rest = after;
        while let Some(frame) = decoder.decode(&mut chunk).expect("valid stream decodes") {
            frames.push(frame);
        }
        assert!(chunk.is_empty());
    }
    assert_eq!(
        decoder.buffered_bytes(),
        0,
        "a whole stream leaves nothing buffered"
    );
    frames
}

/// A frame built by hand: `payload_len u32 | kind u8 | payload`, as PROTOCOL.md lays it out.
fn raw_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

/// A Message payload built by hand, field by field, with whatever lengths the test wants.
fn raw_message(names: [&[u8]; 4], body_bytes: u32, offset: u32, fragment: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&[9; 16]); // conversation id
    p.push(1); // flags: from initiator
    p.extend_from_slice(&5u64.to_le_bytes()); // sequence
    p.extend_from_slice(&0u64.to_le_bytes()); // lifetime deadline
    p.extend_from_slice(&[0; 16]); // no target broker instance
    for name in names {
        p.extend_from_slice(&(name.len() as u16).to_le_bytes());
        p.extend_from_slice(name);
    }
    p.extend_from_slice(&body_bytes.to_le_bytes());
    p.extend_from_slice(&offset.to_le_bytes());
    p.extend_from_slice(fragment);
    raw_frame(2, &p)
}

fn decode_err(bytes: &[u8]) -> Error {
    let whole = Frame::decode(bytes).expect_err("must not decode");
    let mut decoder = FrameDecoder::new();
    let streamed = decoder
        .decode(&mut &bytes[..])
        .expect_err("the stream decoder refuses it too");
    assert_eq!(whole, streamed);
    whole
}

fn encode_err(frame: &Frame) -> Error {
    let mut out = vec![7u8];
    let err = frame.encode(&mut out).expect_err("must not encode");
    assert_eq!(out, [7], "a refused frame leaves the buffer as it was");
    err
}

// ---------------------------------------------------------------------------------------------
// Frames

#[test]
fn every_frame_kind_round_trips() {
    for frame in samples() {
        let bytes = frame.to_bytes().expect("encodes");
        assert!(bytes.len() <= FRAME_BYTES_MAX);
        let (decoded, used) = Frame::decode(&bytes).expect("decodes");
        assert_eq!(used, bytes.len(), "{} frame", frame.kind_name());
        assert_eq!(decoded, frame);
    }
}

#[test]
fn hello_and_ack_bytes_are_as_documented() {
    let hello = Frame::Hello(Hello {
        protocol_version: 1,
        broker_instance: A,
    })
    .to_bytes()
    .expect("encodes");
    let mut expected = vec![22, 0, 0, 0, 1, b'H', b'R', b'L', b'D', 1, 0];
    expected.extend_from_slice(&A);
    assert_eq!(hello, expected);

    let ack = Frame::Ack(Ack {
        conversation_id: [1; 16],
        from_initiator: true,
        sequence: 0x0102,
        broker_instance: B,
    })
    .to_bytes()
    .expect("encodes");
    let mut expected = vec![41, 0, 0, 0, 3];
    expected.extend_from_slice(&[1; 16]);
    expected.push(1);
    expected.extend_from_slice(&[2, 1, 0, 0, 0, 0, 0, 0]);
    expected.extend_from_slice(&B);
    assert_eq!(ack, expected);

    // The hand-built Message layout of PROTOCOL.md decodes to the fields it spells.
    let raw = raw_message([b"s", b"t", b"c", b"m"], 10, 4, b"abc");
    let Frame::Message(m) = Frame::decode(&raw).expect("decodes").0 else {
        panic!("not a message");
    };
    assert_eq!(m.header.conversation_id, [9; 16]);
    assert!(m.header.from_initiator);
    assert_eq!(m.header.sequence, 5);
    assert_eq!(
        (&*m.header.source_service, &*m.header.message_type),
        ("s", "m")
    );
    assert_eq!((m.body_bytes, m.fragment_offset), (10, 4));
    assert_eq!(m.fragment, b"abc");
    assert_eq!(Frame::Message(m).to_bytes().expect("encodes"), raw);
}

#[test]
fn names_at_the_limit_pass_and_one_byte_more_fails() {
    let at_limit = "n".repeat(NAME_BYTES_MAX);
    let over = "n".repeat(NAME_BYTES_MAX + 1);
    for field in 0..4 {
        let mut h = header(1, true, 1);
        fn pick(h: &mut MessageHeader, field: usize) -> &mut Arc<str> {
            match field {
                0 => &mut h.source_service,
                1 => &mut h.target_service,
                2 => &mut h.contract,
                _ => &mut h.message_type,
            }
        }
        *pick(&mut h, field) = at_limit.as_str().into();
        let frame = fragment(h.clone(), b"x", 0, 1);
        let bytes = frame.to_bytes().expect("a name of NAME_BYTES_MAX encodes");
        assert_eq!(Frame::decode(&bytes).expect("decodes").0, frame);
        *pick(&mut h, field) = over.as_str().into();
        assert!(matches!(
            encode_err(&fragment(h, b"x", 0, 1)),
            Error::NameTooLong { bytes, max: NAME_BYTES_MAX, .. } if bytes == NAME_BYTES_MAX + 1
        ));
    }
    let long = vec![b'n'; NAME_BYTES_MAX + 1];
    let ok = vec![b'n'; NAME_BYTES_MAX];
    Frame::decode(&raw_message([&ok, &ok, &ok, &ok], 1, 0, b"x")).expect("limit decodes");
    assert!(matches!(
        decode_err(&raw_message([b"s", b"t", &long, b"m"], 1, 0, b"x")),
        Error::NameTooLong { field: "contract", bytes, max: NAME_BYTES_MAX } if bytes == NAME_BYTES_MAX + 1
    ));
}

#[test]
fn names_must_be_utf8() {
    assert_eq!(
        decode_err(&raw_message([b"s", b"\xff\xfe", b"c", b"m"], 1, 0, b"x")),
        Error::NotUtf8 {
            field: "target service"
        }
    );
}

#[test]
fn description_at_the_limit_passes_and_one_byte_more_fails() {
    let error = |description: String| {
        Frame::Error(ErrorFrame {
            conversation_id: [1; 16],
            from_initiator: true,
            code: -1,
            description,
        })
    };
    let frame = error("d".repeat(DESCRIPTION_BYTES_MAX));
    let bytes = frame.to_bytes().expect("encodes");
    assert_eq!(Frame::decode(&bytes).expect("decodes").0, frame);
    assert_eq!(
        encode_err(&error("d".repeat(DESCRIPTION_BYTES_MAX + 1))),
        Error::DescriptionTooLong {
            bytes: DESCRIPTION_BYTES_MAX + 1,
            max: DESCRIPTION_BYTES_MAX
        }
    );
    let mut payload = vec![1; 16];
    payload.push(0);
    payload.extend_from_slice(&(-1i32).to_le_bytes());
    payload.extend_from_slice(&((DESCRIPTION_BYTES_MAX + 1) as u16).to_le_bytes());
    payload.extend_from_slice(&vec![b'd'; DESCRIPTION_BYTES_MAX + 1]);
    assert_eq!(
        decode_err(&raw_frame(4, &payload)),
        Error::DescriptionTooLong {
            bytes: DESCRIPTION_BYTES_MAX + 1,
            max: DESCRIPTION_BYTES_MAX
        }
    );
}

#[test]
fn error_codes_must_be_negative() {
    for (code, ok) in [(-1, true), (i32::MIN, true), (0, false), (8490, false)] {
        let frame = Frame::Error(ErrorFrame {
            conversation_id: [1; 16],
            from_initiator: true,
            code,
            description: String::new(),
        });
        if ok {
            let bytes = frame.to_bytes().expect("encodes");
            assert_eq!(Frame::decode(&bytes).expect("decodes").0, frame);
        } else {
            assert_eq!(encode_err(&frame), Error::ErrorCodeNotNegative { code });
            let mut payload = vec![1; 16];
            payload.push(1);
            payload.extend_from_slice(&code.to_le_bytes());
            payload.extend_from_slice(&[0, 0]);
            assert_eq!(
                decode_err(&raw_frame(4, &payload)),
                Error::ErrorCodeNotNegative { code }
            );
        }
    }
}

#[test]
fn fragment_at_the_limit_passes_and_one_byte_more_fails() {
    let body = body_of(FRAGMENT_BODY_BYTES_MAX + 1, 3);
    let frame = fragment(header(1, true, 1), &body, 0, FRAGMENT_BODY_BYTES_MAX);
    let bytes = frame.to_bytes().expect("encodes");
    assert_eq!(Frame::decode(&bytes).expect("decodes").0, frame);
    let over = fragment(header(1, true, 1), &body, 0, FRAGMENT_BODY_BYTES_MAX + 1);
    let expected = Error::FragmentTooLarge {
        bytes: FRAGMENT_BODY_BYTES_MAX + 1,
        max: FRAGMENT_BODY_BYTES_MAX,
    };
    assert_eq!(encode_err(&over), expected);
    let raw = raw_message([b"s", b"t", b"c", b"m"], body.len() as u32, 0, &body);
    assert_eq!(decode_err(&raw), expected);
}

#[test]
fn body_at_the_limit_passes_and_one_byte_more_fails() {
    let max = MESSAGE_BODY_BYTES_MAX as u32;
    // The last byte of the largest body, and a body one byte larger.
    let last = Frame::Message(MessageFragment {
        header: header(1, true, 1),
        body_bytes: max,
        fragment_offset: max - 1,
        fragment: vec![7],
    });
    let bytes = last.to_bytes().expect("encodes");
    assert_eq!(Frame::decode(&bytes).expect("decodes").0, last);
    let over = Frame::Message(MessageFragment {
        header: header(1, true, 1),
        body_bytes: max + 1,
        fragment_offset: max,
        fragment: vec![7],
    });
    let expected = Error::BodyTooLarge {
        bytes: MESSAGE_BODY_BYTES_MAX + 1,
        max: MESSAGE_BODY_BYTES_MAX,
    };
    assert_eq!(encode_err(&over), expected);
    assert_eq!(
        decode_err(&raw_message([b"s", b"t", b"c", b"m"], max + 1, max, &[7])),
        expected
    );

    // The session takes a body of the limit and refuses one byte more.
    let mut session = PeerSession::new(A);
    let send = |session: &mut PeerSession, len: usize, sequence| {
        session.send(OutgoingMessage {
            id: sequence,
            header: header(1, true, sequence),
            body: vec![0u8; len].into(),
        })
    };
    send(&mut session, MESSAGE_BODY_BYTES_MAX, 1).expect("the largest body is accepted");
    assert_eq!(
        send(&mut session, MESSAGE_BODY_BYTES_MAX + 1, 2),
        Err(expected)
    );
    assert_eq!(session.unacknowledged_messages(), 1);
}

#[test]
fn fragments_must_lie_inside_the_body() {
    for (offset, len, ok) in [(0, 10, true), (9, 1, true), (5, 5, true), (5, 6, false)] {
        let frame = Frame::Message(MessageFragment {
            header: header(1, true, 1),
            body_bytes: 10,
            fragment_offset: offset,
            fragment: body_of(len, 0),
        });
        if ok {
            frame.to_bytes().expect("inside the body");
        } else {
            assert!(matches!(
                encode_err(&frame),
                Error::FragmentOutOfRange { .. }
            ));
            let raw = raw_message([b"s", b"t", b"c", b"m"], 10, offset, &body_of(len, 0));
            assert!(matches!(decode_err(&raw), Error::FragmentOutOfRange { .. }));
        }
    }
    // Offsets near u32::MAX must not wrap.
    let raw = raw_message([b"s", b"t", b"c", b"m"], 10, u32::MAX, b"ab");
    assert!(matches!(decode_err(&raw), Error::FragmentOutOfRange { .. }));
    // An empty fragment is only the one fragment of an empty body.
    let empty = raw_message([b"s", b"t", b"c", b"m"], 10, 3, b"");
    assert!(matches!(
        decode_err(&empty),
        Error::FragmentOutOfRange { .. }
    ));
}

#[test]
fn frame_size_at_the_limit_is_buffered_and_one_byte_more_is_refused() {
    let header_of = |payload_bytes: usize| {
        let mut h = (payload_bytes as u32).to_le_bytes().to_vec();
        h.push(2);
        h
    };
    let at_limit = header_of(FRAME_BYTES_MAX - FRAME_HEADER_BYTES);
    assert_eq!(
        Frame::decode(&at_limit),
        Err(Error::Truncated {
            needed: FRAME_BYTES_MAX,
            available: FRAME_HEADER_BYTES
        })
    );
    let mut decoder = FrameDecoder::new();
    assert_eq!(decoder.decode(&mut &at_limit[..]), Ok(None));
    assert_eq!(decoder.buffered_bytes(), FRAME_HEADER_BYTES);
    // The whole largest frame is taken; as a GoAway its payload is left over, so it is refused
    // by the GoAway's parser, not by the size check.
    let mut whole = raw_frame(5, &vec![0; FRAME_BYTES_MAX - FRAME_HEADER_BYTES]);
    assert!(matches!(
        decode_err(&whole),
        Error::Malformed {
            frame: "go-away",
            ..
        }
    ));
    whole.truncate(FRAME_HEADER_BYTES);
    whole[..4].copy_from_slice(&((FRAME_BYTES_MAX - FRAME_HEADER_BYTES + 1) as u32).to_le_bytes());
    let over = Error::FrameTooLarge {
        bytes: FRAME_BYTES_MAX + 1,
        max: FRAME_BYTES_MAX,
    };
    assert_eq!(decode_err(&whole), over);
    assert_eq!(
        decode_err(&[0xff, 0xff, 0xff, 0xff, 2]),
        Error::FrameTooLarge {
            bytes: u32::MAX as usize + FRAME_HEADER_BYTES,
            max: FRAME_BYTES_MAX
        }
    );
}

#[test]
fn malformed_frames_are_refused_with_a_reason() {
    assert_eq!(
        decode_err(&raw_frame(0, &[])),
        Error::UnknownFrameKind { kind: 0 }
    );
    assert_eq!(
        decode_err(&raw_frame(6, &[])),
        Error::UnknownFrameKind { kind: 6 }
    );
    let mut hello = b"HRLX\x01\x00".to_vec();
    hello.extend_from_slice(&A);
    assert_eq!(
        decode_err(&raw_frame(1, &hello)),
        Error::BadMagic { found: *b"HRLX" }
    );
    // This version's Hello has no trailing bytes; a later version's Hello may have some.
    let mut hello = b"HRLD\x02\x00".to_vec();
    hello.extend_from_slice(&A);
    hello.push(0);
    assert!(matches!(
        decode_err(&raw_frame(1, &hello)),
        Error::Malformed { frame: "hello", .. }
    ));
    hello[4] = 3;
    assert_eq!(
        Frame::decode(&raw_frame(1, &hello)).expect("decodes").0,
        Frame::Hello(Hello {
            protocol_version: 3,
            broker_instance: A
        })
    );
    let ack = Frame::Ack(Ack {
        conversation_id: [1; 16],
        from_initiator: false,
        sequence: 1,
        broker_instance: B,
    })
    .to_bytes()
    .expect("encodes");
    let mut bad_flags = ack.clone();
    bad_flags[FRAME_HEADER_BYTES + 16] = 2;
    assert!(matches!(
        decode_err(&bad_flags),
        Error::Malformed { frame: "ack", .. }
    ));
    let mut trailing = ack.clone();
    trailing.push(0);
    trailing[0] += 1;
    assert!(matches!(
        decode_err(&trailing),
        Error::Malformed { frame: "ack", .. }
    ));
    let mut short = ack[..ack.len() - 1].to_vec();
    short[0] -= 1;
    assert!(matches!(
        decode_err(&short),
        Error::Malformed { frame: "ack", .. }
    ));
    assert!(matches!(
        decode_err(&raw_frame(5, &[0])),
        Error::Malformed {
            frame: "go-away",
            ..
        }
    ));
    // Message flags: undefined bits, and a "no target broker" that is not zeros.
    let message = raw_message([b"s", b"t", b"c", b"m"], 1, 0, b"x");
    let mut flags = message.clone();
    flags[FRAME_HEADER_BYTES + 16] = 0x05;
    assert!(matches!(
        decode_err(&flags),
        Error::Malformed {
            frame: "message",
            ..
        }
    ));
    let mut broker = message.clone();
    broker[FRAME_HEADER_BYTES + 16 + 1 + 8 + 8] = 1;
    assert!(matches!(
        decode_err(&broker),
        Error::Malformed {
            frame: "message",
            ..
        }
    ));
    // A name length running past the end.
    let mut runs_over = message.clone();
    runs_over[FRAME_HEADER_BYTES + 49] = 200;
    assert!(matches!(
        decode_err(&runs_over),
        Error::Malformed {
            frame: "message",
            ..
        }
    ));
}

#[test]
fn every_truncation_is_truncated_not_a_panic() {
    for frame in samples() {
        let bytes = frame.to_bytes().expect("encodes");
        for cut in 0..bytes.len() {
            let prefix = &bytes[..cut];
            assert!(
                matches!(Frame::decode(prefix), Err(Error::Truncated { .. })),
                "{} cut at {cut}",
                frame.kind_name()
            );
            let mut decoder = FrameDecoder::new();
            assert_eq!(decoder.decode(&mut &prefix[..]), Ok(None));
            assert_eq!(decoder.buffered_bytes(), cut);
        }
    }
}

#[test]
fn the_stream_decoder_takes_bytes_one_at_a_time() {
    let frames = samples();
    let stream = encode_all(&frames);
    assert_eq!(decode_in_chunks(&stream, &mut || 1), frames);
}

#[test]
fn the_stream_decoder_takes_random_chunks() {
    let frames: Vec<Frame> = samples().into_iter().cycle().take(70).collect();
    let stream = encode_all(&frames);
    for seed in 0..50 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut sizes = || {
            if rng.gen_bool(0.1) {
                rng.gen_range(1..2000)
            } else {
                rng.gen_range(1..40)
            }
        };
        assert_eq!(decode_in_chunks(&stream, &mut sizes), frames, "seed {seed}");
    }
    // All at once, too.
    assert_eq!(decode_in_chunks(&stream, &mut || usize::MAX), frames);
}

#[test]
fn the_stream_decoder_stops_at_the_frame_end_and_stays_failed_after_an_error() {
    let stream = encode_all(&samples()[..2]);
    let mut input = &stream[..];
    let mut decoder = FrameDecoder::new();
    let first = decoder
        .decode(&mut input)
        .expect("decodes")
        .expect("a frame");
    assert_eq!(first, samples()[0]);
    assert_eq!(input.len(), stream.len() - 27, "only the Hello was taken");

    let mut garbage = &[0u8, 0, 0, 0, 9, 1, 2, 3][..];
    let mut decoder = FrameDecoder::new();
    assert_eq!(
        decoder.decode(&mut garbage),
        Err(Error::UnknownFrameKind { kind: 9 })
    );
    let mut valid = &stream[..];
    assert_eq!(decoder.decode(&mut valid), Err(Error::DecoderFailed));
}

#[test]
fn garbage_never_panics() {
    let mut rng = SmallRng::seed_from_u64(7);
    let valid = encode_all(&samples());
    for _ in 0..2000 {
        let mut data: Vec<u8> = if rng.gen_bool(0.5) {
            (0..rng.gen_range(0..300)).map(|_| rng.r#gen()).collect()
        } else {
            let mut v = valid.clone();
            for _ in 0..rng.gen_range(1..6) {
                let i = rng.gen_range(0..v.len());
                v[i] = rng.r#gen();
            }
            v
        };
        data.truncate(rng.gen_range(0..=data.len()));
        herald_net::fuzzing::fuzz_frame_decoder(&data);
    }
}

fn arb_id() -> impl Strategy<Value = [u8; 16]> {
    prop::array::uniform16(any::<u8>())
}

fn arb_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z/]{0,20}",
        "\\PC{0,40}".prop_filter("within the limit", |s| s.len() <= NAME_BYTES_MAX),
        Just("x".repeat(NAME_BYTES_MAX)),
    ]
}

fn arb_header() -> impl Strategy<Value = MessageHeader> {
    (
        arb_id(),
        any::<bool>(),
        any::<u64>(),
        (arb_name(), arb_name(), arb_name(), arb_name()),
        prop::option::of(arb_id()),
        any::<u64>(),
    )
        .prop_map(
            |(conversation_id, from_initiator, sequence, names, target, deadline)| MessageHeader {
                conversation_id,
                from_initiator,
                sequence,
                source_service: names.0.into(),
                target_service: names.1.into(),
                contract: names.2.into(),
                message_type: names.3.into(),
                target_broker_instance: target,
                lifetime_deadline_secs: deadline,
            },
        )
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u16>(), arb_id()).prop_map(|(protocol_version, broker_instance)| {
            Frame::Hello(Hello {
                protocol_version,
                broker_instance,
            })
        }),
        (
            arb_header(),
            prop::collection::vec(any::<u8>(), 0..600),
            0u32..1000,
            0u32..1000
        )
            .prop_map(|(header, fragment, before, after)| {
                let offset = if fragment.is_empty() { 0 } else { before };
                let body_bytes = if fragment.is_empty() {
                    0
                } else {
                    offset + fragment.len() as u32 + after
                };
                Frame::Message(MessageFragment {
                    header,
                    body_bytes,
                    fragment_offset: offset,
                    fragment,
                })
            }),
        (arb_id(), any::<bool>(), any::<u64>(), arb_id()).prop_map(
            |(conversation_id, from_initiator, sequence, broker_instance)| {
                Frame::Ack(Ack {
                    conversation_id,
                    from_initiator,
                    sequence,
                    broker_instance,
                })
            }
        ),
        (arb_id(), any::<bool>(), i32::MIN..0, "\\PC{0,100}").prop_map(
            |(conversation_id, from_initiator, code, description)| {
                Frame::Error(ErrorFrame {
                    conversation_id,
                    from_initiator,
                    code,
                    description,
                })
            }
        ),
        Just(Frame::GoAway),
    ]
}

proptest! {
    #[test]
    fn arbitrary_frames_round_trip_whole_and_streamed(
        frames in prop::collection::vec(arb_frame(), 1..12),
        chunk in 1usize..64,
    ) {
        let stream = encode_all(&frames);
        let mut at = 0;
        for frame in &frames {
            let (decoded, used) = Frame::decode(&stream[at..]).expect("decodes");
            prop_assert_eq!(&decoded, frame);
            at += used;
        }
        prop_assert_eq!(at, stream.len());
        prop_assert_eq!(decode_in_chunks(&stream, &mut || chunk), frames);
    }
}

// ---------------------------------------------------------------------------------------------
// Reassembly

/// The fragments a sender cuts `body` into.
fn fragments_of(header: &MessageHeader, body: &[u8]) -> Vec<MessageFragment> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let len = (body.len() - offset).min(FRAGMENT_BODY_BYTES_MAX);
        out.push(MessageFragment {
            header: header.clone(),
            body_bytes: body.len() as u32,
            fragment_offset: offset as u32,
            fragment: body[offset..offset + len].to_vec(),
        });
        offset += len;
        if offset >= body.len() {
            return out;
        }
    }
}

fn arb_body_len() -> impl Strategy<Value = usize> {
    let f = FRAGMENT_BODY_BYTES_MAX;
    prop_oneof![
        Just(0usize),
        1usize..100,
        (1usize..4).prop_map(move |k| k * f),
        (1usize..4, -1i64..=1)
            .prop_map(move |(k, d)| (k * f) as i64 + d)
            .prop_map(|n| n as usize),
        0usize..(3 * f + 17),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn fragments_in_any_order_with_duplicates_reassemble_once(
        len in arb_body_len(),
        seed in any::<u64>(),
    ) {
        let h = header(4, false, 9);
        let body = body_of(len, seed as u8);
        let mut pieces = fragments_of(&h, &body);
        prop_assert_eq!(pieces.len(), len.div_ceil(FRAGMENT_BODY_BYTES_MAX).max(1));
        let mut rng = SmallRng::seed_from_u64(seed);
        let last = pieces.len() - 1;
        // Duplicate some fragments other than the last to arrive (a repeat after completion
        // would start a new copy, which is the engine's duplicate to drop).
        pieces.shuffle(&mut rng);
        let dups: Vec<MessageFragment> =
            pieces[..last].iter().filter(|_| rng.gen_bool(0.5)).cloned().collect();
        let mut arrivals = pieces[..last].to_vec();
        arrivals.extend(dups);
        arrivals.shuffle(&mut rng);
        arrivals.push(pieces[last].clone());
        let mut reassembler = Reassembler::new();
        let mut complete = Vec::new();
        for piece in arrivals {
            if let Some(message) = reassembler.push(piece).expect("consistent fragments") {
                complete.push(message);
            }
        }
        prop_assert_eq!(complete.len(), 1);
        prop_assert_eq!(&complete[0].0, &h);
        prop_assert!(complete[0].1 == body, "body differs");
        prop_assert_eq!(reassembler.buffered_bytes(), 0);
        prop_assert_eq!(reassembler.partial_messages(), 0);
    }

    #[test]
    fn any_body_size_crosses_two_sessions_intact(len in arb_body_len(), seed in any::<u8>()) {
        let body = body_of(len, seed);
        let (mut a, mut b) = (PeerSession::new(A), PeerSession::new(B));
        a.send(OutgoingMessage { id: 1, header: header(5, true, 1), body: body.clone().into() })
            .expect("accepted");
        let now = Instant::now();
        let mut frames = 0;
        while let Some(bytes) = a.poll_transmit(now) {
            prop_assert!(bytes.len() <= TRANSMIT_BYTES_MAX);
            frames += decode_in_chunks(&bytes, &mut || usize::MAX).len();
            b.handle_bytes(now, &bytes).expect("valid stream");
        }
        prop_assert_eq!(frames, 1 + len.div_ceil(FRAGMENT_BODY_BYTES_MAX).max(1));
        let events: Vec<Event> = std::iter::from_fn(|| b.poll_event()).collect();
        prop_assert_eq!(events.len(), 2);
        let Event::Received(message) = &events[1] else { panic!("{:?}", events[1]) };
        prop_assert!(message.body == body, "body differs");
        prop_assert_eq!(message.source_broker_instance, A);
    }
}

#[test]
fn fragments_that_disagree_are_refused() {
    let body = body_of(FRAGMENT_BODY_BYTES_MAX * 2, 1);
    let h = header(1, true, 3);
    let pieces = fragments_of(&h, &body);
    let mut r = Reassembler::new();
    assert_eq!(r.push(pieces[0].clone()), Ok(None));
    let mut other = pieces[1].clone();
    other.header.contract = "//other".into();
    assert!(matches!(
        r.push(other),
        Err(Error::InconsistentFragment { sequence: 3, .. })
    ));
    let mut overlap = pieces[1].clone();
    overlap.fragment_offset -= 1;
    assert!(matches!(
        r.push(overlap),
        Err(Error::InconsistentFragment { .. })
    ));
    // A shorter fragment at the same offset overlaps too; the exact duplicate is ignored.
    let mut shorter = pieces[0].clone();
    shorter.fragment.truncate(10);
    assert!(matches!(
        r.push(shorter),
        Err(Error::InconsistentFragment { .. })
    ));
    assert_eq!(r.push(pieces[0].clone()), Ok(None));
    let done = r
        .push(pieces[1].clone())
        .expect("consistent")
        .expect("complete");
    assert!(done.1 == body);
}

#[test]
fn reassembly_budget_drops_the_oldest_partial_at_the_edge() {
    // Partial messages each holding one largest fragment of a two-fragment body.
    let body = body_of(FRAGMENT_BODY_BYTES_MAX + 1, 2);
    let first = |sequence| fragments_of(&header(6, true, sequence), &body)[0].clone();
    let h = header(6, true, 0);
    let names =
        h.source_service.len() + h.target_service.len() + h.contract.len() + h.message_type.len();
    let cost = FRAGMENT_BODY_BYTES_MAX
        + REASSEMBLY_ENTRY_OVERHEAD_BYTES
        + REASSEMBLY_MESSAGE_OVERHEAD_BYTES
        + names;
    let fit = REASSEMBLY_BYTES_MAX / cost;
    let mut r = Reassembler::new();
    for sequence in 0..fit as u64 {
        assert_eq!(r.push(first(sequence)), Ok(None));
    }
    assert_eq!(r.buffered_bytes(), fit * cost);
    assert_eq!((r.partial_messages(), r.evicted_messages()), (fit, 0));
    assert!(r.buffered_bytes() + cost > REASSEMBLY_BYTES_MAX);
    // One more does not fit: the oldest (sequence 0) goes.
    assert_eq!(r.push(first(fit as u64)), Ok(None));
    assert_eq!((r.partial_messages(), r.evicted_messages()), (fit, 1));
    assert!(r.buffered_bytes() <= REASSEMBLY_BYTES_MAX);
    let second = |sequence| fragments_of(&header(6, true, sequence), &body)[1].clone();
    // Sequence 1 was kept: its second fragment completes it. Sequence 0 was dropped: its
    // second fragment starts it anew (the sender retransmits the first).
    assert_eq!(
        r.push(second(1)).expect("ok").map(|m| m.1 == body),
        Some(true)
    );
    assert_eq!((r.partial_messages(), r.evicted_messages()), (fit - 1, 1));
    assert_eq!(r.push(second(0)), Ok(None));
    assert_eq!(r.partial_messages(), fit);
    assert_eq!(
        r.push(first(0)).expect("ok").map(|m| m.1 == body),
        Some(true)
    );
}

// ---------------------------------------------------------------------------------------------
// The session

fn outgoing(id: u64, conversation: u8, sequence: u64, len: usize) -> OutgoingMessage {
    OutgoingMessage {
        id,
        header: header(conversation, true, sequence),
        body: body_of(len, id as u8).into(),
    }
}

/// Frames in everything `session` transmits now.
fn transmit(session: &mut PeerSession, now: Instant) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(bytes) = session.poll_transmit(now) {
        assert!(bytes.len() <= TRANSMIT_BYTES_MAX);
        frames.extend(decode_in_chunks(&bytes, &mut || usize::MAX));
    }
    frames
}

fn events(session: &mut PeerSession) -> Vec<Event> {
    std::iter::from_fn(|| session.poll_event()).collect()
}

fn sequences(frames: &[Frame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Message(m) if m.fragment_offset == 0 => Some(m.header.sequence),
            _ => None,
        })
        .collect()
}

fn hello(instance: [u8; 16]) -> Frame {
    Frame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        broker_instance: instance,
    })
}

#[test]
fn the_handshake_comes_first_and_must_match() {
    let now = Instant::now();
    let mut s = PeerSession::new(A);
    assert_eq!(
        s.handle(now, Frame::GoAway),
        Err(Error::HelloExpected { found: "go-away" })
    );
    let mut s = PeerSession::new(A);
    assert_eq!(
        s.handle(
            now,
            Frame::Hello(Hello {
                protocol_version: PROTOCOL_VERSION + 1,
                broker_instance: B
            })
        ),
        Err(Error::VersionMismatch {
            found: PROTOCOL_VERSION + 1,
            supported: PROTOCOL_VERSION
        })
    );
    let mut s = PeerSession::new(A);
    s.handle(now, hello(B)).expect("hello accepted");
    assert_eq!(s.peer_broker_instance(), Some(B));
    assert_eq!(
        events(&mut s),
        [Event::Connected {
            peer_broker_instance: B
        }]
    );
    assert_eq!(s.handle(now, hello(B)), Err(Error::DuplicateHello));
    // The first transmission starts with our Hello, even with nothing else to send.
    assert_eq!(transmit(&mut s, now), [hello(A)]);
    assert_eq!(transmit(&mut s, now), []);
}

#[test]
fn acknowledged_messages_are_reported_once_and_repeated_acks_ignored() {
    let now = Instant::now();
    let mut s = PeerSession::new(A);
    s.handle(now, hello(B)).expect("hello");
    for seq in 1..=3 {
        s.send(outgoing(seq * 10, 1, seq, 5)).expect("queued");
    }
    s.send(outgoing(99, 2, 1, 5)).expect("another conversation");
    assert_eq!(
        s.send(outgoing(11, 1, 2, 5)),
        Err(Error::AlreadyQueued {
            conversation_id: [1; 16],
            from_initiator: true,
            sequence: 2
        })
    );
    assert_eq!(sequences(&transmit(&mut s, now)), [1, 2, 3, 1]);
    events(&mut s);
    let ack = |sequence, from_initiator| {
        Frame::Ack(Ack {
            conversation_id: [1; 16],
            from_initiator,
            sequence,
            broker_instance: B,
        })
    };
    s.handle(now, ack(2, false))
        .expect("other direction: nothing");
    assert_eq!(events(&mut s), []);
    s.handle(now, ack(2, true)).expect("ack");
    let acked = |id| Event::Acknowledged {
        id,
        far_broker_instance: B,
    };
    assert_eq!(events(&mut s), [acked(10), acked(20)]);
    // An Ack from a broker other than the Hello's would pin the dialog to it: refused.
    let mut from_other = Ack {
        conversation_id: [1; 16],
        from_initiator: true,
        sequence: 3,
        broker_instance: A,
    };
    assert_eq!(
        s.handle(now, Frame::Ack(from_other)),
        Err(Error::AckBrokerMismatch { ack: A, hello: B })
    );
    assert_eq!(events(&mut s), []);
    from_other.broker_instance = B;
    assert_eq!(s.handle(now, Frame::Ack(from_other)), Ok(()));
    assert_eq!(events(&mut s), [acked(30)]);
    s.handle(now, ack(2, true)).expect("repeat");
    s.handle(now, ack(1, true)).expect("older");
    assert_eq!(events(&mut s), []);
    s.handle(now, ack(u64::MAX, true)).expect("covers all");
    assert_eq!(events(&mut s), []);
    assert_eq!(s.unacknowledged_messages(), 1);
    assert_eq!(s.in_flight_bytes(), 5);
}

#[test]
fn acks_coalesce_to_the_highest_per_conversation_direction() {
    let now = Instant::now();
    let mut s = PeerSession::new(A);
    s.acknowledge([1; 16], true, 1);
    s.acknowledge([2; 16], false, 7);
    s.acknowledge([1; 16], true, 3);
    s.acknowledge([1; 16], true, 2);
    s.acknowledge([1; 16], false, 4);
    let frames = transmit(&mut s, now);
    let ack = |c, from_initiator, sequence| {
        Frame::Ack(Ack {
            conversation_id: [c; 16],
            from_initiator,
            sequence,
            broker_instance: A,
        })
    };
    assert_eq!(
        frames,
        [
            hello(A),
            ack(1, true, 3),
            ack(2, false, 7),
            ack(1, false, 4)
        ]
    );
}

#[test]
fn errors_go_out_and_come_in_as_events() {
    let now = Instant::now();
    let mut s = PeerSession::new(A);
    assert_eq!(
        s.send_error([1; 16], false, 0, "x"),
        Err(Error::ErrorCodeNotNegative { code: 0 })
    );
    assert!(matches!(
        s.send_error([1; 16], false, -1, "d".repeat(DESCRIPTION_BYTES_MAX + 1)),
        Err(Error::DescriptionTooLong { .. })
    ));
    s.send_error([1; 16], false, -8490, "no such service")
        .expect("queued");
    let frames = transmit(&mut s, now);
    let error = Frame::Error(ErrorFrame {
        conversation_id: [1; 16],
        from_initiator: false,
        code: -8490,
        description: "no such service".into(),
    });
    assert_eq!(frames, [hello(A), error.clone()]);
    let mut r = PeerSession::new(B);
    r.handle(now, hello(A)).expect("hello");
    r.handle(now, error).expect("error frame");
    assert_eq!(
        events(&mut r)[1],
        Event::RemoteError {
            conversation_id: [1; 16],
            from_initiator: false,
            code: -8490,
            description: "no such service".into()
        }
    );
}

#[test]
fn retransmission_backs_off_from_one_second_doubling_to_sixty() {
    let start = Instant::now();
    let mut s = PeerSession::new(A);
    s.send(outgoing(1, 1, 1, 10)).expect("queued");
    assert_eq!(sequences(&transmit(&mut s, start)), [1]);
    let mut sent_at = vec![start];
    while sent_at.len() < 11 {
        let due = s.poll_timeout().expect("a retransmission is pending");
        // Nothing goes before the deadline.
        s.handle_timeout(due - Duration::from_millis(1));
        assert_eq!(transmit(&mut s, due - Duration::from_millis(1)), []);
        s.handle_timeout(due);
        assert_eq!(sequences(&transmit(&mut s, due)), [1]);
        sent_at.push(due);
    }
    let gaps: Vec<u64> = sent_at
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs())
        .collect();
    assert_eq!(gaps, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
    assert_eq!(retry_delay(0), RETRY_DELAY_INITIAL);
    assert_eq!(retry_delay(u32::MAX), RETRY_DELAY_MAX);
    // The Ack ends it.
    s.handle(start, hello(B)).expect("hello");
    s.handle(
        start,
        Frame::Ack(Ack {
            conversation_id: [1; 16],
            from_initiator: true,
            sequence: 1,
            broker_instance: B,
        }),
    )
    .expect("ack");
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn in_flight_bytes_stop_at_the_limit_exactly() {
    let now = Instant::now();
    let mut s = PeerSession::new(A);
    s.handle(now, hello(B)).expect("hello");
    let big = MESSAGE_BODY_BYTES_MAX;
    s.send(outgoing(1, 1, 1, big)).expect("queued");
    s.send(outgoing(2, 1, 2, IN_FLIGHT_BYTES_MAX - big - 1))
        .expect("queued");
    s.send(outgoing(3, 2, 1, 1)).expect("queued");
    s.send(outgoing(4, 3, 1, 1)).expect("queued");
    s.send(outgoing(5, 4, 1, 0)).expect("queued");
    // The first three make exactly IN_FLIGHT_BYTES_MAX; the fourth (one byte) waits, and the
    // fifth, although empty, waits behind it.
    assert_eq!(sequences(&transmit(&mut s, now)).len(), 3);
    assert_eq!(s.in_flight_bytes(), IN_FLIGHT_BYTES_MAX);
    s.handle(
        now,
        Frame::Ack(Ack {
            conversation_id: [2; 16],
            from_initiator: true,
            sequence: 1,
            broker_instance: B,
        }),
    )
    .expect("ack");
    let frames = transmit(&mut s, now);
    let conversations: Vec<u8> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Message(m) => Some(m.header.conversation_id[0]),
            _ => None,
        })
        .collect();
    assert_eq!(conversations, [3, 4]);
    assert_eq!(s.in_flight_bytes(), IN_FLIGHT_BYTES_MAX);
}

#[test]
fn batches_stay_within_the_transmit_bound() {
    let now = Instant::now();
    let mut s = PeerSession::new(A);
    for seq in 1..=40 {
        s.send(outgoing(seq, 1, seq, 100_000)).expect("queued");
    }
    let mut batches = 0;
    let mut frames = Vec::new();
    while let Some(bytes) = s.poll_transmit(now) {
        assert!(bytes.len() <= TRANSMIT_BYTES_MAX);
        batches += 1;
        frames.extend(decode_in_chunks(&bytes, &mut || usize::MAX));
    }
    assert!(batches >= 4, "4 MB in batches of at most 1 MiB: {batches}");
    assert_eq!(sequences(&frames), (1..=40).collect::<Vec<_>>());
}

#[test]
fn reset_resends_unacknowledged_messages_in_order_after_a_new_hello() {
    let now = Instant::now();
    let mut s = PeerSession::new(A);
    s.handle(now, hello(B)).expect("hello");
    for seq in 1..=4 {
        s.send(outgoing(seq, 1, seq, FRAGMENT_BODY_BYTES_MAX + 10))
            .expect("queued");
    }
    // Only part of the stream goes out before the connection is lost.
    let first = s.poll_transmit(now).expect("a batch");
    assert!(first.len() <= TRANSMIT_BYTES_MAX);
    s.handle(
        now,
        Frame::Ack(Ack {
            conversation_id: [1; 16],
            from_initiator: true,
            sequence: 1,
            broker_instance: B,
        }),
    )
    .expect("ack");
    s.acknowledge([7; 16], false, 3);
    s.reset();
    assert_eq!(s.in_flight_bytes(), 0);
    assert_eq!(s.peer_broker_instance(), None);
    assert_eq!(s.poll_timeout(), None);
    let frames = transmit(&mut s, now);
    assert_eq!(frames[0], hello(A));
    assert!(matches!(frames[1], Frame::Ack(Ack { sequence: 3, .. })));
    assert_eq!(sequences(&frames), [2, 3, 4]);
    // The new connection needs the peer's Hello again.
    assert!(matches!(
        s.handle(now, Frame::GoAway),
        Err(Error::HelloExpected { .. })
    ));
}

#[test]
fn go_away_stops_messages_both_ways() {
    let now = Instant::now();
    let mut s = PeerSession::new(A);
    s.send(outgoing(1, 1, 1, 3)).expect("queued");
    s.close();
    s.acknowledge([1; 16], false, 1);
    let frames = transmit(&mut s, now);
    assert!(matches!(
        frames[..],
        [Frame::Hello(_), Frame::Ack(_), Frame::GoAway]
    ));
    assert_eq!(
        s.unacknowledged_messages(),
        1,
        "kept for the next connection"
    );

    let mut r = PeerSession::new(B);
    r.send(outgoing(2, 2, 1, 3)).expect("queued");
    r.handle(now, hello(A)).expect("hello");
    r.handle(now, Frame::GoAway).expect("go away");
    assert_eq!(events(&mut r)[1], Event::PeerGoingAway);
    assert_eq!(transmit(&mut r, now), [hello(B)]);
    r.reset();
    assert_eq!(sequences(&transmit(&mut r, now)), [1]);
}

// ---------------------------------------------------------------------------------------------
// Two sessions over a lossy link

/// One node of the simulation: its session and a model of its engine, which enqueues a
/// message only if it is the next in its conversation direction, acknowledges after a
/// simulated durable commit, and records what it delivered.
struct Node {
    session: PeerSession,
    /// Highest sequence durably received per (conversation, direction).
    highest: std::collections::HashMap<([u8; 16], bool), u64>,
    delivered: Vec<(u8, u64)>,
    /// Acks waiting for their commit to become durable, with the time it does.
    commits: Vec<(Instant, [u8; 16], bool, u64)>,
    acknowledged: Vec<u64>,
}

impl Node {
    fn new(instance: [u8; 16]) -> Node {
        Node {
            session: PeerSession::new(instance),
            highest: Default::default(),
            delivered: Vec::new(),
            commits: Vec::new(),
            acknowledged: Vec::new(),
        }
    }

    fn drain_events(&mut self, now: Instant, rng: &mut SmallRng, far: [u8; 16]) {
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Received(m) => {
                    let h = &m.header;
                    let key = (h.conversation_id, h.from_initiator);
                    let highest = self.highest.entry(key).or_insert(0);
                    assert_eq!(m.source_broker_instance, far);
                    assert!(
                        m.body == body_of(m.body.len(), h.sequence as u8),
                        "body damaged"
                    );
                    if h.sequence == *highest + 1 {
                        *highest = h.sequence;
                        self.delivered.push((h.conversation_id[0], h.sequence));
                    }
                    if h.sequence <= *highest {
                        // Durable after a short simulated fsync; duplicates are acknowledged
                        // again, gaps are not (the sender retransmits).
                        let durable = now + Duration::from_millis(rng.gen_range(0..50));
                        self.commits
                            .push((durable, h.conversation_id, h.from_initiator, *highest));
                    }
                }
                Event::Acknowledged {
                    id,
                    far_broker_instance,
                } => {
                    assert_eq!(far_broker_instance, far);
                    self.acknowledged.push(id);
                }
                Event::Connected {
                    peer_broker_instance,
                } => assert_eq!(peer_broker_instance, far),
                other => panic!("unexpected event {other:?}"),
            }
        }
        let (due, later): (Vec<_>, Vec<_>) =
            self.commits.drain(..).partition(|(at, ..)| *at <= now);
        self.commits = later;
        for (_, conversation, from_initiator, sequence) in due {
            self.session
                .acknowledge(conversation, from_initiator, sequence);
        }
    }
}

#[derive(Debug, Default)]
struct LinkStats {
    dropped: u64,
    duplicated: u64,
    reordered: u64,
    connections: u64,
    retransmissions_seen: u64,
}

/// Runs one simulation; returns the link's statistics. Messages flow both ways, several per
/// conversation, some large enough to fragment.
#[allow(clippy::needless_range_loop)] // `side` and `1 - side` index nodes, links and sent together
fn simulate(seed: u64) -> LinkStats {
    let mut rng = SmallRng::seed_from_u64(seed);
    let start = Instant::now();
    let mut now = start;
    let mut nodes = [Node::new(A), Node::new(B)];
    let mut sent: [Vec<(u64, u8, u64)>; 2] = [Vec::new(), Vec::new()];
    let mut id = 0;
    for (side, node) in nodes.iter_mut().enumerate() {
        for conversation in 1..=4u8 {
            let count = rng.gen_range(3..8);
            for sequence in 1..=count {
                id += 1;
                let len = match rng.gen_range(0..10) {
                    0 => rng.gen_range(FRAGMENT_BODY_BYTES_MAX..2 * FRAGMENT_BODY_BYTES_MAX + 9),
                    1 => 0,
                    _ => rng.gen_range(1..3000),
                };
                let mut h = header(conversation, side == 0, sequence);
                h.conversation_id[1] = side as u8;
                node.session
                    .send(OutgoingMessage {
                        id,
                        header: h,
                        body: body_of(len, sequence as u8).into(),
                    })
                    .expect("queued");
                sent[side].push((id, conversation, sequence));
            }
        }
    }
    let (drop_p, dup_p, reorder_p) = (0.15, 0.1, 0.2);
    let mut stats = LinkStats {
        connections: 1,
        ..LinkStats::default()
    };
    // In flight per direction: (arrival time, bytes).
    let mut links: [Vec<(Instant, Vec<u8>)>; 2] = [Vec::new(), Vec::new()];
    let mut message_frames_sent = 0u64;
    let total: usize = sent.iter().map(Vec::len).sum();
    for _step in 0..200_000 {
        let done = nodes.iter().map(|n| n.acknowledged.len()).sum::<usize>() == total;
        if done {
            break;
        }
        // Transmit, through the lossy link.
        for side in 0..2 {
            while let Some(bytes) = nodes[side].session.poll_transmit(now) {
                assert!(nodes[side].session.in_flight_bytes() <= IN_FLIGHT_BYTES_MAX);
                message_frames_sent += decode_in_chunks(&bytes, &mut || usize::MAX)
                    .iter()
                    .filter(|f| matches!(f, Frame::Message(m) if m.fragment_offset == 0))
                    .count() as u64;
                if rng.gen_bool(drop_p) {
                    stats.dropped += 1;
                    continue;
                }
                let mut delay = Duration::from_millis(rng.gen_range(5..20));
                if rng.gen_bool(reorder_p) {
                    stats.reordered += 1;
                    delay += Duration::from_millis(rng.gen_range(20..200));
                }
                if rng.gen_bool(dup_p) {
                    stats.duplicated += 1;
                    links[side].push((now + delay * 2, bytes.clone()));
                }
                links[side].push((now + delay, bytes));
            }
        }
        // Deliver what has arrived, oldest first; a protocol error (a lost Hello, a repeated
        // Hello) closes the connection: both sides reset, the link is emptied.
        let mut broken = false;
        for side in 0..2 {
            let far = 1 - side;
            links[side].sort_by_key(|(at, _)| *at);
            while links[side].first().is_some_and(|(at, _)| *at <= now) {
                let (_, bytes) = links[side].remove(0);
                if nodes[far].session.handle_bytes(now, &bytes).is_err() {
                    broken = true;
                    break;
                }
            }
            let far_instance = if side == 0 { A } else { B };
            nodes[far].drain_events(now, &mut rng, far_instance);
            if broken {
                break;
            }
        }
        if broken || rng.gen_bool(0.0005) {
            stats.connections += 1;
            for node in &mut nodes {
                node.session.reset();
            }
            links = [Vec::new(), Vec::new()];
        }
        // Advance time: to the next arrival, commit or timer, at most 100 ms.
        let mut next = now + Duration::from_millis(100);
        for node in &nodes {
            if let Some(at) = node.session.poll_timeout() {
                next = next.min(at);
            }
            for (at, ..) in &node.commits {
                next = next.min(*at);
            }
        }
        for link in &links {
            for (at, _) in link {
                next = next.min(*at);
            }
        }
        now = next.max(now + Duration::from_millis(1));
        for node in &mut nodes {
            node.session.handle_timeout(now);
        }
    }
    for side in 0..2 {
        // Every message was acknowledged exactly once...
        let mut acked = nodes[side].acknowledged.clone();
        acked.sort_unstable();
        let mut ids: Vec<u64> = sent[side].iter().map(|(id, ..)| *id).collect();
        ids.sort_unstable();
        assert_eq!(acked, ids, "seed {seed}: side {side} acknowledgements");
        assert_eq!(nodes[side].session.unacknowledged_messages(), 0);
        assert_eq!(nodes[side].session.in_flight_bytes(), 0);
        // ...and delivered exactly once, in order per conversation.
        let far = &nodes[1 - side];
        for conversation in 1..=4u8 {
            let expected: Vec<u64> = sent[side]
                .iter()
                .filter(|(_, c, _)| *c == conversation)
                .map(|(_, _, s)| *s)
                .collect();
            let got: Vec<u64> = far
                .delivered
                .iter()
                .filter(|(c, _)| *c == conversation)
                .map(|(_, s)| *s)
                .collect();
            assert_eq!(
                got, expected,
                "seed {seed}: conversation {conversation} from side {side}"
            );
        }
    }
    stats.retransmissions_seen = message_frames_sent - total as u64;
    stats
}

#[test]
fn two_sessions_deliver_everything_exactly_once_over_a_lossy_link() {
    let mut totals = LinkStats::default();
    for seed in 0..24 {
        let stats = simulate(seed);
        totals.dropped += stats.dropped;
        totals.duplicated += stats.duplicated;
        totals.reordered += stats.reordered;
        totals.connections += stats.connections;
        totals.retransmissions_seen += stats.retransmissions_seen;
    }
    // The link really was lossy, and the sessions really recovered by retransmitting.
    assert!(
        totals.dropped > 0 && totals.duplicated > 0 && totals.reordered > 0,
        "{totals:?}"
    );
    assert!(totals.retransmissions_seen > 0, "{totals:?}");
    assert!(
        totals.connections > 24,
        "some connections were lost: {totals:?}"
    );
    eprintln!("{totals:?}");
}

#[test]
fn the_send_queue_and_control_queues_stop_at_their_limits() {
    let now = Instant::now();
    let mut s = PeerSession::new(A);
    for sequence in 1..=SEND_QUEUE_MESSAGES_MAX as u64 {
        s.send(outgoing(sequence, 1, sequence, 0))
            .expect("within the limit");
    }
    let one_more = SEND_QUEUE_MESSAGES_MAX as u64 + 1;
    assert_eq!(
        s.send(outgoing(one_more, 1, one_more, 0)),
        Err(Error::SendQueueFull {
            max: SEND_QUEUE_MESSAGES_MAX
        })
    );
    assert_eq!(s.unacknowledged_messages(), SEND_QUEUE_MESSAGES_MAX);

    // Acks of distinct conversation directions queue up to the limit; one more is dropped (the
    // peer retransmits and is acknowledged again); a higher Ack of a queued one still coalesces.
    let mut s = PeerSession::new(A);
    let conversation = |n: usize| {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(n as u64).to_le_bytes());
        id
    };
    for n in 0..PENDING_CONTROL_FRAMES_MAX {
        s.acknowledge(conversation(n), true, 1);
    }
    s.acknowledge(conversation(PENDING_CONTROL_FRAMES_MAX), true, 1);
    s.acknowledge(conversation(0), true, 9);
    let acks: Vec<Ack> = transmit(&mut s, now)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Ack(ack) => Some(ack),
            _ => None,
        })
        .collect();
    assert_eq!(acks.len(), PENDING_CONTROL_FRAMES_MAX);
    assert_eq!(acks[0].sequence, 9);
    assert!(
        !acks
            .iter()
            .any(|a| a.conversation_id == conversation(PENDING_CONTROL_FRAMES_MAX))
    );
}

/// Error frames waiting are bounded in bytes, not only in number: with the longest
/// descriptions, the frames that fit `PENDING_ERROR_BYTES_MAX` queue and the rest are dropped;
/// once sent, their room is free again.
#[test]
fn pending_error_frames_are_bounded_in_bytes() {
    let now = Instant::now();
    let mut s = PeerSession::new(A);
    let description = "d".repeat(DESCRIPTION_BYTES_MAX);
    // Conversation id 16, direction 1, code 4, description length 2, the description.
    let frame_bytes = FRAME_HEADER_BYTES + 16 + 1 + 4 + 2 + DESCRIPTION_BYTES_MAX;
    let fitting = PENDING_ERROR_BYTES_MAX / frame_bytes;
    for n in 0..fitting + 10 {
        s.send_error([n as u8; 16], true, -1, description.clone())
            .unwrap();
    }
    let errors = |s: &mut PeerSession| {
        transmit(s, now)
            .into_iter()
            .filter(|f| matches!(f, Frame::Error(_)))
            .count()
    };
    assert_eq!(errors(&mut s), fitting);
    assert!(
        fitting < PENDING_CONTROL_FRAMES_MAX,
        "the bytes, not the count, bound it"
    );
    s.send_error([1; 16], true, -1, description).unwrap();
    assert_eq!(errors(&mut s), 1, "sent, their room is free again");
}

#[test]
fn reset_drops_partial_messages() {
    let now = Instant::now();
    let body = body_of(FRAGMENT_BODY_BYTES_MAX + 1, 0);
    let pieces = fragments_of(&header(1, true, 1), &body);
    let mut s = PeerSession::new(B);
    s.handle(now, hello(A)).expect("hello");
    s.handle(now, Frame::Message(pieces[0].clone()))
        .expect("first fragment");
    assert_eq!(s.reassembler().partial_messages(), 1);
    s.reset();
    assert_eq!(s.reassembler().partial_messages(), 0);
    assert_eq!(s.reassembler().buffered_bytes(), 0);
    // On the new connection the second fragment alone completes nothing.
    s.handle(now, hello(A)).expect("hello");
    s.handle(now, Frame::Message(pieces[1].clone()))
        .expect("second fragment");
    assert!(
        events(&mut s)
            .iter()
            .all(|e| !matches!(e, Event::Received(_)))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// The same simulation from arbitrary seeds: a failure prints the seed, which replays it.
    #[test]
    fn lossy_link_simulation_holds_for_any_seed(seed in any::<u64>()) {
        simulate(seed);
    }
}

// ---------------------------------------------------------------------------------------------
// The sending side against a reference model

#[derive(Debug, Clone)]
enum Op {
    Send { conversation: u8, large: bool },
    Ack { conversation: u8, sequence: u64 },
    Advance { millis: u64 },
    Reset,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, prop::bool::weighted(0.3))
            .prop_map(|(conversation, large)| Op::Send { conversation, large }),
        2 => (0u8..3, 0u64..12).prop_map(|(conversation, sequence)| Op::Ack { conversation, sequence }),
        3 => prop_oneof![0u64..1500, 0u64..70_000].prop_map(|millis| Op::Advance { millis }),
        1 => Just(Op::Reset),
    ]
}

/// What the model knows of one unacknowledged message.
#[derive(Debug)]
struct ModelMessage {
    id: u64,
    conversation: u8,
    sequence: u64,
    len: usize,
    /// Transmitted on this connection.
    sent: bool,
    retries: u32,
    /// When it is due for retransmission.
    due: Option<Instant>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// After every operation the session transmits (draining `poll_transmit`); the model says
    /// which messages must go, in which order, and which must be acknowledged.
    #[test]
    fn the_sending_side_matches_its_model(ops in prop::collection::vec(arb_op(), 1..40)) {
        let large = 3 * 1024 * 1024 + 17;
        let start = Instant::now();
        let mut now = start;
        let mut s = PeerSession::new(A);
        s.handle(now, hello(B)).expect("hello");
        events(&mut s);
        let mut model: Vec<ModelMessage> = Vec::new(); // in send order
        let mut next_sequence = [1u64; 3];
        let mut next_id = 0;
        for op in ops {
            match op {
                Op::Send { conversation, large: is_large } => {
                    next_id += 1;
                    let sequence = next_sequence[conversation as usize];
                    next_sequence[conversation as usize] += 1;
                    let len = if is_large { large } else { (next_id as usize * 37) % 900 };
                    s.send(outgoing(next_id, conversation, sequence, len)).expect("queued");
                    model.push(ModelMessage {
                        id: next_id, conversation, sequence, len,
                        sent: false, retries: 0, due: None,
                    });
                }
                Op::Ack { conversation, sequence } => {
                    s.handle(now, Frame::Ack(Ack {
                        conversation_id: [conversation; 16],
                        from_initiator: true,
                        sequence,
                        broker_instance: B,
                    })).expect("ack");
                    let expected: Vec<Event> = model
                        .iter()
                        .filter(|m| m.conversation == conversation && m.sequence <= sequence)
                        .map(|m| Event::Acknowledged { id: m.id, far_broker_instance: B })
                        .collect();
                    model.retain(|m| !(m.conversation == conversation && m.sequence <= sequence));
                    prop_assert_eq!(events(&mut s), expected);
                }
                Op::Advance { millis } => {
                    now += Duration::from_millis(millis);
                    s.handle_timeout(now);
                    for m in &mut model {
                        if m.due.is_some_and(|due| due <= now) {
                            m.due = None;
                            m.retries += 1;
                        }
                    }
                }
                Op::Reset => {
                    s.reset();
                    s.handle(now, hello(B)).expect("hello");
                    events(&mut s);
                    for m in &mut model {
                        m.sent = false;
                        m.retries = 0;
                        m.due = None;
                    }
                }
            }
            // Transmit everything that may go now.
            let sent: Vec<u64> = transmit(&mut s, now)
                .iter()
                .filter_map(|f| match f {
                    Frame::Message(m) if m.fragment_offset == 0 => {
                        Some(m.header.conversation_id[0] as u64 * 1000 + m.header.sequence)
                    }
                    _ => None,
                })
                .collect();
            // The model: due retransmissions and then new messages, in send order, new ones
            // while the window allows.
            let mut in_flight: usize = model.iter().filter(|m| m.sent).map(|m| m.len).sum();
            let mut expected = Vec::new();
            for m in &mut model {
                let key = m.conversation as u64 * 1000 + m.sequence;
                if m.sent {
                    if m.due.is_none() {
                        expected.push(key);
                        m.due = Some(now + retry_delay(m.retries));
                    }
                    continue;
                }
                if in_flight > 0 && in_flight + m.len > IN_FLIGHT_BYTES_MAX {
                    break;
                }
                in_flight += m.len;
                m.sent = true;
                m.due = Some(now + retry_delay(m.retries));
                expected.push(key);
            }
            prop_assert_eq!(sent, expected);
            prop_assert_eq!(s.in_flight_bytes(), in_flight);
            prop_assert!(s.in_flight_bytes() <= IN_FLIGHT_BYTES_MAX);
            prop_assert_eq!(s.unacknowledged_messages(), model.len());
            prop_assert_eq!(s.poll_timeout(), model.iter().filter_map(|m| m.due).min());
        }
    }
}

#[test]
fn withdrawn_messages_are_never_sent_again_nor_reported_acknowledged() {
    let now = Instant::now();
    let mut s = PeerSession::new(A);
    s.handle(now, hello(B)).expect("hello");
    for seq in 1..=3 {
        s.send(outgoing(seq * 10, 1, seq, 100)).expect("queued");
    }
    s.send(outgoing(40, 2, 1, 7))
        .expect("queued, not yet transmitted below");
    assert_eq!(sequences(&transmit(&mut s, now)), [1, 2, 3, 1]);
    assert_eq!(s.in_flight_bytes(), 307);

    // 20 (in flight) and 40, and an unknown id: the unknown one is ignored.
    assert_eq!(s.withdraw(&[20, 40, 12345]), 2);
    assert_eq!(s.withdraw(&[20]), 0, "already withdrawn");
    assert_eq!(s.unacknowledged_messages(), 2);
    assert_eq!(s.in_flight_bytes(), 200);

    // Retransmission: only what was not withdrawn.
    let later = now + RETRY_DELAY_INITIAL;
    s.handle_timeout(later);
    assert_eq!(sequences(&transmit(&mut s, later)), [1, 3]);
    // After a reconnection too.
    s.reset();
    s.handle(later, hello(B)).expect("hello");
    let frames = transmit(&mut s, later);
    assert_eq!(sequences(&frames), [1, 3]);
    assert!(frames.iter().all(|f| match f {
        Frame::Message(m) => m.header.conversation_id == [1; 16],
        _ => true,
    }));
    // An Ack covering everything reports only what stayed; the sequence may be sent again.
    events(&mut s);
    s.handle(
        later,
        Frame::Ack(Ack {
            conversation_id: [1; 16],
            from_initiator: true,
            sequence: 3,
            broker_instance: B,
        }),
    )
    .expect("ack");
    let acked = |id| Event::Acknowledged {
        id,
        far_broker_instance: B,
    };
    assert_eq!(events(&mut s), [acked(10), acked(30)]);
    assert_eq!(s.unacknowledged_messages(), 0);
    assert_eq!(s.in_flight_bytes(), 0);
    s.send(outgoing(41, 2, 1, 7))
        .expect("a withdrawn (conversation, sequence) is free again");
}

/// Messages of a batch with the names of the Message before them leave the names out, and
/// arrive with them all the same; a batch starts with the names again.
#[test]
fn a_batch_leaves_out_repeated_names_and_they_arrive_all_the_same() {
    let now = Instant::now();
    let (mut a, mut b) = (PeerSession::new(A), PeerSession::new(B));
    let mut headers = Vec::new();
    for sequence in 1..=4 {
        let mut h = header(1, true, sequence);
        if sequence >= 3 {
            h.message_type = "//orders/cancel".into();
        }
        headers.push(h.clone());
        a.send(OutgoingMessage {
            id: sequence,
            header: h,
            body: vec![sequence as u8; 10].into(),
        })
        .expect("queued");
    }
    let batch = a.poll_transmit(now).expect("a batch");
    // Each message's names take 2 + 15, 2 + 15, 2 + 17 and 2 + 15 bytes ("//orders/submit" and
    // "//orders/cancel" are both 15 long).
    let names_bytes = 2 + 15 + 2 + 15 + 2 + 17 + 2 + 15;
    let literal: usize = headers
        .iter()
        .map(|h| {
            let frame = Frame::Message(MessageFragment {
                header: h.clone(),
                body_bytes: 10,
                fragment_offset: 0,
                fragment: vec![0; 10],
            });
            frame.to_bytes().expect("encodes").len()
        })
        .sum();
    let hello = Frame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        broker_instance: A,
    })
    .to_bytes()
    .expect("encodes")
    .len();
    // The first and the third (another message type) carry names; the second and the fourth,
    // each like the one before it, do not.
    assert_eq!(batch.len(), hello + literal - 2 * names_bytes);
    b.handle_bytes(now, &batch).expect("a valid batch");
    let received: Vec<MessageHeader> = std::iter::from_fn(|| b.poll_event())
        .filter_map(|e| match e {
            Event::Received(m) => Some(m.header),
            _ => None,
        })
        .collect();
    assert_eq!(received, headers);

    // The next batch starts over: its first message has its names.
    a.send(OutgoingMessage {
        id: 5,
        header: header(1, true, 5),
        body: vec![5; 10].into(),
    })
    .expect("queued");
    let next = a.poll_transmit(now).expect("a batch");
    assert!(matches!(Frame::decode(&next), Ok((Frame::Message(_), _))));
}
