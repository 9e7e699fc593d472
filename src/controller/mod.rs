//! The kube `Controller` for ImageBuilds: finalizer, status by server-side apply,
//! events, and the glue between [`engine::advance`] and the [`Runner`].

mod known;
pub(crate) mod status;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PatchParams};
use kube::runtime::controller::{Action as Requeue, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

use crate::api::{
    ArtifactPolicy, BuildPhase, FINALIZER, ImageBuild, ImageBuildSpec, ImageBuildStatus,
    ResourceRecord, StepRecord,
};
use crate::builders::{self, PlanError};
use crate::communicator::pool::SessionPool;
use crate::engine::advance::{self, Action, Input, PlanView, TaskKind, TaskState};
use crate::engine::runner::{Runner, WakeKey, Work, exponential};
use crate::engine::{
    BuildFacts, BuildOutcome, CleanupContext, Plan, RecordError, RecordSink, Step, StepContext,
};
use crate::serve::{self, Health};
use crate::sync::lock;
use crate::{leader, metrics};
use known::{Builds, Known};

pub const MANAGER: &str = "kiln";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("ImageBuild has no {0}")]
    MissingField(&'static str),
    #[error("serializing the spec for status.buildSpec: {0}")]
    Serialize(serde_json::Error),
    #[error("the ImageBuild changed since it was read")]
    Conflict,
}

pub struct Settings {
    /// Watch only these namespaces; all namespaces when empty.
    pub namespaces: Vec<String>,
    pub concurrency: u16,
    pub shutdown_grace: Duration,
    /// Where to serve /metrics, /healthz and /readyz; not served when `None`.
    pub metrics_addr: Option<String>,
    /// Run the controller only while holding this Lease.
    pub leader_election: Option<leader::Settings>,
    /// What a build may do beyond its schema (e.g. which endpoints it may name).
    pub policy: builders::Policy,
    /// Image, resources and placement of runner Pods.
    pub runner: Arc<crate::provisioners::runner::Defaults>,
}

struct Context {
    client: Client,
    runner: Arc<Runner>,
    builds: Arc<Builds>,
    sessions: Arc<SessionPool>,
    recorder: Recorder,
    sink: Arc<dyn RecordSink>,
    /// Reconciles of a build that failed in a row, by uid: requeues back off by it.
    failures: Mutex<HashMap<String, u32>>,
    policy: builders::Policy,
    runner_defaults: Arc<crate::provisioners::runner::Defaults>,
}

