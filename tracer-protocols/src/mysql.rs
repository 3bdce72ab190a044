//! MySQL / MariaDB client/server protocol decoding, both directions of one connection.
//!
//! A [`MysqlDecoder`] is fed the [`Chunk`]s the client sent ([`MysqlDecoder::client`])
//! and those the server sent ([`MysqlDecoder::server`]), interleaved in timestamp
//! order, and emits one [`DbCall`] per statement the client ran once its response is
//! complete. On the way it tracks what the pool tracker needs: the transaction status,
//! the current database and the user.
//!
//! # What becomes a call
//!
//! - `COM_QUERY`: one call per command, however many result sets it returns
//!   (multi-statements, `CALL`). `query_text` is the SQL as sent (cut at
//!   [`MAX_QUERY_TEXT_BYTES`]), `operation` its first keyword in upper case (comments
//!   and opening parentheses skipped).
//! - `COM_STMT_EXECUTE` (and MariaDB's `COM_STMT_BULK_EXECUTE`): one call with the text
//!   of the `COM_STMT_PREPARE` whose `COM_STMT_PREPARE_OK` returned that statement id
//!   (MariaDB's id `0xFFFFFFFF`: the last one prepared). A statement prepared before
//!   the decoder joined the connection, or forgotten (see [`MAX_PREPARED_STATEMENTS`]),
//!   gives a call with neither text nor operation.
//! - `COM_STMT_PREPARE`: no call when it succeeds (its executions are the calls); a
//!   call with the error when it fails, since no execution will follow.
//! - Housekeeping makes no call: `COM_INIT_DB` (the namespace changes when the server
//!   accepts it), `COM_PING`, `COM_QUIT`, `COM_STATISTICS`, `COM_STMT_CLOSE`,
//!   `COM_STMT_RESET`, `COM_STMT_FETCH`, `COM_STMT_SEND_LONG_DATA`, `COM_CHANGE_USER`,
//!   `COM_RESET_CONNECTION`, `COM_SET_OPTION` and the other administrative commands.
//!
//! `rows` is the number of rows of all the result sets of the response when it had
//! any, else the sum of the affected rows of its OK packets; `None` after an error.
//! `error_code` is the ERR packet's error number in decimal; its message is never kept.
//! Each call carries the namespace in effect when its command was sent.
//!
//! # Connection state
//!
//! - [`MysqlDecoder::tx_status`]: `SERVER_STATUS_IN_TRANS` of the last status flags
//!   seen (server greeting, OK and EOF packets).
//! - [`MysqlDecoder::namespace`]: the database of the handshake response
//!   (`CLIENT_CONNECT_WITH_DB`), then of an accepted `COM_INIT_DB` or `USE db`, or the
//!   schema the server reports through session-state tracking (`CLIENT_SESSION_TRACK`).
//! - [`MysqlDecoder::user`]: from the handshake response or `COM_CHANGE_USER`.
//!
//! # Protocol coverage
//!
//! Packets of 16 MiB - 1 bytes continued by the next packet are joined into one
//! payload. The connection phase (handshake v10, HandshakeResponse41 and 320, auth
//! switch and more-data exchanges until the server's OK or ERR) sets the negotiated
//! capabilities. Whether EOF packets are sent (`CLIENT_DEPRECATE_EOF`) is taken from
//! the handshake, or inferred when the decoder joined mid-connection: a `0xFE` packet
//! shorter than 7 bytes is an EOF, a longer one (below 16 MiB) an OK. Also handled:
//! MariaDB's metadata-less column counts (`MARIADB_CLIENT_CACHE_METADATA`) and MySQL's
//! optional metadata, MySQL 8 query attributes (`CLIENT_QUERY_ATTRIBUTES`), server-side
//! cursors, `LOAD DATA LOCAL INFILE` uploads, MariaDB progress reports and pipelined
//! commands (answered in order). After an `SSLRequest`, once compression is negotiated,
//! or after a binlog dump request, the rest of the connection is ignored silently
//! ([`MysqlDecoder::stopped`]).
//!
//! # Joining mid-connection
//!
//! A new decoder waits for the server greeting ([`looks_like_server_greeting`]) or for
//! a client chunk that begins with a plausible command (sequence id 0, a known command
//! byte and a length that fits it). The server direction is then trusted from the
//! first chunk that begins with a plausible answer to that command.
//!
//! # Capture gaps
//!
//! Packet lengths let the decoder skip uncaptured bytes exactly: a gap inside a
//! payload (a large row, a long query) costs nothing but the uncaptured bytes of the
//! statement text. A gap that hides a packet header (or the first byte of a packet
//! that must be read) loses that direction's sync, counted as one [`MysqlError`]:
//! - client side: the command in flight still completes; client chunks are skipped
//!   until one begins with a plausible command;
//! - server side: the calls in flight are dropped; server chunks are skipped until the
//!   client sends a command and a server chunk begins with a plausible answer to it.
//!
//! # Errors
//!
//! Malformed input yields a [`MysqlError`] and loses sync the same way. Errors and
//! `Debug` output never contain SQL text, names or any other captured bytes.

use std::collections::VecDeque;
use std::fmt;
use std::mem;

use crate::Chunk;
use crate::bounded_text as kept_text;
use crate::db::{DbCall, DbSystem, TxStatus};

/// Longest SQL text kept per statement, in bytes (cut at a UTF-8 boundary).
pub const MAX_QUERY_TEXT_BYTES: usize = 4096;
/// Most prepared statements remembered per connection; the oldest are forgotten first.
pub const MAX_PREPARED_STATEMENTS: usize = 1024;
/// Most statement text bytes remembered per connection; the oldest are forgotten first.
pub const MAX_PREPARED_TEXT_BYTES: usize = 256 * 1024;
/// Most commands awaiting a response (pipelined); the oldest is dropped beyond it and
/// counted by [`MysqlDecoder::dropped_commands`].
pub const MAX_PENDING_COMMANDS: usize = 64;
/// Longest user or database name kept, in bytes (cut at a UTF-8 boundary).
pub const MAX_NAME_BYTES: usize = 256;
/// Longest operation name: a longer first word is not a keyword.
const MAX_OPERATION_BYTES: usize = 32;
/// Most query attributes (MySQL 8) walked over to find the SQL text.
const MAX_QUERY_ATTRIBUTES: usize = 64;
/// A packet of this length is continued by the next one.
const MAX_PACKET_LEN: usize = 0xFF_FFFF;
/// Payload bytes kept of a client command: the command byte, room for query
/// attributes, and the SQL text kept.
const COMMAND_KEEP: usize = 1 + 1024 + MAX_QUERY_TEXT_BYTES;
/// Payload bytes kept of handshake packets and of server responses that are read
/// (OK with session state, ERR, EOF, column count, prepare OK).
const PACKET_KEEP: usize = 1024;
/// Payload bytes kept of rows and definitions: enough to recognise a terminator.
const ROW_KEEP: usize = 64;
/// Kept buffers that grew beyond this are freed after use.
const BUFFER_KEPT_BYTES: usize = 8192;

// Capability flags (MariaDB's extended capabilities are shifted up by 32).
/// `CLIENT_LONG_PASSWORD`; MariaDB calls it `CLIENT_MYSQL`: when unset on both sides the
/// handshake carries MariaDB's extended capabilities.
const CLIENT_MYSQL: u64 = 1;
const CLIENT_CONNECT_WITH_DB: u64 = 1 << 3;
const CLIENT_COMPRESS: u64 = 1 << 5;
const CLIENT_PROTOCOL_41: u64 = 1 << 9;
const CLIENT_SSL: u64 = 1 << 11;
const CLIENT_SECURE_CONNECTION: u64 = 1 << 15;
const CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA: u64 = 1 << 21;
const CLIENT_DEPRECATE_EOF: u64 = 1 << 24;
const CLIENT_ZSTD_COMPRESSION_ALGORITHM: u64 = 1 << 26;
const CLIENT_QUERY_ATTRIBUTES: u64 = 1 << 27;

// Server status flags.
const SERVER_STATUS_IN_TRANS: u16 = 0x0001;
const SERVER_MORE_RESULTS_EXISTS: u16 = 0x0008;
const SERVER_STATUS_CURSOR_EXISTS: u16 = 0x0040;
const SERVER_SESSION_STATE_CHANGED: u16 = 0x4000;
const SESSION_TRACK_SCHEMA: u8 = 1;
/// MariaDB sends progress reports as ERR packets with this error number.
const PROGRESS_REPORT_CODE: u16 = 0xFFFF;
/// MariaDB: execute the statement prepared last.
const LAST_PREPARED_STATEMENT: u32 = 0xFFFF_FFFF;

// Command bytes.
const COM_QUIT: u8 = 0x01;
const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_FIELD_LIST: u8 = 0x04;
const COM_CREATE_DB: u8 = 0x05;
const COM_DROP_DB: u8 = 0x06;
const COM_REFRESH: u8 = 0x07;
const COM_SHUTDOWN: u8 = 0x08;
const COM_STATISTICS: u8 = 0x09;
const COM_PROCESS_INFO: u8 = 0x0a;
const COM_PROCESS_KILL: u8 = 0x0c;
const COM_DEBUG: u8 = 0x0d;
const COM_PING: u8 = 0x0e;
const COM_CHANGE_USER: u8 = 0x11;
const COM_BINLOG_DUMP: u8 = 0x12;
const COM_REGISTER_SLAVE: u8 = 0x15;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
const COM_STMT_CLOSE: u8 = 0x19;
const COM_STMT_RESET: u8 = 0x1a;
const COM_SET_OPTION: u8 = 0x1b;
const COM_STMT_FETCH: u8 = 0x1c;
const COM_BINLOG_DUMP_GTID: u8 = 0x1e;
const COM_RESET_CONNECTION: u8 = 0x1f;
const COM_STMT_BULK_EXECUTE: u8 = 0xfa;

/// One direction of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to server.
    Client,
    /// Server to client.
    Server,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Client => "client",
            Direction::Server => "server",
        })
    }
}

/// Why a decoder stopped decoding a connection (later chunks are ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The client sent an SSLRequest: the rest is TLS.
    Tls,
    /// Compression (`CLIENT_COMPRESS` or zstd) was negotiated.
    Compressed,
    /// The client asked for a binlog stream (`COM_BINLOG_DUMP`, replication).
    Replication,
}

/// What made a chunk undecodable. No variant carries captured bytes.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum MysqlError {
    #[error(
        "a {direction} packet header was not captured (capture gap): decoding of that direction resumes at a chunk that starts a packet; raise the capture size to avoid it"
    )]
    HeaderInGap { direction: Direction },
    #[error(
        "the {what} of a {direction} packet was not captured (capture gap), so the stream cannot be followed; decoding of that direction resumes at a chunk that starts a packet"
    )]
    ContentInGap {
        direction: Direction,
        what: &'static str,
    },
    #[error(
        "malformed {packet} from the {direction}: {reason}; the stream is another protocol, corrupted, or was joined mid-packet"
    )]
    Malformed {
        direction: Direction,
        packet: &'static str,
        reason: &'static str,
    },
    #[error("client sent an unknown command byte; the stream is another protocol or out of sync")]
    UnknownCommand,
    #[error(
        "client packet with sequence id {seq} where a command (sequence id 0) was expected; the stream is out of sync"
    )]
    UnexpectedSequence { seq: u8 },
    #[error(
        "server greeting uses protocol version {version}; only version 10 (MySQL 3.21 and later) is decoded"
    )]
    UnsupportedProtocol { version: u8 },
}

/// Where the connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing decoded yet: waiting for the server greeting or, when the decoder joined
    /// an established connection, a client chunk that starts a command.
    Start,
    /// A chunk that looks like the greeting arrived; its packet is being read.
    Greeting,
    /// Greeting read; waiting for the client's handshake response.
    Handshake,
    /// Authentication exchange, until the server's OK or ERR.
    Auth,
    /// Commands and their responses.
    Command,
    /// Decoding ended: every later chunk is ignored.
    Stopped(StopReason),
}

/// What the server is expected to send next for one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Response {
    /// The first packet of a result: OK, ERR, LOCAL INFILE request, EOF or column count.
    Result,
    /// Column definitions to skip.
    Columns { left: u64 },
    /// After the column definitions: an EOF unless `CLIENT_DEPRECATE_EOF`.
    ColumnsEnd,
    /// Rows, until EOF/OK or ERR.
    Rows,
    /// LOCAL INFILE: the client uploads, then the server answers OK or ERR.
    Infile,
    /// The answer to `COM_STMT_PREPARE`.
    PrepareOk,
    /// Parameter definitions of a prepared statement.
    PrepareParams { left: u64, columns: u64 },
    /// After the parameter definitions: an EOF unless `CLIENT_DEPRECATE_EOF`.
    PrepareParamsEnd { columns: u64 },
    /// Column definitions of a prepared statement.
    PrepareColumns { left: u64 },
    /// After them: an EOF unless `CLIENT_DEPRECATE_EOF` (the response may be over).
    PrepareColumnsEnd,
    /// One packet, whatever it holds (`COM_STATISTICS`).
    OnePacket,
    /// `COM_FIELD_LIST`: definitions until EOF or ERR.
    FieldList,
    /// `COM_CHANGE_USER`: authentication exchange until OK or ERR.
    Auth,
}

/// What a command is, as far as calls and connection state go.
enum Command {
    Query {
        text: String,
        operation: Option<String>,
        /// The database of a `USE db` statement.
        use_db: Option<String>,
    },
    Prepare {
        text: String,
        operation: Option<String>,
    },
    Execute {
        /// The statement id as sent (`0xFFFFFFFF`: the last one prepared).
        id: u32,
        /// Looked up when sent; if unknown then, again when answered (the prepare
        /// may have been pipelined just before).
        text: Option<String>,
        operation: Option<String>,
    },
    InitDb {
        db: String,
    },
    ChangeUser {
        user: Option<String>,
        db: Option<String>,
    },
    ResetConnection,
    /// Makes no call and changes no state.
    Other,
}

impl Command {
    fn kind(&self) -> &'static str {
        match self {
            Command::Query { .. } => "query",
            Command::Prepare { .. } => "prepare",
            Command::Execute { .. } => "execute",
            Command::InitDb { .. } => "init_db",
            Command::ChangeUser { .. } => "change_user",
            Command::ResetConnection => "reset_connection",
            Command::Other => "other",
        }
    }

    fn makes_call(&self) -> bool {
        matches!(
            self,
            Command::Query { .. } | Command::Prepare { .. } | Command::Execute { .. }
        )
    }
}

/// A command sent and not yet fully answered.
struct Pending {
    command: Command,
    response: Response,
    /// Timestamp of the chunk holding the command's first byte.
    start_ns: u64,
    /// Sequence id of the server's first answer packet; `None` if unknown (the end of
    /// the command was not captured).
    answer_seq: Option<u8>,
    /// The namespace when the command was sent (for commands that make calls).
    namespace: Option<String>,
    /// Rows of all result sets so far.
    rows: u64,
    /// Affected rows of all OK packets so far.
    affected: u64,
    result_set: bool,
    error: Option<u16>,
    /// An OK of this response reported the schema (session-state tracking).
    schema_reported: bool,
}

impl fmt::Debug for Pending {
    // Not derived: the command holds SQL text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending")
            .field("command", &self.command.kind())
            .field("response", &self.response)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

/// What one response packet did to the command it answers.
enum Step {
    /// More packets follow.
    More,
    /// The response is complete with this packet.
    Done,
    /// The response was complete before this packet, which answers the next command.
    DoneBefore,
}

/// A statement remembered from its `COM_STMT_PREPARE_OK`.
struct Statement {
    id: u32,
    text: String,
    operation: Option<String>,
}

/// Decodes one MySQL/MariaDB connection. See the module docs.
pub struct MysqlDecoder {
    phase: Phase,
    client_rd: PacketReader,
    server_rd: PacketReader,
    /// A possible command start, while the client side waits for one.
    client_probe: StartProbe,
    /// A possible greeting or answer start, while the server side waits for one.
    server_probe: StartProbe,
    /// Server chunks are skipped until one starts the answer to a pending command.
    server_lost: bool,
    /// Capabilities from the greeting (MariaDB extended ones above bit 32).
    server_caps: Option<u64>,
    /// Capabilities from the handshake response.
    client_caps: Option<u64>,
    /// Whether EOF packets are replaced by OK packets; `None` until known.
    deprecate_eof: Option<bool>,
    /// Compression negotiated: stop once authentication succeeds.
    compress_after_auth: bool,
    /// The server asked for a LOCAL INFILE upload that the client has not ended yet.
    upload: bool,
    pending: VecDeque<Pending>,
    statements: VecDeque<Statement>,
    statement_bytes: usize,
    last_prepared: Option<u32>,
    dropped_commands: u64,
    tx: TxStatus,
    namespace: Option<String>,
    user: Option<String>,
}

impl Default for MysqlDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MysqlDecoder {
    // Not derived: names, statement texts and buffered packets are captured bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlDecoder")
            .field("phase", &self.phase)
            .field("client", &self.client_rd)
            .field("server", &self.server_rd)
            .field("server_lost", &self.server_lost)
            .field("server_caps", &self.server_caps)
            .field("client_caps", &self.client_caps)
            .field("deprecate_eof", &self.deprecate_eof)
            .field("upload", &self.upload)
            .field("pending", &self.pending)
            .field("statements", &self.statements.len())
            .field("dropped_commands", &self.dropped_commands)
            .field("tx", &self.tx)
            .field("has_namespace", &self.namespace.is_some())
            .field("has_user", &self.user.is_some())
            .finish()
    }
}

impl MysqlDecoder {
    pub fn new() -> Self {
        Self {
            phase: Phase::Start,
            client_rd: PacketReader::new(),
            server_rd: PacketReader::new(),
            client_probe: StartProbe::default(),
            server_probe: StartProbe::default(),
            server_lost: false,
            server_caps: None,
            client_caps: None,
            deprecate_eof: None,
            compress_after_auth: false,
            upload: false,
            pending: VecDeque::new(),
            statements: VecDeque::new(),
            statement_bytes: 0,
            last_prepared: None,
            dropped_commands: 0,
            tx: TxStatus::Unknown,
            namespace: None,
            user: None,
        }
    }

