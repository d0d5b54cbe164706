// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Objects: CREATE, OPEN, RELEASE, EXPORT_UUID and the lifetime of an
//! exported buffer (contract sections 6 and 7.2).
//!
//! # fds
//!
//! A host-placed memfd object of at most `SLAB_MAX_EXTENT` bytes is an
//! extent of one of its guest's slabs (`provider/slab.rs`) and holds no
//! open file, so a guest's object count is bounded by `max_objects`, not by
//! the open-file limit. Every other object's backing has fds of its own
//! (larger memfds, udmabuf and dma-heap buffers, guest pages wrapped by
//! udmabuf, shared objects looked up through the front-end), charged to
//! the guest whose request made it, up to `max_fd_objects` per guest
//! (`ENOSPC`); the daemon sizes that quota so that every guest at it fits
//! in the open-file limit (`daemon.rs`, `fd_budget`). A charged object is
//! held by the guest it is charged to, so the charge goes when the object
//! dies or is revoked. Host exports are the host's and charged to nobody.
//!
//! An fd is never handed to anyone for an extent: the slab's would expose
//! the other objects in it. Whatever hands an object's fd out (`MAP_SHM`,
//! `EXPORT_UUID`) first *promotes* it ([`Exporter::promote`]) to a memfd
//! of its own, charged like any other.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;

use virtio_dmabuf_protocol::{obj_flags, ObjectReply, Reply, Segment, Status};

use super::resv::WwMutex;
use super::session::Held;
use super::status::{provider_status, ProviderCall};
use super::{done, Attempt, Exporter, GuestId, ObjId, Owner};
use crate::provider::{self, Backing};

/// A host registration of an object under a name (section 10).
#[derive(Debug, Clone)]
pub(crate) struct Export {
    pub name: String,
    /// Guests allowed to `OPEN` it; `None`: every guest.
    pub guests: Option<BTreeSet<GuestId>>,
}

/// One exported buffer.
#[derive(Debug)]
pub(crate) struct Object {
    pub uuid: [u8; 16],
    pub size: u64,
    /// `None` once revoked: the host memory is given back at once.
    pub backing: Option<Box<dyn Backing>>,
    /// A dynamic exporter: the host may move the backing while unpinned.
    pub dynamic: bool,
    /// Guest RAM pages back it (always a static exporter).
    pub guest_pages: Option<Vec<Segment>>,
    /// The exporter caches the first mapping of each attachment.
    pub cache_mapping: bool,
    pub read_only: bool,
    /// Where the backing came from, for `ctl list`.
    pub provider_name: &'static str,
    pub export: Option<Export>,
    /// The guest whose `CREATE` made it, charged for its bytes.
    pub creator: Option<GuestId>,
    /// The guest charged for the backing's fds (see "fds" above); `None`
    /// for a backing without fds of its own and for host exports.
    pub fd_charge: Option<GuestId>,
    pub generation: u64,
    pub revoked: bool,
    pub resv: WwMutex,
    /// Unsignalled fences on the reservation.
    pub fences: BTreeSet<u64>,
    pub attachments: BTreeSet<u64>,
    /// Guests that hold a handle.
    pub holders: BTreeSet<GuestId>,
    /// Guests whose front-end got `SHARED_OBJECT_ADD` for it.
    pub published: BTreeSet<GuestId>,
}

impl Object {
    /// `MAP_SHM` may place it in the window (section 7.5): host-placed,
    /// over a buffer whose size nobody can shrink. A revoked object says
    /// yes here and is refused by the checks made of every revoked object.
    pub fn window_mappable(&self) -> bool {
        self.guest_pages.is_none() && self.backing.as_ref().is_none_or(|b| b.size_is_fixed())
    }

    pub fn new(
        size: u64,
        backing: Box<dyn Backing>,
        dynamic: bool,
        provider_name: &'static str,
    ) -> Object {
        Object {
            uuid: *uuid::Uuid::new_v4().as_bytes(),
            size,
            backing: Some(backing),
            dynamic,
            guest_pages: None,
            cache_mapping: false,
            read_only: false,
            provider_name,
            export: None,
            creator: None,
            fd_charge: None,
            generation: 0,
            revoked: false,
            resv: WwMutex::default(),
            fences: BTreeSet::new(),
            attachments: BTreeSet::new(),
            holders: BTreeSet::new(),
            published: BTreeSet::new(),
        }
    }

