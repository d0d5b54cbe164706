//! Signalable host fences: how a guest's fence reaches the host kernel
//! (`docs/protocol.md`, "Host fences").
//!
//! A guest `FENCE_ATTACH` on an object backed by a kernel dma-buf puts a
//! fence the daemon can signal into that dma-buf's reservation with
//! `DMA_BUF_IOCTL_IMPORT_SYNC_FILE`, so host users of the buffer (a
//! compositor's `poll`, a GPU driver's implicit sync) wait for the guest.
//! User space cannot make a fence out of nothing; it needs a driver that
//! hands out fences it may signal. The daemon looks for one at start:
//!
//! - **sw_sync** (`/sys/kernel/debug/sync/sw_sync`, `CONFIG_SW_SYNC`): one
//!   timeline per fence, signalled by stepping it. Closing a timeline with
//!   its fence pending signals that fence with `ENOENT`, which is how a
//!   guest's error reaches the host (as `ENOENT`, the only error sw_sync
//!   can carry). Preferred: it has no timeout of its own.
//! - **vgem** (`/dev/dri/card*` driven by vgem, `CONFIG_DRM_VGEM`): a fence
//!   attached with `DRM_IOCTL_VGEM_FENCE_ATTACH` to a small buffer of the
//!   daemon's own (a scratch buffer), taken out of it with
//!   `DMA_BUF_IOCTL_EXPORT_SYNC_FILE` and imported into the guest's buffer.
//!   Attaching to a PRIME import of the guest's buffer itself would be
//!   refused (`EBUSY`) whenever a conflicting fence is pending there, and
//!   not every dma-buf can be imported into vgem; a scratch buffer has
//!   neither problem. vgem fences carry no error (`DRM_IOCTL_VGEM_FENCE_SIGNAL`
//!   has none), and vgem signals each one itself after 10 s.
//!
//! None of these calls blocks.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, Opcode, Setter, Updater};
use serde::Serialize;

use super::sync_file::{export_sync_file, import_sync_file, HostAccess, SyncFile};
use super::ProviderError;

/// Where the kernel's sw_sync lives (debugfs).
pub const SW_SYNC_NODE: &str = "/sys/kernel/debug/sync/sw_sync";

/// Where DRM nodes live.
pub const DRI_DIR: &str = "/dev/dri";

/// vgem signals each of its fences itself this long after it was made
/// (`VGEM_FENCE_TIMEOUT`).
pub const VGEM_FENCE_LIFETIME: Duration = Duration::from_secs(10);

/// Which driver makes the host fences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceSourceKind {
    SwSync,
    Vgem,
}

impl FenceSourceKind {
    pub fn name(self) -> &'static str {
        match self {
            FenceSourceKind::SwSync => "sw_sync",
            FenceSourceKind::Vgem => "vgem",
        }
    }

    /// Whether a guest's error reaches the host as the fence's error.
    pub fn carries_errors(self) -> bool {
        matches!(self, FenceSourceKind::SwSync)
    }

    /// How long the driver lets a fence live before it signals it itself.
    pub fn own_timeout(self) -> Option<Duration> {
        match self {
            FenceSourceKind::SwSync => None,
            FenceSourceKind::Vgem => Some(VGEM_FENCE_LIFETIME),
        }
    }
}

/// A fence the daemon installed in a host dma-buf's reservation.
#[derive(Debug)]
pub struct InstalledFence {
    /// Installed as a WRITE fence (else READ).
    pub write: bool,
    inner: Installed,
}

#[derive(Debug)]
enum Installed {
    /// The timeline whose only point is the fence.
    SwSync(OwnedFd),
    Vgem {
        file: u64,
        handle: u32,
        fence: u32,
    },
}

/// How a signal went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signalled {
    /// Signalled, with the error when there was one and the source carries it.
    Done,
    /// Signalled, but the source cannot carry the error the guest gave.
    ErrorDropped,
    /// The driver had already signalled it itself (vgem's own timeout).
    Expired,
}

/// The host's source of signalable fences.
#[derive(Debug)]
pub struct FenceSource {
    kind: FenceSourceKind,
    node: PathBuf,
    inner: Source,
}

#[derive(Debug)]
enum Source {
    SwSync,
    Vgem(Vgem),
}

