// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `parse_request`: one test per rule of sections 4 and 7.
#![allow(clippy::unwrap_used)]

use virtio_dmabuf_protocol::*;

/// Plenty of writable room for any fixed reply.
const ROOM: usize = 4096;
const TAG: u64 = 0x1122_3344_5566_7788;

fn hdr(opcode: u32, flags: u32, tag: u64) -> Vec<u8> {
    RequestHeader { opcode, flags, tag }.to_bytes().to_vec()
}

fn req(opcode: Opcode, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = hdr(opcode as u32, flags, TAG);
    bytes.extend_from_slice(payload);
    bytes
}

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

fn le64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn parse(bytes: &[u8]) -> Result<Request, ParseError> {
    parse_request(bytes, ROOM).map(|(_, request)| request)
}

fn status(bytes: &[u8], writable_len: usize) -> Status {
    parse_request(bytes, writable_len).unwrap_err().status
}

/// A well-formed payload for every opcode (zeroed fields are valid everywhere).
fn minimal_payload(opcode: Opcode) -> Vec<u8> {
    vec![0; opcode.payload_size()]
}

fn inval_with_tag(opcode: Opcode) -> ParseError {
    ParseError {
        status: Status::Inval,
        tag: Some(TAG),
        opcode: Some(opcode),
    }
}

// ---- framing, opcode ----

#[test]
fn short_header_is_einval_without_tag() {
    let full = hdr(Opcode::GetInfo as u32, 0, TAG);
    for len in 0..REQ_HDR_SIZE {
        let err = parse_request(&full[..len], ROOM).unwrap_err();
        assert_eq!(
            err,
            ParseError {
                status: Status::Inval,
                tag: None,
                opcode: None
            }
        );
    }
}

#[test]
fn unknown_opcode_is_enosys_with_tag() {
    for opcode in [0, 0x0004, 0x0104, 0x0206, 0x0600, u32::MAX] {
        let err = parse_request(&hdr(opcode, 0, TAG), ROOM).unwrap_err();
        assert_eq!(
            err,
            ParseError {
                status: Status::NoSys,
                tag: Some(TAG),
                opcode: None
            }
        );
    }
}

#[test]
fn unknown_opcode_is_enosys_before_length_and_flag_checks() {
    // No payload, unknown flags, a writable part with no room for anything
    // beyond the header: still ENOSYS, as its lengths cannot be known.
    let err = parse_request(&hdr(0x0999, u32::MAX, TAG), RESP_HDR_SIZE).unwrap_err();
    assert_eq!(err.status, Status::NoSys);
}

#[test]
fn every_opcode_parses_with_a_minimal_payload() {
    for opcode in Opcode::ALL {
        let (header, request) = parse_request(&req(opcode, 0, &minimal_payload(opcode)), ROOM)
            .unwrap_or_else(|e| panic!("{opcode}: {e}"));
        assert_eq!(request.opcode(), opcode);
        assert_eq!(header.tag, TAG);
    }
}

#[test]
fn error_echoes_tag_and_opcode() {
    let err = parse_request(&req(Opcode::Map, 0, &[]), ROOM).unwrap_err();
    assert_eq!(err, inval_with_tag(Opcode::Map));
}

// ---- lengths ----

#[test]
fn short_payload_is_einval() {
    for opcode in Opcode::ALL.into_iter().filter(|op| op.payload_size() > 0) {
        let payload = minimal_payload(opcode);
        for len in 0..payload.len() {
            let err = parse_request(&req(opcode, 0, &payload[..len]), ROOM).unwrap_err();
            assert_eq!(
                err,
                inval_with_tag(opcode),
                "{opcode} with {len} payload bytes"
            );
        }
    }
}

#[test]
fn writable_too_short_for_fixed_reply_is_einval() {
    for opcode in Opcode::ALL {
        let bytes = req(opcode, 0, &minimal_payload(opcode));
        let needed = RESP_HDR_SIZE + opcode.fixed_reply_size();
        assert!(
            parse_request(&bytes, needed).is_ok(),
            "{opcode} at exactly {needed}"
        );
        if opcode.fixed_reply_size() > 0 {
            assert_eq!(status(&bytes, needed - 1), Status::Inval, "{opcode}");
        }
    }
}

