//! HTTP/1.x message framing for one direction of a TCP connection.
//!
//! An [`Http1Decoder`] is fed the [`Chunk`]s of one direction (requests from the
//! client, or responses from the server) and emits one [`Http1Message`] per message:
//! start line, the few headers the tracer needs, timestamps of the first and last
//! byte, and the body length. Only the head is ever buffered (bounded by
//! [`Http1Limits::max_head_bytes`]); bodies are skipped by length, across capture
//! gaps too, and never copied.
//!
//! # Framing
//!
//! Bodies follow RFC 9112 §6: `Transfer-Encoding: chunked` (wins over
//! `Content-Length`), then `Content-Length`; a response with neither is delimited by
//! the connection close ([`Http1Decoder::finish`]) and a request with neither has no
//! body. Responses to HEAD, 1xx, 204 and 304 have no body. 1xx interim responses are
//! messages of their own (status 100, 103, ...). `101 Switching Protocols`, and a 2xx
//! answer to CONNECT, turn the stream into a tunnel: later bytes are ignored.
//!
//! # Capture gaps
//!
//! A chunk may end in a gap of known length (bytes the kernel did not copy).
//! - Inside a `Content-Length` body, or inside the data of one chunk of a chunked
//!   body, the gap is skipped exactly.
//! - Inside a head, what was captured is parsed (the start line must be complete),
//!   the message gets `head_truncated` and, since its end is unknown,
//!   `body_sync_lost`. A request is emitted at once, ending with that chunk. A response
//!   that may have a body stays open until a later chunk *begins* with a status line
//!   (it is then emitted with the timestamp of the chunk before) or until
//!   [`Http1Decoder::finish`].
//! - Over a chunk-size line, the message gets `body_sync_lost` and stays open the same
//!   way (for both directions).
//! - Past the end of a message, or over the start of a new one, the decoder waits for
//!   a chunk that begins with a start line; chunks before it are skipped silently.
//!
//! # Errors
//!
//! Any malformed input yields an [`Http1Error`]; the message in progress is dropped and
//! the decoder skips chunks until one begins with a start line (a known method for
//! requests, `HTTP/1.x NNN` for responses). Errors and `Debug` output never contain
//! header values or other captured bytes.

use std::collections::VecDeque;
use std::fmt;
use std::mem;

use crate::Chunk;

/// Longest kept header value, in bytes (longer values are cut at a UTF-8 boundary).
pub const MAX_KEPT_VALUE_BYTES: usize = 512;
/// Longest request method accepted, in bytes.
const MAX_METHOD_BYTES: usize = 32;
/// Most request methods a response decoder queues (see
/// [`Http1Decoder::expect_response_to`]); older ones are dropped beyond it.
pub const MAX_PENDING_REQUESTS: usize = 128;
/// Head buffers that grew beyond this are freed after use instead of kept.
const HEAD_BUFFER_KEPT_BYTES: usize = 4096;

/// Methods [`looks_like_request`] recognises.
const KNOWN_METHODS: &[&[u8]] = &[
    b"GET",
    b"POST",
    b"PUT",
    b"DELETE",
    b"HEAD",
    b"OPTIONS",
    b"PATCH",
    b"CONNECT",
    b"TRACE",
    b"QUERY",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"SEARCH",
    b"REPORT",
    b"MKCALENDAR",
    b"ACL",
    b"PURGE",
];

/// Which side of the exchange a decoder reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// Client to server.
    Request,
    /// Server to client.
    Response,
}

/// Bounds on what one message may make the decoder hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Http1Limits {
    /// Longest head (start line, header fields and the blank line) in bytes; also
    /// bounds a chunk-size line and a trailer section. Default 16 KiB.
    pub max_head_bytes: usize,
    /// Most header fields in one head. Default 128.
    pub max_headers: usize,
}

impl Default for Http1Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: 16 * 1024,
            max_headers: 128,
        }
    }
}

/// The first line of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartLine {
    /// `GET /a/b?x=1 HTTP/1.1`: the target is kept exactly as on the wire (lossy
    /// UTF-8).
    Request { method: String, target: String },
    /// `HTTP/1.1 404 Not Found`: the reason phrase is not kept.
    Response { status: u16 },
}

/// The few headers the tracer needs, the first occurrence of each, each value cut at
/// [`MAX_KEPT_VALUE_BYTES`] (lossy UTF-8).
///
/// Values of Authorization, Proxy-Authorization, Cookie and Set-Cookie are never
/// stored anywhere (not even in errors or `Debug` output).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeptHeaders {
    pub host: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub user_agent: Option<String>,
    pub content_type: Option<String>,
}

/// One decoded request or response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Http1Message {
    pub start: StartLine,
    /// HTTP/1.0 → 0, HTTP/1.1 → 1.
    pub version_minor: u8,
    pub headers: KeptHeaders,
    /// Timestamp of the chunk holding the first byte.
    pub start_ns: u64,
    /// Timestamp of the chunk holding the last byte (for a message whose end was
    /// inferred, the last chunk that was counted as part of it).
    pub end_ns: u64,
    /// Body bytes seen, counted by length, gaps included. For a chunked body this is
    /// the sum of the chunk sizes (the payload, not the framing). When
    /// `body_sync_lost`, an estimate: every byte after sync was lost is counted.
    pub body_len: u64,
    /// The head was cut by a capture gap: headers may be missing.
    pub head_truncated: bool,
    /// The end of the message was inferred (from a later start line, the end of a
    /// chunk, or [`Http1Decoder::finish`]) rather than read.
    pub body_sync_lost: bool,
}

/// What made a chunk undecodable. No variant carries captured bytes.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Http1Error {
    #[error(
        "not HTTP/1.x: expected {expected}, found {found}; the stream is another protocol or was joined mid-message"
    )]
    NotHttp {
        expected: &'static str,
        found: &'static str,
    },
    #[error(
        "message head is longer than {limit} bytes (Http1Limits::max_head_bytes); raise the limit if such heads are legitimate"
    )]
    HeadTooLarge { limit: usize },
    #[error(
        "message head has more than {limit} header fields (Http1Limits::max_headers); raise the limit if such heads are legitimate"
    )]
    TooManyHeaders { limit: usize },
    #[error(
        "start line cut by a capture gap after {captured} head bytes; raise the capture size to decode it"
    )]
    StartLineCut { captured: usize },
    #[error("malformed request line: {reason}")]
    BadRequestLine { reason: &'static str },
    #[error("malformed status line: {reason}")]
    BadStatusLine { reason: &'static str },
    #[error("unsupported protocol version HTTP/{major}.{minor}: only HTTP/1.x is decoded here")]
    UnsupportedVersion { major: u8, minor: u8 },
    #[error("header field {index} of the head is malformed: {reason}")]
    BadHeader { index: usize, reason: &'static str },
    #[error("invalid Content-Length: {reason}")]
    BadContentLength { reason: &'static str },
    #[error(
        "conflicting Content-Length values {first} and {second}: a broken peer or a request smuggling attempt"
    )]
    ConflictingContentLength { first: u64, second: u64 },
    #[error("request Transfer-Encoding does not end in chunked, so its body length is unknown")]
    BadTransferEncoding,
    #[error("invalid chunk-size line in a chunked body: {reason}")]
    BadChunkSize { reason: &'static str },
    #[error("chunk size in a chunked body does not fit in 64 bits")]
    ChunkSizeOverflow,
    #[error("chunk data in a chunked body is not followed by a line ending")]
    BadChunkEnd,
    #[error(
        "chunk-size line or trailer section is longer than {limit} bytes (Http1Limits::max_head_bytes)"
    )]
    ChunkMetadataTooLarge { limit: usize },
    #[error("HTTP/1 decoder made no progress on a chunk (a decoder bug); the chunk was skipped")]
    Stalled,
}

/// How the response decoder must treat the body of the response to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestMethod {
    Head,
    Connect,
    Other,
}

/// How the body of a parsed head is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    NoBody,
    Length(u64),
    Chunked,
    UntilClose,
    Tunnel,
}

/// Where the decoder is in the byte stream.
#[derive(Debug)]
/// A message in progress is boxed: a decoder between messages (an idle
/// keep-alive connection) stays small.
enum State {
    /// Between messages: the next non-CR/LF byte starts a head.
    Start,
    /// Inside a head; its bytes so far are in `Http1Decoder::head` (unless the whole
    /// head is in the chunk being read).
    Head { start_ns: u64, last_ns: u64 },
    /// Skipping a `Content-Length` body; `remaining > 0`.
    Length {
        msg: Box<Http1Message>,
        remaining: u64,
    },
    /// Inside a chunked body.
    Chunked {
        msg: Box<Http1Message>,
        body: ChunkedBody,
    },
    /// A response body delimited by the connection close.
    UntilClose { msg: Box<Http1Message> },
    /// A message whose end is unknown: it lasts until a chunk begins with a start line.
    SyncLost { msg: Box<Http1Message> },
    /// No message: chunks are skipped until one begins with a start line.
    Resync,
    /// After `101 Switching Protocols` or a CONNECT tunnel: everything is ignored.
    Tunnel,
}

/// Position inside a chunked body (RFC 9112 §7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkedBody {
    /// Reading the hex digits of a chunk-size line.
    Size { value: u64, line_bytes: usize },
    /// Skipping the rest of a chunk-size line (extensions, whitespace, CR) up to LF.
    SizeLineRest { value: u64, line_bytes: usize },
    /// Skipping chunk data.
    Data { remaining: u64 },
    /// Expecting the CRLF (or bare LF) after chunk data.
    DataEnd,
    /// Got the CR after chunk data, expecting LF.
    DataEndLf,
    /// Reading trailer lines until an empty one.
    Trailers { line_bytes: usize, total: usize },
}

/// What one [`ChunkedBody::feed`] call did.
struct ChunkedStep {
    consumed: usize,
    data: u64,
    done: bool,
}

impl ChunkedBody {
    const START: Self = Self::Size {
        value: 0,
        line_bytes: 0,
    };

    /// The state after the LF ending a chunk-size line.
    fn after_size_line(value: u64) -> Self {
        if value == 0 {
            Self::Trailers {
                line_bytes: 0,
                total: 0,
            }
        } else {
            Self::Data { remaining: value }
        }
    }

    /// Consumes a prefix of `bytes`, stopping early at the end of the body.
    fn feed(&mut self, bytes: &[u8], limit: usize) -> Result<ChunkedStep, Http1Error> {
        let mut i = 0usize;
        let mut data = 0u64;
        while let Some(&b) = bytes.get(i) {
            match self {
                Self::Size { value, line_bytes } => {
                    if let Some(digit) = hex_value(b) {
                        *value = value
                            .checked_mul(16)
                            .and_then(|v| v.checked_add(u64::from(digit)))
                            .ok_or(Http1Error::ChunkSizeOverflow)?;
                        *line_bytes = line_bytes.saturating_add(1);
                        if *line_bytes > limit {
                            return Err(Http1Error::ChunkMetadataTooLarge { limit });
                        }
                        i += 1;
                    } else if *line_bytes == 0 {
                        return Err(Http1Error::BadChunkSize {
                            reason: "the line does not start with a hex digit",
                        });
                    } else {
                        match b {
                            b'\n' => *self = Self::after_size_line(*value),
                            b';' | b' ' | b'\t' | b'\r' => {
                                *self = Self::SizeLineRest {
                                    value: *value,
                                    line_bytes: line_bytes.saturating_add(1),
                                }
                            }
                            _ => {
                                return Err(Http1Error::BadChunkSize {
                                    reason: "unexpected byte after the chunk size",
                                });
                            }
                        }
                        i += 1;
                    }
                }
                Self::SizeLineRest { value, line_bytes } => {
                    let rest = tail(bytes, i);
                    let (skipped, found_lf) = match rest.iter().position(|&c| c == b'\n') {
                        Some(p) => (p, true),
                        None => (rest.len(), false),
                    };
                    *line_bytes = line_bytes.saturating_add(skipped);
                    if *line_bytes > limit {
                        return Err(Http1Error::ChunkMetadataTooLarge { limit });
                    }
                    i += skipped;
                    if found_lf {
                        *self = Self::after_size_line(*value);
                        i += 1;
                    }
                }
                Self::Data { remaining } => {
                    let available = u64::try_from(bytes.len() - i).unwrap_or(u64::MAX);
                    let take = (*remaining).min(available);
                    *remaining -= take;
                    data += take;
                    // `take <= bytes.len() - i`, so it fits in usize.
                    i += usize::try_from(take).unwrap_or(bytes.len() - i);
                    if *remaining == 0 {
                        *self = Self::DataEnd;
                    }
                }
                Self::DataEnd => {
                    *self = match b {
                        b'\r' => Self::DataEndLf,
                        b'\n' => Self::START,
                        _ => return Err(Http1Error::BadChunkEnd),
                    };
                    i += 1;
                }
                Self::DataEndLf => {
                    if b != b'\n' {
                        return Err(Http1Error::BadChunkEnd);
                    }
                    *self = Self::START;
                    i += 1;
                }
                Self::Trailers { line_bytes, total } => {
                    i += 1;
                    *total = total.saturating_add(1);
                    if *total > limit {
                        return Err(Http1Error::ChunkMetadataTooLarge { limit });
                    }
                    match b {
                        b'\n' if *line_bytes == 0 => {
                            return Ok(ChunkedStep {
                                consumed: i,
                                data,
                                done: true,
                            });
                        }
                        b'\n' => *line_bytes = 0,
                        b'\r' => {}
                        _ => *line_bytes += 1,
                    }
                }
            }
        }
        Ok(ChunkedStep {
            consumed: i,
            data,
            done: false,
        })
    }

