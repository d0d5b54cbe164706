// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Acquire contexts and the reservation lock requests (contract section 7.4).
//! The queue discipline itself (wait-die) is in `resv.rs`.

use std::collections::BTreeSet;

use virtio_dmabuf_protocol::{Reply, Status};

use super::resv::Locker;
use super::{done, park_on, Attempt, Exporter, GuestId, ObjId, PendingId, Step};

#[derive(Debug)]
pub(crate) struct Context {
    pub guest: GuestId,
    /// From one counter per daemon process, shared by all guests: lower = older.
    pub stamp: u64,
    pub held: BTreeSet<ObjId>,
    /// Its one parked request (a queued `LOCK`).
    pub parked: Option<PendingId>,
}

impl Exporter {
    fn context_of(&self, guest: GuestId, ctx: u64) -> Result<&Context, Status> {
        self.contexts
            .get(&ctx)
            .filter(|c| c.guest == guest)
            .ok_or(Status::NoEnt)
    }

    /// `ACQUIRE_INIT`.
    pub(crate) fn acquire_init(&mut self, guest: GuestId) -> Attempt {
        if self.guests[guest].contexts.len() >= self.config.limits.max_contexts as usize {
            return Err(Status::NoSpc);
        }
        let ctx = self.new_handle()?;
        let stamp = self.new_stamp();
        self.contexts.insert(
            ctx,
            Context {
                guest,
                stamp,
                held: BTreeSet::new(),
                parked: None,
            },
        );
        self.guests[guest].contexts.insert(ctx);
        done(Ok(Reply::Acquire { ctx, stamp }))
    }

    /// `ACQUIRE_FINI`: `EBUSY` while it holds locks; its waiting request ends.
    pub(crate) fn acquire_fini(&mut self, guest: GuestId, ctx: u64) -> Attempt {
        let c = self.context_of(guest, ctx)?;
        if !c.held.is_empty() {
            return Err(Status::Busy);
        }
        if let Some(pending_id) = c.parked {
            self.complete(pending_id, Err(Status::Canceled));
        }
        self.contexts.remove(&ctx);
        self.guests[guest].contexts.remove(&ctx);
        done(Ok(Reply::Empty))
    }

    /// `LOCK` (section 7.4).
    pub(crate) fn lock(
        &mut self,
        guest: GuestId,
        ctx: u64,
        handle: u64,
        try_lock: bool,
        slow: bool,
    ) -> Attempt {
        let c = self.context_of(guest, ctx)?;
        let object = self.object_of(guest, handle)?;
        if slow && !c.held.is_empty() {
            // ww_mutex_lock_slow requires that the context holds nothing.
            return Err(Status::Inval);
        }
        if c.parked.is_some() {
            return Err(Status::Busy);
        }
        let o = self.objects.get(&object).ok_or(Status::NoEnt)?;
        if o.resv.is_held_by_ctx(ctx) {
            return Err(Status::Already);
        }
        if o.resv.is_free() {
            let stamp = c.stamp;
            if let Some(o) = self.objects.get_mut(&object) {
                o.resv.take(Locker::Ctx { ctx, stamp });
            }
            if let Some(c) = self.contexts.get_mut(&ctx) {
                c.held.insert(object);
            }
            return done(Ok(Reply::Empty));
        }
        if try_lock {
            return Err(Status::Busy);
        }
        // Wait-die: a context that holds locks and is younger than the holder
        // or a queued context backs off at once. One that holds none waits.
        if !c.held.is_empty() && o.resv.must_die_on_arrival(c.stamp) {
            return Err(Status::Deadlk);
        }
        park_on(Step::QueueCtx { object, ctx })
    }

    /// `UNLOCK` (section 7.4).
    pub(crate) fn unlock(&mut self, guest: GuestId, ctx: u64, handle: u64) -> Attempt {
        let c = self.context_of(guest, ctx)?;
        let object = self.object_of(guest, handle)?;
        if !c.held.contains(&object) {
            return Err(Status::Perm);
        }
        if c.parked.is_some() {
            return Err(Status::Busy);
        }
        self.release_lock(ctx, object);
        done(Ok(Reply::Empty))
    }

    /// Drops a context's lock on an object and lets the next waiter in.
    pub(crate) fn release_lock(&mut self, ctx: u64, object: ObjId) {
        if let Some(c) = self.contexts.get_mut(&ctx) {
            c.held.remove(&object);
        }
        if let Some(o) = self.objects.get_mut(&object) {
            if o.resv.is_held_by_ctx(ctx) {
                o.resv.release();
            }
        }
        self.mark_dirty(object);
        // Holding fewer locks may spare this context's own waiter elsewhere;
        // nothing else changes for other objects.
    }

    /// Ends a context on reset: its waiting request, its locks, the context.
    pub(crate) fn drop_context(&mut self, ctx: u64) {
        let Some(c) = self.contexts.get(&ctx) else {
            return;
        };
        if let Some(pending_id) = c.parked {
            self.complete(pending_id, Err(Status::Canceled));
        }
        let held: Vec<ObjId> = self
            .contexts
            .get(&ctx)
            .map_or(Vec::new(), |c| c.held.iter().copied().collect());
        for object in held {
            self.release_lock(ctx, object);
        }
        if let Some(c) = self.contexts.remove(&ctx) {
            self.guests[c.guest].contexts.remove(&ctx);
        }
    }
}
