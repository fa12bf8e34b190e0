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
//! Every run is a function of one seed (printed on failure; `HERALD_MODEL_SEED` replays it), and
//! the run fails if, over all cases, it did not commit, receive, contend, refuse, checkpoint and
//! reopen.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_engine::{
    Broker, ConversationGroupId, ConversationHandle, DialogOptions, Durability, Error, Message,
    Options, QueueOptions, Receive, SentBy, Transaction, Validation, invariants,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

/// Transactions open at once, at most.
const SLOTS: usize = 3;
/// How often each slot is chosen.
const SLOT_WEIGHTS: [u32; SLOTS] = [5, 3, 2];
/// Generated cases and steps per case: about 10 s in a debug build, most of it lock waits.
const CASES: u32 = 64;
const STEPS_MIN: usize = 20;
const STEPS_MAX: usize = 150;
/// Largest batch a drain asks for (far more than a case queues in one group).
const DRAIN_TOP: usize = 100_000;
const LOCK_TIMEOUT: Duration = Duration::from_millis(10);

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
    /// Close every transaction (or leak it, when `forget`), drop the broker, open it again.
    Reopen {
        forget: bool,
    },
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
    prop_oneof![
        8 => (slot.clone(), service(), service(), related, proptest::bool::weighted(0.8)).prop_map(
            |(slot, from, to, related, fit_from)| Step::Dialog {
                slot,
                from,
                to,
                related,
                fit_from,
            }
        ),
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
        1 => proptest::bool::weighted(0.25).prop_map(|forget| Step::Reopen { forget }),
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

#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelMessage {
    sequence: u64,
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
    queue: BTreeMap<u64, ModelMessage>,
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
    /// (sending endpoint, message) in the order sent.
    sends: Vec<(usize, ModelMessage)>,
    /// (receiving endpoint, message) in the order received.
    taken: Vec<(usize, ModelMessage)>,
    received_through: BTreeMap<usize, u64>,
}

/// An error the model expects, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    UnknownService,
    RemoteService,
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
}

