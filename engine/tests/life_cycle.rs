//! The dialog life cycle, rule by rule (`../shared/reference/service-broker.md` sections 2–4, 6):
//! END CONVERSATION in its three forms, system messages and their precedence, conversation
//! timers, dialog lifetimes, WAITFOR (blocking and as a future), poison messages, broker
//! priorities, activation, views and events. Time is virtual (`ManualClock`) wherever a rule
//! depends on it: no test sleeps to make time pass.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_engine::{
    ActivationOptions, Broker, BrokerPriority, ConversationHandle, DialogOptions, Durability,
    EndpointState, Error, Event, ManualClock, MessageStatus, Options, QueueOptions, Receive,
    SentBy, Validation, invariants, system,
};

const ASK: &str = "//t/Ask";
const TELL: &str = "//t/Tell";
const CONTRACT: &str = "//t/Talk";
const START_MS: u64 = 1_700_000_000_000;

fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::None,
        lock_timeout: Duration::from_secs(1),
        segment_bytes: 256 * 1024,
        clock: clock.clone(),
        ..Options::default()
    }
}

/// A broker on a manual clock with two services: `//t/Client` (queue `Client`, initiate-only)
/// and `//t/Server` (queue `Server`, accepts `//t/Talk`).
fn broker(dir: &std::path::Path, clock: &Arc<ManualClock>) -> Broker {
    let broker = Broker::open(dir, options(clock)).unwrap();
    if broker.catalog().services.is_empty() {
        let mut tx = broker.begin();
        tx.create_message_type(ASK, Validation::None).unwrap();
        tx.create_message_type(TELL, Validation::None).unwrap();
        tx.create_contract(CONTRACT, &[(ASK, SentBy::Initiator), (TELL, SentBy::Any)])
            .unwrap();
        tx.create_queue("Client", QueueOptions::default()).unwrap();
        tx.create_queue("Server", QueueOptions::default()).unwrap();
        tx.create_service("//t/Client", "Client", &[]).unwrap();
        tx.create_service("//t/Server", "Server", &[CONTRACT])
            .unwrap();
        tx.commit().unwrap();
    }
    broker
}

/// Begins a dialog and sends `asks` on it; returns (initiator handle, target handle).
fn dialog(
    broker: &Broker,
    asks: &[&str],
    lifetime: Option<Duration>,
) -> (ConversationHandle, ConversationHandle) {
    let mut tx = broker.begin();
    let h = tx
        .begin_dialog(
            "//t/Client",
            "//t/Server",
            CONTRACT,
            DialogOptions {
                lifetime,
                ..DialogOptions::default()
            },
        )
        .unwrap();
    for ask in asks {
        tx.send(h, ASK, ask.as_bytes()).unwrap();
    }
    tx.commit().unwrap();
    let target = broker.conversation_endpoint(h).unwrap().far_handle.unwrap();
    (h, target)
}

/// Receives everything waiting for `handle` (committing), as (type, body) pairs.
fn drain(broker: &Broker, queue: &str, handle: ConversationHandle) -> Vec<(String, Vec<u8>)> {
    let mut tx = broker.begin();
    let got = tx
        .receive(queue, Receive::top(1000).conversation(handle))
        .unwrap();
    tx.commit().unwrap();
    got.iter()
        .map(|m| (m.message_type.to_string(), m.body().to_vec()))
        .collect()
}

fn types(messages: &[(String, Vec<u8>)]) -> Vec<&str> {
    messages.iter().map(|(t, _)| t.as_str()).collect()
}

fn state_of(broker: &Broker, handle: ConversationHandle) -> Option<EndpointState> {
    broker.conversation_endpoint(handle).map(|e| e.state)
}

