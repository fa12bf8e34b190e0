//! `herald shell`: statements typed (or piped) into one session, whose variables and open
//! transaction last until the shell ends.
//!
//! When input runs: at a `GO` line, as in `sqlcmd`; and at a line that ends with `;` once
//! what has been typed parses as whole statements — so `SEND …;` inside an unfinished
//! `BEGIN … END` or IF waits for its `END`, and so does a `;` inside an unclosed string or
//! comment. What does not parse for another reason runs at that `;` and reports its error.
//! `exit` or `quit` on a line of its own ends the shell (so does end of input); `help` prints
//! this.
//!
//! On a terminal, lines are edited with history (kept in `$HERALD_HISTORY`, or
//! `~/.herald_history`); the prompt is `herald*>` while an explicit transaction is open; Ctrl-C
//! drops the statement being typed, Ctrl-D ends the shell. Ending the shell with a transaction
//! open rolls it back, and says so on stderr. When
//! stdin is not a terminal, lines are read from it plainly, nothing is prompted, and the exit
//! code is 1 if any statement failed (0 otherwise; 4 if the node went away), so a piped script
//! behaves like `herald exec` with a session kept across batches. With `--json` each script
//! that runs prints one JSON document on one line (`herald exec --json`'s), so the output is
//! JSON Lines.

use std::io::{BufRead as _, IsTerminal as _};

use crate::exec::{self, OutputArgs};
use crate::target::{self, ConnectArgs, ErrorKind, Target};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "A statement runs at a line ending in ';' once what was typed parses as \
whole statements (a BEGIN ... END block runs at its END;), or at a line holding only GO. \
Variables and an open transaction last for the whole shell; 'exit' or Ctrl-D ends it. When \
stdin is not a terminal, statements are read from it without prompts, and the exit code is 1 \
if any failed."
)]
pub struct ShellArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// The prompt, and (`PROMPT_IN_TRANSACTION`) the prompt while an explicit transaction is open.
const PROMPT: &str = "herald> ";
const PROMPT_IN_TRANSACTION: &str = "herald*> ";
/// Lines of history kept.
const HISTORY_LINES_MAX: usize = 1000;

const HELP: &str = "\
Type T-SQL statements. A statement runs when its line ends with ';' (once what you typed is \
complete: a BEGIN ... END block runs at its END;) or at a line holding only GO.
Variables and an open transaction last for the whole shell; the prompt is herald*> while
a transaction is open.
  exit, quit   end the shell (an open transaction is rolled back)
  help         this text";

/// What a line of input asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Run this script.
    Run(String),
    Quit,
    Help,
}

/// Collects lines into scripts (see the module docs for when one is complete).
#[derive(Debug, Default)]
pub struct Batcher {
    buffer: String,
}

impl Batcher {
    /// Takes one line (without its newline); what to do now, if anything.
    pub fn line(&mut self, line: &str) -> Option<Input> {
        let trimmed = line.trim();
        if self.buffer.trim().is_empty() {
            let word = trimmed.trim_end_matches(';').trim();
            if word.eq_ignore_ascii_case("exit") || word.eq_ignore_ascii_case("quit") {
                self.buffer.clear();
                return Some(Input::Quit);
            }
            if word.eq_ignore_ascii_case("help") {
                self.buffer.clear();
                return Some(Input::Help);
            }
        }
        if trimmed.eq_ignore_ascii_case("go") {
            return self.take();
        }
        self.buffer.push_str(line);
        self.buffer.push('\n');
        if trimmed.ends_with(';') && is_complete(&self.buffer) {
            return self.take();
        }
        None
    }

    /// End of input: what is left, if anything.
    pub fn finish(&mut self) -> Option<Input> {
        self.take()
    }

    /// Whether a statement is being typed (for the prompt).
    pub fn is_continuing(&self) -> bool {
        !self.buffer.trim().is_empty()
    }

    /// Drops what was typed (Ctrl-C).
    pub fn clear(&mut self) {
        self.buffer.clear();
    }

    fn take(&mut self) -> Option<Input> {
        let script = std::mem::take(&mut self.buffer);
        (!script.trim().is_empty()).then_some(Input::Run(script))
    }
}

