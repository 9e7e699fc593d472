//! The `ImagePipeline` resource: ImageBuilds made from a template when a trigger
//! fires, each successful one a numbered version, with a latest pointer and
//! retention. Its status is the only state the pipeline keeps, as for ImageBuild.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{
    ArtifactPolicy, ArtifactRemoval, BuildPhase, ImageBuildSpec, LocalObjectRef, duration,
};

/// Label on every ImageBuild a pipeline made: the pipeline's name.
pub const PIPELINE_LABEL: &str = "kiln.dev/pipeline";
/// Label on every ImageBuild a pipeline made: its sequence number, which is also the
/// version number its images get when it succeeds.
pub const SEQUENCE_LABEL: &str = "kiln.dev/pipeline-sequence";
/// Annotation that re-arms a pipeline stopped by its failure brake: set it to any
/// value other than the one the brake recorded.
pub const RESUME_ANNOTATION: &str = "kiln.dev/resume";
/// Annotation on a pipeline's ImageBuild: why the pipeline started it.
pub const TRIGGER_ANNOTATION: &str = "kiln.dev/trigger";
/// The most versions `status.versions` lists, and so the most `imageRetention.keep`
/// may ask for: every version whose images the pipeline may still remove is listed.
pub const MAX_VERSIONS: usize = 40;
/// The most images a pipeline keeps by retention (and so the most versions with
/// images in status, with the pinned and the latest one).
pub const MAX_KEEP: u32 = 30;

/// Images that rebuild themselves: an ImageBuild made from `template` whenever a
/// trigger fires (a schedule, a newer source image, a changed template).
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "ImagePipeline",
    namespaced,
    shortname = "ipl",
    category = "kiln",
    status = "ImagePipelineStatus",
    doc = "ImageBuilds made from a template on a schedule, when the source image moves, or when the template changes; each success is a numbered version.",
    printcolumn = r#"{"name":"Latest","type":"integer","jsonPath":".status.latestVersion"}"#,
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".status.latest[0].imageId"}"#,
    printcolumn = r#"{"name":"Last Build","type":"string","jsonPath":".status.builds[-1:].phase"}"#,
    // A string, not a date: kubectl shows a date in the future as <invalid>.
    printcolumn = r#"{"name":"Next Run","type":"string","jsonPath":".status.nextRunAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.message"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.template.spec.artifactPolicy) || self.template.spec.artifactPolicy == 'Retain'"
).message("template.spec.artifactPolicy must be Retain (or unset): a pipeline's images are removed by imageRetention and the pipeline's own artifactPolicy, never by deleting one of its ImageBuilds"))]
#[x_kube(validation = kube::core::Rule::new(
    "self.artifactPolicy != 'Delete' || has(self.imageRetention)"
).message("artifactPolicy: Delete needs imageRetention: the pipeline tracks the images it may remove only for the versions it retains"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.onSourceChange) || has(self.template.spec.builder.amazonEBS)"
).message("onSourceChange needs a builder with a source image to watch (amazonEBS)"))]
pub struct ImagePipelineSpec {
    /// The ImageBuild each run creates, named `<pipeline>-<sequence>`.
    pub template: ImageBuildTemplate,
    /// Build at these times (a cron expression or a plain interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<PipelineSchedule>,
    /// Build when the newest image matching the template's source filter differs
    /// from the one the newest version was built from (once per image: a failed
    /// build of it is retried by the schedule or a template change, not by this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_source_change: Option<SourceChangeTrigger>,
    /// What a trigger does while a build runs: `Forbid` skips it (a schedule) or
    /// waits for the build to finish (a source or template change); `Replace`
    /// deletes the running build (its temporary resources are cleaned up) and starts anew.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// Start no new builds; running builds go on. Retention and the latest pointer
    /// still follow builds that finish.
    #[serde(default)]
    pub suspend: bool,
    /// How late a scheduled run may start after operator downtime, e.g. `10m`; a
    /// later one is skipped. Unset: however late. Missed runs start at most one
    /// build either way. (Runs that come due while suspended are skipped.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration::rule())]
    #[schemars(length(max = 32))]
    pub starting_deadline: Option<String>,
    /// After this many failed builds in a row the pipeline stops starting builds
    /// (condition `Stalled`, reason `FailureBrake`) until its spec changes or the
    /// annotation `kiln.dev/resume` changes. 0: never stop.
    #[serde(default = "default_max_failures")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_consecutive_failures: u32,
    /// How many finished ImageBuild objects are kept; older ones are deleted
    /// (their images are not: retention decides those).
    #[serde(default)]
    pub build_history_limit: BuildHistoryLimit,
    /// How many versions keep their images. Older versions' images and snapshots
    /// are removed in every region, never those of the latest or the pinned
    /// version. Unset: every image is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_retention: Option<ImageRetention>,
    /// A ConfigMap of this namespace that holds the latest version's image IDs by
    /// region (and `version`, `build`, `sourceImage`), written after a build succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_config_map: Option<LocalObjectRef>,
    /// Points the latest pointer (status and ConfigMap) at this version instead of
    /// the newest (a rollback), and keeps its images whatever the retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub pinned_version: Option<i64>,
    /// What happens to the versions' images when the pipeline is deleted:
    /// `Retain` keeps them, `Delete` removes them (needs `imageRetention`).
    #[serde(default)]
    pub artifact_policy: ArtifactPolicy,
}