#[test]
fn end_conversation_delivers_end_dialog_after_what_was_sent_and_both_ends_remove_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let (client, server) = dialog(&broker, &["a", "b"], None);
    // The server replies once, which the client never reads before ending.
    let mut tx = broker.begin();
    tx.send(server, TELL, b"unread reply").unwrap();
    tx.commit().unwrap();

    let mut tx = broker.begin();
    tx.send(client, ASK, b"c").unwrap();
    tx.end_conversation(client).unwrap();
    assert!(matches!(
        tx.send(client, ASK, b"after end"),
        Err(Error::ConversationClosed { .. })
    ));
    tx.commit().unwrap();

    assert_eq!(state_of(&broker, client), Some(EndpointState::Closed));
    assert_eq!(
        state_of(&broker, server),
        Some(EndpointState::DisconnectedInbound)
    );
    // The client's unread reply was purged with its side of the conversation.
    assert_eq!(broker.peek("Client").unwrap().len(), 0);
    let mut tx = broker.begin();
    assert!(matches!(
        tx.send(server, TELL, b"too late"),
        Err(Error::ConversationClosed { state: "DI", .. })
    ));
    drop(tx);
    let got = drain(&broker, "Server", server);
    assert_eq!(types(&got), [ASK, ASK, ASK, system::END_DIALOG]);
    assert_eq!(got[2].1, b"c");
    assert!(got[3].1.is_empty());
    invariants::check_idle(&broker).unwrap();

    let mut tx = broker.begin();
    tx.end_conversation(server).unwrap();
    tx.commit().unwrap();
    assert_eq!(state_of(&broker, client), None, "both ended: removed");
    assert_eq!(state_of(&broker, server), None);
    assert!(broker.conversation_groups().is_empty(), "groups go too");
    let mut tx = broker.begin();
    assert!(matches!(
        tx.end_conversation(server),
        Err(Error::UnknownConversation(_))
    ));
    drop(tx);
    // With no conversation left, the services can be dropped.
    let mut tx = broker.begin();
    tx.drop_service("//t/Server").unwrap();
    tx.commit().unwrap();
    invariants::check_idle(&broker).unwrap();
}

#[test]
fn end_with_error_reaches_the_far_side_ahead_of_its_other_messages() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let (client, server) = dialog(&broker, &["a", "b"], None);
    let mut tx = broker.begin();
    assert!(matches!(
        tx.end_conversation_with_error(server, 0, "no"),
        Err(Error::InvalidErrorCode(0))
    ));
    assert!(matches!(
        tx.end_conversation_with_error(server, -5, "no"),
        Err(Error::InvalidErrorCode(-5))
    ));
    let longest = "x".repeat(system::ERROR_DESCRIPTION_CHARS_MAX);
    assert!(matches!(
        tx.end_conversation_with_error(server, 1, &format!("{longest}x")),
        Err(Error::DescriptionTooLong { .. })
    ));
    tx.send(server, TELL, b"before the error").unwrap();
    tx.end_conversation_with_error(server, 50, &longest)
        .unwrap();
    tx.commit().unwrap();

    let events = broker.subscribe();
    assert_eq!(state_of(&broker, client), Some(EndpointState::Error));
    let mut tx = broker.begin();
    assert!(matches!(
        tx.send(client, ASK, b"x"),
        Err(Error::ConversationClosed { state: "ER", .. })
    ));
    drop(tx);
    let got = drain(&broker, "Client", client);
    assert_eq!(types(&got), [system::ERROR, TELL], "Error comes first");
    assert_eq!(
        system::parse_error_body(&got[0].1).unwrap(),
        (50, longest.clone())
    );
    let mut tx = broker.begin();
    tx.end_conversation(client).unwrap();
    tx.commit().unwrap();
    assert!(broker.conversation_endpoints().is_empty());
    assert!(
        events.try_next().is_none(),
        "events are published when they happen, not replayed to later subscribers"
    );
    invariants::check_idle(&broker).unwrap();
}

#[test]
fn end_with_cleanup_removes_one_side_without_telling_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let (client, server) = dialog(&broker, &["a"], None);
    let mut tx = broker.begin();
    tx.end_conversation_with_cleanup(server).unwrap();
    tx.commit().unwrap();
    assert_eq!(state_of(&broker, server), None);
    assert_eq!(
        broker.peek("Server").unwrap().len(),
        0,
        "its messages went too"
    );
    assert_eq!(state_of(&broker, client), Some(EndpointState::Conversing));
    // The client does not know: its sends go nowhere.
    let mut tx = broker.begin();
    tx.send(client, ASK, b"into the void").unwrap();
    tx.commit().unwrap();
    assert_eq!(broker.peek("Server").unwrap().len(), 0);
    invariants::check_idle(&broker).unwrap();
    let mut tx = broker.begin();
    tx.end_conversation(client).unwrap();
    tx.commit().unwrap();
    assert!(broker.conversation_endpoints().is_empty());
    invariants::check_idle(&broker).unwrap();
}

