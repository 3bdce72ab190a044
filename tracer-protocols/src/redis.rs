//! Redis (RESP2 and RESP3) decoding for one TCP connection, both directions.
//!
//! A [`RedisDecoder`] is fed the client's chunks ([`RedisDecoder::client`]) and the
//! server's chunks ([`RedisDecoder::server`]) in timestamp order, and emits one
//! [`DbCall`] per command when its reply is complete. Commands are queued in order
//! (pipelining: any number per chunk) and each top-level reply completes the oldest
//! one. Nothing is buffered but a few small fixed-size words (command names, error
//! codes); argument values and bulk payloads are skipped by length, across capture
//! gaps too, and never copied.
//!
//! # What a call holds
//!
//! - `operation`: the command name, upper case (`GET`); for container commands
//!   (`CLIENT`, `CONFIG`, `XINFO`, ... see [`CONTAINER_COMMANDS`]) with a subcommand,
//!   both words (`CLIENT SETNAME`). `None` when the name is not a plausible command
//!   name (not ASCII `[A-Za-z][A-Za-z0-9_.|-]*`, longer than 32 bytes, or cut by a
//!   capture gap).
//! - `query_text`: the operation followed by ` ?` per remaining argument (at most
//!   [`MAX_QUERY_PLACEHOLDERS`], then ` ...`). Argument values never appear: keys and
//!   values may be personal data.
//! - `namespace`: the DB index (`"0"` until a `SELECT n` succeeds; as in effect when
//!   the call completed, so a `SELECT` call carries the index it switched away from).
//! - `error_code`: for an error reply (`-ERR ...`, RESP3 `!` blob error), its first
//!   word (`ERR`, `WRONGTYPE`, `NOSCRIPT`, `EXECABORT`, `MOVED`, ...); never the
//!   message. A first word that is not an upper-case code (`[A-Z0-9_-]`, at most 32
//!   bytes) is reported as `ERR`.
//! - `rows`: the element count of an array (`*`), set (`~`) or map (`%`, in pairs)
//!   reply; `None` for other replies.
//!
//! # Connection state
//!
//! - `MULTI`/`EXEC`: each `QUEUED` reply completes its command's call; `EXEC`
//!   completes with its array. [`RedisDecoder::tx_status`] is `InTransaction` from
//!   `MULTI`'s `OK` until the reply to `EXEC` or `DISCARD` (or `RESET`). A `SELECT`
//!   queued in a transaction takes effect when `EXEC` answers with an array.
//! - Pub/sub: pushes never complete commands: RESP3 `>` pushes always, and in RESP2
//!   subscriber mode (after a `SUBSCRIBE`/`PSUBSCRIBE`/`SSUBSCRIBE` confirmation)
//!   arrays whose first element is `message`, `pmessage` or `smessage`. A (un)subscribe
//!   command completes at its first confirmation; the confirmations for its other
//!   channels are consumed. Subscriber mode ends with an unsubscribe confirmation that
//!   counts 0 subscriptions left, or `RESET`.
//! - `CLIENT REPLY OFF` / `SKIP`: commands the server will not answer are emitted at
//!   once (from [`RedisDecoder::client`]), with `end_ns` the timestamp of their last
//!   byte and no response data.
//! - `MONITOR`: once its `OK` arrives (the `MONITOR` call is emitted) the connection
//!   only streams other clients' commands, which may hold their arguments: decoding
//!   stops silently for good, both directions ([`RedisDecoder::is_stopped`]).
//! - A RESP3 reply type (`HELLO 3` answers with a map) switches the RESP2 pub/sub
//!   heuristics off; `HELLO 2` and `RESET` switch them back on. `RESET` resets
//!   everything above.
//!
//! # Capture gaps and errors
//!
//! A chunk may end in a gap of known length. Inside a bulk payload (and its CRLF) the
//! gap is skipped exactly. A gap that covers anything else (a type byte, a length
//! line, the start of the next command or reply) loses sync: the call returns
//! [`RedisError::SyncLost`], every pending command is dropped (rather than risk pairing
//! replies with the wrong commands) and that direction is skipped until a chunk
//! begins a command (client: `*` and a digit, or a known inline command) or a reply
//! (server: a RESP type byte). Malformed input is handled the same way with its own
//! error. Errors and `Debug` output never contain captured bytes.
//!
//! Pairing relies on causality as well as order: a reply is never paired with a
//! command that started after the server chunk holding it. After a loss on the client
//! side, replies to the commands lost in the gap can still arrive; those in server
//! chunks older than the next command are discarded by that rule, but when a client
//! pipelines deeply across such a loss, later replies may be paired with the wrong
//! commands until the pipeline drains. Both directions must be fed in timestamp order
//! (a reply fed before its command is discarded as unmatched).

use std::collections::VecDeque;
use std::fmt;
use std::mem;

use crate::Chunk;
use crate::db::{DbCall, DbSystem, TxStatus};

/// Most commands waiting for a reply; beyond it the oldest is dropped (counted in
/// [`RedisDecoder::dropped_commands`]) and its reply discarded when it comes.
pub const MAX_PENDING_COMMANDS: usize = 1024;
/// Deepest nesting of aggregates (arrays, maps, sets, pushes, attributes) in a reply.
pub const MAX_DEPTH: usize = 32;
/// Longest bulk string accepted (Redis's default `proto-max-bulk-len`).
pub const MAX_BULK_LEN: u64 = 512 * 1024 * 1024;
/// Longest inline command or text line (simple string, error, ...) in bytes. Lines are
/// never buffered; this only bounds how long garbage is taken for a line.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Most `?` placeholders in a `query_text`; more arguments are shown as ` ...`.
pub const MAX_QUERY_PLACEHOLDERS: u64 = 64;
/// Most arguments in one command (Redis's limit for a multibulk length).
const MAX_ARGS: u64 = i32::MAX as u64;
/// Longest aggregate length accepted in a reply.
const MAX_AGGREGATE_LEN: u64 = u32::MAX as u64;
/// Bytes kept of a command name, subcommand, error code or pub/sub message kind.
const WORD_BYTES: usize = 32;

/// Commands whose first argument is a subcommand: `operation` is then two words.
pub const CONTAINER_COMMANDS: &[&str] = &[
    "ACL", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "FUNCTION", "LATENCY", "MEMORY", "MODULE",
    "OBJECT", "PUBSUB", "SCRIPT", "SLOWLOG", "XGROUP", "XINFO",
];

/// Commands [`looks_like_command`] recognises when sent inline.
const INLINE_COMMANDS: &[&[u8]] = &[
    b"APPEND",
    b"AUTH",
    b"BLPOP",
    b"BRPOP",
    b"CLIENT",
    b"COMMAND",
    b"CONFIG",
    b"DBSIZE",
    b"DECR",
    b"DECRBY",
    b"DEL",
    b"DISCARD",
    b"ECHO",
    b"EVAL",
    b"EVALSHA",
    b"EXEC",
    b"EXISTS",
    b"EXPIRE",
    b"FLUSHALL",
    b"FLUSHDB",
    b"GET",
    b"GETSET",
    b"HDEL",
    b"HELLO",
    b"HGET",
    b"HGETALL",
    b"HMGET",
    b"HMSET",
    b"HSET",
    b"INCR",
    b"INCRBY",
    b"INFO",
    b"KEYS",
    b"LLEN",
    b"LPOP",
    b"LPUSH",
    b"LRANGE",
    b"MGET",
    b"MONITOR",
    b"MSET",
    b"MULTI",
    b"PEXPIRE",
    b"PING",
    b"PSUBSCRIBE",
    b"PTTL",
    b"PUBLISH",
    b"QUIT",
    b"RESET",
    b"RPOP",
    b"RPUSH",
    b"SADD",
    b"SCAN",
    b"SCRIPT",
    b"SELECT",
    b"SET",
    b"SETEX",
    b"SETNX",
    b"SISMEMBER",
    b"SMEMBERS",
    b"SREM",
    b"STRLEN",
    b"SUBSCRIBE",
    b"TTL",
    b"TYPE",
    b"UNLINK",
    b"UNSUBSCRIBE",
    b"UNWATCH",
    b"WATCH",
    b"XADD",
    b"XLEN",
    b"XRANGE",
    b"XREAD",
    b"ZADD",
    b"ZRANGE",
    b"ZREM",
    b"ZSCORE",
];

/// Which direction of the connection a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Bytes the client sent (commands).
    Client,
    /// Bytes the server sent (replies and pushes).
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

/// What made a chunk undecodable. No variant carries captured bytes.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RedisError {
    #[error(
        "not RESP from the {direction}: expected {expected}, found {found}; the stream is another protocol or was joined mid-message"
    )]
    Unexpected {
        direction: Direction,
        expected: &'static str,
        found: &'static str,
    },
    #[error("invalid {what} from the {direction}: {reason}")]
    BadNumber {
        direction: Direction,
        what: &'static str,
        reason: &'static str,
    },
    #[error(
        "{what} of {value} from the {direction} is above the limit of {limit}; the stream is corrupt or not RESP"
    )]
    TooLarge {
        direction: Direction,
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("bulk string from the {direction} is not followed by CRLF")]
    BadBulkEnd { direction: Direction },
    #[error("{what} from the {direction} is longer than {limit} bytes without a line end")]
    LineTooLong {
        direction: Direction,
        what: &'static str,
        limit: usize,
    },
    #[error("reply nests aggregates deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("end of a streamed aggregate ('.') where no streamed aggregate is open")]
    UnexpectedStreamEnd,
    #[error(
        "a capture gap of {gap} bytes cut the RESP framing of the {direction} stream; {dropped} pending commands were dropped and that direction is skipped until a chunk starts a new message (raise the capture size to avoid this)"
    )]
    SyncLost {
        direction: Direction,
        gap: usize,
        dropped: usize,
    },
    #[error(
        "Redis decoder made no progress on a {direction} chunk (a decoder bug); the chunk was skipped"
    )]
    Stalled { direction: Direction },
}

/// The first bytes of one value (a command argument, an error message, a reply
/// element), kept to recognise names and codes. Never printed.
#[derive(Clone, Copy)]
struct Word {
    buf: [u8; WORD_BYTES],
    len: u8,
    /// Bytes the word has, kept or not.
    total: u64,
    /// A terminator was seen: later bytes are not part of the word.
    ended: bool,
    /// Part of the word was in a capture gap.
    cut: bool,
}

impl Word {
    const EMPTY: Self = Self {
        buf: [0; WORD_BYTES],
        len: 0,
        total: 0,
        ended: false,
        cut: false,
    };

    fn append(&mut self, bytes: &[u8]) {
        let len = usize::from(self.len);
        let room = WORD_BYTES - len;
        let take = bytes.len().min(room);
        self.buf[len..len + take].copy_from_slice(&bytes[..take]);
        // `len + take <= WORD_BYTES = 32`.
        self.len = u8::try_from(len + take).unwrap_or(u8::MAX);
        self.total = self
            .total
            .saturating_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
    }

    /// Bytes of a length-delimited value: all of them belong to the word.
    fn push_bulk(&mut self, bytes: &[u8]) {
        self.append(bytes);
    }

    /// Bytes of a line (or of a bulk error message): the word ends at CR or LF, and
    /// at a space with `stop_at_space`.
    fn push_line(&mut self, bytes: &[u8], stop_at_space: bool) {
        if self.ended {
            return;
        }
        let end = bytes
            .iter()
            .position(|&b| b == b'\r' || b == b'\n' || (stop_at_space && b == b' '));
        match end {
            Some(end) => {
                self.append(&bytes[..end]);
                self.ended = true;
            }
            None => self.append(bytes),
        }
    }

    /// The whole word, if it was short enough to keep and fully captured.
    fn exact(&self) -> Option<&[u8]> {
        let len = usize::from(self.len);
        (!self.cut && self.total == u64::from(self.len)).then(|| &self.buf[..len])
    }

    fn is(&self, name: &[u8]) -> bool {
        self.exact().is_some_and(|w| w.eq_ignore_ascii_case(name))
    }
}

/// Result of a length or integer line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Number {
    Value(i64),
    /// `?`: a streamed string or aggregate (RESP3).
    Streamed,
}

/// Parser of a line holding a number (`*3`, `$-1`, `:42`, `%?`), after its type byte.
#[derive(Clone, Copy, Debug, Default)]
struct NumberLine {
    value: i64,
    digits: u8,
    negative: bool,
    streamed: bool,
    cr: bool,
}

impl NumberLine {
    /// Consumes bytes up to and including the line's LF; returns how many and, when
    /// the line ended, the number.
    fn feed(&mut self, bytes: &[u8]) -> Result<(usize, Option<Number>), &'static str> {
        for (i, &b) in bytes.iter().enumerate() {
            if self.cr && b != b'\n' {
                return Err("CR not followed by LF");
            }
            match b {
                b'\n' => {
                    let number = if self.streamed {
                        Number::Streamed
                    } else if self.digits == 0 {
                        return Err("no digits");
                    } else if self.negative {
                        Number::Value(-self.value)
                    } else {
                        Number::Value(self.value)
                    };
                    return Ok((i + 1, Some(number)));
                }
                b'\r' => self.cr = true,
                b'-' if self.digits == 0 && !self.negative && !self.streamed => {
                    self.negative = true
                }
                b'?' if self.digits == 0 && !self.negative && !self.streamed => {
                    self.streamed = true
                }
                b'0'..=b'9' if !self.streamed => {
                    self.value = self
                        .value
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(i64::from(b - b'0')))
                        .ok_or("number does not fit in 64 bits")?;
                    self.digits = self.digits.saturating_add(1);
                }
                _ => return Err("unexpected byte in a number"),
            }
        }
        Ok((bytes.len(), None))
    }
}

/// State of the inline-command tokenizer (`SET key "a value"\r\n`).
#[derive(Clone, Copy, Debug, Default)]
struct InlineLine {
    bytes: usize,
    in_token: bool,
    /// The open quote (`"` or `'`), or 0.
    quote: u8,
    escape: bool,
}

/// Where the client stream is.
#[derive(Clone, Copy, Debug)]
enum ClientState {
    /// Between commands.
    Start,
    /// After `*`: the argument count line.
    Count(NumberLine),
    /// Expecting the `$` of the next argument.
    ArgHeader,
    /// After `$`: the argument length line.
    ArgLen(NumberLine),
    /// Inside an argument's bytes.
    ArgData { remaining: u64 },
    /// Expecting the CR after an argument.
    ArgCr,
    /// Expecting the LF after an argument.
    ArgLf,
    /// Inside an inline command line.
    Inline(InlineLine),
    /// Sync lost: skipping chunks until one begins a command.
    Lost,
}

/// Where the server stream is.
#[derive(Clone, Copy, Debug)]
enum ServerState {
    /// Expecting a type byte (a reply, an element, or a push).
    Value,
    /// After a type byte whose line holds a number.
    Number { ty: u8, line: NumberLine },
    /// After a type byte whose line holds text (`+ - _ , # ( .`).
    Text { ty: u8, bytes: usize },
    /// Inside a bulk payload (`$`, `=`, `!`, a streamed string part).
    Payload { remaining: u64 },
    /// Expecting the CR after a payload.
    PayloadCr,
    /// Expecting the LF after a payload.
    PayloadLf,
    /// Inside a streamed string: expecting the `;` of the next part.
    StreamedPart,
    /// Sync lost: skipping chunks until one begins with a type byte.
    Lost,
}

