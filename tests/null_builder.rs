//! The null builder end to end against the real apiserver and OpenSSH sshd.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{Fixture, condition, tail, wait_until};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kiln::api::{BuildPhase, CleanupPhase, StepPhase};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_and_file_provisioners_build_and_report_every_step() {
    let f = Fixture::new("happy").await;
    let dir = f.host_dir.display().to_string();
    let secret_value = format!("s3cr3t-{}", common::short_id());
    let secret_digest = {
        use std::io::Write;
        let mut c = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sha256sum");
        c.stdin
            .take()
            .expect("stdin")
            .write_all(secret_value.as_bytes())
            .expect("write");
        let out = c.wait_with_output().expect("sha256sum");
        String::from_utf8_lossy(&out.stdout)[..64].to_string()
    };
    let cms: Api<ConfigMap> = Api::namespaced(f.client.clone(), &f.ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "app"},
            "data": {
                "app.conf": "listen = 8080\n",
                "setup.sh": format!("#!/bin/sh\necho from-configmap > {dir}/script.out\n"),
            }
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let secrets: Api<Secret> = Api::namespaced(f.client.clone(), &f.ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "app-secret"},
                "stringData": {"token": secret_value},
            }))
            .unwrap(),
        )
        .await
        .unwrap();

    let build = f.null_build(
        "web",
        json!([
            {"shell": {
                "inline": [
                    format!("echo \"hello $GREETING from $KILN_BUILD_NAME\" > {dir}/shell.out"),
                    format!("echo \"$KILN_BUILD_NAMESPACE $KILN_BUILDER $KILN_HOST $KILN_BUILD_UID\" >> {dir}/shell.out"),
                    // Compare a digest: the spec (and so status.buildSpec) must not hold the value.
                    format!("test \"$(printf %s \"$API_TOKEN\" | sha256sum | cut -c1-64)\" = '{secret_digest}' && echo token-ok >> {dir}/shell.out"),
                    "echo \"the token is $API_TOKEN\"",
                ],
                "env": [
                    {"name": "GREETING", "value": "hi"},
                    {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "app-secret", "key": "token"}}},
                ],
                "timeout": "1m",
            }},
            {"file": {
                "destination": format!("{dir}/app.conf"),
                "from": {"configMapKeyRef": {"name": "app", "key": "app.conf"}},
                "mode": "0640",
            }},
            {"file": {
                "destination": format!("{dir}/token"),
                "from": {"secretKeyRef": {"name": "app-secret", "key": "token"}},
                "mode": "0600",
            }},
            {"shell": {"scriptFrom": {"configMapKeyRef": {"name": "app", "key": "setup.sh"}}}},
        ]),
    );
    let created = f.create(&build).await.unwrap();
    let ib = f
        .wait_phase("web", BuildPhase::Succeeded, Duration::from_secs(60))
        .await;

    // What the provisioners did is on the host.
    let out = read(&f.host_dir.join("shell.out"));
    assert!(out.contains("hello hi from web"), "{out}");
    assert!(
        out.contains(&format!(
            "{} null {} {}",
            f.ns,
            f.env.ssh_host,
            created.uid().unwrap()
        )),
        "{out}"
    );
    assert!(out.contains("token-ok"), "{out}");
    assert_eq!(read(&f.host_dir.join("app.conf")), "listen = 8080\n");
    let mode = std::fs::metadata(f.host_dir.join("app.conf"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640);
    assert_eq!(read(&f.host_dir.join("token")), secret_value);
    assert_eq!(
        read(&f.host_dir.join("script.out")).trim(),
        "from-configmap"
    );

    // Every step is recorded, once.
    let st = ib.status.clone().unwrap();
    let names: Vec<_> = st.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["connect", "shell-1", "file-2", "file-3", "shell-4"]);
    for s in &st.steps {
        assert_eq!(s.phase, StepPhase::Succeeded, "{s:?}");
        assert_eq!(s.attempts, 1, "{s:?}");
        assert!(s.started_at.is_some() && s.finished_at.is_some(), "{s:?}");
        assert_eq!(s.cleanup, CleanupPhase::NotNeeded, "{s:?}");
    }
    assert_eq!(st.observed_generation, ib.metadata.generation);
    assert_eq!(condition(&ib, "Ready").as_deref(), Some("True"));
    assert_eq!(condition(&ib, "Reconciling").as_deref(), Some("False"));
    assert_eq!(condition(&ib, "Stalled").as_deref(), Some("False"));
    assert!(
        st.conditions
            .iter()
            .all(|c| c.observed_generation == ib.metadata.generation)
    );
    assert!(ib.finalizers().iter().any(|f| f == "kiln.dev/cleanup"));

    // Secrets appear nowhere: status, events, operator logs.
    let reasons = f.event_reasons_with(&["BuildSucceeded"]).await;
    let events = f.events().await;
    // Build-level transitions only: each step's start and end are in status, and
    // an Event per step was most of a build's apiserver writes (issue 6/6).
    assert_eq!(
        reasons,
        ["BuildStarted", "BuildSucceeded"],
        "events of a build that went well"
    );
    let private_key = read(&f.env.ssh_key);
    let key_line = private_key
        .lines()
        .find(|l| l.len() > 40 && !l.starts_with("-----"))
        .unwrap()
        .to_string();
    let status_json = serde_json::to_string(&ib.status).unwrap();
    let events_json = serde_json::to_string(&events).unwrap();
    // Give the operator a moment to flush what it logs about the final reconcile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = f.operator.logs();
    assert!(
        logs.contains("the token is <redacted>"),
        "output should be streamed, redacted:\n{}",
        tail(&logs, 40)
    );
    for (what, text) in [
        ("status", &status_json),
        ("events", &events_json),
        ("operator log", &logs),
    ] {
        assert!(
            !text.contains(&secret_value),
            "secret env value leaked into {what}"
        );
        assert!(!text.contains(&key_line), "private key leaked into {what}");
    }

    // Deleting a finished build releases the finalizer.
    f.api()
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    f.wait_gone("web", Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_command_fails_the_build_with_exit_code_and_output() {
    let f = Fixture::new("fail").await;
    let dir = f.host_dir.display().to_string();
    let build = f.null_build(
        "broken",
        json!([
            {"shell": {"inline": ["echo preparing", "echo 'disk is full' >&2", "exit 3"]}},
            {"file": {"destination": format!("{dir}/never"), "from": {"configMapKeyRef": {"name": "x", "key": "y"}}}},
        ]),
    );
    f.create(&build).await.unwrap();
    let ib = f
        .wait_phase("broken", BuildPhase::Failed, Duration::from_secs(60))
        .await;
    let st = ib.status.clone().unwrap();
    let msg = st.message.clone().unwrap();
    assert!(msg.contains("shell-1"), "{msg}");
    assert!(msg.contains("exited with code 3"), "{msg}");
    assert!(msg.contains("disk is full"), "{msg}");
    assert!(msg.contains("preparing"), "{msg}");
    assert_eq!(condition(&ib, "Stalled").as_deref(), Some("True"));
    assert_eq!(condition(&ib, "Ready").as_deref(), Some("False"));
    assert_eq!(st.steps[1].phase, StepPhase::Failed);
    assert_eq!(
        st.steps[2].phase,
        StepPhase::Pending,
        "a step after the failure must not run"
    );
    // Cleanup ran over every started step, in reverse, before the build was Failed.
    assert_eq!(st.steps[0].cleanup, CleanupPhase::NotNeeded);
    assert_eq!(st.steps[1].cleanup, CleanupPhase::NotNeeded);
    assert_eq!(st.steps[2].cleanup, CleanupPhase::Pending);
    f.event_reasons_with(&["StepFailed", "BuildFailed"]).await;
    assert!(!f.host_dir.join("never").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_operator_is_replaced_and_the_build_resumes_where_it_was() {
    let mut f = Fixture::new("resume").await;
    let dir = f.host_dir.display().to_string();
    let build = f.null_build(
        "resume",
        json!([
            {"shell": {"inline": [format!("echo run >> {dir}/first.count")]}},
            {"shell": {"inline": [format!("echo run >> {dir}/second.count"), "sleep 4", format!("echo done > {dir}/second.done")]}},
            {"shell": {"inline": [format!("echo run >> {dir}/third.count")]}},
        ]),
    );
    f.create(&build).await.unwrap();
    let api = f.api();
    let second = f.host_dir.join("second.count");
    wait_until(
        Duration::from_secs(30),
        "the long step to start",
        || async {
            let ib = api.get("resume").await.ok()?;
            let st = ib.status?;
            (st.steps.get(2)?.phase == StepPhase::Running && second.exists()).then_some(())
        },
    )
    .await;
    f.operator.kill();
    // Let the killed process's remote command finish on its own: the resumed step must
    // still be run by the new operator.
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.restart_operator();
    let ib = f
        .wait_phase("resume", BuildPhase::Succeeded, Duration::from_secs(60))
        .await;
    let st = ib.status.unwrap();
    assert_eq!(
        read(&f.host_dir.join("first.count")).lines().count(),
        1,
        "finished steps are not run again"
    );
    assert_eq!(read(&f.host_dir.join("third.count")).lines().count(), 1);
    assert_eq!(st.steps[0].attempts, 1);
    assert_eq!(st.steps[1].attempts, 1);
    assert_eq!(
        st.steps[2].attempts, 2,
        "the interrupted step was resumed: {:?}",
        st.steps[2]
    );
    assert_eq!(st.steps[3].attempts, 1);
    assert!(f.host_dir.join("second.done").exists());
    f.event_reasons_with(&["StepResumed"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_build_mid_step_stops_the_step_cleans_up_and_goes() {
    let f = Fixture::new("delete").await;
    let dir = f.host_dir.display().to_string();
    let build = f.null_build(
        "doomed",
        json!([
            {"shell": {"inline": [format!("touch {dir}/started"), "sleep 8", format!("touch {dir}/finished")]}},
        ]),
    );
    f.create(&build).await.unwrap();
    let started = f.host_dir.join("started");
    wait_until(Duration::from_secs(30), "the step to start", || async {
        started.exists().then_some(())
    })
    .await;
    let t = Instant::now();
    f.api()
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    f.wait_gone("doomed", Duration::from_secs(15)).await;
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "deletion waited for the step: {took:?}"
    );
    f.event_reasons_with(&["CleanupFinished"]).await;
    // The remote command was stopped, not left to run to the end.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(
        !f.host_dir.join("finished").exists(),
        "the remote command kept running after deletion"
    );
}

/// An operator killed while a shell step runs, then a spec without that step: the
/// superseded build's step is never resumed, so no next attempt stops its script;
/// the step's cleanup does.
#[tokio::test(flavor = "multi_thread")]
async fn a_step_no_operator_resumed_is_stopped_by_its_cleanup() {
    let mut f = Fixture::new("orphan").await;
    let dir = f.host_dir.display().to_string();
    let build = f.null_build(
        "orphan",
        json!([
            {"shell": {"inline": [format!("echo $$ > {dir}/script.pid"), "while true; do sleep 0.2; done"]}},
        ]),
    );
    f.create(&build).await.unwrap();
    let pid_file = f.host_dir.join("script.pid");
    wait_until(Duration::from_secs(30), "the script to start", || async {
        pid_file.exists().then_some(())
    })
    .await;
    let pid = read(&pid_file).trim().to_string();
    let running = std::path::Path::new("/proc").join(&pid);
    f.operator.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(running.exists(), "the script outlives the killed operator");
    // Generation 2 has no shell step: nothing would run shell-1 again.
    f.api()
        .patch(
            "orphan",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"provisioners": []}})),
        )
        .await
        .unwrap();
    f.restart_operator();
    let ib = wait_until(Duration::from_secs(60), "generation 2 built", || async {
        let ib = f.api().get("orphan").await.ok()?;
        let st = ib.status.as_ref()?;
        (st.observed_generation == Some(2) && st.phase == Some(BuildPhase::Succeeded)).then_some(ib)
    })
    .await;
    assert!(
        !running.exists(),
        "generation 1's script (pid {pid}) still runs after its build was cleaned up"
    );
    let leftovers: Vec<_> = std::fs::read_dir("/tmp")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("kiln-{}-shell-1.", ib.uid().unwrap())))
        .collect();
    assert!(
        leftovers.is_empty(),
        "attempt directories left: {leftovers:?}"
    );
}

