//! `rebuild-projections`: folds the whole log again and compares with the stored projection.
//!
//! Runs in one REPEATABLE READ transaction, so the log and the projection are read from the
//! same snapshot and concurrent writers cause no false differences. Builds are read a page
//! at a time, so memory stays bounded whatever the size of the log.

use std::fmt;

use cbs_domain::BuildKey;
use cbs_projections::{replay, BuildState};
use tokio_postgres::IsolationLevel;
use tracing::warn;

use crate::{queries, StoreError};

const PAGE: u32 = 500;

/// What the rebuild found.
#[derive(Debug, Default)]
pub struct RebuildReport {
    /// Builds compared.
    pub builds: u64,
    /// Events folded.
    pub events: u64,
    pub differences: Vec<Difference>,
    /// Whether the differing rows were overwritten with the rebuilt ones.
    pub fixed: bool,
}

/// One build whose stored projection is not the fold of its log.
#[derive(Debug)]
pub struct Difference {
    pub key: String,
    pub kind: DifferenceKind,
}

#[derive(Debug)]
pub enum DifferenceKind {
    /// Events exist, but no projection row.
    MissingRow,
    /// A projection row exists, but no events.
    ExtraRow,
    /// Both exist and these fields differ: (field, stored, rebuilt).
    Fields(Vec<(&'static str, String, String)>),
    /// The log itself does not fold (a bug or a manual edit): the error.
    Unfoldable(String),
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            DifferenceKind::MissingRow => write!(f, "{}: events but no projection row", self.key),
            DifferenceKind::ExtraRow => write!(f, "{}: projection row but no events", self.key),
            DifferenceKind::Unfoldable(e) => write!(f, "{}: log does not fold: {e}", self.key),
            DifferenceKind::Fields(fields) => {
                write!(f, "{}:", self.key)?;
                for (name, stored, rebuilt) in fields {
                    write!(f, " {name} stored={stored} rebuilt={rebuilt};")?;
                }
                Ok(())
            }
        }
    }
}

/// The fields of two states that differ.
fn diff(stored: &BuildState, rebuilt: &BuildState) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    macro_rules! cmp {
        ($($field:ident),*) => {$(
            if stored.$field != rebuilt.$field {
                out.push((
                    stringify!($field),
                    format!("{:?}", stored.$field),
                    format!("{:?}", rebuilt.$field),
                ));
            }
        )*};
    }
    cmp!(
        key,
        status,
        request,
        attempt,
        failures,
        owner,
        lease_expires_at,
        available_at,
        current_step,
        last_error,
        artifact,
        last_seq,
        created_at,
        updated_at
    );
    out
}

fn fold(key: &str, events: &[cbs_events::RecordedEvent]) -> Result<Option<BuildState>, String> {
    let key: BuildKey = key.parse().map_err(|e| format!("{e}"))?;
    replay(
        &key,
        events.iter().map(|e| (e.seq, e.recorded_at, &e.event)),
    )
    .map_err(|e| e.to_string())
}

pub(crate) async fn rebuild(
    client: &mut deadpool_postgres::Object,
    fix: bool,
) -> Result<RebuildReport, StoreError> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(!fix)
        .start()
        .await?;
    let mut report = RebuildReport::default();
    let mut repairs: Vec<BuildState> = Vec::new();
    let mut removals: Vec<String> = Vec::new();
    let mut after = String::new();
    loop {
        let page = queries::builds_page(&tx, &after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.key.as_str().to_owned();
        let keys: Vec<&str> = page.iter().map(|b| b.key.as_str()).collect();
        let events = queries::events_of_builds(&tx, &keys).await?;
        report.events += events.len() as u64;
        let by_key: std::collections::HashMap<&str, &[cbs_events::RecordedEvent]> = events
            .chunk_by(|a, b| a.key == b.key)
            .map(|run| (run[0].key.as_str(), run))
            .collect();
        for stored in &page {
            report.builds += 1;
            let mine = by_key.get(stored.key.as_str()).copied().unwrap_or_default();
            let kind = match fold(stored.key.as_str(), mine) {
                Err(e) => Some(DifferenceKind::Unfoldable(e)),
                Ok(None) => {
                    removals.push(stored.key.as_str().to_owned());
                    Some(DifferenceKind::ExtraRow)
                }
                Ok(Some(rebuilt)) => {
                    let fields = diff(stored, &rebuilt);
                    if fields.is_empty() {
                        None
                    } else {
                        repairs.push(rebuilt);
                        Some(DifferenceKind::Fields(fields))
                    }
                }
            };
            if let Some(kind) = kind {
                report.differences.push(Difference {
                    key: stored.key.as_str().to_owned(),
                    kind,
                });
            }
        }
    }
    for key in queries::keys_without_projection(&tx).await? {
        let events = queries::events_of_builds(&tx, &[key.as_str()]).await?;
        report.events += events.len() as u64;
        let kind = match fold(&key, &events) {
            Ok(Some(rebuilt)) => {
                repairs.push(rebuilt);
                DifferenceKind::MissingRow
            }
            Ok(None) => continue,
            Err(e) => DifferenceKind::Unfoldable(e),
        };
        report.differences.push(Difference { key, kind });
    }
    if fix && !report.differences.is_empty() {
        for state in &repairs {
            queries::overwrite_build(&tx, state).await?;
        }
        for key in &removals {
            queries::delete_build(&tx, key).await?;
        }
        report.fixed = true;
        for d in &report.differences {
            warn!(difference = %d, "projection repaired");
        }
    }
    tx.commit().await?;
    Ok(report)
}
