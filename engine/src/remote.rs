//! The engine's side of dialogs between brokers. The network layer (`herald-net`) moves bytes;
//! here is what they mean:
//!
//! - **Outbound**: a SEND (or END) on a dialog whose far side is on another broker puts the
//!   message in the transmission queue in the same commit. `outbound` lists what waits, in
//!   order, with where each should go (`Catalog::route`); `transmitted` removes what the far
//!   broker acknowledged (a logged commit) and pins the dialog to that broker; `remote_failed`
//!   records an Error the far broker sent instead (the dialog goes to ERROR).
//! - **Inbound**: `accept_arrivals` takes messages that arrived, in one local transaction (or
//!   several, in order, when they do not fit one record of the log; a message no record can
//!   hold is refused with `codes::MESSAGE_TOO_LARGE`): a dialog's first message creates its
//!   target endpoint (or is refused with Service Broker's error code: no such service, contract
//!   not accepted…), each message is accepted only as the next in its conversation's sequence
//!   (earlier ones are duplicates, later ones wait for the gap to fill by retransmission). When
//!   it returns, what it accepted is committed — durable under the default durability — so the
//!   caller may acknowledge `Accepted` and `Duplicate` messages, and only those.
//!   `accept_arrivals_written` returns once the transactions are written and applied
//!   (receivable), with the `SyncPoint` to pass to `wait_synced` before acknowledging.

use std::sync::Arc;

use crate::broker::BrokerCore;
use crate::catalog::{ConversationStage, RouteChoice};
use crate::error::Result;
use crate::ids::{BrokerInstanceId, ConversationGroupId, ConversationHandle, ConversationId};
use crate::record::{self, Op, RecordBuilder, RemoteDialogRecord};
use crate::system;
use herald_wal::RecordBytes;

/// Error codes a receiving broker answers with (Service Broker's, negated).
pub mod codes {
    /// The target service does not exist here.
    pub const SERVICE_NOT_FOUND: i32 = -8490;
    /// The target service does not accept the dialog's contract.
    pub const CONTRACT_NOT_ACCEPTED: i32 = -8408;
    /// The dialog's contract does not exist here.
    pub const CONTRACT_NOT_FOUND: i32 = -8425;
    /// The message type does not exist here.
    pub const MESSAGE_TYPE_NOT_FOUND: i32 = -8428;
    /// The message type is not part of the contract here.
    pub const MESSAGE_TYPE_NOT_IN_CONTRACT: i32 = -8498;
    /// The message was sent by a side the contract does not let send it.
    pub const WRONG_SENDER: i32 = -8457;
    /// The body failed the message type's validation.
    pub const VALIDATION_FAILED: i32 = -8430;
    /// The sending broker may not reach this service.
    pub const NO_PERMISSION: i32 = -8494;
    /// The message is larger than one record of this broker's log can hold (its segments are
    /// smaller than the sender's): Herald's own code, Service Broker has none.
    pub const MESSAGE_TOO_LARGE: i32 = -50_001;
}

/// A whole message from another broker (reassembled by the network layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub conversation_id: ConversationId,
    /// Whether the initiator sent it (so it is for this broker's target endpoint).
    pub from_initiator: bool,
    pub sequence: u64,
    pub from_service: Arc<str>,
    pub to_service: Arc<str>,
    pub contract: Arc<str>,
    pub message_type: Arc<str>,
    pub body: Vec<u8>,
    pub source_broker: BrokerInstanceId,
    /// The dialog's lifetime end (milliseconds since the UNIX epoch), 0 for none.
    pub expires_at_ms: u64,
}

/// What became of an arrival.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArrivalOutcome {
    /// Committed into its queue: acknowledge it.
    Accepted,
    /// Already here (or its conversation is over): acknowledge it again, nothing else.
    Duplicate,
    /// Ahead of a message still missing: do not acknowledge; the sender retransmits.
    Gap,
    /// Refused: answer with an Error for the dialog (and do not acknowledge).
    Refused { code: i32, description: String },
}

