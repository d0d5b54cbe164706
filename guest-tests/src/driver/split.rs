// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The driver's half of a split virtqueue (virtio 1.2, section 2.7): the
//! descriptor table, the available ring it writes and the used ring it
//! reads, with `VIRTIO_RING_F_EVENT_IDX` and indirect descriptors.
//!
//! Layout in guest memory, all little-endian:
//!
//! ```text
//! desc  (align 16): size x { le64 addr; le32 len; le16 flags; le16 next }
//! avail (align 2) : le16 flags; le16 idx; le16 ring[size]; le16 used_event
//! used  (align 4) : le16 flags; le16 idx; size x { le32 id; le32 len }; le16 avail_event
//! ```
//!
//! Nothing the device writes is trusted: the free list lives here, not in
//! the descriptor table, and a used entry naming a descriptor that is not
//! an in-flight chain head is an error, not a panic.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};

use super::memory::{Buffer, BufferPool, GuestMemory, MemError, PoolError};

/// Size of one descriptor.
pub const DESC_SIZE: u64 = 16;
/// Largest queue size of a split ring.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub write: bool,
}

/// Where a queue's three parts live in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl RingLayout {
    pub fn desc_bytes(size: u16) -> u64 {
        DESC_SIZE * u64::from(size)
    }
    pub fn avail_bytes(size: u16) -> u64 {
        6 + 2 * u64::from(size)
    }
    pub fn used_bytes(size: u16) -> u64 {
        6 + 8 * u64::from(size)
    }

    /// Carves the three parts out of `pool`, each on its own page (more than
    /// the 16/2/4-byte alignment the spec needs, and easy to read in a dump).
    pub fn allocate(pool: &BufferPool, size: u16) -> Result<(RingLayout, [Buffer; 3]), PoolError> {
        let desc = pool.alloc(Self::desc_bytes(size), 4096)?;
        let avail = pool.alloc(Self::avail_bytes(size), 4096)?;
        let used = pool.alloc(Self::used_bytes(size), 4096)?;
        Ok((
            RingLayout {
                size,
                desc: desc.gpa,
                avail: avail.gpa,
                used: used.gpa,
            },
            [desc, avail, used],
        ))
    }

    fn avail_idx(&self) -> u64 {
        self.avail + 2
    }
    fn avail_slot(&self, i: Wrapping<u16>) -> u64 {
        self.avail + 4 + 2 * u64::from(i.0 % self.size)
    }
    /// `used_event`, after the avail ring (EVENT_IDX).
    fn used_event(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }
    fn used_idx(&self) -> u64 {
        self.used + 2
    }
    fn used_slot(&self, i: Wrapping<u16>) -> u64 {
        self.used + 4 + 8 * u64::from(i.0 % self.size)
    }
    /// `avail_event`, after the used ring (EVENT_IDX).
    fn avail_event(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.size)
    }
}

/// What can go wrong on a ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadSize(u16),
    #[error("a chain needs at least one descriptor")]
    EmptyChain,
    #[error("chain of {len} descriptors is longer than the queue size {size}")]
    ChainTooLong { len: usize, size: u16 },
    #[error("{needed} free descriptors needed, {free} free")]
    Full { needed: usize, free: usize },
    #[error("device returned id {id} in the used ring, not an in-flight chain head")]
    BadUsedId { id: u32 },
    #[error(transparent)]
    Memory(#[from] MemError),
}

/// `vring_need_event` (virtio 1.2, 2.7.10): did the index move from `old` to
/// `new` past `event`?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The driver side of one split virtqueue.
#[derive(Debug)]
pub struct SplitQueue {
    layout: RingLayout,
    event_idx: bool,
    /// Free descriptor indices (a stack).
    free: Vec<u16>,
    /// Descriptor indices of each in-flight chain, by head.
    chains: Vec<Option<Vec<u16>>>,
    /// Next avail slot to fill.
    avail_idx: Wrapping<u16>,
    /// Value last stored in `avail.idx`.
    published: Wrapping<u16>,
    /// Next used entry to read.
    last_used: Wrapping<u16>,
}