#[test]
fn a_timer_fires_once_its_time_comes_replaces_an_earlier_setting_and_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (client, _server) = {
        let broker = broker(dir.path(), &clock);
        let (client, server) = dialog(&broker, &[], None);
        let mut tx = broker.begin();
        tx.begin_conversation_timer(client, Duration::from_secs(10))
            .unwrap();
        tx.commit().unwrap();
        clock.advance(Duration::from_secs(9));
        assert!(broker.peek("Client").unwrap().is_empty());
        // Re-setting replaces the deadline: now 20 s from here.
        let mut tx = broker.begin();
        tx.begin_conversation_timer(client, Duration::from_secs(20))
            .unwrap();
        tx.commit().unwrap();
        clock.advance(Duration::from_secs(5));
        assert!(
            broker.peek("Client").unwrap().is_empty(),
            "the first setting was replaced"
        );
        assert_eq!(
            broker
                .conversation_endpoint(client)
                .unwrap()
                .dialog_timer_ms,
            Some(START_MS + 29_000)
        );
        broker.close().unwrap();
        (client, server)
    };
    // Closed while the deadline passes: it fires when the broker opens.
    clock.advance(Duration::from_secs(60));
    let broker = broker(dir.path(), &clock);
    let got = drain(&broker, "Client", client);
    assert_eq!(types(&got), [system::DIALOG_TIMER]);
    assert!(got[0].1.is_empty());
    assert_eq!(
        broker
            .conversation_endpoint(client)
            .unwrap()
            .dialog_timer_ms,
        None
    );
    clock.advance(Duration::from_secs(3600));
    assert!(
        broker.peek("Client").unwrap().is_empty(),
        "a timer fires once"
    );
    invariants::check_idle(&broker).unwrap();
}

#[test]
fn dialog_timer_then_error_then_the_rest_in_one_receive() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let (client, server) = dialog(&broker, &["a"], None);
    let mut tx = broker.begin();
    tx.send(server, TELL, b"one").unwrap();
    tx.send(server, TELL, b"two").unwrap();
    tx.commit().unwrap();
    let mut tx = broker.begin();
    tx.begin_conversation_timer(client, Duration::from_secs(1))
        .unwrap();
    tx.commit().unwrap();
    let mut tx = broker.begin();
    tx.end_conversation_with_error(server, 7, "server gave up")
        .unwrap();
    tx.commit().unwrap();
    clock.advance(Duration::from_secs(1));
    let mut tx = broker.begin();
    let first = tx
        .receive("Client", Receive::top(1).conversation(client))
        .unwrap();
    assert_eq!(&*first[0].message_type, system::DIALOG_TIMER);
    // A rollback puts it back in front.
    drop(tx);
    let got = drain(&broker, "Client", client);
    assert_eq!(
        types(&got),
        [system::DIALOG_TIMER, system::ERROR, TELL, TELL],
        "precedence: DialogTimer, Error, then the sequence"
    );
    assert_eq!(got[2].1, b"one");
    invariants::check_idle(&broker).unwrap();
}

#[test]
fn an_expired_lifetime_errors_both_sides_but_ends_neither() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let events = broker.subscribe();
    let (client, server) = dialog(&broker, &["a"], Some(Duration::from_secs(60)));
    clock.advance(Duration::from_secs(59));
    assert_eq!(state_of(&broker, client), Some(EndpointState::Conversing));
    clock.advance(Duration::from_secs(1));
    for (handle, queue) in [(client, "Client"), (server, "Server")] {
        assert_eq!(state_of(&broker, handle), Some(EndpointState::Error));
        let mut tx = broker.begin();
        assert!(matches!(
            tx.send(handle, TELL, b"x"),
            Err(Error::ConversationClosed { state: "ER", .. })
        ));
        drop(tx);
        let got = drain(&broker, queue, handle);
        let error = got
            .iter()
            .find(|(t, _)| t == system::ERROR)
            .expect("an Error message on each side");
        assert_eq!(
            system::parse_error_body(&error.1).unwrap().0,
            system::ERROR_LIFETIME_EXPIRED
        );
    }
    let mut seen = Vec::new();
    while let Some(event) = events.try_next() {
        seen.push(event);
    }
    assert!(seen.contains(&Event::DialogError {
        handle: server,
        code: system::ERROR_LIFETIME_EXPIRED
    }));
    // Never ended by the broker: both sides must end it.
    assert_eq!(broker.conversation_endpoints().len(), 2);
    for handle in [client, server] {
        let mut tx = broker.begin();
        tx.end_conversation(handle).unwrap();
        tx.commit().unwrap();
    }
    assert!(broker.conversation_endpoints().is_empty());
    invariants::check_idle(&broker).unwrap();
}

