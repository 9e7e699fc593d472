//! Runner Pods: provisioners that run on kiln's side (`shellLocal`, `ansible`) run
//! in a Pod of the build's namespace that their step makes, never inside the
//! operator. The Pod has no ServiceAccount token, runs as a non-root user with a
//! read-only root filesystem and a writable `/tmp`, and is owned by the ImageBuild.
//! Its name is fixed per build generation and step, and it is recorded in status
//! before the step waits on it, so a restarted operator finds it and waits for it
//! instead of starting a second run.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::{Affinity, Pod, ResourceRequirements, Secret, Toleration};
use kube::api::{Api, DeleteParams, LogParams, Patch, PatchParams, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};

use super::mask::Masker;
use crate::api::{EnvVar, ResourceRecord};
use crate::engine::{BuildFacts, CleanupContext, StepContext, StepError};

pub const POD: &str = "Pod";
pub const SECRET: &str = "Secret";
/// Lines of output a failed run quotes.
pub const TAIL_LINES: usize = 20;
/// How often the step looks at its Pod while it starts and once its log ended:
/// both last a second or two, and the step's end waits on the second.
const POLL: Duration = Duration::from_millis(250);
/// ... and while it runs, when its log cannot be followed.
const POLL_UNFOLLOWED: Duration = Duration::from_secs(2);

/// What the operator's installation sets for runner Pods (`--runner-image`,
/// `--runner-pod`; the chart's `runner` values).
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    /// Image of runner Pods whose provisioner names none.
    pub image: Option<String>,
    pub pod: PodSettings,
}

/// Resources and placement of every runner Pod (`--runner-pod`, JSON).
#[derive(Clone, Debug, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSettings {
    /// Default: 50m CPU and 64Mi requested, 256Mi memory limit (1Gi for Ansible).
    #[serde(default)]
    pub resources: Option<ResourceRequirements>,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    #[serde(default)]
    pub affinity: Option<Affinity>,
    #[serde(default)]
    pub priority_class_name: Option<String>,
}

impl PodSettings {
    /// Parses `--runner-pod`; the error names the flag and what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_str(text)
            .map_err(|e| format!("--runner-pod (KILN_RUNNER_POD, the chart's runner values): {e}"))
    }
}

/// The Pod's fixed name for this build generation and step.
pub fn pod_name(facts: &BuildFacts, step: &str) -> String {
    let short: String = facts.uid.chars().filter(|c| *c != '-').take(12).collect();
    format!("kiln-{short}-{}-{step}", facts.generation)
}

/// The runner image: the provisioner's own, else the installation's default.
pub fn image(ctx: &StepContext, own: Option<&String>, field: &str) -> Result<String, StepError> {
    own.cloned()
        .or_else(|| ctx.runner.image.clone())
        .filter(|i| !i.is_empty())
        .ok_or_else(|| {
            StepError::Failed(format!(
                "{field}.image: no runner image: set it, or install kiln with a default (--runner-image; the chart sets its runner image)"
            ))
        })
}

/// The ImageBuild as the controlling owner, so a deleted build takes the Pod
/// and its Secret with it even if kiln's cleanup never ran.
pub fn metadata(facts: &BuildFacts, name: &str, step: &str) -> Value {
    json!({
        "name": name,
        "namespace": facts.namespace,
        "labels": {
            "app.kubernetes.io/managed-by": "kiln",
            "kiln.dev/step": step,
        },
        "annotations": {crate::api::BUILD_TAG: format!("{}/{}", facts.namespace, facts.name)},
        "ownerReferences": [{
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "ImageBuild",
            "name": facts.name,
            "uid": facts.uid,
            "controller": true,
        }],
    })
}

