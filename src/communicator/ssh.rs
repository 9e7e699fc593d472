//! SSH communicator: connects to a build machine, runs commands and uploads
//! files, the way Packer's SSH communicator does.
//!
//! Design notes:
//! - Host keys are verified against an OpenSSH `known_hosts` text supplied by
//!   the caller; only [`HostKeyPolicy::InsecureIgnore`] accepts an unverified
//!   key. We parse `known_hosts` ourselves because russh's helpers only read
//!   files and do not understand markers, wildcards or negations.
//! - [`connect`] retries failures that are expected while a machine boots
//!   (refused, reset, unreachable, sshd not ready) until `connect_timeout`;
//!   failures that retrying cannot fix (rejected key, wrong host key) return
//!   at once so a misconfiguration is reported in seconds, not minutes.
//! - Cancelling [`Session::exec`] must really stop the remote command:
//!   closing the channel does not, sshd keeps a non-pty child running until
//!   it exits by itself. sshd runs each command as a session leader
//!   (`setsid()`), so the command and all its children share one process
//!   group whose id is the shell's PID. We therefore (a) send the SSH
//!   `signal` channel request, which OpenSSH >= 7.9 delivers with `killpg()`,
//!   but which OpenSSH refuses for root logins ("session signalling requires
//!   privilege separation"); and (b) because of that, prefix every command
//!   with a POSIX `echo` that reports the shell's PID on stderr (stripped
//!   from the output we pass on) and, on cancel, run `kill -s SIG -- -PGID`
//!   over a second channel. TERM first, KILL after a grace period.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use russh::client::{self, AuthResult, DisconnectReason, Handle};
use russh::keys::ssh_key::known_hosts::HostPatterns;
use russh::keys::{
    Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate,
};
use russh::{Channel, ChannelMsg, Disconnect, Preferred, Sig};
use russh_sftp::client::SftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags};
use sha1::Sha1;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::sync::lock;

/// First pause between connection attempts; doubled after each failure.
const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Upper bound for the pause, so a machine that comes up late is still found
/// within a few seconds.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Bounds a single attempt so one hung handshake (sshd accepted but stalled
/// during boot) cannot consume the whole connect budget.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Unanswered keepalives tolerated before the connection is declared dead.
const KEEPALIVE_MAX: usize = 3;
/// Time a cancelled command gets to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// Time to wait for the exit report after SIGKILL before giving up on it.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long a cancel waits for the PID marker if it came before it.
const MARKER_WAIT: Duration = Duration::from_secs(1);
/// Bound for the helper command that signals a process group.
const KILL_COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Stop looking for the PID marker after this much stderr; the wrapper
/// prints it first, so only shell start-up noise can precede it.
const MARKER_SCAN_LIMIT: usize = 64 * 1024;

/// Text that must not leak into logs, errors or `Debug` output, such as
/// private key material. The buffer is zeroed when dropped.
#[derive(Clone, Default)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The secret itself; callers must not log what this returns.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString([REDACTED])")
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<&str> for SecretString {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

/// How the server's host key is checked.
#[derive(Clone)]
pub enum HostKeyPolicy {
    /// Contents of an OpenSSH `known_hosts` file. The host must have an entry
    /// whose key matches the one presented.
    KnownHosts(String),
    /// Accept any host key. Only for throwaway machines on trusted networks.
    InsecureIgnore,
}

impl fmt::Debug for HostKeyPolicy {
    // A whole known_hosts file makes log lines unreadable; its size is enough
    // to tell policies apart.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::KnownHosts(text) => write!(f, "KnownHosts({} lines)", text.lines().count()),
            Self::InsecureIgnore => f.write_str("InsecureIgnore"),
        }
    }
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub username: String,
    /// OpenSSH (`BEGIN OPENSSH PRIVATE KEY`) or PEM (PKCS#1, PKCS#8) text;
    /// ed25519, ECDSA (P-256/384/521) and RSA keys. Unencrypted only.
    pub private_key: SecretString,
    pub host_key: HostKeyPolicy,
    /// Total time [`connect`] keeps retrying transient failures.
    pub connect_timeout: Duration,
    /// Interval of SSH keepalives while idle; zero disables them. A
    /// connection is considered dead after 3 unanswered keepalives.
    pub keepalive: Duration,
}

impl Target {
    /// A target with Packer's defaults: 5 minutes to connect, keepalive
    /// every 5 seconds.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        username: impl Into<String>,
        private_key: SecretString,
        host_key: HostKeyPolicy,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            username: username.into(),
            private_key,
            host_key,
            connect_timeout: Duration::from_secs(300),
            keepalive: Duration::from_secs(5),
        }
    }

    /// `host:port`, with brackets around IPv6 literals, for messages.
    pub fn addr(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Which remote stream a chunk of command output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// How a remote command ended. Exactly one field is normally set.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ExecResult {
    pub exit_code: Option<u32>,
    /// Signal name without the `SIG` prefix, e.g. `"TERM"`.
    pub exit_signal: Option<String>,
}

impl ExecResult {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("connection refused by {addr}")]
    Refused { addr: String },
    #[error("{addr} is unreachable: {detail}")]
    Unreachable { addr: String, detail: String },
    /// TCP connected but the SSH handshake did not complete, typically
    /// because sshd is still starting or dropped the connection.
    #[error("SSH handshake with {addr} failed: {detail}")]
    Handshake { addr: String, detail: String },
    #[error(
        "authentication failed for user '{user}' at {addr}: the server rejected the private key"
    )]
    AuthFailed { user: String, addr: String },
    #[error(
        "host key mismatch for {addr}: the server presented {presented_fingerprint}, which matches \
         no known_hosts entry for this host (the host was reinstalled, or someone is intercepting \
         the connection)"
    )]
    HostKeyMismatch {
        addr: String,
        presented_fingerprint: String,
    },
    #[error(
        "unknown host {addr}: known_hosts has no entry for this host (the server presented \
         {presented_fingerprint})"
    )]
    HostKeyUnknown {
        addr: String,
        presented_fingerprint: String,
    },
    #[error(
        "host key {presented_fingerprint} presented by {addr} is marked @revoked in known_hosts"
    )]
    HostKeyRevoked {
        addr: String,
        presented_fingerprint: String,
    },
    #[error("invalid private key: {0}")]
    InvalidPrivateKey(String),
    #[error("invalid known_hosts: {0}")]
    InvalidKnownHosts(String),
    #[error("could not connect to {addr}: gave up after {after:.1?}; last error: {last}")]
    Timeout {
        addr: String,
        after: Duration,
        last: String,
    },
    #[error("SSH connection lost: {0}")]
    Disconnected(String),
    #[error("operation cancelled")]
    Cancelled,
    #[error("SFTP upload to '{path}' failed: {detail}")]
    Sftp { path: String, detail: String },
    #[error("SSH protocol error: {0}")]
    Protocol(String),
}

impl SshError {
    /// Whether trying again later may succeed (network or sshd not ready, or
    /// a dropped connection), as opposed to a configuration problem.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Refused { .. }
                | Self::Unreachable { .. }
                | Self::Handshake { .. }
                | Self::Timeout { .. }
                | Self::Disconnected(_)
        )
    }
}

