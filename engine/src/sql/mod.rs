//! Herald's T-SQL: a hand-written lexer and recursive-descent parser for Service Broker's
//! statements, producing a typed syntax tree ([`Statement`]), and [`Session`], which runs a
//! script against a [`Broker`](crate::Broker) and may still reject what parses (an ACTIVATION
//! procedure, a mirror address, a variable of the wrong type).
//!
//! ```
//! use herald_engine::sql::{self, Statement};
//! let script = "CREATE QUEUE dbo.OrderQueue WITH RETENTION = OFF;\nGO\nBEGIN TRAN SEND ON CONVERSATION @h";
//! let statements = sql::parse(script)?;
//! assert!(matches!(&statements[0], Statement::CreateQueue(q) if q.name.name == "OrderQueue"));
//! let error = sql::parse("BEGIN DIALOG @h FROM SERVIC s").unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     "syntax error at line 1, column 22: expected SERVICE after FROM, found 'SERVIC'"
//! );
//! # Ok::<(), herald_engine::Error>(())
//! ```
//!
//! # Scripts
//! A script is statements separated by `;`, by `GO` lines, or by nothing but whitespace (as
//! T-SQL allows: a statement ends where the next one's first keyword starts). Keywords are
//! case-insensitive. Names are bare (`OrderQueue`), `[bracketed]` or `"quoted"`; Service
//! Broker's object names (message types, contracts, services, routes, priorities) may also be
//! strings (`'//shop/Order'`). Literals: `'text'` (`''` for a quote), `N'text'`, `0x0A0B`,
//! integers (a leading `-` where negative values mean something). Comments: `-- …` and nestable
//! `/* … */`. Variables: `@name`.
//!
//! # Grammar
//! ```text
//! CREATE MESSAGE TYPE name [AUTHORIZATION owner]
//!     [VALIDATION = NONE | EMPTY | WELL_FORMED_XML | UTF8 | JSON]
//! CREATE CONTRACT name [AUTHORIZATION owner] ( type SENT BY INITIATOR | TARGET | ANY [, …] )
//! CREATE QUEUE queue [WITH option [, …]] [ON filegroup | [DEFAULT]]
//! ALTER QUEUE queue WITH option [, …]
//!     option: STATUS = ON|OFF | RETENTION = ON|OFF | POISON_MESSAGE_HANDLING ( STATUS = ON|OFF )
//!           | ACTIVATION ( DROP )                              -- ALTER only
//!           | ACTIVATION ( STATUS = ON|OFF, PROCEDURE_NAME = proc, MAX_QUEUE_READERS = 0..32767,
//!                          EXECUTE AS SELF | OWNER | 'user' )  -- any subset, any order
//! CREATE SERVICE name [AUTHORIZATION owner] ON QUEUE queue [( contract [, …] )]
//! CREATE ROUTE name [AUTHORIZATION owner] WITH route_option [, …]      -- ADDRESS required
//! ALTER ROUTE name WITH route_option [, …]
//!     route_option: SERVICE_NAME = 'svc' | BROKER_INSTANCE = 'guid' | LIFETIME = seconds
//!                 | ADDRESS = 'LOCAL' | 'TCP://host:port' | 'quic://host:port'
//!                 | MIRROR_ADDRESS = 'TCP://host:port' | 'quic://host:port'
//! CREATE BROKER PRIORITY name FOR CONVERSATION SET ( [CONTRACT_NAME = name | ANY]
//!     [[,] LOCAL_SERVICE_NAME = name | ANY] [[,] REMOTE_SERVICE_NAME = 'name' | ANY]
//!     [[,] PRIORITY_LEVEL = 1..10 | DEFAULT] )                         -- at least one
//! DROP MESSAGE TYPE | CONTRACT | QUEUE | SERVICE | ROUTE | BROKER PRIORITY name
//! BEGIN DIALOG [CONVERSATION] @handle FROM SERVICE name TO SERVICE 'name'
//!     [, 'broker_guid' | 'CURRENT DATABASE'] [ON CONTRACT name]
//!     [WITH [RELATED_CONVERSATION = h | RELATED_CONVERSATION_GROUP = g] [, LIFETIME = n]
//!           [, ENCRYPTION = ON|OFF]]                             -- any order
//! SEND ON CONVERSATION h | ( h [, …] ) [MESSAGE TYPE name] [( expression )]
//! [WAITFOR (] RECEIVE [TOP (n)] * | item [, …] FROM queue [INTO @table]
//!     [WHERE conversation_handle = h | conversation_group_id = g] [)] [, TIMEOUT ms]
//!     item: [@var =] column | CAST(column AS type) | CONVERT(type, column) [[AS] alias]
//! [WAITFOR (] GET CONVERSATION GROUP @g FROM queue [)] [, TIMEOUT ms]
//! MOVE CONVERSATION h TO g
//! END CONVERSATION h [WITH ERROR = code DESCRIPTION = 'text' | WITH CLEANUP]
//! BEGIN CONVERSATION TIMER ( h ) TIMEOUT = seconds
//! BEGIN TRAN[SACTION] | COMMIT [TRAN[SACTION]] | ROLLBACK [TRAN[SACTION]]
//! DECLARE @var [AS] type [= expression] [, …]
//! SET @var = expression
//! SELECT expression [[AS] alias] [, …]  |  SELECT @var = expression [, …]
//! SELECT * | item [, …] FROM sys.view | queue [WHERE column = value [AND …]]
//!     sys.view: conversation_endpoints, conversation_groups, transmission_queue,
//!               service_queues, services, service_contracts, service_message_types, routes,
//!               conversation_priorities
//! USE database
//! IF condition statement | BEGIN … END [ELSE statement | BEGIN … END]
//!     condition: expression = | <> | != expression  |  expression IS [NOT] NULL
//! BEGIN statement … END
//!
//! queue: [database.][schema.]name         h, g: @variable | 'GUID string'
//! n, ms, seconds, code: integer | @variable (TIMEOUT ms may be -1: wait forever)
//! expression: 'text' | N'text' | 0x… | integer | NULL | @var | ( expression )
//!           | CAST(expression AS type) | CONVERT(type, expression)
//! type: NAME [( n | MAX [, scale] )]
//! ```
//!
//! # How the parser differs from T-SQL
//! - Simpler: expressions have no operators or function calls (only CAST / CONVERT); IF takes
//!   one comparison (no AND / OR / NOT, no parentheses around the condition, no EXISTS);
//!   SELECT … WHERE takes only `column = value` joined by AND; no TOP in SELECT; names are at
//!   most [`NAME_BYTES_MAX`] bytes (T-SQL's nvarchar(256)); the catalog's own, shorter limit
//!   (`catalog::NAME_BYTES_MAX`) is checked when a statement runs.
//! - More lenient: options inside WITH may come in any order; Service Broker names may be
//!   strings; the UTF8 and JSON validations are Herald's.
//! - Reserved words (AS, FROM, ON, TO, WITH, ANY, DEFAULT, NULL, the statement keywords, …) are
//!   not bare names: bracket them (`[Status]` is not needed, `[From]` is). This is what lets a
//!   statement follow the previous one without a `;`.
//! - Rejected with "… is not supported by Herald" and the position: VALIDATION = VALID_XML WITH
//!   SCHEMA COLLECTION, ADDRESS = 'TRANSPORT', ALTER QUEUE … REBUILD / REORGANIZE / MOVE TO,
//!   ALTER MESSAGE TYPE / SERVICE / BROKER PRIORITY / CONTRACT, CREATE / ALTER / DROP of
//!   ENDPOINT, REMOTE SERVICE BINDING, CERTIFICATE, MASTER KEY, DATABASE, TABLE, PROCEDURE, …,
//!   IF EXISTS, IF NOT, AND / OR in conditions, WAITFOR DELAY / TIME, BEGIN TRY / CATCH /
//!   DISTRIBUTED, DECLARE … TABLE / CURSOR, SET options (SET NOCOUNT ON), CONVERT with a style,
//!   GO with a count, decimal numbers, and INSERT, UPDATE, DELETE, EXEC, PRINT, WHILE, RETURN,
//!   GRANT, … (every other T-SQL statement is "expected a statement").
//! - Not kept in the tree: spelling (case, brackets or quotes, noise words, parentheses);
//!   `Display` prints one canonical form that parses back to the same tree.
//!
//! # Running scripts
//! ```
//! # let dir = tempfile::tempdir().unwrap();
//! use herald_engine::{Broker, Options, sql::{Session, Value}};
//! let broker = Broker::open(dir.path(), Options::default())?;
//! let mut session = Session::new(&broker);
//! session.execute("CREATE QUEUE Q; CREATE SERVICE S ON QUEUE Q ([DEFAULT]);
//!     DECLARE @h UNIQUEIDENTIFIER;
//!     BEGIN DIALOG @h FROM SERVICE S TO SERVICE 'S';
//!     SEND ON CONVERSATION @h (N'hello');")?;
//! let results = session.execute("RECEIVE CAST(message_body AS NVARCHAR(MAX)) AS body FROM Q")?;
//! let rows = &results[0].result.as_ref().unwrap().rows;
//! assert_eq!(rows[0][0], Value::Text("hello".into()));
//! # Ok::<(), herald_engine::Error>(())
//! ```
//! A [`Session`] is one connection's state: its variables (kept across `execute` calls), its
//! explicit transaction, the database `USE` named. Its rules:
//! - The whole script is parsed, and its DECLAREs checked, before anything runs: a syntax error,
//!   a variable declared twice in one script, or an unknown data type runs nothing.
//! - Outside `BEGIN TRAN` each statement runs in a transaction of its own, committed if it
//!   succeeds and rolled back if it fails (autocommit). `BEGIN TRAN` nests (`@@TRANCOUNT`);
//!   only the outermost `COMMIT` commits; `ROLLBACK` rolls everything back. Dropping a session
//!   rolls back its open transaction.
//! - A runtime error stops the script at that statement: [`Error::Statement`](crate::Error)
//!   with the line and column of the top-level statement (an IF or BEGIN … END holding it) and
//!   the kind of the statement that failed. Inside an explicit transaction the transaction
//!   stays open with the work before the failed statement (which changed nothing), as SQL
//!   Server leaves it for most errors; the one exception is a RECEIVE that took messages and
//!   then could not return them (a CAST of its rows failed, or a limit was hit): it rolls the
//!   transaction back, so that no message is consumed unseen. `Session::transaction_count`
//!   tells which. [`Session::execute_script`] keeps the results of the statements that ran.
//! - Results: one [`StatementResult`] per statement run (the statements inside IF and
//!   BEGIN … END, not the IF or block themselves); RECEIVE and SELECT return a [`ResultSet`]
//!   unless they assign variables (`@v = column`, from the last row; no rows leaves the
//!   variables as they were). `@@ROWCOUNT` is the last statement's row count.
//! - Values ([`Value`]): integers (INT, BIGINT, SMALLINT, TINYINT, BIT), text (NVARCHAR,
//!   VARCHAR, NCHAR, CHAR, SYSNAME, XML, NTEXT, TEXT), binary (VARBINARY, BINARY, IMAGE),
//!   UNIQUEIDENTIFIER. Text and binary values longer than their type are cut to it, as in T-SQL
//!   (a length defaults to 1 in DECLARE and 30 in CAST, as in T-SQL).
//! - Statement mapping: BEGIN DIALOG's `'CURRENT DATABASE'` is this broker; LIFETIME, TIMER and
//!   route LIFETIME are seconds on the broker's clock; SEND's MESSAGE TYPE and BEGIN DIALOG's
//!   ON CONTRACT default to DEFAULT; WAITFOR without TIMEOUT or with −1 waits forever. Queue
//!   names drop their database and a `dbo` schema (`dbo.Q` is `Q`); another schema stays part
//!   of the name (`sales.Q`). SELECT … FROM a queue reads without locking or consuming.
//!
//! # How the executor differs from SQL Server
//! - Text is UTF-8: NVARCHAR → VARBINARY (a SEND body) gives UTF-8 bytes, not UTF-16, and
//!   VARBINARY → NVARCHAR (`CAST(message_body AS NVARCHAR(MAX))`) reads UTF-8 (an error if the
//!   bytes are not); lengths count characters. XML is text: its well-formedness is checked by
//!   the message type's VALIDATION at SEND, not by a CAST. Comparisons are exact (a binary
//!   collation: case counts in values); variable and column names are case-insensitive.
//! - Variables live for the session, not the batch: a later script may use them; a script
//!   that DECLAREs one again starts it over as NULL.
//! - Not supported (an error naming it): ACTIVATION with PROCEDURE_NAME (activation is the Rust
//!   API, `Broker::activate`; other ACTIVATION options, meaningless without a procedure, are
//!   ignored), MIRROR_ADDRESS, RECEIVE … INTO a table variable, data types other than the above,
//!   system functions other than `@@ROWCOUNT` and `@@TRANCOUNT`.
//! - Accepted and ignored: ENCRYPTION (Herald encrypts links between nodes with TLS, for every
//!   dialog), AUTHORIZATION and EXECUTE AS (Herald has no principals), `ON filegroup`, the
//!   database in `USE` (recorded: `Session::database`).
//! - Catalog views and queues show committed state: inside an explicit transaction a SELECT
//!   does not see the transaction's own changes, and RECEIVE's `priority`, `service_name` and
//!   `service_contract_name` are NULL for a conversation the open transaction began. Views
//!   name objects (`service_name`, `queue_name`, `service_contract_name`) where SQL Server has
//!   ids, times are milliseconds since the UNIX epoch (`lifetime`, `dialog_timer`), and
//!   `sys.transmission_queue` has `message_body_bytes` instead of `message_body`. Herald adds
//!   counts to `sys.service_queues` (`messages`, `groups_with_messages`, `retained_messages`)
//!   and `sys.conversation_groups` (`conversations`, `messages`, `is_locked`).
//! - RECEIVE returns `status, priority, queuing_order, conversation_group_id,
//!   conversation_handle, message_sequence_number, service_name, service_contract_name,
//!   message_type_name, validation, message_body` (no `*_id` columns, no enqueue time); it takes
//!   at most [`RESULT_ROWS_MAX`] messages (the rest stay queued), where SQL Server has no cap.
//!
//! # Limits
//! The executor: [`RESULT_ROWS_MAX`] rows per statement (a longer SELECT fails with
//! `Error::Limit`), [`RESULT_BYTES_MAX`] bytes of results per `execute` (a RECEIVE whose rows
//! would pass it fails and is rolled back: bound big bodies with TOP), [`VARIABLES_MAX`]
//! variables per session, [`VALUE_BYTES_MAX`] bytes per value (the largest message body),
//! [`TRANSACTION_NESTING_MAX`] levels of BEGIN TRAN.
//!
//! The parser: [`SCRIPT_BYTES_MAX`] bounds a script, [`STATEMENTS_MAX`] its statements, [`LIST_ITEMS_MAX`]
//! the items of its lists, [`NAME_BYTES_MAX`] every name and variable,
//! [`EXPRESSION_DEPTH_MAX`] the nesting of expressions, and [`BLOCK_DEPTH_MAX`] the nesting of
//! IF and BEGIN … END, so that no input can exhaust memory or the stack.

