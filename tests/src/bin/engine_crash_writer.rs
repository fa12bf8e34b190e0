//! The process the engine crash test kills: opens a broker on a directory, creates the crash
//! catalog if it is not there yet, and runs transactions from several threads until it is
//! killed, printing a `pending` line before each commit and a `commit` line after it returned
//! (see `herald_tests::engine_crash`).
//!
//! - Producers (threads `0..PRODUCERS`) begin dialogs from the initiator service to the target
//!   service, or reuse the ones they began earlier in this round, and SEND 1..=5 requests per
//!   transaction over one or two of them.
//! - Request consumers RECEIVE a batch (sometimes two) from the target queue and commit,
//!   replying on some of the conversations; now and then they roll back instead, which puts the
//!   batch back.
//! - Reply consumers RECEIVE the replies from the initiator queue and commit.
//! - The life-cycle thread begins dialogs between the life-cycle services, sending up to two
//!   requests on each and setting a
//!   conversation timer (10–200 ms, on the system clock) in the same transaction on half of
//!   them, and ends the others: the initiator plainly or WITH ERROR, and later, sometimes, the
//!   target too (which removes both endpoints). Each dialog gets one timer or one end, never
//!   both, so that what the test finds is the timer's or the end's doing alone.
//! - The poison thread receives the poison queue's message and rolls back, until the fifth
//!   rollback in a row disables the queue (announced as a `disable` transaction, acknowledged
//!   once the rollback returned and the queue shows disabled), then enables it again with ALTER
//!   QUEUE (an `enable` transaction).
//!
//! Every third round runs no request consumers, so that a backlog of requests builds up and
//! meets several crashes and recoveries before a later round receives it.
//!
//! A thread begins its next transaction only after its last commit returned. Usage:
//! `engine_crash_writer <broker-dir> <round>`. It never exits on its own before
//! `RUN_SECONDS_MAX`; an error in any thread is printed to stderr and ends the whole process at
//! once with a non-zero code (a panic aborts it), so the test sees it instead of killing a
//! process whose other threads carry on.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use herald_engine::{
    Broker, Clock, ConversationHandle, DialogOptions, Error, Message, POISON_ROLLBACKS_MAX,
    QueueOptions, Receive, SystemClock,
};
use herald_tests::crash_record::{ROUND_MAX, RecordId};
use herald_tests::engine_crash::{
    BodyKind, CONTRACT, INITIATOR_QUEUE, INITIATOR_SERVICE, LIFE_BODY, LIFE_INITIATOR_SERVICE,
    LIFE_REQUESTS_MAX, LIFE_TARGET_SERVICE, LIFE_TIMER_MS, POISON_QUEUE, Phase, REPLY_TYPE,
    REQUEST_TYPE, TARGET_QUEUE, TARGET_SERVICE, TxLine, TxOp, crash_broker_options, create_catalog,
    error_description, message_body, verify_body,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const PRODUCERS: u8 = 2;
const REQUEST_CONSUMERS: u8 = 2;
/// Rounds that are a multiple of this run no request consumers.
const PRODUCER_ONLY_ROUNDS_EVERY: u32 = 3;
const REPLY_CONSUMERS: u8 = 1;
/// The thread id of the catalog transaction (the main thread).
const MAIN_THREAD: u8 = u8::MAX;
/// Dialogs a producer keeps sending on.
const DIALOGS_PER_PRODUCER_MAX: usize = 3;
const REQUESTS_PER_TX_MAX: usize = 5;
const RECEIVE_TOP_MAX: usize = 8;
/// How long a consumer that found its queue empty waits for a commit that may have filled it
/// before looking again anyway.
const EMPTY_QUEUE_WAIT: Duration = Duration::from_millis(50);
/// A bound on a writer nobody killed (its parent died without killing it, say).
const RUN_SECONDS_MAX: u64 = 120;
/// Life-cycle dialogs one round begins at most (the test checks every one after every round).
const LIFE_DIALOGS_PER_ROUND_MAX: usize = 16;
/// Times one round disables the poison queue at most.
const POISON_DISABLES_PER_ROUND_MAX: u32 = 8;

fn main() -> ExitCode {
    let print_panic = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print_panic(info);
        std::process::abort();
    }));
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message),
    }
}

