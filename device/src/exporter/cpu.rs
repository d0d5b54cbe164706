// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! CPU access, the shared-memory window and the copy path (contract
//! section 7.5).

use virtio_dmabuf_protocol::{
    AddressSpace, Direction, FenceUsage, Opcode, Reply, Response, Status,
};
use vm_memory::VolatileSlice;

use super::session::ShmPlacement;
use super::status::{provider_status, ProviderCall};
use super::{done, park_on, sync, Attempt, Exporter, GuestId, ObjId, Step};

/// Bytes copied per provider call on the copy path and on a move.
pub(crate) const COPY_CHUNK: usize = 1 << 20;

impl Exporter {
    /// Implicit sync before the CPU touches the buffer: wait for the fences
    /// `dma_resv_usage_rw` names for this direction, the guests' and then,
    /// on a kernel dma-buf, the host's (the same the `START` sync that
    /// follows would wait for inside the kernel).
    fn cpu_fences(&mut self, object: ObjId, dir: Direction) -> Result<Option<Step>, Status> {
        let usage = FenceUsage::for_cpu_access(dir);
        if !self.fences_clear(object, usage) {
            return Ok(Some(Step::Fences {
                object,
                usage,
                locked: false,
            }));
        }
        self.host_gate(object, usage, false)
    }

    /// `BEGIN_CPU_ACCESS` / `END_CPU_ACCESS`: sync-for-cpu(dir) after the
    /// fence wait, sync-for-device(dir) at the end (section 9).
    pub(crate) fn cpu_access(
        &mut self,
        guest: GuestId,
        handle: u64,
        dir: Direction,
        begin: bool,
    ) -> Attempt {
        let object = self.object_of(guest, handle)?;
        if begin {
            if let Some(step) = self.cpu_fences(object, dir)? {
                return park_on(step);
            }
            self.host_sync(object, sync::for_cpu(dir))?;
        } else {
            self.host_sync(object, sync::for_device(dir))?;
        }
        done(Ok(Reply::Empty))
    }

    /// `MAP_SHM`: place a host-placed object in shared memory region 0.
    pub(crate) fn map_shm(&mut self, guest: GuestId, handle: u64, writable: bool) -> Attempt {
        let object = self.object_of(guest, handle)?;
        let o = self.objects.get(&object).ok_or(Status::NoEnt)?;
        let window = self.guests[guest].caps.shm_size;
        // Only a buffer nobody can shrink goes into the window: the VMM
        // maps it, and a host file its owner truncates would fault the VMM
        // with SIGBUS when the guest touches the window (see
        // `Backing::size_is_fixed`). Such an object keeps the copy path.
        if window == 0 || !o.window_mappable() {
            return Err(Status::NotSupported);
        }
        if writable && o.read_only {
            return Err(Status::Perm);
        }
        let size = o.size;
        if let Some(p) = self.guests[guest].shm.get_mut(&object) {
            if p.writable != writable {
                return Err(Status::Busy);
            }
            p.uses = p.uses.checked_add(1).ok_or(Status::NoSpc)?;
            let (shm_offset, len) = (p.offset, p.len);
            return done(Ok(Reply::Shm { shm_offset, len }));
        }
        let len = size.div_ceil(self.config.page_size) * self.config.page_size;
        let offset = self.guests[guest]
            .shm_find_room(len, window)
            .ok_or(Status::NoSpc)?;
        // The front-end maps the object's own fd, never a slab's.
        self.promote(guest, object)?;
        let o = self.objects.get(&object).ok_or(Status::NoEnt)?;
        let fd = o
            .backing
            .as_ref()
            .ok_or(Status::NoEnt)?
            .fd()
            .ok_or(Status::NotSupported)?;
        self.guests[guest]
            .frontend
            .shm_map(offset, fd, len, writable)?;
        self.guests[guest].shm.insert(
            object,
            ShmPlacement {
                offset,
                len,
                writable,
                uses: 1,
            },
        );
        done(Ok(Reply::Shm {
            shm_offset: offset,
            len,
        }))
    }

