//! Replays the committed corpora of the `commit_record` and `statement_parser` fuzz targets
//! (`fuzz/corpus/<target>`) on the stable toolchain, so that every seed, and every crash the
//! fuzzer ever found (`seed-crash-*`), runs in `cargo test`; and writes the `commit_record` seeds
//! (`write_seed_corpus`, ignored: run it by hand after a change to the record format).
//!
//! The `statement_parser` seeds are T-SQL scripts written by hand (the single-database tutorial,
//! every statement form, comments and `GO`); each must parse, except `seed-errors*`, which must
//! not, so that a seed never silently stops reaching the parser's depths.
//!
//! The seeds are real commit records, built with `record::encode` from the ops the engine logs
//! (every catalog change, dialogs with and without a local target, sends with bodies of several
//! sizes, receives, compaction's relocations), so that fuzzing starts from well-formed records and mutates them, instead of
//! spending its time finding the version byte and the op tags.

use std::path::{Path, PathBuf};

use herald_engine::record::{self, DialogRecord, End, Op, RemoteDialogRecord};
use herald_engine::{
    BrokerInstanceId, BrokerPriority, ConversationGroupId, ConversationHandle, ConversationId,
    QueueOptions, Route, RouteAddress, SentBy, Validation, system,
};
use herald_engine::{MessageKey, UrgentLane};

/// The committed seeds; fewer means the corpus went missing and the replay below would pass
/// without testing anything.
const SEEDS_MIN: usize = 5;
const TARGET: &str = "commit_record";
const STATEMENT_PARSER: &str = "statement_parser";

#[test]
fn commit_record_corpus_replays_without_panics() {
    replay(TARGET, record::fuzz_decode);
}

#[test]
fn statement_parser_corpus_replays_without_panics() {
    let files = replay(STATEMENT_PARSER, herald_engine::sql::fuzz_parse);
    for path in files.iter().filter(|path| is_seed(path)) {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("reading {} as text: {e}", path.display()));
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let parsed = herald_engine::sql::parse(&text);
        if name.starts_with("seed-errors") {
            assert!(parsed.is_err(), "{} must not parse", path.display());
        } else if !name.starts_with("seed-crash-") {
            let statements =
                parsed.unwrap_or_else(|e| panic!("seed {} does not parse: {e}", path.display()));
            assert!(
                !statements.is_empty(),
                "seed {} holds no statement",
                path.display()
            );
        }
    }
}

/// Runs `fuzz` over every file of `target`'s corpus, checking that none panics and that the
/// corpus holds at least `SEEDS_MIN` seeds; returns the files.
fn replay(target: &str, fuzz: fn(&[u8])) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("listing the corpus directory").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    let seeds = files.iter().filter(|path| is_seed(path)).count();
    assert!(
        seeds >= SEEDS_MIN,
        "corpus {} holds {seeds} seed-* files, expected at least {SEEDS_MIN}",
        dir.display()
    );
    let mut panicked = Vec::new();
    for path in &files {
        let data =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        if std::panic::catch_unwind(|| fuzz(&data)).is_err() {
            panicked.push(path.display().to_string());
        }
    }
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
    files
}

/// Writes `fuzz/corpus/commit_record/seed-*`, after checking that each seed decodes to as many
/// ops as it was built from (so a seed never silently turns into a rejected input).
#[test]
#[ignore = "writes fuzz/corpus/commit_record/seed-*; run by hand after a record format change"]
fn write_seed_corpus() {
    let dir = corpus_dir(TARGET);
    std::fs::create_dir_all(&dir).expect("creating the corpus directory");
    let mut total = 0;
    for (name, ops) in seeds() {
        let data = record::encode(&ops);
        let decoded =
            record::decode(&data).unwrap_or_else(|e| panic!("seed {name} does not decode: {e}"));
        assert_eq!(decoded.len(), ops.len(), "seed {name}: ops decoded");
        record::fuzz_decode(&data);
        total += data.len();
        std::fs::write(dir.join(format!("seed-{name}")), &data).expect("writing a seed");
    }
    assert!(total < 64 * 1024, "seed corpus of {total} bytes is too big");
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn is_seed(path: &Path) -> bool {
    path.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with("seed-"))
}

