//! Parsing of requests and encoding of replies, events and the config space.
//! (Being written: signatures are fixed, bodies land with the codec work.)

use crate::types::*;

/// A request that cannot be served: the status to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError {
    pub status: Status,
    /// The tag to echo, when the header could be read.
    pub tag: Option<u64>,
    /// The opcode, when it is a known one.
    pub opcode: Option<Opcode>,
}

/// Decodes the readable bytes of one chain. `writable_len` is the size of the
/// chain's writable part (at least the response header, checked by the caller).
pub fn parse_request(readable: &[u8], writable_len: usize) -> Result<(RequestHeader, Request), ParseError> {
    let _ = (readable, writable_len);
    todo!()
}

/// The bytes of the writable part for `response`: header and reply.
pub fn encode_response(tag: u64, response: &Response) -> Vec<u8> {
    let _ = (tag, response);
    todo!()
}
