//! Crash test of the engine with real processes: round after round, a writer process
//! (`engine_crash_writer`) runs SEND and RECEIVE transactions, END CONVERSATIONs, conversation
//! timers and poison-message rollbacks on one broker directory from several threads and is
//! killed with SIGKILL at a random moment; the test then reopens the broker and checks what it
//! recovered against what the writer acknowledged.
//!
//! The writer prints a `pending` line before each commit and a `commit` line after it returned
//! (`herald_tests::engine_crash`). A transaction with a `commit` line must have committed; one
//! with only a `pending` line (at most one per writer thread) may have, or not; one without a
//! line cannot have. After every kill the test receives everything queued, and checks:
//! - every message found verifies by its content (body bytes, message type, queue), and was sent
//!   by a transaction that committed: nothing unacknowledged surfaces unless its transaction was
//!   about to commit;
//! - every message a committed transaction sent is either still queued, or was received by a
//!   committed transaction; nothing received by a committed transaction is queued again, and no
//!   message was received twice;
//! - each transaction committed entirely or not at all: a `pending` transaction's sends surfaced
//!   (queued, or named by a receive) if and only if its receives are gone from the queues;
//! - per conversation and direction, the committed sends have sequence numbers 0, 1, 2, … with no
//!   gap, the received ones are a prefix of them and the queued ones the rest, in order; the
//!   sequence numbers the writer acknowledged are the ones the engine assigned, and the two
//!   endpoints of each conversation pair up consistently;
//! - the recovered conversation endpoints are exactly those of the committed dialogs, each with
//!   its far side, and with the send and receive sequence numbers its committed sends and
//!   receives left (so they continue where they were);
//! - the catalog exists once its transaction committed;
//! - life-cycle dialogs (their own services and queues, which nobody receives from): each
//!   committed dialog's endpoints exist, and none of an uncommitted one; an ended initiator is
//!   closed with nothing queued (END purges its side), and its target got exactly one EndDialog
//!   (state DI, after the dialog's requests, in sequence, and nothing after it) or exactly one
//!   Error with the code and description sent (state ER, ahead of the requests); once the
//!   target ended too, both endpoints are gone;
//!   a dialog with a committed conversation timer either still has it pending with a deadline
//!   within what the writer saw and after the time the test opened the broker at, or has
//!   exactly one DialogTimer message queued and no timer pending, and once fired it stays so
//!   (nothing fires twice); a pending END or timer shows all of its effects or none;
//! - the poison queue is disabled exactly when the last committed (acknowledged, or pending
//!   and evidently committed) change of its status was a disabling fifth rollback: the status
//!   is a logged catalog change and survives the kill.
//!
//! The test opens the broker on a `ManualClock` set to the system clock's time just before it
//! opens: timers due by then fire as it opens, and none fires while it inspects.
//!
//! The broker checkpoints every 256 KiB of log (and releases and compacts segments), so kills
//! land in those too and recovery starts from a checkpoint; in some rounds the test also takes a
//! checkpoint itself after inspecting, so the next writer starts from a checkpoint written right
//! after a recovery.
//!
//! The test inspects by RECEIVE inside a transaction that it rolls back, then receives again to
//! check the rollback put everything back; so the queues carry over, and messages sent in early
//! rounds meet many recoveries before a later writer receives them. Its model
//! (every committed message, queued or received) carries over too.
//!
//! The kill schedule is a function of a seed, printed at the start (`HERALD_CRASH_SEED=<n>`
//! replays it; the writer's timing still varies from run to run).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use herald_engine::{
    Broker, Clock, ConversationEndpoint, ConversationGroupId, ConversationHandle, EndpointState,
    Error, ManualClock, Options, Receive, SystemClock, system,
};
use herald_tests::engine_crash::{
    BodyId, BodyKind, INITIATOR_QUEUE, INITIATOR_SERVICE, LIFE_BODY, LIFE_INITIATOR_QUEUE,
    LIFE_INITIATOR_SERVICE, LIFE_TARGET_QUEUE, LIFE_TARGET_SERVICE, POISON_QUEUE, Phase,
    REQUEST_TYPE, TARGET_QUEUE, TARGET_SERVICE, TxLine, TxOp, crash_broker_options,
    error_description, parse_lines, verify_body,
};
use herald_tests::kill::{Kill, crash_seed, run_until_killed};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// One round in this many kills the writer at a random moment after spawning it: while it opens
/// and recovers the broker, creates the catalog, or before its first commit returns.
const BLIND_KILL_ONE_IN: u32 = 5;
const BLIND_KILL_MS_MAX: u64 = 60;
/// Other rounds kill the writer this long after its first `commit` line.
const KILL_AFTER_ACK_MS: std::ops::RangeInclusive<u64> = 5..=150;
/// One round in this many, the test takes a checkpoint after inspecting.
const TEST_CHECKPOINT_ONE_IN: u32 = 4;
/// How many messages the test takes per RECEIVE while inspecting.
const INSPECT_TOP: usize = 1000;

#[test]
fn acknowledged_transactions_survive_sigkill() {
    run_crash_rounds(60);
}

#[test]
#[ignore = "long: 300 kill rounds (run with `cargo test -p herald-tests -- --ignored`)"]
fn acknowledged_transactions_survive_sigkill_long() {
    run_crash_rounds(300);
}

