// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The descriptors of one chain in guest memory: its links, its readable
//! part read into the worker's buffer, its writable part written with the
//! response (section 4). Nothing here allocates for a chain of up to
//! [`INLINE`] descriptors on each side, which is every request of the
//! guest driver's.

use virtio_dmabuf_protocol::{RequestHeader, Status, REQ_HDR_SIZE, RESP_HDR_SIZE};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::readable_bound;
use crate::backend::guest_memory::GuestRam;

/// Descriptors kept without a heap allocation, per side of a chain.
pub(super) const INLINE: usize = 2;

/// Descriptors of one side of a chain, `(guest address, length)` in order.
#[derive(Debug, Clone)]
pub(super) struct Segments {
    inline: [(GuestAddress, u32); INLINE],
    len: usize,
    /// Every segment, once there are more than [`INLINE`].
    spilled: Vec<(GuestAddress, u32)>,
}

impl Default for Segments {
    fn default() -> Self {
        Segments {
            inline: [(GuestAddress(0), 0); INLINE],
            len: 0,
            spilled: Vec::new(),
        }
    }
}

impl Segments {
    fn push(&mut self, segment: (GuestAddress, u32)) {
        if self.spilled.is_empty() && self.len < INLINE {
            self.inline[self.len] = segment;
        } else {
            if self.spilled.is_empty() {
                self.spilled.extend_from_slice(&self.inline);
            }
            self.spilled.push(segment);
        }
        self.len += 1;
    }

    pub(super) fn as_slice(&self) -> &[(GuestAddress, u32)] {
        if self.spilled.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spilled
        }
    }

    /// The bytes the segments hold together.
    fn total(&self) -> usize {
        self.as_slice()
            .iter()
            .fold(0usize, |sum, &(_, len)| sum.saturating_add(len as usize))
    }
}

/// One pass over a chain's descriptors: whether its links end, and its
/// readable and writable parts with whether each lies in guest memory.
#[derive(Debug, Default)]
pub(super) struct Walk {
    /// The last descriptor has no NEXT. The iterator stops early on a loop
    /// (after as many descriptors as the table holds, so one was visited
    /// twice), a `next` off the table or an unreadable descriptor, each
    /// time at a descriptor that still says NEXT.
    pub(super) ends: bool,
    pub(super) readable: Segments,
    readable_in_memory: bool,
    /// The writable part, and the room it gives a response: 0 when one of
    /// its descriptors is not in guest memory (section 4: such a chain
    /// comes back with `used.len` 0).
    pub(super) writable: Segments,
    pub(super) room: usize,
}

/// Walks `chain` once (see [`Walk`]). Inlined into the take loop: without
/// the hint the 64-in-flight rate falls by 4% (docs/benchmarks.md).
#[inline]
pub(super) fn walk<M>(chain: &DescriptorChain<M>, mem: &GuestRam) -> Walk
where
    M: std::ops::Deref<Target = GuestRam> + Clone,
{
    let mut w = Walk {
        readable_in_memory: true,
        ..Walk::default()
    };
    let mut writable_in_memory = true;
    let mut last_has_next = true;
    for d in chain.clone() {
        let in_memory = GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize);
        if d.is_write_only() {
            writable_in_memory &= in_memory;
            w.writable.push((d.addr(), d.len()));
        } else {
            w.readable_in_memory &= in_memory;
            w.readable.push((d.addr(), d.len()));
        }
        last_has_next = d.has_next();
    }
    w.ends = !last_has_next;
    w.room = if writable_in_memory {
        w.writable.total()
    } else {
        0
    };
    w
}

/// Whether the chain's links end (see [`Walk::ends`]).
#[cfg(test)]
pub(super) fn chain_ends<M>(chain: &DescriptorChain<M>, mem: &GuestRam) -> bool
where
    M: std::ops::Deref<Target = GuestRam> + Clone,
{
    walk(chain, mem).ends
}

/// The chain's writable descriptors, and the room they give a response
/// (see [`Walk::room`]).
#[cfg(test)]
pub(super) fn writable<M>(chain: &DescriptorChain<M>, mem: &GuestRam) -> (Segments, usize)
where
    M: std::ops::Deref<Target = GuestRam> + Clone,
{
    let w = walk(chain, mem);
    (w.writable, w.room)
}

/// [`read_walked`] of `chain`.
#[cfg(test)]
pub(super) fn read_request<M>(
    chain: &DescriptorChain<M>,
    mem: &GuestRam,
    max_segments: u32,
    out: &mut Vec<u8>,
) -> Result<(), Status>
where
    M: std::ops::Deref<Target = GuestRam> + Clone,
{
    read_walked(&walk(chain, mem), mem, max_segments, out)
}

/// Reads the readable bytes the request can use into `out` (emptied
/// first): its header, then as much more as its opcode reads
/// ([`readable_bound`]). `EFAULT` when any readable descriptor is not in
/// guest memory, even past what is read.
pub(super) fn read_walked(
    walked: &Walk,
    mem: &GuestRam,
    max_segments: u32,
    out: &mut Vec<u8>,
) -> Result<(), Status> {
    if !walked.readable_in_memory {
        return Err(Status::Fault);
    }
    let parts = walked.readable.as_slice();
    let available = walked.readable.total();
    out.clear();
    let head = available.min(REQ_HDR_SIZE);
    read_into(mem, parts, 0, head, out)?;
    let bound = readable_bound(RequestHeader::from_bytes(out).as_ref(), max_segments);
    let total = available.min(bound);
    if total > head {
        out.try_reserve_exact(total - head)
            .map_err(|_| Status::NoMem)?;
        read_into(mem, parts, head, total - head, out)?;
    }
    Ok(())
}

