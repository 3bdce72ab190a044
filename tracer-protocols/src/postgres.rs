//! PostgreSQL frontend/backend protocol (version 3) for one TCP connection.
//!
//! A [`PgDecoder`] is fed both directions of one connection: [`PgDecoder::client`]
//! with the bytes the client sent, [`PgDecoder::server`] with the bytes the server
//! sent, each in timestamp order and interleaved as they happened. It emits one
//! [`DbCall`] per simple-protocol `Query` and per extended-protocol `Execute`, when its
//! response is complete, and tracks the transaction status ([`PgDecoder::tx_status`])
//! and the database ([`PgDecoder::namespace`]) the pool tracker needs. Message bodies
//! are skipped by length and never copied, except for the few bytes a call needs
//! (SQL text, statement and portal names, command tags, SQLSTATEs), each bounded.
//!
//! # Pairing
//!
//! Requests awaiting an answer wait in a queue, in order: `Execute`, `Query`,
//! `FunctionCall` and `Sync`. A `CommandComplete`, `EmptyQueryResponse`,
//! `PortalSuspended` or `ErrorResponse` answers the oldest `Execute` (or is noted on
//! the oldest `Query`, which lasts until its `ReadyForQuery`), and a `ReadyForQuery`
//! answers everything up to the oldest `Sync`, `Query` or `FunctionCall`. So pipelined
//! batches (psycopg sends Parse/Bind/Describe/Execute/Sync in one write) pair
//! correctly, and after an error the `Execute`s the server skipped until `Sync` are
//! dropped rather than emitted with a result they never had. The SQL text of an
//! `Execute` is the text of the statement its portal was bound to, remembered per
//! statement name from `Parse` (so named prepared statements report their real text
//! on every execution) and forgotten on `Close` or `DEALLOCATE`/`DISCARD ALL`.
//!
//! # Capture gaps
//!
//! A chunk may end in a gap of known length (bytes the kernel did not copy).
//! - Inside a message body the gap is skipped exactly; the kept prefix of a `Query` or
//!   `Parse` text, a command tag or an error's SQLSTATE may then be cut short (a cut
//!   tag gives no row count, a lost SQLSTATE gives [`UNKNOWN_SQLSTATE`]).
//! - Over a message header (the gap runs past the end of a message) the framing is
//!   lost: [`PgError::GapLostFraming`] is returned once and that direction skips
//!   chunks until one starts with a plausible message (a known type byte, a sane
//!   length, and so for every further header the chunk holds).
//!   - Client side: the lost requests are queued as one unknown entry. Completions
//!     that reach it are reported as calls with the text of the statement the lost
//!     batch parsed or bound last (typically a long `Parse` whose Bind/Execute/Sync
//!     headers fell in the gap), if any; its `ReadyForQuery` also answers everything
//!     up to the next `Sync`, dropping (never mispairing) what it cannot tell apart.
//!     If the client, not pipelining, starts new work before any answer reached the
//!     entry, the lost bytes needed none and the entry is dropped.
//!   - Server side: when the client then starts a new request after a completed
//!     batch, the calls queued before the loss are taken as answered: they are
//!     emitted with the timestamp of the last server chunk, no row count and no
//!     error (large results whose row headers fell into gaps end this way).
//!
//! A connection that was already open when capture started is decoded by
//! [`PgDecoder::mid_stream`], which waits silently for chunks that start with a message.
//!
//! # Errors
//!
//! Malformed input yields a [`PgError`]; that direction then skips chunks until one
//! starts with a plausible message. Errors and `Debug` output never contain captured
//! bytes (SQL, names, parameters, user names).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::mem;
use std::sync::Arc;

use crate::Chunk;
use crate::bounded_text as kept_text;
use crate::db::{DbCall, DbSystem, TxStatus};

/// Longest SQL text kept for a query or statement, in bytes; longer texts are cut at a
/// UTF-8 boundary.
pub const MAX_QUERY_TEXT_BYTES: usize = 4096;
/// Most prepared statements remembered per connection; the oldest is forgotten first.
pub const MAX_STATEMENTS: usize = 1024;
/// Most bytes of statement names and texts remembered per connection (the oldest
/// are forgotten first): 1,024 statements of a 4 KiB capture would be 4 MiB a
/// connection, and a pooler holds thousands.
pub const MAX_STATEMENT_BYTES: usize = 256 << 10;
/// Most portals remembered per connection; the oldest is forgotten first.
pub const MAX_PORTALS: usize = 64;
/// Most requests awaiting an answer per connection; beyond it the oldest is dropped
/// (counted by [`PgDecoder::dropped_calls`] if it was a call).
pub const MAX_PENDING: usize = 256;
/// Longest statement or portal name remembered, in bytes (PostgreSQL itself cuts
/// names at 63 bytes); a request naming a longer one is reported without SQL text.
pub const MAX_NAME_BYTES: usize = 128;
/// `error_code` of a failed call whose SQLSTATE was not captured.
pub const UNKNOWN_SQLSTATE: &str = "unknown";

/// PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
const MAX_STARTUP_BYTES: u32 = 10_000;
/// Startup packet bytes kept to read `user` and `database`.
const STARTUP_KEEP_BYTES: usize = 2048;
/// Longest `user` or `database` value kept, in bytes.
const MAX_PARAM_BYTES: usize = 256;
/// Largest message length field accepted (PostgreSQL's MaxAllocSize, plus itself).
const MAX_MESSAGE_BYTES: u32 = 0x4000_0003;
/// Command tag bytes kept (`INSERT 0 18446744073709551615` fits).
const TAG_KEEP_BYTES: usize = 64;
/// Longest operation keyword reported.
const MAX_OPERATION_BYTES: usize = 32;
/// PostgreSQL's MaxTupleAttributeNumber.
const MAX_COLUMNS: i16 = 1664;
/// Longest `$tag$` recognised as a dollar quote (PostgreSQL names are at most 63
/// bytes); it bounds the cost of finding the closing tag.
const MAX_DOLLAR_TAG_BYTES: usize = 64;
/// Message headers checked before trusting a chunk to start a message.
const RESYNC_CHECK_MESSAGES: usize = 8;
/// Kept-bytes buffers that grew beyond this are freed after use instead of kept.
const KEPT_BUFFER_KEPT_BYTES: usize = 8192;

const STARTUP_HEADER_BYTES: usize = 8;
const TYPED_HEADER_BYTES: usize = 5;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// Protocol 3.x: 3.0 (196608) and the minor versions after it (3.2 is PostgreSQL 18).
const PROTOCOL_MAJOR_3: u32 = 3;
const MAX_PROTOCOL_MINOR: u32 = 15;
/// First byte of a TLS handshake record: a client using direct SSL (PostgreSQL 17
/// `sslnegotiation=direct`) starts with it instead of an SSLRequest.
const TLS_HANDSHAKE: u8 = 0x16;

/// Command tags that end in a row count.
const ROW_COUNT_COMMANDS: &[&[u8]] = &[
    b"SELECT", b"INSERT", b"UPDATE", b"DELETE", b"MERGE", b"MOVE", b"FETCH", b"COPY",
];
/// Keywords that can follow a `WITH` clause as the main statement.
const MAIN_STATEMENT_KEYWORDS: &[&[u8]] = &[
    b"SELECT", b"INSERT", b"UPDATE", b"DELETE", b"MERGE", b"VALUES", b"TABLE",
];

/// Which peer sent the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The frontend (application, driver).
    Client,
    /// The backend (PostgreSQL server).
    Server,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Server => "server",
        })
    }
}

/// What made a chunk undecodable. No variant carries captured bytes.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PgError {
    #[error(
        "{side} stream: found a byte that starts no {side} message where a message type was expected; the connection is not PostgreSQL v3, was joined mid-message or lost sync"
    )]
    UnknownMessageType { side: Side },
    #[error("{side} stream: {message} message has an impossible length ({reason})")]
    BadLength {
        side: Side,
        message: &'static str,
        reason: &'static str,
    },
    #[error(
        "client stream: malformed startup packet ({reason}); the connection is not PostgreSQL v3 or was joined mid-message"
    )]
    BadStartup { reason: &'static str },
    #[error(
        "{side} stream: a capture gap of {gap} bytes covered a message header, so message boundaries are lost until a chunk starts with a message; raise the capture size to avoid this"
    )]
    GapLostFraming { side: Side, gap: usize },
    #[error("{side} stream: malformed {message} message: {reason}")]
    Malformed {
        side: Side,
        message: &'static str,
        reason: &'static str,
    },
    #[error(
        "server answered the client's {request} with a byte other than 'N', the acceptance byte or an ErrorResponse"
    )]
    BadEncryptionAnswer { request: &'static str },
}

/// An encryption request waiting for the server's one-byte answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EncryptionRequest {
    /// SSLRequest: 'S' accepts.
    Ssl,
    /// GSSENCRequest: 'G' accepts.
    Gss,
}

impl EncryptionRequest {
    fn name(self) -> &'static str {
        match self {
            Self::Ssl => "SSLRequest",
            Self::Gss => "GSSENCRequest",
        }
    }

    fn accepted_by(self) -> u8 {
        match self {
            Self::Ssl => b'S',
            Self::Gss => b'G',
        }
    }
}

/// The untyped packets a client may send before the typed messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StartupKind {
    Startup,
    Ssl,
    Gss,
    Cancel,
}

/// Framing state of one direction.
#[derive(Debug)]
enum Frame {
    /// Client only: an untyped packet (StartupMessage, SSLRequest, …) comes next.
    Startup,
    /// A typed message header comes next (its first bytes may be in `Stream::header`).
    Header,
    /// Inside a message body.
    Body(Body),
    /// Message boundaries are lost: chunks are skipped until one starts with a
    /// plausible message.
    Resync,
    /// Nothing more to decode in this direction (after a CancelRequest).
    Stopped,
}

/// What is known about the message whose body is being read.
#[derive(Debug)]
struct Body {
    kind: BodyKind,
    /// Body length: the length field minus itself (minus the code for startup packets).
    len: u32,
    /// Body bytes not read yet.
    remaining: u32,
    /// How many leading body bytes to keep in `Stream::kept`.
    keep: usize,
    /// A gap covered some of the bytes that were to be kept.
    truncated: bool,
    /// Timestamp of the chunk holding the first header byte.
    start_ns: u64,
    /// ErrorResponse only: reads the SQLSTATE field as the bytes pass.
    scan: Option<ErrorScan>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyKind {
    Typed(u8),
    Startup(StartupKind),
}

/// One direction's framing.
struct Stream {
    frame: Frame,
    header: [u8; STARTUP_HEADER_BYTES],
    header_len: usize,
    header_start_ns: u64,
    /// The kept prefix of the body being read.
    kept: Vec<u8>,
}

impl fmt::Debug for Stream {
    // Not derived: `header` and `kept` hold captured bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("frame", &self.frame)
            .field("buffered_header_bytes", &self.header_len)
            .field("kept_bytes", &self.kept.len())
            .finish()
    }
}

impl Stream {
    fn new(frame: Frame) -> Self {
        Self {
            frame,
            header: [0; STARTUP_HEADER_BYTES],
            header_len: 0,
            header_start_ns: 0,
            kept: Vec::new(),
        }
    }

    fn reset(&mut self, frame: Frame) {
        self.frame = frame;
        self.header_len = 0;
        self.kept.clear();
        if self.kept.capacity() > KEPT_BUFFER_KEPT_BYTES {
            self.kept = Vec::new();
        }
    }
}

/// Reads the SQLSTATE ('C' field) of an ErrorResponse as its bytes stream past, so
/// that the message text ('M', which may quote literals) is never kept.
#[derive(Clone, Copy, Debug)]
struct ErrorScan {
    state: ScanState,
    code: Option<[u8; 5]>,
}

#[derive(Clone, Copy, Debug)]
enum ScanState {
    FieldType,
    Skip,
    Code { buf: [u8; 5], len: u8 },
    Done,
}

impl ErrorScan {
    fn new() -> Self {
        Self {
            state: ScanState::FieldType,
            code: None,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while let Some((&b, tail)) = rest.split_first() {
            match &mut self.state {
                ScanState::FieldType => {
                    self.state = match b {
                        0 => ScanState::Done,
                        b'C' => ScanState::Code {
                            buf: [0; 5],
                            len: 0,
                        },
                        _ => ScanState::Skip,
                    };
                    rest = tail;
                }
                ScanState::Skip => match rest.iter().position(|&c| c == 0) {
                    Some(p) => {
                        self.state = ScanState::FieldType;
                        rest = rest.get(p + 1..).unwrap_or_default();
                    }
                    None => return,
                },
                ScanState::Code { buf, len } => {
                    if b == 0 {
                        if *len == 5 && buf.iter().all(|c| c.is_ascii_alphanumeric()) {
                            self.code = Some(buf.map(|c| c.to_ascii_uppercase()));
                        }
                        self.state = ScanState::FieldType;
                    } else if let Some(slot) = buf.get_mut(usize::from(*len)) {
                        *slot = b;
                        *len += 1;
                    } else {
                        // Longer than a SQLSTATE: not one.
                        *len = 6;
                    }
                    rest = tail;
                }
                ScanState::Done => return,
            }
        }
    }

    /// Bytes were skipped: the fields after them cannot be read.
    fn give_up(&mut self) {
        self.state = ScanState::Done;
    }
}

/// Why a call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallError {
    Sqlstate([u8; 5]),
    Unknown,
}

impl CallError {
    fn from_scan(code: Option<[u8; 5]>) -> Self {
        code.map_or(Self::Unknown, Self::Sqlstate)
    }

    fn to_code(self) -> String {
        match self {
            Self::Sqlstate(code) => code.iter().map(|&c| char::from(c)).collect(),
            Self::Unknown => UNKNOWN_SQLSTATE.to_owned(),
        }
    }
}

/// A call whose answer is awaited.
#[derive(Clone, Debug)]
struct PendingCall {
    text: Option<Arc<str>>,
    start_ns: u64,
    rows: Option<u64>,
    error: Option<CallError>,
}

impl PendingCall {
    fn new(text: Option<Arc<str>>, start_ns: u64) -> Self {
        Self {
            text,
            start_ns,
            rows: None,
            error: None,
        }
    }
}

/// A request awaiting an answer.
#[derive(Debug)]
enum Entry {
    /// Answered by CommandComplete, EmptyQueryResponse, PortalSuspended or
    /// ErrorResponse; dropped if a ReadyForQuery comes first (the server skipped it
    /// after an error).
    Execute(PendingCall),
    /// A simple query: answered by its ReadyForQuery.
    Query(PendingCall),
    /// Answered by ReadyForQuery.
    Sync,
    /// Answered by ReadyForQuery (after FunctionCallResponse or ErrorResponse).
    FunctionCall,
    /// Requests lost in a client-side gap. `guess` is the text of the statement the
    /// lost batch parsed or bound last.
    Unknown {
        guess: Option<Arc<str>>,
        start_ns: u64,
    },
}

impl Entry {
    /// Answered by a ReadyForQuery.
    fn is_barrier(&self) -> bool {
        !matches!(self, Entry::Execute(_))
    }

    fn is_call(&self) -> bool {
        matches!(self, Entry::Execute(_) | Entry::Query(_))
    }
}

#[derive(Debug)]
struct Pending {
    /// Order of arrival, to tell entries queued before a server-side gap.
    seq: u64,
    entry: Entry,
}

/// Entries dropped from the front of a full queue, so that later answers still pair
/// with the right requests: `barriers` ReadyForQuery answers go to dropped entries
/// (and every completion before the last of them), then `calls` completions.
#[derive(Clone, Copy, Debug, Default)]
struct Ghosts {
    barriers: u32,
    calls: u32,
}

/// A statement's (or portal's statement's) text, `None` if unknown.
#[derive(Debug)]
struct Named {
    generation: u64,
    text: Option<Arc<str>>,
}

/// A bounded name → SQL text map that forgets the oldest name first.
struct NameMap {
    cap: usize,
    /// Bytes of names and texts held, and the most allowed.
    bytes: usize,
    max_bytes: usize,
    entries: HashMap<Box<[u8]>, Named>,
    order: VecDeque<(u64, Box<[u8]>)>,
    next_gen: u64,
}

impl fmt::Debug for NameMap {
    // Not derived: names and texts are captured bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NameMap")
            .field("len", &self.len())
            .field("cap", &self.cap)
            .finish()
    }
}

impl NameMap {
    fn new(cap: usize) -> Self {
        Self::with_budget(cap, MAX_STATEMENT_BYTES)
    }

