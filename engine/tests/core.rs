//! The engine core as a user meets it: the catalog, dialogs, transactional SEND and RECEIVE,
//! conversation-group locks, and recovery of exactly the committed state.

use std::time::Duration;

use herald_engine::{
    Broker, DialogOptions, Error, Options, QueueOptions, Receive, SentBy, Validation,
};

const CLIENT: &str = "//shop/ClientService";
const ORDERS: &str = "//shop/OrderService";
const CONTRACT: &str = "//shop/OrderContract";
const ORDER: &str = "//shop/Order";
const RECEIPT: &str = "//shop/Receipt";

fn options() -> Options {
    Options {
        lock_timeout: Duration::from_millis(200),
        segment_bytes: 1024 * 1024,
        ..Options::default()
    }
}

fn shop(broker: &Broker) {
    let mut tx = broker.begin();
    tx.create_message_type(ORDER, Validation::Json).unwrap();
    tx.create_message_type(RECEIPT, Validation::None).unwrap();
    tx.create_contract(
        CONTRACT,
        &[(ORDER, SentBy::Initiator), (RECEIPT, SentBy::Target)],
    )
    .unwrap();
    tx.create_queue("OrderQueue", QueueOptions::default())
        .unwrap();
    tx.create_queue("ClientQueue", QueueOptions::default())
        .unwrap();
    tx.create_service(ORDERS, "OrderQueue", &[CONTRACT])
        .unwrap();
    tx.create_service(CLIENT, "ClientQueue", &[]).unwrap();
    tx.commit().unwrap();
}

/// A committed dialog from the client to the order service with `orders` sent on it.
fn dialog_with_orders(broker: &Broker, orders: &[u32]) -> herald_engine::ConversationHandle {
    let mut tx = broker.begin();
    let h = tx
        .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    for n in orders {
        tx.send(h, ORDER, &order(*n)).unwrap();
    }
    tx.commit().unwrap();
    h
}

fn order(n: u32) -> Vec<u8> {
    format!("{{\"order\": {n}}}").into_bytes()
}

#[test]
fn the_order_walkthrough_from_the_issue() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);

    let mut tx = broker.begin();
    let h = tx
        .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    tx.send(h, ORDER, &order(1)).unwrap();
    tx.send(h, ORDER, &order(2)).unwrap();
    tx.commit().unwrap();

    let mut tx = broker.begin();
    let batch = tx.receive("OrderQueue", Receive::top(100)).unwrap();
    assert_eq!(batch.len(), 2);
    assert_eq!(batch[0].body(), &order(1)[..]);
    assert_eq!(batch[1].body(), &order(2)[..]);
    assert_eq!((batch[0].sequence, batch[1].sequence), (0, 1));
    assert_eq!(&*batch[0].message_type, ORDER);
    assert_ne!(
        batch[0].conversation_handle, h,
        "each side has its own handle"
    );
    tx.send(batch[0].conversation_handle, RECEIPT, b"ok")
        .unwrap();
    tx.commit().unwrap();

    let mut tx = broker.begin();
    let replies = tx.receive("ClientQueue", Receive::top(10)).unwrap();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].conversation_handle, h);
    assert_eq!(replies[0].body(), b"ok");
    tx.commit().unwrap();

    let mut tx = broker.begin();
    assert!(
        tx.receive("OrderQueue", Receive::top(10))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn nothing_is_visible_before_commit_and_rollback_restores_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    let mut sender = broker.begin();
    let h = sender
        .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    for n in 0..5 {
        sender.send(h, ORDER, &order(n)).unwrap();
    }
    let mut reader = broker.begin();
    assert!(
        reader
            .receive("OrderQueue", Receive::top(10))
            .unwrap()
            .is_empty()
    );
    drop(reader);
    sender.commit().unwrap();

    let mut tx = broker.begin();
    let first = tx.receive("OrderQueue", Receive::top(2)).unwrap();
    assert_eq!(first.len(), 2);
    tx.rollback();

    let mut tx = broker.begin();
    let all = tx.receive("OrderQueue", Receive::top(10)).unwrap();
    let sequences: Vec<u64> = all.iter().map(|m| m.sequence).collect();
    assert_eq!(
        sequences,
        vec![0, 1, 2, 3, 4],
        "rolled-back messages come back in order"
    );
    tx.commit().unwrap();
}

