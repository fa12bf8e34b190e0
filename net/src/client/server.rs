//! The node's side of the client protocol: one session per client connection.
//!
//! Each connection gets an OS thread holding the broker and a [`sql::Session`] (the engine's
//! API blocks, and a WAITFOR blocks for as long as it waits), and two small tasks on the node's
//! runtime: a reader that decodes requests and hands them to the thread, and a writer that
//! writes the thread's response frames. Requests are served strictly in order; a request that
//! arrives while one runs waits in a channel of one, and then QUIC's flow control holds the
//! client back.
//!
//! Invariants:
//! - A session's transaction lives only as long as its connection: when the connection ends
//!   (closed by the client, lost, a protocol violation, the node shutting down) the session's
//!   interrupt flag is set and the broker's waiters woken, so a WAITFOR in progress ends
//!   (`herald_engine::Error::Interrupted`); the thread then drops the session, which rolls
//!   back its open transaction: received messages return to their queues.
//! - At most [`CLIENT_SESSIONS_MAX`] sessions exist; a connection beyond it is closed with
//!   [`CLOSE_TOO_MANY_SESSIONS`] right after its handshake, before a thread is made.
//! - A certificate the node trusts only for some services (`NodeConfig::restricted_peers`)
//!   opens no session ([`CLOSE_CLIENT_NOT_ALLOWED`]): a session can do anything.
//! - [`ClientService::shutdown`] ends every session and joins its thread, so the node's broker
//!   has no other holder when it is closed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use herald_engine::sql::{self, RESULT_BYTES_MAX, RESULT_ROWS_MAX, StatementResult};
use herald_engine::{Broker, ConversationGroupId, ConversationHandle, DialogOptions, Receive};
use parking_lot::{Condvar, Mutex};
use tokio::sync::mpsc;

use super::proto::{
    BeginDialog, CLIENT_PROTOCOL_VERSION, ClientFrameDecoder, EndHow, ReceiveFilter,
    ReceiveRequest, ReceivedMessage, RemoteError, RemoteErrorKind, Request, Response, StatusReport,
    VALUES_FRAME_BYTES_TARGET, WAIT_FOREVER_MS, value_bytes,
};
use super::{CLIENT_SESSIONS_MAX, CLOSE_CLIENT_NOT_ALLOWED, CLOSE_TOO_MANY_SESSIONS};
use crate::identity::Fingerprint;
use crate::quic::{
    CLOSE_PROTOCOL_VIOLATION, CLOSE_SHUTDOWN, CLOSE_STREAM_ENDED, READ_CHUNK_BYTES_MAX,
    STREAM_OPEN_TIMEOUT,
};

/// Response frames buffered between a session's thread and its writer: a streamed result
/// waits for the client past this.
const RESPONSE_FRAMES_BUFFERED: usize = 4;

/// What makes the node's status report (the node knows its transport and peers).
pub(crate) type StatusSource = Arc<dyn Fn() -> StatusReport + Send + Sync>;

/// Serves client connections for one node.
pub(crate) struct ClientService {
    broker: Arc<Broker>,
    status: StatusSource,
    /// Trusted certificates that may not open sessions (peers restricted to some services).
    not_clients: HashSet<Fingerprint>,
    sessions: Mutex<HashMap<u64, SessionEntry>>,
    /// Signalled whenever a session is removed (`shutdown` waits for none to be left).
    session_ended: Condvar,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
}

struct SessionEntry {
    interrupt: Arc<AtomicBool>,
    connection: quinn::Connection,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ClientService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientService")
            .field("sessions", &self.sessions.lock().len())
            .finish_non_exhaustive()
    }
}

