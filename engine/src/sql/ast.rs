//! The typed syntax tree of Herald's T-SQL: one [`Statement`] per statement of a script, each a
//! struct with named fields. The tree keeps what a statement *means*, not how it was spelled:
//! keywords' case, optional noise words (`CONVERSATION` after `BEGIN DIALOG`, `TRAN` after
//! `COMMIT`), brackets versus quotes around a name, and parentheses around an expression are
//! not recorded. So `Display` (in `display.rs`) prints one canonical spelling, and printing then
//! parsing gives back an equal tree.
//!
//! Invariants the parser keeps (the executor may rely on them):
//! - every name is non-empty and at most [`NAME_BYTES_MAX`](super::NAME_BYTES_MAX) bytes;
//! - variable names are stored without their leading `@` (`@@ROWCOUNT` is stored as `@ROWCOUNT`);
//! - an option list given by the user holds each option at most once, and a `WITH` holds at
//!   least one option;
//! - integer literals are within the range the field documents (variables are checked by the
//!   executor, when their value is known);
//! - a column list holds either only `@var = column` assignments or none.

use crate::catalog::{QueueOptions, SentBy, Validation};
use crate::ids::{ConversationGroupId, ConversationHandle};

/// One statement of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    CreateMessageType(CreateMessageType),
    CreateContract(CreateContract),
    CreateQueue(CreateQueue),
    AlterQueue(AlterQueue),
    CreateService(CreateService),
    CreateRoute(CreateRoute),
    AlterRoute(AlterRoute),
    CreateBrokerPriority(CreateBrokerPriority),
    /// `DROP MESSAGE TYPE | CONTRACT | QUEUE | SERVICE | ROUTE | BROKER PRIORITY name`.
    Drop(DropObject),
    BeginDialog(BeginDialog),
    Send(Send),
    Receive(Receive),
    GetConversationGroup(GetConversationGroup),
    MoveConversation(MoveConversation),
    EndConversation(EndConversation),
    BeginConversationTimer(BeginConversationTimer),
    /// `BEGIN TRAN[SACTION]`.
    BeginTransaction,
    /// `COMMIT [TRAN[SACTION]]`.
    Commit,
    /// `ROLLBACK [TRAN[SACTION]]`.
    Rollback,
    Declare(Declare),
    Set(Set),
    /// `SELECT` without `FROM`: shows or assigns values.
    SelectValues(SelectValues),
    /// `SELECT … FROM` a catalog view or a queue.
    Select(Select),
    /// `USE database`: accepted so tutorial scripts parse; the executor decides what it means.
    Use(Use),
    If(If),
    /// `BEGIN … END`: a block of at least one statement.
    Block(Block),
}

impl Statement {
    /// The statement's name as T-SQL spells it (`CREATE QUEUE`, `WAITFOR RECEIVE`), for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Statement::CreateMessageType(_) => "CREATE MESSAGE TYPE",
            Statement::CreateContract(_) => "CREATE CONTRACT",
            Statement::CreateQueue(_) => "CREATE QUEUE",
            Statement::AlterQueue(_) => "ALTER QUEUE",
            Statement::CreateService(_) => "CREATE SERVICE",
            Statement::CreateRoute(_) => "CREATE ROUTE",
            Statement::AlterRoute(_) => "ALTER ROUTE",
            Statement::CreateBrokerPriority(_) => "CREATE BROKER PRIORITY",
            Statement::Drop(drop) => drop.kind.drop_statement(),
            Statement::BeginDialog(_) => "BEGIN DIALOG",
            Statement::Send(_) => "SEND",
            Statement::Receive(r) if r.waitfor.is_some() => "WAITFOR RECEIVE",
            Statement::Receive(_) => "RECEIVE",
            Statement::GetConversationGroup(g) if g.waitfor.is_some() => {
                "WAITFOR GET CONVERSATION GROUP"
            }
            Statement::GetConversationGroup(_) => "GET CONVERSATION GROUP",
            Statement::MoveConversation(_) => "MOVE CONVERSATION",
            Statement::EndConversation(_) => "END CONVERSATION",
            Statement::BeginConversationTimer(_) => "BEGIN CONVERSATION TIMER",
            Statement::BeginTransaction => "BEGIN TRANSACTION",
            Statement::Commit => "COMMIT",
            Statement::Rollback => "ROLLBACK",
            Statement::Declare(_) => "DECLARE",
            Statement::Set(_) => "SET",
            Statement::SelectValues(_) | Statement::Select(_) => "SELECT",
            Statement::Use(_) => "USE",
            Statement::If(_) => "IF",
            Statement::Block(_) => "BEGIN … END",
        }
    }
}