#[test]
fn a_failed_operation_leaves_the_transaction_usable() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    let mut tx = broker.begin();
    let h = tx
        .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    // Body fails JSON validation; the receipt type is the target's; unknown type.
    assert!(matches!(
        tx.send(h, ORDER, b"{not json"),
        Err(Error::ValidationFailed { .. })
    ));
    assert!(matches!(
        tx.send(h, RECEIPT, b"x"),
        Err(Error::ContractViolation { .. })
    ));
    assert!(matches!(
        tx.send(h, "//nope", b"x"),
        Err(Error::UnknownMessageType(_))
    ));
    assert!(matches!(
        tx.send_many(&[h, h], ORDER, &order(1)),
        Err(Error::DuplicateHandle(_))
    ));
    tx.send(h, ORDER, &order(7)).unwrap();
    tx.commit().unwrap();
    let mut tx = broker.begin();
    let got = tx.receive("OrderQueue", Receive::top(10)).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].sequence, 0,
        "failed sends consumed no sequence number"
    );
}

#[test]
fn catalog_rules_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    let mut tx = broker.begin();
    assert!(matches!(
        tx.create_queue("OrderQueue", QueueOptions::default()),
        Err(Error::AlreadyExists { .. })
    ));
    // A service that is not here is on another broker: the dialog begins, and its messages
    // wait in the transmission queue (no route yet is not an error).
    let remote = tx
        .begin_dialog(CLIENT, "//elsewhere", CONTRACT, DialogOptions::default())
        .unwrap();
    assert!(broker.transmission_queue().is_empty());
    let _ = remote;
    assert!(matches!(
        tx.begin_dialog(ORDERS, CLIENT, CONTRACT, DialogOptions::default()),
        Err(Error::ContractNotAccepted { .. })
    ));
    let h = tx
        .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    tx.send(h, ORDER, &order(1)).unwrap();
    tx.commit().unwrap();
    let mut tx = broker.begin();
    assert!(matches!(tx.drop_service(ORDERS), Err(Error::InUse { .. })));
    assert!(matches!(
        tx.drop_queue("OrderQueue"),
        Err(Error::InUse { .. })
    ));
    assert!(matches!(
        tx.drop_contract(CONTRACT),
        Err(Error::InUse { .. })
    ));
}

#[test]
fn a_disabled_queue_refuses_receive() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    let mut tx = broker.begin();
    tx.alter_queue(
        "OrderQueue",
        QueueOptions {
            enabled: false,
            ..QueueOptions::default()
        },
    )
    .unwrap();
    tx.commit().unwrap();
    let mut tx = broker.begin();
    assert!(matches!(
        tx.receive("OrderQueue", Receive::top(1)),
        Err(Error::QueueDisabled(_))
    ));
}

#[test]
fn a_locked_group_is_skipped_by_receive_and_times_out_for_targeted_receive() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    let mut tx = broker.begin();
    let a = tx
        .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    let b = tx
        .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    tx.send(a, ORDER, &order(1)).unwrap();
    tx.send(b, ORDER, &order(2)).unwrap();
    tx.commit().unwrap();

    let mut first = broker.begin();
    let got_first = first.receive("OrderQueue", Receive::top(10)).unwrap();
    assert_eq!(got_first.len(), 1, "one group per RECEIVE");
    let mut second = broker.begin();
    let got_second = second.receive("OrderQueue", Receive::top(10)).unwrap();
    assert_eq!(
        got_second.len(),
        1,
        "the locked group is skipped, the other taken"
    );
    assert_ne!(
        got_first[0].conversation_group,
        got_second[0].conversation_group
    );
    // Enqueueing into a locked group is never blocked.
    let mut tx = broker.begin();
    tx.send(a, ORDER, &order(3)).unwrap();
    tx.commit().unwrap();
    let mut third = broker.begin();
    assert!(
        third
            .receive("OrderQueue", Receive::top(10))
            .unwrap()
            .is_empty()
    );
    match third.receive(
        "OrderQueue",
        Receive::top(10).conversation(got_first[0].conversation_handle),
    ) {
        Err(Error::LockTimeout { group, .. }) => assert_eq!(group, got_first[0].conversation_group),
        other => panic!("expected LockTimeout, got {other:?}"),
    }
    first.commit().unwrap();
    let more = third
        .receive(
            "OrderQueue",
            Receive::top(10).conversation(got_first[0].conversation_handle),
        )
        .unwrap();
    assert_eq!(more.len(), 1);
    assert_eq!(more[0].body(), &order(3)[..]);
}

