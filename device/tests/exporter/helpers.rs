// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the rule tests share: the harness, the protocol types and a few
//! helpers for host exports and replies.

pub use std::sync::Arc;
pub use std::time::Duration;

pub use crate::common::*;
pub use vhost_device_dmabuf::exporter::{ExportSpec, GuestCaps, HostError, Limits};
pub use vhost_device_dmabuf::provider::{MemfdProvider, Provider};
pub use virtio_dmabuf_protocol::*;

pub use Direction::{Bidirectional as Bidi, FromDevice, ToDevice};

pub const START_READ: u64 = 0x1;
pub const START_WRITE: u64 = 0x2;
pub const START_RW: u64 = 0x3;
pub const END_READ: u64 = 0x5;
pub const END_WRITE: u64 = 0x6;
pub const END_RW: u64 = 0x7;

pub fn export(
    dev: &mut Dev,
    name: &str,
    pages: u64,
    dynamic: bool,
    read_only: bool,
    guests: Option<Vec<usize>>,
) -> uuid::Uuid {
    let backing = MemfdProvider::new(1 << 30).allocate(pages * PAGE).unwrap();
    dev.ex
        .host_export(
            ExportSpec {
                name: name.into(),
                dynamic,
                read_only,
                guests,
            },
            backing,
        )
        .unwrap()
}

pub fn open_name(dev: &mut Dev, guest: usize, name: &str) -> Response {
    dev.call(
        guest,
        Request::Open {
            uuid: None,
            name: name.as_bytes().to_vec(),
        },
    )
}

pub fn handle(r: Reply) -> u64 {
    match r {
        Reply::Object(o) => o.object,
        r => panic!("{r:?}"),
    }
}

pub fn uuid_of(dev: &Dev, index: usize) -> uuid::Uuid {
    dev.ex.list()[index].uuid
}

pub fn guest_create(d: &mut Dev, size: u64, entries: Vec<Segment>) -> Response {
    d.call(
        0,
        Request::Create {
            size,
            dynamic: false,
            cache_mapping: false,
            guest_pages: Some(entries),
        },
    )
}
