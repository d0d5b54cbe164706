// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Memory the device can DMA to: pages this process allocates, locks, and
//! looks up in `/proc/self/pagemap` to learn their guest-physical
//! addresses (the device has no IOMMU in front of it: section 1, no
//! `VIRTIO_F_ACCESS_PLATFORM`).
//!
//! The preferred backing is 2 MiB hugetlb pages (the guest reserves them
//! with `/proc/sys/vm/nr_hugepages`): each is physically contiguous and the
//! kernel neither swaps nor migrates them. Without them, 4 KiB pages are
//! locked one by one; mlock keeps them resident, but the kernel may still
//! migrate them during compaction unless `vm.compact_unevictable_allowed`
//! is 0, so that fallback is for guests that can afford nothing better.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU16, Ordering};

use crate::driver::{BufferPool, GuestMemory, MemError};

pub const HUGE_PAGE: usize = 2 << 20;
pub const SMALL_PAGE: usize = 4096;

/// Which pages back the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// 2 MiB hugetlb pages.
    Huge,
    /// 4 KiB pages, locked.
    Small,
}

impl std::fmt::Display for PageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PageKind::Huge => "2 MiB hugetlb pages",
            PageKind::Small => "4 KiB pages",
        })
    }
}

impl PageKind {
    pub fn size(self) -> usize {
        match self {
            PageKind::Huge => HUGE_PAGE,
            PageKind::Small => SMALL_PAGE,
        }
    }
}

/// Why no DMA memory could be had.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    #[error("{kind}: {what}: {source}")]
    Os {
        kind: PageKind,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{kind}: /proc/self/pagemap hides page frame numbers (needs CAP_SYS_ADMIN)")]
    PfnHidden { kind: PageKind },
    #[error("{kind}: page at {vaddr:#x} is not present after locking it")]
    NotPresent { kind: PageKind, vaddr: usize },
    #[error("{kind}: page at {vaddr:#x} has physical address {gpa:#x}, not aligned to its size")]
    Misaligned {
        kind: PageKind,
        vaddr: usize,
        gpa: u64,
    },
    #[error("{huge}; and the fallback, {small}")]
    Both {
        huge: Box<DmaError>,
        small: Box<DmaError>,
    },
    #[error("{0} bytes of DMA memory asked for")]
    BadSize(usize),
}

/// One `/proc/self/pagemap` entry (Documentation/admin-guide/mm/pagemap.rst).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagemapEntry {
    NotPresent,
    /// Present, but the PFN reads as 0: the reader lacks CAP_SYS_ADMIN.
    Hidden,
    Present {
        pfn: u64,
    },
}

impl PagemapEntry {
    const PRESENT: u64 = 1 << 63;
    const PFN_MASK: u64 = (1 << 55) - 1;

    /// Bit 63 present, bits 0-54 the page frame number.
    pub fn decode(raw: u64) -> PagemapEntry {
        if raw & Self::PRESENT == 0 {
            return PagemapEntry::NotPresent;
        }
        match raw & Self::PFN_MASK {
            0 => PagemapEntry::Hidden,
            pfn => PagemapEntry::Present { pfn },
        }
    }
}

/// One piece of the memory: `len` physically and virtually contiguous
/// bytes at guest-physical `gpa` and host address `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub gpa: u64,
    pub host: usize,
    pub len: u64,
}

/// Sorts pages by guest-physical address and merges the ones that
/// continue each other physically into `(gpa, len)` ranges: what a
/// [`BufferPool`] hands out must be contiguous for the device.
pub fn coalesce(pages: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut sorted: Vec<(u64, u64)> = pages.iter().copied().filter(|&(_, l)| l > 0).collect();
    sorted.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (gpa, len) in sorted {
        match out.last_mut() {
            Some((start, l)) if *start + *l == gpa => *l += len,
            _ => out.push((gpa, len)),
        }
    }
    out
}

/// The translation table from guest-physical to host addresses.
///
/// Chunks are kept sorted by `gpa`; neighbours that are contiguous both
/// physically and virtually are one chunk. An access may span chunks that
/// are physically adjacent (one pool range) but live apart in this
/// process; it is then copied piece by piece.
#[derive(Debug, Clone, Default)]
pub struct PhysMap {
    chunks: Vec<Chunk>,
}