#[test]
fn related_conversations_share_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    let mut tx = broker.begin();
    let a = tx
        .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    let b = tx
        .begin_dialog(
            CLIENT,
            ORDERS,
            CONTRACT,
            DialogOptions {
                related_conversation: Some(a),
                ..DialogOptions::default()
            },
        )
        .unwrap();
    tx.send(a, ORDER, &order(1)).unwrap();
    tx.send(b, ORDER, &order(2)).unwrap();
    tx.commit().unwrap();
    // The target side groups independently: each order arrives in a group of its own.
    let mut target_groups = std::collections::HashSet::new();
    loop {
        let mut tx = broker.begin();
        let orders = tx.receive("OrderQueue", Receive::top(10)).unwrap();
        if orders.is_empty() {
            break;
        }
        assert_eq!(orders.len(), 1);
        target_groups.insert(orders[0].conversation_group);
        tx.send(orders[0].conversation_handle, RECEIPT, b"ok")
            .unwrap();
        tx.commit().unwrap();
    }
    assert_eq!(target_groups.len(), 2);
    // Replies land in the client's queue, in the one group the client's side shares.
    let mut tx = broker.begin();
    let replies = tx.receive("ClientQueue", Receive::top(10)).unwrap();
    assert_eq!(
        replies.len(),
        2,
        "both conversations' replies come in one group"
    );
    assert_eq!(replies[0].conversation_group, replies[1].conversation_group);
}

#[test]
fn reopening_restores_exactly_the_committed_state() {
    let dir = tempfile::tempdir().unwrap();
    let h;
    {
        let broker = Broker::open(dir.path(), options()).unwrap();
        shop(&broker);
        let mut tx = broker.begin();
        h = tx
            .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
            .unwrap();
        for n in 0..10 {
            tx.send(h, ORDER, &order(n)).unwrap();
        }
        tx.commit().unwrap();
        // Received and committed: gone after reopen.
        let mut tx = broker.begin();
        assert_eq!(tx.receive("OrderQueue", Receive::top(3)).unwrap().len(), 3);
        tx.commit().unwrap();
        // Received, not committed: back after reopen.
        let mut tx = broker.begin();
        assert_eq!(tx.receive("OrderQueue", Receive::top(2)).unwrap().len(), 2);
        std::mem::forget(tx);
        // Sent, not committed: absent after reopen.
        let mut tx = broker.begin();
        let uncommitted = tx
            .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
            .unwrap();
        tx.send(uncommitted, ORDER, &order(99)).unwrap();
        drop(tx);
    }
    let broker = Broker::open(dir.path(), options()).unwrap();
    let mut tx = broker.begin();
    let rest = tx.receive("OrderQueue", Receive::top(100)).unwrap();
    let sequences: Vec<u64> = rest.iter().map(|m| m.sequence).collect();
    assert_eq!(sequences, vec![3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(rest[0].body(), &order(3)[..]);
    tx.commit().unwrap();
    // Sequence numbers continue where they were.
    let mut tx = broker.begin();
    tx.send(h, ORDER, &order(10)).unwrap();
    tx.commit().unwrap();
    let mut tx = broker.begin();
    let next = tx.receive("OrderQueue", Receive::top(10)).unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].sequence, 10);
}

#[test]
fn second_broker_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _broker = Broker::open(dir.path(), options()).unwrap();
    assert!(matches!(
        Broker::open(dir.path(), options()),
        Err(Error::Locked { .. })
    ));
}

