//! The replication connection: PostgreSQL's streaming replication sub-protocol on a
//! `replication=database` connection, which tokio-postgres does not speak.
//!
//! [`ReplicationClient::connect`] opens it like any bite-sync connection (TLS per `sslmode`,
//! keepalives, `connect_timeout` over the whole startup, errors that never show the password);
//! the client then runs replication commands (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`,
//! `DROP_REPLICATION_SLOT`, plain SQL with the simple query protocol) and finally turns into a
//! [`ReplicationStream`] with `START_REPLICATION`.
//!
//! Parts: `wire` (the byte layouts, pure), `transport` (sockets, TLS, buffered framing),
//! `startup` (startup message and authentication).
//!
//! Invariants:
//! - [`ReplicationStream::next`] is cancel-safe: the read buffer lives in the stream, bytes only
//!   move from the socket into it, and a message leaves it only when complete and returned. It
//!   can sit in `tokio::select!` against timers without ever losing or splitting a message.
//! - Memory is bounded by the message being assembled plus one read (64 KiB); room for a large
//!   message grows as its bytes arrive, and a message claiming more than 1 GiB is a protocol
//!   error before anything is allocated for it.
//! - A command interrupted midway (its future dropped) leaves the connection out of step with
//!   the server; every later command then fails with [`ReplError::Interrupted`] instead of
//!   reading the wrong answer.
//! - The snapshot exported by [`ReplicationClient::create_slot`] stays valid only until the next
//!   command on the same connection: import it before sending anything else.
//! - [`ReplError::is_transient`] is the whole retry policy: connection trouble, server restarts
//!   and a slot still held by a previous session pass; bad credentials, missing slots and bad
//!   options do not.

mod startup;
mod transport;
mod wire;

use std::fmt;
use std::io;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use self::transport::{Wire, WireError};
use self::wire::{Backend, message_name};
use crate::pg::connect::{ConnectError, DbUrl};
use crate::repl::Lsn;

pub use self::wire::{NulInCommand, ProtocolError, ServerError};

/// How long [`ReplicationStream::finish`] waits for the server to end the stream.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);

/// A result row of the simple query protocol, every column as text (`None` for NULL).
pub type Row = Vec<Option<String>>;

/// What `IDENTIFY_SYSTEM` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    /// The cluster's system identifier (as `pg_control_system()` shows it).
    pub systemid: String,
    /// The current timeline.
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The database the connection is bound to.
    pub dbname: Option<String>,
}

/// What `CREATE_REPLICATION_SLOT` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// The slot's name.
    pub slot_name: String,
    /// The first position the slot will stream: everything committed before it is in the
    /// exported snapshot, everything after it comes through the slot.
    pub consistent_point: Lsn,
    /// The exported snapshot, for `SET TRANSACTION SNAPSHOT`; valid until the next command on
    /// the connection that created the slot.
    pub snapshot_name: Option<String>,
}

/// One message of a logical replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// A piece of decoded WAL (for pgoutput: one pgoutput message).
    XLogData {
        /// Where the data starts in the WAL (0/0 for some pgoutput messages).
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The server's clock when sending, µs since 2000-01-01.
        server_time: i64,
        /// The plugin's message.
        data: Bytes,
    },
    /// The server's heartbeat.
    Keepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The server's clock when sending, µs since 2000-01-01.
        server_time: i64,
        /// The server will drop the connection unless a status update comes soon
        /// (`wal_sender_timeout`): answer with [`ReplicationStream::send_status`].
        reply_requested: bool,
    },
}

/// Why a replication connection or command failed. Messages name the server (host:port/db),
/// never the password.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    /// Could not connect or authenticate.
    #[error(transparent)]
    Connect(Box<ConnectError>),
    /// The server answered a command with an error.
    #[error("{what} failed on {target}")]
    Server {
        /// The command, e.g. `DROP_REPLICATION_SLOT "orders"`.
        what: String,
        /// host:port/dbname.
        target: String,
        /// The server's error, with its SQLSTATE.
        #[source]
        source: Box<ServerError>,
    },
    /// The server sent something the protocol does not allow.
    #[error("the server at {target} broke the replication protocol while {what}")]
    Protocol {
        /// What the connection was doing.
        what: String,
        /// host:port/dbname.
        target: String,
        /// What was wrong.
        #[source]
        source: ProtocolError,
    },
    /// The connection broke.
    #[error("lost the replication connection to {target} while {what}")]
    ConnectionLost {
        /// What the connection was doing.
        what: String,
        /// host:port/dbname.
        target: String,
        /// The socket's error (`UnexpectedEof` when the server closed it).
        #[source]
        source: io::Error,
    },
    /// The server did not answer in time.
    #[error("{target} did not answer within {} s while {what}", .after.as_secs())]
    TimedOut {
        /// What the connection was doing.
        what: String,
        /// host:port/dbname.
        target: String,
        /// How long bite-sync waited.
        after: Duration,
    },
    /// A command's arguments cannot be sent.
    #[error("cannot send {what}")]
    InvalidInput {
        /// The command.
        what: String,
        /// What is wrong with it.
        #[source]
        source: NulInCommand,
    },
    /// An earlier command was interrupted midway, so the connection no longer knows which
    /// answer belongs to which command.
    #[error(
        "cannot run {what} on {target}: an earlier command on this connection was interrupted \
         midway; open a new connection"
    )]
    Interrupted {
        /// The command refused.
        what: String,
        /// host:port/dbname.
        target: String,
    },
}