/// Every [`Statement::kind`], so that a kind that travelled as text (the client protocol) can be
/// had back as the `&'static str` [`StatementResult`](super::StatementResult) holds.
pub const STATEMENT_KINDS: &[&str] = &[
    "CREATE MESSAGE TYPE",
    "CREATE CONTRACT",
    "CREATE QUEUE",
    "ALTER QUEUE",
    "CREATE SERVICE",
    "CREATE ROUTE",
    "ALTER ROUTE",
    "CREATE BROKER PRIORITY",
    "DROP MESSAGE TYPE",
    "DROP CONTRACT",
    "DROP QUEUE",
    "DROP SERVICE",
    "DROP ROUTE",
    "DROP BROKER PRIORITY",
    "BEGIN DIALOG",
    "SEND",
    "WAITFOR RECEIVE",
    "RECEIVE",
    "WAITFOR GET CONVERSATION GROUP",
    "GET CONVERSATION GROUP",
    "MOVE CONVERSATION",
    "END CONVERSATION",
    "BEGIN CONVERSATION TIMER",
    "BEGIN TRANSACTION",
    "COMMIT",
    "ROLLBACK",
    "DECLARE",
    "SET",
    "SELECT",
    "USE",
    "IF",
    "BEGIN … END",
];

/// The [`STATEMENT_KINDS`] entry equal to `kind`, if there is one.
pub fn statement_kind(kind: &str) -> Option<&'static str> {
    STATEMENT_KINDS.iter().copied().find(|k| *k == kind)
}

/// A statement of a script with the position of its first token (1-based, as in
/// [`Error::Syntax`](crate::Error::Syntax)), so that an executor can say where a statement that
/// parsed but failed to run is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub line: u32,
    pub column: u32,
    pub statement: Statement,
}

/// A value that is either written in the script or held by a variable (`@name`, stored without
/// the `@`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand<T> {
    Literal(T),
    Variable(String),
}

/// A schema-scoped object name: `name`, `schema.name` or `database.schema.name`. Queues and
/// activation procedures are schema-scoped; Service Broker's other objects are not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    pub database: Option<String>,
    pub schema: Option<String>,
    pub name: String,
}

impl ObjectName {
    /// An unqualified name.
    pub fn bare(name: impl Into<String>) -> ObjectName {
        ObjectName {
            database: None,
            schema: None,
            name: name.into(),
        }
    }
}

/// `CREATE MESSAGE TYPE name [AUTHORIZATION owner] [VALIDATION = …]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateMessageType {
    pub name: String,
    pub authorization: Option<String>,
    /// `None` when the statement gives no VALIDATION (Service Broker's default is NONE).
    pub validation: Option<Validation>,
}

/// `CREATE CONTRACT name [AUTHORIZATION owner] (type SENT BY side, …)`; at least one message type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateContract {
    pub name: String,
    pub authorization: Option<String>,
    pub messages: Vec<ContractMessage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContractMessage {
    /// `DEFAULT` names the built-in message type.
    pub message_type: String,
    pub sent_by: SentBy,
}

/// `CREATE QUEUE name [WITH options] [ON filegroup]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateQueue {
    pub name: ObjectName,
    pub settings: QueueSettings,
    /// `ON filegroup`; `DEFAULT` for `ON [DEFAULT]`. Herald has no filegroups: recorded only.
    pub filegroup: Option<String>,
}

/// `ALTER QUEUE name WITH options` (at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterQueue {
    pub name: ObjectName,
    pub settings: QueueSettings,
}

/// The options of CREATE / ALTER QUEUE; `None` = not given (CREATE: the default; ALTER: unchanged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSettings {
    pub status: Option<bool>,
    pub retention: Option<bool>,
    pub activation: Option<Activation>,
    pub poison_message_handling: Option<bool>,
}

impl QueueSettings {
    /// True when no option is given.
    pub fn is_empty(&self) -> bool {
        *self == QueueSettings::default()
    }

