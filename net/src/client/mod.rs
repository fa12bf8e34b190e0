//! The client protocol (`herald-client/1`): another process opens a session on a node, runs
//! T-SQL scripts and the engine's transaction operations in it, and asks for the node's status.
//!
//! - [`proto`]: the sans-IO frames, their limits and a streaming decoder.
//! - `server`: the node's side, one session (an OS thread with a `sql::Session`) per connection;
//!   started by [`crate::Node`].
//! - [`Client`]: the Rust client, a blocking API. A connection is one session; its requests and
//!   responses go on one long-lived bidirectional stream, strictly request → response (a
//!   stream per request would cost a round trip of stream opening per statement and buy
//!   nothing: a session runs one request at a time anyway).
//!
//! Clients authenticate by certificate (mutual TLS 1.3): the node accepts a client whose
//! certificate its trust list accepts (as for peer nodes), or its own local admin client
//! certificate, written on first start into its identity directory
//! ([`crate::identity::ADMIN_CLIENT_CERTIFICATE_FILE`]), which [`Client::connect_local`] uses.
//! An untrusted client is refused during the handshake.
//!
//! A session's explicit transaction (BEGIN TRANSACTION in a script, or [`Client::begin`]) is
//! rolled back by the node when the connection ends for any reason; outside one, each
//! statement or operation commits on its own (autocommit), as in T-SQL.

pub mod proto;
pub(crate) mod server;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use herald_engine::sql::{ResultSet, StatementResult, Value, statement_kind};
use herald_engine::{
    BrokerInstanceId, ConversationGroupId, ConversationHandle, DialogOptions, MessageStatus,
    Receive,
};
use quinn::VarInt;

use crate::error::{Error, Result};
use crate::identity::{ClientIdentity, Fingerprint, NodeIdentity, Trust};
use crate::node::IDENTITY_DIR;
use crate::quic::{
    ALPN_CLIENT, CONNECT_TIMEOUT, READ_CHUNK_BYTES_MAX, SERVER_NAME, bind_udp_socket,
};
use proto::{
    BeginDialog, CLIENT_PROTOCOL_VERSION, ClientFrameDecoder, EndHow, ReceiveFilter,
    ReceiveRequest, Request, Response, WAIT_FOREVER_MS,
};
pub use proto::{
    CLIENT_FRAME_BYTES_MAX, CLIENT_SCRIPT_BYTES_MAX, PeerStatus, QueueStatus, RemoteError,
    RemoteErrorKind, StatusReport,
};

/// Most client sessions a node serves at once; a connection beyond it is refused
/// ([`CLOSE_TOO_MANY_SESSIONS`]) and its client gets [`Error::Refused`]. Each session is an OS
/// thread on the node.
pub const CLIENT_SESSIONS_MAX: usize = 64;

/// Application close code: the node serves [`CLIENT_SESSIONS_MAX`] sessions already.
pub const CLOSE_TOO_MANY_SESSIONS: VarInt = VarInt::from_u32(6);

/// Application close code: the client's certificate is trusted, but only as a peer restricted
/// to some services (`NodeConfig::restricted_peers`), which may not open client sessions.
pub const CLOSE_CLIENT_NOT_ALLOWED: VarInt = VarInt::from_u32(7);

/// Application close code a client closes its connection with when it is done.
pub const CLOSE_CLIENT_DONE: VarInt = VarInt::from_u32(0);

/// Most bytes a client accepts for one request's response, counting both the frames' bytes and
/// the decoded values' own size (a NULL is one byte on the wire and a 32-byte `Value` in
/// memory: counting the wire alone let a node make a client hold 32 times the bound). A
/// streamed response (an Execute's results, a Receive's messages) from an honest node stays
/// under it — values are bounded by `sql::RESULT_BYTES_MAX` (256 MiB, each counted at least 16,
/// so at most 16 Mi of them: 512 MiB decoded, plus their bytes and 5 of framing each),
/// statements by `sql::STATEMENTS_MAX`, column names by the script —, so more is a protocol
/// violation rather than memory the client gives away.
pub const CLIENT_RESPONSE_BYTES_MAX: usize = 4 * herald_engine::sql::RESULT_BYTES_MAX;