    /// Bytes the client sent: commands are queued, and their calls are pushed to `out`
    /// by [`Self::server`] when answered (no client bytes complete a call today; `out`
    /// lets the caller treat both directions alike).
    ///
    /// On `Err`, the client direction is out of sync: its chunks are skipped until one
    /// begins with a plausible command. Commands sent before stay pending.
    pub fn client(&mut self, chunk: &Chunk<'_>, out: &mut Vec<DbCall>) -> Result<(), MysqlError> {
        if matches!(self.phase, Phase::Stopped(_)) {
            return Ok(());
        }
        if self.phase != Phase::Start && !self.client_rd.is_lost() {
            return self.feed_client_checked(chunk, out);
        }
        if self.upload {
            // LOCAL INFILE data until the server answers: not commands.
            self.client_probe.clear();
            return Ok(());
        }
        if self.client_probe.offer(chunk, judge_command) != Offer::Accept {
            return Ok(());
        }
        if matches!(
            self.phase,
            Phase::Start | Phase::Greeting | Phase::Handshake
        ) {
            // Joined an established connection: the server side is trusted from the
            // first chunk that starts an answer to this command.
            self.phase = Phase::Command;
            self.server_rd.reset();
            self.server_probe.clear();
            self.server_lost = true;
        }
        self.client_rd.reset();
        let probe = mem::take(&mut self.client_probe);
        let mut result = Ok(());
        for (ts, bytes) in probe.segments() {
            result = self.feed_client_checked(&Chunk::whole(bytes, ts), out);
            if result.is_err() {
                break;
            }
        }
        self.client_probe = probe;
        self.client_probe.clear();
        result?;
        self.feed_client_checked(chunk, out)
    }

    /// Bytes the server sent. Completed calls are pushed to `out`, in order.
    ///
    /// On `Err`, calls completed earlier in the chunk are in `out`, the calls in flight
    /// are dropped, and server chunks are skipped until the client sends a command
    /// and a server chunk begins with a plausible answer to it.
    pub fn server(&mut self, chunk: &Chunk<'_>, out: &mut Vec<DbCall>) -> Result<(), MysqlError> {
        match self.phase {
            Phase::Stopped(_) => return Ok(()),
            Phase::Start => {
                if self.server_probe.offer(chunk, judge_greeting) != Offer::Accept {
                    return Ok(());
                }
                self.phase = Phase::Greeting;
                self.client_rd.reset();
                self.client_probe.clear();
            }
            _ if self.server_lost => {
                let Some(front) = self.pending.front() else {
                    self.server_probe.clear();
                    return Ok(());
                };
                match self.server_probe.offer(chunk, |b| judge_answer(b, front)) {
                    Offer::Accept => {}
                    Offer::Wait => return Ok(()),
                    Offer::Reject => {
                        // The answers to these commands began in chunks that were skipped.
                        self.pending.clear();
                        self.upload = false;
                        return Ok(());
                    }
                }
            }
            Phase::Command if self.pending.is_empty() => {
                // Nothing asked: an error before a close, or the answer to a command
                // that was not captured. Not read, so that a bogus length cannot make
                // the decoder swallow the next answer; that answer must start a chunk.
                self.server_lost = true;
                return Ok(());
            }
            _ => return self.feed_server_checked(chunk, out),
        }
        self.server_rd.reset();
        self.server_lost = false;
        let probe = mem::take(&mut self.server_probe);
        let mut result = Ok(());
        for (ts, bytes) in probe.segments() {
            result = self.feed_server_checked(&Chunk::whole(bytes, ts), out);
            if result.is_err() {
                break;
            }
        }
        self.server_probe = probe;
        self.server_probe.clear();
        result?;
        self.feed_server_checked(chunk, out)
    }

    fn feed_client_checked(
        &mut self,
        chunk: &Chunk<'_>,
        out: &mut Vec<DbCall>,
    ) -> Result<(), MysqlError> {
        let result = self.feed_client(chunk, out);
        if result.is_err() {
            self.client_rd.lose();
        }
        result
    }

    fn feed_server_checked(
        &mut self,
        chunk: &Chunk<'_>,
        out: &mut Vec<DbCall>,
    ) -> Result<(), MysqlError> {
        let result = self.feed_server(chunk, out);
        if result.is_err() {
            self.lose_server();
        } else if self.phase == Phase::Command
            && self.pending.is_empty()
            && self.server_rd.in_packet()
        {
            // Bytes after the last answer, cut by the end of the chunk.
            self.server_rd.lose();
            self.server_lost = true;
        }
        result
    }

    /// The transaction status the server last reported.
    pub fn tx_status(&self) -> TxStatus {
        self.tx
    }

    /// The current database, when known.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// The user the connection authenticated as, when known.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// True while a command awaits (the rest of) its response.
    /// Bytes the decoder holds between chunks (kept packet prefixes, prepared
    /// statement texts, commands not answered yet): what a global memory budget
    /// counts.
    pub fn held_bytes(&self) -> usize {
        self.client_rd.buf.len()
            + self.server_rd.buf.len()
            + self.statement_bytes
            + self.pending.len() * std::mem::size_of::<Pending>()
    }

    pub fn in_flight(&self) -> bool {
        !self.pending.is_empty()
    }

    /// True once the client asked for TLS: the rest of the connection is not decoded.
    pub fn is_encrypted(&self) -> bool {
        self.phase == Phase::Stopped(StopReason::Tls)
    }

    /// The TLS library's plaintext of this connection starts, after the client's
    /// SSLRequest: the handshake response comes next, inside TLS (the greeting and
    /// the capabilities it offered are kept). Does nothing unless stopped for TLS.
    pub fn resume_in_plaintext(&mut self) {
        if !self.is_encrypted() {
            return;
        }
        self.client_rd.reset();
        self.server_rd.reset();
        self.client_probe.clear();
        self.server_probe.clear();
        self.phase = Phase::Handshake;
    }

    /// Why decoding stopped, if it did: later chunks are ignored, so the caller may
    /// stop feeding them.
    pub fn stopped(&self) -> Option<StopReason> {
        match self.phase {
            Phase::Stopped(reason) => Some(reason),
            _ => None,
        }
    }

    /// Commands dropped unanswered because more than [`MAX_PENDING_COMMANDS`] were
    /// pending (the server direction is probably not being fed).
    pub fn dropped_commands(&self) -> u64 {
        self.dropped_commands
    }

    /// The connection closed: forgets the commands awaiting a response and returns
    /// how many there were. The transaction status, namespace and user stay readable;
    /// a later chunk is decoded as the start of a new connection (or a joined one).
    pub fn finish(&mut self) -> usize {
        let forgotten = self.pending.len();
        self.pending.clear();
        self.upload = false;
        self.client_rd.reset();
        self.server_rd.reset();
        self.client_probe.clear();
        self.server_probe.clear();
        self.server_lost = false;
        if !matches!(self.phase, Phase::Stopped(_)) {
            self.phase = Phase::Start;
        }
        forgotten
    }

    // ---- client direction ------------------------------------------------------

    fn feed_client(&mut self, chunk: &Chunk<'_>, out: &mut Vec<DbCall>) -> Result<(), MysqlError> {
        let ts = chunk.ts_ns;
        let mut pos = 0usize;
        loop {
            if matches!(self.phase, Phase::Stopped(_)) {
                return Ok(());
            }
            let keep = self.client_keep();
            let Some(meta) = self.client_rd.next(chunk.bytes, &mut pos, ts, keep) else {
                break;
            };
            self.dispatch(Direction::Client, meta, out)?;
        }
        if chunk.gap() > 0 && !matches!(self.phase, Phase::Stopped(_)) {
            let (meta, lost) = self.client_rd.skip_gap(chunk.gap(), ts);
            if let Some(meta) = meta {
                self.dispatch(Direction::Client, meta, out)?;
            }
            if lost {
                return Err(MysqlError::HeaderInGap {
                    direction: Direction::Client,
                });
            }
        }
        Ok(())
    }

    /// Hands a completed packet, with its kept bytes, to the handler of its direction.
    fn dispatch(
        &mut self,
        direction: Direction,
        meta: PacketMeta,
        out: &mut Vec<DbCall>,
    ) -> Result<(), MysqlError> {
        let reader = match direction {
            Direction::Client => &mut self.client_rd,
            Direction::Server => &mut self.server_rd,
        };
        let head = mem::take(&mut reader.buf);
        let packet = Packet { meta, head: &head };
        let result = match direction {
            Direction::Client => self.on_client_packet(&packet),
            Direction::Server => self.on_server_packet(&packet, out),
        };
        let reader = match direction {
            Direction::Client => &mut self.client_rd,
            Direction::Server => &mut self.server_rd,
        };
        reader.recycle(head);
        result
    }

    fn client_keep(&self) -> usize {
        match self.phase {
            Phase::Handshake => PACKET_KEEP,
            Phase::Command if !self.upload => COMMAND_KEEP,
            _ => 0,
        }
    }

    fn on_client_packet(&mut self, pkt: &Packet<'_>) -> Result<(), MysqlError> {
        match self.phase {
            Phase::Handshake => self.on_handshake_response(pkt),
            Phase::Command => self.on_command(pkt),
            // Auth data, or bytes before the greeting: nothing to read.
            _ => Ok(()),
        }
    }

