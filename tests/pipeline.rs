//! ImagePipeline (issue 3/6): images that rebuild themselves on a schedule and when
//! the source image moves, with versions, a latest pointer and retention. Against
//! the real apiserver, the moto-based EC2 server and OpenSSH sshd.
//!
//! The EC2 server's faults and delays are global, so the amazon tests take turns.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::Fixture;
use common::aws::Aws;
use k8s_openapi::api::core::v1::ConfigMap;
use kiln::api::{BuildPhase, ImageBuild, ImagePipeline, ImagePipelineStatus};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn shell(cmds: &[&str]) -> Value {
    json!([{"shell": {"inline": cmds}}])
}

fn pipelines(f: &Fixture) -> Api<ImagePipeline> {
    Api::namespaced(f.client.clone(), &f.ns)
}

/// A pipeline whose template is `build`'s spec, with the given pipeline fields.
fn pipeline(f: &Fixture, name: &str, build: &Value, fields: Value) -> ImagePipeline {
    let mut spec = json!({"template": {"spec": build["spec"].clone()}});
    if spec["template"]["spec"]["builder"]["amazonEBS"].is_object() {
        spec["template"]["spec"]["builder"]["amazonEBS"]["amiName"] =
            json!(format!("{}-{{{{ build.name }}}}", f.ns));
    }
    for (k, v) in fields.as_object().unwrap() {
        spec[k] = v.clone();
    }
    serde_json::from_value(json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ImagePipeline",
        "metadata": {"name": name, "namespace": f.ns},
        "spec": spec,
    }))
    .unwrap()
}

async fn create(f: &Fixture, p: &ImagePipeline) {
    pipelines(f)
        .create(&PostParams::default(), p)
        .await
        .unwrap();
}

