//! A spec change in the middle of an amazon-ebs build: the old generation's steps are
//! cancelled and cleaned up with the spec that generation recorded
//! (`status.buildSpec`), not with the new one, so nothing it made is leaked, even
//! when the new spec shifts the step list, moves to another region or switches
//! builder. Real apiserver, the EC2 test server and sshd, as in tests/amazon.rs.
//!
//! The build is held in a provisioner that sleeps (after touching a marker file), not
//! with the EC2 server's delays or faults: those are global to the server and would
//! slow or break other test files' builds running at the same time. The `kiln.dev/
//! build-uid` tag is the same for both generations, so the old generation's resources
//! are checked by the IDs status recorded for them before the change.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::aws::Aws;
use common::wait_until;
use k8s_openapi::api::core::v1::Secret;
use kiln::api::{BuildPhase, ImageBuild, ImageBuildSpec, StepPhase};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

impl Aws {
    /// A source image of this test's own in another region.
    fn source_ami_in(&self, region: &str) -> String {
        let loaded = self.ec2.control(
            "POST",
            "/_kiln/images",
            Some(json!({"region": region, "images": [
                {"name": format!("base-{}", self.f.ns), "creation_date": "2025-01-01T00:00:00.000Z"}
            ]})),
        );
        loaded["images"][0]["image_id"]
            .as_str()
            .unwrap_or_else(|| panic!("loaded image id in {loaded}"))
            .to_string()
    }

    /// Replaces the whole spec (a new generation); a JSON patch, so the operator's
    /// status writes cannot make it conflict.
    async fn set_spec(&self, name: &str, spec: &Value) {
        let patch: json_patch::Patch =
            serde_json::from_value(json!([{"op": "replace", "path": "/spec", "value": spec}]))
                .unwrap();
        self.f
            .api()
            .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
            .unwrap();
    }

