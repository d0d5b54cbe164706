// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Property tests: the two directions of the codec agree, and no input
//! makes the parser panic.
#![allow(clippy::unwrap_used)]

use proptest::collection::vec;
use proptest::prelude::*;
use virtio_dmabuf_protocol::*;

fn direction() -> impl Strategy<Value = Direction> {
    prop_oneof![
        Just(Direction::Bidirectional),
        Just(Direction::ToDevice),
        Just(Direction::FromDevice),
    ]
}

fn usage() -> impl Strategy<Value = FenceUsage> {
    prop_oneof![
        Just(FenceUsage::Kernel),
        Just(FenceUsage::Write),
        Just(FenceUsage::Read),
        Just(FenceUsage::Bookkeep),
    ]
}

fn segment() -> impl Strategy<Value = Segment> {
    (any::<u64>(), any::<u64>()).prop_map(|(addr, len)| Segment { addr, len })
}

fn space() -> impl Strategy<Value = AddressSpace> {
    prop_oneof![
        Just(AddressSpace::Shm),
        Just(AddressSpace::GuestPhys),
        Just(AddressSpace::Object),
    ]
}

/// A `CREATE` that section 7.2 allows: DYNAMIC excludes CACHE_MAPPING and
/// GUEST_PAGES.
fn create() -> impl Strategy<Value = Request> {
    (
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(vec(segment(), 0..8)),
    )
        .prop_map(|(size, dynamic, cache_mapping, guest_pages)| {
            let dynamic = dynamic && !cache_mapping && guest_pages.is_none();
            Request::Create {
                size,
                dynamic,
                cache_mapping,
                guest_pages,
            }
        })
}

/// Names as parse returns them: at most 32 bytes, no NUL.
fn name() -> impl Strategy<Value = Vec<u8>> {
    vec(1u8..=255, 0..=NAME_LEN)
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::GetInfo),
        Just(Request::ResetSession),
        any::<u64>().prop_map(|tag| Request::Cancel { tag }),
        create(),
        (proptest::option::of(any::<[u8; 16]>()), name())
            .prop_map(|(uuid, name)| Request::Open { uuid, name }),
        any::<u64>().prop_map(|object| Request::Release { object }),
        any::<u64>().prop_map(|object| Request::ExportUuid { object }),
        (any::<u64>(), any::<bool>(), any::<bool>()).prop_map(
            |(object, dynamic_importer, peer2peer)| {
                Request::Attach {
                    object,
                    dynamic_importer,
                    peer2peer,
                }
            }
        ),
        any::<u64>().prop_map(|attachment| Request::Detach { attachment }),
        (any::<u64>(), direction(), any::<u32>(), any::<u64>()).prop_map(
            |(attachment, dir, max_entries, ctx)| {
                Request::Map {
                    attachment,
                    dir,
                    max_entries,
                    ctx,
                }
            }
        ),
        (any::<u64>(), any::<u64>()).prop_map(|(mapping, ctx)| Request::Unmap { mapping, ctx }),
        (any::<u64>(), any::<u64>()).prop_map(|(attachment, ctx)| Request::Pin { attachment, ctx }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(attachment, ctx)| Request::Unpin { attachment, ctx }),
        Just(Request::AcquireInit),
        any::<u64>().prop_map(|ctx| Request::AcquireFini { ctx }),
        (any::<u64>(), any::<u64>(), any::<bool>(), any::<bool>()).prop_map(
            |(ctx, object, try_lock, slow)| {
                Request::Lock {
                    ctx,
                    object,
                    try_lock,
                    slow,
                }
            }
        ),
        (any::<u64>(), any::<u64>()).prop_map(|(ctx, object)| Request::Unlock { ctx, object }),
        (any::<u64>(), direction())
            .prop_map(|(object, dir)| Request::BeginCpuAccess { object, dir }),
        (any::<u64>(), direction()).prop_map(|(object, dir)| Request::EndCpuAccess { object, dir }),
        (any::<u64>(), any::<bool>())
            .prop_map(|(object, writable)| Request::MapShm { object, writable }),
        any::<u64>().prop_map(|object| Request::UnmapShm { object }),
        (any::<u64>(), any::<u64>(), vec(any::<u8>(), 0..256)).prop_map(
            |(object, offset, data)| Request::TransferToHost {
                object,
                offset,
                data
            }
        ),
        // Lengths a writable part of usize::MAX bytes can take.
        (any::<u64>(), any::<u64>(), 0..=u64::MAX - 16).prop_map(|(object, offset, len)| {
            Request::TransferFromHost {
                object,
                offset,
                len,
            }
        }),
        (any::<u64>(), any::<u64>(), usage(), any::<bool>()).prop_map(
            |(ctx, object, usage, host)| Request::FenceAttach {
                ctx,
                object,
                usage,
                // The HOST flag with BOOKKEEP is refused by the parser.
                host: host && usage != FenceUsage::Bookkeep,
            }
        ),
        (any::<u64>(), any::<u32>())
            .prop_map(|(fence, error)| Request::FenceSignal { fence, error }),
        (any::<u64>(), usage(), any::<u64>()).prop_map(|(object, usage, timeout_ns)| {
            Request::Wait {
                object,
                usage,
                timeout_ns,
            }
        }),
    ]
}

