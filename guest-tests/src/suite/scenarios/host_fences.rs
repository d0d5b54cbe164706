// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Implicit sync across the VM boundary (`docs/protocol.md`, "Host
//! fences"): the host's fences on a kernel dma-buf hold the guest's CPU
//! access and `WAIT`, and a guest's fence holds the host's users of the
//! buffer.
//!
//! The host side is this process, where the daemon runs (the real-kernel
//! lane, `vmm-config/e2e/lane-kernel.sh`): it makes a buffer (a vgem dumb
//! buffer standing in for a GPU render target, a udmabuf, a system
//! dma-heap buffer), registers it with `ctl export`, and acts on the fd it
//! kept: a host job's fence is a vgem fence (`DRM_IOCTL_VGEM_FENCE_ATTACH`
//! on the vgem buffer itself, or on a vgem scratch buffer and imported into
//! the others with `DMA_BUF_IOCTL_EXPORT_SYNC_FILE` and
//! `DMA_BUF_IOCTL_IMPORT_SYNC_FILE`), signalled with
//! `DRM_IOCTL_VGEM_FENCE_SIGNAL`; a host user waits with `poll` on the
//! dma-buf and reads a fence's error with `SYNC_IOC_FILE_INFO`. The ioctls
//! are written out here, not taken from the daemon. Without a vgem card,
//! or the buffer's node, or with the daemon on another machine (the export
//! reaches it as a copy, not a dma-buf), the scenarios skip.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags, SealFlags};
use rustix::ioctl::{ioctl, opcode, Opcode, Setter, Updater};
use virtio_dmabuf_protocol::{
    caps, obj_flags, Direction, FenceUsage, Reply, Request, Status, CONTROLQ,
};

use super::vgem::{ioctl_error, retrying, VgemCard};
use super::{export_name, info, Check, Stop, Target, SETTLE};
use crate::driver::{begin_cpu_access_request, Driver};
use crate::host::{ExportOptions, HostControl};
use crate::{ensure, ensure_eq, skip};

/// `struct drm_vgem_fence_attach` of `<drm/vgem_drm.h>`.
#[repr(C)]
#[derive(Debug, Default)]
struct VgemFenceAttach {
    handle: u32,
    flags: u32,
    out_fence: u32,
    pad: u32,
}

/// `struct drm_vgem_fence_signal` of `<drm/vgem_drm.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct VgemFenceSignal {
    fence: u32,
    flags: u32,
}

/// `struct dma_buf_export_sync_file` / `dma_buf_import_sync_file`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct DmaBufSyncFile {
    flags: u32,
    fd: i32,
}

/// `struct sync_file_info` of `<linux/sync_file.h>`.
#[repr(C)]
#[derive(Debug, Default)]
struct SyncFileInfo {
    name: [u8; 32],
    status: i32,
    flags: u32,
    num_fences: u32,
    pad: u32,
    sync_fence_info: u64,
}

/// `struct udmabuf_create` of `<linux/udmabuf.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UdmabufCreate {
    memfd: u32,
    flags: u32,
    offset: u64,
    size: u64,
}

/// `struct dma_heap_allocation_data` of `<linux/dma-heap.h>`.
#[repr(C)]
#[derive(Debug, Default)]
struct DmaHeapAllocation {
    len: u64,
    fd: u32,
    fd_flags: u32,
    heap_flags: u64,
}

