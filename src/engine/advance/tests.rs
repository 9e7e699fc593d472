use super::*;
use crate::api::{CleanupPhase, ImageBuildStatus, OnError, StepPhase};
use crate::engine::{StepError, StepOutput};

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn names() -> Result<Vec<String>, String> {
    Ok(vec!["connect".into(), "shell-1".into(), "file-2".into()])
}

fn created(_: usize, r: &StepRecord, _: BuildOutcome) -> bool {
    r.resources.iter().any(|r| r.created)
}

fn spec() -> serde_json::Value {
    serde_json::json!({"builder": {"null": {}}, "provisioners": [{"shell": {"inline": ["true"]}}]})
}

fn view(steps: Result<Vec<String>, String>) -> PlanView<'static> {
    PlanView {
        steps,
        needs_cleanup: &created,
    }
}

fn decide(
    status: &ImageBuildStatus,
    task: &TaskState,
    deleting: bool,
    on_error: OnError,
) -> Decision {
    decide_gen(status, task, deleting, on_error, 1)
}

fn decide_gen(
    status: &ImageBuildStatus,
    task: &TaskState,
    deleting: bool,
    on_error: OnError,
    generation: i64,
) -> Decision {
    decide_views(
        status,
        task,
        (deleting, on_error, generation),
        view(names()),
        view(names()),
    )
}

/// A decision with the plans given: the current spec's, then the recorded one's.
fn decide_views(
    status: &ImageBuildStatus,
    task: &TaskState,
    (deleting, on_error, generation): (bool, OnError, i64),
    plan: PlanView<'_>,
    recorded: PlanView<'_>,
) -> Decision {
    advance(&Input {
        status,
        generation,
        deleting,
        on_error,
        delete_artifacts: false,
        secrets: &[],
        builder: "null",
        spec: &spec(),
        plan,
        recorded,
        task,
        now: now(),
    })
}

fn spawned(d: &Decision) -> Option<TaskKey> {
    d.actions.iter().find_map(|a| match a {
        Action::Spawn(k) => Some(k.clone()),
        _ => None,
    })
}

fn cond<'a>(s: &'a ImageBuildStatus, t: &str) -> &'a str {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| c.status.as_str())
        .unwrap_or("missing")
}

fn finished_run(d: &Decision, result: Result<StepOutput, StepError>) -> TaskState {
    let key = spawned(d).expect("a spawn");
    TaskState::Finished {
        key,
        result: TaskResult::Run(result),
    }
}

#[test]
fn a_new_build_records_all_steps_and_starts_the_first() {
    let d = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    let s = &d.status;
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(s.phase, Some(BuildPhase::Running));
    assert_eq!(s.steps.len(), 3);
    assert_eq!(s.steps[0].phase, StepPhase::Running);
    assert_eq!(s.steps[0].attempts, 1);
    assert_eq!(s.steps[1].phase, StepPhase::Pending);
    assert_eq!(
        spawned(&d),
        Some(TaskKey {
            generation: 1,
            kind: TaskKind::Run,
            index: 0,
            step: 0,
            attempt: 1
        })
    );
    assert_eq!(cond(s, "Ready"), "False");
    assert_eq!(cond(s, "Reconciling"), "True");
    assert_eq!(cond(s, "Stalled"), "False");
}

#[test]
fn a_finished_step_is_recorded_with_the_start_of_the_next_in_one_decision() {
    let d0 = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    let t = finished_run(&d0, Ok(StepOutput::default()));
    let d1 = decide(&d0.status, &t, false, OnError::Cleanup);
    assert_eq!(d1.status.steps[0].phase, StepPhase::Succeeded);
    assert_eq!(d1.status.steps[1].phase, StepPhase::Running);
    assert_eq!(spawned(&d1).map(|k| k.index), Some(1));
    assert!(d1.actions.contains(&Action::Forget));
}

#[test]
fn a_running_task_means_no_change() {
    let d0 = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    let t = TaskState::Running {
        key: spawned(&d0).unwrap(),
        cancelling: false,
    };
    let d1 = decide(&d0.status, &t, false, OnError::Cleanup);
    assert_eq!(d1.status, d0.status);
    assert!(d1.actions.is_empty());
}

