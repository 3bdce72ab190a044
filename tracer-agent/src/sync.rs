//! Locks that survive a panic elsewhere. A task that panicked while holding one
//! of the agent's shared tables (RED metrics, the connection inventory, the
//! socket map) leaves it poisoned; `Mutex::lock` would then fail for good and
//! every reader would go quietly empty. The tables stay usable (each update
//! leaves them consistent enough to read and to be overwritten by the next), so
//! the guard is taken anyway and the poisoning is counted once, loudly.

use std::sync::{
    Mutex, MutexGuard, PoisonError,
    atomic::{AtomicBool, Ordering},
};

static WARNED: AtomicBool = AtomicBool::new(false);

/// The guard of `m`, poisoned or not.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
        .unwrap_or_else(|poisoned: PoisonError<MutexGuard<'_, T>>| {
            if !WARNED.swap(true, Ordering::Relaxed) {
                log::error!("a task panicked holding a shared table; it is used as it was left");
            }
            poisoned.into_inner()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_its_data() {
        let m = std::sync::Arc::new(Mutex::new(vec![1]));
        let held = m.clone();
        let _ = std::thread::spawn(move || {
            let mut g = held.lock().unwrap();
            g.push(2);
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        lock(&m).push(3);
        assert_eq!(*lock(&m), [1, 2, 3]);
    }
}
