//! Generated operation sequences against a reference model: begin dialog (alone, with a related
//! conversation, into a known or a fresh group), SEND (one or several conversations, valid or
//! refused), RECEIVE (best group, by conversation, by group), catalog changes, commit, rollback,
//! drop, checkpoint and reopen, with up to `SLOTS` transactions open at once so that group locks
//! and the catalog lock are contended. Segments are small and checkpoints frequent, so the log
//! rolls over, segments are released and compacted, and reopens recover from a checkpoint plus
//! the log after it.
//!
//! The model predicts every outcome: each error (lock timeouts included, and which group timed
//! out), each batch RECEIVE returns (which conversations, sequences, types and bodies, in
//! order), and, after every step, what a new receiver can see: a fresh transaction drains every
//! queue and rolls back, and its batches must be exactly the committed messages of the groups no
//! open transaction holds, group by group in arrival order. `invariants::check` runs after every
//! step and in the middle of each drain; `invariants::check_idle` whenever no transaction is
//! open. Handles and group ids the engine generates are learned when they first come back (in a
//! batch or a lock timeout) and must stay one-to-one with the model's endpoints and groups.
//!
//! The dialog life cycle runs in the same cases: END CONVERSATION (plain, WITH ERROR, WITH
//! CLEANUP), BEGIN CONVERSATION TIMER, dialogs with a lifetime, and steps of a `ManualClock`.
//! The model predicts the endpoint states (checked after every step through
//! `conversation_endpoint`, which must be `None` once both sides ended), which timers and
//! lifetimes fire at each clock step (in the engine's order: by deadline, then handle) and at
//! each open (deadlines that passed while the broker was closed), the DialogTimer, Error and
//! EndDialog messages with their places in each batch (DialogTimer, then Error, then by
//! sequence), the sends discarded because the far side ended or failed, and the refusals on
//! closed endpoints. It also keeps the engine's per-transaction copy of each endpoint, which
//! another transaction's END of the far side or an expiry does not update until the
//! transaction first locks the endpoint's group. A step that would meet one of the engine bugs
//! found by this model (fixed since; their regression tests are at the end of this file) is
//! skipped, or its transaction rolled back instead of committed (counted: `skipped_known_bugs`):
//! the model does not predict the engine's answer there yet (an op on an endpoint removed
//! meanwhile is a no-op; RECEIVE skips conversations its own transaction ended).
//!
//! Every run is a function of one seed (printed on failure; `HERALD_MODEL_SEED` replays it), and
//! the run fails if, over all cases, it did not commit, receive, contend, refuse, checkpoint,
//! reopen, end conversations each way, fire timers and expire lifetimes.
//!
//! Poison-message protection has its own model (`poison_protection_matches_its_model`): the
//! audit above drains and rolls back after every step, so the main model's queues have it off.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_engine::{
    Broker, ConversationGroupId, ConversationHandle, DialogOptions, Durability, EndpointState,
    Error, ManualClock, Message, Options, QueueOptions, Receive, SentBy, Transaction, Validation,
    invariants, system,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

/// Transactions open at once, at most.
const SLOTS: usize = 3;
/// How often each slot is chosen.
const SLOT_WEIGHTS: [u32; SLOTS] = [5, 3, 2];
/// Generated cases and steps per case: a few seconds in a debug build.
const CASES: u32 = 64;
const STEPS_MIN: usize = 20;
const STEPS_MAX: usize = 150;
/// Largest batch a drain asks for (far more than a case queues in one group).
const DRAIN_TOP: usize = 100_000;
/// Every step runs on one thread, so a lock held by another slot is never released while a step
/// waits for it: a wait always ends in a timeout, and zero makes it end at once. (Time is
/// virtual too: a lock wait on a `ManualClock` ends only when the clock passes its deadline.)
const LOCK_TIMEOUT: Duration = Duration::ZERO;
/// Where the model's `ManualClock` starts.
const START_MS: u64 = 1_700_000_000_000;
/// Timers, lifetimes and clock steps, in virtual milliseconds: of a size that makes some fire
/// within a case and some not.
const TIMER_MS: std::ops::RangeInclusive<u64> = 1..=8_000;
const LIFETIME_MS: std::ops::RangeInclusive<u64> = 1_000..=30_000;
const ADVANCE_MS: std::ops::RangeInclusive<u64> = 1..=5_000;
/// How long the broker stays closed at a reopen (virtual time): long enough that deadlines
/// often pass meanwhile and fire as it opens.
const CLOSED_MS: std::ops::RangeInclusive<u64> = 1_000..=10_000;

const QUEUES: [&str; 2] = ["QA", "QB"];
/// Services: name, queue (index into `QUEUES`), whether it accepts `CONTRACT` as a target.
const SERVICES: [(&str, usize, bool); 4] = [
    ("//m/A", 0, true),
    ("//m/B", 1, true),
    ("//m/C", 0, true),
    ("//m/InitiateOnly", 1, false),
];
/// A service no one created (index `SERVICES.len()` in generated steps).
const NO_SERVICE: &str = "//m/Nowhere";
const CONTRACT: &str = "//m/Talk";
/// JSON, sent by the initiator.
const REQUEST: &str = "//m/Request";
/// UTF-8, sent by the target.
const REPLY: &str = "//m/Reply";
/// Anything, sent by either side.
const NOTE: &str = "//m/Note";
/// Exists (built in), not on the contract.
const DEFAULT: &str = "DEFAULT";
/// Never created.
const NO_TYPE: &str = "//m/Nope";

// ---------------------------------------------------------------------------------------------
// Generated steps

#[derive(Debug, Clone, Copy)]
enum Pick {
    /// An endpoint whose handle the test knows and the slot's transaction can see (index taken
    /// modulo how many there are).
    Visible(u16),
    /// The same among target endpoints: sending on one replies into the initiator's group,
    /// which related dialogs share.
    VisibleTarget(u16),
    /// An endpoint whose handle the test knows: also one rolled back, or another
    /// transaction's uncommitted one.
    Known(u16),
    /// A handle no one created.
    Unknown,
}

#[derive(Debug, Clone, Copy)]
enum Related {
    None,
    Conversation(Pick),
    /// A group whose id the test knows.
    Group(u16),
    /// A new group id chosen by the caller.
    FreshGroup,
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Conversation(Pick),
    Group(u16),
}

