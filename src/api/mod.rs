//! The `ImageBuild` resource: spec, status and the CRD generated from them.
//!
//! These types are the source of truth for `crds/`; `tests/crd.rs` fails when the
//! committed YAML drifts from what `kiln crd` prints.

mod ansible;
pub mod duration;
mod pipeline;
mod status;

use std::collections::BTreeMap;

use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

pub use ansible::*;
pub use pipeline::*;
pub use status::*;

pub const GROUP: &str = "kiln.dev";
pub const FINALIZER: &str = "kiln.dev/cleanup";
pub const BUILD_UID_TAG: &str = "kiln.dev/build-uid";
/// Tag naming the ImageBuild (`namespace/name`) a resource was made for.
pub const BUILD_TAG: &str = "kiln.dev/build";
/// Tag of an image: the image it was built from.
pub const SOURCE_IMAGE_TAG: &str = "kiln.dev/source-image";
/// Tag of a pipeline's image: the ImagePipeline (`namespace/name`).
pub const PIPELINE_TAG: &str = "kiln.dev/pipeline";
/// Tag of a pipeline's image: its version number.
pub const PIPELINE_VERSION_TAG: &str = "kiln.dev/pipeline-version";

/// A machine image build: launch a build machine from a source image, provision it
/// over SSH, capture an image, and remove every temporary resource kiln created.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "ImageBuild",
    namespaced,
    shortname = "ib",
    category = "kiln",
    status = "ImageBuildStatus",
    doc = "A machine image build, run as durable recorded steps.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Step","type":"string","jsonPath":".status.currentStep"}"#,
    printcolumn = r#"{"name":"Artifact","type":"string","jsonPath":".status.artifacts[-1:].imageId"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.message"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.builder.__null__) || has(self.communicator.ssh.host)"
).message("communicator.ssh.host is required with the null builder"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.builder.__null__) || has(self.communicator.ssh.privateKeySecretRef)"
).message("communicator.ssh.privateKeySecretRef is required with the null builder"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.builder.amazonEBS) || !has(self.builder.amazonEBS.keyPairName) || has(self.communicator.ssh.privateKeySecretRef)"
).message("communicator.ssh.privateKeySecretRef is required when builder.amazonEBS.keyPairName is given"))]
pub struct ImageBuildSpec {
    /// Where the build machine comes from and what is captured at the end.
    pub builder: Builder,
    /// How kiln reaches the build machine.
    pub communicator: Communicator,
    /// What runs on the build machine, in order. Each one is a recorded step.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub provisioners: Vec<Provisioner>,
    /// What happens to temporary resources when a step fails.
    #[serde(default)]
    pub on_error: OnError,
    /// What happens to the captured images when the ImageBuild is deleted.
    #[serde(default)]
    pub artifact_policy: ArtifactPolicy,
}

/// Exactly one builder must be set.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.__null__) ? 1 : 0) + (has(self.amazonEBS) ? 1 : 0) == 1"
).message("exactly one builder must be set: null or amazonEBS"))]
pub struct Builder {
    /// Launch nothing: provision an existing host given by `communicator.ssh.host`.
    #[serde(rename = "null", default, skip_serializing_if = "Option::is_none")]
    pub null: Option<NullBuilder>,
    /// Launch an EC2 instance, provision it, and capture an AMI.
    #[serde(rename = "amazonEBS", default, skip_serializing_if = "Option::is_none")]
    pub amazon_ebs: Option<AmazonEbsBuilder>,
}

impl Builder {
    /// Stable name used in status, events, metrics and `KILN_BUILDER`.
    pub fn kind(&self) -> &'static str {
        match (&self.null, &self.amazon_ebs) {
            (Some(_), _) => "null",
            (_, Some(_)) => "amazon-ebs",
            _ => "none",
        }
    }
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct NullBuilder {}

