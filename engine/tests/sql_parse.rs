//! Herald's T-SQL parser (`herald_engine::sql`): every statement form, the scripts of Service
//! Broker's "Completing a Conversation in a Single Database" tutorial as written, the exact
//! position and wording of errors, every limit at its edge, and property tests that no input
//! panics and that printing a tree parses back to the same tree.

use herald_engine::sql::{
    self, Activation, ActivationSettings, AddressScheme, AlterQueue, BeginConversationTimer,
    BeginDialog, BrokerInstance, CatalogView, ColumnEquals, Columns, CompareOp, Condition,
    ContractMessage, CreateBrokerPriority, CreateContract, CreateMessageType, CreateQueue,
    CreateRoute, CreateService, Declare, DropObject, EndConversation, EndWith, ExecuteAs, Expr,
    GetConversationGroup, If, Literal, MoveConversation, NameOrAny, ObjectKind, ObjectName,
    Operand, PriorityLevel, Receive, ReceiveFilter, Related, RouteAddress, RouteSettings, Select,
    SelectItem, SelectSource, SelectValues, Send, Set, Statement, TypeLength, TypeName, ValueItem,
    VariableDecl, WaitFor,
};
use herald_engine::{
    ConversationGroupId, ConversationHandle, Error, QueueOptions, SentBy, Validation,
};

fn parse(text: &str) -> Vec<Statement> {
    let statements = sql::parse(text).unwrap_or_else(|e| panic!("{e}\nin:\n{text}"));
    assert_round_trip(&statements);
    statements
}

fn one(text: &str) -> Statement {
    let mut statements = parse(text);
    assert_eq!(
        statements.len(),
        1,
        "statements in {text:?}: {statements:#?}"
    );
    statements.remove(0)
}

fn syntax_error(text: &str) -> (u32, u32, String) {
    match sql::parse(text) {
        Err(Error::Syntax {
            line,
            column,
            message,
        }) => (line, column, message),
        other => panic!("expected a syntax error for {text:?}, got {other:?}"),
    }
}

fn assert_error(text: &str, line: u32, column: u32, message: &str) {
    assert_eq!(
        syntax_error(text),
        (line, column, message.to_owned()),
        "for {text:?}"
    );
}

fn assert_round_trip(statements: &[Statement]) {
    let script = sql::render(statements);
    match sql::parse(&script) {
        Ok(again) => assert_eq!(again, statements, "re-parsing:\n{script}"),
        Err(e) => panic!("rendered script does not parse: {e}\n{script}"),
    }
}

fn var<T>(name: &str) -> Operand<T> {
    Operand::Variable(name.into())
}

fn type_name(name: &str, length: Option<TypeLength>) -> TypeName {
    TypeName {
        name: name.into(),
        length,
        scale: None,
    }
}

fn nstr(value: &str) -> Expr {
    Expr::Literal(Literal::String {
        value: value.into(),
        national: true,
    })
}

fn assign(variable: &str, column: &str) -> SelectItem {
    SelectItem {
        column: column.into(),
        cast: None,
        alias: None,
        assign_to: Some(variable.into()),
    }
}

const GUID: &str = "6f9619ff-8b86-d011-b42d-00c04fc964ff";

fn guid() -> u128 {
    0x6f96_19ff_8b86_d011_b42d_00c0_4fc9_64ff
}

// ---- the tutorial ----

const TUTORIAL_OBJECTS: &str = include_str!("tutorial/1-objects.sql");

const TUTORIAL_BEGIN: &str = include_str!("tutorial/2-begin.sql");

const TUTORIAL_REPLY: &str = include_str!("tutorial/3-reply.sql");

const TUTORIAL_END: &str = include_str!("tutorial/4-end.sql");

const TUTORIAL_DROP: &str = include_str!("tutorial/5-drop.sql");

#[test]
fn tutorial_creates_its_objects() {
    let statements = parse(TUTORIAL_OBJECTS);
    let message_type = |name: &str| {
        Statement::CreateMessageType(CreateMessageType {
            name: name.into(),
            authorization: None,
            validation: Some(Validation::WellFormedXml),
        })
    };
    let queue = |name: &str| {
        Statement::CreateQueue(CreateQueue {
            name: ObjectName::bare(name),
            settings: Default::default(),
            filegroup: None,
        })
    };
    assert_eq!(
        statements,
        vec![
            Statement::Use(sql::Use {
                database: "AdventureWorks2008R2".into()
            }),
            message_type("//AWDB/1DBSample/RequestMessage"),
            message_type("//AWDB/1DBSample/ReplyMessage"),
            Statement::CreateContract(CreateContract {
                name: "//AWDB/1DBSample/SampleContract".into(),
                authorization: None,
                messages: vec![
                    ContractMessage {
                        message_type: "//AWDB/1DBSample/RequestMessage".into(),
                        sent_by: SentBy::Initiator
                    },
                    ContractMessage {
                        message_type: "//AWDB/1DBSample/ReplyMessage".into(),
                        sent_by: SentBy::Target
                    },
                ],
            }),
            queue("TargetQueue1DB"),
            Statement::CreateService(CreateService {
                name: "//AWDB/1DBSample/TargetService".into(),
                authorization: None,
                queue: ObjectName::bare("TargetQueue1DB"),
                contracts: vec!["//AWDB/1DBSample/SampleContract".into()],
            }),
            queue("InitiatorQueue1DB"),
            Statement::CreateService(CreateService {
                name: "//AWDB/1DBSample/InitiatorService".into(),
                authorization: None,
                queue: ObjectName::bare("InitiatorQueue1DB"),
                contracts: vec![],
            }),
        ]
    );
}

#[test]
fn tutorial_begins_a_dialog_and_sends() {
    let statements = parse(TUTORIAL_BEGIN);
    assert_eq!(statements.len(), 8);
    assert_eq!(
        statements[0],
        Statement::Declare(Declare {
            variables: vec![VariableDecl {
                name: "InitDlgHandle".into(),
                data_type: type_name("UNIQUEIDENTIFIER", None),
                initial: None,
            }]
        })
    );
    assert_eq!(
        statements[1],
        Statement::Declare(Declare {
            variables: vec![VariableDecl {
                name: "RequestMsg".into(),
                data_type: type_name("NVARCHAR", Some(TypeLength::Count(100))),
                initial: None,
            }]
        })
    );
    assert_eq!(statements[2], Statement::BeginTransaction);
    assert_eq!(
        statements[3],
        Statement::BeginDialog(BeginDialog {
            handle_variable: "InitDlgHandle".into(),
            from_service: "//AWDB/1DBSample/InitiatorService".into(),
            to_service: "//AWDB/1DBSample/TargetService".into(),
            broker_instance: None,
            contract: Some("//AWDB/1DBSample/SampleContract".into()),
            related: None,
            lifetime_secs: None,
            encryption: Some(false),
        })
    );
    assert_eq!(
        statements[4],
        Statement::SelectValues(SelectValues {
            items: vec![ValueItem::Assign {
                variable: "RequestMsg".into(),
                value: nstr("<RequestMsg>Message for Target service.</RequestMsg>"),
            }]
        })
    );
    assert_eq!(
        statements[5],
        Statement::Send(Send {
            conversations: vec![var("InitDlgHandle")],
            message_type: Some("//AWDB/1DBSample/RequestMessage".into()),
            body: Some(Expr::Variable("RequestMsg".into())),
        })
    );
    assert_eq!(
        statements[6],
        Statement::SelectValues(SelectValues {
            items: vec![ValueItem::Show {
                value: Expr::Variable("RequestMsg".into()),
                alias: Some("SentRequestMsg".into()),
            }]
        })
    );
    assert_eq!(statements[7], Statement::Commit);
}

#[test]
fn tutorial_receives_and_replies_inside_if_begin_end() {
    let statements = parse(TUTORIAL_REPLY);
    assert_eq!(statements.len(), 9, "{statements:#?}");
    assert_eq!(
        statements[4],
        Statement::Receive(Receive {
            waitfor: Some(WaitFor {
                timeout_ms: Some(Operand::Literal(1000))
            }),
            top: Some(Operand::Literal(1)),
            columns: Columns::List(vec![
                assign("RecvReqDlgHandle", "conversation_handle"),
                assign("RecvReqMsg", "message_body"),
                assign("RecvReqMsgName", "message_type_name"),
            ]),
            queue: ObjectName::bare("TargetQueue1DB"),
            into: None,
            filter: None,
        })
    );
    let Statement::If(If {
        condition,
        then,
        otherwise,
    }) = &statements[6]
    else {
        panic!("expected IF, got {:?}", statements[6]);
    };
    assert_eq!(
        *condition,
        Condition::Compare {
            left: Expr::Variable("RecvReqMsgName".into()),
            op: CompareOp::Eq,
            right: nstr("//AWDB/1DBSample/RequestMessage"),
        }
    );
    assert_eq!(then.len(), 4);
    assert_eq!(
        then[2],
        Statement::Send(Send {
            conversations: vec![var("RecvReqDlgHandle")],
            message_type: Some("//AWDB/1DBSample/ReplyMessage".into()),
            body: Some(Expr::Variable("ReplyMsg".into())),
        })
    );
    assert_eq!(
        then[3],
        Statement::EndConversation(EndConversation {
            conversation: var("RecvReqDlgHandle"),
            with: None,
        })
    );
    assert_eq!(*otherwise, None);
    assert_eq!(statements[8], Statement::Commit);
}

#[test]
fn tutorial_receives_the_reply_and_ends() {
    let statements = parse(TUTORIAL_END);
    assert_eq!(statements.len(), 7);
    assert!(matches!(&statements[3], Statement::Receive(r) if r.queue.name == "InitiatorQueue1DB"));
    assert_eq!(
        statements[4],
        Statement::EndConversation(EndConversation {
            conversation: var("RecvReplyDlgHandle"),
            with: None,
        })
    );
}