fn default_max_failures() -> u32 {
    3
}

/// What the pipeline's ImageBuilds are made from.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug)]
pub struct ImageBuildTemplate {
    /// Labels and annotations of the ImageBuilds.
    #[serde(default, skip_serializing_if = "TemplateMetadata::is_empty")]
    pub metadata: TemplateMetadata,
    /// The ImageBuild spec.
    pub spec: ImageBuildSpec,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct TemplateMetadata {
    /// Labels of each ImageBuild (kiln adds `kiln.dev/pipeline` and `kiln.dev/pipeline-sequence`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = kube::core::Rule::new("self.all(k, !k.startsWith('kiln.dev/'))")
        .message("label keys starting with kiln.dev/ are kiln's own"))]
    pub labels: BTreeMap<String, String>,
    /// Annotations of each ImageBuild.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = kube::core::Rule::new("self.all(k, !k.startsWith('kiln.dev/'))")
        .message("annotation keys starting with kiln.dev/ are kiln's own"))]
    pub annotations: BTreeMap<String, String>,
}

impl TemplateMetadata {
    fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.annotations.is_empty()
    }
}

/// Exactly one of `cron` or `every`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.cron) ? 1 : 0) + (has(self.every) ? 1 : 0) == 1"
).message("set exactly one of cron or every"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.timeZone) || has(self.cron)")
    .message("timeZone applies to cron only"))]
