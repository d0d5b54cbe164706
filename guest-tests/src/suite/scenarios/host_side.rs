//! What the host sees and does: the section 9 sync table read through the
//! daemon's record, pins against eviction, and the eventq when the driver
//! posts no buffers (sections 7.3, 8, 9, 11).

use std::time::Duration;

use virtio_dmabuf_protocol::{
    attach_flags, create_flags, map_flags, Direction, EventType, ObjectReply, Status, EVENT_SIZE,
};

use super::{info, listed, next_event, page, Check, Stop, Target, SETTLE};
use crate::driver::{Driver, DriverError, Outcome};
use crate::host::{syncs_during, HostControl};
use crate::{ensure, ensure_eq, skip};

/// The section 9 table written out from the contract's numbers, so the
/// daemon is checked against the contract, not against its own helpers.
const START: u64 = 0x0;
const END: u64 = 0x4;

fn rw(dir: Direction) -> u64 {
    match dir {
        Direction::FromDevice => 0x1,
        Direction::ToDevice => 0x2,
        Direction::Bidirectional => 0x3,
    }
}

const DIRECTIONS: [Direction; 3] = [
    Direction::FromDevice,
    Direction::ToDevice,
    Direction::Bidirectional,
];

/// Runs one request and returns its outcome with the host syncs the daemon
/// recorded for the object meanwhile.
fn with_syncs<T>(
    host: &dyn HostControl,
    uuid: [u8; 16],
    request: impl FnOnce() -> Result<Outcome<T>, DriverError>,
) -> Result<(Outcome<T>, Vec<u64>), Stop> {
    let (r, syncs) = syncs_during(host, uuid, request).map_err(Stop::Fail)?;
    Ok((r?, syncs))
}

/// `MAP(d)` of a cached mapping is `END | rw(d)`, its `UNMAP` `START | rw(d)`,
/// for every direction the cache serves.
fn cached_rows(host: &dyn HostControl, d: &Driver, uuid: [u8; 16], att: u64) -> Check {
    for dir in DIRECTIONS {
        let (m, syncs) = with_syncs(host, uuid, || d.map(att, dir, 8, 0))?;
        let m = m?;
        ensure!(m.map_flags & map_flags::CACHED != 0, "{dir:?}: {m:?}");
        ensure_eq!(
            syncs,
            vec![END | rw(dir)],
            "MAP({dir:?}) of a cached mapping"
        );
        let (r, syncs) = with_syncs(host, uuid, || d.unmap(m.mapping, 0))?;
        ensure_eq!(r, Ok(()));
        ensure_eq!(
            syncs,
            vec![START | rw(dir)],
            "UNMAP of a cached mapping made with {dir:?}"
        );
    }
    Ok(())
}

pub(super) fn sync_table_in_the_daemon_record(t: &Target) -> Check {
    let host = t.host()?;
    let vmm = t.connect()?;
    let d = vmm.driver();
    let pg = page(d)?;
    // CPU access.
    let o = d.create(pg, 0)??;
    for dir in DIRECTIONS {
        let (r, syncs) = with_syncs(host, o.uuid, || d.begin_cpu_access(o.object, dir))?;
        ensure_eq!(r, Ok(()));
        ensure_eq!(syncs, vec![START | rw(dir)], "BEGIN_CPU_ACCESS({dir:?})");
        let (r, syncs) = with_syncs(host, o.uuid, || d.end_cpu_access(o.object, dir))?;
        ensure_eq!(r, Ok(()));
        ensure_eq!(syncs, vec![END | rw(dir)], "END_CPU_ACCESS({dir:?})");
    }
    // The BIDIRECTIONAL cache of a disagreement: a dynamic importer of a
    // static exporter ...
    let a = d.attach(o.object, attach_flags::DYNAMIC_IMPORTER)??;
    cached_rows(host, d, o.uuid, a)?;
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.release(o.object)?, Ok(()));
    // ... and a static importer of a dynamic exporter.
    let od = d.create(pg, create_flags::DYNAMIC)??;
    let s = d.attach(od.object, 0)??;
    cached_rows(host, d, od.uuid, s)?;
    ensure_eq!(d.detach(s)?, Ok(()));
    ensure_eq!(d.release(od.object)?, Ok(()));
    // CACHE_MAPPING: the first MAP(TO_DEVICE) becomes the cache.
    let oc = d.create(pg, create_flags::CACHE_MAPPING)??;
    let c = d.attach(oc.object, 0)??;
    let first = d.map(c, Direction::ToDevice, 8, 0)??;
    ensure_eq!(d.unmap(first.mapping, 0)?, Ok(()));
    let (m, syncs) = with_syncs(host, oc.uuid, || d.map(c, Direction::ToDevice, 8, 0))?;
    let m = m?;
    ensure!(m.map_flags & map_flags::CACHED != 0);
    ensure_eq!(syncs, vec![END | rw(Direction::ToDevice)]);
    // A refused MAP (another direction than the cache's) syncs nothing.
    for dir in [Direction::FromDevice, Direction::Bidirectional] {
        let (r, syncs) = with_syncs(host, oc.uuid, || d.map(c, dir, 8, 0))?;
        ensure_eq!(r.map(|m| m.mapping), Err(Status::Busy), "{dir:?}");
        ensure_eq!(
            syncs,
            Vec::<u64>::new(),
            "a refused MAP({dir:?}) issues no sync"
        );
    }
    let (r, syncs) = with_syncs(host, oc.uuid, || d.unmap(m.mapping, 0))?;
    ensure_eq!(r, Ok(()));
    ensure_eq!(syncs, vec![START | rw(Direction::ToDevice)]);
    ensure_eq!(d.detach(c)?, Ok(()));
    ensure_eq!(d.release(oc.object)?, Ok(()));
    Ok(())
}