fn contract_rule(message_type: &str) -> Option<SentBy> {
    match message_type {
        REQUEST => Some(SentBy::Initiator),
        REPLY => Some(SentBy::Target),
        NOTE => Some(SentBy::Any),
        _ => None,
    }
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

    fn visible(&self, slot: usize, endpoint: usize) -> bool {
        matches!(self.endpoints[endpoint].life, Life::Committed)
            || self.endpoints[endpoint].life == Life::Pending(slot)
    }

    /// The queue of `group` as `slot`'s transaction sees it (committed, or created by it).
    fn group_queue(&self, slot: usize, group: usize) -> Option<usize> {
        let g = &self.groups[group];
        (g.life == Life::Committed || g.life == Life::Pending(slot)).then_some(g.queue)
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

    fn lock(&mut self, slot: usize, group: usize) -> Result<(), Refusal> {
        match self.holder(group) {
            Some(other) if other != slot => Err(Refusal::LockTimeout(group)),
            _ => {
                self.tx(slot).locks.insert(group);
                Ok(())
            }
        }
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
            return Err(Refusal::RemoteService);
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
                if !self.visible(slot, endpoint) {
                    return Err(Refusal::UnknownConversation);
                }
                self.endpoints[endpoint].group
            }
        };
        if let Some(queue) = self.group_queue(slot, group)
            && queue != from_queue
        {
            return Err(Refusal::GroupOnOtherQueue);
        }
        self.lock(slot, group)?;
        if self.groups[group].life == Life::Dead {
            // New, or created by a transaction that rolled back: created now, on this queue.
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
        handle: ConversationHandle,
    ) -> Result<(), String> {
        let initiator = self.endpoints.len();
        let target_group = self.new_group(None, SERVICES[to].1);
        self.groups[target_group].life = Life::Pending(slot);
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
            });
        }
        self.learn_endpoint(initiator, handle)
    }

    /// SEND on `targets` (`None`: a handle no one created) as the engine checks it; on success
    /// records the messages in the slot's transaction.
    fn send(
        &mut self,
        slot: usize,
        targets: &[Option<usize>],
        message_type: &str,
        form: BodyForm,
        body: &[u8],
    ) -> Result<(), Refusal> {
        let mut seen = BTreeSet::new();
        let mut endpoints = Vec::new();
        for target in targets {
            match target {
                Some(e) if !seen.insert(*e) => return Err(Refusal::DuplicateHandle),
                Some(e) if self.visible(slot, *e) => endpoints.push(*e),
                _ => return Err(Refusal::UnknownConversation),
            }
        }
        self.catalog_shared(slot)?;
        if !self.type_exists(slot, message_type) {
            return Err(Refusal::UnknownMessageType);
        }
        for e in &endpoints {
            let allowed = contract_rule(message_type)
                .is_some_and(|sent_by| sent_by.allows(self.endpoints[*e].initiator));
            if !allowed {
                return Err(Refusal::ContractViolation);
            }
        }
        if !body_passes(message_type, form) {
            return Err(Refusal::ValidationFailed);
        }
        for e in &endpoints {
            self.lock(slot, self.endpoints[*e].group)?;
        }
        for e in endpoints {
            let committed = self.endpoints[e].send_sequence;
            let tx = self.tx(slot);
            let sequence = tx.send_sequence.entry(e).or_insert(committed);
            let message = ModelMessage {
                sequence: *sequence,
                message_type: message_type.to_owned(),
                body: body.to_vec(),
                order: 0,
            };
            *sequence += 1;
            tx.sends.push((e, message));
        }
        Ok(())
    }

    /// The oldest committed message of `group`'s conversations, if any.
    fn oldest(&self, group: usize) -> Option<u64> {
        self.endpoints
            .iter()
            .filter(|e| e.group == group && e.life == Life::Committed)
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
    /// `only`, if set), in order: conversations oldest first, each by sequence.
    fn batch(&self, group: usize, only: Option<usize>, top: usize) -> Batch {
        if self.groups[group].life != Life::Committed {
            return Vec::new();
        }
        let mut conversations: Vec<(u64, usize)> = (0..self.endpoints.len())
            .filter(|e| only.is_none_or(|o| o == *e))
            .filter(|e| {
                let endpoint = &self.endpoints[*e];
                endpoint.group == group && endpoint.life == Life::Committed
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
                if !self.visible(slot, e) {
                    return Err(Refusal::UnknownConversation);
                }
                let group = self.endpoints[e].group;
                if self.group_queue(slot, group) != Some(queue) {
                    return Err(Refusal::WrongQueue);
                }
                self.lock(slot, group)?;
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
                .remove(&message.sequence)
                .expect("batched from the queue");
            let tx = self.tx(slot);
            let through = tx.received_through.entry(*e).or_insert(taken.sequence);
            *through = (*through).max(taken.sequence);
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

    /// Returns (messages sent, messages received) by the committed transaction.
    fn commit(&mut self, slot: usize) -> (u64, u64) {
        let tx = self.txs[slot].take().expect("open");
        for endpoint in &mut self.endpoints {
            if endpoint.life == Life::Pending(slot) {
                endpoint.life = Life::Committed;
            }
        }
        for group in &mut self.groups {
            if group.life == Life::Pending(slot) {
                group.life = Life::Committed;
            }
        }
        let sent = tx.sends.len() as u64;
        for (sender, mut message) in tx.sends {
            message.order = self.next_order;
            self.next_order += 1;
            self.endpoints[sender].send_sequence = message.sequence + 1;
            let far = self.endpoints[sender].far;
            self.endpoints[far].queue.insert(message.sequence, message);
        }
        for (endpoint, through) in tx.received_through {
            let endpoint = &mut self.endpoints[endpoint];
            endpoint.receive_sequence = endpoint.receive_sequence.max(through + 1);
        }
        self.created_types.extend(tx.created_types);
        (sent, tx.taken.len() as u64)
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
            self.endpoints[endpoint]
                .queue
                .insert(message.sequence, message);
        }
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
}

fn options() -> Options {
    Options {
        durability: Durability::None,
        lock_timeout: LOCK_TIMEOUT,
        // Small segments and frequent checkpoints: the log rolls over, segments are released and
        // compacted, and a reopen recovers from a checkpoint plus the log after it.
        segment_bytes: 4 * 1024,
        checkpoint_interval_bytes: 1024,
        ..Options::default()
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
            | (Refusal::RemoteService, Error::RemoteServiceNotSupported { .. })
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
            } => {
                let (slot, mut from, to) = (*slot, *from, *to);
                let name = |s: usize| SERVICES.get(s).map_or(NO_SERVICE, |s| s.0);
                let mut options = DialogOptions::default();
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
                let actual =
                    self.tx(model, slot)
                        .begin_dialog(name(from), name(to), CONTRACT, options);
                let expected = model.begin_dialog(slot, from, to, related);
                if let Some((group, handle)) =
                    self.outcome(model, "BEGIN DIALOG", expected, actual)?
                {
                    model.dialog_begun(slot, to, group, handle).map_err(fail)?;
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
                    if self.outcome(model, "SEND", expected, actual)?.is_none() {
                        break;
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
                let actual = self.tx(model, slot).receive(QUEUES[queue], what);
                let expected = model.receive(slot, queue, top, target);
                if let Some((expected, actual)) =
                    self.outcome(model, "RECEIVE", expected, actual)?
                {
                    same_batch(model, "RECEIVE", &expected, &actual)?;
                    self.count_batch(&expected);
                }
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
                if let Some(tx) = self.slots[*slot].take() {
                    let body_bytes: usize = model
                        .tx(*slot)
                        .sends
                        .iter()
                        .map(|(_, m)| m.body.len())
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
                    let (sent, received) = model.commit(*slot);
                    self.totals
                        .committed_sends
                        .fetch_add(sent, Ordering::Relaxed);
                    self.totals
                        .committed_receives
                        .fetch_add(received, Ordering::Relaxed);
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
    }

    /// After every step: the invariants hold, and a new transaction sees exactly the committed
    /// messages of the groups no open transaction holds.
    fn audit(&mut self, model: &mut Model) -> Result<(), TestCaseError> {
        invariants::check(self.broker).map_err(fail)?;
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
    let expected_summary: Vec<(usize, u64)> =
        expected.iter().map(|(e, _, m)| (*e, m.sequence)).collect();
    if expected.len() != actual.len() {
        return Err(fail(format!(
            "{what}: the model expected {expected_summary:?} (endpoint, sequence), the engine \
             returned {:?}",
            summary(actual)
        )));
    }
    for ((endpoint, group, message), got) in expected.iter().zip(actual) {
        if got.sequence != message.sequence
            || *got.message_type != message.message_type
            || got.body() != message.body
        {
            return Err(fail(format!(
                "{what}: the model expected message {} of endpoint {endpoint} ({:?}, body {:?}), \
                 the engine returned message {} of {} ({:?}, body {:?}); whole batch expected \
                 {expected_summary:?}, got {:?}",
                message.sequence,
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
    let mut model = Model::default();
    // A few committed dialogs to start from, so that early steps have conversations to use:
    // A → B, C → B in A's group, B → A.
    let start = [
        Step::Dialog {
            slot: 0,
            from: 0,
            to: 1,
            related: Related::None,
            fit_from: false,
        },
        Step::Dialog {
            slot: 0,
            from: 2,
            to: 1,
            related: Related::Conversation(Pick::Visible(0)),
            fit_from: false,
        },
        Step::Dialog {
            slot: 0,
            from: 1,
            to: 0,
            related: Related::None,
            fit_from: false,
        },
        Step::Commit { slot: 0 },
    ];
    let mut steps = start.iter().chain(steps);
    let mut first = true;
    loop {
        let broker = Broker::open(dir.path(), options()).map_err(|e| fail(format!("open: {e}")))?;
        if first {
            setup(&broker);
            first = false;
        }
        let mut session = Session {
            broker: &broker,
            slots: std::array::from_fn(|_| None),
            totals,
        };
        session.audit(&mut model)?;
        let mut reopen = None;
        for step in steps.by_ref() {
            if let Step::Reopen { forget } = step {
                reopen = Some(*forget);
                break;
            }
            session.apply(&mut model, step)?;
            session.audit(&mut model)?;
        }
        session.close_all(&mut model, reopen.unwrap_or(false));
        if reopen.is_none() {
            session.audit(&mut model)?;
            return Ok(());
        }
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

/// Engine bug: a transaction that ended a conversation and then received its messages logs
/// `EndConversation` before `Receive`; when the END removes the endpoint (WITH CLEANUP, or the
/// far side had ended), applying the `Receive` finds no endpoint, the commit fails with
/// `Corruption` after its record was logged, and every later commit and every reopen fail.
#[test]
#[ignore = "engine bug: RECEIVE after END CONVERSATION in one transaction corrupts the broker"]
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
    // The engine hands out the messages of the conversation this transaction just ended.
    assert_eq!(got.len(), 1);
    tx.commit().expect("the commit of END then RECEIVE");
    invariants::check_idle(&broker).unwrap();
    let mut tx = broker.begin();
    tx.create_message_type("//m/After", Validation::None)
        .unwrap();
    tx.commit().expect("a later commit");
    drop(broker);
    Broker::open(dir.path(), options()).expect("reopen");
}

/// Engine bug: a transaction holding a conversation group keeps its copy of a closed endpoint
/// after another transaction ended the far side (which removed both endpoints without taking
/// this group's lock); END CONVERSATION WITH CLEANUP on that stale copy is accepted, and its
/// commit fails with `Corruption` ("end of unknown conversation") after being logged, breaking
/// the broker for every later commit and every reopen.
#[test]
#[ignore = "engine bug: END WITH CLEANUP of an endpoint removed since the transaction loaded it \
            corrupts the broker"]
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