/// SQLSTATEs that pass on their own: the server shutting down or restarting, full, or the slot
/// still held by a previous session the server has not noticed is gone.
const TRANSIENT_SQLSTATES: [&str; 5] = [
    "57P01", // admin_shutdown
    "57P02", // crash_shutdown
    "57P03", // cannot_connect_now
    "53300", // too_many_connections
    "55006", // object_in_use: replication slot is active
];

impl From<ConnectError> for ReplError {
    fn from(error: ConnectError) -> ReplError {
        ReplError::Connect(Box::new(error))
    }
}

impl ReplError {
    /// Whether retrying later (on a new connection) can succeed with nothing changed:
    /// connection lost or refused, timeouts, server shutdown/startup, too many connections, a
    /// slot still active. Authentication failures, missing slots and bad options are not.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplError::Connect(error) => error.is_transient(),
            ReplError::Server { source, .. } => {
                TRANSIENT_SQLSTATES.contains(&source.code.as_str()) || source.code.starts_with("08")
            }
            ReplError::ConnectionLost { .. } | ReplError::TimedOut { .. } => true,
            // A new connection starts in step again.
            ReplError::Interrupted { .. } => true,
            ReplError::Protocol { .. } | ReplError::InvalidInput { .. } => false,
        }
    }

    /// The server's SQLSTATE, when the server refused (a command, or the connection itself).
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplError::Server { source, .. } => Some(&source.code),
            ReplError::Connect(error) => match &**error {
                ConnectError::Connect {
                    source: Some(source),
                    ..
                } => source
                    .get_ref()
                    .downcast_ref::<ServerError>()
                    .map(|error| error.code.as_str()),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Turns the socket's failure into the command's error.
fn wire_error(target: &str, what: &str, error: WireError) -> ReplError {
    match error {
        WireError::Io(source) => ReplError::ConnectionLost {
            what: what.to_owned(),
            target: target.to_owned(),
            source,
        },
        WireError::Protocol(source) => ReplError::Protocol {
            what: what.to_owned(),
            target: target.to_owned(),
            source,
        },
    }
}

fn protocol_error(target: &str, what: &str, source: ProtocolError) -> ReplError {
    ReplError::Protocol {
        what: what.to_owned(),
        target: target.to_owned(),
        source,
    }
}

fn log_notice(target: &str, body: &postgres_protocol::message::backend::NoticeResponseBody) {
    if let Ok(notice) = ServerError::parse(body.fields()) {
        tracing::debug!(%target, %notice, "server notice on the replication connection");
    }
}

/// A `replication=database` connection, ready for replication commands.
pub struct ReplicationClient {
    wire: Wire,
    target: String,
    server_version_num: u32,
    /// A command was sent and its answer not read to the end (its future was dropped).
    busy: bool,
}

impl fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationClient")
            .field("target", &self.target)
            .field("server_version_num", &self.server_version_num)
            .field("busy", &self.busy)
            .finish_non_exhaustive()
    }
}

impl ReplicationClient {
    /// Connects with `replication=database` to the URL's database: TLS per `sslmode`, TCP
    /// keepalives, `connect_timeout` (10 s by default) over the whole startup,
    /// `application_name` "bite-sync" unless the URL sets one, `client_encoding` UTF8.
    pub async fn connect(url: &DbUrl) -> Result<ReplicationClient, ReplError> {
        let started = startup::connect(url).await?;
        let version = started
            .parameters
            .get("server_version")
            .map(String::as_str)
            .unwrap_or_default();
        let server_version_num = wire::server_version_num(version).unwrap_or(0);
        tracing::debug!(target = %url.target(), server_version = %version, "replication connection ready");
        Ok(ReplicationClient {
            wire: started.wire,
            target: url.target(),
            server_version_num,
            busy: false,
        })
    }

