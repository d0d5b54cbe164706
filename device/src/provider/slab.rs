// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Small memfd objects as extents of shared slabs, so that the number of
//! live objects is not bounded by the open-file limit (`docs/benchmarks.md`,
//! "Scale").
//!
//! An object of at most [`SLAB_MAX_EXTENT`] bytes is a page-aligned extent
//! of a [`SLAB_SIZE`] memfd it shares with other small objects of the same
//! guest (one [`SlabPool`] per guest). A slab is mapped once and its fd
//! closed at once: it costs one mapping and no open file, and memory only
//! for the pages its objects touched. Copies and syncs go through that
//! mapping.
//!
//! Extents come in size classes, a power of two pages each, and a slab
//! serves one class: any free slot fits any object of the class, so a new
//! slab is made only when every slab of the class is full. A released
//! extent's pages are punched out of the memfd (`MADV_REMOVE`): the memory
//! goes back to the host, and the object handed the extent next reads
//! zeros, as `CREATE` promises (section 7.2). An empty slab is freed,
//! except the last one of its class, kept so that a guest creating and
//! releasing one object in a loop does not make and unmake a slab each
//! time ([`SlabPool::trim`] frees that one too, at a reset).
//!
//! Nobody ever gets a slab's fd, which would expose every object in it: an
//! extent has none ([`Backing::fd`] is `None`), and the model gives an
//! object a memfd of its own before an operation hands one out
//! (`exporter/objects.rs`, `promote`).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustix::fs::{MemfdFlags, SealFlags};
use vm_memory::VolatileSlice;

use super::memfd::sealed_memfd_named;
use super::mmap::Mapping;
use super::sync::{emulated_sync, SyncRecord};
use super::{check_range, page_size, Backing, ProviderError};

/// Bytes of one slab. It holds 16,384 objects of 4 KiB or 64 of 1 MiB, so
/// making one (a `memfd_create` and an `mmap`) is rare; its size is address
/// space, not memory.
pub const SLAB_SIZE: u64 = 64 << 20;

/// The largest object that is an extent of a slab; larger ones have a
/// memfd of their own. At the default `--max-bytes` of 4 GiB a guest holds
/// at most 4,096 objects above it, the default `--max-fd-objects`: so the
/// fd quota bounds only objects whose memory dwarfs their open file, plus
/// the small ones promoted for the window or a shared object. It covers
/// cursors, small textures and command buffers, and a slab still holds 64
/// of the largest class.
pub const SLAB_MAX_EXTENT: u64 = 1 << 20;

/// The most slabs one guest's pool makes: 16 GiB of address space, four
/// times what the default `--max-bytes` fills when packed, and 256 of the
/// process's 65,530 mappings. A guest whose releases left its slabs that
/// fragmented gets memfds of their own for its next small objects.
pub const SLABS_PER_POOL: usize = 256;

/// What `/proc/PID/maps` calls the slabs.
const SLAB_NAME: &str = concat!(env!("CARGO_PKG_NAME"), "-slab");

/// The `buffer` of an extent's [`super::SyncCall`]s: an id of its own from
/// 2^63 up (inode numbers, the other buffers' ids, count up from 1 and
/// never get there), so that the record tells objects in one slab apart.
static NEXT_EXTENT_ID: AtomicU64 = AtomicU64::new(1 << 63);

/// One slab: the only thing left of its memfd is this mapping.
#[derive(Debug)]
struct Slab {
    map: Mapping,
}

impl Slab {
    fn new() -> Result<Slab, ProviderError> {
        let bad = ProviderError::BadSize {
            size: SLAB_SIZE,
            max: isize::MAX as u64,
        };
        let len = usize::try_from(SLAB_SIZE).map_err(|_| bad)?;
        let fd = sealed_memfd_named(
            SLAB_NAME,
            SLAB_SIZE,
            MemfdFlags::CLOEXEC,
            SealFlags::SHRINK | SealFlags::GROW,
        )?;
        let map = Mapping::new(fd.as_fd(), len, true)?;
        // The mapping keeps the file; the fd goes now.
        drop(fd);
        Ok(Slab { map })
    }
}