#[test]
fn writable_shorter_than_response_header_is_einval_not_a_panic() {
    // The caller answers these with used.len = 0; the parser must just not panic.
    for writable_len in 0..RESP_HDR_SIZE {
        assert_eq!(
            status(&req(Opcode::Release, 0, &le64(1)), writable_len),
            Status::Inval
        );
    }
}

#[test]
fn trailing_readable_bytes_are_ignored() {
    let bytes = cat(&[&le64(7), &[0xAA; 13]]);
    assert_eq!(
        parse(&req(Opcode::Release, 0, &bytes)).unwrap(),
        Request::Release { object: 7 }
    );
    assert_eq!(
        parse(&req(Opcode::GetInfo, 0, &[1, 2, 3])).unwrap(),
        Request::GetInfo
    );
}

// ---- reserved fields ----

#[test]
fn reserved_field_nonzero_is_einval() {
    // (opcode, offset of its `le32 reserved` in the payload), section 7.
    let cases = [
        (Opcode::Create, 12),
        (Opcode::BeginCpuAccess, 12),
        (Opcode::EndCpuAccess, 12),
        (Opcode::FenceAttach, 20),
        (Opcode::FenceSignal, 12),
        (Opcode::Wait, 12),
    ];
    for (opcode, offset) in cases {
        for bit in [0x1u32, 0x8000_0000] {
            let mut payload = minimal_payload(opcode);
            payload[offset..offset + 4].copy_from_slice(&le32(bit));
            let err = parse_request(&req(opcode, 0, &payload), ROOM).unwrap_err();
            assert_eq!(err, inval_with_tag(opcode), "{opcode} reserved {bit:#x}");
        }
    }
}

// ---- flags and enum values ----

#[test]
fn unknown_flag_bits_are_einval() {
    for opcode in Opcode::ALL {
        let payload = minimal_payload(opcode);
        let unknown = !opcode.valid_flags();
        for bit in (0..32).map(|b| 1u32 << b).filter(|b| b & unknown != 0) {
            let err = parse_request(&req(opcode, bit, &payload), ROOM).unwrap_err();
            assert_eq!(err, inval_with_tag(opcode), "{opcode} flag {bit:#x}");
        }
    }
}

#[test]
fn dir_none_is_einval() {
    for dir in [3u32, 4, u32::MAX] {
        let map = cat(&[&le64(1), &le32(dir), &le32(4), &le64(0)]);
        assert_eq!(status(&req(Opcode::Map, 0, &map), ROOM), Status::Inval);
        let access = cat(&[&le64(1), &le32(dir), &le32(0)]);
        assert_eq!(
            status(&req(Opcode::BeginCpuAccess, 0, &access), ROOM),
            Status::Inval
        );
        assert_eq!(
            status(&req(Opcode::EndCpuAccess, 0, &access), ROOM),
            Status::Inval
        );
    }
}

#[test]
fn every_direction_below_none_is_accepted() {
    for (value, dir) in [
        (0, Direction::Bidirectional),
        (1, Direction::ToDevice),
        (2, Direction::FromDevice),
    ] {
        let access = cat(&[&le64(9), &le32(value), &le32(0)]);
        assert_eq!(
            parse(&req(Opcode::EndCpuAccess, 0, &access)).unwrap(),
            Request::EndCpuAccess { object: 9, dir }
        );
    }
}

#[test]
fn fence_usage_above_bookkeep_is_einval() {
    for usage in [4u32, u32::MAX] {
        let attach = cat(&[&le64(1), &le64(2), &le32(usage), &le32(0)]);
        assert_eq!(
            status(&req(Opcode::FenceAttach, 0, &attach), ROOM),
            Status::Inval
        );
        let wait = cat(&[&le64(2), &le32(usage), &le32(0), &le64(0)]);
        assert_eq!(status(&req(Opcode::Wait, 0, &wait), ROOM), Status::Inval);
    }
}

#[test]
fn fence_usage_bookkeep_is_accepted() {
    let wait = cat(&[&le64(2), &le32(3), &le32(0), &le64(1000)]);
    assert_eq!(
        parse(&req(Opcode::Wait, 0, &wait)).unwrap(),
        Request::Wait {
            object: 2,
            usage: FenceUsage::Bookkeep,
            timeout_ns: 1000
        }
    );
}