#[test]
fn life_cycle_state_survives_a_reopen_with_and_without_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    for checkpoint in [false, true] {
        let (client, server) = {
            let broker = broker(dir.path(), &clock);
            let (client, server) = dialog(&broker, &["a", "b"], Some(Duration::from_secs(100)));
            let mut tx = broker.begin();
            tx.end_conversation_with_error(server, 3, "bye").unwrap();
            tx.commit().unwrap();
            let mut tx = broker.begin();
            tx.begin_conversation_timer(client, Duration::from_secs(5))
                .unwrap();
            tx.commit().unwrap();
            if checkpoint {
                broker.checkpoint().unwrap();
            }
            drop(broker);
            (client, server)
        };
        let broker = broker(dir.path(), &clock);
        assert_eq!(state_of(&broker, server), Some(EndpointState::Closed));
        assert_eq!(state_of(&broker, client), Some(EndpointState::Error));
        clock.advance(Duration::from_secs(5));
        let got = drain(&broker, "Client", client);
        assert_eq!(types(&got), [system::DIALOG_TIMER, system::ERROR]);
        let mut tx = broker.begin();
        tx.end_conversation(client).unwrap();
        tx.commit().unwrap();
        invariants::check_idle(&broker).unwrap();
        assert!(broker.conversation_endpoints().is_empty());
    }
}

#[test]
fn waitfor_receive_returns_when_a_send_commits_and_empty_when_time_passes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let (client, _server) = dialog(&broker, &[], None);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let mut tx = broker.begin();
            let got = tx
                .receive("Server", Receive::top(10).wait(Duration::MAX))
                .unwrap();
            tx.commit().unwrap();
            got.iter().map(|m| m.body().to_vec()).collect::<Vec<_>>()
        });
        // Whenever the waiter gets there, the send wakes it (the wait is not a poll: virtual
        // time never moves here).
        let mut tx = broker.begin();
        tx.send(client, ASK, b"wake up").unwrap();
        tx.commit().unwrap();
        assert_eq!(waiter.join().unwrap(), vec![b"wake up".to_vec()]);
    });
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let mut tx = broker.begin();
            tx.receive("Server", Receive::top(10).wait(Duration::from_secs(30)))
                .unwrap()
                .len()
        });
        while !waiter.is_finished() {
            clock.advance(Duration::from_secs(1));
            std::thread::yield_now();
        }
        assert_eq!(
            waiter.join().unwrap(),
            0,
            "the timeout gives an empty batch"
        );
    });
}

#[test]
fn waitfor_fails_at_once_when_its_queue_is_disabled_or_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let mut tx = broker.begin();
    tx.create_queue("Spare", QueueOptions::default()).unwrap();
    tx.commit().unwrap();
    for (queue, change) in [("Server", "disable"), ("Spare", "drop")] {
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let mut tx = broker.begin();
                tx.receive(queue, Receive::top(1).wait(Duration::MAX))
            });
            // The waiter does not hold the catalog while it waits: this change goes through.
            let mut tx = broker.begin();
            match change {
                "disable" => tx
                    .alter_queue(
                        queue,
                        QueueOptions {
                            enabled: false,
                            ..QueueOptions::default()
                        },
                    )
                    .unwrap(),
                _ => tx.drop_queue(queue).unwrap(),
            }
            tx.commit().unwrap();
            match (change, waiter.join().unwrap()) {
                ("disable", Err(Error::QueueDisabled(q))) | (_, Err(Error::UnknownQueue(q))) => {
                    assert_eq!(q, queue)
                }
                (change, other) => panic!("{change}: expected an error, got {other:?}"),
            }
        });
    }
}

/// A minimal executor: polls `future` on this thread, parking between wake-ups.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct ThreadWaker(std::thread::Thread);
    impl std::task::Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut context = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}