#[test]
fn tutorial_drops_its_objects_and_if_exists_is_rejected_where_it_is() {
    let statements = parse(TUTORIAL_DROP);
    assert_eq!(statements.len(), 7);
    assert_eq!(
        statements[1],
        Statement::Drop(DropObject {
            kind: ObjectKind::Queue,
            name: ObjectName::bare("TargetQueue1DB"),
        })
    );
    assert_eq!(
        statements[6],
        Statement::Drop(DropObject {
            kind: ObjectKind::MessageType,
            name: ObjectName::bare("//AWDB/1DBSample/ReplyMessage"),
        })
    );
    assert_error(
        "IF EXISTS (SELECT * FROM sys.services\n           WHERE name =\n           N'//AWDB/1DBSample/TargetService')\n     DROP SERVICE\n     [//AWDB/1DBSample/TargetService];",
        1,
        4,
        "IF EXISTS is not supported by Herald",
    );
}

#[test]
fn tutorial_scripts_parse_as_one_script_with_positions() {
    let script = [
        TUTORIAL_OBJECTS,
        TUTORIAL_BEGIN,
        TUTORIAL_REPLY,
        TUTORIAL_END,
        TUTORIAL_DROP,
    ]
    .concat();
    let located = sql::parse_located(&script).expect("the tutorial parses");
    assert_eq!(located.len(), 8 + 8 + 9 + 7 + 7);
    assert_eq!((located[1].line, located[1].column), (3, 1));
    // `BEGIN DIALOG` is at line 6 of the second script, after the lines of the first.
    let dialog = located
        .iter()
        .find(|l| matches!(l.statement, Statement::BeginDialog(_)))
        .expect("a BEGIN DIALOG");
    let first_lines = u32::try_from(TUTORIAL_OBJECTS.lines().count()).expect("short");
    assert_eq!((dialog.line, dialog.column), (first_lines + 6, 1));
}

// ---- every statement form ----

#[test]
fn create_message_type_every_validation_and_authorization() {
    for (word, validation) in [
        ("NONE", Validation::None),
        ("EMPTY", Validation::Empty),
        ("WELL_FORMED_XML", Validation::WellFormedXml),
        ("utf8", Validation::Utf8),
        ("Json", Validation::Json),
    ] {
        assert_eq!(
            one(&format!(
                "CREATE MESSAGE TYPE '//shop/Order' AUTHORIZATION dbo VALIDATION = {word}"
            )),
            Statement::CreateMessageType(CreateMessageType {
                name: "//shop/Order".into(),
                authorization: Some("dbo".into()),
                validation: Some(validation),
            })
        );
    }
    assert_eq!(
        one("create message type [x]"),
        Statement::CreateMessageType(CreateMessageType {
            name: "x".into(),
            authorization: None,
            validation: None,
        })
    );
    assert_error(
        "CREATE MESSAGE TYPE x VALIDATION = VALID_XML WITH SCHEMA COLLECTION c",
        1,
        36,
        "VALIDATION = VALID_XML WITH SCHEMA COLLECTION is not supported by Herald",
    );
    assert_error(
        "CREATE MESSAGE TYPE x VALIDATION = XML",
        1,
        36,
        "expected NONE, EMPTY, WELL_FORMED_XML, UTF8 or JSON after VALIDATION =, found 'XML'",
    );
}

#[test]
fn create_contract_with_default_and_any() {
    assert_eq!(
        one(
            "CREATE CONTRACT [//c] AUTHORIZATION [o] ([DEFAULT] SENT BY ANY, '//m' SENT BY TARGET, DEFAULT SENT BY INITIATOR)"
        ),
        Statement::CreateContract(CreateContract {
            name: "//c".into(),
            authorization: Some("o".into()),
            messages: vec![
                ContractMessage {
                    message_type: "DEFAULT".into(),
                    sent_by: SentBy::Any
                },
                ContractMessage {
                    message_type: "//m".into(),
                    sent_by: SentBy::Target
                },
                ContractMessage {
                    message_type: "DEFAULT".into(),
                    sent_by: SentBy::Initiator
                },
            ],
        })
    );
    assert_error(
        "CREATE CONTRACT c (m SENT BY BOTH)",
        1,
        30,
        "expected INITIATOR, TARGET or ANY after SENT BY, found 'BOTH'",
    );
    assert_error(
        "CREATE CONTRACT c ()",
        1,
        20,
        "expected a message type name in the contract's list, found ')'",
    );
}

#[test]
fn create_queue_with_every_option_and_a_schema() {
    let statement = one(
        "CREATE QUEUE dbo.OrderQueue WITH STATUS = OFF, RETENTION = ON,
           ACTIVATION (STATUS = ON, PROCEDURE_NAME = shop.dbo.process_order,
                       MAX_QUEUE_READERS = 32767, EXECUTE AS 'worker'),
           POISON_MESSAGE_HANDLING (STATUS = OFF)
         ON [DEFAULT]",
    );
    let Statement::CreateQueue(queue) = statement else {
        panic!("{statement:?}");
    };
    assert_eq!(queue.name.schema.as_deref(), Some("dbo"));
    assert_eq!(queue.name.name, "OrderQueue");
    assert_eq!(queue.filegroup.as_deref(), Some("DEFAULT"));
    assert_eq!(queue.settings.status, Some(false));
    assert_eq!(queue.settings.retention, Some(true));
    assert_eq!(queue.settings.poison_message_handling, Some(false));
    assert_eq!(
        queue.settings.activation,
        Some(Activation::Set(ActivationSettings {
            status: Some(true),
            procedure_name: Some(ObjectName {
                database: Some("shop".into()),
                schema: Some("dbo".into()),
                name: "process_order".into(),
            }),
            max_queue_readers: Some(32767),
            execute_as: Some(ExecuteAs::User("worker".into())),
        }))
    );
    assert_eq!(
        queue.settings.apply_to(QueueOptions::default()),
        QueueOptions {
            enabled: false,
            retention: true,
            poison_message_handling: false,
        }
    );
    for (text, execute_as) in [("SELF", ExecuteAs::Caller), ("OWNER", ExecuteAs::Owner)] {
        let Statement::CreateQueue(q) = one(&format!(
            "CREATE QUEUE q WITH ACTIVATION (EXECUTE AS {text})"
        )) else {
            panic!()
        };
        assert_eq!(
            q.settings.activation,
            Some(Activation::Set(ActivationSettings {
                execute_as: Some(execute_as),
                ..Default::default()
            }))
        );
    }
    assert_error(
        "CREATE QUEUE q WITH ACTIVATION (MAX_QUEUE_READERS = 32768)",
        1,
        53,
        "MAX_QUEUE_READERS must be between 0 and 32767, found 32768",
    );
    assert_error(
        "CREATE QUEUE q WITH STATUS = ON, STATUS = OFF",
        1,
        34,
        "STATUS is given twice",
    );
    assert_error(
        "CREATE QUEUE q WITH ACTIVATION (DROP)",
        1,
        33,
        "ACTIVATION (DROP) is for ALTER QUEUE, not CREATE QUEUE",
    );
    assert_error(
        "CREATE QUEUE #q WITH",
        1,
        21,
        "expected STATUS, RETENTION, ACTIVATION or POISON_MESSAGE_HANDLING after WITH or ',', found end of input",
    );
}

#[test]
fn alter_queue_takes_any_subset_and_activation_drop() {
    assert_eq!(
        one("ALTER QUEUE OrderQueue WITH ACTIVATION (DROP)"),
        Statement::AlterQueue(AlterQueue {
            name: ObjectName::bare("OrderQueue"),
            settings: sql::QueueSettings {
                activation: Some(Activation::Drop),
                ..Default::default()
            },
        })
    );
    let Statement::AlterQueue(alter) = one("ALTER QUEUE q WITH RETENTION = ON") else {
        panic!()
    };
    let base = QueueOptions {
        enabled: false,
        retention: false,
        poison_message_handling: false,
    };
    assert_eq!(
        alter.settings.apply_to(base),
        QueueOptions {
            retention: true,
            ..base
        }
    );
    assert_error(
        "ALTER QUEUE q REBUILD",
        1,
        15,
        "ALTER QUEUE … REBUILD is not supported by Herald",
    );
    assert_error(
        "ALTER QUEUE q",
        1,
        14,
        "expected WITH after ALTER QUEUE name, found end of input",
    );
}

#[test]
fn create_service_with_contracts_and_schema_qualified_queue() {
    assert_eq!(
        one(
            "CREATE SERVICE '//shop/OrderService' AUTHORIZATION dbo ON QUEUE dbo.OrderQueue ([//shop/OrderContract], [DEFAULT])"
        ),
        Statement::CreateService(CreateService {
            name: "//shop/OrderService".into(),
            authorization: Some("dbo".into()),
            queue: ObjectName {
                database: None,
                schema: Some("dbo".into()),
                name: "OrderQueue".into(),
            },
            contracts: vec!["//shop/OrderContract".into(), "DEFAULT".into()],
        })
    );
    assert_error(
        "CREATE SERVICE s ON q",
        1,
        21,
        "expected QUEUE after ON, found 'q'",
    );
}