    /// The server's version as `server_version_num` (150004 for 15.4), from the
    /// `server_version` it reported at startup; 0 if it reported none that parses.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// `IDENTIFY_SYSTEM`: the cluster's identifier, timeline, WAL position and database.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, ReplError> {
        const WHAT: &str = "IDENTIFY_SYSTEM";
        let rows = self.command(WHAT, "IDENTIFY_SYSTEM").await?;
        let [systemid, timeline, xlogpos, dbname] = self.single_row(WHAT, rows, 4)?;
        let shape = |problem: String| {
            protocol_error(
                &self.target,
                WHAT,
                ProtocolError::UnexpectedResult {
                    command: WHAT,
                    problem,
                },
            )
        };
        let timeline = timeline.as_deref().unwrap_or_default();
        let xlogpos = xlogpos.as_deref().unwrap_or_default();
        Ok(SystemInfo {
            systemid: systemid.ok_or_else(|| shape("a NULL systemid".to_owned()))?,
            timeline: timeline
                .parse()
                .map_err(|_| shape(format!("the timeline {timeline:?}")))?,
            xlogpos: xlogpos
                .parse()
                .map_err(|_| shape(format!("the WAL position {xlogpos:?}")))?,
            dbname,
        })
    }

    /// Runs one command with the simple query protocol and returns its rows as text. An error
    /// keeps the server's SQLSTATE ([`ReplError::code`]). The SQL is never shown in errors.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, ReplError> {
        self.command("a query", sql).await
    }

    /// `CREATE_REPLICATION_SLOT "name" [TEMPORARY] LOGICAL pgoutput` with an exported snapshot
    /// (PG15+: `(SNAPSHOT 'export')`; PG14 and older: `EXPORT_SNAPSHOT`). The snapshot stays
    /// valid until the next command on this connection.
    pub async fn create_slot(
        &mut self,
        name: &str,
        temporary: bool,
    ) -> Result<CreatedSlot, ReplError> {
        let what = format!("CREATE_REPLICATION_SLOT \"{name}\"");
        let sql = wire::create_slot_command(name, temporary, self.server_version_num)
            .map_err(|source| invalid(&what, source))?;
        let rows = self.command(&what, &sql).await?;
        const COMMAND: &str = "CREATE_REPLICATION_SLOT";
        let [slot_name, consistent_point, snapshot_name, _plugin] =
            self.single_row(COMMAND, rows, 4)?;
        let consistent_point = consistent_point.unwrap_or_default();
        let shape = |problem: String| {
            protocol_error(
                &self.target,
                &what,
                ProtocolError::UnexpectedResult {
                    command: COMMAND,
                    problem,
                },
            )
        };
        Ok(CreatedSlot {
            slot_name: slot_name.ok_or_else(|| shape("a NULL slot name".to_owned()))?,
            consistent_point: consistent_point
                .parse()
                .map_err(|_| shape(format!("the consistent point {consistent_point:?}")))?,
            snapshot_name,
        })
    }

    /// `DROP_REPLICATION_SLOT "name" WAIT`: waits while another session still uses the slot
    /// (PG13+). A missing slot fails with SQLSTATE 42704.
    pub async fn drop_slot(&mut self, name: &str) -> Result<(), ReplError> {
        let what = format!("DROP_REPLICATION_SLOT \"{name}\"");
        let sql = wire::drop_slot_command(name, self.server_version_num)
            .map_err(|source| invalid(&what, source))?;
        self.command(&what, &sql).await.map(drop)
    }

    /// `START_REPLICATION SLOT "slot" LOGICAL <start> (options...)`: option names are quoted as
    /// identifiers, values as literals (`("proto_version", "2")` → `"proto_version" '2'`). The
    /// connection becomes the stream.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, ReplError> {
        let what = format!("START_REPLICATION SLOT \"{slot}\" from {start}");
        let sql = wire::start_replication_command(slot, start, options)
            .map_err(|source| invalid(&what, source))?;
        self.send_query(&what, &sql).await?;
        match self.read(&what).await? {
            Backend::CopyBothResponse => {}
            Backend::Message(Message::ErrorResponse(body)) => {
                return Err(self.server_error(&what, &body));
            }
            Backend::Message(other) => {
                return Err(self.unexpected(&what, &other, "starting to stream"));
            }
        }
        tracing::debug!(target = %self.target, %slot, %start, "replication stream started");
        Ok(ReplicationStream {
            wire: self.wire,
            target: self.target,
            server_done: false,
            client_done: false,
        })
    }

    /// Sends `sql` and collects its rows up to ReadyForQuery. A server error is kept and
    /// returned once ReadyForQuery shows the connection is ready again.
    async fn command(&mut self, what: &str, sql: &str) -> Result<Vec<Row>, ReplError> {
        self.send_query(what, sql).await?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            let message = match self.read(what).await? {
                Backend::Message(message) => message,
                Backend::CopyBothResponse => {
                    return Err(protocol_error(
                        &self.target,
                        what,
                        ProtocolError::Unexpected {
                            got: "CopyBothResponse",
                            during: "running a command (use start_replication to stream)",
                        },
                    ));
                }
            };
            match message {
                Message::RowDescription(_)
                | Message::CommandComplete(_)
                | Message::EmptyQueryResponse => {}
                Message::DataRow(row) => rows.push(wire::row_text(&row).map_err(|source| {
                    protocol_error(
                        &self.target,
                        what,
                        ProtocolError::Malformed { tag: 'D', source },
                    )
                })?),
                Message::ErrorResponse(body) => {
                    failure.get_or_insert(self.server_error(what, &body));
                }
                Message::ReadyForQuery(_) => {
                    self.busy = false;
                    return match failure {
                        Some(error) => Err(error),
                        None => Ok(rows),
                    };
                }
                other => return Err(self.unexpected(what, &other, "running a command")),
            }
        }
    }

    async fn send_query(&mut self, what: &str, sql: &str) -> Result<(), ReplError> {
        if self.busy {
            return Err(ReplError::Interrupted {
                what: what.to_owned(),
                target: self.target.clone(),
            });
        }
        frontend::query(sql, self.wire.queue()).map_err(|_| {
            invalid(
                what,
                NulInCommand {
                    what: "the command text",
                },
            )
        })?;
        // Cleared by the ReadyForQuery that ends the answer.
        self.busy = true;
        self.wire
            .flush()
            .await
            .map_err(|error| wire_error(&self.target, what, error))
    }

    /// The next message, skipping notices and parameter changes.
    async fn read(&mut self, what: &str) -> Result<Backend, ReplError> {
        loop {
            match self.wire.read().await {
                Ok(Backend::Message(Message::NoticeResponse(body))) => {
                    log_notice(&self.target, &body);
                }
                Ok(Backend::Message(Message::ParameterStatus(_))) => {}
                Ok(backend) => return Ok(backend),
                Err(error) => return Err(wire_error(&self.target, what, error)),
            }
        }
    }

    fn single_row<const N: usize>(
        &self,
        command: &'static str,
        rows: Vec<Row>,
        columns: usize,
    ) -> Result<[Option<String>; N], ReplError> {
        let problem = match rows.as_slice() {
            [row] if row.len() >= columns => None,
            [row] => Some(format!("{} columns instead of {columns}", row.len())),
            rows => Some(format!("{} rows instead of 1", rows.len())),
        };
        if let Some(problem) = problem {
            return Err(protocol_error(
                &self.target,
                command,
                ProtocolError::UnexpectedResult { command, problem },
            ));
        }
        let mut row = rows.into_iter().next().unwrap_or_default().into_iter();
        Ok(std::array::from_fn(|_| row.next().flatten()))
    }

    fn server_error(
        &self,
        what: &str,
        body: &postgres_protocol::message::backend::ErrorResponseBody,
    ) -> ReplError {
        match ServerError::parse(body.fields()) {
            Ok(source) => ReplError::Server {
                what: what.to_owned(),
                target: self.target.clone(),
                source: Box::new(source),
            },
            Err(source) => protocol_error(
                &self.target,
                what,
                ProtocolError::Malformed { tag: 'E', source },
            ),
        }
    }

    fn unexpected(&self, what: &str, message: &Message, during: &'static str) -> ReplError {
        protocol_error(
            &self.target,
            what,
            ProtocolError::Unexpected {
                got: message_name(message),
                during,
            },
        )
    }
}

