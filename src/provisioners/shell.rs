//! `shell`: a script (inline commands or a ConfigMap key) run on the build machine.
//!
//! Like Packer, the script is uploaded and executed rather than passed on the command
//! line; environment values go into a separate 0600 file that the command sources,
//! so secret values never appear in a process list, the operator's logs or status.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use super::{build_facts, connect, shell_quote};
use crate::api::ShellProvisioner;
use crate::communicator::ssh::{OutputStream, SshError};
use crate::engine::{Step, StepContext, StepError, StepOutput};
use crate::refs;

const TAIL_LINES: usize = 20;
const TAIL_BYTES: usize = 1500;

pub struct ShellStep {
    pub name: String,
    pub index: usize,
    pub spec: ShellProvisioner,
}

impl ShellStep {
    fn field(&self) -> String {
        format!("spec.provisioners[{}].shell", self.index)
    }

    async fn script(&self, ctx: &StepContext) -> Result<String, StepError> {
        if let Some(lines) = &self.spec.inline {
            let mut s = String::from("#!/bin/sh -e\n");
            for l in lines {
                s.push_str(l);
                s.push('\n');
            }
            return Ok(s);
        }
        let Some(src) = &self.spec.script_from else {
            return Err(StepError::Failed(format!(
                "{}: set inline or scriptFrom",
                self.field()
            )));
        };
        let r = &src.config_map_key_ref;
        let field = format!("{}.scriptFrom.configMapKeyRef", self.field());
        let body = refs::config_map_key(&ctx.client, &ctx.facts.namespace, &r.name, &r.key, &field)
            .await
            .map_err(|e| StepError::Failed(e.to_string()))?;
        let body = String::from_utf8(body)
            .map_err(|_| StepError::Failed(format!("{field}: the script is not UTF-8 text")))?;
        if body.starts_with("#!") {
            Ok(body)
        } else {
            Ok(format!("#!/bin/sh\n{body}"))
        }
    }

    /// Environment for the script, and the secret values to redact from its output.
    async fn env(
        &self,
        ctx: &StepContext,
    ) -> Result<(BTreeMap<String, String>, Vec<String>), StepError> {
        let mut env = build_facts(ctx);
        let mut secrets = Vec::new();
        for (i, v) in self.spec.env.iter().enumerate() {
            let value = match (&v.value, &v.value_from) {
                (Some(value), _) => value.clone(),
                (None, Some(from)) => {
                    let r = &from.secret_key_ref;
                    let field = format!("{}.env[{i}].valueFrom.secretKeyRef", self.field());
                    let bytes = refs::secret_key(
                        &ctx.client,
                        &ctx.facts.namespace,
                        &r.name,
                        &r.key,
                        &field,
                    )
                    .await
                    .map_err(|e| StepError::Failed(e.to_string()))?;
                    let value = String::from_utf8(bytes.0).map_err(|_| {
                        StepError::Failed(format!("{field}: the value is not UTF-8 text"))
                    })?;
                    if !value.is_empty() {
                        secrets.push(value.clone());
                    }
                    value
                }
                (None, None) => {
                    return Err(StepError::Failed(format!(
                        "{}.env[{i}]: set value or valueFrom",
                        self.field()
                    )));
                }
            };
            env.insert(v.name.clone(), value);
        }
        Ok((env, secrets))
    }
}

impl Step for ShellStep {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &str {
        "shell"
    }

    fn uses_session(&self) -> bool {
        true
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(self.run_script(ctx))
    }
}