fn info() -> impl Strategy<Value = Info> {
    (
        (
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
        ),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        ),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
        ),
    )
        .prop_map(|(a, b, c)| Info {
            version: a.0,
            caps: a.1,
            shm_size: a.2,
            max_object_size: a.3,
            page_size: a.4,
            provider: b.0,
            num_queues: b.1,
            max_segments: b.2,
            max_objects: b.3,
            max_attachments: b.4,
            max_contexts: c.0,
            max_fences: c.1,
            max_waiting: c.2,
            max_pending_events: c.3,
            max_bytes: c.4,
        })
}

fn error_status() -> impl Strategy<Value = Status> {
    proptest::sample::select(
        Status::ALL
            .into_iter()
            .filter(|s| *s != Status::Ok)
            .collect::<Vec<_>>(),
    )
}

/// Opcodes whose success reply is empty (section 7).
fn empty_reply_opcode() -> impl Strategy<Value = Opcode> {
    proptest::sample::select(
        Opcode::ALL
            .into_iter()
            .filter(|op| op.fixed_reply_size() == 0 && *op != Opcode::TransferFromHost)
            .collect::<Vec<_>>(),
    )
}

/// A response and an opcode that can produce it.
fn response() -> impl Strategy<Value = (Opcode, Response)> {
    prop_oneof![
        empty_reply_opcode().prop_map(|op| (op, Ok(Reply::Empty))),
        info().prop_map(|info| (Opcode::GetInfo, Ok(Reply::Info(info)))),
        (
            prop_oneof![Just(Opcode::Create), Just(Opcode::Open)],
            any::<u64>(),
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(|(op, object, uuid, size, obj_flags)| (
                op,
                Ok(Reply::Object(ObjectReply {
                    object,
                    uuid,
                    size,
                    obj_flags
                }))
            )),
        any::<[u8; 16]>().prop_map(|uuid| (Opcode::ExportUuid, Ok(Reply::Uuid(uuid)))),
        any::<u64>().prop_map(|a| (Opcode::Attach, Ok(Reply::Attachment(a)))),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            space(),
            vec(segment(), 0..16)
        )
            .prop_map(|(mapping, generation, map_flags, space, entries)| (
                Opcode::Map,
                Ok(Reply::Map(MapReply {
                    mapping,
                    generation,
                    map_flags,
                    space,
                    entries
                }))
            )),
        any::<u32>().prop_map(|needed| (Opcode::Map, Ok(Reply::MapOverflow { needed }))),
        (any::<u64>(), any::<u64>())
            .prop_map(|(ctx, stamp)| (Opcode::AcquireInit, Ok(Reply::Acquire { ctx, stamp }))),
        (any::<u64>(), any::<u64>())
            .prop_map(|(shm_offset, len)| (Opcode::MapShm, Ok(Reply::Shm { shm_offset, len }))),
        any::<u64>().prop_map(|fence| (Opcode::FenceAttach, Ok(Reply::Fence(fence)))),
        vec(any::<u8>(), 0..256).prop_map(|data| (Opcode::TransferFromHost, Ok(Reply::Data(data)))),
        // EOVERFLOW from MAP always carries the fixed reply (MapOverflow above).
        (
            proptest::sample::select(Opcode::ALL.to_vec()),
            error_status()
        )
            .prop_filter("MAP's EOVERFLOW is MapOverflow", |(op, status)| {
                !(*op == Opcode::Map && *status == Status::Overflow)
            })
            .prop_map(|(op, status)| (op, Err(status))),
    ]
}

/// A header with a known opcode and arbitrary flags, then arbitrary bytes:
/// gets past the opcode check far more often than random bytes do.
fn known_opcode_request() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::sample::select(Opcode::ALL.to_vec()),
        prop_oneof![Just(0u32), 0u32..8, any::<u32>()],
        any::<u64>(),
        vec(any::<u8>(), 0..128),
    )
        .prop_map(|(opcode, flags, tag, tail)| {
            let mut bytes = RequestHeader {
                opcode: opcode as u32,
                flags,
                tag,
            }
            .to_bytes()
            .to_vec();
            bytes.extend_from_slice(&tail);
            bytes
        })
}

