//! Replays the committed `frame_decoder` fuzz corpus (`fuzz/corpus/frame_decoder`) on the stable
//! toolchain, so every seed and every crash the fuzzer ever found (`seed-crash-*`) runs in
//! `cargo test`; and writes the seeds (`write_seed_corpus`, ignored: run it by hand after a
//! format change).
//!
//! The seeds are streams of valid frames made by the public encoder (a Hello first, as a peer
//! sends it; messages in one and several fragments, out of order; Acks for the messages the
//! harness's session has queued; errors; a GoAway), plus the damage the decoder must refuse
//! (bad magic, another version, a frame over the limit, an unknown kind, a cut stream), so that
//! fuzzing starts inside the session instead of spending its time finding the framing.

use std::path::{Path, PathBuf};

use herald_engine::sql::Value;
use herald_net::client::proto::{
    BeginDialog, CLIENT_FRAME_BYTES_MAX, CLIENT_PROTOCOL_VERSION, EndHow, PeerStatus, QueueStatus,
    ReceiveFilter, ReceiveRequest, ReceivedMessage, RemoteError, RemoteErrorKind, Request,
    Response, StatusReport, WAIT_FOREVER_MS,
};
use herald_net::fuzzing::{FUZZ_CONVERSATION_ID, fuzz_client_frame_decoder, fuzz_frame_decoder};
use herald_net::proto::{
    Ack, ErrorFrame, FRAME_BYTES_MAX, Frame, Hello, MessageFragment, MessageHeader,
    OutgoingMessage, PROTOCOL_VERSION, PeerSession,
};

/// The committed seeds; fewer means the corpus went missing and the replay would pass without
/// testing anything.
const SEEDS_MIN: usize = 5;

#[test]
fn frame_decoder_corpus_replays_without_panics() {
    replay("frame_decoder", &corpus_dir(), fuzz_frame_decoder);
}

#[test]
fn client_frame_decoder_corpus_replays_without_panics() {
    replay(
        "client_frame_decoder",
        &client_corpus_dir(),
        fuzz_client_frame_decoder,
    );
}

/// The committed seeds are exactly what `seeds()` and `client_seeds()` make: a format change
/// that forgot to rewrite them fails here instead of silently fuzzing the old format.
#[test]
fn committed_seeds_are_current() {
    check_committed(&corpus_dir(), seeds());
}

#[test]
fn committed_client_seeds_are_current() {
    check_committed(&client_corpus_dir(), client_seeds());
}

#[test]
#[ignore = "writes fuzz/corpus/{frame_decoder,client_frame_decoder}/seed-*; run by hand after a format change"]
fn write_seed_corpus() {
    for (dir, seeds) in [
        (corpus_dir(), seeds()),
        (client_corpus_dir(), client_seeds()),
    ] {
        std::fs::create_dir_all(&dir).expect("creating the corpus directory");
        let mut total = 0;
        for (name, data) in seeds {
            total += data.len();
            std::fs::write(dir.join(format!("seed-{name}")), &data).expect("writing a seed");
        }
        assert!(total < 64 * 1024, "seed corpus of {total} bytes is too big");
    }
}

/// Runs `target` on every file of the corpus in `dir` (at least `SEEDS_MIN` of them seeds);
/// fails naming each file that panicked.
fn replay(target: &str, dir: &Path, run: fn(&[u8])) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("listing a corpus directory").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    let seeds = files.iter().filter(|path| is_seed(path)).count();
    assert!(
        seeds >= SEEDS_MIN,
        "corpus {} holds {seeds} seed-* files, expected at least {SEEDS_MIN}",
        dir.display()
    );
    let panicked: Vec<String> = files
        .iter()
        .filter(|path| {
            let data =
                std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            std::panic::catch_unwind(|| run(&data)).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        panicked.is_empty(),
        "{} of {} {target} corpus files panicked:\n{}",
        panicked.len(),
        files.len(),
        panicked.join("\n")
    );
    eprintln!(
        "replayed {} {target} corpus files ({seeds} seeds)",
        files.len()
    );
}

fn check_committed(dir: &Path, seeds: Vec<(String, Vec<u8>)>) {
    for (name, data) in seeds {
        let path = dir.join(format!("seed-{name}"));
        let committed =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        assert!(
            committed == data,
            "{} is stale: run `cargo test -p herald-net --test fuzz_corpus -- --ignored write_seed_corpus`",
            path.display()
        );
    }
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_decoder")
}

fn client_corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/client_frame_decoder")
}

fn requests(frames: &[Request]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        frame.encode(&mut out).expect("seed requests are valid");
    }
    out
}

fn responses(frames: &[Response]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        frame.encode(&mut out).expect("seed responses are valid");
    }
    out
}