/// The slots of one slab.
#[derive(Debug)]
struct Slots {
    slab: Arc<Slab>,
    /// Released slots, the last released handed out first.
    free: Vec<u32>,
    /// Slots from this one on were never handed out.
    fresh: u32,
    used: u32,
}

/// The slabs of one size class.
#[derive(Debug)]
struct Class {
    /// Bytes per slot: a power of two pages.
    extent: u64,
    /// Slots per slab.
    slots: u32,
    slabs: BTreeMap<u64, Slots>,
    /// Slabs with a free slot. The oldest is used first, so that newer
    /// ones empty out and go.
    with_room: BTreeSet<u64>,
}

/// One guest's slabs, behind the pool's lock (a leaf: see `state.rs`).
#[derive(Debug)]
struct Pool {
    classes: Vec<Class>,
    next_slab: u64,
    slabs: usize,
    max_slabs: usize,
    extents: usize,
}

impl Pool {
    /// A free slot of `class`: its slab's id, the slot and the slab.
    fn take(&mut self, class: usize) -> Option<(u64, u32, Arc<Slab>)> {
        let c = self.classes.get_mut(class)?;
        let id = *c.with_room.first()?;
        let s = c.slabs.get_mut(&id)?;
        let slot = match s.free.pop() {
            Some(slot) => slot,
            None => {
                s.fresh += 1;
                s.fresh - 1
            }
        };
        s.used += 1;
        if s.free.is_empty() && s.fresh == c.slots {
            c.with_room.remove(&id);
        }
        self.extents += 1;
        Some((id, slot, Arc::clone(&s.slab)))
    }

    fn add(&mut self, class: usize, slab: Slab) {
        let Some(c) = self.classes.get_mut(class) else {
            return;
        };
        let id = self.next_slab;
        self.next_slab += 1;
        c.slabs.insert(
            id,
            Slots {
                slab: Arc::new(slab),
                free: Vec::new(),
                fresh: 0,
                used: 0,
            },
        );
        c.with_room.insert(id);
        self.slabs += 1;
    }

    /// A released slot; an empty slab goes unless it is its class's last.
    fn give_back(&mut self, class: usize, id: u64, slot: u32) {
        let Some(c) = self.classes.get_mut(class) else {
            return;
        };
        let Some(s) = c.slabs.get_mut(&id) else {
            return;
        };
        s.free.push(slot);
        s.used -= 1;
        self.extents -= 1;
        c.with_room.insert(id);
        if s.used == 0 && c.slabs.len() > 1 {
            c.slabs.remove(&id);
            c.with_room.remove(&id);
            self.slabs -= 1;
        }
    }

    /// Frees every empty slab.
    fn trim(&mut self) {
        for c in &mut self.classes {
            let empty: Vec<u64> = c
                .slabs
                .iter()
                .filter(|(_, s)| s.used == 0)
                .map(|(id, _)| *id)
                .collect();
            for id in empty {
                c.slabs.remove(&id);
                c.with_room.remove(&id);
                self.slabs -= 1;
            }
        }
    }
}

/// How many slabs a pool has and how many extents are handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlabStats {
    pub slabs: usize,
    pub extents: usize,
}

/// The slabs of one guest's small memfd objects.
#[derive(Debug)]
pub struct SlabPool {
    pool: Arc<Mutex<Pool>>,
    record: SyncRecord,
    page: u64,
    max_extent: u64,
}

