// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guests: what each holds, its quotas, `GET_INFO`, events and the reset
//! that releases everything (contract sections 6 and 7.1).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use virtio_dmabuf_protocol::{caps, Event, Info, Reply, Status, PROTOCOL_VERSION};

use super::events::EventQueue;
use super::{Exporter, Frontend, GuestId, NoFrontend, ObjId, Owner};
use crate::provider::SlabPool;

/// What the front-end of one guest negotiated: the capabilities that are live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestCaps {
    /// Size of shared memory region 0; 0 when the front-end has no SHMEM.
    pub shm_size: u64,
    /// The front-end acked `SHARED_OBJECT`.
    pub shared_objects: bool,
    /// Guest RAM can back objects (the front-end shared its memory table).
    pub guest_pages: bool,
}

/// One object handle of a guest.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held {
    pub handle: u64,
    pub refs: u32,
}

/// One object placed in the guest's shared memory window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShmPlacement {
    pub offset: u64,
    pub len: u64,
    pub writable: bool,
    /// `MAP_SHM` calls not yet undone by `UNMAP_SHM`.
    pub uses: u32,
}

/// How many device-timed-out fences a guest is told about on a late signal.
const TIMED_OUT_FENCES_KEPT: usize = 1024;

#[derive(Debug)]
pub(crate) struct Guest {
    pub connected: bool,
    pub caps: GuestCaps,
    pub frontend: Box<dyn Frontend>,
    /// Object handle -> object.
    pub handles: BTreeMap<u64, ObjId>,
    /// Object -> this guest's handle for it.
    pub held: BTreeMap<ObjId, Held>,
    pub attachments: BTreeSet<u64>,
    pub mappings: BTreeSet<u64>,
    pub contexts: BTreeSet<u64>,
    /// Unsignalled fences this guest created.
    pub fences: BTreeSet<u64>,
    /// Fences the device signalled with ETIMEDOUT, for a late FENCE_SIGNAL.
    pub timed_out_fences: VecDeque<u64>,
    /// How many of its requests are parked (quota `max_waiting`, 7.1).
    pub parked: u32,
    /// Bytes of host memory this guest's objects use.
    pub bytes: u64,
    /// Objects whose fds are charged to this guest (`objects.rs`, "fds").
    pub fd_objects: u32,
    /// The slabs its small host-placed objects are extents of (memfd).
    pub slabs: Option<SlabPool>,
    /// Objects in this guest's shared memory window.
    pub shm: BTreeMap<ObjId, ShmPlacement>,
    pub events: EventQueue,
}

impl Guest {
    pub fn new(event_limit: usize, slabs: Option<SlabPool>) -> Self {
        Guest {
            connected: false,
            caps: GuestCaps::default(),
            frontend: Box::new(NoFrontend),
            handles: BTreeMap::new(),
            held: BTreeMap::new(),
            attachments: BTreeSet::new(),
            mappings: BTreeSet::new(),
            contexts: BTreeSet::new(),
            fences: BTreeSet::new(),
            timed_out_fences: VecDeque::new(),
            parked: 0,
            bytes: 0,
            fd_objects: 0,
            slabs,
            shm: BTreeMap::new(),
            events: EventQueue::new(event_limit),
        }
    }

    pub fn note_timed_out_fence(&mut self, fence: u64) {
        if self.timed_out_fences.len() == TIMED_OUT_FENCES_KEPT {
            self.timed_out_fences.pop_front();
        }
        self.timed_out_fences.push_back(fence);
    }

    /// First-fit, page-aligned placement of `len` bytes in a window of `size`.
    pub fn shm_find_room(&self, len: u64, size: u64) -> Option<u64> {
        let mut taken: Vec<(u64, u64)> = self.shm.values().map(|p| (p.offset, p.len)).collect();
        taken.sort_unstable();
        let mut cursor = 0u64;
        for (offset, l) in taken {
            if offset.checked_sub(cursor).is_some_and(|gap| gap >= len) {
                return Some(cursor);
            }
            cursor = cursor.max(offset.saturating_add(l));
        }
        (size.checked_sub(cursor)? >= len).then_some(cursor)
    }
}

impl Exporter {
    /// A front-end connected on the socket of `guest`.
    pub fn connect(&mut self, guest: GuestId, caps: GuestCaps, frontend: Box<dyn Frontend>) {
        if let Some(g) = self.guests.get_mut(guest) {
            g.connected = true;
            g.caps = caps;
            g.frontend = frontend;
        }
    }

    /// The capabilities changed (features acked, memory table set).
    pub fn set_caps(&mut self, guest: GuestId, caps: GuestCaps) {
        if let Some(g) = self.guests.get_mut(guest) {
            g.caps = caps;
        }
    }

    /// Replaces the front-end handle of a guest (the back-end channel arrived).
    pub fn set_frontend(&mut self, guest: GuestId, frontend: Box<dyn Frontend>) {
        if let Some(g) = self.guests.get_mut(guest) {
            g.frontend = frontend;
        }
    }

    /// The front-end went away: everything the guest held is released.
    pub fn disconnect(&mut self, guest: GuestId, now: Instant) {
        self.reset_guest(guest);
        self.pump(now);
        if let Some(g) = self.guests.get_mut(guest) {
            g.connected = false;
            g.caps = GuestCaps::default();
            g.frontend = Box::new(NoFrontend);
        }
    }

