// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Parked requests: storing a request that must wait, waking it when what
//! it waits for changes (a lock, a fence, a host watch, a timer), and
//! completing or cancelling it (contract sections 7.1, 7.4, 7.6).

use std::time::Instant;

use virtio_dmabuf_protocol::{Request, Response, Status};

use super::resv::{self, Locker};
use super::{
    Completion, Exporter, GuestId, HostError, HostOpId, ObjId, Origin, Outcome, PendingId, Step,
};

/// Who is waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    Guest {
        guest: GuestId,
        origin: Origin,
        tag: u64,
    },
    Host(HostOpId),
}

#[derive(Debug)]
pub(crate) enum Work {
    Guest(Request),
    Evict,
}

/// A parked request.
#[derive(Debug)]
pub(crate) struct Pending {
    pub owner: Owner,
    pub work: Work,
    pub step: Step,
    /// The object it waits on (lock or fences).
    pub object: ObjId,
    /// The acquire context whose one waiting slot it takes.
    pub ctx: Option<u64>,
    pub deadline: Option<Instant>,
    /// `--fence-timeout` after it first waited for host fences: the bound
    /// of that wait (the device cannot signal the host's fences).
    pub host_deadline: Option<Instant>,
}

impl Pending {
    /// When its timer fires, if it has one now. An eviction's timeout bounds
    /// only its wait for the lock; once the mover holds it, fences have
    /// their own timeout, so a spent deadline is no timer (else it would
    /// stay due and the timer thread would spin on it).
    pub fn timer(&self) -> Option<Instant> {
        let own = match (&self.work, self.step) {
            (Work::Evict, Step::Lock(_)) | (Work::Guest(_), _) => self.deadline,
            (Work::Evict, _) => None,
        };
        let host = match self.step {
            Step::HostFences { .. } => self.host_deadline,
            _ => None,
        };
        match (own, host) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// True when its timer is the host-fence bound (not its own timeout).
    pub(super) fn host_timed_out(&self, now: Instant) -> bool {
        matches!(self.step, Step::HostFences { .. }) && self.host_deadline.is_some_and(|d| d <= now)
    }

    pub fn guest(&self) -> Option<GuestId> {
        match self.owner {
            Owner::Guest { guest, .. } => Some(guest),
            Owner::Host(_) => None,
        }
    }
}

impl Exporter {
    /// Stores a request that must wait, after the guest's quota check.
    pub(crate) fn park(
        &mut self,
        pending_id: PendingId,
        owner: Owner,
        work: Work,
        step: Step,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<(), Status> {
        let parked = self.park_inner(pending_id, owner, work, step, deadline, now);
        if parked.is_err() {
            self.drop_watch(step);
        }
        parked
    }

    pub(super) fn park_inner(
        &mut self,
        pending_id: PendingId,
        owner: Owner,
        work: Work,
        step: Step,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<(), Status> {
        if let Owner::Guest { guest, .. } = owner {
            let g = &self.guests[guest];
            if g.parked >= self.config.limits.max_waiting {
                return Err(Status::NoSpc);
            }
        }
        let mut ctx_slot = None;
        let (object, waiter) = match step {
            Step::Lock(object) => (object, Some(Locker::Anon(pending_id))),
            Step::QueueCtx { object, ctx } => {
                let stamp = self.contexts.get(&ctx).ok_or(Status::NoEnt)?.stamp;
                ctx_slot = Some(ctx);
                (object, Some(Locker::Ctx { ctx, stamp }))
            }
            Step::Fences { object, locked, .. } | Step::HostFences { object, locked, .. } => {
                if locked {
                    let o = self.objects.get_mut(&object).ok_or(Status::NoEnt)?;
                    if o.resv.is_free() {
                        o.resv.take(Locker::Anon(pending_id));
                    }
                }
                (object, None)
            }
        };
        let host_deadline = self.host_park_started(step, None, now);
        if let Some(locker) = waiter {
            let o = self.objects.get_mut(&object).ok_or(Status::NoEnt)?;
            o.resv.enqueue(resv::Waiter {
                pending: pending_id,
                locker,
            });
        }
        if let Some(ctx) = ctx_slot {
            if let Some(c) = self.contexts.get_mut(&ctx) {
                c.parked = Some(pending_id);
            }
        }
        if let Owner::Guest { guest, .. } = owner {
            self.guests[guest].parked += 1;
        }
        self.pending.insert(
            pending_id,
            Pending {
                owner,
                work,
                step,
                object,
                ctx: ctx_slot,
                deadline,
                host_deadline,
            },
        );
        self.mark_dirty(object);
        Ok(())
    }

    /// The host-fence bound of a request now at `step`: kept from its
    /// first host wait, set by this one, or none.
    pub(super) fn host_park_started(
        &mut self,
        step: Step,
        before: Option<Instant>,
        now: Instant,
    ) -> Option<Instant> {
        match (step, before) {
            (Step::HostFences { .. }, None) => {
                self.host_counters.waits += 1;
                Some(now.checked_add(self.config.fence_timeout).unwrap_or(now))
            }
            (_, before) => before,
        }
    }

    /// Ends a parked guest request with `response`, releasing the lock it
    /// held and its slots.
    pub(crate) fn complete(&mut self, pending_id: PendingId, response: Response) {
        let Some(p) = self.remove_pending(pending_id) else {
            return;
        };
        if let (Owner::Guest { guest, origin, tag }, Work::Guest(req)) = (p.owner, &p.work) {
            let opcode = req.opcode();
            self.stats.count(opcode, &response);
            self.completions.push(Completion {
                guest,
                origin,
                tag,
                opcode,
                response,
            });
        }
    }

    pub(crate) fn complete_host(&mut self, pending_id: PendingId, result: Result<(), HostError>) {
        if let Some(Pending {
            owner: Owner::Host(op),
            ..
        }) = self.remove_pending(pending_id)
        {
            self.host_completions.push((op, result));
        }
    }

    pub(super) fn remove_pending(&mut self, pending_id: PendingId) -> Option<Pending> {
        let p = self.pending.remove(&pending_id)?;
        self.drop_watch(p.step);
        if let Some(o) = self.objects.get_mut(&p.object) {
            o.resv.remove(pending_id);
            if o.resv.is_held_by_anon(pending_id) {
                o.resv.release();
            }
        }
        self.dirty.insert(p.object);
        if let Some(ctx) = p.ctx {
            if let Some(c) = self.contexts.get_mut(&ctx) {
                if c.parked == Some(pending_id) {
                    c.parked = None;
                }
            }
        }
        if let Some(g) = p.guest() {
            self.guests[g].parked = self.guests[g].parked.saturating_sub(1);
        }
        Some(p)
    }

    /// Waiting requests of `guest` that match `filter` end with `ECANCELED`.
    pub(crate) fn cancel_where(&mut self, filter: impl Fn(&Pending) -> bool) {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| filter(p))
            .map(|(id, _)| *id)
            .collect();
        for pending_id in ids {
            match self.pending.get(&pending_id).map(|p| p.owner) {
                Some(Owner::Guest { .. }) => self.complete(pending_id, Err(Status::Canceled)),
                Some(Owner::Host(_)) => self.complete_host(pending_id, Err(HostError::Canceled)),
                None => {}
            }
        }
    }

    /// Moves every parked request whose blocker changed as far as it can
    /// go: the die rule, lock grants, fence waits. Runs until nothing changes.
    pub(crate) fn pump(&mut self, now: Instant) {
        while let Some(object) = self.dirty.pop_first() {
            self.pump_object(object, now);
        }
    }

    pub(super) fn pump_object(&mut self, object: ObjId, now: Instant) {
        // Wait-die: a waiting context that holds other locks backs off as soon
        // as an older context is ahead of it (section 7.4).
        let dying = {
            let contexts = &self.contexts;
            match self.objects.get_mut(&object) {
                Some(o) => o
                    .resv
                    .reap_dying(|ctx| contexts.get(&ctx).is_some_and(|c| !c.held.is_empty())),
                None => Vec::new(),
            }
        };
        for w in dying {
            self.complete(w.pending, Err(Status::Deadlk));
        }
        // Grant the free lock to the first waiter.
        let granted = self.objects.get_mut(&object).and_then(|o| o.resv.grant());
        if let Some(w) = granted {
            self.dirty.insert(object);
            match w.locker {
                Locker::Ctx { ctx, .. } => {
                    if let Some(c) = self.contexts.get_mut(&ctx) {
                        c.held.insert(object);
                    }
                    self.complete(w.pending, Ok(virtio_dmabuf_protocol::Reply::Empty));
                }
                Locker::Anon(pending_id) => self.retry(pending_id, now),
            }
            return;
        }
        // Requests waiting for fences on this object.
        let ready: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.object == object)
            .filter_map(|(id, p)| match p.step {
                Step::Fences { usage, .. } if self.fences_clear(object, usage) => Some(*id),
                Step::HostFences { watch, .. }
                    if self.host_watches.get(&watch).is_none_or(|w| w.fired) =>
                {
                    Some(*id)
                }
                _ => None,
            })
            .collect();
        for pending_id in ready {
            self.retry(pending_id, now);
        }
    }