#[test]
fn routes_create_and_alter() {
    let instance = uuid_of(GUID);
    assert_eq!(
        one(&format!(
            "CREATE ROUTE ExpenseRoute WITH SERVICE_NAME = '//Adventure-Works.com/Expenses',
               BROKER_INSTANCE = '{GUID}', LIFETIME = 259200,
               ADDRESS = 'TCP://www.Adventure-Works.com:1234',
               MIRROR_ADDRESS = 'quic://[::1]:4022'"
        )),
        Statement::CreateRoute(CreateRoute {
            name: "ExpenseRoute".into(),
            authorization: None,
            settings: RouteSettings {
                service_name: Some("//Adventure-Works.com/Expenses".into()),
                broker_instance: Some(instance),
                lifetime_secs: Some(259_200),
                address: Some(RouteAddress::Network {
                    scheme: AddressScheme::Tcp,
                    host: "www.Adventure-Works.com".into(),
                    port: 1234,
                }),
                mirror_address: Some(RouteAddress::Network {
                    scheme: AddressScheme::Quic,
                    host: "[::1]".into(),
                    port: 4022,
                }),
            },
        })
    );
    assert_eq!(
        one("ALTER ROUTE r WITH ADDRESS = 'local'"),
        Statement::AlterRoute(sql::AlterRoute {
            name: "r".into(),
            settings: RouteSettings {
                address: Some(RouteAddress::Local),
                ..Default::default()
            },
        })
    );
    assert_error(
        "CREATE ROUTE r WITH LIFETIME = 5",
        1,
        16,
        "CREATE ROUTE needs an ADDRESS",
    );
    assert_error(
        "CREATE ROUTE r WITH ADDRESS = 'TRANSPORT'",
        1,
        31,
        "ADDRESS = 'TRANSPORT' is not supported by Herald",
    );
    assert_error(
        "CREATE ROUTE r WITH ADDRESS = 'TCP://host'",
        1,
        31,
        "ADDRESS 'TCP://host' has no port: expected 'LOCAL', 'TCP://host:port' or 'quic://host:port'",
    );
    assert_error(
        "CREATE ROUTE r WITH ADDRESS = 'http://h:80'",
        1,
        31,
        "ADDRESS 'http://h:80' has an unknown scheme: expected 'LOCAL', 'TCP://host:port' or 'quic://host:port'",
    );
    assert_error(
        "ALTER ROUTE r WITH MIRROR_ADDRESS = 'LOCAL'",
        1,
        37,
        "MIRROR_ADDRESS must be a network address",
    );
    assert_error(
        "ALTER ROUTE r WITH BROKER_INSTANCE = 'not-a-guid'",
        1,
        38,
        "expected a broker instance GUID after BROKER_INSTANCE =, found 'not-a-guid' which is not a GUID",
    );
}

#[test]
fn broker_priority_any_subset_any_order_optional_commas() {
    assert_eq!(
        one(
            "CREATE BROKER PRIORITY p FOR CONVERSATION SET (PRIORITY_LEVEL = 10 REMOTE_SERVICE_NAME = '//r', LOCAL_SERVICE_NAME = ANY CONTRACT_NAME = [ANY])"
        ),
        Statement::CreateBrokerPriority(CreateBrokerPriority {
            name: "p".into(),
            contract_name: Some(NameOrAny::Name("ANY".into())),
            local_service_name: Some(NameOrAny::Any),
            remote_service_name: Some(NameOrAny::Name("//r".into())),
            priority_level: Some(PriorityLevel::Level(10)),
        })
    );
    assert_eq!(
        one("CREATE BROKER PRIORITY p FOR CONVERSATION SET (PRIORITY_LEVEL = DEFAULT)"),
        Statement::CreateBrokerPriority(CreateBrokerPriority {
            name: "p".into(),
            contract_name: None,
            local_service_name: None,
            remote_service_name: None,
            priority_level: Some(PriorityLevel::Default),
        })
    );
    assert_error(
        "CREATE BROKER PRIORITY p FOR CONVERSATION SET (PRIORITY_LEVEL = 0)",
        1,
        65,
        "PRIORITY_LEVEL must be between 1 and 10, found 0",
    );
    assert_error(
        "CREATE BROKER PRIORITY p FOR CONVERSATION SET (REMOTE_SERVICE_NAME = [r])",
        1,
        70,
        "expected a service name string or ANY, found '[r]'",
    );
    assert_eq!(
        one("DROP BROKER PRIORITY p"),
        Statement::Drop(DropObject {
            kind: ObjectKind::BrokerPriority,
            name: ObjectName::bare("p"),
        })
    );
}

#[test]
fn drop_every_kind() {
    for (text, kind) in [
        ("MESSAGE TYPE", ObjectKind::MessageType),
        ("CONTRACT", ObjectKind::Contract),
        ("QUEUE", ObjectKind::Queue),
        ("SERVICE", ObjectKind::Service),
        ("ROUTE", ObjectKind::Route),
        ("BROKER PRIORITY", ObjectKind::BrokerPriority),
    ] {
        assert_eq!(
            one(&format!("drop {text} [x]")),
            Statement::Drop(DropObject {
                kind,
                name: ObjectName::bare("x"),
            })
        );
    }
    assert_error(
        "DROP SERVICE a.b",
        1,
        15,
        "expected ';' or a new statement after DROP SERVICE, found '.'",
    );
}

#[test]
fn begin_dialog_with_every_option() {
    assert_eq!(
        one(&format!(
            "BEGIN DIALOG CONVERSATION @h FROM SERVICE '//shop/Client' TO SERVICE '//shop/Order', 'CURRENT DATABASE'
               ON CONTRACT [//shop/Contract] WITH RELATED_CONVERSATION_GROUP = '{GUID}', LIFETIME = 600, ENCRYPTION = ON"
        )),
        Statement::BeginDialog(BeginDialog {
            handle_variable: "h".into(),
            from_service: "//shop/Client".into(),
            to_service: "//shop/Order".into(),
            broker_instance: Some(BrokerInstance::CurrentDatabase),
            contract: Some("//shop/Contract".into()),
            related: Some(Related::Group(Operand::Literal(ConversationGroupId(guid())))),
            lifetime_secs: Some(Operand::Literal(600)),
            encryption: Some(true),
        })
    );
    let Statement::BeginDialog(dialog) = one(&format!(
        "BEGIN DIALOG @h FROM SERVICE s TO SERVICE N's', '{GUID}' WITH LIFETIME = @life, RELATED_CONVERSATION = @other"
    )) else {
        panic!()
    };
    assert_eq!(
        dialog.broker_instance,
        Some(BrokerInstance::Id(uuid_of(GUID)))
    );
    assert_eq!(dialog.related, Some(Related::Conversation(var("other"))));
    assert_eq!(dialog.lifetime_secs, Some(var("life")));
    assert_error(
        "BEGIN DIALOG @h FROM SERVICE s TO SERVICE [t]",
        1,
        43,
        "expected a service name string after TO SERVICE, found '[t]'",
    );
    assert_error(
        "BEGIN DIALOG @h FROM SERVICE s TO SERVICE 't' WITH RELATED_CONVERSATION = @a, RELATED_CONVERSATION_GROUP = @b",
        1,
        79,
        "RELATED_CONVERSATION and RELATED_CONVERSATION_GROUP: give one, once",
    );
    assert_error(
        "BEGIN DIALOG @h FROM SERVICE s TO SERVICE 't' WITH LIFETIME = -1",
        1,
        63,
        "LIFETIME must be between 0 and 2147483647, found -1",
    );
}

#[test]
fn send_to_one_or_many_with_every_body_form() {
    let body = |text: &str| match one(&format!("SEND ON CONVERSATION @h ({text})")) {
        Statement::Send(send) => send.body.expect("a body"),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        body("'it''s'"),
        Expr::Literal(Literal::String {
            value: "it's".into(),
            national: false
        })
    );
    assert_eq!(body("N'ü'"), nstr("ü"));
    assert_eq!(
        body("0xDEADbeef"),
        Expr::Literal(Literal::Binary(vec![0xde, 0xad, 0xbe, 0xef]))
    );
    assert_eq!(body("@body"), Expr::Variable("body".into()));
    assert_eq!(body("((@body))"), Expr::Variable("body".into()));
    assert_eq!(
        body("CAST('<a/>' AS VARBINARY(MAX))"),
        Expr::Cast {
            expr: Box::new(Expr::Literal(Literal::String {
                value: "<a/>".into(),
                national: false
            })),
            to: type_name("VARBINARY", Some(TypeLength::Max)),
        }
    );
    assert_eq!(
        body("convert(xml, @x)"),
        Expr::Cast {
            expr: Box::new(Expr::Variable("x".into())),
            to: type_name("XML", None),
        }
    );
    assert_eq!(
        one(&format!("SEND ON CONVERSATION (@a, '{GUID}', @c)")),
        Statement::Send(Send {
            conversations: vec![
                var("a"),
                Operand::Literal(ConversationHandle(guid())),
                var("c")
            ],
            message_type: None,
            body: None,
        })
    );
    assert_error(
        "SEND ON CONVERSATION @h MESSAGE TYPE m (@a + @b)",
        1,
        44,
        "unexpected character '+'",
    );
    assert_error(
        "SEND ON CONVERSATION h",
        1,
        22,
        "expected a conversation handle after SEND ON CONVERSATION (a variable or a GUID string), found 'h'",
    );
}

#[test]
fn receive_every_form() {
    assert_eq!(
        one("RECEIVE * FROM q"),
        Statement::Receive(Receive {
            waitfor: None,
            top: None,
            columns: Columns::All,
            queue: ObjectName::bare("q"),
            into: None,
            filter: None,
        })
    );
    let Statement::Receive(r) = one(&format!(
        "WAITFOR (RECEIVE TOP (@n) status, priority AS p, CAST(message_body AS NVARCHAR(MAX)) AS body,
                  CONVERT(XML, message_body) x, conversation_group_id [group]
                  FROM dbo.q INTO @messages WHERE conversation_group_id = '{GUID}'), TIMEOUT -1"
    )) else {
        panic!()
    };
    assert_eq!(
        r.waitfor,
        Some(WaitFor {
            timeout_ms: Some(Operand::Literal(-1))
        })
    );
    assert_eq!(r.top, Some(var("n")));
    assert_eq!(r.into.as_deref(), Some("messages"));
    assert_eq!(
        r.filter,
        Some(ReceiveFilter::Group(Operand::Literal(ConversationGroupId(
            guid()
        ))))
    );
    assert_eq!(
        r.columns,
        Columns::List(vec![
            SelectItem {
                column: "status".into(),
                cast: None,
                alias: None,
                assign_to: None
            },
            SelectItem {
                column: "priority".into(),
                cast: None,
                alias: Some("p".into()),
                assign_to: None
            },
            SelectItem {
                column: "message_body".into(),
                cast: Some(type_name("NVARCHAR", Some(TypeLength::Max))),
                alias: Some("body".into()),
                assign_to: None,
            },
            SelectItem {
                column: "message_body".into(),
                cast: Some(type_name("XML", None)),
                alias: Some("x".into()),
                assign_to: None,
            },
            SelectItem {
                column: "conversation_group_id".into(),
                cast: None,
                alias: Some("group".into()),
                assign_to: None
            },
        ])
    );
    let Statement::Receive(r) =
        one("WAITFOR (RECEIVE @h = conversation_handle FROM q WHERE conversation_handle = @h)")
    else {
        panic!()
    };
    assert_eq!(r.waitfor, Some(WaitFor { timeout_ms: None }));
    assert_eq!(r.filter, Some(ReceiveFilter::Conversation(var("h"))));
    assert_error(
        "RECEIVE @a = status, priority FROM q",
        1,
        22,
        "a RECEIVE that assigns to variables must assign every item (@var = …)",
    );
    assert_error(
        "RECEIVE * FROM q WHERE status = 1",
        1,
        24,
        "RECEIVE … WHERE takes conversation_handle or conversation_group_id, found 'status'",
    );
    assert_error(
        "RECEIVE 'x' FROM q",
        1,
        9,
        "expected a column name in RECEIVE, found string 'x'",
    );
    assert_error(
        "WAITFOR (RECEIVE * FROM q), TIMEOUT -2",
        1,
        37,
        "TIMEOUT must be between -1 and 2147483647, found -2",
    );
    assert_error(
        "WAITFOR (RECEIVE * FROM q",
        1,
        26,
        "expected ')' after the RECEIVE inside WAITFOR ( … ), found end of input",
    );
}

