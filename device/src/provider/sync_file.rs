// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host kernel's implicit-sync fences on a dma-buf, as user space
//! reaches them: `DMA_BUF_IOCTL_EXPORT_SYNC_FILE` and
//! `DMA_BUF_IOCTL_IMPORT_SYNC_FILE` (Linux 6.0 and later), sync_file fds
//! (`poll`, `SYNC_IOC_FILE_INFO`), and `poll` on the dma-buf itself where
//! the export ioctl is missing (`docs/protocol.md`, "Host fences").
//!
//! A dma-buf's reservation holds fences of four usages, KERNEL < WRITE <
//! READ < BOOKKEEP. User space sees two views of it: what a reader must
//! wait for (KERNEL and WRITE fences: `DMA_BUF_SYNC_READ`, `POLLIN`) and
//! what a writer must wait for (KERNEL, WRITE and READ fences:
//! `DMA_BUF_SYNC_WRITE`, `POLLOUT`). BOOKKEEP fences are never visible.
//! Nothing here blocks: every check polls with a zero timeout, and the
//! caller waits for readiness in its own event loop.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, Opcode, Updater};

use super::ProviderError;

/// Which fences a host user of a dma-buf waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostAccess {
    /// A reader waits for the writers (KERNEL and WRITE fences).
    Read,
    /// A writer waits for everyone (KERNEL, WRITE and READ fences).
    Write,
}

impl HostAccess {
    /// The `DMA_BUF_SYNC_*` bit the sync_file ioctls take for it.
    fn sync_flag(self) -> u32 {
        match self {
            HostAccess::Read => DMA_BUF_SYNC_READ,
            HostAccess::Write => DMA_BUF_SYNC_WRITE,
        }
    }

    /// What `poll` on the dma-buf itself waits for: `POLLIN` for a
    /// reader, `POLLOUT` for a writer.
    pub fn poll_flags(self) -> PollFlags {
        match self {
            HostAccess::Read => PollFlags::IN,
            HostAccess::Write => PollFlags::OUT,
        }
    }
}

const DMA_BUF_SYNC_READ: u32 = 1;
const DMA_BUF_SYNC_WRITE: u32 = 2;

/// `struct dma_buf_export_sync_file` and `struct dma_buf_import_sync_file`
/// of `<linux/dma-buf.h>`: `{ u32 flags; s32 fd; }`.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct DmaBufSyncFile {
    flags: u32,
    fd: i32,
}

/// `DMA_BUF_IOCTL_EXPORT_SYNC_FILE` = `_IOWR('b', 2, struct
/// dma_buf_export_sync_file)` = 0xC0086202.
const EXPORT_SYNC_FILE: Opcode = opcode::read_write::<DmaBufSyncFile>(b'b', 2);
/// `DMA_BUF_IOCTL_IMPORT_SYNC_FILE` = `_IOW('b', 3, struct
/// dma_buf_import_sync_file)` = 0x40086203.
const IMPORT_SYNC_FILE: Opcode = opcode::write::<DmaBufSyncFile>(b'b', 3);

/// `struct sync_file_info` of `<linux/sync_file.h>` (56 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct SyncFileInfo {
    name: [u8; 32],
    status: i32,
    flags: u32,
    num_fences: u32,
    pad: u32,
    sync_fence_info: u64,
}

/// `struct sync_fence_info` of `<linux/sync_file.h>` (80 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct SyncFenceInfo {
    obj_name: [u8; 32],
    driver_name: [u8; 32],
    status: i32,
    flags: u32,
    timestamp_ns: u64,
}

/// `SYNC_IOC_FILE_INFO` = `_IOWR('>', 4, struct sync_file_info)` = 0xC0383E04.
const SYNC_IOC_FILE_INFO: Opcode = opcode::read_write::<SyncFileInfo>(b'>', 4);

/// Set once `DMA_BUF_IOCTL_EXPORT_SYNC_FILE` answered `ENOTTY` (a kernel
/// before 6.0, or one built without `CONFIG_SYNC_FILE`): from then on host
/// fences are watched by polling the dma-buf itself.
static EXPORT_MISSING: AtomicBool = AtomicBool::new(false);