/// Whether `script` is whole statements: it parses, or fails for a reason more input would not
/// mend.
fn is_complete(script: &str) -> bool {
    match herald_engine::sql::parse(script) {
        Ok(_) => true,
        Err(herald_engine::Error::Syntax { message, .. }) => {
            !(message.contains("found end of input") || message.starts_with("unterminated"))
        }
        Err(_) => true,
    }
}

/// `herald shell`; returns the exit code.
pub fn run(args: &ShellArgs) -> u8 {
    let interactive = std::io::stdin().is_terminal();
    let result = target::with_target(&args.connect, |target| {
        if interactive {
            interactive_loop(target, &args.output)
        } else {
            piped_loop(target, &args.output)
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprint!("{}", crate::output::render_error(&error, ""));
            exec::exit_code(Some(&error))
        }
    }
}

/// Runs one script; `Err(code)` when the shell must stop (the connection is gone), else
/// whether it succeeded.
fn run_script(target: &mut dyn Target, output: &OutputArgs, script: &str) -> Result<bool, u8> {
    let outcome = target.execute_script(script);
    output.print(script, &outcome);
    match outcome.error.as_ref().map(|e| e.kind) {
        None => Ok(true),
        Some(ErrorKind::Connection) => Err(exec::EXIT_UNAVAILABLE),
        Some(_) => Ok(false),
    }
}

/// The prompt for the next line: [`PROMPT`] or [`PROMPT_IN_TRANSACTION`], and while a
/// statement is being typed, `-> ` aligned under its end.
fn prompt(continuing: bool, in_transaction: bool) -> String {
    let prompt = if in_transaction {
        PROMPT_IN_TRANSACTION
    } else {
        PROMPT
    };
    if continuing {
        format!("{:>width$}", "-> ", width = prompt.len())
    } else {
        prompt.to_owned()
    }
}

/// Whether the session has an explicit transaction open; a session that cannot say (its node
/// went away) has none that will survive it.
fn in_transaction(target: &mut dyn Target) -> bool {
    target.transaction_count().is_ok_and(|count| count > 0)
}

/// At the end of the shell: an open transaction is rolled back when the session ends, which
/// the user may not expect of a script that forgot its COMMIT.
fn warn_if_transaction_open(target: &mut dyn Target) {
    if let Ok(count) = target.transaction_count()
        && count > 0
    {
        eprintln!(
            "herald: the open transaction (@@TRANCOUNT {count}) is rolled back as the shell \
             ends; COMMIT keeps its work"
        );
    }
}

fn piped_loop(target: &mut dyn Target, output: &OutputArgs) -> u8 {
    let mut batcher = Batcher::default();
    let mut failed = false;
    let mut lines = std::io::stdin().lock().lines();
    loop {
        let input = match lines.next() {
            Some(Ok(line)) => batcher.line(&line),
            Some(Err(e)) => {
                eprintln!("herald: reading stdin: {e}");
                return exec::EXIT_UNAVAILABLE;
            }
            None => match batcher.finish() {
                Some(input) => Some(input),
                None => break,
            },
        };
        match input {
            None => {}
            Some(Input::Quit) => break,
            Some(Input::Help) => outln!("{HELP}"),
            Some(Input::Run(script)) => match run_script(target, output, &script) {
                Ok(ok) => failed |= !ok,
                Err(code) => return code,
            },
        }
        if crate::output::stdout_closed() {
            // Nobody reads what the rest would print: stop, closing as at the end.
            break;
        }
    }
    warn_if_transaction_open(target);
    if failed {
        exec::EXIT_STATEMENT_FAILED
    } else {
        exec::EXIT_OK
    }
}

fn interactive_loop(target: &mut dyn Target, output: &OutputArgs) -> u8 {
    use rustyline::error::ReadlineError;
    let config = rustyline::Config::builder()
        .max_history_size(HISTORY_LINES_MAX)
        .map(|b| b.auto_add_history(true).build());
    let editor = config.map_err(|e| e.to_string()).and_then(|config| {
        rustyline::DefaultEditor::with_config(config).map_err(|e| e.to_string())
    });
    let mut editor = match editor {
        Ok(editor) => editor,
        Err(e) => {
            eprintln!("herald: starting the line editor: {e}");
            return exec::EXIT_UNAVAILABLE;
        }
    };
    let history = history_path();
    if let Some(path) = &history {
        // A missing history file is the first run, not an error.
        let _ = editor.load_history(path);
    }
    outln!("herald shell: statements run at a line ending in ';' or at GO; 'help', 'exit'.");
    let mut batcher = Batcher::default();
    let mut code = exec::EXIT_OK;
    let mut open_transaction = in_transaction(target);
    loop {
        let prompt = prompt(batcher.is_continuing(), open_transaction);
        let input = match editor.readline(&prompt) {
            Ok(line) => batcher.line(&line),
            Err(ReadlineError::Interrupted) => {
                batcher.clear();
                continue;
            }
            Err(ReadlineError::Eof) => match batcher.finish() {
                Some(input) => Some(input),
                None => break,
            },
            Err(e) => {
                eprintln!("herald: reading input: {e}");
                code = exec::EXIT_UNAVAILABLE;
                break;
            }
        };
        match input {
            None => {}
            Some(Input::Quit) => break,
            Some(Input::Help) => outln!("{HELP}"),
            Some(Input::Run(script)) => {
                if let Err(stop) = run_script(target, output, &script) {
                    code = stop;
                    break;
                }
                open_transaction = in_transaction(target);
            }
        }
    }
    if code == exec::EXIT_OK {
        warn_if_transaction_open(target);
    }
    if let Some(path) = &history
        && let Err(e) = editor.save_history(path)
    {
        eprintln!("herald: saving history to {}: {e}", path.display());
    }
    code
}

fn history_path() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("HERALD_HISTORY") {
        return Some(path.into());
    }
    std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".herald_history"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lines: &[&str]) -> Vec<Input> {
        let mut batcher = Batcher::default();
        let mut inputs: Vec<Input> = lines.iter().filter_map(|l| batcher.line(l)).collect();
        inputs.extend(batcher.finish());
        inputs
    }

    #[test]
    fn a_statement_runs_at_its_semicolon_and_may_span_lines() {
        assert_eq!(
            feed(&["CREATE QUEUE", "  Q;", "CREATE QUEUE R;"]),
            vec![
                Input::Run("CREATE QUEUE\n  Q;\n".into()),
                Input::Run("CREATE QUEUE R;\n".into())
            ]
        );
    }

    #[test]
    fn a_block_runs_at_its_end_not_at_the_semicolons_inside() {
        let inputs = feed(&[
            "IF @x IS NULL",
            "BEGIN",
            "  SELECT 1;",
            "  SELECT 2;",
            "END;",
        ]);
        assert_eq!(inputs.len(), 1, "{inputs:?}");
    }

    #[test]
    fn go_runs_what_was_typed_and_an_open_string_waits() {
        assert_eq!(
            feed(&["SELECT 'a;", "b';", "SELECT 1", "GO", "GO"]),
            vec![
                Input::Run("SELECT 'a;\nb';\n".into()),
                Input::Run("SELECT 1\n".into())
            ]
        );
    }

    #[test]
    fn a_syntax_error_runs_at_the_semicolon_to_be_reported() {
        assert_eq!(
            feed(&["CREATE QUEU Q;"]),
            vec![Input::Run("CREATE QUEU Q;\n".into())]
        );
    }

    #[test]
    fn the_prompt_shows_an_open_transaction_and_continuations_align_under_it() {
        assert_eq!(prompt(false, false), "herald> ");
        assert_eq!(prompt(false, true), "herald*> ");
        assert_eq!(prompt(true, false), "     -> ");
        assert_eq!(prompt(true, true), "      -> ");
        assert_eq!(prompt(true, true).len(), prompt(false, true).len());
    }

    #[test]
    fn exit_and_help_are_words_on_their_own_line() {
        assert_eq!(feed(&["help", "quit"]), vec![Input::Help, Input::Quit]);
        // Inside a statement they are just text.
        assert_eq!(
            feed(&["SELECT", "exit"]),
            vec![Input::Run("SELECT\nexit\n".into())]
        );
    }
}