/// Environment entries for a runner container: `values` (build facts and plain
/// variables) as values, and the spec's variables from Secrets as references, so
/// the Pod reads the Secret itself and its value is never in the Pod spec.
pub fn container_env(values: &BTreeMap<String, String>, spec: &[EnvVar]) -> Vec<Value> {
    let from_secret = |name: &str| {
        spec.iter()
            .any(|v| v.name == name && v.value.is_none() && v.value_from.is_some())
    };
    let mut env: Vec<Value> = values
        .iter()
        .filter(|(k, _)| !from_secret(k))
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();
    for v in spec {
        if let (None, Some(from)) = (&v.value, &v.value_from) {
            let r = &from.secret_key_ref;
            env.push(json!({"name": v.name, "valueFrom": {"secretKeyRef": {"name": r.name, "key": r.key}}}));
        }
    }
    env
}

/// One run of a runner Pod.
pub struct RunSpec {
    /// The provisioner's spec field, for messages (`spec.provisioners[2].ansible`).
    pub field: String,
    pub name: String,
    pub step: String,
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<Value>,
    /// Volumes besides `/tmp`, with their mounts.
    pub volumes: Vec<Value>,
    pub mounts: Vec<Value>,
    /// Memory limit when the installation sets no resources.
    pub memory_limit: &'static str,
    pub timeout: Duration,
    pub timeout_text: String,
    /// Secret values to mask in the output.
    pub secrets: Vec<String>,
}

/// How a runner Pod ended.
pub struct Finished {
    pub exit: i32,
    /// The last lines of its output, masked.
    pub tail: Vec<String>,
}

impl Finished {
    pub fn tail_text(&self, lines: usize) -> String {
        let start = self.tail.len().saturating_sub(lines);
        self.tail
            .iter()
            .skip(start)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn pod(settings: &PodSettings, facts: &BuildFacts, run: &RunSpec) -> Value {
    let resources = settings.resources.as_ref().map_or_else(
        || {
            json!({
                "requests": {"cpu": "50m", "memory": "64Mi"},
                "limits": {"memory": run.memory_limit},
            })
        },
        |r| serde_json::to_value(r).unwrap_or(Value::Null),
    );
    let mut mounts = vec![json!({"name": "tmp", "mountPath": "/tmp"})];
    mounts.extend(run.mounts.iter().cloned());
    let mut volumes = vec![json!({"name": "tmp", "emptyDir": {}})];
    volumes.extend(run.volumes.iter().cloned());
    let mut spec = json!({
        "restartPolicy": "Never",
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [{
            "name": "run",
            "image": run.image,
            "imagePullPolicy": "IfNotPresent",
            "command": run.command,
            "workingDir": "/tmp",
            "env": run.env,
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
            },
            "resources": resources,
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    });
    if !settings.node_selector.is_empty() {
        spec["nodeSelector"] = json!(settings.node_selector);
    }
    if !settings.tolerations.is_empty() {
        spec["tolerations"] = serde_json::to_value(&settings.tolerations).unwrap_or(Value::Null);
    }
    if let Some(a) = &settings.affinity {
        spec["affinity"] = serde_json::to_value(a).unwrap_or(Value::Null);
    }
    if let Some(p) = &settings.priority_class_name {
        spec["priorityClassName"] = json!(p);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(facts, &run.name, &run.step),
        "spec": spec,
    })
}

fn kube_err(field: &str, what: &str, name: &str, e: kube::Error) -> StepError {
    StepError::Transient(format!("{field}: {what} {name}: {e}"))
}

/// Creates the step's Secret (recorded first), or refreshes the data of the one an
/// earlier attempt made: the same name always carries this attempt's data.
pub async fn put_secret(
    ctx: &StepContext,
    field: &str,
    name: &str,
    data: BTreeMap<String, String>,
) -> Result<(), StepError> {
    ctx.record(ResourceRecord {
        kind: SECRET.into(),
        id: name.to_string(),
        region: None,
        created: true,
    })
    .await?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.facts.namespace);
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(&ctx.facts, name, &ctx.step_name),
        "type": "Opaque",
        "stringData": &data,
    }))
    .map_err(|e| StepError::Failed(format!("{field}: internal: {e}")))?;
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        // A resumed step's: the same keys (one generation, one spec), fresh values.
        Err(kube::Error::Api(s)) if s.code == 409 => secrets
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"stringData": data})),
            )
            .await
            .map(|_| ())
            .map_err(|e| kube_err(field, "updating Secret", name, e)),
        Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => Err(StepError::Failed(
            format!("{field}: the Secret {name} was refused: {}", s.message),
        )),
        Err(e) => Err(kube_err(field, "creating Secret", name, e)),
    }
}