/// Packer's amazon-ebs builder. Resources given here are used as they are and never
/// deleted; everything else kiln creates is temporary and removed after the build.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.sourceAMI) ? 1 : 0) + (has(self.sourceAMIFilter) ? 1 : 0) == 1"
).message("exactly one of sourceAMI or sourceAMIFilter must be set"))]
pub struct AmazonEbsBuilder {
    /// Region of the build instance and of the first AMI, e.g. `eu-west-1`.
    #[schemars(
        length(min = 1, max = 32),
        regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")
    )]
    pub region: String,
    /// Cloud credentials from a Secret of the ImageBuild's namespace; without
    /// it the operator's own AWS identity (IRSA, Pod Identity, instance role).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<AwsCredentials>,
    /// Override of the EC2 endpoint (private endpoints, test servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub endpoint: Option<String>,
    /// The source image ID (`ami-…`); or `sourceAMIFilter`.
    #[serde(rename = "sourceAMI", default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^ami-[0-9a-f]+$"))]
    pub source_ami: Option<String>,
    #[serde(
        rename = "sourceAMIFilter",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub source_ami_filter: Option<SourceAmiFilter>,
    /// EC2 instance type of the build instance, e.g. `t3.micro`.
    #[schemars(length(min = 1))]
    pub instance_type: String,
    /// Name of the image; `{{ build.timestamp }}` and `{{ build.name }}` are expanded.
    #[serde(rename = "amiName")]
    #[schemars(length(min = 3, max = 128))]
    pub ami_name: String,
    /// Further regions to copy the AMI to, one `copy-image-<region>` step each.
    #[serde(rename = "amiRegions", default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 30),
        inner(length(max = 32), regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))
    )]
    #[x_kube(merge_strategy = kube::core::ListMerge::Set)]
    pub ami_regions: Vec<String>,
    /// Subnet of the build instance (checked in `pre-validate`); never deleted.
    /// Without it, the region's default VPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    /// Security groups to use as they are (checked in `pre-validate`, never
    /// deleted); without them kiln makes a temporary group for SSH from `sshCIDRs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    /// An existing key pair to launch with (never deleted); needs
    /// `communicator.ssh.privateKeySecretRef`. Without it kiln makes a temporary one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pair_name: Option<String>,
    /// Tags of the image (and its copies). Keys `kiln.dev/*` and `aws:*` are reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 45))]
    #[x_kube(validation = reserved_tags_rule())]
    pub tags: BTreeMap<String, String>,
    /// Tags of the build instance and its volumes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 45))]
    #[x_kube(validation = reserved_tags_rule())]
    pub run_tags: BTreeMap<String, String>,
    /// Tags of the image's snapshots.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 45))]
    #[x_kube(validation = reserved_tags_rule())]
    pub snapshot_tags: BTreeMap<String, String>,
    /// Encrypt the AMI copies (with `kmsKeyId`, or the account's default key).
    #[serde(default)]
    pub encrypt_boot: bool,
    /// KMS key for `encryptBoot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    /// Deregister an existing AMI of the same name before creating the new one.
    #[serde(default)]
    pub force_deregister: bool,
    /// With `forceDeregister`, also delete that AMI's snapshots.
    #[serde(default)]
    pub force_delete_snapshot: bool,
    /// Description of the AMI and of its copies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub ami_description: Option<String>,
    /// Which address of the instance kiln connects to.
    #[serde(default)]
    pub ssh_interface: SshInterface,
    /// Source CIDRs allowed to SSH in through the temporary security group.
    #[serde(rename = "sshCIDRs", default = "default_ssh_cidrs")]
    #[schemars(length(min = 1, max = 50), inner(length(max = 64)))]
    #[x_kube(validation = kube::core::Rule::new("self.all(c, isCIDR(c))")
        .message("each entry must be a CIDR such as 203.0.113.0/24 or 2001:db8::/32"))]
    pub ssh_cidrs: Vec<String>,
    /// User data for the build instance, as plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub user_data: Option<String>,
    /// Block devices of the build instance (and so of the image).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub block_device_mappings: Vec<BlockDevice>,
    /// Budget for each wait (instance running or stopped, image available, copy).
    #[serde(default = "default_wait_timeout")]
    #[x_kube(validation = duration::rule())]
    #[schemars(length(max = 32))]
    pub wait_timeout: String,
    /// First poll interval of a wait; later polls back off up to 4x this.
    #[serde(default = "default_poll_interval")]
    #[x_kube(validation = duration::rule())]
    #[schemars(length(max = 32))]
    pub poll_interval: String,
    /// Also write the artifacts to this ConfigMap (Packer's manifest post-processor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_config_map: Option<LocalObjectRef>,
}

/// kiln finds and cleans up its resources by its `kiln.dev/*` tags; a user tag must
/// never replace one. EC2 refuses `aws:*` keys.
fn reserved_tags_rule() -> kube::core::Rule {
    kube::core::Rule::new("self.all(k, !k.startsWith('kiln.dev/') && !k.startsWith('aws:'))")
        .message("tag keys starting with kiln.dev/ (kiln's own) or aws: (AWS's) are reserved")
}

fn default_ssh_cidrs() -> Vec<String> {
    vec!["0.0.0.0/0".into()]
}
fn default_wait_timeout() -> String {
    "60m".into()
}
fn default_poll_interval() -> String {
    "2s".into()
}