/// Which kept word the bytes of the current server value go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Capture {
    None,
    /// First element of the reply's aggregate (pub/sub message kind).
    First,
    /// Top-level error: its first word is the error code.
    Error,
}

/// One open aggregate of the reply being read.
#[derive(Clone, Copy, Debug)]
struct Frame {
    /// Elements still to come (maps and attributes count keys and values); `None` for
    /// a streamed aggregate, which ends with `.`.
    remaining: Option<u64>,
    /// An attribute map: it annotates the value after it and is not a value itself.
    attribute: bool,
    map: bool,
}

/// What the reply being read says, as far as pairing needs.
#[derive(Clone, Copy)]
struct ReplyInfo {
    /// Type byte of the top-level value.
    ty: u8,
    /// Element count of a top-level aggregate (pairs for a map).
    len: Option<u64>,
    /// Its first element, when a string.
    first: Word,
    /// Its third element, when an integer (subscription count of a confirmation).
    third: Option<i64>,
    /// The error code word, for an error reply.
    error: Word,
}

impl ReplyInfo {
    const EMPTY: Self = Self {
        ty: 0,
        len: None,
        first: Word::EMPTY,
        third: None,
        error: Word::EMPTY,
    };
}

/// What the server does with a command's reply, as far as the decoder cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CommandKind {
    Other,
    Multi,
    Exec,
    Discard,
    /// `SELECT n`, with n when it parsed.
    Select(Option<u32>),
    Hello,
    Reset,
    Monitor,
    /// `SUBSCRIBE`, `UNSUBSCRIBE`, `PSUBSCRIBE`, ...: answered by confirmations.
    PubSub(Subscription),
}

/// Which (un)subscribe command a pub/sub confirmation answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Subscription {
    family: Family,
    unsubscribe: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    /// `SUBSCRIBE`, `UNSUBSCRIBE`.
    Channel,
    /// `PSUBSCRIBE`, `PUNSUBSCRIBE`.
    Pattern,
    /// `SSUBSCRIBE`, `SUNSUBSCRIBE`.
    Shard,
}

impl Subscription {
    /// The command name (upper case) or confirmation kind (lower case).
    fn parse(name: &[u8]) -> Option<Self> {
        // [P|S][UN]SUBSCRIBE
        let (family, rest) = match name.split_first() {
            Some((b'p' | b'P', rest)) => (Family::Pattern, rest),
            Some((b's' | b'S', rest)) if !name.eq_ignore_ascii_case(b"subscribe") => {
                (Family::Shard, rest)
            }
            _ => (Family::Channel, name),
        };
        let (unsubscribe, rest) = match rest.get(..2) {
            Some(un) if un.eq_ignore_ascii_case(b"un") => (true, &rest[2..]),
            _ => (false, rest),
        };
        rest.eq_ignore_ascii_case(b"subscribe").then_some(Self {
            family,
            unsubscribe,
        })
    }
}

/// `CLIENT REPLY` mode: whether the server answers the next commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReplyMode {
    On,
    Off,
    SkipNext,
}

/// A command sent and not answered yet.
#[derive(Debug)]
struct PendingCommand {
    kind: CommandKind,
    operation: Option<String>,
    query_text: Option<String>,
    start_ns: u64,
    /// Channels or patterns named: how many confirmations a (un)subscribe gets.
    channels: u64,
}

/// The command being read from the client.
#[derive(Clone, Copy)]
struct CommandBuilder {
    start_ns: u64,
    /// Arguments an array announced.
    declared: u64,
    /// Arguments started so far.
    args: u64,
    /// Kept words: the name always, then a subcommand or SELECT/HELLO argument, then
    /// the mode of `CLIENT REPLY`. Other arguments (keys, values) are never kept.
    words: [Word; 3],
}

impl CommandBuilder {
    fn new(start_ns: u64) -> Self {
        Self {
            start_ns,
            declared: 0,
            args: 0,
            words: [Word::EMPTY; 3],
        }
    }

    fn start_arg(&mut self) {
        self.args = self.args.saturating_add(1);
    }

    /// The kept word the current argument goes to, if any.
    fn word(&mut self) -> Option<&mut Word> {
        let index = self.args.checked_sub(1)?;
        let keep = match index {
            0 => true,
            1 => {
                let name = &self.words[0];
                name.is(b"SELECT")
                    || name.is(b"HELLO")
                    || CONTAINER_COMMANDS.iter().any(|c| name.is(c.as_bytes()))
            }
            2 => self.words[0].is(b"CLIENT") && self.words[1].is(b"REPLY"),
            _ => false,
        };
        if keep {
            self.words.get_mut(usize::try_from(index).ok()?)
        } else {
            None
        }
    }

    fn capture(&mut self, bytes: &[u8]) {
        if let Some(word) = self.word() {
            word.push_bulk(bytes);
        }
    }

    fn cut(&mut self) {
        if let Some(word) = self.word() {
            word.cut = true;
        }
    }
}

/// Decodes both directions of one Redis connection into [`DbCall`]s. See the module
/// docs.
pub struct RedisDecoder {
    client: ClientState,
    command: CommandBuilder,
    server: ServerState,
    stack: Vec<Frame>,
    reply: ReplyInfo,
    /// Elements of the reply's top aggregate completed so far.
    top_index: u64,
    capture: Capture,
    in_streamed_string: bool,
    pending: VecDeque<PendingCommand>,
    namespace: String,
    seen_traffic: bool,
    in_transaction: bool,
    /// DB index of a `SELECT` queued in the open transaction.
    transaction_select: Option<u32>,
    subscribed: bool,
    resp3: bool,
    reply_mode: ReplyMode,
    /// Confirmations still due to the last completed (un)subscribe command.
    confirmations_left: u64,
    /// Replies still due to commands dropped from a full queue.
    orphan_replies: u64,
    stopped: bool,
    dropped: u64,
    unmatched: u64,
}

impl fmt::Debug for RedisDecoder {
    // Not derived: kept words may hold the start of arguments or messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDecoder")
            .field("client", &self.client)
            .field("server", &self.server)
            .field("depth", &self.stack.len())
            .field("pending", &self.pending.len())
            .field("namespace", &self.namespace)
            .field("in_transaction", &self.in_transaction)
            .field("subscribed", &self.subscribed)
            .field("resp3", &self.resp3)
            .field("reply_mode", &self.reply_mode)
            .field("stopped", &self.stopped)
            .field("dropped", &self.dropped)
            .field("unmatched", &self.unmatched)
            .finish()
    }
}

impl Default for RedisDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl RedisDecoder {
    pub fn new() -> Self {
        Self {
            client: ClientState::Start,
            command: CommandBuilder::new(0),
            server: ServerState::Value,
            stack: Vec::new(),
            reply: ReplyInfo::EMPTY,
            top_index: 0,
            capture: Capture::None,
            in_streamed_string: false,
            pending: VecDeque::new(),
            namespace: String::from("0"),
            seen_traffic: false,
            in_transaction: false,
            transaction_select: None,
            subscribed: false,
            resp3: false,
            reply_mode: ReplyMode::On,
            confirmations_left: 0,
            orphan_replies: 0,
            stopped: false,
            dropped: 0,
            unmatched: 0,
        }
    }

    /// Feeds one chunk the client sent. Commands are queued until their replies
    /// complete them; only commands the server will not answer (`CLIENT REPLY
    /// OFF`/`SKIP`) are pushed to `out` from here.
    ///
    /// On `Err` the command in progress and every pending command are dropped and
    /// client chunks are skipped until one begins a command.
    pub fn client(&mut self, chunk: &Chunk<'_>, out: &mut Vec<DbCall>) -> Result<(), RedisError> {
        if self.stopped {
            return Ok(());
        }
        if matches!(self.client, ClientState::Lost) {
            if !begins_command(chunk.bytes) {
                return Ok(());
            }
            self.client = ClientState::Start;
        }
        if chunk.len > 0 {
            self.seen_traffic = true;
        }
        let result = self.client_chunk(chunk, out);
        if result.is_err() {
            self.lose(Direction::Client);
        }
        result
    }

    /// Feeds one chunk the server sent; pushes every call completed by it, in order,
    /// to `out`.
    ///
    /// On `Err`, calls completed earlier in the chunk are already in `out`; the reply
    /// in progress and every pending command are dropped and server chunks are skipped
    /// until one begins with a RESP type byte.
    pub fn server(&mut self, chunk: &Chunk<'_>, out: &mut Vec<DbCall>) -> Result<(), RedisError> {
        if self.stopped {
            return Ok(());
        }
        if matches!(self.server, ServerState::Lost) {
            if !chunk.bytes.first().is_some_and(|&b| is_type_byte(b)) {
                return Ok(());
            }
            self.server = ServerState::Value;
        }
        if chunk.len > 0 {
            self.seen_traffic = true;
        }
        let result = self.server_chunk(chunk, out);
        if result.is_err() {
            self.lose(Direction::Server);
        }
        result
    }

    /// `InTransaction` between `MULTI`'s `OK` and the reply to `EXEC`/`DISCARD`;
    /// `Unknown` otherwise (Redis has no transaction status outside `MULTI`).
    pub fn tx_status(&self) -> TxStatus {
        if self.in_transaction {
            TxStatus::InTransaction
        } else {
            TxStatus::Unknown
        }
    }

    /// The DB index in use (`"0"` until a `SELECT n` succeeds), once any traffic was
    /// seen.
    pub fn namespace(&self) -> Option<&str> {
        self.seen_traffic.then_some(self.namespace.as_str())
    }

    /// True while a command is waiting for its reply or partially received.
    /// Bytes the decoder holds between chunks (open aggregates, commands not
    /// answered yet): what a global memory budget counts.
    pub fn held_bytes(&self) -> usize {
        self.stack.len() * std::mem::size_of::<Frame>()
            + self.pending.len() * std::mem::size_of::<PendingCommand>()
    }

    pub fn in_flight(&self) -> bool {
        !self.stopped
            && (!self.pending.is_empty()
                || !matches!(self.client, ClientState::Start | ClientState::Lost))
    }

    /// Commands waiting for their replies.
    pub fn pending_commands(&self) -> usize {
        self.pending.len()
    }

    /// The connection closed: forgets the pending commands (returns how many) and any
    /// partial message, and starts over as for a new connection. Counters are kept.
    pub fn finish(&mut self) -> usize {
        let forgotten = self.pending.len();
        let (dropped, unmatched) = (self.dropped, self.unmatched);
        *self = Self::new();
        self.dropped = dropped;
        self.unmatched = unmatched;
        forgotten
    }

    /// True after `MONITOR` succeeded: every later chunk is ignored, so the caller may
    /// stop feeding this connection.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Commands dropped without a call: queue overflow, sync loss, errors, `MONITOR`.
    pub fn dropped_commands(&self) -> u64 {
        self.dropped
    }

    /// Replies discarded because no pending command could have caused them.
    pub fn unmatched_replies(&self) -> u64 {
        self.unmatched
    }

    /// Drops what is in progress in one direction and every pending command; that
    /// direction then waits for a chunk that begins a message. Returns how many
    /// commands were dropped.
    fn lose(&mut self, direction: Direction) -> usize {
        let dropped = self.pending.len();
        self.dropped = self
            .dropped
            .saturating_add(u64::try_from(dropped).unwrap_or(u64::MAX));
        self.pending.clear();
        self.orphan_replies = 0;
        self.confirmations_left = 0;
        match direction {
            Direction::Client => {
                self.client = ClientState::Lost;
                self.command = CommandBuilder::new(0);
            }
            Direction::Server => {
                self.server = ServerState::Lost;
                self.stack.clear();
                self.reply = ReplyInfo::EMPTY;
                self.top_index = 0;
                self.capture = Capture::None;
                self.in_streamed_string = false;
            }
        }
        dropped
    }

    // ---- client side ------------------------------------------------------------

    fn client_chunk(&mut self, chunk: &Chunk<'_>, out: &mut Vec<DbCall>) -> Result<(), RedisError> {
        let ts = chunk.ts_ns;
        let mut pos = 0usize;
        let mut idle_steps = 0u8;
        while let Some(rest) = chunk.bytes.get(pos..).filter(|rest| !rest.is_empty()) {
            if self.stopped {
                return Ok(());
            }
            let used = self.client_step(rest, ts, out)?;
            if used == 0 {
                // Only a state change (Start → Inline) consumes nothing.
                idle_steps += 1;
                if idle_steps > 2 {
                    return Err(RedisError::Stalled {
                        direction: Direction::Client,
                    });
                }
            } else {
                idle_steps = 0;
            }
            pos = pos.saturating_add(used);
        }
        let gap = chunk.gap();
        if gap > 0
            && !self.stopped
            && !self.client_skip_gap(u64::try_from(gap).unwrap_or(u64::MAX), ts, out)
        {
            let dropped = self.lose(Direction::Client);
            return Err(RedisError::SyncLost {
                direction: Direction::Client,
                gap,
                dropped,
            });
        }
        Ok(())
    }

