//! How results look: aligned tables in the manner of `sqlcmd`, JSON for programs, and errors
//! that point at the script.
//!
//! Tables: a header line of column names, a line of dashes, one line per row, then
//! `(n rows affected)`. Values are in T-SQL's spelling (`Value`'s Display): `NULL`, integers,
//! text, upper-case GUIDs, and binary values — message bodies — as `0x…` hex, as `sqlcmd`
//! shows them (a body is bytes, and showing some as text would make `0x41` ambiguous; to read a
//! body as text, `CAST(message_body AS NVARCHAR(MAX))` in the RECEIVE or SELECT). Control
//! characters in text are escaped (`\n`, `\t`, `\u{1b}`) so that a row stays one line, and a
//! value longer than the cell limit (`CELL_CHARS_DEFAULT`, `--max-cell-chars`) is cut with
//! `…`. Widths count characters (a double-width character takes one column's space).
//! Integer columns are right-aligned.
//!
//! JSON (`--json`): one object, `{"results": [...], "error": null | {...}}`; each result is
//! `{"statement": "RECEIVE", "rows_affected": 2 | null, "columns": [{"name", "type"}] | null,
//! "rows": [[...]] | null}`. Values are typed: integers are numbers, text and GUIDs strings,
//! binary values `"0x…"` strings, NULL null; a column's `type` (`int`, `nvarchar`,
//! `uniqueidentifier`, `varbinary`, or null when every value is NULL) says which strings are
//! which. JSON values are never cut.

use std::fmt::Write as _;

use herald_engine::sql::{ResultSet, StatementResult, Value};
use serde_json::json;

use crate::target::{ErrorKind, ScriptError};

/// Set once stdout is found closed (its reader gone, as with `| head`).
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes to stdout (see the `out!` macro). A closed stdout is noted (`stdout_closed`), not a
/// panic: whoever read the output has what it wanted, and the command ends as it would — its
/// session closed, an embedded broker closed — printing nothing more. Other write errors are
/// reported on stderr.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    if stdout_closed() {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let _ = writeln!(std::io::stderr(), "herald: writing to stdout: {e}");
    }
}

/// Whether stdout was found closed: a command reading more input (the shell) stops.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Characters of a value shown in a table cell before it is cut (`--max-cell-chars`; 0 shows
/// everything). Enough for a GUID, a service name or a short body in hex.
pub const CELL_CHARS_DEFAULT: usize = 80;

/// Table rendering options.
#[derive(Debug, Clone, Copy)]
pub struct TableOptions {
    /// Characters a cell shows at most (0: no limit).
    pub cell_chars_max: usize,
}

impl Default for TableOptions {
    fn default() -> TableOptions {
        TableOptions {
            cell_chars_max: CELL_CHARS_DEFAULT,
        }
    }
}

/// The results of a script as text: each result set as a table followed by its row count;
/// statements that return no rows but count some (a RECEIVE or SELECT into variables) print
/// only the count; the others print nothing.
pub fn render_results(results: &[StatementResult], options: TableOptions) -> String {
    let mut out = String::new();
    for result in results {
        if let Some(set) = &result.result {
            out.push_str(&render_table(set, options));
            out.push('\n');
        }
        if let Some(rows) = result.rows_affected {
            let _ = writeln!(out, "{}", rows_affected(rows));
            out.push('\n');
        }
    }
    out
}

/// `(1 row affected)`, `(3 rows affected)`.
pub fn rows_affected(rows: u64) -> String {
    let noun = if rows == 1 { "row" } else { "rows" };
    format!("({rows} {noun} affected)")
}

/// One result set as an aligned table (header, dashes, rows), each line ending in `\n`;
/// integer columns are right-aligned.
pub fn render_table(set: &ResultSet, options: TableOptions) -> String {
    let right_aligned: Vec<bool> = (0..set.columns.len())
        .map(|i| column_type(set, i) == Some("int"))
        .collect();
    render_table_aligned(set, options, &right_aligned)
}

/// As [`render_table`], with the columns to right-align given (figures formatted as text).
pub fn render_table_aligned(
    set: &ResultSet,
    options: TableOptions,
    right_aligned: &[bool],
) -> String {
    let cells: Vec<Vec<String>> = set
        .rows
        .iter()
        .map(|row| row.iter().map(|v| cell_text(v, options)).collect())
        .collect();
    let headers: Vec<String> = set
        .columns
        .iter()
        .map(|c| cut(&escape_controls(c), options.cell_chars_max))
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, values: &[String]| {
        let mut text = String::new();
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                text.push(' ');
            }
            let pad = widths[i].saturating_sub(value.chars().count());
            if right_aligned.get(i).copied().unwrap_or(false) {
                text.extend(std::iter::repeat_n(' ', pad));
                text.push_str(value);
            } else {
                text.push_str(value);
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut out, &headers);
    let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(&mut out, &dashes);
    for row in &cells {
        line(&mut out, row);
    }
    out
}

