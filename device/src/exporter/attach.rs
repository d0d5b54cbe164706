// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Attachments and mappings: the static/dynamic rules (contract section 7.3).
//!
//! - Importer and exporter agree on dynamic handling: nothing is mapped at
//!   attach time.
//! - They disagree: the mapping is made at attach time, BIDIRECTIONAL, and
//!   cached in the attachment, so a static side never has to take the
//!   reservation lock in a path that cannot; a dynamic exporter is pinned
//!   for a static importer for the attachment's life.
//! - A cached mapping serves a later `MAP` in its own direction or any
//!   direction when it is BIDIRECTIONAL; another direction is `EBUSY`.
//! - Cached or not, `MAP` and `UNMAP` issue the host sync a fresh map and
//!   unmap would have done (section 9), so caching never skips cache
//!   maintenance.

use std::collections::BTreeSet;

use virtio_dmabuf_protocol::{
    map_flags, AddressSpace, Direction, FenceUsage, MapReply, Reply, Segment, Status,
};

use super::{done, park_on, sync, Attempt, Exporter, GuestId, ObjId, PendingId, Step};

#[derive(Debug)]
pub(crate) struct Attachment {
    pub guest: GuestId,
    pub object: ObjId,
    pub dynamic_importer: bool,
    pub peer2peer: bool,
    /// The direction of the attachment's cached mapping, if it has one.
    pub cached: Option<Direction>,
    /// `PIN` count of a dynamic importer.
    pub pins: u32,
    /// A static importer of a dynamic exporter pins it for its whole life.
    pub lifetime_pin: bool,
    pub mappings: BTreeSet<u64>,
}

impl Attachment {
    pub fn is_pinned(&self) -> bool {
        self.lifetime_pin || self.pins > 0
    }
}

#[derive(Debug)]
pub(crate) struct Mapping {
    pub guest: GuestId,
    pub attachment: u64,
    pub object: ObjId,
    pub dir: Direction,
    /// A move or a revoke invalidated it: `UNMAP` ends it with no sync.
    pub invalid: bool,
    pub space: AddressSpace,
}

/// How a request reaches the reservation lock (section 7.3, locking rule).
enum LockUse {
    /// A dynamic importer's context holds it.
    Context,
    /// The device takes it around the call (ctx 0, or a static importer).
    Device,
}

impl Exporter {
    fn attachment_of(&self, guest: GuestId, id: u64) -> Result<&Attachment, Status> {
        self.attachments
            .get(&id)
            .filter(|a| a.guest == guest)
            .ok_or(Status::NoEnt)
    }

    /// The locking rule shared by MAP, UNMAP, PIN and UNPIN: a dynamic
    /// importer names a context that holds the lock (`EPERM`) or 0; a static
    /// importer names 0 (`EINVAL`). `must_hold`: false where the lock cannot
    /// be held at all (a mapping of a revoked object), the rest still applies.
    fn lock_use(
        &self,
        guest: GuestId,
        att: &Attachment,
        ctx: u64,
        must_hold: bool,
    ) -> Result<LockUse, Status> {
        if ctx == 0 {
            return Ok(LockUse::Device);
        }
        let c = self
            .contexts
            .get(&ctx)
            .filter(|c| c.guest == guest)
            .ok_or(Status::NoEnt)?;
        if !att.dynamic_importer {
            return Err(Status::Inval);
        }
        if must_hold && !c.held.contains(&att.object) {
            return Err(Status::Perm);
        }
        if c.parked.is_some() {
            return Err(Status::Busy);
        }
        Ok(LockUse::Context)
    }

    /// `ATTACH` (section 7.3).
    pub(crate) fn attach(
        &mut self,
        guest: GuestId,
        pending_id: PendingId,
        handle: u64,
        dynamic_importer: bool,
        peer2peer: bool,
    ) -> Attempt {
        let object = self.object_of(guest, handle)?;
        if self.guests[guest].attachments.len() >= self.config.limits.max_attachments as usize {
            return Err(Status::NoSpc);
        }
        // The attachment list changes under the reservation lock.
        if !self.lock_available(object, pending_id) {
            return park_on(Step::Lock(object));
        }
        let dynamic_exporter = self.objects.get(&object).is_some_and(|o| o.dynamic);
        let disagree = dynamic_importer != dynamic_exporter;
        if disagree {
            // The attach-time mapping is a fresh BIDIRECTIONAL mapping.
            self.host_sync(object, sync::for_device(Direction::Bidirectional))?;
        }
        let id = self.new_handle()?;
        self.attachments.insert(
            id,
            Attachment {
                guest,
                object,
                dynamic_importer,
                peer2peer,
                cached: disagree.then_some(Direction::Bidirectional),
                pins: 0,
                lifetime_pin: disagree && dynamic_exporter,
                mappings: BTreeSet::new(),
            },
        );
        self.guests[guest].attachments.insert(id);
        if let Some(o) = self.objects.get_mut(&object) {
            o.attachments.insert(id);
        }
        done(Ok(Reply::Attachment(id)))
    }

