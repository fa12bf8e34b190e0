//! Herald's T-SQL executor (`herald_engine::sql::Session`): Service Broker's "Completing a
//! Conversation in a Single Database" tutorial run verbatim, every statement kind with its
//! effect checked through the engine's API, autocommit and explicit transactions, where errors
//! are reported, catalog views with WHERE, variables of every type, and the limits at their
//! edges. Time is a `ManualClock`: nothing here reads the wall clock.

use std::sync::Arc;
use std::time::Duration;

use herald_engine::sql::{self, ResultSet, Session, StatementResult, Value};
use herald_engine::{
    Broker, ConversationHandle, Durability, EndpointState, Error, ManualClock, Options,
    RouteAddress, system,
};

const START_MS: u64 = 1_700_000_000_000;

fn open(dir: &std::path::Path) -> (Broker, Arc<ManualClock>) {
    let clock = ManualClock::new(START_MS);
    let broker = Broker::open(
        dir,
        Options {
            durability: Durability::None,
            lock_timeout: Duration::from_millis(200),
            clock: clock.clone(),
            ..Options::default()
        },
    )
    .unwrap();
    (broker, clock)
}

fn run(session: &mut Session<'_>, script: &str) -> Vec<StatementResult> {
    session
        .execute(script)
        .unwrap_or_else(|e| panic!("{e}\nin:\n{script}"))
}

/// The only result set of `results`.
fn result_set(results: &[StatementResult]) -> &ResultSet {
    let sets: Vec<&ResultSet> = results.iter().filter_map(|r| r.result.as_ref()).collect();
    assert_eq!(sets.len(), 1, "result sets: {results:#?}");
    sets[0]
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

/// The error a script stops with: (line, column, statement kind, inner error).
fn statement_error(session: &mut Session<'_>, script: &str) -> (u32, u32, &'static str, Error) {
    match session.execute(script) {
        Err(Error::Statement {
            line,
            column,
            statement,
            source,
        }) => (line, column, statement, *source),
        other => panic!("expected a statement error from {script:?}, got {other:?}"),
    }
}

fn handle_of(session: &Session<'_>, variable: &str) -> ConversationHandle {
    match session.variable(variable) {
        Some(Value::Guid(id)) => ConversationHandle(*id),
        other => panic!("@{variable} holds {other:?}, not a handle"),
    }
}

const DEFINITIONS: &str = r"
CREATE MESSAGE TYPE [//t/Ask] VALIDATION = NONE;
CREATE MESSAGE TYPE [//t/Tell] VALIDATION = UTF8;
CREATE CONTRACT [//t/Talk] ([//t/Ask] SENT BY INITIATOR, [//t/Tell] SENT BY ANY);
CREATE QUEUE dbo.Client;
CREATE QUEUE Server WITH STATUS = ON, RETENTION = OFF;
CREATE SERVICE [//t/Client] ON QUEUE Client;
CREATE SERVICE [//t/Server] ON QUEUE dbo.Server ([//t/Talk], [DEFAULT]);
DECLARE @h UNIQUEIDENTIFIER, @g UNIQUEIDENTIFIER, @body NVARCHAR(MAX), @type sysname;
";

fn with_definitions(broker: &Broker) -> Session<'_> {
    let mut session = Session::new(broker);
    run(&mut session, DEFINITIONS);
    session
}

// ---- the tutorial, verbatim (`tests/tutorial/*.sql`, shared with `sql_parse.rs`) ----

const TUTORIAL_OBJECTS: &str = include_str!("tutorial/1-objects.sql");

const TUTORIAL_BEGIN: &str = include_str!("tutorial/2-begin.sql");

const TUTORIAL_REPLY: &str = include_str!("tutorial/3-reply.sql");

const TUTORIAL_END: &str = include_str!("tutorial/4-end.sql");

const TUTORIAL_DROP: &str = include_str!("tutorial/5-drop.sql");

const REQUEST: &str = "<RequestMsg>Message for Target service.</RequestMsg>";
const REPLY: &str = "<ReplyMsg>Message for Initiator service.</ReplyMsg>";

#[test]
fn tutorial_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());

    // Each script in its own session, as the tutorial runs them in separate query windows.
    let mut definitions = Session::new(&broker);
    let results = run(&mut definitions, TUTORIAL_OBJECTS);
    assert_eq!(results.len(), 8);
    assert!(results.iter().all(|r| r.result.is_none()));
    assert_eq!(definitions.database(), Some("AdventureWorks2008R2"));
    let catalog = broker.catalog();
    assert_eq!(
        catalog.services["//AWDB/1DBSample/TargetService"].queue,
        "TargetQueue1DB"
    );
    assert!(
        catalog.services["//AWDB/1DBSample/InitiatorService"]
            .contracts
            .is_empty()
    );

    let mut initiator = Session::new(&broker);
    let results = run(&mut initiator, TUTORIAL_BEGIN);
    let kinds: Vec<&str> = results.iter().map(|r| r.statement).collect();
    assert_eq!(
        kinds,
        [
            "DECLARE",
            "DECLARE",
            "BEGIN TRANSACTION",
            "BEGIN DIALOG",
            "SELECT",
            "SEND",
            "SELECT",
            "COMMIT"
        ]
    );
    let sent = result_set(&results);
    assert_eq!(sent.columns, ["SentRequestMsg"]);
    assert_eq!(sent.rows, [[text(REQUEST)]]);
    let initiator_handle = handle_of(&initiator, "InitDlgHandle");
    let endpoint = broker.conversation_endpoint(initiator_handle).unwrap();
    assert_eq!(endpoint.state, EndpointState::Conversing);
    assert_eq!(&*endpoint.contract, "//AWDB/1DBSample/SampleContract");
    assert_eq!(initiator.transaction_count(), 0);

    let mut target = Session::new(&broker);
    let results = run(&mut target, TUTORIAL_REPLY);
    let receive = results
        .iter()
        .find(|r| r.statement == "WAITFOR RECEIVE")
        .unwrap();
    assert_eq!((receive.rows_affected, &receive.result), (Some(1), &None));
    let sets: Vec<&ResultSet> = results.iter().filter_map(|r| r.result.as_ref()).collect();
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[0].columns, ["ReceivedRequestMsg"]);
    assert_eq!(sets[0].rows, [[text(REQUEST)]]);
    assert_eq!(sets[1].columns, ["SentReplyMsg"]);
    assert_eq!(sets[1].rows, [[text(REPLY)]]);
    assert_eq!(
        target.variable("RecvReqMsgName"),
        Some(&text("//AWDB/1DBSample/RequestMessage"))
    );
    assert_eq!(
        Some(handle_of(&target, "RecvReqDlgHandle")),
        endpoint.far_handle
    );
    // The IF's branch ran: SEND and END CONVERSATION are among the results.
    assert!(results.iter().any(|r| r.statement == "END CONVERSATION"));

    let results = run(&mut initiator, TUTORIAL_END);
    let sets: Vec<&ResultSet> = results.iter().filter_map(|r| r.result.as_ref()).collect();
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0].columns, ["ReceivedReplyMsg"]);
    assert_eq!(sets[0].rows, [[text(REPLY)]]);
    assert_eq!(
        handle_of(&initiator, "RecvReplyDlgHandle"),
        initiator_handle
    );

    // Both sides ended: nothing is left of the conversation, and nothing waits anywhere.
    assert!(broker.conversation_endpoints().is_empty());
    assert!(broker.queues().iter().all(|q| q.messages == 0));

    run(&mut definitions, TUTORIAL_DROP);
    let catalog = broker.catalog();
    assert!(catalog.services.is_empty() && catalog.queues.is_empty());
    assert_eq!(catalog.contracts.len(), 1, "only DEFAULT is left");
}

