//! Dialogs between two brokers, with the network replaced by a pump that moves the
//! transmission queue of one broker into the other (`outbound` → `accept_arrivals`) and the
//! acknowledgements back (`transmitted`), losing, repeating and reordering on demand: what the
//! engine guarantees — exactly once, in order per conversation, END and errors crossing — does
//! not depend on the network being kind.

use herald_engine::remote::{Arrival, ArrivalOutcome, Outbound, codes};
use herald_engine::{
    Broker, ConversationHandle, DialogOptions, Durability, EndpointState, Options, QueueOptions,
    Receive, Route, RouteAddress, RouteChoice, SentBy, Validation, invariants, system,
};

const ASK: &str = "//t/Ask";
const TELL: &str = "//t/Tell";
const CONTRACT: &str = "//t/Talk";

fn options() -> Options {
    Options {
        durability: Durability::None,
        segment_bytes: 1024 * 1024,
        ..Options::default()
    }
}

/// Broker A hosts `//t/Client` (queue `Client`), broker B `//t/Server` (queue `Server`,
/// accepting the contract); each has a route to the other's service.
fn pair(a_dir: &std::path::Path, b_dir: &std::path::Path) -> (Broker, Broker) {
    let a = Broker::open(a_dir, options()).unwrap();
    let b = Broker::open(b_dir, options()).unwrap();
    for (broker, queue, service, accepts, far, far_address) in [
        (
            &a,
            "Client",
            "//t/Client",
            false,
            "//t/Server",
            "quic://b.example:4022",
        ),
        (
            &b,
            "Server",
            "//t/Server",
            true,
            "//t/Client",
            "quic://a.example:4022",
        ),
    ] {
        if !broker.catalog().services.is_empty() {
            continue;
        }
        let mut tx = broker.begin();
        tx.create_message_type(ASK, Validation::Utf8).unwrap();
        tx.create_message_type(TELL, Validation::None).unwrap();
        tx.create_contract(CONTRACT, &[(ASK, SentBy::Initiator), (TELL, SentBy::Any)])
            .unwrap();
        tx.create_queue(queue, QueueOptions::default()).unwrap();
        let contracts: &[&str] = if accepts { &[CONTRACT] } else { &[] };
        tx.create_service(service, queue, contracts).unwrap();
        tx.create_route(Route {
            name: "far".into(),
            service_name: Some(far.into()),
            broker_instance: None,
            address: RouteAddress::parse(far_address).unwrap(),
            expires_at_ms: None,
        })
        .unwrap();
        tx.commit().unwrap();
    }
    (a, b)
}

/// [`pair`] in new directories, kept alive by the returned guards (first, so that bound as
/// `let (_dirs, a, b)` they go after the brokers).
fn fresh_pair() -> ([tempfile::TempDir; 2], Broker, Broker) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (a, b) = pair(dirs[0].path(), dirs[1].path());
    (dirs, a, b)
}

/// Moves `from`'s transmission queue into `to` (every message, in order, after `shuffle` picked
/// and ordered them), and the acknowledgements and refusals back. Returns the outcomes.
fn pump(
    from: &Broker,
    to: &Broker,
    shuffle: impl Fn(&mut Vec<Arrival>, &mut Vec<u64>),
) -> Vec<ArrivalOutcome> {
    let outbound = from.outbound(None, 10_000);
    let mut ids: Vec<u64> = outbound.iter().map(|m| m.id).collect();
    let mut arrivals: Vec<Arrival> = outbound
        .iter()
        .map(|m| {
            assert!(
                matches!(*m.route, RouteChoice::Remote { .. }),
                "{:?}",
                m.route
            );
            arrival(m, from)
        })
        .collect();
    shuffle(&mut arrivals, &mut ids);
    let outcomes = to.accept_arrivals(&arrivals).unwrap();
    let mut acked = Vec::new();
    for ((arrival, id), outcome) in arrivals.iter().zip(&ids).zip(&outcomes) {
        match outcome {
            ArrivalOutcome::Accepted | ArrivalOutcome::Duplicate => acked.push(*id),
            ArrivalOutcome::Gap => {}
            ArrivalOutcome::Refused { code, description } => from
                .remote_failed(
                    arrival.conversation_id,
                    arrival.from_initiator,
                    *code,
                    description,
                )
                .unwrap(),
        }
    }
    from.transmitted(&acked, Some(to.broker_instance()))
        .unwrap();
    outcomes
}

fn all(_: &mut Vec<Arrival>, _: &mut Vec<u64>) {}

/// What `from`'s outbound message `m` is when it reaches the far broker (what a node sends).
fn arrival(m: &Outbound, from: &Broker) -> Arrival {
    Arrival {
        conversation_id: m.conversation_id,
        from_initiator: m.from_initiator,
        sequence: m.sequence,
        from_service: m.from_service.clone(),
        to_service: m.to_service.clone(),
        contract: m.contract.clone(),
        message_type: m.message_type.clone(),
        body: m.body.to_vec(),
        source_broker: from.broker_instance(),
        expires_at_ms: m.expires_at_ms,
    }
}

fn receive_all(broker: &Broker, queue: &str) -> Vec<(ConversationHandle, String, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        let mut tx = broker.begin();
        let batch = tx.receive(queue, Receive::top(1000)).unwrap();
        tx.commit().unwrap();
        if batch.is_empty() {
            return got;
        }
        got.extend(batch.iter().map(|m| {
            (
                m.conversation_handle,
                m.message_type.to_string(),
                m.body().to_vec(),
            )
        }));
    }
}

/// Opens the broker in `dir` (made by [`pair`]) with time from `clock`.
fn open_on_clock(
    dir: &std::path::Path,
    clock: &std::sync::Arc<herald_engine::ManualClock>,
) -> Broker {
    Broker::open(
        dir,
        Options {
            clock: clock.clone(),
            ..options()
        },
    )
    .unwrap()
}