pub async fn run(client: Client, settings: Settings) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            stop.cancel();
        }
    });

    let health = Arc::new(Health::default());
    let stores: Arc<Mutex<Vec<Store<ImageBuild>>>> = Arc::default();
    if let Some(addr) = &settings.metrics_addr {
        serve::start(addr, health.clone(), build_counts(stores.clone())).await?;
    }
    // A standby replica is ready: it serves metrics and waits for the lease. A sole
    // replica is ready once its controllers have listed what they watch.
    if settings.leader_election.is_some() {
        health.set_ready();
    }

    let mut leadership = match &settings.leader_election {
        None => None,
        Some(le) => {
            match leader::acquire(client.clone(), le, stop.clone().cancelled_owned()).await? {
                Some(l) => Some(l),
                None => return Ok(()),
            }
        }
    };
    metrics::get().leader.set(1);

    let (wake_tx, wake_rx) = mpsc::unbounded_channel();
    let runner = Arc::new(Runner::new(wake_tx));
    let builds = Arc::new(Builds::default());
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        runner: runner.clone(),
        builds: builds.clone(),
        sessions: Arc::default(),
        recorder: Recorder::new(client.clone(), reporter),
        sink: Arc::new(StatusSink {
            client: client.clone(),
            builds,
        }),
        failures: Mutex::default(),
        policy: settings.policy.clone(),
        runner_defaults: settings.runner.clone(),
    });

    // One Controller per watched namespace (or one for all); finished steps wake
    // their build through the controller of its namespace.
    let apis: Vec<(Option<String>, Api<ImageBuild>)> = if settings.namespaces.is_empty() {
        vec![(None, Api::all(client.clone()))]
    } else {
        settings
            .namespaces
            .iter()
            .map(|ns| (Some(ns.clone()), Api::namespaced(client.clone(), ns)))
            .collect()
    };
    let mut wakers = HashMap::new();
    let mut controllers = Vec::new();
    for (ns, api) in apis {
        let (tx, rx) = mpsc::unbounded_channel::<WakeKey>();
        wakers.insert(ns, tx);
        let wake = UnboundedReceiverStream::new(rx)
            .map(|w: WakeKey| ObjectRef::<ImageBuild>::new(&w.name).within(&w.namespace));
        let controller = Controller::new(api, watcher::Config::default().any_semantic())
            .with_config(ControllerConfig::default().concurrency(settings.concurrency));
        lock(&stores).push(controller.store());
        controllers.push(
            controller
                .reconcile_on(wake)
                .graceful_shutdown_on(stop.clone().cancelled_owned())
                .run(reconcile, error_policy, ctx.clone())
                .boxed(),
        );
    }
    // The pipelines' controllers, under the same leadership and shutdown.
    let pipelines = crate::pipeline::controllers(
        &client,
        &settings.namespaces,
        settings.concurrency,
        &settings.policy,
        Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        &stop,
    );
    tokio::spawn(transitions(
        wake_rx,
        wakers,
        ctx.clone(),
        Arc::new(tokio::sync::Semaphore::new(
            settings.concurrency.max(1).into(),
        )),
    ));

    if settings.leader_election.is_none() {
        let stores: Vec<Store<ImageBuild>> = lock(&stores).clone();
        let health = health.clone();
        // Concurrently with the controllers: their caches fill only while they run.
        tokio::spawn(async move {
            for store in stores {
                // Polled again and again: `wait_until_ready` keeps only the last
                // waiter's waker (one oneshot receiver behind a mutex), and the
                // controller waits on the same store, so a single await may never wake.
                loop {
                    let wait = store.wait_until_ready();
                    match tokio::time::timeout(Duration::from_millis(100), wait).await {
                        Ok(Ok(())) => break,
                        Ok(Err(_)) => return,
                        Err(_) => {}
                    }
                }
            }
            health.set_ready();
        });
    }
    tracing::info!(namespaces = ?settings.namespaces, "kiln controller starting");
    let builds = controllers.into_iter().map(|c| {
        c.map(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile loop");
            }
        })
        .boxed()
    });
    let controllers = futures::stream::select_all(builds.chain(pipelines)).for_each(|()| async {});
    match &mut leadership {
        Some(l) => {
            tokio::select! {
                () = controllers => {}
                () = l.lost() => {
                    metrics::get().leader.set(0);
                    health.set_failed();
                    anyhow::bail!("lost the leader lease; exiting so that only the new leader acts");
                }
            }
        }
        None => controllers.await,
    }
    tracing::info!("controller stopped; stopping running steps");
    runner.shutdown(settings.shutdown_grace).await;
    if let Some(l) = leadership {
        metrics::get().leader.set(0);
        l.release().await;
    }
    Ok(())
}

/// A finished task's build is reconciled at once, in a lane of its own next to the
/// controller's queue: behind a burst of new ImageBuilds (each of which costs a read
/// and two writes to start), a step transition waited seconds for a worker. The
/// reconcile is the same, under the same per-build lock; when it cannot finish (an
/// error, or the object changed since our last write) the controller takes over.
async fn transitions(
    mut rx: mpsc::UnboundedReceiver<WakeKey>,
    wakers: HashMap<Option<String>, mpsc::UnboundedSender<WakeKey>>,
    ctx: Arc<Context>,
    lane: Arc<tokio::sync::Semaphore>,
) {
    let wakers = Arc::new(wakers);
    while let Some(key) = rx.recv().await {
        let Ok(permit) = lane.clone().acquire_owned().await else {
            return;
        };
        let (ctx, wakers) = (ctx.clone(), wakers.clone());
        tokio::spawn(async move {
            let build = Build {
                key,
                started: Instant::now(),
            };
            let result = reconcile_build(None, &build, ctx).await;
            drop(permit);
            if let Err(e) = result {
                let key = build.key;
                tracing::debug!(namespace = %key.namespace, build = %key.name, error = %e, "handing the transition to the controller");
                let tx = wakers
                    .get(&Some(key.namespace.clone()))
                    .or_else(|| wakers.get(&None));
                if let Some(tx) = tx {
                    let _ = tx.send(key);
                }
            }
        });
    }
}

