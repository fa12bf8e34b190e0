//! Routes are catalog objects: transactional, logged, checkpointed, and matched by Service
//! Broker's rules on the broker's clock; and each data directory has one broker instance id.

use std::time::Duration;

use herald_engine::{
    Broker, BrokerInstanceId, Error, ManualClock, Options, QueueOptions, Route, RouteAddress,
    RouteChoice, invariants,
};

const START_MS: u64 = 1_700_000_000_000;

fn route(name: &str, service: Option<&str>, address: &str, expires_at_ms: Option<u64>) -> Route {
    Route {
        name: name.into(),
        service_name: service.map(Into::into),
        broker_instance: None,
        address: RouteAddress::parse(address).unwrap(),
        expires_at_ms,
    }
}

#[test]
fn routes_are_transactional_recovered_and_expire_on_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let options = || Options {
        clock: clock.clone(),
        ..Options::default()
    };
    let id = {
        let broker = Broker::open(dir.path(), options()).unwrap();
        assert_eq!(broker.route("//far", None), RouteChoice::NoRoute);
        let mut tx = broker.begin();
        tx.create_route(route(
            "far",
            Some("//far"),
            "quic://node-b:4022",
            Some(START_MS + 60_000),
        ))
        .unwrap();
        assert!(matches!(
            tx.create_route(route("far", None, "LOCAL", None)),
            Err(Error::AlreadyExists { .. })
        ));
        tx.rollback();
        assert_eq!(
            broker.route("//far", None),
            RouteChoice::NoRoute,
            "rolled back"
        );
        let mut tx = broker.begin();
        tx.create_route(route(
            "far",
            Some("//far"),
            "quic://node-b:4022",
            Some(START_MS + 60_000),
        ))
        .unwrap();
        tx.create_route(route("hub", None, "tcp://hub:4022", None))
            .unwrap();
        tx.commit().unwrap();
        broker.checkpoint().unwrap();
        let mut tx = broker.begin();
        tx.drop_route("hub").unwrap();
        tx.commit().unwrap();
        broker.broker_instance()
    };
    let broker = Broker::open(dir.path(), options()).unwrap();
    assert_eq!(
        broker.broker_instance(),
        id,
        "one instance id per directory"
    );
    assert_eq!(
        broker.catalog().routes.len(),
        1,
        "checkpoint plus the drop after it"
    );
    let far = RouteChoice::Remote {
        route: "far".into(),
        address: RouteAddress::Quic {
            host: "node-b".into(),
            port: 4022,
        },
        broker_instance: None,
    };
    assert_eq!(broker.route("//far", None), far);
    clock.advance(Duration::from_secs(60));
    assert_eq!(broker.route("//far", None), RouteChoice::NoRoute, "expired");
    let mut tx = broker.begin();
    tx.create_queue("Q", QueueOptions::default()).unwrap();
    tx.create_service("//here", "Q", &[]).unwrap();
    tx.commit().unwrap();
    assert_eq!(broker.route("//here", None), RouteChoice::Local);
    assert_eq!(
        broker.route("//here", Some(BrokerInstanceId(7))),
        RouteChoice::NoRoute
    );
    invariants::check_idle(&broker).unwrap();
}

#[test]
fn a_damaged_broker_id_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    drop(Broker::open(dir.path(), Options::default()).unwrap());
    std::fs::write(
        dir.path().join(herald_engine::BROKER_ID_FILE_NAME),
        "not a uuid",
    )
    .unwrap();
    match Broker::open(dir.path(), Options::default()) {
        Err(Error::Corruption(reason)) => {
            assert!(reason.contains("broker instance id"), "{reason}")
        }
        other => panic!("expected Corruption, got {other:?}"),
    }
}