fn lock(pool: &Mutex<Pool>) -> MutexGuard<'_, Pool> {
    // Every update of the pool is a few field writes that cannot panic
    // half-way, so a poisoned lock still guards a consistent pool.
    pool.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SlabPool {
    /// A pool whose extents record their syncs in `record`, for objects of
    /// at most `max_object_size` bytes (the provider's cap).
    pub(crate) fn new(record: SyncRecord, max_object_size: u64) -> SlabPool {
        Self::with_max_slabs(record, max_object_size, SLABS_PER_POOL)
    }

    fn with_max_slabs(record: SyncRecord, max_object_size: u64, max_slabs: usize) -> SlabPool {
        let page = page_size();
        let mut classes = Vec::new();
        let mut extent = page;
        while extent <= SLAB_MAX_EXTENT.min(max_object_size) {
            classes.push(Class {
                extent,
                slots: u32::try_from(SLAB_SIZE / extent).unwrap_or(u32::MAX),
                slabs: BTreeMap::new(),
                with_room: BTreeSet::new(),
            });
            extent *= 2;
        }
        let max_extent = classes.last().map_or(0, |c| c.extent);
        SlabPool {
            pool: Arc::new(Mutex::new(Pool {
                classes,
                next_slab: 0,
                slabs: 0,
                max_slabs,
                extents: 0,
            })),
            record,
            page,
            max_extent,
        }
    }

    /// The largest object the pool takes (0: none).
    pub fn max_extent(&self) -> u64 {
        self.max_extent
    }

    /// True when an object of `size` bytes is an extent of a slab.
    pub fn takes(&self, size: u64) -> bool {
        size > 0 && size <= self.max_extent && size.is_multiple_of(self.page)
    }

    /// A zero-filled extent of `size` bytes; `None` when the pool does not
    /// take that size, or every slab of its class is full and the pool has
    /// all the slabs it may make.
    pub fn allocate(&self, size: u64) -> Result<Option<SlabBacking>, ProviderError> {
        if !self.takes(size) {
            return Ok(None);
        }
        // The smallest class that holds `size`: its pages rounded up to a
        // power of two.
        let pages = size.div_ceil(self.page).next_power_of_two();
        let class = pages.trailing_zeros() as usize;
        let mut pool = lock(&self.pool);
        let taken = match pool.take(class) {
            Some(t) => t,
            None => {
                if pool.slabs >= pool.max_slabs {
                    // Other classes' kept empty slabs make room first.
                    pool.trim();
                    if pool.slabs >= pool.max_slabs {
                        return Ok(None);
                    }
                }
                pool.add(class, Slab::new()?);
                match pool.take(class) {
                    Some(t) => t,
                    None => return Ok(None),
                }
            }
        };
        let (slab_id, slot, slab) = taken;
        let extent = pool.classes.get(class).map_or(0, |c| c.extent);
        Ok(Some(SlabBacking {
            slab,
            pool: Arc::clone(&self.pool),
            class,
            slab_id,
            slot,
            base: u64::from(slot) * extent,
            size,
            id: NEXT_EXTENT_ID.fetch_add(1, Ordering::Relaxed),
            record: self.record.clone(),
        }))
    }

    /// Frees the slabs no object uses (a guest's reset).
    pub fn trim(&self) {
        lock(&self.pool).trim();
    }

    pub fn stats(&self) -> SlabStats {
        let pool = lock(&self.pool);
        SlabStats {
            slabs: pool.slabs,
            extents: pool.extents,
        }
    }
}

/// An object's extent of a slab. Dropping it zeroes the extent and hands
/// the slot back.
#[derive(Debug)]
pub struct SlabBacking {
    slab: Arc<Slab>,
    pool: Arc<Mutex<Pool>>,
    class: usize,
    slab_id: u64,
    slot: u32,
    /// Where the extent starts in the slab.
    base: u64,
    size: u64,
    /// See [`NEXT_EXTENT_ID`].
    id: u64,
    record: SyncRecord,
}

impl SlabBacking {
    /// The `buffer` of this extent's [`super::SyncCall`]s.
    pub fn buffer_id(&self) -> u64 {
        self.id
    }

    /// The slab offset of `len` bytes at `offset` in the object, checked
    /// against the object's size (not the slot's, which may be larger).
    fn at(&self, offset: u64, len: usize) -> Result<u64, ProviderError> {
        check_range(offset, len, self.size)?;
        Ok(self.base + offset)
    }
}