    fn on_handshake_response(&mut self, pkt: &Packet<'_>) -> Result<(), MysqlError> {
        let malformed = |reason| MysqlError::Malformed {
            direction: Direction::Client,
            packet: "handshake response",
            reason,
        };
        let mut r = Reader::new(pkt.head);
        let low = r
            .u16()
            .ok_or(malformed("shorter than its capability flags"))?;
        let mut caps = u64::from(low);
        if caps & CLIENT_PROTOCOL_41 != 0 {
            let high = r
                .u16()
                .ok_or(malformed("shorter than its capability flags"))?;
            caps |= u64::from(high) << 16;
        }
        if caps & CLIENT_SSL != 0 && pkt.meta.len <= 32 {
            // SSLRequest: the real handshake response follows inside TLS.
            self.phase = Phase::Stopped(StopReason::Tls);
            return Ok(());
        }
        let user;
        let mut db = None;
        if caps & CLIENT_PROTOCOL_41 != 0 {
            // max packet size, character set, 19 filler bytes, MariaDB capabilities.
            r.skip(4 + 1 + 19)
                .ok_or(malformed("shorter than its fixed fields"))?;
            let extended = r.u32().ok_or(malformed("shorter than its fixed fields"))?;
            if caps & CLIENT_MYSQL == 0 {
                caps |= u64::from(extended) << 32;
            }
            user = r.nul_str();
            let auth_ok = if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
                r.lenenc_bytes().is_some()
            } else if caps & CLIENT_SECURE_CONNECTION != 0 {
                r.u8().and_then(|n| r.bytes(usize::from(n))).is_some()
            } else {
                r.nul_str().is_some()
            };
            if auth_ok && caps & CLIENT_CONNECT_WITH_DB != 0 {
                db = r.nul_str();
            }
        } else {
            // HandshakeResponse320: 3-byte max packet size, user, auth[, db].
            r.skip(3)
                .ok_or(malformed("shorter than its fixed fields"))?;
            user = r.nul_str();
            if caps & CLIENT_CONNECT_WITH_DB != 0 && r.nul_str().is_some() {
                db = r.nul_str();
            }
        }
        self.client_caps = Some(caps);
        let negotiated = self.server_caps.map_or(caps, |server| server & caps);
        self.deprecate_eof = Some(negotiated & CLIENT_DEPRECATE_EOF != 0);
        self.compress_after_auth =
            negotiated & (CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION_ALGORITHM) != 0;
        if let Some(user) = user.filter(|u| !u.is_empty()) {
            self.user = Some(kept_text(user, MAX_NAME_BYTES));
        }
        if let Some(db) = db.filter(|d| !d.is_empty()) {
            self.namespace = Some(kept_text(db, MAX_NAME_BYTES));
        }
        self.phase = Phase::Auth;
        Ok(())
    }

    /// A client packet in the command phase.
    fn on_command(&mut self, pkt: &Packet<'_>) -> Result<(), MysqlError> {
        if self.upload {
            // LOCAL INFILE data; an empty packet ends it.
            if pkt.meta.len == 0 {
                self.upload = false;
            }
            return Ok(());
        }
        if pkt.meta.seq != 0 {
            let in_auth = self
                .pending
                .back()
                .is_some_and(|p| p.response == Response::Auth);
            if in_auth {
                // COM_CHANGE_USER authentication data.
                return Ok(());
            }
            return Err(MysqlError::UnexpectedSequence { seq: pkt.meta.seq });
        }
        let Some(&command) = pkt.head.first() else {
            return Err(if pkt.meta.len == 0 {
                MysqlError::Malformed {
                    direction: Direction::Client,
                    packet: "command",
                    reason: "empty packet",
                }
            } else {
                MysqlError::ContentInGap {
                    direction: Direction::Client,
                    what: "command byte",
                }
            });
        };
        let body = pkt.head.get(1..).unwrap_or_default();
        let truncated = |what| MysqlError::ContentInGap {
            direction: Direction::Client,
            what,
        };
        let short = |packet| MysqlError::Malformed {
            direction: Direction::Client,
            packet,
            reason: "too short",
        };
        let (cmd, response) = match command {
            COM_QUERY => {
                let sql = query_sql(body, self.query_attributes());
                let text = kept_text(sql, MAX_QUERY_TEXT_BYTES);
                let operation = operation(sql);
                let use_db = if operation.as_deref() == Some("USE") {
                    use_target(sql)
                } else {
                    None
                };
                (
                    Command::Query {
                        text,
                        operation,
                        use_db,
                    },
                    Response::Result,
                )
            }
            COM_STMT_PREPARE => (
                Command::Prepare {
                    text: kept_text(body, MAX_QUERY_TEXT_BYTES),
                    operation: operation(body),
                },
                Response::PrepareOk,
            ),
            COM_STMT_EXECUTE | COM_STMT_BULK_EXECUTE => {
                let id = Reader::new(body).u32().ok_or_else(|| {
                    if pkt.meta.cut {
                        truncated("statement id")
                    } else {
                        short("COM_STMT_EXECUTE")
                    }
                })?;
                let (text, operation) = if id == LAST_PREPARED_STATEMENT {
                    (None, None)
                } else {
                    self.statement_text(id)
                };
                (
                    Command::Execute {
                        id,
                        text,
                        operation,
                    },
                    Response::Result,
                )
            }
            COM_STMT_CLOSE => {
                if let Some(id) = Reader::new(body).u32() {
                    self.forget_statement(id);
                }
                return Ok(());
            }
            COM_STMT_SEND_LONG_DATA | COM_QUIT => return Ok(()),
            COM_STMT_FETCH => (Command::Other, Response::Rows),
            COM_INIT_DB => (
                Command::InitDb {
                    db: kept_text(body, MAX_NAME_BYTES),
                },
                Response::Result,
            ),
            COM_CHANGE_USER => {
                let mut r = Reader::new(body);
                let user = r.nul_str();
                let secure = self
                    .client_caps
                    .is_none_or(|c| c & CLIENT_SECURE_CONNECTION != 0);
                let auth_ok = if secure {
                    r.u8().and_then(|n| r.bytes(usize::from(n))).is_some()
                } else {
                    r.nul_str().is_some()
                };
                let db = if auth_ok { r.nul_str() } else { None };
                (
                    Command::ChangeUser {
                        user: user.map(|u| kept_text(u, MAX_NAME_BYTES)),
                        db: db.map(|d| kept_text(d, MAX_NAME_BYTES)),
                    },
                    Response::Auth,
                )
            }
            COM_RESET_CONNECTION => (Command::ResetConnection, Response::Result),
            COM_STATISTICS => (Command::Other, Response::OnePacket),
            COM_FIELD_LIST => (Command::Other, Response::FieldList),
            COM_BINLOG_DUMP | COM_BINLOG_DUMP_GTID => {
                self.phase = Phase::Stopped(StopReason::Replication);
                self.pending.clear();
                return Ok(());
            }
            COM_STMT_RESET | COM_PING | COM_SET_OPTION | COM_PROCESS_INFO | COM_PROCESS_KILL
            | COM_REFRESH | COM_SHUTDOWN | COM_DEBUG | COM_CREATE_DB | COM_DROP_DB
            | COM_REGISTER_SLAVE => (Command::Other, Response::Result),
            _ => return Err(MysqlError::UnknownCommand),
        };
        let namespace = if cmd.makes_call() {
            self.namespace.clone()
        } else {
            None
        };
        if self.pending.len() >= MAX_PENDING_COMMANDS {
            self.pending.pop_front();
            self.dropped_commands = self.dropped_commands.saturating_add(1);
        }
        self.pending.push_back(Pending {
            command: cmd,
            response,
            start_ns: pkt.meta.start_ns,
            answer_seq: (!pkt.meta.end_lost).then(|| pkt.meta.last_seq.wrapping_add(1)),
            namespace,
            rows: 0,
            affected: 0,
            result_set: false,
            error: None,
            schema_reported: false,
        });
        Ok(())
    }

    /// Whether COM_QUERY carries query attributes before its text; `None` if unknown.
    fn query_attributes(&self) -> Option<bool> {
        let client = self.client_caps?;
        let negotiated = self.server_caps.map_or(client, |server| server & client);
        Some(negotiated & CLIENT_QUERY_ATTRIBUTES != 0)
    }

    // ---- server direction ------------------------------------------------------

    fn feed_server(&mut self, chunk: &Chunk<'_>, out: &mut Vec<DbCall>) -> Result<(), MysqlError> {
        let ts = chunk.ts_ns;
        let mut pos = 0usize;
        loop {
            if matches!(self.phase, Phase::Stopped(_)) {
                return Ok(());
            }
            let keep = self.server_keep();
            let Some(meta) = self.server_rd.next(chunk.bytes, &mut pos, ts, keep) else {
                break;
            };
            self.dispatch(Direction::Server, meta, out)?;
        }
        if chunk.gap() > 0 && !matches!(self.phase, Phase::Stopped(_)) {
            let (meta, lost) = self.server_rd.skip_gap(chunk.gap(), ts);
            if let Some(meta) = meta {
                self.dispatch(Direction::Server, meta, out)?;
            }
            if lost {
                return Err(MysqlError::HeaderInGap {
                    direction: Direction::Server,
                });
            }
        }
        Ok(())
    }

    fn server_keep(&self) -> usize {
        if self.phase != Phase::Command {
            return PACKET_KEEP;
        }
        match self.pending.front().map(|p| p.response) {
            Some(
                Response::Result
                | Response::Infile
                | Response::PrepareOk
                | Response::Auth
                | Response::ColumnsEnd,
            ) => PACKET_KEEP,
            Some(Response::OnePacket) => 0,
            _ => ROW_KEEP,
        }
    }

    fn lose_server(&mut self) {
        self.server_rd.lose();
        self.server_lost = true;
        self.pending.clear();
        self.upload = false;
        if matches!(self.phase, Phase::Greeting | Phase::Handshake | Phase::Auth) {
            self.phase = Phase::Start;
        }
    }

    fn on_server_packet(
        &mut self,
        pkt: &Packet<'_>,
        out: &mut Vec<DbCall>,
    ) -> Result<(), MysqlError> {
        match self.phase {
            Phase::Greeting => self.on_greeting(pkt),
            Phase::Auth => self.on_auth_packet(pkt),
            Phase::Command => self.on_response(pkt, out),
            // Nothing is expected from the server before the handshake response.
            Phase::Start | Phase::Handshake | Phase::Stopped(_) => Ok(()),
        }
    }

    fn on_greeting(&mut self, pkt: &Packet<'_>) -> Result<(), MysqlError> {
        let malformed = |reason| MysqlError::Malformed {
            direction: Direction::Server,
            packet: "greeting",
            reason,
        };
        let mut r = Reader::new(pkt.head);
        let version = r.u8().ok_or(malformed("empty"))?;
        if version != 10 {
            return Err(MysqlError::UnsupportedProtocol { version });
        }
        r.nul_str()
            .ok_or(malformed("server version not terminated"))?;
        // Connection id, auth data part 1, filler.
        r.skip(4 + 8 + 1)
            .ok_or(malformed("shorter than its fixed fields"))?;
        let mut caps = u64::from(r.u16().ok_or(malformed("no capability flags"))?);
        let _charset = r.u8();
        if let Some(status) = r.u16() {
            self.apply_status(status);
        }
        if let Some(high) = r.u16() {
            caps |= u64::from(high) << 16;
        }
        // Auth data length, 6 reserved bytes, then MariaDB's extended capabilities.
        if let Some(extended) = r.skip(1 + 6).and_then(|()| r.u32())
            && caps & CLIENT_MYSQL == 0
        {
            caps |= u64::from(extended) << 32;
        }
        self.server_caps = Some(caps);
        self.phase = Phase::Handshake;
        Ok(())
    }

    fn on_auth_packet(&mut self, pkt: &Packet<'_>) -> Result<(), MysqlError> {
        match pkt.head.first() {
            Some(0x00) => {
                let ok = parse_ok(pkt.head);
                self.apply_ok(&ok);
                self.phase = if self.compress_after_auth {
                    Phase::Stopped(StopReason::Compressed)
                } else {
                    Phase::Command
                };
            }
            // Authentication failed: the server closes the connection.
            Some(0xFF) => self.phase = Phase::Start,
            // Auth switch request (0xFE), more data (0x01): the client answers.
            _ => {}
        }
        Ok(())
    }

    /// A server packet in the command phase: it answers the oldest pending command.
    fn on_response(&mut self, pkt: &Packet<'_>, out: &mut Vec<DbCall>) -> Result<(), MysqlError> {
        loop {
            // No pending command: bytes after the last answer in this chunk (an
            // error before a close, the answer to a command that was not captured).
            // Skipped by length; see `server` for what happens next.
            let Some(mut pending) = self.pending.pop_front() else {
                return Ok(());
            };
            match self.step(&mut pending, pkt)? {
                Step::More => {
                    self.pending.push_front(pending);
                    return Ok(());
                }
                Step::Done => {
                    self.complete(pending, pkt.meta.end_ns, out);
                    return Ok(());
                }
                Step::DoneBefore => self.complete(pending, pkt.meta.start_ns, out),
            }
        }
    }

    /// Advances `p` by one response packet.
    fn step(&mut self, p: &mut Pending, pkt: &Packet<'_>) -> Result<Step, MysqlError> {
        let first = pkt.head.first().copied();
        let len = pkt.meta.len;
        if first == Some(0xFF)
            && Reader::new(pkt.head.get(1..).unwrap_or_default()).u16()
                == Some(PROGRESS_REPORT_CODE)
        {
            return Ok(Step::More);
        }
        let cut = |what| MysqlError::ContentInGap {
            direction: Direction::Server,
            what,
        };
        let malformed = |packet, reason| MysqlError::Malformed {
            direction: Direction::Server,
            packet,
            reason,
        };
        match p.response {
            Response::Result | Response::Infile => match first {
                Some(0x00) => self.on_ok(p, pkt),
                Some(0xFF) => self.on_err(p, pkt),
                Some(0xFB) if p.response == Response::Result => {
                    self.upload = true;
                    p.response = Response::Infile;
                    Ok(Step::More)
                }
                Some(0xFE) if p.response == Response::Result && len < MAX_PACKET_LEN as u64 => {
                    // EOF (COM_SET_OPTION, COM_DEBUG...) or an OK with a 0xFE header.
                    Ok(self.on_terminator(p, pkt))
                }
                Some(_) if p.response == Response::Infile => Err(malformed(
                    "LOCAL INFILE answer",
                    "expected OK or ERR after the upload",
                )),
                Some(_) => {
                    let mut r = Reader::new(pkt.head);
                    let count = r.lenenc().filter(|&n| n > 0).ok_or_else(|| {
                        if pkt.meta.cut {
                            cut("column count")
                        } else {
                            malformed("column count", "not a positive length-encoded integer")
                        }
                    })?;
                    // MariaDB cache metadata / MySQL optional metadata: a flag byte
                    // follows; 0 means no column definitions are sent.
                    let metadata = r.u8().is_none_or(|flag| flag != 0);
                    p.result_set = true;
                    p.response = if metadata {
                        Response::Columns { left: count }
                    } else {
                        Response::ColumnsEnd
                    };
                    Ok(Step::More)
                }
                None => Err(cut("first byte")),
            },
            Response::Columns { left } => {
                if first == Some(0xFF) {
                    return self.on_err(p, pkt);
                }
                let left = left.saturating_sub(1);
                p.response = if left == 0 {
                    Response::ColumnsEnd
                } else {
                    Response::Columns { left }
                };
                Ok(Step::More)
            }
            Response::ColumnsEnd => match first {
                Some(0xFE) if len < 7 => {
                    self.learn_deprecate_eof(false);
                    let status = parse_eof_status(pkt.head);
                    if let Some(status) = status {
                        self.apply_status(status);
                    }
                    if status.is_some_and(|s| s & SERVER_STATUS_CURSOR_EXISTS != 0) {
                        // A cursor was opened: rows come with COM_STMT_FETCH.
                        return Ok(Step::Done);
                    }
                    p.response = Response::Rows;
                    Ok(Step::More)
                }
                Some(0xFE) if len < MAX_PACKET_LEN as u64 => {
                    self.learn_deprecate_eof(true);
                    Ok(self.on_terminator(p, pkt))
                }
                Some(0xFF) => self.on_err(p, pkt),
                Some(_) => {
                    self.learn_deprecate_eof(true);
                    p.rows = p.rows.saturating_add(1);
                    p.response = Response::Rows;
                    Ok(Step::More)
                }
                None => Err(cut("first byte after the column definitions")),
            },
            Response::Rows => match first {
                Some(0xFE) if len < MAX_PACKET_LEN as u64 => Ok(self.on_terminator(p, pkt)),
                Some(0xFF) => self.on_err(p, pkt),
                Some(_) => {
                    p.rows = p.rows.saturating_add(1);
                    Ok(Step::More)
                }
                // Only an EOF is 5 bytes long, and only an OK can be 7 or more.
                None if self.deprecate_eof == Some(false) && len != 5 => {
                    p.rows = p.rows.saturating_add(1);
                    Ok(Step::More)
                }
                None if len >= MAX_PACKET_LEN as u64 => {
                    p.rows = p.rows.saturating_add(1);
                    Ok(Step::More)
                }
                None => Err(cut("first byte of a row")),
            },
            Response::PrepareOk => match first {
                Some(0x00) => {
                    let mut r = Reader::new(pkt.head.get(1..).unwrap_or_default());
                    let (Some(id), Some(columns), Some(params)) = (r.u32(), r.u16(), r.u16())
                    else {
                        return Err(if pkt.meta.cut {
                            cut("COM_STMT_PREPARE_OK")
                        } else {
                            malformed("COM_STMT_PREPARE_OK", "too short")
                        });
                    };
                    // Reserved byte, warning count, then MySQL's optional metadata flag.
                    let metadata = r.skip(3).and_then(|()| r.u8()).is_none_or(|flag| flag != 0);
                    if let Command::Prepare { text, operation } = &p.command {
                        self.remember_statement(Statement {
                            id,
                            text: text.clone(),
                            operation: operation.clone(),
                        });
                    }
                    let (columns, params) = if metadata {
                        (u64::from(columns), u64::from(params))
                    } else {
                        (0, 0)
                    };
                    Ok(self.prepare_params(p, params, columns))
                }
                Some(0xFF) => self.on_err(p, pkt),
                Some(_) => Err(malformed("COM_STMT_PREPARE answer", "neither OK nor ERR")),
                None => Err(cut("first byte")),
            },
            Response::PrepareParams { left, columns } => {
                let left = left.saturating_sub(1);
                if left > 0 {
                    p.response = Response::PrepareParams { left, columns };
                    return Ok(Step::More);
                }
                if self.deprecate_eof == Some(true) {
                    return Ok(self.prepare_columns(p, columns));
                }
                p.response = Response::PrepareParamsEnd { columns };
                Ok(Step::More)
            }
            Response::PrepareParamsEnd { columns } => {
                if first == Some(0xFE) && len < 7 {
                    self.learn_deprecate_eof(false);
                    return Ok(self.prepare_columns(p, columns));
                }
                if first.is_none() {
                    return Err(cut("first byte after the parameter definitions"));
                }
                self.learn_deprecate_eof(true);
                if columns == 0 {
                    return Ok(Step::DoneBefore);
                }
                // This packet is the first column definition.
                let left = columns - 1;
                if left == 0 {
                    return Ok(Step::Done);
                }
                p.response = Response::PrepareColumns { left };
                Ok(Step::More)
            }
            Response::PrepareColumns { left } => {
                let left = left.saturating_sub(1);
                if left > 0 {
                    p.response = Response::PrepareColumns { left };
                    return Ok(Step::More);
                }
                if self.deprecate_eof == Some(true) {
                    return Ok(Step::Done);
                }
                p.response = Response::PrepareColumnsEnd;
                Ok(Step::More)
            }
            Response::PrepareColumnsEnd => {
                if first == Some(0xFE) && len < 7 {
                    self.learn_deprecate_eof(false);
                    return Ok(Step::Done);
                }
                if first.is_none() {
                    return Err(cut("first byte after the column definitions"));
                }
                self.learn_deprecate_eof(true);
                Ok(Step::DoneBefore)
            }
            Response::OnePacket => Ok(Step::Done),
            Response::FieldList => match first {
                Some(0xFE) if len < MAX_PACKET_LEN as u64 => Ok(Step::Done),
                Some(0xFF) => self.on_err(p, pkt),
                Some(_) => Ok(Step::More),
                None => Err(cut("first byte")),
            },
            Response::Auth => match first {
                Some(0x00) => {
                    let ok = parse_ok(pkt.head);
                    self.apply_ok(&ok);
                    if let Command::ChangeUser { user, db } = &mut p.command {
                        self.user = user.take();
                        self.namespace = db.take().filter(|d| !d.is_empty());
                    }
                    self.forget_all_statements();
                    Ok(Step::Done)
                }
                Some(0xFF) => self.on_err(p, pkt),
                Some(_) => Ok(Step::More),
                None => Err(cut("first byte")),
            },
        }
    }

    /// After COM_STMT_PREPARE_OK: skip `params` then `columns` definitions.
    fn prepare_params(&mut self, p: &mut Pending, params: u64, columns: u64) -> Step {
        if params == 0 {
            return self.prepare_columns(p, columns);
        }
        p.response = Response::PrepareParams {
            left: params,
            columns,
        };
        Step::More
    }

    fn prepare_columns(&mut self, p: &mut Pending, columns: u64) -> Step {
        if columns == 0 {
            return Step::Done;
        }
        p.response = Response::PrepareColumns { left: columns };
        Step::More
    }

    /// An OK packet (0x00 header) answering `p`.
    fn on_ok(&mut self, p: &mut Pending, pkt: &Packet<'_>) -> Result<Step, MysqlError> {
        let ok = parse_ok(pkt.head);
        if ok.status.is_none() && pkt.meta.cut {
            return Err(MysqlError::ContentInGap {
                direction: Direction::Server,
                what: "status flags of an OK packet",
            });
        }
        if p.response == Response::Infile {
            self.upload = false;
        }
        p.affected = p.affected.saturating_add(ok.affected);
        p.schema_reported |= ok.schema.is_some();
        self.apply_ok(&ok);
        Ok(self.next_result(p, ok.status))
    }

    /// An ERR packet answering `p`: the response is over.
    fn on_err(&mut self, p: &mut Pending, pkt: &Packet<'_>) -> Result<Step, MysqlError> {
        let code = Reader::new(pkt.head.get(1..).unwrap_or_default())
            .u16()
            .ok_or(if pkt.meta.cut {
                MysqlError::ContentInGap {
                    direction: Direction::Server,
                    what: "error number of an ERR packet",
                }
            } else {
                MysqlError::Malformed {
                    direction: Direction::Server,
                    packet: "ERR packet",
                    reason: "no error number",
                }
            })?;
        if p.response == Response::Infile {
            self.upload = false;
        }
        p.error = Some(code);
        Ok(Step::Done)
    }

    /// An EOF or 0xFE-OK ending a result set (or a whole response).
    fn on_terminator(&mut self, p: &mut Pending, pkt: &Packet<'_>) -> Step {
        let status = if pkt.meta.len < 7 {
            parse_eof_status(pkt.head)
        } else {
            let ok = parse_ok(pkt.head);
            p.schema_reported |= ok.schema.is_some();
            self.apply_ok(&ok);
            ok.status
        };
        if let Some(status) = status {
            self.apply_status(status);
        }
        self.next_result(p, status)
    }

    /// After the end of one result: another follows if the server says so.
    fn next_result(&mut self, p: &mut Pending, status: Option<u16>) -> Step {
        if status.is_some_and(|s| s & SERVER_MORE_RESULTS_EXISTS != 0) {
            p.response = Response::Result;
            Step::More
        } else {
            Step::Done
        }
    }

    fn learn_deprecate_eof(&mut self, value: bool) {
        if self.deprecate_eof.is_none() {
            self.deprecate_eof = Some(value);
        }
    }

    fn apply_status(&mut self, status: u16) {
        self.tx = if status & SERVER_STATUS_IN_TRANS != 0 {
            TxStatus::InTransaction
        } else {
            TxStatus::Idle
        };
    }

    fn apply_ok(&mut self, ok: &OkPacket) {
        if let Some(status) = ok.status {
            self.apply_status(status);
        }
        if let Some(schema) = &ok.schema {
            self.namespace = (!schema.is_empty()).then(|| schema.clone());
        }
    }

    /// The response to `p` is complete: side effects, and its call if it makes one.
    fn complete(&mut self, p: Pending, end_ns: u64, out: &mut Vec<DbCall>) {
        let success = p.error.is_none();
        let rows = if !success {
            None
        } else if p.result_set {
            Some(p.rows)
        } else {
            Some(p.affected)
        };
        let (operation, query_text) = match p.command {
            Command::Query {
                text,
                operation,
                use_db,
            } => {
                if success
                    && !p.schema_reported
                    && let Some(db) = use_db
                {
                    self.namespace = Some(db);
                }
                (operation, Some(text))
            }
            Command::Execute { id, text: None, .. } => {
                let id = if id == LAST_PREPARED_STATEMENT {
                    self.last_prepared
                } else {
                    Some(id)
                };
                let (text, operation) = id.map_or((None, None), |id| self.statement_text(id));
                (operation, text)
            }
            Command::Execute {
                text, operation, ..
            } => (operation, text),
            Command::Prepare { text, operation } if !success => (operation, Some(text)),
            Command::InitDb { db } => {
                if success && !p.schema_reported {
                    self.namespace = (!db.is_empty()).then_some(db);
                }
                return;
            }
            Command::ResetConnection => {
                if success {
                    self.forget_all_statements();
                }
                return;
            }
            Command::Prepare { .. } | Command::ChangeUser { .. } | Command::Other => return,
        };
        out.push(DbCall {
            system: DbSystem::Mysql,
            operation,
            query_text,
            namespace: p.namespace,
            start_ns: p.start_ns,
            end_ns: end_ns.max(p.start_ns),
            error_code: p.error.map(|code| code.to_string()),
            rows,
        });
    }

    fn statement_text(&self, id: u32) -> (Option<String>, Option<String>) {
        match self.statements.iter().find(|s| s.id == id) {
            Some(s) => (Some(s.text.clone()), s.operation.clone()),
            None => (None, None),
        }
    }

    fn remember_statement(&mut self, statement: Statement) {
        self.forget_statement(statement.id);
        self.last_prepared = Some(statement.id);
        self.statement_bytes = self.statement_bytes.saturating_add(statement.text.len());
        self.statements.push_back(statement);
        while self.statements.len() > MAX_PREPARED_STATEMENTS
            || self.statement_bytes > MAX_PREPARED_TEXT_BYTES
        {
            let Some(oldest) = self.statements.pop_front() else {
                break;
            };
            self.statement_bytes = self.statement_bytes.saturating_sub(oldest.text.len());
        }
    }

    fn forget_statement(&mut self, id: u32) {
        if let Some(i) = self.statements.iter().position(|s| s.id == id)
            && let Some(gone) = self.statements.remove(i)
        {
            self.statement_bytes = self.statement_bytes.saturating_sub(gone.text.len());
        }
    }

    fn forget_all_statements(&mut self) {
        self.statements.clear();
        self.statement_bytes = 0;
        self.last_prepared = None;
    }
}

