// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! End-to-end conformance scenarios: the device contract exercised from the
//! guest's side through a [`LoopbackVmm`] connected to a running daemon.
//!
//! Each scenario opens its own session (a fresh connection), so one
//! failure does not leak state into the next. A scenario that needs a
//! capability the target does not have (no shared memory, no shared
//! objects, no fences) skips with the reason.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_dmabuf_protocol::{Event, Info, MapReply, CONTROLQ};

use super::{Check, Stop, Suite};
use crate::driver::{lock_request, Driver, Ticket};
use crate::session::{FrontEnd, Loopback, Session, SessionError};
use crate::vmm::{LoopbackVmm, VmmOptions};
use crate::{ensure, ensure_eq, skip};

pub use crate::host::{ExportOptions, HostControl};

mod attach;
mod cpu;
mod events;
mod fences;
mod framing;
mod guests;
mod host_fences;
mod host_side;
mod lifetimes;
mod limits;
mod locking;
mod objects;
mod programs;
mod shared_objects;
mod vgem;

pub use lifetimes::hold_state_with_a_parked_request;

/// Per-guest quotas as `GET_INFO` reports them (section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub max_objects: u32,
    pub max_bytes: u64,
    pub max_attachments: u32,
    pub max_contexts: u32,
    pub max_fences: u32,
    pub max_waiting: u32,
    pub max_pending_events: u32,
}

impl Quotas {
    pub fn of(info: &Info) -> Self {
        Quotas {
            max_objects: info.max_objects,
            max_bytes: info.max_bytes,
            max_attachments: info.max_attachments,
            max_contexts: info.max_contexts,
            max_fences: info.max_fences,
            max_waiting: info.max_waiting,
            max_pending_events: info.max_pending_events,
        }
    }
}

/// What the daemon under test was started with, where a scenario depends
/// on settings the wire does not report (or must report as configured).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonSettings {
    /// `--fence-timeout`.
    pub fence_timeout: Option<Duration>,
    /// The quotas `GET_INFO` must report.
    pub quotas: Option<Quotas>,
}

/// The device under test: the front-end that opens sessions, the options
/// every session starts from, the host side, what the daemon runs with.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where sessions come from (one guest per socket or device).
    pub front_end: Arc<dyn FrontEnd>,
    /// Options every session starts from.
    pub options: VmmOptions,
    /// The daemon's control plane, if the scenarios may use it.
    pub host: Option<Arc<dyn HostControl>>,
    /// What the daemon was started with, as far as the runner knows.
    pub daemon: DaemonSettings,
}

impl Target {
    /// The loopback VMM on one socket.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Target::on(Loopback {
            sockets: vec![socket.into()],
        })
    }

    /// Sessions from `front_end`, default options, no host control.
    pub fn on(front_end: impl FrontEnd + 'static) -> Self {
        Target {
            front_end: Arc::new(front_end),
            options: VmmOptions::default(),
            host: None,
            daemon: DaemonSettings::default(),
        }
    }

    /// The host control, or a skip.
    pub fn host(&self) -> Result<&dyn HostControl, Stop> {
        match &self.host {
            Some(h) => Ok(h.as_ref()),
            None => skip!("the target has no control socket"),
        }
    }

    /// A session as guest 0.
    pub fn connect(&self) -> Result<Box<dyn Session>, Stop> {
        self.connect_with(|_| {})
    }

    /// A session as guest 0 with adjusted options.
    pub fn connect_with(
        &self,
        adjust: impl FnOnce(&mut VmmOptions),
    ) -> Result<Box<dyn Session>, Stop> {
        let mut options = self.options.clone();
        adjust(&mut options);
        self.open(0, &options)
    }

    /// A session as guest `index`, or a skip if the target has fewer.
    pub fn connect_guest(&self, index: usize) -> Result<Box<dyn Session>, Stop> {
        self.open(index, &self.options)
    }

    fn open(&self, index: usize, options: &VmmOptions) -> Result<Box<dyn Session>, Stop> {
        let guests = self.front_end.guests();
        if index >= guests {
            skip!(
                "the target serves {guests} guest(s), the scenario needs {}",
                index + 1
            )
        }
        match self.front_end.connect(index, options) {
            Ok(s) => Ok(s),
            Err(SessionError::Unsupported(why)) => Err(Stop::Skip(why)),
            Err(e) => Err(e.into()),
        }
    }

    /// A loopback VMM session as guest 0, for what only this process's own
    /// front-end can show (the back-end channel's view, vring stops,
    /// reconnects), or a skip on a real front-end.
    pub fn connect_loopback(&self) -> Result<LoopbackVmm, Stop> {
        let Some(socket) = self.front_end.loopback_socket(0) else {
            skip!(
                "needs the loopback VMM's own view; the front-end is {}",
                self.front_end.describe()
            )
        };
        Ok(LoopbackVmm::connect(socket, self.options.clone())?)
    }
}

