//! The recursive-descent parser: tokens to [`Located`] statements.
//!
//! One method per grammar rule, named for it. Every error names what was expected, after what,
//! and quotes what was found, at the found token's position. Recursion happens only in
//! expressions (`CAST`, parentheses; bounded by `EXPRESSION_DEPTH_MAX`) and in `IF` and
//! `BEGIN … END` (bounded by `BLOCK_DEPTH_MAX`), so no input can overflow the stack.

use std::collections::VecDeque;

use super::ast::*;
use super::lexer::{Lexer, Symbol, Token, TokenKind, quote, truncate};
use super::{
    BLOCK_DEPTH_MAX, EXPRESSION_DEPTH_MAX, LIST_ITEMS_MAX, NAME_BYTES_MAX, STATEMENTS_MAX,
    SyntaxError,
};
use crate::catalog::{SentBy, Validation};
use crate::ids::{ConversationGroupId, ConversationHandle};

type PResult<T> = Result<T, SyntaxError>;

/// Largest value of T-SQL's `int`, the type of lifetimes, timeouts and error codes.
const INT_MAX: i64 = i32::MAX as i64;

/// Words that start a statement Herald runs. With `UNSUPPORTED_STATEMENTS`, the words that start
/// any statement: after a statement, one of these (or `;`, `GO`, the end) must follow, which is
/// how T-SQL lets statements follow without a `;`.
const STATEMENT_WORDS: &[&str] = &[
    "ALTER", "BEGIN", "COMMIT", "CREATE", "DECLARE", "DROP", "ELSE", "END", "GET", "GO", "IF",
    "MOVE", "RECEIVE", "ROLLBACK", "SELECT", "SEND", "SET", "USE", "WAITFOR",
];

/// Whether `word` starts a statement, supported or not.
fn starts_statement(word: &str) -> bool {
    STATEMENT_WORDS
        .iter()
        .chain(UNSUPPORTED_STATEMENTS)
        .any(|w| word.eq_ignore_ascii_case(w))
}

/// T-SQL statements Herald knows but does not run.
const UNSUPPORTED_STATEMENTS: &[&str] = &[
    "BREAK",
    "CONTINUE",
    "DELETE",
    "DENY",
    "EXEC",
    "EXECUTE",
    "GOTO",
    "GRANT",
    "INSERT",
    "MERGE",
    "PRINT",
    "RAISERROR",
    "RETURN",
    "REVOKE",
    "SAVE",
    "THROW",
    "TRUNCATE",
    "UPDATE",
    "WHILE",
    "WITH",
];

/// Words that may not be a bare name (bracket them to use them as one), so that a missing name
/// or a statement that follows without `;` is not silently read as a name or an alias.
const RESERVED: &[&str] = &[
    "AND",
    "ANY",
    "AS",
    "AUTHORIZATION",
    "BY",
    "CAST",
    "CONVERT",
    "DEFAULT",
    "EXISTS",
    "FOR",
    "FROM",
    "INTO",
    "IS",
    "NOT",
    "NULL",
    "ON",
    "OR",
    "TABLE",
    "TO",
    "TOP",
    "TRAN",
    "TRANSACTION",
    "WHERE",
];

/// Object kinds of T-SQL's CREATE / ALTER / DROP that Herald does not have.
const UNSUPPORTED_KINDS: &[&str] = &[
    "APPLICATION",
    "ASSEMBLY",
    "ASYMMETRIC",
    "AUTHORIZATION",
    "CERTIFICATE",
    "CREDENTIAL",
    "DATABASE",
    "ENDPOINT",
    "EVENT",
    "FUNCTION",
    "INDEX",
    "LOGIN",
    "MASTER",
    "PARTITION",
    "PROC",
    "PROCEDURE",
    "REMOTE",
    "ROLE",
    "SCHEMA",
    "SEQUENCE",
    "STATISTICS",
    "SYMMETRIC",
    "SYNONYM",
    "TABLE",
    "TRIGGER",
    "TYPE",
    "USER",
    "VIEW",
    "XML",
];

/// Tokens the parser looks at beyond the cursor (`BEGIN` then `DIALOG`, `@v` then `=`).
const TOKENS_AHEAD: usize = 2;
/// Tokens kept behind the cursor, for the parser's short backtracks (the longest: from `CONVERT`
/// back over `CONVERT ( NAME ( n , s ) ,`, 9 tokens).
const TOKENS_BEHIND: usize = 16;

/// The most tokens the parser holds, whatever the script.
const WINDOW_TOKENS_MAX: usize = 2 * TOKENS_BEHIND + TOKENS_AHEAD + 1;

pub(crate) fn parse_script(text: &str) -> PResult<Vec<Located>> {
    let mut parser = Parser {
        text,
        lexer: Lexer::new(text),
        window: VecDeque::new(),
        base: 0,
        pos: 0,
        expression_depth: 0,
        block_depth: 0,
        statements: 0,
        list_items: 0,
    };
    parser.fill();
    parser.script()
}

struct Parser<'a> {
    text: &'a str,
    lexer: Lexer<'a>,
    /// The tokens from index `base` on: at least `TOKENS_AHEAD` past the cursor (or through
    /// `Eof`), and at most `2 * TOKENS_BEHIND` before it, so memory stays small whatever the
    /// script's length.
    window: VecDeque<Token>,
    base: usize,
    /// Index of the current token; never moves past `Eof`.
    pos: usize,
    expression_depth: usize,
    block_depth: usize,
    /// Statements begun so far, nested ones included (bounded by `STATEMENTS_MAX`).
    statements: usize,
    /// Items of comma-separated lists so far, in all statements (bounded by `LIST_ITEMS_MAX`).
    list_items: usize,
}

/// An item of a column list before the parser knows whether it is a RECEIVE / SELECT … FROM
/// column or a SELECT value.
enum Term {
    Column {
        column: String,
        cast: Option<TypeName>,
    },
    Value(Expr),
}

struct RawItem {
    term: Term,
    alias: Option<String>,
    assign_to: Option<String>,
    /// The item's first token, for errors found once the list is complete.
    at: Token,
}