fn invalid(what: &str, source: NulInCommand) -> ReplError {
    ReplError::InvalidInput {
        what: what.to_owned(),
        source,
    }
}

/// A running `START_REPLICATION`: messages from the server, status updates to it.
pub struct ReplicationStream {
    wire: Wire,
    target: String,
    /// The server sent CopyDone.
    server_done: bool,
    /// We sent CopyDone.
    client_done: bool,
}

impl fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("target", &self.target)
            .field("server_done", &self.server_done)
            .field("client_done", &self.client_done)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    /// The next message; `Ok(None)` once the server has ended the stream (CopyDone).
    /// Cancel-safe: dropping the future (in `tokio::select!`) loses nothing, the next call
    /// continues where it stopped. Notices and parameter changes are skipped.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplError> {
        const WHAT: &str = "reading the replication stream";
        if self.server_done {
            return Ok(None);
        }
        loop {
            let message = match self.wire.read().await {
                Ok(Backend::Message(message)) => message,
                Ok(Backend::CopyBothResponse) => {
                    return Err(protocol_error(
                        &self.target,
                        WHAT,
                        ProtocolError::Unexpected {
                            got: "CopyBothResponse",
                            during: "streaming",
                        },
                    ));
                }
                Err(error) => return Err(wire_error(&self.target, WHAT, error)),
            };
            match message {
                Message::CopyData(body) => {
                    return wire::parse_replication_message(body.into_bytes())
                        .map(Some)
                        .map_err(|source| protocol_error(&self.target, WHAT, source));
                }
                Message::CopyDone => {
                    self.server_done = true;
                    return Ok(None);
                }
                Message::NoticeResponse(body) => log_notice(&self.target, &body),
                Message::ParameterStatus(_) => {}
                Message::ErrorResponse(body) => {
                    return Err(match ServerError::parse(body.fields()) {
                        Ok(source) => ReplError::Server {
                            what: "streaming".to_owned(),
                            target: self.target.clone(),
                            source: Box::new(source),
                        },
                        Err(source) => protocol_error(
                            &self.target,
                            WHAT,
                            ProtocolError::Malformed { tag: 'E', source },
                        ),
                    });
                }
                other => {
                    return Err(protocol_error(
                        &self.target,
                        WHAT,
                        ProtocolError::Unexpected {
                            got: message_name(&other),
                            during: "streaming",
                        },
                    ));
                }
            }
        }
    }

    /// Sends a standby status update: the positions written, flushed and applied (the slot's
    /// `confirmed_flush_lsn` follows `flush`), this machine's clock, and whether the server
    /// should answer with a keepalive at once. If an earlier send was interrupted, its rest
    /// goes out first.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplError> {
        wire::put_standby_status(
            write,
            flush,
            apply,
            wire::pg_time(SystemTime::now()),
            reply_requested,
            self.wire.queue(),
        );
        self.wire
            .flush()
            .await
            .map_err(|error| wire_error(&self.target, "sending a standby status update", error))
    }

    /// Ends the stream: sends CopyDone, reads (and drops) what the server still sends until
    /// ReadyForQuery or the end of the connection, then says goodbye (Terminate) and closes.
    /// Gives up after 30 s with [`ReplError::TimedOut`].
    pub async fn finish(mut self) -> Result<(), ReplError> {
        const WHAT: &str = "ending the replication stream";
        let target = self.target.clone();
        match tokio::time::timeout(FINISH_TIMEOUT, self.end()).await {
            Ok(result) => result,
            Err(_) => Err(ReplError::TimedOut {
                what: WHAT.to_owned(),
                target,
                after: FINISH_TIMEOUT,
            }),
        }
    }

    async fn end(&mut self) -> Result<(), ReplError> {
        const WHAT: &str = "ending the replication stream";
        if !self.client_done {
            frontend::copy_done(self.wire.queue());
            self.client_done = true;
            if let Err(error) = self.wire.flush().await {
                return match error {
                    // Already gone: nothing left to end.
                    WireError::Io(_) => Ok(()),
                    error => Err(wire_error(&self.target, WHAT, error)),
                };
            }
        }
        loop {
            let message = match self.wire.read().await {
                Ok(Backend::Message(message)) => message,
                Ok(Backend::CopyBothResponse) => continue,
                Err(WireError::Io(error)) if error.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(());
                }
                Err(error) => return Err(wire_error(&self.target, WHAT, error)),
            };
            match message {
                Message::ReadyForQuery(_) => break,
                Message::CopyDone => self.server_done = true,
                Message::ErrorResponse(body) => {
                    if let Ok(source) = ServerError::parse(body.fields()) {
                        return Err(ReplError::Server {
                            what: WHAT.to_owned(),
                            target: self.target.clone(),
                            source: Box::new(source),
                        });
                    }
                }
                // CopyData still in flight, CommandComplete, notices: nothing to act on.
                _ => {}
            }
        }
        frontend::terminate(self.wire.queue());
        // The server may close first; that is the end we wanted anyway.
        let _ = self.wire.flush().await;
        let _ = self.wire.shutdown().await;
        Ok(())
    }
}
