// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Shared memory region 0 as the front-end holds it: a window reserved in
//! the VMM's address space, into which `VHOST_USER_BACKEND_SHMEM_MAP` maps
//! the back-end's fds (section 7.5, `MAP_SHM`).
//!
//! The window is an anonymous `PROT_NONE` reservation of the region size;
//! a map replaces part of it with `MAP_FIXED`, an unmap puts the
//! reservation back. Reads and writes from the test go through the real
//! mapping, so they see the very pages the daemon's object holds. A read of
//! a range that is not mapped is refused (it would fault), never attempted.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Mutex, PoisonError, RwLock};

/// One live `SHMEM_MAP` in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmMapping {
    pub offset: u64,
    pub len: u64,
    pub fd_offset: u64,
    pub writable: bool,
}

/// What the window refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShmError {
    #[error("range {offset:#x}+{len:#x} is not (entirely) mapped in the window")]
    NotMapped { offset: u64, len: u64 },
    #[error("range {offset:#x}+{len:#x} is mapped read-only")]
    ReadOnly { offset: u64, len: u64 },
}

const PAGE: u64 = 4096;

/// The front-end's view of one shared memory region.
#[derive(Debug)]
pub struct ShmWindow {
    /// Start of the reservation (an address, kept as an integer so the
    /// window is `Send + Sync` without an `unsafe impl`).
    base: usize,
    size: u64,
    maps: RwLock<BTreeMap<u64, ShmMapping>>,
    /// Every map and unmap the back-end asked for, in order.
    history: Mutex<Vec<ShmOp>>,
}

/// A back-end request the window served (or refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShmOp {
    Map { mapping: ShmMapping, errno: i32 },
    Unmap { offset: u64, len: u64, errno: i32 },
}

fn page_aligned(v: u64) -> bool {
    v.is_multiple_of(PAGE)
}