    /// `base` with the options given here applied: what CREATE QUEUE (from
    /// `QueueOptions::default()`) or ALTER QUEUE (from the queue's options) leaves. Activation
    /// has no engine counterpart and is the executor's to accept or reject.
    pub fn apply_to(&self, base: QueueOptions) -> QueueOptions {
        QueueOptions {
            enabled: self.status.unwrap_or(base.enabled),
            retention: self.retention.unwrap_or(base.retention),
            poison_message_handling: self
                .poison_message_handling
                .unwrap_or(base.poison_message_handling),
        }
    }
}

/// `ACTIVATION ( … )` of a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activation {
    /// `ACTIVATION (DROP)` (ALTER QUEUE only).
    Drop,
    Set(ActivationSettings),
}

/// The options inside `ACTIVATION ( … )`; at least one is given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActivationSettings {
    pub status: Option<bool>,
    pub procedure_name: Option<ObjectName>,
    /// 0..=32767, as in T-SQL.
    pub max_queue_readers: Option<u16>,
    pub execute_as: Option<ExecuteAs>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecuteAs {
    /// `EXECUTE AS SELF`
    Caller,
    /// `EXECUTE AS OWNER`
    Owner,
    /// `EXECUTE AS 'user'`
    User(String),
}

/// `CREATE SERVICE name [AUTHORIZATION owner] ON QUEUE queue [(contract, …)]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateService {
    pub name: String,
    pub authorization: Option<String>,
    pub queue: ObjectName,
    /// Contracts accepted as a target; empty = initiate-only (no list, as T-SQL has no `()`).
    pub contracts: Vec<String>,
}

/// `CREATE ROUTE name [AUTHORIZATION owner] WITH …`; `settings.address` is always given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRoute {
    pub name: String,
    pub authorization: Option<String>,
    pub settings: RouteSettings,
}

/// `ALTER ROUTE name WITH …` (at least one option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterRoute {
    pub name: String,
    pub settings: RouteSettings,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSettings {
    /// `SERVICE_NAME = 'svc'`: compared byte for byte with a dialog's TO SERVICE.
    pub service_name: Option<String>,
    /// `BROKER_INSTANCE = 'guid'`.
    pub broker_instance: Option<uuid::Uuid>,
    /// `LIFETIME = seconds`, 0..=2^31−1.
    pub lifetime_secs: Option<u32>,
    pub address: Option<RouteAddress>,
    /// `MIRROR_ADDRESS`: always a network address.
    pub mirror_address: Option<RouteAddress>,
}

impl RouteSettings {
    pub fn is_empty(&self) -> bool {
        *self == RouteSettings::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteAddress {
    /// `'LOCAL'`: the service is on this broker.
    Local,
    /// `'TCP://host:port'` or `'quic://host:port'` (the scheme's case is not kept).
    Network {
        scheme: AddressScheme,
        host: String,
        port: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressScheme {
    Tcp,
    Quic,
}

/// `CREATE BROKER PRIORITY name FOR CONVERSATION SET (…)`; at least one setting. `None` = not
/// given, which Service Broker treats as ANY (and PRIORITY_LEVEL as DEFAULT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateBrokerPriority {
    pub name: String,
    pub contract_name: Option<NameOrAny>,
    pub local_service_name: Option<NameOrAny>,
    pub remote_service_name: Option<NameOrAny>,
    pub priority_level: Option<PriorityLevel>,
}

/// A name or the wildcard `ANY` (bare; `[ANY]` is the name "ANY").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameOrAny {
    Any,
    Name(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriorityLevel {
    /// 1 (lowest) ..= 10 (highest).
    Level(u8),
    /// `DEFAULT`, which is 5.
    Default,
}

/// `DROP <kind> name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropObject {
    pub kind: ObjectKind,
    /// Only a queue's name may be schema-qualified.
    pub name: ObjectName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    MessageType,
    Contract,
    Queue,
    Service,
    Route,
    BrokerPriority,
}

impl ObjectKind {
    /// How T-SQL names the kind (`MESSAGE TYPE`).
    pub fn keyword(self) -> &'static str {
        match self {
            ObjectKind::MessageType => "MESSAGE TYPE",
            ObjectKind::Contract => "CONTRACT",
            ObjectKind::Queue => "QUEUE",
            ObjectKind::Service => "SERVICE",
            ObjectKind::Route => "ROUTE",
            ObjectKind::BrokerPriority => "BROKER PRIORITY",
        }
    }

    fn drop_statement(self) -> &'static str {
        match self {
            ObjectKind::MessageType => "DROP MESSAGE TYPE",
            ObjectKind::Contract => "DROP CONTRACT",
            ObjectKind::Queue => "DROP QUEUE",
            ObjectKind::Service => "DROP SERVICE",
            ObjectKind::Route => "DROP ROUTE",
            ObjectKind::BrokerPriority => "DROP BROKER PRIORITY",
        }
    }
}

/// `BEGIN DIALOG [CONVERSATION] @handle FROM SERVICE s TO SERVICE 's' [, broker] [ON CONTRACT c]
/// [WITH …]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginDialog {
    /// The variable that receives the new handle.
    pub handle_variable: String,
    pub from_service: String,
    /// A string in T-SQL, compared byte for byte.
    pub to_service: String,
    pub broker_instance: Option<BrokerInstance>,
    /// `None`: the DEFAULT contract.
    pub contract: Option<String>,
    pub related: Option<Related>,
    /// `LIFETIME = seconds`; a literal is 0..=2^31−1.
    pub lifetime_secs: Option<Operand<i64>>,
    /// `ENCRYPTION = ON | OFF`.
    pub encryption: Option<bool>,
}