#[test]
fn concurrent_receivers_never_share_a_group_and_get_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(
        dir.path(),
        Options {
            durability: herald_engine::Durability::None,
            lock_timeout: Duration::from_secs(5),
            ..options()
        },
    )
    .unwrap();
    shop(&broker);
    const DIALOGS: u32 = 20;
    const PER_DIALOG: u32 = 25;
    let mut tx = broker.begin();
    let mut handles = Vec::new();
    for _ in 0..DIALOGS {
        handles.push(
            tx.begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
                .unwrap(),
        );
    }
    tx.commit().unwrap();
    for n in 0..PER_DIALOG {
        let mut tx = broker.begin();
        for h in &handles {
            tx.send(*h, ORDER, &order(n)).unwrap();
        }
        tx.commit().unwrap();
    }
    let in_flight = parking_lot::Mutex::new(std::collections::HashSet::new());
    let received = parking_lot::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                loop {
                    let mut tx = broker.begin();
                    let batch = tx.receive("OrderQueue", Receive::top(7)).unwrap();
                    if batch.is_empty() {
                        break;
                    }
                    let group = batch[0].conversation_group;
                    assert!(in_flight.lock().insert(group), "two readers hold one group");
                    let items: Vec<_> = batch
                        .iter()
                        .map(|m| (m.conversation_handle, m.sequence))
                        .collect();
                    in_flight.lock().remove(&group);
                    received.lock().extend(items);
                    tx.commit().unwrap();
                }
            });
        }
    });
    let mut received = received.into_inner();
    assert_eq!(received.len(), (DIALOGS * PER_DIALOG) as usize);
    // Exactly once, and in order per conversation.
    let mut by_conversation = std::collections::HashMap::new();
    for (handle, sequence) in received.drain(..) {
        by_conversation
            .entry(handle)
            .or_insert_with(Vec::new)
            .push(sequence);
    }
    assert_eq!(by_conversation.len(), DIALOGS as usize);
    for sequences in by_conversation.values() {
        let expected: Vec<u64> = (0..PER_DIALOG as u64).collect();
        assert_eq!(sequences, &expected);
    }
}

#[test]
fn receive_and_send_refuse_what_does_not_belong() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    let mut tx = broker.begin();
    let h = tx
        .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    tx.send(h, ORDER, &order(1)).unwrap();
    tx.commit().unwrap();

    let mut tx = broker.begin();
    // The initiator's endpoint lives on the client's queue, not the order queue.
    assert!(matches!(
        tx.receive("OrderQueue", Receive::top(1).conversation(h)),
        Err(Error::WrongQueue { .. })
    ));
    let unknown_group = herald_engine::ConversationGroupId::random();
    assert!(matches!(
        tx.receive("OrderQueue", Receive::top(1).group(unknown_group)),
        Err(Error::UnknownConversationGroup { .. })
    ));
    assert!(matches!(
        tx.receive("NoSuchQueue", Receive::top(1)),
        Err(Error::UnknownQueue(_))
    ));
    assert!(matches!(
        tx.send_many(&[], ORDER, &order(2)),
        Err(Error::NoConversation)
    ));
    let too_big = vec![b' '; herald_engine::MESSAGE_BODY_BYTES_MAX + 1];
    assert!(matches!(
        tx.send(h, ORDER, &too_big),
        Err(Error::BodyTooLarge { .. })
    ));
    assert!(matches!(
        tx.send(
            herald_engine::ConversationHandle::random(),
            ORDER,
            &order(3)
        ),
        Err(Error::UnknownConversation(_))
    ));
    assert!(matches!(
        tx.begin_dialog("//nope", ORDERS, CONTRACT, DialogOptions::default()),
        Err(Error::UnknownService(_))
    ));
    assert!(matches!(
        tx.begin_dialog(CLIENT, ORDERS, "//nope", DialogOptions::default()),
        Err(Error::UnknownContract(_))
    ));
    // A group belongs to one queue: the order queue's group cannot hold a client dialog.
    let target_group = broker
        .conversation_endpoint(h)
        .and_then(|e| e.far_handle)
        .and_then(|far| broker.conversation_endpoint(far))
        .unwrap()
        .group;
    assert!(matches!(
        tx.begin_dialog(
            CLIENT,
            ORDERS,
            CONTRACT,
            DialogOptions {
                related_conversation_group: Some(target_group),
                ..DialogOptions::default()
            }
        ),
        Err(Error::GroupOnOtherQueue { .. })
    ));
    // Everything refused, the transaction still works.
    tx.send(h, ORDER, &order(4)).unwrap();
    tx.commit().unwrap();
    herald_engine::invariants::check_idle(&broker).unwrap();
}