fn begin(a: &Broker, asks: &[&str]) -> ConversationHandle {
    let mut tx = a.begin();
    let h = tx
        .begin_dialog(
            "//t/Client",
            "//t/Server",
            CONTRACT,
            DialogOptions::default(),
        )
        .unwrap();
    for ask in asks {
        tx.send(h, ASK, ask.as_bytes()).unwrap();
    }
    tx.commit().unwrap();
    h
}

#[test]
fn a_dialog_crosses_brokers_both_ways_exactly_once_and_in_order() {
    let (_dirs, a, b) = fresh_pair();
    let h = begin(&a, &["one", "two", "three"]);
    let queued = a.transmission_queue();
    assert_eq!(queued.len(), 3);
    assert_eq!(queued[0].to_service, "//t/Server");
    assert_eq!(queued[0].transmission_status, "", "not attempted yet");
    // Lost: the acknowledgements never come back, so everything is sent again.
    let first = pump(&a, &b, |arrivals, ids| {
        arrivals.truncate(2);
        ids.clear();
    });
    assert_eq!(first, [ArrivalOutcome::Accepted, ArrivalOutcome::Accepted]);
    // Reordered: the third before the rest.
    let second = pump(&a, &b, |arrivals, ids| {
        arrivals.rotate_right(1);
        ids.rotate_right(1);
    });
    assert_eq!(
        second,
        [
            ArrivalOutcome::Accepted,
            ArrivalOutcome::Duplicate,
            ArrivalOutcome::Duplicate
        ]
    );
    assert!(a.transmission_queue().is_empty(), "all acknowledged");
    assert_eq!(
        a.conversation_endpoint(h).unwrap().far_broker_instance,
        Some(b.broker_instance()),
        "pinned by the first acknowledgement"
    );
    let got = receive_all(&b, "Server");
    let bodies: Vec<&[u8]> = got.iter().map(|(_, _, body)| &body[..]).collect();
    assert_eq!(bodies, [&b"one"[..], b"two", b"three"]);
    let target = got[0].0;
    // The reply goes back the same way.
    let mut tx = b.begin();
    tx.send(target, TELL, b"done").unwrap();
    tx.commit().unwrap();
    assert_eq!(pump(&b, &a, all), [ArrivalOutcome::Accepted]);
    let got = receive_all(&a, "Client");
    assert_eq!(got, [(h, TELL.to_owned(), b"done".to_vec())]);
    invariants::check_idle(&a).unwrap();
    invariants::check_idle(&b).unwrap();
}

#[test]
fn end_conversation_crosses_brokers_and_both_sides_go() {
    let (_dirs, a, b) = fresh_pair();
    let h = begin(&a, &["only"]);
    let mut tx = a.begin();
    tx.end_conversation(h).unwrap();
    tx.commit().unwrap();
    assert_eq!(
        a.conversation_endpoint(h).unwrap().state,
        EndpointState::DisconnectedOutbound,
        "waiting for the far side to acknowledge the end"
    );
    let queued = a.transmission_queue();
    assert!(
        queued[1].is_end_of_dialog,
        "EndDialog after the message sent before it"
    );
    // Deliver everything but lose the acknowledgements once, then again.
    let outbound_before = a.outbound(None, 100).len();
    pump(&a, &b, |_, ids| ids.clear());
    assert_eq!(a.outbound(None, 100).len(), outbound_before);
    pump(&a, &b, all);
    assert!(
        a.conversation_endpoint(h).is_none(),
        "gone once its end is acknowledged"
    );
    let got = receive_all(&b, "Server");
    assert_eq!(
        got.iter().map(|(_, t, _)| t.as_str()).collect::<Vec<_>>(),
        [ASK, system::END_DIALOG]
    );
    let target = got[0].0;
    assert_eq!(
        b.conversation_endpoint(target).unwrap().state,
        EndpointState::DisconnectedInbound
    );
    let mut tx = b.begin();
    tx.end_conversation(target).unwrap();
    tx.commit().unwrap();
    assert!(
        b.conversation_endpoint(target).is_none(),
        "the far side ended first"
    );
    assert!(b.transmission_queue().is_empty(), "nothing to tell it");
    invariants::check_idle(&a).unwrap();
    invariants::check_idle(&b).unwrap();
}

#[test]
fn end_with_error_and_refusals_reach_the_initiator_as_errors() {
    let (_dirs, a, b) = fresh_pair();
    let h = begin(&a, &["question"]);
    pump(&a, &b, all);
    let target = receive_all(&b, "Server")[0].0;
    let mut tx = b.begin();
    tx.send(target, TELL, b"never read").unwrap();
    tx.end_conversation_with_error(target, 42, "cannot serve")
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(
        b.transmission_queue().len(),
        1,
        "WITH ERROR drops what was not sent"
    );
    pump(&b, &a, all);
    assert_eq!(
        a.conversation_endpoint(h).unwrap().state,
        EndpointState::Error
    );
    let got = receive_all(&a, "Client");
    assert_eq!(got.len(), 1);
    assert_eq!(
        system::parse_error_body(&got[0].2).unwrap(),
        (42, "cannot serve".into())
    );
    assert!(
        b.conversation_endpoint(target).is_none(),
        "its error was acknowledged"
    );

    // A dialog on a contract the far service does not accept is refused there.
    let mut tx = a.begin();
    let refused = tx
        .begin_dialog(
            "//t/Client",
            "//t/Server",
            "DEFAULT",
            DialogOptions::default(),
        )
        .unwrap();
    tx.send(refused, "DEFAULT", b"x").unwrap();
    tx.commit().unwrap();
    let outcomes = pump(&a, &b, all);
    assert!(matches!(
        outcomes[..],
        [ArrivalOutcome::Refused {
            code: codes::CONTRACT_NOT_ACCEPTED,
            ..
        }]
    ));
    assert_eq!(
        a.conversation_endpoint(refused).unwrap().state,
        EndpointState::Error
    );
    assert!(a.transmission_queue().is_empty());
    let got = receive_all(&a, "Client");
    assert_eq!(
        system::parse_error_body(&got[0].2).unwrap().0,
        codes::CONTRACT_NOT_ACCEPTED
    );
    invariants::check_idle(&a).unwrap();
    invariants::check_idle(&b).unwrap();
}

