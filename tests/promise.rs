//! kiln's promise under faults (issue 1/6): a finished image is an artifact whatever
//! happens next, nothing temporary outlives its build, a lost reply is not a
//! failure, and nothing without kiln's mark is adopted or deleted. Against the real
//! apiserver, the moto-based EC2 server (tests/ec2server) and OpenSSH sshd.
//!
//! The EC2 server's delays and faults are global, so these tests take turns.

mod common;

use std::time::{Duration, Instant};

use common::aws::Aws;
use common::wait_until;
use kiln::api::{BuildPhase, CleanupPhase, ImageBuild, StepPhase};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const REGIONS: [&str; 2] = ["us-east-1", "eu-west-1"];

impl Aws {
    /// This build's images (by its tag) in `region`, with their snapshots.
    async fn images_with_snapshots(&self, uid: &str, region: &str) -> Vec<(String, Vec<String>)> {
        self.images(uid, region)
            .await
            .iter()
            .map(|i| {
                let snaps = i
                    .block_device_mappings()
                    .iter()
                    .filter_map(|b| b.ebs().and_then(|e| e.snapshot_id()).map(str::to_string))
                    .collect();
                (i.image_id().unwrap_or_default().to_string(), snaps)
            })
            .collect()
    }

    async fn snapshot_exists(&self, region: &str, id: &str) -> bool {
        let c = self.ec2.client(region).await;
        match c.describe_snapshots().snapshot_ids(id).send().await {
            Ok(r) => !r.snapshots().is_empty(),
            Err(_) => false,
        }
    }
}

fn shell(cmds: &[&str]) -> Value {
    json!([{"shell": {"inline": cmds}}])
}

/// Puts a finished build back where the operator leaves it right after its last
/// step: every step Succeeded, phase CleaningUp, no cleanup done yet, its images
/// still held by their steps. The chaos runs stopped the operator at that moment;
/// rewinding a finished build reaches it every time instead of by luck.
async fn rewind_to_after_the_last_step(api: &Api<ImageBuild>, name: &str) {
    let ib = api.get(name).await.unwrap();
    // As JSON: the same test runs against kilns whose status has fewer fields.
    let mut st = serde_json::to_value(ib.status.clone().unwrap()).unwrap();
    let artifacts = st.as_object_mut().unwrap().remove("artifacts");
    let artifacts = artifacts
        .and_then(|a| a.as_array().cloned())
        .unwrap_or_default();
    for rec in st["steps"].as_array_mut().unwrap() {
        assert_eq!(rec["phase"], "Succeeded", "{rec}");
        rec["cleanup"] = json!("Pending");
        let r = rec.as_object_mut().unwrap();
        r.remove("cleanupAttempts");
        r.remove("cleanupMessage");
        // `create-image` and each `copy-image-<region>` output `image_id.<region>`.
        let mine: Vec<Value> = artifacts
            .iter()
            .filter(|a| {
                let key = format!("image_id.{}", a["region"].as_str().unwrap_or_default());
                rec["outputs"][&key] == a["imageId"]
            })
            .cloned()
            .collect();
        if !mine.is_empty() {
            rec["artifacts"] = json!(mine);
        }
    }
    st["phase"] = json!("CleaningUp");
    st.as_object_mut().unwrap().remove("completedAt");
    st["currentStep"] = json!("manifest");
    let apply = |st: &Value| {
        let patch = json!({"apiVersion": "kiln.dev/v1alpha1", "kind": "ImageBuild", "status": st});
        async move {
            api.patch_status(
                name,
                &PatchParams::apply("kiln").force(),
                &Patch::Apply(&patch),
            )
            .await
        }
    };
    if let Err(e) = apply(&st).await {
        // A kiln before steps[].artifacts (this test also runs against old code to
        // show that it fails there): its images were listed from the start.
        assert!(e.to_string().contains("not declared in schema"), "{e}");
        for rec in st["steps"].as_array_mut().unwrap() {
            rec.as_object_mut().unwrap().remove("artifacts");
        }
        apply(&st).await.unwrap();
    }
}