#[test]
fn tutorial_scripts_run_as_one_script_in_one_session() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = Session::new(&broker);
    let script = [
        TUTORIAL_OBJECTS,
        TUTORIAL_BEGIN,
        TUTORIAL_REPLY,
        TUTORIAL_END,
        TUTORIAL_DROP,
    ]
    .concat();
    let results = run(&mut session, &script);
    let shown: Vec<&Value> = results
        .iter()
        .filter_map(|r| r.result.as_ref())
        .map(|set| &set.rows[0][0])
        .collect();
    assert_eq!(
        shown,
        [&text(REQUEST), &text(REQUEST), &text(REPLY), &text(REPLY)]
    );
    assert!(broker.conversation_endpoints().is_empty());
    assert!(broker.catalog().queues.is_empty());
}

// ---- every statement kind ----

#[test]
fn definitions_create_alter_and_drop_catalog_objects() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = with_definitions(&broker);
    let catalog = broker.catalog();
    assert_eq!(
        catalog.message_types["//t/Tell"].validation,
        herald_engine::Validation::Utf8
    );
    assert_eq!(
        catalog.contracts["//t/Talk"].messages["//t/Ask"],
        herald_engine::SentBy::Initiator
    );
    assert_eq!(catalog.services["//t/Server"].queue, "Server");
    assert!(catalog.services["//t/Server"].contracts.contains("DEFAULT"));

    run(
        &mut session,
        "CREATE QUEUE sales.Audit WITH RETENTION = ON, POISON_MESSAGE_HANDLING (STATUS = OFF) ON [DEFAULT];
         ALTER QUEUE sales.Audit WITH STATUS = OFF;
         ALTER QUEUE Server WITH ACTIVATION (STATUS = OFF, MAX_QUEUE_READERS = 3);
         ALTER QUEUE Server WITH ACTIVATION (DROP);",
    );
    let audit = broker.catalog().queues["sales.Audit"].options;
    assert!(!audit.enabled && audit.retention && !audit.poison_message_handling);

    // ACTIVATION with a procedure cannot run: nothing changes.
    let (line, column, statement, error) = statement_error(
        &mut session,
        "ALTER QUEUE Server\n  WITH STATUS = OFF, ACTIVATION (STATUS = ON, PROCEDURE_NAME = dbo.Handle);",
    );
    assert_eq!((line, column, statement), (1, 1, "ALTER QUEUE"));
    assert!(matches!(&error, Error::Unsupported(what) if what.contains("PROCEDURE_NAME")));
    assert!(broker.catalog().queues["Server"].options.enabled);

    run(
        &mut session,
        "DROP QUEUE sales.Audit; CREATE MESSAGE TYPE [//t/Gone]; DROP MESSAGE TYPE [//t/Gone];
         CREATE CONTRACT [//t/C2] ([//t/Ask] SENT BY ANY); DROP CONTRACT [//t/C2];
         CREATE QUEUE Q2; CREATE SERVICE [//t/S2] ON QUEUE Q2; DROP SERVICE [//t/S2]; DROP QUEUE Q2;",
    );
    let catalog = broker.catalog();
    assert!(!catalog.queues.contains_key("sales.Audit") && !catalog.queues.contains_key("Q2"));
    assert!(!catalog.message_types.contains_key("//t/Gone"));
    assert!(!catalog.contracts.contains_key("//t/C2"));
    assert!(!catalog.services.contains_key("//t/S2"));
}

#[test]
fn routes_and_broker_priorities() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, clock) = open(dir.path());
    let mut session = with_definitions(&broker);
    run(
        &mut session,
        "CREATE ROUTE ToFar WITH SERVICE_NAME = '//far/Svc',
             BROKER_INSTANCE = '6f9619ff-8b86-d011-b42d-00c04fc964ff',
             LIFETIME = 60, ADDRESS = 'TCP://far.example:4022';
         CREATE ROUTE Here WITH ADDRESS = 'LOCAL';",
    );
    let route = broker.catalog().routes["ToFar"].clone();
    assert_eq!(route.service_name.as_deref(), Some("//far/Svc"));
    assert_eq!(
        route.broker_instance.map(|b| b.0),
        Some(0x6f96_19ff_8b86_d011_b42d_00c0_4fc9_64ff)
    );
    assert_eq!(route.expires_at_ms, Some(START_MS + 60_000));
    assert_eq!(
        route.address,
        RouteAddress::Quic {
            host: "far.example".into(),
            port: 4022
        }
    );

    clock.advance(Duration::from_secs(10));
    run(
        &mut session,
        "ALTER ROUTE ToFar WITH ADDRESS = 'quic://other.example:5000', LIFETIME = 5",
    );
    let route = broker.catalog().routes["ToFar"].clone();
    assert_eq!(route.service_name.as_deref(), Some("//far/Svc"), "kept");
    assert_eq!(route.expires_at_ms, Some(START_MS + 15_000));
    assert_eq!(route.address.to_string(), "quic://other.example:5000");

    let (_, _, statement, error) = statement_error(
        &mut session,
        "CREATE ROUTE M WITH ADDRESS = 'TCP://a:1', MIRROR_ADDRESS = 'TCP://b:1'",
    );
    assert_eq!(statement, "CREATE ROUTE");
    assert!(matches!(&error, Error::Unsupported(what) if what.contains("MIRROR_ADDRESS")));
    assert!(!broker.catalog().routes.contains_key("M"));

    run(
        &mut session,
        "DROP ROUTE Here;
         CREATE BROKER PRIORITY High FOR CONVERSATION SET (CONTRACT_NAME = [//t/Talk],
             LOCAL_SERVICE_NAME = ANY, PRIORITY_LEVEL = 9);
         CREATE BROKER PRIORITY Plain FOR CONVERSATION SET (REMOTE_SERVICE_NAME = '//t/Server',
             PRIORITY_LEVEL = DEFAULT);",
    );
    let catalog = broker.catalog();
    assert!(!catalog.routes.contains_key("Here"));
    let high = &catalog.priorities["High"];
    assert_eq!(high.contract.as_deref(), Some("//t/Talk"));
    assert_eq!((high.local_service.as_deref(), high.level), (None, 9));
    assert_eq!(catalog.priorities["Plain"].level, 5);

    // The priority applies to a dialog begun from T-SQL.
    run(
        &mut session,
        "BEGIN DIALOG @h FROM SERVICE [//t/Client] TO SERVICE '//t/Server' ON CONTRACT [//t/Talk];
         DROP BROKER PRIORITY High;",
    );
    assert_eq!(
        broker
            .conversation_endpoint(handle_of(&session, "h"))
            .unwrap()
            .priority,
        9
    );
    assert!(!broker.catalog().priorities.contains_key("High"));
}