/// Builds by phase from the controllers' caches, for the `kiln_builds` gauge.
fn build_counts(stores: Arc<Mutex<Vec<Store<ImageBuild>>>>) -> serve::BuildCounts {
    Arc::new(move || {
        let mut counts: Vec<(&'static str, i64)> =
            BuildPhase::ALL.iter().map(|p| (p.as_str(), 0)).collect();
        for store in lock(&stores).iter() {
            for obj in store.state() {
                let phase = obj
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .unwrap_or(BuildPhase::Pending);
                if let Some(c) = counts.iter_mut().find(|(p, _)| *p == phase.as_str()) {
                    c.1 += 1;
                }
            }
        }
        counts
    })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received");
}

/// A failing reconcile is retried with exponential backoff per build (2 s up to
/// 5 min): a persistent error (a status write the apiserver refuses, RBAC) must
/// not cost a full status write every 2 s for ever.
fn error_policy(obj: Arc<ImageBuild>, err: &Error, ctx: Arc<Context>) -> Requeue {
    let failures = obj.uid().map_or(1, |uid| failed_again(&ctx, &uid));
    let delay = error_backoff(failures);
    tracing::warn!(namespace = ?obj.namespace(), name = %obj.name_any(), error = %err, failures, retry_in_ms = delay.as_millis() as u64, "reconcile failed; retrying");
    Requeue::requeue(delay)
}

fn error_backoff(failures: u32) -> Duration {
    exponential(Duration::from_secs(2), failures, Duration::from_secs(300))
}

/// A conflict is retried at once the first time (someone wrote since; common and
/// harmless), then with a delay that grows, so that a writer that keeps
/// conflicting with kiln (another controller, a second leader) is no hot loop.
fn conflict_backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    exponential(
        Duration::from_millis(100),
        failures - 1,
        Duration::from_secs(30),
    )
}

fn failed_again(ctx: &Context, uid: &str) -> u32 {
    let mut failures = lock(&ctx.failures);
    let n = failures.entry(uid.to_string()).or_default();
    *n = n.saturating_add(1);
    *n
}

async fn reconcile(obj: Arc<ImageBuild>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let build = Build {
        key: WakeKey {
            namespace: obj.namespace().ok_or(Error::MissingField("namespace"))?,
            name: obj.name_any(),
            uid: obj.uid().ok_or(Error::MissingField("metadata.uid"))?,
        },
        started: Instant::now(),
    };
    let uid = build.key.uid.clone();
    match reconcile_build(Some(&obj), &build, ctx.clone()).await {
        // Decide again, from a fresh read.
        Err(Error::Conflict) => Ok(Requeue::requeue(conflict_backoff(failed_again(&ctx, &uid)))),
        Ok(r) => {
            lock(&ctx.failures).remove(&uid);
            Ok(r)
        }
        Err(e) => Err(e),
    }
}

/// The build a reconcile is about, and when the reconcile began.
struct Build {
    key: WakeKey,
    started: Instant,
}

/// One reconcile, from the controller or a finished task, in its span and counted.
/// A conflict is not a failure: the build is decided again from a fresh read.
async fn reconcile_build(
    cached: Option<&ImageBuild>,
    build: &Build,
    ctx: Arc<Context>,
) -> Result<Requeue, Error> {
    let span = info_span!("reconcile", namespace = %build.key.namespace, build = %build.key.name);
    let result = reconcile_one(cached, build, ctx).instrument(span).await;
    let ok = matches!(result, Ok(_) | Err(Error::Conflict));
    metrics::get().reconciled(ok, build.started.elapsed());
    result
}