// ---- CREATE (section 7.2) ----

fn create_payload(size: u64, nr_entries: u32, entries: &[(u64, u64)]) -> Vec<u8> {
    let mut p = cat(&[&le64(size), &le32(nr_entries), &le32(0)]);
    for (gpa, len) in entries {
        p.extend_from_slice(&le64(*gpa));
        p.extend_from_slice(&le64(*len));
    }
    p
}

#[test]
fn create_dynamic_with_cache_mapping_is_einval() {
    let flags = create_flags::DYNAMIC | create_flags::CACHE_MAPPING;
    let err = parse_request(
        &req(Opcode::Create, flags, &create_payload(4096, 0, &[])),
        ROOM,
    )
    .unwrap_err();
    assert_eq!(err, inval_with_tag(Opcode::Create));
}

#[test]
fn create_dynamic_with_guest_pages_is_einval() {
    let flags = create_flags::DYNAMIC | create_flags::GUEST_PAGES;
    let payload = create_payload(4096, 1, &[(0x1000, 4096)]);
    assert_eq!(
        status(&req(Opcode::Create, flags, &payload), ROOM),
        Status::Inval
    );
}

#[test]
fn create_entries_without_guest_pages_is_einval() {
    let payload = create_payload(4096, 1, &[(0x1000, 4096)]);
    assert_eq!(
        status(&req(Opcode::Create, 0, &payload), ROOM),
        Status::Inval
    );
}

#[test]
fn create_guest_pages_missing_entries_is_einval() {
    let mut payload = create_payload(8192, 2, &[(0x1000, 4096), (0x3000, 4096)]);
    payload.pop();
    assert_eq!(
        status(
            &req(Opcode::Create, create_flags::GUEST_PAGES, &payload),
            ROOM
        ),
        Status::Inval
    );
}

#[test]
fn create_huge_nr_entries_is_einval_without_allocating() {
    let payload = create_payload(4096, u32::MAX, &[(0x1000, 4096)]);
    assert_eq!(
        status(
            &req(Opcode::Create, create_flags::GUEST_PAGES, &payload),
            ROOM
        ),
        Status::Inval
    );
}

#[test]
fn create_guest_pages_entries_are_returned() {
    let payload = create_payload(8192, 2, &[(0x1000, 4096), (0x8000, 4096)]);
    assert_eq!(
        parse(&req(Opcode::Create, create_flags::GUEST_PAGES, &payload)).unwrap(),
        Request::Create {
            size: 8192,
            dynamic: false,
            cache_mapping: false,
            guest_pages: Some(vec![
                Segment {
                    addr: 0x1000,
                    len: 4096
                },
                Segment {
                    addr: 0x8000,
                    len: 4096
                },
            ]),
        }
    );
}

#[test]
fn create_guest_pages_with_cache_mapping_is_accepted() {
    let flags = create_flags::GUEST_PAGES | create_flags::CACHE_MAPPING;
    let request = parse(&req(
        Opcode::Create,
        flags,
        &create_payload(4096, 1, &[(0, 4096)]),
    ))
    .unwrap();
    assert!(matches!(
        request,
        Request::Create {
            cache_mapping: true,
            guest_pages: Some(_),
            ..
        }
    ));
}

#[test]
fn create_size_and_alignment_are_left_to_the_device() {
    // size 0, an unaligned entry and a sum that does not match: the device's checks.
    let payload = create_payload(0, 1, &[(0x123, 7)]);
    assert!(parse(&req(Opcode::Create, create_flags::GUEST_PAGES, &payload)).is_ok());
    assert_eq!(
        parse(&req(
            Opcode::Create,
            create_flags::DYNAMIC,
            &create_payload(0, 0, &[])
        ))
        .unwrap(),
        Request::Create {
            size: 0,
            dynamic: true,
            cache_mapping: false,
            guest_pages: None
        }
    );
}

// ---- OPEN (section 7.2) ----

fn open_payload(uuid: [u8; 16], name: &[u8]) -> Vec<u8> {
    let mut field = [0u8; NAME_LEN];
    field[..name.len()].copy_from_slice(name);
    cat(&[&uuid, &field])
}