#[test]
fn after_a_restart_the_running_step_is_resumed_and_finished_ones_are_not_rerun() {
    let d0 = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    let d1 = decide(
        &d0.status,
        &finished_run(&d0, Ok(StepOutput::default())),
        false,
        OnError::Cleanup,
    );
    // The process dies: no task in memory, status says shell-1 is running.
    let d2 = decide(&d1.status, &TaskState::None, false, OnError::Cleanup);
    let key = spawned(&d2).unwrap();
    assert_eq!(key.index, 1);
    assert_eq!(key.attempt, 2);
    assert_eq!(d2.status.steps[0].attempts, 1);
    assert_eq!(d2.status.steps[1].attempts, 2);
    assert!(d2.actions.iter().any(|a| matches!(
        a,
        Action::Event {
            reason: "StepResumed",
            ..
        }
    )));
}

#[test]
fn a_stale_result_is_ignored() {
    let d0 = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    let mut key = spawned(&d0).unwrap();
    key.attempt = 7;
    let t = TaskState::Finished {
        key,
        result: TaskResult::Run(Ok(StepOutput::default())),
    };
    let d1 = decide(&d0.status, &t, false, OnError::Cleanup);
    assert_eq!(d1.status.steps[0].phase, StepPhase::Running);
}

fn run_to_failure(on_error: OnError, with_resource: bool) -> Decision {
    let d0 = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        on_error,
    );
    let mut out = StepOutput::default();
    if with_resource {
        out.resources.push(ResourceRecord {
            kind: "KeyPair".into(),
            id: "kiln-1".into(),
            region: None,
            created: true,
        });
        out.resources.push(ResourceRecord {
            kind: "Subnet".into(),
            id: "subnet-1".into(),
            region: None,
            created: false,
        });
    }
    let d1 = decide(&d0.status, &finished_run(&d0, Ok(out)), false, on_error);
    decide(
        &d1.status,
        &finished_run(
            &d1,
            Err(StepError::Failed("script exited with code 3".into())),
        ),
        false,
        on_error,
    )
}

#[test]
fn failure_cleans_up_in_reverse_then_fails_and_stalls() {
    let d = run_to_failure(OnError::Cleanup, true);
    // shell-1 failed and created nothing: NotNeeded; connect created a key pair: cleanup task.
    assert_eq!(d.status.steps[1].phase, StepPhase::Failed);
    assert_eq!(d.status.steps[1].cleanup, CleanupPhase::NotNeeded);
    assert_eq!(
        d.status.steps[2].cleanup,
        CleanupPhase::Pending,
        "never started"
    );
    assert_eq!(d.status.phase, Some(BuildPhase::CleaningUp));
    let key = spawned(&d).unwrap();
    assert_eq!((key.kind, key.index), (TaskKind::Cleanup, 0));

    let t = TaskState::Finished {
        key,
        result: TaskResult::Cleanup(Ok(())),
    };
    let d2 = decide(&d.status, &t, false, OnError::Cleanup);
    assert_eq!(d2.status.steps[0].cleanup, CleanupPhase::Done);
    assert_eq!(d2.status.phase, Some(BuildPhase::Failed));
    assert!(
        d2.status
            .message
            .as_deref()
            .unwrap()
            .contains("exited with code 3")
    );
    assert_eq!(cond(&d2.status, "Stalled"), "True");
    assert_eq!(cond(&d2.status, "Ready"), "False");
    assert_eq!(cond(&d2.status, "Reconciling"), "False");
    // Nothing more to do until the spec changes.
    let d3 = decide(&d2.status, &TaskState::None, false, OnError::Cleanup);
    assert_eq!(d3.status, d2.status);
    assert!(d3.actions.is_empty());
}

#[test]
fn failed_cleanup_is_retried_with_a_new_attempt() {
    let d = run_to_failure(OnError::Cleanup, true);
    let key = spawned(&d).unwrap();
    let t = TaskState::Finished {
        key,
        result: TaskResult::Cleanup(Err(StepError::Transient("DependencyViolation".into()))),
    };
    let d2 = decide(&d.status, &t, false, OnError::Cleanup);
    assert_eq!(d2.status.steps[0].cleanup, CleanupPhase::Pending);
    let again = spawned(&d2).unwrap();
    assert_eq!((again.index, again.attempt), (0, 2));
    assert!(
        d2.status.steps[0]
            .cleanup_message
            .as_deref()
            .unwrap()
            .contains("DependencyViolation")
    );
}

