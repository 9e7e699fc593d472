//! A temporary key pair, unless `keyPairName` is given. kiln generates the key and
//! stores it in a Secret owned by the ImageBuild *before* importing the public half,
//! so a crash at any point leaves nothing EC2 holds that status does not name.

use futures::future::BoxFuture;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Resource};
use ssh_key::{Algorithm, LineEnding, PrivateKey};

use super::{AwsError, Ec2, ebs, ours, out, tag_spec, tags};
use crate::api::{BUILD_UID_TAG, ImageBuild, ResourceRecord};
use crate::engine::{BuildFacts, CleanupContext, Step, StepContext, StepError, StepOutput};
use crate::provisioners::connect::{DEFAULT_PRIVATE_KEY_KEY, OUT_KEY_SECRET};

pub struct KeyPairStep;

pub fn key_name(facts: &BuildFacts) -> String {
    format!("kiln-{}-{}", facts.uid, facts.generation)
}

pub fn secret_name(facts: &BuildFacts) -> String {
    format!("kiln-ssh-{}-{}", facts.uid, facts.generation)
}

impl Step for KeyPairStep {
    fn name(&self) -> &str {
        "key-pair"
    }

    fn run<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            let mut o = StepOutput::default();
            if let Some(given) = &ebs.key_pair_name {
                o.resources.push(ResourceRecord {
                    kind: "KeyPair".into(),
                    id: given.clone(),
                    region: Some(ebs.region.clone()),
                    created: false,
                });
                o.outputs.insert(out::KEY_PAIR.into(), given.clone());
                o.message = Some(format!("using the given key pair {given}"));
                return Ok(o);
            }
            let facts = &ctx.facts;
            let secret = secret_name(facts);
            let name = key_name(facts);
            // Both names are fixed by the build: one status write records them
            // before either is made.
            ctx.record_all(vec![
                ResourceRecord {
                    kind: "Secret".into(),
                    id: secret.clone(),
                    region: None,
                    created: true,
                },
                ResourceRecord {
                    kind: "KeyPair".into(),
                    id: name.clone(),
                    region: Some(ebs.region.clone()),
                    created: true,
                },
            ])
            .await?;
            let public = ensure_secret(ctx, &secret).await?;
            let ec2 = Ec2::for_build(ebs, &ctx.client, facts, &ebs.region).await?;
            let r = ec2
                .client
                .import_key_pair()
                .key_name(&name)
                .public_key_material(aws_sdk_ec2::primitives::Blob::new(public.into_bytes()))
                .tag_specifications(tag_spec(
                    aws_sdk_ec2::types::ResourceType::KeyPair,
                    &tags(facts, &Default::default()),
                ))
                .send()
                .await;
            let id = match r {
                Ok(r) => r.key_pair_id().map(str::to_string),
                // Our deterministic name: an earlier attempt (or a call whose reply
                // was lost) imported it, if it carries this build's tag.
                Err(e) => {
                    let e = AwsError::from_sdk("ImportKeyPair", e);
                    if !e.is("InvalidKeyPair.Duplicate") {
                        return Err(e.fail());
                    }
                    match owner(&ec2, &name, facts).await.map_err(AwsError::fail)? {
                        Owner::Us(id) => id,
                        // Not listed yet: cleanup looks it up by name and tag.
                        Owner::Nobody => None,
                        Owner::Other => {
                            return Err(StepError::Failed(format!(
                                "key pair {name} in {} has kiln's name for this build but not its {BUILD_UID_TAG}={} tag: kiln neither uses nor deletes it; remove it",
                                ebs.region, facts.uid
                            )));
                        }
                    }
                }
            };
            // Cleanup deletes by this ID: exactly the key pair imported here,
            // with no lookup of whose a key pair of that name is.
            if let Some(id) = id {
                o.outputs.insert(out::KEY_PAIR_ID.into(), id);
            }
            o.outputs.insert(out::KEY_PAIR.into(), name.clone());
            o.outputs.insert(
                OUT_KEY_SECRET.into(),
                format!("{}/{secret}", facts.namespace),
            );
            o.message = Some(format!(
                "imported temporary key pair {name}; private key in Secret {secret}"
            ));
            Ok(o)
        })
    }

    fn cleanup<'a>(&'a self, ctx: &'a CleanupContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let ebs = ebs(&ctx.spec)?;
            for r in ctx.record.resources.iter().filter(|r| r.created) {
                match r.kind.as_str() {
                    "KeyPair" => {
                        let region = r.region.clone().unwrap_or_else(|| ebs.region.clone());
                        let ec2 = Ec2::for_build(ebs, &ctx.client, &ctx.facts, &region).await?;
                        let imported = ctx.record.outputs.get(out::KEY_PAIR_ID).cloned();
                        let id = match imported {
                            Some(id) => Some(id),
                            // The name is recorded before the import: a key pair of
                            // that name without the build's tag is someone else's.
                            None => match owner(&ec2, &r.id, &ctx.facts)
                                .await
                                .map_err(AwsError::retry)?
                            {
                                Owner::Us(id) => id,
                                Owner::Nobody => continue,
                                Owner::Other => {
                                    tracing::warn!(key_pair = %r.id, "a key pair has this build's name but not its tag; leaving it alone");
                                    continue;
                                }
                            },
                        };
                        // By the ID when known (exactly the key pair imported); else
                        // by the name just checked to carry the build's tag.
                        let delete = ec2.client.delete_key_pair();
                        let delete = match id {
                            Some(id) => delete.key_pair_id(id),
                            None => delete.key_name(&r.id),
                        };
                        if let Err(e) = delete.send().await {
                            let e = AwsError::from_sdk("DeleteKeyPair", e);
                            if !e.is_not_found() {
                                return Err(e.retry());
                            }
                        }
                    }
                    "Secret" => {
                        crate::provisioners::connect::forget_generated_key(&format!(
                            "{}/{}",
                            ctx.facts.namespace, r.id
                        ));
                        let api: Api<Secret> =
                            Api::namespaced(ctx.client.clone(), &ctx.facts.namespace);
                        match api.delete(&r.id, &DeleteParams::default()).await {
                            Ok(_) => {}
                            Err(kube::Error::Api(s)) if s.code == 404 => {}
                            Err(e) => {
                                return Err(StepError::Transient(format!(
                                    "deleting Secret {}: {e}",
                                    r.id
                                )));
                            }
                        }
                    }
                    _ => {}
                }
            }
            Ok(())
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Owner {
    /// This build's, with its `KeyPairId`.
    Us(Option<String>),
    Other,
    Nobody,
}