/// Connects and authenticates, retrying transient failures with backoff
/// until `target.connect_timeout` has elapsed.
pub async fn connect(target: &Target, cancel: &CancellationToken) -> Result<Session, SshError> {
    let prepared = Prepared::new(target)?;
    let addr = target.addr();
    let start = Instant::now();
    let deadline = start + target.connect_timeout;
    let mut backoff = INITIAL_BACKOFF;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        debug!(%addr, attempt, "SSH connection attempt");
        let result = tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(SshError::Cancelled),
            result = attempt_connect(target, &prepared, deadline) => result,
        };
        let err = match result {
            Ok(session) => return Ok(session),
            Err(err) if !err.is_transient() => return Err(err),
            Err(err) => err,
        };
        let now = Instant::now();
        // Another attempt needs time to start after the pause; giving up now
        // keeps the most informative error as `last` instead of a truncated
        // attempt's "timed out".
        if now + backoff >= deadline {
            return Err(SshError::Timeout {
                addr,
                after: now.duration_since(start),
                last: err.to_string(),
            });
        }
        // One line at info level tells the user what we wait for; every
        // retry at that level would flood the log during a long boot.
        if attempt == 1 {
            info!(%addr, error = %err, "waiting for SSH to become available");
        } else {
            debug!(%addr, attempt, error = %err, retry_in = ?backoff, "SSH not reachable yet, retrying");
        }
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(SshError::Cancelled),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A single attempt bounded by `target.connect_timeout`, returning the
/// underlying error (e.g. [`SshError::Refused`]) instead of retrying.
pub async fn connect_once(
    target: &Target,
    cancel: &CancellationToken,
) -> Result<Session, SshError> {
    let prepared = Prepared::new(target)?;
    let deadline = Instant::now() + target.connect_timeout;
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(SshError::Cancelled),
        result = attempt_connect(target, &prepared, deadline) => result,
    }
}

/// Everything derived from the target that does not depend on the network,
/// so it is validated once and reused by every attempt.
struct Prepared {
    key: Arc<PrivateKey>,
    host_keys: Arc<HostKeyCheck>,
    config: Arc<client::Config>,
}

impl Prepared {
    fn new(target: &Target) -> Result<Self, SshError> {
        let key = russh::keys::decode_secret_key(target.private_key.expose_secret(), None)
            // The key parser's messages describe the format problem only,
            // never the key bytes.
            .map_err(|e| SshError::InvalidPrivateKey(e.to_string()))?;
        let host_keys = match &target.host_key {
            HostKeyPolicy::InsecureIgnore => HostKeyCheck::Insecure,
            HostKeyPolicy::KnownHosts(text) => HostKeyCheck::KnownHosts(KnownHosts::parse(text)?),
        };
        let mut preferred = Preferred::default();
        if let HostKeyCheck::KnownHosts(known) = &host_keys {
            // Like OpenSSH: ask for a host key type we have on record, so a
            // server with several host keys is not reported as mismatching
            // just because it offers a different type first.
            let recorded = known.algorithms_for(&target.host, target.port);
            if !recorded.is_empty() {
                preferred.key = Cow::Owned(prefer_algorithms(&preferred.key, &recorded));
            }
        }
        let config = client::Config {
            keepalive_interval: (!target.keepalive.is_zero()).then_some(target.keepalive),
            keepalive_max: KEEPALIVE_MAX,
            inactivity_timeout: None,
            nodelay: true,
            preferred,
            ..client::Config::default()
        };
        Ok(Self {
            key: Arc::new(key),
            host_keys: Arc::new(host_keys),
            config: Arc::new(config),
        })
    }
}

fn prefer_algorithms(default: &[Algorithm], recorded: &[Algorithm]) -> Vec<Algorithm> {
    let same_family = |a: &Algorithm, b: &Algorithm| {
        a == b || (matches!(a, Algorithm::Rsa { .. }) && matches!(b, Algorithm::Rsa { .. }))
    };
    let (mut first, rest): (Vec<_>, Vec<_>) = default
        .iter()
        .cloned()
        .partition(|a| recorded.iter().any(|r| same_family(a, r)));
    first.extend(rest);
    first
}

async fn attempt_connect(
    target: &Target,
    prepared: &Prepared,
    deadline: Instant,
) -> Result<Session, SshError> {
    let addr = target.addr();
    let deadline = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);

    let tcp = match tokio::time::timeout_at(
        deadline,
        // Brackets are URL/known_hosts notation, not part of an IPv6 address.
        tokio::net::TcpStream::connect((
            target.host.trim_start_matches('[').trim_end_matches(']'),
            target.port,
        )),
    )
    .await
    {
        Err(_) => {
            return Err(SshError::Unreachable {
                addr,
                detail: "no response to TCP connect (timed out)".into(),
            });
        }
        Ok(Err(e)) => return Err(io_error(&addr, &e)),
        Ok(Ok(tcp)) => tcp,
    };
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(%addr, error = %e, "set_nodelay failed");
    }

    let disconnect_reason = Arc::new(Mutex::new(None));
    let presented = Arc::new(Mutex::new(None));
    let handler = ClientHandler {
        addr: addr.clone(),
        host: target.host.clone(),
        port: target.port,
        host_keys: prepared.host_keys.clone(),
        disconnect_reason: disconnect_reason.clone(),
        presented: presented.clone(),
    };
    let mut handle = match tokio::time::timeout_at(
        deadline,
        client::connect_stream(prepared.config.clone(), tcp, handler),
    )
    .await
    {
        Err(_) => {
            return Err(SshError::Handshake {
                addr,
                detail: "timed out waiting for the server's SSH handshake".into(),
            });
        }
        Ok(Err(HandlerError::Rejected(e))) => return Err(e),
        Ok(Err(HandlerError::Ssh(e))) => return Err(handshake_error(&addr, e)),
        Ok(Ok(handle)) => handle,
    };

    let auth = tokio::time::timeout_at(deadline, async {
        let hash_alg = if matches!(prepared.key.algorithm(), Algorithm::Rsa { .. }) {
            match handle.best_supported_rsa_hash().await? {
                Some(best) => best,
                // The server did not list its signature algorithms; every
                // server still accepting RSA since OpenSSH 7.2 takes SHA-256.
                None => Some(HashAlg::Sha256),
            }
        } else {
            None
        };
        handle
            .authenticate_publickey(
                target.username.clone(),
                PrivateKeyWithHashAlg::new(prepared.key.clone(), hash_alg),
            )
            .await
    })
    .await;
    match auth {
        Err(_) => Err(SshError::Handshake {
            addr,
            detail: "timed out waiting for the authentication result".into(),
        }),
        Ok(Err(e)) => Err(handshake_error(&addr, e)),
        Ok(Ok(AuthResult::Failure { .. })) => Err(SshError::AuthFailed {
            user: target.username.clone(),
            addr,
        }),
        Ok(Ok(AuthResult::Success)) => {
            info!(%addr, user = %target.username, "SSH connected");
            let host_key = lock(&presented).take();
            Ok(Session {
                handle,
                addr,
                disconnect_reason,
                host_key,
                _open: crate::metrics::SessionGauge::open(),
            })
        }
    }
}