impl FenceSource {
    /// The best source this host offers (sw_sync, then vgem), checked with
    /// one fence made and signalled; `Err` says why there is none.
    pub fn detect() -> Result<FenceSource, String> {
        let mut why = Vec::new();
        match FenceSource::sw_sync(Path::new(SW_SYNC_NODE)) {
            Ok(s) => return Ok(s),
            Err(e) => why.push(format!("sw_sync: {e}")),
        }
        match find_vgem_card() {
            Ok(path) => match FenceSource::vgem(&path) {
                Ok(s) => return Ok(s),
                Err(e) => why.push(format!("vgem ({}): {e}", path.display())),
            },
            Err(e) => why.push(format!("vgem: {e}")),
        }
        Err(why.join("; "))
    }

    /// sw_sync at `node`, after a self-test.
    pub fn sw_sync(node: &Path) -> Result<FenceSource, ProviderError> {
        let timeline = open_rw(node, "open sw_sync")?;
        let fence = sw_sync_create_fence(timeline.as_fd())?;
        sw_sync_inc(timeline.as_fd())?;
        if !fence.is_signalled()? {
            return Err(ProviderError::Unsuitable(
                "a sw_sync fence did not signal when its timeline was stepped".into(),
            ));
        }
        Ok(FenceSource {
            kind: FenceSourceKind::SwSync,
            node: node.to_path_buf(),
            inner: Source::SwSync,
        })
    }

    /// vgem through the card at `node`, after a self-test: a fence made,
    /// exported, imported into a second scratch buffer, seen there and
    /// signalled.
    pub fn vgem(node: &Path) -> Result<FenceSource, ProviderError> {
        let mut vgem = Vgem::open(node)?;
        vgem.self_test()?;
        Ok(FenceSource {
            kind: FenceSourceKind::Vgem,
            node: node.to_path_buf(),
            inner: Source::Vgem(vgem),
        })
    }

    pub fn kind(&self) -> FenceSourceKind {
        self.kind
    }

    pub fn node(&self) -> &Path {
        &self.node
    }

    /// Puts a new unsignalled fence into `dmabuf`'s reservation, as a
    /// WRITE fence (`write`) or a READ fence.
    pub fn install(
        &mut self,
        dmabuf: BorrowedFd<'_>,
        write: bool,
    ) -> Result<InstalledFence, ProviderError> {
        let inner = match &mut self.inner {
            Source::SwSync => {
                let timeline = open_rw(&self.node, "open sw_sync")?;
                let fence = sw_sync_create_fence(timeline.as_fd())?;
                // On failure the timeline closes, which signals the fence
                // nobody else has seen.
                import_sync_file(dmabuf, fence.fd(), write)?;
                Installed::SwSync(timeline.into())
            }
            Source::Vgem(v) => v.install(dmabuf, write)?,
        };
        Ok(InstalledFence { write, inner })
    }

    /// Signals an installed fence, with `error` (a positive errno, 0 for
    /// none) where the source can carry one.
    pub fn signal(
        &mut self,
        fence: InstalledFence,
        error: u32,
    ) -> Result<Signalled, ProviderError> {
        match (fence.inner, &mut self.inner) {
            (Installed::SwSync(timeline), _) => {
                if error == 0 {
                    sw_sync_inc(timeline.as_fd())?;
                }
                // Closing the timeline signals a point still pending with
                // ENOENT: the guest's error, as far as sw_sync can say it.
                drop(timeline);
                Ok(Signalled::Done)
            }
            (
                Installed::Vgem {
                    file,
                    handle,
                    fence,
                },
                Source::Vgem(v),
            ) => {
                let expired = v.signal(file, handle, fence)?;
                Ok(if expired {
                    Signalled::Expired
                } else if error != 0 {
                    Signalled::ErrorDropped
                } else {
                    Signalled::Done
                })
            }
            (Installed::Vgem { .. }, Source::SwSync) => Err(ProviderError::Unsuitable(
                "a vgem fence given to the sw_sync source".into(),
            )),
        }
    }
}

fn open_rw(path: &Path, op: &'static str) -> Result<File, ProviderError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ProviderError::Unsuitable(format!("{} is missing", path.display()))
            } else {
                ProviderError::Host { op, source }
            }
        })
}

/// Runs an ioctl, retrying `EINTR` a bounded number of times.
fn retrying<T>(mut call: impl FnMut() -> rustix::io::Result<T>) -> rustix::io::Result<T> {
    let mut left = 1000u32;
    loop {
        match call() {
            Err(Errno::INTR) if left > 0 => left -= 1,
            other => return other,
        }
    }
}

// ---- sw_sync ----