/// Longest [`Client::close`] waits for the connection to drain.
pub const CLOSE_WAIT_MAX: Duration = Duration::from_secs(1);

/// Worker threads of the runtime all clients of a process share (it drives their QUIC
/// connections, keep-alives included, between calls too).
const CLIENT_RUNTIME_THREADS: usize = 1;

/// The QUIC client configuration a [`Client`] connects with: `identity` as client
/// certificate, the node checked against `trust`, ALPN [`ALPN_CLIENT`], TLS 1.3 only. For tools
/// (and tests) that drive the protocol's frames themselves.
pub fn client_config(identity: &ClientIdentity, trust: &Trust) -> Result<quinn::ClientConfig> {
    crate::quic::tls::client_config_for(
        identity.certificate_chain(),
        identity.key(),
        trust,
        ALPN_CLIENT,
        crate::quic::IDLE_TIMEOUT,
        std::sync::Arc::new(|_, _| {}),
    )
}

/// What running a script remotely did: the results of the statements that ran, and the error
/// that stopped it ([`Error::Remote`] for the node's error, or a lost connection).
#[derive(Debug)]
pub struct ScriptOutcome {
    pub results: Vec<StatementResult>,
    pub error: Option<Error>,
}

/// A message received by [`ClientTransaction::receive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    pub conversation_handle: ConversationHandle,
    pub conversation_group: ConversationGroupId,
    pub message_type: String,
    /// Per conversation and direction (0 for DialogTimer and Error messages).
    pub sequence: u64,
    /// Order of arrival in the queue.
    pub queuing_order: u64,
    pub status: MessageStatus,
    pub body: Vec<u8>,
}

/// A session on a node over the client protocol. Blocking: call it from ordinary threads, not
/// from inside an async runtime. Dropping it closes the connection (the node rolls back an
/// open transaction).
#[derive(Debug)]
pub struct Client {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: ClientFrameDecoder,
    /// Bytes read and not yet decoded: `buffer[read_at..]`.
    buffer: Vec<u8>,
    read_at: usize,
    /// Response bytes decoded since the last request (bounded by
    /// [`CLIENT_RESPONSE_BYTES_MAX`]).
    response_bytes: usize,
    broker_instance: BrokerInstanceId,
    /// Set once the connection failed: every later call returns it.
    broken: Option<Error>,
    runtime: tokio::runtime::Handle,
    /// Kept for the client's life (its UDP socket); its driver outlives it until the
    /// connection has drained.
    _endpoint: quinn::Endpoint,
}