/// `status.steps[name].<field>` as a number, 0 when absent (as JSON: see above).
async fn step_number(api: &Api<ImageBuild>, build: &str, step: &str, field: &str) -> u64 {
    let ib = api.get(build).await.unwrap();
    let st = serde_json::to_value(ib.status.unwrap_or_default()).unwrap();
    st["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == step)
        .and_then(|s| s[field].as_u64())
        .unwrap_or(0)
}

/// Waits until the build's first provisioner runs; returns the object then.
async fn provisioner_running(api: &Api<ImageBuild>, name: &str) -> ImageBuild {
    wait_until(
        Duration::from_secs(120),
        &format!("{name}'s provisioner to run"),
        || async {
            let ib = api.get(name).await.ok()?;
            ib.status
                .as_ref()?
                .steps
                .iter()
                .any(|s| s.name == "shell-1" && s.phase == StepPhase::Running)
                .then_some(ib)
        },
    )
    .await
}

/// Review A1: a spec change or a deletion that lands after the last step, while the
/// operator was down, used to deregister the finished AMI and delete its snapshots.
#[tokio::test(flavor = "multi_thread")]
async fn a_finished_build_keeps_its_images_through_a_spec_change_or_a_deletion() {
    let _g = SERIAL.lock().await;
    let mut a = Aws::new("promise-a1").await;
    let ebs = json!({"amiRegions": ["eu-west-1"]});
    for name in ["changed", "deleted"] {
        a.f.create(&a.build(name, ebs.clone(), shell(&["true"])))
            .await
            .unwrap();
    }
    let api = a.f.api();
    let mut finished = Vec::new();
    for name in ["changed", "deleted"] {
        let ib =
            a.f.wait_phase(name, BuildPhase::Succeeded, Duration::from_secs(120))
                .await;
        let st = ib.status.clone().unwrap();
        assert_eq!(st.artifacts.len(), 2, "{name}: {:?}", st.artifacts);
        finished.push((name, ib.uid().unwrap(), st.artifacts));
    }

    // The operator stops right after the last step; then the spec changes and the
    // other object is deleted; then the operator comes back.
    a.f.operator.kill();
    for name in ["changed", "deleted"] {
        rewind_to_after_the_last_step(&api, name).await;
    }
    api.patch(
        "changed",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"provisioners": [{"shell": {"inline": ["echo two"]}}]}})),
    )
    .await
    .unwrap();
    api.delete("deleted", &DeleteParams::default())
        .await
        .unwrap();
    a.f.restart_operator();

    a.f.wait_gone("deleted", Duration::from_secs(60)).await;
    let ib = wait_until(Duration::from_secs(120), "generation 2 built", || async {
        let ib = api.get("changed").await.ok()?;
        let st = ib.status.as_ref()?;
        (st.observed_generation == Some(2) && st.phase == Some(BuildPhase::Succeeded)).then_some(ib)
    })
    .await;

    for (name, uid, artifacts) in &finished {
        for art in artifacts {
            let region = art.region.as_deref().unwrap();
            let id = art.image_id.as_deref().unwrap();
            let images = a.images_with_snapshots(uid, region).await;
            let found = images.iter().find(|(i, _)| i == id);
            let (_, snaps) = found.unwrap_or_else(|| {
                panic!("{name}: finished image {id} in {region} was removed; left: {images:?}")
            });
            assert!(!snaps.is_empty());
            for s in snaps {
                assert!(
                    a.snapshot_exists(region, s).await,
                    "{name}: snapshot {s} of {id} was deleted"
                );
            }
        }
    }
    // Both generations' images are artifacts of the changed object, and only those
    // of successful builds remain; nothing temporary is left.
    let st = ib.status.clone().unwrap();
    assert_eq!(st.artifacts.len(), 4, "{:?}", st.artifacts);
    assert_eq!(
        st.artifacts
            .iter()
            .map(|a| a.generation)
            .collect::<Vec<_>>(),
        vec![1, 1, 2, 2]
    );
    let uid = ib.uid().unwrap();
    let leaks = common::leaks(&a.ec2, &a.f.client, &a.f.ns, &uid, &REGIONS).await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
    let (_, deleted_uid, deleted_artifacts) = &finished[1];
    let keep: Vec<String> = deleted_artifacts
        .iter()
        .filter_map(|a| a.image_id.clone())
        .collect();
    let leaks =
        common::leaks_keeping(&a.ec2, &a.f.client, &a.f.ns, deleted_uid, &REGIONS, &keep).await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
}

