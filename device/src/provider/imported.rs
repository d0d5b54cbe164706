// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Kernel dma-bufs: host dma-buf fds handed to the daemon (a GPU, camera or
//! codec buffer), and the buffers udmabuf and dma-heap allocate.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

use rustix::fs::{fcntl_getfl, seek, OFlags, SeekFrom};
use vm_memory::VolatileSlice;

use super::memfd::{pread_exact, pread_into, pwrite_all, pwrite_from};
use super::mmap::Mapping;
use super::sync::{dma_buf_sync, emulated_sync, SyncRecord};
use super::{check_alloc_size, check_range, page_size, Backing, ProviderError};

/// A kernel dma-buf. Syncs are the real `DMA_BUF_IOCTL_SYNC`; bytes are
/// copied through a shared mapping made on first use (dma-bufs have no
/// `pread`/`pwrite`), read-only when the fd was opened read-only. The caller
/// brackets CPU access with syncs (section 9); `read_at`/`write_at` do not.
///
/// An fd that is not a dma-buf (a memfd or file standing in for one) is
/// never mapped: its owner can truncate it at any time, and a mapping
/// touched past the new end would kill the daemon with `SIGBUS`. Its bytes
/// go through `pread`/`pwrite`, where a shrunk file is an error.
#[derive(Debug)]
pub struct KernelDmabuf {
    fd: OwnedFd,
    size: u64,
    /// Where it came from, for logs: "imported", "udmabuf", "dma-heap".
    origin: &'static str,
    map: OnceLock<Mapping>,
    /// Set for an fd that is not a kernel dma-buf (a memfd or a file handed
    /// over as a stand-in): its syncs go to the recording emulation.
    emulation: Option<(SyncRecord, u64)>,
    /// See [`Backing::size_is_fixed`]: a dma-buf's size never changes; a
    /// stand-in's only when it is sealed against shrinking (a seal cannot
    /// be taken back, so checking once at import holds).
    size_fixed: bool,
}

impl KernelDmabuf {
    /// Wraps a dma-buf fd of `size` bytes (non-zero, a page multiple).
    pub fn new(fd: OwnedFd, size: u64, origin: &'static str) -> Result<Self, ProviderError> {
        check_alloc_size(size, max_import_size())?;
        Ok(KernelDmabuf {
            fd,
            size,
            origin,
            map: OnceLock::new(),
            emulation: None,
            size_fixed: true,
        })
    }

    /// Makes syncs go to the memfd-style emulation instead of the ioctl.
    fn emulated(mut self) -> Result<Self, ProviderError> {
        let inode = rustix::fs::fstat(&self.fd)
            .map_err(|e| ProviderError::host("fstat", e))?
            .st_ino;
        self.emulation = Some((SyncRecord::new(), inode));
        // Files other than memfds have no seals (EINVAL): never fixed.
        self.size_fixed = rustix::fs::fcntl_get_seals(&self.fd)
            .is_ok_and(|seals| seals.contains(rustix::fs::SealFlags::SHRINK));
        Ok(self)
    }

    pub fn origin(&self) -> &'static str {
        self.origin
    }

    fn mapping(&self) -> Result<&Mapping, ProviderError> {
        if let Some(map) = self.map.get() {
            return Ok(map);
        }
        let len = usize::try_from(self.size).map_err(|_| ProviderError::BadSize {
            size: self.size,
            max: max_import_size(),
        })?;
        let mode = fcntl_getfl(&self.fd).map_err(|e| ProviderError::host("F_GETFL", e))?;
        let writable = mode & OFlags::RWMODE == OFlags::RDWR;
        let map = Mapping::new(self.fd.as_fd(), len, writable)?;
        // Two threads racing here each map; the loser's mapping is dropped
        // (unmapped) and both use the winner's.
        Ok(self.map.get_or_init(|| map))
    }
}

impl Backing for KernelDmabuf {
    fn size(&self) -> u64 {
        self.size
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }

    fn is_real_dmabuf(&self) -> bool {
        self.emulation.is_none()
    }

    fn size_is_fixed(&self) -> bool {
        self.size_fixed
    }