/// Runs the Pod to its end (or finds the one an earlier attempt started and waits
/// for it), following its log into the operator's log, masked. `on_line` sees
/// every masked line as it comes.
pub async fn run(
    ctx: &StepContext,
    run: &RunSpec,
    on_line: &mut (dyn FnMut(&str) + Send),
) -> Result<Finished, StepError> {
    let field = &run.field;
    let name = &run.name;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.facts.namespace);
    ctx.record(ResourceRecord {
        kind: POD.into(),
        id: name.clone(),
        region: None,
        created: true,
    })
    .await?;
    let existing = pods
        .get_opt(name)
        .await
        .map_err(|e| kube_err(field, "reading runner Pod", name, e))?;
    if existing.is_some() {
        tracing::info!(pod = %name, "waiting for the runner Pod an earlier attempt started");
    } else {
        let spec: Pod = serde_json::from_value(pod(&ctx.runner.pod, &ctx.facts, run))
            .map_err(|e| StepError::Failed(format!("{field}: internal: {e}")))?;
        match pods.create(&PostParams::default(), &spec).await {
            Ok(_) => tracing::info!(pod = %name, image = %run.image, "started the runner Pod"),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => {
                return Err(StepError::Failed(format!(
                    "{field}: the runner Pod {name} was refused: {}",
                    s.message
                )));
            }
            Err(e) => return Err(kube_err(field, "creating runner Pod", name, e)),
        }
    }

    let started = Instant::now();
    let mut follower = Follower {
        masker: Masker::new(&run.secrets),
        pending: Vec::new(),
        tail: VecDeque::new(),
    };
    let waited = async {
        let mut followed = false;
        let mut unfollowed = false;
        let mut stuck_since: Option<Instant> = None;
        loop {
            let pod = pods
                .get(name)
                .await
                .map_err(|e| kube_err(field, "reading runner Pod", name, e))?;
            // An image that cannot be pulled or a Secret key that is not there
            // keep the Pod waiting for ever: past a grace for passing trouble,
            // the step fails and says why.
            match cannot_start(&pod) {
                Some(why) if stuck_since.is_some_and(|t| t.elapsed() >= STUCK_GRACE) => {
                    return Err(StepError::Failed(format!(
                        "{field}: the runner Pod {name} cannot start its container: {why} (image {}; env from Secrets)",
                        run.image
                    )));
                }
                Some(_) => {
                    stuck_since.get_or_insert_with(Instant::now);
                }
                None => stuck_since = None,
            }
            if let Some(exit) = terminated(&pod) {
                if !followed {
                    // It ended before we followed it: read the whole log once.
                    let log = pods
                        .logs(name, &LogParams::default())
                        .await
                        .unwrap_or_default();
                    follower.push(log.as_bytes(), name, on_line);
                }
                follower.finish(name, on_line);
                return Ok(exit);
            }
            if !followed && !unfollowed && started_running(&pod) {
                followed = true;
                let params = LogParams {
                    follow: true,
                    ..LogParams::default()
                };
                match pods.log_stream(name, &params).await {
                    Ok(stream) => {
                        let mut lines = stream.lines();
                        while let Some(line) = lines.next().await {
                            match line {
                                Ok(mut line) => {
                                    line.push('\n');
                                    follower.push(line.as_bytes(), name, on_line);
                                }
                                Err(e) => {
                                    tracing::debug!(pod = %name, error = %e, "the runner Pod's log stream broke off");
                                    break;
                                }
                            }
                        }
                        // The stream ends with the container; its status follows.
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(pod = %name, error = %e, "cannot follow the runner Pod's log; reading it when the Pod ends");
                        followed = false;
                        unfollowed = true;
                    }
                }
            }
            tokio::time::sleep(if unfollowed { POLL_UNFOLLOWED } else { POLL }).await;
        }
    };
    let left = run.timeout.saturating_sub(started.elapsed());
    let exit = tokio::select! {
        r = waited => r?,
        () = tokio::time::sleep(left) => {
            let _ = pods.delete(name, &DeleteParams::default()).await;
            return Err(StepError::Failed(format!(
                "{field}.timeout: the runner Pod {name} ran longer than {}; it was deleted",
                run.timeout_text
            )));
        }
        () = ctx.cancel.cancelled() => return Err(StepError::Cancelled),
    };
    Ok(Finished {
        exit,
        tail: follower.tail.into_iter().collect(),
    })
}

