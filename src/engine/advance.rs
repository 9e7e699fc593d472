//! The build state machine as a pure function of status, so every transition is
//! unit-tested without an apiserver and every decision can be written before it is
//! acted on.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::{BuildOutcome, StepError, StepOutput};
use crate::api::{
    Artifact, ArtifactRemoval, BuildPhase, CleanupPhase, ImageBuildStatus, OnError, ResourceRecord,
    StepPhase, StepRecord,
};

/// Bound on `status.artifacts` so status stays small across many generations.
pub const ARTIFACT_HISTORY: usize = 10;
const MESSAGE_LIMIT: usize = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskKind {
    Run,
    Cleanup,
    /// `artifactPolicy: Delete` on deletion: remove every image of the ImageBuild.
    RemoveArtifacts,
}

/// Identifies one background task; a result is only taken into status if it still
/// matches what status says is happening.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskKey {
    pub generation: i64,
    pub kind: TaskKind,
    /// The step's record in `status.steps`.
    pub index: usize,
    /// The step's code: its index in the plan of the build's generation (see
    /// [`uses_recorded_plan`]), found by name, which is the same index unless the
    /// plan no longer matches the recorded steps.
    pub step: usize,
    pub attempt: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TaskResult {
    Run(Result<StepOutput, StepError>),
    Cleanup(Result<(), StepError>),
}

/// What the runner knows about the build's task, if any.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskState {
    None,
    Running { key: TaskKey, cancelling: bool },
    Finished { key: TaskKey, result: TaskResult },
}

/// The object as the engine sees it.
pub struct Input<'a> {
    pub status: &'a ImageBuildStatus,
    pub generation: i64,
    pub deleting: bool,
    pub on_error: OnError,
    /// `artifactPolicy: Delete`, and the builder has images to remove: on deletion,
    /// after the steps are cleaned up, every image of the ImageBuild is removed.
    pub delete_artifacts: bool,
    /// Secrets the builds of this object need to clean up (cloud credentials), by
    /// the current and the recorded spec: held while there is anything to clean up.
    pub secrets: &'a [String],
    pub builder: &'a str,
    /// The current spec, as a build of `generation` records it in `status.buildSpec`.
    pub spec: &'a serde_json::Value,
    /// The plan made from the current spec: what a build of `generation` records and runs.
    pub plan: PlanView<'a>,
    /// The plan the steps already in `status` run and are cleaned up with: made from
    /// `status.buildSpec`, the spec their generation recorded, or from the current spec
    /// when an older kiln recorded none (then only steps whose names it has are trusted).
    pub recorded: PlanView<'a>,
    pub task: &'a TaskState,
    pub now: Timestamp,
}

/// A plan as the engine needs it: the steps' names and what each has to clean up.
pub struct PlanView<'a> {
    /// Step names in order, or why no plan can be made.
    pub steps: Result<Vec<String>, String>,
    /// Whether step `i` of this plan has anything to clean up, given its record.
    pub needs_cleanup: &'a dyn Fn(usize, &StepRecord, BuildOutcome) -> bool,
}

/// Whether the steps of `generation` run and are cleaned up with the plan of the
/// recorded build (`Input::recorded`) rather than the current spec's: they do when
/// `status` records that generation. A spec is a function of its generation, so when
/// the recorded generation is the current one both plans are the same.
pub fn uses_recorded_plan(status: &ImageBuildStatus, generation: i64) -> bool {
    status.observed_generation == Some(generation)
}

impl Input<'_> {
    fn plan_of(&self, generation: i64) -> &PlanView<'_> {
        if uses_recorded_plan(self.status, generation) {
            &self.recorded
        } else {
            &self.plan
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Spawn(TaskKey),
    Cancel,
    /// Drop the runner's finished task once its result is written.
    Forget,
    RemoveFinalizer,
    /// Put kiln's finalizer for this build on these Secrets (in its namespace):
    /// cleanup needs them, so they must outlive the build's cloud resources.
    HoldSecrets(Vec<String>),
    /// Take it off again; the controller then drops them from `status.heldSecrets`.
    ReleaseSecrets(Vec<String>),
    Event {
        warning: bool,
        reason: &'static str,
        /// What the event is about (the Event's `action`): events are aggregated
        /// into a series by reason and action, so each step has its own.
        action: String,
        note: String,
    },
}

