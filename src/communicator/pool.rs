//! One SSH connection per build, kept open between its steps: Packer connects its
//! communicator once and runs every provisioner over it. A handshake per step costs
//! a key exchange on both ends and an sshd process on the build machine; with many
//! builds at once on one host that was most of sshd's work.
//!
//! Nothing here is durable: a restarted operator, a failed step or a dropped
//! connection just connects again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::ssh::Session;

/// How long a kept session may take to prove it is alive before a new one is made.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct SessionPool {
    /// By build uid: the generation the session was made for, and the session.
    kept: Mutex<HashMap<String, (i64, Session)>>,
}

impl SessionPool {
    /// The build's kept session if it belongs to this generation and still answers;
    /// otherwise `None` (and a kept one is closed).
    pub async fn take(&self, uid: &str, generation: i64) -> Option<Session> {
        let (g, session) = self.lock().remove(uid)?;
        if g != generation || session.is_closed() {
            close_later(session);
            return None;
        }
        if session.probe(PROBE_TIMEOUT).await {
            tracing::debug!(addr = %session.addr(), "reusing the build's SSH connection");
            Some(session)
        } else {
            tracing::info!(addr = %session.addr(), "the build's SSH connection is gone; connecting again");
            close_later(session);
            None
        }
    }

    /// Keeps a session for the build's next step.
    pub fn keep(&self, uid: &str, generation: i64, session: Session) {
        if session.is_closed() {
            return;
        }
        if let Some((_, old)) = self.lock().insert(uid.to_string(), (generation, session)) {
            close_later(old);
        }
    }

    /// Closes the build's kept session, if any: its steps that use one are over.
    pub fn close(&self, uid: &str) {
        if let Some((_, session)) = self.lock().remove(uid) {
            close_later(session);
        }
    }

    /// Sessions kept, for tests and metrics.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (i64, Session)>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A polite disconnect without making the caller wait for it.
fn close_later(session: Session) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(session.close());
        }
        // Outside a runtime (tests dropping the pool): dropping the handle closes it.
        Err(_) => drop(session),
    }
}
