// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Replies, events, config space and the driver-side codec, against the
//! layouts of sections 3, 4, 7 and 8.
#![allow(clippy::unwrap_used)]

use virtio_dmabuf_protocol::*;

const TAG: u64 = 0x0102_0304_0506_0708;

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

/// Checks the response header and returns the reply after it.
fn reply_of(bytes: &[u8], status: Status) -> &[u8] {
    assert_eq!(u32_at(bytes, 0), status as u32, "status");
    assert_eq!(u32_at(bytes, 4), 0, "reserved");
    assert_eq!(u64_at(bytes, 8), TAG, "tag");
    &bytes[RESP_HDR_SIZE..]
}

// ---- responses (section 4, 7) ----

#[test]
fn error_response_is_header_only() {
    for status in Status::ALL.into_iter().filter(|s| *s != Status::Ok) {
        let bytes = encode_response(TAG, &Err(status));
        assert_eq!(bytes.len(), RESP_HDR_SIZE);
        assert!(reply_of(&bytes, status).is_empty());
    }
}

#[test]
fn empty_reply_is_ok_header_only() {
    let bytes = encode_response(TAG, &Ok(Reply::Empty));
    assert_eq!(bytes.len(), RESP_HDR_SIZE);
    reply_of(&bytes, Status::Ok);
}