/// Sets `$p` to the sshd process that serves the script's connection: its nearest
/// sshd ancestor (how many shells sit in between depends on which of them `exec`).
const FIND_SSHD_SESSION: &str = r#"p=$$; while [ "$p" -gt 1 ]; do case "$(ps -o comm= -p "$p")" in sshd*) break ;; esac; p=$(ps -o ppid= -p "$p" | tr -d ' '); done; [ "$p" -gt 1 ]"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_command_that_drops_the_connection_is_followed_by_a_reconnect() {
    let f = Fixture::new("reboot").await;
    let dir = f.host_dir.display().to_string();
    let build = f.null_build(
        "reboot",
        json!([
            // Killing our sshd session process is what a reboot looks like from here.
            {"shell": {"inline": [format!("touch {dir}/before"), FIND_SSHD_SESSION, "kill -9 $p", "sleep 5"], "expectDisconnect": true}},
            {"shell": {"inline": [format!("touch {dir}/after")]}},
        ]),
    );
    f.create(&build).await.unwrap();
    let ib = f
        .wait_phase("reboot", BuildPhase::Succeeded, Duration::from_secs(60))
        .await;
    assert!(f.host_dir.join("before").exists());
    assert!(f.host_dir.join("after").exists());
    let st = ib.status.unwrap();
    assert!(
        st.steps[1]
            .message
            .as_deref()
            .unwrap_or("")
            .contains("reconnected"),
        "{:?}",
        st.steps[1]
    );
}

