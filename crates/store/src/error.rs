//! The store's error type.

use cbs_domain::BuildKey;
use cbs_projections::FoldError;

/// What can go wrong in the store. `Conflict` and `Rejected` are the caller's to handle;
/// the rest are infrastructure failures (retry later).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer appended to the build first; re-read and decide again.
    #[error("build {key}: another writer appended event {expected_seq} first")]
    Conflict { key: BuildKey, expected_seq: u32 },
    /// The event does not fit the build's state (including a fenced-off attempt).
    #[error(transparent)]
    Rejected(#[from] FoldError),
    #[error("build {0} does not exist")]
    NotFound(BuildKey),
    /// Output of an attempt that is not running (any more): its lease was taken away.
    #[error("build {key}: attempt {attempt} is not running; its output is refused")]
    OutputFenced { key: BuildKey, attempt: u32 },
    /// A stored row cannot be read back (a bug or a manual edit).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("database: {}", describe_db(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database migrations: {0}")]
    Migration(String),
    #[error("database config: {0}")]
    Config(String),
    /// A connection outside the pool (listener, notifier) broke or stopped answering.
    #[error("database connection: {0}")]
    Connection(String),
}

impl StoreError {
    /// The writer's attempt (or reproduction) was fenced off: its lease is gone, it must
    /// stop.
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            StoreError::Rejected(FoldError::Fenced { .. } | FoldError::ReproductionFenced { .. })
                | StoreError::OutputFenced { .. }
        )
    }
}

/// tokio-postgres prints only "db error" for errors the server sent: add the server's words.
fn describe_db(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}
