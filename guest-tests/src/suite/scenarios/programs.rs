// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The importer programs of [`crate::importers`] as scenarios: each must
//! carry its data end to end, through the window wherever the front-end
//! negotiated one, and through the copy path otherwise.

use crate::importers::{
    blob_by_uuid, camera_capture, display_scanout, gpu_render, DataPath, FrameFormat,
    ImporterError, Report,
};
use crate::session::Session;
use crate::{ensure, ensure_eq};

use super::{need_cap, shared_object_negotiated, shm_negotiated, Check, Stop, Target};
use virtio_dmabuf_protocol::caps;

/// Small enough that a transfer fits the ring even when every descriptor
/// holds 61 bytes (the `split` mode): 60 x 32 pixels, 256-byte rows.
fn format() -> FrameFormat {
    FrameFormat::new(60, 32)
}

/// A program's result as a scenario's: what is not live here skips.
fn program(r: Result<Report, ImporterError>) -> Result<Report, Stop> {
    match r {
        Ok(report) => Ok(report),
        Err(ImporterError::Unavailable(why)) => Err(Stop::Skip(why)),
        Err(e) => Err(e.into()),
    }
}

/// The path a program that prefers the window must take: the window when
/// the front-end negotiated it (its absence from `GET_INFO` is then a
/// failure), else the copy path.
fn preferred(vmm: &dyn Session) -> DataPath {
    if shm_negotiated(vmm) {
        DataPath::Window
    } else {
        DataPath::Transfer
    }
}

pub(super) fn importer_display_scans_out_frames(t: &Target) -> Check {
    let vmm = t.connect()?;
    let zero_copy = program(display_scanout(&vmm, format(), 2, true))?;
    ensure_eq!(zero_copy.path, preferred(&vmm));
    ensure_eq!(zero_copy.checksums.len(), 2);
    ensure!(
        zero_copy.checksums[0] != zero_copy.checksums[1],
        "two different frames"
    );
    let copied = program(display_scanout(&vmm, format(), 2, false))?;
    ensure_eq!(copied.path, DataPath::Transfer);
    ensure_eq!(
        copied.checksums,
        zero_copy.checksums,
        "same frames either way"
    );
    Ok(())
}

pub(super) fn importer_gpu_renders_and_remaps_after_eviction(t: &Target) -> Check {
    let host = t.host()?;
    let vmm = t.connect()?;
    let zero_copy = program(gpu_render(&vmm, host, format(), true))?;
    ensure_eq!(zero_copy.path, preferred(&vmm));
    let copied = program(gpu_render(&vmm, host, format(), false))?;
    ensure_eq!(copied.path, DataPath::Transfer);
    ensure_eq!(copied.checksums, zero_copy.checksums);
    Ok(())
}

pub(super) fn importer_camera_reads_a_host_export(t: &Target) -> Check {
    let host = t.host()?;
    // The export is granted to guest 0 only: this session is guest 0.
    let vmm = t.connect_guest(0)?;
    let report = program(camera_capture(&vmm, host, "cam0", format()))?;
    ensure_eq!(report.path, preferred(&vmm));
    ensure_eq!(report.checksums.len(), 2, "a CPU read and a device read");
    Ok(())
}

pub(super) fn importer_blob_shared_by_uuid(t: &Target) -> Check {
    let mut vmm = t.connect()?;
    let negotiated = shared_object_negotiated(&vmm);
    need_cap(
        vmm.driver(),
        caps::SHARED_OBJECTS,
        "SHARED_OBJECTS",
        negotiated,
    )?;
    let expected = preferred(&vmm);
    let report = program(blob_by_uuid(&mut vmm, format()))?;
    ensure_eq!(report.path, expected);
    ensure_eq!(report.checksums.len(), 2, "the first frame and the redraw");
    Ok(())
}