impl Client {
    /// Connects to the node at `addr`, presenting `identity`, checking the node's certificate
    /// against `trust`. [`Error::Refused`] if the node does not accept the certificate, has no
    /// session to spare, or speaks another protocol version; [`Error::NothingListening`] as
    /// soon as `addr`'s host refuses the port (no node there); [`Error::Unreachable`] if
    /// nothing answers the handshake within `quic::CONNECT_TIMEOUT`.
    pub fn connect(addr: SocketAddr, identity: &ClientIdentity, trust: &Trust) -> Result<Client> {
        let runtime = runtime()?;
        let config = client_config(identity, trust)?;
        let endpoint = {
            let _entered = runtime.enter();
            let bind_error =
                |e: &std::io::Error| Error::io(format!("binding a UDP socket for {addr}"), e);
            let socket = bind_udp_socket(any_port_for(addr)).map_err(|e| bind_error(&e))?;
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .map_err(|e| bind_error(&e))?
        };
        let refused = |reason: String| Error::Refused { reason };
        let (connection, send, recv) = runtime.block_on(async {
            let connecting = endpoint
                .connect_with(config, addr, SERVER_NAME)
                .map_err(|e| refused(format!("connecting to {addr}: {e}")))?;
            let handshake = tokio::time::timeout(CONNECT_TIMEOUT, connecting);
            let handshake = tokio::select! {
                done = handshake => done,
                () = port_refused(addr) => return Err(Error::NothingListening { addr }),
            };
            let connection = match handshake {
                Ok(Ok(connection)) => connection,
                // The handshake's idle timeout (as long as `CONNECT_TIMEOUT`) may come first.
                Ok(Err(quinn::ConnectionError::TimedOut)) | Err(_) => {
                    return Err(Error::Unreachable {
                        addr,
                        waited: CONNECT_TIMEOUT,
                    });
                }
                Ok(Err(e)) => return Err(refused(format!("connecting to {addr}: {e}"))),
            };
            let (send, recv) = connection
                .open_bi()
                .await
                .map_err(|e| refused(format!("opening the stream to {addr}: {e}")))?;
            Ok((connection, send, recv))
        })?;
        let mut client = Client {
            connection,
            send,
            recv,
            decoder: ClientFrameDecoder::responses(),
            buffer: Vec::new(),
            read_at: 0,
            response_bytes: 0,
            broker_instance: BrokerInstanceId(0),
            broken: None,
            runtime: runtime.clone(),
            _endpoint: endpoint,
        };
        let hello = client.request(&Request::Hello {
            protocol_version: CLIENT_PROTOCOL_VERSION,
        });
        match hello.and_then(|()| client.response()) {
            Ok(Response::Hello {
                protocol_version,
                broker_instance,
            }) if protocol_version == CLIENT_PROTOCOL_VERSION => {
                client.broker_instance = BrokerInstanceId(broker_instance);
                Ok(client)
            }
            Ok(Response::Error(error)) => Err(refused(error.message)),
            Ok(other) => Err(Error::ProtocolViolation {
                reason: format!(
                    "expected a hello from the node, got a {} frame",
                    other.kind_name()
                ),
            }),
            // The node closes a refused connection right after the handshake (an untrusted
            // certificate, too many sessions): what comes back first is the close.
            Err(Error::ConnectionLost { reason }) => Err(refused(reason)),
            Err(e) => Err(e),
        }
    }

    /// Connects to the node whose data directory is `data_dir`, listening on `addr`, as its
    /// local admin: with the admin client certificate the node wrote into its identity
    /// directory, trusting exactly the node's own certificate found there.
    pub fn connect_local(data_dir: &Path, addr: SocketAddr) -> Result<Client> {
        let dir = data_dir.join(IDENTITY_DIR);
        let node = node_fingerprint(&dir)?;
        let identity = ClientIdentity::load(
            &dir.join(crate::identity::ADMIN_CLIENT_CERTIFICATE_FILE),
            &dir.join(crate::identity::ADMIN_CLIENT_KEY_FILE),
        )?;
        Client::connect(addr, &identity, &Trust::pinned([node]))
    }

    /// The node's broker instance.
    pub fn broker_instance(&self) -> BrokerInstanceId {
        self.broker_instance
    }

    /// Runs a T-SQL script in this session: the results of its statements, or the first error
    /// ([`Error::Remote`]: a syntax error runs nothing and carries its line and column; a
    /// statement error carries the statement's line, column and kind).
    pub fn execute(&mut self, script: &str) -> Result<Vec<StatementResult>> {
        let outcome = self.execute_script(script);
        match outcome.error {
            Some(error) => Err(error),
            None => Ok(outcome.results),
        }
    }

    /// As [`Client::execute`], keeping the results of the statements that ran before an error.
    pub fn execute_script(&mut self, script: &str) -> ScriptOutcome {
        let mut results = Vec::new();
        let error = self.execute_into(script, &mut results).err();
        ScriptOutcome { results, error }
    }

    /// The node's queues, conversations by state, transmission queue by status, and peers.
    pub fn status(&mut self) -> Result<StatusReport> {
        match self.call(&Request::Status)? {
            Response::Status(report) => Ok(report),
            other => Err(self.unexpected(&other)),
        }
    }