mod ast;
mod display;
mod exec;
mod lexer;
mod parser;

pub use ast::*;
pub use exec::{
    RESULT_BYTES_MAX, RESULT_ROWS_MAX, ResultSet, ScriptOutcome, Session, StatementResult,
    TRANSACTION_NESTING_MAX, VALUE_BYTES_MAX, VARIABLES_MAX, Value,
};

use crate::error::{Error, Result};

/// Longest script, in bytes. Scripts are typed or generated by tools, not bulk data; a bound
/// keeps a hostile input from costing more than a few times this in tokens.
pub const SCRIPT_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Longest name (identifier, string used as a name, variable name without its `@`), in UTF-8
/// bytes: T-SQL's nvarchar(256), the type of Service Broker's names.
pub const NAME_BYTES_MAX: usize = 256;
/// Most statements in a script, those inside IF and BEGIN … END included. The tree costs a
/// few hundred bytes a statement, so this keeps a script of `COMMIT;` repeated to
/// `SCRIPT_BYTES_MAX` from costing a gigabyte; split bigger batches into several scripts.
pub const STATEMENTS_MAX: usize = 65_536;
/// Most items of comma-separated lists (SEND's conversation handles, column lists, DECLARE's
/// variables, a contract's message types, a service's contracts, WHERE's conditions) in a
/// script, all statements together: with `STATEMENTS_MAX`, this bounds the tree's memory to tens
/// of megabytes, where `SCRIPT_BYTES_MAX` alone would let `@h,` repeated cost hundreds.
pub const LIST_ITEMS_MAX: usize = 65_536;
/// Deepest nesting of an expression: each CAST, CONVERT and pair of parentheses is a level, and
/// so is the innermost value (`'x'` is depth 1, `CAST('x' AS XML)` depth 2).
pub const EXPRESSION_DEPTH_MAX: usize = 32;
/// Deepest nesting of IF and BEGIN … END: each IF is a level, and so is each block that is not
/// the branch of an IF (so `IF c BEGIN … END` is depth 1, `BEGIN BEGIN … END END` depth 2).
pub const BLOCK_DEPTH_MAX: usize = 32;