#[test]
fn get_conversation_group_move_end_and_timer() {
    assert_eq!(
        one("WAITFOR (GET CONVERSATION GROUP @g FROM q), TIMEOUT @wait"),
        Statement::GetConversationGroup(GetConversationGroup {
            waitfor: Some(WaitFor {
                timeout_ms: Some(var("wait"))
            }),
            group_variable: "g".into(),
            queue: ObjectName::bare("q"),
        })
    );
    assert_eq!(
        one("GET CONVERSATION GROUP @g FROM q"),
        Statement::GetConversationGroup(GetConversationGroup {
            waitfor: None,
            group_variable: "g".into(),
            queue: ObjectName::bare("q"),
        })
    );
    assert_eq!(
        one(&format!("MOVE CONVERSATION @h TO '{GUID}'")),
        Statement::MoveConversation(MoveConversation {
            conversation: var("h"),
            group: Operand::Literal(ConversationGroupId(guid())),
        })
    );
    assert_eq!(
        one("END CONVERSATION @h WITH ERROR = 31472 DESCRIPTION = 'Order not found'"),
        Statement::EndConversation(EndConversation {
            conversation: var("h"),
            with: Some(EndWith::Error {
                code: Operand::Literal(31472),
                description: Operand::Literal("Order not found".into()),
            }),
        })
    );
    assert_eq!(
        one("END CONVERSATION @h WITH ERROR = @code DESCRIPTION = @text"),
        Statement::EndConversation(EndConversation {
            conversation: var("h"),
            with: Some(EndWith::Error {
                code: var("code"),
                description: var("text"),
            }),
        })
    );
    assert_eq!(
        one("END CONVERSATION @h WITH CLEANUP"),
        Statement::EndConversation(EndConversation {
            conversation: var("h"),
            with: Some(EndWith::Cleanup),
        })
    );
    assert_eq!(
        one("BEGIN CONVERSATION TIMER (@h) TIMEOUT = 120"),
        Statement::BeginConversationTimer(BeginConversationTimer {
            conversation: var("h"),
            timeout_secs: Operand::Literal(120),
        })
    );
    assert_error(
        "END CONVERSATION @h WITH ERROR = 0 DESCRIPTION = 'x'",
        1,
        34,
        "ERROR must be between 1 and 2147483647, found 0",
    );
    assert_error(
        "MOVE CONVERSATION @h TO 'nope'",
        1,
        25,
        "expected a conversation group id after MOVE CONVERSATION … TO, found 'nope' which is not a GUID",
    );
}

#[test]
fn transactions_in_every_spelling() {
    assert_eq!(
        parse(
            "BEGIN TRAN; begin transaction; COMMIT; commit tran; COMMIT TRANSACTION; ROLLBACK; rollback TRAN; ROLLBACK TRANSACTION"
        ),
        vec![
            Statement::BeginTransaction,
            Statement::BeginTransaction,
            Statement::Commit,
            Statement::Commit,
            Statement::Commit,
            Statement::Rollback,
            Statement::Rollback,
            Statement::Rollback,
        ]
    );
}

#[test]
fn declare_set_and_select_values() {
    assert_eq!(
        one(
            "DECLARE @h UNIQUEIDENTIFIER, @x AS nvarchar(100) = N'hi', @n decimal(10, 2), @b varbinary(max) = 0x"
        ),
        Statement::Declare(Declare {
            variables: vec![
                VariableDecl {
                    name: "h".into(),
                    data_type: type_name("UNIQUEIDENTIFIER", None),
                    initial: None
                },
                VariableDecl {
                    name: "x".into(),
                    data_type: type_name("NVARCHAR", Some(TypeLength::Count(100))),
                    initial: Some(nstr("hi")),
                },
                VariableDecl {
                    name: "n".into(),
                    data_type: TypeName {
                        name: "DECIMAL".into(),
                        length: Some(TypeLength::Count(10)),
                        scale: Some(2)
                    },
                    initial: None,
                },
                VariableDecl {
                    name: "b".into(),
                    data_type: type_name("VARBINARY", Some(TypeLength::Max)),
                    initial: Some(Expr::Literal(Literal::Binary(vec![]))),
                },
            ]
        })
    );
    assert_eq!(
        one("SET @n = -42"),
        Statement::Set(Set {
            variable: "n".into(),
            value: Expr::Literal(Literal::Integer(-42))
        })
    );
    assert_eq!(
        one("SET @n = NULL"),
        Statement::Set(Set {
            variable: "n".into(),
            value: Expr::Literal(Literal::Null)
        })
    );
    assert_eq!(
        one("SELECT @a, CAST(@b AS NVARCHAR(MAX)) AS b, 'x' [label]"),
        Statement::SelectValues(SelectValues {
            items: vec![
                ValueItem::Show {
                    value: Expr::Variable("a".into()),
                    alias: None
                },
                ValueItem::Show {
                    value: Expr::Cast {
                        expr: Box::new(Expr::Variable("b".into())),
                        to: type_name("NVARCHAR", Some(TypeLength::Max)),
                    },
                    alias: Some("b".into()),
                },
                ValueItem::Show {
                    value: Expr::Literal(Literal::String {
                        value: "x".into(),
                        national: false
                    }),
                    alias: Some("label".into()),
                },
            ]
        })
    );
    assert_error(
        "DECLARE @t TABLE (id INT)",
        1,
        12,
        "DECLARE … TABLE is not supported by Herald",
    );
    assert_error(
        "SET NOCOUNT ON",
        1,
        1,
        "SET NOCOUNT is not supported by Herald",
    );
    assert_error(
        "SELECT @a = 1, @b",
        1,
        16,
        "a SELECT that assigns to variables must assign every item (@var = …)",
    );
    assert_error(
        "SELECT status",
        1,
        8,
        "expected a variable or a literal in SELECT without FROM, found column 'status'",
    );
}

