//! Leader election on a coordination.k8s.io Lease, through kube-lease-manager.
//!
//! Only the holder of the lease runs the controller. A replica that loses the lease
//! exits at once instead of winding down: by then another replica may already be
//! reconciling, and the step engine's invariants (every result in status before the
//! next step; steps idempotent) make an abrupt stop safe, whereas two writers are not.
//!
//! Losing the lease includes not being able to renew it. kube-lease-manager (0.13)
//! reports a loss only when it sees another holder: a failed renewal is logged and
//! retried, so a leader cut off from the apiserver would go on provisioning and
//! calling EC2 after its lease expired and a standby took over. kiln therefore
//! keeps a renew deadline of its own, as client-go's `RenewDeadline`: it reads the
//! Lease, and steps down once the last renewal it saw is about to expire.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
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
    deadline: Deadline,
}

/// Steps down before the lease can expire when renewals stop landing.
struct Deadline {
    leases: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl Deadline {
    /// How long before the lease expires the replica stops: after the manager's
    /// renewal (a third of the lease before expiry) had time to land.
    fn margin(&self) -> Duration {
        (self.duration / 5).max(Duration::from_secs(1))
    }

    /// Completes when the last renewal this replica saw is about to expire, or the
    /// Lease names another holder.
    async fn passed(&self) {
        let margin = self.margin();
        let every = (margin / 2).max(Duration::from_millis(500));
        // Until the first read, the lease was taken just now.
        let mut valid_until = SystemTime::now() + self.duration;
        // Time left before this replica must have stopped.
        let left = |until: SystemTime| {
            until
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .saturating_sub(margin)
        };
        loop {
            if left(valid_until).is_zero() {
                tracing::error!(
                    "the leader lease was not renewed in time; stepping down before it expires"
                );
                return;
            }
            // A read that hangs (an unreachable apiserver) must not carry the replica
            // past its deadline.
            let wait = every.min(left(valid_until));
            match tokio::time::timeout(wait, self.leases.get_opt(&self.name)).await {
                Ok(Ok(Some(lease))) => match renewed_until(&lease, &self.identity) {
                    Some(until) => valid_until = until,
                    None => {
                        tracing::error!(lease = %self.name, "the lease names another holder");
                        return;
                    }
                },
                Ok(Ok(None)) => {
                    tracing::error!(lease = %self.name, "the lease is gone");
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "reading the leader lease"),
                Err(_) => tracing::warn!("reading the leader lease timed out"),
            }
            tokio::time::sleep(every.min(left(valid_until))).await;
        }
    }
}

/// Until when the lease is ours by its last renewal; `None` when someone else holds it.
fn renewed_until(lease: &Lease, identity: &str) -> Option<SystemTime> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?;
    let seconds = u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0);
    let renewed = SystemTime::from(renewed.0);
    Some(renewed + Duration::from_secs(seconds))
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
    let deadline = Deadline {
        leases: Api::namespaced(client.clone(), &settings.namespace),
        name: settings.lease_name.clone(),
        identity: settings.identity.clone(),
        duration: Duration::from_secs(settings.duration_seconds),
    };
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
            return Ok(Some(Leadership {
                state,
                task,
                deadline,
            }));
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
    /// Completes when the lease is lost: taken over, or not renewed in time (then
    /// before it expires, so that a standby never acts while this replica still does).
    pub async fn lost(&mut self) {
        let state = &mut self.state;
        let flipped = async {
            loop {
                if !*state.borrow_and_update() {
                    return;
                }
                if state.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            () = flipped => {}
            () = self.deadline.passed() => {}
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
