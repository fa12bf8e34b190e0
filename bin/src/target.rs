//! What `herald exec`, `herald shell` and `herald status` run against: a [`Target`] is one
//! T-SQL session (its variables and open transaction last as long as it does) plus a status
//! query. Two kinds: a node, through the client protocol (`remote::Remote`), and [`Embedded`],
//! a `sql::Session` on a broker this process opens itself (`--embedded`: the data directory of
//! a node that is not running).
//!
//! The commands see errors as [`ScriptError`]s, which keep what decides the exit code and the
//! rendering: whether anything ran (a syntax error runs nothing) and where the statement is.

use herald_engine::sql::{Session, StatementResult};
use herald_engine::{Broker, EndpointState};
use herald_net::client::StatusReport;

/// One session against a node or an embedded broker.
pub trait Target {
    /// Runs `script` (parsed whole first: a syntax error runs nothing), returning the results
    /// of the statements that ran and the error that stopped it, if one did.
    fn execute_script(&mut self, script: &str) -> Outcome;
    /// What is queued and in flight.
    fn status(&mut self) -> Result<StatusReport, String>;
    /// The session's `@@TRANCOUNT`: 0 unless an explicit transaction is open.
    fn transaction_count(&mut self) -> Result<u32, String>;
}

/// What running a script did.
#[derive(Debug)]
pub struct Outcome {
    pub results: Vec<StatementResult>,
    pub error: Option<ScriptError>,
}

/// Why a script stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptError {
    pub kind: ErrorKind,
    /// The full message (the engine's: it names the line, column and what was expected).
    pub message: String,
    /// 1-based line and column (in characters) of the offending token (syntax) or of the
    /// failing top-level statement (runtime).
    pub position: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The script did not parse (or declared a variable twice): nothing ran.
    Syntax,
    /// A statement failed while running: the ones before it ran.
    Statement,
    /// The node could not be reached, or the connection was lost.
    Connection,
}

impl ScriptError {
    /// Classifies an engine error by what ran.
    pub fn from_engine(error: &herald_engine::Error) -> ScriptError {
        let (kind, position) = match error {
            herald_engine::Error::Syntax { line, column, .. } => {
                (ErrorKind::Syntax, Some((*line, *column)))
            }
            herald_engine::Error::Statement { line, column, .. } => {
                (ErrorKind::Statement, Some((*line, *column)))
            }
            _ => (ErrorKind::Statement, None),
        };
        ScriptError {
            kind,
            message: error.to_string(),
            position,
        }
    }
}

/// A session on a broker this process opened (the data directory of a node that is not
/// running, or the bench's).
#[derive(Debug)]
pub struct Embedded<'b> {
    broker: &'b Broker,
    session: Session<'b>,
}

impl<'b> Embedded<'b> {
    pub fn new(broker: &'b Broker) -> Embedded<'b> {
        Embedded {
            broker,
            session: Session::new(broker),
        }
    }
}

impl Target for Embedded<'_> {
    fn execute_script(&mut self, script: &str) -> Outcome {
        let outcome = self.session.execute_script(script);
        Outcome {
            results: outcome.results,
            error: outcome.error.as_ref().map(ScriptError::from_engine),
        }
    }

    fn status(&mut self) -> Result<StatusReport, String> {
        Ok(StatusReport::of_broker(self.broker))
    }

    fn transaction_count(&mut self) -> Result<u32, String> {
        Ok(self.session.transaction_count())
    }
}

/// `sys.conversation_endpoints`' `state_desc` of a state code (`CO`: `CONVERSING`); empty for
/// a code this build does not know (a newer node's).
pub fn state_desc(code: &str) -> &'static str {
    EndpointState::from_code(code).map_or("", EndpointState::description)
}

/// Where a command's session goes: `--node` (through the client protocol, with the admin
/// credentials the node keeps in `--data-dir`) or, with `--embedded`, the broker in
/// `--data-dir` opened by this process.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// The node's address, `host:port` (or `quic://host:port`, as the node prints it).
    #[arg(long, default_value = DEFAULT_NODE_ADDR, value_name = "ADDR")]
    pub node: String,
    /// The node's data directory: where its local admin client certificate is (or, with
    /// `--embedded`, the broker itself).
    #[arg(long, default_value = DEFAULT_DATA_DIR, value_name = "DIR")]
    pub data_dir: std::path::PathBuf,
    /// Open the broker in `--data-dir` in this process instead of connecting to a node (the
    /// node must not be running: the directory is locked while it is).
    #[arg(long)]
    pub embedded: bool,
}

/// Where `herald node` listens by default, and so where the client commands connect.
pub const DEFAULT_NODE_ADDR: &str = "127.0.0.1:4022";
/// The node's default data directory.
pub const DEFAULT_DATA_DIR: &str = "./herald-data";

/// Runs `work` on a session as `how` says, then closes it (an embedded broker is closed
/// cleanly: checkpointed, its log synced).
pub fn with_target<T>(
    how: &ConnectArgs,
    work: impl FnOnce(&mut dyn Target) -> T,
) -> Result<T, ScriptError> {
    let failed = |message: String| ScriptError {
        kind: ErrorKind::Connection,
        message,
        position: None,
    };
    if how.embedded {
        // A directory that is not there is a mistyped path far more often than a wish for a
        // new broker: made silently (64 MiB of log), it answered as if all were well. (An
        // existing directory may get a new broker: scripts set one up that way.)
        if !how.data_dir.is_dir() {
            return Err(failed(format!(
                "{} is not a directory: --embedded opens the data directory of a stopped node \
                 (or makes a new broker in an existing directory)",
                how.data_dir.display()
            )));
        }
        let broker = Broker::open(&how.data_dir, herald_engine::Options::default())
            .map_err(|e| failed(format!("opening {}: {e}", how.data_dir.display())))?;
        let mut target = Embedded::new(&broker);
        let result = work(&mut target);
        drop(target);
        broker
            .close()
            .map_err(|e| failed(format!("closing {}: {e}", how.data_dir.display())))?;
        return Ok(result);
    }
    let mut target = crate::remote::Remote::connect(&how.node, &how.data_dir)?;
    let result = work(&mut target);
    // Closed, not dropped: the node learns at once that the session is over (and rolls back a
    // transaction it left open, freeing its locks). Dropped, the close often never left the
    // process: the node kept the session — and its locks and one of its 64 slots — until its
    // idle timeout, and a loop of `herald exec` ran out of sessions.
    target.into_client().close();
    Ok(result)
}