#[test]
fn the_waitfor_future_is_woken_by_a_commit_and_by_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let (client, _server) = dialog(&broker, &[], None);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let mut tx = broker.begin();
            let got = block_on(tx.receive_async("Server", Receive::top(5).wait(Duration::MAX)));
            let got = got.unwrap();
            tx.commit().unwrap();
            got.len()
        });
        let mut tx = broker.begin();
        tx.send(client, ASK, b"for the future").unwrap();
        tx.commit().unwrap();
        assert_eq!(waiter.join().unwrap(), 1);
    });
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let mut tx = broker.begin();
            block_on(tx.receive_async("Server", Receive::top(5).wait(Duration::from_secs(2))))
                .unwrap()
                .len()
        });
        while !waiter.is_finished() {
            clock.advance(Duration::from_secs(1));
            std::thread::yield_now();
        }
        assert_eq!(waiter.join().unwrap(), 0);
    });
}

/// A waiting future registers its task's waker with the broker's timer for its deadline, and
/// takes it back once it is done — returned or dropped (each registration was kept for good,
/// the task's memory with it, and every registration scanned them all).
#[test]
fn a_waitfor_future_leaves_no_timer_registration_behind() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let (client, _server) = dialog(&broker, &[], None);
    struct Idle;
    impl std::task::Wake for Idle {
        fn wake(self: Arc<Self>) {}
    }
    let task = Arc::new(Idle);
    let waker = std::task::Waker::from(task.clone());
    let mut context = std::task::Context::from_waker(&waker);
    {
        let mut tx = broker.begin();
        let mut future = Box::pin(tx.receive_async("Server", Receive::top(5).wait(Duration::MAX)));
        assert!(future.as_mut().poll(&mut context).is_pending());
        assert!(future.as_mut().poll(&mut context).is_pending());
        assert_eq!(
            broker.timer_wakers(),
            1,
            "one registration, however often polled"
        );
        let mut sender = broker.begin();
        sender.send(client, ASK, b"wanted").unwrap();
        sender.commit().unwrap();
        match future.as_mut().poll(&mut context) {
            std::task::Poll::Ready(got) => assert_eq!(got.unwrap().len(), 1),
            std::task::Poll::Pending => panic!("the message was there"),
        }
        assert_eq!(broker.timer_wakers(), 0, "taken back when it returned");
        drop(future);
        tx.commit().unwrap();
    }
    {
        let mut tx = broker.begin();
        let mut future =
            std::pin::pin!(tx.receive_async("Server", Receive::top(5).wait(Duration::MAX)));
        assert!(future.as_mut().poll(&mut context).is_pending());
    }
    assert_eq!(broker.timer_wakers(), 0, "taken back when dropped");
    let _ = context;
    drop(waker);
    assert_eq!(
        Arc::strong_count(&task),
        1,
        "the broker keeps no waker of the task"
    );
}

#[test]
fn waitfor_get_conversation_group_locks_the_group_that_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let (client, server) = dialog(&broker, &[], None);
    let group = broker.conversation_endpoint(server).unwrap().group;
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let mut tx = broker.begin();
            let got = tx
                .get_conversation_group_wait("Server", Duration::MAX)
                .unwrap();
            let messages = tx
                .receive("Server", Receive::top(5).group(got.unwrap()))
                .unwrap();
            tx.commit().unwrap();
            (got, messages.len())
        });
        let mut tx = broker.begin();
        tx.send(client, ASK, b"x").unwrap();
        tx.commit().unwrap();
        assert_eq!(waiter.join().unwrap(), (Some(group), 1));
    });
}