/// Review A6 (and A2): `artifactPolicy: Delete` removes every image of every
/// generation, in every region, with its snapshots, retrying through a refused
/// snapshot deletion; `Retain` (the default) keeps them after deletion.
#[tokio::test(flavor = "multi_thread")]
async fn artifact_policy_delete_removes_every_image_and_retain_keeps_them() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("promise-a6").await;
    let ebs = json!({"amiRegions": ["eu-west-1"]});
    let mut doomed = a.build("doomed", ebs.clone(), shell(&["true"]));
    doomed["spec"]["artifactPolicy"] = json!("Delete");
    a.f.create(&doomed).await.unwrap();
    a.f.create(&a.build("kept", ebs, shell(&["true"])))
        .await
        .unwrap();
    let api = a.f.api();
    a.f.wait_phase("doomed", BuildPhase::Succeeded, Duration::from_secs(120))
        .await;
    api.patch(
        "doomed",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"provisioners": [{"shell": {"inline": ["echo two"]}}]}})),
    )
    .await
    .unwrap();
    let ib = wait_until(Duration::from_secs(120), "generation 2 built", || async {
        let ib = api.get("doomed").await.ok()?;
        let st = ib.status.as_ref()?;
        (st.observed_generation == Some(2) && st.phase == Some(BuildPhase::Succeeded)).then_some(ib)
    })
    .await;
    let kept =
        a.f.wait_phase("kept", BuildPhase::Succeeded, Duration::from_secs(120))
            .await;
    let uid = ib.uid().unwrap();
    let mut snapshots = Vec::new();
    for region in REGIONS {
        let images = a.images_with_snapshots(&uid, region).await;
        assert_eq!(images.len(), 2, "two generations in {region}: {images:?}");
        snapshots.extend(
            images
                .into_iter()
                .flat_map(|(_, s)| s.into_iter().map(move |s| (region, s))),
        );
    }

    // The first snapshot deletion in each region is refused once, as AWS may just
    // after the image is deregistered.
    for region in REGIONS {
        a.fault(
            json!({"action": "DeleteSnapshot", "code": "InvalidSnapshot.InUse",
                       "region": region, "count": 1}),
        );
    }
    for name in ["doomed", "kept"] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    a.f.wait_gone("doomed", Duration::from_secs(60)).await;
    a.f.wait_gone("kept", Duration::from_secs(60)).await;
    a.ec2.control("DELETE", "/_kiln/faults", None);

    let leaks = common::leaks_keeping(&a.ec2, &a.f.client, &a.f.ns, &uid, &REGIONS, &[]).await;
    assert!(leaks.is_empty(), "artifactPolicy: Delete left: {leaks:?}");
    for (region, s) in &snapshots {
        assert!(!a.snapshot_exists(region, s).await, "{s} in {region}");
    }
    let removed =
        a.f.events()
            .await
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("ArtifactsRemoved"))
            .count();
    assert_eq!(removed, 1, "one ArtifactsRemoved event");

    // Retain: the images stay after the object is gone.
    let kept_uid = kept.uid().unwrap();
    for art in &kept.status.as_ref().unwrap().artifacts {
        let images = a
            .images_with_snapshots(&kept_uid, art.region.as_deref().unwrap())
            .await;
        assert!(
            images
                .iter()
                .any(|(i, _)| Some(i.as_str()) == art.image_id.as_deref()),
            "retained image {:?} is gone",
            art.image_id
        );
    }
}

