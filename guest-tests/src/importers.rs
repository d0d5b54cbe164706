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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use virtio_dmabuf_protocol::{
    attach_flags, caps, create_flags, obj_flags, AddressSpace, Direction, EventType, FenceUsage,
    Info, MapReply, Reply, Status, CONTROLQ, EVENT_SIZE,
};

use crate::driver::{begin_cpu_access_request, Driver, DriverError, Outcome};
use crate::host::{ExportOptions, HostControl};
use crate::session::{Session, SessionError};
use crate::vmm::shm::{memfd_with, ShmError};
use crate::vmm::VmmError;

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

// ---- (a) display controller ----

/// A display controller scans out `frames` frames: a producer writes each
/// frame (CPU access bracketed by `BEGIN/END_CPU_ACCESS(TO_DEVICE)`, through
/// the window when `use_window` and the window is live, else with
/// `TRANSFER_TO_HOST`); the display, a static importer (`PEER2PEER` with
/// the window), maps the buffer `TO_DEVICE` for each page flip, reads the
/// frame through the address space the `MAP` reply names, compares its
/// checksum with the producer's and unmaps.
pub fn display_scanout(
    vmm: &dyn Session,
    format: FrameFormat,
    frames: u32,
    use_window: bool,
) -> Result<Report> {
    let d = vmm.driver();
    let info = info(vmm)?;
    let path = data_path(vmm, &info, use_window);
    let size = format.buffer_size(u64::from(info.page_size));
    let object = ok("CREATE", d.create(size, 0))?.object;
    let window = place_writable(d, object, path)?;
    let flags = if window.is_some() {
        attach_flags::PEER2PEER
    } else {
        0
    };
    let display = ok("ATTACH (display)", d.attach(object, flags))?;
    let mut checksums = Vec::new();
    for seq in 0..frames {
        // The producer draws the frame.
        let frame = format.render(seq);
        cpu_write(vmm, object, window, &frame)?;
        let expected = format.checksum(&frame);
        // The display flips to it: map, scan out, unmap.
        let map = ok("MAP (display)", d.map(display, Direction::ToDevice, 16, 0))?;
        expect_space(&map, path)?;
        check(
            map.map_flags & virtio_dmabuf_protocol::map_flags::PINNED != 0,
            || "a static exporter's mapping must be PINNED".into(),
        )?;
        let scanned = MappedBuffer::new(vmm, object, &map).read(0, format.len())?;
        let got = format.checksum(&scanned);
        check(got == expected, || {
            format!("frame {seq}: scanout checksum {got:#x}, the producer drew {expected:#x}")
        })?;
        ok("UNMAP (display)", d.unmap(map.mapping, 0))?;
        checksums.push(got);
    }
    ok("DETACH", d.detach(display))?;
    release(d, object, window.is_some())?;
    Ok(Report { path, checksums })
}

// ---- (b) GPU ----