#[test]
fn a_transaction_larger_than_a_log_record_is_refused_and_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(
        dir.path(),
        Options {
            segment_bytes: 64 * 1024,
            ..options()
        },
    )
    .unwrap();
    let mut tx = broker.begin();
    tx.create_message_type("//big", Validation::None).unwrap();
    tx.create_contract("//c", &[("//big", SentBy::Any)])
        .unwrap();
    tx.create_queue("Q", QueueOptions::default()).unwrap();
    tx.create_service("//s", "Q", &["//c"]).unwrap();
    let h = tx
        .begin_dialog("//s", "//s", "//c", DialogOptions::default())
        .unwrap();
    tx.commit().unwrap();
    let mut tx = broker.begin();
    for _ in 0..8 {
        tx.send(h, "//big", &[7u8; 10_000]).unwrap();
    }
    assert!(matches!(
        tx.commit(),
        Err(Error::TransactionTooLarge { .. })
    ));
    herald_engine::invariants::check_idle(&broker).unwrap();
    // Nothing of it happened; smaller transactions go on.
    let mut tx = broker.begin();
    assert!(tx.receive("Q", Receive::top(10)).unwrap().is_empty());
    tx.send(h, "//big", &[7u8; 10_000]).unwrap();
    tx.commit().unwrap();
    let mut tx = broker.begin();
    let got = tx.receive("Q", Receive::top(10)).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].sequence, 0,
        "the refused transaction used no sequence number"
    );
}

#[test]
fn get_conversation_group_locks_the_next_group_without_receiving() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    let mut tx = broker.begin();
    let a = tx
        .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    let b = tx
        .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    tx.send(a, ORDER, &order(1)).unwrap();
    tx.send(b, ORDER, &order(2)).unwrap();
    tx.commit().unwrap();

    let mut first = broker.begin();
    let group = first
        .get_conversation_group("OrderQueue")
        .unwrap()
        .expect("a group with messages");
    // Another reader skips the locked group and gets the other one.
    let mut second = broker.begin();
    let got = second.receive("OrderQueue", Receive::top(10)).unwrap();
    assert_eq!(got.len(), 1);
    assert_ne!(got[0].conversation_group, group);
    assert_eq!(
        second.get_conversation_group("OrderQueue").unwrap(),
        None,
        "the only other group is locked"
    );
    // The locking transaction receives from its group by id.
    let mine = first
        .receive("OrderQueue", Receive::top(10).group(group))
        .unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].conversation_group, group);
    first.commit().unwrap();
    second.commit().unwrap();
    herald_engine::invariants::check_idle(&broker).unwrap();
}

#[test]
fn move_conversation_takes_its_messages_to_the_new_group_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (target_a, target_b, joined);
    {
        let broker = Broker::open(dir.path(), options()).unwrap();
        shop(&broker);
        let mut tx = broker.begin();
        let a = tx
            .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
            .unwrap();
        let b = tx
            .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
            .unwrap();
        tx.send(a, ORDER, &order(1)).unwrap();
        tx.send(b, ORDER, &order(2)).unwrap();
        tx.send(b, ORDER, &order(3)).unwrap();
        tx.commit().unwrap();
        target_a = broker.conversation_endpoint(a).unwrap().far_handle.unwrap();
        target_b = broker.conversation_endpoint(b).unwrap().far_handle.unwrap();
        joined = broker.conversation_endpoint(target_a).unwrap().group;

        // Rolled back: nothing moves.
        let mut tx = broker.begin();
        tx.move_conversation(target_b, joined).unwrap();
        tx.rollback();
        assert_ne!(
            broker.conversation_endpoint(target_b).unwrap().group,
            joined
        );

        // A group on another queue is refused.
        let client_group = broker.conversation_endpoint(a).unwrap().group;
        let mut tx = broker.begin();
        assert!(matches!(
            tx.move_conversation(target_b, client_group),
            Err(Error::GroupOnOtherQueue { .. })
        ));
        tx.move_conversation(target_b, joined).unwrap();
        tx.commit().unwrap();
        herald_engine::invariants::check_idle(&broker).unwrap();
    }
    let broker = Broker::open(dir.path(), options()).unwrap();
    assert_eq!(
        broker.conversation_endpoint(target_b).unwrap().group,
        joined
    );
    // One RECEIVE now returns both conversations' messages: they share a group.
    let mut tx = broker.begin();
    let got = tx.receive("OrderQueue", Receive::top(10)).unwrap();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|m| m.conversation_group == joined));
    let b_sequences: Vec<u64> = got
        .iter()
        .filter(|m| m.conversation_handle == target_b)
        .map(|m| m.sequence)
        .collect();
    assert_eq!(b_sequences, vec![0, 1]);
    tx.commit().unwrap();
    herald_engine::invariants::check_idle(&broker).unwrap();
}

