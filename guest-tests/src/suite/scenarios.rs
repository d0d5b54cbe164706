//! End-to-end conformance scenarios: the device contract exercised from the
//! guest's side through a [`LoopbackVmm`] connected to a running daemon.
//!
//! Each scenario opens its own session (a fresh connection), so one
//! failure does not leak state into the next. A scenario that needs a
//! capability the target does not have (no shared memory, no shared
//! objects, no fences) skips with the reason.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_dmabuf_protocol::{
    attach_flags, caps, create_flags, encode_request, lock_flags, map_flags, AddressSpace,
    Direction, Event, EventType, FenceUsage, Info, MapReply, Opcode, Reply, Request, RequestHeader,
    Segment, Status, CONFIG_SIZE, CONTROLQ, EVENT_SIZE, INFO_SIZE, REQ_HDR_SIZE, RESP_HDR_SIZE,
};

use super::{Check, Stop, Suite};
use crate::driver::{
    begin_cpu_access_request, lock_request, reply_capacity, BatchItem, ChainLayout, Desc, Driver,
    RawChain, Ticket,
};
use crate::session::{read_device_config, FrontEnd, Loopback, Session, SessionError};
use crate::vmm::{LoopbackVmm, VmmOptions};
use crate::{ensure, ensure_eq, skip};

pub use crate::host::{ExportOptions, HostControl};

mod guests;
mod host_fences;
mod host_side;
mod limits;
mod locking;
mod programs;
mod vgem;

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

