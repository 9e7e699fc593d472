//! Locking shared maps and values.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, also after a thread panicked while holding it: kiln's locked data
/// is replaced whole (an entry, a value) under the lock, never left half-written,
/// so a poisoned lock still guards a consistent value.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