#[test]
fn begin_dialog_options_and_send_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = with_definitions(&broker);
    run(
        &mut session,
        "DECLARE @h2 UNIQUEIDENTIFIER, @h3 UNIQUEIDENTIFIER, @h4 UNIQUEIDENTIFIER;
         BEGIN DIALOG CONVERSATION @h FROM SERVICE [//t/Client] TO SERVICE '//t/Server',
             'CURRENT DATABASE' ON CONTRACT [//t/Talk]
             WITH RELATED_CONVERSATION_GROUP = '11111111-2222-3333-4444-555555555555',
                  LIFETIME = 600, ENCRYPTION = ON;
         BEGIN DIALOG @h2 FROM SERVICE [//t/Client] TO SERVICE '//t/Server'
             WITH RELATED_CONVERSATION = @h;
         BEGIN DIALOG @h4 FROM SERVICE [//t/Client] TO SERVICE '//t/Server' ON CONTRACT [//t/Talk];
         SET @body = N'ask';
         SEND ON CONVERSATION (@h, @h4) MESSAGE TYPE [//t/Ask] (@body);
         SEND ON CONVERSATION @h2;
         SEND ON CONVERSATION @h MESSAGE TYPE [//t/Tell] (CAST(N'héllo' AS VARBINARY(MAX)));
         SEND ON CONVERSATION @h MESSAGE TYPE [//t/Ask] (0x00FF);",
    );
    let h = handle_of(&session, "h");
    let h2 = handle_of(&session, "h2");
    let first = broker.conversation_endpoint(h).unwrap();
    assert_eq!(first.group.0, 0x1111_1111_2222_3333_4444_5555_5555_5555);
    assert_eq!(first.expires_at_ms, Some(START_MS + 600_000));
    assert!(
        first.far_handle.is_some(),
        "CURRENT DATABASE is this broker"
    );
    let second = broker.conversation_endpoint(h2).unwrap();
    assert_eq!(second.group, first.group);
    assert_eq!(
        &*second.contract, "DEFAULT",
        "ON CONTRACT defaults to DEFAULT"
    );

    let messages: Vec<(String, Vec<u8>)> = broker
        .peek("Server")
        .unwrap()
        .into_iter()
        .map(|m| (m.message_type.to_string(), m.body().to_vec()))
        .collect();
    assert_eq!(
        messages,
        [
            ("//t/Ask".to_string(), b"ask".to_vec()),
            ("//t/Ask".to_string(), b"ask".to_vec()),
            ("DEFAULT".to_string(), Vec::new()),
            ("//t/Tell".to_string(), "héllo".as_bytes().to_vec()),
            ("//t/Ask".to_string(), vec![0x00, 0xFF]),
        ]
    );

    // A target broker named by id: the dialog is remote; its SEND waits in the transmission
    // queue, which SELECT shows.
    run(
        &mut session,
        "BEGIN DIALOG @h3 FROM SERVICE [//t/Client] TO SERVICE '//far/Svc',
             'aaaaaaaa-0000-0000-0000-000000000001';
         SEND ON CONVERSATION @h3 (N'far away');",
    );
    let remote = broker
        .conversation_endpoint(handle_of(&session, "h3"))
        .unwrap();
    assert_eq!(
        remote.far_broker_instance.map(|b| b.0),
        Some(0xaaaa_aaaa_0000_0000_0000_0000_0000_0001)
    );
    let results = run(
        &mut session,
        "SELECT to_service_name, to_broker_instance, message_body_bytes, is_end_of_dialog
         FROM sys.transmission_queue WHERE conversation_handle = @h3 AND message_type_name = 'DEFAULT'",
    );
    assert_eq!(
        result_set(&results).rows,
        [[
            text("//far/Svc"),
            Value::Guid(0xaaaa_aaaa_0000_0000_0000_0000_0000_0001),
            Value::Int(8),
            Value::Int(0)
        ]]
    );

    // A NULL body and a NULL handle are statement errors; a contract violation is the engine's.
    let (_, _, _, error) = statement_error(
        &mut session,
        "DECLARE @none VARBINARY(MAX); SEND ON CONVERSATION @h (@none)",
    );
    assert!(
        matches!(&error, Error::Sql(m) if m.contains("NULL")),
        "{error}"
    );
    let (_, _, _, error) = statement_error(
        &mut session,
        "DECLARE @nobody UNIQUEIDENTIFIER; SEND ON CONVERSATION @nobody",
    );
    assert!(
        matches!(&error, Error::Sql(m) if m.contains("@nobody is NULL")),
        "{error}"
    );
    let (_, _, _, error) = statement_error(
        &mut session,
        "SEND ON CONVERSATION @h MESSAGE TYPE [//t/Tell] (0xFF)",
    );
    assert!(matches!(error, Error::ValidationFailed { .. }), "{error}");
}

#[test]
fn receive_columns_casts_filters_and_waitfor() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = with_definitions(&broker);
    run(
        &mut session,
        "DECLARE @h2 UNIQUEIDENTIFIER;
         BEGIN DIALOG @h FROM SERVICE [//t/Client] TO SERVICE '//t/Server' ON CONTRACT [//t/Talk];
         BEGIN DIALOG @h2 FROM SERVICE [//t/Client] TO SERVICE '//t/Server' ON CONTRACT [//t/Talk];
         SEND ON CONVERSATION @h MESSAGE TYPE [//t/Ask] (N'one');
         SEND ON CONVERSATION @h MESSAGE TYPE [//t/Ask] (N'two');
         SEND ON CONVERSATION @h2 MESSAGE TYPE [//t/Ask] (N'other');",
    );
    let h = handle_of(&session, "h");
    let target = broker.conversation_endpoint(h).unwrap().far_handle.unwrap();
    let target2 = broker
        .conversation_endpoint(handle_of(&session, "h2"))
        .unwrap()
        .far_handle
        .unwrap();

    // RECEIVE * : every column, in Service Broker's order.
    let results = run(
        &mut session,
        &format!("RECEIVE TOP (1) * FROM Server WHERE conversation_handle = '{target}'"),
    );
    let set = result_set(&results);
    assert_eq!(
        set.columns,
        [
            "status",
            "priority",
            "queuing_order",
            "conversation_group_id",
            "conversation_handle",
            "message_sequence_number",
            "service_name",
            "service_contract_name",
            "message_type_name",
            "validation",
            "message_body"
        ]
    );
    let row = &set.rows[0];
    assert_eq!(row[0], Value::Int(1));
    assert_eq!(row[1], Value::Int(5));
    assert_eq!(row[4], Value::Guid(target.0));
    assert_eq!(row[5], Value::Int(0));
    assert_eq!(row[6], text("//t/Server"));
    assert_eq!(row[7], text("//t/Talk"));
    assert_eq!(row[8], text("//t/Ask"));
    assert_eq!(row[9], text("N"));
    assert_eq!(row[10], Value::Binary(b"one".to_vec()));
    assert_eq!(results[0].rows_affected, Some(1));

    // A column list with CAST, CONVERT and aliases; WHERE conversation_group_id.
    let group = broker.conversation_endpoint(target).unwrap().group;
    let results = run(
        &mut session,
        &format!(
            "SET @g = '{group}';
             RECEIVE message_sequence_number AS seq, CAST(message_body AS NVARCHAR(MAX)) AS body,
                 CONVERT(NVARCHAR(2), message_body) short
             FROM Server WHERE conversation_group_id = @g"
        ),
    );
    let set = result_set(&results);
    assert_eq!(set.columns, ["seq", "body", "short"]);
    assert_eq!(set.rows, [[Value::Int(1), text("two"), text("tw")]]);

    // Assignments take the last row and return no rows; @@ROWCOUNT counts the rows.
    let results = run(
        &mut session,
        "DECLARE @n INT;
         WAITFOR (RECEIVE @body = message_body, @type = message_type_name, @h = conversation_handle
             FROM Server), TIMEOUT 0;
         SET @n = @@ROWCOUNT;",
    );
    assert_eq!(results[1].rows_affected, Some(1));
    assert_eq!(results[1].result, None);
    assert_eq!(session.variable("body"), Some(&text("other")));
    assert_eq!(session.variable("type"), Some(&text("//t/Ask")));
    assert_eq!(handle_of(&session, "h"), target2);
    assert_eq!(session.variable("n"), Some(&Value::Int(1)));

    // Nothing left: an empty batch leaves the variables as they were.
    let results = run(
        &mut session,
        "WAITFOR (RECEIVE @body = message_body FROM Server), TIMEOUT 0",
    );
    assert_eq!(results[0].rows_affected, Some(0));
    assert_eq!(session.variable("body"), Some(&text("other")));

    // WAITFOR without TIMEOUT waits until a message commits (moved by another session).
    std::thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            let mut receiver = Session::new(&broker);
            receiver
                .execute("WAITFOR (RECEIVE CAST(message_body AS NVARCHAR(10)) AS b FROM Server)")
                .unwrap()
        });
        // The waiter's deadline is forever (and virtual time stands still): only the commit of
        // this SEND, before or while it waits, can end its RECEIVE.
        run(
            &mut session,
            "SEND ON CONVERSATION @h2 MESSAGE TYPE [//t/Ask] (N'late')",
        );
        let results = waiter.join().unwrap();
        assert_eq!(result_set(&results).rows[0], [text("late")]);
    });

    // INTO a table variable has no counterpart.
    let (_, _, _, error) = statement_error(&mut session, "RECEIVE * FROM Server INTO @t");
    assert!(matches!(error, Error::Unsupported(_)), "{error}");
}

#[test]
fn conversation_group_move_end_and_timer() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, clock) = open(dir.path());
    let mut session = with_definitions(&broker);

    // Nothing waiting: GET CONVERSATION GROUP sets NULL.
    run(
        &mut session,
        "SET @g = '00000000-0000-0000-0000-000000000001'; GET CONVERSATION GROUP @g FROM Server;",
    );
    assert_eq!(session.variable("g"), Some(&Value::Null));

    run(
        &mut session,
        "BEGIN DIALOG @h FROM SERVICE [//t/Client] TO SERVICE '//t/Server' ON CONTRACT [//t/Talk];
         SEND ON CONVERSATION @h MESSAGE TYPE [//t/Ask] (N'x');
         WAITFOR (GET CONVERSATION GROUP @g FROM Server), TIMEOUT 10;",
    );
    let h = handle_of(&session, "h");
    let target = broker.conversation_endpoint(h).unwrap().far_handle.unwrap();
    assert_eq!(
        session.variable("g"),
        Some(&Value::Guid(
            broker.conversation_endpoint(target).unwrap().group.0
        ))
    );

    // MOVE the initiator's side to a group of the application's choosing.
    run(
        &mut session,
        "MOVE CONVERSATION @h TO '99999999-0000-0000-0000-000000000000'",
    );
    assert_eq!(
        broker.conversation_endpoint(h).unwrap().group.0,
        0x9999_9999_0000_0000_0000_0000_0000_0000
    );

    // A conversation timer: a DialogTimer message once the time has passed.
    run(&mut session, "BEGIN CONVERSATION TIMER (@h) TIMEOUT = 30");
    assert_eq!(
        broker.conversation_endpoint(h).unwrap().dialog_timer_ms,
        Some(START_MS + 30_000)
    );
    clock.advance(Duration::from_secs(30));
    let results = run(
        &mut session,
        "RECEIVE message_type_name FROM Client WHERE conversation_handle = @h",
    );
    assert_eq!(result_set(&results).rows, [[text(system::DIALOG_TIMER)]]);

    // WITH ERROR: the far side receives an Error message; WITH CLEANUP removes this side.
    run(
        &mut session,
        "DECLARE @why NVARCHAR(100) = N'bad order';
         END CONVERSATION @h WITH ERROR = 50000 DESCRIPTION = @why;",
    );
    assert_eq!(
        broker.conversation_endpoint(h).unwrap().state,
        EndpointState::Closed
    );
    let results = run(
        &mut session,
        &format!(
            "RECEIVE message_type_name, CAST(message_body AS XML) AS body, validation
             FROM Server WHERE conversation_handle = '{target}'"
        ),
    );
    let rows = &result_set(&results).rows;
    assert_eq!(
        rows.len(),
        2,
        "the Error and the message still waiting: {rows:?}"
    );
    let last = rows.iter().find(|r| r[0] == text(system::ERROR)).unwrap();
    assert!(last[1].as_text().unwrap().contains("<Code>50000</Code>"));
    assert!(last[1].as_text().unwrap().contains("bad order"));
    assert_eq!(last[2], text("X"));
    run(
        &mut session,
        &format!("END CONVERSATION '{target}' WITH CLEANUP"),
    );
    assert!(broker.conversation_endpoint(target).is_none());

    // An error code out of range is refused before the engine is asked.
    run(
        &mut session,
        "BEGIN DIALOG @h FROM SERVICE [//t/Client] TO SERVICE '//t/Server'",
    );
    let (_, _, statement, error) = statement_error(
        &mut session,
        "DECLARE @code BIGINT = 3000000000; END CONVERSATION @h WITH ERROR = @code DESCRIPTION = 'x'",
    );
    assert_eq!(statement, "END CONVERSATION");
    assert!(
        matches!(&error, Error::Sql(m) if m.contains("3000000000")),
        "{error}"
    );
}

// ---- transactions ----

#[test]
fn autocommit_and_explicit_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = with_definitions(&broker);
    let waiting = |queue: &str| broker.peek(queue).unwrap().len();

    // Autocommit: each statement is committed when it succeeds.
    run(
        &mut session,
        "BEGIN DIALOG @h FROM SERVICE [//t/Client] TO SERVICE '//t/Server';
         SEND ON CONVERSATION @h (N'one');",
    );
    assert_eq!(waiting("Server"), 1);

    // ROLLBACK undoes a SEND.
    run(
        &mut session,
        "BEGIN TRAN; SEND ON CONVERSATION @h (N'two'); SEND ON CONVERSATION @h (N'three');",
    );
    assert_eq!(session.transaction_count(), 1);
    assert_eq!(waiting("Server"), 1, "not visible before COMMIT");
    run(&mut session, "ROLLBACK");
    assert_eq!(session.transaction_count(), 0);
    assert_eq!(waiting("Server"), 1);

    // ROLLBACK gives back what a RECEIVE took.
    let results = run(
        &mut session,
        "BEGIN TRANSACTION; RECEIVE CAST(message_body AS NVARCHAR(10)) AS b FROM Server;",
    );
    assert_eq!(results[1].rows_affected, Some(1));
    assert_eq!(broker.peek("Server").unwrap().len(), 0, "taken");
    run(&mut session, "ROLLBACK TRANSACTION");
    assert_eq!(waiting("Server"), 1);

    // Nesting: only the outermost COMMIT commits; @@TRANCOUNT counts.
    run(
        &mut session,
        "DECLARE @depth INT;
         BEGIN TRAN; BEGIN TRAN; SET @depth = @@TRANCOUNT; SEND ON CONVERSATION @h (N'nested'); COMMIT;",
    );
    assert_eq!(session.variable("depth"), Some(&Value::Int(2)));
    assert_eq!((session.transaction_count(), waiting("Server")), (1, 1));
    run(&mut session, "COMMIT");
    assert_eq!((session.transaction_count(), waiting("Server")), (0, 2));

    // An error inside an explicit transaction leaves it open with its earlier work.
    run(
        &mut session,
        "BEGIN TRAN; SEND ON CONVERSATION @h (N'kept');",
    );
    let (_, _, statement, error) = statement_error(
        &mut session,
        "SEND ON CONVERSATION @h MESSAGE TYPE [//t/Nope]",
    );
    assert_eq!(statement, "SEND");
    assert!(
        matches!(
            error,
            Error::ContractViolation { .. } | Error::UnknownMessageType(_)
        ),
        "{error}"
    );
    assert_eq!(session.transaction_count(), 1);
    run(&mut session, "COMMIT");
    assert_eq!(waiting("Server"), 3);

    // An error in an autocommit statement rolls that statement back only.
    let (_, _, _, error) = statement_error(
        &mut session,
        "SEND ON CONVERSATION @h (N'first'); SEND ON CONVERSATION @h MESSAGE TYPE [//t/Nope];",
    );
    assert!(matches!(
        error,
        Error::ContractViolation { .. } | Error::UnknownMessageType(_)
    ));
    assert_eq!(waiting("Server"), 4);

    // COMMIT and ROLLBACK with no transaction are errors.
    let (_, _, statement, _) = statement_error(&mut session, "COMMIT");
    assert_eq!(statement, "COMMIT");
    let (_, _, statement, _) = statement_error(&mut session, "ROLLBACK");
    assert_eq!(statement, "ROLLBACK");

    // Dropping the session rolls back its open transaction.
    run(
        &mut session,
        "BEGIN TRAN; SEND ON CONVERSATION @h (N'lost');",
    );
    drop(session);
    assert_eq!(waiting("Server"), 4);
}

#[test]
fn a_receive_that_cannot_return_its_rows_rolls_back_the_transaction() {
    // Regression: a RECEIVE whose rows fail to convert must not leave its messages taken in an
    // open transaction, where a COMMIT would consume them unseen.
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = with_definitions(&broker);
    run(
        &mut session,
        "BEGIN DIALOG @h FROM SERVICE [//t/Client] TO SERVICE '//t/Server';
         SEND ON CONVERSATION @h (0xFFFE);
         BEGIN TRAN; SEND ON CONVERSATION @h (N'in the transaction');",
    );
    let (_, _, statement, error) = statement_error(
        &mut session,
        "RECEIVE CAST(message_body AS NVARCHAR(MAX)) FROM Server",
    );
    assert_eq!(statement, "RECEIVE");
    assert!(
        matches!(&error, Error::Sql(m) if m.contains("UTF-8")),
        "{error}"
    );
    assert_eq!(session.transaction_count(), 0, "rolled back");
    let bodies: Vec<Vec<u8>> = broker
        .peek("Server")
        .unwrap()
        .iter()
        .map(|m| m.body().to_vec())
        .collect();
    assert_eq!(
        bodies,
        [vec![0xFF, 0xFE]],
        "the message is back; the SEND is undone"
    );

    // In autocommit the statement alone is rolled back.
    statement_error(
        &mut session,
        "RECEIVE CAST(message_body AS NVARCHAR(MAX)) FROM Server",
    );
    assert_eq!(broker.peek("Server").unwrap().len(), 1);
}

// ---- errors ----

#[test]
fn runtime_errors_name_the_statement_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = with_definitions(&broker);
    let script =
        "CREATE QUEUE A;\nDECLARE @x INT = 1;\n   SEND ON CONVERSATION @h;\nCREATE QUEUE B;";
    let outcome = session.execute_script(script);
    assert_eq!(
        outcome.results.len(),
        2,
        "the statements before the error ran"
    );
    let error = outcome.error.unwrap();
    assert_eq!(
        error.to_string(),
        "line 3, column 4: SEND: the conversation handle @h is NULL"
    );
    let catalog = broker.catalog();
    assert!(catalog.queues.contains_key("A") && !catalog.queues.contains_key("B"));

    // Inside IF … BEGIN … END: the position of the IF, the kind of the failing statement.
    let (line, column, statement, error) = statement_error(
        &mut session,
        "SET @x = 2;\nIF @x = 2\nBEGIN\n  CREATE QUEUE C;\n  DROP QUEUE Missing;\nEND",
    );
    assert_eq!((line, column, statement), (2, 1, "DROP QUEUE"));
    assert!(matches!(&error, Error::UnknownQueue(q) if q == "Missing"));
    assert!(broker.catalog().queues.contains_key("C"));

    let (_, _, statement, error) = statement_error(&mut session, "SET @nope = 1");
    assert_eq!(statement, "SET");
    assert_eq!(error.to_string(), "must declare the scalar variable @nope");
}

#[test]
fn a_script_that_does_not_parse_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = Session::new(&broker);
    let error = session
        .execute("CREATE QUEUE A;\nCREATE QUEU B;")
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::Syntax {
                line: 2,
                column: 8,
                ..
            }
        ),
        "{error}"
    );
    assert!(broker.catalog().queues.is_empty());

    // A variable declared twice is T-SQL's compile error: nothing runs either.
    let error = session
        .execute("CREATE QUEUE A; DECLARE @x INT;\nIF 1 = 1 DECLARE @X NVARCHAR(5);")
        .unwrap_err();
    assert!(
        matches!(
            &error,
            Error::Statement {
                line: 2,
                column: 1,
                statement: "DECLARE",
                ..
            }
        ),
        "{error}"
    );
    assert!(broker.catalog().queues.is_empty());
    let error = session.execute("DECLARE @d DECIMAL(10, 2)").unwrap_err();
    assert!(
        error.to_string().contains("DECIMAL is not supported"),
        "{error}"
    );
    assert_eq!(session.variable("d"), None);
}

