//! One operator identity serves every namespace (issue 2/6): what one tenant's
//! ImageBuild may make the operator do to another's images, and which images may
//! become a source. Against the real apiserver and the EC2 test server.

mod common;

use std::time::Duration;

use common::aws::Aws;
use kiln::api::BuildPhase;
use kube::ResourceExt;
use serde_json::{Value, json};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn shell(cmds: &[&str]) -> Value {
    json!([{"shell": {"inline": cmds}}])
}

/// Review A5 ("whoAMI"): without owners, anyone's public image with a matching name
/// could become the source. `owners` is required unless `anyOwner: true` says
/// otherwise, and a filter that matches more than 1000 images fails instead of
/// pulling an unbounded list into the operator's memory.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_filter_names_its_owners_and_matches_a_bounded_set() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("owners").await;
    let family = format!("wide-{}", a.f.ns);
    let filter = |extra: Value| {
        let mut f = json!({"filters": {"name": format!("{family}-*")}, "mostRecent": true});
        for (k, v) in extra.as_object().unwrap() {
            f[k] = v.clone();
        }
        json!({"sourceAMI": null, "sourceAMIFilter": f})
    };
    let err =
        a.f.create_raw(&a.build("no-owners", filter(json!({})), shell(&["true"])))
            .await
            .unwrap_err()
            .to_string();
    assert!(err.contains("owners is required"), "{err}");
    let err =
        a.f.create_raw(&a.build(
            "opt-out-false",
            filter(json!({"anyOwner": false})),
            shell(&["true"]),
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("owners is required"), "{err}");
    a.f.create_raw(&a.build(
        "opt-out",
        filter(json!({"anyOwner": true})),
        shell(&["true"]),
    ))
    .await
    .expect("anyOwner: true is the explicit opt-out");

    // 1001 matching images: more than one page of the bounded lookup.
    let images: Vec<Value> = (0..1001)
        .map(|i| json!({"name": format!("{family}-{i:04}"), "creation_date": "2025-01-01T00:00:00.000Z"}))
        .collect();
    a.ec2.control("POST", "/_kiln/images", Some(json!(images)));
    a.f.create(&a.build(
        "too-wide",
        filter(json!({"owners": ["self"]})),
        shell(&["true"]),
    ))
    .await
    .unwrap();
    let ib =
        a.f.wait_phase("too-wide", BuildPhase::Failed, Duration::from_secs(60))
            .await;
    let msg = ib.status.unwrap().message.unwrap();
    assert!(
        msg.contains("sourceAMIFilter") && msg.contains("more than 1000 images match"),
        "{msg}"
    );
}

/// Review A9 across namespaces: a team's ImageBuild with `forceDeregister` and
/// another team's AMI name fails before anything is launched, saying whose image it
/// is, and that image survives.
#[tokio::test(flavor = "multi_thread")]
async fn force_deregister_cannot_remove_another_namespaces_image() {
    let _g = SERIAL.lock().await;
    let team_a = Aws::new("team-a").await;
    let name = format!("shared-name-{}", team_a.f.ns);
    team_a
        .f
        .create(&team_a.build("base", json!({"amiName": name}), shell(&["true"])))
        .await
        .unwrap();
    let built = team_a
        .f
        .wait_phase("base", BuildPhase::Succeeded, Duration::from_secs(90))
        .await;
    let image = built.status.unwrap().artifacts[0].image_id.clone().unwrap();

    let team_b = Aws::new("team-b").await;
    team_b
        .f
        .create(&team_b.build(
            "steal",
            json!({"amiName": name, "forceDeregister": true, "forceDeleteSnapshot": true}),
            shell(&["true"]),
        ))
        .await
        .unwrap();
    let ib = team_b
        .f
        .wait_phase("steal", BuildPhase::Failed, Duration::from_secs(60))
        .await;
    let msg = ib.status.clone().unwrap().message.unwrap();
    assert!(
        msg.contains(&image) && msg.contains(&format!("ImageBuild {}/base", team_a.f.ns)),
        "{msg}"
    );
    let uid = ib.uid().unwrap();
    assert!(team_b.images(&uid, "us-east-1").await.is_empty());
    let c = team_a.ec2.client("us-east-1").await;
    let left = c.describe_images().image_ids(&image).send().await.unwrap();
    assert_eq!(left.images().len(), 1, "team a's image was removed");
}