/// `sudo reboot` with systemd queues the reboot and exits 0; the connection drops a
/// moment later. The next step must run on a new connection, made after the drop, not
/// on the one that is about to die.
#[tokio::test(flavor = "multi_thread")]
async fn an_expect_disconnect_script_that_exits_0_before_the_drop_is_followed_by_a_new_connection()
{
    let f = Fixture::new("reboot0").await;
    let dir = f.host_dir.display().to_string();
    let build = f.null_build(
        "reboot",
        json!([
            {"shell": {"inline": [
                format!("touch {dir}/before"),
                FIND_SSHD_SESSION,
                format!("echo $p > {dir}/session-1"),
                // The "reboot": the session dies 3 s after the script exited 0.
                "(sleep 3; kill -9 $p) </dev/null >/dev/null 2>&1 &",
            ], "expectDisconnect": true}},
            // Longer than the 3 s: on the old connection it would be cut off.
            {"shell": {"inline": [
                FIND_SSHD_SESSION,
                format!("echo $p > {dir}/session-2"),
                "sleep 5",
                format!("touch {dir}/after"),
            ]}},
        ]),
    );
    f.create(&build).await.unwrap();
    let ib = wait_until(Duration::from_secs(90), "the build to end", || async {
        let ib = f.api().get("reboot").await.unwrap();
        matches!(
            ib.status.as_ref().and_then(|s| s.phase),
            Some(BuildPhase::Succeeded | BuildPhase::Failed)
        )
        .then_some(ib)
    })
    .await;
    let st = ib.status.unwrap();
    assert_eq!(
        st.phase,
        Some(BuildPhase::Succeeded),
        "{:?}\n{}",
        st.message,
        tail(&f.operator.logs(), 40)
    );
    assert!(f.host_dir.join("before").exists());
    assert!(f.host_dir.join("after").exists());
    let first = read(&f.host_dir.join("session-1"));
    let second = read(&f.host_dir.join("session-2"));
    assert_ne!(
        first, second,
        "the second step ran on the first one's connection"
    );
    let msg = st.steps[1].message.as_deref().unwrap_or("");
    assert!(
        msg.contains("exited with code 0") && msg.contains("reconnected"),
        "{:?}",
        st.steps[1]
    );
    // connect's connection, then one made after the drop: none for a failed attempt.
    assert_eq!(
        f.operator.metric("kiln_ssh_connections_total").await,
        2.0,
        "{}",
        tail(&f.operator.logs(), 40)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_operator_gracefully_and_the_next_one_resumes() {
    let mut f = Fixture::new("sigterm").await;
    let dir = f.host_dir.display().to_string();
    let build = f.null_build(
        "graceful",
        json!([{"shell": {"inline": [format!("echo run >> {dir}/runs"), "sleep 3"]}}]),
    );
    f.create(&build).await.unwrap();
    let runs = f.host_dir.join("runs");
    wait_until(Duration::from_secs(30), "the step to start", || async {
        runs.exists().then_some(())
    })
    .await;
    let t = Instant::now();
    let status = f.operator.terminate();
    assert!(
        status.success(),
        "operator exit status on SIGTERM: {status:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(12),
        "shutdown took {:?}",
        t.elapsed()
    );
    // Nothing was recorded as failed: the step is still the running one.
    let ib = f.api().get("graceful").await.unwrap();
    let st = ib.status.unwrap();
    assert_eq!(st.steps[1].phase, StepPhase::Running, "{:?}", st.steps[1]);
    f.restart_operator();
    let ib = f
        .wait_phase("graceful", BuildPhase::Succeeded, Duration::from_secs(60))
        .await;
    assert_eq!(ib.status.unwrap().steps[1].attempts, 2);
    assert_eq!(read(&runs).lines().count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_script_past_its_timeout_is_stopped_and_fails_the_step() {
    let f = Fixture::new("timeout").await;
    let dir = f.host_dir.display().to_string();
    let build = f.null_build(
        "slow",
        json!([{"shell": {"inline": ["echo started", "sleep 21.7", format!("touch {dir}/finished")], "timeout": "1s"}}]),
    );
    f.create(&build).await.unwrap();
    let ib = f
        .wait_phase("slow", BuildPhase::Failed, Duration::from_secs(30))
        .await;
    let msg = ib.status.unwrap().message.unwrap();
    assert!(
        msg.contains("timed out after 1s") && msg.contains("started"),
        "{msg}"
    );
    // The remote command was killed, not abandoned.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let left = std::process::Command::new("pgrep")
        .args(["-f", "sleep 21.7"])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "remote command still running: {:?}",
        String::from_utf8_lossy(&left.stdout)
    );
    assert!(!f.host_dir.join("finished").exists());
}

/// The step's end is recorded from kiln's own last write; a label added while the
/// step ran makes that write conflict, and the build goes on from a fresh read
/// instead of deciding on what it last wrote. Nothing runs twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_by_someone_else_mid_step_is_read_before_the_next_step() {
    let f = Fixture::new("edited").await;
    let dir = f.host_dir.display().to_string();
    let build = f.null_build(
        "edited",
        json!([
            {"shell": {"inline": [format!("touch {dir}/started"), "sleep 2", format!("echo run >> {dir}/runs")]}},
            {"shell": {"inline": [format!("echo next >> {dir}/next")]}},
        ]),
    );
    f.create(&build).await.unwrap();
    let started = f.host_dir.join("started");
    wait_until(Duration::from_secs(30), "the step to start", || async {
        started.exists().then_some(())
    })
    .await;
    let patch = json!({"metadata": {"labels": {"team": "images"}}});
    f.api()
        .patch(
            "edited",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let ib = f
        .wait_phase("edited", BuildPhase::Succeeded, Duration::from_secs(60))
        .await;
    assert_eq!(read(&f.host_dir.join("runs")), "run\n");
    assert_eq!(read(&f.host_dir.join("next")), "next\n");
    for s in &ib.status.as_ref().unwrap().steps {
        assert_eq!(s.attempts, 1, "{s:?}");
    }
    assert_eq!(ib.labels().get("team").map(String::as_str), Some("images"));
    let logs = f.operator.logs();
    assert!(
        logs.contains("status changed since it was read"),
        "the step's result was not written over the newer object: {}",
        tail(&logs, 40)
    );
}