/// `struct sw_sync_create_fence_data` of the kernel's sw_sync.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct SwSyncCreateFence {
    value: u32,
    name: [u8; 32],
    fence: i32,
}

/// `SW_SYNC_IOC_CREATE_FENCE` = `_IOWR('W', 0, struct sw_sync_create_fence_data)`.
const SW_SYNC_IOC_CREATE_FENCE: Opcode = opcode::read_write::<SwSyncCreateFence>(b'W', 0);
/// `SW_SYNC_IOC_INC` = `_IOW('W', 1, __u32)`.
const SW_SYNC_IOC_INC: Opcode = opcode::write::<u32>(b'W', 1);

/// A fence at point 1 of a fresh timeline.
fn sw_sync_create_fence(timeline: BorrowedFd<'_>) -> Result<SyncFile, ProviderError> {
    let mut name = [0u8; 32];
    let label = env!("CARGO_PKG_NAME").as_bytes();
    name[..label.len()].copy_from_slice(label);
    let mut arg = SwSyncCreateFence {
        value: 1,
        name,
        fence: -1,
    };
    retrying(|| {
        // SAFETY: SW_SYNC_IOC_CREATE_FENCE reads and writes one `struct
        // sw_sync_create_fence_data` (no pointers), whose layout
        // `SwSyncCreateFence` has; `arg` outlives the call.
        unsafe {
            ioctl(
                timeline,
                Updater::<SW_SYNC_IOC_CREATE_FENCE, _>::new(&mut arg),
            )
        }
    })
    .map_err(|e| ProviderError::host("SW_SYNC_IOC_CREATE_FENCE", e))?;
    if arg.fence < 0 {
        return Err(ProviderError::host(
            "SW_SYNC_IOC_CREATE_FENCE",
            Errno::INVAL,
        ));
    }
    // SAFETY: on success the kernel installed a new sync_file fd in
    // `arg.fence` that nothing else owns; it is wrapped exactly once, here.
    Ok(SyncFile::from_fd(unsafe {
        OwnedFd::from_raw_fd(arg.fence)
    }))
}

/// Steps a timeline by one: its point 1 signals.
fn sw_sync_inc(timeline: BorrowedFd<'_>) -> Result<(), ProviderError> {
    retrying(|| {
        // SAFETY: SW_SYNC_IOC_INC reads one u32; `Setter` passes a pointer
        // to its own copy, live for the call.
        unsafe { ioctl(timeline, Setter::<SW_SYNC_IOC_INC, _>::new(1u32)) }
    })
    .map_err(|e| ProviderError::host("SW_SYNC_IOC_INC", e))
}

// ---- vgem ----

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

/// `struct drm_gem_close` of `<drm/drm.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct DrmGemClose {
    handle: u32,
    pad: u32,
}

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

const DRM_IOCTL_VERSION: Opcode = opcode::read_write::<DrmVersion>(b'd', 0x00);
const DRM_IOCTL_GEM_CLOSE: Opcode = opcode::write::<DrmGemClose>(b'd', 0x09);
const DRM_IOCTL_PRIME_HANDLE_TO_FD: Opcode = opcode::read_write::<DrmPrimeHandle>(b'd', 0x2d);
const DRM_IOCTL_MODE_CREATE_DUMB: Opcode = opcode::read_write::<DrmModeCreateDumb>(b'd', 0xB2);
/// `DRM_COMMAND_BASE + DRM_VGEM_FENCE_ATTACH` (0x40 + 0x1).
const DRM_IOCTL_VGEM_FENCE_ATTACH: Opcode = opcode::read_write::<VgemFenceAttach>(b'd', 0x41);
/// `DRM_COMMAND_BASE + DRM_VGEM_FENCE_SIGNAL` (0x40 + 0x2).
const DRM_IOCTL_VGEM_FENCE_SIGNAL: Opcode = opcode::write::<VgemFenceSignal>(b'd', 0x42);
const VGEM_FENCE_WRITE: u32 = 0x1;

/// The driver name of a DRM node (`DRM_IOCTL_VERSION`), at most 63 bytes.
fn drm_driver_name(card: BorrowedFd<'_>) -> rustix::io::Result<Vec<u8>> {
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
    // whose layout `version` has; the kernel writes at most `name_len` (63)
    // bytes to `name`, which points into the 64-byte `name` above, and
    // nothing to `date`/`desc`, whose lengths are 0. Both outlive the call.
    retrying(|| unsafe { ioctl(card, Updater::<DRM_IOCTL_VERSION, _>::new(&mut version)) })?;
    let len = version.name_len.min(name.len() - 1);
    Ok(name[..len].to_vec())
}

