// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest memory as the driver sees it: guest-physical addresses it can read
//! and write, and a pool it carves its rings and request buffers from.
//!
//! The driver never holds a pointer into guest memory; every access goes
//! through [`GuestMemory`], so the same code runs over the loopback VMM's
//! memfd (a [`VmGuestMemory`]) and, later, over a real guest's DMA memory.

use std::collections::BTreeMap;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// An access outside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest range {gpa:#x}+{len:#x} is not in guest memory")]
pub struct MemError {
    pub gpa: u64,
    pub len: usize,
}

/// Guest-physical memory the driver places rings and buffers in.
///
/// `read` and `write` copy bytes; the ring index fields go through
/// `load_u16`/`store_u16`, whose defaults add the acquire/release ordering
/// a split ring needs (section 2.7.13 of virtio 1.2: the index is published
/// after the entries it covers). Implementations with real atomics should
/// override them.
pub trait GuestMemory: Send + Sync {
    /// Copies `buf.len()` bytes at `gpa` into `buf`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Copies `buf` to `gpa`.
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError>;

    /// Reads a little-endian `u16` with acquire ordering.
    fn load_u16(&self, gpa: u64) -> Result<u16, MemError> {
        let mut b = [0u8; 2];
        self.read(gpa, &mut b)?;
        fence(Ordering::Acquire);
        Ok(u16::from_le_bytes(b))
    }

    /// Writes a little-endian `u16` with release ordering.
    fn store_u16(&self, gpa: u64, value: u16) -> Result<(), MemError> {
        fence(Ordering::Release);
        self.write(gpa, &value.to_le_bytes())
    }

    /// Reads a little-endian `u32`.
    fn read_u32(&self, gpa: u64) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

impl<T: GuestMemory + ?Sized> GuestMemory for Arc<T> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        (**self).read(gpa, buf)
    }
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        (**self).write(gpa, buf)
    }
    fn load_u16(&self, gpa: u64) -> Result<u16, MemError> {
        (**self).load_u16(gpa)
    }
    fn store_u16(&self, gpa: u64, value: u16) -> Result<(), MemError> {
        (**self).store_u16(gpa, value)
    }
}

/// [`GuestMemory`] over vm-memory's mmap-backed guest memory (the loopback
/// VMM's memfd regions, or anonymous memory in unit tests).
#[derive(Debug, Clone)]
pub struct VmGuestMemory {
    mem: Arc<GuestMemoryMmap<()>>,
}

impl VmGuestMemory {
    pub fn new(mem: Arc<GuestMemoryMmap<()>>) -> Self {
        VmGuestMemory { mem }
    }

    /// The vm-memory view (for a device model in tests, or host addresses).
    pub fn inner(&self) -> &Arc<GuestMemoryMmap<()>> {
        &self.mem
    }
}

impl GuestMemory for VmGuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let err = MemError {
            gpa,
            len: buf.len(),
        };
        self.mem.read_slice(buf, GuestAddress(gpa)).map_err(|_| err)
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemError {
                gpa,
                len: buf.len(),
            })
    }

    fn load_u16(&self, gpa: u64) -> Result<u16, MemError> {
        // Ring fields are little-endian; vm-memory's atomics use host order.
        self.mem
            .load::<u16>(GuestAddress(gpa), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|_| MemError { gpa, len: 2 })
    }

    fn store_u16(&self, gpa: u64, value: u16) -> Result<(), MemError> {
        self.mem
            .store(value.to_le(), GuestAddress(gpa), Ordering::Release)
            .map_err(|_| MemError { gpa, len: 2 })
    }
}

/// The pool ran out of space of the right shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("buffer pool: no free range of {len:#x} bytes aligned to {align:#x}")]
pub struct PoolError {
    pub len: u64,
    pub align: u64,
}

/// A range handed out by [`BufferPool::alloc`]; give it back with
/// [`BufferPool::free`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub gpa: u64,
    pub len: u64,
}

