use super::*;
use crate::api::ImagePipelineSpec;

fn spec(extra: serde_json::Value) -> ImagePipelineSpec {
    let mut v = serde_json::json!({
        "template": {"spec": {
            "builder": {"null": {}},
            "communicator": {"ssh": {"username": "u", "host": "h", "hostKey": {"insecureIgnore": true}}},
        }},
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    serde_json::from_value(v).unwrap()
}

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

struct World {
    spec: ImagePipelineSpec,
    status: ImagePipelineStatus,
    builds: Vec<Observed>,
    generation: i64,
    resume: Option<String>,
    deleting: bool,
    source: Option<Result<Option<String>, String>>,
    hash: String,
}

impl World {
    fn new(spec: ImagePipelineSpec) -> World {
        World {
            spec,
            status: ImagePipelineStatus::default(),
            builds: Vec::new(),
            generation: 1,
            resume: None,
            deleting: false,
            source: None,
            hash: "h1".into(),
        }
    }

    /// Decides at `now` and keeps the status, as the controller writes it.
    fn at(&mut self, now: i64) -> Vec<Action> {
        let input = Input {
            name: "p",
            generation: self.generation,
            created: t(0),
            spec: &self.spec,
            status: &self.status,
            deleting: self.deleting,
            resume: self.resume.as_deref(),
            builds: &self.builds,
            now: t(now),
            source: self.source.take(),
            next_source_check: None,
            template_problem: None,
            template_hash: &self.hash,
            secrets: vec!["aws".into()],
        };
        let d = decide(&input);
        self.status = d.status;
        d.actions
            .into_iter()
            .filter(|a| !matches!(a, Action::Event { .. }))
            .collect()
    }

    /// The controller created what it decided; the build shows `phase`.
    fn show(&mut self, name: &str, phase: Option<BuildPhase>) {
        let uid = format!("uid-{name}");
        let images = vec![VersionImage {
            region: "us-east-1".into(),
            image_id: format!("ami-{name}"),
            snapshot_ids: vec![format!("snap-{name}")],
        }];
        match self.builds.iter_mut().find(|b| b.name == name) {
            Some(b) => {
                b.phase = phase;
                if phase == Some(BuildPhase::Succeeded) {
                    b.images = images;
                }
            }
            None => self.builds.push(Observed {
                name: name.into(),
                uid,
                phase,
                images: if phase == Some(BuildPhase::Succeeded) {
                    images
                } else {
                    Vec::new()
                },
                source_image: None,
                ..Default::default()
            }),
        }
    }

    fn gone(&mut self, name: &str) {
        self.builds.retain(|b| b.name != name);
    }

    fn created(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Create(b) => Some(b.name.clone()),
                _ => None,
            })
            .collect()
    }

    /// Runs a build to the end.
    fn succeed(&mut self, name: &str, now: i64) -> Vec<Action> {
        self.show(name, Some(BuildPhase::Succeeded));
        self.at(now)
    }

    fn condition(&self, type_: &str) -> (String, String) {
        let c = self
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap();
        (c.status.clone(), c.reason.clone())
    }
}

fn build(name: &str) -> Action {
    Action::Delete(name.into(), format!("uid-{name}"))
}

#[test]
fn the_first_reconcile_builds_the_template_once_and_a_crash_recreates_the_same_build() {
    let mut w = World::new(spec(serde_json::json!({})));
    let a = w.at(1);
    assert_eq!(World::created(&a), ["p-1"]);
    assert_eq!(w.status.sequence, 1);
    assert_eq!(w.status.builds[0].trigger, "template");
    // The create was lost (a crash after the status write): the same name again,
    // not a second build.
    let a = w.at(2);
    assert_eq!(World::created(&a), ["p-1"]);
    assert_eq!(w.status.sequence, 1);
    w.show("p-1", Some(BuildPhase::Running));
    assert!(World::created(&w.at(3)).is_empty());
    assert_eq!(w.status.builds[0].uid.as_deref(), Some("uid-p-1"));
    assert_eq!(
        w.condition("Reconciling"),
        ("True".into(), "Building".into())
    );
}

#[test]
fn a_success_is_a_version_and_the_latest_pointer_and_output_follow_it() {
    let mut w = World::new(spec(
        serde_json::json!({"outputConfigMap": {"name": "latest"}}),
    ));
    w.at(1);
    w.show("p-1", Some(BuildPhase::Running));
    let a = w.at(2);
    assert!(
        !a.contains(&Action::WriteOutput),
        "no output before success"
    );
    let a = w.succeed("p-1", 3);
    assert!(a.contains(&Action::WriteOutput));
    assert_eq!(w.status.latest_version, Some(1));
    assert_eq!(w.status.latest[0].image_id, "ami-p-1");
    assert_eq!(
        w.condition("Ready"),
        ("True".into(), "VersionAvailable".into())
    );
    assert_eq!(w.condition("Reconciling").0, "False");
    // Once written (the controller records it), not again.
    w.status.output_version = Some(1);
    w.status.output_config_map = Some("latest".into());
    assert!(!w.at(4).contains(&Action::WriteOutput));
    // Another ConfigMap is written at once.
    w.spec.output_config_map = Some(crate::api::LocalObjectRef {
        name: "other".into(),
    });
    assert!(w.at(5).contains(&Action::WriteOutput));
}