fn run_crash_rounds(rounds: u32) {
    let seed = crash_seed("engine_crash", rounds);
    let mut rng = SmallRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().expect("creating a temporary directory");
    let dir = tmp.path().join("broker");
    let mut model = Model::default();
    let mut stats = Stats::default();
    let started = Instant::now();
    for round in 1..=rounds {
        let kill = if rng.gen_range(0..BLIND_KILL_ONE_IN) == 0 {
            Kill::Blind(Duration::from_millis(rng.gen_range(0..=BLIND_KILL_MS_MAX)))
        } else {
            Kill::AfterFirstAck(Duration::from_millis(rng.gen_range(KILL_AFTER_ACK_MS)))
        };
        let checkpoint = rng.gen_range(0..TEST_CHECKPOINT_ONE_IN) == 0;
        run_round(&dir, round, kill, checkpoint, &mut model, &mut stats);
    }
    eprintln!(
        "engine_crash: {rounds} rounds in {:.1?} (seed {seed}), {} blind kills: {} commits \
         acknowledged ({} sends of which {} replies, {} receives); {} pending transactions had \
         committed, {} had not; {} dialogs; {} messages committed, {} still queued (at most {} \
         at once); {} checkpoints by the test; log on disk at most {} KiB, {} KiB at the end",
        started.elapsed(),
        stats.blind_kills,
        stats.commits_acked,
        stats.sends_acked,
        stats.replies_acked,
        stats.receives_acked,
        stats.pending_committed,
        stats.pending_not_committed,
        model.initiators.len(),
        model.messages.len(),
        model.queued.len(),
        stats.queued_max,
        stats.test_checkpoints,
        stats.log_bytes_max / 1024,
        stats.log_bytes_last / 1024,
    );
    eprintln!(
        "engine_crash: life cycle: {} dialogs; acknowledged {} plain ends, {} ends with error, {} \
         target ends, {} timers, {} poison disables and {} enables; timer checks found {} \
         pending and {} fired; {} pending life-cycle or poison transactions had committed, {} had not",
        model.life.len(),
        stats.ends_plain_acked,
        stats.ends_error_acked,
        stats.target_ends_acked,
        stats.timers_acked,
        stats.disables_acked,
        stats.enables_acked,
        stats.timers_pending_seen,
        stats.timers_fired_seen,
        stats.life_pending_committed,
        stats.life_pending_not_committed,
    );
    // A run that acknowledged nothing checked nothing.
    assert!(
        stats.sends_acked > 0 && stats.receives_acked > 0,
        "seed {seed}: the writer acknowledged {} sends and {} receives in {rounds} rounds",
        stats.sends_acked,
        stats.receives_acked
    );
    for (count, what) in [
        (stats.ends_plain_acked, "plain END"),
        (stats.ends_error_acked, "END WITH ERROR"),
        (
            stats.target_ends_acked,
            "END of a target (removing the dialog)",
        ),
        (stats.timers_acked, "conversation timer"),
        (stats.timers_fired_seen, "fired timer seen"),
        (stats.disables_acked, "poison disable"),
        (stats.enables_acked, "poison queue re-enable"),
    ] {
        assert!(
            count > 0,
            "seed {seed}: no {what} in {rounds} rounds: {stats:?}"
        );
    }
}

#[derive(Debug, Default)]
struct Stats {
    blind_kills: u32,
    commits_acked: u64,
    sends_acked: u64,
    replies_acked: u64,
    receives_acked: u64,
    pending_committed: u64,
    pending_not_committed: u64,
    queued_max: usize,
    test_checkpoints: u32,
    log_bytes_max: u64,
    log_bytes_last: u64,
    ends_plain_acked: u64,
    ends_error_acked: u64,
    target_ends_acked: u64,
    timers_acked: u64,
    disables_acked: u64,
    enables_acked: u64,
    /// Checks that found a committed timer pending, or fired.
    timers_pending_seen: u64,
    timers_fired_seen: u64,
    life_pending_committed: u64,
    life_pending_not_committed: u64,
}

/// Everything committed so far, as far as the test knows.
#[derive(Debug, Default)]
struct Model {
    catalog: bool,
    /// Every message a committed transaction sent.
    messages: HashMap<BodyId, Sent>,
    /// The ones no committed transaction received yet.
    queued: HashSet<BodyId>,
    /// The messages each endpoint sent.
    by_sender: HashMap<ConversationHandle, Vec<BodyId>>,
    /// How many messages each endpoint received.
    receives: HashMap<ConversationHandle, u64>,
    /// Initiator handles of the dialogs begun (requests are sent on them, replies on the others).
    initiators: HashSet<ConversationHandle>,
    /// Each endpoint's far side, both ways, as learned from sends and receives.
    far: HashMap<ConversationHandle, ConversationHandle>,
    /// The conversation group of each receiving endpoint found with queued messages: it never
    /// changes.
    groups: HashMap<ConversationHandle, ConversationGroupId>,
    /// The committed life-cycle dialogs, by initiator handle.
    life: HashMap<ConversationHandle, LifeDialog>,
    /// Whether the last committed change of the poison queue's status disabled it.
    poison_disabled: bool,
}

/// A committed life-cycle dialog, as the committed transactions left it.
#[derive(Debug, Default)]
struct LifeDialog {
    /// Requests sent (sequences 0..requests) when it began.
    requests: u64,
    /// The initiator ended: plainly (`None`) or WITH ERROR = code.
    ended: Option<Option<i32>>,
    /// The target (this handle) ended too: both endpoints are gone.
    target_ended: Option<ConversationHandle>,
    /// The conversation timer: its deadline is within these bounds.
    timer: Option<(u64, u64)>,
    /// A check found the timer fired.
    fired: bool,
}