async fn status(f: &Fixture, name: &str) -> ImagePipelineStatus {
    pipelines(f)
        .get(name)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

/// Waits until the pipeline's status satisfies `pred`; the panic shows the status
/// and the operator's log.
async fn wait_status<F>(
    f: &Fixture,
    name: &str,
    timeout: Duration,
    what: &str,
    pred: F,
) -> ImagePipelineStatus
where
    F: Fn(&ImagePipelineStatus) -> bool,
{
    let start = Instant::now();
    loop {
        let st = status(f, name).await;
        if pred(&st) {
            return st;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out waiting for {what}; status: {}\noperator log tail:\n{}",
                serde_json::to_string_pretty(&st).unwrap(),
                common::tail(&f.operator.logs(), 60)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn builds_of(f: &Fixture, pipeline: &str) -> Vec<ImageBuild> {
    f.api()
        .list(&ListParams::default().labels(&format!("kiln.dev/pipeline={pipeline}")))
        .await
        .unwrap()
        .items
}

fn versions(st: &ImagePipelineStatus) -> Vec<i64> {
    st.versions.iter().map(|v| v.version).collect()
}

impl Aws {
    async fn image_exists(&self, region: &str, id: &str) -> bool {
        let c = self.ec2.client(region).await;
        match c.describe_images().image_ids(id).send().await {
            Ok(r) => !r.images().is_empty(),
            Err(_) => false,
        }
    }

    async fn snapshot_exists(&self, region: &str, id: &str) -> bool {
        let c = self.ec2.client(region).await;
        match c.describe_snapshots().snapshot_ids(id).send().await {
            Ok(r) => !r.snapshots().is_empty(),
            Err(_) => false,
        }
    }

    async fn tags_of(&self, region: &str, id: &str) -> std::collections::BTreeMap<String, String> {
        let c = self.ec2.client(region).await;
        let r = c.describe_images().image_ids(id).send().await.unwrap();
        r.images()[0]
            .tags()
            .iter()
            .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
            .collect()
    }

    /// Registers an image in the EC2 server (as a vendor publishing a new base).
    fn publish(&self, name: &str, created: &str) -> String {
        let loaded = self.ec2.control(
            "POST",
            "/_kiln/images",
            Some(json!([{"name": name, "creation_date": created}])),
        );
        loaded["images"][0]["image_id"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// An interval builds on time; every version's images carry their lineage; with
/// `keep: 2` and a pinned version 1, after four versions exactly versions 1, 3 and 4
/// have images and snapshots (in both regions), version 2 has none; the history
/// limit deletes ImageBuild objects without touching the images retention keeps;
/// the output ConfigMap names the pinned version.
#[tokio::test]
async fn an_interval_builds_on_time_and_retention_keeps_two_versions_and_the_pinned_one() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("ipl-keep").await;
    let f = &a.f;
    let every = Duration::from_secs(6);
    let build = a.build("t", json!({"amiRegions": ["eu-west-1"]}), shell(&["true"]));
    create(
        f,
        &pipeline(
            f,
            "web",
            &build,
            json!({
                "schedule": {"every": "6s"},
                "imageRetention": {"keep": 2},
                "buildHistoryLimit": {"succeeded": 1, "failed": 1},
                "outputConfigMap": {"name": "web-latest"},
            }),
        ),
    )
    .await;
    let created = Instant::now();

    let st = wait_status(f, "web", Duration::from_secs(120), "version 1", |s| {
        s.latest_version == Some(1)
    })
    .await;
    let v1 = st.versions[0].clone();
    assert_eq!(v1.images.len(), 2, "{v1:?}");
    assert_eq!(v1.trigger, "template");
    assert_eq!(v1.source_image.as_deref(), Some(a.source_ami.as_str()));
    let cm: Api<ConfigMap> = Api::namespaced(f.client.clone(), &f.ns);
    let data = cm.get("web-latest").await.unwrap().data.unwrap();
    assert_eq!(data["version"], "1");
    for i in &v1.images {
        assert_eq!(data[&i.region], i.image_id);
        let tags = a.tags_of(&i.region, &i.image_id).await;
        assert_eq!(tags["kiln.dev/pipeline"], format!("{}/web", f.ns));
        assert_eq!(tags["kiln.dev/pipeline-version"], "1");
        assert_eq!(tags["kiln.dev/source-image"], a.source_ami);
        assert_eq!(tags["kiln.dev/build"], format!("{}/web-1", f.ns));
    }

    // Pin version 1 before retention would drop it.
    pipelines(f)
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"pinnedVersion": 1}})),
        )
        .await
        .unwrap();

    let st = wait_status(f, "web", Duration::from_secs(180), "version 4", |s| {
        versions(s).contains(&4) && s.versions.iter().filter(|v| v.removed()).count() >= 1
    })
    .await;
    // On time: a scheduled build is decided within two seconds of a multiple of
    // `every` after the pipeline's creation (status times have whole seconds).
    let born = pipelines(f)
        .get("web")
        .await
        .unwrap()
        .metadata
        .creation_timestamp
        .unwrap()
        .0;
    let scheduled: Vec<_> = st
        .builds
        .iter()
        .filter(|b| b.trigger.contains("schedule"))
        .collect();
    assert!(!scheduled.is_empty(), "{:?}", st.builds);
    for b in scheduled {
        let after = b.decided_at.0.duration_since(born).as_secs_f64();
        let k = (after / every.as_secs_f64()).round();
        assert!(
            k >= 1.0 && (after - k * every.as_secs_f64()).abs() < 2.0,
            "build {} decided {after:.2}s after creation, not on a multiple of {every:?}",
            b.name
        );
    }
    assert!(
        created.elapsed() >= every * 3,
        "four versions in {:?}",
        created.elapsed()
    );
    assert_eq!(st.latest_version, Some(1), "pinned: {st:?}");
    let data = cm.get("web-latest").await.unwrap().data.unwrap();
    assert_eq!(data["version"], "1");

    let by_version = |n: i64| st.versions.iter().find(|v| v.version == n).unwrap().clone();
    let v2 = by_version(2);
    assert!(v2.retired && v2.removed(), "{v2:?}");
    for i in &v2.images {
        assert!(!a.image_exists(&i.region, &i.image_id).await, "{i:?} left");
        for s in &i.snapshot_ids {
            assert!(
                !a.snapshot_exists(&i.region, s).await,
                "snapshot {s} of {i:?} left"
            );
        }
    }
    for n in [1, 3, 4] {
        let v = by_version(n);
        assert!(!v.retired, "version {n} retired: {v:?}");
        assert_eq!(v.images.len(), 2);
        for i in &v.images {
            assert!(
                a.image_exists(&i.region, &i.image_id).await,
                "version {n}: {i:?} removed"
            );
            for s in &i.snapshot_ids {
                assert!(
                    a.snapshot_exists(&i.region, s).await,
                    "version {n}: snapshot {s} removed"
                );
            }
        }
    }
    // History: one succeeded ImageBuild object (at most one more running).
    let finished: Vec<String> = builds_of(f, "web")
        .await
        .iter()
        .filter(|b| b.status.as_ref().and_then(|s| s.phase) == Some(BuildPhase::Succeeded))
        .filter(|b| b.metadata.deletion_timestamp.is_none())
        .map(|b| b.name_any())
        .collect();
    assert!(
        finished.len() <= 1,
        "succeeded ImageBuilds kept: {finished:?}"
    );
    for uid in st.versions.iter().map(|v| v.build_uid.clone()) {
        let leaks = a.leaks(&uid, &["us-east-1", "eu-west-1"]).await;
        let kept: BTreeSet<String> = st
            .versions
            .iter()
            .filter(|v| !v.retired)
            .flat_map(|v| {
                v.images.iter().flat_map(|i| {
                    let mut ids = vec![i.image_id.clone()];
                    ids.extend(i.snapshot_ids.clone());
                    ids
                })
            })
            .collect();
        let leaks: Vec<_> = leaks
            .into_iter()
            .filter(|l| !kept.iter().any(|k| l.contains(k.as_str())))
            .collect();
        assert!(leaks.is_empty(), "leaked: {leaks:?}");
    }
}

/// `onSourceChange`: a newer image that matches the filter starts a build within
/// one check interval, pinned to that image; one that does not match starts none.
#[tokio::test]
async fn a_newer_matching_source_image_builds_and_another_does_not() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("ipl-src").await;
    let f = &a.f;
    let prefix = format!("base-{}", f.ns);
    let build = a.build(
        "t",
        json!({
            "sourceAMI": null,
            "sourceAMIFilter": {
                "filters": {"name": format!("{prefix}*")},
                "owners": ["self"],
                "mostRecent": true,
            },
        }),
        shell(&["true"]),
    );
    create(
        f,
        &pipeline(
            f,
            "src",
            &build,
            json!({"onSourceChange": {"checkInterval": "2s"}}),
        ),
    )
    .await;
    let st = wait_status(f, "src", Duration::from_secs(120), "version 1", |s| {
        s.latest_version == Some(1)
    })
    .await;
    assert_eq!(
        st.versions[0].source_image.as_deref(),
        Some(a.source_ami.as_str())
    );

    // Not matching: a newer image of another name.
    a.publish(&format!("other-{}", f.ns), "2026-01-01T00:00:00.000Z");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let st = status(f, "src").await;
    assert_eq!(
        st.sequence, 1,
        "a non-matching image started a build: {:?}",
        st.builds
    );
    assert_eq!(
        st.source.as_ref().unwrap().image.as_deref(),
        Some(a.source_ami.as_str())
    );

    // Matching and newer.
    let newer = a.publish(&format!("{prefix}-v2"), "2026-02-01T00:00:00.000Z");
    let published = Instant::now();
    let st = wait_status(
        f,
        "src",
        Duration::from_secs(60),
        "a build of the new source",
        |s| s.sequence >= 2,
    )
    .await;
    let took = published.elapsed();
    // The next check (2 s) finds it. The slack is for the end of a CI run, when
    // eight tests share two cores and the EC2 server's DescribeImages scans every
    // image the whole run loaded (9.5 s was seen once, with a 2 s interval).
    assert!(took < Duration::from_secs(2 + 13), "{took:?}");
    let b = st.builds.iter().find(|b| b.sequence == 2).unwrap();
    assert_eq!(b.trigger, "source");
    assert_eq!(b.source_image.as_deref(), Some(newer.as_str()));
    let st = wait_status(f, "src", Duration::from_secs(120), "version 2", |s| {
        s.latest_version == Some(2)
    })
    .await;
    let v2 = st.versions.iter().find(|v| v.version == 2).unwrap();
    assert_eq!(v2.source_image.as_deref(), Some(newer.as_str()));
    let tags = a.tags_of("us-east-1", &v2.images[0].image_id).await;
    assert_eq!(tags["kiln.dev/source-image"], newer);
    assert_eq!(tags["kiln.dev/pipeline-version"], "2");
    // No third build: the newest source is built.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(status(f, "src").await.sequence, 2);
}

