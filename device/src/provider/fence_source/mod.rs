// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

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

mod vgem;

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

pub use vgem::find_vgem_card;
#[cfg(test)]
pub(crate) use vgem::TestGpuBuffer;
use vgem::Vgem;

#[cfg(test)]
mod tests;
