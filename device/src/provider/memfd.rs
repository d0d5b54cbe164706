// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The memfd provider (the default; any Linux): sealed memfds, syncs emulated
//! and recorded (section 9).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use rustix::fs::{fcntl_add_seals, fstat, ftruncate, memfd_create, MemfdFlags, SealFlags};
use rustix::io::{pread, pwrite, Errno};
use virtio_dmabuf_protocol::ProviderKind;
use vm_memory::VolatileSlice;

use super::mmap::Mapping;
use super::slab::SlabPool;
use super::sync::{emulated_sync, SyncRecord};
use super::{check_alloc_size, check_range, Backing, Provider, ProviderError};

/// The name memfds carry in `/proc/PID/fd` (`memfd:` and the package's
/// name).
pub(crate) const MEMFD_NAME: &str = env!("CARGO_PKG_NAME");

/// A zero-filled memfd of `size` bytes with these seals added.
pub(crate) fn sealed_memfd(
    size: u64,
    flags: MemfdFlags,
    seals: SealFlags,
) -> Result<OwnedFd, ProviderError> {
    sealed_memfd_named(MEMFD_NAME, size, flags, seals)
}

/// [`sealed_memfd`] under another name (`/proc/PID/maps` shows it).
pub(crate) fn sealed_memfd_named(
    name: &str,
    size: u64,
    flags: MemfdFlags,
    seals: SealFlags,
) -> Result<OwnedFd, ProviderError> {
    let fd = memfd_create(name, flags | MemfdFlags::ALLOW_SEALING)
        .map_err(|e| ProviderError::host("memfd_create", e))?;
    ftruncate(&fd, size).map_err(|e| ProviderError::host("ftruncate", e))?;
    fcntl_add_seals(&fd, seals).map_err(|e| ProviderError::host("F_ADD_SEALS", e))?;
    Ok(fd)
}

/// Hands out memfd buffers; their syncs go to one shared [`SyncRecord`].
#[derive(Debug)]
pub struct MemfdProvider {
    max_object_size: u64,
    record: SyncRecord,
}

impl MemfdProvider {
    pub fn new(max_object_size: u64) -> Self {
        MemfdProvider {
            max_object_size,
            record: SyncRecord::new(),
        }
    }

    /// Every emulated sync call of this provider's buffers, in order.
    pub fn record(&self) -> SyncRecord {
        self.record.clone()
    }

    /// [`Provider::allocate`] with the concrete type.
    pub fn allocate_memfd(&self, size: u64) -> Result<MemfdBacking, ProviderError> {
        check_alloc_size(size, self.max_object_size)?;
        // The front-end maps this fd: sealing its size means nobody can
        // shrink it under a mapping (SIGBUS) or grow it past the object.
        let fd = sealed_memfd(
            size,
            MemfdFlags::CLOEXEC,
            SealFlags::SHRINK | SealFlags::GROW,
        )?;
        let inode = fstat(&fd)
            .map_err(|e| ProviderError::host("fstat", e))?
            .st_ino;
        Ok(MemfdBacking {
            fd,
            size,
            inode,
            record: self.record.clone(),
            copy_map: OnceLock::new(),
        })
    }
}

impl Provider for MemfdProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Memfd
    }

    fn max_object_size(&self) -> u64 {
        self.max_object_size
    }

    fn makes_real_dmabufs(&self) -> bool {
        false
    }

    fn allocate(&self, size: u64) -> Result<Box<dyn Backing>, ProviderError> {
        Ok(Box::new(self.allocate_memfd(size)?))
    }

    fn sync_record(&self) -> Option<SyncRecord> {
        Some(self.record())
    }

    fn slab_pool(&self) -> Option<SlabPool> {
        Some(SlabPool::new(self.record(), self.max_object_size))
    }
}

/// Buffers of at least this size copy guest memory in and out through a
/// mapping of their own, made at their first such copy: a copy is then one
/// `memcpy`, where `pread`/`pwrite` take the page cache's path page by page
/// (about half the speed from 1 MiB up). Smaller buffers keep `pread`/
/// `pwrite`, which cost no mapping; the round trip is most of their time.
const MAPPED_COPY_MIN: u64 = 64 << 10;

/// The most of those mappings the daemon keeps at once: the process has
/// 65,530 mappings in all (`vm.max_map_count`), which guest memory, the
/// kernel dma-buf imports and the threads also need. A buffer that finds
/// none left copies with `pread`/`pwrite`.
const MAPPED_COPY_MAX: usize = 1024;

