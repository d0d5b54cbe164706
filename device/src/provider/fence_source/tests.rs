// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Tests of the fence sources.

use super::vgem::*;
use super::*;
use crate::provider::sync_file::{host_fences, FenceStatus, HostFences};

#[test]
fn ioctl_numbers_and_layouts_match_the_uapi() {
    assert_eq!(std::mem::size_of::<SwSyncCreateFence>(), 40);
    assert_eq!(std::mem::size_of::<VgemFenceAttach>(), 16);
    assert_eq!(std::mem::size_of::<VgemFenceSignal>(), 8);
    assert_eq!(std::mem::size_of::<DrmGemClose>(), 8);
    assert_eq!(SW_SYNC_IOC_CREATE_FENCE, 0xC028_5700);
    assert_eq!(SW_SYNC_IOC_INC, 0x4004_5701);
    assert_eq!(DRM_IOCTL_VGEM_FENCE_ATTACH, 0xC010_6441);
    assert_eq!(DRM_IOCTL_VGEM_FENCE_SIGNAL, 0x4008_6442);
    assert_eq!(DRM_IOCTL_GEM_CLOSE, 0x4008_6409);
    assert_eq!(DRM_IOCTL_VERSION, 0xC040_6400);
    assert_eq!(DRM_IOCTL_MODE_CREATE_DUMB, 0xC020_64B2);
    assert_eq!(DRM_IOCTL_PRIME_HANDLE_TO_FD, 0xC00C_642D);
}

#[test]
fn source_kinds_say_what_they_carry() {
    assert!(FenceSourceKind::SwSync.carries_errors());
    assert!(!FenceSourceKind::Vgem.carries_errors());
    assert_eq!(FenceSourceKind::SwSync.own_timeout(), None);
    assert_eq!(
        FenceSourceKind::Vgem.own_timeout(),
        Some(Duration::from_secs(10))
    );
    assert_eq!(
        serde_json::to_value(FenceSourceKind::SwSync).ok(),
        Some(serde_json::json!("sw_sync"))
    );
}

/// A vgem source, or `None` with the skip printed (the kernel lane
/// fails on a "does not exist" skip).
fn vgem_or_skip(test: &str) -> Option<FenceSource> {
    match find_vgem_card() {
        Ok(path) => Some(FenceSource::vgem(&path).expect("the vgem source works")),
        Err(why) => {
            println!("{test} skipped: a vgem card does not exist on this host ({why})");
            None
        }
    }
}

/// A dma-buf of a fresh vgem dumb buffer of the test's own, and the
/// file it lives on.
fn vgem_buffer() -> (VgemFile, OwnedFd) {
    let path = find_vgem_card().expect("vgem card");
    let file = VgemFile::open(&path).expect("open");
    let handle = file.create_scratch().expect("dumb buffer");
    let dmabuf = file.prime(handle).expect("prime");
    (file, dmabuf)
}

fn pending(dmabuf: BorrowedFd<'_>, access: HostAccess) -> bool {
    !matches!(
        host_fences(dmabuf, access, false).expect("host fences"),
        HostFences::Clear
    )
}