/// Masks the Pod's output and cuts it into lines for the operator's log.
struct Follower {
    masker: Masker,
    pending: Vec<u8>,
    tail: VecDeque<String>,
}

/// Lines kept for the step's own use (the failed Ansible task, the last output).
const KEEP_LINES: usize = 400;

impl Follower {
    fn push(&mut self, bytes: &[u8], pod: &str, on_line: &mut (dyn FnMut(&str) + Send)) {
        let masked = self.masker.push(bytes);
        self.emit(masked, pod, on_line);
    }

    fn finish(&mut self, pod: &str, on_line: &mut (dyn FnMut(&str) + Send)) {
        let mut rest = self.masker.flush();
        if !self.pending.is_empty() || !rest.is_empty() {
            rest.push(b'\n');
        }
        self.emit(rest, pod, on_line);
    }

    fn emit(&mut self, masked: Vec<u8>, pod: &str, on_line: &mut (dyn FnMut(&str) + Send)) {
        self.pending.extend(masked);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            tracing::info!(pod = %pod, "{line}");
            on_line(&line);
            if self.tail.len() == KEEP_LINES {
                self.tail.pop_front();
            }
            self.tail.push_back(line);
        }
    }
}

/// How long a container may wait for a reason that rarely passes on its own.
const STUCK_GRACE: Duration = Duration::from_secs(30);

/// Why the container waits, when that is a reason that needs a user's fix.
fn cannot_start(pod: &Pod) -> Option<String> {
    const REASONS: [&str; 5] = [
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    ];
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref()?;
        REASONS.contains(&reason).then(|| {
            format!(
                "{reason}: {}",
                waiting.message.as_deref().unwrap_or("no detail")
            )
        })
    })
}

fn started_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .any(|c| {
            c.state
                .as_ref()
                .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
        })
}

/// The container's exit code once it has terminated; a Pod that failed before
/// its container ran counts as 128.
fn terminated(pod: &Pod) -> Option<i32> {
    let status = pod.status.as_ref()?;
    let code = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code));
    match (code, status.phase.as_deref()) {
        (Some(code), _) => Some(code),
        (None, Some("Failed")) => Some(128),
        (None, Some("Succeeded")) => Some(0),
        _ => None,
    }
}

