//! The T-SQL executor: a [`Session`] runs parsed scripts against a [`Broker`], statement by
//! statement, the way a SQL Server connection runs a batch. It owns the session's state — its
//! variables, its explicit transaction (`BEGIN TRAN` … `COMMIT` / `ROLLBACK`), the database
//! named by `USE` — and maps each statement onto the engine's [`Transaction`] API.
//!
//! Invariants it keeps:
//! - nothing of a script runs unless the whole script parses and its declarations are valid;
//! - outside an explicit transaction each statement that touches the broker runs in its own
//!   transaction, committed when the statement succeeds and rolled back when it fails, so a
//!   failed statement leaves nothing behind;
//! - inside an explicit transaction a failed statement changed nothing (engine operations check
//!   everything before recording), and the transaction stays open — except when a RECEIVE took
//!   messages and then could not return them (a conversion or a limit failed on its rows): the
//!   transaction is then rolled back, so that no message is consumed without being seen;
//! - a variable assigned from a statement's result is assigned only once the statement (and, in
//!   autocommit, its commit) has succeeded;
//! - every result set, variable and value is bounded ([`RESULT_ROWS_MAX`],
//!   [`RESULT_BYTES_MAX`], [`VARIABLES_MAX`], [`VALUE_BYTES_MAX`], [`TRANSACTION_NESTING_MAX`]).

use std::collections::HashMap;
use std::time::Duration;

use super::ast::{
    self, Activation, BrokerInstance, CatalogView, Columns, CompareOp, Condition, EndWith, Expr,
    Literal, NameOrAny, ObjectKind, ObjectName, Operand, PriorityLevel, ReceiveFilter, Related,
    SelectItem, SelectSource, Statement, TypeLength, TypeName, ValueItem,
};
use crate::broker::Broker;
use crate::catalog::{
    BrokerPriority, Catalog, PRIORITY_LEVEL_DEFAULT, QueueOptions, Route, RouteAddress, Validation,
};
use crate::error::{Error, Result};
use crate::ids::{BrokerInstanceId, ConversationGroupId, ConversationHandle};
use crate::state::Endpoint;
use crate::system;
use crate::transaction::{DialogOptions, MESSAGE_BODY_BYTES_MAX, Message, Transaction};

/// Most rows one statement returns. A SELECT whose result would be longer fails
/// ([`Error::Limit`]); a RECEIVE takes at most this many messages (a TOP above it, or no TOP,
/// is capped: the other messages stay queued for the next RECEIVE).
pub const RESULT_ROWS_MAX: usize = 100_000;
/// Most bytes of values the result sets of one `execute` call hold together (texts and binaries
/// by their length, other values as 16 bytes): with message bodies up to 8 MiB, rows alone
/// would not bound the memory of a reply.
pub const RESULT_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Most variables a session holds.
pub const VARIABLES_MAX: usize = 4096;
/// Largest text or binary value, in bytes: the largest message body.
pub const VALUE_BYTES_MAX: usize = MESSAGE_BODY_BYTES_MAX;
/// Deepest nesting of BEGIN TRANSACTION (`@@TRANCOUNT`).
pub const TRANSACTION_NESTING_MAX: u32 = 1000;

/// A T-SQL value: what a variable holds, what a result row shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// INT, BIGINT, SMALLINT, TINYINT, BIT.
    Int(i64),
    /// NVARCHAR, VARCHAR, NCHAR, CHAR, SYSNAME, XML (held as UTF-8).
    Text(String),
    /// VARBINARY, BINARY (message bodies).
    Binary(Vec<u8>),
    /// UNIQUEIDENTIFIER (handles, group ids, broker instances).
    Guid(u128),
}

impl Value {
    pub fn is_null(&self) -> bool {
        *self == Value::Null
    }

    /// The text, if this is a text value.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(text) => Some(text),
            _ => None,
        }
    }

    /// The integer, if this is an integer value.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }

    /// The bytes, if this is a binary value.
    pub fn as_binary(&self) -> Option<&[u8]> {
        match self {
            Value::Binary(bytes) => Some(bytes),
            _ => None,
        }
    }

    /// The id, if this is a UNIQUEIDENTIFIER.
    pub fn as_guid(&self) -> Option<u128> {
        match self {
            Value::Guid(id) => Some(*id),
            _ => None,
        }
    }

    /// Bytes this value counts for against [`RESULT_BYTES_MAX`].
    fn cost_bytes(&self) -> usize {
        match self {
            Value::Text(text) => text.len().max(16),
            Value::Binary(bytes) => bytes.len().max(16),
            _ => 16,
        }
    }
}

impl std::fmt::Display for Value {
    /// T-SQL's spelling: NULL, 42, the text, 0x0A0B, an upper-case GUID.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Int(n) => write!(f, "{n}"),
            Value::Text(text) => f.write_str(text),
            Value::Binary(bytes) => {
                f.write_str("0x")?;
                bytes.iter().try_for_each(|b| write!(f, "{b:02X}"))
            }
            Value::Guid(id) => f.write_str(&guid_text(*id)),
        }
    }
}

/// The rows a statement returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl ResultSet {
    /// The values of column `name` (case-insensitive), top to bottom; `None` if there is no such
    /// column.
    pub fn column(&self, name: &str) -> Option<Vec<&Value>> {
        let index = self
            .columns
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name))?;
        Some(self.rows.iter().map(|row| &row[index]).collect())
    }
}

/// What one executed statement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementResult {
    /// The statement's kind ([`Statement::kind`]).
    pub statement: &'static str,
    /// Rows returned, received or assigned from (RECEIVE, SELECT); `None` for other statements.
    pub rows_affected: Option<u64>,
    /// The rows, for a RECEIVE or SELECT that returns them (not one that assigns variables).
    pub result: Option<ResultSet>,
}

/// What running a script did: the results of the statements that ran, and the error that
/// stopped it, if one did.
#[derive(Debug)]
pub struct ScriptOutcome {
    pub results: Vec<StatementResult>,
    pub error: Option<Error>,
}

/// A T-SQL session on a broker (one client connection): variables, an explicit transaction,
/// the current database. Dropping it rolls back an open transaction.
#[derive(Debug)]
pub struct Session<'b> {
    broker: &'b Broker,
    /// By lower-cased name (T-SQL names are case-insensitive under the default collation).
    variables: HashMap<String, Variable>,
    transaction: Option<Transaction<'b>>,
    /// `@@TRANCOUNT`.
    transaction_count: u32,
    /// Queue options and routes as this session's open transaction left them: the engine's
    /// transaction does not show its private catalog, and ALTER needs the current settings.
    pending_queues: HashMap<String, Option<QueueOptions>>,
    pending_routes: HashMap<String, Option<Route>>,
    database: Option<String>,
    /// `@@ROWCOUNT`.
    row_count: u64,
    /// Bytes of result values returned by the current `execute` call.
    result_bytes: usize,
    /// Set while a RECEIVE holds taken messages it has not returned yet.
    doomed: bool,
    /// Given to every transaction this session begins (`Session::set_interrupt`).
    interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

#[derive(Debug, Clone)]
struct Variable {
    data_type: SqlType,
    value: Value,
}

/// The statement that failed (possibly inside an IF or BEGIN … END) and why.
struct Failed {
    statement: &'static str,
    error: Error,
}