    /// `UNMAP_SHM`: one use less; the last one removes the window mapping.
    pub(crate) fn unmap_shm(&mut self, guest: GuestId, handle: u64) -> Attempt {
        let object = self.object_of(guest, handle)?;
        let uses = self.guests[guest]
            .shm
            .get(&object)
            .map(|p| p.uses)
            .ok_or(Status::Inval)?;
        if uses == 1 {
            let in_use = self.guests[guest].mappings.iter().any(|m| {
                self.mappings.get(m).is_some_and(|m| {
                    // A mapping a move invalidated is outstanding until its
                    // UNMAP, and its window offset still holds.
                    m.object == object && m.space == AddressSpace::Shm
                })
            });
            if in_use {
                return Err(Status::Busy);
            }
            self.shm_remove(guest, object);
        } else if let Some(p) = self.guests[guest].shm.get_mut(&object) {
            p.uses -= 1;
        }
        done(Ok(Reply::Empty))
    }

    /// The front-end refused the `SHMEM_MAP` of a `MAP_SHM` by `guest` that
    /// placed `handle` in the window (its answer arrives after the model
    /// replied): drops that placement without a `SHMEM_UNMAP`, as if the
    /// `MAP_SHM` had failed. Later uses of the same placement are kept.
    pub fn shm_map_refused(&mut self, guest: GuestId, handle: u64) {
        if guest >= self.guests.len() {
            return;
        }
        let Ok(object) = self.object_of_any(guest, handle) else {
            return;
        };
        let g = &mut self.guests[guest];
        if g.shm.get(&object).is_some_and(|p| p.uses == 1) {
            g.shm.remove(&object);
        }
    }

    /// Takes an object out of a guest's window (last use, revoke, reset).
    pub(crate) fn shm_remove(&mut self, guest: GuestId, object: ObjId) {
        let g = &mut self.guests[guest];
        if let Some(p) = g.shm.remove(&object) {
            if let Err(status) = g.frontend.shm_unmap(p.offset, p.len) {
                log::warn!(
                    "guest {guest}: SHMEM_UNMAP at {:#x} failed: {status}",
                    p.offset
                );
            }
        }
    }

