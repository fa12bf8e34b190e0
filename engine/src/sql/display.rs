//! Canonical T-SQL for a syntax tree: keywords in upper case, every identifier in `[brackets]`,
//! every string as `N'…'` (except string literals that were not national), GUIDs as strings,
//! IF branches as `BEGIN … END` blocks. Invariant (tested by proptest and the fuzz target):
//! parsing what `Display` prints gives back an equal tree.

use std::fmt::{self, Display, Formatter, Write};

use super::ast::*;
use crate::catalog::SentBy;
use crate::ids::{ConversationGroupId, ConversationHandle};

impl Display for Statement {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Statement::CreateMessageType(s) => {
                write!(f, "CREATE MESSAGE TYPE {}", Ident(&s.name))?;
                authorization(f, &s.authorization)?;
                if let Some(validation) = s.validation {
                    write!(f, " VALIDATION = {}", validation.name())?;
                }
                Ok(())
            }
            Statement::CreateContract(s) => {
                write!(f, "CREATE CONTRACT {}", Ident(&s.name))?;
                authorization(f, &s.authorization)?;
                f.write_str(" (")?;
                for (i, m) in s.messages.iter().enumerate() {
                    comma(f, i)?;
                    let side = match m.sent_by {
                        SentBy::Initiator => "INITIATOR",
                        SentBy::Target => "TARGET",
                        SentBy::Any => "ANY",
                    };
                    write!(f, "{} SENT BY {side}", Ident(&m.message_type))?;
                }
                f.write_str(")")
            }
            Statement::CreateQueue(s) => {
                write!(f, "CREATE QUEUE {}", s.name)?;
                if !s.settings.is_empty() {
                    write!(f, " WITH {}", s.settings)?;
                }
                if let Some(filegroup) = &s.filegroup {
                    write!(f, " ON {}", Ident(filegroup))?;
                }
                Ok(())
            }
            Statement::AlterQueue(s) => write!(f, "ALTER QUEUE {} WITH {}", s.name, s.settings),
            Statement::CreateService(s) => {
                write!(f, "CREATE SERVICE {}", Ident(&s.name))?;
                authorization(f, &s.authorization)?;
                write!(f, " ON QUEUE {}", s.queue)?;
                if !s.contracts.is_empty() {
                    f.write_str(" (")?;
                    for (i, contract) in s.contracts.iter().enumerate() {
                        comma(f, i)?;
                        write!(f, "{}", Ident(contract))?;
                    }
                    f.write_str(")")?;
                }
                Ok(())
            }
            Statement::CreateRoute(s) => {
                write!(f, "CREATE ROUTE {}", Ident(&s.name))?;
                authorization(f, &s.authorization)?;
                write!(f, " WITH {}", s.settings)
            }
            Statement::AlterRoute(s) => {
                write!(f, "ALTER ROUTE {} WITH {}", Ident(&s.name), s.settings)
            }
            Statement::CreateBrokerPriority(s) => {
                write!(
                    f,
                    "CREATE BROKER PRIORITY {} FOR CONVERSATION SET (",
                    Ident(&s.name)
                )?;
                let mut settings = Vec::new();
                if let Some(c) = &s.contract_name {
                    settings.push(format!("CONTRACT_NAME = {}", name_or_any(c, false)));
                }
                if let Some(l) = &s.local_service_name {
                    settings.push(format!("LOCAL_SERVICE_NAME = {}", name_or_any(l, false)));
                }
                if let Some(r) = &s.remote_service_name {
                    settings.push(format!("REMOTE_SERVICE_NAME = {}", name_or_any(r, true)));
                }
                match s.priority_level {
                    Some(PriorityLevel::Level(level)) => {
                        settings.push(format!("PRIORITY_LEVEL = {level}"));
                    }
                    Some(PriorityLevel::Default) => {
                        settings.push("PRIORITY_LEVEL = DEFAULT".into())
                    }
                    None => {}
                }
                write!(f, "{})", settings.join(", "))
            }
            Statement::Drop(s) => {
                write!(f, "DROP {} ", s.kind.keyword())?;
                if s.kind == ObjectKind::Queue {
                    write!(f, "{}", s.name)
                } else {
                    write!(f, "{}", Ident(&s.name.name))
                }
            }
            Statement::BeginDialog(s) => {
                write!(
                    f,
                    "BEGIN DIALOG CONVERSATION @{} FROM SERVICE {} TO SERVICE {}",
                    s.handle_variable,
                    Ident(&s.from_service),
                    Str(&s.to_service)
                )?;
                match s.broker_instance {
                    Some(BrokerInstance::Id(id)) => write!(f, ", N'{id}'")?,
                    Some(BrokerInstance::CurrentDatabase) => {
                        f.write_str(", N'CURRENT DATABASE'")?
                    }
                    None => {}
                }
                if let Some(contract) = &s.contract {
                    write!(f, " ON CONTRACT {}", Ident(contract))?;
                }
                let mut options = Vec::new();
                match &s.related {
                    Some(Related::Conversation(h)) => {
                        options.push(format!("RELATED_CONVERSATION = {}", Handle(h)));
                    }
                    Some(Related::Group(g)) => {
                        options.push(format!("RELATED_CONVERSATION_GROUP = {}", Group(g)));
                    }
                    None => {}
                }
                if let Some(lifetime) = &s.lifetime_secs {
                    options.push(format!("LIFETIME = {}", Int(lifetime)));
                }
                if let Some(encryption) = s.encryption {
                    options.push(format!("ENCRYPTION = {}", on_off(encryption)));
                }
                if !options.is_empty() {
                    write!(f, " WITH {}", options.join(", "))?;
                }
                Ok(())
            }
            Statement::Send(s) => {
                f.write_str("SEND ON CONVERSATION (")?;
                for (i, h) in s.conversations.iter().enumerate() {
                    comma(f, i)?;
                    write!(f, "{}", Handle(h))?;
                }
                f.write_str(")")?;
                if let Some(message_type) = &s.message_type {
                    write!(f, " MESSAGE TYPE {}", Ident(message_type))?;
                }
                if let Some(body) = &s.body {
                    write!(f, " ({body})")?;
                }
                Ok(())
            }
            Statement::Receive(s) => {
                if s.waitfor.is_some() {
                    f.write_str("WAITFOR (")?;
                }
                f.write_str("RECEIVE ")?;
                if let Some(top) = &s.top {
                    write!(f, "TOP ({}) ", Int(top))?;
                }
                write!(f, "{} FROM {}", s.columns, s.queue)?;
                if let Some(into) = &s.into {
                    write!(f, " INTO @{into}")?;
                }
                match &s.filter {
                    Some(ReceiveFilter::Conversation(h)) => {
                        write!(f, " WHERE conversation_handle = {}", Handle(h))?;
                    }
                    Some(ReceiveFilter::Group(g)) => {
                        write!(f, " WHERE conversation_group_id = {}", Group(g))?;
                    }
                    None => {}
                }
                close_waitfor(f, &s.waitfor)
            }
            Statement::GetConversationGroup(s) => {
                if s.waitfor.is_some() {
                    f.write_str("WAITFOR (")?;
                }
                write!(
                    f,
                    "GET CONVERSATION GROUP @{} FROM {}",
                    s.group_variable, s.queue
                )?;
                close_waitfor(f, &s.waitfor)
            }
            Statement::MoveConversation(s) => write!(
                f,
                "MOVE CONVERSATION {} TO {}",
                Handle(&s.conversation),
                Group(&s.group)
            ),
            Statement::EndConversation(s) => {
                write!(f, "END CONVERSATION {}", Handle(&s.conversation))?;
                match &s.with {
                    Some(EndWith::Cleanup) => f.write_str(" WITH CLEANUP"),
                    Some(EndWith::Error { code, description }) => {
                        write!(f, " WITH ERROR = {} DESCRIPTION = ", Int(code))?;
                        match description {
                            Operand::Literal(text) => write!(f, "{}", Str(text)),
                            Operand::Variable(v) => write!(f, "@{v}"),
                        }
                    }
                    None => Ok(()),
                }
            }
            Statement::BeginConversationTimer(s) => write!(
                f,
                "BEGIN CONVERSATION TIMER ({}) TIMEOUT = {}",
                Handle(&s.conversation),
                Int(&s.timeout_secs)
            ),
            Statement::BeginTransaction => f.write_str("BEGIN TRANSACTION"),
            Statement::Commit => f.write_str("COMMIT TRANSACTION"),
            Statement::Rollback => f.write_str("ROLLBACK TRANSACTION"),
            Statement::Declare(s) => {
                f.write_str("DECLARE ")?;
                for (i, v) in s.variables.iter().enumerate() {
                    comma(f, i)?;
                    write!(f, "@{} {}", v.name, v.data_type)?;
                    if let Some(initial) = &v.initial {
                        write!(f, " = {initial}")?;
                    }
                }
                Ok(())
            }
            Statement::Set(s) => write!(f, "SET @{} = {}", s.variable, s.value),
            Statement::SelectValues(s) => {
                f.write_str("SELECT ")?;
                for (i, item) in s.items.iter().enumerate() {
                    comma(f, i)?;
                    match item {
                        ValueItem::Show { value, alias } => {
                            write!(f, "{value}")?;
                            if let Some(alias) = alias {
                                write!(f, " AS {}", Ident(alias))?;
                            }
                        }
                        ValueItem::Assign { variable, value } => {
                            write!(f, "@{variable} = {value}")?
                        }
                    }
                }
                Ok(())
            }
            Statement::Select(s) => {
                write!(f, "SELECT {} FROM ", s.columns)?;
                match &s.from {
                    SelectSource::View(view) => write!(f, "sys.{}", view.name())?,
                    SelectSource::Queue(queue) => write!(f, "{queue}")?,
                }
                for (i, condition) in s.filter.iter().enumerate() {
                    f.write_str(if i == 0 { " WHERE " } else { " AND " })?;
                    write!(f, "{} = {}", Ident(&condition.column), condition.value)?;
                }
                Ok(())
            }
            Statement::Use(s) => write!(f, "USE {}", Ident(&s.database)),
            Statement::If(s) => {
                f.write_str("IF ")?;
                match &s.condition {
                    Condition::Compare { left, op, right } => {
                        let op = match op {
                            CompareOp::Eq => "=",
                            CompareOp::NotEq => "<>",
                        };
                        write!(f, "{left} {op} {right}")?;
                    }
                    Condition::IsNull { value, negated } => {
                        let not = if *negated { "NOT " } else { "" };
                        write!(f, "{value} IS {not}NULL")?;
                    }
                }
                f.write_str(" ")?;
                block(f, &s.then)?;
                if let Some(otherwise) = &s.otherwise {
                    f.write_str(" ELSE ")?;
                    block(f, otherwise)?;
                }
                Ok(())
            }
            Statement::Block(s) => block(f, &s.statements),
        }
    }
}