/// How many `EINTR` answers in a row a host fence ioctl retries.
const MAX_RETRIES: u32 = 1000;

/// Runs `call` again on `EINTR`, a bounded number of times.
fn retrying<T>(mut call: impl FnMut() -> rustix::io::Result<T>) -> rustix::io::Result<T> {
    let mut left = MAX_RETRIES;
    loop {
        match call() {
            Err(Errno::INTR) if left > 0 => left -= 1,
            other => return other,
        }
    }
}

/// The state of one fence (or of every fence of a sync_file together), as
/// `dma_fence_get_status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceStatus {
    Pending,
    Signalled,
    /// Signalled with this error (a positive errno).
    Error(i32),
}

impl FenceStatus {
    fn from_kernel(status: i32) -> FenceStatus {
        match status {
            0 => FenceStatus::Pending,
            s if s > 0 => FenceStatus::Signalled,
            s => FenceStatus::Error(s.saturating_neg()),
        }
    }
}

/// One fence of a sync_file (`struct sync_fence_info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceInfo {
    pub driver: String,
    pub timeline: String,
    pub status: FenceStatus,
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// A sync_file: a set of fences behind one fd, readable once all of them
/// signalled.
#[derive(Debug)]
pub struct SyncFile(OwnedFd);

impl SyncFile {
    /// Takes ownership of an fd the caller knows to be a sync_file.
    pub fn from_fd(fd: OwnedFd) -> SyncFile {
        SyncFile(fd)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    pub fn into_fd(self) -> OwnedFd {
        self.0
    }

    /// True once every fence of the file signalled (`POLLIN`), now.
    pub fn is_signalled(&self) -> Result<bool, ProviderError> {
        poll_now(self.fd(), PollFlags::IN)
    }

    /// The status of the whole file: pending while any fence is, else the
    /// first error, else signalled (`SYNC_IOC_FILE_INFO`).
    pub fn status(&self) -> Result<FenceStatus, ProviderError> {
        let mut info = empty_info();
        file_info(self.fd(), &mut info)?;
        Ok(FenceStatus::from_kernel(info.status))
    }

    /// Every fence of the file with its own status.
    pub fn fences(&self) -> Result<Vec<FenceInfo>, ProviderError> {
        // First the count, then the array; a sync_file's fences never change.
        let mut info = empty_info();
        file_info(self.fd(), &mut info)?;
        let count = info.num_fences as usize;
        if count == 0 {
            return Ok(Vec::new());
        }
        let blank = SyncFenceInfo {
            obj_name: [0; 32],
            driver_name: [0; 32],
            status: 0,
            flags: 0,
            timestamp_ns: 0,
        };
        let mut fences = vec![blank; count];
        let mut info = empty_info();
        info.num_fences = info_count(count)?;
        info.sync_fence_info = fences.as_mut_ptr() as u64;
        file_info(self.fd(), &mut info)?;
        fences.truncate(info.num_fences as usize);
        Ok(fences
            .iter()
            .map(|f| FenceInfo {
                driver: c_string(&f.driver_name),
                timeline: c_string(&f.obj_name),
                status: FenceStatus::from_kernel(f.status),
            })
            .collect())
    }

    /// How many of its fences are still pending.
    pub fn pending_fences(&self) -> Result<usize, ProviderError> {
        Ok(self
            .fences()?
            .iter()
            .filter(|f| f.status == FenceStatus::Pending)
            .count())
    }
}

fn info_count(count: usize) -> Result<u32, ProviderError> {
    u32::try_from(count).map_err(|_| ProviderError::host("SYNC_IOC_FILE_INFO", Errno::OVERFLOW))
}

fn empty_info() -> SyncFileInfo {
    SyncFileInfo {
        name: [0; 32],
        status: 0,
        flags: 0,
        num_fences: 0,
        pad: 0,
        sync_fence_info: 0,
    }
}

/// `SYNC_IOC_FILE_INFO` into `info`; with `num_fences` > 0,
/// `sync_fence_info` must point to that many `SyncFenceInfo`s.
fn file_info(fd: BorrowedFd<'_>, info: &mut SyncFileInfo) -> Result<(), ProviderError> {
    retrying(|| {
        // SAFETY: SYNC_IOC_FILE_INFO reads and writes one `struct
        // sync_file_info`, whose layout `SyncFileInfo` has. When
        // `num_fences` is non-zero the kernel writes at most that many
        // `struct sync_fence_info` (the layout of `SyncFenceInfo`) to the
        // address in `sync_fence_info`, which the callers point at a live
        // buffer of exactly that many; with 0 it writes no array. Both
        // outlive the call.
        unsafe { ioctl(fd, Updater::<SYNC_IOC_FILE_INFO, _>::new(info)) }
    })
    .map_err(|e| ProviderError::host("SYNC_IOC_FILE_INFO", e))
}

/// Polls `fd` for `events` without waiting: true when any of them (or an
/// error condition) is reported.
pub fn poll_now(fd: BorrowedFd<'_>, events: PollFlags) -> Result<bool, ProviderError> {
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let mut fds = [PollFd::from_borrowed_fd(fd, events)];
    retrying(|| poll(&mut fds, Some(&zero))).map_err(|e| ProviderError::host("poll", e))?;
    Ok(!fds[0].revents().is_empty())
}

/// `DMA_BUF_IOCTL_EXPORT_SYNC_FILE`: a sync_file of the fences a host user
/// with `access` waits for on `dmabuf` now (a signalled stub when there
/// are none). `ENOTTY` where the kernel lacks the ioctl.
pub fn export_sync_file(
    dmabuf: BorrowedFd<'_>,
    access: HostAccess,
) -> Result<SyncFile, ProviderError> {
    let mut arg = DmaBufSyncFile {
        flags: access.sync_flag(),
        fd: -1,
    };
    retrying(|| {
        // SAFETY: DMA_BUF_IOCTL_EXPORT_SYNC_FILE reads and writes one
        // `struct dma_buf_export_sync_file` (two 32-bit fields, no
        // pointers), whose layout `DmaBufSyncFile` has; `arg` outlives the
        // call.
        unsafe { ioctl(dmabuf, Updater::<EXPORT_SYNC_FILE, _>::new(&mut arg)) }
    })
    .map_err(|e| ProviderError::host("DMA_BUF_IOCTL_EXPORT_SYNC_FILE", e))?;
    if arg.fd < 0 {
        return Err(ProviderError::host(
            "DMA_BUF_IOCTL_EXPORT_SYNC_FILE",
            Errno::INVAL,
        ));
    }
    // SAFETY: on success the kernel installed a new sync_file fd in
    // `arg.fd` that nothing else owns; it is wrapped exactly once, here.
    Ok(SyncFile(unsafe { OwnedFd::from_raw_fd(arg.fd) }))
}

/// `DMA_BUF_IOCTL_IMPORT_SYNC_FILE`: adds every fence of `sync` to
/// `dmabuf`'s reservation, as WRITE fences (`write`) or READ fences.
pub fn import_sync_file(
    dmabuf: BorrowedFd<'_>,
    sync: BorrowedFd<'_>,
    write: bool,
) -> Result<(), ProviderError> {
    let access = if write {
        HostAccess::Write
    } else {
        HostAccess::Read
    };
    let arg = DmaBufSyncFile {
        flags: access.sync_flag(),
        fd: std::os::fd::AsRawFd::as_raw_fd(&sync),
    };
    retrying(|| {
        // SAFETY: DMA_BUF_IOCTL_IMPORT_SYNC_FILE only reads one `struct
        // dma_buf_import_sync_file` (two 32-bit fields, no pointers), whose
        // layout `DmaBufSyncFile` has; `Setter` passes a pointer to its own
        // copy, live for the call. The fd in it is borrowed for the call.
        unsafe {
            ioctl(
                dmabuf,
                rustix::ioctl::Setter::<IMPORT_SYNC_FILE, _>::new(arg),
            )
        }
    })
    .map_err(|e| ProviderError::host("DMA_BUF_IOCTL_IMPORT_SYNC_FILE", e))
}

/// What a host user with `access` waits for on a dma-buf now.
#[derive(Debug)]
pub enum HostFences {
    /// Nothing: go on.
    Clear,
    /// Fences are pending: readable (`events`) on `fd` when they signalled.
    /// `pending` is how many fences that is, where the kernel says (a
    /// sync_file); `None` when the dma-buf itself is polled.
    Pending {
        fd: OwnedFd,
        events: PollFlags,
        pending: Option<usize>,
    },
}

/// The host fences `access` must wait for on `dmabuf`: a sync_file of them
/// (`DMA_BUF_IOCTL_EXPORT_SYNC_FILE`), or, on a kernel without that ioctl,
/// a duplicate of the dma-buf fd to poll (`POLLIN`/`POLLOUT`). `count`:
/// also say how many fences are pending (one more ioctl).
pub fn host_fences(
    dmabuf: BorrowedFd<'_>,
    access: HostAccess,
    count: bool,
) -> Result<HostFences, ProviderError> {
    if !EXPORT_MISSING.load(Ordering::Relaxed) {
        match export_sync_file(dmabuf, access) {
            Ok(sync) => {
                if sync.is_signalled()? {
                    return Ok(HostFences::Clear);
                }
                let pending = if count {
                    Some(sync.pending_fences()?)
                } else {
                    None
                };
                return Ok(HostFences::Pending {
                    fd: sync.into_fd(),
                    events: PollFlags::IN,
                    pending,
                });
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                EXPORT_MISSING.store(true, Ordering::Relaxed);
                log::info!(
                    "host fences: DMA_BUF_IOCTL_EXPORT_SYNC_FILE is missing (Linux 6.0 or later \
                     has it): polling the dma-bufs instead"
                );
            }
            Err(e) => return Err(e),
        }
    }
    let events = access.poll_flags();
    if poll_now(dmabuf, events)? {
        return Ok(HostFences::Clear);
    }
    let fd = dmabuf
        .try_clone_to_owned()
        .map_err(|e| ProviderError::Host {
            op: "dup of a dma-buf",
            source: e,
        })?;
    Ok(HostFences::Pending {
        fd,
        events,
        pending: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{memfd_create, MemfdFlags};

    #[test]
    fn ioctl_numbers_and_layouts_match_the_uapi() {
        assert_eq!(std::mem::size_of::<DmaBufSyncFile>(), 8);
        assert_eq!(std::mem::size_of::<SyncFileInfo>(), 56);
        assert_eq!(std::mem::size_of::<SyncFenceInfo>(), 80);
        assert_eq!(EXPORT_SYNC_FILE, 0xC008_6202);
        assert_eq!(IMPORT_SYNC_FILE, 0x4008_6203);
        assert_eq!(SYNC_IOC_FILE_INFO, 0xC038_3E04);
        assert_eq!(HostAccess::Read.poll_flags(), PollFlags::IN);
        assert_eq!(HostAccess::Write.poll_flags(), PollFlags::OUT);
    }

    #[test]
    fn kernel_statuses_map_to_fence_statuses() {
        assert_eq!(FenceStatus::from_kernel(0), FenceStatus::Pending);
        assert_eq!(FenceStatus::from_kernel(1), FenceStatus::Signalled);
        assert_eq!(
            FenceStatus::from_kernel(-libc::ENOENT),
            FenceStatus::Error(libc::ENOENT)
        );
        assert_eq!(
            FenceStatus::from_kernel(i32::MIN),
            FenceStatus::Error(i32::MAX)
        );
    }

    #[test]
    fn sync_file_ioctls_on_a_memfd_reach_the_kernel_and_are_enotty() {
        let fd = memfd_create("sync-file-test", MemfdFlags::CLOEXEC).expect("memfd_create");
        let err = export_sync_file(fd.as_fd(), HostAccess::Read).expect_err("no dma-buf");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
        let other = memfd_create("sync-file-test", MemfdFlags::CLOEXEC).expect("memfd_create");
        let err = import_sync_file(fd.as_fd(), other.as_fd(), true).expect_err("no dma-buf");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
        let err = SyncFile::from_fd(fd).status().expect_err("no sync_file");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
    }
}
