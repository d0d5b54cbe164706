// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Memory-mapped BARs: a `resourceN` file of the device mapped into this
//! process, and bounds-checked volatile accesses of the width the register
//! has (a device register must be read with one access of its own size,
//! never by a byte copy the compiler may split or merge).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const PAGE: u64 = 4096;

/// An access outside a mapping, or not aligned to its width.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {width}-byte access at {offset:#x} is outside its {len:#x} bytes or misaligned")]
pub struct MmioError {
    pub what: &'static str,
    pub offset: u64,
    pub width: usize,
    pub len: u64,
}

/// Why a BAR could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: range {offset:#x}+{len:#x} is not inside the {size:#x}-byte BAR")]
    Range {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{path}: mmap of {len:#x} bytes at {offset:#x}: {source}")]
    Mmap {
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

/// A range of one BAR mapped with `MAP_SHARED` from its `resourceN` file.
/// The kernel maps these uncached, so every access reaches the device.
#[derive(Debug)]
pub struct BarMap {
    /// The mapping's start (page-aligned), kept as an integer so the map is
    /// `Send + Sync` without an `unsafe impl`.
    base: usize,
    map_len: usize,
    /// The requested offset's distance from `base`.
    skew: usize,
    len: u64,
}

impl BarMap {
    /// Maps `len` bytes at `offset` of the BAR behind `resource` (a
    /// `/sys/bus/pci/devices/ADDR/resourceN` file), or all of it with
    /// `None`.
    pub fn map(resource: &Path, range: Option<(u64, u64)>) -> Result<Arc<BarMap>, MapError> {
        let open_err = |source| MapError::Open {
            path: resource.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(resource)
            .map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        let (offset, len) = range.unwrap_or((0, size));
        let range_err = || MapError::Range {
            path: resource.to_owned(),
            offset,
            len,
            size,
        };
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(range_err());
        }
        let start = offset - offset % PAGE;
        let skew = offset - start;
        let map_len =
            usize::try_from((skew + len).next_multiple_of(PAGE)).map_err(|_| range_err())?;
        let file_offset = libc::off_t::try_from(start).map_err(|_| range_err())?;
        // SAFETY: a new shared mapping of a device file at an address of
        // the kernel's choice; it overlaps nothing we own, the file is open
        // for reading and writing, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                file_offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MapError::Mmap {
                path: resource.to_owned(),
                offset,
                len,
                source: io::Error::last_os_error(),
            });
        }
        // The mapping stays valid after the descriptor is closed.
        Ok(Arc::new(BarMap {
            base: ptr as usize,
            map_len,
            skew: usize::try_from(skew).map_err(|_| range_err())?,
            len,
        }))
    }

    /// Bytes mapped (from the requested offset).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of `offset`, if `width` bytes there are inside the
    /// mapping and aligned to `width`.
    fn addr(&self, offset: u64, width: usize) -> Option<usize> {
        let w = width as u64;
        let end = offset.checked_add(w)?;
        if end > self.len || !offset.is_multiple_of(w) {
            return None;
        }
        // The mapping is page-aligned, so `skew + offset` keeps the
        // alignment of `offset` as long as `skew` does.
        let addr = self.base + self.skew + usize::try_from(offset).ok()?;
        addr.is_multiple_of(width).then_some(addr)
    }
}

