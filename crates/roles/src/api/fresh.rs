//! One database read for many waiters: when a commit wakes 10,000 long-polls on one build,
//! one of them reads the build and renders its answer, and all the others are woken at once
//! with that answer (a broadcast, not a queue: nobody waits for the one before it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use cbs_domain::BuildKey;
use cbs_store::{Store, StoreError};
use tokio::sync::watch;

/// A build's state as rendered for status answers.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub last_seq: u32,
    pub body: Bytes,
}

/// The newest answer of one build, numbered by read, and who is reading now.
#[derive(Debug)]
struct Slot {
    latest: watch::Sender<(u64, Option<Rendered>)>,
    reading: tokio::sync::Mutex<()>,
}

/// Per build, the newest rendered answer.
#[derive(Debug, Default)]
pub struct FreshBuilds {
    slots: Mutex<HashMap<BuildKey, Arc<Slot>>>,
}

/// Wakes everyone waiting on a slot when a read ends, however it ended.
struct WakeOnDrop<'a>(&'a Slot);

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        self.0.latest.send_modify(|_| {});
    }
}

impl FreshBuilds {
    /// The build's answer with at least `min_seq` as its last event, or whatever a read
    /// that began after this call found. `None` if the build does not exist.
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
            slots
                .entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        latest: watch::Sender::new((0, None)),
                        reading: tokio::sync::Mutex::new(()),
                    })
                })
                .clone()
        };
        let mut rx = slot.latest.subscribe();
        let start_gen = rx.borrow().0;
        let mut render = Some(render);
        loop {
            {
                let (generation, latest) = &*rx.borrow_and_update();
                if let Some(r) = latest {
                    if r.last_seq >= min_seq || *generation > start_gen {
                        return Ok(Some(r.clone()));
                    }
                }
            }
            match slot.reading.try_lock() {
                Ok(_reading) => {
                    let _wake = WakeOnDrop(&slot);
                    let Some(build) = store.build(key).await? else {
                        return Ok(None);
                    };
                    let render = render.take().expect("one read per call");
                    let rendered = Rendered {
                        last_seq: build.last_seq,
                        body: render(&build),
                    };
                    slot.latest.send_modify(|(g, latest)| {
                        *g += 1;
                        *latest = Some(rendered.clone());
                    });
                    return Ok(Some(rendered));
                }
                // Someone else is reading: wait for their answer (all woken together).
                Err(_) => {
                    if rx.changed().await.is_err() {
                        return Ok(None);
                    }
                }
            }
        }
    }
}