    /// Skips `gap` uncaptured bytes if they are all chunk data; returns false if the
    /// gap covers framing (the body is then out of sync).
    fn skip_gap(&mut self, gap: u64) -> bool {
        match self {
            Self::Data { remaining } if gap <= *remaining => {
                *remaining -= gap;
                if *remaining == 0 {
                    *self = Self::DataEnd;
                }
                true
            }
            _ => false,
        }
    }
}

/// What a head says, before framing is decided.
struct ParsedHead {
    start: StartLine,
    version_minor: u8,
    headers: KeptHeaders,
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
}

/// Decodes one direction of an HTTP/1.x connection. See the module docs.
pub struct Http1Decoder {
    kind: MessageKind,
    limits: Http1Limits,
    state: State,
    /// Head bytes of the message in progress when its head spans chunks.
    head: Vec<u8>,
    /// Response decoders: methods of the requests not answered yet, oldest first.
    pending: VecDeque<RequestMethod>,
}

impl fmt::Debug for Http1Decoder {
    // Not derived: the buffered head may hold Cookie or Authorization values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http1Decoder")
            .field("kind", &self.kind)
            .field("limits", &self.limits)
            .field("state", &self.state)
            .field("buffered_head_bytes", &self.head.len())
            .field("pending_requests", &self.pending.len())
            .finish()
    }
}

impl Http1Decoder {
    /// Bytes the decoder holds between chunks (a head spanning chunks, the methods
    /// of requests not answered yet): what a global memory budget counts.
    pub fn held_bytes(&self) -> usize {
        self.head.len() + self.pending.len() * std::mem::size_of::<RequestMethod>()
    }

    pub fn new(kind: MessageKind, limits: Http1Limits) -> Self {
        Self {
            kind,
            limits,
            state: State::Start,
            head: Vec::new(),
            pending: VecDeque::new(),
        }
    }

    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// Feeds one chunk; pushes every message completed by it, in order, to `out`.
    ///
    /// On `Err`, messages completed earlier in the chunk are already in `out`, the
    /// message in progress is dropped and the rest of the chunk is skipped; the decoder
    /// then skips chunks until one begins with a start line.
    pub fn feed(
        &mut self,
        chunk: &Chunk<'_>,
        out: &mut Vec<Http1Message>,
    ) -> Result<(), Http1Error> {
        let result = self.feed_chunk(chunk, out);
        if result.is_err() {
            self.state = State::Resync;
            self.clear_head();
        }
        result
    }

    /// Response decoders only (a no-op for requests): the method of the next request
    /// this stream answers, called once per request in request order. `HEAD` → the
    /// response has no body; `CONNECT` + 2xx → tunnel. Responses with no queued method
    /// are decoded as answers to GET. At most [`MAX_PENDING_REQUESTS`] are queued.
    pub fn expect_response_to(&mut self, method: &str) {
        if self.kind != MessageKind::Response {
            return;
        }
        let method = match method {
            "HEAD" => RequestMethod::Head,
            "CONNECT" => RequestMethod::Connect,
            _ => RequestMethod::Other,
        };
        if self.pending.len() >= MAX_PENDING_REQUESTS {
            self.pending.pop_front();
        }
        self.pending.push_back(method);
    }

    /// Requests queued by [`Self::expect_response_to`] and not yet answered by a final
    /// (non-1xx, or 101) response head.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// The connection closed, or the caller knows the current message is over: emits a
    /// close-delimited, sync-lost or cut-short message (the last two with
    /// `body_sync_lost`), with `end_ns` the timestamp of its last data seen. A head in
    /// progress is emitted with `head_truncated` if its start line is complete.
    /// Afterwards the decoder waits for a chunk that begins with a start line (a tunnel
    /// stays a tunnel).
    pub fn finish(&mut self, out: &mut Vec<Http1Message>) {
        if let State::Head { start_ns, last_ns } = self.state {
            let head = mem::take(&mut self.head);
            let result = self.on_head(&head, start_ns, last_ns, true, out);
            self.recycle_head(head);
            if result.is_err() {
                self.state = State::Resync;
            }
        }
        self.state = match mem::replace(&mut self.state, State::Start) {
            State::Start => State::Start,
            State::Tunnel => State::Tunnel,
            State::Head { .. } | State::Resync => State::Resync,
            State::Length { mut msg, .. } | State::Chunked { mut msg, .. } => {
                msg.body_sync_lost = true;
                out.push(*msg);
                State::Resync
            }
            State::UntilClose { msg } | State::SyncLost { msg } => {
                out.push(*msg);
                State::Resync
            }
        };
    }

    /// True while a message is partially decoded (head or body in progress).
    pub fn in_message(&self) -> bool {
        matches!(
            self.state,
            State::Head { .. }
                | State::Length { .. }
                | State::Chunked { .. }
                | State::UntilClose { .. }
                | State::SyncLost { .. }
        )
    }

    /// The message whose head is decoded and whose body is in progress, if any; e.g. to
    /// learn a request's method before its body ends.
    pub fn in_progress(&self) -> Option<&Http1Message> {
        match &self.state {
            State::Length { msg, .. }
            | State::Chunked { msg, .. }
            | State::UntilClose { msg }
            | State::SyncLost { msg } => Some(msg),
            _ => None,
        }
    }

    /// True once the stream stopped being HTTP (101 Switching Protocols, CONNECT 2xx,
    /// or [`Self::enter_tunnel`]): later chunks are ignored, so the caller may stop
    /// feeding them.
    pub fn is_tunnel(&self) -> bool {
        matches!(self.state, State::Tunnel)
    }

    /// Stops decoding: every later chunk is ignored. For the request decoder of a
    /// connection whose response decoder reported a tunnel. Drops any message in
    /// progress (call [`Self::finish`] first to keep it).
    pub fn enter_tunnel(&mut self) {
        self.state = State::Tunnel;
        self.clear_head();
    }

    fn feed_chunk(
        &mut self,
        chunk: &Chunk<'_>,
        out: &mut Vec<Http1Message>,
    ) -> Result<(), Http1Error> {
        let ts = chunk.ts_ns;
        if !self.begin_chunk(chunk, out) {
            return Ok(());
        }
        let mut pos = 0usize;
        let mut idle_steps = 0u8;
        while let Some(rest) = chunk.bytes.get(pos..).filter(|rest| !rest.is_empty()) {
            let used = self.step(rest, ts, out)?;
            if used == 0 {
                // Only a state change (Start → Head) consumes nothing; two in a row
                // would be a bug, and looping on it would hang the tracer.
                idle_steps += 1;
                if idle_steps > 2 {
                    return Err(Http1Error::Stalled);
                }
            } else {
                idle_steps = 0;
            }
            pos = pos.saturating_add(used);
        }
        let gap = u64::try_from(chunk.gap()).unwrap_or(u64::MAX);
        if gap > 0 {
            self.skip_gap(gap, ts, out)?;
        }
        Ok(())
    }

    /// Decisions taken on a chunk as a whole; false if the chunk needs nothing more.
    fn begin_chunk(&mut self, chunk: &Chunk<'_>, out: &mut Vec<Http1Message>) -> bool {
        match &mut self.state {
            State::Tunnel => false,
            State::Resync => {
                let starts_message = begins_with_start_line(self.kind, chunk.bytes);
                if starts_message {
                    self.state = State::Start;
                }
                starts_message
            }
            State::SyncLost { msg } => {
                if begins_with_start_line(self.kind, chunk.bytes) {
                    self.complete(State::Start, out);
                    return true;
                }
                let len = u64::try_from(chunk.len).unwrap_or(u64::MAX);
                msg.body_len = msg.body_len.saturating_add(len);
                msg.end_ns = chunk.ts_ns;
                false
            }
            _ => true,
        }
    }

    /// Consumes a prefix of `rest` (non-empty); returns its length, which is 0 only
    /// when the state changed.
    fn step(
        &mut self,
        rest: &[u8],
        ts: u64,
        out: &mut Vec<Http1Message>,
    ) -> Result<usize, Http1Error> {
        let available = u64::try_from(rest.len()).unwrap_or(u64::MAX);
        match &mut self.state {
            State::Start => {
                // RFC 9112 §2.2: ignore empty lines before a start line.
                let blank = rest
                    .iter()
                    .take_while(|&&b| b == b'\r' || b == b'\n')
                    .count();
                if blank < rest.len() {
                    self.state = State::Head {
                        start_ns: ts,
                        last_ns: ts,
                    };
                }
                Ok(blank)
            }
            State::Head { start_ns, .. } => {
                let start_ns = *start_ns;
                self.feed_head(rest, start_ns, ts, out)
            }
            State::Length { msg, remaining } => {
                let take = (*remaining).min(available);
                *remaining -= take;
                msg.body_len = msg.body_len.saturating_add(take);
                msg.end_ns = ts;
                if *remaining == 0 {
                    self.complete(State::Start, out);
                }
                // `take <= rest.len()`.
                Ok(usize::try_from(take).unwrap_or(rest.len()))
            }
            State::Chunked { msg, body } => {
                let step = body.feed(rest, self.limits.max_head_bytes)?;
                msg.body_len = msg.body_len.saturating_add(step.data);
                msg.end_ns = ts;
                if step.done {
                    self.complete(State::Start, out);
                }
                Ok(step.consumed)
            }
            State::UntilClose { msg } | State::SyncLost { msg } => {
                msg.body_len = msg.body_len.saturating_add(available);
                msg.end_ns = ts;
                Ok(rest.len())
            }
            State::Resync | State::Tunnel => Ok(rest.len()),
        }
    }

    /// Head bytes: buffers them until the blank line, then parses the head.
    fn feed_head(
        &mut self,
        rest: &[u8],
        start_ns: u64,
        ts: u64,
        out: &mut Vec<Http1Message>,
    ) -> Result<usize, Http1Error> {
        let limit = self.limits.max_head_bytes;
        if self.head.is_empty() {
            check_start_prefix(self.kind, rest)?;
            let window = rest.get(..limit).unwrap_or(rest);
            if let Some(end) = find_head_end(window, 0) {
                // The whole head is in this chunk: parse it in place.
                self.on_head(
                    window.get(..end).unwrap_or(window),
                    start_ns,
                    ts,
                    false,
                    out,
                )?;
                return Ok(end);
            }
            if rest.len() >= limit {
                return Err(Http1Error::HeadTooLarge { limit });
            }
            self.head.extend_from_slice(rest);
            self.touch_head(ts);
            return Ok(rest.len());
        }

        // The head continues: find where it ends before copying, so that only head
        // bytes are ever copied.
        let old = self.head.len();
        if old <= MAX_METHOD_BYTES {
            check_start_prefix_split(self.kind, &self.head, rest)?;
        }
        let room = limit.saturating_sub(old);
        let end = find_head_end_across(&self.head, rest)
            .or_else(|| find_head_end(rest.get(..room).unwrap_or(rest), 0));
        match end {
            Some(end) if end <= room => {
                self.head.extend_from_slice(rest.get(..end).unwrap_or(rest));
                let head = mem::take(&mut self.head);
                let result = self.on_head(&head, start_ns, ts, false, out);
                self.recycle_head(head);
                result?;
                Ok(end)
            }
            Some(_) => Err(Http1Error::HeadTooLarge { limit }),
            None if rest.len() >= room => Err(Http1Error::HeadTooLarge { limit }),
            None => {
                self.head.extend_from_slice(rest);
                self.touch_head(ts);
                Ok(rest.len())
            }
        }
    }

