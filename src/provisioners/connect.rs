//! Opens an SSH session to the build machine from the spec, the secrets it names and
//! what earlier steps found out (a cloud builder's address or generated key).

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use crate::api::{ImageBuildSpec, duration};
use crate::communicator::ssh::{self, HostKeyPolicy, Session, Target};
use crate::engine::{StepContext, StepError};
use crate::refs;
use crate::sync::lock;

/// Output keys earlier steps may set to steer the connection.
pub const OUT_HOST: &str = "host";
pub const OUT_PORT: &str = "port";
/// The host key the connect step's session verified (or accepted), OpenSSH form.
pub const OUT_HOST_KEY: &str = "host_key";
/// `namespace/name` of a Secret holding a generated private key (`ssh-privatekey`).
pub const OUT_KEY_SECRET: &str = "ssh_key_secret";

pub const DEFAULT_PRIVATE_KEY_KEY: &str = "ssh-privatekey";

/// Private keys this process generated and stored, by `namespace/name` of their
/// Secret: the step that connects uses the key without reading back the Secret a
/// step of the same build has just written. After a restart, or once `KEY_TTL` has
/// passed, the Secret is read.
static GENERATED_KEYS: LazyLock<Mutex<HashMap<String, (String, Instant)>>> =
    LazyLock::new(Mutex::default);
const KEY_TTL: Duration = Duration::from_secs(3600);

pub fn remember_generated_key(secret: &str, pem: String) {
    let mut keys = lock(&GENERATED_KEYS);
    keys.retain(|_, (_, made)| made.elapsed() < KEY_TTL);
    keys.insert(secret.to_string(), (pem, Instant::now()));
}

/// When the Secret goes, so does the copy.
pub fn forget_generated_key(secret: &str) {
    lock(&GENERATED_KEYS).remove(secret);
}

fn generated_key(secret: &str) -> Option<String> {
    lock(&GENERATED_KEYS)
        .get(secret)
        .filter(|(_, made)| made.elapsed() < KEY_TTL)
        .map(|(pem, _)| pem.clone())
}
pub const DEFAULT_KNOWN_HOSTS_KEY: &str = "known_hosts";

pub async fn target(ctx: &StepContext) -> Result<Target, StepError> {
    target_of(&Build {
        spec: &ctx.spec,
        outputs: &ctx.outputs,
        client: &ctx.client,
        namespace: &ctx.facts.namespace,
    })
    .await
}

/// What the connection is made from: the spec, the earlier steps' outputs, and the
/// build's namespace to read the Secrets from (a step's or a cleanup's).
pub struct Build<'a> {
    pub spec: &'a ImageBuildSpec,
    pub outputs: &'a BTreeMap<String, String>,
    pub client: &'a kube::Client,
    pub namespace: &'a str,
}

pub async fn target_of(b: &Build<'_>) -> Result<Target, StepError> {
    let ssh = &b.spec.communicator.ssh;
    let ns = b.namespace;
    let host = ssh
        .host
        .clone()
        .or_else(|| b.outputs.get(OUT_HOST).cloned())
        .ok_or_else(|| {
            StepError::Failed(
                "spec.communicator.ssh.host: no host to connect to (required for the null builder)"
                    .into(),
            )
        })?;
    let port = port_of(b.spec, b.outputs);

    let private_key = match (&ssh.private_key_secret_ref, b.outputs.get(OUT_KEY_SECRET)) {
        (Some(r), _) => {
            let key = r.key.as_deref().unwrap_or(DEFAULT_PRIVATE_KEY_KEY);
            refs::secret_key(
                b.client,
                ns,
                &r.name,
                key,
                "spec.communicator.ssh.privateKeySecretRef",
            )
            .await
        }
        (None, Some(generated)) => match generated_key(generated) {
            Some(pem) => Ok(refs::SecretBytes(pem.into_bytes())),
            None => {
                let (gns, gname) = generated.split_once('/').unwrap_or((ns, generated));
                refs::secret_key(b.client, gns, gname, DEFAULT_PRIVATE_KEY_KEY, "generated key pair")
                    .await
            }
        },
        (None, None) => {
            return Err(StepError::Failed(
                "spec.communicator.ssh.privateKeySecretRef: required, no private key to authenticate with"
                    .into(),
            ));
        }
    }
    .map_err(|e| StepError::Failed(e.to_string()))?;
    let private_key = String::from_utf8(private_key.0).map_err(|_| {
        StepError::Failed(
            "spec.communicator.ssh.privateKeySecretRef: the private key is not UTF-8 text (expected OpenSSH or PEM format)"
                .into(),
        )
    })?;

    let host_key = match (
        &ssh.host_key.known_hosts_secret_ref,
        ssh.host_key.insecure_ignore,
    ) {
        (Some(r), _) => {
            let key = r.key.as_deref().unwrap_or(DEFAULT_KNOWN_HOSTS_KEY);
            let bytes = refs::secret_key(
                b.client,
                ns,
                &r.name,
                key,
                "spec.communicator.ssh.hostKey.knownHostsSecretRef",
            )
            .await
            .map_err(|e| StepError::Failed(e.to_string()))?;
            HostKeyPolicy::KnownHosts(String::from_utf8_lossy(&bytes.0).into_owned())
        }
        (None, Some(true)) => HostKeyPolicy::InsecureIgnore,
        _ => {
            return Err(StepError::Failed(
                "spec.communicator.ssh.hostKey: set knownHostsSecretRef or insecureIgnore: true"
                    .into(),
            ));
        }
    };
    let timeout = parse_duration(&ssh.timeout, "spec.communicator.ssh.timeout")?;
    let keepalive = parse_duration(
        &ssh.keepalive_interval,
        "spec.communicator.ssh.keepaliveInterval",
    )?;
    Ok(Target {
        host,
        port,
        username: ssh.username.clone(),
        private_key: private_key.into(),
        host_key,
        connect_timeout: timeout,
        keepalive,
    })
}