fn io_error(addr: &str, err: &std::io::Error) -> SshError {
    match err.kind() {
        std::io::ErrorKind::ConnectionRefused => SshError::Refused { addr: addr.into() },
        _ => SshError::Unreachable {
            addr: addr.into(),
            detail: err.to_string(),
        },
    }
}

/// Maps failures after TCP connected: connection drops are what a booting
/// sshd produces (transient), anything else is a real protocol problem.
fn handshake_error(addr: &str, err: russh::Error) -> SshError {
    use russh::Error as E;
    match err {
        E::IO(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            SshError::Refused { addr: addr.into() }
        }
        E::IO(io) => SshError::Handshake {
            addr: addr.into(),
            detail: format!("connection lost ({io}); sshd may not be ready yet"),
        },
        E::Disconnect
        | E::HUP
        | E::SendError
        | E::RecvError
        | E::ConnectionTimeout
        | E::KeepaliveTimeout
        | E::InactivityTimeout => SshError::Handshake {
            addr: addr.into(),
            detail: "the server closed the connection; sshd may not be ready yet".into(),
        },
        other => SshError::Protocol(format!("handshake with {addr} failed: {other}")),
    }
}

enum HostKeyCheck {
    Insecure,
    KnownHosts(KnownHosts),
}

/// The russh event-loop side of a connection.
struct ClientHandler {
    addr: String,
    host: String,
    port: u16,
    host_keys: Arc<HostKeyCheck>,
    disconnect_reason: Arc<Mutex<Option<String>>>,
    /// The host key the server presented and this client accepted.
    presented: Arc<Mutex<Option<String>>>,
}

/// Lets `check_server_key` surface *why* a key was refused; russh would
/// otherwise only report "Unknown server key".
#[derive(Debug)]
enum HandlerError {
    Ssh(russh::Error),
    Rejected(SshError),
}

impl From<russh::Error> for HandlerError {
    fn from(err: russh::Error) -> Self {
        Self::Ssh(err)
    }
}

impl client::Handler for ClientHandler {
    type Error = HandlerError;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key_data = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.key_data(),
            PublicKeyOrCertificate::Certificate(cert) => cert.public_key(),
        };
        let fingerprint = key_data.fingerprint(HashAlg::Sha256).to_string();
        // Kept for tools that connect to the same machine after kiln (Ansible's
        // known_hosts): written now, read only once the handshake succeeded.
        if let Ok(openssh) = PublicKey::from(key_data.clone()).to_openssh() {
            *lock(&self.presented) = Some(openssh);
        }
        let known = match self.host_keys.as_ref() {
            HostKeyCheck::Insecure => {
                warn!(addr = %self.addr, %fingerprint, "host key checking disabled; accepting the presented key");
                return Ok(true);
            }
            HostKeyCheck::KnownHosts(known) => known,
        };
        // We never advertise certificate host key algorithms, so a
        // certificate here is unexpected; it is not trusted via
        // @cert-authority, only its bare key may match a plain entry.
        let verdict = known.verify(&self.host, self.port, key_data);
        let addr = self.addr.clone();
        let presented_fingerprint = fingerprint;
        match verdict {
            HostKeyVerdict::Trusted => {
                debug!(%addr, fingerprint = %presented_fingerprint, "host key matches known_hosts");
                Ok(true)
            }
            HostKeyVerdict::Revoked => Err(HandlerError::Rejected(SshError::HostKeyRevoked {
                addr,
                presented_fingerprint,
            })),
            HostKeyVerdict::Mismatch => Err(HandlerError::Rejected(SshError::HostKeyMismatch {
                addr,
                presented_fingerprint,
            })),
            HostKeyVerdict::Unknown => Err(HandlerError::Rejected(SshError::HostKeyUnknown {
                addr,
                presented_fingerprint,
            })),
        }
    }

    async fn disconnected(
        &mut self,
        reason: DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let (text, result) = match reason {
            DisconnectReason::ReceivedDisconnect(info) => (
                format!(
                    "the server closed the connection ({:?}: {})",
                    info.reason_code, info.message
                ),
                Ok(()),
            ),
            DisconnectReason::Error(err) => {
                let text = match &err {
                    HandlerError::Ssh(e) => e.to_string(),
                    HandlerError::Rejected(e) => e.to_string(),
                };
                // russh expects the error back so its join result carries it.
                (text, Err(err))
            }
        };
        debug!(addr = %self.addr, reason = %text, "SSH connection ended");
        *lock(&self.disconnect_reason) = Some(text);
        result
    }
}

/// An authenticated SSH connection. Every `exec`/`upload` opens its own
/// channel, so one session serves many calls, sequential or concurrent, and
/// can be shared across tasks behind an `Arc`.
pub struct Session {
    handle: Handle<ClientHandler>,
    addr: String,
    disconnect_reason: Arc<Mutex<Option<String>>>,
    /// The server's host key in OpenSSH form (`ssh-ed25519 AAAA…`): the key the
    /// host key policy verified (or, with `insecureIgnore`, accepted).
    host_key: Option<String>,
    _open: crate::metrics::SessionGauge,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("addr", &self.addr)
            .field("closed", &self.handle.is_closed())
            .finish()
    }
}

const SFTP_START_FAILED: &str = "starting the SFTP session";
const SFTP_START_ATTEMPTS: u32 = 3;

impl Session {
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The host key this session's server presented and kiln accepted.
    pub fn host_key(&self) -> Option<&str> {
        self.host_key.as_deref()
    }