/// Ends the process now, whatever the other threads are doing.
fn fail(message: &str) -> ! {
    eprintln!("engine_crash_writer: {message}");
    std::process::exit(2)
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, round] = &args[..] else {
        return Err("usage: engine_crash_writer <broker-dir> <round>".into());
    };
    let dir = PathBuf::from(dir);
    let round: u32 = round
        .parse()
        .ok()
        .filter(|r| *r <= ROUND_MAX)
        .ok_or_else(|| format!("round {round:?} is not a number up to {ROUND_MAX}"))?;
    let broker = Broker::open(&dir, crash_broker_options())
        .map_err(|e| format!("opening the broker in {}: {e}", dir.display()))?;
    let printer = Printer::stdout()?;
    ensure_catalog(&broker, &printer, round)?;
    let shared = Shared {
        broker,
        printer,
        round,
        deadline: Instant::now() + Duration::from_secs(RUN_SECONDS_MAX),
        requests_sent: Signal::default(),
        replies_sent: Signal::default(),
        reply_sequences: Mutex::default(),
    };
    let shared = &shared;
    let or_fail = |result: Result<(), String>| result.unwrap_or_else(|e| fail(&e));
    std::thread::scope(|scope| {
        for thread in 0..PRODUCERS {
            scope.spawn(move || or_fail(produce(shared, thread)));
        }
        if !round.is_multiple_of(PRODUCER_ONLY_ROUNDS_EVERY) {
            for thread in PRODUCERS..PRODUCERS + REQUEST_CONSUMERS {
                scope.spawn(move || or_fail(consume(shared, thread, BodyKind::Request)));
            }
        }
        let first = PRODUCERS + REQUEST_CONSUMERS;
        for thread in first..first + REPLY_CONSUMERS {
            scope.spawn(move || or_fail(consume(shared, thread, BodyKind::Reply)));
        }
        let life_thread = first + REPLY_CONSUMERS;
        scope.spawn(move || or_fail(life_cycle(shared, life_thread)));
        scope.spawn(move || or_fail(poison(shared, life_thread + 1)));
    });
    Ok(())
}

/// What the threads of one writer share.
struct Shared {
    broker: Broker,
    printer: Printer,
    round: u32,
    deadline: Instant,
    /// Bumped after each producer commit: a request consumer that found nothing waits on it.
    requests_sent: Signal,
    /// Bumped after each commit that sent replies.
    replies_sent: Signal,
    /// The sequence number the next reply on a target endpoint gets, for conversations begun in
    /// this round (their replies start at 0). Only a transaction holding the endpoint's group
    /// lock reads and advances it, so it predicts exactly what the engine assigns.
    reply_sequences: Mutex<HashMap<ConversationHandle, u64>>,
}

/// A counter with a condition variable: "something was committed since you last looked".
#[derive(Default)]
struct Signal {
    count: Mutex<u64>,
    changed: Condvar,
}

impl Signal {
    fn count(&self) -> u64 {
        *self.count.lock().expect("signal lock poisoned")
    }

    fn bump(&self) {
        *self.count.lock().expect("signal lock poisoned") += 1;
        self.changed.notify_all();
    }

    /// Waits until the count is past `seen`, at most `timeout`.
    fn wait_past(&self, seen: u64, timeout: Duration) {
        let count = self.count.lock().expect("signal lock poisoned");
        let _unused = self
            .changed
            .wait_timeout_while(count, timeout, |count| *count <= seen)
            .expect("signal lock poisoned");
    }
}

/// Creates the catalog unless an earlier round did (it is one transaction: all or nothing).
fn ensure_catalog(broker: &Broker, printer: &Printer, round: u32) -> Result<(), String> {
    let mut tx = broker.begin();
    match create_catalog(&mut tx) {
        Ok(()) => {}
        Err(Error::AlreadyExists { .. }) => return Ok(()),
        Err(e) => return Err(format!("creating the catalog: {e}")),
    }
    let line = |phase| TxLine {
        phase,
        round,
        thread: MAIN_THREAD,
        tx: 0,
        ops: vec![TxOp::Catalog],
    };
    printer.print(&line(Phase::Pending))?;
    tx.commit()
        .map_err(|e| format!("committing the catalog: {e}"))?;
    printer.print(&line(Phase::Commit))
}

/// A dialog a producer began, and the sequence number of its next request.
struct Dialog {
    handle: ConversationHandle,
    next_sequence: u64,
}

