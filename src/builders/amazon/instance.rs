//! The build instance: launched once per generation (ClientToken plus a tag
//! lookup), waited for, stopped before imaging, terminated in cleanup.

use base64::Engine as _;
use futures::future::BoxFuture;

use super::{
    AwsError, Ec2, cleanup_regions, cleanup_waits, client_token, ebs, filter, may_miss, out,
    output, recorded_in, tag_spec, tags, wait_for, waits,
};
use crate::api::{BUILD_UID_TAG, ResourceRecord, SshInterface};
use crate::engine::{BuildFacts, CleanupContext, Step, StepContext, StepError, StepOutput};
use crate::provisioners::connect::OUT_HOST;

const LIVE_STATES: &str = "pending,running,stopping,stopped";

/// Instances of this build's generation that are not terminated.
async fn find_instances(ec2: &Ec2, facts: &BuildFacts) -> Result<Vec<String>, AwsError> {
    let mut req = ec2
        .client
        .describe_instances()
        .filters(filter(&format!("tag:{BUILD_UID_TAG}"), facts.uid.clone()))
        .filters(filter(
            "tag:kiln.dev/generation",
            facts.generation.to_string(),
        ));
    let mut states = aws_sdk_ec2::types::Filter::builder().name("instance-state-name");
    for s in LIVE_STATES.split(',') {
        states = states.values(s);
    }
    req = req.filters(states.build());
    let r = req
        .send()
        .await
        .map_err(|e| AwsError::from_sdk("DescribeInstances", e))?;
    Ok(r.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect())
}

/// The instance as EC2 describes it now, if it lists it.
async fn describe_one(
    ec2: &Ec2,
    id: &str,
) -> Result<Option<aws_sdk_ec2::types::Instance>, StepError> {
    let r = ec2
        .client
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .map_err(|e| AwsError::from_sdk("DescribeInstances", e).fail())?;
    Ok(r.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .next()
        .cloned())
}

pub struct RunInstance;

impl Step for RunInstance {
    fn name(&self) -> &str {
        "instance"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            let facts = &ctx.facts;
            let ec2 = Ec2::for_build(ebs, &ctx.client, facts, &ebs.region).await?;
            // Only a resumed step can find one: the ClientToken covers the SDK's own
            // retries, the tag lookup an attempt that launched before it stopped.
            let existing = if ctx.attempt > 1 {
                find_instances(&ec2, facts).await.map_err(AwsError::fail)?
            } else {
                Vec::new()
            };
            let id = if let Some(id) = existing.first() {
                id.clone()
            } else {
                let mut run_tags = ebs.run_tags.clone();
                run_tags
                    .entry("Name".into())
                    .or_insert_with(|| format!("kiln build {}/{}", facts.namespace, facts.name));
                let t = tags(facts, &run_tags);
                let mut req = ec2
                    .client
                    .run_instances()
                    .image_id(output(&ctx.outputs, out::SOURCE_AMI)?)
                    .instance_type(aws_sdk_ec2::types::InstanceType::from(
                        ebs.instance_type.as_str(),
                    ))
                    .min_count(1)
                    .max_count(1)
                    .client_token(client_token(&facts.uid, facts.generation, "run"))
                    .key_name(output(&ctx.outputs, out::KEY_PAIR)?)
                    .tag_specifications(tag_spec(aws_sdk_ec2::types::ResourceType::Instance, &t))
                    .tag_specifications(tag_spec(aws_sdk_ec2::types::ResourceType::Volume, &t));
                for g in output(&ctx.outputs, out::SECURITY_GROUPS)?.split(',') {
                    req = req.security_group_ids(g);
                }
                if let Some(subnet) = &ebs.subnet_id {
                    req = req.subnet_id(subnet);
                }
                if let Some(ud) = &ebs.user_data {
                    req = req.user_data(base64::engine::general_purpose::STANDARD.encode(ud));
                }
                for bd in &ebs.block_device_mappings {
                    let mut e = aws_sdk_ec2::types::EbsBlockDevice::builder()
                        .delete_on_termination(bd.delete_on_termination)
                        .set_volume_size(bd.volume_size)
                        .set_encrypted(bd.encrypted);
                    if let Some(t) = &bd.volume_type {
                        e = e.volume_type(aws_sdk_ec2::types::VolumeType::from(t.as_str()));
                    }
                    req = req.block_device_mappings(
                        aws_sdk_ec2::types::BlockDeviceMapping::builder()
                            .device_name(&bd.device_name)
                            .ebs(e.build())
                            .build(),
                    );
                }
                let r = req
                    .send()
                    .await
                    .map_err(|e| AwsError::from_sdk("RunInstances", e).fail())?;
                r.instances()
                    .first()
                    .and_then(|i| i.instance_id())
                    .ok_or_else(|| StepError::Failed("RunInstances returned no instance".into()))?
                    .to_string()
            };
            ctx.record(ResourceRecord {
                kind: "Instance".into(),
                id: id.clone(),
                region: Some(ebs.region.clone()),
                created: true,
            })
            .await?;
            let mut o = StepOutput {
                message: Some(format!("launched {id} ({})", ebs.instance_type)),
                ..Default::default()
            };
            o.outputs.insert(out::INSTANCE_ID.into(), id);
            Ok(o)
        })
    }

    fn cleanup<'a>(&'a self, ctx: &'a CleanupContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            let w = cleanup_waits(ebs);
            for region in cleanup_regions(&ctx.record, &ebs.region) {
                let ec2 = Ec2::for_build(ebs, &ctx.client, &ctx.facts, &region).await?;
                let ids = recorded_in(&ctx.record, "Instance", &region, &ebs.region);
                let look = Lookups {
                    instances: may_miss(&ctx.record, "Instance"),
                    // Known when the instance ran: only then is a lookup skipped.
                    volumes: ctx
                        .outputs
                        .get(out::KEPT_VOLUMES)
                        .is_none_or(|v| !v.is_empty()),
                };
                terminate(&ec2, ids, look, &ctx.facts, &w).await?;
            }
            Ok(())
        })
    }

    fn needs_cleanup(
        &self,
        _record: &crate::api::StepRecord,
        _outcome: crate::engine::BuildOutcome,
    ) -> bool {
        true
    }
}