/// A point of the log (see `BrokerCore::accept_arrivals_written`): what must be durable before
/// the arrivals accepted up to it may be acknowledged. Later points cover earlier ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct SyncPoint(herald_wal::Lsn);

/// A message in the transmission queue, with all the far broker needs to deliver it.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Its place in the transmission queue (what `transmitted` takes back).
    pub id: u64,
    pub handle: ConversationHandle,
    pub conversation_id: ConversationId,
    /// Whether this side is the initiator (the direction of the message).
    pub from_initiator: bool,
    pub sequence: u64,
    /// The names are shared by every message of a listing that has them (no copy each).
    pub from_service: Arc<str>,
    pub to_service: Arc<str>,
    pub contract: Arc<str>,
    pub message_type: Arc<str>,
    pub body: RecordBytes,
    /// The far broker, if the dialog is pinned to one or named one.
    pub to_broker_instance: Option<BrokerInstanceId>,
    pub expires_at_ms: u64,
    /// Where it should go now (shared by the messages of a listing with the same far side).
    pub route: Arc<RouteChoice>,
}

/// A dialog's far side as routes see it: the far service and the far broker, if known.
type FarSide<'a> = (&'a str, Option<BrokerInstanceId>, ConversationStage);

/// Waits for the transmission queue to grow (for the network's sender). While one exists,
/// every commit that adds to the transmission queue signals it.
#[derive(Debug)]
pub struct OutboundWaiter<'b> {
    waiter: crate::signal::Waiter<'b>,
    clock: &'b dyn crate::clock::Clock,
}

impl OutboundWaiter<'_> {
    /// The current generation: read it before listing `outbound`, then wait past it.
    pub fn generation(&self) -> u64 {
        self.waiter.signal.generation()
    }

    /// Sleeps until the transmission queue changed after `seen`, or `timeout` passed (on the
    /// broker's clock); returns whether it changed.
    pub fn wait_past(&self, seen: u64, timeout: std::time::Duration) -> bool {
        let deadline = crate::clock::deadline_after(self.clock, timeout);
        self.waiter.signal.wait_past(seen, deadline, self.clock)
    }
}