/// Streams of valid client frames in each direction (a session's requests, its responses),
/// and damaged forms.
fn client_seeds() -> Vec<(String, Vec<u8>)> {
    let hello = Request::Hello {
        protocol_version: CLIENT_PROTOCOL_VERSION,
    };
    let session = requests(&[
        hello.clone(),
        Request::Execute {
            script: "CREATE QUEUE Q; SELECT 1 AS one;".into(),
        },
        Request::BeginTransaction,
        Request::BeginDialog(BeginDialog {
            from_service: "//s/From".into(),
            to_service: "//s/To".into(),
            contract: "DEFAULT".into(),
            related_conversation: Some(7),
            related_conversation_group: None,
            lifetime_secs: Some(60),
            target_broker_instance: None,
        }),
        Request::Send {
            handles: vec![7, 8],
            message_type: "DEFAULT".into(),
            body: b"hello".to_vec(),
        },
        Request::Receive(ReceiveRequest {
            queue: "Q".into(),
            top: 10,
            filter: ReceiveFilter::Group(9),
            wait_ms: Some(WAIT_FOREVER_MS),
        }),
        Request::GetConversationGroup {
            queue: "Q".into(),
            wait_ms: None,
        },
        Request::MoveConversation {
            handle: 7,
            group: 8,
        },
        Request::BeginConversationTimer {
            handle: 7,
            timeout_ms: 1000,
        },
        Request::EndConversation {
            handle: 7,
            how: EndHow::Error {
                code: 50,
                description: "no".into(),
            },
        },
        Request::EndConversation {
            handle: 7,
            how: EndHow::Cleanup,
        },
        Request::Commit,
        Request::Rollback,
        Request::Status,
        Request::SessionState,
    ]);
    let answers = responses(&[
        Response::Hello {
            protocol_version: CLIENT_PROTOCOL_VERSION,
            broker_instance: 3,
        },
        Response::Statement {
            statement: "SELECT".into(),
            rows_affected: Some(2),
            result: Some((vec!["a".into(), "b".into()], 2)),
        },
        Response::Values(vec![
            Value::Null,
            Value::Int(-5),
            Value::Text("text".into()),
            Value::Binary(vec![0, 1, 2]),
        ]),
        Response::Statement {
            statement: "SEND".into(),
            rows_affected: None,
            result: None,
        },
        Response::Done,
        Response::Session {
            transaction_count: 1,
        },
        Response::Ok,
        Response::Dialog { handle: 11 },
        Response::Group { group: Some(12) },
        Response::Group { group: None },
        Response::Message(ReceivedMessage {
            conversation_handle: 1,
            conversation_group: 2,
            message_type: "DEFAULT".into(),
            sequence: 0,
            queuing_order: 4,
            status: 1,
            body: b"body".to_vec(),
        }),
        Response::Error(RemoteError {
            kind: RemoteErrorKind::Syntax,
            position: Some((2, 22)),
            statement: None,
            message: "expected SERVICE".into(),
        }),
        Response::Error(RemoteError {
            kind: RemoteErrorKind::NotFound,
            position: Some((1, 1)),
            statement: Some("RECEIVE".into()),
            message: "queue \"X\" does not exist".into(),
        }),
        Response::Status(StatusReport {
            broker_instance: 5,
            queues: vec![QueueStatus {
                name: "Q".into(),
                enabled: true,
                retention: false,
                poison_message_handling: true,
                messages: 3,
                groups_with_messages: 1,
                retained_messages: 0,
            }],
            endpoints_by_state: vec![("CO".into(), 2)],
            transmission_by_status: vec![(String::new(), 1)],
            peers: vec![PeerStatus {
                address: "127.0.0.1:4022".into(),
                fingerprint: Some([9; 32]),
                connected: true,
                unacknowledged_messages: 1,
            }],
            truncated: false,
        }),
    ]);
    let mut seeds = vec![
        ("requests".to_string(), session.clone()),
        ("responses".to_string(), answers.clone()),
        ("hello".to_string(), requests(&[hello])),
    ];
    let mut too_large = session.clone();
    too_large[..4].copy_from_slice(&(CLIENT_FRAME_BYTES_MAX as u32).to_le_bytes());
    seeds.push(("frame-too-large".into(), too_large));
    let mut unknown_kind = answers.clone();
    unknown_kind[4] = 0xee;
    seeds.push(("unknown-kind".into(), unknown_kind));
    let mut bad_magic = session.clone();
    bad_magic[5] = b'X';
    seeds.push(("bad-magic".into(), bad_magic));
    seeds.push(("cut".into(), answers[..answers.len() - 9].to_vec()));
    seeds
}

fn is_seed(path: &Path) -> bool {
    path.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with("seed-"))
}

const PEER: [u8; 16] = [0x33; 16];

fn hello(protocol_version: u16) -> Frame {
    Frame::Hello(Hello {
        protocol_version,
        broker_instance: PEER,
    })
}

