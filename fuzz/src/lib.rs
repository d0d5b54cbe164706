// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The input formats of the fuzz targets in `fuzz_targets/`, each a small
//! byte format with a decoder (used by the target) and an encoder (used by
//! `examples/seeds.rs` to write the seed corpora in `corpus/`). Any byte
//! string decodes to something: missing bytes read as zero.
//!
//! `docs/fuzzing.md` says what each target checks.

pub mod chain;
pub mod control;
pub mod ops;
pub mod relay;

/// Reads little-endian numbers off the front of a fuzz input.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let got = self.bytes(N);
        out[..got.len()].copy_from_slice(got);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }
}

/// The input of `request_parse`: the writable room, then the readable
/// bytes of one chain.
pub fn request_input(room: u32, readable: &[u8]) -> Vec<u8> {
    let mut out = room.to_le_bytes().to_vec();
    out.extend_from_slice(readable);
    out
}
