//! `shell`: a script (inline commands or a ConfigMap key) run on the build machine.
//!
//! Like Packer, the script is uploaded and executed rather than passed on the command
//! line; environment values go into a separate 0600 file that the command sources,
//! so secret values never appear in a process list, the operator's logs or status.
//! Both live in a private directory per attempt (see [`Attempt`]), and an attempt
//! first stops whatever an earlier one left running.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use tokio_util::sync::CancellationToken;

use super::mask::Masker;
use super::{build_facts, connect, shell_quote};
use crate::api::ShellProvisioner;
use crate::api::{StepPhase, StepRecord};
use crate::communicator::ssh::{ExecResult, OutputStream, Session, SshError, unique_token};
use crate::engine::{BuildOutcome, CleanupContext, Step, StepContext, StepError, StepOutput};
use crate::refs;

const TAIL_LINES: usize = 20;
const TAIL_BYTES: usize = 1500;
/// How long an `expectDisconnect` script that exited gets for the connection to drop.
/// A reboot drops it within seconds, when the session's processes are stopped.
const DISCONNECT_WAIT: Duration = Duration::from_secs(30);
/// Pause between the drop and the first reconnect attempt.
const RECONNECT_PAUSE: Duration = Duration::from_secs(2);
/// A cancelled step's cleanup: how long it tries to reach the machine, and how long
/// stopping what its attempts left may take (TERM, then KILL after 5 s).
const CLEANUP_CONNECT: Duration = Duration::from_secs(10);
const CLEANUP_STOP: Duration = Duration::from_secs(30);
/// Bound for removing an attempt's directory.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

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
        script(
            ctx,
            self.spec.inline.as_deref(),
            self.spec.script_from.as_ref(),
            &self.field(),
        )
        .await
    }

    /// Environment for the script, and the secret values to redact from its output.
    async fn env(
        &self,
        ctx: &StepContext,
    ) -> Result<(BTreeMap<String, String>, Vec<String>), StepError> {
        env(ctx, &self.spec.env, &self.field()).await
    }
}

/// The script of a shell or shell-local step: inline commands, or a ConfigMap key.
pub(crate) async fn script(
    ctx: &StepContext,
    inline: Option<&[String]>,
    script_from: Option<&crate::api::ScriptSource>,
    field: &str,
) -> Result<String, StepError> {
    if let Some(lines) = inline {
        let mut s = String::from("#!/bin/sh -e\n");
        for l in lines {
            s.push_str(l);
            s.push('\n');
        }
        return Ok(s);
    }
    let Some(src) = script_from else {
        return Err(StepError::Failed(format!(
            "{field}: set inline or scriptFrom"
        )));
    };
    let r = &src.config_map_key_ref;
    let field = format!("{field}.scriptFrom.configMapKeyRef");
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

/// The build facts and the step's `env`, and the Secret values to redact from its
/// output.
pub(crate) async fn env(
    ctx: &StepContext,
    vars: &[crate::api::EnvVar],
    field: &str,
) -> Result<(BTreeMap<String, String>, Vec<String>), StepError> {
    let mut env = build_facts(ctx);
    let mut secrets = Vec::new();
    for (i, v) in vars.iter().enumerate() {
        let value = match (&v.value, &v.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) => {
                let r = &from.secret_key_ref;
                let field = format!("{field}.env[{i}].valueFrom.secretKeyRef");
                let bytes =
                    refs::secret_key(&ctx.client, &ctx.facts.namespace, &r.name, &r.key, &field)
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
                    "{field}.env[{i}]: set value or valueFrom"
                )));
            }
        };
        env.insert(v.name.clone(), value);
    }
    Ok((env, secrets))
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

    /// A step stopped while it ran (its build deleted or superseded) may have left
    /// its script running: a running operator stops it when it cancels the step, but
    /// one that was killed first never resumes a superseded build's step.
    fn needs_cleanup(&self, record: &StepRecord, _outcome: BuildOutcome) -> bool {
        record.phase == StepPhase::Cancelled
    }

    /// Stops what the step's attempts left running and removes their directories,
    /// as the next attempt would have. Best effort: a machine that cannot be reached
    /// (gone, or its credentials gone) runs nothing of the step's to stop, so that
    /// never holds up the rest of the cleanup.
    fn cleanup<'a>(&'a self, ctx: &'a CleanupContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            if let Err(e) = self.stop_attempts(ctx).await {
                tracing::warn!(error = %e, "could not stop what the step may have left running on the machine");
            }
            Ok(())
        })
    }
}

