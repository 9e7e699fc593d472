//! Background tasks that run one step (or one step's cleanup) per build, so that a
//! 45-minute provisioner never holds a controller worker (invariant 7).
//!
//! Nothing here is state in the durable sense: a result that is lost with the
//! process is recomputed by running the step again, which steps make idempotent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::advance::{TaskKey, TaskKind, TaskResult, TaskState};
use super::{CleanupContext, Step, StepContext, StepError};
use crate::metrics;

/// How long a cancelled step gets to wind down before it is dropped.
const CANCEL_GRACE: Duration = Duration::from_secs(15);

/// Identifies a build to wake when its task finishes.
#[derive(Clone, Debug)]
pub struct WakeKey {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

struct Entry {
    key: TaskKey,
    cancel: CancellationToken,
    cancelling: bool,
    result: Arc<Mutex<Option<TaskResult>>>,
}

pub struct Runner {
    tasks: Mutex<HashMap<String, Entry>>,
    wake: UnboundedSender<WakeKey>,
    shutdown: CancellationToken,
    tracker: tokio_util::task::TaskTracker,
    /// When each build's last step run finished, to measure the transition to the next.
    finished_at: Arc<Mutex<HashMap<String, Instant>>>,
}

pub enum Work {
    Run(Arc<dyn Step>, StepContext),
    Cleanup(Arc<dyn Step>, CleanupContext),
}

impl Runner {
    pub fn new(wake: UnboundedSender<WakeKey>) -> Self {
        Runner {
            tasks: Mutex::new(HashMap::new()),
            wake,
            shutdown: CancellationToken::new(),
            tracker: tokio_util::task::TaskTracker::new(),
            finished_at: Arc::default(),
        }
    }

    pub fn state(&self, uid: &str) -> TaskState {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        match tasks.get(uid) {
            None => TaskState::None,
            Some(e) => {
                let result = e.result.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match result {
                    Some(result) => TaskState::Finished {
                        key: e.key.clone(),
                        result,
                    },
                    None => TaskState::Running {
                        key: e.key.clone(),
                        cancelling: e.cancelling,
                    },
                }
            }
        }
    }

    pub fn cancel(&self, uid: &str) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = tasks.get_mut(uid) {
            e.cancelling = true;
            e.cancel.cancel();
        }
    }

    /// Drops a finished task once its result is in status, or everything about a
    /// build that is gone.
    pub fn forget(&self, uid: &str, everything: bool) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = tasks.get(uid) {
            let finished = e.result.lock().unwrap_or_else(|p| p.into_inner()).is_some();
            if finished || everything {
                e.cancel.cancel();
                tasks.remove(uid);
            }
        }
        if everything {
            self.finished_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(uid);
        }
    }

    /// When the build's last successful step run finished, once: the start of the
    /// transition to the next step.
    pub fn take_finished_at(&self, uid: &str) -> Option<Instant> {
        self.finished_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid)
    }

    /// Number of tasks in flight, for metrics and tests.
    pub fn running(&self) -> usize {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn spawn(&self, wake: WakeKey, key: TaskKey, work: Work, span: tracing::Span) {
        let uid = wake.uid.as_str();
        let cancel = match &work {
            Work::Run(_, ctx) => ctx.cancel.clone(),
            Work::Cleanup(..) => self.shutdown.child_token(),
        };
        let result = Arc::new(Mutex::new(None));
        {
            let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(old) = tasks.get(uid) {
                old.cancel.cancel();
            }
            tasks.insert(
                uid.to_string(),
                Entry {
                    key: key.clone(),
                    cancel: cancel.clone(),
                    cancelling: false,
                    result: result.clone(),
                },
            );
        }
        let tx = self.wake.clone();
        let shutdown = self.shutdown.clone();
        let finished_at = self.finished_at.clone();
        let uid = uid.to_string();
        self.tracker.spawn(
            async move {
                let outcome = execute(&key, work, &cancel).await;
                // A task stopped by operator shutdown reports nothing: the step
                // stays Running in status and the next operator resumes it.
                if shutdown.is_cancelled() {
                    return;
                }
                if let (TaskKind::Run, TaskResult::Run(Ok(_))) = (key.kind, &outcome) {
                    finished_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(uid, Instant::now());
                }
                *result.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
                let _ = tx.send(wake);
            }
            .instrument(span),
        );
    }

    /// Child token for a new step run, cancelled on shutdown as well.
    pub fn token(&self) -> CancellationToken {
        self.shutdown.child_token()
    }

    /// Stops every task and waits (bounded) for them, on SIGTERM.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(grace, self.tracker.wait()).await;
    }
}

async fn execute(key: &TaskKey, work: Work, cancel: &CancellationToken) -> TaskResult {
    match (key.kind, work) {
        (TaskKind::Run, Work::Run(step, ctx)) => {
            tracing::info!(attempt = key.attempt, "step started");
            let started = Instant::now();
            let mut fut: BoxFuture<'_, _> = step.run(&ctx);
            let out = tokio::select! {
                r = &mut fut => r,
                () = cancel.cancelled() => {
                    // The step sees the same token: let it stop its remote command
                    // (TERM, then KILL) instead of dropping it mid-flight.
                    let _ = tokio::time::timeout(CANCEL_GRACE, &mut fut).await;
                    Err(StepError::Cancelled)
                }
            };
            let result = match &out {
                Ok(_) => {
                    tracing::info!(
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "step succeeded"
                    );
                    "succeeded"
                }
                Err(StepError::Cancelled) => "cancelled",
                Err(e) => {
                    tracing::warn!(error = %e, elapsed_ms = started.elapsed().as_millis() as u64, "step failed");
                    "failed"
                }
            };
            metrics::get().step_finished(ctx.facts.builder, step.kind(), result, started.elapsed());
            TaskResult::Run(out)
        }
        (TaskKind::Cleanup, Work::Cleanup(step, ctx)) => {
            if key.attempt > 1 {
                let delay = backoff(key.attempt);
                tracing::info!(
                    attempt = key.attempt,
                    delay_ms = delay.as_millis() as u64,
                    "retrying cleanup"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return TaskResult::Cleanup(Err(StepError::Cancelled)),
                }
            }
            let out = tokio::select! {
                r = step.cleanup(&ctx) => r,
                () = cancel.cancelled() => Err(StepError::Cancelled),
            };
            match &out {
                Ok(()) => tracing::info!("cleanup done"),
                Err(e) => tracing::warn!(error = %e, "cleanup failed"),
            }
            TaskResult::Cleanup(out)
        }
        (_, _) => TaskResult::Run(Err(StepError::Failed(
            "internal error: task kind does not match its work".into(),
        ))),
    }
}

/// Exponential backoff with a cap; cleanup must keep trying, but not hammer the API.
pub fn backoff(attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(8);
    Duration::from_millis(500u64 << exp).min(Duration::from_secs(120))
}