    /// Whether the connection is known to be gone.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Whether the connection still answers: a kept session may have been dropped by
    /// the host (reboot, idle timeout) without the client noticing yet. Opening and
    /// closing a channel is one round trip, far cheaper than a new handshake.
    pub async fn probe(&self, timeout: Duration) -> bool {
        let probe = async {
            let channel = self.open_channel().await?;
            let _ = channel.close().await;
            Ok::<(), SshError>(())
        };
        matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(())))
    }

    /// Waits up to `limit` for the connection to end (the server closed it, or
    /// keepalives went unanswered); whether it did.
    pub async fn closed_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.handle.is_closed() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    }

    /// Runs `command` through the remote user's shell without a pty,
    /// streaming output chunks to `on_output` as they arrive.
    pub async fn exec<F>(
        &self,
        command: &str,
        on_output: F,
        cancel: &CancellationToken,
    ) -> Result<ExecResult, SshError>
    where
        F: FnMut(OutputStream, &[u8]) + Send,
    {
        self.exec_with_input(command, &[], on_output, cancel).await
    }

    /// Like [`Session::exec`], with `input` as the command's stdin (then EOF).
    /// Small payloads only: it is written before any output is read.
    pub async fn exec_with_input<F>(
        &self,
        command: &str,
        input: &[u8],
        mut on_output: F,
        cancel: &CancellationToken,
    ) -> Result<ExecResult, SshError>
    where
        F: FnMut(OutputStream, &[u8]) + Send,
    {
        if cancel.is_cancelled() {
            return Err(SshError::Cancelled);
        }
        let mut channel = self.open_channel().await?;
        debug!(addr = %self.addr, command, "exec");
        let mut marker = PgidMarker::new();
        if let Err(e) = channel.exec(true, marker.wrap(command)).await {
            return Err(self.channel_error(e));
        }
        if !input.is_empty()
            && let Err(e) = channel.data(input).await
        {
            return Err(self.channel_error(e));
        }
        // EOF makes a command that reads stdin (a prompt, `cat`) see
        // end-of-input instead of hanging forever.
        if let Err(e) = channel.eof().await {
            return Err(self.channel_error(e));
        }
        let mut result = ExecResult::default();
        loop {
            let msg = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    self.stop_remote_command(&mut channel, &mut marker, &mut on_output).await;
                    return Err(SshError::Cancelled);
                }
                msg = channel.wait() => msg,
            };
            match msg {
                Some(ChannelMsg::Close) => break,
                None => {
                    marker.flush(&mut |chunk| on_output(OutputStream::Stderr, chunk));
                    // The connection ended. If the exit status already
                    // arrived the command's outcome is known regardless.
                    if result.exit_code.is_some() || result.exit_signal.is_some() {
                        break;
                    }
                    return Err(SshError::Disconnected(self.disconnect_text()));
                }
                Some(ChannelMsg::Failure) => {
                    let _ = channel.close().await;
                    return Err(SshError::Protocol(format!(
                        "{} refused to run the command",
                        self.addr
                    )));
                }
                Some(msg) => record_exec_msg(msg, &mut result, &mut marker, &mut on_output),
            }
        }
        marker.flush(&mut |chunk| on_output(OutputStream::Stderr, chunk));
        if result.exit_code.is_none() && result.exit_signal.is_none() {
            // Packer treats this the same way: without an exit status the
            // outcome is unknown, as with a dropped connection.
            return Err(SshError::Disconnected(format!(
                "{} closed the channel without reporting an exit status",
                self.addr
            )));
        }
        debug!(addr = %self.addr, ?result, "command finished");
        Ok(result)
    }

    /// Sends TERM, then KILL, each both as an SSH signal request and, when
    /// the process group is known, with `kill` over a second channel;
    /// waits for the command to report its end after each, then closes the
    /// channel.
    async fn stop_remote_command<F>(
        &self,
        channel: &mut Channel<client::Msg>,
        marker: &mut PgidMarker,
        on_output: &mut F,
    ) where
        F: FnMut(OutputStream, &[u8]) + Send,
    {
        // A cancel right after the start can beat the PID marker; without it
        // a root session could only be closed, not stopped, so wait briefly.
        if !marker.done {
            match wait_channel(channel, MARKER_WAIT, marker, on_output, true).await {
                WaitOutcome::Ended => {
                    let _ = channel.close().await;
                    return;
                }
                WaitOutcome::MarkerDone | WaitOutcome::TimedOut => {}
            }
        }
        for (signal, grace) in [(Sig::TERM, TERM_GRACE), (Sig::KILL, KILL_GRACE)] {
            let name = signal_name(&signal).to_owned();
            info!(addr = %self.addr, signal = %name, pgid = ?marker.pgid, "cancelling remote command");
            if channel.signal(signal).await.is_err() {
                // Connection is gone; sshd reaps the session with it.
                return;
            }
            if let Some(pgid) = marker.pgid {
                self.kill_process_group(pgid, &name).await;
            }
            if let WaitOutcome::Ended = wait_channel(channel, grace, marker, on_output, false).await
            {
                let _ = channel.close().await;
                return;
            }
        }
        warn!(
            addr = %self.addr,
            "remote command did not report an exit after SIGKILL; closing the channel"
        );
        let _ = channel.close().await;
    }

    async fn kill_process_group(&self, pgid: u32, signal: &str) {
        // Group first; plain PID in case the server did not make the shell a
        // group leader. `-s SIG -- -PGID` is the form both bash and dash accept.
        let command = format!(
            "kill -s {signal} -- -{pgid} 2>/dev/null || kill -s {signal} {pgid} 2>/dev/null; true"
        );
        let run = async {
            let mut channel = self.open_channel().await?;
            channel
                .exec(true, command.as_str())
                .await
                .map_err(|e| self.channel_error(e))?;
            while let Some(msg) = channel.wait().await {
                if matches!(msg, ChannelMsg::Close) {
                    break;
                }
            }
            Ok::<(), SshError>(())
        };
        match tokio::time::timeout(KILL_COMMAND_TIMEOUT, run).await {
            Ok(Ok(())) => debug!(addr = %self.addr, pgid, signal, "sent signal to process group"),
            Ok(Err(e)) => {
                warn!(addr = %self.addr, pgid, signal, error = %e, "could not signal process group")
            }
            Err(_) => warn!(addr = %self.addr, pgid, signal, "timed out signalling process group"),
        }
    }

    /// Writes `content` to `path` (created or truncated) over SFTP and sets
    /// its permission bits to `mode`.
    pub async fn upload(&self, path: &str, content: &[u8], mode: u32) -> Result<(), SshError> {
        // Under load (dozens of builds on one host) sftp-server can be slow to
        // answer its init; a fresh channel usually is not.
        let mut attempt = 1;
        loop {
            match self.upload_once(path, content, mode).await {
                Err(SshError::Sftp { detail, .. })
                    if attempt < SFTP_START_ATTEMPTS && detail.starts_with(SFTP_START_FAILED) =>
                {
                    warn!(addr = %self.addr, path, attempt, %detail, "retrying SFTP session start");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn upload_once(&self, path: &str, content: &[u8], mode: u32) -> Result<(), SshError> {
        let sftp_error = |detail: String| SshError::Sftp {
            path: path.to_owned(),
            detail,
        };
        let mut channel = self
            .open_channel()
            .await
            .map_err(|e| sftp_error(e.to_string()))?;
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(|e| sftp_error(format!("requesting the sftp subsystem: {e}")))?;
        // Wait for the reply: a server without the subsystem would otherwise
        // only surface as an SFTP init timeout much later.
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) => {
                    let _ = channel.close().await;
                    return Err(sftp_error(
                        "the server refused the sftp subsystem (is sftp-server configured?)".into(),
                    ));
                }
                Some(ChannelMsg::Close) | None => {
                    return Err(sftp_error(format!(
                        "channel closed while starting sftp: {}",
                        self.disconnect_text()
                    )));
                }
                Some(_) => {}
            }
        }
        let sftp = SftpSession::new(channel.into_stream())
            .await
            .map_err(|e| sftp_error(format!("{SFTP_START_FAILED}: {e}")))?;
        let result = write_remote_file(&sftp, path, content, mode)
            .await
            .map_err(sftp_error);
        if let Err(e) = sftp.close().await {
            debug!(addr = %self.addr, error = %e, "closing SFTP session failed");
        }
        if result.is_ok() {
            debug!(addr = %self.addr, path, bytes = content.len(), mode = format_args!("{mode:o}"), "uploaded");
        }
        result
    }

    /// Politely ends the connection.
    pub async fn close(self) {
        if let Err(e) = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await
        {
            debug!(addr = %self.addr, error = %e, "SSH disconnect failed");
        }
    }

    async fn open_channel(&self) -> Result<Channel<client::Msg>, SshError> {
        self.handle
            .channel_open_session()
            .await
            .map_err(|e| self.channel_error(e))
    }

    fn channel_error(&self, err: russh::Error) -> SshError {
        if self.handle.is_closed() {
            SshError::Disconnected(self.disconnect_text())
        } else {
            match err {
                russh::Error::ChannelOpenFailure(reason) => SshError::Protocol(format!(
                    "{} refused to open a session channel: {reason:?}",
                    self.addr
                )),
                russh::Error::SendError | russh::Error::Disconnect | russh::Error::HUP => {
                    SshError::Disconnected(self.disconnect_text())
                }
                other => SshError::Protocol(other.to_string()),
            }
        }
    }

    fn disconnect_text(&self) -> String {
        match lock(&self.disconnect_reason).as_ref() {
            Some(reason) => format!("{}: {reason}", self.addr),
            None => format!("{}: connection closed", self.addr),
        }
    }
}

