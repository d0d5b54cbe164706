// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The fixed-size structures both ways: info, object replies, events and
//! the config space.

use super::*;
use crate::wire::*;

impl Info {
    /// The 80-byte `GET_INFO` reply (section 7.1).
    pub fn to_bytes(&self) -> [u8; INFO_SIZE] {
        RawInfo {
            version: self.version,
            caps: self.caps,
            shm_size: self.shm_size,
            max_object_size: self.max_object_size,
            page_size: self.page_size,
            provider: self.provider,
            num_queues: self.num_queues,
            max_segments: self.max_segments,
            max_objects: self.max_objects,
            max_attachments: self.max_attachments,
            max_contexts: self.max_contexts,
            max_fences: self.max_fences,
            max_waiting: self.max_waiting,
            max_pending_events: self.max_pending_events,
            max_bytes: self.max_bytes,
            reserved: 0,
        }
        .to_le_bytes()
    }

    /// The reply at the start of `bytes`; `None` if shorter than 80 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Info> {
        let raw = RawInfo::from_le_bytes(bytes)?;
        Some(Info {
            version: raw.version,
            caps: raw.caps,
            shm_size: raw.shm_size,
            max_object_size: raw.max_object_size,
            page_size: raw.page_size,
            provider: raw.provider,
            num_queues: raw.num_queues,
            max_segments: raw.max_segments,
            max_objects: raw.max_objects,
            max_attachments: raw.max_attachments,
            max_contexts: raw.max_contexts,
            max_fences: raw.max_fences,
            max_waiting: raw.max_waiting,
            max_pending_events: raw.max_pending_events,
            max_bytes: raw.max_bytes,
        })
    }
}

impl ObjectReply {
    /// The 40-byte `CREATE`/`OPEN` reply (section 7.2).
    pub fn to_bytes(&self) -> [u8; OBJECT_REPLY_SIZE] {
        RawObjectReply {
            object: self.object,
            uuid: self.uuid,
            size: self.size,
            obj_flags: self.obj_flags,
            reserved: 0,
        }
        .to_le_bytes()
    }

    /// The reply at the start of `bytes`; `None` if shorter than 40 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<ObjectReply> {
        let raw = RawObjectReply::from_le_bytes(bytes)?;
        Some(ObjectReply {
            object: raw.object,
            uuid: raw.uuid,
            size: raw.size,
            obj_flags: raw.obj_flags,
        })
    }
}

impl Event {
    /// The 32-byte eventq buffer contents (section 8).
    pub fn to_bytes(&self) -> [u8; EVENT_SIZE] {
        RawEvent {
            kind: self.kind as u32,
            reserved: 0,
            object: self.object,
            attachment: self.attachment,
            data: self.data,
        }
        .to_le_bytes()
    }

    /// The event at the start of `bytes` (a driver's buffer may be longer);
    /// `None` if shorter than 32 bytes or of a type section 8 does not name.
    pub fn from_bytes(bytes: &[u8]) -> Option<Event> {
        let raw = RawEvent::from_le_bytes(bytes)?;
        Some(Event {
            kind: EventType::from_u32(raw.kind)?,
            object: raw.object,
            attachment: raw.attachment,
            data: raw.data,
        })
    }
}

impl Config {
    /// The 24-byte configuration space (section 3).
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        RawConfig {
            num_queues: self.num_queues,
            page_size: self.page_size,
            shm_size: self.shm_size,
            max_segments: self.max_segments,
            reserved: 0,
        }
        .to_le_bytes()
    }

    /// The configuration at the start of `bytes`; `None` if shorter than 24.
    pub fn from_bytes(bytes: &[u8]) -> Option<Config> {
        let raw = RawConfig::from_le_bytes(bytes)?;
        Some(Config {
            num_queues: raw.num_queues,
            page_size: raw.page_size,
            shm_size: raw.shm_size,
            max_segments: raw.max_segments,
        })
    }

    /// A `GET_CONFIG` read of `len` bytes at `offset` (section 3).
    ///
    /// The result always has `len` bytes; bytes past the 24-byte structure
    /// read as zero, since front-ends ask for their own config size. An
    /// `offset + len` that overflows or exceeds [`CONFIG_READ_MAX`] is
    /// refused with `None` before anything is allocated or copied.
    pub fn read(&self, offset: u32, len: u32) -> Option<Vec<u8>> {
        let end = offset.checked_add(len)?;
        if end > CONFIG_READ_MAX {
            return None;
        }
        let mut out = vec![0u8; usize::try_from(len).ok()?];
        let bytes = self.to_bytes();
        let present = usize::try_from(offset)
            .ok()
            .and_then(|start| bytes.get(start..));
        for (dst, src) in out.iter_mut().zip(present.unwrap_or_default()) {
            *dst = *src;
        }
        Some(out)
    }
}
