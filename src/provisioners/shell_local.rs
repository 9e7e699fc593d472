//! `shellLocal`: a script that runs on kiln's side, never inside the operator: in
//! a runner Pod of the build's namespace, made by the step and deleted by its
//! cleanup. The Pod has no ServiceAccount token, runs as a non-root user with a
//! read-only root filesystem, and sees the build facts as `KILN_*` variables.

use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, LogParams, PostParams};
use serde_json::{Value, json};

use super::mask::Masker;
use super::shell;
use crate::api::{ResourceRecord, ShellLocalProvisioner, duration};
use crate::engine::{CleanupContext, Step, StepContext, StepError, StepOutput};

/// The operator's default runner image (`--runner-image`, the chart's `runner.image`).
pub const RUNNER_IMAGE_ENV: &str = "KILN_RUNNER_IMAGE";
const POD: &str = "Pod";
const TAIL_LINES: usize = 20;
/// How often the step looks at its Pod.
const POLL: Duration = Duration::from_secs(1);

pub struct ShellLocalStep {
    pub name: String,
    pub index: usize,
    pub spec: ShellLocalProvisioner,
}

impl ShellLocalStep {
    fn field(&self) -> String {
        format!("spec.provisioners[{}].shellLocal", self.index)
    }

    /// One Pod per build generation and step: a resumed step finds the Pod an
    /// earlier attempt made and waits for it instead of starting a second run.
    fn pod_name(&self, uid: &str, generation: i64) -> String {
        let short: String = uid.chars().filter(|c| *c != '-').take(12).collect();
        format!("kiln-{short}-{generation}-{}", self.name)
    }