/// The optional target broker of BEGIN DIALOG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerInstance {
    Id(uuid::Uuid),
    /// `'CURRENT DATABASE'`.
    CurrentDatabase,
}

/// `RELATED_CONVERSATION = h` or `RELATED_CONVERSATION_GROUP = g`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Related {
    Conversation(Operand<ConversationHandle>),
    Group(Operand<ConversationGroupId>),
}

/// `SEND ON CONVERSATION h | (h, …) [MESSAGE TYPE t] [(body)]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    /// At least one.
    pub conversations: Vec<Operand<ConversationHandle>>,
    /// `None`: the DEFAULT message type.
    pub message_type: Option<String>,
    /// `None`: an empty body.
    pub body: Option<Expr>,
}

/// An expression: what SEND sends, what SET and DECLARE assign, what SELECT shows. Herald has no
/// operators: a literal, a variable or a conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Literal(Literal),
    Variable(String),
    /// `CAST(expr AS type)` or `CONVERT(type, expr)`.
    Cast {
        expr: Box<Expr>,
        to: TypeName,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Literal {
    /// `'…'` or, with `national`, `N'…'`.
    String {
        value: String,
        national: bool,
    },
    /// `0x…`.
    Binary(Vec<u8>),
    Integer(i64),
    Null,
}

/// A data type: `UNIQUEIDENTIFIER`, `NVARCHAR(100)`, `VARBINARY(MAX)`, `DECIMAL(10, 2)`. The
/// name is stored in upper case (type names are case-insensitive) and not checked: the
/// executor knows which types it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeName {
    pub name: String,
    pub length: Option<TypeLength>,
    /// The second argument (`DECIMAL(10, 2)`); only with a numeric length.
    pub scale: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeLength {
    /// 1..=2^31−1.
    Count(u32),
    Max,
}

/// `WAITFOR ( … ) [, TIMEOUT ms]` around RECEIVE or GET CONVERSATION GROUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitFor {
    /// Milliseconds; a literal is −1 (forever) ..= 2^31−1. `None`: forever.
    pub timeout_ms: Option<Operand<i64>>,
}

/// `[WAITFOR (] RECEIVE [TOP (n)] columns FROM queue [INTO @t] [WHERE …] [)] [, TIMEOUT ms]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receive {
    pub waitfor: Option<WaitFor>,
    /// A literal is 0..=2^31−1.
    pub top: Option<Operand<i64>>,
    pub columns: Columns,
    pub queue: ObjectName,
    /// `INTO @table_variable`.
    pub into: Option<String>,
    pub filter: Option<ReceiveFilter>,
}

/// `WHERE conversation_handle = h` or `WHERE conversation_group_id = g`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiveFilter {
    Conversation(Operand<ConversationHandle>),
    Group(Operand<ConversationGroupId>),
}

/// `*` or a list of at least one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Columns {
    All,
    List(Vec<SelectItem>),
}

/// One item of a RECEIVE or SELECT … FROM column list: `column`, `CAST(column AS type)`, either
/// `[AS] alias`, or `@var = column` (T-SQL assigns from the last row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectItem {
    pub column: String,
    pub cast: Option<TypeName>,
    pub alias: Option<String>,
    /// The variable assigned (never together with `alias`).
    pub assign_to: Option<String>,
}