    /// Consumes a prefix of `rest` (non-empty); returns its length, 0 only on a state
    /// change.
    fn client_step(
        &mut self,
        rest: &[u8],
        ts: u64,
        out: &mut Vec<DbCall>,
    ) -> Result<usize, RedisError> {
        const D: Direction = Direction::Client;
        let Some(&b) = rest.first() else {
            return Ok(0);
        };
        match self.client {
            ClientState::Start => match b {
                b'*' => {
                    self.command = CommandBuilder::new(ts);
                    self.client = ClientState::Count(NumberLine::default());
                    Ok(1)
                }
                // Empty inline lines are ignored by the server too.
                b'\r' | b'\n' => Ok(1),
                _ => {
                    self.command = CommandBuilder::new(ts);
                    self.client = ClientState::Inline(InlineLine::default());
                    Ok(0)
                }
            },
            ClientState::Count(mut line) => {
                let (used, number) = line.feed(rest).map_err(|reason| RedisError::BadNumber {
                    direction: D,
                    what: "argument count",
                    reason,
                })?;
                self.client = match number {
                    None => ClientState::Count(line),
                    Some(Number::Streamed) => {
                        return Err(RedisError::BadNumber {
                            direction: D,
                            what: "argument count",
                            reason: "a command cannot be streamed",
                        });
                    }
                    // `*0` and `*-1` are ignored by the server: no command, no reply.
                    Some(Number::Value(n)) if n <= 0 => ClientState::Start,
                    Some(Number::Value(n)) => {
                        let n = n.unsigned_abs();
                        if n > MAX_ARGS {
                            return Err(RedisError::TooLarge {
                                direction: D,
                                what: "argument count",
                                value: n,
                                limit: MAX_ARGS,
                            });
                        }
                        self.command.declared = n;
                        ClientState::ArgHeader
                    }
                };
                Ok(used)
            }
            ClientState::ArgHeader => {
                if b != b'$' {
                    return Err(RedisError::Unexpected {
                        direction: D,
                        expected: "'$' (a bulk string argument)",
                        found: describe_byte(b),
                    });
                }
                self.command.start_arg();
                self.client = ClientState::ArgLen(NumberLine::default());
                Ok(1)
            }
            ClientState::ArgLen(mut line) => {
                let bad = |reason| RedisError::BadNumber {
                    direction: D,
                    what: "argument length",
                    reason,
                };
                let (used, number) = line.feed(rest).map_err(bad)?;
                self.client = match number {
                    None => ClientState::ArgLen(line),
                    Some(Number::Streamed) => return Err(bad("an argument cannot be streamed")),
                    Some(Number::Value(n)) if n < 0 => return Err(bad("negative length")),
                    Some(Number::Value(n)) => {
                        let n = n.unsigned_abs();
                        if n > MAX_BULK_LEN {
                            return Err(RedisError::TooLarge {
                                direction: D,
                                what: "argument length",
                                value: n,
                                limit: MAX_BULK_LEN,
                            });
                        }
                        if n == 0 {
                            ClientState::ArgCr
                        } else {
                            ClientState::ArgData { remaining: n }
                        }
                    }
                };
                Ok(used)
            }
            ClientState::ArgData { remaining } => {
                let take = bounded_take(remaining, rest.len());
                self.command.capture(&rest[..take]);
                let remaining = remaining.saturating_sub(take as u64);
                self.client = if remaining == 0 {
                    ClientState::ArgCr
                } else {
                    ClientState::ArgData { remaining }
                };
                Ok(take)
            }
            ClientState::ArgCr => {
                if b != b'\r' {
                    return Err(RedisError::BadBulkEnd { direction: D });
                }
                self.client = ClientState::ArgLf;
                Ok(1)
            }
            ClientState::ArgLf => {
                if b != b'\n' {
                    return Err(RedisError::BadBulkEnd { direction: D });
                }
                self.arg_done(ts, out);
                Ok(1)
            }
            ClientState::Inline(line) => self.inline_step(line, rest, ts, out),
            ClientState::Lost => Ok(rest.len()),
        }
    }

    fn arg_done(&mut self, ts: u64, out: &mut Vec<DbCall>) {
        if self.command.args >= self.command.declared {
            self.client = ClientState::Start;
            self.command_done(ts, out);
        } else {
            self.client = ClientState::ArgHeader;
        }
    }

    fn inline_step(
        &mut self,
        mut line: InlineLine,
        rest: &[u8],
        ts: u64,
        out: &mut Vec<DbCall>,
    ) -> Result<usize, RedisError> {
        for (i, &b) in rest.iter().enumerate() {
            line.bytes += 1;
            if line.bytes > MAX_LINE_BYTES {
                return Err(RedisError::LineTooLong {
                    direction: Direction::Client,
                    what: "inline command",
                    limit: MAX_LINE_BYTES,
                });
            }
            if b == b'\n' {
                self.client = ClientState::Start;
                if self.command.args > 0 {
                    self.command.declared = self.command.args;
                    self.command_done(ts, out);
                }
                return Ok(i + 1);
            }
            if line.quote != 0 {
                if line.escape {
                    line.escape = false;
                    self.command.capture(&[b]);
                } else if b == b'\\' && line.quote == b'"' {
                    line.escape = true;
                } else if b == line.quote {
                    line.quote = 0;
                    line.in_token = false;
                } else {
                    self.command.capture(&[b]);
                }
            } else if matches!(b, b' ' | b'\t' | b'\r' | 0) {
                line.in_token = false;
            } else if line.in_token {
                self.command.capture(&[b]);
            } else {
                self.command.start_arg();
                line.in_token = true;
                if b == b'"' || b == b'\'' {
                    line.quote = b;
                } else {
                    self.command.capture(&[b]);
                }
            }
        }
        self.client = ClientState::Inline(line);
        Ok(rest.len())
    }

    /// Skips `gap` uncaptured client bytes if they are all argument bytes (and their
    /// CRLF); false if the gap covers framing.
    fn client_skip_gap(&mut self, gap: u64, ts: u64, out: &mut Vec<DbCall>) -> bool {
        let to_end = match self.client {
            ClientState::ArgData { remaining } => remaining.saturating_add(2),
            ClientState::ArgCr => 2,
            ClientState::ArgLf => 1,
            _ => return false,
        };
        if gap > to_end {
            return false;
        }
        if matches!(self.client, ClientState::ArgData { .. }) {
            self.command.cut();
        }
        self.client = match to_end - gap {
            0 => {
                self.arg_done(ts, out);
                return true;
            }
            1 => ClientState::ArgLf,
            2 => ClientState::ArgCr,
            left => ClientState::ArgData {
                remaining: left - 2,
            },
        };
        true
    }

    /// A whole command was read: queue it for its reply (or emit it at once when the
    /// server will not answer).
    fn command_done(&mut self, ts: u64, out: &mut Vec<DbCall>) {
        let cmd = mem::replace(&mut self.command, CommandBuilder::new(0));
        let [name, second, third] = &cmd.words;
        let (operation, words) = match command_name(name) {
            None => (None, 1),
            Some(mut op) => match subcommand_name(&op, second) {
                Some(sub) => {
                    op.push(' ');
                    op.push_str(&sub);
                    (Some(op), 2)
                }
                None => (Some(op), 1),
            },
        };
        let query_text = operation
            .as_deref()
            .map(|op| query_text(op, cmd.args.saturating_sub(words)));
        let kind = match operation.as_deref() {
            Some("MULTI") => CommandKind::Multi,
            Some("EXEC") => CommandKind::Exec,
            Some("DISCARD") => CommandKind::Discard,
            Some("SELECT") => CommandKind::Select(
                second
                    .exact()
                    .and_then(|w| std::str::from_utf8(w).ok())
                    .and_then(|s| s.parse().ok()),
            ),
            Some("HELLO") => CommandKind::Hello,
            Some("RESET") => CommandKind::Reset,
            Some("MONITOR") => CommandKind::Monitor,
            Some(op) => {
                Subscription::parse(op.as_bytes()).map_or(CommandKind::Other, CommandKind::PubSub)
            }
            None => CommandKind::Other,
        };
        let pending = PendingCommand {
            kind,
            operation,
            query_text,
            start_ns: cmd.start_ns,
            channels: cmd.args.saturating_sub(1),
        };

        // CLIENT REPLY: the server stops answering, or skips one answer.
        let reply_mode = (pending.operation.as_deref() == Some("CLIENT REPLY"))
            .then(|| {
                if third.is(b"ON") {
                    Some(ReplyMode::On)
                } else if third.is(b"OFF") {
                    Some(ReplyMode::Off)
                } else if third.is(b"SKIP") {
                    Some(ReplyMode::SkipNext)
                } else {
                    None
                }
            })
            .flatten();
        let answered = match (self.reply_mode, reply_mode) {
            (_, Some(ReplyMode::On)) => {
                self.reply_mode = ReplyMode::On;
                true
            }
            (_, Some(mode)) => {
                self.reply_mode = mode;
                false
            }
            (ReplyMode::Off, None) => false,
            (ReplyMode::SkipNext, None) => {
                self.reply_mode = ReplyMode::On;
                false
            }
            (ReplyMode::On, None) => true,
        };
        if !answered {
            out.push(self.call(pending, ts, None, None));
            return;
        }
        if kind == CommandKind::Reset {
            self.reply_mode = ReplyMode::On;
        }
        if self.pending.len() >= MAX_PENDING_COMMANDS {
            self.pending.pop_front();
            self.dropped = self.dropped.saturating_add(1);
            self.orphan_replies = self.orphan_replies.saturating_add(1);
        }
        self.pending.push_back(pending);
    }

    // ---- server side ------------------------------------------------------------

    fn server_chunk(&mut self, chunk: &Chunk<'_>, out: &mut Vec<DbCall>) -> Result<(), RedisError> {
        let ts = chunk.ts_ns;
        let mut pos = 0usize;
        while let Some(rest) = chunk.bytes.get(pos..).filter(|rest| !rest.is_empty()) {
            if self.stopped {
                return Ok(());
            }
            let used = self.server_step(rest, ts, out)?;
            if used == 0 {
                // Every server state consumes at least one byte.
                return Err(RedisError::Stalled {
                    direction: Direction::Server,
                });
            }
            pos = pos.saturating_add(used);
        }
        let gap = chunk.gap();
        if gap > 0
            && !self.stopped
            && !self.server_skip_gap(u64::try_from(gap).unwrap_or(u64::MAX), ts, out)
        {
            let dropped = self.lose(Direction::Server);
            return Err(RedisError::SyncLost {
                direction: Direction::Server,
                gap,
                dropped,
            });
        }
        Ok(())
    }

    /// Consumes a non-empty prefix of `rest` (non-empty); returns its length.
    fn server_step(
        &mut self,
        rest: &[u8],
        ts: u64,
        out: &mut Vec<DbCall>,
    ) -> Result<usize, RedisError> {
        const D: Direction = Direction::Server;
        let Some(&b) = rest.first() else {
            return Ok(0);
        };
        match self.server {
            ServerState::Value => {
                self.value_start(b)?;
                Ok(1)
            }
            ServerState::Number { ty, mut line } => {
                let (used, number) = line.feed(rest).map_err(|reason| RedisError::BadNumber {
                    direction: D,
                    what: number_name(ty),
                    reason,
                })?;
                match number {
                    None => self.server = ServerState::Number { ty, line },
                    Some(number) => {
                        self.server = ServerState::Value;
                        self.on_number(ty, number, ts, out)?;
                    }
                }
                Ok(used)
            }
            ServerState::Text { ty, bytes } => {
                let (text, used, ended) = match rest.iter().position(|&c| c == b'\n') {
                    Some(p) => (&rest[..p], p + 1, true),
                    None => (rest, rest.len(), false),
                };
                let bytes = bytes.saturating_add(text.len());
                if bytes > MAX_LINE_BYTES {
                    return Err(RedisError::LineTooLong {
                        direction: D,
                        what: "text line",
                        limit: MAX_LINE_BYTES,
                    });
                }
                match self.capture {
                    Capture::First => self.reply.first.push_line(text, false),
                    Capture::Error => self.reply.error.push_line(text, true),
                    Capture::None => {}
                }
                if ended {
                    self.server = ServerState::Value;
                    self.on_text_line(ty, ts, out)?;
                } else {
                    self.server = ServerState::Text { ty, bytes };
                }
                Ok(used)
            }
            ServerState::Payload { remaining } => {
                let take = bounded_take(remaining, rest.len());
                let data = &rest[..take];
                match self.capture {
                    Capture::First => self.reply.first.push_bulk(data),
                    Capture::Error => self.reply.error.push_line(data, true),
                    Capture::None => {}
                }
                let remaining = remaining.saturating_sub(take as u64);
                self.server = if remaining == 0 {
                    ServerState::PayloadCr
                } else {
                    ServerState::Payload { remaining }
                };
                Ok(take)
            }
            ServerState::PayloadCr => {
                if b != b'\r' {
                    return Err(RedisError::BadBulkEnd { direction: D });
                }
                self.server = ServerState::PayloadLf;
                Ok(1)
            }
            ServerState::PayloadLf => {
                if b != b'\n' {
                    return Err(RedisError::BadBulkEnd { direction: D });
                }
                self.payload_done(ts, out);
                Ok(1)
            }
            ServerState::StreamedPart => {
                if b != b';' {
                    return Err(RedisError::Unexpected {
                        direction: D,
                        expected: "';' (the next part of a streamed string)",
                        found: describe_byte(b),
                    });
                }
                self.server = ServerState::Number {
                    ty: b';',
                    line: NumberLine::default(),
                };
                Ok(1)
            }
            ServerState::Lost => Ok(rest.len()),
        }
    }

    /// A type byte: a value starts.
    fn value_start(&mut self, ty: u8) -> Result<(), RedisError> {
        if !is_type_byte(ty) && ty != b'.' {
            return Err(RedisError::Unexpected {
                direction: Direction::Server,
                expected: "a RESP type byte",
                found: describe_byte(ty),
            });
        }
        let depth = self.stack.len();
        if depth == 0 && ty != b'|' && ty != b'.' {
            self.reply = ReplyInfo::EMPTY;
            self.reply.ty = ty;
            self.top_index = 0;
        }
        let in_top_aggregate = depth == 1 && !self.stack[0].attribute;
        self.capture = match ty {
            b'-' | b'!' if depth == 0 => Capture::Error,
            b'$' | b'+' if in_top_aggregate && self.top_index == 0 => Capture::First,
            _ => Capture::None,
        };
        self.server = match ty {
            b'+' | b'-' | b'_' | b',' | b'#' | b'(' | b'.' => ServerState::Text { ty, bytes: 0 },
            _ => ServerState::Number {
                ty,
                line: NumberLine::default(),
            },
        };
        Ok(())
    }

    fn on_text_line(&mut self, ty: u8, ts: u64, out: &mut Vec<DbCall>) -> Result<(), RedisError> {
        if ty != b'.' {
            self.value_done(ts, out);
            return Ok(());
        }
        // End of a streamed aggregate.
        match self.stack.last() {
            Some(frame) if frame.remaining.is_none() => {}
            _ => return Err(RedisError::UnexpectedStreamEnd),
        }
        let frame = self.stack.pop();
        if frame.is_some_and(|f| f.attribute) {
            return Ok(());
        }
        if self.stack.is_empty() {
            let elements = if frame.is_some_and(|f| f.map) {
                self.top_index / 2
            } else {
                self.top_index
            };
            self.reply.len = Some(elements);
        }
        self.value_done(ts, out);
        Ok(())
    }

    fn on_number(
        &mut self,
        ty: u8,
        number: Number,
        ts: u64,
        out: &mut Vec<DbCall>,
    ) -> Result<(), RedisError> {
        const D: Direction = Direction::Server;
        match (ty, number) {
            (b':', Number::Value(v)) => {
                if self.stack.len() == 1 && !self.stack[0].attribute && self.top_index == 2 {
                    self.reply.third = Some(v);
                }
                self.value_done(ts, out);
            }
            (b'$', Number::Streamed) => {
                self.in_streamed_string = true;
                self.server = ServerState::StreamedPart;
            }
            (b'$' | b'=' | b'!' | b';', Number::Value(n)) => {
                if n == -1 && ty != b';' {
                    // Null bulk string (RESP2).
                    self.value_done(ts, out);
                } else if n < 0 {
                    return Err(RedisError::BadNumber {
                        direction: D,
                        what: number_name(ty),
                        reason: "negative length",
                    });
                } else if n == 0 && ty == b';' {
                    self.in_streamed_string = false;
                    self.value_done(ts, out);
                } else {
                    let n = n.unsigned_abs();
                    if n > MAX_BULK_LEN {
                        return Err(RedisError::TooLarge {
                            direction: D,
                            what: number_name(ty),
                            value: n,
                            limit: MAX_BULK_LEN,
                        });
                    }
                    self.server = if n == 0 {
                        ServerState::PayloadCr
                    } else {
                        ServerState::Payload { remaining: n }
                    };
                }
            }
            (b'*' | b'~' | b'%' | b'>' | b'|', Number::Streamed) => {
                self.push_frame(ty, None)?;
            }
            (b'*' | b'~' | b'%' | b'>' | b'|', Number::Value(n)) => {
                if n == -1 && ty != b'|' {
                    // Null array (RESP2).
                    self.value_done(ts, out);
                } else if n < 0 {
                    return Err(RedisError::BadNumber {
                        direction: D,
                        what: number_name(ty),
                        reason: "negative length",
                    });
                } else {
                    let n = n.unsigned_abs();
                    if n > MAX_AGGREGATE_LEN {
                        return Err(RedisError::TooLarge {
                            direction: D,
                            what: number_name(ty),
                            value: n,
                            limit: MAX_AGGREGATE_LEN,
                        });
                    }
                    if self.stack.is_empty() && ty != b'|' {
                        self.reply.len = Some(n);
                    }
                    let elements = if ty == b'%' || ty == b'|' { n * 2 } else { n };
                    if elements > 0 {
                        self.push_frame(ty, Some(elements))?;
                    } else if ty != b'|' {
                        self.value_done(ts, out);
                    }
                }
            }
            _ => {
                return Err(RedisError::BadNumber {
                    direction: D,
                    what: number_name(ty),
                    reason: "'?' (streamed) is not allowed here",
                });
            }
        }
        Ok(())
    }