#[derive(Debug, PartialEq)]
pub struct Decision {
    pub status: ImageBuildStatus,
    pub actions: Vec<Action>,
}

pub fn advance(input: &Input<'_>) -> Decision {
    let mut d = Decision {
        status: input.status.clone(),
        actions: Vec::new(),
    };
    let s = &mut d.status;
    let now = Time(input.now);
    // An older kiln did not record the spec; the current generation's is the current one.
    if s.build_spec.is_none() && s.observed_generation == Some(input.generation) {
        s.build_spec = Some(input.spec.clone());
    }

    match input.task {
        TaskState::Running { cancelling, .. } => {
            let superseded = s.observed_generation.is_some_and(|g| g != input.generation);
            let is_run = matches!(
                input.task,
                TaskState::Running {
                    key: TaskKey {
                        kind: TaskKind::Run,
                        ..
                    },
                    ..
                }
            );
            if (input.deleting || superseded) && !cancelling && is_run {
                d.actions.push(Action::Cancel);
            }
            finish(&mut d, input);
            return d;
        }
        TaskState::Finished { key, result } => {
            take_result(&mut d, input, key, result, &now);
            d.actions.push(Action::Forget);
        }
        TaskState::None => {}
    }

    // Bounded: each pass either acts or moves a step or the phase strictly forward.
    let passes =
        input.status.steps.len() * 2 + input.plan.steps.as_ref().map_or(0, Vec::len) * 2 + 8;
    for _ in 0..passes {
        if !step(&mut d, input, &now) {
            break;
        }
    }
    finish(&mut d, input);
    d
}

/// One transition; returns true when another pass may make progress.
fn step(d: &mut Decision, input: &Input<'_>, now: &Time) -> bool {
    let s = &mut d.status;
    let superseded = s.observed_generation.is_some_and(|g| g != input.generation);

    if input.deleting {
        abandon_running(s, "cancelled: the ImageBuild is being deleted", now);
        return match next_cleanup(s, input) {
            Some(i) => start_cleanup(d, input, i),
            None if owes_cleanup(s) => {
                hold(d, input);
                false
            }
            None if input.delete_artifacts
                && s.artifact_removal.as_ref().map(|r| r.phase) != Some(CleanupPhase::Done) =>
            {
                start_removal(d, input);
                false
            }
            None => {
                d.actions.push(Action::RemoveFinalizer);
                false
            }
        };
    }

    match s.phase {
        None => {
            start_build(d, input, now);
            true
        }
        Some(BuildPhase::Succeeded | BuildPhase::Failed)
            if superseded || s.observed_generation.is_none() =>
        {
            if owes_cleanup(s) {
                // onError: keep left resources; they go before the next build starts.
                s.phase = Some(BuildPhase::CleaningUp);
                return true;
            }
            start_build(d, input, now);
            true
        }
        Some(BuildPhase::Succeeded | BuildPhase::Failed) => false,
        Some(BuildPhase::Pending | BuildPhase::Running) if superseded => {
            let msg = format!("cancelled: superseded by generation {}", input.generation);
            abandon_running(s, &msg, now);
            s.phase = Some(BuildPhase::CleaningUp);
            true
        }
        Some(BuildPhase::Pending | BuildPhase::Running) => run_next(d, input, now),
        Some(BuildPhase::CleaningUp) => match next_cleanup(s, input) {
            Some(i) => start_cleanup(d, input, i),
            None if owes_cleanup(s) => {
                hold(d, input);
                false
            }
            None => {
                complete(d, input, now);
                superseded
            }
        },
    }
}