/// The build machine's SSH port: the spec's, unless a builder found the machine
/// (no `communicator.ssh.host`) and recorded another.
pub fn port(ctx: &StepContext) -> u16 {
    port_of(&ctx.spec, &ctx.outputs)
}

fn port_of(spec: &ImageBuildSpec, outputs: &BTreeMap<String, String>) -> u16 {
    let ssh = &spec.communicator.ssh;
    outputs
        .get(OUT_PORT)
        .and_then(|p| p.parse().ok())
        .filter(|_| ssh.host.is_none())
        .unwrap_or(ssh.port)
}

pub fn parse_duration(text: &str, field: &str) -> Result<Duration, StepError> {
    duration::parse(text).map_err(|e| StepError::Failed(format!("{field}: {e}")))
}

/// The build's SSH session: the one an earlier step kept, if it still answers, or a
/// new connection.
pub async fn open(ctx: &StepContext) -> Result<Session, StepError> {
    if let Some(session) = ctx
        .sessions
        .take(&ctx.facts.uid, ctx.facts.generation)
        .await
    {
        return Ok(session);
    }
    let target = target(ctx).await?;
    connect(ctx, &target).await
}

/// Keeps the session for the build's next step. Steps keep it only after they went
/// well; after a failure they close it, so a half-used channel is never reused.
pub fn keep(ctx: &StepContext, session: Session) {
    ctx.sessions
        .keep(&ctx.facts.uid, ctx.facts.generation, session);
}

/// Connects with retry; a timeout names the setting that bounds it.
///
/// On a machine kiln launched, sshd often answers before cloud-init has
/// installed the key, so authentication failures are retried there too (as
/// Packer does) until the timeout; on an existing host they fail at once.
pub async fn connect(ctx: &StepContext, target: &Target) -> Result<Session, StepError> {
    let launched = ctx.facts.builder != "null";
    let start = tokio::time::Instant::now();
    loop {
        match ssh::connect(target, &ctx.cancel).await {
            Err(ssh::SshError::AuthFailed { .. })
                if launched && start.elapsed() + AUTH_RETRY < target.connect_timeout =>
            {
                tracing::info!(
                    "authentication refused; the machine may not have its key yet, retrying"
                );
                tokio::select! {
                    () = tokio::time::sleep(AUTH_RETRY) => {}
                    () = ctx.cancel.cancelled() => return Err(StepError::Cancelled),
                }
            }
            other => return map_connect(ctx, other),
        }
    }
}

const AUTH_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

fn map_connect(ctx: &StepContext, r: Result<Session, ssh::SshError>) -> Result<Session, StepError> {
    r.map_err(|e| match e {
        ssh::SshError::Timeout { .. } => StepError::Failed(format!(
            "spec.communicator.ssh: no SSH connection within the timeout of {} (spec.communicator.ssh.timeout): {e}",
            ctx.spec.communicator.ssh.timeout
        )),
        other => ssh_error(other),
    })
}

/// Every SSH failure fails the step (`connect` already retried what was
/// transient), with the spec field a user would fix.
pub fn ssh_error(e: ssh::SshError) -> StepError {
    use ssh::SshError as E;
    let field = match &e {
        E::Cancelled => return StepError::Cancelled,
        E::AuthFailed { .. } | E::InvalidPrivateKey(_) => {
            "spec.communicator.ssh.privateKeySecretRef"
        }
        E::HostKeyMismatch { .. }
        | E::HostKeyUnknown { .. }
        | E::HostKeyRevoked { .. }
        | E::InvalidKnownHosts(_) => "spec.communicator.ssh.hostKey",
        E::Refused { .. } | E::Unreachable { .. } | E::Handshake { .. } | E::Timeout { .. } => {
            "spec.communicator.ssh"
        }
        _ => "ssh",
    };
    StepError::Failed(format!("{field}: {e}"))
}
