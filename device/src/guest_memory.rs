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

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use rustix::fs::{fstat, memfd_create, MemfdFlags};
use virtio_dmabuf_protocol::{Segment, Status};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

use crate::provider::{validate_sync_flags, Backing, ProviderError, UdmabufProvider};

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
            Err(e) => log::debug!("guest pages: UDMABUF_CREATE_LIST not usable ({e}); emulating"),
        }
    }
    GuestPagesBacking::new(snapshot, pieces)
        .map(|b| Box::new(b) as Box<dyn Backing>)
        .map_err(|e| {
            log::warn!("guest pages backing: {e}");
            Status::NoMem
        })
}

fn udmabuf_over(
    mem: &GuestRam,
    pieces: &[Piece],
    dev: &UdmabufProvider,
) -> Result<Box<dyn Backing>, ProviderError> {
    let regions: Vec<_> = mem.iter().collect();
    let mut items = Vec::with_capacity(pieces.len());
    for p in pieces {
        let file = regions
            .get(p.region)
            .and_then(|r| r.file_offset())
            .map(|fo| fo.file().as_fd())
            .ok_or(ProviderError::OutOfRange {
                offset: p.gpa,
                len: p.len,
                size: 0,
            })?;
        items.push((file, p.file_offset, p.len));
    }
    Ok(Box::new(dev.from_list(&items)?))
}

/// A guest-placed object without a kernel dma-buf: its bytes are the guest
/// pages (read and written through the back-end's own mapping of guest
/// RAM, held alive by a snapshot of the memory table), its sync the
/// emulation memfd buffers get.
#[derive(Debug)]
pub struct GuestPagesBacking {
    mem: Arc<GuestRam>,
    pieces: Vec<Piece>,
    size: u64,
    /// What [`Backing::fd`] hands out: there is no single fd for pages
    /// scattered over guest RAM, and the region fd would expose all of it.
    /// An empty memfd names the object without giving anything away.
    placeholder: OwnedFd,
}

impl GuestPagesBacking {
    fn new(mem: Arc<GuestRam>, pieces: Vec<Piece>) -> Result<Self, ProviderError> {
        let size = pieces.iter().map(|p| p.len).sum();
        let placeholder = memfd_create("vhost-device-dmabuf-guest-pages", MemfdFlags::CLOEXEC)
            .map_err(|e| ProviderError::Host {
                op: "memfd_create",
                source: e.into(),
            })?;
        Ok(GuestPagesBacking {
            mem,
            pieces,
            size,
            placeholder,
        })
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

    fn fd(&self) -> BorrowedFd<'_> {
        self.placeholder.as_fd()
    }

    fn is_real_dmabuf(&self) -> bool {
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
