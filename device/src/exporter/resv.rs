// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The reservation lock of one object: a wait-die ww-mutex, as Linux's
//! `reservation_ww_class` (contract section 7.4).
//!
//! This is the bare queue discipline. Who holds which lock, and whether a
//! context "holds at least one lock", is known to the caller and passed in.

/// Who holds or waits for a reservation lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Locker {
    /// An acquire context of a guest, with its stamp (lower = older).
    Ctx { ctx: u64, stamp: u64 },
    /// A context-less locker: the device on behalf of one parked request, or
    /// a host-side operation (eviction). Never dies, never makes anyone die.
    Anon(u64),
}

impl Locker {
    fn stamp(&self) -> Option<u64> {
        match self {
            Locker::Ctx { stamp, .. } => Some(*stamp),
            Locker::Anon(_) => None,
        }
    }
}

/// One waiter: the parked request `pending` on behalf of `locker`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Waiter {
    pub pending: u64,
    pub locker: Locker,
}

#[derive(Debug, Default)]
pub(crate) struct WwMutex {
    holder: Option<Locker>,
    waiters: Vec<Waiter>,
}

impl WwMutex {
    pub fn holder(&self) -> Option<Locker> {
        self.holder
    }

    pub fn is_free(&self) -> bool {
        self.holder.is_none()
    }

    pub fn is_held_by_ctx(&self, ctx: u64) -> bool {
        matches!(self.holder, Some(Locker::Ctx { ctx: c, .. }) if c == ctx)
    }

    pub fn is_held_by_anon(&self, pending: u64) -> bool {
        self.holder == Some(Locker::Anon(pending))
    }

    #[cfg(test)]
    pub fn waiters(&self) -> &[Waiter] {
        &self.waiters
    }

    /// Takes a free lock. The caller has checked `is_free`.
    pub fn take(&mut self, locker: Locker) {
        debug_assert!(self.holder.is_none());
        self.holder = Some(locker);
    }

    /// Drops the lock; the caller then runs `grant`.
    pub fn release(&mut self) {
        self.holder = None;
    }

    /// Whether a new request of a context with `stamp` that holds other
    /// locks must back off at once: the holder or a queued context is older.
    pub fn must_die_on_arrival(&self, stamp: u64) -> bool {
        let older = |s: Option<u64>| s.is_some_and(|s| s < stamp);
        older(self.holder.and_then(|h| h.stamp()))
            || self.waiters.iter().any(|w| older(w.locker.stamp()))
    }

    /// Queues a waiter. Contexts queue in stamp order among contexts;
    /// context-less waiters keep their arrival position.
    pub fn enqueue(&mut self, waiter: Waiter) {
        let pos = match waiter.locker.stamp() {
            None => self.waiters.len(),
            Some(stamp) => self
                .waiters
                .iter()
                .position(|w| w.locker.stamp().is_some_and(|s| s > stamp))
                .unwrap_or(self.waiters.len()),
        };
        self.waiters.insert(pos, waiter);
    }

    /// Removes the waiter of a parked request, if it is queued here.
    pub fn remove(&mut self, pending: u64) -> bool {
        let before = self.waiters.len();
        self.waiters.retain(|w| w.pending != pending);
        before != self.waiters.len()
    }

    /// The die rule re-applied to every waiter: a waiting context that holds
    /// other locks dies as soon as an older context holds the lock or is
    /// queued ahead of it. Removes and returns those waiters.
    pub fn reap_dying(&mut self, holds_other_locks: impl Fn(u64) -> bool) -> Vec<Waiter> {
        let mut oldest_ahead = self.holder.and_then(|h| h.stamp());
        let mut dying = Vec::new();
        let mut kept = Vec::with_capacity(self.waiters.len());
        for w in self.waiters.drain(..) {
            match w.locker {
                Locker::Ctx { ctx, stamp } => {
                    if oldest_ahead.is_some_and(|o| o < stamp) && holds_other_locks(ctx) {
                        dying.push(w);
                        continue;
                    }
                    oldest_ahead = Some(oldest_ahead.map_or(stamp, |o| o.min(stamp)));
                    kept.push(w);
                }
                Locker::Anon(_) => kept.push(w),
            }
        }
        self.waiters = kept;
        dying
    }

    /// Hands a free lock to the first waiter, oldest first.
    pub fn grant(&mut self) -> Option<Waiter> {
        if self.holder.is_some() || self.waiters.is_empty() {
            return None;
        }
        let w = self.waiters.remove(0);
        self.holder = Some(w.locker);
        Some(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(ctx: u64, stamp: u64) -> Locker {
        Locker::Ctx { ctx, stamp }
    }

    #[test]
    fn contexts_queue_oldest_first_and_anon_keep_arrival_order() {
        let mut m = WwMutex::default();
        m.take(ctx(9, 9));
        m.enqueue(Waiter {
            pending: 1,
            locker: ctx(5, 5),
        });
        m.enqueue(Waiter {
            pending: 2,
            locker: Locker::Anon(2),
        });
        m.enqueue(Waiter {
            pending: 3,
            locker: ctx(3, 3),
        });
        m.enqueue(Waiter {
            pending: 4,
            locker: ctx(7, 7),
        });
        let order: Vec<u64> = m.waiters().iter().map(|w| w.pending).collect();
        assert_eq!(order, vec![3, 1, 2, 4]);
    }

    #[test]
    fn younger_waiter_holding_locks_dies_when_older_queues_ahead() {
        let mut m = WwMutex::default();
        m.take(Locker::Anon(100));
        m.enqueue(Waiter {
            pending: 1,
            locker: ctx(5, 5),
        });
        assert!(m.reap_dying(|_| true).is_empty());
        m.enqueue(Waiter {
            pending: 2,
            locker: ctx(3, 3),
        });
        let dead = m.reap_dying(|c| c == 5);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].pending, 1);
    }

    #[test]
    fn context_holding_no_lock_never_dies() {
        let mut m = WwMutex::default();
        m.take(ctx(1, 1));
        m.enqueue(Waiter {
            pending: 1,
            locker: ctx(5, 5),
        });
        assert!(m.reap_dying(|_| false).is_empty());
    }

    #[test]
    fn anon_holder_makes_nobody_die() {
        let mut m = WwMutex::default();
        m.take(Locker::Anon(1));
        assert!(!m.must_die_on_arrival(0));
        m.enqueue(Waiter {
            pending: 1,
            locker: ctx(5, 5),
        });
        assert!(m.reap_dying(|_| true).is_empty());
    }
}