impl Walk {
    /// The bytes the readable part holds.
    pub(super) fn readable_len(&self) -> usize {
        self.readable.total()
    }
}

/// Appends `len` bytes of the readable part, from offset `skip`, to `out`
/// (a `TRANSFER_TO_HOST` whose data must be kept while it waits).
pub(super) fn read_range(
    walked: &Walk,
    mem: &GuestRam,
    skip: usize,
    len: usize,
    out: &mut Vec<u8>,
) -> Result<(), Status> {
    if !walked.readable_in_memory || skip.saturating_add(len) > walked.readable.total() {
        return Err(Status::Fault);
    }
    out.try_reserve_exact(len).map_err(|_| Status::NoMem)?;
    read_into(mem, walked.readable.as_slice(), skip, len, out)
}

/// The guest memory of `len` bytes of `parts` from offset `skip`, as host
/// slices in order (a descriptor over two memory regions gives two), for
/// a copy straight between guest memory and an object. `EFAULT` when a
/// byte of it is not in guest memory.
pub(super) fn slices<'m>(
    mem: &'m GuestRam,
    parts: &[(GuestAddress, u32)],
    skip: usize,
    len: usize,
    out: &mut Vec<VolatileSlice<'m>>,
) -> Result<(), Status> {
    let mut offset = 0usize;
    let mut left = len;
    for &(addr, part_len) in parts {
        let part_len = part_len as usize;
        let end = offset + part_len;
        if end > skip && left > 0 {
            let from = skip.saturating_sub(offset);
            let n = (part_len - from).min(left);
            let at = addr.0.checked_add(from as u64).ok_or(Status::Fault)?;
            for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(at), n) {
                out.push(slice.map_err(|_| Status::Fault)?);
            }
            left -= n;
        }
        offset = end;
    }
    if left > 0 {
        return Err(Status::Fault);
    }
    Ok(())
}

/// Appends `len` bytes of the segments' contents, from offset `skip`.
fn read_into(
    mem: &GuestRam,
    parts: &[(GuestAddress, u32)],
    skip: usize,
    len: usize,
    out: &mut Vec<u8>,
) -> Result<(), Status> {
    let start = out.len();
    out.resize(start + len, 0);
    let mut offset = 0usize;
    let mut filled = 0usize;
    for &(addr, part_len) in parts {
        let part_len = part_len as usize;
        let end = offset + part_len;
        if end > skip && filled < len {
            let from = skip.saturating_sub(offset);
            let n = (part_len - from).min(len - filled);
            let at = addr.0.checked_add(from as u64).ok_or(Status::Fault)?;
            read_guest(
                mem,
                &mut out[start + filled..start + filled + n],
                GuestAddress(at),
            )?;
            filled += n;
        }
        offset = end;
    }
    Ok(())
}

/// Copies guest memory at `addr` into `buf`: one region lookup and one
/// copy when the range lies in one region (every request of the guest
/// driver's), vm-memory's general path when it spans regions.
fn read_guest(mem: &GuestRam, buf: &mut [u8], addr: GuestAddress) -> Result<(), Status> {
    match GuestMemoryBackend::get_slice(mem, addr, buf.len()) {
        Ok(slice) => {
            slice.copy_to(buf);
            Ok(())
        }
        Err(_) => mem.read_slice(buf, addr).map_err(|_| Status::Fault),
    }
}

/// Copies `bytes` to guest memory at `addr` (see [`read_guest`]).
fn write_guest(mem: &GuestRam, bytes: &[u8], addr: GuestAddress) -> Result<(), Status> {
    match GuestMemoryBackend::get_slice(mem, addr, bytes.len()) {
        Ok(slice) => {
            slice.copy_from(bytes);
            Ok(())
        }
        Err(_) => mem.write_slice(bytes, addr).map_err(|_| Status::Fault),
    }
}

/// The tag of a request whose readable part is not all in guest memory:
/// read from the first readable descriptors when the header is there.
pub(super) fn header_tag(walked: &Walk, mem: &GuestRam) -> Option<u64> {
    let mut header = [0u8; REQ_HDR_SIZE];
    let mut got = 0;
    for &(addr, len) in walked.readable.as_slice() {
        let n = (len as usize).min(REQ_HDR_SIZE - got);
        mem.read_slice(&mut header[got..got + n], addr).ok()?;
        got += n;
        if got == REQ_HDR_SIZE {
            return RequestHeader::from_bytes(&header).map(|h| h.tag);
        }
    }
    None
}

/// Writes `bytes` over the writable descriptors; returns how many went in.
pub(super) fn write_segments(
    mem: &GuestRam,
    segments: &[(GuestAddress, u32)],
    bytes: &[u8],
) -> u32 {
    let mut done = 0usize;
    for &(addr, len) in segments {
        if done == bytes.len() {
            break;
        }
        let n = (len as usize).min(bytes.len() - done);
        if write_guest(mem, &bytes[done..done + n], addr).is_err() {
            break;
        }
        done += n;
    }
    u32::try_from(done).unwrap_or(u32::MAX)
}

/// The `used.len` of a chain answered with `bytes`: what was written, and
/// nothing at all when the writable part cannot hold a response header
/// (section 4).
pub(super) fn write_response(
    mem: &GuestRam,
    segments: &[(GuestAddress, u32)],
    bytes: &[u8],
) -> u32 {
    let room = segments
        .iter()
        .fold(0usize, |sum, &(_, len)| sum.saturating_add(len as usize));
    if room < RESP_HDR_SIZE || bytes.is_empty() {
        return 0;
    }
    write_segments(mem, segments, bytes)
}