#[test]
fn every_runs_on_multiples_of_the_interval_and_missed_runs_start_one_build() {
    let mut w = World::new(spec(serde_json::json!({"schedule": {"every": "10s"}})));
    w.at(0);
    w.succeed("p-1", 2);
    assert!(World::created(&w.at(9)).is_empty());
    assert_eq!(w.status.next_run_at.as_ref().unwrap().0, t(10));
    let a = w.at(10);
    assert_eq!(World::created(&a), ["p-2"]);
    assert_eq!(w.status.builds[1].trigger, "schedule");
    w.succeed("p-2", 12);
    // The operator was down for 55 s: the runs of 20 … 60 are one build.
    let a = w.at(65);
    assert_eq!(World::created(&a), ["p-3"]);
    assert_eq!(w.status.last_schedule_time.as_ref().unwrap().0, t(60));
    assert_eq!(w.status.next_run_at.as_ref().unwrap().0, t(70));
}

#[test]
fn a_run_later_than_the_starting_deadline_is_skipped() {
    let mut w = World::new(spec(
        serde_json::json!({"schedule": {"every": "10s"}, "startingDeadline": "3s"}),
    ));
    w.at(0);
    w.succeed("p-1", 1);
    assert!(World::created(&w.at(15)).is_empty(), "5 s late");
    assert_eq!(w.status.last_schedule_time.as_ref().unwrap().0, t(10));
    assert_eq!(World::created(&w.at(22)), ["p-2"], "2 s late");
}

#[test]
fn forbid_skips_a_scheduled_run_and_a_template_change_waits_for_the_running_build() {
    let mut w = World::new(spec(serde_json::json!({"schedule": {"every": "10s"}})));
    w.at(0);
    w.show("p-1", Some(BuildPhase::Running));
    assert!(World::created(&w.at(10)).is_empty());
    assert!(World::created(&w.at(20)).is_empty());
    w.hash = "h2".into();
    w.generation = 2;
    assert!(World::created(&w.at(21)).is_empty(), "waits");
    assert_eq!(
        w.condition("Reconciling").0,
        "True",
        "a waiting template change is reconciling"
    );
    let a = w.succeed("p-1", 25);
    assert_eq!(World::created(&a), ["p-2"]);
    assert_eq!(w.status.builds[1].trigger, "template");
}

#[test]
fn replace_deletes_the_running_build_and_starts_anew() {
    let mut w = World::new(spec(
        serde_json::json!({"schedule": {"every": "10s"}, "concurrencyPolicy": "Replace"}),
    ));
    w.at(0);
    w.show("p-1", Some(BuildPhase::Running));
    w.at(1);
    let a = w.at(10);
    assert!(a.contains(&build("p-1")), "{a:?}");
    assert_eq!(World::created(&a), ["p-2"]);
    let old = &w.status.builds[0];
    assert!(old.settled && old.message.as_deref().unwrap().contains("replaced"));
    // Its disappearance is no failure.
    w.gone("p-1");
    w.at(11);
    assert_eq!(w.status.consecutive_failures, 0);
}

#[test]
fn the_failure_brake_engages_after_max_failures_and_a_new_generation_or_resume_rearms_it() {
    let mut w = World::new(spec(
        serde_json::json!({"schedule": {"every": "10s"}, "maxConsecutiveFailures": 2}),
    ));
    w.at(0);
    w.show("p-1", Some(BuildPhase::Failed));
    w.at(1);
    assert_eq!(w.status.consecutive_failures, 1);
    assert!(w.status.brake.is_none());
    assert_eq!(World::created(&w.at(10)), ["p-2"]);
    w.show("p-2", Some(BuildPhase::Failed));
    w.at(11);
    assert!(w.status.brake.is_some());
    assert_eq!(
        w.condition("Stalled"),
        ("True".into(), "FailureBrake".into())
    );
    assert!(World::created(&w.at(20)).is_empty());
    assert!(World::created(&w.at(30)).is_empty());
    // Resumed by the annotation: the next run builds.
    w.resume = Some("now".into());
    w.at(31);
    assert!(w.status.brake.is_none());
    assert_eq!(w.status.consecutive_failures, 0);
    assert_eq!(World::created(&w.at(40)), ["p-3"]);
    w.show("p-3", Some(BuildPhase::Failed));
    w.at(41);
    assert_eq!(World::created(&w.at(50)), ["p-4"]);
    w.show("p-4", Some(BuildPhase::Failed));
    w.at(51);
    assert!(w.status.brake.is_some());
    // A new generation (here a changed template, which also builds) re-arms it.
    w.generation = 2;
    w.hash = "h2".into();
    assert_eq!(World::created(&w.at(52)), ["p-5"]);
    assert!(w.status.brake.is_none());
}