fn start_build(d: &mut Decision, input: &Input<'_>, now: &Time) {
    let s = &mut d.status;
    s.observed_generation = Some(input.generation);
    s.started_at = Some(now.clone());
    s.completed_at = None;
    s.current_step = None;
    s.build_spec = Some(input.spec.clone());
    match &input.plan.steps {
        Ok(names) => {
            s.steps = names.iter().map(StepRecord::pending).collect();
            s.phase = Some(BuildPhase::Running);
            s.message = Some(format!("building generation {}", input.generation));
            d.actions.push(Action::Event {
                warning: false,
                reason: "BuildStarted",
                action: build_action(input),
                note: format!(
                    "building generation {} with the {} builder: {} steps",
                    input.generation,
                    input.builder,
                    names.len()
                ),
            });
        }
        Err(why) => {
            s.steps = Vec::new();
            // Nothing to clean up with it; and a spec refused for its size must not
            // make this status write too large as well.
            s.build_spec = None;
            s.phase = Some(BuildPhase::Failed);
            s.completed_at = Some(now.clone());
            s.message = Some(truncate(why));
            d.actions.push(Action::Event {
                warning: true,
                reason: "InvalidSpec",
                action: build_action(input),
                note: truncate(why),
            });
        }
    }
}

fn run_next(d: &mut Decision, input: &Input<'_>, now: &Time) -> bool {
    let s = &mut d.status;
    let Some(i) = s.steps.iter().position(|r| r.phase != StepPhase::Succeeded) else {
        s.phase = Some(BuildPhase::CleaningUp);
        return true;
    };
    let generation = input.generation;
    let rec = &mut s.steps[i];
    match rec.phase {
        StepPhase::Failed | StepPhase::Cancelled => {
            let why = format!(
                "step {} failed: {}",
                rec.name,
                rec.message.clone().unwrap_or_default()
            );
            s.message = Some(truncate(&why));
            if input.on_error == OnError::Keep {
                s.phase = Some(BuildPhase::Failed);
                s.completed_at = Some(now.clone());
                s.current_step = None;
                d.actions.push(Action::Event {
                    warning: true,
                    reason: "BuildFailed",
                    action: build_action(input),
                    note: format!(
                        "{why}; resources kept (onError: keep) until the ImageBuild is deleted"
                    ),
                });
                false
            } else {
                s.phase = Some(BuildPhase::CleaningUp);
                true
            }
        }
        StepPhase::Pending | StepPhase::Running => {
            let Some(step) = find_step(&input.plan_of(generation).steps, i, &rec.name) else {
                // Only when this kiln makes other steps from the spec than the one that
                // recorded them: failing the step lets cleanup run.
                let why = format!(
                    "this version of kiln has no step {} for the spec of generation {generation}",
                    rec.name
                );
                rec.phase = StepPhase::Failed;
                rec.finished_at = Some(now.clone());
                rec.message = Some(why.clone());
                d.actions.push(Action::Event {
                    warning: true,
                    reason: "StepFailed",
                    action: step_action(&rec.name),
                    note: why,
                });
                return true;
            };
            let resumed = rec.phase == StepPhase::Running;
            rec.phase = StepPhase::Running;
            rec.attempts += 1;
            if !resumed {
                rec.started_at = Some(now.clone());
            }
            rec.finished_at = None;
            let attempt = rec.attempts;
            let name = rec.name.clone();
            s.phase = Some(BuildPhase::Running);
            s.current_step = Some(name.clone());
            d.actions.push(Action::Spawn(TaskKey {
                generation,
                kind: TaskKind::Run,
                index: i,
                step,
                attempt,
            }));
            // A step's start and end are in status, not Events (each Event is
            // an apiserver write); a resumed run is worth one.
            if resumed {
                d.actions.push(Action::Event {
                    warning: false,
                    reason: "StepResumed",
                    action: step_action(&name),
                    note: format!(
                        "step {name} resumed (attempt {attempt}) after the operator restarted"
                    ),
                });
            }
            false
        }
        StepPhase::Succeeded => false,
    }
}

