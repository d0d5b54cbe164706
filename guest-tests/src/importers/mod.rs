// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Small programs that use the device the way real dma-buf users do, each
//! checking its data end to end (the bytes one side wrote are the bytes the
//! other side reads, through the address space the device named):
//!
//! - [`display_scanout`]: a display controller, a static importer that
//!   scans out frames a producer wrote;
//! - [`gpu_render`]: a GPU, a dynamic importer that renders under the
//!   reservation lock with a WRITE fence and maps again after the host
//!   moved the buffer;
//! - [`camera_capture`]: a camera frame the host exports read-only, opened
//!   by name;
//! - [`blob_by_uuid`]: a buffer published with `EXPORT_UUID` and fetched by
//!   another device of the VM with `GET_SHARED_OBJECT`, the way a virtio-gpu
//!   blob resource gets its backing.
//!
//! They run over a [`LoopbackVmm`] and report which path the data took, so a
//! caller can insist on the zero-copy window where it is live.

use std::io;

use virtio_dmabuf_protocol::{caps, AddressSpace, Direction, Info, MapReply, Status};

use crate::driver::{Driver, DriverError, Outcome};
use crate::session::{Session, SessionError};
use crate::vmm::shm::ShmError;
use crate::vmm::VmmError;

mod blob;
mod camera;
mod display;
mod gpu;

pub use blob::{blob_by_uuid, SharedFileMapping};
pub use camera::camera_capture;
pub use display::display_scanout;
pub use gpu::gpu_render;

/// Why an importer program stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImporterError {
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Shm(#[from] ShmError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what}: the device answered {status}")]
    Device { what: String, status: Status },
    #[error("the host refused {what}: {message}")]
    Host { what: &'static str, message: String },
    /// The data or the device's answer is not what the program expected.
    #[error("{0}")]
    Check(String),
    /// What the program needs is not live here (a skip, not a failure).
    #[error("not available here: {0}")]
    Unavailable(String),
}

type Result<T> = std::result::Result<T, ImporterError>;

/// A device answer that must be OK.
fn ok<T>(what: impl Into<String>, r: std::result::Result<Outcome<T>, DriverError>) -> Result<T> {
    r?.map_err(|status| ImporterError::Device {
        what: what.into(),
        status,
    })
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> ImporterError {
    move |source| ImporterError::Io { what, source }
}

fn check(cond: bool, why: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(ImporterError::Check(why()))
    }
}

/// How the bytes travelled between the guest and the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// Shared memory region 0 (`MAP_SHM`; `space` SHM for the importer).
    Window,
    /// `TRANSFER_TO_HOST` / `TRANSFER_FROM_HOST` (`space` OBJECT).
    Transfer,
}

/// What an importer program did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub path: DataPath,
    /// Checksums of the frames that went end to end, in order.
    pub checksums: Vec<u64>,
}

// ---- frames ----

/// An XRGB8888 frame with a stride, as a display or a camera lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameFormat {
    pub width: u32,
    pub height: u32,
    /// Bytes per row, at least `4 * width`.
    pub stride: u32,
}

impl FrameFormat {
    /// A frame whose rows are padded to 256 bytes (a typical scanout pitch).
    pub fn new(width: u32, height: u32) -> Self {
        FrameFormat {
            width,
            height,
            stride: (4 * width).next_multiple_of(256),
        }
    }