    fn with_budget(cap: usize, max_bytes: usize) -> Self {
        Self {
            cap,
            bytes: 0,
            max_bytes,
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_gen: 0,
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn cost(name: &[u8], named: &Named) -> usize {
        name.len() + named.text.as_ref().map_or(0, |t| t.len())
    }

    fn insert(&mut self, name: &[u8], text: Option<Arc<str>>) {
        let generation = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1);
        let named = Named { generation, text };
        self.bytes += Self::cost(name, &named);
        if let Some(old) = self.entries.insert(name.into(), named) {
            self.bytes -= Self::cost(name, &old);
        }
        self.order.push_back((generation, name.into()));
        while self.entries.len() > self.cap || self.bytes > self.max_bytes {
            let Some((old_gen, old_name)) = self.order.pop_front() else {
                break;
            };
            if self
                .entries
                .get(&old_name)
                .is_some_and(|named| named.generation == old_gen)
            {
                self.remove(&old_name);
            }
        }
        // Re-used names leave stale order entries behind; drop them now and then.
        if self.order.len() > self.cap.saturating_mul(2).saturating_add(16) {
            let entries = &self.entries;
            self.order
                .retain(|(g, n)| entries.get(n).is_some_and(|named| named.generation == *g));
        }
    }

    /// `None`: name unknown; `Some(None)`: known, text unknown.
    fn get(&self, name: &[u8]) -> Option<&Option<Arc<str>>> {
        self.entries.get(name).map(|named| &named.text)
    }

    fn remove(&mut self, name: &[u8]) {
        if let Some(old) = self.entries.remove(name) {
            self.bytes -= Self::cost(name, &old);
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.bytes = 0;
    }
}

/// Decodes both directions of one PostgreSQL connection. See the module docs.
pub struct PgDecoder {
    client: Stream,
    server: Stream,
    awaiting_answer: Option<EncryptionRequest>,
    encrypted: bool,
    user: Option<String>,
    database: Option<String>,
    tx_status: TxStatus,
    statements: NameMap,
    portals: NameMap,
    pending: VecDeque<Pending>,
    ghosts: Ghosts,
    next_seq: u64,
    /// Timestamp of the first Parse/Bind/Describe since the last Execute, Sync or
    /// Query: the start of the next Execute's call.
    batch_start_ns: Option<u64>,
    /// Text of the statement parsed or bound last in the batch in progress.
    batch_text: Option<Arc<str>>,
    /// The server is in COPY FROM STDIN: it ignores the client's Syncs until
    /// CopyDone/CopyFail.
    copy_in: bool,
    /// The client sent a request while an earlier batch was still unanswered.
    pipelining: bool,
    /// The server side lost message boundaries; entries with a smaller `seq` were
    /// queued before that.
    server_lost_at: Option<u64>,
    /// Timestamp of the last server chunk.
    server_last_ns: u64,
    dropped_calls: u64,
}

impl fmt::Debug for PgDecoder {
    // Not derived: user names, database names and SQL texts stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgDecoder")
            .field("client", &self.client)
            .field("server", &self.server)
            .field("awaiting_answer", &self.awaiting_answer)
            .field("encrypted", &self.encrypted)
            .field("tx_status", &self.tx_status)
            .field("statements", &self.statements)
            .field("portals", &self.portals)
            .field("pending", &self.pending.len())
            .field("ghosts", &self.ghosts)
            .field("copy_in", &self.copy_in)
            .field("pipelining", &self.pipelining)
            .field("server_lost_at", &self.server_lost_at)
            .field("dropped_calls", &self.dropped_calls)
            .finish()
    }
}

impl Default for PgDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl PgDecoder {
    pub fn new() -> Self {
        Self {
            client: Stream::new(Frame::Startup),
            server: Stream::new(Frame::Header),
            awaiting_answer: None,
            encrypted: false,
            user: None,
            database: None,
            tx_status: TxStatus::Unknown,
            statements: NameMap::new(MAX_STATEMENTS),
            portals: NameMap::new(MAX_PORTALS),
            pending: VecDeque::new(),
            ghosts: Ghosts::default(),
            next_seq: 0,
            batch_start_ns: None,
            batch_text: None,
            copy_in: false,
            pipelining: false,
            server_lost_at: None,
            server_last_ns: 0,
            dropped_calls: 0,
        }
    }

    /// For a connection that was already open when capture started: both directions
    /// wait, silently, for a chunk that starts with a message (the first chunks may
    /// start mid-message). The namespace stays unknown.
    pub fn mid_stream() -> Self {
        let mut decoder = Self::new();
        decoder.client.frame = Frame::Resync;
        decoder.server.frame = Frame::Resync;
        decoder
    }

    /// Bytes the client sent. Calls the request completes (only when the server side
    /// lost sync, see the module docs) are pushed to `out`.
    ///
    /// On `Err`, calls completed earlier are already in `out`; the rest of the chunk is
    /// skipped and client chunks are skipped until one starts with a message.
    pub fn client(&mut self, chunk: &Chunk<'_>, out: &mut Vec<DbCall>) -> Result<(), PgError> {
        self.feed(Side::Client, chunk, out)
    }

    /// Bytes the server sent. Completed calls are pushed to `out`, in order.
    ///
    /// On `Err`, calls completed earlier in the chunk are already in `out`; the rest of
    /// the chunk is skipped and server chunks are skipped until one starts with a
    /// message.
    pub fn server(&mut self, chunk: &Chunk<'_>, out: &mut Vec<DbCall>) -> Result<(), PgError> {
        self.feed(Side::Server, chunk, out)
    }

    /// Transaction status from the last ReadyForQuery.
    pub fn tx_status(&self) -> TxStatus {
        self.tx_status
    }

    /// `db.namespace`: the database named in the StartupMessage, or the user name when
    /// it names none (PostgreSQL's default).
    pub fn namespace(&self) -> Option<&str> {
        self.database
            .as_deref()
            .filter(|db| !db.is_empty())
            .or(self.user.as_deref())
    }

    /// The user named in the StartupMessage.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// A request was sent and its response is not complete.
    /// Bytes the decoder holds between chunks (kept message prefixes, statement and
    /// portal names and texts, calls not answered yet): what a global memory budget
    /// counts.
    pub fn held_bytes(&self) -> usize {
        self.client.kept.len()
            + self.server.kept.len()
            + self.statements.bytes
            + self.portals.bytes
            + self.pending.len() * std::mem::size_of::<Pending>()
    }

    pub fn in_flight(&self) -> bool {
        !self.pending.is_empty() || self.ghosts.barriers > 0 || self.ghosts.calls > 0
    }

    /// The server accepted an SSLRequest or GSSENCRequest (or the client started a
    /// TLS handshake directly): the rest of the connection is encrypted and every
    /// later chunk is ignored, so the caller may stop feeding them.
    pub fn is_encrypted(&self) -> bool {
        self.encrypted
    }

    /// The TLS library's plaintext of this encrypted connection starts (read by
    /// probes on the TLS library, in the same order as the ciphertext): the session
    /// goes on inside TLS from its StartupMessage, as if the connection had just
    /// opened. Does nothing on a connection that is not encrypted.
    pub fn resume_in_plaintext(&mut self) {
        if !self.encrypted {
            return;
        }
        let dropped_calls = self.dropped_calls;
        *self = Self::new();
        self.dropped_calls = dropped_calls;
    }

    /// Calls dropped so far because more than [`MAX_PENDING`] requests were waiting,
    /// or because a client-side gap made their answers impossible to tell apart.
    pub fn dropped_calls(&self) -> u64 {
        self.dropped_calls
    }

    /// The connection closed: completes nothing, forgets the calls still waiting for
    /// an answer and returns how many there were. Statements, portals and partial
    /// messages are forgotten too; the namespace, user and last transaction status
    /// stay readable.
    pub fn finish(&mut self) -> usize {
        let forgotten = self.pending.iter().filter(|p| p.entry.is_call()).count();
        self.pending.clear();
        self.ghosts = Ghosts::default();
        self.awaiting_answer = None;
        self.batch_start_ns = None;
        self.batch_text = None;
        self.copy_in = false;
        self.server_lost_at = None;
        self.statements.clear();
        self.portals.clear();
        self.client.reset(Frame::Startup);
        self.server.reset(Frame::Header);
        forgotten
    }

    fn stream_mut(&mut self, side: Side) -> &mut Stream {
        match side {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        }
    }

    fn feed(
        &mut self,
        side: Side,
        chunk: &Chunk<'_>,
        out: &mut Vec<DbCall>,
    ) -> Result<(), PgError> {
        if self.encrypted {
            return Ok(());
        }
        if side == Side::Server {
            self.server_last_ns = chunk.ts_ns;
        }
        let result = self.feed_chunk(side, chunk, out);
        if result.is_err() {
            self.lose_sync(side, chunk.ts_ns);
        }
        result
    }

    fn feed_chunk(
        &mut self,
        side: Side,
        chunk: &Chunk<'_>,
        out: &mut Vec<DbCall>,
    ) -> Result<(), PgError> {
        let ts = chunk.ts_ns;
        let bytes = chunk.bytes;
        let stream = self.stream_mut(side);
        match stream.frame {
            Frame::Stopped => return Ok(()),
            Frame::Resync => {
                if !plausible_start(side, bytes) {
                    return Ok(());
                }
                stream.frame = Frame::Header;
                if side == Side::Server {
                    self.server_lost_at = None;
                }
            }
            Frame::Startup if stream.header_len == 0 => match bytes.first() {
                None | Some(0) => {}
                Some(&TLS_HANDSHAKE) => {
                    self.encrypted = true;
                    return Ok(());
                }
                // Joined after the startup: typed messages already.
                Some(&ty) if message_name(Side::Client, ty).is_some() => {
                    stream.frame = Frame::Header;
                }
                Some(_) => {
                    return Err(PgError::BadStartup {
                        reason: "the first byte is neither a packet length nor a message type",
                    });
                }
            },
            _ => {}
        }
        let mut pos = 0usize;
        while let Some(rest) = bytes.get(pos..).filter(|rest| !rest.is_empty()) {
            let used = self.step(side, rest, ts, out)?;
            if self.encrypted {
                return Ok(());
            }
            // Every step consumes at least one byte of a non-empty `rest`.
            pos = pos.saturating_add(used.max(1));
        }
        let gap = chunk.gap();
        if gap > 0 {
            self.skip_gap(side, gap, ts, out)?;
        }
        Ok(())
    }

    /// Consumes a prefix of `rest` (non-empty); returns its length.
    fn step(
        &mut self,
        side: Side,
        rest: &[u8],
        ts: u64,
        out: &mut Vec<DbCall>,
    ) -> Result<usize, PgError> {
        if side == Side::Server
            && self.server.header_len == 0
            && matches!(self.server.frame, Frame::Header)
            && let Some(request) = self.awaiting_answer
        {
            // The server's answer to SSLRequest/GSSENCRequest is one untyped byte.
            match rest.first() {
                Some(b'N') => {
                    self.awaiting_answer = None;
                    return Ok(1);
                }
                Some(&b) if b == request.accepted_by() => {
                    self.awaiting_answer = None;
                    self.encrypted = true;
                    return Ok(rest.len());
                }
                // An old server rejecting the request: a real ErrorResponse follows.
                Some(b'E') => self.awaiting_answer = None,
                _ => {
                    self.awaiting_answer = None;
                    return Err(PgError::BadEncryptionAnswer {
                        request: request.name(),
                    });
                }
            }
        }
        let stream = self.stream_mut(side);
        let header_bytes = match stream.frame {
            Frame::Startup => STARTUP_HEADER_BYTES,
            Frame::Header => TYPED_HEADER_BYTES,
            Frame::Body(_) => 0,
            Frame::Resync | Frame::Stopped => return Ok(rest.len()),
        };
        if header_bytes > 0 {
            if stream.header_len == 0 {
                stream.header_start_ns = ts;
            }
            let take = header_bytes
                .saturating_sub(stream.header_len)
                .min(rest.len());
            let end = stream.header_len.saturating_add(take);
            if let (Some(dst), Some(src)) = (
                stream.header.get_mut(stream.header_len..end),
                rest.get(..take),
            ) {
                dst.copy_from_slice(src);
            }
            stream.header_len = end;
            if end >= header_bytes {
                self.on_header(side, ts, out)?;
            }
            return Ok(take);
        }
        let Frame::Body(body) = &mut stream.frame else {
            return Ok(rest.len());
        };
        let take = usize::try_from(body.remaining)
            .unwrap_or(usize::MAX)
            .min(rest.len());
        let piece = rest.get(..take).unwrap_or(rest);
        let room = body.keep.saturating_sub(stream.kept.len());
        stream
            .kept
            .extend_from_slice(piece.get(..room).unwrap_or(piece));
        if let Some(scan) = &mut body.scan {
            scan.feed(piece);
        }
        // `take <= body.remaining`, a u32.
        body.remaining = body
            .remaining
            .saturating_sub(u32::try_from(take).unwrap_or(u32::MAX));
        if body.remaining == 0 {
            self.end_body(side, ts, out)?;
        }
        Ok(take)
    }

    /// A whole header is in `Stream::header`: starts the body (or ends an empty one).
    fn on_header(&mut self, side: Side, ts: u64, out: &mut Vec<DbCall>) -> Result<(), PgError> {
        let stream = self.stream_mut(side);
        let startup = matches!(stream.frame, Frame::Startup);
        let [h0, h1, h2, h3, h4, h5, h6, h7] = stream.header;
        stream.header_len = 0;
        stream.kept.clear();
        let start_ns = stream.header_start_ns;
        let body = if startup {
            let len = u32::from_be_bytes([h0, h1, h2, h3]);
            let code = u32::from_be_bytes([h4, h5, h6, h7]);
            let kind = startup_kind(len, code).map_err(|reason| PgError::BadStartup { reason })?;
            let keep = match kind {
                StartupKind::Ssl => {
                    self.awaiting_answer = Some(EncryptionRequest::Ssl);
                    return Ok(());
                }
                StartupKind::Gss => {
                    self.awaiting_answer = Some(EncryptionRequest::Gss);
                    return Ok(());
                }
                StartupKind::Cancel => 0,
                StartupKind::Startup => STARTUP_KEEP_BYTES,
            };
            // `startup_kind` checked `len >= 8`.
            let body_len = len.saturating_sub(8);
            Body {
                kind: BodyKind::Startup(kind),
                len: body_len,
                remaining: body_len,
                keep,
                truncated: false,
                start_ns,
                scan: None,
            }
        } else {
            let len = u32::from_be_bytes([h1, h2, h3, h4]);
            check_header(side, h0, len)?;
            // `check_header` checked `len >= 4`.
            let body_len = len.saturating_sub(4);
            Body {
                kind: BodyKind::Typed(h0),
                len: body_len,
                remaining: body_len,
                keep: keep_bytes(side, h0),
                truncated: false,
                start_ns,
                scan: (side == Side::Server && h0 == b'E').then(ErrorScan::new),
            }
        };
        let empty = body.remaining == 0;
        self.stream_mut(side).frame = Frame::Body(body);
        if empty {
            self.end_body(side, ts, out)?;
        }
        Ok(())
    }

    /// The body in progress is over (read, or skipped by a gap): handles the message.
    fn end_body(&mut self, side: Side, ts: u64, out: &mut Vec<DbCall>) -> Result<(), PgError> {
        let stream = self.stream_mut(side);
        let Frame::Body(body) = mem::replace(&mut stream.frame, Frame::Header) else {
            return Ok(());
        };
        let kept = mem::take(&mut stream.kept);
        let result = match body.kind {
            BodyKind::Startup(StartupKind::Cancel) => {
                self.client.frame = Frame::Stopped;
                Ok(())
            }
            BodyKind::Startup(_) => {
                self.on_startup(&kept);
                Ok(())
            }
            BodyKind::Typed(ty) => match side {
                Side::Client => {
                    self.on_client_message(ty, &kept, &body, out);
                    Ok(())
                }
                Side::Server => self.on_server_message(ty, &kept, &body, ts, out),
            },
        };
        let stream = self.stream_mut(side);
        stream.kept = kept;
        stream.kept.clear();
        if stream.kept.capacity() > KEPT_BUFFER_KEPT_BYTES {
            stream.kept = Vec::new();
        }
        result
    }

    /// The rest of the chunk is `gap` uncaptured bytes.
    fn skip_gap(
        &mut self,
        side: Side,
        gap: usize,
        ts: u64,
        out: &mut Vec<DbCall>,
    ) -> Result<(), PgError> {
        let stream = self.stream_mut(side);
        let body = match &mut stream.frame {
            Frame::Resync | Frame::Stopped => return Ok(()),
            // The gap holds (part of) a header: the message length is lost.
            Frame::Startup | Frame::Header => return Err(PgError::GapLostFraming { side, gap }),
            Frame::Body(body) => body,
        };
        let remaining = usize::try_from(body.remaining).unwrap_or(usize::MAX);
        let skipped = gap.min(remaining);
        body.remaining = body
            .remaining
            .saturating_sub(u32::try_from(skipped).unwrap_or(u32::MAX));
        let consumed =
            usize::try_from(body.len.saturating_sub(body.remaining)).unwrap_or(usize::MAX);
        if stream.kept.len() < consumed.min(body.keep) {
            body.truncated = true;
            // Later bytes would not follow the kept ones: keep no more.
            body.keep = stream.kept.len();
        }
        if let Some(scan) = &mut body.scan {
            scan.give_up();
        }
        if body.remaining == 0 {
            self.end_body(side, ts, out)?;
        }
        if gap > remaining {
            return Err(PgError::GapLostFraming { side, gap });
        }
        Ok(())
    }

