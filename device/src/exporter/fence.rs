// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fences on an object's reservation and `WAIT` (contract section 7.6).
//!
//! A fence is pending until its creator signals it, the device times it out
//! (`--fence-timeout`, as a GPU scheduler times out a hung job) or its guest
//! goes away. Signalled fences leave the reservation at once: waiting is
//! "no pending fence of usage <= u".

use std::time::Instant;

use virtio_dmabuf_protocol::{FenceUsage, Reply, Status};

use super::{done, park_on, Attempt, Exporter, GuestId, ObjId, Step};
use crate::provider::InstalledFence;

#[derive(Debug)]
pub(crate) struct Fence {
    pub guest: GuestId,
    pub object: ObjId,
    pub usage: FenceUsage,
    pub deadline: Instant,
    /// Its counterpart in the host dma-buf's reservation, if installed.
    pub host: Option<InstalledFence>,
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

    /// `FENCE_ATTACH`: the context must hold the object's lock. On an
    /// object backed by a kernel dma-buf the fence is also installed in the
    /// host's reservation when the host has a fence source; `host` (the
    /// HOST flag) makes that a requirement: `EOPNOTSUPP` where it cannot
    /// be done (checked after the handles, before the lock, as `MAP_SHM`
    /// checks its capability), `EIO` when the host refuses.
    pub(crate) fn fence_attach(
        &mut self,
        guest: GuestId,
        ctx: u64,
        handle: u64,
        usage: FenceUsage,
        host: bool,
        now: Instant,
    ) -> Attempt {
        let c = self
            .contexts
            .get(&ctx)
            .filter(|c| c.guest == guest)
            .ok_or(Status::NoEnt)?;
        let object = self.object_of(guest, handle)?;
        if host && !self.host_fence_possible(object) {
            return Err(Status::NotSupported);
        }
        if !c.held.contains(&object) {
            return Err(Status::Perm);
        }
        if c.parked.is_some() {
            return Err(Status::Busy);
        }
        if self.guests[guest].fences.len() >= self.config.limits.max_fences as usize {
            return Err(Status::NoSpc);
        }
        let id = self.new_handle()?;
        let deadline = now.checked_add(self.config.fence_timeout).unwrap_or(now);
        let installed = if self.host_fence_possible(object) {
            match self.host_install(object, usage) {
                Ok(f) => f,
                // Required: the guest hears the host refused.
                Err(status) if host => return Err(status),
                // Best effort: the fence still works among guests.
                Err(_) => None,
            }
        } else {
            None
        };
        self.fences.insert(
            id,
            Fence {
                guest,
                object,
                usage,
                deadline,
                host: installed,
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

    /// Signals a fence: it leaves the reservation and its waiters are
    /// looked at; its host counterpart is signalled first, so nothing the
    /// waiters do next meets it in the kernel.
    pub(crate) fn signal_fence(&mut self, id: u64, error: u32, timed_out: bool) {
        let Some(mut f) = self.fences.remove(&id) else {
            return;
        };
        if let Some(installed) = f.host.take() {
            self.host_signal(f.object, installed, error);
        }
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
        if !self.fences_clear(object, usage) {
            if timeout_ns == 0 {
                return Err(Status::TimedOut);
            }
            return park_on(Step::Fences {
                object,
                usage,
                locked: false,
            });
        }
        // Then the host's fences of the same usage on a kernel dma-buf.
        if timeout_ns == 0 {
            if self.host_busy(object, usage)? {
                return Err(Status::TimedOut);
            }
            return done(Ok(Reply::Empty));
        }
        match self.host_gate(object, usage, false)? {
            Some(step) => park_on(step),
            None => done(Ok(Reply::Empty)),
        }
    }
}
