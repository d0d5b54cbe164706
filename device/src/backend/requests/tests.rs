//! Tests of the request queues and the chains in flight.

use super::*;

#[test]
fn readable_bound_follows_the_opcode() {
    let hdr = |opcode: Opcode| RequestHeader {
        opcode: opcode as u32,
        flags: 0,
        tag: 0,
    };
    assert_eq!(readable_bound(None, 8), REQ_HDR_SIZE);
    assert_eq!(
        readable_bound(
            Some(&RequestHeader {
                opcode: 0xdead,
                flags: 0,
                tag: 1
            }),
            8
        ),
        REQ_HDR_SIZE
    );
    assert_eq!(
        readable_bound(Some(&hdr(Opcode::Release)), 8),
        REQ_HDR_SIZE + 8
    );
    assert_eq!(
        readable_bound(Some(&hdr(Opcode::Create)), 8),
        REQ_HDR_SIZE + Opcode::Create.payload_size() + 8 * SEGMENT_SIZE
    );
    assert_eq!(
        readable_bound(Some(&hdr(Opcode::TransferToHost)), 8),
        REQ_HDR_SIZE + Opcode::TransferToHost.payload_size() + TRANSFER_MAX as usize + 1
    );
}

#[test]
fn transfers_above_the_limit_are_einval() {
    let from = Request::TransferFromHost {
        object: 1,
        offset: 0,
        len: TRANSFER_MAX + 1,
    };
    assert_eq!(check_limits(&from), Err(Status::Inval));
    let ok = Request::TransferFromHost {
        object: 1,
        offset: 0,
        len: TRANSFER_MAX,
    };
    assert_eq!(check_limits(&ok), Ok(()));
    let to = Request::TransferToHost {
        object: 1,
        offset: 0,
        data: vec![0; TRANSFER_MAX as usize + 1],
    };
    assert_eq!(check_limits(&to), Err(Status::Inval));
}

#[test]
fn segments_take_the_response_in_order_and_stop_at_a_bad_address() {
    let mem = GuestRam::from_ranges(&[(GuestAddress(0x1000), 0x1000)]).expect("mem");
    let segs = [(GuestAddress(0x1000), 4), (GuestAddress(0x1800), 8)];
    assert_eq!(write_segments(&mem, &segs, b"0123456789"), 10);
    let mut a = [0u8; 4];
    mem.read_slice(&mut a, GuestAddress(0x1000)).expect("read");
    assert_eq!(&a, b"0123");
    let mut b = [0u8; 6];
    mem.read_slice(&mut b, GuestAddress(0x1800)).expect("read");
    assert_eq!(&b, b"456789");
    let outside = [(GuestAddress(0x1000), 2), (GuestAddress(0x9000), 8)];
    assert_eq!(write_segments(&mem, &outside, b"abcdef"), 2);
}

#[test]
fn a_response_needs_room_for_its_header_or_nothing_is_written() {
    let mem = GuestRam::from_ranges(&[(GuestAddress(0x1000), 0x1000)]).expect("mem");
    let response = encode_response(7, &Err(Status::Canceled));
    let short = [(GuestAddress(0x1000), 8), (GuestAddress(0x1100), 7)];
    assert_eq!(write_response(&mem, &short, &response), 0);
    let enough = [(GuestAddress(0x1000), 8), (GuestAddress(0x1100), 8)];
    assert_eq!(write_response(&mem, &enough, &response), 16);
    assert_eq!(write_response(&mem, &enough, &[]), 0, "no response");
}
