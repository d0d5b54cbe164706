//! Fences on an object's reservation and `WAIT` (contract section 7.6).
//!
//! A fence is pending until its creator signals it, the device times it out
//! (`--fence-timeout`, as a GPU scheduler times out a hung job) or its guest
//! goes away. Signalled fences leave the reservation at once: waiting is
//! "no pending fence of usage <= u".

use std::time::Instant;

use virtio_dmabuf_protocol::{FenceUsage, Reply, Status};

use super::{done, wait, Attempt, Exporter, GuestId, ObjId, Step};

#[derive(Debug)]
pub(crate) struct Fence {
    pub guest: GuestId,
    pub object: ObjId,
    pub usage: FenceUsage,
    pub deadline: Instant,
}

/// Largest error a `FENCE_SIGNAL` may report (Linux's `MAX_ERRNO`).
const MAX_ERRNO: u32 = 4095;

impl Exporter {
    /// True when no fence of usage <= `usage` is pending on the object.
    pub(crate) fn fences_clear(&self, object: ObjId, usage: FenceUsage) -> bool {
        self.objects.get(&object).is_none_or(|o| {
            o.fences
                .iter()
                .all(|f| self.fences.get(f).is_none_or(|f| f.usage > usage))
        })
    }

    /// `FENCE_ATTACH`: the context must hold the object's lock.
    pub(crate) fn fence_attach(
        &mut self,
        guest: GuestId,
        ctx: u64,
        handle: u64,
        usage: FenceUsage,
        now: Instant,
    ) -> Attempt {
        let c = self
            .contexts
            .get(&ctx)
            .filter(|c| c.guest == guest)
            .ok_or(Status::NoEnt)?;
        let object = self.object_of(guest, handle)?;
        if !c.held.contains(&object) {
            return Err(Status::Perm);
        }
        if c.waiting.is_some() {
            return Err(Status::Busy);
        }
        if self.guests[guest].fences.len() >= self.config.limits.max_fences as usize {
            return Err(Status::NoSpc);
        }
        let id = self.new_handle()?;
        let deadline = now.checked_add(self.config.fence_timeout).unwrap_or(now);
        self.fences.insert(
            id,
            Fence {
                guest,
                object,
                usage,
                deadline,
            },
        );
        self.guests[guest].fences.insert(id);
        if let Some(o) = self.objects.get_mut(&object) {
            o.fences.insert(id);
        }
        done(Ok(Reply::Fence(id)))
    }

    /// `FENCE_SIGNAL`: only by its creator.
    pub(crate) fn fence_signal(&mut self, guest: GuestId, id: u64, error: u32) -> Attempt {
        if error > MAX_ERRNO {
            return Err(Status::Inval);
        }
        match self.fences.get(&id) {
            Some(f) if f.guest == guest => {
                self.signal_fence(id, error, false);
                done(Ok(Reply::Empty))
            }
            // The device already signalled it with ETIMEDOUT: say so.
            _ if self.guests[guest].timed_out_fences.contains(&id) => Err(Status::TimedOut),
            _ => Err(Status::NoEnt),
        }
    }

    /// Signals a fence: it leaves the reservation and its waiters are looked at.
    pub(crate) fn signal_fence(&mut self, id: u64, error: u32, timed_out: bool) {
        let Some(f) = self.fences.remove(&id) else {
            return;
        };
        if error != 0 {
            log::debug!("fence {id} signalled with error {error}");
        }
        let g = &mut self.guests[f.guest];
        g.fences.remove(&id);
        if timed_out {
            log::warn!("fence {id} of guest {} timed out", f.guest);
            g.note_timed_out_fence(id);
        }
        if let Some(o) = self.objects.get_mut(&f.object) {
            o.fences.remove(&id);
        }
        self.mark_dirty(f.object);
    }

    /// `WAIT`: completes when every fence of usage <= `usage` is signalled.
    /// Like `dma_resv_wait_timeout`, it does not report the fences' errors.
    pub(crate) fn wait(
        &mut self,
        guest: GuestId,
        handle: u64,
        usage: FenceUsage,
        timeout_ns: u64,
    ) -> Attempt {
        let object = self.object_of(guest, handle)?;
        if self.fences_clear(object, usage) {
            return done(Ok(Reply::Empty));
        }
        if timeout_ns == 0 {
            return Err(Status::TimedOut);
        }
        wait(Step::Fences {
            object,
            usage,
            locked: false,
        })
    }
}