fn record_exec_msg<F>(
    msg: ChannelMsg,
    result: &mut ExecResult,
    marker: &mut PgidMarker,
    on_output: &mut F,
) where
    F: FnMut(OutputStream, &[u8]),
{
    match msg {
        ChannelMsg::Data { data } => on_output(OutputStream::Stdout, &data),
        // Extended data type 1 is SSH_EXTENDED_DATA_STDERR, the only one defined.
        ChannelMsg::ExtendedData { data, ext: 1 } => {
            marker.feed(&data, &mut |chunk| on_output(OutputStream::Stderr, chunk));
        }
        ChannelMsg::ExitStatus { exit_status } => result.exit_code = Some(exit_status),
        ChannelMsg::ExitSignal {
            signal_name,
            core_dumped,
            error_message,
            ..
        } => {
            let name = signal_name_owned(signal_name);
            debug!(signal = %name, core_dumped, error_message, "remote command killed by signal");
            result.exit_signal = Some(name);
        }
        _ => {}
    }
}

enum WaitOutcome {
    /// The command reported its end, or the channel or connection closed.
    Ended,
    /// The PID marker was found (or the search for it given up).
    MarkerDone,
    TimedOut,
}

/// Drains channel messages (passing output on) for at most `limit`.
async fn wait_channel<F>(
    channel: &mut Channel<client::Msg>,
    limit: Duration,
    marker: &mut PgidMarker,
    on_output: &mut F,
    until_marker: bool,
) -> WaitOutcome
where
    F: FnMut(OutputStream, &[u8]) + Send,
{
    let deadline = Instant::now() + limit;
    let mut ignored = ExecResult::default();
    loop {
        if until_marker && marker.done {
            return WaitOutcome::MarkerDone;
        }
        match tokio::time::timeout_at(deadline, channel.wait()).await {
            Err(_) => return WaitOutcome::TimedOut,
            Ok(None | Some(ChannelMsg::Close)) => {
                marker.flush(&mut |chunk| on_output(OutputStream::Stderr, chunk));
                return WaitOutcome::Ended;
            }
            Ok(Some(msg @ (ChannelMsg::ExitStatus { .. } | ChannelMsg::ExitSignal { .. }))) => {
                record_exec_msg(msg, &mut ignored, marker, on_output);
                marker.flush(&mut |chunk| on_output(OutputStream::Stderr, chunk));
                return WaitOutcome::Ended;
            }
            Ok(Some(msg)) => record_exec_msg(msg, &mut ignored, marker, on_output),
        }
    }
}

/// Prefixes a command with an `echo` of the shell's PID (= the command's
/// process group, see the module docs) to stderr, and removes that line from
/// the stderr stream again. The token makes the line impossible to confuse
/// with the command's own output.
struct PgidMarker {
    prefix: Vec<u8>,
    pending: Vec<u8>,
    scanned: usize,
    done: bool,
    pgid: Option<u32>,
}

impl PgidMarker {
    fn new() -> Self {
        Self {
            prefix: format!("kiln-pgid-{}:", unique_token()).into_bytes(),
            pending: Vec::new(),
            scanned: 0,
            done: false,
            pgid: None,
        }
    }

    fn wrap(&self, command: &str) -> String {
        // A separate line, so the user's command is parsed exactly as if it
        // stood alone; `$$` in double quotes works in every POSIX shell.
        format!(
            "echo \"{}$$\" >&2\n{command}",
            String::from_utf8_lossy(&self.prefix)
        )
    }

    fn feed(&mut self, data: &[u8], emit: &mut dyn FnMut(&[u8])) {
        if self.done {
            emit(data);
            return;
        }
        self.pending.extend_from_slice(data);
        if let Some(start) = find(&self.pending, &self.prefix) {
            let digits_at = start + self.prefix.len();
            match self.pending[digits_at..].iter().position(|&b| b == b'\n') {
                Some(len) => {
                    let digits = &self.pending[digits_at..digits_at + len];
                    self.pgid = std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| d.trim_end_matches('\r').parse::<u32>().ok())
                        // Never let a bogus value turn into `kill -- -1` or
                        // `-0` (every process of the user / our own group).
                        .filter(|&pgid| pgid > 1);
                    let after = digits_at + len + 1;
                    emit_nonempty(emit, &self.pending[..start]);
                    emit_nonempty(emit, &self.pending[after..]);
                    self.pending.clear();
                    self.done = true;
                }
                // The marker line is a few dozen bytes; anything longer
                // without a newline is not ours.
                None if self.pending.len() - digits_at > 32 => self.flush(emit),
                None => {}
            }
            return;
        }
        // Hold back only a tail that could be the start of the marker.
        let keep = (1..self.prefix.len().min(self.pending.len() + 1))
            .rev()
            .find(|&k| self.pending.ends_with(&self.prefix[..k]))
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        emit_nonempty(emit, &self.pending[..cut]);
        self.pending.drain(..cut);
        self.scanned += cut;
        if self.scanned > MARKER_SCAN_LIMIT {
            self.flush(emit);
        }
    }

    /// Gives up looking and passes on anything held back.
    fn flush(&mut self, emit: &mut dyn FnMut(&[u8])) {
        emit_nonempty(emit, &self.pending);
        self.pending.clear();
        self.done = true;
    }
}

