// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The input of the `exporter_ops` target: a sequence of operations on the
//! model, one after the other until the input ends. Each starts with a
//! byte naming it (modulo the number of kinds), then its fields; handles
//! are small numbers (255 is `u64::MAX`), since the model numbers its
//! handles from 1 and a small number often names something real.

use virtio_dmabuf_protocol::{Direction, FenceUsage, Request, Segment};

use crate::Cursor;

/// Guests of the model.
pub const GUESTS: usize = 2;
/// Request queues a guest's requests come from (queue 1 is the eventq).
pub const QUEUES: [u16; 2] = [0, 2];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A guest's request, from one of its queues, with a small tag.
    Submit {
        guest: u8,
        queue: u8,
        tag: u8,
        req: Request,
    },
    /// The clock moves on `ms` × 16 ms and the timers fire.
    Tick { ms: u16 },
    /// A vring stop (`GET_VRING_BASE`) of one of a guest's queues.
    StopQueue { guest: u8, queue: u8 },
    /// The guest's front-end hangs up and connects again.
    Reconnect { guest: u8 },
    /// The host exports a memfd of `pages` pages as `e<name>`.
    Export {
        name: u8,
        pages: u8,
        dynamic: bool,
        read_only: bool,
        only_guest: Option<u8>,
    },
    /// The host revokes export `e<name>`.
    Revoke { name: u8 },
    /// The host evicts the `which`-th UUID seen so far.
    Evict { which: u8, timeout_ms: u16 },
}

const KINDS: u8 = 7;

/// A handle from one byte.
fn handle(b: u8) -> u64 {
    if b == 255 {
        u64::MAX
    } else {
        u64::from(b)
    }
}

fn handle_byte(h: u64) -> u8 {
    u8::try_from(h).unwrap_or(255)
}

fn dir(b: u8) -> Direction {
    Direction::from_u32(u32::from(b % 3)).unwrap_or(Direction::Bidirectional)
}

fn usage(b: u8) -> FenceUsage {
    FenceUsage::from_u32(u32::from(b % 4)).unwrap_or(FenceUsage::Kernel)
}

/// The export name of `name`.
pub fn export_name(name: u8) -> String {
    format!("e{}", name % 8)
}

/// Requests: a kind byte (modulo 26), then its fields.
fn decode_request(c: &mut Cursor<'_>, uuids: &[[u8; 16]]) -> Request {
    match c.u8() % 26 {
        0 => Request::GetInfo,
        1 => Request::ResetSession,
        2 => Request::Cancel {
            tag: u64::from(c.u8()),
        },
        3 => {
            let pages = u64::from(c.u8() % 8);
            let flags = c.u8();
            Request::Create {
                size: pages * 4096,
                dynamic: flags & 1 != 0,
                cache_mapping: flags & 2 != 0,
                guest_pages: None,
            }
        }
        4 => {
            let pages = u64::from(c.u8() % 4);
            let at = u64::from(c.u16());
            Request::Create {
                size: pages * 4096,
                dynamic: false,
                cache_mapping: false,
                guest_pages: Some(vec![Segment {
                    addr: at * 4096,
                    len: pages * 4096,
                }]),
            }
        }
        5 => {
            let which = c.u8();
            let uuid = if uuids.is_empty() {
                [which; 16]
            } else {
                uuids[usize::from(which) % uuids.len()]
            };
            Request::Open {
                uuid: Some(uuid),
                name: Vec::new(),
            }
        }
        6 => Request::Open {
            uuid: None,
            name: export_name(c.u8()).into_bytes(),
        },
        7 => Request::Release {
            object: handle(c.u8()),
        },
        8 => Request::ExportUuid {
            object: handle(c.u8()),
        },
        9 => {
            let object = handle(c.u8());
            let flags = c.u8();
            Request::Attach {
                object,
                dynamic_importer: flags & 1 != 0,
                peer2peer: flags & 2 != 0,
            }
        }
        10 => Request::Detach {
            attachment: handle(c.u8()),
        },
        11 => Request::Map {
            attachment: handle(c.u8()),
            dir: dir(c.u8()),
            max_entries: u32::from(c.u8() % 4),
            ctx: handle(c.u8()),
        },
        12 => Request::Unmap {
            mapping: handle(c.u8()),
            ctx: handle(c.u8()),
        },
        13 => Request::Pin {
            attachment: handle(c.u8()),
            ctx: handle(c.u8()),
        },
        14 => Request::Unpin {
            attachment: handle(c.u8()),
            ctx: handle(c.u8()),
        },
        15 => Request::AcquireInit,
        16 => Request::AcquireFini {
            ctx: handle(c.u8()),
        },
        17 => {
            let ctx = handle(c.u8());
            let object = handle(c.u8());
            let flags = c.u8();
            Request::Lock {
                ctx,
                object,
                try_lock: flags & 1 != 0,
                slow: flags & 2 != 0,
            }
        }
        18 => Request::Unlock {
            ctx: handle(c.u8()),
            object: handle(c.u8()),
        },
        19 => Request::BeginCpuAccess {
            object: handle(c.u8()),
            dir: dir(c.u8()),
        },
        20 => Request::EndCpuAccess {
            object: handle(c.u8()),
            dir: dir(c.u8()),
        },
        21 => Request::MapShm {
            object: handle(c.u8()),
            writable: c.bool(),
        },
        22 => Request::UnmapShm {
            object: handle(c.u8()),
        },
        23 => {
            let object = handle(c.u8());
            let offset = u64::from(c.u16());
            let n = usize::from(c.u8() % 64);
            Request::TransferToHost {
                object,
                offset,
                data: c.bytes(n).to_vec(),
            }
        }
        24 => Request::TransferFromHost {
            object: handle(c.u8()),
            offset: u64::from(c.u16()),
            len: u64::from(c.u8()),
        },
        _ => match c.u8() % 3 {
            0 => Request::FenceAttach {
                ctx: handle(c.u8()),
                object: handle(c.u8()),
                usage: usage(c.u8()),
                host: false,
            },
            1 => Request::FenceSignal {
                fence: handle(c.u8()),
                error: u32::from(c.u16()),
            },
            _ => {
                let object = handle(c.u8());
                let usage = usage(c.u8());
                let timeout_ns = match c.u8() % 4 {
                    0 => 0,
                    1 => 1_000_000,
                    2 => 5_000_000_000,
                    _ => u64::MAX,
                };
                Request::Wait {
                    object,
                    usage,
                    timeout_ns,
                }
            }
        },
    }
}