#[test]
fn five_rollbacks_in_a_row_disable_the_queue_and_raise_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let events = broker.subscribe();
    dialog(&broker, &["poison"], None);
    let receive_and_roll_back = || {
        let mut tx = broker.begin();
        assert_eq!(tx.receive("Server", Receive::top(1)).unwrap().len(), 1);
        tx.rollback();
    };
    for _ in 0..4 {
        receive_and_roll_back();
    }
    // A commit of a receive from the queue ends the run.
    dialog(&broker, &["fine"], None);
    let mut tx = broker.begin();
    let fine = tx.receive("Server", Receive::top(1)).unwrap();
    assert_eq!(fine[0].body(), b"poison", "the oldest first");
    tx.rollback();
    // That was rollback 5 in a row: the queue is off.
    assert!(
        !broker
            .queues()
            .iter()
            .find(|q| q.name == "Server")
            .unwrap()
            .options
            .enabled
    );
    assert_eq!(
        events.next_timeout(Duration::from_secs(5)),
        Some(Event::QueueDisabled {
            queue: "Server".into()
        })
    );
    let mut tx = broker.begin();
    assert!(matches!(
        tx.receive("Server", Receive::top(1)),
        Err(Error::QueueDisabled(_))
    ));
    drop(tx);
    // Re-enabled: the count starts again (four rollbacks do not disable it).
    let mut tx = broker.begin();
    tx.alter_queue("Server", QueueOptions::default()).unwrap();
    tx.commit().unwrap();
    for _ in 0..4 {
        receive_and_roll_back();
    }
    assert!(
        broker
            .queues()
            .iter()
            .find(|q| q.name == "Server")
            .unwrap()
            .options
            .enabled
    );
    // A commit resets the run.
    let mut tx = broker.begin();
    tx.receive("Server", Receive::top(1)).unwrap();
    tx.commit().unwrap();
    for _ in 0..4 {
        receive_and_roll_back();
    }
    assert!(
        broker
            .queues()
            .iter()
            .find(|q| q.name == "Server")
            .unwrap()
            .options
            .enabled
    );
    invariants::check_idle(&broker).unwrap();
}

#[test]
fn poison_protection_off_never_disables_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let mut tx = broker.begin();
    tx.alter_queue(
        "Server",
        QueueOptions {
            poison_message_handling: false,
            ..QueueOptions::default()
        },
    )
    .unwrap();
    tx.commit().unwrap();
    dialog(&broker, &["poison"], None);
    for _ in 0..20 {
        let mut tx = broker.begin();
        assert_eq!(tx.receive("Server", Receive::top(1)).unwrap().len(), 1);
        tx.rollback();
    }
    assert!(
        broker
            .queues()
            .iter()
            .find(|q| q.name == "Server")
            .unwrap()
            .options
            .enabled
    );
}

#[test]
fn broker_priorities_order_groups_and_are_frozen_at_endpoint_creation() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let (_, normal) = dialog(&broker, &["normal"], None);
    let mut tx = broker.begin();
    tx.create_broker_priority(BrokerPriority {
        name: "urgent-server".into(),
        contract: Some(CONTRACT.into()),
        local_service: Some("//t/Server".into()),
        remote_service: None,
        level: 9,
    })
    .unwrap();
    tx.commit().unwrap();
    let (_, urgent) = dialog(&broker, &["urgent"], None);
    assert_eq!(broker.conversation_endpoint(normal).unwrap().priority, 5);
    assert_eq!(broker.conversation_endpoint(urgent).unwrap().priority, 9);
    let mut tx = broker.begin();
    let first = tx.receive("Server", Receive::top(10)).unwrap();
    assert_eq!(
        first[0].body(),
        b"urgent",
        "the higher priority group first, though younger"
    );
    let group = tx.get_conversation_group("Server").unwrap();
    assert_eq!(
        group,
        Some(broker.conversation_endpoint(normal).unwrap().group)
    );
    tx.commit().unwrap();
    // Dropping the priority does not change existing conversations.
    let mut tx = broker.begin();
    tx.drop_broker_priority("urgent-server").unwrap();
    tx.commit().unwrap();
    assert_eq!(broker.conversation_endpoint(urgent).unwrap().priority, 9);
    // Received bodies are borrowed from the log: they keep its directory locked.
    drop(first);
    drop(broker);
    let broker = self::broker(dir.path(), &clock);
    assert_eq!(broker.conversation_endpoint(urgent).unwrap().priority, 9);
    assert!(broker.catalog().priorities.is_empty());
    invariants::check_idle(&broker).unwrap();
}