impl ShellStep {
    async fn stop_attempts(&self, ctx: &CleanupContext) -> Result<(), String> {
        let mut target = connect::target_of(&connect::Build {
            spec: &ctx.spec,
            outputs: &ctx.outputs,
            client: &ctx.client,
            namespace: &ctx.facts.namespace,
        })
        .await
        .map_err(|e| e.to_string())?;
        target.connect_timeout = target.connect_timeout.min(CLEANUP_CONNECT);
        let cancel = CancellationToken::new();
        let session = crate::communicator::ssh::connect(&target, &cancel)
            .await
            .map_err(|e| e.to_string())?;
        let attempt = Attempt::new(&ctx.facts.uid, &self.name);
        let command = format!(
            "sh -c {} kiln-stop {} '' 0",
            shell_quote(STOP_EARLIER),
            shell_quote(&attempt.prefix)
        );
        let mut stderr = Vec::new();
        let r = tokio::time::timeout(
            CLEANUP_STOP,
            session.exec(
                &command,
                |stream, data| {
                    if stream == OutputStream::Stderr {
                        stderr.extend_from_slice(data);
                    }
                },
                &cancel,
            ),
        )
        .await;
        session.close().await;
        let said = String::from_utf8_lossy(&stderr).trim().to_string();
        match r {
            Ok(Ok(r)) if r.success() => {
                if !said.is_empty() {
                    tracing::info!("{said}");
                }
                Ok(())
            }
            Ok(Ok(r)) => Err(format!("exit {:?}: {said}", r.exit_code)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {CLEANUP_STOP:?}")),
        }
    }

    async fn run_script(&self, ctx: &StepContext) -> Result<StepOutput, StepError> {
        let timeout =
            connect::parse_duration(&self.spec.timeout, &format!("{}.timeout", self.field()))?;
        let script = self.script(ctx).await?;
        let (env, secrets) = self.env(ctx).await?;
        let env_file: String = env
            .iter()
            .map(|(k, v)| format!("export {k}={}\n", shell_quote(v)))
            .collect();

        let attempt = Attempt::new(&ctx.facts.uid, &self.name);
        let session = connect::open(ctx).await?;
        if let Err(e) = attempt.prepare(&session, &env_file, &script, ctx).await {
            session.close().await;
            return Err(e);
        }

        let tail = Arc::new(Mutex::new(Tail::new(secrets)));
        let sink = tail.clone();
        let on_output = move |stream: OutputStream, data: &[u8]| {
            let mut t = sink.lock().unwrap_or_else(|p| p.into_inner());
            for line in t.push(stream, data) {
                tracing::info!(stream = ?stream, "{line}");
            }
        };
        let token = ctx.cancel.child_token();
        let command = attempt.run_command();
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
        let last = {
            let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
            // What the maskers still held: output that could have begun a value.
            for (stream, line) in t.finish() {
                tracing::info!(stream = ?stream, "{line}");
            }
            t.render()
        };
        if self.spec.expect_disconnect
            && let Some(how) = expected_disconnect(&result)
        {
            return self.reconnect(ctx, session, &attempt, &how).await;
        }
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
            Some(Err(e)) => Err(connect::ssh_error(e)),
        };
        attempt.remove(&session).await;
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

    /// After an `expectDisconnect` script: the session is never kept, since the host
    /// may be going down under it, and the next step gets a new connection.
    async fn reconnect(
        &self,
        ctx: &StepContext,
        session: Session,
        attempt: &Attempt,
        how: &str,
    ) -> Result<StepOutput, StepError> {
        // `sudo reboot` queues the reboot and exits 0 while sshd still answers: a new
        // connection made now could reach the dying host. This connection dropping is
        // the sign that the host is really going down.
        let mut message = format!("{how}, disconnected as expected and reconnected");
        if !session.is_closed() {
            tracing::info!(
                wait_s = DISCONNECT_WAIT.as_secs(),
                "{how}; waiting for the connection to drop"
            );
            let dropped = tokio::select! {
                d = session.closed_within(DISCONNECT_WAIT) => d,
                () = ctx.cancel.cancelled() => {
                    session.close().await;
                    return Err(StepError::Cancelled);
                }
            };
            if !dropped {
                tracing::info!("the connection stayed up; connecting again all the same");
                message = format!(
                    "{how}; the connection stayed up for {}s, reconnected",
                    DISCONNECT_WAIT.as_secs()
                );
            }
        }
        session.close().await;
        tracing::info!("connection closed as expected; waiting to reconnect");
        // Once our session is gone, sshd may still accept new ones for a moment while
        // the host shuts down.
        tokio::select! {
            () = tokio::time::sleep(RECONNECT_PAUSE) => {}
            () = ctx.cancel.cancelled() => return Err(StepError::Cancelled),
        }
        // Not `connect::open`: whatever is kept for the build predates the disconnect.
        let target = connect::target(ctx).await?;
        let again = connect::connect(ctx, &target).await?;
        // After a reboot /tmp is usually empty; otherwise the script is still there.
        attempt.remove(&again).await;
        connect::keep(ctx, again);
        Ok(StepOutput {
            message: Some(message),
            ..Default::default()
        })
    }
}

/// How an `expectDisconnect` script ended, if that is the disconnect it announced:
/// exit 0 (the reboot was queued), killed by a signal (the shutdown got to it first)
/// or the connection dropped before any exit status.
fn expected_disconnect(result: &Option<Result<ExecResult, SshError>>) -> Option<String> {
    match result {
        Some(Ok(ExecResult {
            exit_code: Some(0), ..
        })) => Some("script exited with code 0".into()),
        Some(Ok(ExecResult {
            exit_code: None,
            exit_signal: Some(sig),
        })) => Some(format!("script killed by signal {sig}")),
        Some(Err(SshError::Disconnected(_))) => Some("connection dropped".into()),
        _ => None,
    }
}

/// One run of the step on the build machine, in a directory of its own.
///
/// The operator can die (SIGKILL, OOM, lost node or lease) while the script runs, and
/// sshd keeps a non-pty command running without its client, so the resumed step would
/// run the script a second time beside the first. Each attempt therefore writes its
/// process group to `pid` in its directory, and the next attempt stops every earlier
/// one it finds before it starts. The directories are `/tmp/kiln-<build uid>-<step>.`
/// plus a random suffix, made with `mkdir -m 700` (what `mktemp -d` does), so another
/// user of the host can neither predict them nor plant files in them, and an earlier
/// attempt's final `rm` only ever removes its own.
struct Attempt {
    /// What every attempt of this step of this build starts with.
    prefix: String,
    dir: String,
}

impl Attempt {
    fn new(uid: &str, step: &str) -> Self {
        let prefix = format!("/tmp/kiln-{uid}-{step}.");
        let dir = format!("{prefix}{}", unique_token());
        Attempt { prefix, dir }
    }

