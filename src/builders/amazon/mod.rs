//! amazon-ebs: Packer's flow as durable, recorded steps on aws-sdk-ec2.
//!
//! Every resource is tagged `kiln.dev/build-uid` (or has a name derived from the
//! build's UID) and recorded in status before anything waits on it, so a resumed
//! step finds what an earlier attempt made instead of making a second one.

mod client;
mod image;
mod instance;
mod key_pair;
mod security_group;
mod source;
mod wait;

use std::sync::Arc;
use std::time::Duration;

pub use client::{AwsError, Ec2, http_client, new_http_client};
pub use image::RemoveArtifacts;
pub use source::current_source;
pub use wait::{Kind as WaitKind, wait_for};

use super::{PlanError, provisioner_steps};
use crate::api::{AmazonEbsBuilder, ImageBuildSpec, duration};
use crate::builders::null::ConnectStep;
use crate::engine::{Plan, StepError};

pub const KIND: &str = "amazon-ebs";

/// Step output keys shared between amazon steps.
pub mod out {
    pub const AMI_NAME: &str = "ami_name";
    pub const SOURCE_AMI: &str = "source_ami";
    pub const KEY_PAIR: &str = "key_pair_name";
    /// The `KeyPairId` of a key pair kiln imported (not of a given one).
    pub const KEY_PAIR_ID: &str = "key_pair_id";
    pub const SECURITY_GROUPS: &str = "security_group_ids";
    pub const INSTANCE_ID: &str = "instance_id";
    /// IDs of the running instance's volumes that outlive it, comma-separated
    /// (empty: every volume goes with the instance).
    pub const KEPT_VOLUMES: &str = "kept_volumes";
    pub const REGION: &str = "region";
    pub const IMAGE_ID: &str = "image_id";
}

pub fn plan(spec: &ImageBuildSpec) -> Result<Plan, PlanError> {
    let Some(ebs) = &spec.builder.amazon_ebs else {
        return Err(PlanError::NoBuilder);
    };
    // Refused before anything is created: a value the schema admits but kiln cannot
    // use would otherwise fail after the instance is launched.
    waits(ebs).map_err(|e| PlanError::Invalid(e.to_string()))?;
    let expanded = expand_name(&ebs.ami_name, "n", "ns", 1, 0);
    if let Some(start) = expanded.find("{{") {
        let unknown = expanded[start..]
            .split("}}")
            .next()
            .unwrap_or_default()
            .trim_start_matches("{{")
            .trim();
        return Err(PlanError::Invalid(format!(
            "spec.builder.amazonEBS.amiName: unknown variable {{{{ {unknown} }}}}; known: build.timestamp, build.name, build.namespace, build.generation"
        )));
    }
    // Also for objects admitted before the schema required it.
    if let Some(f) = &ebs.source_ami_filter
        && f.owners.is_empty()
        && !f.any_owner
    {
        return Err(PlanError::Invalid(
            "spec.builder.amazonEBS.sourceAMIFilter.owners: required (account IDs, self, amazon or aws-marketplace), or set anyOwner: true".into(),
        ));
    }
    for (field, map) in [
        ("tags", &ebs.tags),
        ("runTags", &ebs.run_tags),
        ("snapshotTags", &ebs.snapshot_tags),
    ] {
        if let Some(k) = map.keys().find(|k| reserved_tag(k)) {
            return Err(PlanError::Invalid(format!(
                "spec.builder.amazonEBS.{field}: {k:?} is reserved: tag keys starting with kiln.dev/ are kiln's own (cleanup finds resources by them), and aws: is AWS's"
            )));
        }
    }
    let mut steps: Plan = vec![
        Arc::new(source::PreValidate),
        Arc::new(source::SourceImage),
        Arc::new(key_pair::KeyPairStep),
        Arc::new(security_group::SecurityGroupStep),
        Arc::new(instance::RunInstance),
        Arc::new(instance::InstanceReady),
        Arc::new(ConnectStep),
    ];
    steps.extend(provisioner_steps(&spec.provisioners)?);
    steps.push(Arc::new(instance::StopInstance));
    if ebs.force_deregister {
        steps.push(Arc::new(image::DeregisterExisting));
    }
    let encrypt = ebs.encrypt_boot || ebs.kms_key_id.is_some();
    steps.push(Arc::new(image::CreateImage { encrypt }));
    if encrypt {
        steps.push(Arc::new(image::CopyImage {
            name: "encrypt-image".into(),
            region: ebs.region.clone(),
        }));
    }
    let mut seen = vec![ebs.region.clone()];
    for region in &ebs.ami_regions {
        if seen.contains(region) {
            continue;
        }
        seen.push(region.clone());
        steps.push(Arc::new(image::CopyImage {
            name: format!("copy-image-{region}"),
            region: region.clone(),
        }));
    }
    if ebs.manifest_config_map.is_some() {
        steps.push(Arc::new(image::Manifest));
    }
    Ok(steps)
}

