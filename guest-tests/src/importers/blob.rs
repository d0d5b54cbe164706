// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! (d) A blob another device of the VM fetches by UUID.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use virtio_dmabuf_protocol::{caps, Status};

use super::{
    check, cpu_write, data_path, info, io_error, ok, place_writable, release, FrameFormat,
    ImporterError, Report, Result,
};
use crate::session::Session;

/// A mapping of a whole file shared with its other users (`MAP_SHARED`):
/// how another device's emulation would reach a buffer handed to it by fd.
#[derive(Debug)]
pub struct SharedFileMapping {
    /// The mapping's address, kept as an integer (no `unsafe impl Send`).
    addr: usize,
    len: usize,
    writable: bool,
}

impl SharedFileMapping {
    /// Maps the first `len` bytes of `fd` read-write, or read-only if the
    /// fd does not allow writing.
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        for (prot, writable) in [
            (libc::PROT_READ | libc::PROT_WRITE, true),
            (libc::PROT_READ, false),
        ] {
            // SAFETY: a fresh shared mapping of `len` bytes of `fd` at an
            // address of the kernel's choice; it overlaps nothing we own.
            // The result is checked before use.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if ptr != libc::MAP_FAILED {
                return Ok(SharedFileMapping {
                    addr: ptr as usize,
                    len,
                    writable,
                });
            }
            let err = io::Error::last_os_error();
            if !writable || err.raw_os_error() != Some(libc::EACCES) {
                return Err(err);
            }
        }
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    fn in_bounds(&self, offset: usize, len: usize) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::from(io::ErrorKind::InvalidInput)),
        }
    }

    pub fn read(&self, offset: usize, len: usize) -> io::Result<Vec<u8>> {
        self.in_bounds(offset, len)?;
        let mut out = vec![0u8; len];
        // SAFETY: `offset..offset + len` is inside the live mapping (checked
        // above; it lives until drop), and `out` is a distinct buffer of
        // `len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping((self.addr + offset) as *const u8, out.as_mut_ptr(), len);
        }
        Ok(out)
    }

    pub fn write(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        self.in_bounds(offset, data.len())?;
        if !self.writable {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        // SAFETY: the range is inside the live, writable mapping (checked
        // above), and `data` does not alias it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.addr + offset) as *mut u8,
                data.len(),
            );
        }
        Ok(())
    }
}

impl Drop for SharedFileMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing borrows from it (reads
        // and writes copy).
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

/// A blob resource: the guest fills a buffer (window or copy path) and
/// publishes it with `EXPORT_UUID`; "another device" of the VM (a
/// virtio-gpu taking it as a blob's backing) fetches the fd with
/// `GET_SHARED_OBJECT` and maps it. The bytes the guest wrote are there,
/// later guest writes show through the same mapping (it is the buffer, not
/// a copy), and the device's writes show to the guest.
pub fn blob_by_uuid(vmm: &mut dyn Session, format: FrameFormat) -> Result<Report> {
    let info = info(vmm)?;
    if info.caps & caps::SHARED_OBJECTS == 0 {
        return Err(ImporterError::Unavailable(
            "SHARED_OBJECTS is not live".into(),
        ));
    }
    let path = data_path(vmm, &info, true);
    let size = format.buffer_size(u64::from(info.page_size));
    let frame = format.render(3);
    let d = vmm.driver();
    let object = ok("CREATE", d.create(size, 0))?.object;
    let window = place_writable(d, object, path)?;
    cpu_write(vmm, object, window, &frame)?;
    let uuid = match d.export_uuid(object)? {
        Ok(u) => uuid::Uuid::from_bytes(u),
        Err(Status::NotSupported) => {
            return Err(ImporterError::Unavailable(
                "EXPORT_UUID needs a REAL_DMABUF object or --allow-memfd-shared-objects".into(),
            ))
        }
        Err(status) => {
            return Err(ImporterError::Device {
                what: "EXPORT_UUID".into(),
                status,
            })
        }
    };
    // The other device's side: the fd the front-end gets back, which only
    // our own front-end can show.
    let Some(front_end) = vmm.loopback_mut() else {
        let d = vmm.driver();
        release(d, object, window.is_some())?;
        return Err(ImporterError::Unavailable(
            "the other device's side (GET_SHARED_OBJECT) is the front-end's; \
             a real VMM keeps it"
                .into(),
        ));
    };
    let file = front_end.get_shared_object(uuid)?;
    let fd_size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0)).map_err(|source| {
        ImporterError::Io {
            what: "size of the shared object's fd",
            source,
        }
    })?;
    check(fd_size == size, || {
        format!("the shared object's fd has {fd_size} bytes, the buffer {size}")
    })?;
    let mapping = SharedFileMapping::new(file.as_fd(), size as usize).map_err(io_error("mmap"))?;
    let expected = format.checksum(&frame);
    let seen = mapping.read(0, format.len()).map_err(io_error("read"))?;
    let mut checksums = vec![format.checksum(&seen)];
    check(checksums[0] == expected, || {
        "the blob's backing does not hold what the guest wrote".into()
    })?;
    // The guest draws again: the device sees it in place.
    let d = vmm.driver();
    let next = format.render(4);
    ok("TRANSFER_TO_HOST", d.transfer_to_host(object, 0, &next))?;
    let seen = mapping.read(0, format.len()).map_err(io_error("read"))?;
    checksums.push(format.checksum(&seen));
    check(seen == next, || {
        "a guest write after the export is not visible through the fd".into()
    })?;
    // The device writes: the guest sees it.
    if mapping.writable() {
        let tail = size as usize - 16;
        mapping
            .write(tail, b"written by a gpu")
            .map_err(io_error("write"))?;
        let back = ok(
            "TRANSFER_FROM_HOST",
            d.transfer_from_host(object, tail as u64, 16),
        )?;
        check(back == b"written by a gpu", || {
            "a write through the fd is not visible to the guest".into()
        })?;
    }
    drop(mapping);
    drop(file);
    release(d, object, window.is_some())?;
    Ok(Report { path, checksums })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::vmm::shm::memfd_with;

    #[test]
    fn shared_file_mapping_sees_file_writes_and_bounds() {
        let file = memfd_with("t", &[7u8; 8192]).unwrap();
        let m = SharedFileMapping::new(file.as_fd(), 8192).unwrap();
        assert!(m.writable());
        assert_eq!(m.read(4090, 4).unwrap(), vec![7; 4]);
        std::os::unix::fs::FileExt::write_at(&file, b"abc", 4096).unwrap();
        assert_eq!(m.read(4096, 3).unwrap(), b"abc");
        m.write(10, b"xy").unwrap();
        let mut back = [0u8; 2];
        std::os::unix::fs::FileExt::read_at(&file, &mut back, 10).unwrap();
        assert_eq!(&back, b"xy");
        assert!(m.read(8190, 3).is_err());
        assert!(m.write(usize::MAX, b"x").is_err());
        assert!(SharedFileMapping::new(file.as_fd(), 0).is_err());
    }
}