/// The eviction is refused because of a pin, with the daemon saying so.
fn evict_refused_pinned(host: &dyn HostControl, uuid: [u8; 16]) -> Check {
    match host.evict(uuid) {
        Ok(()) => Err(Stop::Fail(
            "the eviction of a pinned object succeeded".into(),
        )),
        Err(why) => {
            ensure!(
                why.contains("pinned"),
                "refused, but not for the pin: {why}"
            );
            Ok(())
        }
    }
}

/// The host evicts `o` (never moved before) and the dynamic importer's
/// `attachment` hears of it: MOVE_NOTIFY with generation 1.
fn evict_moves(host: &dyn HostControl, d: &Driver, o: &ObjectReply, attachment: u64) -> Check {
    host.evict(o.uuid).map_err(Stop::Fail)?;
    let ev = next_event(d, Duration::from_secs(2), "MOVE_NOTIFY")?;
    ensure_eq!(
        (ev.kind, ev.object, ev.attachment, ev.data),
        (EventType::MoveNotify, o.object, attachment, 1)
    );
    Ok(())
}

pub(super) fn pin_blocks_eviction_until_unpin(t: &Target) -> Check {
    let host = t.host()?;
    let vmm = t.connect()?;
    let d = vmm.driver();
    d.post_event_buffers(2, EVENT_SIZE as u32)?;
    let o = d.create(page(d)?, create_flags::DYNAMIC)??;
    let a = d.attach(o.object, attach_flags::DYNAMIC_IMPORTER)??;
    let (ctx, _) = d.acquire_init()??;
    ensure_eq!(d.lock(ctx, o.object, 0)?, Ok(()));
    ensure_eq!(d.pin(a, ctx)?, Ok(()));
    let m = d.map(a, Direction::ToDevice, 8, ctx)??;
    ensure!(
        m.map_flags & map_flags::PINNED != 0,
        "a pinned attachment maps PINNED"
    );
    ensure_eq!(d.unmap(m.mapping, ctx)?, Ok(()));
    ensure_eq!(d.unlock(ctx, o.object)?, Ok(()));
    evict_refused_pinned(host, o.uuid)?;
    let l = listed(host, o.uuid)?;
    ensure_eq!(
        l.attachments.iter().map(|a| a.pins).collect::<Vec<_>>(),
        vec![1]
    );
    ensure_eq!(l.generation, 0, "nothing moved");
    ensure!(
        d.next_event(SETTLE)?.is_none(),
        "no MOVE_NOTIFY for a refused eviction"
    );
    // Unpinned, it moves and the importer hears of it.
    ensure_eq!(d.lock(ctx, o.object, 0)?, Ok(()));
    ensure_eq!(d.unpin(a, ctx)?, Ok(()));
    ensure_eq!(d.unlock(ctx, o.object)?, Ok(()));
    evict_moves(host, d, &o, a)?;
    ensure_eq!(d.acquire_fini(ctx)?, Ok(()));
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.release(o.object)?, Ok(()));
    Ok(())
}