impl PhysMap {
    pub fn new(mut pages: Vec<Chunk>) -> PhysMap {
        pages.sort_unstable_by_key(|c| c.gpa);
        let mut chunks: Vec<Chunk> = Vec::with_capacity(pages.len());
        for p in pages.into_iter().filter(|p| p.len > 0) {
            match chunks.last_mut() {
                Some(c)
                    if c.gpa + c.len == p.gpa
                        && u64::try_from(c.host).is_ok_and(|h| h + c.len == p.host as u64) =>
                {
                    c.len += p.len
                }
                _ => chunks.push(p),
            }
        }
        PhysMap { chunks }
    }

    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// The physical ranges a pool may hand out.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        coalesce(
            &self
                .chunks
                .iter()
                .map(|c| (c.gpa, c.len))
                .collect::<Vec<_>>(),
        )
    }

    /// The chunk holding `gpa` and `gpa`'s distance into it.
    fn find(&self, gpa: u64) -> Option<(&Chunk, u64)> {
        let i = self
            .chunks
            .partition_point(|c| c.gpa <= gpa)
            .checked_sub(1)?;
        let c = &self.chunks[i];
        let off = gpa - c.gpa;
        (off < c.len).then_some((c, off))
    }

    /// The host pieces `(address, len)` of `len` bytes at `gpa`, or `None`
    /// if any byte is outside the memory.
    pub fn pieces(&self, gpa: u64, len: usize) -> Option<Vec<(usize, usize)>> {
        let mut out = Vec::new();
        let mut at = gpa;
        let mut left = len as u64;
        gpa.checked_add(left)?;
        while left > 0 {
            let (c, off) = self.find(at)?;
            let n = left.min(c.len - off);
            out.push((
                c.host + usize::try_from(off).ok()?,
                usize::try_from(n).ok()?,
            ));
            at += n;
            left -= n;
        }
        Some(out)
    }

    /// The host address of a naturally aligned `u16` at `gpa`.
    fn u16_addr(&self, gpa: u64) -> Option<usize> {
        if !gpa.is_multiple_of(2) {
            return None;
        }
        let (c, off) = self.find(gpa)?;
        // Chunks have even lengths (whole pages), so an aligned u16 never
        // straddles one.
        (off + 2 <= c.len).then(|| c.host + off as usize)
    }
}

/// Guest memory over locked pages with known guest-physical addresses.
///
/// The host side of every chunk must stay mapped and writable for as long
/// as the map is used: [`DmaMemory`] owns such a mapping; tests build one
/// over a heap buffer.
#[derive(Debug)]
pub struct DmaMemory {
    map: PhysMap,
    /// The mapping the chunks point into (address, length), unmapped on
    /// drop; `None` when the memory is borrowed (tests).
    mapping: Option<(usize, usize)>,
    kind: PageKind,
}

fn os_err(kind: PageKind, what: &'static str) -> impl FnOnce(io::Error) -> DmaError {
    move |source| DmaError::Os { kind, what, source }
}

impl DmaMemory {
    /// `bytes` (rounded up to whole 2 MiB pages) of hugetlb memory, or of
    /// 4 KiB pages if there are no huge pages to be had.
    pub fn allocate(bytes: usize) -> Result<DmaMemory, DmaError> {
        if bytes == 0 || bytes > isize::MAX as usize / 2 {
            return Err(DmaError::BadSize(bytes));
        }
        let len = bytes.next_multiple_of(HUGE_PAGE);
        match Self::allocate_kind(len, PageKind::Huge) {
            Ok(m) => Ok(m),
            Err(huge) => {
                log::warn!("DMA memory: {huge}; falling back to 4 KiB pages");
                Self::allocate_kind(len, PageKind::Small).map_err(|small| DmaError::Both {
                    huge: Box::new(huge),
                    small: Box::new(small),
                })
            }
        }
    }