fn produce(shared: &Shared, thread: u8) -> Result<(), String> {
    let round = shared.round;
    let mut rng = thread_rng(round, thread);
    let mut dialogs: Vec<Dialog> = Vec::new();
    let mut next_message = 0u32;
    let mut tx_number = 0u64;
    while Instant::now() < shared.deadline {
        let mut tx = shared.broker.begin();
        let mut ops = Vec::new();
        // The dialogs this transaction sends on, with their next sequence numbers as they will be
        // once it commits.
        let mut chosen: Vec<Dialog> = Vec::new();
        if dialogs.is_empty() || (dialogs.len() < DIALOGS_PER_PRODUCER_MAX && rng.gen_ratio(1, 4)) {
            let handle = tx
                .begin_dialog(
                    INITIATOR_SERVICE,
                    TARGET_SERVICE,
                    CONTRACT,
                    DialogOptions::default(),
                )
                .map_err(|e| format!("thread {thread}: beginning a dialog: {e}"))?;
            ops.push(TxOp::Begin { handle });
            chosen.push(Dialog {
                handle,
                next_sequence: 0,
            });
        }
        if !dialogs.is_empty() && (chosen.is_empty() || rng.gen_ratio(1, 3)) {
            let old = &dialogs[rng.gen_range(0..dialogs.len())];
            chosen.push(Dialog {
                handle: old.handle,
                next_sequence: old.next_sequence,
            });
        }
        let count = rng.gen_range(chosen.len()..=REQUESTS_PER_TX_MAX);
        let dialogs_chosen = chosen.len();
        for k in 0..count {
            let dialog = &mut chosen[k % dialogs_chosen];
            let id = RecordId {
                round,
                thread,
                seq: next_message + k as u32,
            };
            tx.send(
                dialog.handle,
                REQUEST_TYPE,
                &message_body(BodyKind::Request, id),
            )
            .map_err(|e| format!("thread {thread}: sending {id} on {}: {e}", dialog.handle))?;
            ops.push(TxOp::Send {
                handle: dialog.handle,
                sequence: dialog.next_sequence,
                body: id,
            });
            dialog.next_sequence += 1;
        }
        commit_and_print(&shared.printer, tx, round, thread, tx_number, ops)?;
        shared.requests_sent.bump();
        for dialog in chosen {
            match dialogs.iter_mut().find(|d| d.handle == dialog.handle) {
                Some(known) => known.next_sequence = dialog.next_sequence,
                None => dialogs.push(dialog),
            }
        }
        next_message += count as u32;
        tx_number += 1;
    }
    Ok(())
}

/// Receives `kind` messages from their queue; request consumers reply to some conversations.
fn consume(shared: &Shared, thread: u8, kind: BodyKind) -> Result<(), String> {
    let round = shared.round;
    let mut rng = thread_rng(round, thread);
    let (queue, sent) = match kind {
        BodyKind::Request => (TARGET_QUEUE, &shared.requests_sent),
        BodyKind::Reply => (INITIATOR_QUEUE, &shared.replies_sent),
    };
    let mut next_message = 0u32;
    let mut tx_number = 0u64;
    while Instant::now() < shared.deadline {
        let seen = sent.count();
        let mut tx = shared.broker.begin();
        let receive = |tx: &mut herald_engine::Transaction<'_>, rng: &mut SmallRng| {
            tx.receive(queue, Receive::top(rng.gen_range(1..=RECEIVE_TOP_MAX)))
                .map_err(|e| format!("thread {thread}: receiving from {queue}: {e}"))
        };
        let mut batch = receive(&mut tx, &mut rng)?;
        if batch.is_empty() {
            drop(tx);
            sent.wait_past(seen, EMPTY_QUEUE_WAIT);
            continue;
        }
        if rng.gen_ratio(1, 4) {
            batch.extend(receive(&mut tx, &mut rng)?);
        }
        if rng.gen_ratio(1, 8) {
            // Rolled back: the batch goes back to the queue, nothing is printed.
            tx.rollback();
            continue;
        }
        let mut ops = Vec::new();
        for message in &batch {
            let body = check_message(message, kind)
                .map_err(|e| format!("thread {thread}: received from {queue}: {e}"))?;
            ops.push(TxOp::Receive {
                handle: message.conversation_handle,
                sequence: message.sequence,
                body,
            });
        }
        let mut replied = false;
        if kind == BodyKind::Request {
            // Reply on conversations begun in this round (whose reply sequences are known here).
            let mut handles: Vec<ConversationHandle> = Vec::new();
            let mut seen_handles = HashSet::new();
            for op in &ops {
                if let TxOp::Receive { handle, body, .. } = op
                    && body.round == round
                    && seen_handles.insert(*handle)
                {
                    handles.push(*handle);
                }
            }
            for handle in handles {
                if !rng.gen_ratio(1, 2) {
                    continue;
                }
                let id = RecordId {
                    round,
                    thread,
                    seq: next_message,
                };
                tx.send(handle, REPLY_TYPE, &message_body(BodyKind::Reply, id))
                    .map_err(|e| format!("thread {thread}: replying {id} on {handle}: {e}"))?;
                let sequence = {
                    let mut sequences = shared
                        .reply_sequences
                        .lock()
                        .expect("reply sequences lock poisoned");
                    let next = sequences.entry(handle).or_insert(0);
                    *next += 1;
                    *next - 1
                };
                ops.push(TxOp::Send {
                    handle,
                    sequence,
                    body: id,
                });
                next_message += 1;
                replied = true;
            }
        }
        commit_and_print(&shared.printer, tx, round, thread, tx_number, ops)?;
        if replied {
            shared.replies_sent.bump();
        }
        tx_number += 1;
    }
    Ok(())
}