#[test]
fn without_a_route_messages_wait_and_go_once_one_exists() {
    let (_dirs, a, _b) = fresh_pair();
    let mut tx = a.begin();
    tx.drop_route("far").unwrap();
    tx.commit().unwrap();
    begin(&a, &["patience"]);
    let queued = a.transmission_queue();
    assert!(
        queued[0].transmission_status.contains("no route"),
        "{queued:?}"
    );
    assert_eq!(*a.outbound(None, 10)[0].route, RouteChoice::NoRoute);
    let far = Route {
        name: "far".into(),
        service_name: None,
        broker_instance: None,
        address: RouteAddress::parse("quic://b.example:4022").unwrap(),
        expires_at_ms: None,
    };
    // The network's sender routes waiting messages again when `route_changes` moves: only a
    // committed CREATE, ALTER or DROP ROUTE moves it.
    let changes = a.route_changes();
    let mut tx = a.begin();
    tx.create_route(far.clone()).unwrap();
    tx.rollback();
    assert_eq!(
        a.route_changes(),
        changes,
        "a rolled-back route is no change"
    );
    let mut tx = a.begin();
    tx.create_route(far.clone()).unwrap();
    tx.commit().unwrap();
    let created = a.route_changes();
    assert_ne!(created, changes);
    assert!(matches!(
        *a.outbound(None, 10)[0].route,
        RouteChoice::Remote { .. }
    ));
    let mut tx = a.begin();
    tx.alter_route(Route {
        address: RouteAddress::parse("quic://c.example:4022").unwrap(),
        ..far
    })
    .unwrap();
    tx.commit().unwrap();
    let altered = a.route_changes();
    assert_ne!(altered, created);
    let mut tx = a.begin();
    tx.drop_route("far").unwrap();
    tx.commit().unwrap();
    assert_ne!(a.route_changes(), altered);
    assert_eq!(*a.outbound(None, 10)[0].route, RouteChoice::NoRoute);
}

#[test]
fn the_transmission_queue_and_remote_endpoints_survive_restarts() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for checkpoint in [false, true] {
        let h = {
            let (a, b) = pair(a_dir.path(), b_dir.path());
            let h = begin(&a, &["1", "2"]);
            pump(&a, &b, |arrivals, ids| {
                arrivals.truncate(1);
                ids.clear();
            });
            if checkpoint {
                a.checkpoint().unwrap();
                b.checkpoint().unwrap();
            }
            h
        };
        let (a, b) = pair(a_dir.path(), b_dir.path());
        assert_eq!(
            a.transmission_queue().len(),
            2,
            "unacknowledged: still queued"
        );
        assert_eq!(
            pump(&a, &b, all),
            [ArrivalOutcome::Duplicate, ArrivalOutcome::Accepted],
            "the far side remembers what it has"
        );
        assert!(a.transmission_queue().is_empty());
        let got = receive_all(&b, "Server");
        assert_eq!(got.len(), 2);
        let mut tx = a.begin();
        tx.end_conversation(h).unwrap();
        tx.commit().unwrap();
        pump(&a, &b, all);
        let mut tx = b.begin();
        tx.end_conversation(got[0].0).unwrap();
        tx.commit().unwrap();
        receive_all(&b, "Server");
        invariants::check_idle(&a).unwrap();
        invariants::check_idle(&b).unwrap();
    }
}

/// One dialog from A to B, ended by both sides, everything delivered: returns the arrival of
/// its first message, as it reached B.
fn a_dialog_both_sides_ended(a: &Broker, b: &Broker) -> Arrival {
    let h = begin(a, &["only"]);
    let first = arrival(&a.outbound(None, 1)[0], a);
    let mut tx = a.begin();
    tx.end_conversation(h).unwrap();
    tx.commit().unwrap();
    pump(a, b, all);
    let target = receive_all(b, "Server")[0].0;
    let mut tx = b.begin();
    tx.end_conversation(target).unwrap();
    tx.commit().unwrap();
    first
}

/// A remote conversation ended here is remembered for `CLOSED_CONVERSATION_LINGER_MS`, so that
/// its late messages are dropped as duplicates, and then forgotten: a broker that runs for
/// months does not hold one entry per remote conversation it ever ended (it did: their
/// linger was counted from 1970, never passed, and went into every checkpoint too).
#[test]
fn a_closed_conversation_is_remembered_for_its_linger_only() {
    let clock = herald_engine::ManualClock::new(1_700_000_000_000);
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    drop(pair(a_dir.path(), b_dir.path()));
    let on_clock = |dir: &std::path::Path| open_on_clock(dir, &clock);
    let (a, b) = (on_clock(a_dir.path()), on_clock(b_dir.path()));
    let late = a_dialog_both_sides_ended(&a, &b);
    assert_eq!(b.closed_conversations_held(), 1);
    assert_eq!(
        b.accept_arrivals(std::slice::from_ref(&late)).unwrap(),
        [ArrivalOutcome::Duplicate],
        "a late message of a conversation ended here is a duplicate"
    );

    clock.advance(std::time::Duration::from_millis(
        herald_engine::CLOSED_CONVERSATION_LINGER_MS,
    ));
    a_dialog_both_sides_ended(&a, &b);
    assert_eq!(
        b.closed_conversations_held(),
        1,
        "the first one's linger passed: only the second is held"
    );
    b.checkpoint().unwrap();
    drop(b);
    let b = on_clock(b_dir.path());
    assert_eq!(b.closed_conversations_held(), 1, "and so after a restart");
    assert_ne!(
        b.accept_arrivals(std::slice::from_ref(&late)).unwrap(),
        [ArrivalOutcome::Duplicate],
        "past its linger, a message is no longer taken for a duplicate"
    );
}