#[test]
fn on_error_keep_leaves_resources_until_deletion() {
    let d = run_to_failure(OnError::Keep, true);
    assert_eq!(d.status.phase, Some(BuildPhase::Failed));
    assert!(spawned(&d).is_none());
    assert_eq!(d.status.steps[0].cleanup, CleanupPhase::Pending);
    assert_eq!(cond(&d.status, "Stalled"), "True");

    let del = decide(&d.status, &TaskState::None, true, OnError::Keep);
    let key = spawned(&del).unwrap();
    assert_eq!((key.kind, key.index), (TaskKind::Cleanup, 0));
    let t = TaskState::Finished {
        key,
        result: TaskResult::Cleanup(Ok(())),
    };
    let done = decide(&del.status, &t, true, OnError::Keep);
    assert!(done.actions.contains(&Action::RemoveFinalizer));
}

#[test]
fn success_cleans_up_then_is_ready() {
    let mut d = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    for _ in 0..3 {
        d = decide(
            &d.status,
            &finished_run(&d, Ok(StepOutput::default())),
            false,
            OnError::Cleanup,
        );
    }
    assert_eq!(d.status.phase, Some(BuildPhase::Succeeded));
    assert!(
        d.status
            .steps
            .iter()
            .all(|s| s.cleanup == CleanupPhase::NotNeeded)
    );
    assert_eq!(cond(&d.status, "Ready"), "True");
    assert_eq!(cond(&d.status, "Reconciling"), "False");
    assert!(d.status.completed_at.is_some());
}

#[test]
fn deleting_mid_step_cancels_then_cleans_up_then_releases() {
    let d0 = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    let key = spawned(&d0).unwrap();
    let running = TaskState::Running {
        key: key.clone(),
        cancelling: false,
    };
    let d1 = decide(&d0.status, &running, true, OnError::Cleanup);
    assert_eq!(d1.actions, vec![Action::Cancel]);
    let t = TaskState::Finished {
        key,
        result: TaskResult::Run(Err(StepError::Cancelled)),
    };
    let d2 = decide(&d1.status, &t, true, OnError::Cleanup);
    assert_eq!(d2.status.steps[0].phase, StepPhase::Cancelled);
    assert!(d2.actions.contains(&Action::RemoveFinalizer));
}

#[test]
fn deleting_after_a_restart_marks_the_orphaned_step_cancelled() {
    let d0 = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    let d1 = decide(&d0.status, &TaskState::None, true, OnError::Cleanup);
    assert_eq!(d1.status.steps[0].phase, StepPhase::Cancelled);
    assert!(d1.actions.contains(&Action::RemoveFinalizer));
}

#[test]
fn a_new_generation_supersedes_a_running_build_then_builds() {
    let d0 = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    let key = spawned(&d0).unwrap();
    let running = TaskState::Running {
        key: key.clone(),
        cancelling: false,
    };
    let d1 = decide_gen(&d0.status, &running, false, OnError::Cleanup, 2);
    assert_eq!(d1.actions, vec![Action::Cancel]);
    assert_eq!(cond(&d1.status, "Ready"), "False");
    let t = TaskState::Finished {
        key,
        result: TaskResult::Run(Err(StepError::Cancelled)),
    };
    let d2 = decide_gen(&d1.status, &t, false, OnError::Cleanup, 2);
    assert_eq!(d2.status.observed_generation, Some(2));
    assert_eq!(d2.status.phase, Some(BuildPhase::Running));
    assert!(
        d2.status
            .steps
            .iter()
            .skip(1)
            .all(|s| s.phase == StepPhase::Pending)
    );
    assert_eq!(spawned(&d2).map(|k| (k.generation, k.index)), Some((2, 0)));
}

#[test]
fn a_spec_change_after_success_starts_a_new_build_and_keeps_artifacts() {
    let mut d = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    for _ in 0..3 {
        let mut out = StepOutput::default();
        out.artifacts.push(crate::api::Artifact {
            generation: 1,
            builder: "null".into(),
            region: None,
            image_id: Some("ami-1".into()),
            snapshot_ids: vec![],
            source_image_id: None,
            created_at: None,
        });
        d = decide(
            &d.status,
            &finished_run(&d, Ok(out)),
            false,
            OnError::Cleanup,
        );
    }
    assert_eq!(d.status.artifacts.len(), 3);
    let d2 = decide_gen(&d.status, &TaskState::None, false, OnError::Cleanup, 2);
    assert_eq!(d2.status.observed_generation, Some(2));
    assert_eq!(d2.status.phase, Some(BuildPhase::Running));
    assert_eq!(d2.status.artifacts.len(), 3);
    assert_eq!(cond(&d2.status, "Ready"), "False");
}