    /// `DETACH` (section 7.3).
    pub(crate) fn detach(&mut self, guest: GuestId, pending_id: PendingId, id: u64) -> Attempt {
        let att = self.attachment_of(guest, id)?;
        if !att.mappings.is_empty() {
            return Err(Status::Busy);
        }
        let object = att.object;
        let cached = att.cached;
        let revoked = self.objects.get(&object).is_none_or(|o| o.revoked);
        if !revoked && !self.lock_available(object, pending_id) {
            return park_on(Step::Lock(object));
        }
        // The cached mapping's end is a START sync: the host's fences of
        // its direction first (`host_fences.rs`).
        if let (false, Some(dir)) = (revoked, cached) {
            if let Some(step) = self.host_gate_sync(object, sync::for_cpu(dir), false)? {
                return park_on(step);
            }
        }
        self.drop_attachment(id, !revoked);
        done(Ok(Reply::Empty))
    }

    /// Removes an attachment with its cached mapping and pins. `sync`: the
    /// cached mapping's end gets its sync-for-cpu, as an unmap would.
    pub(crate) fn drop_attachment(&mut self, id: u64, sync: bool) {
        let Some(att) = self.attachments.remove(&id) else {
            return;
        };
        for m in &att.mappings {
            self.mappings.remove(m);
            self.guests[att.guest].mappings.remove(m);
        }
        if let (true, Some(dir)) = (sync, att.cached) {
            // The host error is logged by host_sync; a detach still completes.
            let _ = self.host_sync(att.object, sync::for_cpu(dir));
        }
        self.guests[att.guest].attachments.remove(&id);
        if let Some(o) = self.objects.get_mut(&att.object) {
            o.attachments.remove(&id);
        }
        self.maybe_destroy(att.object);
    }

    /// Ends a mapping without any host call.
    pub(crate) fn drop_mapping(&mut self, id: u64) {
        if let Some(m) = self.mappings.remove(&id) {
            self.guests[m.guest].mappings.remove(&id);
            if let Some(a) = self.attachments.get_mut(&m.attachment) {
                a.mappings.remove(&id);
            }
        }
    }

    /// The addresses an importer of `object` uses, and their space.
    fn entries(
        &self,
        guest: GuestId,
        object: ObjId,
        peer2peer: bool,
    ) -> (AddressSpace, Vec<Segment>) {
        let Some(o) = self.objects.get(&object) else {
            return (AddressSpace::Object, Vec::new());
        };
        if let Some(pages) = &o.guest_pages {
            return (AddressSpace::GuestPhys, pages.clone());
        }
        match self.guests[guest].shm.get(&object) {
            Some(p) if peer2peer => (
                AddressSpace::Shm,
                vec![Segment {
                    addr: p.offset,
                    len: o.size,
                }],
            ),
            _ => (
                AddressSpace::Object,
                vec![Segment {
                    addr: 0,
                    len: o.size,
                }],
            ),
        }
    }

    /// `MAP` (section 7.3).
    pub(crate) fn map(
        &mut self,
        guest: GuestId,
        pending_id: PendingId,
        id: u64,
        dir: Direction,
        max_entries: u32,
        ctx: u64,
    ) -> Attempt {
        let att = self.attachment_of(guest, id)?;
        let object = att.object;
        let o = self.objects.get(&object).ok_or(Status::NoEnt)?;
        if o.revoked {
            return Err(Status::NoEnt);
        }
        let lock_use = self.lock_use(guest, att, ctx, true)?;
        if let Some(cached) = att.cached {
            if cached != dir && cached != Direction::Bidirectional {
                return Err(Status::Busy);
            }
        }
        if self.guests[guest].mappings.len() >= self.config.limits.max_mappings as usize {
            return Err(Status::NoSpc);
        }
        let (space, entries) = self.entries(guest, object, att.peer2peer);
        let needed = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        if needed > max_entries {
            return done(Ok(Reply::MapOverflow { needed }));
        }
        let fresh_static = att.cached.is_none() && !att.dynamic_importer;
        if matches!(lock_use, LockUse::Device) {
            if !self.lock_available(object, pending_id) {
                return park_on(Step::Lock(object));
            }
            // A static importer's fresh mapping waits for the KERNEL fences
            // (moves and clears), holding the lock.
            if fresh_static && !self.fences_clear(object, FenceUsage::Kernel) {
                return park_on(Step::Fences {
                    object,
                    usage: FenceUsage::Kernel,
                    locked: true,
                });
            }
            // And the host's, on a kernel dma-buf (`host_fences.rs`).
            if fresh_static {
                if let Some(step) = self.host_gate(object, FenceUsage::Kernel, true)? {
                    return park_on(step);
                }
            }
        }
        let (cached, pinned, dynamic_exporter, cache_first) = {
            let o = self.objects.get(&object).ok_or(Status::NoEnt)?;
            let att = self.attachment_of(guest, id)?;
            (
                att.cached.is_some(),
                att.is_pinned(),
                o.dynamic,
                o.cache_mapping,
            )
        };
        // Cached or fresh, the host gets sync-for-device(dir) (section 9).
        self.host_sync(object, sync::for_device(dir))?;
        let becomes_cached = !cached && cache_first;
        if becomes_cached {
            if let Some(a) = self.attachments.get_mut(&id) {
                a.cached = Some(dir);
            }
        }
        let mapping = self.new_handle()?;
        let generation = self.objects.get(&object).map_or(0, |o| o.generation);
        self.mappings.insert(
            mapping,
            Mapping {
                guest,
                attachment: id,
                object,
                dir,
                invalid: false,
                space,
            },
        );
        self.guests[guest].mappings.insert(mapping);
        if let Some(a) = self.attachments.get_mut(&id) {
            a.mappings.insert(mapping);
        }
        let mut flags = 0;
        if cached || becomes_cached {
            flags |= map_flags::CACHED;
        }
        if pinned || !dynamic_exporter {
            flags |= map_flags::PINNED;
        }
        done(Ok(Reply::Map(MapReply {
            mapping,
            generation,
            map_flags: flags,
            space,
            entries,
        })))
    }