/// Review A16, A17, B3: an image deleted before it is available, a DescribeImages
/// that fails during cleanup and a snapshot deletion refused once still leave no
/// snapshot behind, in the build region and the copy region; volumes launched with
/// `deleteOnTermination: false` are removed by cleanup.
#[tokio::test(flavor = "multi_thread")]
async fn no_snapshot_or_volume_outlives_its_build() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("promise-snap").await;
    a.ec2
        .control("POST", "/_kiln/delays", Some(json!({"copy": 30})));
    let ebs = json!({
        "amiRegions": ["eu-west-1"],
        "blockDeviceMappings": [
            {"deviceName": "/dev/sdf", "volumeSize": 8, "deleteOnTermination": false},
        ],
    });
    a.f.create(&a.build("copying", ebs.clone(), shell(&["true"])))
        .await
        .unwrap();
    let api = a.f.api();
    let ib = wait_until(Duration::from_secs(120), "the copy to start", || async {
        let ib = api.get("copying").await.ok()?;
        let copy = ib
            .status
            .as_ref()?
            .steps
            .iter()
            .find(|s| s.name == "copy-image-eu-west-1")?;
        (copy.phase == StepPhase::Running && !copy.resources.is_empty()).then_some(ib)
    })
    .await;
    let uid = ib.uid().unwrap();
    // The copy exists (pending), with a snapshot kiln never recorded.
    let copies = a.images_with_snapshots(&uid, "eu-west-1").await;
    assert_eq!(copies.len(), 1, "{copies:?}");
    // Cleanup's first look at the copy fails, and the first snapshot deletion in
    // each region is refused.
    a.fault(
        json!({"action": "DescribeImages", "code": "UnauthorizedOperation",
                   "region": "eu-west-1", "count": 1}),
    );
    for region in REGIONS {
        a.fault(
            json!({"action": "DeleteSnapshot", "code": "InvalidSnapshot.InUse",
                       "region": region, "count": 1}),
        );
    }
    api.delete("copying", &DeleteParams::default())
        .await
        .unwrap();
    a.f.wait_gone("copying", Duration::from_secs(90)).await;
    a.ec2.control("DELETE", "/_kiln/faults", None);
    a.ec2.control("DELETE", "/_kiln/delays", None);
    let leaks = common::leaks_keeping(&a.ec2, &a.f.client, &a.f.ns, &uid, &REGIONS, &[]).await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");

    // A build that succeeds with a volume kept on termination leaves no volume.
    a.f.create(&a.build(
        "volumes",
        json!({"blockDeviceMappings": ebs["blockDeviceMappings"]}),
        shell(&["true"]),
    ))
    .await
    .unwrap();
    let ib =
        a.f.wait_phase("volumes", BuildPhase::Succeeded, Duration::from_secs(120))
            .await;
    let leaks = common::leaks(&a.ec2, &a.f.client, &a.f.ns, &ib.uid().unwrap(), &REGIONS).await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
}

/// Issue item 3: a create call that took effect but whose reply was lost (a 5xx
/// after the fact; the SDK retries) is recognised as kiln's own, for every create
/// call of a build, and the build succeeds with one of each.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_reply_is_not_a_failure() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("promise-lost").await;
    for action in [
        "ImportKeyPair",
        "CreateSecurityGroup",
        "RunInstances",
        "CreateImage",
        "CopyImage",
    ] {
        a.fault(json!({"action": action, "code": "InternalError", "when": "after", "count": 1}));
    }
    a.f.create(&a.build(
        "lost",
        json!({"amiRegions": ["eu-west-1"]}),
        shell(&["true"]),
    ))
    .await
    .unwrap();
    let ib =
        a.f.wait_phase("lost", BuildPhase::Succeeded, Duration::from_secs(120))
            .await;
    let faults = a.ec2.control("GET", "/_kiln/faults", None);
    a.ec2.control("DELETE", "/_kiln/faults", None);
    assert!(
        faults["faults"].as_array().unwrap().is_empty(),
        "every lost reply happened: {faults}"
    );
    let uid = ib.uid().unwrap();
    for region in REGIONS {
        assert_eq!(
            a.images_with_snapshots(&uid, region).await.len(),
            1,
            "{region}"
        );
    }
    let leaks = common::leaks(&a.ec2, &a.f.client, &a.f.ns, &uid, &REGIONS).await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
}