/// A life-cycle dialog of this round.
struct LifeDialog {
    handle: ConversationHandle,
    /// It got a timer (and is never ended).
    timed: bool,
    ended: bool,
    target_ended: bool,
}

/// Begins life-cycle dialogs (half with a timer), ends the others' initiators (plainly or WITH
/// ERROR) and then, sometimes, their targets.
fn life_cycle(shared: &Shared, thread: u8) -> Result<(), String> {
    let round = shared.round;
    let mut rng = thread_rng(round, thread);
    let mut dialogs: Vec<LifeDialog> = Vec::new();
    let mut tx_number = 0u64;
    while Instant::now() < shared.deadline {
        let endable: Vec<usize> = (0..dialogs.len())
            .filter(|i| !dialogs[*i].timed && !dialogs[*i].ended)
            .collect();
        let target_endable: Vec<usize> = (0..dialogs.len())
            .filter(|i| dialogs[*i].ended && !dialogs[*i].target_ended)
            .collect();
        let choice = rng.gen_range(0..4);
        let mut tx = shared.broker.begin();
        let mut ops = Vec::new();
        let failed = |what: &str, e: Error| format!("thread {thread}: {what}: {e}");
        if dialogs.len() < LIFE_DIALOGS_PER_ROUND_MAX && (endable.is_empty() || choice == 0) {
            let handle = tx
                .begin_dialog(
                    LIFE_INITIATOR_SERVICE,
                    LIFE_TARGET_SERVICE,
                    CONTRACT,
                    DialogOptions::default(),
                )
                .map_err(|e| failed("beginning a life-cycle dialog", e))?;
            let requests = rng.gen_range(0..=LIFE_REQUESTS_MAX);
            for _ in 0..requests {
                tx.send(handle, REQUEST_TYPE, LIFE_BODY)
                    .map_err(|e| failed("sending on a life-cycle dialog", e))?;
            }
            ops.push(TxOp::LifeBegin { handle, requests });
            let timed = rng.gen_ratio(1, 2);
            if timed {
                let timeout_ms = rng.gen_range(LIFE_TIMER_MS);
                let lo_ms = SystemClock.now_ms() + timeout_ms;
                tx.begin_conversation_timer(handle, Duration::from_millis(timeout_ms))
                    .map_err(|e| failed("setting a timer", e))?;
                let hi_ms = SystemClock.now_ms() + timeout_ms;
                ops.push(TxOp::Timer {
                    handle,
                    lo_ms,
                    hi_ms,
                });
            }
            dialogs.push(LifeDialog {
                handle,
                timed,
                ended: false,
                target_ended: false,
            });
        } else if !target_endable.is_empty() && (choice == 1 || endable.is_empty()) {
            let dialog = &mut dialogs[target_endable[rng.gen_range(0..target_endable.len())]];
            let initiator = dialog.handle;
            let handle = shared
                .broker
                .conversation_endpoint(initiator)
                .and_then(|e| e.far_handle)
                .ok_or_else(|| format!("thread {thread}: ended dialog {initiator} is gone"))?;
            tx.end_conversation(handle)
                .map_err(|e| failed("ending a target", e))?;
            ops.push(TxOp::EndTarget { handle, initiator });
            dialog.target_ended = true;
        } else if !endable.is_empty() {
            let dialog = &mut dialogs[endable[rng.gen_range(0..endable.len())]];
            let handle = dialog.handle;
            let error = rng.gen_ratio(1, 2).then(|| rng.gen_range(1..=1000));
            match error {
                None => tx.end_conversation(handle),
                Some(code) => {
                    tx.end_conversation_with_error(handle, code, &error_description(code))
                }
            }
            .map_err(|e| failed("ending an initiator", e))?;
            ops.push(TxOp::End { handle, error });
            dialog.ended = true;
        } else {
            // Every dialog of the round began, timed or ended on both sides.
            return Ok(());
        }
        commit_and_print(&shared.printer, tx, round, thread, tx_number, ops)?;
        tx_number += 1;
    }
    Ok(())
}