    /// Stops earlier attempts, makes this attempt's directory and writes the
    /// environment file and the script into it.
    #[tracing::instrument(skip_all, fields(dir = %self.dir))]
    async fn prepare(
        &self,
        session: &Session,
        env_file: &str,
        script: &str,
        ctx: &StepContext,
    ) -> Result<(), StepError> {
        let command = format!(
            "sh -c {} kiln-prepare {} {} \"$$\"",
            shell_quote(PREPARE),
            shell_quote(&self.prefix),
            shell_quote(&self.dir)
        );
        self.exec_checked(session, &command, env_file, ctx, "preparing")
            .await?;
        let script_path = format!("{}/script", self.dir);
        let write = format!(
            "umask 077 && cat > {p} && chmod 700 {p}",
            p = shell_quote(&script_path)
        );
        self.exec_checked(session, &write, script, ctx, "writing the script")
            .await
    }

    async fn exec_checked(
        &self,
        session: &Session,
        command: &str,
        input: &str,
        ctx: &StepContext,
        what: &str,
    ) -> Result<(), StepError> {
        let mut stderr = Vec::new();
        let r = session
            .exec_with_input(
                command,
                input.as_bytes(),
                |stream, data| {
                    if matches!(stream, OutputStream::Stderr) && stderr.len() < 4096 {
                        stderr.extend_from_slice(data);
                    }
                },
                &ctx.cancel,
            )
            .await
            .map_err(connect::ssh_error)?;
        let said = String::from_utf8_lossy(&stderr);
        let said = said.trim();
        if r.exit_code == Some(0) {
            if !said.is_empty() {
                tracing::info!("{said}");
            }
            return Ok(());
        }
        Err(StepError::Failed(match r.exit_code {
            Some(EARLIER_ATTEMPT_STUCK) => format!(
                "an earlier attempt of this step is still running on the build machine: {said}"
            ),
            _ => format!(
                "{what} in {} on the build machine failed ({}){}",
                self.dir,
                r.exit_code
                    .map_or_else(|| format!("{r:?}"), |c| format!("exit code {c}")),
                if said.is_empty() {
                    String::new()
                } else {
                    format!(": {said}")
                }
            ),
        }))
    }