/// Returns true when nothing had to run, so the caller can look further back.
fn start_cleanup(d: &mut Decision, input: &Input<'_>, i: usize) -> bool {
    let s = &mut d.status;
    s.phase = Some(BuildPhase::CleaningUp);
    let generation = s.observed_generation.unwrap_or(input.generation);
    let step = match owed(s, input, i) {
        Cleanup::Run(step) => step,
        Cleanup::NotNeeded => {
            s.steps[i].cleanup = CleanupPhase::NotNeeded;
            return true;
        }
        // `next_cleanup` passes these by; never mark them done.
        Cleanup::NoCode => return false,
    };
    // One Event when the build's cleanup begins, not one per step.
    let first = s.steps.iter().all(|r| r.cleanup_attempts == 0);
    let rec = &mut s.steps[i];
    rec.cleanup_attempts += 1;
    let name = rec.name.clone();
    let attempt = rec.cleanup_attempts;
    s.current_step = Some(name.clone());
    d.actions.push(Action::Spawn(TaskKey {
        generation,
        kind: TaskKind::Cleanup,
        index: i,
        step,
        attempt,
    }));
    if first {
        d.actions.push(Action::Event {
            warning: false,
            reason: "CleanupStarted",
            action: format!("Clean up generation {generation}"),
            note: format!(
                "cleaning up the build's temporary resources, last step first (from step {name})"
            ),
        });
    }
    false
}

/// `artifactPolicy: Delete`: one attempt at removing every image of the ImageBuild.
fn start_removal(d: &mut Decision, input: &Input<'_>) {
    let s = &mut d.status;
    let generation = s.observed_generation.unwrap_or(input.generation);
    let r = s
        .artifact_removal
        .get_or_insert_with(ArtifactRemoval::default);
    r.attempts += 1;
    let attempt = r.attempts;
    s.phase = Some(BuildPhase::CleaningUp);
    s.current_step = None;
    s.message = Some("removing this ImageBuild's images (artifactPolicy: Delete)".into());
    d.actions.push(Action::Spawn(TaskKey {
        generation,
        kind: TaskKind::RemoveArtifacts,
        index: 0,
        step: 0,
        attempt,
    }));
    if attempt == 1 {
        d.actions.push(Action::Event {
            warning: false,
            reason: "ArtifactRemovalStarted",
            action: "Remove artifacts".into(),
            note: "removing every image of this ImageBuild, in every region it used (artifactPolicy: Delete)".into(),
        });
    }
}

fn complete(d: &mut Decision, input: &Input<'_>, now: &Time) {
    let s = &mut d.status;
    // The build that completes may be an earlier generation's, superseded after
    // its last step: its events and message name its own generation.
    let generation = s.observed_generation.unwrap_or(input.generation);
    let action = format!("Build generation {generation}");
    let failed = s
        .steps
        .iter()
        .find(|r| matches!(r.phase, StepPhase::Failed | StepPhase::Cancelled));
    s.current_step = None;
    s.completed_at = Some(now.clone());
    match failed {
        Some(r) => {
            let why = format!(
                "step {} failed: {}",
                r.name,
                r.message.clone().unwrap_or_default()
            );
            s.phase = Some(BuildPhase::Failed);
            s.message = Some(truncate(&format!("{why}; temporary resources cleaned up")));
            // A build superseded mid-way is not a failure anyone must act on.
            let superseded = generation != input.generation;
            d.actions.push(Action::Event {
                warning: !superseded,
                reason: if superseded {
                    "BuildSuperseded"
                } else {
                    "BuildFailed"
                },
                action,
                note: truncate(&format!("{why}; cleanup done")),
            });
        }
        None => {
            s.phase = Some(BuildPhase::Succeeded);
            s.message = Some(format!("generation {generation} built"));
            // Only now are its images artifacts: every step succeeded.
            for rec in &mut s.steps {
                s.artifacts.append(&mut rec.artifacts);
            }
            trim_artifacts(&mut s.artifacts);
            d.actions.push(Action::Event {
                warning: false,
                reason: "BuildSucceeded",
                action,
                note: format!("generation {generation} built; cleanup done"),
            });
        }
    }
}

