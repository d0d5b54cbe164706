// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Descriptor chains laid out in guest memory with virtio-queue's mock
//! split queue, served by the real back-end (`backend/requests/`): the
//! queue is kicked (also between chains, as the input says), the model's
//! timers fire, then the ring is stopped (`GET_VRING_BASE`) and the guest
//! disconnects. Checked (section 4):
//!
//! - every chain made available comes back exactly once: the used ring
//!   holds each head as often as the avail ring offered it, and no chain
//!   is left in flight after the stop;
//! - `used.len` is 0 or at least a response header, and never more than
//!   the bytes of the chain's distinct writable descriptors;
//! - after the disconnect the model holds nothing, and no fd is left open.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vhost_device_dmabuf::backend::guest_memory::GuestRam;
use vhost_device_dmabuf::fuzzing::{open_fds, ChainRig, RingLayout};
use vhost_device_dmabuf_fuzz::chain::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_dmabuf_protocol::RESP_HDR_SIZE;
use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Places buffers in the data area, wrapping around at the end of RAM.
struct Placer {
    next: u64,
}

impl Placer {
    fn place(&mut self, len: u16) -> u64 {
        let len = u64::from(len);
        if self.next + len > RAM {
            self.next = DATA_BASE;
        }
        let at = self.next;
        self.next += len;
        at
    }
}

/// `(addr, len, flags, next)` of one descriptor.
type Desc = (u64, u32, u16, u16);

fn apply(edit: &Edit, descs: &mut [Desc]) {
    if descs.is_empty() {
        return;
    }
    let d = &mut descs[usize::from(edit.desc) % descs.len()];
    match edit.kind % 6 {
        0 => d.2 ^= edit.value,
        1 => d.3 = edit.value,
        2 => d.0 = 1 << 40,
        3 => d.0 = RAM - u64::from(edit.value % 64),
        4 => d.1 = u32::from(edit.value),
        _ => d.1 = u32::MAX - u32::from(edit.value),
    }
}

fn store(mem: &GuestRam, table: u64, index: usize, d: Desc) {
    let raw = RawDescriptor::from(SplitDesc::new(d.0, d.1, d.2, d.3));
    let at = table + 16 * index as u64;
    mem.write_obj(raw, GuestAddress(at)).expect("table in RAM");
}

fn load(mem: &GuestRam, table: u64, index: u64) -> Option<SplitDesc> {
    let raw: RawDescriptor = mem.read_obj(GuestAddress(table + 16 * index)).ok()?;
    Some(SplitDesc::from(raw))
}

/// The bytes of the distinct writable descriptors reachable from `head`:
/// an upper bound of what the device may write (each descriptor once,
/// however often a loop would visit it).
fn writable_bound(mem: &GuestRam, head: u16) -> u64 {
    let mut seen = BTreeSet::new();
    let mut total = 0u64;
    let mut walk = |table: u64, size: u64, start: u64, total: &mut u64, tables: &mut Vec<u64>| {
        let mut at = start;
        while at < size && seen.insert((table, at)) {
            let Some(d) = load(mem, table, at) else {
                break;
            };
            if d.flags() & INDIRECT != 0 {
                tables.push(d.addr().0);
                tables.push(u64::from(d.len()) / 16);
            } else if d.flags() & WRITE != 0 {
                *total += u64::from(d.len());
            }
            if d.flags() & NEXT == 0 {
                break;
            }
            at = u64::from(d.next());
        }
    };
    let mut tables = Vec::new();
    walk(
        0,
        u64::from(QUEUE_SIZE),
        u64::from(head),
        &mut total,
        &mut tables,
    );
    for pair in tables.clone().chunks(2) {
        let mut none = Vec::new();
        walk(pair[0], pair[1].min(1 << 16), 0, &mut total, &mut none);
    }
    total
}