impl ShellStep {
    async fn run_script(&self, ctx: &StepContext) -> Result<StepOutput, StepError> {
        let timeout =
            connect::parse_duration(&self.spec.timeout, &format!("{}.timeout", self.field()))?;
        let script = self.script(ctx).await?;
        let (env, secrets) = self.env(ctx).await?;
        let env_file: String = env
            .iter()
            .map(|(k, v)| format!("export {k}={}\n", shell_quote(v)))
            .collect();

        let base = format!(
            "/tmp/kiln-{}-{}",
            ctx.facts.uid.get(..8).unwrap_or(&ctx.facts.uid),
            self.name
        );
        let script_path = format!("{base}.sh");
        let env_path = format!("{base}.env");
        let session = connect::open(ctx).await?;
        // Written through stdin rather than SFTP: no sftp-server per file, and the
        // files are private (umask 077) from the moment they exist.
        let write = |path: &str, mode: &str| {
            format!(
                "umask 077 && cat > {p} && chmod {mode} {p}",
                p = shell_quote(path)
            )
        };
        let upload = async {
            for (path, mode, body) in [
                (&env_path, "600", &env_file),
                (&script_path, "700", &script),
            ] {
                let r = session
                    .exec_with_input(&write(path, mode), body.as_bytes(), |_, _| {}, &ctx.cancel)
                    .await?;
                if r.exit_code != Some(0) {
                    return Err(crate::communicator::ssh::SshError::Sftp {
                        path: path.clone(),
                        detail: format!("writing it exited with {:?}", r.exit_code),
                    });
                }
            }
            Ok(())
        };
        if let Err(e) = upload.await {
            session.close().await;
            return Err(connect::ssh_error(e));
        }
        let command = format!(
            "sh -c {}",
            shell_quote(&format!(
                ". {env}; rm -f {env}; exec {script}",
                env = shell_quote(&env_path),
                script = shell_quote(&script_path)
            ))
        );

        let tail = Arc::new(Mutex::new(Tail::new(secrets)));
        let sink = tail.clone();
        let on_output = move |stream: OutputStream, data: &[u8]| {
            let mut t = sink.lock().unwrap_or_else(|p| p.into_inner());
            for line in t.push(stream, data) {
                tracing::info!(stream = ?stream, "{line}");
            }
        };
        let token = ctx.cancel.child_token();
        let result = {
            let exec = session.exec(&command, on_output, &token);
            tokio::pin!(exec);
            tokio::select! {
                r = &mut exec => Some(r),
                () = tokio::time::sleep(timeout) => {
                    token.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(10), &mut exec).await;
                    None
                }
            }
        };
        let last = tail.lock().unwrap_or_else(|p| p.into_inner()).render();
        let outcome = match result {
            None => Err(StepError::Failed(format!(
                "timed out after {}{}",
                self.spec.timeout,
                last_lines(&last)
            ))),
            Some(Ok(r)) => match (r.exit_code, r.exit_signal) {
                (Some(0), _) => Ok(()),
                (Some(code), _) => Err(StepError::Failed(format!(
                    "script exited with code {code}{}",
                    last_lines(&last)
                ))),
                (None, Some(sig)) => Err(StepError::Failed(format!(
                    "script killed by signal {sig}{}",
                    last_lines(&last)
                ))),
                (None, None) => Err(StepError::Failed(format!(
                    "script ended without an exit status{}",
                    last_lines(&last)
                ))),
            },
            Some(Err(SshError::Disconnected(_))) if self.spec.expect_disconnect => {
                tracing::info!("connection dropped as expected; waiting to reconnect");
                session.close().await;
                // The host may still be going down; give it a moment before probing.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let again = connect::open(ctx).await?;
                connect::keep(ctx, again);
                return Ok(StepOutput {
                    message: Some("disconnected as expected and reconnected".into()),
                    ..Default::default()
                });
            }
            Some(Err(e)) => Err(connect::ssh_error(e)),
        };
        let _ = session
            .exec(
                &format!(
                    "rm -f {} {}",
                    shell_quote(&script_path),
                    shell_quote(&env_path)
                ),
                |_, _| {},
                &ctx.cancel,
            )
            .await;
        match outcome {
            Ok(()) => connect::keep(ctx, session),
            Err(e) => {
                session.close().await;
                return Err(e);
            }
        }
        Ok(StepOutput {
            message: Some("script exited with code 0".into()),
            ..Default::default()
        })
    }
}

fn last_lines(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; last output:\n{tail}")
    }
}

/// Splits streamed chunks into lines, redacts secret values, keeps the last lines.
struct Tail {
    secrets: Vec<String>,
    partial: [Vec<u8>; 2],
    lines: VecDeque<String>,
}

impl Tail {
    fn new(secrets: Vec<String>) -> Self {
        Tail {
            secrets,
            partial: [Vec::new(), Vec::new()],
            lines: VecDeque::new(),
        }
    }

    fn push(&mut self, stream: OutputStream, data: &[u8]) -> Vec<String> {
        let i = usize::from(matches!(stream, OutputStream::Stderr));
        self.partial[i].extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(pos) = self.partial[i].iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.partial[i].drain(..=pos).collect();
            let line =
                self.redact(String::from_utf8_lossy(&raw[..raw.len() - 1]).trim_end_matches('\r'));
            self.keep(line.clone());
            out.push(line);
        }
        // Unbounded partial lines would let one endless line grow memory.
        if self.partial[i].len() > 8192 {
            let raw = std::mem::take(&mut self.partial[i]);
            let line = self.redact(&String::from_utf8_lossy(&raw));
            self.keep(line.clone());
            out.push(line);
        }
        out
    }

    fn redact(&self, line: &str) -> String {
        let mut l = line.to_string();
        for s in &self.secrets {
            l = l.replace(s.as_str(), "<redacted>");
        }
        l
    }

    fn keep(&mut self, line: String) {
        self.lines.push_back(line);
        while self.lines.len() > TAIL_LINES {
            self.lines.pop_front();
        }
    }

    fn render(&mut self) -> String {
        for i in 0..2 {
            if !self.partial[i].is_empty() {
                let raw = std::mem::take(&mut self.partial[i]);
                let line = self.redact(&String::from_utf8_lossy(&raw));
                self.keep(line);
            }
        }
        let mut s: String = self.lines.iter().map(|l| format!("{l}\n")).collect();
        if s.len() > TAIL_BYTES {
            let mut cut = s.len() - TAIL_BYTES;
            while !s.is_char_boundary(cut) {
                cut += 1;
            }
            s = s[cut..].to_string();
        }
        s.trim_end().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines_and_redacts() {
        let mut t = Tail::new(vec!["hunter2".into()]);
        for i in 0..30 {
            t.push(OutputStream::Stdout, format!("line {i}\n").as_bytes());
        }
        t.push(OutputStream::Stderr, b"pass is hun");
        t.push(OutputStream::Stderr, b"ter2 ok\nunterminated");
        let r = t.render();
        assert!(r.contains("pass is <redacted> ok"), "{r}");
        assert!(!r.contains("hunter2"));
        assert!(r.ends_with("unterminated"));
        assert!(!r.contains("line 5\n"));
        assert_eq!(r.lines().count(), TAIL_LINES);
    }
}