impl BrokerCore {
    /// A waiter on the transmission queue (see `OutboundWaiter`).
    pub fn outbound_waiter(&self) -> OutboundWaiter<'_> {
        OutboundWaiter {
            waiter: self.signals.wait_on(crate::state::TRANSMISSION_SIGNAL),
            clock: self.clock(),
        }
    }

    /// Sets (or with `None` removes) the outbound listener: from then on, a commit that changes
    /// the transmission queue (adds messages, drops some unacknowledged, creates or alters a
    /// route) calls it on the committing thread — once the commit is applied and durable as the
    /// durability says, with the transaction's locks released — *instead of* waking the
    /// `OutboundWaiter`s. So the network can hand new messages on from the thread that
    /// committed them, without a thread hand-off; a listener that cannot (or cannot now) calls
    /// `wake_outbound` for its thread. It must not commit on this broker.
    pub fn set_outbound_listener(&self, listener: Option<crate::broker::OutboundListener>) {
        *self.outbound_listener.lock() = listener;
    }

    /// Wakes every `OutboundWaiter` (a route changed, or the caller is stopping).
    pub fn wake_outbound(&self) {
        self.signals.notify(crate::state::TRANSMISSION_SIGNAL);
    }

    /// Up to `max` messages of the transmission queue with ids above `after` (all with `None`),
    /// in the order they must go.
    pub fn outbound(&self, after: Option<u64>, max: usize) -> Vec<Outbound> {
        self.outbound_where(after, max, |_| true)
    }

    /// `outbound` of only the messages whose id `wanted` accepts (called under the broker's
    /// state lock: it must not call the broker). Messages it refuses cost no copy and do not
    /// count towards `max`, so a sender can skip what it already handed on cheaply.
    pub fn outbound_where(
        &self,
        after: Option<u64>,
        max: usize,
        mut wanted: impl FnMut(u64) -> bool,
    ) -> Vec<Outbound> {
        let now = self.clock().now_ms();
        let state = self.state.lock();
        let from = after.map_or(0, |id| id.saturating_add(1));
        // Routes by (far service, far broker, stage): a listing holds few dialogs' worth of them, and
        // each message would otherwise search the routes again (under the state lock). Names
        // are the endpoint's own, shared.
        let mut routes: Vec<(FarSide<'_>, Arc<RouteChoice>)> = Vec::new();
        state
            .transmission
            .range(from..)
            .filter(|(id, _)| wanted(**id))
            .filter_map(|(id, t)| {
                let endpoint = state.endpoints.get(&t.handle)?;
                let far = (
                    &*endpoint.far_service,
                    endpoint.far_broker_instance,
                    endpoint.stage(),
                );
                let route = match routes.iter().find(|(key, _)| *key == far) {
                    Some((_, route)) => route.clone(),
                    None => {
                        let route = Arc::new(state.catalog.route(
                            &endpoint.far_service,
                            endpoint.far_broker_instance,
                            self.broker_instance(),
                            now,
                            endpoint.stage(),
                        ));
                        routes.push((far, route.clone()));
                        route
                    }
                };
                Some(Outbound {
                    id: *id,
                    handle: t.handle,
                    conversation_id: endpoint.conversation_id,
                    from_initiator: endpoint.is_initiator,
                    sequence: t.sequence,
                    from_service: endpoint.service.clone(),
                    to_service: endpoint.far_service.clone(),
                    contract: endpoint.contract.clone(),
                    message_type: state.message_type_name(t.message.message_type).clone(),
                    body: t.message.body.clone(),
                    to_broker_instance: endpoint.far_broker_instance,
                    expires_at_ms: endpoint.expires_at_ms.unwrap_or(0),
                    route,
                })
            })
            .take(max)
            .collect()
    }

    /// The far broker `far` acknowledged transmissions `ids`: they leave the transmission
    /// queue (logged), their dialogs are pinned to `far`, and an acknowledged END lets its
    /// endpoint go.
    ///
    /// Returns once the record is written to the OS, without waiting for it to be durable (it
    /// is, with the next commit that syncs): losing it to a power failure only sends those
    /// messages again after the restart, which the far broker, holding them durably, takes as
    /// duplicates and acknowledges again (and the next acknowledgement pins the dialog again).
    /// So acknowledgements cost no `fdatasync` of their own, which on the request/reply path
    /// competed with the commits that are on it.
    pub fn transmitted(&self, ids: &[u64], far: Option<BrokerInstanceId>) -> Result<()> {
        // In records the log takes: acknowledgements that piled up while it refused to write
        // (a full disk) may be more than one record holds.
        let per_record = (self.wal.record_payload_bytes_max() as usize / 2 / 8).max(1);
        for ids in ids.chunks(per_record) {
            let op = Op::Transmitted {
                ids: ids.to_vec(),
                far_broker_instance: far,
            };
            self.log_and_apply_written(&crate::record::encode(&[op]))?;
            self.forget_transmission_status(ids);
        }
        Ok(())
    }

    /// The far broker answered this broker's side (`is_initiator`) of `conversation_id` with an
    /// Error (`code`, `description`): the endpoint goes to ERROR with that Error in its queue,
    /// and its messages not yet transmitted are dropped.
    pub fn remote_failed(
        &self,
        conversation_id: ConversationId,
        is_initiator: bool,
        code: i32,
        description: &str,
    ) -> Result<()> {
        let handle = {
            let state = self.state.lock();
            let handle = state
                .by_conversation
                .get(&(conversation_id, is_initiator))
                .copied();
            // An endpoint that takes no more messages has nothing to fail (applying the Fail
            // would change nothing): a peer repeating its Error costs no log write and no sync
            // (each one did, on the thread every peer's arrivals wait on).
            handle.filter(|handle| {
                state
                    .endpoints
                    .get(handle)
                    .is_some_and(|endpoint| endpoint.takes_far_error())
            })
        };
        let Some(handle) = handle else {
            return Ok(());
        };
        let op = Op::Fail {
            handle,
            code,
            body: system::error_body(code, description),
            body_range: 0..0,
        };
        self.log_and_apply(&crate::record::encode(&[op]))
            .map(|_| ())
    }

    /// Takes messages that arrived from other brokers, in one local transaction or, for a batch
    /// larger than one record, several in order (see the module documentation); returns what
    /// became of each, in order, once they committed.
    pub fn accept_arrivals(&self, arrivals: &[Arrival]) -> Result<Vec<ArrivalOutcome>> {
        let (outcomes, point) = self.accept_arrivals_written(arrivals)?;
        self.wait_synced(point)?;
        Ok(outcomes)
    }

    /// `accept_arrivals` without waiting for durability: returns once the transaction is
    /// written to the OS and applied — its messages can be received at once — with the point
    /// of the log that must be durable before `Accepted` and `Duplicate` outcomes may be
    /// acknowledged ([`BrokerCore::wait_synced`]; it covers the messages that earlier calls
    /// accepted, which a `Duplicate` may repeat).
    ///
    /// Why: a RECEIVE of such a message does not wait for the arrival's own `fdatasync`, and
    /// loses nothing by it: the log is durable in order, so the RECEIVE's commit is durable
    /// only with the arrival, and a power failure before that takes both (the far broker,
    /// never acknowledged, sends the message again). On the request/reply path this takes a
    /// sync off each side: the receiving application's commit makes the arrival durable too.
    pub fn accept_arrivals_written(
        &self,
        arrivals: &[Arrival],
    ) -> Result<(Vec<ArrivalOutcome>, SyncPoint)> {
        let outcomes = self.accept_arrivals_unsynced(arrivals)?;
        Ok((outcomes, SyncPoint(self.wal.written_lsn())))
    }

    /// Waits until the log is durable through `point`, as a commit would: under `Sync` it syncs
    /// (or waits for the sync running); under `Batched` and `None` commits do not wait, and
    /// neither does this.
    pub fn wait_synced(&self, point: SyncPoint) -> Result<()> {
        if self.options.durability == herald_wal::Durability::Sync {
            self.wal.wait_durable(point.0)?;
        }
        Ok(())
    }

    /// `wait_synced` that, for up to `grace`, leaves the sync to other committers (see
    /// `Wal::wait_durable_lazily`): for acknowledgements, which a receiving application's
    /// commit is about to make durable anyway.
    pub fn wait_synced_lazily(&self, point: SyncPoint, grace: std::time::Duration) -> Result<()> {
        if self.options.durability == herald_wal::Durability::Sync {
            self.wal.wait_durable_lazily(point.0, grace)?;
        }
        Ok(())
    }

    /// Whether `wait_synced` waits at all (the log's durability is `Sync`).
    pub fn waits_for_sync(&self) -> bool {
        self.options.durability == herald_wal::Durability::Sync
    }

    fn accept_arrivals_unsynced(&self, arrivals: &[Arrival]) -> Result<Vec<ArrivalOutcome>> {
        // One batch at a time: each decides from what the ones before it committed.
        let _one_at_a_time = self.arrivals.lock();
        let now = self.clock().now_ms();
        // One transaction per run of arrivals that fits one record of the log: a batch of
        // large messages is committed in several, in order (each sees the ones before).
        let record_bytes_max = self.wal.record_payload_bytes_max() as usize;
        let mut tx = self.begin();
        let arrivals_bytes: usize = arrivals
            .iter()
            .map(|a| record::arrive_op_bytes(&a.message_type, a.body.len()))
            .sum();
        tx.record().reserve(arrivals_bytes.min(record_bytes_max));
        let mut outcomes = Vec::with_capacity(arrivals.len());
        let mut checked_kind: Option<CheckedKind> = None;
        // Conversations met in this batch: (conversation, this side is initiator) → (endpoint,
        // next sequence expected, the dialog's contract).
        let mut expected: crate::ids::IdMap<
            (ConversationId, bool),
            (ConversationHandle, u64, Arc<str>),
        > = Default::default();
        for arrival in arrivals {
            let side = (arrival.conversation_id, !arrival.from_initiator);
            let known = match expected.get(&side) {
                Some((handle, next, _)) => Some((*handle, *next)),
                None => {
                    let state = self.state.lock();
                    match state.by_conversation.get(&side) {
                        Some(handle) => {
                            let endpoint = &state.endpoints[handle];
                            let next = endpoint.arrived_sequence;
                            expected.insert(side, (*handle, next, endpoint.contract.clone()));
                            Some((*handle, next))
                        }
                        // Its linger passed: pruned at the next close, ignored already.
                        None if state.closed.get(&side).is_some_and(|until| *until > now) => {
                            outcomes.push(ArrivalOutcome::Duplicate);
                            continue;
                        }
                        None => None,
                    }
                }
            };
            let expired = arrival.expires_at_ms != 0 && arrival.expires_at_ms <= now;
            // A message no record of this log can hold is refused before it begins a dialog
            // here (which would then wait for messages that never come).
            let too_large = RecordBuilder::PREFIX_BYTES
                + record::arrive_op_bytes(&arrival.message_type, arrival.body.len())
                > record_bytes_max;
            let refuse_too_large = || ArrivalOutcome::Refused {
                code: codes::MESSAGE_TOO_LARGE,
                description: format!(
                    "a message of {} bytes does not fit in one record of this broker's log \
                     ({record_bytes_max} bytes)",
                    arrival.body.len()
                ),
            };
            let mut checked = false;
            let is_error = *arrival.message_type == *system::ERROR;
            let (handle, next) = match known {
                Some(known) => known,
                // A dialog whose lifetime passed before it got here never begins: acknowledge
                // and drop, so its sender stops sending it.
                None if expired => {
                    outcomes.push(ArrivalOutcome::Duplicate);
                    continue;
                }
                // A reply for an initiator this broker no longer has: nothing to deliver to.
                None if !arrival.from_initiator => {
                    outcomes.push(ArrivalOutcome::Duplicate);
                    continue;
                }
                // An Error for a dialog that never began here (its initiator ended it with an
                // error before anything of it got here): nothing to fail. Acknowledged, so that
                // it leaves the sender's transmission queue (as a gap it would wait for ever
                // for the messages the error dropped).
                None if is_error => {
                    outcomes.push(ArrivalOutcome::Duplicate);
                    continue;
                }
                None if arrival.sequence != 0 => {
                    outcomes.push(ArrivalOutcome::Gap);
                    continue;
                }
                None if too_large => {
                    outcomes.push(refuse_too_large());
                    continue;
                }
                None => match self.accept_new_dialog(&mut tx, arrival)? {
                    Ok(handle) => {
                        checked = true;
                        expected.insert(side, (handle, 0, arrival.contract.clone()));
                        (handle, 0)
                    }
                    Err(refused) => {
                        outcomes.push(refused);
                        continue;
                    }
                },
            };
            if arrival.sequence < next {
                outcomes.push(ArrivalOutcome::Duplicate);
                continue;
            }
            // An Error ends the dialog and may follow messages its sender dropped (END WITH
            // ERROR drops what was not transmitted): it does not wait for them. No dialog
            // reaches the last sequence (it would leave none to expect next): only a broken or
            // hostile peer sends it, and it is never taken.
            if (arrival.sequence > next && !is_error) || arrival.sequence == u64::MAX {
                outcomes.push(ArrivalOutcome::Gap);
                continue;
            }
            // The dialog's contract decides what may come on it, not what the header says.
            let contract = &expected[&side].2;
            let refusal = if too_large {
                Some(refuse_too_large())
            } else if **contract != *arrival.contract {
                Some(ArrivalOutcome::Refused {
                    code: codes::MESSAGE_TYPE_NOT_IN_CONTRACT,
                    description: format!(
                        "the message names contract {:?}, but its dialog's contract is {:?}",
                        arrival.contract, contract
                    ),
                })
            } else if checked {
                None
            } else {
                check_message_memo(&mut tx, arrival, &mut checked_kind)?.err()
            };
            if let Some(refusal) = refusal {
                // The sender's side fails on the Error this refusal answers; this side fails
                // too (an Error in its queue), or its application would wait on a dialog over
                // for ever, and its endpoint never go.
                if let ArrivalOutcome::Refused { code, description } = &refusal {
                    let fail = Op::Fail {
                        handle,
                        code: *code,
                        body: system::error_body(*code, description),
                        body_range: 0..0,
                    };
                    tx = self.push_fitting(tx, record_bytes_max, &mut checked_kind, |tx| {
                        tx.record().push(&fail);
                    })?;
                }
                outcomes.push(refusal);
                continue;
            }
            tx = self.push_fitting(tx, record_bytes_max, &mut checked_kind, |tx| {
                tx.push_arrive(
                    handle,
                    arrival.sequence,
                    &arrival.message_type,
                    &arrival.body,
                );
            })?;
            if let Some(known) = expected.get_mut(&side) {
                known.1 = arrival.sequence + 1;
            }
            outcomes.push(ArrivalOutcome::Accepted);
        }
        tx.commit_written()?;
        Ok(outcomes)
    }

    /// Runs `push` (one op) on `tx`, or, if the op would grow `tx`'s record past one record of
    /// the log, commits `tx` as it was and runs it on a new transaction (every op fits a record
    /// alone: `too_large` arrivals are refused before). Returns the transaction to go on with.
    fn push_fitting<'a>(
        &'a self,
        mut tx: crate::Transaction<'a>,
        record_bytes_max: usize,
        checked_kind: &mut Option<CheckedKind>,
        push: impl Fn(&mut crate::Transaction<'a>),
    ) -> Result<crate::Transaction<'a>> {
        let before = tx.record().mark();
        push(&mut tx);
        if tx.record().len_bytes() > record_bytes_max {
            tx.record().rewind(before);
            tx.commit_written()?;
            tx = self.begin();
            // The catalog may change between the transactions.
            *checked_kind = None;
            push(&mut tx);
            debug_assert!(tx.record().len_bytes() <= record_bytes_max);
        }
        Ok(tx)
    }

    /// A dialog's first message: its target endpoint, or why it (or the message) is refused.
    fn accept_new_dialog(
        &self,
        tx: &mut crate::Transaction<'_>,
        arrival: &Arrival,
    ) -> Result<std::result::Result<ConversationHandle, ArrivalOutcome>> {
        let refused = |code, description: String| ArrivalOutcome::Refused { code, description };
        let check = tx.read_catalog(|catalog| {
            let Some(service) = catalog.services.get(&*arrival.to_service) else {
                return Ok(Err(refused(
                    codes::SERVICE_NOT_FOUND,
                    format!("service {:?} does not exist", arrival.to_service),
                )));
            };
            if !catalog.contracts.contains_key(&*arrival.contract) {
                return Ok(Err(refused(
                    codes::CONTRACT_NOT_FOUND,
                    format!("contract {:?} does not exist", arrival.contract),
                )));
            }
            if !service.contracts.contains(&*arrival.contract) {
                return Ok(Err(refused(
                    codes::CONTRACT_NOT_ACCEPTED,
                    format!(
                        "service {:?} does not accept contract {:?}",
                        arrival.to_service, arrival.contract
                    ),
                )));
            }
            Ok(Ok(()))
        })?;
        if let Err(refused) = check {
            return Ok(Err(refused));
        }
        // The first message too, before the dialog begins here: a refused first message must
        // not leave a target endpoint waiting for messages that never come.
        if let Err(refused) = check_message(tx, arrival)? {
            return Ok(Err(refused));
        }
        let handle = ConversationHandle::random();
        tx.push_op(&Op::AcceptDialog(RemoteDialogRecord {
            handle,
            conversation_id: arrival.conversation_id,
            group: ConversationGroupId::random(),
            service: arrival.to_service.to_string(),
            far_service: arrival.from_service.to_string(),
            contract: arrival.contract.to_string(),
            far_broker_instance: arrival.source_broker,
            expires_at_ms: arrival.expires_at_ms,
        }));
        Ok(Ok(handle))
    }
}