impl Display for ObjectName {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if let Some(database) = &self.database {
            write!(f, "{}.", Ident(database))?;
        }
        if let Some(schema) = &self.schema {
            write!(f, "{}.", Ident(schema))?;
        }
        write!(f, "{}", Ident(&self.name))
    }
}

impl Display for QueueSettings {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let mut options = Vec::new();
        if let Some(status) = self.status {
            options.push(format!("STATUS = {}", on_off(status)));
        }
        if let Some(retention) = self.retention {
            options.push(format!("RETENTION = {}", on_off(retention)));
        }
        match &self.activation {
            Some(Activation::Drop) => options.push("ACTIVATION (DROP)".into()),
            Some(Activation::Set(a)) => {
                let mut inner = Vec::new();
                if let Some(status) = a.status {
                    inner.push(format!("STATUS = {}", on_off(status)));
                }
                if let Some(procedure) = &a.procedure_name {
                    inner.push(format!("PROCEDURE_NAME = {procedure}"));
                }
                if let Some(readers) = a.max_queue_readers {
                    inner.push(format!("MAX_QUEUE_READERS = {readers}"));
                }
                match &a.execute_as {
                    Some(ExecuteAs::Caller) => inner.push("EXECUTE AS SELF".into()),
                    Some(ExecuteAs::Owner) => inner.push("EXECUTE AS OWNER".into()),
                    Some(ExecuteAs::User(user)) => inner.push(format!("EXECUTE AS {}", Str(user))),
                    None => {}
                }
                options.push(format!("ACTIVATION ({})", inner.join(", ")));
            }
            None => {}
        }
        if let Some(poison) = self.poison_message_handling {
            options.push(format!(
                "POISON_MESSAGE_HANDLING (STATUS = {})",
                on_off(poison)
            ));
        }
        f.write_str(&options.join(", "))
    }
}