    /// Message boundaries of `side` are lost.
    fn lose_sync(&mut self, side: Side, ts: u64) {
        self.stream_mut(side).reset(Frame::Resync);
        match side {
            Side::Client => {
                let guess = self.batch_text.take();
                let start_ns = self.batch_start_ns.take().unwrap_or(ts);
                // The lost bytes may have redefined the unnamed statement and portal.
                self.statements.remove(b"");
                self.portals.remove(b"");
                self.push(Entry::Unknown { guess, start_ns });
            }
            Side::Server => {
                self.awaiting_answer = None;
                if self.server_lost_at.is_none() {
                    self.server_lost_at = Some(self.next_seq);
                }
            }
        }
    }

    fn on_startup(&mut self, body: &[u8]) {
        let mut rest = body;
        while let Some((key, after_key)) = split_cstr(rest) {
            if key.is_empty() {
                break;
            }
            let Some((value, after_value)) = split_cstr(after_key) else {
                // Cut by a gap: a partial value would be wrong.
                break;
            };
            match key {
                b"user" => self.user = Some(kept_text(value, MAX_PARAM_BYTES)),
                b"database" => self.database = Some(kept_text(value, MAX_PARAM_BYTES)),
                _ => {}
            }
            rest = after_value;
        }
    }

    fn on_client_message(&mut self, ty: u8, body: &[u8], meta: &Body, out: &mut Vec<DbCall>) {
        if matches!(ty, b'Q' | b'P' | b'B' | b'D' | b'E' | b'F' | b'C') {
            self.settle_lost_responses(out);
            // A client that waits for each answer starts new work only once the lost
            // requests (if they were any) were answered: nothing is owed to them.
            if !self.pipelining
                && matches!(
                    self.pending.back().map(|p| &p.entry),
                    Some(Entry::Unknown { .. })
                )
            {
                self.pending.pop_back();
            }
        }
        let start_ns = meta.start_ns;
        match ty {
            b'Q' => {
                let text: Arc<str> = sql_text(body).into();
                self.forget_deallocated(&text);
                self.batch_start_ns = None;
                self.batch_text = None;
                self.push(Entry::Query(PendingCall::new(Some(text), start_ns)));
            }
            b'P' => {
                self.batch_start_ns.get_or_insert(start_ns);
                self.batch_text = None;
                if let Some((name, rest)) = split_name(body) {
                    let text: Option<Arc<str>> =
                        (!rest.is_empty() || !meta.truncated).then(|| sql_text(rest).into());
                    self.statements.insert(name, text.clone());
                    self.batch_text = text;
                }
            }
            b'B' => {
                self.batch_start_ns.get_or_insert(start_ns);
                self.batch_text = None;
                if let Some((portal, rest)) = split_name(body) {
                    let text = split_name(rest)
                        .and_then(|(statement, _)| self.statements.get(statement).cloned())
                        .flatten();
                    self.portals.insert(portal, text.clone());
                    self.batch_text = text;
                }
            }
            b'D' => {
                self.batch_start_ns.get_or_insert(start_ns);
            }
            b'E' => {
                let start_ns = self.batch_start_ns.take().unwrap_or(start_ns);
                self.batch_text = None;
                let text = split_name(body)
                    .and_then(|(portal, _)| self.portals.get(portal).cloned())
                    .flatten();
                if let Some(text) = &text {
                    self.forget_deallocated(text);
                }
                self.push(Entry::Execute(PendingCall::new(text, start_ns)));
            }
            b'C' => {
                if let Some((&kind, rest)) = body.split_first()
                    && let Some((name, _)) = split_name(rest)
                {
                    match kind {
                        b'S' => self.statements.remove(name),
                        b'P' => self.portals.remove(name),
                        _ => {}
                    }
                }
            }
            b'S' => {
                self.batch_start_ns = None;
                self.batch_text = None;
                // The server ignores Sync during COPY FROM STDIN.
                if !self.copy_in {
                    self.push(Entry::Sync);
                }
            }
            b'F' => {
                self.batch_start_ns = None;
                self.batch_text = None;
                self.push(Entry::FunctionCall);
            }
            b'c' | b'f' => self.copy_in = false,
            // Flush, CopyData, authentication responses (never kept), Terminate.
            _ => {}
        }
    }

    fn on_server_message(
        &mut self,
        ty: u8,
        body: &[u8],
        meta: &Body,
        ts: u64,
        out: &mut Vec<DbCall>,
    ) -> Result<(), PgError> {
        match ty {
            b'Z' => {
                match body.first() {
                    Some(b'I') => self.tx_status = TxStatus::Idle,
                    Some(b'T') => self.tx_status = TxStatus::InTransaction,
                    Some(b'E') => self.tx_status = TxStatus::Failed,
                    None if meta.truncated => {}
                    _ => {
                        return Err(PgError::Malformed {
                            side: Side::Server,
                            message: "ReadyForQuery",
                            reason: "the transaction status is not 'I', 'T' or 'E'",
                        });
                    }
                }
                self.copy_in = false;
                self.on_ready(ts, out);
            }
            b'C' => {
                let rows = rows_from_tag(body);
                self.on_completion(Ok(rows), ts, out);
            }
            b'I' | b's' => self.on_completion(Ok(None), ts, out),
            b'E' => {
                let code = meta.scan.and_then(|scan| scan.code);
                self.copy_in = false;
                self.on_completion(Err(CallError::from_scan(code)), ts, out);
            }
            b'G' | b'W' => self.on_copy_in(),
            // Everything else answers nothing a call needs: row data and
            // descriptions, Parse/Bind/Close completions, notices, notifications,
            // parameter status, authentication, COPY OUT data.
            _ => {}
        }
        Ok(())
    }

    /// CommandComplete / EmptyQueryResponse / PortalSuspended (`Ok(rows)`) or
    /// ErrorResponse (`Err`).
    fn on_completion(
        &mut self,
        outcome: Result<Option<u64>, CallError>,
        ts: u64,
        out: &mut Vec<DbCall>,
    ) {
        if self.ghosts.barriers > 0 {
            return;
        }
        if self.ghosts.calls > 0 {
            self.ghosts.calls -= 1;
            return;
        }
        let apply = |call: &mut PendingCall| match outcome {
            Ok(Some(rows)) => call.rows = Some(rows),
            Ok(None) => {}
            Err(e) => {
                if call.error.is_none() {
                    call.error = Some(e);
                }
            }
        };
        match self.pending.front_mut().map(|p| &mut p.entry) {
            Some(Entry::Execute(_)) => {
                if let Some(Pending {
                    entry: Entry::Execute(mut call),
                    ..
                }) = self.pending.pop_front()
                {
                    apply(&mut call);
                    self.emit(call, ts, out);
                }
            }
            Some(Entry::Query(call)) => apply(call),
            Some(Entry::Unknown {
                guess: Some(text),
                start_ns,
            }) => {
                let mut call = PendingCall::new(Some(Arc::clone(text)), *start_ns);
                apply(&mut call);
                self.emit(call, ts, out);
            }
            // Answers to a request without a call (Parse, Bind, Describe before a
            // Sync), or to nothing we saw.
            _ => {}
        }
    }

    /// ReadyForQuery: answers everything up to the oldest Sync, Query or FunctionCall.
    fn on_ready(&mut self, ts: u64, out: &mut Vec<DbCall>) {
        if self.ghosts.barriers > 0 {
            self.ghosts.barriers -= 1;
            return;
        }
        self.ghosts.calls = 0;
        let mut after_unknown = false;
        while let Some(p) = self.pending.pop_front() {
            match p.entry {
                // Skipped by the server after an error.
                Entry::Execute(_) => {}
                Entry::Query(call) => {
                    if after_unknown {
                        // This may be the answer to the lost requests, not to it.
                        self.dropped_calls = self.dropped_calls.saturating_add(1);
                    } else {
                        self.emit(call, ts, out);
                    }
                    break;
                }
                Entry::Sync | Entry::FunctionCall => break,
                Entry::Unknown { .. } => {
                    if after_unknown {
                        break;
                    }
                    // The lost requests may or may not have ended with a Sync: this
                    // answer also covers the next one, if any is waiting.
                    after_unknown = true;
                }
            }
        }
    }

    /// CopyInResponse / CopyBothResponse.
    fn on_copy_in(&mut self) {
        self.copy_in = true;
        // libpq sends Sync right after an extended-protocol Execute; the server ignores
        // it once COPY FROM STDIN started, and answers the Sync sent after CopyDone.
        if matches!(
            self.pending.front().map(|p| &p.entry),
            Some(Entry::Execute(_))
        ) {
            while matches!(self.pending.get(1).map(|p| &p.entry), Some(Entry::Sync)) {
                self.pending.remove(1);
            }
        }
    }

    /// A new request while the server side has lost sync: if the client had finished
    /// its batch before the loss, the answers to it were in the lost bytes.
    fn settle_lost_responses(&mut self, out: &mut Vec<DbCall>) {
        let Some(lost_at) = self.server_lost_at else {
            return;
        };
        let before = self.pending.iter().take_while(|p| p.seq < lost_at).count();
        let Some(last) = before.checked_sub(1).and_then(|i| self.pending.get(i)) else {
            return;
        };
        if !last.entry.is_barrier() {
            return;
        }
        let end_ns = self.server_last_ns;
        let settled: Vec<Pending> = self.pending.drain(..before).collect();
        for p in settled {
            if let Entry::Execute(mut call) | Entry::Query(mut call) = p.entry {
                call.rows = None;
                self.emit(call, end_ns, out);
            }
        }
        self.ghosts = Ghosts::default();
    }

    fn push(&mut self, entry: Entry) {
        if self.pending.len() >= MAX_PENDING
            && let Some(old) = self.pending.pop_front()
        {
            if old.entry.is_call() {
                self.dropped_calls = self.dropped_calls.saturating_add(1);
            }
            if old.entry.is_barrier() {
                self.ghosts.barriers = self.ghosts.barriers.saturating_add(1);
                self.ghosts.calls = 0;
            } else {
                self.ghosts.calls = self.ghosts.calls.saturating_add(1);
            }
        }
        if !matches!(entry, Entry::Unknown { .. })
            && self
                .pending
                .back()
                .is_some_and(|p| p.entry.is_barrier() && !matches!(p.entry, Entry::Unknown { .. }))
        {
            self.pipelining = true;
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.pending.push_back(Pending { seq, entry });
    }

    fn emit(&self, call: PendingCall, end_ns: u64, out: &mut Vec<DbCall>) {
        out.push(DbCall {
            system: DbSystem::Postgresql,
            operation: call.text.as_deref().and_then(sql_operation),
            query_text: call.text.as_deref().map(str::to_owned),
            namespace: self.namespace().map(str::to_owned),
            start_ns: call.start_ns,
            end_ns: end_ns.max(call.start_ns),
            error_code: call.error.map(CallError::to_code),
            rows: call.rows,
        });
    }

    /// `DEALLOCATE [PREPARE] name | ALL` and `DISCARD ALL` drop prepared statements.
    fn forget_deallocated(&mut self, sql: &str) {
        let mut words = SqlWords::new(sql.as_bytes()).map(|(word, _)| word);
        let Some(first) = words.next() else {
            return;
        };
        if first.eq_ignore_ascii_case(b"DISCARD") {
            if words.next().is_some_and(|w| w.eq_ignore_ascii_case(b"ALL")) {
                self.statements.clear();
                self.portals.clear();
            }
        } else if first.eq_ignore_ascii_case(b"DEALLOCATE") {
            let mut name = words.next();
            if name.is_some_and(|w| w.eq_ignore_ascii_case(b"PREPARE")) {
                name = words.next();
            }
            match name {
                Some(w) if w.eq_ignore_ascii_case(b"ALL") => self.statements.clear(),
                // Unquoted identifiers are folded to lower case.
                Some(w) => self.statements.remove(&w.to_ascii_lowercase()),
                None => {}
            }
        }
    }
}

/// Cheap protocol detection: `bytes` begins with a StartupMessage (protocol 3.x),
/// SSLRequest, GSSENCRequest or CancelRequest header.
#[must_use]
pub fn looks_like_startup(bytes: &[u8]) -> bool {
    match (be_u32(bytes), bytes.get(4..).and_then(be_u32)) {
        (Some(len), Some(code)) => startup_kind(len, code).is_ok(),
        _ => false,
    }
}

/// Detection on a connection met mid-stream (opened before the agent, its startup
/// long over): `bytes`, the captured start of `total_len` bytes the client sent in a
/// row, are whole frontend messages of a session: a simple query or steps of the
/// extended protocol (Parse, Bind, Describe, Execute, Close, Sync, Flush,
/// Terminate), each at least its smallest length and under 16 MiB, the messages
/// ending exactly at `total_len` (where `bytes` are whole) or consistent as far as
/// they were captured. Text protocols never pass (a length's high byte is zero, an
/// ASCII byte is not); a random binary write rarely does (the lengths must chain).
#[must_use]
pub fn looks_like_session_messages(bytes: &[u8], total_len: usize) -> bool {
    let mut at = 0usize;
    let mut messages = 0usize;
    while at < bytes.len() {
        let ty = bytes[at];
        let Some(len) = bytes.get(at + 1..).and_then(be_u32) else {
            // A header cut by the end of what was captured.
            return messages > 0 && bytes.len() < total_len;
        };
        let len = len as usize;
        let fits = match ty {
            b'S' | b'H' | b'X' => len == 4,
            b'Q' => len >= 5,
            b'D' | b'C' => len >= 6 && matches!(bytes.get(at + 5), None | Some(b'S' | b'P')),
            b'P' => len >= 8,
            b'E' => len >= 9,
            b'B' => len >= 12,
            _ => false,
        };
        let end = at + 1 + len;
        if !fits || len >= 1 << 24 || end > total_len {
            return false;
        }
        // A query's text and a Describe's or Close's name end with their NUL; an
        // Execute's portal name ends just before its row limit (which tells it from
        // a server's ErrorResponse, also `E`).
        let nul_at = match ty {
            b'Q' | b'D' | b'C' => Some(end - 1),
            b'E' => Some(end - 5),
            _ => None,
        };
        if nul_at.and_then(|i| bytes.get(i)).is_some_and(|&b| b != 0) {
            return false;
        }
        messages += 1;
        at = end;
    }
    messages > 0
}

fn startup_kind(len: u32, code: u32) -> Result<StartupKind, &'static str> {
    if !(8..=MAX_STARTUP_BYTES).contains(&len) {
        return Err("the packet length is out of range");
    }
    match code {
        SSL_REQUEST if len == 8 => Ok(StartupKind::Ssl),
        GSSENC_REQUEST if len == 8 => Ok(StartupKind::Gss),
        // 3.0 keys are 4 bytes; 3.2 allows up to 256.
        CANCEL_REQUEST if (16..=12 + 256).contains(&len) => Ok(StartupKind::Cancel),
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => {
            Err("the packet length does not fit the request code")
        }
        _ if code >> 16 == PROTOCOL_MAJOR_3 && code & 0xffff <= MAX_PROTOCOL_MINOR => {
            if len > 8 {
                Ok(StartupKind::Startup)
            } else {
                Err("the StartupMessage has no parameters")
            }
        }
        _ => Err("unknown protocol version or request code"),
    }
}

/// Names of the messages each side may send after the startup.
fn message_name(side: Side, ty: u8) -> Option<&'static str> {
    Some(match (side, ty) {
        (Side::Client, b'B') => "Bind",
        (Side::Client, b'C') => "Close",
        (Side::Client, b'D') => "Describe",
        (Side::Client, b'E') => "Execute",
        (Side::Client, b'F') => "FunctionCall",
        (Side::Client, b'H') => "Flush",
        (Side::Client, b'P') => "Parse",
        (Side::Client, b'Q') => "Query",
        (Side::Client, b'S') => "Sync",
        (Side::Client, b'X') => "Terminate",
        (Side::Client, b'f') => "CopyFail",
        (Side::Client, b'p') => "authentication response",
        (Side::Server, b'1') => "ParseComplete",
        (Side::Server, b'2') => "BindComplete",
        (Side::Server, b'3') => "CloseComplete",
        (Side::Server, b'A') => "NotificationResponse",
        (Side::Server, b'C') => "CommandComplete",
        (Side::Server, b'D') => "DataRow",
        (Side::Server, b'E') => "ErrorResponse",
        (Side::Server, b'G') => "CopyInResponse",
        (Side::Server, b'H') => "CopyOutResponse",
        (Side::Server, b'I') => "EmptyQueryResponse",
        (Side::Server, b'K') => "BackendKeyData",
        (Side::Server, b'N') => "NoticeResponse",
        (Side::Server, b'R') => "Authentication",
        (Side::Server, b'S') => "ParameterStatus",
        (Side::Server, b'T') => "RowDescription",
        (Side::Server, b'V') => "FunctionCallResponse",
        (Side::Server, b'W') => "CopyBothResponse",
        (Side::Server, b'Z') => "ReadyForQuery",
        (Side::Server, b'n') => "NoData",
        (Side::Server, b's') => "PortalSuspended",
        (Side::Server, b't') => "ParameterDescription",
        (Side::Server, b'v') => "NegotiateProtocolVersion",
        (_, b'd') => "CopyData",
        (_, b'c') => "CopyDone",
        _ => return None,
    })
}