    /// This session's `@@TRANCOUNT`: how deep its explicit transaction is nested, 0 when none
    /// is open (`herald shell` shows it in its prompt).
    pub fn transaction_count(&mut self) -> Result<u32> {
        match self.call(&Request::SessionState)? {
            Response::Session { transaction_count } => Ok(transaction_count),
            other => Err(self.unexpected(&other)),
        }
    }

    /// SEND one message on conversation `handle` in a transaction of its own, in one round
    /// trip: committed (durable under the node's durability) when this returns. If a script
    /// left the session's explicit transaction open (`BEGIN TRANSACTION` through
    /// [`Client::execute`]), the SEND is part of it instead, as in T-SQL.
    pub fn send(
        &mut self,
        handle: ConversationHandle,
        message_type: &str,
        body: &[u8],
    ) -> Result<()> {
        self.send_many(&[handle], message_type, body)
    }

    /// [`Client::send`] of one message on each of `handles`, atomically
    /// (`Transaction::send_many`); at most [`proto::CLIENT_SEND_HANDLES_MAX`] handles.
    pub fn send_many(
        &mut self,
        handles: &[ConversationHandle],
        message_type: &str,
        body: &[u8],
    ) -> Result<()> {
        self.ok(&Request::Send {
            handles: handles.iter().map(|h| h.0).collect(),
            message_type: message_type.to_owned(),
            body: body.to_vec(),
        })
    }

    /// RECEIVE in a transaction of its own, in one round trip: the messages are off the queue,
    /// committed, when this returns, so a client that fails before handling them loses them
    /// (as RECEIVE outside BEGIN TRANSACTION does in T-SQL). To handle each message exactly
    /// once, receive in a [`ClientTransaction`] and commit once they are handled. Like
    /// [`Client::send`], part of the session's explicit transaction if a script left one open.
    pub fn receive(&mut self, queue: &str, what: Receive) -> Result<Vec<ReceivedMessage>> {
        let filter = match (what.conversation, what.group) {
            (Some(handle), _) => ReceiveFilter::Conversation(handle.0),
            (None, Some(group)) => ReceiveFilter::Group(group.0),
            (None, None) => ReceiveFilter::None,
        };
        let request = Request::Receive(ReceiveRequest {
            queue: queue.to_owned(),
            top: u32::try_from(what.top).unwrap_or(u32::MAX),
            filter,
            wait_ms: what.wait.map(wait_ms),
        });
        self.request(&request)?;
        let mut messages = Vec::new();
        loop {
            match self.response()? {
                Response::Message(m) => {
                    let status = match m.status {
                        0 => MessageStatus::Received,
                        1 => MessageStatus::Ready,
                        3 => MessageStatus::SentCopy,
                        other => {
                            return Err(self.violation(&format!("message status {other}")));
                        }
                    };
                    messages.push(ReceivedMessage {
                        conversation_handle: ConversationHandle(m.conversation_handle),
                        conversation_group: ConversationGroupId(m.conversation_group),
                        message_type: m.message_type,
                        sequence: m.sequence,
                        queuing_order: m.queuing_order,
                        status,
                        body: m.body,
                    });
                }
                Response::Done => return Ok(messages),
                Response::Error(error) => return Err(Error::Remote(error)),
                other => return Err(self.unexpected(&other)),
            }
        }
    }