/// The first `/dev/dri/card*` driven by vgem, or why there is none.
pub fn find_vgem_card() -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(DRI_DIR).map_err(|e| format!("{DRI_DIR}: {e}"))?;
    let mut cards: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("card"))
        })
        .collect();
    cards.sort();
    let mut seen = Vec::new();
    for path in cards {
        match open_rw(&path, "open a DRM card") {
            Ok(f) => match drm_driver_name(f.as_fd()) {
                Ok(name) if name == b"vgem" => return Ok(path),
                Ok(name) => seen.push(format!(
                    "{} is {}",
                    path.display(),
                    String::from_utf8_lossy(&name)
                )),
                Err(e) => seen.push(format!("{}: DRM_IOCTL_VERSION: {e}", path.display())),
            },
            Err(e) => seen.push(format!("{}: {e}", path.display())),
        }
    }
    if seen.is_empty() {
        Err(format!("no {DRI_DIR}/card* node"))
    } else {
        Err(format!("no vgem card ({})", seen.join(", ")))
    }
}

/// Fences made on one open file of the card before new ones go to a fresh
/// file: vgem keeps a slot for every fence a file ever made until the file
/// closes, so a file is retired (closed once its fences are signalled).
const FENCES_PER_FILE: u64 = 1 << 16;

/// Free scratch buffers kept per file; more are closed.
const FREE_SCRATCH: usize = 64;

/// One open file of the vgem card: its fences and scratch buffers.
#[derive(Debug)]
struct VgemFile {
    card: File,
    /// Scratch buffers with no pending fence.
    free: Vec<u32>,
    /// Fences made on this file and not yet signalled by us.
    pending: usize,
    made: u64,
}

impl VgemFile {
    fn open(node: &Path) -> Result<VgemFile, ProviderError> {
        Ok(VgemFile {
            card: open_rw(node, "open the vgem card")?,
            free: Vec::new(),
            pending: 0,
            made: 0,
        })
    }

    /// A one-page dumb buffer.
    fn create_scratch(&self) -> Result<u32, ProviderError> {
        let mut dumb = DrmModeCreateDumb {
            height: 1,
            width: 1024,
            bpp: 32,
            ..DrmModeCreateDumb::default()
        };
        retrying(|| {
            // SAFETY: DRM_IOCTL_MODE_CREATE_DUMB reads and writes one `struct
            // drm_mode_create_dumb` (no pointers), whose layout `dumb` has;
            // `dumb` outlives the call.
            unsafe {
                ioctl(
                    &self.card,
                    Updater::<DRM_IOCTL_MODE_CREATE_DUMB, _>::new(&mut dumb),
                )
            }
        })
        .map_err(|e| ProviderError::host("DRM_IOCTL_MODE_CREATE_DUMB", e))?;
        Ok(dumb.handle)
    }

    fn close_scratch(&self, handle: u32) {
        let arg = DrmGemClose { handle, pad: 0 };
        // SAFETY: DRM_IOCTL_GEM_CLOSE reads one `struct drm_gem_close` (no
        // pointers); `Setter` passes a pointer to its own copy, live for
        // the call.
        let r =
            retrying(|| unsafe { ioctl(&self.card, Setter::<DRM_IOCTL_GEM_CLOSE, _>::new(arg)) });
        if let Err(e) = r {
            log::warn!("host fences: closing vgem scratch buffer {handle}: {e}");
        }
    }

    /// A dma-buf of a scratch buffer (`DRM_CLOEXEC`).
    fn prime(&self, handle: u32) -> Result<OwnedFd, ProviderError> {
        let mut prime = DrmPrimeHandle {
            handle,
            flags: libc::O_CLOEXEC as u32,
            fd: -1,
        };
        retrying(|| {
            // SAFETY: DRM_IOCTL_PRIME_HANDLE_TO_FD reads and writes one
            // `struct drm_prime_handle` (no pointers), whose layout `prime`
            // has; `prime` outlives the call.
            unsafe {
                ioctl(
                    &self.card,
                    Updater::<DRM_IOCTL_PRIME_HANDLE_TO_FD, _>::new(&mut prime),
                )
            }
        })
        .map_err(|e| ProviderError::host("DRM_IOCTL_PRIME_HANDLE_TO_FD", e))?;
        if prime.fd < 0 {
            return Err(ProviderError::host(
                "DRM_IOCTL_PRIME_HANDLE_TO_FD",
                Errno::INVAL,
            ));
        }
        // SAFETY: on success the kernel stored a new fd in `prime.fd` that
        // nothing else owns; it is wrapped exactly once, here.
        Ok(unsafe { OwnedFd::from_raw_fd(prime.fd) })
    }