// ---- SELECT ----

#[test]
fn select_from_every_view_with_where() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = with_definitions(&broker);
    run(
        &mut session,
        "CREATE ROUTE R WITH SERVICE_NAME = '//far/Svc', ADDRESS = 'TCP://far:4022';
         CREATE BROKER PRIORITY P FOR CONVERSATION SET (LOCAL_SERVICE_NAME = [//t/Client], PRIORITY_LEVEL = 7);
         BEGIN DIALOG @h FROM SERVICE [//t/Client] TO SERVICE '//t/Server' ON CONTRACT [//t/Talk]
             WITH LIFETIME = 100;
         SEND ON CONVERSATION @h MESSAGE TYPE [//t/Ask] (N'q');",
    );
    let h = handle_of(&session, "h");
    let target = broker.conversation_endpoint(h).unwrap().far_handle.unwrap();
    let select = |session: &mut Session<'_>, script: &str| {
        let results = run(session, script);
        result_set(&results).clone()
    };

    let set = select(
        &mut session,
        "SELECT state, state_desc, is_initiator, far_service, send_sequence, receive_sequence,
             priority, lifetime, dialog_timer, service_contract_name
         FROM sys.conversation_endpoints WHERE conversation_handle = @h",
    );
    assert_eq!(
        set.rows,
        [[
            text("CO"),
            text("CONVERSING"),
            Value::Int(1),
            text("//t/Server"),
            Value::Int(1),
            Value::Int(0),
            Value::Int(7),
            Value::Int((START_MS + 100_000) as i64),
            Value::Null,
            text("//t/Talk"),
        ]]
    );
    let set = select(
        &mut session,
        "SELECT * FROM sys.conversation_endpoints WHERE is_initiator = 0 AND service_name = '//t/Server'",
    );
    assert_eq!(set.rows.len(), 1);
    assert_eq!(
        set.column("conversation_handle").unwrap(),
        [&Value::Guid(target.0)]
    );

    let set = select(
        &mut session,
        "SELECT conversation_group_id, conversations, messages, is_locked
         FROM sys.conversation_groups WHERE queue_name = 'Server'",
    );
    assert_eq!(set.rows.len(), 1);
    assert_eq!(
        set.rows[0][1..],
        [Value::Int(1), Value::Int(1), Value::Int(0)]
    );

    let set = select(
        &mut session,
        "SELECT name, is_receive_enabled, is_retention_enabled, messages
         FROM sys.service_queues WHERE name = N'Server'",
    );
    assert_eq!(
        set.rows,
        [[text("Server"), Value::Int(1), Value::Int(0), Value::Int(1)]]
    );
    let set = select(
        &mut session,
        "SELECT queue_name FROM sys.services WHERE name = '//t/Client'",
    );
    assert_eq!(set.rows, [[text("Client")]]);
    let set = select(
        &mut session,
        "SELECT * FROM sys.service_contracts WHERE name = '//t/Talk'",
    );
    assert_eq!(set.rows, [[text("//t/Talk")]]);
    let set = select(
        &mut session,
        "SELECT name, validation_desc FROM sys.service_message_types WHERE validation = 'U'",
    );
    assert_eq!(set.rows, [[text("//t/Tell"), text("UTF8")]]);
    let set = select(
        &mut session,
        "SELECT address, lifetime, mirror_address FROM sys.routes WHERE remote_service_name = '//far/Svc'",
    );
    assert_eq!(
        set.rows,
        [[text("quic://far:4022"), Value::Null, Value::Null]]
    );
    let set = select(
        &mut session,
        "SELECT name, service_contract_name, priority FROM sys.conversation_priorities WHERE priority = 7",
    );
    assert_eq!(set.rows, [[text("P"), Value::Null, Value::Int(7)]]);
    let set = select(
        &mut session,
        "SELECT * FROM sys.transmission_queue WHERE to_service_name = 'nowhere'",
    );
    assert!(set.rows.is_empty());
    assert_eq!(set.columns[0], "conversation_handle");

    // A queue, read without consuming: the message is still there afterwards.
    let set = select(
        &mut session,
        "SELECT message_type_name, CAST(message_body AS NVARCHAR(MAX)) AS body, status
         FROM dbo.Server WHERE conversation_handle = @h",
    );
    assert!(set.rows.is_empty(), "@h is the initiator's handle");
    let set = select(
        &mut session,
        &format!(
            "SELECT message_type_name, CAST(message_body AS NVARCHAR(MAX)) AS body, status
             FROM dbo.Server WHERE conversation_handle = '{target}'"
        ),
    );
    assert_eq!(set.rows, [[text("//t/Ask"), text("q"), Value::Int(1)]]);
    assert_eq!(broker.peek("Server").unwrap().len(), 1);

    // SELECT @var = column assigns from the last row.
    let results = run(
        &mut session,
        "SELECT @type = name FROM sys.service_message_types WHERE name = '//t/Ask'",
    );
    assert_eq!(
        (results[0].rows_affected, &results[0].result),
        (Some(1), &None)
    );
    assert_eq!(session.variable("type"), Some(&text("//t/Ask")));

    let (_, _, _, error) = statement_error(&mut session, "SELECT bogus FROM sys.routes");
    assert!(error.to_string().contains("invalid column name"), "{error}");
}

// ---- variables ----

#[test]
fn variables_of_every_type_and_their_conversions() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = Session::new(&broker);
    let results = run(
        &mut session,
        "DECLARE @i INT = 42, @big BIGINT = 9000000000, @small TINYINT = '7', @bit BIT = 5,
                 @short NVARCHAR(5) = N'truncated', @one VARCHAR = 'xy', @name sysname = 'n',
                 @bin VARBINARY(MAX) = CAST('abc' AS VARBINARY(MAX)), @b2 BINARY(2) = 0x010203,
                 @xml XML = N'<a/>', @id UNIQUEIDENTIFIER = '6F9619FF-8B86-D011-B42D-00C04FC964FF',
                 @null INT;
         SELECT @i AS i, @big AS big, @small AS small, @bit AS bit, @short AS short, @one AS one,
                @bin AS bin, @b2 AS b2, @xml AS x, @id AS id, @null AS n,
                CAST(@id AS NVARCHAR(36)) AS id_text, CAST(@i AS VARBINARY(4)) AS i_bin,
                CONVERT(INT, 0x0100) AS from_bin, CAST(@bin AS NVARCHAR(MAX)) AS bin_text;",
    );
    let set = result_set(&results);
    assert_eq!(
        set.rows[0],
        [
            Value::Int(42),
            Value::Int(9_000_000_000),
            Value::Int(7),
            Value::Int(1),
            text("trunc"),
            text("x"),
            Value::Binary(b"abc".to_vec()),
            Value::Binary(vec![1, 2]),
            text("<a/>"),
            Value::Guid(0x6f96_19ff_8b86_d011_b42d_00c0_4fc9_64ff),
            Value::Null,
            text("6F9619FF-8B86-D011-B42D-00C04FC964FF"),
            Value::Binary(vec![0, 0, 0, 42]),
            Value::Int(256),
            text("abc"),
        ]
    );
    assert_eq!(set.columns[0], "i");

    // Variables persist across scripts of a session; names are case-insensitive.
    run(&mut session, "SET @I = 43");
    assert_eq!(session.variable("i"), Some(&Value::Int(43)));
    // Declaring again in a later script starts the variable over, NULL.
    run(&mut session, "DECLARE @i NVARCHAR(10)");
    assert_eq!(session.variable("I"), Some(&Value::Null));

    // IF / ELSE with comparisons across types and NULL tests.
    let results = run(
        &mut session,
        "DECLARE @r NVARCHAR(10);
         IF @big = '9000000000' SET @r = 'eq' ELSE SET @r = 'ne';
         IF @null IS NULL BEGIN SET @small = 1; SET @b2 = 0x09 END",
    );
    assert_eq!(
        results.len(),
        4,
        "DECLARE, SET in the IF, SET and SET in the block"
    );
    assert_eq!(session.variable("r"), Some(&text("eq")));
    assert_eq!(session.variable("small"), Some(&Value::Int(1)));
    assert_eq!(session.variable("b2"), Some(&Value::Binary(vec![9])));
    let results = run(
        &mut session,
        "IF @null = 1 SET @r = 'null=1' ELSE IF @null <> 1 SET @r = 'null<>1' ELSE SET @r = 'unknown';
         IF @id = '6f9619ff-8b86-d011-b42d-00c04fc964ff' SELECT 'guid eq' AS g;
         IF @short IS NOT NULL SELECT @short AS s;",
    );
    assert_eq!(session.variable("r"), Some(&text("unknown")));
    let shown: Vec<&Value> = results
        .iter()
        .filter_map(|r| r.result.as_ref())
        .map(|s| &s.rows[0][0])
        .collect();
    assert_eq!(shown, [&text("guid eq"), &text("trunc")]);

    // Conversion failures and overflow are statement errors.
    let (_, _, _, error) = statement_error(&mut session, "SET @small = 256");
    assert!(error.to_string().contains("overflow"), "{error}");
    let (_, _, _, error) = statement_error(&mut session, "SET @id = 'not a guid'");
    assert!(error.to_string().contains("conversion failed"), "{error}");
    let (_, _, _, error) = statement_error(&mut session, "SET @@ROWCOUNT = 1");
    assert!(error.to_string().contains("cannot be assigned"), "{error}");
}

// ---- limits ----

#[test]
fn value_bytes_max_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = with_definitions(&broker);
    let fits = "a".repeat(sql::VALUE_BYTES_MAX);
    run(
        &mut session,
        &format!(
            "DECLARE @v VARBINARY(MAX) = CAST('{fits}' AS VARBINARY(MAX));
             BEGIN DIALOG @h FROM SERVICE [//t/Client] TO SERVICE '//t/Server';
             SEND ON CONVERSATION @h (@v);"
        ),
    );
    assert_eq!(
        broker.peek("Server").unwrap()[0].body().len(),
        herald_engine::MESSAGE_BODY_BYTES_MAX
    );
    let (_, _, statement, error) =
        statement_error(&mut session, &format!("SET @body = N'{fits}b'"));
    assert_eq!(statement, "SET");
    assert!(
        matches!(error, Error::Limit { what: "bytes of a value", len, max }
            if len == sql::VALUE_BYTES_MAX + 1 && max == sql::VALUE_BYTES_MAX),
        "{error}"
    );
}

#[test]
fn variables_max_and_transaction_nesting_max_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = Session::new(&broker);
    let declare = |from: usize, to: usize| {
        (from..to)
            .map(|i| format!("DECLARE @v{i} INT;\n"))
            .collect::<String>()
    };
    run(&mut session, &declare(0, sql::VARIABLES_MAX));
    assert_eq!(session.variable("v4095"), Some(&Value::Null));
    // Declaring one already there again is not a new variable.
    run(&mut session, "DECLARE @v0 INT = 1");
    let error = session
        .execute(&declare(sql::VARIABLES_MAX, sql::VARIABLES_MAX + 1))
        .unwrap_err();
    assert!(
        matches!(error, Error::Limit { what: "variables", len, .. } if len == sql::VARIABLES_MAX + 1),
        "{error}"
    );

    let nest = "BEGIN TRAN;\n".repeat(sql::TRANSACTION_NESTING_MAX as usize);
    run(&mut session, &nest);
    assert_eq!(session.transaction_count(), sql::TRANSACTION_NESTING_MAX);
    let (_, _, statement, error) = statement_error(&mut session, "BEGIN TRAN");
    assert_eq!(statement, "BEGIN TRANSACTION");
    assert!(matches!(error, Error::Limit { .. }), "{error}");
    run(&mut session, "ROLLBACK");
    assert_eq!(session.transaction_count(), 0);
}