/// The life-cycle dialogs and the poison queue as recovered.
#[derive(Debug)]
struct LifeFound {
    /// Every endpoint, by handle.
    endpoints: HashMap<ConversationHandle, ConversationEndpoint>,
    /// The messages queued in the life-cycle queues, per receiving endpoint, in receive order:
    /// (type, sequence, body).
    messages: HashMap<ConversationHandle, Vec<(String, u64, Vec<u8>)>>,
    /// The poison queue's status, if it exists.
    poison_enabled: Option<bool>,
}

impl LifeFound {
    fn queued(&self, handle: &ConversationHandle) -> &[(String, u64, Vec<u8>)] {
        self.messages.get(handle).map_or(&[], Vec::as_slice)
    }
}

#[derive(Debug)]
struct Sent {
    sender: ConversationHandle,
    sequence: u64,
    kind: BodyKind,
    /// Who received it: (round, thread, transaction).
    received_by: Option<(u32, u8, u64)>,
}

impl Model {
    /// Records that `a` and `b` are the two endpoints of one conversation.
    fn pair(&mut self, a: ConversationHandle, b: ConversationHandle) -> Result<(), String> {
        for (this, that) in [(a, b), (b, a)] {
            match self.far.get(&this) {
                Some(known) if *known != that => {
                    return Err(format!(
                        "endpoint {this} pairs with {that} here but with {known} before"
                    ));
                }
                _ => {}
            }
        }
        if a == b {
            return Err(format!("endpoint {a} pairs with itself"));
        }
        self.far.insert(a, b);
        self.far.insert(b, a);
        Ok(())
    }
}

/// One transaction of the writer: its lines, merged.
#[derive(Debug)]
struct Tx {
    thread: u8,
    number: u64,
    ops: Vec<TxOp>,
    /// It has a `commit` line.
    acked: bool,
}

impl std::fmt::Display for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} transaction {} of thread {}",
            if self.acked {
                "acknowledged"
            } else {
                "pending"
            },
            self.number,
            self.thread
        )
    }
}

/// A message found queued after recovery.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Found {
    receiver: ConversationHandle,
    sequence: u64,
    body: BodyId,
    group: ConversationGroupId,
    /// Its body's kind (which matches its type and its queue).
    kind: BodyKind,
}

fn run_round(
    dir: &Path,
    round: u32,
    kill: Kill,
    checkpoint: bool,
    model: &mut Model,
    stats: &mut Stats,
) {
    let lines = run_writer_until_killed(dir, round, kill);
    stats.blind_kills += u32::from(matches!(kill, Kill::Blind(_)));
    let txs = transactions(round, &lines);
    // Time stands still at `opened_ms` while the test inspects: what was due fired at open.
    let opened_ms = SystemClock.now_ms();
    let options = Options {
        clock: ManualClock::new(opened_ms),
        ..crash_broker_options()
    };
    let broker = Broker::open(dir, options)
        .unwrap_or_else(|e| panic!("round {round}: reopening the broker failed: {e}"));
    let (catalog, found) = inspect(&broker, round);
    let life = inspect_life(&broker, round);
    let endpoints: Vec<ConversationEndpoint> = broker
        .conversation_endpoints()
        .into_iter()
        .filter(|e| [INITIATOR_SERVICE, TARGET_SERVICE].contains(&&*e.service))
        .collect();
    if checkpoint {
        broker
            .checkpoint()
            .unwrap_or_else(|e| panic!("round {round}: checkpoint after recovery failed: {e}"));
        stats.test_checkpoints += 1;
    }
    stats.log_bytes_last = broker.log_bytes_on_disk();
    stats.log_bytes_max = stats.log_bytes_max.max(stats.log_bytes_last);
    drop(broker);

    let committed = decide(round, &txs, catalog, &found, &life, stats);
    let touched = apply(round, &committed, model);
    if model.catalog {
        assert!(catalog, "round {round}: the committed catalog is gone");
        assert_eq!(
            life.poison_enabled,
            Some(!model.poison_disabled),
            "round {round}: the poison queue's status is not the last committed one"
        );
    }
    check_life(round, model, &life, opened_ms, stats);
    compare(round, model, &found);
    for sender in touched {
        check_conversation(round, model, sender);
    }
    check_endpoints(round, model, &endpoints);
    for tx in txs.iter().filter(|tx| tx.acked) {
        stats.commits_acked += 1;
        for op in &tx.ops {
            match op {
                TxOp::Send { body, .. } => {
                    stats.sends_acked += 1;
                    if model.messages[body].kind == BodyKind::Reply {
                        stats.replies_acked += 1;
                    }
                }
                TxOp::Receive { .. } => stats.receives_acked += 1,
                TxOp::End { error: None, .. } => stats.ends_plain_acked += 1,
                TxOp::End { error: Some(_), .. } => stats.ends_error_acked += 1,
                TxOp::EndTarget { .. } => stats.target_ends_acked += 1,
                TxOp::Timer { .. } => stats.timers_acked += 1,
                TxOp::Disable => stats.disables_acked += 1,
                TxOp::Enable => stats.enables_acked += 1,
                TxOp::Catalog | TxOp::Begin { .. } | TxOp::LifeBegin { .. } => {}
            }
        }
    }
    stats.queued_max = stats.queued_max.max(model.queued.len());
}