/// What an arrival's (contract, message type, direction) was found to allow, kept by
/// `accept_arrivals_unsynced` for the rest of its transaction: the catalog stays as it was
/// while the transaction holds its shared lock, and a batch's messages mostly share all three.
struct CheckedKind {
    contract: Arc<str>,
    message_type: Arc<str>,
    from_initiator: bool,
    validation: crate::Validation,
}

/// [`check_message`], from `memo` when it holds the arrival's kind (refreshed otherwise).
fn check_message_memo(
    tx: &mut crate::Transaction<'_>,
    arrival: &Arrival,
    memo: &mut Option<CheckedKind>,
) -> Result<std::result::Result<(), ArrivalOutcome>> {
    if system::is_system_message_type(&arrival.message_type) {
        // END and Error cross brokers; a DialogTimer (or any other system name) never does.
        let crosses =
            *arrival.message_type == *system::END_DIALOG || *arrival.message_type == *system::ERROR;
        return Ok(if crosses {
            Ok(())
        } else {
            Err(ArrivalOutcome::Refused {
                code: codes::MESSAGE_TYPE_NOT_IN_CONTRACT,
                description: format!(
                    "system message type {:?} does not come from another broker",
                    arrival.message_type
                ),
            })
        });
    }
    let validation = match memo {
        Some(kind)
            if kind.from_initiator == arrival.from_initiator
                && *kind.message_type == *arrival.message_type
                && *kind.contract == *arrival.contract =>
        {
            kind.validation
        }
        _ => match tx.read_catalog(|catalog| Ok(allowed_kind(catalog, arrival)))? {
            Ok(validation) => {
                *memo = Some(CheckedKind {
                    contract: arrival.contract.clone(),
                    message_type: arrival.message_type.clone(),
                    from_initiator: arrival.from_initiator,
                    validation,
                });
                validation
            }
            Err(refused) => return Ok(Err(refused)),
        },
    };
    Ok(check_body(validation, arrival))
}

