// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest RAM as the backing of guest-placed objects (contract section 7.2,
//! `CREATE` with `GUEST_PAGES`, and section 10).
//!
//! The front-end shares its memory table with the back-end (vhost-user
//! `SET_MEM_TABLE`, `ADD_MEM_REG`): every region is a file (a memfd in
//! practice) mapped at a guest-physical address. A guest-placed object is a
//! list of guest-physical ranges. [`guest_pages_backing`] resolves them to
//! (file, offset, length) pieces through the regions, then
//!
//! - where `/dev/udmabuf` exists and the region files allow it (memfds
//!   sealed against shrinking), makes a real host dma-buf over exactly those
//!   pages with `UDMABUF_CREATE_LIST`;
//! - otherwise wraps the pieces as a [`GuestPagesBacking`], whose bytes are
//!   guest memory and whose sync is the memfd-style emulation (flags checked
//!   as the kernel does, memory ordered). Such an object is valid but not
//!   `REAL_DMABUF`.
//!
//! A range outside guest RAM is `EFAULT`. [`RegionKey`] names a region by
//! what backs it, so a new memory table can be compared with the old one
//! and the objects over removed regions revoked (section 10).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use rustix::fs::{fcntl_get_seals, fstat, SealFlags};
use virtio_dmabuf_protocol::{Segment, Status};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

use crate::provider::{
    page_size, validate_sync_flags, Backing, Provider, ProviderError, UdmabufProvider,
};

/// Guest memory as vhost-user-backend hands it to the back-end.
pub type GuestRam = GuestMemoryMmap<()>;
/// The shared, replaceable view of it (`update_memory`).
pub type GuestRamHandle = GuestMemoryAtomic<GuestRam>;

/// One contiguous piece of a guest-placed object: guest-physical range and
/// where it lives in its region's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub gpa: u64,
    pub len: u64,
    /// Offset of `gpa` in the region's backing file.
    pub file_offset: u64,
    /// Index of the region in the memory table snapshot.
    region: usize,
}

/// Resolves guest-physical entries to pieces, splitting an entry that spans
/// adjacent regions. Any byte outside guest RAM is `EFAULT` (section 4).
pub fn resolve(mem: &GuestRam, entries: &[Segment]) -> Result<Vec<Piece>, Status> {
    let mut pieces = Vec::with_capacity(entries.len());
    for entry in entries {
        let end = entry.addr.checked_add(entry.len).ok_or(Status::Fault)?;
        let mut at = entry.addr;
        while at < end {
            let (index, region) = mem
                .iter()
                .enumerate()
                .find(|(_, r)| at >= r.start_addr().raw_value() && at <= r.last_addr().raw_value())
                .ok_or(Status::Fault)?;
            let in_region = at - region.start_addr().raw_value();
            let room = region.len() - in_region;
            let len = room.min(end - at);
            let file_offset = region
                .file_offset()
                .map(|fo| fo.start().saturating_add(in_region))
                .ok_or(Status::Fault)?;
            pieces.push(Piece {
                gpa: at,
                len,
                file_offset,
                region: index,
            });
            at += len;
        }
    }
    Ok(pieces)
}

/// The backing of a guest-placed object: a udmabuf over the guest's pages
/// when the host allows it, else a [`GuestPagesBacking`].
pub fn guest_pages_backing(
    memory: &GuestRamHandle,
    entries: &[Segment],
    udmabuf: Option<&UdmabufProvider>,
) -> Result<Box<dyn Backing>, Status> {
    let snapshot = vm_memory::GuestAddressSpace::memory(memory).into_inner();
    let pieces = resolve(&snapshot, entries)?;
    if let Some(dev) = udmabuf {
        match udmabuf_over(&snapshot, &pieces, dev) {
            Ok(backing) => return Ok(backing),
            // Not an error for the guest: the object is still valid, only
            // without a kernel dma-buf (e.g. the front-end's memfd is not
            // sealed against shrinking).
            Err(e) => log::debug!("guest pages: no udmabuf ({e}); emulating"),
        }
    }
    used_regions(&snapshot, &pieces)
        .and_then(|used| GuestPagesBacking::new(Arc::new(used), pieces))
        .map(|b| Box::new(b) as Box<dyn Backing>)
        .map_err(|e| {
            log::warn!("guest pages backing: {e}");
            Status::NoMem
        })
}