/// Merges the writer's lines into transactions, checking that each `commit` line repeats its
/// `pending` line, and that each thread has at most one transaction without a `commit` line:
/// its last.
fn transactions(round: u32, lines: &[TxLine]) -> Vec<Tx> {
    /// A transaction's `pending` and `commit` lines, as far as printed.
    #[derive(Default)]
    struct Printed<'l> {
        pending: Option<&'l TxLine>,
        commit: Option<&'l TxLine>,
    }
    let mut by_key: BTreeMap<(u8, u64), Printed<'_>> = BTreeMap::new();
    for line in lines {
        assert_eq!(
            line.round, round,
            "round {round}: the writer printed a line of round {}",
            line.round
        );
        let entry = by_key.entry((line.thread, line.tx)).or_default();
        let slot = match line.phase {
            Phase::Pending => &mut entry.pending,
            Phase::Commit => &mut entry.commit,
        };
        assert!(
            slot.replace(line).is_none(),
            "round {round}: line printed twice: {line:?}"
        );
    }
    let mut txs = Vec::new();
    let mut unacked_threads = HashSet::new();
    let mut expected_next: HashMap<u8, u64> = HashMap::new();
    for ((thread, number), Printed { pending, commit }) in by_key {
        let next = expected_next.entry(thread).or_insert(0);
        assert_eq!(
            number,
            *next,
            "round {round}: thread {thread} printed transaction {number} after {}",
            number.wrapping_sub(1)
        );
        *next += 1;
        let pending = pending.unwrap_or_else(|| {
            panic!("round {round}: transaction {number} of thread {thread} has no pending line")
        });
        if let Some(commit) = commit {
            assert_eq!(
                commit.ops, pending.ops,
                "round {round}: transaction {number} of thread {thread} committed other ops \
                 than it announced"
            );
        }
        assert!(
            !unacked_threads.contains(&thread),
            "round {round}: thread {thread} began transaction {number} before an earlier one \
             was acknowledged"
        );
        if commit.is_none() {
            unacked_threads.insert(thread);
        }
        txs.push(Tx {
            thread,
            number,
            ops: pending.ops.clone(),
            acked: commit.is_some(),
        });
    }
    txs
}

/// Receives everything queued, in a transaction it rolls back; then does it again and checks
/// the rollback put back exactly the same messages. Returns whether the catalog exists, and the
/// messages.
fn inspect(broker: &Broker, round: u32) -> (bool, Vec<Found>) {
    let (catalog, mut first) = receive_everything(broker, round);
    let (catalog_again, mut second) = receive_everything(broker, round);
    assert_eq!(
        catalog, catalog_again,
        "round {round}: catalog after rollback"
    );
    first.sort();
    second.sort();
    assert!(
        first == second,
        "round {round}: receiving again after a rollback found {} messages, not the {} found \
         before it",
        second.len(),
        first.len()
    );
    (catalog, first)
}

fn receive_everything(broker: &Broker, round: u32) -> (bool, Vec<Found>) {
    let mut tx = broker.begin();
    let mut found = Vec::new();
    let mut queues_found = 0;
    for (queue, kind) in [
        (TARGET_QUEUE, BodyKind::Request),
        (INITIATOR_QUEUE, BodyKind::Reply),
    ] {
        // The last sequence seen per receiving endpoint: RECEIVE hands out each conversation's
        // messages in sequence order, with no gap.
        let mut last: HashMap<ConversationHandle, u64> = HashMap::new();
        loop {
            let batch = match tx.receive(queue, Receive::top(INSPECT_TOP)) {
                Ok(batch) => batch,
                Err(Error::UnknownQueue(_)) => break,
                Err(e) => panic!("round {round}: receiving from {queue}: {e}"),
            };
            if batch.is_empty() {
                queues_found += 1;
                break;
            }
            let group = batch[0].conversation_group;
            for message in batch {
                let (body_kind, body) = verify_body(message.body()).unwrap_or_else(|e| {
                    panic!(
                        "round {round}: message {} of {} in {queue} does not verify: {e}",
                        message.sequence, message.conversation_handle
                    )
                });
                assert!(
                    body_kind == kind && &*message.message_type == kind.message_type(),
                    "round {round}: {queue} holds {body} ({body_kind:?} body) of type {:?}",
                    message.message_type
                );
                assert_eq!(
                    message.conversation_group, group,
                    "round {round}: one RECEIVE returned {body} of another group"
                );
                let receiver = message.conversation_handle;
                if let Some(previous) = last.insert(receiver, message.sequence) {
                    assert_eq!(
                        message.sequence,
                        previous + 1,
                        "round {round}: {receiver} in {queue} holds sequence {} right after \
                         {previous}",
                        message.sequence
                    );
                }
                found.push(Found {
                    receiver,
                    sequence: message.sequence,
                    body,
                    group,
                    kind,
                });
            }
        }
    }
    tx.rollback();
    assert!(
        queues_found != 1,
        "round {round}: only one of the two queues of the catalog exists"
    );
    (queues_found == 2, found)
}

