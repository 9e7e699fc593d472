//! amazon-ebs end to end: the real apiserver, the moto-based EC2 server
//! (tests/ec2server) and OpenSSH sshd (provisioning goes to the loopback sshd
//! through the SSH host override; moto's instances are not machines).
//!
//! The EC2 server's delays and faults are global, so these tests take turns.

mod common;

use std::time::{Duration, Instant};

use common::aws::Aws;
use common::{condition, wait_until};
use k8s_openapi::api::core::v1::ConfigMap;
use kiln::api::{BuildPhase, ImageBuild, StepPhase};
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

// Not tied to a runtime, so one lock serves every test's own runtime.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Aws {
    async fn instances_ever(&self, uid: &str) -> usize {
        let c = self.ec2.client("us-east-1").await;
        let r = c
            .describe_instances()
            .filters(common::tag_filter(uid))
            .send()
            .await
            .unwrap();
        r.reservations().iter().flat_map(|r| r.instances()).count()
    }
}

fn shell(cmds: &[&str]) -> Value {
    json!([{"shell": {"inline": cmds}}])
}

fn step<'a>(ib: &'a ImageBuild, name: &str) -> &'a kiln::api::StepRecord {
    ib.status
        .as_ref()
        .unwrap()
        .steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn happy_path_builds_tags_copies_and_leaves_nothing_behind() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("ebs-happy").await;
    a.ec2.control("DELETE", "/_kiln/calls", None);
    let dir = a.f.host_dir.display().to_string();
    let b = a.build(
        "web",
        json!({
            "amiRegions": ["eu-west-1"],
            "tags": {"team": "platform"},
            "snapshotTags": {"kind": "root"},
            "runTags": {"purpose": "kiln-test"},
            "manifestConfigMap": {"name": "web-manifest"},
        }),
        json!([{"shell": {"inline": [format!("echo \"$KILN_INSTANCE_ID $KILN_REGION $KILN_SOURCE_AMI\" > {dir}/facts")]}}]),
    );
    let t = Instant::now();
    a.f.create(&b).await.unwrap();
    let ib =
        a.f.wait_phase("web", BuildPhase::Succeeded, Duration::from_secs(120))
            .await;
    let wall = t.elapsed();
    // Before the test's own Describe calls below.
    let calls = a.ec2.control("GET", "/_kiln/calls", None);
    let uid = ib.uid().unwrap();

    // The operator counts its own EC2 calls (the server's count may include other
    // tests' builds): each of these happens once in a build.
    let scraped = a.f.operator.http_get("/metrics").await.unwrap().1;
    for action in ["RunInstances", "CreateImage", "CopyImage", "StopInstances"] {
        let series = format!(
            r#"kiln_cloud_api_calls_total{{provider="aws",action="{action}",outcome="success"}}"#
        );
        assert_eq!(
            common::parse_metric(&scraped, &series),
            1.0,
            "{series}; server saw {calls}\n{scraped}"
        );
    }
    assert!(
        common::parse_metric(
            &scraped,
            r#"kiln_cloud_api_calls_total{provider="aws",action="DescribeImages",outcome="success"}"#
        ) >= 2.0
    );
    // Fewer calls than Packer's 26 for the same build (issue 6/6): tags go with the
    // create calls, creates come before lookups, and cleanup deletes what it recorded
    // without looking it up again. With no delays every wait checks once.
    let by_action: Vec<(String, f64)> = scraped
        .lines()
        .filter(|l| l.starts_with(r#"kiln_cloud_api_calls_total{provider="aws""#))
        .filter_map(|l| {
            let action = l.split("action=\"").nth(1)?.split('"').next()?.to_string();
            Some((action, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    let total: f64 = by_action.iter().map(|(_, n)| n).sum();
    println!("FIGURES: amazon-ebs happy path EC2 calls {total}: {by_action:?}");
    assert!(total <= 22.0, "{total} EC2 calls: {by_action:?}");
    for action in ["CreateTags", "DescribeKeyPairs", "DescribeVolumes"] {
        assert!(
            !by_action.iter().any(|(a, _)| a == action),
            "{action} in {by_action:?}"
        );
    }

    // Cloud credentials and the generated private key appear nowhere.
    let status_json = serde_json::to_string(&ib.status).unwrap();
    let events_json = serde_json::to_string(&a.f.events().await).unwrap();
    let logs = a.f.operator.logs();
    for (what, text) in [
        ("status", &status_json),
        ("events", &events_json),
        ("operator log", &logs),
    ] {
        assert!(
            !text.contains("kiln-test-secret-key"),
            "AWS secret key leaked into {what}"
        );
        assert!(
            !text.contains("PRIVATE KEY"),
            "a private key leaked into {what}"
        );
    }
    let st = ib.status.clone().unwrap();
    assert_eq!(condition(&ib, "Ready").as_deref(), Some("True"));

    // Artifacts: one per region, available and tagged.
    assert_eq!(st.artifacts.len(), 2, "{:?}", st.artifacts);
    for (region, art) in [
        ("us-east-1", &st.artifacts[0]),
        ("eu-west-1", &st.artifacts[1]),
    ] {
        assert_eq!(art.region.as_deref(), Some(region));
        assert_eq!(art.source_image_id.as_deref(), Some(a.source_ami.as_str()));
        let images = a.images(&uid, region).await;
        assert_eq!(images.len(), 1, "{region}: {images:?}");
        let img = &images[0];
        assert_eq!(img.image_id(), art.image_id.as_deref());
        assert_eq!(img.state().map(|s| s.as_str()), Some("available"));
        assert!(
            img.tags()
                .iter()
                .any(|t| t.key() == Some("team") && t.value() == Some("platform")),
            "{region}: {:?}",
            img.tags()
        );
    }
    let snaps = &st.artifacts[0].snapshot_ids;
    assert!(!snaps.is_empty());
    let c = a.ec2.client("us-east-1").await;
    let s = c
        .describe_snapshots()
        .snapshot_ids(&snaps[0])
        .send()
        .await
        .unwrap();
    assert!(
        s.snapshots()[0]
            .tags()
            .iter()
            .any(|t| t.key() == Some("kind") && t.value() == Some("root"))
    );

    // Build facts reached the provisioner.
    let facts = std::fs::read_to_string(a.f.host_dir.join("facts")).unwrap();
    let instance = step(&ib, "instance").outputs["instance_id"].clone();
    assert_eq!(
        facts.trim(),
        format!("{instance} us-east-1 {}", a.source_ami)
    );

    // Manifest ConfigMap.
    let cms: Api<ConfigMap> = Api::namespaced(a.f.client.clone(), &a.f.ns);
    let m = cms.get("web-manifest").await.unwrap();
    let manifest = &m.data.unwrap()["manifest.json"];
    assert!(
        manifest.contains(st.artifacts[1].image_id.as_deref().unwrap()),
        "{manifest}"
    );

    // Nothing temporary is left, and exactly one instance was ever launched.
    let leaks = a.leaks(&uid, &["us-east-1", "eu-west-1"]).await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
    assert_eq!(a.instances_ever(&uid).await, 1);

    println!(
        "FIGURES: amazon-ebs happy path wall {:.2}s; EC2 calls: {calls}",
        wall.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn source_ami_filter_picks_the_newest_and_explains_ambiguity() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("ebs-filter").await;
    let family = format!("fam-{}", a.f.ns);
    let loaded = a.ec2.control(
        "POST",
        "/_kiln/images",
        Some(json!([
            {"name": format!("{family}-a"), "creation_date": "2024-01-01T00:00:00.000Z"},
            {"name": format!("{family}-c"), "creation_date": "2024-09-01T00:00:00.000Z"},
            {"name": format!("{family}-b"), "creation_date": "2024-05-01T00:00:00.000Z"},
        ])),
    );
    let newest = loaded["images"][1]["image_id"]
        .as_str()
        .unwrap()
        .to_string();
    let filter = |most_recent: bool, pattern: &str| json!({"sourceAMI": null, "sourceAMIFilter": {"filters": {"name": pattern}, "owners": ["self"], "mostRecent": most_recent}});
    let pattern = format!("{family}-*");
    a.f.create(&a.build("newest", filter(true, &pattern), shell(&["true"])))
        .await
        .unwrap();
    a.f.create(&a.build("ambiguous", filter(false, &pattern), shell(&["true"])))
        .await
        .unwrap();
    a.f.create(&a.build("nothing", filter(true, "no-such-image-*"), shell(&["true"])))
        .await
        .unwrap();

    let ib =
        a.f.wait_phase("newest", BuildPhase::Succeeded, Duration::from_secs(90))
            .await;
    assert_eq!(step(&ib, "source-image").outputs["source_ami"], newest);
    let ib =
        a.f.wait_phase("ambiguous", BuildPhase::Failed, Duration::from_secs(30))
            .await;
    let msg = ib.status.unwrap().message.unwrap();
    assert!(
        msg.contains("3 images match") && msg.contains(&pattern) && msg.contains("mostRecent"),
        "{msg}"
    );
    let ib =
        a.f.wait_phase("nothing", BuildPhase::Failed, Duration::from_secs(30))
            .await;
    let msg = ib.status.unwrap().message.unwrap();
    assert!(
        msg.contains("no image matches") && msg.contains("no-such-image-*"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn given_resources_are_used_and_never_deleted_and_names_are_protected() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("ebs-given").await;
    let c = a.ec2.client("us-east-1").await;
    let sg = c
        .create_security_group()
        .group_name(format!("given-{}", a.f.ns))
        .description("user's group")
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_string();
    let pubkey = std::fs::read_to_string(a.f.env.ssh_key.with_extension("pub")).unwrap();
    let kp = format!("given-{}", a.f.ns);
    c.import_key_pair()
        .key_name(&kp)
        .public_key_material(aws_sdk_ec2::primitives::Blob::new(pubkey.into_bytes()))
        .send()
        .await
        .unwrap();
    let mut b = a.build(
        "given",
        json!({"securityGroupIds": [sg], "keyPairName": kp}),
        shell(&["true"]),
    );
    b["spec"]["communicator"]["ssh"]["privateKeySecretRef"] = json!({"name": "ssh-key"});
    a.f.create(&b).await.unwrap();
    let ib =
        a.f.wait_phase("given", BuildPhase::Succeeded, Duration::from_secs(90))
            .await;
    assert!(
        !step(&ib, "security-group")
            .resources
            .iter()
            .any(|r| r.created)
    );
    assert!(!step(&ib, "key-pair").resources.iter().any(|r| r.created));
    assert_eq!(
        c.describe_security_groups()
            .group_ids(&sg)
            .send()
            .await
            .unwrap()
            .security_groups()
            .len(),
        1
    );
    assert_eq!(
        c.describe_key_pairs()
            .key_names(&kp)
            .send()
            .await
            .unwrap()
            .key_pairs()
            .len(),
        1
    );
    // Deleting the ImageBuild does not touch them either.
    a.f.api()
        .delete("given", &DeleteParams::default())
        .await
        .unwrap();
    a.f.wait_gone("given", Duration::from_secs(30)).await;
    assert_eq!(
        c.describe_security_groups()
            .group_ids(&sg)
            .send()
            .await
            .unwrap()
            .security_groups()
            .len(),
        1
    );
    assert_eq!(
        c.describe_key_pairs()
            .key_names(&kp)
            .send()
            .await
            .unwrap()
            .key_pairs()
            .len(),
        1
    );

    // An AMI with the name already exists: fail before launching anything...
    let taken = format!("taken-{}", a.f.ns);
    let old = a.ec2.control(
        "POST",
        "/_kiln/images",
        Some(json!([{"name": taken, "creation_date": "2024-01-01T00:00:00.000Z"}])),
    );
    let old_id = old["images"][0]["image_id"].as_str().unwrap().to_string();
    let other = a.ec2.control("POST", "/_kiln/images", Some(json!([{"name": format!("{taken}-other"), "creation_date": "2024-01-01T00:00:00.000Z"}])));
    let other_id = other["images"][0]["image_id"].as_str().unwrap().to_string();
    a.f.create(&a.build("clash", json!({"amiName": taken}), shell(&["true"])))
        .await
        .unwrap();
    let ib =
        a.f.wait_phase("clash", BuildPhase::Failed, Duration::from_secs(30))
            .await;
    let msg = ib.status.clone().unwrap().message.unwrap();
    assert!(
        msg.contains("amiName") && msg.contains(&old_id) && msg.contains("forceDeregister"),
        "{msg}"
    );
    assert_eq!(
        a.instances_ever(&ib.uid().unwrap()).await,
        0,
        "nothing may be launched"
    );
    // forceDeregister replaces only this ImageBuild's own images (its kiln.dev/build
    // tag): an image anyone else made fails the build before anything is launched,
    // saying whose it is (review A9)...
    let theirs = format!("{taken}-theirs");
    let loaded = a.ec2.control(
        "POST",
        "/_kiln/images",
        Some(
            json!([{"name": theirs, "creation_date": "2024-01-01T00:00:00.000Z",
                     "tags": {"kiln.dev/build": "team-b/base"}}]),
        ),
    );
    let theirs_id = loaded["images"][0]["image_id"]
        .as_str()
        .unwrap()
        .to_string();
    for (name, ami_name, id, whose) in [
        ("force-untagged", &taken, &old_id, "kiln did not build it"),
        (
            "force-theirs",
            &theirs,
            &theirs_id,
            "built by ImageBuild team-b/base",
        ),
    ] {
        a.f.create(&a.build(
            name,
            json!({"amiName": ami_name, "forceDeregister": true, "forceDeleteSnapshot": true}),
            shell(&["true"]),
        ))
        .await
        .unwrap();
        let ib =
            a.f.wait_phase(name, BuildPhase::Failed, Duration::from_secs(30))
                .await;
        let msg = ib.status.clone().unwrap().message.unwrap();
        assert!(
            msg.contains("forceDeregister") && msg.contains(id.as_str()) && msg.contains(whose),
            "{name}: {msg}"
        );
        assert_eq!(a.instances_ever(&ib.uid().unwrap()).await, 0, "{name}");
        let left = c
            .describe_images()
            .image_ids(id.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(
            left.images().len(),
            1,
            "{name}: someone else's image was removed"
        );
    }

    // ...and replaces this ImageBuild's earlier image of the name, which is then no
    // longer an artifact (review A2).
    let mine = format!("{taken}-mine");
    a.f.create(&a.build(
        "replace",
        json!({"amiName": mine, "forceDeregister": true, "forceDeleteSnapshot": true}),
        shell(&["true"]),
    ))
    .await
    .unwrap();
    let first =
        a.f.wait_phase("replace", BuildPhase::Succeeded, Duration::from_secs(90))
            .await;
    let first_id = first.status.unwrap().artifacts[0].image_id.clone().unwrap();
    let api = a.f.api();
    api.patch(
        "replace",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(
            json!({"spec": {"provisioners": [{"shell": {"inline": ["echo two"]}}]}}),
        ),
    )
    .await
    .unwrap();
    let ib = wait_until(Duration::from_secs(90), "generation 2 built", || async {
        let ib = api.get("replace").await.ok()?;
        let st = ib.status.as_ref()?;
        (st.observed_generation == Some(2) && st.phase == Some(BuildPhase::Succeeded)).then_some(ib)
    })
    .await;
    let st = ib.status.unwrap();
    let new_id = st.artifacts.last().unwrap().image_id.clone().unwrap();
    assert!(
        st.artifacts
            .iter()
            .all(|x| x.image_id.as_deref() != Some(first_id.as_str())),
        "a replaced image is still listed: {:?}",
        st.artifacts
    );
    let by_name = c
        .describe_images()
        .owners("self")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("name")
                .values(&mine)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let ids: Vec<_> = by_name
        .images()
        .iter()
        .filter_map(|i| i.image_id())
        .collect();
    assert_eq!(ids, [new_id.as_str()]);
    let other = c
        .describe_images()
        .image_ids(&other_id)
        .send()
        .await
        .unwrap();
    assert_eq!(other.images().len(), 1, "an unrelated image was touched");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_provisioner_cleans_up_or_keeps_until_deletion() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("ebs-fail").await;
    a.f.create(&a.build("fails", json!({}), shell(&["echo nope", "exit 7"])))
        .await
        .unwrap();
    let mut keep = a.build("keeps", json!({}), shell(&["exit 7"]));
    keep["spec"]["onError"] = json!("keep");
    a.f.create(&keep).await.unwrap();

    let ib =
        a.f.wait_phase("fails", BuildPhase::Failed, Duration::from_secs(90))
            .await;
    let uid = ib.uid().unwrap();
    assert!(
        ib.status
            .unwrap()
            .message
            .unwrap()
            .contains("exited with code 7")
    );
    assert!(a.leaks(&uid, &["us-east-1"]).await.is_empty());
    assert!(
        a.images(&uid, "us-east-1").await.is_empty(),
        "no AMI may be left"
    );

    let ib =
        a.f.wait_phase("keeps", BuildPhase::Failed, Duration::from_secs(90))
            .await;
    let uid = ib.uid().unwrap();
    let kept = a.leaks(&uid, &["us-east-1"]).await;
    assert!(kept.iter().any(|l| l.starts_with("instance")), "{kept:?}");
    assert!(
        kept.iter().any(|l| l.starts_with("security group")),
        "{kept:?}"
    );
    assert!(kept.iter().any(|l| l.starts_with("key pair")), "{kept:?}");
    a.f.api()
        .delete("keeps", &DeleteParams::default())
        .await
        .unwrap();
    a.f.wait_gone("keeps", Duration::from_secs(60)).await;
    let left = a.leaks(&uid, &["us-east-1"]).await;
    assert!(left.is_empty(), "{left:?}");
}

/// Kills the operator right after every step is recorded, and inside every wait.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_operator_anywhere_launches_one_instance_and_leaks_nothing() {
    let _g = SERIAL.lock().await;
    let mut a = Aws::new("ebs-kill").await;
    a.ec2.control(
        "POST",
        "/_kiln/delays",
        Some(json!({"boot": 1.5, "stop": 1.5, "terminate": 0.5, "image": 1.5, "copy": 1.5})),
    );
    let b = a.build(
        "killed",
        json!({"amiRegions": ["eu-west-1"]}),
        shell(&["true"]),
    );
    a.f.create(&b).await.unwrap();
    let api = a.f.api();
    let mut killed_after: Vec<String> = Vec::new();
    let mut killed_in: Vec<String> = Vec::new();
    let waits = [
        "instance-ready",
        "stop-instance",
        "create-image",
        "copy-image-eu-west-1",
    ];
    let start = Instant::now();
    loop {
        let ib = api.get("killed").await.unwrap();
        let st = ib.status.clone().unwrap_or_default();
        if st.phase == Some(BuildPhase::Succeeded) {
            break;
        }
        assert!(st.phase != Some(BuildPhase::Failed), "{:?}", st.message);
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "stuck: {}",
            serde_json::to_string(&st).unwrap()
        );
        let mut kill = false;
        for s in &st.steps {
            if s.phase == StepPhase::Succeeded && !killed_after.contains(&s.name) {
                killed_after.push(s.name.clone());
                kill = true;
            }
            // Inside a wait: the resource is recorded and the step is still running.
            if s.phase == StepPhase::Running
                && waits.contains(&s.name.as_str())
                && !killed_in.contains(&s.name)
                && (s.name == "instance-ready"
                    || !s.resources.is_empty()
                    || s.name == "stop-instance")
            {
                killed_in.push(s.name.clone());
                kill = true;
            }
        }
        if kill {
            a.f.restart_operator();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.ec2.control("DELETE", "/_kiln/delays", None);
    let uid = a.uid("killed").await;
    println!("killed after {killed_after:?}, inside {killed_in:?}");
    assert!(killed_after.len() >= 10, "{killed_after:?}");
    assert_eq!(killed_in.len(), waits.len(), "{killed_in:?}");
    assert_eq!(
        a.instances_ever(&uid).await,
        1,
        "exactly one instance ever launched"
    );
    assert_eq!(a.images(&uid, "us-east-1").await.len(), 1);
    assert_eq!(a.images(&uid, "eu-west-1").await.len(), 1);
    let leaks = a.leaks(&uid, &["us-east-1", "eu-west-1"]).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_is_retried_and_a_permanent_error_fails_cleanly() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("ebs-faults").await;
    let actions = [
        "DescribeImages",
        "ImportKeyPair",
        "DescribeVpcs",
        "DescribeSecurityGroups",
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "DescribeInstances",
        "RunInstances",
        "StopInstances",
        "CreateImage",
        "CreateTags",
        "TerminateInstances",
        "DeleteSecurityGroup",
        "DeleteKeyPair",
    ];
    let faults: Vec<Value> = actions
        .iter()
        .map(|a| json!({"action": a, "count": 2, "code": "RequestLimitExceeded", "status": 503, "message": "Request limit exceeded."}))
        .collect();
    a.ec2
        .control("POST", "/_kiln/faults", Some(Value::Array(faults)));
    a.f.create(&a.build("throttled", json!({}), shell(&["true"])))
        .await
        .unwrap();
    let ib =
        a.f.wait_phase("throttled", BuildPhase::Succeeded, Duration::from_secs(120))
            .await;
    let uid = ib.uid().unwrap();
    assert!(a.leaks(&uid, &["us-east-1"]).await.is_empty());
    a.ec2.control("DELETE", "/_kiln/faults", None);

    a.ec2.control(
        "POST",
        "/_kiln/faults",
        Some(json!({"action": "CreateImage", "count": 1, "code": "UnauthorizedOperation", "status": 403, "message": "You are not authorized to perform this operation."})),
    );
    a.f.create(&a.build("denied", json!({}), shell(&["true"])))
        .await
        .unwrap();
    let ib =
        a.f.wait_phase("denied", BuildPhase::Failed, Duration::from_secs(90))
            .await;
    let uid = ib.uid().unwrap();
    let msg = ib.status.unwrap().message.unwrap();
    assert!(
        msg.contains("CreateImage")
            && msg.contains("UnauthorizedOperation")
            && msg.contains("not authorized"),
        "{msg}"
    );
    assert!(a.leaks(&uid, &["us-east-1"]).await.is_empty());
    assert!(a.images(&uid, "us-east-1").await.is_empty());
    a.ec2.control("DELETE", "/_kiln/faults", None);
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_during_any_step_leaks_nothing() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("ebs-delete").await;
    a.ec2.control(
        "POST",
        "/_kiln/delays",
        Some(json!({"boot": 3, "image": 3, "terminate": 0.5})),
    );
    let cases = [
        ("during-boot", "instance-ready"),
        ("during-shell", "shell-1"),
        ("during-image", "create-image"),
    ];
    for (name, _) in cases {
        a.f.create(&a.build(name, json!({}), shell(&["sleep 3"])))
            .await
            .unwrap();
    }
    let api = a.f.api();
    let mut uids = Vec::new();
    for (name, during) in cases {
        let ib = wait_until(
            Duration::from_secs(60),
            &format!("{name} to reach {during}"),
            || async {
                let ib = api.get(name).await.ok()?;
                let running = ib
                    .status
                    .as_ref()?
                    .steps
                    .iter()
                    .any(|s| s.name == during && s.phase == StepPhase::Running);
                running.then_some(ib)
            },
        )
        .await;
        uids.push(ib.uid().unwrap());
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for (name, _) in cases {
        a.f.wait_gone(name, Duration::from_secs(60)).await;
    }
    a.ec2.control("DELETE", "/_kiln/delays", None);
    for uid in uids {
        let leaks = a.leaks(&uid, &["us-east-1"]).await;
        assert!(leaks.is_empty(), "{uid}: {leaks:?}");
        assert!(
            a.images(&uid, "us-east-1").await.is_empty(),
            "{uid}: image left"
        );
    }
}

/// With the EC2 server's state delays on, the build takes about as long as the
/// delays it must wait out, not much more: waits poll, they do not sleep blindly.
#[tokio::test(flavor = "multi_thread")]
async fn with_realistic_delays_the_build_takes_about_the_sum_of_the_delays() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("ebs-delays").await;
    let (boot, stop, image, copy, terminate) = (3.0, 2.0, 5.0, 5.0, 1.0);
    a.ec2.control(
        "POST",
        "/_kiln/delays",
        Some(json!({"boot": boot, "stop": stop, "image": image, "copy": copy, "terminate": terminate})),
    );
    a.ec2.control("DELETE", "/_kiln/calls", None);
    let t = Instant::now();
    a.f.create(&a.build(
        "slow",
        json!({"amiRegions": ["eu-west-1"]}),
        shell(&["true"]),
    ))
    .await
    .unwrap();
    a.f.wait_phase("slow", BuildPhase::Succeeded, Duration::from_secs(120))
        .await;
    let wall = t.elapsed().as_secs_f64();
    let calls = a.ec2.control("GET", "/_kiln/calls", None);
    a.ec2.control("DELETE", "/_kiln/delays", None);
    let sum = boot + stop + image + copy + terminate;
    println!(
        "FIGURES: amazon-ebs with delays: wall {wall:.2}s, sum of injected delays {sum:.1}s, overhead {:.1}%; EC2 calls {}",
        (wall / sum - 1.0) * 100.0,
        calls["total"]
    );
    assert!(
        wall >= sum,
        "faster than the delays: the waits did not wait ({wall:.2}s < {sum}s)"
    );
    assert!(
        wall < sum * 1.5,
        "{wall:.2}s is far beyond the {sum}s of delays"
    );
}
