// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Writes the seed corpora of the fuzz targets into `fuzz/corpus/<target>/`:
//! real encoded requests, request sequences that reach the model's
//! interesting states (a mapping, a held lock, a parked WAIT), control
//! lines and vhost-user messages. Run from the repository root:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```

use std::path::Path;

use vhost_device_dmabuf_fuzz::chain::{ChainInput, ChainSpec, Edit};
use vhost_device_dmabuf_fuzz::control::{control_input, Settings};
use vhost_device_dmabuf_fuzz::ops::{encode_ops, Op};
use vhost_device_dmabuf_fuzz::relay::{self, message, Segment};
use vhost_device_dmabuf_fuzz::request_input;
use virtio_dmabuf_protocol::{encode_request, Direction, FenceUsage, Request, Segment as Seg};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed");
}

fn create(pages: u64) -> Request {
    Request::Create {
        size: pages * 4096,
        dynamic: false,
        cache_mapping: false,
        guest_pages: None,
    }
}

fn lock(ctx: u64, object: u64) -> Request {
    Request::Lock {
        ctx,
        object,
        try_lock: false,
        slow: false,
    }
}

/// CREATE (object 1, handle 2), ATTACH (3), MAP (4), UNMAP, DETACH,
/// RELEASE: objects and handles come from one counter, so these numbers
/// are what the model hands out.
fn object_life() -> Vec<Request> {
    vec![
        create(1),
        Request::Attach {
            object: 2,
            dynamic_importer: false,
            peer2peer: false,
        },
        Request::Map {
            attachment: 3,
            dir: Direction::Bidirectional,
            max_entries: 4,
            ctx: 0,
        },
        Request::Unmap { mapping: 4, ctx: 0 },
        Request::Detach { attachment: 3 },
        Request::Release { object: 2 },
    ]
}

/// CREATE (handle 2), two contexts (3, 4): 3 locks, attaches a write fence
/// (5), 4 waits for the lock, a WAIT parks on the fence, then the fence
/// signals and 3 unlocks.
fn lock_and_fence() -> Vec<Request> {
    vec![
        create(2),
        Request::AcquireInit,
        Request::AcquireInit,
        lock(3, 2),
        Request::FenceAttach {
            ctx: 3,
            object: 2,
            usage: FenceUsage::Write,
            host: false,
        },
        lock(4, 2),
        Request::Wait {
            object: 2,
            usage: FenceUsage::Read,
            timeout_ns: 1_000_000,
        },
        Request::FenceSignal { fence: 5, error: 0 },
        Request::Unlock { ctx: 3, object: 2 },
    ]
}

fn copies() -> Vec<Request> {
    vec![
        create(1),
        Request::TransferToHost {
            object: 2,
            offset: 16,
            data: b"fuzzing seed".to_vec(),
        },
        Request::TransferFromHost {
            object: 2,
            offset: 0,
            len: 32,
        },
        Request::BeginCpuAccess {
            object: 2,
            dir: Direction::FromDevice,
        },
        Request::EndCpuAccess {
            object: 2,
            dir: Direction::FromDevice,
        },
        Request::MapShm {
            object: 2,
            writable: true,
        },
        Request::UnmapShm { object: 2 },
        Request::ExportUuid { object: 2 },
    ]
}

fn request_parse() {
    let t = "request_parse";
    let one = |tag: u64, req: Request| encode_request(tag, &req);
    write(
        t,
        "get_info",
        &request_input(16 + 80, &one(1, Request::GetInfo)),
    );
    write(t, "create", &request_input(64, &one(2, create(4))));
    let guest_pages = Request::Create {
        size: 8192,
        dynamic: false,
        cache_mapping: false,
        guest_pages: Some(vec![
            Seg {
                addr: 0x10000,
                len: 4096,
            },
            Seg {
                addr: 0x20000,
                len: 4096,
            },
        ]),
    };
    write(
        t,
        "create_guest_pages",
        &request_input(64, &one(3, guest_pages)),
    );
    let open = Request::Open {
        uuid: None,
        name: b"camera0".to_vec(),
    };
    write(t, "open_name", &request_input(64, &one(4, open)));
    let open_uuid = Request::Open {
        uuid: Some([0x42; 16]),
        name: Vec::new(),
    };
    write(t, "open_uuid", &request_input(64, &one(5, open_uuid)));
    let map = Request::Map {
        attachment: 2,
        dir: Direction::ToDevice,
        max_entries: 4,
        ctx: 0,
    };
    write(t, "map", &request_input(16 + 32 + 4 * 16, &one(6, map)));
    let copies = copies();
    write(
        t,
        "transfer_to",
        &request_input(16, &one(7, copies[1].clone())),
    );
    write(
        t,
        "transfer_from",
        &request_input(48, &one(8, copies[2].clone())),
    );
    let steps = lock_and_fence();
    write(t, "lock", &request_input(16, &one(9, steps[3].clone())));
    write(
        t,
        "fence_attach",
        &request_input(24, &one(10, steps[4].clone())),
    );
    write(t, "wait", &request_input(16, &one(11, steps[6].clone())));
    let mut unknown = one(12, Request::GetInfo);
    unknown[0] = 0x77;
    write(t, "unknown_opcode", &request_input(16, &unknown));
    write(
        t,
        "short_header",
        &request_input(16, &one(13, Request::GetInfo)[..9]),
    );
}