/// `[WAITFOR (] GET CONVERSATION GROUP @g FROM queue [)] [, TIMEOUT ms]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetConversationGroup {
    pub waitfor: Option<WaitFor>,
    /// The variable that receives the group id.
    pub group_variable: String,
    pub queue: ObjectName,
}

/// `MOVE CONVERSATION h TO g`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveConversation {
    pub conversation: Operand<ConversationHandle>,
    pub group: Operand<ConversationGroupId>,
}

/// `END CONVERSATION h [WITH ERROR = n DESCRIPTION = 'text' | WITH CLEANUP]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndConversation {
    pub conversation: Operand<ConversationHandle>,
    pub with: Option<EndWith>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndWith {
    /// A literal code is 1..=2^31−1 (negative codes are the broker's).
    Error {
        code: Operand<i64>,
        description: Operand<String>,
    },
    Cleanup,
}

/// `BEGIN CONVERSATION TIMER (h) TIMEOUT = seconds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginConversationTimer {
    pub conversation: Operand<ConversationHandle>,
    /// A literal is 0..=2^31−1.
    pub timeout_secs: Operand<i64>,
}

/// `DECLARE @a type [= value], …`; at least one variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declare {
    pub variables: Vec<VariableDecl>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariableDecl {
    pub name: String,
    pub data_type: TypeName,
    pub initial: Option<Expr>,
}

/// `SET @var = value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub variable: String,
    pub value: Expr,
}

/// `SELECT value [AS alias], …` or `SELECT @var = value, …` (all items of one kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectValues {
    pub items: Vec<ValueItem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueItem {
    Show { value: Expr, alias: Option<String> },
    Assign { variable: String, value: Expr },
}

/// `SELECT columns FROM source [WHERE column = value [AND …]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Select {
    pub columns: Columns,
    pub from: SelectSource,
    /// Equalities joined by AND; empty = no WHERE.
    pub filter: Vec<ColumnEquals>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelectSource {
    View(CatalogView),
    /// A queue, read without locking or consuming (`SELECT * FROM OrderQueue`).
    Queue(ObjectName),
}

/// The catalog views Herald answers (`sys.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogView {
    ConversationEndpoints,
    ConversationGroups,
    TransmissionQueue,
    ServiceQueues,
    Services,
    ServiceContracts,
    ServiceMessageTypes,
    Routes,
    ConversationPriorities,
}

impl CatalogView {
    pub const ALL: [CatalogView; 9] = [
        CatalogView::ConversationEndpoints,
        CatalogView::ConversationGroups,
        CatalogView::TransmissionQueue,
        CatalogView::ServiceQueues,
        CatalogView::Services,
        CatalogView::ServiceContracts,
        CatalogView::ServiceMessageTypes,
        CatalogView::Routes,
        CatalogView::ConversationPriorities,
    ];

    /// The view's name in the `sys` schema.
    pub fn name(self) -> &'static str {
        match self {
            CatalogView::ConversationEndpoints => "conversation_endpoints",
            CatalogView::ConversationGroups => "conversation_groups",
            CatalogView::TransmissionQueue => "transmission_queue",
            CatalogView::ServiceQueues => "service_queues",
            CatalogView::Services => "services",
            CatalogView::ServiceContracts => "service_contracts",
            CatalogView::ServiceMessageTypes => "service_message_types",
            CatalogView::Routes => "routes",
            CatalogView::ConversationPriorities => "conversation_priorities",
        }
    }
}

/// `column = literal | @var`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnEquals {
    pub column: String,
    /// A literal or a variable (never a cast).
    pub value: Expr,
}

/// `USE database`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Use {
    pub database: String,
}

/// `IF condition statement-or-block [ELSE statement-or-block]`. A single statement and a
/// `BEGIN … END` block around it mean the same, so both branches are stored as lists of at
/// least one statement (and printed as blocks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct If {
    pub condition: Condition,
    pub then: Vec<Statement>,
    pub otherwise: Option<Vec<Statement>>,
}

/// Herald's conditions: one comparison, or a NULL test. No AND / OR / NOT / EXISTS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Compare {
        left: Expr,
        op: CompareOp,
        right: Expr,
    },
    IsNull {
        value: Expr,
        negated: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    /// `=`
    Eq,
    /// `<>` or `!=`
    NotEq,
}

/// `BEGIN statement … END`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// At least one.
    pub statements: Vec<Statement>,
}
