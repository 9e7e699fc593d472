//! Before anything is launched: the AMI name is free (or will be replaced), and the
//! source image is known.

use futures::future::BoxFuture;

use super::{Ec2, ebs, expand_name, filter, out};
use crate::api::ResourceRecord;
use crate::engine::{Step, StepContext, StepError, StepOutput};

/// Fixes the AMI name for the whole build (the timestamp is expanded once and
/// recorded) and fails before launching anything if that name is taken.
pub struct PreValidate;

impl Step for PreValidate {
    fn name(&self) -> &str {
        "pre-validate"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            let name = expand_name(
                &ebs.ami_name,
                &ctx.facts.name,
                &ctx.facts.namespace,
                ctx.facts.generation,
                k8s_openapi::jiff::Timestamp::now().as_second(),
            );
            let valid = name.len() >= 3
                && name.len() <= 128
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c));
            if !valid {
                return Err(StepError::Failed(format!(
                    "spec.builder.amazonEBS.amiName: {name:?} is not a valid AMI name (3-128 characters: letters, digits, ( ) [ ] . / - ' @ _ and spaces)"
                )));
            }
            let mut regions = vec![("region".to_string(), ebs.region.clone())];
            for (i, r) in ebs.ami_regions.iter().enumerate() {
                regions.push((format!("amiRegions[{i}]"), r.clone()));
            }
            for (field, region) in regions {
                let ec2 = Ec2::for_build(ebs, &ctx.client, &ctx.facts, &region).await?;
                // The first call in a region also tells whether the region exists.
                let found = ec2
                    .client
                    .describe_images()
                    .owners("self")
                    .filters(filter("name", name.clone()))
                    .send()
                    .await
                    .map_err(|e| {
                        let e = super::AwsError::from_sdk("DescribeImages", e);
                        StepError::Failed(format!(
                            "spec.builder.amazonEBS.{field}: region {region:?}: {e}"
                        ))
                    })?;
                if ebs.force_deregister {
                    super::image::check_replaceable(&ec2, &name, &ctx.facts).await?;
                    continue;
                }
                let ids: Vec<_> = found.images().iter().filter_map(|i| i.image_id()).collect();
                if !ids.is_empty() {
                    return Err(StepError::Failed(format!(
                        "spec.builder.amazonEBS.amiName: an AMI named {name:?} already exists in {region} ({}); set forceDeregister: true to replace it",
                        ids.join(", ")
                    )));
                }
            }
            check_given_network(ebs, &ctx.client, &ctx.facts.namespace).await?;
            let mut o = StepOutput {
                message: Some(format!("AMI name {name:?} is free")),
                ..Default::default()
            };
            o.outputs.insert(out::AMI_NAME.into(), name);
            o.outputs.insert(out::REGION.into(), ebs.region.clone());
            Ok(o)
        })
    }
}

/// The most images `sourceAMIFilter` may match: the lookup reads one page of this
/// size, so a broad filter can never pull an unbounded list into memory.
const MAX_MATCHES: i32 = 1000;

/// The source AMI a filter selects: the only match, or the newest with `mostRecent`.
async fn newest_match(
    ec2: &Ec2,
    f: &crate::api::SourceAmiFilter,
    region: &str,
) -> Result<String, StepError> {
    let mut req = ec2.client.describe_images().max_results(MAX_MATCHES);
    for (k, v) in &f.filters {
        req = req.filters(filter(k, v.clone()));
    }
    for o in &f.owners {
        req = req.owners(o.clone());
    }
    let r = req
        .send()
        .await
        .map_err(|e| super::AwsError::from_sdk("DescribeImages", e).fail())?;
    let images = r.images();
    let describe = || format!("filters {:?}, owners {:?} in {region}", f.filters, f.owners);
    let field = "spec.builder.amazonEBS.sourceAMIFilter";
    if r.next_token().is_some_and(|t| !t.is_empty()) || images.len() > MAX_MATCHES as usize {
        return Err(StepError::Failed(format!(
            "{field}: more than {MAX_MATCHES} images match {}; narrow the filters",
            describe()
        )));
    }
    if images.is_empty() {
        return Err(StepError::Failed(format!(
            "{field}: no image matches {}",
            describe()
        )));
    }
    if images.len() > 1 && !f.most_recent {
        return Err(StepError::Failed(format!(
            "{field}: {} images match {}; set mostRecent: true or narrow the filters",
            images.len(),
            describe()
        )));
    }
    // ISO 8601 timestamps in one format sort as strings.
    images
        .iter()
        .max_by(|a, b| a.creation_date().cmp(&b.creation_date()))
        .and_then(|i| i.image_id())
        .map(str::to_string)
        .ok_or_else(|| StepError::Failed("DescribeImages returned an image without an ID".into()))
}