fn header(conversation_id: [u8; 16], from_initiator: bool, sequence: u64) -> MessageHeader {
    MessageHeader {
        conversation_id,
        from_initiator,
        sequence,
        source_service: "//seed/source".into(),
        target_service: "//seed/target".into(),
        contract: "//seed/contract".into(),
        message_type: "//seed/type".into(),
        target_broker_instance: sequence.is_multiple_of(2).then_some([0x44; 16]),
        lifetime_deadline_secs: if sequence.is_multiple_of(3) {
            1_900_000_000
        } else {
            0
        },
    }
}

/// `body` cut into fragments of `fragment_bytes`, in the order given by `order`.
fn fragments(
    header: &MessageHeader,
    body: &[u8],
    fragment_bytes: usize,
    order: &[usize],
) -> Vec<Frame> {
    let pieces: Vec<Frame> = if body.is_empty() {
        vec![Frame::Message(MessageFragment {
            header: header.clone(),
            body_bytes: 0,
            fragment_offset: 0,
            fragment: Vec::new(),
        })]
    } else {
        body.chunks(fragment_bytes)
            .enumerate()
            .map(|(i, chunk)| {
                Frame::Message(MessageFragment {
                    header: header.clone(),
                    body_bytes: body.len() as u32,
                    fragment_offset: (i * fragment_bytes) as u32,
                    fragment: chunk.to_vec(),
                })
            })
            .collect()
    };
    order.iter().map(|&i| pieces[i].clone()).collect()
}

fn ack(sequence: u64) -> Frame {
    Frame::Ack(Ack {
        conversation_id: FUZZ_CONVERSATION_ID,
        from_initiator: true,
        sequence,
        broker_instance: PEER,
    })
}

fn stream(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        frame.encode(&mut out).expect("seed frames are valid");
    }
    out
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let body: Vec<u8> = (0..90u8).map(|i| i.wrapping_mul(7)).collect();
    let mut seeds = Vec::new();
    seeds.push(("hello".to_string(), stream(&[hello(PROTOCOL_VERSION)])));

    let mut one = vec![hello(PROTOCOL_VERSION)];
    one.extend(fragments(&header([1; 16], true, 1), b"hello", 16, &[0]));
    one.extend(fragments(&header([1; 16], false, 2), b"", 16, &[0]));
    seeds.push(("messages".into(), stream(&one)));

    let mut fragmented = vec![hello(PROTOCOL_VERSION)];
    fragmented.extend(fragments(
        &header([2; 16], true, 3),
        &body,
        30,
        &[2, 0, 0, 1],
    ));
    fragmented.extend(fragments(&header([2; 16], true, 4), &body, 40, &[0, 2, 1]));
    seeds.push(("fragments-out-of-order".into(), stream(&fragmented)));

    let acks = [
        hello(PROTOCOL_VERSION),
        ack(1),
        ack(1),
        ack(3),
        ack(u64::MAX),
    ];
    seeds.push(("acks".into(), stream(&acks)));

    let error = Frame::Error(ErrorFrame {
        conversation_id: FUZZ_CONVERSATION_ID,
        from_initiator: false,
        code: -8490,
        description: "Service //seed/target not found".into(),
    });
    seeds.push((
        "error-and-go-away".into(),
        stream(&[hello(PROTOCOL_VERSION), error.clone(), Frame::GoAway]),
    ));

    // A session's own batch: its Hello, then messages of one conversation whose names are
    // left out after the first (names as before), as nodes write them.
    let mut session = PeerSession::new([0x22; 16]);
    for sequence in 1..=3 {
        session
            .send(OutgoingMessage {
                id: sequence,
                header: header(FUZZ_CONVERSATION_ID, true, sequence),
                body: body[..10 * sequence as usize].to_vec().into(),
            })
            .expect("a seed message is valid");
    }
    let batch = session
        .poll_transmit(std::time::Instant::now())
        .expect("the batch");
    seeds.push(("names-as-before".into(), batch));

    let mut everything = one.clone();
    everything.extend(fragmented[1..].iter().cloned());
    everything.extend([ack(2), error, Frame::GoAway]);
    seeds.push(("everything".into(), stream(&everything)));

    seeds.push(("no-hello".into(), stream(&one[1..])));
    seeds.push((
        "two-hellos".into(),
        stream(&[hello(PROTOCOL_VERSION), hello(PROTOCOL_VERSION)]),
    ));
    seeds.push((
        "future-version".into(),
        stream(&[hello(PROTOCOL_VERSION + 1)]),
    ));

    let mut bad_magic = stream(&[hello(PROTOCOL_VERSION)]);
    bad_magic[5] = b'X';
    seeds.push(("bad-magic".into(), bad_magic));
    let mut too_large = stream(&one);
    too_large[..4].copy_from_slice(&(FRAME_BYTES_MAX as u32).to_le_bytes());
    seeds.push(("frame-too-large".into(), too_large));
    let mut unknown_kind = stream(&one);
    unknown_kind[4] = 0xee;
    seeds.push(("unknown-kind".into(), unknown_kind));
    let cut = stream(&fragmented);
    seeds.push(("cut".into(), cut[..cut.len() - 17].to_vec()));
    seeds
}