/// Decides which transactions committed, from the recovered state, and checks that each one
/// committed entirely or not at all (and the acknowledged ones at all).
///
/// A send shows its transaction committed if its message is queued, or named by any receive of
/// this round (a RECEIVE sees only committed messages). A receive shows it if its message is no
/// longer queued (a pending receive that did not commit was cut short by the kill, and nobody
/// received its messages after it).
fn decide<'t>(
    round: u32,
    txs: &'t [Tx],
    catalog: bool,
    found: &[Found],
    life: &LifeFound,
    stats: &mut Stats,
) -> Vec<&'t Tx> {
    let queued: HashSet<BodyId> = found.iter().map(|f| f.body).collect();
    let named_by_receive: HashSet<BodyId> = txs
        .iter()
        .flat_map(|tx| &tx.ops)
        .filter_map(|op| match op {
            TxOp::Receive { body, .. } => Some(*body),
            _ => None,
        })
        .collect();
    // Life-cycle dialogs whose target this round ended: their endpoints may be gone since the
    // (then acknowledged) transactions that began or ended the initiator.
    let target_ended: HashSet<ConversationHandle> = txs
        .iter()
        .flat_map(|tx| &tx.ops)
        .filter_map(|op| match op {
            TxOp::EndTarget { initiator, .. } => Some(*initiator),
            _ => None,
        })
        .collect();
    // The poison queue's status shows only the last change of it (all by one thread).
    let last_status_change = txs
        .iter()
        .filter(|tx| {
            tx.ops
                .iter()
                .any(|op| matches!(op, TxOp::Disable | TxOp::Enable))
        })
        .map(|tx| (tx.thread, tx.number))
        .max();
    let mut committed = Vec::new();
    for tx in txs {
        let last_change = last_status_change == Some((tx.thread, tx.number));
        let evidence: Vec<(bool, String)> = tx
            .ops
            .iter()
            .filter_map(|op| match op {
                TxOp::Catalog => Some((catalog, "the catalog".to_string())),
                TxOp::Begin { .. } => None,
                TxOp::Send { body, .. } => Some((
                    queued.contains(body) || named_by_receive.contains(body),
                    format!("the send of {body}"),
                )),
                TxOp::Receive { body, .. } => {
                    Some((!queued.contains(body), format!("the receive of {body}")))
                }
                TxOp::LifeBegin { handle, .. } | TxOp::End { handle, .. }
                    if target_ended.contains(handle) =>
                {
                    None
                }
                TxOp::LifeBegin { handle, .. } => Some((
                    life.endpoints.contains_key(handle),
                    format!("the life-cycle dialog {handle}"),
                )),
                TxOp::End { handle, .. } => Some((
                    life.endpoints
                        .get(handle)
                        .is_some_and(|e| e.state == EndpointState::Closed),
                    format!("the end of {handle}"),
                )),
                TxOp::EndTarget { handle, .. } => Some((
                    !life.endpoints.contains_key(handle),
                    format!("the end of target {handle}"),
                )),
                TxOp::Timer { handle, .. } => Some((
                    life.endpoints
                        .get(handle)
                        .is_some_and(|e| e.dialog_timer_ms.is_some())
                        || !life.queued(handle).is_empty(),
                    format!("the timer of {handle}"),
                )),
                TxOp::Disable | TxOp::Enable if !last_change => None,
                TxOp::Disable => Some((
                    life.poison_enabled == Some(false),
                    "the poison queue's disabling".to_string(),
                )),
                TxOp::Enable => Some((
                    life.poison_enabled == Some(true),
                    "the poison queue's enabling".to_string(),
                )),
            })
            .collect();
        let Some((first, _)) = evidence.first() else {
            // Only a transaction followed by another of its thread, so acknowledged, may have
            // had its evidence changed since.
            assert!(
                tx.acked,
                "round {round}: {tx} changes nothing the test can see: {tx:?}"
            );
            committed.push(tx);
            continue;
        };
        let did_commit = tx.acked || *first;
        let wrong: Vec<&str> = evidence
            .iter()
            .filter(|(shows, _)| *shows != did_commit)
            .map(|(_, what)| what.as_str())
            .collect();
        assert!(
            wrong.is_empty(),
            "round {round}: {tx} {} but {} show{} otherwise\nops: {:?}",
            if did_commit {
                "committed"
            } else {
                "did not commit"
            },
            wrong.join(", "),
            if wrong.len() == 1 { "s" } else { "" },
            tx.ops
        );
        if !tx.acked {
            let life_cycle = tx.ops.iter().any(|op| {
                !matches!(
                    op,
                    TxOp::Catalog | TxOp::Begin { .. } | TxOp::Send { .. } | TxOp::Receive { .. }
                )
            });
            match (life_cycle, did_commit) {
                (false, true) => stats.pending_committed += 1,
                (false, false) => stats.pending_not_committed += 1,
                (true, true) => stats.life_pending_committed += 1,
                (true, false) => stats.life_pending_not_committed += 1,
            }
        }
        if did_commit {
            committed.push(tx);
        }
    }
    committed
}

