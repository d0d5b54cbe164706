// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `parse_request` over arbitrary readable bytes and writable room (the
//! first four input bytes, little endian); nothing may panic, and:
//!
//! - a request that parses encodes back (`encode_request`) to bytes that
//!   parse to the same request with the same room;
//! - the largest reply the device could give it fits the room the parser
//!   accepted (section 4: room for the fixed reply, `MAP` entries up to
//!   `max_entries`, `TRANSFER_FROM_HOST` data), and decodes back;
//! - a refusal echoes the header's tag exactly when the header was there,
//!   and its response is a bare header that decodes back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_device_dmabuf_fuzz::Cursor;
use virtio_dmabuf_protocol::{
    decode_response, encode_request, encode_response, parse_request, AddressSpace, Info, MapReply,
    ObjectReply, Reply, Request, RequestHeader, Response, Segment, Status, REQ_HDR_SIZE,
    RESP_HDR_SIZE, SEGMENT_SIZE,
};

/// Replies up to this size are built and encoded; larger ones are only
/// measured.
const ENCODE_MAX: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let room = c.u32() as usize;
    let readable = c.rest();
    match parse_request(readable, room) {
        Ok((header, request)) => parsed(header, &request, readable, room),
        Err(e) => {
            let header = RequestHeader::from_bytes(readable);
            assert_eq!(e.tag, header.map(|h| h.tag), "the tag is echoed iff read");
            assert!(readable.len() >= REQ_HDR_SIZE || e.tag.is_none());
            assert_ne!(e.status, Status::Ok);
            let bytes = encode_response(e.tag.unwrap_or(0), &Err(e.status));
            assert_eq!(bytes.len(), RESP_HDR_SIZE);
            if let Some(opcode) = e.opcode {
                let (tag, back) = decode_response(opcode, &bytes).expect("decodes");
                assert_eq!((tag, back), (e.tag.unwrap_or(0), Err(e.status)));
            }
        }
    }
});

fn parsed(header: RequestHeader, request: &Request, readable: &[u8], room: usize) {
    let opcode = request.opcode();
    assert_eq!(opcode as u32, header.opcode);
    assert!(room >= RESP_HDR_SIZE + opcode.fixed_reply_size());

    // The canonical encoding parses to the same request.
    let again = encode_request(header.tag, request);
    assert!(again.len() <= readable.len(), "nothing invented");
    let (header2, request2) = parse_request(&again, room).expect("re-encoded request parses");
    assert_eq!(header2.tag, header.tag);
    assert_eq!(&request2, request);

    // The largest reply fits the room.
    let needed = RESP_HDR_SIZE
        + match request {
            Request::Map { max_entries, .. } => {
                opcode.fixed_reply_size() + (*max_entries as usize) * SEGMENT_SIZE
            }
            Request::TransferFromHost { len, .. } => usize::try_from(*len).unwrap_or(usize::MAX),
            _ => opcode.fixed_reply_size(),
        };
    assert!(
        needed <= room,
        "{opcode}: a {needed}-byte reply, {room} bytes of room"
    );
    if needed > ENCODE_MAX {
        return;
    }
    let response: Response = Ok(largest_reply(request));
    let bytes = encode_response(header.tag, &response);
    assert_eq!(bytes.len(), needed, "{opcode}");
    let (tag, back) = decode_response(opcode, &bytes).expect("reply decodes");
    assert_eq!(tag, header.tag);
    assert_eq!(back, response);
}

fn largest_reply(request: &Request) -> Reply {
    match request {
        Request::GetInfo => Reply::Info(Info {
            version: 1,
            caps: u32::MAX,
            shm_size: u64::MAX,
            max_object_size: u64::MAX,
            page_size: 4096,
            provider: 1,
            num_queues: 2,
            max_segments: u32::MAX,
            max_objects: u32::MAX,
            max_attachments: u32::MAX,
            max_contexts: u32::MAX,
            max_fences: u32::MAX,
            max_waiting: u32::MAX,
            max_pending_events: u32::MAX,
            max_bytes: u64::MAX,
        }),
        Request::Create { size, .. } => Reply::Object(ObjectReply {
            object: u64::MAX,
            uuid: [0xa5; 16],
            size: *size,
            obj_flags: 3,
        }),
        Request::Open { .. } => Reply::Object(ObjectReply {
            object: 1,
            uuid: [0x5a; 16],
            size: 4096,
            obj_flags: 1,
        }),
        Request::ExportUuid { .. } => Reply::Uuid([7; 16]),
        Request::Attach { .. } => Reply::Attachment(u64::MAX - 1),
        Request::Map { max_entries, .. } => Reply::Map(MapReply {
            mapping: 9,
            generation: 2,
            map_flags: 1,
            space: AddressSpace::Object,
            entries: (0..u64::from(*max_entries))
                .map(|i| Segment {
                    addr: i * 4096,
                    len: 4096,
                })
                .collect(),
        }),
        Request::AcquireInit => Reply::Acquire { ctx: 3, stamp: 4 },
        Request::MapShm { .. } => Reply::Shm {
            shm_offset: 4096,
            len: 8192,
        },
        Request::FenceAttach { .. } => Reply::Fence(11),
        Request::TransferFromHost { len, .. } => {
            Reply::Data(vec![0xee; usize::try_from(*len).unwrap_or(0)])
        }
        _ => Reply::Empty,
    }
}
