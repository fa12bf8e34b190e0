//! The client commands against real `herald node` processes, as a user runs them: `herald
//! exec` defines a service, begins a dialog, sends, receives and ends conversations through
//! the client protocol; the state survives a restart of the node; `herald shell` keeps one
//! session; `herald status` shows a queue's depth; `herald bench` loads a node; and two nodes
//! trusting each other through `[[peers]]`, with `[[routes]]` between them, deliver a message
//! sent with `herald exec` on one and received with `herald exec` on the other.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::{bench_sent_and_received, herald, stderr, stdout};

/// How long a node may take to say it is up (a loaded 2-core CI machine builds in parallel):
/// a hang guard, not a timing assumption.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `herald node`, stopped with SIGTERM when dropped.
struct RunningNode {
    child: Option<Child>,
    addr: String,
    fingerprint: String,
    data_dir: PathBuf,
}

impl RunningNode {
    /// Starts `herald node ARGS` and waits for its ready line, noting its address and
    /// fingerprint.
    fn start(data_dir: &Path, args: &[&str]) -> RunningNode {
        RunningNode::try_start(data_dir, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`RunningNode::start`], but a node that exits before it is ready (its port was taken,
    /// say) is an `Err`; one that neither gets ready nor exits still fails the test.
    fn try_start(data_dir: &Path, args: &[&str]) -> Result<RunningNode, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("node")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning herald node");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        // Logs are drained so that the node never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[node] {line}");
            }
        });
        let (lines_tx, lines_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut addr, mut fingerprint) = (None, None);
        loop {
            match lines_rx.recv_timeout(NODE_START_TIMEOUT) {
                Ok(line) => {
                    if let Some(rest) = line.trim().strip_prefix("listening on quic://") {
                        let mut words = rest.split_whitespace();
                        addr = words.next().map(String::from);
                        fingerprint = rest
                            .split("fingerprint ")
                            .nth(1)
                            .and_then(|f| f.split(')').next())
                            .map(String::from);
                    }
                    if line.contains("Ctrl-C to stop") {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("waiting for herald node");
                    return Err(format!("herald node exited before it was ready: {status}"));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("herald node did not say it was ready within {NODE_START_TIMEOUT:?}");
                }
            }
        }
        // The rest of stdout is drained too.
        std::thread::spawn(move || while lines_rx.recv().is_ok() {});
        Ok(RunningNode {
            child: Some(child),
            addr: addr.expect("the node printed its address"),
            fingerprint: fingerprint.expect("the node printed its fingerprint"),
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Starts a node on `data_dir` listening on `listen`.
    fn on(data_dir: &Path, listen: &str) -> RunningNode {
        RunningNode::start(
            data_dir,
            &["--listen", listen, "--data-dir", data_dir.to_str().unwrap()],
        )
    }

    /// SIGTERM, and waits for a clean exit.
    fn stop(mut self) {
        let child = self.child.take().expect("running");
        stop_child(child, true);
    }

    /// `herald CMD --node ADDR --data-dir DIR ARGS…`, with `stdin` fed if given.
    fn run(&self, command: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut all = vec![
            command,
            "--node",
            &self.addr,
            "--data-dir",
            self.data_dir.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        herald(&all, stdin)
    }

    fn exec(&self, script: &str) -> String {
        let output = self.run("exec", &[script], None);
        assert!(
            output.status.success(),
            "herald exec failed ({:?}): {}\n{}",
            output.status,
            stderr(&output),
            stdout(&output)
        );
        stdout(&output)
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, false);
        }
    }
}

fn stop_child(mut child: Child, check: bool) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("waiting for herald node");
    if check {
        assert!(status.success(), "herald node exited with {status:?}");
    }
}

/// `N` different UDP ports free now (bound together and released: another process may take
/// one before it is used, so a node started on one may fail to bind it).
fn free_udp_ports<const N: usize>() -> [u16; N] {
    let sockets: Vec<std::net::UdpSocket> = (0..N)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("binding a UDP port"))
        .collect();
    std::array::from_fn(|i| sockets[i].local_addr().expect("a bound address").port())
}

