// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A GPU buffer of the host shared with the guest (contract sections 7.5,
//! 8, 9 and 10), with vgem, the kernel's virtual GEM driver, standing in
//! for the GPU.
//!
//! The host side (this process, where the daemon runs) creates a dumb
//! buffer on the vgem card, exports it as a dma-buf with PRIME, writes a
//! frame through its mapping and registers it as a dynamic export (`ctl
//! export NAME --fd-from /proc/self/fd/N --dynamic`). The guest opens it by
//! name and reads it under CPU access; every host sync of that access is a
//! real `DMA_BUF_IOCTL_SYNC` on the vgem dma-buf. The host then evicts it
//! (`MOVE_NOTIFY`, the same bytes in the new memory) and revokes it
//! (`REVOKED`, the handle answers `ENOENT`). Without a vgem card the
//! scenario skips.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, Opcode, Setter, Updater};
use virtio_dmabuf_protocol::{attach_flags, obj_flags, Direction, EventType, Status, EVENT_SIZE};

use super::{export_name, listed, next_event, pattern, Check, Stop, Target};
use crate::host::{host_syncs_during, ExportOptions, HostControl, HostSync};
use crate::importers::SharedFileMapping;
use crate::{ensure, ensure_eq, skip};

/// The vgem driver's name, as `DRM_IOCTL_VERSION` reports it.
const VGEM_NAME: &[u8] = b"vgem";

/// The frame: 128 x 16 XRGB8888, two pages.
const WIDTH: u32 = 128;
const HEIGHT: u32 = 16;
const BPP: u32 = 32;

/// `DMA_BUF_SYNC_*` of `<linux/dma-buf.h>`, written out so the check does
/// not lean on the daemon's own constants.
const SYNC_START: u64 = 0x0;
const SYNC_READ: u64 = 0x1;
const SYNC_WRITE: u64 = 0x2;
const SYNC_END: u64 = 0x4;

/// `struct drm_version` of `<drm/drm.h>`.
#[repr(C)]
#[derive(Debug)]
struct DrmVersion {
    version_major: i32,
    version_minor: i32,
    version_patchlevel: i32,
    name_len: usize,
    name: *mut u8,
    date_len: usize,
    date: *mut u8,
    desc_len: usize,
    desc: *mut u8,
}

/// `struct drm_mode_create_dumb` of `<drm/drm_mode.h>`.
#[repr(C)]
#[derive(Debug, Default)]
struct DrmModeCreateDumb {
    height: u32,
    width: u32,
    bpp: u32,
    flags: u32,
    handle: u32,
    pitch: u32,
    size: u64,
}

/// `struct drm_prime_handle` of `<drm/drm.h>`.
#[repr(C)]
#[derive(Debug, Default)]
struct DrmPrimeHandle {
    handle: u32,
    flags: u32,
    fd: i32,
}

/// `DRM_IOCTL_VERSION` = `_IOWR('d', 0x00, struct drm_version)`.
const DRM_IOCTL_VERSION: Opcode = opcode::read_write::<DrmVersion>(b'd', 0x00);
/// `DRM_IOCTL_MODE_CREATE_DUMB` = `_IOWR('d', 0xB2, struct drm_mode_create_dumb)`.
const DRM_IOCTL_MODE_CREATE_DUMB: Opcode = opcode::read_write::<DrmModeCreateDumb>(b'd', 0xB2);
/// `DRM_IOCTL_PRIME_HANDLE_TO_FD` = `_IOWR('d', 0x2d, struct drm_prime_handle)`.
const DRM_IOCTL_PRIME_HANDLE_TO_FD: Opcode = opcode::read_write::<DrmPrimeHandle>(b'd', 0x2d);
/// `DMA_BUF_IOCTL_SYNC` = `_IOW('b', 0, struct dma_buf_sync)` (one u64).
const DMA_BUF_IOCTL_SYNC: Opcode = opcode::write::<u64>(b'b', 0);

/// `DRM_CLOEXEC` and `DRM_RDWR`: the `open(2)` flags of the exported fd.
const PRIME_FLAGS: u32 = (libc::O_CLOEXEC | libc::O_RDWR) as u32;

/// An open vgem DRM node.
#[derive(Debug)]
pub(super) struct VgemCard {
    pub(super) file: File,
}