/// Length field bounds of each message: (least, most).
fn length_bounds(side: Side, ty: u8) -> (u32, u32) {
    match (side, ty) {
        (Side::Client, b'S' | b'H' | b'X' | b'c') => (4, 4),
        (Side::Server, b'1' | b'2' | b'3' | b'n' | b'I' | b's' | b'c') => (4, 4),
        (Side::Server, b'Z') => (5, 5),
        // Process id and a 4-byte key (3.0) or up to 256 bytes (3.2).
        (Side::Server, b'K') => (12, 4 + 4 + 256),
        (Side::Client, b'Q') | (Side::Server, b'C' | b'E' | b'N') => (5, MAX_MESSAGE_BYTES),
        (Side::Client, b'D' | b'C') | (Side::Server, b'D' | b'T' | b't' | b'S') => {
            (6, MAX_MESSAGE_BYTES)
        }
        (Side::Client, b'P') | (Side::Server, b'R' | b'V') => (8, MAX_MESSAGE_BYTES),
        (Side::Client, b'E') => (9, MAX_MESSAGE_BYTES),
        (Side::Server, b'A') => (10, MAX_MESSAGE_BYTES),
        (Side::Client, b'B') | (Side::Server, b'v') => (12, MAX_MESSAGE_BYTES),
        (Side::Server, b'G' | b'H' | b'W') => (7, MAX_MESSAGE_BYTES),
        _ => (4, MAX_MESSAGE_BYTES),
    }
}

fn check_header(side: Side, ty: u8, len: u32) -> Result<(), PgError> {
    let message = message_name(side, ty).ok_or(PgError::UnknownMessageType { side })?;
    let (least, most) = length_bounds(side, ty);
    let reason = if len < 4 {
        "shorter than its own length field"
    } else if len > MAX_MESSAGE_BYTES {
        "longer than 1 GiB"
    } else if least == most && len != least {
        "not the fixed length of this message"
    } else if len < least {
        "too short for the fields of this message"
    } else if len > most {
        "too long for the fields of this message"
    } else {
        return Ok(());
    };
    Err(PgError::BadLength {
        side,
        message,
        reason,
    })
}

/// Body bytes kept for each message; the rest is skipped.
fn keep_bytes(side: Side, ty: u8) -> usize {
    match (side, ty) {
        (Side::Client, b'Q') => MAX_QUERY_TEXT_BYTES + 1,
        (Side::Client, b'P') => MAX_NAME_BYTES + 1 + MAX_QUERY_TEXT_BYTES + 1,
        (Side::Client, b'B') => 2 * (MAX_NAME_BYTES + 1),
        (Side::Client, b'E') => MAX_NAME_BYTES + 1,
        (Side::Client, b'C') => 1 + MAX_NAME_BYTES + 1,
        (Side::Server, b'Z') => 1,
        (Side::Server, b'C') => TAG_KEEP_BYTES,
        _ => 0,
    }
}

/// Whether a chunk that begins with `bytes` can be trusted to start a message after
/// sync was lost: its first header is complete and valid, and so is every further
/// header (up to [`RESYNC_CHECK_MESSAGES`]) the captured bytes hold.
fn plausible_start(side: Side, bytes: &[u8]) -> bool {
    let mut pos = 0usize;
    for checked in 0..RESYNC_CHECK_MESSAGES {
        let Some(header) = bytes.get(pos..).filter(|h| h.len() >= TYPED_HEADER_BYTES) else {
            // The captured bytes end at or inside this header.
            return checked > 0
                && bytes
                    .get(pos)
                    .is_none_or(|&ty| message_name(side, ty).is_some());
        };
        let (Some(&ty), Some(len)) = (header.first(), header.get(1..).and_then(be_u32)) else {
            return false;
        };
        if check_header(side, ty, len).is_err() {
            return false;
        }
        let body = header.get(TYPED_HEADER_BYTES..).unwrap_or_default();
        if !plausible_body(side, ty, len.saturating_sub(4), body) {
            return false;
        }
        let Some(next) = usize::try_from(len)
            .ok()
            .and_then(|len| pos.checked_add(1)?.checked_add(len))
        else {
            return true;
        };
        pos = next;
    }
    true
}

/// Checks on the captured start (`prefix`) of a body of `len` bytes.
fn plausible_body(side: Side, ty: u8, len: u32, prefix: &[u8]) -> bool {
    match (side, ty) {
        (Side::Server, b'Z') => prefix.first().is_none_or(|s| b"ITE".contains(s)),
        (Side::Server, b'D') => {
            let Some(columns) = be_i16(prefix) else {
                return true;
            };
            if !(0..=MAX_COLUMNS).contains(&columns) || (columns == 0 && len != 2) {
                return false;
            }
            match prefix.get(2..).and_then(be_u32) {
                None => true,
                Some(u32::MAX) => true, // NULL
                Some(field) => u64::from(field) + 6 <= u64::from(len),
            }
        }
        (Side::Server, b'T') => be_i16(prefix).is_none_or(|n| (0..=MAX_COLUMNS).contains(&n)),
        (Side::Server, b'C') => {
            len <= 128
                && prefix
                    .iter()
                    .take_while(|&&b| b != 0)
                    .all(|&b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' ')
        }
        (Side::Server, b'E' | b'N') => prefix
            .first()
            .is_none_or(|f| b"SVCMDHPpqWstcdnFLR".contains(f)),
        (Side::Server, b'S') => len <= 8192,
        (Side::Client, b'D' | b'C') => {
            len <= 2 + 1024 && prefix.first().is_none_or(|k| b"SP".contains(k))
        }
        (Side::Client, b'E') => len <= 1024 + 5,
        _ => true,
    }
}

fn be_u32(bytes: &[u8]) -> Option<u32> {
    bytes
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
}

fn be_i16(bytes: &[u8]) -> Option<i16> {
    bytes
        .get(..2)
        .and_then(|b| <[u8; 2]>::try_from(b).ok())
        .map(i16::from_be_bytes)
}

/// Splits a NUL-terminated string off the front of `bytes`.
fn split_cstr(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = bytes.iter().position(|&b| b == 0)?;
    Some((bytes.get(..nul)?, bytes.get(nul + 1..)?))
}

/// A statement or portal name, if complete and not longer than [`MAX_NAME_BYTES`].
fn split_name(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    split_cstr(bytes.get(..=MAX_NAME_BYTES).unwrap_or(bytes))
        .and_then(|(name, _)| Some((name, bytes.get(name.len() + 1..)?)))
}

/// The SQL text at the start of `bytes` (up to a NUL), cut at
/// [`MAX_QUERY_TEXT_BYTES`].
fn sql_text(bytes: &[u8]) -> String {
    let text = bytes.split(|&b| b == 0).next().unwrap_or_default();
    kept_text(text, MAX_QUERY_TEXT_BYTES)
}

/// Row count of a CommandComplete tag (`SELECT 3`, `INSERT 0 1`, `UPDATE 2`, …).
fn rows_from_tag(body: &[u8]) -> Option<u64> {
    // A tag without its NUL was cut: its last number may be too.
    let (tag, _) = split_cstr(body)?;
    let command = tag.split(|&b| b == b' ').next()?;
    if !ROW_COUNT_COMMANDS.contains(&command) {
        return None;
    }
    let count = tag.rsplit(|&b| b == b' ').next()?;
    if count.len() == tag.len() || count.is_empty() {
        return None;
    }
    count.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// `db.operation.name`: the first keyword of `sql`, upper case; for `WITH …`, the
/// keyword of the main statement when it can be found.
fn sql_operation(sql: &str) -> Option<String> {
    let mut words = SqlWords::new(sql.as_bytes());
    let (first, depth) = words.next()?;
    let keyword = if first.eq_ignore_ascii_case(b"WITH") {
        words
            .find(|(word, d)| {
                *d == depth
                    && MAIN_STATEMENT_KEYWORDS
                        .iter()
                        .any(|k| word.eq_ignore_ascii_case(k))
            })
            .map_or(first, |(word, _)| word)
    } else {
        first
    };
    (keyword.len() <= MAX_OPERATION_BYTES && keyword.is_ascii())
        .then(|| String::from_utf8_lossy(keyword).to_ascii_uppercase())
}

/// The bare words of a SQL text with their parenthesis depth, skipping comments,
/// string literals, quoted identifiers and dollar-quoted bodies.
struct SqlWords<'a> {
    sql: &'a [u8],
    pos: usize,
    depth: u32,
}

impl<'a> SqlWords<'a> {
    fn new(sql: &'a [u8]) -> Self {
        Self {
            sql,
            pos: 0,
            depth: 0,
        }
    }

    fn at(&self, offset: usize) -> Option<u8> {
        self.sql.get(self.pos.checked_add(offset)?).copied()
    }

    /// Moves past the first `needle` at or after `from`, or to the end.
    fn skip_past(&mut self, from: usize, needle: &[u8]) {
        let rest = self.sql.get(from..).unwrap_or_default();
        self.pos = match rest.windows(needle.len()).position(|w| w == needle) {
            Some(p) => from + p + needle.len(),
            None => self.sql.len(),
        };
    }

    /// Skips a quoted run starting at `pos` (a quote char), with doubled quotes as
    /// escapes and, for `E'…'` strings, backslash escapes.
    fn skip_quoted(&mut self, quote: u8, backslash: bool) {
        let mut i = self.pos + 1;
        while let Some(&b) = self.sql.get(i) {
            if backslash && b == b'\\' {
                i += 2;
            } else if b == quote {
                if self.sql.get(i + 1) == Some(&quote) {
                    i += 2;
                } else {
                    self.pos = i + 1;
                    return;
                }
            } else {
                i += 1;
            }
        }
        self.pos = self.sql.len();
    }

    /// Skips a possibly nested block comment starting at `pos`.
    fn skip_block_comment(&mut self) {
        let mut level = 0u32;
        let mut i = self.pos;
        while i < self.sql.len() {
            match (self.sql.get(i), self.sql.get(i + 1)) {
                (Some(b'/'), Some(b'*')) => {
                    level += 1;
                    i += 2;
                }
                (Some(b'*'), Some(b'/')) => {
                    level = level.saturating_sub(1);
                    i += 2;
                    if level == 0 {
                        self.pos = i;
                        return;
                    }
                }
                _ => i += 1,
            }
        }
        self.pos = self.sql.len();
    }
}

fn is_word_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_word_byte(b: u8) -> bool {
    is_word_start(b) || b.is_ascii_digit() || b == b'$'
}