fn seeds() -> Vec<(&'static str, Vec<Op>)> {
    let handle = ConversationHandle(0x1111_2222_3333_4444_5555_6666_7777_8888);
    let target = ConversationHandle(0x9999_aaaa_bbbb_cccc_dddd_eeee_ffff_0001);
    let dialog = |target: Option<(ConversationHandle, ConversationGroupId)>, expires_at_ms| {
        Op::BeginDialog(DialogRecord {
            handle,
            conversation_id: ConversationId(0x0c0c_0c0c_0c0c_0c0c_0c0c_0c0c_0c0c_0c0c),
            group: ConversationGroupId(0x0909_0909_0909_0909_0909_0909_0909_0909),
            from_service: "//shop/ClientService".into(),
            to_service: "//shop/OrderService".into(),
            contract: "//shop/OrderContract".into(),
            expires_at_ms,
            target,
            far_broker_instance: target
                .is_none()
                .then_some(BrokerInstanceId(0x4444_4444_4444_4444_4444_4444_4444_4444)),
        })
    };
    let send = |handle, sequence, body: &[u8]| Op::Send {
        handle,
        message_type: "//shop/Order".into(),
        sequence,
        body: body.to_vec(),
        body_range: 0..0,
    };
    let all_flags = |flags: u8| QueueOptions {
        enabled: flags & 1 != 0,
        retention: flags & 2 != 0,
        poison_message_handling: flags & 4 != 0,
    };
    vec![
        ("empty", Vec::new()),
        (
            "catalog",
            vec![
                Op::CreateMessageType {
                    name: "//shop/Order".into(),
                    validation: Validation::None,
                },
                Op::CreateMessageType {
                    name: "//shop/Empty".into(),
                    validation: Validation::Empty,
                },
                Op::CreateMessageType {
                    name: "//shop/Text".into(),
                    validation: Validation::Utf8,
                },
                Op::CreateMessageType {
                    name: "//shop/Json".into(),
                    validation: Validation::Json,
                },
                Op::CreateMessageType {
                    name: "//shop/Xml".into(),
                    validation: Validation::WellFormedXml,
                },
                Op::CreateContract {
                    name: "//shop/OrderContract".into(),
                    messages: vec![
                        ("//shop/Order".into(), SentBy::Initiator),
                        ("//shop/Text".into(), SentBy::Target),
                        ("//shop/Json".into(), SentBy::Any),
                    ],
                },
                Op::CreateQueue {
                    name: "OrderQueue".into(),
                    options: QueueOptions::default(),
                },
                Op::CreateQueue {
                    name: "ClientQueue".into(),
                    options: all_flags(0),
                },
                Op::AlterQueue {
                    name: "ClientQueue".into(),
                    options: all_flags(0b111),
                },
                Op::CreateService {
                    name: "//shop/OrderService".into(),
                    queue: "OrderQueue".into(),
                    contracts: vec!["//shop/OrderContract".into(), "DEFAULT".into()],
                },
                Op::CreateService {
                    name: "//shop/ClientService".into(),
                    queue: "ClientQueue".into(),
                    contracts: Vec::new(),
                },
            ],
        ),
        (
            "catalog-drops",
            vec![
                Op::DropService {
                    name: "//shop/ClientService".into(),
                },
                Op::DropQueue {
                    name: "ClientQueue".into(),
                },
                Op::DropContract {
                    name: "//shop/OrderContract".into(),
                },
                Op::DropMessageType {
                    name: "//shop/Xml".into(),
                },
            ],
        ),
        (
            "dialog-and-sends",
            vec![
                dialog(
                    Some((
                        target,
                        ConversationGroupId(0x0d0d_0d0d_0d0d_0d0d_0d0d_0d0d_0d0d_0d0d),
                    )),
                    3600,
                ),
                send(handle, 0, b""),
                send(handle, 1, b"{\"order\": 1}"),
                send(handle, 2, &[0xa5; 300]),
            ],
        ),
        (
            "dialog-remote-target",
            vec![dialog(None, 0), send(handle, 0, b"order 1")],
        ),
        (
            "receive-and-reply",
            vec![
                Op::Receive {
                    handle: target,
                    through_sequence: 2,
                },
                Op::Send {
                    handle: target,
                    message_type: "//shop/Receipt".into(),
                    sequence: 0,
                    body: b"ok".to_vec(),
                    body_range: 0..0,
                },
                Op::Receive {
                    handle,
                    through_sequence: u64::MAX,
                },
            ],
        ),
        (
            "many-sends",
            (0..40)
                .map(|sequence| send(handle, sequence, &sequence.to_le_bytes()))
                .collect(),
        ),
        (
            "large-body",
            vec![send(
                target,
                7,
                &(0..4096u32)
                    .map(|i| (i * 31 % 251) as u8)
                    .collect::<Vec<u8>>(),
            )],
        ),
        (
            "relocate",
            vec![
                Op::Relocate {
                    handle: target,
                    key: MessageKey::Sequence(3),
                    body: b"{\"order\": 3}".to_vec(),
                    body_range: 0..0,
                },
                Op::Relocate {
                    handle: target,
                    key: MessageKey::Urgent {
                        lane: UrgentLane::DialogTimer,
                        queuing_order: 4,
                    },
                    body: Vec::new(),
                    body_range: 0..0,
                },
            ],
        ),
        (
            "remote",
            vec![
                Op::CreateRoute(Route {
                    name: "to-b".into(),
                    service_name: Some("//shop/OrderService".into()),
                    broker_instance: Some(BrokerInstanceId(0x4444)),
                    address: RouteAddress::parse("quic://node-b:4022").unwrap(),
                    expires_at_ms: Some(1_700_000_060_000),
                }),
                Op::AlterRoute(Route {
                    name: "to-b".into(),
                    service_name: None,
                    broker_instance: None,
                    address: RouteAddress::Local,
                    expires_at_ms: None,
                }),
                Op::AcceptDialog(RemoteDialogRecord {
                    handle: target,
                    conversation_id: ConversationId(0x0c0c),
                    group: ConversationGroupId(0x0d0d),
                    service: "//shop/OrderService".into(),
                    far_service: "//shop/ClientService".into(),
                    contract: "//shop/OrderContract".into(),
                    far_broker_instance: BrokerInstanceId(0x4444),
                    expires_at_ms: 0,
                }),
                Op::Arrive {
                    handle: target,
                    sequence: 0,
                    message_type: "//shop/Order".into(),
                    body: b"{\"order\": 1}".to_vec(),
                    body_range: 0..0,
                },
                Op::Transmitted {
                    ids: vec![7, 8, 9],
                    far_broker_instance: Some(BrokerInstanceId(0x4444)),
                },
                Op::Fail {
                    handle,
                    code: -8408,
                    body: system::error_body(-8408, "contract not accepted"),
                    body_range: 0..0,
                },
                Op::DropRoute {
                    name: "to-b".into(),
                },
            ],
        ),
        (
            "life-cycle",
            vec![
                Op::SetTimer {
                    handle,
                    deadline_ms: 1_700_000_000_000,
                },
                Op::FireTimer {
                    handle,
                    deadline_ms: 1_700_000_000_000,
                },
                Op::ReceiveUrgent {
                    handle,
                    queuing_order: 12,
                },
                Op::Expire {
                    handle: target,
                    body: system::lifetime_expired_body(),
                    body_range: 0..0,
                },
                Op::EndConversation {
                    handle,
                    end: End::Error {
                        code: 500,
                        body: system::error_body(500, "out of stock"),
                        body_range: 0..0,
                    },
                },
                Op::EndConversation {
                    handle: target,
                    end: End::Plain,
                },
                Op::EndConversation {
                    handle: target,
                    end: End::Cleanup,
                },
                Op::DisableQueue {
                    name: "OrderQueue".into(),
                },
                Op::CreateBrokerPriority(BrokerPriority {
                    name: "rush".into(),
                    contract: Some("//shop/OrderContract".into()),
                    local_service: None,
                    remote_service: Some("//shop/ClientService".into()),
                    level: 9,
                }),
                Op::DropBrokerPriority {
                    name: "rush".into(),
                },
            ],
        ),
        (
            "unicode-names",
            vec![
                Op::CreateMessageType {
                    name: "//ünïcødé/メッセージ".into(),
                    validation: Validation::Utf8,
                },
                Op::CreateQueue {
                    name: "q".repeat(300),
                    options: QueueOptions::default(),
                },
            ],
        ),
    ]
}
