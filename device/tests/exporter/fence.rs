// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fences and WAIT (contract section 7.6; `src/exporter/fence.rs`).

use super::helpers::*;

#[test]
fn fence_attach_without_the_lock_is_eperm() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    assert_eq!(
        d.err(
            0,
            Request::FenceAttach {
                ctx,
                object: o,
                usage: FenceUsage::Write,
                host: false,
            }
        ),
        Status::Perm
    );
}

#[test]
fn fence_signal_only_by_its_creator() {
    let mut d = Dev::new();
    export(&mut d, "shared", 1, false, false, None);
    let h0 = handle(open_name(&mut d, 0, "shared").unwrap());
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, h0);
    let f = d.fence(0, ctx, h0, FenceUsage::Write);
    assert_eq!(d.err(1, Dev::signal_req(f, 0)), Status::NoEnt);
    d.ok(0, Dev::signal_req(f, 0));
    assert_eq!(
        d.err(0, Dev::signal_req(f, 0)),
        Status::NoEnt,
        "signalled once"
    );
}

#[test]
fn wait_completes_when_every_fence_up_to_usage_is_signalled() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let k = d.fence(0, ctx, o, FenceUsage::Kernel);
    let b = d.fence(0, ctx, o, FenceUsage::Bookkeep);
    d.unlock(0, ctx, o);
    let t = d.park(
        0,
        Request::Wait {
            object: o,
            usage: FenceUsage::Read,
            timeout_ns: 5_000_000_000,
        },
    );
    d.ok(0, Dev::signal_req(k, 5));
    assert_eq!(
        d.completed(t),
        Some(Ok(Reply::Empty)),
        "BOOKKEEP is above READ"
    );
    assert_eq!(
        d.err(
            0,
            Request::Wait {
                object: o,
                usage: FenceUsage::Bookkeep,
                timeout_ns: 0
            }
        ),
        Status::TimedOut,
        "0 polls"
    );
    d.ok(0, Dev::signal_req(b, 0));
    d.ok(
        0,
        Request::Wait {
            object: o,
            usage: FenceUsage::Bookkeep,
            timeout_ns: 0,
        },
    );
}

#[test]
fn wait_times_out_with_etimedout() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    d.fence(0, ctx, o, FenceUsage::Write);
    let t = d.park(
        0,
        Request::Wait {
            object: o,
            usage: FenceUsage::Write,
            timeout_ns: 1_000_000,
        },
    );
    assert!(d.ex.next_deadline().unwrap() <= d.now + Duration::from_millis(1));
    d.advance(Duration::from_millis(2));
    assert_eq!(d.completed(t), Some(Err(Status::TimedOut)));
}

#[test]
fn unsignalled_fence_times_out_after_fence_timeout() {
    let mut d = Dev::new();
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    let f = d.fence(0, ctx, o, FenceUsage::Write);
    d.unlock(0, ctx, o);
    let t = d.park(
        0,
        Request::BeginCpuAccess {
            object: o,
            dir: FromDevice,
        },
    );
    d.advance(Duration::from_secs(11));
    assert_eq!(d.completed(t), Some(Ok(Reply::Empty)), "the waiter goes on");
    assert_eq!(d.err(0, Dev::signal_req(f, 0)), Status::TimedOut);
}

#[test]
fn fence_quota_is_enospc() {
    let mut d = Dev::with_limits(Limits {
        max_fences: 1,
        ..Limits::default()
    });
    let o = d.create(0, 1, false, false);
    let (ctx, _) = d.ctx(0);
    d.lock(0, ctx, o);
    d.fence(0, ctx, o, FenceUsage::Write);
    assert_eq!(
        d.err(
            0,
            Request::FenceAttach {
                ctx,
                object: o,
                usage: FenceUsage::Write,
                host: false,
            }
        ),
        Status::NoSpc
    );
}