/// A memory table of only the regions `pieces` lie in. An object holds
/// that, not the whole snapshot, so a region the front-end removes (a new
/// `SET_MEM_TABLE`, `REM_MEM_REG`) is unmapped, and its file closed, once
/// no live object lies in it: the whole table would keep every region of
/// the old one mapped while any guest-pages object lives.
fn used_regions(mem: &GuestRam, pieces: &[Piece]) -> Result<GuestRam, ProviderError> {
    let mut indices: Vec<usize> = pieces.iter().map(|p| p.region).collect();
    indices.sort_unstable();
    indices.dedup();
    if indices.is_empty() {
        return Ok(GuestRam::new());
    }
    let mut keep = Vec::with_capacity(indices.len());
    for index in indices {
        let region = mem
            .iter()
            .nth(index)
            .ok_or_else(|| ProviderError::Unsuitable(format!("no region {index}")))?;
        // The table hands out its regions' `Arc`s only through removal,
        // which builds a new table and leaves `mem` as it is.
        let (_, arc) = mem
            .remove_region(region.start_addr(), region.len())
            .map_err(|e| ProviderError::Unsuitable(format!("region {index}: {e}")))?;
        keep.push(arc);
    }
    GuestRam::from_arc_regions(keep)
        .map_err(|e| ProviderError::Unsuitable(format!("the regions of an object: {e}")))
}

fn udmabuf_over(
    mem: &GuestRam,
    pieces: &[Piece],
    dev: &UdmabufProvider,
) -> Result<Box<dyn Backing>, ProviderError> {
    let regions: Vec<_> = mem.iter().collect();
    let items = udmabuf_items(pieces, page_size(), dev.list_limit(), dev.max_object_size())?;
    let mut list = Vec::with_capacity(items.len());
    let mut checked: Vec<usize> = Vec::new();
    for (region, offset, len) in items {
        let file = regions
            .get(region)
            .and_then(|r| r.file_offset())
            .map(|fo| fo.file().as_fd())
            .ok_or_else(|| ProviderError::Unsuitable(format!("region {region} has no file")))?;
        if !checked.contains(&region) {
            check_udmabuf_seals(file)?;
            checked.push(region);
        }
        list.push((file, offset, len));
    }
    Ok(Box::new(dev.from_list(&list)?))
}

/// The `UDMABUF_CREATE_LIST` items for `pieces` as (region, file offset,
/// length): pieces that continue each other in the same file are merged,
/// then the kernel's rules are checked beforehand so a refusal is a clear
/// reason to fall back, not an ioctl error: every offset and length a
/// multiple of the host page, at most `list_limit` items, at most
/// `size_limit` bytes in all (udmabuf's `size_limit_mb`).
fn udmabuf_items(
    pieces: &[Piece],
    page: u64,
    list_limit: u32,
    size_limit: u64,
) -> Result<Vec<(usize, u64, u64)>, ProviderError> {
    let mut items: Vec<(usize, u64, u64)> = Vec::with_capacity(pieces.len());
    let mut total = 0u64;
    for p in pieces {
        if !p.file_offset.is_multiple_of(page) || !p.len.is_multiple_of(page) {
            return Err(ProviderError::Unsuitable(format!(
                "guest range {:#x}+{:#x} is not aligned to the host page ({page} bytes)",
                p.gpa, p.len
            )));
        }
        total = total
            .checked_add(p.len)
            .filter(|&t| t <= size_limit)
            .ok_or_else(|| {
                ProviderError::Unsuitable(format!(
                    "more than udmabuf's size limit of {size_limit} bytes"
                ))
            })?;
        match items.last_mut() {
            Some((region, offset, len))
                if *region == p.region && offset.checked_add(*len) == Some(p.file_offset) =>
            {
                *len += p.len;
            }
            _ => items.push((p.region, p.file_offset, p.len)),
        }
    }
    if items.is_empty() || items.len() > list_limit as usize {
        return Err(ProviderError::Unsuitable(format!(
            "{} pieces; udmabuf takes 1 to {list_limit} (list_limit)",
            items.len()
        )));
    }
    Ok(items)
}

/// udmabuf's seal rule: the memfd must be sealed against shrinking (its
/// pages cannot go away under the dma-buf) and must not be sealed against
/// writing. Front-ends may hand out memfds without `F_SEAL_SHRINK`
/// (QEMU's `seal=off`); those objects are emulated.
fn check_udmabuf_seals(file: BorrowedFd<'_>) -> Result<(), ProviderError> {
    let seals = fcntl_get_seals(file).map_err(|e| {
        ProviderError::Unsuitable(format!("guest RAM file without seals (F_GET_SEALS: {e})"))
    })?;
    if !seals.contains(SealFlags::SHRINK) || seals.contains(SealFlags::WRITE) {
        return Err(ProviderError::Unsuitable(format!(
            "guest RAM memfd seals {seals:?}: udmabuf needs SHRINK and refuses WRITE"
        )));
    }
    Ok(())
}