#[test]
fn vgem_source_installs_a_fence_the_host_waits_for_until_it_is_signalled() {
    let Some(mut source) = vgem_or_skip("vgem host fence") else {
        return;
    };
    assert_eq!(source.kind(), FenceSourceKind::Vgem);
    let (_file, dmabuf) = vgem_buffer();
    assert!(!pending(dmabuf.as_fd(), HostAccess::Write));

    // A WRITE fence: readers and writers wait.
    let seen = export_sync_file(dmabuf.as_fd(), HostAccess::Read).expect("export");
    assert!(seen.is_signalled().expect("poll"), "nothing pending yet");
    let fence = source.install(dmabuf.as_fd(), true).expect("install");
    let seen = export_sync_file(dmabuf.as_fd(), HostAccess::Read).expect("export");
    assert!(!seen.is_signalled().expect("poll"));
    assert_eq!(seen.status().expect("status"), FenceStatus::Pending);
    assert_eq!(seen.pending_fences().expect("fences"), 1);
    assert!(pending(dmabuf.as_fd(), HostAccess::Read));
    assert!(pending(dmabuf.as_fd(), HostAccess::Write));
    assert!(
        !crate::provider::sync_file::poll_now(dmabuf.as_fd(), rustix::event::PollFlags::IN)
            .expect("poll")
    );
    // An error cannot travel with a vgem fence.
    assert_eq!(
        source.signal(fence, 5).expect("signal"),
        Signalled::ErrorDropped
    );
    assert!(seen.is_signalled().expect("poll"));
    assert_eq!(seen.status().expect("status"), FenceStatus::Signalled);
    assert!(!pending(dmabuf.as_fd(), HostAccess::Write));

    // A READ fence: only writers wait.
    let fence = source.install(dmabuf.as_fd(), false).expect("install");
    assert!(!pending(dmabuf.as_fd(), HostAccess::Read));
    assert!(pending(dmabuf.as_fd(), HostAccess::Write));
    assert!(
        crate::provider::sync_file::poll_now(dmabuf.as_fd(), rustix::event::PollFlags::IN)
            .expect("poll")
    );
    assert_eq!(source.signal(fence, 0).expect("signal"), Signalled::Done);
    assert!(!pending(dmabuf.as_fd(), HostAccess::Write));
}

#[test]
fn vgem_source_reuses_scratch_buffers_and_keeps_fences_apart() {
    let Some(mut source) = vgem_or_skip("vgem scratch reuse") else {
        return;
    };
    let (_file, dmabuf) = vgem_buffer();
    // Two fences pending at once, signalled in the other order: each
    // has its own scratch buffer.
    let a = source.install(dmabuf.as_fd(), true).expect("install a");
    let b = source.install(dmabuf.as_fd(), true).expect("install b");
    let seen = export_sync_file(dmabuf.as_fd(), HostAccess::Read).expect("export");
    assert_eq!(seen.pending_fences().expect("fences"), 2);
    source.signal(b, 0).expect("signal b");
    assert_eq!(seen.pending_fences().expect("fences"), 1);
    assert!(pending(dmabuf.as_fd(), HostAccess::Read));
    source.signal(a, 0).expect("signal a");
    assert!(!pending(dmabuf.as_fd(), HostAccess::Read));
    for _ in 0..200 {
        let f = source.install(dmabuf.as_fd(), false).expect("install");
        source.signal(f, 0).expect("signal");
    }
    let Source::Vgem(v) = &source.inner else {
        panic!("vgem");
    };
    let file = v.files.get(&v.current).expect("current file");
    assert!(file.free.len() <= 2, "scratch buffers are reused");
    assert_eq!(file.pending, 0);
}

#[test]
fn sw_sync_source_carries_an_error_as_enoent() {
    let mut source = match FenceSource::sw_sync(Path::new(SW_SYNC_NODE)) {
        Ok(s) => s,
        Err(e) => {
            println!("sw_sync host fence skipped: {SW_SYNC_NODE} is not usable here ({e})");
            return;
        }
    };
    let Ok(path) = find_vgem_card() else {
        println!("sw_sync host fence skipped: no dma-buf to test on (no vgem card)");
        return;
    };
    let file = VgemFile::open(&path).expect("open");
    let dmabuf = file
        .prime(file.create_scratch().expect("dumb"))
        .expect("prime");
    let fence = source.install(dmabuf.as_fd(), true).expect("install");
    let seen = export_sync_file(dmabuf.as_fd(), HostAccess::Read).expect("export");
    assert_eq!(seen.status().expect("status"), FenceStatus::Pending);
    assert_eq!(source.signal(fence, 5).expect("signal"), Signalled::Done);
    assert_eq!(
        seen.status().expect("status"),
        FenceStatus::Error(libc::ENOENT)
    );
}

#[test]
fn detect_names_what_it_tried() {
    match FenceSource::detect() {
        Ok(s) => println!(
            "host fence source: {} ({})",
            s.kind().name(),
            s.node().display()
        ),
        Err(why) => {
            assert!(why.contains("sw_sync") && why.contains("vgem"), "{why}");
            println!("no host fence source: {why}");
        }
    }
}
