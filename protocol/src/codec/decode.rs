// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Bytes to types: the device parses a request chain ([`parse_request`]),
//! a guest driver decodes the device's reply ([`decode_response`]).

use super::*;
use crate::wire::*;

impl Opcode {
    /// Size of the fixed part of this opcode's request payload, after the
    /// request header (section 7). `CREATE` entries and `TRANSFER_TO_HOST`
    /// data follow it.
    pub fn payload_size(self) -> usize {
        match self {
            Opcode::GetInfo | Opcode::ResetSession | Opcode::AcquireInit => 0,
            Opcode::Cancel => RawCancelPayload::SIZE,
            Opcode::Create => RawCreatePayload::SIZE,
            Opcode::Open => RawOpenPayload::SIZE,
            Opcode::Release
            | Opcode::ExportUuid
            | Opcode::Attach
            | Opcode::MapShm
            | Opcode::UnmapShm => RawObjectPayload::SIZE,
            Opcode::Detach => RawAttachmentPayload::SIZE,
            Opcode::Map => RawMapPayload::SIZE,
            Opcode::Unmap => RawUnmapPayload::SIZE,
            Opcode::Pin | Opcode::Unpin => RawPinPayload::SIZE,
            Opcode::AcquireFini => RawCtxPayload::SIZE,
            Opcode::Lock | Opcode::Unlock => RawLockPayload::SIZE,
            Opcode::BeginCpuAccess | Opcode::EndCpuAccess => RawCpuAccessPayload::SIZE,
            Opcode::TransferToHost | Opcode::TransferFromHost => RawTransferPayload::SIZE,
            Opcode::FenceAttach => RawFenceAttachPayload::SIZE,
            Opcode::FenceSignal => RawFenceSignalPayload::SIZE,
            Opcode::Wait => RawWaitPayload::SIZE,
        }
    }
}

impl RequestHeader {
    /// The 16 wire bytes of the header.
    pub fn to_bytes(&self) -> [u8; REQ_HDR_SIZE] {
        RawReqHdr {
            opcode: self.opcode,
            flags: self.flags,
            tag: self.tag,
        }
        .to_le_bytes()
    }

    /// The header at the start of `bytes`; `None` if shorter than 16 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<RequestHeader> {
        let raw = RawReqHdr::from_le_bytes(bytes)?;
        Some(RequestHeader {
            opcode: raw.opcode,
            flags: raw.flags,
            tag: raw.tag,
        })
    }
}

/// Decodes the readable bytes of one chain. `writable_len` is the size of the
/// chain's writable part (at least the response header, checked by the caller).
///
/// Checks run in the order of section 4: framing (the header), lengths (the
/// fixed payload, room for the fixed reply, then `CREATE` entries and
/// `TRANSFER` data), reserved fields, flag bits, then combinations and enum
/// values. `ENOSYS` is decided as soon as the header is read: the length of
/// an unknown opcode's payload is unknown, so no length check can come first.
///
/// Every failure other than `ENOSYS` is `EINVAL`; `tag` is `None` only when
/// `readable` is shorter than the header. A `writable_len` below 16 is also
/// `EINVAL` here, but the contract wants `used.len = 0` for it: the caller
/// must catch that first. Readable bytes past what the opcode needs are
/// ignored. Nothing here allocates more than `readable` holds.
pub fn parse_request(
    readable: &[u8],
    writable_len: usize,
) -> Result<(RequestHeader, Request), ParseError> {
    let header = RequestHeader::from_bytes(readable).ok_or(ParseError {
        status: Status::Inval,
        tag: None,
        opcode: None,
    })?;
    let Some(opcode) = Opcode::from_u32(header.opcode) else {
        return Err(ParseError {
            status: Status::NoSys,
            tag: Some(header.tag),
            opcode: None,
        });
    };
    let body = readable.get(REQ_HDR_SIZE..).unwrap_or_default();
    parse_body(opcode, header.flags, body, writable_len)
        .map(|request| (header, request))
        .map_err(|status| ParseError {
            status,
            tag: Some(header.tag),
            opcode: Some(opcode),
        })
}