/// A guest-placed object without a kernel dma-buf: its bytes are the guest
/// pages (read and written through the back-end's own mapping of guest
/// RAM, held alive by a table of the regions they lie in), its sync the
/// emulation memfd buffers get.
#[derive(Debug)]
pub struct GuestPagesBacking {
    mem: Arc<GuestRam>,
    pieces: Vec<Piece>,
    size: u64,
}

impl GuestPagesBacking {
    fn new(mem: Arc<GuestRam>, pieces: Vec<Piece>) -> Result<Self, ProviderError> {
        // The same guest range may be listed many times: the sum is checked,
        // so `walk`'s piece arithmetic below stays within u64.
        let size = pieces
            .iter()
            .try_fold(0u64, |sum, p| sum.checked_add(p.len))
            .ok_or_else(|| ProviderError::Unsuitable("guest pages add up past 2^64".into()))?;
        Ok(GuestPagesBacking { mem, pieces, size })
    }

    /// Calls `f(gpa, range in the caller's buffer)` for each piece that
    /// `offset..offset + len` of the object covers.
    fn walk(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ProviderError>,
    ) -> Result<(), ProviderError> {
        let out_of_range = ProviderError::OutOfRange {
            offset,
            len: len as u64,
            size: self.size,
        };
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.size)
            .ok_or(out_of_range)?;
        let mut piece_start = 0u64;
        let mut done = 0usize;
        for p in &self.pieces {
            let piece_end = piece_start + p.len;
            let from = offset.max(piece_start);
            let to = end.min(piece_end);
            if from < to {
                let n = usize::try_from(to - from).unwrap_or(usize::MAX);
                f(GuestAddress(p.gpa + (from - piece_start)), done..done + n)?;
                done += n;
            }
            if piece_end >= end {
                break;
            }
            piece_start = piece_end;
        }
        Ok(())
    }
}

fn guest_memory_error(e: vm_memory::GuestMemoryError) -> ProviderError {
    ProviderError::Host {
        op: "guest memory access",
        source: std::io::Error::other(e),
    }
}

impl Backing for GuestPagesBacking {
    fn size(&self) -> u64 {
        self.size
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        // No single fd holds pages scattered over guest RAM, and the
        // region's fd would expose all of it.
        None
    }

    fn is_real_dmabuf(&self) -> bool {
        false
    }

    fn size_is_fixed(&self) -> bool {
        // Guest pages are never placed in the window (section 7.5).
        false
    }

