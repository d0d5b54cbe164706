// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The JSON of `ctl list --json` and `ctl stats --json` (section 11): serde
//! records built from the model's plain values, so the model knows nothing
//! of serialisation. Field names and order are the wire's; each record
//! takes its model value apart field by field, so a field added to the
//! model fails to build here until the record says what becomes of it.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::exporter::sync::SyncEntry;
use crate::exporter::{
    AttachmentInfo, GuestId, HostFenceStats, LockHolderInfo, ObjectInfo, StatsSnapshot,
};

/// `{"objects": [...]}` of `list`.
pub(crate) fn list(objects: &[ObjectInfo]) -> Value {
    let objects: Vec<ObjectRecord<'_>> = objects.iter().map(ObjectRecord::from).collect();
    serde_json::json!({ "objects": objects })
}

/// The answer's fields of `stats`.
pub(crate) fn stats(stats: &StatsSnapshot) -> Value {
    // Strings, numbers, maps with string keys and UUIDs always serialise.
    serde_json::to_value(StatsRecord::from(stats)).unwrap_or(Value::Null)
}

#[derive(Serialize)]
struct StatsRecord<'a> {
    requests: &'a BTreeMap<String, BTreeMap<String, u64>>,
    syncs: &'a BTreeMap<String, u64>,
    recent_syncs: Vec<SyncRecord>,
    host_fences: HostFencesRecord<'a>,
}

impl<'a> From<&'a StatsSnapshot> for StatsRecord<'a> {
    fn from(s: &'a StatsSnapshot) -> Self {
        let StatsSnapshot {
            requests,
            syncs,
            recent_syncs,
            host_fences,
        } = s;
        StatsRecord {
            requests,
            syncs,
            recent_syncs: recent_syncs.iter().map(SyncRecord::from).collect(),
            host_fences: HostFencesRecord::from(host_fences),
        }
    }
}

#[derive(Serialize)]
struct SyncRecord {
    uuid: uuid::Uuid,
    flags: u64,
    kernel: bool,
    errno: Option<i32>,
}

impl From<&SyncEntry> for SyncRecord {
    fn from(e: &SyncEntry) -> Self {
        let SyncEntry {
            uuid,
            flags,
            kernel,
            errno,
        } = *e;
        SyncRecord {
            uuid,
            flags,
            kernel,
            errno,
        }
    }
}

#[derive(Serialize)]
struct HostFencesRecord<'a> {
    source: Option<&'static str>,
    node: Option<&'a str>,
    carries_errors: bool,
    source_timeout_ms: Option<u64>,
    installed: u64,
    install_failed: u64,
    signalled: u64,
    errors_dropped: u64,
    expired_at_source: u64,
    pending: usize,
    waits: u64,
    wait_timeouts: u64,
    watching: usize,
}

impl<'a> From<&'a HostFenceStats> for HostFencesRecord<'a> {
    fn from(h: &'a HostFenceStats) -> Self {
        let HostFenceStats {
            source,
            node,
            carries_errors,
            source_timeout_ms,
            installed,
            install_failed,
            signalled,
            errors_dropped,
            expired_at_source,
            pending,
            waits,
            wait_timeouts,
            watching,
        } = h;
        HostFencesRecord {
            source: *source,
            node: node.as_deref(),
            carries_errors: *carries_errors,
            source_timeout_ms: *source_timeout_ms,
            installed: *installed,
            install_failed: *install_failed,
            signalled: *signalled,
            errors_dropped: *errors_dropped,
            expired_at_source: *expired_at_source,
            pending: *pending,
            waits: *waits,
            wait_timeouts: *wait_timeouts,
            watching: *watching,
        }
    }
}

#[derive(Serialize)]
struct ObjectRecord<'a> {
    uuid: uuid::Uuid,
    size: u64,
    provider: &'static str,
    exporter: &'static str,
    placement: &'static str,
    generation: u64,
    export: Option<&'a str>,
    revoked: bool,
    guests: &'a [GuestId],
    attachments: Vec<AttachmentRecord>,
    lock_holder: Option<LockHolderRecord>,
    fences_pending: usize,
    shm_offset: Option<u64>,
    window: bool,
    sub_allocated: bool,
}

impl<'a> From<&'a ObjectInfo> for ObjectRecord<'a> {
    fn from(o: &'a ObjectInfo) -> Self {
        let ObjectInfo {
            uuid,
            size,
            provider,
            exporter,
            placement,
            generation,
            export,
            revoked,
            guests,
            attachments,
            lock_holder,
            fences_pending,
            shm_offset,
            window,
            sub_allocated,
        } = o;
        ObjectRecord {
            uuid: *uuid,
            size: *size,
            provider,
            exporter,
            placement,
            generation: *generation,
            export: export.as_deref(),
            revoked: *revoked,
            guests,
            attachments: attachments.iter().map(AttachmentRecord::from).collect(),
            lock_holder: lock_holder.as_ref().map(LockHolderRecord::from),
            fences_pending: *fences_pending,
            shm_offset: *shm_offset,
            window: *window,
            sub_allocated: *sub_allocated,
        }
    }
}

#[derive(Serialize)]
struct AttachmentRecord {
    guest: GuestId,
    importer: &'static str,
    pins: u32,
    cached_dir: Option<u32>,
    mappings: usize,
}

impl From<&AttachmentInfo> for AttachmentRecord {
    fn from(a: &AttachmentInfo) -> Self {
        let AttachmentInfo {
            guest,
            importer,
            pins,
            cached_dir,
            mappings,
        } = *a;
        AttachmentRecord {
            guest,
            importer,
            pins,
            cached_dir,
            mappings,
        }
    }
}

#[derive(Serialize)]
struct LockHolderRecord {
    guest: Option<GuestId>,
    stamp: Option<u64>,
}

impl From<&LockHolderInfo> for LockHolderRecord {
    fn from(l: &LockHolderInfo) -> Self {
        let LockHolderInfo { guest, stamp } = *l;
        LockHolderRecord { guest, stamp }
    }
}