impl Drop for BarMap {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_len` are exactly the mapping made in `map`;
        // every access goes through `&self`, so none is in progress once
        // the last owner drops it.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.map_len);
        }
    }
}

/// One virtio structure: a range of a mapped BAR, with accessors of every
/// register width. Offsets are relative to the structure.
#[derive(Debug, Clone)]
pub struct Region {
    map: Arc<BarMap>,
    offset: u64,
    len: u64,
    what: &'static str,
}

impl Region {
    /// `len` bytes at `offset` of `map`; `None` if they are not inside it.
    pub fn new(map: Arc<BarMap>, offset: u64, len: u64, what: &'static str) -> Option<Region> {
        (offset.checked_add(len)? <= map.len()).then_some(Region {
            map,
            offset,
            len,
            what,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn addr(&self, offset: u64, width: usize) -> Result<usize, MmioError> {
        let err = MmioError {
            what: self.what,
            offset,
            width,
            len: self.len,
        };
        let end = offset.checked_add(width as u64).ok_or(err.clone())?;
        if end > self.len {
            return Err(err);
        }
        self.map.addr(self.offset + offset, width).ok_or(err)
    }

    pub fn read8(&self, offset: u64) -> Result<u8, MmioError> {
        let addr = self.addr(offset, 1)?;
        // SAFETY: `addr` is inside the live mapping `self.map` holds (checked
        // by `addr`); a volatile load of device memory has no side effect
        // on this process's memory.
        Ok(unsafe { (addr as *const u8).read_volatile() })
    }

    pub fn read16(&self, offset: u64) -> Result<u16, MmioError> {
        let addr = self.addr(offset, 2)?;
        // SAFETY: inside the live mapping and 2-byte aligned (checked by
        // `addr`).
        Ok(u16::from_le(unsafe {
            (addr as *const u16).read_volatile()
        }))
    }

    pub fn read32(&self, offset: u64) -> Result<u32, MmioError> {
        let addr = self.addr(offset, 4)?;
        // SAFETY: inside the live mapping and 4-byte aligned (checked by
        // `addr`).
        Ok(u32::from_le(unsafe {
            (addr as *const u32).read_volatile()
        }))
    }

    pub fn write8(&self, offset: u64, value: u8) -> Result<(), MmioError> {
        let addr = self.addr(offset, 1)?;
        // SAFETY: inside the live, writable mapping (checked by `addr`); it
        // is device memory, no Rust object lives there.
        unsafe { (addr as *mut u8).write_volatile(value) };
        Ok(())
    }

    pub fn write16(&self, offset: u64, value: u16) -> Result<(), MmioError> {
        let addr = self.addr(offset, 2)?;
        // SAFETY: inside the live, writable mapping and 2-byte aligned
        // (checked by `addr`); no Rust object lives there.
        unsafe { (addr as *mut u16).write_volatile(value.to_le()) };
        Ok(())
    }

    pub fn write32(&self, offset: u64, value: u32) -> Result<(), MmioError> {
        let addr = self.addr(offset, 4)?;
        // SAFETY: inside the live, writable mapping and 4-byte aligned
        // (checked by `addr`); no Rust object lives there.
        unsafe { (addr as *mut u32).write_volatile(value.to_le()) };
        Ok(())
    }

    pub fn read64(&self, offset: u64) -> Result<u64, MmioError> {
        let addr = self.addr(offset, 8)?;
        // SAFETY: inside the live mapping and 8-byte aligned (checked by
        // `addr`).
        Ok(u64::from_le(unsafe {
            (addr as *const u64).read_volatile()
        }))
    }

    pub fn write64(&self, offset: u64, value: u64) -> Result<(), MmioError> {
        let addr = self.addr(offset, 8)?;
        // SAFETY: inside the live, writable mapping and 8-byte aligned
        // (checked by `addr`); no Rust object lives there.
        unsafe { (addr as *mut u64).write_volatile(value.to_le()) };
        Ok(())
    }

    /// Copies `out.len()` bytes at `offset` out, in 8-byte accesses where
    /// aligned and single bytes at the edges.
    pub fn read_bytes(&self, offset: u64, out: &mut [u8]) -> Result<(), MmioError> {
        self.check_span(offset, out.len())?;
        let mut at = 0;
        while at < out.len() {
            let o = offset + at as u64;
            if o.is_multiple_of(8) && out.len() - at >= 8 {
                out[at..at + 8].copy_from_slice(&self.read64(o)?.to_le_bytes());
                at += 8;
            } else {
                out[at] = self.read8(o)?;
                at += 1;
            }
        }
        Ok(())
    }

    /// Copies `data` to `offset`, in 8-byte accesses where aligned.
    pub fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<(), MmioError> {
        self.check_span(offset, data.len())?;
        let mut at = 0;
        while at < data.len() {
            let o = offset + at as u64;
            if o.is_multiple_of(8) && data.len() - at >= 8 {
                let mut word = [0u8; 8];
                word.copy_from_slice(&data[at..at + 8]);
                self.write64(o, u64::from_le_bytes(word))?;
                at += 8;
            } else {
                self.write8(o, data[at])?;
                at += 1;
            }
        }
        Ok(())
    }

    fn check_span(&self, offset: u64, len: usize) -> Result<(), MmioError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(MmioError {
                what: self.what,
                offset,
                width: len,
                len: self.len,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    /// A regular file stands in for a BAR: the mapping code is the same.
    fn fake_bar(size: usize) -> (tempfile::NamedTempFile, Arc<BarMap>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0u8; size]).unwrap();
        let map = BarMap::map(f.path(), None).unwrap();
        (f, map)
    }

    #[test]
    fn registers_round_trip_little_endian() {
        let (_f, map) = fake_bar(0x2000);
        let r = Region::new(map, 0x1000, 0x40, "test").unwrap();
        r.write32(0, 0x1122_3344).unwrap();
        assert_eq!(r.read8(0).unwrap(), 0x44);
        assert_eq!(r.read16(2).unwrap(), 0x1122);
        r.write64(8, 0x0102_0304_0506_0708).unwrap();
        assert_eq!(r.read32(12).unwrap(), 0x0102_0304);
        let mut b = [0u8; 11];
        r.read_bytes(5, &mut b).unwrap();
        assert_eq!(&b[3..], &[8, 7, 6, 5, 4, 3, 2, 1]);
        r.write_bytes(0x13, b"hello, region").unwrap();
        let mut back = [0u8; 13];
        r.read_bytes(0x13, &mut back).unwrap();
        assert_eq!(&back, b"hello, region");
    }

    #[test]
    fn accesses_outside_or_misaligned_are_refused() {
        let (_f, map) = fake_bar(0x1000);
        let r = Region::new(map.clone(), 0x800, 0x10, "test").unwrap();
        assert!(r.read32(0x0e).is_err());
        assert!(r.read32(0x10).is_err());
        assert!(r.read16(1).is_err());
        assert!(r.write64(u64::MAX - 3, 0).is_err());
        assert!(r.read_bytes(8, &mut [0u8; 9]).is_err());
        assert!(Region::new(map, 0xff0, 0x20, "test").is_none());
    }

    #[test]
    fn an_unaligned_range_of_a_file_maps() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..0x3000u32).map(|i| i as u8).collect();
        f.write_all(&data).unwrap();
        let map = BarMap::map(f.path(), Some((0x1010, 0x20))).unwrap();
        let r = Region::new(map, 0, 0x20, "test").unwrap();
        assert_eq!(r.read8(0).unwrap(), 0x10);
        assert!(BarMap::map(f.path(), Some((0x2ff0, 0x20))).is_err());
        assert!(BarMap::map(f.path(), Some((0, 0))).is_err());
    }
}