/// `maxConsecutiveFailures: 3`: three failed builds stop the pipeline (Stalled,
/// no fourth build); the output ConfigMap keeps the last good version throughout;
/// a spec change re-arms it and builds.
#[tokio::test]
async fn the_failure_brake_stops_after_three_failures_and_a_spec_change_rearms_it() {
    let f = Fixture::new("ipl-brake").await;
    let build = f.null_build(
        "t",
        shell(&["test -e /tmp/kiln-never-there-$KILN_PIPELINE_VERSION || exit 3"]),
    );
    // Version 1 succeeds (the template's first build runs `true`), then the
    // schedule's builds fail.
    let good = f.null_build("t", shell(&["true"]));
    create(
        &f,
        &pipeline(
            &f,
            "brake",
            &good,
            json!({"schedule": {"every": "2s"}, "outputConfigMap": {"name": "brake-latest"}, "maxConsecutiveFailures": 3}),
        ),
    )
    .await;
    wait_status(&f, "brake", Duration::from_secs(60), "version 1", |s| {
        s.latest_version == Some(1)
    })
    .await;
    let cm: Api<ConfigMap> = Api::namespaced(f.client.clone(), &f.ns);
    assert_eq!(
        cm.get("brake-latest").await.unwrap().data.unwrap()["version"],
        "1"
    );
    // Break the template through a ConfigMap-free route: a script that fails.
    pipelines(&f)
        .patch(
            "brake",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {"provisioners": build["spec"]["provisioners"]}}}})),
        )
        .await
        .unwrap();
    let st = wait_status(&f, "brake", Duration::from_secs(90), "the brake", |s| {
        s.brake.is_some()
    })
    .await;
    assert_eq!(st.consecutive_failures, 3, "{st:?}");
    let stalled = st.conditions.iter().find(|c| c.type_ == "Stalled").unwrap();
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", "FailureBrake")
    );
    let braked_at = st.sequence;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let st = status(&f, "brake").await;
    assert_eq!(
        st.sequence, braked_at,
        "a build started after the brake: {:?}",
        st.builds
    );
    assert_eq!(
        cm.get("brake-latest").await.unwrap().data.unwrap()["version"],
        "1"
    );
    assert_eq!(st.latest_version, Some(1));

    // A spec change re-arms it.
    pipelines(&f)
        .patch(
            "brake",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {"provisioners": good["spec"]["provisioners"]}}}})),
        )
        .await
        .unwrap();
    let st = wait_status(
        &f,
        "brake",
        Duration::from_secs(60),
        "a version after the re-arm",
        |s| s.latest_version.is_some_and(|v| v > braked_at),
    )
    .await;
    assert!(st.brake.is_none());
    let v = st.latest_version.unwrap().to_string();
    wait_until_cm(&cm, "brake-latest", &v).await;
}

