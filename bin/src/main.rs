//! `herald`: the node and the command-line client.
//!
//! - `herald node` runs a node (`node.rs`, configured by `config.rs`);
//! - `herald exec` runs a T-SQL script and prints its results (`exec.rs`, `output.rs`);
//! - `herald shell` runs statements as they are typed, in one session (`shell.rs`);
//! - `herald status` shows queues, conversations, the transmission queue and peers
//!   (`status.rs`);
//! - `herald bench` loads an embedded broker or a node and reports throughput and latency
//!   percentiles (`bench.rs`).
//!
//! The client commands run against a [`target::Target`]: a node, or with `--embedded` a broker
//! this process opens.
#![deny(unsafe_code)]

/// `print!` to stdout that ends the process quietly when stdout is gone (a closed pipe, as with
/// `herald exec … | head`), as Unix tools do, instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write_stdout(format_args!($($arg)*)) };
}

/// `println!` the same way (see `out!`).
macro_rules! outln {
    () => { $crate::output::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

mod bench;
mod config;
mod exec;
mod node;
mod output;
mod remote;
mod shell;
mod status;
mod target;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "herald", version, about = "Herald: a durable messaging engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: the broker in a data directory and its QUIC endpoint.
    Node {
        /// Data directory; created (with its certificate and broker id) on first start.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// UDP address of the QUIC endpoint.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// `sync` (the default: a commit returns once it is on disk), `none` or `batched-<ms>`.
        #[arg(long, value_name = "DURABILITY")]
        durability: Option<String>,
        /// A TOML configuration file (see `--print-config` for its keys); flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the effective configuration and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Run T-SQL statements and print their results.
    Exec(exec::ExecArgs),
    /// Type T-SQL statements into one session.
    Shell(shell::ShellArgs),
    /// Show queues with their depth, conversations by state, the transmission queue and peers.
    Status(status::StatusArgs),
    /// Load an embedded broker or a node and report msgs/s, MB/s and latency percentiles.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The node logs what it does; the client commands print results on stdout and only
    // warnings go to stderr, unless RUST_LOG says otherwise.
    let default_filter = match cli.command {
        Command::Node { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only for a person; a log file or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
    let code = match cli.command {
        Command::Node {
            data_dir,
            listen,
            durability,
            config,
            print_config,
        } => {
            let result = config::Config::load(config.as_ref()).and_then(|mut config| {
                if let Some(data_dir) = data_dir {
                    config.data_dir = data_dir;
                }
                if let Some(listen) = listen {
                    config.listen = listen;
                }
                if let Some(durability) = durability {
                    config::parse_durability(&durability)?;
                    config.durability = durability;
                }
                if print_config {
                    out!(
                        "{}",
                        toml::to_string(&config).map_err(|e| format!("printing: {e}"))?
                    );
                    return Ok(());
                }
                node::run(config)
            });
            match result {
                Ok(()) => 0,
                Err(message) => {
                    eprintln!("herald: {message}");
                    1
                }
            }
        }
        Command::Exec(args) => exec::run(&args),
        Command::Shell(args) => shell::run(&args),
        Command::Status(args) => status::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    ExitCode::from(code)
}
