//! The `ansible` provisioner's spec.

use std::collections::BTreeMap;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::{EnvVar, LocalObjectRef, duration};

/// Runs `ansible-playbook` in a runner Pod against the build machine, over a
/// direct SSH connection that trusts only the host key kiln's own connection
/// verified (or, with `insecureIgnore`, accepted).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct AnsibleProvisioner {
    /// The playbook to run: a path relative to the source's root, e.g. `site.yml`.
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^[^/]"))]
    #[x_kube(validation = kube::core::Rule::new(
        "!(self == '..' || self.startsWith('../') || self.contains('/../') || self.endsWith('/..'))"
    ).message("must not have a '..' part"))]
    pub playbook: String,
    /// Where the playbook and its roles come from.
    pub source: PlaybookSource,
    /// Variables passed with `--extra-vars` (strings). Names starting with `kiln_`
    /// are kept for the build facts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 256))]
    #[x_kube(validation = kube::core::Rule::new(
        "self.all(k, k.matches('^[A-Za-z_][A-Za-z0-9_]{0,127}$') && !k.startsWith('kiln_'))"
    ).message("names must be identifiers (letters, digits, _) and not start with kiln_, kept for the build facts"))]
    pub extra_vars: BTreeMap<String, String>,
    /// Contents of an `ansible.cfg` (`ANSIBLE_CONFIG`); default: the source's own
    /// `ansible.cfg` next to the playbook, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub ansible_cfg: Option<String>,
    /// Run only tasks with these tags (`--tags`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 128), regex(pattern = r"^[^,]+$"))
    )]
    pub tags: Vec<String>,
    /// Skip tasks with these tags (`--skip-tags`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 128), regex(pattern = r"^[^,]+$"))
    )]
    pub skip_tags: Vec<String>,
    /// Inventory groups the build machine is in besides `all` (its host name is
    /// `default`, as in Packer), for playbooks that target a group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(
            length(min = 1, max = 63),
            regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
        )
    )]
    #[x_kube(validation = kube::core::Rule::new("!self.exists(g, g == 'all' || g == 'ungrouped')")
        .message("all and ungrouped are Ansible's own groups"))]
    pub groups: Vec<String>,
    /// `-v` repeated this many times (0-4).
    #[serde(default)]
    #[schemars(range(min = 0, max = 4))]
    pub verbosity: u8,
    /// Environment of `ansible-playbook`; values from Secrets are masked in all output.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub env: Vec<EnvVar>,
    /// Limit on the whole run, e.g. `30m`.
    #[serde(default = "default_timeout")]
    #[x_kube(validation = duration::rule())]
    #[schemars(length(max = 32))]
    pub timeout: String,
    /// Image of the runner Pod (it needs `/bin/sh`, `ansible-playbook`, `ssh`, and
    /// `git` for a Git source); default: the operator's `--runner-image` (the
    /// chart's runner image, which has them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
}

fn default_timeout() -> String {
    "30m".into()
}

/// Exactly one of `configMap` or `git`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.configMap) ? 1 : 0) + (has(self.git) ? 1 : 0) == 1"
).message("set exactly one of configMap or git"))]
pub struct PlaybookSource {
    /// A ConfigMap whose keys are the files: `__` in a key stands for `/`, so
    /// `roles__web__tasks__main.yml` is `roles/web/tasks/main.yml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<LocalObjectRef>,
    /// A Git repository, cloned in the runner Pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSource>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct GitSource {
    /// `https://`, `http://`, `git://` or `ssh://` URL of the repository.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^\S+$"))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^(https?|git|ssh)://.')")
        .message("must be an http://, https://, git:// or ssh:// URL"))]
    pub url: String,
    /// Branch, tag or commit to check out; default: the remote's default branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[^\s-][^\s]*$"))]
    pub revision: Option<String>,
    /// Directory inside the repository that the playbook path starts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^[^/]"))]
    #[x_kube(validation = kube::core::Rule::new(
        "!(self == '..' || self.startsWith('../') || self.contains('/../') || self.endsWith('/..'))"
    ).message("must not have a '..' part"))]
    pub path: Option<String>,
    /// Secret with `username` and `password` (HTTP(S)), or `ssh-privatekey` and
    /// `known_hosts` (SSH). Mounted into the runner Pod only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalObjectRef>,
}