impl SplitQueue {
    /// Initialises the rings at `layout` (zeroed: no flags, index 0) for a
    /// device that will start at avail/used index 0.
    pub fn new(
        mem: &dyn GuestMemory,
        layout: RingLayout,
        event_idx: bool,
    ) -> Result<Self, QueueError> {
        if layout.size == 0 || layout.size > MAX_QUEUE_SIZE || !layout.size.is_power_of_two() {
            return Err(QueueError::BadSize(layout.size));
        }
        let zero = |gpa: u64, len: u64| -> Result<(), MemError> {
            mem.write(gpa, &vec![0u8; len as usize])
        };
        zero(layout.desc, RingLayout::desc_bytes(layout.size))?;
        zero(layout.avail, RingLayout::avail_bytes(layout.size))?;
        zero(layout.used, RingLayout::used_bytes(layout.size))?;
        Ok(SplitQueue {
            layout,
            event_idx,
            free: (0..layout.size).rev().collect(),
            chains: vec![None; usize::from(layout.size)],
            avail_idx: Wrapping(0),
            published: Wrapping(0),
            last_used: Wrapping(0),
        })
    }

    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Free descriptors.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Chains made available and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.chains.iter().filter(|c| c.is_some()).count()
    }

    /// The next avail index (what `avail.idx` becomes at the next publish).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx.0
    }

    /// The next used index the driver will read.
    pub fn last_used(&self) -> u16 {
        self.last_used.0
    }

    fn write_desc(
        mem: &dyn GuestMemory,
        at: u64,
        d: &Desc,
        extra_flags: u32,
        next: u16,
    ) -> Result<(), MemError> {
        let mut flags = extra_flags;
        if d.write {
            flags |= VRING_DESC_F_WRITE;
        }
        let mut raw = [0u8; DESC_SIZE as usize];
        raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write(at, &raw)
    }

    /// Writes a chain and puts its head in the next avail slot; the device
    /// sees it at the next [`publish`](Self::publish). With `indirect`, the
    /// descriptors go into that table (at least `16 * descs.len()` bytes,
    /// 16-byte aligned) and the ring holds one `VRING_DESC_F_INDIRECT`
    /// descriptor. With `looped`, the last descriptor says NEXT and links
    /// back to the first (a chain that never ends). Returns the head index.
    pub fn add(
        &mut self,
        mem: &dyn GuestMemory,
        descs: &[Desc],
        indirect: Option<u64>,
        looped: bool,
    ) -> Result<u16, QueueError> {
        if descs.is_empty() {
            return Err(QueueError::EmptyChain);
        }
        if descs.len() > usize::from(self.layout.size) {
            return Err(QueueError::ChainTooLong {
                len: descs.len(),
                size: self.layout.size,
            });
        }
        let needed = if indirect.is_some() { 1 } else { descs.len() };
        if self.free.len() < needed {
            return Err(QueueError::Full {
                needed,
                free: self.free.len(),
            });
        }
        let split = self.free.len() - needed;
        let indices: Vec<u16> = self.free[split..].iter().rev().copied().collect();
        let Some(&head) = indices.first() else {
            return Err(QueueError::EmptyChain);
        };
        match indirect {
            Some(table) => {
                for (i, d) in descs.iter().enumerate() {
                    let last = i + 1 == descs.len() && !looped;
                    let flags = if last { 0 } else { VRING_DESC_F_NEXT };
                    let next = if last {
                        0
                    } else {
                        ((i + 1) % descs.len()) as u16
                    };
                    Self::write_desc(mem, table + DESC_SIZE * i as u64, d, flags, next)?;
                }
                let table_desc = Desc {
                    addr: table,
                    len: (DESC_SIZE * descs.len() as u64) as u32,
                    write: false,
                };
                let at = self.layout.desc + DESC_SIZE * u64::from(head);
                Self::write_desc(mem, at, &table_desc, VRING_DESC_F_INDIRECT, 0)?;
            }
            None => {
                for (i, (d, &index)) in descs.iter().zip(&indices).enumerate() {
                    let next = indices
                        .get(i + 1)
                        .or(if looped { indices.first() } else { None })
                        .copied();
                    let flags = if next.is_some() { VRING_DESC_F_NEXT } else { 0 };
                    let at = self.layout.desc + DESC_SIZE * u64::from(index);
                    Self::write_desc(mem, at, d, flags, next.unwrap_or(0))?;
                }
            }
        }
        mem.write(self.layout.avail_slot(self.avail_idx), &head.to_le_bytes())?;
        // Only now that everything is written does the chain leave the free list.
        self.free.truncate(split);
        self.chains[usize::from(head)] = Some(indices);
        self.avail_idx += Wrapping(1);
        Ok(head)
    }

    /// Publishes every chain added since the last publish (release-ordered
    /// `avail.idx` store) and says whether the device asked to be notified:
    /// with EVENT_IDX, whether `avail.idx` passed `avail_event`; without it,
    /// whether `VRING_USED_F_NO_NOTIFY` is clear.
    pub fn publish(&mut self, mem: &dyn GuestMemory) -> Result<bool, QueueError> {
        let old = self.published;
        let new = self.avail_idx;
        if old == new {
            return Ok(false);
        }
        mem.store_u16(self.layout.avail_idx(), new.0)?;
        self.published = new;
        // The idx store must be visible before we read the device's
        // suppression state, or both sides could skip the notification.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = mem.load_u16(self.layout.avail_event())?;
            Ok(need_event(event, new.0, old.0))
        } else {
            let flags = mem.load_u16(self.layout.used)?;
            Ok(u32::from(flags) & VRING_USED_F_NO_NOTIFY == 0)
        }
    }

    /// Whether the device returned chains the driver has not read yet.
    pub fn has_used(&self, mem: &dyn GuestMemory) -> Result<bool, QueueError> {
        Ok(Wrapping(mem.load_u16(self.layout.used_idx())?) != self.last_used)
    }

    /// Takes the next used entry: `(head, used.len)`. The chain's descriptors
    /// are free again; its buffers are the caller's to read and release.
    pub fn pop_used(&mut self, mem: &dyn GuestMemory) -> Result<Option<(u16, u32)>, QueueError> {
        let used_idx = Wrapping(mem.load_u16(self.layout.used_idx())?);
        if used_idx == self.last_used {
            return Ok(None);
        }
        let slot = self.layout.used_slot(self.last_used);
        let id = mem.read_u32(slot)?;
        let len = mem.read_u32(slot + 4)?;
        // Consume the entry even if it is bad, so one bad id cannot wedge the ring.
        self.last_used += Wrapping(1);
        let chain = u16::try_from(id)
            .ok()
            .and_then(|head| Some((head, self.chains.get_mut(usize::from(head))?.take()?)));
        let (head, indices) = chain.ok_or(QueueError::BadUsedId { id })?;
        self.free.extend(indices.into_iter().rev());
        Ok(Some((head, len)))
    }

    /// Asks for an interrupt at the next used entry (EVENT_IDX: `used_event`
    /// = the next entry we will read; otherwise clears
    /// `VRING_AVAIL_F_NO_INTERRUPT`). Returns true if entries already
    /// arrived, so the caller must not sleep.
    pub fn enable_interrupts(&mut self, mem: &dyn GuestMemory) -> Result<bool, QueueError> {
        if self.event_idx {
            mem.store_u16(self.layout.used_event(), self.last_used.0)?;
        } else {
            mem.store_u16(self.layout.avail, 0)?;
        }
        fence(Ordering::SeqCst);
        self.has_used(mem)
    }

    /// Tells the device not to interrupt (without EVENT_IDX:
    /// `VRING_AVAIL_F_NO_INTERRUPT`; with it: `used_event` set just behind
    /// the next entry, so the device only interrupts after a full wrap).
    pub fn disable_interrupts(&mut self, mem: &dyn GuestMemory) -> Result<(), QueueError> {
        if self.event_idx {
            let far = self.last_used - Wrapping(1);
            mem.store_u16(self.layout.used_event(), far.0)?;
        } else {
            mem.store_u16(self.layout.avail, VRING_AVAIL_F_NO_INTERRUPT as u16)?;
        }
        Ok(())
    }

    /// Stores `idx` in `used_event` as it is (EVENT_IDX): the device
    /// interrupts once its used index moves past it.
    pub fn set_used_event(&self, mem: &dyn GuestMemory, idx: u16) -> Result<(), QueueError> {
        mem.store_u16(self.layout.used_event(), idx)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// The used ring's index as the device last wrote it.
    pub fn device_used_idx(&self, mem: &dyn GuestMemory) -> Result<u16, QueueError> {
        fence(Ordering::SeqCst);
        Ok(mem.load_u16(self.layout.used_idx())?)
    }

    /// The device's `avail_event` (EVENT_IDX): the avail index at which it
    /// asks to be notified.
    pub fn device_avail_event(&self, mem: &dyn GuestMemory) -> Result<u16, QueueError> {
        Ok(mem.load_u16(self.layout.avail_event())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_the_spec_formula() {
        // Event at 5: moving 4 -> 6 crosses it, 6 -> 7 does not.
        assert!(need_event(5, 6, 4));
        assert!(need_event(5, 6, 5));
        assert!(!need_event(5, 7, 6));
        assert!(!need_event(5, 5, 4));
        // Wrapping around u16.
        assert!(need_event(0xffff, 1, 0xfffe));
        assert!(!need_event(2, 1, 0xfffe));
    }

    #[test]
    fn used_event_and_avail_event_sit_after_their_rings() {
        use std::sync::Arc;
        use vm_memory::{GuestAddress, GuestMemoryMmap};

        let mmap =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).expect("guest memory");
        let mem = super::super::memory::VmGuestMemory::new(Arc::new(mmap));
        let layout = RingLayout {
            size: 8,
            desc: 0,
            avail: 0x1000,
            used: 0x2000,
        };
        let q = SplitQueue::new(&mem, layout, true).expect("queue");
        q.set_used_event(&mem, 0x1234).expect("store");
        assert_eq!(mem.load_u16(layout.used_event()).expect("load"), 0x1234);
        mem.store_u16(layout.avail_event(), 7).expect("store");
        assert_eq!(q.device_avail_event(&mem).expect("load"), 7);
    }
}