#[test]
fn an_expired_lifetime_drops_what_never_left() {
    let clock = herald_engine::ManualClock::new(1_700_000_000_000);
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Define both catalogs, then reopen A on the manual clock.
    drop(pair(a_dir.path(), b_dir.path()));
    let a = Broker::open(
        a_dir.path(),
        Options {
            clock: clock.clone(),
            ..options()
        },
    )
    .unwrap();
    let mut tx = a.begin();
    let h = tx
        .begin_dialog(
            "//t/Client",
            "//t/Server",
            CONTRACT,
            DialogOptions {
                lifetime: Some(std::time::Duration::from_secs(60)),
                ..DialogOptions::default()
            },
        )
        .unwrap();
    tx.send(h, ASK, b"too late").unwrap();
    tx.commit().unwrap();
    assert_eq!(a.transmission_queue().len(), 1);
    clock.advance(std::time::Duration::from_secs(60));
    assert_eq!(
        a.conversation_endpoint(h).unwrap().state,
        EndpointState::Error
    );
    assert!(
        a.transmission_queue().is_empty(),
        "the failed dialog's messages are dropped"
    );
    let got = receive_all(&a, "Client");
    assert_eq!(
        system::parse_error_body(&got[0].2).unwrap().0,
        system::ERROR_LIFETIME_EXPIRED
    );
    invariants::check_idle(&a).unwrap();
}

/// Status texts are kept only for messages still in the transmission queue: those of messages
/// the queue dropped unacknowledged (END WITH CLEANUP here) go, and a late status for them is
/// ignored, so a long-running node's texts never outnumber its queue.
#[test]
fn status_texts_of_dropped_transmissions_are_forgotten() {
    let (_dirs, a, _b) = fresh_pair();
    let kept = begin(&a, &["k1", "k2"]);
    let dropped = begin(&a, &["d1", "d2", "d3"]);
    let ids: Vec<u64> = a.transmission_queue().iter().map(|row| row.id).collect();
    assert_eq!(ids.len(), 5);
    let drops = a.transmission_drops();
    a.set_transmission_status(&ids, "sent; waiting for its acknowledgement");
    assert_eq!(a.transmission_statuses_held(), 5);

    let mut tx = a.begin();
    tx.end_conversation_with_cleanup(dropped).unwrap();
    tx.commit().unwrap();
    assert_eq!(a.transmission_queue_len(), 2);
    assert_ne!(
        a.transmission_drops(),
        drops,
        "the drop is visible to the network"
    );
    let gone = a.transmissions_gone(&ids);
    assert_eq!(gone.len(), 3, "the dropped ones are gone: {gone:?}");

    // The next status update (here a late one for every id) forgets the dropped ones' texts.
    a.set_transmission_status(&ids, "unreachable; retrying");
    assert_eq!(a.transmission_statuses_held(), 2);
    let rows = a.transmission_queue();
    assert!(rows.iter().all(|row| row.conversation_handle == kept));
    assert!(
        rows.iter()
            .all(|row| row.transmission_status == "unreachable; retrying")
    );
}

/// The network's outbound listener is called on the committing thread after each commit that
/// changes the transmission queue — with the commit applied, so its messages are listed, and
/// the transaction's locks released — instead of waking the `OutboundWaiter`s; without a
/// listener, commits wake them again.
#[test]
fn the_outbound_listener_replaces_the_waiters_wake_up_on_the_committing_thread() {
    use std::sync::{Arc, Mutex};
    let (_dirs, a, _b) = fresh_pair();
    // (thread, messages listed, the dialog's group could be locked) at each call.
    type Calls = Arc<Mutex<Vec<(std::thread::ThreadId, usize, bool)>>>;
    let calls: Calls = Arc::default();
    let dialog: Arc<Mutex<Option<ConversationHandle>>> = Arc::default();
    {
        let (calls, dialog) = (calls.clone(), dialog.clone());
        a.set_outbound_listener(Some(Arc::new(move |core: &herald_engine::BrokerCore| {
            let listed = core.outbound(None, 100).len();
            // A transaction still holding the group would make this SEND wait: it must not.
            let unlocked = dialog.lock().unwrap().is_none_or(|h| {
                let mut tx = core.begin();
                let free = tx.send(h, ASK, b"probe").is_ok();
                tx.rollback();
                free
            });
            calls
                .lock()
                .unwrap()
                .push((std::thread::current().id(), listed, unlocked));
        })));
    }
    let waiter = a.outbound_waiter();
    let generation = waiter.generation();

    let h = begin(&a, &["one", "two"]);
    *dialog.lock().unwrap() = Some(h);
    let mut tx = a.begin();
    tx.send(h, ASK, b"three").unwrap();
    tx.commit().unwrap();
    // A commit that leaves the transmission queue alone does not call it.
    let mut tx = a.begin();
    tx.create_queue("Elsewhere", QueueOptions::default())
        .unwrap();
    tx.commit().unwrap();
    let me = std::thread::current().id();
    assert_eq!(
        *calls.lock().unwrap(),
        vec![(me, 2, true), (me, 3, true)],
        "one call per commit that queued messages, on the committing thread, after the apply"
    );
    assert_eq!(
        waiter.generation(),
        generation,
        "the listener is told instead of the waiters"
    );

    // Dropping unacknowledged messages is a change the network must hear of too.
    let mut tx = a.begin();
    tx.end_conversation_with_cleanup(h).unwrap();
    tx.commit().unwrap();
    assert_eq!(calls.lock().unwrap().len(), 3);
    assert_eq!(calls.lock().unwrap()[2].1, 0);

    a.set_outbound_listener(None);
    begin(&a, &["four"]);
    assert_eq!(calls.lock().unwrap().len(), 3);
    assert_ne!(
        waiter.generation(),
        generation,
        "without a listener commits wake the waiters"
    );
}

