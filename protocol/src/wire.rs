// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `#[repr(C)]` mirrors of every structure on the wire, each with its
//! little-endian codec.
//!
//! The structs pin the sizes and field offsets the contract gives: a change
//! that moves a field fails to compile (the `const` assertions at the end).
//! `to_le_bytes`/`from_le_bytes` write and read each field at its
//! `offset_of!` position with the `to_le_bytes`/`from_le_bytes` of the field's
//! type, so the byte order is little-endian on every host and nothing is
//! transmuted. Multi-byte fields hold values, not wire bytes.

use std::mem::{offset_of, size_of};

/// A field type that has a little-endian wire form.
trait WireField: Copy {
    fn put(self, buf: &mut [u8], offset: usize);
    fn get(buf: &[u8], offset: usize) -> Option<Self>;
}

fn bytes_at<const N: usize>(buf: &[u8], offset: usize) -> Option<[u8; N]> {
    buf.get(offset..offset.checked_add(N)?)?.try_into().ok()
}

fn put_bytes(buf: &mut [u8], offset: usize, bytes: &[u8]) {
    // Callers write into a buffer of the struct's own size at the field's own
    // offset, so the range is always inside; stay panic-free regardless.
    if let Some(dst) = offset
        .checked_add(bytes.len())
        .and_then(|end| buf.get_mut(offset..end))
    {
        dst.copy_from_slice(bytes);
    }
}

impl WireField for u32 {
    fn put(self, buf: &mut [u8], offset: usize) {
        put_bytes(buf, offset, &self.to_le_bytes());
    }
    fn get(buf: &[u8], offset: usize) -> Option<Self> {
        bytes_at(buf, offset).map(u32::from_le_bytes)
    }
}

impl WireField for u64 {
    fn put(self, buf: &mut [u8], offset: usize) {
        put_bytes(buf, offset, &self.to_le_bytes());
    }
    fn get(buf: &[u8], offset: usize) -> Option<Self> {
        bytes_at(buf, offset).map(u64::from_le_bytes)
    }
}

impl<const N: usize> WireField for [u8; N] {
    fn put(self, buf: &mut [u8], offset: usize) {
        put_bytes(buf, offset, &self);
    }
    fn get(buf: &[u8], offset: usize) -> Option<Self> {
        bytes_at(buf, offset)
    }
}