impl<'a> Iterator for SqlWords<'a> {
    type Item = (&'a [u8], u32);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let b = self.at(0)?;
            match b {
                b'-' if self.at(1) == Some(b'-') => self.skip_past(self.pos, b"\n"),
                b'/' if self.at(1) == Some(b'*') => self.skip_block_comment(),
                b'\'' => {
                    // E'…' (the E was returned as a word) takes backslash escapes.
                    let escapes = self
                        .pos
                        .checked_sub(1)
                        .and_then(|i| self.sql.get(i))
                        .is_some_and(|&c| c == b'E' || c == b'e')
                        && self
                            .pos
                            .checked_sub(2)
                            .and_then(|i| self.sql.get(i))
                            .is_none_or(|&c| !is_word_byte(c));
                    self.skip_quoted(b'\'', escapes);
                }
                b'"' => self.skip_quoted(b'"', false),
                b'$' => {
                    // $tag$…$tag$ or $$…$$; `$1` is a parameter.
                    let tag_len = self
                        .sql
                        .get(self.pos + 1..)
                        .unwrap_or_default()
                        .iter()
                        .position(|&c| !is_word_byte(c) || c == b'$');
                    let opens = self.at(1).is_some_and(|c| c == b'$' || is_word_start(c));
                    match tag_len {
                        Some(n)
                            if opens
                                && n <= MAX_DOLLAR_TAG_BYTES
                                && self.at(n + 1) == Some(b'$') =>
                        {
                            let end = self.pos + n + 2;
                            let tag = self.sql.get(self.pos..end).unwrap_or_default().to_vec();
                            self.skip_past(end, &tag);
                        }
                        _ => self.pos += 1,
                    }
                }
                b'(' => {
                    self.depth = self.depth.saturating_add(1);
                    self.pos += 1;
                }
                b')' => {
                    self.depth = self.depth.saturating_sub(1);
                    self.pos += 1;
                }
                _ if is_word_start(b) => {
                    let start = self.pos;
                    let len = self
                        .sql
                        .get(start..)
                        .unwrap_or_default()
                        .iter()
                        .take_while(|&&c| is_word_byte(c))
                        .count();
                    self.pos = start + len;
                    return Some((self.sql.get(start..self.pos)?, self.depth));
                }
                _ => self.pos += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- recorded sessions -----------------------------------------------------

    /// One recorded connection (see testdata/postgres/capture.py).
    macro_rules! capture {
        ($name:literal) => {
            (
                $name,
                &include_bytes!(concat!("../testdata/postgres/", $name, ".cap"))[..],
            )
        };
    }

    #[derive(Clone, Copy, Debug)]
    struct Record<'a> {
        side: Side,
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
                side: if r.from_client {
                    Side::Client
                } else {
                    Side::Server
                },
                ts: r.ts_ns,
                bytes: r.bytes,
            })
            .collect()
    }

    /// (operation, query text, SQLSTATE, rows) of a decoded call.
    type Summary = (Option<String>, Option<String>, Option<String>, Option<u64>);

    /// (operation, query text, SQLSTATE, rows) of an expected call.
    type Expected = (
        Option<&'static str>,
        &'static str,
        Option<&'static str>,
        Option<u64>,
    );

    struct Case {
        name: &'static str,
        data: &'static [u8],
        calls: Vec<Expected>,
        /// Transaction status after each server chunk, repeats removed.
        tx: Vec<TxStatus>,
    }

    use TxStatus::{Failed, Idle, InTransaction};

    const LO_INIT: &str = "select proname, oid from pg_catalog.pg_proc where proname in ('lo_open', 'lo_close', 'lo_creat', 'lo_create', 'lo_unlink', 'lo_lseek', 'lo_lseek64', 'lo_tell', 'lo_tell64', 'lo_truncate', 'lo_truncate64', 'loread', 'lowrite') and pronamespace = (select oid from pg_catalog.pg_namespace where nspname = 'pg_catalog')";

    fn case(
        (name, data): (&'static str, &'static [u8]),
        calls: &[Expected],
        tx: &[TxStatus],
    ) -> Case {
        Case {
            name,
            data,
            calls: calls.to_vec(),
            tx: tx.to_vec(),
        }
    }

    fn cases() -> Vec<Case> {
        let select = Some("SELECT");
        vec![
            case(
                capture!("psql_simple"),
                &[(
                    select,
                    "SELECT id, name FROM items ORDER BY id",
                    None,
                    Some(3),
                )],
                &[Idle],
            ),
            case(
                capture!("psql_sslrequest"),
                &[(select, "SELECT count(*) FROM items", None, Some(1))],
                &[Idle],
            ),
            case(
                capture!("psql_error"),
                &[(select, "SELECT 1/0", Some("22012"), None)],
                &[Idle],
            ),
            case(
                capture!("psql_transaction"),
                &[
                    (Some("BEGIN"), "BEGIN", None, None),
                    (
                        Some("INSERT"),
                        "INSERT INTO items (id, name) VALUES (10, 'ten')",
                        None,
                        Some(1),
                    ),
                    (select, "SELECT * FROM missing_table", Some("42P01"), None),
                    (Some("ROLLBACK"), "ROLLBACK", None, None),
                    (Some("BEGIN"), "BEGIN", None, None),
                    (
                        Some("UPDATE"),
                        "UPDATE items SET name = 'uno' WHERE id = 1",
                        None,
                        Some(1),
                    ),
                    (Some("COMMIT"), "COMMIT", None, None),
                ],
                &[Idle, InTransaction, Failed, Idle, InTransaction, Idle],
            ),
            case(
                capture!("psql_misc"),
                &[
                    (
                        select,
                        "WITH t AS (SELECT id FROM items) SELECT count(*) FROM t",
                        None,
                        Some(1),
                    ),
                    (
                        select,
                        "SELECT 1 AS a; UPDATE items SET name = name WHERE id <= 2",
                        None,
                        Some(2),
                    ),
                    (
                        Some("SET"),
                        "SET application_name = 'tracer-test'",
                        None,
                        None,
                    ),
                    (
                        Some("DO"),
                        "DO $$BEGIN RAISE NOTICE 'hello'; END$$",
                        None,
                        None,
                    ),
                    (Some("LISTEN"), "LISTEN ch", None, None),
                    (Some("NOTIFY"), "NOTIFY ch, 'payload'", None, None),
                    (Some("COPY"), "COPY items TO STDOUT", None, Some(3)),
                    (
                        select,
                        "SELECT g, repeat('x', 300) FROM generate_series(1, 30) g",
                        None,
                        Some(30),
                    ),
                ],
                &[Idle],
            ),
            case(
                capture!("psql_copy_in"),
                &[(
                    Some("COPY"),
                    "COPY items (id, name) FROM STDIN",
                    None,
                    Some(2),
                )],
                &[Idle],
            ),
            case(
                capture!("psql_large_object"),
                &[
                    (Some("BEGIN"), "BEGIN", None, None),
                    (select, LO_INIT, None, Some(13)),
                    (Some("COMMIT"), "COMMIT", None, None),
                    (
                        select,
                        "SELECT count(lo_unlink(oid)) FROM pg_largeobject_metadata",
                        None,
                        Some(1),
                    ),
                ],
                &[Idle, InTransaction, Idle],
            ),
            case(
                capture!("psycopg_simple"),
                &[
                    (
                        select,
                        "SELECT id, name FROM items WHERE id = $1",
                        None,
                        Some(1),
                    ),
                    (select, "SELECT 42", None, Some(1)),
                ],
                &[Idle],
            ),
            case(
                capture!("psycopg_prepared"),
                &[(
                    select,
                    "SELECT name FROM items WHERE id = $1",
                    None,
                    Some(1),
                ); 3],
                &[Idle],
            ),
            case(
                capture!("psycopg_error"),
                &[
                    (select, "SELECT 1 / $1", Some("22012"), None),
                    (select, "SELECT * FROM missing_table", Some("42P01"), None),
                    (select, "SELECT 1", None, Some(1)),
                ],
                &[Idle],
            ),
            case(
                capture!("psycopg_open_tx"),
                &[
                    (Some("BEGIN"), "BEGIN", None, None),
                    (
                        Some("INSERT"),
                        "INSERT INTO items (id, name) VALUES ($1, $2)",
                        None,
                        Some(1),
                    ),
                    (select, "SELECT count(*) FROM items", None, Some(1)),
                ],
                &[Idle, InTransaction],
            ),
            case(
                capture!("psycopg_pipeline"),
                &[
                    (
                        Some("INSERT"),
                        "INSERT INTO items (id, name) VALUES ($1, $2)",
                        None,
                        Some(1),
                    ),
                    // The third statement of the batch was skipped by the server.
                    (select, "SELECT 1 / $1", Some("22012"), None),
                    (
                        Some("INSERT"),
                        "INSERT INTO items (id, name) VALUES ($1, $2)",
                        None,
                        Some(1),
                    ),
                    (
                        Some("INSERT"),
                        "INSERT INTO items (id, name) VALUES ($1, $2)",
                        None,
                        Some(1),
                    ),
                    (
                        Some("INSERT"),
                        "INSERT INTO items (id, name) VALUES ($1, $2)",
                        None,
                        Some(1),
                    ),
                    (select, "SELECT count(*) FROM items", None, Some(1)),
                ],
                &[Idle],
            ),
            case(
                capture!("psycopg_copy"),
                &[
                    (
                        Some("COPY"),
                        "COPY items (id, name) FROM STDIN",
                        None,
                        Some(2),
                    ),
                    (Some("COPY"), "COPY items TO STDOUT", None, Some(5)),
                    (select, "SELECT count(*) FROM items", None, Some(1)),
                ],
                &[Idle],
            ),
            case(
                capture!("psycopg_large"),
                &[
                    (
                        select,
                        "SELECT g, repeat('x', 2000) FROM generate_series(1, 40) g",
                        None,
                        Some(40),
                    ),
                    (select, "SELECT 1", None, Some(1)),
                ],
                &[Idle],
            ),
        ]
    }

    fn find_case(name: &str) -> Case {
        cases()
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no capture named {name}"))
    }

    #[derive(Debug, Default)]
    struct Decoded {
        calls: Vec<DbCall>,
        errors: Vec<PgError>,
        tx: Vec<TxStatus>,
    }

    fn feed_one(dec: &mut PgDecoder, side: Side, chunk: &Chunk<'_>, decoded: &mut Decoded) {
        let result = match side {
            Side::Client => dec.client(chunk, &mut decoded.calls),
            Side::Server => dec.server(chunk, &mut decoded.calls),
        };
        if let Err(e) = result {
            decoded.errors.push(e);
        }
        if side == Side::Server
            && dec.tx_status() != TxStatus::Unknown
            && decoded.tx.last() != Some(&dec.tx_status())
        {
            decoded.tx.push(dec.tx_status());
        }
        check_invariants(dec);
    }

    fn run(chunks: &[(Side, Chunk<'_>)]) -> (PgDecoder, Decoded) {
        let mut dec = PgDecoder::new();
        let mut decoded = Decoded::default();
        for (side, chunk) in chunks {
            feed_one(&mut dec, *side, chunk, &mut decoded);
        }
        (dec, decoded)
    }

    fn check_invariants(dec: &PgDecoder) {
        let max_keep = MAX_NAME_BYTES + 1 + MAX_QUERY_TEXT_BYTES + 1;
        for stream in [&dec.client, &dec.server] {
            assert!(stream.kept.len() <= max_keep.max(STARTUP_KEEP_BYTES));
            assert!(stream.header_len < STARTUP_HEADER_BYTES);
        }
        assert!(dec.pending.len() <= MAX_PENDING);
        assert!(dec.statements.len() <= MAX_STATEMENTS);
        assert!(dec.portals.len() <= MAX_PORTALS);
        assert!(dec.statements.order.len() <= 2 * MAX_STATEMENTS + 17);
        assert!(dec.portals.order.len() <= 2 * MAX_PORTALS + 17);
    }

    fn check_call(call: &DbCall) {
        assert_eq!(call.system, DbSystem::Postgresql);
        assert!(call.start_ns <= call.end_ns, "{call:?}");
        if let Some(text) = &call.query_text {
            assert!(text.len() <= MAX_QUERY_TEXT_BYTES);
        }
        if let Some(op) = &call.operation {
            assert!(op.len() <= MAX_OPERATION_BYTES);
            assert!(!op.bytes().any(|b| b.is_ascii_lowercase()), "{op}");
        }
        if let Some(code) = &call.error_code {
            assert!(
                code == UNKNOWN_SQLSTATE
                    || (code.len() == 5
                        && code
                            .bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())),
                "{code}"
            );
        }
    }

    fn summary(calls: &[DbCall]) -> Vec<Summary> {
        calls
            .iter()
            .map(|c| {
                (
                    c.operation.clone(),
                    c.query_text.clone(),
                    c.error_code.clone(),
                    c.rows,
                )
            })
            .collect()
    }

    fn expected(calls: &[Expected]) -> Vec<Summary> {
        calls
            .iter()
            .map(|&(op, text, code, rows)| {
                (
                    op.map(str::to_owned),
                    Some(text.to_owned()),
                    code.map(str::to_owned),
                    rows,
                )
            })
            .collect()
    }

    #[test]
    fn captured_sessions_decode_exactly() {
        for c in cases() {
            let recs = records(c.data);
            let (mut dec, decoded) = run(&as_chunks(&recs));
            assert!(
                decoded.errors.is_empty(),
                "{}: {:?}",
                c.name,
                decoded.errors
            );
            assert_eq!(summary(&decoded.calls), expected(&c.calls), "{}", c.name);
            assert_eq!(decoded.tx, c.tx, "{}", c.name);
            for call in &decoded.calls {
                check_call(call);
                assert_eq!(call.namespace.as_deref(), Some("shop"), "{}", c.name);
            }
            assert_eq!(dec.namespace(), Some("shop"));
            assert_eq!(dec.user(), Some("tracer"));
            assert!(!dec.is_encrypted());
            assert!(!dec.in_flight(), "{}", c.name);
            assert_eq!(dec.dropped_calls(), 0);
            assert_eq!(dec.finish(), 0);
        }
    }

    #[test]
    fn call_timestamps_are_those_of_the_request_and_response_chunks() {
        for c in cases() {
            let recs = records(c.data);
            let (_, decoded) = run(&as_chunks(&recs));
            for call in &decoded.calls {
                assert!(
                    recs.iter()
                        .any(|r| r.side == Side::Client && r.ts == call.start_ns),
                    "{}: {call:?}",
                    c.name
                );
                assert!(
                    recs.iter()
                        .any(|r| r.side == Side::Server && r.ts == call.end_ns),
                    "{}: {call:?}",
                    c.name
                );
                assert!(call.start_ns < call.end_ns);
            }
        }
        // psql_transaction: the failing simple query starts with the chunk holding its
        // Query and ends with the one holding its ReadyForQuery (which may come after
        // the one holding the ErrorResponse).
        let recs = records(find_case("psql_transaction").data);
        let (_, decoded) = run(&as_chunks(&recs));
        let failing = &decoded.calls[2];
        assert_eq!(failing.start_ns, holding(&recs, b"missing_table").ts);
        assert_eq!(failing.end_ns, holding(&recs, b"Z\0\0\0\x05E").ts);
        // psycopg_error: the extended-protocol Execute ends at its ErrorResponse.
        let recs = records(find_case("psycopg_error").data);
        let (_, decoded) = run(&as_chunks(&recs));
        assert_eq!(
            decoded.calls[0].start_ns,
            holding(&recs, b"SELECT 1 / $1").ts
        );
        assert_eq!(decoded.calls[0].end_ns, holding(&recs, b"C22012").ts);
    }

    /// The first record holding `needle`.
    fn holding<'a>(recs: &[Record<'a>], needle: &[u8]) -> Record<'a> {
        *recs
            .iter()
            .find(|r| r.bytes.windows(needle.len()).any(|w| w == needle))
            .unwrap()
    }

    #[test]
    fn tx_status_follows_each_ready_for_query() {
        let recs = records(find_case("psql_transaction").data);
        let mut dec = PgDecoder::new();
        let mut calls = Vec::new();
        let mut after_queries = Vec::new();
        for r in &recs {
            let chunk = Chunk::whole(r.bytes, r.ts);
            match r.side {
                Side::Client => dec.client(&chunk, &mut calls).unwrap(),
                Side::Server => dec.server(&chunk, &mut calls).unwrap(),
            }
            // One ReadyForQuery per server read: the client waits for each.
            if r.side == Side::Server && r.bytes.windows(5).any(|w| w == b"Z\0\0\0\x05") {
                after_queries.push(dec.tx_status());
            }
            if r.side == Side::Client && r.bytes.first() == Some(&b'Q') {
                assert!(dec.in_flight());
            }
        }
        assert_eq!(
            after_queries,
            [
                Idle,
                InTransaction,
                InTransaction,
                Failed,
                Idle,
                InTransaction,
                InTransaction,
                Idle
            ]
        );
        let recs = records(find_case("psycopg_open_tx").data);
        let (mut dec, _) = run(&as_chunks(&recs));
        assert_eq!(dec.tx_status(), InTransaction);
        assert_eq!(dec.finish(), 0);
        assert_eq!(dec.tx_status(), InTransaction);
    }

    /// Every record cut into one-byte chunks with the record's timestamp.
    fn bytewise<'a>(recs: &[Record<'a>]) -> Vec<(Side, Chunk<'a>)> {
        recs.iter()
            .flat_map(|r| {
                r.bytes
                    .chunks(1)
                    .map(move |b| (r.side, Chunk::whole(b, r.ts)))
            })
            .collect()
    }

    fn as_chunks<'a>(recs: &[Record<'a>]) -> Vec<(Side, Chunk<'a>)> {
        recs.iter()
            .map(|r| (r.side, Chunk::whole(r.bytes, r.ts)))
            .collect()
    }

    #[test]
    fn every_byte_boundary_gives_the_same_calls() {
        for c in cases() {
            let recs = records(c.data);
            let (_, reference) = run(&as_chunks(&recs));
            let (dec, decoded) = run(&bytewise(&recs));
            assert!(
                decoded.errors.is_empty(),
                "{}: {:?}",
                c.name,
                decoded.errors
            );
            assert_eq!(decoded.calls, reference.calls, "{}", c.name);
            assert_eq!(decoded.tx, reference.tx, "{}", c.name);
            assert!(!dec.in_flight());
        }
    }

    #[test]
    fn every_two_piece_split_gives_the_same_calls() {
        for c in cases() {
            let recs = records(c.data);
            let (_, reference) = run(&as_chunks(&recs));
            let server_messages = server_messages(&recs);
            let mut server_offset = 0;
            for (i, r) in recs.iter().enumerate() {
                let (r0, r1) = (server_offset, server_offset + r.bytes.len());
                if r.side == Side::Server {
                    server_offset = r1;
                }
                // Large reads (row data): every cut near a message boundary, and some.
                let near_boundary = |cut: usize| {
                    r.side == Side::Server
                        && server_messages.iter().any(|&(start, _, _)| {
                            (r0..r1).contains(&start) && (r0 + cut).abs_diff(start) <= 5
                        })
                };
                for cut in (1..r.bytes.len())
                    .filter(|&cut| r.bytes.len() <= 4096 || cut % 64 == 0 || near_boundary(cut))
                {
                    let mut chunks = as_chunks(&recs);
                    let (a, b) = r.bytes.split_at(cut);
                    chunks[i] = (r.side, Chunk::whole(a, r.ts));
                    chunks.insert(i + 1, (r.side, Chunk::whole(b, r.ts)));
                    let (_, decoded) = run(&chunks);
                    assert!(decoded.errors.is_empty(), "{} {i}/{cut}", c.name);
                    assert_eq!(decoded.calls, reference.calls, "{} {i}/{cut}", c.name);
                }
            }
        }
    }

    /// The server's messages: (start, type, end) offsets in its byte stream.
    fn server_messages(recs: &[Record<'_>]) -> Vec<(usize, u8, usize)> {
        let server: Vec<u8> = recs
            .iter()
            .filter(|r| r.side == Side::Server)
            .flat_map(|r| r.bytes.iter().copied())
            .collect();
        // The SSLRequest answer is not a message.
        let mut pos = usize::from(server.starts_with(b"NR"));
        let mut messages = Vec::new();
        while pos + 5 <= server.len() {
            let len = u32::from_be_bytes(server[pos + 1..pos + 5].try_into().unwrap()) as usize;
            messages.push((pos, server[pos], pos + 1 + len));
            pos += 1 + len;
        }
        messages
    }

    /// The records with the server's DataRow payloads uncaptured after their first
    /// `keep` bytes: each uncaptured stretch ends a chunk as a gap.
    fn with_row_gaps<'a>(recs: &[Record<'a>], keep: usize) -> Vec<(Side, Chunk<'a>)> {
        let messages = server_messages(recs);
        let holes: Vec<(usize, usize)> = messages
            .iter()
            .filter(|&&(start, ty, end)| ty == b'D' && start + 5 + keep < end)
            .map(|&(start, _, end)| (start + 5 + keep, end))
            .collect();
        let mut chunks = Vec::new();
        let mut offset = 0;
        for r in recs {
            if r.side == Side::Client {
                chunks.push((r.side, Chunk::whole(r.bytes, r.ts)));
                continue;
            }
            let (r0, r1) = (offset, offset + r.bytes.len());
            offset = r1;
            let mut cursor = r0;
            for &(h0, h1) in &holes {
                let (h0, h1) = (h0.max(r0), h1.min(r1));
                if h0 >= h1 || h0 < cursor {
                    continue;
                }
                chunks.push((
                    r.side,
                    Chunk {
                        bytes: &r.bytes[cursor - r0..h0 - r0],
                        len: h1 - cursor,
                        ts_ns: r.ts,
                    },
                ));
                cursor = h1;
            }
            if cursor < r1 {
                chunks.push((r.side, Chunk::whole(&r.bytes[cursor - r0..], r.ts)));
            }
        }
        chunks
    }

    #[test]
    fn gaps_inside_data_row_payloads_give_the_same_calls() {
        for c in cases() {
            let recs = records(c.data);
            let (_, reference) = run(&as_chunks(&recs));
            for keep in [0, 1, 2, 7] {
                let chunks = with_row_gaps(&recs, keep);
                let (dec, decoded) = run(&chunks);
                assert!(
                    decoded.errors.is_empty(),
                    "{} keep {keep}: {:?}",
                    c.name,
                    decoded.errors
                );
                assert_eq!(decoded.calls, reference.calls, "{} keep {keep}", c.name);
                assert_eq!(decoded.tx, reference.tx, "{} keep {keep}", c.name);
                assert!(!dec.in_flight());
            }
        }
        // The gaps really are there: psycopg_large loses almost all of its 80 KB.
        let recs = records(find_case("psycopg_large").data);
        let chunks = with_row_gaps(&recs, 1);
        let uncaptured: usize = chunks.iter().map(|(_, c)| c.gap()).sum();
        assert!(uncaptured > 75_000, "{uncaptured}");
    }

    // ---- synthetic messages ----------------------------------------------------

    fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![ty];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = 196_608u32.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend(cstr(k));
            body.extend(cstr(v));
        }
        body.push(0);
        let mut m = (body.len() as u32 + 4).to_be_bytes().to_vec();
        m.extend(body);
        m
    }

    fn request(code: u32) -> Vec<u8> {
        let mut m = 8u32.to_be_bytes().to_vec();
        m.extend(code.to_be_bytes());
        m
    }

    fn query(sql: &str) -> Vec<u8> {
        msg(b'Q', &cstr(sql))
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut body = cstr(name);
        body.extend(cstr(sql));
        body.extend(0u16.to_be_bytes());
        msg(b'P', &body)
    }

    fn bind(portal: &str, statement: &str) -> Vec<u8> {
        let mut body = cstr(portal);
        body.extend(cstr(statement));
        body.extend([0, 0, 0, 0, 0, 0]);
        msg(b'B', &body)
    }

    fn describe(portal: &str) -> Vec<u8> {
        let mut body = vec![b'P'];
        body.extend(cstr(portal));
        msg(b'D', &body)
    }

    fn execute(portal: &str, max_rows: u32) -> Vec<u8> {
        let mut body = cstr(portal);
        body.extend(max_rows.to_be_bytes());
        msg(b'E', &body)
    }

    fn close(kind: u8, name: &str) -> Vec<u8> {
        let mut body = vec![kind];
        body.extend(cstr(name));
        msg(b'C', &body)
    }

    fn sync() -> Vec<u8> {
        msg(b'S', b"")
    }

    fn ready(status: u8) -> Vec<u8> {
        msg(b'Z', &[status])
    }

    fn complete(tag: &str) -> Vec<u8> {
        msg(b'C', &cstr(tag))
    }

    fn error(code: &str, message: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (field, value) in [
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', code),
            (b'M', message),
        ] {
            body.push(field);
            body.extend(cstr(value));
        }
        body.push(0);
        msg(b'E', &body)
    }

    fn notice() -> Vec<u8> {
        let mut body = vec![b'S'];
        body.extend(cstr("NOTICE"));
        body.push(b'M');
        body.extend(cstr("hello"));
        body.push(0);
        msg(b'N', &body)
    }

    fn notification() -> Vec<u8> {
        let mut body = 42u32.to_be_bytes().to_vec();
        body.extend(cstr("ch"));
        body.extend(cstr("payload"));
        msg(b'A', &body)
    }

    fn data_row(fields: &[&[u8]]) -> Vec<u8> {
        let mut body = (fields.len() as u16).to_be_bytes().to_vec();
        for f in fields {
            body.extend((f.len() as u32).to_be_bytes());
            body.extend(*f);
        }
        msg(b'D', &body)
    }

    fn row_description() -> Vec<u8> {
        let mut body = 1u16.to_be_bytes().to_vec();
        body.extend(cstr("c"));
        body.extend([0; 18]);
        msg(b'T', &body)
    }

    fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    /// A decoder driven by hand, one timestamp per chunk.
    struct Session {
        dec: PgDecoder,
        decoded: Decoded,
        ts: u64,
    }

    impl Session {
        fn new() -> Self {
            Self {
                dec: PgDecoder::new(),
                decoded: Decoded::default(),
                ts: 0,
            }
        }

        /// Through the startup, as user `app` on database `orders`.
        fn started() -> Self {
            let mut s = Self::new();
            s.client(&startup(&[("user", "app"), ("database", "orders")]));
            s.server(&cat(&[msg(b'R', &[0, 0, 0, 0]), ready(b'I')]));
            s
        }

        fn feed(&mut self, side: Side, bytes: &[u8], gap: usize) {
            self.ts += 10;
            let chunk = Chunk {
                bytes,
                len: bytes.len() + gap,
                ts_ns: self.ts,
            };
            feed_one(&mut self.dec, side, &chunk, &mut self.decoded);
        }

        fn client(&mut self, bytes: &[u8]) {
            self.feed(Side::Client, bytes, 0);
        }

        fn server(&mut self, bytes: &[u8]) {
            self.feed(Side::Server, bytes, 0);
        }

        fn calls(&self) -> Vec<Summary> {
            summary(&self.decoded.calls)
        }
    }

    fn call(
        op: Option<&str>,
        text: Option<&str>,
        code: Option<&str>,
        rows: Option<u64>,
    ) -> (Option<String>, Option<String>, Option<String>, Option<u64>) {
        (
            op.map(str::to_owned),
            text.map(str::to_owned),
            code.map(str::to_owned),
            rows,
        )
    }

    // ---- startup and encryption ------------------------------------------------

    #[test]
    fn ssl_request_answered_n_continues_in_plaintext() {
        let c = find_case("psql_sslrequest");
        let recs = records(c.data);
        assert_eq!(recs[0].bytes, request(SSL_REQUEST));
        assert_eq!(recs[1].bytes, b"N");
        let (dec, decoded) = run(&as_chunks(&recs));
        assert!(decoded.errors.is_empty());
        assert!(!dec.is_encrypted());
        assert_eq!(decoded.calls.len(), 1);
    }

    #[test]
    fn accepted_encryption_stops_decoding_silently() {
        for (code, answer) in [(SSL_REQUEST, b'S'), (GSSENC_REQUEST, b'G')] {
            let mut s = Session::new();
            s.client(&request(code));
            s.server(&[answer]);
            assert!(s.dec.is_encrypted());
            s.client(b"\x16\x03\x01 random TLS bytes");
            s.server(b"\x16\x03\x03 more");
            s.client(&query("SELECT 1"));
            s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
            assert!(s.decoded.errors.is_empty());
            assert!(s.decoded.calls.is_empty());
            assert!(!s.dec.in_flight());
        }
        // GSSENCRequest refused, then SSLRequest refused, then plaintext.
        let mut s = Session::new();
        s.client(&request(GSSENC_REQUEST));
        s.server(b"N");
        s.client(&request(SSL_REQUEST));
        s.server(b"N");
        s.client(&startup(&[("user", "u")]));
        s.server(&ready(b'I'));
        s.client(&query("SELECT 1"));
        s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
        assert!(!s.dec.is_encrypted());
        assert_eq!(
            s.calls(),
            [call(Some("SELECT"), Some("SELECT 1"), None, Some(1))]
        );
        // Direct TLS (PostgreSQL 17 sslnegotiation=direct).
        let mut s = Session::new();
        s.client(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
        assert!(s.dec.is_encrypted());
        assert!(s.decoded.errors.is_empty());
        // An old server refusing SSLRequest with an ErrorResponse.
        let mut s = Session::new();
        s.client(&request(SSL_REQUEST));
        s.server(&error("08P01", "unsupported frontend protocol"));
        assert!(s.decoded.errors.is_empty());
        assert!(!s.dec.is_encrypted());
        // Anything else is an error.
        let mut s = Session::new();
        s.client(&request(SSL_REQUEST));
        s.server(b"X");
        assert_eq!(
            s.decoded.errors,
            [PgError::BadEncryptionAnswer {
                request: "SSLRequest"
            }]
        );
    }

    /// The plaintext of an encrypted session (from the TLS probes) is decoded as
    /// the session it is: startup, then calls, as if it had never been encrypted.
    #[test]
    fn an_encrypted_session_resumes_in_plaintext_from_its_startup() {
        for tls_start in [
            vec![request(SSL_REQUEST), b"S".to_vec()],
            // Direct TLS: the handshake first.
            vec![b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec()],
        ] {
            let mut s = Session::new();
            for (i, bytes) in tls_start.iter().enumerate() {
                if i % 2 == 0 {
                    s.client(bytes);
                } else {
                    s.server(bytes);
                }
            }
            assert!(s.dec.is_encrypted());
            s.dec.resume_in_plaintext();
            assert!(!s.dec.is_encrypted());
            s.client(&startup(&[("user", "app"), ("database", "orders")]));
            s.server(&ready(b'I'));
            s.client(&query("SELECT 1"));
            s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
            assert!(s.decoded.errors.is_empty(), "{:?}", s.decoded.errors);
            assert_eq!(s.dec.namespace(), Some("orders"));
            assert_eq!(
                s.calls(),
                [call(Some("SELECT"), Some("SELECT 1"), None, Some(1))]
            );
        }
        // Not encrypted: nothing changes.
        let mut s = Session::started();
        s.dec.resume_in_plaintext();
        assert_eq!(s.dec.namespace(), Some("orders"));
    }

    #[test]
    fn namespace_is_the_database_or_else_the_user() {
        let mut s = Session::new();
        s.client(&startup(&[("user", "app"), ("application_name", "x")]));
        assert_eq!(s.dec.namespace(), Some("app"));
        assert_eq!(s.dec.user(), Some("app"));
        let mut s = Session::new();
        s.client(&startup(&[("database", ""), ("user", "app")]));
        assert_eq!(s.dec.namespace(), Some("app"));
        let s = Session::started();
        assert_eq!(s.dec.namespace(), Some("orders"));
        assert_eq!(s.dec.user(), Some("app"));
        // A startup packet cut by a gap keeps the parameters captured whole.
        let mut s = Session::new();
        let packet = startup(&[("user", "app"), ("database", "orders")]);
        s.feed(Side::Client, &packet[..packet.len() - 4], 4);
        assert_eq!(s.dec.user(), Some("app"));
        assert_eq!(s.dec.namespace(), Some("app"));
        assert!(s.decoded.errors.is_empty());
        s.server(&ready(b'I'));
        s.client(&query("SELECT 1"));
        s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
        assert_eq!(s.decoded.calls.len(), 1);
        assert_eq!(s.decoded.calls[0].namespace.as_deref(), Some("app"));
    }

    #[test]
    fn cancel_request_ends_the_client_stream() {
        let mut s = Session::new();
        let mut cancel = 16u32.to_be_bytes().to_vec();
        cancel.extend(CANCEL_REQUEST.to_be_bytes());
        cancel.extend([0, 0, 0, 7, 1, 2, 3, 4]);
        assert!(looks_like_startup(&cancel));
        s.client(&cancel);
        s.client(b"anything");
        assert!(s.decoded.errors.is_empty());
        assert!(!s.dec.in_flight());
    }

    #[test]
    fn joined_mid_connection_decodes_typed_messages() {
        let mut s = Session::new();
        s.client(&query("SELECT 2"));
        s.server(&cat(&[
            row_description(),
            data_row(&[b"2"]),
            complete("SELECT 1"),
            ready(b'T'),
        ]));
        assert_eq!(
            s.calls(),
            [call(Some("SELECT"), Some("SELECT 2"), None, Some(1))]
        );
        assert_eq!(s.dec.namespace(), None);
        assert_eq!(s.dec.tx_status(), InTransaction);
        assert!(s.decoded.errors.is_empty());
        // A prepared statement parsed before we joined: executed without text.
        s.client(&cat(&[bind("", "stmt1"), execute("", 0), sync()]));
        s.server(&cat(&[msg(b'2', b""), complete("UPDATE 4"), ready(b'T')]));
        assert_eq!(s.calls()[1], call(None, None, None, Some(4)));
    }

    #[test]
    fn mid_stream_decoder_waits_silently_for_a_message() {
        let mut s = Session::new();
        s.dec = PgDecoder::mid_stream();
        let answer = cat(&[
            row_description(),
            data_row(&[b"1"]),
            complete("SELECT 1"),
            ready(b'I'),
        ]);
        s.server(&answer[7..]);
        s.client(&query("SELECT 1")[3..]);
        assert!(s.decoded.errors.is_empty());
        assert!(!s.dec.in_flight());
        s.client(&query("SELECT 2"));
        s.server(&answer);
        assert_eq!(
            s.calls(),
            [call(Some("SELECT"), Some("SELECT 2"), None, Some(1))]
        );
        assert!(s.decoded.errors.is_empty());
    }

    #[test]
    fn looks_like_startup_knows_the_startup_packets() {
        assert!(looks_like_startup(&startup(&[("user", "u")])));
        assert!(looks_like_startup(&request(SSL_REQUEST)));
        assert!(looks_like_startup(&request(GSSENC_REQUEST)));
        let mut v32 = startup(&[("user", "u")]);
        v32[4..8].copy_from_slice(&196_610u32.to_be_bytes());
        assert!(looks_like_startup(&v32));
        assert!(!looks_like_startup(&request(CANCEL_REQUEST)));
        assert!(!looks_like_startup(&query("SELECT 1")));
        assert!(!looks_like_startup(b"GET / HTTP/1.1\r\n"));
        assert!(!looks_like_startup(&request(SSL_REQUEST)[..7]));
        assert!(!looks_like_startup(&[0, 0, 0, 8, 0, 2, 0, 0]));
        let mut huge = startup(&[("user", "u")]);
        huge[0..4].copy_from_slice(&20_000u32.to_be_bytes());
        assert!(!looks_like_startup(&huge));
    }

    // ---- extended protocol -----------------------------------------------------

    #[test]
    fn named_statements_report_their_text_on_every_execution() {
        let mut s = Session::started();
        s.client(&cat(&[parse("s1", "SELECT $1::int"), sync()]));
        s.server(&cat(&[msg(b'1', b""), ready(b'I')]));
        // Parse + Sync alone is no call.
        assert!(s.decoded.calls.is_empty());
        assert!(!s.dec.in_flight());
        for _ in 0..3 {
            s.client(&cat(&[
                bind("", "s1"),
                describe(""),
                execute("", 0),
                sync(),
            ]));
            s.server(&cat(&[
                msg(b'2', b""),
                row_description(),
                data_row(&[b"1"]),
                complete("SELECT 1"),
                ready(b'I'),
            ]));
        }
        assert_eq!(
            s.calls(),
            vec![call(Some("SELECT"), Some("SELECT $1::int"), None, Some(1)); 3]
        );
        // Named portals are remembered too.
        s.client(&cat(&[bind("p1", "s1"), execute("p1", 0), sync()]));
        s.server(&cat(&[msg(b'2', b""), complete("SELECT 1"), ready(b'I')]));
        assert_eq!(s.calls()[3].1.as_deref(), Some("SELECT $1::int"));
        // Closed: forgotten.
        s.client(&cat(&[close(b'S', "s1"), close(b'P', "p1"), sync()]));
        s.server(&cat(&[msg(b'3', b""), msg(b'3', b""), ready(b'I')]));
        s.client(&cat(&[bind("", "s1"), execute("", 0), sync()]));
        s.server(&cat(&[
            error("26000", "prepared statement \"s1\" does not exist"),
            ready(b'I'),
        ]));
        assert_eq!(s.calls()[4], call(None, None, Some("26000"), None));
        assert!(s.decoded.errors.is_empty());
    }

    #[test]
    fn deallocate_and_discard_forget_statements() {
        let mut s = Session::started();
        s.client(&cat(&[
            parse("_pg3_0", "SELECT 1"),
            parse("_pg3_1", "SELECT 2"),
            sync(),
        ]));
        s.server(&cat(&[msg(b'1', b""), msg(b'1', b""), ready(b'I')]));
        s.client(&query("DEALLOCATE _pg3_0"));
        s.server(&cat(&[complete("DEALLOCATE"), ready(b'I')]));
        assert!(s.dec.statements.get(b"_pg3_0").is_none());
        assert!(s.dec.statements.get(b"_pg3_1").is_some());
        s.client(&query("/* pool reset */ DISCARD ALL"));
        s.server(&cat(&[complete("DISCARD ALL"), ready(b'I')]));
        assert_eq!(s.dec.statements.len(), 0);
        assert_eq!(s.calls()[1].0.as_deref(), Some("DISCARD"));
    }

    #[test]
    fn after_an_error_the_calls_the_server_skipped_are_not_emitted() {
        let mut s = Session::started();
        // Three statements pipelined in one write; the second fails to parse.
        s.client(&cat(&[
            parse("", "INSERT INTO t VALUES (1)"),
            bind("", ""),
            execute("", 0),
            parse("", "SELEC 2"),
            bind("", ""),
            execute("", 0),
            parse("", "SELECT 3"),
            bind("", ""),
            execute("", 0),
            sync(),
        ]));
        assert!(s.dec.in_flight());
        s.server(&cat(&[
            msg(b'1', b""),
            msg(b'2', b""),
            complete("INSERT 0 1"),
            error("42601", "syntax error at or near \"SELEC\""),
            ready(b'I'),
        ]));
        assert_eq!(
            s.calls(),
            [
                call(
                    Some("INSERT"),
                    Some("INSERT INTO t VALUES (1)"),
                    None,
                    Some(1)
                ),
                call(Some("SELEC"), Some("SELEC 2"), Some("42601"), None),
            ]
        );
        assert!(!s.dec.in_flight());
        // Pairing is intact afterwards.
        s.client(&cat(&[
            parse("", "SELECT 4"),
            bind("", ""),
            execute("", 0),
            sync(),
        ]));
        s.server(&cat(&[
            msg(b'1', b""),
            msg(b'2', b""),
            complete("SELECT 1"),
            ready(b'I'),
        ]));
        assert_eq!(
            s.calls()[2],
            call(Some("SELECT"), Some("SELECT 4"), None, Some(1))
        );
        // A failing Parse with no Execute is no call.
        s.client(&cat(&[parse("bad", "SELEC"), sync()]));
        s.server(&cat(&[error("42601", "syntax error"), ready(b'I')]));
        assert_eq!(s.decoded.calls.len(), 3);
        assert!(!s.dec.in_flight());
    }

    #[test]
    fn portal_suspended_and_empty_query_end_an_execute() {
        let mut s = Session::started();
        s.client(&cat(&[
            parse("", "SELECT * FROM big"),
            bind("c", ""),
            execute("c", 2),
            sync(),
        ]));
        s.server(&cat(&[
            msg(b'1', b""),
            msg(b'2', b""),
            data_row(&[b"1"]),
            data_row(&[b"2"]),
            msg(b's', b""),
            ready(b'T'),
        ]));
        s.client(&cat(&[execute("c", 2), sync()]));
        s.server(&cat(&[
            data_row(&[b"3"]),
            complete("SELECT 1"),
            ready(b'T'),
        ]));
        s.client(&cat(&[parse("", ""), bind("", ""), execute("", 0), sync()]));
        s.server(&cat(&[
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'I', b""),
            ready(b'T'),
        ]));
        s.client(&query(""));
        s.server(&cat(&[msg(b'I', b""), ready(b'T')]));
        assert_eq!(
            s.calls(),
            [
                call(Some("SELECT"), Some("SELECT * FROM big"), None, None),
                call(Some("SELECT"), Some("SELECT * FROM big"), None, Some(1)),
                call(None, Some(""), None, None),
                call(None, Some(""), None, None),
            ]
        );
        assert!(s.decoded.errors.is_empty());
    }

    #[test]
    fn execute_starts_at_the_first_message_of_its_batch() {
        let mut s = Session::started();
        s.client(&parse("", "SELECT 1"));
        s.client(&bind("", ""));
        s.client(&cat(&[execute("", 0), sync()]));
        s.server(&cat(&[
            msg(b'1', b""),
            msg(b'2', b""),
            complete("SELECT 1"),
            ready(b'I'),
        ]));
        let c = &s.decoded.calls[0];
        assert_eq!(c.start_ns, 30);
        assert_eq!(c.end_ns, 60);
    }

    #[test]
    fn copy_from_stdin_in_the_extended_protocol_ignores_the_early_sync() {
        // libpq: Parse/Bind/Describe/Execute/Sync, then COPY data, CopyDone, Sync.
        let mut s = Session::started();
        s.client(&cat(&[
            parse("", "COPY t FROM STDIN"),
            bind("", ""),
            describe(""),
            execute("", 0),
            sync(),
        ]));
        s.server(&cat(&[
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'n', b""),
            msg(b'G', &[0, 0, 1, 0, 0]),
        ]));
        s.client(&cat(&[
            msg(b'd', b"1\tone\n"),
            msg(b'd', b"2\ttwo\n"),
            msg(b'c', b""),
            sync(),
        ]));
        s.server(&cat(&[complete("COPY 2"), ready(b'I')]));
        s.client(&query("SELECT 1"));
        s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
        assert_eq!(
            s.calls(),
            [
                call(Some("COPY"), Some("COPY t FROM STDIN"), None, Some(2)),
                call(Some("SELECT"), Some("SELECT 1"), None, Some(1)),
            ]
        );
        assert!(!s.dec.in_flight());
    }

    #[test]
    fn async_messages_anywhere_keep_the_pairing() {
        let mut s = Session::started();
        s.server(&cat(&[
            notification(),
            msg(b'S', &cat(&[cstr("TimeZone"), cstr("UTC")])),
        ]));
        s.client(&cat(&[
            parse("", "SELECT 1"),
            bind("", ""),
            execute("", 0),
            sync(),
        ]));
        s.server(&cat(&[
            notice(),
            msg(b'1', b""),
            notification(),
            msg(b'2', b""),
            notice(),
            data_row(&[b"1"]),
            notification(),
            complete("SELECT 1"),
            notice(),
            ready(b'I'),
        ]));
        s.server(&notification());
        s.client(&query("SELECT 2"));
        s.server(&cat(&[
            notice(),
            complete("SELECT 1"),
            notification(),
            ready(b'I'),
        ]));
        assert_eq!(
            s.calls(),
            [
                call(Some("SELECT"), Some("SELECT 1"), None, Some(1)),
                call(Some("SELECT"), Some("SELECT 2"), None, Some(1)),
            ]
        );
        assert!(s.decoded.errors.is_empty());
    }

    #[test]
    fn function_calls_are_answered_by_their_ready_for_query() {
        let recs = records(find_case("psql_large_object").data);
        assert!(recs.iter().any(|r| r.bytes.first() == Some(&b'F')));
        let mut s = Session::started();
        s.client(&msg(b'F', &[0, 0, 3, 0xb8, 0, 0, 0, 0, 0, 0]));
        s.server(&cat(&[error("42883", "no function"), ready(b'I')]));
        s.client(&query("SELECT 1"));
        s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
        assert_eq!(
            s.calls(),
            [call(Some("SELECT"), Some("SELECT 1"), None, Some(1))]
        );
    }

    #[test]
    fn simple_query_keeps_the_first_error_and_the_last_row_count() {
        let mut s = Session::started();
        s.client(&query("SELECT 1; SELECT 2; SELECT 1/0; SELECT 3"));
        s.server(&cat(&[
            complete("SELECT 1"),
            complete("SELECT 2"),
            error("22012", "division by zero"),
            ready(b'I'),
        ]));
        assert_eq!(
            s.calls(),
            [call(
                Some("SELECT"),
                Some("SELECT 1; SELECT 2; SELECT 1/0; SELECT 3"),
                Some("22012"),
                Some(2)
            )]
        );
    }

    // ---- limits ----------------------------------------------------------------

    #[test]
    fn long_sql_text_is_cut_at_the_limit() {
        let long = format!("SELECT '{}'", "é".repeat(3000));
        let mut s = Session::started();
        s.client(&query(&long));
        s.client(&cat(&[
            parse("", &long),
            bind("", ""),
            execute("", 0),
            sync(),
        ]));
        s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
        s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
        for c in &s.decoded.calls {
            let text = c.query_text.as_deref().unwrap();
            assert!(text.len() <= MAX_QUERY_TEXT_BYTES && text.len() >= MAX_QUERY_TEXT_BYTES - 1);
            assert!(long.starts_with(text));
            assert_eq!(c.operation.as_deref(), Some("SELECT"));
        }
        assert_eq!(s.decoded.calls.len(), 2);
        assert_eq!(kept_text("aé".as_bytes(), 2), "a");
        assert_eq!(kept_text(b"a\xffb", 10), "a\u{fffd}b");
        assert_eq!(kept_text(b"abc", 10), "abc");
    }

    /// What a statement map's entries cost, counted afresh.
    fn held_bytes(map: &NameMap) -> usize {
        map.entries
            .iter()
            .map(|(n, named)| NameMap::cost(n, named))
            .sum()
    }

    /// Long statements: the byte budget forgets the oldest before the count does,
    /// and the count of bytes held stays exact through overwrites and removals.
    #[test]
    fn statement_map_holds_at_most_its_byte_budget() {
        let mut s = Session::started();
        let text = format!("SELECT {}", "x, ".repeat(1300));
        let mut batch = Vec::new();
        for i in 0..200 {
            batch.extend(parse(&format!("s{i}"), &text));
        }
        batch.extend(sync());
        s.client(&batch);
        let held = held_bytes(&s.dec.statements);
        assert_eq!(held, s.dec.statements.bytes);
        assert!(held <= MAX_STATEMENT_BYTES, "{held}");
        assert!(s.dec.statements.len() < 200, "the oldest went");
        assert!(s.dec.statements.get(b"s199").is_some(), "the newest stays");
        assert!(s.dec.statements.get(b"s0").is_none());
        s.client(&cat(&[parse("s199", "SELECT 1"), sync()]));
        let held = held_bytes(&s.dec.statements);
        assert_eq!(held, s.dec.statements.bytes, "after an overwrite");
    }

    #[test]
    fn statement_map_forgets_the_oldest_names() {
        let mut s = Session::started();
        let mut batch = Vec::new();
        for i in 0..MAX_STATEMENTS + 10 {
            batch.extend(parse(&format!("s{i}"), &format!("SELECT {i}")));
        }
        batch.extend(sync());
        s.client(&batch);
        assert_eq!(s.dec.statements.len(), MAX_STATEMENTS);
        assert!(s.dec.statements.get(b"s0").is_none());
        assert!(s.dec.statements.get(b"s9").is_none());
        assert!(s.dec.statements.get(b"s10").is_some());
        // Re-parsing one name many times neither grows the map nor its order list.
        for _ in 0..5000 {
            s.client(&parse("again", "SELECT 1"));
        }
        check_invariants(&s.dec);
        let last = format!("s{}", MAX_STATEMENTS + 9);
        assert_eq!(
            s.dec
                .statements
                .get(last.as_bytes())
                .cloned()
                .flatten()
                .as_deref(),
            Some(format!("SELECT {}", MAX_STATEMENTS + 9).as_str())
        );
        // Names longer than the limit are not remembered.
        let long = "n".repeat(MAX_NAME_BYTES + 1);
        s.client(&cat(&[
            parse(&long, "SELECT 1"),
            bind("", &long),
            execute("", 0),
            sync(),
        ]));
        assert!(s.dec.statements.get(long.as_bytes()).is_none());
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_pairs_the_rest() {
        let mut s = Session::started();
        let n = MAX_PENDING + 44;
        let mut batch = parse("s", "UPDATE t SET x = x");
        for _ in 0..n {
            batch.extend(bind("", "s"));
            batch.extend(execute("", 0));
        }
        batch.extend(sync());
        s.client(&batch);
        assert_eq!(s.dec.pending.len(), MAX_PENDING);
        let mut answers = Vec::new();
        for i in 0..n {
            answers.extend(complete(&format!("UPDATE {i}")));
        }
        answers.extend(ready(b'I'));
        s.server(&answers);
        // The newest calls are reported with their own answers.
        let rows: Vec<u64> = s.decoded.calls.iter().map(|c| c.rows.unwrap()).collect();
        assert_eq!(
            rows,
            ((n - MAX_PENDING + 1) as u64..n as u64).collect::<Vec<_>>()
        );
        assert_eq!(s.dec.dropped_calls(), (n - MAX_PENDING + 1) as u64);
        assert!(!s.dec.in_flight());
        // Many simple queries in flight (drops barriers): the next batch pairs again.
        for i in 0..MAX_PENDING + 3 {
            s.client(&query(&format!("SELECT {i}")));
        }
        for _ in 0..MAX_PENDING + 3 {
            s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
        }
        assert!(!s.dec.in_flight());
        let before = s.decoded.calls.len();
        s.client(&query("SELECT 'last'"));
        s.server(&cat(&[complete("SELECT 7"), ready(b'I')]));
        assert_eq!(
            s.calls()[before],
            call(Some("SELECT"), Some("SELECT 'last'"), None, Some(7))
        );
        // The reported queries are the newest ones, each with its own text.
        assert_eq!(
            s.decoded.calls[before - 1].query_text.as_deref(),
            Some(format!("SELECT {}", MAX_PENDING + 2).as_str())
        );
    }

    #[test]
    fn finish_forgets_calls_in_flight() {
        let mut s = Session::started();
        s.client(&cat(&[
            parse("", "SELECT pg_sleep(10)"),
            bind("", ""),
            execute("", 0),
            sync(),
        ]));
        s.client(&query("SELECT 2"));
        assert!(s.dec.in_flight());
        assert_eq!(s.dec.finish(), 2);
        assert!(!s.dec.in_flight());
        assert!(s.decoded.calls.is_empty());
        assert_eq!(s.dec.finish(), 0);
        assert_eq!(s.dec.namespace(), Some("orders"));
    }

    // ---- gaps ------------------------------------------------------------------

    #[test]
    fn gap_inside_sql_text_keeps_the_captured_prefix() {
        let sql = "SELECT a, b, c FROM some_table WHERE x = 1";
        for cut in [0, 1, 7, 20, sql.len()] {
            let mut s = Session::started();
            let q = query(sql);
            // The Query's text is cut after `cut` bytes; the rest is in the gap.
            s.feed(Side::Client, &q[..5 + cut], q.len() - 5 - cut);
            s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
            assert!(s.decoded.errors.is_empty());
            assert_eq!(s.decoded.calls[0].query_text.as_deref(), Some(&sql[..cut]));
            // Parse cut the same way, then Bind/Execute/Sync in the next write.
            let p = parse("", sql);
            s.feed(Side::Client, &p[..6 + cut], p.len() - 6 - cut);
            s.client(&cat(&[bind("", ""), execute("", 0), sync()]));
            s.server(&cat(&[
                msg(b'1', b""),
                msg(b'2', b""),
                complete("SELECT 1"),
                ready(b'I'),
            ]));
            let text = s.decoded.calls[1].query_text.clone();
            if cut == 0 {
                assert_eq!(text, None);
            } else {
                assert_eq!(text.as_deref(), Some(&sql[..cut]));
            }
            assert!(s.decoded.errors.is_empty());
        }
    }

    #[test]
    fn gap_over_headers_after_a_long_parse_reports_the_parsed_text() {
        // One write: Parse (text cut by the capture) + Bind/Describe/Execute/Sync, all
        // of them after the capture limit.
        let sql = format!("SELECT * FROM t WHERE id IN ({})", "1,".repeat(3000) + "1");
        let write = cat(&[
            parse("", &sql),
            bind("", ""),
            describe(""),
            execute("", 0),
            sync(),
        ]);
        let mut s = Session::started();
        s.feed(Side::Client, &write[..256], write.len() - 256);
        assert_eq!(
            s.decoded.errors,
            [PgError::GapLostFraming {
                side: Side::Client,
                gap: write.len() - 256
            }]
        );
        s.server(&cat(&[
            msg(b'1', b""),
            msg(b'2', b""),
            row_description(),
            data_row(&[b"1"]),
            complete("SELECT 1"),
            ready(b'I'),
        ]));
        assert_eq!(s.decoded.calls.len(), 1);
        let c = &s.decoded.calls[0];
        assert_eq!(c.rows, Some(1));
        assert_eq!(c.operation.as_deref(), Some("SELECT"));
        assert!(sql.starts_with(c.query_text.as_deref().unwrap()));
        assert_eq!(c.query_text.as_ref().unwrap().len(), 256 - 6);
        assert!(!s.dec.in_flight());
        // The next request starts a chunk with a message: in sync again.
        s.client(&query("SELECT 5"));
        s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
        assert_eq!(
            s.calls()[1],
            call(Some("SELECT"), Some("SELECT 5"), None, Some(1))
        );
        assert_eq!(s.decoded.errors.len(), 1);
    }

    #[test]
    fn lost_sync_before_a_separate_sync_still_pairs() {
        // Bind with large parameters cut by the capture; Sync in the next write.
        let mut big_bind = cstr("");
        big_bind.extend(cstr("s"));
        big_bind.extend([0, 0, 0, 1, 0, 0, 0x10, 0]);
        big_bind.extend(vec![b'x'; 0x1000]);
        big_bind.extend([0, 0]);
        let write = cat(&[msg(b'B', &big_bind), execute("", 0)]);
        let mut s = Session::started();
        s.client(&cat(&[parse("s", "INSERT INTO blobs VALUES ($1)"), sync()]));
        s.server(&cat(&[msg(b'1', b""), ready(b'I')]));
        s.feed(Side::Client, &write[..100], write.len() - 100);
        s.client(&sync());
        s.server(&cat(&[msg(b'2', b""), complete("INSERT 0 1"), ready(b'I')]));
        assert_eq!(
            s.calls(),
            [call(
                Some("INSERT"),
                Some("INSERT INTO blobs VALUES ($1)"),
                None,
                Some(1)
            )]
        );
        assert!(!s.dec.in_flight());
        s.client(&query("SELECT 1"));
        s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
        assert_eq!(s.decoded.calls.len(), 2);
        assert_eq!(s.decoded.errors.len(), 1);
    }

    #[test]
    fn server_gap_over_row_headers_ends_the_call_at_the_next_request() {
        let mut s = Session::started();
        s.client(&query("SELECT * FROM big"));
        let rows: Vec<u8> = cat(&[
            row_description(),
            cat(&(0..100)
                .map(|_| data_row(&[b"0123456789"]))
                .collect::<Vec<_>>()),
        ]);
        // Each server write is captured only for its first 64 bytes.
        s.feed(Side::Server, &rows[..64], rows.len() - 64);
        assert_eq!(s.decoded.errors.len(), 1);
        let tail = cat(&[
            data_row(&[b"0123456789"]),
            complete("SELECT 101"),
            ready(b'I'),
        ]);
        // This write starts mid-row (the row header was in an earlier write).
        s.feed(Side::Server, &tail[3..10], tail.len() - 10);
        let last_server_ts = s.ts;
        assert!(s.decoded.calls.is_empty());
        assert!(s.dec.in_flight());
        s.client(&query("SELECT 2"));
        assert_eq!(s.decoded.calls.len(), 1);
        let c = &s.decoded.calls[0];
        assert_eq!(c.query_text.as_deref(), Some("SELECT * FROM big"));
        assert_eq!((c.rows, c.error_code.as_deref()), (None, None));
        assert_eq!(c.end_ns, last_server_ts);
        s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
        assert_eq!(
            s.calls()[1],
            call(Some("SELECT"), Some("SELECT 2"), None, Some(1))
        );
        assert_eq!(s.decoded.errors.len(), 1);
        assert!(!s.dec.in_flight());
    }

    #[test]
    fn server_resync_on_a_message_continues_the_call() {
        let mut s = Session::started();
        s.client(&query("SELECT * FROM big"));
        let first = cat(&[row_description(), data_row(&[b"a"]), data_row(&[b"b"])]);
        s.feed(Side::Server, &first[..first.len() - 3], 50);
        assert_eq!(s.decoded.errors.len(), 1);
        // The next write happens to start at a row boundary.
        s.server(&cat(&[
            data_row(&[b"c"]),
            complete("SELECT 3"),
            ready(b'I'),
        ]));
        assert_eq!(
            s.calls(),
            [call(
                Some("SELECT"),
                Some("SELECT * FROM big"),
                None,
                Some(3)
            )]
        );
    }

    #[test]
    fn gap_inside_an_error_or_tag_loses_only_what_it_covered() {
        let mut s = Session::started();
        s.client(&query("SELECT 1/0"));
        let e = error("22012", "division by zero, with 'a literal'");
        s.feed(Side::Server, &e[..10], e.len() - 10);
        s.server(&ready(b'I'));
        assert_eq!(
            s.decoded.calls[0].error_code.as_deref(),
            Some(UNKNOWN_SQLSTATE)
        );
        s.client(&query("SELECT 1/0"));
        s.feed(Side::Server, &e[..26], e.len() - 26);
        s.server(&ready(b'I'));
        assert_eq!(s.decoded.calls[1].error_code.as_deref(), Some("22012"));
        s.client(&query("SELECT 1"));
        let c = complete("SELECT 12345");
        s.feed(Side::Server, &c[..10], c.len() - 10);
        s.server(&ready(b'I'));
        assert_eq!(s.decoded.calls[2].rows, None);
        assert!(s.decoded.errors.is_empty());
    }

    #[test]
    fn gap_over_a_header_is_one_error_then_resync() {
        let mut s = Session::started();
        s.client(&query("SELECT 1"));
        let answer = cat(&[
            row_description(),
            data_row(&[b"1"]),
            complete("SELECT 1"),
            ready(b'I'),
        ]);
        // Captured up to the middle of the DataRow header.
        let cut = row_description().len() + 3;
        s.feed(Side::Server, &answer[..cut], answer.len() - cut);
        assert_eq!(
            s.decoded.errors,
            [PgError::GapLostFraming {
                side: Side::Server,
                gap: answer.len() - cut
            }]
        );
        // Garbage chunks while out of sync are skipped silently.
        s.server(b"\x00\x01garbage");
        s.server(b"Zxx");
        assert_eq!(s.decoded.errors.len(), 1);
        s.client(&query("SELECT 2"));
        s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
        assert_eq!(s.decoded.calls.len(), 2);
        assert_eq!(s.decoded.calls[1].query_text.as_deref(), Some("SELECT 2"));
    }

    // ---- malformed input -------------------------------------------------------

    #[test]
    fn garbage_is_an_error_then_decoding_recovers() {
        let mut s = Session::started();
        s.client(b"\xffnot postgres at all");
        assert_eq!(
            s.decoded.errors,
            [PgError::UnknownMessageType { side: Side::Client }]
        );
        s.client(b"more garbage");
        s.client(&query("SELECT 1"));
        s.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
        assert_eq!(
            s.calls(),
            [call(Some("SELECT"), Some("SELECT 1"), None, Some(1))]
        );

        s.server(b"Z\0\0\0\x09zzzz");
        assert_eq!(
            s.decoded.errors[1],
            PgError::BadLength {
                side: Side::Server,
                message: "ReadyForQuery",
                reason: "not the fixed length of this message"
            }
        );
        s.server(&ready(b'x'));
        s.server(&ready(b'Q'));
        assert_eq!(s.decoded.errors.len(), 2, "not plausible: skipped");
        s.client(&query("SELECT 2"));
        s.server(&cat(&[complete("SELECT 1"), ready(b'T')]));
        assert_eq!(s.decoded.calls.len(), 2);
        assert_eq!(s.dec.tx_status(), InTransaction);

        let mut s = Session::new();
        s.client(&[0, 0, 0, 3, 1, 2, 3, 4]);
        assert_eq!(
            s.decoded.errors,
            [PgError::BadStartup {
                reason: "the packet length is out of range"
            }]
        );
        let mut s = Session::new();
        s.client(b"\x07\x07");
        assert!(matches!(s.decoded.errors[..], [PgError::BadStartup { .. }]));
        let mut s = Session::started();
        s.client(&msg(b'S', b"x"));
        assert!(matches!(s.decoded.errors[..], [PgError::BadLength { .. }]));
        let mut s = Session::started();
        s.server(&msg(b'Z', b"q"));
        assert!(matches!(s.decoded.errors[..], [PgError::Malformed { .. }]));
    }

    #[test]
    fn truncated_input_is_never_an_error_until_a_gap() {
        let c = find_case("psycopg_pipeline");
        let recs = records(c.data);
        for stop in 0..recs.len() {
            let (mut dec, decoded) = run(&as_chunks(&recs[..stop]));
            assert!(decoded.errors.is_empty());
            let in_flight = dec.in_flight();
            let forgotten = dec.finish();
            assert!(forgotten == 0 || in_flight);
        }
    }

    #[test]
    fn errors_and_debug_output_never_show_captured_bytes() {
        const SECRET: &str = "hunter2";
        let mut s = Session::new();
        s.client(&startup(&[("user", SECRET), ("database", SECRET)]));
        s.server(&ready(b'I'));
        s.client(&cat(&[
            parse(SECRET, &format!("SELECT '{SECRET}'")),
            bind(SECRET, SECRET),
        ]));
        s.client(&query(&format!("SELECT '{SECRET}'")[..10]));
        s.server(&error("XX000", SECRET)[..20]);
        let debug = format!("{:?}", s.dec);
        assert!(!debug.contains(SECRET), "{debug}");
        let mut s = Session::started();
        for garbage in [
            format!("{SECRET}{SECRET}").into_bytes(),
            msg(b'Z', SECRET.as_bytes()),
            msg(b'Q', SECRET.as_bytes())[..3].to_vec(),
        ] {
            s.client(&garbage);
            s.server(&garbage);
        }
        assert!(!s.decoded.errors.is_empty());
        for e in &s.decoded.errors {
            let text = format!("{e} {e:?}");
            assert!(!text.contains(SECRET) && !text.contains("hunter"), "{text}");
        }
    }

    // ---- helpers ---------------------------------------------------------------

    #[test]
    fn operation_is_the_first_keyword_or_the_main_statement_of_with() {
        for (sql, op) in [
            ("select 1", Some("SELECT")),
            ("  \n\tInsert into t values (1)", Some("INSERT")),
            (
                "-- comment\n/* block /* nested */ */ UPDATE t SET x = 1",
                Some("UPDATE"),
            ),
            ("(SELECT 1) UNION (SELECT 2)", Some("SELECT")),
            ("WITH t AS (SELECT 1) SELECT * FROM t", Some("SELECT")),
            (
                "WITH RECURSIVE r(n) AS (VALUES (1) UNION ALL SELECT n+1 FROM r) SELECT * FROM r",
                Some("SELECT"),
            ),
            (
                "with moved as (delete from a returning *) insert into b select * from moved",
                Some("INSERT"),
            ),
            (
                "WITH \"select\" AS MATERIALIZED (SELECT 1), u AS (SELECT '(') UPDATE t SET x = 1",
                Some("UPDATE"),
            ),
            ("WITH t AS (SELECT 1", Some("WITH")),
            ("WITH x AS (SELECT $$ ) $$) DELETE FROM y", Some("DELETE")),
            ("WITH x AS (SELECT E'\\')') MERGE INTO y", Some("MERGE")),
            ("WITH x AS (SELECT $tag$ ) $tag$) TABLE x", Some("TABLE")),
            ("DO $$BEGIN END$$", Some("DO")),
            ("", None),
            ("   -- only a comment", None),
            (";", None),
            ("$1", None),
            ("'str'", None),
            ("ñandú", None),
            (&format!("{} x", "A".repeat(40)), None),
        ] {
            assert_eq!(sql_operation(sql).as_deref(), op, "{sql}");
        }
    }

    #[test]
    fn row_counts_come_from_command_tags() {
        for (tag, rows) in [
            (&b"SELECT 3\0"[..], Some(3)),
            (b"INSERT 0 1\0", Some(1)),
            (b"UPDATE 2\0", Some(2)),
            (b"DELETE 0\0", Some(0)),
            (b"MERGE 5\0", Some(5)),
            (b"COPY 7\0", Some(7)),
            (b"FETCH 9\0", Some(9)),
            (b"MOVE 4\0", Some(4)),
            (b"SELECT 18446744073709551615\0", Some(u64::MAX)),
            (b"SELECT 18446744073709551616\0", None),
            (b"CREATE TABLE\0", None),
            (b"BEGIN\0", None),
            (b"SELECT\0", None),
            (b"SELECT x\0", None),
            (b"SELECT 3", None),
            (b"SELECT \0", None),
            (b"\0", None),
            (b"", None),
        ] {
            assert_eq!(rows_from_tag(tag), rows, "{tag:?}");
        }
    }

    #[test]
    fn error_scan_reads_only_the_sqlstate() {
        let e = error("42p01", "relation does not exist");
        let mut scan = ErrorScan::new();
        for b in &e[5..] {
            scan.feed(std::slice::from_ref(b));
        }
        assert_eq!(scan.code, Some(*b"42P01"));
        for bad in ["4201", "420001", "42_01"] {
            let mut scan = ErrorScan::new();
            scan.feed(&error(bad, "m")[5..]);
            assert_eq!(scan.code, None, "{bad}");
        }
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

    /// Random re-chunking of one record's bytes, with gaps when `gaps`.
    fn random_chunks<'a>(
        rng: &mut Rng,
        side: Side,
        bytes: &'a [u8],
        ts: u64,
        gaps: bool,
    ) -> Vec<(Side, Chunk<'a>)> {
        let mut chunks = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let max = [2, 8, 64, 4096][rng.below(4)];
            let size = (1 + rng.below(max)).min(bytes.len() - pos);
            let gap = if gaps && rng.below(4) == 0 {
                rng.below(300).min(bytes.len() - pos - size)
            } else {
                0
            };
            chunks.push((
                side,
                Chunk {
                    bytes: &bytes[pos..pos + size],
                    len: size + gap,
                    ts_ns: ts,
                },
            ));
            pos += size + gap;
        }
        chunks
    }

    fn run_checked(chunks: &[(Side, Chunk<'_>)]) -> Decoded {
        let mut dec = PgDecoder::new();
        let mut decoded = Decoded::default();
        for (side, chunk) in chunks {
            feed_one(&mut dec, *side, chunk, &mut decoded);
        }
        let in_flight = dec.in_flight();
        let forgotten = dec.finish();
        assert!(forgotten == 0 || in_flight);
        assert!(!dec.in_flight());
        for call in &decoded.calls {
            check_call(call);
        }
        decoded
    }

    #[test]
    fn random_splits_gaps_and_mutations_never_panic() {
        let cases = cases();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..3000 {
            let c = &cases[rng.below(cases.len())];
            let mut recs: Vec<(Side, u64, Vec<u8>)> = records(c.data)
                .iter()
                .map(|r| (r.side, r.ts, r.bytes.to_vec()))
                .collect();
            let gaps = round % 3 == 1;
            let mutate = round % 3 == 2;
            if mutate {
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(recs.len());
                    let bytes = &mut recs[i].2;
                    if bytes.is_empty() {
                        continue;
                    }
                    let at = rng.below(bytes.len());
                    match rng.below(5) {
                        0 => bytes[at] = rng.next() as u8,
                        1 => bytes.insert(at, b"\0\x04\xffZSQPBECDT"[rng.below(12)]),
                        2 => {
                            bytes.remove(at);
                        }
                        3 => bytes.truncate(at),
                        _ => {
                            let j = rng.below(recs.len());
                            recs.swap(i, j);
                        }
                    }
                }
            }
            let mut chunks = Vec::new();
            for (side, ts, bytes) in &recs {
                chunks.extend(random_chunks(&mut rng, *side, bytes, *ts, gaps));
            }
            let decoded = run_checked(&chunks);
            if !gaps && !mutate {
                assert!(decoded.errors.is_empty(), "{} round {round}", c.name);
                assert_eq!(
                    summary(&decoded.calls),
                    expected(&c.calls),
                    "{} round {round}",
                    c.name
                );
            }
        }
    }

    #[test]
    fn random_message_soup_never_panics() {
        let client_parts: Vec<Vec<u8>> = vec![
            startup(&[("user", "u"), ("database", "d")]),
            request(SSL_REQUEST),
            request(GSSENC_REQUEST),
            query("SELECT 1"),
            query("WITH a AS (SELECT 1) INSERT INTO t SELECT * FROM a"),
            parse("", "SELECT $1"),
            parse("s", "UPDATE t SET a = 1"),
            bind("", ""),
            bind("p", "s"),
            bind("", "s"),
            describe(""),
            execute("", 0),
            execute("p", 1),
            close(b'S', "s"),
            close(b'P', "p"),
            sync(),
            msg(b'H', b""),
            msg(b'd', b"data"),
            msg(b'c', b""),
            msg(b'f', b"oops\0"),
            msg(b'F', &[0; 10]),
            msg(b'X', b""),
            vec![0xff, 0, 0],
        ];
        let server_parts: Vec<Vec<u8>> = vec![
            b"N".to_vec(),
            b"S".to_vec(),
            msg(b'R', &[0, 0, 0, 0]),
            ready(b'I'),
            ready(b'T'),
            ready(b'E'),
            complete("SELECT 1"),
            complete("INSERT 0 5"),
            error("22012", "x"),
            msg(b'I', b""),
            msg(b's', b""),
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'3', b""),
            msg(b'n', b""),
            row_description(),
            data_row(&[b"abc", b"def"]),
            notice(),
            notification(),
            msg(b'G', &[0, 0, 0]),
            msg(b'H', &[0, 0, 0]),
            msg(b'd', b"row"),
            msg(b'c', b""),
            msg(b'V', &[0, 0, 0, 1, 9]),
            vec![b'D', 0xff, 0xff, 0xff, 0xff],
        ];
        let mut rng = Rng(42);
        for _ in 0..3000 {
            let mut items: Vec<(Side, Vec<u8>)> = Vec::new();
            for _ in 0..1 + rng.below(40) {
                if rng.below(2) == 0 {
                    items.push((
                        Side::Client,
                        client_parts[rng.below(client_parts.len())].clone(),
                    ));
                } else {
                    items.push((
                        Side::Server,
                        server_parts[rng.below(server_parts.len())].clone(),
                    ));
                }
            }
            let gaps = rng.below(2) == 0;
            let mut chunks = Vec::new();
            for (i, (side, bytes)) in items.iter().enumerate() {
                chunks.extend(random_chunks(&mut rng, *side, bytes, i as u64, gaps));
            }
            run_checked(&chunks);
        }
    }
}