/// The fixed part of a `TRANSFER_TO_HOST` whose data is left where the
/// chain holds it (see [`parse_transfer_to_host`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferHead {
    pub object: u64,
    pub offset: u64,
    /// The data is the first `len` bytes after the fixed payload.
    pub len: u64,
}

/// [`parse_request`] of a `TRANSFER_TO_HOST` without reading its data:
/// `readable` starts with the header and the fixed payload (bytes past
/// them are ignored), and `data_available` readable bytes follow the
/// payload in the chain. The same checks run in the same order with the
/// same answers, so a device can copy the data once, from where it is.
/// A header of any other opcode is `EINVAL` (with its tag).
pub fn parse_transfer_to_host(
    readable: &[u8],
    data_available: usize,
    writable_len: usize,
) -> Result<(RequestHeader, TransferHead), ParseError> {
    let header = RequestHeader::from_bytes(readable).ok_or(ParseError {
        status: Status::Inval,
        tag: None,
        opcode: None,
    })?;
    let opcode = Opcode::TransferToHost;
    let failed = |status| ParseError {
        status,
        tag: Some(header.tag),
        opcode: Opcode::from_u32(header.opcode),
    };
    if header.opcode != opcode as u32 {
        return Err(failed(Status::Inval));
    }
    let body = readable.get(REQ_HDR_SIZE..).unwrap_or_default();
    let payload = body
        .get(..opcode.payload_size())
        .ok_or(failed(Status::Inval))?;
    check_body(opcode, header.flags, payload, data_available, writable_len).map_err(failed)?;
    let p = payload_as(RawTransferPayload::from_le_bytes, payload).map_err(failed)?;
    let head = TransferHead {
        object: p.object,
        offset: p.offset,
        len: p.len,
    };
    Ok((header, head))
}

/// The checks and decoding after the header, in section 4's order.
fn parse_body(
    opcode: Opcode,
    flags: u32,
    body: &[u8],
    writable_len: usize,
) -> Result<Request, Status> {
    let payload = body.get(..opcode.payload_size()).ok_or(Status::Inval)?;
    let tail = body.get(opcode.payload_size()..).unwrap_or_default();
    let reply_room = check_body(opcode, flags, payload, tail.len(), writable_len)?;
    // Combinations and enum values.
    decode_payload(opcode, flags, payload, tail, reply_room)
}

/// The checks after the header but for combinations and enum values, in
/// section 4's order, given the fixed payload and how many readable bytes
/// follow it; returns the room for the reply after its header.
fn check_body(
    opcode: Opcode,
    flags: u32,
    payload: &[u8],
    tail_len: usize,
    writable_len: usize,
) -> Result<usize, Status> {
    // Lengths.
    let reply_room = writable_len
        .checked_sub(RESP_HDR_SIZE)
        .ok_or(Status::Inval)?;
    if reply_room < opcode.fixed_reply_size() {
        return Err(Status::Inval);
    }
    check_variable_lengths(opcode, flags, payload, tail_len, reply_room)?;

    // Reserved fields (section 4: must be zero).
    if let Some(reserved) = reserved_field(opcode, payload)? {
        if reserved != 0 {
            return Err(Status::Inval);
        }
    }

    // Flags: unknown bits (section 4).
    if flags & !opcode.valid_flags() != 0 {
        return Err(Status::Inval);
    }
    Ok(reply_room)
}

