//! The null builder: no machine is launched; an existing host is provisioned.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::{PlanError, provisioner_steps};
use crate::api::ImageBuildSpec;
use crate::engine::{Plan, Step, StepContext, StepError, StepOutput};
use crate::provisioners::connect;

pub fn plan(spec: &ImageBuildSpec) -> Result<Plan, PlanError> {
    if spec.communicator.ssh.host.is_none() {
        return Err(PlanError::Invalid(
            "spec.communicator.ssh.host: required with the null builder".into(),
        ));
    }
    let mut steps: Plan = vec![Arc::new(ConnectStep)];
    steps.extend(provisioner_steps(&spec.provisioners)?);
    Ok(steps)
}

/// Waits until the host accepts an SSH session (Packer's StepConnect), so an
/// unreachable host, a wrong key or a host key mismatch fails here, clearly.
pub struct ConnectStep;

impl Step for ConnectStep {
    fn name(&self) -> &str {
        "connect"
    }

    fn uses_session(&self) -> bool {
        true
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let target = connect::target(ctx).await?;
            let session = connect::connect(ctx, &target).await?;
            let host_key = session.host_key().map(str::to_string);
            connect::keep(ctx, session);
            let mut out = StepOutput {
                message: Some(format!(
                    "connected to {}@{}:{}",
                    target.username, target.host, target.port
                )),
                ..Default::default()
            };
            out.outputs
                .insert(connect::OUT_HOST.into(), target.host.clone());
            // Recorded so that tools which connect after kiln (Ansible) trust
            // exactly the key kiln's connection verified or accepted.
            if let Some(key) = host_key {
                out.outputs.insert(connect::OUT_HOST_KEY.into(), key);
            }
            Ok(out)
        })
    }
}
