//! `shellLocal`: a script that runs on kiln's side, never inside the operator: in
//! a runner Pod (see `runner`) that sees the build facts as `KILN_*` variables.

use futures::future::BoxFuture;

use super::{runner, shell};
use crate::api::{ShellLocalProvisioner, duration};
use crate::engine::{CleanupContext, Step, StepContext, StepError, StepOutput};

pub struct ShellLocalStep {
    pub name: String,
    pub index: usize,
    pub spec: ShellLocalProvisioner,
}

impl ShellLocalStep {
    fn field(&self) -> String {
        format!("spec.provisioners[{}].shellLocal", self.index)
    }

    async fn run_pod(&self, ctx: &StepContext) -> Result<StepOutput, StepError> {
        let field = self.field();
        let image = runner::image(ctx, self.spec.image.as_ref(), &field)?;
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
        let name = runner::pod_name(&ctx.facts, &self.name);
        let run = runner::RunSpec {
            field: field.clone(),
            name: name.clone(),
            step: self.name.clone(),
            image,
            // The script is an argument ($0), written to the writable /tmp and run
            // with its own shebang.
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "umask 077 && printf '%s' \"$0\" > /tmp/kiln-script && chmod 700 /tmp/kiln-script && exec /tmp/kiln-script".into(),
                script,
            ],
            env: runner::container_env(&values, &self.spec.env),
            volumes: Vec::new(),
            mounts: Vec::new(),
            memory_limit: "256Mi",
            timeout,
            timeout_text: self.spec.timeout.clone(),
            secrets,
        };
        let finished = runner::run(ctx, &run, &mut |_| {}).await?;
        if finished.exit == 0 {
            return Ok(StepOutput {
                message: Some(format!("runner Pod {name}: the script exited 0")),
                ..Default::default()
            });
        }
        Err(StepError::Failed(format!(
            "{field}: the script exited with code {} in runner Pod {name}; last output:\n{}",
            finished.exit,
            finished.tail_text(runner::TAIL_LINES)
        )))
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
        Box::pin(runner::cleanup(ctx))
    }
}