/// Detection on a connection met mid-stream (opened before the agent, its handshake
/// long over): `bytes`, the captured start of `total_len` bytes the client sent in a
/// row, are whole command packets (sequence id 0) of the commands a session sends
/// (a query, a prepared statement's steps, `COM_INIT_DB`, `COM_PING`, `COM_QUIT`,
/// `COM_RESET_CONNECTION`, …), each of its command's length, the packets ending
/// exactly at `total_len` (where `bytes` are whole) or consistent as far as they
/// were captured. Text protocols never pass (the sequence id byte is zero).
#[must_use]
pub fn looks_like_session_commands(bytes: &[u8], total_len: usize) -> bool {
    let mut at = 0usize;
    let mut packets = 0usize;
    while at < bytes.len() {
        let (Some(&[l0, l1, l2, seq]), Some(&command)) = (
            bytes
                .get(at..at + 4)
                .and_then(|h| <&[u8; 4]>::try_from(h).ok()),
            bytes.get(at + 4),
        ) else {
            // A header cut by the end of what was captured.
            return packets > 0 && bytes.len() < total_len;
        };
        let len = u24(l0, l1, l2);
        let fits = match command {
            COM_QUIT | COM_PING | COM_STATISTICS | COM_RESET_CONNECTION => len == 1,
            COM_STMT_CLOSE | COM_STMT_RESET => len == 5,
            COM_SET_OPTION => len == 3,
            COM_STMT_FETCH => len == 9,
            COM_QUERY | COM_INIT_DB | COM_STMT_PREPARE => len >= 2,
            COM_STMT_SEND_LONG_DATA => len >= 7,
            COM_STMT_EXECUTE => len >= 10,
            _ => false,
        };
        let end = at + 4 + len;
        if seq != 0 || !fits || len == MAX_PACKET_LEN || end > total_len {
            return false;
        }
        packets += 1;
        at = end;
    }
    packets > 0
}

/// Cheap protocol detection: `bytes` begins with a protocol-10 server greeting (the
/// first packet of a MySQL/MariaDB connection: sequence id 0, protocol version 10, a
/// printable server version).
#[must_use]
pub fn looks_like_server_greeting(bytes: &[u8]) -> bool {
    let [l0, l1, l2, seq, version, rest @ ..] = bytes else {
        return false;
    };
    let len = u24(*l0, *l1, *l2);
    if *seq != 0 || *version != 10 || !(18..=4096).contains(&len) {
        return false;
    }
    let printable = |v: &[u8]| v.iter().all(|&b| (b' '..=b'~').contains(&b));
    // The server version, NUL-terminated, within the packet and 64 bytes.
    let window = (len - 1).min(64);
    let version = rest.get(..window).unwrap_or(rest);
    match version.iter().position(|&b| b == 0) {
        Some(end) => end > 0 && printable(version.get(..end).unwrap_or_default()),
        // Cut by the end of the captured bytes.
        None => version.len() < window && !version.is_empty() && printable(version),
    }
}

/// Longest prefix of a stream a packet start is judged on: header, protocol version
/// and a 64-byte server version for a greeting.
const MAX_PROBE_BYTES: usize = 4 + 1 + 64;

/// What a [`StartProbe`] judge says of the first bytes of a possible packet start. It
/// decides on a prefix whose length depends only on those bytes, so the verdict is
/// the same however the stream was cut into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    NeedMore,
    No,
    Yes,
}

fn verdict(yes: bool) -> Verdict {
    if yes { Verdict::Yes } else { Verdict::No }
}

/// The first bytes of a possible command: header, command byte and one more byte.
fn judge_command(bytes: &[u8]) -> Verdict {
    judge(bytes, |len| len.min(2), plausible_command)
}

/// The first bytes of a possible greeting: header, protocol version, server version.
fn judge_greeting(bytes: &[u8]) -> Verdict {
    judge(bytes, |len| len.min(1 + 64), looks_like_server_greeting)
}

/// The first bytes of a possible answer to `p`: header and first payload byte.
fn judge_answer(bytes: &[u8], p: &Pending) -> Verdict {
    judge(bytes, |len| len.min(1), |b| plausible_answer(b, p))
}

/// Applies `check` to the header and the first `payload(len)` payload bytes.
fn judge(bytes: &[u8], payload: impl Fn(usize) -> usize, check: impl Fn(&[u8]) -> bool) -> Verdict {
    let [l0, l1, l2, _, ..] = bytes else {
        return Verdict::NeedMore;
    };
    let needed = 4 + payload(u24(*l0, *l1, *l2));
    match bytes.get(..needed) {
        Some(prefix) => verdict(check(prefix)),
        None => Verdict::NeedMore,
    }
}

/// What [`StartProbe::offer`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Offer {
    /// Too few bytes yet: they are kept.
    Wait,
    /// Not a start: the bytes were dropped.
    Reject,
    /// A start: the kept bytes ([`StartProbe::segments`]) and then the chunk are
    /// to be decoded.
    Accept,
}

/// The bytes of a possible packet start that came in chunks too short to judge it,
/// each with the timestamp of its chunk. At most [`MAX_PROBE_BYTES`].
#[derive(Default)]
struct StartProbe {
    bytes: Vec<u8>,
    ts: Vec<u64>,
}

impl fmt::Debug for StartProbe {
    // Not derived: the bytes are captured bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StartProbe")
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl StartProbe {
    fn clear(&mut self) {
        self.bytes.clear();
        self.ts.clear();
    }

    /// Judges the kept bytes followed by `chunk` as a packet start. When a start
    /// begun in earlier chunks is rejected, `chunk` is judged alone.
    fn offer(&mut self, chunk: &Chunk<'_>, judge: impl Fn(&[u8]) -> Verdict) -> Offer {
        let verdict = if self.bytes.is_empty() {
            judge(chunk.bytes)
        } else {
            let mut window = [0u8; MAX_PROBE_BYTES];
            let mut n = 0;
            for (slot, &b) in window.iter_mut().zip(self.bytes.iter().chain(chunk.bytes)) {
                *slot = b;
                n += 1;
            }
            judge(window.get(..n).unwrap_or_default())
        };
        match verdict {
            Verdict::Yes => Offer::Accept,
            Verdict::NeedMore if chunk.gap() == 0 => {
                // Fewer than MAX_PROBE_BYTES in all, or the judge would have decided.
                let room = MAX_PROBE_BYTES.saturating_sub(self.bytes.len());
                let take = chunk.bytes.get(..room).unwrap_or(chunk.bytes);
                self.bytes.extend_from_slice(take);
                self.ts.extend(take.iter().map(|_| chunk.ts_ns));
                Offer::Wait
            }
            Verdict::NeedMore => {
                self.clear();
                Offer::Reject
            }
            Verdict::No if self.bytes.is_empty() => Offer::Reject,
            Verdict::No => {
                self.clear();
                self.offer(chunk, judge)
            }
        }
    }

    /// The kept bytes, cut where their chunks' timestamps change.
    fn segments(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let ts = *self.ts.get(at)?;
            let len = self.ts.get(at..)?.iter().take_while(|&&t| t == ts).count();
            let bytes = self.bytes.get(at..at + len)?;
            at += len;
            Some((ts, bytes))
        })
    }
}

/// Whether a chunk can be trusted to begin a client command: sequence id 0, a known
/// command byte and a payload length that fits it.
fn plausible_command(bytes: &[u8]) -> bool {
    let [l0, l1, l2, seq, command, rest @ ..] = bytes else {
        return false;
    };
    let len = u24(*l0, *l1, *l2);
    if *seq != 0 {
        return false;
    }
    // The byte after the command, for text commands: printable, whitespace, or (query
    // attributes) a zero parameter count.
    let text_start = || {
        rest.first()
            .is_none_or(|&b| b == 0 || b == b'\t' || b == b'\n' || b == b'\r' || b >= b' ')
    };
    match *command {
        COM_QUIT | COM_STATISTICS | COM_PROCESS_INFO | COM_DEBUG | COM_PING
        | COM_RESET_CONNECTION => len == 1,
        COM_QUERY | COM_STMT_PREPARE => len >= 2 && text_start(),
        COM_INIT_DB | COM_FIELD_LIST | COM_CREATE_DB | COM_DROP_DB => {
            len >= 2 && rest.first().is_none_or(|&b| b >= b' ')
        }
        COM_REFRESH => len == 2,
        COM_SHUTDOWN => len <= 2,
        COM_PROCESS_KILL | COM_STMT_CLOSE | COM_STMT_RESET => len == 5,
        COM_SET_OPTION => len == 3,
        COM_STMT_FETCH => len == 9,
        COM_STMT_EXECUTE => len >= 10,
        COM_STMT_SEND_LONG_DATA | COM_STMT_BULK_EXECUTE => len >= 7,
        COM_CHANGE_USER => len >= 2,
        COM_BINLOG_DUMP | COM_BINLOG_DUMP_GTID | COM_REGISTER_SLAVE => len >= 11,
        _ => false,
    }
}

/// Whether a server chunk can be trusted to begin the answer to `p` (after sync was
/// lost, or when the decoder joined mid-connection).
fn plausible_answer(bytes: &[u8], p: &Pending) -> bool {
    let [l0, l1, l2, seq, first, ..] = bytes else {
        return false;
    };
    let len = u24(*l0, *l1, *l2);
    if p.answer_seq.is_some_and(|expected| expected != *seq) || len == 0 {
        return false;
    }
    match p.response {
        Response::Result => match *first {
            0x00 => len >= 7,
            0xFF => len >= 3,
            0xFB => true,
            0xFE => len < 9,
            // A column count: a length-encoded integer, maybe with a metadata flag.
            0x01..=0xFA => len <= 2,
            0xFC => (3..=4).contains(&len),
            0xFD => (4..=5).contains(&len),
        },
        Response::PrepareOk => (*first == 0x00 && len >= 12) || *first == 0xFF,
        Response::Rows => matches!(*first, 0x00 | 0xFE | 0xFF),
        Response::FieldList => matches!(*first, 0x03 | 0xFE | 0xFF),
        Response::Auth => matches!(*first, 0x00 | 0xFF | 0xFE | 0x01),
        Response::OnePacket => true,
        _ => false,
    }
}

// ---- packet framing --------------------------------------------------------------

/// Where a [`PacketReader`] is in its byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadState {
    /// Reading a 4-byte packet header.
    Header,
    /// Reading a payload.
    Payload,
    /// A header was not captured: nothing is read until [`PacketReader::reset`].
    Lost,
}

/// The logical packet being read (one or more physical packets).
#[derive(Clone, Copy, Debug)]
struct Progress {
    seq: u8,
    last_seq: u8,
    /// Payload bytes announced so far.
    len: u64,
    /// Bytes left in the current physical packet.
    remaining: usize,
    /// The current physical packet is 16 MiB - 1 long: another one continues it.
    more: bool,
    /// Leading payload bytes to keep.
    keep: usize,
    /// Some of the bytes to keep were not captured.
    cut: bool,
    start_ns: u64,
}

/// A completed logical packet; its kept bytes are in [`PacketReader::buf`].
#[derive(Clone, Copy, Debug)]
struct PacketMeta {
    /// Sequence id of its first physical packet.
    seq: u8,
    /// Sequence id of its last physical packet.
    last_seq: u8,
    /// Payload length (all physical packets).
    len: u64,
    /// The kept prefix is shorter than asked for: bytes were in a capture gap.
    cut: bool,
    /// The header of a continuation packet was in a capture gap: the payload may be
    /// longer, and how many packets it took is unknown.
    end_lost: bool,
    start_ns: u64,
    end_ns: u64,
}

/// A completed packet with its kept bytes.
struct Packet<'a> {
    meta: PacketMeta,
    /// The first payload bytes, as many as were asked for and captured.
    head: &'a [u8],
}

/// Splits one direction into packets, joining 16 MiB continuations, keeping a bounded
/// prefix of each payload and skipping the rest (captured or not) by length.
struct PacketReader {
    state: ReadState,
    header: [u8; 4],
    /// Header bytes read so far (in `Header` state).
    have: usize,
    /// Timestamp of the chunk holding the first header byte.
    header_ns: u64,
    open: Option<Progress>,
    /// Kept prefix of the open packet's payload.
    buf: Vec<u8>,
}

impl fmt::Debug for PacketReader {
    // Not derived: the buffer holds captured bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketReader")
            .field("state", &self.state)
            .field("header_bytes", &self.have)
            .field("open", &self.open)
            .field("kept_bytes", &self.buf.len())
            .finish()
    }
}

impl PacketReader {
    fn new() -> Self {
        Self {
            state: ReadState::Header,
            header: [0; 4],
            have: 0,
            header_ns: 0,
            open: None,
            buf: Vec::new(),
        }
    }

    fn is_lost(&self) -> bool {
        self.state == ReadState::Lost
    }

    /// Trusts the next byte to start a packet.
    fn reset(&mut self) {
        self.state = ReadState::Header;
        self.have = 0;
        self.open = None;
    }

    fn lose(&mut self) {
        self.reset();
        self.state = ReadState::Lost;
    }

    /// True between the first header byte of a packet and its last payload byte.
    fn in_packet(&self) -> bool {
        self.have > 0 || self.open.is_some()
    }

    /// Gives back a taken buffer, emptied; frees it if it grew large.
    fn recycle(&mut self, mut buf: Vec<u8>) {
        buf.clear();
        if buf.capacity() <= BUFFER_KEPT_BYTES {
            self.buf = buf;
        }
    }

    /// Reads from `bytes[*pos..]` until a packet completes (returned; its kept bytes
    /// are in `self.buf`) or the bytes run out. `keep` applies to a packet starting in
    /// this call.
    fn next(&mut self, bytes: &[u8], pos: &mut usize, ts: u64, keep: usize) -> Option<PacketMeta> {
        loop {
            match self.state {
                ReadState::Lost => {
                    *pos = bytes.len();
                    return None;
                }
                ReadState::Header => {
                    let rest = bytes.get(*pos..).unwrap_or_default();
                    if rest.is_empty() {
                        return None;
                    }
                    if self.have == 0 {
                        self.header_ns = ts;
                    }
                    for (slot, &b) in self.header.iter_mut().skip(self.have).zip(rest) {
                        *slot = b;
                        self.have += 1;
                        *pos += 1;
                    }
                    if self.have < 4 {
                        return None;
                    }
                    self.have = 0;
                    let [l0, l1, l2, seq] = self.header;
                    let len = u24(l0, l1, l2);
                    let more = len == MAX_PACKET_LEN;
                    match &mut self.open {
                        Some(p) => {
                            // A continuation of a 16 MiB packet.
                            p.last_seq = seq;
                            p.remaining = len;
                            p.more = more;
                            p.len = p.len.saturating_add(len as u64);
                        }
                        None => {
                            self.buf.clear();
                            self.open = Some(Progress {
                                seq,
                                last_seq: seq,
                                len: len as u64,
                                remaining: len,
                                more,
                                keep,
                                cut: false,
                                start_ns: self.header_ns,
                            });
                        }
                    }
                    self.state = ReadState::Payload;
                }
                ReadState::Payload => {
                    let Some(p) = self.open.as_mut() else {
                        self.state = ReadState::Header;
                        continue;
                    };
                    if p.remaining > 0 {
                        let rest = bytes.get(*pos..).unwrap_or_default();
                        if rest.is_empty() {
                            return None;
                        }
                        let take = p.remaining.min(rest.len());
                        let want = p.keep.saturating_sub(self.buf.len()).min(take);
                        if want > 0 && !p.cut {
                            self.buf
                                .extend_from_slice(rest.get(..want).unwrap_or_default());
                        }
                        p.remaining -= take;
                        *pos += take;
                        if p.remaining > 0 {
                            return None;
                        }
                    }
                    self.state = ReadState::Header;
                    if p.more {
                        continue;
                    }
                    let p = self.open.take()?;
                    return Some(meta(&p, ts, false));
                }
            }
        }
    }

    /// The rest of the chunk is `gap` uncaptured bytes. Returns a packet that ended in
    /// the gap, and whether a header was in the gap (sync lost).
    fn skip_gap(&mut self, gap: usize, ts: u64) -> (Option<PacketMeta>, bool) {
        match self.state {
            ReadState::Lost => (None, false),
            ReadState::Header => {
                // Header bytes, of a new packet or of a continuation, were not captured.
                // A 16 MiB packet whose continuation is lost is returned as it is.
                let open = self.open.take();
                self.lose();
                (open.map(|p| meta(&p, ts, true)), true)
            }
            ReadState::Payload => {
                let kept = self.buf.len();
                let Some(p) = self.open.as_mut() else {
                    self.lose();
                    return (None, true);
                };
                if kept < p.keep && p.remaining > 0 {
                    p.cut = true;
                }
                if gap < p.remaining {
                    p.remaining -= gap;
                    return (None, false);
                }
                let after = gap - p.remaining;
                p.remaining = 0;
                if p.more && after == 0 {
                    self.state = ReadState::Header;
                    return (None, false);
                }
                let end_lost = p.more;
                let p = self.open.take();
                if after == 0 {
                    self.state = ReadState::Header;
                    (p.map(|p| meta(&p, ts, false)), false)
                } else {
                    self.lose();
                    (p.map(|p| meta(&p, ts, end_lost)), true)
                }
            }
        }
    }
}

fn meta(p: &Progress, end_ns: u64, end_lost: bool) -> PacketMeta {
    PacketMeta {
        seq: p.seq,
        last_seq: p.last_seq,
        len: p.len,
        cut: p.cut,
        end_lost,
        start_ns: p.start_ns,
        end_ns,
    }
}