/// `cached` is the controller's view of the object; a task's wake-up has none and
/// decides from our last write: every action follows a status write conditional on
/// the resourceVersion it was decided from, so a stale one conflicts and is read again.
async fn reconcile_one(
    cached: Option<&ImageBuild>,
    build: &Build,
    ctx: Arc<Context>,
) -> Result<Requeue, Error> {
    let WakeKey {
        namespace,
        name,
        uid,
    } = &build.key;
    let api: Api<ImageBuild> = Api::namespaced(ctx.client.clone(), namespace);
    let lock = ctx.builds.lock(uid);
    let mut known = lock.lock().await;
    // The cache may lag our own writes: decide from our last write when the cache
    // shows one of ours, else from a fresh read under the build's lock. A recreated
    // object (another uid) waits for its own event.
    let ours = match cached {
        Some(cached) => known.current(cached),
        None => known.latest(),
    };
    let obj = match ours {
        Some(o) => o.clone(),
        None => match api.get_opt(name).await? {
            Some(o) if o.uid().as_deref() == Some(uid.as_str()) => o,
            _ => return Ok(Requeue::await_change()),
        },
    };
    match decide(&api, &obj, &mut known, build, &ctx).await {
        // Someone wrote since: decide again from a fresh read.
        Err(Error::Kube(e)) if is_conflict(&e) => {
            tracing::debug!("status changed since it was read; reconciling again");
            known.clear();
            Err(Error::Conflict)
        }
        other => other,
    }
}