/// `accept_arrivals_written` makes a batch receivable as soon as it is written (before
/// `wait_synced`), and the point it returns covers every batch before it: a repeat of the same
/// messages is a `Duplicate` whose point is not below the first one's.
#[test]
fn written_arrivals_are_receivable_before_their_sync_and_later_points_cover_earlier_ones() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    drop(pair(a_dir.path(), b_dir.path()));
    let a = Broker::open(a_dir.path(), options()).unwrap();
    let b = Broker::open(
        b_dir.path(),
        Options {
            durability: Durability::Sync,
            ..options()
        },
    )
    .unwrap();
    assert!(b.waits_for_sync());
    assert!(
        !a.waits_for_sync(),
        "None: commits do not wait, nor do acks"
    );
    begin(&a, &["first", "second"]);
    let arrivals: Vec<Arrival> = a
        .outbound(None, 10)
        .iter()
        .map(|m| arrival(m, &a))
        .collect();
    let (outcomes, first) = b.accept_arrivals_written(&arrivals).unwrap();
    assert_eq!(outcomes, vec![ArrivalOutcome::Accepted; 2]);
    let mut tx = b.begin();
    let got = tx.receive("Server", Receive::top(10)).unwrap();
    assert_eq!(
        got.iter().map(|m| m.body().to_vec()).collect::<Vec<_>>(),
        vec![b"first".to_vec(), b"second".to_vec()],
        "receivable before anyone waited for the sync"
    );
    tx.rollback();
    let (again, second) = b.accept_arrivals_written(&arrivals).unwrap();
    assert_eq!(again, vec![ArrivalOutcome::Duplicate; 2]);
    assert!(second >= first, "{second:?} < {first:?}");
    b.wait_synced(second).unwrap();
    b.wait_synced(first).unwrap();
    // Received bodies are borrowed from the log: they keep its directory locked.
    drop(got);
    drop(b);
    let b = Broker::open(b_dir.path(), options()).unwrap();
    assert_eq!(receive_all(&b, "Server").len(), 2, "stored once");
    invariants::check_idle(&b).unwrap();
}

#[test]
fn a_batch_larger_than_a_record_is_taken_in_several_and_a_message_no_record_holds_is_refused() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = pair(a_dir.path(), b_dir.path());
    drop(b);
    // B's log takes records of less than 64 KiB; A's of up to about 1 MiB.
    let b = Broker::open(
        b_dir.path(),
        Options {
            segment_bytes: 64 * 1024,
            ..options()
        },
    )
    .unwrap();
    let asks: Vec<String> = (0..30)
        .map(|i| format!("{i:04}{}", "x".repeat(8 * 1024)))
        .collect();
    let h = begin(&a, &asks.iter().map(String::as_str).collect::<Vec<_>>());
    let too_large = "y".repeat(100 * 1024);
    let big = begin(&a, &[too_large.as_str()]);

    let outcomes = pump(&a, &b, all);
    let accepted = outcomes
        .iter()
        .filter(|o| matches!(o, ArrivalOutcome::Accepted))
        .count();
    assert_eq!(accepted, asks.len(), "{outcomes:?}");
    assert!(
        outcomes.iter().any(|o| matches!(
            o,
            ArrivalOutcome::Refused { code, .. } if *code == codes::MESSAGE_TOO_LARGE
        )),
        "{outcomes:?}"
    );
    let got = receive_all(&b, "Server");
    assert!(got.iter().all(|(handle, _, _)| got[0].0 == *handle));
    let bodies: Vec<String> = got
        .into_iter()
        .map(|(_, _, body)| String::from_utf8(body).unwrap())
        .collect();
    assert_eq!(bodies, asks, "every message once, in order");
    // The refused message began no dialog at B: only the other one has an endpoint there.
    assert_eq!(b.conversation_endpoints().len(), 1);
    // The refused dialog errored at its initiator; the other goes on.
    assert_eq!(
        a.conversation_endpoint(big).unwrap().state,
        EndpointState::Error
    );
    assert_eq!(
        a.conversation_endpoint(h).unwrap().state,
        EndpointState::Conversing
    );
}

#[test]
fn a_refused_first_message_begins_no_dialog_at_the_target() {
    let (_dirs, a, b) = fresh_pair();
    // The brokers' catalogs disagree: A's //t/Other lets TELL be sent, B's does not.
    let mut tx = b.begin();
    tx.create_contract("//t/Other", &[(ASK, SentBy::Initiator)])
        .unwrap();
    tx.create_service("//t/OtherServer", "Server", &["//t/Other"])
        .unwrap();
    tx.commit().unwrap();
    let mut tx = a.begin();
    tx.create_contract(
        "//t/Other",
        &[(ASK, SentBy::Initiator), (TELL, SentBy::Any)],
    )
    .unwrap();
    tx.create_route(Route {
        name: "other".into(),
        service_name: Some("//t/OtherServer".into()),
        broker_instance: None,
        address: RouteAddress::parse("quic://b.example:4022").unwrap(),
        expires_at_ms: None,
    })
    .unwrap();
    let h = tx
        .begin_dialog(
            "//t/Client",
            "//t/OtherServer",
            "//t/Other",
            DialogOptions::default(),
        )
        .unwrap();
    tx.send(h, TELL, b"not in B's contract").unwrap();
    tx.commit().unwrap();

    let outcomes = pump(&a, &b, all);
    assert!(
        matches!(
            outcomes[..],
            [ArrivalOutcome::Refused {
                code: codes::MESSAGE_TYPE_NOT_IN_CONTRACT,
                ..
            }]
        ),
        "{outcomes:?}"
    );
    assert!(
        b.conversation_endpoints().is_empty(),
        "{:?}",
        b.conversation_endpoints()
    );
    assert_eq!(
        a.conversation_endpoint(h).unwrap().state,
        EndpointState::Error
    );
}