    fn push_frame(&mut self, ty: u8, remaining: Option<u64>) -> Result<(), RedisError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(RedisError::TooDeep { limit: MAX_DEPTH });
        }
        self.stack.push(Frame {
            remaining,
            attribute: ty == b'|',
            map: ty == b'%',
        });
        Ok(())
    }

    fn payload_done(&mut self, ts: u64, out: &mut Vec<DbCall>) {
        if self.in_streamed_string {
            self.server = ServerState::StreamedPart;
        } else {
            self.server = ServerState::Value;
            self.value_done(ts, out);
        }
    }

    /// A value at the current depth is complete: counts it in its aggregate, closing
    /// aggregates that are full, up to the reply itself.
    fn value_done(&mut self, ts: u64, out: &mut Vec<DbCall>) {
        loop {
            let depth = self.stack.len();
            let Some(frame) = self.stack.last_mut() else {
                self.reply_done(ts, out);
                return;
            };
            if depth == 1 && !frame.attribute {
                self.top_index = self.top_index.saturating_add(1);
            }
            match &mut frame.remaining {
                None => return,
                Some(remaining) => {
                    *remaining = remaining.saturating_sub(1);
                    if *remaining > 0 {
                        return;
                    }
                }
            }
            if self.stack.pop().is_some_and(|f| f.attribute) {
                // The attribute is done; the value it annotates comes next.
                return;
            }
        }
    }

    /// Skips `gap` uncaptured server bytes if they are all payload bytes (and their
    /// CRLF); false if the gap covers framing.
    fn server_skip_gap(&mut self, gap: u64, ts: u64, out: &mut Vec<DbCall>) -> bool {
        let to_end = match self.server {
            ServerState::Payload { remaining } => remaining.saturating_add(2),
            ServerState::PayloadCr => 2,
            ServerState::PayloadLf => 1,
            _ => return false,
        };
        if gap > to_end {
            return false;
        }
        if matches!(self.server, ServerState::Payload { .. }) {
            match self.capture {
                Capture::First => self.reply.first.cut = true,
                // An error code is the message's first word: a cut message may
                // still have a whole code.
                Capture::Error if !self.reply.error.ended => self.reply.error.cut = true,
                _ => {}
            }
        }
        self.server = match to_end - gap {
            0 => {
                self.payload_done(ts, out);
                return true;
            }
            1 => ServerState::PayloadLf,
            2 => ServerState::PayloadCr,
            left => ServerState::Payload {
                remaining: left - 2,
            },
        };
        true
    }

    /// A top-level value is complete: a reply, a push, or a pub/sub confirmation.
    fn reply_done(&mut self, ts: u64, out: &mut Vec<DbCall>) {
        let info = mem::replace(&mut self.reply, ReplyInfo::EMPTY);
        self.top_index = 0;
        if is_resp3_only(info.ty) {
            self.resp3 = true;
        }
        let kind = pubsub_kind(&info.first);
        let front_subscribes = self
            .pending
            .front()
            .is_some_and(|c| matches!(c.kind, CommandKind::PubSub(_)));
        match info.ty {
            b'>' => {
                if let PubSub::Confirmation(sub) = kind {
                    self.confirmation(&info, sub, ts, out);
                }
                // Other pushes (messages, invalidations) answer no command.
            }
            b'*' if (self.subscribed && !self.resp3) || front_subscribes => match kind {
                PubSub::Message if self.subscribed => {}
                PubSub::Confirmation(sub) => self.confirmation(&info, sub, ts, out),
                _ => self.complete_front(&info, ts, out),
            },
            _ => self.complete_front(&info, ts, out),
        }
    }

    /// A (un)subscribe confirmation: completes the (un)subscribe command at the head of
    /// the queue, the first time; later ones for the same command are consumed.
    fn confirmation(
        &mut self,
        info: &ReplyInfo,
        sub: Subscription,
        ts: u64,
        out: &mut Vec<DbCall>,
    ) {
        self.subscribed = if sub.unsubscribe {
            info.third.is_some_and(|n| n > 0)
        } else {
            true
        };
        if self.confirmations_left > 0 {
            self.confirmations_left -= 1;
            return;
        }
        let Some(front) = self.pending.front() else {
            return;
        };
        if front.kind != CommandKind::PubSub(sub) || front.start_ns > ts {
            return;
        }
        if let Some(cmd) = self.pending.pop_front() {
            self.confirmations_left = cmd.channels.saturating_sub(1);
            out.push(self.call(cmd, ts, None, None));
        }
    }

    /// A reply: completes the oldest pending command.
    fn complete_front(&mut self, info: &ReplyInfo, ts: u64, out: &mut Vec<DbCall>) {
        if self.orphan_replies > 0 {
            self.orphan_replies -= 1;
            return;
        }
        // Causality: a reply cannot answer a command sent after it was received.
        if self.pending.front().is_none_or(|c| c.start_ns > ts) {
            self.unmatched = self.unmatched.saturating_add(1);
            return;
        }
        let Some(cmd) = self.pending.pop_front() else {
            return;
        };
        let error = matches!(info.ty, b'-' | b'!').then(|| error_code(&info.error));
        let rows = match info.ty {
            b'*' | b'~' | b'%' => info.len,
            _ => None,
        };
        let kind = cmd.kind;
        let ok = error.is_none();
        out.push(self.call(cmd, ts, error, rows));

        if self.in_transaction
            && !matches!(
                kind,
                CommandKind::Multi | CommandKind::Exec | CommandKind::Discard | CommandKind::Reset
            )
        {
            // Queued, not run: only a SELECT is remembered, for EXEC.
            if let (CommandKind::Select(Some(db)), true) = (kind, ok) {
                self.transaction_select = Some(db);
            }
            return;
        }
        match kind {
            CommandKind::Multi if ok => {
                self.in_transaction = true;
                self.transaction_select = None;
            }
            CommandKind::Exec => {
                let select = self.transaction_select.take();
                if let Some(db) = select
                    && self.in_transaction
                    && info.ty == b'*'
                    && info.len.is_some()
                {
                    self.namespace = db.to_string();
                }
                self.in_transaction = false;
            }
            CommandKind::Discard if ok => {
                self.in_transaction = false;
                self.transaction_select = None;
            }
            CommandKind::Select(Some(db)) if ok => self.namespace = db.to_string(),
            CommandKind::Hello if ok => self.resp3 = info.ty == b'%',
            CommandKind::Reset if ok => {
                self.in_transaction = false;
                self.transaction_select = None;
                self.subscribed = false;
                self.resp3 = false;
                self.confirmations_left = 0;
                self.namespace = String::from("0");
            }
            CommandKind::Monitor if ok => {
                self.stopped = true;
                self.dropped = self
                    .dropped
                    .saturating_add(u64::try_from(self.pending.len()).unwrap_or(u64::MAX));
                self.pending.clear();
            }
            _ => {}
        }
    }

    fn call(
        &self,
        cmd: PendingCommand,
        end_ns: u64,
        error_code: Option<String>,
        rows: Option<u64>,
    ) -> DbCall {
        DbCall {
            system: DbSystem::Redis,
            operation: cmd.operation,
            query_text: cmd.query_text,
            namespace: Some(self.namespace.clone()),
            start_ns: cmd.start_ns,
            end_ns: end_ns.max(cmd.start_ns),
            error_code,
            rows,
        }
    }
}

/// Pub/sub meaning of an array's or push's first element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PubSub {
    None,
    /// `message`, `pmessage`, `smessage`: a published message.
    Message,
    /// `subscribe`, `punsubscribe`, ...: a confirmation.
    Confirmation(Subscription),
}

fn pubsub_kind(first: &Word) -> PubSub {
    match first.exact() {
        Some(b"message" | b"pmessage" | b"smessage") => PubSub::Message,
        Some(kind) if kind.iter().all(u8::is_ascii_lowercase) => {
            Subscription::parse(kind).map_or(PubSub::None, PubSub::Confirmation)
        }
        _ => PubSub::None,
    }
}

/// The command name, upper case, if the word is a plausible one.
fn command_name(word: &Word) -> Option<String> {
    let name = word.exact()?;
    let plausible = name.first().is_some_and(u8::is_ascii_alphabetic)
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'|'));
    plausible.then(|| String::from_utf8_lossy(name).to_ascii_uppercase())
}

/// The subcommand of a container command, upper case, if the word is a plausible
/// subcommand (letters, `-` and `_` only, so that keys and values rarely qualify).
fn subcommand_name(command: &str, word: &Word) -> Option<String> {
    if !CONTAINER_COMMANDS.contains(&command) {
        return None;
    }
    let sub = word.exact()?;
    let plausible = sub.first().is_some_and(u8::is_ascii_alphabetic)
        && sub
            .iter()
            .all(|&b| b.is_ascii_alphabetic() || matches!(b, b'_' | b'-'));
    plausible.then(|| String::from_utf8_lossy(sub).to_ascii_uppercase())
}

/// `GET ?`, `HSET ? ? ?`: the operation and one `?` per remaining argument.
fn query_text(operation: &str, args: u64) -> String {
    let shown = args.min(MAX_QUERY_PLACEHOLDERS);
    let mut text = String::with_capacity(operation.len() + 2 * shown as usize + 4);
    text.push_str(operation);
    for _ in 0..shown {
        text.push_str(" ?");
    }
    if args > shown {
        text.push_str(" ...");
    }
    text
}

/// The error code of an error reply: its first word if that is an upper-case code,
/// else `ERR`.
fn error_code(word: &Word) -> String {
    match word.exact() {
        Some(code)
            if !code.is_empty()
                && code.iter().all(|&b| {
                    b.is_ascii_uppercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-')
                }) =>
        {
            String::from_utf8_lossy(code).into_owned()
        }
        _ => String::from("ERR"),
    }
}

/// At most `remaining` of `available` bytes.
fn bounded_take(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
}

/// Type bytes only RESP3 has: a reply of one proves the connection speaks RESP3.
fn is_resp3_only(b: u8) -> bool {
    matches!(
        b,
        b'_' | b',' | b'#' | b'!' | b'=' | b'(' | b'%' | b'~' | b'>' | b'|'
    )
}

/// Bytes that begin a RESP2 or RESP3 value (`.` only ends a streamed aggregate).
fn is_type_byte(b: u8) -> bool {
    matches!(
        b,
        b'+' | b'-'
            | b':'
            | b'$'
            | b'*'
            | b'_'
            | b','
            | b'#'
            | b'!'
            | b'='
            | b'('
            | b'%'
            | b'~'
            | b'>'
            | b'|'
    )
}

fn number_name(ty: u8) -> &'static str {
    match ty {
        b':' => "integer",
        b'$' => "bulk string length",
        b'=' => "verbatim string length",
        b'!' => "blob error length",
        b';' => "streamed string part length",
        b'*' => "array length",
        b'~' => "set length",
        b'%' => "map length",
        b'>' => "push length",
        b'|' => "attribute length",
        _ => "number",
    }
}

/// A class name for a byte, for errors: never the byte itself.
fn describe_byte(b: u8) -> &'static str {
    match b {
        b'0'..=b'9' => "a digit",
        b'a'..=b'z' | b'A'..=b'Z' => "a letter",
        b'\r' | b'\n' => "a line ending",
        b' ' | b'\t' => "whitespace",
        _ if is_type_byte(b) => "another RESP type byte",
        0x21..=0x7e => "punctuation",
        0x80..=0xff => "a non-ASCII byte",
        _ => "a control byte",
    }
}

/// Whether a client chunk may start a command: `*` and a digit, or an inline command
/// [`looks_like_command`] knows. Used to resync.
fn begins_command(bytes: &[u8]) -> bool {
    match bytes {
        [b'*', d, ..] => d.is_ascii_digit(),
        _ => looks_like_inline(bytes),
    }
}

fn looks_like_inline(bytes: &[u8]) -> bool {
    let end = bytes
        .iter()
        .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))
        .unwrap_or(bytes.len());
    let line = &bytes[..bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len())];
    // `GET / HTTP/1.1` is an HTTP request, not an inline GET.
    let http = line.windows(7).any(|w| w == b" HTTP/1");
    end < bytes.len()
        && !http
        && INLINE_COMMANDS
            .iter()
            .any(|name| name.eq_ignore_ascii_case(&bytes[..end]))
}

