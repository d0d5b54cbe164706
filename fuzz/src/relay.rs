// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The input of the `relay_message` target: the front-end's byte stream as
//! the segments it was written in, each with the fds sent along.
//!
//! ```text
//! per segment: u8 fds (modulo 5), u16 n, n bytes
//! ```

use crate::Cursor;

/// vhost-user front-end request codes the relay looks at.
pub const RESET_OWNER: u32 = 4;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const SET_BACKEND_REQ_FD: u32 = 21;
/// Size of a vhost-user message header.
pub const HEADER_SIZE: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Segment {
    pub bytes: Vec<u8>,
    pub fds: usize,
}

pub fn decode(data: &[u8]) -> Vec<Segment> {
    let mut c = Cursor::new(data);
    let mut out = Vec::new();
    while !c.is_empty() {
        let fds = usize::from(c.u8() % 5);
        let n = usize::from(c.u16());
        out.push(Segment {
            bytes: c.bytes(n).to_vec(),
            fds,
        });
    }
    out
}

pub fn encode(segments: &[Segment]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segments {
        out.push(s.fds.min(4) as u8);
        let n = s.bytes.len().min(usize::from(u16::MAX));
        out.extend_from_slice(&(n as u16).to_le_bytes());
        out.extend_from_slice(&s.bytes[..n]);
    }
    out
}

/// One vhost-user message: header (request, flags, size; native endian,
/// as the relay reads it) and body.
pub fn message(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_SIZE + body.len());
    out.extend_from_slice(&request.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&(body.len() as u32).to_ne_bytes());
    out.extend_from_slice(body);
    out
}