#[test]
fn open_by_uuid_carries_the_uuid() {
    let uuid = [0x42; 16];
    assert_eq!(
        parse(&req(
            Opcode::Open,
            open_flags::BY_UUID,
            &open_payload(uuid, b"")
        ))
        .unwrap(),
        Request::Open {
            uuid: Some(uuid),
            name: vec![]
        }
    );
}

#[test]
fn open_without_by_uuid_has_no_uuid() {
    assert_eq!(
        parse(&req(Opcode::Open, 0, &open_payload([0x42; 16], b"camera0"))).unwrap(),
        Request::Open {
            uuid: None,
            name: b"camera0".to_vec()
        }
    );
}

#[test]
fn open_name_stops_at_first_nul() {
    let mut payload = open_payload([0; 16], b"abc");
    payload[16 + 4] = b'x'; // after the terminating NUL at index 3
    assert_eq!(
        parse(&req(Opcode::Open, 0, &payload)).unwrap(),
        Request::Open {
            uuid: None,
            name: b"abc".to_vec()
        }
    );
}

#[test]
fn open_name_without_nul_is_all_32_bytes() {
    let name = [b'n'; NAME_LEN];
    assert_eq!(
        parse(&req(Opcode::Open, 0, &open_payload([0; 16], &name))).unwrap(),
        Request::Open {
            uuid: None,
            name: name.to_vec()
        }
    );
}

// ---- ATTACH, LOCK, MAP_SHM flags ----

#[test]
fn flags_become_typed_fields() {
    let attach = req(Opcode::Attach, attach_flags::ALL, &le64(5));
    assert_eq!(
        parse(&attach).unwrap(),
        Request::Attach {
            object: 5,
            dynamic_importer: true,
            peer2peer: true
        }
    );
    let lock = req(Opcode::Lock, lock_flags::SLOW, &cat(&[&le64(3), &le64(5)]));
    assert_eq!(
        parse(&lock).unwrap(),
        Request::Lock {
            ctx: 3,
            object: 5,
            try_lock: false,
            slow: true
        }
    );
    let shm = req(Opcode::MapShm, map_shm_flags::WRITABLE, &le64(5));
    assert_eq!(
        parse(&shm).unwrap(),
        Request::MapShm {
            object: 5,
            writable: true
        }
    );
}

#[test]
fn lock_try_with_slow_is_left_to_the_device() {
    let lock = req(Opcode::Lock, lock_flags::ALL, &cat(&[&le64(3), &le64(5)]));
    assert!(matches!(
        parse(&lock).unwrap(),
        Request::Lock {
            try_lock: true,
            slow: true,
            ..
        }
    ));
}

// ---- MAP (section 7.3) ----

fn map_payload(max_entries: u32) -> Vec<u8> {
    cat(&[&le64(11), &le32(2), &le32(max_entries), &le64(13)])
}

#[test]
fn map_max_entries_is_limited_by_writable_room() {
    // Room for the header, the fixed reply and 3 entries plus a partial one.
    let writable_len = RESP_HDR_SIZE + MAP_REPLY_FIXED_SIZE + 3 * SEGMENT_SIZE + 15;
    let (_, request) =
        parse_request(&req(Opcode::Map, 0, &map_payload(100)), writable_len).unwrap();
    assert_eq!(
        request,
        Request::Map {
            attachment: 11,
            dir: Direction::FromDevice,
            max_entries: 3,
            ctx: 13
        }
    );
}

#[test]
fn map_max_entries_keeps_a_smaller_request() {
    let (_, request) = parse_request(&req(Opcode::Map, 0, &map_payload(2)), ROOM).unwrap();
    assert!(matches!(request, Request::Map { max_entries: 2, .. }));
}

#[test]
fn map_with_room_for_the_fixed_reply_only_allows_zero_entries() {
    let writable_len = RESP_HDR_SIZE + MAP_REPLY_FIXED_SIZE;
    let (_, request) =
        parse_request(&req(Opcode::Map, 0, &map_payload(u32::MAX)), writable_len).unwrap();
    assert!(matches!(request, Request::Map { max_entries: 0, .. }));
}

// ---- TRANSFER (section 7.5) ----