/// A dumb buffer on the card and its dma-buf.
#[derive(Debug)]
pub(super) struct DumbBuffer {
    pub(super) pitch: u32,
    pub(super) size: u64,
    /// Its GEM handle on the card that made it (valid while that card is
    /// open).
    pub(super) handle: u32,
    pub(super) dmabuf: OwnedFd,
}

pub(super) fn ioctl_error(what: &str, e: Errno) -> Stop {
    Stop::Fail(format!("{what}: {e}"))
}

/// Runs an ioctl, retrying `EINTR` and `EAGAIN` as libdrm's `drmIoctl` does.
pub(super) fn retrying<T>(
    mut call: impl FnMut() -> rustix::io::Result<T>,
) -> rustix::io::Result<T> {
    loop {
        match call() {
            Err(Errno::INTR | Errno::AGAIN) => continue,
            other => return other,
        }
    }
}

/// The driver name of a DRM node (`DRM_IOCTL_VERSION`), at most 63 bytes.
fn driver_name(card: BorrowedFd<'_>) -> rustix::io::Result<Vec<u8>> {
    let mut name = [0u8; 64];
    let mut version = DrmVersion {
        version_major: 0,
        version_minor: 0,
        version_patchlevel: 0,
        name_len: name.len() - 1,
        name: name.as_mut_ptr(),
        date_len: 0,
        date: std::ptr::null_mut(),
        desc_len: 0,
        desc: std::ptr::null_mut(),
    };
    // SAFETY: DRM_IOCTL_VERSION reads and writes one `struct drm_version`,
    // whose layout `version` has; the kernel writes at most `name_len`
    // bytes to `name`, which points into `name` above (63 of its 64
    // bytes), and nothing to `date`/`desc`, whose lengths are 0. Both
    // outlive the call.
    retrying(|| unsafe { ioctl(card, Updater::<DRM_IOCTL_VERSION, _>::new(&mut version)) })?;
    let len = version.name_len.min(name.len() - 1);
    Ok(name[..len].to_vec())
}

impl VgemCard {
    /// The first `/dev/dri/card*` driven by vgem, or why there is none.
    pub(super) fn find() -> Result<VgemCard, String> {
        let mut seen = Vec::new();
        let entries = std::fs::read_dir("/dev/dri")
            .map_err(|e| format!("no vgem card: /dev/dri: {e} (is the vgem module loaded?)"))?;
        let mut cards: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("card"))
            })
            .collect();
        cards.sort();
        for path in cards {
            let file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) => {
                    seen.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            match driver_name(file.as_fd()) {
                Ok(name) if name == VGEM_NAME => return Ok(VgemCard { file }),
                Ok(name) => seen.push(format!(
                    "{} is {}",
                    path.display(),
                    String::from_utf8_lossy(&name)
                )),
                Err(e) => seen.push(format!("{}: DRM_IOCTL_VERSION: {e}", path.display())),
            }
        }
        Err(format!(
            "no vgem card among /dev/dri/card* ({}); load the vgem module",
            if seen.is_empty() {
                "none".to_string()
            } else {
                seen.join(", ")
            }
        ))
    }

    /// `DRM_IOCTL_MODE_CREATE_DUMB`, then `DRM_IOCTL_PRIME_HANDLE_TO_FD`
    /// with `DRM_CLOEXEC | DRM_RDWR`.
    pub(super) fn create_dumb(
        &self,
        width: u32,
        height: u32,
        bpp: u32,
    ) -> Result<DumbBuffer, Stop> {
        let card = self.file.as_fd();
        let mut dumb = DrmModeCreateDumb {
            height,
            width,
            bpp,
            ..DrmModeCreateDumb::default()
        };
        // SAFETY: DRM_IOCTL_MODE_CREATE_DUMB reads and writes one
        // `struct drm_mode_create_dumb` (no pointers), whose layout `dumb`
        // has; `dumb` outlives the call.
        retrying(|| unsafe {
            ioctl(
                card,
                Updater::<DRM_IOCTL_MODE_CREATE_DUMB, _>::new(&mut dumb),
            )
        })
        .map_err(|e| ioctl_error("DRM_IOCTL_MODE_CREATE_DUMB", e))?;
        let mut prime = DrmPrimeHandle {
            handle: dumb.handle,
            flags: PRIME_FLAGS,
            fd: -1,
        };
        // SAFETY: DRM_IOCTL_PRIME_HANDLE_TO_FD reads and writes one
        // `struct drm_prime_handle` (no pointers), whose layout `prime`
        // has; `prime` outlives the call.
        retrying(|| unsafe {
            ioctl(
                card,
                Updater::<DRM_IOCTL_PRIME_HANDLE_TO_FD, _>::new(&mut prime),
            )
        })
        .map_err(|e| ioctl_error("DRM_IOCTL_PRIME_HANDLE_TO_FD", e))?;
        if prime.fd < 0 {
            return Err(Stop::Fail(format!(
                "DRM_IOCTL_PRIME_HANDLE_TO_FD returned fd {}",
                prime.fd
            )));
        }
        // SAFETY: on success the kernel stored a new fd in `prime.fd` that
        // nothing else owns; it is wrapped exactly once, here. (The GEM
        // handle goes when the card is closed; the dma-buf keeps the
        // buffer.)
        let dmabuf = unsafe { OwnedFd::from_raw_fd(prime.fd) };
        Ok(DumbBuffer {
            pitch: dumb.pitch,
            size: dumb.size,
            handle: dumb.handle,
            dmabuf,
        })
    }
}