impl<'b> Session<'b> {
    pub fn new(broker: &'b Broker) -> Session<'b> {
        Session {
            broker,
            variables: HashMap::new(),
            transaction: None,
            transaction_count: 0,
            pending_queues: HashMap::new(),
            pending_routes: HashMap::new(),
            database: None,
            row_count: 0,
            result_bytes: 0,
            doomed: false,
            interrupt: None,
        }
    }

    /// Every transaction this session begins from now on ends its WAITFOR waits with
    /// [`Error::Interrupted`] once `flag` is set and the broker's waiters are woken
    /// (`Broker::wake_waiters`; see `Transaction::interrupt_waits_on`). A server sets it so
    /// that a session whose client is gone, or a node shutting down, does not wait forever.
    pub fn set_interrupt(&mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        if let Some(tx) = &mut self.transaction {
            tx.interrupt_waits_on(flag.clone());
        }
        self.interrupt = Some(flag);
    }

    /// Runs `f` on the engine's transaction API the way a statement runs: in the session's
    /// explicit transaction if one is open (which stays open whatever `f` returns), else in a
    /// transaction of its own, committed if `f` succeeds and rolled back if it fails. This is
    /// how a client protocol's structured operations (begin dialog, send, receive, …) share the
    /// session's transaction with its T-SQL.
    pub fn with_transaction<R>(
        &mut self,
        f: impl FnOnce(&mut Transaction<'b>) -> Result<R>,
    ) -> Result<R> {
        self.in_transaction(|_, tx| f(tx))
    }

    /// Rolls back the explicit transaction, if one is open (`@@TRANCOUNT` becomes 0), as
    /// ROLLBACK does.
    pub fn rollback(&mut self) {
        if let Some(tx) = self.transaction.take() {
            tx.rollback();
        }
        self.transaction_count = 0;
        self.end_transaction();
    }

    fn begin_transaction(&self) -> Transaction<'b> {
        let mut tx = self.broker.begin();
        if let Some(flag) = &self.interrupt {
            tx.interrupt_waits_on(flag.clone());
        }
        tx
    }

    /// Parses `script` and runs it; the results of its statements, or the first error (a
    /// syntax error runs nothing; a runtime error is [`Error::Statement`], after the statements
    /// before it ran). See [`Session::execute_script`] to keep the results of those too.
    pub fn execute(&mut self, script: &str) -> Result<Vec<StatementResult>> {
        let outcome = self.execute_script(script);
        match outcome.error {
            Some(error) => Err(error),
            None => Ok(outcome.results),
        }
    }

    /// As [`Session::execute`], returning the results of the statements that ran even when a
    /// later one failed.
    pub fn execute_script(&mut self, script: &str) -> ScriptOutcome {
        let mut results = Vec::new();
        let located = match super::parse_located(script) {
            Ok(located) => located,
            Err(error) => {
                return ScriptOutcome {
                    results,
                    error: Some(error),
                };
            }
        };
        if let Err(error) = self.declare_all(&located) {
            return ScriptOutcome {
                results,
                error: Some(error),
            };
        }
        self.result_bytes = 0;
        for statement in &located {
            if let Err(failed) = self.run(&statement.statement, &mut results) {
                let error = Error::Statement {
                    line: statement.line,
                    column: statement.column,
                    statement: failed.statement,
                    source: Box::new(failed.error),
                };
                return ScriptOutcome {
                    results,
                    error: Some(error),
                };
            }
        }
        ScriptOutcome {
            results,
            error: None,
        }
    }

    /// The value of variable `name` (without `@`; case-insensitive), if it is declared.
    pub fn variable(&self, name: &str) -> Option<&Value> {
        self.variables.get(&key(name)).map(|v| &v.value)
    }

    /// `@@TRANCOUNT`: 0 outside an explicit transaction.
    pub fn transaction_count(&self) -> u32 {
        self.transaction_count
    }

    /// The database the last `USE` named (Herald has one per broker: recorded, not checked).
    pub fn database(&self) -> Option<&str> {
        self.database.as_deref()
    }

    /// T-SQL declares a batch's variables when it compiles the batch, wherever the DECLARE is
    /// (inside an IF branch not taken included): declare them all, NULL, before anything runs.
    fn declare_all(&mut self, located: &[ast::Located]) -> Result<()> {
        let mut declared: HashMap<String, SqlType> = HashMap::new();
        for statement in located {
            let mut declarations = Vec::new();
            collect_declarations(&statement.statement, &mut declarations);
            for declaration in declarations {
                let at = |error| Error::Statement {
                    line: statement.line,
                    column: statement.column,
                    statement: "DECLARE",
                    source: Box::new(error),
                };
                if declaration.name.starts_with('@') {
                    return Err(at(Error::Sql(format!(
                        "@{} is a system function, not a variable to declare",
                        declaration.name
                    ))));
                }
                let data_type = SqlType::of(&declaration.data_type, 1).map_err(at)?;
                if declared.insert(key(&declaration.name), data_type).is_some() {
                    return Err(at(Error::Sql(format!(
                        "the variable name @{} has already been declared in this script",
                        declaration.name
                    ))));
                }
            }
        }
        let total = self.variables.len()
            + declared
                .keys()
                .filter(|k| !self.variables.contains_key(*k))
                .count();
        if total > VARIABLES_MAX {
            return Err(Error::Limit {
                what: "variables",
                len: total,
                max: VARIABLES_MAX,
            });
        }
        for (name, data_type) in declared {
            self.variables.insert(
                name,
                Variable {
                    data_type,
                    value: Value::Null,
                },
            );
        }
        Ok(())
    }

    fn run(
        &mut self,
        statement: &Statement,
        results: &mut Vec<StatementResult>,
    ) -> Result<(), Failed> {
        match statement {
            Statement::If(branch) => {
                let holds = self.condition(&branch.condition).map_err(|error| Failed {
                    statement: "IF",
                    error,
                })?;
                let statements = if holds {
                    Some(&branch.then)
                } else {
                    branch.otherwise.as_ref()
                };
                for inner in statements.into_iter().flatten() {
                    self.run(inner, results)?;
                }
                Ok(())
            }
            Statement::Block(block) => {
                for inner in &block.statements {
                    self.run(inner, results)?;
                }
                Ok(())
            }
            leaf => {
                // A session being ended (its client gone, the node shutting down) stops between
                // statements too, not only in a wait: a long script held the node's shutdown
                // until its last statement.
                if self
                    .interrupt
                    .as_ref()
                    .is_some_and(|flag| flag.load(std::sync::atomic::Ordering::SeqCst))
                {
                    return Err(Failed {
                        statement: leaf.kind(),
                        error: Error::Interrupted,
                    });
                }
                let result = self.leaf(leaf).map_err(|error| Failed {
                    statement: leaf.kind(),
                    error,
                })?;
                self.row_count = result.rows_affected.unwrap_or(0);
                results.push(result);
                Ok(())
            }
        }
    }

    fn leaf(&mut self, statement: &Statement) -> Result<StatementResult> {
        let kind = statement.kind();
        let done = |rows_affected: Option<u64>, result: Option<ResultSet>| StatementResult {
            statement: kind,
            rows_affected,
            result,
        };
        match statement {
            Statement::CreateMessageType(m) => {
                let validation = m.validation.unwrap_or(Validation::None);
                self.in_transaction(|_, tx| tx.create_message_type(&m.name, validation))?;
            }
            Statement::CreateContract(c) => {
                let messages: Vec<(&str, crate::SentBy)> = c
                    .messages
                    .iter()
                    .map(|m| (m.message_type.as_str(), m.sent_by))
                    .collect();
                self.in_transaction(|_, tx| tx.create_contract(&c.name, &messages))?;
            }
            Statement::CreateQueue(q) => {
                check_activation(q.settings.activation.as_ref())?;
                let name = queue_name(&q.name);
                let options = q.settings.apply_to(QueueOptions::default());
                self.in_transaction(|_, tx| tx.create_queue(&name, options))?;
                self.note_queue(name, Some(options));
            }
            Statement::AlterQueue(q) => {
                check_activation(q.settings.activation.as_ref())?;
                let name = queue_name(&q.name);
                let base = match self.pending_queues.get(&name) {
                    Some(Some(options)) => *options,
                    Some(None) => return Err(Error::UnknownQueue(name)),
                    None => self.broker.catalog().queue(&name)?.options,
                };
                let options = q.settings.apply_to(base);
                self.in_transaction(|_, tx| tx.alter_queue(&name, options))?;
                self.note_queue(name, Some(options));
            }
            Statement::CreateService(s) => {
                let queue = queue_name(&s.queue);
                let contracts: Vec<&str> = s.contracts.iter().map(String::as_str).collect();
                self.in_transaction(|_, tx| tx.create_service(&s.name, &queue, &contracts))?;
            }
            Statement::CreateRoute(r) => {
                let base = Route {
                    name: r.name.clone(),
                    service_name: None,
                    broker_instance: None,
                    address: RouteAddress::Local,
                    expires_at_ms: None,
                };
                let route = self.route_with(base, &r.settings)?;
                self.in_transaction(|_, tx| tx.create_route(route.clone()))?;
                self.note_route(route);
            }
            Statement::AlterRoute(r) => {
                let base = match self.pending_routes.get(&r.name) {
                    Some(Some(route)) => route.clone(),
                    Some(None) => return Err(Error::UnknownRoute(r.name.clone())),
                    None => self
                        .broker
                        .catalog()
                        .routes
                        .get(&r.name)
                        .cloned()
                        .ok_or_else(|| Error::UnknownRoute(r.name.clone()))?,
                };
                let route = self.route_with(base, &r.settings)?;
                self.in_transaction(|_, tx| tx.alter_route(route.clone()))?;
                self.note_route(route);
            }
            Statement::CreateBrokerPriority(p) => {
                let name_or_any = |n: &Option<NameOrAny>| match n {
                    Some(NameOrAny::Name(name)) => Some(name.clone()),
                    Some(NameOrAny::Any) | None => None,
                };
                let priority = BrokerPriority {
                    name: p.name.clone(),
                    contract: name_or_any(&p.contract_name),
                    local_service: name_or_any(&p.local_service_name),
                    remote_service: name_or_any(&p.remote_service_name),
                    level: match p.priority_level {
                        Some(PriorityLevel::Level(level)) => level,
                        Some(PriorityLevel::Default) | None => PRIORITY_LEVEL_DEFAULT,
                    },
                };
                self.in_transaction(|_, tx| tx.create_broker_priority(priority))?;
            }
            Statement::Drop(d) => self.drop_object(d)?,
            Statement::BeginDialog(d) => self.begin_dialog(d)?,
            Statement::Send(s) => self.send(s)?,
            Statement::Receive(r) => return self.receive(r, kind),
            Statement::GetConversationGroup(g) => self.get_conversation_group(g)?,
            Statement::MoveConversation(m) => {
                let handle = self.handle(&m.conversation)?;
                let group = self.group(&m.group)?;
                self.in_transaction(|_, tx| tx.move_conversation(handle, group))?;
            }
            Statement::EndConversation(e) => {
                let handle = self.handle(&e.conversation)?;
                match &e.with {
                    None => self.in_transaction(|_, tx| tx.end_conversation(handle))?,
                    Some(EndWith::Cleanup) => {
                        self.in_transaction(|_, tx| tx.end_conversation_with_cleanup(handle))?;
                    }
                    Some(EndWith::Error { code, description }) => {
                        let code = self.integer(code, "the error code", 1, i64::from(i32::MAX))?;
                        let code = i32::try_from(code).expect("range checked above");
                        let description = match description {
                            Operand::Literal(text) => text.clone(),
                            Operand::Variable(name) => {
                                match convert(self.read(name)?, SqlType::TEXT_MAX)? {
                                    Value::Text(text) => text,
                                    _ => {
                                        return Err(Error::Sql(format!(
                                            "the error description @{name} is NULL"
                                        )));
                                    }
                                }
                            }
                        };
                        self.in_transaction(|_, tx| {
                            tx.end_conversation_with_error(handle, code, &description)
                        })?;
                    }
                }
            }
            Statement::BeginConversationTimer(t) => {
                let handle = self.handle(&t.conversation)?;
                let seconds = self.integer(&t.timeout_secs, "TIMEOUT", 0, i64::from(i32::MAX))?;
                let timeout = Duration::from_secs(seconds.unsigned_abs());
                self.in_transaction(|_, tx| tx.begin_conversation_timer(handle, timeout))?;
            }
            Statement::BeginTransaction => {
                if self.transaction_count >= TRANSACTION_NESTING_MAX {
                    return Err(Error::Limit {
                        what: "BEGIN TRANSACTION nesting",
                        len: self.transaction_count as usize + 1,
                        max: TRANSACTION_NESTING_MAX as usize,
                    });
                }
                if self.transaction.is_none() {
                    self.transaction = Some(self.begin_transaction());
                }
                self.transaction_count += 1;
            }
            Statement::Commit => {
                if self.transaction_count == 0 {
                    return Err(Error::Sql(
                        "COMMIT has no corresponding BEGIN TRANSACTION".into(),
                    ));
                }
                self.transaction_count -= 1;
                if self.transaction_count == 0 {
                    self.end_transaction();
                    if let Some(tx) = self.transaction.take() {
                        tx.commit()?;
                    }
                }
            }
            Statement::Rollback => {
                if self.transaction_count == 0 {
                    return Err(Error::Sql(
                        "ROLLBACK has no corresponding BEGIN TRANSACTION".into(),
                    ));
                }
                self.transaction_count = 0;
                self.end_transaction();
                if let Some(tx) = self.transaction.take() {
                    tx.rollback();
                }
            }
            Statement::Declare(d) => {
                for declaration in &d.variables {
                    if let Some(initial) = &declaration.initial {
                        let value = self.eval(initial)?;
                        self.assign(&declaration.name, value)?;
                    }
                }
            }
            Statement::Set(s) => {
                let value = self.eval(&s.value)?;
                self.assign(&s.variable, value)?;
            }
            Statement::SelectValues(s) => return self.select_values(s, kind),
            Statement::Select(s) => return self.select(s, kind),
            Statement::Use(u) => self.database = Some(u.database.clone()),
            Statement::If(_) | Statement::Block(_) => {
                return Err(Error::Sql(format!("{kind} is not a simple statement")));
            }
        }
        Ok(done(None, None))
    }

    /// Runs `f` in the explicit transaction if one is open (leaving it open whatever happens,
    /// unless a RECEIVE doomed it), else in a transaction of its own, committed on success.
    fn in_transaction<R>(
        &mut self,
        f: impl FnOnce(&mut Session<'b>, &mut Transaction<'b>) -> Result<R>,
    ) -> Result<R> {
        match self.transaction.take() {
            Some(mut tx) => {
                self.doomed = false;
                let result = f(self, &mut tx);
                if result.is_err() && self.doomed {
                    tx.rollback();
                    self.transaction_count = 0;
                    self.end_transaction();
                } else {
                    self.transaction = Some(tx);
                }
                self.doomed = false;
                result
            }
            None => {
                let mut tx = self.begin_transaction();
                let value = f(self, &mut tx)?;
                self.doomed = false;
                tx.commit()?;
                Ok(value)
            }
        }
    }

    fn end_transaction(&mut self) {
        self.pending_queues.clear();
        self.pending_routes.clear();
    }

    fn note_queue(&mut self, name: String, options: Option<QueueOptions>) {
        if self.transaction.is_some() {
            self.pending_queues.insert(name, options);
        }
    }

    fn note_route(&mut self, route: Route) {
        if self.transaction.is_some() {
            self.pending_routes.insert(route.name.clone(), Some(route));
        }
    }

    fn drop_object(&mut self, d: &ast::DropObject) -> Result<()> {
        let name = match d.kind {
            ObjectKind::Queue => queue_name(&d.name),
            _ => d.name.name.clone(),
        };
        match d.kind {
            ObjectKind::MessageType => self.in_transaction(|_, tx| tx.drop_message_type(&name)),
            ObjectKind::Contract => self.in_transaction(|_, tx| tx.drop_contract(&name)),
            ObjectKind::Queue => {
                self.in_transaction(|_, tx| tx.drop_queue(&name))?;
                self.note_queue(name, None);
                Ok(())
            }
            ObjectKind::Service => self.in_transaction(|_, tx| tx.drop_service(&name)),
            ObjectKind::Route => {
                self.in_transaction(|_, tx| tx.drop_route(&name))?;
                if self.transaction.is_some() {
                    self.pending_routes.insert(name, None);
                }
                Ok(())
            }
            ObjectKind::BrokerPriority => {
                self.in_transaction(|_, tx| tx.drop_broker_priority(&name))
            }
        }
    }

    /// `base` with the options of CREATE / ALTER ROUTE applied.
    fn route_with(&self, mut route: Route, settings: &ast::RouteSettings) -> Result<Route> {
        if settings.mirror_address.is_some() {
            return Err(Error::Unsupported(
                "MIRROR_ADDRESS (routes have one address; database mirroring does not exist)"
                    .into(),
            ));
        }
        if let Some(service) = &settings.service_name {
            route.service_name = Some(service.clone());
        }
        if let Some(instance) = settings.broker_instance {
            route.broker_instance = Some(BrokerInstanceId(instance.as_u128()));
        }
        if let Some(seconds) = settings.lifetime_secs {
            let now_ms = self.broker.clock().now_ms();
            route.expires_at_ms = Some(now_ms.saturating_add(u64::from(seconds) * 1000));
        }
        if let Some(address) = &settings.address {
            route.address = match address {
                ast::RouteAddress::Local => RouteAddress::Local,
                ast::RouteAddress::Network { host, port, .. } if host.contains(':') => {
                    RouteAddress::parse(&format!("quic://[{host}]:{port}"))?
                }
                ast::RouteAddress::Network { host, port, .. } => {
                    RouteAddress::parse(&format!("quic://{host}:{port}"))?
                }
            };
        }
        Ok(route)
    }

    fn begin_dialog(&mut self, d: &ast::BeginDialog) -> Result<()> {
        let target = self.target_type(&d.handle_variable)?;
        let mut options = DialogOptions::default();
        match &d.related {
            Some(Related::Conversation(h)) => options.related_conversation = Some(self.handle(h)?),
            Some(Related::Group(g)) => options.related_conversation_group = Some(self.group(g)?),
            None => {}
        }
        if let Some(seconds) = &d.lifetime_secs {
            let seconds = self.integer(seconds, "LIFETIME", 0, i64::from(i32::MAX))?;
            options.lifetime = Some(Duration::from_secs(seconds.unsigned_abs()));
        }
        options.target_broker_instance = match d.broker_instance {
            Some(BrokerInstance::Id(id)) => Some(BrokerInstanceId(id.as_u128())),
            Some(BrokerInstance::CurrentDatabase) => Some(self.broker.broker_instance()),
            None => None,
        };
        let contract = d.contract.as_deref().unwrap_or(crate::catalog::DEFAULT);
        let value = self.in_transaction(|_, tx| {
            let handle = tx.begin_dialog(&d.from_service, &d.to_service, contract, options)?;
            convert(Value::Guid(handle.0), target)
        })?;
        self.store(&d.handle_variable, value);
        Ok(())
    }

    fn send(&mut self, s: &ast::Send) -> Result<()> {
        let handles = s
            .conversations
            .iter()
            .map(|h| self.handle(h))
            .collect::<Result<Vec<_>>>()?;
        let message_type = s.message_type.as_deref().unwrap_or(crate::catalog::DEFAULT);
        let body = match &s.body {
            None => Vec::new(),
            Some(expr) => match self.eval(expr)? {
                Value::Null => {
                    return Err(Error::Sql("SEND's message body may not be NULL".into()));
                }
                value => match convert(value, SqlType::BINARY_MAX)? {
                    Value::Binary(bytes) => bytes,
                    _ => Vec::new(),
                },
            },
        };
        self.in_transaction(|_, tx| tx.send_many(&handles, message_type, &body))
    }

    fn receive(&mut self, r: &ast::Receive, kind: &'static str) -> Result<StatementResult> {
        if let Some(table) = &r.into {
            return Err(Error::Unsupported(format!(
                "RECEIVE … INTO a table variable (@{table})"
            )));
        }
        let queue = queue_name(&r.queue);
        let top = match &r.top {
            Some(top) => self.integer(top, "TOP", 0, i64::from(i32::MAX))?,
            None => i64::MAX,
        };
        let top = usize::try_from(top)
            .unwrap_or(usize::MAX)
            .min(RESULT_ROWS_MAX);
        let mut what = crate::Receive::top(top);
        match &r.filter {
            Some(ReceiveFilter::Conversation(h)) => what = what.conversation(self.handle(h)?),
            Some(ReceiveFilter::Group(g)) => what = what.group(self.group(g)?),
            None => {}
        }
        if let Some(wait) = &r.waitfor {
            what = what.wait(self.timeout(wait)?);
        }
        let projection = self.projection(&r.columns, MESSAGE_COLUMNS)?;
        let (rows, output) = self.in_transaction(|session, tx| {
            let messages = tx.receive(&queue, what)?;
            // From here on a failure must not leave the messages taken and unseen.
            session.doomed = !messages.is_empty();
            let mut builder = MessageRows::new(session.broker, session.result_bytes);
            let mut rows = Vec::with_capacity(messages.len());
            for message in &messages {
                let row = builder.row(message);
                builder.charge(&row)?;
                rows.push(row);
            }
            let count = rows.len() as u64;
            let output = session.project(&projection, rows)?;
            Ok((count, output))
        })?;
        Ok(self.finish(kind, rows, output))
    }

    fn get_conversation_group(&mut self, g: &ast::GetConversationGroup) -> Result<()> {
        let target = self.target_type(&g.group_variable)?;
        let queue = queue_name(&g.queue);
        let wait = match &g.waitfor {
            Some(wait) => Some(self.timeout(wait)?),
            None => None,
        };
        let value = self.in_transaction(|_, tx| {
            let group = match wait {
                Some(timeout) => tx.get_conversation_group_wait(&queue, timeout)?,
                None => tx.get_conversation_group(&queue)?,
            };
            convert(group.map_or(Value::Null, |g| Value::Guid(g.0)), target)
        })?;
        self.store(&g.group_variable, value);
        Ok(())
    }

    fn select_values(
        &mut self,
        s: &ast::SelectValues,
        kind: &'static str,
    ) -> Result<StatementResult> {
        let mut columns = Vec::new();
        let mut row = Vec::new();
        let mut assignments = Vec::new();
        for item in &s.items {
            match item {
                ValueItem::Show { value, alias } => {
                    columns.push(alias.clone().unwrap_or_default());
                    row.push(self.eval(value)?);
                }
                ValueItem::Assign { variable, value } => {
                    let target = self.target_type(variable)?;
                    assignments.push((variable, convert(self.eval(value)?, target)?));
                }
            }
        }
        for (variable, value) in assignments {
            self.store(variable, value);
        }
        if columns.is_empty() {
            return Ok(StatementResult {
                statement: kind,
                rows_affected: Some(1),
                result: None,
            });
        }
        self.charge(&row)?;
        Ok(StatementResult {
            statement: kind,
            rows_affected: Some(1),
            result: Some(ResultSet {
                columns,
                rows: vec![row],
            }),
        })
    }

    fn select(&mut self, s: &ast::Select, kind: &'static str) -> Result<StatementResult> {
        // Queue rows are built one message at a time (a body is copied only into a row that is
        // kept), so memory stays within the result limits however long the queue is.
        let (columns, messages, view) = match &s.from {
            SelectSource::Queue(name) => {
                let messages = self.broker.peek(&queue_name(name))?;
                (MESSAGE_COLUMNS, messages, Vec::new())
            }
            SelectSource::View(view) => {
                let (columns, rows) = view_rows(self.broker, *view);
                (columns, Vec::new(), rows)
            }
        };
        let projection = self.projection(&s.columns, columns)?;
        let mut filters = Vec::new();
        for condition in &s.filter {
            let index = column_index(columns, &condition.column)?;
            filters.push((index, self.eval(&condition.value)?));
        }
        let keep = |row: &[Value]| -> Result<bool> {
            for (index, value) in &filters {
                if !equals(&row[*index], value)? {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        let mut builder = MessageRows::new(self.broker, self.result_bytes);
        let mut kept = Vec::new();
        let (mut view, mut messages) = (view.into_iter(), messages.iter());
        loop {
            let row = if let Some(row) = view.next() {
                row
            } else if let Some(message) = messages.next() {
                builder.row(message)
            } else {
                break;
            };
            if !keep(&row)? {
                continue;
            }
            if kept.len() == RESULT_ROWS_MAX {
                return Err(Error::Limit {
                    what: "rows of a SELECT",
                    len: RESULT_ROWS_MAX + 1,
                    max: RESULT_ROWS_MAX,
                });
            }
            builder.charge(&row)?;
            kept.push(row);
        }
        let count = kept.len() as u64;
        let output = self.project(&projection, kept)?;
        Ok(self.finish(kind, count, output))
    }

    /// Assigns what a RECEIVE or SELECT assigned, or returns its rows.
    fn finish(&mut self, kind: &'static str, rows: u64, output: Output) -> StatementResult {
        let result = match output {
            Output::Rows(result) => Some(result),
            Output::Assign(assignments) => {
                for (variable, value) in assignments {
                    self.store(&variable, value);
                }
                None
            }
        };
        StatementResult {
            statement: kind,
            rows_affected: Some(rows),
            result,
        }
    }

    /// Checks a column list against `columns` before anything runs.
    fn projection(&self, list: &Columns, columns: &[&str]) -> Result<Projection> {
        let items = match list {
            Columns::All => columns
                .iter()
                .enumerate()
                .map(|(index, name)| ProjectedColumn {
                    index,
                    cast: None,
                    name: (*name).to_owned(),
                    assign: None,
                })
                .collect(),
            Columns::List(items) => items
                .iter()
                .map(|item| self.projected_column(item, columns))
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(Projection { items })
    }

    fn projected_column(&self, item: &SelectItem, columns: &[&str]) -> Result<ProjectedColumn> {
        let index = column_index(columns, &item.column)?;
        let cast = item
            .cast
            .as_ref()
            .map(|t| SqlType::of(t, CAST_LENGTH_DEFAULT))
            .transpose()?;
        let assign = match &item.assign_to {
            Some(variable) => Some((variable.clone(), self.target_type(variable)?)),
            None => None,
        };
        Ok(ProjectedColumn {
            index,
            cast,
            name: item
                .alias
                .clone()
                .unwrap_or_else(|| columns[index].to_owned()),
            assign,
        })
    }

    /// Applies a projection to full rows: the result set, or (for `@var = column` lists) the
    /// values to assign from the last row, already converted to the variables' types.
    fn project(&mut self, projection: &Projection, rows: Vec<Vec<Value>>) -> Result<Output> {
        let assigning = projection.items.iter().any(|item| item.assign.is_some());
        if assigning {
            let mut assignments = Vec::new();
            if let Some(last) = rows.last() {
                for item in &projection.items {
                    let Some((variable, target)) = &item.assign else {
                        continue;
                    };
                    let mut value = last[item.index].clone();
                    if let Some(cast) = item.cast {
                        value = convert(value, cast)?;
                    }
                    assignments.push((variable.clone(), convert(value, *target)?));
                }
            }
            return Ok(Output::Assign(assignments));
        }
        let mut result = ResultSet {
            columns: projection.items.iter().map(|i| i.name.clone()).collect(),
            rows: Vec::with_capacity(rows.len()),
        };
        for row in rows {
            let mut out = Vec::with_capacity(projection.items.len());
            for item in &projection.items {
                let value = row[item.index].clone();
                out.push(match item.cast {
                    Some(cast) => convert(value, cast)?,
                    None => value,
                });
            }
            self.charge(&out)?;
            result.rows.push(out);
        }
        Ok(Output::Rows(result))
    }

    /// Counts a result row against [`RESULT_BYTES_MAX`].
    fn charge(&mut self, row: &[Value]) -> Result<()> {
        let bytes: usize = row.iter().map(Value::cost_bytes).sum();
        let total = self.result_bytes.saturating_add(bytes);
        if total > RESULT_BYTES_MAX {
            return Err(Error::Limit {
                what: "bytes of result sets of one script",
                len: total,
                max: RESULT_BYTES_MAX,
            });
        }
        self.result_bytes = total;
        Ok(())
    }

    fn condition(&self, condition: &Condition) -> Result<bool> {
        match condition {
            Condition::IsNull { value, negated } => Ok(self.eval(value)?.is_null() != *negated),
            Condition::Compare { left, op, right } => {
                let (left, right) = (self.eval(left)?, self.eval(right)?);
                if left.is_null() || right.is_null() {
                    // UNKNOWN: neither = nor <> holds.
                    return Ok(false);
                }
                let equal = equals(&left, &right)?;
                Ok(match op {
                    CompareOp::Eq => equal,
                    CompareOp::NotEq => !equal,
                })
            }
        }
    }

    fn eval(&self, expr: &Expr) -> Result<Value> {
        match expr {
            Expr::Literal(Literal::String { value, .. }) => {
                check_bytes(value.len())?;
                Ok(Value::Text(value.clone()))
            }
            Expr::Literal(Literal::Binary(bytes)) => {
                check_bytes(bytes.len())?;
                Ok(Value::Binary(bytes.clone()))
            }
            Expr::Literal(Literal::Integer(n)) => Ok(Value::Int(*n)),
            Expr::Literal(Literal::Null) => Ok(Value::Null),
            Expr::Variable(name) => self.read(name),
            Expr::Cast { expr, to } => {
                convert(self.eval(expr)?, SqlType::of(to, CAST_LENGTH_DEFAULT)?)
            }
        }
    }

    /// A variable's value; `@@ROWCOUNT` and `@@TRANCOUNT` (stored as `@ROWCOUNT`, …) too.
    fn read(&self, name: &str) -> Result<Value> {
        if let Some(system) = name.strip_prefix('@') {
            return match system.to_ascii_uppercase().as_str() {
                "ROWCOUNT" => Ok(Value::Int(
                    i64::try_from(self.row_count).unwrap_or(i64::MAX),
                )),
                "TRANCOUNT" => Ok(Value::Int(i64::from(self.transaction_count))),
                _ => Err(Error::Unsupported(format!("the system function @{name}"))),
            };
        }
        self.variables
            .get(&key(name))
            .map(|v| v.value.clone())
            .ok_or_else(|| undeclared(name))
    }

    /// The type of declared variable `name`, which a statement is about to assign.
    fn target_type(&self, name: &str) -> Result<SqlType> {
        if name.starts_with('@') {
            return Err(Error::Sql(format!("@{name} cannot be assigned")));
        }
        self.variables
            .get(&key(name))
            .map(|v| v.data_type)
            .ok_or_else(|| undeclared(name))
    }

    fn assign(&mut self, name: &str, value: Value) -> Result<()> {
        let value = convert(value, self.target_type(name)?)?;
        self.store(name, value);
        Ok(())
    }

    /// Stores a value already converted to the variable's type (`target_type` checked it exists).
    fn store(&mut self, name: &str, value: Value) {
        if let Some(variable) = self.variables.get_mut(&key(name)) {
            variable.value = value;
        }
    }

    fn handle(&self, operand: &Operand<ConversationHandle>) -> Result<ConversationHandle> {
        match operand {
            Operand::Literal(handle) => Ok(*handle),
            Operand::Variable(name) => Ok(ConversationHandle(
                self.guid_variable(name, "conversation handle")?,
            )),
        }
    }

    fn group(&self, operand: &Operand<ConversationGroupId>) -> Result<ConversationGroupId> {
        match operand {
            Operand::Literal(group) => Ok(*group),
            Operand::Variable(name) => Ok(ConversationGroupId(
                self.guid_variable(name, "conversation group id")?,
            )),
        }
    }

    fn guid_variable(&self, name: &str, what: &str) -> Result<u128> {
        match convert(self.read(name)?, SqlType::Guid)? {
            Value::Guid(id) => Ok(id),
            _ => Err(Error::Sql(format!("the {what} @{name} is NULL"))),
        }
    }

    /// An integer operand, checked against `min..=max`.
    fn integer(&self, operand: &Operand<i64>, what: &str, min: i64, max: i64) -> Result<i64> {
        let value = match operand {
            Operand::Literal(n) => *n,
            Operand::Variable(name) => match convert(self.read(name)?, SqlType::BIGINT)? {
                Value::Int(n) => n,
                _ => return Err(Error::Sql(format!("{what} @{name} is NULL"))),
            },
        };
        if !(min..=max).contains(&value) {
            return Err(Error::Sql(format!(
                "{what} must be {min} to {max}, not {value}"
            )));
        }
        Ok(value)
    }

    /// WAITFOR's TIMEOUT: milliseconds, −1 or none for forever.
    fn timeout(&self, wait: &ast::WaitFor) -> Result<Duration> {
        match &wait.timeout_ms {
            None => Ok(Duration::MAX),
            Some(ms) => match self.integer(ms, "TIMEOUT", -1, i64::from(i32::MAX))? {
                -1 => Ok(Duration::MAX),
                ms => Ok(Duration::from_millis(ms.unsigned_abs())),
            },
        }
    }
}

/// Default length of a character or binary type in CAST / CONVERT (T-SQL's 30); in DECLARE it
/// is 1.
const CAST_LENGTH_DEFAULT: u32 = 30;

/// The columns of RECEIVE and of SELECT from a queue.
const MESSAGE_COLUMNS: &[&str] = &[
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
    "message_body",
];

struct Projection {
    items: Vec<ProjectedColumn>,
}

struct ProjectedColumn {
    index: usize,
    cast: Option<SqlType>,
    name: String,
    /// `@var = column`: the variable and its type.
    assign: Option<(String, SqlType)>,
}

enum Output {
    Rows(ResultSet),
    Assign(Vec<(String, Value)>),
}

/// The data types Herald's variables and CASTs have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SqlType {
    /// INT, BIGINT, SMALLINT, TINYINT: the range.
    Int {
        min: i64,
        max: i64,
    },
    /// BIT: any non-zero value is 1.
    Bit,
    /// Character types: at most `max_chars` characters (`None`: MAX).
    Text {
        max_chars: Option<u32>,
    },
    /// Binary types: at most `max_bytes` bytes (`None`: MAX).
    Binary {
        max_bytes: Option<u32>,
    },
    Guid,
}

impl SqlType {
    const BIGINT: SqlType = SqlType::Int {
        min: i64::MIN,
        max: i64::MAX,
    };
    const TEXT_MAX: SqlType = SqlType::Text { max_chars: None };
    const BINARY_MAX: SqlType = SqlType::Binary { max_bytes: None };

    /// The type `name` means; `default_length` for a character or binary type given without
    /// one (1 in DECLARE, 30 in CAST, as in T-SQL).
    fn of(name: &TypeName, default_length: u32) -> Result<SqlType> {
        let length = match name.length {
            Some(TypeLength::Count(n)) => Some(n),
            Some(TypeLength::Max) => None,
            None => Some(default_length),
        };
        let int = |min: i64, max: i64| SqlType::Int { min, max };
        Ok(match name.name.as_str() {
            "BIGINT" => SqlType::BIGINT,
            "INT" | "INTEGER" => int(i32::MIN.into(), i32::MAX.into()),
            "SMALLINT" => int(i16::MIN.into(), i16::MAX.into()),
            "TINYINT" => int(0, 255),
            "BIT" => SqlType::Bit,
            "NVARCHAR" | "VARCHAR" | "NCHAR" | "CHAR" => SqlType::Text { max_chars: length },
            "SYSNAME" => SqlType::Text {
                max_chars: Some(128),
            },
            "XML" | "NTEXT" | "TEXT" => SqlType::TEXT_MAX,
            "VARBINARY" | "BINARY" => SqlType::Binary { max_bytes: length },
            "IMAGE" => SqlType::BINARY_MAX,
            "UNIQUEIDENTIFIER" => SqlType::Guid,
            other => return Err(Error::Unsupported(format!("the data type {other}"))),
        })
    }

    fn name(self) -> &'static str {
        match self {
            SqlType::Int { .. } => "an integer",
            SqlType::Bit => "BIT",
            SqlType::Text { .. } => "text",
            SqlType::Binary { .. } => "VARBINARY",
            SqlType::Guid => "UNIQUEIDENTIFIER",
        }
    }
}

/// Converts `value` to `to`, as CAST and assignment do: text is UTF-8 both ways, integers are
/// big-endian bytes, GUIDs are their 16 bytes (big-endian) or their upper-case text; character
/// and binary values longer than the type are cut to it (as T-SQL does).
fn convert(value: Value, to: SqlType) -> Result<Value> {
    let failed = |value: &Value| {
        let mut shown = value.to_string();
        if shown.len() > 64 {
            let mut cut = 64;
            while !shown.is_char_boundary(cut) {
                cut -= 1;
            }
            shown.truncate(cut);
            shown.push('…');
        }
        Error::Sql(format!(
            "conversion failed when converting {shown:?} to {}",
            to.name()
        ))
    };
    let converted = match (value, to) {
        (Value::Null, _) => Value::Null,
        (Value::Int(n), SqlType::Int { min, max }) => {
            if !(min..=max).contains(&n) {
                return Err(Error::Sql(format!(
                    "arithmetic overflow converting {n} to an integer of {min} to {max}"
                )));
            }
            Value::Int(n)
        }
        (Value::Int(n), SqlType::Bit) => Value::Int(i64::from(n != 0)),
        (Value::Int(n), SqlType::Text { max_chars }) => {
            Value::Text(cut_text(n.to_string(), max_chars))
        }
        (Value::Int(n), SqlType::Binary { max_bytes }) => {
            let bytes = match i32::try_from(n) {
                Ok(small) => small.to_be_bytes().to_vec(),
                Err(_) => n.to_be_bytes().to_vec(),
            };
            // Numbers keep their low (rightmost) bytes, as T-SQL's.
            let keep = max_bytes.map_or(bytes.len(), |m| (m as usize).min(bytes.len()));
            Value::Binary(bytes[bytes.len() - keep..].to_vec())
        }
        (Value::Text(text), SqlType::Int { .. }) => {
            let n = text
                .trim()
                .parse::<i64>()
                .map_err(|_| failed(&Value::Text(text.clone())))?;
            return convert(Value::Int(n), to);
        }
        (Value::Text(text), SqlType::Bit) => match text.trim().to_ascii_uppercase().as_str() {
            "TRUE" => Value::Int(1),
            "FALSE" => Value::Int(0),
            trimmed => Value::Int(i64::from(
                trimmed
                    .parse::<i64>()
                    .map_err(|_| failed(&Value::Text(text.clone())))?
                    != 0,
            )),
        },
        (Value::Text(text), SqlType::Text { max_chars }) => Value::Text(cut_text(text, max_chars)),
        (Value::Text(text), SqlType::Binary { max_bytes }) => {
            Value::Binary(cut_bytes(text.into_bytes(), max_bytes))
        }
        (Value::Text(text), SqlType::Guid) => match uuid::Uuid::parse_str(text.trim()) {
            Ok(id) => Value::Guid(id.as_u128()),
            Err(_) => return Err(failed(&Value::Text(text))),
        },
        (Value::Binary(bytes), SqlType::Int { .. } | SqlType::Bit) => {
            // The low (rightmost) eight bytes, big-endian; eight bytes are a signed BIGINT.
            let low = &bytes[bytes.len().saturating_sub(8)..];
            let n = low.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b));
            let n = if low.len() == 8 {
                i64::from_be_bytes(n.to_be_bytes())
            } else {
                i64::try_from(n).expect("at most seven bytes")
            };
            return convert(Value::Int(n), to);
        }
        (Value::Binary(bytes), SqlType::Text { max_chars }) => match String::from_utf8(bytes) {
            Ok(text) => Value::Text(cut_text(text, max_chars)),
            Err(e) => {
                return Err(Error::Sql(format!(
                    "conversion failed: binary value is not UTF-8 text ({})",
                    e.utf8_error()
                )));
            }
        },
        (Value::Binary(bytes), SqlType::Binary { max_bytes }) => {
            Value::Binary(cut_bytes(bytes, max_bytes))
        }
        (Value::Binary(bytes), SqlType::Guid) => match <[u8; 16]>::try_from(bytes.as_slice()) {
            Ok(array) => Value::Guid(u128::from_be_bytes(array)),
            Err(_) => return Err(failed(&Value::Binary(bytes))),
        },
        (Value::Guid(id), SqlType::Text { max_chars }) => {
            if max_chars.is_some_and(|m| m < 36) {
                return Err(Error::Sql(
                    "a UNIQUEIDENTIFIER needs a character type of at least 36 characters".into(),
                ));
            }
            Value::Text(guid_text(id))
        }
        (Value::Guid(id), SqlType::Binary { max_bytes }) => {
            Value::Binary(cut_bytes(id.to_be_bytes().to_vec(), max_bytes))
        }
        (Value::Guid(id), SqlType::Guid) => Value::Guid(id),
        (value @ Value::Guid(_), SqlType::Int { .. } | SqlType::Bit)
        | (value @ Value::Int(_), SqlType::Guid) => return Err(failed(&value)),
    };
    match &converted {
        Value::Text(text) => check_bytes(text.len())?,
        Value::Binary(bytes) => check_bytes(bytes.len())?,
        _ => {}
    }
    Ok(converted)
}

/// Whether two non-NULL values are equal, the one of lower precedence converted to the other's
/// type first (T-SQL's order: integer, then UNIQUEIDENTIFIER, then text, then binary). Text is
/// compared exactly (a binary collation: case counts). A NULL equals nothing.
fn equals(left: &Value, right: &Value) -> Result<bool> {
    fn rank(value: &Value) -> (u8, SqlType) {
        match value {
            Value::Int(_) => (4, SqlType::BIGINT),
            Value::Guid(_) => (3, SqlType::Guid),
            Value::Text(_) => (2, SqlType::TEXT_MAX),
            Value::Binary(_) | Value::Null => (1, SqlType::BINARY_MAX),
        }
    }
    if left.is_null() || right.is_null() {
        return Ok(false);
    }
    let ((left_rank, left_type), (right_rank, right_type)) = (rank(left), rank(right));
    if left_rank == right_rank {
        return Ok(left == right);
    }
    if left_rank > right_rank {
        Ok(*left == convert(right.clone(), left_type)?)
    } else {
        Ok(convert(left.clone(), right_type)? == *right)
    }
}

fn cut_text(mut text: String, max_chars: Option<u32>) -> String {
    if let Some(max) = max_chars
        && let Some((cut, _)) = text.char_indices().nth(max as usize)
    {
        text.truncate(cut);
    }
    text
}

fn cut_bytes(mut bytes: Vec<u8>, max_bytes: Option<u32>) -> Vec<u8> {
    if let Some(max) = max_bytes {
        bytes.truncate(max as usize);
    }
    bytes
}

fn check_bytes(len: usize) -> Result<()> {
    if len > VALUE_BYTES_MAX {
        return Err(Error::Limit {
            what: "bytes of a value",
            len,
            max: VALUE_BYTES_MAX,
        });
    }
    Ok(())
}

fn guid_text(id: u128) -> String {
    uuid::Uuid::from_u128(id)
        .hyphenated()
        .to_string()
        .to_ascii_uppercase()
}

fn key(name: &str) -> String {
    name.to_lowercase()
}

fn undeclared(name: &str) -> Error {
    Error::Sql(format!("must declare the scalar variable @{name}"))
}

fn column_index(columns: &[&str], name: &str) -> Result<usize> {
    columns
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            Error::Sql(format!(
                "invalid column name {name:?}; the columns are {}",
                columns.join(", ")
            ))
        })
}

