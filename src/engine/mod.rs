//! The step engine: Packer's multistep made durable.
//!
//! A builder is an ordered list of [`Step`]s. [`advance`] decides, from the status
//! alone plus what the in-memory [`runner`] knows about the one task it may be
//! running for a build, what the next status is and what to do next. The controller
//! writes that status before it acts, so a restarted operator sees every decision.
//! The steps status records are run and cleaned up with the plan made from the spec
//! their generation recorded (`status.buildSpec`), never with a newer spec's.

pub mod advance;
pub mod runner;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use kube::Client;
use tokio_util::sync::CancellationToken;

use crate::api::{Artifact, ImageBuildSpec, ResourceRecord, StepRecord};
use crate::communicator::pool::SessionPool;

/// Who the build is; exported to provisioners as `KILN_*` variables.
#[derive(Clone, Debug)]
pub struct BuildFacts {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub generation: i64,
    pub builder: &'static str,
    /// The ImagePipeline that made this ImageBuild and the version its images get.
    pub lineage: Option<Lineage>,
}

/// Which pipeline version a build's images are: tagged on them, and exported to
/// provisioners as `KILN_PIPELINE` and `KILN_PIPELINE_VERSION`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lineage {
    pub pipeline: String,
    pub version: i64,
}

/// What a step needs while it runs.
pub struct StepContext {
    pub facts: Arc<BuildFacts>,
    pub spec: Arc<ImageBuildSpec>,
    pub client: Client,
    pub cancel: CancellationToken,
    /// Outputs of the steps before this one, merged in order.
    pub outputs: BTreeMap<String, String>,
    /// Resources an earlier attempt of this step recorded before the operator stopped.
    pub recorded: Vec<ResourceRecord>,
    /// 1 on the step's first run; more when it resumes after the operator stopped.
    /// Only a resumed step can meet what an earlier attempt made and did not record,
    /// so only it needs to look for that.
    pub attempt: u32,
    pub step_name: String,
    /// The build's SSH connection, kept between the steps that use one.
    pub sessions: Arc<SessionPool>,
    /// The installation's settings for runner Pods.
    pub runner: Arc<crate::provisioners::runner::Defaults>,
    pub(crate) sink: Arc<dyn RecordSink>,
    pub(crate) step_index: usize,
}

impl StepContext {
    /// Persist a resource in status before waiting on it (invariant 1).
    ///
    /// A write the apiserver refuses for a passing reason (throttling, a timeout, a
    /// restarting apiserver) is retried with backoff for as long as the step runs:
    /// the step is about to wait anyway, and failing it would tear down the build.
    pub async fn record(&self, resource: ResourceRecord) -> Result<(), StepError> {
        self.record_all(vec![resource]).await
    }

    /// Several resources in one status write: names fixed before any of them is
    /// made cost one write instead of one each.
    pub async fn record_all(&self, resources: Vec<ResourceRecord>) -> Result<(), StepError> {
        let mut failures = 0;
        let what = || {
            resources
                .iter()
                .map(|r| format!("{} {}", r.kind, r.id))
                .collect::<Vec<_>>()
                .join(", ")
        };
        loop {
            let err = match self
                .sink
                .record(self.facts.clone(), self.step_index, resources.clone())
                .await
            {
                Ok(()) => return Ok(()),
                Err(RecordError::Gone(why)) => {
                    return Err(StepError::Failed(format!(
                        "recording {} in status: {why}",
                        what()
                    )));
                }
                Err(RecordError::Write(e)) => e,
            };
            failures += 1;
            let delay = runner::backoff(failures).min(std::time::Duration::from_secs(10));
            tracing::warn!(error = %err, resources = %what(), retry_in_ms = delay.as_millis() as u64, "could not record resources in status; retrying");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.cancel.cancelled() => return Err(StepError::Cancelled),
            }
        }
    }
}

/// Why a resource could not be recorded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    /// The build it belongs to is no longer there to record into (deleted and
    /// recreated, superseded): retrying cannot help.
    #[error("{0}")]
    Gone(String),
    /// The write failed; it may succeed later.
    #[error("{0}")]
    Write(String),
}

/// What a step needs to undo itself.
pub struct CleanupContext {
    pub facts: Arc<BuildFacts>,
    pub spec: Arc<ImageBuildSpec>,
    pub client: Client,
    pub record: StepRecord,
    /// Outputs of every step of the build, merged in order.
    pub outputs: BTreeMap<String, String>,
    pub outcome: BuildOutcome,
    /// Every region a build of this ImageBuild created resources in (`status.regions`
    /// plus the recorded and current specs'): where `artifactPolicy: Delete` looks.
    pub regions: Vec<String>,
}

/// How the build whose step is cleaned up ended; a step keeps what is an artifact
/// when it succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildOutcome {
    /// Every step of the build succeeded: its images are artifacts, whatever
    /// happened since (a spec change, a deletion, an operator that was down).
    Succeeded,
    /// A step failed or was cancelled, or never ran.
    Failed,
}

impl BuildOutcome {
    /// Decided from the recorded steps alone, never from the current generation or
    /// a deletion: those can change after the build finished, the steps cannot.
    pub fn of(steps: &[StepRecord]) -> BuildOutcome {
        if !steps.is_empty()
            && steps
                .iter()
                .all(|r| r.phase == crate::api::StepPhase::Succeeded)
        {
            BuildOutcome::Succeeded
        } else {
            BuildOutcome::Failed
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct StepOutput {
    pub outputs: BTreeMap<String, String>,
    pub resources: Vec<ResourceRecord>,
    pub artifacts: Vec<Artifact>,
    /// Image IDs the step removed: dropped from `status.artifacts` if listed there.
    pub removed_images: Vec<String>,
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepError {
    /// The step cannot succeed as configured; the build fails.
    #[error("{0}")]
    Failed(String),
    /// Worth retrying (cleanup retries these with backoff).
    #[error("{0}")]
    Transient(String),
    #[error("cancelled")]
    Cancelled,
}

pub trait Step: Send + Sync {
    fn name(&self) -> &str;

    /// What kind of step this is, for metrics: the name without what makes it
    /// unique in a build (`shell` for `shell-2`, `copy-image` for `copy-image-eu-west-1`).
    fn kind(&self) -> &str {
        self.name()
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>>;

    /// Whether the step talks to the build machine over SSH: the build's connection
    /// is kept open across a run of such steps and closed before any other step.
    fn uses_session(&self) -> bool {
        false
    }

    /// Undo what `run` created. Called in reverse step order for every step that
    /// started; must treat already-gone resources as done.
    fn cleanup<'a>(&'a self, _ctx: &'a CleanupContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether there is anything for `cleanup` to do, given how the build ended;
    /// recorded as `NotNeeded` otherwise (no task, no status write of its own).
    fn needs_cleanup(&self, record: &StepRecord, _outcome: BuildOutcome) -> bool {
        record.resources.iter().any(|r| r.created)
    }
}

/// Persists resources into the running step's status record, in one write.
pub trait RecordSink: Send + Sync {
    fn record(
        &self,
        facts: Arc<BuildFacts>,
        step_index: usize,
        resources: Vec<ResourceRecord>,
    ) -> BoxFuture<'static, Result<(), RecordError>>;
}

pub type Plan = Vec<Arc<dyn Step>>;
