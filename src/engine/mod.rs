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
    pub step_name: String,
    /// The build's SSH connection, kept between the steps that use one.
    pub sessions: Arc<SessionPool>,
    pub(crate) sink: Arc<dyn RecordSink>,
    pub(crate) step_index: usize,
}

impl StepContext {
    /// Persist a resource in status before waiting on it (invariant 1).
    pub async fn record(&self, resource: ResourceRecord) -> Result<(), StepError> {
        self.sink
            .record(self.facts.clone(), self.step_index, resource)
            .await
            .map_err(|e| StepError::Transient(format!("recording resource in status: {e}")))
    }
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
}

/// Why cleanup runs; a step may keep what is an artifact on success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildOutcome {
    Succeeded,
    Failed,
    /// The ImageBuild is being deleted, or a new generation superseded this build.
    Abandoned,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct StepOutput {
    pub outputs: BTreeMap<String, String>,
    pub resources: Vec<ResourceRecord>,
    pub artifacts: Vec<Artifact>,
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

    /// Whether there is anything for `cleanup` to do; recorded as `NotNeeded` otherwise.
    fn needs_cleanup(&self, record: &StepRecord) -> bool {
        record.resources.iter().any(|r| r.created)
    }
}

/// Persists a resource into the running step's status record.
pub trait RecordSink: Send + Sync {
    fn record(
        &self,
        facts: Arc<BuildFacts>,
        step_index: usize,
        resource: ResourceRecord,
    ) -> BoxFuture<'static, Result<(), String>>;
}

pub type Plan = Vec<Arc<dyn Step>>;