#[test]
fn select_from_catalog_views_and_queues() {
    for view in CatalogView::ALL {
        assert_eq!(
            one(&format!("SELECT * FROM SYS.{}", view.name().to_uppercase())),
            Statement::Select(Select {
                columns: Columns::All,
                from: SelectSource::View(view),
                filter: vec![],
            })
        );
    }
    assert_eq!(
        one(
            "SELECT conversation_handle, state_desc FROM sys.conversation_endpoints WHERE far_service = N'//shop/Order' AND is_initiator = 1 AND conversation_group_id = @g"
        ),
        Statement::Select(Select {
            columns: Columns::List(vec![
                SelectItem {
                    column: "conversation_handle".into(),
                    cast: None,
                    alias: None,
                    assign_to: None
                },
                SelectItem {
                    column: "state_desc".into(),
                    cast: None,
                    alias: None,
                    assign_to: None
                },
            ]),
            from: SelectSource::View(CatalogView::ConversationEndpoints),
            filter: vec![
                ColumnEquals {
                    column: "far_service".into(),
                    value: nstr("//shop/Order")
                },
                ColumnEquals {
                    column: "is_initiator".into(),
                    value: Expr::Literal(Literal::Integer(1))
                },
                ColumnEquals {
                    column: "conversation_group_id".into(),
                    value: Expr::Variable("g".into())
                },
            ],
        })
    );
    assert_eq!(
        one("SELECT @body = CAST(message_body AS NVARCHAR(MAX)) FROM dbo.OrderQueue"),
        Statement::Select(Select {
            columns: Columns::List(vec![SelectItem {
                column: "message_body".into(),
                cast: Some(type_name("NVARCHAR", Some(TypeLength::Max))),
                alias: None,
                assign_to: Some("body".into()),
            }]),
            from: SelectSource::Queue(ObjectName {
                database: None,
                schema: Some("dbo".into()),
                name: "OrderQueue".into(),
            }),
            filter: vec![],
        })
    );
    assert_error(
        "SELECT * FROM sys.objects",
        1,
        15,
        "unknown catalog view sys.objects; Herald has sys.conversation_endpoints, sys.conversation_groups, sys.transmission_queue, sys.service_queues, sys.services, sys.service_contracts, sys.service_message_types, sys.routes, sys.conversation_priorities",
    );
    assert_error(
        "SELECT * FROM sys.routes WHERE name <> 'x'",
        1,
        37,
        "expected '=' (Herald's SELECT … WHERE takes only column = value joined by AND), found '<>'",
    );
    assert_error(
        "SELECT * FROM sys.routes WHERE name = 'x' OR name = 'y'",
        1,
        43,
        "OR in WHERE (Herald's SELECT … WHERE takes only column = value joined by AND) is not supported by Herald",
    );
    assert_error(
        "SELECT * FROM q WHERE a = CAST(1 AS INT)",
        1,
        27,
        "expected a literal or a variable after a =, found 'CAST'",
    );
}

#[test]
fn if_else_and_blocks() {
    let statements = parse(
        "IF @kind = N'//shop/Order' SEND ON CONVERSATION @h; ELSE IF @kind IS NOT NULL BEGIN END CONVERSATION @h; COMMIT END
         ELSE BEGIN ROLLBACK END
         IF @x <> 1 BEGIN SELECT @x END ELSE SET @x = 1
         IF @y != @z BEGIN BEGIN COMMIT END END
         BEGIN SELECT @y; END",
    );
    assert_eq!(statements.len(), 4, "{statements:#?}");
    let Statement::If(first) = &statements[0] else {
        panic!()
    };
    assert_eq!(first.then.len(), 1);
    assert!(matches!(&first.then[0], Statement::Send(_)));
    let otherwise = first.otherwise.as_ref().expect("an ELSE");
    let Statement::If(inner) = &otherwise[0] else {
        panic!()
    };
    assert_eq!(
        inner.condition,
        Condition::IsNull {
            value: Expr::Variable("kind".into()),
            negated: true,
        }
    );
    assert_eq!(
        inner.then,
        vec![
            Statement::EndConversation(EndConversation {
                conversation: var("h"),
                with: None
            }),
            Statement::Commit,
        ]
    );
    assert_eq!(inner.otherwise, Some(vec![Statement::Rollback]));
    let Statement::If(second) = &statements[1] else {
        panic!()
    };
    assert!(matches!(
        second.condition,
        Condition::Compare {
            op: CompareOp::NotEq,
            ..
        }
    ));
    let Statement::If(third) = &statements[2] else {
        panic!()
    };
    assert_eq!(
        third.then,
        vec![Statement::Block(sql::Block {
            statements: vec![Statement::Commit]
        })]
    );
    assert_eq!(
        statements[3],
        Statement::Block(sql::Block {
            statements: vec![Statement::SelectValues(SelectValues {
                items: vec![ValueItem::Show {
                    value: Expr::Variable("y".into()),
                    alias: None
                }]
            })]
        })
    );
    assert_error(
        "IF @a = 1 AND @b = 2 COMMIT",
        1,
        11,
        "AND / OR in an IF condition is not supported by Herald",
    );
    assert_error(
        "BEGIN END",
        1,
        7,
        "a BEGIN … END block needs at least one statement",
    );
    assert_error(
        "BEGIN COMMIT",
        1,
        13,
        "expected END to close the BEGIN at line 1, column 1, found end of input",
    );
    assert_error("COMMIT END", 1, 8, "END without a matching BEGIN");
    assert_error("ELSE COMMIT", 1, 1, "ELSE without IF");
    assert_error("BEGIN COMMIT\nGO\nEND", 2, 1, "GO inside BEGIN … END or IF");
    assert_error(
        "IF @a = 1;",
        1,
        10,
        "expected a statement or BEGIN … END after the IF condition, found ';'",
    );
}

// ---- the script around the statements ----

#[test]
fn statements_may_follow_each_other_without_semicolons() {
    assert_eq!(
        parse("BEGIN TRAN SEND ON CONVERSATION @h (0x01) COMMIT"),
        vec![
            Statement::BeginTransaction,
            Statement::Send(Send {
                conversations: vec![var("h")],
                message_type: None,
                body: Some(Expr::Literal(Literal::Binary(vec![1]))),
            }),
            Statement::Commit,
        ]
    );
    // A statement keyword is not read as a bare alias.
    assert_eq!(parse("SELECT @x SEND ON CONVERSATION @h").len(), 2);
    assert_error(
        "CREATE QUEUE q WITH STATUS = ON junk",
        1,
        33,
        "expected ';' or a new statement after CREATE QUEUE, found 'junk'",
    );
}

#[test]
fn keywords_are_case_insensitive() {
    let upper = parse(
        "CREATE QUEUE Q WITH STATUS = ON; BEGIN DIALOG CONVERSATION @H FROM SERVICE S TO SERVICE 'T' ON CONTRACT C WITH ENCRYPTION = OFF",
    );
    let lower = parse(
        "create queue Q with status = on; begin dialog conversation @H from service S to service 'T' on contract C with encryption = off",
    );
    let mixed = parse(
        "cReAtE QuEuE Q WiTh StAtUs = oN; BeGiN DiAlOg CoNvErSaTiOn @H fRoM SeRvIcE S To SeRvIcE 'T' oN CoNtRaCt C WiTh EnCrYpTiOn = OfF",
    );
    assert_eq!(upper, lower);
    assert_eq!(upper, mixed);
    // Names keep their case.
    assert_ne!(parse("CREATE QUEUE q"), parse("CREATE QUEUE Q"));
}

#[test]
fn comments_and_go_separators() {
    let statements = parse(
        "/* setup /* nested */ */\nCREATE QUEUE q -- the queue\n\tGO\n-- between\ngo -- again\nCOMMIT /* trailing */",
    );
    assert_eq!(statements.len(), 2);
    assert_eq!(statements[1], Statement::Commit);
    assert_error(
        "COMMIT\nGO 2",
        2,
        1,
        "GO must stand alone on its line (GO with a count is not supported by Herald)",
    );
    assert_error("COMMIT /* never closed", 1, 8, "unterminated /* comment");
    assert_eq!(parse("  ;;\n GO\n;\n").len(), 0);
    assert_eq!(parse("").len(), 0);
}

#[test]
fn errors_name_the_exact_line_and_column() {
    assert_error(
        "BEGIN DIALOG @h FROM SERVIC s",
        1,
        22,
        "expected SERVICE after FROM, found 'SERVIC'",
    );
    assert_error(
        "CREATE QUEUE q;\nCREATE SERVIC s ON QUEUE q",
        2,
        8,
        "expected MESSAGE TYPE, CONTRACT, QUEUE, SERVICE, ROUTE or BROKER PRIORITY after CREATE, found 'SERVIC'",
    );
    assert_error(
        "COMMIT\n\n   SEND ON CONVERSATION @h MESSAGE TYPE [m] ('unterminated",
        3,
        46,
        "unterminated string literal",
    );
    // Columns count characters, not bytes.
    assert_error(
        "SELECT N'é' AS ü, 'x' AS ;",
        1,
        26,
        "expected an alias after AS, found ';'",
    );
    assert_error(
        "CREATE QUEUE WITH STATUS = ON",
        1,
        14,
        "expected a queue name after CREATE QUEUE, found keyword 'WITH' (write [WITH] to use it as a name)",
    );
    assert_error(
        "SEND ON CONVERSATION @h (1.5)",
        1,
        26,
        "decimal numbers are not supported by Herald (integers only)",
    );
    assert_error(
        "frobnicate",
        1,
        1,
        "expected a statement, found 'frobnicate'",
    );
    assert_error(
        "SELECT @x =",
        1,
        12,
        "expected a column or a value in SELECT's list, found end of input",
    );
}

#[test]
fn unsupported_statements_are_named() {
    for (text, column, what) in [
        (
            "CREATE ENDPOINT BrokerEndpoint STATE = STARTED",
            8,
            "CREATE ENDPOINT",
        ),
        (
            "CREATE REMOTE SERVICE BINDING b TO SERVICE 's' WITH USER = u",
            8,
            "CREATE REMOTE SERVICE BINDING",
        ),
        (
            "ALTER MESSAGE TYPE m VALIDATION = NONE",
            7,
            "ALTER MESSAGE TYPE",
        ),
        ("ALTER SERVICE s ON QUEUE q", 7, "ALTER SERVICE"),
        (
            "ALTER BROKER PRIORITY p FOR CONVERSATION SET (PRIORITY_LEVEL = 1)",
            7,
            "ALTER BROKER PRIORITY",
        ),
        ("DROP ENDPOINT e", 6, "DROP ENDPOINT"),
        (
            "CREATE MASTER KEY ENCRYPTION BY PASSWORD = 'x'",
            8,
            "CREATE MASTER KEY",
        ),
        ("CREATE TABLE t (id INT)", 8, "CREATE TABLE"),
        ("WAITFOR DELAY '00:00:01'", 1, "WAITFOR DELAY"),
        ("BEGIN TRY COMMIT END TRY", 1, "BEGIN TRY"),
        ("INSERT INTO t VALUES (1)", 1, "INSERT"),
        ("EXEC dbo.p", 1, "EXEC"),
        ("PRINT 'x'", 1, "PRINT"),
        ("WHILE 1 = 1 COMMIT", 1, "WHILE"),
    ] {
        assert_error(
            text,
            1,
            column,
            &format!("{what} is not supported by Herald"),
        );
    }
}