    pub fn is_real_dmabuf(&self) -> bool {
        self.backing.as_ref().is_some_and(|b| b.is_real_dmabuf())
    }

    /// An extent of a slab: host memory without an fd of its own.
    pub fn sub_allocated(&self) -> bool {
        self.guest_pages.is_none() && self.backing.as_ref().is_some_and(|b| b.fd().is_none())
    }

    fn visible_to(&self, guest: GuestId) -> bool {
        !self.revoked
            && self
                .export
                .as_ref()
                .is_some_and(|e| e.guests.as_ref().is_none_or(|g| g.contains(&guest)))
    }
}

impl Exporter {
    /// The object a guest handle names; `ENOENT` for unknown and revoked handles.
    pub(crate) fn object_of(&self, guest: GuestId, handle: u64) -> Result<ObjId, Status> {
        let id = self.object_of_any(guest, handle)?;
        match self.objects.get(&id) {
            Some(o) if !o.revoked => Ok(id),
            _ => Err(Status::NoEnt),
        }
    }

    /// Like [`Self::object_of`], revoked objects included.
    pub(crate) fn object_of_any(&self, guest: GuestId, handle: u64) -> Result<ObjId, Status> {
        self.guests[guest]
            .handles
            .get(&handle)
            .copied()
            .ok_or(Status::NoEnt)
    }

    pub(crate) fn object_reply(&self, guest: GuestId, id: ObjId) -> Reply {
        let Some(o) = self.objects.get(&id) else {
            return Reply::Empty;
        };
        let mut flags = 0;
        if o.dynamic {
            flags |= obj_flags::DYNAMIC;
        }
        if o.guest_pages.is_some() {
            flags |= obj_flags::GUEST_PAGES;
        }
        if o.cache_mapping {
            flags |= obj_flags::CACHE_MAPPING;
        }
        if !o.read_only {
            flags |= obj_flags::WRITABLE;
        }
        if o.is_real_dmabuf() {
            flags |= obj_flags::REAL_DMABUF;
        }
        Reply::Object(ObjectReply {
            object: self.handle_of(guest, id),
            uuid: o.uuid,
            size: o.size,
            obj_flags: flags,
        })
    }

    /// Gives `guest` a handle on `id` (or one more reference to the handle it has).
    fn add_handle(&mut self, guest: GuestId, id: ObjId) -> Result<u64, Status> {
        if let Some(h) = self.guests[guest].held.get_mut(&id) {
            h.refs = h.refs.checked_add(1).ok_or(Status::NoSpc)?;
            return Ok(h.handle);
        }
        if self.guests[guest].held.len() >= self.config.limits.max_objects as usize {
            return Err(Status::NoSpc);
        }
        let handle = self.new_handle()?;
        let g = &mut self.guests[guest];
        g.held.insert(id, Held { handle, refs: 1 });
        g.handles.insert(handle, id);
        if let Some(o) = self.objects.get_mut(&id) {
            o.holders.insert(guest);
        }
        Ok(handle)
    }

    /// Inserts a new object under a fresh id.
    pub(crate) fn insert_object(&mut self, object: Object) -> Result<ObjId, Status> {
        let id = self.new_handle()?;
        self.objects.insert(id, object);
        Ok(id)
    }