impl Display for RouteSettings {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let mut options = Vec::new();
        if let Some(service) = &self.service_name {
            options.push(format!("SERVICE_NAME = {}", Str(service)));
        }
        if let Some(instance) = &self.broker_instance {
            options.push(format!("BROKER_INSTANCE = N'{instance}'"));
        }
        if let Some(lifetime) = self.lifetime_secs {
            options.push(format!("LIFETIME = {lifetime}"));
        }
        if let Some(address) = &self.address {
            options.push(format!("ADDRESS = {address}"));
        }
        if let Some(address) = &self.mirror_address {
            options.push(format!("MIRROR_ADDRESS = {address}"));
        }
        f.write_str(&options.join(", "))
    }
}

impl Display for RouteAddress {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            RouteAddress::Local => f.write_str("N'LOCAL'"),
            RouteAddress::Network { scheme, host, port } => {
                let scheme = match scheme {
                    AddressScheme::Tcp => "TCP",
                    AddressScheme::Quic => "quic",
                };
                write!(f, "{}", Str(&format!("{scheme}://{host}:{port}")))
            }
        }
    }
}

impl Display for Columns {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Columns::All => f.write_str("*"),
            Columns::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    comma(f, i)?;
                    if let Some(variable) = &item.assign_to {
                        write!(f, "@{variable} = ")?;
                    }
                    match &item.cast {
                        Some(to) => write!(f, "CAST({} AS {to})", Ident(&item.column))?,
                        None => write!(f, "{}", Ident(&item.column))?,
                    }
                    if let Some(alias) = &item.alias {
                        write!(f, " AS {}", Ident(alias))?;
                    }
                }
                Ok(())
            }
        }
    }
}

