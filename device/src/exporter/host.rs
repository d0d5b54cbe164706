// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host side of the model: exports, revoke, eviction (a move of a
//! dynamic object), and what `ctl list` and `ctl stats` show (contract
//! sections 8, 10 and 11).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use virtio_dmabuf_protocol::{Event, EventType, FenceUsage, Opcode, Response, Status};

use super::cpu::COPY_CHUNK;
use super::objects::{Export, Object};
use super::resv::Locker;
use super::status::{provider_status, ProviderCall};
use super::sync::{SyncEntry, SyncRecord};
use super::{Attempt, Exporter, GuestId, ObjId, Outcome, Owner, PendingId, Step, Work};
use crate::provider::Backing;

/// Names a host operation that may wait (an eviction).
pub type HostOpId = u64;

/// Why a host operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("no export named {0:?}")]
    NoExport(String),
    #[error("an export named {0:?} exists already")]
    ExportExists(String),
    #[error("no live object with UUID {0}")]
    NoObject(uuid::Uuid),
    #[error("the object is a static exporter: its backing never moves")]
    NotDynamic,
    #[error("the object is pinned: an importer needs it where it is")]
    Pinned,
    #[error("the reservation lock was not free within the timeout")]
    LockTimeout,
    #[error("the host's fences on the buffer did not signal within --fence-timeout")]
    HostFenceTimeout,
    #[error("the operation was cancelled (the object was revoked or went away)")]
    Canceled,
    #[error("export name must be 1 to 31 bytes without NUL")]
    BadName,
    #[error("guest {0} does not exist")]
    NoGuest(GuestId),
    #[error("size {0} is not a non-zero multiple of the page size")]
    BadSize(u64),
    #[error("allocating the new backing failed: {0}")]
    Allocation(String),
    #[error("host operation failed: {0}")]
    Status(Status),
}

/// A host export to register (`ctl export`, `--export`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    pub dynamic: bool,
    pub read_only: bool,
    /// Guests allowed to `OPEN` it; `None`: every guest.
    pub guests: Option<Vec<GuestId>>,
}

/// Counters behind `ctl stats`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub requests: BTreeMap<Opcode, BTreeMap<Status, u64>>,
    pub syncs: SyncRecord,
}

impl Stats {
    pub fn count(&mut self, opcode: Opcode, response: &Response) {
        let status = virtio_dmabuf_protocol::response_status(response);
        *self
            .requests
            .entry(opcode)
            .or_default()
            .entry(status)
            .or_insert(0) += 1;
    }
}

/// `ctl stats --json` (section 11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: BTreeMap<String, BTreeMap<String, u64>>,
    pub syncs: BTreeMap<String, u64>,
    pub recent_syncs: Vec<SyncEntry>,
    /// The host fence source and what went through it
    /// (`docs/protocol.md`, "Host fences").
    pub host_fences: super::HostFenceStats,
}

/// One attachment in `ctl list --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentInfo {
    pub guest: GuestId,
    pub importer: &'static str,
    pub pins: u32,
    pub cached_dir: Option<u32>,
    pub mappings: usize,
}

/// The lock holder in `ctl list --json`: a guest context with its stamp,
/// or the device/host itself (no guest context, no stamp).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolderInfo {
    pub guest: Option<GuestId>,
    pub stamp: Option<u64>,
}

/// One object in `ctl list --json` (section 11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub uuid: uuid::Uuid,
    pub size: u64,
    pub provider: &'static str,
    pub exporter: &'static str,
    pub placement: &'static str,
    pub generation: u64,
    pub export: Option<String>,
    pub revoked: bool,
    pub guests: Vec<GuestId>,
    pub attachments: Vec<AttachmentInfo>,
    pub lock_holder: Option<LockHolderInfo>,
    pub fences_pending: usize,
    pub shm_offset: Option<u64>,
    /// `MAP_SHM` can place it in the window: host-placed, over a buffer
    /// whose size nobody can shrink ([`Backing::size_is_fixed`]); other
    /// objects are served through the copy path only.
    pub window: bool,
    /// An extent of a slab, without an fd of its own
    /// (`provider/slab.rs`).
    pub sub_allocated: bool,
}

