//! `file`: content of a ConfigMap or Secret key written to a path with a mode.

use futures::future::BoxFuture;

use super::connect;
use crate::api::FileProvisioner;
use crate::engine::{Step, StepContext, StepError, StepOutput};
use crate::refs;

pub struct FileStep {
    pub name: String,
    pub index: usize,
    pub spec: FileProvisioner,
}

impl FileStep {
    fn field(&self) -> String {
        format!("spec.provisioners[{}].file", self.index)
    }

    async fn content(&self, ctx: &StepContext) -> Result<Vec<u8>, StepError> {
        let ns = &ctx.facts.namespace;
        let from = &self.spec.from;
        let r = match (&from.config_map_key_ref, &from.secret_key_ref) {
            (Some(r), _) => {
                let field = format!("{}.from.configMapKeyRef", self.field());
                refs::config_map_key(&ctx.client, ns, &r.name, &r.key, &field).await
            }
            (None, Some(r)) => {
                let field = format!("{}.from.secretKeyRef", self.field());
                refs::secret_key(&ctx.client, ns, &r.name, &r.key, &field)
                    .await
                    .map(|s| s.0)
            }
            (None, None) => {
                return Err(StepError::Failed(format!(
                    "{}.from: set configMapKeyRef or secretKeyRef",
                    self.field()
                )));
            }
        };
        r.map_err(|e| StepError::Failed(e.to_string()))
    }
}

pub fn parse_mode(mode: &str, field: &str) -> Result<u32, StepError> {
    u32::from_str_radix(mode, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            StepError::Failed(format!("{field}: {mode:?} is not an octal mode like 0644"))
        })
}

impl Step for FileStep {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &str {
        "file"
    }

    fn uses_session(&self) -> bool {
        true
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let mode = parse_mode(&self.spec.mode, &format!("{}.mode", self.field()))?;
            let content = self.content(ctx).await?;
            let session = connect::open(ctx).await?;
            match session.upload(&self.spec.destination, &content, mode).await {
                Ok(()) => connect::keep(ctx, session),
                Err(e) => {
                    session.close().await;
                    return Err(connect::ssh_error(e));
                }
            }
            tracing::info!(destination = %self.spec.destination, bytes = content.len(), "file uploaded");
            Ok(StepOutput {
                message: Some(format!(
                    "wrote {} bytes to {} (mode {:04o})",
                    content.len(),
                    self.spec.destination,
                    mode
                )),
                ..Default::default()
            })
        })
    }
}