    /// `len` bytes (a multiple of the page size) of pages of `kind`.
    pub fn allocate_kind(len: usize, kind: PageKind) -> Result<DmaMemory, DmaError> {
        let page = kind.size();
        if len == 0 || !len.is_multiple_of(page) {
            return Err(DmaError::BadSize(len));
        }
        let base = map_pages(len, kind)?;
        let mut mem = DmaMemory {
            map: PhysMap::default(),
            mapping: Some((base, len)),
            kind,
        };
        // From here on, `mem`'s drop unmaps on every error.
        mem.map = PhysMap::new(lock_and_translate(base, len, kind)?);
        Ok(mem)
    }

    /// Memory over chunks someone else keeps mapped (tests).
    ///
    /// # Safety
    ///
    /// Every chunk's `[host, host + len)` must be valid for reads and
    /// writes, 2-byte aligned, not otherwise borrowed by Rust code, and stay
    /// so for the life of the returned value.
    pub unsafe fn from_chunks(chunks: Vec<Chunk>, kind: PageKind) -> DmaMemory {
        DmaMemory {
            map: PhysMap::new(chunks),
            mapping: None,
            kind,
        }
    }

    pub fn page_kind(&self) -> PageKind {
        self.kind
    }

    /// Bytes of memory.
    pub fn len(&self) -> u64 {
        self.map.chunks.iter().map(|c| c.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The physically contiguous ranges, ascending.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.map.ranges()
    }

    pub fn phys_map(&self) -> &PhysMap {
        &self.map
    }

    /// A fresh pool over all of the memory.
    pub fn pool(&self) -> BufferPool {
        BufferPool::new(&self.ranges())
    }

    fn pieces(&self, gpa: u64, len: usize) -> Result<Vec<(usize, usize)>, MemError> {
        self.map.pieces(gpa, len).ok_or(MemError { gpa, len })
    }

    fn atomic_u16(&self, gpa: u64) -> Result<&AtomicU16, MemError> {
        let addr = self.map.u16_addr(gpa).ok_or(MemError { gpa, len: 2 })?;
        // SAFETY: `addr` is 2-byte aligned and inside memory that stays
        // mapped for as long as `self` lives (the invariant of
        // `allocate_kind`/`from_chunks`); the device's and our other
        // accesses to it are atomic or ordered by the ring protocol.
        Ok(unsafe { AtomicU16::from_ptr(addr as *mut u16) })
    }
}

impl GuestMemory for DmaMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let mut at = 0;
        for (host, n) in self.pieces(gpa, buf.len())? {
            // SAFETY: `[host, host + n)` is inside the memory (found by
            // `pieces`), which stays mapped while `self` lives, and `buf`
            // is a distinct buffer with room for `n` more bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(host as *const u8, buf[at..].as_mut_ptr(), n);
            }
            at += n;
        }
        Ok(())
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        let mut at = 0;
        for (host, n) in self.pieces(gpa, buf.len())? {
            // SAFETY: as in `read`; the memory is writable and `buf` does
            // not alias it.
            unsafe {
                std::ptr::copy_nonoverlapping(buf[at..].as_ptr(), host as *mut u8, n);
            }
            at += n;
        }
        Ok(())
    }

    fn load_u16(&self, gpa: u64) -> Result<u16, MemError> {
        Ok(u16::from_le(self.atomic_u16(gpa)?.load(Ordering::Acquire)))
    }

    fn store_u16(&self, gpa: u64, value: u16) -> Result<(), MemError> {
        self.atomic_u16(gpa)?
            .store(value.to_le(), Ordering::Release);
        Ok(())
    }
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        if let Some((base, len)) = self.mapping {
            // SAFETY: exactly the mapping `map_pages` made; every access
            // borrows `self`, so none is in progress. The device must have
            // been stopped before (the session resets it first).
            unsafe {
                libc::munmap(base as *mut libc::c_void, len);
            }
        }
    }
}