    fn sync(&self, flags: u64) -> Result<(), ProviderError> {
        match &self.emulation {
            None => dma_buf_sync(self.fd.as_fd(), flags),
            Some((record, inode)) => emulated_sync(record, *inode, flags),
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ProviderError> {
        check_range(offset, buf.len(), self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.emulation.is_some() {
            return pread_exact(self.fd.as_fd(), offset, buf);
        }
        self.mapping()?.read(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ProviderError> {
        check_range(offset, data.len(), self.size)?;
        if data.is_empty() {
            return Ok(());
        }
        if self.emulation.is_some() {
            let mode = fcntl_getfl(&self.fd).map_err(|e| ProviderError::host("F_GETFL", e))?;
            if mode & OFlags::RWMODE == OFlags::RDONLY {
                return Err(read_only_write());
            }
            return pwrite_all(self.fd.as_fd(), offset, data);
        }
        self.mapping()?.write(offset, data)
    }

    fn write_from(&self, offset: u64, src: &VolatileSlice<'_>) -> Result<(), ProviderError> {
        check_range(offset, src.len(), self.size)?;
        if src.is_empty() {
            return Ok(());
        }
        if self.emulation.is_some() {
            let mode = fcntl_getfl(&self.fd).map_err(|e| ProviderError::host("F_GETFL", e))?;
            if mode & OFlags::RWMODE == OFlags::RDONLY {
                return Err(read_only_write());
            }
            return pwrite_from(self.fd.as_fd(), offset, src);
        }
        self.mapping()?.write_from(offset, src)
    }

    fn read_into(&self, offset: u64, dst: &VolatileSlice<'_>) -> Result<(), ProviderError> {
        check_range(offset, dst.len(), self.size)?;
        if dst.is_empty() {
            return Ok(());
        }
        if self.emulation.is_some() {
            return pread_into(self.fd.as_fd(), offset, dst);
        }
        self.mapping()?.read_into(offset, dst)
    }
}

/// The answer to a write into a buffer open read-only.
pub(crate) fn read_only_write() -> ProviderError {
    ProviderError::Host {
        op: "write to a read-only dma-buf",
        source: std::io::Error::from_raw_os_error(libc::EACCES),
    }
}

/// The largest buffer the daemon can map: a page multiple that fits `isize`.
fn max_import_size() -> u64 {
    (isize::MAX as u64) & !(page_size() - 1)
}

/// See [`super::import_host_fd`]: a kernel dma-buf gets the real ioctl,
/// anything else the emulation.
pub(crate) fn import_detect(
    fd: OwnedFd,
    origin: &'static str,
) -> Result<KernelDmabuf, ProviderError> {
    let real = super::is_dmabuf_fd(&fd);
    let b = import(fd, origin)?;
    if real {
        Ok(b)
    } else {
        b.emulated()
    }
}

/// See [`super::import_dmabuf`].
pub(crate) fn import(fd: OwnedFd, origin: &'static str) -> Result<KernelDmabuf, ProviderError> {
    let size =
        seek(&fd, SeekFrom::End(0)).map_err(|e| ProviderError::host("lseek(SEEK_END)", e))?;
    seek(&fd, SeekFrom::Start(0)).map_err(|e| ProviderError::host("lseek(SEEK_SET)", e))?;
    KernelDmabuf::new(fd, size, origin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::import_dmabuf;
    use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
    use rustix::io::pwrite;
    use virtio_dmabuf_protocol::sync_flags::{END, RW, START};

    /// A memfd standing in for a host dma-buf (same size and mmap behaviour;
    /// the kernel refuses its sync ioctl with ENOTTY).
    fn fake_dmabuf(size: u64) -> OwnedFd {
        let fd = memfd_create("import-test", MemfdFlags::CLOEXEC).expect("memfd_create");
        ftruncate(&fd, size).expect("ftruncate");
        fd
    }

    #[test]
    fn import_size_comes_from_lseek_end() {
        let size = 5 * page_size();
        let fd = fake_dmabuf(size);
        pwrite(&fd, b"from the host", 2 * page_size()).expect("pwrite");
        seek(&fd, SeekFrom::Start(123)).expect("seek");
        let b = import_dmabuf(fd).expect("import");
        assert_eq!(b.size(), size);
        assert!(b.is_real_dmabuf());
        assert_eq!(
            seek(b.fd().expect("own fd"), SeekFrom::Current(0)),
            Ok(0),
            "seeked back to 0"
        );
        let mut out = [0u8; 13];
        b.read_at(2 * page_size(), &mut out)
            .expect("read through the mapping");
        assert_eq!(&out, b"from the host");
        b.write_at(size - 2, b"ok")
            .expect("write through the mapping");
        let mut end = [0u8; 2];
        b.read_at(size - 2, &mut end).expect("read");
        assert_eq!(&end, b"ok");
    }

    #[test]
    fn import_rejects_non_page_multiple() {
        for size in [0, 100, page_size() + 1] {
            let err = import_dmabuf(fake_dmabuf(size)).expect_err("not a page multiple");
            assert!(
                matches!(err, ProviderError::BadSize { size: s, .. } if s == size),
                "{size}: {err:?}"
            );
        }
    }

    #[test]
    fn imported_sync_is_the_real_ioctl() {
        let b = import_dmabuf(fake_dmabuf(page_size())).expect("import");
        for flags in [START | RW, END | RW] {
            let err = b.sync(flags).expect_err("a memfd refuses dma-buf ioctls");
            assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
        }
    }

    #[test]
    fn host_fd_that_is_not_a_dmabuf_gets_the_emulated_sync() {
        let b = crate::provider::import_host_fd(fake_dmabuf(page_size())).expect("import");
        assert!(!b.is_real_dmabuf());
        b.sync(START | RW).expect("emulated");
        assert!(b.sync(START).is_err(), "flags checked like the kernel");
    }

    #[test]
    fn only_a_host_fd_sealed_against_shrinking_has_a_fixed_size() {
        let plain = crate::provider::import_host_fd(fake_dmabuf(page_size())).expect("import");
        assert!(!plain.size_is_fixed(), "its owner can truncate it");
        let grow_only =
            crate::provider::sealed_memfd_for_tests(page_size(), rustix::fs::SealFlags::GROW);
        let b = crate::provider::import_host_fd(grow_only).expect("import");
        assert!(!b.size_is_fixed(), "sealed, but not against shrinking");
        let sealed =
            crate::provider::sealed_memfd_for_tests(page_size(), rustix::fs::SealFlags::SHRINK);
        let b = crate::provider::import_host_fd(sealed).expect("import");
        assert!(b.size_is_fixed());
        let file = tempfile::tempfile().expect("a plain file");
        ftruncate(&file, page_size()).expect("size it");
        let b = crate::provider::import_host_fd(file.into()).expect("import");
        assert!(!b.size_is_fixed(), "a plain file has no seals");
    }

    #[test]
    fn host_fd_shrunk_by_its_owner_is_an_error_not_sigbus() {
        // A memfd (or file) handed over by `ctl export` stays the host's: it
        // can be truncated at any time. Touching a shared mapping past the
        // new end would kill the daemon with SIGBUS.
        let size = 4 * page_size();
        let fd = fake_dmabuf(size);
        let owner = fd.try_clone().expect("dup");
        let b = crate::provider::import_host_fd(fd).expect("import");
        b.write_at(3 * page_size(), b"tail").expect("write");
        let mut out = [0u8; 4];
        b.read_at(3 * page_size(), &mut out).expect("read");
        assert_eq!(&out, b"tail");
        ftruncate(&owner, page_size()).expect("the owner shrinks it");
        assert!(b.read_at(3 * page_size(), &mut out).is_err());
        let mut head = [1u8; 4];
        b.read_at(0, &mut head)
            .expect("what is left is still readable");
        assert_eq!(head, [0; 4]);
    }

    #[test]
    fn read_only_host_fd_refuses_writes() {
        let fd = fake_dmabuf(page_size());
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        let ro: OwnedFd = std::fs::File::open(path).expect("reopen read-only").into();
        let b = crate::provider::import_host_fd(ro).expect("import");
        assert!(!b.is_real_dmabuf());
        let err = b.write_at(0, b"x").expect_err("read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    }

    #[test]
    fn imported_read_write_out_of_range_is_refused() {
        let size = page_size();
        let b = import_dmabuf(fake_dmabuf(size)).expect("import");
        let mut buf = [0u8; 2];
        assert!(matches!(
            b.read_at(size - 1, &mut buf),
            Err(ProviderError::OutOfRange { len: 2, .. })
        ));
        assert!(matches!(
            b.write_at(size, &buf),
            Err(ProviderError::OutOfRange { len: 2, .. })
        ));
    }

    #[test]
    fn read_only_import_refuses_writes() {
        let size = page_size();
        let fd = fake_dmabuf(size);
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        let ro: OwnedFd = std::fs::File::open(path).expect("reopen read-only").into();
        let b = import_dmabuf(ro).expect("import");
        let mut buf = [1u8; 4];
        b.read_at(0, &mut buf).expect("read");
        assert_eq!(buf, [0; 4]);
        let err = b.write_at(0, &buf).expect_err("read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    }
}