impl ClientService {
    pub(crate) fn new(
        broker: Arc<Broker>,
        status: StatusSource,
        not_clients: HashSet<Fingerprint>,
    ) -> Arc<ClientService> {
        Arc::new(ClientService {
            broker,
            status,
            not_clients,
            sessions: Mutex::new(HashMap::new()),
            session_ended: Condvar::new(),
            next_id: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Sessions open now.
    pub(crate) fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Serves one client connection (its handshake done, its certificate trusted) until it
    /// ends.
    /// The client's Hello must come within `hello_timeout` of its stream.
    pub(crate) async fn accept(
        self: &Arc<Self>,
        connection: quinn::Connection,
        hello_timeout: Duration,
    ) {
        let addr = connection.remote_address();
        match crate::quic::tls::peer_fingerprint(&connection) {
            Some(fingerprint) if !self.not_clients.contains(&fingerprint) => {}
            fingerprint => {
                tracing::warn!(%addr, ?fingerprint, "refusing a client: a restricted peer's certificate");
                connection.close(
                    CLOSE_CLIENT_NOT_ALLOWED,
                    b"this certificate may not open client sessions",
                );
                return;
            }
        }
        let interrupt = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut sessions = self.sessions.lock();
            if self.shutting_down.load(Ordering::SeqCst) {
                connection.close(CLOSE_SHUTDOWN, b"node shutting down");
                return;
            }
            if sessions.len() >= CLIENT_SESSIONS_MAX {
                tracing::warn!(%addr, max = CLIENT_SESSIONS_MAX, "refusing a client: too many sessions");
                connection.close(CLOSE_TOO_MANY_SESSIONS, b"too many client sessions");
                return;
            }
            sessions.insert(
                id,
                SessionEntry {
                    interrupt: interrupt.clone(),
                    connection: connection.clone(),
                    thread: None,
                },
            );
        }
        let streams = tokio::time::timeout(STREAM_OPEN_TIMEOUT, connection.accept_bi()).await;
        let (send, recv) = match streams {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => {
                tracing::debug!(%addr, error = %e, "client left before opening its stream");
                self.remove(id);
                return;
            }
            Err(_) => {
                connection.close(CLOSE_PROTOCOL_VIOLATION, b"no stream opened");
                self.remove(id);
                return;
            }
        };
        let (request_sender, requests) = mpsc::channel::<Request>(1);
        let (response_sender, responses) = mpsc::channel::<Vec<u8>>(RESPONSE_FRAMES_BUFFERED);
        let thread = {
            let service = self.clone();
            let interrupt = interrupt.clone();
            let connection = connection.clone();
            std::thread::Builder::new()
                .name("herald-client-session".into())
                .spawn(move || {
                    // Removed however the thread ends (a panic included), after the session
                    // (and its transaction) is gone.
                    let _registered = Registered {
                        service: &service,
                        id,
                    };
                    run_session(&service, interrupt, requests, response_sender, &connection);
                })
        };
        match thread {
            Ok(thread) => {
                if let Some(entry) = self.sessions.lock().get_mut(&id) {
                    entry.thread = Some(thread);
                }
            }
            Err(e) => {
                tracing::error!(%addr, error = %e, "could not start a client session thread");
                connection.close(CLOSE_SHUTDOWN, b"could not start a session");
                self.remove(id);
                return;
            }
        }
        tracing::debug!(%addr, "client session started");
        // A connection that never says Hello would hold its session slot for ever (keep-alives
        // keep it up), and `CLIENT_SESSIONS_MAX` such lock every client out, the admin too.
        let greeted = AtomicBool::new(false);
        let ended = tokio::select! {
            ended = read_requests(recv, request_sender, &greeted) => ended,
            ended = write_responses(send, responses) => ended,
            error = connection.closed() => Ended::Lost(error.to_string()),
            reason = crate::quic::hello_deadline(hello_timeout, &greeted) => Ended::Violation(reason),
        };
        // Whatever ended it, the session's wait (if any) must end too, and its transaction with
        // it: the thread sees its request channel closed and drops the session.
        interrupt.store(true, Ordering::SeqCst);
        self.broker.wake_waiters();
        match ended {
            Ended::Violation(reason) => {
                tracing::warn!(%addr, %reason, "client protocol violation: closing");
                connection.close(CLOSE_PROTOCOL_VIOLATION, reason.as_bytes());
            }
            Ended::Lost(reason) => {
                tracing::debug!(%addr, %reason, "client connection ended");
                connection.close(CLOSE_STREAM_ENDED, b"stream ended");
            }
        }
    }

    /// Ends every session (their waits are interrupted, their connections closed, their
    /// transactions rolled back) and joins their threads; refuses new ones from now on.
    pub(crate) fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let threads: Vec<JoinHandle<()>> = {
            let mut sessions = self.sessions.lock();
            for entry in sessions.values() {
                entry.interrupt.store(true, Ordering::SeqCst);
                entry
                    .connection
                    .close(CLOSE_SHUTDOWN, b"node shutting down");
            }
            sessions
                .values_mut()
                .filter_map(|entry| entry.thread.take())
                .collect()
        };
        self.broker.wake_waiters();
        for thread in threads {
            let _ = thread.join();
        }
        // A session accepted while this ran had no thread to join yet: its connection is
        // closed, so it ends at once; wait for it (bounded: a stuck one is left behind).
        let deadline = std::time::Instant::now() + SESSIONS_END_TIMEOUT;
        let mut sessions = self.sessions.lock();
        while !sessions.is_empty() {
            for entry in sessions.values() {
                entry.interrupt.store(true, Ordering::SeqCst);
                entry
                    .connection
                    .close(CLOSE_SHUTDOWN, b"node shutting down");
            }
            self.broker.wake_waiters();
            if self
                .session_ended
                .wait_until(&mut sessions, deadline)
                .timed_out()
            {
                tracing::warn!(
                    sessions = sessions.len(),
                    "client sessions still running at shutdown"
                );
                break;
            }
        }
    }

    fn remove(&self, id: u64) {
        self.sessions.lock().remove(&id);
        self.session_ended.notify_all();
    }
}

/// Longest [`ClientService::shutdown`] waits for sessions that had not started their thread
/// when it began.
const SESSIONS_END_TIMEOUT: Duration = Duration::from_secs(5);

/// Removes a session from its service when dropped.
struct Registered<'s> {
    service: &'s ClientService,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.service.remove(self.id);
    }
}