fn take_result(
    d: &mut Decision,
    input: &Input<'_>,
    key: &TaskKey,
    result: &TaskResult,
    now: &Time,
) {
    let s = &mut d.status;
    if let (TaskKind::RemoveArtifacts, TaskResult::Cleanup(result)) = (key.kind, result) {
        take_removal(d, key, result, now);
        return;
    }
    if s.observed_generation != Some(key.generation) {
        return;
    }
    let Some(rec) = s.steps.get_mut(key.index) else {
        return;
    };
    match (key.kind, result) {
        (TaskKind::Run, TaskResult::Run(result)) => {
            if rec.phase != StepPhase::Running || rec.attempts != key.attempt {
                return;
            }
            rec.finished_at = Some(now.clone());
            match result {
                Ok(out) => {
                    rec.phase = StepPhase::Succeeded;
                    merge_resources(&mut rec.resources, &out.resources);
                    rec.outputs.extend(out.outputs.clone());
                    rec.message = out.message.as_deref().map(truncate);
                    // Held on the step until the whole build succeeds (see `complete`).
                    rec.artifacts = out.artifacts.clone();
                    // Images this step removed (an earlier generation's, replaced by
                    // `forceDeregister`) are no longer artifacts.
                    s.artifacts.retain(|a| {
                        !a.image_id
                            .as_ref()
                            .is_some_and(|id| out.removed_images.contains(id))
                    });
                }
                Err(StepError::Cancelled) => {
                    rec.phase = StepPhase::Cancelled;
                    rec.message = Some(if input.deleting {
                        "cancelled: the ImageBuild is being deleted".into()
                    } else {
                        format!("cancelled: superseded by generation {}", input.generation)
                    });
                }
                Err(e) => {
                    rec.phase = StepPhase::Failed;
                    rec.message = Some(truncate(&e.to_string()));
                    d.actions.push(Action::Event {
                        warning: true,
                        reason: "StepFailed",
                        action: step_action(&rec.name),
                        note: truncate(&format!("step {} failed: {e}", rec.name)),
                    });
                }
            }
        }
        (TaskKind::Cleanup, TaskResult::Cleanup(result)) => {
            if rec.cleanup != CleanupPhase::Pending || rec.cleanup_attempts != key.attempt {
                return;
            }
            match result {
                Ok(()) => {
                    rec.cleanup = CleanupPhase::Done;
                    rec.cleanup_message = None;
                    rec.cleanup_retry_at = None;
                }
                Err(e) => {
                    rec.cleanup_failures += 1;
                    rec.cleanup_retry_at = Some(retry_at(now, rec.cleanup_failures));
                    let note = format!(
                        "cleanup attempt {} of step {} failed, will retry: {e}",
                        key.attempt, rec.name
                    );
                    rec.cleanup_message = Some(truncate(&format!(
                        "cleanup attempt {} failed, will retry: {e}",
                        key.attempt
                    )));
                    d.actions.push(Action::Event {
                        warning: true,
                        reason: "CleanupFailed",
                        action: cleanup_action(&rec.name),
                        note: truncate(&note),
                    });
                }
            }
        }
        _ => {}
    }
}