fn u24(b0: u8, b1: u8, b2: u8) -> usize {
    usize::from(b0) | usize::from(b1) << 8 | usize::from(b2) << 16
}

// ---- payload parsing -------------------------------------------------------------

/// A bounds-checked little-endian reader over a payload prefix.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn rest(&self) -> &'a [u8] {
        self.bytes
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.bytes.split_at_checked(n)?;
        self.bytes = rest;
        Some(taken)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.bytes(n).map(|_| ())
    }

    fn u8(&mut self) -> Option<u8> {
        self.bytes(1)?.first().copied()
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.bytes(2)?;
        Some(u16::from_le_bytes([*b.first()?, *b.get(1)?]))
    }

    fn u32(&mut self) -> Option<u32> {
        let b: [u8; 4] = self.bytes(4)?.try_into().ok()?;
        Some(u32::from_le_bytes(b))
    }

    /// A length-encoded integer; `None` for the NULL marker (0xFB), 0xFF and short input.
    fn lenenc(&mut self) -> Option<u64> {
        let first = self.u8()?;
        let width = match first {
            0..=0xFA => return Some(u64::from(first)),
            0xFC => 2,
            0xFD => 3,
            0xFE => 8,
            _ => return None,
        };
        let b = self.bytes(width)?;
        let mut value = 0u64;
        for (i, &byte) in b.iter().enumerate() {
            value |= u64::from(byte) << (8 * i);
        }
        Some(value)
    }

    fn lenenc_bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.lenenc()?).ok()?;
        self.bytes(n)
    }

    /// A NUL-terminated string, without the NUL.
    fn nul_str(&mut self) -> Option<&'a [u8]> {
        let end = self.bytes.iter().position(|&b| b == 0)?;
        let s = self.bytes(end)?;
        self.skip(1)?;
        Some(s)
    }
}

/// What the decoder reads of an OK packet.
#[derive(Debug, Default)]
struct OkPacket {
    affected: u64,
    /// `None` when the packet was cut before the flags.
    status: Option<u16>,
    /// The new schema, from session-state tracking.
    schema: Option<String>,
}

/// An OK packet (0x00 or 0xFE header), as far as it was kept.
fn parse_ok(head: &[u8]) -> OkPacket {
    let mut ok = OkPacket::default();
    let mut r = Reader::new(head.get(1..).unwrap_or_default());
    let Some(affected) = r.lenenc() else {
        return ok;
    };
    ok.affected = affected;
    if r.lenenc().is_none() {
        return ok;
    }
    let Some(status) = r.u16() else {
        return ok;
    };
    ok.status = Some(status);
    if status & SERVER_SESSION_STATE_CHANGED == 0 {
        return ok;
    }
    // With session tracking (the only way the flag is set): warnings, info, state.
    let state = r
        .skip(2)
        .and_then(|()| r.lenenc_bytes())
        .and_then(|_info| r.lenenc_bytes());
    let mut entries = Reader::new(state.unwrap_or_default());
    while let (Some(kind), Some(data)) = (entries.u8(), entries.lenenc_bytes()) {
        if kind == SESSION_TRACK_SCHEMA
            && let Some(schema) = Reader::new(data).lenenc_bytes()
        {
            ok.schema = Some(kept_text(schema, MAX_NAME_BYTES));
        }
    }
    ok
}

/// The status flags of an EOF packet (0xFE, warnings, status), if it has them.
fn parse_eof_status(head: &[u8]) -> Option<u16> {
    let mut r = Reader::new(head.get(1..)?);
    r.skip(2)?;
    r.u16()
}

/// The SQL of a COM_QUERY payload (after the command byte): query attributes, when the
/// connection sends them (`attributes`; `None` if unknown), are skipped. If they cannot
/// be walked, the whole payload is returned.
fn query_sql(body: &[u8], attributes: Option<bool>) -> &[u8] {
    match attributes {
        Some(false) => body,
        Some(true) => skip_query_attributes(body).unwrap_or(body),
        // Unknown (joined mid-connection): SQL never starts with a NUL byte; an empty
        // attribute set is `00 01`.
        None => match body {
            [0x00, 0x01, rest @ ..] => rest,
            _ => body,
        },
    }
}

/// Skips MySQL 8 query attributes (`CLIENT_QUERY_ATTRIBUTES`) at the start of a
/// COM_QUERY payload.
fn skip_query_attributes(body: &[u8]) -> Option<&[u8]> {
    let mut r = Reader::new(body);
    let count = usize::try_from(r.lenenc()?).ok()?;
    let _sets = r.lenenc()?;
    if count == 0 {
        return Some(r.rest());
    }
    if count > MAX_QUERY_ATTRIBUTES {
        return None;
    }
    let nulls = r.bytes(count.div_ceil(8))?;
    if r.u8()? != 1 {
        // Types not sent: the values cannot be walked.
        return None;
    }
    let mut types = [0u8; MAX_QUERY_ATTRIBUTES];
    for slot in types.iter_mut().take(count) {
        *slot = r.u16()?.to_le_bytes()[0];
        r.lenenc_bytes()?;
    }
    for (i, &ty) in types.iter().take(count).enumerate() {
        let null = nulls.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0);
        if !null {
            skip_binary_value(&mut r, ty)?;
        }
    }
    Some(r.rest())
}

/// Skips one value of the binary protocol.
fn skip_binary_value(r: &mut Reader<'_>, ty: u8) -> Option<()> {
    match ty {
        0x06 => Some(()),
        0x01 => r.skip(1),
        0x02 | 0x0d => r.skip(2),
        0x03 | 0x04 | 0x09 => r.skip(4),
        0x05 | 0x08 => r.skip(8),
        0x07 | 0x0a | 0x0b | 0x0c => {
            let n = r.u8()?;
            r.skip(usize::from(n))
        }
        0x00 | 0x0f | 0x10 | 0xf2 | 0xf5..=0xff => r.lenenc_bytes().map(|_| ()),
        _ => None,
    }
}

/// Offsets of the first keyword of `sql`: whitespace, comments and opening
/// parentheses before it are skipped; MySQL's executable comments (`/*! ... */`) are
/// read as SQL.
fn first_keyword(sql: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0usize;
    loop {
        let rest = sql.get(i..)?;
        match rest {
            [b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c | b'(' | b';', ..] => i += 1,
            [b'/', b'*', b'!', ..] | [b'/', b'*', b'M', b'!', ..] => {
                i += if rest.get(2) == Some(&b'M') { 4 } else { 3 };
                i += sql
                    .get(i..)?
                    .iter()
                    .take(6)
                    .take_while(|b| b.is_ascii_digit())
                    .count();
            }
            [b'/', b'*', ..] => {
                let body = rest.get(2..)?;
                let end = body.windows(2).position(|w| w == b"*/")?;
                i += 2 + end + 2;
            }
            [b'-', b'-', c, ..] if c.is_ascii_whitespace() || c.is_ascii_control() => {
                i += rest.iter().position(|&b| b == b'\n')? + 1;
            }
            [b'#', ..] => i += rest.iter().position(|&b| b == b'\n')? + 1,
            _ => break,
        }
    }
    let word = sql
        .get(i..)?
        .iter()
        .take_while(|b| b.is_ascii_alphabetic() || **b == b'_')
        .count();
    if word == 0 || word > MAX_OPERATION_BYTES {
        return None;
    }
    Some((i, i + word))
}

/// `db.operation.name`: the first keyword, upper case.
fn operation(sql: &[u8]) -> Option<String> {
    let (start, end) = first_keyword(sql)?;
    let word = sql.get(start..end)?;
    Some(
        word.iter()
            .map(|b| char::from(b.to_ascii_uppercase()))
            .collect(),
    )
}