/// Declares a `#[repr(C)]` wire struct with `SIZE`, `to_le_bytes` and
/// `from_le_bytes`.
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        $name:ident {
            $($(#[$fmeta:meta])* $field:ident: $ty:ty,)*
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $name {
            /// Size on the wire.
            pub const SIZE: usize = size_of::<$name>();

            /// The wire bytes (little-endian).
            pub fn to_le_bytes(&self) -> [u8; size_of::<$name>()] {
                let mut buf = [0u8; size_of::<$name>()];
                $(WireField::put(self.$field, &mut buf, offset_of!($name, $field));)*
                buf
            }

            /// Reads the struct from the start of `bytes` (later bytes are
            /// not looked at); `None` if `bytes` is shorter than `SIZE`.
            pub fn from_le_bytes(bytes: &[u8]) -> Option<$name> {
                if bytes.len() < Self::SIZE {
                    return None;
                }
                Some($name {
                    $($field: WireField::get(bytes, offset_of!($name, $field))?,)*
                })
            }
        }
    };
}

wire_struct! {
    /// `virtio_dmabuf_req_hdr` (section 4).
    RawReqHdr {
        opcode: u32,
        flags: u32,
        tag: u64,
    }
}

wire_struct! {
    /// `virtio_dmabuf_resp_hdr` (section 4).
    RawRespHdr {
        status: u32,
        reserved: u32,
        tag: u64,
    }
}

wire_struct! {
    /// One segment-list entry: `{ le64 gpa; le64 len }` in `CREATE`,
    /// `{ le64 addr; le64 len }` in the `MAP` reply (sections 7.2, 7.3).
    RawSegment {
        addr: u64,
        len: u64,
    }
}

wire_struct! {
    /// `virtio_dmabuf_event` (section 8).
    RawEvent {
        /// `type` on the wire.
        kind: u32,
        reserved: u32,
        object: u64,
        attachment: u64,
        data: u64,
    }
}

wire_struct! {
    /// `virtio_dmabuf_config` (section 3).
    RawConfig {
        num_queues: u32,
        page_size: u32,
        shm_size: u64,
        max_segments: u32,
        reserved: u32,
    }
}

// ---- Replies (after the response header) ----

wire_struct! {
    /// `GET_INFO` reply (section 7.1).
    RawInfo {
        version: u32,
        caps: u32,
        shm_size: u64,
        max_object_size: u64,
        page_size: u32,
        provider: u32,
        num_queues: u32,
        max_segments: u32,
        max_objects: u32,
        max_attachments: u32,
        max_contexts: u32,
        max_fences: u32,
        max_waiting: u32,
        max_pending_events: u32,
        max_bytes: u64,
        reserved: u64,
    }
}

wire_struct! {
    /// `CREATE`/`OPEN` reply (section 7.2).
    RawObjectReply {
        object: u64,
        uuid: [u8; 16],
        size: u64,
        obj_flags: u32,
        reserved: u32,
    }
}

wire_struct! {
    /// `EXPORT_UUID` reply (section 7.2).
    RawUuidReply {
        uuid: [u8; 16],
    }
}

wire_struct! {
    /// `ATTACH` reply (section 7.3).
    RawAttachReply {
        attachment: u64,
    }
}

wire_struct! {
    /// Fixed part of the `MAP` reply, also written with `EOVERFLOW` (sections 4, 7.3).
    RawMapReplyFixed {
        mapping: u64,
        generation: u64,
        nr_entries: u32,
        map_flags: u32,
        space: u32,
        reserved: u32,
    }
}

wire_struct! {
    /// `ACQUIRE_INIT` reply (section 7.4).
    RawAcquireReply {
        ctx: u64,
        stamp: u64,
    }
}

wire_struct! {
    /// `MAP_SHM` reply (section 7.5).
    RawShmReply {
        shm_offset: u64,
        len: u64,
    }
}

wire_struct! {
    /// `FENCE_ATTACH` reply (section 7.6).
    RawFenceReply {
        fence: u64,
    }
}

// ---- Request payloads (after the request header) ----

wire_struct! {
    /// `CANCEL` payload (section 7.1).
    RawCancelPayload {
        tag: u64,
    }
}

wire_struct! {
    /// Fixed part of the `CREATE` payload; `nr_entries` segments follow (section 7.2).
    RawCreatePayload {
        size: u64,
        nr_entries: u32,
        reserved: u32,
    }
}

wire_struct! {
    /// `OPEN` payload (section 7.2).
    RawOpenPayload {
        uuid: [u8; 16],
        name: [u8; 32],
    }
}

wire_struct! {
    /// `{ le64 object }`: `RELEASE`, `EXPORT_UUID`, `ATTACH`, `MAP_SHM`, `UNMAP_SHM`.
    RawObjectPayload {
        object: u64,
    }
}

wire_struct! {
    /// `DETACH` payload (section 7.3).
    RawAttachmentPayload {
        attachment: u64,
    }
}

wire_struct! {
    /// `MAP` payload (section 7.3).
    RawMapPayload {
        attachment: u64,
        dir: u32,
        max_entries: u32,
        ctx: u64,
    }
}

wire_struct! {
    /// `UNMAP` payload (section 7.3).
    RawUnmapPayload {
        mapping: u64,
        ctx: u64,
    }
}

wire_struct! {
    /// `PIN`/`UNPIN` payload (section 7.3).
    RawPinPayload {
        attachment: u64,
        ctx: u64,
    }
}

wire_struct! {
    /// `ACQUIRE_FINI` payload (section 7.4).
    RawCtxPayload {
        ctx: u64,
    }
}

wire_struct! {
    /// `LOCK`/`UNLOCK` payload (section 7.4).
    RawLockPayload {
        ctx: u64,
        object: u64,
    }
}

wire_struct! {
    /// `BEGIN_CPU_ACCESS`/`END_CPU_ACCESS` payload (section 7.5).
    RawCpuAccessPayload {
        object: u64,
        dir: u32,
        reserved: u32,
    }
}

wire_struct! {
    /// `TRANSFER_TO_HOST`/`TRANSFER_FROM_HOST` payload (section 7.5).
    RawTransferPayload {
        object: u64,
        offset: u64,
        len: u64,
    }
}

wire_struct! {
    /// `FENCE_ATTACH` payload (section 7.6).
    RawFenceAttachPayload {
        ctx: u64,
        object: u64,
        usage: u32,
        reserved: u32,
    }
}

wire_struct! {
    /// `FENCE_SIGNAL` payload (section 7.6).
    RawFenceSignalPayload {
        fence: u64,
        error: u32,
        reserved: u32,
    }
}

wire_struct! {
    /// `WAIT` payload (section 7.6).
    RawWaitPayload {
        object: u64,
        usage: u32,
        reserved: u32,
        timeout_ns: u64,
    }
}

// Sizes the contract states (sections 3, 4, 7, 8). With every field
// naturally aligned, a matching size also rules out hidden padding.
const _: () = assert!(size_of::<RawReqHdr>() == 16);
const _: () = assert!(size_of::<RawRespHdr>() == 16);
const _: () = assert!(size_of::<RawSegment>() == 16);
const _: () = assert!(size_of::<RawEvent>() == 32);
const _: () = assert!(size_of::<RawConfig>() == 24);
const _: () = assert!(size_of::<RawInfo>() == 80);
const _: () = assert!(size_of::<RawObjectReply>() == 40);
const _: () = assert!(size_of::<RawUuidReply>() == 16);
const _: () = assert!(size_of::<RawAttachReply>() == 8);
const _: () = assert!(size_of::<RawMapReplyFixed>() == 32);
const _: () = assert!(size_of::<RawAcquireReply>() == 16);
const _: () = assert!(size_of::<RawShmReply>() == 16);
const _: () = assert!(size_of::<RawFenceReply>() == 8);
const _: () = assert!(size_of::<RawCancelPayload>() == 8);
const _: () = assert!(size_of::<RawCreatePayload>() == 16);
const _: () = assert!(size_of::<RawOpenPayload>() == 48);
const _: () = assert!(size_of::<RawObjectPayload>() == 8);
const _: () = assert!(size_of::<RawAttachmentPayload>() == 8);
const _: () = assert!(size_of::<RawMapPayload>() == 24);
const _: () = assert!(size_of::<RawUnmapPayload>() == 16);
const _: () = assert!(size_of::<RawPinPayload>() == 16);
const _: () = assert!(size_of::<RawCtxPayload>() == 8);
const _: () = assert!(size_of::<RawLockPayload>() == 16);
const _: () = assert!(size_of::<RawCpuAccessPayload>() == 16);
const _: () = assert!(size_of::<RawTransferPayload>() == 24);
const _: () = assert!(size_of::<RawFenceAttachPayload>() == 24);
const _: () = assert!(size_of::<RawFenceSignalPayload>() == 16);
const _: () = assert!(size_of::<RawWaitPayload>() == 24);

// Offsets worth pinning on their own: the ones after a run of le32 fields,
// where a reordering would keep the size but move the field.
const _: () = assert!(offset_of!(RawReqHdr, tag) == 8);
const _: () = assert!(offset_of!(RawRespHdr, tag) == 8);
const _: () = assert!(offset_of!(RawEvent, object) == 8);
const _: () = assert!(offset_of!(RawConfig, shm_size) == 8);
const _: () = assert!(offset_of!(RawConfig, max_segments) == 16);
const _: () = assert!(offset_of!(RawInfo, page_size) == 24);
const _: () = assert!(offset_of!(RawInfo, max_pending_events) == 60);
const _: () = assert!(offset_of!(RawInfo, max_bytes) == 64);
const _: () = assert!(offset_of!(RawObjectReply, uuid) == 8);
const _: () = assert!(offset_of!(RawObjectReply, size) == 24);
const _: () = assert!(offset_of!(RawObjectReply, obj_flags) == 32);
const _: () = assert!(offset_of!(RawMapReplyFixed, nr_entries) == 16);
const _: () = assert!(offset_of!(RawMapReplyFixed, space) == 24);
const _: () = assert!(offset_of!(RawMapPayload, dir) == 8);
const _: () = assert!(offset_of!(RawMapPayload, ctx) == 16);
const _: () = assert!(offset_of!(RawOpenPayload, name) == 16);
const _: () = assert!(offset_of!(RawWaitPayload, timeout_ns) == 16);
