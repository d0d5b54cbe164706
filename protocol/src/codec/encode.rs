// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Types to bytes: a guest driver encodes a request ([`encode_request`]),
//! the device its reply ([`encode_response`]).

use super::*;
use crate::wire::*;

fn request_flags(request: &Request) -> u32 {
    let bit = |on: bool, flag: u32| if on { flag } else { 0 };
    match request {
        Request::Create {
            dynamic,
            cache_mapping,
            guest_pages,
            ..
        } => {
            bit(*dynamic, create_flags::DYNAMIC)
                | bit(guest_pages.is_some(), create_flags::GUEST_PAGES)
                | bit(*cache_mapping, create_flags::CACHE_MAPPING)
        }
        Request::Open { uuid, .. } => bit(uuid.is_some(), open_flags::BY_UUID),
        Request::Attach {
            dynamic_importer,
            peer2peer,
            ..
        } => {
            bit(*dynamic_importer, attach_flags::DYNAMIC_IMPORTER)
                | bit(*peer2peer, attach_flags::PEER2PEER)
        }
        Request::Lock { try_lock, slow, .. } => {
            bit(*try_lock, lock_flags::TRY) | bit(*slow, lock_flags::SLOW)
        }
        Request::MapShm { writable, .. } => bit(*writable, map_shm_flags::WRITABLE),
        Request::FenceAttach { host, .. } => bit(*host, fence_attach_flags::HOST),
        _ => 0,
    }
}

/// The readable part a guest driver puts on the controlq for `request`:
/// header, payload, then `CREATE` entries or `TRANSFER_TO_HOST` data.
///
/// Flags are rebuilt from the typed fields. What the wire cannot hold is
/// cut: an `OPEN` name is written up to 32 bytes (and [`parse_request`]
/// stops at its first NUL); a list longer than `u32::MAX` entries is not
/// representable. `MAP`'s `max_entries` is written as given; the driver
/// must also give the device that much writable room (section 7.3).
pub fn encode_request(tag: u64, request: &Request) -> Vec<u8> {
    let header = RequestHeader {
        opcode: request.opcode() as u32,
        flags: request_flags(request),
        tag,
    };
    let mut out = Vec::with_capacity(REQ_HDR_SIZE + request.opcode().payload_size());
    out.extend_from_slice(&header.to_bytes());
    let u64_payload = |out: &mut Vec<u8>, value: u64| out.extend_from_slice(&value.to_le_bytes());
    match request {
        Request::GetInfo | Request::ResetSession | Request::AcquireInit => {}
        Request::Cancel { tag } => {
            out.extend_from_slice(&RawCancelPayload { tag: *tag }.to_le_bytes())
        }
        Request::Create {
            size, guest_pages, ..
        } => {
            let entries = guest_pages.as_deref().unwrap_or_default();
            let fixed = RawCreatePayload {
                size: *size,
                nr_entries: u32::try_from(entries.len()).unwrap_or(u32::MAX),
                reserved: 0,
            };
            out.extend_from_slice(&fixed.to_le_bytes());
            for entry in entries {
                out.extend_from_slice(&segment_bytes(entry));
            }
        }
        Request::Open { uuid, name } => {
            let mut name_field = [0u8; NAME_LEN];
            for (dst, src) in name_field.iter_mut().zip(name) {
                *dst = *src;
            }
            let p = RawOpenPayload {
                uuid: uuid.unwrap_or_default(),
                name: name_field,
            };
            out.extend_from_slice(&p.to_le_bytes());
        }
        Request::Release { object }
        | Request::ExportUuid { object }
        | Request::Attach { object, .. }
        | Request::MapShm { object, .. }
        | Request::UnmapShm { object } => {
            out.extend_from_slice(&RawObjectPayload { object: *object }.to_le_bytes());
        }
        Request::Detach { attachment } => u64_payload(&mut out, *attachment),
        Request::Map {
            attachment,
            dir,
            max_entries,
            ctx,
        } => {
            let p = RawMapPayload {
                attachment: *attachment,
                dir: *dir as u32,
                max_entries: *max_entries,
                ctx: *ctx,
            };
            out.extend_from_slice(&p.to_le_bytes());
        }
        Request::Unmap { mapping, ctx } => {
            let p = RawUnmapPayload {
                mapping: *mapping,
                ctx: *ctx,
            };
            out.extend_from_slice(&p.to_le_bytes());
        }
        Request::Pin { attachment, ctx } | Request::Unpin { attachment, ctx } => {
            let p = RawPinPayload {
                attachment: *attachment,
                ctx: *ctx,
            };
            out.extend_from_slice(&p.to_le_bytes());
        }
        Request::AcquireFini { ctx } => u64_payload(&mut out, *ctx),
        Request::Lock { ctx, object, .. } | Request::Unlock { ctx, object } => {
            let p = RawLockPayload {
                ctx: *ctx,
                object: *object,
            };
            out.extend_from_slice(&p.to_le_bytes());
        }
        Request::BeginCpuAccess { object, dir } | Request::EndCpuAccess { object, dir } => {
            let p = RawCpuAccessPayload {
                object: *object,
                dir: *dir as u32,
                reserved: 0,
            };
            out.extend_from_slice(&p.to_le_bytes());
        }
        Request::TransferToHost {
            object,
            offset,
            data,
        } => {
            let p = RawTransferPayload {
                object: *object,
                offset: *offset,
                len: u64::try_from(data.len()).unwrap_or(u64::MAX),
            };
            out.extend_from_slice(&p.to_le_bytes());
            out.extend_from_slice(data);
        }
        Request::TransferFromHost {
            object,
            offset,
            len,
        } => {
            let p = RawTransferPayload {
                object: *object,
                offset: *offset,
                len: *len,
            };
            out.extend_from_slice(&p.to_le_bytes());
        }
        Request::FenceAttach {
            ctx, object, usage, ..
        } => {
            let p = RawFenceAttachPayload {
                ctx: *ctx,
                object: *object,
                usage: *usage as u32,
                reserved: 0,
            };
            out.extend_from_slice(&p.to_le_bytes());
        }
        Request::FenceSignal { fence, error } => {
            let p = RawFenceSignalPayload {
                fence: *fence,
                error: *error,
                reserved: 0,
            };
            out.extend_from_slice(&p.to_le_bytes());
        }
        Request::Wait {
            object,
            usage,
            timeout_ns,
        } => {
            let p = RawWaitPayload {
                object: *object,
                usage: *usage as u32,
                reserved: 0,
                timeout_ns: *timeout_ns,
            };
            out.extend_from_slice(&p.to_le_bytes());
        }
    }
    out
}