#[test]
fn an_invalid_plan_fails_without_steps() {
    let d = advance(&Input {
        status: &ImageBuildStatus::default(),
        generation: 1,
        deleting: false,
        on_error: OnError::Cleanup,
        delete_artifacts: false,
        secrets: &[],
        builder: "amazon-ebs",
        spec: &spec(),
        plan: view(Err("spec.builder.amazonEBS: not available".into())),
        recorded: view(Err("spec.builder.amazonEBS: not available".into())),
        task: &TaskState::None,
        now: now(),
    });
    assert_eq!(d.status.phase, Some(BuildPhase::Failed));
    assert_eq!(cond(&d.status, "Stalled"), "True");
    assert!(d.status.message.unwrap().contains("spec.builder.amazonEBS"));
}

#[test]
fn artifacts_history_is_bounded() {
    let mut a: Vec<crate::api::Artifact> = (0..15)
        .map(|i| crate::api::Artifact {
            generation: i,
            builder: "null".into(),
            region: None,
            image_id: None,
            snapshot_ids: vec![],
            source_image_id: None,
            created_at: None,
        })
        .collect();
    trim_artifacts(&mut a);
    assert_eq!(a.len(), ARTIFACT_HISTORY);
    assert_eq!(a[0].generation, 5);
}

// ------------------------------------------- a spec change: which plan, which spec

fn named(names: &[&str]) -> Result<Vec<String>, String> {
    Ok(names.iter().map(|n| n.to_string()).collect())
}

/// A step that ran and created `kind` (if any).
fn ran(name: &str, kind: Option<&str>) -> StepRecord {
    let mut r = StepRecord::pending(name);
    r.phase = StepPhase::Succeeded;
    r.attempts = 1;
    if let Some(kind) = kind {
        r.resources.push(ResourceRecord {
            kind: kind.into(),
            id: format!("{kind}-1"),
            region: Some("us-east-1".into()),
            created: true,
        });
    }
    r
}

/// Generation 1 recorded `steps` and `spec`, and is running its last started step.
fn recorded_build(spec: Option<serde_json::Value>, steps: Vec<StepRecord>) -> ImageBuildStatus {
    ImageBuildStatus {
        observed_generation: Some(1),
        phase: Some(BuildPhase::Running),
        build_spec: spec,
        steps,
        ..Default::default()
    }
}

struct Spec2<'a> {
    status: &'a ImageBuildStatus,
    task: &'a TaskState,
    deleting: bool,
    plan: PlanView<'a>,
    recorded: PlanView<'a>,
}

/// A decision for generation 2, whose spec is `spec2()`.
fn decide2(i: Spec2<'_>) -> Decision {
    advance(&Input {
        status: i.status,
        generation: 2,
        deleting: i.deleting,
        on_error: OnError::Cleanup,
        delete_artifacts: false,
        secrets: &[],
        builder: "null",
        spec: &spec2(),
        plan: i.plan,
        recorded: i.recorded,
        task: i.task,
        now: now(),
    })
}

fn spec2() -> serde_json::Value {
    serde_json::json!({"builder": {"null": {}}, "provisioners": []})
}

fn cleanup_done(d: &Decision) -> TaskState {
    TaskState::Finished {
        key: spawned(d).expect("a cleanup spawn"),
        result: TaskResult::Cleanup(Ok(())),
    }
}

fn never(_: usize, _: &StepRecord, _: BuildOutcome) -> bool {
    panic!("the current spec's plan was asked about a step of the recorded build")
}

fn always(_: usize, _: &StepRecord, _: BuildOutcome) -> bool {
    true
}

