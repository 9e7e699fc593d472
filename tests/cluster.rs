//! kiln as users run it (issue 4/6): a Pod from its own image (built without Docker
//! by tests/env/image.sh), installed by its Helm chart or by `kubectl apply -k
//! config/`, on the test environment's one-node cluster (`KILN_CLUSTER=1`,
//! tests/env/cluster.sh): real kubelet, containerd and runc. The Pod reaches the
//! apiserver through the `kubernetes` Service and the test sshd and EC2 server
//! through the node IP.
//!
//! Without the cluster mode these tests say so and pass, unless
//! `KILN_REQUIRE_CLUSTER=1` (set by tests/all.sh, so `.ci/run` runs them).
//! They take turns: two installs of kiln would both act on the same builds.

mod common;

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::aws::Aws;
use common::cluster::{Cluster, cluster};
use common::{Fixture, repo_root, short_id, wait_until};
use kiln::api::{BuildPhase, StepPhase};
use kube::ResourceExt;
use serde_json::{Value, json};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// kiln's image, from the binary these tests were built with (the Dockerfile's
/// layout and user; tests/image.rs checks the two agree), imported into the node's
/// containerd under the chart's default reference. Once per test binary.
fn image(c: &Cluster) {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Command::new("bash")
            .args([
                "tests/env/image.sh",
                "--binary",
                env!("CARGO_BIN_EXE_kiln"),
                "--import",
            ])
            .current_dir(repo_root())
            .env("KILN_TEST_ENV", c.get("KILN_TEST_ENV"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "image.sh: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// A null build in `f`'s namespace whose SSH goes to the test sshd as a Pod sees it.
fn pod_null_build(f: &Fixture, c: &Cluster, name: &str, script: &[&str]) -> Value {
    let mut b = f.null_build(name, json!([{"shell": {"inline": script}}]));
    b["spec"]["communicator"]["ssh"]["host"] = json!(c.get("KILN_POD_SSH_HOST"));
    b["spec"]["communicator"]["ssh"]["port"] =
        json!(c.get("KILN_POD_SSH_PORT").parse::<u16>().unwrap());
    b
}

/// Waits for `phase`, with the kiln Pods' logs in the failure message.
async fn wait_phase(f: &Fixture, c: &Cluster, kiln_ns: &str, name: &str, phase: BuildPhase) {
    let api = f.api();
    let start = Instant::now();
    loop {
        let ib = api.get(name).await.unwrap();
        if ib.status.as_ref().and_then(|s| s.phase) == Some(phase) {
            return;
        }
        if start.elapsed() > Duration::from_secs(120) {
            panic!(
                "{name} did not reach {phase:?}; status {}\nkiln pods:\n{}",
                serde_json::to_string_pretty(&ib.status).unwrap(),
                c.pod_logs(kiln_ns)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Every object of these kinds in `ns` (or cluster-wide with `None`) whose name
/// contains `needle`.
fn left(c: &Cluster, kinds: &str, ns: Option<&str>, needle: &str) -> Vec<String> {
    let mut args = vec!["get", kinds, "-o", "name"];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    c.kubectl(&args)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// `helm install` runs kiln in a Pod (Deployment Available: its probes pass); it
/// builds with the null builder against the test sshd and with amazon-ebs against
/// the EC2 server, both reached from the Pod; its metrics are scraped through its
/// Service; `helm uninstall` leaves only the CRDs and the released leader Lease.
#[tokio::test(flavor = "multi_thread")]
async fn helm_installs_kiln_as_a_pod_that_builds_and_uninstalls_clean() {
    let Some(c) = cluster() else { return };
    let _g = SERIAL.lock().await;
    image(&c);
    let mut a = Aws::new("cl-helm").await;
    a.f.operator.kill();
    let f = &a.f;
    let release = format!("r{}", short_id());
    let kiln_ns = format!("kiln-{release}");
    let started = Instant::now();
    c.install(
        &release,
        &kiln_ns,
        &[
            format!("watchNamespaces[0]={}", f.ns),
            format!("aws.allowedEndpoints[0]={}", c.get("KILN_POD_EC2_ENDPOINT")),
        ],
    );
    let deploy = format!("{release}-kiln");
    c.kubectl(&[
        "wait",
        "--for=condition=Available",
        &format!("deploy/{deploy}"),
        "-n",
        &kiln_ns,
        "--timeout=120s",
    ]);
    eprintln!("helm install → Available in {:?}", started.elapsed());

    f.create(&pod_null_build(f, &c, "null", &["echo hello from the pod"]))
        .await
        .unwrap();
    let mut ebs = a.build(
        "ebs",
        json!({"endpoint": c.get("KILN_POD_EC2_ENDPOINT")}),
        json!([{"shell": {"inline": ["true"]}}]),
    );
    ebs["spec"]["communicator"]["ssh"]["host"] = json!(c.get("KILN_POD_SSH_HOST"));
    ebs["spec"]["communicator"]["ssh"]["port"] =
        json!(c.get("KILN_POD_SSH_PORT").parse::<u16>().unwrap());
    f.create(&ebs).await.unwrap();
    wait_phase(f, &c, &kiln_ns, "null", BuildPhase::Succeeded).await;
    wait_phase(f, &c, &kiln_ns, "ebs", BuildPhase::Succeeded).await;
    let ib = f.api().get("ebs").await.unwrap();
    let st = ib.status.clone().unwrap();
    assert!(st.artifacts.iter().any(|a| a.image_id.is_some()), "{st:?}");
    let leaks = a.leaks(&ib.uid().unwrap(), &["us-east-1"]).await;
    assert!(leaks.is_empty(), "{leaks:?}");

    // Scraped through the Service, as Prometheus would.
    let metrics = c.kubectl(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/{kiln_ns}/services/{deploy}-metrics:metrics/proxy/metrics"),
    ]);
    assert!(
        metrics.contains("kiln_builds{phase=\"Succeeded\"} 2"),
        "{}",
        common::tail(&metrics, 30)
    );

    // Deleting the builds while kiln runs: their finalizers are released.
    for name in ["null", "ebs"] {
        f.api().delete(name, &Default::default()).await.unwrap();
        f.wait_gone(name, Duration::from_secs(60)).await;
    }
    c.ok(
        "helm",
        &["uninstall", &release, "-n", &kiln_ns, "--wait"],
        None,
    );
    // The Pod terminates after uninstall returns: give it its grace period.
    let lease_only = vec![format!("lease.coordination.k8s.io/{deploy}-leader")];
    let start = Instant::now();
    loop {
        let in_ns = left(
            &c,
            "deploy,rs,pods,svc,sa,roles,rolebindings,configmaps,secrets,leases",
            Some(&kiln_ns),
            &release,
        );
        if in_ns == lease_only {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "left in {kiln_ns}: {in_ns:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cluster_wide = left(&c, "clusterroles,clusterrolebindings", None, &release);
    assert!(cluster_wide.is_empty(), "{cluster_wide:?}");
    for crd in ["imagebuilds.kiln.dev", "imagepipelines.kiln.dev"] {
        c.kubectl(&["get", "crd", crd]);
    }
    // The Lease is kiln's, not the chart's: it stays, released or, when the
    // chart's RBAC went before the Pod could release it, expiring on its own.
    let lease = c.json(&["get", "lease", &format!("{deploy}-leader"), "-n", &kiln_ns]);
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default();
    assert!(
        holder.is_empty() || holder.starts_with(&deploy),
        "the Lease names someone else: {lease}"
    );
    c.kubectl(&["delete", "ns", &kiln_ns, "--wait=false"]);
}

/// Two replicas from the chart: the leader Pod is deleted mid-build; the other
/// takes over within the lease, the build finishes, and its long shell step ran
/// to its end exactly once (nothing ran twice at once).
#[tokio::test(flavor = "multi_thread")]
async fn the_standby_pod_takes_over_a_running_build_from_a_deleted_leader() {
    let Some(c) = cluster() else { return };
    let _g = SERIAL.lock().await;
    image(&c);
    let mut f = Fixture::new("cl-ha").await;
    f.operator.kill();
    let release = format!("r{}", short_id());
    let kiln_ns = format!("kiln-{release}");
    c.install(
        &release,
        &kiln_ns,
        &[
            format!("watchNamespaces[0]={}", f.ns),
            "replicaCount=2".to_string(),
        ],
    );
    let deploy = format!("{release}-kiln");
    let lease_name = format!("{deploy}-leader");
    let holder = |c: &Cluster| {
        let l = c.json(&["get", "lease", &lease_name, "-n", &kiln_ns]);
        l["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let first = wait_until(Duration::from_secs(60), "a leader", || async {
        Some(holder(&c)).filter(|h| !h.is_empty())
    })
    .await;

    let done = f.host_dir.join("done");
    let script = format!("sleep 12; echo done >> {}", done.display());
    f.create(&pod_null_build(&f, &c, "long", &[&script]))
        .await
        .unwrap();
    let api = f.api();
    wait_until(Duration::from_secs(60), "the shell step to run", || async {
        let ib = api.get("long").await.ok()?;
        let st = ib.status?;
        st.steps
            .iter()
            .any(|s| s.name == "shell-1" && s.phase == StepPhase::Running)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deleted = Instant::now();
    c.kubectl(&["delete", "pod", &first, "-n", &kiln_ns, "--wait=false"]);
    let second = wait_until(Duration::from_secs(60), "another leader", || async {
        Some(holder(&c)).filter(|h| !h.is_empty() && *h != first)
    })
    .await;
    let took = deleted.elapsed();
    eprintln!("leader {first} deleted; {second} leads after {took:?}");
    assert!(took < Duration::from_secs(15 + 5), "takeover took {took:?}");

    wait_phase(&f, &c, &kiln_ns, "long", BuildPhase::Succeeded).await;
    let lines = std::fs::read_to_string(&done).unwrap_or_default();
    assert_eq!(
        lines.lines().count(),
        1,
        "the step finished {:?} times",
        lines.lines().count()
    );
    let ib = api.get("long").await.unwrap();
    let shell = ib
        .status
        .unwrap()
        .steps
        .into_iter()
        .find(|s| s.name == "shell-1")
        .unwrap();
    assert!(shell.attempts >= 2, "the new leader resumed it: {shell:?}");

    c.ok(
        "helm",
        &["uninstall", &release, "-n", &kiln_ns, "--wait"],
        None,
    );
    c.kubectl(&["delete", "ns", &kiln_ns, "--wait=false"]);
}

/// `kubectl apply -k config/`: the plain manifests run kiln in a Pod that builds;
/// deleting what they made (but the CRDs, which would take every ImageBuild with
/// them) leaves nothing.
#[tokio::test(flavor = "multi_thread")]
async fn kustomize_installs_kiln_as_a_pod_that_builds() {
    let Some(c) = cluster() else { return };
    let _g = SERIAL.lock().await;
    image(&c);
    let mut f = Fixture::new("cl-kust").await;
    f.operator.kill();
    c.kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-k",
        "config/",
    ]);
    c.kubectl(&[
        "wait",
        "--for=condition=Available",
        "deploy/kiln",
        "-n",
        "kiln-system",
        "--timeout=120s",
    ]);
    f.create(&pod_null_build(&f, &c, "kust", &["true"]))
        .await
        .unwrap();
    wait_phase(&f, &c, "kiln-system", "kust", BuildPhase::Succeeded).await;
    f.api().delete("kust", &Default::default()).await.unwrap();
    f.wait_gone("kust", Duration::from_secs(60)).await;

    let rendered = c.kubectl(&["kustomize", "config/"]);
    let without_crds: Vec<&str> = rendered
        .split("\n---\n")
        .filter(|d| !d.contains("kind: CustomResourceDefinition"))
        .collect();
    c.ok(
        "kubectl",
        &["delete", "--wait", "-f", "-"],
        Some(&without_crds.join("\n---\n")),
    );
    wait_until(Duration::from_secs(120), "kiln-system gone", || async {
        let out = c.run("kubectl", &["get", "ns", "kiln-system"], None);
        (!out.status.success()).then_some(())
    })
    .await;
    let cluster_wide = left(&c, "clusterroles,clusterrolebindings", None, "kiln");
    let ours: Vec<&String> = cluster_wide
        .iter()
        .filter(|n| n.ends_with("/kiln"))
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
    // The test environment's own operator account lives in kiln-system too: back.
    common::install(&f.env).await;
}

/// `KILN_DEMO_MODE=cluster examples/demo.sh`: the demo's amazon-ebs build, run by
/// kiln as a Pod installed by the chart, reaches its AMI line; the demo then
/// uninstalls what it installed and leaves the servers (already running) alone.
#[tokio::test(flavor = "multi_thread")]
async fn the_demo_runs_its_build_from_a_pod_in_cluster_mode() {
    let Some(c) = cluster() else { return };
    let _g = SERIAL.lock().await;
    let ns = format!("demo-cl-{}", short_id());
    let started = Instant::now();
    let out = Command::new("bash")
        .arg("examples/demo.sh")
        .current_dir(repo_root())
        .env("KILN_TEST_ENV", c.get("KILN_TEST_ENV"))
        .env("KILN_BIN", env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_DEMO_MODE", "cluster")
        .env("KILN_DEMO_NAMESPACE", &ns)
        .env("KILN_DEMO_EXIT", "1")
        .env("KILN_DEMO_TIMEOUT", "300")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("AMI: ami-"), "{last:?}\n{stderr}");
    assert!(stdout.contains("kiln runs as a Pod"), "{stdout}");
    eprintln!("cluster demo: {:?}", started.elapsed());
    // What the demo installed is gone; the servers it found running still run.
    let releases = c.kubectl(&["get", "deploy", "-A", "-o", "name"]);
    assert!(!releases.contains(&format!("kiln-op-{ns}")), "{releases}");
    c.kubectl(&["get", "nodes"]);
}