fn chains_of(requests: &[Request], room: u16) -> Vec<ChainSpec> {
    requests
        .iter()
        .enumerate()
        .map(|(i, r)| ChainSpec::simple(encode_request(100 + i as u64, r), room))
        .collect()
}

fn chain() {
    let t = "chain";
    let simple = ChainInput {
        event_idx: false,
        chains: chains_of(&[Request::GetInfo], 128),
    };
    write(t, "get_info", &simple.encode());
    let life = ChainInput {
        event_idx: true,
        chains: chains_of(&object_life(), 128),
    };
    write(t, "object_life", &life.encode());
    // Each request served before the next is laid out.
    let mut one_by_one = chains_of(&lock_and_fence(), 64);
    for c in &mut one_by_one {
        c.kick_before = true;
    }
    write(
        t,
        "lock_and_fence",
        &ChainInput {
            event_idx: true,
            chains: one_by_one,
        }
        .encode(),
    );
    write(
        t,
        "copies",
        &ChainInput {
            event_idx: false,
            chains: chains_of(&copies(), 96),
        }
        .encode(),
    );
    // A request split over four readable descriptors, its response over
    // three writable ones; the same through an indirect table.
    let bytes = encode_request(7, &create(1));
    let split = ChainSpec {
        request: bytes.clone(),
        readable: vec![3, 13, 8, 16],
        writable: vec![8, 8, 48],
        ..ChainSpec::default()
    };
    let indirect = ChainSpec {
        indirect: true,
        ..split.clone()
    };
    write(
        t,
        "split_and_indirect",
        &ChainInput {
            event_idx: false,
            chains: vec![split, indirect],
        }
        .encode(),
    );
    // A chain whose first descriptor links to itself (it is at slot 0),
    // one whose response buffer is outside RAM, one with no room for a
    // response.
    let mut looped = ChainSpec::simple(bytes.clone(), 64);
    looped.edit = Some(Edit {
        desc: 0,
        kind: 1,
        value: 0,
    });
    let mut outside = ChainSpec::simple(bytes.clone(), 64);
    outside.edit = Some(Edit {
        desc: 1,
        kind: 2,
        value: 0,
    });
    let tiny = ChainSpec::simple(bytes, 8);
    let get_info = ChainSpec::simple(encode_request(9, &Request::GetInfo), 128);
    write(
        t,
        "bad_chains",
        &ChainInput {
            event_idx: false,
            chains: vec![looped, outside, tiny, get_info],
        }
        .encode(),
    );
}

fn submit(guest: u8, tag: u8, req: Request) -> Op {
    Op::Submit {
        guest,
        queue: 0,
        tag,
        req,
    }
}

fn exporter_ops() {
    let t = "exporter_ops";
    let seq = |reqs: Vec<Request>| -> Vec<Op> {
        reqs.into_iter()
            .enumerate()
            .map(|(i, r)| submit(0, i as u8, r))
            .collect()
    };
    write(t, "object_life", &encode_ops(&seq(object_life())));
    let mut locks = seq(lock_and_fence());
    locks.insert(7, Op::Tick { ms: 1 });
    locks.push(Op::StopQueue { guest: 0, queue: 0 });
    write(t, "lock_and_fence", &encode_ops(&locks));
    write(t, "copies", &encode_ops(&seq(copies())));
    // Guest 1 opens guest 0's object by UUID, the host evicts it, guest 0
    // reconnects.
    let shared = vec![
        submit(
            0,
            1,
            Request::Create {
                size: 4096,
                dynamic: true,
                cache_mapping: false,
                guest_pages: None,
            },
        ),
        submit(0, 2, Request::ExportUuid { object: 2 }),
        submit(
            1,
            3,
            Request::Open {
                uuid: Some([0; 16]),
                name: Vec::new(),
            },
        ),
        submit(
            1,
            4,
            Request::Attach {
                object: 3,
                dynamic_importer: true,
                peer2peer: false,
            },
        ),
        Op::Evict {
            which: 0,
            timeout_ms: 100,
        },
        Op::Reconnect { guest: 0 },
    ];
    write(t, "shared_and_evicted", &encode_ops(&shared));
    // The host exports a buffer, a guest opens it by name and maps it, the
    // host revokes it.
    let host = vec![
        Op::Export {
            name: 1,
            pages: 1,
            dynamic: true,
            read_only: false,
            only_guest: None,
        },
        submit(
            0,
            1,
            Request::Open {
                uuid: None,
                name: b"e1".to_vec(),
            },
        ),
        submit(
            0,
            2,
            Request::Attach {
                object: 2,
                dynamic_importer: true,
                peer2peer: false,
            },
        ),
        submit(
            0,
            3,
            Request::Map {
                attachment: 3,
                dir: Direction::ToDevice,
                max_entries: 2,
                ctx: 0,
            },
        ),
        Op::Revoke { name: 1 },
        Op::Tick { ms: 100 },
    ];
    write(t, "host_export", &encode_ops(&host));
}

