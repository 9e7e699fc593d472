//! Leader election on a coordination.k8s.io Lease, through kube-lease-manager.
//!
//! Only the holder of the lease runs the controller. A replica that loses the lease
//! exits at once instead of winding down: by then another replica may already be
//! reconciling, and the step engine's invariants (every result in status before the
//! next step; steps idempotent) make an abrupt stop safe, whereas two writers are not.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("leader election: {0}")]
    Lease(#[from] LeaseManagerError),
    #[error(
        "--lease-duration-seconds must be at least 3 (the lease is renewed a third of it before it expires), got {0}"
    )]
    Duration(u64),
    #[error("leader election ended before this replica became leader")]
    Ended,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub duration_seconds: u64,
}

/// The lease while this replica holds it. Dropping it releases the lease, so that
/// a standby takes over at once after a graceful shutdown.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

/// Waits until this replica holds the lease, or `stop` completes first (`None`).
pub async fn acquire(
    client: Client,
    settings: &Settings,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Option<Leadership>, Error> {
    if settings.duration_seconds < 3 {
        return Err(Error::Duration(settings.duration_seconds));
    }
    let manager = LeaseManagerBuilder::new(client, &settings.lease_name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(settings.duration_seconds)
        .with_grace((settings.duration_seconds / 3).max(1))
        .with_field_manager(format!("kiln-{}", settings.identity))
        .build()
        .await?;
    let (mut state, task) = manager.watch().await;
    tracing::info!(
        lease = %settings.lease_name,
        namespace = %settings.namespace,
        identity = %settings.identity,
        "waiting to become leader"
    );
    tokio::pin!(stop);
    loop {
        if *state.borrow_and_update() {
            tracing::info!(identity = %settings.identity, "became leader");
            return Ok(Some(Leadership { state, task }));
        }
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return Err(Error::Ended);
                }
            }
            () = &mut stop => {
                drop(state);
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
                return Ok(None);
            }
        }
    }
}

impl Leadership {
    /// Completes when the lease is lost (not renewed in time, or taken over).
    pub async fn lost(&mut self) {
        loop {
            if !*self.state.borrow_and_update() {
                return;
            }
            if self.state.changed().await.is_err() {
                return;
            }
        }
    }

    /// Gives the lease up so a standby does not wait for it to expire.
    pub async fn release(self) {
        drop(self.state);
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(Ok(_))) => tracing::info!("released the leader lease"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the leader lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "lease task"),
            Err(_) => tracing::warn!("releasing the leader lease timed out; it expires on its own"),
        }
    }
}
