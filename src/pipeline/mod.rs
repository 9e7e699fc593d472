//! The ImagePipeline controller: ImageBuilds made from a template when a trigger
//! fires. [`decide`] says what to do from status alone; this module reads what it
//! needs (the pipeline's ImageBuilds from a watch cache, the current source image
//! when a check is due), writes the decision to status, then acts on it.

pub mod decide;
pub mod schedule;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PostParams, Preconditions};
use kube::runtime::controller::{Action as Requeue, Config as ControllerConfig, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use sha1::Digest;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

use crate::api::{
    ArtifactRemoval, CleanupPhase, FINALIZER, ImageBuild, ImagePipeline, ImagePipelineStatus,
    PIPELINE_LABEL, RESUME_ANNOTATION, SEQUENCE_LABEL, StepRecord, TRIGGER_ANNOTATION,
    VersionImage,
};
use crate::builders;
use crate::controller::{apply_params, status as writes};
use crate::engine::runner::exponential;
use crate::engine::{BuildFacts, BuildOutcome, CleanupContext};
use crate::metrics;
use crate::sync::lock;
use decide::{Action, Decision, Input, Observed};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("ImagePipeline has no {0}")]
    MissingField(&'static str),
    #[error(
        "ImageBuild {0} exists and is not this pipeline's: rename or delete it, the pipeline's next build takes that name"
    )]
    NameTaken(String),
}

struct Context {
    client: Client,
    recorder: Recorder,
    policy: builders::Policy,
    builds: Store<ImageBuild>,
    /// Reconciles of a pipeline that failed in a row, by uid.
    failures: Mutex<HashMap<String, u32>>,
    /// When each pipeline (by uid) looks up its source image next. In memory: a
    /// check that finds the same image writes nothing, and after a restart every
    /// pipeline checks once.
    checks: Mutex<HashMap<String, Timestamp>>,
}

pub const CONTROLLER: &str = "imagepipeline";

/// The pipeline controllers, one per watched namespace (or one for all), to run
/// next to the ImageBuild controllers under the same leadership.
pub fn controllers(
    client: &Client,
    namespaces: &[String],
    concurrency: u16,
    policy: &builders::Policy,
    recorder: Recorder,
    stop: &CancellationToken,
) -> Vec<BoxStream<'static, ()>> {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().cloned().map(Some).collect()
    };
    let mut out = Vec::new();
    for ns in scopes {
        let (pipelines, builds): (Api<ImagePipeline>, Api<ImageBuild>) = match &ns {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        // Only the pipelines' builds, by their label: the cache holds no others.
        let (store, writer) = reflector::store();
        let owned = reflector(
            writer,
            watcher(
                builds,
                watcher::Config::default()
                    .labels(PIPELINE_LABEL)
                    .any_semantic(),
            ),
        )
        .default_backoff()
        .touched_objects();
        let ctx = Arc::new(Context {
            client: client.clone(),
            recorder: recorder.clone(),
            policy: policy.clone(),
            builds: store,
            failures: Mutex::default(),
            checks: Mutex::default(),
        });
        let stream = Controller::new(pipelines, watcher::Config::default().any_semantic())
            .with_config(ControllerConfig::default().concurrency(concurrency))
            .owns_stream(owned)
            .graceful_shutdown_on(stop.clone().cancelled_owned())
            .run(reconcile, error_policy, ctx)
            .map(|r| {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "pipeline reconcile loop");
                }
            })
            .boxed();
        out.push(stream);
    }
    out
}

fn error_policy(obj: Arc<ImagePipeline>, err: &Error, ctx: Arc<Context>) -> Requeue {
    let failures = obj.uid().map_or(1, |uid| {
        let mut f = lock(&ctx.failures);
        let n = f.entry(uid).or_default();
        *n = n.saturating_add(1);
        *n
    });
    let delay = exponential(Duration::from_secs(2), failures, Duration::from_secs(300));
    tracing::warn!(namespace = ?obj.namespace(), pipeline = %obj.name_any(), error = %err, failures, retry_in_ms = delay.as_millis() as u64, "pipeline reconcile failed; retrying");
    Requeue::requeue(delay)
}