/// A batch's messages of one kind are checked against the catalog once, but each body is
/// validated, and a message of another kind is looked up again.
#[test]
fn every_message_of_a_batch_is_checked_though_its_kind_is_looked_up_once() {
    let (_dirs, a, b) = fresh_pair();
    begin(&a, &["one", "two", "three", "four"]);
    begin(&a, &["five", "six"]);
    let outcomes = pump(&a, &b, |arrivals, _| {
        assert_eq!(arrivals.len(), 6);
        // ASK validates as UTF-8: the third message of the first dialog no longer does.
        arrivals[2].body = vec![0xff, 0xfe];
        // The second dialog's second message becomes a type its contract does not have.
        arrivals[5].message_type = "DEFAULT".into();
    });
    let codes: Vec<Option<i32>> = outcomes
        .iter()
        .map(|o| match o {
            ArrivalOutcome::Refused { code, .. } => Some(*code),
            _ => None,
        })
        .collect();
    assert_eq!(
        codes,
        [
            None,
            None,
            Some(codes::VALIDATION_FAILED),
            None,
            None,
            Some(codes::MESSAGE_TYPE_NOT_IN_CONTRACT)
        ],
        "{outcomes:?}"
    );
    assert!(matches!(outcomes[3], ArrivalOutcome::Gap), "{outcomes:?}");
    let got = receive_all(&b, "Server");
    let bodies: Vec<&[u8]> = got
        .iter()
        .filter(|(_, message_type, _)| message_type != system::ERROR)
        .map(|(_, _, body)| &body[..])
        .collect();
    assert_eq!(bodies, [&b"one"[..], b"two", b"five"]);
    // Each refusal failed its dialog here too.
    let errors = got.iter().filter(|(_, t, _)| t == system::ERROR).count();
    assert_eq!(errors, 2);
}

/// A peer that sends the last sequence number (no dialog sends 2^64 messages): never taken, an
/// Error included (Errors skip the wait for earlier messages, and the expected next sequence
/// would have overflowed); the dialog goes on as before.
#[test]
fn the_last_sequence_number_is_never_taken() {
    let (_dirs, a, b) = fresh_pair();
    let h = begin(&a, &["first"]);
    let first = arrival(&a.outbound(None, 1)[0], &a);
    assert_eq!(pump(&a, &b, all), [ArrivalOutcome::Accepted]);
    let last = |message_type: &str| Arrival {
        sequence: u64::MAX,
        message_type: message_type.into(),
        ..first.clone()
    };
    assert_eq!(
        b.accept_arrivals(&[last(system::ERROR), last(ASK)])
            .unwrap(),
        [ArrivalOutcome::Gap, ArrivalOutcome::Gap]
    );
    let mut tx = a.begin();
    tx.send(h, ASK, b"second").unwrap();
    tx.commit().unwrap();
    assert_eq!(pump(&a, &b, all), [ArrivalOutcome::Accepted]);
    let bodies: Vec<Vec<u8>> = receive_all(&b, "Server")
        .into_iter()
        .map(|(_, _, body)| body)
        .collect();
    assert_eq!(bodies, [b"first".to_vec(), b"second".to_vec()]);
}

/// The status counts `herald status` shows are what the transmission queue's rows say, counted
/// without making the rows; so are the endpoint counts by state.
#[test]
fn status_counts_agree_with_the_rows() {
    let (_dirs, a, _b) = fresh_pair();
    let routed = begin(&a, &["1", "2", "3"]);
    let mut tx = a.begin();
    let unrouted = tx
        .begin_dialog(
            "//t/Client",
            "//t/Nowhere",
            CONTRACT,
            DialogOptions::default(),
        )
        .unwrap();
    tx.send(unrouted, ASK, b"x").unwrap();
    tx.send(unrouted, ASK, b"y").unwrap();
    tx.end_conversation(routed).unwrap();
    tx.commit().unwrap();
    let ids: Vec<u64> = a.outbound(None, 100).iter().map(|m| m.id).collect();
    a.set_transmission_status(&ids[..2], "sent to 10.0.0.1:4022; waiting");
    a.set_transmission_status(&ids[2..], "unreachable");

    let mut from_rows: std::collections::HashMap<String, u64> = Default::default();
    for row in a.transmission_queue() {
        *from_rows.entry(row.transmission_status).or_default() += 1;
    }
    let counted: std::collections::HashMap<String, u64> =
        a.transmission_status_counts().into_iter().collect();
    assert_eq!(counted, from_rows);
    assert_eq!(counted.len(), 3, "{counted:?}");
    assert_eq!(counted["no route to service \"//t/Nowhere\" yet"], 2);

    let mut by_state: Vec<(EndpointState, u64)> = Vec::new();
    for endpoint in a.conversation_endpoints() {
        match by_state
            .iter_mut()
            .find(|(state, _)| *state == endpoint.state)
        {
            Some((_, count)) => *count += 1,
            None => by_state.push((endpoint.state, 1)),
        }
    }
    let mut counted = a.endpoint_state_counts();
    by_state.sort_by_key(|(state, _)| state.code());
    counted.sort_by_key(|(state, _)| state.code());
    assert_eq!(counted, by_state);
    assert_eq!(
        counted.len(),
        2,
        "one dialog open, one ended here: {counted:?}"
    );
}

/// A dialog ended with an error before anything of it reached the far broker: its Error (the
/// SEND before it dropped) is acknowledged there and leaves the sender's transmission queue
/// (it waited there for ever as a gap), and no endpoint is made for it there.
#[test]
fn an_error_for_a_dialog_that_never_reached_the_far_broker_is_acknowledged() {
    let (_dirs, a, b) = fresh_pair();
    let h = begin(&a, &["never sent"]);
    let mut tx = a.begin();
    tx.end_conversation_with_error(h, 50_000, "giving up")
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(pump(&a, &b, all), [ArrivalOutcome::Duplicate]);
    assert_eq!(a.transmission_queue_len(), 0);
    assert!(b.conversation_endpoints().is_empty());
}