/// A scenario: its name and the function. The name is the function's name
/// (see [`scenarios!`]), so the scenario, and the unit test of the rule it
/// checks where there is one, are found by one search.
pub type Scenario = (&'static str, fn(&Target) -> Check);

/// The [`Scenario`]s of the functions named `module::function`, in that
/// order, each named after its function.
macro_rules! scenarios {
    ($($module:ident :: $name:ident),* $(,)?) => {
        vec![$((stringify!($name), $module::$name as fn(&Target) -> Check)),*]
    };
}

/// Every scenario, in the order they run.
pub fn all() -> Vec<Scenario> {
    scenarios![
        framing::config_space_matches_get_info,
        framing::framing_header_split_across_descriptors,
        framing::framing_short_writable_part_gets_used_len_0,
        framing::framing_short_parts_are_einval,
        framing::framing_garbage_opcode_in_a_batch_is_enosys,
        framing::framing_flags_reserved_and_enums_are_einval,
        framing::framing_address_outside_guest_memory,
        framing::framing_readable_part_outside_ram_after_the_header_is_efault_with_its_tag,
        framing::framing_chain_that_loops_comes_back_with_used_len_0,
        framing::requests_survive_any_descriptor_layout,
        objects::object_lifecycle_create_attach_map_unmap_detach_release,
        objects::release_and_detach_are_ebusy_while_in_use,
        objects::handles_are_nonzero_and_never_reused,
        attach::attach_static_exporter_static_importer,
        attach::attach_dynamic_importer_to_static_exporter_caches_bidirectional_without_pin,
        attach::attach_static_importer_to_dynamic_exporter_caches_bidirectional_and_pins,
        attach::attach_dynamic_exporter_dynamic_importer,
        attach::map_cached_other_direction_is_ebusy,
        attach::map_with_too_few_entries_is_eoverflow_with_needed_count,
        locking::lock_contention_parks_until_unlock,
        locking::wait_die_backoff_and_slow_relock_with_two_contexts,
        locking::cancel_ends_the_waiting_request_with_that_tag,
        locking::parked_request_does_not_block_other_queues,
        cpu::transfer_round_trip_and_bounds,
        cpu::shm_window_sees_transfers_both_ways,
        cpu::shm_peer2peer_map_is_in_the_window,
        cpu::without_shmem_map_shm_is_eopnotsupp,
        cpu::guest_pages_objects_share_guest_memory,
        fences::wait_completes_when_every_fence_up_to_usage_is_signalled,
        fences::transfers_wait_for_fences_then_copy,
        shared_objects::open_by_uuid_resolves_own_objects_locally,
        shared_objects::open_by_uuid_of_another_device_uses_shared_object_lookup,
        shared_objects::export_uuid_without_shared_objects_is_eopnotsupp,
        events::evict_moves_bytes_bumps_generation_and_notifies_dynamic_importers,
        objects::host_export_open_and_revoke,
        objects::map_shm_of_a_host_fd_that_can_shrink_is_eopnotsupp,
        guests::guests_cannot_name_each_others_handles,
        guests::open_export_not_granted_is_enoent_like_a_missing_one,
        guests::two_guests_lock_contention_on_a_shared_export,
        guests::two_guests_disconnect_releases_the_lock,
        locking::three_contexts_resolve_by_wait_die,
        locking::waiting_younger_context_with_locks_dies_when_an_older_one_queues,
        locking::waiting_contexts_are_granted_oldest_stamp_first,
        host_side::sync_table_in_the_daemon_record,
        host_side::pin_blocks_eviction_until_unpin,
        host_side::static_importer_pins_a_dynamic_exporter_until_detach,
        limits::wait_times_out_with_etimedout,
        programs::importer_display_scans_out_frames,
        programs::importer_gpu_renders_and_remaps_after_eviction,
        programs::importer_camera_reads_a_host_export,
        programs::importer_blob_shared_by_uuid,
        vgem::vgem_buffer_opened_synced_evicted_and_revoked,
        host_fences::fence_attach_host_flag_follows_host_fences,
        host_fences::host_fences_vgem_buffer_both_ways,
        host_fences::host_fences_udmabuf_both_ways,
        host_fences::host_fences_dma_heap_buffer_both_ways,
        lifetimes::vring_stop_cancels_that_queues_waiters_and_keeps_state,
        lifetimes::reset_session_releases_everything_the_guest_held,
        lifetimes::device_reset_releases_everything,
        lifetimes::reconnect_leaves_nothing_behind,
    ]
}

/// Scenarios for a daemon started with small quotas (a handful of objects,
/// attachments, contexts, fences, waiting requests and pending events):
/// they exhaust each quota. Against larger quotas they skip.
pub fn with_small_quotas() -> Vec<Scenario> {
    scenarios![
        limits::quotas_are_enospc_and_reported_by_get_info,
        host_side::events_beyond_the_pending_limit_become_one_overflow,
    ]
}

/// Scenarios for a daemon started with a short `--fence-timeout`
/// ([`DaemonSettings::fence_timeout`], at most 2 s).
pub fn with_short_fence_timeout() -> Vec<Scenario> {
    scenarios![
        limits::unsignalled_fence_times_out_after_fence_timeout,
        host_fences::host_fences_time_out_with_the_fence_timeout,
    ]
}

/// Runs every scenario (subject to the suite's filters) against `target`.
pub fn run_all(suite: &mut Suite, target: &Target) {
    for (name, scenario) in all() {
        suite.run(name, || scenario(target));
    }
}

// ---- helpers ----

const SETTLE: Duration = Duration::from_millis(200);

fn info(d: &Driver) -> Result<Info, Stop> {
    Ok(d.get_info()??)
}

fn page(d: &Driver) -> Result<u64, Stop> {
    Ok(u64::from(info(d)?.page_size))
}

fn create(d: &Driver, pages: u64, flags: u32) -> Result<u64, Stop> {
    let size = pages * page(d)?;
    let o = d.create(size, flags)??;
    ensure_eq!(o.size, size);
    Ok(o.object)
}

/// The capability must be live. If the front-end negotiated what it needs
/// (`negotiated`), its absence is a failure; otherwise the scenario skips.
fn need_cap(d: &Driver, cap: u32, name: &str, negotiated: bool) -> Result<Info, Stop> {
    let i = info(d)?;
    if i.caps & cap == 0 {
        if negotiated {
            return Err(Stop::Fail(format!(
                "the front-end negotiated what {name} needs, but GET_INFO caps {:#x} lack it",
                i.caps
            )));
        }
        skip!("capability {name} is not live (caps {:#x})", i.caps);
    }
    Ok(i)
}

/// The front-end acked SHMEM with the back-end channel and shows the
/// guest region 0.
fn shm_negotiated(vmm: &dyn Session) -> bool {
    vmm.capabilities().shm_size > 0
}

/// The front-end acked SHARED_OBJECT with the back-end channel, as far as
/// the guest can tell (a real VMM does not say: then only `GET_INFO` does).
fn shared_object_negotiated(vmm: &dyn Session) -> bool {
    vmm.capabilities().shared_object.unwrap_or(false)
}

/// One past the highest guest RAM address of the session.
fn ram_end(vmm: &dyn Session) -> u64 {
    vmm.ram_end()
}

/// A one-page object locked by a fresh context `a` and a LOCK of a second
/// context `b` parked behind it on the controlq: returns
/// `(object, a, b, parked)`.
fn parked_lock(d: &Driver) -> Result<(u64, u64, u64, Ticket), Stop> {
    let object = create(d, 1, 0)?;
    let (a, _) = d.acquire_init()??;
    let (b, _) = d.acquire_init()??;
    ensure_eq!(d.lock(a, object, 0)?, Ok(()));
    let parked = d.submit(CONTROLQ, &lock_request(b, object, 0))?;
    ensure!(!d.settle(&parked, SETTLE)?);
    Ok((object, a, b, parked))
}

fn raw_status(bytes: &[u8]) -> Option<(u32, u64)> {
    let h = virtio_dmabuf_protocol::wire::RawRespHdr::from_le_bytes(bytes)?;
    Some((h.status, h.tag))
}

fn total_len(m: &MapReply) -> u64 {
    m.entries.iter().map(|e| e.len).sum()
}

/// The next event on the eventq within `within`, decoded.
fn next_event(d: &Driver, within: Duration, what: &str) -> Result<Event, Stop> {
    let r = d
        .next_event(within)?
        .ok_or_else(|| Stop::Fail(format!("no event within {within:?}: expected {what}")))?;
    r.event.ok_or_else(|| {
        Stop::Fail(format!(
            "undecodable event {:?} (used.len {})",
            r.bytes, r.used_len
        ))
    })
}

/// The object with `uuid` as the host lists it (`ctl list`).
fn listed(host: &dyn HostControl, uuid: [u8; 16]) -> Result<crate::host::HostObject, Stop> {
    host.objects()
        .map_err(Stop::Fail)?
        .into_iter()
        .find(|o| o.uuid == uuid)
        .ok_or_else(|| Stop::Fail("the object is not in ctl list".into()))
}

/// A name for a host export no earlier run left behind.
fn export_name(prefix: &str) -> String {
    let mut name = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    name.truncate(virtio_dmabuf_protocol::NAME_LEN - 1);
    name
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