#[test]
fn a_superseded_build_is_cleaned_up_with_the_plan_it_recorded_then_the_new_spec_builds() {
    // Generation 2 added a provisioner and dropped a copy: its step list is shifted.
    let recorded_names = ["key-pair", "instance", "shell-1", "stop-instance"];
    let current_names = ["key-pair", "instance", "shell-1", "shell-2", "copy-image"];
    let mut steps = vec![
        ran("key-pair", Some("KeyPair")),
        ran("instance", Some("Instance")),
        ran("shell-1", None),
        StepRecord::pending("stop-instance"),
    ];
    steps[2].phase = StepPhase::Running;
    let spec1 = serde_json::json!({"builder": {"amazonEBS": {"region": "us-east-1"}}});
    let status = recorded_build(Some(spec1.clone()), steps);

    let d = decide2(Spec2 {
        status: &status,
        task: &TaskState::None,
        deleting: false,
        plan: PlanView {
            steps: named(&current_names),
            needs_cleanup: &never,
        },
        recorded: PlanView {
            steps: named(&recorded_names),
            needs_cleanup: &always,
        },
    });
    // shell-1 (no resources, but the recorded plan says it needs cleanup) goes first.
    let key = spawned(&d).unwrap();
    assert_eq!(
        (key.generation, key.kind, key.index, key.step),
        (1, TaskKind::Cleanup, 2, 2)
    );
    assert_eq!(d.status.steps[2].phase, StepPhase::Cancelled);
    assert_eq!(
        d.status.build_spec.as_ref(),
        Some(&spec1),
        "the old spec stays recorded while its steps are cleaned up"
    );

    let mut d = d;
    for next in [Some(1), Some(0), None] {
        d = decide2(Spec2 {
            status: &d.status,
            task: &cleanup_done(&d),
            deleting: false,
            plan: PlanView {
                steps: named(&current_names),
                needs_cleanup: &never,
            },
            recorded: PlanView {
                steps: named(&recorded_names),
                needs_cleanup: &always,
            },
        });
        if let Some(index) = next {
            let key = spawned(&d).unwrap();
            assert_eq!(
                (key.generation, key.kind, key.index, key.step),
                (1, TaskKind::Cleanup, index, index)
            );
        }
    }
    // The last cleanup finished in the same decision that starts generation 2: with
    // the current plan's steps, and the current spec recorded.
    assert_eq!(d.status.observed_generation, Some(2));
    assert_eq!(d.status.build_spec, Some(spec2()));
    let names: Vec<&str> = d.status.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, current_names);
    let key = spawned(&d).unwrap();
    assert_eq!(
        (key.generation, key.kind, key.index, key.step),
        (2, TaskKind::Run, 0, 0)
    );
    assert!(uses_recorded_plan(&d.status, key.generation));
    assert!(!uses_recorded_plan(&status, key.generation));
}

#[test]
fn a_new_build_records_its_spec_and_an_older_kilns_status_gets_it_only_for_its_own_generation() {
    let d = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    assert_eq!(d.status.build_spec, Some(spec()));

    // Written by an older kiln, the current generation: its spec is the current one.
    let mut old = d.status.clone();
    old.build_spec = None;
    let running = TaskState::Running {
        key: spawned(&d).unwrap(),
        cancelling: false,
    };
    let d1 = decide(&old, &running, false, OnError::Cleanup);
    assert_eq!(d1.status.build_spec, Some(spec()));

    // An older generation: its spec is unknown, nothing is recorded for it.
    let d2 = decide_gen(&old, &running, false, OnError::Cleanup, 2);
    assert_eq!(d2.status.build_spec, None);
}

/// Status from a kiln that recorded no spec, superseded by a spec whose plan has
/// other steps: the plan is the current spec's, matched by name.
fn legacy() -> ImageBuildStatus {
    let mut steps = vec![
        ran("connect", None),
        ran("key-pair", Some("KeyPair")),
        ran("shell-1", None),
        ran("create-image", Some("Image")),
        StepRecord::pending("copy-image-eu-west-1"),
    ];
    steps[3].phase = StepPhase::Running;
    recorded_build(None, steps)
}

const LEGACY_PLAN: [&str; 4] = ["connect", "shell-1", "shell-2", "create-image"];

fn decide_legacy(status: &ImageBuildStatus, task: &TaskState, deleting: bool) -> Decision {
    decide2(Spec2 {
        status,
        task,
        deleting,
        plan: view(named(&LEGACY_PLAN)),
        recorded: view(named(&LEGACY_PLAN)),
    })
}

