//! What GitOps tools read from an ImageBuild: `kubectl wait --for=condition=Ready`
//! returns only once the current generation's build is done, and kstatus' rules
//! (as Flux applies them to any custom resource) give the right answer in every
//! status the build passes through. The same for an ImagePipeline through its life
//! (first build, template change, failure brake), with the Argo CD health check of
//! config/argocd/pipeline-health.lua applied to every status too. Against the real
//! apiserver and sshd.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fixture, condition};
use futures::TryStreamExt;
use kiln::api::{BuildPhase, ImageBuild, ImagePipeline};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn kubectl_wait(fx: &Fixture, name: &str) -> Child {
    kubectl_wait_for(fx, &format!("imagebuild/{name}"), "Ready")
}

/// `kubectl wait --for=condition=CONDITION` on `what` (`kind/name`).
fn kubectl_wait_for(fx: &Fixture, what: &str, condition: &str) -> Child {
    Command::new("kubectl")
        .args([
            "wait",
            &format!("--for=condition={condition}"),
            "--timeout=90s",
            "-n",
            &fx.ns,
        ])
        .arg(what)
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
async fn record<K, T>(
    api: Api<K>,
    name: &str,
    trigger: impl std::future::Future<Output = T>,
    done: impl Fn(&K) -> bool,
) -> (Vec<K>, T)
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let stream = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    );
    let mut stream = std::pin::pin!(stream);
    // The initial list completes before the trigger, so no version after it is missed.
    let mut seen = Vec::new();
    loop {
        match stream.try_next().await.expect("watch") {
            Some(watcher::Event::InitDone) => break,
            Some(watcher::Event::InitApply(o)) => seen.push(o),
            Some(_) => {}
            None => panic!("watch ended"),
        }
    }
    let out = trigger.await;
    let deadline = tokio::time::sleep(Duration::from_secs(90));
    tokio::pin!(deadline);
    while !seen.last().is_some_and(&done) {
        tokio::select! {
            next = stream.try_next() => match next {
                Ok(Some(watcher::Event::Apply(o) | watcher::Event::InitApply(o))) => seen.push(o),
                Ok(Some(_)) => {}
                Ok(None) => panic!("watch ended"),
                // The apiserver ends watches, e.g. when another test applies the CRD
                // anew; the watcher lists and watches again on the next poll.
                Err(e) => {
                    eprintln!("watch error, watching again: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut deadline => panic!("timed out; saw {} versions, the last {:?}", seen.len(), seen.last()),
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
        fx.api(),
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
    let (seen, patched) = record(fx.api(), "traced", patch, phase_is(BuildPhase::Failed)).await;
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

// ImagePipeline.

/// kstatus' rules for a custom resource without rules of its own, as
/// sigs.k8s.io/cli-utils/pkg/kstatus/status `Compute` applies them (Flux's health
/// checks): a `status.observedGeneration` other than `metadata.generation` is
/// InProgress; then Reconciling=True is InProgress and Stalled=True Failed (the first
/// such condition decides); then a Ready condition decides (True: Current, False or
/// Unknown: InProgress); anything else is Current. (Terminating, for an object being
/// deleted, does not occur here.) Note what this gives an object without status:
/// Current.
fn kstatus_of(obj: &Value) -> KStatus {
    let generation = obj["metadata"]["generation"].as_i64();
    let observed = obj["status"]["observedGeneration"].as_i64();
    if let (Some(g), Some(o)) = (generation, observed)
        && g != o
    {
        return KStatus::InProgress;
    }
    let empty = Vec::new();
    let conditions = obj["status"]["conditions"].as_array().unwrap_or(&empty);
    for c in conditions {
        match (c["type"].as_str(), c["status"].as_str()) {
            (Some("Reconciling"), Some("True")) => return KStatus::InProgress,
            (Some("Stalled"), Some("True")) => return KStatus::Failed,
            _ => {}
        }
    }
    for c in conditions {
        match (c["type"].as_str(), c["status"].as_str()) {
            (Some("Ready"), Some("True")) => return KStatus::Current,
            (Some("Ready"), Some("False" | "Unknown")) => return KStatus::InProgress,
            _ => {}
        }
    }
    KStatus::Current
}

fn pipeline_condition(p: &ImagePipeline, type_: &str) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

/// Where a pipeline stands by what its status records (builds, versions, brake),
/// not by its conditions, and what kstatus must say then. `None`: no status yet.
fn pipeline_state(p: &ImagePipeline) -> (&'static str, Option<KStatus>) {
    let Some(st) = &p.status else {
        return ("no status", None);
    };
    if st.observed_generation != p.metadata.generation {
        return ("stale generation", Some(KStatus::InProgress));
    }
    if st.brake.is_some() {
        return ("braked", Some(KStatus::Failed));
    }
    let active = st.builds.iter().find(|b| !b.settled);
    match (active, st.latest_version) {
        (Some(_), None) => ("first build", Some(KStatus::InProgress)),
        (Some(b), Some(_)) if b.trigger.split(',').any(|t| t == "template") => {
            ("template build", Some(KStatus::InProgress))
        }
        (Some(_), Some(_)) => ("scheduled build", Some(KStatus::Current)),
        // A failed build of the current template, which has no version: the spec
        // is not realized (Stalled, TemplateBuildFailed). A failed rebuild of a
        // template that has a version leaves the pipeline Current.
        (None, _) if st.failed_template.is_some() && st.failed_template == st.template_hash => {
            ("the current template's build failed", Some(KStatus::Failed))
        }
        (None, Some(_)) => ("version available", Some(KStatus::Current)),
        (None, None) => ("no version", Some(KStatus::InProgress)),
    }
}

/// A JSON value as a Lua table constructor, the shape Argo CD hands a health script.
fn lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("{{{}}}", a.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("[{k:?}] = {}", lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Argo CD's health of `obj` by config/argocd/pipeline-health.lua (under Lua 5.1;
/// tests/argocd_health.rs runs it as Argo CD's sandbox does).
fn argo_health(obj: &Value) -> String {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/argocd/pipeline-health.lua"
    );
    let prog = format!(
        "obj = {}\nlocal hs = dofile({script:?})\nio.write(hs.status)",
        lua(obj)
    );
    let out = Command::new("lua5.1")
        .args(["-e", &prog])
        .output()
        .expect("lua5.1 (installed by tests/env/up.sh)");
    assert!(
        out.status.success(),
        "lua failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What a version of the pipeline was, what kstatus and Argo CD said of it.
type Step = (&'static str, KStatus, String);

/// Checks kstatus and the Argo CD health check on every recorded version of a
/// pipeline against where its status says it stands; returns the distinct steps.
fn check_pipeline(seen: &[ImagePipeline]) -> Vec<Step> {
    let mut trace: Vec<Step> = Vec::new();
    for p in seen {
        let obj = serde_json::to_value(p).unwrap();
        let got = kstatus_of(&obj);
        let argo = argo_health(&obj);
        let (state, want) = pipeline_state(p);
        let shown = || {
            format!(
                "{state}: generation {:?}, status {}",
                p.metadata.generation,
                serde_json::to_string(&p.status).unwrap_or_default()
            )
        };
        match want {
            Some(want) => {
                assert_eq!(got, want, "kstatus, {}", shown());
                // The rule as Flux users rely on it: Current only for the current
                // generation with Ready=True and neither Reconciling nor Stalled.
                if got == KStatus::Current {
                    assert_eq!(
                        p.status.as_ref().and_then(|s| s.observed_generation),
                        p.metadata.generation,
                        "{}",
                        shown()
                    );
                    assert_eq!(
                        pipeline_condition(p, "Ready").as_deref(),
                        Some("True"),
                        "{}",
                        shown()
                    );
                    assert_ne!(
                        pipeline_condition(p, "Reconciling").as_deref(),
                        Some("True"),
                        "{}",
                        shown()
                    );
                    assert_ne!(
                        pipeline_condition(p, "Stalled").as_deref(),
                        Some("True"),
                        "{}",
                        shown()
                    );
                }
                let argo_want = match want {
                    KStatus::Current => "Healthy",
                    KStatus::InProgress => "Progressing",
                    KStatus::Failed => "Degraded",
                };
                assert_eq!(argo, argo_want, "Argo CD health, {}", shown());
            }
            // Before kiln's first status write kstatus has nothing to go by and says
            // Current (true of any custom resource); Argo CD's check waits.
            None => {
                assert_eq!(got, KStatus::Current, "{}", shown());
                assert_eq!(argo, "Progressing", "{}", shown());
            }
        }
        let step = (state, got, argo);
        if trace.last() != Some(&step) {
            trace.push(step);
        }
    }
    trace
}

fn has(trace: &[Step], state: &str, k: KStatus) -> bool {
    trace.iter().any(|(s, g, _)| *s == state && *g == k)
}

/// An ImagePipeline through its life, every version of it recorded by a watch:
/// the first build (InProgress) to version 1 (Current), `kubectl wait
/// --for=condition=Ready ipl/NAME` returning once version 1 exists and not before;
/// a template change (InProgress while stale and while the new template builds) to
/// version 2 (Current), `kubectl wait --for=condition=Ready` returning at once (the
/// previous version keeps Ready True) and `--for=condition=Reconciling=false` only
/// after the new template's build; a failing template with `maxConsecutiveFailures: 2` to the
/// failure brake (Failed); a fix that re-arms it, back to Current. At every version
/// kstatus and the Argo CD health check agree with where the status says it stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_meets_the_kstatus_rules_and_kubectl_wait_through_its_life() {
    let fx = Fixture::new("kstatus-ipl").await;
    let started = Instant::now();
    let api: Api<ImagePipeline> = Api::namespaced(fx.client.clone(), &fx.ns);
    let gate = fx.host_dir.join("gate");
    let template =
        |inline: &str| fx.null_build("t", json!([{"shell": {"inline": [inline]}}]))["spec"].clone();
    let p: ImagePipeline = serde_json::from_value(json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ImagePipeline",
        "metadata": {"name": "traced", "namespace": fx.ns},
        "spec": {
            // The first build waits for the gate: kubectl wait must still be waiting.
            "template": {"spec": template(&format!(
                "while [ ! -e {} ]; do sleep 0.1; done", gate.display()
            ))},
            "maxConsecutiveFailures": 2,
        },
    }))
    .unwrap();
    let version_is = |v: i64| {
        move |p: &ImagePipeline| {
            p.status.as_ref().is_some_and(|s| {
                s.latest_version == Some(v) && s.observed_generation == p.metadata.generation
            })
        }
    };

    // 1. The first build, and kubectl wait.
    let create = async {
        api.create(&PostParams::default(), &p)
            .await
            .expect("create");
        let mut waiting = kubectl_wait_for(&fx, "ipl/traced", "Ready");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            waiting.try_wait().expect("poll kubectl").is_none(),
            "kubectl wait returned before the first build could finish"
        );
        std::fs::write(&gate, "").unwrap();
        waiting
    };
    let (seen, waiting) = record(api.clone(), "traced", create, version_is(1)).await;
    let (ok, out) = tokio::task::spawn_blocking(move || finish(waiting))
        .await
        .expect("join");
    assert!(ok, "kubectl wait: {out}");
    println!("kubectl wait: {}", out.trim());
    let now = api.get("traced").await.unwrap();
    assert_eq!(
        now.status.as_ref().and_then(|s| s.latest_version),
        Some(1),
        "{:?}",
        now.status
    );
    let trace = check_pipeline(&seen);
    println!("first build ({:?}): {trace:?}", started.elapsed());
    assert!(has(&trace, "first build", KStatus::InProgress), "{trace:?}");
    assert_eq!(trace.last().unwrap().0, "version available", "{trace:?}");
    assert_eq!(trace.last().unwrap().1, KStatus::Current, "{trace:?}");

    // 2. A template change: reconciling, then ready again with version 2. Ready
    // stays True meanwhile (version 1 is there to use), so `kubectl wait
    // --for=condition=Ready` returns at once; `--for=condition=Reconciling=false`
    // waits for the new template's build (held by a second gate).
    let t = Instant::now();
    let params = PatchParams::default();
    let gate2 = fx.host_dir.join("gate2");
    let body = Patch::Merge(json!({"spec": {"template": {"spec": template(&format!(
        "while [ ! -e {} ]; do sleep 0.1; done", gate2.display()
    ))}}}));
    let change = async {
        api.patch("traced", &params, &body).await.expect("patch");
        let mut ready = kubectl_wait_for(&fx, "ipl/traced", "Ready");
        let mut rebuilt = kubectl_wait_for(&fx, "ipl/traced", "Reconciling=false");
        let t = Instant::now();
        while ready.try_wait().expect("poll kubectl").is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "kubectl wait --for=condition=Ready did not return during the rebuild"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            rebuilt.try_wait().expect("poll kubectl").is_none(),
            "kubectl wait --for=condition=Reconciling=false returned while the new template builds"
        );
        std::fs::write(&gate2, "").unwrap();
        (ready, rebuilt)
    };
    let (seen, (ready, rebuilt)) = record(api.clone(), "traced", change, version_is(2)).await;
    let (ok, out) = finish(ready);
    assert!(ok, "kubectl wait --for=condition=Ready: {out}");
    let (ok, out) = tokio::task::spawn_blocking(move || finish(rebuilt))
        .await
        .expect("join");
    assert!(ok, "kubectl wait --for=condition=Reconciling=false: {out}");
    let now = api.get("traced").await.unwrap();
    assert_eq!(
        now.status.as_ref().and_then(|s| s.latest_version),
        Some(2),
        "{:?}",
        now.status
    );
    let trace = check_pipeline(&seen);
    println!("template change ({:?}): {trace:?}", t.elapsed());
    assert!(
        has(&trace, "stale generation", KStatus::InProgress),
        "{trace:?}"
    );
    assert!(
        has(&trace, "template build", KStatus::InProgress),
        "{trace:?}"
    );
    // Ready stays True while the new template builds (version 1 is there to use):
    // Reconciling=True is what keeps kstatus at InProgress.
    assert!(
        seen.iter().any(|p| pipeline_state(p).0 == "template build"
            && pipeline_condition(p, "Ready").as_deref() == Some("True")
            && pipeline_condition(p, "Reconciling").as_deref() == Some("True")),
        "{trace:?}"
    );
    assert_eq!(
        trace.last().unwrap(),
        &("version available", KStatus::Current, "Healthy".to_string())
    );

    // 3. A template that fails, on a schedule: the failure brake stalls it.
    let t = Instant::now();
    let body = Patch::Merge(json!({"spec": {
        "template": {"spec": template("sleep 0.5; exit 3")},
        "schedule": {"every": "2s"},
    }}));
    let braked = |p: &ImagePipeline| {
        p.status
            .as_ref()
            .is_some_and(|s| s.brake.is_some() && s.observed_generation == p.metadata.generation)
    };
    let (seen, patched) = record(
        api.clone(),
        "traced",
        api.patch("traced", &params, &body),
        braked,
    )
    .await;
    patched.expect("patch");
    let trace = check_pipeline(&seen);
    println!("failing template ({:?}): {trace:?}", t.elapsed());
    assert!(
        has(&trace, "template build", KStatus::InProgress),
        "{trace:?}"
    );
    let last = seen.last().unwrap();
    let stalled = last
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .unwrap();
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", "FailureBrake")
    );
    assert_eq!(
        trace.last().unwrap(),
        &("braked", KStatus::Failed, "Degraded".to_string())
    );

    // 4. A fix re-arms it: reconciling, then Current with a new version.
    let t = Instant::now();
    let body = Patch::Merge(json!({"spec": {"template": {"spec": template("true; true")}}}));
    let rebuilt = |p: &ImagePipeline| {
        p.status.as_ref().is_some_and(|s| {
            s.latest_version.is_some_and(|v| v > 2)
                && s.brake.is_none()
                && s.observed_generation == p.metadata.generation
        })
    };
    let (seen, patched) = record(
        api.clone(),
        "traced",
        api.patch("traced", &params, &body),
        rebuilt,
    )
    .await;
    patched.expect("patch");
    let trace = check_pipeline(&seen);
    println!("fixed template ({:?}): {trace:?}", t.elapsed());
    assert!(
        has(&trace, "template build", KStatus::InProgress),
        "{trace:?}"
    );
    assert_eq!(trace.last().unwrap().1, KStatus::Current, "{trace:?}");
    println!("the pipeline's life took {:?}", started.elapsed());
}