/// Applies the committed transactions to the model: first every dialog, then every send, then
/// every receive (a receive's line may come before the line of the send it received). Returns
/// the senders whose conversations changed.
fn apply(round: u32, committed: &[&Tx], model: &mut Model) -> HashSet<ConversationHandle> {
    let ops = || {
        committed
            .iter()
            .flat_map(|tx| tx.ops.iter().map(move |op| (*tx, op)))
    };
    for (tx, op) in ops() {
        match op {
            TxOp::Catalog => model.catalog = true,
            TxOp::Begin { handle } => assert!(
                model.initiators.insert(*handle),
                "round {round}: {tx} began dialog {handle} a second time"
            ),
            TxOp::LifeBegin { handle, requests } => assert!(
                model
                    .life
                    .insert(
                        *handle,
                        LifeDialog {
                            requests: *requests,
                            ..LifeDialog::default()
                        }
                    )
                    .is_none(),
                "round {round}: {tx} began dialog {handle} a second time"
            ),
            TxOp::End { handle, error } => {
                life_dialog(round, tx, model, handle).ended = Some(*error)
            }
            TxOp::EndTarget { handle, initiator } => {
                life_dialog(round, tx, model, initiator).target_ended = Some(*handle);
            }
            TxOp::Timer {
                handle,
                lo_ms,
                hi_ms,
            } => life_dialog(round, tx, model, handle).timer = Some((*lo_ms, *hi_ms)),
            TxOp::Disable => model.poison_disabled = true,
            TxOp::Enable => model.poison_disabled = false,
            TxOp::Send { .. } | TxOp::Receive { .. } => {}
        }
    }
    let mut touched = HashSet::new();
    for (tx, op) in ops() {
        if let TxOp::Send {
            handle,
            sequence,
            body,
        } = op
        {
            let kind = if model.initiators.contains(handle) {
                BodyKind::Request
            } else {
                BodyKind::Reply
            };
            let sent = Sent {
                sender: *handle,
                sequence: *sequence,
                kind,
                received_by: None,
            };
            assert!(
                model.messages.insert(*body, sent).is_none(),
                "round {round}: {tx} sent {body}, which an earlier transaction sent"
            );
            model.queued.insert(*body);
            model.by_sender.entry(*handle).or_default().push(*body);
            touched.insert(*handle);
        }
    }
    for (tx, op) in ops() {
        if let TxOp::Receive {
            handle,
            sequence,
            body,
        } = op
        {
            let sent = model.messages.get_mut(body).unwrap_or_else(|| {
                panic!("round {round}: {tx} received {body}, which no committed transaction sent")
            });
            if let Some((r, thread, number)) = sent.received_by {
                panic!(
                    "round {round}: {tx} received {body}, which transaction {number} of thread \
                     {thread} in round {r} received already"
                );
            }
            sent.received_by = Some((round, tx.thread, tx.number));
            *model.receives.entry(*handle).or_default() += 1;
            assert_eq!(
                *sequence, sent.sequence,
                "round {round}: {tx} received {body} as sequence {sequence}, sent as {}",
                sent.sequence
            );
            let sender = sent.sender;
            model.queued.remove(body);
            model
                .pair(sender, *handle)
                .unwrap_or_else(|e| panic!("round {round}: {tx} received {body}: {e}"));
            touched.insert(sender);
        }
    }
    for sender in &touched {
        if !model.initiators.contains(sender) {
            assert!(
                model.far.contains_key(sender),
                "round {round}: {sender} sent replies but never received a request"
            );
        }
    }
    touched
}

/// The committed life-cycle dialog `handle` that `tx` changes.
fn life_dialog<'m>(
    round: u32,
    tx: &Tx,
    model: &'m mut Model,
    handle: &ConversationHandle,
) -> &'m mut LifeDialog {
    model.life.get_mut(handle).unwrap_or_else(|| {
        panic!("round {round}: {tx} used {handle}, which no committed transaction began")
    })
}

/// The messages found queued must be exactly the committed ones not yet received, each where
/// and as what it was sent.
fn compare(round: u32, model: &mut Model, found: &[Found]) {
    let mut seen = HashSet::new();
    for f in found {
        assert!(
            seen.insert(f.body),
            "round {round}: {} is queued twice",
            f.body
        );
        let sent = model.messages.get(&f.body).unwrap_or_else(|| {
            panic!(
                "round {round}: {} is queued (for {}, sequence {}) but no committed transaction \
                 sent it",
                f.body, f.receiver, f.sequence
            )
        });
        if let Some((r, thread, number)) = sent.received_by {
            panic!(
                "round {round}: {} is queued again, but transaction {number} of thread {thread} \
                 in round {r} received it",
                f.body
            );
        }
        assert_eq!(
            f.sequence, sent.sequence,
            "round {round}: {} is queued as sequence {} but was sent as {}",
            f.body, f.sequence, sent.sequence
        );
        assert_eq!(
            f.kind, sent.kind,
            "round {round}: {} is queued as a {:?}, but {} sent it",
            f.body, f.kind, sent.sender
        );
        let group = *model.groups.entry(f.receiver).or_insert(f.group);
        assert_eq!(
            f.group, group,
            "round {round}: {} is queued for {} in group {}, but that endpoint was in group \
             {group} before",
            f.body, f.receiver, f.group
        );
        let sender = sent.sender;
        model.pair(sender, f.receiver).unwrap_or_else(|e| {
            panic!(
                "round {round}: {} is queued for {}: {e}",
                f.body, f.receiver
            )
        });
    }
    let mut lost: Vec<String> = model
        .queued
        .iter()
        .filter(|body| !seen.contains(body))
        .map(|body| {
            let sent = &model.messages[body];
            format!("{body} (sequence {} from {})", sent.sequence, sent.sender)
        })
        .collect();
    lost.sort();
    assert!(
        lost.is_empty(),
        "round {round}: {} committed messages nobody received are not queued: {}",
        lost.len(),
        lost.join(", ")
    );
}