async fn decide(
    api: &Api<ImageBuild>,
    obj: &ImageBuild,
    known: &mut Known,
    build: &Build,
    ctx: &Context,
) -> Result<Requeue, Error> {
    let WakeKey {
        namespace: ns,
        name,
        uid,
    } = &build.key;
    let deleting = obj.meta().deletion_timestamp.is_some();
    let with_finalizer;
    let obj = if obj.finalizers().iter().any(|f| f == FINALIZER) {
        obj
    } else {
        if deleting {
            forget(ctx, uid);
            return Ok(Requeue::await_change());
        }
        // Go on with the object the patch returned: the build starts in this
        // reconcile rather than in the one the finalizer's watch event causes.
        with_finalizer = status::add_finalizer(api, obj).await?;
        known.wrote(with_finalizer.clone());
        &with_finalizer
    };

    let generation = obj.metadata.generation.unwrap_or(1);
    let old_status = obj.status.clone().unwrap_or_default();
    // A new build uses the current spec; the build status records (possibly of an
    // older generation, being cleaned up) uses the spec it recorded, so that its steps
    // are undone by the code, region and credentials that made them.
    let current = Planned::admitted(Arc::new(obj.spec.clone()), &ctx.policy);
    let recorded = recorded_spec(&old_status).map(Planned::new);
    // Without a recorded spec the current one stands in, unchecked by the policy:
    // cleaning up what a build made is never refused.
    let unchecked;
    let recorded_view = match &recorded {
        Some(r) => r,
        None => {
            unchecked = Planned::new(current.spec.clone());
            &unchecked
        }
    };
    let current_needs = current.needs_cleanup();
    let recorded_needs = recorded_view.needs_cleanup();
    let spec_json = serde_json::to_value(&obj.spec).map_err(Error::Serialize)?;
    let task = ctx.runner.state(uid);
    // Artifacts are removed with the current spec's builder (its credentials), or
    // the recorded one's when the current builder makes no images.
    let remover = builders::artifact_remover(&current.spec)
        .map(|s| (s, current.spec.clone()))
        .or_else(|| {
            recorded
                .as_ref()
                .and_then(|r| builders::artifact_remover(&r.spec).map(|s| (s, r.spec.clone())))
        });
    let mut secrets = builders::cleanup_secrets(&current.spec);
    for n in recorded
        .as_ref()
        .map(|r| builders::cleanup_secrets(&r.spec))
        .unwrap_or_default()
    {
        if !secrets.contains(&n) {
            secrets.push(n);
        }
    }
    let decision = advance::advance(&Input {
        status: &old_status,
        generation,
        deleting,
        on_error: obj.spec.on_error,
        delete_artifacts: obj.spec.artifact_policy == ArtifactPolicy::Delete && remover.is_some(),
        secrets: &secrets,
        builder: obj.spec.builder.kind(),
        spec: &spec_json,
        plan: PlanView {
            steps: current.names(),
            needs_cleanup: &current_needs,
        },
        recorded: PlanView {
            steps: recorded_view.names(),
            needs_cleanup: &recorded_needs,
        },
        task: &task,
        now: Timestamp::now(),
    });

    let mut write_time = Duration::ZERO;
    let wrote = decision.status != old_status;
    if wrote {
        let write_started = Instant::now();
        let written = status::apply(api, obj, &decision.status).await?;
        write_time = write_started.elapsed();
        known.wrote(written.clone());
        // An installed CRD older than this kiln prunes the field (`helm upgrade` does
        // not update CRDs): spec changes mid-build then fall back to name matching.
        if decision.status.build_spec.is_some()
            && written.status.is_some_and(|s| s.build_spec.is_none())
        {
            tracing::warn!(
                "the installed ImageBuild CRD drops status.buildSpec: update the CRD to this kiln's version"
            );
        }
    }

    // The build's SSH connection is kept only while it runs steps that use it.
    if deleting || decision.status.phase != Some(BuildPhase::Running) {
        ctx.sessions.close(uid);
    }
    let mut requeue = Requeue::await_change();
    let finalizer_goes = decision.actions.contains(&Action::RemoveFinalizer);
    for action in decision.actions {
        match action {
            Action::HoldSecrets(names) => {
                // Before the step that may create what needs them is spawned (the
                // action comes first). A hold that fails is not fatal: the build
                // can still clean up as long as nobody deletes the Secret.
                if let Err(e) = status::hold_secrets(&ctx.client, ns, uid, &names).await {
                    tracing::warn!(error = %e, secrets = ?names, "could not hold the Secrets cleanup needs");
                    publish(
                        ctx,
                        obj,
                        true,
                        "SecretsNotHeld",
                        "Hold secrets".into(),
                        format!(
                            "could not add finalizer {} to Secret(s) {}: {e}; deleting them before cleanup is done would block it",
                            status::secret_finalizer(uid),
                            names.join(", ")
                        ),
                    )
                    .await;
                }
            }
            Action::ReleaseSecrets(names) => {
                match status::release_secrets(&ctx.client, ns, uid, &names).await {
                    Ok(()) => {}
                    // Without `patch` on Secrets the hold never landed either (see
                    // the SecretsNotHeld event); a deletion must not wait on it.
                    Err(kube::Error::Api(e)) if e.code == 403 => {
                        tracing::warn!(error = %e, secrets = ?names, "not allowed to release the Secrets; going on");
                    }
                    Err(e) => return Err(e.into()),
                }
                if !finalizer_goes {
                    // The object as it is now: our write above, else the one decided from.
                    let base = match known.latest() {
                        Some(latest) if wrote => latest.clone(),
                        _ => obj.clone(),
                    };
                    let mut st = decision.status.clone();
                    st.held_secrets.retain(|n| !names.contains(n));
                    let written = status::apply(api, &base, &st).await?;
                    known.wrote(written);
                }
            }
            Action::Spawn(key) if key.kind == TaskKind::RemoveArtifacts => {
                let Some((step, spec)) = remover.clone() else {
                    tracing::error!(?key, "internal: no artifact remover for a spawned task");
                    continue;
                };
                let removal = decision.status.artifact_removal.clone().unwrap_or_default();
                let mut record = StepRecord::pending("remove-artifacts");
                // Every image the history lists, also one whose tags were removed.
                for a in &decision.status.artifacts {
                    record.record_image(
                        a.image_id.as_deref(),
                        &a.snapshot_ids,
                        a.region.as_deref(),
                    );
                }
                let facts = Arc::new(BuildFacts {
                    name: name.to_string(),
                    namespace: ns.to_string(),
                    uid: uid.to_string(),
                    generation: key.generation,
                    builder: spec.builder.kind(),
                    lineage: lineage_of(obj),
                });
                let regions = regions_of(
                    &decision.status,
                    [Some(&*current.spec), recorded.as_ref().map(|r| &*r.spec)],
                );
                let span = info_span!("step", namespace = %ns, build = %name, step = %step.name(), kind = ?key.kind);
                let work = Work::Cleanup(
                    step,
                    CleanupContext {
                        facts,
                        spec,
                        client: ctx.client.clone(),
                        record,
                        outputs: BTreeMap::new(),
                        outcome: BuildOutcome::Failed,
                        regions,
                    },
                    until(removal.retry_at.as_ref()),
                );
                ctx.runner.spawn(build.key.clone(), key, work, span);
                requeue = Requeue::requeue(Duration::from_secs(300));
            }
            Action::Spawn(key) => {
                // The same choice the engine made the key with.
                let source = if advance::uses_recorded_plan(&old_status, key.generation) {
                    recorded_view
                } else {
                    &current
                };
                let Some(step) = source.step(key.step) else {
                    tracing::error!(?key, "internal: the plan has no step for a spawned task");
                    continue;
                };
                if !(key.kind == TaskKind::Run && step.uses_session()) {
                    ctx.sessions.close(uid);
                }
                let facts = Arc::new(BuildFacts {
                    name: name.to_string(),
                    namespace: ns.to_string(),
                    uid: uid.to_string(),
                    generation: key.generation,
                    builder: source.spec.builder.kind(),
                    lineage: lineage_of(obj),
                });
                let rec = decision.status.steps.get(key.index).cloned();
                let span = info_span!("step", namespace = %ns, build = %name, step = %step.name(), kind = ?key.kind);
                let work = match key.kind {
                    TaskKind::Run => {
                        let outputs: BTreeMap<String, String> = decision
                            .status
                            .steps
                            .iter()
                            .take(key.index)
                            .flat_map(|r| r.outputs.clone())
                            .collect();
                        Work::Run(
                            step.clone(),
                            StepContext {
                                facts: facts.clone(),
                                spec: source.spec.clone(),
                                client: ctx.client.clone(),
                                cancel: ctx.runner.token(),
                                outputs,
                                recorded: rec.map(|r| r.resources).unwrap_or_default(),
                                attempt: key.attempt,
                                step_name: step.name().to_string(),
                                sessions: ctx.sessions.clone(),
                                runner: ctx.runner_defaults.clone(),
                                sink: ctx.sink.clone(),
                                step_index: key.index,
                            },
                        )
                    }
                    TaskKind::Cleanup | TaskKind::RemoveArtifacts => {
                        let Some(record) = rec else { continue };
                        let delay = until(record.cleanup_retry_at.as_ref());
                        Work::Cleanup(
                            step.clone(),
                            CleanupContext {
                                facts: facts.clone(),
                                spec: source.spec.clone(),
                                client: ctx.client.clone(),
                                record,
                                outputs: decision
                                    .status
                                    .steps
                                    .iter()
                                    .flat_map(|r| r.outputs.clone())
                                    .collect(),
                                // From the recorded steps: a build whose every step
                                // succeeded keeps its images, whatever came after.
                                outcome: BuildOutcome::of(&decision.status.steps),
                                regions: regions_of(&decision.status, [Some(&*source.spec)]),
                            },
                            delay,
                        )
                    }
                };
                if key.kind == TaskKind::Run {
                    transition(ctx, build, write_time);
                }
                ctx.runner.spawn(build.key.clone(), key, work, span);
                // A safety net only: the task wakes the build when it finishes.
                requeue = Requeue::requeue(Duration::from_secs(300));
            }
            Action::Cancel => ctx.runner.cancel(uid),
            Action::Forget => ctx.runner.forget(uid, false),
            Action::RemoveFinalizer => {
                status::remove_finalizer(api, obj).await?;
                forget(ctx, uid);
                publish(
                    ctx,
                    obj,
                    false,
                    "CleanupFinished",
                    "Release finalizer".into(),
                    "all temporary resources removed; finalizer released".into(),
                )
                .await;
            }
            Action::Event {
                warning,
                reason,
                action,
                note,
            } => publish(ctx, obj, warning, reason, action, note).await,
        }
    }
    if matches!(ctx.runner.state(uid), TaskState::Running { .. }) {
        requeue = Requeue::requeue(Duration::from_secs(300));
    }
    Ok(requeue)
}