async fn wait_until_cm(cm: &Api<ConfigMap>, name: &str, version: &str) {
    common::wait_until(
        Duration::from_secs(20),
        "the ConfigMap to name the version",
        || async {
            let d = cm.get(name).await.ok()?.data?;
            (d.get("version").map(String::as_str) == Some(version)).then_some(())
        },
    )
    .await;
}

/// `Forbid`: while a build runs, scheduled runs are skipped (one build at a time).
/// `Replace`: the running build is deleted (its instance and the rest cleaned up)
/// and a new one starts.
#[tokio::test]
async fn forbid_skips_and_replace_replaces_a_long_running_build() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("ipl-conc").await;
    let f = &a.f;
    let slow = a.build("t", json!({}), shell(&["sleep 12"]));
    create(
        f,
        &pipeline(f, "forbid", &slow, json!({"schedule": {"every": "2s"}})),
    )
    .await;
    let st = wait_status(
        f,
        "forbid",
        Duration::from_secs(60),
        "the first build",
        |s| s.sequence == 1,
    )
    .await;
    let first = st.builds[0].name.clone();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let st = status(f, "forbid").await;
    assert_eq!(
        st.sequence, 1,
        "Forbid started another build: {:?}",
        st.builds
    );
    let skipped = f
        .events()
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ScheduleSkipped"))
        // Repeated events are one Event with a series count.
        .map(|e| e.series.map_or(1, |s| s.count))
        .sum::<i32>();
    assert!(skipped >= 2, "{skipped} ScheduleSkipped events");
    assert_eq!(builds_of(f, "forbid").await.len(), 1);
    pipelines(f)
        .delete("forbid", &DeleteParams::default())
        .await
        .unwrap();

    create(
        f,
        &pipeline(
            f,
            "replace",
            &slow,
            json!({"schedule": {"every": "5s"}, "concurrencyPolicy": "Replace"}),
        ),
    )
    .await;
    let st = wait_status(
        f,
        "replace",
        Duration::from_secs(60),
        "a replacement",
        |s| s.sequence >= 2,
    )
    .await;
    let replaced = st.builds.iter().find(|b| b.sequence == 1).unwrap().clone();
    assert!(
        replaced
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("replaced by build 2"),
        "{replaced:?}"
    );
    let uid = replaced.uid.clone().unwrap();
    f.wait_gone(&replaced.name, Duration::from_secs(60)).await;
    let leaks = a.leaks(&uid, &["us-east-1"]).await;
    assert!(leaks.is_empty(), "the replaced build left {leaks:?}");
    let _ = first;
}

