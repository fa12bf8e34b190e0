//! The client commands as a user runs them, on an embedded broker (`--embedded`: the data
//! directory of a stopped node): `herald exec` (tables, JSON, syntax errors that run nothing,
//! runtime errors after which the earlier statements stay), `herald shell` fed on stdin (one
//! session across batches), `herald status`, `herald bench`, and the node's `[[routes]]`.

use std::path::Path;
use std::process::Output;

mod common;
use common::{bench_sent_and_received, herald, stderr, stdout};

fn exec(dir: &Path, script: &str, extra: &[&str]) -> Output {
    let dir = dir.to_str().expect("a UTF-8 temp path");
    let mut args = vec!["exec", "--embedded", "--data-dir", dir];
    args.extend_from_slice(extra);
    args.push(script);
    herald(&args, None)
}

/// The queue names in the catalog, through `herald exec --json`.
fn queues(dir: &Path) -> Vec<String> {
    let output = exec(dir, "SELECT name FROM sys.service_queues", &["--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON output");
    json["results"][0]["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|row| row[0].as_str().expect("a name").to_owned())
        .collect()
}

const DEFINE_AND_SEND: &str = "\
CREATE MESSAGE TYPE [//test/Request] VALIDATION = WELL_FORMED_XML;
CREATE CONTRACT [//test/Contract] ([//test/Request] SENT BY INITIATOR);
CREATE QUEUE dbo.TargetQueue;
CREATE QUEUE InitiatorQueue;
CREATE SERVICE [//test/Target] ON QUEUE TargetQueue ([//test/Contract]);
CREATE SERVICE [//test/Initiator] ON QUEUE InitiatorQueue;
DECLARE @h UNIQUEIDENTIFIER;
BEGIN DIALOG @h FROM SERVICE [//test/Initiator] TO SERVICE '//test/Target'
    ON CONTRACT [//test/Contract] WITH ENCRYPTION = OFF;
SEND ON CONVERSATION @h MESSAGE TYPE [//test/Request] (N'<order id=\"7\"/>');
";

#[test]
fn exec_prints_received_rows_as_a_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let output = exec(dir.path(), DEFINE_AND_SEND, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let output = exec(
        dir.path(),
        "RECEIVE TOP (1) CAST(message_body AS NVARCHAR(MAX)) AS body, message_type_name \
         FROM TargetQueue",
        &[],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["body", "message_type_name"]
    );
    assert_eq!(
        lines[1],
        format!("{} {}", "-".repeat(15), "-".repeat(17)),
        "{text}"
    );
    assert_eq!(lines[2], "<order id=\"7\"/> //test/Request");
    assert!(text.contains("(1 row affected)"), "{text}");
    // The message was consumed: the next RECEIVE is empty, and JSON says so.
    let output = exec(dir.path(), "RECEIVE * FROM TargetQueue", &["--json"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["results"][0]["statement"], "RECEIVE");
    assert_eq!(json["results"][0]["rows_affected"], 0);
    assert_eq!(json["results"][0]["rows"], serde_json::json!([]));
    assert_eq!(json["results"][0]["columns"][0]["name"], "status");
}

#[test]
fn a_script_that_does_not_parse_runs_nothing_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let output = exec(
        dir.path(),
        "CREATE QUEUE First;\nCREATE QUEUE Second;\nCREATE QUEU Third;",
        &[],
    );
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let error = stderr(&output);
    assert!(error.contains("line 3, column 8"), "{error}");
    assert!(error.contains("found 'QUEU'"), "{error}");
    assert!(error.contains("  3 | CREATE QUEU Third;"), "{error}");
    assert!(error.contains("nothing ran"), "{error}");
    assert!(queues(dir.path()).is_empty(), "no queue was created");

    // The same from a file and from stdin.
    let script = dir.path().join("bad.sql");
    std::fs::write(
        &script,
        "CREATE QUEUE First;\nBEGIN DIALOG @h FROM SERVIC s;",
    )
    .unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let from_file = herald(
        &[
            "exec",
            "--embedded",
            "--data-dir",
            data_dir,
            "-f",
            script.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(from_file.status.code(), Some(3));
    assert!(
        stderr(&from_file).contains("line 2, column 22"),
        "{}",
        stderr(&from_file)
    );
    let from_stdin = herald(
        &["exec", "--embedded", "--data-dir", data_dir, "-f", "-"],
        Some("CREATE QUEUE First;\nCREATE QUEUE Second WITH STATUS = MAYBE;"),
    );
    assert_eq!(from_stdin.status.code(), Some(3));
    assert!(
        stderr(&from_stdin).contains("line 2, column"),
        "{}",
        stderr(&from_stdin)
    );
    assert!(queues(dir.path()).is_empty(), "no queue was created");

    // A script longer than a script may be is refused before anything runs.
    let huge = dir.path().join("huge.sql");
    let mut text = "CREATE QUEUE First;\n".to_owned();
    text.push_str(&" ".repeat(herald_engine::sql::SCRIPT_BYTES_MAX));
    std::fs::write(&huge, text).unwrap();
    let output = herald(
        &[
            "exec",
            "--embedded",
            "--data-dir",
            data_dir,
            "-f",
            huge.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("longer than the maximum"),
        "{}",
        stderr(&output)
    );
    assert!(queues(dir.path()).is_empty(), "no queue was created");
}

#[test]
fn a_failing_statement_stops_the_script_after_the_earlier_ones_ran() {
    let dir = tempfile::tempdir().unwrap();
    let output = exec(
        dir.path(),
        "CREATE QUEUE Before;\nSELECT 1 AS one;\nCREATE SERVICE S ON QUEUE Missing;\nCREATE QUEUE After;",
        &[],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("(1 row affected)"),
        "{}",
        stdout(&output)
    );
    let error = stderr(&output);
    assert!(error.contains("line 3, column 1"), "{error}");
    assert!(error.contains("\"Missing\""), "{error}");
    assert_eq!(queues(dir.path()), ["Before"]);
    // A missing file is exit code 4.
    let data_dir = dir.path().to_str().unwrap();
    let missing = herald(
        &[
            "exec",
            "--embedded",
            "--data-dir",
            data_dir,
            "-f",
            "/nonexistent/x.sql",
        ],
        None,
    );
    assert_eq!(missing.status.code(), Some(4));
}

#[test]
fn the_shell_keeps_one_session_across_statements_fed_on_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    // Multi-line statements; a variable declared in one batch is used in later ones; an open
    // transaction spans batches; a failing statement does not end the shell.
    let input = "\
CREATE QUEUE Q;
CREATE SERVICE S
    ON QUEUE Q ([DEFAULT]);
DECLARE @h UNIQUEIDENTIFIER;
BEGIN DIALOG @h
    FROM SERVICE S
    TO SERVICE 'S';
BEGIN TRANSACTION;
SEND ON CONVERSATION @h
    (N'first body');
IF @h IS NOT NULL
BEGIN
    SEND ON CONVERSATION @h (N'second body');
    SELECT @@TRANCOUNT AS open_transactions;
END;
CREATE SERVICE Broken ON QUEUE Missing;
COMMIT
GO
RECEIVE CAST(message_body AS NVARCHAR(MAX)) AS body FROM Q;
";
    let output = herald(
        &["shell", "--embedded", "--data-dir", data_dir],
        Some(input),
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "a statement failed: {}",
        stderr(&output)
    );
    let text = stdout(&output);
    assert!(text.contains("open_transactions"), "{text}");
    let body_lines: Vec<&str> = text.lines().filter(|l| l.ends_with(" body")).collect();
    assert_eq!(body_lines, ["first body", "second body"], "{text}");
    assert!(
        stderr(&output).contains("\"Missing\""),
        "{}",
        stderr(&output)
    );
    assert!(
        !text.contains("herald> "),
        "no prompt when stdin is not a terminal"
    );
}

#[test]
fn a_shell_that_ends_with_a_transaction_open_says_it_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let output = exec(dir.path(), DEFINE_AND_SEND, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let data_dir = dir.path().to_str().unwrap();
    let depth = || {
        let output = exec(
            dir.path(),
            "SELECT messages FROM sys.service_queues WHERE name = N'TargetQueue'",
            &["--json"],
        );
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        json["results"][0]["rows"][0][0].clone()
    };
    // The shell's stderr, once it succeeded.
    let shell = |input: &str| {
        let output = herald(
            &["shell", "--embedded", "--data-dir", data_dir],
            Some(input),
        );
        assert!(output.status.success(), "{}", stderr(&output));
        stderr(&output)
    };
    assert_eq!(depth(), 1);
    // A committed transaction: nothing to say.
    let said = shell("BEGIN TRANSACTION;\nRECEIVE * FROM TargetQueue;\nCOMMIT;\n");
    assert!(!said.contains("rolled back"), "{said}");
    assert_eq!(depth(), 0);
    // Another dialog and message, as DEFINE_AND_SEND's end sends them.
    let send_again = &DEFINE_AND_SEND[DEFINE_AND_SEND.find("DECLARE").unwrap()..];
    let output = exec(dir.path(), send_again, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(depth(), 1);
    // Left open: the shell says so, and the RECEIVE is undone.
    let said = shell("BEGIN TRANSACTION;\nBEGIN TRANSACTION;\nRECEIVE * FROM TargetQueue;\n");
    assert!(
        said.contains("open transaction (@@TRANCOUNT 2) is rolled back"),
        "{said}"
    );
    assert_eq!(depth(), 1);
}

#[test]
fn status_shows_each_queue_with_its_depth() {
    let dir = tempfile::tempdir().unwrap();
    let output = exec(dir.path(), DEFINE_AND_SEND, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let data_dir = dir.path().to_str().unwrap();
    let output = herald(&["status", "--embedded", "--data-dir", data_dir], None);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let row = |name: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}: {text}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert_eq!(row("TargetQueue"), ["TargetQueue", "ON", "1", "1", "0"]);
    assert_eq!(
        row("InitiatorQueue"),
        ["InitiatorQueue", "ON", "0", "0", "0"]
    );
    assert_eq!(row("CO"), ["CO", "CONVERSING", "2"]);
    let output = herald(
        &["status", "--json", "--embedded", "--data-dir", data_dir],
        None,
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let target = json["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "TargetQueue")
        .unwrap_or_else(|| panic!("{json}"));
    assert_eq!(target["messages"], 1);
    assert_eq!(json["conversations"][0]["state_desc"], "CONVERSING");
}

#[test]
fn bench_on_an_embedded_broker_prints_its_table_and_receives_what_it_sent() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("bench");
    let output = herald(
        &[
            "bench",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--durability",
            "none",
            "--duration",
            "1",
            "--producers",
            "2",
            "--consumers",
            "2",
            "--dialogs",
            "4",
            "--message-bytes",
            "64",
        ],
        None,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    let (sent, received) = bench_sent_and_received(&text);
    assert!(sent > 0, "{text}");
    assert_eq!(received, sent, "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["latency_us", "p50", "p90", "p99", "p99.9", "max"]),
        "{text}"
    );
    assert!(text.contains("service times"), "{text}");
    // The run dropped what it created.
    let output = exec(&data_dir, "SELECT name FROM sys.services", &["--json"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        json["results"][0]["rows"],
        serde_json::json!([]),
        "{}",
        stdout(&output)
    );
}

#[test]
fn bench_with_json_prints_one_object_of_figures() {
    let output = herald(
        &[
            "bench",
            "--durability",
            "none",
            "--duration",
            "0.5",
            "--dialogs",
            "2",
            "--rate",
            "200",
            "--json",
        ],
        None,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", stdout(&output)));
    let sent = json["sent"].as_u64().expect("sent");
    assert!(sent > 0, "{json}");
    assert_eq!(json["received"].as_u64(), Some(sent), "{json}");
    assert_eq!(json["not_received"].as_u64(), Some(0), "{json}");
    assert_eq!(json["dialogs"].as_u64(), Some(2), "{json}");
    assert_eq!(json["rate_msgs_per_s"].as_f64(), Some(200.0), "{json}");
    assert_eq!(json["latency_from"], "intended", "{json}");
    assert!(json["msgs_per_s"].as_f64().expect("msgs/s") > 0.0, "{json}");
    let latency = &json["latency_us"];
    let (p50, p99, max) = (
        latency["p50"].as_u64().expect("p50"),
        latency["p99"].as_u64().expect("p99"),
        latency["max"].as_u64().expect("max"),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{json}");
    assert!(
        json["target"]
            .as_str()
            .expect("target")
            .contains("embedded"),
        "{json}"
    );
}

#[test]
fn bench_with_a_rate_says_it_corrects_for_coordinated_omission() {
    let output = herald(
        &[
            "bench",
            "--durability",
            "none",
            "--duration",
            "1",
            "--rate",
            "100",
        ],
        None,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("intended send time"), "{text}");
    assert!(text.contains("target rate 100 msgs/s"), "{text}");
}

#[test]
fn configured_routes_are_printed_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        "[[routes]]\nname = \"ToShipping\"\nservice_name = \"//shop/Shipping\"\n\
         address = \"quic://127.0.0.1:4023\"\nlifetime = 3600\n",
    )
    .unwrap();
    let output = herald(
        &[
            "node",
            "--print-config",
            "--config",
            config.to_str().unwrap(),
        ],
        None,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = stdout(&output);
    for expected in [
        "[[routes]]",
        "name = \"ToShipping\"",
        "service_name = \"//shop/Shipping\"",
        "address = \"quic://127.0.0.1:4023\"",
        "lifetime = 3600",
    ] {
        assert!(printed.contains(expected), "{expected} in {printed}");
    }
    std::fs::write(
        &config,
        "[[routes]]\nname = \"Bad\"\naddress = \"http://127.0.0.1:4023\"\n",
    )
    .unwrap();
    let output = herald(
        &[
            "node",
            "--print-config",
            "--config",
            config.to_str().unwrap(),
        ],
        None,
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("route \"Bad\""),
        "{}",
        stderr(&output)
    );
}

/// `--embedded` on a directory that is not there (a mistyped path) is refused and makes
/// nothing; an existing directory may get a new broker.
#[test]
fn embedded_on_a_missing_directory_is_refused_and_makes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("herald-dat");
    let output = exec(&missing, "SELECT 1;", &[]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("is not a directory"),
        "{}",
        stderr(&output)
    );
    assert!(!missing.exists(), "nothing was made");
}

/// A `--duration` too long for a `Duration` is refused, not a panic.
#[test]
fn bench_refuses_a_duration_out_of_range() {
    let output = herald(&["bench", "--duration", "1e20"], None);
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(error.contains("--duration"), "{error}");
    assert!(!error.contains("panicked"), "{error}");
}

/// A reader that stops early (`herald exec … | head`, `herald shell < script | head`): the
/// command ends quietly, exit status 0, instead of panicking on the closed pipe.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    for command in [&["exec", "-f", "-"][..], &["shell"][..]] {
        into_a_closed_pipe(dir.path(), command);
    }
}

fn into_a_closed_pipe(data_dir: &Path, command: &[&str]) {
    use std::io::Read as _;
    // Far more output than a pipe holds.
    let script = "SELECT N'a fairly long line of output, again and again';\n".repeat(5000);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg(command[0])
        .args(["--embedded", "--data-dir"])
        .arg(data_dir)
        .args(&command[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Fed from a thread: the shell prints as it reads, and would block on a full stdout.
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        use std::io::Write as _;
        // The shell may stop reading once its output is closed.
        let _ = stdin.write_all(script.as_bytes());
    });
    let mut first = [0u8; 10];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The read end is closed now.
    let output = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(!error.contains("panicked"), "{command:?}: {error}");
    assert!(
        output.status.success(),
        "{command:?} {:?}: {error}",
        output.status
    );
}