/// One `DMA_BUF_IOCTL_SYNC` on `dmabuf`, as any CPU user of the buffer
/// brackets its access.
fn cpu_sync(dmabuf: BorrowedFd<'_>, flags: u64) -> Result<(), Stop> {
    // SAFETY: DMA_BUF_IOCTL_SYNC reads one `struct dma_buf_sync` (a u64);
    // `Setter` passes a pointer to its own copy of `flags`, live for the
    // call.
    retrying(|| unsafe { ioctl(dmabuf, Setter::<DMA_BUF_IOCTL_SYNC, _>::new(flags)) })
        .map_err(|e| ioctl_error("DMA_BUF_IOCTL_SYNC", e))
}

/// The host syncs of one request are exactly `flags`, each a successful
/// real ioctl.
fn kernel_syncs(syncs: &[HostSync], flags: u64, what: &str) -> Check {
    let seen: Vec<(u64, bool, Option<i32>)> =
        syncs.iter().map(|s| (s.flags, s.kernel, s.errno)).collect();
    ensure_eq!(
        seen,
        vec![(flags, true, None)],
        "{what}: one real DMA_BUF_IOCTL_SYNC on the vgem dma-buf"
    );
    Ok(())
}

pub(super) fn vgem_buffer_opened_synced_evicted_and_revoked(t: &Target) -> Check {
    let host: &dyn HostControl = t.host()?;
    if !host.shares_our_kernel() {
        skip!("the daemon runs under another kernel: a vgem buffer of this one cannot reach it");
    }
    let card = match VgemCard::find() {
        Ok(card) => card,
        Err(why) => skip!("{why}"),
    };
    let buffer = card.create_dumb(WIDTH, HEIGHT, BPP)?;
    let frame_len = usize::try_from(buffer.size).map_err(|_| Stop::Fail("size".into()))?;
    ensure!(
        buffer.pitch >= WIDTH * BPP / 8 && buffer.size >= u64::from(buffer.pitch * HEIGHT),
        "dumb buffer {buffer:?}"
    );
    // The GPU's frame, written by the host CPU through the dma-buf's own
    // mapping and bracketed as a CPU writer must.
    let frame = pattern(frame_len, 73);
    {
        let map = SharedFileMapping::new(buffer.dmabuf.as_fd(), frame_len)?;
        ensure!(map.writable(), "the PRIME fd is DRM_RDWR");
        cpu_sync(buffer.dmabuf.as_fd(), SYNC_START | SYNC_WRITE)?;
        map.write(0, &frame)?;
        cpu_sync(buffer.dmabuf.as_fd(), SYNC_END | SYNC_WRITE)?;
    }
    let name = export_name("vgem");
    let options = ExportOptions {
        dynamic: true,
        ..ExportOptions::default()
    };
    host.export(&name, buffer.dmabuf.as_fd(), &options)
        .map_err(Stop::Fail)?;
    // The daemon holds its own reference; ours and the card's may go.
    drop(buffer.dmabuf);
    drop(card);

    let vmm = t.connect()?;
    let d = vmm.driver();
    d.post_event_buffers(2, EVENT_SIZE as u32)?;
    let o = d.open_by_name(&name)??;
    ensure_eq!(o.size, buffer.size);
    ensure_eq!(
        o.obj_flags & (obj_flags::DYNAMIC | obj_flags::REAL_DMABUF | obj_flags::WRITABLE),
        obj_flags::DYNAMIC | obj_flags::REAL_DMABUF | obj_flags::WRITABLE,
        "a writable dynamic export of a kernel dma-buf"
    );
    let a = d.attach(o.object, attach_flags::DYNAMIC_IMPORTER)??;
    let m = d.map(a, Direction::FromDevice, 8, 0)??;
    ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));

    // CPU access: each bracket is one real sync on the vgem buffer.
    let (r, syncs) = host_syncs_during(host, o.uuid, || {
        d.begin_cpu_access(o.object, Direction::FromDevice)
    })
    .map_err(Stop::Fail)?;
    ensure_eq!(r?, Ok(()));
    kernel_syncs(
        &syncs,
        SYNC_START | SYNC_READ,
        "BEGIN_CPU_ACCESS(FROM_DEVICE)",
    )?;
    ensure_eq!(
        d.transfer_from_host(o.object, 0, buffer.size)?,
        Ok(frame.clone()),
        "the guest reads the GPU's frame"
    );
    let (r, syncs) = host_syncs_during(host, o.uuid, || {
        d.end_cpu_access(o.object, Direction::FromDevice)
    })
    .map_err(Stop::Fail)?;
    ensure_eq!(r?, Ok(()));
    kernel_syncs(&syncs, SYNC_END | SYNC_READ, "END_CPU_ACCESS(FROM_DEVICE)")?;
    if vmm.capabilities().shm_size > 0 {
        let (offset, len) = d.map_shm(o.object, false)??;
        ensure_eq!(len, buffer.size);
        ensure_eq!(
            vmm.shm_read(offset, frame_len)?,
            frame,
            "the window shows the vgem buffer"
        );
        ensure_eq!(d.unmap_shm(o.object)?, Ok(()));
    }

    // The host moves it: the importer hears of it, the bytes moved along.
    host.evict(o.uuid).map_err(Stop::Fail)?;
    let ev = next_event(d, Duration::from_secs(2), "MOVE_NOTIFY after the eviction")?;
    ensure_eq!(
        (ev.kind, ev.object, ev.attachment, ev.data),
        (EventType::MoveNotify, o.object, a, 1)
    );
    ensure_eq!(listed(host, o.uuid)?.generation, 1);
    ensure_eq!(
        d.transfer_from_host(o.object, 0, buffer.size)?,
        Ok(frame),
        "the same bytes after the move"
    );
    let m = d.map(a, Direction::FromDevice, 8, 0)??;
    ensure_eq!(m.generation, 1);
    ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));

    // The host withdraws it: REVOKED, then the handle is ENOENT.
    host.revoke(&name).map_err(Stop::Fail)?;
    let ev = next_event(d, Duration::from_secs(2), "REVOKED")?;
    ensure_eq!((ev.kind, ev.object), (EventType::Revoked, o.object));
    ensure_eq!(
        d.begin_cpu_access(o.object, Direction::FromDevice)?,
        Err(Status::NoEnt)
    );
    ensure_eq!(
        d.transfer_from_host(o.object, 0, 8)?.map(|_| ()),
        Err(Status::NoEnt)
    );
    ensure_eq!(
        d.open_by_name(&name)?.map(|r| r.object),
        Err(Status::NoEnt),
        "the export is gone"
    );
    ensure_eq!(d.release(o.object)?, Ok(()), "RELEASE of a revoked handle");
    ensure_eq!(d.release(o.object)?, Err(Status::NoEnt));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drm_ioctl_numbers_and_layouts_match_the_uapi() {
        assert_eq!(std::mem::size_of::<DrmVersion>(), 64);
        assert_eq!(std::mem::size_of::<DrmModeCreateDumb>(), 32);
        assert_eq!(std::mem::size_of::<DrmPrimeHandle>(), 12);
        assert_eq!(DRM_IOCTL_VERSION, 0xC040_6400);
        assert_eq!(DRM_IOCTL_MODE_CREATE_DUMB, 0xC020_64B2);
        assert_eq!(DRM_IOCTL_PRIME_HANDLE_TO_FD, 0xC00C_642D);
        assert_eq!(DMA_BUF_IOCTL_SYNC, 0x4008_6200);
        assert_eq!(PRIME_FLAGS, 0o2_000_002);
    }
}
