//! A temporary security group allowing SSH from `sshCIDRs`, unless
//! `securityGroupIds` are given (those are used as they are and never deleted).

use futures::future::BoxFuture;

use super::{
    AwsError, Ec2, cleanup_regions, ebs, filter, may_miss, ours, out, recorded_in, tag_spec, tags,
};
use crate::api::{BUILD_UID_TAG, ResourceRecord};
use crate::engine::{CleanupContext, Step, StepContext, StepError, StepOutput};

pub struct SecurityGroupStep;

impl Step for SecurityGroupStep {
    fn name(&self) -> &str {
        "security-group"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            let mut o = StepOutput::default();
            if !ebs.security_group_ids.is_empty() {
                for id in &ebs.security_group_ids {
                    o.resources.push(ResourceRecord {
                        kind: "SecurityGroup".into(),
                        id: id.clone(),
                        region: Some(ebs.region.clone()),
                        created: false,
                    });
                }
                o.outputs.insert(
                    out::SECURITY_GROUPS.into(),
                    ebs.security_group_ids.join(","),
                );
                o.message = Some("using the given security groups".into());
                return Ok(o);
            }
            let facts = &ctx.facts;
            let ec2 = Ec2::for_build(ebs, &ctx.client, facts, &ebs.region).await?;
            let vpc = vpc_of(&ec2, ebs.subnet_id.as_deref()).await?;
            let name = group_name(facts);

            // The create comes first: it meets the group only when an earlier
            // attempt made it before the operator stopped, and then says so.
            let created = ec2
                .client
                .create_security_group()
                .group_name(&name)
                .description(format!(
                    "kiln temporary group for {}/{}",
                    facts.namespace, facts.name
                ))
                .vpc_id(&vpc)
                .tag_specifications(tag_spec(
                    aws_sdk_ec2::types::ResourceType::SecurityGroup,
                    &tags(facts, &Default::default()),
                ))
                .send()
                .await
                .map_err(|e| AwsError::from_sdk("CreateSecurityGroup", e));
            let id = match created {
                Ok(r) => r
                    .group_id()
                    .ok_or_else(|| {
                        StepError::Failed("CreateSecurityGroup returned no group ID".into())
                    })?
                    .to_string(),
                // An earlier attempt's group, or one whose create reply was lost and
                // the SDK's retry met: used if it carries this build's tag.
                Err(e) if e.is("InvalidGroup.Duplicate") => ours_named(&ec2, &name, &vpc, facts)
                    .await?
                    .ok_or_else(|| e.fail())?,
                Err(e) => return Err(e.fail()),
            };
            ctx.record(ResourceRecord {
                kind: "SecurityGroup".into(),
                id: id.clone(),
                region: Some(ebs.region.clone()),
                created: true,
            })
            .await?;
            let mut perm = aws_sdk_ec2::types::IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(i32::from(ctx.spec.communicator.ssh.port))
                .to_port(i32::from(ctx.spec.communicator.ssh.port));
            for cidr in &ebs.ssh_cidrs {
                perm = if cidr.contains(':') {
                    perm.ipv6_ranges(
                        aws_sdk_ec2::types::Ipv6Range::builder()
                            .cidr_ipv6(cidr)
                            .build(),
                    )
                } else {
                    perm.ip_ranges(aws_sdk_ec2::types::IpRange::builder().cidr_ip(cidr).build())
                };
            }
            if let Err(e) = ec2
                .client
                .authorize_security_group_ingress()
                .group_id(&id)
                .ip_permissions(perm.build())
                .send()
                .await
            {
                let e = AwsError::from_sdk("AuthorizeSecurityGroupIngress", e);
                if !e.is("InvalidPermission.Duplicate") {
                    return Err(e.fail());
                }
            }
            o.outputs.insert(out::SECURITY_GROUPS.into(), id.clone());
            o.message = Some(format!("created temporary security group {id} in {vpc}"));
            Ok(o)
        })
    }

    fn cleanup<'a>(&'a self, ctx: &'a CleanupContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            for region in cleanup_regions(&ctx.record, &ebs.region) {
                let ec2 = Ec2::for_build(ebs, &ctx.client, &ctx.facts, &region).await?;
                let ids = recorded_in(&ctx.record, "SecurityGroup", &region, &ebs.region);
                let look = may_miss(&ctx.record, "SecurityGroup");
                delete_groups(&ec2, ids, look, &ctx.facts).await?;
            }
            Ok(())
        })
    }

    /// Given groups are recorded as not created; otherwise a group may exist even
    /// if the step stopped before recording it.
    fn needs_cleanup(
        &self,
        record: &crate::api::StepRecord,
        _outcome: crate::engine::BuildOutcome,
    ) -> bool {
        !record.resources.iter().any(|r| !r.created)
    }
}