// ---- limits, each at its edge ----

#[test]
fn script_bytes_max_at_the_edge() {
    let fill = |total: usize| {
        let head = "COMMIT --";
        format!("{head}{}", "x".repeat(total - head.len()))
    };
    let at_max = fill(sql::SCRIPT_BYTES_MAX);
    assert_eq!(at_max.len(), sql::SCRIPT_BYTES_MAX);
    assert_eq!(
        sql::parse(&at_max).expect("a script of exactly the maximum"),
        vec![Statement::Commit]
    );
    let over = fill(sql::SCRIPT_BYTES_MAX + 1);
    assert_error(
        &over,
        1,
        1,
        &format!(
            "script of {} bytes is longer than the maximum of {} bytes",
            sql::SCRIPT_BYTES_MAX + 1,
            sql::SCRIPT_BYTES_MAX
        ),
    );
}

#[test]
fn statements_max_at_the_edge_counting_nested_statements() {
    let max = sql::STATEMENTS_MAX;
    assert_eq!(
        sql::parse(&"COMMIT;".repeat(max))
            .expect("the maximum")
            .len(),
        max
    );
    let over = "COMMIT;".repeat(max + 1);
    let column = u32::try_from("COMMIT;".len() * max + 1).expect("small");
    assert_error(
        &over,
        1,
        column,
        &format!("script has more than {max} statements"),
    );
    // A block and the statements in it all count.
    let nested = format!("BEGIN {}END", "COMMIT;".repeat(max - 1));
    assert_eq!(sql::parse(&nested).expect("the maximum, nested").len(), 1);
    let nested = format!("BEGIN {}END", "COMMIT;".repeat(max));
    assert!(syntax_error(&nested).2.contains("more than"));
}

#[test]
fn list_items_max_at_the_edge_across_statements() {
    let max = sql::LIST_ITEMS_MAX;
    let send = |handles: usize| format!("SEND ON CONVERSATION ({})", vec!["@h"; handles].join(","));
    let Statement::Send(s) = one(&send(max)) else {
        panic!()
    };
    assert_eq!(s.conversations.len(), max);
    let message = format!(
        "script has more than {max} list items (conversation handles, columns, variables, contracts, message types, conditions)"
    );
    let column =
        u32::try_from("SEND ON CONVERSATION (".len() + "@h,".len() * max + 1).expect("small");
    assert_error(&send(max + 1), 1, column, &message);
    // A single handle without parentheses counts too (it prints with them).
    let singles = "SEND ON CONVERSATION @h;".repeat(max - 1);
    let at_max = format!("{singles}SEND ON CONVERSATION @h");
    assert_eq!(
        sql::parse(&at_max)
            .expect("the maximum, one handle each")
            .len(),
        max
    );
    sql::fuzz_parse(at_max.as_bytes());
    assert_eq!(
        syntax_error(&format!("{singles}SEND ON CONVERSATION (@h, @h)")).2,
        message
    );
    // The budget is the script's, not one statement's.
    let half = send(max / 2);
    sql::parse(&format!("{half};{half}")).expect("the maximum in two statements");
    assert_eq!(
        syntax_error(&format!("{half};{half};DECLARE @x INT")).2,
        message
    );
}

#[test]
fn name_bytes_max_at_the_edge_for_every_kind_of_name() {
    let max = sql::NAME_BYTES_MAX;
    let long = "n".repeat(max);
    let too_long = "n".repeat(max + 1);
    // Two-byte characters: the limit is in bytes.
    let wide = "é".repeat(max / 2);
    let too_wide = format!("{wide}n");
    let message =
        |len: usize| format!("name of {len} bytes is longer than the maximum of {max} bytes");
    for name in [&long, &wide] {
        let Statement::CreateQueue(q) = one(&format!("CREATE QUEUE {name}")) else {
            panic!()
        };
        assert_eq!(&q.name.name, name);
        one(&format!("CREATE SERVICE [{name}] ON QUEUE q"));
        one(&format!("CREATE SERVICE '{name}' ON QUEUE q"));
        one(&format!("DECLARE @{name} INT"));
    }
    for name in [&too_long, &too_wide] {
        let len = name.len();
        assert_error(&format!("CREATE QUEUE {name}"), 1, 14, &message(len));
        assert_error(
            &format!("CREATE SERVICE [{name}] ON QUEUE q"),
            1,
            16,
            &message(len),
        );
        assert_error(
            &format!("CREATE SERVICE \"{name}\" ON QUEUE q"),
            1,
            16,
            &message(len),
        );
        assert_error(
            &format!("CREATE SERVICE '{name}' ON QUEUE q"),
            1,
            16,
            &message(len),
        );
        assert_error(&format!("DECLARE @{name} INT"), 1, 9, &message(len));
        assert_error(
            &format!("BEGIN DIALOG @h FROM SERVICE s TO SERVICE N'{name}'"),
            1,
            43,
            &message(len),
        );
    }
    // String literals that are values, not names, are not bounded by it.
    one(&format!("SET @x = '{too_long}'"));
}

#[test]
fn expression_depth_max_at_the_edge() {
    let max = sql::EXPRESSION_DEPTH_MAX;
    let nested = |depth: usize| {
        // `'x'` is depth 1; each CAST around it adds one.
        let casts = depth - 1;
        format!(
            "SET @x = {}'x'{}",
            "CAST(".repeat(casts),
            " AS XML)".repeat(casts)
        )
    };
    one(&nested(max));
    let over = nested(max + 1);
    let column = u32::try_from("SET @x = ".len() + "CAST(".len() * max + 1).expect("small");
    assert_error(
        &over,
        1,
        column,
        &format!("expression nested more than {max} deep"),
    );
    let parens = |depth: usize| {
        format!(
            "SEND ON CONVERSATION @h ({}@b{})",
            "(".repeat(depth - 1),
            ")".repeat(depth - 1)
        )
    };
    one(&parens(max));
    assert!(
        syntax_error(&parens(max + 1))
            .2
            .contains("nested more than")
    );
    // Hostile depth is an error, not a stack overflow.
    assert!(
        syntax_error(&parens(1_000_000))
            .2
            .contains("nested more than")
    );
}

#[test]
fn block_depth_max_at_the_edge() {
    let max = sql::BLOCK_DEPTH_MAX;
    let blocks = |depth: usize| format!("{}COMMIT{}", "BEGIN ".repeat(depth), " END".repeat(depth));
    one(&blocks(max));
    let column = u32::try_from("BEGIN ".len() * max + 1).expect("small");
    assert_error(
        &blocks(max + 1),
        1,
        column,
        &format!("IF and BEGIN … END are nested more than {max} deep"),
    );
    let ifs = |depth: usize| format!("{}COMMIT", "IF @a = 1 ".repeat(depth));
    one(&ifs(max));
    assert!(syntax_error(&ifs(max + 1)).2.contains("nested more than"));
    assert!(
        syntax_error(&blocks(200_000))
            .2
            .contains("nested more than")
    );
    assert!(syntax_error(&ifs(200_000)).2.contains("nested more than"));
}

#[test]
fn integer_literals_at_the_edges_of_their_fields() {
    one("SET @x = -9223372036854775808");
    one("SET @x = 9223372036854775807");
    assert_error(
        "SET @x = 9223372036854775808",
        1,
        10,
        "integer 9223372036854775808 is out of range for a value for @x",
    );
    one("WAITFOR (RECEIVE * FROM q), TIMEOUT 2147483647");
    assert_error(
        "WAITFOR (RECEIVE * FROM q), TIMEOUT 2147483648",
        1,
        37,
        "TIMEOUT must be between -1 and 2147483647, found 2147483648",
    );
    one("CREATE QUEUE q WITH ACTIVATION (MAX_QUEUE_READERS = 0)");
    one("CREATE BROKER PRIORITY p FOR CONVERSATION SET (PRIORITY_LEVEL = 1)");
    assert_error(
        "CREATE BROKER PRIORITY p FOR CONVERSATION SET (PRIORITY_LEVEL = 11)",
        1,
        65,
        "PRIORITY_LEVEL must be between 1 and 10, found 11",
    );
}

#[test]
fn display_prints_canonical_tsql() {
    let statement = one(
        "begin dialog @h from service s to service 't' on contract c with lifetime = 60, encryption = off",
    );
    assert_eq!(
        statement.to_string(),
        "BEGIN DIALOG CONVERSATION @h FROM SERVICE [s] TO SERVICE N't' ON CONTRACT [c] WITH LIFETIME = 60, ENCRYPTION = OFF"
    );
    assert_eq!(
        one("create queue dbo.[odd]]name] with status = off on default").to_string(),
        "CREATE QUEUE [dbo].[odd]]name] WITH STATUS = OFF ON [DEFAULT]"
    );
    assert_eq!(
        one("if @a = 'it''s' commit").to_string(),
        "IF @a = 'it''s' BEGIN\nCOMMIT TRANSACTION;\nEND"
    );
    assert_eq!(
        one("waitfor (receive top(5) cast(message_body as xml) as b from q), timeout 10")
            .to_string(),
        "WAITFOR (RECEIVE TOP (5) CAST([message_body] AS XML) AS [b] FROM [q]), TIMEOUT 10"
    );
}