/// Deletes every Pod and Secret the step recorded, Pods first (a running Pod
/// still reads its Secret), without waiting out the Pod's grace period.
pub async fn cleanup(ctx: &CleanupContext) -> Result<(), StepError> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.facts.namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.facts.namespace);
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    for kind in [POD, SECRET] {
        for r in ctx
            .record
            .resources
            .iter()
            .filter(|r| r.kind == kind && r.created)
        {
            let result = if kind == POD {
                pods.delete(&r.id, &now).await.map(|_| ())
            } else {
                secrets.delete(&r.id, &now).await.map(|_| ())
            };
            match result {
                Ok(()) => tracing::info!(kind, name = %r.id, "deleted the runner's {kind}"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    return Err(StepError::Transient(format!(
                        "deleting the runner's {kind} {}: {e}",
                        r.id
                    )));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_settings_parse_and_name_the_flag() {
        let s = PodSettings::parse(
            r#"{"nodeSelector":{"pool":"runners"},"resources":{"limits":{"memory":"2Gi"}}}"#,
        )
        .unwrap();
        assert_eq!(s.node_selector["pool"], "runners");
        assert_eq!(PodSettings::parse(" ").unwrap(), PodSettings::default());
        let e = PodSettings::parse(r#"{"nodeSelectr":{}}"#).unwrap_err();
        assert!(
            e.contains("--runner-pod") && e.contains("nodeSelectr"),
            "{e}"
        );
    }

    fn run_spec() -> RunSpec {
        RunSpec {
            field: "spec.provisioners[0].ansible".into(),
            name: "kiln-0123456789ab-1-ansible-1".into(),
            step: "ansible-1".into(),
            image: "runner:1".into(),
            command: vec!["/bin/sh".into()],
            env: Vec::new(),
            volumes: Vec::new(),
            mounts: Vec::new(),
            memory_limit: "1Gi",
            timeout: Duration::from_secs(60),
            timeout_text: "1m".into(),
            secrets: Vec::new(),
        }
    }

    fn facts() -> BuildFacts {
        BuildFacts {
            name: "b".into(),
            namespace: "ns".into(),
            uid: "0123-4567".into(),
            generation: 1,
            builder: "null",
            lineage: None,
        }
    }

    #[test]
    fn a_runner_pod_is_locked_down_and_placed_as_the_installation_says() {
        let settings = PodSettings::parse(
            r#"{"nodeSelector":{"pool":"tools"},"tolerations":[{"key":"tools","operator":"Exists"}],
                "resources":{"limits":{"memory":"2Gi"}},"priorityClassName":"low"}"#,
        )
        .unwrap();
        let p: Pod = serde_json::from_value(pod(&settings, &facts(), &run_spec())).unwrap();
        let spec = p.spec.unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.node_selector.unwrap()["pool"], "tools");
        assert_eq!(spec.tolerations.unwrap()[0].key.as_deref(), Some("tools"));
        assert_eq!(spec.priority_class_name.as_deref(), Some("low"));
        let c = &spec.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["memory"].0, "2Gi");
        assert_eq!(spec.security_context.unwrap().run_as_non_root, Some(true));
        let owner = &p.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("ImageBuild", Some(true))
        );

        // Without settings: the defaults, the run's memory limit.
        let p: Pod =
            serde_json::from_value(pod(&PodSettings::default(), &facts(), &run_spec())).unwrap();
        let spec = p.spec.unwrap();
        assert!(spec.node_selector.is_none() && spec.tolerations.is_none());
        let r = spec.containers[0].resources.clone().unwrap();
        assert_eq!(r.limits.unwrap()["memory"].0, "1Gi");
        assert_eq!(r.requests.unwrap()["cpu"].0, "50m");
    }

    #[test]
    fn follower_masks_and_keeps_lines_across_chunks() {
        let mut f = Follower {
            masker: Masker::new(&["hunter2".to_string()]),
            pending: Vec::new(),
            tail: VecDeque::new(),
        };
        let mut seen = Vec::new();
        let mut on_line = |l: &str| seen.push(l.to_string());
        f.push(b"the pass is hun", "p", &mut on_line);
        f.push(b"ter2\nsecond", "p", &mut on_line);
        f.finish("p", &mut on_line);
        assert_eq!(seen, vec!["the pass is <redacted>", "second"]);
        assert_eq!(f.tail.len(), 2);
    }
}