/// The bytes [`decode_request`] reads back as `req` (UUIDs as the index
/// 0 of an empty or given list: seeds use the first UUID seen).
fn encode_request(req: &Request, out: &mut Vec<u8>) {
    let h = handle_byte;
    let dir_byte = |d: &Direction| *d as u8;
    match req {
        Request::GetInfo => out.push(0),
        Request::ResetSession => out.push(1),
        Request::Cancel { tag } => out.extend([2, *tag as u8]),
        Request::Create {
            size,
            dynamic,
            cache_mapping,
            guest_pages: None,
        } => out.extend([
            3,
            (size / 4096) as u8,
            u8::from(*dynamic) | (u8::from(*cache_mapping) << 1),
        ]),
        Request::Create {
            size,
            guest_pages: Some(pages),
            ..
        } => {
            out.extend([4, (size / 4096) as u8]);
            let at = pages.first().map_or(0, |s| s.addr / 4096) as u16;
            out.extend_from_slice(&at.to_le_bytes());
        }
        Request::Open { uuid: Some(_), .. } => out.extend([5, 0]),
        Request::Open { uuid: None, name } => {
            let n = name.get(1).map_or(0, |d| d.wrapping_sub(b'0'));
            out.extend([6, n]);
        }
        Request::Release { object } => out.extend([7, h(*object)]),
        Request::ExportUuid { object } => out.extend([8, h(*object)]),
        Request::Attach {
            object,
            dynamic_importer,
            peer2peer,
        } => out.extend([
            9,
            h(*object),
            u8::from(*dynamic_importer) | (u8::from(*peer2peer) << 1),
        ]),
        Request::Detach { attachment } => out.extend([10, h(*attachment)]),
        Request::Map {
            attachment,
            dir,
            max_entries,
            ctx,
        } => out.extend([
            11,
            h(*attachment),
            dir_byte(dir),
            *max_entries as u8,
            h(*ctx),
        ]),
        Request::Unmap { mapping, ctx } => out.extend([12, h(*mapping), h(*ctx)]),
        Request::Pin { attachment, ctx } => out.extend([13, h(*attachment), h(*ctx)]),
        Request::Unpin { attachment, ctx } => out.extend([14, h(*attachment), h(*ctx)]),
        Request::AcquireInit => out.push(15),
        Request::AcquireFini { ctx } => out.extend([16, h(*ctx)]),
        Request::Lock {
            ctx,
            object,
            try_lock,
            slow,
        } => out.extend([
            17,
            h(*ctx),
            h(*object),
            u8::from(*try_lock) | (u8::from(*slow) << 1),
        ]),
        Request::Unlock { ctx, object } => out.extend([18, h(*ctx), h(*object)]),
        Request::BeginCpuAccess { object, dir } => out.extend([19, h(*object), dir_byte(dir)]),
        Request::EndCpuAccess { object, dir } => out.extend([20, h(*object), dir_byte(dir)]),
        Request::MapShm { object, writable } => out.extend([21, h(*object), u8::from(*writable)]),
        Request::UnmapShm { object } => out.extend([22, h(*object)]),
        Request::TransferToHost {
            object,
            offset,
            data,
        } => {
            out.extend([23, h(*object)]);
            out.extend_from_slice(&(*offset as u16).to_le_bytes());
            let n = data.len().min(63);
            out.push(n as u8);
            out.extend_from_slice(&data[..n]);
        }
        Request::TransferFromHost {
            object,
            offset,
            len,
        } => {
            out.extend([24, h(*object)]);
            out.extend_from_slice(&(*offset as u16).to_le_bytes());
            out.push(*len as u8);
        }
        Request::FenceAttach {
            ctx, object, usage, ..
        } => out.extend([25, 0, h(*ctx), h(*object), *usage as u8]),
        Request::FenceSignal { fence, error } => {
            out.extend([25, 1, h(*fence)]);
            out.extend_from_slice(&(*error as u16).to_le_bytes());
        }
        Request::Wait {
            object,
            usage,
            timeout_ns,
        } => {
            let t = match *timeout_ns {
                0 => 0,
                1_000_000 => 1,
                5_000_000_000 => 2,
                _ => 3,
            };
            out.extend([25, 2, h(*object), *usage as u8, t]);
        }
    }
}

