//! The fuzz harness for the wire protocol, kept here so that it is type-checked with the crate
//! and replayed over the committed corpus by `tests/fuzz_corpus.rs` on stable.

use std::time::{Duration, Instant};

use crate::error::Error;
use crate::proto::{Event, Frame, FrameDecoder, MessageHeader, OutgoingMessage, PeerSession};

/// The conversation the harness's session has messages queued on, so that Ack frames in the
/// input (the seeds carry some) find something to acknowledge.
pub const FUZZ_CONVERSATION_ID: [u8; 16] = [0x11; 16];

/// Feeds `data` to the frame decoder and to a [`PeerSession`]. Panics only on a bug:
///
/// - decoding in arbitrary chunks yields exactly the frames and error of decoding whole;
/// - every decoded frame encodes, and decodes back to itself;
/// - the session returns errors, never panics, on any input, and its invariants hold
///   (in-flight bytes and reassembly within their limits).
pub fn fuzz_frame_decoder(data: &[u8]) {
    let whole = decode_whole(data);
    let chunked = decode_chunked(data, data.len() as u64 ^ 0x9e37_79b9);
    assert_eq!(
        whole, chunked,
        "chunked decoding differs from whole decoding"
    );
    for frame in &whole.0 {
        let bytes = frame.to_bytes().expect("a decoded frame encodes");
        let (again, used) = Frame::decode(&bytes).expect("an encoded frame decodes");
        assert_eq!(used, bytes.len());
        assert_eq!(&again, frame, "decode(encode(frame)) differs");
    }
    drive_session(data);
}

/// Frames decoded one at a time from the whole input, and the error that stopped decoding
/// (`None` if the input ended, possibly inside a frame).
type Decoded = (Vec<Frame>, Option<Error>);

/// One decoder given the whole input at once (a Message may take its names from the one before
/// it, so frames are decoded in the stream's context, as the session does).
fn decode_whole(data: &[u8]) -> Decoded {
    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        match decoder.decode(&mut rest) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
    (frames, None)
}

fn decode_chunked(data: &[u8], seed: u64) -> Decoded {
    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut sizes = Chunks::new(seed);
    let mut rest = data;
    while !rest.is_empty() {
        let (mut chunk, after) = rest.split_at(sizes.next_size().min(rest.len()));
        rest = after;
        while !chunk.is_empty() {
            match decoder.decode(&mut chunk) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => assert!(chunk.is_empty(), "decoder stopped with input left"),
                Err(e) => {
                    assert_eq!(
                        decoder.decode(&mut &b"x"[..]),
                        Err(Error::DecoderFailed),
                        "a failed decoder must stay failed"
                    );
                    return (frames, Some(e));
                }
            }
        }
    }
    (frames, None)
}

/// Feeds `data` to a session with messages queued, in chunks, advancing synthetic time,
/// polling everything and acknowledging what it receives; on an error it resets (as a driver
/// closing the connection would) and feeds the rest.
fn drive_session(data: &[u8]) {
    let start = Instant::now();
    let mut session = PeerSession::new([0x22; 16]);
    for sequence in 1..=3u64 {
        let header = MessageHeader {
            conversation_id: FUZZ_CONVERSATION_ID,
            from_initiator: true,
            sequence,
            source_service: "fuzz-source".into(),
            target_service: "fuzz-target".into(),
            contract: "DEFAULT".into(),
            message_type: "DEFAULT".into(),
            target_broker_instance: None,
            lifetime_deadline_secs: 0,
        };
        let body = vec![sequence as u8; 100 * sequence as usize].into();
        session
            .send(OutgoingMessage {
                id: sequence,
                header,
                body,
            })
            .expect("a valid message is accepted");
    }
    let mut sizes = Chunks::new(data.len() as u64);
    let mut rest = data;
    let mut now = start;
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(sizes.next_size().min(rest.len()));
        rest = after;
        now += Duration::from_millis(700);
        if session.handle_bytes(now, chunk).is_err() {
            session.reset();
        }
        session.handle_timeout(now);
        while session.poll_transmit(now).is_some() {}
        while let Some(event) = session.poll_event() {
            if let Event::Received(message) = event {
                let h = &message.header;
                session.acknowledge(h.conversation_id, h.from_initiator, h.sequence);
            }
        }
        assert!(session.in_flight_bytes() <= crate::proto::IN_FLIGHT_BYTES_MAX);
        assert!(session.reassembler().buffered_bytes() <= crate::proto::REASSEMBLY_BYTES_MAX);
    }
}

/// Chunk sizes from a small deterministic generator: mostly short, sometimes long, so that
/// frame boundaries fall everywhere.
struct Chunks(u64);

impl Chunks {
    fn new(seed: u64) -> Chunks {
        Chunks(seed | 1)
    }

    fn next_size(&mut self) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let r = (self.0 >> 33) as usize;
        if r.is_multiple_of(8) {
            1 + r % 4096
        } else {
            1 + r % 17
        }
    }
}

/// Feeds `data` to the client protocol's frame decoders, as requests (what a node reads) and
/// as responses (what a client reads). Panics only on a bug:
///
/// - decoding in arbitrary chunks yields exactly the frames and error of decoding whole;
/// - every decoded frame encodes, and decodes back to itself (the encoding is canonical).
pub fn fuzz_client_frame_decoder(data: &[u8]) {
    use crate::client::proto::{
        ClientFrame, ClientFrameDecoder, Request, Response, decode_request, decode_response,
    };

    fn check<F: ClientFrame + PartialEq + std::fmt::Debug>(
        data: &[u8],
        whole: fn(&[u8]) -> crate::Result<(F, usize)>,
        decoder: fn() -> ClientFrameDecoder,
        encode: fn(&F) -> crate::Result<Vec<u8>>,
    ) {
        let mut frames = Vec::new();
        let mut error = None;
        let mut at = 0;
        while at < data.len() {
            match whole(&data[at..]) {
                Ok((frame, used)) => {
                    frames.push(frame);
                    at += used;
                }
                Err(Error::Truncated { .. }) => break,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let mut chunked = Vec::new();
        let mut chunked_error = None;
        let mut stream = decoder();
        let mut sizes = Chunks::new(data.len() as u64 ^ 0x5bd1_e995);
        let mut rest = data;
        'outer: while !rest.is_empty() {
            let (mut chunk, after) = rest.split_at(sizes.next_size().min(rest.len()));
            rest = after;
            while !chunk.is_empty() {
                match stream.decode::<F>(&mut chunk) {
                    Ok(Some(frame)) => chunked.push(frame),
                    Ok(None) => assert!(chunk.is_empty(), "decoder stopped with input left"),
                    Err(e) => {
                        assert_eq!(
                            stream.decode::<F>(&mut &b"x"[..]),
                            Err(Error::DecoderFailed),
                            "a failed decoder must stay failed"
                        );
                        chunked_error = Some(e);
                        break 'outer;
                    }
                }
            }
        }
        assert_eq!(
            frames, chunked,
            "chunked decoding differs from whole decoding"
        );
        assert_eq!(error, chunked_error, "chunked decoding failed differently");
        for frame in &frames {
            let bytes = encode(frame).expect("a decoded frame encodes");
            let (again, used) = whole(&bytes).expect("an encoded frame decodes");
            assert_eq!(used, bytes.len());
            assert_eq!(&again, frame, "decode(encode(frame)) differs");
        }
    }

    check::<Request>(
        data,
        decode_request,
        ClientFrameDecoder::requests,
        Request::to_bytes,
    );
    check::<Response>(
        data,
        decode_response,
        ClientFrameDecoder::responses,
        Response::to_bytes,
    );
}