    /// The rest of the chunk is a gap of `gap` bytes.
    fn skip_gap(
        &mut self,
        gap: u64,
        ts: u64,
        out: &mut Vec<Http1Message>,
    ) -> Result<(), Http1Error> {
        match &mut self.state {
            // A new message began in the gap: its start line is lost.
            State::Start => self.state = State::Resync,
            State::Head { start_ns, .. } => {
                let start_ns = *start_ns;
                let head = mem::take(&mut self.head);
                let result = self.on_head(&head, start_ns, ts, true, out);
                self.recycle_head(head);
                result?;
            }
            State::Length { msg, remaining } => {
                msg.end_ns = ts;
                if gap < *remaining {
                    *remaining -= gap;
                    msg.body_len = msg.body_len.saturating_add(gap);
                } else {
                    // The body ends inside the gap; whatever follows it is lost.
                    msg.body_len = msg.body_len.saturating_add(*remaining);
                    let next = if gap == *remaining {
                        State::Start
                    } else {
                        State::Resync
                    };
                    self.complete(next, out);
                }
            }
            State::Chunked { msg, body } => {
                msg.end_ns = ts;
                msg.body_len = msg.body_len.saturating_add(gap);
                if !body.skip_gap(gap) {
                    msg.body_sync_lost = true;
                    if let State::Chunked { msg, .. } = mem::replace(&mut self.state, State::Resync)
                    {
                        self.state = State::SyncLost { msg };
                    }
                }
            }
            State::UntilClose { msg } | State::SyncLost { msg } => {
                msg.body_len = msg.body_len.saturating_add(gap);
                msg.end_ns = ts;
            }
            State::Resync | State::Tunnel => {}
        }
        Ok(())
    }

    /// A head is complete (`truncated == false`) or was cut by a gap or close.
    fn on_head(
        &mut self,
        head: &[u8],
        start_ns: u64,
        ts: u64,
        truncated: bool,
        out: &mut Vec<Http1Message>,
    ) -> Result<(), Http1Error> {
        let parsed = match parse_head(self.kind, head, &self.limits) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.forget_answered_request(head);
                return Err(e);
            }
        };
        let framing = self.framing(&parsed)?;
        let msg = Http1Message {
            start: parsed.start,
            version_minor: parsed.version_minor,
            headers: parsed.headers,
            start_ns,
            end_ns: ts,
            body_len: 0,
            head_truncated: truncated,
            body_sync_lost: truncated,
        };
        self.state = match framing {
            Framing::Tunnel => {
                out.push(msg);
                State::Tunnel
            }
            // Where the head (and so the body) ends is unknown.
            Framing::Length(_) | Framing::Chunked | Framing::UntilClose
                if truncated && self.kind == MessageKind::Response =>
            {
                State::SyncLost { msg: Box::new(msg) }
            }
            _ if truncated => {
                out.push(msg);
                State::Resync
            }
            Framing::NoBody => {
                out.push(msg);
                State::Start
            }
            Framing::Length(remaining) => State::Length {
                msg: Box::new(msg),
                remaining,
            },
            Framing::Chunked => State::Chunked {
                msg: Box::new(msg),
                body: ChunkedBody::START,
            },
            Framing::UntilClose => State::UntilClose { msg: Box::new(msg) },
        };
        Ok(())
    }

    /// RFC 9112 §6.3; pops the request a final response answers.
    fn framing(&mut self, head: &ParsedHead) -> Result<Framing, Http1Error> {
        let framing = match head.start {
            StartLine::Request { .. } => {
                if head.transfer_encoding {
                    if !head.chunked {
                        return Err(Http1Error::BadTransferEncoding);
                    }
                    Framing::Chunked
                } else {
                    Framing::Length(head.content_length.unwrap_or(0))
                }
            }
            StartLine::Response { status } => {
                let interim = (100..200).contains(&status) && status != 101;
                let method = if interim {
                    RequestMethod::Other
                } else {
                    self.pending.pop_front().unwrap_or(RequestMethod::Other)
                };
                if status == 101
                    || (method == RequestMethod::Connect && (200..300).contains(&status))
                {
                    Framing::Tunnel
                } else if interim || status == 204 || status == 304 || method == RequestMethod::Head
                {
                    Framing::NoBody
                } else if head.transfer_encoding {
                    if head.chunked {
                        Framing::Chunked
                    } else {
                        Framing::UntilClose
                    }
                } else {
                    match head.content_length {
                        Some(len) => Framing::Length(len),
                        None => Framing::UntilClose,
                    }
                }
            }
        };
        Ok(match framing {
            Framing::Length(0) => Framing::NoBody,
            other => other,
        })
    }

    /// A response head that failed to parse still answered a request if its status
    /// line is a final one: drop that request so later responses stay paired.
    fn forget_answered_request(&mut self, head: &[u8]) {
        if self.kind != MessageKind::Response {
            return;
        }
        if let Some(Ok((StartLine::Response { status }, _))) =
            complete_lines(head).next().map(parse_status_line)
            && (status >= 200 || status == 101)
        {
            self.pending.pop_front();
        }
    }

    /// Ends the message in progress (if any) and moves to `next`.
    fn complete(&mut self, next: State, out: &mut Vec<Http1Message>) {
        match mem::replace(&mut self.state, next) {
            State::Length { msg, .. }
            | State::Chunked { msg, .. }
            | State::UntilClose { msg }
            | State::SyncLost { msg } => out.push(*msg),
            State::Start | State::Head { .. } | State::Resync | State::Tunnel => {}
        }
    }

    fn touch_head(&mut self, ts: u64) {
        if let State::Head { last_ns, .. } = &mut self.state {
            *last_ns = ts;
        }
    }

    /// Gives a taken head buffer back, emptied; frees it if a large head grew it.
    fn recycle_head(&mut self, mut head: Vec<u8>) {
        head.clear();
        if head.capacity() <= HEAD_BUFFER_KEPT_BYTES {
            self.head = head;
        }
    }

    fn clear_head(&mut self) {
        let head = mem::take(&mut self.head);
        self.recycle_head(head);
    }
}

/// Cheap protocol detection: `bytes` begins with a known method and a space (and, if
/// present, a visible character starting the target).
#[must_use]
pub fn looks_like_request(bytes: &[u8]) -> bool {
    KNOWN_METHODS.iter().any(|method| {
        bytes.starts_with(method)
            && bytes.get(method.len()) == Some(&b' ')
            && bytes
                .get(method.len() + 1)
                .is_none_or(|b| b.is_ascii_graphic())
    })
}

/// Cheap protocol detection: `bytes` begins with `HTTP/1.`.
#[must_use]
pub fn looks_like_response(bytes: &[u8]) -> bool {
    bytes.starts_with(b"HTTP/1.")
}

/// Whether a chunk can be trusted to start a new message after sync was lost.
fn begins_with_start_line(kind: MessageKind, bytes: &[u8]) -> bool {
    match kind {
        MessageKind::Request => looks_like_request(bytes),
        // "HTTP/1.x NNN", as far as the captured bytes go (at least "HTTP/1.x").
        MessageKind::Response => {
            bytes.len() >= 8
                && bytes.iter().take(12).enumerate().all(|(i, &b)| match i {
                    0..=6 => b"HTTP/1.".get(i) == Some(&b),
                    8 => b == b' ',
                    9 => (b'1'..=b'9').contains(&b),
                    _ => b.is_ascii_digit(),
                })
        }
    }
}

/// Rejects a head whose first bytes cannot start a start line, before buffering more.
fn check_start_prefix(kind: MessageKind, head: &[u8]) -> Result<(), Http1Error> {
    let plausible = match kind {
        MessageKind::Request => {
            let window = head.get(..=MAX_METHOD_BYTES).unwrap_or(head);
            match window.iter().position(|&b| !is_tchar(b)) {
                Some(0) => false,
                Some(p) => window.get(p) == Some(&b' '),
                None => window.len() <= MAX_METHOD_BYTES,
            }
        }
        MessageKind::Response => {
            let n = head.len().min(5);
            head.get(..n) == b"HTTP/".get(..n)
        }
    };
    if plausible {
        return Ok(());
    }
    let expected = match kind {
        MessageKind::Request => "a request line (METHOD target HTTP/1.x)",
        MessageKind::Response => "a status line (HTTP/1.x code reason)",
    };
    Err(Http1Error::NotHttp {
        expected,
        found: describe_bytes(head),
    })
}

/// [`check_start_prefix`] over a head split in two (`before` buffered, `after` new).
fn check_start_prefix_split(
    kind: MessageKind,
    before: &[u8],
    after: &[u8],
) -> Result<(), Http1Error> {
    let mut window = [0u8; MAX_METHOD_BYTES + 1];
    let mut n = 0;
    for (slot, &b) in window.iter_mut().zip(before.iter().chain(after)) {
        *slot = b;
        n += 1;
    }
    check_start_prefix(kind, window.get(..n).unwrap_or_default())
}

/// A description of unexpected bytes that reveals none of them.
fn describe_bytes(bytes: &[u8]) -> &'static str {
    match bytes {
        [0x16, 0x03, ..] => "a TLS handshake record",
        [0x15 | 0x17, 0x03, ..] => "a TLS record",
        _ if bytes
            .iter()
            .take(64)
            .all(|&b| b.is_ascii_graphic() || matches!(b, b' ' | b'\t' | b'\r' | b'\n')) =>
        {
            "other text"
        }
        _ => "binary data",
    }
}

/// The index just past the blank line ending a head, searching for the LF that
/// starts the terminator from `from`. Accepts CRLF and bare LF line endings.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    loop {
        let lf = i + memchr::memchr(b'\n', buf.get(i..)?)?;
        match (buf.get(lf + 1), buf.get(lf + 2)) {
            (Some(b'\n'), _) => return Some(lf + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(lf + 3),
            _ => i = lf + 1,
        }
    }
}

/// The end of a head whose terminator straddles `before` (bytes already searched,
/// holding no terminator) and `after`, as an index into `after`.
fn find_head_end_across(before: &[u8], after: &[u8]) -> Option<usize> {
    // A terminator is at most 3 bytes ("\n\r\n"): 2 bytes each side cover it.
    let tail = before
        .get(before.len().saturating_sub(2)..)
        .unwrap_or_default();
    let head = after.get(..2).unwrap_or(after);
    let mut window = [0u8; 4];
    let mut n = 0;
    for (slot, &b) in window.iter_mut().zip(tail.iter().chain(head)) {
        *slot = b;
        n += 1;
    }
    let end = find_head_end(window.get(..n).unwrap_or_default(), 0)?;
    end.checked_sub(tail.len()).filter(|&end| end > 0)
}

/// Complete lines of `buf` (each ended by LF), without the LF and one CR before it. A
/// last line without LF (cut by a gap) is not returned.
fn complete_lines(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let lf = memchr::memchr(b'\n', rest)?;
        let (line, after) = rest.split_at_checked(lf)?;
        rest = tail(after, 1);
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    })
}

fn parse_head(
    kind: MessageKind,
    head: &[u8],
    limits: &Http1Limits,
) -> Result<ParsedHead, Http1Error> {
    let mut lines = complete_lines(head);
    let first = lines.next().ok_or(Http1Error::StartLineCut {
        captured: head.len(),
    })?;
    let (start, version_minor) = match kind {
        MessageKind::Request => parse_request_line(first)?,
        MessageKind::Response => parse_status_line(first)?,
    };
    let mut parsed = ParsedHead {
        start,
        version_minor,
        headers: KeptHeaders::default(),
        content_length: None,
        transfer_encoding: false,
        chunked: false,
    };
    let mut index = 0usize;
    for line in lines {
        if line.is_empty() {
            break;
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            // obs-fold: a continuation of the previous field's value; ignored.
            continue;
        }
        index += 1;
        if index > limits.max_headers {
            return Err(Http1Error::TooManyHeaders {
                limit: limits.max_headers,
            });
        }
        let (name, value) = split_once(line, b':').ok_or(Http1Error::BadHeader {
            index,
            reason: "no colon",
        })?;
        let name = trim_end_ows(name);
        if name.is_empty() {
            return Err(Http1Error::BadHeader {
                index,
                reason: "empty field name",
            });
        }
        apply_header(&mut parsed, name, trim_ows(value))?;
    }
    Ok(parsed)
}