#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum SshInterface {
    #[default]
    #[serde(rename = "publicIP")]
    PublicIp,
    #[serde(rename = "privateIP")]
    PrivateIp,
    #[serde(rename = "publicDNS")]
    PublicDns,
    #[serde(rename = "privateDNS")]
    PrivateDns,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct BlockDevice {
    /// Device name, e.g. `/dev/sda1` (the source AMI's root device changes the root volume).
    #[schemars(regex(pattern = r"^/dev/[a-z0-9]+$"))]
    pub device_name: String,
    /// Size in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub volume_size: Option<i32>,
    /// EBS volume type, e.g. `gp3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 16))]
    pub volume_type: Option<String>,
    /// Delete the volume with the instance; with `false` kiln's cleanup deletes it.
    #[serde(default = "default_true")]
    pub delete_on_termination: bool,
    /// Encrypt the volume (unset: the account's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
}

fn default_true() -> bool {
    true
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct AwsCredentials {
    /// Secret with `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and optionally `AWS_SESSION_TOKEN`.
    pub secret_ref: LocalObjectRef,
}

/// Finds the source AMI by filters, as Packer's `source_ami_filter`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "size(self.owners) > 0 || (has(self.anyOwner) && self.anyOwner)"
).message("owners is required (account IDs, self, amazon or aws-marketplace): without it anyone's public image with a matching name can become the source; set anyOwner: true to search every owner anyway"))]
pub struct SourceAmiFilter {
    /// DescribeImages filters, e.g. `name: ubuntu/images/*-24.04-amd64-server-*`.
    #[serde(default)]
    pub filters: BTreeMap<String, String>,
    /// Whose images may be the source: account IDs, `self`, `amazon`,
    /// `aws-marketplace`. Required unless `anyOwner` is set.
    #[serde(default)]
    #[schemars(length(max = 50))]
    pub owners: Vec<String>,
    /// Search every owner's images. Anyone can publish a public image whose name
    /// matches your filter ("whoAMI"); only for filters that cannot be spoofed.
    #[serde(default)]
    pub any_owner: bool,
    /// Pick the newest match when several images match (else the build fails).
    #[serde(default)]
    pub most_recent: bool,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct LocalObjectRef {
    /// Name of the object in the ImageBuild's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// A key of a Secret or ConfigMap in the ImageBuild's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct KeyRef {
    /// Name of the object in the ImageBuild's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// The key in it.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A Secret key whose key has a conventional default.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct SecretKeyRefDefaulted {
    /// Name of the Secret in the ImageBuild's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// The key in it (each field documents its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: Option<String>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
pub struct Communicator {
    /// SSH to the build machine.
    pub ssh: SshCommunicator,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct SshCommunicator {
    /// User to log in as, e.g. `ubuntu`.
    #[schemars(length(min = 1, max = 64))]
    pub username: String,
    /// Address of the machine. Required for the null builder; for cloud builders it
    /// overrides the address the builder finds (bastions, tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub host: Option<String>,
    /// SSH port of the build machine.
    #[serde(default = "default_ssh_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Secret holding the private key; key defaults to `ssh-privatekey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_secret_ref: Option<SecretKeyRefDefaulted>,
    /// How the machine's host key is checked. There is no default that accepts any key.
    pub host_key: HostKeyPolicy,
    /// How long to keep trying to connect, e.g. `5m`.
    #[serde(default = "default_ssh_timeout")]
    #[x_kube(validation = duration::rule())]
    #[schemars(length(max = 32))]
    pub timeout: String,
    /// Interval of SSH keepalives during long commands, e.g. `15s`.
    #[serde(default = "default_keepalive")]
    #[x_kube(validation = duration::rule())]
    #[schemars(length(max = 32))]
    pub keepalive_interval: String,
}

fn default_ssh_port() -> u16 {
    22
}
fn default_ssh_timeout() -> String {
    "5m".into()
}
fn default_keepalive() -> String {
    "15s".into()
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.knownHostsSecretRef) ? 1 : 0) + ((has(self.insecureIgnore) && self.insecureIgnore) ? 1 : 0) == 1"
).message("set exactly one of knownHostsSecretRef or insecureIgnore: true"))]
pub struct HostKeyPolicy {
    /// Secret holding an OpenSSH known_hosts file; key defaults to `known_hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts_secret_ref: Option<SecretKeyRefDefaulted>,
    /// Accept any host key. Must be stated explicitly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_ignore: Option<bool>,
}