/// The lengths that depend on payload fields: `CREATE` entries, the
/// `TRANSFER` data in the readable or the writable part (section 7.5).
fn check_variable_lengths(
    opcode: Opcode,
    flags: u32,
    payload: &[u8],
    tail_len: usize,
    reply_room: usize,
) -> Result<(), Status> {
    match opcode {
        Opcode::Create if flags & create_flags::GUEST_PAGES != 0 => {
            let fixed = RawCreatePayload::from_le_bytes(payload).ok_or(Status::Inval)?;
            let needed = usize::try_from(fixed.nr_entries)
                .ok()
                .and_then(|n| n.checked_mul(RawSegment::SIZE))
                .ok_or(Status::Inval)?;
            if tail_len < needed {
                return Err(Status::Inval);
            }
        }
        Opcode::TransferToHost => {
            let fixed = RawTransferPayload::from_le_bytes(payload).ok_or(Status::Inval)?;
            if !fits(fixed.len, tail_len) {
                return Err(Status::Inval);
            }
        }
        Opcode::TransferFromHost => {
            let fixed = RawTransferPayload::from_le_bytes(payload).ok_or(Status::Inval)?;
            if !fits(fixed.len, reply_room) {
                return Err(Status::Inval);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Whether a guest-given `len` fits in `room` bytes.
fn fits(len: u64, room: usize) -> bool {
    u64::try_from(room).map_or(true, |room| len <= room)
}

/// The `le32 reserved` of opcodes whose payload has one (section 7).
fn reserved_field(opcode: Opcode, payload: &[u8]) -> Result<Option<u32>, Status> {
    let reserved = match opcode {
        Opcode::Create => RawCreatePayload::from_le_bytes(payload).map(|p| p.reserved),
        Opcode::BeginCpuAccess | Opcode::EndCpuAccess => {
            RawCpuAccessPayload::from_le_bytes(payload).map(|p| p.reserved)
        }
        Opcode::FenceAttach => RawFenceAttachPayload::from_le_bytes(payload).map(|p| p.reserved),
        Opcode::FenceSignal => RawFenceSignalPayload::from_le_bytes(payload).map(|p| p.reserved),
        Opcode::Wait => RawWaitPayload::from_le_bytes(payload).map(|p| p.reserved),
        _ => return Ok(None),
    };
    reserved.map(Some).ok_or(Status::Inval)
}

fn direction(value: u32) -> Result<Direction, Status> {
    // Section 7: NONE (3) and anything larger are EINVAL everywhere.
    Direction::from_u32(value).ok_or(Status::Inval)
}

fn fence_usage(value: u32) -> Result<FenceUsage, Status> {
    FenceUsage::from_u32(value).ok_or(Status::Inval)
}

/// Reads a payload struct; the caller checked the length, so `None` cannot
/// happen, but it is still `EINVAL` rather than a panic.
fn payload_as<T>(decode: fn(&[u8]) -> Option<T>, payload: &[u8]) -> Result<T, Status> {
    decode(payload).ok_or(Status::Inval)
}

/// Builds the typed request once lengths, reserved fields and flag bits
/// passed; what is left are flag combinations and enum values.
fn decode_payload(
    opcode: Opcode,
    flags: u32,
    payload: &[u8],
    tail: &[u8],
    reply_room: usize,
) -> Result<Request, Status> {
    let object = || payload_as(RawObjectPayload::from_le_bytes, payload).map(|p| p.object);
    Ok(match opcode {
        Opcode::GetInfo => Request::GetInfo,
        Opcode::ResetSession => Request::ResetSession,
        Opcode::Cancel => Request::Cancel {
            tag: payload_as(RawCancelPayload::from_le_bytes, payload)?.tag,
        },
        Opcode::Create => decode_create(flags, payload, tail)?,
        Opcode::Open => decode_open(flags, payload)?,
        Opcode::Release => Request::Release { object: object()? },
        Opcode::ExportUuid => Request::ExportUuid { object: object()? },
        Opcode::Attach => Request::Attach {
            object: object()?,
            dynamic_importer: flags & attach_flags::DYNAMIC_IMPORTER != 0,
            peer2peer: flags & attach_flags::PEER2PEER != 0,
        },
        Opcode::Detach => Request::Detach {
            attachment: payload_as(RawAttachmentPayload::from_le_bytes, payload)?.attachment,
        },
        Opcode::Map => {
            let p = payload_as(RawMapPayload::from_le_bytes, payload)?;
            // Section 7.3: entries that do not fit the writable part are an
            // EOVERFLOW like a too small max_entries, so the device only
            // needs the smaller of the two.
            let room = reply_room.saturating_sub(MAP_REPLY_FIXED_SIZE) / SEGMENT_SIZE;
            let max_entries =
                u32::try_from(room).map_or(p.max_entries, |room| p.max_entries.min(room));
            Request::Map {
                attachment: p.attachment,
                dir: direction(p.dir)?,
                max_entries,
                ctx: p.ctx,
            }
        }
        Opcode::Unmap => {
            let p = payload_as(RawUnmapPayload::from_le_bytes, payload)?;
            Request::Unmap {
                mapping: p.mapping,
                ctx: p.ctx,
            }
        }
        Opcode::Pin | Opcode::Unpin => {
            let p = payload_as(RawPinPayload::from_le_bytes, payload)?;
            let (attachment, ctx) = (p.attachment, p.ctx);
            if opcode == Opcode::Pin {
                Request::Pin { attachment, ctx }
            } else {
                Request::Unpin { attachment, ctx }
            }
        }
        Opcode::AcquireInit => Request::AcquireInit,
        Opcode::AcquireFini => Request::AcquireFini {
            ctx: payload_as(RawCtxPayload::from_le_bytes, payload)?.ctx,
        },
        Opcode::Lock => {
            let p = payload_as(RawLockPayload::from_le_bytes, payload)?;
            // TRY together with SLOW is passed on: section 7.4 does not
            // forbid it, the device decides.
            Request::Lock {
                ctx: p.ctx,
                object: p.object,
                try_lock: flags & lock_flags::TRY != 0,
                slow: flags & lock_flags::SLOW != 0,
            }
        }
        Opcode::Unlock => {
            let p = payload_as(RawLockPayload::from_le_bytes, payload)?;
            Request::Unlock {
                ctx: p.ctx,
                object: p.object,
            }
        }
        Opcode::BeginCpuAccess | Opcode::EndCpuAccess => {
            let p = payload_as(RawCpuAccessPayload::from_le_bytes, payload)?;
            let (object, dir) = (p.object, direction(p.dir)?);
            if opcode == Opcode::BeginCpuAccess {
                Request::BeginCpuAccess { object, dir }
            } else {
                Request::EndCpuAccess { object, dir }
            }
        }
        Opcode::MapShm => Request::MapShm {
            object: object()?,
            writable: flags & map_shm_flags::WRITABLE != 0,
        },
        Opcode::UnmapShm => Request::UnmapShm { object: object()? },
        Opcode::TransferToHost => {
            let p = payload_as(RawTransferPayload::from_le_bytes, payload)?;
            // Copy only bytes that are there: `len` was checked against the
            // readable tail, never used to size an allocation by itself.
            let data = usize::try_from(p.len)
                .ok()
                .and_then(|len| tail.get(..len))
                .ok_or(Status::Inval)?;
            Request::TransferToHost {
                object: p.object,
                offset: p.offset,
                data: data.to_vec(),
            }
        }
        Opcode::TransferFromHost => {
            let p = payload_as(RawTransferPayload::from_le_bytes, payload)?;
            Request::TransferFromHost {
                object: p.object,
                offset: p.offset,
                len: p.len,
            }
        }
        Opcode::FenceAttach => {
            let p = payload_as(RawFenceAttachPayload::from_le_bytes, payload)?;
            let usage = fence_usage(p.usage)?;
            let host = flags & fence_attach_flags::HOST != 0;
            // A host reservation has no BOOKKEEP fences to install into.
            if host && usage == FenceUsage::Bookkeep {
                return Err(Status::Inval);
            }
            Request::FenceAttach {
                ctx: p.ctx,
                object: p.object,
                usage,
                host,
            }
        }
        Opcode::FenceSignal => {
            let p = payload_as(RawFenceSignalPayload::from_le_bytes, payload)?;
            Request::FenceSignal {
                fence: p.fence,
                error: p.error,
            }
        }
        Opcode::Wait => {
            let p = payload_as(RawWaitPayload::from_le_bytes, payload)?;
            Request::Wait {
                object: p.object,
                usage: fence_usage(p.usage)?,
                timeout_ns: p.timeout_ns,
            }
        }
    })
}

/// `CREATE` (section 7.2). Size, alignment, guest RAM and `max_segments`
/// checks need the device's configuration and are the device's.
fn decode_create(flags: u32, payload: &[u8], tail: &[u8]) -> Result<Request, Status> {
    let p = payload_as(RawCreatePayload::from_le_bytes, payload)?;
    let dynamic = flags & create_flags::DYNAMIC != 0;
    let cache_mapping = flags & create_flags::CACHE_MAPPING != 0;
    let guest = flags & create_flags::GUEST_PAGES != 0;
    // A dynamic exporter cannot cache mappings (`dma_buf_export` refuses it)
    // and guest-placed objects are always static exporters (section 6).
    if dynamic && (cache_mapping || guest) {
        return Err(Status::Inval);
    }
    let guest_pages = if guest {
        let len = usize::try_from(p.nr_entries)
            .ok()
            .and_then(|n| n.checked_mul(RawSegment::SIZE))
            .ok_or(Status::Inval)?;
        let bytes = tail.get(..len).ok_or(Status::Inval)?;
        let entries = bytes
            .chunks_exact(RawSegment::SIZE)
            .map(|chunk| {
                RawSegment::from_le_bytes(chunk).map(|s| Segment {
                    addr: s.addr,
                    len: s.len,
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or(Status::Inval)?;
        Some(entries)
    } else if p.nr_entries != 0 {
        return Err(Status::Inval);
    } else {
        None
    };
    Ok(Request::Create {
        size: p.size,
        dynamic,
        cache_mapping,
        guest_pages,
    })
}

/// `OPEN` (section 7.2).
fn decode_open(flags: u32, payload: &[u8]) -> Result<Request, Status> {
    let p = payload_as(RawOpenPayload::from_le_bytes, payload)?;
    let name_len = p.name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    let name = p.name.get(..name_len).unwrap_or_default().to_vec();
    Ok(Request::Open {
        uuid: (flags & open_flags::BY_UUID != 0).then_some(p.uuid),
        name,
    })
}

/// Decodes the `used.len` bytes the device wrote for a request of `opcode`
/// (the guest driver's side of [`encode_response`]).
///
/// Returns the echoed tag and the response. A failed request is `Err(status)`
/// (bytes after its header are ignored), except `EOVERFLOW` from `MAP`, which
/// must carry the fixed reply and becomes [`Reply::MapOverflow`]. An opcode
/// without a reply gives [`Reply::Empty`]; `TRANSFER_FROM_HOST` gives every
/// byte after the header as [`Reply::Data`]. Reserved fields the device
/// wrote are not checked: a reader of device output ignores them.
pub fn decode_response(opcode: Opcode, bytes: &[u8]) -> Result<(u64, Response), DecodeError> {
    let header = RawRespHdr::from_le_bytes(bytes).ok_or(DecodeError::Short {
        needed: RESP_HDR_SIZE,
        got: bytes.len(),
    })?;
    let status =
        Status::from_u32(header.status).ok_or(DecodeError::UnknownStatus(header.status))?;
    let body = bytes.get(RESP_HDR_SIZE..).unwrap_or_default();
    let short = |needed: usize| DecodeError::Short {
        needed: RESP_HDR_SIZE.saturating_add(needed),
        got: bytes.len(),
    };
    let response = match status {
        Status::Ok => Ok(decode_reply(opcode, body).map_err(|needed| match needed {
            ReplyError::Short(needed) => short(needed),
            ReplyError::Space(value) => DecodeError::UnknownAddressSpace(value),
        })?),
        Status::Overflow if opcode == Opcode::Map => {
            let fixed = RawMapReplyFixed::from_le_bytes(body).ok_or(short(MAP_REPLY_FIXED_SIZE))?;
            Ok(Reply::MapOverflow {
                needed: fixed.nr_entries,
            })
        }
        other => Err(other),
    };
    Ok((header.tag, response))
}

/// A reply body that does not decode: `Short(bytes the layout needs)`, or a
/// bad `space`.
enum ReplyError {
    Short(usize),
    Space(u32),
}

fn decode_reply(opcode: Opcode, body: &[u8]) -> Result<Reply, ReplyError> {
    fn read<T>(decode: fn(&[u8]) -> Option<T>, body: &[u8], size: usize) -> Result<T, ReplyError> {
        decode(body).ok_or(ReplyError::Short(size))
    }
    Ok(match opcode {
        Opcode::GetInfo => Reply::Info(read(Info::from_bytes, body, INFO_SIZE)?),
        Opcode::Create | Opcode::Open => {
            Reply::Object(read(ObjectReply::from_bytes, body, OBJECT_REPLY_SIZE)?)
        }
        Opcode::ExportUuid => {
            Reply::Uuid(read(RawUuidReply::from_le_bytes, body, RawUuidReply::SIZE)?.uuid)
        }
        Opcode::Attach => Reply::Attachment(
            read(RawAttachReply::from_le_bytes, body, RawAttachReply::SIZE)?.attachment,
        ),
        Opcode::FenceAttach => {
            Reply::Fence(read(RawFenceReply::from_le_bytes, body, RawFenceReply::SIZE)?.fence)
        }
        Opcode::AcquireInit => {
            let raw = read(RawAcquireReply::from_le_bytes, body, RawAcquireReply::SIZE)?;
            Reply::Acquire {
                ctx: raw.ctx,
                stamp: raw.stamp,
            }
        }
        Opcode::MapShm => {
            let raw = read(RawShmReply::from_le_bytes, body, RawShmReply::SIZE)?;
            Reply::Shm {
                shm_offset: raw.shm_offset,
                len: raw.len,
            }
        }
        Opcode::Map => {
            let fixed = read(RawMapReplyFixed::from_le_bytes, body, MAP_REPLY_FIXED_SIZE)?;
            let needed = usize::try_from(fixed.nr_entries)
                .ok()
                .and_then(|n| n.checked_mul(SEGMENT_SIZE))
                .and_then(|n| n.checked_add(MAP_REPLY_FIXED_SIZE))
                .unwrap_or(usize::MAX);
            // Check the bytes are there before building the list.
            let entry_bytes = body
                .get(MAP_REPLY_FIXED_SIZE..needed)
                .ok_or(ReplyError::Short(needed))?;
            let entries = entry_bytes
                .chunks_exact(SEGMENT_SIZE)
                .map(|chunk| {
                    RawSegment::from_le_bytes(chunk).map(|s| Segment {
                        addr: s.addr,
                        len: s.len,
                    })
                })
                .collect::<Option<Vec<_>>>()
                .ok_or(ReplyError::Short(needed))?;
            Reply::Map(MapReply {
                mapping: fixed.mapping,
                generation: fixed.generation,
                map_flags: fixed.map_flags,
                space: AddressSpace::from_u32(fixed.space).ok_or(ReplyError::Space(fixed.space))?,
                entries,
            })
        }
        Opcode::TransferFromHost => Reply::Data(body.to_vec()),
        _ => Reply::Empty,
    })
}
