//! A [`Target`] on a node: a `herald_net::Client` session over the client protocol, connected
//! as the node's local admin (the client certificate the node wrote into its data directory's
//! `identity/`, trusting exactly the node's own certificate found there).

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::Path;

use herald_net::Client;
use herald_net::client::{RemoteErrorKind, StatusReport};

use crate::target::{ErrorKind, Outcome, ScriptError, Target};

/// A session on a node.
#[derive(Debug)]
pub struct Remote {
    client: Client,
}

impl Remote {
    /// Connects to the node at `node` (`host:port`) with the admin credentials in `data_dir`.
    pub fn connect(node: &str, data_dir: &Path) -> Result<Remote, ScriptError> {
        let addr = resolve(node).map_err(connection_error)?;
        if !data_dir.join(herald_net::node::IDENTITY_DIR).is_dir() {
            return Err(connection_error(format!(
                "{} has no identity directory: give the node's data directory with --data-dir \
                 (the node writes its local admin client certificate there on first start)",
                data_dir.display()
            )));
        }
        let client = Client::connect_local(data_dir, addr).map_err(|e| {
            connection_error(format!(
                "connecting to the node at {addr} (credentials from {}): {e}",
                data_dir.display()
            ))
        })?;
        Ok(Remote { client })
    }

    /// The client, for the bench's transaction operations.
    pub fn into_client(self) -> Client {
        self.client
    }
}

impl Target for Remote {
    fn execute_script(&mut self, script: &str) -> Outcome {
        let outcome = self.client.execute_script(script);
        Outcome {
            results: outcome.results,
            error: outcome.error.as_ref().map(script_error),
        }
    }

    fn status(&mut self) -> Result<StatusReport, String> {
        self.client
            .status()
            .map_err(|e| format!("asking the node for its status: {e}"))
    }

    fn transaction_count(&mut self) -> Result<u32, String> {
        self.client
            .transaction_count()
            .map_err(|e| format!("asking the node for the session's state: {e}"))
    }
}

/// `host:port` (or `quic://host:port`, as the node prints it) as a socket address (the first
/// the name resolves to).
pub fn resolve(node: &str) -> Result<SocketAddr, String> {
    let bare = node
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("quic://"))
        .map_or(node, |_| &node[7..]);
    bare.to_socket_addrs()
        .map_err(|e| format!("node address {node:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("node address {node:?} resolves to nothing"))
}

/// A client error as the commands see it: the node's statement and syntax errors keep their
/// position; anything else means the session is gone.
pub fn script_error(error: &herald_net::Error) -> ScriptError {
    match error {
        herald_net::Error::Remote(remote) => ScriptError {
            kind: if remote.kind == RemoteErrorKind::Syntax {
                ErrorKind::Syntax
            } else {
                ErrorKind::Statement
            },
            message: remote.to_string(),
            position: remote.position,
        },
        other => connection_error(other.to_string()),
    }
}

fn connection_error(message: String) -> ScriptError {
    ScriptError {
        kind: ErrorKind::Connection,
        message,
        position: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_address_may_carry_the_scheme_the_node_prints() {
        let expected: SocketAddr = "127.0.0.1:4022".parse().unwrap();
        assert_eq!(resolve("127.0.0.1:4022"), Ok(expected));
        assert_eq!(resolve("QUIC://127.0.0.1:4022"), Ok(expected));
        assert!(resolve("127.0.0.1").is_err());
    }
}
