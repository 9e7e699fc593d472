//! Capturing the image: optional replacement of a same-named AMI, CreateImage,
//! copies to other regions, and the optional manifest ConfigMap. Images are
//! artifacts: cleanup removes them only when a step of the build did not succeed,
//! and `artifactPolicy: Delete` removes every one on deletion.

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{Patch, PatchParams};

use super::{
    AwsError, Ec2, KIND, client_token, ebs, filter, out, output, tag_spec, tags, wait_for, waits,
};
use crate::api::{
    Artifact, BUILD_TAG, BUILD_UID_TAG, PIPELINE_TAG, PIPELINE_VERSION_TAG, ResourceRecord,
    SOURCE_IMAGE_TAG,
};
use crate::engine::{
    BuildFacts, BuildOutcome, CleanupContext, Step, StepContext, StepError, StepOutput,
};

fn image_key(region: &str) -> String {
    format!("{}.{region}", out::IMAGE_ID)
}

/// Images named `name` owned by this account; with their tags and snapshots.
struct Found {
    id: String,
    ours: bool,
    /// The `kiln.dev/build` tag: the ImageBuild (`namespace/name`) that made it.
    build: Option<String>,
    snapshots: Vec<String>,
}

async fn find_by_name(ec2: &Ec2, name: &str, facts: &BuildFacts) -> Result<Vec<Found>, AwsError> {
    let r = ec2
        .client
        .describe_images()
        .owners("self")
        .filters(filter("name", name))
        .send()
        .await
        .map_err(|e| AwsError::from_sdk("DescribeImages", e))?;
    Ok(r.images()
        .iter()
        .filter_map(|i| {
            let id = i.image_id()?.to_string();
            let ours = i
                .tags()
                .iter()
                .any(|t| t.key() == Some(BUILD_UID_TAG) && t.value() == Some(facts.uid.as_str()));
            let build = i
                .tags()
                .iter()
                .find(|t| t.key() == Some(BUILD_TAG))
                .and_then(|t| t.value())
                .map(str::to_string);
            Some(Found {
                id,
                ours,
                build,
                snapshots: snapshots_of(i),
            })
        })
        .collect())
}

/// The images `forceDeregister` may replace in `ec2`'s region: those of this very
/// ImageBuild (their `kiln.dev/build` tag names its namespace and name), from an
/// earlier generation or an earlier object of the same name. An image of that name
/// that is anyone else's fails the build, saying whose it is: unlike Packer's
/// `force_deregister`, kiln never removes an image another team or tool made, since
/// one operator identity serves every namespace.
async fn replaceable(ec2: &Ec2, name: &str, facts: &BuildFacts) -> Result<Vec<Found>, StepError> {
    let this = format!("{}/{}", facts.namespace, facts.name);
    let found = find_by_name(ec2, name, facts)
        .await
        .map_err(AwsError::fail)?;
    if let Some(f) = found
        .iter()
        .find(|f| f.build.as_deref() != Some(this.as_str()))
    {
        let whose = match &f.build {
            Some(b) => format!("it was built by ImageBuild {b}"),
            None => "kiln did not build it (it has no kiln.dev/build tag)".to_string(),
        };
        return Err(StepError::Failed(format!(
            "spec.builder.amazonEBS.forceDeregister: the AMI named {name:?} in {} ({}) is not this ImageBuild's: {whose}; forceDeregister only replaces images of ImageBuild {this}: choose another amiName",
            ec2.region, f.id
        )));
    }
    Ok(found)
}

/// `pre-validate` with `forceDeregister`: fails before anything is launched when an
/// image of the name is not this ImageBuild's to replace.
pub(super) async fn check_replaceable(
    ec2: &Ec2,
    name: &str,
    facts: &BuildFacts,
) -> Result<(), StepError> {
    replaceable(ec2, name, facts).await.map(|_| ())
}

fn snapshots_of(i: &aws_sdk_ec2::types::Image) -> Vec<String> {
    i.block_device_mappings()
        .iter()
        .filter_map(|b| b.ebs().and_then(|e| e.snapshot_id()).map(str::to_string))
        .collect()
}