#[test]
fn info_reply_is_80_bytes_at_spec_offsets() {
    let info = Info {
        version: 1,
        caps: caps::HOST_SHM | caps::FENCES,
        shm_size: 0x1_0000_0000,
        max_object_size: 2,
        page_size: 4096,
        provider: ProviderKind::Memfd as u32,
        num_queues: 3,
        max_segments: 4,
        max_objects: 5,
        max_attachments: 6,
        max_contexts: 7,
        max_fences: 8,
        max_waiting: 9,
        max_pending_events: 10,
        max_bytes: 11,
    };
    let bytes = encode_response(TAG, &Ok(Reply::Info(info)));
    let r = reply_of(&bytes, Status::Ok);
    assert_eq!(r.len(), INFO_SIZE);
    assert_eq!(u32_at(r, 0), 1);
    assert_eq!(u32_at(r, 4), caps::HOST_SHM | caps::FENCES);
    assert_eq!(u64_at(r, 8), 0x1_0000_0000);
    assert_eq!(u64_at(r, 16), 2);
    let le32s: Vec<u32> = (24..64).step_by(4).map(|o| u32_at(r, o)).collect();
    assert_eq!(le32s, [4096, 1, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert_eq!(u64_at(r, 64), 11);
    assert_eq!(u64_at(r, 72), 0, "reserved");
    assert_eq!(Info::from_bytes(r), Some(info));
}

#[test]
fn object_reply_is_40_bytes() {
    let object = ObjectReply {
        object: 9,
        uuid: [0xAB; 16],
        size: 8192,
        obj_flags: obj_flags::WRITABLE | obj_flags::REAL_DMABUF,
    };
    let bytes = encode_response(TAG, &Ok(Reply::Object(object)));
    let r = reply_of(&bytes, Status::Ok);
    assert_eq!(r.len(), OBJECT_REPLY_SIZE);
    assert_eq!(u64_at(r, 0), 9);
    assert_eq!(&r[8..24], &[0xAB; 16]);
    assert_eq!(u64_at(r, 24), 8192);
    assert_eq!(u32_at(r, 32), 0x18);
    assert_eq!(u32_at(r, 36), 0, "reserved");
}

#[test]
fn map_reply_is_fixed_part_then_entries() {
    let map = MapReply {
        mapping: 21,
        generation: 22,
        map_flags: map_flags::CACHED | map_flags::PINNED,
        space: AddressSpace::Object,
        entries: vec![
            Segment { addr: 0, len: 4096 },
            Segment {
                addr: 8192,
                len: 4096,
            },
        ],
    };
    let bytes = encode_response(TAG, &Ok(Reply::Map(map)));
    let r = reply_of(&bytes, Status::Ok);
    assert_eq!(r.len(), MAP_REPLY_FIXED_SIZE + 2 * SEGMENT_SIZE);
    assert_eq!(u64_at(r, 0), 21);
    assert_eq!(u64_at(r, 8), 22);
    assert_eq!(u32_at(r, 16), 2, "nr_entries");
    assert_eq!(u32_at(r, 20), 3, "map_flags");
    assert_eq!(u32_at(r, 24), AddressSpace::Object as u32);
    assert_eq!(u32_at(r, 28), 0, "reserved");
    assert_eq!((u64_at(r, 32), u64_at(r, 40)), (0, 4096));
    assert_eq!((u64_at(r, 48), u64_at(r, 56)), (8192, 4096));
}

#[test]
fn map_overflow_is_eoverflow_with_needed_count() {
    let bytes = encode_response(TAG, &Ok(Reply::MapOverflow { needed: 17 }));
    let r = reply_of(&bytes, Status::Overflow);
    assert_eq!(r.len(), MAP_REPLY_FIXED_SIZE);
    assert_eq!(u32_at(r, 16), 17);
    let mut others = r.to_vec();
    others[16..20].fill(0);
    assert!(others.iter().all(|b| *b == 0));
}

#[test]
fn small_replies_have_their_sizes() {
    let cases: [(Reply, usize); 5] = [
        (Reply::Uuid([1; 16]), 16),
        (Reply::Attachment(2), 8),
        (Reply::Acquire { ctx: 3, stamp: 4 }, 16),
        (
            Reply::Shm {
                shm_offset: 5,
                len: 6,
            },
            16,
        ),
        (Reply::Fence(7), 8),
    ];
    for (reply, size) in cases {
        let bytes = encode_response(TAG, &Ok(reply.clone()));
        assert_eq!(reply_of(&bytes, Status::Ok).len(), size, "{reply:?}");
    }
    let acquire = encode_response(TAG, &Ok(Reply::Acquire { ctx: 3, stamp: 4 }));
    assert_eq!((u64_at(&acquire, 16), u64_at(&acquire, 24)), (3, 4));
}

#[test]
fn data_reply_follows_header() {
    let bytes = encode_response(TAG, &Ok(Reply::Data(b"payload".to_vec())));
    assert_eq!(reply_of(&bytes, Status::Ok), b"payload");
}

#[test]
fn fixed_reply_sizes_match_encoded_replies() {
    let cases = [
        (Opcode::GetInfo, Reply::Info(Info::default())),
        (Opcode::Create, Reply::Object(ObjectReply::default())),
        (Opcode::ExportUuid, Reply::Uuid([0; 16])),
        (Opcode::Attach, Reply::Attachment(0)),
        (Opcode::FenceAttach, Reply::Fence(0)),
        (Opcode::AcquireInit, Reply::Acquire { ctx: 0, stamp: 0 }),
        (
            Opcode::MapShm,
            Reply::Shm {
                shm_offset: 0,
                len: 0,
            },
        ),
        (Opcode::Map, Reply::MapOverflow { needed: 0 }),
    ];
    for (opcode, reply) in cases {
        let len = encode_response(TAG, &Ok(reply)).len();
        assert_eq!(len, RESP_HDR_SIZE + opcode.fixed_reply_size(), "{opcode}");
    }
}

// ---- decode_response (driver side) ----

#[test]
fn decode_short_response_is_an_error() {
    assert_eq!(
        decode_response(Opcode::Release, &[0; 15]),
        Err(DecodeError::Short {
            needed: 16,
            got: 15
        })
    );
    let info = &encode_response(TAG, &Ok(Reply::Info(Info::default())))[..RESP_HDR_SIZE + 79];
    assert_eq!(
        decode_response(Opcode::GetInfo, info),
        Err(DecodeError::Short {
            needed: 96,
            got: 95
        })
    );
}

#[test]
fn decode_unknown_status_is_an_error() {
    let mut bytes = encode_response(TAG, &Ok(Reply::Empty));
    bytes[..4].copy_from_slice(&3u32.to_le_bytes());
    assert_eq!(
        decode_response(Opcode::Release, &bytes),
        Err(DecodeError::UnknownStatus(3))
    );
}

#[test]
fn decode_error_status_ignores_what_follows() {
    let mut bytes = encode_response(TAG, &Err(Status::Busy));
    bytes.extend_from_slice(&[0xFF; 40]);
    assert_eq!(
        decode_response(Opcode::Create, &bytes),
        Ok((TAG, Err(Status::Busy)))
    );
}

#[test]
fn decode_map_overflow_needs_the_fixed_part() {
    let bytes = encode_response(TAG, &Ok(Reply::MapOverflow { needed: 5 }));
    assert_eq!(
        decode_response(Opcode::Map, &bytes),
        Ok((TAG, Ok(Reply::MapOverflow { needed: 5 })))
    );
    assert_eq!(
        decode_response(Opcode::Map, &bytes[..RESP_HDR_SIZE]),
        Err(DecodeError::Short {
            needed: 48,
            got: 16
        })
    );
    // EOVERFLOW from any other opcode is a plain status.
    assert_eq!(
        decode_response(Opcode::Create, &bytes[..RESP_HDR_SIZE]),
        Ok((TAG, Err(Status::Overflow)))
    );
}

#[test]
fn decode_map_with_missing_entries_is_short() {
    let map = MapReply {
        mapping: 1,
        generation: 1,
        map_flags: 0,
        space: AddressSpace::Shm,
        entries: vec![Segment::default(); 2],
    };
    let bytes = encode_response(TAG, &Ok(Reply::Map(map)));
    assert_eq!(
        decode_response(Opcode::Map, &bytes[..bytes.len() - 1]),
        Err(DecodeError::Short {
            needed: bytes.len(),
            got: bytes.len() - 1
        })
    );
    // A huge nr_entries from a broken device is refused, not allocated.
    let mut huge = bytes.clone();
    huge[RESP_HDR_SIZE + 16..RESP_HDR_SIZE + 20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_response(Opcode::Map, &huge),
        Err(DecodeError::Short { .. })
    ));
}

#[test]
fn decode_map_with_unknown_space_is_an_error() {
    let map = MapReply {
        mapping: 1,
        generation: 1,
        map_flags: 0,
        space: AddressSpace::Shm,
        entries: vec![],
    };
    let mut bytes = encode_response(TAG, &Ok(Reply::Map(map)));
    bytes[RESP_HDR_SIZE + 24..RESP_HDR_SIZE + 28].copy_from_slice(&3u32.to_le_bytes());
    assert_eq!(
        decode_response(Opcode::Map, &bytes),
        Err(DecodeError::UnknownAddressSpace(3))
    );
}

#[test]
fn decode_transfer_from_host_takes_every_byte_after_the_header() {
    let bytes = encode_response(TAG, &Ok(Reply::Data(vec![9; 100])));
    assert_eq!(
        decode_response(Opcode::TransferFromHost, &bytes),
        Ok((TAG, Ok(Reply::Data(vec![9; 100]))))
    );
}

// ---- encode_request (driver side) ----

#[test]
fn encode_request_rebuilds_flags_from_fields() {
    let create = Request::Create {
        size: 4096,
        dynamic: false,
        cache_mapping: true,
        guest_pages: Some(vec![Segment {
            addr: 0x1000,
            len: 4096,
        }]),
    };
    let bytes = encode_request(TAG, &create);
    assert_eq!(u32_at(&bytes, 0), Opcode::Create as u32);
    assert_eq!(
        u32_at(&bytes, 4),
        create_flags::GUEST_PAGES | create_flags::CACHE_MAPPING
    );
    assert_eq!(u64_at(&bytes, 8), TAG);
    assert_eq!(u64_at(&bytes, 16), 4096);
    assert_eq!(u32_at(&bytes, 24), 1, "nr_entries");
    assert_eq!(u32_at(&bytes, 28), 0, "reserved");
    assert_eq!((u64_at(&bytes, 32), u64_at(&bytes, 40)), (0x1000, 4096));
    assert_eq!(bytes.len(), 48);
}

#[test]
fn encode_request_map_writes_max_entries_as_given() {
    let map = Request::Map {
        attachment: 1,
        dir: Direction::ToDevice,
        max_entries: 1000,
        ctx: 2,
    };
    let bytes = encode_request(TAG, &map);
    assert_eq!(bytes.len(), REQ_HDR_SIZE + 24);
    assert_eq!(u64_at(&bytes, 16), 1);
    assert_eq!(u32_at(&bytes, 24), 1, "dir");
    assert_eq!(u32_at(&bytes, 28), 1000);
    assert_eq!(u64_at(&bytes, 32), 2);
}

#[test]
fn encode_request_open_pads_the_name_with_nul() {
    let open = Request::Open {
        uuid: None,
        name: b"cam".to_vec(),
    };
    let bytes = encode_request(TAG, &open);
    assert_eq!(bytes.len(), REQ_HDR_SIZE + 48);
    assert_eq!(u32_at(&bytes, 4), 0, "no BY_UUID");
    assert_eq!(&bytes[32..35], b"cam");
    assert!(bytes[35..].iter().all(|b| *b == 0));
}

#[test]
fn encode_request_transfer_to_host_appends_the_data() {
    let transfer = Request::TransferToHost {
        object: 1,
        offset: 2,
        data: b"xyz".to_vec(),
    };
    let bytes = encode_request(TAG, &transfer);
    assert_eq!(u64_at(&bytes, 32), 3, "len");
    assert_eq!(&bytes[40..], b"xyz");
}

#[test]
fn encoded_requests_have_payload_size() {
    for opcode in Opcode::ALL {
        let (_, request) = parse_request(
            &[
                RequestHeader {
                    opcode: opcode as u32,
                    flags: 0,
                    tag: TAG,
                }
                .to_bytes()
                .as_slice(),
                &vec![0; opcode.payload_size()],
            ]
            .concat(),
            4096,
        )
        .unwrap();
        assert_eq!(
            encode_request(TAG, &request).len(),
            REQ_HDR_SIZE + opcode.payload_size(),
            "{opcode}"
        );
    }
}

// ---- events (section 8) ----

#[test]
fn event_layout_is_32_bytes() {
    let event = Event {
        kind: EventType::MoveNotify,
        object: 0x11,
        attachment: 0x22,
        data: 0x33,
    };
    let bytes = event.to_bytes();
    assert_eq!(bytes.len(), EVENT_SIZE);
    assert_eq!(u32_at(&bytes, 0), 1, "type");
    assert_eq!(u32_at(&bytes, 4), 0, "reserved");
    assert_eq!(u64_at(&bytes, 8), 0x11);
    assert_eq!(u64_at(&bytes, 16), 0x22);
    assert_eq!(u64_at(&bytes, 24), 0x33);
    assert_eq!(Event::from_bytes(&bytes), Some(event));
}

#[test]
fn event_type_values_follow_the_spec() {
    assert_eq!(EventType::MoveNotify as u32, 1);
    assert_eq!(EventType::Revoked as u32, 2);
    assert_eq!(EventType::Overflow as u32, 3);
}

#[test]
fn event_from_short_buffer_is_none() {
    let bytes = Event {
        kind: EventType::Revoked,
        object: 1,
        attachment: 0,
        data: 0,
    }
    .to_bytes();
    assert_eq!(Event::from_bytes(&bytes[..31]), None);
}

#[test]
fn event_from_longer_buffer_reads_the_first_32_bytes() {
    let event = Event {
        kind: EventType::Overflow,
        object: 0,
        attachment: 0,
        data: 12,
    };
    let mut bytes = event.to_bytes().to_vec();
    bytes.extend_from_slice(&[0xFF; 32]);
    assert_eq!(Event::from_bytes(&bytes), Some(event));
}

#[test]
fn event_of_unknown_type_is_none() {
    for kind in [0u32, 4, u32::MAX] {
        let mut bytes = [0u8; EVENT_SIZE];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        assert_eq!(Event::from_bytes(&bytes), None);
    }
}

// ---- config space (section 3) ----

fn config() -> Config {
    Config {
        num_queues: 3,
        page_size: 4096,
        shm_size: 0x4000_0000,
        max_segments: 256,
    }
}

#[test]
fn config_layout_is_24_bytes() {
    let bytes = config().to_bytes();
    assert_eq!(bytes.len(), CONFIG_SIZE);
    assert_eq!(u32_at(&bytes, 0), 3);
    assert_eq!(u32_at(&bytes, 4), 4096);
    assert_eq!(u64_at(&bytes, 8), 0x4000_0000);
    assert_eq!(u32_at(&bytes, 16), 256);
    assert_eq!(u32_at(&bytes, 20), 0, "reserved");
    assert_eq!(Config::from_bytes(&bytes), Some(config()));
}

#[test]
fn config_read_returns_the_requested_window() {
    let all = config().to_bytes();
    assert_eq!(config().read(0, 24).unwrap(), all);
    assert_eq!(config().read(4, 4).unwrap(), 4096u32.to_le_bytes());
    assert_eq!(config().read(8, 0).unwrap(), Vec::<u8>::new());
}

#[test]
fn config_read_past_end_reads_zero() {
    // QEMU asks for its own (larger) config size from offset 0.
    let read = config().read(0, 60).unwrap();
    assert_eq!(read.len(), 60);
    assert_eq!(&read[..24], &config().to_bytes());
    assert!(read[24..].iter().all(|b| *b == 0));
    // Straddling the end, and wholly past it.
    let tail = config().read(20, 8).unwrap();
    assert_eq!(tail, [0; 8]);
    let straddle = config().read(16, 8).unwrap();
    assert_eq!(&straddle[..4], &256u32.to_le_bytes());
    assert_eq!(config().read(100, 4).unwrap(), [0; 4]);
}

#[test]
fn config_read_overflow_is_refused() {
    assert_eq!(config().read(u32::MAX, 1), None);
    assert_eq!(config().read(1, u32::MAX), None);
    assert_eq!(config().read(u32::MAX, u32::MAX), None);
}

#[test]
fn config_read_above_limit_is_refused() {
    assert_eq!(config().read(0, CONFIG_READ_MAX + 1), None);
    assert_eq!(config().read(CONFIG_READ_MAX, 1), None);
    assert_eq!(config().read(CONFIG_READ_MAX - 4, 4).unwrap(), [0; 4]);
}
