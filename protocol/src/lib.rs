// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Wire types of the virtio-dmabuf device (virtio device ID 37), version 1.
//!
//! Everything a guest driver and the device exchange on the virtqueues:
//! opcodes, flags, status codes, the request and reply structures, events
//! and the configuration space. [`parse_request`] turns the readable bytes of
//! one descriptor chain into a typed [`Request`] (or the status the contract
//! names for it); [`encode_response`] and [`Event::to_bytes`] produce every
//! reply and event. A guest driver uses the other direction,
//! [`encode_request`] and [`decode_response`], so neither side redefines the
//! wire. [`wire`] holds the `#[repr(C)]` layouts the sizes are pinned to.
//! There is no I/O in this crate.
//!
//! Section numbers in the comments refer to the device contract
//! (`docs/protocol.md` explains it in full).

mod codec;
mod types;
pub mod wire;

pub use codec::*;
pub use types::*;