/// The database named by `USE db` (backquotes removed).
fn use_target(sql: &[u8]) -> Option<String> {
    let (_, end) = first_keyword(sql)?;
    let rest = sql.get(end..)?;
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    if start == 0 {
        return None;
    }
    let rest = rest.get(start..)?;
    let name: Vec<u8> = if let Some(quoted) = rest.strip_prefix(b"`") {
        // `a``b` is a``b unquoted to a`b.
        let mut name = Vec::new();
        let mut i = 0;
        loop {
            match (quoted.get(i), quoted.get(i + 1)) {
                (Some(b'`'), Some(b'`')) => {
                    name.push(b'`');
                    i += 2;
                }
                (Some(b'`'), _) => break,
                (Some(&b), _) => {
                    name.push(b);
                    i += 1;
                }
                (None, _) => return None,
            }
            if name.len() > MAX_NAME_BYTES {
                return None;
            }
        }
        name
    } else {
        rest.iter()
            .take_while(|&&b| !b.is_ascii_whitespace() && b != b';')
            .copied()
            .collect()
    };
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return None;
    }
    Some(String::from_utf8_lossy(&name).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One recorded connection (see testdata/mysql/capture.py).
    macro_rules! capture {
        ($name:literal) => {
            (
                $name,
                &include_bytes!(concat!("../testdata/mysql/", $name, ".cap"))[..],
            )
        };
    }

    #[derive(Clone, Copy, Debug)]
    struct Record<'a> {
        dir: Direction,
        ts: u64,
        bytes: &'a [u8],
    }

    /// The records of a capture file (testdata/README.md).
    fn records(data: &[u8]) -> Vec<Record<'_>> {
        let capture = crate::testdata::parse(data).expect("capture file");
        capture
            .records
            .iter()
            .map(|r| Record {
                dir: if r.from_client {
                    Direction::Client
                } else {
                    Direction::Server
                },
                ts: r.ts_ns,
                bytes: r.bytes,
            })
            .collect()
    }

    /// What a test compares of a call: operation, query text, namespace, error, rows.
    type Summary = (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<u64>,
    );

    fn ok(op: &str, text: &str, ns: &str, rows: u64) -> Summary {
        (
            Some(op.into()),
            Some(text.into()),
            Some(ns.into()),
            None,
            Some(rows),
        )
    }

    fn failed(op: &str, text: &str, ns: &str, code: &str) -> Summary {
        (
            Some(op.into()),
            Some(text.into()),
            Some(ns.into()),
            Some(code.into()),
            None,
        )
    }

    fn summary(calls: &[DbCall]) -> Vec<Summary> {
        calls
            .iter()
            .map(|c| {
                assert_eq!(c.system, DbSystem::Mysql);
                (
                    c.operation.clone(),
                    c.query_text.clone(),
                    c.namespace.clone(),
                    c.error_code.clone(),
                    c.rows,
                )
            })
            .collect()
    }

    struct Case {
        name: &'static str,
        data: &'static [u8],
        calls: Vec<Summary>,
        /// Transaction status changes, from the first one known.
        tx: &'static [TxStatus],
        namespace: Option<&'static str>,
        user: Option<&'static str>,
        stopped: Option<StopReason>,
    }

    const TEST: &str = "tracer_test";
    const OTHER: &str = "tracer_other";
    const IDLE: &[TxStatus] = &[TxStatus::Idle];
    const BEGIN_COMMIT: &[TxStatus] = &[TxStatus::Idle, TxStatus::InTransaction, TxStatus::Idle];

    fn case((name, data): (&'static str, &'static [u8]), calls: Vec<Summary>) -> Case {
        Case {
            name,
            data,
            calls,
            tx: IDLE,
            namespace: Some(TEST),
            user: Some("tracer"),
            stopped: None,
        }
    }

    fn cases() -> Vec<Case> {
        let by_id = "SELECT id, name FROM items WHERE id = ?";
        let from_id = "SELECT id, name FROM items WHERE id >= ? ORDER BY id";
        vec![
            case(
                capture!("cli_select"),
                vec![
                    ok("SELECT", "SELECT 1 + 1 AS two", TEST, 1),
                    ok(
                        "SELECT",
                        "SELECT id, name FROM items WHERE id <= 3",
                        TEST,
                        3,
                    ),
                ],
            ),
            case(
                capture!("cli_error"),
                vec![failed(
                    "SELECT",
                    "SELECT * FROM no_such_table",
                    TEST,
                    "1146",
                )],
            ),
            Case {
                tx: BEGIN_COMMIT,
                ..case(
                    capture!("cli_transaction"),
                    vec![
                        ok("BEGIN", "BEGIN", TEST, 0),
                        ok(
                            "UPDATE",
                            "UPDATE items SET name = 'renamed' WHERE id = 5",
                            TEST,
                            1,
                        ),
                        ok("SELECT", "SELECT name FROM items WHERE id = 5", TEST, 1),
                        ok("COMMIT", "COMMIT", TEST, 0),
                    ],
                )
            },
            Case {
                namespace: Some(OTHER),
                ..case(
                    capture!("cli_init_db"),
                    vec![
                        ok("SELECT", "SELECT DATABASE()", TEST, 1),
                        ok("SELECT", "SELECT DATABASE()", OTHER, 1),
                    ],
                )
            },
            case(
                capture!("cli_multi_result"),
                vec![ok("CALL", "CALL two_results()", TEST, 4)],
            ),
            case(
                capture!("cli_local_infile"),
                vec![
                    ok(
                        "LOAD",
                        "LOAD DATA LOCAL INFILE '/tmp/tracer_mysql_capture_rows.csv' INTO TABLE loaded FIELDS TERMINATED BY ','",
                        TEST,
                        100,
                    ),
                    ok("SELECT", "SELECT COUNT(*) FROM loaded", TEST, 1),
                ],
            ),
            Case {
                namespace: None,
                user: None,
                stopped: Some(StopReason::Tls),
                ..case(capture!("cli_tls"), vec![])
            },
            Case {
                stopped: Some(StopReason::Compressed),
                ..case(capture!("cli_compressed"), vec![])
            },
            case(
                capture!("connector_prepared"),
                vec![
                    ok(
                        "SET",
                        "SET NAMES 'utf8mb4' COLLATE 'utf8mb4_general_ci'",
                        TEST,
                        0,
                    ),
                    ok("SET", "SET @@session.autocommit = ON", TEST, 0),
                    ok("SELECT", by_id, TEST, 1),
                    ok("SELECT", by_id, TEST, 1),
                    failed(
                        "SELECT",
                        "SELECT no_such_column FROM items WHERE id = ?",
                        TEST,
                        "1054",
                    ),
                    failed(
                        "INSERT",
                        "INSERT INTO items (id, name) VALUES (?, ?)",
                        TEST,
                        "1062",
                    ),
                    ok(
                        "SELECT",
                        "SELECT id, name, payload FROM items WHERE id <= ? ORDER BY id",
                        TEST,
                        150,
                    ),
                ],
            ),
            Case {
                namespace: Some(OTHER),
                ..case(
                    capture!("pymysql_text"),
                    vec![
                        ok("SET", "SET NAMES utf8mb4", TEST, 0),
                        ok(
                            "SELECT",
                            "SELECT id, payload FROM items ORDER BY id",
                            TEST,
                            200,
                        ),
                        failed("SELECT", "SELECT * FROM missing_table", TEST, "1146"),
                        ok(
                            "UPDATE",
                            "UPDATE items SET name = name WHERE id < 10",
                            TEST,
                            0,
                        ),
                        ok("CALL", "CALL two_results()", TEST, 4),
                        ok("USE", "USE tracer_other", TEST, 0),
                        ok("SELECT", "SELECT DATABASE()", OTHER, 1),
                    ],
                )
            },
            Case {
                tx: BEGIN_COMMIT,
                ..case(
                    capture!("raw_deprecate_eof"),
                    vec![
                        ok(
                            "SELECT",
                            "SELECT id, name FROM items WHERE id <= 3 ORDER BY id",
                            TEST,
                            3,
                        ),
                        ok("SELECT", "SELECT id FROM items WHERE id < 0", TEST, 0),
                        failed("SELECT", "SELECT * FROM no_such_table", TEST, "1146"),
                        ok("BEGIN", "BEGIN", TEST, 0),
                        ok(
                            "UPDATE",
                            "UPDATE items SET name = 'again' WHERE id BETWEEN 10 AND 12",
                            TEST,
                            3,
                        ),
                        ok("COMMIT", "COMMIT", TEST, 0),
                        ok("CALL", "CALL two_results()", TEST, 4),
                        ok("USE", "USE tracer_other", TEST, 0),
                        ok("SELECT", "SELECT DATABASE()", OTHER, 1),
                        ok("SELECT", from_id, TEST, 3),
                        ok("SELECT", from_id, TEST, 2),
                        // Executed with a cursor: the rows come with COM_STMT_FETCH.
                        ok("SELECT", from_id, TEST, 0),
                        ok("SELECT", "SELECT 1", TEST, 1),
                        ok("SELECT", "SELECT 2", TEST, 1),
                        ok("SELECT", "SELECT DATABASE()", TEST, 1),
                    ],
                )
            },
        ]
    }

    fn find_case(name: &str) -> Case {
        cases()
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no capture named {name}"))
    }

    type Feed<'a> = Vec<(Direction, Chunk<'a>)>;

    #[derive(Debug, Default)]
    struct Outcome {
        calls: Vec<DbCall>,
        errors: Vec<MysqlError>,
        tx: Vec<TxStatus>,
    }

    fn feed_into(dec: &mut MysqlDecoder, chunks: &[(Direction, Chunk<'_>)], out: &mut Outcome) {
        for (dir, chunk) in chunks {
            let result = match dir {
                Direction::Client => dec.client(chunk, &mut out.calls),
                Direction::Server => dec.server(chunk, &mut out.calls),
            };
            if let Err(e) = result {
                out.errors.push(e);
            }
            let tx = dec.tx_status();
            if tx != TxStatus::Unknown && out.tx.last() != Some(&tx) {
                out.tx.push(tx);
            }
            check_bounds(dec);
        }
    }

    fn run(chunks: &[(Direction, Chunk<'_>)]) -> (MysqlDecoder, Outcome) {
        let mut dec = MysqlDecoder::new();
        let mut out = Outcome::default();
        feed_into(&mut dec, chunks, &mut out);
        (dec, out)
    }

    /// Invariants that hold for any input.
    fn check_bounds(dec: &MysqlDecoder) {
        assert!(dec.pending.len() <= MAX_PENDING_COMMANDS);
        assert!(dec.statements.len() <= MAX_PREPARED_STATEMENTS);
        assert!(dec.statement_bytes <= MAX_PREPARED_TEXT_BYTES);
        assert_eq!(
            dec.statement_bytes,
            dec.statements.iter().map(|s| s.text.len()).sum::<usize>()
        );
        assert!(dec.client_rd.buf.len() <= COMMAND_KEEP);
        assert!(dec.server_rd.buf.len() <= PACKET_KEEP);
        assert!(
            dec.namespace
                .as_ref()
                .is_none_or(|n| n.len() <= MAX_NAME_BYTES)
        );
        assert!(dec.user.as_ref().is_none_or(|n| n.len() <= MAX_NAME_BYTES));
    }

    fn check_calls(calls: &[DbCall]) {
        for c in calls {
            assert!(c.start_ns <= c.end_ns, "{c:?}");
            assert!(
                c.query_text
                    .as_ref()
                    .is_none_or(|t| t.len() <= MAX_QUERY_TEXT_BYTES)
            );
            assert!(c.operation.as_ref().is_none_or(|o| {
                !o.is_empty()
                    && o.len() <= MAX_OPERATION_BYTES
                    && o.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
            }));
            assert!(
                c.namespace
                    .as_ref()
                    .is_none_or(|n| n.len() <= MAX_NAME_BYTES)
            );
        }
    }

    /// One chunk per record.
    fn whole<'a>(recs: &[Record<'a>]) -> Feed<'a> {
        recs.iter()
            .map(|r| (r.dir, Chunk::whole(r.bytes, r.ts)))
            .collect()
    }

    /// One chunk per byte, each with its record's timestamp.
    fn bytewise<'a>(recs: &[Record<'a>]) -> Feed<'a> {
        recs.iter()
            .flat_map(|r| {
                r.bytes
                    .chunks(1)
                    .map(move |b| (r.dir, Chunk::whole(b, r.ts)))
            })
            .collect()
    }

    /// Record `index` cut in two at `cut`, both halves with its timestamp.
    fn split_record<'a>(recs: &[Record<'a>], index: usize, cut: usize) -> Feed<'a> {
        let mut chunks = Feed::new();
        for (i, r) in recs.iter().enumerate() {
            if i == index {
                let (a, b) = r.bytes.split_at(cut);
                chunks.push((r.dir, Chunk::whole(a, r.ts)));
                chunks.push((r.dir, Chunk::whole(b, r.ts)));
            } else {
                chunks.push((r.dir, Chunk::whole(r.bytes, r.ts)));
            }
        }
        chunks
    }

    fn assert_clean(name: &str, out: &Outcome) {
        assert!(out.errors.is_empty(), "{name}: errors {:?}", out.errors);
        check_calls(&out.calls);
    }

    // ---- captured sessions -----------------------------------------------------

    #[test]
    fn captured_sessions_decode_exactly() {
        for c in cases() {
            let recs = records(c.data);
            let (mut dec, out) = run(&whole(&recs));
            assert_clean(c.name, &out);
            assert_eq!(summary(&out.calls), c.calls, "{}", c.name);
            assert_eq!(out.tx, c.tx, "{} tx", c.name);
            assert_eq!(dec.namespace(), c.namespace, "{} namespace", c.name);
            assert_eq!(dec.user(), c.user, "{} user", c.name);
            assert_eq!(dec.stopped(), c.stopped, "{} stopped", c.name);
            assert_eq!(dec.is_encrypted(), c.stopped == Some(StopReason::Tls));
            assert!(!dec.in_flight(), "{}: {dec:?}", c.name);
            assert_eq!(dec.finish(), 0);
            assert!(looks_like_server_greeting(recs[0].bytes), "{}", c.name);
        }
    }

    #[test]
    fn capabilities_come_from_the_handshake() {
        // (capture, CLIENT_DEPRECATE_EOF negotiated)
        for (name, deprecate) in [
            ("cli_select", false),
            ("connector_prepared", false),
            ("pymysql_text", false),
            ("raw_deprecate_eof", true),
        ] {
            let c = find_case(name);
            let recs = records(c.data);
            let (dec, _) = run(&whole(&recs[..2]));
            assert_eq!(dec.phase, Phase::Auth, "{name}");
            assert_eq!(dec.deprecate_eof, Some(deprecate), "{name}");
            assert_eq!(dec.query_attributes(), Some(false), "{name}");
            // MariaDB server and client: extended capabilities above bit 32.
            if name == "cli_select" {
                let caps = dec.server_caps.unwrap() & dec.client_caps.unwrap();
                assert_ne!(caps >> 32, 0, "{name}");
            }
        }
    }

    #[test]
    fn calls_carry_the_timestamps_of_their_first_and_last_chunks() {
        let c = find_case("pymysql_text");
        let recs = records(c.data);
        let (_, out) = run(&whole(&recs));
        let big = &out.calls[1];
        assert_eq!(big.rows, Some(200));
        let sent = recs
            .iter()
            .position(|r| {
                r.bytes
                    .ends_with(b"SELECT id, payload FROM items ORDER BY id")
            })
            .expect("command in capture");
        let answered = recs[sent + 1..]
            .iter()
            .position(|r| r.dir == Direction::Client)
            .expect("next command")
            + sent;
        assert!(answered > sent + 2, "the answer spans several reads");
        assert_eq!(big.start_ns, recs[sent].ts);
        assert_eq!(big.end_ns, recs[answered].ts);
        for call in &out.calls {
            assert!(
                recs.iter()
                    .any(|r| r.dir == Direction::Client && r.ts == call.start_ns)
            );
            assert!(
                recs.iter()
                    .any(|r| r.dir == Direction::Server && r.ts == call.end_ns)
            );
        }
    }

    // ---- splits and gaps -------------------------------------------------------

    /// Every byte its own chunk, and every record cut in two at every point (every
    /// 7th point inside large records) give exactly the calls of the whole records.
    #[test]
    fn every_split_point_gives_the_same_calls() {
        for c in cases() {
            let recs = records(c.data);
            let (_, reference) = run(&whole(&recs));
            let (dec, out) = run(&bytewise(&recs));
            assert_clean(c.name, &out);
            assert_eq!(out.calls, reference.calls, "{} bytewise", c.name);
            assert_eq!(out.tx, reference.tx, "{} bytewise tx", c.name);
            assert_eq!(dec.namespace(), c.namespace, "{} bytewise", c.name);
            for (i, r) in recs.iter().enumerate() {
                let step = if r.bytes.len() > 512 { 7 } else { 1 };
                for cut in (1..r.bytes.len()).step_by(step) {
                    let (_, out) = run(&split_record(&recs, i, cut));
                    assert!(
                        out.errors.is_empty(),
                        "{} record {i} cut {cut}: {:?}",
                        c.name,
                        out.errors
                    );
                    assert_eq!(
                        out.calls, reference.calls,
                        "{} record {i} cut {cut}",
                        c.name
                    );
                }
            }
        }
    }

    /// Server packets (other than the greeting) of at least 100 bytes, each lying in
    /// one record: (record index, payload start, payload end) as offsets in it. These
    /// are rows and the COM_STATISTICS text: only their first byte is read.
    fn large_server_packets(recs: &[Record<'_>]) -> Vec<(usize, usize, usize)> {
        let mut found = Vec::new();
        let mut stream = Vec::new();
        let mut owner = Vec::new();
        for (i, r) in recs.iter().enumerate() {
            if r.dir == Direction::Server {
                stream.extend_from_slice(r.bytes);
                owner.extend((0..r.bytes.len()).map(|off| (i, off)));
            }
        }
        let mut at = 0;
        while at + 4 <= stream.len() {
            let len = u24(stream[at], stream[at + 1], stream[at + 2]);
            let seq = stream[at + 3];
            let (start, end) = (at + 4, at + 4 + len);
            if end > stream.len() {
                break;
            }
            if seq != 0 && len >= 100 && owner[start].0 == owner[end - 1].0 {
                found.push((owner[start].0, owner[start].1, owner[end - 1].1 + 1));
            }
            at = end;
        }
        found
    }

    /// The records with, for each chosen packet, a chunk that ends `captured(len)`
    /// bytes into its payload and whose gap runs to the payload's end.
    fn with_row_gaps<'a>(
        recs: &[Record<'a>],
        packets: &[(usize, usize, usize)],
        captured: impl Fn(usize, usize) -> usize,
    ) -> Feed<'a> {
        let mut chunks = Feed::new();
        for (i, r) in recs.iter().enumerate() {
            let mut from = 0;
            for (n, &(_, start, end)) in packets.iter().enumerate().filter(|(_, p)| p.0 == i) {
                let cut = start + captured(n, end - start);
                chunks.push((
                    r.dir,
                    Chunk {
                        bytes: &r.bytes[from..cut],
                        len: end - from,
                        ts_ns: r.ts,
                    },
                ));
                from = end;
            }
            chunks.push((r.dir, Chunk::whole(&r.bytes[from..], r.ts)));
        }
        chunks
    }

    #[test]
    fn gaps_inside_row_payloads_are_skipped_exactly() {
        let mut gapped = 0;
        for c in cases() {
            let recs = records(c.data);
            let packets = large_server_packets(&recs);
            if packets.is_empty() {
                continue;
            }
            gapped += packets.len();
            let (_, reference) = run(&whole(&recs));
            // Rows whose first byte is uncaptured too (0): the connection does not
            // use CLIENT_DEPRECATE_EOF, so a packet that is not 5 bytes is a row.
            for keep in [0, 1, 2, 5, 63, 64, 65, 99] {
                let (_, out) = run(&with_row_gaps(&recs, &packets, |_, len| keep.min(len - 1)));
                assert!(
                    out.errors.is_empty(),
                    "{} keep {keep}: {:?}",
                    c.name,
                    out.errors
                );
                assert_eq!(out.calls, reference.calls, "{} keep {keep}", c.name);
            }
            let (_, out) = run(&with_row_gaps(&recs, &packets, |n, len| (n * 37) % len));
            assert!(out.errors.is_empty(), "{} mixed: {:?}", c.name, out.errors);
            assert_eq!(out.calls, reference.calls, "{} mixed", c.name);
            // One gap at a time, bytewise around it.
            for &packet in packets.iter().step_by(25) {
                let chunks = with_row_gaps(&recs, &[packet], |_, _| 3);
                let mut dec = MysqlDecoder::new();
                let mut out = Outcome::default();
                for (dir, chunk) in &chunks {
                    if chunk.gap() > 0 {
                        // Bytes one at a time, the last one carrying the gap.
                        let (last, first) = chunk.bytes.split_last().unwrap();
                        let mut pieces: Feed = first
                            .chunks(1)
                            .map(|b| (*dir, Chunk::whole(b, chunk.ts_ns)))
                            .collect();
                        pieces.push((
                            *dir,
                            Chunk {
                                bytes: std::slice::from_ref(last),
                                len: chunk.len - first.len(),
                                ts_ns: chunk.ts_ns,
                            },
                        ));
                        feed_into(&mut dec, &pieces, &mut out);
                    } else {
                        feed_into(&mut dec, &[(*dir, *chunk)], &mut out);
                    }
                }
                assert!(out.errors.is_empty(), "{}: {:?}", c.name, out.errors);
                assert_eq!(out.calls, reference.calls, "{} one gap", c.name);
            }
        }
        assert!(gapped > 300, "only {gapped} packets were gapped");
    }

    #[test]
    fn gap_over_server_headers_drops_the_call_then_resyncs() {
        let c = find_case("pymysql_text");
        let recs = records(c.data);
        // The second read of the 200-row answer: capture 100 bytes of it only.
        let sent = recs
            .iter()
            .position(|r| {
                r.bytes
                    .ends_with(b"SELECT id, payload FROM items ORDER BY id")
            })
            .unwrap();
        let cut = sent + 2;
        assert_eq!(recs[cut].dir, Direction::Server);
        let mut chunks = whole(&recs);
        chunks[cut].1 = Chunk {
            bytes: &recs[cut].bytes[..100],
            len: recs[cut].bytes.len(),
            ts_ns: recs[cut].ts,
        };
        let (dec, out) = run(&chunks);
        assert_eq!(
            out.errors,
            [MysqlError::HeaderInGap {
                direction: Direction::Server
            }]
        );
        let mut expected = c.calls.clone();
        expected.remove(1);
        assert_eq!(summary(&out.calls), expected);
        assert_eq!(dec.namespace(), Some(OTHER));
        assert!(!dec.in_flight());
    }

    #[test]
    fn gap_over_a_client_header_keeps_the_command_in_flight() {
        let c = find_case("raw_deprecate_eof");
        let recs = records(c.data);
        // "SELECT 1" and "SELECT 2" pipelined in one write: lose the second header.
        let i = recs
            .iter()
            .position(|r| r.bytes.ends_with(b"\x03SELECT 2"))
            .unwrap();
        let mut chunks = whole(&recs);
        chunks[i].1 = Chunk {
            bytes: &recs[i].bytes[..15],
            len: recs[i].bytes.len(),
            ts_ns: recs[i].ts,
        };
        let (_, out) = run(&chunks);
        assert_eq!(
            out.errors,
            [MysqlError::HeaderInGap {
                direction: Direction::Client
            }]
        );
        let mut expected = c.calls.clone();
        let second = expected
            .iter()
            .position(|s| s.1.as_deref() == Some("SELECT 2"))
            .unwrap();
        expected.remove(second);
        assert_eq!(summary(&out.calls), expected);
    }

    #[test]
    fn gap_inside_a_local_infile_upload_still_completes_the_load() {
        let c = find_case("cli_local_infile");
        let recs = records(c.data);
        let i = recs
            .iter()
            .position(|r| r.dir == Direction::Client && r.bytes.len() > 900)
            .unwrap();
        let mut chunks = whole(&recs);
        // The upload's end (its empty packet) is in the gap.
        chunks[i].1 = Chunk {
            bytes: &recs[i].bytes[..100],
            len: recs[i].bytes.len(),
            ts_ns: recs[i].ts,
        };
        let (dec, out) = run(&chunks);
        assert_eq!(
            out.errors,
            [MysqlError::HeaderInGap {
                direction: Direction::Client
            }]
        );
        assert_eq!(summary(&out.calls), c.calls);
        assert!(!dec.upload);
    }

    // ---- joining, errors, recovery ---------------------------------------------

    /// The records after the handshake (greeting, response, auth OK).
    fn after_handshake<'a>(recs: &[Record<'a>]) -> Vec<Record<'a>> {
        recs[3..].to_vec()
    }

    fn without_namespace(calls: Vec<Summary>) -> Vec<Summary> {
        calls
            .into_iter()
            .map(|(op, text, _, err, rows)| (op, text, None, err, rows))
            .collect()
    }

    #[test]
    fn joining_mid_connection_infers_what_the_handshake_would_say() {
        for name in [
            "cli_select",
            "cli_transaction",
            "cli_multi_result",
            "cli_local_infile",
            "connector_prepared",
            "pymysql_text",
            "raw_deprecate_eof",
        ] {
            let c = find_case(name);
            let recs = after_handshake(&records(c.data));
            let (dec, out) = run(&whole(&recs));
            assert_clean(name, &out);
            let got: Vec<Summary> = without_namespace(summary(&out.calls));
            assert_eq!(got, without_namespace(c.calls.clone()), "{name}");
            assert_eq!(dec.user(), None);
            let (_, bytewise) = run(&bytewise(&recs));
            assert_eq!(bytewise.calls, out.calls, "{name} bytewise");
            if name == "raw_deprecate_eof" {
                assert_eq!(dec.deprecate_eof, Some(true));
                // Session-state tracking reported the schema changes.
                assert_eq!(dec.namespace(), Some(TEST));
                assert_eq!(out.calls[8].namespace.as_deref(), Some(OTHER));
            }
            if name == "connector_prepared" {
                assert_eq!(dec.deprecate_eof, Some(false));
            }
        }
    }

    #[test]
    fn executing_a_statement_prepared_before_the_join_has_no_text() {
        let c = find_case("connector_prepared");
        let recs = records(c.data);
        // Join at the first COM_STMT_RESET (after the first prepare).
        let join = recs
            .iter()
            .position(|r| r.dir == Direction::Client && r.bytes.get(4) == Some(&COM_STMT_RESET))
            .unwrap();
        let (_, out) = run(&whole(&recs[join..]));
        assert_clean(c.name, &out);
        let got = summary(&out.calls);
        assert_eq!(got[0], (None, None, None, None, Some(1)));
        assert_eq!(got[1], (None, None, None, None, Some(1)));
        assert_eq!(got[2].3.as_deref(), Some("1054"));
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn decoder_waits_for_a_plausible_start() {
        let c = find_case("cli_select");
        let recs = records(c.data);
        let mut chunks: Feed = vec![
            (
                Direction::Server,
                Chunk::whole(b"\x07\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00", 1),
            ),
            (
                Direction::Client,
                Chunk::whole(b"GET / HTTP/1.1\r\n\r\n", 1),
            ),
            (
                Direction::Client,
                Chunk::whole(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc", 1),
            ),
            (
                Direction::Client,
                Chunk::whole(b"\x05\x00\x00\x00\x99abcd", 1),
            ),
            (
                Direction::Client,
                Chunk::whole(b"\x05\x00\x00\x00\x0eabcd", 1),
            ),
        ];
        chunks.extend(whole(&after_handshake(&recs)));
        let (_, out) = run(&chunks);
        assert_clean(c.name, &out);
        assert_eq!(summary(&out.calls), without_namespace(c.calls.clone()));
    }

    #[test]
    fn unknown_command_is_an_error_then_recovers() {
        let c = find_case("cli_select");
        let recs = records(c.data);
        let mut chunks = whole(&recs);
        let first_command = 3;
        chunks.insert(
            first_command,
            (
                Direction::Client,
                Chunk::whole(b"\x05\x00\x00\x00\x99junk", 1),
            ),
        );
        let (_, out) = run(&chunks);
        assert_eq!(out.errors, [MysqlError::UnknownCommand]);
        assert_eq!(summary(&out.calls), c.calls);
    }

    #[test]
    fn server_garbage_between_answers_is_not_read() {
        let c = find_case("cli_select");
        let recs = records(c.data);
        let mut chunks = whole(&recs);
        // A bogus 16 MiB packet header while nothing is asked: it must not swallow
        // the next answer.
        chunks.insert(
            5,
            (
                Direction::Server,
                Chunk::whole(b"\xff\xff\xff\x01\x00\x00\x00\x00\x00", recs[4].ts),
            ),
        );
        let (_, out) = run(&chunks);
        assert_clean(c.name, &out);
        assert_eq!(summary(&out.calls), c.calls);
    }

    #[test]
    fn malformed_answers_are_errors_then_recover() {
        let c = find_case("cli_select");
        let recs = records(c.data);
        let second = &c.calls[1..];
        let server = |packet, reason| MysqlError::Malformed {
            direction: Direction::Server,
            packet,
            reason,
        };
        // (answer to "SELECT 1 + 1 AS two", errors, calls)
        let table: &[(&[u8], Vec<MysqlError>, &[Summary])] = &[
            // An ERR without its error number: the call is dropped, the next decoded.
            (
                b"\x02\x00\x00\x01\xff\x01",
                vec![server("ERR packet", "no error number")],
                second,
            ),
            (
                b"\x02\x00\x00\x01\xfc\x01",
                vec![server(
                    "column count",
                    "not a positive length-encoded integer",
                )],
                second,
            ),
            // An upload request the client does not answer: its next command is read
            // as upload data, and the next answer is not an OK or ERR.
            (
                b"\x01\x00\x00\x01\xfb",
                vec![server(
                    "LOCAL INFILE answer",
                    "expected OK or ERR after the upload",
                )],
                &[],
            ),
        ];
        for (answer, errors, calls) in table {
            let mut chunks = whole(&recs);
            chunks[4] = (Direction::Server, Chunk::whole(answer, recs[4].ts));
            let (dec, out) = run(&chunks);
            assert_eq!(&out.errors, errors, "{answer:?}");
            assert_eq!(summary(&out.calls), *calls, "{answer:?}");
            assert!(!dec.in_flight());
        }
        // A one-byte OK has no flags, and is not an error.
        let mut chunks = whole(&recs);
        chunks[4] = (
            Direction::Server,
            Chunk::whole(b"\x01\x00\x00\x01\x00", recs[4].ts),
        );
        let (_, out) = run(&chunks);
        assert_clean(c.name, &out);
        assert_eq!(out.calls.len(), 2);
        assert_eq!(out.calls[0].rows, Some(0));
    }

    #[test]
    fn truncated_session_leaves_the_call_in_flight() {
        let c = find_case("cli_select");
        let recs = records(c.data);
        // Stop after the second command, and inside its answer.
        for cut in [None, Some(30)] {
            let mut chunks = whole(&recs[..6]);
            if let Some(cut) = cut {
                chunks.push((Direction::Server, Chunk::whole(&recs[6].bytes[..cut], 1)));
            }
            let (mut dec, out) = run(&chunks);
            assert_clean(c.name, &out);
            assert_eq!(summary(&out.calls), c.calls[..1]);
            assert!(dec.in_flight());
            assert_eq!(dec.finish(), 1);
            assert!(!dec.in_flight());
            assert_eq!(dec.finish(), 0);
            assert_eq!(dec.namespace(), Some(TEST));
            // After finish, a new connection can be decoded.
            let (_, again) = {
                let mut out = Outcome::default();
                feed_into(&mut dec, &whole(&recs), &mut out);
                ((), out)
            };
            assert_eq!(summary(&again.calls), c.calls);
        }
    }

    #[test]
    fn errors_and_debug_output_never_contain_traffic() {
        let secrets = ["tracer", "items", "SELECT", "renamed", "no_such", "utf8mb4"];
        let mut printed = String::new();
        for c in cases() {
            let recs = records(c.data);
            let (mut dec, _) = run(&whole(&recs[..recs.len() / 2]));
            printed.push_str(&format!("{dec:?}"));
            // Gaps and garbage everywhere, for errors.
            let mut chunks = Feed::new();
            for r in &recs {
                let half = r.bytes.len() / 2;
                chunks.push((
                    r.dir,
                    Chunk {
                        bytes: &r.bytes[..half],
                        len: r.bytes.len(),
                        ts_ns: r.ts,
                    },
                ));
                chunks.push((r.dir, Chunk::whole(&r.bytes[half..], r.ts)));
            }
            let mut out = Outcome::default();
            feed_into(&mut dec, &chunks, &mut out);
            for e in &out.errors {
                printed.push_str(&format!("{e} {e:?}"));
            }
            printed.push_str(&format!("{dec:?}"));
        }
        assert!(printed.contains("HeaderInGap"), "no errors were made");
        for secret in secrets {
            assert!(!printed.contains(secret), "{secret} leaked: {printed}");
        }
    }

    // ---- synthetic exchanges ---------------------------------------------------

    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        assert!(len < MAX_PACKET_LEN);
        let mut p = vec![len as u8, (len >> 8) as u8, (len >> 16) as u8, seq];
        p.extend_from_slice(payload);
        p
    }

    /// A payload of any size as packets (split at 16 MiB - 1), from sequence id `seq`.
    fn packets(mut seq: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() + 16);
        let mut rest = payload;
        loop {
            let n = rest.len().min(MAX_PACKET_LEN);
            out.extend_from_slice(&[n as u8, (n >> 8) as u8, (n >> 16) as u8, seq]);
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            seq = seq.wrapping_add(1);
            if n < MAX_PACKET_LEN {
                return out;
            }
        }
    }

    const OK_IDLE: &[u8] = b"\x00\x00\x00\x02\x00\x00\x00";

    /// Greeting, handshake response and auth OK of a MySQL 8 style connection
    /// (CLIENT_MYSQL set, so no MariaDB capabilities) with `caps` on both sides.
    fn handshake(caps: u32) -> Vec<(Direction, Vec<u8>)> {
        let mut greeting = vec![10];
        greeting.extend_from_slice(b"8.4.0\0");
        greeting.extend_from_slice(&7u32.to_le_bytes());
        greeting.extend_from_slice(b"abcdefgh\0");
        greeting.extend_from_slice(&(caps as u16).to_le_bytes());
        greeting.push(255);
        greeting.extend_from_slice(&2u16.to_le_bytes());
        greeting.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
        greeting.push(21);
        greeting.extend_from_slice(&[0; 10]);
        greeting.extend_from_slice(b"ijklmnopqrst\0caching_sha2_password\0");
        let mut response = caps.to_le_bytes().to_vec();
        response.extend_from_slice(&(1u32 << 24).to_le_bytes());
        response.push(255);
        response.extend_from_slice(&[0; 23]);
        response.extend_from_slice(b"app\0");
        response.push(32);
        response.extend_from_slice(&[0x5a; 32]);
        response.extend_from_slice(b"shop\0caching_sha2_password\0");
        vec![
            (Direction::Server, packet(0, &greeting)),
            (Direction::Client, packet(1, &response)),
            // caching_sha2_password fast auth success, then OK.
            (Direction::Server, packet(2, b"\x01\x03")),
            (Direction::Server, packet(3, OK_IDLE)),
        ]
    }

    const MYSQL8_CAPS: u32 = (CLIENT_MYSQL
        | CLIENT_CONNECT_WITH_DB
        | CLIENT_PROTOCOL_41
        | CLIENT_SECURE_CONNECTION
        | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
        | CLIENT_DEPRECATE_EOF
        | CLIENT_QUERY_ATTRIBUTES
        | (1 << 19)) as u32;

    fn run_owned(exchange: &[(Direction, Vec<u8>)]) -> (MysqlDecoder, Outcome) {
        let chunks: Feed = exchange
            .iter()
            .enumerate()
            .map(|(i, (dir, bytes))| (*dir, Chunk::whole(bytes, i as u64 + 1)))
            .collect();
        run(&chunks)
    }

    /// After an SSLRequest the plaintext (from the TLS probes) goes on with the
    /// handshake response, sequence id 2, then commands, as if never encrypted.
    #[test]
    fn an_encrypted_session_resumes_in_plaintext_from_its_handshake_response() {
        let caps = MYSQL8_CAPS | CLIENT_SSL as u32;
        let plain = handshake(caps);
        let greeting = plain[0].1.clone();
        let response = &plain[1].1[4..];
        let ssl_request = packet(1, &response[..32]);
        let mut dec = MysqlDecoder::new();
        let mut out = Outcome::default();
        let before: Feed = vec![
            (Direction::Server, Chunk::whole(&greeting, 1)),
            (Direction::Client, Chunk::whole(&ssl_request, 2)),
            (
                Direction::Client,
                Chunk::whole(b"\x16\x03\x01\x02\x00 ciphertext", 3),
            ),
        ];
        feed_into(&mut dec, &before, &mut out);
        assert!(dec.is_encrypted());
        dec.resume_in_plaintext();
        assert!(!dec.is_encrypted());
        let inside = [
            (Direction::Client, packet(2, response)),
            (Direction::Server, packet(3, b"\x01\x03")),
            (Direction::Server, packet(4, OK_IDLE)),
            (Direction::Client, packet(0, b"\x03SELECT 1")),
            (Direction::Server, packet(1, OK_IDLE)),
        ];
        let after: Feed = inside
            .iter()
            .enumerate()
            .map(|(i, (dir, bytes))| (*dir, Chunk::whole(bytes, i as u64 + 10)))
            .collect();
        feed_into(&mut dec, &after, &mut out);
        assert_clean("resumed after TLS", &out);
        assert_eq!(dec.user(), Some("app"));
        assert_eq!(dec.namespace(), Some("shop"));
        assert_eq!(out.calls.len(), 1);
        assert_eq!(out.calls[0].query_text.as_deref(), Some("SELECT 1"));
    }

    #[test]
    fn mysql8_query_attributes_are_skipped() {
        let mut exchange = handshake(MYSQL8_CAPS);
        let mut with_attribute = b"\x03\x01\x01\x00\x01\xfe\x00\x0btraceparent".to_vec();
        with_attribute
            .extend_from_slice(b"\x3700-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        with_attribute.extend_from_slice(b"SELECT 2");
        let queries: [&[u8]; 4] = [
            b"\x03\x00\x01SELECT 1",
            &with_attribute,
            // Two attributes, the first NULL.
            b"\x03\x02\x01\x01\x01\x06\x00\x01a\x08\x00\x01b\x2a\x00\x00\x00\x00\x00\x00\x00UPDATE t SET x = 1",
            // Types not sent: the text cannot be found.
            b"\x03\x01\x01\x00\x00DELETE FROM t",
        ];
        for q in queries {
            exchange.push((Direction::Client, packet(0, q)));
            exchange.push((Direction::Server, packet(1, OK_IDLE)));
        }
        let (dec, out) = run_owned(&exchange);
        assert_clean("query attributes", &out);
        assert_eq!(dec.user(), Some("app"));
        assert_eq!(dec.namespace(), Some("shop"));
        assert_eq!(dec.deprecate_eof, Some(true));
        let texts: Vec<_> = out
            .calls
            .iter()
            .map(|c| {
                (
                    c.operation.as_deref(),
                    c.query_text.as_deref().map(|t| t.len()),
                )
            })
            .collect();
        assert_eq!(out.calls[0].query_text.as_deref(), Some("SELECT 1"));
        assert_eq!(out.calls[1].query_text.as_deref(), Some("SELECT 2"));
        assert_eq!(
            out.calls[2].query_text.as_deref(),
            Some("UPDATE t SET x = 1")
        );
        assert_eq!(texts[3].0, None, "{texts:?}");
        assert!(
            out.calls
                .iter()
                .all(|c| c.namespace.as_deref() == Some("shop"))
        );
    }

    #[test]
    fn deprecate_eof_result_sets_and_prepares() {
        let mut exchange = handshake(MYSQL8_CAPS);
        let coldef =
            b"\x03def\x00\x00\x00\x01a\x00\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00";
        // Prepare with 2 params and 1 column: no EOFs in between.
        exchange.push((
            Direction::Client,
            packet(0, b"\x16SELECT a FROM t WHERE b = ? AND c = ?"),
        ));
        let mut answer = packet(1, b"\x00\x09\x00\x00\x00\x01\x00\x02\x00\x00\x00\x00");
        answer.extend(packet(2, coldef));
        answer.extend(packet(3, coldef));
        answer.extend(packet(4, coldef));
        exchange.push((Direction::Server, answer));
        // Execute: column count, definition, two binary rows, OK with 0xFE.
        exchange.push((
            Direction::Client,
            packet(0, b"\x17\x09\x00\x00\x00\x00\x01\x00\x00\x00\x00\x01\x03\x00\x03\x00\x01\x00\x00\x00\x02\x00\x00\x00"),
        ));
        let mut answer = packet(1, b"\x01");
        answer.extend(packet(2, coldef));
        answer.extend(packet(3, b"\x00\x00\x01\x00\x00\x00"));
        answer.extend(packet(4, b"\x00\x00\x02\x00\x00\x00"));
        answer.extend(packet(5, b"\xfe\x00\x00\x03\x00\x00\x00"));
        exchange.push((Direction::Server, answer));
        let (dec, out) = run_owned(&exchange);
        assert_clean("deprecate eof", &out);
        assert_eq!(
            summary(&out.calls),
            [ok(
                "SELECT",
                "SELECT a FROM t WHERE b = ? AND c = ?",
                "shop",
                2
            )]
        );
        assert_eq!(dec.tx_status(), TxStatus::InTransaction);
        assert!(!dec.in_flight());
    }

    #[test]
    fn payloads_of_16_mib_and_more_are_joined() {
        // 4096 bytes captured: a header, the command byte and 4091 bytes of SQL.
        const CAPTURED_SQL: usize = 4096 - 5;
        let mut sql = b"\x03SELECT '".to_vec();
        sql.resize(MAX_PACKET_LEN + 10, b'a');
        sql.push(b'\'');
        let query = packets(0, &sql);
        let answer = packet(2, OK_IDLE);
        // Fully captured, in 1 MiB reads.
        let mut chunks: Feed = query
            .chunks(1 << 20)
            .map(|c| (Direction::Client, Chunk::whole(c, 5)))
            .collect();
        chunks.push((Direction::Server, Chunk::whole(&answer, 6)));
        // `text_len`: SQL bytes captured, up to the limit.
        let check = |out: &Outcome, text_len: usize| {
            assert_eq!(out.calls.len(), 1);
            let call = &out.calls[0];
            assert_eq!(call.operation.as_deref(), Some("SELECT"));
            let text = call.query_text.as_deref().unwrap();
            assert_eq!(text.len(), text_len);
            assert!(text.starts_with("SELECT 'aaa"));
            assert_eq!((call.start_ns, call.end_ns), (5, 6));
        };
        let (_, out) = run(&chunks);
        assert_clean("16 MiB query", &out);
        check(&out, MAX_QUERY_TEXT_BYTES);
        // 4 KiB captured, the rest of the first packet a gap; the continuation header
        // starts the next read.
        let first = 4 + MAX_PACKET_LEN;
        let chunks: Feed = vec![
            (
                Direction::Client,
                Chunk {
                    bytes: &query[..4096],
                    len: first,
                    ts_ns: 5,
                },
            ),
            (Direction::Client, Chunk::whole(&query[first..], 5)),
            (Direction::Server, Chunk::whole(&answer, 6)),
        ];
        let (_, out) = run(&chunks);
        assert_clean("16 MiB query with a gap", &out);
        check(&out, CAPTURED_SQL);
        // One write, 4 KiB captured: the continuation header is lost, the call is not.
        let chunks: Feed = vec![
            (
                Direction::Client,
                Chunk {
                    bytes: &query[..4096],
                    len: query.len(),
                    ts_ns: 5,
                },
            ),
            (Direction::Server, Chunk::whole(&answer, 6)),
        ];
        let (_, out) = run(&chunks);
        assert_eq!(
            out.errors,
            [MysqlError::HeaderInGap {
                direction: Direction::Client
            }]
        );
        check(&out, CAPTURED_SQL);
    }

    #[test]
    fn rows_of_16_mib_and_more_count_once() {
        let coldef =
            b"\x03def\x00\x00\x00\x01a\x00\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00";
        let mut row = vec![0xfe];
        let cell = MAX_PACKET_LEN + 100;
        row.extend_from_slice(&(cell as u64).to_le_bytes());
        row.resize(row.len() + cell, b'x');
        // Also a row of exactly 16 MiB - 1 bytes: an empty packet ends it.
        let mut exact = vec![0xfc, 0xfb, 0xff];
        exact.resize(MAX_PACKET_LEN, b'y');
        let mut answer = packet(1, b"\x01");
        answer.extend(packet(2, coldef));
        answer.extend(packet(3, b"\xfe\x00\x00\x02\x00"));
        answer.extend(packets(4, &row));
        answer.extend(packets(6, &exact));
        answer.extend(packet(8, b"\x01z"));
        answer.extend(packet(9, b"\xfe\x00\x00\x02\x00"));
        let query = packet(0, b"\x03SELECT a FROM big");
        for captured in [usize::MAX, 200] {
            let mut chunks: Feed = vec![(Direction::Client, Chunk::whole(&query, 1))];
            // Reads of 8 MiB, `captured` bytes of each captured.
            for (i, read) in answer.chunks(8 << 20).enumerate() {
                chunks.push((
                    Direction::Server,
                    Chunk {
                        bytes: &read[..read.len().min(captured)],
                        len: read.len(),
                        ts_ns: 2 + i as u64,
                    },
                ));
            }
            let (_, out) = run(&chunks);
            if captured == usize::MAX {
                assert_clean("big rows", &out);
                assert_eq!(out.calls.len(), 1);
                assert_eq!(out.calls[0].rows, Some(3));
            } else {
                // Reads end in gaps that may hide headers: never a panic, and either
                // the exact call or a counted loss of sync.
                assert!(out.calls.len() + out.errors.len() >= 1, "{out:?}");
            }
        }
        // Headers at read starts, gaps over payloads only: exact.
        let mut chunks: Feed = vec![(Direction::Client, Chunk::whole(&query, 1))];
        let mut at = 0;
        while at < answer.len() {
            let len = u24(answer[at], answer[at + 1], answer[at + 2]);
            let end = at + 4 + len;
            chunks.push((
                Direction::Server,
                Chunk {
                    bytes: &answer[at..(at + 6).min(end)],
                    len: end - at,
                    ts_ns: 9,
                },
            ));
            at = end;
        }
        let (_, out) = run(&chunks);
        assert_clean("big rows, gaps", &out);
        assert_eq!(out.calls[0].rows, Some(3));
    }

    /// Client and server chunks of a connection joined after its handshake.
    fn joined(exchange: &[(Direction, Vec<u8>)]) -> (MysqlDecoder, Outcome) {
        run_owned(exchange)
    }

    fn prepare_ok(id: u32) -> Vec<u8> {
        let mut p = vec![0];
        p.extend_from_slice(&id.to_le_bytes());
        p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        p
    }

    fn execute(id: u32) -> Vec<u8> {
        let mut p = vec![COM_STMT_EXECUTE];
        p.extend_from_slice(&id.to_le_bytes());
        p.extend_from_slice(&[0, 1, 0, 0, 0]);
        p
    }

    #[test]
    fn prepared_statements_are_bounded() {
        let mut exchange = Vec::new();
        let count = MAX_PREPARED_STATEMENTS as u32 + 76;
        for id in 1..=count {
            let sql = format!("\x16INSERT INTO t{id} VALUES (1)");
            exchange.push((Direction::Client, packet(0, sql.as_bytes())));
            exchange.push((Direction::Server, packet(1, &prepare_ok(id))));
        }
        for id in [1, 76, 77, count] {
            exchange.push((Direction::Client, packet(0, &execute(id))));
            exchange.push((
                Direction::Server,
                packet(1, b"\x00\x01\x00\x02\x00\x00\x00"),
            ));
        }
        let (dec, out) = joined(&exchange);
        assert_clean("bounded statements", &out);
        assert_eq!(dec.statements.len(), MAX_PREPARED_STATEMENTS);
        let texts: Vec<_> = out.calls.iter().map(|c| c.query_text.clone()).collect();
        assert_eq!(
            texts,
            [
                None,
                None,
                Some("INSERT INTO t77 VALUES (1)".into()),
                Some(format!("INSERT INTO t{count} VALUES (1)")),
            ]
        );
        assert!(out.calls.iter().all(|c| c.rows == Some(1)));

        // By text size: 100 statements of 4 KiB.
        let mut exchange = Vec::new();
        for id in 1..=100u32 {
            let mut sql = b"\x16SELECT ".to_vec();
            sql.resize(1 + MAX_QUERY_TEXT_BYTES + 50, b'1');
            exchange.push((Direction::Client, packet(0, &sql)));
            exchange.push((Direction::Server, packet(1, &prepare_ok(id))));
        }
        let (dec, out) = joined(&exchange);
        assert_clean("bounded statement bytes", &out);
        assert_eq!(
            dec.statements.len(),
            MAX_PREPARED_TEXT_BYTES / MAX_QUERY_TEXT_BYTES
        );
    }

    #[test]
    fn close_and_reset_connection_forget_statements() {
        let mut exchange = vec![
            (
                Direction::Client,
                packet(0, b"\x16DELETE FROM t WHERE id = ?"),
            ),
            (Direction::Server, packet(1, &prepare_ok(1))),
            (Direction::Client, packet(0, b"\x16UPDATE t SET x = 1")),
            (Direction::Server, packet(1, &prepare_ok(2))),
            (Direction::Client, packet(0, b"\x19\x01\x00\x00\x00")),
            (Direction::Client, packet(0, &execute(1))),
            (Direction::Server, packet(1, OK_IDLE)),
            (Direction::Client, packet(0, b"\x1a\x02\x00\x00\x00")),
            (Direction::Server, packet(1, OK_IDLE)),
            (Direction::Client, packet(0, &execute(2))),
            (Direction::Server, packet(1, OK_IDLE)),
            (Direction::Client, packet(0, b"\x1f")),
            (Direction::Server, packet(1, OK_IDLE)),
            (Direction::Client, packet(0, &execute(2))),
            (Direction::Server, packet(1, OK_IDLE)),
        ];
        // MariaDB direct execution: prepare and execute of the last prepared statement
        // pipelined in one write, both answers in one read.
        let mut both = packet(0, b"\x16INSERT INTO t VALUES (?)");
        both.extend(packet(0, &execute(LAST_PREPARED_STATEMENT)));
        exchange.push((Direction::Client, both));
        let mut answers = packet(1, &prepare_ok(3));
        answers.extend(packet(1, b"\x00\x02\x00\x02\x00\x00\x00"));
        exchange.push((Direction::Server, answers));
        let (dec, out) = joined(&exchange);
        assert_clean("close and reset", &out);
        let got: Vec<_> = out
            .calls
            .iter()
            .map(|c| (c.operation.as_deref(), c.rows))
            .collect();
        assert_eq!(
            got,
            [
                (None, Some(0)),
                (Some("UPDATE"), Some(0)),
                (None, Some(0)),
                (Some("INSERT"), Some(2)),
            ]
        );
        assert_eq!(dec.statements.len(), 1);
    }

    #[test]
    fn change_user_switches_user_and_namespace() {
        let exchange = [
            (
                Direction::Client,
                packet(0, b"\x11bob\0\x00otherdb\0\x21\x00"),
            ),
            (
                Direction::Server,
                packet(1, b"\xfemysql_native_password\0abcdefghijklmnopqrst\0"),
            ),
            (Direction::Client, packet(2, &[7; 20])),
            (Direction::Server, packet(3, OK_IDLE)),
            (Direction::Client, packet(0, b"\x03SELECT 1")),
            (Direction::Server, packet(1, b"\x01")),
        ];
        let (dec, out) = joined(&exchange);
        assert_clean("change user", &out);
        assert_eq!(dec.user(), Some("bob"));
        assert_eq!(dec.namespace(), Some("otherdb"));
        assert!(dec.in_flight());
    }

    #[test]
    fn pending_commands_are_bounded() {
        let exchange: Vec<_> = (0..MAX_PENDING_COMMANDS + 6)
            .map(|_| (Direction::Client, packet(0, b"\x0e")))
            .collect();
        let (mut dec, out) = joined(&exchange);
        assert_clean("pending", &out);
        assert_eq!(dec.dropped_commands(), 6);
        assert_eq!(dec.finish(), MAX_PENDING_COMMANDS);
    }

    #[test]
    fn field_list_statistics_and_set_option_answers_are_framed() {
        let coldef =
            b"\x03def\x00\x00\x00\x01a\x00\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00";
        let mut fields = packet(1, coldef);
        fields.extend(packet(2, coldef));
        fields.extend(packet(3, b"\xfe\x00\x00\x02\x00"));
        let exchange = [
            (Direction::Client, packet(0, b"\x04items\0")),
            (Direction::Server, fields),
            (Direction::Client, packet(0, b"\x09")),
            // Statistics text that looks like an ERR packet.
            (Direction::Server, packet(1, b"\xff\x01Uptime: 5")),
            (Direction::Client, packet(0, b"\x1b\x00\x00")),
            (Direction::Server, packet(1, b"\xfe\x00\x00\x02\x00")),
            (Direction::Client, packet(0, b"\x03COMMIT")),
            (Direction::Server, packet(1, OK_IDLE)),
        ];
        let (dec, out) = joined(&exchange);
        assert_clean("field list", &out);
        assert_eq!(summary(&out.calls).len(), 1);
        assert_eq!(out.calls[0].operation.as_deref(), Some("COMMIT"));
        assert!(!dec.in_flight());
    }

    #[test]
    fn replication_stops_decoding() {
        let exchange = [
            (
                Direction::Client,
                packet(
                    0,
                    b"\x12\x04\x00\x00\x00\x00\x00\x01\x00\x00\x00binlog.000001",
                ),
            ),
            (Direction::Server, packet(1, b"\x00binlog event")),
        ];
        let (dec, out) = joined(&exchange);
        assert_clean("replication", &out);
        assert_eq!(dec.stopped(), Some(StopReason::Replication));
        assert!(!dec.in_flight());
    }

    #[test]
    fn server_greeting_detection() {
        let table: &[(&[u8], bool)] = &[
            (b"\x4a\x00\x00\x00\x0a8.0.36\0\x08\x00\x00\x00", true),
            (b"\x4a\x00\x00\x00\x0a5.5.5-10.11", true),
            (b"\x4a\x00\x00\x00\x0a", false),
            (b"\x4a\x00\x00\x01\x0a8.0.36\0", false),
            (b"\x4a\x00\x00\x00\x098.0.36\0", false),
            (b"\x4a\x00\x00\x00\x0a\x01\x02\0", false),
            (b"\x05\x00\x00\x00\x0a8.0\0", false),
            (b"\x17\x00\x00\xff\xff\x15\x04Host is blocked", false),
            (b"HTTP/1.1 200 OK\r\n", false),
            (b"\x16\x03\x01\x02\x00", false),
            (b"", false),
        ];
        for (bytes, expected) in table {
            assert_eq!(looks_like_server_greeting(bytes), *expected, "{bytes:?}");
        }
    }

    #[test]
    fn operation_is_the_first_keyword() {
        let table: &[(&str, Option<&str>)] = &[
            ("select 1", Some("SELECT")),
            ("  \n\tInsert into t values (1)", Some("INSERT")),
            ("(SELECT 1) UNION (SELECT 2)", Some("SELECT")),
            ("/* app=checkout */ UPDATE t SET x = 1", Some("UPDATE")),
            ("-- note\nDELETE FROM t", Some("DELETE")),
            ("# note\nREPLACE INTO t VALUES (1)", Some("REPLACE")),
            ("/*!40101 SET NAMES utf8 */", Some("SET")),
            ("/*M!100100 SET x = 1 */", Some("SET")),
            ("with cte as (select 1) select * from cte", Some("WITH")),
            ("start_transaction", Some("START_TRANSACTION")),
            ("/* unterminated", None),
            ("--\nSELECT 1", Some("SELECT")),
            ("--1", None),
            ("", None),
            ("123", None),
            ("  ;; ", None),
            ("ÉTÉ", None),
        ];
        for (sql, expected) in table {
            assert_eq!(operation(sql.as_bytes()).as_deref(), *expected, "{sql:?}");
        }
        let long = "A".repeat(MAX_OPERATION_BYTES + 1);
        assert_eq!(operation(long.as_bytes()), None);
    }

    #[test]
    fn use_statement_targets() {
        let table: &[(&str, Option<&str>)] = &[
            ("USE shop", Some("shop")),
            ("use shop;", Some("shop")),
            ("USE `my db`", Some("my db")),
            ("USE `a``b`", Some("a`b")),
            ("USE `open", None),
            ("USE", None),
            ("USE ;", None),
            ("/* x */ use\n\tshop ", Some("shop")),
        ];
        for (sql, expected) in table {
            assert_eq!(use_target(sql.as_bytes()).as_deref(), *expected, "{sql:?}");
        }
    }

    #[test]
    fn kept_text_is_capped_at_a_char_boundary() {
        let sql = format!("SELECT '{}'", "é".repeat(MAX_QUERY_TEXT_BYTES));
        let kept = kept_text(sql.as_bytes(), MAX_QUERY_TEXT_BYTES);
        assert!(kept.len() <= MAX_QUERY_TEXT_BYTES && kept.len() > MAX_QUERY_TEXT_BYTES - 4);
        assert!(kept.starts_with("SELECT 'é"));
        let invalid = vec![0xff; MAX_QUERY_TEXT_BYTES * 2];
        assert!(kept_text(&invalid, MAX_QUERY_TEXT_BYTES).len() <= MAX_QUERY_TEXT_BYTES);
    }

    // ---- never panics ----------------------------------------------------------

    /// xorshift64*: deterministic, so a failure can be replayed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Each record cut into random chunks; with `gaps`, some leave a suffix uncaptured.
    fn random_chunks<'a>(
        rng: &mut Rng,
        recs: &[(Direction, u64, &'a [u8])],
        gaps: bool,
    ) -> Feed<'a> {
        let mut chunks = Feed::new();
        for &(dir, ts, bytes) in recs {
            let mut pos = 0;
            while pos < bytes.len() {
                let max = [2, 8, 64, 512, 1 << 16][rng.below(5)];
                let size = (1 + rng.below(max)).min(bytes.len() - pos);
                let gap = if gaps && rng.below(4) == 0 {
                    rng.below(600).min(bytes.len() - pos - size)
                } else {
                    0
                };
                chunks.push((
                    dir,
                    Chunk {
                        bytes: &bytes[pos..pos + size],
                        len: size + gap,
                        ts_ns: ts,
                    },
                ));
                pos += size + gap;
            }
        }
        chunks
    }

    fn check_run(chunks: &[(Direction, Chunk<'_>)]) -> Outcome {
        let (mut dec, out) = run(chunks);
        check_calls(&out.calls);
        let _ = format!("{dec:?}");
        dec.finish();
        assert!(!dec.in_flight());
        out
    }

    #[test]
    fn random_splits_gaps_and_mutations_never_panic() {
        let cases = cases();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..3000 {
            let c = &cases[rng.below(cases.len())];
            let recs = records(c.data);
            let gaps = round % 3 == 1;
            let mutate = round % 3 == 2;
            let mut owned: Vec<(Direction, u64, Vec<u8>)> = recs
                .iter()
                .map(|r| (r.dir, r.ts, r.bytes.to_vec()))
                .collect();
            if mutate {
                for _ in 0..1 + rng.below(6) {
                    let rec = rng.below(owned.len());
                    let bytes = &mut owned[rec].2;
                    if bytes.is_empty() {
                        continue;
                    }
                    let at = rng.below(bytes.len());
                    match rng.below(4) {
                        0 => bytes[at] = rng.next() as u8,
                        1 => bytes.insert(at, [0x00, 0xfe, 0xff, 0xfb, 0x01][rng.below(5)]),
                        2 => {
                            bytes.remove(at);
                        }
                        _ => bytes.truncate(at),
                    }
                }
                if rng.below(4) == 0 {
                    // Drop or duplicate a record.
                    let rec = rng.below(owned.len());
                    if rng.below(2) == 0 {
                        owned.remove(rec);
                    } else {
                        let copy = owned[rec].clone();
                        owned.insert(rec, copy);
                    }
                }
            }
            let borrowed: Vec<(Direction, u64, &[u8])> = owned
                .iter()
                .map(|(d, ts, b)| (*d, *ts, b.as_slice()))
                .collect();
            let chunks = random_chunks(&mut rng, &borrowed, gaps);
            let out = check_run(&chunks);
            if !gaps && !mutate {
                assert!(
                    out.errors.is_empty(),
                    "{} round {round}: {:?}",
                    c.name,
                    out.errors
                );
                assert_eq!(summary(&out.calls), c.calls, "{} round {round}", c.name);
            }
        }
    }

    #[test]
    fn random_packet_soup_never_panics() {
        let coldef: &[u8] =
            b"\x03def\x00\x00\x00\x01a\x00\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00";
        let client: &[&[u8]] = &[
            b"\x03SELECT 1",
            b"\x03USE x",
            b"\x02db",
            b"\x16SELECT ?",
            b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00",
            b"\x17\xff\xff\xff\xff\x00\x01\x00\x00\x00",
            b"\x19\x01\x00\x00\x00",
            b"\x1a\x01\x00\x00\x00",
            b"\x1c\x01\x00\x00\x00\x02\x00\x00\x00",
            b"\x0e",
            b"\x09",
            b"\x04t\0",
            b"\x11u\0\x00d\0",
            b"\x1f",
            b"\x01",
            b"",
            b"\x99",
        ];
        let server: &[&[u8]] = &[
            OK_IDLE,
            b"\x00\x00\x00\x03\x40\x00\x00\x00\x05\x01\x03\x02db",
            b"\x00\x01\x00\x0b\x00\x00\x00",
            b"\xff\x7a\x04#42S02oops",
            b"\xff\xff\xff\x01\x02\x02",
            b"\xfe\x00\x00\x02\x00",
            b"\xfe\x00\x00\x0a\x00",
            b"\xfe\x00\x00\x42\x00",
            b"\xfe\x00\x00\x02\x00\x00\x00",
            b"\x01",
            b"\x02\x01",
            b"\x01\x00",
            b"\xfc\xff\xff",
            b"\xfb/tmp/x",
            b"\x00\x01\x00\x00\x00\x01\x00\x01\x00\x00\x00\x00",
            b"\x00\x01\x00\x00\x00\xff\xff\xff\xff\x00\x00\x00",
            coldef,
            b"\x011",
            b"\x00\x00\x01\x00\x00\x00",
            b"\x0a8.0\0\x01\x00\x00\x00abcdefgh\0\xff\xff\x21\x02\x00\xff\xff",
            b"",
        ];
        let mut rng = Rng(42);
        for _ in 0..3000 {
            let mut exchange: Vec<(Direction, Vec<u8>)> = Vec::new();
            if rng.below(3) == 0 {
                exchange = handshake(rng.next() as u32 | MYSQL8_CAPS);
            }
            for _ in 0..1 + rng.below(40) {
                let (dir, table) = if rng.below(2) == 0 {
                    (Direction::Client, client)
                } else {
                    (Direction::Server, server)
                };
                let mut bytes = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    let seq = if rng.below(4) == 0 {
                        rng.next() as u8
                    } else {
                        rng.below(3) as u8
                    };
                    bytes.extend(packet(seq, table[rng.below(table.len())]));
                }
                exchange.push((dir, bytes));
            }
            let borrowed: Vec<(Direction, u64, &[u8])> = exchange
                .iter()
                .enumerate()
                .map(|(i, (d, b))| (*d, i as u64, b.as_slice()))
                .collect();
            let gaps = rng.below(2) == 0;
            let chunks = random_chunks(&mut rng, &borrowed, gaps);
            check_run(&chunks);
        }
    }
}
