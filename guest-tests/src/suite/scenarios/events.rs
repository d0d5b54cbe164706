// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The event queue (section 8): `MOVE_NOTIFY` after an eviction.

use std::time::Duration;

use virtio_dmabuf_protocol::{attach_flags, create_flags, Direction, EventType, EVENT_SIZE};

use super::{next_event, page, Check, Stop, Target, SETTLE};
use crate::session::Session;
use crate::{ensure, ensure_eq};

pub(super) fn evict_moves_bytes_bumps_generation_and_notifies_dynamic_importers(
    t: &Target,
) -> Check {
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