/// Waits until the image is available; returns its snapshot IDs.
async fn wait_available(
    ec2: &Ec2,
    id: &str,
    ctx_cancel: &tokio_util::sync::CancellationToken,
    w: &super::Waits,
) -> Result<Vec<String>, StepError> {
    let what = format!("image {id} in {} to become available", ec2.region);
    let kind = super::WaitKind {
        name: "image-available",
        region: &ec2.region,
    };
    wait_for(&what, kind, w, ctx_cancel, || async {
        let r = ec2
            .client
            .describe_images()
            .image_ids(id)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("DescribeImages", e).fail())?;
        let Some(i) = r.images().first() else {
            return Ok(None);
        };
        use aws_sdk_ec2::types::ImageState as S;
        match i.state() {
            Some(S::Available) => Ok(Some(snapshots_of(i))),
            Some(S::Failed | S::Error | S::Invalid | S::Deregistered) => {
                Err(StepError::Failed(format!(
                    "image {id} is {}: {}",
                    i.state().map(|s| s.as_str()).unwrap_or("?"),
                    i.state_reason()
                        .and_then(|r| r.message())
                        .unwrap_or("no reason given")
                )))
            }
            _ => Ok(None),
        }
    })
    .await
}

/// Records the new image before waiting on it, waits until it is available, then
/// describes the artifact. Image and snapshots carry their tags from the create
/// call (see [`image_tags`]); the snapshots are recorded with the step's result, as
/// nothing waits on them: should the operator stop before that, cleanup finds them
/// by tag and by the image's block device mappings.
async fn capture(
    ctx: &StepContext,
    ec2: &Ec2,
    w: &super::Waits,
    id: &str,
    artifact: bool,
) -> Result<StepOutput, StepError> {
    ctx.record(ResourceRecord {
        kind: "Image".into(),
        id: id.to_string(),
        region: Some(ec2.region.clone()),
        created: true,
    })
    .await?;
    let snapshots = wait_available(ec2, id, &ctx.cancel, w).await?;
    let mut o = StepOutput {
        message: Some(format!("{id} is available in {}", ec2.region)),
        resources: snapshots
            .iter()
            .map(|s| ResourceRecord {
                kind: "Snapshot".into(),
                id: s.clone(),
                region: Some(ec2.region.clone()),
                created: true,
            })
            .collect(),
        ..Default::default()
    };
    if !artifact {
        o.outputs.insert(out::IMAGE_ID.into(), id.to_string());
        return Ok(o);
    }
    o.artifacts.push(Artifact {
        generation: ctx.facts.generation,
        builder: KIND.into(),
        region: Some(ec2.region.clone()),
        image_id: Some(id.to_string()),
        snapshot_ids: snapshots.clone(),
        source_image_id: ctx.outputs.get(out::SOURCE_AMI).cloned(),
        created_at: Some(Time(k8s_openapi::jiff::Timestamp::now())),
    });
    o.outputs.insert(image_key(&ec2.region), id.to_string());
    o.outputs
        .insert(format!("snapshot_ids.{}", ec2.region), snapshots.join(","));
    Ok(o)
}

/// Images and snapshots to remove in one region.
#[derive(Default)]
struct Doomed {
    images: Vec<String>,
    snapshots: Vec<String>,
}

impl Doomed {
    fn add_image(&mut self, id: &str) {
        if !self.images.iter().any(|i| i == id) {
            self.images.push(id.to_string());
        }
    }

    fn add_snapshot(&mut self, id: &str) {
        if !self.snapshots.iter().any(|s| s == id) {
            self.snapshots.push(id.to_string());
        }
    }

    /// What the record names in `region` (a record without a region is the build
    /// region's, as older kilns wrote them).
    fn recorded(record: &crate::api::StepRecord, region: &str, build_region: &str) -> Doomed {
        Doomed {
            images: super::recorded_in(record, "Image", region, build_region),
            snapshots: super::recorded_in(record, "Snapshot", region, build_region),
        }
    }