#[test]
fn without_a_recorded_spec_only_steps_found_by_name_are_cleaned_up_and_the_rest_is_held() {
    let d = decide_legacy(&legacy(), &TaskState::None, false);
    // create-image is at the same index in both; found there.
    let key = spawned(&d).unwrap();
    assert_eq!((key.kind, key.index, key.step), (TaskKind::Cleanup, 3, 3));

    let d = decide_legacy(&d.status, &cleanup_done(&d), false);
    let s = &d.status;
    assert_eq!(s.steps[3].cleanup, CleanupPhase::Done);
    // shell-1 is index 1 of the plan, not index 2 (shell-2); it created nothing.
    assert_eq!(s.steps[2].cleanup, CleanupPhase::NotNeeded);
    // connect is before key-pair, but cleanup goes on past a step it cannot do.
    assert_eq!(s.steps[0].cleanup, CleanupPhase::NotNeeded);
    // key-pair has no code in this plan and created a key pair: never marked done.
    assert_eq!(s.steps[1].cleanup, CleanupPhase::Pending);
    let msg = s.steps[1].cleanup_message.as_deref().unwrap();
    assert!(
        msg.contains("KeyPair KeyPair-1 in us-east-1") && msg.contains("status.buildSpec"),
        "{msg}"
    );
    assert!(spawned(&d).is_none());
    assert_eq!(s.phase, Some(BuildPhase::CleaningUp));
    assert_eq!(s.observed_generation, Some(1), "generation 2 waits");
    assert!(s.message.as_deref().unwrap().contains("blocked"));
    assert!(d.actions.iter().any(|a| matches!(
        a,
        Action::Event {
            warning: true,
            reason: "CleanupFailed",
            ..
        }
    )));
    assert_eq!(cond(s, "Reconciling"), "True");

    // Looked at again: no new write, no repeated event.
    let again = decide_legacy(&d.status, &TaskState::None, false);
    assert_eq!(again.status, d.status);
    assert!(again.actions.is_empty(), "{:?}", again.actions);

    // Nor does deletion drop it: the finalizer stays.
    let del = decide_legacy(&d.status, &TaskState::None, true);
    assert!(!del.actions.contains(&Action::RemoveFinalizer));
    assert_eq!(del.status.steps[1].cleanup, CleanupPhase::Pending);

    // A spec whose plan has the step again (e.g. generation 1's restored) cleans it up.
    let restored = ["connect", "key-pair", "shell-1", "create-image"];
    let d = decide2(Spec2 {
        status: &d.status,
        task: &TaskState::None,
        deleting: false,
        plan: view(named(&restored)),
        recorded: view(named(&restored)),
    });
    let key = spawned(&d).unwrap();
    assert_eq!((key.kind, key.index, key.step), (TaskKind::Cleanup, 1, 1));
}

#[test]
fn without_any_plan_nothing_created_is_marked_done() {
    let d = decide2(Spec2 {
        status: &legacy(),
        task: &TaskState::None,
        deleting: true,
        plan: view(Err("spec.builder: exactly one builder must be set".into())),
        recorded: view(Err("spec.builder: exactly one builder must be set".into())),
    });
    assert!(spawned(&d).is_none());
    assert!(!d.actions.contains(&Action::RemoveFinalizer));
    let s = &d.status;
    assert_eq!(s.steps[1].cleanup, CleanupPhase::Pending);
    assert_eq!(s.steps[3].cleanup, CleanupPhase::Pending);
    assert_eq!(s.steps[0].cleanup, CleanupPhase::NotNeeded);
    assert!(
        s.steps[3]
            .cleanup_message
            .as_deref()
            .unwrap()
            .contains("exactly one builder")
    );
}

#[test]
fn a_recorded_step_this_kiln_cannot_run_fails_and_is_not_replaced_by_another() {
    let d0 = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    // A newer kiln resumes the build; its plan for the recorded spec lacks shell-1.
    let plan = named(&["connect", "file-2"]);
    let d1 = decide_views(
        &d0.status,
        &finished_run(&d0, Ok(StepOutput::default())),
        (false, OnError::Cleanup, 1),
        view(plan.clone()),
        view(plan),
    );
    assert_eq!(d1.status.steps[1].phase, StepPhase::Failed);
    assert!(
        d1.status.steps[1]
            .message
            .as_deref()
            .unwrap()
            .contains("no step shell-1")
    );
    assert!(spawned(&d1).is_none(), "{:?}", d1.actions);
    assert_eq!(d1.status.phase, Some(BuildPhase::Failed));
}

fn image(id: &str, generation: i64) -> crate::api::Artifact {
    crate::api::Artifact {
        generation,
        builder: "amazon-ebs".into(),
        region: Some("us-east-1".into()),
        image_id: Some(id.into()),
        snapshot_ids: vec![format!("snap-{id}")],
        source_image_id: None,
        created_at: None,
    }
}

fn with_policy(
    status: &ImageBuildStatus,
    task: &TaskState,
    deleting: bool,
    delete_artifacts: bool,
    generation: i64,
) -> Decision {
    advance(&Input {
        status,
        generation,
        deleting,
        on_error: OnError::Cleanup,
        delete_artifacts,
        secrets: &[],
        builder: "amazon-ebs",
        spec: &spec(),
        plan: view(names()),
        recorded: view(names()),
        task,
        now: now(),
    })
}

/// Runs every step to success; the last one makes an image and a resource to clean
/// up, so the build stops in CleaningUp with its cleanup task spawned.
fn run_to_success_cleanup() -> Decision {
    let mut d = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    for i in 0..3 {
        let mut out = StepOutput::default();
        if i == 2 {
            out.artifacts.push(image("ami-1", 1));
            out.resources.push(ResourceRecord {
                kind: "Instance".into(),
                id: "i-1".into(),
                region: Some("us-east-1".into()),
                created: true,
            });
        }
        d = decide(
            &d.status,
            &finished_run(&d, Ok(out)),
            false,
            OnError::Cleanup,
        );
    }
    assert_eq!(d.status.phase, Some(BuildPhase::CleaningUp));
    d
}