/// `DRM_COMMAND_BASE` (0x40) + `DRM_VGEM_FENCE_ATTACH` (1).
const DRM_IOCTL_VGEM_FENCE_ATTACH: Opcode = opcode::read_write::<VgemFenceAttach>(b'd', 0x41);
/// `DRM_COMMAND_BASE` (0x40) + `DRM_VGEM_FENCE_SIGNAL` (2).
const DRM_IOCTL_VGEM_FENCE_SIGNAL: Opcode = opcode::write::<VgemFenceSignal>(b'd', 0x42);
const VGEM_FENCE_WRITE: u32 = 0x1;
const DMA_BUF_IOCTL_EXPORT_SYNC_FILE: Opcode = opcode::read_write::<DmaBufSyncFile>(b'b', 2);
const DMA_BUF_IOCTL_IMPORT_SYNC_FILE: Opcode = opcode::write::<DmaBufSyncFile>(b'b', 3);
const SYNC_IOC_FILE_INFO: Opcode = opcode::read_write::<SyncFileInfo>(b'>', 4);
const UDMABUF_CREATE: Opcode = opcode::write::<UdmabufCreate>(b'u', 0x42);
const UDMABUF_FLAGS_CLOEXEC: u32 = 1;
const DMA_HEAP_IOCTL_ALLOC: Opcode = opcode::read_write::<DmaHeapAllocation>(b'H', 0);
const DMA_BUF_SYNC_READ: u32 = 1;
const DMA_BUF_SYNC_WRITE: u32 = 2;

const UDMABUF_NODE: &str = "/dev/udmabuf";
const DMA_HEAP_NODE: &str = "/dev/dma_heap/system";

/// Two pages.
const BUFFER_SIZE: u64 = 8192;

/// A buffer of the host shared with the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A vgem dumb buffer (a GPU render target).
    Vgem,
    /// A udmabuf over a sealed memfd.
    Udmabuf,
    /// A system dma-heap buffer.
    DmaHeap,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Vgem => "vgem",
            Kind::Udmabuf => "udmabuf",
            Kind::DmaHeap => "dma-heap",
        }
    }
}

/// What `poll` said of an fd, and after how long.
#[derive(Debug, Clone, Copy)]
struct Polled {
    revents: i16,
    after: Duration,
}

/// `poll` on one fd for at most `within`.
fn poll_fd(fd: BorrowedFd<'_>, events: i16, within: Duration) -> Result<Polled, Stop> {
    let start = Instant::now();
    loop {
        let left = within.saturating_sub(start.elapsed());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: `p` is one valid `struct pollfd` and the count says one;
        // the kernel writes only its `revents`, and `p` outlives the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(Stop::Fail(format!("poll: {e}")));
        }
        return Ok(Polled {
            revents: p.revents,
            after: start.elapsed(),
        });
    }
}

/// The status of a sync_file (`SYNC_IOC_FILE_INFO`): 0 pending, 1
/// signalled, a negative errno when signalled with an error.
fn sync_file_status(sync: BorrowedFd<'_>) -> Result<i32, Stop> {
    let mut info = SyncFileInfo::default();
    // SAFETY: SYNC_IOC_FILE_INFO reads and writes one `struct
    // sync_file_info`, whose layout `info` has; with `num_fences` 0 the
    // kernel writes no fence array. `info` outlives the call.
    retrying(|| unsafe { ioctl(sync, Updater::<SYNC_IOC_FILE_INFO, _>::new(&mut info)) })
        .map_err(|e| ioctl_error("SYNC_IOC_FILE_INFO", e))?;
    Ok(info.status)
}

fn rw_flag(write: bool) -> u32 {
    if write {
        DMA_BUF_SYNC_WRITE
    } else {
        DMA_BUF_SYNC_READ
    }
}

/// `DMA_BUF_IOCTL_EXPORT_SYNC_FILE`: what a host reader (`write` false)
/// or writer waits for on the buffer now, as a sync_file.
fn export_sync_file(dmabuf: BorrowedFd<'_>, write: bool) -> Result<OwnedFd, Stop> {
    let mut arg = DmaBufSyncFile {
        flags: rw_flag(write),
        fd: -1,
    };
    // SAFETY: the ioctl reads and writes one `struct
    // dma_buf_export_sync_file` (no pointers), whose layout `arg` has;
    // `arg` outlives the call.
    retrying(|| unsafe {
        ioctl(
            dmabuf,
            Updater::<DMA_BUF_IOCTL_EXPORT_SYNC_FILE, _>::new(&mut arg),
        )
    })
    .map_err(|e| ioctl_error("DMA_BUF_IOCTL_EXPORT_SYNC_FILE", e))?;
    if arg.fd < 0 {
        return Err(Stop::Fail(format!(
            "EXPORT_SYNC_FILE returned fd {}",
            arg.fd
        )));
    }
    // SAFETY: on success the kernel installed a new fd in `arg.fd` that
    // nothing else owns; it is wrapped exactly once, here.
    Ok(unsafe { OwnedFd::from_raw_fd(arg.fd) })
}