impl Parser<'_> {
    // ---- script, statements, blocks ----

    fn script(&mut self) -> PResult<Vec<Located>> {
        let mut statements = Vec::new();
        loop {
            while self.eat_symbol(Symbol::Semicolon) || self.eat_go() {}
            if self.at_eof() {
                return Ok(statements);
            }
            let (line, column) = (self.peek().line, self.peek().column);
            let statement = self.statement()?;
            self.end_of_statement(&statement)?;
            statements.push(Located {
                line,
                column,
                statement,
            });
        }
    }

    /// After a statement: `;`, `GO`, the end, or the start of another statement.
    fn end_of_statement(&self, statement: &Statement) -> PResult<()> {
        let token = self.peek();
        let ok = match &token.kind {
            TokenKind::Eof | TokenKind::Go | TokenKind::Symbol(Symbol::Semicolon) => true,
            TokenKind::Word => starts_statement(self.word_text(token)),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(self.expected(&format!(
                "';' or a new statement after {}",
                statement.kind()
            )))
        }
    }

    fn statement(&mut self) -> PResult<Statement> {
        let token = self.peek().clone();
        self.statements += 1;
        if self.statements > STATEMENTS_MAX {
            return Err(self.error_at(
                &token,
                format!("script has more than {STATEMENTS_MAX} statements"),
            ));
        }
        if token.kind == TokenKind::Go {
            return Err(self.error_at(&token, "GO inside BEGIN … END or IF".into()));
        }
        if token.kind != TokenKind::Word {
            return Err(self.expected("a statement"));
        }
        let word = self.word_text(&token).to_ascii_uppercase();
        match word.as_str() {
            "CREATE" => self.create(),
            "ALTER" => self.alter(),
            "DROP" => self.drop_statement(),
            "BEGIN" => self.begin(),
            "SEND" => self.send(),
            "RECEIVE" => self.receive(None).map(Statement::Receive),
            "GET" => self.get_conversation_group(None),
            "WAITFOR" => self.waitfor(),
            "MOVE" => self.move_conversation(),
            "END" => self.end_conversation(),
            "COMMIT" | "ROLLBACK" => {
                self.advance();
                if !self.eat_keyword("TRANSACTION") {
                    self.eat_keyword("TRAN");
                }
                Ok(if word == "COMMIT" {
                    Statement::Commit
                } else {
                    Statement::Rollback
                })
            }
            "DECLARE" => self.declare(),
            "SET" => self.set(),
            "SELECT" => self.select(),
            "USE" => {
                self.advance();
                let database = self.identifier("a database name after USE")?;
                Ok(Statement::Use(Use { database }))
            }
            "IF" => self.if_statement(),
            "ELSE" => Err(self.error_at(&token, "ELSE without IF".into())),
            "GO" => Err(self.error_at(
                &token,
                "GO must stand alone on its line (GO with a count is not supported by Herald)"
                    .into(),
            )),
            w if UNSUPPORTED_STATEMENTS.contains(&w) => Err(self.not_supported(&token, w)),
            _ => Err(self.expected("a statement")),
        }
    }

    fn begin(&mut self) -> PResult<Statement> {
        let begin = self.advance();
        let next = self.peek().clone();
        let word = if next.kind == TokenKind::Word {
            self.word_text(&next).to_ascii_uppercase()
        } else {
            String::new()
        };
        match word.as_str() {
            "DIALOG" => self.begin_dialog(),
            "CONVERSATION" => self.begin_conversation_timer(),
            "TRAN" | "TRANSACTION" => {
                self.advance();
                Ok(Statement::BeginTransaction)
            }
            "TRY" | "CATCH" | "DISTRIBUTED" | "ATOMIC" => {
                Err(self.not_supported(&begin, &format!("BEGIN {word}")))
            }
            _ => {
                self.pos -= 1;
                Ok(Statement::Block(Block {
                    statements: self.block()?,
                }))
            }
        }
    }

    /// True when the cursor is on a `BEGIN` that opens a block (not `BEGIN DIALOG`, …).
    fn at_block(&self) -> bool {
        self.at_keyword("BEGIN")
            && !["DIALOG", "CONVERSATION", "TRAN", "TRANSACTION"]
                .iter()
                .any(|w| self.keyword_at(self.pos + 1, w))
    }

    /// `BEGIN statement … END`; the cursor is on `BEGIN`.
    fn block(&mut self) -> PResult<Vec<Statement>> {
        let begin = self.peek().clone();
        self.enter_block(&begin)?;
        let statements = self.block_body()?;
        self.block_depth -= 1;
        Ok(statements)
    }

    /// The statements of a block, through its `END`. Not a nesting level of its own: an IF's
    /// block belongs to the IF (so `IF c x` and `IF c BEGIN x END`, which `Display` prints for
    /// it, are equally deep).
    fn block_body(&mut self) -> PResult<Vec<Statement>> {
        let begin = self.advance();
        let mut statements = Vec::new();
        loop {
            while self.eat_symbol(Symbol::Semicolon) {}
            if self.at_keyword("END") && !self.keyword_at(self.pos + 1, "CONVERSATION") {
                if statements.is_empty() {
                    return Err(self.error_at(
                        &self.peek().clone(),
                        "a BEGIN … END block needs at least one statement".into(),
                    ));
                }
                self.advance();
                return Ok(statements);
            }
            if self.at_eof() {
                return Err(self.expected(&format!(
                    "END to close the BEGIN at line {}, column {}",
                    begin.line, begin.column
                )));
            }
            let statement = self.statement()?;
            self.end_of_statement(&statement)?;
            statements.push(statement);
        }
    }

    /// Counts one more item of a comma-separated list against `LIST_ITEMS_MAX`.
    fn count_list_item(&mut self) -> PResult<()> {
        self.list_items += 1;
        if self.list_items > LIST_ITEMS_MAX {
            return Err(self.error_at(
                &self.peek().clone(),
                format!(
                    "script has more than {LIST_ITEMS_MAX} list items (conversation handles, \
                     columns, variables, contracts, message types, conditions)"
                ),
            ));
        }
        Ok(())
    }

    fn enter_block(&mut self, at: &Token) -> PResult<()> {
        self.block_depth += 1;
        if self.block_depth > BLOCK_DEPTH_MAX {
            return Err(self.error_at(
                at,
                format!("IF and BEGIN … END are nested more than {BLOCK_DEPTH_MAX} deep"),
            ));
        }
        Ok(())
    }

    fn if_statement(&mut self) -> PResult<Statement> {
        let if_token = self.advance();
        self.enter_block(&if_token)?;
        if self.at_keyword("EXISTS") {
            return Err(self.not_supported(&self.peek().clone(), "IF EXISTS"));
        }
        if self.at_keyword("NOT") {
            return Err(self.not_supported(&self.peek().clone(), "IF NOT"));
        }
        let condition = self.condition()?;
        let then = self.branch()?;
        // T-SQL allows `;` before ELSE; where no ELSE follows, the `;` were separators anyway.
        while self.eat_symbol(Symbol::Semicolon) {}
        let otherwise = if self.eat_keyword("ELSE") {
            Some(self.branch()?)
        } else {
            None
        };
        self.block_depth -= 1;
        Ok(Statement::If(If {
            condition,
            then,
            otherwise,
        }))
    }

    /// The statement, or block of statements, of an IF or ELSE.
    fn branch(&mut self) -> PResult<Vec<Statement>> {
        if self.at_block() {
            return self.block_body();
        }
        if self.at_symbol(Symbol::Semicolon) || self.at_eof() || self.peek().kind == TokenKind::Go {
            return Err(self.expected("a statement or BEGIN … END after the IF condition"));
        }
        let statement = self.statement()?;
        self.end_of_statement(&statement)?;
        Ok(vec![statement])
    }

    fn condition(&mut self) -> PResult<Condition> {
        let left = self.expression("a value to test after IF")?;
        if self.eat_keyword("IS") {
            let negated = self.eat_keyword("NOT");
            self.expect_keyword("NULL", if negated { "IS NOT" } else { "IS" })?;
            return Ok(Condition::IsNull {
                value: left,
                negated,
            });
        }
        let op = if self.eat_symbol(Symbol::Eq) {
            CompareOp::Eq
        } else if self.eat_symbol(Symbol::NotEq) {
            CompareOp::NotEq
        } else {
            return Err(self.expected("=, <>, != or IS [NOT] NULL in the IF condition"));
        };
        let right = self.expression("a value to compare with")?;
        if self.at_keyword("AND") || self.at_keyword("OR") {
            return Err(self.not_supported(&self.peek().clone(), "AND / OR in an IF condition"));
        }
        Ok(Condition::Compare { left, op, right })
    }

    // ---- CREATE / ALTER / DROP ----

    fn create(&mut self) -> PResult<Statement> {
        self.advance();
        let kind = self.object_kind("CREATE", &[])?;
        match kind {
            ObjectKind::MessageType => self.create_message_type(),
            ObjectKind::Contract => self.create_contract(),
            ObjectKind::Queue => self.create_queue(),
            ObjectKind::Service => self.create_service(),
            ObjectKind::Route => self.create_route(),
            ObjectKind::BrokerPriority => self.create_broker_priority(),
        }
    }

    fn alter(&mut self) -> PResult<Statement> {
        self.advance();
        match self.object_kind("ALTER", &["QUEUE", "ROUTE"])? {
            ObjectKind::Queue => self.alter_queue(),
            _ => self.alter_route(),
        }
    }

    fn drop_statement(&mut self) -> PResult<Statement> {
        self.advance();
        let kind = self.object_kind("DROP", &[])?;
        let what = format!(
            "a {} name after DROP {}",
            kind.keyword().to_lowercase(),
            kind.keyword()
        );
        let name = if kind == ObjectKind::Queue {
            self.object_name(&what)?
        } else {
            ObjectName::bare(self.name(&what)?)
        };
        Ok(Statement::Drop(DropObject { kind, name }))
    }

    /// The object kind after CREATE / ALTER / DROP. `only` limits the kinds (ALTER); empty = all.
    fn object_kind(&mut self, verb: &str, only: &[&str]) -> PResult<ObjectKind> {
        let all = ["MESSAGE", "CONTRACT", "QUEUE", "SERVICE", "ROUTE", "BROKER"];
        let allowed: &[&str] = if verb == "ALTER" { only } else { &all };
        let token = self.peek().clone();
        let word = if token.kind == TokenKind::Word {
            self.word_text(&token).to_ascii_uppercase()
        } else {
            String::new()
        };
        if allowed.contains(&word.as_str()) {
            self.advance();
            return Ok(match word.as_str() {
                "MESSAGE" => {
                    self.expect_keyword("TYPE", &format!("{verb} MESSAGE"))?;
                    ObjectKind::MessageType
                }
                "CONTRACT" => ObjectKind::Contract,
                "QUEUE" => ObjectKind::Queue,
                "SERVICE" => ObjectKind::Service,
                "ROUTE" => ObjectKind::Route,
                _ => {
                    self.expect_keyword("PRIORITY", &format!("{verb} BROKER"))?;
                    ObjectKind::BrokerPriority
                }
            });
        }
        let full = match word.as_str() {
            "MESSAGE" => "MESSAGE TYPE",
            "BROKER" => "BROKER PRIORITY",
            "REMOTE" => "REMOTE SERVICE BINDING",
            "MASTER" => "MASTER KEY",
            "EVENT" => "EVENT NOTIFICATION",
            other => other,
        };
        if all.contains(&word.as_str()) || UNSUPPORTED_KINDS.contains(&word.as_str()) {
            return Err(self.not_supported(&token, &format!("{verb} {full}")));
        }
        let list = if verb == "ALTER" {
            "QUEUE or ROUTE".to_owned()
        } else {
            "MESSAGE TYPE, CONTRACT, QUEUE, SERVICE, ROUTE or BROKER PRIORITY".to_owned()
        };
        Err(self.expected(&format!("{list} after {verb}")))
    }

    fn authorization(&mut self) -> PResult<Option<String>> {
        if self.eat_keyword("AUTHORIZATION") {
            Ok(Some(self.identifier("an owner after AUTHORIZATION")?))
        } else {
            Ok(None)
        }
    }

    fn create_message_type(&mut self) -> PResult<Statement> {
        let name = self.name("a message type name after CREATE MESSAGE TYPE")?;
        let authorization = self.authorization()?;
        let validation = if self.eat_keyword("VALIDATION") {
            self.expect_symbol(Symbol::Eq, "VALIDATION")?;
            let token = self.peek().clone();
            let word = self.word_upper(&token);
            let validation = match word.as_str() {
                "NONE" => Validation::None,
                "EMPTY" => Validation::Empty,
                "WELL_FORMED_XML" => Validation::WellFormedXml,
                "UTF8" => Validation::Utf8,
                "JSON" => Validation::Json,
                "VALID_XML" => {
                    return Err(
                        self.not_supported(&token, "VALIDATION = VALID_XML WITH SCHEMA COLLECTION")
                    );
                }
                _ => {
                    return Err(self.expected(
                        "NONE, EMPTY, WELL_FORMED_XML, UTF8 or JSON after VALIDATION =",
                    ));
                }
            };
            self.advance();
            Some(validation)
        } else {
            None
        };
        Ok(Statement::CreateMessageType(CreateMessageType {
            name,
            authorization,
            validation,
        }))
    }

    fn create_contract(&mut self) -> PResult<Statement> {
        let name = self.name("a contract name after CREATE CONTRACT")?;
        let authorization = self.authorization()?;
        self.expect_symbol(Symbol::LParen, "the contract name")?;
        let mut messages = Vec::new();
        loop {
            self.count_list_item()?;
            let message_type =
                self.name_or_default("a message type name in the contract's list")?;
            self.expect_keyword("SENT", "the message type name")?;
            self.expect_keyword("BY", "SENT")?;
            let sent_by = match self.word_upper(&self.peek().clone()).as_str() {
                "INITIATOR" => SentBy::Initiator,
                "TARGET" => SentBy::Target,
                "ANY" => SentBy::Any,
                _ => return Err(self.expected("INITIATOR, TARGET or ANY after SENT BY")),
            };
            self.advance();
            messages.push(ContractMessage {
                message_type,
                sent_by,
            });
            if !self.eat_symbol(Symbol::Comma) {
                break;
            }
        }
        self.expect_symbol(Symbol::RParen, "the contract's message types")?;
        Ok(Statement::CreateContract(CreateContract {
            name,
            authorization,
            messages,
        }))
    }

    fn create_queue(&mut self) -> PResult<Statement> {
        let name = self.object_name("a queue name after CREATE QUEUE")?;
        let settings = if self.eat_keyword("WITH") {
            self.queue_settings(false)?
        } else {
            QueueSettings::default()
        };
        let filegroup = if self.eat_keyword("ON") {
            Some(self.name_or_default("a filegroup after ON")?)
        } else {
            None
        };
        Ok(Statement::CreateQueue(CreateQueue {
            name,
            settings,
            filegroup,
        }))
    }

    fn alter_queue(&mut self) -> PResult<Statement> {
        let name = self.object_name("a queue name after ALTER QUEUE")?;
        for action in ["REBUILD", "REORGANIZE", "MOVE"] {
            if self.at_keyword(action) {
                return Err(
                    self.not_supported(&self.peek().clone(), &format!("ALTER QUEUE … {action}"))
                );
            }
        }
        self.expect_keyword("WITH", "ALTER QUEUE name")?;
        let settings = self.queue_settings(true)?;
        Ok(Statement::AlterQueue(AlterQueue { name, settings }))
    }

    /// The comma-separated options after `WITH`: at least one, each once.
    fn queue_settings(&mut self, alter: bool) -> PResult<QueueSettings> {
        let mut settings = QueueSettings::default();
        loop {
            let token = self.peek().clone();
            match self.word_upper(&token).as_str() {
                "STATUS" => {
                    self.advance();
                    let value = self.on_off("STATUS")?;
                    set_once(&mut settings.status, value, || self.twice(&token))?;
                }
                "RETENTION" => {
                    self.advance();
                    let value = self.on_off("RETENTION")?;
                    set_once(&mut settings.retention, value, || self.twice(&token))?;
                }
                "ACTIVATION" => {
                    self.advance();
                    let value = self.activation(alter)?;
                    set_once(&mut settings.activation, value, || self.twice(&token))?;
                }
                "POISON_MESSAGE_HANDLING" => {
                    self.advance();
                    self.expect_symbol(Symbol::LParen, "POISON_MESSAGE_HANDLING")?;
                    self.expect_keyword("STATUS", "POISON_MESSAGE_HANDLING (")?;
                    let value = self.on_off("STATUS")?;
                    self.expect_symbol(Symbol::RParen, "POISON_MESSAGE_HANDLING (STATUS = …")?;
                    set_once(&mut settings.poison_message_handling, value, || {
                        self.twice(&token)
                    })?;
                }
                _ => {
                    return Err(self.expected(
                        "STATUS, RETENTION, ACTIVATION or POISON_MESSAGE_HANDLING after WITH or ','",
                    ));
                }
            }
            if !self.eat_symbol(Symbol::Comma) {
                return Ok(settings);
            }
        }
    }

    fn activation(&mut self, alter: bool) -> PResult<Activation> {
        self.expect_symbol(Symbol::LParen, "ACTIVATION")?;
        if self.at_keyword("DROP") {
            let token = self.advance();
            if !alter {
                return Err(self.error_at(
                    &token,
                    "ACTIVATION (DROP) is for ALTER QUEUE, not CREATE QUEUE".into(),
                ));
            }
            self.expect_symbol(Symbol::RParen, "ACTIVATION (DROP")?;
            return Ok(Activation::Drop);
        }
        let mut settings = ActivationSettings::default();
        loop {
            let token = self.peek().clone();
            match self.word_upper(&token).as_str() {
                "STATUS" => {
                    self.advance();
                    let value = self.on_off("STATUS")?;
                    set_once(&mut settings.status, value, || self.twice(&token))?;
                }
                "PROCEDURE_NAME" => {
                    self.advance();
                    self.expect_symbol(Symbol::Eq, "PROCEDURE_NAME")?;
                    let value = self.object_name("a procedure name after PROCEDURE_NAME =")?;
                    set_once(&mut settings.procedure_name, value, || self.twice(&token))?;
                }
                "MAX_QUEUE_READERS" => {
                    self.advance();
                    self.expect_symbol(Symbol::Eq, "MAX_QUEUE_READERS")?;
                    let value = self.int_literal("MAX_QUEUE_READERS", 0, 32767)?;
                    let value = u16::try_from(value).expect("checked to be within 0..=32767");
                    set_once(&mut settings.max_queue_readers, value, || {
                        self.twice(&token)
                    })?;
                }
                "EXECUTE" => {
                    self.advance();
                    self.expect_keyword("AS", "EXECUTE")?;
                    let value = if self.eat_keyword("SELF") {
                        ExecuteAs::Caller
                    } else if self.eat_keyword("OWNER") {
                        ExecuteAs::Owner
                    } else if let TokenKind::Str { .. } = self.peek().kind {
                        ExecuteAs::User(self.string_name("a user after EXECUTE AS")?)
                    } else {
                        return Err(self.expected("SELF, OWNER or 'user' after EXECUTE AS"));
                    };
                    set_once(&mut settings.execute_as, value, || self.twice(&token))?;
                }
                _ => {
                    return Err(self.expected(
                        "STATUS, PROCEDURE_NAME, MAX_QUEUE_READERS or EXECUTE AS in ACTIVATION ( … )",
                    ));
                }
            }
            if !self.eat_symbol(Symbol::Comma) {
                break;
            }
        }
        self.expect_symbol(Symbol::RParen, "the ACTIVATION options")?;
        Ok(Activation::Set(settings))
    }

    fn create_service(&mut self) -> PResult<Statement> {
        let name = self.name("a service name after CREATE SERVICE")?;
        let authorization = self.authorization()?;
        self.expect_keyword("ON", "the service name")?;
        self.expect_keyword("QUEUE", "ON")?;
        let queue = self.object_name("a queue name after ON QUEUE")?;
        let mut contracts = Vec::new();
        if self.eat_symbol(Symbol::LParen) {
            loop {
                self.count_list_item()?;
                contracts.push(self.name_or_default("a contract name in the service's list")?);
                if !self.eat_symbol(Symbol::Comma) {
                    break;
                }
            }
            self.expect_symbol(Symbol::RParen, "the service's contracts")?;
        }
        Ok(Statement::CreateService(CreateService {
            name,
            authorization,
            queue,
            contracts,
        }))
    }

    fn create_route(&mut self) -> PResult<Statement> {
        let name = self.name("a route name after CREATE ROUTE")?;
        let authorization = self.authorization()?;
        let with = self.peek().clone();
        self.expect_keyword("WITH", "the route name")?;
        let settings = self.route_settings()?;
        if settings.address.is_none() {
            return Err(self.error_at(&with, "CREATE ROUTE needs an ADDRESS".into()));
        }
        Ok(Statement::CreateRoute(CreateRoute {
            name,
            authorization,
            settings,
        }))
    }

    fn alter_route(&mut self) -> PResult<Statement> {
        let name = self.name("a route name after ALTER ROUTE")?;
        self.expect_keyword("WITH", "the route name")?;
        let settings = self.route_settings()?;
        Ok(Statement::AlterRoute(AlterRoute { name, settings }))
    }

    fn route_settings(&mut self) -> PResult<RouteSettings> {
        let mut settings = RouteSettings::default();
        loop {
            let token = self.peek().clone();
            let word = self.word_upper(&token);
            match word.as_str() {
                "SERVICE_NAME" => {
                    self.advance();
                    self.expect_symbol(Symbol::Eq, "SERVICE_NAME")?;
                    let value = self.string_name("a service name string after SERVICE_NAME =")?;
                    set_once(&mut settings.service_name, value, || self.twice(&token))?;
                }
                "BROKER_INSTANCE" => {
                    self.advance();
                    self.expect_symbol(Symbol::Eq, "BROKER_INSTANCE")?;
                    let value =
                        self.guid_literal("a broker instance GUID after BROKER_INSTANCE =")?;
                    set_once(&mut settings.broker_instance, value, || self.twice(&token))?;
                }
                "LIFETIME" => {
                    self.advance();
                    self.expect_symbol(Symbol::Eq, "LIFETIME")?;
                    let value = self.int_literal("LIFETIME", 0, INT_MAX)?;
                    let value = u32::try_from(value).expect("checked to be within 0..=2^31-1");
                    set_once(&mut settings.lifetime_secs, value, || self.twice(&token))?;
                }
                "ADDRESS" | "MIRROR_ADDRESS" => {
                    self.advance();
                    self.expect_symbol(Symbol::Eq, &word)?;
                    let value = self.route_address(&word)?;
                    let slot = if word == "ADDRESS" {
                        &mut settings.address
                    } else {
                        &mut settings.mirror_address
                    };
                    set_once(slot, value, || self.twice(&token))?;
                }
                _ => {
                    return Err(self.expected(
                        "SERVICE_NAME, BROKER_INSTANCE, LIFETIME, ADDRESS or MIRROR_ADDRESS after WITH or ','",
                    ));
                }
            }
            if !self.eat_symbol(Symbol::Comma) {
                return Ok(settings);
            }
        }
    }

    fn route_address(&mut self, option: &str) -> PResult<RouteAddress> {
        let token = self.peek().clone();
        let TokenKind::Str { value, .. } = &token.kind else {
            return Err(self.expected(&format!("an address string after {option} =")));
        };
        let bad = |this: &Self, why: &str| {
            this.error_at(
                &token,
                format!(
                    "{option} {} {why}: expected 'LOCAL', 'TCP://host:port' or 'quic://host:port'",
                    quote(value)
                ),
            )
        };
        let address = if value.eq_ignore_ascii_case("LOCAL") {
            RouteAddress::Local
        } else if value.eq_ignore_ascii_case("TRANSPORT") {
            return Err(self.not_supported(&token, "ADDRESS = 'TRANSPORT'"));
        } else {
            let Some((scheme, rest)) = value.split_once("://") else {
                return Err(bad(self, "has no scheme"));
            };
            let scheme = if scheme.eq_ignore_ascii_case("TCP") {
                AddressScheme::Tcp
            } else if scheme.eq_ignore_ascii_case("QUIC") {
                AddressScheme::Quic
            } else {
                return Err(bad(self, "has an unknown scheme"));
            };
            let Some((host, port)) = rest.rsplit_once(':') else {
                return Err(bad(self, "has no port"));
            };
            if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
                return Err(bad(self, "has no valid host"));
            }
            let port = match port.parse::<u16>() {
                Ok(port) if port > 0 && port_text_is_digits(rest) => port,
                _ => return Err(bad(self, "has no valid port (1..65535)")),
            };
            RouteAddress::Network {
                scheme,
                host: host.to_owned(),
                port,
            }
        };
        if option == "MIRROR_ADDRESS" && address == RouteAddress::Local {
            return Err(self.error_at(&token, "MIRROR_ADDRESS must be a network address".into()));
        }
        self.advance();
        Ok(address)
    }

    fn create_broker_priority(&mut self) -> PResult<Statement> {
        let name = self.name("a priority name after CREATE BROKER PRIORITY")?;
        self.expect_keyword("FOR", "the priority name")?;
        self.expect_keyword("CONVERSATION", "FOR")?;
        self.expect_keyword("SET", "FOR CONVERSATION")?;
        self.expect_symbol(Symbol::LParen, "FOR CONVERSATION SET")?;
        let mut priority = CreateBrokerPriority {
            name,
            contract_name: None,
            local_service_name: None,
            remote_service_name: None,
            priority_level: None,
        };
        loop {
            let token = self.peek().clone();
            let word = self.word_upper(&token);
            match word.as_str() {
                "CONTRACT_NAME" | "LOCAL_SERVICE_NAME" | "REMOTE_SERVICE_NAME" => {
                    self.advance();
                    self.expect_symbol(Symbol::Eq, &word)?;
                    let value = if self.eat_keyword("ANY") {
                        NameOrAny::Any
                    } else if word == "REMOTE_SERVICE_NAME" {
                        NameOrAny::Name(self.string_name("a service name string or ANY")?)
                    } else {
                        NameOrAny::Name(self.name(&format!("a name or ANY after {word} ="))?)
                    };
                    let slot = match word.as_str() {
                        "CONTRACT_NAME" => &mut priority.contract_name,
                        "LOCAL_SERVICE_NAME" => &mut priority.local_service_name,
                        _ => &mut priority.remote_service_name,
                    };
                    set_once(slot, value, || self.twice(&token))?;
                }
                "PRIORITY_LEVEL" => {
                    self.advance();
                    self.expect_symbol(Symbol::Eq, "PRIORITY_LEVEL")?;
                    let value = if self.eat_keyword("DEFAULT") {
                        PriorityLevel::Default
                    } else {
                        let level = self.int_literal("PRIORITY_LEVEL", 1, 10)?;
                        PriorityLevel::Level(u8::try_from(level).expect("checked to be 1..=10"))
                    };
                    set_once(&mut priority.priority_level, value, || self.twice(&token))?;
                }
                _ => {
                    return Err(self.expected(
                        "CONTRACT_NAME, LOCAL_SERVICE_NAME, REMOTE_SERVICE_NAME or PRIORITY_LEVEL",
                    ));
                }
            }
            // T-SQL makes the commas between these settings optional.
            self.eat_symbol(Symbol::Comma);
            if self.eat_symbol(Symbol::RParen) {
                return Ok(Statement::CreateBrokerPriority(priority));
            }
        }
    }

    // ---- conversations ----

    fn begin_dialog(&mut self) -> PResult<Statement> {
        self.advance();
        self.eat_keyword("CONVERSATION");
        let handle_variable = self.variable("a handle variable after BEGIN DIALOG")?;
        self.expect_keyword("FROM", "BEGIN DIALOG @handle")?;
        self.expect_keyword("SERVICE", "FROM")?;
        let from_service = self.name("a service name after FROM SERVICE")?;
        self.expect_keyword("TO", "the FROM SERVICE name")?;
        self.expect_keyword("SERVICE", "TO")?;
        let to_service = self.string_name("a service name string after TO SERVICE")?;
        let broker_instance = if self.eat_symbol(Symbol::Comma) {
            let token = self.peek().clone();
            match &token.kind {
                TokenKind::Str { value, .. } if value.eq_ignore_ascii_case("CURRENT DATABASE") => {
                    self.advance();
                    Some(BrokerInstance::CurrentDatabase)
                }
                _ => Some(BrokerInstance::Id(self.guid_literal(
                    "a broker instance GUID string or 'CURRENT DATABASE' after TO SERVICE 'name',",
                )?)),
            }
        } else {
            None
        };
        let contract = if self.eat_keyword("ON") {
            self.expect_keyword("CONTRACT", "ON")?;
            Some(self.name_or_default("a contract name after ON CONTRACT")?)
        } else {
            None
        };
        let mut dialog = BeginDialog {
            handle_variable,
            from_service,
            to_service,
            broker_instance,
            contract,
            related: None,
            lifetime_secs: None,
            encryption: None,
        };
        if self.eat_keyword("WITH") {
            loop {
                let token = self.peek().clone();
                let word = self.word_upper(&token);
                match word.as_str() {
                    "RELATED_CONVERSATION" | "RELATED_CONVERSATION_GROUP" => {
                        self.advance();
                        self.expect_symbol(Symbol::Eq, &word)?;
                        let related = if word == "RELATED_CONVERSATION" {
                            Related::Conversation(self.guid_operand(
                                "a conversation handle after RELATED_CONVERSATION =",
                                ConversationHandle,
                            )?)
                        } else {
                            Related::Group(self.guid_operand(
                                "a conversation group id after RELATED_CONVERSATION_GROUP =",
                                ConversationGroupId,
                            )?)
                        };
                        if dialog.related.is_some() {
                            return Err(self.error_at(
                                &token,
                                "RELATED_CONVERSATION and RELATED_CONVERSATION_GROUP: give one, once"
                                    .into(),
                            ));
                        }
                        dialog.related = Some(related);
                    }
                    "LIFETIME" => {
                        self.advance();
                        self.expect_symbol(Symbol::Eq, "LIFETIME")?;
                        let value = self.int_operand("LIFETIME", 0, INT_MAX)?;
                        set_once(&mut dialog.lifetime_secs, value, || self.twice(&token))?;
                    }
                    "ENCRYPTION" => {
                        self.advance();
                        let value = self.on_off("ENCRYPTION")?;
                        set_once(&mut dialog.encryption, value, || self.twice(&token))?;
                    }
                    _ => {
                        return Err(self.expected(
                            "RELATED_CONVERSATION, RELATED_CONVERSATION_GROUP, LIFETIME or ENCRYPTION after WITH or ','",
                        ));
                    }
                }
                if !self.eat_symbol(Symbol::Comma) {
                    break;
                }
            }
        }
        Ok(Statement::BeginDialog(dialog))
    }

    fn begin_conversation_timer(&mut self) -> PResult<Statement> {
        self.advance();
        self.expect_keyword("TIMER", "BEGIN CONVERSATION")?;
        self.expect_symbol(Symbol::LParen, "BEGIN CONVERSATION TIMER")?;
        let conversation = self.guid_operand(
            "a conversation handle in BEGIN CONVERSATION TIMER ( … )",
            ConversationHandle,
        )?;
        self.expect_symbol(Symbol::RParen, "the conversation handle")?;
        self.expect_keyword("TIMEOUT", "BEGIN CONVERSATION TIMER ( … )")?;
        self.expect_symbol(Symbol::Eq, "TIMEOUT")?;
        let timeout_secs = self.int_operand("TIMEOUT", 0, INT_MAX)?;
        Ok(Statement::BeginConversationTimer(BeginConversationTimer {
            conversation,
            timeout_secs,
        }))
    }

    fn send(&mut self) -> PResult<Statement> {
        self.advance();
        self.expect_keyword("ON", "SEND")?;
        self.expect_keyword("CONVERSATION", "SEND ON")?;
        let what = "a conversation handle after SEND ON CONVERSATION";
        let mut conversations = Vec::new();
        if self.eat_symbol(Symbol::LParen) {
            loop {
                self.count_list_item()?;
                conversations.push(self.guid_operand(what, ConversationHandle)?);
                if !self.eat_symbol(Symbol::Comma) {
                    break;
                }
            }
            self.expect_symbol(Symbol::RParen, "the conversation handles")?;
        } else {
            // Counted as in the list form, which `Display` prints, so that a printed script
            // spends the same budget as the script it came from.
            self.count_list_item()?;
            conversations.push(self.guid_operand(what, ConversationHandle)?);
        }
        let message_type = if self.eat_keyword("MESSAGE") {
            self.expect_keyword("TYPE", "MESSAGE")?;
            Some(self.name_or_default("a message type name after MESSAGE TYPE")?)
        } else {
            None
        };
        let body = if self.eat_symbol(Symbol::LParen) {
            let body = self.expression("a message body")?;
            self.expect_symbol(Symbol::RParen, "the message body")?;
            Some(body)
        } else {
            None
        };
        Ok(Statement::Send(Send {
            conversations,
            message_type,
            body,
        }))
    }

    /// `WAITFOR ( RECEIVE … | GET CONVERSATION GROUP … ) [, TIMEOUT ms]`.
    fn waitfor(&mut self) -> PResult<Statement> {
        let waitfor = self.advance();
        for form in ["DELAY", "TIME"] {
            if self.at_keyword(form) {
                return Err(self.not_supported(&waitfor, &format!("WAITFOR {form}")));
            }
        }
        self.expect_symbol(Symbol::LParen, "WAITFOR")?;
        let mut statement = if self.at_keyword("RECEIVE") {
            Statement::Receive(self.receive(Some(WaitFor { timeout_ms: None }))?)
        } else if self.at_keyword("GET") {
            self.get_conversation_group(Some(WaitFor { timeout_ms: None }))?
        } else {
            return Err(self.expected("RECEIVE or GET CONVERSATION GROUP after WAITFOR ("));
        };
        let inner = match statement {
            Statement::Receive(_) => "RECEIVE",
            _ => "GET CONVERSATION GROUP",
        };
        self.expect_symbol(Symbol::RParen, &format!("the {inner} inside WAITFOR ( … )"))?;
        if self.eat_symbol(Symbol::Comma) {
            self.expect_keyword("TIMEOUT", "WAITFOR ( … ),")?;
            let timeout = self.int_operand("TIMEOUT", -1, INT_MAX)?;
            let waitfor = match &mut statement {
                Statement::Receive(r) => &mut r.waitfor,
                Statement::GetConversationGroup(g) => &mut g.waitfor,
                _ => unreachable!("WAITFOR wraps only RECEIVE and GET CONVERSATION GROUP"),
            };
            *waitfor = Some(WaitFor {
                timeout_ms: Some(timeout),
            });
        }
        Ok(statement)
    }

    fn receive(&mut self, waitfor: Option<WaitFor>) -> PResult<Receive> {
        self.advance();
        let top = if self.eat_keyword("TOP") {
            if self.eat_symbol(Symbol::LParen) {
                let top = self.int_operand("TOP", 0, INT_MAX)?;
                self.expect_symbol(Symbol::RParen, "TOP (n")?;
                Some(top)
            } else {
                Some(self.int_operand("TOP", 0, INT_MAX)?)
            }
        } else {
            None
        };
        let columns = self.columns("RECEIVE")?;
        self.expect_keyword("FROM", "RECEIVE's column list")?;
        let queue = self.object_name("a queue name after RECEIVE … FROM")?;
        let into = if self.eat_keyword("INTO") {
            Some(self.variable("a table variable after INTO")?)
        } else {
            None
        };
        if into.is_some() && columns_assign(&columns) {
            return Err(self.error_at(
                &self.token(self.pos - 1).clone(),
                "RECEIVE … INTO cannot also assign columns to variables".into(),
            ));
        }
        let filter = if self.eat_keyword("WHERE") {
            let token = self.peek().clone();
            let column =
                self.identifier("conversation_handle or conversation_group_id after WHERE")?;
            self.expect_symbol(Symbol::Eq, &column)?;
            if column.eq_ignore_ascii_case("conversation_handle") {
                Some(ReceiveFilter::Conversation(self.guid_operand(
                    "a conversation handle after WHERE conversation_handle =",
                    ConversationHandle,
                )?))
            } else if column.eq_ignore_ascii_case("conversation_group_id") {
                Some(ReceiveFilter::Group(self.guid_operand(
                    "a conversation group id after WHERE conversation_group_id =",
                    ConversationGroupId,
                )?))
            } else {
                return Err(self.error_at(
                    &token,
                    format!(
                        "RECEIVE … WHERE takes conversation_handle or conversation_group_id, found {}",
                        quote(&column)
                    ),
                ));
            }
        } else {
            None
        };
        Ok(Receive {
            waitfor,
            top,
            columns,
            queue,
            into,
            filter,
        })
    }

    fn get_conversation_group(&mut self, waitfor: Option<WaitFor>) -> PResult<Statement> {
        self.advance();
        self.expect_keyword("CONVERSATION", "GET")?;
        self.expect_keyword("GROUP", "GET CONVERSATION")?;
        let group_variable = self.variable("a group variable after GET CONVERSATION GROUP")?;
        self.expect_keyword("FROM", "GET CONVERSATION GROUP @group")?;
        let queue = self.object_name("a queue name after GET CONVERSATION GROUP … FROM")?;
        Ok(Statement::GetConversationGroup(GetConversationGroup {
            waitfor,
            group_variable,
            queue,
        }))
    }

    fn move_conversation(&mut self) -> PResult<Statement> {
        self.advance();
        self.expect_keyword("CONVERSATION", "MOVE")?;
        let conversation = self.guid_operand(
            "a conversation handle after MOVE CONVERSATION",
            ConversationHandle,
        )?;
        self.expect_keyword("TO", "MOVE CONVERSATION's handle")?;
        let group = self.guid_operand(
            "a conversation group id after MOVE CONVERSATION … TO",
            ConversationGroupId,
        )?;
        Ok(Statement::MoveConversation(MoveConversation {
            conversation,
            group,
        }))
    }

    fn end_conversation(&mut self) -> PResult<Statement> {
        let end = self.advance();
        if !self.at_keyword("CONVERSATION") {
            return Err(self.error_at(&end, "END without a matching BEGIN".into()));
        }
        self.advance();
        let conversation = self.guid_operand(
            "a conversation handle after END CONVERSATION",
            ConversationHandle,
        )?;
        let with = if self.eat_keyword("WITH") {
            if self.eat_keyword("CLEANUP") {
                Some(EndWith::Cleanup)
            } else if self.eat_keyword("ERROR") {
                self.expect_symbol(Symbol::Eq, "WITH ERROR")?;
                let code = self.int_operand("ERROR", 1, INT_MAX)?;
                self.expect_keyword("DESCRIPTION", "WITH ERROR = code")?;
                self.expect_symbol(Symbol::Eq, "DESCRIPTION")?;
                let description = match &self.peek().kind {
                    TokenKind::Str { value, .. } => {
                        let value = value.clone();
                        self.advance();
                        Operand::Literal(value)
                    }
                    TokenKind::Variable(_) => {
                        Operand::Variable(self.variable("a description after DESCRIPTION =")?)
                    }
                    _ => {
                        return Err(self.expected("a string or a variable after DESCRIPTION ="));
                    }
                };
                Some(EndWith::Error { code, description })
            } else {
                return Err(self.expected("ERROR or CLEANUP after END CONVERSATION … WITH"));
            }
        } else {
            None
        };
        Ok(Statement::EndConversation(EndConversation {
            conversation,
            with,
        }))
    }

    // ---- variables and SELECT ----

    fn declare(&mut self) -> PResult<Statement> {
        self.advance();
        let mut variables = Vec::new();
        loop {
            self.count_list_item()?;
            let name = self.variable("a variable after DECLARE")?;
            self.eat_keyword("AS");
            if self.at_keyword("TABLE") || self.at_keyword("CURSOR") {
                let token = self.peek().clone();
                let kind = self.word_upper(&token);
                return Err(self.not_supported(&token, &format!("DECLARE … {kind}")));
            }
            let data_type = self.type_name(&format!("a data type for @{name}"))?;
            let initial = if self.eat_symbol(Symbol::Eq) {
                Some(self.expression(&format!("a value for @{name}"))?)
            } else {
                None
            };
            variables.push(VariableDecl {
                name,
                data_type,
                initial,
            });
            if !self.eat_symbol(Symbol::Comma) {
                return Ok(Statement::Declare(Declare { variables }));
            }
        }
    }

    fn set(&mut self) -> PResult<Statement> {
        let set = self.advance();
        if self.peek().kind == TokenKind::Word {
            let option = self.word_upper(&self.peek().clone());
            return Err(self.not_supported(&set, &format!("SET {option}")));
        }
        let variable = self.variable("a variable after SET")?;
        self.expect_symbol(Symbol::Eq, &format!("SET @{variable}"))?;
        let value = self.expression(&format!("a value for @{variable}"))?;
        Ok(Statement::Set(Set { variable, value }))
    }

    fn select(&mut self) -> PResult<Statement> {
        self.advance();
        let star = self.at_symbol(Symbol::Star);
        let raw = if star {
            self.advance();
            Vec::new()
        } else {
            self.raw_items("SELECT")?
        };
        if !self.eat_keyword("FROM") {
            if star {
                return Err(self.expected("FROM after SELECT *"));
            }
            let mut items = Vec::new();
            for item in raw {
                let value = match item.term {
                    Term::Value(value) => value,
                    Term::Column { column, .. } => {
                        return Err(self.error_at(
                            &item.at,
                            format!(
                                "expected a variable or a literal in SELECT without FROM, found column {}",
                                quote(&column)
                            ),
                        ));
                    }
                };
                items.push(match item.assign_to {
                    Some(variable) => ValueItem::Assign { variable, value },
                    None => ValueItem::Show {
                        value,
                        alias: item.alias,
                    },
                });
            }
            return Ok(Statement::SelectValues(SelectValues { items }));
        }
        let columns = if star {
            Columns::All
        } else {
            Columns::List(self.column_items(raw, "SELECT … FROM")?)
        };
        let source_token = self.peek().clone();
        let source = self.object_name("a catalog view or a queue after FROM")?;
        let from = match &source.schema {
            Some(schema) if source.database.is_none() && schema.eq_ignore_ascii_case("sys") => {
                let view = CatalogView::ALL
                    .into_iter()
                    .find(|view| view.name().eq_ignore_ascii_case(&source.name));
                match view {
                    Some(view) => SelectSource::View(view),
                    None => {
                        let known: Vec<String> = CatalogView::ALL
                            .iter()
                            .map(|v| format!("sys.{}", v.name()))
                            .collect();
                        return Err(self.error_at(
                            &source_token,
                            format!(
                                "unknown catalog view sys.{}; Herald has {}",
                                source.name,
                                known.join(", ")
                            ),
                        ));
                    }
                }
            }
            _ => SelectSource::Queue(source),
        };
        let mut filter = Vec::new();
        if self.eat_keyword("WHERE") {
            loop {
                self.count_list_item()?;
                let column = self.identifier("a column name in the WHERE clause")?;
                if !self.eat_symbol(Symbol::Eq) {
                    return Err(self.expected(
                        "'=' (Herald's SELECT … WHERE takes only column = value joined by AND)",
                    ));
                }
                let value =
                    self.simple_value(&format!("a literal or a variable after {column} ="))?;
                filter.push(ColumnEquals { column, value });
                if !self.eat_keyword("AND") {
                    break;
                }
            }
            if self.at_keyword("OR") {
                return Err(self.not_supported(
                    &self.peek().clone(),
                    "OR in WHERE (Herald's SELECT … WHERE takes only column = value joined by AND)",
                ));
            }
        }
        Ok(Statement::Select(Select {
            columns,
            from,
            filter,
        }))
    }

    /// `*` or a list of columns (RECEIVE; `context` names the statement for errors).
    fn columns(&mut self, context: &str) -> PResult<Columns> {
        if self.eat_symbol(Symbol::Star) {
            return Ok(Columns::All);
        }
        let raw = self.raw_items(context)?;
        Ok(Columns::List(self.column_items(raw, context)?))
    }

    fn column_items(&self, raw: Vec<RawItem>, context: &str) -> PResult<Vec<SelectItem>> {
        let mut items = Vec::new();
        for item in raw {
            match item.term {
                Term::Column { column, cast } => items.push(SelectItem {
                    column,
                    cast,
                    alias: item.alias,
                    assign_to: item.assign_to,
                }),
                Term::Value(_) => {
                    return Err(self.error_at(
                        &item.at,
                        format!(
                            "expected a column name in {context}, found {}",
                            self.describe(&item.at)
                        ),
                    ));
                }
            }
        }
        Ok(items)
    }

    /// A comma-separated list of items: `@var = term` or `term [[AS] alias]`, all assignments
    /// or none (as T-SQL requires).
    fn raw_items(&mut self, context: &str) -> PResult<Vec<RawItem>> {
        let mut items: Vec<RawItem> = Vec::new();
        loop {
            self.count_list_item()?;
            let at = self.peek().clone();
            let assign_to = match (&self.peek().kind, self.kind_at(self.pos + 1)) {
                (TokenKind::Variable(name), TokenKind::Symbol(Symbol::Eq)) => {
                    let name = name.clone();
                    self.advance();
                    self.advance();
                    Some(name)
                }
                _ => None,
            };
            let term = self.term(context)?;
            let alias = if assign_to.is_some() {
                None
            } else if self.eat_keyword("AS") {
                Some(self.name("an alias after AS")?)
            } else if matches!(self.peek().kind, TokenKind::Quoted(_))
                || (self.peek().kind == TokenKind::Word && !self.at_reserved())
            {
                Some(self.identifier("an alias")?)
            } else {
                None
            };
            if let Some(first) = items.first()
                && first.assign_to.is_some() != assign_to.is_some()
            {
                return Err(self.error_at(
                    &at,
                    format!(
                        "a {context} that assigns to variables must assign every item (@var = …)"
                    ),
                ));
            }
            items.push(RawItem {
                term,
                alias,
                assign_to,
                at,
            });
            if !self.eat_symbol(Symbol::Comma) {
                return Ok(items);
            }
        }
    }

    /// A column, a cast of a column, or a value.
    fn term(&mut self, context: &str) -> PResult<Term> {
        let what = format!("a column or a value in {context}'s list");
        let is_column = |kind: &TokenKind, this: &Self| match kind {
            TokenKind::Quoted(_) => true,
            TokenKind::Word => !this.at_reserved_at(this.pos),
            _ => false,
        };
        if is_column(&self.peek().kind, self) {
            return Ok(Term::Column {
                column: self.identifier(&what)?,
                cast: None,
            });
        }
        let cast = self.at_keyword("CAST");
        let convert = self.at_keyword("CONVERT");
        if (cast || convert) && *self.kind_at(self.pos + 1) == TokenKind::Symbol(Symbol::LParen) {
            // CAST(column AS type) / CONVERT(type, column): look past the parenthesis.
            let save = self.pos;
            self.advance();
            self.advance();
            if cast && is_column(&self.peek().kind.clone(), self) {
                let column = self.identifier("a column")?;
                self.expect_keyword("AS", &format!("CAST({column}"))?;
                let to = self.type_name("a data type after AS")?;
                self.expect_symbol(Symbol::RParen, "CAST( … AS type")?;
                return Ok(Term::Column {
                    column,
                    cast: Some(to),
                });
            }
            if convert {
                let to = self.type_name("a data type after CONVERT(")?;
                self.expect_symbol(Symbol::Comma, "CONVERT(type")?;
                if is_column(&self.peek().kind.clone(), self) {
                    let column = self.identifier("a column")?;
                    self.expect_symbol(Symbol::RParen, "CONVERT(type, column")?;
                    return Ok(Term::Column {
                        column,
                        cast: Some(to),
                    });
                }
            }
            self.pos = save;
        }
        Ok(Term::Value(self.expression(&what)?))
    }

    /// A literal or a variable (SELECT … WHERE).
    fn simple_value(&mut self, what: &str) -> PResult<Expr> {
        let token = self.peek().clone();
        match token.kind {
            TokenKind::Variable(_)
            | TokenKind::Str { .. }
            | TokenKind::Binary(_)
            | TokenKind::Int(_)
            | TokenKind::Symbol(Symbol::Minus) => self.expression(what),
            TokenKind::Word if self.at_keyword("NULL") => self.expression(what),
            _ => Err(self.expected(what)),
        }
    }

    // ---- expressions and types ----

    /// A literal, a variable, `CAST(expr AS type)`, `CONVERT(type, expr)` or `(expr)`.
    fn expression(&mut self, what: &str) -> PResult<Expr> {
        self.expression_depth += 1;
        if self.expression_depth > EXPRESSION_DEPTH_MAX {
            return Err(self.error_at(
                &self.peek().clone(),
                format!("expression nested more than {EXPRESSION_DEPTH_MAX} deep"),
            ));
        }
        let token = self.peek().clone();
        let expr = match &token.kind {
            TokenKind::Str { value, national } => {
                self.advance();
                Expr::Literal(Literal::String {
                    value: value.clone(),
                    national: *national,
                })
            }
            TokenKind::Binary(bytes) => {
                self.advance();
                Expr::Literal(Literal::Binary(bytes.clone()))
            }
            TokenKind::Int(_) | TokenKind::Symbol(Symbol::Minus) => {
                Expr::Literal(Literal::Integer(self.integer(what)?))
            }
            TokenKind::Variable(name) => {
                self.advance();
                Expr::Variable(name.clone())
            }
            TokenKind::Symbol(Symbol::LParen) => {
                self.advance();
                let inner = self.expression(what)?;
                self.expect_symbol(Symbol::RParen, "the parenthesised expression")?;
                inner
            }
            TokenKind::Word if self.at_keyword("NULL") => {
                self.advance();
                Expr::Literal(Literal::Null)
            }
            TokenKind::Word if self.at_keyword("CAST") => {
                self.advance();
                self.expect_symbol(Symbol::LParen, "CAST")?;
                let inner = self.expression("a value to CAST")?;
                self.expect_keyword("AS", "the value to CAST")?;
                let to = self.type_name("a data type after CAST( … AS")?;
                self.expect_symbol(Symbol::RParen, "CAST( … AS type")?;
                Expr::Cast {
                    expr: Box::new(inner),
                    to,
                }
            }
            TokenKind::Word if self.at_keyword("CONVERT") => {
                self.advance();
                self.expect_symbol(Symbol::LParen, "CONVERT")?;
                let to = self.type_name("a data type after CONVERT(")?;
                self.expect_symbol(Symbol::Comma, "CONVERT(type")?;
                let inner = self.expression("a value to CONVERT")?;
                if self.at_symbol(Symbol::Comma) {
                    return Err(self.not_supported(&self.peek().clone(), "CONVERT with a style"));
                }
                self.expect_symbol(Symbol::RParen, "CONVERT(type, value")?;
                Expr::Cast {
                    expr: Box::new(inner),
                    to,
                }
            }
            _ => return Err(self.expected(what)),
        };
        self.expression_depth -= 1;
        Ok(expr)
    }

    /// `NAME [( n | MAX [, scale] )]`.
    fn type_name(&mut self, what: &str) -> PResult<TypeName> {
        if self.peek().kind != TokenKind::Word || self.at_reserved() {
            return Err(self.expected(what));
        }
        let token = self.advance();
        let name = self.word_upper(&token);
        let mut data_type = TypeName {
            name,
            length: None,
            scale: None,
        };
        if self.eat_symbol(Symbol::LParen) {
            if self.eat_keyword("MAX") {
                data_type.length = Some(TypeLength::Max);
            } else {
                let length =
                    self.int_literal(&format!("{}'s length", data_type.name), 1, INT_MAX)?;
                data_type.length = Some(TypeLength::Count(
                    u32::try_from(length).expect("checked to be 1..=2^31-1"),
                ));
                if self.eat_symbol(Symbol::Comma) {
                    let scale =
                        self.int_literal(&format!("{}'s scale", data_type.name), 0, INT_MAX)?;
                    data_type.scale = Some(u32::try_from(scale).expect("checked to be 0..=2^31-1"));
                }
            }
            self.expect_symbol(Symbol::RParen, &format!("{}(…", data_type.name))?;
        }
        Ok(data_type)
    }

    /// An integer literal, with an optional minus sign, within i64.
    fn integer(&mut self, what: &str) -> PResult<i64> {
        let negative = self.eat_symbol(Symbol::Minus);
        let token = self.peek().clone();
        let TokenKind::Int(magnitude) = token.kind else {
            return Err(self.expected(what));
        };
        self.advance();
        let value = if negative {
            -i128::from(magnitude)
        } else {
            i128::from(magnitude)
        };
        i64::try_from(value).map_err(|_| {
            self.error_at(
                &token,
                format!("integer {value} is out of range for {what}"),
            )
        })
    }

    fn int_literal(&mut self, what: &str, min: i64, max: i64) -> PResult<i64> {
        let token = self.peek().clone();
        let value = self.integer(&format!("an integer for {what}"))?;
        if value < min || value > max {
            return Err(self.error_at(
                &token,
                format!("{what} must be between {min} and {max}, found {value}"),
            ));
        }
        Ok(value)
    }

    fn int_operand(&mut self, what: &str, min: i64, max: i64) -> PResult<Operand<i64>> {
        if let TokenKind::Variable(name) = &self.peek().kind {
            let name = name.clone();
            self.advance();
            return Ok(Operand::Variable(name));
        }
        if !matches!(
            self.peek().kind,
            TokenKind::Int(_) | TokenKind::Symbol(Symbol::Minus)
        ) {
            return Err(self.expected(&format!("an integer or a variable for {what}")));
        }
        self.int_literal(what, min, max).map(Operand::Literal)
    }

    /// A variable, or a string holding a GUID.
    fn guid_operand<T>(&mut self, what: &str, wrap: fn(u128) -> T) -> PResult<Operand<T>> {
        if let TokenKind::Variable(name) = &self.peek().kind {
            let name = name.clone();
            self.advance();
            return Ok(Operand::Variable(name));
        }
        if !matches!(self.peek().kind, TokenKind::Str { .. }) {
            return Err(self.expected(&format!("{what} (a variable or a GUID string)")));
        }
        Ok(Operand::Literal(wrap(self.guid_literal(what)?.as_u128())))
    }

    fn guid_literal(&mut self, what: &str) -> PResult<uuid::Uuid> {
        let token = self.peek().clone();
        let TokenKind::Str { value, .. } = &token.kind else {
            return Err(self.expected(what));
        };
        let guid = uuid::Uuid::try_parse(value).map_err(|_| {
            self.error_at(
                &token,
                format!(
                    "expected {what}, found {} which is not a GUID",
                    quote(value)
                ),
            )
        })?;
        self.advance();
        Ok(guid)
    }

    // ---- names ----

    /// A bare (not reserved) or delimited identifier.
    fn identifier(&mut self, what: &str) -> PResult<String> {
        let token = self.peek().clone();
        match &token.kind {
            TokenKind::Quoted(name) => {
                self.advance();
                Ok(name.clone())
            }
            TokenKind::Word if self.at_reserved() => Err(self.error_at(
                &token,
                format!(
                    "expected {what}, found keyword {} (write [{}] to use it as a name)",
                    self.describe(&token),
                    self.word_text(&token)
                ),
            )),
            TokenKind::Word => {
                self.advance();
                Ok(self.word_text(&token).to_owned())
            }
            _ => Err(self.expected(what)),
        }
    }

    /// An identifier, or a string (`'//shop/Order'`) for Service Broker's object names.
    fn name(&mut self, what: &str) -> PResult<String> {
        if matches!(self.peek().kind, TokenKind::Str { .. }) {
            self.string_name(what)
        } else {
            self.identifier(what)
        }
    }

    /// A name where T-SQL also takes the bare keyword `DEFAULT`.
    fn name_or_default(&mut self, what: &str) -> PResult<String> {
        if self.eat_keyword("DEFAULT") {
            Ok("DEFAULT".into())
        } else {
            self.name(what)
        }
    }

    /// A string literal used as a name: non-empty and at most NAME_BYTES_MAX bytes.
    fn string_name(&mut self, what: &str) -> PResult<String> {
        let token = self.peek().clone();
        let TokenKind::Str { value, .. } = &token.kind else {
            return Err(self.expected(what));
        };
        if value.is_empty() {
            return Err(self.error_at(&token, format!("expected {what}, found an empty string")));
        }
        if value.len() > NAME_BYTES_MAX {
            return Err(self.error_at(
                &token,
                format!(
                    "name of {} bytes is longer than the maximum of {NAME_BYTES_MAX} bytes",
                    value.len()
                ),
            ));
        }
        self.advance();
        Ok(value.clone())
    }

    /// `name`, `schema.name` or `database.schema.name`.
    fn object_name(&mut self, what: &str) -> PResult<ObjectName> {
        let mut parts = vec![self.identifier(what)?];
        while parts.len() < 3 && self.eat_symbol(Symbol::Dot) {
            parts.push(self.identifier(&format!("a name after '{}.'", parts.join(".")))?);
        }
        let name = parts.pop().expect("one part at least");
        let schema = parts.pop();
        let database = parts.pop();
        Ok(ObjectName {
            database,
            schema,
            name,
        })
    }

    fn variable(&mut self, what: &str) -> PResult<String> {
        if let TokenKind::Variable(name) = &self.peek().kind {
            let name = name.clone();
            self.advance();
            Ok(name)
        } else {
            Err(self.expected(what))
        }
    }

    /// `= ON | OFF` after `option`.
    fn on_off(&mut self, option: &str) -> PResult<bool> {
        self.expect_symbol(Symbol::Eq, option)?;
        if self.eat_keyword("ON") {
            Ok(true)
        } else if self.eat_keyword("OFF") {
            Ok(false)
        } else {
            Err(self.expected(&format!("ON or OFF after {option} =")))
        }
    }

    // ---- tokens ----

    fn peek(&self) -> &Token {
        self.token(self.pos)
    }

    /// The token at `index`, which must be in the window; past `Eof`, `Eof`.
    fn token(&self, index: usize) -> &Token {
        let offset = index
            .checked_sub(self.base)
            .expect("the parser backtracks at most TOKENS_BEHIND tokens");
        match self.window.get(offset) {
            Some(token) => token,
            None => {
                let last = self.window.back().expect("the window is never empty");
                debug_assert_eq!(last.kind, TokenKind::Eof, "looked beyond TOKENS_AHEAD");
                last
            }
        }
    }

    /// Lexes up to `TOKENS_AHEAD` past the cursor, and forgets tokens long behind it.
    fn fill(&mut self) {
        while self.base + self.window.len() <= self.pos + TOKENS_AHEAD
            && self
                .window
                .back()
                .is_none_or(|token| token.kind != TokenKind::Eof)
        {
            self.window.push_back(self.lexer.next_token());
        }
        if self.pos - self.base > 2 * TOKENS_BEHIND {
            let forget = self.pos - self.base - TOKENS_BEHIND;
            self.window.drain(..forget);
            self.base += forget;
        }
        debug_assert!(
            self.window.len() <= WINDOW_TOKENS_MAX,
            "the token window grew"
        );
    }

    fn advance(&mut self) -> Token {
        let token = self.peek().clone();
        if token.kind != TokenKind::Eof {
            self.pos += 1;
            self.fill();
        }
        token
    }

    fn at_eof(&self) -> bool {
        self.peek().kind == TokenKind::Eof
    }

    fn word_text(&self, token: &Token) -> &str {
        &self.text[token.start..token.end]
    }

    /// A bare word in upper case; empty for any other token.
    fn word_upper(&self, token: &Token) -> String {
        if token.kind == TokenKind::Word {
            self.word_text(token).to_ascii_uppercase()
        } else {
            String::new()
        }
    }

    /// The kind of the token at `index`, or `Eof` past the end.
    fn kind_at(&self, index: usize) -> &TokenKind {
        &self.token(index).kind
    }

    fn keyword_at(&self, index: usize, keyword: &str) -> bool {
        let token = self.token(index);
        token.kind == TokenKind::Word && self.word_text(token).eq_ignore_ascii_case(keyword)
    }

    fn at_keyword(&self, keyword: &str) -> bool {
        self.keyword_at(self.pos, keyword)
    }

    fn at_reserved(&self) -> bool {
        self.at_reserved_at(self.pos)
    }

    fn at_reserved_at(&self, index: usize) -> bool {
        RESERVED
            .iter()
            .chain(STATEMENT_WORDS)
            .chain(UNSUPPORTED_STATEMENTS)
            .any(|w| self.keyword_at(index, w))
    }

    fn eat_keyword(&mut self, keyword: &str) -> bool {
        let at = self.at_keyword(keyword);
        if at {
            self.advance();
        }
        at
    }

    fn expect_keyword(&mut self, keyword: &str, after: &str) -> PResult<()> {
        if self.eat_keyword(keyword) {
            Ok(())
        } else {
            Err(self.expected(&format!("{keyword} after {after}")))
        }
    }

    fn at_symbol(&self, symbol: Symbol) -> bool {
        self.peek().kind == TokenKind::Symbol(symbol)
    }

    fn eat_symbol(&mut self, symbol: Symbol) -> bool {
        let at = self.at_symbol(symbol);
        if at {
            self.advance();
        }
        at
    }

    fn eat_go(&mut self) -> bool {
        let at = self.peek().kind == TokenKind::Go;
        if at {
            self.advance();
        }
        at
    }

    fn expect_symbol(&mut self, symbol: Symbol, after: &str) -> PResult<()> {
        if self.eat_symbol(symbol) {
            Ok(())
        } else {
            Err(self.expected(&format!("'{}' after {after}", symbol.text())))
        }
    }

    // ---- errors ----

    /// How a token is quoted in a message.
    fn describe(&self, token: &Token) -> String {
        match &token.kind {
            TokenKind::Eof => "end of input".into(),
            TokenKind::Go => "GO".into(),
            TokenKind::Str { .. } => format!("string {}", truncate(self.word_text(token))),
            _ => quote(self.word_text(token)),
        }
    }

    fn error_at(&self, token: &Token, message: String) -> SyntaxError {
        SyntaxError {
            line: token.line,
            column: token.column,
            message,
        }
    }

    /// "expected {what}, found {current token}"; or, where the current token is not a token at
    /// all, why (an unterminated string, a stray character).
    fn expected(&self, what: &str) -> SyntaxError {
        let token = self.peek();
        if let TokenKind::Invalid(message) = &token.kind {
            return self.error_at(token, message.clone());
        }
        self.error_at(
            token,
            format!("expected {what}, found {}", self.describe(token)),
        )
    }

    fn not_supported(&self, token: &Token, what: &str) -> SyntaxError {
        self.error_at(token, format!("{what} is not supported by Herald"))
    }

    fn twice(&self, token: &Token) -> SyntaxError {
        self.error_at(
            token,
            format!(
                "{} is given twice",
                self.word_text(token).to_ascii_uppercase()
            ),
        )
    }
}