#[test]
fn queue_views_count_and_peek_without_consuming() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    let mut tx = broker.begin();
    let a = tx
        .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    let b = tx
        .begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    tx.send(a, ORDER, &order(1)).unwrap();
    tx.send(b, ORDER, &order(2)).unwrap();
    tx.send(a, ORDER, &order(3)).unwrap();
    tx.commit().unwrap();

    let depth = |name: &str| {
        broker
            .queues()
            .into_iter()
            .find(|q| q.name == name)
            .map(|q| (q.messages, q.groups_with_messages))
            .unwrap()
    };
    assert_eq!(depth("OrderQueue"), (3, 2));
    assert_eq!(depth("ClientQueue"), (0, 0));
    let peeked = broker.peek("OrderQueue").unwrap();
    let bodies: Vec<&[u8]> = peeked.iter().map(|m| m.body()).collect();
    assert_eq!(bodies, vec![&order(1)[..], &order(2)[..], &order(3)[..]]);
    // Peeking consumed nothing and locked nothing.
    let mut tx = broker.begin();
    let got = tx.receive("OrderQueue", Receive::top(10)).unwrap();
    assert_eq!(
        got.len(),
        2,
        "the oldest group: conversation a's two messages"
    );
    // A RECEIVE in progress still counts toward the depth; peek hides what it took.
    assert_eq!(depth("OrderQueue"), (3, 1));
    assert_eq!(broker.peek("OrderQueue").unwrap().len(), 1);
    tx.commit().unwrap();
    assert_eq!(depth("OrderQueue"), (1, 1));
    assert!(matches!(broker.peek("Nope"), Err(Error::UnknownQueue(_))));
}

/// A transaction that received from one conversation and ended it holds that group, whose
/// remaining messages are gone for it: its next RECEIVE takes another group's (it came back
/// empty, and a WAITFOR waited for ever).
#[test]
fn a_receive_after_end_conversation_moves_on_to_another_group() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    dialog_with_orders(&broker, &[1, 2]);
    dialog_with_orders(&broker, &[3]);
    let mut tx = broker.begin();
    let first = tx.receive("OrderQueue", Receive::top(1)).unwrap();
    assert_eq!(first[0].body(), order(1));
    tx.end_conversation(first[0].conversation_handle).unwrap();
    let next = tx
        .receive("OrderQueue", Receive::top(10).wait(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(next.len(), 1, "the other group's message");
    assert_eq!(next[0].body(), order(3));
    tx.commit().unwrap();
}

/// After its own MOVE CONVERSATION, a transaction receives the moved conversation's messages
/// by its handle or by its new group (they move in the state only at commit; the RECEIVE found
/// none), reported in the new group.
#[test]
fn a_conversation_moved_in_this_transaction_is_received_by_handle_and_new_group() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    dialog_with_orders(&broker, &[1]);
    let mut peek = broker.begin();
    let target = peek.receive("OrderQueue", Receive::top(1)).unwrap()[0].conversation_handle;
    peek.rollback();
    let group = herald_engine::ConversationGroupId(99);
    let mut tx = broker.begin();
    tx.move_conversation(target, group).unwrap();
    let got = tx
        .receive("OrderQueue", Receive::top(10).conversation(target))
        .unwrap();
    assert_eq!(got.len(), 1, "the moved conversation's message");
    assert_eq!(got[0].conversation_group, group);
    tx.rollback();
    // And by the group it was moved into.
    let mut tx = broker.begin();
    tx.move_conversation(target, group).unwrap();
    let got = tx
        .receive("OrderQueue", Receive::top(10).group(group))
        .unwrap();
    assert_eq!(
        got.len(),
        1,
        "the moved conversation's message, by its new group"
    );
    assert_eq!(got[0].conversation_group, group);
    tx.commit().unwrap();
    let mut tx = broker.begin();
    assert!(
        tx.receive("OrderQueue", Receive::top(10))
            .unwrap()
            .is_empty(),
        "received once"
    );
}