/// On a dialog that exists, its contract decides what may come, not the contract a message's
/// header names; and of the system message types only END and Error come from another broker.
/// A message refused fails the dialog on the receiving side too.
#[test]
fn arrivals_on_a_dialog_are_checked_against_its_own_contract() {
    let (_dirs, a, b) = fresh_pair();
    begin(&a, &["first"]);
    let first = arrival(&a.outbound(None, 1)[0], &a);
    assert_eq!(pump(&a, &b, all), [ArrivalOutcome::Accepted]);
    let next = |contract: &str, message_type: &str| Arrival {
        sequence: 1,
        contract: contract.into(),
        message_type: message_type.into(),
        ..first.clone()
    };
    let refused = b
        .accept_arrivals(&[
            next("DEFAULT", "DEFAULT"),
            next(CONTRACT, system::DIALOG_TIMER),
        ])
        .unwrap();
    assert!(
        refused.iter().all(|outcome| matches!(
            outcome,
            ArrivalOutcome::Refused { code, .. } if *code == codes::MESSAGE_TYPE_NOT_IN_CONTRACT
        )),
        "{refused:?}"
    );
    // A refusal fails the dialog on this side too: its application gets the Error (and ends
    // it), as the sender's gets the one the refusal answers.
    let endpoints = b.conversation_endpoints();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].state, EndpointState::Error);
    let types: Vec<String> = receive_all(&b, "Server")
        .into_iter()
        .map(|(_, message_type, _)| message_type)
        .collect();
    assert_eq!(types, [system::ERROR, ASK], "the Error comes first");
}

/// Arrivals taken by two callers at once: both see the new dialog's first message, and only
/// one may begin it. Every message reported accepted is in the queue (without one batch at a
/// time, the second caller's begin was dropped and its messages with it, though reported
/// accepted: about one round in seven lost one).
#[test]
fn arrivals_taken_by_two_callers_at_once_are_each_accepted_once() {
    let (_dirs, a, b) = fresh_pair();
    for round in 0..40 {
        begin(&a, &["0", "1"]);
        let arrivals: Vec<Arrival> = a.outbound(None, 2).iter().map(|m| arrival(m, &a)).collect();
        let outcomes = std::thread::scope(|s| {
            let first = s.spawn(|| b.accept_arrivals(&arrivals[..1]).unwrap());
            let both = s.spawn(|| b.accept_arrivals(&arrivals).unwrap());
            [first.join().unwrap(), both.join().unwrap()].concat()
        });
        let accepted = outcomes
            .iter()
            .filter(|o| **o == ArrivalOutcome::Accepted)
            .count();
        let received = receive_all(&b, "Server");
        assert_eq!(received.len(), accepted, "round {round}: {outcomes:?}");
        assert_eq!(received.len(), 2, "round {round}: {outcomes:?}");
        let ids: Vec<u64> = a.outbound(None, 2).iter().map(|m| m.id).collect();
        a.transmitted(&ids, Some(b.broker_instance())).unwrap();
    }
}

/// A side that ended a remote dialog waits (DO) for the far side: a second END, plain or with
/// an error, is refused (it sent the far application a second EndDialog, or an Error past the
/// END); WITH CLEANUP still removes it.
#[test]
fn a_second_end_of_a_remote_dialog_is_refused_but_cleanup_is_not() {
    let (_dirs, a, _b) = fresh_pair();
    let h = begin(&a, &["1"]);
    let mut tx = a.begin();
    tx.end_conversation(h).unwrap();
    tx.commit().unwrap();
    assert_eq!(
        a.conversation_endpoint(h).unwrap().state,
        EndpointState::DisconnectedOutbound
    );
    let mut tx = a.begin();
    assert!(matches!(
        tx.end_conversation(h),
        Err(herald_engine::Error::ConversationClosed { .. })
    ));
    assert!(matches!(
        tx.end_conversation_with_error(h, 1, "again"),
        Err(herald_engine::Error::ConversationClosed { .. })
    ));
    tx.rollback();
    assert_eq!(a.transmission_queue_len(), 2, "the message and one END");
    let mut tx = a.begin();
    tx.end_conversation_with_cleanup(h).unwrap();
    tx.commit().unwrap();
    assert!(a.conversation_endpoint(h).is_none());
    assert_eq!(a.transmission_queue_len(), 0);
}

/// A SEND that passed its checks before the far broker's refusal failed the dialog, and commits
/// after it: its message is dropped with the rest of what was not transmitted, not left in the
/// transmission queue of a dialog in error (sent and refused again and again).
#[test]
fn a_send_committed_after_its_dialog_failed_is_not_transmitted() {
    let (_dirs, a, b) = fresh_pair();
    let h = begin(&a, &["1"]);
    assert_eq!(pump(&a, &b, all), [ArrivalOutcome::Accepted]);
    let conversation = a.conversation_endpoint(h).unwrap().conversation_id;
    let mut tx = a.begin();
    tx.send(h, ASK, b"2").unwrap();
    a.remote_failed(conversation, true, codes::VALIDATION_FAILED, "refused")
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(
        a.conversation_endpoint(h).unwrap().state,
        EndpointState::Error
    );
    assert_eq!(a.transmission_queue_len(), 0);
}

/// Acknowledgements of more messages than one record of the log can name (they pile up while
/// the log refuses to write, a full disk) are recorded in several records.
#[test]
fn acknowledgements_of_more_than_a_record_holds_are_recorded() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    drop(pair(a_dir.path(), b_dir.path()));
    let a = Broker::open(
        a_dir.path(),
        Options {
            segment_bytes: 64 * 1024,
            ..options()
        },
    )
    .unwrap();
    let h = begin(&a, &[]);
    for _ in 0..40 {
        let mut tx = a.begin();
        for _ in 0..500 {
            tx.send(h, TELL, b"").unwrap();
        }
        tx.commit().unwrap();
    }
    let ids: Vec<u64> = a.outbound(None, 100_000).iter().map(|m| m.id).collect();
    assert_eq!(
        ids.len(),
        20_000,
        "160 KB of ids: more than a 64 KiB segment's record"
    );
    a.transmitted(&ids, None).unwrap();
    assert_eq!(a.transmission_queue_len(), 0);
}