impl ShmWindow {
    /// Reserves `size` bytes of address space (a multiple of the page size).
    pub fn new(size: u64) -> io::Result<Self> {
        if size == 0 || !page_aligned(size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("shared memory size {size:#x} is not a non-zero page multiple"),
            ));
        }
        let len =
            usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's
        // choice; it overlaps nothing we own. The result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ShmWindow {
            base: ptr as usize,
            size,
            maps: RwLock::new(BTreeMap::new()),
            history: Mutex::new(Vec::new()),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The live mappings, by offset.
    pub fn mappings(&self) -> Vec<ShmMapping> {
        self.maps
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .copied()
            .collect()
    }

    /// Every request served so far.
    pub fn history(&self) -> Vec<ShmOp> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, op: ShmOp) {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(op);
    }

    /// Serves `SHMEM_MAP`: maps `len` bytes of `fd` from `fd_offset` at
    /// `offset` in the window. Returns an errno on refusal: a range that is
    /// not page-aligned or leaves the window (`EINVAL`), overlaps a live
    /// mapping (`EEXIST`), or lies past the end of a regular file (`EINVAL`,
    /// it would fault on access).
    pub fn map(
        &self,
        offset: u64,
        len: u64,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        writable: bool,
    ) -> Result<(), i32> {
        let mapping = ShmMapping {
            offset,
            len,
            fd_offset,
            writable,
        };
        let result = self.do_map(mapping, fd);
        self.record(ShmOp::Map {
            mapping,
            errno: result.err().unwrap_or(0),
        });
        result
    }

    fn do_map(&self, m: ShmMapping, fd: BorrowedFd<'_>) -> Result<(), i32> {
        let end = m.offset.checked_add(m.len).ok_or(libc::EINVAL)?;
        if m.len == 0
            || !page_aligned(m.offset)
            || !page_aligned(m.len)
            || !page_aligned(m.fd_offset)
            || end > self.size
        {
            return Err(libc::EINVAL);
        }
        let file_end = m.fd_offset.checked_add(m.len).ok_or(libc::EINVAL)?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `fd` is a live descriptor for the duration of the borrow
        // and `st` is a writable stat buffer.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } == 0 {
            // SAFETY: fstat succeeded, so it filled the buffer.
            let st = unsafe { st.assume_init() };
            let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
            if regular && (st.st_size as u64) < file_end {
                return Err(libc::EINVAL);
            }
        }
        let mut maps = self.maps.write().unwrap_or_else(PoisonError::into_inner);
        let overlaps = maps
            .range(..end)
            .next_back()
            .is_some_and(|(_, prev)| prev.offset + prev.len > m.offset);
        if overlaps {
            return Err(libc::EEXIST);
        }
        let prot = libc::PROT_READ | if m.writable { libc::PROT_WRITE } else { 0 };
        let addr = self.base + m.offset as usize;
        // SAFETY: [addr, addr + len) lies inside our own reservation (checked
        // against `size` above) and holds no live mapping (checked against
        // `maps` under the write lock), so MAP_FIXED replaces only reserved
        // PROT_NONE pages that no reference points into.
        let ptr = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                m.len as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                m.fd_offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        maps.insert(m.offset, m);
        Ok(())
    }

    /// Serves `SHMEM_UNMAP`: the range must cover whole live mappings and
    /// at least one (`EINVAL` otherwise). The reservation is restored.
    pub fn unmap(&self, offset: u64, len: u64) -> Result<(), i32> {
        let result = self.do_unmap(offset, len);
        self.record(ShmOp::Unmap {
            offset,
            len,
            errno: result.err().unwrap_or(0),
        });
        result
    }

    fn do_unmap(&self, offset: u64, len: u64) -> Result<(), i32> {
        let end = offset.checked_add(len).ok_or(libc::EINVAL)?;
        if len == 0 || end > self.size {
            return Err(libc::EINVAL);
        }
        let mut maps = self.maps.write().unwrap_or_else(PoisonError::into_inner);
        let inside: Vec<u64> = maps
            .range(offset..end)
            .filter(|(_, m)| m.offset + m.len <= end)
            .map(|(&o, _)| o)
            .collect();
        let straddles = maps
            .range(..end)
            .next_back()
            .is_some_and(|(_, m)| m.offset + m.len > end && m.offset < end)
            || maps
                .range(..offset)
                .next_back()
                .is_some_and(|(_, m)| m.offset + m.len > offset);
        if inside.is_empty() || straddles {
            return Err(libc::EINVAL);
        }
        for o in inside {
            if let Some(m) = maps.remove(&o) {
                self.reserve(m.offset, m.len)?;
            }
        }
        Ok(())
    }

    /// Puts the `PROT_NONE` reservation back over a range of the window.
    fn reserve(&self, offset: u64, len: u64) -> Result<(), i32> {
        let addr = self.base + offset as usize;
        // SAFETY: the range is inside our reservation and was a mapping we
        // made; it was removed from `maps` under the write lock, so no reader
        // is copying from it.
        let ptr = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        Ok(())
    }

    /// Checks that [offset, offset + len) is covered by live mappings
    /// (writable ones if `write`).
    fn check_covered(
        maps: &BTreeMap<u64, ShmMapping>,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<(), ShmError> {
        let not_mapped = ShmError::NotMapped { offset, len };
        let end = offset.checked_add(len).ok_or(not_mapped.clone())?;
        let mut at = offset;
        while at < end {
            let (_, m) = maps
                .range(..=at)
                .next_back()
                .filter(|(_, m)| m.offset + m.len > at)
                .ok_or(not_mapped.clone())?;
            if write && !m.writable {
                return Err(ShmError::ReadOnly { offset, len });
            }
            at = m.offset + m.len;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of the window, as the guest would
    /// through the shared memory BAR.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, ShmError> {
        let maps = self.maps.read().unwrap_or_else(PoisonError::into_inner);
        Self::check_covered(&maps, offset, len as u64, false)?;
        let mut out = vec![0u8; len];
        // SAFETY: the range is inside live mappings of the window (checked
        // above, and the read lock keeps them from being unmapped), and
        // `out` is a distinct heap buffer of `len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.base + offset as usize) as *const u8,
                out.as_mut_ptr(),
                len,
            );
        }
        Ok(out)
    }

    /// Writes `data` at `offset` of the window.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), ShmError> {
        let maps = self.maps.read().unwrap_or_else(PoisonError::into_inner);
        Self::check_covered(&maps, offset, data.len() as u64, true)?;
        // SAFETY: the range is inside live writable mappings (checked above,
        // held by the read lock), and `data` does not alias the window.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.base + offset as usize) as *mut u8,
                data.len(),
            );
        }
        Ok(())
    }

    /// Drops every mapping (the front-end's cleanup on disconnect).
    pub fn clear(&self) {
        let mut maps = self.maps.write().unwrap_or_else(PoisonError::into_inner);
        let all: Vec<ShmMapping> = maps.values().copied().collect();
        for m in all {
            if self.reserve(m.offset, m.len).is_ok() {
                maps.remove(&m.offset);
            }
        }
    }
}

