// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Reconnects to the real daemon `--count N` times (default 1000). Each
//! time the guest holds state of every kind (an object attached, mapped,
//! locked, in the shared memory window, published) with a `LOCK` of a
//! second context parked behind the lock, then the connection drops
//! without a word. Every `--every K` iterations the daemon's fd count
//! (`/proc/PID/fd`) and VmRSS are sampled.
//!
//! Fails (exit 1) if the fd count after the last disconnect is above the
//! count after the first, if `ctl list` shows objects after a disconnect,
//! or if VmRSS after warm-up grows by more than `--rss-slack-kib`
//! (default 16384).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use dmabuf_guest_tests::session::Loopback;
use dmabuf_guest_tests::suite::scenarios::{hold_state_with_a_parked_request, Target};
use dmabuf_guest_tests::suite::Stop;

#[path = "../soak/mod.rs"]
mod soak;

use soak::{flag, Daemon};

fn run() -> Result<u32, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count: usize = flag(&args, "--count", 1000)?;
    let every: usize = flag(&args, "--every", (count / 20).max(1))?;
    let slack: u64 = flag(&args, "--rss-slack-kib", 16384)?;
    let mut daemon = Daemon::start(1, &[])?;
    let target = Target::on(Loopback {
        sockets: daemon.sockets.clone(),
    });
    let fds_idle = daemon.fd_count()?;
    println!(
        "daemon pid {}, fds before any guest {fds_idle}",
        daemon.pid()
    );
    println!("{:>6} {:>5} {:>9}", "iter", "fds", "rss_kib");
    let started = Instant::now();
    let mut failures = 0u32;
    let (mut first_fds, mut last_fds, mut max_fds) = (0, 0, 0);
    let (mut warm_rss, mut last_rss, mut max_rss) = (0, 0, 0);
    for i in 1..=count {
        let session = match hold_state_with_a_parked_request(&target) {
            Ok(s) => s,
            Err(Stop::Fail(w) | Stop::Skip(w)) => {
                return Err(format!("iteration {i}: could not build the state: {w}"))
            }
        };
        // Abrupt: the socket closes with everything held and a chain parked.
        drop(session);
        if !daemon.alive() {
            return Err(format!("iteration {i}: the daemon exited"));
        }
        if i == 1 || i % every == 0 || i == count {
            let left = daemon.settle_objects(Duration::from_secs(2))?;
            if left != 0 {
                println!("FAIL iteration {i}: ctl list shows {left} objects after the disconnect");
                failures += 1;
            }
            let fds = daemon.settle_fds(
                if i == 1 { fds_idle } else { first_fds },
                Duration::from_secs(2),
            )?;
            let rss = daemon.rss_kib()?;
            if i == 1 {
                first_fds = fds;
            }
            // Warm-up: the first tenth of the run (allocator arenas, caches).
            if warm_rss == 0 && i >= count / 10 {
                warm_rss = rss;
            }
            last_fds = fds;
            max_fds = max_fds.max(fds);
            last_rss = rss;
            max_rss = max_rss.max(rss);
            println!("{i:>6} {fds:>5} {rss:>9}");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fds first {first_fds} last {last_fds} max {max_fds}; rss_kib after-warm-up {warm_rss} last {last_rss} max {max_rss}; {count} reconnects in {secs:.1} s"
    );
    if last_fds > first_fds {
        println!(
            "FAIL: fd count after the last disconnect {last_fds} > after the first {first_fds}"
        );
        failures += 1;
    }
    if max_rss > warm_rss + slack {
        println!("FAIL: VmRSS grew to {max_rss} KiB, more than {slack} KiB over {warm_rss} KiB");
        failures += 1;
    }
    Ok(failures)
}

fn main() -> ExitCode {
    match run() {
        Ok(0) => {
            println!("PASS");
            ExitCode::SUCCESS
        }
        Ok(n) => {
            println!("{n} check(s) failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("dmabuf-reconnect: {e}");
            ExitCode::FAILURE
        }
    }
}