/// Issue item 4: a key pair, security group or AMI with kiln's deterministic name
/// for a build but without its `kiln.dev/build-uid` tag is never adopted, changed
/// or deleted: the step fails naming it. User tags cannot replace kiln's.
#[tokio::test(flavor = "multi_thread")]
async fn only_what_carries_our_mark_is_adopted() {
    let _g = SERIAL.lock().await;
    let mut a = Aws::new("promise-mark").await;
    // Reserved tag keys are refused at admission.
    let mut bad = a.build(
        "tagged",
        json!({"runTags": {"kiln.dev/generation": "7"}}),
        shell(&["true"]),
    );
    let err = a.f.create_raw(&bad).await.unwrap_err().to_string();
    assert!(err.contains("reserved"), "{err}");
    bad["spec"]["builder"]["amazonEBS"]["runTags"] = json!({});
    bad["spec"]["builder"]["amazonEBS"]["tags"] = json!({"aws:cloudformation": "x"});
    assert!(a.f.create_raw(&bad).await.is_err());

    // The operator is down while the objects are made, so that the names kiln will
    // use exist, untagged, before it starts.
    a.f.operator.kill();
    let c = a.ec2.client("us-east-1").await;
    let fixed_name = format!("{}-foreign-ami", a.f.ns);
    let go = a.f.host_dir.join("go");
    for name in ["key", "group", "image"] {
        let mut b = a.build(name, json!({}), shell(&["true"]));
        if name == "image" {
            // The name is free when pre-validate checks it; someone takes it while
            // the provisioner runs.
            b["spec"]["builder"]["amazonEBS"]["amiName"] = json!(fixed_name);
            b["spec"]["provisioners"] = shell(&[&format!(
                "while [ ! -e {} ]; do sleep 0.2; done",
                go.display()
            )]);
        }
        a.f.create(&b).await.unwrap();
    }
    let api = a.f.api();
    let uid_of = |ib: ImageBuild| ib.uid().unwrap();
    let key_uid = uid_of(api.get("key").await.unwrap());
    let group_uid = uid_of(api.get("group").await.unwrap());
    let public = std::fs::read_to_string(format!("{}.pub", a.f.env.ssh_key.display())).unwrap();
    let key_name = format!("kiln-{key_uid}-1");
    c.import_key_pair()
        .key_name(&key_name)
        .public_key_material(aws_sdk_ec2::primitives::Blob::new(public.into_bytes()))
        .send()
        .await
        .unwrap();
    let vpc = c
        .describe_vpcs()
        .send()
        .await
        .unwrap()
        .vpcs()
        .iter()
        .find(|v| v.is_default() == Some(true))
        .and_then(|v| v.vpc_id().map(str::to_string))
        .unwrap();
    let group_name = format!("kiln-{group_uid}-1");
    let group = c
        .create_security_group()
        .group_name(&group_name)
        .description("someone else's")
        .vpc_id(&vpc)
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_string();
    a.f.restart_operator();
    provisioner_running(&api, "image").await;
    let loaded = a.ec2.control(
        "POST",
        "/_kiln/images",
        Some(json!([{"name": fixed_name, "creation_date": "2025-01-01T00:00:00.000Z"}])),
    );
    let foreign_ami = loaded["images"][0]["image_id"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(&go, "").unwrap();

    for (name, step, names) in [
        ("key", "key-pair", key_name.as_str()),
        ("group", "security-group", group.as_str()),
        ("image", "create-image", foreign_ami.as_str()),
    ] {
        let ib =
            a.f.wait_phase(name, BuildPhase::Failed, Duration::from_secs(120))
                .await;
        let rec = ib
            .status
            .as_ref()
            .unwrap()
            .steps
            .iter()
            .find(|s| s.name == step)
            .unwrap()
            .clone();
        assert_eq!(rec.phase, StepPhase::Failed, "{name}");
        let msg = rec.message.unwrap_or_default();
        assert!(msg.contains(names), "{name}: {msg}");
    }
    for name in ["key", "group", "image"] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
        a.f.wait_gone(name, Duration::from_secs(60)).await;
    }
    // Still there, untouched.
    let keys = c
        .describe_key_pairs()
        .key_names(&key_name)
        .send()
        .await
        .unwrap();
    assert_eq!(
        keys.key_pairs().len(),
        1,
        "the foreign key pair was deleted"
    );
    let groups = c
        .describe_security_groups()
        .group_ids(&group)
        .send()
        .await
        .unwrap();
    assert_eq!(
        groups.security_groups().len(),
        1,
        "the foreign group was deleted"
    );
    let images = c
        .describe_images()
        .image_ids(&foreign_ami)
        .send()
        .await
        .unwrap();
    assert_eq!(images.images().len(), 1, "the foreign AMI was deregistered");
    let _ = c.delete_key_pair().key_name(&key_name).send().await;
    let _ = c.delete_security_group().group_id(&group).send().await;
    let _ = c.deregister_image().image_id(&foreign_ami).send().await;
}