    /// Begins an explicit transaction in this session (BEGIN TRANSACTION); the returned value
    /// runs the engine's transaction operations in it. Dropping it uncommitted rolls it back.
    pub fn begin(&mut self) -> Result<ClientTransaction<'_>> {
        self.ok(&Request::BeginTransaction)?;
        Ok(ClientTransaction {
            client: self,
            finished: false,
        })
    }

    /// Closes the connection and waits (at most [`CLOSE_WAIT_MAX`], about 100 ms on loopback)
    /// until the close has gone out and the connection drained; the node rolls back an open
    /// transaction. Dropping the client closes without waiting, which is enough while the
    /// process lives on (the runtime sends the close); a process about to exit calls this, or
    /// the node notices only at its idle timeout (10 s).
    pub fn close(self) {
        self.connection.close(CLOSE_CLIENT_DONE, b"client done");
        let endpoint = self._endpoint.clone();
        let _ = self
            .runtime
            .block_on(async { tokio::time::timeout(CLOSE_WAIT_MAX, endpoint.wait_idle()).await });
    }

    fn execute_into(&mut self, script: &str, results: &mut Vec<StatementResult>) -> Result<()> {
        self.request(&Request::Execute {
            script: script.to_owned(),
        })?;
        // The result set being filled: its values so far, its columns and rows expected.
        let mut current: Option<(ResultSet, Vec<Value>, u64)> = None;
        loop {
            let response = self.response()?;
            match response {
                Response::Values(values) => {
                    let Some((set, pending, rows_left)) = current.as_mut() else {
                        return Err(self.violation("values without a result set"));
                    };
                    pending.extend(values);
                    if let Err(reason) =
                        take_whole_rows(pending, set.columns.len(), &mut set.rows, rows_left)
                    {
                        return Err(self.violation(reason));
                    }
                    if *rows_left == 0 && pending.is_empty() {
                        let (set, _, _) = current.take().expect("checked above");
                        if let Some(last) = results.last_mut() {
                            last.result = Some(set);
                        }
                    }
                }
                Response::Statement { .. } | Response::Done | Response::Error(_)
                    if current.is_some() =>
                {
                    return Err(self.violation("a result set ended before its rows"));
                }
                Response::Statement {
                    statement,
                    rows_affected,
                    result,
                } => {
                    let statement = statement_kind(&statement).ok_or_else(|| {
                        self.violation(&format!("unknown statement kind {statement:?}"))
                    })?;
                    results.push(StatementResult {
                        statement,
                        rows_affected,
                        result: None,
                    });
                    if let Some((columns, rows)) = result {
                        let set = ResultSet {
                            columns,
                            rows: Vec::new(),
                        };
                        if rows == 0 {
                            if let Some(last) = results.last_mut() {
                                last.result = Some(set);
                            }
                        } else {
                            current = Some((set, Vec::new(), rows));
                        }
                    }
                }
                Response::Done => return Ok(()),
                Response::Error(error) => return Err(Error::Remote(error)),
                other => return Err(self.unexpected(&other)),
            }
        }
    }

    /// Sends `request` and reads its single response frame; a remote error is [`Error::Remote`].
    fn call(&mut self, request: &Request) -> Result<Response> {
        self.request(request)?;
        match self.response()? {
            Response::Error(error) => Err(Error::Remote(error)),
            response => Ok(response),
        }
    }

    fn ok(&mut self, request: &Request) -> Result<()> {
        match self.call(request)? {
            Response::Ok => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    fn request(&mut self, request: &Request) -> Result<()> {
        if let Some(error) = &self.broken {
            return Err(error.clone());
        }
        let frame = request.to_bytes()?;
        self.response_bytes = 0;
        let written = self
            .runtime
            .block_on(async { self.send.write_all(&frame).await });
        written.map_err(|e| {
            // "connection lost" alone hides why: the close (a refusal's reason among them).
            let why = match e {
                quinn::WriteError::ConnectionLost(cause) => cause.to_string(),
                other => other.to_string(),
            };
            self.lost(format!("writing the request: {why}"))
        })
    }

    fn response(&mut self) -> Result<Response> {
        if let Some(error) = &self.broken {
            return Err(error.clone());
        }
        loop {
            if self.read_at < self.buffer.len() {
                let mut input = &self.buffer[self.read_at..];
                let before = input.len();
                let decoded = self.decoder.decode::<Response>(&mut input);
                let used = before - input.len();
                self.read_at += used;
                self.charge_response(used)?;
                if let Ok(Some(Response::Values(values))) = &decoded {
                    self.charge_response(std::mem::size_of_val(values.as_slice()))?;
                }
                match decoded {
                    Ok(Some(response)) => return Ok(response),
                    Ok(None) => {}
                    Err(e) => return Err(self.violation(&e.to_string())),
                }
            }
            self.buffer.clear();
            self.read_at = 0;
            let recv = &mut self.recv;
            let chunk = self
                .runtime
                .block_on(async { recv.read_chunk(READ_CHUNK_BYTES_MAX, true).await });
            match chunk {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk.bytes),
                Ok(None) => return Err(self.lost("the node ended the stream".into())),
                Err(e) => {
                    let reason = match self.connection.close_reason() {
                        Some(reason) => reason.to_string(),
                        None => e.to_string(),
                    };
                    return Err(self.lost(reason));
                }
            }
        }
    }

    fn lost(&mut self, reason: String) -> Error {
        let error = Error::ConnectionLost { reason };
        self.broken = Some(error.clone());
        error
    }

    /// Counts `bytes` against [`CLIENT_RESPONSE_BYTES_MAX`] for the current request.
    fn charge_response(&mut self, bytes: usize) -> Result<()> {
        self.response_bytes += bytes;
        if self.response_bytes > CLIENT_RESPONSE_BYTES_MAX {
            return Err(self.violation(&format!(
                "a response of more than {CLIENT_RESPONSE_BYTES_MAX} bytes"
            )));
        }
        Ok(())
    }

    fn violation(&mut self, reason: &str) -> Error {
        let error = Error::ProtocolViolation {
            reason: reason.to_owned(),
        };
        self.connection
            .close(crate::quic::CLOSE_PROTOCOL_VIOLATION, reason.as_bytes());
        self.broken = Some(error.clone());
        error
    }

    fn unexpected(&mut self, response: &Response) -> Error {
        self.violation(&format!("unexpected {} response", response.kind_name()))
    }

    fn is_broken(&self) -> bool {
        self.broken.is_some()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Not waited for: the endpoint's driver task lives on the shared runtime until the
        // connection has drained, so the close still reaches the node (which rolls back at
        // once) without making every drop take the draining period (~100 ms).
        self.connection.close(CLOSE_CLIENT_DONE, b"client done");
    }
}