/// Sets an option that may be given once.
fn set_once<T>(slot: &mut Option<T>, value: T, twice: impl FnOnce() -> SyntaxError) -> PResult<()> {
    if slot.is_some() {
        return Err(twice());
    }
    *slot = Some(value);
    Ok(())
}

fn columns_assign(columns: &Columns) -> bool {
    match columns {
        Columns::All => false,
        Columns::List(items) => items.iter().any(|item| item.assign_to.is_some()),
    }
}

/// True when what follows the last ':' is only digits (`u16::from_str` also takes a '+').
fn port_text_is_digits(rest: &str) -> bool {
    rest.rsplit_once(':')
        .is_some_and(|(_, digits)| digits.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins: the whole script was tokenized up front, so a 16 MiB script of one-byte tokens
    /// held 16 million tokens (about 900 MB) however early the parser stopped.
    #[test]
    fn the_token_window_stays_small_on_long_scripts() {
        let handles = vec!["@h"; 20_000].join(",");
        let script = format!(
            "{}SEND ON CONVERSATION ({handles}) (CAST(CONVERT(NVARCHAR(10, 2), @b) AS XML)){}",
            ";".repeat(20_000),
            "\nGO\n".repeat(1_000)
        );
        let mut parser = Parser {
            text: &script,
            lexer: Lexer::new(&script),
            window: VecDeque::new(),
            base: 0,
            pos: 0,
            expression_depth: 0,
            block_depth: 0,
            statements: 0,
            list_items: 0,
        };
        parser.fill();
        let statements = parser.script().expect("parses");
        let Statement::Send(send) = &statements[0].statement else {
            panic!("{statements:?}");
        };
        assert_eq!(send.conversations.len(), 20_000);
        assert!(parser.window.len() <= WINDOW_TOKENS_MAX);
        assert!(
            parser.base > 40_000,
            "tokens were forgotten: base {}",
            parser.base
        );
    }
}
