// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Which host sync each direction makes, and the sync record (contract section
//! 9; `src/exporter/sync.rs`).

use super::helpers::*;

#[test]
fn begin_cpu_access_issues_start_with_direction_bits() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let mark = d.sync_mark();
    for dir in [FromDevice, ToDevice, Bidi] {
        d.ok(0, Request::BeginCpuAccess { object: o, dir });
    }
    assert_eq!(d.syncs_since(mark), vec![START_READ, START_WRITE, START_RW]);
}

#[test]
fn end_cpu_access_issues_end_with_direction_bits() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let mark = d.sync_mark();
    for dir in [FromDevice, ToDevice, Bidi] {
        d.ok(0, Request::EndCpuAccess { object: o, dir });
    }
    assert_eq!(d.syncs_since(mark), vec![END_READ, END_WRITE, END_RW]);
}

#[test]
fn ctl_stats_counts_syncs_by_flags_and_lists_recent_ones() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    d.ok(
        0,
        Request::BeginCpuAccess {
            object: o,
            dir: FromDevice,
        },
    );
    d.ok(
        0,
        Request::EndCpuAccess {
            object: o,
            dir: FromDevice,
        },
    );
    let s = d.ex.stats();
    assert_eq!(s.syncs.get("START|READ"), Some(&1));
    assert_eq!(s.syncs.get("END|READ"), Some(&1));
    assert_eq!(s.recent_syncs.len(), 2);
    // memfd objects: the emulation answered, and it said yes.
    assert!(s
        .recent_syncs
        .iter()
        .all(|e| !e.kernel && e.errno.is_none()));
    assert_eq!(s.requests["BEGIN_CPU_ACCESS"]["OK"], 1);
}

#[test]
fn refused_host_sync_is_eio_and_recorded_with_the_kernel_errno() {
    // A host fd taken as a kernel dma-buf that is none (a memfd): the real
    // ioctl reaches the kernel, which answers ENOTTY.
    let mut d = Dev::new();
    let fd = rustix::fs::memfd_create("not-a-dmabuf", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, PAGE).unwrap();
    let backing = vhost_device_dmabuf::provider::import_dmabuf(fd).unwrap();
    let uuid =
        d.ex.host_export(
            ExportSpec {
                name: "fake".into(),
                dynamic: false,
                read_only: false,
                guests: None,
            },
            backing,
        )
        .unwrap();
    let o = handle(open_name(&mut d, 0, "fake").unwrap());
    let r = d.err(
        0,
        Request::BeginCpuAccess {
            object: o,
            dir: FromDevice,
        },
    );
    assert_eq!(r, Status::Io);
    let s = d.ex.stats();
    let last = s.recent_syncs.last().copied().unwrap();
    assert_eq!(
        (last.uuid, last.flags, last.kernel, last.errno),
        (uuid, START_READ, true, Some(libc::ENOTTY))
    );
    assert_eq!(s.syncs.get("START|READ"), None, "only answered calls count");
}