    /// Adds this build's images and snapshots that carry kiln's tags in `ec2`'s
    /// region: of one generation, or of every generation with `None`. Snapshots are
    /// tagged at creation, so one whose image is gone (deregistered by an earlier
    /// attempt, or never available) is still found.
    async fn find_tagged(
        &mut self,
        ec2: &Ec2,
        facts: &BuildFacts,
        generation: Option<i64>,
    ) -> Result<(), AwsError> {
        let mut filters = vec![filter(&format!("tag:{BUILD_UID_TAG}"), facts.uid.clone())];
        if let Some(g) = generation {
            filters.push(filter("tag:kiln.dev/generation", g.to_string()));
        }
        let images = ec2
            .client
            .describe_images()
            .owners("self")
            .set_filters(Some(filters.clone()))
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("DescribeImages", e))?;
        for i in images.images() {
            if let Some(id) = i.image_id() {
                self.add_image(id);
            }
            for s in snapshots_of(i) {
                self.add_snapshot(&s);
            }
        }
        let mut pages = ec2
            .client
            .describe_snapshots()
            .owner_ids("self")
            .set_filters(Some(filters))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| AwsError::from_sdk("DescribeSnapshots", e))?;
            for s in page.snapshots() {
                if let Some(id) = s.snapshot_id() {
                    self.add_snapshot(id);
                }
            }
        }
        Ok(())
    }

    /// Deregisters the images, then deletes the snapshots. Any failure fails the
    /// attempt, to be retried: a snapshot refused as `InvalidSnapshot.InUse` right
    /// after its image was deregistered is found again by its tag next time.
    async fn remove(mut self, ec2: &Ec2) -> Result<Vec<String>, StepError> {
        for id in self.images.clone() {
            // An image lists its snapshots; look them up before it is gone.
            let r = ec2
                .client
                .describe_images()
                .image_ids(&id)
                .send()
                .await
                .map_err(|e| AwsError::from_sdk("DescribeImages", e));
            match r {
                Ok(r) => {
                    for i in r.images() {
                        for s in snapshots_of(i) {
                            self.add_snapshot(&s);
                        }
                    }
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.retry()),
            }
            if let Err(e) = ec2.client.deregister_image().image_id(&id).send().await {
                let e = AwsError::from_sdk("DeregisterImage", e);
                if !e.is_not_found() {
                    return Err(e.retry());
                }
            }
        }
        for s in &self.snapshots {
            if let Err(e) = ec2.client.delete_snapshot().snapshot_id(s).send().await {
                let e = AwsError::from_sdk("DeleteSnapshot", e);
                if !e.is_not_found() {
                    return Err(e.retry());
                }
            }
        }
        Ok(self.images)
    }
}

/// Removes the images (recorded, or found by kiln's tags) and snapshots of this
/// build's generation in `region`, unless every step of the build succeeded: then
/// they are the artifact, whatever happened after (see [`BuildOutcome::of`]). The
/// steps' `needs_cleanup` already spares such a build any cleanup; this check keeps
/// the artifact safe whatever calls it.
fn remove_images<'a>(
    ctx: &'a CleanupContext,
    region: &'a str,
) -> BoxFuture<'a, Result<(), StepError>> {
    Box::pin(async move {
        if ctx.outcome == BuildOutcome::Succeeded {
            return Ok(());
        }
        let ebs = ebs(&ctx.spec)?;
        let ec2 = Ec2::for_build(ebs, &ctx.client, &ctx.facts, region).await?;
        let mut doomed = Doomed::recorded(&ctx.record, region, &ebs.region);
        doomed
            .find_tagged(&ec2, &ctx.facts, Some(ctx.facts.generation))
            .await
            .map_err(AwsError::retry)?;
        doomed.remove(&ec2).await?;
        Ok(())
    })
}

/// `artifactPolicy: Delete`: on deletion of the ImageBuild, every image of every
/// generation (found by kiln's `kiln.dev/build-uid` tag, plus those the artifact
/// history records) and their snapshots, in every region the ImageBuild used.
pub struct RemoveArtifacts;

impl Step for RemoveArtifacts {
    fn name(&self) -> &str {
        "remove-artifacts"
    }

    fn run<'a>(&'a self, _ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async {
            Err(StepError::Failed(
                "internal error: remove-artifacts only cleans up".into(),
            ))
        })
    }

    fn cleanup<'a>(&'a self, ctx: &'a CleanupContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            let mut removed = Vec::new();
            for region in &ctx.regions {
                let ec2 = Ec2::for_build(ebs, &ctx.client, &ctx.facts, region).await?;
                let mut doomed = Doomed::recorded(&ctx.record, region, &ebs.region);
                doomed
                    .find_tagged(&ec2, &ctx.facts, None)
                    .await
                    .map_err(AwsError::retry)?;
                for id in doomed.remove(&ec2).await? {
                    removed.push(format!("{id} in {region}"));
                }
            }
            tracing::info!(removed = %removed.join(", "), "removed the ImageBuild's images (artifactPolicy: Delete)");
            Ok(())
        })
    }
}