/// The image a build of `ebs` would start from now: the newest match of
/// `sourceAMIFilter`, or `sourceAMI` itself. What a pipeline's `onSourceChange` watches.
pub async fn current_source(
    ebs: &crate::api::AmazonEbsBuilder,
    client: &kube::Client,
    namespace: &str,
) -> Result<String, StepError> {
    match (&ebs.source_ami, &ebs.source_ami_filter) {
        (Some(id), _) => Ok(id.clone()),
        (None, Some(f)) => {
            let ec2 = Ec2::new(ebs, client, namespace, &ebs.region).await?;
            newest_match(&ec2, f, &ebs.region).await
        }
        (None, None) => Err(StepError::Failed(
            "spec.builder.amazonEBS: set sourceAMI or sourceAMIFilter".into(),
        )),
    }
}

/// The subnet and security groups the spec names exist in the build region: checked
/// before anything is created rather than when the instance is launched.
async fn check_given_network(
    ebs: &crate::api::AmazonEbsBuilder,
    client: &kube::Client,
    namespace: &str,
) -> Result<(), StepError> {
    if ebs.subnet_id.is_none() && ebs.security_group_ids.is_empty() {
        return Ok(());
    }
    let ec2 = Ec2::new(ebs, client, namespace, &ebs.region).await?;
    if let Some(subnet) = &ebs.subnet_id {
        let r = ec2
            .client
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await;
        let found = match r {
            Ok(r) => !r.subnets().is_empty(),
            Err(e) => {
                let e = super::AwsError::from_sdk("DescribeSubnets", e);
                if e.is_not_found() || e.code.ends_with(".Malformed") {
                    false
                } else {
                    return Err(e.fail());
                }
            }
        };
        if !found {
            return Err(StepError::Failed(format!(
                "spec.builder.amazonEBS.subnetId: subnet {subnet} not found in {}",
                ebs.region
            )));
        }
    }
    if !ebs.security_group_ids.is_empty() {
        let r = ec2
            .client
            .describe_security_groups()
            .set_group_ids(Some(ebs.security_group_ids.clone()))
            .send()
            .await;
        let found: Vec<String> = match r {
            Ok(r) => r
                .security_groups()
                .iter()
                .filter_map(|g| g.group_id().map(str::to_string))
                .collect(),
            Err(e) => {
                let e = super::AwsError::from_sdk("DescribeSecurityGroups", e);
                if e.is_not_found() || e.code.ends_with(".Malformed") {
                    Vec::new()
                } else {
                    return Err(e.fail());
                }
            }
        };
        let missing: Vec<&String> = ebs
            .security_group_ids
            .iter()
            .filter(|g| !found.contains(g))
            .collect();
        if !missing.is_empty() {
            return Err(StepError::Failed(format!(
                "spec.builder.amazonEBS.securityGroupIds: {} not found in {}",
                missing
                    .iter()
                    .map(|g| g.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                ebs.region
            )));
        }
    }
    Ok(())
}

pub struct SourceImage;

impl Step for SourceImage {
    fn name(&self) -> &str {
        "source-image"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            let ec2 = Ec2::for_build(ebs, &ctx.client, &ctx.facts, &ebs.region).await?;
            let id = match (&ebs.source_ami, &ebs.source_ami_filter) {
                (Some(id), _) => {
                    let r = ec2.client.describe_images().image_ids(id).send().await;
                    let found = match r {
                        Ok(r) => !r.images().is_empty(),
                        Err(e) => {
                            let e = super::AwsError::from_sdk("DescribeImages", e);
                            if e.is_not_found() || e.is("InvalidAMIID.Malformed") {
                                false
                            } else {
                                return Err(e.fail());
                            }
                        }
                    };
                    if !found {
                        return Err(StepError::Failed(format!(
                            "spec.builder.amazonEBS.sourceAMI: {id} not found in {}",
                            ebs.region
                        )));
                    }
                    id.clone()
                }
                (None, Some(f)) => newest_match(&ec2, f, &ebs.region).await?,
                (None, None) => {
                    return Err(StepError::Failed(
                        "spec.builder.amazonEBS: set sourceAMI or sourceAMIFilter".into(),
                    ));
                }
            };
            let mut o = StepOutput {
                message: Some(format!("source image {id}")),
                ..Default::default()
            };
            o.resources.push(ResourceRecord {
                kind: "Image".into(),
                id: id.clone(),
                region: Some(ebs.region.clone()),
                created: false,
            });
            o.outputs.insert(out::SOURCE_AMI.into(), id);
            Ok(o)
        })
    }
}