/// An explicit transaction of a [`Client`]'s session: the engine's transaction operations, run
/// on the node. Commit with [`ClientTransaction::commit`]; dropping it uncommitted rolls it
/// back (and so does losing the connection).
#[derive(Debug)]
pub struct ClientTransaction<'c> {
    client: &'c mut Client,
    finished: bool,
}

impl ClientTransaction<'_> {
    /// BEGIN DIALOG from local service `from` to service `to` on `contract`.
    pub fn begin_dialog(
        &mut self,
        from: &str,
        to: &str,
        contract: &str,
        options: DialogOptions,
    ) -> Result<ConversationHandle> {
        let request = Request::BeginDialog(BeginDialog {
            from_service: from.to_owned(),
            to_service: to.to_owned(),
            contract: contract.to_owned(),
            related_conversation: options.related_conversation.map(|h| h.0),
            related_conversation_group: options.related_conversation_group.map(|g| g.0),
            lifetime_secs: options.lifetime.map(|d| d.as_secs()),
            target_broker_instance: options.target_broker_instance.map(|b| b.0),
        });
        match self.client.call(&request)? {
            Response::Dialog { handle } => Ok(ConversationHandle(handle)),
            other => Err(self.client.unexpected(&other)),
        }
    }

    /// SEND one message on conversation `handle`.
    pub fn send(
        &mut self,
        handle: ConversationHandle,
        message_type: &str,
        body: &[u8],
    ) -> Result<()> {
        self.send_many(&[handle], message_type, body)
    }

    /// SEND one message on each of `handles`, atomically (`Transaction::send_many`): if any
    /// conversation refuses it, nothing is sent on any. At most
    /// [`proto::CLIENT_SEND_HANDLES_MAX`] handles.
    pub fn send_many(
        &mut self,
        handles: &[ConversationHandle],
        message_type: &str,
        body: &[u8],
    ) -> Result<()> {
        self.client.send_many(handles, message_type, body)
    }

    /// RECEIVE up to `what.top` messages of one conversation group from `queue`
    /// (`Receive::wait`: WAITFOR, blocking until messages come or the time passes).
    pub fn receive(&mut self, queue: &str, what: Receive) -> Result<Vec<ReceivedMessage>> {
        self.client.receive(queue, what)
    }

    /// GET CONVERSATION GROUP: locks the group RECEIVE would take next; `None` if none.
    pub fn get_conversation_group(&mut self, queue: &str) -> Result<Option<ConversationGroupId>> {
        self.group(queue, None)
    }

    /// WAITFOR (GET CONVERSATION GROUP …), TIMEOUT: waits up to `timeout` for a group.
    pub fn get_conversation_group_wait(
        &mut self,
        queue: &str,
        timeout: Duration,
    ) -> Result<Option<ConversationGroupId>> {
        self.group(queue, Some(wait_ms(timeout)))
    }

    /// MOVE CONVERSATION `handle` TO group `to`.
    pub fn move_conversation(
        &mut self,
        handle: ConversationHandle,
        to: ConversationGroupId,
    ) -> Result<()> {
        self.client.ok(&Request::MoveConversation {
            handle: handle.0,
            group: to.0,
        })
    }

    /// END CONVERSATION.
    pub fn end_conversation(&mut self, handle: ConversationHandle) -> Result<()> {
        self.end(handle, EndHow::Plain)
    }

    /// END CONVERSATION … WITH ERROR = `code` DESCRIPTION = `description`.
    pub fn end_conversation_with_error(
        &mut self,
        handle: ConversationHandle,
        code: i32,
        description: &str,
    ) -> Result<()> {
        self.end(
            handle,
            EndHow::Error {
                code,
                description: description.to_owned(),
            },
        )
    }

    /// END CONVERSATION … WITH CLEANUP.
    pub fn end_conversation_with_cleanup(&mut self, handle: ConversationHandle) -> Result<()> {
        self.end(handle, EndHow::Cleanup)
    }

    /// BEGIN CONVERSATION TIMER: a DialogTimer message arrives after `timeout`.
    pub fn begin_conversation_timer(
        &mut self,
        handle: ConversationHandle,
        timeout: Duration,
    ) -> Result<()> {
        self.client.ok(&Request::BeginConversationTimer {
            handle: handle.0,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Runs a T-SQL script inside this transaction.
    pub fn execute(&mut self, script: &str) -> Result<Vec<StatementResult>> {
        self.client.execute(script)
    }

    /// COMMIT: durable (under the node's durability) when it returns.
    pub fn commit(mut self) -> Result<()> {
        self.finished = true;
        self.client.ok(&Request::Commit)
    }

    /// ROLLBACK: received messages return to their queues.
    pub fn rollback(mut self) -> Result<()> {
        self.finished = true;
        self.client.ok(&Request::Rollback)
    }

    fn group(&mut self, queue: &str, wait_ms: Option<u64>) -> Result<Option<ConversationGroupId>> {
        match self.client.call(&Request::GetConversationGroup {
            queue: queue.to_owned(),
            wait_ms,
        })? {
            Response::Group { group } => Ok(group.map(ConversationGroupId)),
            other => Err(self.client.unexpected(&other)),
        }
    }

    fn end(&mut self, handle: ConversationHandle, how: EndHow) -> Result<()> {
        self.client.ok(&Request::EndConversation {
            handle: handle.0,
            how,
        })
    }
}

impl Drop for ClientTransaction<'_> {
    fn drop(&mut self) {
        if !self.finished && !self.client.is_broken() {
            // Best effort: if this fails the connection is gone, and the node rolled back.
            let _ = self.client.ok(&Request::Rollback);
        }
    }
}

fn wait_ms(timeout: Duration) -> u64 {
    if timeout == Duration::MAX {
        WAIT_FOREVER_MS
    } else {
        u64::try_from(timeout.as_millis())
            .unwrap_or(WAIT_FOREVER_MS - 1)
            .min(WAIT_FOREVER_MS - 1)
    }
}

/// The node's certificate fingerprint, from its identity directory.
fn node_fingerprint(dir: &Path) -> Result<Fingerprint> {
    NodeIdentity::fingerprint_in(dir)
}

/// Any port on any local address of `addr`'s family: where a socket talking to `addr` binds.
fn any_port_for(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    }
}

