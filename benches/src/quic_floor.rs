//! The floor of the network benchmarks: raw bytes on one quinn stream between two endpoints in
//! this process, with the same TLS (mutual, pinned, ring) and transport configuration as Herald's
//! nodes, so a figure's ratio to it is what Herald's protocol and engine cost on top of QUIC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_net::identity::{NodeIdentity, Trust};
use herald_net::quic::{bind_udp_socket, client_config, server_config};

use crate::floors::pattern;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Two quinn endpoints connected on loopback.
#[derive(Debug)]
pub struct RawQuicStream {
    client: quinn::Endpoint,
    server: quinn::Endpoint,
    connection: quinn::Connection,
    accepted: tokio::sync::Mutex<quinn::Connection>,
}

impl RawQuicStream {
    pub async fn connect() -> Result<RawQuicStream> {
        let (client_identity, server_identity) =
            (NodeIdentity::generate()?, NodeIdentity::generate()?);
        // Sockets bound as the nodes bind theirs (their buffer sizes).
        let endpoint = |server: Option<quinn::ServerConfig>| {
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                server,
                bind_udp_socket(loopback())?,
                Arc::new(quinn::TokioRuntime),
            )
        };
        let server = endpoint(Some(server_config(
            &server_identity,
            &Trust::pinned([client_identity.fingerprint()]),
        )?))?;
        let mut client = endpoint(None)?;
        client.set_default_client_config(client_config(
            &client_identity,
            &Trust::pinned([server_identity.fingerprint()]),
        )?);
        let server_addr = server.local_addr()?;
        let (connection, accepted) = tokio::join!(
            async {
                client
                    .connect(server_addr, herald_net::quic::SERVER_NAME)?
                    .await
                    .map_err(Box::<dyn std::error::Error>::from)
            },
            async {
                let incoming = server.accept().await.ok_or("server endpoint closed")?;
                incoming.await.map_err(Box::<dyn std::error::Error>::from)
            }
        );
        Ok(RawQuicStream {
            client,
            server,
            connection: connection?,
            accepted: tokio::sync::Mutex::new(accepted?),
        })
    }

    /// Writes `volume` bytes on a new stream in writes of `write_bytes`; the receiver reads them
    /// all and answers one byte. Fails after `timeout`.
    pub async fn transfer(
        &self,
        volume: u64,
        write_bytes: usize,
        timeout: Duration,
    ) -> Result<Duration> {
        let chunk = pattern(write_bytes);
        let accepted = self.accepted.lock().await;
        let start = Instant::now();
        let receiver = async {
            let (mut send, mut recv) = accepted.accept_bi().await?;
            let mut received = 0u64;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                received += chunk.bytes.len() as u64;
            }
            send.write_all(&[1]).await?;
            send.finish()?;
            Ok::<u64, Box<dyn std::error::Error>>(received)
        };
        let sender = async {
            let (mut send, mut recv) = self.connection.open_bi().await?;
            let mut left = volume;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                send.write_all(&chunk[..n]).await?;
                left -= n as u64;
            }
            send.finish()?;
            let answer = recv.read_to_end(1).await?;
            Ok::<usize, Box<dyn std::error::Error>>(answer.len())
        };
        let (received, answered) =
            tokio::time::timeout(timeout, async { tokio::join!(receiver, sender) }).await?;
        if received? != volume || answered? != 1 {
            return Err("the floor's stream lost bytes".into());
        }
        Ok(start.elapsed())
    }

    pub async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        self.client.wait_idle().await;
        self.server.close(0u32.into(), b"done");
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
