// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the host sees and does: the section 9 sync table read through the
//! daemon's record, pins against eviction, and the eventq when the driver
//! posts no buffers (sections 7.3, 8, 9, 11).

use std::time::Duration;

use virtio_dmabuf_protocol::{
    attach_flags, caps, create_flags, map_flags, obj_flags, Direction, EventType, ObjectReply,
    Segment, Status, EVENT_SIZE,
};

use super::{info, listed, next_event, page, Check, Stop, Target, SETTLE};
use crate::driver::{Driver, DriverError, Outcome};
use crate::host::{host_syncs_during, kernel_sync_required, HostControl, REQUIRE_KERNEL_SYNC_ENV};
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

fn dir_name(dir: Direction) -> &'static str {
    match dir {
        Direction::FromDevice => "FROM_DEVICE",
        Direction::ToDevice => "TO_DEVICE",
        Direction::Bidirectional => "BIDIRECTIONAL",
    }
}

/// Who answered a row's host syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// The real `DMA_BUF_IOCTL_SYNC` on a kernel dma-buf, every time.
    Kernel,
    /// The daemon's emulation (memfd objects, guest pages without udmabuf).
    Emulated,
    /// Some of each: objects of one kind went to different places.
    Mixed,
    /// The row issues no sync (a refused `MAP`).
    NoSync,
}

impl Answer {
    fn name(self) -> &'static str {
        match self {
            Answer::Kernel => "kernel",
            Answer::Emulated => "emulated",
            Answer::Mixed => "mixed",
            Answer::NoSync => "none",
        }
    }
}

/// The section 9 rows as the daemon's record shows them: the syncs of one
/// request at a time, and for each row whether they reached the kernel.
struct Table<'a> {
    host: &'a dyn HostControl,
    rows: Vec<(String, Answer)>,
}

impl Table<'_> {
    /// Runs one request (an instance of `row`) and returns its outcome with
    /// the flags of the host syncs the daemon recorded for the object
    /// meanwhile.
    fn syncs<T>(
        &mut self,
        row: String,
        uuid: [u8; 16],
        request: impl FnOnce() -> Result<Outcome<T>, DriverError>,
    ) -> Result<(Outcome<T>, Vec<u64>), Stop> {
        let (r, syncs) = host_syncs_during(self.host, uuid, request).map_err(Stop::Fail)?;
        let answer = if syncs.is_empty() {
            Answer::NoSync
        } else if syncs.iter().all(|s| s.kernel) {
            Answer::Kernel
        } else if syncs.iter().all(|s| !s.kernel) {
            Answer::Emulated
        } else {
            Answer::Mixed
        };
        match self.rows.iter_mut().find(|(r, _)| *r == row) {
            Some((_, seen)) if *seen != answer => *seen = Answer::Mixed,
            Some(_) => {}
            None => self.rows.push((row, answer)),
        }
        Ok((r?, syncs.iter().map(|s| s.flags).collect()))
    }

    fn answer(&self, row: &str) -> Option<Answer> {
        self.rows.iter().find(|(r, _)| r == row).map(|(_, a)| *a)
    }

    /// `section 9: ROW=kernel ROW=emulated ...`, in the order first seen.
    fn line(&self) -> String {
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|(row, a)| format!("{row}={}", a.name()))
            .collect();
        format!("section 9: {}", rows.join(" "))
    }

    /// The rows whose syncs did not all reach the kernel.
    fn not_kernel(&self) -> Vec<&str> {
        self.rows
            .iter()
            .filter(|(_, a)| matches!(a, Answer::Emulated | Answer::Mixed))
            .map(|(row, _)| row.as_str())
            .collect()
    }
}

/// `MAP(d)` of a cached mapping is `END | rw(d)`, its `UNMAP` `START | rw(d)`,
/// for every direction the cache serves.
fn cached_rows(table: &mut Table<'_>, d: &Driver, uuid: [u8; 16], att: u64) -> Check {
    for dir in DIRECTIONS {
        let row = format!("MAP({},cached)", dir_name(dir));
        let (m, syncs) = table.syncs(row, uuid, || d.map(att, dir, 8, 0))?;
        let m = m?;
        ensure!(m.map_flags & map_flags::CACHED != 0, "{dir:?}: {m:?}");
        ensure_eq!(
            syncs,
            vec![END | rw(dir)],
            "MAP({dir:?}) of a cached mapping"
        );
        let row = format!("UNMAP({},cached)", dir_name(dir));
        let (r, syncs) = table.syncs(row, uuid, || d.unmap(m.mapping, 0))?;
        ensure_eq!(r, Ok(()));
        ensure_eq!(
            syncs,
            vec![START | rw(dir)],
            "UNMAP of a cached mapping made with {dir:?}"
        );
    }
    Ok(())
}

/// Prints which rows reached a real dma-buf (`section 9: ROW=kernel ...`);
/// with `DMABUF_REQUIRE_KERNEL_SYNC=1` a row the emulation answered fails.
pub(super) fn sync_table_in_the_daemon_record(t: &Target) -> Check {
    let mut table = Table {
        host: t.host()?,
        rows: Vec::new(),
    };
    let checked = sync_table(t, &mut table);
    if !table.rows.is_empty() {
        println!("{}", table.line());
    }
    checked?;
    let not_kernel = table.not_kernel();
    if kernel_sync_required() && !not_kernel.is_empty() {
        return Err(Stop::Fail(format!(
            "{REQUIRE_KERNEL_SYNC_ENV}=1, but these rows did not all reach a kernel dma-buf: {}",
            not_kernel.join(" ")
        )));
    }
    Ok(())
}