fn emit_nonempty(emit: &mut dyn FnMut(&[u8]), bytes: &[u8]) {
    if !bytes.is_empty() {
        emit(bytes);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Unique enough to tell concurrent commands apart, and not guessable by
/// another user of the build machine (it names private directories there).
pub(crate) fn unique_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded randomly per process, which avoids pulling in
    // a random number crate for this.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", hasher.finish())
}

async fn write_remote_file(
    sftp: &SftpSession,
    path: &str,
    content: &[u8],
    mode: u32,
) -> Result<(), String> {
    let mode = mode & 0o7777;
    let attrs = FileAttributes {
        permissions: Some(mode),
        ..FileAttributes::empty()
    };
    let mut file = sftp
        .open_with_flags_and_attributes(
            path,
            OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE,
            attrs.clone(),
        )
        .await
        .map_err(|e| format!("opening for write: {e}"))?;
    // The mode given at open only applies to new files and is filtered by
    // the server's umask; set it explicitly, and before writing so content
    // never sits in a file with looser permissions than requested.
    file.set_metadata(attrs)
        .await
        .map_err(|e| format!("setting mode {mode:o}: {e}"))?;
    file.write_all(content)
        .await
        .map_err(|e| format!("writing: {e}"))?;
    // shutdown waits for every write to be acknowledged and closes the handle.
    file.shutdown().await.map_err(|e| format!("closing: {e}"))?;
    Ok(())
}

fn signal_name(sig: &Sig) -> &str {
    match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name,
    }
}

fn signal_name_owned(sig: Sig) -> String {
    match sig {
        Sig::Custom(name) => name,
        other => signal_name(&other).to_owned(),
    }
}

// ---------------------------------------------------------------------------
// known_hosts

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    Revoked,
    CertAuthority,
}

#[derive(Debug)]
enum HostMatcher {
    /// Lower-cased patterns, possibly with `*`/`?` wildcards and `!` negation.
    Patterns(Vec<String>),
    Hashed {
        salt: Vec<u8>,
        hash: [u8; 20],
    },
}

#[derive(Debug)]
struct KnownHostEntry {
    marker: Option<Marker>,
    hosts: HostMatcher,
    key: PublicKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostKeyVerdict {
    Trusted,
    Revoked,
    /// The host has entries, none with the presented key.
    Mismatch,
    /// The host has no entries at all.
    Unknown,
}

#[derive(Debug)]
struct KnownHosts {
    entries: Vec<KnownHostEntry>,
}

impl KnownHosts {
    /// Parses strictly: a malformed line is a configuration error to report,
    /// not something to skip, since skipping could turn into "unknown host"
    /// far from its cause.
    fn parse(text: &str) -> Result<Self, SshError> {
        let mut entries = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line_no = index + 1;
            let invalid =
                |why: String| SshError::InvalidKnownHosts(format!("line {line_no}: {why}"));
            let mut fields = line.split_whitespace();
            let mut hosts_field = fields.next().unwrap_or_default();
            let marker = match hosts_field.strip_prefix('@') {
                None => None,
                Some(name) => {
                    let marker = match name {
                        "revoked" => Marker::Revoked,
                        "cert-authority" => Marker::CertAuthority,
                        other => return Err(invalid(format!("unknown marker '@{other}'"))),
                    };
                    hosts_field = fields
                        .next()
                        .ok_or_else(|| invalid("missing host patterns".into()))?;
                    Some(marker)
                }
            };
            let hosts = parse_host_field(hosts_field).map_err(&invalid)?;
            let key_type = fields
                .next()
                .ok_or_else(|| invalid("missing key type".into()))?;
            let key_base64 = fields
                .next()
                .ok_or_else(|| invalid("missing key data".into()))?;
            let key = PublicKey::from_openssh(&format!("{key_type} {key_base64}"))
                .map_err(|e| invalid(format!("invalid {key_type} key: {e}")))?;
            entries.push(KnownHostEntry { marker, hosts, key });
        }
        Ok(Self { entries })
    }

    /// The name OpenSSH looks up: `host` on port 22, `[host]:port` otherwise.
    fn lookup_name(host: &str, port: u16) -> String {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if port == 22 {
            host.to_ascii_lowercase()
        } else {
            format!("[{}]:{port}", host.to_ascii_lowercase())
        }
    }

    fn entries_for<'a>(
        &'a self,
        host: &str,
        port: u16,
    ) -> impl Iterator<Item = &'a KnownHostEntry> + 'a {
        let name = Self::lookup_name(host, port);
        self.entries
            .iter()
            .filter(move |entry| entry.hosts.matches(&name))
    }

    fn verify(
        &self,
        host: &str,
        port: u16,
        presented: &russh::keys::ssh_key::public::KeyData,
    ) -> HostKeyVerdict {
        let mut host_known = false;
        let mut trusted = false;
        for entry in self.entries_for(host, port) {
            let same_key = entry.key.key_data() == presented;
            match entry.marker {
                Some(Marker::Revoked) if same_key => return HostKeyVerdict::Revoked,
                Some(Marker::Revoked) => {}
                // Host certificates are not negotiated, so CA lines neither
                // trust nor identify the host.
                Some(Marker::CertAuthority) => {}
                None => {
                    host_known = true;
                    trusted |= same_key;
                }
            }
        }
        if trusted {
            HostKeyVerdict::Trusted
        } else if host_known {
            HostKeyVerdict::Mismatch
        } else {
            HostKeyVerdict::Unknown
        }
    }

    fn algorithms_for(&self, host: &str, port: u16) -> Vec<Algorithm> {
        let mut algorithms: Vec<Algorithm> = Vec::new();
        for entry in self.entries_for(host, port) {
            let algorithm = entry.key.algorithm();
            if entry.marker.is_none() && !algorithms.contains(&algorithm) {
                algorithms.push(algorithm);
            }
        }
        algorithms
    }
}

fn parse_host_field(field: &str) -> Result<HostMatcher, String> {
    if field.starts_with("|1|") {
        return match field.parse::<HostPatterns>() {
            Ok(HostPatterns::HashedName { salt, hash }) => Ok(HostMatcher::Hashed { salt, hash }),
            _ => Err("malformed hashed host name (expected |1|salt|hash)".into()),
        };
    }
    let patterns: Vec<String> = field
        .split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    if patterns.is_empty() {
        return Err("empty host pattern list".into());
    }
    Ok(HostMatcher::Patterns(patterns))
}

impl HostMatcher {
    fn matches(&self, name: &str) -> bool {
        match self {
            Self::Hashed { salt, hash } => match Hmac::<Sha1>::new_from_slice(salt) {
                Ok(mac) => mac.chain_update(name.as_bytes()).verify_slice(hash).is_ok(),
                Err(_) => false,
            },
            // OpenSSH semantics: a matching negated pattern vetoes the line
            // even if a positive pattern also matches.
            Self::Patterns(patterns) => {
                let mut matched = false;
                for pattern in patterns {
                    match pattern.strip_prefix('!') {
                        Some(negated) if glob_match(negated.as_bytes(), name.as_bytes()) => {
                            return false;
                        }
                        Some(_) => {}
                        None => matched |= glob_match(pattern.as_bytes(), name.as_bytes()),
                    }
                }
                matched
            }
        }
    }
}

