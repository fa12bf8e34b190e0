//! `herald exec`: runs one script — from the command line, a file, or stdin (`-f -`) — in one
//! session, prints each result set as a table (or everything as JSON), and says by its exit
//! code how far the script got.
//!
//! Exit codes (also `herald exec --help`):
//! - 0: every statement ran;
//! - 1: a statement failed while running: the statements before it ran (and committed, unless
//!   inside BEGIN TRANSACTION, which the session's end rolls back); their results are printed;
//! - 2: the command line is wrong;
//! - 3: the script does not parse: nothing ran;
//! - 4: the node could not be reached (or the connection was lost, or the data directory could
//!   not be opened), or the script file could not be read.

use std::io::Read as _;
use std::path::PathBuf;

use herald_engine::sql::SCRIPT_BYTES_MAX;

use crate::output::{self, TableOptions};
use crate::target::{self, ConnectArgs, ErrorKind, ScriptError};

/// Every statement ran.
pub const EXIT_OK: u8 = 0;
/// A statement failed while running.
pub const EXIT_STATEMENT_FAILED: u8 = 1;
// 2: the command line is wrong (clap's own exit code).
/// The script does not parse: nothing ran.
pub const EXIT_SYNTAX: u8 = 3;
/// The node, the data directory or the script file could not be reached or read.
pub const EXIT_UNAVAILABLE: u8 = 4;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit codes: 0 every statement ran; 1 a statement failed (those before it \
ran); 2 bad command line; 3 the script does not parse (nothing ran); 4 the node, data directory \
or script file could not be reached or read."
)]
pub struct ExecArgs {
    /// The statements to run (T-SQL; separated by `;`, `GO` lines or nothing).
    #[arg(conflicts_with = "file", required_unless_present = "file")]
    pub statements: Option<String>,
    /// Read the script from this file (`-` for stdin).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// How results are printed (`exec` and `shell`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct OutputArgs {
    /// Print results as JSON: {"results": [{"statement", "rows_affected", "columns", "rows"}],
    /// "error"}.
    #[arg(long)]
    pub json: bool,
    /// Characters of a value shown in a table cell before it is cut with `…` (0: no limit).
    #[arg(long, default_value_t = output::CELL_CHARS_DEFAULT, value_name = "N")]
    pub max_cell_chars: usize,
}

impl OutputArgs {
    /// Prints what a script did: results on stdout, the error (pointing into `script`) on
    /// stderr.
    pub fn print(&self, script: &str, outcome: &target::Outcome) {
        if self.json {
            outln!(
                "{}",
                output::results_json(&outcome.results, outcome.error.as_ref())
            );
        } else {
            out!(
                "{}",
                output::render_results(
                    &outcome.results,
                    TableOptions {
                        cell_chars_max: self.max_cell_chars,
                    },
                )
            );
        }
        if let Some(error) = &outcome.error {
            eprint!("{}", output::render_error(error, script));
        }
    }
}

/// The exit code for how a script ended.
pub fn exit_code(error: Option<&ScriptError>) -> u8 {
    match error.map(|e| e.kind) {
        None => EXIT_OK,
        Some(ErrorKind::Statement) => EXIT_STATEMENT_FAILED,
        Some(ErrorKind::Syntax) => EXIT_SYNTAX,
        Some(ErrorKind::Connection) => EXIT_UNAVAILABLE,
    }
}

/// `herald exec`; returns the exit code.
pub fn run(args: &ExecArgs) -> u8 {
    let script = match read_script(args) {
        Ok(script) => script,
        Err((code, message)) => {
            eprintln!("herald: {message}");
            return code;
        }
    };
    let outcome = target::with_target(&args.connect, |target| target.execute_script(&script));
    match outcome {
        Ok(outcome) => {
            args.output.print(&script, &outcome);
            exit_code(outcome.error.as_ref())
        }
        Err(error) => {
            if args.output.json {
                outln!("{}", output::results_json(&[], Some(&error)));
            }
            eprint!("{}", output::render_error(&error, &script));
            exit_code(Some(&error))
        }
    }
}

/// The script, from the argument, a file or stdin: `Err((exit code, why))` when it cannot be
/// read or is longer than a script may be (read no further than that).
fn read_script(args: &ExecArgs) -> Result<String, (u8, String)> {
    let unavailable = |message: String| (EXIT_UNAVAILABLE, message);
    let script = match (&args.statements, &args.file) {
        (Some(statements), _) => statements.clone(),
        (None, Some(path)) if path.as_os_str() == "-" => read_bounded(std::io::stdin().lock())
            .map_err(|e| unavailable(format!("reading the script from stdin: {e}")))?,
        (None, Some(path)) => std::fs::File::open(path)
            .and_then(read_bounded)
            .map_err(|e| unavailable(format!("reading the script {}: {e}", path.display())))?,
        (None, None) => {
            return Err(unavailable(
                "no statements: give them as an argument or with -f FILE".into(),
            ));
        }
    };
    if script.len() > SCRIPT_BYTES_MAX {
        return Err((
            EXIT_SYNTAX,
            format!(
                "the script is longer than the maximum of {SCRIPT_BYTES_MAX} bytes: nothing ran \
                 (split it into several)"
            ),
        ));
    }
    Ok(script)
}

/// Reads UTF-8 text, at most one byte past `SCRIPT_BYTES_MAX` (enough to tell it is too long).
fn read_bounded(reader: impl std::io::Read) -> std::io::Result<String> {
    let mut script = String::new();
    reader
        .take(SCRIPT_BYTES_MAX as u64 + 1)
        .read_to_string(&mut script)?;
    Ok(script)
}