    /// `CREATE` (section 7.2). Flag combinations were refused by the parser.
    pub(crate) fn create(
        &mut self,
        guest: GuestId,
        size: u64,
        dynamic: bool,
        cache_mapping: bool,
        guest_pages: Option<&[Segment]>,
    ) -> Attempt {
        let page = self.config.page_size;
        let limits = self.config.limits;
        if size == 0 || !size.is_multiple_of(page) {
            return Err(Status::Inval);
        }
        if let Some(entries) = guest_pages {
            if entries.is_empty() || entries.len() > limits.max_segments as usize {
                return Err(Status::Inval);
            }
            let mut sum = 0u64;
            for e in entries {
                if e.len == 0 || e.addr % page != 0 || e.len % page != 0 {
                    return Err(Status::Inval);
                }
                sum = sum.checked_add(e.len).ok_or(Status::Inval)?;
            }
            if sum != size {
                return Err(Status::Inval);
            }
            if !self.guests[guest].caps.guest_pages {
                return Err(Status::NotSupported);
            }
        } else if size > self.provider.max_object_size() {
            return Err(Status::Inval);
        }
        let g = &self.guests[guest];
        if g.held.len() >= limits.max_objects as usize {
            return Err(Status::NoSpc);
        }
        let host_bytes = if guest_pages.is_some() { 0 } else { size };
        if g.bytes
            .checked_add(host_bytes)
            .is_none_or(|b| b > limits.max_bytes)
        {
            return Err(Status::NoSpc);
        }
        let (backing, provider_name) = match guest_pages {
            Some(entries) => {
                let backing = self.guests[guest].frontend.guest_pages(entries)?;
                if backing.fd().is_some() {
                    self.fd_room(guest)?;
                }
                (backing, "guest")
            }
            None => (
                self.allocate_for(guest, size, ProviderCall::Create)?,
                provider_name(self.provider.kind()),
            ),
        };
        let mut object = Object::new(size, backing, dynamic, provider_name);
        object.guest_pages = guest_pages.map(<[Segment]>::to_vec);
        object.cache_mapping = cache_mapping;
        object.creator = Some(guest);
        let id = self.insert_object(object)?;
        if let Err(status) = self.add_handle(guest, id) {
            self.objects.remove(&id);
            return Err(status);
        }
        self.guests[guest].bytes += host_bytes;
        self.charge_fds(guest, id);
        done(Ok(self.object_reply(guest, id)))
    }

    /// Host memory for `size` bytes of `guest`'s: an extent of its slabs
    /// when the size is small and a slab has room, else a buffer with fds
    /// of its own, within its fd quota (`ENOSPC`). `call` says what for.
    pub(crate) fn allocate_for(
        &self,
        guest: GuestId,
        size: u64,
        call: ProviderCall,
    ) -> Result<Box<dyn Backing>, Status> {
        let failed = |e: &provider::ProviderError| {
            let doing = format_args!("allocating {size} bytes for guest {guest}");
            provider_status(call, doing, e)
        };
        if let Some(slabs) = &self.guests[guest].slabs {
            if let Some(extent) = slabs.allocate(size).map_err(|e| failed(&e))? {
                return Ok(Box::new(extent));
            }
        }
        self.fd_room(guest)?;
        self.provider.allocate(size).map_err(|e| failed(&e))
    }

    /// `ENOSPC` when `guest` has all the objects with fds of their own its
    /// quota allows (`max_fd_objects`).
    pub(crate) fn fd_room(&self, guest: GuestId) -> Result<(), Status> {
        if self.guests[guest].fd_objects >= self.config.limits.max_fd_objects {
            return Err(Status::NoSpc);
        }
        Ok(())
    }

    /// Charges the fds of `id`'s backing to `guest`, when it has any and
    /// nobody is charged yet.
    pub(crate) fn charge_fds(&mut self, guest: GuestId, id: ObjId) {
        let Some(o) = self.objects.get_mut(&id) else {
            return;
        };
        if o.fd_charge.is_some() || o.backing.as_ref().is_none_or(|b| b.fd().is_none()) {
            return;
        }
        o.fd_charge = Some(guest);
        if let Some(g) = self.guests.get_mut(guest) {
            g.fd_objects += 1;
        }
    }

    /// Gives back the charge of a backing that went (revoked).
    pub(crate) fn uncharge_fds(&mut self, id: ObjId) {
        let charged = self.objects.get_mut(&id).and_then(|o| o.fd_charge.take());
        if let Some(g) = charged.and_then(|g| self.guests.get_mut(g)) {
            g.fd_objects = g.fd_objects.saturating_sub(1);
        }
    }