enum Ended {
    Violation(String),
    Lost(String),
}

/// Decodes the client's requests and hands them to the session thread; sets `greeted` at the
/// first (the Hello).
async fn read_requests(
    mut recv: quinn::RecvStream,
    requests: mpsc::Sender<Request>,
    greeted: &AtomicBool,
) -> Ended {
    let mut decoder = ClientFrameDecoder::requests();
    loop {
        let chunk = match recv.read_chunk(READ_CHUNK_BYTES_MAX, true).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Ended::Lost("the client ended its stream".into()),
            Err(e) => return Ended::Lost(format!("reading: {e}")),
        };
        let mut input = &chunk.bytes[..];
        while !input.is_empty() {
            match decoder.decode::<Request>(&mut input) {
                Ok(Some(request)) => {
                    greeted.store(true, Ordering::SeqCst);
                    if requests.send(request).await.is_err() {
                        return Ended::Lost("the session ended".into());
                    }
                }
                Ok(None) => {}
                Err(e) => return Ended::Violation(e.to_string()),
            }
        }
    }
}

async fn write_responses(
    mut send: quinn::SendStream,
    mut responses: mpsc::Receiver<Vec<u8>>,
) -> Ended {
    while let Some(frame) = responses.recv().await {
        if let Err(e) = send.write_all(&frame).await {
            return Ended::Lost(format!("writing: {e}"));
        }
    }
    // The session ended (a refused Hello, say): let the client read what was written.
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
    Ended::Lost("the session ended".into())
}

/// The session thread: a Hello first, then requests until the connection ends. Dropping the
/// session at the end rolls back its open transaction.
fn run_session(
    service: &ClientService,
    interrupt: Arc<AtomicBool>,
    mut requests: mpsc::Receiver<Request>,
    responses: mpsc::Sender<Vec<u8>>,
    connection: &quinn::Connection,
) {
    let mut out = Responder {
        responses,
        connection,
    };
    match requests.blocking_recv() {
        Some(Request::Hello { protocol_version })
            if protocol_version == CLIENT_PROTOCOL_VERSION =>
        {
            let hello = Response::Hello {
                protocol_version: CLIENT_PROTOCOL_VERSION,
                broker_instance: service.broker.broker_instance().0,
            };
            if !out.send(&hello) {
                return;
            }
        }
        Some(Request::Hello { protocol_version }) => {
            out.send(&Response::Error(RemoteError::bad_request(format!(
                "the client speaks client protocol version {protocol_version}; this node speaks \
                 version {CLIENT_PROTOCOL_VERSION}"
            ))));
            return;
        }
        Some(other) => {
            let reason = format!(
                "expected a hello first, got a {} request",
                other.kind_name()
            );
            connection.close(CLOSE_PROTOCOL_VIOLATION, reason.as_bytes());
            return;
        }
        None => return,
    }
    let broker = &*service.broker;
    let mut session = sql::Session::new(broker);
    session.set_interrupt(interrupt);
    while let Some(request) = requests.blocking_recv() {
        let served = match request {
            Request::Hello { .. } => {
                connection.close(CLOSE_PROTOCOL_VIOLATION, b"a second hello");
                false
            }
            Request::Execute { script } => execute(&mut session, &script, &mut out),
            Request::Receive(receive) => self::receive(&mut session, &receive, &mut out),
            Request::Status => out.send(&Response::Status((service.status)())),
            Request::SessionState => out.send(&Response::Session {
                transaction_count: session.transaction_count(),
            }),
            other => {
                let response = match structured(&mut session, other) {
                    Ok(response) => response,
                    Err(error) => Response::Error(remote(&error)),
                };
                out.send(&response)
            }
        };
        if !served {
            break;
        }
    }
    drop(session);
}

