//! What every database decoder produces: one [`DbCall`] per operation a client ran,
//! and the connection state the pool tracker needs (transaction status, namespace).
//!
//! Database decoders see both directions of one connection (client → server
//! requests, server → client responses) because pairing is protocol specific. The
//! caller feeds each direction's chunks in timestamp order; a call is emitted when
//! its response is complete. [`DbDecoder`] puts the three database decoders behind
//! one interface and picks one from a connection's first bytes or its port.

/// `db.system.name` values (OpenTelemetry database conventions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DbSystem {
    Postgresql,
    Mysql,
    Redis,
}

impl DbSystem {
    pub fn as_str(self) -> &'static str {
        match self {
            DbSystem::Postgresql => "postgresql",
            DbSystem::Mysql => "mysql",
            DbSystem::Redis => "redis",
        }
    }
}

/// Transaction state of a connection, as the server last reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TxStatus {
    /// Not known yet (no status seen, or the protocol has none: Redis outside MULTI).
    #[default]
    Unknown,
    /// Idle, not in a transaction.
    Idle,
    /// Inside a transaction block.
    InTransaction,
    /// Inside a failed transaction block (PostgreSQL 'E'): only ROLLBACK will do.
    Failed,
}

impl TxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TxStatus::Unknown => "unknown",
            TxStatus::Idle => "idle",
            TxStatus::InTransaction => "in_transaction",
            TxStatus::Failed => "failed",
        }
    }

    /// A transaction is open (possibly failed): the connection is in use.
    pub fn in_transaction(self) -> bool {
        matches!(self, TxStatus::InTransaction | TxStatus::Failed)
    }
}

/// One database operation: a request and its complete response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbCall {
    pub system: DbSystem,
    /// `db.operation.name`: the SQL keyword (`SELECT`, `INSERT`, `BEGIN`, …) or the
    /// Redis command (`GET`, `HSET`, …), upper case. `None` when unknown.
    pub operation: Option<String>,
    /// The statement as sent (raw SQL; for prepared statements the text remembered from
    /// the prepare, never a placeholder like "PREPARED STATEMENT"). For Redis, the
    /// command name followed by `?` for each argument is fine; never argument values.
    /// Literal obfuscation happens later, in the span layer, not in the decoder.
    pub query_text: Option<String>,
    /// `db.namespace`: the database (PostgreSQL/MySQL) or the Redis DB index, when known.
    pub namespace: Option<String>,
    /// Unix ns of the chunk holding the first request byte.
    pub start_ns: u64,
    /// Unix ns of the chunk completing the response.
    pub end_ns: u64,
    /// `db.response.status_code` when the operation failed: the SQLSTATE
    /// (PostgreSQL), the error number (MySQL) or the error prefix such as `ERR` or
    /// `WRONGTYPE` (Redis). `None` on success.
    pub error_code: Option<String>,
    /// Rows returned or affected, when the protocol says.
    pub rows: Option<u64>,
}

mod decoder;

pub use decoder::{DbDecodeError, DbDecoder};