/// Issue item 5: cleanup backs off by its failures, not by operator restarts. Nine
/// restarts during a failing cleanup used to grow the wait to two minutes.
#[tokio::test(flavor = "multi_thread")]
async fn cleanup_backoff_counts_failures_not_restarts() {
    let _g = SERIAL.lock().await;
    let mut a = Aws::new("promise-backoff").await;
    // Each generation's AMI has its own name: the timestamp alone may repeat.
    let name = format!("{}-slow-{{{{ build.generation }}}}", a.f.ns);
    a.f.create(&a.build("slow", json!({"amiName": name}), shell(&["true"])))
        .await
        .unwrap();
    let api = a.f.api();
    a.f.wait_phase("slow", BuildPhase::Succeeded, Duration::from_secs(120))
        .await;
    let ib = api.get("slow").await.unwrap();
    let uid = ib.uid().unwrap();
    // Rebuild with a failing provisioner, so that the instance must be cleaned up,
    // and refuse its termination for a while.
    a.fault(json!({"action": "TerminateInstances", "code": "UnauthorizedOperation", "count": 0}));
    api.patch(
        "slow",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"provisioners": [{"shell": {"inline": ["exit 3"]}}]}})),
    )
    .await
    .unwrap();
    wait_until(Duration::from_secs(60), "a failed cleanup", || async {
        let ib = api.get("slow").await.ok()?;
        let st = ib.status.as_ref()?;
        let rec = st.steps.iter().find(|s| s.name == "instance")?;
        (st.observed_generation == Some(2) && rec.cleanup_message.is_some()).then_some(())
    })
    .await;
    for _ in 0..9 {
        a.f.restart_operator();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    a.ec2.control("DELETE", "/_kiln/faults", None);
    let t = Instant::now();
    let ib =
        a.f.wait_phase("slow", BuildPhase::Failed, Duration::from_secs(60))
            .await;
    let rec = ib
        .status
        .as_ref()
        .unwrap()
        .steps
        .iter()
        .find(|s| s.name == "instance")
        .unwrap()
        .clone();
    let failures = step_number(&api, "slow", "instance", "cleanupFailures").await;
    println!(
        "FIGURES: cleanup finished {:.1}s after the fault cleared; {} attempts, {failures} failures",
        t.elapsed().as_secs_f64(),
        rec.cleanup_attempts,
    );
    assert_eq!(rec.cleanup, CleanupPhase::Done);
    assert!(u64::from(rec.cleanup_attempts) > failures, "{rec:?}");
    assert!(
        t.elapsed() < Duration::from_secs(40),
        "cleanup waited {:?} after the fault cleared",
        t.elapsed()
    );
    let leaks = common::leaks(&a.ec2, &a.f.client, &a.f.ns, &uid, &REGIONS).await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
}