    /// A fence on buffer `handle` (a WRITE fence with `write`, else READ):
    /// its vgem id.
    fn attach(&self, handle: u32, write: bool) -> Result<u32, ProviderError> {
        let mut arg = VgemFenceAttach {
            handle,
            flags: if write { VGEM_FENCE_WRITE } else { 0 },
            out_fence: 0,
            pad: 0,
        };
        retrying(|| {
            // SAFETY: DRM_IOCTL_VGEM_FENCE_ATTACH reads and writes one
            // `struct drm_vgem_fence_attach` (no pointers), whose layout
            // `arg` has; `arg` outlives the call.
            unsafe {
                ioctl(
                    &self.card,
                    Updater::<DRM_IOCTL_VGEM_FENCE_ATTACH, _>::new(&mut arg),
                )
            }
        })
        .map_err(|e| ProviderError::host("DRM_IOCTL_VGEM_FENCE_ATTACH", e))?;
        Ok(arg.out_fence)
    }

    /// Signals vgem fence `fence`: true when vgem had already signalled it
    /// itself (its own timeout).
    fn signal(&self, fence: u32) -> Result<bool, ProviderError> {
        let arg = VgemFenceSignal { fence, flags: 0 };
        let r = retrying(|| {
            // SAFETY: DRM_IOCTL_VGEM_FENCE_SIGNAL reads one `struct
            // drm_vgem_fence_signal` (no pointers); `Setter` passes a
            // pointer to its own copy, live for the call.
            unsafe {
                ioctl(
                    &self.card,
                    Setter::<DRM_IOCTL_VGEM_FENCE_SIGNAL, _>::new(arg),
                )
            }
        });
        match r {
            Ok(()) => Ok(false),
            // vgem signals it anyway, and says it had timed out.
            Err(Errno::TIMEDOUT) => Ok(true),
            Err(e) => Err(ProviderError::host("DRM_IOCTL_VGEM_FENCE_SIGNAL", e)),
        }
    }

    /// Takes a free scratch buffer or makes one.
    fn take_scratch(&mut self) -> Result<u32, ProviderError> {
        match self.free.pop() {
            Some(h) => Ok(h),
            None => self.create_scratch(),
        }
    }

    fn give_back(&mut self, handle: u32) {
        if self.free.len() < FREE_SCRATCH {
            self.free.push(handle);
        } else {
            self.close_scratch(handle);
        }
    }

    /// A new vgem fence, alone on a scratch buffer, as a sync_file:
    /// `(handle, fence id, sync_file)`.
    fn make_fence(&mut self) -> Result<(u32, u32, SyncFile), ProviderError> {
        let handle = self.take_scratch()?;
        let fence = match self.attach(handle, true) {
            Ok(f) => f,
            Err(e) => {
                // Not reused: something on it is still pending.
                self.close_scratch(handle);
                return Err(e);
            }
        };
        self.pending += 1;
        self.made += 1;
        let sync = self
            .prime(handle)
            .and_then(|dmabuf| export_sync_file(dmabuf.as_fd(), HostAccess::Read));
        match sync {
            Ok(sync) => Ok((handle, fence, sync)),
            Err(e) => {
                self.finish(handle, fence);
                Err(e)
            }
        }
    }

    /// Signals a fence of this file and frees its scratch buffer.
    fn finish(&mut self, handle: u32, fence: u32) -> bool {
        let expired = match self.signal(fence) {
            Ok(expired) => expired,
            Err(e) => {
                log::warn!("host fences: signalling vgem fence {fence}: {e}");
                false
            }
        };
        self.pending = self.pending.saturating_sub(1);
        self.give_back(handle);
        expired
    }
}

impl Drop for VgemFile {
    fn drop(&mut self) {
        for h in std::mem::take(&mut self.free) {
            self.close_scratch(h);
        }
    }
}

/// The vgem source: the card's open files, the newest one taking new
/// fences.
#[derive(Debug)]
struct Vgem {
    node: PathBuf,
    files: BTreeMap<u64, VgemFile>,
    current: u64,
}

impl Vgem {
    fn open(node: &Path) -> Result<Vgem, ProviderError> {
        let mut files = BTreeMap::new();
        files.insert(0, VgemFile::open(node)?);
        Ok(Vgem {
            node: node.to_path_buf(),
            files,
            current: 0,
        })
    }