impl Exporter {
    /// Registers a host dma-buf (or any backing) under `spec.name`.
    pub fn host_export(
        &mut self,
        spec: ExportSpec,
        backing: Box<dyn Backing>,
    ) -> Result<uuid::Uuid, HostError> {
        let name_ok = !spec.name.is_empty()
            && spec.name.len() < virtio_dmabuf_protocol::NAME_LEN
            && !spec.name.contains('\0');
        if !name_ok {
            return Err(HostError::BadName);
        }
        if self.exports.contains_key(&spec.name) {
            return Err(HostError::ExportExists(spec.name));
        }
        if let Some(g) = spec
            .guests
            .iter()
            .flatten()
            .find(|g| **g >= self.guests.len())
        {
            return Err(HostError::NoGuest(*g));
        }
        let size = backing.size();
        if size == 0 || !size.is_multiple_of(self.config.page_size) {
            return Err(HostError::BadSize(size));
        }
        let provider_name = if backing.is_real_dmabuf() {
            "dma-buf"
        } else {
            "fd"
        };
        let mut object = Object::new(size, backing, spec.dynamic, provider_name);
        object.read_only = spec.read_only;
        object.export = Some(Export {
            name: spec.name.clone(),
            guests: spec.guests.map(|g| g.into_iter().collect::<BTreeSet<_>>()),
        });
        let uuid = uuid::Uuid::from_bytes(object.uuid);
        let id = self.insert_object(object).map_err(HostError::Status)?;
        self.exports.insert(spec.name, id);
        Ok(uuid)
    }

    /// Withdraws an export (section 8, REVOKED).
    pub fn host_revoke(&mut self, name: &str, now: Instant) -> Result<(), HostError> {
        let id = *self
            .exports
            .get(name)
            .ok_or_else(|| HostError::NoExport(name.to_owned()))?;
        self.revoke_object(id);
        self.pump(now);
        Ok(())
    }