/// What a cleanup must look up by tag because its records may not name it all.
struct Lookups {
    /// Instances launched but not recorded when the operator stopped.
    instances: bool,
    /// Volumes that outlive the instance: unless the running instance listed every
    /// volume it has as deleted with it.
    volumes: bool,
}

/// Terminates the recorded instances and, if it must look, any of the build's
/// generation found by tag in `ec2`'s region, waits until they are gone, then
/// deletes the volumes they left.
async fn terminate(
    ec2: &Ec2,
    mut ids: Vec<String>,
    look: Lookups,
    facts: &BuildFacts,
    w: &super::Waits,
) -> Result<(), StepError> {
    if look.instances {
        for id in find_instances(ec2, facts).await.map_err(AwsError::retry)? {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    if !ids.is_empty() {
        terminate_all(ec2, &ids, w).await?;
    }
    if look.volumes {
        delete_volumes(ec2, facts).await
    } else {
        Ok(())
    }
}

/// Terminates the instances and waits until they are gone.
async fn terminate_all(ec2: &Ec2, ids: &[String], w: &super::Waits) -> Result<(), StepError> {
    if let Err(e) = ec2
        .client
        .terminate_instances()
        .set_instance_ids(Some(ids.to_vec()))
        .send()
        .await
    {
        let e = AwsError::from_sdk("TerminateInstances", e);
        if !e.is_not_found() {
            return Err(e.retry());
        }
    }
    // Waiting here lets the security group go on the first try.
    let cancel = tokio_util::sync::CancellationToken::new();
    let kind = super::WaitKind {
        name: "instance-terminated",
        region: &ec2.region,
    };
    wait_for("the instance to terminate", kind, w, &cancel, || async {
        let r = ec2
            .client
            .describe_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await;
        match r {
            Ok(r) => Ok(r
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .all(|i| {
                    i.state().and_then(|s| s.name())
                        == Some(&aws_sdk_ec2::types::InstanceStateName::Terminated)
                })
                .then_some(())),
            Err(e) => {
                let e = AwsError::from_sdk("DescribeInstances", e);
                if e.is_not_found() {
                    Ok(Some(()))
                } else {
                    Err(e.retry())
                }
            }
        }
    })
    .await
    .map_err(|e| match e {
        StepError::Failed(m) => StepError::Transient(m),
        other => other,
    })
}

/// Volumes of this build's generation that outlived its instance: those launched
/// with `deleteOnTermination: false` (given in `blockDeviceMappings`, or by the
/// source AMI's mapping). RunInstances tags them at launch, so they are found by tag.
async fn delete_volumes(ec2: &Ec2, facts: &BuildFacts) -> Result<(), StepError> {
    let mut pages = ec2
        .client
        .describe_volumes()
        .filters(filter(&format!("tag:{BUILD_UID_TAG}"), facts.uid.clone()))
        .filters(filter(
            "tag:kiln.dev/generation",
            facts.generation.to_string(),
        ))
        .into_paginator()
        .send();
    let mut busy = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::from_sdk("DescribeVolumes", e).retry())?;
        for v in page.volumes() {
            let Some(id) = v.volume_id() else { continue };
            use aws_sdk_ec2::types::VolumeState as S;
            match v.state() {
                Some(S::Deleting | S::Deleted) => {}
                Some(S::Available) => {
                    if let Err(e) = ec2.client.delete_volume().volume_id(id).send().await {
                        let e = AwsError::from_sdk("DeleteVolume", e);
                        if !e.is_not_found() {
                            return Err(e.retry());
                        }
                    }
                }
                other => busy.push(format!(
                    "{id} ({})",
                    other.map_or("unknown", |s| s.as_str())
                )),
            }
        }
    }
    if busy.is_empty() {
        Ok(())
    } else {
        // Still attached or being created: the next attempt deletes them.
        Err(StepError::Transient(format!(
            "volumes of the build are not available for deletion yet: {}",
            busy.join(", ")
        )))
    }
}