    fn self_test(&mut self) -> Result<(), ProviderError> {
        let file = self
            .files
            .get_mut(&self.current)
            .ok_or_else(|| ProviderError::Unsuitable("no vgem file".into()))?;
        let target = file.take_scratch()?;
        let result = (|| {
            let dmabuf = file.prime(target)?;
            let (handle, fence, sync) = file.make_fence()?;
            let imported = import_sync_file(dmabuf.as_fd(), sync.fd(), true);
            let seen = export_sync_file(dmabuf.as_fd(), HostAccess::Read)
                .and_then(|s| s.is_signalled().map(|signalled| !signalled));
            file.finish(handle, fence);
            imported?;
            if !seen? {
                return Err(ProviderError::Unsuitable(
                    "an imported vgem fence was not seen in the buffer's reservation".into(),
                ));
            }
            let cleared = export_sync_file(dmabuf.as_fd(), HostAccess::Write)?.is_signalled()?;
            if !cleared {
                return Err(ProviderError::Unsuitable(
                    "a signalled vgem fence still blocks its buffer".into(),
                ));
            }
            Ok(())
        })();
        file.give_back(target);
        result
    }

    fn install(&mut self, dmabuf: BorrowedFd<'_>, write: bool) -> Result<Installed, ProviderError> {
        self.rotate();
        let id = self.current;
        let file = self
            .files
            .get_mut(&id)
            .ok_or_else(|| ProviderError::Unsuitable("no vgem file".into()))?;
        let (handle, fence, sync) = file.make_fence()?;
        if let Err(e) = import_sync_file(dmabuf, sync.fd(), write) {
            file.finish(handle, fence);
            return Err(e);
        }
        Ok(Installed::Vgem {
            file: id,
            handle,
            fence,
        })
    }

    /// Opens a fresh file once the current one made its share of fences;
    /// the old one closes when its last fence is signalled.
    fn rotate(&mut self) {
        let full = self
            .files
            .get(&self.current)
            .is_none_or(|f| f.made >= FENCES_PER_FILE);
        if !full {
            return;
        }
        match VgemFile::open(&self.node) {
            Ok(f) => {
                let id = self.current + 1;
                self.files.insert(id, f);
                let old = self.current;
                self.current = id;
                self.close_if_idle(old);
            }
            Err(e) => log::warn!("host fences: opening a fresh vgem file: {e}"),
        }
    }

    fn close_if_idle(&mut self, id: u64) {
        if id != self.current && self.files.get(&id).is_some_and(|f| f.pending == 0) {
            self.files.remove(&id);
        }
    }

    fn signal(&mut self, file: u64, handle: u32, fence: u32) -> Result<bool, ProviderError> {
        let f = self
            .files
            .get_mut(&file)
            .ok_or_else(|| ProviderError::Unsuitable(format!("vgem file {file} is gone")))?;
        let expired = f.finish(handle, fence);
        self.close_if_idle(file);
        Ok(expired)
    }
}

/// A GPU buffer for tests: a vgem dumb buffer of its own, its dma-buf, and
/// vgem fences attached to it directly, as a GPU driver's job would.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct TestGpuBuffer {
    file: VgemFile,
    handle: u32,
    pub dmabuf: OwnedFd,
}

#[cfg(test)]
impl TestGpuBuffer {
    /// A one-page buffer, or why there is no vgem card.
    pub(crate) fn new() -> Result<TestGpuBuffer, String> {
        let path = find_vgem_card()?;
        let file = VgemFile::open(&path).map_err(|e| e.to_string())?;
        let handle = file.create_scratch().map_err(|e| e.to_string())?;
        let dmabuf = file.prime(handle).map_err(|e| e.to_string())?;
        Ok(TestGpuBuffer {
            file,
            handle,
            dmabuf,
        })
    }

    /// A host job's fence on the buffer: a vgem fence on a scratch buffer
    /// of the same file, imported into this one's reservation (attaching
    /// to the buffer itself is `EBUSY` while a conflicting fence, a
    /// guest's among them, is pending there).
    pub(crate) fn fence(&self, write: bool) -> u32 {
        let scratch = self.file.create_scratch().expect("scratch buffer");
        let fence = self
            .file
            .attach(scratch, true)
            .expect("DRM_IOCTL_VGEM_FENCE_ATTACH");
        let prime = self.file.prime(scratch).expect("prime");
        let sync = export_sync_file(prime.as_fd(), HostAccess::Read).expect("export");
        import_sync_file(self.dmabuf.as_fd(), sync.fd(), write).expect("import");
        fence
    }