/// The result of an `artifactPolicy: Delete` attempt.
fn take_removal(d: &mut Decision, key: &TaskKey, result: &Result<(), StepError>, now: &Time) {
    let s = &mut d.status;
    let Some(r) = s.artifact_removal.as_mut() else {
        return;
    };
    if r.phase != CleanupPhase::Pending || r.attempts != key.attempt {
        return;
    }
    match result {
        Ok(()) => {
            let removed: Vec<String> = s
                .artifacts
                .iter()
                .filter_map(|a| a.image_id.clone())
                .collect();
            r.phase = CleanupPhase::Done;
            r.retry_at = None;
            // The removal is recorded here; `artifacts` never lists a removed image.
            r.message = Some(truncate(&if removed.is_empty() {
                "removed every image of this ImageBuild".to_string()
            } else {
                format!(
                    "removed every image of this ImageBuild, including {}",
                    removed.join(", ")
                )
            }));
            s.artifacts.clear();
            d.actions.push(Action::Event {
                warning: false,
                reason: "ArtifactsRemoved",
                action: "Remove artifacts".into(),
                note: r.message.clone().unwrap_or_default(),
            });
        }
        Err(e) => {
            r.failures += 1;
            r.retry_at = Some(retry_at(now, r.failures));
            r.message = Some(truncate(&format!(
                "attempt {} failed, will retry: {e}",
                key.attempt
            )));
            d.actions.push(Action::Event {
                warning: true,
                reason: "CleanupFailed",
                action: "Remove artifacts".into(),
                note: truncate(&format!(
                    "removing this ImageBuild's images (artifactPolicy: Delete), attempt {} failed, will retry: {e}",
                    key.attempt
                )),
            });
        }
    }
}

/// When a cleanup that failed `failures` times may be tried again: recorded, so
/// that an operator restart neither skips the wait nor makes it longer.
fn retry_at(now: &Time, failures: u32) -> Time {
    let delay = super::runner::backoff(failures);
    let delay = k8s_openapi::jiff::SignedDuration::try_from(delay).unwrap_or_default();
    Time(now.0.checked_add(delay).unwrap_or(now.0))
}

/// Where the step named `name`, recorded at `index`, is in a plan: by name, so a
/// plan that does not match the recorded steps (an older kiln recorded no spec, and
/// the spec changed) never runs or cleans up a different step in its place.
fn find_step(plan: &Result<Vec<String>, String>, index: usize, name: &str) -> Option<usize> {
    let names = plan.as_ref().ok()?;
    if names.get(index).is_some_and(|n| n == name) {
        return Some(index);
    }
    names.iter().position(|n| n == name)
}

/// What cleaning up a started step takes.
enum Cleanup {
    /// Run the cleanup of this step of the plan.
    Run(usize),
    NotNeeded,
    /// Resources were created, but there is no step code to remove them with.
    NoCode,
}

fn owed(s: &ImageBuildStatus, input: &Input<'_>, i: usize) -> Cleanup {
    let rec = &s.steps[i];
    let generation = s.observed_generation.unwrap_or(input.generation);
    let plan = input.plan_of(generation);
    match find_step(&plan.steps, i, &rec.name) {
        Some(step) if (plan.needs_cleanup)(step, rec, BuildOutcome::of(&s.steps)) => {
            Cleanup::Run(step)
        }
        Some(_) => Cleanup::NotNeeded,
        // Without step code nothing can be found by tag or name; only records are known.
        None if rec.resources.iter().any(|r| r.created) => Cleanup::NoCode,
        None => Cleanup::NotNeeded,
    }
}

fn owes(r: &StepRecord) -> bool {
    r.started() && r.cleanup == CleanupPhase::Pending
}

/// Whether any started step still owes cleanup, including ones that cannot run.
fn owes_cleanup(s: &ImageBuildStatus) -> bool {
    s.steps.iter().any(owes)
}

/// Last started step whose cleanup is still owed and can be decided: cleanup walks
/// backwards, past steps without code (they are held, see [`hold`]), so that what
/// can be removed is removed.
fn next_cleanup(s: &ImageBuildStatus, input: &Input<'_>) -> Option<usize> {
    (0..s.steps.len())
        .rev()
        .find(|&i| owes(&s.steps[i]) && !matches!(owed(s, input, i), Cleanup::NoCode))
}