/// Resolves if `addr`'s host says nothing listens on that UDP port, and never otherwise: one
/// datagram from a socket connected to `addr`, whose ICMP "port unreachable" answer the kernel
/// reports as `ECONNREFUSED` on that socket. A node not started answers so at once (on this
/// host or a reachable one), where the QUIC handshake alone would wait out `CONNECT_TIMEOUT`;
/// a live node drops the one-byte datagram as no QUIC packet, and a host that answers nothing
/// leaves the handshake's timeout to decide.
async fn port_refused(addr: SocketAddr) {
    let refused = async {
        let socket = tokio::net::UdpSocket::bind(any_port_for(addr)).await.ok()?;
        socket.connect(addr).await.ok()?;
        socket.send(&[0]).await.ok()?;
        let mut buffer = [0u8; 64];
        loop {
            match socket.recv(&mut buffer).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Some(()),
                Err(_) => return None,
                // Something answered (not a QUIC server): keep listening for a refusal.
                Ok(_) => {}
            }
        }
    };
    if refused.await.is_none() {
        std::future::pending::<()>().await;
    }
}

/// The runtime all clients of this process share.
fn runtime() -> Result<&'static tokio::runtime::Handle> {
    static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        OnceLock::new();
    static HANDLE: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(CLIENT_RUNTIME_THREADS)
            .thread_name("herald-client")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match runtime {
        Ok(runtime) => Ok(HANDLE.get_or_init(|| runtime.handle().clone())),
        Err(message) => Err(Error::Io {
            context: "starting the client runtime".into(),
            kind: std::io::ErrorKind::Other,
            message: message.clone(),
        }),
    }
}