/// The operator is killed at random moments (seeded) during a pipeline's life:
/// every trigger makes one build, named by its sequence, never two; the status'
/// sequence equals the number of ImageBuilds ever created.
#[tokio::test]
async fn an_operator_killed_at_random_never_makes_two_builds_for_one_trigger() {
    let mut f = Fixture::new("ipl-kill").await;
    let seed: u64 = std::env::var("KILN_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let build = f.null_build("t", shell(&["sleep 1"]));
    create(&f, &pipeline(&f, "kill", &build, json!({"schedule": {"every": "3s"}, "buildHistoryLimit": {"succeeded": 100, "failed": 100}}))).await;
    // Every ImageBuild ever created, by uid, from a watch.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        String,
    >::new()));
    let watcher = {
        let seen = seen.clone();
        let api = f.api();
        tokio::spawn(async move {
            use futures::StreamExt;
            let cfg = kube::runtime::watcher::Config::default().labels("kiln.dev/pipeline=kill");
            let mut s = std::pin::pin!(kube::runtime::watcher(api, cfg).default_backoff());
            while let Some(ev) = s.next().await {
                if let Ok(
                    kube::runtime::watcher::Event::Apply(b)
                    | kube::runtime::watcher::Event::InitApply(b),
                ) = ev
                {
                    seen.lock().unwrap().insert(b.uid().unwrap(), b.name_any());
                }
            }
        })
    };
    let start = Instant::now();
    let mut kills = 0;
    while start.elapsed() < Duration::from_secs(40) {
        let wait = Duration::from_millis(300 + next() % 4000);
        tokio::time::sleep(wait).await;
        f.restart_operator();
        kills += 1;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let st = status(&f, "kill").await;
    watcher.abort();
    let seen = seen.lock().unwrap().clone();
    let names: BTreeSet<&String> = seen.values().collect();
    assert_eq!(
        names.len(),
        seen.len(),
        "two ImageBuilds of one name: {seen:?}"
    );
    // Sequence numbers are 1..=sequence, each one ImageBuild (the last may still be deciding).
    assert!(
        seen.len() as i64 == st.sequence || seen.len() as i64 + 1 == st.sequence,
        "{} builds for {} sequences after {kills} kills (seed {seed}): {seen:?}",
        seen.len(),
        st.sequence
    );
    // One build per trigger: no more than one per scheduled run (plus the first).
    let runs = start.elapsed().as_secs() / 3 + 2;
    assert!(
        st.sequence as u64 <= runs,
        "{} builds in {} runs",
        st.sequence,
        runs
    );
    assert!(
        st.versions.len() >= 3,
        "only {} versions: {st:?}",
        st.versions.len()
    );
}

