// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! (c) A camera frame the host exports read-only, opened by name.

use std::os::fd::AsFd;

use virtio_dmabuf_protocol::{attach_flags, caps, obj_flags, Direction, Status};

use super::{
    check, data_path, expect_space, info, ok, release, DataPath, FrameFormat, ImporterError,
    MappedBuffer, Report, Result,
};
use crate::host::{ExportOptions, HostControl};
use crate::session::Session;
use crate::vmm::shm::memfd_with;

/// A camera frame in host memory: a memfd holding a known frame is
/// exported read-only to guest 0 only, as `name`; the guest opens it by
/// name, reads the frame (CPU access through the window, or the copy path)
/// and, as a static importer, maps it `TO_DEVICE` and reads it again
/// through the space the reply names. A write is `EPERM` either way. The
/// export is revoked at the end. The VMM must be guest 0.
pub fn camera_capture(
    vmm: &dyn Session,
    host: &dyn HostControl,
    name: &str,
    format: FrameFormat,
) -> Result<Report> {
    let info = info(vmm)?;
    if info.caps & caps::HOST_EXPORTS == 0 {
        return Err(ImporterError::Unavailable(
            "HOST_EXPORTS is not live".into(),
        ));
    }
    let path = data_path(vmm, &info, true);
    let mut buffer = format.render(42);
    buffer.resize(format.buffer_size(u64::from(info.page_size)) as usize, 0);
    let file = memfd_with("camera-frame", &buffer).map_err(|source| ImporterError::Io {
        what: "camera memfd",
        source,
    })?;
    // A leftover of an earlier run would make the export fail.
    let _ = host.revoke(name);
    let options = ExportOptions {
        dynamic: false,
        read_only: true,
        guests: Some(vec![0]),
    };
    host.export(name, file.as_fd(), &options)
        .map_err(|message| ImporterError::Host {
            what: "export",
            message,
        })?;
    let result = camera_read(vmm, name, format, &buffer, path);
    let revoked = host.revoke(name);
    let report = result?;
    revoked.map_err(|message| ImporterError::Host {
        what: "revoke",
        message,
    })?;
    Ok(report)
}

fn camera_read(
    vmm: &dyn Session,
    name: &str,
    format: FrameFormat,
    buffer: &[u8],
    path: DataPath,
) -> Result<Report> {
    let d = vmm.driver();
    let o = ok("OPEN (by name)", d.open_by_name(name))?;
    check(o.size == buffer.len() as u64, || {
        format!("OPEN size {} for a {}-byte buffer", o.size, buffer.len())
    })?;
    check(o.obj_flags & obj_flags::WRITABLE == 0, || {
        "a read-only export must not be WRITABLE".into()
    })?;
    let expected = format.checksum(buffer);
    let mut checksums = Vec::new();
    let window = match path {
        DataPath::Window => {
            let refused = d.map_shm(o.object, true)?;
            check(refused == Err(Status::Perm), || {
                format!("writable MAP_SHM of a read-only export: {refused:?}")
            })?;
            let (offset, _) = ok("MAP_SHM", d.map_shm(o.object, false))?;
            Some(offset)
        }
        DataPath::Transfer => None,
    };
    // The CPU reads the frame.
    ok(
        "BEGIN_CPU_ACCESS",
        d.begin_cpu_access(o.object, Direction::FromDevice),
    )?;
    let cpu_view = match window {
        Some(offset) => vmm.shm_read(offset, format.len())?,
        None => ok(
            "TRANSFER_FROM_HOST",
            d.transfer_from_host(o.object, 0, format.len() as u64),
        )?,
    };
    ok(
        "END_CPU_ACCESS",
        d.end_cpu_access(o.object, Direction::FromDevice),
    )?;
    checksums.push(format.checksum(&cpu_view));
    // An encoder reads it as a static importer.
    let flags = if window.is_some() {
        attach_flags::PEER2PEER
    } else {
        0
    };
    let encoder = ok("ATTACH", d.attach(o.object, flags))?;
    let map = ok("MAP", d.map(encoder, Direction::ToDevice, 16, 0))?;
    expect_space(&map, path)?;
    let device_view = MappedBuffer::new(vmm, o.object, &map).read(0, format.len())?;
    checksums.push(format.checksum(&device_view));
    ok("UNMAP", d.unmap(map.mapping, 0))?;
    ok("DETACH", d.detach(encoder))?;
    for (i, got) in checksums.iter().enumerate() {
        check(*got == expected, || {
            format!("read {i}: checksum {got:#x}, the camera wrote {expected:#x}")
        })?;
    }
    // Nobody in the guest may write the camera's buffer.
    let write = d.transfer_to_host(o.object, 0, b"overwrite")?;
    check(write == Err(Status::Perm), || {
        format!("TRANSFER_TO_HOST to a read-only export: {write:?}")
    })?;
    release(d, o.object, window.is_some())?;
    Ok(Report { path, checksums })
}