    fn image(&self) -> Result<String, StepError> {
        self.spec
            .image
            .clone()
            .or_else(|| std::env::var(RUNNER_IMAGE_ENV).ok())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| {
                StepError::Failed(format!(
                    "{}.image: no runner image: set it, or install kiln with a default (--runner-image, the chart's runner.image)",
                    self.field()
                ))
            })
    }

    fn pod(
        &self,
        ctx: &StepContext,
        name: &str,
        image: &str,
        script: &str,
        env: Vec<Value>,
    ) -> Value {
        let f = &ctx.facts;
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": f.namespace,
                "labels": {
                    "app.kubernetes.io/managed-by": "kiln",
                    "kiln.dev/step": self.name,
                },
                "annotations": {crate::api::BUILD_TAG: format!("{}/{}", f.namespace, f.name)},
                "ownerReferences": [{
                    "apiVersion": "kiln.dev/v1alpha1",
                    "kind": "ImageBuild",
                    "name": f.name,
                    "uid": f.uid,
                    "controller": true,
                }],
            },
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "enableServiceLinks": false,
                "securityContext": {
                    "runAsNonRoot": true,
                    "runAsUser": 65532,
                    "runAsGroup": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [{
                    "name": "run",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    // The script is an argument ($0), written to the writable /tmp
                    // and run with its own shebang.
                    "command": [
                        "/bin/sh",
                        "-c",
                        "umask 077 && printf '%s' \"$0\" > /tmp/kiln-script && chmod 700 /tmp/kiln-script && exec /tmp/kiln-script",
                        script,
                    ],
                    "workingDir": "/tmp",
                    "env": env,
                    "securityContext": {
                        "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "resources": {
                        "requests": {"cpu": "50m", "memory": "64Mi"},
                        "limits": {"memory": "256Mi"},
                    },
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }],
                "volumes": [{"name": "tmp", "emptyDir": {}}],
            },
        })
    }

    async fn run_pod(&self, ctx: &StepContext) -> Result<StepOutput, StepError> {
        let field = self.field();
        let image = self.image()?;
        let timeout = duration::parse(&self.spec.timeout)
            .map_err(|e| StepError::Failed(format!("{field}.timeout: {e}")))?;
        let script = shell::script(
            ctx,
            self.spec.inline.as_deref(),
            self.spec.script_from.as_ref(),
            &field,
        )
        .await?;
        let (values, secrets) = shell::env(ctx, &self.spec.env, &field).await?;
        // Secret values reach the Pod by reference (the Pod reads the Secret), never
        // in its spec; the operator reads them only to mask the output.
        let from_secrets: Vec<&crate::api::EnvVar> = self
            .spec
            .env
            .iter()
            .filter(|v| v.value.is_none() && v.value_from.is_some())
            .collect();
        let mut env: Vec<Value> = values
            .iter()
            .filter(|(k, _)| !from_secrets.iter().any(|v| &v.name == *k))
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect();
        for v in &from_secrets {
            if let Some(from) = &v.value_from {
                let r = &from.secret_key_ref;
                env.push(json!({"name": v.name, "valueFrom": {"secretKeyRef": {"name": r.name, "key": r.key}}}));
            }
        }

        let name = self.pod_name(&ctx.facts.uid, ctx.facts.generation);
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.facts.namespace);
        ctx.record(ResourceRecord {
            kind: POD.into(),
            id: name.clone(),
            region: None,
            created: true,
        })
        .await?;
        let kube_err = |what: &str, e: kube::Error| {
            StepError::Transient(format!("{field}: {what} runner Pod {name}: {e}"))
        };
        match pods
            .get_opt(&name)
            .await
            .map_err(|e| kube_err("reading", e))?
        {
            Some(_) => {
                tracing::info!(pod = %name, "waiting for the runner Pod an earlier attempt started")
            }
            None => {
                let pod: Pod = serde_json::from_value(self.pod(ctx, &name, &image, &script, env))
                    .map_err(|e| StepError::Failed(format!("{field}: internal: {e}")))?;
                match pods.create(&PostParams::default(), &pod).await {
                    Ok(_) => tracing::info!(pod = %name, image = %image, "started the runner Pod"),
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => {
                        return Err(StepError::Failed(format!(
                            "{field}: the runner Pod {name} was refused: {}",
                            s.message
                        )));
                    }
                    Err(e) => return Err(kube_err("creating", e)),
                }
            }
        }

        let started = Instant::now();
        let exit = loop {
            let pod = pods.get(&name).await.map_err(|e| kube_err("reading", e))?;
            if let Some(code) = terminated(&pod) {
                break code;
            }
            if started.elapsed() > timeout {
                let _ = pods.delete(&name, &DeleteParams::default()).await;
                return Err(StepError::Failed(format!(
                    "{field}.timeout: the script ran longer than {}; runner Pod {name} deleted",
                    self.spec.timeout
                )));
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = ctx.cancel.cancelled() => return Err(StepError::Cancelled),
            }
        };

        let log = pods
            .logs(&name, &LogParams::default())
            .await
            .unwrap_or_default();
        let mut masker = Masker::new(&secrets);
        let mut masked = masker.push(log.as_bytes());
        masked.extend(masker.flush());
        let masked = String::from_utf8_lossy(&masked).into_owned();
        for line in masked.lines() {
            tracing::info!(pod = %name, "{line}");
        }
        if exit == 0 {
            return Ok(StepOutput {
                message: Some(format!("runner Pod {name}: the script exited 0")),
                ..Default::default()
            });
        }
        let lines: Vec<&str> = masked.lines().collect();
        let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
        Err(StepError::Failed(format!(
            "{field}: the script exited with code {exit} in runner Pod {name}; last output:\n{tail}"
        )))
    }
}

/// The container's exit code once it has terminated; a Pod that failed before
/// its container ran (an image that cannot be pulled stays Pending) counts as 128.
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

impl Step for ShellLocalStep {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &str {
        "shell-local"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(self.run_pod(ctx))
    }

    fn cleanup<'a>(&'a self, ctx: &'a CleanupContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.facts.namespace);
            for r in ctx
                .record
                .resources
                .iter()
                .filter(|r| r.kind == POD && r.created)
            {
                match pods.delete(&r.id, &DeleteParams::default()).await {
                    Ok(_) => tracing::info!(pod = %r.id, "deleted the runner Pod"),
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        return Err(StepError::Transient(format!(
                            "deleting runner Pod {}: {e}",
                            r.id
                        )));
                    }
                }
            }
            Ok(())
        })
    }
}