/// Tags of a new image and of its snapshots, given in the create call: cleanup finds
/// a snapshot by them even when its image never became available.
///
/// The image also carries its lineage: the source image it was built from and, for
/// a pipeline's build, the pipeline and version, so that "which base was this built
/// from" and "which versions were built from a base" are answered from EC2 alone.
fn image_tags(
    facts: &BuildFacts,
    ebs: &crate::api::AmazonEbsBuilder,
    source: Option<&String>,
) -> Vec<aws_sdk_ec2::types::TagSpecification> {
    let mut image = tags(facts, &ebs.tags);
    let mut lineage = Vec::new();
    if let Some(source) = source {
        lineage.push((SOURCE_IMAGE_TAG, source.clone()));
    }
    if let Some(l) = &facts.lineage {
        lineage.push((PIPELINE_TAG, format!("{}/{}", facts.namespace, l.pipeline)));
        lineage.push((PIPELINE_VERSION_TAG, l.version.to_string()));
    }
    image.extend(
        lineage
            .into_iter()
            .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build()),
    );
    vec![
        tag_spec(aws_sdk_ec2::types::ResourceType::Image, &image),
        tag_spec(
            aws_sdk_ec2::types::ResourceType::Snapshot,
            &tags(facts, &ebs.snapshot_tags),
        ),
    ]
}

/// What an image name in this account and region belongs to.
enum Named {
    Ours(String),
    /// Not this build's (no `kiln.dev/build-uid` tag with its uid): never adopted.
    Foreign(String),
    Free,
}

async fn named(ec2: &Ec2, name: &str, facts: &BuildFacts) -> Result<Named, StepError> {
    let found = find_by_name(ec2, name, facts)
        .await
        .map_err(AwsError::fail)?;
    Ok(match found.iter().find(|f| f.ours) {
        Some(f) => Named::Ours(f.id.clone()),
        None => match found.into_iter().next() {
            Some(f) => Named::Foreign(f.id),
            None => Named::Free,
        },
    })
}

fn foreign_image(name: &str, id: &str, region: &str, facts: &BuildFacts) -> StepError {
    StepError::Failed(format!(
        "spec.builder.amazonEBS.amiName: an AMI named {name:?} already exists in {region} ({id}) and is not this build's (it has no {BUILD_UID_TAG}={} tag); kiln neither adopts nor replaces it: choose another amiName",
        facts.uid
    ))
}

/// This build's image of that name, or a failure naming whoever holds the name.
/// Creates it with `create` first: only a taken name (`InvalidAMIName.Duplicate`)
/// makes it look the name up, which finds the image of an earlier attempt, or of a
/// create whose reply was lost (the call took effect, then a 5xx, and the SDK's
/// retry met the name), by name and tag.
async fn ensure_image<F, Fut>(
    ec2: &Ec2,
    name: &str,
    facts: &BuildFacts,
    create: F,
) -> Result<String, StepError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>, AwsError>>,
{
    let e = match create().await {
        Ok(Some(id)) => return Ok(id),
        Ok(None) => {
            return Err(StepError::Failed(format!(
                "creating image {name:?} in {}: the reply has no image ID",
                ec2.region
            )));
        }
        Err(e) if e.is("InvalidAMIName.Duplicate") => e,
        Err(e) => return Err(e.fail()),
    };
    // DescribeImages may not show a new image for a moment.
    for _ in 0..10 {
        match named(ec2, name, facts).await? {
            Named::Ours(id) => {
                tracing::info!(image = %id, "a create whose reply was lost made this build's image; using it");
                return Ok(id);
            }
            Named::Foreign(id) => return Err(foreign_image(name, &id, &ec2.region, facts)),
            Named::Free => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
        }
    }
    Err(e.fail())
}

/// Captures the instance as an AMI. With `encryptBoot`, as Packer does, this is an
/// unencrypted intermediate under a name of kiln's (see [`intermediate_name`]):
/// `encrypt-image` then copies it, encrypted, to `amiName` in the same region, and
/// this step's cleanup removes the intermediate whatever the outcome.
pub struct CreateImage {
    pub encrypt: bool,
}

/// The name of the unencrypted intermediate image of an encrypted build.
fn intermediate_name(facts: &BuildFacts) -> String {
    format!("kiln-{}-{}-unencrypted", facts.uid, facts.generation)
}