    /// Gives an object an fd of its own before someone is handed it (see
    /// "fds" above): an extent's bytes are copied into a new memfd, which
    /// replaces it, and the extent goes back to its slab zeroed. The new fds
    /// are charged to `guest` (`ENOSPC` when its quota is full, `ENOMEM`
    /// when the host has no memory, `ENOSPC` too when the host is out of
    /// open files, as for `CREATE`). The guest sees nothing change: not the
    /// handle, the generation or the mappings, whose addresses are offsets
    /// in the object or the window. An object with an fd stays as it is.
    pub(crate) fn promote(&mut self, guest: GuestId, id: ObjId) -> Result<(), Status> {
        let o = self.objects.get(&id).ok_or(Status::NoEnt)?;
        let old = o.backing.as_deref().ok_or(Status::NoEnt)?;
        if old.fd().is_some() {
            return Ok(());
        }
        if o.guest_pages.is_some() {
            return Err(Status::NotSupported);
        }
        self.fd_room(guest)?;
        let size = o.size;
        let doing = format_args!("promoting object {id} of guest {guest} to a memfd of its own");
        let new = self
            .provider
            .allocate(size)
            .map_err(|e| provider_status(ProviderCall::Promote, doing, &e))?;
        super::host::copy_bytes(old, new.as_ref(), size)
            .map_err(|e| provider_status(ProviderCall::Access, doing, &e))?;
        if let Some(o) = self.objects.get_mut(&id) {
            o.backing = Some(new);
        }
        self.charge_fds(guest, id);
        log::debug!("guest {guest}: object {id} promoted to a memfd of its own");
        Ok(())
    }

    /// `OPEN` (section 7.2): a host export by name, or an object by UUID.
    pub(crate) fn open(&mut self, guest: GuestId, uuid: Option<&[u8; 16]>, name: &[u8]) -> Attempt {
        let id = match uuid {
            Some(uuid) => match self.find_by_uuid(guest, uuid) {
                Some(id) => id,
                None => self.import_shared_object(guest, uuid)?,
            },
            None => {
                let name = std::str::from_utf8(name).map_err(|_| Status::NoEnt)?;
                let id = *self.exports.get(name).ok_or(Status::NoEnt)?;
                match self.objects.get(&id) {
                    Some(o) if o.visible_to(guest) => id,
                    _ => return Err(Status::NoEnt),
                }
            }
        };
        let fresh = !self.guests[guest].held.contains_key(&id);
        match self.add_handle(guest, id) {
            Ok(_) => done(Ok(self.object_reply(guest, id))),
            Err(status) => {
                if fresh {
                    self.maybe_destroy(id);
                }
                Err(status)
            }
        }
    }

    /// UUIDs this back-end knows: objects the guest holds or published and
    /// host exports it may see. Never another guest's objects.
    fn find_by_uuid(&self, guest: GuestId, uuid: &[u8; 16]) -> Option<ObjId> {
        self.objects.iter().find_map(|(id, o)| {
            let mine = o.holders.contains(&guest) || o.published.contains(&guest);
            (o.uuid == *uuid && !o.revoked && (mine || o.visible_to(guest))).then_some(*id)
        })
    }

    /// True when `OPEN` BY_UUID of `uuid` is resolved here for `guest` (an
    /// object it holds or published, or a host export it may see), so no
    /// `SHARED_OBJECT_LOOKUP` goes to the front-end. The daemon asks this
    /// before it looks a UUID up, which it does without the model's lock.
    pub fn resolves_uuid_locally(&self, guest: GuestId, uuid: &[u8; 16]) -> bool {
        guest < self.guests.len() && self.find_by_uuid(guest, uuid).is_some()
    }

    /// The front-end refused the `SHARED_OBJECT_ADD` of an `EXPORT_UUID` by
    /// `guest` (its answer arrives after the model replied): forget that
    /// publication, so no `REMOVE` follows and a retry sends `ADD` again.
    pub fn unpublish(&mut self, guest: GuestId, uuid: &[u8; 16]) {
        for o in self.objects.values_mut().filter(|o| o.uuid == *uuid) {
            o.published.remove(&guest);
        }
    }