#[test]
fn result_rows_max_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = with_definitions(&broker);
    run(
        &mut session,
        "BEGIN DIALOG @h FROM SERVICE [//t/Client] TO SERVICE '//t/Server'",
    );
    let h = handle_of(&session, "h");
    let mut tx = broker.begin();
    for _ in 0..=sql::RESULT_ROWS_MAX {
        tx.send(h, "DEFAULT", b"").unwrap();
    }
    tx.commit().unwrap();

    // One row too many for a SELECT: a typed error; with a WHERE that leaves the maximum, fine.
    let (_, _, _, error) = statement_error(&mut session, "SELECT status FROM Server");
    assert!(
        matches!(error, Error::Limit { what: "rows of a SELECT", len, max }
            if len == sql::RESULT_ROWS_MAX + 1 && max == sql::RESULT_ROWS_MAX),
        "{error}"
    );
    let results = run(
        &mut session,
        &format!(
            "SELECT message_sequence_number FROM Server WHERE message_sequence_number = {}",
            sql::RESULT_ROWS_MAX
        ),
    );
    assert_eq!(results[0].rows_affected, Some(1));

    // RECEIVE without TOP takes the maximum and leaves the rest queued.
    let results = run(&mut session, "RECEIVE message_sequence_number FROM Server");
    assert_eq!(results[0].rows_affected, Some(sql::RESULT_ROWS_MAX as u64));
    let rest = broker.peek("Server").unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].sequence, sql::RESULT_ROWS_MAX as u64);
}