impl Drop for SlabBacking {
    fn drop(&mut self) {
        let len = usize::try_from(self.size).unwrap_or(0);
        if let Err(e) = self.slab.map.discard(self.base, len) {
            // Never handed out again unzeroed: the slot stays taken.
            log::error!(
                "slab extent at {:#x}: cannot zero it ({e}); it is not reused",
                self.base
            );
            return;
        }
        lock(&self.pool).give_back(self.class, self.slab_id, self.slot);
    }
}

impl Backing for SlabBacking {
    fn size(&self) -> u64 {
        self.size
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn is_real_dmabuf(&self) -> bool {
        false
    }

    fn size_is_fixed(&self) -> bool {
        // The slab is sealed and only mapped here; the window gets a
        // promoted memfd, sealed as every memfd of the provider.
        true
    }

    fn sync(&self, flags: u64) -> Result<(), ProviderError> {
        emulated_sync(&self.record, self.id, flags)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ProviderError> {
        self.slab.map.read(self.at(offset, buf.len())?, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ProviderError> {
        self.slab.map.write(self.at(offset, data.len())?, data)
    }

    fn write_from(&self, offset: u64, src: &VolatileSlice<'_>) -> Result<(), ProviderError> {
        self.slab.map.write_from(self.at(offset, src.len())?, src)
    }

    fn read_into(&self, offset: u64, dst: &VolatileSlice<'_>) -> Result<(), ProviderError> {
        self.slab.map.read_into(self.at(offset, dst.len())?, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_dmabuf_protocol::sync_flags::{END, READ, START, WRITE};

    fn pool() -> SlabPool {
        SlabPool::new(SyncRecord::new(), 1 << 30)
    }

    fn bytes(b: &SlabBacking) -> Vec<u8> {
        let mut all = vec![0xeeu8; b.size() as usize];
        b.read_at(0, &mut all).expect("read");
        all
    }

    #[test]
    fn small_sizes_are_taken_and_large_ones_are_not() {
        let p = pool();
        let page = page_size();
        assert!(p.takes(page));
        assert!(p.takes(SLAB_MAX_EXTENT));
        for size in [0, page + 1, SLAB_MAX_EXTENT + page] {
            assert!(!p.takes(size), "{size}");
            assert!(p.allocate(size).expect("no host error").is_none());
        }
        let capped = SlabPool::new(SyncRecord::new(), 4 * page);
        assert_eq!(capped.max_extent(), 4 * page);
        assert!(!capped.takes(8 * page));
    }

    #[test]
    fn extents_have_no_fd_and_keep_their_bytes_apart() {
        let p = pool();
        let page = page_size();
        let objects: Vec<SlabBacking> = [page, 3 * page, page, 2 * page]
            .iter()
            .map(|&size| p.allocate(size).expect("allocate").expect("taken"))
            .collect();
        for (i, b) in objects.iter().enumerate() {
            assert!(b.fd().is_none());
            assert!(bytes(b).iter().all(|&x| x == 0), "zero-filled");
            b.write_at(0, &vec![i as u8 + 1; b.size() as usize])
                .expect("write");
        }
        for (i, b) in objects.iter().enumerate() {
            assert!(bytes(b).iter().all(|&x| x == i as u8 + 1), "object {i}");
        }
        assert_eq!(p.stats().extents, 4);
    }

    #[test]
    fn copies_stop_at_the_object_not_at_its_slot() {
        let p = pool();
        let size = 3 * page_size();
        let b = p.allocate(size).expect("allocate").expect("taken");
        let mut buf = [0u8; 8];
        assert!(matches!(
            b.read_at(size - 4, &mut buf),
            Err(ProviderError::OutOfRange { .. })
        ));
        assert!(b.write_at(size, &buf).is_err());
        b.write_at(size - 8, &[9; 8]).expect("the last bytes");
    }

    #[test]
    fn a_released_extent_is_handed_out_again_zero_filled() {
        let p = pool();
        let page = page_size();
        let first = p.allocate(2 * page).expect("allocate").expect("taken");
        let base = first.base;
        first
            .write_at(0, &vec![0xa5; 2 * page as usize])
            .expect("write");
        drop(first);
        assert_eq!(p.stats().extents, 0);
        let again = p.allocate(2 * page).expect("allocate").expect("taken");
        assert_eq!(again.base, base, "the same slot");
        assert!(bytes(&again).iter().all(|&x| x == 0));
    }

    #[test]
    fn a_slab_is_made_when_its_class_is_full_and_freed_when_empty() {
        let p = pool();
        let per_slab = (SLAB_SIZE / SLAB_MAX_EXTENT) as usize;
        let mut held: Vec<SlabBacking> = (0..=per_slab)
            .map(|_| {
                p.allocate(SLAB_MAX_EXTENT)
                    .expect("allocate")
                    .expect("taken")
            })
            .collect();
        assert_eq!(
            p.stats(),
            SlabStats {
                slabs: 2,
                extents: per_slab + 1
            }
        );
        // Another class has slabs of its own.
        let small = p.allocate(page_size()).expect("allocate").expect("taken");
        assert_eq!(p.stats().slabs, 3);
        // The second slab's only object goes: the slab goes with it.
        held.pop();
        assert_eq!(p.stats().slabs, 2);
        // The last slab of a class stays when it empties, until a trim.
        held.clear();
        drop(small);
        assert_eq!(
            p.stats(),
            SlabStats {
                slabs: 2,
                extents: 0
            }
        );
        p.trim();
        assert_eq!(p.stats(), SlabStats::default());
    }

    #[test]
    fn a_pool_with_all_its_slabs_full_takes_no_more() {
        let p = SlabPool::with_max_slabs(SyncRecord::new(), 1 << 30, 1);
        let per_slab = (SLAB_SIZE / SLAB_MAX_EXTENT) as usize;
        let held: Vec<SlabBacking> = (0..per_slab)
            .map(|_| {
                p.allocate(SLAB_MAX_EXTENT)
                    .expect("allocate")
                    .expect("taken")
            })
            .collect();
        assert!(p.allocate(SLAB_MAX_EXTENT).expect("allocate").is_none());
        assert!(p.allocate(page_size()).expect("allocate").is_none());
        drop(held);
        assert!(p.allocate(page_size()).expect("allocate").is_some());
    }

    #[test]
    fn syncs_are_recorded_under_each_extent_s_own_id() {
        let record = SyncRecord::new();
        let p = SlabPool::new(record.clone(), 1 << 30);
        let a = p.allocate(page_size()).expect("allocate").expect("taken");
        let b = p.allocate(page_size()).expect("allocate").expect("taken");
        assert_ne!(a.buffer_id(), b.buffer_id());
        assert!(a.buffer_id() >= 1 << 63);
        a.sync(START | READ).expect("sync");
        b.sync(END | WRITE).expect("sync");
        let calls = record.calls();
        assert_eq!(
            calls
                .iter()
                .map(|c| (c.buffer, c.flags))
                .collect::<Vec<_>>(),
            [(a.buffer_id(), START | READ), (b.buffer_id(), END | WRITE)]
        );
        assert!(
            a.sync(START).is_err(),
            "flags are checked as the kernel does"
        );
    }

    #[test]
    fn guest_memory_copies_go_through_the_slab() {
        let p = pool();
        let b = p
            .allocate(2 * page_size())
            .expect("allocate")
            .expect("taken");
        let mut src: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        // SAFETY: the slice covers `src`, which lives and is not otherwise
        // touched while the slice is used.
        let slice = unsafe { VolatileSlice::new(src.as_mut_ptr(), src.len()) };
        b.write_from(100, &slice).expect("write_from");
        let mut out = vec![0u8; src.len()];
        // SAFETY: as above, for `out`.
        let back = unsafe { VolatileSlice::new(out.as_mut_ptr(), out.len()) };
        b.read_into(100, &back).expect("read_into");
        assert_eq!(out, src);
    }
}