    /// `DRM_IOCTL_VGEM_FENCE_ATTACH` on the buffer itself.
    pub(crate) fn direct_fence(&self, write: bool) -> u32 {
        self.file
            .attach(self.handle, write)
            .expect("DRM_IOCTL_VGEM_FENCE_ATTACH")
    }

    /// `DRM_IOCTL_VGEM_FENCE_SIGNAL`.
    pub(crate) fn signal(&self, fence: u32) {
        let expired = self
            .file
            .signal(fence)
            .expect("DRM_IOCTL_VGEM_FENCE_SIGNAL");
        assert!(!expired, "vgem timed fence {fence} out itself");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::sync_file::{host_fences, FenceStatus, HostFences};

    #[test]
    fn ioctl_numbers_and_layouts_match_the_uapi() {
        assert_eq!(std::mem::size_of::<SwSyncCreateFence>(), 40);
        assert_eq!(std::mem::size_of::<VgemFenceAttach>(), 16);
        assert_eq!(std::mem::size_of::<VgemFenceSignal>(), 8);
        assert_eq!(std::mem::size_of::<DrmGemClose>(), 8);
        assert_eq!(SW_SYNC_IOC_CREATE_FENCE, 0xC028_5700);
        assert_eq!(SW_SYNC_IOC_INC, 0x4004_5701);
        assert_eq!(DRM_IOCTL_VGEM_FENCE_ATTACH, 0xC010_6441);
        assert_eq!(DRM_IOCTL_VGEM_FENCE_SIGNAL, 0x4008_6442);
        assert_eq!(DRM_IOCTL_GEM_CLOSE, 0x4008_6409);
        assert_eq!(DRM_IOCTL_VERSION, 0xC040_6400);
        assert_eq!(DRM_IOCTL_MODE_CREATE_DUMB, 0xC020_64B2);
        assert_eq!(DRM_IOCTL_PRIME_HANDLE_TO_FD, 0xC00C_642D);
    }

    #[test]
    fn source_kinds_say_what_they_carry() {
        assert!(FenceSourceKind::SwSync.carries_errors());
        assert!(!FenceSourceKind::Vgem.carries_errors());
        assert_eq!(FenceSourceKind::SwSync.own_timeout(), None);
        assert_eq!(
            FenceSourceKind::Vgem.own_timeout(),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            serde_json::to_value(FenceSourceKind::SwSync).ok(),
            Some(serde_json::json!("sw_sync"))
        );
    }

    /// A vgem source, or `None` with the skip printed (the kernel lane
    /// fails on a "does not exist" skip).
    fn vgem_or_skip(test: &str) -> Option<FenceSource> {
        match find_vgem_card() {
            Ok(path) => Some(FenceSource::vgem(&path).expect("the vgem source works")),
            Err(why) => {
                println!("{test} skipped: a vgem card does not exist on this host ({why})");
                None
            }
        }
    }

    /// A dma-buf of a fresh vgem dumb buffer of the test's own, and the
    /// file it lives on.
    fn vgem_buffer() -> (VgemFile, OwnedFd) {
        let path = find_vgem_card().expect("vgem card");
        let file = VgemFile::open(&path).expect("open");
        let handle = file.create_scratch().expect("dumb buffer");
        let dmabuf = file.prime(handle).expect("prime");
        (file, dmabuf)
    }

    fn pending(dmabuf: BorrowedFd<'_>, access: HostAccess) -> bool {
        !matches!(
            host_fences(dmabuf, access, false).expect("host fences"),
            HostFences::Clear
        )
    }

    #[test]
    fn vgem_source_installs_a_fence_the_host_waits_for_until_it_is_signalled() {
        let Some(mut source) = vgem_or_skip("vgem host fence") else {
            return;
        };
        assert_eq!(source.kind(), FenceSourceKind::Vgem);
        let (_file, dmabuf) = vgem_buffer();
        assert!(!pending(dmabuf.as_fd(), HostAccess::Write));

        // A WRITE fence: readers and writers wait.
        let seen = export_sync_file(dmabuf.as_fd(), HostAccess::Read).expect("export");
        assert!(seen.is_signalled().expect("poll"), "nothing pending yet");
        let fence = source.install(dmabuf.as_fd(), true).expect("install");
        let seen = export_sync_file(dmabuf.as_fd(), HostAccess::Read).expect("export");
        assert!(!seen.is_signalled().expect("poll"));
        assert_eq!(seen.status().expect("status"), FenceStatus::Pending);
        assert_eq!(seen.pending_fences().expect("fences"), 1);
        assert!(pending(dmabuf.as_fd(), HostAccess::Read));
        assert!(pending(dmabuf.as_fd(), HostAccess::Write));
        assert!(!crate::provider::sync_file::poll_now(
            dmabuf.as_fd(),
            rustix::event::PollFlags::IN
        )
        .expect("poll"));
        // An error cannot travel with a vgem fence.
        assert_eq!(
            source.signal(fence, 5).expect("signal"),
            Signalled::ErrorDropped
        );
        assert!(seen.is_signalled().expect("poll"));
        assert_eq!(seen.status().expect("status"), FenceStatus::Signalled);
        assert!(!pending(dmabuf.as_fd(), HostAccess::Write));

        // A READ fence: only writers wait.
        let fence = source.install(dmabuf.as_fd(), false).expect("install");
        assert!(!pending(dmabuf.as_fd(), HostAccess::Read));
        assert!(pending(dmabuf.as_fd(), HostAccess::Write));
        assert!(
            crate::provider::sync_file::poll_now(dmabuf.as_fd(), rustix::event::PollFlags::IN)
                .expect("poll")
        );
        assert_eq!(source.signal(fence, 0).expect("signal"), Signalled::Done);
        assert!(!pending(dmabuf.as_fd(), HostAccess::Write));
    }

    #[test]
    fn vgem_source_reuses_scratch_buffers_and_keeps_fences_apart() {
        let Some(mut source) = vgem_or_skip("vgem scratch reuse") else {
            return;
        };
        let (_file, dmabuf) = vgem_buffer();
        // Two fences pending at once, signalled in the other order: each
        // has its own scratch buffer.
        let a = source.install(dmabuf.as_fd(), true).expect("install a");
        let b = source.install(dmabuf.as_fd(), true).expect("install b");
        let seen = export_sync_file(dmabuf.as_fd(), HostAccess::Read).expect("export");
        assert_eq!(seen.pending_fences().expect("fences"), 2);
        source.signal(b, 0).expect("signal b");
        assert_eq!(seen.pending_fences().expect("fences"), 1);
        assert!(pending(dmabuf.as_fd(), HostAccess::Read));
        source.signal(a, 0).expect("signal a");
        assert!(!pending(dmabuf.as_fd(), HostAccess::Read));
        for _ in 0..200 {
            let f = source.install(dmabuf.as_fd(), false).expect("install");
            source.signal(f, 0).expect("signal");
        }
        let Source::Vgem(v) = &source.inner else {
            panic!("vgem");
        };
        let file = v.files.get(&v.current).expect("current file");
        assert!(file.free.len() <= 2, "scratch buffers are reused");
        assert_eq!(file.pending, 0);
    }

    #[test]
    fn sw_sync_source_carries_an_error_as_enoent() {
        let mut source = match FenceSource::sw_sync(Path::new(SW_SYNC_NODE)) {
            Ok(s) => s,
            Err(e) => {
                println!("sw_sync host fence skipped: {SW_SYNC_NODE} is not usable here ({e})");
                return;
            }
        };
        let Ok(path) = find_vgem_card() else {
            println!("sw_sync host fence skipped: no dma-buf to test on (no vgem card)");
            return;
        };
        let file = VgemFile::open(&path).expect("open");
        let dmabuf = file
            .prime(file.create_scratch().expect("dumb"))
            .expect("prime");
        let fence = source.install(dmabuf.as_fd(), true).expect("install");
        let seen = export_sync_file(dmabuf.as_fd(), HostAccess::Read).expect("export");
        assert_eq!(seen.status().expect("status"), FenceStatus::Pending);
        assert_eq!(source.signal(fence, 5).expect("signal"), Signalled::Done);
        assert_eq!(
            seen.status().expect("status"),
            FenceStatus::Error(libc::ENOENT)
        );
    }

    #[test]
    fn detect_names_what_it_tried() {
        match FenceSource::detect() {
            Ok(s) => println!(
                "host fence source: {} ({})",
                s.kind().name(),
                s.node().display()
            ),
            Err(why) => {
                assert!(why.contains("sw_sync") && why.contains("vgem"), "{why}");
                println!("no host fence source: {why}");
            }
        }
    }
}
