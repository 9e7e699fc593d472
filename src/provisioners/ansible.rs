//! `ansible`: `ansible-playbook` in a runner Pod (see `runner`) against the build
//! machine, over a direct SSH connection (no proxy in between, unlike Packer's
//! adapter). The step writes a Secret with the connection (the build's private
//! key, a known_hosts file holding only the host key kiln's connect step
//! recorded, the inventory) and the variables (build facts as `kiln_*`, the
//! spec's `extraVars`); the Pod mounts it, fetches a Git source itself, and runs
//! the playbook. Cleanup deletes the Pod and the Secret.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use sha1::Digest;

use super::{build_facts, connect, runner, shell};
use crate::api::{AnsibleProvisioner, duration};
use crate::engine::{CleanupContext, Step, StepContext, StepError, StepOutput};
use crate::refs;

pub struct AnsibleStep {
    pub name: String,
    pub index: usize,
    pub spec: AnsibleProvisioner,
}

/// Where the Pod finds what the step wrote (the Secret) and the playbook source.
const RUN_DIR: &str = "/kiln/run";
const PLAYBOOK_DIR: &str = "/kiln/playbook";
const GIT_CREDENTIALS_DIR: &str = "/kiln/git-credentials";

/// The Pod's program. Arguments are `ansible-playbook`'s; the Git source comes in
/// `KILN_GIT_*` variables. The private key is copied to `/tmp` with mode 0600
/// because ssh refuses a key others could read, and a Secret volume is root's.
const SCRIPT: &str = r#"set -eu
umask 077
mkdir -p /tmp/kiln
cp /kiln/run/id /tmp/kiln/id
src=/kiln/playbook
if [ -n "${KILN_GIT_URL:-}" ]; then
  creds=/kiln/git-credentials
  if [ -f "$creds/ssh-privatekey" ]; then
    cp "$creds/ssh-privatekey" /tmp/kiln/git-key
    known=/dev/null
    if [ -f "$creds/known_hosts" ]; then known="$creds/known_hosts"; fi
    export GIT_SSH_COMMAND="ssh -i /tmp/kiln/git-key -o IdentitiesOnly=yes -o UserKnownHostsFile=$known -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes"
  elif [ -f "$creds/username" ]; then
    export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=credential.helper
    export GIT_CONFIG_VALUE_0='!f() { test "$1" = get || exit 0; echo "username=$(cat /kiln/git-credentials/username)"; echo "password=$(cat /kiln/git-credentials/password)"; }; f'
  fi
  export GIT_TERMINAL_PROMPT=0
  git clone --quiet --no-checkout -- "$KILN_GIT_URL" /tmp/kiln/src || {
    echo "kiln: error: source.git: cannot clone $KILN_GIT_URL (git's message above)"
    exit 100
  }
  cd /tmp/kiln/src
  want="${KILN_GIT_REVISION:-HEAD}"
  commit=$(git rev-parse --verify --quiet "origin/$want^{commit}" || git rev-parse --verify --quiet "$want^{commit}") || {
    echo "kiln: error: source.git.revision: $want is not in $KILN_GIT_URL"
    exit 100
  }
  git -c advice.detachedHead=false checkout --quiet --detach "$commit"
  echo "kiln: playbook source commit $commit"
  src="/tmp/kiln/src/${KILN_GIT_PATH:-.}"
fi
cd "$src" || {
  echo "kiln: error: source.git.path: ${KILN_GIT_PATH:-} is not a directory of $KILN_GIT_URL"
  exit 100
}
ansible-playbook --version | head -n 1
exec ansible-playbook "$@"
"#;

/// Exit code of the script when it failed before the playbook, after a line
/// `kiln: error: <field under the provisioner>: <what>` (ansible-playbook exits
/// with 0-8, 99, 250 or 255).
const EXIT_SOURCE: i32 = 100;

impl AnsibleStep {
    fn field(&self) -> String {
        format!("spec.provisioners[{}].ansible", self.index)
    }