/// Cleanup is owed that no step code can do: say so, on the step and the build, and
/// wait. Dropping the records would leak what they name; kiln never does. A spec
/// change (e.g. back to that generation's spec) is looked at again; so is a status
/// edit that marks the step's cleanup `Done` once the resources are removed by hand.
fn hold(d: &mut Decision, input: &Input<'_>) {
    let s = &mut d.status;
    let generation = s.observed_generation.unwrap_or(input.generation);
    let why = match (&input.plan_of(generation).steps, s.build_spec.is_some()) {
        (Err(e), _) => format!("no steps can be made from its spec: {e}"),
        (Ok(_), true) => "this version of kiln makes no such step from its spec".to_string(),
        (Ok(_), false) => format!(
            "its spec was not recorded (status.buildSpec) by the kiln that ran it, and the current spec of generation {} has no such step",
            input.generation
        ),
    };
    let mut names = Vec::new();
    for rec in s.steps.iter_mut().filter(|r| owes(r)) {
        let left: Vec<String> = rec
            .resources
            .iter()
            .filter(|r| r.created)
            .map(|r| match &r.region {
                Some(region) => format!("{} {} in {region}", r.kind, r.id),
                None => format!("{} {}", r.kind, r.id),
            })
            .collect();
        let msg = truncate(&format!(
            "cannot clean up {}: kiln has no code for step {} of generation {generation} ({why}); restore that spec, or remove them by hand and set this step's cleanup to Done",
            left.join(", "),
            rec.name
        ));
        if rec.cleanup_message.as_deref() != Some(msg.as_str()) {
            d.actions.push(Action::Event {
                warning: true,
                reason: "CleanupFailed",
                action: cleanup_action(&rec.name),
                note: msg.clone(),
            });
            rec.cleanup_message = Some(msg);
        }
        names.push(rec.name.clone());
    }
    s.phase = Some(BuildPhase::CleaningUp);
    s.current_step = None;
    s.message = Some(truncate(&format!(
        "cleanup of generation {generation} is blocked: no step code for {} (see their cleanupMessage)",
        names.join(", ")
    )));
}

/// A step recorded as running whose task is gone (deleted or superseded build).
fn abandon_running(s: &mut ImageBuildStatus, why: &str, now: &Time) {
    for rec in &mut s.steps {
        if rec.phase == StepPhase::Running {
            rec.phase = StepPhase::Cancelled;
            rec.finished_at = Some(now.clone());
            rec.message = Some(why.to_string());
        }
    }
}

fn merge_resources(into: &mut Vec<ResourceRecord>, new: &[ResourceRecord]) {
    for r in new {
        if !into
            .iter()
            .any(|e| e.kind == r.kind && e.id == r.id && e.region == r.region)
        {
            into.push(r.clone());
        }
    }
}