/// The engine's queue name for `[database.][schema.]name`: the database is ignored (a broker is
/// one database) and so is the schema `dbo`; another schema is kept as `schema.name`.
fn queue_name(name: &ObjectName) -> String {
    match name.schema.as_deref() {
        Some(schema) if !schema.eq_ignore_ascii_case("dbo") => format!("{schema}.{}", name.name),
        _ => name.name.clone(),
    }
}

/// Activation runs T-SQL stored procedures, which Herald does not have: a procedure is refused;
/// the other activation options, which mean nothing without one, are accepted and ignored.
fn check_activation(activation: Option<&Activation>) -> Result<()> {
    if let Some(Activation::Set(settings)) = activation
        && settings.procedure_name.is_some()
    {
        return Err(Error::Unsupported(
            "ACTIVATION with PROCEDURE_NAME (Herald runs no stored procedures; activate the \
             queue with the Rust API, Broker::activate)"
                .into(),
        ));
    }
    Ok(())
}

fn collect_declarations<'s>(statement: &'s Statement, into: &mut Vec<&'s ast::VariableDecl>) {
    match statement {
        Statement::Declare(d) => into.extend(d.variables.iter()),
        Statement::If(branch) => {
            for inner in branch.then.iter().chain(branch.otherwise.iter().flatten()) {
                collect_declarations(inner, into);
            }
        }
        Statement::Block(block) => {
            for inner in &block.statements {
                collect_declarations(inner, into);
            }
        }
        _ => {}
    }
}