/// Exactly one of `shell`, `file`, `shellLocal` or `ansible`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.shell) ? 1 : 0) + (has(self.file) ? 1 : 0) + (has(self.shellLocal) ? 1 : 0) + (has(self.ansible) ? 1 : 0) == 1"
).message("each provisioner must set exactly one of shell, file, shellLocal or ansible"))]
pub struct Provisioner {
    /// Run a script on the build machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<ShellProvisioner>,
    /// Write a file on the build machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileProvisioner>,
    /// Run a script on kiln's side, in a runner Pod of the build's namespace, with
    /// the build facts as `KILN_*` variables (e.g. a tool that talks to the machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell_local: Option<ShellLocalProvisioner>,
    /// Run an Ansible playbook against the build machine, from a runner Pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ansible: Option<AnsibleProvisioner>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.inline) ? 1 : 0) + (has(self.scriptFrom) ? 1 : 0) == 1"
).message("set exactly one of inline or scriptFrom"))]
pub struct ShellLocalProvisioner {
    /// Commands run by `/bin/sh -e` in the runner Pod, one script.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1000))]
    #[x_kube(validation = kube::core::Rule::new("self.all(c, size(c) > 0)")
        .message("commands must not be empty"))]
    pub inline: Option<Vec<String>>,
    /// A script from a ConfigMap key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_from: Option<ScriptSource>,
    /// Environment of the script; values from Secrets are masked in all output.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub env: Vec<EnvVar>,
    /// Limit on the whole script, e.g. `10m`.
    #[serde(default = "default_shell_timeout")]
    #[x_kube(validation = duration::rule())]
    #[schemars(length(max = 32))]
    pub timeout: String,
    /// Image of the runner Pod (it needs `/bin/sh`); default: the operator's
    /// `--runner-image` (the chart's runner image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.inline) ? 1 : 0) + (has(self.scriptFrom) ? 1 : 0) == 1"
).message("set exactly one of inline or scriptFrom"))]
pub struct ShellProvisioner {
    /// Commands run by `/bin/sh -e`, one script.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1000))]
    #[x_kube(validation = kube::core::Rule::new("self.all(c, size(c) > 0)")
        .message("commands must not be empty"))]
    pub inline: Option<Vec<String>>,
    /// A script from a ConfigMap key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_from: Option<ScriptSource>,
    /// Environment of the script; values from Secrets are masked in all output.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub env: Vec<EnvVar>,
    /// Limit on the whole script, e.g. `10m`.
    #[serde(default = "default_shell_timeout")]
    #[x_kube(validation = duration::rule())]
    #[schemars(length(max = 32))]
    pub timeout: String,
    /// The script reboots or otherwise drops the connection (e.g. `reboot`): a
    /// disconnect counts as success, and kiln waits until it can reconnect.
    #[serde(default)]
    pub expect_disconnect: bool,
}

fn default_shell_timeout() -> String {
    "30m".into()
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct ScriptSource {
    pub config_map_key_ref: KeyRef,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.value) ? 1 : 0) + (has(self.valueFrom) ? 1 : 0) == 1"
).message("set exactly one of value or valueFrom"))]
pub struct EnvVar {
    /// Variable name (a shell identifier).
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"), length(max = 128))]
    pub name: String,
    /// A plain value, recorded in status like the rest of the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// A value from a Secret key; never logged or shown in status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarSource {
    pub secret_key_ref: KeyRef,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct FileProvisioner {
    /// Absolute path on the build machine.
    #[schemars(regex(pattern = r"^/"), length(min = 2, max = 4096))]
    pub destination: String,
    /// Where the content comes from.
    pub from: FileSource,
    /// Octal permission bits, e.g. `"0644"`.
    #[serde(default = "default_file_mode")]
    #[schemars(regex(pattern = r"^0?[0-7]{3}$"))]
    pub mode: String,
}

fn default_file_mode() -> String {
    "0644".into()
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.configMapKeyRef) ? 1 : 0) + (has(self.secretKeyRef) ? 1 : 0) == 1"
).message("set exactly one of configMapKeyRef or secretKeyRef"))]
pub struct FileSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
}

#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum OnError {
    /// Remove temporary resources as soon as a step fails.
    #[default]
    #[serde(rename = "cleanup")]
    Cleanup,
    /// Leave them for debugging until the ImageBuild is deleted.
    #[serde(rename = "keep")]
    Keep,
}

#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum ArtifactPolicy {
    #[default]
    Retain,
    Delete,
}

/// The ImageBuild CRD as YAML, as `kiln crd imagebuild` prints it and `crds/` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&ImageBuild::crd())
}

/// The ImagePipeline CRD as YAML, as `kiln crd imagepipeline` prints it.
pub fn pipeline_crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&ImagePipeline::crd())
}