#[derive(Debug, Clone, Copy)]
enum TypePick {
    /// The type the sending sides may send (`REQUEST`, `REPLY`, or `NOTE` when mixed).
    Natural,
    Request,
    Reply,
    Note,
    Default,
    Unknown,
    /// A type created by a `CreateType` step (committed or not).
    Created(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyForm {
    Json,
    /// UTF-8 but not JSON.
    BadJson,
    /// Not UTF-8.
    BadUtf8,
}

#[derive(Debug, Clone)]
enum Step {
    Dialog {
        slot: usize,
        from: usize,
        to: usize,
        related: Related,
        /// With a related conversation or group: begin from a service on its queue (the usual
        /// way, and the way conversations come to share a group), else `from` as generated.
        fit_from: bool,
        /// The dialog's lifetime, in virtual milliseconds.
        lifetime_ms: Option<u64>,
    },
    /// END CONVERSATION, plain, WITH ERROR or WITH CLEANUP.
    End {
        slot: usize,
        pick: Pick,
        how: EndHow,
    },
    /// BEGIN CONVERSATION TIMER.
    Timer {
        slot: usize,
        pick: Pick,
        timeout_ms: u64,
    },
    /// Moves the `ManualClock`: due timers and lifetimes fire before `advance` returns.
    Advance {
        ms: u64,
    },
    Send {
        slot: usize,
        handles: Vec<Pick>,
        message_type: TypePick,
        body: BodyForm,
        count: usize,
        /// Bytes of padding in each body, so that the log fills segments.
        pad: usize,
    },
    Receive {
        slot: usize,
        queue: usize,
        top: usize,
        target: Option<Target>,
        /// With a target: receive from its queue (the usual way), else from `queue`.
        fit_queue: bool,
    },
    CreateType {
        slot: usize,
        duplicate: bool,
    },
    Commit {
        slot: usize,
    },
    Rollback {
        slot: usize,
    },
    Drop {
        slot: usize,
    },
    /// `Broker::checkpoint` (compaction, checkpoint, segment release), transactions open or not.
    Checkpoint,
    /// Close every transaction (or leak it, when `forget`), drop the broker, let `closed_ms`
    /// pass while it is closed, open it again.
    Reopen {
        forget: bool,
        closed_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndHow {
    Plain,
    /// WITH ERROR = code (0 is refused).
    Error(i32),
    Cleanup,
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        12 => any::<u16>().prop_map(Pick::Visible),
        6 => any::<u16>().prop_map(Pick::VisibleTarget),
        3 => any::<u16>().prop_map(Pick::Known),
        1 => Just(Pick::Unknown),
    ]
}

fn service() -> impl Strategy<Value = usize> {
    // Mostly the three that accept the contract; sometimes the initiate-only one or none.
    prop_oneof![12 => 0usize..3, 1 => Just(3usize), 1 => Just(SERVICES.len())]
}

fn step() -> impl Strategy<Value = Step> {
    // Slots used unevenly: contention without every step waiting for a lock.
    let slot = proptest::strategy::Union::new_weighted(
        SLOT_WEIGHTS
            .iter()
            .enumerate()
            .map(|(slot, weight)| (*weight, Just(slot)))
            .collect(),
    );
    let related = prop_oneof![
        6 => Just(Related::None),
        3 => pick().prop_map(Related::Conversation),
        1 => any::<u16>().prop_map(Related::Group),
        1 => Just(Related::FreshGroup),
    ];
    let message_type = prop_oneof![
        16 => Just(TypePick::Natural),
        2 => Just(TypePick::Request),
        2 => Just(TypePick::Reply),
        2 => Just(TypePick::Note),
        1 => Just(TypePick::Default),
        1 => Just(TypePick::Unknown),
        1 => any::<u16>().prop_map(TypePick::Created),
    ];
    let body = prop_oneof![
        12 => Just(BodyForm::Json),
        1 => Just(BodyForm::BadJson),
        1 => Just(BodyForm::BadUtf8),
    ];
    let handles = prop_oneof![
        4 => proptest::collection::vec(pick(), 1..=1),
        1 => proptest::collection::vec(pick(), 2..=3),
    ];
    let target = prop_oneof![
        4 => Just(None),
        2 => pick().prop_map(|p| Some(Target::Conversation(p))),
        1 => any::<u16>().prop_map(|g| Some(Target::Group(g))),
    ];
    let top = prop_oneof![1 => Just(0usize), 8 => 1usize..4, 3 => Just(100usize)];
    let lifetime = prop_oneof![2 => Just(None), 1 => LIFETIME_MS.prop_map(Some)];
    let how = prop_oneof![
        4 => Just(EndHow::Plain),
        3 => (1i32..=1000).prop_map(EndHow::Error),
        1 => Just(EndHow::Error(0)),
        2 => Just(EndHow::Cleanup),
    ];
    prop_oneof![
        8 => (slot.clone(), service(), service(), related, proptest::bool::weighted(0.8), lifetime)
            .prop_map(|(slot, from, to, related, fit_from, lifetime_ms)| Step::Dialog {
                slot,
                from,
                to,
                related,
                fit_from,
                lifetime_ms,
            }),
        4 => (slot.clone(), pick(), how).prop_map(|(slot, pick, how)| Step::End { slot, pick, how }),
        3 => (slot.clone(), pick(), TIMER_MS).prop_map(|(slot, pick, timeout_ms)| Step::Timer {
            slot,
            pick,
            timeout_ms,
        }),
        3 => ADVANCE_MS.prop_map(|ms| Step::Advance { ms }),
        14 => (slot.clone(), handles, message_type, body, 1usize..=3, 0usize..600).prop_map(
            |(slot, handles, message_type, body, count, pad)| Step::Send {
                slot,
                handles,
                message_type,
                body,
                count,
                pad,
            }
        ),
        12 => (slot.clone(), 0..QUEUES.len(), top, target, proptest::bool::weighted(0.8)).prop_map(
            |(slot, queue, top, target, fit_queue)| Step::Receive {
                slot,
                queue,
                top,
                target,
                fit_queue,
            }
        ),
        1 => (slot.clone(), proptest::bool::weighted(0.2))
            .prop_map(|(slot, duplicate)| Step::CreateType { slot, duplicate }),
        10 => slot.clone().prop_map(|slot| Step::Commit { slot }),
        1 => slot.clone().prop_map(|slot| Step::Rollback { slot }),
        1 => slot.prop_map(|slot| Step::Drop { slot }),
        1 => Just(Step::Checkpoint),
        1 => (proptest::bool::weighted(0.25), prop_oneof![1 => Just(0u64), 4 => CLOSED_MS])
            .prop_map(|(forget, closed_ms)| Step::Reopen { forget, closed_ms }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The reference model

/// Whether a dialog's endpoints (or a group) exist: committed, created by the open transaction
/// of a slot, or gone with its transaction's rollback (or never created).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Committed,
    Pending(usize),
    Dead,
}

/// The urgent system messages, in the order RECEIVE hands them out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Lane {
    DialogTimer,
    Error,
}

/// A message's place in its conversation's receive order: DialogTimer messages, then Error
/// messages (each by arrival), then the sequenced ones (user messages and EndDialog).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Urgent(Lane, u64),
    Sequence(u64),
}

impl Key {
    /// The sequence number RECEIVE reports (0 for the unsequenced urgent messages).
    fn sequence(self) -> u64 {
        match self {
            Key::Sequence(sequence) => sequence,
            Key::Urgent(..) => 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelMessage {
    key: Key,
    message_type: String,
    body: Vec<u8>,
    /// Arrival order among all committed messages.
    order: u64,
}

#[derive(Debug)]
struct ModelEndpoint {
    real: Option<ConversationHandle>,
    life: Life,
    initiator: bool,
    group: usize,
    far: usize,
    /// Committed: the next sequence this side sends, and the next it receives.
    send_sequence: u64,
    receive_sequence: u64,
    /// Committed messages to this side, not taken by an open RECEIVE.
    queue: BTreeMap<Key, ModelMessage>,
    /// Committed: the endpoint's state, whether both sides ended (or it was cleaned up) and it
    /// is gone, its conversation timer and its lifetime's end.
    state: EndpointState,
    removed: bool,
    timer_ms: Option<u64>,
    expires_ms: Option<u64>,
}

/// A change a transaction makes, applied in order at commit (as its record is).
#[derive(Debug)]
enum TxOp {
    Send(usize, ModelMessage),
    End(usize, EndHow),
    Timer(usize, u64),
}

/// What a model commit did, for the coverage counters.
#[derive(Debug, Default)]
struct Committed {
    sent: u64,
    received: u64,
    ends: [u64; 3],
    timers: u64,
    removed: u64,
}

#[derive(Debug)]
struct ModelGroup {
    real: Option<ConversationGroupId>,
    life: Life,
    queue: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum CatalogHold {
    #[default]
    None,
    Shared,
    Exclusive,
}

/// What an open transaction has done.
#[derive(Debug, Default)]
struct ModelTx {
    locks: BTreeSet<usize>,
    catalog: CatalogHold,
    created_types: Vec<String>,
    /// This transaction's next send sequence of the endpoints it sent on.
    send_sequence: HashMap<usize, u64>,
    /// Its sends, ends and timers, in the order made.
    ops: Vec<TxOp>,
    /// (receiving endpoint, message) in the order received.
    taken: Vec<(usize, ModelMessage)>,
    received_through: BTreeMap<usize, u64>,
    /// The engine's per-transaction copy of each endpoint it used, by state: taken when first
    /// used, re-read when the transaction first locks the endpoint's group, changed by its own
    /// SEND and END. Another transaction's END of the far side, and a lifetime's expiry, change
    /// the committed state without the group's lock, so the copy can be older than it.
    view: BTreeMap<usize, EndpointState>,
    /// Groups this transaction's BEGIN DIALOGs named, with their queues.
    new_groups: BTreeMap<usize, usize>,
    /// (initiator side, message type) pairs a SEND of this transaction already checked.
    send_rules: BTreeSet<(bool, String)>,
}

/// An error the model expects, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    UnknownService,
    ContractNotAccepted,
    UnknownConversation,
    UnknownGroup,
    GroupOnOtherQueue,
    WrongQueue,
    LockTimeout(usize),
    CatalogLockTimeout,
    UnknownMessageType,
    ContractViolation,
    ValidationFailed,
    DuplicateHandle,
    AlreadyExists,
    /// With the state code the engine must name.
    ConversationClosed(&'static str),
    InvalidErrorCode,
}

/// What the model expects a RECEIVE to return: (receiving endpoint, its group, message).
type Batch = Vec<(usize, usize, ModelMessage)>;

#[derive(Debug, Default)]
struct Model {
    endpoints: Vec<ModelEndpoint>,
    groups: Vec<ModelGroup>,
    handles: HashMap<ConversationHandle, usize>,
    group_ids: HashMap<ConversationGroupId, usize>,
    /// Endpoints and groups whose real ids the test knows, in the order it learned them.
    known_endpoints: Vec<usize>,
    known_groups: Vec<usize>,
    /// Committed message types created by `CreateType` steps.
    created_types: BTreeSet<String>,
    /// Every name a `CreateType` step tried, committed or not.
    type_names: Vec<String>,
    next_order: u64,
    next_body: u64,
    txs: [Option<ModelTx>; SLOTS],
    /// The `ManualClock`'s time.
    now_ms: u64,
}

fn contract_rule(message_type: &str) -> Option<SentBy> {
    match message_type {
        REQUEST => Some(SentBy::Initiator),
        REPLY => Some(SentBy::Target),
        NOTE => Some(SentBy::Any),
        _ => None,
    }
}

/// The description END CONVERSATION WITH ERROR sends with `code`.
fn error_description(code: i32) -> String {
    format!("model error {code} <&>")
}

fn error_body(code: i32) -> Vec<u8> {
    system::error_body(code, &error_description(code))
}

fn body_passes(message_type: &str, form: BodyForm) -> bool {
    match message_type {
        REQUEST => form == BodyForm::Json,
        REPLY => form != BodyForm::BadUtf8,
        _ => true,
    }
}

impl Model {
    fn tx(&mut self, slot: usize) -> &mut ModelTx {
        self.txs[slot]
            .as_mut()
            .expect("the slot's transaction is open")
    }

    fn holder(&self, group: usize) -> Option<usize> {
        (0..SLOTS).find(|s| {
            self.txs[*s]
                .as_ref()
                .is_some_and(|t| t.locks.contains(&group))
        })
    }

    /// Whether `slot`'s transaction can use `endpoint`: it exists (committed, or created by
    /// it), or the transaction still has its copy.
    fn visible(&self, slot: usize, endpoint: usize) -> bool {
        let e = &self.endpoints[endpoint];
        (e.life == Life::Committed && !e.removed)
            || e.life == Life::Pending(slot)
            || self.txs[slot]
                .as_ref()
                .is_some_and(|t| t.view.contains_key(&endpoint))
    }

    /// The engine's `load_endpoint`: the transaction's copy, taken now if it has none.
    fn load(&mut self, slot: usize, endpoint: usize) -> Result<EndpointState, Refusal> {
        if let Some(state) = self.tx(slot).view.get(&endpoint) {
            return Ok(*state);
        }
        let e = &self.endpoints[endpoint];
        if e.life != Life::Committed || e.removed {
            return Err(Refusal::UnknownConversation);
        }
        let state = e.state;
        self.tx(slot).view.insert(endpoint, state);
        Ok(state)
    }

    /// The queue of `group` as `slot`'s transaction sees it (committed, or named by its BEGIN
    /// DIALOGs).
    fn group_queue(&self, slot: usize, group: usize) -> Option<usize> {
        if let Some(queue) = self.txs[slot]
            .as_ref()
            .and_then(|t| t.new_groups.get(&group))
        {
            return Some(*queue);
        }
        let g = &self.groups[group];
        (g.life == Life::Committed).then_some(g.queue)
    }

    fn resolve(&self, slot: usize, pick: Pick) -> Option<usize> {
        let choose = |candidates: Vec<usize>, i: u16| {
            (!candidates.is_empty()).then(|| candidates[i as usize % candidates.len()])
        };
        let visible = |targets_only: bool| -> Vec<usize> {
            self.known_endpoints
                .iter()
                .copied()
                .filter(|e| self.visible(slot, *e))
                .filter(|e| !targets_only || !self.endpoints[*e].initiator)
                .collect()
        };
        match pick {
            Pick::Visible(i) => choose(visible(false), i),
            // No target known yet: any endpoint the transaction sees.
            Pick::VisibleTarget(i) => {
                choose(visible(true), i).or_else(|| choose(visible(false), i))
            }
            Pick::Known(i) => choose(self.known_endpoints.clone(), i),
            Pick::Unknown => None,
        }
    }

    fn known_group(&self, i: u16) -> Option<usize> {
        (!self.known_groups.is_empty())
            .then(|| self.known_groups[i as usize % self.known_groups.len()])
    }

    /// Locks `group`; the first time, the transaction re-reads its copies of the group's
    /// committed endpoints (dropping those that are gone).
    fn lock(&mut self, slot: usize, group: usize) -> Result<(), Refusal> {
        match self.holder(group) {
            Some(other) if other != slot => return Err(Refusal::LockTimeout(group)),
            _ => {}
        }
        if !self.tx(slot).locks.insert(group) {
            return Ok(());
        }
        let copies: Vec<usize> = self.tx(slot).view.keys().copied().collect();
        for e in copies {
            let endpoint = &self.endpoints[e];
            if endpoint.group != group || endpoint.life != Life::Committed {
                continue;
            }
            let (removed, state) = (endpoint.removed, endpoint.state);
            let view = &mut self.tx(slot).view;
            if removed {
                view.remove(&e);
            } else {
                view.insert(e, state);
            }
        }
        Ok(())
    }

    /// The engine's `lock_endpoint_group`: locks the group of loaded `endpoint`, which is gone
    /// if re-reading it found it removed.
    fn lock_endpoint(&mut self, slot: usize, endpoint: usize) -> Result<usize, Refusal> {
        let group = self.endpoints[endpoint].group;
        self.lock(slot, group)?;
        if !self.tx(slot).view.contains_key(&endpoint) {
            return Err(Refusal::UnknownConversation);
        }
        Ok(group)
    }

    fn catalog_shared(&mut self, slot: usize) -> Result<(), Refusal> {
        if self.tx(slot).catalog != CatalogHold::None {
            return Ok(());
        }
        let written_by_other = (0..SLOTS).any(|s| {
            s != slot
                && self.txs[s]
                    .as_ref()
                    .is_some_and(|t| t.catalog == CatalogHold::Exclusive)
        });
        if written_by_other {
            return Err(Refusal::CatalogLockTimeout);
        }
        self.tx(slot).catalog = CatalogHold::Shared;
        Ok(())
    }

    fn catalog_exclusive(&mut self, slot: usize) -> Result<(), Refusal> {
        if self.tx(slot).catalog == CatalogHold::Exclusive {
            return Ok(());
        }
        let held_by_other = (0..SLOTS).any(|s| {
            s != slot
                && self.txs[s]
                    .as_ref()
                    .is_some_and(|t| t.catalog != CatalogHold::None)
        });
        if held_by_other {
            return Err(Refusal::CatalogLockTimeout);
        }
        self.tx(slot).catalog = CatalogHold::Exclusive;
        Ok(())
    }

    fn type_exists(&self, slot: usize, name: &str) -> bool {
        matches!(name, REQUEST | REPLY | NOTE | DEFAULT)
            || self.created_types.contains(name)
            || self.txs[slot]
                .as_ref()
                .is_some_and(|t| t.created_types.iter().any(|n| n == name))
    }

    fn new_group(&mut self, real: Option<ConversationGroupId>, queue: usize) -> usize {
        let index = self.groups.len();
        self.groups.push(ModelGroup {
            real,
            life: Life::Dead,
            queue,
        });
        if let Some(id) = real {
            self.group_ids.insert(id, index);
            self.known_groups.push(index);
        }
        index
    }

    /// BEGIN DIALOG as the engine checks it; on success returns the initiator's group, locked.
    fn begin_dialog(
        &mut self,
        slot: usize,
        from: usize,
        to: usize,
        related: ModelRelated,
    ) -> Result<usize, Refusal> {
        self.catalog_shared(slot)?;
        let Some(&(_, from_queue, _)) = SERVICES.get(from) else {
            return Err(Refusal::UnknownService);
        };
        let Some(&(_, _, accepts)) = SERVICES.get(to) else {
            unreachable!("dialogs with other brokers are skipped before they get here");
        };
        if !accepts {
            return Err(Refusal::ContractNotAccepted);
        }
        let group = match related {
            ModelRelated::New => self.new_group(None, from_queue),
            ModelRelated::Fresh(id) => self.new_group(Some(id), from_queue),
            ModelRelated::Group(group) => group,
            ModelRelated::Conversation(None) => return Err(Refusal::UnknownConversation),
            ModelRelated::Conversation(Some(endpoint)) => {
                self.load(slot, endpoint)?;
                self.endpoints[endpoint].group
            }
        };
        if let Some(queue) = self.group_queue(slot, group)
            && queue != from_queue
        {
            return Err(Refusal::GroupOnOtherQueue);
        }
        match related {
            ModelRelated::Conversation(Some(endpoint)) => {
                self.lock_endpoint(slot, endpoint)?;
            }
            _ => self.lock(slot, group)?,
        }
        self.tx(slot).new_groups.entry(group).or_insert(from_queue);
        if self.groups[group].life == Life::Dead {
            // New, gone with its last conversation, or created by a transaction that rolled
            // back: created now, on this queue.
            self.groups[group].life = Life::Pending(slot);
            self.groups[group].queue = from_queue;
        }
        Ok(group)
    }

    fn dialog_begun(
        &mut self,
        slot: usize,
        to: usize,
        group: usize,
        lifetime_ms: Option<u64>,
        handle: ConversationHandle,
    ) -> Result<(), String> {
        let initiator = self.endpoints.len();
        let target_queue = SERVICES[to].1;
        let target_group = self.new_group(None, target_queue);
        self.groups[target_group].life = Life::Pending(slot);
        let expires_ms = lifetime_ms.map(|ms| (self.now_ms + ms).max(1));
        for (is_initiator, group, far) in [
            (true, group, initiator + 1),
            (false, target_group, initiator),
        ] {
            self.endpoints.push(ModelEndpoint {
                real: None,
                life: Life::Pending(slot),
                initiator: is_initiator,
                group,
                far,
                send_sequence: 0,
                receive_sequence: 0,
                queue: BTreeMap::new(),
                state: if is_initiator {
                    EndpointState::StartedOutbound
                } else {
                    EndpointState::Conversing
                },
                removed: false,
                timer_ms: None,
                expires_ms,
            });
        }
        let tx = self.tx(slot);
        tx.view.insert(initiator, EndpointState::StartedOutbound);
        tx.view.insert(initiator + 1, EndpointState::Conversing);
        tx.new_groups.insert(target_group, target_queue);
        self.learn_endpoint(initiator, handle)
    }

    /// SEND on `targets` (`None`: a handle no one created) as the engine checks it; on success
    /// records the messages in the slot's transaction, and returns whether the engine accepted
    /// it only through the bug pinned by `a_send_on_an_endpoint_ended_since_its_copy_is_refused`
    /// (the state it checked is older than what locking the group re-read).
    fn send(
        &mut self,
        slot: usize,
        targets: &[Option<usize>],
        message_type: &str,
        form: BodyForm,
        body: &[u8],
    ) -> Result<bool, Refusal> {
        let mut seen = BTreeSet::new();
        let mut endpoints = Vec::new();
        for target in targets {
            match target {
                Some(e) if !seen.insert(*e) => return Err(Refusal::DuplicateHandle),
                Some(e) => {
                    self.load(slot, *e)?;
                    endpoints.push(*e);
                }
                None => return Err(Refusal::UnknownConversation),
            }
        }
        // Each handle's state (as the transaction's copy has it), then its contract rule (from
        // the catalog, unless this transaction checked the same rule before).
        for e in &endpoints {
            let state = self.tx(slot).view[e];
            if !state.can_send() {
                return Err(Refusal::ConversationClosed(state.code()));
            }
            let initiator = self.endpoints[*e].initiator;
            let rule = (initiator, message_type.to_owned());
            if self.tx(slot).send_rules.contains(&rule) {
                continue;
            }
            self.catalog_shared(slot)?;
            if !self.type_exists(slot, message_type) {
                return Err(Refusal::UnknownMessageType);
            }
            let allowed =
                contract_rule(message_type).is_some_and(|sent_by| sent_by.allows(initiator));
            if !allowed {
                return Err(Refusal::ContractViolation);
            }
            self.tx(slot).send_rules.insert(rule);
        }
        if !body_passes(message_type, form) {
            return Err(Refusal::ValidationFailed);
        }
        for e in &endpoints {
            self.lock_endpoint(slot, *e)?;
        }
        // Locking re-read the copies: the engine checks them again (an endpoint ended by
        // another transaction since this one took its copy is refused).
        if let Some(stale) = endpoints
            .iter()
            .find(|e| !self.tx(slot).view[*e].can_send())
        {
            return Err(Refusal::ConversationClosed(
                self.tx(slot).view[stale].code(),
            ));
        }
        let stale = false;
        for e in endpoints {
            let committed = self.endpoints[e].send_sequence;
            let tx = self.tx(slot);
            let sequence = tx.send_sequence.entry(e).or_insert(committed);
            let message = ModelMessage {
                key: Key::Sequence(*sequence),
                message_type: message_type.to_owned(),
                body: body.to_vec(),
                order: 0,
            };
            *sequence += 1;
            tx.ops.push(TxOp::Send(e, message));
            // The copy, as re-read when the group was locked, is what the send changes.
            let state = tx.view.get_mut(&e).expect("loaded above");
            if *state == EndpointState::StartedOutbound {
                *state = EndpointState::Conversing;
            }
        }
        Ok(stale)
    }

    /// END CONVERSATION as the engine checks it.
    fn end(&mut self, slot: usize, target: Option<usize>, how: EndHow) -> Result<(), Refusal> {
        if let EndHow::Error(code) = how
            && code <= 0
        {
            return Err(Refusal::InvalidErrorCode);
        }
        let e = target.ok_or(Refusal::UnknownConversation)?;
        self.load(slot, e)?;
        self.lock_endpoint(slot, e)?;
        let state = self.tx(slot).view[&e];
        if state.is_ended() && how != EndHow::Cleanup {
            return Err(Refusal::ConversationClosed(state.code()));
        }
        let tx = self.tx(slot);
        tx.view.insert(e, EndpointState::Closed);
        tx.ops.push(TxOp::End(e, how));
        Ok(())
    }

    /// BEGIN CONVERSATION TIMER as the engine checks it; returns the deadline.
    fn timer(
        &mut self,
        slot: usize,
        target: Option<usize>,
        timeout_ms: u64,
    ) -> Result<u64, Refusal> {
        let e = target.ok_or(Refusal::UnknownConversation)?;
        self.load(slot, e)?;
        self.lock_endpoint(slot, e)?;
        let state = self.tx(slot).view[&e];
        if state.is_ended() {
            return Err(Refusal::ConversationClosed(state.code()));
        }
        let deadline = self.now_ms + timeout_ms;
        self.tx(slot).ops.push(TxOp::Timer(e, deadline));
        Ok(deadline)
    }

    /// Whether committing `slot` would meet the engine bug pinned by
    /// `cleanup_of_an_endpoint_removed_under_a_held_group_lock_is_refused_or_harmless` and
    /// `end_conversation_with_cleanup_twice_in_one_transaction_commits`: one of its ops names an
    /// endpoint gone by the time the record applies it (removed by another transaction since
    /// this one took its copy, or by an earlier END of this one), which fails the commit with
    /// `Corruption` after it was logged.
    fn commit_hits_known_bug(&self, slot: usize) -> bool {
        let Some(tx) = self.txs[slot].as_ref() else {
            return false;
        };
        let committed = |e: &&ModelEndpoint| e.life == Life::Committed;
        let mut removed: BTreeSet<usize> = (0..self.endpoints.len())
            .filter(|e| committed(&&self.endpoints[*e]) && self.endpoints[*e].removed)
            .collect();
        let mut ended: BTreeSet<usize> = (0..self.endpoints.len())
            .filter(|e| committed(&&self.endpoints[*e]) && self.endpoints[*e].state.is_ended())
            .collect();
        for op in &tx.ops {
            let (TxOp::Send(e, _) | TxOp::Timer(e, _) | TxOp::End(e, _)) = op;
            if removed.contains(e) {
                return true;
            }
            if let TxOp::End(e, how) = op {
                ended.insert(*e);
                let far = self.endpoints[*e].far;
                if *how == EndHow::Cleanup {
                    removed.insert(*e);
                } else if removed.contains(&far) || ended.contains(&far) {
                    removed.insert(*e);
                    removed.insert(far);
                }
            }
        }
        false
    }

    /// Whether a RECEIVE could meet the engine bug pinned by
    /// `a_receive_after_end_conversation_in_one_transaction_commits`: it would take from a group
    /// holding a conversation this transaction ended.
    fn receive_hits_known_bug(&self, slot: usize, queue: usize, target: ModelTarget) -> bool {
        let Some(tx) = self.txs[slot].as_ref() else {
            return false;
        };
        let group = match target {
            ModelTarget::Conversation(e) => e.map(|e| self.endpoints[e].group),
            ModelTarget::Group(group) => Some(group),
            ModelTarget::Best => self.candidates(Some(slot), queue).first().copied(),
        };
        group.is_some_and(|group| {
            tx.ops.iter().any(
                |op| matches!(op, TxOp::End(ended, _) if self.endpoints[*ended].group == group),
            )
        })
    }

    /// The oldest committed message of `group`'s conversations, if any.
    fn oldest(&self, group: usize) -> Option<u64> {
        self.endpoints
            .iter()
            .filter(|e| e.group == group && e.life == Life::Committed && !e.removed)
            .filter_map(|e| e.queue.values().map(|m| m.order).min())
            .min()
    }

    /// The groups of `queue` with messages that a receiver in `slot` (`None`: a new transaction)
    /// may take, best first.
    fn candidates(&self, slot: Option<usize>, queue: usize) -> Vec<usize> {
        let mut candidates: Vec<(u64, usize)> = (0..self.groups.len())
            .filter(|g| self.groups[*g].life == Life::Committed && self.groups[*g].queue == queue)
            .filter(|g| self.holder(*g).is_none_or(|h| Some(h) == slot))
            .filter_map(|g| self.oldest(g).map(|oldest| (oldest, g)))
            .collect();
        candidates.sort_unstable();
        candidates.into_iter().map(|(_, g)| g).collect()
    }

    /// The messages a RECEIVE of at most `top` from locked `group` takes (only those of
    /// `only`, if set), in order: conversations oldest first, each in receive order (DialogTimer,
    /// Error, then by sequence).
    fn batch(&self, group: usize, only: Option<usize>, top: usize) -> Batch {
        if self.groups[group].life != Life::Committed {
            return Vec::new();
        }
        let mut conversations: Vec<(u64, usize)> = (0..self.endpoints.len())
            .filter(|e| only.is_none_or(|o| o == *e))
            .filter(|e| {
                let endpoint = &self.endpoints[*e];
                endpoint.group == group && endpoint.life == Life::Committed && !endpoint.removed
            })
            .filter_map(|e| {
                let oldest = self.endpoints[e].queue.values().map(|m| m.order).min()?;
                Some((oldest, e))
            })
            .collect();
        conversations.sort_unstable();
        conversations
            .into_iter()
            .flat_map(|(_, e)| {
                self.endpoints[e]
                    .queue
                    .values()
                    .map(move |m| (e, group, m.clone()))
            })
            .take(top)
            .collect()
    }

    /// RECEIVE as the engine does it; on success the batch is taken into the slot's transaction.
    fn receive(
        &mut self,
        slot: usize,
        queue: usize,
        top: usize,
        target: ModelTarget,
    ) -> Result<Batch, Refusal> {
        self.catalog_shared(slot)?;
        let (group, only) = match target {
            ModelTarget::Conversation(None) => return Err(Refusal::UnknownConversation),
            ModelTarget::Conversation(Some(e)) => {
                self.load(slot, e)?;
                let group = self.endpoints[e].group;
                if self.group_queue(slot, group) != Some(queue) {
                    return Err(Refusal::WrongQueue);
                }
                self.lock_endpoint(slot, e)?;
                (group, Some(e))
            }
            ModelTarget::Group(group) => {
                if self.group_queue(slot, group) != Some(queue) {
                    return Err(Refusal::UnknownGroup);
                }
                self.lock(slot, group)?;
                (group, None)
            }
            ModelTarget::Best => match self.candidates(Some(slot), queue).first() {
                Some(group) => {
                    self.lock(slot, *group)?;
                    (*group, None)
                }
                None => return Ok(Vec::new()),
            },
        };
        let batch = self.batch(group, only, top);
        for (e, _, message) in &batch {
            let taken = self.endpoints[*e]
                .queue
                .remove(&message.key)
                .expect("batched from the queue");
            let tx = self.tx(slot);
            if let Key::Sequence(sequence) = taken.key {
                let through = tx.received_through.entry(*e).or_insert(sequence);
                *through = (*through).max(sequence);
            }
            tx.taken.push((*e, taken));
        }
        Ok(batch)
    }

    fn create_type(&mut self, slot: usize, name: &str) -> Result<(), Refusal> {
        self.catalog_exclusive(slot)?;
        if self.type_exists(slot, name) {
            return Err(Refusal::AlreadyExists);
        }
        self.tx(slot).created_types.push(name.to_owned());
        if !self.type_names.iter().any(|n| n == name) {
            self.type_names.push(name.to_owned());
        }
        Ok(())
    }

    /// Queues a message for `endpoint` (whatever its state), as the next to arrive.
    fn deliver(
        &mut self,
        endpoint: usize,
        key: impl FnOnce(u64) -> Key,
        message_type: &str,
        body: Vec<u8>,
    ) {
        let order = self.next_order;
        self.next_order += 1;
        let key = key(order);
        self.endpoints[endpoint].queue.insert(
            key,
            ModelMessage {
                key,
                message_type: message_type.to_owned(),
                body,
                order,
            },
        );
    }

    /// Removes an endpoint (both sides ended, or WITH CLEANUP), and its group with its last
    /// conversation. Returns whether it was there.
    fn remove(&mut self, endpoint: usize) -> bool {
        let e = &mut self.endpoints[endpoint];
        if e.removed {
            return false;
        }
        e.removed = true;
        e.queue.clear();
        e.timer_ms = None;
        e.expires_ms = None;
        let group = e.group;
        let group_lives = self
            .endpoints
            .iter()
            .any(|e| e.group == group && e.life == Life::Committed && !e.removed);
        if !group_lives {
            self.groups[group].life = Life::Dead;
        }
        true
    }

    /// A committed END CONVERSATION (the engine's `State::end_conversation`); returns how many
    /// endpoints it removed.
    fn apply_end(&mut self, endpoint: usize, how: EndHow) -> u64 {
        let far = self.endpoints[endpoint].far;
        let e = &mut self.endpoints[endpoint];
        e.state = EndpointState::Closed;
        e.timer_ms = None;
        e.expires_ms = None;
        e.queue.clear();
        if how == EndHow::Cleanup {
            return u64::from(self.remove(endpoint));
        }
        let far_accepts =
            !self.endpoints[far].removed && self.endpoints[far].state.accepts_messages();
        match how {
            EndHow::Plain if far_accepts => {
                let sequence = self.endpoints[endpoint].send_sequence;
                self.endpoints[endpoint].send_sequence += 1;
                self.endpoints[far].state = EndpointState::DisconnectedInbound;
                self.deliver(
                    far,
                    |_| Key::Sequence(sequence),
                    system::END_DIALOG,
                    Vec::new(),
                );
            }
            EndHow::Error(code) if far_accepts => {
                self.endpoints[far].state = EndpointState::Error;
                self.deliver(
                    far,
                    |order| Key::Urgent(Lane::Error, order),
                    system::ERROR,
                    error_body(code),
                );
            }
            _ => {}
        }
        if self.endpoints[far].removed || self.endpoints[far].state.is_ended() {
            u64::from(self.remove(endpoint)) + u64::from(self.remove(far))
        } else {
            0
        }
    }

    fn commit(&mut self, slot: usize) -> Committed {
        let tx = self.txs[slot].take().expect("open");
        let mut done = Committed {
            received: tx.taken.len() as u64,
            ..Committed::default()
        };
        for e in 0..self.endpoints.len() {
            if self.endpoints[e].life == Life::Pending(slot) {
                self.endpoints[e].life = Life::Committed;
                // Its group may have gone with its last other conversation since this
                // transaction named it: committing the dialog creates it again.
                let group = self.endpoints[e].group;
                self.groups[group].life = Life::Committed;
            }
        }
        for group in &mut self.groups {
            if group.life == Life::Pending(slot) {
                group.life = Life::Committed;
            }
        }
        for op in tx.ops {
            match op {
                TxOp::Send(sender, message) => {
                    done.sent += 1;
                    let sequence = message.key.sequence();
                    let e = &mut self.endpoints[sender];
                    e.send_sequence = sequence + 1;
                    if e.state == EndpointState::StartedOutbound {
                        e.state = EndpointState::Conversing;
                    }
                    let far = e.far;
                    // Sends to a side that ended or failed are discarded.
                    if !self.endpoints[far].removed && self.endpoints[far].state.accepts_messages()
                    {
                        self.deliver(
                            far,
                            |_| Key::Sequence(sequence),
                            &message.message_type,
                            message.body,
                        );
                    }
                }
                TxOp::End(e, how) => {
                    done.ends[match how {
                        EndHow::Plain => 0,
                        EndHow::Error(_) => 1,
                        EndHow::Cleanup => 2,
                    }] += 1;
                    done.removed += self.apply_end(e, how);
                }
                TxOp::Timer(e, deadline) => {
                    done.timers += 1;
                    self.endpoints[e].timer_ms = Some(deadline);
                }
            }
        }
        for (endpoint, through) in tx.received_through {
            let endpoint = &mut self.endpoints[endpoint];
            endpoint.receive_sequence = endpoint.receive_sequence.max(through + 1);
        }
        self.created_types.extend(tx.created_types);
        done
    }

    fn rollback(&mut self, slot: usize) {
        let Some(tx) = self.txs[slot].take() else {
            return;
        };
        for endpoint in &mut self.endpoints {
            if endpoint.life == Life::Pending(slot) {
                endpoint.life = Life::Dead;
            }
        }
        for group in &mut self.groups {
            if group.life == Life::Pending(slot) {
                group.life = Life::Dead;
            }
        }
        for (endpoint, message) in tx.taken {
            if !self.endpoints[endpoint].removed {
                self.endpoints[endpoint].queue.insert(message.key, message);
            }
        }
    }

    /// Fires every timer and lifetime due at `now_ms`, as the engine does: one commit, in
    /// (deadline, handle, timer before lifetime) order. Returns (timers fired, lifetimes expired).
    fn fire_due(&mut self) -> (u64, u64) {
        let mut due: Vec<(u64, u128, u8, usize)> = Vec::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            if e.life != Life::Committed || e.removed {
                continue;
            }
            let handle = e.real.expect("committed endpoints are learned").0;
            if let Some(deadline) = e.timer_ms.filter(|d| *d <= self.now_ms) {
                due.push((deadline, handle, 0, i));
            }
            if let Some(deadline) = e.expires_ms.filter(|d| *d <= self.now_ms) {
                due.push((deadline, handle, 1, i));
            }
        }
        due.sort_unstable();
        let (mut timers, mut expiries) = (0, 0);
        for (_, _, kind, e) in due {
            if kind == 0 {
                timers += 1;
                self.endpoints[e].timer_ms = None;
                self.deliver(
                    e,
                    |order| Key::Urgent(Lane::DialogTimer, order),
                    system::DIALOG_TIMER,
                    Vec::new(),
                );
            } else {
                self.endpoints[e].expires_ms = None;
                if self.endpoints[e].state.accepts_messages() {
                    expiries += 1;
                    self.endpoints[e].state = EndpointState::Error;
                    self.deliver(
                        e,
                        |order| Key::Urgent(Lane::Error, order),
                        system::ERROR,
                        system::lifetime_expired_body(),
                    );
                }
            }
        }
        (timers, expiries)
    }

    fn learn_endpoint(
        &mut self,
        endpoint: usize,
        handle: ConversationHandle,
    ) -> Result<(), String> {
        match (self.endpoints[endpoint].real, self.handles.get(&handle)) {
            (Some(real), _) if real != handle => Err(format!(
                "model endpoint {endpoint} is conversation {real}, the engine says {handle}"
            )),
            (_, Some(other)) if *other != endpoint => Err(format!(
                "conversation {handle} is model endpoint {other}, the engine says {endpoint}"
            )),
            (Some(_), _) => Ok(()),
            (None, _) => {
                self.endpoints[endpoint].real = Some(handle);
                self.handles.insert(handle, endpoint);
                self.known_endpoints.push(endpoint);
                Ok(())
            }
        }
    }

    fn learn_group(&mut self, group: usize, id: ConversationGroupId) -> Result<(), String> {
        match (self.groups[group].real, self.group_ids.get(&id)) {
            (Some(real), _) if real != id => Err(format!(
                "model group {group} is {real}, the engine says {id}"
            )),
            (_, Some(other)) if *other != group => Err(format!(
                "group {id} is model group {other}, the engine says {group}"
            )),
            (Some(_), _) => Ok(()),
            (None, _) => {
                self.groups[group].real = Some(id);
                self.group_ids.insert(id, group);
                self.known_groups.push(group);
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum ModelRelated {
    New,
    Fresh(ConversationGroupId),
    Group(usize),
    Conversation(Option<usize>),
}

#[derive(Debug, Clone, Copy)]
enum ModelTarget {
    Best,
    Conversation(Option<usize>),
    Group(usize),
}

// ---------------------------------------------------------------------------------------------
// Running steps against the engine and the model

/// What the generated runs did, over all cases: a run that commits and receives nothing tests
/// nothing.
#[derive(Debug, Default)]
struct Totals {
    committed_sends: AtomicU64,
    committed_receives: AtomicU64,
    dialogs: AtomicU64,
    refusals: AtomicU64,
    lock_timeouts: AtomicU64,
    catalog_lock_timeouts: AtomicU64,
    rollbacks_with_taken: AtomicU64,
    reopens: AtomicU64,
    checkpoints: AtomicU64,
    /// Commits refused as larger than a log record may be.
    too_large: AtomicU64,
    audited_messages: AtomicU64,
    /// Batches (in RECEIVEs or drains) holding messages of several conversations.
    multi_conversation_batches: AtomicU64,
    /// Committed END CONVERSATIONs: plain, WITH ERROR, WITH CLEANUP.
    ends_plain: AtomicU64,
    ends_error: AtomicU64,
    ends_cleanup: AtomicU64,
    /// Endpoints removed (both sides ended, or cleaned up), as the model predicted.
    endpoints_removed: AtomicU64,
    /// SEND, END or BEGIN CONVERSATION TIMER refused on an ended, failed or closed endpoint.
    closed_refusals: AtomicU64,
    timers_set: AtomicU64,
    timers_fired: AtomicU64,
    /// Lifetimes that expired on an open endpoint (ERROR state and an Error message).
    expiries: AtomicU64,
    /// Deadlines that came due while the broker was closed and fired when it opened.
    fired_at_open: AtomicU64,
    /// System messages (DialogTimer, Error, EndDialog) in RECEIVE batches, and batches where a
    /// conversation's urgent message came ahead of its sequenced ones.
    system_messages_received: AtomicU64,
    precedence_batches: AtomicU64,
    /// Steps not run because the engine would hit a known bug (see the ignored tests below).
    skipped_known_bugs: AtomicU64,
}

fn options() -> Options {
    Options {
        durability: Durability::None,
        lock_timeout: Duration::from_millis(10),
        // Small segments and frequent checkpoints: the log rolls over, segments are released and
        // compacted, and a reopen recovers from a checkpoint plus the log after it.
        segment_bytes: 4 * 1024,
        checkpoint_interval_bytes: 1024,
        ..Options::default()
    }
}

/// The generated runs' options: time is a `ManualClock` the steps move.
fn model_options(clock: &Arc<ManualClock>) -> Options {
    Options {
        lock_timeout: LOCK_TIMEOUT,
        clock: clock.clone(),
        ..options()
    }
}

fn setup(broker: &Broker) {
    let mut tx = broker.begin();
    tx.create_message_type(REQUEST, Validation::Json).unwrap();
    tx.create_message_type(REPLY, Validation::Utf8).unwrap();
    tx.create_message_type(NOTE, Validation::None).unwrap();
    tx.create_contract(
        CONTRACT,
        &[
            (REQUEST, SentBy::Initiator),
            (REPLY, SentBy::Target),
            (NOTE, SentBy::Any),
        ],
    )
    .unwrap();
    // The audit's drain rolls back after every step: with poison-message protection on, it
    // would disable the queues. Poison counting has its own tests (`life_cycle.rs`).
    let options = QueueOptions {
        poison_message_handling: false,
        ..QueueOptions::default()
    };
    for queue in QUEUES {
        tx.create_queue(queue, options).unwrap();
    }
    for (name, queue, accepts) in SERVICES {
        let contracts: &[&str] = if accepts { &[CONTRACT] } else { &[] };
        tx.create_service(name, QUEUES[queue], contracts).unwrap();
    }
    tx.commit().unwrap();
}

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

fn body(form: BodyForm, n: u64, pad: usize) -> Vec<u8> {
    let json = format!("{{\"n\": {n}, \"pad\": \"{}\"}}", ".".repeat(pad)).into_bytes();
    match form {
        BodyForm::Json => json,
        BodyForm::BadJson => json[..json.len() - 1].to_vec(),
        BodyForm::BadUtf8 => [&[0xff][..], &json].concat(),
    }
}

struct Session<'b> {
    broker: &'b Broker,
    clock: &'b Arc<ManualClock>,
    slots: [Option<Transaction<'b>>; SLOTS],
    totals: &'b Totals,
}

impl<'b> Session<'b> {
    /// The slot's transaction, begun if the slot is idle.
    fn tx(&mut self, model: &mut Model, slot: usize) -> &mut Transaction<'b> {
        if self.slots[slot].is_none() {
            self.slots[slot] = Some(self.broker.begin());
            model.txs[slot] = Some(ModelTx::default());
        }
        self.slots[slot].as_mut().expect("just begun")
    }

    /// Compares a refusal the model expected with the engine's error (learning the group a lock
    /// timeout names).
    fn same_refusal(
        &self,
        model: &mut Model,
        expected: &Refusal,
        actual: &Error,
    ) -> Result<(), TestCaseError> {
        let same = match (expected, actual) {
            (Refusal::UnknownService, Error::UnknownService(_))
            | (Refusal::ContractNotAccepted, Error::ContractNotAccepted { .. })
            | (Refusal::UnknownConversation, Error::UnknownConversation(_))
            | (Refusal::UnknownGroup, Error::UnknownConversationGroup { .. })
            | (Refusal::GroupOnOtherQueue, Error::GroupOnOtherQueue { .. })
            | (Refusal::WrongQueue, Error::WrongQueue { .. })
            | (Refusal::CatalogLockTimeout, Error::CatalogLockTimeout { .. })
            | (Refusal::UnknownMessageType, Error::UnknownMessageType(_))
            | (Refusal::ContractViolation, Error::ContractViolation { .. })
            | (Refusal::ValidationFailed, Error::ValidationFailed { .. })
            | (Refusal::DuplicateHandle, Error::DuplicateHandle(_))
            | (Refusal::AlreadyExists, Error::AlreadyExists { .. }) => true,
            (Refusal::LockTimeout(group), Error::LockTimeout { group: id, .. }) => {
                model.learn_group(*group, *id).map_err(fail)?;
                true
            }
            (Refusal::ConversationClosed(expected), Error::ConversationClosed { state, .. }) => {
                expected == state
            }
            (Refusal::InvalidErrorCode, Error::InvalidErrorCode(_)) => true,
            _ => false,
        };
        if !same {
            return Err(fail(format!(
                "the model expected {expected:?}, the engine failed with: {actual}"
            )));
        }
        let counter = match expected {
            Refusal::LockTimeout(_) => &self.totals.lock_timeouts,
            Refusal::CatalogLockTimeout => &self.totals.catalog_lock_timeouts,
            Refusal::ConversationClosed(_) => &self.totals.closed_refusals,
            _ => &self.totals.refusals,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Compares an outcome with the model's expectation; `Ok` pairs are compared by the caller.
    fn outcome<T: std::fmt::Debug, U: std::fmt::Debug>(
        &self,
        model: &mut Model,
        what: &str,
        expected: Result<T, Refusal>,
        actual: Result<U, Error>,
    ) -> Result<Option<(T, U)>, TestCaseError> {
        match (expected, actual) {
            (Ok(expected), Ok(actual)) => Ok(Some((expected, actual))),
            (Err(expected), Err(actual)) => {
                self.same_refusal(model, &expected, &actual)?;
                Ok(None)
            }
            (Ok(expected), Err(actual)) => Err(fail(format!(
                "{what}: the model expected success ({expected:?}), the engine failed with: \
                 {actual}"
            ))),
            (Err(expected), Ok(actual)) => Err(fail(format!(
                "{what}: the model expected {expected:?}, the engine succeeded with {actual:?}"
            ))),
        }
    }

    fn apply(&mut self, model: &mut Model, step: &Step) -> Result<(), TestCaseError> {
        match step {
            Step::Dialog {
                slot,
                from,
                to,
                related,
                fit_from,
                lifetime_ms,
            } => {
                let (slot, mut from, to) = (*slot, *from, *to);
                let name = |s: usize| SERVICES.get(s).map_or(NO_SERVICE, |s| s.0);
                let mut options = DialogOptions {
                    lifetime: lifetime_ms.map(Duration::from_millis),
                    ..DialogOptions::default()
                };
                let related = match *related {
                    Related::None => ModelRelated::New,
                    Related::FreshGroup => {
                        let id = ConversationGroupId::random();
                        options.related_conversation_group = Some(id);
                        ModelRelated::Fresh(id)
                    }
                    Related::Group(i) => match model.known_group(i) {
                        Some(group) => {
                            options.related_conversation_group = model.groups[group].real;
                            ModelRelated::Group(group)
                        }
                        None => ModelRelated::New,
                    },
                    Related::Conversation(pick) => {
                        let endpoint = model.resolve(slot, pick);
                        options.related_conversation = Some(
                            endpoint
                                .and_then(|e| model.endpoints[e].real)
                                .unwrap_or_else(ConversationHandle::random),
                        );
                        ModelRelated::Conversation(endpoint)
                    }
                };
                let related_queue = match related {
                    ModelRelated::Group(group) => Some(model.groups[group].queue),
                    ModelRelated::Conversation(Some(e)) => {
                        Some(model.groups[model.endpoints[e].group].queue)
                    }
                    _ => None,
                };
                if let Some(queue) = related_queue
                    && *fit_from
                {
                    let fitting: Vec<usize> = (0..SERVICES.len())
                        .filter(|s| SERVICES[*s].1 == queue && SERVICES[*s].2)
                        .collect();
                    from = fitting[from % fitting.len()];
                }
                if to >= SERVICES.len() {
                    // A service that is not here: a dialog with another broker, its messages
                    // in the transmission queue (`tests/remote.rs`); not modelled here.
                    return Ok(());
                }
                let actual =
                    self.tx(model, slot)
                        .begin_dialog(name(from), name(to), CONTRACT, options);
                let expected = model.begin_dialog(slot, from, to, related);
                if let Some((group, handle)) =
                    self.outcome(model, "BEGIN DIALOG", expected, actual)?
                {
                    model
                        .dialog_begun(slot, to, group, *lifetime_ms, handle)
                        .map_err(fail)?;
                    self.totals.dialogs.fetch_add(1, Ordering::Relaxed);
                }
            }
            Step::Send {
                slot,
                handles,
                message_type,
                body: form,
                count,
                pad,
            } => {
                let slot = *slot;
                self.tx(model, slot);
                let targets: Vec<Option<usize>> =
                    handles.iter().map(|p| model.resolve(slot, *p)).collect();
                let real: Vec<ConversationHandle> = targets
                    .iter()
                    .map(|t| {
                        t.and_then(|e| model.endpoints[e].real)
                            .unwrap_or_else(ConversationHandle::random)
                    })
                    .collect();
                let message_type = match message_type {
                    TypePick::Natural => {
                        let sides: BTreeSet<bool> = targets
                            .iter()
                            .flatten()
                            .map(|e| model.endpoints[*e].initiator)
                            .collect();
                        match sides.into_iter().collect::<Vec<_>>()[..] {
                            [true] => REQUEST.to_owned(),
                            [false] => REPLY.to_owned(),
                            _ => NOTE.to_owned(),
                        }
                    }
                    TypePick::Request => REQUEST.to_owned(),
                    TypePick::Reply => REPLY.to_owned(),
                    TypePick::Note => NOTE.to_owned(),
                    TypePick::Default => DEFAULT.to_owned(),
                    TypePick::Unknown => NO_TYPE.to_owned(),
                    TypePick::Created(i) if !model.type_names.is_empty() => {
                        model.type_names[*i as usize % model.type_names.len()].clone()
                    }
                    TypePick::Created(_) => NO_TYPE.to_owned(),
                };
                for _ in 0..*count {
                    let bytes = body(*form, model.next_body, *pad);
                    model.next_body += 1;
                    let tx = self.slots[slot].as_mut().expect("begun above");
                    let actual = if real.len() == 1 {
                        tx.send(real[0], &message_type, &bytes)
                    } else {
                        tx.send_many(&real, &message_type, &bytes)
                    };
                    let expected = model.send(slot, &targets, &message_type, *form, &bytes);
                    match self.outcome(model, "SEND", expected, actual)? {
                        None => break,
                        Some((true, ())) => {
                            // Accepted through a known engine bug: its commit would deliver
                            // after an EndDialog, or fail. Not committed.
                            if let Some(tx) = self.slots[slot].take() {
                                tx.rollback();
                            }
                            model.rollback(slot);
                            self.totals
                                .skipped_known_bugs
                                .fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Some((false, ())) => {}
                    }
                }
            }
            Step::Receive {
                slot,
                queue,
                top,
                target,
                fit_queue,
            } => {
                let (slot, mut queue, top) = (*slot, *queue, *top);
                let mut what = Receive::top(top);
                let target = match *target {
                    None => ModelTarget::Best,
                    Some(Target::Conversation(pick)) => {
                        let endpoint = model.resolve(slot, pick);
                        what = what.conversation(
                            endpoint
                                .and_then(|e| model.endpoints[e].real)
                                .unwrap_or_else(ConversationHandle::random),
                        );
                        ModelTarget::Conversation(endpoint)
                    }
                    Some(Target::Group(i)) => match model.known_group(i) {
                        Some(group) => {
                            what = what.group(model.groups[group].real.expect("known"));
                            ModelTarget::Group(group)
                        }
                        None => ModelTarget::Best,
                    },
                };
                let target_queue = match target {
                    ModelTarget::Conversation(Some(e)) => {
                        Some(model.groups[model.endpoints[e].group].queue)
                    }
                    ModelTarget::Group(group) => Some(model.groups[group].queue),
                    _ => None,
                };
                if let Some(target_queue) = target_queue
                    && *fit_queue
                {
                    queue = target_queue;
                }
                if model.receive_hits_known_bug(slot, queue, target) {
                    // See `a_receive_after_end_conversation_in_one_transaction_commits`.
                    self.totals
                        .skipped_known_bugs
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                let actual = self.tx(model, slot).receive(QUEUES[queue], what);
                let expected = model.receive(slot, queue, top, target);
                if let Some((expected, actual)) =
                    self.outcome(model, "RECEIVE", expected, actual)?
                {
                    same_batch(model, "RECEIVE", &expected, &actual)?;
                    self.count_batch(&expected);
                }
            }
            Step::End { slot, pick, how } => {
                let slot = *slot;
                self.tx(model, slot);
                let target = model.resolve(slot, *pick);
                let handle = target
                    .and_then(|e| model.endpoints[e].real)
                    .unwrap_or_else(ConversationHandle::random);
                let tx = self.slots[slot].as_mut().expect("begun above");
                let actual = match how {
                    EndHow::Plain => tx.end_conversation(handle),
                    EndHow::Error(code) => {
                        tx.end_conversation_with_error(handle, *code, &error_description(*code))
                    }
                    EndHow::Cleanup => tx.end_conversation_with_cleanup(handle),
                };
                let expected = model.end(slot, target, *how);
                self.outcome(model, "END CONVERSATION", expected, actual)?;
            }
            Step::Timer {
                slot,
                pick,
                timeout_ms,
            } => {
                let slot = *slot;
                self.tx(model, slot);
                let target = model.resolve(slot, *pick);
                let handle = target
                    .and_then(|e| model.endpoints[e].real)
                    .unwrap_or_else(ConversationHandle::random);
                let actual = self.slots[slot]
                    .as_mut()
                    .expect("begun above")
                    .begin_conversation_timer(handle, Duration::from_millis(*timeout_ms));
                let expected = model.timer(slot, target, *timeout_ms);
                self.outcome(model, "BEGIN CONVERSATION TIMER", expected, actual)?;
            }
            Step::Advance { ms } => {
                self.clock.advance(Duration::from_millis(*ms));
                model.now_ms += ms;
                self.fired(model.fire_due(), false);
            }
            Step::CreateType { slot, duplicate } => {
                let slot = *slot;
                let name = if *duplicate {
                    NOTE.to_owned()
                } else {
                    format!("//m/Created{}", model.type_names.len())
                };
                let actual = self
                    .tx(model, slot)
                    .create_message_type(&name, Validation::None);
                let expected = model.create_type(slot, &name);
                self.outcome(model, "CREATE MESSAGE TYPE", expected, actual)?;
            }
            Step::Commit { slot } => {
                if model.commit_hits_known_bug(*slot) {
                    if let Some(tx) = self.slots[*slot].take() {
                        tx.rollback();
                    }
                    model.rollback(*slot);
                    self.totals
                        .skipped_known_bugs
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                if let Some(tx) = self.slots[*slot].take() {
                    let body_bytes: usize = model
                        .tx(*slot)
                        .ops
                        .iter()
                        .map(|op| match op {
                            TxOp::Send(_, m) => m.body.len(),
                            _ => 0,
                        })
                        .sum();
                    match tx.commit() {
                        // Documented: nothing applied, the transaction rolled back. Only a
                        // transaction near the record limit may meet it.
                        Err(Error::TransactionTooLarge { max, .. }) if body_bytes >= max / 2 => {
                            model.rollback(*slot);
                            self.totals.too_large.fetch_add(1, Ordering::Relaxed);
                            return Ok(());
                        }
                        result => result.map_err(|e| fail(format!("commit: {e}")))?,
                    }
                    let done = model.commit(*slot);
                    let add = |counter: &AtomicU64, n: u64| {
                        counter.fetch_add(n, Ordering::Relaxed);
                    };
                    add(&self.totals.committed_sends, done.sent);
                    add(&self.totals.committed_receives, done.received);
                    add(&self.totals.ends_plain, done.ends[0]);
                    add(&self.totals.ends_error, done.ends[1]);
                    add(&self.totals.ends_cleanup, done.ends[2]);
                    add(&self.totals.timers_set, done.timers);
                    add(&self.totals.endpoints_removed, done.removed);
                    self.learn_targets(model)?;
                    // A timer or lifetime already due when its commit applied fires on the timer
                    // thread; a zero step of the clock waits for that firing.
                    self.clock.advance(Duration::ZERO);
                    self.fired(model.fire_due(), false);
                }
            }
            Step::Rollback { slot } | Step::Drop { slot } => {
                if let Some(tx) = self.slots[*slot].take() {
                    if matches!(step, Step::Rollback { .. }) {
                        tx.rollback();
                    } else {
                        drop(tx);
                    }
                    if !model.tx(*slot).taken.is_empty() {
                        self.totals
                            .rollbacks_with_taken
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    model.rollback(*slot);
                }
            }
            Step::Checkpoint => {
                self.broker
                    .checkpoint()
                    .map_err(|e| fail(format!("checkpoint: {e}")))?;
                self.totals.checkpoints.fetch_add(1, Ordering::Relaxed);
            }
            Step::Reopen { .. } => unreachable!("handled by `run`"),
        }
        Ok(())
    }

    fn count_batch(&self, batch: &Batch) {
        if batch.iter().any(|(e, _, _)| *e != batch[0].0) {
            self.totals
                .multi_conversation_batches
                .fetch_add(1, Ordering::Relaxed);
        }
        let system = batch
            .iter()
            .filter(|(_, _, m)| system::is_system_message_type(&m.message_type))
            .count();
        self.totals
            .system_messages_received
            .fetch_add(system as u64, Ordering::Relaxed);
        let ahead = batch.windows(2).any(|w| {
            w[0].0 == w[1].0
                && matches!(w[0].2.key, Key::Urgent(..))
                && matches!(w[1].2.key, Key::Sequence(_))
        });
        if ahead {
            self.totals
                .precedence_batches
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn fired(&self, (timers, expiries): (u64, u64), at_open: bool) {
        self.totals
            .timers_fired
            .fetch_add(timers, Ordering::Relaxed);
        self.totals.expiries.fetch_add(expiries, Ordering::Relaxed);
        if at_open {
            self.totals
                .fired_at_open
                .fetch_add(timers + expiries, Ordering::Relaxed);
        }
    }

    /// Learns the target handle of each committed dialog (the timers of both sides fire in
    /// handle order, so the model must know them): the endpoint whose far side is the
    /// initiator, which is gone only if the model removed it too.
    fn learn_targets(&self, model: &mut Model) -> Result<(), TestCaseError> {
        let unknown: Vec<(usize, ConversationHandle)> = model
            .endpoints
            .iter()
            .filter(|e| e.initiator && e.life == Life::Committed)
            .filter(|e| model.endpoints[e.far].real.is_none())
            .map(|e| {
                (
                    e.far,
                    e.real.expect("initiators are learned at BEGIN DIALOG"),
                )
            })
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let targets: HashMap<ConversationHandle, ConversationHandle> = self
            .broker
            .conversation_endpoints()
            .into_iter()
            .filter(|e| !e.is_initiator)
            .filter_map(|e| Some((e.far_handle?, e.handle)))
            .collect();
        for (target, initiator) in unknown {
            match targets.get(&initiator) {
                Some(handle) => model.learn_endpoint(target, *handle).map_err(fail)?,
                None if model.endpoints[target].removed => {}
                None => {
                    return Err(fail(format!(
                        "the target of dialog {initiator} (model endpoint {target}) is gone"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The committed endpoints are the model's: gone once removed, else in its state, with its
    /// timer and lifetime deadlines and its far side.
    fn audit_endpoints(&self, model: &Model) -> Result<(), TestCaseError> {
        for (i, e) in model.endpoints.iter().enumerate() {
            let (Life::Committed, Some(real)) = (e.life, e.real) else {
                continue;
            };
            let actual = self.broker.conversation_endpoint(real);
            let Some(actual) = actual else {
                if e.removed {
                    continue;
                }
                return Err(fail(format!(
                    "endpoint {real} (model {i}) is gone; the model has it in state {}",
                    e.state.code()
                )));
            };
            let expected = (
                !e.removed,
                e.state,
                e.timer_ms,
                e.expires_ms,
                model.endpoints[e.far].real.or(actual.far_handle),
            );
            let got = (
                true,
                actual.state,
                actual.dialog_timer_ms,
                actual.expires_at_ms,
                actual.far_handle,
            );
            if expected != got {
                return Err(fail(format!(
                    "endpoint {real} (model {i}): the model expected (exists, state, timer, \
                     expires, far) = {expected:?}, the engine has {got:?}"
                )));
            }
        }
        Ok(())
    }

    /// After every step: the invariants hold, and a new transaction sees exactly the committed
    /// messages of the groups no open transaction holds.
    fn audit(&mut self, model: &mut Model) -> Result<(), TestCaseError> {
        invariants::check(self.broker).map_err(fail)?;
        self.audit_endpoints(model)?;
        if self.slots.iter().all(Option::is_none) {
            invariants::check_idle(self.broker).map_err(fail)?;
        }
        let catalog_written = model
            .txs
            .iter()
            .flatten()
            .any(|t| t.catalog == CatalogHold::Exclusive);
        if catalog_written {
            // A new transaction would wait for the catalog (tested by the steps themselves).
            return Ok(());
        }
        let mut drain = self.broker.begin();
        for (queue, name) in QUEUES.iter().enumerate() {
            for group in model.candidates(None, queue) {
                let expected = model.batch(group, None, DRAIN_TOP);
                let actual = drain
                    .receive(name, Receive::top(DRAIN_TOP))
                    .map_err(|e| fail(format!("draining {name}: {e}")))?;
                self.totals
                    .audited_messages
                    .fetch_add(actual.len() as u64, Ordering::Relaxed);
                same_batch(model, "drain", &expected, &actual)?;
                self.count_batch(&expected);
            }
            let rest = drain
                .receive(name, Receive::top(DRAIN_TOP))
                .map_err(|e| fail(format!("draining {name}: {e}")))?;
            if !rest.is_empty() {
                return Err(fail(format!(
                    "draining {name}: the model has nothing more for a new receiver, the engine \
                     returned {:?}",
                    summary(&rest)
                )));
            }
        }
        invariants::check(self.broker).map_err(fail)?;
        drain.rollback();
        invariants::check(self.broker).map_err(fail)?;
        Ok(())
    }

    /// Ends every open transaction (leaking it when `forget`): what it did must vanish.
    fn close_all(&mut self, model: &mut Model, forget: bool) {
        for slot in 0..SLOTS {
            if let Some(tx) = self.slots[slot].take() {
                if forget {
                    std::mem::forget(tx);
                } else {
                    drop(tx);
                }
            }
            model.rollback(slot);
        }
    }
}

fn summary(batch: &[Message]) -> Vec<(ConversationHandle, u64)> {
    batch
        .iter()
        .map(|m| (m.conversation_handle, m.sequence))
        .collect()
}

/// The engine's batch is the model's: same messages in the same order, from the endpoints and
/// groups the model says (learning their ids when first seen).
fn same_batch(
    model: &mut Model,
    what: &str,
    expected: &Batch,
    actual: &[Message],
) -> Result<(), TestCaseError> {
    let expected_summary: Vec<(usize, u64)> = expected
        .iter()
        .map(|(e, _, m)| (*e, m.key.sequence()))
        .collect();
    if expected.len() != actual.len() {
        return Err(fail(format!(
            "{what}: the model expected {expected_summary:?} (endpoint, sequence), the engine \
             returned {:?}",
            summary(actual)
        )));
    }
    for ((endpoint, group, message), got) in expected.iter().zip(actual) {
        if got.sequence != message.key.sequence()
            || *got.message_type != message.message_type
            || got.body() != message.body
        {
            return Err(fail(format!(
                "{what}: the model expected message {} of endpoint {endpoint} ({:?}, body {:?}), \
                 the engine returned message {} of {} ({:?}, body {:?}); whole batch expected \
                 {expected_summary:?}, got {:?}",
                message.key.sequence(),
                message.message_type,
                String::from_utf8_lossy(&message.body),
                got.sequence,
                got.conversation_handle,
                got.message_type,
                String::from_utf8_lossy(got.body()),
                summary(actual)
            )));
        }
        model
            .learn_endpoint(*endpoint, got.conversation_handle)
            .map_err(|e| fail(format!("{what}: {e}")))?;
        model
            .learn_group(*group, got.conversation_group)
            .map_err(|e| fail(format!("{what}: {e}")))?;
    }
    Ok(())
}

/// Runs one generated case on a fresh directory.
fn run(steps: &[Step], totals: &Totals) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(fail)?;
    let clock = ManualClock::new(START_MS);
    let mut model = Model {
        now_ms: START_MS,
        ..Model::default()
    };
    // A few committed dialogs to start from, so that early steps have conversations to use:
    // A → B, C → B in A's group, B → A.
    let start = [
        Step::Dialog {
            slot: 0,
            from: 0,
            to: 1,
            related: Related::None,
            fit_from: false,
            lifetime_ms: None,
        },
        Step::Dialog {
            slot: 0,
            from: 2,
            to: 1,
            related: Related::Conversation(Pick::Visible(0)),
            fit_from: false,
            lifetime_ms: None,
        },
        Step::Dialog {
            slot: 0,
            from: 1,
            to: 0,
            related: Related::None,
            fit_from: false,
            lifetime_ms: None,
        },
        Step::Commit { slot: 0 },
    ];
    let mut steps = start.iter().chain(steps);
    let mut first = true;
    loop {
        let broker = Broker::open(dir.path(), model_options(&clock))
            .map_err(|e| fail(format!("open: {e}")))?;
        if first {
            setup(&broker);
            first = false;
        }
        let mut session = Session {
            broker: &broker,
            clock: &clock,
            slots: std::array::from_fn(|_| None),
            totals,
        };
        // Deadlines that passed while the broker was closed fired as it opened.
        session.fired(model.fire_due(), true);
        session.audit(&mut model)?;
        let mut reopen = None;
        for step in steps.by_ref() {
            if let Step::Reopen { forget, closed_ms } = step {
                reopen = Some((*forget, *closed_ms));
                break;
            }
            session.apply(&mut model, step)?;
            session.audit(&mut model)?;
        }
        session.close_all(&mut model, reopen.is_some_and(|(forget, _)| forget));
        let Some((_, closed_ms)) = reopen else {
            session.audit(&mut model)?;
            return Ok(());
        };
        drop(session);
        drop(broker);
        clock.advance(Duration::from_millis(closed_ms));
        model.now_ms += closed_ms;
        totals.reopens.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn the_engine_matches_the_model() {
    let seed = std::env::var("HERALD_MODEL_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("HERALD_MODEL_SEED is a u64"))
        .unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        });
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    });
    let totals = Totals::default();
    let result = runner.run(
        &proptest::collection::vec(step(), STEPS_MIN..STEPS_MAX),
        |steps| run(&steps, &totals),
    );
    if let Err(e) = result {
        panic!("{e}\nreplay with HERALD_MODEL_SEED={seed}");
    }
    // A run that did nothing tests nothing: each kind of work happened, in some case.
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    eprintln!("model run (seed {seed}): {totals:?}");
    assert!(count(&totals.dialogs) > 0, "no dialog began: {totals:?}");
    assert!(
        count(&totals.committed_sends) > 100,
        "too few sends committed: {totals:?}"
    );
    assert!(
        count(&totals.committed_receives) > 50,
        "too few receives committed: {totals:?}"
    );
    assert!(
        count(&totals.audited_messages) > 0,
        "no drain saw a message: {totals:?}"
    );
    assert!(
        count(&totals.lock_timeouts) > 0,
        "no group lock was contended: {totals:?}"
    );
    assert!(
        count(&totals.catalog_lock_timeouts) > 0,
        "no catalog lock was contended: {totals:?}"
    );
    assert!(
        count(&totals.rollbacks_with_taken) > 0,
        "no RECEIVE was rolled back: {totals:?}"
    );
    assert!(
        count(&totals.multi_conversation_batches) > 0,
        "no batch held several conversations of a group: {totals:?}"
    );
    assert!(
        count(&totals.refusals) > 0,
        "no operation was refused: {totals:?}"
    );
    assert!(count(&totals.reopens) > 0, "no reopen: {totals:?}");
    assert!(count(&totals.checkpoints) > 0, "no checkpoint: {totals:?}");
    // The life cycle: each form of END, removals, timers set and fired (also at open),
    // lifetimes expired, refusals on closed endpoints, system messages ahead of the sequence.
    for (counter, what) in [
        (&totals.ends_plain, "plain END CONVERSATION committed"),
        (&totals.ends_error, "END CONVERSATION WITH ERROR committed"),
        (
            &totals.ends_cleanup,
            "END CONVERSATION WITH CLEANUP committed",
        ),
        (&totals.endpoints_removed, "endpoint removed"),
        (
            &totals.closed_refusals,
            "operation refused on a closed endpoint",
        ),
        (&totals.timers_set, "conversation timer committed"),
        (&totals.timers_fired, "conversation timer fired"),
        (&totals.expiries, "dialog lifetime expired"),
        (&totals.system_messages_received, "system message received"),
        (
            &totals.precedence_batches,
            "batch with an urgent message ahead of the sequence",
        ),
    ] {
        assert!(count(counter) >= 10, "fewer than 10 of: {what}: {totals:?}");
    }
    assert!(
        count(&totals.fired_at_open) >= 3,
        "fewer than 3 deadlines fired at open: {totals:?}"
    );
}

/// Regression: a SEND refused before it took its group's lock left this transaction's copy of the
/// endpoint behind; once another transaction had committed sends on it, the retried SEND reused
/// sequence 0, the commit record failed to apply (`Corruption`) after it was logged, and every
/// later commit and every reopen failed on it.
#[test]
fn a_refused_send_does_not_leave_a_stale_sequence_behind() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    setup(&broker);
    let mut tx = broker.begin();
    let h = tx
        .begin_dialog("//m/A", "//m/B", CONTRACT, DialogOptions::default())
        .unwrap();
    tx.commit().unwrap();

    let mut first = broker.begin();
    first.send(h, REQUEST, b"1").unwrap();
    let mut second = broker.begin();
    for refused in [&b"{"[..], b"\xff"] {
        assert!(matches!(
            second.send(h, REQUEST, refused),
            Err(Error::ValidationFailed { .. })
        ));
    }
    assert!(matches!(
        second.send(h, REQUEST, b"2"),
        Err(Error::LockTimeout { .. })
    ));
    first.commit().unwrap();
    second.send(h, REQUEST, b"2").unwrap();
    second.commit().unwrap();
    invariants::check_idle(&broker).unwrap();
    drop(broker);

    let broker = Broker::open(dir.path(), options()).unwrap();
    invariants::check_idle(&broker).unwrap();
    let mut tx = broker.begin();
    let got = tx.receive(QUEUES[1], Receive::top(10)).unwrap();
    let got: Vec<(u64, &[u8])> = got.iter().map(|m| (m.sequence, m.body())).collect();
    assert_eq!(got, vec![(0, &b"1"[..]), (1, &b"2"[..])]);
}

/// A dialog A → B on the model's catalog, committed: (initiator handle, target handle).
fn committed_dialog(broker: &Broker) -> (ConversationHandle, ConversationHandle) {
    let mut tx = broker.begin();
    let h = tx
        .begin_dialog("//m/A", "//m/B", CONTRACT, DialogOptions::default())
        .unwrap();
    tx.send(h, REQUEST, b"{}").unwrap();
    tx.commit().unwrap();
    let far = broker.conversation_endpoint(h).unwrap().far_handle.unwrap();
    (h, far)
}

/// Regression test for a fixed engine bug: a transaction that ended a conversation and then received its messages logs
/// `EndConversation` before `Receive`; when the END removes the endpoint (WITH CLEANUP, or the
/// far side had ended), applying the `Receive` finds no endpoint, the commit fails with
/// `Corruption` after its record was logged, and every later commit and every reopen fail.
#[test]
fn a_receive_after_end_conversation_in_one_transaction_commits() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    setup(&broker);
    let (_, target) = committed_dialog(&broker);
    let mut tx = broker.begin();
    tx.end_conversation_with_cleanup(target).unwrap();
    let got = tx
        .receive(QUEUES[1], Receive::top(10).conversation(target))
        .unwrap();
    // A conversation this transaction ended has no messages left for it.
    assert!(got.is_empty());
    tx.commit().expect("the commit of END then RECEIVE");
    invariants::check_idle(&broker).unwrap();
    let mut tx = broker.begin();
    tx.create_message_type("//m/After", Validation::None)
        .unwrap();
    tx.commit().expect("a later commit");
    drop(broker);
    Broker::open(dir.path(), options()).expect("reopen");
}

/// Regression test for a fixed engine bug: a transaction holding a conversation group keeps its copy of a closed endpoint
/// after another transaction ended the far side (which removed both endpoints without taking
/// this group's lock); END CONVERSATION WITH CLEANUP on that stale copy is accepted, and its
/// commit fails with `Corruption` ("end of unknown conversation") after being logged, breaking
/// the broker for every later commit and every reopen.
#[test]
fn cleanup_of_an_endpoint_removed_under_a_held_group_lock_is_refused_or_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    setup(&broker);
    let (initiator, target) = committed_dialog(&broker);
    let mut tx = broker.begin();
    tx.end_conversation(initiator).unwrap();
    tx.commit().unwrap();
    // Holds the initiator's group (and a copy of its closed endpoint).
    let mut holder = broker.begin();
    let got = holder
        .receive(QUEUES[0], Receive::top(10).conversation(initiator))
        .unwrap();
    assert!(got.is_empty());
    let mut tx = broker.begin();
    tx.end_conversation(target).unwrap();
    tx.commit().unwrap();
    assert!(
        broker.conversation_endpoint(initiator).is_none(),
        "both ended: removed"
    );
    match holder.end_conversation_with_cleanup(initiator) {
        Err(Error::UnknownConversation(_)) => drop(holder),
        Ok(()) => holder.commit().expect("the commit of the cleanup"),
        Err(e) => panic!("unexpected: {e}"),
    }
    invariants::check_idle(&broker).unwrap();
    let mut tx = broker.begin();
    tx.create_message_type("//m/After", Validation::None)
        .unwrap();
    tx.commit().expect("a later commit");
    drop(broker);
    Broker::open(dir.path(), options()).expect("reopen");
}

/// Regression test for a fixed engine bug: WITH CLEANUP is accepted on an endpoint this transaction already ended (its copy
/// is closed, which CLEANUP allows); the first END removes the endpoint when the record is
/// applied, the second finds none, and the commit fails with `Corruption` after being logged.
#[test]
fn end_conversation_with_cleanup_twice_in_one_transaction_commits() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    setup(&broker);
    let (initiator, _) = committed_dialog(&broker);
    let mut tx = broker.begin();
    tx.end_conversation_with_cleanup(initiator).unwrap();
    match tx.end_conversation_with_cleanup(initiator) {
        Ok(()) => tx.commit().expect("the commit of two cleanups"),
        Err(e) => panic!("unexpected: {e}"),
    }
    invariants::check_idle(&broker).unwrap();
    drop(broker);
    Broker::open(dir.path(), options()).expect("reopen");
}

// ---------------------------------------------------------------------------------------------
// Poison-message protection

/// The queue with poison-message protection on, and its service (accepts `CONTRACT`).
const POISON_QUEUE: &str = "QP";
const POISON_SERVICE: &str = "//m/P";

/// One step of the poison-count model: each is one transaction (or a reopen).
#[derive(Debug, Clone, Copy)]
enum PoisonStep {
    /// Sends `n` requests into the protected queue, committed.
    Send(u64),
    /// Receives at most `top` from the protected queue (also from `QA`, unprotected, when
    /// `both`), then commits, rolls back or drops the transaction.
    Receive {
        top: usize,
        both: bool,
        end: TxEnd,
    },
    /// ALTER QUEUE STATUS = ON (protection on).
    Enable,
    Reopen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxEnd {
    Commit,
    Rollback,
    Drop,
}

fn poison_step() -> impl Strategy<Value = PoisonStep> {
    let end = prop_oneof![
        2 => Just(TxEnd::Commit),
        6 => Just(TxEnd::Rollback),
        2 => Just(TxEnd::Drop),
    ];
    prop_oneof![
        3 => (1u64..=3).prop_map(PoisonStep::Send),
        10 => (1usize..=3, proptest::bool::weighted(0.3), end)
            .prop_map(|(top, both, end)| PoisonStep::Receive { top, both, end }),
        2 => Just(PoisonStep::Enable),
        1 => Just(PoisonStep::Reopen),
    ]
}

/// The protected queue as the model has it: messages waiting, status, and the rollbacks in a
/// row of transactions that received from it (in memory only: a reopen forgets them).
#[derive(Debug, Default)]
struct PoisonModel {
    queued: u64,
    disabled: bool,
    rollbacks: u32,
}

#[derive(Debug, Default)]
struct PoisonTotals {
    disables: AtomicU64,
    /// Receives refused by the disabled queue.
    refused: AtomicU64,
    /// Runs of rollbacks ended by a commit, an ALTER QUEUE or a reopen before they disabled
    /// the queue.
    runs_reset: AtomicU64,
    committed_receives: AtomicU64,
}

fn poison_setup(broker: &Broker) -> ConversationHandle {
    setup(broker);
    let mut tx = broker.begin();
    tx.create_queue(POISON_QUEUE, QueueOptions::default())
        .unwrap();
    tx.create_service(POISON_SERVICE, POISON_QUEUE, &[CONTRACT])
        .unwrap();
    // Also some messages in the unprotected queue QA, for transactions that receive from both.
    let h = tx
        .begin_dialog("//m/B", "//m/A", CONTRACT, DialogOptions::default())
        .unwrap();
    for _ in 0..50 {
        tx.send(h, REQUEST, b"{}").unwrap();
    }
    let h = tx
        .begin_dialog("//m/A", POISON_SERVICE, CONTRACT, DialogOptions::default())
        .unwrap();
    tx.commit().unwrap();
    h
}

fn run_poison(steps: &[PoisonStep], totals: &PoisonTotals) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(fail)?;
    let mut broker = Broker::open(dir.path(), options()).map_err(fail)?;
    let dialog = poison_setup(&broker);
    let mut model = PoisonModel::default();
    let mut events = broker.subscribe();
    for step in steps {
        match *step {
            PoisonStep::Send(n) => {
                let mut tx = broker.begin();
                for _ in 0..n {
                    tx.send(dialog, REQUEST, b"{\"poison\": true}")
                        .map_err(fail)?;
                }
                tx.commit().map_err(fail)?;
                model.queued += n;
            }
            PoisonStep::Receive { top, both, end } => {
                let mut tx = broker.begin();
                if both {
                    tx.receive(QUEUES[0], Receive::top(1)).map_err(fail)?;
                }
                let got = match tx.receive(POISON_QUEUE, Receive::top(top)) {
                    Err(Error::QueueDisabled(_)) if model.disabled => {
                        totals.refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => return Err(fail(format!("receive from {POISON_QUEUE}: {e}"))),
                    Ok(_) if model.disabled => {
                        return Err(fail("a disabled queue let a RECEIVE through"));
                    }
                    Ok(got) => got.len() as u64,
                };
                let expected = model.queued.min(top as u64);
                if got != expected {
                    return Err(fail(format!(
                        "received {got}, the model expected {expected}"
                    )));
                }
                match end {
                    TxEnd::Commit => {
                        tx.commit().map_err(fail)?;
                        model.queued -= got;
                        // Only a transaction that received something ends the run.
                        if got > 0 {
                            totals.committed_receives.fetch_add(1, Ordering::Relaxed);
                            if model.rollbacks > 0 {
                                totals.runs_reset.fetch_add(1, Ordering::Relaxed);
                            }
                            model.rollbacks = 0;
                        }
                    }
                    TxEnd::Rollback | TxEnd::Drop => {
                        if end == TxEnd::Rollback {
                            tx.rollback();
                        } else {
                            drop(tx);
                        }
                        if got > 0 {
                            model.rollbacks += 1;
                            if model.rollbacks == herald_engine::POISON_ROLLBACKS_MAX {
                                model.disabled = true;
                                model.rollbacks = 0;
                                totals.disables.fetch_add(1, Ordering::Relaxed);
                                let event = events.try_next();
                                let expected = herald_engine::Event::QueueDisabled {
                                    queue: POISON_QUEUE.into(),
                                };
                                if event.as_ref() != Some(&expected) {
                                    return Err(fail(format!(
                                        "expected {expected:?} as the queue was disabled, got \
                                         {event:?}"
                                    )));
                                }
                            }
                        }
                    }
                }
            }
            PoisonStep::Enable => {
                let mut tx = broker.begin();
                tx.alter_queue(POISON_QUEUE, QueueOptions::default())
                    .map_err(fail)?;
                tx.commit().map_err(fail)?;
                if model.rollbacks > 0 {
                    totals.runs_reset.fetch_add(1, Ordering::Relaxed);
                }
                model.disabled = false;
                model.rollbacks = 0;
            }
            PoisonStep::Reopen => {
                drop(events);
                drop(broker);
                broker = Broker::open(dir.path(), options()).map_err(fail)?;
                events = broker.subscribe();
                if model.rollbacks > 0 {
                    totals.runs_reset.fetch_add(1, Ordering::Relaxed);
                }
                model.rollbacks = 0;
            }
        }
        let info = broker
            .queues()
            .into_iter()
            .find(|q| q.name == POISON_QUEUE)
            .ok_or_else(|| fail("the protected queue is gone"))?;
        if (info.options.enabled, info.messages) != (!model.disabled, model.queued) {
            return Err(fail(format!(
                "after {step:?}: the queue is (enabled, messages) = ({}, {}), the model says \
                 ({}, {}) after {} rollbacks in a row",
                info.options.enabled, info.messages, !model.disabled, model.queued, model.rollbacks
            )));
        }
        if let Some(event) = events.try_next() {
            return Err(fail(format!("unexpected event after {step:?}: {event:?}")));
        }
        invariants::check_idle(&broker).map_err(fail)?;
    }
    Ok(())
}

/// Poison-message protection against a model of its count: the fifth rollback in a row of a
/// transaction that received from the protected queue disables it (a logged change, kept over
/// reopens, with an event); a committed receive, ALTER QUEUE, or a reopen (the count is in
/// memory) starts the count again; empty receives and receives from unprotected queues do not
/// count.
#[test]
fn poison_protection_matches_its_model() {
    let seed = std::env::var("HERALD_MODEL_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("HERALD_MODEL_SEED is a u64"))
        .unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        });
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    });
    let totals = PoisonTotals::default();
    let result = runner.run(&proptest::collection::vec(poison_step(), 10..60), |steps| {
        run_poison(&steps, &totals)
    });
    if let Err(e) = result {
        panic!("{e}\nreplay with HERALD_MODEL_SEED={seed}");
    }
    eprintln!("poison model run (seed {seed}): {totals:?}");
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    assert!(count(&totals.disables) >= 3, "too few disables: {totals:?}");
    assert!(count(&totals.refused) >= 3, "too few refusals: {totals:?}");
    assert!(count(&totals.runs_reset) >= 3, "too few resets: {totals:?}");
    assert!(
        count(&totals.committed_receives) >= 3,
        "too few committed receives: {totals:?}"
    );
}

/// Regression test for a fixed engine bug: SEND checks the state of the transaction's copy of the endpoint before it locks
/// the conversation group, and locking re-reads the copy without checking again. A transaction
/// that loaded an endpoint (here through a SEND refused by validation), then SENDs on it after
/// another transaction ended it, is accepted; its commit delivers the message to the far side
/// after the EndDialog, and fails with `Corruption` ("send on unknown conversation") when the
/// same record ended the far side first, which removed both endpoints.
#[test]
fn a_send_on_an_endpoint_ended_since_its_copy_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    setup(&broker);
    let (initiator, target) = committed_dialog(&broker);
    let mut late = broker.begin();
    assert!(matches!(
        late.send(initiator, REQUEST, b"{"),
        Err(Error::ValidationFailed { .. })
    ));
    let mut tx = broker.begin();
    tx.end_conversation(initiator).unwrap();
    tx.commit().unwrap();
    match late.send(initiator, REQUEST, b"{\"late\": true}") {
        Err(Error::ConversationClosed { state: "CD", .. }) => {}
        Err(e) => panic!("unexpected: {e}"),
        Ok(()) => {
            late.commit().unwrap();
            let mut tx = broker.begin();
            let got = tx
                .receive(QUEUES[1], Receive::top(10).conversation(target))
                .unwrap();
            let types: Vec<&str> = got.iter().map(|m| &*m.message_type).collect();
            panic!("the SEND on a closed endpoint was accepted; the far side receives {types:?}");
        }
    }
}
