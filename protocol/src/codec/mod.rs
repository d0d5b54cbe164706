// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Parsing of requests and encoding of replies, events and the config space.
//!
//! Both directions live here so that the device and a guest driver share one
//! definition of the wire: the device uses [`parse_request`] and
//! [`encode_response`], a driver [`encode_request`] and [`decode_response`].

use std::fmt;

use crate::types::*;

mod decode;
mod encode;
mod structs;

pub use decode::{decode_response, parse_request, parse_transfer_to_host, TransferHead};
pub use encode::{encode_request, encode_response, encode_response_into};

/// Largest `offset + len` that [`Config::read`] serves.
///
/// The structure is 24 bytes and front-ends ask for at most their own config
/// size; a page is far more than any of them needs, and the cap keeps a
/// front-end's size from making us allocate without bound.
pub const CONFIG_READ_MAX: u32 = 4096;

/// A request that cannot be served: the status to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError {
    pub status: Status,
    /// The tag to echo, when the header could be read.
    pub tag: Option<u64>,
    /// The opcode, when it is a known one.
    pub opcode: Option<Opcode>,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.status)?;
        if let Some(opcode) = self.opcode {
            write!(f, " for {opcode}")?;
        }
        if let Some(tag) = self.tag {
            write!(f, " (tag {tag:#x})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseError {}

/// Why a response from the device could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The response is shorter than its layout.
    Short { needed: usize, got: usize },
    /// A status value section 5 does not list.
    UnknownStatus(u32),
    /// A `MAP` reply `space` value section 7.3 does not list.
    UnknownAddressSpace(u32),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Short { needed, got } => {
                write!(f, "response too short: {got} bytes, layout needs {needed}")
            }
            DecodeError::UnknownStatus(value) => write!(f, "unknown status {value}"),
            DecodeError::UnknownAddressSpace(value) => {
                write!(f, "unknown MAP reply address space {value}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}