/// A pipeline deleted with `artifactPolicy: Delete` removes its ImageBuilds and
/// every version's images and snapshots; with `Retain` they stay.
#[tokio::test]
async fn deleting_a_pipeline_removes_or_keeps_its_images_by_its_artifact_policy() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("ipl-del").await;
    let f = &a.f;
    let build = a.build("t", json!({}), shell(&["true"]));
    for (name, policy) in [("gone", "Delete"), ("kept", "Retain")] {
        create(
            f,
            &pipeline(f, name, &build, json!({"schedule": {"every": "3s"}, "artifactPolicy": policy, "imageRetention": {"keep": 5}})),
        )
        .await;
    }
    let mut images = Vec::new();
    for name in ["gone", "kept"] {
        let st = wait_status(f, name, Duration::from_secs(120), "two versions", |s| {
            s.versions.len() >= 2
        })
        .await;
        pipelines(f)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
        images.push((name, st));
    }
    let api = pipelines(f);
    common::wait_until(Duration::from_secs(120), "both pipelines gone", || async {
        (api.get_opt("gone").await.unwrap().is_none()
            && api.get_opt("kept").await.unwrap().is_none())
        .then_some(())
    })
    .await;
    // Versions recorded before the delete, plus any that finished after.
    for (name, st) in images {
        for v in &st.versions {
            for i in &v.images {
                let exists = a.image_exists(&i.region, &i.image_id).await;
                assert_eq!(
                    exists,
                    name == "kept",
                    "{name}: version {} image {}",
                    v.version,
                    i.image_id
                );
            }
        }
        if name == "gone" {
            for v in &st.versions {
                let leaks = a.leaks(&v.build_uid, &["us-east-1"]).await;
                assert!(leaks.is_empty(), "{name}: {leaks:?}");
            }
        }
    }
}

/// The moment the random kills can miss: the operator stops right after it wrote a
/// decided build to status and before it created the ImageBuild. The restarted
/// operator creates that very build (its name), and no other.
#[tokio::test]
async fn a_build_decided_before_a_crash_is_created_once_under_its_name() {
    let mut f = Fixture::new("ipl-crash").await;
    let build = f.null_build("t", shell(&["true"]));
    create(&f, &pipeline(&f, "crash", &build, json!({}))).await;
    wait_status(&f, "crash", Duration::from_secs(60), "version 1", |s| {
        s.latest_version == Some(1)
    })
    .await;
    f.operator.kill();
    let st = status(&f, "crash").await;
    let mut builds = serde_json::to_value(&st.builds).unwrap();
    builds.as_array_mut().unwrap().push(json!({
        "name": "crash-2",
        "sequence": 2,
        "trigger": "schedule",
        "decidedAt": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now()
        ),
        "settled": false,
    }));
    pipelines(&f)
        .patch_status(
            "crash",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"sequence": 2, "builds": builds}})),
        )
        .await
        .unwrap();
    f.restart_operator();
    let st = wait_status(&f, "crash", Duration::from_secs(60), "version 2", |s| {
        s.latest_version == Some(2)
    })
    .await;
    assert_eq!(st.sequence, 2, "{:?}", st.builds);
    let mut names: Vec<String> = builds_of(&f, "crash")
        .await
        .iter()
        .map(|b| b.name_any())
        .collect();
    names.sort();
    assert_eq!(names, ["crash-1", "crash-2"]);
    assert_eq!(st.versions[1].build, "crash-2");
    assert_eq!(st.versions[1].trigger, "schedule");
}