#[test]
fn retention_keeps_the_newest_and_the_pinned_and_removes_a_retired_version_after_its_build() {
    let mut w = World::new(spec(serde_json::json!({
        "schedule": {"every": "10s"},
        "imageRetention": {"keep": 2},
        "pinnedVersion": 1,
        "buildHistoryLimit": {"succeeded": 10, "failed": 1},
    })));
    w.at(0);
    w.succeed("p-1", 1);
    for (n, at) in [(2, 10), (3, 20)] {
        w.at(at);
        w.succeed(&format!("p-{n}"), at + 1);
    }
    assert!(w.status.versions.iter().all(|v| !v.retired));
    w.at(30);
    let a = w.succeed("p-4", 31);
    let v2 = w.status.versions.iter().find(|v| v.version == 2).unwrap();
    assert!(v2.retired, "{:?}", w.status.versions);
    assert!(
        w.status
            .versions
            .iter()
            .filter(|v| v.version != 2)
            .all(|v| !v.retired)
    );
    // Its ImageBuild first; no removal while it exists.
    assert!(a.contains(&build("p-2")), "{a:?}");
    assert!(!a.contains(&Action::RemoveImages(2)));
    assert_eq!(w.status.latest_version, Some(1), "pinned");
    assert_eq!(w.status.held_secrets, ["aws"]);
    w.gone("p-2");
    let a = w.at(32);
    assert!(a.contains(&Action::RemoveImages(2)), "{a:?}");
    // The controller records the removal; then the Secret is released.
    let v2 = w
        .status
        .versions
        .iter_mut()
        .find(|v| v.version == 2)
        .unwrap();
    v2.removal.as_mut().unwrap().phase = CleanupPhase::Done;
    let a = w.at(33);
    assert!(
        a.contains(&Action::ReleaseSecrets(vec!["aws".into()])),
        "{a:?}"
    );
    assert!(w.status.held_secrets.is_empty());
}

#[test]
fn history_deletes_the_oldest_finished_builds_beyond_the_limits() {
    let mut w = World::new(spec(serde_json::json!({
        "schedule": {"every": "10s"},
        "buildHistoryLimit": {"succeeded": 1, "failed": 1},
    })));
    w.at(0);
    w.succeed("p-1", 1);
    w.at(10);
    let a = w.succeed("p-2", 11);
    assert!(a.contains(&build("p-1")), "{a:?}");
    assert!(!a.contains(&build("p-2")));
    w.gone("p-1");
    w.at(12);
    assert_eq!(
        w.status
            .builds
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>(),
        ["p-2"]
    );
    // The version outlives its ImageBuild.
    assert_eq!(w.status.versions.len(), 2);
}

#[test]
fn a_newer_source_builds_pinned_to_it_and_the_same_or_a_failed_lookup_does_not() {
    let mut w = World::new(spec(serde_json::json!({
        "onSourceChange": {"checkInterval": "5s"},
    })));
    w.source = Some(Ok(Some("ami-a".into())));
    let a = w.at(0);
    assert_eq!(World::created(&a), ["p-1"]);
    assert_eq!(w.status.builds[0].source_image.as_deref(), Some("ami-a"));
    w.builds.push(Observed {
        name: "p-1".into(),
        uid: "uid-p-1".into(),
        phase: Some(BuildPhase::Succeeded),
        source_image: Some("ami-a".into()),
        ..Default::default()
    });
    w.at(1);
    // Finding the same image again changes nothing: no status write.
    let before = w.status.clone();
    w.source = Some(Ok(Some("ami-a".into())));
    assert!(World::created(&w.at(5)).is_empty());
    assert_eq!(w.status, before);
    w.source = Some(Err("DescribeImages: throttled".into()));
    assert!(World::created(&w.at(10)).is_empty());
    let check = w.status.source.clone().unwrap();
    assert_eq!(check.image.as_deref(), Some("ami-a"), "kept");
    assert!(check.message.is_some());
    assert_eq!(check.since.0, t(0));
    w.source = Some(Ok(Some("ami-b".into())));
    let a = w.at(15);
    assert_eq!(World::created(&a), ["p-2"]);
    let b = &w.status.builds[1];
    assert_eq!(
        (b.trigger.as_str(), b.source_image.as_deref()),
        ("source", Some("ami-b"))
    );
    // While it runs, the same source does not start another; nor when it failed
    // (the schedule or a template change retries it, not every check).
    w.show("p-2", Some(BuildPhase::Running));
    w.source = Some(Ok(Some("ami-b".into())));
    assert!(World::created(&w.at(20)).is_empty());
    w.show("p-2", Some(BuildPhase::Failed));
    w.source = Some(Ok(Some("ami-b".into())));
    assert!(World::created(&w.at(25)).is_empty());
    // A newer one does.
    w.source = Some(Ok(Some("ami-c".into())));
    assert_eq!(World::created(&w.at(30)), ["p-3"]);
}