    /// `OPEN` BY_UUID of an object another device of the VM published.
    fn import_shared_object(&mut self, guest: GuestId, uuid: &[u8; 16]) -> Result<ObjId, Status> {
        if !self.guests[guest].caps.shared_objects {
            return Err(Status::NotSupported);
        }
        self.fd_room(guest)?;
        let fd: OwnedFd = self.guests[guest].frontend.shared_object_lookup(uuid)?;
        if !provider::is_dmabuf_fd(&fd) && !self.config.allow_memfd_shared_objects {
            log::warn!(
                "shared object {} is not a dma-buf",
                uuid::Uuid::from_bytes(*uuid)
            );
            return Err(Status::Io);
        }
        let backing = provider::import_host_fd(fd).map_err(|e| {
            let doing = format_args!("shared object {}", uuid::Uuid::from_bytes(*uuid));
            provider_status(ProviderCall::SharedObject, doing, &e)
        })?;
        let size = backing.size();
        if size % self.config.page_size != 0 {
            return Err(Status::Io);
        }
        let mut object = Object::new(size, backing, false, "shared-object");
        object.uuid = *uuid;
        let id = self.insert_object(object)?;
        self.charge_fds(guest, id);
        Ok(id)
    }

    /// `RELEASE` (section 7.2).
    pub(crate) fn release(&mut self, guest: GuestId, handle: u64) -> Attempt {
        let id = self.object_of_any(guest, handle)?;
        let revoked = self.objects.get(&id).is_none_or(|o| o.revoked);
        let refs = self.guests[guest].held.get(&id).map_or(0, |h| h.refs);
        if refs > 1 {
            if let Some(h) = self.guests[guest].held.get_mut(&id) {
                h.refs -= 1;
            }
            return done(Ok(Reply::Empty));
        }
        if revoked {
            // Whatever the guest still had on a revoked object goes with the handle.
            self.drop_guest_state_on(guest, id);
        } else if self.in_use_by(guest, id) {
            return Err(Status::Busy);
        }
        self.drop_handle(guest, id);
        done(Ok(Reply::Empty))
    }

    /// True while `guest` has attachments, a window placement, a lock, an
    /// unsignalled fence or a waiting request on the object.
    fn in_use_by(&self, guest: GuestId, id: ObjId) -> bool {
        let Some(o) = self.objects.get(&id) else {
            return false;
        };
        let g = &self.guests[guest];
        let attached = o
            .attachments
            .iter()
            .any(|a| self.attachments.get(a).is_some_and(|a| a.guest == guest));
        let locked = g
            .contexts
            .iter()
            .any(|c| self.contexts.get(c).is_some_and(|c| c.held.contains(&id)));
        let fenced = o
            .fences
            .iter()
            .any(|f| self.fences.get(f).is_some_and(|f| f.guest == guest));
        let waiting = self.pending.values().any(|p| {
            p.object == id && matches!(p.owner, Owner::Guest { guest: pg, .. } if pg == guest)
        });
        attached || g.shm.contains_key(&id) || locked || fenced || waiting
    }

    /// Drops what a guest still has on a revoked object: mappings,
    /// attachments, fences; no host calls (the backing is gone).
    fn drop_guest_state_on(&mut self, guest: GuestId, id: ObjId) {
        let atts: Vec<u64> = self
            .attachments
            .iter()
            .filter(|(_, a)| a.guest == guest && a.object == id)
            .map(|(k, _)| *k)
            .collect();
        for a in atts {
            let maps: Vec<u64> = self
                .attachments
                .get(&a)
                .map_or(Vec::new(), |a| a.mappings.iter().copied().collect());
            for m in maps {
                self.drop_mapping(m);
            }
            self.drop_attachment(a, false);
        }
        self.shm_remove(guest, id);
    }

