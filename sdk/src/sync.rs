//! Locks shared across the SDK.

use std::sync::{Mutex, MutexGuard};

/// `m`'s lock, poisoned or not: every mutex of the SDK guards data a panic cannot leave half
/// written (status, models between rounds, scratch buffers), so a panic elsewhere must not
/// make it unreadable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
