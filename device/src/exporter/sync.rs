// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest DMA directions to host `DMA_BUF_IOCTL_SYNC` flags (contract
//! section 9), and the record of every host sync the device issued.
//!
//! One rule covers every row of the table: making a mapping for the device
//! (`MAP`, the attach-time mapping, `END_CPU_ACCESS`) is sync-for-device,
//! `END | rw(dir)`; giving the buffer back to the CPU (`UNMAP`,
//! `BEGIN_CPU_ACCESS`) is sync-for-cpu, `START | rw(dir)`. Cached mappings
//! go through the same calls, so an importer sees the cache maintenance a
//! fresh map/unmap would have done.

use std::collections::{BTreeMap, VecDeque};

use virtio_dmabuf_protocol::{sync_flags, Direction};

/// Host sync for handing the buffer to the device in `dir`.
pub fn for_device(dir: Direction) -> u64 {
    sync_flags::END | dir.sync_rw()
}

/// Host sync for handing the buffer to the CPU in `dir`.
pub fn for_cpu(dir: Direction) -> u64 {
    sync_flags::START | dir.sync_rw()
}

/// The contract's name of a flag set, as `ctl stats` reports it:
/// `START|READ`, `END|RW`, ...
pub fn flags_name(flags: u64) -> String {
    let phase = if flags & sync_flags::END != 0 {
        "END"
    } else {
        "START"
    };
    let rw = match flags & sync_flags::RW {
        sync_flags::READ => "READ",
        sync_flags::WRITE => "WRITE",
        sync_flags::RW => "RW",
        _ => "NONE",
    };
    format!("{phase}|{rw}")
}

/// How many recent host syncs `ctl stats` lists.
pub const RECENT_SYNCS: usize = 1024;

/// One host sync the device issued (`ctl stats --json`, `recent_syncs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncEntry {
    pub uuid: uuid::Uuid,
    pub flags: u64,
    /// True when the call was the real `DMA_BUF_IOCTL_SYNC` on a kernel
    /// dma-buf; false when it went to the emulation (memfd objects, guest
    /// pages without udmabuf, a host fd that is no dma-buf).
    pub kernel: bool,
    /// `None` when the call succeeded; else the errno it failed with (the
    /// kernel's when `kernel` is true), after which the request was `EIO`.
    pub errno: Option<i32>,
}

/// Counters of successful calls by flag set, and the last [`RECENT_SYNCS`]
/// calls in order, refused ones included.
#[derive(Debug, Default, Clone)]
pub struct SyncRecord {
    pub by_flags: BTreeMap<String, u64>,
    pub recent: VecDeque<SyncEntry>,
    /// Calls the host refused (they became `EIO`).
    pub failed: u64,
}

impl SyncRecord {
    pub fn record(&mut self, entry: SyncEntry) {
        if entry.errno.is_some() {
            self.failed += 1;
        } else {
            *self.by_flags.entry(flags_name(entry.flags)).or_insert(0) += 1;
        }
        if self.recent.len() == RECENT_SYNCS {
            self.recent.pop_front();
        }
        self.recent.push_back(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section9_table_begin_cpu_access_is_start_with_direction_bits() {
        assert_eq!(for_cpu(Direction::FromDevice), 0x1);
        assert_eq!(for_cpu(Direction::ToDevice), 0x2);
        assert_eq!(for_cpu(Direction::Bidirectional), 0x3);
    }

    #[test]
    fn section9_table_end_cpu_access_is_end_with_direction_bits() {
        assert_eq!(for_device(Direction::FromDevice), 0x5);
        assert_eq!(for_device(Direction::ToDevice), 0x6);
        assert_eq!(for_device(Direction::Bidirectional), 0x7);
    }

    #[test]
    fn refused_syncs_are_listed_but_not_counted_by_flags() {
        let mut r = SyncRecord::default();
        let entry = |errno| SyncEntry {
            uuid: uuid::Uuid::nil(),
            flags: 0x6,
            kernel: true,
            errno,
        };
        r.record(entry(None));
        r.record(entry(Some(libc::EINVAL)));
        assert_eq!(r.by_flags.get("END|WRITE"), Some(&1));
        assert_eq!(r.failed, 1);
        assert_eq!(
            r.recent.iter().map(|e| e.errno).collect::<Vec<_>>(),
            [None, Some(libc::EINVAL)]
        );
    }

    #[test]
    fn flag_names_match_ctl_stats_keys() {
        assert_eq!(flags_name(0x1), "START|READ");
        assert_eq!(flags_name(0x6), "END|WRITE");
        assert_eq!(flags_name(0x7), "END|RW");
    }
}