/// The results and the error, if any, as one JSON document (see the module docs).
pub fn results_json(results: &[StatementResult], error: Option<&ScriptError>) -> serde_json::Value {
    let results: Vec<serde_json::Value> = results
        .iter()
        .map(|result| {
            let (columns, rows) = match &result.result {
                Some(set) => (
                    json!(
                        set.columns
                            .iter()
                            .enumerate()
                            .map(|(i, name)| json!({"name": name, "type": column_type(set, i)}))
                            .collect::<Vec<_>>()
                    ),
                    json!(
                        set.rows
                            .iter()
                            .map(|row| row.iter().map(value_json).collect::<Vec<_>>())
                            .collect::<Vec<_>>()
                    ),
                ),
                None => (serde_json::Value::Null, serde_json::Value::Null),
            };
            json!({
                "statement": result.statement,
                "rows_affected": result.rows_affected,
                "columns": columns,
                "rows": rows,
            })
        })
        .collect();
    json!({
        "results": results,
        "error": error.map(error_json),
    })
}

/// An error as JSON: `{"kind", "message", "line", "column"}`.
pub fn error_json(error: &ScriptError) -> serde_json::Value {
    let kind = match error.kind {
        ErrorKind::Syntax => "syntax",
        ErrorKind::Statement => "statement",
        ErrorKind::Connection => "connection",
    };
    json!({
        "kind": kind,
        "message": error.message,
        "line": error.position.map(|(line, _)| line),
        "column": error.position.map(|(_, column)| column),
    })
}

/// An error for a person: the message, then the script's line with a caret under the column,
/// then what ran (nothing, for a syntax error).
pub fn render_error(error: &ScriptError, script: &str) -> String {
    let mut out = format!("herald: {}\n", error.message);
    if let Some((line, column)) = error.position
        && let Some(text) = script.lines().nth((line as usize).saturating_sub(1))
    {
        let number = line.to_string();
        let _ = writeln!(out, "  {number} | {}", text.trim_end());
        // Tabs before the column stay tabs, so the caret lines up however they are shown.
        let pad: String = text
            .chars()
            .take((column as usize).saturating_sub(1))
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        let _ = writeln!(out, "  {} | {pad}^", " ".repeat(number.len()));
    }
    match error.kind {
        ErrorKind::Syntax => out.push_str("herald: nothing ran (the script does not parse)\n"),
        ErrorKind::Statement => out.push_str(
            "herald: the statements before it ran (committed, unless inside BEGIN TRANSACTION)\n",
        ),
        ErrorKind::Connection => {}
    }
    out
}

/// A column's type, from its first non-NULL value (a column holds one type).
fn column_type(set: &ResultSet, index: usize) -> Option<&'static str> {
    set.rows
        .iter()
        .filter_map(|row| row.get(index))
        .find(|v| !v.is_null())
        .map(|v| match v {
            Value::Int(_) => "int",
            Value::Text(_) => "nvarchar",
            Value::Binary(_) => "varbinary",
            Value::Guid(_) => "uniqueidentifier",
            Value::Null => unreachable!("filtered out above"),
        })
}

fn value_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Int(n) => json!(n),
        Value::Text(text) => json!(text),
        Value::Binary(_) | Value::Guid(_) => json!(value.to_string()),
    }
}

fn cell_text(value: &Value, options: TableOptions) -> String {
    let text = match value {
        // Hex of a long body is cut before it is all formatted (bodies go up to 8 MiB).
        Value::Binary(bytes) if options.cell_chars_max > 0 => {
            let shown = bytes.len().min(options.cell_chars_max / 2 + 1);
            let mut text = String::with_capacity(2 + shown * 2);
            text.push_str("0x");
            for b in &bytes[..shown] {
                let _ = write!(text, "{b:02X}");
            }
            if shown < bytes.len() {
                text.push_str("00"); // Any hex: forces the cut below to show it is cut.
            }
            text
        }
        Value::Text(text) => escape_controls(text),
        other => other.to_string(),
    };
    cut(&text, options.cell_chars_max)
}