// ---- no input panics ----

mod generated {
    use super::*;
    use proptest::prelude::*;

    /// Statements, right and wrong, over a small set of names and variables, so that generated
    /// scripts reach deep into the executor (a WAITFOR always has a TIMEOUT of 0: a script must
    /// not wait for ever).
    const STATEMENTS: &[&str] = &[
        "CREATE QUEUE Q",
        "CREATE QUEUE Q WITH STATUS = OFF",
        "ALTER QUEUE Q WITH STATUS = ON, RETENTION = ON",
        "ALTER QUEUE Missing WITH STATUS = ON",
        "CREATE SERVICE S ON QUEUE Q ([DEFAULT])",
        "CREATE ROUTE R WITH ADDRESS = 'LOCAL', LIFETIME = 1",
        "ALTER ROUTE R WITH SERVICE_NAME = 'S'",
        "CREATE BROKER PRIORITY P FOR CONVERSATION SET (PRIORITY_LEVEL = 2)",
        "DROP ROUTE R",
        "DROP BROKER PRIORITY P",
        "DROP SERVICE S",
        "DROP QUEUE Q",
        "BEGIN DIALOG @h FROM SERVICE S TO SERVICE 'S'",
        "BEGIN DIALOG @h FROM SERVICE S TO SERVICE 'S' WITH RELATED_CONVERSATION_GROUP = @g, LIFETIME = @i",
        "BEGIN DIALOG @t FROM SERVICE S TO SERVICE 'S' WITH RELATED_CONVERSATION = @h",
        "SEND ON CONVERSATION @h (@t)",
        "SEND ON CONVERSATION (@h, @t) (0xFF00)",
        "SEND ON CONVERSATION @h (CAST(@i AS VARBINARY(3)))",
        "RECEIVE * FROM Q",
        "RECEIVE TOP (@i) @t = message_body, @h = conversation_handle FROM Q",
        "RECEIVE CAST(message_body AS NVARCHAR(2)) AS b FROM Q WHERE conversation_handle = @h",
        "WAITFOR (RECEIVE CONVERT(INT, message_body) FROM Q WHERE conversation_group_id = @g), TIMEOUT 0",
        "WAITFOR (GET CONVERSATION GROUP @g FROM Q), TIMEOUT 0",
        "GET CONVERSATION GROUP @t FROM Q",
        "MOVE CONVERSATION @h TO @g",
        "END CONVERSATION @h",
        "END CONVERSATION @t WITH ERROR = @i DESCRIPTION = @t",
        "END CONVERSATION @h WITH CLEANUP",
        "BEGIN CONVERSATION TIMER (@h) TIMEOUT = @i",
        "BEGIN TRAN",
        "COMMIT",
        "ROLLBACK",
        "SET @i = @t",
        "SET @t = @h",
        "SET @g = @t",
        "SET @i = -1",
        "SET @i = 2147483647",
        "SET @t = CAST(@g AS VARBINARY(MAX))",
        "SELECT @i AS i, @t AS t, @h AS h, @g AS g",
        "SELECT @t = @i",
        "SELECT * FROM sys.conversation_endpoints WHERE state = @t AND priority = @i",
        "SELECT * FROM sys.conversation_groups",
        "SELECT * FROM sys.transmission_queue",
        "SELECT name FROM sys.service_queues WHERE is_receive_enabled = @t",
        "SELECT * FROM sys.routes WHERE lifetime = @g",
        "SELECT * FROM Q WHERE message_body = @t",
        "IF @i = @t SET @i = 1 ELSE SET @i = 2",
        "IF @h IS NULL BEGIN SET @t = 'x' SET @i = @@ROWCOUNT END",
        "USE db",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn generated_scripts_never_panic(
            picks in proptest::collection::vec(0..STATEMENTS.len(), 1..24),
            split in 1usize..6,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (broker, _clock) = open(dir.path());
            let mut session = Session::new(&broker);
            session
                .execute(
                    "DECLARE @h UNIQUEIDENTIFIER, @t NVARCHAR(40), @g UNIQUEIDENTIFIER, @i INT;
                     CREATE QUEUE Q; CREATE SERVICE S ON QUEUE Q ([DEFAULT]);
                     BEGIN DIALOG @h FROM SERVICE S TO SERVICE 'S'; SEND ON CONVERSATION @h (N'1');
                     SET @i = 1; SET @t = N'2'; SET @g = '00000000-0000-0000-0000-00000000000a';",
                )
                .unwrap();
            for chunk in picks.chunks(split) {
                let script: Vec<&str> = chunk.iter().map(|i| STATEMENTS[*i]).collect();
                // Errors are fine; a panic or a hang is not.
                let outcome = session.execute_script(&script.join(";\n"));
                prop_assert!(outcome.results.len() <= chunk.len() * 2);
            }
            drop(session);
            herald_engine::invariants::check_idle(&broker).unwrap();
        }
    }
}