/// Receives the poison queue's message and rolls back, until the queue is disabled; enables it.
fn poison(shared: &Shared, thread: u8) -> Result<(), String> {
    let round = shared.round;
    let mut tx_number = 0u64;
    // Rollbacks in a row since this process opened the broker (the broker's count is in memory,
    // so it starts at 0 too), of this thread, the only one receiving from the queue.
    let mut rollbacks = 0u32;
    let mut disables = 0u32;
    while Instant::now() < shared.deadline && disables < POISON_DISABLES_PER_ROUND_MAX {
        let enabled = shared
            .broker
            .queues()
            .into_iter()
            .find(|q| q.name == POISON_QUEUE)
            .is_some_and(|q| q.options.enabled);
        if !enabled {
            let mut tx = shared.broker.begin();
            tx.alter_queue(POISON_QUEUE, QueueOptions::default())
                .map_err(|e| format!("thread {thread}: enabling {POISON_QUEUE}: {e}"))?;
            commit_and_print(
                &shared.printer,
                tx,
                round,
                thread,
                tx_number,
                vec![TxOp::Enable],
            )?;
            tx_number += 1;
            rollbacks = 0;
            continue;
        }
        let mut tx = shared.broker.begin();
        let got = tx
            .receive(POISON_QUEUE, Receive::top(1))
            .map_err(|e| format!("thread {thread}: receiving from {POISON_QUEUE}: {e}"))?;
        if got.len() != 1 {
            return Err(format!(
                "thread {thread}: {POISON_QUEUE} gave {} messages, not its one",
                got.len()
            ));
        }
        rollbacks += 1;
        if rollbacks < POISON_ROLLBACKS_MAX {
            tx.rollback();
            continue;
        }
        let mut line = TxLine {
            phase: Phase::Pending,
            round,
            thread,
            tx: tx_number,
            ops: vec![TxOp::Disable],
        };
        shared.printer.print(&line)?;
        // The rollback logs the queue's new status (durably) before it returns.
        tx.rollback();
        let disabled = shared
            .broker
            .queues()
            .into_iter()
            .find(|q| q.name == POISON_QUEUE)
            .is_some_and(|q| !q.options.enabled);
        if !disabled {
            return Err(format!(
                "thread {thread}: {POISON_QUEUE} is still enabled after {rollbacks} rollbacks in \
                 a row"
            ));
        }
        line.phase = Phase::Commit;
        shared.printer.print(&line)?;
        tx_number += 1;
        disables += 1;
    }
    Ok(())
}

/// Checks a received message by its content and its type; returns its body id.
fn check_message(message: &Message, expected: BodyKind) -> Result<RecordId, String> {
    let (kind, id) = verify_body(message.body())?;
    if kind != expected || &*message.message_type != kind.message_type() {
        return Err(format!(
            "message {id} ({kind:?} body) on {} has type {:?}, expected a {expected:?}",
            message.conversation_handle, message.message_type
        ));
    }
    Ok(id)
}

/// Prints the `pending` line, commits, and prints the `commit` line.
fn commit_and_print(
    printer: &Printer,
    tx: herald_engine::Transaction<'_>,
    round: u32,
    thread: u8,
    tx_number: u64,
    ops: Vec<TxOp>,
) -> Result<(), String> {
    let mut line = TxLine {
        phase: Phase::Pending,
        round,
        thread,
        tx: tx_number,
        ops,
    };
    printer.print(&line)?;
    tx.commit()
        .map_err(|e| format!("thread {thread}: committing transaction {tx_number}: {e}"))?;
    line.phase = Phase::Commit;
    printer.print(&line)
}

/// Stdout without Rust's line buffer: each line goes out in one `write` of the whole line,
/// under a lock, so a kill leaves at most the last line half-printed, never two interleaved.
struct Printer {
    out: Mutex<File>,
}

impl Printer {
    fn stdout() -> Result<Printer, String> {
        let fd = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("duplicating stdout: {e}"))?;
        Ok(Printer {
            out: Mutex::new(File::from(fd)),
        })
    }

    fn print(&self, line: &TxLine) -> Result<(), String> {
        let text = line.to_line();
        self.out
            .lock()
            .expect("stdout lock poisoned")
            .write_all(text.as_bytes())
            .map_err(|e| format!("printing {text:?}: {e}"))
    }
}

/// Each thread's choices are a function of the round and the thread (timing still varies).
fn thread_rng(round: u32, thread: u8) -> SmallRng {
    SmallRng::seed_from_u64((u64::from(round) << 8) | u64::from(thread))
}