/// `DMA_BUF_IOCTL_IMPORT_SYNC_FILE`: the sync_file's fences join the
/// buffer's reservation as WRITE (`write`) or READ fences.
fn import_sync_file(dmabuf: BorrowedFd<'_>, sync: BorrowedFd<'_>, write: bool) -> Result<(), Stop> {
    let arg = DmaBufSyncFile {
        flags: rw_flag(write),
        fd: sync.as_raw_fd(),
    };
    // SAFETY: the ioctl only reads one `struct dma_buf_import_sync_file`
    // (no pointers); `Setter` passes a pointer to its own copy, live for
    // the call, and the fd in it is borrowed for the call.
    retrying(|| unsafe {
        ioctl(
            dmabuf,
            Setter::<DMA_BUF_IOCTL_IMPORT_SYNC_FILE, _>::new(arg),
        )
    })
    .map_err(|e| ioctl_error("DMA_BUF_IOCTL_IMPORT_SYNC_FILE", e))
}

/// A udmabuf of `size` bytes over a fresh sealed memfd.
fn udmabuf(size: u64) -> Result<OwnedFd, Stop> {
    let dev = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(UDMABUF_NODE)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            skip!("{UDMABUF_NODE} is missing (no udmabuf on this host)")
        }
        Err(e) => return Err(Stop::Fail(format!("{UDMABUF_NODE}: {e}"))),
    };
    let memfd = memfd_create(
        "host-fences",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(|e| ioctl_error("memfd_create", e))?;
    ftruncate(&memfd, size).map_err(|e| ioctl_error("ftruncate", e))?;
    fcntl_add_seals(&memfd, SealFlags::SHRINK).map_err(|e| ioctl_error("F_ADD_SEALS", e))?;
    let arg = UdmabufCreate {
        memfd: u32::try_from(memfd.as_raw_fd()).map_err(|_| Stop::Fail("memfd number".into()))?,
        flags: UDMABUF_FLAGS_CLOEXEC,
        offset: 0,
        size,
    };
    let fd = loop {
        // SAFETY: UDMABUF_CREATE only reads one `struct udmabuf_create`
        // (no pointers), whose layout `arg` has, through the pointer
        // passed, valid for the call; its result is a new fd.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), UDMABUF_CREATE as _, &arg) };
        if r >= 0 {
            break r;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(Stop::Fail(format!("UDMABUF_CREATE: {e}")));
        }
    };
    // SAFETY: on success UDMABUF_CREATE returned a new fd that nothing
    // else owns; it is wrapped exactly once, here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A buffer of `size` bytes from the system dma-heap.
fn dma_heap(size: u64) -> Result<OwnedFd, Stop> {
    let heap = match std::fs::OpenOptions::new().read(true).open(DMA_HEAP_NODE) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            skip!("{DMA_HEAP_NODE} is missing (no system dma-heap on this host)")
        }
        Err(e) => return Err(Stop::Fail(format!("{DMA_HEAP_NODE}: {e}"))),
    };
    let mut arg = DmaHeapAllocation {
        len: size,
        fd: 0,
        fd_flags: (libc::O_RDWR | libc::O_CLOEXEC) as u32,
        heap_flags: 0,
    };
    // SAFETY: DMA_HEAP_IOCTL_ALLOC reads and writes one `struct
    // dma_heap_allocation_data` (no pointers), whose layout `arg` has;
    // `arg` outlives the call.
    retrying(|| unsafe { ioctl(&heap, Updater::<DMA_HEAP_IOCTL_ALLOC, _>::new(&mut arg)) })
        .map_err(|e| ioctl_error("DMA_HEAP_IOCTL_ALLOC", e))?;
    let fd = i32::try_from(arg.fd).map_err(|_| Stop::Fail(format!("heap fd {}", arg.fd)))?;
    // SAFETY: on success the kernel stored a new fd in `arg.fd` that
    // nothing else owns; it is wrapped exactly once, here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A host buffer and the host's "GPU" (the vgem card) that fences it.