    /// Records the process group, then sources and deletes the environment file and
    /// executes the script. `exec` keeps one process, the group leader, from the login
    /// shell to the script, and its command line names the directory throughout: that
    /// is how a later attempt tells it from an unrelated process that got its PID.
    fn run_command(&self) -> String {
        format!(
            "echo $$ > {pid} && exec sh -c {run} kiln-shell {dir}",
            pid = shell_quote(&format!("{}/pid", self.dir)),
            run = shell_quote(r#". "$1/env" && rm -f "$1/env" && exec "$1/script""#),
            dir = shell_quote(&self.dir)
        )
    }

    /// Best effort: a later attempt removes what is left, and the script alone (the
    /// environment file is gone once sourced) holds no secrets.
    async fn remove(&self, session: &Session) {
        // Not the step's token: a cancelled step should still clean up.
        let token = CancellationToken::new();
        let command = format!("rm -rf -- {}", shell_quote(&self.dir));
        let rm = session.exec(&command, |_, _| {}, &token);
        match tokio::time::timeout(REMOVE_TIMEOUT, rm).await {
            Ok(Ok(r)) if r.success() => {}
            other => {
                tracing::debug!(dir = %self.dir, result = ?other.map(|r| r.map(|r| r.exit_code)), "could not remove the attempt's directory")
            }
        }
    }
}

/// Exit code of [`PREPARE`] when an earlier attempt survived SIGKILL.
const EARLIER_ATTEMPT_STUCK: u32 = 3;

/// The part of [`PREPARE`] that stops earlier attempts and removes their directories.
macro_rules! stop_earlier {
    () => {
        r#"prefix=$1 dir=$2 self=$3
ours() {
	if [ -r /proc/self/cmdline ] && [ -e "/proc/$1" ]; then
		tr '\000' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$2"
		return
	fi
	kill -s 0 -- "-$1" 2>/dev/null
}
stop() {
	kill -s TERM -- "-$1" 2>/dev/null || return 0
	n=0
	while kill -s 0 -- "-$1" 2>/dev/null; do
		n=$((n + 1))
		if [ "$n" -eq 50 ]; then kill -s KILL -- "-$1" 2>/dev/null; fi
		if [ "$n" -gt 100 ]; then return 1; fi
		sleep 0.1 2>/dev/null || sleep 1
	done
}
for old in "$prefix"*; do
	[ -d "$old" ] && [ ! -L "$old" ] && [ -O "$old" ] || continue
	pid=$(cat "$old/pid" 2>/dev/null) || pid=
	case $pid in ''|*[!0-9]*) pid=0 ;; esac
	if [ "$pid" -gt 1 ] && [ "$pid" != "$self" ] && ours "$pid" "$old"; then
		echo "stopped process group $pid of an earlier attempt ($old)" >&2
		stop "$pid" || { echo "process group $pid ($old) is still there after SIGKILL" >&2; exit 3; }
	fi
	rm -rf -- "$old"
done
"#
    };
}

/// `sh -c STOP_EARLIER kiln-stop <prefix> '' 0`: the first half of [`PREPARE`], for
/// a cancelled step's cleanup.
const STOP_EARLIER: &str = stop_earlier!();

/// Run as `sh -c PREPARE kiln-prepare <prefix> <dir> <our pgid>`, the environment
/// file on stdin. An earlier attempt is a directory `<prefix>*` of ours (not a
/// symlink, owned by us: nobody else can make one); its `pid` is its process group.
/// That PID could since belong to another process: on Linux, a live leader must still
/// name the directory on its command line; a gone leader's PID cannot be reused while
/// its group has members, so a group that still answers is the attempt's. TERM, then
/// KILL after 5 s; the step does not start while the group lives.
const PREPARE: &str = concat!(
    stop_earlier!(),
    r#"umask 077
mkdir -m 700 -- "$dir" && cat > "$dir/env"
"#
);

fn last_lines(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; last output:\n{tail}")
    }
}