/// The message types and contract both sides need.
const TYPES: &str = "\
CREATE MESSAGE TYPE [//test/Request] VALIDATION = WELL_FORMED_XML;
CREATE MESSAGE TYPE [//test/Reply] VALIDATION = NONE;
CREATE CONTRACT [//test/Contract]
    ([//test/Request] SENT BY INITIATOR, [//test/Reply] SENT BY TARGET);
";
const TARGET_SIDE: &str = "\
CREATE QUEUE TargetQueue;
CREATE SERVICE [//test/Target] ON QUEUE TargetQueue ([//test/Contract]);
";
const INITIATOR_SIDE: &str = "\
CREATE QUEUE InitiatorQueue;
CREATE SERVICE [//test/Initiator] ON QUEUE InitiatorQueue;
";

/// Both sides on one node.
fn define() -> String {
    format!("{TYPES}{TARGET_SIDE}{INITIATOR_SIDE}")
}

const SEND: &str = "\
DECLARE @h UNIQUEIDENTIFIER;
BEGIN DIALOG @h FROM SERVICE [//test/Initiator] TO SERVICE '//test/Target'
    ON CONTRACT [//test/Contract];
SEND ON CONVERSATION @h MESSAGE TYPE [//test/Request] (N'<order id=\"1\"/>');
SEND ON CONVERSATION @h MESSAGE TYPE [//test/Request] (N'<order id=\"2\"/>');
";

#[test]
fn exec_runs_a_dialog_on_a_node_and_the_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("node");
    let node = RunningNode::on(&data_dir, "127.0.0.1:0");
    node.exec(&define());
    node.exec(SEND);
    // Take one message, reply, and end the target's side.
    let received = node.exec(
        "DECLARE @h UNIQUEIDENTIFIER;
         BEGIN TRANSACTION;
         WAITFOR (RECEIVE TOP (1) @h = conversation_handle FROM TargetQueue), TIMEOUT 60000;
         ROLLBACK;
         BEGIN TRANSACTION;
         RECEIVE TOP (1) conversation_handle, CAST(message_body AS NVARCHAR(MAX)) AS body
             FROM TargetQueue WHERE conversation_handle = @h;
         SEND ON CONVERSATION @h MESSAGE TYPE [//test/Reply] (N'thanks');
         COMMIT;",
    );
    assert!(received.contains("<order id=\"1\"/>"), "{received}");
    assert!(received.contains("(1 row affected)"), "{received}");

    // The status shows the queue's depth: one order left.
    let status = node.run("status", &[], None);
    assert!(status.status.success(), "{}", stderr(&status));
    let text = stdout(&status);
    let target_row: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("TargetQueue"))
        .unwrap_or_else(|| panic!("{text}"))
        .split_whitespace()
        .collect();
    assert_eq!(target_row[..3], ["TargetQueue", "ON", "1"], "{text}");

    node.stop();
    let node = RunningNode::on(&data_dir, "127.0.0.1:0");
    let queues =
        node.exec("SELECT name, messages FROM sys.service_queues WHERE name = N'TargetQueue'");
    assert!(
        queues
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["TargetQueue", "1"]),
        "{queues}"
    );
    let rest = node.exec(
        "RECEIVE CAST(message_body AS NVARCHAR(MAX)) AS body FROM TargetQueue;
         RECEIVE CAST(message_body AS NVARCHAR(MAX)) AS body, conversation_handle
             FROM InitiatorQueue;",
    );
    assert!(rest.contains("<order id=\"2\"/>"), "{rest}");
    assert!(rest.contains("thanks"), "{rest}");
    // End both sides: the initiator's END and the target's, each on its own handle.
    let ended = node.exec(
        "DECLARE @t UNIQUEIDENTIFIER, @i UNIQUEIDENTIFIER;
         SELECT @t = conversation_handle FROM sys.conversation_endpoints
             WHERE service_name = N'//test/Target';
         SELECT @i = conversation_handle FROM sys.conversation_endpoints
             WHERE service_name = N'//test/Initiator';
         END CONVERSATION @t;
         WAITFOR (RECEIVE message_type_name FROM InitiatorQueue), TIMEOUT 60000;
         END CONVERSATION @i;
         SELECT state_desc FROM sys.conversation_endpoints;",
    );
    assert!(
        ended.contains("http://schemas.microsoft.com/SQL/ServiceBroker/EndDialog"),
        "{ended}"
    );
    node.stop();
}

#[test]
fn exec_on_a_node_reports_a_syntax_error_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("node");
    let node = RunningNode::on(&data_dir, "127.0.0.1:0");
    let output = node.run(
        "exec",
        &["CREATE QUEUE First;\nCREATE QUEUE Second;\nCREATE QUEU Third;"],
        None,
    );
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("line 3, column 8"),
        "{}",
        stderr(&output)
    );
    let queues = node.exec("SELECT name FROM sys.service_queues");
    assert!(!queues.contains("First"), "{queues}");

    // An unreachable node is exit code 4.
    let [port] = free_udp_ports();
    let output = herald(
        &[
            "exec",
            "--node",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data_dir.to_str().unwrap(),
            "SELECT 1",
        ],
        None,
    );
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&format!("nothing listens at 127.0.0.1:{port}")),
        "{}",
        stderr(&output)
    );
    node.stop();
}

#[test]
fn the_shell_and_bench_work_against_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("node");
    let node = RunningNode::on(&data_dir, "127.0.0.1:0");
    let input = format!(
        "{}{SEND}GO\n\
         WAITFOR (\n  RECEIVE CAST(message_body AS NVARCHAR(MAX)) AS body\n  FROM TargetQueue\n), TIMEOUT 60000;\n\
         SEND ON CONVERSATION @h MESSAGE TYPE [//test/Request] (N'<order id=\"3\"/>');\n",
        define()
    );
    let output = node.run("shell", &[], Some(&input));
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("<order id=\"1\"/>"), "{text}");
    assert!(text.contains("<order id=\"2\"/>"), "{text}");
    // @h from the first batch was still there for the last SEND.
    let depth = node.exec("SELECT messages FROM sys.service_queues WHERE name = N'TargetQueue'");
    assert!(depth.lines().any(|l| l.trim() == "1"), "{depth}");
    // The node tells the shell its session's transaction is still open at the end.
    let output = node.run("shell", &[], Some("BEGIN TRANSACTION;\n"));
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("open transaction (@@TRANCOUNT 1) is rolled back"),
        "{}",
        stderr(&output)
    );

    let output = node.run(
        "bench",
        &[
            "--duration",
            "1",
            "--producers",
            "2",
            "--consumers",
            "2",
            "--dialogs",
            "4",
        ],
        None,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let (sent, received) = bench_sent_and_received(&text);
    assert!(sent > 0 && received == sent, "{text}");
    assert!(text.contains("p99.9"), "{text}");
    node.stop();
}

#[test]
fn two_nodes_with_configured_peers_and_routes_deliver_a_message_sent_with_exec() {
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    // First starts create each node's identity and tell its fingerprint.
    let a = RunningNode::on(&a_dir, "127.0.0.1:0");
    let b = RunningNode::on(&b_dir, "127.0.0.1:0");
    let (a_fingerprint, b_fingerprint) = (a.fingerprint.clone(), b.fingerprint.clone());
    a.stop();
    b.stop();
    let config = |dir: &Path, port: u16, peer: &str, route: &str, service: &str, far: u16| {
        let path = dir.with_extension("toml");
        std::fs::write(
            &path,
            format!(
                "data_dir = {dir:?}\nlisten = \"127.0.0.1:{port}\"\n\
                 [[peers]]\nfingerprint = \"{peer}\"\n\
                 [[routes]]\nname = \"{route}\"\nservice_name = \"{service}\"\n\
                 address = \"quic://127.0.0.1:{far}\"\n"
            ),
        )
        .unwrap();
        path
    };
    // Each node's configuration names the other's port, so both are chosen before either
    // starts; if another process takes one meanwhile, the node fails to bind it and the pair
    // starts again on new ports.
    let mut attempts = 0;
    let (a, b, b_port) = loop {
        attempts += 1;
        let [a_port, b_port] = free_udp_ports();
        let a_config = config(
            &a_dir,
            a_port,
            &b_fingerprint,
            "ToTarget",
            "//test/Target",
            b_port,
        );
        let b_config = config(
            &b_dir,
            b_port,
            &a_fingerprint,
            "ToInitiator",
            "//test/Initiator",
            a_port,
        );
        let printed = herald(
            &[
                "node",
                "--print-config",
                "--config",
                a_config.to_str().unwrap(),
            ],
            None,
        );
        assert!(
            stdout(&printed).contains("name = \"ToTarget\""),
            "{}",
            stdout(&printed)
        );
        let started = RunningNode::try_start(&a_dir, &["--config", a_config.to_str().unwrap()])
            .and_then(|a| {
                RunningNode::try_start(&b_dir, &["--config", b_config.to_str().unwrap()])
                    .map(|b| (a, b))
            });
        match started {
            Ok((a, b)) => break (a, b, b_port),
            Err(e) if attempts < 5 => {
                eprintln!("starting the pair on ports {a_port}, {b_port}: {e}; again")
            }
            Err(e) => panic!("starting the pair, {attempts} times: {e}"),
        }
    };
    let routes = a.exec("SELECT name, address FROM sys.routes");
    assert!(routes.contains("ToTarget"), "{routes}");

    b.exec(&format!("{TYPES}{TARGET_SIDE}"));
    a.exec(&format!("{TYPES}{INITIATOR_SIDE}"));
    a.exec(SEND);
    let received = b.exec(
        "WAITFOR (RECEIVE CAST(message_body AS NVARCHAR(MAX)) AS body, conversation_handle
             FROM TargetQueue), TIMEOUT 120000;",
    );
    assert!(received.contains("<order id=\"1\"/>"), "{received}");
    assert!(received.contains("<order id=\"2\"/>"), "{received}");
    // The reply goes back by B's configured route.
    b.exec(
        "DECLARE @h UNIQUEIDENTIFIER;
         SELECT @h = conversation_handle FROM sys.conversation_endpoints
             WHERE service_name = N'//test/Target';
         SEND ON CONVERSATION @h MESSAGE TYPE [//test/Reply] (N'shipped');
         END CONVERSATION @h;",
    );
    let replied = a.exec(
        "WAITFOR (RECEIVE CAST(message_body AS NVARCHAR(MAX)) AS body, message_type_name
             FROM InitiatorQueue), TIMEOUT 120000;",
    );
    assert!(replied.contains("shipped"), "{replied}");
    // A's status lists B, by the address its route names.
    let status = stdout(&a.run("status", &[], None));
    let peers = status
        .split("Peers\n")
        .nth(1)
        .unwrap_or_else(|| panic!("{status}"));
    // Once, though B has two sessions here (the one A dialed, the one B dialed to reply).
    let b_address = format!("127.0.0.1:{b_port}");
    assert_eq!(peers.matches(&b_address).count(), 1, "{status}");
    a.stop();
    b.stop();
}

/// `herald exec` closes its session before it exits, so the node ends it at once: a
/// transaction the script left open is rolled back and its group lock freed for the next
/// command (dropped unclosed, the session lived on until the node's idle timeout, locks and
/// all, and a loop of execs ran the node out of client sessions).
#[test]
fn an_exec_leaving_a_transaction_open_frees_its_locks_as_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("node");
    let node = RunningNode::on(&data_dir, "127.0.0.1:0");
    node.exec(&define());
    node.exec(SEND);
    let taken =
        node.exec("BEGIN TRANSACTION; RECEIVE TOP (1) conversation_handle FROM TargetQueue;");
    assert!(taken.contains("(1 row affected)"), "{taken}");
    // At once, without waiting: both messages are back, their group unlocked.
    let again = node.exec("RECEIVE CAST(message_body AS NVARCHAR(MAX)) AS body FROM TargetQueue;");
    assert!(
        again.contains("<order id=\"1\"/>") && again.contains("<order id=\"2\"/>"),
        "{again}"
    );
    // More execs in a row than the node has client sessions.
    for _ in 0..herald_net::client::CLIENT_SESSIONS_MAX + 6 {
        node.exec("SELECT 1;");
    }
    node.stop();
}