/// Whether an arrival's message type may come on its contract from its side (and how its
/// body is validated), or why not.
fn check_message(
    tx: &mut crate::Transaction<'_>,
    arrival: &Arrival,
) -> Result<std::result::Result<(), ArrivalOutcome>> {
    check_message_memo(tx, arrival, &mut None)
}

/// The validation of the arrival's message type if the catalog allows the arrival's kind.
fn allowed_kind(
    catalog: &crate::catalog::Catalog,
    arrival: &Arrival,
) -> std::result::Result<crate::Validation, ArrivalOutcome> {
    let refused = |code, description: String| Err(ArrivalOutcome::Refused { code, description });
    let Some(message_type) = catalog.message_types.get(&*arrival.message_type) else {
        return refused(
            codes::MESSAGE_TYPE_NOT_FOUND,
            format!("message type {:?} does not exist", arrival.message_type),
        );
    };
    let sent_by = catalog
        .contracts
        .get(&*arrival.contract)
        .and_then(|c| c.messages.get(&*arrival.message_type));
    match sent_by {
        None => refused(
            codes::MESSAGE_TYPE_NOT_IN_CONTRACT,
            format!(
                "message type {:?} is not part of contract {:?}",
                arrival.message_type, arrival.contract
            ),
        ),
        Some(sent_by) if !sent_by.allows(arrival.from_initiator) => refused(
            codes::WRONG_SENDER,
            format!(
                "message type {:?} may not be sent by the {}",
                arrival.message_type,
                if arrival.from_initiator {
                    "initiator"
                } else {
                    "target"
                }
            ),
        ),
        Some(_) => Ok(message_type.validation),
    }
}

fn check_body(
    validation: crate::Validation,
    arrival: &Arrival,
) -> std::result::Result<(), ArrivalOutcome> {
    validation
        .check(&arrival.message_type, &arrival.body)
        .map_err(|e| ArrivalOutcome::Refused {
            code: codes::VALIDATION_FAILED,
            description: e.to_string(),
        })
}
