//! Writes to the ImageBuild: status by server-side apply, finalizer by JSON patch
//! guarded with `test` so a concurrent change is never overwritten.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{MANAGER, apply_params};
use crate::api::{FINALIZER, ImageBuild, ImageBuildStatus};

/// The apply body; `resourceVersion` makes it conditional on the status we read.
pub fn status_patch(obj: &ImageBuild, status: &ImageBuildStatus) -> serde_json::Value {
    json!({
        "apiVersion": ImageBuild::api_version(&()),
        "kind": ImageBuild::kind(&()),
        "metadata": {
            "name": obj.name_any(),
            "resourceVersion": obj.resource_version(),
        },
        "status": status,
    })
}

pub async fn apply(
    api: &Api<ImageBuild>,
    obj: &ImageBuild,
    status: &ImageBuildStatus,
) -> Result<ImageBuild, kube::Error> {
    let patch = status_patch(obj, status);
    crate::metrics::get().status_writes.inc();
    api.patch_status(&obj.name_any(), &apply_params(), &Patch::Apply(&patch))
        .await
}

/// Adds kiln's finalizer, conditional on the resourceVersion it was decided from.
pub async fn add_finalizer<K>(api: &Api<K>, obj: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = if obj.finalizers().is_empty() {
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": obj.resource_version()},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": obj.resource_version()},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    };
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(kube::Error::SerdeError)?;
    crate::metrics::get().status_writes.inc();
    api.patch(&obj.name_any(), &patch_params(), &Patch::Json::<()>(patch))
        .await
}

pub async fn remove_finalizer<K>(api: &Api<K>, obj: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(i) = obj.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let patch = json!([
        {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
    ]);
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(kube::Error::SerdeError)?;
    crate::metrics::get().status_writes.inc();
    match api
        .patch(&obj.name_any(), &patch_params(), &Patch::Json::<()>(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    }
}

/// kiln's finalizer for one ImageBuild on a Secret its cleanup needs.
pub fn secret_finalizer(uid: &str) -> String {
    format!("{}/cleanup-{uid}", crate::api::GROUP)
}

/// Adds the build's finalizer to each Secret (a strategic merge adds to the list
/// without reading it). A Secret that does not exist is not held: the build fails
/// on its own when it reads it.
pub async fn hold_secrets(
    client: &kube::Client,
    namespace: &str,
    uid: &str,
    names: &[String],
) -> Result<(), kube::Error> {
    let patch = json!({"metadata": {"finalizers": [secret_finalizer(uid)]}});
    patch_secrets(client, namespace, names, &patch).await
}

/// Removes the build's finalizer from each Secret; a Secret already gone is done.
pub async fn release_secrets(
    client: &kube::Client,
    namespace: &str,
    uid: &str,
    names: &[String],
) -> Result<(), kube::Error> {
    let patch =
        json!({"metadata": {"$deleteFromPrimitiveList/finalizers": [secret_finalizer(uid)]}});
    patch_secrets(client, namespace, names, &patch).await
}

async fn patch_secrets(
    client: &kube::Client,
    namespace: &str,
    names: &[String],
    patch: &serde_json::Value,
) -> Result<(), kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for name in names {
        match api
            .patch(name, &patch_params(), &Patch::Strategic(patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
