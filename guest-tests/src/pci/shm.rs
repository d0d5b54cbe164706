// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Shared memory region 0 as the guest sees it: a range of a BAR
//! (`VIRTIO_PCI_CAP_SHARED_MEMORY_CFG`, id 0) into which the front-end maps
//! the daemon's objects (`MAP_SHM`, section 7.5). Parts nothing is mapped
//! into are holes of the BAR: QEMU reads them as all-ones and drops
//! writes.

use super::caps::ShmCap;
use super::mmio::{MmioError, Region};

/// One shared memory region, mapped into this process.
#[derive(Debug, Clone)]
pub struct ShmRegion {
    cap: ShmCap,
    region: Region,
}

impl ShmRegion {
    pub fn new(cap: ShmCap, region: Region) -> ShmRegion {
        ShmRegion { cap, region }
    }

    pub fn id(&self) -> u8 {
        self.cap.id
    }

    /// Where the region is: its BAR and offset there.
    pub fn cap(&self) -> ShmCap {
        self.cap
    }

    /// Bytes in the region.
    pub fn size(&self) -> u64 {
        self.region.len()
    }

    /// `len` bytes at `offset`; refused if any is past the end.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, MmioError> {
        let mut out = vec![0u8; len];
        self.region.read_bytes(offset, &mut out)?;
        Ok(out)
    }

    /// Writes `data` at `offset`; refused if any byte is past the end.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), MmioError> {
        self.region.write_bytes(offset, data)
    }
}