/// The messages `sender` sent have sequences 0, 1, 2, … and the received ones come first.
fn check_conversation(round: u32, model: &Model, sender: ConversationHandle) {
    let mut sent: Vec<(u64, bool, BodyId)> = model.by_sender[&sender]
        .iter()
        .map(|body| {
            let s = &model.messages[body];
            (s.sequence, s.received_by.is_some(), *body)
        })
        .collect();
    sent.sort();
    for (expected, (sequence, _, body)) in sent.iter().enumerate() {
        assert_eq!(
            *sequence,
            expected as u64,
            "round {round}: {sender} sent {body} as sequence {sequence}, where {expected} is \
             next (sequences: {:?})",
            sent.iter().map(|s| s.0).collect::<Vec<_>>()
        );
    }
    if let Some(window) = sent.windows(2).find(|w| !w[0].1 && w[1].1) {
        panic!(
            "round {round}: on {sender}, sequence {} was received while {} is still queued",
            window[1].0, window[0].0
        );
    }
}

/// The recovered endpoints are those of the committed dialogs, paired as the model knows them,
/// with the sequence numbers their committed sends and receives left.
fn check_endpoints(round: u32, model: &Model, endpoints: &[ConversationEndpoint]) {
    assert_eq!(
        endpoints.len(),
        2 * model.initiators.len(),
        "round {round}: {} endpoints recovered for {} committed dialogs",
        endpoints.len(),
        model.initiators.len()
    );
    for endpoint in endpoints {
        let handle = endpoint.handle;
        let far = endpoint
            .far_handle
            .unwrap_or_else(|| panic!("round {round}: endpoint {handle} lost its far side"));
        let initiator = if endpoint.is_initiator { handle } else { far };
        assert!(
            model.initiators.contains(&initiator),
            "round {round}: endpoint {handle} belongs to dialog {initiator}, which no committed \
             transaction began"
        );
        if let Some(known) = model.far.get(&handle) {
            assert_eq!(
                far, *known,
                "round {round}: endpoint {handle} has far side {far}, messages say {known}"
            );
        }
        if let Some(group) = model.groups.get(&handle) {
            assert_eq!(
                endpoint.group, *group,
                "round {round}: endpoint {handle} is in group {}, its messages were in {group}",
                endpoint.group
            );
        }
        let sent = model.by_sender.get(&handle).map_or(0, Vec::len) as u64;
        let received = model.receives.get(&handle).copied().unwrap_or(0);
        assert!(
            endpoint.send_sequence == sent && endpoint.receive_sequence == received,
            "round {round}: endpoint {handle} recovered with send sequence {} and receive \
             sequence {}, but committed transactions sent {sent} and received {received} on it",
            endpoint.send_sequence,
            endpoint.receive_sequence
        );
    }
}

/// Receives everything queued in the life-cycle queues, in a transaction it rolls back; then
/// does it again and checks the rollback put back exactly the same messages.
fn inspect_life(broker: &Broker, round: u32) -> LifeFound {
    let first = receive_life(broker, round);
    let second = receive_life(broker, round);
    assert!(
        first == second,
        "round {round}: receiving the life-cycle queues again after a rollback found other \
         messages"
    );
    LifeFound {
        endpoints: broker
            .conversation_endpoints()
            .into_iter()
            .map(|e| (e.handle, e))
            .collect(),
        messages: first,
        poison_enabled: broker
            .queues()
            .into_iter()
            .find(|q| q.name == POISON_QUEUE)
            .map(|q| q.options.enabled),
    }
}

type Queued = HashMap<ConversationHandle, Vec<(String, u64, Vec<u8>)>>;

fn receive_life(broker: &Broker, round: u32) -> Queued {
    let mut tx = broker.begin();
    let mut messages: Queued = HashMap::new();
    for queue in [LIFE_INITIATOR_QUEUE, LIFE_TARGET_QUEUE] {
        loop {
            let batch = match tx.receive(queue, Receive::top(INSPECT_TOP)) {
                Ok(batch) => batch,
                Err(Error::UnknownQueue(_)) => break,
                Err(e) => panic!("round {round}: receiving from {queue}: {e}"),
            };
            if batch.is_empty() {
                break;
            }
            for m in batch {
                messages.entry(m.conversation_handle).or_default().push((
                    m.message_type.to_string(),
                    m.sequence,
                    m.body().to_vec(),
                ));
            }
        }
    }
    tx.rollback();
    messages
}

