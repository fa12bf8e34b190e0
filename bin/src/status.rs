//! `herald status`: what is queued and in flight, as tables — the queues with their depth, the
//! conversation endpoints by state, the transmission queue by status, and the node's peers.

use herald_engine::sql::{ResultSet, Value};
use herald_net::client::StatusReport;
use herald_net::identity::Fingerprint;

use crate::output::{self, TableOptions};
use crate::target::{self, ConnectArgs};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `herald status`; returns the exit code.
pub fn run(args: &StatusArgs) -> u8 {
    let status = target::with_target(&args.connect, |target| target.status());
    match status {
        Ok(Ok(status)) => {
            if args.json {
                outln!("{}", status_json(&status));
            } else {
                out!("{}", render_status(&status));
            }
            crate::exec::EXIT_OK
        }
        Ok(Err(message)) => {
            eprintln!("herald: status: {message}");
            crate::exec::EXIT_UNAVAILABLE
        }
        Err(error) => {
            eprint!("{}", output::render_error(&error, ""));
            crate::exec::exit_code(Some(&error))
        }
    }
}

/// The status as four titled tables.
pub fn render_status(status: &StatusReport) -> String {
    let options = TableOptions::default();
    let int = |n: u64| Value::Int(i64::try_from(n).unwrap_or(i64::MAX));
    let text = |s: &str| Value::Text(s.to_owned());
    let queues = ResultSet {
        columns: [
            "queue",
            "status",
            "messages",
            "groups_with_messages",
            "retained",
        ]
        .map(String::from)
        .to_vec(),
        rows: status
            .queues
            .iter()
            .map(|q| {
                vec![
                    text(&q.name),
                    text(if q.enabled { "ON" } else { "OFF" }),
                    int(q.messages),
                    int(q.groups_with_messages),
                    int(q.retained_messages),
                ]
            })
            .collect(),
    };
    let conversations = ResultSet {
        columns: ["state", "state_desc", "endpoints"]
            .map(String::from)
            .to_vec(),
        rows: status
            .endpoints_by_state
            .iter()
            .map(|(state, n)| vec![text(state), text(target::state_desc(state)), int(*n)])
            .collect(),
    };
    let transmission = ResultSet {
        columns: ["transmission_status", "messages"]
            .map(String::from)
            .to_vec(),
        rows: status
            .transmission_by_status
            .iter()
            .map(|(s, n)| {
                let s = if s.is_empty() { NOT_TRIED } else { s };
                vec![text(s), int(*n)]
            })
            .collect(),
    };
    let peers = ResultSet {
        columns: ["address", "connected", "unacknowledged", "fingerprint"]
            .map(String::from)
            .to_vec(),
        rows: status
            .peers
            .iter()
            .map(|p| {
                vec![
                    text(&p.address),
                    text(if p.connected { "yes" } else { "no" }),
                    int(p.unacknowledged_messages),
                    p.fingerprint
                        .map_or(Value::Null, |f| Value::Text(Fingerprint(f).to_string())),
                ]
            })
            .collect(),
    };
    let mut out = String::new();
    for (title, set) in [
        ("Queues", queues),
        ("Conversations by state", conversations),
        ("Transmission queue by status", transmission),
        ("Peers", peers),
    ] {
        out.push_str(title);
        out.push('\n');
        if set.rows.is_empty() {
            out.push_str("(none)\n\n");
        } else {
            out.push_str(&output::render_table(&set, options));
            out.push('\n');
        }
    }
    if status.truncated {
        out.push_str(
            "(some lists were longer than the node sends: only their first rows are shown)\n",
        );
    }
    out
}

/// How an empty transmission status (the message was not tried yet) is shown.
const NOT_TRIED: &str = "(not tried yet)";

fn status_json(status: &StatusReport) -> serde_json::Value {
    serde_json::json!({
        "queues": status.queues.iter().map(|q| serde_json::json!({
            "name": q.name,
            "enabled": q.enabled,
            "messages": q.messages,
            "groups_with_messages": q.groups_with_messages,
            "retained_messages": q.retained_messages,
        })).collect::<Vec<_>>(),
        "conversations": status.endpoints_by_state.iter().map(|(state, n)| serde_json::json!({
            "state": state, "state_desc": target::state_desc(state), "endpoints": n,
        })).collect::<Vec<_>>(),
        "transmission_queue": status.transmission_by_status.iter().map(|(s, n)| serde_json::json!({
            "transmission_status": s, "messages": n,
        })).collect::<Vec<_>>(),
        "peers": status.peers.iter().map(|p| serde_json::json!({
            "address": p.address,
            "fingerprint": p.fingerprint.map(|f| Fingerprint(f).to_string()),
            "connected": p.connected,
            "unacknowledged_messages": p.unacknowledged_messages,
        })).collect::<Vec<_>>(),
        "truncated": status.truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_net::client::QueueStatus;

    #[test]
    fn status_shows_each_queue_with_its_depth_and_empty_sections_as_none() {
        let status = StatusReport {
            queues: vec![QueueStatus {
                name: "OrderQueue".into(),
                enabled: true,
                retention: false,
                poison_message_handling: true,
                messages: 42,
                groups_with_messages: 2,
                retained_messages: 0,
            }],
            endpoints_by_state: vec![("CO".into(), 4)],
            ..StatusReport::default()
        };
        let text = render_status(&status);
        assert!(
            text.lines()
                .any(|l| l.starts_with("OrderQueue") && l.contains(" 42 ")),
            "{text}"
        );
        assert!(text.contains("CONVERSING"), "{text}");
        let after = text.split("Transmission queue by status\n").nth(1).unwrap();
        assert!(after.starts_with("(none)"), "{text}");
    }
}