fn transfer_payload(len: u64) -> Vec<u8> {
    cat(&[&le64(1), &le64(4096), &le64(len)])
}

#[test]
fn transfer_to_host_carries_exactly_len_bytes() {
    let bytes = req(
        Opcode::TransferToHost,
        0,
        &cat(&[&transfer_payload(4), b"dataEXTRA"]),
    );
    assert_eq!(
        parse(&bytes).unwrap(),
        Request::TransferToHost {
            object: 1,
            offset: 4096,
            data: b"data".to_vec()
        }
    );
}

#[test]
fn transfer_to_host_missing_data_is_einval() {
    let bytes = req(
        Opcode::TransferToHost,
        0,
        &cat(&[&transfer_payload(5), b"data"]),
    );
    assert_eq!(
        parse_request(&bytes, ROOM).unwrap_err(),
        inval_with_tag(Opcode::TransferToHost)
    );
}

#[test]
fn transfer_to_host_huge_len_is_einval() {
    let bytes = req(
        Opcode::TransferToHost,
        0,
        &cat(&[&transfer_payload(u64::MAX), b"data"]),
    );
    assert_eq!(status(&bytes, ROOM), Status::Inval);
}

#[test]
fn transfer_from_host_needs_writable_room_for_len() {
    let bytes = req(Opcode::TransferFromHost, 0, &transfer_payload(100));
    assert_eq!(status(&bytes, RESP_HDR_SIZE + 99), Status::Inval);
    let (_, request) = parse_request(&bytes, RESP_HDR_SIZE + 100).unwrap();
    assert_eq!(
        request,
        Request::TransferFromHost {
            object: 1,
            offset: 4096,
            len: 100
        }
    );
    let huge = req(Opcode::TransferFromHost, 0, &transfer_payload(u64::MAX));
    assert_eq!(status(&huge, usize::MAX), Status::Inval);
}

// ---- the rest of the payloads, field by field ----

#[test]
fn single_field_payloads_decode() {
    let v = le64(0xDEAD_BEEF_0000_0001);
    let n = 0xDEAD_BEEF_0000_0001;
    assert_eq!(
        parse(&req(Opcode::Cancel, 0, &v)).unwrap(),
        Request::Cancel { tag: n }
    );
    assert_eq!(
        parse(&req(Opcode::ExportUuid, 0, &v)).unwrap(),
        Request::ExportUuid { object: n }
    );
    assert_eq!(
        parse(&req(Opcode::Detach, 0, &v)).unwrap(),
        Request::Detach { attachment: n }
    );
    assert_eq!(
        parse(&req(Opcode::AcquireFini, 0, &v)).unwrap(),
        Request::AcquireFini { ctx: n }
    );
    assert_eq!(
        parse(&req(Opcode::UnmapShm, 0, &v)).unwrap(),
        Request::UnmapShm { object: n }
    );
}

#[test]
fn two_field_payloads_decode_in_wire_order() {
    let p = cat(&[&le64(1), &le64(2)]);
    assert_eq!(
        parse(&req(Opcode::Unmap, 0, &p)).unwrap(),
        Request::Unmap { mapping: 1, ctx: 2 }
    );
    assert_eq!(
        parse(&req(Opcode::Pin, 0, &p)).unwrap(),
        Request::Pin {
            attachment: 1,
            ctx: 2
        }
    );
    assert_eq!(
        parse(&req(Opcode::Unpin, 0, &p)).unwrap(),
        Request::Unpin {
            attachment: 1,
            ctx: 2
        }
    );
    assert_eq!(
        parse(&req(Opcode::Unlock, 0, &p)).unwrap(),
        Request::Unlock { ctx: 1, object: 2 }
    );
    let signal = cat(&[&le64(7), &le32(110), &le32(0)]);
    assert_eq!(
        parse(&req(Opcode::FenceSignal, 0, &signal)).unwrap(),
        Request::FenceSignal {
            fence: 7,
            error: 110
        }
    );
    let attach = cat(&[&le64(1), &le64(2), &le32(1), &le32(0)]);
    assert_eq!(
        parse(&req(Opcode::FenceAttach, 0, &attach)).unwrap(),
        Request::FenceAttach {
            ctx: 1,
            object: 2,
            usage: FenceUsage::Write,
            host: false,
        }
    );
}