    /// Removes the guest's handle on `id` whatever its reference count.
    pub(crate) fn drop_handle(&mut self, guest: GuestId, id: ObjId) {
        let g = &mut self.guests[guest];
        if let Some(h) = g.held.remove(&id) {
            g.handles.remove(&h.handle);
        }
        if let Some(o) = self.objects.get_mut(&id) {
            o.holders.remove(&guest);
        }
        self.maybe_destroy(id);
    }

    /// An object dies when no guest holds it and no live host export keeps it.
    pub(crate) fn maybe_destroy(&mut self, id: ObjId) {
        let Some(o) = self.objects.get(&id) else {
            return;
        };
        let kept_by_export = o.export.is_some() && !o.revoked;
        if !o.holders.is_empty() || kept_by_export || !o.attachments.is_empty() {
            return;
        }
        // Nothing may keep waiting on a dead object: a parked eviction (no
        // guest request can wait here, its handle would keep the object)
        // ends, and with it the lock it may hold.
        self.cancel_where(|p| p.object == id);
        let Some(o) = self.objects.remove(&id) else {
            return;
        };
        for f in o.fences.iter().copied().collect::<Vec<_>>() {
            self.signal_fence(f, Status::Canceled as u32, false);
        }
        for g in &o.published {
            if let Some(guest) = self.guests.get_mut(*g) {
                guest.frontend.shared_object_remove(&o.uuid);
            }
        }
        if let (Some(c), None) = (o.creator, &o.guest_pages) {
            if let Some(g) = self.guests.get_mut(c) {
                g.bytes = g.bytes.saturating_sub(o.size);
            }
        }
        if let Some(g) = o.fd_charge.and_then(|g| self.guests.get_mut(g)) {
            g.fd_objects = g.fd_objects.saturating_sub(1);
        }
        if let Some(e) = &o.export {
            if self.exports.get(&e.name) == Some(&id) {
                self.exports.remove(&e.name);
            }
        }
        self.dirty.remove(&id);
        log::debug!("object {} destroyed", uuid::Uuid::from_bytes(o.uuid));
    }

    /// `EXPORT_UUID` (section 7.2): publish as a virtio shared object.
    pub(crate) fn export_uuid(&mut self, guest: GuestId, handle: u64) -> Attempt {
        let id = self.object_of(guest, handle)?;
        let allow_memfd = self.config.allow_memfd_shared_objects;
        let o = self.objects.get(&id).ok_or(Status::NoEnt)?;
        // The memfd allowance covers host memory only: a guest-pages object
        // without a kernel dma-buf has no fd that holds its bytes.
        let shareable = o.is_real_dmabuf() || (allow_memfd && o.guest_pages.is_none());
        if !self.guests[guest].caps.shared_objects || !shareable {
            return Err(Status::NotSupported);
        }
        let uuid = o.uuid;
        if !o.published.contains(&guest) {
            // GET_SHARED_OBJECT hands out the fd from now on.
            self.promote(guest, id)?;
            self.guests[guest].frontend.shared_object_add(&uuid)?;
            if let Some(o) = self.objects.get_mut(&id) {
                o.published.insert(guest);
            }
        }
        done(Ok(Reply::Uuid(uuid)))
    }

    /// The fd the front-end asked for with `GET_SHARED_OBJECT`: a duplicate
    /// of the backing of an object this guest published.
    pub fn shared_object_fd(&self, guest: GuestId, uuid: &[u8; 16]) -> Option<OwnedFd> {
        let o = self
            .objects
            .values()
            .find(|o| o.uuid == *uuid && o.published.contains(&guest) && !o.revoked)?;
        o.backing.as_ref()?.fd()?.try_clone_to_owned().ok()
    }
}

pub(crate) fn provider_name(kind: virtio_dmabuf_protocol::ProviderKind) -> &'static str {
    match kind {
        virtio_dmabuf_protocol::ProviderKind::Memfd => "memfd",
        virtio_dmabuf_protocol::ProviderKind::Udmabuf => "udmabuf",
        virtio_dmabuf_protocol::ProviderKind::DmaHeap => "dma-heap",
    }
}
