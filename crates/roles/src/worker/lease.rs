//! While an attempt runs: its lease is renewed, and a cancellation stops it.

use cbs_projections::BuildState;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::App;

/// Renews the attempt's lease every third of the lease period until the attempt ends;
/// cancels `fenced` if the build was taken away (the lease had expired and the janitor
/// requeued it), which stops the attempt.
pub(super) async fn renew_lease(app: App, build: BuildState, fenced: CancellationToken) {
    let lease = app.config.worker.lease;
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the claim itself set the first lease
    loop {
        tick.tick().await;
        // Until `lease` from now by the database's clock, not this host's.
        match app
            .store
            .renew_lease(&build.key, build.attempt, lease)
            .await
        {
            Ok(_) => {}
            Err(e) if e.is_fenced() => {
                warn!(error = %e, "lease lost: stopping the attempt");
                fenced.cancel();
                return;
            }
            // The database may be back before the lease ends; the next tick tries again.
            Err(e) => warn!(error = %e, "cannot renew the lease"),
        }
    }
}

/// Cancels `stop` when the build is cancelled (woken by the build's notifications).
pub(super) async fn watch_cancel(app: App, key: cbs_domain::BuildKey, stop: CancellationToken) {
    let mut waiter = app.hub.watch_build(&key);
    loop {
        if let Ok(Some(b)) = app.store.build(&key).await {
            if b.status == cbs_projections::Status::Cancelled {
                info!("the build was cancelled: stopping it");
                stop.cancel();
                return;
            }
        }
        waiter.changed().await;
    }
}