/// The running instance's EBS volumes that outlive it (`deleteOnTermination`
/// false), or `None` when it lists none or one without saying: then cleanup looks
/// them up by tag.
fn kept_volumes(i: &aws_sdk_ec2::types::Instance) -> Option<Vec<String>> {
    let mappings = i.block_device_mappings();
    if mappings.is_empty() {
        return None;
    }
    let mut kept = Vec::new();
    for m in mappings {
        let ebs = m.ebs()?;
        let id = ebs.volume_id()?;
        if !ebs.delete_on_termination()? {
            kept.push(id.to_string());
        }
    }
    Some(kept)
}

/// Waits until the instance runs and has the address `sshInterface` asks for.
pub struct InstanceReady;

impl Step for InstanceReady {
    fn name(&self) -> &str {
        "instance-ready"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            let w = waits(ebs)?;
            let id = output(&ctx.outputs, out::INSTANCE_ID)?.clone();
            let ec2 = Ec2::for_build(ebs, &ctx.client, &ctx.facts, &ebs.region).await?;
            let what = format!("instance {id} to run");
            let kind = super::WaitKind {
                name: "instance-running",
                region: &ec2.region,
            };
            let addr = wait_for(&what, kind, &w, &ctx.cancel, || async {
                let Some(i) = describe_one(&ec2, &id).await? else {
                    return Ok(None);
                };
                use aws_sdk_ec2::types::InstanceStateName as S;
                match i.state().and_then(|s| s.name()) {
                    Some(S::Running) => {}
                    Some(S::Pending) | None => return Ok(None),
                    Some(other) => {
                        return Err(StepError::Failed(format!(
                            "instance {id} is {}: {}",
                            other.as_str(),
                            i.state_reason()
                                .and_then(|r| r.message())
                                .unwrap_or("no reason given")
                        )));
                    }
                }
                let addr = match ebs.ssh_interface {
                    SshInterface::PublicIp => i.public_ip_address(),
                    SshInterface::PrivateIp => i.private_ip_address(),
                    SshInterface::PublicDns => i.public_dns_name(),
                    SshInterface::PrivateDns => i.private_dns_name(),
                };
                Ok(addr.filter(|a| !a.is_empty()).map(|a| {
                    (
                        a.to_string(),
                        i.private_ip_address().map(str::to_string),
                        kept_volumes(&i),
                    )
                }))
            })
            .await?;
            let mut o = StepOutput {
                message: Some(format!("{id} is running at {}", addr.0)),
                ..Default::default()
            };
            o.outputs.insert(OUT_HOST.into(), addr.0);
            if let Some(p) = addr.1 {
                o.outputs.insert("private_ip".into(), p);
            }
            if let Some(kept) = addr.2 {
                o.outputs.insert(out::KEPT_VOLUMES.into(), kept.join(","));
            }
            Ok(o)
        })
    }
}

pub struct StopInstance;

impl Step for StopInstance {
    fn name(&self) -> &str {
        "stop-instance"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            let w = waits(ebs)?;
            let id = output(&ctx.outputs, out::INSTANCE_ID)?.clone();
            let ec2 = Ec2::for_build(ebs, &ctx.client, &ctx.facts, &ebs.region).await?;
            ec2.client
                .stop_instances()
                .instance_ids(&id)
                .send()
                .await
                .map_err(|e| AwsError::from_sdk("StopInstances", e).fail())?;
            let what = format!("instance {id} to stop");
            let kind = super::WaitKind {
                name: "instance-stopped",
                region: &ec2.region,
            };
            wait_for(&what, kind, &w, &ctx.cancel, || async {
                let state = describe_one(&ec2, &id)
                    .await?
                    .as_ref()
                    .and_then(|i| i.state())
                    .and_then(|s| s.name())
                    .cloned();
                use aws_sdk_ec2::types::InstanceStateName as S;
                match state {
                    Some(S::Stopped) => Ok(Some(())),
                    Some(S::Terminated | S::ShuttingDown) => Err(StepError::Failed(format!(
                        "instance {id} terminated while stopping"
                    ))),
                    _ => Ok(None),
                }
            })
            .await?;
            Ok(StepOutput {
                message: Some(format!("{id} stopped")),
                ..Default::default()
            })
        })
    }
}