/// Records one header field if the tracer needs it. Sensitive fields (Authorization,
/// Proxy-Authorization, Cookie, Set-Cookie) fall through and are never looked at.
fn apply_header(head: &mut ParsedHead, name: &[u8], value: &[u8]) -> Result<(), Http1Error> {
    // Most fields are none of these: their length alone says so.
    if !matches!(name.len(), 4 | 10 | 11 | 12 | 14 | 17) {
        return Ok(());
    }
    let kept = &mut head.headers;
    let slot = if name.eq_ignore_ascii_case(b"host") {
        &mut kept.host
    } else if name.eq_ignore_ascii_case(b"traceparent") {
        &mut kept.traceparent
    } else if name.eq_ignore_ascii_case(b"tracestate") {
        &mut kept.tracestate
    } else if name.eq_ignore_ascii_case(b"user-agent") {
        &mut kept.user_agent
    } else if name.eq_ignore_ascii_case(b"content-type") {
        &mut kept.content_type
    } else if name.eq_ignore_ascii_case(b"content-length") {
        let len = parse_content_length(value)?;
        match head.content_length {
            Some(first) if first != len => {
                return Err(Http1Error::ConflictingContentLength { first, second: len });
            }
            _ => head.content_length = Some(len),
        }
        return Ok(());
    } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
        // The last coding of the last field decides (RFC 9112 §6.3).
        head.transfer_encoding = true;
        head.chunked = value
            .rsplit(|&b| b == b',')
            .map(trim_ows)
            .find(|coding| !coding.is_empty())
            .is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"));
        return Ok(());
    } else {
        return Ok(());
    };
    if slot.is_none() {
        *slot = Some(kept_value(value));
    }
    Ok(())
}

/// `Content-Length: 42`, or a list of equal values (`42, 42`).
fn parse_content_length(value: &[u8]) -> Result<u64, Http1Error> {
    let mut result: Option<u64> = None;
    for part in value.split(|&b| b == b',') {
        let part = trim_ows(part);
        if part.is_empty() {
            return Err(Http1Error::BadContentLength {
                reason: "empty value",
            });
        }
        let mut len = 0u64;
        for &b in part {
            if !b.is_ascii_digit() {
                return Err(Http1Error::BadContentLength {
                    reason: "not a decimal number",
                });
            }
            len = len
                .checked_mul(10)
                .and_then(|len| len.checked_add(u64::from(b - b'0')))
                .ok_or(Http1Error::BadContentLength {
                    reason: "does not fit in 64 bits",
                })?;
        }
        match result {
            Some(first) if first != len => {
                return Err(Http1Error::ConflictingContentLength { first, second: len });
            }
            _ => result = Some(len),
        }
    }
    result.ok_or(Http1Error::BadContentLength {
        reason: "empty value",
    })
}

/// `METHOD SP request-target SP HTTP-version` (runs of spaces tolerated).
fn parse_request_line(line: &[u8]) -> Result<(StartLine, u8), Http1Error> {
    let bad = |reason| Http1Error::BadRequestLine { reason };
    let (method, rest) = split_once(line, b' ').ok_or(bad("no space after the method"))?;
    if method.is_empty() || method.len() > MAX_METHOD_BYTES || !method.iter().all(|&b| is_tchar(b))
    {
        return Err(bad("the method is not a token"));
    }
    let (target, version) =
        split_once(trim_start_sp(rest), b' ').ok_or(bad("no HTTP version after the target"))?;
    if target.is_empty() || target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(bad("the target is empty or has control characters"));
    }
    let version_minor = parse_version(trim_sp(version), bad("malformed HTTP version"))?;
    Ok((
        StartLine::Request {
            method: String::from_utf8_lossy(method).into_owned(),
            target: String::from_utf8_lossy(target).into_owned(),
        },
        version_minor,
    ))
}

/// `HTTP-version SP 3DIGIT [SP reason-phrase]`.
fn parse_status_line(line: &[u8]) -> Result<(StartLine, u8), Http1Error> {
    let bad = |reason| Http1Error::BadStatusLine { reason };
    let (version, rest) = split_once(line, b' ').ok_or(bad("no status code"))?;
    let version_minor = parse_version(version, bad("malformed HTTP version"))?;
    let status = match trim_start_sp(rest) {
        [a, b, c, after @ ..]
            if a.is_ascii_digit()
                && b.is_ascii_digit()
                && c.is_ascii_digit()
                && matches!(after.first(), None | Some(b' ' | b'\t')) =>
        {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => return Err(bad("no three-digit status code")),
    };
    if status < 100 {
        return Err(bad("status code below 100"));
    }
    Ok((StartLine::Response { status }, version_minor))
}

/// `HTTP/1.x` → x; other `HTTP/d.d` → `UnsupportedVersion`; anything else → `bad`.
fn parse_version(version: &[u8], bad: Http1Error) -> Result<u8, Http1Error> {
    match version {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            if *major == b'1' {
                Ok(minor - b'0')
            } else {
                Err(Http1Error::UnsupportedVersion {
                    major: major - b'0',
                    minor: minor - b'0',
                })
            }
        }
        _ => Err(bad),
    }
}