/// Deletes the recorded groups and, with `look`, the build's group found by name
/// (only when it carries the build's tag) in `ec2`'s region.
async fn delete_groups(
    ec2: &Ec2,
    mut ids: Vec<String>,
    look: bool,
    facts: &crate::engine::BuildFacts,
) -> Result<(), StepError> {
    // Created but not recorded when the operator stopped (see `may_miss`).
    if look {
        let found = ec2
            .client
            .describe_security_groups()
            .filters(filter("group-name", group_name(facts)))
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("DescribeSecurityGroups", e).retry())?;
        for g in found.security_groups() {
            let Some(id) = g.group_id() else { continue };
            if !ours(g.tags(), facts) {
                tracing::warn!(group = %id, "a security group has this build's name but not its tag; leaving it alone");
                continue;
            }
            if !ids.iter().any(|i| i == id) {
                ids.push(id.to_string());
            }
        }
    }
    for id in ids {
        if let Err(e) = ec2
            .client
            .delete_security_group()
            .group_id(&id)
            .send()
            .await
        {
            let e = AwsError::from_sdk("DeleteSecurityGroup", e);
            // DependencyViolation while the instance terminates: retried by the engine.
            if !e.is_not_found() {
                return Err(e.retry());
            }
        }
    }
    Ok(())
}

/// This build's group of that name in `vpc`, if there is one. A group with the name
/// but without the build's tag is someone else's: the step fails naming it.
async fn ours_named(
    ec2: &Ec2,
    name: &str,
    vpc: &str,
    facts: &crate::engine::BuildFacts,
) -> Result<Option<String>, StepError> {
    let existing = ec2
        .client
        .describe_security_groups()
        .filters(filter("group-name", name))
        .filters(filter("vpc-id", vpc))
        .send()
        .await
        .map_err(|e| AwsError::from_sdk("DescribeSecurityGroups", e).fail())?;
    let Some(g) = existing.security_groups().first() else {
        return Ok(None);
    };
    let id = g.group_id().unwrap_or_default();
    if !ours(g.tags(), facts) {
        return Err(StepError::Failed(format!(
            "security group {name} ({id}) in {vpc} has kiln's name for this build but not its {BUILD_UID_TAG}={} tag: kiln neither uses nor deletes it; remove it or rename it",
            facts.uid
        )));
    }
    Ok(Some(id.to_string()))
}

pub fn group_name(facts: &crate::engine::BuildFacts) -> String {
    format!("kiln-{}-{}", facts.uid, facts.generation)
}

/// The VPC of the given subnet, or the region's default VPC.
async fn vpc_of(ec2: &Ec2, subnet: Option<&str>) -> Result<String, StepError> {
    if let Some(subnet) = subnet {
        let r = ec2
            .client
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await
            .map_err(|e| {
                let e = AwsError::from_sdk("DescribeSubnets", e);
                StepError::Failed(format!("spec.builder.amazonEBS.subnetId: {e}"))
            })?;
        return r
            .subnets()
            .first()
            .and_then(|s| s.vpc_id())
            .map(str::to_string)
            .ok_or_else(|| {
                StepError::Failed(format!(
                    "spec.builder.amazonEBS.subnetId: subnet {subnet} not found"
                ))
            });
    }
    let r = ec2
        .client
        .describe_vpcs()
        .filters(filter("is-default", "true"))
        .send()
        .await
        .map_err(|e| AwsError::from_sdk("DescribeVpcs", e).fail())?;
    r.vpcs()
        .first()
        .and_then(|v| v.vpc_id())
        .map(str::to_string)
        .ok_or_else(|| {
            StepError::Failed(format!(
                "spec.builder.amazonEBS.subnetId: {} has no default VPC; set subnetId",
                ec2.region
            ))
        })
}