fuzz_target!(|data: &[u8]| {
    let input = ChainInput::decode(data);
    let fds_before = open_fds().expect("/proc/self/fd");
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest RAM");
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let layout = RingLayout {
        desc_table: vq.desc_table_addr(),
        avail: vq.avail_addr(),
        used: vq.used_addr(),
        size: QUEUE_SIZE,
    };
    let rig = ChainRig::new(mem.clone(), layout, input.event_idx).expect("rig");

    let mut placer = Placer { next: DATA_BASE };
    let mut slot = 0usize;
    let mut heads: Vec<u16> = Vec::new();
    for (i, chain) in input.chains.iter().enumerate() {
        if chain.timers_before {
            rig.fire_timers(Duration::from_secs(3600)).expect("timers");
        }
        if chain.kick_before {
            rig.kick().expect("kick");
        }
        let mut descs: Vec<Desc> = Vec::new();
        let mut offset = 0usize;
        for &len in &chain.readable {
            let at = placer.place(len);
            let end = (offset + usize::from(len)).min(chain.request.len());
            if let Some(part) = chain.request.get(offset..end) {
                mem.write_slice(part, GuestAddress(at)).expect("in RAM");
            }
            offset += usize::from(len);
            descs.push((at, u32::from(len), NEXT, 0));
        }
        for &len in &chain.writable {
            descs.push((placer.place(len), u32::from(len), WRITE | NEXT, 0));
        }
        if let Some(last) = descs.last_mut() {
            last.2 &= !NEXT;
        }
        let head = slot as u16;
        if chain.indirect {
            if slot >= usize::from(QUEUE_SIZE) {
                break;
            }
            let table = INDIRECT_BASE + (i * INDIRECT_ENTRIES * 16) as u64;
            for (j, d) in descs.iter_mut().enumerate() {
                d.3 = j as u16 + 1;
            }
            let mut direct = [(table, (descs.len() * 16) as u32, INDIRECT, 0)];
            if let Some(edit) = &chain.edit {
                if edit.desc & 0x80 != 0 {
                    apply(edit, &mut direct);
                } else {
                    apply(edit, &mut descs);
                }
            }
            for (j, d) in descs.iter().enumerate() {
                store(&mem, table, j, *d);
            }
            store(&mem, 0, slot, direct[0]);
            slot += 1;
        } else {
            if descs.is_empty() || slot + descs.len() > usize::from(QUEUE_SIZE) {
                break;
            }
            for (j, d) in descs.iter_mut().enumerate() {
                d.3 = (slot + j + 1) as u16;
            }
            if let Some(edit) = &chain.edit {
                apply(edit, &mut descs);
            }
            for (j, d) in descs.iter().enumerate() {
                store(&mem, 0, slot + j, *d);
            }
            slot += descs.len();
        }
        let n = heads.len();
        vq.avail()
            .ring()
            .ref_at(n % usize::from(QUEUE_SIZE))
            .expect("avail slot")
            .store(head);
        heads.push(head);
        vq.avail().idx().store(heads.len() as u16);
    }
    rig.kick().expect("kick");
    rig.fire_timers(Duration::from_secs(3600)).expect("timers");
    rig.stop().expect("vring stop");
    assert_eq!(rig.in_flight(), 0, "a chain is still held after the stop");

    // Every chain back exactly once, within its writable bytes.
    let used = vq.used().idx().load();
    assert_eq!(usize::from(used), heads.len(), "used.idx");
    let mut offered: BTreeMap<u16, usize> = BTreeMap::new();
    for h in &heads {
        *offered.entry(*h).or_default() += 1;
    }
    let mut returned: BTreeMap<u16, usize> = BTreeMap::new();
    for i in 0..heads.len() {
        let elem = vq.used().ring().ref_at(i).expect("used slot").load();
        let id = u16::try_from(elem.id()).expect("a head index");
        *returned.entry(id).or_default() += 1;
        let len = u64::from(elem.len());
        assert!(
            len == 0 || len >= RESP_HDR_SIZE as u64,
            "chain {id}: used.len {len} is neither 0 nor a response"
        );
        let bound = writable_bound(&mem, id);
        assert!(
            len <= bound,
            "chain {id}: used.len {len} > {bound} writable bytes"
        );
    }
    assert_eq!(returned, offered, "each chain returned once");

    let left = rig.disconnect();
    assert!(
        left.is_empty(),
        "the model holds {left:?} after the disconnect"
    );
    drop(mem);
    assert_eq!(open_fds().expect("/proc/self/fd"), fds_before, "fds leaked");
});