/// BEGIN/END_CPU_ACCESS in every direction: `START | rw(d)`, `END | rw(d)`.
fn cpu_access_rows(table: &mut Table<'_>, d: &Driver, o: &ObjectReply, kind: &str) -> Check {
    for dir in DIRECTIONS {
        let row = format!("BEGIN_CPU_ACCESS({}{kind})", dir_name(dir));
        let (r, syncs) = table.syncs(row, o.uuid, || d.begin_cpu_access(o.object, dir))?;
        ensure_eq!(r, Ok(()));
        ensure_eq!(syncs, vec![START | rw(dir)], "BEGIN_CPU_ACCESS({dir:?})");
        let row = format!("END_CPU_ACCESS({}{kind})", dir_name(dir));
        let (r, syncs) = table.syncs(row, o.uuid, || d.end_cpu_access(o.object, dir))?;
        ensure_eq!(r, Ok(()));
        ensure_eq!(syncs, vec![END | rw(dir)], "END_CPU_ACCESS({dir:?})");
    }
    Ok(())
}

fn sync_table(t: &Target, table: &mut Table<'_>) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let pg = page(d)?;
    // CPU access.
    let o = d.create(pg, 0)??;
    cpu_access_rows(table, d, &o, "")?;
    // The BIDIRECTIONAL cache of a disagreement: a dynamic importer of a
    // static exporter ...
    let a = d.attach(o.object, attach_flags::DYNAMIC_IMPORTER)??;
    cached_rows(table, d, o.uuid, a)?;
    ensure_eq!(d.detach(a)?, Ok(()));
    ensure_eq!(d.release(o.object)?, Ok(()));
    // ... and a static importer of a dynamic exporter.
    let od = d.create(pg, create_flags::DYNAMIC)??;
    let s = d.attach(od.object, 0)??;
    cached_rows(table, d, od.uuid, s)?;
    ensure_eq!(d.detach(s)?, Ok(()));
    ensure_eq!(d.release(od.object)?, Ok(()));
    // CACHE_MAPPING: the first MAP(TO_DEVICE) becomes the cache.
    let oc = d.create(pg, create_flags::CACHE_MAPPING)??;
    let c = d.attach(oc.object, 0)??;
    let first = d.map(c, Direction::ToDevice, 8, 0)??;
    ensure_eq!(d.unmap(first.mapping, 0)?, Ok(()));
    let row = format!("MAP({},cached)", dir_name(Direction::ToDevice));
    let (m, syncs) = table.syncs(row, oc.uuid, || d.map(c, Direction::ToDevice, 8, 0))?;
    let m = m?;
    ensure!(m.map_flags & map_flags::CACHED != 0);
    ensure_eq!(syncs, vec![END | rw(Direction::ToDevice)]);
    // A refused MAP (another direction than the cache's) syncs nothing.
    for dir in [Direction::FromDevice, Direction::Bidirectional] {
        let row = format!("MAP({},refused)", dir_name(dir));
        let (r, syncs) = table.syncs(row, oc.uuid, || d.map(c, dir, 8, 0))?;
        ensure_eq!(r.map(|m| m.mapping), Err(Status::Busy), "{dir:?}");
        ensure_eq!(
            syncs,
            Vec::<u64>::new(),
            "a refused MAP({dir:?}) issues no sync"
        );
    }
    let row = format!("UNMAP({},cached)", dir_name(Direction::ToDevice));
    let (r, syncs) = table.syncs(row, oc.uuid, || d.unmap(m.mapping, 0))?;
    ensure_eq!(r, Ok(()));
    ensure_eq!(syncs, vec![START | rw(Direction::ToDevice)]);
    ensure_eq!(d.detach(c)?, Ok(()));
    ensure_eq!(d.release(oc.object)?, Ok(()));
    // CPU access on guest pages: a udmabuf made over the front-end's RAM
    // with UDMABUF_CREATE_LIST where the host allows it (REAL_DMABUF in the
    // reply), the emulation otherwise (section 10).
    if info(d)?.caps & caps::GUEST_PAGES != 0 {
        let pages = d.pool().alloc(pg, pg)?;
        let entries = [Segment {
            addr: pages.gpa,
            len: pg,
        }];
        let g = d.create_guest(pg, false, &entries)??;
        cpu_access_rows(table, d, &g, ",guest-pages")?;
        let real = g.obj_flags & obj_flags::REAL_DMABUF != 0;
        let row = format!(
            "BEGIN_CPU_ACCESS({},guest-pages)",
            dir_name(Direction::ToDevice)
        );
        ensure_eq!(
            table.answer(&row) == Some(Answer::Kernel),
            real,
            "REAL_DMABUF in CREATE's reply ({:#x}) says whether guest pages reach the kernel",
            g.obj_flags
        );
        ensure_eq!(d.release(g.object)?, Ok(()));
        d.pool().free(pages);
    }
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
pub(super) fn events_beyond_the_pending_limit_become_one_overflow(t: &Target) -> Check {
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