/// The pipeline version a build's images are: its controlling ImagePipeline (an
/// ownerReference, which only its creator sets) and its sequence label.
fn lineage_of(obj: &ImageBuild) -> Option<crate::engine::Lineage> {
    let owner = obj
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "ImagePipeline")?;
    let version = obj.labels().get(crate::api::SEQUENCE_LABEL)?.parse().ok()?;
    Some(crate::engine::Lineage {
        pipeline: owner.name.clone(),
        version,
    })
}

/// Drops everything this process holds about a build that is gone.
fn forget(ctx: &Context, uid: &str) {
    lock(&ctx.failures).remove(uid);
    ctx.runner.forget(uid, true);
    ctx.builds.forget(uid);
    ctx.sessions.close(uid);
}

/// Someone wrote the object since the resourceVersion a write was conditional on.
fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Measures the controller's part between one step's finish and the next step's
/// start, split where the time goes: waiting for a reconcile to begin (the
/// controller's queue, or the build's previous reconcile still running), and the
/// status write that must land before the next step may start.
fn transition(ctx: &Context, build: &Build, write: Duration) {
    let Some(finished) = ctx.runner.take_finished_at(&build.key.uid) else {
        return;
    };
    let total = finished.elapsed();
    metrics::get().step_transition.observe(total.as_secs_f64());
    tracing::debug!(
        total_ms = total.as_secs_f64() * 1e3,
        queued_ms = build
            .started
            .saturating_duration_since(finished)
            .as_secs_f64()
            * 1e3,
        write_ms = write.as_secs_f64() * 1e3,
        "step transition"
    );
}