/// Builds rows of [`MESSAGE_COLUMNS`], one message at a time, and keeps the bytes of the rows
/// kept within what is left of [`RESULT_BYTES_MAX`]. Service and contract names come from the
/// committed endpoint (NULL for a conversation begun by the still-open transaction).
struct MessageRows<'a> {
    broker: &'a Broker,
    endpoints: HashMap<ConversationHandle, Option<Endpoint>>,
    catalog: Option<Catalog>,
    bytes_used: usize,
}

impl<'a> MessageRows<'a> {
    fn new(broker: &'a Broker, bytes_used: usize) -> MessageRows<'a> {
        MessageRows {
            broker,
            endpoints: HashMap::new(),
            catalog: None,
            bytes_used,
        }
    }

    /// Counts a row that is kept; fails once the rows kept exceed [`RESULT_BYTES_MAX`] with the
    /// results before them.
    fn charge(&mut self, row: &[Value]) -> Result<()> {
        let bytes: usize = row.iter().map(Value::cost_bytes).sum();
        self.bytes_used = self.bytes_used.saturating_add(bytes);
        if self.bytes_used > RESULT_BYTES_MAX {
            return Err(Error::Limit {
                what: "bytes of result sets of one script",
                len: self.bytes_used,
                max: RESULT_BYTES_MAX,
            });
        }
        Ok(())
    }

    fn row(&mut self, message: &Message) -> Vec<Value> {
        let broker = self.broker;
        let endpoint = self
            .endpoints
            .entry(message.conversation_handle)
            .or_insert_with(|| broker.conversation_endpoint(message.conversation_handle));
        let message_type = &*message.message_type;
        let validation = match message_type {
            system::END_DIALOG | system::DIALOG_TIMER => "E",
            system::ERROR => "X",
            name => self
                .catalog
                .get_or_insert_with(|| broker.catalog())
                .message_types
                .get(name)
                .map_or("N", |t| validation_code(t.validation)),
        };
        let text =
            |s: Option<&std::sync::Arc<str>>| s.map_or(Value::Null, |s| Value::Text(s.to_string()));
        vec![
            Value::Int(message.status as i64),
            endpoint
                .as_ref()
                .map_or(Value::Null, |e| Value::Int(i64::from(e.priority))),
            int(message.queuing_order),
            Value::Guid(message.conversation_group.0),
            Value::Guid(message.conversation_handle.0),
            int(message.sequence),
            text(endpoint.as_ref().map(|e| &e.service)),
            text(endpoint.as_ref().map(|e| &e.contract)),
            Value::Text(message_type.to_owned()),
            Value::Text(validation.to_owned()),
            Value::Binary(message.body().to_vec()),
        ]
    }
}

fn int(n: u64) -> Value {
    Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

fn flag(b: bool) -> Value {
    Value::Int(i64::from(b))
}

fn opt_text(s: Option<&str>) -> Value {
    s.map_or(Value::Null, |s| Value::Text(s.to_owned()))
}

fn opt_ms(ms: Option<u64>) -> Value {
    ms.map_or(Value::Null, int)
}

/// `sys.service_message_types.validation`: T-SQL's N, E, X, and Herald's U (UTF8), J (JSON).
fn validation_code(validation: Validation) -> &'static str {
    match validation {
        Validation::None => "N",
        Validation::Empty => "E",
        Validation::WellFormedXml => "X",
        Validation::Utf8 => "U",
        Validation::Json => "J",
    }
}

/// A catalog view's columns and rows, as committed.
fn view_rows(broker: &Broker, view: CatalogView) -> (&'static [&'static str], Vec<Vec<Value>>) {
    match view {
        CatalogView::ConversationEndpoints => {
            let mut endpoints = broker.conversation_endpoints();
            endpoints.sort_by_key(|e| e.handle);
            let rows = endpoints
                .into_iter()
                .map(|e| {
                    vec![
                        Value::Guid(e.handle.0),
                        Value::Guid(e.conversation_id.0),
                        flag(e.is_initiator),
                        Value::Text(e.contract.to_string()),
                        Value::Guid(e.group.0),
                        Value::Text(e.service.to_string()),
                        opt_ms(e.expires_at_ms),
                        Value::Text(e.state.code().to_owned()),
                        Value::Text(e.state.description().to_owned()),
                        Value::Text(e.far_service.to_string()),
                        e.far_broker_instance
                            .map_or(Value::Null, |b| Value::Guid(b.0)),
                        opt_ms(e.dialog_timer_ms),
                        int(e.send_sequence),
                        int(e.receive_sequence),
                        Value::Int(i64::from(e.priority)),
                    ]
                })
                .collect();
            (
                &[
                    "conversation_handle",
                    "conversation_id",
                    "is_initiator",
                    "service_contract_name",
                    "conversation_group_id",
                    "service_name",
                    "lifetime",
                    "state",
                    "state_desc",
                    "far_service",
                    "far_broker_instance",
                    "dialog_timer",
                    "send_sequence",
                    "receive_sequence",
                    "priority",
                ],
                rows,
            )
        }
        CatalogView::ConversationGroups => {
            let rows = broker
                .conversation_groups()
                .into_iter()
                .map(|g| {
                    vec![
                        Value::Guid(g.group.0),
                        Value::Text(g.queue),
                        int(g.conversations),
                        int(g.messages),
                        flag(g.locked),
                    ]
                })
                .collect();
            (
                &[
                    "conversation_group_id",
                    "queue_name",
                    "conversations",
                    "messages",
                    "is_locked",
                ],
                rows,
            )
        }
        CatalogView::TransmissionQueue => {
            let rows = broker
                .transmission_queue()
                .into_iter()
                .map(|t| {
                    vec![
                        Value::Guid(t.conversation_handle.0),
                        Value::Text(t.to_service),
                        t.to_broker_instance
                            .map_or(Value::Null, |b| Value::Guid(b.0)),
                        Value::Text(t.from_service),
                        Value::Text(t.contract),
                        int(t.sequence),
                        Value::Text(t.message_type),
                        flag(t.is_conversation_error),
                        flag(t.is_end_of_dialog),
                        int(t.body_bytes),
                        Value::Text(t.transmission_status),
                    ]
                })
                .collect();
            (
                &[
                    "conversation_handle",
                    "to_service_name",
                    "to_broker_instance",
                    "from_service_name",
                    "service_contract_name",
                    "message_sequence_number",
                    "message_type_name",
                    "is_conversation_error",
                    "is_end_of_dialog",
                    "message_body_bytes",
                    "transmission_status",
                ],
                rows,
            )
        }
        CatalogView::ServiceQueues => {
            let rows = broker
                .queues()
                .into_iter()
                .map(|q| {
                    vec![
                        Value::Text(q.name),
                        flag(q.options.enabled),
                        flag(q.options.retention),
                        flag(q.options.poison_message_handling),
                        int(q.messages),
                        int(q.groups_with_messages),
                        int(q.retained_messages),
                    ]
                })
                .collect();
            (
                &[
                    "name",
                    "is_receive_enabled",
                    "is_retention_enabled",
                    "is_poison_message_handling_enabled",
                    "messages",
                    "groups_with_messages",
                    "retained_messages",
                ],
                rows,
            )
        }
        CatalogView::Services => {
            let rows = broker
                .catalog()
                .services
                .into_values()
                .map(|s| vec![Value::Text(s.name), Value::Text(s.queue)])
                .collect();
            (&["name", "queue_name"], rows)
        }
        CatalogView::ServiceContracts => {
            let rows = broker
                .catalog()
                .contracts
                .into_keys()
                .map(|name| vec![Value::Text(name)])
                .collect();
            (&["name"], rows)
        }
        CatalogView::ServiceMessageTypes => {
            let rows = broker
                .catalog()
                .message_types
                .into_values()
                .map(|t| {
                    vec![
                        Value::Text(t.name),
                        Value::Text(validation_code(t.validation).to_owned()),
                        Value::Text(t.validation.name().to_owned()),
                    ]
                })
                .collect();
            (&["name", "validation", "validation_desc"], rows)
        }
        CatalogView::Routes => {
            let rows = broker
                .catalog()
                .routes
                .into_values()
                .map(|r| {
                    vec![
                        Value::Text(r.name),
                        opt_text(r.service_name.as_deref()),
                        r.broker_instance.map_or(Value::Null, |b| Value::Guid(b.0)),
                        opt_ms(r.expires_at_ms),
                        Value::Text(r.address.to_string()),
                        Value::Null,
                    ]
                })
                .collect();
            (
                &[
                    "name",
                    "remote_service_name",
                    "broker_instance",
                    "lifetime",
                    "address",
                    "mirror_address",
                ],
                rows,
            )
        }
        CatalogView::ConversationPriorities => {
            let rows = broker
                .catalog()
                .priorities
                .into_values()
                .map(|p| {
                    vec![
                        Value::Text(p.name),
                        opt_text(p.contract.as_deref()),
                        opt_text(p.local_service.as_deref()),
                        opt_text(p.remote_service.as_deref()),
                        Value::Int(i64::from(p.level)),
                    ]
                })
                .collect();
            (
                &[
                    "name",
                    "service_contract_name",
                    "local_service_name",
                    "remote_service_name",
                    "priority",
                ],
                rows,
            )
        }
    }
}
