//! Builders turn a spec into the ordered steps of a build.

pub mod amazon;
pub mod null;

use std::sync::Arc;

use crate::api::{ImageBuildSpec, Provisioner};
use crate::engine::Plan;
use crate::provisioners::ansible::AnsibleStep;
use crate::provisioners::file::FileStep;
use crate::provisioners::shell::ShellStep;
use crate::provisioners::shell_local::ShellLocalStep;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("spec.builder: exactly one builder must be set: null or amazonEBS")]
    NoBuilder,
    #[error(
        "spec.builder.amazonEBS: the amazon-ebs builder is not available in this version of kiln yet"
    )]
    Unsupported,
    #[error("{0}")]
    Invalid(String),
}

/// What the operator's installation allows a build to do beyond its schema.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// URL prefixes `spec.builder.amazonEBS.endpoint` may start with. Empty: no
    /// endpoint may be set. An endpoint receives requests signed with the
    /// operator's cloud credentials, so it is the installer's choice, not a tenant's.
    pub allowed_endpoints: Vec<String>,
}

/// Whether a new build of this spec may start under the operator's policy. Only a
/// new build is checked: a build that started under an older policy is still
/// cleaned up with the spec it recorded.
pub fn admit(spec: &ImageBuildSpec, policy: &Policy) -> Result<(), PlanError> {
    let Some(endpoint) = spec
        .builder
        .amazon_ebs
        .as_ref()
        .and_then(|e| e.endpoint.as_ref())
    else {
        return Ok(());
    };
    if policy
        .allowed_endpoints
        .iter()
        .any(|allowed| !allowed.is_empty() && endpoint.starts_with(allowed.as_str()))
    {
        return Ok(());
    }
    Err(PlanError::Invalid(format!(
        "spec.builder.amazonEBS.endpoint: {endpoint:?} is not allowed by this kiln installation (it would receive requests signed with the operator's credentials); the operator allows {}",
        if policy.allowed_endpoints.is_empty() {
            "no endpoint (--allowed-endpoints, the chart's aws.allowedEndpoints)".to_string()
        } else {
            format!(
                "endpoints starting with {}",
                policy.allowed_endpoints.join(", ")
            )
        }
    )))
}

/// The largest spec a build accepts: status records a copy (`status.buildSpec`), and
/// the object with both must stay well inside etcd's 1.5 MiB request limit. A larger
/// one used to be admitted and then fail every status write, with no status at all.
pub const MAX_SPEC_BYTES: usize = 512 * 1024;

pub fn plan(spec: &ImageBuildSpec) -> Result<Plan, PlanError> {
    let size = serde_json::to_vec(spec).map_or(0, |v| v.len());
    if size > MAX_SPEC_BYTES {
        return Err(PlanError::Invalid(format!(
            "spec: {} KiB, more than the {} KiB kiln can record in status; move long scripts and files to ConfigMaps (shell scriptFrom, file from)",
            size / 1024,
            MAX_SPEC_BYTES / 1024
        )));
    }
    match (&spec.builder.null, &spec.builder.amazon_ebs) {
        (Some(_), None) => null::plan(spec),
        (None, Some(_)) => amazon::plan(spec),
        _ => Err(PlanError::NoBuilder),
    }
}

/// What removes every image of an ImageBuild on deletion (`artifactPolicy: Delete`):
/// a step whose `cleanup` does it, for builders that make images.
pub fn artifact_remover(spec: &ImageBuildSpec) -> Option<std::sync::Arc<dyn crate::engine::Step>> {
    match (&spec.builder.null, &spec.builder.amazon_ebs) {
        (None, Some(_)) => Some(Arc::new(amazon::RemoveArtifacts)),
        _ => None,
    }
}

/// Whether builds of this spec can run again and again (a pipeline's template):
/// each must name its image differently, or the second one fails on the name.
pub fn repeatable(spec: &ImageBuildSpec) -> Result<(), PlanError> {
    match &spec.builder.amazon_ebs {
        Some(ebs) => amazon::repeatable(ebs),
        None => Ok(()),
    }
}

/// The source image a build of this spec would start from now, for builders that
/// have one (`None` for the null builder): a pipeline's `onSourceChange` compares it
/// with the source of its latest version.
pub async fn current_source(
    spec: &ImageBuildSpec,
    client: &kube::Client,
    namespace: &str,
) -> Result<Option<String>, crate::engine::StepError> {
    match &spec.builder.amazon_ebs {
        Some(ebs) => amazon::current_source(ebs, client, namespace)
            .await
            .map(Some),
        None => Ok(None),
    }
}

/// Fixes the source image of a build of this spec to `image` (one `current_source`
/// returned), so that what the build starts from is what the pipeline decided on.
pub fn pin_source(spec: &mut ImageBuildSpec, image: &str) {
    if let Some(ebs) = &mut spec.builder.amazon_ebs {
        ebs.source_ami = Some(image.to_string());
        ebs.source_ami_filter = None;
    }
}

/// Secrets (in the build's namespace) that cleaning up a build of this spec reads:
/// kiln holds them with a finalizer while there is anything to clean up.
pub fn cleanup_secrets(spec: &ImageBuildSpec) -> Vec<String> {
    spec.builder
        .amazon_ebs
        .as_ref()
        .and_then(|e| e.credentials.as_ref())
        .map(|c| vec![c.secret_ref.name.clone()])
        .unwrap_or_default()
}

/// The regions a build of this spec creates resources in.
pub fn regions(spec: &ImageBuildSpec) -> Vec<String> {
    match &spec.builder.amazon_ebs {
        Some(ebs) => {
            let mut r = vec![ebs.region.clone()];
            for region in &ebs.ami_regions {
                if !r.contains(region) {
                    r.push(region.clone());
                }
            }
            r
        }
        None => Vec::new(),
    }
}

/// Provisioner steps, named `shell-1`, `file-2`, … by position so names stay unique
/// and stable for a generation.
pub fn provisioner_steps(provisioners: &[Provisioner]) -> Result<Plan, PlanError> {
    let mut steps: Plan = Vec::with_capacity(provisioners.len());
    for (i, p) in provisioners.iter().enumerate() {
        // The one dispatch point for provisioners: each set field is a candidate.
        let mut set: Vec<Arc<dyn crate::engine::Step>> = Vec::new();
        if let Some(shell) = &p.shell {
            set.push(Arc::new(ShellStep {
                name: format!("shell-{}", i + 1),
                index: i,
                spec: shell.clone(),
            }));
        }
        if let Some(file) = &p.file {
            set.push(Arc::new(FileStep {
                name: format!("file-{}", i + 1),
                index: i,
                spec: file.clone(),
            }));
        }
        if let Some(local) = &p.shell_local {
            set.push(Arc::new(ShellLocalStep {
                name: format!("shell-local-{}", i + 1),
                index: i,
                spec: local.clone(),
            }));
        }
        if let Some(ansible) = &p.ansible {
            set.push(Arc::new(AnsibleStep {
                name: format!("ansible-{}", i + 1),
                index: i,
                spec: ansible.clone(),
            }));
        }
        match (set.pop(), set.is_empty()) {
            (Some(step), true) => steps.push(step),
            _ => {
                return Err(PlanError::Invalid(format!(
                    "spec.provisioners[{i}]: set exactly one of shell, file, shellLocal or ansible"
                )));
            }
        }
    }
    Ok(steps)
}