#[test]
fn the_outcome_comes_from_the_recorded_steps_only() {
    let d = run_to_success_cleanup();
    assert_eq!(
        crate::engine::BuildOutcome::of(&d.status.steps),
        crate::engine::BuildOutcome::Succeeded
    );
    let failed = run_to_failure(OnError::Cleanup, true);
    assert_eq!(
        crate::engine::BuildOutcome::of(&failed.status.steps),
        crate::engine::BuildOutcome::Failed
    );
    assert_eq!(
        crate::engine::BuildOutcome::of(&[]),
        crate::engine::BuildOutcome::Failed
    );
}

#[test]
fn images_become_artifacts_when_the_build_succeeds_even_if_superseded_during_cleanup() {
    let d = run_to_success_cleanup();
    // Not yet an artifact while the build is cleaning up: it is held on its step.
    assert!(d.status.artifacts.is_empty());
    assert_eq!(d.status.steps[2].artifacts.len(), 1);
    // The spec changes while the successful build cleans up.
    let key = spawned(&d).unwrap();
    let t = TaskState::Finished {
        key,
        result: TaskResult::Cleanup(Ok(())),
    };
    let d2 = decide_gen(&d.status, &t, false, OnError::Cleanup, 2);
    assert_eq!(d2.status.artifacts, vec![image("ami-1", 1)]);
    assert_eq!(
        d2.status.observed_generation,
        Some(2),
        "the next build started"
    );
    let succeeded = d2.actions.iter().find_map(|a| match a {
        Action::Event {
            reason: "BuildSucceeded",
            action,
            note,
            ..
        } => Some((action.clone(), note.clone())),
        _ => None,
    });
    let (action, note) = succeeded.expect("a BuildSucceeded event");
    assert_eq!(action, "Build generation 1");
    assert!(note.starts_with("generation 1 built"), "{note}");
}

#[test]
fn a_failed_build_lists_no_artifact() {
    let mut d = decide(
        &ImageBuildStatus::default(),
        &TaskState::None,
        false,
        OnError::Cleanup,
    );
    let mut out = StepOutput::default();
    out.artifacts.push(image("ami-1", 1));
    d = decide(
        &d.status,
        &finished_run(&d, Ok(out)),
        false,
        OnError::Cleanup,
    );
    d = decide(
        &d.status,
        &finished_run(&d, Err(StepError::Failed("copy failed".into()))),
        false,
        OnError::Cleanup,
    );
    assert_eq!(d.status.phase, Some(BuildPhase::Failed));
    assert!(d.status.artifacts.is_empty());
}

#[test]
fn an_image_a_step_removed_is_no_longer_an_artifact() {
    let mut status = ImageBuildStatus {
        artifacts: vec![image("ami-old", 1), image("ami-other", 1)],
        ..Default::default()
    };
    let d = decide_gen(&status, &TaskState::None, false, OnError::Cleanup, 2);
    status = d.status.clone();
    let mut out = StepOutput::default();
    out.removed_images.push("ami-old".into());
    let d = decide_gen(
        &status,
        &finished_run(&d, Ok(out)),
        false,
        OnError::Cleanup,
        2,
    );
    assert_eq!(d.status.artifacts, vec![image("ami-other", 1)]);
}

#[test]
fn cleanup_backs_off_by_failures_not_by_restarts() {
    let d = run_to_failure(OnError::Cleanup, true);
    let key = spawned(&d).unwrap();
    let t = TaskState::Finished {
        key,
        result: TaskResult::Cleanup(Err(StepError::Transient("throttled".into()))),
    };
    let d2 = decide(&d.status, &t, false, OnError::Cleanup);
    let rec = &d2.status.steps[0];
    assert_eq!((rec.cleanup_failures, rec.cleanup_attempts), (1, 2));
    let first_retry = rec.cleanup_retry_at.clone().expect("a retry time");
    assert!(first_retry.0 > now());
    // Nine operator restarts: each resumes the cleanup with a new attempt, none of
    // which is a failure, so the recorded retry time does not move.
    let mut s = d2.status.clone();
    for _ in 0..9 {
        s = decide(&s, &TaskState::None, false, OnError::Cleanup).status;
    }
    assert_eq!(s.steps[0].cleanup_failures, 1);
    assert_eq!(s.steps[0].cleanup_retry_at, Some(first_retry));
    assert_eq!(s.steps[0].cleanup_attempts, 11);
}