fn writable_len() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..256, any::<usize>()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn every_valid_request_round_trips(tag in any::<u64>(), request in request()) {
        let bytes = encode_request(tag, &request);
        let (header, parsed) = parse_request(&bytes, usize::MAX).unwrap();
        prop_assert_eq!(header.tag, tag);
        prop_assert_eq!(header.opcode, request.opcode() as u32);
        prop_assert_eq!(parsed, request);
    }

    #[test]
    fn every_response_round_trips(tag in any::<u64>(), (opcode, response) in response()) {
        let bytes = encode_response(tag, &response);
        prop_assert_eq!(decode_response(opcode, &bytes), Ok((tag, response)));
    }

    /// The head-only parse of a `TRANSFER_TO_HOST` answers as the whole
    /// parse does, for any flags, payload, data length and reply room,
    /// whether the caller hands it just the head or more.
    #[test]
    fn transfer_head_parse_agrees_with_the_whole_parse(
        flags in prop_oneof![Just(0u32), any::<u32>()],
        tag in any::<u64>(),
        object in any::<u64>(),
        offset in any::<u64>(),
        len in prop_oneof![0u64..80, any::<u64>()],
        data in vec(any::<u8>(), 0..64),
        keep in prop_oneof![Just(usize::MAX), 0usize..120],
        extra in 0usize..8,
        writable_len in writable_len(),
    ) {
        let mut bytes = RequestHeader { opcode: Opcode::TransferToHost as u32, flags, tag }
            .to_bytes()
            .to_vec();
        bytes.extend_from_slice(&object.to_le_bytes());
        bytes.extend_from_slice(&offset.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&data);
        bytes.truncate(keep);
        let whole = parse_request(&bytes, writable_len);
        let fixed = REQ_HDR_SIZE + Opcode::TransferToHost.payload_size();
        let shown = bytes.len().min(fixed + extra);
        let available = bytes.len().saturating_sub(fixed);
        let head = parse_transfer_to_host(&bytes[..shown], available, writable_len);
        match (whole, head) {
            (Ok((h1, Request::TransferToHost { object, offset, data })), Ok((h2, t))) => {
                prop_assert_eq!(h1, h2);
                prop_assert_eq!((object, offset, data.len() as u64), (t.object, t.offset, t.len));
                prop_assert_eq!(&data[..], &bytes[fixed..fixed + data.len()]);
            }
            (Err(e1), Err(e2)) => prop_assert_eq!(e1, e2),
            (w, h) => prop_assert!(false, "whole {:?} but head {:?}", w, h),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_parse(bytes in vec(any::<u8>(), 0..256), writable_len in writable_len()) {
        let result = parse_request(&bytes, writable_len);
        if let Err(err) = result {
            // Only the two parse-level statuses, and a tag whenever a header was there.
            prop_assert!(matches!(err.status, Status::Inval | Status::NoSys));
            prop_assert_eq!(err.tag.is_some(), bytes.len() >= REQ_HDR_SIZE);
        }
    }

    #[test]
    fn known_opcode_with_arbitrary_payload_never_panics(
        bytes in known_opcode_request(),
        writable_len in writable_len(),
    ) {
        match parse_request(&bytes, writable_len) {
            Ok((header, request)) => {
                prop_assert_eq!(header.opcode, request.opcode() as u32);
                // What parses re-encodes to the bytes it came from, up to
                // what the parser drops or clamps.
                if !matches!(request, Request::Open { .. } | Request::Map { .. }) {
                    let encoded = encode_request(header.tag, &request);
                    prop_assert_eq!(&bytes[..encoded.len()], &encoded[..]);
                }
            }
            Err(err) => {
                prop_assert_eq!(err.status, Status::Inval);
                prop_assert!(err.opcode.is_some());
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_decode(bytes in vec(any::<u8>(), 0..256), opcode in proptest::sample::select(Opcode::ALL.to_vec())) {
        let _ = decode_response(opcode, &bytes);
        let _ = Event::from_bytes(&bytes);
    }

    #[test]
    fn config_read_never_panics_and_has_len_bytes(offset in any::<u32>(), len in any::<u32>()) {
        match Config::default().read(offset, len) {
            Some(bytes) => prop_assert_eq!(bytes.len(), len as usize),
            None => prop_assert!(offset.checked_add(len).is_none_or(|end| end > CONFIG_READ_MAX)),
        }
    }
}
