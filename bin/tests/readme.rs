//! README.md is what a newcomer follows, so its examples are tests: the quick start's
//! `herald exec` commands run (with `--embedded`, on a fresh directory) and print what the
//! README shows, its syntax-error example prints the README's error, every `sql` block parses,
//! prints back to the same statements and runs in one session, the grammar block is the one
//! `engine/src/sql/mod.rs` documents, and the configuration example is a valid configuration. (The `rust` block is a doctest of `herald-tests`.)

use std::path::Path;
use std::process::Output;

use herald_engine::sql::{self, Session, Value};
use herald_engine::{Broker, Options};

mod common;
use common::{herald, stderr, stdout};

const README: &str = include_str!("../../README.md");
const SQL_MODULE: &str = include_str!("../../engine/src/sql/mod.rs");

/// A fenced block: its language tag, the `##` section it is in, its text.
#[derive(Debug)]
struct Block {
    lang: String,
    section: String,
    text: String,
}

fn blocks() -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut section = String::new();
    let mut open: Option<Block> = None;
    for line in README.lines() {
        if let Some(block) = &mut open {
            if line.trim_start() == "```" {
                blocks.push(open.take().expect("an open block"));
            } else {
                block.text.push_str(line);
                block.text.push('\n');
            }
        } else if let Some(lang) = line.strip_prefix("```") {
            open = Some(Block {
                lang: lang.trim().to_owned(),
                section: section.clone(),
                text: String::new(),
            });
        } else if let Some(heading) = line.strip_prefix("## ") {
            section = heading.to_owned();
        }
    }
    assert!(open.is_none(), "README.md ends inside a code block");
    blocks
}

fn in_section<'a>(blocks: &'a [Block], section: &str, lang: &str) -> Vec<&'a Block> {
    blocks
        .iter()
        .filter(|b| b.section == section && b.lang == lang)
        .collect()
}

/// The scripts of the `herald exec "…"` commands in `text`, in order (scripts hold no `"`).
fn exec_scripts(text: &str) -> Vec<String> {
    text.split("herald exec \"")
        .skip(1)
        .map(|rest| {
            let end = rest
                .find('"')
                .expect("a closing quote after herald exec \"");
            rest[..end].to_owned()
        })
        .collect()
}

/// `herald COMMAND --embedded --data-dir DIR [SCRIPT]`.
fn herald_embedded(dir: &Path, command: &str, script: Option<&str>) -> Output {
    let mut args = vec![command, "--embedded", "--data-dir"];
    args.push(dir.to_str().expect("a UTF-8 temp path"));
    args.extend(script);
    herald(&args, None)
}

#[test]
fn quick_start_commands_print_what_the_readme_shows() {
    let blocks = blocks();
    let shell = in_section(&blocks, "Quick start", "sh");
    let walk_through = shell
        .iter()
        .find(|b| b.text.contains("herald exec"))
        .expect("the quick start's herald exec commands");
    let scripts = exec_scripts(&walk_through.text);
    assert_eq!(scripts.len(), 3, "{scripts:?}");
    let shown = in_section(&blocks, "Quick start", "text");
    let receive_output = &shown[0].text;

    let dir = tempfile::tempdir().unwrap();
    for script in &scripts[..2] {
        let output = herald_embedded(dir.path(), "exec", Some(script));
        assert!(output.status.success(), "{script}: {}", stderr(&output));
    }
    // "Q holds 1 message; 2 endpoints CONVERSING".
    let status = herald_embedded(dir.path(), "status", None);
    assert!(status.status.success(), "{}", stderr(&status));
    let status = stdout(&status);
    let rows: Vec<Vec<&str>> = status
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert!(rows.contains(&vec!["Q", "ON", "1", "1", "0"]), "{status}");
    assert!(rows.contains(&vec!["CO", "CONVERSING", "2"]), "{status}");
    let received = herald_embedded(dir.path(), "exec", Some(&scripts[2]));
    assert!(received.status.success(), "{}", stderr(&received));
    assert_eq!(stdout(&received).trim_end(), receive_output.trim_end());
}

#[test]
fn the_syntax_error_example_prints_what_the_readme_shows() {
    let blocks = blocks();
    let example = in_section(&blocks, "Quick start", "text")
        .into_iter()
        .find(|b| b.text.starts_with("$ herald exec"))
        .expect("the syntax error example");
    let (command, shown) = example.text.split_once('\n').expect("a command line");
    let scripts = exec_scripts(command);
    let dir = tempfile::tempdir().unwrap();
    let output = herald_embedded(dir.path(), "exec", Some(&scripts[0]));
    assert_eq!(
        output.status.code(),
        Some(3),
        "exit code 3: the script does not parse"
    );
    assert_eq!(stderr(&output).trim_end(), shown.trim_end());
}

#[test]
fn sql_blocks_parse_print_back_and_run_in_one_session() {
    let blocks = blocks();
    let sql_blocks: Vec<&Block> = blocks.iter().filter(|b| b.lang == "sql").collect();
    assert!(sql_blocks.len() >= 2, "README has its sql examples");
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), Options::default()).unwrap();
    let mut session = Session::new(&broker);
    let mut results = Vec::new();
    for block in sql_blocks {
        let statements = sql::parse(&block.text)
            .unwrap_or_else(|e| panic!("README sql block does not parse: {e}\n{}", block.text));
        let printed = sql::render(&statements);
        assert_eq!(
            sql::parse(&printed).expect("the printed form parses"),
            statements,
            "printed back:\n{printed}"
        );
        let outcome = session.execute_script(&block.text);
        assert!(
            outcome.error.is_none(),
            "{:?} in\n{}",
            outcome.error,
            block.text
        );
        results.extend(outcome.results);
    }
    // The conversation example: the order went to the shop, whose receipt came back, followed
    // by the shop's end of the conversation.
    let receipt = results
        .iter()
        .filter(|r| r.statement == "RECEIVE")
        .find_map(|r| r.result.as_ref())
        .expect("the client's RECEIVE returned rows");
    assert_eq!(
        receipt.rows,
        vec![
            vec![
                Value::Text("//shop/Receipt".into()),
                Value::Text("<order id=\"1\"/>".into())
            ],
            vec![
                Value::Text("http://schemas.microsoft.com/SQL/ServiceBroker/EndDialog".into()),
                Value::Text(String::new())
            ]
        ]
    );
}

#[test]
fn the_readme_grammar_is_the_parser_modules() {
    let documented: String = SQL_MODULE
        .split("//! # Grammar\n//! ```text\n")
        .nth(1)
        .and_then(|rest| rest.split("//! ```\n").next())
        .expect("the grammar block of engine/src/sql/mod.rs")
        .lines()
        .map(|line| {
            let line = line.strip_prefix("//!").expect("a doc line");
            format!("{}\n", line.strip_prefix(' ').unwrap_or(line))
        })
        .collect();
    let blocks = blocks();
    let readme = in_section(&blocks, "Statements", "text");
    assert_eq!(readme[0].text, documented);
}

#[test]
fn the_configuration_example_is_accepted_as_it_is() {
    let blocks = blocks();
    let example = &in_section(&blocks, "Configuration", "toml")[0];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, &example.text).unwrap();
    let file = file.to_str().expect("a UTF-8 temp path");
    let output = herald(&["node", "--print-config", "--config", file], None);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = stdout(&output);
    for expected in ["//shop/Shipping", "quic://10.0.0.2:4022", "edf5dba6-1f09"] {
        assert!(printed.contains(expected), "{expected} in {printed}");
    }
}
