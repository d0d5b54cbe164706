// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Attachments and mappings (section 7.3): every exporter/importer
//! combination, the cached mapping and `MAP` overflow.

use virtio_dmabuf_protocol::{
    attach_flags, create_flags, map_flags, Direction, Reply, Request, Status,
};

use super::{create, page, total_len, Check, Stop, Target};
use crate::session::Session;
use crate::{ensure, ensure_eq};

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

pub(super) fn attach_static_exporter_static_importer(t: &Target) -> Check {
    attach_case(t, false, false)
}
pub(super) fn attach_dynamic_importer_to_static_exporter_caches_bidirectional_without_pin(
    t: &Target,
) -> Check {
    attach_case(t, false, true)
}
pub(super) fn attach_static_importer_to_dynamic_exporter_caches_bidirectional_and_pins(
    t: &Target,
) -> Check {
    attach_case(t, true, false)
}
pub(super) fn attach_dynamic_exporter_dynamic_importer(t: &Target) -> Check {
    attach_case(t, true, true)
}

pub(super) fn map_cached_other_direction_is_ebusy(t: &Target) -> Check {
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

pub(super) fn map_with_too_few_entries_is_eoverflow_with_needed_count(t: &Target) -> Check {
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