    /// Checks `offset + len` against the object (overflow included).
    fn transfer_range(&self, object: ObjId, offset: u64, len: u64) -> Result<(), Status> {
        let size = self.objects.get(&object).map_or(0, |o| o.size);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Status::Inval),
        }
    }

    /// `TRANSFER_TO_HOST`: a copy into the object, bracketed by CPU access
    /// for writing (fence wait, START|WRITE, END|WRITE).
    pub(crate) fn transfer_to_host(
        &mut self,
        guest: GuestId,
        handle: u64,
        offset: u64,
        data: &[u8],
    ) -> Attempt {
        let dir = Direction::ToDevice;
        let object = self.transfer_target(guest, handle, offset, data.len() as u64, dir)?;
        if let Some(step) = self.cpu_fences(object, dir)? {
            return park_on(step);
        }
        self.transfer_copy(object, dir, |b| {
            let mut at = offset;
            for chunk in data.chunks(COPY_CHUNK) {
                b.write_at(at, chunk)?;
                at += chunk.len() as u64;
            }
            Ok(())
        })?;
        done(Ok(Reply::Empty))
    }

    /// `TRANSFER_FROM_HOST`: a copy out of the object, bracketed by CPU
    /// access for reading (fence wait, START|READ, END|READ).
    pub(crate) fn transfer_from_host(
        &mut self,
        guest: GuestId,
        handle: u64,
        offset: u64,
        len: u64,
    ) -> Attempt {
        let dir = Direction::FromDevice;
        let object = self.transfer_target(guest, handle, offset, len, dir)?;
        if let Some(step) = self.cpu_fences(object, dir)? {
            return park_on(step);
        }
        let len = usize::try_from(len).map_err(|_| Status::Inval)?;
        let mut data = Vec::new();
        self.transfer_copy(object, dir, |b| {
            data.try_reserve_exact(len).map_err(|_| Status::NoMem)?;
            data.resize(len, 0);
            let mut at = offset;
            for chunk in data.chunks_mut(COPY_CHUNK) {
                b.read_at(at, chunk)?;
                at += chunk.len() as u64;
            }
            Ok(())
        })?;
        done(Ok(Reply::Data(data)))
    }

    /// A `TRANSFER` whose data is copied once, between the object and the
    /// guest memory the chain names (`slices`, in order: the data after
    /// the request's payload, or the room after the response header),
    /// when it can run now. `None` when it must wait for fences: the
    /// caller then submits the request with its data copied
    /// ([`Exporter::submit`]), which parks it as any other. The answer is
    /// that of `TRANSFER_TO_HOST` / `TRANSFER_FROM_HOST`, and counts the
    /// same; on success the data is in place (`Reply::Empty` both ways).
    pub fn transfer_in_place(
        &mut self,
        guest: GuestId,
        t: InPlace,
        slices: &[VolatileSlice<'_>],
    ) -> Option<Response> {
        let (opcode, dir) = match t.to_host {
            true => (Opcode::TransferToHost, Direction::ToDevice),
            false => (Opcode::TransferFromHost, Direction::FromDevice),
        };
        let response = match self.transfer_in_place_inner(guest, t, dir, slices) {
            Ok(Some(())) => Ok(Reply::Empty),
            Ok(None) => return None,
            Err(status) => Err(status),
        };
        self.stats.count(opcode, &response);
        Some(response)
    }

    fn transfer_in_place_inner(
        &mut self,
        guest: GuestId,
        t: InPlace,
        dir: Direction,
        slices: &[VolatileSlice<'_>],
    ) -> Result<Option<()>, Status> {
        if guest >= self.guests.len() {
            return Err(Status::Inval);
        }
        let total = slices.iter().map(|s| s.len() as u64).sum::<u64>();
        if total != t.len {
            return Err(Status::Inval);
        }
        let object = self.transfer_target(guest, t.object, t.offset, t.len, dir)?;
        // What `cpu_fences` would park on, without the watch it registers:
        // the submit that follows sets that up.
        let usage = FenceUsage::for_cpu_access(dir);
        if !self.fences_clear(object, usage) || self.host_busy(object, usage)? {
            return Ok(None);
        }
        self.transfer_copy(object, dir, |b| {
            let mut at = t.offset;
            for slice in slices {
                let mut done = 0;
                while done < slice.len() {
                    let n = (slice.len() - done).min(COPY_CHUNK);
                    let piece = slice.subslice(done, n).map_err(|_| Status::Fault)?;
                    match t.to_host {
                        true => b.write_from(at, &piece)?,
                        false => b.read_into(at, &piece)?,
                    }
                    done += n;
                    at += n as u64;
                }
            }
            Ok(())
        })?;
        Ok(Some(()))
    }

    /// The object of a `TRANSFER` and the checks before its fence wait:
    /// the range, and write permission for a copy into it.
    fn transfer_target(
        &self,
        guest: GuestId,
        handle: u64,
        offset: u64,
        len: u64,
        dir: Direction,
    ) -> Result<ObjId, Status> {
        let object = self.object_of(guest, handle)?;
        self.transfer_range(object, offset, len)?;
        if dir == Direction::ToDevice && self.objects.get(&object).is_some_and(|o| o.read_only) {
            return Err(Status::Perm);
        }
        Ok(object)
    }

    /// The copy of a `TRANSFER`, bracketed by the host syncs a CPU access
    /// in `dir` makes; the END sync runs even when the copy failed.
    fn transfer_copy(
        &mut self,
        object: ObjId,
        dir: Direction,
        copy: impl FnOnce(&dyn crate::provider::Backing) -> Result<(), CopyError>,
    ) -> Result<(), Status> {
        self.host_sync(object, sync::for_cpu(dir))?;
        let copied = self.with_backing(object, copy);
        self.host_sync(object, sync::for_device(dir))?;
        copied
    }

    fn with_backing(
        &self,
        object: ObjId,
        f: impl FnOnce(&dyn crate::provider::Backing) -> Result<(), CopyError>,
    ) -> Result<(), Status> {
        let backing = self
            .objects
            .get(&object)
            .and_then(|o| o.backing.as_deref())
            .ok_or(Status::NoEnt)?;
        f(backing).map_err(|e| match e {
            CopyError::Status(s) => s,
            CopyError::Provider(e) => provider_status(
                ProviderCall::Access,
                format_args!("copy on object {object}"),
                &e,
            ),
        })
    }
}

/// A `TRANSFER` served in place ([`Exporter::transfer_in_place`]).
#[derive(Debug, Clone, Copy)]
pub struct InPlace {
    /// `TRANSFER_TO_HOST`; else `TRANSFER_FROM_HOST`.
    pub to_host: bool,
    pub object: u64,
    pub offset: u64,
    pub len: u64,
}

/// A failure of the copy path: the guest's status, or the host's error.
#[derive(Debug)]
pub(crate) enum CopyError {
    Status(Status),
    Provider(crate::provider::ProviderError),
}

impl From<Status> for CopyError {
    fn from(s: Status) -> Self {
        CopyError::Status(s)
    }
}

impl From<crate::provider::ProviderError> for CopyError {
    fn from(e: crate::provider::ProviderError) -> Self {
        CopyError::Provider(e)
    }
}
