// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host side of the daemon as the guest-side programs need it
//! (contract sections 10 and 11): make the host act (evict, export,
//! revoke) and read what it recorded (host syncs, objects).
//!
//! The trait keeps the scenarios and the importer programs independent of
//! how the host is reached; the conformance suite implements it with the
//! daemon's own `ctl` client on its control socket.

use std::os::fd::BorrowedFd;

/// How a host buffer is registered (`ctl export NAME --fd-from PATH
/// [--dynamic] [--read-only] [--guests 0,1]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// Dynamic exporter: the host may move it while nothing pins it.
    pub dynamic: bool,
    /// Guests may only read it.
    pub read_only: bool,
    /// Guests (socket indices) allowed to `OPEN` it; `None`: every guest.
    pub guests: Option<Vec<usize>>,
}

/// One host `DMA_BUF_IOCTL_SYNC` call in the daemon's record
/// (`ctl stats --json`, `recent_syncs`, oldest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSync {
    pub uuid: [u8; 16],
    pub flags: u64,
    /// The real ioctl on a kernel dma-buf (`true`) or the daemon's
    /// emulation (`false`: memfd objects, guest pages without udmabuf).
    pub kernel: bool,
    /// The errno the call failed with, `None` when it succeeded.
    pub errno: Option<i32>,
}

/// The environment variable that makes an emulated host sync a failure:
/// `DMABUF_REQUIRE_KERNEL_SYNC=1` where every object must be a kernel
/// dma-buf (the real-kernel lane, `vmm-config/e2e/lane-kernel.sh`).
pub const REQUIRE_KERNEL_SYNC_ENV: &str = "DMABUF_REQUIRE_KERNEL_SYNC";

/// Whether [`REQUIRE_KERNEL_SYNC_ENV`] is set to `1`.
pub fn kernel_sync_required() -> bool {
    std::env::var(REQUIRE_KERNEL_SYNC_ENV).is_ok_and(|v| v == "1")
}

/// One attachment of an object in `ctl list --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostAttachment {
    pub guest: usize,
    pub dynamic_importer: bool,
    /// Pins, a static importer's lifetime pin included.
    pub pins: u32,
    pub mappings: u64,
}

/// Who holds an object's reservation lock in `ctl list --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLockHolder {
    /// The guest, or `None` for the host itself (an eviction).
    pub guest: Option<usize>,
    /// The acquire context's stamp, or `None` for a context-less holder.
    pub stamp: Option<u64>,
}

/// One object in `ctl list --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostObject {
    pub uuid: [u8; 16],
    pub generation: u64,
    pub dynamic: bool,
    /// Guests holding a handle.
    pub guests: Vec<usize>,
    pub attachments: Vec<HostAttachment>,
    pub lock_holder: Option<HostLockHolder>,
    pub fences_pending: u64,
}

/// The daemon's host fence source (`ctl stats --json`, `host_fences`;
/// `docs/protocol.md`, "Host fences").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFenceSource {
    /// `"sw_sync"`, `"vgem"`, or `None` when the daemon found none.
    pub source: Option<String>,
    /// Whether a guest's error reaches the host as the fence's error.
    pub carries_errors: bool,
}

/// What a scenario or an importer program needs of the host.
pub trait HostControl: std::fmt::Debug + Send + Sync {
    /// `evict UUID`: moves a dynamic object. The error is the daemon's
    /// message (a pinned object: "... pinned ...").
    fn evict(&self, uuid: [u8; 16]) -> Result<(), String>;
    /// `export NAME --fd-from ...`: registers `fd` as a host export.
    fn export(&self, name: &str, fd: BorrowedFd<'_>, options: &ExportOptions)
        -> Result<(), String>;
    /// `revoke NAME`.
    fn revoke(&self, name: &str) -> Result<(), String>;
    /// `stats --json`: the last host syncs, oldest first.
    fn recent_syncs(&self) -> Result<Vec<HostSync>, String>;
    /// `list --json`: every object.
    fn objects(&self) -> Result<Vec<HostObject>, String>;
    /// `stats --json`: the host fence source the daemon found at start.
    fn host_fences(&self) -> Result<HostFenceSource, String>;
    /// Whether the daemon runs under the same kernel as this program, so
    /// an fd of this kernel (a GPU buffer, a dma-buf) can be handed to it.
    /// A host reached from inside a guest gets copies of bytes instead.
    fn shares_our_kernel(&self) -> bool {
        true
    }
}

/// The host syncs `host` recorded for `uuid` while `action` ran: the
/// object's entries after it minus those before it. The object's earlier
/// entries must still be in the record (it keeps the last 1024 calls of
/// the whole daemon), which holds when nothing else issues hundreds of
/// syncs at the same time.
pub fn syncs_during<T>(
    host: &dyn HostControl,
    uuid: [u8; 16],
    action: impl FnOnce() -> T,
) -> Result<(T, Vec<u64>), String> {
    let (out, syncs) = host_syncs_during(host, uuid, action)?;
    Ok((out, syncs.into_iter().map(|s| s.flags).collect()))
}

/// [`syncs_during`] with the whole record entries: whether each call
/// reached the kernel, and how it ended.
pub fn host_syncs_during<T>(
    host: &dyn HostControl,
    uuid: [u8; 16],
    action: impl FnOnce() -> T,
) -> Result<(T, Vec<HostSync>), String> {
    let of_object = |record: Vec<HostSync>| -> Vec<HostSync> {
        record.into_iter().filter(|s| s.uuid == uuid).collect()
    };
    let before = of_object(host.recent_syncs()?);
    let out = action();
    let after = of_object(host.recent_syncs()?);
    if !after.starts_with(&before) {
        let flags = |v: &[HostSync]| v.iter().map(|s| s.flags).collect::<Vec<_>>();
        return Err(format!(
            "the sync record of the object changed under the request: before {:x?}, after {:x?}",
            flags(&before),
            flags(&after)
        ));
    }
    Ok((out, after[before.len()..].to_vec()))
}