/// Whose key pair of that name exists in `ec2`'s region.
async fn owner(ec2: &Ec2, name: &str, facts: &BuildFacts) -> Result<Owner, AwsError> {
    let r = ec2.client.describe_key_pairs().key_names(name).send().await;
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            let e = AwsError::from_sdk("DescribeKeyPairs", e);
            return if e.is_not_found() {
                Ok(Owner::Nobody)
            } else {
                Err(e)
            };
        }
    };
    Ok(match r.key_pairs().first() {
        None => Owner::Nobody,
        Some(k) if ours(k.tags(), facts) => Owner::Us(k.key_pair_id().map(str::to_string)),
        Some(_) => Owner::Other,
    })
}

/// Returns the public key (OpenSSH format) of the key in the build's Secret,
/// generating and storing one first if there is none. The create comes first: it
/// meets an existing Secret only on a resumed step, so a build reads none.
async fn ensure_secret(ctx: &StepContext, name: &str) -> Result<String, StepError> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.facts.namespace);
    let read = |s: Secret| -> Result<String, StepError> {
        let pem = s
            .data
            .and_then(|mut d| d.remove(DEFAULT_PRIVATE_KEY_KEY))
            .ok_or_else(|| {
                StepError::Failed(format!("Secret {name} has no {DEFAULT_PRIVATE_KEY_KEY}"))
            })?;
        let key = PrivateKey::from_openssh(&pem.0).map_err(|e| {
            StepError::Failed(format!("Secret {name}: unreadable private key: {e}"))
        })?;
        key.public_key()
            .to_openssh()
            .map_err(|e| StepError::Failed(format!("encoding public key: {e}")))
    };
    let kube_err = |e: kube::Error| StepError::Failed(format!("Secret {name}: {e}"));
    let mut rng = ssh_key::rand_core::UnwrapErr(ssh_key::getrandom::SysRng);
    let key = PrivateKey::random(&mut rng, Algorithm::Ed25519)
        .map_err(|e| StepError::Failed(format!("generating a key: {e}")))?;
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| StepError::Failed(format!("encoding the key: {e}")))?;
    let owner = ImageBuild::api_version(&()).to_string();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "kiln"},
            "ownerReferences": [{
                "apiVersion": owner,
                "kind": "ImageBuild",
                "name": ctx.facts.name,
                "uid": ctx.facts.uid,
            }],
        },
        "type": "kubernetes.io/ssh-auth",
    }))
    .map_err(|e| StepError::Failed(format!("building Secret {name}: {e}")))?;
    let mut secret = secret;
    secret.data = Some(
        [(
            DEFAULT_PRIVATE_KEY_KEY.to_string(),
            ByteString(pem.as_bytes().to_vec()),
        )]
        .into_iter()
        .collect(),
    );
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let s = api.get(name).await.map_err(kube_err)?;
            return read(s);
        }
        Err(e) => return Err(kube_err(e)),
    }
    crate::provisioners::connect::remember_generated_key(
        &format!("{}/{name}", ctx.facts.namespace),
        pem.to_string(),
    );
    key.public_key()
        .to_openssh()
        .map_err(|e| StepError::Failed(format!("encoding public key: {e}")))
}
