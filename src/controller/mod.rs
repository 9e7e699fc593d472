//! The kube `Controller` for ImageBuilds: finalizer, status by server-side apply,
//! events, and the glue between [`engine::advance`] and the [`Runner`].

mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PatchParams};
use kube::runtime::controller::{Action as Requeue, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{Instrument, info_span};

use crate::api::{FINALIZER, ImageBuild, ResourceRecord};
use crate::builders;
use crate::engine::advance::{self, Action, Input, TaskKind, TaskState};
use crate::engine::runner::{Runner, Work};
use crate::engine::{BuildFacts, BuildOutcome, CleanupContext, RecordSink, StepContext};

pub const MANAGER: &str = "kiln";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("ImageBuild has no {0}")]
    MissingField(&'static str),
}

pub struct Settings {
    /// Watch only this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    pub concurrency: u16,
    pub shutdown_grace: Duration,
}

struct Context {
    client: Client,
    runner: Arc<Runner>,
    recorder: Recorder,
    sink: Arc<dyn RecordSink>,
}

pub async fn run(client: Client, settings: Settings) -> anyhow::Result<()> {
    let (wake_tx, wake_rx) = mpsc::unbounded_channel();
    let runner = Arc::new(Runner::new(wake_tx));
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        runner: runner.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        sink: Arc::new(StatusSink {
            client: client.clone(),
            runner: runner.clone(),
        }),
    });
    let api: Api<ImageBuild> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let wake = UnboundedReceiverStream::new(wake_rx)
        .map(|(ns, name): (String, String)| ObjectRef::<ImageBuild>::new(&name).within(&ns));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signals = async move {
        shutdown_signal().await;
        let _ = stop_tx.send(());
    };
    tokio::spawn(signals);
    let stop = async move {
        let _ = stop_rx.await;
    };

    tracing::info!(namespace = ?settings.namespace, "kiln controller starting");
    Controller::new(api, watcher::Config::default().any_semantic())
        .with_config(ControllerConfig::default().concurrency(settings.concurrency))
        .reconcile_on(wake)
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile loop");
            }
        })
        .await;
    tracing::info!("controller stopped; stopping running steps");
    runner.shutdown(settings.shutdown_grace).await;
    Ok(())
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

fn error_policy(obj: Arc<ImageBuild>, err: &Error, _ctx: Arc<Context>) -> Requeue {
    tracing::warn!(namespace = ?obj.namespace(), name = %obj.name_any(), error = %err, "reconcile failed; retrying");
    Requeue::requeue(Duration::from_secs(2))
}

async fn reconcile(obj: Arc<ImageBuild>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let ns = obj.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = obj.name_any();
    let span = info_span!("reconcile", namespace = %ns, name = %name);
    reconcile_one(ns, name, ctx).instrument(span).await
}