/// Sends frames to the writer; `false` once the connection is gone.
struct Responder<'c> {
    responses: mpsc::Sender<Vec<u8>>,
    connection: &'c quinn::Connection,
}

impl Responder<'_> {
    fn send(&mut self, response: &Response) -> bool {
        let frame = match response.to_bytes() {
            Ok(frame) => frame,
            Err(e) => {
                // A response the protocol cannot carry (a name over the wire's limit): say so
                // instead.
                let error = Response::Error(RemoteError {
                    kind: RemoteErrorKind::Limit,
                    position: None,
                    statement: None,
                    message: format!("the {} response cannot be sent: {e}", response.kind_name()),
                });
                match error.to_bytes() {
                    Ok(frame) => frame,
                    Err(_) => {
                        self.connection
                            .close(CLOSE_SHUTDOWN, b"response not encodable");
                        return false;
                    }
                }
            }
        };
        self.responses.blocking_send(frame).is_ok()
    }
}

/// The wire form of an engine error; a statement error from a structured operation (which ran
/// as a one-statement script) is reported as its cause.
fn remote(error: &herald_engine::Error) -> RemoteError {
    RemoteError::from_engine(error)
}

fn execute(session: &mut sql::Session<'_>, script: &str, out: &mut Responder<'_>) -> bool {
    let outcome = session.execute_script(script);
    for result in &outcome.results {
        if !send_statement(result, out) {
            return false;
        }
    }
    match &outcome.error {
        None => out.send(&Response::Done),
        Some(error) => out.send(&Response::Error(remote(error))),
    }
}

/// A statement's `Statement` frame and its values in `Values` frames of about
/// [`VALUES_FRAME_BYTES_TARGET`].
fn send_statement(result: &StatementResult, out: &mut Responder<'_>) -> bool {
    let frame = Response::Statement {
        statement: result.statement.to_owned(),
        rows_affected: result.rows_affected,
        result: result
            .result
            .as_ref()
            .map(|set| (set.columns.clone(), set.rows.len() as u64)),
    };
    if !out.send(&frame) {
        return false;
    }
    let Some(set) = &result.result else {
        return true;
    };
    let mut values = Vec::new();
    let mut bytes = 0;
    for value in set.rows.iter().flatten() {
        let size = value_bytes(value);
        if !values.is_empty() && bytes + size > VALUES_FRAME_BYTES_TARGET {
            if !out.send(&Response::Values(std::mem::take(&mut values))) {
                return false;
            }
            bytes = 0;
        }
        values.push(value.clone());
        bytes += size;
    }
    values.is_empty() || out.send(&Response::Values(values))
}

/// A structured RECEIVE: the messages in `Message` frames, then `Done`.
fn receive(session: &mut sql::Session<'_>, r: &ReceiveRequest, out: &mut Responder<'_>) -> bool {
    let mut what = Receive::top((r.top as usize).min(RESULT_ROWS_MAX));
    match r.filter {
        ReceiveFilter::None => {}
        ReceiveFilter::Conversation(h) => what = what.conversation(ConversationHandle(h)),
        ReceiveFilter::Group(g) => what = what.group(ConversationGroupId(g)),
    }
    if let Some(ms) = r.wait_ms {
        what = what.wait(wait_duration(ms));
    }
    let explicit = session.transaction_count() > 0;
    let received = session.with_transaction(|tx| {
        let messages = tx.receive(&r.queue, what)?;
        let bytes: usize = messages.iter().map(|m| m.body().len().max(16)).sum();
        if bytes > RESULT_BYTES_MAX {
            // Returned to the queue (the transaction is rolled back below, or, in autocommit,
            // by this error): no message is consumed unseen.
            return Err(herald_engine::Error::Limit {
                what: "bytes of received message bodies",
                len: bytes,
                max: RESULT_BYTES_MAX,
            });
        }
        Ok(messages
            .iter()
            .map(|m| ReceivedMessage {
                conversation_handle: m.conversation_handle.0,
                conversation_group: m.conversation_group.0,
                message_type: m.message_type.to_string(),
                sequence: m.sequence,
                queuing_order: m.queuing_order,
                status: m.status as u8,
                body: m.body().to_vec(),
            })
            .collect::<Vec<_>>())
    });
    match received {
        Ok(messages) => {
            for message in messages {
                if !out.send(&Response::Message(message)) {
                    return false;
                }
            }
            out.send(&Response::Done)
        }
        Err(error) => {
            let mut error = remote(&error);
            if explicit && error.kind == RemoteErrorKind::Limit {
                session.rollback();
                error.message.push_str(" (the transaction was rolled back)");
            }
            out.send(&Response::Error(error))
        }
    }
}

