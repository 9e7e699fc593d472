//! Status of an ImageBuild: the only state kiln keeps. Everything a restarted
//! operator needs to finish or clean up a build is here.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageBuildStatus {
    /// The generation whose build `steps` describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Pending`, `Running`, `CleaningUp`, `Succeeded` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BuildPhase>,
    /// Name of the step running now (or being cleaned up), for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<String>,
    /// Human-readable summary of where the build stands or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `Ready`, `Reconciling` and `Stalled`, for `kubectl wait`, kstatus and GitOps tools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// One record per step of the build of `observedGeneration`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepRecord>,
    /// Images of the builds that succeeded, this and earlier generations (bounded
    /// history, newest last). An image appears here once every step of its build has
    /// succeeded, and only kiln's `artifactPolicy: Delete` ever removes it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
    /// Every region a build of this ImageBuild created a resource in: with
    /// `artifactPolicy: Delete`, kiln looks for this ImageBuild's images in each,
    /// including images of generations the bounded `artifacts` no longer lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// Secrets of this namespace that carry kiln's finalizer `kiln.dev/cleanup-<uid>`
    /// because this ImageBuild's cleanup needs them (cloud credentials): a deleted
    /// Secret (a GitOps prune, a namespace deletion) waits until cleanup is done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_secrets: Vec<String>,
    /// Removal of every image of this ImageBuild on deletion, with
    /// `artifactPolicy: Delete`; retried until done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_removal: Option<ArtifactRemoval>,
    /// When the build of `observedGeneration` started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it reached `Succeeded` or `Failed`; cleared when a new build starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// The spec the build of `observedGeneration` runs with, recorded when that build
    /// starts: its steps are run and cleaned up with it, not with a newer spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "recorded_spec_schema")]
    pub build_spec: Option<serde_json::Value>,
}

/// `status.buildSpec` is kept as JSON the apiserver neither prunes nor validates:
/// a status write must never fail, or cleanup stall, because a later kiln tightened
/// a rule that the recorded spec met when its build started. It is also why the
/// Rust type is a JSON value: an unreadable recorded spec must not make the whole
/// object unreadable (the controller then falls back to the current spec).
fn recorded_spec_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum BuildPhase {
    Pending,
    Running,
    CleaningUp,
    Succeeded,
    Failed,
}

impl BuildPhase {
    pub const ALL: [BuildPhase; 5] = [
        BuildPhase::Pending,
        BuildPhase::Running,
        BuildPhase::CleaningUp,
        BuildPhase::Succeeded,
        BuildPhase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BuildPhase::Pending => "Pending",
            BuildPhase::Running => "Running",
            BuildPhase::CleaningUp => "CleaningUp",
            BuildPhase::Succeeded => "Succeeded",
            BuildPhase::Failed => "Failed",
        }
    }
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    /// Step name: `connect`, `shell-1`, `instance`, `copy-image-eu-west-1`, …
    pub name: String,
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Cancelled`.
    pub phase: StepPhase,
    /// When the step first started; kept when a restarted operator resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the step finished, failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// How many times `run` was started; more than one means the operator resumed it.
    #[serde(default)]
    pub attempts: u32,
    /// External resources this step touched. `created: false` ones are never deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceRecord>,
    /// Non-secret facts later steps use (addresses, IDs).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, String>,
    /// `Pending` (owed, or never started), `Done` or `NotNeeded`.
    pub cleanup: CleanupPhase,
    /// How many times `cleanup` was started; retries back off by this count.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cleanup_attempts: u32,
    /// What happened, or why the step failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why the last cleanup attempt failed, while it is being retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_message: Option<String>,
    /// How many cleanup attempts failed: retries back off by this count, not by
    /// `cleanupAttempts`, which an operator restart also increases.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cleanup_failures: u32,
    /// The next cleanup attempt starts no earlier than this, also after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_retry_at: Option<Time>,
    /// Images this step produced; they move to `status.artifacts` once every step
    /// of the build has succeeded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
}

/// `artifactPolicy: Delete` at work: every image of the ImageBuild, in every region
/// it used, is removed before the finalizer is released.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactRemoval {
    /// `Pending` while it runs or is retried, `Done`.
    pub phase: CleanupPhase,
    /// How many times it was started.
    #[serde(default)]
    pub attempts: u32,
    /// How many attempts failed; retries back off by it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failures: u32,
    /// When the next attempt may start after a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Time>,
    /// What was removed, or why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl StepRecord {
    pub fn pending(name: impl Into<String>) -> Self {
        StepRecord {
            name: name.into(),
            phase: StepPhase::Pending,
            started_at: None,
            finished_at: None,
            attempts: 0,
            resources: Vec::new(),
            outputs: BTreeMap::new(),
            cleanup: CleanupPhase::Pending,
            cleanup_attempts: 0,
            message: None,
            cleanup_message: None,
            cleanup_failures: 0,
            cleanup_retry_at: None,
            artifacts: Vec::new(),
        }
    }

    /// Records an image kiln made and its snapshots, as owed to a removal.
    pub fn record_image(
        &mut self,
        image_id: Option<&str>,
        snapshots: &[String],
        region: Option<&str>,
    ) {
        let made = |kind: &str, id: &str| ResourceRecord {
            kind: kind.into(),
            id: id.to_string(),
            region: region.map(str::to_string),
            created: true,
        };
        if let Some(id) = image_id {
            self.resources.push(made("Image", id));
        }
        for snap in snapshots {
            self.resources.push(made("Snapshot", snap));
        }
    }

    /// A step that never started has nothing to clean up.
    pub fn started(&self) -> bool {
        self.phase != StepPhase::Pending
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum StepPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum CleanupPhase {
    #[default]
    Pending,
    Done,
    NotNeeded,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRecord {
    /// e.g. KeyPair, SecurityGroup, Instance, Image, Snapshot, Secret.
    pub kind: String,
    /// The resource's ID or name.
    pub id: String,
    /// Its cloud region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// True only when kiln made it; only those are ever deleted.
    pub created: bool,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// The generation that produced it.
    pub generation: i64,
    /// The builder that made it, e.g. `amazon-ebs`.
    pub builder: String,
    /// Region of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The image ID (an AMI ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// The image's snapshots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshot_ids: Vec<String>,
    /// The image it was built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_image_id: Option<String>,
    /// When kiln saw the image available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Time>,
}
