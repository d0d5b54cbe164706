// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Tests of the request queues and the chains in flight.

use super::chain::write_segments;
use super::*;
use vm_memory::{Bytes, GuestAddress};

#[test]
fn a_chain_token_names_one_chain_only_even_after_its_slot_is_reused() {
    let mut chains = Chains::default();
    let a = chains.insert(1, 7, Segments::default());
    let b = chains.insert(2, 7, Segments::default());
    assert_ne!(a, b);
    assert_eq!(chains.len(), 2);
    assert_eq!(
        chains.entries.remove(&a).map(|c| (c.queue, c.head)),
        Some((1, 7))
    );
    assert!(chains.entries.remove(&a).is_none(), "removed once");
    // The freed slot goes to the next chain under a token of its own: a
    // late completion for `a` finds nothing.
    let c = chains.insert(1, 9, Segments::default());
    assert_ne!(c, a);
    assert!(chains.entries.get_mut(&a).is_none());
    assert_eq!(chains.entries.get_mut(&c).map(|c| c.head), Some(9));
    // Taken order, by queue.
    let d = chains.insert(1, 3, Segments::default());
    assert_eq!(chains.entries.tokens_where(|c| c.queue == 1), vec![c, d]);
    assert_eq!(chains.entries.tokens_where(|c| c.queue == 2), vec![b]);
    assert_eq!(chains.taken(), 4);
    chains.clear();
    assert_eq!(chains.len(), 0);
    assert!(chains.entries.get_mut(&b).is_none());
    let e = chains.insert(1, 7, Segments::default());
    assert!(![a, b, c, d].contains(&e), "tokens are never reused");
}

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
    // The data stays in the chain: it is copied once, from there.
    assert_eq!(
        readable_bound(Some(&hdr(Opcode::TransferToHost)), 8),
        REQ_HDR_SIZE + Opcode::TransferToHost.payload_size()
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

#[test]
fn in_place_slices_follow_the_segments_across_regions() {
    // Two regions back to back: a descriptor over their border is two
    // host slices, each in its own mapping.
    let mem = GuestRam::from_ranges(&[
        (GuestAddress(0x1000), 0x1000),
        (GuestAddress(0x2000), 0x1000),
    ])
    .expect("mem");
    mem.write_slice(&[0xab; 0x20], GuestAddress(0x1ff0))
        .expect("write");
    let parts = [(GuestAddress(0x1000), 0x10), (GuestAddress(0x1fe0), 0x40)];
    let mut slices = Vec::new();
    // Skip the first descriptor and 16 bytes of the second: 0x30 bytes
    // from 0x1ff0, 0x10 of them before the border.
    chain::slices(&mem, &parts, 0x20, 0x30, &mut slices).expect("in memory");
    let lens: Vec<usize> = slices.iter().map(|s| s.len()).collect();
    assert_eq!(lens, [0x10, 0x20]);
    let mut first = [0u8; 0x10];
    slices[0].copy_to(&mut first[..]);
    assert_eq!(first, [0xab; 0x10]);

    slices.clear();
    assert_eq!(
        chain::slices(&mem, &parts, 0x20, 0x31, &mut slices),
        Err(Status::Fault),
        "more than the segments hold"
    );
    slices.clear();
    let outside = [(GuestAddress(0x2f00), 0x200)];
    assert_eq!(
        chain::slices(&mem, &outside, 0, 0x200, &mut slices),
        Err(Status::Fault),
        "past the end of guest memory"
    );
}

/// Chains in a mock split queue over real guest memory (16 KiB of RAM at 0;
/// the queue's rings at 0, buffers from 0x2000).
mod chains {
    use super::*;
    use crate::backend::requests::chain::chain_ends;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{DescriptorChain, Queue};

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn ram() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 0x4000)]).expect("guest RAM")
    }

    /// The chain whose descriptors are `descs` (index i at table slot i,
    /// head 0), as the back-end's queue iterator hands it out.
    fn chain_of<'m>(
        mem: &'m GuestRam,
        descs: &[(u64, u32, u16, u16)],
    ) -> DescriptorChain<&'m GuestRam> {
        let vq = MockSplitQueue::new(mem, 16);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(SplitDesc::new(addr, len, flags, next));
            vq.desc_table().store(i as u16, d).expect("store");
        }
        vq.avail().ring().ref_at(0).expect("avail slot").store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut iter = q.iter(mem).expect("iter");
        iter.next().expect("one chain")
    }

    #[test]
    fn a_chain_that_loops_or_leaves_its_table_does_not_end() {
        let mem = ram();
        let ends = chain_of(&mem, &[(0x2000, 16, NEXT, 1), (0x3000, 64, WRITE, 0)]);
        assert!(chain_ends(&ends, &mem));
        // 0 -> 1 -> 0 -> ...: the iterator stops after 16 descriptors,
        // at one that still says NEXT.
        let looped = chain_of(
            &mem,
            &[(0x2000, 16, NEXT, 1), (0x3000, 64, WRITE | NEXT, 0)],
        );
        assert!(!chain_ends(&looped, &mem));
        assert_eq!(looped.clone().count(), 16, "each descriptor seen 8 times");
        let self_loop = chain_of(&mem, &[(0x3000, 64, WRITE | NEXT, 0)]);
        assert!(!chain_ends(&self_loop, &mem));
        let off_the_table = chain_of(&mem, &[(0x2000, 16, NEXT, 99)]);
        assert!(!chain_ends(&off_the_table, &mem));
    }

    #[test]
    fn the_tag_of_a_header_in_ram_is_read_even_when_later_parts_are_not() {
        let mem = ram();
        let header = RequestHeader {
            opcode: Opcode::GetInfo as u32,
            flags: 0,
            tag: 0x5eed,
        };
        mem.write_slice(&header.to_bytes(), GuestAddress(0x2000 - 8))
            .expect("header");
        // The header split over two descriptors, then one far outside RAM.
        let chain = chain_of(
            &mem,
            &[
                (0x2000 - 8, 8, NEXT, 1),
                (0x2000, 8, NEXT, 2),
                (1 << 40, 16, NEXT, 3),
                (0x3000, 64, WRITE, 0),
            ],
        );
        assert!(
            chain.clone().reader(&mem).is_err(),
            "not all readable bytes are in RAM"
        );
        assert_eq!(header_tag(&chain::walk(&chain, &mem), &mem), Some(0x5eed));
        // A header that is itself outside RAM has no tag to echo.
        let chain = chain_of(&mem, &[(1 << 40, 16, NEXT, 1), (0x3000, 64, WRITE, 0)]);
        assert_eq!(header_tag(&chain::walk(&chain, &mem), &mem), None);
    }
    #[test]
    fn a_request_split_over_many_descriptors_reads_whole_and_bounded() {
        let mem = ram();
        let header = RequestHeader {
            opcode: Opcode::Release as u32,
            flags: 0,
            tag: 7,
        };
        let mut request = header.to_bytes().to_vec();
        request.extend_from_slice(&42u64.to_le_bytes());
        // Past what RELEASE reads: never read.
        request.extend_from_slice(&[0xee; 8]);
        mem.write_slice(&request, GuestAddress(0x2000))
            .expect("request");
        // Five readable descriptors (more than kept inline), three
        // writable ones.
        let chain = chain_of(
            &mem,
            &[
                (0x2000, 3, NEXT, 1),
                (0x2003, 5, NEXT, 2),
                (0x2008, 8, NEXT, 3),
                (0x2010, 1, NEXT, 4),
                (0x2011, 15, NEXT, 5),
                (0x3000, 8, WRITE | NEXT, 6),
                (0x3100, 8, WRITE | NEXT, 7),
                (0x3200, 48, WRITE, 0),
            ],
        );
        let mut bytes = vec![0xaa; 3];
        chain::read_request(&chain, &mem, 16, &mut bytes).expect("in RAM");
        assert_eq!(
            bytes,
            request[..REQ_HDR_SIZE + 8],
            "header and payload only"
        );
        let (segments, room) = chain::writable(&chain, &mem);
        assert_eq!(room, 64);
        assert_eq!(
            segments.as_slice(),
            &[
                (GuestAddress(0x3000), 8),
                (GuestAddress(0x3100), 8),
                (GuestAddress(0x3200), 48)
            ]
        );
    }

    #[test]
    fn a_part_outside_ram_is_a_fault_or_no_room() {
        let mem = ram();
        let chain = chain_of(
            &mem,
            &[
                (0x2000, 16, NEXT, 1),
                (1 << 40, 8, NEXT, 2),
                (0x3000, 64, WRITE, 0),
            ],
        );
        let mut bytes = Vec::new();
        assert_eq!(
            chain::read_request(&chain, &mem, 16, &mut bytes),
            Err(Status::Fault)
        );
        let chain = chain_of(
            &mem,
            &[
                (0x2000, 16, NEXT, 1),
                (0x3000, 64, WRITE | NEXT, 2),
                (1 << 40, 8, WRITE, 0),
            ],
        );
        assert_eq!(chain::writable(&chain, &mem).1, 0, "used.len 0");
        chain::read_request(&chain, &mem, 16, &mut bytes).expect("readable part in RAM");
        assert_eq!(
            bytes.len(),
            REQ_HDR_SIZE,
            "an unknown opcode reads its header"
        );
    }
}