#[test]
fn deleting_with_delete_removes_builds_then_images_then_releases_and_retain_releases_at_once() {
    let mut w = World::new(spec(serde_json::json!({
        "artifactPolicy": "Delete",
        "imageRetention": {"keep": 5},
    })));
    w.at(0);
    w.succeed("p-1", 1);
    w.deleting = true;
    let a = w.at(2);
    assert!(a.contains(&build("p-1")), "{a:?}");
    assert!(!a.contains(&Action::RemoveFinalizer));
    w.gone("p-1");
    let a = w.at(3);
    assert!(a.contains(&Action::RemoveImages(1)));
    assert!(!a.contains(&Action::RemoveFinalizer));
    w.status.versions[0].removal.as_mut().unwrap().phase = CleanupPhase::Done;
    let a = w.at(4);
    assert!(a.contains(&Action::RemoveFinalizer), "{a:?}");
    assert!(a.contains(&Action::ReleaseSecrets(vec!["aws".into()])));

    let mut w = World::new(spec(serde_json::json!({})));
    w.at(0);
    w.succeed("p-1", 1);
    w.deleting = true;
    let a = w.at(2);
    assert!(a.contains(&Action::RemoveFinalizer), "{a:?}");
    assert!(!a.iter().any(|a| matches!(a, Action::Delete(..))));
}

#[test]
fn suspend_starts_nothing_and_a_missing_pinned_version_stalls() {
    let mut w = World::new(spec(
        serde_json::json!({"suspend": true, "schedule": {"every": "10s"}}),
    ));
    assert!(World::created(&w.at(0)).is_empty());
    assert!(World::created(&w.at(10)).is_empty());
    assert_eq!(w.condition("Ready"), ("False".into(), "Suspended".into()));

    let mut w = World::new(spec(serde_json::json!({"pinnedVersion": 7})));
    w.at(0);
    w.succeed("p-1", 1);
    assert_eq!(
        w.condition("Stalled"),
        ("True".into(), "PinnedVersionUnknown".into())
    );
    assert_eq!(w.status.latest_version, None, "no version to point at");
}

#[test]
fn unparsable_schedules_stall_before_any_build() {
    for (schedule, field) in [
        (
            serde_json::json!({"cron": "61 * * * *"}),
            "spec.schedule.cron",
        ),
        (
            serde_json::json!({"cron": "0 3 * * *", "timeZone": "Mars/Olympus"}),
            "spec.schedule.timeZone",
        ),
        (serde_json::json!({"every": "0s"}), "spec.schedule.every"),
    ] {
        let mut w = World::new(spec(serde_json::json!({"schedule": schedule})));
        assert!(World::created(&w.at(0)).is_empty(), "{schedule}");
        let stalled = w
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Stalled")
            .unwrap();
        assert_eq!(stalled.reason, "InvalidSpec");
        assert!(stalled.message.starts_with(field), "{}", stalled.message);
    }
}

#[test]
fn a_failed_build_of_the_current_template_stalls_until_a_build_of_it_succeeds() {
    let mut w = World::new(spec(serde_json::json!({"schedule": {"every": "10s"}})));
    w.at(0);
    w.succeed("p-1", 1);
    // A new template whose build fails: the spec is not realized.
    w.hash = "h2".into();
    w.generation = 2;
    assert_eq!(World::created(&w.at(2)), ["p-2"]);
    w.show("p-2", Some(BuildPhase::Failed));
    w.at(3);
    assert_eq!(
        w.condition("Stalled"),
        ("True".into(), "TemplateBuildFailed".into())
    );
    assert_eq!(w.condition("Ready").0, "False");
    // The schedule tries again; its success clears it.
    assert_eq!(World::created(&w.at(10)), ["p-3"]);
    assert_eq!(w.condition("Stalled").0, "False", "retrying");
    w.succeed("p-3", 11);
    assert_eq!(w.condition("Stalled").0, "False");
    assert_eq!(
        w.condition("Ready"),
        ("True".into(), "VersionAvailable".into())
    );
    // A scheduled rebuild of a template that has a version may fail: no stall.
    w.at(20);
    w.show("p-4", Some(BuildPhase::Failed));
    w.at(21);
    assert_eq!(w.condition("Stalled").0, "False");
}