/// A node told to stop while a client runs a long script stops at the script's next statement
/// (it waited for the last one): the statements that ran stay, the rest never run, and the
/// node exits cleanly.
#[test]
fn a_node_stopping_ends_a_running_script_between_statements() {
    const SENDS: usize = 60_000;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("node");
    let node = RunningNode::on(&data_dir, "127.0.0.1:0");
    node.exec(&define());
    let mut script = String::from(
        "DECLARE @h UNIQUEIDENTIFIER;
         BEGIN DIALOG @h FROM SERVICE [//test/Initiator] TO SERVICE '//test/Target'
             ON CONTRACT [//test/Contract];\n",
    );
    for n in 0..SENDS {
        script.push_str(&format!(
            "SEND ON CONVERSATION @h MESSAGE TYPE [//test/Request] (N'<n>{n}</n>');\n"
        ));
    }
    let long = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["exec", "--node", &node.addr, "--data-dir"])
        .arg(&data_dir)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut long = long;
    {
        use std::io::Write as _;
        let mut stdin = long.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).unwrap();
    }
    // Wait until the script is under way.
    let queued = |node: &RunningNode| -> usize {
        let out = node.exec("SELECT messages FROM sys.service_queues WHERE name = N'TargetQueue'");
        out.lines()
            .filter_map(|l| l.trim().parse::<usize>().ok())
            .next()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while queued(&node) == 0 {
        assert!(Instant::now() < deadline, "the script never began");
        std::thread::sleep(Duration::from_millis(20));
    }
    node.stop();
    let ended = long.wait_with_output().unwrap();
    assert!(
        !ended.status.success(),
        "the script was cut short: {}",
        stderr(&ended)
    );
    let node = RunningNode::on(&data_dir, "127.0.0.1:0");
    let kept = queued(&node);
    assert!(kept > 0 && kept < SENDS, "{kept} of {SENDS} SENDs ran");
    node.stop();
}