    /// Runs a parked request again now that its blocker changed.
    pub(super) fn retry(&mut self, pending_id: PendingId, now: Instant) {
        let Some(p) = self.pending.get_mut(&pending_id) else {
            return;
        };
        let owner = p.owner;
        let work = std::mem::replace(&mut p.work, Work::Evict);
        let attempt = self.attempt(owner, pending_id, &work, now);
        if let Some(p) = self.pending.get_mut(&pending_id) {
            p.work = work;
        }
        match attempt {
            Ok(Outcome::Answer(response)) => match owner {
                Owner::Guest { .. } => self.complete(pending_id, response),
                Owner::Host(_) => self.complete_host(pending_id, Ok(())),
            },
            Ok(Outcome::Parked(step)) => self.repark(pending_id, step, now),
            Err(status) => match owner {
                Owner::Guest { .. } => self.complete(pending_id, Err(status)),
                Owner::Host(_) => self.complete_host(pending_id, Err(HostError::Status(status))),
            },
        }
    }

    /// A retried request still waits, maybe for something else now.
    pub(super) fn repark(&mut self, pending_id: PendingId, step: Step, now: Instant) {
        let Some(p) = self.pending.get(&pending_id) else {
            self.drop_watch(step);
            return;
        };
        let (old, before) = (p.step, p.host_deadline);
        if old != step {
            self.drop_watch(old);
        }
        let host_deadline = self.host_park_started(step, before, now);
        let Some(p) = self.pending.get_mut(&pending_id) else {
            return;
        };
        p.step = step;
        p.host_deadline = host_deadline;
        match step {
            Step::Lock(object) => {
                p.object = object;
                if let Some(o) = self.objects.get_mut(&object) {
                    if !o.resv.is_held_by_anon(pending_id) {
                        o.resv.remove(pending_id);
                        o.resv.enqueue(resv::Waiter {
                            pending: pending_id,
                            locker: Locker::Anon(pending_id),
                        });
                    }
                }
                self.dirty.insert(object);
            }
            Step::Fences { object, locked, .. } | Step::HostFences { object, locked, .. } => {
                p.object = object;
                if locked {
                    if let Some(o) = self.objects.get_mut(&object) {
                        if o.resv.is_free() {
                            o.resv.take(Locker::Anon(pending_id));
                        }
                    }
                }
            }
            Step::QueueCtx { .. } => {}
        }
    }

    /// True when the lock of `object` may be used by request `pending_id` now:
    /// free, or held for it.
    pub(crate) fn lock_available(&self, object: ObjId, pending_id: PendingId) -> bool {
        self.objects
            .get(&object)
            .is_some_and(|o| o.resv.is_free() || o.resv.is_held_by_anon(pending_id))
    }
}