fn trim_artifacts(a: &mut Vec<Artifact>) {
    if a.len() > ARTIFACT_HISTORY {
        let excess = a.len() - ARTIFACT_HISTORY;
        a.drain(..excess);
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= MESSAGE_LIMIT {
        return s.to_string();
    }
    let mut end = MESSAGE_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Whether cleanup may still need the builds' Secrets: a build that runs or owes
/// cleanup, and with `artifactPolicy: Delete` the whole life of the object (its
/// images are removed with them on deletion).
fn needs_secrets(s: &ImageBuildStatus, input: &Input<'_>, running: bool) -> bool {
    let removing = input.delete_artifacts
        && s.artifact_removal.as_ref().map(|r| r.phase) != Some(CleanupPhase::Done);
    running
        || removing
        || owes_cleanup(s)
        || (!input.deleting
            && matches!(
                s.phase,
                Some(BuildPhase::Pending | BuildPhase::Running | BuildPhase::CleaningUp)
            ))
}

/// Holds the Secrets cleanup needs before the step that could need them starts
/// (the names are recorded in the same status write), and releases them when no
/// cleanup can need them, before the ImageBuild's own finalizer goes.
fn hold_or_release(d: &mut Decision, input: &Input<'_>) {
    let running = matches!(input.task, TaskState::Running { .. })
        || d.actions.iter().any(|a| matches!(a, Action::Spawn(_)));
    let s = &mut d.status;
    if needs_secrets(s, input, running) {
        let added = input
            .secrets
            .iter()
            .filter(|n| !s.held_secrets.contains(n))
            .count();
        for n in input.secrets {
            if !s.held_secrets.contains(n) {
                s.held_secrets.push(n.clone());
            }
        }
        // Also after a restart, when the hold may not have landed before the crash.
        let resumed = d.actions.iter().any(|a| {
            matches!(
                a,
                Action::Event {
                    reason: "StepResumed",
                    ..
                }
            )
        });
        if (added > 0 || resumed) && !s.held_secrets.is_empty() {
            d.actions
                .insert(0, Action::HoldSecrets(s.held_secrets.clone()));
        }
    } else if !s.held_secrets.is_empty() {
        let at = d
            .actions
            .iter()
            .position(|a| *a == Action::RemoveFinalizer)
            .unwrap_or(d.actions.len());
        d.actions
            .insert(at, Action::ReleaseSecrets(s.held_secrets.clone()));
    }
}

/// Conditions follow from phase and generation; computed last so they always agree.
fn finish(d: &mut Decision, input: &Input<'_>) {
    hold_or_release(d, input);
    let s = &mut d.status;
    // Every region a build created something in, kept across generations: where
    // `artifactPolicy: Delete` looks for images the bounded history forgot.
    let regions: Vec<String> = s
        .steps
        .iter()
        .flat_map(|r| r.resources.iter())
        .filter(|r| r.created)
        .filter_map(|r| r.region.clone())
        .collect();
    for region in regions {
        if !s.regions.contains(&region) {
            s.regions.push(region);
        }
    }
    let current = s.observed_generation == Some(input.generation);
    let phase = s.phase;
    let msg = s.message.clone().unwrap_or_default();
    let (ready, ready_reason) = match phase {
        Some(BuildPhase::Succeeded) if current => (true, "Succeeded"),
        Some(BuildPhase::Failed) if current => (false, "Failed"),
        Some(p) => (false, p.as_str()),
        None => (false, "Pending"),
    };
    let reconciling = !input.deleting
        && (!current
            || matches!(
                phase,
                None | Some(BuildPhase::Pending | BuildPhase::Running | BuildPhase::CleaningUp)
            ));
    let stalled = current && phase == Some(BuildPhase::Failed) && !input.deleting;
    let reconciling_reason = if !current {
        "Superseded"
    } else {
        phase.map_or("Pending", BuildPhase::as_str)
    };
    let ready_msg = if ready || (current && phase == Some(BuildPhase::Failed)) {
        msg.clone()
    } else {
        format!("building generation {}", input.generation)
    };
    set_condition(s, "Ready", ready, ready_reason, &ready_msg, input);
    set_condition(
        s,
        "Reconciling",
        reconciling,
        reconciling_reason,
        if reconciling { &msg } else { "" },
        input,
    );
    set_condition(
        s,
        "Stalled",
        stalled,
        if stalled { "BuildFailed" } else { "NotStalled" },
        if stalled { &msg } else { "" },
        input,
    );
}

/// Build events are per generation: a later generation's BuildSucceeded is not a
/// repeat of an earlier one's.
fn build_action(input: &Input<'_>) -> String {
    format!("Build generation {}", input.generation)
}

fn step_action(step: &str) -> String {
    format!("Run step {step}")
}

fn cleanup_action(step: &str) -> String {
    format!("Clean up step {step}")
}

fn set_condition(
    s: &mut ImageBuildStatus,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
    input: &Input<'_>,
) {
    let status = if value { "True" } else { "False" };
    let message = truncate(message);
    if let Some(c) = s.conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status != status {
            c.last_transition_time = Time(input.now);
        }
        c.status = status.into();
        c.reason = reason.into();
        c.message = message;
        c.observed_generation = Some(input.generation);
    } else {
        s.conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: Some(input.generation),
            last_transition_time: Time(input.now),
        });
    }
}

#[cfg(test)]
mod tests;