    async fn run_playbook(&self, ctx: &StepContext) -> Result<StepOutput, StepError> {
        let field = self.field();
        let spec = &self.spec;
        let image = runner::image(ctx, spec.image.as_ref(), &field)?;
        let timeout = duration::parse(&spec.timeout)
            .map_err(|e| StepError::Failed(format!("{field}.timeout: {e}")))?;
        let target = connect::target(ctx).await?;
        let host_key = match ctx.outputs.get(connect::OUT_HOST_KEY) {
            Some(k) => k.clone(),
            // A build whose connect step predates the record: the key a
            // connection under the build's host key policy sees now.
            None => {
                let session = connect::open(ctx).await?;
                let key = session.host_key().map(str::to_string);
                connect::keep(ctx, session);
                key.ok_or_else(|| {
                    StepError::Failed(format!("{field}: the build machine's host key is unknown"))
                })?
            }
        };
        let (mut env, secrets) = shell::env(ctx, &spec.env, &field).await?;
        let name = runner::pod_name(&ctx.facts, &self.name);

        let mut volumes =
            vec![json!({"name": "run", "secret": {"secretName": name, "defaultMode": 0o440}})];
        let mut mounts = vec![json!({"name": "run", "mountPath": RUN_DIR, "readOnly": true})];
        let source = match (&spec.source.config_map, &spec.source.git) {
            (Some(cm), None) => {
                let (items, digest) = self.config_map_items(ctx, &cm.name, &field).await?;
                volumes.push(
                    json!({"name": "playbook", "configMap": {"name": cm.name, "items": items}}),
                );
                mounts
                    .push(json!({"name": "playbook", "mountPath": PLAYBOOK_DIR, "readOnly": true}));
                format!("ConfigMap {} ({digest})", cm.name)
            }
            (None, Some(git)) => {
                env.insert("KILN_GIT_URL".into(), git.url.clone());
                if let Some(r) = &git.revision {
                    env.insert("KILN_GIT_REVISION".into(), r.clone());
                }
                if let Some(p) = &git.path {
                    env.insert("KILN_GIT_PATH".into(), p.clone());
                }
                if let Some(creds) = &git.credentials_secret_ref {
                    check_credentials(ctx, &creds.name, &field).await?;
                    volumes.push(json!({"name": "git-credentials", "secret": {"secretName": creds.name, "defaultMode": 0o440}}));
                    mounts.push(json!({"name": "git-credentials", "mountPath": GIT_CREDENTIALS_DIR, "readOnly": true}));
                }
                format!(
                    "{} at {}",
                    git.url,
                    git.revision.as_deref().unwrap_or("HEAD")
                )
            }
            _ => {
                return Err(StepError::Failed(format!(
                    "{field}.source: set exactly one of configMap or git"
                )));
            }
        };
        if spec.ansible_cfg.is_some() {
            env.insert("ANSIBLE_CONFIG".into(), format!("{RUN_DIR}/ansible.cfg"));
        }
        env.insert("ANSIBLE_FORCE_COLOR".into(), "0".into());
        env.insert("ANSIBLE_NOCOLOR".into(), "1".into());

        let data = self.secret_data(ctx, &target, &host_key)?;
        runner::put_secret(ctx, &field, &name, data).await?;

        let mut command = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            SCRIPT.into(),
            "kiln-ansible".into(),
        ];
        command.extend(self.arguments());
        let run = runner::RunSpec {
            field: field.clone(),
            name: name.clone(),
            step: self.name.clone(),
            image,
            command,
            env: runner::container_env(&env, &spec.env),
            volumes,
            mounts,
            memory_limit: "1Gi",
            timeout,
            timeout_text: spec.timeout.clone(),
            secrets,
        };
        let mut seen = Seen::default();
        let finished = runner::run(ctx, &run, &mut |line| seen.line(line)).await?;
        let version = seen.version.clone().unwrap_or_else(|| "ansible".into());
        let source = match &seen.commit {
            Some(c) => format!("{source}, commit {c}"),
            None => source,
        };
        if finished.exit == 0 {
            return Ok(StepOutput {
                message: Some(format!(
                    "{version} ran {} from {source} in runner Pod {name}{}",
                    spec.playbook,
                    seen.recap
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                )),
                ..Default::default()
            });
        }
        let tail = finished.tail_text(runner::TAIL_LINES);
        Err(StepError::Failed(
            match (finished.exit, &seen.failed_task) {
                (EXIT_SOURCE, _) if seen.kiln_error.is_some() => format!(
                    "{field}.{}; last output:\n{tail}",
                    seen.kiln_error.as_deref().unwrap_or_default()
                ),
                (code, Some(task)) => format!(
                    "{field}: task {task:?} failed (ansible-playbook exited with code {code}, {version}, {source}, runner Pod {name}); last output:\n{tail}"
                ),
                (code, None) => format!(
                    "{field}: ansible-playbook exited with code {code} ({source}, runner Pod {name}); last output:\n{tail}"
                ),
            },
        ))
    }

    /// `--extra-vars` files, tags, verbosity and the playbook.
    fn arguments(&self) -> Vec<String> {
        let spec = &self.spec;
        let mut args = vec![
            "-i".to_string(),
            format!("{RUN_DIR}/inventory.json"),
            "--extra-vars".into(),
            format!("@{RUN_DIR}/vars.json"),
        ];
        if !spec.tags.is_empty() {
            args.push("--tags".into());
            args.push(spec.tags.join(","));
        }
        if !spec.skip_tags.is_empty() {
            args.push("--skip-tags".into());
            args.push(spec.skip_tags.join(","));
        }
        if spec.verbosity > 0 {
            args.push(format!(
                "-{}",
                "v".repeat(usize::from(spec.verbosity.min(4)))
            ));
        }
        // `--` so that a playbook path can never be read as an option.
        args.push("--".into());
        args.push(spec.playbook.clone());
        args
    }

    /// The Secret's files: key, known_hosts, inventory, variables, ansible.cfg.
    fn secret_data(
        &self,
        ctx: &StepContext,
        target: &crate::communicator::ssh::Target,
        host_key: &str,
    ) -> Result<BTreeMap<String, String>, StepError> {
        let host = target.host.trim_start_matches('[').trim_end_matches(']');
        let known_host = if target.port == 22 {
            host.to_string()
        } else {
            format!("[{host}]:{}", target.port)
        };
        let mut groups = serde_json::Map::new();
        for g in &self.spec.groups {
            groups.insert(g.clone(), json!({"hosts": {"default": {}}}));
        }
        let inventory = json!({"all": {
            "hosts": {"default": {
                "ansible_host": host,
                "ansible_port": target.port,
                "ansible_user": target.username,
                "ansible_ssh_private_key_file": "/tmp/kiln/id",
                "ansible_ssh_common_args": format!(
                    "-o UserKnownHostsFile={RUN_DIR}/known_hosts -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
                ),
            }},
            "children": groups,
        }});
        let mut vars: BTreeMap<String, Value> = build_facts(ctx)
            .into_iter()
            .filter_map(|(k, v)| Some((ansible_name(&k)?, Value::String(v))))
            .collect();
        for (k, v) in &self.spec.extra_vars {
            vars.insert(k.clone(), Value::String(v.clone()));
        }
        let internal = |e: serde_json::Error| StepError::Failed(format!("internal: {e}"));
        let mut data = BTreeMap::from([
            (
                "id".to_string(),
                ensure_newline(target.private_key.expose_secret()),
            ),
            ("known_hosts".into(), format!("{known_host} {host_key}\n")),
            (
                "inventory.json".into(),
                serde_json::to_string_pretty(&inventory).map_err(internal)?,
            ),
            (
                "vars.json".into(),
                serde_json::to_string_pretty(&vars).map_err(internal)?,
            ),
        ]);
        if let Some(cfg) = &self.spec.ansible_cfg {
            data.insert("ansible.cfg".into(), cfg.clone());
        }
        Ok(data)
    }

    /// The ConfigMap's keys as files (`__` for `/`), and a digest of its content.
    async fn config_map_items(
        &self,
        ctx: &StepContext,
        name: &str,
        field: &str,
    ) -> Result<(Vec<Value>, String), StepError> {
        let field = format!("{field}.source.configMap");
        let files = refs::config_map(&ctx.client, &ctx.facts.namespace, name, &field)
            .await
            .map_err(|e| StepError::Failed(e.to_string()))?;
        let mut digest = sha1::Sha1::new();
        let mut items = Vec::new();
        let mut paths = std::collections::BTreeSet::new();
        for (key, value) in &files {
            let path = key.replace("__", "/");
            if path.split('/').any(|p| p.is_empty() || p == "..") {
                return Err(StepError::Failed(format!(
                    "{field}: key {key:?} is not a file path (`__` stands for `/`; no empty or `..` parts)"
                )));
            }
            if !paths.insert(path.clone()) {
                return Err(StepError::Failed(format!(
                    "{field}: two keys make the file {path:?}"
                )));
            }
            digest.update(key.as_bytes());
            digest.update([0]);
            digest.update(value);
            digest.update([0]);
            items.push(json!({"key": key, "path": path}));
        }
        if !paths.contains(&self.spec.playbook) {
            return Err(StepError::Failed(format!(
                "{}.playbook: {:?} is not in ConfigMap {name} (its files: {})",
                self.field(),
                self.spec.playbook,
                paths.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        let hex: String = digest
            .finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok((items, format!("sha1 {hex}")))
    }
}

/// A Git credentials Secret has what the Pod's script looks for.
async fn check_credentials(ctx: &StepContext, name: &str, field: &str) -> Result<(), StepError> {
    let field = format!("{field}.source.git.credentialsSecretRef");
    let keys = refs::secret_keys(
        &ctx.client,
        &ctx.facts.namespace,
        name,
        &["ssh-privatekey", "username", "password"],
        &field,
    )
    .await
    .map_err(|e| StepError::Failed(e.to_string()))?;
    match (&keys[0], &keys[1], &keys[2]) {
        (Some(_), _, _) | (None, Some(_), Some(_)) => Ok(()),
        _ => Err(StepError::Failed(format!(
            "{field}: Secret {name} needs ssh-privatekey (with known_hosts) or username and password"
        ))),
    }
}

fn ensure_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// `KILN_BUILD_NAME` → `kiln_build_name`: a build fact's Ansible variable.
pub fn ansible_name(env: &str) -> Option<String> {
    env.strip_prefix("KILN_")
        .map(|rest| format!("kiln_{}", rest.to_ascii_lowercase()))
}

/// What the step reads from the playbook's output as it goes.
#[derive(Default)]
struct Seen {
    version: Option<String>,
    commit: Option<String>,
    task: Option<String>,
    failed_task: Option<String>,
    recap: Option<String>,
    in_recap: bool,
    /// The script's own `kiln: error: …` line.
    kiln_error: Option<String>,
}

impl Seen {
    fn line(&mut self, line: &str) {
        if let Some(v) = line.strip_prefix("ansible-playbook [core ") {
            self.version = Some(format!("ansible-core {}", v.trim_end_matches(']')));
        } else if let Some(e) = line.strip_prefix("kiln: error: ") {
            self.kiln_error = Some(e.to_string());
        } else if let Some(c) = line.strip_prefix("kiln: playbook source commit ") {
            self.commit = Some(c.trim().to_string());
        } else if let Some(rest) = line
            .strip_prefix("TASK [")
            .or_else(|| line.strip_prefix("RUNNING HANDLER ["))
        {
            self.task = rest.rsplit_once(']').map(|(t, _)| t.to_string());
        } else if (line.starts_with("fatal: [") || line.starts_with("failed: ["))
            && self.failed_task.is_none()
        {
            self.failed_task = self.task.clone();
        } else if line.starts_with("PLAY RECAP") {
            self.in_recap = true;
        } else if self.in_recap && line.starts_with("default ") {
            let counts = line
                .split_once(':')
                .map(|(_, c)| c.split_whitespace().collect::<Vec<_>>().join(" "));
            self.recap = counts;
            self.in_recap = false;
        }
    }
}

impl Step for AnsibleStep {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &str {
        "ansible"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(self.run_playbook(ctx))
    }

    fn cleanup<'a>(&'a self, ctx: &'a CleanupContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(runner::cleanup(ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_version_commit_failed_task_and_recap() {
        let mut s = Seen::default();
        for l in [
            "ansible-playbook [core 2.19.14]",
            "kiln: playbook source commit 0123abcd",
            "TASK [web : install the page] ****",
            "ok: [default]",
            "TASK [web : break] ****",
            "fatal: [default]: FAILED! => {\"msg\": \"no\"}",
            "PLAY RECAP ****",
            "default                    : ok=3    changed=1    unreachable=0    failed=1",
        ] {
            s.line(l);
        }
        assert_eq!(s.version.as_deref(), Some("ansible-core 2.19.14"));
        assert_eq!(s.commit.as_deref(), Some("0123abcd"));
        assert_eq!(s.failed_task.as_deref(), Some("web : break"));
        assert_eq!(
            s.recap.as_deref(),
            Some("ok=3 changed=1 unreachable=0 failed=1")
        );
    }

    #[test]
    fn facts_have_ansible_names() {
        assert_eq!(
            ansible_name("KILN_BUILD_NAME").as_deref(),
            Some("kiln_build_name")
        );
        assert_eq!(ansible_name("PATH"), None);
    }

    #[test]
    fn arguments_end_with_the_playbook_after_a_double_dash() {
        let step = AnsibleStep {
            name: "ansible-1".into(),
            index: 0,
            spec: AnsibleProvisioner {
                playbook: "site.yml".into(),
                tags: vec!["a".into(), "b".into()],
                skip_tags: vec!["slow".into()],
                verbosity: 2,
                ..Default::default()
            },
        };
        assert_eq!(
            step.arguments(),
            [
                "-i",
                "/kiln/run/inventory.json",
                "--extra-vars",
                "@/kiln/run/vars.json",
                "--tags",
                "a,b",
                "--skip-tags",
                "slow",
                "-vv",
                "--",
                "site.yml"
            ]
        );
    }
}