/// Creates a pipeline from raw JSON, so that schema refusals are the apiserver's.
async fn create_raw(f: &Fixture, obj: &Value) -> Result<(), kube::Error> {
    let ar = kube::core::ApiResource::erase::<ImagePipeline>(&());
    let api: Api<kube::core::DynamicObject> = Api::namespaced_with(f.client.clone(), &f.ns, &ar);
    let o: kube::core::DynamicObject = serde_json::from_value(obj.clone()).unwrap();
    api.create(&PostParams::default(), &o).await.map(|_| ())
}

/// What the schema can say, the apiserver says, naming the field.
#[tokio::test]
async fn the_apiserver_refuses_invalid_pipelines_naming_the_field() {
    let f = Fixture::new("ipl-schema").await;
    let build = f.null_build("t", shell(&["true"]));
    let base = serde_json::to_value(pipeline(&f, "x", &build, json!({}))).unwrap();
    let ebs = json!({"amazonEBS": {"region": "us-east-1", "sourceAMI": "ami-0123", "instanceType": "t3.micro", "amiName": "web-{{ build.name }}"}});
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "cron and every",
            json!({"schedule": {"cron": "@daily", "every": "1h"}}),
            &["spec.schedule", "exactly one of cron or every"],
        ),
        (
            "neither cron nor every",
            json!({"schedule": {}}),
            &["spec.schedule", "exactly one of cron or every"],
        ),
        (
            "timeZone without cron",
            json!({"schedule": {"every": "1h", "timeZone": "Europe/Berlin"}}),
            &["spec.schedule", "timeZone applies to cron only"],
        ),
        (
            "malformed every",
            json!({"schedule": {"every": "six hours"}}),
            &["spec.schedule.every"],
        ),
        (
            "malformed checkInterval",
            json!({"onSourceChange": {"checkInterval": "hourly"}}),
            &["spec.onSourceChange.checkInterval"],
        ),
        (
            "malformed startingDeadline",
            json!({"startingDeadline": "soon"}),
            &["spec.startingDeadline"],
        ),
        (
            "unknown concurrencyPolicy",
            json!({"concurrencyPolicy": "Allow"}),
            &["spec.concurrencyPolicy", "Unsupported value"],
        ),
        (
            "keep 0",
            json!({"imageRetention": {"keep": 0}}),
            &["spec.imageRetention.keep"],
        ),
        (
            "keep 31",
            json!({"imageRetention": {"keep": 31}}),
            &["spec.imageRetention.keep"],
        ),
        (
            "pinnedVersion 0",
            json!({"pinnedVersion": 0}),
            &["spec.pinnedVersion"],
        ),
        (
            "history over 100",
            json!({"buildHistoryLimit": {"succeeded": 101}}),
            &["spec.buildHistoryLimit.succeeded"],
        ),
        (
            "Delete without retention",
            json!({"artifactPolicy": "Delete"}),
            &["artifactPolicy: Delete needs imageRetention"],
        ),
        (
            "onSourceChange with the null builder",
            json!({"onSourceChange": {}}),
            &["onSourceChange needs a builder with a source image"],
        ),
        (
            "a kiln.dev/ label",
            json!({"template": {"metadata": {"labels": {"kiln.dev/pipeline": "other"}}}}),
            &["spec.template.metadata.labels", "kiln.dev/"],
        ),
        (
            "the template's own artifactPolicy",
            json!({"template": {"spec": {"artifactPolicy": "Delete"}}}),
            &["template.spec.artifactPolicy must be Retain"],
        ),
        (
            "an invalid template",
            json!({"template": {"spec": {"builder": {"null": {}, "amazonEBS": ebs["amazonEBS"]}}}}),
            &["spec.template.spec.builder", "exactly one builder"],
        ),
    ];
    let mut failures = Vec::new();
    for (i, (what, patch, expect)) in cases.iter().enumerate() {
        let mut obj = base.clone();
        obj["metadata"]["name"] = json!(format!("bad-{i}"));
        merge(&mut obj["spec"], patch);
        match create_raw(&f, &obj).await {
            Ok(()) => failures.push(format!("{what}: accepted")),
            Err(kube::Error::Api(s)) => {
                for e in *expect {
                    if !s.message.contains(e) {
                        failures.push(format!("{what}: message lacks {e:?}: {}", s.message));
                    }
                }
                if s.code != 422 {
                    failures.push(format!("{what}: code {}", s.code));
                }
            }
            Err(e) => failures.push(format!("{what}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        _ => *target = patch.clone(),
    }
}

/// What only the operator can tell stalls the pipeline before any ImageBuild is
/// created, with a message that names the field.
#[tokio::test]
async fn pipelines_the_operator_cannot_run_stall_before_any_build_naming_the_field() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("ipl-stall").await;
    let f = &a.f;
    let null = f.null_build("t", shell(&["true"]));
    let ebs = a.build("t", json!({}), shell(&["true"]));
    let long = "l".repeat(64);
    let cases: Vec<(String, &Value, Value, &str)> = vec![
        (
            "cron".into(),
            &null,
            json!({"schedule": {"cron": "61 * * * *"}}),
            "spec.schedule.cron: minute field \"61\"",
        ),
        (
            "zone".into(),
            &null,
            json!({"schedule": {"cron": "@daily", "timeZone": "Mars/Olympus"}}),
            "spec.schedule.timeZone",
        ),
        (
            "every".into(),
            &null,
            json!({"schedule": {"every": "0s"}}),
            "spec.schedule.every",
        ),
        (
            "name".into(),
            &ebs,
            json!({"template": {"spec": {"builder": {"amazonEBS": {"amiName": "golden"}}}}}),
            "spec.template.spec.builder.amazonEBS.amiName: \"golden\" is the same for every build",
        ),
        (
            "endpoint".into(),
            &ebs,
            json!({"template": {"spec": {"builder": {"amazonEBS": {"endpoint": "https://ec2.example.com"}}}}}),
            "spec.template.spec.builder.amazonEBS.endpoint",
        ),
        (
            long,
            &null,
            json!({}),
            "metadata.name: at most 63 characters",
        ),
    ];
    for (name, build, patch, _) in &cases {
        let mut p = serde_json::to_value(pipeline(f, name, build, json!({}))).unwrap();
        merge(&mut p["spec"], patch);
        create(f, &serde_json::from_value(p).unwrap()).await;
    }
    let mut failures = Vec::new();
    for (name, _, _, expect) in &cases {
        let st = wait_status(f, name, Duration::from_secs(30), "Stalled", |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Stalled" && c.status == "True")
        })
        .await;
        let stalled = st.conditions.iter().find(|c| c.type_ == "Stalled").unwrap();
        if !stalled.message.contains(expect) || stalled.reason != "InvalidSpec" {
            failures.push(format!("{name}: {} {}", stalled.reason, stalled.message));
        }
        if st.sequence != 0 {
            failures.push(format!("{name}: a build was started"));
        }
    }
    let any = f.api().list(&ListParams::default()).await.unwrap().items;
    if !any.is_empty() {
        failures.push(format!(
            "ImageBuilds were created: {:?}",
            any.iter().map(|b| b.name_any()).collect::<Vec<_>>()
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
