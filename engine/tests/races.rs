//! Checks that another transaction can make stale before this one holds its lock: each is done
//! again under the lock, and a refusal is a statement error — never a commit record that is
//! logged and then fails to apply (which left the broker refusing every commit, and every open
//! replaying the same failure).

use std::time::Duration;

use herald_engine::{
    Broker, ConversationGroupId, DialogOptions, Error, Options, QueueOptions, SentBy, Validation,
    invariants,
};

const CLIENT: &str = "//shop/ClientService";
const ORDERS: &str = "//shop/OrderService";
const CONTRACT: &str = "//shop/OrderContract";
const ORDER: &str = "//shop/Order";

/// How long the first transaction keeps its lock while the second waits for it: long enough
/// for the second to be waiting (if it is not yet, the test checks less, never wrongly).
const HOLD: Duration = Duration::from_millis(300);

fn options() -> Options {
    Options {
        lock_timeout: Duration::from_secs(5),
        segment_bytes: 1024 * 1024,
        ..Options::default()
    }
}

/// Two services on two queues, each accepting the contract.
fn shop(broker: &Broker) {
    let mut tx = broker.begin();
    tx.create_message_type(ORDER, Validation::None).unwrap();
    tx.create_contract(CONTRACT, &[(ORDER, SentBy::Any)])
        .unwrap();
    tx.create_queue("OrderQueue", QueueOptions::default())
        .unwrap();
    tx.create_queue("ClientQueue", QueueOptions::default())
        .unwrap();
    tx.create_service(ORDERS, "OrderQueue", &[CONTRACT])
        .unwrap();
    tx.create_service(CLIENT, "ClientQueue", &[CONTRACT])
        .unwrap();
    tx.commit().unwrap();
}

fn in_group(group: ConversationGroupId) -> DialogOptions {
    DialogOptions {
        related_conversation_group: Some(group),
        ..DialogOptions::default()
    }
}

/// Runs `second` in a transaction of its own while `first`'s transaction holds its locks, and
/// commits `first` a moment later (`HOLD`); returns what `second` returned and its commit.
fn while_held<R: Send>(
    broker: &Broker,
    first: impl FnOnce(&mut herald_engine::Transaction<'_>),
    second: impl FnOnce(&mut herald_engine::Transaction<'_>) -> R + Send,
) -> (R, herald_engine::Result<()>) {
    std::thread::scope(|scope| {
        let mut holding = broker.begin();
        first(&mut holding);
        let waiting = scope.spawn(|| {
            let mut tx = broker.begin();
            let result = second(&mut tx);
            (result, tx.commit())
        });
        std::thread::sleep(HOLD);
        holding.commit().unwrap();
        waiting.join().unwrap()
    })
}

/// The broker still commits, and opens again with nothing broken.
fn still_healthy(broker: Broker, dir: &std::path::Path) {
    let mut tx = broker.begin();
    tx.begin_dialog(CLIENT, ORDERS, CONTRACT, DialogOptions::default())
        .unwrap();
    tx.commit().expect("the broker still commits");
    invariants::check_idle(&broker).unwrap();
    drop(broker);
    let broker = Broker::open(dir, options()).expect("and opens again");
    invariants::check_idle(&broker).unwrap();
}

/// Two BEGIN DIALOGs name the same new group id from services on different queues; the
/// second waits for the first's lock on the group, which then exists on the first's queue.
#[test]
fn a_new_group_named_from_two_queues_is_refused_to_the_second() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    let group = ConversationGroupId(42);
    let second = while_held(
        &broker,
        |first| {
            first
                .begin_dialog(CLIENT, ORDERS, CONTRACT, in_group(group))
                .unwrap();
        },
        |second| {
            second
                .begin_dialog(ORDERS, CLIENT, CONTRACT, in_group(group))
                .map(|_| ())
        },
    );
    assert!(
        matches!(second.0, Err(Error::GroupOnOtherQueue { .. })),
        "{:?}",
        second.0
    );
    second.1.expect("the transaction commits without it");
    still_healthy(broker, dir.path());
}

/// MOVE CONVERSATION into a new group id while a BEGIN DIALOG on another queue creates it.
#[test]
fn a_move_into_a_group_made_meanwhile_on_another_queue_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    let mut tx = broker.begin();
    let on_orders = tx
        .begin_dialog(ORDERS, CLIENT, CONTRACT, DialogOptions::default())
        .unwrap();
    tx.commit().unwrap();
    let group = ConversationGroupId(77);
    let moved = while_held(
        &broker,
        |first| {
            first
                .begin_dialog(CLIENT, ORDERS, CONTRACT, in_group(group))
                .unwrap();
        },
        |second| {
            let moved = second.move_conversation(on_orders, group);
            // Refused, it holds nothing: the conversation's own group is free for others.
            let mut third = broker.begin();
            third
                .move_conversation(on_orders, ConversationGroupId(78))
                .expect("the refused MOVE left no lock on the conversation's group");
            third.rollback();
            moved
        },
    );
    assert!(
        matches!(moved.0, Err(Error::GroupOnOtherQueue { .. })),
        "{:?}",
        moved.0
    );
    moved.1.expect("the transaction commits without it");
    still_healthy(broker, dir.path());
}

/// DROP SERVICE while a transaction begins a dialog from it: it waits for that transaction and
/// then finds the conversation.
#[test]
fn a_service_is_not_dropped_under_a_dialog_being_begun() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    shop(&broker);
    let mut tx = broker.begin();
    tx.create_service("//lone", "ClientQueue", &[]).unwrap();
    tx.commit().unwrap();
    let dropped = while_held(
        &broker,
        |first| {
            first
                .begin_dialog("//lone", ORDERS, CONTRACT, DialogOptions::default())
                .unwrap();
        },
        |second| second.drop_service("//lone"),
    );
    assert!(
        matches!(dropped.0, Err(Error::InUse { .. })),
        "{:?}",
        dropped.0
    );
    dropped.1.unwrap();
    still_healthy(broker, dir.path());
}