/// The amazon section of the spec, or a step failure if it is gone.
pub fn ebs(spec: &ImageBuildSpec) -> Result<&AmazonEbsBuilder, StepError> {
    spec.builder
        .amazon_ebs
        .as_ref()
        .ok_or_else(|| StepError::Failed("spec.builder.amazonEBS: not set".into()))
}

/// An output an earlier step of this build must have recorded.
pub fn output<'a>(
    outputs: &'a std::collections::BTreeMap<String, String>,
    key: &str,
) -> Result<&'a String, StepError> {
    outputs
        .get(key)
        .ok_or_else(|| StepError::Failed(format!("internal: no {key} recorded by an earlier step")))
}

pub struct Waits {
    pub timeout: Duration,
    pub poll: Duration,
}

/// The regions a step's cleanup works in: the build region (where what was made but
/// not yet recorded is looked for) and every region its records name. A record is
/// cleaned up where it was made, also when the spec cleanup runs with names another
/// region (a recorded spec this kiln cannot read falls back to the current one):
/// there a NotFound would wrongly count as done.
pub fn cleanup_regions(record: &crate::api::StepRecord, build_region: &str) -> Vec<String> {
    let mut regions = vec![build_region.to_string()];
    for r in record.resources.iter().filter(|r| r.created) {
        if let Some(region) = &r.region
            && !regions.contains(region)
        {
            regions.push(region.clone());
        }
    }
    regions
}

/// Whether a step's record may miss a resource of `kind` that the step made: each is
/// recorded right after the call that makes it, so only an attempt that stopped in
/// between can leave one unrecorded, and then the step was resumed (more than one
/// attempt) or recorded none. Only then does cleanup look for one by tag or name.
pub fn may_miss(record: &crate::api::StepRecord, kind: &str) -> bool {
    record.attempts > 1 || !record.resources.iter().any(|r| r.created && r.kind == kind)
}

/// IDs of the created records of `kind` made in `region` (a record without a region
/// is the build region's, as older kilns wrote them).
pub fn recorded_in(
    record: &crate::api::StepRecord,
    kind: &str,
    region: &str,
    build_region: &str,
) -> Vec<String> {
    record
        .resources
        .iter()
        .filter(|r| r.created && r.kind == kind)
        .filter(|r| r.region.as_deref().unwrap_or(build_region) == region)
        .map(|r| r.id.clone())
        .collect()
}

/// The waits of a cleanup: never blocked by a value kiln cannot parse (the spec it
/// ran with is recorded, so fixing the spec would not help); the defaults instead.
pub fn cleanup_waits(ebs: &AmazonEbsBuilder) -> Waits {
    waits(ebs).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "using the default waits for cleanup");
        Waits {
            timeout: Duration::from_secs(3600),
            poll: Duration::from_secs(2),
        }
    })
}

pub fn waits(ebs: &AmazonEbsBuilder) -> Result<Waits, StepError> {
    let timeout = duration::parse(&ebs.wait_timeout)
        .map_err(|e| StepError::Failed(format!("spec.builder.amazonEBS.waitTimeout: {e}")))?;
    let poll = duration::parse(&ebs.poll_interval)
        .map_err(|e| StepError::Failed(format!("spec.builder.amazonEBS.pollInterval: {e}")))?;
    Ok(Waits {
        timeout,
        poll: poll.max(Duration::from_millis(50)),
    })
}