impl Step for CreateImage {
    fn name(&self) -> &str {
        "create-image"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            let w = waits(ebs)?;
            let name = if self.encrypt {
                intermediate_name(&ctx.facts)
            } else {
                output(&ctx.outputs, out::AMI_NAME)?.clone()
            };
            let instance = output(&ctx.outputs, out::INSTANCE_ID)?.clone();
            let ec2 = Ec2::for_build(ebs, &ctx.client, &ctx.facts, &ebs.region).await?;
            let id = ensure_image(&ec2, &name, &ctx.facts, || async {
                let r = ec2
                    .client
                    .create_image()
                    .instance_id(&instance)
                    .name(&name)
                    .set_tag_specifications(Some(image_tags(
                        &ctx.facts,
                        ebs,
                        ctx.outputs.get(out::SOURCE_AMI),
                    )))
                    .set_description(ebs.ami_description.clone())
                    .send()
                    .await
                    .map_err(|e| AwsError::from_sdk("CreateImage", e))?;
                Ok(r.image_id().map(str::to_string))
            })
            .await?;
            let mut o = capture(ctx, &ec2, &w, &id, !self.encrypt).await?;
            o.outputs.insert(out::IMAGE_ID.into(), id);
            Ok(o)
        })
    }

    fn cleanup<'a>(&'a self, ctx: &'a CleanupContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            if !self.encrypt {
                return remove_images(ctx, &ebs.region).await;
            }
            // The intermediate is temporary: removed after success too. Only it: the
            // encrypted image carries the same tags, so nothing is found by tag here.
            let ec2 = Ec2::for_build(ebs, &ctx.client, &ctx.facts, &ebs.region).await?;
            let mut doomed = Doomed::recorded(&ctx.record, &ebs.region, &ebs.region);
            if let Named::Ours(id) = named(&ec2, &intermediate_name(&ctx.facts), &ctx.facts).await?
            {
                doomed.add_image(&id);
            }
            doomed.remove(&ec2).await.map(|_| ())
        })
    }

    /// The image is the artifact once every step succeeded; an intermediate of
    /// `encryptBoot` goes whatever the outcome.
    fn needs_cleanup(&self, _record: &crate::api::StepRecord, outcome: BuildOutcome) -> bool {
        self.encrypt || outcome == BuildOutcome::Failed
    }
}

/// Copies the image to `region`: to each of `amiRegions`, and as `encrypt-image`
/// into the build region itself (encrypted, replacing the intermediate: later copies
/// are made from it).
pub struct CopyImage {
    pub name: String,
    pub region: String,
}

impl Step for CopyImage {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &str {
        if self.name == "encrypt-image" {
            "encrypt-image"
        } else {
            "copy-image"
        }
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            let w = waits(ebs)?;
            let name = output(&ctx.outputs, out::AMI_NAME)?.clone();
            let source = output(&ctx.outputs, out::IMAGE_ID)?.clone();
            let ec2 = Ec2::for_build(ebs, &ctx.client, &ctx.facts, &self.region).await?;
            let id = ensure_image(&ec2, &name, &ctx.facts, || async {
                let mut req = ec2
                    .client
                    .copy_image()
                    .source_image_id(&source)
                    .source_region(&ebs.region)
                    .name(&name)
                    .client_token(client_token(
                        &ctx.facts.uid,
                        ctx.facts.generation,
                        &self.name,
                    ))
                    .set_tag_specifications(Some(image_tags(
                        &ctx.facts,
                        ebs,
                        ctx.outputs.get(out::SOURCE_AMI),
                    )))
                    .set_description(ebs.ami_description.clone());
                if ebs.encrypt_boot || ebs.kms_key_id.is_some() {
                    req = req.encrypted(true);
                }
                if let Some(k) = &ebs.kms_key_id {
                    req = req.kms_key_id(k);
                }
                let r = req
                    .send()
                    .await
                    .map_err(|e| AwsError::from_sdk("CopyImage", e))?;
                Ok(r.image_id().map(str::to_string))
            })
            .await?;
            let mut o = capture(ctx, &ec2, &w, &id, true).await?;
            if self.region == ebs.region {
                o.outputs.insert(out::IMAGE_ID.into(), id);
            }
            Ok(o)
        })
    }

    fn cleanup<'a>(&'a self, ctx: &'a CleanupContext) -> BoxFuture<'a, Result<(), StepError>> {
        remove_images(ctx, &self.region)
    }

    /// Only a failed build's copies go (see [`remove_images`]).
    fn needs_cleanup(&self, _record: &crate::api::StepRecord, outcome: BuildOutcome) -> bool {
        outcome == BuildOutcome::Failed
    }
}