/// A scenario: a name and the function.
pub type Scenario = (&'static str, fn(&Target) -> Check);

/// Every scenario, in the order they run.
pub fn all() -> Vec<Scenario> {
    vec![
        (
            "config_space_matches_get_info",
            config_space_matches_get_info,
        ),
        (
            "framing_header_split_across_descriptors",
            framing_header_split_across_descriptors,
        ),
        (
            "framing_short_writable_part_gets_used_len_0",
            framing_short_writable_part_gets_used_len_0,
        ),
        (
            "framing_short_parts_are_einval",
            framing_short_parts_are_einval,
        ),
        (
            "framing_garbage_opcode_in_a_batch_is_enosys",
            framing_garbage_opcode_in_a_batch_is_enosys,
        ),
        (
            "framing_flags_reserved_and_enums_are_einval",
            framing_flags_reserved_and_enums_are_einval,
        ),
        (
            "framing_address_outside_guest_memory",
            framing_address_outside_guest_memory,
        ),
        (
            "requests_survive_any_descriptor_layout",
            requests_survive_any_descriptor_layout,
        ),
        (
            "object_lifecycle_create_attach_map_unmap_detach_release",
            object_lifecycle,
        ),
        (
            "release_and_detach_are_ebusy_while_in_use",
            release_and_detach_are_ebusy_while_in_use,
        ),
        ("handles_are_never_reused", handles_are_never_reused),
        (
            "attach_static_exporter_static_importer",
            attach_static_static,
        ),
        (
            "attach_static_exporter_dynamic_importer",
            attach_static_dynamic,
        ),
        (
            "attach_dynamic_exporter_static_importer",
            attach_dynamic_static,
        ),
        (
            "attach_dynamic_exporter_dynamic_importer",
            attach_dynamic_dynamic,
        ),
        (
            "cached_mapping_other_direction_is_ebusy",
            cached_mapping_other_direction_is_ebusy,
        ),
        (
            "map_overflow_reports_entries_needed",
            map_overflow_reports_entries_needed,
        ),
        (
            "lock_contention_parks_until_unlock",
            lock_contention_parks_until_unlock,
        ),
        (
            "lock_wait_die_younger_holder_gets_edeadlk",
            lock_wait_die_younger_holder_gets_edeadlk,
        ),
        ("cancel_ends_a_parked_request", cancel_ends_a_parked_request),
        (
            "parked_request_does_not_block_other_queues",
            parked_request_does_not_block_other_queues,
        ),
        (
            "transfer_round_trip_and_bounds",
            transfer_round_trip_and_bounds,
        ),
        (
            "shm_window_sees_transfers_both_ways",
            shm_window_sees_transfers_both_ways,
        ),
        (
            "shm_peer2peer_map_is_in_the_window",
            shm_peer2peer_map_is_in_the_window,
        ),
        (
            "without_shmem_map_shm_is_eopnotsupp",
            without_shmem_map_shm_is_eopnotsupp,
        ),
        (
            "guest_pages_objects_share_guest_memory",
            guest_pages_objects_share_guest_memory,
        ),
        (
            "fence_wait_parks_until_signal",
            fence_wait_parks_until_signal,
        ),
        (
            "shared_objects_resolve_locally",
            shared_objects_resolve_locally,
        ),
        (
            "shared_objects_export_and_lookup",
            shared_objects_export_and_lookup,
        ),
        (
            "without_shared_object_export_is_eopnotsupp",
            without_shared_object_export_is_eopnotsupp,
        ),
        (
            "eventq_move_notify_after_evict",
            eventq_move_notify_after_evict,
        ),
        ("host_export_open_and_revoke", host_export_open_and_revoke),
        (
            "two_guests_cannot_name_each_others_handles",
            guests::two_guests_cannot_name_each_others_handles,
        ),
        (
            "two_guests_export_for_one_guest_is_enoent_for_the_other",
            guests::two_guests_export_for_one_guest_is_enoent_for_the_other,
        ),
        (
            "two_guests_lock_contention_on_a_shared_export",
            guests::two_guests_lock_contention_on_a_shared_export,
        ),
        (
            "two_guests_disconnect_releases_the_lock",
            guests::two_guests_disconnect_releases_the_lock,
        ),
        (
            "lock_wait_die_three_context_cycle",
            locking::lock_wait_die_three_context_cycle,
        ),
        (
            "lock_waiter_dies_when_an_older_context_queues_ahead",
            locking::lock_waiter_dies_when_an_older_context_queues_ahead,
        ),
        (
            "lock_waiters_are_granted_oldest_first",
            locking::lock_waiters_are_granted_oldest_first,
        ),
        (
            "sync_table_in_the_daemon_record",
            host_side::sync_table_in_the_daemon_record,
        ),
        (
            "pin_blocks_eviction_until_unpin",
            host_side::pin_blocks_eviction_until_unpin,
        ),
        (
            "static_importer_pins_a_dynamic_exporter_until_detach",
            host_side::static_importer_pins_a_dynamic_exporter_until_detach,
        ),
        (
            "fence_wait_timeout_and_poll",
            limits::fence_wait_timeout_and_poll,
        ),
        (
            "importer_display_scans_out_frames",
            programs::importer_display_scans_out_frames,
        ),
        (
            "importer_gpu_renders_and_remaps_after_eviction",
            programs::importer_gpu_renders_and_remaps_after_eviction,
        ),
        (
            "importer_camera_reads_a_host_export",
            programs::importer_camera_reads_a_host_export,
        ),
        (
            "importer_blob_shared_by_uuid",
            programs::importer_blob_shared_by_uuid,
        ),
        (
            "vgem_buffer_opened_synced_evicted_and_revoked",
            vgem::vgem_buffer_opened_synced_evicted_and_revoked,
        ),
        (
            "fence_attach_host_flag_follows_host_fences",
            host_fences::fence_attach_host_flag_follows_host_fences,
        ),
        (
            "host_fences_vgem_buffer_both_ways",
            host_fences::host_fences_vgem_buffer_both_ways,
        ),
        (
            "host_fences_udmabuf_both_ways",
            host_fences::host_fences_udmabuf_both_ways,
        ),
        (
            "host_fences_dma_heap_buffer_both_ways",
            host_fences::host_fences_dma_heap_buffer_both_ways,
        ),
        (
            "vring_stop_cancels_waiting_and_keeps_state",
            vring_stop_cancels_waiting_and_keeps_state,
        ),
        (
            "reset_session_releases_everything",
            reset_session_releases_everything,
        ),
        (
            "device_reset_releases_everything",
            device_reset_releases_everything,
        ),
        (
            "reconnect_leaves_nothing_behind",
            reconnect_leaves_nothing_behind,
        ),
    ]
}

/// Scenarios for a daemon started with small quotas (a handful of objects,
/// attachments, contexts, fences, waiting requests and pending events):
/// they exhaust each quota. Against larger quotas they skip.
pub fn with_small_quotas() -> Vec<Scenario> {
    vec![
        (
            "quotas_are_enospc_and_reported_by_get_info",
            limits::quotas_are_enospc_and_reported_by_get_info,
        ),
        (
            "eventq_overflow_reports_dropped_events",
            host_side::eventq_overflow_reports_dropped_events,
        ),
    ]
}

/// Scenarios for a daemon started with a short `--fence-timeout`
/// ([`DaemonSettings::fence_timeout`], at most 2 s).
pub fn with_short_fence_timeout() -> Vec<Scenario> {
    vec![
        (
            "fence_timeout_signals_a_hung_fence",
            limits::fence_timeout_signals_a_hung_fence,
        ),
        (
            "host_fences_time_out_with_the_fence_timeout",
            host_fences::host_fences_time_out_with_the_fence_timeout,
        ),
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

// ---- section 3, 7.1 ----

fn config_space_matches_get_info(t: &Target) -> Check {
    let mut vmm = t.connect()?;
    let window = vmm.capabilities().config_window;
    let cfg = read_device_config(&mut *vmm)?;
    let i = info(vmm.driver())?;
    ensure_eq!(i.version, 1);
    ensure!(cfg.num_queues >= 2, "num_queues {}", cfg.num_queues);
    ensure_eq!(i.num_queues, cfg.num_queues);
    ensure_eq!(u64::from(cfg.num_queues), vmm.capabilities().queue_num);
    if window < CONFIG_SIZE as u32 {
        // A stand-in device shows only the first fields (section 1); the
        // rest is checked against GET_INFO alone.
        ensure!(window >= 8, "config window of {window} bytes");
        ensure_eq!(i.page_size, cfg.page_size);
        ensure!(i.page_size >= 4096 && i.page_size.is_power_of_two());
        ensure_eq!(i.caps & caps::HOST_SHM, 0, "a stand-in has no region");
        ensure_eq!(i.shm_size, 0);
        return Ok(());
    }
    ensure!(cfg.page_size >= 4096 && cfg.page_size.is_power_of_two());
    ensure_eq!(i.page_size, cfg.page_size);
    ensure_eq!(i.max_segments, cfg.max_segments);
    // shm_size is what is live: the region when SHMEM and the back-end
    // channel were negotiated, else zero.
    let live = vmm.capabilities().shm_size;
    ensure_eq!(cfg.shm_size, live);
    ensure_eq!(i.shm_size, cfg.shm_size);
    ensure_eq!(i.caps & caps::HOST_SHM != 0, cfg.shm_size != 0);
    // A longer read has the requested size, zero past the structure.
    let long = vmm.read_config(0, 64)?;
    ensure_eq!(long.len(), 64);
    ensure_eq!(&long[..24], &cfg.to_bytes()[..]);
    ensure!(long[24..].iter().all(|&b| b == 0));
    let tail = vmm.read_config(16, 16)?;
    ensure_eq!(&tail[..8], &cfg.to_bytes()[16..24]);
    Ok(())
}

// ---- section 4: framing ----

fn framing_header_split_across_descriptors(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let bytes = encode_request(0xfeed, &Request::GetInfo);
    for cuts in [&[1usize][..], &[3, 4, 12], &[8], &[15], &[0, 16]] {
        let chain = RawChain::split(&bytes, cuts, &[1, 7, 8, INFO_SIZE as u32]);
        let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
        ensure_eq!(
            c.used_len as usize,
            RESP_HDR_SIZE + INFO_SIZE,
            "cuts {cuts:?}"
        );
        let (tag, r) = virtio_dmabuf_protocol::decode_response(Opcode::GetInfo, &c.written)
            .map_err(|e| Stop::Fail(e.to_string()))?;
        ensure_eq!(tag, 0xfeed);
        ensure!(matches!(r, Ok(Reply::Info(_))), "{r:?}");
    }
    // A CREATE whose le64 size is cut in the middle.
    let size = page(d)?;
    let req = Request::Create {
        size,
        dynamic: false,
        cache_mapping: false,
        guest_pages: None,
    };
    let bytes = encode_request(0xbeef, &req);
    let chain = RawChain::split(&bytes, &[REQ_HDR_SIZE + 3], &[10, 46]);
    let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
    let r = crate::driver::check_response(Opcode::Create, 0xbeef, &c)?;
    let Ok(Reply::Object(o)) = r else {
        return Err(Stop::Fail(format!("{r:?}")));
    };
    ensure_eq!(o.size, size);
    ensure_eq!(d.release(o.object)?, Ok(()));
    Ok(())
}

fn framing_short_writable_part_gets_used_len_0(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let bytes = encode_request(1, &Request::GetInfo);
    for writable in [&[][..], &[15u32][..], &[7, 8]] {
        let mut chain = RawChain::new().readable(bytes.clone());
        for &w in writable {
            chain = chain.writable(w);
        }
        let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
        ensure_eq!(c.used_len, 0, "writable {writable:?}");
    }
    // The device keeps serving.
    info(d)?;
    Ok(())
}

fn framing_short_parts_are_einval(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    // Readable part shorter than the header: EINVAL, header only.
    let c = d.complete_raw(d.submit_raw(
        CONTROLQ,
        RawChain::new().readable(vec![1, 0, 0]).writable(64),
    )?)?;
    ensure_eq!(c.used_len as usize, RESP_HDR_SIZE);
    ensure_eq!(
        raw_status(&c.written).map(|s| s.0),
        Some(Status::Inval as u32)
    );
    // ATTACH with 4 of its 8 payload bytes: EINVAL, tag echoed.
    let mut bytes = encode_request(
        0x44,
        &Request::Attach {
            object: 1,
            dynamic_importer: false,
            peer2peer: false,
        },
    );
    bytes.truncate(REQ_HDR_SIZE + 4);
    let c =
        d.complete_raw(d.submit_raw(CONTROLQ, RawChain::new().readable(bytes).writable(64))?)?;
    ensure_eq!(c.used_len as usize, RESP_HDR_SIZE);
    ensure_eq!(raw_status(&c.written), Some((Status::Inval as u32, 0x44)));
    // GET_INFO with room for the header but not the 80-byte reply.
    let t2 = d.submit_sized(
        CONTROLQ,
        0x45,
        &Request::GetInfo,
        RESP_HDR_SIZE + INFO_SIZE - 1,
    )?;
    ensure_eq!(d.complete(t2)?, Err(Status::Inval));
    Ok(())
}

fn framing_garbage_opcode_in_a_batch_is_enosys(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let garbage = |opcode: u32, tag: u64| {
        let mut b = RequestHeader {
            opcode,
            flags: 0,
            tag,
        }
        .to_bytes()
        .to_vec();
        b.extend_from_slice(&[0xa5; 24]);
        BatchItem::raw(RawChain::new().readable(b).writable(64))
    };
    let size = page(d)?;
    let create = Request::Create {
        size,
        dynamic: false,
        cache_mapping: false,
        guest_pages: None,
    };
    let items = vec![
        d.typed_item(0x10, &Request::GetInfo, reply_capacity(&Request::GetInfo)),
        garbage(0xdead_beef, 0x11),
        d.typed_item(0x12, &create, reply_capacity(&create)),
        garbage(0, 0x13),
        garbage(0x0106, 0x14),
        d.typed_item(0x15, &Request::GetInfo, reply_capacity(&Request::GetInfo)),
    ];
    let tickets = d.submit_batch(CONTROLQ, &items)?;
    let mut object = None;
    for t in tickets {
        let tag = t.tag();
        if t.opcode().is_some() {
            let r = d.complete(t)?;
            if let Ok(Reply::Object(o)) = &r {
                object = Some(o.object);
            }
            ensure!(r.is_ok(), "tag {tag:#x}: {r:?}");
        } else {
            let c = d.complete_raw(t)?;
            ensure_eq!(c.used_len as usize, RESP_HDR_SIZE, "tag {tag:#x}");
            ensure_eq!(raw_status(&c.written), Some((Status::NoSys as u32, tag)));
        }
    }
    if let Some(o) = object {
        ensure_eq!(d.release(o)?, Ok(()));
    }
    Ok(())
}

fn framing_flags_reserved_and_enums_are_einval(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let object = create(d, 1, 0)?;
    let send_raw = |bytes: Vec<u8>| -> Result<Option<(u32, u64)>, Stop> {
        let c =
            d.complete_raw(d.submit_raw(CONTROLQ, RawChain::new().readable(bytes).writable(64))?)?;
        ensure_eq!(c.used_len as usize, RESP_HDR_SIZE);
        Ok(raw_status(&c.written))
    };
    let einval = Some((Status::Inval as u32, 0x21));
    // Unknown flag bit on RELEASE.
    let mut b = encode_request(0x21, &Request::Release { object });
    b[4..8].copy_from_slice(&0x80u32.to_le_bytes());
    ensure_eq!(send_raw(b)?, einval);
    // Reserved field of BEGIN_CPU_ACCESS.
    let begin = encode_request(0x21, &begin_cpu_access_request(object, Direction::ToDevice));
    let mut b = begin.clone();
    b[REQ_HDR_SIZE + 12..REQ_HDR_SIZE + 16].copy_from_slice(&1u32.to_le_bytes());
    ensure_eq!(send_raw(b)?, einval);
    // dir = NONE (3).
    let mut b = begin;
    b[REQ_HDR_SIZE + 8..REQ_HDR_SIZE + 12].copy_from_slice(&3u32.to_le_bytes());
    ensure_eq!(send_raw(b)?, einval);
    // DYNAMIC with CACHE_MAPPING, and GUEST_PAGES entries without the flag.
    ensure_eq!(
        d.create(
            page(d)?,
            create_flags::DYNAMIC | create_flags::CACHE_MAPPING
        )?,
        Err(Status::Inval)
    );
    let mut b = encode_request(
        0x21,
        &Request::Create {
            size: page(d)?,
            dynamic: false,
            cache_mapping: false,
            guest_pages: None,
        },
    );
    b[REQ_HDR_SIZE + 8..REQ_HDR_SIZE + 12].copy_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&[0; 16]);
    ensure_eq!(send_raw(b)?, einval);
    // Sizes that are not a non-zero page multiple.
    ensure_eq!(d.create(0, 0)?, Err(Status::Inval));
    ensure_eq!(d.create(page(d)? + 1, 0)?, Err(Status::Inval));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

fn framing_address_outside_guest_memory(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let ram_end = ram_end(&vmm);
    let far = ram_end + (1 << 30);
    let bytes = encode_request(0x31, &Request::GetInfo);
    // Readable part outside guest memory: EFAULT if the device can answer,
    // else used.len 0; never a crash.
    let chain = RawChain::new()
        .at(Desc {
            addr: far,
            len: 16,
            write: false,
        })
        .writable(96);
    let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
    ensure!(
        c.used_len == 0
            || (c.used_len as usize == RESP_HDR_SIZE
                && raw_status(&c.written).map(|s| s.0) == Some(Status::Fault as u32)),
        "used.len {} status {:?}",
        c.used_len,
        raw_status(&c.written)
    );
    // Writable part outside: nothing can be written.
    let chain = RawChain::new().readable(bytes).at(Desc {
        addr: far,
        len: 96,
        write: true,
    });
    let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
    ensure_eq!(c.used_len, 0);
    // A range that starts inside and runs past the end.
    let chain = RawChain::new()
        .at(Desc {
            addr: ram_end - 8,
            len: 16,
            write: false,
        })
        .writable(96);
    let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
    ensure!(c.used_len == 0 || raw_status(&c.written).map(|s| s.0) == Some(Status::Fault as u32));
    info(d)?;
    Ok(())
}

fn requests_survive_any_descriptor_layout(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let mut layouts = vec![
        ChainLayout {
            max_desc_len: Some(3),
            first_desc_len: None,
            indirect: false,
        },
        ChainLayout {
            max_desc_len: Some(16),
            first_desc_len: Some(5),
            indirect: false,
        },
    ];
    if d.config().indirect {
        layouts.push(ChainLayout {
            max_desc_len: None,
            first_desc_len: Some(7),
            indirect: true,
        });
        layouts.push(ChainLayout {
            max_desc_len: Some(5),
            first_desc_len: None,
            indirect: true,
        });
    }
    for layout in layouts {
        d.set_chain_layout(layout);
        let object = create(d, 1, 0)?;
        let data: Vec<u8> = (0..40u8).collect();
        ensure_eq!(d.transfer_to_host(object, 8, &data)?, Ok(()), "{layout:?}");
        ensure_eq!(d.transfer_from_host(object, 8, 40)?, Ok(data), "{layout:?}");
        let a = d.attach(object, 0)??;
        let m = d.map(a, Direction::ToDevice, 16, 0)??;
        ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
        ensure_eq!(d.detach(a)?, Ok(()));
        ensure_eq!(d.release(object)?, Ok(()));
    }
    Ok(())
}

// ---- sections 7.2, 7.3 ----

fn object_lifecycle(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let pg = page(d)?;
    let o = d.create(4 * pg, 0)??;
    ensure!(o.object != 0);
    ensure_eq!(o.size, 4 * pg);
    ensure!(o.obj_flags & virtio_dmabuf_protocol::obj_flags::WRITABLE != 0);
    ensure_eq!(uuid::Uuid::from_bytes(o.uuid).get_version_num(), 4);
    // Host placement is zero-filled.
    ensure_eq!(d.transfer_from_host(o.object, 0, 64)?, Ok(vec![0u8; 64]));
    let a = d.attach(o.object, 0)??;
    let m = d.map(a, Direction::ToDevice, 64, 0)??;
    ensure_eq!(
        m.space,
        AddressSpace::Object,
        "no MAP_SHM: offsets in the object"
    );
    ensure_eq!(total_len(&m), 4 * pg);
    ensure_eq!(m.map_flags & map_flags::CACHED, 0);
    ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
    ensure_eq!(d.unmap(m.mapping, 0)?, Err(Status::NoEnt));
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.detach(a)?, Err(Status::NoEnt));
    ensure_eq!(d.release(o.object)?, Ok(()));
    ensure_eq!(d.release(o.object)?, Err(Status::NoEnt));
    ensure_eq!(d.attach(o.object, 0)?, Err(Status::NoEnt));
    Ok(())
}

fn release_and_detach_are_ebusy_while_in_use(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let object = create(d, 1, 0)?;
    let a = d.attach(object, 0)??;
    ensure_eq!(d.release(object)?, Err(Status::Busy));
    let m = d.map(a, Direction::FromDevice, 8, 0)??;
    ensure_eq!(d.detach(a)?, Err(Status::Busy));
    ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

fn handles_are_never_reused(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        let o = create(d, 1, 0)?;
        ensure!(seen.insert(o), "handle {o} reused");
        ensure_eq!(d.release(o)?, Ok(()));
    }
    Ok(())
}

/// Checks one exporter/importer combination (section 7.3).
fn attach_case(t: &Target, dynamic_exporter: bool, dynamic_importer: bool) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let object = create(
        d,
        2,
        if dynamic_exporter {
            create_flags::DYNAMIC
        } else {
            0
        },
    )?;
    let flags = if dynamic_importer {
        attach_flags::DYNAMIC_IMPORTER
    } else {
        0
    };
    let a = d.attach(object, flags)??;
    let disagree = dynamic_exporter != dynamic_importer;
    for dir in [
        Direction::ToDevice,
        Direction::FromDevice,
        Direction::Bidirectional,
    ] {
        let m = d.map(a, dir, 16, 0)??;
        ensure_eq!(
            m.map_flags & map_flags::CACHED != 0,
            disagree,
            "{dir:?}: cached iff they disagree"
        );
        // Pinned: a static exporter never moves; a dynamic one is pinned
        // for a static importer's attachment.
        let pinned = !dynamic_exporter || !dynamic_importer;
        ensure_eq!(
            m.map_flags & map_flags::PINNED != 0,
            pinned,
            "{dir:?}: PINNED"
        );
        ensure_eq!(total_len(&m), 2 * page(d)?);
        ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
    }
    if dynamic_importer {
        // PIN/UNPIN count; on a static exporter they are no-ops.
        ensure_eq!(d.pin(a, 0)?, Ok(()));
        let m = d.map(a, Direction::ToDevice, 16, 0)??;
        ensure!(
            m.map_flags & map_flags::PINNED != 0,
            "a pinned attachment's map is PINNED"
        );
        ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
        ensure_eq!(d.unpin(a, 0)?, Ok(()));
        if dynamic_exporter {
            ensure_eq!(d.unpin(a, 0)?, Err(Status::Inval), "UNPIN below zero");
        } else {
            ensure_eq!(d.unpin(a, 0)?, Ok(()), "no-op on a static exporter");
        }
    } else {
        ensure_eq!(
            d.pin(a, 0)?,
            Err(Status::Inval),
            "static importers cannot pin"
        );
        let (ctx, _) = d.acquire_init()??;
        ensure_eq!(
            d.map(a, Direction::ToDevice, 16, ctx)?,
            Err(Status::Inval),
            "static importer with a ctx"
        );
        ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    }
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

fn attach_static_static(t: &Target) -> Check {
    attach_case(t, false, false)
}
fn attach_static_dynamic(t: &Target) -> Check {
    attach_case(t, false, true)
}
fn attach_dynamic_static(t: &Target) -> Check {
    attach_case(t, true, false)
}
fn attach_dynamic_dynamic(t: &Target) -> Check {
    attach_case(t, true, true)
}

fn cached_mapping_other_direction_is_ebusy(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let object = create(d, 1, create_flags::CACHE_MAPPING)?;
    let a = d.attach(object, 0)??;
    // The first MAP is fresh and becomes the cached mapping, TO_DEVICE.
    let m = d.map(a, Direction::ToDevice, 8, 0)??;
    ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
    let again = d.map(a, Direction::ToDevice, 8, 0)??;
    ensure!(
        again.map_flags & map_flags::CACHED != 0,
        "second MAP returns the cache"
    );
    ensure_eq!(d.unmap(again.mapping, 0)?, Ok(()));
    ensure_eq!(d.map(a, Direction::FromDevice, 8, 0)?, Err(Status::Busy));
    ensure_eq!(d.map(a, Direction::Bidirectional, 8, 0)?, Err(Status::Busy));
    ensure_eq!(d.detach(a)?, Ok(()));
    // Disagreement caches BIDIRECTIONAL: every direction is served.
    let b = d.attach(object, attach_flags::DYNAMIC_IMPORTER)??;
    for dir in [
        Direction::FromDevice,
        Direction::ToDevice,
        Direction::Bidirectional,
    ] {
        let m = d.map(b, dir, 8, 0)??;
        ensure!(m.map_flags & map_flags::CACHED != 0);
        ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
    }
    ensure_eq!(d.detach(b)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

fn map_overflow_reports_entries_needed(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let object = create(d, 1, 0)?;
    let a = d.attach(object, 0)??;
    let r = d.call(&Request::Map {
        attachment: a,
        dir: Direction::ToDevice,
        max_entries: 0,
        ctx: 0,
    })?;
    let Ok(Reply::MapOverflow { needed }) = r else {
        return Err(Stop::Fail(format!("MAP with max_entries 0: {r:?}")));
    };
    ensure!(needed >= 1);
    // No mapping was made: DETACH is not busy.
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

// ---- section 7.4 ----

fn lock_contention_parks_until_unlock(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let object = create(d, 1, 0)?;
    let (a, _) = d.acquire_init()??;
    let (b, _) = d.acquire_init()??;
    let (c, _) = d.acquire_init()??;
    ensure_eq!(d.lock(a, object, 0)?, Ok(()));
    ensure_eq!(d.lock(a, object, 0)?, Err(Status::Already));
    ensure_eq!(d.lock(c, object, lock_flags::TRY)?, Err(Status::Busy));
    ensure_eq!(d.unlock(c, object)?, Err(Status::Perm));
    let parked = d.submit(CONTROLQ, &lock_request(b, object, 0))?;
    ensure!(
        !d.settle(&parked, SETTLE)?,
        "LOCK on a held object must wait"
    );
    // The context has a waiting request: anything else naming it is EBUSY.
    ensure_eq!(d.lock(b, object, lock_flags::TRY)?, Err(Status::Busy));
    ensure_eq!(
        d.acquire_fini(a)?,
        Err(Status::Busy),
        "FINI while holding a lock"
    );
    ensure_eq!(d.unlock(a, object)?, Ok(()));
    ensure_eq!(d.complete(parked)?, Ok(Reply::Empty));
    ensure_eq!(d.unlock(b, object)?, Ok(()));
    for ctx in [a, b, c] {
        ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    }
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

fn lock_wait_die_younger_holder_gets_edeadlk(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let x = create(d, 1, 0)?;
    let y = create(d, 1, 0)?;
    let (old, s_old) = d.acquire_init()??;
    let (young, s_young) = d.acquire_init()??;
    ensure!(s_old < s_young, "stamps grow: {s_old} then {s_young}");
    ensure_eq!(d.lock(old, x, 0)?, Ok(()));
    ensure_eq!(d.lock(young, y, 0)?, Ok(()));
    // Younger, holding a lock, contends with an older holder: dies at once.
    ensure_eq!(d.lock(young, x, 0)?, Err(Status::Deadlk));
    // SLOW while holding a lock is EINVAL.
    ensure_eq!(d.lock(young, x, lock_flags::SLOW)?, Err(Status::Inval));
    // Older contends with the younger holder: waits.
    let parked = d.submit(CONTROLQ, &lock_request(old, y, 0))?;
    ensure!(!d.settle(&parked, SETTLE)?, "the older context must wait");
    // The younger backs off; the older gets Y.
    ensure_eq!(d.unlock(young, y)?, Ok(()));
    ensure_eq!(d.complete(parked)?, Ok(Reply::Empty));
    // Holding nothing, SLOW waits like a plain LOCK.
    let slow = d.submit(CONTROLQ, &lock_request(young, x, lock_flags::SLOW))?;
    ensure!(!d.settle(&slow, SETTLE)?);
    ensure_eq!(d.unlock(old, x)?, Ok(()));
    ensure_eq!(d.complete(slow)?, Ok(Reply::Empty));
    ensure_eq!(d.unlock(young, x)?, Ok(()));
    ensure_eq!(d.unlock(old, y)?, Ok(()));
    ensure_eq!(d.acquire_fini(old)?, Ok(()));
    ensure_eq!(d.acquire_fini(young)?, Ok(()));
    ensure_eq!(d.release(x)?, Ok(()));
    ensure_eq!(d.release(y)?, Ok(()));
    Ok(())
}

fn cancel_ends_a_parked_request(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let (object, a, b, parked) = parked_lock(d)?;
    let tag = parked.tag();
    ensure_eq!(d.cancel(tag)?, Ok(()));
    ensure_eq!(d.complete(parked)?, Err(Status::Canceled));
    ensure_eq!(d.cancel(tag)?, Err(Status::NoEnt));
    // ACQUIRE_FINI ends a context's waiting request too.
    let parked = d.submit(CONTROLQ, &lock_request(b, object, 0))?;
    ensure!(!d.settle(&parked, SETTLE)?);
    ensure_eq!(d.acquire_fini(b)?, Ok(()));
    ensure_eq!(d.complete(parked)?, Err(Status::Canceled));
    ensure_eq!(d.unlock(a, object)?, Ok(()));
    ensure_eq!(d.acquire_fini(a)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

fn parked_request_does_not_block_other_queues(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let queues = d.request_queues();
    let Some(&other) = queues.iter().find(|&&q| q != CONTROLQ) else {
        skip!("the daemon has one request queue (--queues 1)")
    };
    let (object, a, b, parked) = parked_lock(d)?;
    for &q in &queues {
        ensure!(
            d.call_on(q, &Request::GetInfo)?.is_ok(),
            "queue {q} serves while queue 0 has a parked LOCK"
        );
    }
    // The UNLOCK on another queue completes the LOCK on the controlq.
    ensure_eq!(
        d.call_on(other, &Request::Unlock { ctx: a, object })?,
        Ok(Reply::Empty)
    );
    ensure_eq!(d.complete(parked)?, Ok(Reply::Empty));
    ensure_eq!(
        d.call_on(other, &Request::Unlock { ctx: b, object })?,
        Ok(Reply::Empty)
    );
    ensure_eq!(d.acquire_fini(a)?, Ok(()));
    ensure_eq!(d.acquire_fini(b)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

// ---- section 7.5 ----

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn transfer_round_trip_and_bounds(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let pg = page(d)?;
    let object = create(d, 4, 0)?;
    let data = pattern(2 * pg as usize + 17, 3);
    ensure_eq!(d.transfer_to_host(object, pg - 9, &data)?, Ok(()));
    ensure_eq!(
        d.transfer_from_host(object, pg - 9, data.len() as u64)?,
        Ok(data)
    );
    ensure_eq!(
        d.transfer_to_host(object, 4 * pg - 1, &[1, 2])?,
        Err(Status::Inval)
    );
    ensure_eq!(d.transfer_from_host(object, 4 * pg, 1)?, Err(Status::Inval));
    ensure_eq!(
        d.transfer_from_host(object, u64::MAX - 3, 8)?,
        Err(Status::Inval)
    );
    ensure_eq!(d.transfer_from_host(12345678, 0, 8)?, Err(Status::NoEnt));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

fn shm_window_sees_transfers_both_ways(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    need_cap(d, caps::HOST_SHM, "HOST_SHM", shm_negotiated(&vmm))?;
    // The front-end's side of the window, where it is this process.
    let shm = vmm.loopback().and_then(LoopbackVmm::shm);
    let pg = page(d)?;
    let object = create(d, 2, 0)?;
    let (off, len) = d.map_shm(object, true)??;
    ensure_eq!(len, 2 * pg);
    ensure_eq!(off % pg, 0);
    if let Some(shm) = shm {
        ensure!(
            shm.mappings()
                .iter()
                .any(|m| m.offset == off && m.len == len && m.writable),
            "{:?}",
            shm.mappings()
        );
    }
    // Written by TRANSFER, read through the window.
    let a = pattern(2 * pg as usize, 7);
    ensure_eq!(d.transfer_to_host(object, 0, &a)?, Ok(()));
    ensure_eq!(vmm.shm_read(off, a.len())?, a);
    // Written through the window, read by TRANSFER.
    let b = pattern(100, 99);
    vmm.shm_write(off + pg - 50, &b)?;
    ensure_eq!(d.transfer_from_host(object, pg - 50, 100)?, Ok(b.clone()));
    // One window mapping per object; a different writability is EBUSY.
    ensure_eq!(d.map_shm(object, false)?, Err(Status::Busy));
    ensure_eq!(
        d.map_shm(object, true)?,
        Ok((off, len)),
        "counted per use, same offset"
    );
    ensure_eq!(d.unmap_shm(object)?, Ok(()));
    if let Some(shm) = shm {
        ensure!(
            shm.mappings().iter().any(|m| m.offset == off),
            "still used once"
        );
    }
    // Still mapped: the bytes are there.
    ensure_eq!(vmm.shm_read(off + pg - 50, 100)?, b);
    ensure_eq!(d.unmap_shm(object)?, Ok(()));
    if let Some(shm) = shm {
        ensure!(
            shm.mappings().iter().all(|m| m.offset != off),
            "window mapping removed"
        );
    }
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

fn shm_peer2peer_map_is_in_the_window(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    need_cap(d, caps::HOST_SHM, "HOST_SHM", shm_negotiated(&vmm))?;
    let object = create(d, 2, 0)?;
    let (off, len) = d.map_shm(object, true)??;
    let a = d.attach(object, attach_flags::PEER2PEER)??;
    let m = d.map(a, Direction::Bidirectional, 16, 0)??;
    ensure_eq!(m.space, AddressSpace::Shm);
    ensure_eq!(total_len(&m), len);
    ensure!(
        m.entries
            .iter()
            .all(|e| e.addr >= off && e.addr + e.len <= off + len),
        "{m:?}"
    );
    ensure_eq!(
        d.unmap_shm(object)?,
        Err(Status::Busy),
        "an SHM mapping is outstanding"
    );
    ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.unmap_shm(object)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

fn without_shmem_map_shm_is_eopnotsupp(t: &Target) -> Check {
    let vmm = t.connect_with(|o| o.shmem = false)?;
    let d = vmm.driver();
    let i = info(d)?;
    ensure_eq!(i.caps & caps::HOST_SHM, 0);
    ensure_eq!(i.shm_size, 0);
    let object = create(d, 1, 0)?;
    ensure_eq!(d.map_shm(object, true)?, Err(Status::NotSupported));
    // TRANSFER is the fallback and works.
    ensure_eq!(d.transfer_to_host(object, 0, b"fallback")?, Ok(()));
    ensure_eq!(
        d.transfer_from_host(object, 0, 8)?,
        Ok(b"fallback".to_vec())
    );
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

fn guest_pages_objects_share_guest_memory(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    need_cap(d, caps::GUEST_PAGES, "GUEST_PAGES", true)?;
    let pg = page(d)?;
    let p1 = d.pool().alloc(pg, pg)?;
    let p2 = d.pool().alloc(2 * pg, pg)?;
    let entries = [
        Segment {
            addr: p2.gpa,
            len: 2 * pg,
        },
        Segment {
            addr: p1.gpa,
            len: pg,
        },
    ];
    let data = pattern(3 * pg as usize, 5);
    d.memory().write(p2.gpa, &data[..2 * pg as usize])?;
    d.memory().write(p1.gpa, &data[2 * pg as usize..])?;
    let o = d.create_guest(3 * pg, false, &entries)??;
    ensure!(o.obj_flags & virtio_dmabuf_protocol::obj_flags::GUEST_PAGES != 0);
    // The object is the guest's pages, in list order.
    ensure_eq!(d.transfer_from_host(o.object, 0, 3 * pg)?, Ok(data));
    ensure_eq!(d.transfer_to_host(o.object, 2 * pg, b"via host")?, Ok(()));
    let mut seen = [0u8; 8];
    d.memory().read(p1.gpa, &mut seen)?;
    ensure_eq!(&seen, b"via host");
    let a = d.attach(o.object, 0)??;
    let m = d.map(a, Direction::ToDevice, 16, 0)??;
    ensure_eq!(m.space, AddressSpace::GuestPhys);
    ensure_eq!(total_len(&m), 3 * pg);
    ensure_eq!(m.entries.first().map(|e| e.addr), Some(p2.gpa));
    ensure_eq!(d.map_shm(o.object, false)?, Err(Status::NotSupported));
    ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.release(o.object)?, Ok(()));
    // Bad lists: unaligned, sum differs from size, outside guest RAM.
    let bad = [Segment {
        addr: p1.gpa + 8,
        len: pg,
    }];
    ensure_eq!(d.create_guest(pg, false, &bad)?, Err(Status::Inval));
    ensure_eq!(
        d.create_guest(
            2 * pg,
            false,
            &[Segment {
                addr: p1.gpa,
                len: pg
            }]
        )?,
        Err(Status::Inval)
    );
    let far = ram_end(&vmm) + (1 << 30);
    // Section 7.2 lists "inside guest RAM" among the EINVAL conditions of
    // CREATE, section 4/5 make an address outside guest memory EFAULT: both
    // readings are accepted (docs/guest-tests.md).
    let outside = d.create_guest(pg, false, &[Segment { addr: far, len: pg }])?;
    ensure!(
        outside == Err(Status::Inval) || outside == Err(Status::Fault),
        "entries outside guest RAM: {outside:?}"
    );
    d.pool().free(p1);
    d.pool().free(p2);
    Ok(())
}

// ---- section 7.6 ----

fn fence_wait_parks_until_signal(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    need_cap(d, caps::FENCES, "FENCES", false)?;
    let object = create(d, 1, 0)?;
    let (ctx, _) = d.acquire_init()??;
    ensure_eq!(
        d.fence_attach(ctx, object, FenceUsage::Write)?,
        Err(Status::Perm),
        "needs the lock"
    );
    ensure_eq!(d.lock(ctx, object, 0)?, Ok(()));
    let fence = d.fence_attach(ctx, object, FenceUsage::Write)??;
    ensure_eq!(
        d.wait(object, FenceUsage::Write, 0)?,
        Err(Status::TimedOut),
        "poll"
    );
    ensure_eq!(
        d.wait(object, FenceUsage::Kernel, 0)?,
        Ok(()),
        "no KERNEL fence"
    );
    let waiting = d.submit(
        CONTROLQ,
        &Request::Wait {
            object,
            usage: FenceUsage::Read,
            timeout_ns: 3_000_000_000,
        },
    )?;
    ensure!(!d.settle(&waiting, SETTLE)?);
    ensure_eq!(d.fence_signal(fence, 0)?, Ok(()));
    ensure_eq!(d.complete(waiting)?, Ok(Reply::Empty));
    ensure_eq!(d.unlock(ctx, object)?, Ok(()));
    ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

// ---- shared objects (section 7.2) ----

/// A one-page object published with `EXPORT_UUID`, or a skip where shared
/// objects are not live (or memfd objects may not be published).
fn exported_object(vmm: &dyn Session) -> Result<(u64, [u8; 16]), Stop> {
    let d = vmm.driver();
    need_cap(
        d,
        caps::SHARED_OBJECTS,
        "SHARED_OBJECTS",
        shared_object_negotiated(vmm),
    )?;
    let object = create(d, 1, 0)?;
    let uuid = match d.export_uuid(object)? {
        Ok(u) => u,
        Err(Status::NotSupported) => {
            skip!("EXPORT_UUID needs a REAL_DMABUF object or --allow-memfd-shared-objects")
        }
        Err(s) => return Err(Stop::Fail(format!("EXPORT_UUID: {s}"))),
    };
    Ok((object, uuid))
}

/// `EXPORT_UUID` and `OPEN BY_UUID` of the guest's own UUID, on any
/// front-end: the UUID resolves locally, an unknown one is `ENOENT`, and the
/// UUID dies with the object.
fn shared_objects_resolve_locally(t: &Target) -> Check {
    let vmm = t.connect()?;
    let (object, uuid) = exported_object(&vmm)?;
    let d = vmm.driver();
    ensure_eq!(d.export_uuid(object)?, Ok(uuid), "one UUID per object");
    let o = d.open_by_uuid(uuid)??;
    ensure_eq!(o.object, object);
    ensure_eq!(d.release(object)?, Ok(()), "drops the OPEN reference");
    ensure_eq!(
        d.open_by_uuid(*uuid::Uuid::new_v4().as_bytes())?,
        Err(Status::NoEnt)
    );
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

fn shared_objects_export_and_lookup(t: &Target) -> Check {
    let mut vmm = t.connect_loopback()?;
    let (object, uuid) = exported_object(&vmm)?;
    let uuid = uuid::Uuid::from_bytes(uuid);
    ensure!(
        vmm.backend_shared_objects().contains(&uuid),
        "SHARED_OBJECT_ADD sent"
    );
    // The front-end can get the fd back (GET_SHARED_OBJECT).
    let file = vmm.get_shared_object(uuid)?;
    let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))
        .map_err(|e| Stop::Fail(e.to_string()))?;
    let d = vmm.driver();
    ensure_eq!(size, page(d)?);
    // Our own UUID resolves locally to the same handle.
    let o = d.open_by_uuid(*uuid.as_bytes())??;
    ensure_eq!(o.object, object);
    ensure_eq!(d.release(object)?, Ok(()), "drops the OPEN reference");
    // Another device's object whose size is not a page multiple: EIO.
    let odd = uuid::Uuid::new_v4();
    let file =
        crate::vmm::shm::memfd_with("odd", &[1u8; 100]).map_err(|e| Stop::Fail(e.to_string()))?;
    vmm.publish_shared_object(odd, file.into());
    let d = vmm.driver();
    ensure_eq!(d.open_by_uuid(*odd.as_bytes())?, Err(Status::Io));
    // Unknown UUIDs (the front-end's LOOKUP fails) are ENOENT.
    ensure_eq!(
        d.open_by_uuid(*uuid::Uuid::new_v4().as_bytes())?,
        Err(Status::NoEnt)
    );
    ensure_eq!(d.release(object)?, Ok(()));
    // The object died: SHARED_OBJECT_REMOVE.
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        !vmm.backend_shared_objects().contains(&uuid)
    });
    ensure!(gone, "SHARED_OBJECT_REMOVE after the last release");
    Ok(())
}

fn without_shared_object_export_is_eopnotsupp(t: &Target) -> Check {
    let vmm = t.connect_with(|o| o.shared_object = false)?;
    let d = vmm.driver();
    let i = info(d)?;
    ensure_eq!(i.caps & caps::SHARED_OBJECTS, 0);
    let object = create(d, 1, 0)?;
    ensure_eq!(d.export_uuid(object)?, Err(Status::NotSupported));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

// ---- section 8 ----

fn eventq_move_notify_after_evict(t: &Target) -> Check {
    let host = t.host()?;
    let vmm = t.connect()?;
    let d = vmm.driver();
    // Nothing happens: posted buffers stay with the device.
    d.post_event_buffers(1, 16)?;
    d.post_event_buffers(2, EVENT_SIZE as u32)?;
    ensure!(d.next_event(SETTLE)?.is_none(), "no event without a cause");
    let o = d.create(page(d)?, create_flags::DYNAMIC)??;
    let a = d.attach(o.object, attach_flags::DYNAMIC_IMPORTER)??;
    let before = d.map(a, Direction::ToDevice, 8, 0)??;
    ensure_eq!(d.unmap(before.mapping, 0)?, Ok(()));
    host.evict(o.uuid).map_err(Stop::Fail)?;
    // The short buffer comes back empty (not used), the next one carries
    // the event.
    let short = d
        .next_event(Duration::from_secs(2))?
        .ok_or_else(|| Stop::Fail("no eventq buffer returned after the move".into()))?;
    ensure_eq!(short.used_len, 0);
    let event = next_event(d, Duration::from_secs(2), "MOVE_NOTIFY after the move")?;
    ensure_eq!(event.kind, EventType::MoveNotify);
    ensure_eq!((event.object, event.attachment), (o.object, a));
    ensure!(
        event.data > before.generation,
        "new generation {} after {}",
        event.data,
        before.generation
    );
    // The next MAP returns the new generation.
    let after = d.map(a, Direction::ToDevice, 8, 0)??;
    ensure_eq!(after.generation, event.data);
    ensure_eq!(d.unmap(after.mapping, 0)?, Ok(()));
    // A pinned object does not move.
    ensure_eq!(d.pin(a, 0)?, Ok(()));
    ensure!(
        host.evict(o.uuid).is_err(),
        "eviction of a pinned object is refused"
    );
    ensure_eq!(d.unpin(a, 0)?, Ok(()));
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.release(o.object)?, Ok(()));
    Ok(())
}

fn host_export_open_and_revoke(t: &Target) -> Check {
    let host = t.host()?;
    let vmm = t.connect()?;
    let d = vmm.driver();
    let pg = page(d)?;
    let name = format!("conformance-{}", uuid::Uuid::new_v4().simple());
    let name = &name[..24];
    let content = pattern(2 * pg as usize, 11);
    let file =
        crate::vmm::shm::memfd_with("export", &content).map_err(|e| Stop::Fail(e.to_string()))?;
    let options = ExportOptions {
        read_only: true,
        ..ExportOptions::default()
    };
    host.export(name, file.as_fd(), &options)
        .map_err(Stop::Fail)?;
    d.post_event_buffers(1, EVENT_SIZE as u32)?;
    let o = d.open_by_name(name)??;
    ensure_eq!(o.size, 2 * pg);
    ensure_eq!(
        o.obj_flags & virtio_dmabuf_protocol::obj_flags::WRITABLE,
        0,
        "read-only export"
    );
    ensure_eq!(
        d.transfer_from_host(o.object, 0, 64)?,
        Ok(content[..64].to_vec())
    );
    ensure_eq!(d.transfer_to_host(o.object, 0, b"x")?, Err(Status::Perm));
    // Opening again returns the same handle with another reference.
    ensure_eq!(d.open_by_name(name)?.map(|r| r.object), Ok(o.object));
    ensure_eq!(d.release(o.object)?, Ok(()));
    ensure_eq!(d.open_by_name("no-such-export")?, Err(Status::NoEnt));
    host.revoke(name).map_err(Stop::Fail)?;
    let event = next_event(d, Duration::from_secs(2), "REVOKED")?;
    ensure_eq!((event.kind, event.object), (EventType::Revoked, o.object));
    ensure_eq!(d.transfer_from_host(o.object, 0, 8)?, Err(Status::NoEnt));
    ensure_eq!(
        d.release(o.object)?,
        Ok(()),
        "a revoked handle's RELEASE frees it"
    );
    ensure_eq!(d.release(o.object)?, Err(Status::NoEnt));
    Ok(())
}

// ---- section 6: lifetimes ----

fn vring_stop_cancels_waiting_and_keeps_state(t: &Target) -> Check {
    let mut vmm = t.connect_loopback()?;
    let (object, a, _, parked) = parked_lock(vmm.driver())?;
    let bases = vmm.stop_vrings()?;
    // The waiting chain came back before GET_VRING_BASE answered.
    let d = vmm.driver();
    ensure!(d.poll(&parked)?, "parked chain completed by the vring stop");
    ensure_eq!(d.complete(parked)?, Err(Status::Canceled));
    vmm.resume(&bases)?;
    let d = vmm.driver();
    // State survived: A still holds the lock.
    ensure_eq!(d.lock(a, object, 0)?, Err(Status::Already));
    ensure_eq!(d.unlock(a, object)?, Ok(()));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

/// Builds some state of every kind; returns the handles to check.
struct Held {
    object: u64,
    attachment: u64,
    ctx: u64,
    shm: bool,
    exported: Option<uuid::Uuid>,
}

fn hold_everything(vmm: &dyn Session) -> Result<Held, Stop> {
    let d = vmm.driver();
    let object = create(d, 2, 0)?;
    let attachment = d.attach(object, attach_flags::DYNAMIC_IMPORTER)??;
    let m = d.map(attachment, Direction::ToDevice, 8, 0)??;
    let _ = m;
    let (ctx, _) = d.acquire_init()??;
    ensure_eq!(d.lock(ctx, object, 0)?, Ok(()));
    let shm = (vmm.capabilities().shm_size > 0) && d.map_shm(object, true)?.is_ok();
    let exported = match d.export_uuid(object)? {
        Ok(u) => Some(uuid::Uuid::from_bytes(u)),
        Err(_) => None,
    };
    Ok(Held {
        object,
        attachment,
        ctx,
        shm,
        exported,
    })
}

/// For a front-end that dies mid-request: a session holding state of every
/// kind (an object attached, mapped, locked, in the window, published)
/// with a `LOCK` of a second context parked behind the lock. The session is
/// returned so nothing is released; the caller then goes away without a
/// word and the host checks that the daemon let go of everything.
pub fn hold_state_with_a_parked_request(t: &Target) -> Result<Box<dyn Session>, Stop> {
    let vmm = t.connect()?;
    hold_everything(&vmm)?;
    let (_, _, _, parked) = parked_lock(vmm.driver())?;
    ensure!(!vmm.driver().poll(&parked)?, "the LOCK is parked");
    Ok(vmm)
}

fn nothing_left(vmm: &dyn Session, held: &Held) -> Check {
    let d = vmm.driver();
    ensure_eq!(d.release(held.object)?, Err(Status::NoEnt));
    ensure_eq!(d.detach(held.attachment)?, Err(Status::NoEnt));
    ensure_eq!(d.acquire_fini(held.ctx)?, Err(Status::NoEnt));
    if held.shm {
        if let Some(shm) = vmm.loopback().and_then(LoopbackVmm::shm) {
            // SHMEM_UNMAP travels on the back-end channel, which the
            // front-end serves on its own thread: the reset's answer does
            // not wait for it (section 1), so give it a bounded moment.
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !shm.mappings().is_empty() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            ensure!(
                shm.mappings().is_empty(),
                "window still mapped: {:?}",
                shm.mappings()
            );
        }
    }
    if let (Some(u), Some(vmm)) = (held.exported, vmm.loopback()) {
        // SHARED_OBJECT_REMOVE also travels on the back-end channel.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while vmm.backend_shared_objects().contains(&u) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        ensure!(
            !vmm.backend_shared_objects().contains(&u),
            "shared object {u} not removed"
        );
    }
    // A fresh object gets a handle never seen before.
    let o = create(d, 1, 0)?;
    ensure!(o != held.object);
    ensure_eq!(d.release(o)?, Ok(()));
    Ok(())
}

fn reset_session_releases_everything(t: &Target) -> Check {
    let vmm = t.connect()?;
    let held = hold_everything(&vmm)?;
    ensure_eq!(vmm.driver().reset_session()?, Ok(()));
    nothing_left(&vmm, &held)
}

fn device_reset_releases_everything(t: &Target) -> Check {
    let mut vmm = t.connect()?;
    let held = hold_everything(&vmm)?;
    vmm.reset()?;
    nothing_left(&vmm, &held)
}

fn reconnect_leaves_nothing_behind(t: &Target) -> Check {
    let vmm = t.connect_loopback()?;
    let held = hold_everything(&vmm)?;
    let before = info(vmm.driver())?;
    let vmm = vmm.reconnect()?;
    // Handles are per connection and never reused across connections.
    nothing_left(&vmm, &held)?;
    // The quotas are whole again.
    let after = info(vmm.driver())?;
    ensure_eq!(after.max_objects, before.max_objects);
    Ok(())
}
