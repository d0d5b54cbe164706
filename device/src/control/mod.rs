// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host control plane (contract sections 10 and 11): a Unix socket the
//! daemon listens on, and the `ctl` client that talks to it.
//!
//! The protocol is JSON lines: one request object per line, one response
//! object per line, in order. The buffer of an `export` travels as an
//! `SCM_RIGHTS` fd on the same `sendmsg` as its line. `docs/control.md`
//! describes it for people writing their own clients.
//!
//! - `wire.rs`: the request type, limits, response helpers
//! - `server.rs`: the event loop (listener, one subscriber per client, the
//!   device's control wake-up), request handling, parked evictions
//! - `client.rs`: `ctl` arguments, one request per connection, output
//! - `table.rs`: the human-readable forms of `list` and `stats`

mod client;
mod records;
mod server;
mod table;
mod wire;

pub use client::{call, execute, request, run_ctl, CtlArgs, CtlCommand, CtlError};
#[cfg(feature = "fuzzing")]
pub use server::fuzzing::{fuzz_session, Ending};
pub use server::{spawn_control_plane, ControlHandle};
pub use wire::{Request, DEFAULT_EVICT_TIMEOUT_MS, MAX_CLIENTS, MAX_LINE};
