// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Implicit sync across the VM boundary (`docs/protocol.md`, "Host
//! fences"): the host kernel's fences on an object's dma-buf and the
//! guests' fences, each visible to the other side.
//!
//! - **Host to guest.** For an object backed by a kernel dma-buf, every
//!   wait of the model also waits for the host's fences of the matching
//!   usage: `WAIT`, the implicit wait of `BEGIN_CPU_ACCESS` and the copy
//!   path, a static importer's fresh `MAP`, eviction, and every host sync
//!   the kernel would make wait (a `START` sync waits inside
//!   `DMA_BUF_IOCTL_SYNC` for the fences of its direction, with the model
//!   lock held: `UNMAP` and `DETACH` of a cached mapping park first). A
//!   waiting request parks on a *watch*: a sync_file of the fences (or the
//!   dma-buf itself) that the timer thread polls with the model's timers;
//!   readiness re-runs the request from the top. No thread blocks on a
//!   host fence, and `--fence-timeout` bounds the wait (`ETIMEDOUT`): the
//!   device cannot signal a fence it does not own, so the request fails
//!   rather than touch a buffer the host may still be writing.
//! - **Guest to host.** `FENCE_ATTACH` on such an object installs a fence
//!   from the host's fence source ([`crate::provider::FenceSource`]) in the
//!   dma-buf's reservation, with the matching usage; it is signalled when
//!   the model signals the guest's fence (by the guest, by the fence
//!   timeout, at reset or revoke), with the error where the source can
//!   carry one.
//!
//! User space sees a reservation in two views only (what a reader waits
//! for, KERNEL and WRITE fences; what a writer waits for, those and READ
//! fences), so a wait for KERNEL fences alone (a static importer's `MAP`,
//! `WAIT(KERNEL)`) sees the host's WRITE fences too. The guests' own WRITE
//! fences installed there are subtracted (counted with
//! `SYNC_IOC_FILE_INFO`), so such a `MAP` never waits for the work its own
//! guest fenced; while both kinds are pending the watch is looked at again
//! every [`MIXED_RECHECK`].

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::PollFlags;
use virtio_dmabuf_protocol::{sync_flags, FenceUsage, Status};

use super::status::{provider_status, ProviderCall};
use super::{Exporter, ObjId, Step};
use crate::provider::{host_fences, HostAccess, HostFences, Signalled};

/// How often a watch whose sync_file also holds guest fences is looked at
/// again (it becomes readable only when those signal too).
pub(crate) const MIXED_RECHECK: Duration = Duration::from_millis(20);

/// Whether the exporter looks for a host fence source at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostFenceSetting {
    /// Use the best source the host offers (sw_sync, vgem), if any.
    #[default]
    Detect,
    /// None: guest fences stay in the model (tests).
    Off,
}

/// What a parked request's host fences are watched through.
#[derive(Debug)]
pub(crate) struct HostWatch {
    pub object: ObjId,
    /// A sync_file, or a duplicate of the dma-buf fd.
    pub fd: Arc<OwnedFd>,
    pub events: PollFlags,
    /// Look again at this instant even if `fd` is not readable (the
    /// mixed case).
    pub recheck: Option<Instant>,
    /// Readable (or due): the waiter runs again.
    pub fired: bool,
}

/// Counters behind `ctl stats`'s `host_fences`.
#[derive(Debug, Default, Clone)]
pub(crate) struct HostFenceCounters {
    pub installed: u64,
    pub install_failed: u64,
    pub signalled: u64,
    pub errors_dropped: u64,
    pub expired_at_source: u64,
    pub waits: u64,
    pub wait_timeouts: u64,
}

/// `ctl stats --json` `host_fences`: the source the daemon found at start
/// and what went through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFenceStats {
    /// `"sw_sync"`, `"vgem"`, or `null` when the host offers none.
    pub source: Option<&'static str>,
    /// The node it is reached through.
    pub node: Option<String>,
    /// Whether a guest's error reaches the host as the fence's error.
    pub carries_errors: bool,
    /// The source signals its fences itself after this long (vgem: 10 s).
    pub source_timeout_ms: Option<u64>,
    /// Guest fences installed in host dma-bufs, and installs that failed.
    pub installed: u64,
    pub install_failed: u64,
    /// Installed fences signalled by the daemon; of them, the ones whose
    /// error the source could not carry, and the ones the source had
    /// already signalled itself.
    pub signalled: u64,
    pub errors_dropped: u64,
    pub expired_at_source: u64,
    /// Installed fences pending now.
    pub pending: usize,
    /// Requests that parked on the host's fences, and the ones
    /// `--fence-timeout` ended.
    pub waits: u64,
    pub wait_timeouts: u64,
    /// Watches the timer thread polls now.
    pub watching: usize,
}

