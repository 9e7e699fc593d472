//! What this process last wrote to each build, so that a reconcile can decide from
//! its own last write instead of reading the object back from the apiserver.
//!
//! The watch cache lags our writes, and deciding from a stale status would rerun a
//! step. A read per reconcile avoids that but doubles the apiserver round trips of
//! a step transition, and every status write comes back as a watch event whose
//! reconcile read the object again. The last write is as current as a read when the
//! cache shows one of our own writes: nothing else was written in between, because
//! every status write is conditional on the resourceVersion it was decided from.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use kube::ResourceExt;

use crate::api::ImageBuild;

/// How many of our own resourceVersions to remember per build: enough for the
/// writes a lagging watch can be behind by.
const REMEMBERED: usize = 16;

/// One lock per build (by uid): it serialises a build's reconciles and the status
/// writes of its running step, and guards what we last wrote.
#[derive(Default)]
pub struct Builds {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Known>>>>,
}

impl Builds {
    pub fn lock(&self, uid: &str) -> Arc<tokio::sync::Mutex<Known>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(uid.to_string()).or_default().clone()
    }

    /// Drops everything about a build that is gone.
    pub fn forget(&self, uid: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }
}

#[derive(Default)]
pub struct Known {
    latest: Option<ImageBuild>,
    /// resourceVersions our writes produced, oldest first.
    written: VecDeque<String>,
}

impl Known {
    /// The object to decide from, given what the watch cache shows: our last write
    /// when the cache shows one of our writes (it cannot be newer than the last), or
    /// `None` when someone else wrote since, or we never wrote: then read it.
    pub fn current(&self, cached: &ImageBuild) -> Option<&ImageBuild> {
        let latest = self.latest.as_ref()?;
        let rv = cached.resource_version()?;
        self.written.contains(&rv).then_some(latest)
    }

    /// Our last write, for a writer that has no cached object to compare with; its
    /// write is conditional, so a stale one fails with a conflict and is read again.
    pub fn latest(&self) -> Option<&ImageBuild> {
        self.latest.as_ref()
    }

    pub fn wrote(&mut self, obj: ImageBuild) {
        if let Some(rv) = obj.resource_version() {
            if self.written.len() == REMEMBERED {
                self.written.pop_front();
            }
            self.written.push_back(rv);
        }
        self.latest = Some(obj);
    }

    /// After a conflict: what we wrote is no longer the newest.
    pub fn clear(&mut self) {
        self.latest = None;
        self.written.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rv: &str, phase_message: &str) -> ImageBuild {
        let mut ib: ImageBuild = serde_json::from_value(serde_json::json!({
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "ImageBuild",
            "metadata": {"name": "b", "namespace": "n", "resourceVersion": rv},
            "spec": {
                "builder": {"null": {}},
                "communicator": {"ssh": {
                    "host": "h",
                    "username": "u",
                    "hostKey": {"insecureIgnore": true},
                }},
            },
        }))
        .unwrap();
        ib.status = Some(crate::api::ImageBuildStatus {
            message: Some(phase_message.into()),
            ..Default::default()
        });
        ib
    }

    fn message(ib: &ImageBuild) -> &str {
        ib.status.as_ref().unwrap().message.as_deref().unwrap()
    }

    #[test]
    fn a_cache_behind_our_writes_uses_the_last_write() {
        let mut k = Known::default();
        assert!(
            k.current(&at("1", "created")).is_none(),
            "never wrote: read"
        );
        k.wrote(at("2", "first"));
        k.wrote(at("3", "second"));
        assert_eq!(message(k.current(&at("2", "first")).unwrap()), "second");
        assert_eq!(message(k.current(&at("3", "second")).unwrap()), "second");
    }

    #[test]
    fn someone_elses_write_is_read() {
        let mut k = Known::default();
        k.wrote(at("2", "first"));
        assert!(k.current(&at("4", "spec changed")).is_none());
        assert!(k.current(&at("1", "before our first write")).is_none());
        k.clear();
        assert!(k.current(&at("2", "first")).is_none());
        assert!(k.latest().is_none());
    }

    #[test]
    fn remembers_a_bounded_number_of_writes() {
        let mut k = Known::default();
        for rv in 0..REMEMBERED + 4 {
            k.wrote(at(&rv.to_string(), "x"));
        }
        assert!(k.current(&at("0", "x")).is_none());
        assert!(k.current(&at(&(REMEMBERED + 3).to_string(), "x")).is_some());
        assert!(k.current(&at("4", "x")).is_some());
    }
}