/// Maps `len` bytes of pages of `kind`, populated and locked.
fn map_pages(len: usize, kind: PageKind) -> Result<usize, DmaError> {
    let flags = match kind {
        PageKind::Huge => {
            libc::MAP_SHARED
                | libc::MAP_ANONYMOUS
                | libc::MAP_HUGETLB
                | libc::MAP_HUGE_2MB
                | libc::MAP_POPULATE
                | libc::MAP_LOCKED
        }
        // Populated by mlock below, after transparent huge pages are
        // refused (khugepaged would otherwise move the pages).
        PageKind::Small => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
    };
    // SAFETY: a new anonymous mapping at an address of the kernel's
    // choice; it overlaps nothing we own and the result is checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(os_err(kind, "mmap")(io::Error::last_os_error()));
    }
    Ok(ptr as usize)
}

/// Refuses THP (small pages), touches and locks every page of the mapping
/// at `base` and reads their physical addresses.
fn lock_and_translate(base: usize, len: usize, kind: PageKind) -> Result<Vec<Chunk>, DmaError> {
    let page = kind.size();
    if kind == PageKind::Small {
        // SAFETY: advice on our own fresh mapping; it changes no memory.
        if unsafe { libc::madvise(base as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE) } != 0 {
            return Err(os_err(kind, "madvise(MADV_NOHUGEPAGE)")(
                io::Error::last_os_error(),
            ));
        }
    }
    for off in (0..len).step_by(SMALL_PAGE) {
        // SAFETY: inside our own fresh read-write mapping, which no Rust
        // reference points into yet; writing a zero faults the page in.
        unsafe { ((base + off) as *mut u8).write_volatile(0) };
    }
    // SAFETY: locks pages of our own mapping; no memory changes.
    if unsafe { libc::mlock(base as *const libc::c_void, len) } != 0 {
        return Err(os_err(kind, "mlock")(io::Error::last_os_error()));
    }
    let pagemap =
        File::open("/proc/self/pagemap").map_err(os_err(kind, "open /proc/self/pagemap"))?;
    let mut chunks = Vec::with_capacity(len / page);
    for off in (0..len).step_by(page) {
        let vaddr = base + off;
        let mut raw = [0u8; 8];
        let index = (vaddr / SMALL_PAGE) as u64 * 8;
        pagemap
            .read_exact_at(&mut raw, index)
            .map_err(os_err(kind, "read /proc/self/pagemap"))?;
        let gpa = match PagemapEntry::decode(u64::from_le_bytes(raw)) {
            PagemapEntry::Present { pfn } => pfn * SMALL_PAGE as u64,
            PagemapEntry::Hidden => return Err(DmaError::PfnHidden { kind }),
            PagemapEntry::NotPresent => return Err(DmaError::NotPresent { kind, vaddr }),
        };
        if !gpa.is_multiple_of(page as u64) {
            return Err(DmaError::Misaligned { kind, vaddr, gpa });
        }
        chunks.push(Chunk {
            gpa,
            host: vaddr,
            len: page as u64,
        });
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pagemap_entries_decode_present_hidden_and_absent() {
        assert_eq!(
            PagemapEntry::decode((1 << 63) | 0x1234),
            PagemapEntry::Present { pfn: 0x1234 }
        );
        // Bits 55-62 (soft-dirty, exclusive, file, swapped) are not PFN bits.
        assert_eq!(
            PagemapEntry::decode((1 << 63) | (1 << 55) | (1 << 61) | 0x42),
            PagemapEntry::Present { pfn: 0x42 }
        );
        assert_eq!(PagemapEntry::decode(1 << 63), PagemapEntry::Hidden);
        assert_eq!(PagemapEntry::decode(0x1234), PagemapEntry::NotPresent);
        assert_eq!(
            PagemapEntry::decode(u64::MAX),
            PagemapEntry::Present { pfn: (1 << 55) - 1 }
        );
    }

    #[test]
    fn adjacent_physical_pages_coalesce_in_any_order() {
        let m = 2 << 20;
        let pages = [(5 * m, m), (3 * m, m), (4 * m, m), (9 * m, m), (0, 0)];
        assert_eq!(coalesce(&pages), vec![(3 * m, 3 * m), (9 * m, m)]);
        assert_eq!(coalesce(&[]), vec![]);
    }

    /// A heap buffer split into 4 KiB "pages" placed at made-up guest
    /// addresses: page i of the buffer at `gpas[i]`.
    fn fake(gpas: &[u64]) -> (Vec<u64>, DmaMemory) {
        let mut backing = vec![0u64; gpas.len() * SMALL_PAGE / 8];
        let base = backing.as_mut_ptr() as usize;
        let chunks = gpas
            .iter()
            .enumerate()
            .map(|(i, &gpa)| Chunk {
                gpa,
                host: base + i * SMALL_PAGE,
                len: SMALL_PAGE as u64,
            })
            .collect();
        // SAFETY: the chunks cover `backing`, which is 8-byte aligned, only
        // touched through the returned memory, and outlives it in every
        // test (returned together, dropped in reverse order).
        let mem = unsafe { DmaMemory::from_chunks(chunks, PageKind::Small) };
        (backing, mem)
    }

    #[test]
    fn the_pool_spans_pages_that_are_adjacent_only_physically() {
        // Buffer page 0 is at 0x11000, page 1 at 0x10000: one physical
        // range, two host pieces in reverse order.
        let (_b, mem) = fake(&[0x11000, 0x10000, 0x40000]);
        assert_eq!(mem.ranges(), vec![(0x10000, 0x2000), (0x40000, 0x1000)]);
        assert_eq!(mem.phys_map().chunks().len(), 3);
        let pool = mem.pool();
        assert_eq!(pool.free_bytes(), 0x3000);
        let b = pool.alloc(0x1800, 8).unwrap();
        assert_eq!(b.gpa, 0x10000);
        let data: Vec<u8> = (0..0x1800u32).map(|i| (i % 251) as u8).collect();
        mem.write(b.gpa, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        mem.read(b.gpa, &mut back).unwrap();
        assert_eq!(back, data);
        // The bytes past 0x11000 went to the buffer's first page.
        let mut first = [0u8; 4];
        mem.read(0x11000, &mut first).unwrap();
        assert_eq!(first, data[0x1000..0x1004]);
    }

    #[test]
    fn virtually_and_physically_contiguous_pages_are_one_chunk() {
        let (_b, mem) = fake(&[0x20000, 0x21000, 0x22000, 0x30000]);
        assert_eq!(mem.phys_map().chunks().len(), 2);
        assert_eq!(mem.len(), 0x4000);
    }

    #[test]
    fn accesses_outside_every_page_are_errors() {
        let (_b, mem) = fake(&[0x10000, 0x12000]);
        let mut b = [0u8; 8];
        assert_eq!(
            mem.read(0xfffc, &mut b),
            Err(MemError {
                gpa: 0xfffc,
                len: 8
            })
        );
        // Straddles the hole between the two pages.
        assert!(mem.write(0x10ffc, &[1; 8]).is_err());
        assert!(mem.read(u64::MAX - 2, &mut b).is_err());
        assert!(mem.load_u16(0x11000).is_err());
        assert!(mem.store_u16(0x10001, 1).is_err());
        mem.read(0x12ff8, &mut b).unwrap();
        assert!(mem.read(0x12ff9, &mut b).is_err());
    }

    #[test]
    fn ring_indices_are_little_endian_atomics() {
        let (_b, mem) = fake(&[0x10000]);
        mem.store_u16(0x10ffe, 0xbeef).unwrap();
        assert_eq!(mem.load_u16(0x10ffe).unwrap(), 0xbeef);
        let mut raw = [0u8; 2];
        mem.read(0x10ffe, &mut raw).unwrap();
        assert_eq!(raw, [0xef, 0xbe]);
    }

    /// The real allocation where the host allows it (root for the PFNs);
    /// elsewhere the error must say which page size failed.
    #[test]
    fn allocation_reports_pages_or_which_kind_failed() {
        match DmaMemory::allocate(HUGE_PAGE) {
            Ok(mem) => {
                assert_eq!(mem.len(), HUGE_PAGE as u64);
                let gpa = mem.ranges()[0].0;
                mem.write(gpa + 8, b"dma").unwrap();
                let mut b = [0u8; 3];
                mem.read(gpa + 8, &mut b).unwrap();
                assert_eq!(&b, b"dma");
            }
            Err(e) => {
                let text = e.to_string();
                assert!(text.starts_with("2 MiB hugetlb pages: "), "{text}");
            }
        }
    }
}
