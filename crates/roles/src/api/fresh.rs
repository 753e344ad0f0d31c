//! One database read for many waiters: when a commit wakes 10,000 long-polls on one build,
//! the first reads the build and renders its answer; the others take that answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use cbs_domain::BuildKey;
use cbs_store::{Store, StoreError};

/// A build's state as rendered for status answers.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub last_seq: u32,
    pub status: cbs_projections::Status,
    pub body: Bytes,
}

type Slot = Arc<tokio::sync::Mutex<Option<Rendered>>>;

/// Per build, the newest rendered answer and a lock that makes concurrent readers share
/// one read.
#[derive(Debug, Default)]
pub struct FreshBuilds {
    slots: Mutex<HashMap<BuildKey, Slot>>,
}

impl FreshBuilds {
    /// The build's answer with at least `min_seq` as its last event: from the shared slot
    /// if someone already read it, else read (once for everyone waiting now).
    pub async fn get(
        &self,
        store: &Store,
        key: &BuildKey,
        min_seq: u32,
        render: impl FnOnce(&cbs_projections::BuildState) -> Bytes,
    ) -> Result<Option<Rendered>, StoreError> {
        let slot = {
            let mut slots = self.slots.lock().expect("fresh builds lock");
            if slots.len() > 10_000 {
                // Forget builds nobody is reading right now.
                slots.retain(|_, s| Arc::strong_count(s) > 1);
            }
            slots.entry(key.clone()).or_default().clone()
        };
        let mut cached = slot.lock().await;
        if let Some(r) = cached.as_ref().filter(|r| r.last_seq >= min_seq) {
            return Ok(Some(r.clone()));
        }
        let Some(build) = store.build(key).await? else {
            return Ok(None);
        };
        let rendered = Rendered {
            last_seq: build.last_seq,
            status: build.status,
            body: render(&build),
        };
        *cached = Some(rendered.clone());
        Ok(Some(rendered))
    }
}