/// A spec and the plan made from it.
struct Planned {
    spec: Arc<ImageBuildSpec>,
    plan: Result<Plan, PlanError>,
}

impl Planned {
    fn new(spec: Arc<ImageBuildSpec>) -> Self {
        let plan = builders::plan(&spec);
        Planned { spec, plan }
    }

    /// The plan of a spec a new build would run, under the operator's policy.
    fn admitted(spec: Arc<ImageBuildSpec>, policy: &builders::Policy) -> Self {
        let plan = builders::admit(&spec, policy).and_then(|()| builders::plan(&spec));
        Planned { spec, plan }
    }

    fn names(&self) -> Result<Vec<String>, String> {
        self.plan
            .as_ref()
            .map(|p| p.iter().map(|s| s.name().to_string()).collect())
            .map_err(ToString::to_string)
    }

    fn step(&self, i: usize) -> Option<Arc<dyn Step>> {
        self.plan.as_ref().ok()?.get(i).cloned()
    }

    fn needs_cleanup(&self) -> impl Fn(usize, &StepRecord, BuildOutcome) -> bool + '_ {
        |i, rec, outcome| self.step(i).is_some_and(|s| s.needs_cleanup(rec, outcome))
    }
}

/// The spec `status.buildSpec` recorded for the build in status, if it can be read.
/// `None` for status written by an older kiln (or a recorded spec this kiln cannot
/// read): its steps are then matched by name against the current spec's plan.
fn recorded_spec(status: &ImageBuildStatus) -> Option<Arc<ImageBuildSpec>> {
    let value = status.build_spec.as_ref()?;
    match serde_json::from_value::<ImageBuildSpec>(value.clone()) {
        Ok(spec) => Some(Arc::new(spec)),
        Err(e) => {
            tracing::warn!(error = %e, "status.buildSpec is unreadable; using the current spec for the recorded steps, matched by name");
            None
        }
    }
}

/// How long until `at`; zero when it is past or unset.
fn until(at: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> Duration {
    let Some(at) = at else {
        return Duration::ZERO;
    };
    let left = at.0.duration_since(Timestamp::now());
    Duration::try_from(left).unwrap_or(Duration::ZERO)
}

/// Every region the ImageBuild's builds used: recorded in status, and named by the
/// given specs (a region whose first resource was never recorded still counts).
fn regions_of<'a>(
    status: &ImageBuildStatus,
    specs: impl IntoIterator<Item = Option<&'a ImageBuildSpec>>,
) -> Vec<String> {
    let mut regions = status.regions.clone();
    let more = status
        .artifacts
        .iter()
        .filter_map(|a| a.region.clone())
        .chain(specs.into_iter().flatten().flat_map(builders::regions));
    for r in more {
        if !regions.contains(&r) {
            regions.push(r);
        }
    }
    regions
}