/// With `forceDeregister`: removes this ImageBuild's earlier AMI of the same name
/// (and with `forceDeleteSnapshot` its snapshots) in every target region. Only
/// images of exactly that name, owned by this account and tagged as this
/// ImageBuild's, are touched (see [`replaceable`]).
pub struct DeregisterExisting;

impl Step for DeregisterExisting {
    fn name(&self) -> &str {
        "deregister-existing"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            let name = output(&ctx.outputs, out::AMI_NAME)?.clone();
            let mut regions = vec![ebs.region.clone()];
            regions.extend(ebs.ami_regions.iter().cloned());
            let mut o = StepOutput::default();
            let mut removed = Vec::new();
            for region in regions {
                let ec2 = Ec2::for_build(ebs, &ctx.client, &ctx.facts, &region).await?;
                // Checked again: the name may have been taken since pre-validate.
                for f in replaceable(&ec2, &name, &ctx.facts).await? {
                    if let Err(e) = ec2.client.deregister_image().image_id(&f.id).send().await {
                        let e = AwsError::from_sdk("DeregisterImage", e);
                        if !e.is_not_found() {
                            return Err(e.fail());
                        }
                    }
                    if ebs.force_delete_snapshot {
                        for s in &f.snapshots {
                            if let Err(e) = ec2.client.delete_snapshot().snapshot_id(s).send().await
                            {
                                let e = AwsError::from_sdk("DeleteSnapshot", e);
                                if !e.is_not_found() {
                                    return Err(e.fail());
                                }
                            }
                        }
                    }
                    o.resources.push(ResourceRecord {
                        kind: "Image".into(),
                        id: f.id.clone(),
                        region: Some(region.clone()),
                        created: false,
                    });
                    o.removed_images.push(f.id.clone());
                    removed.push(format!("{} in {region}", f.id));
                }
            }
            o.message = Some(if removed.is_empty() {
                format!("no AMI named {name:?} to replace")
            } else {
                format!("deregistered {}", removed.join(", "))
            });
            Ok(o)
        })
    }
}

/// Writes this build's artifacts to the ConfigMap `manifestConfigMap` names.
pub struct Manifest;

impl Step for Manifest {
    fn name(&self) -> &str {
        "manifest"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            let Some(cm) = &ebs.manifest_config_map else {
                return Ok(StepOutput::default());
            };
            let mut regions = vec![ebs.region.clone()];
            regions.extend(ebs.ami_regions.iter().cloned());
            let artifacts: Vec<_> = regions
                .iter()
                .filter_map(|r| {
                    let id = ctx.outputs.get(&image_key(r))?;
                    let snaps: Vec<&str> = ctx
                        .outputs
                        .get(&format!("snapshot_ids.{r}"))
                        .map(|s| s.split(',').filter(|s| !s.is_empty()).collect())
                        .unwrap_or_default();
                    Some(serde_json::json!({"region": r, "imageId": id, "snapshotIds": snaps}))
                })
                .collect();
            let manifest = serde_json::json!({
                "build": format!("{}/{}", ctx.facts.namespace, ctx.facts.name),
                "generation": ctx.facts.generation,
                "builder": KIND,
                "amiName": ctx.outputs.get(out::AMI_NAME),
                "sourceImageId": ctx.outputs.get(out::SOURCE_AMI),
                "artifacts": artifacts,
            });
            let body = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": cm.name, "labels": {"app.kubernetes.io/managed-by": "kiln"}},
                "data": {"manifest.json": manifest.to_string()},
            });
            let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.facts.namespace);
            api.patch(
                &cm.name,
                &PatchParams::apply(crate::controller::MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(|e| {
                StepError::Failed(format!(
                    "spec.builder.amazonEBS.manifestConfigMap: writing ConfigMap {}: {e}",
                    cm.name
                ))
            })?;
            Ok(StepOutput {
                message: Some(format!("artifacts written to ConfigMap {}", cm.name)),
                ..Default::default()
            })
        })
    }
}
