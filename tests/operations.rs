//! Running kiln like an operator: /metrics, /healthz and /readyz during a build, a shell
//! step resumed after a SIGKILL, and leader election between two replicas with a
//! SIGKILLed leader, against the real apiserver and sshd.

mod common;

use std::time::{Duration, Instant};

use common::{Fixture, Operator, wait_until};
use k8s_openapi::api::coordination::v1::Lease;
use kiln::api::{BuildPhase, StepPhase};
use kube::Api;
use serde_json::json;

const RUNNING: &str = r#"kiln_builds{phase="Running"}"#;
const SUCCEEDED: &str = r#"kiln_builds{phase="Succeeded"}"#;
const RECONCILES_OK: &str = r#"kiln_reconciles_total{controller="imagebuild",result="ok"}"#;
const SESSIONS: &str = "kiln_ssh_sessions_open";
const LEADER: &str = "kiln_leader";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_probes_follow_a_build() {
    let fx = Fixture::new("metrics").await;
    let op = &fx.operator;
    let (code, _) = wait_until(
        Duration::from_secs(20),
        "operator serving /readyz",
        || async { op.http_get("/readyz").await.ok().filter(|(c, _)| *c == 200) },
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(op.http_get("/healthz").await.expect("healthz").0, 200);
    assert_eq!(op.http_get("/nope").await.expect("404").0, 404);
    assert_eq!(op.metric(RECONCILES_OK).await, 0.0);
    assert_eq!(
        op.metric(LEADER).await,
        1.0,
        "no leader election: always active"
    );

    let marker = fx.host_dir.join("running");
    let build = fx.null_build(
        "scraped",
        json!([
            {"shell": {"inline": [format!("touch {}; sleep 3", marker.display())]}},
            {"shell": {"inline": ["true"]}},
        ]),
    );
    fx.create(&build).await.expect("create");

    // While the first provisioner runs: one build Running, one SSH session open.
    wait_until(
        Duration::from_secs(30),
        "first provisioner running",
        || async { marker.exists().then_some(()) },
    )
    .await;
    let during = op.http_get("/metrics").await.expect("scrape").1;
    println!("--- /metrics during the build ---\n{during}");
    assert_eq!(common::parse_metric(&during, RUNNING), 1.0, "{during}");
    assert!(common::parse_metric(&during, SESSIONS) >= 1.0, "{during}");
    assert!(
        common::parse_metric(&during, RECONCILES_OK) >= 1.0,
        "{during}"
    );

    let ib = fx
        .wait_phase("scraped", BuildPhase::Succeeded, Duration::from_secs(60))
        .await;
    let steps = &ib.status.as_ref().expect("status").steps;
    let after = wait_until(Duration::from_secs(10), "gauges to settle", || async {
        let text = op.http_get("/metrics").await.ok()?.1;
        (common::parse_metric(&text, SUCCEEDED) == 1.0
            && common::parse_metric(&text, RUNNING) == 0.0
            && common::parse_metric(&text, SESSIONS) == 0.0)
            .then_some(text)
    })
    .await;
    println!("--- /metrics after the build ---\n{after}");
    let m = |s: &str| common::parse_metric(&after, s);
    assert!(m(RECONCILES_OK) > common::parse_metric(&during, RECONCILES_OK));
    assert_eq!(
        m(r#"kiln_step_duration_seconds_count{builder="null",step="shell",result="succeeded"}"#),
        2.0
    );
    assert_eq!(
        m(r#"kiln_step_duration_seconds_count{builder="null",step="connect",result="succeeded"}"#),
        1.0
    );
    // The first shell step slept 3 s.
    assert!(
        m(r#"kiln_step_duration_seconds_sum{builder="null",step="shell",result="succeeded"}"#)
            >= 3.0
    );
    assert_eq!(
        m("kiln_step_transition_seconds_count"),
        (steps.len() - 1) as f64
    );
    assert!(m(r#"kiln_reconcile_duration_seconds_count{controller="imagebuild"}"#) >= 1.0);
    assert!(m("kiln_status_writes_total") >= steps.len() as f64);
    // One SSH connection for the build: connect's, kept for both shell steps.
    assert_eq!(m("kiln_ssh_connections_total"), 1.0, "{after}");
    // No per-object labels: neither the build's name nor its namespace is a label value.
    assert!(
        !after.contains("scraped") && !after.contains(&fx.ns),
        "object names in metrics:\n{after}"
    );
}

fn leader_args<'a>(lease: &'a str, identity: &'a str) -> [&'a str; 9] {
    [
        "--leader-elect",
        "--leader-election-namespace",
        "kiln-system",
        "--lease-name",
        lease,
        "--lease-duration-seconds",
        "6",
        "--leader-identity",
        identity,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_fails_over_to_the_standby() {
    let mut fx = Fixture::new("leader").await;
    fx.operator.kill();
    let lease_name = format!("kiln-leader-{}", fx.ns);
    let logs = fx.env.dir.join("logs");
    let mut a = Operator::start_with(
        &fx.operator_kubeconfig,
        &fx.ns,
        &logs.join(format!("{}-a.log", fx.ns)),
        &leader_args(&lease_name, "replica-a"),
    );
    wait_until(Duration::from_secs(30), "replica a to lead", || async {
        (a.http_get("/metrics")
            .await
            .ok()
            .map(|(_, b)| common::parse_metric(&b, LEADER))
            == Some(1.0))
        .then_some(())
    })
    .await;
    let mut b = Operator::start_with(
        &fx.operator_kubeconfig,
        &fx.ns,
        &logs.join(format!("{}-b.log", fx.ns)),
        &leader_args(&lease_name, "replica-b"),
    );
    wait_until(
        Duration::from_secs(20),
        "replica b ready as standby",
        || async { b.http_get("/readyz").await.ok().filter(|(c, _)| *c == 200) },
    )
    .await;

    let leases: Api<Lease> = Api::namespaced(fx.client.clone(), "kiln-system");
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert_eq!(
        holder(leases.get(&lease_name).await.expect("lease")),
        "replica-a"
    );

    // Three builds whose first provisioner is still running when the leader dies, and
    // still would be when the standby takes over (at most 7.5 s later).
    let names = ["one", "two", "three"];
    for name in names {
        let marker = fx.host_dir.join(format!("{name}-started"));
        let done = fx.host_dir.join(format!("{name}-done"));
        let build = fx.null_build(
            name,
            json!([
                {"shell": {"inline": [format!("touch {}; sleep 12; echo x >> {}", marker.display(), done.display())]}},
                {"shell": {"inline": ["true"]}},
            ]),
        );
        fx.create(&build).await.expect("create");
    }
    wait_until(
        Duration::from_secs(30),
        "all first provisioners running",
        || async {
            names
                .iter()
                .all(|n| fx.host_dir.join(format!("{n}-started")).exists())
                .then_some(())
        },
    )
    .await;
    assert!(a.metric(RECONCILES_OK).await > 0.0);
    assert_eq!(
        b.metric(RECONCILES_OK).await,
        0.0,
        "the standby reconciled:\n{}",
        b.logs()
    );
    assert_eq!(b.metric(LEADER).await, 0.0);

    let killed = Instant::now();
    a.kill();
    let took = wait_until(
        Duration::from_secs(30),
        "replica b to take over",
        || async { (b.metric(LEADER).await == 1.0).then(|| killed.elapsed()) },
    )
    .await;
    println!("takeover after SIGKILL of the leader: {took:?}");
    assert!(
        took <= Duration::from_secs(6) + Duration::from_millis(1500),
        "takeover took {took:?}, lease duration 6 s"
    );
    assert_eq!(
        holder(leases.get(&lease_name).await.expect("lease")),
        "replica-b"
    );

    for name in names {
        let ib = fx
            .wait_phase(name, BuildPhase::Succeeded, Duration::from_secs(60))
            .await;
        let steps = &ib.status.as_ref().expect("status").steps;
        assert!(
            steps.iter().all(|s| s.phase == StepPhase::Succeeded),
            "{steps:?}"
        );
        let shell1 = steps.iter().find(|s| s.name == "shell-1").expect("shell-1");
        assert_eq!(shell1.attempts, 2, "{name}: resumed once by the new leader");
        // The new leader stopped the old leader's run before its own: one ran to the end.
        let done =
            std::fs::read_to_string(fx.host_dir.join(format!("{name}-done"))).unwrap_or_default();
        assert_eq!(
            done.lines().count(),
            1,
            "{name}: the script ran to its end {} times",
            done.lines().count()
        );
    }
    assert!(b.metric(RECONCILES_OK).await > 0.0);

    // A graceful stop releases the lease; the standby takes it when it next looks,
    // at the latest when the lease it last saw would have expired.
    let mut c = Operator::start_with(
        &fx.operator_kubeconfig,
        &fx.ns,
        &logs.join(format!("{}-c.log", fx.ns)),
        &leader_args(&lease_name, "replica-c"),
    );
    wait_until(
        Duration::from_secs(20),
        "replica c ready as standby",
        || async {
            c.http_get("/readyz")
                .await
                .ok()
                .filter(|(code, _)| *code == 200)
        },
    )
    .await;
    let stopped = Instant::now();
    assert!(b.terminate().success(), "{}", b.logs());
    let after_stop = holder(leases.get(&lease_name).await.expect("lease"));
    assert_ne!(after_stop, "replica-b", "the lease was not released");
    let handover = wait_until(
        Duration::from_secs(30),
        "replica c to take over",
        || async { (c.metric(LEADER).await == 1.0).then(|| stopped.elapsed()) },
    )
    .await;
    println!("handover after SIGTERM of the leader: {handover:?}");
    assert!(
        b.logs().contains("released the leader lease"),
        "{}",
        b.logs()
    );
    assert!(
        handover <= Duration::from_secs(6) + Duration::from_millis(1500),
        "handover took {handover:?}, lease duration 6 s"
    );
    assert!(c.is_running());
}

/// Whether a process of this PID exists on this host (the test sshd's build machine).
fn alive(pid: &str) -> bool {
    std::path::Path::new("/proc").join(pid.trim()).exists()
}

/// SIGKILL leaves the operator no chance to stop the remote script, and sshd keeps a
/// command without a pty running after its client is gone. The restarted operator
/// resumes the step; the resumed run must stop the first one before it starts, so
/// that the script runs to its end exactly once, and leave nothing of it behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_shell_step_stops_the_run_the_killed_operator_left() {
    let mut fx = Fixture::new("resume-shell").await;
    let dir = fx.host_dir.display().to_string();
    // On a command line of the first run's processes, for pgrep; `; :` keeps that
    // shell from exec'ing `sleep`.
    let marker = format!("kiln-it-sleeper-{}", common::short_id());
    let build = fx.null_build(
        "once",
        json!([{"shell": {"inline": [
            format!("echo $$ >> {dir}/starts"),
            format!("dirname \"$0\" >> {dir}/dirs"),
            format!("stat -c %a \"$(dirname \"$0\")\" >> {dir}/modes"),
            format!("sh -c 'sleep 10; :' {marker}"),
            format!("echo $$ >> {dir}/dones"),
        ]}}]),
    );
    fx.create(&build).await.expect("create");
    let starts = fx.host_dir.join("starts");
    let lines = |path: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let first = wait_until(
        Duration::from_secs(30),
        "the first run to start",
        || async { lines(&starts).first().cloned() },
    )
    .await;
    // Inside the sleep, before the operator dies.
    tokio::time::sleep(Duration::from_millis(500)).await;
    fx.operator.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        alive(&first),
        "the first run did not outlive the operator: the test shows nothing"
    );

    fx.restart_operator();
    let second = wait_until(
        Duration::from_secs(30),
        "the resumed run to start",
        || async { lines(&starts).get(1).cloned() },
    )
    .await;
    assert!(
        !alive(&first),
        "the first run (pid {first}) still runs beside the resumed one ({second})"
    );
    let ib = fx
        .wait_phase("once", BuildPhase::Succeeded, Duration::from_secs(60))
        .await;
    let steps = &ib.status.as_ref().expect("status").steps;
    assert_eq!(steps[1].attempts, 2, "{:?}", steps[1]);
    assert_eq!(lines(&starts), [first.clone(), second.clone()]);
    assert_eq!(
        lines(&fx.host_dir.join("dones")),
        [second],
        "the script ran to its end other than once, in the resumed run"
    );
    let left = std::process::Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .expect("pgrep");
    assert!(
        left.stdout.is_empty(),
        "processes of a run are left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    // Each run had a private directory of its own, and none is left.
    let dirs = lines(&fx.host_dir.join("dirs"));
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    assert_ne!(dirs[0], dirs[1]);
    assert_eq!(lines(&fx.host_dir.join("modes")), ["700", "700"]);
    for d in &dirs {
        assert!(!std::path::Path::new(d).exists(), "{d} is left");
    }
}

/// A sole replica reports ready only once its controller has listed the ImageBuilds
/// it watches: here it cannot reach the apiserver, so it serves /healthz but not
/// /readyz.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_controller_has_listed_what_it_watches() {
    let fx = Fixture::new("readyz").await;
    let kubeconfig = std::fs::read_to_string(&fx.operator_kubeconfig).expect("kubeconfig");
    // Port 1 on loopback refuses connections.
    let unreachable: String = kubeconfig
        .lines()
        .map(|l| match l.split_once("server:") {
            Some((indent, _)) => format!("{indent}server: https://127.0.0.1:1\n"),
            None => format!("{l}\n"),
        })
        .collect();
    assert_ne!(unreachable, kubeconfig, "no server line in the kubeconfig");
    let path = fx.env.dir.join(format!("unreachable-{}.kubeconfig", fx.ns));
    std::fs::write(&path, unreachable).expect("write kubeconfig");
    let mut op = Operator::start_with(
        &path,
        &fx.ns,
        &fx.env
            .dir
            .join("logs")
            .join(format!("{}-unreachable.log", fx.ns)),
        &[],
    );
    wait_until(Duration::from_secs(20), "/healthz to answer", || async {
        op.http_get("/healthz")
            .await
            .ok()
            .filter(|(c, _)| *c == 200)
    })
    .await;
    for _ in 0..10 {
        assert_eq!(op.http_get("/readyz").await.expect("readyz").0, 503);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    op.kill();
    // The fixture's operator reaches the apiserver: ready.
    wait_until(
        Duration::from_secs(20),
        "the fixture's operator ready",
        || async {
            fx.operator
                .http_get("/readyz")
                .await
                .ok()
                .filter(|(c, _)| *c == 200)
        },
    )
    .await;
}
