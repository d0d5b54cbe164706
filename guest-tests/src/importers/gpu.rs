// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! (b) A GPU: a dynamic importer rendering under the reservation lock.

use std::time::Duration;

use virtio_dmabuf_protocol::{
    attach_flags, create_flags, Direction, EventType, FenceUsage, Reply, CONTROLQ, EVENT_SIZE,
};

use super::{
    check, data_path, expect_space, info, ok, release, DataPath, FrameFormat, ImporterError,
    MappedBuffer, Report, Result,
};
use crate::driver::begin_cpu_access_request;
use crate::host::HostControl;
use crate::session::Session;

/// A GPU renders one frame into a dynamic buffer and keeps using it across
/// a host eviction. It is a dynamic importer: under its acquire context it
/// locks the reservation, maps `FROM_DEVICE`, publishes a WRITE fence for
/// the job and unlocks; a CPU reader's `BEGIN_CPU_ACCESS(FROM_DEVICE)`
/// waits for that fence; the job writes the frame through the window (or,
/// without one, through the copy path before the fence is published, as the
/// copy path itself honours implicit sync); the fence is signalled and the
/// reader sees the frame. Then the host evicts the buffer; on `MOVE_NOTIFY`
/// the GPU takes the lock again, drops the stale mapping, maps again and
/// finds the new generation and the same bytes.
pub fn gpu_render(
    vmm: &dyn Session,
    host: &dyn HostControl,
    format: FrameFormat,
    use_window: bool,
) -> Result<Report> {
    let d = vmm.driver();
    let info = info(vmm)?;
    let path = data_path(vmm, &info, use_window);
    d.post_event_buffers(2, EVENT_SIZE as u32)?;
    let size = format.buffer_size(u64::from(info.page_size));
    let created = ok("CREATE", d.create(size, create_flags::DYNAMIC))?;
    let object = created.object;
    if path == DataPath::Window {
        ok("MAP_SHM", d.map_shm(object, true))?;
    }
    let mut flags = attach_flags::DYNAMIC_IMPORTER;
    if path == DataPath::Window {
        flags |= attach_flags::PEER2PEER;
    }
    let gpu = ok("ATTACH (gpu)", d.attach(object, flags))?;
    let (ctx, _) = ok("ACQUIRE_INIT", d.acquire_init())?;

    // Submit the job.
    ok("LOCK", d.lock(ctx, object, 0))?;
    let map = ok("MAP (gpu)", d.map(gpu, Direction::FromDevice, 16, ctx))?;
    expect_space(&map, path)?;
    let frame = format.render(7);
    let target = MappedBuffer::new(vmm, object, &map);
    if path == DataPath::Transfer {
        target.write(0, &frame)?;
    }
    let fence = ok(
        "FENCE_ATTACH",
        d.fence_attach(ctx, object, FenceUsage::Write),
    )?;
    ok("UNLOCK", d.unlock(ctx, object))?;

    // A CPU reader waits for the job (implicit sync, section 7.5).
    let reader = d.submit(
        CONTROLQ,
        &begin_cpu_access_request(object, Direction::FromDevice),
    )?;
    check(!d.settle(&reader, Duration::from_millis(100))?, || {
        "BEGIN_CPU_ACCESS(FROM_DEVICE) did not wait for the GPU's WRITE fence".into()
    })?;
    // The job runs and completes.
    if path == DataPath::Window {
        target.write(0, &frame)?;
    }
    ok("FENCE_SIGNAL", d.fence_signal(fence, 0))?;
    let begun = d.complete(reader)?;
    check(begun == Ok(Reply::Empty), || {
        format!("the reader's BEGIN_CPU_ACCESS: {begun:?}")
    })?;
    let seen = ok(
        "TRANSFER_FROM_HOST",
        d.transfer_from_host(object, 0, format.len() as u64),
    )?;
    ok(
        "END_CPU_ACCESS",
        d.end_cpu_access(object, Direction::FromDevice),
    )?;
    let expected = format.checksum(&frame);
    check(format.checksum(&seen) == expected, || {
        "the reader does not see the rendered frame".into()
    })?;

    // The host moves the buffer.
    host.evict(created.uuid)
        .map_err(|message| ImporterError::Host {
            what: "evict",
            message,
        })?;
    let event = d
        .next_event(Duration::from_secs(2))?
        .and_then(|r| r.event)
        .ok_or_else(|| ImporterError::Check("no MOVE_NOTIFY after the eviction".into()))?;
    check(
        event.kind == EventType::MoveNotify && event.object == object && event.attachment == gpu,
        || format!("expected MOVE_NOTIFY for {object}/{gpu}, got {event:?}"),
    )?;
    check(event.data > map.generation, || {
        format!(
            "MOVE_NOTIFY generation {} is not past {}",
            event.data, map.generation
        )
    })?;

    // Map again under the lock.
    ok("LOCK", d.lock(ctx, object, 0))?;
    ok("UNMAP (stale)", d.unmap(map.mapping, ctx))?;
    let again = ok("MAP (gpu)", d.map(gpu, Direction::FromDevice, 16, ctx))?;
    expect_space(&again, path)?;
    check(again.generation == event.data, || {
        format!(
            "MAP after the move: generation {}, MOVE_NOTIFY said {}",
            again.generation, event.data
        )
    })?;
    if path == DataPath::Window {
        check(again.entries == map.entries, || {
            format!(
                "a move keeps the window offset: {:?} became {:?}",
                map.entries, again.entries
            )
        })?;
    }
    let moved = MappedBuffer::new(vmm, object, &again).read(0, format.len())?;
    let got = format.checksum(&moved);
    check(got == expected, || {
        "the bytes changed across the move".into()
    })?;
    ok("UNMAP", d.unmap(again.mapping, ctx))?;
    ok("UNLOCK", d.unlock(ctx, object))?;
    ok("ACQUIRE_FINI", d.acquire_fini(ctx))?;
    ok("DETACH", d.detach(gpu))?;
    release(d, object, path == DataPath::Window)?;
    Ok(Report {
        path,
        checksums: vec![expected, got],
    })
}
