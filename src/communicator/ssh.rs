// TEMPORARY compile stub; replaced by the russh implementation.
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub enum HostKeyPolicy {
    KnownHosts(String),
    InsecureIgnore,
}
pub struct SecretString(String);
impl From<String> for SecretString {
    fn from(s: String) -> Self {
        SecretString(s)
    }
}
pub struct Target {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub private_key: SecretString,
    pub host_key: HostKeyPolicy,
    pub connect_timeout: Duration,
    pub keepalive: Duration,
}
#[derive(Debug, Clone, Copy)]
pub enum OutputStream {
    Stdout,
    Stderr,
}
pub struct ExecResult {
    pub exit_code: Option<u32>,
    pub exit_signal: Option<String>,
}
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("disconnected: {0}")]
    Disconnected(String),
    #[error("cancelled")]
    Cancelled,
    #[error("stub")]
    Stub,
}
pub struct Session;
pub async fn connect(_t: &Target, _c: &CancellationToken) -> Result<Session, SshError> {
    Err(SshError::Stub)
}
impl Session {
    pub async fn exec(
        &self,
        _c: &str,
        _f: impl FnMut(OutputStream, &[u8]) + Send,
        _t: &CancellationToken,
    ) -> Result<ExecResult, SshError> {
        Err(SshError::Stub)
    }
    pub async fn upload(&self, _p: &str, _c: &[u8], _m: u32) -> Result<(), SshError> {
        Err(SshError::Stub)
    }
    pub async fn close(self) {}
}