    /// Guest memory under guest-placed objects went away (the front-end
    /// removed or replaced a memory region, section 10): every live object
    /// `guest` created over guest pages with an entry for which
    /// `removed(gpa, len)` holds is revoked. Returns how many were.
    pub fn revoke_guest_pages(
        &mut self,
        guest: GuestId,
        removed: impl Fn(u64, u64) -> bool,
        now: Instant,
    ) -> usize {
        let hit: Vec<ObjId> = self
            .objects
            .iter()
            .filter(|(_, o)| !o.revoked && o.creator == Some(guest))
            .filter(|(_, o)| {
                o.guest_pages
                    .as_ref()
                    .is_some_and(|entries| entries.iter().any(|e| removed(e.addr, e.len)))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &hit {
            self.revoke_object(*id);
        }
        self.pump(now);
        hit.len()
    }

    /// Revokes an object: waiting requests end, locks drop (never waiting
    /// for one), window mappings go, mappings become invalid, holders get
    /// REVOKED, and the host memory is given back.
    pub(crate) fn revoke_object(&mut self, id: ObjId) {
        let Some(o) = self.objects.get_mut(&id) else {
            return;
        };
        o.revoked = true;
        let holder = o.resv.holder();
        let holders: Vec<GuestId> = o.holders.iter().copied().collect();
        let fences: Vec<u64> = o.fences.iter().copied().collect();
        if let Some(e) = &o.export {
            self.exports.remove(&e.name);
        }
        self.cancel_where(|p| p.object == id);
        if let Some(Locker::Ctx { ctx, .. }) = holder {
            self.release_lock(ctx, id);
        }
        if let Some(o) = self.objects.get_mut(&id) {
            o.resv.release();
        }
        for f in fences {
            self.signal_fence(f, Status::Canceled as u32, false);
        }
        let mappings: Vec<u64> = self
            .mappings
            .iter()
            .filter(|(_, m)| m.object == id)
            .map(|(k, _)| *k)
            .collect();
        for m in mappings {
            if let Some(m) = self.mappings.get_mut(&m) {
                m.invalid = true;
            }
        }
        for g in 0..self.guests.len() {
            self.shm_remove(g, id);
        }
        for g in holders {
            let event = Event {
                kind: EventType::Revoked,
                object: self.handle_of(g, id),
                attachment: 0,
                data: 0,
            };
            self.push_event(g, event);
        }
        if let Some(o) = self.objects.get_mut(&id) {
            o.backing = None;
        }
        self.uncharge_fds(id);
        self.maybe_destroy(id);
    }

    /// Moves a dynamic, unpinned object (section 8, MOVE_NOTIFY). `Some` is
    /// the result now; `None`: it waits for the lock (at most `timeout`) or
    /// fences, and the result comes through `take_host_completions`.
    pub fn host_evict(
        &mut self,
        uuid: uuid::Uuid,
        op: HostOpId,
        timeout: Duration,
        now: Instant,
    ) -> Option<Result<(), HostError>> {
        let Some(id) = self.live_object_by_uuid(uuid) else {
            return Some(Err(HostError::NoObject(uuid)));
        };
        if !self.objects.get(&id).is_some_and(|o| o.dynamic) {
            return Some(Err(HostError::NotDynamic));
        }
        if self.is_pinned(id) {
            return Some(Err(HostError::Pinned));
        }
        let pending_id = self.next_pending;
        self.next_pending += 1;
        let owner = Owner::Host(op);
        let result = match self.attempt_evict_on(id, pending_id) {
            Ok(Outcome::Answer(_)) => Some(Ok(())),
            Ok(Outcome::Parked(step)) => {
                match self.park(
                    pending_id,
                    owner,
                    Work::Evict,
                    step,
                    now.checked_add(timeout),
                    now,
                ) {
                    Ok(()) => None,
                    Err(status) => Some(Err(HostError::Status(status))),
                }
            }
            Err(status) => Some(Err(HostError::from_status(status))),
        };
        self.pump(now);
        result
    }

    fn live_object_by_uuid(&self, uuid: uuid::Uuid) -> Option<ObjId> {
        self.objects
            .iter()
            .find(|(_, o)| o.uuid == *uuid.as_bytes() && !o.revoked)
            .map(|(id, _)| *id)
    }

    /// A parked eviction runs again (its object is in the pending record).
    pub(crate) fn attempt_evict(&mut self, pending_id: PendingId, _now: Instant) -> Attempt {
        let id = self
            .pending
            .get(&pending_id)
            .map(|p| p.object)
            .ok_or(Status::NoEnt)?;
        self.attempt_evict_on(id, pending_id)
    }

    /// The order of a move: the lock as a context-less waiter, every fence
    /// (the guests' in the model, then the host's on a kernel dma-buf),
    /// then the move itself under the lock.
    fn attempt_evict_on(&mut self, id: ObjId, pending_id: PendingId) -> Attempt {
        if self.objects.get(&id).is_none_or(|o| o.revoked) {
            return Err(Status::NoEnt);
        }
        if !self.lock_available(id, pending_id) {
            return super::park_on(Step::Lock(id));
        }
        if !self.fences_clear(id, FenceUsage::Bookkeep) {
            return super::park_on(Step::Fences {
                object: id,
                usage: FenceUsage::Bookkeep,
                locked: true,
            });
        }
        if let Some(step) = self.host_gate(id, FenceUsage::Bookkeep, true)? {
            return super::park_on(step);
        }
        if self.is_pinned(id) {
            return Err(Status::Busy);
        }
        self.move_object(id)?;
        super::done(Ok(virtio_dmabuf_protocol::Reply::Empty))
    }

    /// Moves the backing to new memory keeping the bytes and every window
    /// offset, invalidates the attachments' mappings and tells them. The
    /// new memory is of the old one's kind: an extent of a slab moves to
    /// another extent of its creator's slabs (or, with none free, a memfd
    /// charged to the creator), a buffer with an fd to another one, which
    /// is what the window needs.
    fn move_object(&mut self, id: ObjId) -> Result<(), Status> {
        let o = self.objects.get(&id).ok_or(Status::NoEnt)?;
        let (size, creator) = (o.size, o.creator);
        let old_has_fd = o.backing.as_ref().is_some_and(|b| b.fd().is_some());
        let new = match creator {
            Some(guest) if !old_has_fd => self.allocate_for(guest, size, ProviderCall::Move)?,
            _ => self.provider.allocate(size).map_err(|e| {
                provider_status(ProviderCall::Move, format_args!("move of object {id}"), &e)
            })?,
        };
        {
            let old = self
                .objects
                .get(&id)
                .and_then(|o| o.backing.as_deref())
                .ok_or(Status::NoEnt)?;
            copy_bytes(old, new.as_ref(), size).map_err(|e| {
                provider_status(
                    ProviderCall::Access,
                    format_args!("move of object {id}"),
                    &e,
                )
            })?;
        }
        // Same window offsets, new backing.
        for g in 0..self.guests.len() {
            let Some(p) = self.guests[g].shm.get(&id).copied() else {
                continue;
            };
            let guest = &mut self.guests[g];
            // A placed object has an fd of its own, and so has its new
            // memory.
            let remapped = guest.frontend.shm_unmap(p.offset, p.len).and_then(|()| {
                let fd = new.fd().ok_or(Status::NotSupported)?;
                guest.frontend.shm_map(p.offset, fd, p.len, p.writable)
            });
            if let Err(status) = remapped {
                log::warn!(
                    "guest {g}: re-placing moved object at {:#x} failed: {status}",
                    p.offset
                );
            }
        }
        let o = self.objects.get_mut(&id).ok_or(Status::NoEnt)?;
        o.backing = Some(new);
        o.provider_name = super::objects::provider_name(self.provider.kind());
        o.generation += 1;
        let generation = o.generation;
        let attachments: Vec<u64> = o.attachments.iter().copied().collect();
        if let Some(guest) = creator {
            // A move out of a full slab pool landed in a memfd.
            self.charge_fds(guest, id);
        }
        for a in attachments {
            let Some(att) = self.attachments.get(&a) else {
                continue;
            };
            if !att.dynamic_importer || att.is_pinned() {
                continue;
            }
            let guest = att.guest;
            for m in &att.mappings {
                if let Some(m) = self.mappings.get_mut(m) {
                    m.invalid = true;
                }
            }
            let event = Event {
                kind: EventType::MoveNotify,
                object: self.handle_of(guest, id),
                attachment: a,
                data: generation,
            };
            self.push_event(guest, event);
        }
        Ok(())
    }

    /// Every object, as the kernel's dma-buf bufinfo lists them.
    pub fn list(&self) -> Vec<ObjectInfo> {
        self.objects
            .iter()
            .map(|(id, o)| self.object_info(*id, o))
            .collect()
    }

    fn object_info(&self, id: ObjId, o: &Object) -> ObjectInfo {
        let attachments = o
            .attachments
            .iter()
            .filter_map(|a| self.attachments.get(a))
            .map(|a| AttachmentInfo {
                guest: a.guest,
                importer: if a.dynamic_importer {
                    "dynamic"
                } else {
                    "static"
                },
                pins: a.pins + u32::from(a.lifetime_pin),
                cached_dir: a.cached.map(|d| d as u32),
                mappings: a.mappings.len(),
            })
            .collect();
        let lock_holder = o.resv.holder().map(|h| match h {
            Locker::Ctx { ctx, stamp } => LockHolderInfo {
                guest: self.contexts.get(&ctx).map(|c| c.guest),
                stamp: Some(stamp),
            },
            Locker::Anon(pending_id) => LockHolderInfo {
                guest: self.pending.get(&pending_id).and_then(|p| p.guest()),
                stamp: None,
            },
        });
        let shm_offset = self
            .guests
            .iter()
            .find_map(|g| g.shm.get(&id).map(|p| p.offset));
        ObjectInfo {
            uuid: uuid::Uuid::from_bytes(o.uuid),
            size: o.size,
            provider: o.provider_name,
            exporter: if o.dynamic { "dynamic" } else { "static" },
            placement: if o.guest_pages.is_some() {
                "guest"
            } else {
                "host"
            },
            generation: o.generation,
            export: o.export.as_ref().map(|e| e.name.clone()),
            revoked: o.revoked,
            guests: o.holders.iter().copied().collect(),
            attachments,
            lock_holder,
            fences_pending: o.fences.len(),
            shm_offset,
            window: o.window_mappable(),
            sub_allocated: o.sub_allocated(),
        }
    }

    /// Counts a request the transport refused before it reached the model
    /// (a parse failure of a known opcode), so `ctl stats` shows it too.
    pub fn count_refused(&mut self, opcode: Opcode, status: Status) {
        self.stats.count(opcode, &Err(status));
    }

    /// Request counters by opcode and status, and the host sync record.
    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self
                .stats
                .requests
                .iter()
                .map(|(op, by)| {
                    let by = by.iter().map(|(s, n)| (s.name().to_owned(), *n)).collect();
                    (op.name().to_owned(), by)
                })
                .collect(),
            syncs: self.stats.syncs.by_flags.clone(),
            recent_syncs: self.stats.syncs.recent.iter().copied().collect(),
            host_fences: self.host_fence_stats(),
        }
    }
}

/// Copies the first `size` bytes of `from` into `to` (a move, a promotion).
pub(crate) fn copy_bytes(
    from: &dyn Backing,
    to: &dyn Backing,
    size: u64,
) -> Result<(), crate::provider::ProviderError> {
    let chunk = usize::try_from(size.min(COPY_CHUNK as u64)).unwrap_or(COPY_CHUNK);
    let mut buf = vec![0u8; chunk];
    let mut at = 0u64;
    while at < size {
        let n = usize::try_from((size - at).min(chunk as u64)).unwrap_or(chunk);
        let piece = &mut buf[..n];
        from.read_at(at, piece)?;
        to.write_at(at, piece)?;
        at += n as u64;
    }
    Ok(())
}

impl HostError {
    fn from_status(status: Status) -> HostError {
        match status {
            Status::Busy => HostError::Pinned,
            Status::NoEnt => HostError::Canceled,
            s => HostError::Status(s),
        }
    }
}