pub(super) fn static_importer_pins_a_dynamic_exporter_until_detach(t: &Target) -> Check {
    let host = t.host()?;
    let vmm = t.connect()?;
    let d = vmm.driver();
    d.post_event_buffers(2, EVENT_SIZE as u32)?;
    let o = d.create(page(d)?, create_flags::DYNAMIC)??;
    let dynamic = d.attach(o.object, attach_flags::DYNAMIC_IMPORTER)??;
    let fixed = d.attach(o.object, 0)??;
    evict_refused_pinned(host, o.uuid)?;
    let l = listed(host, o.uuid)?;
    let pins: Vec<(bool, u32)> = l
        .attachments
        .iter()
        .map(|a| (a.dynamic_importer, a.pins))
        .collect();
    ensure!(
        pins.contains(&(false, 1)) && pins.contains(&(true, 0)),
        "the static importer pins for its attachment's life: {pins:?}"
    );
    // The dynamic importer's own pins come and go; the static one's stays.
    ensure_eq!(d.pin(dynamic, 0)?, Ok(()));
    ensure_eq!(d.unpin(dynamic, 0)?, Ok(()));
    evict_refused_pinned(host, o.uuid)?;
    let m = d.map(fixed, Direction::ToDevice, 8, 0)??;
    ensure_eq!(
        m.map_flags & (map_flags::CACHED | map_flags::PINNED),
        map_flags::CACHED | map_flags::PINNED
    );
    ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
    ensure!(d.next_event(SETTLE)?.is_none(), "nothing moved");
    // Detached, the pin goes with it.
    ensure_eq!(d.detach(fixed)?, Ok(()));
    evict_moves(host, d, &o, dynamic)?;
    ensure_eq!(d.detach(dynamic)?, Ok(()));
    ensure_eq!(d.release(o.object)?, Ok(()));
    Ok(())
}

/// More events than `max_pending_events` arise while the driver has posted
/// no buffer: the first `max_pending_events` are kept (a newer MOVE_NOTIFY
/// for an attachment that has one pending replaces it in place), the rest
/// are counted; once buffers come, the kept ones arrive in the order they
/// arose, then one OVERFLOW whose `data` is the dropped count.
pub(super) fn eventq_overflow_reports_dropped_events(t: &Target) -> Check {
    let host = t.host()?;
    let vmm = t.connect()?;
    let d = vmm.driver();
    let i = info(d)?;
    let kept = i.max_pending_events as usize;
    if kept > 16 {
        skip!("max_pending_events is {kept}: the scenario needs a daemon with at most 16");
    }
    let wanted = kept + 2;
    let objects = (i.max_objects as usize).min(wanted).min(8);
    if objects == 0 {
        skip!("max_objects is 0");
    }
    let per_object = wanted.div_ceil(objects);
    if objects * per_object > i.max_attachments as usize {
        skip!(
            "{} dynamic attachments needed, max_attachments is {}",
            objects * per_object,
            i.max_attachments
        );
    }
    ensure_eq!(d.posted_event_buffers(), 0);
    let pg = page(d)?;
    let mut created = Vec::new();
    // (object handle, attachment) in the order their events arise.
    let mut order = Vec::new();
    for _ in 0..objects {
        let o = d.create(pg, create_flags::DYNAMIC)??;
        for _ in 0..per_object {
            order.push((
                o.object,
                d.attach(o.object, attach_flags::DYNAMIC_IMPORTER)??,
            ));
        }
        created.push(o);
    }
    for o in &created {
        host.evict(o.uuid).map_err(Stop::Fail)?;
    }
    // The first object moves again: its pending events take generation 2;
    // those of its attachments that were dropped are dropped again.
    let first = created[0].object;
    host.evict(created[0].uuid).map_err(Stop::Fail)?;
    let generation = |object: u64| if object == first { 2 } else { 1 };
    let dropped = (order.len() - kept) + order[kept..].iter().filter(|(o, _)| *o == first).count();

    d.post_event_buffers(kept + 3, EVENT_SIZE as u32)?;
    for (n, &(object, attachment)) in order[..kept].iter().enumerate() {
        let ev = next_event(d, Duration::from_secs(2), "a kept MOVE_NOTIFY")?;
        ensure_eq!(
            (ev.kind, ev.object, ev.attachment, ev.data),
            (
                EventType::MoveNotify,
                object,
                attachment,
                generation(object)
            ),
            "kept event {n}"
        );
    }
    let ev = next_event(d, Duration::from_secs(2), "OVERFLOW")?;
    ensure_eq!(
        (ev.kind, ev.object, ev.attachment, ev.data),
        (EventType::Overflow, 0, 0, dropped as u64)
    );
    ensure!(d.next_event(SETTLE)?.is_none(), "nothing after OVERFLOW");
    ensure_eq!(d.posted_event_buffers(), 2);
    // The driver treats every dynamic attachment as moved: each maps again
    // at its object's current generation.
    for &(object, attachment) in &order {
        let m = d.map(attachment, Direction::ToDevice, 8, 0)??;
        ensure_eq!(m.generation, generation(object));
        ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
        ensure_eq!(d.detach(attachment)?, Ok(()));
    }
    for o in created {
        ensure_eq!(d.release(o.object)?, Ok(()));
    }
    Ok(())
}
