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
    /// A step's cleanup (or the removal of the build's artifacts), started no
    /// earlier than the given delay: the backoff after failed attempts.
    Cleanup(Arc<dyn Step>, CleanupContext, Duration),
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
            let mut fut: BoxFuture<'_, _> = Box::pin(unpanicked(step.run(&ctx)));
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
        (TaskKind::Cleanup | TaskKind::RemoveArtifacts, Work::Cleanup(step, ctx, delay)) => {
            if !delay.is_zero() {
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
                r = unpanicked(step.cleanup(&ctx)) => r,
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

/// A panic in a step (kiln's code or a dependency's) fails the step instead of
/// killing its task silently: a task that never reports would leave the build
/// Running, and its deletion waiting, for ever.
async fn unpanicked<T>(
    fut: impl std::future::Future<Output = Result<T, StepError>>,
) -> Result<T, StepError> {
    use futures::FutureExt as _;
    match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            tracing::error!(panic = %what, "step panicked");
            Err(StepError::Failed(format!(
                "internal error: the step panicked: {what}"
            )))
        }
    }
}

/// Exponential backoff with a cap; cleanup must keep trying, but not hammer the API.
pub fn backoff(attempt: u32) -> Duration {
    exponential(
        Duration::from_millis(500),
        attempt,
        Duration::from_secs(120),
    )
}

/// `first`, doubled for each try after the first (`n` counts from 1), up to `cap`:
/// the one shape of every backoff kiln uses.
pub fn exponential(first: Duration, n: u32, cap: Duration) -> Duration {
    let exp = n.saturating_sub(1).min(8);
    (first * (1u32 << exp)).min(cap)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::api::ResourceRecord;
    use crate::engine::{BuildFacts, RecordError, RecordSink, StepOutput};

    struct Panics;

    impl Step for Panics {
        fn name(&self) -> &str {
            "panics"
        }

        fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
            Box::pin(async move {
                // Records once (through a sink that fails twice first), then panics.
                ctx.record(ResourceRecord {
                    kind: "Thing".into(),
                    id: "t-1".into(),
                    region: None,
                    created: true,
                })
                .await?;
                if std::hint::black_box(true) {
                    panic!("index out of bounds: the len is 0 but the index is 3");
                }
                Ok(StepOutput::default())
            })
        }
    }

    /// Fails the first two writes as an overloaded apiserver would.
    #[derive(Default)]
    struct Flaky(AtomicU32);

    impl RecordSink for Flaky {
        fn record(
            &self,
            _facts: Arc<BuildFacts>,
            _step_index: usize,
            _resources: Vec<ResourceRecord>,
        ) -> BoxFuture<'static, Result<(), RecordError>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n < 2 {
                    Err(RecordError::Write("429 Too Many Requests".into()))
                } else {
                    Ok(())
                }
            })
        }
    }

    fn context(runner: &Runner, sink: Arc<dyn RecordSink>) -> StepContext {
        let spec: crate::api::ImageBuildSpec = serde_json::from_value(serde_json::json!({
            "builder": {"null": {}},
            "communicator": {"ssh": {"username": "u", "host": "h", "hostKey": {"insecureIgnore": true}}},
        }))
        .unwrap();
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        StepContext {
            facts: Arc::new(BuildFacts {
                name: "b".into(),
                namespace: "ns".into(),
                uid: "u-1".into(),
                generation: 1,
                builder: "null",
                lineage: None,
            }),
            spec: Arc::new(spec),
            client: kube::Client::try_from(config).unwrap(),
            cancel: runner.token(),
            outputs: BTreeMap::new(),
            recorded: Vec::new(),
            attempt: 1,
            step_name: "panics".into(),
            sessions: Arc::default(),
            runner: Arc::default(),
            sink,
            step_index: 0,
        }
    }

    #[tokio::test]
    async fn a_panicking_step_fails_instead_of_running_for_ever() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let runner = Runner::new(tx);
        let sink = Arc::new(Flaky::default());
        let ctx = context(&runner, sink.clone());
        let key = TaskKey {
            generation: 1,
            kind: TaskKind::Run,
            index: 0,
            step: 0,
            attempt: 1,
        };
        let wake = WakeKey {
            namespace: "ns".into(),
            name: "b".into(),
            uid: "u-1".into(),
        };
        runner.spawn(
            wake,
            key,
            Work::Run(Arc::new(Panics), ctx),
            tracing::Span::none(),
        );
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the task reports")
            .expect("a wake-up");
        match runner.state("u-1") {
            TaskState::Finished {
                result: TaskResult::Run(Err(StepError::Failed(m))),
                ..
            } => assert!(m.contains("panicked"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Two refused writes were retried, not a failure of the step.
        assert_eq!(sink.0.load(Ordering::SeqCst), 3);
    }
}