/// Moves the whole rows of `width` values at the front of `pending` into `rows` (each row its
/// own allocation of exactly `width`: a row split off the front kept the whole buffer behind
/// it, which made a large result quadratic in memory and time), counting them off `rows_left`.
/// What is left in `pending` is the start of the next row.
fn take_whole_rows(
    pending: &mut Vec<Value>,
    width: usize,
    rows: &mut Vec<Vec<Value>>,
    rows_left: &mut u64,
) -> std::result::Result<(), &'static str> {
    if width == 0 {
        return Err("values for a result set without columns");
    }
    let whole = pending.len() / width;
    if whole as u64 > *rows_left {
        return Err("more rows than the result set announced");
    }
    let mut values = pending.drain(..whole * width);
    rows.reserve(whole);
    for _ in 0..whole {
        rows.push(values.by_ref().take(width).collect());
    }
    *rows_left -= whole as u64;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_taken_whole_each_in_its_own_buffer() {
        let mut pending: Vec<Value> = (0..100_001).map(Value::Int).collect();
        let mut rows = Vec::new();
        let mut rows_left = 50_001;
        take_whole_rows(&mut pending, 2, &mut rows, &mut rows_left).unwrap();
        assert_eq!(rows.len(), 50_000);
        assert_eq!(rows_left, 1);
        assert_eq!(pending, [Value::Int(100_000)], "the next row's start stays");
        assert!(
            rows.iter().all(|row| row.capacity() == 2),
            "no row keeps more"
        );
        assert_eq!(rows[49_999], [Value::Int(99_998), Value::Int(99_999)]);
        pending.push(Value::Int(7));
        take_whole_rows(&mut pending, 2, &mut rows, &mut rows_left).unwrap();
        assert_eq!((rows.len(), rows_left, pending.len()), (50_001, 0, 0));
        pending.extend([Value::Int(1), Value::Int(2)]);
        assert_eq!(
            take_whole_rows(&mut pending, 2, &mut rows, &mut rows_left),
            Err("more rows than the result set announced")
        );
        assert_eq!(
            take_whole_rows(&mut pending, 0, &mut rows, &mut rows_left),
            Err("values for a result set without columns")
        );
    }
}
