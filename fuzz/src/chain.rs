// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The input of the `chain` target: descriptor chains to lay out in guest
//! memory, each with the request bytes its readable descriptors carry.
//!
//! ```text
//! u8 flags                  bit 0: EVENT_IDX
//! then, per chain:
//!   u8 shape                bits 0-2: readable descriptors, bits 3-5:
//!                           writable descriptors, bit 6: through an
//!                           indirect table, bit 7: one edit follows
//!   u8 when                 bit 0: kick the queue before this chain,
//!                           bit 1: fire the timers before this chain
//!   u16 n, n bytes          the request bytes, laid over the readable
//!                           descriptors in order (zeros past them)
//!   u16 per readable        its length
//!   u16 per writable        its length
//!   [u8 desc, u8 kind, u16 value]   the edit (see `Edit`)
//! ```

use crate::Cursor;

/// Guest RAM of the target: [0, RAM).
pub const RAM: u64 = 0x2_0000;
/// Ring size; the ring is at 0.
pub const QUEUE_SIZE: u16 = 64;
/// Indirect tables: one of 16 entries per chain from here.
pub const INDIRECT_BASE: u64 = 0x1000;
/// Entries of one indirect table.
pub const INDIRECT_ENTRIES: usize = 16;
/// Buffers are placed from here on, wrapping around at the end of RAM.
pub const DATA_BASE: u64 = 0x3000;
/// Chains per input.
pub const MAX_CHAINS: usize = 16;

/// A change made to one descriptor after the chain was laid out well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edit {
    /// Which descriptor of the chain (modulo its length).
    pub desc: u8,
    /// `kind % 6`: 0 flags ^= value, 1 next = value, 2 address far outside
    /// RAM, 3 address `value % 64` bytes before the end of RAM, 4 len =
    /// value, 5 len = `u32::MAX - value`.
    pub kind: u8,
    pub value: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainSpec {
    pub request: Vec<u8>,
    pub readable: Vec<u16>,
    pub writable: Vec<u16>,
    pub indirect: bool,
    pub kick_before: bool,
    pub timers_before: bool,
    pub edit: Option<Edit>,
}

impl ChainSpec {
    /// `request` in one readable descriptor of its own length, and one
    /// writable descriptor of `room` bytes.
    pub fn simple(request: Vec<u8>, room: u16) -> ChainSpec {
        let len = u16::try_from(request.len()).unwrap_or(u16::MAX);
        ChainSpec {
            request,
            readable: vec![len],
            writable: vec![room],
            ..ChainSpec::default()
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainInput {
    pub event_idx: bool,
    pub chains: Vec<ChainSpec>,
}

impl ChainInput {
    pub fn decode(data: &[u8]) -> ChainInput {
        let mut c = Cursor::new(data);
        let event_idx = c.u8() & 1 != 0;
        let mut chains = Vec::new();
        while !c.is_empty() && chains.len() < MAX_CHAINS {
            let shape = c.u8();
            let when = c.u8();
            let n = usize::from(c.u16());
            let request = c.bytes(n).to_vec();
            let readable = (0..shape & 7).map(|_| c.u16()).collect();
            let writable = (0..(shape >> 3) & 7).map(|_| c.u16()).collect();
            let edit = (shape & 0x80 != 0).then(|| Edit {
                desc: c.u8(),
                kind: c.u8(),
                value: c.u16(),
            });
            chains.push(ChainSpec {
                request,
                readable,
                writable,
                indirect: shape & 0x40 != 0,
                kick_before: when & 1 != 0,
                timers_before: when & 2 != 0,
                edit,
            });
        }
        ChainInput { event_idx, chains }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![u8::from(self.event_idx)];
        for chain in &self.chains {
            let nr = chain.readable.len().min(7) as u8;
            let nw = chain.writable.len().min(7) as u8;
            let shape = nr
                | (nw << 3)
                | (u8::from(chain.indirect) << 6)
                | (u8::from(chain.edit.is_some()) << 7);
            out.push(shape);
            out.push(u8::from(chain.kick_before) | (u8::from(chain.timers_before) << 1));
            let n = chain.request.len().min(usize::from(u16::MAX));
            out.extend_from_slice(&(n as u16).to_le_bytes());
            out.extend_from_slice(&chain.request[..n]);
            for len in chain.readable.iter().take(7) {
                out.extend_from_slice(&len.to_le_bytes());
            }
            for len in chain.writable.iter().take(7) {
                out.extend_from_slice(&len.to_le_bytes());
            }
            if let Some(e) = chain.edit {
                out.push(e.desc);
                out.push(e.kind);
                out.extend_from_slice(&e.value.to_le_bytes());
            }
        }
        out
    }
}
