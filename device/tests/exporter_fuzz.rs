// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Arbitrary requests with arbitrary handles never panic the core, every
//! request ends with exactly one response (now or as a completion), and a
//! reset afterwards leaves nothing of the guest behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use proptest::prelude::*;
use vhost_device_dmabuf::exporter::Limits;
use virtio_dmabuf_protocol::*;

fn dir() -> impl Strategy<Value = Direction> {
    prop_oneof![
        Just(Direction::Bidirectional),
        Just(Direction::ToDevice),
        Just(Direction::FromDevice)
    ]
}

fn usage() -> impl Strategy<Value = FenceUsage> {
    (0u32..4).prop_map(|u| FenceUsage::from_u32(u).unwrap())
}

/// Handles are small numbers so that many of them name something real.
fn h() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..48, 1 => any::<u64>()]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::GetInfo),
        Just(Request::ResetSession),
        h().prop_map(|tag| Request::Cancel { tag }),
        (0u64..5, any::<bool>(), any::<bool>()).prop_map(|(p, dynamic, cache)| Request::Create {
            size: p * PAGE,
            dynamic,
            cache_mapping: cache && !dynamic,
            guest_pages: None,
        }),
        (0u64..64, 1u64..3).prop_map(|(a, n)| Request::Create {
            size: n * PAGE,
            dynamic: false,
            cache_mapping: false,
            guest_pages: Some(vec![Segment {
                addr: a * PAGE,
                len: n * PAGE
            }]),
        }),
        h().prop_map(|object| Request::Release { object }),
        h().prop_map(|object| Request::ExportUuid { object }),
        (h(), any::<bool>(), any::<bool>()).prop_map(|(object, d, p)| Request::Attach {
            object,
            dynamic_importer: d,
            peer2peer: p
        }),
        h().prop_map(|attachment| Request::Detach { attachment }),
        (h(), dir(), 0u32..3, h()).prop_map(|(attachment, dir, max_entries, ctx)| Request::Map {
            attachment,
            dir,
            max_entries,
            ctx
        }),
        (h(), h()).prop_map(|(mapping, ctx)| Request::Unmap { mapping, ctx }),
        (h(), h()).prop_map(|(attachment, ctx)| Request::Pin { attachment, ctx }),
        (h(), h()).prop_map(|(attachment, ctx)| Request::Unpin { attachment, ctx }),
        Just(Request::AcquireInit),
        h().prop_map(|ctx| Request::AcquireFini { ctx }),
        (h(), h(), any::<bool>(), any::<bool>()).prop_map(|(ctx, object, try_lock, slow)| {
            Request::Lock {
                ctx,
                object,
                try_lock,
                slow,
            }
        }),
        (h(), h()).prop_map(|(ctx, object)| Request::Unlock { ctx, object }),
        (h(), dir()).prop_map(|(object, dir)| Request::BeginCpuAccess { object, dir }),
        (h(), dir()).prop_map(|(object, dir)| Request::EndCpuAccess { object, dir }),
        (h(), any::<bool>()).prop_map(|(object, writable)| Request::MapShm { object, writable }),
        h().prop_map(|object| Request::UnmapShm { object }),
        (h(), 0u64..9000, prop::collection::vec(any::<u8>(), 0..64)).prop_map(
            |(object, offset, data)| Request::TransferToHost {
                object,
                offset,
                data
            }
        ),
        (h(), prop_oneof![0u64..9000, Just(u64::MAX)], 0u64..64).prop_map(
            |(object, offset, len)| Request::TransferFromHost {
                object,
                offset,
                len
            }
        ),
        (h(), h(), usage()).prop_map(|(ctx, object, usage)| Request::FenceAttach {
            ctx,
            object,
            usage,
            host: false,
        }),
        (h(), 0u32..5000).prop_map(|(fence, error)| Request::FenceSignal { fence, error }),
        (
            h(),
            usage(),
            prop_oneof![Just(0u64), 1u64..2_000_000_000, Just(u64::MAX)]
        )
            .prop_map(|(object, usage, timeout_ns)| Request::Wait {
                object,
                usage,
                timeout_ns
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_requests_never_panic_and_every_request_is_answered_once(
        steps in prop::collection::vec((0usize..2, request(), 0u64..3), 1..120)
    ) {
        let mut d = Dev::with_limits(Limits { max_waiting: 8, ..Limits::default() });
        let mut open = std::collections::BTreeSet::new();
        for (guest, req, advance_ms) in steps {
            let (token, r) = d.submit(guest, req);
            if r.is_none() {
                open.insert(token);
            }
            if advance_ms > 0 {
                d.advance(Duration::from_millis(advance_ms * 400));
            }
            for c in d.completions() {
                prop_assert!(open.remove(&c.origin.token), "one completion per parked request");
            }
        }
        for g in 0..2 {
            d.ok(g, Request::ResetSession);
        }
        for c in d.completions() {
            prop_assert!(open.remove(&c.origin.token));
        }
        prop_assert!(open.is_empty(), "parked requests left: {:?}", open);
        prop_assert_eq!(d.object_count(), 0, "reset leaves nothing behind");
        prop_assert!(d.ex.next_deadline().is_none(), "no timer left");
    }
}