async fn reconcile(obj: Arc<ImagePipeline>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let started = Instant::now();
    let ns = obj.namespace().ok_or(Error::MissingField("namespace"))?;
    let span = info_span!("pipeline", namespace = %ns, pipeline = %obj.name_any());
    let result = reconcile_one(&obj, &ns, &ctx).instrument(span).await;
    metrics::get().reconciled_by(CONTROLLER, result.is_ok(), started.elapsed());
    if result.is_ok()
        && let Some(uid) = obj.uid()
    {
        lock(&ctx.failures).remove(&uid);
    }
    result
}

/// The cache of the pipelines' builds must have been listed once: before that,
/// every build would look deleted.
async fn builds_ready(store: &Store<ImageBuild>) {
    loop {
        // Polled: `wait_until_ready` keeps only its last waiter's waker.
        if let Ok(Ok(())) =
            tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await
        {
            return;
        }
    }
}

async fn reconcile_one(obj: &ImagePipeline, ns: &str, ctx: &Context) -> Result<Requeue, Error> {
    let name = obj.name_any();
    let uid = obj.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let api: Api<ImagePipeline> = Api::namespaced(ctx.client.clone(), ns);
    let deleting = obj.metadata.deletion_timestamp.is_some();
    let has_finalizer = obj.finalizers().iter().any(|f| f == FINALIZER);
    if deleting && !has_finalizer {
        return Ok(Requeue::await_change());
    }
    if !deleting && !has_finalizer {
        match writes::add_finalizer(&api, obj).await {
            Ok(_) => return Ok(Requeue::await_change()),
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 422 => {
                return Ok(Requeue::requeue(Duration::from_millis(200)));
            }
            Err(e) => return Err(e.into()),
        }
    }
    builds_ready(&ctx.builds).await;
    let observed = observe(&ctx.builds, ns, &name, &uid);
    let spec = &obj.spec;
    let status = obj.status.clone().unwrap_or_default();
    let now = Timestamp::now();
    let created = obj
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(now, |t| t.0);
    let template_problem = builders::admit(&spec.template.spec, &ctx.policy)
        .and_then(|()| builders::plan(&spec.template.spec))
        .and_then(|_| builders::repeatable(&spec.template.spec))
        .err()
        // The builders name fields from the ImageBuild's `spec`.
        .map(|e| match e.to_string().strip_prefix("spec") {
            Some(rest) => format!("spec.template.spec{rest}"),
            None => format!("spec.template.spec: {e}"),
        })
        .or_else(|| {
            (name.len() > 63).then(|| {
                "metadata.name: at most 63 characters (it is the value of the label kiln.dev/pipeline on its ImageBuilds)".to_string()
            })
        });
    let hash = template_hash(&spec.template);
    let next_check = lock(&ctx.checks).get(&uid).copied();
    // A changed template is built from a fresh look-up: its filter, region or
    // credentials may have changed.
    let source_due = spec.on_source_change.is_some()
        && !deleting
        && !spec.suspend
        && status.brake.is_none()
        && template_problem.is_none()
        && (next_check.is_none_or(|t| t <= now) || status.template_hash.as_deref() != Some(&hash));
    let (source, next_source_check) = if source_due {
        let found = builders::current_source(&spec.template.spec, &ctx.client, ns)
            .await
            .map_err(|e| e.to_string());
        let interval = spec
            .on_source_change
            .as_ref()
            .and_then(|s| crate::api::duration::parse(&s.check_interval).ok())
            .unwrap_or(Duration::from_secs(3600))
            .max(Duration::from_secs(1));
        let next = now.checked_add(interval).unwrap_or(now);
        (Some(found), Some(next))
    } else {
        (None, next_check)
    };
    let input = Input {
        name: &name,
        generation: obj.metadata.generation.unwrap_or(0),
        created,
        spec,
        status: &status,
        deleting,
        resume: obj.annotations().get(RESUME_ANNOTATION).map(String::as_str),
        builds: &observed,
        now,
        source,
        next_source_check,
        template_problem,
        template_hash: &hash,
        secrets: builders::cleanup_secrets(&spec.template.spec),
    };
    let Decision {
        status: next,
        actions,
        wake_in,
    } = decide::decide(&input);

    let mut current = obj.clone();
    if next != status {
        match write_status(&api, obj, &next).await {
            Ok(written) => current = written,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                return Ok(Requeue::requeue(Duration::from_millis(100)));
            }
            Err(e) => return Err(e.into()),
        }
    } else if actions.iter().any(|a| matches!(a, Action::Create(_))) {
        // A create decided from a cache that may lag our own last write: only from
        // the status as it is now.
        let fresh = api.get(&name).await?;
        if fresh.resource_version() != obj.resource_version() {
            return Ok(Requeue::requeue(Duration::from_millis(100)));
        }
    }
    // The look-up counts once its decision is written: after a conflict the next
    // reconcile looks again at once, rather than an interval later with what this
    // one found lost.
    if source_due && let Some(next) = next_source_check {
        lock(&ctx.checks).insert(uid.clone(), next);
    }

    let mut after = next.clone();
    let mut retry: Option<Duration> = None;
    for action in actions {
        match action {
            Action::Create(b) => create_build(ctx, &current, ns, &b).await?,
            Action::Delete(build, build_uid) => {
                let builds: Api<ImageBuild> = Api::namespaced(ctx.client.clone(), ns);
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: Some(build_uid),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match builds.delete(&build, &dp).await {
                    Ok(_) => tracing::info!(build = %build, "deleted ImageBuild"),
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Action::RemoveImages(version) => {
                if let Some(delay) = remove_images(ctx, &current, ns, &mut after, version).await {
                    retry = Some(retry.map_or(delay, |r| r.min(delay)));
                }
            }
            Action::WriteOutput => {
                write_output(ctx, &current, ns, &after).await?;
                after.output_version = after.latest_version;
                after.output_config_map = spec.output_config_map.as_ref().map(|c| c.name.clone());
            }
            Action::HoldSecrets(names) => {
                writes::hold_secrets(&ctx.client, ns, &uid, &names).await?;
            }
            Action::ReleaseSecrets(names) => {
                writes::release_secrets(&ctx.client, ns, &uid, &names).await?;
            }
            Action::RemoveFinalizer => {
                writes::remove_finalizer(&api, &current).await?;
                lock(&ctx.failures).remove(&uid);
                lock(&ctx.checks).remove(&uid);
                return Ok(Requeue::await_change());
            }
            Action::Event {
                warning,
                reason,
                action,
                note,
            } => publish(ctx, &current, warning, reason, action, note),
        }
    }
    if after != next {
        match write_status(&api, &current, &after).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                return Ok(Requeue::requeue(Duration::from_millis(100)));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let wake = match (wake_in, retry) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(match wake {
        // A little after the time, never before it: an early wake would find
        // nothing due and sleep again.
        Some(d) => Requeue::requeue(d + Duration::from_millis(20)),
        None => Requeue::await_change(),
    })
}

/// The pipeline's ImageBuilds in the cache: its label and its ownerReference.
fn observe(store: &Store<ImageBuild>, ns: &str, name: &str, uid: &str) -> Vec<Observed> {
    store
        .state()
        .iter()
        .filter(|b| {
            b.namespace().as_deref() == Some(ns)
                && b.labels().get(PIPELINE_LABEL).map(String::as_str) == Some(name)
                && b.owner_references()
                    .iter()
                    .any(|o| o.uid == uid && o.controller == Some(true))
        })
        .map(|b| observed(b))
        .collect()
}

fn observed(b: &ImageBuild) -> Observed {
    let status = b.status.clone().unwrap_or_default();
    let current =
        status.observed_generation.is_some() && status.observed_generation == b.metadata.generation;
    let generation = status.observed_generation.unwrap_or(0);
    let mine: Vec<_> = status
        .artifacts
        .iter()
        .filter(|a| a.generation == generation)
        .collect();
    Observed {
        name: b.name_any(),
        uid: b.uid().unwrap_or_default(),
        phase: if current { status.phase } else { None },
        message: status.message.clone(),
        images: mine
            .iter()
            .filter_map(|a| {
                Some(VersionImage {
                    region: a.region.clone()?,
                    image_id: a.image_id.clone()?,
                    snapshot_ids: a.snapshot_ids.clone(),
                })
            })
            .collect(),
        source_image: mine.iter().find_map(|a| a.source_image_id.clone()),
        completed_at: status.completed_at.clone(),
        deleting: b.metadata.deletion_timestamp.is_some(),
    }
}

/// A stable hash of the template: serde_json writes maps in key order.
pub fn template_hash(t: &crate::api::ImageBuildTemplate) -> String {
    let bytes = serde_json::to_vec(t).unwrap_or_default();
    let digest = sha1::Sha1::digest(&bytes);
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

async fn write_status(
    api: &Api<ImagePipeline>,
    obj: &ImagePipeline,
    status: &ImagePipelineStatus,
) -> Result<ImagePipeline, kube::Error> {
    let patch = json!({
        "apiVersion": ImagePipeline::api_version(&()),
        "kind": ImagePipeline::kind(&()),
        "metadata": {"name": obj.name_any(), "resourceVersion": obj.resource_version()},
        "status": status,
    });
    metrics::get().status_writes.inc();
    api.patch_status(&obj.name_any(), &apply_params(), &Patch::Apply(&patch))
        .await
}

/// Creates the ImageBuild of a decided build. One of that name that is already the
/// pipeline's was created by an earlier attempt (before a crash): done.
async fn create_build(
    ctx: &Context,
    pipeline: &ImagePipeline,
    ns: &str,
    b: &crate::api::PipelineBuild,
) -> Result<(), Error> {
    let builds: Api<ImageBuild> = Api::namespaced(ctx.client.clone(), ns);
    let obj = build_object(pipeline, b);
    match builds.create(&PostParams::default(), &obj).await {
        Ok(_) => {
            tracing::info!(build = %b.name, trigger = %b.trigger, "created ImageBuild");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = builds.get(&b.name).await?;
            let ours = existing
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == pipeline.metadata.uid.as_ref());
            if ours {
                Ok(())
            } else {
                Err(Error::NameTaken(b.name.clone()))
            }
        }
        Err(e) => Err(e.into()),
    }
}

fn build_object(pipeline: &ImagePipeline, b: &crate::api::PipelineBuild) -> ImageBuild {
    let t = &pipeline.spec.template;
    let mut spec = t.spec.clone();
    if let Some(source) = &b.source_image {
        builders::pin_source(&mut spec, source);
    }
    spec.artifact_policy = crate::api::ArtifactPolicy::Retain;
    let mut labels = t.metadata.labels.clone();
    labels.insert(PIPELINE_LABEL.into(), pipeline.name_any());
    labels.insert(SEQUENCE_LABEL.into(), b.sequence.to_string());
    let mut annotations = t.metadata.annotations.clone();
    annotations.insert(TRIGGER_ANNOTATION.into(), b.trigger.clone());
    let mut obj = ImageBuild::new(&b.name, spec);
    obj.metadata.namespace = pipeline.namespace();
    obj.metadata.labels = Some(labels);
    obj.metadata.annotations = Some(annotations);
    obj.metadata.owner_references = Some(vec![OwnerReference {
        api_version: ImagePipeline::api_version(&()).into_owned(),
        kind: ImagePipeline::kind(&()).into_owned(),
        name: pipeline.name_any(),
        uid: pipeline.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    obj
}

/// Removes one retired version's images and snapshots with the builder's remover
/// (the same one `artifactPolicy: Delete` uses on an ImageBuild), in every region
/// the version has images in, and records the outcome in `after`. Returns when to
/// retry after a failure.
async fn remove_images(
    ctx: &Context,
    pipeline: &ImagePipeline,
    ns: &str,
    after: &mut ImagePipelineStatus,
    version: i64,
) -> Option<Duration> {
    let v = after.versions.iter_mut().find(|v| v.version == version)?;
    let spec = Arc::new(pipeline.spec.template.spec.clone());
    let removal = v.removal.get_or_insert_with(ArtifactRemoval::default);
    removal.attempts += 1;
    let Some(step) = builders::artifact_remover(&spec) else {
        removal.phase = CleanupPhase::Done;
        removal.message = Some("the builder makes no images".into());
        return None;
    };
    let mut record = StepRecord::pending("remove-version");
    let mut regions = Vec::new();
    for i in &v.images {
        if !regions.contains(&i.region) {
            regions.push(i.region.clone());
        }
        record.record_image(Some(&i.image_id), &i.snapshot_ids, Some(&i.region));
    }
    let cleanup = CleanupContext {
        facts: Arc::new(BuildFacts {
            name: v.build.clone(),
            namespace: ns.to_string(),
            uid: v.build_uid.clone(),
            generation: 1,
            builder: spec.builder.kind(),
            lineage: None,
        }),
        spec: spec.clone(),
        client: ctx.client.clone(),
        record,
        outputs: BTreeMap::new(),
        outcome: BuildOutcome::Failed,
        regions,
    };
    let result = step
        .cleanup(&cleanup)
        .instrument(info_span!("remove-version", version))
        .await;
    match result {
        Ok(()) => {
            removal.phase = CleanupPhase::Done;
            removal.retry_at = None;
            removal.message = Some(format!(
                "removed {}",
                v.images
                    .iter()
                    .map(|i| format!("{} in {}", i.image_id, i.region))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            tracing::info!(version, "removed the images of a retired version");
            None
        }
        Err(e) => {
            removal.failures += 1;
            let delay = exponential(
                Duration::from_secs(2),
                removal.failures,
                Duration::from_secs(300),
            );
            removal.retry_at = Timestamp::now().checked_add(delay).ok().map(Time);
            removal.message = Some(format!("attempt {} failed: {e}", removal.attempts));
            tracing::warn!(version, error = %e, "removing the images of a retired version failed; retrying");
            Some(delay)
        }
    }
}

/// The latest pointer for consumers: image IDs by region, the version, the build
/// and the source image, by server-side apply.
async fn write_output(
    ctx: &Context,
    pipeline: &ImagePipeline,
    ns: &str,
    status: &ImagePipelineStatus,
) -> Result<(), Error> {
    let Some(cm) = &pipeline.spec.output_config_map else {
        return Ok(());
    };
    let Some(version) = status
        .latest_version
        .and_then(|l| status.versions.iter().find(|v| v.version == l))
    else {
        return Ok(());
    };
    let mut data = BTreeMap::new();
    data.insert("version".to_string(), version.version.to_string());
    data.insert("build".to_string(), version.build.clone());
    if let Some(s) = &version.source_image {
        data.insert("sourceImage".to_string(), s.clone());
    }
    for i in &version.images {
        data.insert(i.region.clone(), i.image_id.clone());
    }
    let body = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": cm.name,
            "labels": {"app.kubernetes.io/managed-by": "kiln", PIPELINE_LABEL: pipeline.name_any()},
        },
        "data": data,
    });
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    api.patch(&cm.name, &apply_params(), &Patch::Apply(&body))
        .await?;
    tracing::info!(configmap = %cm.name, version = version.version, "wrote the latest pointer");
    Ok(())
}

fn publish(
    ctx: &Context,
    obj: &ImagePipeline,
    warning: bool,
    reason: &str,
    action: String,
    note: String,
) {
    crate::controller::spawn_event(
        &ctx.recorder,
        obj.object_ref(&()),
        warning,
        reason,
        action,
        note,
    );
}