/// A GPU renders one frame into a dynamic buffer and keeps using it across
/// a host eviction. It is a dynamic importer: under its acquire context it
/// locks the reservation, maps `FROM_DEVICE`, publishes a WRITE fence for
/// the job and unlocks; a CPU reader's `BEGIN_CPU_ACCESS(FROM_DEVICE)`
/// waits for that fence; the job writes the frame through the window (or,
/// without one, through the copy path before the fence is published, as the
/// copy path itself honours implicit sync); the fence is signalled and the
/// reader sees the frame. Then the host evicts the buffer; on `MOVE_NOTIFY`
/// the GPU takes the lock again, drops the stale mapping, maps again and
/// finds the new generation and the same bytes.
pub fn gpu_render(
    vmm: &dyn Session,
    host: &dyn HostControl,
    format: FrameFormat,
    use_window: bool,
) -> Result<Report> {
    let d = vmm.driver();
    let info = info(vmm)?;
    let path = data_path(vmm, &info, use_window);
    d.post_event_buffers(2, EVENT_SIZE as u32)?;
    let size = format.buffer_size(u64::from(info.page_size));
    let created = ok("CREATE", d.create(size, create_flags::DYNAMIC))?;
    let object = created.object;
    if path == DataPath::Window {
        ok("MAP_SHM", d.map_shm(object, true))?;
    }
    let mut flags = attach_flags::DYNAMIC_IMPORTER;
    if path == DataPath::Window {
        flags |= attach_flags::PEER2PEER;
    }
    let gpu = ok("ATTACH (gpu)", d.attach(object, flags))?;
    let (ctx, _) = ok("ACQUIRE_INIT", d.acquire_init())?;

    // Submit the job.
    ok("LOCK", d.lock(ctx, object, 0))?;
    let map = ok("MAP (gpu)", d.map(gpu, Direction::FromDevice, 16, ctx))?;
    expect_space(&map, path)?;
    let frame = format.render(7);
    let target = MappedBuffer::new(vmm, object, &map);
    if path == DataPath::Transfer {
        target.write(0, &frame)?;
    }
    let fence = ok(
        "FENCE_ATTACH",
        d.fence_attach(ctx, object, FenceUsage::Write),
    )?;
    ok("UNLOCK", d.unlock(ctx, object))?;

    // A CPU reader waits for the job (implicit sync, section 7.5).
    let reader = d.submit(
        CONTROLQ,
        &begin_cpu_access_request(object, Direction::FromDevice),
    )?;
    check(!d.settle(&reader, Duration::from_millis(100))?, || {
        "BEGIN_CPU_ACCESS(FROM_DEVICE) did not wait for the GPU's WRITE fence".into()
    })?;
    // The job runs and completes.
    if path == DataPath::Window {
        target.write(0, &frame)?;
    }
    ok("FENCE_SIGNAL", d.fence_signal(fence, 0))?;
    let begun = d.complete(reader)?;
    check(begun == Ok(Reply::Empty), || {
        format!("the reader's BEGIN_CPU_ACCESS: {begun:?}")
    })?;
    let seen = ok(
        "TRANSFER_FROM_HOST",
        d.transfer_from_host(object, 0, format.len() as u64),
    )?;
    ok(
        "END_CPU_ACCESS",
        d.end_cpu_access(object, Direction::FromDevice),
    )?;
    let expected = format.checksum(&frame);
    check(format.checksum(&seen) == expected, || {
        "the reader does not see the rendered frame".into()
    })?;

    // The host moves the buffer.
    host.evict(created.uuid)
        .map_err(|message| ImporterError::Host {
            what: "evict",
            message,
        })?;
    let event = d
        .next_event(Duration::from_secs(2))?
        .and_then(|r| r.event)
        .ok_or_else(|| ImporterError::Check("no MOVE_NOTIFY after the eviction".into()))?;
    check(
        event.kind == EventType::MoveNotify && event.object == object && event.attachment == gpu,
        || format!("expected MOVE_NOTIFY for {object}/{gpu}, got {event:?}"),
    )?;
    check(event.data > map.generation, || {
        format!(
            "MOVE_NOTIFY generation {} is not past {}",
            event.data, map.generation
        )
    })?;

    // Map again under the lock.
    ok("LOCK", d.lock(ctx, object, 0))?;
    ok("UNMAP (stale)", d.unmap(map.mapping, ctx))?;
    let again = ok("MAP (gpu)", d.map(gpu, Direction::FromDevice, 16, ctx))?;
    expect_space(&again, path)?;
    check(again.generation == event.data, || {
        format!(
            "MAP after the move: generation {}, MOVE_NOTIFY said {}",
            again.generation, event.data
        )
    })?;
    if path == DataPath::Window {
        check(again.entries == map.entries, || {
            format!(
                "a move keeps the window offset: {:?} became {:?}",
                map.entries, again.entries
            )
        })?;
    }
    let moved = MappedBuffer::new(vmm, object, &again).read(0, format.len())?;
    let got = format.checksum(&moved);
    check(got == expected, || {
        "the bytes changed across the move".into()
    })?;
    ok("UNMAP", d.unmap(again.mapping, ctx))?;
    ok("UNLOCK", d.unlock(ctx, object))?;
    ok("ACQUIRE_FINI", d.acquire_fini(ctx))?;
    ok("DETACH", d.detach(gpu))?;
    release(d, object, path == DataPath::Window)?;
    Ok(Report {
        path,
        checksums: vec![expected, got],
    })
}

// ---- (c) camera ----