fn segment_bytes(segment: &Segment) -> [u8; SEGMENT_SIZE] {
    RawSegment {
        addr: segment.addr,
        len: segment.len,
    }
    .to_le_bytes()
}

/// The bytes of the writable part for `response`: header and reply.
///
/// An `Err` is the response header alone (section 4: `used.len` = 16);
/// `Reply::MapOverflow` is the `EOVERFLOW` header plus the fixed `MAP` reply
/// with only `nr_entries` set. `Err(Status::Ok)` is a caller bug and is
/// written as given (a bare OK header).
pub fn encode_response(tag: u64, response: &Response) -> Vec<u8> {
    let mut out = Vec::with_capacity(RESP_HDR_SIZE + MAP_REPLY_FIXED_SIZE);
    encode_response_into(tag, response, &mut out);
    out
}

/// [`encode_response`] into `out` (emptied first), so a caller can reuse
/// one buffer for every response.
pub fn encode_response_into(tag: u64, response: &Response, out: &mut Vec<u8>) {
    let header = RawRespHdr {
        status: response_status(response) as u32,
        reserved: 0,
        tag,
    };
    out.clear();
    out.extend_from_slice(&header.to_le_bytes());
    let Ok(reply) = response else {
        return;
    };
    match reply {
        Reply::Empty => {}
        Reply::Info(info) => out.extend_from_slice(&info.to_bytes()),
        Reply::Object(object) => out.extend_from_slice(&object.to_bytes()),
        Reply::Uuid(uuid) => out.extend_from_slice(&RawUuidReply { uuid: *uuid }.to_le_bytes()),
        Reply::Attachment(attachment) => out.extend_from_slice(
            &RawAttachReply {
                attachment: *attachment,
            }
            .to_le_bytes(),
        ),
        Reply::Map(map) => {
            let fixed = RawMapReplyFixed {
                mapping: map.mapping,
                generation: map.generation,
                nr_entries: u32::try_from(map.entries.len()).unwrap_or(u32::MAX),
                map_flags: map.map_flags,
                space: map.space as u32,
                reserved: 0,
            };
            out.reserve(map.entries.len().saturating_mul(SEGMENT_SIZE));
            out.extend_from_slice(&fixed.to_le_bytes());
            for entry in &map.entries {
                out.extend_from_slice(&segment_bytes(entry));
            }
        }
        Reply::MapOverflow { needed } => {
            let fixed = RawMapReplyFixed {
                nr_entries: *needed,
                ..RawMapReplyFixed::default()
            };
            out.extend_from_slice(&fixed.to_le_bytes());
        }
        Reply::Acquire { ctx, stamp } => out.extend_from_slice(
            &RawAcquireReply {
                ctx: *ctx,
                stamp: *stamp,
            }
            .to_le_bytes(),
        ),
        Reply::Shm { shm_offset, len } => {
            let raw = RawShmReply {
                shm_offset: *shm_offset,
                len: *len,
            };
            out.extend_from_slice(&raw.to_le_bytes());
        }
        Reply::Fence(fence) => {
            out.extend_from_slice(&RawFenceReply { fence: *fence }.to_le_bytes())
        }
        Reply::Data(data) => out.extend_from_slice(data),
    }
}