    /// Number of guests (sockets).
    pub fn num_guests(&self) -> usize {
        self.guests.len()
    }

    /// `GET_INFO` (section 7.1): this guest's live capabilities and quotas.
    pub(crate) fn get_info(&self, guest: GuestId) -> Reply {
        let g = &self.guests[guest];
        let l = &self.config.limits;
        let mut c = caps::TRANSFER | caps::FENCES;
        if g.caps.shm_size > 0 {
            c |= caps::HOST_SHM;
        }
        if g.caps.guest_pages {
            c |= caps::GUEST_PAGES;
        }
        if g.caps.shared_objects {
            c |= caps::SHARED_OBJECTS;
        }
        if self.host_source.is_some() {
            c |= caps::HOST_FENCES;
        }
        if self.provider.makes_real_dmabufs() {
            c |= caps::REAL_DMABUF;
        }
        if self.config.host_exports {
            c |= caps::HOST_EXPORTS;
        }
        Reply::Info(Info {
            version: PROTOCOL_VERSION,
            caps: c,
            shm_size: g.caps.shm_size,
            max_object_size: self.provider.max_object_size(),
            page_size: u32::try_from(self.config.page_size).unwrap_or(u32::MAX),
            provider: self.provider.kind() as u32,
            num_queues: self.config.num_queues,
            max_segments: l.max_segments,
            // Without slabs every object holds fds: the fd quota is the
            // object quota too.
            max_objects: match g.slabs {
                Some(_) => l.max_objects,
                None => l.max_objects.min(l.max_fd_objects),
            },
            max_attachments: l.max_attachments,
            max_contexts: l.max_contexts,
            max_fences: l.max_fences,
            max_waiting: l.max_waiting,
            max_pending_events: l.max_pending_events,
            max_bytes: l.max_bytes,
        })
    }

    /// The next event for the driver's posted buffer, if one is pending.
    pub fn pop_event(&mut self, guest: GuestId) -> Option<Event> {
        self.guests.get_mut(guest)?.events.pop()
    }

    /// True when `guest` has events waiting for buffers.
    pub fn has_events(&self, guest: GuestId) -> bool {
        self.guests.get(guest).is_some_and(|g| !g.events.is_empty())
    }

    pub(crate) fn push_event(&mut self, guest: GuestId, event: Event) {
        if let Some(g) = self.guests.get_mut(guest) {
            g.events.push(event);
        }
    }

    /// The guest's handle for `object`, 0 if it holds none.
    pub(crate) fn handle_of(&self, guest: GuestId, object: ObjId) -> u64 {
        self.guests[guest].held.get(&object).map_or(0, |h| h.handle)
    }

    /// Releases everything `guest` holds (device reset, `RESET_SESSION`,
    /// disconnect), in an order that leaves nothing behind: waiting requests
    /// first (they may hold a lock), then fences (others may wait on them),
    /// mappings, attachments (their pins), locks and contexts, window
    /// placements, and last the handles, which lets objects die.
    pub(crate) fn reset_guest(&mut self, guest: GuestId) {
        if guest >= self.guests.len() {
            return;
        }
        self.cancel_where(|p| matches!(p.owner, Owner::Guest { guest: g, .. } if g == guest));

        let fences: Vec<u64> = self.guests[guest].fences.iter().copied().collect();
        for f in fences {
            self.signal_fence(f, Status::Canceled as u32, false);
        }

        let mappings: Vec<u64> = self.guests[guest].mappings.iter().copied().collect();
        for m in mappings {
            self.drop_mapping(m);
        }

        let attachments: Vec<u64> = self.guests[guest].attachments.iter().copied().collect();
        for a in attachments {
            self.drop_attachment(a, false);
        }

        let contexts: Vec<u64> = self.guests[guest].contexts.iter().copied().collect();
        for c in contexts {
            self.drop_context(c);
        }

        let placed: Vec<ObjId> = self.guests[guest].shm.keys().copied().collect();
        for o in placed {
            self.shm_remove(guest, o);
        }

        let held: Vec<ObjId> = self.guests[guest].held.keys().copied().collect();
        for o in held {
            self.drop_handle(guest, o);
        }

        let g = &mut self.guests[guest];
        if let Some(slabs) = &g.slabs {
            slabs.trim();
        }
        g.events.clear();
        g.timed_out_fences.clear();
        g.parked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shm_window_is_first_fit() {
        let mut g = Guest::new(4, None);
        let p = |offset, len| ShmPlacement {
            offset,
            len,
            writable: false,
            uses: 1,
        };
        assert_eq!(g.shm_find_room(4096, 16384), Some(0));
        g.shm.insert(1, p(0, 4096));
        g.shm.insert(2, p(8192, 4096));
        assert_eq!(g.shm_find_room(4096, 16384), Some(4096));
        assert_eq!(g.shm_find_room(8192, 16384), None);
        g.shm.remove(&1);
        assert_eq!(g.shm_find_room(8192, 16384), Some(0));
        assert_eq!(g.shm_find_room(12288, 16384), None);
    }
}