    fn sync(&self, flags: u64) -> Result<(), ProviderError> {
        // The memfd emulation: refuse what the kernel refuses, and order the
        // CPU's accesses as cache maintenance would (guest RAM is coherent).
        validate_sync_flags(flags)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ProviderError> {
        let mem = &self.mem;
        self.walk(offset, buf.len(), |gpa, range| {
            mem.read_slice(&mut buf[range], gpa)
                .map_err(guest_memory_error)
        })
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ProviderError> {
        let mem = &self.mem;
        self.walk(offset, data.len(), |gpa, range| {
            mem.write_slice(&data[range], gpa)
                .map_err(guest_memory_error)
        })
    }
}

/// A memory region named by what backs it, to tell which regions a new
/// memory table removed (section 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionKey {
    pub gpa: u64,
    pub len: u64,
    /// Device and inode of the backing file (0 when the region has none).
    pub file: (u64, u64),
    pub file_offset: u64,
}

/// The regions of one memory table.
pub fn region_keys(mem: &GuestRam) -> Vec<RegionKey> {
    mem.iter()
        .map(|r| {
            let (file, file_offset) = match r.file_offset() {
                Some(fo) => {
                    let id = fstat(fo.file())
                        .map(|st| (st.st_dev, st.st_ino))
                        .unwrap_or((0, fo.file().as_raw_fd() as u64));
                    (id, fo.start())
                }
                None => ((0, 0), 0),
            };
            RegionKey {
                gpa: r.start_addr().raw_value(),
                len: r.len(),
                file,
                file_offset,
            }
        })
        .collect()
}

/// The regions of `old` that `new` no longer has (same place, same backing).
pub fn removed_regions(old: &[RegionKey], new: &[RegionKey]) -> Vec<RegionKey> {
    old.iter().filter(|r| !new.contains(r)).copied().collect()
}

/// True when the guest-physical range `gpa..gpa + len` overlaps one of `regions`.
pub fn overlaps(regions: &[RegionKey], gpa: u64, len: u64) -> bool {
    let end = gpa.saturating_add(len);
    regions
        .iter()
        .any(|r| gpa < r.gpa.saturating_add(r.len) && r.gpa < end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{memfd_create, MemfdFlags};
    use vm_memory::FileOffset;

    const PAGE: u64 = 4096;

    fn memfd(size: u64) -> std::fs::File {
        let fd = memfd_create("guest-ram-test", MemfdFlags::CLOEXEC).expect("memfd");
        rustix::fs::ftruncate(&fd, size).expect("ftruncate");
        std::fs::File::from(fd)
    }

    /// Two adjacent regions: [0x10000, +16 pages) and [0x20000, +16 pages).
    fn two_regions() -> GuestRam {
        GuestRam::from_ranges_with_files([
            (
                GuestAddress(0x10000),
                (16 * PAGE) as usize,
                Some(FileOffset::new(memfd(16 * PAGE), 0)),
            ),
            (
                GuestAddress(0x20000),
                (16 * PAGE) as usize,
                Some(FileOffset::new(memfd(32 * PAGE), 8 * PAGE)),
            ),
        ])
        .expect("guest memory")
    }

    #[test]
    fn an_object_holds_only_the_regions_its_pages_lie_in() {
        let mem = two_regions();
        let in_second = [Segment {
            addr: 0x20000 + PAGE,
            len: 2 * PAGE,
        }];
        let pieces = resolve(&mem, &in_second).expect("in RAM");
        let used = used_regions(&mem, &pieces).expect("the regions");
        assert_eq!(used.num_regions(), 1);
        let region = used.iter().next().expect("one region");
        assert_eq!(region.start_addr(), GuestAddress(0x20000));
        let b = GuestPagesBacking::new(Arc::new(used), pieces).expect("backing");
        b.write_at(0, b"kept").expect("write");
        let mut out = [0u8; 4];
        mem.read_slice(&mut out, GuestAddress(0x20000 + PAGE))
            .expect("the same pages");
        assert_eq!(&out, b"kept");
        // Nothing of the object holds the first region: once the table
        // goes, only this test's handle on it is left.
        let (_, first) = mem
            .remove_region(GuestAddress(0x10000), 16 * PAGE)
            .expect("the first region");
        drop(mem);
        assert_eq!(
            Arc::strong_count(&first),
            1,
            "the object holds a region it does not use"
        );
        b.read_at(0, &mut out).expect("read");
        assert_eq!(&out, b"kept");
    }

    #[test]
    fn entries_resolve_to_file_offsets_and_split_at_region_ends() {
        let mem = two_regions();
        let seg = Segment {
            addr: 0x10000 + 15 * PAGE,
            len: 2 * PAGE,
        };
        let pieces = resolve(&mem, &[seg]).expect("inside RAM");
        assert_eq!(pieces.len(), 2);
        assert_eq!(
            (pieces[0].gpa, pieces[0].len, pieces[0].file_offset),
            (0x1f000, PAGE, 15 * PAGE)
        );
        assert_eq!(
            (pieces[1].gpa, pieces[1].len, pieces[1].file_offset),
            (0x20000, PAGE, 8 * PAGE)
        );
    }

    #[test]
    fn entries_outside_guest_ram_are_efault() {
        let mem = two_regions();
        for seg in [
            Segment { addr: 0, len: PAGE },
            Segment {
                addr: 0x20000 + 15 * PAGE,
                len: 2 * PAGE,
            },
            Segment {
                addr: u64::MAX - PAGE + 1,
                len: 2 * PAGE,
            },
        ] {
            assert_eq!(resolve(&mem, &[seg]), Err(Status::Fault), "{seg:?}");
        }
    }

    #[test]
    fn emulated_guest_pages_read_and_write_guest_memory() {
        let handle = GuestMemoryAtomic::new(two_regions());
        let entries = [
            Segment {
                addr: 0x20000,
                len: PAGE,
            },
            Segment {
                addr: 0x10000,
                len: PAGE,
            },
        ];
        let b = guest_pages_backing(&handle, &entries, None).expect("backing");
        assert_eq!(b.size(), 2 * PAGE);
        assert!(!b.is_real_dmabuf());
        b.write_at(PAGE - 2, b"abcd").expect("write across pieces");
        let mem = vm_memory::GuestAddressSpace::memory(&handle);
        let mut tail = [0u8; 2];
        mem.read_slice(&mut tail, GuestAddress(0x20000 + PAGE - 2))
            .expect("read");
        assert_eq!(&tail, b"ab");
        let mut head = [0u8; 2];
        mem.read_slice(&mut head, GuestAddress(0x10000))
            .expect("read");
        assert_eq!(&head, b"cd");
        let mut back = [0u8; 4];
        b.read_at(PAGE - 2, &mut back).expect("read back");
        assert_eq!(&back, b"abcd");
        assert!(b.read_at(2 * PAGE - 1, &mut back).is_err());
        assert!(b.sync(virtio_dmabuf_protocol::sync_flags::START).is_err());
        assert!(b.sync(virtio_dmabuf_protocol::sync_flags::RW).is_ok());
    }

    fn piece(region: usize, file_offset: u64, len: u64) -> Piece {
        Piece {
            gpa: 0x10000 + file_offset,
            len,
            file_offset,
            region,
        }
    }

    #[test]
    fn udmabuf_items_merge_contiguous_pieces_and_keep_the_kernel_limits() {
        let items = udmabuf_items(
            &[
                piece(0, 0, PAGE),
                piece(0, PAGE, 2 * PAGE),
                piece(1, 3 * PAGE, PAGE),
                piece(0, 8 * PAGE, PAGE),
            ],
            PAGE,
            1024,
            1 << 20,
        )
        .expect("fits");
        assert_eq!(
            items,
            [(0, 0, 3 * PAGE), (1, 3 * PAGE, PAGE), (0, 8 * PAGE, PAGE)]
        );
        let unaligned = udmabuf_items(&[piece(0, PAGE / 2, PAGE)], PAGE, 1024, 1 << 20);
        assert!(matches!(unaligned, Err(ProviderError::Unsuitable(_))));
        let short = udmabuf_items(&[piece(0, 0, PAGE / 2)], PAGE, 1024, 1 << 20);
        assert!(matches!(short, Err(ProviderError::Unsuitable(_))));
        // list_limit counts items after merging.
        let scattered: Vec<Piece> = (0..5).map(|i| piece(0, 2 * i * PAGE, PAGE)).collect();
        assert!(udmabuf_items(&scattered, PAGE, 5, 1 << 20).is_ok());
        assert!(matches!(
            udmabuf_items(&scattered, PAGE, 4, 1 << 20),
            Err(ProviderError::Unsuitable(_))
        ));
        // size_limit_mb, and no overflow of the total.
        assert!(udmabuf_items(&scattered, PAGE, 1024, 5 * PAGE).is_ok());
        assert!(udmabuf_items(&scattered, PAGE, 1024, 5 * PAGE - 1).is_err());
        let huge = [piece(0, 0, !(PAGE - 1)), piece(1, 0, PAGE)];
        assert!(udmabuf_items(&huge, PAGE, 1024, u64::MAX).is_err());
        assert!(udmabuf_items(&[], PAGE, 1024, u64::MAX).is_err());
    }

    #[test]
    fn udmabuf_seal_rule_is_shrink_required_and_write_refused() {
        let sealed = |seals: SealFlags| {
            let fd = memfd_create("seal-test", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
                .expect("memfd");
            rustix::fs::ftruncate(&fd, PAGE).expect("ftruncate");
            if !seals.is_empty() {
                rustix::fs::fcntl_add_seals(&fd, seals).expect("seal");
            }
            fd
        };
        assert!(check_udmabuf_seals(sealed(SealFlags::SHRINK).as_fd()).is_ok());
        assert!(check_udmabuf_seals(sealed(SealFlags::SHRINK | SealFlags::GROW).as_fd()).is_ok());
        assert!(check_udmabuf_seals(sealed(SealFlags::empty()).as_fd()).is_err());
        assert!(check_udmabuf_seals(sealed(SealFlags::SHRINK | SealFlags::WRITE).as_fd()).is_err());
        // A memfd made without MFD_ALLOW_SEALING carries F_SEAL_SEAL only.
        assert!(check_udmabuf_seals(memfd(PAGE).as_fd()).is_err());
    }

    #[test]
    fn guest_ram_udmabuf_refuses_falls_back_to_emulation_not_an_error() {
        // The front-end's memfds are not sealed against shrinking (and the
        // "device" is no udmabuf at all): the object is still made.
        let handle = GuestMemoryAtomic::new(two_regions());
        let fake_dev = memfd_create("not-udmabuf", MemfdFlags::CLOEXEC).expect("memfd");
        let dev = UdmabufProvider::with_device(fake_dev, 64 << 20, 1024);
        let entries = [Segment {
            addr: 0x10000,
            len: 2 * PAGE,
        }];
        let b = guest_pages_backing(&handle, &entries, Some(&dev)).expect("emulated");
        assert!(!b.is_real_dmabuf());
        assert_eq!(b.size(), 2 * PAGE);
        b.write_at(0, b"ram").expect("write");
        // Sealed memfds pass the seal rule and reach the (fake) device, whose
        // ENOTTY is a fallback too.
        let sealed_ram = GuestRam::from_ranges_with_files([(
            GuestAddress(0x10000),
            (4 * PAGE) as usize,
            Some(FileOffset::new(
                std::fs::File::from(crate::provider::sealed_memfd_for_tests(
                    4 * PAGE,
                    SealFlags::SHRINK,
                )),
                0,
            )),
        )])
        .expect("guest memory");
        let handle = GuestMemoryAtomic::new(sealed_ram);
        let b = guest_pages_backing(&handle, &entries, Some(&dev)).expect("emulated");
        assert!(!b.is_real_dmabuf());
    }

    #[test]
    fn sealed_guest_ram_becomes_a_real_udmabuf_where_the_host_has_it() {
        let dev = match UdmabufProvider::open() {
            Ok(dev) => dev,
            Err(ProviderError::MissingDevice { node, .. }) => {
                println!("guest RAM udmabuf real path skipped: {node} does not exist on this host");
                return;
            }
            Err(e) => panic!("/dev/udmabuf exists but cannot be used: {e}"),
        };
        let page = page_size();
        let ram = |seals: SealFlags| {
            let file =
                std::fs::File::from(crate::provider::sealed_memfd_for_tests(8 * page, seals));
            let mem = GuestRam::from_ranges_with_files([(
                GuestAddress(0x100000),
                (8 * page) as usize,
                Some(FileOffset::new(file, 0)),
            )])
            .expect("guest memory");
            GuestMemoryAtomic::new(mem)
        };
        let entries = [
            Segment {
                addr: 0x100000 + 4 * page,
                len: page,
            },
            Segment {
                addr: 0x100000,
                len: 2 * page,
            },
        ];
        let sealed = ram(SealFlags::SHRINK);
        let b = guest_pages_backing(&sealed, &entries, Some(&dev)).expect("udmabuf");
        assert!(b.is_real_dmabuf(), "sealed guest RAM is a real dma-buf");
        assert_eq!(b.size(), 3 * page);
        b.write_at(page - 2, b"guest").expect("write");
        let mem = vm_memory::GuestAddressSpace::memory(&sealed);
        let mut out = [0u8; 3];
        mem.read_slice(&mut out, GuestAddress(0x100000))
            .expect("read");
        assert_eq!(&out, b"est", "the dma-buf is the guest's own pages");
        let unsealed = ram(SealFlags::empty());
        let b = guest_pages_backing(&unsealed, &entries, Some(&dev)).expect("fallback");
        assert!(
            !b.is_real_dmabuf(),
            "no SHRINK seal: emulated, not an error"
        );
    }

    #[test]
    fn guest_pages_listed_past_2_pow_64_are_refused_not_wrapped() {
        let mem = Arc::new(two_regions());
        let many = vec![piece(0, 0, u64::MAX / 2 + 1), piece(0, 0, u64::MAX / 2 + 1)];
        assert!(GuestPagesBacking::new(mem, many).is_err());
    }

    #[test]
    fn removed_regions_are_found_by_backing_not_by_address_alone() {
        let mem = two_regions();
        let old = region_keys(&mem);
        assert_eq!(old.len(), 2);
        let only_first = vec![old[0]];
        assert_eq!(removed_regions(&old, &only_first), vec![old[1]]);
        // Same addresses, a different file: the old region is gone.
        let replaced = region_keys(&two_regions());
        assert_eq!(removed_regions(&old, &replaced).len(), 2);
        assert!(overlaps(&[old[1]], 0x20000 + PAGE, PAGE));
        assert!(!overlaps(&[old[1]], 0x10000, PAGE));
    }
}