impl Display for Expr {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Literal(Literal::String { value, national }) => {
                if *national {
                    f.write_char('N')?;
                }
                write!(f, "'{}'", value.replace('\'', "''"))
            }
            Expr::Literal(Literal::Binary(bytes)) => {
                f.write_str("0x")?;
                bytes.iter().try_for_each(|b| write!(f, "{b:02X}"))
            }
            Expr::Literal(Literal::Integer(n)) => write!(f, "{n}"),
            Expr::Literal(Literal::Null) => f.write_str("NULL"),
            Expr::Variable(name) => write!(f, "@{name}"),
            Expr::Cast { expr, to } => write!(f, "CAST({expr} AS {to})"),
        }
    }
}

impl Display for TypeName {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        match self.length {
            Some(TypeLength::Max) => f.write_str("(MAX)"),
            Some(TypeLength::Count(n)) => match self.scale {
                Some(scale) => write!(f, "({n}, {scale})"),
                None => write!(f, "({n})"),
            },
            None => Ok(()),
        }
    }
}

/// `[name]`, with `]` doubled.
struct Ident<'a>(&'a str);

impl Display for Ident<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", self.0.replace(']', "]]"))
    }
}

/// `N'text'`, with `'` doubled.
struct Str<'a>(&'a str);

impl Display for Str<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "N'{}'", self.0.replace('\'', "''"))
    }
}

struct Int<'a>(&'a Operand<i64>);

impl Display for Int<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self.0 {
            Operand::Literal(n) => write!(f, "{n}"),
            Operand::Variable(v) => write!(f, "@{v}"),
        }
    }
}

struct Handle<'a>(&'a Operand<ConversationHandle>);

impl Display for Handle<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self.0 {
            Operand::Literal(h) => write!(f, "'{h}'"),
            Operand::Variable(v) => write!(f, "@{v}"),
        }
    }
}

struct Group<'a>(&'a Operand<ConversationGroupId>);

impl Display for Group<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self.0 {
            Operand::Literal(g) => write!(f, "'{g}'"),
            Operand::Variable(v) => write!(f, "@{v}"),
        }
    }
}

fn authorization(f: &mut Formatter<'_>, owner: &Option<String>) -> fmt::Result {
    match owner {
        Some(owner) => write!(f, " AUTHORIZATION {}", Ident(owner)),
        None => Ok(()),
    }
}

fn comma(f: &mut Formatter<'_>, index: usize) -> fmt::Result {
    if index > 0 {
        f.write_str(", ")?;
    }
    Ok(())
}

fn on_off(on: bool) -> &'static str {
    if on { "ON" } else { "OFF" }
}

fn name_or_any(name: &NameOrAny, string: bool) -> String {
    match name {
        NameOrAny::Any => "ANY".into(),
        NameOrAny::Name(name) if string => Str(name).to_string(),
        NameOrAny::Name(name) => Ident(name).to_string(),
    }
}

fn close_waitfor(f: &mut Formatter<'_>, waitfor: &Option<WaitFor>) -> fmt::Result {
    match waitfor {
        Some(WaitFor {
            timeout_ms: Some(timeout),
        }) => write!(f, "), TIMEOUT {}", Int(timeout)),
        Some(WaitFor { timeout_ms: None }) => f.write_str(")"),
        None => Ok(()),
    }
}

fn block(f: &mut Formatter<'_>, statements: &[Statement]) -> fmt::Result {
    f.write_str("BEGIN\n")?;
    for statement in statements {
        writeln!(f, "{statement};")?;
    }
    f.write_str("END")
}
