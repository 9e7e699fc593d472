//! What GitOps tools read from an ImageBuild: `kubectl wait --for=condition=Ready`
//! returns only once the current generation's build is done, and kstatus' rules
//! (as Flux applies them to any custom resource) give the right answer in every
//! status the build passes through. Against the real apiserver and sshd.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fixture, condition};
use futures::TryStreamExt;
use kiln::api::{BuildPhase, ImageBuild};
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::json;

fn kubectl_wait(fx: &Fixture, name: &str) -> Child {
    Command::new("kubectl")
        .args([
            "wait",
            "--for=condition=Ready",
            "--timeout=90s",
            "-n",
            &fx.ns,
        ])
        .arg(format!("imagebuild/{name}"))
        .env("KUBECONFIG", &fx.env.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl (tests/env/up.sh puts it on PATH)")
}

fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().expect("kubectl wait");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_wait_returns_only_for_the_current_generation() {
    let mut fx = Fixture::new("kwait").await;
    let gen1 = fx.host_dir.join("gen1");
    let gen2 = fx.host_dir.join("gen2");
    let build = fx.null_build(
        "waited",
        json!([{"shell": {"inline": [format!("sleep 2; touch {}", gen1.display())]}}]),
    );
    fx.create(&build).await.expect("create");
    let t = Instant::now();
    let (ok, out) = finish(kubectl_wait(&fx, "waited"));
    assert!(ok, "{out}");
    let ib = fx.api().get("waited").await.expect("get");
    let st = ib.status.as_ref().expect("status");
    println!("generation 1 ready after {:?}: {out}", t.elapsed());
    assert_eq!(st.phase, Some(BuildPhase::Succeeded));
    assert!(
        gen1.exists(),
        "kubectl wait returned before the provisioner ran"
    );

    // With the operator stopped, a spec change leaves status saying Ready=True for
    // generation 1: kubectl must see the condition's observedGeneration is stale.
    fx.operator.kill();
    fx.api()
        .patch(
            "waited",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"provisioners": [
                {"shell": {"inline": [format!("sleep 2; touch {}", gen2.display())]}}
            ]}})),
        )
        .await
        .expect("patch spec");
    let ib = fx.api().get("waited").await.expect("get");
    assert_eq!(ib.metadata.generation, Some(2));
    assert_eq!(condition(&ib, "Ready").as_deref(), Some("True"));
    let mut waiting = kubectl_wait(&fx, "waited");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        waiting.try_wait().expect("poll kubectl").is_none(),
        "kubectl wait returned on generation 1's Ready condition"
    );

    fx.restart_operator();
    let t = Instant::now();
    let (ok, out) = tokio::task::spawn_blocking(move || finish(waiting))
        .await
        .expect("join");
    assert!(ok, "{out}");
    println!("generation 2 ready after {:?}: {out}", t.elapsed());
    let ib = fx.api().get("waited").await.expect("get");
    let st = ib.status.as_ref().expect("status");
    assert_eq!(st.observed_generation, Some(2));
    assert_eq!(st.phase, Some(BuildPhase::Succeeded));
    assert!(
        gen2.exists(),
        "kubectl wait returned before generation 2 ran"
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KStatus {
    InProgress,
    Failed,
    Current,
}

/// kstatus' generic rules for a custom resource (sigs.k8s.io/cli-utils/pkg/kstatus,
/// which Flux uses for health checks): a stale observedGeneration or Reconciling=True
/// is InProgress, Stalled=True is Failed, anything else is Current.
fn kstatus(ib: &ImageBuild) -> KStatus {
    let Some(st) = &ib.status else {
        return KStatus::InProgress;
    };
    if st.observed_generation != ib.metadata.generation {
        return KStatus::InProgress;
    }
    if condition(ib, "Reconciling").as_deref() == Some("True") {
        return KStatus::InProgress;
    }
    if condition(ib, "Stalled").as_deref() == Some("True") {
        return KStatus::Failed;
    }
    KStatus::Current
}

/// What kstatus must say for a build in `phase`.
fn expected(phase: Option<BuildPhase>) -> KStatus {
    match phase {
        Some(BuildPhase::Succeeded) => KStatus::Current,
        Some(BuildPhase::Failed) => KStatus::Failed,
        _ => KStatus::InProgress,
    }
}

/// Records every version of the object, from before `trigger` runs until `done`
/// holds for one.
async fn record<T>(
    fx: &Fixture,
    name: &str,
    trigger: impl std::future::Future<Output = T>,
    done: impl Fn(&ImageBuild) -> bool,
) -> (Vec<ImageBuild>, T) {
    let stream = watcher(
        fx.api(),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    );
    let mut stream = std::pin::pin!(stream);
    // The initial list completes before the trigger, so no version after it is missed.
    let mut seen = Vec::new();
    loop {
        match stream.try_next().await.expect("watch") {
            Some(watcher::Event::InitDone) => break,
            Some(watcher::Event::InitApply(ib)) => seen.push(ib),
            Some(_) => {}
            None => panic!("watch ended"),
        }
    }
    let out = trigger.await;
    let deadline = tokio::time::sleep(Duration::from_secs(90));
    tokio::pin!(deadline);
    while !seen.last().is_some_and(&done) {
        tokio::select! {
            next = stream.try_next() => match next.expect("watch") {
                Some(watcher::Event::Apply(ib)) => seen.push(ib),
                Some(_) => {}
                None => panic!("watch ended"),
            },
            () = &mut deadline => panic!("timed out; saw {} versions", seen.len()),
        }
    }
    (seen, out)
}

fn check(seen: &[ImageBuild]) -> Vec<(Option<BuildPhase>, KStatus)> {
    let mut trace: Vec<(Option<BuildPhase>, KStatus)> = Vec::new();
    for ib in seen {
        let phase = ib.status.as_ref().and_then(|s| s.phase);
        let got = kstatus(ib);
        let stale =
            ib.status.as_ref().and_then(|s| s.observed_generation) != ib.metadata.generation;
        let want = if stale {
            KStatus::InProgress
        } else {
            expected(phase)
        };
        assert_eq!(
            got,
            want,
            "phase {phase:?}, generation {:?}, status {}",
            ib.metadata.generation,
            serde_json::to_string(&ib.status).unwrap_or_default()
        );
        if trace.last() != Some(&(phase, got)) {
            trace.push((phase, got));
        }
    }
    trace
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kstatus_rules_hold_in_every_phase() {
    let fx = Fixture::new("kstatus").await;
    let phase_is = |p: BuildPhase| {
        move |ib: &ImageBuild| {
            ib.status.as_ref().and_then(|s| s.phase) == Some(p)
                && ib.status.as_ref().and_then(|s| s.observed_generation) == ib.metadata.generation
        }
    };

    // Success, then a spec change (a new generation), then a failure.
    let build = fx.null_build("traced", json!([{"shell": {"inline": ["sleep 1"]}}]));
    let (seen, created) = record(
        &fx,
        "traced",
        fx.create(&build),
        phase_is(BuildPhase::Succeeded),
    )
    .await;
    created.expect("create");
    let trace = check(&seen);
    println!("success: {trace:?}");
    assert!(
        trace.contains(&(Some(BuildPhase::Running), KStatus::InProgress)),
        "{trace:?}"
    );
    assert_eq!(
        trace.last(),
        Some(&(Some(BuildPhase::Succeeded), KStatus::Current))
    );

    let api = fx.api();
    let params = PatchParams::default();
    let body = Patch::Merge(
        json!({"spec": {"provisioners": [{"shell": {"inline": ["sleep 1; exit 3"]}}]}}),
    );
    let patch = api.patch("traced", &params, &body);
    let (seen, patched) = record(&fx, "traced", patch, phase_is(BuildPhase::Failed)).await;
    patched.expect("patch");
    let trace = check(&seen);
    println!("new generation that fails: {trace:?}");
    // The first versions after the patch still carry generation 1's Succeeded status:
    // kstatus must call them InProgress, not Current.
    let stale_succeeded = seen.iter().any(|ib| {
        ib.metadata.generation == Some(2)
            && ib.status.as_ref().and_then(|s| s.observed_generation) == Some(1)
            && kstatus(ib) == KStatus::InProgress
    });
    assert!(stale_succeeded, "no stale version seen: {trace:?}");
    assert!(
        trace.contains(&(Some(BuildPhase::Running), KStatus::InProgress)),
        "{trace:?}"
    );
    assert_eq!(
        trace.last(),
        Some(&(Some(BuildPhase::Failed), KStatus::Failed))
    );
}