/// A camera frame in host memory: a memfd holding a known frame is
/// exported read-only to guest 0 only, as `name`; the guest opens it by
/// name, reads the frame (CPU access through the window, or the copy path)
/// and, as a static importer, maps it `TO_DEVICE` and reads it again
/// through the space the reply names. A write is `EPERM` either way. The
/// export is revoked at the end. The VMM must be guest 0.
pub fn camera_capture(
    vmm: &dyn Session,
    host: &dyn HostControl,
    name: &str,
    format: FrameFormat,
) -> Result<Report> {
    let info = info(vmm)?;
    if info.caps & caps::HOST_EXPORTS == 0 {
        return Err(ImporterError::Unavailable(
            "HOST_EXPORTS is not live".into(),
        ));
    }
    let path = data_path(vmm, &info, true);
    let mut buffer = format.render(42);
    buffer.resize(format.buffer_size(u64::from(info.page_size)) as usize, 0);
    let file = memfd_with("camera-frame", &buffer).map_err(|source| ImporterError::Io {
        what: "camera memfd",
        source,
    })?;
    // A leftover of an earlier run would make the export fail.
    let _ = host.revoke(name);
    let options = ExportOptions {
        dynamic: false,
        read_only: true,
        guests: Some(vec![0]),
    };
    host.export(name, file.as_fd(), &options)
        .map_err(|message| ImporterError::Host {
            what: "export",
            message,
        })?;
    let result = camera_read(vmm, name, format, &buffer, path);
    let revoked = host.revoke(name);
    let report = result?;
    revoked.map_err(|message| ImporterError::Host {
        what: "revoke",
        message,
    })?;
    Ok(report)
}

fn camera_read(
    vmm: &dyn Session,
    name: &str,
    format: FrameFormat,
    buffer: &[u8],
    path: DataPath,
) -> Result<Report> {
    let d = vmm.driver();
    let o = ok("OPEN (by name)", d.open_by_name(name))?;
    check(o.size == buffer.len() as u64, || {
        format!("OPEN size {} for a {}-byte buffer", o.size, buffer.len())
    })?;
    check(o.obj_flags & obj_flags::WRITABLE == 0, || {
        "a read-only export must not be WRITABLE".into()
    })?;
    let expected = format.checksum(buffer);
    let mut checksums = Vec::new();
    let window = match path {
        DataPath::Window => {
            let refused = d.map_shm(o.object, true)?;
            check(refused == Err(Status::Perm), || {
                format!("writable MAP_SHM of a read-only export: {refused:?}")
            })?;
            let (offset, _) = ok("MAP_SHM", d.map_shm(o.object, false))?;
            Some(offset)
        }
        DataPath::Transfer => None,
    };
    // The CPU reads the frame.
    ok(
        "BEGIN_CPU_ACCESS",
        d.begin_cpu_access(o.object, Direction::FromDevice),
    )?;
    let cpu_view = match window {
        Some(offset) => vmm.shm_read(offset, format.len())?,
        None => ok(
            "TRANSFER_FROM_HOST",
            d.transfer_from_host(o.object, 0, format.len() as u64),
        )?,
    };
    ok(
        "END_CPU_ACCESS",
        d.end_cpu_access(o.object, Direction::FromDevice),
    )?;
    checksums.push(format.checksum(&cpu_view));
    // An encoder reads it as a static importer.
    let flags = if window.is_some() {
        attach_flags::PEER2PEER
    } else {
        0
    };
    let encoder = ok("ATTACH", d.attach(o.object, flags))?;
    let map = ok("MAP", d.map(encoder, Direction::ToDevice, 16, 0))?;
    expect_space(&map, path)?;
    let device_view = MappedBuffer::new(vmm, o.object, &map).read(0, format.len())?;
    checksums.push(format.checksum(&device_view));
    ok("UNMAP", d.unmap(map.mapping, 0))?;
    ok("DETACH", d.detach(encoder))?;
    for (i, got) in checksums.iter().enumerate() {
        check(*got == expected, || {
            format!("read {i}: checksum {got:#x}, the camera wrote {expected:#x}")
        })?;
    }
    // Nobody in the guest may write the camera's buffer.
    let write = d.transfer_to_host(o.object, 0, b"overwrite")?;
    check(write == Err(Status::Perm), || {
        format!("TRANSFER_TO_HOST to a read-only export: {write:?}")
    })?;
    release(d, o.object, window.is_some())?;
    Ok(Report { path, checksums })
}

// ---- (d) a blob another device fetches by UUID ----

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