pub struct PipelineSchedule {
    /// Five fields as a Kubernetes CronJob takes them (`minute hour day-of-month
    /// month day-of-week`, or `@daily`, `@hourly`, …), e.g. `0 3 * * 1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub cron: Option<String>,
    /// IANA time zone of `cron`, e.g. `Europe/Berlin`; default `Etc/UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// A plain interval between runs, e.g. `6h`, counted from the pipeline's
    /// creation (the first run is the first build).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration::rule())]
    #[schemars(length(max = 32))]
    pub every: Option<String>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceChangeTrigger {
    /// How often to look up the newest matching source image, e.g. `1h`.
    #[serde(default = "default_check_interval")]
    #[x_kube(validation = duration::rule())]
    #[schemars(length(max = 32))]
    pub check_interval: String,
}

fn default_check_interval() -> String {
    "1h".into()
}

#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum ConcurrencyPolicy {
    #[default]
    Forbid,
    Replace,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BuildHistoryLimit {
    /// Succeeded ImageBuilds kept.
    #[serde(default = "default_succeeded_history")]
    #[schemars(range(min = 0, max = 100))]
    pub succeeded: u32,
    /// Failed ImageBuilds kept.
    #[serde(default = "default_failed_history")]
    #[schemars(range(min = 0, max = 100))]
    pub failed: u32,
}

impl Default for BuildHistoryLimit {
    fn default() -> Self {
        BuildHistoryLimit {
            succeeded: default_succeeded_history(),
            failed: default_failed_history(),
        }
    }
}

fn default_succeeded_history() -> u32 {
    3
}
fn default_failed_history() -> u32 {
    1
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct ImageRetention {
    /// How many of the newest versions keep their images (the latest and the
    /// pinned version always do).
    #[schemars(range(min = 1, max = 30))]
    pub keep: u32,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImagePipelineStatus {
    /// The generation the pipeline last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled`, for `kubectl wait`, kstatus and GitOps tools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Where the pipeline stands, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The sequence number of the last build the pipeline decided to start.
    #[serde(default)]
    pub sequence: i64,
    /// The pipeline's builds it still follows or keeps, oldest first. A build is
    /// listed here before its ImageBuild is created: after a crash the same
    /// ImageBuild (same name) is created, never a second one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builds: Vec<PipelineBuild>,
    /// Failed builds since the last success.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Set when `maxConsecutiveFailures` stopped the pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brake: Option<FailureBrake>,
    /// Hash of the template the last decided build was made from: a different
    /// template builds once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_hash: Option<String>,
    /// Hash of a template whose last build failed and that has no version yet:
    /// the pipeline is `Stalled` (reason `TemplateBuildFailed`) until a build of it
    /// succeeds or the template changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_template: Option<String>,
    /// The last scheduled time a build was started (or skipped) for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// The next scheduled time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run_at: Option<Time>,
    /// What the look-ups of the newest source image found (`onSourceChange`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceCheck>,
    /// Successful builds, oldest first (bounded): what each was built from, which
    /// images it made, and whether retention removed them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<PipelineVersion>,
    /// The version the latest pointer names: the newest, or `pinnedVersion`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_version: Option<i64>,
    /// The latest pointer's images, one per region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latest: Vec<LatestImage>,
    /// The version `outputConfigMap` was last written with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_version: Option<i64>,
    /// The ConfigMap it was written to: a new `outputConfigMap` is written at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_config_map: Option<String>,
    /// Secrets of this namespace that carry kiln's finalizer `kiln.dev/cleanup-<uid>`
    /// while the pipeline may still need them to remove images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_secrets: Vec<String>,
}

/// One of the pipeline's ImageBuilds.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PipelineBuild {
    /// The ImageBuild's name, `<pipeline>-<sequence>`.
    pub name: String,
    /// Its sequence number; also the version number when it succeeds.
    pub sequence: i64,
    /// Why it was started: `template`, `schedule`, `source` (comma-separated when
    /// several fired together).
    pub trigger: String,
    /// The source image the pipeline pinned for it (`onSourceChange`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_image: Option<String>,
    /// Hash of the template it was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_hash: Option<String>,
    /// When the pipeline decided to start it.
    pub decided_at: Time,
    /// Its uid once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Its last seen phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BuildPhase>,
    /// Set when the build's outcome was counted (a version, or a failure).
    #[serde(default)]
    pub settled: bool,
    /// Why it failed, or what happened to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailureBrake {
    /// When the brake engaged.
    pub since: Time,
    /// The pipeline generation it engaged at: a newer one re-arms the pipeline.
    pub generation: i64,
    /// The value of the annotation `kiln.dev/resume` when it engaged: another value
    /// re-arms the pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceCheck {
    /// The newest matching source image the checks found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// When a check first found it. A check that finds the same image again writes
    /// nothing: an idle pipeline costs one look-up per `checkInterval` and no
    /// apiserver request.
    pub since: Time,
    /// A build was started for this image by `onSourceChange`: it is not started
    /// again for the same image, whether that build succeeds or fails.
    #[serde(default)]
    pub built: bool,
    /// Why the last check failed, while checks fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PipelineVersion {
    /// The version number: the sequence number of the build that made it.
    pub version: i64,
    /// The ImageBuild that made it.
    pub build: String,
    /// That ImageBuild's uid (its images carry it in the tag `kiln.dev/build-uid`).
    pub build_uid: String,
    /// Why that build was started.
    pub trigger: String,
    /// The image it was built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_image: Option<String>,
    /// Hash of the template it was built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_hash: Option<String>,
    /// Its images, one per region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<VersionImage>,
    /// When its build succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Time>,
    /// Set when retention (or the pipeline's deletion) decided to remove its images.
    #[serde(default)]
    pub retired: bool,
    /// The removal of its images and snapshots, retried until done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal: Option<ArtifactRemoval>,
}

impl PipelineVersion {
    /// Its images are gone: retention removed them.
    pub fn removed(&self) -> bool {
        self.removal
            .as_ref()
            .is_some_and(|r| r.phase == super::CleanupPhase::Done)
    }
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VersionImage {
    /// Region of the image.
    pub region: String,
    /// The image ID.
    pub image_id: String,
    /// Its snapshots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshot_ids: Vec<String>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LatestImage {
    /// Region of the image.
    pub region: String,
    /// The image ID.
    pub image_id: String,
}