/// Credentials of every kind stay out of the operator's log, at every level and in
/// both formats (the AWS SDK logs the access key ID at debug), and a log that is not
/// a terminal has no colour codes.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_stay_out_of_logs_at_every_level() {
    let _g = SERIAL.lock().await;
    let mut a = Aws::new("log-secrets").await;
    a.f.operator.kill();
    let logs = a.f.env.dir.join("logs");
    for (i, (format, level)) in [("text", "debug"), ("text", "trace"), ("json", "trace")]
        .into_iter()
        .enumerate()
    {
        let log = logs.join(format!("{}-{format}-{level}.log", a.f.ns));
        let mut op = common::Operator::start_custom(
            &a.f.operator_kubeconfig,
            &a.f.ns,
            &log,
            &["--log-format", format],
            &[("KILN_LOG", level)],
        );
        let name = format!("b{i}");
        a.f.create(&a.build(&name, json!({}), shell(&["true"])))
            .await
            .unwrap();
        a.f.wait_phase(&name, BuildPhase::Succeeded, Duration::from_secs(90))
            .await;
        op.kill();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.len() > 10_000,
            "{format} {level}: the log is nearly empty"
        );
        for (what, needle) in [
            ("the AWS access key ID", "AKIDTEST"),
            ("the AWS secret key", "kiln-test-secret-key"),
            ("a private key", "PRIVATE KEY"),
            ("a colour code", "\u{1b}["),
        ] {
            assert!(
                !text.contains(needle),
                "{what} in the {format} log at {level} ({})",
                log.display()
            );
        }
    }
}

/// Review A15: `endpoint` is a URL that receives requests signed with the
/// operator's credentials, so a tenant may set one only when the installation
/// allows it; otherwise the build is refused before anything is created, naming
/// the field.
#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_is_refused_unless_the_operator_allows_it() {
    let _g = SERIAL.lock().await;
    let mut a = Aws::new("endpoint").await;
    a.f.operator.kill();
    let log =
        a.f.env
            .dir
            .join("logs")
            .join(format!("{}-strict.log", a.f.ns));
    let _strict = common::Operator::start_custom(
        &a.f.operator_kubeconfig,
        &a.f.ns,
        &log,
        &[],
        &[("KILN_ALLOWED_ENDPOINTS", "")],
    );
    a.ec2.control("DELETE", "/_kiln/calls", None);
    a.f.create(&a.build("elsewhere", json!({}), shell(&["true"])))
        .await
        .unwrap();
    let ib =
        a.f.wait_phase("elsewhere", BuildPhase::Failed, Duration::from_secs(30))
            .await;
    let st = ib.status.unwrap();
    let msg = st.message.unwrap();
    assert!(
        msg.contains("spec.builder.amazonEBS.endpoint") && msg.contains("not allowed"),
        "{msg}"
    );
    assert!(st.steps.is_empty(), "nothing may run: {:?}", st.steps);
    let calls = a.ec2.control("GET", "/_kiln/calls", None);
    assert_eq!(calls["total"], 0, "the endpoint got requests: {calls}");
}