#[test]
fn activation_scales_up_under_a_burst_handles_each_message_once_and_scales_down() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let events = broker.subscribe();
    const DIALOGS: usize = 40;
    const PER_DIALOG: usize = 5;
    let handled = Arc::new(Mutex::new(Vec::<(ConversationHandle, u64)>::new()));
    let running = Arc::new(AtomicUsize::new(0));
    let most_running = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let (handled_in, running_in, most_in, gate_in) = (
        handled.clone(),
        running.clone(),
        most_running.clone(),
        gate.clone(),
    );
    broker
        .activate(
            "Server",
            ActivationOptions {
                max_readers: 4,
                batch_messages: 100,
                idle_timeout: Duration::from_secs(1),
            },
            move |_tx, batch| {
                let now = running_in.fetch_add(1, Ordering::SeqCst) + 1;
                most_in.fetch_max(now, Ordering::SeqCst);
                // Hold every handler until four readers run: messages arrive faster than
                // they are handled, so the monitor must start more readers.
                let (open, opened) = &*gate_in;
                let mut is_open = open.lock().unwrap();
                while !*is_open {
                    is_open = opened.wait(is_open).unwrap();
                }
                drop(is_open);
                handled_in
                    .lock()
                    .unwrap()
                    .extend(batch.iter().map(|m| (m.conversation_handle, m.sequence)));
                running_in.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            },
        )
        .unwrap();
    let mut targets = Vec::new();
    for _ in 0..DIALOGS {
        let (_, target) = dialog(&broker, &["1", "2", "3", "4", "5"], None);
        targets.push(target);
    }
    // Four readers, each in its handler.
    while running.load(Ordering::SeqCst) < 4 {
        std::thread::yield_now();
    }
    assert_eq!(
        broker.activated_readers().len(),
        4,
        "never more than max_readers"
    );
    {
        let (open, opened) = &*gate;
        *open.lock().unwrap() = true;
        opened.notify_all();
    }
    while handled.lock().unwrap().len() < DIALOGS * PER_DIALOG {
        std::thread::yield_now();
    }
    let mut got = handled.lock().unwrap().clone();
    got.sort();
    let mut expected: Vec<(ConversationHandle, u64)> = targets
        .iter()
        .flat_map(|t| (0..PER_DIALOG as u64).map(move |s| (*t, s)))
        .collect();
    expected.sort();
    assert_eq!(got, expected, "every message handled exactly once");
    assert_eq!(most_running.load(Ordering::SeqCst), 4);
    // Idle for the timeout (virtual time): every reader exits.
    while !broker.activated_readers().is_empty() {
        clock.advance(Duration::from_secs(1));
        std::thread::yield_now();
    }
    let mut started = 0;
    let mut stopped = 0;
    while let Some(event) = events.try_next() {
        match event {
            Event::ActivationStarted { .. } => started += 1,
            Event::ActivationStopped { .. } => stopped += 1,
            _ => {}
        }
    }
    assert_eq!((started, stopped), (4, 4));
    assert!(broker.peek("Server").unwrap().is_empty());
    invariants::check_idle(&broker).unwrap();
    // New work starts a reader again.
    dialog(&broker, &["again"], None);
    while handled.lock().unwrap().len() < DIALOGS * PER_DIALOG + 1 {
        std::thread::yield_now();
    }
    broker.deactivate("Server").unwrap();
    assert!(broker.activated_readers().is_empty());
}

#[test]
fn a_failing_handler_rolls_its_batch_back() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    broker
        .activate("Server", ActivationOptions::new(1), move |tx, batch| {
            if counted.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err("not yet".into());
            }
            tx.end_conversation(batch[0].conversation_handle)?;
            Ok(())
        })
        .unwrap();
    let (client, _server) = dialog(&broker, &["work"], None);
    // Rolled back twice, then handled (and the conversation ended): EndDialog for the client.
    while broker.peek("Client").unwrap().is_empty() {
        std::thread::yield_now();
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(
        types(&drain(&broker, "Client", client)),
        [system::END_DIALOG]
    );
    broker.deactivate("Server").unwrap();
    assert!(matches!(
        broker.deactivate("Server"),
        Err(Error::InvalidActivation(_))
    ));
}