    /// `UNMAP` (section 7.3).
    pub(crate) fn unmap(
        &mut self,
        guest: GuestId,
        pending_id: PendingId,
        id: u64,
        ctx: u64,
    ) -> Attempt {
        let m = self
            .mappings
            .get(&id)
            .filter(|m| m.guest == guest)
            .ok_or(Status::NoEnt)?;
        let (object, dir, invalid) = (m.object, m.dir, m.invalid);
        let att = self.attachment_of(guest, m.attachment)?;
        // Moved or revoked: the mapping ends, no lock, no sync. The context
        // it names is still checked (ENOENT, EINVAL, EBUSY), but need not
        // hold the lock: a revoked object's lock cannot be held.
        let lock_use = self.lock_use(guest, att, ctx, !invalid)?;
        if invalid {
            self.drop_mapping(id);
            return done(Ok(Reply::Empty));
        }
        if matches!(lock_use, LockUse::Device) && !self.lock_available(object, pending_id) {
            return park_on(Step::Lock(object));
        }
        // The sync is a START: the host's fences of its direction first
        // (`host_fences.rs`).
        if let Some(step) = self.host_gate_sync(object, sync::for_cpu(dir), false)? {
            return park_on(step);
        }
        // Cached or not, sync-for-cpu(dir); a cached mapping stays in the
        // attachment, this guest's handle on it ends either way.
        let synced = self.host_sync(object, sync::for_cpu(dir));
        self.drop_mapping(id);
        synced?;
        done(Ok(Reply::Empty))
    }

    /// `PIN` and `UNPIN` (section 7.3).
    pub(crate) fn pin(
        &mut self,
        guest: GuestId,
        pending_id: PendingId,
        id: u64,
        ctx: u64,
        pin: bool,
    ) -> Attempt {
        let att = self.attachment_of(guest, id)?;
        let object = att.object;
        if ctx != 0 && self.contexts.get(&ctx).is_none_or(|c| c.guest != guest) {
            return Err(Status::NoEnt);
        }
        let Some(o) = self.objects.get(&object) else {
            return Err(Status::NoEnt);
        };
        // A revoked object's handles fail with ENOENT, a handle check that
        // comes before the kind check (section 4).
        if o.revoked && pin {
            return Err(Status::NoEnt);
        }
        if !att.dynamic_importer {
            return Err(Status::Inval);
        }
        // On a revoked object nothing can move any more; an UNPIN still lets
        // the driver unwind, without the lock but not past a waiting context.
        let (revoked, dynamic_exporter) = (o.revoked, o.dynamic);
        let lock_use = self.lock_use(guest, att, ctx, !revoked)?;
        if revoked {
            return done(Ok(Reply::Empty));
        }
        if !dynamic_exporter {
            // A static exporter never moves: both are no-ops that never fail.
            return done(Ok(Reply::Empty));
        }
        if !pin && att.pins == 0 {
            return Err(Status::Inval);
        }
        if matches!(lock_use, LockUse::Device) && !self.lock_available(object, pending_id) {
            return park_on(Step::Lock(object));
        }
        if let Some(a) = self.attachments.get_mut(&id) {
            if pin {
                a.pins = a.pins.checked_add(1).ok_or(Status::NoSpc)?;
            } else {
                a.pins -= 1;
            }
        }
        done(Ok(Reply::Empty))
    }

    /// True when something pins the object (no move allowed).
    pub(crate) fn is_pinned(&self, object: ObjId) -> bool {
        self.objects.get(&object).is_some_and(|o| {
            o.attachments
                .iter()
                .any(|a| self.attachments.get(a).is_some_and(Attachment::is_pinned))
        })
    }
}