/// Mappings made for copies, across the daemon.
static MAPPED_COPIES: AtomicUsize = AtomicUsize::new(0);

/// A mapping made for copies, counted in [`MAPPED_COPIES`] while it lives.
#[derive(Debug)]
struct CopyMapping(Mapping);

impl Drop for CopyMapping {
    fn drop(&mut self) {
        MAPPED_COPIES.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One memfd buffer.
#[derive(Debug)]
pub struct MemfdBacking {
    fd: OwnedFd,
    size: u64,
    inode: u64,
    record: SyncRecord,
    /// See [`MAPPED_COPY_MIN`]; `None` inside when none could be made.
    copy_map: OnceLock<Option<CopyMapping>>,
}

impl MemfdBacking {
    /// The memfd's inode number: the `buffer` of its [`super::SyncCall`]s.
    pub fn buffer_id(&self) -> u64 {
        self.inode
    }

    /// The mapping copies of guest memory go through, for a large buffer
    /// (see [`MAPPED_COPY_MIN`]). The memfd is sealed against shrinking, so
    /// the mapping never faults.
    fn copy_mapping(&self) -> Option<&Mapping> {
        if self.size < MAPPED_COPY_MIN {
            return None;
        }
        let made = self.copy_map.get_or_init(|| {
            let len = usize::try_from(self.size).ok()?;
            if MAPPED_COPIES.fetch_add(1, Ordering::Relaxed) >= MAPPED_COPY_MAX {
                MAPPED_COPIES.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
            match Mapping::new(self.fd.as_fd(), len, true) {
                Ok(map) => Some(CopyMapping(map)),
                Err(e) => {
                    MAPPED_COPIES.fetch_sub(1, Ordering::Relaxed);
                    log::debug!("memfd {}: no mapping for copies: {e}", self.inode);
                    None
                }
            }
        });
        made.as_ref().map(|m| &m.0)
    }
}

impl Backing for MemfdBacking {
    fn size(&self) -> u64 {
        self.size
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }

    fn is_real_dmabuf(&self) -> bool {
        false
    }

    fn size_is_fixed(&self) -> bool {
        // Sealed against shrinking and growing when it was made.
        true
    }

    fn sync(&self, flags: u64) -> Result<(), ProviderError> {
        emulated_sync(&self.record, self.inode, flags)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ProviderError> {
        check_range(offset, buf.len(), self.size)?;
        pread_exact(self.fd.as_fd(), offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ProviderError> {
        check_range(offset, data.len(), self.size)?;
        pwrite_all(self.fd.as_fd(), offset, data)
    }

    fn write_from(&self, offset: u64, src: &VolatileSlice<'_>) -> Result<(), ProviderError> {
        check_range(offset, src.len(), self.size)?;
        match self.copy_mapping() {
            Some(map) => map.write_from(offset, src),
            None => pwrite_from(self.fd.as_fd(), offset, src),
        }
    }

    fn read_into(&self, offset: u64, dst: &VolatileSlice<'_>) -> Result<(), ProviderError> {
        check_range(offset, dst.len(), self.size)?;
        match self.copy_mapping() {
            Some(map) => map.read_into(offset, dst),
            None => pread_into(self.fd.as_fd(), offset, dst),
        }
    }
}

/// Which way [`copy_raw`] moves bytes.
#[derive(Clone, Copy)]
enum Way {
    /// `pread`: from the file into memory.
    Read,
    /// `pwrite`: from memory into the file.
    Write,
}

/// [`pwrite_all`] straight from guest memory: the kernel copies once, and
/// the memory is never seen as a Rust reference (the guest may write it
/// meanwhile; what lands is then whatever the guest had there).
pub(crate) fn pwrite_from(
    fd: BorrowedFd<'_>,
    offset: u64,
    src: &VolatileSlice<'_>,
) -> Result<(), ProviderError> {
    let guard = src.ptr_guard();
    copy_raw(
        fd,
        offset,
        guard.as_ptr().cast_mut(),
        guard.len(),
        Way::Write,
    )
}

/// [`pread_exact`] straight into guest memory (see [`pwrite_from`]).
pub(crate) fn pread_into(
    fd: BorrowedFd<'_>,
    offset: u64,
    dst: &VolatileSlice<'_>,
) -> Result<(), ProviderError> {
    let guard = dst.ptr_guard_mut();
    copy_raw(fd, offset, guard.as_ptr(), guard.len(), Way::Read)
}

/// `pread` or `pwrite` of `len` bytes at `ptr` until all are moved; a file
/// that ends early (shrunk by its owner) is an error, never a fault.
fn copy_raw(
    fd: BorrowedFd<'_>,
    offset: u64,
    ptr: *mut u8,
    len: usize,
    way: Way,
) -> Result<(), ProviderError> {
    let op = match way {
        Way::Read => "pread",
        Way::Write => "pwrite",
    };
    let mut done = 0usize;
    while done < len {
        let at = offset
            .checked_add(done as u64)
            .and_then(|at| libc::off_t::try_from(at).ok())
            .ok_or(ProviderError::Host {
                op,
                source: std::io::ErrorKind::InvalidInput.into(),
            })?;
        // SAFETY: `ptr..ptr + len` is memory the caller's slice guard keeps
        // mapped for this call, writable for `Way::Read`; the kernel checks
        // the range itself (EFAULT) and no Rust reference to it exists.
        let n = unsafe {
            let at_ptr = ptr.add(done).cast::<libc::c_void>();
            match way {
                Way::Read => libc::pread(fd.as_raw_fd(), at_ptr, len - done, at),
                Way::Write => libc::pwrite(fd.as_raw_fd(), at_ptr, len - done, at),
            }
        };
        match n {
            0 => {
                let kind = match way {
                    Way::Read => std::io::ErrorKind::UnexpectedEof,
                    Way::Write => std::io::ErrorKind::WriteZero,
                };
                return Err(ProviderError::Host {
                    op,
                    source: kind.into(),
                });
            }
            n if n > 0 => done += n.unsigned_abs(),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(ProviderError::Host { op, source: e });
                }
            }
        }
    }
    Ok(())
}

/// Fills `buf` from `fd` at `offset` with `pread`; a file that ends early
/// (shrunk by its owner) is an error, never a fault.
pub(crate) fn pread_exact(
    fd: BorrowedFd<'_>,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), ProviderError> {
    let mut done = 0;
    while done < buf.len() {
        match pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(ProviderError::Host {
                    op: "pread",
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                })
            }
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(ProviderError::host("pread", e)),
        }
    }
    Ok(())
}

/// Writes all of `data` to `fd` at `offset` with `pwrite`.
pub(crate) fn pwrite_all(
    fd: BorrowedFd<'_>,
    offset: u64,
    data: &[u8],
) -> Result<(), ProviderError> {
    let mut done = 0;
    while done < data.len() {
        match pwrite(fd, &data[done..], offset + done as u64) {
            Ok(0) => {
                return Err(ProviderError::Host {
                    op: "pwrite",
                    source: std::io::ErrorKind::WriteZero.into(),
                })
            }
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(ProviderError::host("pwrite", e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{page_size, SyncCall};
    use virtio_dmabuf_protocol::sync_flags::{END, READ, RW, START, WRITE};

    /// Copies of guest memory (here a plain buffer seen as volatile memory)
    /// land where `pread`/`pwrite` see them, through `pwrite`/`pread` below
    /// `MAPPED_COPY_MIN` and through the buffer's mapping above it.
    #[test]
    fn guest_memory_copies_agree_with_pread_and_pwrite() {
        for size in [4 * page_size(), MAPPED_COPY_MIN, 2 * MAPPED_COPY_MIN] {
            let b = MemfdProvider::new(4 * MAPPED_COPY_MIN)
                .allocate_memfd(size)
                .expect("allocate");
            let mut src: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
            let len = src.len().min(size as usize - 100);
            // SAFETY: the slice covers `len` bytes of `src`, which lives and
            // is not otherwise touched while the slice is used.
            let slice = unsafe { VolatileSlice::new(src.as_mut_ptr(), len) };
            b.write_from(100, &slice).expect("write_from");
            let mut back = vec![0u8; len];
            b.read_at(100, &mut back).expect("read_at");
            assert_eq!(back, src[..len], "size {size}");

            b.write_at(7, b"written with pwrite").expect("write_at");
            let mut out = vec![0u8; 19];
            // SAFETY: as above, for `out`.
            let slice = unsafe { VolatileSlice::new(out.as_mut_ptr(), out.len()) };
            b.read_into(7, &slice).expect("read_into");
            assert_eq!(&out, b"written with pwrite", "size {size}");
            assert_eq!(b.copy_mapping().is_some(), size >= MAPPED_COPY_MIN);
            assert!(
                b.read_into(size - 4, &slice).is_err(),
                "past the end, size {size}"
            );
        }
    }

    fn provider() -> MemfdProvider {
        MemfdProvider::new(16 * page_size())
    }

    #[test]
    fn memfd_allocation_is_zero_filled() {
        let p = provider();
        let size = 3 * page_size();
        let b = p.allocate(size).expect("allocate");
        assert_eq!(b.size(), size);
        assert!(!b.is_real_dmabuf());
        assert!(!p.makes_real_dmabufs());
        assert_eq!(p.kind(), ProviderKind::Memfd);
        let mut all = vec![0xa5u8; size as usize];
        b.read_at(0, &mut all).expect("read");
        assert!(all.iter().all(|&byte| byte == 0));
        assert_eq!(
            fstat(b.fd().expect("own fd")).expect("fstat").st_size as u64,
            size
        );
    }

    #[test]
    fn memfd_write_then_read_round_trips() {
        let b = provider().allocate(2 * page_size()).expect("allocate");
        let at = page_size() - 3;
        b.write_at(at, b"hello, page").expect("write");
        let mut out = [0u8; 11];
        b.read_at(at, &mut out).expect("read");
        assert_eq!(&out, b"hello, page");
    }

    #[test]
    fn memfd_is_sealed_against_resizing() {
        let b = provider().allocate(page_size()).expect("allocate");
        assert_eq!(ftruncate(b.fd().expect("own fd"), 0), Err(Errno::PERM));
        assert_eq!(
            ftruncate(b.fd().expect("own fd"), 2 * page_size()),
            Err(Errno::PERM)
        );
    }

    #[test]
    fn memfd_sync_is_recorded_in_order() {
        let p = provider();
        let a = p.allocate_memfd(page_size()).expect("allocate");
        let b = p.allocate_memfd(page_size()).expect("allocate");
        assert_ne!(a.buffer_id(), b.buffer_id());
        let record = p.record();
        let before = record.total();
        let boxed: Box<dyn Backing> = Box::new(b);
        a.sync(START | READ).expect("sync");
        boxed.sync(START | RW).expect("sync");
        a.sync(END | READ).expect("sync");
        boxed.sync(END | WRITE).expect("sync");
        let inode_b = fstat(boxed.fd().expect("own fd")).expect("fstat").st_ino;
        assert_eq!(
            record.calls_since(before),
            [
                SyncCall {
                    buffer: a.buffer_id(),
                    flags: START | READ
                },
                SyncCall {
                    buffer: inode_b,
                    flags: START | RW
                },
                SyncCall {
                    buffer: a.buffer_id(),
                    flags: END | READ
                },
                SyncCall {
                    buffer: inode_b,
                    flags: END | WRITE
                },
            ]
        );
        // The provider's trait view shares the same record.
        assert_eq!(p.sync_record().map(|r| r.total()), Some(before + 4));
    }

    #[test]
    fn memfd_sync_rejects_flags_without_rw() {
        let p = provider();
        let b = p.allocate(page_size()).expect("allocate");
        for bad in [START, END, END | 1 << 3, READ | 1 << 8] {
            let err = b.sync(bad).expect_err("kernel refuses these");
            crate::provider::sync::assert_sync_refused(&err, libc::EINVAL);
        }
        assert!(p.record().is_empty(), "refused calls are not recorded");
    }

    #[test]
    fn read_write_out_of_range_is_refused() {
        let size = 2 * page_size();
        let b = provider().allocate(size).expect("allocate");
        let mut buf = [0u8; 8];
        for offset in [size - 7, size, size + 1, u64::MAX - 3] {
            assert!(
                matches!(
                    b.read_at(offset, &mut buf),
                    Err(ProviderError::OutOfRange { offset: o, len: 8, size: s }) if o == offset && s == size
                ),
                "read at {offset}"
            );
            assert!(
                matches!(
                    b.write_at(offset, &buf),
                    Err(ProviderError::OutOfRange { offset: o, len: 8, size: s }) if o == offset && s == size
                ),
                "write at {offset}"
            );
        }
        // The last 8 bytes are in range.
        b.write_at(size - 8, &[7; 8]).expect("write at the end");
        b.read_at(size - 8, &mut buf).expect("read at the end");
        assert_eq!(buf, [7; 8]);
    }

    #[test]
    fn memfd_allocate_refuses_bad_sizes() {
        let p = provider();
        for size in [0, 1, page_size() + 1, 17 * page_size()] {
            assert!(
                matches!(p.allocate(size), Err(ProviderError::BadSize { size: s, .. }) if s == size),
                "{size}"
            );
        }
    }
}