/// The view a wait for fences of `usage` has of a host reservation.
fn access_for(usage: FenceUsage) -> HostAccess {
    match usage {
        FenceUsage::Kernel | FenceUsage::Write => HostAccess::Read,
        FenceUsage::Read | FenceUsage::Bookkeep => HostAccess::Write,
    }
}

/// The usage whose fences the kernel waits for in a `START` sync with
/// these flags (`dma_resv_usage_rw` of its direction).
fn usage_for_sync(flags: u64) -> FenceUsage {
    if flags & sync_flags::WRITE != 0 {
        FenceUsage::Read
    } else {
        FenceUsage::Write
    }
}

/// A pending host wait: what to poll, and whether guests' fences are in it.
struct PendingHost {
    fd: OwnedFd,
    events: PollFlags,
    mixed: bool,
}

impl Exporter {
    /// The host fences a wait for `usage` on `object` must wait for now,
    /// beyond the model's own; `None` when there are none (or the object
    /// has no kernel dma-buf). Host failures are `EIO`.
    fn host_pending(
        &mut self,
        object: ObjId,
        usage: FenceUsage,
    ) -> Result<Option<PendingHost>, Status> {
        let Some(o) = self.objects.get(&object) else {
            return Ok(None);
        };
        let Some(fd) = o
            .backing
            .as_ref()
            .filter(|b| b.is_real_dmabuf())
            .and_then(|b| b.fd())
        else {
            return Ok(None);
        };
        // Only a KERNEL wait can see guest fences the model does not wait
        // for: the guests' installed WRITE fences (the model already waited
        // for every guest fence the other views contain).
        let ours = if usage == FenceUsage::Kernel {
            o.fences
                .iter()
                .filter_map(|f| self.fences.get(f))
                .filter(|f| f.host.as_ref().is_some_and(|h| h.write))
                .count()
        } else {
            0
        };
        let found = host_fences(fd, access_for(usage), ours > 0).map_err(|e| {
            let doing = format_args!("host fences of object {object}");
            provider_status(ProviderCall::Access, doing, &e)
        })?;
        match found {
            HostFences::Clear => Ok(None),
            HostFences::Pending {
                fd,
                events,
                pending,
            } => {
                let theirs = pending.map(|n| n.saturating_sub(ours));
                if theirs == Some(0) {
                    return Ok(None);
                }
                Ok(Some(PendingHost {
                    fd,
                    events,
                    mixed: ours > 0,
                }))
            }
        }
    }

    /// The host-fence wait of a request: `None` to go on, or the step to
    /// park on, with its watch registered. `locked`: hold the object's
    /// lock (context-less) while waiting.
    pub(crate) fn host_gate(
        &mut self,
        object: ObjId,
        usage: FenceUsage,
        locked: bool,
    ) -> Result<Option<Step>, Status> {
        let Some(p) = self.host_pending(object, usage)? else {
            return Ok(None);
        };
        let watch = self.next_watch;
        self.next_watch += 1;
        self.host_watches.insert(
            watch,
            HostWatch {
                object,
                fd: Arc::new(p.fd),
                events: p.events,
                recheck: p.mixed.then(|| Instant::now() + MIXED_RECHECK),
                fired: false,
            },
        );
        Ok(Some(Step::HostFences {
            object,
            watch,
            locked,
        }))
    }

    /// [`Self::host_gate`] for a host sync: a `START` sync waits inside the
    /// kernel for the fences of its direction, so it waits here first.
    pub(crate) fn host_gate_sync(
        &mut self,
        object: ObjId,
        flags: u64,
        locked: bool,
    ) -> Result<Option<Step>, Status> {
        if flags & sync_flags::END != 0 {
            return Ok(None);
        }
        self.host_gate(object, usage_for_sync(flags), locked)
    }

    /// True when the host has fences `usage` waits for on `object` now
    /// (`WAIT` with timeout 0).
    pub(crate) fn host_busy(&mut self, object: ObjId, usage: FenceUsage) -> Result<bool, Status> {
        Ok(self.host_pending(object, usage)?.is_some())
    }

    /// Forgets a watch (its request ended or waits for something else).
    pub(crate) fn drop_watch(&mut self, step: Step) {
        if let Step::HostFences { watch, .. } = step {
            self.host_watches.remove(&watch);
        }
    }

    /// Marks every watch on `object` as due: something the host sees
    /// there changed (a guest fence installed there was signalled).
    pub(crate) fn host_view_changed(&mut self, object: ObjId) {
        let mut any = false;
        for w in self
            .host_watches
            .values_mut()
            .filter(|w| w.object == object)
        {
            w.fired = true;
            any = true;
        }
        if any {
            self.mark_dirty(object);
        }
    }