#[test]
fn artifact_policy_delete_removes_every_image_before_the_finalizer_goes() {
    let d = run_to_success_cleanup();
    let key = spawned(&d).unwrap();
    let t = TaskState::Finished {
        key,
        result: TaskResult::Cleanup(Ok(())),
    };
    let done = with_policy(&d.status, &t, false, true, 1);
    assert_eq!(done.status.phase, Some(BuildPhase::Succeeded));
    assert_eq!(done.status.artifacts.len(), 1);
    assert_eq!(done.status.regions, vec!["us-east-1".to_string()]);

    // Without the policy, deletion releases the finalizer at once.
    let retain = with_policy(&done.status, &TaskState::None, true, false, 1);
    assert!(retain.actions.contains(&Action::RemoveFinalizer));

    let del = with_policy(&done.status, &TaskState::None, true, true, 1);
    assert!(!del.actions.contains(&Action::RemoveFinalizer));
    let key = spawned(&del).expect("a removal task");
    assert_eq!((key.kind, key.attempt), (TaskKind::RemoveArtifacts, 1));

    // A failed attempt is retried, backing off; the artifacts stay listed.
    let failed = with_policy(
        &del.status,
        &TaskState::Finished {
            key,
            result: TaskResult::Cleanup(Err(StepError::Transient("InvalidSnapshot.InUse".into()))),
        },
        true,
        true,
        1,
    );
    let r = failed.status.artifact_removal.clone().unwrap();
    assert_eq!((r.phase, r.failures), (CleanupPhase::Pending, 1));
    assert!(r.retry_at.is_some());
    assert_eq!(failed.status.artifacts.len(), 1);
    let key = spawned(&failed).expect("a second attempt");
    assert_eq!((key.kind, key.attempt), (TaskKind::RemoveArtifacts, 2));

    let removed = with_policy(
        &failed.status,
        &TaskState::Finished {
            key,
            result: TaskResult::Cleanup(Ok(())),
        },
        true,
        true,
        1,
    );
    assert!(
        removed.status.artifacts.is_empty(),
        "never lists a removed image"
    );
    let r = removed.status.artifact_removal.clone().unwrap();
    assert_eq!(r.phase, CleanupPhase::Done);
    assert!(r.message.unwrap().contains("ami-1"));
    assert!(removed.actions.contains(&Action::RemoveFinalizer));
}

fn on_failure(_: usize, _: &StepRecord, outcome: BuildOutcome) -> bool {
    outcome == BuildOutcome::Failed
}

/// Runs the three steps of `names()` whose cleanup is owed only by a failed build
/// (an image step: the image is the artifact once every step succeeded), the last
/// with `last`; returns the decision that takes its result.
fn build_with_cleanup_on_failure(last: Result<StepOutput, StepError>) -> Decision {
    let view = || PlanView {
        steps: names(),
        needs_cleanup: &on_failure,
    };
    let decide = |status: &ImageBuildStatus, task: &TaskState| {
        decide_views(status, task, (false, OnError::Cleanup, 1), view(), view())
    };
    let mut d = decide(&ImageBuildStatus::default(), &TaskState::None);
    for _ in 0..2 {
        let task = finished_run(&d, Ok(StepOutput::default()));
        d = decide(&d.status, &task);
    }
    let task = finished_run(&d, last);
    decide(&d.status, &task)
}

#[test]
fn a_cleanup_owed_only_on_failure_costs_a_succeeded_build_nothing() {
    // Succeeded: no cleanup task and no write of its own; the build completes in
    // the decision that takes the last step's result.
    let d = build_with_cleanup_on_failure(Ok(StepOutput::default()));
    assert_eq!(spawned(&d), None, "{:?}", d.actions);
    assert_eq!(d.status.phase, Some(BuildPhase::Succeeded));
    assert!(
        d.status
            .steps
            .iter()
            .all(|r| r.cleanup == CleanupPhase::NotNeeded),
        "{:?}",
        d.status.steps
    );
    // Failed: the same steps are cleaned up, last first.
    let d = build_with_cleanup_on_failure(Err(StepError::Failed("no".into())));
    let key = spawned(&d).expect("a cleanup");
    assert_eq!((key.kind, key.index), (TaskKind::Cleanup, 2));
    assert_eq!(d.status.phase, Some(BuildPhase::CleaningUp));
}