/// Protocol detection: true if `bytes` (the first bytes a client sent) begin a Redis
/// command: a RESP array of bulk strings (`*N\r\n$`, N of 1 to 7 digits) or an inline
/// command with a well-known name followed by a space or line end (`PING\r\n`).
pub fn looks_like_command(bytes: &[u8]) -> bool {
    if let Some(rest) = bytes.strip_prefix(b"*") {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        return (1..=7).contains(&digits) && rest[digits..].starts_with(b"\r\n$");
    }
    looks_like_inline(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- captures ----------------------------------------------------------------

    /// One recorded connection (see testdata/redis/capture.py).
    macro_rules! capture {
        ($name:literal) => {
            (
                $name,
                &include_bytes!(concat!("../testdata/redis/", $name, ".cap"))[..],
            )
        };
    }

    /// One recv() of the recording proxy.
    #[derive(Clone, Copy, Debug)]
    struct Record<'a> {
        client: bool,
        ts: u64,
        bytes: &'a [u8],
    }

    /// The records of a capture file (testdata/README.md).
    fn parse_records(file: &[u8]) -> Vec<Record<'_>> {
        let capture = crate::testdata::parse(file).expect("capture file");
        capture
            .records
            .iter()
            .map(|r| Record {
                client: r.from_client,
                ts: r.ts_ns,
                bytes: r.bytes,
            })
            .collect()
    }

    /// A call as the tables spell it: (query_text, error_code, rows, namespace); the
    /// operation is the query text without its placeholders.
    type Summary = (String, Option<String>, Option<u64>, String);

    fn summary(calls: &[DbCall]) -> Vec<Summary> {
        calls
            .iter()
            .map(|c| {
                let query = c.query_text.clone().unwrap_or_default();
                let op = query.trim_end_matches(" ...").trim_end_matches(" ?");
                assert_eq!(c.operation.as_deref(), Some(op), "{c:?}");
                assert_eq!(c.system, DbSystem::Redis);
                (
                    query,
                    c.error_code.clone(),
                    c.rows,
                    c.namespace.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    fn owned(expected: &[(&str, Option<&str>, Option<u64>, &str)]) -> Vec<Summary> {
        expected
            .iter()
            .map(|&(q, e, r, n)| (q.to_owned(), e.map(str::to_owned), r, n.to_owned()))
            .collect()
    }

    fn repeat(
        n: usize,
        call: (
            &'static str,
            Option<&'static str>,
            Option<u64>,
            &'static str,
        ),
    ) -> Vec<(
        &'static str,
        Option<&'static str>,
        Option<u64>,
        &'static str,
    )> {
        vec![call; n]
    }

    struct Case {
        name: &'static str,
        file: &'static [u8],
        calls: Vec<(
            &'static str,
            Option<&'static str>,
            Option<u64>,
            &'static str,
        )>,
    }

    const OK: Option<&str> = None;
    const NO_ROWS: Option<u64> = None;

    /// What redis-py 8 sends first on every RESP3 connection.
    fn redis_py_resp3_handshake() -> Vec<(
        &'static str,
        Option<&'static str>,
        Option<u64>,
        &'static str,
    )> {
        vec![
            ("HELLO ?", OK, Some(7), "0"),
            (
                "CLIENT MAINT_NOTIFICATIONS ? ? ?",
                Some("ERR"),
                NO_ROWS,
                "0",
            ),
            ("CLIENT SETINFO ? ?", Some("ERR"), NO_ROWS, "0"),
            ("CLIENT SETINFO ? ?", Some("ERR"), NO_ROWS, "0"),
        ]
    }

    fn cases() -> Vec<Case> {
        let case = |(name, file): (&'static str, &'static [u8]), calls| Case { name, file, calls };
        vec![
            case(
                capture!("cli_basic"),
                vec![
                    ("SELECT ?", OK, NO_ROWS, "0"),
                    ("COMMAND DOCS", OK, Some(480), "3"),
                    ("SET ? ?", OK, NO_ROWS, "3"),
                    ("GET ?", OK, NO_ROWS, "3"),
                    ("GET ?", OK, NO_ROWS, "3"),
                    ("INCR ?", OK, NO_ROWS, "3"),
                    ("HSET ? ? ? ? ?", OK, NO_ROWS, "3"),
                    ("HGETALL ?", OK, Some(4), "3"),
                    ("LPUSH ? ? ?", OK, NO_ROWS, "3"),
                    ("GET ?", Some("WRONGTYPE"), NO_ROWS, "3"),
                    ("FOOBAR ?", Some("ERR"), NO_ROWS, "3"),
                    ("CLIENT SETNAME ?", OK, NO_ROWS, "3"),
                    ("CONFIG GET ?", OK, Some(2), "3"),
                    ("EXISTS ? ?", OK, NO_ROWS, "3"),
                    ("DEL ? ? ? ?", OK, NO_ROWS, "3"),
                ],
            ),
            case(
                capture!("inline"),
                vec![
                    ("PING", OK, NO_ROWS, "0"),
                    ("SET ? ?", OK, NO_ROWS, "0"),
                    ("GET ?", OK, NO_ROWS, "0"),
                    ("EXISTS ? ?", OK, NO_ROWS, "0"),
                    ("DEL ?", OK, NO_ROWS, "0"),
                    ("QUIT", OK, NO_ROWS, "0"),
                ],
            ),
            case(capture!("cli_pipe"), {
                let mut calls = repeat(100, ("SET ? ?", OK, NO_ROWS, "0"));
                calls.push(("ECHO ?", OK, NO_ROWS, "0"));
                calls
            }),
            case(capture!("py_pipeline"), {
                let mut calls = redis_py_resp3_handshake();
                calls.push(("PING", OK, NO_ROWS, "0"));
                calls.extend(repeat(10, ("SET ? ?", OK, NO_ROWS, "0")));
                calls.push(("HSET ? ? ?", OK, NO_ROWS, "0"));
                calls.push(("GET ?", Some("WRONGTYPE"), NO_ROWS, "0"));
                calls.extend(repeat(10, ("GET ?", OK, NO_ROWS, "0")));
                calls
            }),
            case(capture!("py_transaction"), {
                let mut calls = redis_py_resp3_handshake();
                calls.extend([
                    ("SET ? ?", OK, NO_ROWS, "0"),
                    ("MULTI", OK, NO_ROWS, "0"),
                    ("DECRBY ? ?", OK, NO_ROWS, "0"),
                    ("INCRBY ? ?", OK, NO_ROWS, "0"),
                    ("GET ?", OK, NO_ROWS, "0"),
                    ("EXEC", OK, Some(3), "0"),
                ]);
                calls
            }),
            case(
                capture!("multi_exec"),
                vec![
                    ("MULTI", OK, NO_ROWS, "0"),
                    ("SET ? ?", OK, NO_ROWS, "0"),
                    ("INCR ?", OK, NO_ROWS, "0"),
                    ("GET ?", OK, NO_ROWS, "0"),
                    ("EXEC", OK, Some(3), "0"),
                    ("MULTI", OK, NO_ROWS, "0"),
                    ("SET ? ?", OK, NO_ROWS, "0"),
                    ("DISCARD", OK, NO_ROWS, "0"),
                    ("MULTI", OK, NO_ROWS, "0"),
                    ("SET ? ?", OK, NO_ROWS, "0"),
                    ("NOSUCHCOMMAND ?", Some("ERR"), NO_ROWS, "0"),
                    ("EXEC", Some("EXECABORT"), NO_ROWS, "0"),
                    ("SET ? ?", OK, NO_ROWS, "0"),
                    ("MULTI", OK, NO_ROWS, "0"),
                    ("INCR ?", OK, NO_ROWS, "0"),
                    ("SELECT ?", OK, NO_ROWS, "0"),
                    ("EXEC", OK, Some(2), "0"),
                    ("GET ?", OK, NO_ROWS, "5"),
                ],
            ),
            case(capture!("resp3"), {
                let mut calls = redis_py_resp3_handshake();
                calls.extend([
                    ("HSET ? ? ? ? ?", OK, NO_ROWS, "0"),
                    ("HGETALL ?", OK, Some(2), "0"),
                    ("SADD ? ? ? ?", OK, NO_ROWS, "0"),
                    ("SMEMBERS ?", OK, Some(3), "0"),
                    ("ZADD ? ? ?", OK, NO_ROWS, "0"),
                    ("ZSCORE ? ?", OK, NO_ROWS, "0"),
                    ("GET ?", OK, NO_ROWS, "0"),
                    ("EVAL ? ?", OK, NO_ROWS, "0"),
                    ("EVAL ? ?", OK, NO_ROWS, "0"),
                    ("EVAL ? ?", OK, NO_ROWS, "0"),
                    ("EVAL ? ?", Some("MYCODE"), NO_ROWS, "0"),
                    ("DEL ? ? ?", OK, NO_ROWS, "0"),
                ]);
                calls
            }),
            case(
                capture!("resp3_push"),
                vec![
                    ("HELLO ?", OK, Some(7), "0"),
                    ("SET ? ?", OK, NO_ROWS, "0"),
                    ("CLIENT TRACKING ?", OK, NO_ROWS, "0"),
                    ("GET ?", OK, NO_ROWS, "0"),
                    ("PING", OK, NO_ROWS, "0"),
                    ("SUBSCRIBE ?", OK, NO_ROWS, "0"),
                    ("PING", OK, NO_ROWS, "0"),
                    ("UNSUBSCRIBE", OK, NO_ROWS, "0"),
                    ("GET ?", OK, NO_ROWS, "0"),
                ],
            ),
            case(
                capture!("py_pubsub"),
                vec![
                    ("CLIENT SETINFO ? ?", Some("ERR"), NO_ROWS, "0"),
                    ("CLIENT SETINFO ? ?", Some("ERR"), NO_ROWS, "0"),
                    ("SUBSCRIBE ? ?", OK, NO_ROWS, "0"),
                    ("PSUBSCRIBE ?", OK, NO_ROWS, "0"),
                    ("PING", OK, Some(2), "0"),
                    ("UNSUBSCRIBE", OK, NO_ROWS, "0"),
                    ("PUNSUBSCRIBE", OK, NO_ROWS, "0"),
                ],
            ),
            case(capture!("large_value"), {
                let mut calls = redis_py_resp3_handshake();
                calls.extend([
                    ("SET ? ?", OK, NO_ROWS, "0"),
                    ("GET ?", OK, NO_ROWS, "0"),
                    ("STRLEN ?", OK, NO_ROWS, "0"),
                    ("MSET ? ? ? ?", OK, NO_ROWS, "0"),
                    ("MGET ? ? ?", OK, Some(3), "0"),
                    ("DEL ? ? ?", OK, NO_ROWS, "0"),
                ]);
                calls
            }),
            case(
                capture!("client_reply"),
                vec![
                    ("CLIENT REPLY ?", OK, NO_ROWS, "0"),
                    ("SET ? ?", OK, NO_ROWS, "0"),
                    ("CLIENT REPLY ?", OK, NO_ROWS, "0"),
                    ("GET ?", OK, NO_ROWS, "0"),
                    ("CLIENT REPLY ?", OK, NO_ROWS, "0"),
                    ("INCR ?", OK, NO_ROWS, "0"),
                    ("GET ?", OK, NO_ROWS, "0"),
                ],
            ),
            case(
                capture!("monitor"),
                vec![
                    ("SELECT ?", OK, NO_ROWS, "0"),
                    ("MONITOR", OK, NO_ROWS, "2"),
                ],
            ),
        ]
    }

    fn find_case(name: &str) -> Case {
        cases()
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no capture named {name}"))
    }

    // ---- feeding -----------------------------------------------------------------

    /// One chunk of one direction.
    #[derive(Clone, Copy, Debug)]
    struct Fed<'a> {
        client: bool,
        chunk: Chunk<'a>,
    }

    #[derive(Debug, Default)]
    struct Decoded {
        calls: Vec<DbCall>,
        errors: Vec<RedisError>,
    }

    fn feed_one(dec: &mut RedisDecoder, fed: &Fed<'_>, decoded: &mut Decoded) {
        let result = if fed.client {
            dec.client(&fed.chunk, &mut decoded.calls)
        } else {
            dec.server(&fed.chunk, &mut decoded.calls)
        };
        if let Err(e) = result {
            assert!(!matches!(e, RedisError::Stalled { .. }), "{e}");
            decoded.errors.push(e);
        }
        assert!(dec.stack.len() <= MAX_DEPTH);
        assert!(dec.pending.len() <= MAX_PENDING_COMMANDS);
    }

    fn run(chunks: &[Fed<'_>]) -> Decoded {
        let mut dec = RedisDecoder::new();
        let mut decoded = Decoded::default();
        for fed in chunks {
            feed_one(&mut dec, fed, &mut decoded);
        }
        decoded
    }

    /// The records as recorded: one chunk each.
    fn whole<'a>(records: &[Record<'a>]) -> Vec<Fed<'a>> {
        records
            .iter()
            .map(|r| Fed {
                client: r.client,
                chunk: Chunk::whole(r.bytes, r.ts),
            })
            .collect()
    }

    /// One chunk per byte, each with its record's timestamp.
    fn bytewise<'a>(records: &[Record<'a>]) -> Vec<Fed<'a>> {
        records
            .iter()
            .flat_map(|r| {
                r.bytes.iter().map(|b| Fed {
                    client: r.client,
                    chunk: Chunk::whole(std::slice::from_ref(b), r.ts),
                })
            })
            .collect()
    }

    /// Record `index` cut in two at `at`; both halves keep its timestamp.
    fn split_at<'a>(records: &[Record<'a>], index: usize, at: usize) -> Vec<Fed<'a>> {
        let mut fed = Vec::with_capacity(records.len() + 1);
        for (i, r) in records.iter().enumerate() {
            if i == index {
                let (a, b) = r.bytes.split_at(at);
                for part in [a, b] {
                    fed.push(Fed {
                        client: r.client,
                        chunk: Chunk::whole(part, r.ts),
                    });
                }
            } else {
                fed.push(Fed {
                    client: r.client,
                    chunk: Chunk::whole(r.bytes, r.ts),
                });
            }
        }
        fed
    }

    /// The records with capture gaps: `gaps[i]` lists (offset, uncaptured length)
    /// inside record i, ascending and within it. Each gap ends a chunk.
    fn with_gaps<'a>(records: &[Record<'a>], gaps: &[Vec<(usize, usize)>]) -> Vec<Fed<'a>> {
        let mut fed = Vec::new();
        for (r, gaps) in records.iter().zip(gaps) {
            let mut from = 0;
            for &(at, len) in gaps {
                fed.push(Fed {
                    client: r.client,
                    chunk: Chunk {
                        bytes: &r.bytes[from..at],
                        len: at - from + len,
                        ts_ns: r.ts,
                    },
                });
                from = at + len;
            }
            if from < r.bytes.len() || gaps.is_empty() {
                fed.push(Fed {
                    client: r.client,
                    chunk: Chunk::whole(&r.bytes[from..], r.ts),
                });
            }
        }
        fed
    }

    /// Where bulk payloads are in one direction's stream, found by a naive walk of the
    /// whole (well-formed) stream: (start, end) offsets, CRLF excluded, and whether the
    /// decoder may keep its first bytes (a command name, a subcommand, the first
    /// element of an aggregate, a blob error).
    fn payloads(stream: &[u8], client: bool) -> Vec<(usize, usize, bool)> {
        let mut found = Vec::new();
        let mut i = 0;
        let mut arg = usize::MAX;
        let mut name: &[u8] = b"";
        let mut after_aggregate = false;
        while i < stream.len() {
            let Some(nl) = stream[i..].iter().position(|&b| b == b'\n') else {
                break;
            };
            let line = &stream[i..i + nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let ty = line.first().copied().unwrap_or(0);
            let number = std::str::from_utf8(line.get(1..).unwrap_or_default())
                .ok()
                .and_then(|s| s.parse::<i64>().ok());
            i += nl + 1;
            if client && ty == b'*' {
                arg = 0;
                continue;
            }
            match (ty, number) {
                (b'$' | b'=' | b'!' | b';', Some(n)) if n >= 0 => {
                    let (start, end) = (i, i + n as usize);
                    let kept = if client {
                        let kept = arg == 0
                            || (arg <= 2
                                && (CONTAINER_COMMANDS
                                    .iter()
                                    .any(|c| name.eq_ignore_ascii_case(c.as_bytes()))
                                    || name.eq_ignore_ascii_case(b"SELECT")
                                    || name.eq_ignore_ascii_case(b"HELLO")));
                        if arg == 0 {
                            name = &stream[start..end.min(stream.len())];
                        }
                        arg = arg.saturating_add(1);
                        kept
                    } else {
                        after_aggregate || ty == b'!'
                    };
                    found.push((start, end, kept));
                    after_aggregate = false;
                    i = end + 2;
                }
                _ => after_aggregate = !client && matches!(ty, b'*' | b'>' | b'~' | b'%'),
            }
        }
        found
    }

    /// Gaps over every payload not kept (and longer than `min_len`), starting `k(len)`
    /// bytes into it and reaching the end of its CRLF or of its record.
    fn gap_payloads(
        records: &[Record<'_>],
        min_len: usize,
        k: impl Fn(usize) -> usize,
    ) -> Vec<Vec<(usize, usize)>> {
        let mut gaps = vec![Vec::new(); records.len()];
        for client in [true, false] {
            let indices: Vec<usize> = (0..records.len())
                .filter(|&i| records[i].client == client)
                .collect();
            let stream: Vec<u8> = indices
                .iter()
                .flat_map(|&i| records[i].bytes.to_vec())
                .collect();
            let mut offsets = Vec::new();
            let mut base = 0;
            for &i in &indices {
                offsets.push((i, base, base + records[i].bytes.len()));
                base += records[i].bytes.len();
            }
            for (start, end, kept) in payloads(&stream, client) {
                let len = end - start;
                if kept || len <= min_len {
                    continue;
                }
                let at = start + k(len).min(len - 1);
                let &(record, rbase, rend) = offsets
                    .iter()
                    .find(|&&(_, b, e)| b <= at && at < e)
                    .expect("payload inside a record");
                let gap_end = (end + 2).min(rend);
                gaps[record].push((at - rbase, gap_end - at));
            }
        }
        gaps
    }

    fn assert_same(name: &str, what: &str, got: &Decoded, want: &[DbCall]) {
        assert!(
            got.errors.is_empty(),
            "{name} ({what}): errors {:?}",
            got.errors
        );
        assert_eq!(got.calls, want, "{name} ({what})");
    }

    // ---- captured sessions ---------------------------------------------------------

    #[test]
    fn captured_sessions_decode_to_exact_calls() {
        for c in cases() {
            let records = parse_records(c.file);
            let got = run(&whole(&records));
            assert!(got.errors.is_empty(), "{}: errors {:?}", c.name, got.errors);
            assert_eq!(summary(&got.calls), owned(&c.calls), "{}", c.name);
            let client_ts: Vec<u64> = records.iter().filter(|r| r.client).map(|r| r.ts).collect();
            let server_ts: Vec<u64> = records.iter().filter(|r| !r.client).map(|r| r.ts).collect();
            for call in &got.calls {
                assert!(call.start_ns <= call.end_ns, "{}: {call:?}", c.name);
                assert!(client_ts.contains(&call.start_ns), "{}: {call:?}", c.name);
                assert!(
                    server_ts.contains(&call.end_ns) || client_ts.contains(&call.end_ns),
                    "{}: {call:?}",
                    c.name
                );
            }
        }
    }

    #[test]
    fn pipelined_commands_pair_in_order_with_their_replies() {
        let c = find_case("cli_pipe");
        let records = parse_records(c.file);
        // All 100 SETs and the ECHO in one client write, all replies in one read.
        assert_eq!(records.iter().filter(|r| r.client).count(), 1);
        let got = run(&whole(&records));
        assert_eq!(got.calls.len(), 101);
        let (c0, s0) = (records[0].ts, records[1].ts);
        assert!(
            got.calls
                .iter()
                .all(|call| call.start_ns == c0 && call.end_ns == s0)
        );

        let c = find_case("py_pipeline");
        let records = parse_records(c.file);
        let got = run(&whole(&records));
        let pipeline = &got.calls[5..];
        assert_eq!(pipeline.len(), 22);
        let write = records.iter().filter(|r| r.client).nth(5).unwrap().ts;
        assert!(pipeline.iter().all(|call| call.start_ns == write));
    }

    #[test]
    fn one_command_per_chunk_sessions_carry_their_chunks_timestamps() {
        for name in ["multi_exec", "inline", "resp3"] {
            let c = find_case(name);
            let records = parse_records(c.file);
            let got = run(&whole(&records));
            let client: Vec<u64> = records
                .iter()
                .filter(|r| r.client && r.bytes != b"\r\n")
                .map(|r| r.ts)
                .collect();
            let server: Vec<u64> = records.iter().filter(|r| !r.client).map(|r| r.ts).collect();
            let starts: Vec<u64> = got.calls.iter().map(|c| c.start_ns).collect();
            let ends: Vec<u64> = got.calls.iter().map(|c| c.end_ns).collect();
            assert_eq!(starts, client, "{name}");
            assert_eq!(ends, server, "{name}");
        }
    }

    #[test]
    fn query_text_never_holds_argument_values() {
        for c in cases() {
            let got = run(&whole(&parse_records(c.file)));
            for call in &got.calls {
                let text = call.query_text.as_deref().unwrap_or_default();
                let op = call.operation.as_deref().unwrap_or_default();
                let rest = text.strip_prefix(op).unwrap_or("not a prefix");
                assert!(
                    rest.split(' ').skip(1).all(|p| p == "?" || p == "..."),
                    "{}: {text}",
                    c.name
                );
                for secret in [
                    "alice",
                    "bob",
                    "example",
                    "carol",
                    "secret",
                    "tracer-test",
                    "payload",
                ] {
                    assert!(
                        !text.to_ascii_lowercase().contains(secret),
                        "{}: {text}",
                        c.name
                    );
                }
            }
        }
    }

    #[test]
    fn every_split_point_gives_the_same_calls() {
        for c in cases() {
            let records = parse_records(c.file);
            let want = run(&whole(&records)).calls;
            assert_same(c.name, "bytewise", &run(&bytewise(&records)), &want);
            let total: usize = records.iter().map(|r| r.bytes.len()).sum();
            if total > 8 * 1024 {
                continue; // quadratic: the bytewise run covers these
            }
            for (i, r) in records.iter().enumerate() {
                for at in 1..r.bytes.len() {
                    let what = format!("record {i} split at {at}");
                    assert_same(c.name, &what, &run(&split_at(&records, i, at)), &want);
                }
            }
        }
    }

    #[test]
    fn gaps_inside_bulk_payloads_give_the_same_calls() {
        let mut gapped = 0;
        for c in cases() {
            let records = parse_records(c.file);
            let want = run(&whole(&records)).calls;
            type Offset = fn(usize) -> usize;
            let starts: [(&str, Offset); 4] = [
                ("at the start", |_| 0),
                ("after one byte", |_| 1),
                ("in the middle", |len| len / 2),
                ("at the last byte", |len| len - 1),
            ];
            for (what, k) in starts {
                let gaps = gap_payloads(&records, 0, k);
                gapped += gaps.iter().map(Vec::len).sum::<usize>();
                let fed = with_gaps(&records, &gaps);
                assert_same(c.name, what, &run(&fed), &want);
                // Gapped and then cut into single bytes.
                let mut bytes = Vec::new();
                for f in &fed {
                    let n = f.chunk.bytes.len();
                    if n == 0 {
                        bytes.push(*f);
                    }
                    for (j, b) in f.chunk.bytes.iter().enumerate() {
                        bytes.push(Fed {
                            client: f.client,
                            chunk: Chunk {
                                bytes: std::slice::from_ref(b),
                                len: if j + 1 == n { f.chunk.len - j } else { 1 },
                                ts_ns: f.chunk.ts_ns,
                            },
                        });
                    }
                }
                assert_same(c.name, &format!("{what}, bytewise"), &run(&bytes), &want);
            }
        }
        assert!(gapped > 1000, "only {gapped} payloads gapped");
    }

    #[test]
    fn capture_limit_skips_large_values_exactly() {
        let c = find_case("large_value");
        let records = parse_records(c.file);
        let want = run(&whole(&records)).calls;
        // Every record of the handshake is at most 146 bytes: it stays whole.
        for limit in [256, 1024, 4096] {
            let fed: Vec<Fed<'_>> = records
                .iter()
                .map(|r| Fed {
                    client: r.client,
                    chunk: Chunk {
                        bytes: &r.bytes[..r.bytes.len().min(limit)],
                        len: r.bytes.len(),
                        ts_ns: r.ts,
                    },
                })
                .collect();
            let got = run(&fed);
            // MGET's 20 kB reply ends with `$-1` for the missing key: a gap over that
            // framing loses sync; everything else is skipped by length.
            assert_eq!(
                got.errors,
                [RedisError::SyncLost {
                    direction: Direction::Server,
                    gap: 20024 - limit,
                    dropped: 1,
                }],
                "limit {limit}"
            );
            let mut expected = want.clone();
            let mget = expected
                .iter()
                .position(|c| c.operation.as_deref() == Some("MGET"))
                .unwrap();
            expected.remove(mget);
            assert_eq!(got.calls, expected, "limit {limit}");
        }
    }

    // ---- hand-made streams ---------------------------------------------------------

    /// Feeds `client` then `server` as one chunk each (ts 1 and 2).
    fn exchange(client: &[u8], server: &[u8]) -> (RedisDecoder, Decoded) {
        let mut dec = RedisDecoder::new();
        let mut decoded = Decoded::default();
        for fed in [
            Fed {
                client: true,
                chunk: Chunk::whole(client, 1),
            },
            Fed {
                client: false,
                chunk: Chunk::whole(server, 2),
            },
        ] {
            feed_one(&mut dec, &fed, &mut decoded);
        }
        (dec, decoded)
    }

    fn ops(calls: &[DbCall]) -> Vec<(Option<&str>, Option<&str>, Option<u64>)> {
        calls
            .iter()
            .map(|c| (c.operation.as_deref(), c.error_code.as_deref(), c.rows))
            .collect()
    }

    #[test]
    fn resp3_types_each_complete_one_call() {
        let replies: &[(&[u8], Option<&str>, Option<u64>)] = &[
            (b"+OK\r\n", None, None),
            (b"-ERR no\r\n", Some("ERR"), None),
            (b":-12\r\n", None, None),
            (b"$5\r\nhello\r\n", None, None),
            (b"$-1\r\n", None, None),
            (b"*-1\r\n", None, None),
            (b"*0\r\n", None, Some(0)),
            (b"*2\r\n:1\r\n*1\r\n+x\r\n", None, Some(2)),
            (b"_\r\n", None, None),
            (b",3.14\r\n", None, None),
            (b",-inf\r\n", None, None),
            (b"#f\r\n", None, None),
            (b"(3492890328409238509324850943850943825024385\r\n", None, None),
            (b"!21\r\nSYNTAX invalid syntax\r\n", Some("SYNTAX"), None),
            (b"=15\r\ntxt:Some string\r\n", None, None),
            (b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n", None, Some(2)),
            (b"~3\r\n+a\r\n+b\r\n+c\r\n", None, Some(3)),
            (b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n*2\r\n:2039123\r\n:9543892\r\n", None, Some(2)),
            (b"*2\r\n|1\r\n+ttl\r\n:3600\r\n:1\r\n:2\r\n", None, Some(2)),
            (b"$?\r\n;4\r\nHell\r\n;5\r\no wor\r\n;1\r\nd\r\n;0\r\n", None, None),
            (b"*?\r\n:1\r\n:2\r\n:3\r\n.\r\n", None, Some(3)),
            (b"%?\r\n+a\r\n:1\r\n+b\r\n:2\r\n.\r\n", None, Some(2)),
            (b"~?\r\n*?\r\n.\r\n$?\r\n;0\r\n.\r\n", None, Some(2)),
            (b">2\r\n+invalidate\r\n*1\r\n$1\r\nk\r\n+PONG\r\n", None, None),
            (b"-MOVED 3999 127.0.0.1:6381\r\n", Some("MOVED"), None),
            (b"-lower case message\r\n", Some("ERR"), None),
            (b"-\r\n", Some("ERR"), None),
        ];
        for &(reply, error, rows) in replies {
            let (dec, got) = exchange(b"*1\r\n$4\r\nPING\r\n", reply);
            assert!(got.errors.is_empty(), "{reply:?}: {:?}", got.errors);
            assert_eq!(
                ops(&got.calls),
                [(Some("PING"), error, rows)],
                "{:?}",
                String::from_utf8_lossy(reply)
            );
            assert!(!dec.in_flight());
            // Cut anywhere, the same.
            for at in 1..reply.len() {
                let mut dec = RedisDecoder::new();
                let mut calls = Vec::new();
                dec.client(&Chunk::whole(b"*1\r\n$4\r\nPING\r\n", 1), &mut calls)
                    .unwrap();
                dec.server(&Chunk::whole(&reply[..at], 2), &mut calls)
                    .unwrap();
                dec.server(&Chunk::whole(&reply[at..], 2), &mut calls)
                    .unwrap();
                assert_eq!(calls, got.calls);
            }
        }
    }

    #[test]
    fn pushes_between_pipelined_replies_complete_nothing() {
        let (dec, got) = exchange(
            b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*2\r\n$3\r\nGET\r\n$1\r\nb\r\n",
            b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\na\r\n$1\r\n1\r\n>3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nx\r\n$1\r\n2\r\n",
        );
        assert_eq!(
            ops(&got.calls),
            [(Some("GET"), None, None), (Some("GET"), None, None)]
        );
        assert!(!dec.in_flight());
        assert!(dec.resp3, "a push proves RESP3");
    }

    #[test]
    fn resp2_subscriber_mode_messages_and_confirmations() {
        let client = b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$1\r\nb\r\n*1\r\n$4\r\nPING\r\n";
        let server: &[u8] = b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n\
*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$5\r\nhello\r\n\
*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n\
*4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$1\r\nb\r\n$3\r\nbye\r\n\
*2\r\n$4\r\npong\r\n$0\r\n\r\n";
        let (dec, got) = exchange(client, server);
        assert_eq!(
            ops(&got.calls),
            [
                (Some("SUBSCRIBE"), None, None),
                (Some("PING"), None, Some(2))
            ]
        );
        assert!(dec.subscribed);
        assert!(!dec.in_flight());

        // Unsubscribing from everything leaves subscriber mode: arrays are replies again.
        let mut dec = dec;
        let mut calls = Vec::new();
        dec.client(
            &Chunk::whole(b"*1\r\n$11\r\nUNSUBSCRIBE\r\n", 3),
            &mut calls,
        )
        .unwrap();
        dec.server(
            &Chunk::whole(b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n", 4),
            &mut calls,
        )
        .unwrap();
        assert!(!dec.subscribed);
        dec.client(
            &Chunk::whole(b"*2\r\n$6\r\nLRANGE\r\n$1\r\nk\r\n", 5),
            &mut calls,
        )
        .unwrap();
        dec.server(&Chunk::whole(b"*1\r\n$7\r\nmessage\r\n", 6), &mut calls)
            .unwrap();
        assert_eq!(
            ops(&calls),
            [
                (Some("UNSUBSCRIBE"), None, None),
                (Some("LRANGE"), None, Some(1))
            ]
        );
    }

    #[test]
    fn pipelined_subscribes_each_complete_at_their_own_first_confirmation() {
        let client = b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$1\r\nb\r\n*2\r\n$10\r\nPSUBSCRIBE\r\n$2\r\nn*\r\n*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n";
        let server = b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n*3\r\n$10\r\npsubscribe\r\n$2\r\nn*\r\n:3\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:4\r\n";
        let (dec, got) = exchange(client, server);
        assert_eq!(
            ops(&got.calls),
            [
                (Some("SUBSCRIBE"), None, None),
                (Some("PSUBSCRIBE"), None, None),
                (Some("SUBSCRIBE"), None, None)
            ]
        );
        assert!(!dec.in_flight());
    }

    #[test]
    fn transactions_set_and_clear_the_status() {
        let mut dec = RedisDecoder::new();
        let mut calls = Vec::new();
        assert_eq!(dec.tx_status(), TxStatus::Unknown);
        assert_eq!(dec.namespace(), None);
        dec.client(&Chunk::whole(b"*1\r\n$5\r\nMULTI\r\n", 1), &mut calls)
            .unwrap();
        assert_eq!(
            dec.tx_status(),
            TxStatus::Unknown,
            "only MULTI's OK opens it"
        );
        assert!(dec.in_flight());
        dec.server(&Chunk::whole(b"+OK\r\n", 2), &mut calls)
            .unwrap();
        assert_eq!(dec.tx_status(), TxStatus::InTransaction);
        assert!(!dec.in_flight());
        dec.client(
            &Chunk::whole(
                b"*2\r\n$4\r\nINCR\r\n$1\r\nx\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n7\r\n",
                3,
            ),
            &mut calls,
        )
        .unwrap();
        dec.server(&Chunk::whole(b"+QUEUED\r\n+QUEUED\r\n", 4), &mut calls)
            .unwrap();
        assert_eq!(dec.tx_status(), TxStatus::InTransaction);
        assert_eq!(dec.namespace(), Some("0"), "SELECT only runs at EXEC");
        dec.client(&Chunk::whole(b"*1\r\n$4\r\nEXEC\r\n", 5), &mut calls)
            .unwrap();
        dec.server(&Chunk::whole(b"*2\r\n:1\r\n+OK\r\n", 6), &mut calls)
            .unwrap();
        assert_eq!(dec.tx_status(), TxStatus::Unknown);
        assert_eq!(dec.namespace(), Some("7"));
        assert_eq!(
            ops(&calls),
            [
                (Some("MULTI"), None, None),
                (Some("INCR"), None, None),
                (Some("SELECT"), None, None),
                (Some("EXEC"), None, Some(2))
            ]
        );

        // DISCARD closes it too; a watched key makes EXEC answer a null array.
        for (end, reply) in [
            (&b"*1\r\n$7\r\nDISCARD\r\n"[..], &b"+OK\r\n"[..]),
            (b"*1\r\n$4\r\nEXEC\r\n", b"*-1\r\n"),
        ] {
            let mut calls = Vec::new();
            dec.client(&Chunk::whole(b"*1\r\n$5\r\nMULTI\r\n", 7), &mut calls)
                .unwrap();
            dec.server(&Chunk::whole(b"+OK\r\n", 8), &mut calls)
                .unwrap();
            assert_eq!(dec.tx_status(), TxStatus::InTransaction);
            dec.client(&Chunk::whole(end, 9), &mut calls).unwrap();
            dec.server(&Chunk::whole(reply, 10), &mut calls).unwrap();
            assert_eq!(dec.tx_status(), TxStatus::Unknown);
            assert_eq!(calls.len(), 2);
        }

        // A nested MULTI is an error and changes nothing; RESET ends everything.
        let mut calls = Vec::new();
        dec.client(
            &Chunk::whole(
                b"*1\r\n$5\r\nMULTI\r\n*1\r\n$5\r\nMULTI\r\n*1\r\n$5\r\nRESET\r\n",
                11,
            ),
            &mut calls,
        )
        .unwrap();
        dec.server(
            &Chunk::whole(b"+OK\r\n-ERR MULTI calls can not be nested\r\n", 12),
            &mut calls,
        )
        .unwrap();
        assert_eq!(dec.tx_status(), TxStatus::InTransaction);
        dec.server(&Chunk::whole(b"+RESET\r\n", 13), &mut calls)
            .unwrap();
        assert_eq!(dec.tx_status(), TxStatus::Unknown);
        assert_eq!(dec.namespace(), Some("0"));
        assert_eq!(ops(&calls)[1], (Some("MULTI"), Some("ERR"), None));
    }

    #[test]
    fn select_changes_the_namespace_of_later_calls_only_when_it_succeeds() {
        let (dec, got) = exchange(
            b"*2\r\n$6\r\nSELECT\r\n$1\r\n4\r\n*1\r\n$4\r\nPING\r\n*2\r\n$6\r\nSELECT\r\n$3\r\n999\r\n*1\r\n$4\r\nPING\r\n",
            b"+OK\r\n+PONG\r\n-ERR DB index is out of range\r\n+PONG\r\n",
        );
        let ns: Vec<&str> = got
            .calls
            .iter()
            .map(|c| c.namespace.as_deref().unwrap())
            .collect();
        assert_eq!(ns, ["0", "4", "4", "4"]);
        assert_eq!(dec.namespace(), Some("4"));
    }

    #[test]
    fn monitor_stops_decoding_for_good() {
        let mut dec = RedisDecoder::new();
        let mut calls = Vec::new();
        dec.client(&Chunk::whole(b"*1\r\n$7\r\nMONITOR\r\n", 1), &mut calls)
            .unwrap();
        dec.server(
            &Chunk::whole(
                b"+OK\r\n+1700000000.1 [0 127.0.0.1:1] \"SET\" \"k\" \"secret\"\r\n",
                2,
            ),
            &mut calls,
        )
        .unwrap();
        assert!(dec.is_stopped());
        assert_eq!(ops(&calls), [(Some("MONITOR"), None, None)]);
        // Nothing later is decoded, garbage included.
        for bytes in [
            &b"*1\r\n$4\r\nPING\r\n"[..],
            b"\x00\xff garbage",
            b"+PONG\r\n",
        ] {
            dec.client(&Chunk::whole(bytes, 3), &mut calls).unwrap();
            dec.server(&Chunk::whole(bytes, 4), &mut calls).unwrap();
        }
        assert_eq!(calls.len(), 1);
        assert!(!dec.in_flight());
        // A refused MONITOR does not stop anything.
        let (dec, got) = exchange(b"*1\r\n$7\r\nMONITOR\r\n", b"-NOPERM no\r\n");
        assert!(!dec.is_stopped());
        assert_eq!(ops(&got.calls), [(Some("MONITOR"), Some("NOPERM"), None)]);
    }

    #[test]
    fn client_reply_off_and_skip_emit_unanswered_commands_at_once() {
        let mut dec = RedisDecoder::new();
        let mut calls = Vec::new();
        dec.client(
            &Chunk::whole(b"*3\r\n$6\r\nclient\r\n$5\r\nreply\r\n$4\r\nskip\r\n*2\r\n$4\r\nINCR\r\n$1\r\nx\r\n*1\r\n$4\r\nPING\r\n", 5),
            &mut calls,
        )
        .unwrap();
        assert_eq!(
            ops(&calls),
            [
                (Some("CLIENT REPLY"), None, None),
                (Some("INCR"), None, None)
            ]
        );
        assert!(calls.iter().all(|c| c.start_ns == 5 && c.end_ns == 5));
        assert_eq!(dec.pending_commands(), 1);
        dec.server(&Chunk::whole(b"+PONG\r\n", 6), &mut calls)
            .unwrap();
        assert_eq!(ops(&calls[2..]), [(Some("PING"), None, None)]);
    }

    #[test]
    fn command_names_subcommands_and_placeholders() {
        let cases: &[(&[u8], Option<&str>, Option<&str>)] = &[
            (b"*1\r\n$4\r\nping\r\n", Some("PING"), Some("PING")),
            (
                b"*3\r\n$6\r\nconfig\r\n$3\r\nget\r\n$9\r\nmaxmemory\r\n",
                Some("CONFIG GET"),
                Some("CONFIG GET ?"),
            ),
            (
                b"*3\r\n$5\r\nXINFO\r\n$6\r\nSTREAM\r\n$1\r\ns\r\n",
                Some("XINFO STREAM"),
                Some("XINFO STREAM ?"),
            ),
            (
                b"*2\r\n$6\r\nCLIENT\r\n$4\r\nLIST\r\n",
                Some("CLIENT LIST"),
                Some("CLIENT LIST"),
            ),
            (b"*1\r\n$6\r\nCLIENT\r\n", Some("CLIENT"), Some("CLIENT")),
            // A subcommand that does not look like one is an argument.
            (
                b"*2\r\n$6\r\nOBJECT\r\n$8\r\nuser:123\r\n",
                Some("OBJECT"),
                Some("OBJECT ?"),
            ),
            // Not a container: the second word is a key, never shown.
            (
                b"*2\r\n$3\r\nGET\r\n$6\r\nSECRET\r\n",
                Some("GET"),
                Some("GET ?"),
            ),
            (
                b"*3\r\n$8\r\nJSON.SET\r\n$1\r\nk\r\n$1\r\n$\r\n",
                Some("JSON.SET"),
                Some("JSON.SET ? ?"),
            ),
            (b"*2\r\n$3\r\n\x00\xff\x01\r\n$1\r\nk\r\n", None, None),
            (
                b"*1\r\n$40\r\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n",
                None,
                None,
            ),
            (b"*1\r\n$0\r\n\r\n", None, None),
            (b"GET \"a key\" 'x y'\r\n", Some("GET"), Some("GET ? ?")),
            (
                b"  hset  k f \"v\\\" q\"\n",
                Some("HSET"),
                Some("HSET ? ? ?"),
            ),
        ];
        for &(command, op, query) in cases {
            let (_, got) = exchange(command, b"+OK\r\n");
            assert!(got.errors.is_empty(), "{:?}", got.errors);
            assert_eq!(got.calls.len(), 1, "{command:?}");
            assert_eq!(got.calls[0].operation.as_deref(), op, "{command:?}");
            assert_eq!(got.calls[0].query_text.as_deref(), query, "{command:?}");
        }

        let mut many = b"*101\r\n$4\r\nMSET\r\n".to_vec();
        for _ in 0..100 {
            many.extend_from_slice(b"$1\r\nx\r\n");
        }
        let (_, got) = exchange(&many, b"+OK\r\n");
        let text = got.calls[0].query_text.as_deref().unwrap();
        assert_eq!(text, format!("MSET{} ...", " ?".repeat(64)));
    }

    #[test]
    fn empty_and_null_commands_get_no_call() {
        let (dec, got) = exchange(
            b"*0\r\n*-1\r\n\r\n\n  \r\n*1\r\n$4\r\nPING\r\n",
            b"+PONG\r\n",
        );
        assert_eq!(ops(&got.calls), [(Some("PING"), None, None)]);
        assert!(!dec.in_flight());
    }

    #[test]
    fn bulk_values_are_skipped_through_gaps_without_being_buffered() {
        // SET k <1 MiB>: 40 bytes captured, the rest a gap, then GET in a new write.
        let header = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1048576\r\n";
        let mut captured = header.to_vec();
        captured.extend_from_slice(&[b'*'; 40]);
        let mut dec = RedisDecoder::new();
        let mut calls = Vec::new();
        let chunk = Chunk {
            bytes: &captured,
            len: header.len() + 1048576 + 2,
            ts_ns: 1,
        };
        dec.client(&chunk, &mut calls).unwrap();
        dec.client(
            &Chunk::whole(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", 2),
            &mut calls,
        )
        .unwrap();
        // The reply: a header, 1 MiB in three chunks with gaps, the CRLF cut in two.
        dec.server(&Chunk::whole(b"+OK\r\n$1048576\r\nab", 3), &mut calls)
            .unwrap();
        dec.server(
            &Chunk {
                bytes: b"cd",
                len: 500_000,
                ts_ns: 4,
            },
            &mut calls,
        )
        .unwrap();
        dec.server(
            &Chunk {
                bytes: b"",
                len: 548_574,
                ts_ns: 5,
            },
            &mut calls,
        )
        .unwrap();
        dec.server(
            &Chunk {
                bytes: b"\r",
                len: 1,
                ts_ns: 5,
            },
            &mut calls,
        )
        .unwrap();
        assert!(dec.in_flight());
        dec.server(&Chunk::whole(b"\n", 6), &mut calls).unwrap();
        assert_eq!(
            ops(&calls),
            [(Some("SET"), None, None), (Some("GET"), None, None)]
        );
        assert_eq!((calls[1].start_ns, calls[1].end_ns), (2, 6));
        assert!(!dec.in_flight());
        assert!(
            mem::size_of::<RedisDecoder>() < 1024,
            "{}",
            mem::size_of::<RedisDecoder>()
        );
    }

    #[test]
    fn gap_over_framing_loses_sync_drops_pending_and_resyncs() {
        let mut dec = RedisDecoder::new();
        let mut calls = Vec::new();
        // Client: the second command's length line falls in the gap.
        dec.client(
            &Chunk::whole(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n", 1),
            &mut calls,
        )
        .unwrap();
        let err = dec
            .client(
                &Chunk {
                    bytes: b"*2\r\n$3\r\nGET\r\n$",
                    len: 20,
                    ts_ns: 2,
                },
                &mut calls,
            )
            .unwrap_err();
        assert_eq!(
            err,
            RedisError::SyncLost {
                direction: Direction::Client,
                gap: 6,
                dropped: 1
            }
        );
        assert_eq!(dec.dropped_commands(), 1);
        // Mid-command chunks are skipped silently; the replies to the lost commands are
        // not paired with anything.
        dec.client(&Chunk::whole(b"\r\nx\r\n", 3), &mut calls)
            .unwrap();
        dec.server(&Chunk::whole(b"$1\r\n1\r\n$1\r\n2\r\n", 4), &mut calls)
            .unwrap();
        assert!(calls.is_empty());
        assert_eq!(dec.unmatched_replies(), 2);
        dec.client(&Chunk::whole(b"*1\r\n$4\r\nPING\r\n", 5), &mut calls)
            .unwrap();
        dec.server(&Chunk::whole(b"+PONG\r\n", 6), &mut calls)
            .unwrap();
        assert_eq!(ops(&calls), [(Some("PING"), None, None)]);

        // Server: a gap over the end of a reply and the start of the next.
        let mut calls = Vec::new();
        dec.client(
            &Chunk::whole(b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n", 7),
            &mut calls,
        )
        .unwrap();
        let err = dec
            .server(
                &Chunk {
                    bytes: b"+PO",
                    len: 14,
                    ts_ns: 8,
                },
                &mut calls,
            )
            .unwrap_err();
        assert_eq!(
            err,
            RedisError::SyncLost {
                direction: Direction::Server,
                gap: 11,
                dropped: 2
            }
        );
        assert!(!dec.in_flight());
        // A chunk not starting with a type byte is skipped; the next one resyncs.
        dec.server(&Chunk::whole(b"NG\r\n", 9), &mut calls).unwrap();
        dec.client(&Chunk::whole(b"*1\r\n$4\r\nPING\r\n", 10), &mut calls)
            .unwrap();
        dec.server(&Chunk::whole(b"+PONG\r\n", 11), &mut calls)
            .unwrap();
        assert_eq!(ops(&calls), [(Some("PING"), None, None)]);
    }

    #[test]
    fn garbage_is_an_error_then_decoding_recovers() {
        let client_garbage: &[(&[u8], &str)] = &[
            (b"*x\r\n", "number"),
            (b"*2\r\n:3\r\n", "'$'"),
            (b"*1\r\n$-4\r\n", "negative"),
            (b"*1\r\n$3\r\nGETX\r\n", "CRLF"),
            (b"*1\r\n$999999999999\r\n", "limit"),
            (b"*99999999999\r\n", "limit"),
            (b"*1\r\n$99999999999999999999\r\n", "64 bits"),
            (b"*1\r\r", "CR not followed"),
            (b"*?\r\n", "streamed"),
        ];
        for &(garbage, needle) in client_garbage {
            let mut dec = RedisDecoder::new();
            let mut calls = Vec::new();
            dec.client(&Chunk::whole(b"*1\r\n$4\r\nPING\r\n", 1), &mut calls)
                .unwrap();
            let err = dec
                .client(&Chunk::whole(garbage, 2), &mut calls)
                .unwrap_err();
            assert!(err.to_string().contains(needle), "{garbage:?}: {err}");
            assert!(!dec.in_flight());
            dec.server(&Chunk::whole(b"+PONG\r\n", 3), &mut calls)
                .unwrap();
            dec.client(&Chunk::whole(b"*1\r\n$4\r\nPING\r\n", 4), &mut calls)
                .unwrap();
            dec.server(&Chunk::whole(b"+PONG\r\n", 5), &mut calls)
                .unwrap();
            assert_eq!(calls.len(), 1, "{garbage:?}");
            assert_eq!((calls[0].start_ns, calls[0].end_ns), (4, 5));
        }
        let server_garbage: &[(&[u8], &str)] = &[
            (b"hello\r\n", "type byte"),
            (b":12a\r\n", "number"),
            (b"$3\r\nabcd\r\n", "CRLF"),
            (b"*-5\r\n", "negative"),
            (b".\r\n", "streamed aggregate"),
            (b"$?\r\n:1\r\n", "';'"),
            (b":?\r\n", "streamed"),
            (b"*99999999999\r\n", "limit"),
        ];
        for &(garbage, needle) in server_garbage {
            let mut dec = RedisDecoder::new();
            let mut calls = Vec::new();
            dec.client(&Chunk::whole(b"*1\r\n$4\r\nPING\r\n", 1), &mut calls)
                .unwrap();
            let err = dec
                .server(&Chunk::whole(garbage, 2), &mut calls)
                .unwrap_err();
            assert!(err.to_string().contains(needle), "{garbage:?}: {err}");
            assert_eq!(dec.pending_commands(), 0);
            dec.client(&Chunk::whole(b"*1\r\n$4\r\nPING\r\n", 3), &mut calls)
                .unwrap();
            dec.server(&Chunk::whole(b"+PONG\r\n", 4), &mut calls)
                .unwrap();
            assert_eq!(ops(&calls), [(Some("PING"), None, None)], "{garbage:?}");
        }
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_an_error() {
        let mut deep = b"*1\r\n".repeat(MAX_DEPTH);
        deep.extend_from_slice(b":1\r\n");
        let (_, got) = exchange(b"*1\r\n$4\r\nPING\r\n", &deep);
        assert!(got.errors.is_empty());
        assert_eq!(got.calls.len(), 1);
        let deeper = [&b"*1\r\n"[..], &deep].concat();
        let (_, got) = exchange(b"*1\r\n$4\r\nPING\r\n", &deeper);
        assert_eq!(got.errors, [RedisError::TooDeep { limit: MAX_DEPTH }]);
    }

    #[test]
    fn errors_never_contain_traffic_bytes() {
        let marker = b"Zq9Xk";
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for prefix in [
            &b""[..],
            b"*",
            b"*1\r\n",
            b"*1\r\n$",
            b"$",
            b":",
            b"+",
            b"-",
            b"*1\r\n$5\r\n",
        ] {
            inputs.push([prefix, marker, b"\r\n"].concat());
        }
        inputs.push([&b"+"[..], &marker.repeat(MAX_LINE_BYTES)].concat());
        for input in &inputs {
            let mut dec = RedisDecoder::new();
            let mut calls = Vec::new();
            for result in [
                dec.client(&Chunk::whole(input, 1), &mut calls),
                dec.server(&Chunk::whole(input, 2), &mut calls),
            ] {
                if let Err(e) = result {
                    let text = format!("{e} {e:?} {dec:?}");
                    assert!(!text.contains("Zq9Xk"), "{text}");
                }
            }
        }
    }

    #[test]
    fn the_queue_is_bounded_and_overflow_keeps_replies_aligned() {
        let mut dec = RedisDecoder::new();
        let mut calls = Vec::new();
        let n = MAX_PENDING_COMMANDS + 10;
        let mut commands = Vec::new();
        for _ in 0..n {
            commands.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        }
        commands.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        dec.client(&Chunk::whole(&commands, 1), &mut calls).unwrap();
        assert_eq!(dec.pending_commands(), MAX_PENDING_COMMANDS);
        assert_eq!(dec.dropped_commands(), 11);
        let mut replies = b"$1\r\nv\r\n".repeat(n);
        replies.extend_from_slice(b"+PONG\r\n");
        dec.server(&Chunk::whole(&replies, 2), &mut calls).unwrap();
        assert_eq!(calls.len(), MAX_PENDING_COMMANDS);
        assert_eq!(calls.last().unwrap().operation.as_deref(), Some("PING"));
        assert!(!dec.in_flight());
    }

    #[test]
    fn replies_never_pair_with_later_commands() {
        let mut dec = RedisDecoder::new();
        let mut calls = Vec::new();
        dec.server(&Chunk::whole(b"+OK\r\n", 5), &mut calls)
            .unwrap();
        dec.client(&Chunk::whole(b"*1\r\n$4\r\nPING\r\n", 6), &mut calls)
            .unwrap();
        assert!(calls.is_empty());
        assert_eq!(dec.unmatched_replies(), 1);
        dec.server(&Chunk::whole(b"+PONG\r\n", 7), &mut calls)
            .unwrap();
        assert_eq!((calls[0].start_ns, calls[0].end_ns), (6, 7));
    }

    #[test]
    fn finish_forgets_pending_commands() {
        let mut dec = RedisDecoder::new();
        let mut calls = Vec::new();
        dec.client(
            &Chunk::whole(b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPI", 1),
            &mut calls,
        )
        .unwrap();
        assert!(dec.in_flight());
        assert_eq!(dec.finish(), 2);
        assert!(!dec.in_flight());
        assert_eq!(dec.finish(), 0);
        assert_eq!(dec.namespace(), None);
        // A fresh start: the rest of the cut command is not a command.
        dec.client(&Chunk::whole(b"NG\r\n*1\r\n$4\r\nECHO\r\n", 2), &mut calls)
            .unwrap();
        assert_eq!(dec.pending_commands(), 2);
    }

    #[test]
    fn protocol_detection() {
        for yes in [
            &b"*1\r\n$4\r\nPING\r\n"[..],
            b"*3\r\n$3",
            b"*12\r\n$",
            b"PING\r\n",
            b"ping\n",
            b"GET key\r\n",
            b"hgetall h\r\n",
        ] {
            assert!(looks_like_command(yes), "{yes:?}");
        }
        for no in [
            &b""[..],
            b"*",
            b"*3\r\n",
            b"*\r\n$",
            b"*12345678\r\n$",
            b"+OK\r\n",
            b"GET / HTTP/1.1\r\n",
            b"PINGPONG\r\n",
            b"PING",
            b"\x16\x03\x01",
            b"SELECT",
        ] {
            assert!(!looks_like_command(no), "{no:?}");
        }
    }

    #[test]
    fn subscription_names() {
        let parse = |s: &[u8]| Subscription::parse(s).map(|s| (s.family, s.unsubscribe));
        assert_eq!(parse(b"subscribe"), Some((Family::Channel, false)));
        assert_eq!(parse(b"UNSUBSCRIBE"), Some((Family::Channel, true)));
        assert_eq!(parse(b"psubscribe"), Some((Family::Pattern, false)));
        assert_eq!(parse(b"punsubscribe"), Some((Family::Pattern, true)));
        assert_eq!(parse(b"SSUBSCRIBE"), Some((Family::Shard, false)));
        assert_eq!(parse(b"sunsubscribe"), Some((Family::Shard, true)));
        for no in [
            &b"subscriber"[..],
            b"message",
            b"",
            b"s",
            b"un",
            b"xsubscribe",
        ] {
            assert_eq!(parse(no), None, "{no:?}");
        }
    }

    // ---- never panics --------------------------------------------------------------

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

    /// Random chunks of one direction's bytes; with `gaps`, some chunks leave a suffix
    /// uncaptured.
    fn random_chunks<'a>(
        rng: &mut Rng,
        client: bool,
        bytes: &'a [u8],
        gaps: bool,
        ts: &mut u64,
    ) -> Vec<Fed<'a>> {
        let mut chunks = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let max = [2, 8, 64, 512, 8192][rng.below(5)];
            let size = (1 + rng.below(max)).min(bytes.len() - pos);
            let gap = if gaps && rng.below(4) == 0 {
                rng.below(300).min(bytes.len() - pos - size)
            } else {
                0
            };
            *ts += 1;
            chunks.push(Fed {
                client,
                chunk: Chunk {
                    bytes: &bytes[pos..pos + size],
                    len: size + gap,
                    ts_ns: *ts,
                },
            });
            pos += size + gap;
        }
        chunks
    }

    fn check_invariants(dec: &RedisDecoder, decoded: &Decoded) {
        for call in &decoded.calls {
            assert!(call.start_ns <= call.end_ns, "{call:?}");
            assert_eq!(call.system, DbSystem::Redis);
            if let Some(text) = &call.query_text {
                assert!(text.len() <= 2 * WORD_BYTES + 1 + 2 * MAX_QUERY_PLACEHOLDERS as usize + 4);
            }
            if let Some(code) = &call.error_code {
                assert!(code.len() <= WORD_BYTES);
            }
        }
        assert!(dec.stack.len() <= MAX_DEPTH);
        assert!(dec.pending.len() <= MAX_PENDING_COMMANDS);
    }

    #[test]
    fn random_splits_gaps_and_mutations_never_panic() {
        let cases = cases();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..1500 {
            let c = &cases[rng.below(cases.len())];
            let gaps = round % 3 == 1;
            let mutate = round % 3 == 2;
            let mut records: Vec<(bool, u64, Vec<u8>)> = parse_records(c.file)
                .iter()
                .map(|r| (r.client, r.ts, r.bytes.to_vec()))
                .collect();
            if mutate {
                for _ in 0..1 + rng.below(6) {
                    let r = rng.below(records.len());
                    let bytes = &mut records[r].2;
                    if bytes.is_empty() {
                        continue;
                    }
                    let at = rng.below(bytes.len());
                    match rng.below(3) {
                        0 => bytes[at] = rng.next() as u8,
                        1 => bytes.insert(at, b"\r\n*$:+-?;.>|%~0123456789"[rng.below(24)]),
                        _ => {
                            bytes.remove(at);
                        }
                    }
                }
            }
            // Each record cut at random, in the recorded order (the causal one).
            let mut dec = RedisDecoder::new();
            let mut decoded = Decoded::default();
            for (client, ts, bytes) in &records {
                let mut local_ts = *ts;
                for mut fed in random_chunks(&mut rng, *client, bytes, gaps, &mut local_ts) {
                    fed.chunk.ts_ns = *ts;
                    feed_one(&mut dec, &fed, &mut decoded);
                }
                check_invariants(&dec, &decoded);
            }
            dec.finish();
            assert!(!dec.in_flight());
            if !gaps && !mutate {
                assert!(
                    decoded.errors.is_empty(),
                    "{}: {:?}",
                    c.name,
                    decoded.errors
                );
                let want = run(&whole(&parse_records(c.file))).calls;
                assert_eq!(decoded.calls, want, "{} round {round}", c.name);
            }
        }
    }

    #[test]
    fn random_token_soup_never_panics() {
        const FRAGMENTS: &[&[u8]] = &[
            b"*1\r\n",
            b"*2\r\n",
            b"*3\r\n",
            b"*-1\r\n",
            b"*?\r\n",
            b"$3\r\nGET\r\n",
            b"$5\r\nMULTI\r\n",
            b"$4\r\nEXEC\r\n",
            b"$9\r\nSUBSCRIBE\r\n",
            b"$9\r\nsubscribe\r\n",
            b"$7\r\nmessage\r\n",
            b"$7\r\nMONITOR\r\n",
            b"$6\r\nSELECT\r\n",
            b"$1\r\n9\r\n",
            b"$-1\r\n",
            b"$?\r\n",
            b";3\r\nabc\r\n",
            b";0\r\n",
            b".\r\n",
            b"+OK\r\n",
            b"+QUEUED\r\n",
            b"-ERR x\r\n",
            b"-WRONGTYPE y\r\n",
            b":1\r\n",
            b":0\r\n",
            b">3\r\n",
            b"|1\r\n",
            b"%1\r\n",
            b"~2\r\n",
            b"_\r\n",
            b",1.5\r\n",
            b"#t\r\n",
            b"(12\r\n",
            b"!3\r\nERR\r\n",
            b"=5\r\ntxt:x\r\n",
            b"PING\r\n",
            b"SET k \"v\r\n",
            b"\r\n",
            b"$18446744073709551615\r\n",
            b"*4294967296\r\n",
            b"\x00\xff",
            b"$6\r\nCLIENT\r\n",
            b"$5\r\nREPLY\r\n",
            b"$3\r\nOFF\r\n",
            b"$4\r\nSKIP\r\n",
            b"$5\r\nRESET\r\n",
        ];
        let mut rng = Rng(42);
        for _ in 0..3000 {
            let mut streams = [Vec::new(), Vec::new()];
            for stream in &mut streams {
                for _ in 0..1 + rng.below(40) {
                    stream.extend_from_slice(FRAGMENTS[rng.below(FRAGMENTS.len())]);
                }
            }
            let mut ts = 0;
            let gaps = rng.below(2) == 0;
            let c_chunks = random_chunks(&mut rng, true, &streams[0], gaps, &mut ts);
            let s_chunks = random_chunks(&mut rng, false, &streams[1], gaps, &mut ts);
            let mut dec = RedisDecoder::new();
            let mut decoded = Decoded::default();
            // Mostly in timestamp order, sometimes not.
            let mut all: Vec<(usize, &Fed<'_>)> = c_chunks
                .iter()
                .chain(&s_chunks)
                .map(|f| (rng.below(4), f))
                .collect();
            all.sort_by_key(|&(shuffle, f)| (shuffle, f.chunk.ts_ns));
            for (_, fed) in all {
                feed_one(&mut dec, fed, &mut decoded);
                check_invariants(&dec, &decoded);
            }
            dec.finish();
        }
    }
}