    /// Waits until status describes `generation`: the older build is cleaned up.
    async fn wait_generation(&self, name: &str, generation: i64, timeout: Duration) -> ImageBuild {
        let api = self.f.api();
        let start = Instant::now();
        loop {
            let ib = api.get(name).await.unwrap();
            let st = ib.status.clone().unwrap_or_default();
            if st.observed_generation == Some(generation) {
                return ib;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {name} to start generation {generation}; status: {}\noperator log tail:\n{}",
                serde_json::to_string_pretty(&ib.status).unwrap(),
                common::tail(&self.f.operator.logs(), 40)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for generation `generation` to succeed.
    async fn wait_succeeded(&self, name: &str, generation: i64) -> ImageBuild {
        let ib = self
            .wait_generation(name, generation, Duration::from_secs(180))
            .await;
        assert_eq!(ib.metadata.generation, Some(generation));
        let ib = self
            .f
            .wait_phase(name, BuildPhase::Succeeded, Duration::from_secs(180))
            .await;
        let st = ib.status.clone().unwrap();
        assert_eq!(st.observed_generation, Some(generation), "{st:?}");
        ib
    }

    /// What is still there of `old` (every check in `old.region`, its own region).
    async fn still_there(&self, old: &Old) -> Vec<String> {
        let c = self.ec2.client(&old.region).await;
        let mut left = Vec::new();
        let r = c
            .describe_instances()
            .instance_ids(&old.instance)
            .send()
            .await
            .unwrap();
        for i in r.reservations().iter().flat_map(|r| r.instances()) {
            let state = i.state().and_then(|s| s.name()).map(|s| s.as_str());
            if state != Some("terminated") {
                left.push(format!("instance {} {state:?}", old.instance));
            }
        }
        let groups = c
            .describe_security_groups()
            .group_ids(&old.security_group)
            .send()
            .await;
        match groups {
            Ok(r) if !r.security_groups().is_empty() => {
                left.push(format!("security group {}", old.security_group));
            }
            Ok(_) => {}
            Err(e) => assert_not_found(e, "InvalidGroup.NotFound"),
        }
        let keys = c.describe_key_pairs().key_names(&old.key_pair).send().await;
        match keys {
            Ok(r) if !r.key_pairs().is_empty() => {
                left.push(format!("key pair {}", old.key_pair));
            }
            Ok(_) => {}
            Err(e) => assert_not_found(e, "InvalidKeyPair.NotFound"),
        }
        let secrets: Api<Secret> = Api::namespaced(self.f.client.clone(), &self.f.ns);
        if secrets.get_opt(&old.secret).await.unwrap().is_some() {
            left.push(format!("Secret {}", old.secret));
        }
        for (region, image) in &old.images {
            let c = self.ec2.client(region).await;
            let r = c.describe_images().image_ids(image).send().await.unwrap();
            if !r.images().is_empty() {
                left.push(format!("image {image} in {region}"));
            }
        }
        left
    }
}

fn assert_not_found<E, R>(e: aws_sdk_ec2::error::SdkError<E, R>, code: &str)
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::fmt::Debug,
    R: std::fmt::Debug,
{
    use aws_sdk_ec2::error::ProvideErrorMetadata;
    assert_eq!(e.code(), Some(code), "{e:?}");
}

/// A spec as kiln reads it (defaults filled in): what `status.buildSpec` records.
fn as_read(spec: &Value) -> Value {
    let typed: ImageBuildSpec = serde_json::from_value(spec.clone()).unwrap();
    serde_json::to_value(typed).unwrap()
}

/// A provisioner that says it started (the marker file) and then keeps the build
/// in that step until it is cancelled.
fn hold(dir: &Path, marker: &str) -> Value {
    let marker = dir.join(marker);
    json!({"shell": {"inline": [format!("touch {}", marker.display()), "sleep 60"]}})
}

fn quick(cmd: &str) -> Value {
    json!({"shell": {"inline": [cmd]}})
}

async fn wait_file(path: &Path) {
    wait_until(
        Duration::from_secs(120),
        &format!(
            "{} (the build to reach its held provisioner)",
            path.display()
        ),
        || async { path.exists().then_some(()) },
    )
    .await;
}

/// The old generation's resources, as status recorded them.
#[derive(Debug)]
struct Old {
    region: String,
    instance: String,
    security_group: String,
    key_pair: String,
    secret: String,
    /// (region, image ID) of images it made.
    images: Vec<(String, String)>,
}

fn recorded(ib: &ImageBuild) -> Old {
    let st = ib.status.as_ref().expect("status");
    let find = |kind: &str| -> (String, Option<String>) {
        st.steps
            .iter()
            .flat_map(|s| &s.resources)
            .find(|r| r.kind == kind && r.created)
            .map(|r| (r.id.clone(), r.region.clone()))
            .unwrap_or_else(|| panic!("no created {kind} in status: {st:?}"))
    };
    let (instance, region) = find("Instance");
    let images = st
        .steps
        .iter()
        .flat_map(|s| &s.resources)
        .filter(|r| r.kind == "Image" && r.created)
        .map(|r| (r.region.clone().expect("image region"), r.id.clone()))
        .collect();
    Old {
        region: region.expect("instance region"),
        instance,
        security_group: find("SecurityGroup").0,
        key_pair: find("KeyPair").0,
        secret: find("Secret").0,
        images,
    }
}

fn step_names(ib: &ImageBuild) -> Vec<String> {
    ib.status
        .as_ref()
        .unwrap()
        .steps
        .iter()
        .map(|s| s.name.clone())
        .collect()
}

/// Generation 1 held in its provisioner, then superseded.
struct Superseded {
    old: Old,
    /// `status.buildSpec` while generation 1 ran.
    spec1_recorded: Option<Value>,
    /// From the spec change until generation 1 was cleaned up and 2 started.
    took: f64,
}

/// Holds generation 1 in its provisioner, replaces the spec with `spec2` and waits
/// until generation 2 starts: generation 1 is then cancelled and cleaned up.
async fn supersede_held_build(a: &Aws, name: &str, spec1: &Value, spec2: &Value) -> Superseded {
    a.f.create(spec1).await.unwrap();
    wait_file(&a.f.host_dir.join("held-1")).await;
    let ib = a.f.api().get(name).await.unwrap();
    let st = ib.status.clone().unwrap();
    assert_eq!(st.observed_generation, Some(1));
    let shell = st.steps.iter().find(|s| s.name == "shell-1").unwrap();
    assert_eq!(shell.phase, StepPhase::Running);
    let old = recorded(&ib);

    let t = Instant::now();
    a.set_spec(name, &spec2["spec"]).await;
    a.wait_generation(name, 2, Duration::from_secs(120)).await;
    Superseded {
        old,
        spec1_recorded: st.build_spec,
        took: t.elapsed().as_secs_f64(),
    }
}

/// Each generation recorded exactly its own spec, nothing left of the other's.
fn assert_recorded_specs(
    spec1_recorded: Option<&Value>,
    ib2: &ImageBuild,
    spec1: &Value,
    spec2: &Value,
) {
    assert_eq!(
        spec1_recorded,
        Some(&as_read(&spec1["spec"])),
        "generation 1 records the spec it runs with"
    );
    assert_eq!(
        ib2.status.as_ref().unwrap().build_spec.as_ref(),
        Some(&as_read(&spec2["spec"])),
        "generation 2 records its own spec"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shifted_step_list_cleans_up_the_old_generation_with_its_own_steps() {
    let a = Aws::new("sup-shift").await;
    let dir = a.f.host_dir.clone();
    let spec1 = a.build(
        "shift",
        json!({"amiRegions": ["eu-west-1"]}),
        json!([hold(&dir, "held-1")]),
    );
    // A provisioner before the held one, other copies and forceDeregister: every
    // step after `connect` moves.
    let spec2 = a.build(
        "shift",
        json!({"amiRegions": ["us-west-2"], "forceDeregister": true}),
        json!([
            quick(&format!("touch {}/gen2-first", dir.display())),
            quick("true")
        ]),
    );
    let start = Instant::now();
    let s = supersede_held_build(&a, "shift", &spec1, &spec2).await;

    let left = a.still_there(&s.old).await;
    assert!(left.is_empty(), "generation 1 left {left:?} ({:?})", s.old);
    let ib = a.wait_succeeded("shift", 2).await;
    let uid = ib.uid().unwrap();
    let names = step_names(&ib);
    for want in ["shell-2", "deregister-existing", "copy-image-us-west-2"] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
    assert!(
        !names.iter().any(|n| n == "copy-image-eu-west-1"),
        "{names:?}"
    );
    assert!(dir.join("gen2-first").exists());
    let leaks = a
        .leaks(&uid, &["us-east-1", "us-west-2", "eu-west-1"])
        .await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
    // Generation 1 never got to an image; generation 2's are its artifacts.
    assert!(a.images(&uid, "eu-west-1").await.is_empty());
    assert_eq!(a.images(&uid, "us-west-2").await.len(), 1);
    assert_recorded_specs(s.spec1_recorded.as_ref(), &ib, &spec1, &spec2);
    println!(
        "FIGURES: shifted step list: supersede (cancel + cleanup) {:.2}s, total {:.2}s",
        s.took,
        start.elapsed().as_secs_f64()
    );
}

/// The same kind of shift after the old build got past its provisioners and made
/// images, kept by `onError: keep` when its last step failed: the copy in a region
/// the new spec no longer names must go too, by the copy step's own cleanup.
#[tokio::test(flavor = "multi_thread")]
async fn kept_images_of_a_shifted_step_list_are_removed_in_their_own_regions() {
    let a = Aws::new("sup-kept").await;
    // An immutable ConfigMap of that name: the last step, `manifest`, cannot write it
    // and fails.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(a.f.client.clone(), &a.f.ns);
    cms.create(
        &Default::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "frozen-manifest"},
            "immutable": true,
            "data": {"manifest.json": "{}"},
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let mut spec1 = a.build(
        "kept",
        json!({
            "amiRegions": ["eu-west-1"],
            "manifestConfigMap": {"name": "frozen-manifest"},
        }),
        json!([quick("true")]),
    );
    spec1["spec"]["onError"] = json!("keep");
    let spec2 = a.build(
        "kept",
        json!({"forceDeregister": true}),
        json!([quick("true"), quick("true")]),
    );
    let start = Instant::now();
    a.f.create(&spec1).await.unwrap();
    let ib =
        a.f.wait_phase("kept", BuildPhase::Failed, Duration::from_secs(180))
            .await;
    let names = step_names(&ib);
    assert_eq!(names.last().map(String::as_str), Some("manifest"));
    let spec1_recorded = ib.status.as_ref().unwrap().build_spec.clone();
    let old = recorded(&ib);
    let regions: Vec<&str> = old.images.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(regions, ["us-east-1", "eu-west-1"], "{old:?}");
    let kept = a.still_there(&old).await;
    assert_eq!(kept.len(), 6, "onError: keep keeps them all: {kept:?}");

    let t = Instant::now();
    a.set_spec("kept", &spec2["spec"]).await;
    a.wait_generation("kept", 2, Duration::from_secs(120)).await;
    let took = t.elapsed().as_secs_f64();
    let left = a.still_there(&old).await;
    assert!(left.is_empty(), "generation 1 left {left:?} ({old:?})");

    let ib = a.wait_succeeded("kept", 2).await;
    let uid = ib.uid().unwrap();
    let leaks = a.leaks(&uid, &["us-east-1", "eu-west-1"]).await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
    assert!(a.images(&uid, "eu-west-1").await.is_empty());
    assert_eq!(a.images(&uid, "us-east-1").await.len(), 1);
    assert_recorded_specs(spec1_recorded.as_ref(), &ib, &spec1, &spec2);
    println!(
        "FIGURES: kept images, shifted step list: cleanup of generation 1 {took:.2}s, total {:.2}s",
        start.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_region_terminates_the_old_instance_in_the_old_region() {
    let a = Aws::new("sup-region").await;
    let dir = a.f.host_dir.clone();
    let spec1 = a.build("region", json!({}), json!([hold(&dir, "held-1")]));
    let west_ami = a.source_ami_in("us-west-2");
    let spec2 = a.build(
        "region",
        json!({"region": "us-west-2", "sourceAMI": west_ami}),
        json!([quick("true")]),
    );
    let start = Instant::now();
    let s = supersede_held_build(&a, "region", &spec1, &spec2).await;
    assert_eq!(s.old.region, "us-east-1");

    let left = a.still_there(&s.old).await;
    assert!(left.is_empty(), "generation 1 left {left:?} ({:?})", s.old);
    let ib = a.wait_succeeded("region", 2).await;
    let uid = ib.uid().unwrap();
    let instance = ib
        .status
        .as_ref()
        .unwrap()
        .steps
        .iter()
        .flat_map(|s| &s.resources)
        .find(|r| r.kind == "Instance")
        .cloned()
        .unwrap();
    assert_eq!(instance.region.as_deref(), Some("us-west-2"));
    let leaks = a.leaks(&uid, &["us-east-1", "us-west-2"]).await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
    assert_recorded_specs(s.spec1_recorded.as_ref(), &ib, &spec1, &spec2);
    println!(
        "FIGURES: region change: supersede (cancel + cleanup) {:.2}s, total {:.2}s",
        s.took,
        start.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn switching_to_the_null_builder_still_removes_the_ec2_resources() {
    let a = Aws::new("sup-null").await;
    let dir = a.f.host_dir.clone();
    let spec1 = a.build("switch", json!({}), json!([hold(&dir, "held-1")]));
    let mut spec2 = a.f.null_build(
        "switch",
        json!([quick(&format!("touch {}/null-ran", dir.display()))]),
    );
    spec2["spec"]["communicator"]["ssh"]["privateKeySecretRef"] = json!({"name": "ssh-key"});
    let start = Instant::now();
    let s = supersede_held_build(&a, "switch", &spec1, &spec2).await;

    let left = a.still_there(&s.old).await;
    assert!(left.is_empty(), "generation 1 left {left:?} ({:?})", s.old);
    let ib = a.wait_succeeded("switch", 2).await;
    let uid = ib.uid().unwrap();
    assert_eq!(step_names(&ib), ["connect", "shell-1"]);
    assert!(dir.join("null-ran").exists());
    let leaks = a.leaks(&uid, &["us-east-1"]).await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
    // Server-side apply dropped generation 1's builder from the recorded spec.
    assert_recorded_specs(s.spec1_recorded.as_ref(), &ib, &spec1, &spec2);
    println!(
        "FIGURES: amazonEBS -> null: supersede (cancel + cleanup) {:.2}s, total {:.2}s",
        s.took,
        start.elapsed().as_secs_f64()
    );
}

/// Status written by a kiln that did not record `buildSpec`: the old generation's
/// steps are matched by name against the current spec's steps. A step with no match
/// that created something is held (not forgotten, not marked done) until a spec
/// that has it comes back; then it is cleaned up and that spec builds.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_recorded_spec_unmatched_steps_are_held_until_a_spec_has_them() {
    let mut a = Aws::new("sup-legacy").await;
    let dir = a.f.host_dir.clone();
    let spec1 = a.build("legacy", json!({}), json!([hold(&dir, "held-1")]));
    a.f.create(&spec1).await.unwrap();
    wait_file(&dir.join("held-1")).await;
    let old = recorded(&a.f.api().get("legacy").await.unwrap());

    // What an older kiln leaves: no buildSpec. The operator is stopped meanwhile so
    // that it does not record the spec again.
    a.f.operator.kill();
    let patch: json_patch::Patch =
        serde_json::from_value(json!([{"op": "remove", "path": "/status/buildSpec"}])).unwrap();
    a.f.api()
        .patch_status("legacy", &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .unwrap();
    let mut null = a.f.null_build("legacy", json!([quick("true")]));
    null["spec"]["communicator"]["ssh"]["privateKeySecretRef"] = json!({"name": "ssh-key"});
    a.set_spec("legacy", &null["spec"]).await;
    a.f.restart_operator();

    let api = a.f.api();
    let ib = wait_until(Duration::from_secs(60), "cleanup to be held", || async {
        let ib = api.get("legacy").await.unwrap();
        let msg = ib.status.as_ref()?.message.clone()?;
        msg.contains("blocked").then_some(ib)
    })
    .await;
    let st = ib.status.clone().unwrap();
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(st.phase, Some(BuildPhase::CleaningUp));
    for name in ["key-pair", "security-group", "instance"] {
        let rec = st.steps.iter().find(|s| s.name == name).unwrap();
        assert_eq!(rec.cleanup, kiln::api::CleanupPhase::Pending, "{name}");
        let msg = rec.cleanup_message.as_deref().unwrap_or_default();
        assert!(msg.contains("cannot clean up"), "{name}: {msg}");
    }
    assert!(
        st.steps
            .iter()
            .find(|s| s.name == "instance")
            .unwrap()
            .cleanup_message
            .as_deref()
            .unwrap()
            .contains(&old.instance)
    );
    // Matched by name: the null spec's own steps were decided, nothing else.
    let connect = st.steps.iter().find(|s| s.name == "connect").unwrap();
    assert_eq!(connect.cleanup, kiln::api::CleanupPhase::NotNeeded);
    let kept = a.still_there(&old).await;
    assert_eq!(kept.len(), 4, "held, so still there: {kept:?}");
    a.f.event_reasons_with(&["CleanupFailed"]).await;
    let events = a.f.events().await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("CleanupFailed")
                && e.note.as_deref().unwrap_or("").contains("cannot clean up")),
        "a CleanupFailed event says why"
    );

    // An amazon-ebs spec in the same region has those steps again.
    let spec3 = a.build("legacy", json!({}), json!([quick("true")]));
    a.set_spec("legacy", &spec3["spec"]).await;
    a.wait_generation("legacy", 3, Duration::from_secs(120))
        .await;
    let left = a.still_there(&old).await;
    assert!(left.is_empty(), "generation 1 left {left:?} ({old:?})");
    let ib = a.wait_succeeded("legacy", 3).await;
    let leaks = a.leaks(&ib.uid().unwrap(), &["us-east-1"]).await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
}