/// Events are published in the background: a step transition should not wait for
/// two more apiserver round trips, and a lost event loses no state.
async fn publish(
    ctx: &Context,
    obj: &ImageBuild,
    warning: bool,
    reason: &str,
    action: String,
    note: String,
) {
    spawn_event(
        &ctx.recorder,
        obj.object_ref(&()),
        warning,
        reason,
        action,
        note,
    );
}

/// Publishes an Event about `reference` in the background (both controllers' events).
pub(crate) fn spawn_event(
    recorder: &Recorder,
    reference: k8s_openapi::api::core::v1::ObjectReference,
    warning: bool,
    reason: &str,
    action: String,
    note: String,
) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(event_note(note)),
        action,
        secondary: None,
    };
    let recorder = recorder.clone();
    let reason = reason.to_string();
    tokio::spawn(
        async move {
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::warn!(error = %e, reason, "could not publish event");
            }
        }
        .in_current_span(),
    );
}

/// The apiserver refuses an Event whose note is longer than 1024 bytes, and the
/// longest notes (a failed script's last output) are the most useful: cut them.
fn event_note(mut note: String) -> String {
    const LIMIT: usize = 1024;
    if note.len() <= LIMIT {
        return note;
    }
    let mut end = LIMIT - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note.truncate(end);
    note.push('…');
    note
}

/// Writes resources a running step records, under the build's lock so it never
/// races a reconcile's status write.
struct StatusSink {
    client: Client,
    builds: Arc<Builds>,
}

impl RecordSink for StatusSink {
    fn record(
        &self,
        facts: Arc<BuildFacts>,
        step_index: usize,
        resources: Vec<ResourceRecord>,
    ) -> BoxFuture<'static, Result<(), RecordError>> {
        let client = self.client.clone();
        let lock = self.builds.lock(&facts.uid);
        Box::pin(async move {
            let mut known = lock.lock().await;
            let api: Api<ImageBuild> = Api::namespaced(client, &facts.namespace);
            let write = |e: kube::Error| RecordError::Write(e.to_string());
            // From our last write if there is one; a conflict means someone wrote
            // since, and the second attempt reads the object.
            for _ in 0..2 {
                let obj = match known.latest() {
                    Some(o) => o.clone(),
                    None => match api.get_opt(&facts.name).await.map_err(write)? {
                        Some(o) => o,
                        None => return Err(RecordError::Gone("the ImageBuild is gone".into())),
                    },
                };
                if obj.uid().as_deref() != Some(facts.uid.as_str()) {
                    return Err(RecordError::Gone(
                        "the ImageBuild was deleted and recreated".into(),
                    ));
                }
                let mut st = obj.status.clone().unwrap_or_default();
                if st.observed_generation != Some(facts.generation) {
                    return Err(RecordError::Gone("the build was superseded".into()));
                }
                let Some(rec) = st.steps.get_mut(step_index) else {
                    return Err(RecordError::Gone(format!("no step {step_index} in status")));
                };
                let new: Vec<_> = resources
                    .iter()
                    .filter(|n| {
                        !rec.resources
                            .iter()
                            .any(|r| r.kind == n.kind && r.id == n.id)
                    })
                    .cloned()
                    .collect();
                if new.is_empty() {
                    return Ok(());
                }
                rec.resources.extend(new);
                match status::apply(&api, &obj, &st).await {
                    Ok(written) => {
                        known.wrote(written);
                        return Ok(());
                    }
                    Err(e) if is_conflict(&e) => known.clear(),
                    Err(e) => return Err(write(e)),
                }
            }
            Err(RecordError::Write(
                "the ImageBuild kept changing while the resource was recorded".into(),
            ))
        })
    }
}

/// Server-side apply patch params for our field manager.
pub fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}