/// Masks secret values in streamed chunks, splits them into lines, keeps the last lines.
struct Tail {
    /// One per stream: a value split across chunks is masked before any line is cut.
    maskers: [Masker; 2],
    partial: [Vec<u8>; 2],
    lines: VecDeque<String>,
}

impl Tail {
    fn new(secrets: Vec<String>) -> Self {
        Tail {
            maskers: [Masker::new(&secrets), Masker::new(&secrets)],
            partial: [Vec::new(), Vec::new()],
            lines: VecDeque::new(),
        }
    }

    fn push(&mut self, stream: OutputStream, data: &[u8]) -> Vec<String> {
        let i = usize::from(matches!(stream, OutputStream::Stderr));
        let masked = self.maskers[i].push(data);
        self.lines_of(i, &masked)
    }

    /// Splits masked output into lines.
    fn lines_of(&mut self, i: usize, masked: &[u8]) -> Vec<String> {
        self.partial[i].extend_from_slice(masked);
        let mut out = Vec::new();
        while let Some(pos) = self.partial[i].iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.partial[i].drain(..=pos).collect();
            let line = String::from_utf8_lossy(&raw[..raw.len() - 1])
                .trim_end_matches('\r')
                .to_string();
            self.keep(line.clone());
            out.push(line);
        }
        // Unbounded partial lines would let one endless line grow memory.
        if self.partial[i].len() > 8192 {
            let raw = std::mem::take(&mut self.partial[i]);
            let line = String::from_utf8_lossy(&raw).to_string();
            self.keep(line.clone());
            out.push(line);
        }
        out
    }

    fn keep(&mut self, line: String) {
        self.lines.push_back(line);
        while self.lines.len() > TAIL_LINES {
            self.lines.pop_front();
        }
    }

    /// The complete lines the maskers still held at the end of the output.
    fn finish(&mut self) -> Vec<(OutputStream, String)> {
        let mut out = Vec::new();
        for (i, stream) in [(0, OutputStream::Stdout), (1, OutputStream::Stderr)] {
            let rest = self.maskers[i].flush();
            out.extend(self.lines_of(i, &rest).into_iter().map(|l| (stream, l)));
        }
        out
    }

    fn render(&mut self) -> String {
        self.finish();
        for i in 0..2 {
            if !self.partial[i].is_empty() {
                let raw = std::mem::take(&mut self.partial[i]);
                self.keep(String::from_utf8_lossy(&raw).to_string());
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
    fn what_counts_as_the_expected_disconnect() {
        let exit = |code| {
            Some(Ok(ExecResult {
                exit_code: Some(code),
                exit_signal: None,
            }))
        };
        let signal = Some(Ok(ExecResult {
            exit_code: None,
            exit_signal: Some("TERM".into()),
        }));
        assert!(expected_disconnect(&exit(0)).is_some());
        assert!(expected_disconnect(&signal).is_some());
        assert!(expected_disconnect(&Some(Err(SshError::Disconnected("x".into())))).is_some());
        assert_eq!(expected_disconnect(&exit(1)), None);
        assert_eq!(
            expected_disconnect(&None),
            None,
            "a timeout is no disconnect"
        );
        assert_eq!(
            expected_disconnect(&Some(Err(SshError::Protocol("x".into())))),
            None
        );
    }

    /// PREPARE run here with `sh`, as sshd would run it on the build machine: the
    /// earlier attempt's process group is stopped, a process that merely got a PID an
    /// earlier attempt recorded is left alone, and the new directory is private.
    #[test]
    fn prepare_stops_earlier_attempts_and_only_them() {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};

        let base = std::env::temp_dir().join(format!("kiln-prepare-test-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let prefix = format!("{}/kiln-uid-shell-1.", base.display());
        let group = |cmd: &mut Command| cmd.process_group(0).spawn().unwrap();

        let earlier = format!("{prefix}earlier");
        std::fs::create_dir(&earlier).unwrap();
        // Its leader names its directory on the command line, as a real attempt's does.
        let mut attempt = group(Command::new("sh").args(["-c", "sleep 30; :", &earlier]));
        std::fs::write(format!("{earlier}/pid"), attempt.id().to_string()).unwrap();
        // Reaped as soon as it ends, as sshd reaps its child: a zombie leader would
        // keep the group answering.
        let attempt_status = std::thread::spawn(move || attempt.wait().unwrap());

        let reused = format!("{prefix}reused");
        std::fs::create_dir(&reused).unwrap();
        let mut stranger = group(Command::new("sleep").arg("30"));
        std::fs::write(format!("{reused}/pid"), stranger.id().to_string()).unwrap();

        let new = format!("{prefix}new");
        let mut prep = Command::new("sh")
            .args(["-c", PREPARE, "kiln-prepare", &prefix, &new, "1"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            prep.stdin
                .take()
                .unwrap()
                .write_all(b"export A='1'\n")
                .unwrap();
        }
        let out = prep.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let stranger_alive = stranger.try_wait().unwrap().is_none();
        let _ = stranger.kill();
        let _ = stranger.wait();
        let attempt_status = attempt_status.join().unwrap();
        let env = std::fs::read_to_string(format!("{new}/env"));
        let dir_mode = std::fs::metadata(&new).map(|m| m.permissions().mode() & 0o777);
        let env_mode =
            std::fs::metadata(format!("{new}/env")).map(|m| m.permissions().mode() & 0o777);
        let left = [&earlier, &reused].map(|d| std::path::Path::new(d).exists());
        std::fs::remove_dir_all(&base).unwrap();

        assert!(out.status.success(), "{:?}: {stderr}", out.status);
        assert!(stderr.contains("stopped process group"), "{stderr}");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            attempt_status.signal(),
            Some(15),
            "the earlier attempt got SIGTERM"
        );
        assert!(
            stranger_alive,
            "a process that is not the attempt was stopped"
        );
        assert_eq!(left, [false, false], "earlier directories are removed");
        assert_eq!(env.unwrap(), "export A='1'\n");
        assert_eq!(dir_mode.unwrap(), 0o700);
        assert_eq!(env_mode.unwrap(), 0o600);
    }

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
