//! Reads of Secret and ConfigMap keys named by the spec. Errors name the spec field
//! and the object, never the value.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RefError {
    #[error("{field}: {kind} {namespace}/{name} not found")]
    NotFound {
        field: String,
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("{field}: {kind} {namespace}/{name} has no key {key:?}")]
    MissingKey {
        field: String,
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
    },
    #[error("{field}: reading {kind} {namespace}/{name}: {detail}")]
    Api {
        field: String,
        kind: &'static str,
        namespace: String,
        name: String,
        detail: String,
    },
}

/// Secret value; Debug never shows it.
pub struct SecretBytes(pub Vec<u8>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

pub async fn secret_key(
    client: &Client,
    namespace: &str,
    name: &str,
    key: &str,
    field: &str,
) -> Result<SecretBytes, RefError> {
    secret_keys(client, namespace, name, &[key], field)
        .await?
        .pop()
        .flatten()
        .ok_or_else(|| RefError::MissingKey {
            field: field.into(),
            kind: "Secret",
            namespace: namespace.into(),
            name: name.into(),
            key: key.into(),
        })
}

/// Several keys of one Secret with one read; `None` for a key it lacks.
pub async fn secret_keys(
    client: &Client,
    namespace: &str,
    name: &str,
    keys: &[&str],
    field: &str,
) -> Result<Vec<Option<SecretBytes>>, RefError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let found = api
        .get_opt(name)
        .await
        .map_err(|e| RefError::Api {
            field: field.into(),
            kind: "Secret",
            namespace: namespace.into(),
            name: name.into(),
            detail: e.to_string(),
        })?
        .ok_or_else(|| RefError::NotFound {
            field: field.into(),
            kind: "Secret",
            namespace: namespace.into(),
            name: name.into(),
        })?;
    let mut data = found.data.unwrap_or_default();
    let mut string_data = found.string_data.unwrap_or_default();
    Ok(keys
        .iter()
        .map(|k| {
            data.remove(*k)
                .map(|ByteString(b)| b)
                .or_else(|| string_data.remove(*k).map(String::into_bytes))
                .map(SecretBytes)
        })
        .collect())
}

/// Every key of a ConfigMap (`data` and `binaryData`), in key order.
pub async fn config_map(
    client: &Client,
    namespace: &str,
    name: &str,
    field: &str,
) -> Result<std::collections::BTreeMap<String, Vec<u8>>, RefError> {
    let found = get_config_map(client, namespace, name, field).await?;
    let mut files: std::collections::BTreeMap<String, Vec<u8>> = found
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    for (k, ByteString(v)) in found.binary_data.unwrap_or_default() {
        files.insert(k, v);
    }
    Ok(files)
}

async fn get_config_map(
    client: &Client,
    namespace: &str,
    name: &str,
    field: &str,
) -> Result<ConfigMap, RefError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    api.get_opt(name)
        .await
        .map_err(|e| RefError::Api {
            field: field.into(),
            kind: "ConfigMap",
            namespace: namespace.into(),
            name: name.into(),
            detail: e.to_string(),
        })?
        .ok_or_else(|| RefError::NotFound {
            field: field.into(),
            kind: "ConfigMap",
            namespace: namespace.into(),
            name: name.into(),
        })
}

pub async fn config_map_key(
    client: &Client,
    namespace: &str,
    name: &str,
    key: &str,
    field: &str,
) -> Result<Vec<u8>, RefError> {
    let found = get_config_map(client, namespace, name, field).await?;
    if let Some(v) = found.data.and_then(|mut d| d.remove(key)) {
        return Ok(v.into_bytes());
    }
    if let Some(ByteString(v)) = found.binary_data.and_then(|mut d| d.remove(key)) {
        return Ok(v);
    }
    Err(RefError::MissingKey {
        field: field.into(),
        kind: "ConfigMap",
        namespace: namespace.into(),
        name: name.into(),
        key: key.into(),
    })
}
