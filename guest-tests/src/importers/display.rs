// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! (a) A display controller: a static importer scanning out frames.

use virtio_dmabuf_protocol::{attach_flags, Direction};

use super::{
    check, cpu_write, data_path, expect_space, info, ok, place_writable, release, FrameFormat,
    MappedBuffer, Report, Result,
};
use crate::session::Session;

/// A display controller scans out `frames` frames: a producer writes each
/// frame (CPU access bracketed by `BEGIN/END_CPU_ACCESS(TO_DEVICE)`, through
/// the window when `use_window` and the window is live, else with
/// `TRANSFER_TO_HOST`); the display, a static importer (`PEER2PEER` with
/// the window), maps the buffer `TO_DEVICE` for each page flip, reads the
/// frame through the address space the `MAP` reply names, compares its
/// checksum with the producer's and unmaps.
pub fn display_scanout(
    vmm: &dyn Session,
    format: FrameFormat,
    frames: u32,
    use_window: bool,
) -> Result<Report> {
    let d = vmm.driver();
    let info = info(vmm)?;
    let path = data_path(vmm, &info, use_window);
    let size = format.buffer_size(u64::from(info.page_size));
    let object = ok("CREATE", d.create(size, 0))?.object;
    let window = place_writable(d, object, path)?;
    let flags = if window.is_some() {
        attach_flags::PEER2PEER
    } else {
        0
    };
    let display = ok("ATTACH (display)", d.attach(object, flags))?;
    let mut checksums = Vec::new();
    for seq in 0..frames {
        // The producer draws the frame.
        let frame = format.render(seq);
        cpu_write(vmm, object, window, &frame)?;
        let expected = format.checksum(&frame);
        // The display flips to it: map, scan out, unmap.
        let map = ok("MAP (display)", d.map(display, Direction::ToDevice, 16, 0))?;
        expect_space(&map, path)?;
        check(
            map.map_flags & virtio_dmabuf_protocol::map_flags::PINNED != 0,
            || "a static exporter's mapping must be PINNED".into(),
        )?;
        let scanned = MappedBuffer::new(vmm, object, &map).read(0, format.len())?;
        let got = format.checksum(&scanned);
        check(got == expected, || {
            format!("frame {seq}: scanout checksum {got:#x}, the producer drew {expected:#x}")
        })?;
        ok("UNMAP (display)", d.unmap(map.mapping, 0))?;
        checksums.push(got);
    }
    ok("DETACH", d.detach(display))?;
    release(d, object, window.is_some())?;
    Ok(Report { path, checksums })
}