    /// The fds the timer thread polls for the host fences requests wait
    /// for: `(watch, fd, events)`.
    pub fn host_watches(&self) -> Vec<(u64, Arc<OwnedFd>, PollFlags)> {
        self.host_watches
            .iter()
            .filter(|(_, w)| !w.fired)
            .map(|(id, w)| (*id, Arc::clone(&w.fd), w.events))
            .collect()
    }

    /// The timer thread saw these watches readable: their requests run
    /// again.
    pub fn host_watches_ready(&mut self, ready: &[u64], now: Instant) {
        for id in ready {
            if let Some(w) = self.host_watches.get_mut(id) {
                w.fired = true;
                let object = w.object;
                self.mark_dirty(object);
            }
        }
        self.pump(now);
    }

    /// The earliest recheck of a mixed watch.
    pub(crate) fn next_recheck(&self) -> Option<Instant> {
        self.host_watches
            .values()
            .filter(|w| !w.fired)
            .filter_map(|w| w.recheck)
            .min()
    }

    /// Fires the mixed watches due at `now` (called by `tick`).
    pub(crate) fn fire_rechecks(&mut self, now: Instant) {
        let due: Vec<ObjId> = self
            .host_watches
            .values_mut()
            .filter(|w| !w.fired && w.recheck.is_some_and(|r| r <= now))
            .map(|w| {
                w.fired = true;
                w.object
            })
            .collect();
        for object in due {
            self.mark_dirty(object);
        }
    }

    /// True when `fence_attach` can put a guest fence into `object`'s host
    /// reservation.
    pub(crate) fn host_fence_possible(&self, object: ObjId) -> bool {
        self.host_source.is_some()
            && self
                .objects
                .get(&object)
                .is_some_and(|o| o.is_real_dmabuf())
    }

    /// Installs a host fence for a guest fence of `usage` on `object`.
    /// BOOKKEEP fences have no host counterpart (`Ok(None)`).
    pub(crate) fn host_install(
        &mut self,
        object: ObjId,
        usage: FenceUsage,
    ) -> Result<Option<crate::provider::InstalledFence>, Status> {
        // Readers wait for a guest's KERNEL and WRITE fences, writers for
        // those and its READ fences, as for the host's own.
        let write = match usage {
            FenceUsage::Kernel | FenceUsage::Write => true,
            FenceUsage::Read => false,
            FenceUsage::Bookkeep => return Ok(None),
        };
        let (Some(source), Some(o)) = (self.host_source.as_mut(), self.objects.get(&object)) else {
            return Ok(None);
        };
        let Some(fd) = o
            .backing
            .as_ref()
            .filter(|b| b.is_real_dmabuf())
            .and_then(|b| b.fd())
        else {
            return Ok(None);
        };
        match source.install(fd, write) {
            Ok(f) => {
                self.host_counters.installed += 1;
                Ok(Some(f))
            }
            Err(e) => {
                self.host_counters.install_failed += 1;
                log::warn!("host fence for object {object}: {e}");
                Err(Status::Io)
            }
        }
    }

    /// Signals the host part of a guest fence.
    pub(crate) fn host_signal(
        &mut self,
        object: ObjId,
        fence: crate::provider::InstalledFence,
        error: u32,
    ) {
        if let Some(source) = self.host_source.as_mut() {
            match source.signal(fence, error) {
                Ok(outcome) => {
                    let c = &mut self.host_counters;
                    c.signalled += 1;
                    match outcome {
                        Signalled::Done => {}
                        Signalled::ErrorDropped => c.errors_dropped += 1,
                        Signalled::Expired => c.expired_at_source += 1,
                    }
                }
                Err(e) => log::warn!("signalling the host fence of object {object}: {e}"),
            }
        }
        self.host_view_changed(object);
    }

    /// The `host_fences` part of `ctl stats`.
    pub(crate) fn host_fence_stats(&self) -> HostFenceStats {
        let c = &self.host_counters;
        let source = self.host_source.as_ref();
        HostFenceStats {
            source: source.map(|s| s.kind().name()),
            node: source.map(|s| s.node().display().to_string()),
            carries_errors: source.is_some_and(|s| s.kind().carries_errors()),
            source_timeout_ms: source
                .and_then(|s| s.kind().own_timeout())
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            installed: c.installed,
            install_failed: c.install_failed,
            signalled: c.signalled,
            errors_dropped: c.errors_dropped,
            expired_at_source: c.expired_at_source,
            pending: self.fences.values().filter(|f| f.host.is_some()).count(),
            waits: c.waits,
            wait_timeouts: c.wait_timeouts,
            watching: self.host_watches.values().filter(|w| !w.fired).count(),
        }
    }
}

#[cfg(test)]
mod tests;