/// The single-frame operations.
fn structured(session: &mut sql::Session<'_>, request: Request) -> herald_engine::Result<Response> {
    let statement = |session: &mut sql::Session<'_>, text: &str| {
        session
            .execute(text)
            .map(|_| Response::Ok)
            .map_err(|e| match e {
                herald_engine::Error::Statement { source, .. } => *source,
                other => other,
            })
    };
    match request {
        Request::BeginTransaction => statement(session, "BEGIN TRANSACTION"),
        Request::Commit => statement(session, "COMMIT"),
        Request::Rollback => statement(session, "ROLLBACK"),
        Request::BeginDialog(BeginDialog {
            from_service,
            to_service,
            contract,
            related_conversation,
            related_conversation_group,
            lifetime_secs,
            target_broker_instance,
        }) => {
            let options = DialogOptions {
                related_conversation: related_conversation.map(ConversationHandle),
                related_conversation_group: related_conversation_group.map(ConversationGroupId),
                lifetime: lifetime_secs.map(Duration::from_secs),
                target_broker_instance: target_broker_instance.map(herald_engine::BrokerInstanceId),
            };
            let handle = session.with_transaction(|tx| {
                tx.begin_dialog(&from_service, &to_service, &contract, options)
            })?;
            Ok(Response::Dialog { handle: handle.0 })
        }
        Request::Send {
            handles,
            message_type,
            body,
        } => {
            let handles: Vec<ConversationHandle> =
                handles.into_iter().map(ConversationHandle).collect();
            session.with_transaction(|tx| tx.send_many(&handles, &message_type, &body))?;
            Ok(Response::Ok)
        }
        Request::GetConversationGroup { queue, wait_ms } => {
            let group = session.with_transaction(|tx| match wait_ms {
                Some(ms) => tx.get_conversation_group_wait(&queue, wait_duration(ms)),
                None => tx.get_conversation_group(&queue),
            })?;
            Ok(Response::Group {
                group: group.map(|g| g.0),
            })
        }
        Request::EndConversation { handle, how } => {
            let handle = ConversationHandle(handle);
            session.with_transaction(|tx| match &how {
                EndHow::Plain => tx.end_conversation(handle),
                EndHow::Error { code, description } => {
                    tx.end_conversation_with_error(handle, *code, description)
                }
                EndHow::Cleanup => tx.end_conversation_with_cleanup(handle),
            })?;
            Ok(Response::Ok)
        }
        Request::BeginConversationTimer { handle, timeout_ms } => {
            session.with_transaction(|tx| {
                tx.begin_conversation_timer(
                    ConversationHandle(handle),
                    Duration::from_millis(timeout_ms),
                )
            })?;
            Ok(Response::Ok)
        }
        Request::MoveConversation { handle, group } => {
            session.with_transaction(|tx| {
                tx.move_conversation(ConversationHandle(handle), ConversationGroupId(group))
            })?;
            Ok(Response::Ok)
        }
        Request::Hello { .. }
        | Request::Execute { .. }
        | Request::Receive(_)
        | Request::Status
        | Request::SessionState => Err(herald_engine::Error::Sql(format!(
            "{} is not a single-frame request",
            request.kind_name()
        ))),
    }
}

fn wait_duration(ms: u64) -> Duration {
    if ms == WAIT_FOREVER_MS {
        Duration::MAX
    } else {
        Duration::from_millis(ms)
    }
}