async fn reconcile_one(ns: String, name: String, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let api: Api<ImageBuild> = Api::namespaced(ctx.client.clone(), &ns);
    // The cache may lag our own writes; a fresh read keeps decisions on current status.
    let Some(obj) = api.get_opt(&name).await? else {
        return Ok(Requeue::await_change());
    };
    let uid = obj.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let lock = ctx.runner.lock(&uid);
    let _guard = lock.lock().await;
    let obj = match api.get_opt(&name).await? {
        Some(o) if o.uid().as_deref() == Some(uid.as_str()) => o,
        _ => return Ok(Requeue::await_change()),
    };
    let deleting = obj.meta().deletion_timestamp.is_some();
    let has_finalizer = obj.finalizers().iter().any(|f| f == FINALIZER);
    if !has_finalizer {
        if deleting {
            ctx.runner.forget(&uid, true);
            return Ok(Requeue::await_change());
        }
        status::add_finalizer(&api, &obj).await?;
        return Ok(Requeue::await_change());
    }

    let plan = builders::plan(&obj.spec);
    let names = plan
        .as_ref()
        .map(|p| p.iter().map(|s| s.name().to_string()).collect::<Vec<_>>())
        .map_err(ToString::to_string);
    let needs_cleanup = |i: usize, rec: &crate::api::StepRecord| match &plan {
        Ok(p) => p.get(i).is_some_and(|s| s.needs_cleanup(rec)),
        // Without a plan there is no step code; anything created must still go.
        Err(_) => rec.resources.iter().any(|r| r.created),
    };
    let generation = obj.metadata.generation.unwrap_or(1);
    let old_status = obj.status.clone().unwrap_or_default();
    let task = ctx.runner.state(&uid);
    let decision = advance::advance(&Input {
        status: &old_status,
        generation,
        deleting,
        on_error: obj.spec.on_error,
        builder: obj.spec.builder.kind(),
        plan: names,
        needs_cleanup: &needs_cleanup,
        task: &task,
        now: Timestamp::now(),
    });

    if decision.status != old_status {
        status::apply(&api, &obj, &decision.status).await?;
    }

    let facts = Arc::new(BuildFacts {
        name: name.clone(),
        namespace: ns.clone(),
        uid: uid.clone(),
        generation: decision.status.observed_generation.unwrap_or(generation),
        builder: obj.spec.builder.kind(),
    });
    let mut requeue = Requeue::await_change();
    for action in decision.actions {
        match action {
            Action::Spawn(key) => {
                let Ok(plan) = &plan else { continue };
                let Some(step) = plan.get(key.index).cloned() else {
                    continue;
                };
                let rec = decision.status.steps.get(key.index).cloned();
                let span = info_span!("step", namespace = %ns, name = %name, step = %step.name(), kind = ?key.kind);
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
                                spec: Arc::new(obj.spec.clone()),
                                client: ctx.client.clone(),
                                cancel: ctx.runner.token(),
                                outputs,
                                recorded: rec.map(|r| r.resources).unwrap_or_default(),
                                step_name: step.name().to_string(),
                                sink: ctx.sink.clone(),
                                step_index: key.index,
                            },
                        )
                    }
                    TaskKind::Cleanup => {
                        let Some(record) = rec else { continue };
                        Work::Cleanup(
                            step.clone(),
                            CleanupContext {
                                facts: facts.clone(),
                                spec: Arc::new(obj.spec.clone()),
                                client: ctx.client.clone(),
                                record,
                                outputs: decision
                                    .status
                                    .steps
                                    .iter()
                                    .flat_map(|r| r.outputs.clone())
                                    .collect(),
                                outcome: outcome(&decision.status, deleting, generation),
                            },
                        )
                    }
                };
                ctx.runner
                    .spawn(&uid, (ns.clone(), name.clone()), key, work, span);
                // A safety net only: the task wakes the build when it finishes.
                requeue = Requeue::requeue(Duration::from_secs(300));
            }
            Action::Cancel => ctx.runner.cancel(&uid),
            Action::Forget => ctx.runner.forget(&uid, false),
            Action::RemoveFinalizer => {
                status::remove_finalizer(&api, &obj).await?;
                ctx.runner.forget(&uid, true);
                publish(
                    &ctx,
                    &obj,
                    false,
                    "CleanupFinished",
                    "all temporary resources removed; finalizer released".into(),
                )
                .await;
            }
            Action::Event {
                warning,
                reason,
                note,
            } => publish(&ctx, &obj, warning, reason, note).await,
        }
    }
    if matches!(ctx.runner.state(&uid), TaskState::Running { .. }) {
        requeue = Requeue::requeue(Duration::from_secs(300));
    }
    Ok(requeue)
}

fn outcome(s: &crate::api::ImageBuildStatus, deleting: bool, generation: i64) -> BuildOutcome {
    use crate::api::StepPhase;
    if deleting || s.observed_generation != Some(generation) {
        BuildOutcome::Abandoned
    } else if s
        .steps
        .iter()
        .any(|r| matches!(r.phase, StepPhase::Failed | StepPhase::Cancelled))
    {
        BuildOutcome::Failed
    } else {
        BuildOutcome::Succeeded
    }
}

async fn publish(ctx: &Context, obj: &ImageBuild, warning: bool, reason: &str, note: String) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "could not publish event");
    }
}

/// Writes resources a running step records, under the build's lock so it never
/// races a reconcile's status write.
struct StatusSink {
    client: Client,
    runner: Arc<Runner>,
}

impl RecordSink for StatusSink {
    fn record(
        &self,
        facts: Arc<BuildFacts>,
        step_index: usize,
        resource: ResourceRecord,
    ) -> BoxFuture<'static, Result<(), String>> {
        let client = self.client.clone();
        let lock = self.runner.lock(&facts.uid);
        Box::pin(async move {
            let _guard = lock.lock().await;
            let api: Api<ImageBuild> = Api::namespaced(client, &facts.namespace);
            let obj = api.get(&facts.name).await.map_err(|e| e.to_string())?;
            let mut st = obj.status.clone().unwrap_or_default();
            if st.observed_generation != Some(facts.generation) {
                return Err("the build was superseded".into());
            }
            let Some(rec) = st.steps.get_mut(step_index) else {
                return Err(format!("no step {step_index} in status"));
            };
            if !rec
                .resources
                .iter()
                .any(|r| r.kind == resource.kind && r.id == resource.id)
            {
                rec.resources.push(resource);
                status::apply(&api, &obj, &st)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    }
}

/// Server-side apply patch params for our field manager.
pub fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}