fn control_line() {
    let t = "control_line";
    let all = Settings {
        chunk: usize::MAX,
        ..Settings::default()
    };
    write(
        t,
        "list_stats",
        &control_input(all, b"{\"cmd\":\"list\"}\n{\"cmd\":\"stats\"}\n"),
    );
    let bytewise = Settings { chunk: 1, ..all };
    write(
        t,
        "bytewise",
        &control_input(
            bytewise,
            b"\n  {\"cmd\": \"list\"}  \n\n{\"cmd\":\"stats\"}",
        ),
    );
    let with_fd = Settings { fds: true, ..all };
    write(
        t,
        "export_revoke",
        &control_input(
            with_fd,
            b"{\"cmd\":\"export\",\"name\":\"cam0\",\"dynamic\":true,\"guests\":[0]}\n\
              {\"cmd\":\"list\"}\n{\"cmd\":\"revoke\",\"name\":\"cam0\"}\n",
        ),
    );
    let read_only = Settings {
        read_only_fds: true,
        ..with_fd
    };
    write(
        t,
        "export_read_only",
        &control_input(
            read_only,
            b"{\"cmd\":\"export\",\"name\":\"ro\",\"read_only\":true}\n\
              {\"cmd\":\"export\",\"name\":\"rw\"}\n",
        ),
    );
    write(
        t,
        "evict",
        &control_input(
            all,
            b"{\"cmd\":\"evict\",\"uuid\":\"67e55044-10b1-426f-9247-bb680e5fe0c8\",\"timeout_ms\":5}\n",
        ),
    );
    write(
        t,
        "malformed",
        &control_input(
            Settings { chunk: 4, ..all },
            b"{\"cmd\":\"format\"}\n{\"cmd\":\"list\",\"x\":1}\nnot json\n{\"cmd\":\"revoke\"}\n",
        ),
    );
    let long = Settings {
        pad_first_line: true,
        chunk: 1024,
        ..all
    };
    write(
        t,
        "too_long",
        &control_input(long, b"{\"cmd\":\"list\"}\n{\"cmd\":\"stats\"}\n"),
    );
    let hang_up = Settings {
        hang_up: true,
        ..all
    };
    write(
        t,
        "hang_up",
        &control_input(hang_up, b"{\"cmd\":\"stats\"}\n{\"cmd\":\"list\"}"),
    );
}

fn relay_message() {
    let t = "relay_message";
    let seg = |bytes: Vec<u8>, fds: usize| Segment { bytes, fds };
    let features = (1u64 << 1) | (1 << 3) | (1 << 5) | (1 << 18);
    let handshake = vec![
        seg(message(1, 1, &[]), 0),
        seg(message(15, 1, &[]), 0),
        seg(
            message(relay::SET_PROTOCOL_FEATURES, 1, &features.to_ne_bytes()),
            0,
        ),
        seg(message(3, 1, &[]), 0),
        seg(
            message(relay::SET_BACKEND_REQ_FD, 9, &0u64.to_ne_bytes()),
            1,
        ),
    ];
    write(t, "handshake", &relay::encode(&handshake));
    // SET_MEM_TABLE with two fds, its header split over two writes.
    let mem_table = message(5, 1, &[0u8; 8 + 32 * 2]);
    let split = vec![
        seg(mem_table[..5].to_vec(), 2),
        seg(mem_table[5..].to_vec(), 0),
        seg(message(relay::RESET_OWNER, 1, &[]), 0),
    ];
    write(t, "split_header_fds", &relay::encode(&split));
    let mut oversized = message(2, 1, &[]);
    oversized[8..12].copy_from_slice(&0x1001u32.to_ne_bytes());
    write(t, "oversized", &relay::encode(&[seg(oversized, 0)]));
    let cut = message(relay::SET_PROTOCOL_FEATURES, 1, &features.to_ne_bytes());
    write(t, "cut_off", &relay::encode(&[seg(cut[..15].to_vec(), 0)]));
    let two_fds = vec![seg(message(relay::SET_BACKEND_REQ_FD, 1, &[0; 8]), 2)];
    write(t, "channel_two_fds", &relay::encode(&two_fds));
}

fn main() {
    request_parse();
    chain();
    exporter_ops();
    control_line();
    relay_message();
}