fn uuid_of(text: &str) -> uuid::Uuid {
    uuid::Uuid::parse_str(text).expect("a GUID")
}

// ---- properties ----

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Arbitrary text never panics the parser; what parses prints and parses back.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            sql::fuzz_parse(text.as_bytes());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            sql::fuzz_parse(&bytes);
        }

        /// Token soup from the grammar's vocabulary reaches deep into the parser.
        #[test]
        fn token_soup_never_panics_and_round_trips(
            words in proptest::collection::vec(proptest::sample::select(VOCABULARY), 0..40)
        ) {
            sql::fuzz_parse(words.join(" ").as_bytes());
        }

        /// Printing any tree gives a script that parses back to the same tree.
        #[test]
        fn display_round_trips(statements in proptest::collection::vec(statement(), 1..4)) {
            let script = sql::render(&statements);
            match sql::parse(&script) {
                Ok(again) => prop_assert_eq!(again, statements, "script:\n{}", script),
                Err(e) => prop_assert!(false, "{} in:\n{}", e, script),
            }
        }
    }

    const VOCABULARY: &[&str] = &[
        "CREATE",
        "ALTER",
        "DROP",
        "MESSAGE",
        "TYPE",
        "CONTRACT",
        "QUEUE",
        "SERVICE",
        "ROUTE",
        "BROKER",
        "PRIORITY",
        "VALIDATION",
        "=",
        "NONE",
        "JSON",
        "(",
        ")",
        ",",
        ";",
        "\nGO\n",
        "SENT",
        "BY",
        "INITIATOR",
        "TARGET",
        "ANY",
        "WITH",
        "STATUS",
        "ON",
        "OFF",
        "RETENTION",
        "ACTIVATION",
        "DROP",
        "POISON_MESSAGE_HANDLING",
        "BEGIN",
        "END",
        "DIALOG",
        "CONVERSATION",
        "FROM",
        "TO",
        "SEND",
        "RECEIVE",
        "TOP",
        "WAITFOR",
        "TIMEOUT",
        "GET",
        "GROUP",
        "MOVE",
        "TIMER",
        "COMMIT",
        "ROLLBACK",
        "TRAN",
        "DECLARE",
        "SET",
        "SELECT",
        "IF",
        "ELSE",
        "IS",
        "NOT",
        "NULL",
        "CAST",
        "AS",
        "CONVERT",
        "NVARCHAR",
        "MAX",
        "*",
        "WHERE",
        "AND",
        "sys.routes",
        "conversation_handle",
        "message_body",
        "@h",
        "@g",
        "q",
        "[//x]",
        "'//y'",
        "N'z'",
        "0x0A",
        "1",
        "-1",
        "10",
        "ADDRESS",
        "'LOCAL'",
        "LIFETIME",
        "ERROR",
        "DESCRIPTION",
        "CLEANUP",
        "INTO",
        "<>",
        ".",
        "dbo",
        "USE",
        "PRIORITY_LEVEL",
        "DEFAULT",
        "FOR",
        "CONTRACT_NAME",
        "'6f9619ff-8b86-d011-b42d-00c04fc964ff'",
    ];

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z_/\\]\\['\" é.-]{1,12}"
    }

    fn variable() -> impl Strategy<Value = String> {
        "[a-zA-Z_][a-zA-Z0-9_]{0,8}"
    }

    fn object_name() -> impl Strategy<Value = ObjectName> {
        (
            name(),
            proptest::option::of((name(), proptest::option::of(name()))),
        )
            .prop_map(|(name, qualifiers)| match qualifiers {
                None => ObjectName::bare(name),
                Some((schema, database)) => ObjectName {
                    database,
                    schema: Some(schema),
                    name,
                },
            })
    }

    fn handle() -> impl Strategy<Value = Operand<ConversationHandle>> {
        prop_oneof![
            variable().prop_map(Operand::Variable),
            any::<u128>().prop_map(|h| Operand::Literal(ConversationHandle(h))),
        ]
    }

    fn group() -> impl Strategy<Value = Operand<ConversationGroupId>> {
        prop_oneof![
            variable().prop_map(Operand::Variable),
            any::<u128>().prop_map(|g| Operand::Literal(ConversationGroupId(g))),
        ]
    }

    fn int(min: i64, max: i64) -> impl Strategy<Value = Operand<i64>> {
        prop_oneof![
            variable().prop_map(Operand::Variable),
            (min..=max).prop_map(Operand::Literal),
        ]
    }

    fn type_name() -> impl Strategy<Value = TypeName> {
        (
            proptest::sample::select(
                &[
                    "UNIQUEIDENTIFIER",
                    "NVARCHAR",
                    "VARBINARY",
                    "INT",
                    "SYSNAME",
                    "DECIMAL",
                ][..],
            ),
            prop_oneof![
                Just((None, None)),
                Just((Some(TypeLength::Max), None)),
                (1u32..=i32::MAX as u32, proptest::option::of(0u32..=38))
                    .prop_map(|(n, scale)| (Some(TypeLength::Count(n)), scale)),
            ],
        )
            .prop_map(|(name, (length, scale))| TypeName {
                name: name.into(),
                length,
                scale,
            })
    }

    /// A literal or a variable.
    fn leaf() -> impl Strategy<Value = Expr> {
        prop_oneof![
            ("(?s).{0,16}", any::<bool>())
                .prop_map(|(value, national)| Expr::Literal(Literal::String { value, national })),
            proptest::collection::vec(any::<u8>(), 0..6)
                .prop_map(|b| Expr::Literal(Literal::Binary(b))),
            any::<i64>().prop_map(|n| Expr::Literal(Literal::Integer(n))),
            Just(Expr::Literal(Literal::Null)),
            variable().prop_map(Expr::Variable),
        ]
    }

    fn expr() -> impl Strategy<Value = Expr> {
        leaf().prop_recursive(4, 8, 1, |inner| {
            (inner, type_name()).prop_map(|(expr, to)| Expr::Cast {
                expr: Box::new(expr),
                to,
            })
        })
    }

    fn on_off() -> impl Strategy<Value = Option<bool>> {
        proptest::option::of(any::<bool>())
    }

    fn route_address(local: bool) -> impl Strategy<Value = RouteAddress> {
        let network = (any::<bool>(), "[a-z0-9.-]{1,12}|\\[::[0-9]\\]", 1u16..).prop_map(
            |(tcp, host, port)| RouteAddress::Network {
                scheme: if tcp {
                    AddressScheme::Tcp
                } else {
                    AddressScheme::Quic
                },
                host,
                port,
            },
        );
        if local {
            prop_oneof![Just(RouteAddress::Local), network].boxed()
        } else {
            network.boxed()
        }
    }

    fn queue_settings() -> impl Strategy<Value = sql::QueueSettings> {
        let activation = prop_oneof![
            Just(Activation::Drop),
            (
                on_off(),
                proptest::option::of(object_name()),
                proptest::option::of(0u16..=32767),
                proptest::option::of(prop_oneof![
                    Just(ExecuteAs::Caller),
                    Just(ExecuteAs::Owner),
                    name().prop_map(ExecuteAs::User)
                ])
            )
                .prop_map(|(status, procedure_name, max_queue_readers, execute_as)| {
                    ActivationSettings {
                        status,
                        procedure_name,
                        max_queue_readers,
                        execute_as,
                    }
                })
                .prop_filter("at least one option", |a| *a
                    != ActivationSettings::default())
                .prop_map(Activation::Set),
        ];
        (
            on_off(),
            on_off(),
            proptest::option::of(activation),
            on_off(),
        )
            .prop_map(|(status, retention, activation, poison_message_handling)| {
                sql::QueueSettings {
                    status,
                    retention,
                    activation,
                    poison_message_handling,
                }
            })
    }

    fn route_settings() -> impl Strategy<Value = RouteSettings> {
        (
            proptest::option::of(name()),
            proptest::option::of(any::<u128>().prop_map(uuid::Uuid::from_u128)),
            proptest::option::of(0u32..=i32::MAX as u32),
            proptest::option::of(route_address(true)),
            proptest::option::of(route_address(false)),
        )
            .prop_map(
                |(service_name, broker_instance, lifetime_secs, address, mirror_address)| {
                    RouteSettings {
                        service_name,
                        broker_instance,
                        lifetime_secs,
                        address,
                        mirror_address,
                    }
                },
            )
    }

    fn columns() -> impl Strategy<Value = Columns> {
        prop_oneof![
            Just(Columns::All),
            (
                any::<bool>(),
                proptest::collection::vec(
                    (
                        name(),
                        proptest::option::of(type_name()),
                        proptest::option::of(name()),
                        variable()
                    ),
                    1..4
                )
            )
                .prop_map(|(assigning, items)| Columns::List(
                    items
                        .into_iter()
                        .map(|(column, cast, alias, variable)| SelectItem {
                            column,
                            cast,
                            alias: if assigning { None } else { alias },
                            assign_to: assigning.then_some(variable),
                        })
                        .collect()
                )),
        ]
    }

    fn name_or_any() -> impl Strategy<Value = Option<NameOrAny>> {
        proptest::option::of(prop_oneof![
            Just(NameOrAny::Any),
            name().prop_map(NameOrAny::Name)
        ])
    }

    fn simple_statement() -> impl Strategy<Value = Statement> {
        prop_oneof![
            (
                name(),
                proptest::option::of(name()),
                proptest::option::of(proptest::sample::select(
                    &[
                        Validation::None,
                        Validation::Empty,
                        Validation::WellFormedXml,
                        Validation::Utf8,
                        Validation::Json,
                    ][..]
                ))
            )
                .prop_map(|(name, authorization, validation)| {
                    Statement::CreateMessageType(CreateMessageType {
                        name,
                        authorization,
                        validation,
                    })
                }),
            (
                name(),
                proptest::option::of(name()),
                proptest::collection::vec(
                    (
                        name(),
                        proptest::sample::select(
                            &[SentBy::Initiator, SentBy::Target, SentBy::Any][..]
                        )
                    ),
                    1..4
                )
            )
                .prop_map(|(name, authorization, messages)| Statement::CreateContract(
                    CreateContract {
                        name,
                        authorization,
                        messages: messages
                            .into_iter()
                            .map(|(message_type, sent_by)| ContractMessage {
                                message_type,
                                sent_by
                            })
                            .collect(),
                    }
                )),
            (
                object_name(),
                queue_settings(),
                proptest::option::of(name())
            )
                .prop_filter("no ACTIVATION (DROP) in CREATE", |(_, s, _)| s.activation
                    != Some(Activation::Drop))
                .prop_map(
                    |(name, settings, filegroup)| Statement::CreateQueue(CreateQueue {
                        name,
                        settings,
                        filegroup
                    })
                ),
            (object_name(), queue_settings())
                .prop_filter("at least one option", |(_, s)| !s.is_empty())
                .prop_map(|(name, settings)| Statement::AlterQueue(AlterQueue { name, settings })),
            (
                name(),
                proptest::option::of(name()),
                object_name(),
                proptest::collection::vec(name(), 0..3)
            )
                .prop_map(|(name, authorization, queue, contracts)| {
                    Statement::CreateService(CreateService {
                        name,
                        authorization,
                        queue,
                        contracts,
                    })
                }),
            (name(), proptest::option::of(name()), route_settings())
                .prop_filter("an address", |(_, _, s)| s.address.is_some())
                .prop_map(
                    |(name, authorization, settings)| Statement::CreateRoute(CreateRoute {
                        name,
                        authorization,
                        settings
                    })
                ),
            (name(), route_settings())
                .prop_filter("at least one option", |(_, s)| !s.is_empty())
                .prop_map(|(name, settings)| Statement::AlterRoute(sql::AlterRoute {
                    name,
                    settings
                })),
            (
                name(),
                name_or_any(),
                name_or_any(),
                name_or_any(),
                proptest::option::of(prop_oneof![
                    Just(PriorityLevel::Default),
                    (1u8..=10).prop_map(PriorityLevel::Level)
                ])
            )
                .prop_filter("at least one setting", |(_, c, l, r, p)| c.is_some()
                    || l.is_some()
                    || r.is_some()
                    || p.is_some())
                .prop_map(
                    |(
                        name,
                        contract_name,
                        local_service_name,
                        remote_service_name,
                        priority_level,
                    )| {
                        Statement::CreateBrokerPriority(CreateBrokerPriority {
                            name,
                            contract_name,
                            local_service_name,
                            remote_service_name,
                            priority_level,
                        })
                    }
                ),
            (
                proptest::sample::select(
                    &[
                        ObjectKind::MessageType,
                        ObjectKind::Contract,
                        ObjectKind::Queue,
                        ObjectKind::Service,
                        ObjectKind::Route,
                        ObjectKind::BrokerPriority
                    ][..]
                ),
                object_name()
            )
                .prop_map(|(kind, name)| Statement::Drop(DropObject {
                    kind,
                    name: if kind == ObjectKind::Queue {
                        name
                    } else {
                        ObjectName::bare(name.name)
                    },
                })),
            (
                variable(),
                name(),
                name(),
                proptest::option::of(prop_oneof![
                    Just(BrokerInstance::CurrentDatabase),
                    any::<u128>().prop_map(|id| BrokerInstance::Id(uuid::Uuid::from_u128(id)))
                ]),
                proptest::option::of(name()),
                proptest::option::of(prop_oneof![
                    handle().prop_map(Related::Conversation),
                    group().prop_map(Related::Group)
                ]),
                proptest::option::of(int(0, i32::MAX.into())),
                on_off()
            )
                .prop_map(
                    |(
                        handle_variable,
                        from_service,
                        to_service,
                        broker_instance,
                        contract,
                        related,
                        lifetime_secs,
                        encryption,
                    )| {
                        Statement::BeginDialog(BeginDialog {
                            handle_variable,
                            from_service,
                            to_service,
                            broker_instance,
                            contract,
                            related,
                            lifetime_secs,
                            encryption,
                        })
                    }
                ),
            (
                proptest::collection::vec(handle(), 1..4),
                proptest::option::of(name()),
                proptest::option::of(expr())
            )
                .prop_map(|(conversations, message_type, body)| Statement::Send(
                    Send {
                        conversations,
                        message_type,
                        body
                    }
                )),
            (
                proptest::option::of(proptest::option::of(int(-1, i32::MAX.into()))),
                proptest::option::of(int(0, i32::MAX.into())),
                columns(),
                object_name(),
                proptest::option::of(variable()),
                proptest::option::of(prop_oneof![
                    handle().prop_map(ReceiveFilter::Conversation),
                    group().prop_map(ReceiveFilter::Group)
                ])
            )
                .prop_map(|(waitfor, top, columns, queue, into, filter)| {
                    let assigning =
                        matches!(&columns, Columns::List(items) if items[0].assign_to.is_some());
                    Statement::Receive(Receive {
                        waitfor: waitfor.map(|timeout_ms| WaitFor { timeout_ms }),
                        top,
                        columns,
                        queue,
                        into: if assigning { None } else { into },
                        filter,
                    })
                }),
            (
                proptest::option::of(proptest::option::of(int(-1, i32::MAX.into()))),
                variable(),
                object_name()
            )
                .prop_map(|(waitfor, group_variable, queue)| {
                    Statement::GetConversationGroup(GetConversationGroup {
                        waitfor: waitfor.map(|timeout_ms| WaitFor { timeout_ms }),
                        group_variable,
                        queue,
                    })
                }),
            (handle(), group()).prop_map(|(conversation, group)| Statement::MoveConversation(
                MoveConversation {
                    conversation,
                    group
                }
            )),
            (
                handle(),
                proptest::option::of(prop_oneof![
                    Just(EndWith::Cleanup),
                    (
                        int(1, i32::MAX.into()),
                        prop_oneof![
                            variable().prop_map(Operand::Variable),
                            "(?s).{0,20}".prop_map(Operand::Literal)
                        ]
                    )
                        .prop_map(|(code, description)| EndWith::Error { code, description }),
                ])
            )
                .prop_map(|(conversation, with)| Statement::EndConversation(
                    EndConversation { conversation, with }
                )),
            (handle(), int(0, i32::MAX.into())).prop_map(|(conversation, timeout_secs)| {
                Statement::BeginConversationTimer(BeginConversationTimer {
                    conversation,
                    timeout_secs,
                })
            }),
            Just(Statement::BeginTransaction),
            Just(Statement::Commit),
            Just(Statement::Rollback),
            proptest::collection::vec(
                (variable(), type_name(), proptest::option::of(expr())),
                1..4
            )
            .prop_map(|v| Statement::Declare(Declare {
                variables: v
                    .into_iter()
                    .map(|(name, data_type, initial)| VariableDecl {
                        name,
                        data_type,
                        initial
                    })
                    .collect(),
            })),
            (variable(), expr())
                .prop_map(|(variable, value)| Statement::Set(Set { variable, value })),
            (
                any::<bool>(),
                proptest::collection::vec((variable(), expr(), proptest::option::of(name())), 1..4)
            )
                .prop_map(|(assigning, items)| Statement::SelectValues(SelectValues {
                    items: items
                        .into_iter()
                        .map(|(variable, value, alias)| if assigning {
                            ValueItem::Assign { variable, value }
                        } else {
                            ValueItem::Show { value, alias }
                        })
                        .collect(),
                })),
            (
                columns(),
                prop_oneof![
                    proptest::sample::select(&CatalogView::ALL[..]).prop_map(SelectSource::View),
                    object_name()
                        .prop_filter("not the sys schema", |n| !(n.database.is_none()
                            && n.schema
                                .as_deref()
                                .is_some_and(|s| s.eq_ignore_ascii_case("sys"))))
                        .prop_map(SelectSource::Queue),
                ],
                proptest::collection::vec((name(), leaf()), 0..3)
            )
                .prop_map(|(columns, from, filter)| Statement::Select(Select {
                    columns,
                    from,
                    filter: filter
                        .into_iter()
                        .map(|(column, value)| ColumnEquals { column, value })
                        .collect(),
                })),
            name().prop_map(|database| Statement::Use(sql::Use { database })),
        ]
    }

    fn condition() -> impl Strategy<Value = Condition> {
        prop_oneof![
            (expr(), any::<bool>(), expr()).prop_map(|(left, eq, right)| Condition::Compare {
                left,
                op: if eq { CompareOp::Eq } else { CompareOp::NotEq },
                right,
            }),
            (expr(), any::<bool>())
                .prop_map(|(value, negated)| Condition::IsNull { value, negated }),
        ]
    }

    fn statement() -> impl Strategy<Value = Statement> {
        simple_statement().prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                (
                    condition(),
                    proptest::collection::vec(inner.clone(), 1..3),
                    proptest::option::of(proptest::collection::vec(inner.clone(), 1..3))
                )
                    .prop_map(|(condition, then, otherwise)| Statement::If(If {
                        condition,
                        then,
                        otherwise
                    })),
                proptest::collection::vec(inner, 1..3)
                    .prop_map(|statements| Statement::Block(sql::Block { statements })),
            ]
        })
    }
}