/// Review A7: deleting the credentials Secret together with the ImageBuild (a
/// GitOps prune, `kubectl delete -f dir/`, a namespace deletion) used to leave
/// cleanup without credentials for ever: the instance leaked and the ImageBuild
/// never went away. kiln holds the Secret with a finalizer while cleanup needs it.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_credentials_secret_does_not_strand_cloud_resources() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("promise-creds").await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(a.f.client.clone(), &a.f.ns);
    let api = a.f.api();
    // A finished build no longer holds the Secret.
    a.f.create(&a.build("done", json!({}), shell(&["true"])))
        .await
        .unwrap();
    let done =
        a.f.wait_phase("done", BuildPhase::Succeeded, Duration::from_secs(120))
            .await;
    let ours = |uid: &str| format!("kiln.dev/cleanup-{uid}");
    let held = |s: &k8s_openapi::api::core::v1::Secret, uid: &str| {
        s.finalizers().iter().any(|f| *f == ours(uid))
    };
    let done_uid = done.uid().unwrap();
    wait_until(
        Duration::from_secs(20),
        "the finished build to release the Secret",
        || async {
            let s = secrets.get("aws").await.ok()?;
            (!held(&s, &done_uid)).then_some(())
        },
    )
    .await;

    let never = a.f.host_dir.join("never");
    a.f.create(&a.build(
        "pruned",
        json!({}),
        shell(&[&format!(
            "while [ ! -e {} ]; do sleep 0.2; done",
            never.display()
        )]),
    ))
    .await
    .unwrap();
    let ib = provisioner_running(&api, "pruned").await;
    let uid = ib.uid().unwrap();
    // As JSON: the same test runs against kilns without the field.
    let st = serde_json::to_value(ib.status.unwrap()).unwrap();
    assert_eq!(st["heldSecrets"], json!(["aws"]), "{st}");
    assert!(held(&secrets.get("aws").await.unwrap(), &uid));

    // Both go at once, the Secret first.
    secrets
        .delete("aws", &DeleteParams::default())
        .await
        .unwrap();
    api.delete("pruned", &DeleteParams::default())
        .await
        .unwrap();
    a.f.wait_gone("pruned", Duration::from_secs(60)).await;
    wait_until(Duration::from_secs(20), "the Secret to go", || async {
        secrets
            .get_opt("aws")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let leaks = common::leaks_keeping(&a.ec2, &a.f.client, &a.f.ns, &uid, &REGIONS, &[]).await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
}

/// Review A18: cleanup works in the region a resource was recorded in. When the
/// recorded spec cannot be read (a newer kiln wrote it) cleanup falls back to the
/// current spec; if that names another region, terminating the recorded instance
/// there answered NotFound, which counted as done, and the instance leaked.
#[tokio::test(flavor = "multi_thread")]
async fn cleanup_works_in_the_region_a_resource_was_recorded_in() {
    let _g = SERIAL.lock().await;
    let mut a = Aws::new("promise-region").await;
    let never = a.f.host_dir.join("never");
    a.f.create(&a.build(
        "moved",
        json!({}),
        shell(&[&format!(
            "while [ ! -e {} ]; do sleep 0.2; done",
            never.display()
        )]),
    ))
    .await
    .unwrap();
    let api = a.f.api();
    let ib = provisioner_running(&api, "moved").await;
    let uid = ib.uid().unwrap();
    a.f.operator.kill();
    // A recorded spec this kiln cannot read, and a current spec in another region.
    let mut st = serde_json::to_value(ib.status.unwrap()).unwrap();
    st["buildSpec"]["builder"]["amazonEBS"]["region"] = json!(["not", "a", "string"]);
    api.patch_status(
        "moved",
        &PatchParams::apply("kiln").force(),
        &Patch::Apply(
            &json!({"apiVersion": "kiln.dev/v1alpha1", "kind": "ImageBuild", "status": st}),
        ),
    )
    .await
    .unwrap();
    api.patch(
        "moved",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"builder": {"amazonEBS": {"region": "us-west-2"}}}})),
    )
    .await
    .unwrap();
    api.delete("moved", &DeleteParams::default()).await.unwrap();
    a.f.restart_operator();
    a.f.wait_gone("moved", Duration::from_secs(90)).await;
    let leaks = common::leaks_keeping(
        &a.ec2,
        &a.f.client,
        &a.f.ns,
        &uid,
        &["us-east-1", "us-west-2"],
        &[],
    )
    .await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
}