/// `text` with control characters escaped, so that it stays on one line.
fn escape_controls(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// `text` cut to `max` characters, the last one `…` when cut (0: not cut).
fn cut(text: &str, max: usize) -> String {
    if max == 0 || text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(columns: &[&str], rows: Vec<Vec<Value>>) -> ResultSet {
        ResultSet {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows,
        }
    }

    #[test]
    fn a_table_aligns_its_columns_under_their_headers() {
        let table = render_table(
            &set(
                &["name", "messages", "body"],
                vec![
                    vec![
                        Value::Text("OrderQueue".into()),
                        Value::Int(12),
                        Value::Binary(vec![0x0A, 0xFF]),
                    ],
                    vec![Value::Text("Q".into()), Value::Int(3), Value::Null],
                ],
            ),
            TableOptions::default(),
        );
        assert_eq!(
            table,
            "name       messages body\n\
             ---------- -------- ------\n\
             OrderQueue       12 0x0AFF\n\
             Q                 3 NULL\n"
        );
    }

    #[test]
    fn guids_are_upper_case_and_an_empty_result_still_has_its_header() {
        let guid = 0x0011_2233_4455_6677_8899_aabb_ccdd_eeff_u128;
        let table = render_table(
            &set(&["conversation_handle"], vec![vec![Value::Guid(guid)]]),
            TableOptions::default(),
        );
        assert!(
            table.contains("00112233-4455-6677-8899-AABBCCDDEEFF"),
            "{table}"
        );
        let empty = render_table(&set(&["a", "bb"], vec![]), TableOptions::default());
        assert_eq!(empty, "a bb\n- --\n");
    }

    #[test]
    fn long_values_are_cut_and_control_characters_escaped() {
        let options = TableOptions { cell_chars_max: 10 };
        let table = render_table(
            &set(
                &["t", "b"],
                vec![vec![
                    Value::Text("line one\nline two".into()),
                    Value::Binary(vec![0xAB; 1000]),
                ]],
            ),
            options,
        );
        let row = table.lines().nth(2).unwrap();
        assert_eq!(row, "line one\\… 0xABABABA…");
        let uncut = render_table(
            &set(&["t"], vec![vec![Value::Text("x".repeat(200))]]),
            TableOptions { cell_chars_max: 0 },
        );
        assert!(uncut.contains(&"x".repeat(200)));
    }

    #[test]
    fn results_print_tables_then_counts_like_sqlcmd() {
        let results = vec![
            StatementResult {
                statement: "CREATE QUEUE",
                rows_affected: None,
                result: None,
            },
            StatementResult {
                statement: "SELECT",
                rows_affected: Some(1),
                result: None,
            },
            StatementResult {
                statement: "RECEIVE",
                rows_affected: Some(2),
                result: Some(set(
                    &["body"],
                    vec![vec![Value::Text("a".into())], vec![Value::Text("b".into())]],
                )),
            },
        ];
        assert_eq!(
            render_results(&results, TableOptions::default()),
            "(1 row affected)\n\nbody\n----\na\nb\n\n(2 rows affected)\n\n"
        );
    }

    #[test]
    fn json_is_typed_per_value_and_names_column_types() {
        let results = vec![StatementResult {
            statement: "RECEIVE",
            rows_affected: Some(1),
            result: Some(set(
                &["n", "t", "b", "g", "nothing"],
                vec![vec![
                    Value::Int(-7),
                    Value::Text("é\"".into()),
                    Value::Binary(vec![1, 2]),
                    Value::Guid(1),
                    Value::Null,
                ]],
            )),
        }];
        let error = ScriptError {
            kind: ErrorKind::Statement,
            message: "line 2, column 1: SEND: boom".into(),
            position: Some((2, 1)),
        };
        let value = results_json(&results, Some(&error));
        let text = value.to_string();
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        let result = &parsed["results"][0];
        assert_eq!(result["statement"], "RECEIVE");
        assert_eq!(result["rows_affected"], 1);
        assert_eq!(result["columns"][0], json!({"name": "n", "type": "int"}));
        assert_eq!(result["columns"][2]["type"], "varbinary");
        assert_eq!(result["columns"][3]["type"], "uniqueidentifier");
        assert_eq!(result["columns"][4]["type"], serde_json::Value::Null);
        assert_eq!(
            result["rows"][0],
            json!([
                -7,
                "é\"",
                "0x0102",
                "00000000-0000-0000-0000-000000000001",
                null
            ])
        );
        assert_eq!(parsed["error"]["kind"], "statement");
        assert_eq!(parsed["error"]["line"], 2);
        let no_rows = results_json(
            &[StatementResult {
                statement: "SEND",
                rows_affected: None,
                result: None,
            }],
            None,
        );
        assert_eq!(no_rows["results"][0]["rows"], serde_json::Value::Null);
        assert_eq!(no_rows["error"], serde_json::Value::Null);
    }

    #[test]
    fn an_error_points_at_its_line_and_column() {
        let script = "CREATE QUEUE Q;\n\tBEGIN DIALOG @h FROM SERVIC s";
        let error = ScriptError {
            kind: ErrorKind::Syntax,
            message: "syntax error at line 2, column 23: expected SERVICE after FROM".into(),
            position: Some((2, 23)),
        };
        let text = render_error(&error, script);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "  2 | \tBEGIN DIALOG @h FROM SERVIC s");
        assert_eq!(lines[2], format!("    | \t{}^", " ".repeat(21)));
        assert!(lines[3].contains("nothing ran"));
    }
}