/// `*` matches any run of characters, `?` exactly one.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Position after the last `*` and the text position it was tried at,
    // for backtracking.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p + 1, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((after_star, tried)) => {
                    p = after_star;
                    t = tried + 1;
                    star = Some((after_star, tried + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDpY2i0tgHu5bSskUM8weMWXQhp6Gy9UnyN9io70uYlt";
    const ED25519_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAubGo+4pBtm1/PgQVOB/XCM3fLNWVK5loV0qcT1umf+";

    fn key(line: &str) -> PublicKey {
        PublicKey::from_openssh(line).expect("test key parses")
    }

    fn verdict(known_hosts: &str, host: &str, port: u16, presented: &str) -> HostKeyVerdict {
        KnownHosts::parse(known_hosts)
            .expect("known_hosts parses")
            .verify(host, port, key(presented).key_data())
    }

    #[test]
    fn glob() {
        assert!(glob_match(b"*", b"anything"));
        assert!(glob_match(b"*.example.com", b"a.b.example.com"));
        assert!(!glob_match(b"*.example.com", b"example.com"));
        assert!(glob_match(b"10.0.0.?", b"10.0.0.7"));
        assert!(!glob_match(b"10.0.0.?", b"10.0.0.17"));
        assert!(glob_match(b"a*b*c", b"aXXbYYbc"));
        assert!(!glob_match(b"a*b*c", b"aXXbYYbd"));
        assert!(glob_match(b"", b""));
        assert!(!glob_match(b"", b"x"));
    }

    #[test]
    fn plain_host_on_port_22() {
        let kh = format!("build1 {ED25519_A}\n");
        assert_eq!(
            verdict(&kh, "build1", 22, ED25519_A),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            verdict(&kh, "BUILD1", 22, ED25519_A),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            verdict(&kh, "build1", 22, ED25519_B),
            HostKeyVerdict::Mismatch
        );
        assert_eq!(
            verdict(&kh, "build2", 22, ED25519_A),
            HostKeyVerdict::Unknown
        );
        // A bare name never matches a non-standard port, as in OpenSSH.
        assert_eq!(
            verdict(&kh, "build1", 2222, ED25519_A),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn bracketed_host_with_port() {
        let kh = format!("[10.1.2.3]:2222 {ED25519_A}\n");
        assert_eq!(
            verdict(&kh, "10.1.2.3", 2222, ED25519_A),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            verdict(&kh, "10.1.2.3", 22, ED25519_A),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            verdict(&kh, "10.1.2.3", 2223, ED25519_A),
            HostKeyVerdict::Unknown
        );
        let v6 = format!("[::1]:2222 {ED25519_A}\n");
        assert_eq!(
            verdict(&v6, "::1", 2222, ED25519_A),
            HostKeyVerdict::Trusted
        );
    }

    #[test]
    fn comma_separated_patterns_wildcards_and_negation() {
        let kh = format!("web,10.0.0.5,*.build.internal,!bad.build.internal {ED25519_A}\n");
        assert_eq!(verdict(&kh, "web", 22, ED25519_A), HostKeyVerdict::Trusted);
        assert_eq!(
            verdict(&kh, "10.0.0.5", 22, ED25519_A),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            verdict(&kh, "vm7.build.internal", 22, ED25519_A),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            verdict(&kh, "bad.build.internal", 22, ED25519_A),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            verdict(&kh, "10.0.0.50", 22, ED25519_A),
            HostKeyVerdict::Unknown
        );
    }

    fn hashed(name: &str, salt: &[u8]) -> String {
        use russh::keys::ssh_key::encoding::base64::{Base64, Encoding};
        let mac = Hmac::<Sha1>::new_from_slice(salt)
            .expect("hmac accepts any key length")
            .chain_update(name.as_bytes())
            .finalize()
            .into_bytes();
        format!(
            "|1|{}|{}",
            Base64::encode_string(salt),
            Base64::encode_string(&mac)
        )
    }

    #[test]
    fn hashed_entries() {
        let kh = format!(
            "{} {ED25519_A}\n{} {ED25519_B}\n",
            hashed("build1", b"0123456789abcdefghij"),
            hashed("[127.0.0.1]:22022", b"another-salt-value!!"),
        );
        assert_eq!(
            verdict(&kh, "build1", 22, ED25519_A),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            verdict(&kh, "build1", 22, ED25519_B),
            HostKeyVerdict::Mismatch
        );
        assert_eq!(
            verdict(&kh, "127.0.0.1", 22022, ED25519_B),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            verdict(&kh, "127.0.0.1", 22, ED25519_B),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            verdict(&kh, "build2", 22, ED25519_A),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn real_ssh_keygen_hashed_line() {
        // Produced by `ssh-keygen -H` for host "build1"; guards the
        // HMAC-SHA1 format against an independent implementation.
        let kh =
            format!("|1|/mlW3y+ia8dRgIoa/xR6fiYilHI=|fsrJYRW1oiZHdegwI+JmM0X3I3Q= {ED25519_A}");
        assert_eq!(
            verdict(&kh, "build1", 22, ED25519_A),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            verdict(&kh, "build2", 22, ED25519_A),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn comments_blank_lines_and_multiple_key_types() {
        let kh = format!(
            "# known hosts for the build fleet\n\n   \n\
             build1 {ECDSA_P256}\n\
             build1\t{ED25519_B} trailing comment words\n\
             # build1 {ED25519_A}\n\
             build1 {RSA}\n"
        );
        let known = KnownHosts::parse(&kh).expect("parses");
        assert_eq!(known.entries.len(), 3);
        assert_eq!(
            verdict(&kh, "build1", 22, ED25519_B),
            HostKeyVerdict::Trusted
        );
        assert_eq!(verdict(&kh, "build1", 22, RSA), HostKeyVerdict::Trusted);
        assert_eq!(
            verdict(&kh, "build1", 22, ECDSA_P256),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            verdict(&kh, "build1", 22, ED25519_A),
            HostKeyVerdict::Mismatch
        );
        let algorithms = known.algorithms_for("build1", 22);
        assert_eq!(algorithms.len(), 3);
    }

    #[test]
    fn revoked_and_cert_authority_markers() {
        let kh = format!(
            "@revoked * {ED25519_B}\n\
             build1 {ED25519_B}\n\
             @cert-authority *.internal {ED25519_A}\n"
        );
        assert_eq!(
            verdict(&kh, "build1", 22, ED25519_B),
            HostKeyVerdict::Revoked
        );
        // A CA line is not a host key for the host.
        assert_eq!(
            verdict(&kh, "x.internal", 22, ED25519_A),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn invalid_lines_are_reported_with_line_number() {
        let cases = [
            "build1\n",
            "build1 ssh-ed25519\n",
            "build1 ssh-ed25519 !!!notbase64\n",
            "@bogus build1 ssh-ed25519 AAAA\n",
            "|1|nothash build1\n",
        ];
        for case in cases {
            let text = format!("# header\n{case}");
            match KnownHosts::parse(&text) {
                Err(SshError::InvalidKnownHosts(msg)) => {
                    assert!(msg.starts_with("line 2:"), "{case:?} gave {msg}");
                }
                other => panic!("{case:?} should be invalid, got {other:?}"),
            }
        }
        // Key type that contradicts the key blob.
        let mismatched = ED25519_A.replace("ssh-ed25519", "ssh-rsa");
        assert!(KnownHosts::parse(&format!("h {mismatched}")).is_err());
    }

    #[test]
    fn preferred_algorithms_put_recorded_types_first() {
        let default = Preferred::default().key.into_owned();
        let recorded = [Algorithm::Rsa { hash: None }];
        let order = prefer_algorithms(&default, &recorded);
        assert_eq!(order.len(), default.len());
        assert!(
            order
                .iter()
                .take(3)
                .all(|a| matches!(a, Algorithm::Rsa { .. }))
        );
        assert_eq!(order[3], Algorithm::Ed25519);
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let target = Target::new(
            "h",
            22,
            "root",
            SecretString::new("-----BEGIN OPENSSH PRIVATE KEY-----\nsecretbits"),
            HostKeyPolicy::KnownHosts(format!("h {ED25519_A}")),
        );
        let printed = format!("{target:?}");
        assert!(!printed.contains("secretbits"), "{printed}");
        assert!(printed.contains("REDACTED"), "{printed}");
    }

    #[test]
    fn invalid_private_key_does_not_echo_material() {
        let target = Target::new(
            "h",
            22,
            "root",
            SecretString::new(
                "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0Yml0cw==\n-----END OPENSSH PRIVATE KEY-----\n",
            ),
            HostKeyPolicy::InsecureIgnore,
        );
        match Prepared::new(&target) {
            Err(err @ SshError::InvalidPrivateKey(_)) => {
                let text = format!("{err} {err:?}");
                assert!(!text.contains("c2VjcmV0Yml0cw"), "{text}");
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("garbage key accepted"),
        }
    }

    #[test]
    fn error_messages() {
        let timeout = SshError::Timeout {
            addr: "127.0.0.1:2222".into(),
            after: Duration::from_millis(5020),
            last: SshError::Refused {
                addr: "127.0.0.1:2222".into(),
            }
            .to_string(),
        };
        assert_eq!(
            timeout.to_string(),
            "could not connect to 127.0.0.1:2222: gave up after 5.0s; last error: connection \
             refused by 127.0.0.1:2222"
        );
        assert!(timeout.is_transient());
        let auth = SshError::AuthFailed {
            user: "x".into(),
            addr: "h:22".into(),
        };
        assert_eq!(
            auth.to_string(),
            "authentication failed for user 'x' at h:22: the server rejected the private key"
        );
        assert!(!auth.is_transient());
        assert!(!SshError::Cancelled.is_transient());
    }

    fn feed_all(marker: &mut PgidMarker, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks {
            marker.feed(chunk, &mut |b| out.extend_from_slice(b));
        }
        marker.flush(&mut |b| out.extend_from_slice(b));
        out
    }

    #[test]
    fn pgid_marker_wraps_command_on_its_own_line() {
        let marker = PgidMarker::new();
        let prefix = String::from_utf8_lossy(&marker.prefix).into_owned();
        assert_eq!(
            marker.wrap("make && echo done"),
            format!("echo \"{prefix}$$\" >&2\nmake && echo done")
        );
        assert_ne!(
            PgidMarker::new().prefix,
            marker.prefix,
            "tokens must differ"
        );
    }

    #[test]
    fn pgid_marker_is_stripped_from_stderr() {
        let mut m = PgidMarker::new();
        let line = [m.prefix.clone(), b"4242\n".to_vec()].concat();
        let out = feed_all(&mut m, &[&line, b"real error\n"]);
        assert_eq!(m.pgid, Some(4242));
        assert_eq!(out, b"real error\n");

        // Split at every position, with shell noise before it.
        let mut stream = b"bashrc: warning\n".to_vec();
        stream.extend_from_slice(&line);
        stream.extend_from_slice(b"after");
        for split in 0..stream.len() {
            let mut m2 = PgidMarker::new();
            let stream = [b"bashrc: warning\n".as_slice(), &m2.prefix, b"4242\nafter"].concat();
            let (a, b) = stream.split_at(split.min(stream.len()));
            let out = feed_all(&mut m2, &[a, b]);
            assert_eq!(m2.pgid, Some(4242), "split {split}");
            assert_eq!(out, b"bashrc: warning\nafter", "split {split}");
        }
    }

    #[test]
    fn pgid_marker_absent_or_bogus_passes_output_through() {
        let mut m = PgidMarker::new();
        let out = feed_all(&mut m, &[b"no marker ", b"here\n"]);
        assert_eq!(m.pgid, None);
        assert_eq!(out, b"no marker here\n");

        for bogus in [&b"1\n"[..], b"0\n", b"-5\n", b"abc\n"] {
            let mut m = PgidMarker::new();
            let line = [m.prefix.clone(), bogus.to_vec()].concat();
            let _ = feed_all(&mut m, &[&line]);
            assert_eq!(m.pgid, None, "{bogus:?}");
        }

        // A prefix-like tail is held back only until it can no longer match.
        let mut m = PgidMarker::new();
        let mut out = Vec::new();
        let partial = m.prefix[..5].to_vec();
        m.feed(&partial, &mut |b| out.extend_from_slice(b));
        assert!(out.is_empty());
        m.feed(b"X", &mut |b| out.extend_from_slice(b));
        assert_eq!(out, [partial, b"X".to_vec()].concat());
    }

    #[test]
    fn target_addr_brackets_ipv6() {
        let mut t = Target::new(
            "10.0.0.1",
            22,
            "u",
            SecretString::default(),
            HostKeyPolicy::InsecureIgnore,
        );
        assert_eq!(t.addr(), "10.0.0.1:22");
        t.host = "fd00::1".into();
        assert_eq!(t.addr(), "[fd00::1]:22");
        t.host = "[fd00::1]".into();
        assert_eq!(t.addr(), "[fd00::1]:22");
    }

    #[test]
    fn session_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Session>();
        assert_send_sync::<Target>();
        assert_send_sync::<SshError>();
    }

    const ECDSA_P256: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBGhEASxrkjdi7NJgcr/z4377jO9uTQbzn5N2rLTo6vo+cSSDzjRty0VIYtxuQOkmpM/358UNGJkXa/pliTXTI0A=";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDDz6/bk07Xc2YaZUqWcNjzJR34yCpBXDa4NgRi2PRERIvzyS3U65wIhwsoxgHips68IqF2ziNzp6R9XJCPs2V9ixXa1/dugqNPZ7IHdm1X1P32STvmouqpeGoevlvyleOAvKh7XntXUN+++p9U3WHu7FnfbQuOFK9tjFV1WEG+ablmA0+ToB6kci06GC+bu1FjCClHz+IO2ZZ6K8WawE4kQwNqRaoyG+JfVWmVBfS4+JHICVGMQ360OQYeCadoM5TNQaswYl0UWxNej3ffAToQCJ0eb28tZSQucc3jkw01q+awd2cf9EroHz3Pmvtb0BTBxU3MDNHXwcxH82aHQ0lb";
}