impl Op {
    /// The next operation; `uuids` are the UUIDs seen so far (`OPEN`
    /// BY_UUID and evictions pick one of them).
    pub fn decode(c: &mut Cursor<'_>, uuids: &[[u8; 16]]) -> Op {
        match c.u8() % KINDS {
            0 => {
                let guest = c.u8();
                let queue = c.u8();
                let tag = c.u8();
                Op::Submit {
                    guest,
                    queue,
                    tag,
                    req: decode_request(c, uuids),
                }
            }
            1 => Op::Tick { ms: c.u16() },
            2 => Op::StopQueue {
                guest: c.u8(),
                queue: c.u8(),
            },
            3 => Op::Reconnect { guest: c.u8() },
            4 => {
                let name = c.u8();
                let pages = c.u8();
                let flags = c.u8();
                let only = c.u8();
                Op::Export {
                    name,
                    pages,
                    dynamic: flags & 1 != 0,
                    read_only: flags & 2 != 0,
                    only_guest: (flags & 4 != 0).then_some(only),
                }
            }
            5 => Op::Revoke { name: c.u8() },
            _ => Op::Evict {
                which: c.u8(),
                timeout_ms: c.u16(),
            },
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Submit {
                guest,
                queue,
                tag,
                req,
            } => {
                out.extend([0, *guest, *queue, *tag]);
                encode_request(req, out);
            }
            Op::Tick { ms } => {
                out.push(1);
                out.extend_from_slice(&ms.to_le_bytes());
            }
            Op::StopQueue { guest, queue } => out.extend([2, *guest, *queue]),
            Op::Reconnect { guest } => out.extend([3, *guest]),
            Op::Export {
                name,
                pages,
                dynamic,
                read_only,
                only_guest,
            } => out.extend([
                4,
                *name,
                *pages,
                u8::from(*dynamic)
                    | (u8::from(*read_only) << 1)
                    | (u8::from(only_guest.is_some()) << 2),
                only_guest.unwrap_or(0),
            ]),
            Op::Revoke { name } => out.extend([5, *name]),
            Op::Evict { which, timeout_ms } => {
                out.extend([6, *which]);
                out.extend_from_slice(&timeout_ms.to_le_bytes());
            }
        }
    }
}

/// A whole sequence as bytes.
pub fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        op.encode(&mut out);
    }
    out
}