#[test]
fn an_interrupted_waitfor_ends_with_interrupted_and_rolls_back_in_autocommit() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut setup = with_definitions(&broker);
    run(&mut setup, "CREATE QUEUE Idle;");
    drop(setup);
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| {
            let mut session = Session::new(&broker);
            session.set_interrupt(flag.clone());
            // Forever on a manual clock: only the interrupt can end it.
            session.execute("WAITFOR (RECEIVE * FROM Idle), TIMEOUT -1; CREATE QUEUE After;")
        });
        // Whether the wait has begun or not, setting the flag and waking ends it: the flag is
        // checked after every attempt, before sleeping.
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        broker.wake_waiters();
        let error = waiting.join().unwrap().unwrap_err();
        assert!(
            matches!(&error, Error::Statement { statement: "WAITFOR RECEIVE", source, .. }
                if matches!(**source, Error::Interrupted)),
            "{error}"
        );
    });
    // The script stopped at the interrupted statement.
    assert!(!broker.catalog().queues.contains_key("After"));
}

#[test]
fn with_transaction_shares_the_explicit_transaction_or_autocommits() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = Session::new(&broker);
    // Autocommit: committed at once.
    session
        .with_transaction(|tx| tx.create_queue("Auto", herald_engine::QueueOptions::default()))
        .unwrap();
    assert!(broker.catalog().queues.contains_key("Auto"));
    // Inside BEGIN TRAN: part of the explicit transaction, gone with its rollback.
    run(&mut session, "BEGIN TRAN;");
    session
        .with_transaction(|tx| tx.create_queue("Inside", herald_engine::QueueOptions::default()))
        .unwrap();
    assert!(!broker.catalog().queues.contains_key("Inside"));
    assert_eq!(session.transaction_count(), 1);
    session.rollback();
    assert_eq!(session.transaction_count(), 0);
    assert!(!broker.catalog().queues.contains_key("Inside"));
}