/// A dialog pinned to its far broker instance by the first acknowledgement may match another
/// route (one naming that instance): the pin counts as a route change, so that what the
/// network already handed on is routed again; with no route naming an instance it does not.
#[test]
fn a_pin_that_may_change_a_dialogs_route_counts_as_a_route_change() {
    let (_dirs, a, b) = fresh_pair();
    begin(&a, &["1"]);
    let before = a.route_changes();
    pump(&a, &b, all);
    assert_eq!(a.route_changes(), before, "no route names an instance");

    let mut tx = a.begin();
    tx.create_route(Route {
        name: "b itself".into(),
        service_name: Some("//t/Server".into()),
        broker_instance: Some(b.broker_instance()),
        address: RouteAddress::parse("quic://b2.example:4022").unwrap(),
        expires_at_ms: None,
    })
    .unwrap();
    tx.commit().unwrap();
    let h = begin(&a, &["1", "2"]);
    let unpinned = a.outbound(None, 10);
    assert!(
        matches!(&*unpinned[0].route, RouteChoice::Remote { address, .. }
            if *address == RouteAddress::parse("quic://b.example:4022").unwrap()),
        "{:?}",
        unpinned[0].route
    );
    let before = a.route_changes();
    // The first message is acknowledged (and pins the dialog), the second not yet.
    a.transmitted(&[unpinned[0].id], Some(b.broker_instance()))
        .unwrap();
    assert_ne!(a.route_changes(), before);
    let pinned = a.outbound(None, 10);
    assert_eq!(pinned.len(), 1);
    assert_eq!(pinned[0].handle, h);
    assert!(
        matches!(&*pinned[0].route, RouteChoice::Remote { address, .. }
            if *address == RouteAddress::parse("quic://b2.example:4022").unwrap()),
        "{:?}",
        pinned[0].route
    );
}

/// An expired route (LIFETIME passed) is ignored for new conversations only (reference §1.5):
/// a dialog the far broker has acknowledged keeps using it — after a restart too — while one
/// never acknowledged, and one begun after, wait for a route. The expiry itself counts as a
/// route change, so that the network takes back what it handed on for the new dialog.
#[test]
fn an_expired_route_still_serves_an_established_dialog_only() {
    let clock = herald_engine::ManualClock::new(1_700_000_000_000);
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    drop(pair(a_dir.path(), b_dir.path()));
    let on_clock = |dir: &std::path::Path| open_on_clock(dir, &clock);
    let (a, b) = (on_clock(a_dir.path()), on_clock(b_dir.path()));
    let expires_at_ms = 1_700_000_000_000 + 60_000;
    let mut tx = a.begin();
    tx.alter_route(Route {
        name: "far".into(),
        service_name: Some("//t/Server".into()),
        broker_instance: None,
        address: RouteAddress::parse("quic://b.example:4022").unwrap(),
        expires_at_ms: Some(expires_at_ms),
    })
    .unwrap();
    tx.commit().unwrap();
    let established = begin(&a, &["1"]);
    pump(&a, &b, |_, _| {});
    let unacknowledged = begin(&a, &["2"]);
    let mut tx = a.begin();
    tx.send(established, ASK, b"3").unwrap();
    tx.commit().unwrap();
    let routed = |a: &Broker| -> Vec<(ConversationHandle, bool)> {
        a.outbound(None, 10)
            .iter()
            .map(|m| (m.handle, matches!(*m.route, RouteChoice::Remote { .. })))
            .collect()
    };
    assert_eq!(
        routed(&a),
        [(unacknowledged, true), (established, true)],
        "before the expiry"
    );

    let before = a.route_changes();
    clock.advance(std::time::Duration::from_millis(60_000));
    assert_ne!(a.route_changes(), before, "the expiry is a route change");
    let late = begin(&a, &["4"]);
    assert_eq!(
        routed(&a),
        [(unacknowledged, false), (established, true), (late, false)],
        "only the dialog its far broker acknowledged keeps the expired route"
    );
    let status = a.transmission_queue();
    assert!(
        status[0].transmission_status.contains("no route"),
        "{:?}",
        status[0].transmission_status
    );
    a.checkpoint().unwrap();
    drop(a);
    let a = on_clock(a_dir.path());
    assert_eq!(
        routed(&a),
        [(unacknowledged, false), (established, true), (late, false)],
        "and so after a restart from the checkpoint"
    );
}

/// A far broker's Error fails a dialog once: repeated (a peer sending it again and again), it
/// writes nothing — each one was a log record and a sync on the thread all arrivals wait on.
#[test]
fn a_repeated_far_error_is_not_written_again() {
    let (_dirs, a, b) = fresh_pair();
    let h = begin(&a, &["1"]);
    assert_eq!(pump(&a, &b, all), [ArrivalOutcome::Accepted]);
    let conversation = a.conversation_endpoint(h).unwrap().conversation_id;
    let before = a.log_records_written();
    a.remote_failed(conversation, true, codes::VALIDATION_FAILED, "refused")
        .unwrap();
    assert_eq!(a.log_records_written(), before + 1);
    for _ in 0..100 {
        a.remote_failed(conversation, true, codes::VALIDATION_FAILED, "again")
            .unwrap();
    }
    assert_eq!(
        a.log_records_written(),
        before + 1,
        "the repeats wrote nothing"
    );
    assert_eq!(
        a.conversation_endpoint(h).unwrap().state,
        EndpointState::Error
    );
    let errors = receive_all(&a, "Client");
    assert_eq!(errors.len(), 1, "one Error in the queue");
}

/// Checkpoint version 4 never marked a dialog established: a file saying version 4 with that
/// mark is refused as damaged, not half-read.
#[test]
fn an_established_mark_in_a_version_4_checkpoint_is_refused() {
    let (dirs, a, b) = fresh_pair();
    begin(&a, &["1"]);
    pump(&a, &b, all);
    b.checkpoint().unwrap();
    drop((a, b));
    let path = dirs[1].path().join("CHECKPOINT");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&4u32.to_le_bytes());
    let content = bytes.len() - 4;
    let crc = crc32fast::hash(&bytes[..content]);
    bytes[content..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    match Broker::open(dirs[1].path(), options()) {
        Err(herald_engine::Error::Corruption(reason)) => {
            assert!(reason.contains("tag 2 (version 4)"), "{reason}")
        }
        other => panic!("expected Corruption, got {:?}", other.map(|_| ())),
    }
}
