// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One test per rule of the contract's sections 6 to 9, against the
//! exporter core with the real memfd provider; one module per file of
//! `src/exporter/`, holding the rules that file implements.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;
mod helpers;

mod attach;
mod cpu;
mod dispatch;
mod events;
mod fence;
mod host;
mod lock;
mod objects;
mod resv;
mod session;
mod sync;