/// A kept header value: at most [`MAX_KEPT_VALUE_BYTES`] bytes, lossy UTF-8, not cut
/// inside a UTF-8 sequence.
fn kept_value(value: &[u8]) -> String {
    super::bounded_text(value, MAX_KEPT_VALUE_BYTES)
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn tail(bytes: &[u8], from: usize) -> &[u8] {
    bytes.get(from..).unwrap_or_default()
}

/// Splits at the first `sep`, dropping it.
fn split_once(bytes: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let at = memchr::memchr(sep, bytes)?;
    let (before, after) = bytes.split_at_checked(at)?;
    Some((before, tail(after, 1)))
}

fn trim_start_sp(mut bytes: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = bytes {
        bytes = rest;
    }
    bytes
}

fn trim_sp(bytes: &[u8]) -> &[u8] {
    let mut bytes = trim_start_sp(bytes);
    while let [rest @ .., b' '] = bytes {
        bytes = rest;
    }
    bytes
}

fn trim_end_ows(mut bytes: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// Trims optional whitespace (SP, HTAB) on both sides.
fn trim_ows(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    trim_end_ows(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both directions of one recorded connection (see testdata/http1/capture.py):
    /// what the client sent and what the server sent, each as one stream.
    macro_rules! capture {
        ($name:literal) => {{
            static STREAMS: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
            let (req, resp) = STREAMS.get_or_init(|| {
                let file = include_bytes!(concat!("../testdata/http1/", $name, ".cap"));
                let capture = crate::testdata::parse(file).expect($name);
                (capture.stream(true), capture.stream(false))
            });
            ($name, &req[..], &resp[..])
        }};
    }

    struct Case {
        name: &'static str,
        req: &'static [u8],
        resp: &'static [u8],
        /// (method, target, body_len) of each request.
        requests: &'static [(&'static str, &'static str, u64)],
        /// (status, body_len) of each response.
        responses: &'static [(u16, u64)],
    }

    fn case(
        (name, req, resp): (&'static str, &'static [u8], &'static [u8]),
        requests: &'static [(&'static str, &'static str, u64)],
        responses: &'static [(u16, u64)],
    ) -> Case {
        Case {
            name,
            req,
            resp,
            requests,
            responses,
        }
    }

    fn cases() -> Vec<Case> {
        vec![
            case(
                capture!("pyserver_get_200"),
                &[("GET", "/hello.txt", 0)],
                &[(200, 132)],
            ),
            case(
                capture!("pyserver_get_404"),
                &[("GET", "/missing?x=1&y=2", 0)],
                &[(404, 335)],
            ),
            case(
                capture!("pyserver_post_501"),
                &[("POST", "/submit", 21)],
                &[(501, 357)],
            ),
            case(
                capture!("pyserver_head"),
                &[("HEAD", "/hello.txt", 0)],
                &[(200, 0)],
            ),
            case(
                capture!("nginx_keepalive"),
                &[("GET", "/hello.txt", 0), ("GET", "/missing", 0)],
                &[(200, 132), (404, 153)],
            ),
            case(
                capture!("nginx_chunked_gzip"),
                &[("GET", "/hello.txt", 0)],
                &[(200, 0x38)],
            ),
            case(
                capture!("nginx_head"),
                &[("HEAD", "/hello.txt", 0)],
                &[(200, 0)],
            ),
            case(
                capture!("nginx_204"),
                &[("GET", "/nocontent", 0)],
                &[(204, 0)],
            ),
            case(
                capture!("nginx_304"),
                &[("GET", "/hello.txt", 0)],
                &[(304, 0)],
            ),
            case(
                capture!("nginx_pipelined"),
                &[
                    ("GET", "/hello.txt", 0),
                    ("HEAD", "/hello.txt", 0),
                    ("GET", "/nocontent", 0),
                ],
                &[(200, 132), (200, 0), (204, 0)],
            ),
            case(
                capture!("pyhttp11_expect_100"),
                &[("POST", "/upload", 2000)],
                &[(100, 0), (200, 15)],
            ),
            case(
                capture!("pyhttp11_chunked_request"),
                &[("POST", "/upload", 100)],
                &[(200, 14)],
            ),
            case(
                capture!("pyhttp11_chunked_response"),
                &[("GET", "/chunked", 0), ("GET", "/nocontent", 0)],
                &[(200, 36), (204, 0)],
            ),
            case(
                capture!("pyhttp11_close_delimited"),
                &[("GET", "/close-delimited", 0)],
                &[(200, 18)],
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
        msgs: Vec<Http1Message>,
        errors: Vec<Http1Error>,
    }

    fn run(dec: &mut Http1Decoder, chunks: &[Chunk<'_>], finish: bool) -> Decoded {
        let mut decoded = Decoded::default();
        for chunk in chunks {
            if let Err(e) = dec.feed(chunk, &mut decoded.msgs) {
                decoded.errors.push(e);
            }
        }
        if finish {
            dec.finish(&mut decoded.msgs);
        }
        decoded
    }

    fn requests(chunks: &[Chunk<'_>]) -> Decoded {
        run(
            &mut Http1Decoder::new(MessageKind::Request, Http1Limits::default()),
            chunks,
            true,
        )
    }

    /// A response decoder told about `reqs`, as the integrating code would.
    fn response_decoder(reqs: &[Http1Message]) -> Http1Decoder {
        let mut dec = Http1Decoder::new(MessageKind::Response, Http1Limits::default());
        for req in reqs {
            if let StartLine::Request { method, .. } = &req.start {
                dec.expect_response_to(method);
            }
        }
        dec
    }

    fn responses(reqs: &[Http1Message], chunks: &[Chunk<'_>]) -> Decoded {
        run(&mut response_decoder(reqs), chunks, true)
    }

    fn decode(kind: MessageKind, bytes: &[u8]) -> Decoded {
        let mut dec = Http1Decoder::new(kind, Http1Limits::default());
        run(&mut dec, &[Chunk::whole(bytes, 1)], true)
    }

    /// `bytes` cut at `cuts` (ascending): the i-th chunk has ts i + 1.
    fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<Chunk<'a>> {
        let mut chunks = Vec::new();
        let mut from = 0;
        for (i, &cut) in cuts.iter().chain(std::iter::once(&bytes.len())).enumerate() {
            chunks.push(Chunk::whole(&bytes[from..cut], i as u64 + 1));
            from = cut;
        }
        chunks
    }

    /// One chunk per byte, with the byte's offset as its ts: the messages then carry
    /// the offsets of their first and last bytes.
    fn bytewise(bytes: &[u8]) -> Vec<Chunk<'_>> {
        bytes
            .iter()
            .enumerate()
            .map(|(i, b)| Chunk::whole(std::slice::from_ref(b), i as u64))
            .collect()
    }

    fn map_ts(msgs: &[Http1Message], f: impl Fn(u64) -> u64) -> Vec<Http1Message> {
        msgs.iter()
            .map(|m| Http1Message {
                start_ns: f(m.start_ns),
                end_ns: f(m.end_ns),
                ..m.clone()
            })
            .collect()
    }

    fn request_summary(msgs: &[Http1Message]) -> Vec<(String, String, u64)> {
        msgs.iter()
            .map(|m| match &m.start {
                StartLine::Request { method, target } => {
                    (method.clone(), target.clone(), m.body_len)
                }
                other => panic!("expected a request, got {other:?}"),
            })
            .collect()
    }

    fn response_summary(msgs: &[Http1Message]) -> Vec<(u16, u64)> {
        msgs.iter()
            .map(|m| match m.start {
                StartLine::Response { status } => (status, m.body_len),
                ref other => panic!("expected a response, got {other:?}"),
            })
            .collect()
    }

    fn owned_requests(expected: &[(&str, &str, u64)]) -> Vec<(String, String, u64)> {
        expected
            .iter()
            .map(|&(m, t, n)| (m.to_owned(), t.to_owned(), n))
            .collect()
    }

    fn status(msg: &Http1Message) -> u16 {
        match msg.start {
            StartLine::Response { status } => status,
            ref other => panic!("expected a response, got {other:?}"),
        }
    }

    fn assert_clean(name: &str, decoded: &Decoded) {
        assert!(
            decoded.errors.is_empty(),
            "{name}: errors {:?}",
            decoded.errors
        );
        for m in &decoded.msgs {
            assert!(
                !m.head_truncated && !m.body_sync_lost,
                "{name}: unexpected flags on {m:?}"
            );
        }
    }

    // ---- captured exchanges ----------------------------------------------------

    #[test]
    fn captured_exchanges_decode_whole() {
        for c in cases() {
            let reqs = requests(&split(c.req, &[]));
            assert_clean(c.name, &reqs);
            assert_eq!(
                request_summary(&reqs.msgs),
                owned_requests(c.requests),
                "{}",
                c.name
            );
            let resps = responses(&reqs.msgs, &split(c.resp, &[]));
            assert_clean(c.name, &resps);
            assert_eq!(response_summary(&resps.msgs), c.responses, "{}", c.name);
        }
    }

    #[test]
    fn captured_heads_keep_the_needed_headers() {
        let c = find_case("pyserver_post_501");
        let reqs = requests(&split(c.req, &[]));
        let req = &reqs.msgs[0];
        assert_eq!(req.version_minor, 1);
        assert!(
            req.headers
                .host
                .as_deref()
                .is_some_and(|h| h.starts_with("127.0.0.1:"))
        );
        assert_eq!(req.headers.user_agent.as_deref(), Some("curl/7.88.1"));
        assert_eq!(
            req.headers.content_type.as_deref(),
            Some("application/x-www-form-urlencoded")
        );
        let resps = responses(&reqs.msgs, &split(c.resp, &[]));
        assert_eq!(resps.msgs[0].version_minor, 0);
        assert_eq!(
            resps.msgs[0].headers.content_type.as_deref(),
            Some("text/html;charset=utf-8")
        );

        let p = find_case("nginx_pipelined");
        let reqs = requests(&split(p.req, &[]));
        assert_eq!(
            reqs.msgs[0].headers.traceparent.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(reqs.msgs[1].headers.traceparent, None);
    }

    #[test]
    fn sensitive_header_values_are_never_kept() {
        let c = find_case("pyserver_post_501");
        let secrets = ["s3cr3t", "session=abcdef", "abcdef"];
        // Whole, and with the head cut inside the Cookie value mid-way.
        let cut = c
            .req
            .windows(6)
            .position(|w| w == b"abcdef")
            .expect("cookie in capture")
            + 3;
        let mut dec = Http1Decoder::new(MessageKind::Request, Http1Limits::default());
        let mut out = Vec::new();
        dec.feed(&Chunk::whole(&c.req[..cut], 1), &mut out)
            .expect("first part");
        let mid_debug = format!("{dec:?}");
        dec.feed(&Chunk::whole(&c.req[cut..], 2), &mut out)
            .expect("second part");
        // A chunk that starts inside a secret makes an error that must not show it.
        let err = decode(MessageKind::Request, b"abcdef; token=s3cr3t\r\n\r\n").errors;
        assert_eq!(err.len(), 1);
        let printed = format!(
            "{mid_debug} {out:?} {:?} {} {:?}",
            err[0],
            err[0],
            requests(&split(c.req, &[]))
        );
        for secret in secrets {
            assert!(!printed.contains(secret), "{secret} leaked: {printed}");
        }
    }

    // ---- splits ----------------------------------------------------------------

    /// Every split into two chunks, for both directions of every capture, gives the
    /// messages of a byte-at-a-time feed (which covers heads split inside
    /// "\r\n\r\n", chunk-size lines, extensions and trailers split anywhere), with
    /// each timestamp the ts of the chunk holding that byte.
    #[test]
    fn every_split_point_gives_the_same_messages() {
        for c in cases() {
            let reqs = requests(&bytewise(c.req));
            assert_clean(c.name, &reqs);
            let resps = responses(&reqs.msgs, &bytewise(c.resp));
            assert_clean(c.name, &resps);
            assert_eq!(
                response_summary(&resps.msgs),
                c.responses,
                "{} bytewise",
                c.name
            );
            assert_eq!(
                requests(&split(c.req, &[])).msgs,
                map_ts(&reqs.msgs, |_| 1),
                "{} whole vs bytewise",
                c.name
            );
            for (bytes, reference, is_req) in
                [(c.req, &reqs.msgs, true), (c.resp, &resps.msgs, false)]
            {
                for cut in 1..bytes.len() {
                    let chunks = split(bytes, &[cut]);
                    let got = if is_req {
                        requests(&chunks)
                    } else {
                        responses(&reqs.msgs, &chunks)
                    };
                    assert!(
                        got.errors.is_empty(),
                        "{} cut {cut}: {:?}",
                        c.name,
                        got.errors
                    );
                    let expected =
                        map_ts(reference, |off| if (off as usize) < cut { 1 } else { 2 });
                    assert_eq!(got.msgs, expected, "{} cut at {cut}", c.name);
                }
            }
        }
    }

    #[test]
    fn chunked_response_split_at_every_pair_of_points() {
        for name in ["pyhttp11_chunked_response", "nginx_chunked_gzip"] {
            let c = find_case(name);
            let reqs = requests(&split(c.req, &[]));
            let reference = responses(&reqs.msgs, &split(c.resp, &[])).msgs;
            for a in 1..c.resp.len() {
                for b in a..c.resp.len() {
                    let got = responses(&reqs.msgs, &split(c.resp, &[a, b]));
                    assert!(
                        got.errors.is_empty(),
                        "{name} cuts {a},{b}: {:?}",
                        got.errors
                    );
                    assert_eq!(map_ts(&got.msgs, |_| 1), reference, "{name} cuts {a},{b}");
                }
            }
        }
    }

    #[test]
    fn keep_alive_messages_carry_their_own_timestamps() {
        let c = find_case("nginx_keepalive");
        let second = c
            .req
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("end of head")
            + 4;
        let reqs = requests(&[
            Chunk::whole(&c.req[..second], 10),
            Chunk::whole(&c.req[second..], 20),
        ]);
        assert_clean(c.name, &reqs);
        assert_eq!(
            reqs.msgs
                .iter()
                .map(|m| (m.start_ns, m.end_ns))
                .collect::<Vec<_>>(),
            [(10, 10), (20, 20)]
        );
        let head_end = c
            .resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("end of head")
            + 4;
        let body_end = head_end + 132;
        let resps = responses(
            &reqs.msgs,
            &[
                Chunk::whole(&c.resp[..head_end], 15),
                Chunk::whole(&c.resp[head_end..body_end], 16),
                Chunk::whole(&c.resp[body_end..], 25),
            ],
        );
        assert_clean(c.name, &resps);
        assert_eq!(
            resps
                .msgs
                .iter()
                .map(|m| (status(m), m.start_ns, m.end_ns))
                .collect::<Vec<_>>(),
            [(200, 15, 16), (404, 25, 25)]
        );
    }

    #[test]
    fn pipelined_messages_in_one_chunk_share_its_timestamp() {
        let c = find_case("nginx_pipelined");
        let reqs = run(
            &mut Http1Decoder::new(MessageKind::Request, Http1Limits::default()),
            &[Chunk::whole(c.req, 7)],
            false,
        );
        assert_clean(c.name, &reqs);
        assert_eq!(reqs.msgs.len(), 3);
        assert!(reqs.msgs.iter().all(|m| m.start_ns == 7 && m.end_ns == 7));
        let mut dec = response_decoder(&reqs.msgs);
        assert_eq!(dec.pending_requests(), 3);
        let resps = run(&mut dec, &[Chunk::whole(c.resp, 9)], false);
        assert_clean(c.name, &resps);
        assert_eq!(
            response_summary(&resps.msgs),
            [(200, 132), (200, 0), (204, 0)]
        );
        assert!(resps.msgs.iter().all(|m| m.start_ns == 9 && m.end_ns == 9));
        assert_eq!(dec.pending_requests(), 0);
        assert!(!dec.in_message());
    }

    // ---- bodies ----------------------------------------------------------------

    #[test]
    fn responses_without_body_by_status_or_method() {
        // (request method, response bytes, (status, body_len) of each response)
        type Row = (&'static str, &'static [u8], &'static [(u16, u64)]);
        let table: &[Row] = &[
            ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", &[(200, 0)]),
            (
                "HEAD",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                &[(200, 0)],
            ),
            ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", &[(204, 0)]),
            ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", &[(304, 0)]),
            (
                "GET",
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
                &[(103, 0), (200, 2)],
            ),
            // The interim response must not use up the HEAD.
            (
                "HEAD",
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
                &[(100, 0), (200, 0)],
            ),
            ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &[(200, 0)]),
        ];
        for &(method, bytes, expected) in table {
            let mut dec = Http1Decoder::new(MessageKind::Response, Http1Limits::default());
            dec.expect_response_to(method);
            let got = run(&mut dec, &[Chunk::whole(bytes, 1)], false);
            assert!(got.errors.is_empty(), "{method} {:?}", got.errors);
            assert_eq!(response_summary(&got.msgs), expected, "{method}");
            assert!(!dec.in_message(), "{method}: {dec:?}");
        }
    }

    #[test]
    fn body_framing_rules() {
        // (kind, bytes, expected start lines' body lengths)
        let table: &[(MessageKind, &[u8], &[u64])] = &[
            // Requests with neither header have no body: the next request follows.
            (MessageKind::Request, b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n", &[0, 0]),
            // Chunked wins over Content-Length.
            (
                MessageKind::Request,
                b"POST / HTTP/1.1\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
                &[3, 0],
            ),
            (
                MessageKind::Request,
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                &[3],
            ),
            // Repeated equal Content-Length values are fine.
            (
                MessageKind::Request,
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3, 3\r\n\r\nabc",
                &[3],
            ),
            // Uppercase hex, extensions with spaces, bare LF, several trailers.
            (
                MessageKind::Response,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1A ; a=1;b=\"x\"\nabcdefghijklmnopqrstuvwxyz\n000\r\nX-A: 1\r\nX-B: 2\r\n\r\n",
                &[26],
            ),
            // A response TE that is not chunked is delimited by close.
            (
                MessageKind::Response,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nabcdef",
                &[6],
            ),
            // HTTP/1.0 without Content-Length: until close.
            (MessageKind::Response, b"HTTP/1.0 200 OK\r\n\r\nabc", &[3]),
        ];
        for &(kind, bytes, expected) in table {
            let got = decode(kind, bytes);
            assert!(
                got.errors.is_empty(),
                "{:?}: {:?}",
                String::from_utf8_lossy(bytes),
                got.errors
            );
            let lens: Vec<u64> = got.msgs.iter().map(|m| m.body_len).collect();
            assert_eq!(lens, expected, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn lenient_syntax_is_accepted() {
        let table: &[(MessageKind, &[u8], StartLine, u8)] = &[
            (
                MessageKind::Request,
                b"GET /x HTTP/1.1\nHOST: example.com\n\n",
                StartLine::Request {
                    method: "GET".into(),
                    target: "/x".into(),
                },
                1,
            ),
            (
                MessageKind::Request,
                b"\r\n\r\nGET  /y?q=1  HTTP/1.0 \r\nhost :example.com\r\nX-Long: a\r\n  folded\r\n\r\n",
                StartLine::Request {
                    method: "GET".into(),
                    target: "/y?q=1".into(),
                },
                0,
            ),
            (
                MessageKind::Response,
                b"HTTP/1.1 200\r\nContent-Length: 0\r\nHost:example.com\r\n\n",
                StartLine::Response { status: 200 },
                1,
            ),
            (
                MessageKind::Response,
                b"HTTP/1.1 404 \nContent-Length: 0\nHost: \t example.com \t\n\n",
                StartLine::Response { status: 404 },
                1,
            ),
        ];
        for (kind, bytes, start, minor) in table {
            let got = decode(*kind, bytes);
            assert!(
                got.errors.is_empty(),
                "{:?}: {:?}",
                String::from_utf8_lossy(bytes),
                got.errors
            );
            assert_eq!(got.msgs.len(), 1, "{:?}", String::from_utf8_lossy(bytes));
            assert_eq!(&got.msgs[0].start, start);
            assert_eq!(got.msgs[0].version_minor, *minor);
            assert_eq!(got.msgs[0].headers.host.as_deref(), Some("example.com"));
        }
    }

    #[test]
    fn content_length_body_is_skipped_without_being_buffered() {
        let head = b"POST /big HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n";
        let mut dec = Http1Decoder::new(MessageKind::Request, Http1Limits::default());
        let mut out = Vec::new();
        dec.feed(&Chunk::whole(head, 1), &mut out).expect("head");
        let body = vec![b'z'; 1 << 16];
        let mut sent = 0u64;
        let mut ts = 2;
        while sent < 1_000_000_000 {
            // 64 KiB captured, the rest of a 1 MiB write uncaptured.
            let len = (1u64 << 20).min(1_000_000_000 - sent) as usize;
            let bytes = &body[..body.len().min(len)];
            dec.feed(
                &Chunk {
                    bytes,
                    len,
                    ts_ns: ts,
                },
                &mut out,
            )
            .expect("body");
            assert!(dec.head.capacity() <= HEAD_BUFFER_KEPT_BYTES);
            sent += len as u64;
            ts += 1;
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].body_len, 1_000_000_000);
        assert_eq!((out[0].start_ns, out[0].end_ns), (1, ts - 1));
        assert!(!out[0].body_sync_lost);
    }

    #[test]
    fn head_spanning_chunks_copies_no_body_bytes() {
        let head = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 65536\r\n\r\n";
        let second = [&head[20..], &vec![b'b'; 65536][..]].concat();
        let mut dec = Http1Decoder::new(MessageKind::Request, Http1Limits::default());
        let mut out = Vec::new();
        dec.feed(&Chunk::whole(&head[..20], 1), &mut out)
            .expect("head start");
        dec.feed(&Chunk::whole(&second, 2), &mut out)
            .expect("head end and body");
        assert_eq!(
            request_summary(&out),
            owned_requests(&[("POST", "/x", 65536)])
        );
        // Only the head went through the buffer, so it stayed small and was kept.
        let capacity = dec.head.capacity();
        assert!(
            capacity > 0 && capacity < 1024,
            "head buffer capacity {capacity}"
        );
    }

    #[test]
    fn interim_100_continue_is_its_own_message() {
        let c = find_case("pyhttp11_expect_100");
        let head_end = c
            .req
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("end of head")
            + 4;
        let mut req_dec = Http1Decoder::new(MessageKind::Request, Http1Limits::default());
        let mut reqs = Vec::new();
        req_dec
            .feed(&Chunk::whole(&c.req[..head_end], 1), &mut reqs)
            .expect("head");
        // The client waits for 100 Continue: the request is open, its head known.
        assert!(reqs.is_empty() && req_dec.in_message());
        let open = req_dec.in_progress().expect("request in progress");
        assert!(matches!(&open.start, StartLine::Request { method, .. } if method == "POST"));
        req_dec
            .feed(&Chunk::whole(&c.req[head_end..], 3), &mut reqs)
            .expect("body");
        assert_eq!(
            (reqs[0].start_ns, reqs[0].end_ns, reqs[0].body_len),
            (1, 3, 2000)
        );

        let resps = responses(&reqs, &split(c.resp, &[25]));
        assert_clean(c.name, &resps);
        assert_eq!(
            resps
                .msgs
                .iter()
                .map(|m| (status(m), m.start_ns, m.end_ns))
                .collect::<Vec<_>>(),
            [(100, 1, 1), (200, 2, 2)]
        );
    }

    #[test]
    fn switching_protocols_and_connect_end_decoding() {
        let upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello";
        let mut dec = Http1Decoder::new(MessageKind::Response, Http1Limits::default());
        dec.expect_response_to("GET");
        let got = run(
            &mut dec,
            &[
                Chunk::whole(upgrade, 1),
                Chunk::whole(b"\x81\x02hi", 2),
                Chunk::whole(b"HTTP/1.1 200 OK\r\n\r\n", 3),
            ],
            true,
        );
        assert!(got.errors.is_empty(), "{:?}", got.errors);
        assert_eq!(response_summary(&got.msgs), [(101, 0)]);
        assert!(dec.is_tunnel() && !dec.in_message());
        assert_eq!(dec.pending_requests(), 0);

        // CONNECT answered 2xx: a tunnel; answered 407: an ordinary response.
        let mut dec = Http1Decoder::new(MessageKind::Response, Http1Limits::default());
        dec.expect_response_to("CONNECT");
        dec.expect_response_to("CONNECT");
        let got = run(
            &mut dec,
            &[
                Chunk::whole(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 4\r\n\r\nnope",
                    1,
                ),
                Chunk::whole(
                    b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x01\x00",
                    2,
                ),
                Chunk::whole(b"\x17\x03\x03\x00\x10", 3),
            ],
            false,
        );
        assert!(got.errors.is_empty(), "{:?}", got.errors);
        assert_eq!(response_summary(&got.msgs), [(407, 4), (200, 0)]);
        assert!(dec.is_tunnel());

        // The request side is told by the caller.
        let mut req = Http1Decoder::new(MessageKind::Request, Http1Limits::default());
        req.enter_tunnel();
        let got = run(&mut req, &[Chunk::whole(b"\x16\x03\x01garbage", 1)], true);
        assert!(got.errors.is_empty() && got.msgs.is_empty());
    }

    // ---- capture gaps ----------------------------------------------------------

    #[test]
    fn gap_anywhere_inside_a_content_length_body_is_exact() {
        let c = find_case("nginx_keepalive");
        let reqs = requests(&split(c.req, &[]));
        let head_end = c
            .resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("end of head")
            + 4;
        let body_end = head_end + 132;
        let reference = response_summary(&responses(&reqs.msgs, &split(c.resp, &[])).msgs);
        for from in head_end..body_end {
            for to in from + 1..=body_end {
                let chunks = [
                    Chunk {
                        bytes: &c.resp[..from],
                        len: to,
                        ts_ns: 1,
                    },
                    Chunk::whole(&c.resp[to..], 2),
                ];
                let got = responses(&reqs.msgs, &chunks);
                assert_clean(c.name, &got);
                assert_eq!(response_summary(&got.msgs), reference, "gap {from}..{to}");
                let first_end = if to == body_end { 1 } else { 2 };
                assert_eq!(got.msgs[0].end_ns, first_end, "gap {from}..{to}");
            }
        }
        // The same for the 2000-byte request body.
        let e = find_case("pyhttp11_expect_100");
        let got = requests(&[
            Chunk {
                bytes: &e.req[..300],
                len: 1000,
                ts_ns: 1,
            },
            Chunk::whole(&e.req[1000..], 2),
        ]);
        assert_clean(e.name, &got);
        assert_eq!(request_summary(&got.msgs), owned_requests(e.requests));
    }

    #[test]
    fn gap_past_the_end_of_a_body_resyncs_on_the_next_start_line() {
        let c = find_case("nginx_keepalive");
        let head_end = c
            .resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("end of head")
            + 4;
        let body_end = head_end + 132;
        let mut dec = response_decoder(&[]);
        let got = run(
            &mut dec,
            &[
                // Body and the start of the 404 response uncaptured.
                Chunk {
                    bytes: &c.resp[..head_end + 10],
                    len: body_end + 40,
                    ts_ns: 1,
                },
                // The rest of the 404 (not a start line): skipped without error.
                Chunk::whole(&c.resp[body_end + 40..], 2),
                Chunk::whole(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", 3),
            ],
            true,
        );
        assert!(got.errors.is_empty(), "{:?}", got.errors);
        assert_eq!(response_summary(&got.msgs), [(200, 132), (200, 1)]);
        assert_eq!(got.msgs[0].end_ns, 1);
        assert!(!got.msgs[0].body_sync_lost);
    }

    #[test]
    fn gap_inside_a_request_head_ends_the_request_at_that_chunk() {
        let c = find_case("pyserver_post_501");
        // Captured up to the middle of the User-Agent line.
        let cut = c
            .req
            .windows(10)
            .position(|w| w == b"User-Agent")
            .expect("user agent")
            + 5;
        let mut dec = Http1Decoder::new(MessageKind::Request, Http1Limits::default());
        let got = run(
            &mut dec,
            &[
                Chunk {
                    bytes: &c.req[..cut],
                    len: c.req.len() - 21,
                    ts_ns: 1,
                },
                // The body, in its own write: not a start line, skipped.
                Chunk::whole(&c.req[c.req.len() - 21..], 2),
                Chunk::whole(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n", 3),
            ],
            true,
        );
        assert!(got.errors.is_empty(), "{:?}", got.errors);
        assert_eq!(
            request_summary(&got.msgs),
            owned_requests(&[("POST", "/submit", 0), ("GET", "/next", 0)])
        );
        let first = &got.msgs[0];
        assert!(first.head_truncated && first.body_sync_lost);
        assert!(first.headers.host.is_some());
        assert_eq!(first.headers.user_agent, None);
        assert_eq!((first.start_ns, first.end_ns), (1, 1));
        assert!(!got.msgs[1].head_truncated);
    }

    #[test]
    fn gap_inside_a_response_head_keeps_it_open_until_the_next_status_line() {
        let c = find_case("nginx_keepalive");
        let head_end = c
            .resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("end of head")
            + 4;
        let body_end = head_end + 132;
        let chunks = [
            Chunk {
                bytes: &c.resp[..40],
                len: head_end,
                ts_ns: 1,
            },
            Chunk::whole(&c.resp[head_end..body_end], 2),
            Chunk::whole(&c.resp[body_end..], 3),
        ];
        let mut dec = response_decoder(&[]);
        let mut out = Vec::new();
        dec.feed(&chunks[0], &mut out).expect("cut head");
        assert!(out.is_empty() && dec.in_message());
        dec.feed(&chunks[1], &mut out).expect("body");
        assert!(out.is_empty() && dec.in_message());
        dec.feed(&chunks[2], &mut out).expect("next response");
        assert_eq!(response_summary(&out), [(200, 132), (404, 153)]);
        assert!(out[0].head_truncated && out[0].body_sync_lost);
        assert_eq!((out[0].start_ns, out[0].end_ns), (1, 2));
        assert!(!out[1].head_truncated && !out[1].body_sync_lost);

        // Or until finish.
        let mut dec = response_decoder(&[]);
        let got = run(&mut dec, &chunks[..2], true);
        assert_eq!(response_summary(&got.msgs), [(200, 132)]);
        assert!(got.msgs[0].body_sync_lost && got.msgs[0].head_truncated);

        // A cut 204 head has no body: it ends with its chunk.
        let got = decode_chunks(
            MessageKind::Response,
            &[Chunk {
                bytes: b"HTTP/1.1 204 No Content\r\nServ",
                len: 80,
                ts_ns: 5,
            }],
        );
        assert_eq!(response_summary(&got.msgs), [(204, 0)]);
        assert_eq!(got.msgs[0].end_ns, 5);
    }

    fn decode_chunks(kind: MessageKind, chunks: &[Chunk<'_>]) -> Decoded {
        run(
            &mut Http1Decoder::new(kind, Http1Limits::default()),
            chunks,
            false,
        )
    }

    #[test]
    fn gap_over_a_cut_start_line_is_an_error_then_recovers() {
        let got = decode_chunks(
            MessageKind::Response,
            &[
                Chunk {
                    bytes: b"HTTP/1.1 2",
                    len: 200,
                    ts_ns: 1,
                },
                Chunk::whole(b"body bytes", 2),
                Chunk::whole(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 3),
            ],
        );
        assert_eq!(got.errors, [Http1Error::StartLineCut { captured: 10 }]);
        assert_eq!(response_summary(&got.msgs), [(200, 0)]);
    }

    #[test]
    fn gap_inside_chunk_data_is_exact() {
        let c = find_case("pyhttp11_chunked_response");
        let data = c
            .resp
            .windows(5)
            .position(|w| w == b"abcde")
            .expect("chunk data");
        let chunks = [
            Chunk {
                bytes: &c.resp[..data + 3],
                len: data + 20,
                ts_ns: 1,
            },
            Chunk::whole(&c.resp[data + 20..], 2),
        ];
        let reqs = requests(&split(c.req, &[]));
        let got = responses(&reqs.msgs, &chunks);
        assert_clean(c.name, &got);
        assert_eq!(response_summary(&got.msgs), c.responses);
    }

    #[test]
    fn gap_over_a_chunk_size_line_loses_sync_until_the_next_start_line() {
        let c = find_case("pyhttp11_chunked_response");
        let size_line = c
            .resp
            .windows(3)
            .position(|w| w == b"A\r\n")
            .expect("second chunk");
        let next = c
            .resp
            .windows(12)
            .position(|w| w == b"HTTP/1.1 204")
            .expect("204");
        let reqs = requests(&split(c.req, &[]));
        let got = responses(
            &reqs.msgs,
            &[
                Chunk {
                    bytes: &c.resp[..size_line],
                    len: size_line + 7,
                    ts_ns: 1,
                },
                Chunk::whole(&c.resp[size_line + 7..next], 2),
                Chunk::whole(&c.resp[next..], 3),
            ],
        );
        assert!(got.errors.is_empty(), "{:?}", got.errors);
        assert_eq!(got.msgs.len(), 2);
        assert!(got.msgs[0].body_sync_lost && !got.msgs[0].head_truncated);
        assert_eq!(status(&got.msgs[0]), 200);
        assert_eq!(got.msgs[0].end_ns, 2);
        // 26 read + 7 in the gap + the 32 bytes after it: an estimate.
        assert_eq!(got.msgs[0].body_len, 26 + 7 + (next - size_line - 7) as u64);
        assert_eq!(response_summary(&got.msgs[1..]), [(204, 0)]);

        // The same in a request body; the next request resyncs.
        let r = find_case("pyhttp11_chunked_request");
        let end = r.req.len();
        let got = requests(&[
            Chunk {
                bytes: &r.req[..end - 6],
                len: end,
                ts_ns: 1,
            },
            Chunk::whole(b"GET /after HTTP/1.1\r\n\r\n", 2),
        ]);
        assert!(got.errors.is_empty(), "{:?}", got.errors);
        assert_eq!(
            request_summary(&got.msgs),
            owned_requests(&[("POST", "/upload", 100 + 6), ("GET", "/after", 0)])
        );
        assert!(got.msgs[0].body_sync_lost);
        assert_eq!(got.msgs[0].end_ns, 1);
    }

    #[test]
    fn gap_at_a_message_boundary_resyncs() {
        // The second request's start is in the gap: it is lost, the third decodes.
        let first = b"GET /1 HTTP/1.1\r\n\r\n";
        let got = decode_chunks(
            MessageKind::Request,
            &[
                Chunk {
                    bytes: first,
                    len: first.len() + 30,
                    ts_ns: 1,
                },
                Chunk::whole(b"er: x\r\n\r\n", 2),
                Chunk::whole(b"GET /3 HTTP/1.1\r\n\r\n", 3),
            ],
        );
        assert!(got.errors.is_empty(), "{:?}", got.errors);
        assert_eq!(
            request_summary(&got.msgs),
            owned_requests(&[("GET", "/1", 0), ("GET", "/3", 0)])
        );
    }

    #[test]
    fn huge_chunk_size_is_skipped_by_gaps() {
        let mut dec = Http1Decoder::new(MessageKind::Response, Http1Limits::default());
        let mut out = Vec::new();
        dec.feed(
            &Chunk::whole(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\nab",
                1,
            ),
            &mut out,
        )
        .expect("max chunk size");
        dec.feed(
            &Chunk {
                bytes: b"cd",
                len: 1 << 30,
                ts_ns: 2,
            },
            &mut out,
        )
        .expect("gap in data");
        assert!(out.is_empty());
        let open = dec.in_progress().expect("open");
        assert_eq!(open.body_len, 2 + (1 << 30));
        assert!(!open.body_sync_lost);
    }

    // ---- errors and recovery ---------------------------------------------------

    #[test]
    fn errors_then_recovery_at_the_next_start_line() {
        let small = Http1Limits {
            max_head_bytes: 64,
            max_headers: 2,
        };
        let def = Http1Limits::default();
        let req = MessageKind::Request;
        let resp = MessageKind::Response;
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let table: Vec<(MessageKind, &Http1Limits, Vec<u8>, Http1Error)> = vec![
            (
                req,
                &def,
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
                Http1Error::NotHttp {
                    expected: "a request line (METHOD target HTTP/1.x)",
                    found: "a TLS handshake record",
                },
            ),
            (
                req,
                &def,
                b"\x00\x01\x02\xff\xfe binary\r\n\r\n".to_vec(),
                Http1Error::NotHttp {
                    expected: "a request line (METHOD target HTTP/1.x)",
                    found: "binary data",
                },
            ),
            (
                resp,
                &def,
                b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(),
                Http1Error::NotHttp {
                    expected: "a status line (HTTP/1.x code reason)",
                    found: "other text",
                },
            ),
            (
                req,
                &def,
                [&[b'A'; 40][..], b" / HTTP/1.1\r\n\r\n"].concat(),
                Http1Error::NotHttp {
                    expected: "a request line (METHOD target HTTP/1.x)",
                    found: "other text",
                },
            ),
            (
                req,
                &def,
                b"hello world, this is not http\r\n\r\n".to_vec(),
                Http1Error::BadRequestLine {
                    reason: "malformed HTTP version",
                },
            ),
            (
                req,
                &def,
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
                Http1Error::UnsupportedVersion { major: 2, minor: 0 },
            ),
            (
                req,
                &def,
                b"GET /a\x01b HTTP/1.1\r\n\r\n".to_vec(),
                Http1Error::BadRequestLine {
                    reason: "the target is empty or has control characters",
                },
            ),
            (
                resp,
                &def,
                b"HTTP/1.1 20 OK\r\n\r\n".to_vec(),
                Http1Error::BadStatusLine {
                    reason: "no three-digit status code",
                },
            ),
            (
                resp,
                &def,
                b"HTTP/1.1 099 Low\r\n\r\n".to_vec(),
                Http1Error::BadStatusLine {
                    reason: "status code below 100",
                },
            ),
            (
                resp,
                &def,
                b"HTTP/3.0 200 OK\r\n\r\n".to_vec(),
                Http1Error::UnsupportedVersion { major: 3, minor: 0 },
            ),
            (
                req,
                &def,
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(),
                Http1Error::ConflictingContentLength {
                    first: 1,
                    second: 2,
                },
            ),
            (
                req,
                &def,
                b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\nab".to_vec(),
                Http1Error::ConflictingContentLength {
                    first: 1,
                    second: 2,
                },
            ),
            (
                req,
                &def,
                b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
                Http1Error::BadContentLength {
                    reason: "not a decimal number",
                },
            ),
            (
                resp,
                &def,
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n".to_vec(),
                Http1Error::BadContentLength {
                    reason: "does not fit in 64 bits",
                },
            ),
            (
                req,
                &def,
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
                Http1Error::BadTransferEncoding,
            ),
            (
                req,
                &def,
                b"GET / HTTP/1.1\r\nthis line has no colon\r\n\r\n".to_vec(),
                Http1Error::BadHeader {
                    index: 1,
                    reason: "no colon",
                },
            ),
            (
                req,
                &def,
                b"GET / HTTP/1.1\r\nA: 1\r\n: empty name\r\n\r\n".to_vec(),
                Http1Error::BadHeader {
                    index: 2,
                    reason: "empty field name",
                },
            ),
            (
                req,
                &small,
                b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n".to_vec(),
                Http1Error::TooManyHeaders { limit: 2 },
            ),
            (
                req,
                &small,
                [&b"GET / HTTP/1.1\r\nX: "[..], &[b'x'; 60], b"\r\n\r\n"].concat(),
                Http1Error::HeadTooLarge { limit: 64 },
            ),
            (
                resp,
                &def,
                [&chunked[..], b"zz\r\n"].concat(),
                Http1Error::BadChunkSize {
                    reason: "the line does not start with a hex digit",
                },
            ),
            (
                resp,
                &def,
                [&chunked[..], b"5x\r\n"].concat(),
                Http1Error::BadChunkSize {
                    reason: "unexpected byte after the chunk size",
                },
            ),
            (
                resp,
                &def,
                [&chunked[..], b"1FFFFFFFFFFFFFFFF\r\n"].concat(),
                Http1Error::ChunkSizeOverflow,
            ),
            (
                resp,
                &def,
                [&chunked[..], b"3\r\nabcX"].concat(),
                Http1Error::BadChunkEnd,
            ),
            (
                resp,
                &def,
                [&chunked[..], b"3\r\nabc\rX"].concat(),
                Http1Error::BadChunkEnd,
            ),
            (
                resp,
                &small,
                [&chunked[..], b"3;", &[b'e'; 80], b"\r\n"].concat(),
                Http1Error::ChunkMetadataTooLarge { limit: 64 },
            ),
            (
                resp,
                &small,
                [&chunked[..], b"0\r\n", &[b't'; 80], b"\r\n\r\n"].concat(),
                Http1Error::ChunkMetadataTooLarge { limit: 64 },
            ),
        ];
        for (kind, limits, bad, expected) in table {
            let good: &[u8] = match kind {
                MessageKind::Request => b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\n",
                MessageKind::Response => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            };
            // Bad alone, then bad split at every point: the same error each time,
            // and the next good message decodes.
            for cut in 0..bad.len() {
                let mut dec = Http1Decoder::new(kind, limits.clone());
                let mut chunks = split(&bad, &[cut]);
                if cut == 0 {
                    chunks.remove(0);
                }
                chunks.push(Chunk::whole(good, 9));
                let got = run(&mut dec, &chunks, true);
                let context = format!("{:?} cut {cut}", String::from_utf8_lossy(&bad));
                assert_eq!(got.errors.len(), 1, "{context}: {:?}", got.errors);
                match (&got.errors[0], &expected) {
                    // What the bytes look like depends on how many were there.
                    (
                        Http1Error::NotHttp { expected: got, .. },
                        Http1Error::NotHttp { expected: want, .. },
                    ) if cut > 0 => assert_eq!(got, want, "{context}"),
                    (got, want) => assert_eq!(got, want, "{context}"),
                }
                assert_eq!(got.msgs.len(), 1, "{context}: {:?}", got.msgs);
                assert_eq!(got.msgs[0].start_ns, 9, "{context}");
                assert!(!expected.to_string().is_empty());
            }
        }
    }

    #[test]
    fn error_mid_chunk_keeps_earlier_messages_and_skips_until_a_start_line() {
        let mut dec = Http1Decoder::new(MessageKind::Request, Http1Limits::default());
        let got = run(
            &mut dec,
            &[
                Chunk::whole(b"GET /1 HTTP/1.1\r\n\r\n\x00\x00garbage", 1),
                Chunk::whole(b"more garbage that is not a start line", 2),
                Chunk::whole(b"GET /2 HTTP/1.1\r\n\r\n", 3),
            ],
            true,
        );
        assert_eq!(got.errors.len(), 1, "{:?}", got.errors);
        assert_eq!(
            request_summary(&got.msgs),
            owned_requests(&[("GET", "/1", 0), ("GET", "/2", 0)])
        );
    }

    #[test]
    fn head_limit_is_exact() {
        let limits = Http1Limits {
            max_head_bytes: 40,
            max_headers: 1,
        };
        let fits = b"GET / HTTP/1.1\r\nHost: 0123456789abcd\r\n\r\n";
        assert_eq!(fits.len(), 40);
        let too_big = b"GET / HTTP/1.1\r\nHost: 0123456789abcde\r\n\r\n";
        for cut in 1..fits.len() {
            let got = run(
                &mut Http1Decoder::new(MessageKind::Request, limits.clone()),
                &split(fits, &[cut]),
                true,
            );
            assert!(got.errors.is_empty(), "cut {cut}: {:?}", got.errors);
            assert_eq!(got.msgs.len(), 1);
        }
        for cut in 1..too_big.len() {
            let got = run(
                &mut Http1Decoder::new(MessageKind::Request, limits.clone()),
                &split(too_big, &[cut]),
                true,
            );
            assert_eq!(
                got.errors,
                [Http1Error::HeadTooLarge { limit: 40 }],
                "cut {cut}"
            );
            assert!(got.msgs.is_empty());
        }
    }

    // ---- finish, pairing, detection ---------------------------------------------

    #[test]
    fn finish_completes_open_messages() {
        // Close-delimited: end_ns is the last data chunk's ts.
        let c = find_case("pyhttp11_close_delimited");
        let mut dec = response_decoder(&[]);
        let got = run(&mut dec, &split(c.resp, &[c.resp.len() - 9]), false);
        assert!(got.msgs.is_empty() && dec.in_message());
        let mut out = Vec::new();
        dec.finish(&mut out);
        assert_eq!(response_summary(&out), [(200, 18)]);
        assert_eq!(
            (out[0].start_ns, out[0].end_ns, out[0].body_sync_lost),
            (1, 2, false)
        );
        assert!(!dec.in_message());
        dec.finish(&mut out);
        assert_eq!(out.len(), 1, "a second finish emits nothing");

        // A Content-Length body cut short: sync lost.
        let got = run(
            &mut response_decoder(&[]),
            &[Chunk::whole(
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                4,
            )],
            true,
        );
        assert_eq!(response_summary(&got.msgs), [(200, 3)]);
        assert!(got.msgs[0].body_sync_lost && !got.msgs[0].head_truncated);
        assert_eq!(got.msgs[0].end_ns, 4);

        // A head in progress with a complete start line; one without.
        let got = run(
            &mut Http1Decoder::new(MessageKind::Request, Http1Limits::default()),
            &[Chunk::whole(b"GET /half HTTP/1.1\r\nHost: h\r\nUser-Ag", 4)],
            true,
        );
        assert_eq!(
            request_summary(&got.msgs),
            owned_requests(&[("GET", "/half", 0)])
        );
        assert!(got.msgs[0].head_truncated && got.msgs[0].body_sync_lost);
        assert_eq!(got.msgs[0].headers.host.as_deref(), Some("h"));
        let got = run(
            &mut Http1Decoder::new(MessageKind::Request, Http1Limits::default()),
            &[Chunk::whole(b"GET /ha", 4)],
            true,
        );
        assert!(got.msgs.is_empty() && got.errors.is_empty());

        // After finish, the stream goes on at the next start line.
        let mut dec = response_decoder(&[]);
        let got = run(
            &mut dec,
            &[Chunk::whole(
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                1,
            )],
            true,
        );
        assert_eq!(got.msgs.len(), 1);
        let got = run(
            &mut dec,
            &[
                Chunk::whole(b"defg", 2),
                Chunk::whole(b"HTTP/1.1 204 No Content\r\n\r\n", 3),
            ],
            false,
        );
        assert!(got.errors.is_empty(), "{:?}", got.errors);
        assert_eq!(response_summary(&got.msgs), [(204, 0)]);
    }

    #[test]
    fn a_response_that_fails_to_decode_still_answers_its_request() {
        let mut dec = Http1Decoder::new(
            MessageKind::Response,
            Http1Limits {
                max_headers: 1,
                ..Http1Limits::default()
            },
        );
        dec.expect_response_to("GET");
        dec.expect_response_to("HEAD");
        let got = run(
            &mut dec,
            &[
                Chunk::whole(b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\n\r\n", 1),
                Chunk::whole(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 2),
            ],
            false,
        );
        assert_eq!(got.errors, [Http1Error::TooManyHeaders { limit: 1 }]);
        // The second answers the HEAD: no body, not waiting for 5 bytes.
        assert_eq!(response_summary(&got.msgs), [(200, 0)]);
        assert!(!dec.in_message());
    }

    #[test]
    fn expect_response_to_is_bounded_and_ignored_by_request_decoders() {
        let mut dec = Http1Decoder::new(MessageKind::Response, Http1Limits::default());
        dec.expect_response_to("HEAD");
        for _ in 0..MAX_PENDING_REQUESTS {
            dec.expect_response_to("GET");
        }
        assert_eq!(dec.pending_requests(), MAX_PENDING_REQUESTS);
        // The oldest (HEAD) was dropped: this response has a body.
        let got = run(
            &mut dec,
            &[Chunk::whole(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                1,
            )],
            false,
        );
        assert_eq!(response_summary(&got.msgs), [(200, 2)]);

        let mut req = Http1Decoder::new(MessageKind::Request, Http1Limits::default());
        req.expect_response_to("HEAD");
        assert_eq!(req.pending_requests(), 0);
        assert_eq!(req.kind(), MessageKind::Request);
    }

    #[test]
    fn protocol_detection() {
        let table: &[(&[u8], bool, bool)] = &[
            (b"GET / HTTP/1.1\r\n", true, false),
            (b"POST /x HTTP/1.1", true, false),
            (b"PROPFIND /dav HTTP/1.1", true, false),
            (b"CONNECT example.com:443 HTTP/1.1", true, false),
            (b"OPTIONS * HTTP/1.1", true, false),
            (b"GET ", true, false),
            (b"GET", false, false),
            (b"GETX / HTTP/1.1", false, false),
            (b"get / HTTP/1.1", false, false),
            (b"GET  / HTTP/1.1", false, false),
            (b"HTTP/1.1 200 OK\r\n", false, true),
            (b"HTTP/1.0 404", false, true),
            (b"HTTP/2.0 200", false, false),
            (b"HTTP/1", false, false),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", false, false),
            (b"\x16\x03\x01\x00", false, false),
            (b"", false, false),
        ];
        for &(bytes, req, resp) in table {
            let shown = String::from_utf8_lossy(bytes);
            assert_eq!(looks_like_request(bytes), req, "{shown:?}");
            assert_eq!(looks_like_response(bytes), resp, "{shown:?}");
        }
    }

    #[test]
    fn kept_values_are_capped_at_a_char_boundary() {
        let long = vec![b'a'; 600];
        assert_eq!(kept_value(&long).len(), MAX_KEPT_VALUE_BYTES);
        // "é" is two bytes: 511 ASCII bytes then "é" straddles the cap.
        let mut straddle = vec![b'a'; 511];
        straddle.extend_from_slice("éé".as_bytes());
        assert_eq!(kept_value(&straddle), "a".repeat(511));
        let invalid = vec![0xff; 600];
        let kept = kept_value(&invalid);
        assert!(kept.len() <= MAX_KEPT_VALUE_BYTES && kept.chars().all(|c| c == '\u{fffd}'));
        assert_eq!(kept_value(b"tracer"), "tracer");

        let head = [
            &b"GET / HTTP/1.1\r\nUser-Agent: "[..],
            &long,
            b"\r\nHost: first\r\nHost: second\r\n\r\n",
        ]
        .concat();
        let got = decode(MessageKind::Request, &head);
        assert_eq!(
            got.msgs[0].headers.user_agent.as_ref().map(String::len),
            Some(MAX_KEPT_VALUE_BYTES)
        );
        assert_eq!(got.msgs[0].headers.host.as_deref(), Some("first"));
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

    /// Random chunks of `bytes`; with `gaps`, some chunks leave a suffix uncaptured.
    fn random_chunks<'a>(
        rng: &mut Rng,
        bytes: &'a [u8],
        gaps: bool,
        ts: &mut u64,
    ) -> Vec<Chunk<'a>> {
        let mut chunks = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let max = [2, 8, 64, 512][rng.below(4)];
            let size = (1 + rng.below(max)).min(bytes.len() - pos);
            let gap = if gaps && rng.below(4) == 0 {
                rng.below(300).min(bytes.len() - pos - size)
            } else {
                0
            };
            *ts += 1;
            chunks.push(Chunk {
                bytes: &bytes[pos..pos + size],
                len: size + gap,
                ts_ns: *ts,
            });
            pos += size + gap;
        }
        chunks
    }

    fn feed_one(dec: &mut Http1Decoder, chunk: &Chunk<'_>, decoded: &mut Decoded) {
        if let Err(e) = dec.feed(chunk, &mut decoded.msgs) {
            assert_ne!(e, Http1Error::Stalled);
            decoded.errors.push(e);
        }
        assert!(dec.head.len() <= dec.limits.max_head_bytes);
    }

    /// Feeds chunks, telling the response decoder about each request as it completes;
    /// checks the invariants that must hold for any input.
    fn feed_checked(
        req: &mut Http1Decoder,
        resp: &mut Http1Decoder,
        req_chunks: &[Chunk<'_>],
        resp_chunks: &[Chunk<'_>],
    ) -> (Decoded, Decoded) {
        let mut reqs = Decoded::default();
        for chunk in req_chunks {
            let before = reqs.msgs.len();
            feed_one(req, chunk, &mut reqs);
            for m in &reqs.msgs[before..] {
                if let StartLine::Request { method, .. } = &m.start {
                    resp.expect_response_to(method);
                }
            }
        }
        req.finish(&mut reqs.msgs);
        let mut resps = Decoded::default();
        for chunk in resp_chunks {
            feed_one(resp, chunk, &mut resps);
        }
        resp.finish(&mut resps.msgs);
        assert!(!req.in_message() && !resp.in_message());
        for m in reqs.msgs.iter().chain(&resps.msgs) {
            assert!(m.start_ns <= m.end_ns, "{m:?}");
            for value in [
                &m.headers.host,
                &m.headers.user_agent,
                &m.headers.traceparent,
            ] {
                assert!(
                    value
                        .as_ref()
                        .is_none_or(|v| v.len() <= MAX_KEPT_VALUE_BYTES)
                );
            }
        }
        (reqs, resps)
    }

    #[test]
    fn random_splits_gaps_and_mutations_never_panic() {
        let cases = cases();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..3000 {
            let c = &cases[rng.below(cases.len())];
            let gaps = round % 3 == 1;
            let mutate = round % 3 == 2;
            let (mut req_bytes, mut resp_bytes) = (c.req.to_vec(), c.resp.to_vec());
            if mutate {
                for bytes in [&mut req_bytes, &mut resp_bytes] {
                    for _ in 0..1 + rng.below(4) {
                        let at = rng.below(bytes.len());
                        match rng.below(3) {
                            0 => bytes[at] = rng.next() as u8,
                            1 => bytes.insert(at, b"\r\n:; 0aF"[rng.below(8)]),
                            _ => {
                                bytes.remove(at);
                            }
                        }
                    }
                }
            }
            let limits = if rng.below(8) == 0 {
                Http1Limits {
                    max_head_bytes: rng.below(200),
                    max_headers: rng.below(5),
                }
            } else {
                Http1Limits::default()
            };
            let mut ts = 0;
            let req_chunks = random_chunks(&mut rng, &req_bytes, gaps, &mut ts);
            let resp_chunks = random_chunks(&mut rng, &resp_bytes, gaps, &mut ts);
            let mut req = Http1Decoder::new(MessageKind::Request, limits.clone());
            let mut resp = Http1Decoder::new(MessageKind::Response, limits.clone());
            let (reqs, resps) = feed_checked(&mut req, &mut resp, &req_chunks, &resp_chunks);
            if !gaps && !mutate && limits == Http1Limits::default() {
                assert_clean(c.name, &reqs);
                assert_clean(c.name, &resps);
                assert_eq!(
                    request_summary(&reqs.msgs),
                    owned_requests(c.requests),
                    "{} round {round}",
                    c.name
                );
                assert_eq!(
                    response_summary(&resps.msgs),
                    c.responses,
                    "{} round {round}",
                    c.name
                );
            }
        }
    }

    #[test]
    fn random_token_soup_never_panics() {
        const FRAGMENTS: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\n",
            b"HEAD /h HTTP/1.0\r\n",
            b"POST /p HTTP/1.1\r\n",
            b"CONNECT a:443 HTTP/1.1\r\n",
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 100 Continue\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n",
            b"HTTP/1.0 204 No Content\r\n",
            b"HTTP/1.1 304 Not Modified\r\n",
            b"Content-Length: 5\r\n",
            b"Content-Length: 18446744073709551615\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Host: x\r\n",
            b"Cookie: c=1\r\n",
            b" folded\r\n",
            b"\r\n",
            b"\n",
            b"5\r\nabcde\r\n",
            b"0\r\n\r\n",
            b"FFFFFFFFFFFFFFFF\r\n",
            b"3;x=y\r\n",
            b"hello",
            b"\x00\xff",
            b":",
        ];
        let mut rng = Rng(42);
        for _ in 0..3000 {
            let mut streams = [Vec::new(), Vec::new()];
            for stream in &mut streams {
                for _ in 0..1 + rng.below(30) {
                    stream.extend_from_slice(FRAGMENTS[rng.below(FRAGMENTS.len())]);
                }
            }
            let limits = Http1Limits {
                max_head_bytes: 16 + rng.below(300),
                max_headers: rng.below(8),
            };
            let mut req = Http1Decoder::new(MessageKind::Request, limits.clone());
            let mut resp = Http1Decoder::new(MessageKind::Response, limits);
            for _ in 0..rng.below(3) {
                resp.expect_response_to(["HEAD", "CONNECT", "GET"][rng.below(3)]);
            }
            let mut ts = 0;
            let gaps = rng.below(2) == 0;
            let req_chunks = random_chunks(&mut rng, &streams[0], gaps, &mut ts);
            let resp_chunks = random_chunks(&mut rng, &streams[1], gaps, &mut ts);
            feed_checked(&mut req, &mut resp, &req_chunks, &resp_chunks);
        }
    }
}
