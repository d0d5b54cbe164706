// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A shared mapping of a buffer fd: for the buffers that do not support
//! `pread`/`pwrite` (dma-bufs), for large memfds' copies, and for the slabs
//! small memfd objects are extents of (`slab.rs`).

use std::fmt;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};
use vm_memory::VolatileSlice;

use super::{check_range, ProviderError};

/// `len` bytes of a buffer mapped `MAP_SHARED`, unmapped on drop.
///
/// The memory is shared with the kernel, the front-end and the guest, so no
/// Rust reference to it is ever made: bytes are copied in and out through
/// raw pointers.
///
/// Only for fds whose size cannot change under the mapping (kernel
/// dma-bufs, the daemon's own sealed memfds): a file its owner truncates
/// makes every access past the new end a `SIGBUS`, so other fds are read
/// with `pread` instead.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: a `Mapping` owns its address range (nothing else unmaps it) and only
// hands out copies of the bytes, so it can move between threads.
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` only allows copies to and from the shared memory, which
// other processes touch concurrently anyway; no Rust reference to the mapped
// bytes exists, so concurrent copies from several threads alias nothing.
unsafe impl Sync for Mapping {}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

impl Mapping {
    /// Maps the first `len` bytes of `fd` shared, read-write or read-only.
    pub(crate) fn new(
        fd: BorrowedFd<'_>,
        len: usize,
        writable: bool,
    ) -> Result<Self, ProviderError> {
        if len == 0 {
            return Err(ProviderError::BadSize {
                size: 0,
                max: isize::MAX as u64,
            });
        }
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: a null hint lets the kernel pick a fresh range, so no
        // existing memory is replaced; the result is only used as raw bytes
        // through this type.
        let addr = unsafe { mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0) }
            .map_err(|e| ProviderError::host("mmap", e))?;
        let ptr = NonNull::new(addr.cast::<u8>()).ok_or(ProviderError::Host {
            op: "mmap",
            source: std::io::Error::other("mmap returned a null address"),
        })?;
        Ok(Mapping { ptr, len, writable })
    }

    /// Copies `buf.len()` bytes from `offset` into `buf`.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ProviderError> {
        let start = self.start(offset, buf.len())?;
        // SAFETY: `start..start + buf.len()` lies within the live mapping
        // (checked by `start`), and `buf` is a distinct Rust buffer, so the
        // ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(start), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `data` to `offset`.
    pub(crate) fn write(&self, offset: u64, data: &[u8]) -> Result<(), ProviderError> {
        if !self.writable {
            return Err(super::imported::read_only_write());
        }
        let start = self.start(offset, data.len())?;
        // SAFETY: `start..start + data.len()` lies within the live mapping
        // (checked by `start`), which is mapped writable; `data` is a distinct
        // Rust buffer, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(start), data.len())
        };
        Ok(())
    }

    /// Copies `dst.len()` bytes from `offset` into guest memory.
    pub(crate) fn read_into(
        &self,
        offset: u64,
        dst: &VolatileSlice<'_>,
    ) -> Result<(), ProviderError> {
        let start = self.start(offset, dst.len())?;
        let guard = dst.ptr_guard_mut();
        // SAFETY: `start..start + len` lies within the live mapping (checked
        // by `start`); the guard keeps `len` bytes of guest memory mapped
        // and writable. The two may be the same pages (a udmabuf made of
        // guest RAM), so the copy allows overlap.
        unsafe { std::ptr::copy(self.ptr.as_ptr().add(start), guard.as_ptr(), guard.len()) };
        Ok(())
    }

    /// Copies `src.len()` bytes of guest memory to `offset`.
    pub(crate) fn write_from(
        &self,
        offset: u64,
        src: &VolatileSlice<'_>,
    ) -> Result<(), ProviderError> {
        if !self.writable {
            return Err(super::imported::read_only_write());
        }
        let start = self.start(offset, src.len())?;
        let guard = src.ptr_guard();
        // SAFETY: as in `read_into`, the other way round; this mapping is
        // writable.
        unsafe { std::ptr::copy(guard.as_ptr(), self.ptr.as_ptr().add(start), guard.len()) };
        Ok(())
    }

    /// Gives `len` bytes at `offset` (page-aligned) back to the host: the
    /// pages are punched out of the file under a shared, writable mapping
    /// (`MADV_REMOVE`), so the range reads zeros from then on and uses no
    /// memory. Where the kernel refuses, the range is written with zeros.
    pub(crate) fn discard(&self, offset: u64, len: usize) -> Result<(), ProviderError> {
        if !self.writable {
            return Err(super::imported::read_only_write());
        }
        let start = self.start(offset, len)?;
        // SAFETY: `start..start + len` lies within the live mapping (checked
        // by `start`); no Rust reference into it exists, and MADV_REMOVE
        // only replaces the range's pages with zeros, as any other process
        // sharing the file may do.
        let punched = unsafe {
            rustix::mm::madvise(
                self.ptr.as_ptr().add(start).cast(),
                len,
                rustix::mm::Advice::LinuxRemove,
            )
        };
        if let Err(e) = punched {
            log::debug!("MADV_REMOVE of {len} bytes refused ({e}): writing zeros");
            // SAFETY: as above; the mapping is writable.
            unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(start), 0, len) };
        }
        Ok(())
    }

    /// The checked start index of `len` bytes at `offset`.
    fn start(&self, offset: u64, len: usize) -> Result<usize, ProviderError> {
        check_range(offset, len, self.len as u64)?;
        // In range, so `offset <= self.len` fits a usize.
        usize::try_from(offset).map_err(|_| ProviderError::OutOfRange {
            offset,
            len: len as u64,
            size: self.len as u64,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the range `mmap` returned, owned by
        // this value and unmapped only here; no reference into it exists.
        if let Err(e) = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) } {
            log::warn!("munmap of a {}-byte buffer mapping failed: {e}", self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
    use std::os::fd::AsFd;

    #[test]
    fn mapping_copies_in_and_out_and_checks_bounds() {
        let fd = memfd_create("mmap-test", MemfdFlags::CLOEXEC).expect("memfd_create");
        ftruncate(&fd, 8192).expect("ftruncate");
        let map = Mapping::new(fd.as_fd(), 8192, true).expect("mmap");
        map.write(4090, b"across").expect("write");
        let mut out = [0u8; 6];
        map.read(4090, &mut out).expect("read");
        assert_eq!(&out, b"across");
        assert!(matches!(
            map.read(8190, &mut out),
            Err(ProviderError::OutOfRange {
                offset: 8190,
                len: 6,
                size: 8192
            })
        ));
        let ro = Mapping::new(fd.as_fd(), 8192, false).expect("mmap read-only");
        let mut again = [0u8; 6];
        ro.read(4090, &mut again).expect("read");
        assert_eq!(&again, b"across");
        assert!(ro.write(0, b"x").is_err());
        assert!(ro.discard(0, 4096).is_err());
    }

    #[test]
    fn discarded_pages_read_zeros_and_leave_the_rest() {
        let fd = memfd_create("mmap-test", MemfdFlags::CLOEXEC).expect("memfd_create");
        ftruncate(&fd, 3 * 4096).expect("ftruncate");
        let map = Mapping::new(fd.as_fd(), 3 * 4096, true).expect("mmap");
        map.write(0, &[0xa5; 3 * 4096]).expect("write");
        map.discard(4096, 4096).expect("discard");
        let mut all = vec![0u8; 3 * 4096];
        map.read(0, &mut all).expect("read");
        assert!(all[..4096].iter().all(|&b| b == 0xa5));
        assert!(all[4096..8192].iter().all(|&b| b == 0));
        assert!(all[8192..].iter().all(|&b| b == 0xa5));
        assert!(map.discard(8192, 8192).is_err(), "past the end");
    }
}