    /// Bytes of the frame, padding included.
    pub fn len(&self) -> usize {
        self.stride as usize * self.height as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The smallest page multiple that holds the frame.
    pub fn buffer_size(&self, page: u64) -> u64 {
        (self.len() as u64).next_multiple_of(page)
    }

    /// Frame number `seq`: a gradient that differs in every pixel and
    /// every frame; row padding is left zero.
    pub fn render(&self, seq: u32) -> Vec<u8> {
        let mut out = vec![0u8; self.len()];
        for y in 0..self.height {
            let row = &mut out[(y * self.stride) as usize..][..(4 * self.width) as usize];
            for (x, px) in row.chunks_exact_mut(4).enumerate() {
                let x = x as u32;
                px[0] = (x.wrapping_mul(7) ^ seq) as u8;
                px[1] = (y.wrapping_mul(13).wrapping_add(seq)) as u8;
                px[2] = (x.wrapping_add(y).wrapping_mul(3).wrapping_add(seq * 29)) as u8;
                px[3] = 0xff;
            }
        }
        out
    }

    /// FNV-1a over the visible pixels (row padding excluded), what a
    /// display's CRC unit would report.
    pub fn checksum(&self, frame: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for y in 0..self.height as usize {
            let start = y * self.stride as usize;
            let row = frame
                .get(start..start + 4 * self.width as usize)
                .unwrap_or_default();
            for &b in row {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }
}

// ---- reaching the bytes a MAP reply names ----

/// The bytes of a mapping, reached through the address space its `MAP`
/// reply names: the window (SHM), guest memory (GUEST_PHYS), or the copy
/// path at object offsets (OBJECT).
#[derive(Debug)]
pub struct MappedBuffer<'a> {
    vmm: &'a dyn Session,
    object: u64,
    map: &'a MapReply,
}

impl<'a> MappedBuffer<'a> {
    pub fn new(vmm: &'a dyn Session, object: u64, map: &'a MapReply) -> Self {
        MappedBuffer { vmm, object, map }
    }

    pub fn len(&self) -> u64 {
        self.map.entries.iter().map(|e| e.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(address, length)` pieces of `offset..offset + len` of the buffer.
    fn pieces(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        check(
            offset.checked_add(len).is_some_and(|end| end <= self.len()),
            || format!("{offset:#x}+{len:#x} is outside the mapping"),
        )?;
        let mut out = Vec::new();
        let (mut skip, mut left) = (offset, len);
        for e in &self.map.entries {
            if left == 0 {
                break;
            }
            if skip >= e.len {
                skip -= e.len;
                continue;
            }
            let n = (e.len - skip).min(left);
            out.push((e.addr + skip, n));
            skip = 0;
            left -= n;
        }
        Ok(out)
    }

    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let d = self.vmm.driver();
        let mut out = Vec::with_capacity(len);
        for (addr, n) in self.pieces(offset, len as u64)? {
            match self.map.space {
                AddressSpace::Shm => out.extend(self.vmm.shm_read(addr, n as usize)?),
                AddressSpace::Object => out.extend(ok(
                    "TRANSFER_FROM_HOST",
                    d.transfer_from_host(self.object, addr, n),
                )?),
                AddressSpace::GuestPhys => {
                    let mut buf = vec![0u8; n as usize];
                    d.memory().read(addr, &mut buf).map_err(DriverError::from)?;
                    out.extend(buf);
                }
            }
        }
        Ok(out)
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let d = self.vmm.driver();
        let mut at = 0usize;
        for (addr, n) in self.pieces(offset, data.len() as u64)? {
            let chunk = &data[at..at + n as usize];
            match self.map.space {
                AddressSpace::Shm => self.vmm.shm_write(addr, chunk)?,
                AddressSpace::Object => ok(
                    "TRANSFER_TO_HOST",
                    d.transfer_to_host(self.object, addr, chunk),
                )?,
                AddressSpace::GuestPhys => {
                    d.memory().write(addr, chunk).map_err(DriverError::from)?
                }
            }
            at += n as usize;
        }
        Ok(())
    }
}

/// The window when `use_window` and the window can carry the data, else
/// the copy path.
fn data_path(vmm: &dyn Session, info: &Info, use_window: bool) -> DataPath {
    if use_window && window_live(vmm, info) {
        DataPath::Window
    } else {
        DataPath::Transfer
    }
}

/// On the window path, places `object` writable in the window; returns its
/// offset there.
fn place_writable(d: &Driver, object: u64, path: DataPath) -> Result<Option<u64>> {
    Ok(match path {
        DataPath::Window => Some(ok("MAP_SHM", d.map_shm(object, true))?.0),
        DataPath::Transfer => None,
    })
}

/// The CPU writes `data` at the start of `object`, bracketed by
/// `BEGIN/END_CPU_ACCESS(TO_DEVICE)`: through the window at `window`, else
/// with `TRANSFER_TO_HOST`.
fn cpu_write(vmm: &dyn Session, object: u64, window: Option<u64>, data: &[u8]) -> Result<()> {
    let d = vmm.driver();
    ok(
        "BEGIN_CPU_ACCESS",
        d.begin_cpu_access(object, Direction::ToDevice),
    )?;
    match window {
        Some(offset) => vmm.shm_write(offset, data)?,
        None => ok("TRANSFER_TO_HOST", d.transfer_to_host(object, 0, data))?,
    }
    ok(
        "END_CPU_ACCESS",
        d.end_cpu_access(object, Direction::ToDevice),
    )
}

/// Takes `object` out of the window if it was `placed` there, then
/// releases it.
fn release(d: &Driver, object: u64, placed: bool) -> Result<()> {
    if placed {
        ok("UNMAP_SHM", d.unmap_shm(object))?;
    }
    ok("RELEASE", d.release(object))
}

fn info(vmm: &dyn Session) -> Result<Info> {
    ok("GET_INFO", vmm.driver().get_info())
}

/// Whether the window can carry this guest's data: `HOST_SHM` live and the
/// front-end holding the region.
fn window_live(vmm: &dyn Session, info: &Info) -> bool {
    info.caps & caps::HOST_SHM != 0 && (vmm.capabilities().shm_size > 0)
}

fn expect_space(map: &MapReply, path: DataPath) -> Result<()> {
    let want = match path {
        DataPath::Window => AddressSpace::Shm,
        DataPath::Transfer => AddressSpace::Object,
    };
    check(map.space == want, || {
        format!(
            "MAP names space {:?}, the importer expected {want:?}",
            map.space
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn frames_differ_and_checksums_ignore_padding() {
        let f = FrameFormat::new(30, 4);
        assert_eq!(f.stride, 256);
        assert_eq!(f.len(), 1024);
        assert_eq!(f.buffer_size(4096), 4096);
        let (a, b) = (f.render(0), f.render(1));
        assert_ne!(f.checksum(&a), f.checksum(&b));
        let mut padded = a.clone();
        padded[4 * 30] = 0x55; // row 0 padding
        assert_eq!(f.checksum(&padded), f.checksum(&a));
        padded[0] ^= 1;
        assert_ne!(f.checksum(&padded), f.checksum(&a));
    }
}