/// Expands `{{ build.timestamp }}`, `{{ build.name }}` and friends in the AMI name.
/// Every build of a pipeline gets its own AMI name only if the name varies by build.
pub fn repeatable(ebs: &crate::api::AmazonEbsBuilder) -> Result<(), PlanError> {
    let varies = ["build.name", "build.timestamp"].iter().any(|k| {
        ebs.ami_name.contains(&format!("{{{{ {k} }}}}"))
            || ebs.ami_name.contains(&format!("{{{{{k}}}}}"))
    });
    if varies {
        return Ok(());
    }
    Err(PlanError::Invalid(format!(
        "spec.builder.amazonEBS.amiName: {:?} is the same for every build of the pipeline, so its second build would find the name taken; include {{{{ build.name }}}} (e.g. \"web-{{{{ build.name }}}}\")",
        ebs.ami_name
    )))
}

pub fn expand_name(
    template: &str,
    build_name: &str,
    namespace: &str,
    generation: i64,
    unix: i64,
) -> String {
    let mut s = template.to_string();
    for (k, v) in [
        ("build.timestamp", unix.to_string()),
        ("build.name", build_name.to_string()),
        ("build.namespace", namespace.to_string()),
        ("build.generation", generation.to_string()),
    ] {
        for pat in [format!("{{{{ {k} }}}}"), format!("{{{{{k}}}}}")] {
            s = s.replace(&pat, &v);
        }
    }
    s
}

/// A token that is the same for every attempt of a step of one generation: EC2
/// returns the first call's result for a repeated ClientToken.
pub fn client_token(uid: &str, generation: i64, what: &str) -> String {
    let t = format!("kiln-{uid}-{generation}-{what}");
    // EC2 allows 64 ASCII characters.
    if t.len() <= 64 {
        t
    } else {
        format!("{:x}", fnv(t.as_bytes()))
    }
}

fn fnv(bytes: &[u8]) -> u128 {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in bytes {
        h ^= u128::from(*b);
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    h
}

/// Tag keys users may not set: kiln finds its resources by `kiln.dev/*`, and EC2
/// refuses `aws:*`.
pub fn reserved_tag(key: &str) -> bool {
    key.starts_with("kiln.dev/") || key.starts_with("aws:")
}

/// Whether these tags mark a resource as this build's.
pub fn ours(tags: &[aws_sdk_ec2::types::Tag], facts: &crate::engine::BuildFacts) -> bool {
    tags.iter().any(|t| {
        t.key() == Some(crate::api::BUILD_UID_TAG) && t.value() == Some(facts.uid.as_str())
    })
}

/// Tags every resource kiln creates carries, plus the user's (never in place of
/// kiln's own: the schema and the plan refuse reserved keys, and they are skipped
/// here for objects admitted before that rule).
pub fn tags(
    facts: &crate::engine::BuildFacts,
    extra: &std::collections::BTreeMap<String, String>,
) -> Vec<aws_sdk_ec2::types::Tag> {
    let mut all = vec![
        (crate::api::BUILD_UID_TAG.to_string(), facts.uid.clone()),
        (
            crate::api::BUILD_TAG.to_string(),
            format!("{}/{}", facts.namespace, facts.name),
        ),
        (
            "kiln.dev/generation".to_string(),
            facts.generation.to_string(),
        ),
    ];
    for (k, v) in extra {
        if !reserved_tag(k) {
            all.push((k.clone(), v.clone()));
        }
    }
    all.into_iter()
        .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build())
        .collect()
}

pub fn tag_spec(
    kind: aws_sdk_ec2::types::ResourceType,
    tags: &[aws_sdk_ec2::types::Tag],
) -> aws_sdk_ec2::types::TagSpecification {
    aws_sdk_ec2::types::TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(tags.to_vec()))
        .build()
}

pub fn filter(name: &str, value: impl Into<String>) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder()
        .name(name)
        .values(value)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_expand() {
        assert_eq!(
            expand_name("web-{{ build.timestamp }}", "w", "ns", 2, 1700000000),
            "web-1700000000"
        );
        assert_eq!(
            expand_name("{{build.name}}-g{{ build.generation }}", "w", "ns", 2, 0),
            "w-g2"
        );
    }

    #[test]
    fn client_tokens_are_stable_and_bounded() {
        let uid = "0f6b6a2e-9a7c-4a53-9f3b-2f0a9b3f4d11";
        assert_eq!(client_token(uid, 1, "run"), client_token(uid, 1, "run"));
        assert_ne!(client_token(uid, 1, "run"), client_token(uid, 2, "run"));
        assert!(client_token(uid, 1, "copy-eu-west-1").len() <= 64);
    }
}