impl Drop for ShmWindow {
    fn drop(&mut self) {
        // SAFETY: the whole reservation is ours and nothing borrows from it
        // once the window is dropped (reads copy out under a lock we own).
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.size as usize);
        }
    }
}

/// A memfd holding `bytes`, sealed against shrinking and growing (tests of
/// the window, a host export, or an object another device of the VM
/// publishes).
pub fn memfd_with(name: &str, bytes: &[u8]) -> io::Result<std::fs::File> {
    use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
    use std::io::Write;
    let fd = memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    // A buffer of fixed size, as a device's is: the daemon places only
    // such a host export in the window.
    fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn map_read_write_unmap_through_the_window() {
        let w = ShmWindow::new(16 * PAGE).unwrap();
        let mut page = vec![0u8; 2 * PAGE as usize];
        page[PAGE as usize..PAGE as usize + 5].copy_from_slice(b"hello");
        let f = memfd_with("t", &page).unwrap();
        assert_eq!(w.read(0, 1), Err(ShmError::NotMapped { offset: 0, len: 1 }));
        w.map(4 * PAGE, PAGE, f.as_fd(), PAGE, false).unwrap();
        assert_eq!(w.read(4 * PAGE, 5).unwrap(), b"hello");
        assert!(matches!(
            w.write(4 * PAGE, b"x"),
            Err(ShmError::ReadOnly { .. })
        ));
        // Overlap, misalignment, out of window, past the file end.
        assert_eq!(w.map(4 * PAGE, PAGE, f.as_fd(), 0, true), Err(libc::EEXIST));
        assert_eq!(
            w.map(5 * PAGE + 1, PAGE, f.as_fd(), 0, true),
            Err(libc::EINVAL)
        );
        assert_eq!(
            w.map(16 * PAGE, PAGE, f.as_fd(), 0, true),
            Err(libc::EINVAL)
        );
        assert_eq!(
            w.map(6 * PAGE, 2 * PAGE, f.as_fd(), PAGE, true),
            Err(libc::EINVAL)
        );
        w.map(5 * PAGE, PAGE, f.as_fd(), PAGE, true).unwrap();
        w.write(5 * PAGE, b"HE").unwrap();
        // Both window pages map the same file page: the write shows in both.
        assert_eq!(w.read(4 * PAGE, 5).unwrap(), b"HEllo");
        // A read across both adjacent mappings works.
        assert_eq!(
            w.read(4 * PAGE, PAGE as usize + 2).unwrap().len(),
            PAGE as usize + 2
        );
        assert_eq!(w.unmap(4 * PAGE, PAGE / 2), Err(libc::EINVAL));
        w.unmap(4 * PAGE, PAGE).unwrap();
        assert!(w.read(4 * PAGE, 1).is_err());
        assert_eq!(w.mappings().len(), 1);
        w.clear();
        assert!(w.mappings().is_empty());
        assert_eq!(w.history().len(), 8);
    }
}