/// Parses a script into its statements.
pub fn parse(text: &str) -> Result<Vec<Statement>> {
    Ok(parse_located(text)?
        .into_iter()
        .map(|located| located.statement)
        .collect())
}

/// Parses a script into its statements, each with the line and column where it starts.
pub fn parse_located(text: &str) -> Result<Vec<Located>> {
    if text.len() > SCRIPT_BYTES_MAX {
        return Err(SyntaxError {
            line: 1,
            column: 1,
            message: format!(
                "script of {} bytes is longer than the maximum of {SCRIPT_BYTES_MAX} bytes",
                text.len()
            ),
        }
        .into());
    }
    Ok(parser::parse_script(text)?)
}

/// Prints statements as a script that [`parse`] reads back to the same statements.
pub fn render(statements: &[Statement]) -> String {
    let mut script = String::new();
    for statement in statements {
        script.push_str(&statement.to_string());
        script.push_str(";\n");
    }
    script
}

/// Fuzzing entry point: parsing arbitrary bytes never panics, and what parses prints as a
/// script that parses back to the same statements.
#[doc(hidden)]
pub fn fuzz_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(statements) = parse(text) {
        let script = render(&statements);
        // The canonical form may be longer than the input (brackets, `N` prefixes, spelled-out
        // keywords): a script close to the limit may print past it.
        if script.len() > SCRIPT_BYTES_MAX {
            return;
        }
        match parse(&script) {
            Ok(again) => assert_eq!(again, statements, "re-parsing:\n{script}"),
            Err(e) => panic!("the rendered script does not parse ({e}):\n{script}"),
        }
    }
}

/// A syntax error before it becomes [`Error::Syntax`]; lexer and parser return this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub line: u32,
    pub column: u32,
    pub message: String,
}

impl From<SyntaxError> for Error {
    fn from(e: SyntaxError) -> Error {
        Error::Syntax {
            line: e.line,
            column: e.column,
            message: e.message,
        }
    }
}