#[derive(Debug)]
struct HostBuffer {
    kind: Kind,
    card: VgemCard,
    /// The buffer's own GEM handle, for a vgem buffer: its fences go
    /// straight on it.
    own: Option<u32>,
    dmabuf: OwnedFd,
}

impl HostBuffer {
    fn new(kind: Kind, card: VgemCard) -> Result<HostBuffer, Stop> {
        let (own, dmabuf) = match kind {
            Kind::Vgem => {
                let b = card.create_dumb(1024, 2, 32)?;
                (Some(b.handle), b.dmabuf)
            }
            Kind::Udmabuf => (None, udmabuf(BUFFER_SIZE)?),
            Kind::DmaHeap => (None, dma_heap(BUFFER_SIZE)?),
        };
        Ok(HostBuffer {
            kind,
            card,
            own,
            dmabuf,
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.dmabuf.as_fd()
    }

    fn vgem_attach(&self, handle: u32, write: bool) -> Result<u32, Stop> {
        let mut arg = VgemFenceAttach {
            handle,
            flags: if write { VGEM_FENCE_WRITE } else { 0 },
            ..VgemFenceAttach::default()
        };
        // SAFETY: DRM_IOCTL_VGEM_FENCE_ATTACH reads and writes one `struct
        // drm_vgem_fence_attach` (no pointers), whose layout `arg` has;
        // `arg` outlives the call.
        retrying(|| unsafe {
            ioctl(
                &self.card.file,
                Updater::<DRM_IOCTL_VGEM_FENCE_ATTACH, _>::new(&mut arg),
            )
        })
        .map_err(|e| ioctl_error("DRM_IOCTL_VGEM_FENCE_ATTACH", e))?;
        Ok(arg.out_fence)
    }

    /// A host job's fence on the buffer (a WRITE fence with `write`, else
    /// READ): its vgem id.
    fn fence(&self, write: bool) -> Result<u32, Stop> {
        if let Some(handle) = self.own {
            return self.vgem_attach(handle, write);
        }
        // Not a vgem buffer: the fence lives on a vgem scratch buffer and
        // is imported into this one's reservation.
        let scratch = self.card.create_dumb(1024, 1, 32)?;
        let fence = self.vgem_attach(scratch.handle, true)?;
        let sync = export_sync_file(scratch.dmabuf.as_fd(), false)?;
        import_sync_file(self.fd(), sync.as_fd(), write)?;
        Ok(fence)
    }

    fn signal(&self, fence: u32) -> Result<(), Stop> {
        let arg = VgemFenceSignal { fence, flags: 0 };
        // SAFETY: DRM_IOCTL_VGEM_FENCE_SIGNAL only reads one `struct
        // drm_vgem_fence_signal` (no pointers); `Setter` passes a pointer
        // to its own copy, live for the call.
        retrying(|| unsafe {
            ioctl(
                &self.card.file,
                Setter::<DRM_IOCTL_VGEM_FENCE_SIGNAL, _>::new(arg),
            )
        })
        .map_err(|e| ioctl_error("DRM_IOCTL_VGEM_FENCE_SIGNAL", e))
    }
}

/// The buffer and the card, or a skip saying what this host lacks.
fn host_buffer(host: &dyn HostControl, kind: Kind) -> Result<HostBuffer, Stop> {
    if !host.shares_our_kernel() {
        skip!("the daemon runs under another kernel: this program's fences cannot reach it");
    }
    let card = match VgemCard::find() {
        Ok(card) => card,
        Err(why) => skip!("the host's fences are made with vgem: {why}"),
    };
    HostBuffer::new(kind, card)
}

/// Exports the buffer and opens it as guest 0: `(name, handle)`. Skips
/// when the daemon did not get it as a kernel dma-buf (it runs elsewhere);
/// fails when it did but reports no host fence source though this host
/// has vgem.
fn open_export(
    t: &Target,
    host: &dyn HostControl,
    b: &HostBuffer,
    d: &Driver,
) -> Result<(String, u64), Stop> {
    let name = export_name(b.kind.name());
    host.export(&name, b.fd(), &ExportOptions::default())
        .map_err(Stop::Fail)?;
    let o = d.open_by_name(&name)??;
    if o.obj_flags & obj_flags::REAL_DMABUF == 0 {
        let _ = d.release(o.object);
        let _ = host.revoke(&name);
        skip!(
            "the export reached the daemon as a copy, not a dma-buf: the daemon runs on \
             another host ({})",
            t.front_end.describe()
        );
    }
    let i = info(d)?;
    ensure!(
        i.caps & caps::HOST_FENCES != 0,
        "this host has a vgem card, but GET_INFO caps {:#x} lack HOST_FENCES",
        i.caps
    );
    Ok((name, o.object))
}

fn wait_request(object: u64, usage: FenceUsage, timeout: Duration) -> Request {
    Request::Wait {
        object,
        usage,
        timeout_ns: u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX),
    }
}

/// A context of `d` holding `object`'s lock.
fn locked(d: &Driver, object: u64) -> Result<u64, Stop> {
    let (ctx, _) = d.acquire_init()??;
    ensure_eq!(d.lock(ctx, object, 0)?, Ok(()));
    Ok(ctx)
}

fn readable(p: Polled, events: i16) -> bool {
    p.revents & events != 0
}

/// The host's fences reach the guest: CPU access and `WAIT` park on them.
fn host_to_guest(d: &Driver, b: &HostBuffer, o: u64) -> Check {
    let f = b.fence(true)?;
    let reader = d.submit(
        CONTROLQ,
        &begin_cpu_access_request(o, Direction::FromDevice),
    )?;
    let waiter = d.submit(
        CONTROLQ,
        &wait_request(o, FenceUsage::Write, Duration::from_secs(5)),
    )?;
    ensure!(
        !d.settle(&reader, SETTLE)?,
        "BEGIN_CPU_ACCESS(FROM_DEVICE) did not wait for the host's WRITE fence"
    );
    ensure!(
        !d.settle(&waiter, Duration::ZERO)?,
        "WAIT(WRITE) did not wait for the host's WRITE fence"
    );
    ensure_eq!(
        d.wait(o, FenceUsage::Write, 0)?,
        Err(Status::TimedOut),
        "WAIT with timeout 0 polls the host's fences"
    );
    let short = Duration::from_millis(100);
    let start = Instant::now();
    let r = d.complete(d.submit(CONTROLQ, &wait_request(o, FenceUsage::Write, short))?)?;
    let took = start.elapsed();
    ensure_eq!(r, Err(Status::TimedOut), "a short WAIT on the host's fence");
    ensure!(took >= short, "WAIT of {short:?} answered after {took:?}");
    b.signal(f)?;
    ensure_eq!(
        d.complete(reader)?,
        Ok(Reply::Empty),
        "the reader, once the host signalled"
    );
    ensure_eq!(
        d.complete(waiter)?,
        Ok(Reply::Empty),
        "the WAIT, once the host signalled"
    );
    ensure_eq!(d.end_cpu_access(o, Direction::FromDevice)?, Ok(()));
    // A host reader's fence holds a CPU writer, not a CPU reader.
    let f = b.fence(false)?;
    ensure_eq!(d.begin_cpu_access(o, Direction::FromDevice)?, Ok(()));
    ensure_eq!(d.end_cpu_access(o, Direction::FromDevice)?, Ok(()));
    ensure_eq!(d.wait(o, FenceUsage::Write, 0)?, Ok(()), "no host writer");
    ensure_eq!(d.wait(o, FenceUsage::Read, 0)?, Err(Status::TimedOut));
    let writer = d.submit(CONTROLQ, &begin_cpu_access_request(o, Direction::ToDevice))?;
    ensure!(
        !d.settle(&writer, SETTLE)?,
        "BEGIN_CPU_ACCESS(TO_DEVICE) did not wait for the host's READ fence"
    );
    b.signal(f)?;
    ensure_eq!(d.complete(writer)?, Ok(Reply::Empty));
    ensure_eq!(d.end_cpu_access(o, Direction::ToDevice)?, Ok(()));
    Ok(())
}

/// A guest's fences reach the host: `poll` on the dma-buf waits for them.
fn guest_to_host(d: &Driver, b: &HostBuffer, o: u64, ctx: u64) -> Check {
    let w = d.fence_attach_with(ctx, o, FenceUsage::Write, true)??;
    let p = poll_fd(b.fd(), libc::POLLIN, Duration::from_millis(100))?;
    ensure_eq!(
        p.revents,
        0,
        "a host reader's poll must wait for the guest's WRITE fence"
    );
    // A host reader blocked in poll() wakes when the guest signals.
    let fd = b
        .dmabuf
        .try_clone()
        .map_err(|e| Stop::Fail(format!("dup: {e}")))?;
    let reader = std::thread::spawn(move || {
        let p = poll_fd(fd.as_fd(), libc::POLLIN, Duration::from_secs(5));
        (p, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(150));
    let signalled = Instant::now();
    ensure_eq!(d.fence_signal(w, 0)?, Ok(()));
    let (p, woke) = reader
        .join()
        .map_err(|_| Stop::Fail("the host reader panicked".into()))?;
    let p = p?;
    ensure!(
        readable(p, libc::POLLIN) && woke >= signalled && p.after < Duration::from_secs(3),
        "the host reader's poll: revents {:#x} after {:?}, {:?} after the guest's signal",
        p.revents,
        p.after,
        woke.checked_duration_since(signalled)
    );
    // A READ fence holds host writers only.
    let r = d.fence_attach_with(ctx, o, FenceUsage::Read, true)??;
    ensure!(
        readable(poll_fd(b.fd(), libc::POLLIN, Duration::ZERO)?, libc::POLLIN),
        "a host reader need not wait for the guest's READ fence"
    );
    ensure_eq!(
        poll_fd(b.fd(), libc::POLLOUT, Duration::from_millis(50))?.revents,
        0,
        "a host writer must wait for the guest's READ fence"
    );
    ensure_eq!(d.fence_signal(r, 0)?, Ok(()));
    ensure!(
        readable(
            poll_fd(b.fd(), libc::POLLOUT, Duration::from_secs(2))?,
            libc::POLLOUT
        ),
        "the host writer, once the guest signalled"
    );
    Ok(())
}

/// A guest's error signal reaches the host as the fence's error, where the
/// daemon's fence source carries errors; otherwise as a plain signal.
fn guest_error_to_host(
    host: &dyn HostControl,
    d: &Driver,
    b: &HostBuffer,
    o: u64,
    ctx: u64,
) -> Check {
    let source = host.host_fences().map_err(Stop::Fail)?;
    let w = d.fence_attach_with(ctx, o, FenceUsage::Write, true)??;
    let sync = export_sync_file(b.fd(), false)?;
    ensure_eq!(
        sync_file_status(sync.as_fd())?,
        0,
        "pending before the signal"
    );
    ensure_eq!(d.fence_signal(w, libc::EIO as u32)?, Ok(()));
    ensure!(readable(
        poll_fd(sync.as_fd(), libc::POLLIN, Duration::from_secs(2))?,
        libc::POLLIN
    ));
    let status = sync_file_status(sync.as_fd())?;
    let name = source.source.as_deref().unwrap_or("none");
    if source.carries_errors {
        ensure!(
            status < 0,
            "{name} carries errors, but the host saw status {status} for a guest's EIO"
        );
    } else {
        ensure_eq!(
            status,
            1,
            "{name} carries no errors: the host sees the fence signalled"
        );
    }
    println!(
        "host fence error ({}): the guest signalled EIO, the host's sync_file status is {status} \
         ({name} {})",
        b.kind.name(),
        if source.carries_errors {
            "carries errors"
        } else {
            "carries no errors: DRM_IOCTL_VGEM_FENCE_SIGNAL has no error to give"
        }
    );
    Ok(())
}

/// Both directions of implicit sync on one kind of host buffer.
fn host_fences_both_ways(t: &Target, kind: Kind) -> Check {
    let host: &dyn HostControl = t.host()?;
    let b = host_buffer(host, kind)?;
    let vmm = t.connect()?;
    let d = vmm.driver();
    let (name, o) = open_export(t, host, &b, d)?;
    host_to_guest(d, &b, o)?;
    let ctx = locked(d, o)?;
    guest_to_host(d, &b, o, ctx)?;
    guest_error_to_host(host, d, &b, o, ctx)?;
    // BOOKKEEP has no host counterpart: HOST with it is EINVAL.
    ensure_eq!(
        d.fence_attach_with(ctx, o, FenceUsage::Bookkeep, true)?,
        Err(Status::Inval)
    );
    ensure_eq!(d.unlock(ctx, o)?, Ok(()));
    ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    ensure_eq!(d.release(o)?, Ok(()));
    host.revoke(&name).map_err(Stop::Fail)?;
    Ok(())
}

pub(super) fn host_fences_vgem_buffer_both_ways(t: &Target) -> Check {
    host_fences_both_ways(t, Kind::Vgem)
}

pub(super) fn host_fences_udmabuf_both_ways(t: &Target) -> Check {
    host_fences_both_ways(t, Kind::Udmabuf)
}

pub(super) fn host_fences_dma_heap_buffer_both_ways(t: &Target) -> Check {
    host_fences_both_ways(t, Kind::DmaHeap)
}

/// `--fence-timeout` bounds a wait for the host's fence (`ETIMEDOUT`:
/// the device cannot signal a fence it does not own), and a guest fence
/// nobody signals is timed out on the host too.
pub(super) fn host_fences_time_out_with_the_fence_timeout(t: &Target) -> Check {
    let Some(limit) = t.daemon.fence_timeout else {
        skip!("the suite does not know the daemon's --fence-timeout")
    };
    if limit > Duration::from_secs(2) {
        skip!("the daemon's --fence-timeout is {limit:?}; the scenario needs at most 2 s");
    }
    let host: &dyn HostControl = t.host()?;
    let b = host_buffer(host, Kind::Vgem)?;
    let vmm = t.connect()?;
    let d = vmm.driver();
    let (name, o) = open_export(t, host, &b, d)?;
    let f = b.fence(true)?;
    let start = Instant::now();
    let reader = d.submit(
        CONTROLQ,
        &begin_cpu_access_request(o, Direction::FromDevice),
    )?;
    let waiter = d.submit(
        CONTROLQ,
        &wait_request(o, FenceUsage::Write, Duration::from_secs(30)),
    )?;
    let r = d.complete_within(reader, limit + Duration::from_secs(5))?;
    let took = start.elapsed();
    ensure_eq!(
        r,
        Err(Status::TimedOut),
        "BEGIN_CPU_ACCESS on a hung host fence"
    );
    ensure!(
        took >= limit,
        "answered after {took:?}, before --fence-timeout {limit:?}"
    );
    let r = d.complete_within(waiter, limit + Duration::from_secs(5))?;
    ensure_eq!(
        r,
        Err(Status::TimedOut),
        "a 30 s WAIT on a hung host fence ends at --fence-timeout"
    );
    ensure!(
        start.elapsed() < Duration::from_secs(9),
        "the WAIT took {:?} (vgem itself signals after 10 s)",
        start.elapsed()
    );
    b.signal(f)?;
    ensure_eq!(d.begin_cpu_access(o, Direction::FromDevice)?, Ok(()));
    ensure_eq!(d.end_cpu_access(o, Direction::FromDevice)?, Ok(()));
    // A guest's fence nobody signals: the device times it out, and the
    // host's reader goes on.
    let ctx = locked(d, o)?;
    let start = Instant::now();
    let _hung = d.fence_attach_with(ctx, o, FenceUsage::Write, true)??;
    let p = poll_fd(b.fd(), libc::POLLIN, limit + Duration::from_secs(5))?;
    let took = start.elapsed();
    ensure!(
        readable(p, libc::POLLIN) && took >= limit,
        "the host reader: revents {:#x} after {took:?} (the device times the fence out after \
         {limit:?})",
        p.revents
    );
    ensure_eq!(d.unlock(ctx, o)?, Ok(()));
    ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    ensure_eq!(d.release(o)?, Ok(()));
    host.revoke(&name).map_err(Stop::Fail)?;
    Ok(())
}

/// `FENCE_ATTACH` with HOST follows `HOST_FENCES` and `REAL_DMABUF` on any
/// host: it works on a kernel dma-buf where the daemon has a fence source,
/// is `EOPNOTSUPP` otherwise (before the lock check), is `EINVAL` with
/// BOOKKEEP, and without the flag the answer is what it always was.
pub(super) fn fence_attach_host_flag_follows_host_fences(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let i = info(d)?;
    let o = d.create(u64::from(i.page_size), 0)??;
    let (ctx, _) = d.acquire_init()??;
    ensure_eq!(
        d.fence_attach_with(ctx, o.object, FenceUsage::Bookkeep, true)?,
        Err(Status::Inval),
        "HOST with BOOKKEEP is a malformed request"
    );
    let possible = i.caps & caps::HOST_FENCES != 0 && o.obj_flags & obj_flags::REAL_DMABUF != 0;
    let unlocked = d.fence_attach_with(ctx, o.object, FenceUsage::Write, true)?;
    if possible {
        ensure_eq!(unlocked, Err(Status::Perm), "the lock is checked as ever");
    } else {
        ensure_eq!(
            unlocked,
            Err(Status::NotSupported),
            "no host reservation to install into (caps {:#x}, obj_flags {:#x})",
            i.caps,
            o.obj_flags
        );
    }
    ensure_eq!(
        d.fence_attach(ctx, o.object, FenceUsage::Write)?,
        Err(Status::Perm),
        "without HOST, as ever"
    );
    ensure_eq!(d.lock(ctx, o.object, 0)?, Ok(()));
    match d.fence_attach_with(ctx, o.object, FenceUsage::Write, true)? {
        Ok(f) if possible => ensure_eq!(d.fence_signal(f, 0)?, Ok(())),
        Err(Status::NotSupported) if !possible => {}
        other => {
            return Err(Stop::Fail(format!(
                "FENCE_ATTACH(HOST) with caps {:#x}, obj_flags {:#x}: {other:?}",
                i.caps, o.obj_flags
            )))
        }
    }
    let plain = d.fence_attach(ctx, o.object, FenceUsage::Write)??;
    ensure_eq!(d.fence_signal(plain, 0)?, Ok(()));
    ensure_eq!(d.unlock(ctx, o.object)?, Ok(()));
    ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    ensure_eq!(d.release(o.object)?, Ok(()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_and_layouts_match_the_uapi() {
        assert_eq!(std::mem::size_of::<VgemFenceAttach>(), 16);
        assert_eq!(std::mem::size_of::<VgemFenceSignal>(), 8);
        assert_eq!(std::mem::size_of::<DmaBufSyncFile>(), 8);
        assert_eq!(std::mem::size_of::<SyncFileInfo>(), 56);
        assert_eq!(std::mem::size_of::<UdmabufCreate>(), 24);
        assert_eq!(std::mem::size_of::<DmaHeapAllocation>(), 24);
        assert_eq!(DRM_IOCTL_VGEM_FENCE_ATTACH, 0xC010_6441);
        assert_eq!(DRM_IOCTL_VGEM_FENCE_SIGNAL, 0x4008_6442);
        assert_eq!(DMA_BUF_IOCTL_EXPORT_SYNC_FILE, 0xC008_6202);
        assert_eq!(DMA_BUF_IOCTL_IMPORT_SYNC_FILE, 0x4008_6203);
        assert_eq!(SYNC_IOC_FILE_INFO, 0xC038_3E04);
        assert_eq!(UDMABUF_CREATE, 0x4018_7542);
        assert_eq!(DMA_HEAP_IOCTL_ALLOC, 0xC018_4800);
    }
}