#[test]
fn every_statement_kind_is_listed_in_statement_kinds() {
    let script = "CREATE MESSAGE TYPE m; CREATE CONTRACT c (m SENT BY ANY); CREATE QUEUE q;
        ALTER QUEUE q WITH STATUS = ON; CREATE SERVICE s ON QUEUE q; CREATE ROUTE r WITH ADDRESS = 'LOCAL';
        ALTER ROUTE r WITH ADDRESS = 'LOCAL'; CREATE BROKER PRIORITY p FOR CONVERSATION SET (PRIORITY_LEVEL = 5);
        DROP MESSAGE TYPE m; DROP CONTRACT c; DROP QUEUE q; DROP SERVICE s; DROP ROUTE r;
        DROP BROKER PRIORITY p; BEGIN DIALOG @h FROM SERVICE s TO SERVICE 's';
        SEND ON CONVERSATION @h; WAITFOR (RECEIVE * FROM q); RECEIVE * FROM q;
        WAITFOR (GET CONVERSATION GROUP @g FROM q); GET CONVERSATION GROUP @g FROM q;
        MOVE CONVERSATION @h TO @g; END CONVERSATION @h;
        BEGIN CONVERSATION TIMER (@h) TIMEOUT = 5; BEGIN TRAN; COMMIT; ROLLBACK;
        DECLARE @x INT; SET @x = 1; SELECT 1; SELECT * FROM sys.service_queues; USE db;
        IF @x = 1 SELECT 1; BEGIN SELECT 1; END";
    let statements = sql::parse(script).unwrap();
    let mut kinds: Vec<&str> = statements.iter().map(|s| s.kind()).collect();
    for kind in &kinds {
        assert_eq!(
            sql::statement_kind(kind),
            Some(*kind),
            "{kind} is not listed"
        );
    }
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(kinds.len(), sql::STATEMENT_KINDS.len(), "{kinds:?}");
}

/// A session being ended (its client gone, the node shutting down) stops its script at the
/// next statement, not only in a wait: what ran stays, nothing after runs.
#[test]
fn an_interrupted_session_stops_between_statements() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _clock) = open(dir.path());
    let mut session = Session::new(&broker);
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    session.set_interrupt(flag.clone());
    run(&mut session, "CREATE QUEUE Before;");
    flag.store(true, std::sync::atomic::Ordering::SeqCst);
    let (line, _, statement, error) = statement_error(
        &mut session,
        "CREATE QUEUE A;\nIF 1 = 1 BEGIN CREATE QUEUE B; END",
    );
    assert_eq!((line, statement), (1, "CREATE QUEUE"));
    assert!(matches!(error, Error::Interrupted), "{error:?}");
    let queues: Vec<String> = broker.catalog().queues.keys().cloned().collect();
    assert_eq!(queues, ["Before"], "nothing ran after the interrupt");
}