/// Smallest unit the pool hands out: keeps every buffer 8-byte aligned so
/// `le64` fields in requests stay naturally aligned in memory too.
const GRANULE: u64 = 8;

/// A first-fit allocator over guest-physical ranges, for the driver's rings
/// and request buffers. Freed ranges coalesce with their neighbours.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<BTreeMap<u64, u64>>,
}

impl BufferPool {
    /// A pool over `ranges` of `(gpa, len)`; overlapping ranges are a caller
    /// bug and are not checked.
    pub fn new(ranges: &[(u64, u64)]) -> Self {
        let mut free = BTreeMap::new();
        for &(gpa, len) in ranges {
            if len > 0 {
                free.insert(gpa, len);
            }
        }
        BufferPool {
            free: Mutex::new(free),
        }
    }

    fn free_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u64>> {
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Allocates `len` bytes (rounded up to 8, at least 8) aligned to `align`
    /// (a power of two; smaller than 8 means 8).
    pub fn alloc(&self, len: u64, align: u64) -> Result<Buffer, PoolError> {
        let align = align.max(GRANULE).next_power_of_two();
        let err = PoolError { len, align };
        let len = len.max(1).checked_next_multiple_of(GRANULE).ok_or(err)?;
        let mut free = self.free_map();
        let found = free.iter().find_map(|(&start, &flen)| {
            let aligned = start.checked_next_multiple_of(align)?;
            let end = aligned.checked_add(len)?;
            (end <= start + flen).then_some((start, flen, aligned))
        });
        let (start, flen, aligned) = found.ok_or(err)?;
        free.remove(&start);
        if aligned > start {
            free.insert(start, aligned - start);
        }
        let tail = start + flen - (aligned + len);
        if tail > 0 {
            free.insert(aligned + len, tail);
        }
        Ok(Buffer { gpa: aligned, len })
    }

    /// Returns a buffer to the pool.
    pub fn free(&self, buffer: Buffer) {
        let mut free = self.free_map();
        let (mut start, mut len) = (buffer.gpa, buffer.len);
        if let Some((&prev, &plen)) = free.range(..start).next_back() {
            if prev + plen == start {
                free.remove(&prev);
                start = prev;
                len += plen;
            }
        }
        if let Some(&nlen) = free.get(&(start + len)) {
            free.remove(&(start + len));
            len += nlen;
        }
        free.insert(start, len);
    }

    /// Bytes currently free (a leak check for tests).
    pub fn free_bytes(&self) -> u64 {
        self.free_map().values().sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pool_aligns_and_coalesces() {
        let pool = BufferPool::new(&[(0x1000, 0x10000)]);
        let total = pool.free_bytes();
        let a = pool.alloc(3, 1).unwrap();
        assert_eq!(
            a,
            Buffer {
                gpa: 0x1000,
                len: 8
            }
        );
        let b = pool.alloc(0x100, 0x1000).unwrap();
        assert_eq!(b.gpa, 0x2000);
        let c = pool.alloc(0x20, 16).unwrap();
        assert_eq!(c.gpa % 16, 0);
        pool.free(b);
        pool.free(a);
        pool.free(c);
        assert_eq!(pool.free_bytes(), total);
        // Coalesced back into one range: the whole pool fits again.
        assert_eq!(pool.alloc(0x10000, 1).unwrap().gpa, 0x1000);
        assert!(pool.alloc(8, 1).is_err());
    }

    #[test]
    fn vm_memory_round_trip_and_bounds() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x2000)]).unwrap();
        let m = VmGuestMemory::new(Arc::new(mem));
        m.write(0x1800, b"hello").unwrap();
        let mut b = [0u8; 5];
        m.read(0x1800, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        m.store_u16(0x1002, 0xbeef).unwrap();
        assert_eq!(m.load_u16(0x1002).unwrap(), 0xbeef);
        assert_eq!(m.read_u32(0x1800).unwrap(), u32::from_le_bytes(*b"hell"));
        assert!(m.read(0x2ffe, &mut b).is_err());
        assert!(m.write(0x0, b"x").is_err());
    }
}