#[test]
fn views_list_groups_and_an_empty_transmission_queue() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let (_, server) = dialog(&broker, &["a", "b"], None);
    let group = broker.conversation_endpoint(server).unwrap().group;
    let mut tx = broker.begin();
    tx.receive("Server", Receive::top(1)).unwrap();
    let groups = broker.conversation_groups();
    let row = groups.iter().find(|g| g.group == group).unwrap();
    assert_eq!(
        (
            row.queue.as_str(),
            row.conversations,
            row.messages,
            row.locked
        ),
        ("Server", 1, 2, true)
    );
    tx.commit().unwrap();
    let groups = broker.conversation_groups();
    let row = groups.iter().find(|g| g.group == group).unwrap();
    assert_eq!((row.messages, row.locked), (1, false));
    assert_eq!(groups.len(), 2, "the client's group too");
    assert!(broker.transmission_queue().is_empty());
}

#[test]
fn retention_keeps_received_and_sent_messages_until_the_conversation_ends() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let retained = QueueOptions {
        retention: true,
        ..QueueOptions::default()
    };
    let (client, server) = {
        let broker = broker(dir.path(), &clock);
        let mut tx = broker.begin();
        tx.alter_queue("Client", retained).unwrap();
        tx.alter_queue("Server", retained).unwrap();
        tx.commit().unwrap();
        let (client, server) = dialog(&broker, &["a", "b", "c"], None);
        let mut tx = broker.begin();
        assert_eq!(tx.receive("Server", Receive::top(2)).unwrap().len(), 2);
        tx.commit().unwrap();
        // A rolled-back receive retains nothing.
        let mut tx = broker.begin();
        assert_eq!(tx.receive("Server", Receive::top(1)).unwrap().len(), 1);
        tx.rollback();
        invariants::check_idle(&broker).unwrap();
        (client, server)
    };
    for checkpoint in [false, true] {
        let broker = broker(dir.path(), &clock);
        let statuses = |queue: &str| -> Vec<(MessageStatus, u64, Vec<u8>)> {
            broker
                .peek(queue)
                .unwrap()
                .iter()
                .map(|m| (m.status, m.sequence, m.body().to_vec()))
                .collect()
        };
        assert_eq!(
            statuses("Server"),
            [
                (MessageStatus::Received, 0, b"a".to_vec()),
                (MessageStatus::Received, 1, b"b".to_vec()),
                (MessageStatus::Ready, 2, b"c".to_vec()),
            ]
        );
        assert_eq!(
            statuses("Client"),
            [
                (MessageStatus::SentCopy, 0, b"a".to_vec()),
                (MessageStatus::SentCopy, 1, b"b".to_vec()),
                (MessageStatus::SentCopy, 2, b"c".to_vec()),
            ]
        );
        let queue = broker
            .queues()
            .into_iter()
            .find(|q| q.name == "Server")
            .unwrap();
        assert_eq!((queue.messages, queue.retained_messages), (1, 2));
        invariants::check_idle(&broker).unwrap();
        if checkpoint {
            broker.checkpoint().unwrap();
        }
    }
    let broker = broker(dir.path(), &clock);
    // Retained messages are never received again.
    let got = drain(&broker, "Server", server);
    assert_eq!(types(&got), [ASK]);
    assert_eq!(broker.peek("Server").unwrap().len(), 3, "all three kept");
    let mut tx = broker.begin();
    tx.end_conversation(server).unwrap();
    tx.commit().unwrap();
    assert!(
        broker.peek("Server").unwrap().is_empty(),
        "ending drops them"
    );
    assert_eq!(
        broker.peek("Client").unwrap().len(),
        4,
        "3 copies and the EndDialog"
    );
    let mut tx = broker.begin();
    tx.end_conversation(client).unwrap();
    tx.commit().unwrap();
    assert!(broker.peek("Client").unwrap().is_empty());
    invariants::check_idle(&broker).unwrap();
}

#[test]
fn a_lock_wait_times_out_on_virtual_time() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let broker = broker(dir.path(), &clock);
    let (client, _) = dialog(&broker, &[], None);
    let mut holder = broker.begin();
    holder.send(client, ASK, b"holding the group").unwrap();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let mut tx = broker.begin();
            tx.send(client, ASK, b"waits for the lock")
        });
        // The broker's lock timeout is 1 s of the manual clock: it passes only when told to.
        while !waiter.is_finished() {
            clock.advance(Duration::from_millis(250));
            std::thread::yield_now();
        }
        assert!(matches!(
            waiter.join().unwrap(),
            Err(Error::LockTimeout {
                waited_ms: 1000,
                ..
            })
        ));
    });
    holder.commit().unwrap();
}