/// Review A4: a Secret-sourced env value is masked in every sink (the operator log
/// as text and JSON at debug and trace, status messages and conditions, Events) in
/// the shapes line-by-line masking missed: a trailing newline (`kubectl create
/// secret --from-file`), several lines, split across output chunks, and after the
/// 8 KiB cut of an endless line.
#[tokio::test(flavor = "multi_thread")]
async fn secret_values_are_masked_in_every_shape_and_sink() {
    let mut f = common::Fixture::new("masking").await;
    f.operator.kill();
    let values = [
        ("TRAILING", "hunter2-trailing\n"),
        ("MULTI", "line-one-secret\nline-two-secret"),
        ("SPLIT", "split-secret-value"),
        ("LONG", &"Z".repeat(300)),
    ];
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(f.client.clone(), &f.ns);
    let data: serde_json::Map<String, Value> = values
        .iter()
        .map(|(k, v)| (k.to_lowercase(), json!(v)))
        .collect();
    secrets
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": "shapes"}, "stringData": data}))
                .unwrap(),
        )
        .await
        .unwrap();
    let env: Vec<Value> = values
        .iter()
        .map(|(k, _)| json!({"name": k, "valueFrom": {"secretKeyRef": {"name": "shapes", "key": k.to_lowercase()}}}))
        .collect();
    let script = [
        r#"printf 'token is %s ok\n' "$TRAILING""#,
        r#"printf 'multi: %s\n' "$MULTI""#,
        r#"printf '%s' "$SPLIT" | head -c 6; sleep 0.5; printf '%s\n' "$SPLIT" | tail -c +7"#,
        r#"head -c 8190 /dev/zero | tr '\0' x; printf '%s\n' "$LONG""#,
        r#"printf '%s' "$TRAILING" >&2"#,
        "exit 3",
    ];
    let needles = [
        "hunter2-trailing",
        "line-one-secret",
        "line-two-secret",
        "split-secret",
        "secret-value",
        "ZZZZZZZZZZ",
    ];
    let logs = f.env.dir.join("logs");
    for (i, (format, level)) in [("text", "debug"), ("text", "trace"), ("json", "trace")]
        .into_iter()
        .enumerate()
    {
        let log = logs.join(format!("{}-{format}-{level}.log", f.ns));
        let mut op = common::Operator::start_custom(
            &f.operator_kubeconfig,
            &f.ns,
            &log,
            &["--log-format", format],
            &[("KILN_LOG", level)],
        );
        let name = format!("m{i}");
        f.create(&f.null_build(&name, json!([{"shell": {"inline": script, "env": env}}])))
            .await
            .unwrap();
        let ib = f
            .wait_phase(&name, BuildPhase::Failed, Duration::from_secs(60))
            .await;
        // Let the background Event writes land.
        tokio::time::sleep(Duration::from_secs(1)).await;
        op.kill();
        let status = serde_json::to_string(&ib.status).unwrap();
        assert!(
            status.contains("<redacted>"),
            "the tail shows the masked output: {status}"
        );
        let all = f.events().await;
        // The failure's note (a long output tail) fits the apiserver's 1 KiB limit:
        // the Event exists (review A8: such Events were refused and lost).
        assert!(
            all.iter().any(|e| e.reason.as_deref() == Some("StepFailed")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
                && e.note.as_ref().is_some_and(|n| n.len() <= 1024)),
            "no StepFailed event for {name}: {:?}",
            all.iter()
                .map(|e| (e.reason.clone(), e.note.as_ref().map(String::len)))
                .collect::<Vec<_>>()
        );
        let events = serde_json::to_string(&all).unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        for (sink, body) in [("status", &status), ("events", &events), ("log", &text)] {
            for n in needles {
                assert!(
                    !body.contains(n),
                    "{n:?} in the {sink} ({format} log at {level}, {})",
                    log.display()
                );
            }
        }
    }
}

/// Review A14: `encryptBoot` encrypts the AMI in the build region too, as Packer's
/// does: the instance is captured as an unencrypted intermediate, copied encrypted
/// to `amiName`, and the intermediate and its snapshots are removed.
#[tokio::test(flavor = "multi_thread")]
async fn encrypt_boot_encrypts_the_image_in_the_build_region() {
    let _g = SERIAL.lock().await;
    let a = Aws::new("encrypt").await;
    let name = format!("{}-encrypted", a.f.ns);
    a.f.create(&a.build(
        "sealed",
        json!({"amiName": name, "encryptBoot": true, "kmsKeyId": "alias/kiln-test", "amiRegions": ["eu-west-1"]}),
        shell(&["true"]),
    ))
    .await
    .unwrap();
    let ib =
        a.f.wait_phase("sealed", BuildPhase::Succeeded, Duration::from_secs(120))
            .await;
    let uid = ib.uid().unwrap();
    let st = ib.status.unwrap();
    assert_eq!(st.artifacts.len(), 2, "{:?}", st.artifacts);
    for art in &st.artifacts {
        let region = art.region.as_deref().unwrap();
        let images = a.images(&uid, region).await;
        assert_eq!(
            images.len(),
            1,
            "{region}: only the encrypted image is left: {images:?}"
        );
        let img = &images[0];
        assert_eq!(img.image_id(), art.image_id.as_deref());
        assert_eq!(img.name(), Some(name.as_str()));
        let ebs = img.block_device_mappings()[0].ebs().unwrap();
        assert_eq!(ebs.encrypted(), Some(true), "{region}: {img:?}");
        assert!(
            ebs.kms_key_id().is_some_and(|k| k.contains("kiln-test")),
            "{region}: {img:?}"
        );
    }
    let leaks = a.leaks(&uid, &["us-east-1", "eu-west-1"]).await;
    assert!(leaks.is_empty(), "leaked: {leaks:?}");
}