/// The life-cycle dialogs are the committed ones, each as its committed ENDs and timer left it
/// (see the module documentation); `opened_ms` is the time the broker was opened at.
fn check_life(round: u32, model: &mut Model, life: &LifeFound, opened_ms: u64, stats: &mut Stats) {
    let is_life = |e: &ConversationEndpoint| {
        matches!(
            (&*e.service, &*e.far_service),
            (LIFE_INITIATOR_SERVICE, LIFE_TARGET_SERVICE)
                | (LIFE_TARGET_SERVICE, LIFE_INITIATOR_SERVICE)
        )
    };
    let mut targets: HashMap<ConversationHandle, &ConversationEndpoint> = HashMap::new();
    for e in life.endpoints.values().filter(|e| is_life(e)) {
        let initiator = match (e.is_initiator, e.far_handle) {
            (true, _) => e.handle,
            (false, Some(far)) => far,
            (false, None) => panic!(
                "round {round}: life-cycle target {} lost its far side",
                e.handle
            ),
        };
        assert!(
            model.life.contains_key(&initiator),
            "round {round}: endpoint {} ({}) belongs to life-cycle dialog {initiator}, which no \
             committed transaction began",
            e.handle,
            e.state.code()
        );
        if !e.is_initiator {
            targets.insert(initiator, e);
        }
    }
    for (handle, dialog) in &mut model.life {
        let initiator = life.endpoints.get(handle);
        let target = targets.get(handle);
        if let Some(target_handle) = dialog.target_ended {
            assert!(
                initiator.is_none() && target.is_none(),
                "round {round}: both sides of {handle} ended, but an endpoint remains"
            );
            assert!(
                life.queued(handle).is_empty() && life.queued(&target_handle).is_empty(),
                "round {round}: both sides of {handle} ended, but messages remain"
            );
            continue;
        }
        let (Some(i), Some(t)) = (initiator, target) else {
            panic!(
                "round {round}: life-cycle dialog {handle} lost an endpoint: initiator {:?}, \
                 target {:?}",
                initiator.map(|e| e.state),
                target.map(|e| e.state)
            );
        };
        let target_queued = life.queued(&t.handle);
        let requests: Vec<(String, u64, Vec<u8>)> = (0..dialog.requests)
            .map(|sequence| (REQUEST_TYPE.to_string(), sequence, LIFE_BODY.to_vec()))
            .collect();
        let summary = |queued: &[(String, u64, Vec<u8>)]| -> Vec<(String, u64)> {
            queued.iter().map(|m| (m.0.clone(), m.1)).collect()
        };
        match dialog.ended {
            Some(error) => {
                assert!(
                    i.state == EndpointState::Closed
                        && i.dialog_timer_ms.is_none()
                        && life.queued(handle).is_empty(),
                    "round {round}: ended initiator {handle} is {} with timer {:?} and {} \
                     messages",
                    i.state.code(),
                    i.dialog_timer_ms,
                    life.queued(handle).len()
                );
                // EndDialog after the requests, in sequence; an Error ahead of them.
                let (state, expected) = match error {
                    None => {
                        let mut expected = requests.clone();
                        expected.push((
                            system::END_DIALOG.to_string(),
                            dialog.requests,
                            Vec::new(),
                        ));
                        (EndpointState::DisconnectedInbound, expected)
                    }
                    Some(code) => {
                        let body = system::error_body(code, &error_description(code));
                        let mut expected = vec![(system::ERROR.to_string(), 0, body)];
                        expected.extend(requests.iter().cloned());
                        (EndpointState::Error, expected)
                    }
                };
                assert!(
                    t.state == state && target_queued == expected,
                    "round {round}: the target of {handle} (ended with {error:?}) is {} holding \
                     {:?}; expected {} holding {:?}",
                    t.state.code(),
                    summary(target_queued),
                    state.code(),
                    summary(&expected)
                );
            }
            None => {
                let initiator_state = if dialog.requests == 0 {
                    EndpointState::StartedOutbound
                } else {
                    EndpointState::Conversing
                };
                assert!(
                    i.state == initiator_state
                        && t.state == EndpointState::Conversing
                        && target_queued == requests,
                    "round {round}: open dialog {handle} with {} requests is ({}, {}), the target \
                     holding {:?}",
                    dialog.requests,
                    i.state.code(),
                    t.state.code(),
                    summary(target_queued)
                );
                let queued = life.queued(handle);
                assert!(
                    queued
                        .iter()
                        .all(|m| m.0 == system::DIALOG_TIMER && m.1 == 0 && m.2.is_empty()),
                    "round {round}: initiator {handle} holds {:?}",
                    queued.iter().map(|m| &m.0).collect::<Vec<_>>()
                );
                match (dialog.timer, i.dialog_timer_ms, queued.len()) {
                    (None, None, 0) => {}
                    (Some((lo, hi)), Some(deadline), 0) => {
                        assert!(
                            !dialog.fired,
                            "round {round}: the timer of {handle} fired, and is pending again"
                        );
                        assert!(
                            (lo..=hi).contains(&deadline),
                            "round {round}: the timer of {handle} is due at {deadline}, set for \
                             {lo}..={hi}"
                        );
                        assert!(
                            deadline > opened_ms,
                            "round {round}: the timer of {handle} was due at {deadline}, before \
                             the broker opened at {opened_ms}, and did not fire"
                        );
                        stats.timers_pending_seen += 1;
                    }
                    (Some((lo, _)), None, 1) => {
                        assert!(
                            lo <= opened_ms,
                            "round {round}: the timer of {handle} fired before {lo}, the \
                             earliest it was due"
                        );
                        dialog.fired = true;
                        stats.timers_fired_seen += 1;
                    }
                    (timer, pending, fired) => panic!(
                        "round {round}: dialog {handle} with committed timer {timer:?} has a \
                         timer pending at {pending:?} and {fired} DialogTimer messages"
                    ),
                }
            }
        }
    }
}

/// Spawns the writer, kills it as `kill` says, and returns the lines it printed.
fn run_writer_until_killed(dir: &Path, round: u32, kill: Kill) -> Vec<TxLine> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_engine_crash_writer"));
    command.arg(dir).arg(round.to_string());
    // A `commit` line is printed once a commit returned; `pending` lines are not promises.
    let output = run_until_killed(command, round, kill, |line| line.starts_with(b"commit "));
    parse_lines(&output).unwrap_or_else(|e| panic!("round {round}: {e}"))
}
