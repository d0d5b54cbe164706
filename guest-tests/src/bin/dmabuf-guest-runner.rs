// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The conformance suite inside a real guest: the device's PCI functions
//! driven from user space ([`dmabuf_guest_tests::pci`]), the daemon's
//! control plane through a serial line to the host
//! ([`dmabuf_guest_tests::host_link`]).
//!
//! ```text
//! dmabuf-guest-runner [--host-link /dev/ttyS1] [--guests N] [--expect-shm]
//!                     [--modes full,no-event-idx,split] [--hold-and-hang] [FILTER...]
//! ```
//!
//! Every scenario the front-end supports runs in each mode; the rest skip
//! with their reason. The last line is `N passed, M failed, K skipped`; the
//! exit status is 1 on any failure. `--hold-and-hang` instead builds state
//! of every kind with a request parked, prints `E2E-HOLDING` and sleeps, for
//! a host that kills the VMM and checks the daemon let go of everything.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use dmabuf_guest_tests::driver::ChainLayout;
use dmabuf_guest_tests::host::HostControl;
use dmabuf_guest_tests::host_link::LineHost;
use dmabuf_guest_tests::pci::{PciFrontEnd, PciOptions};
use dmabuf_guest_tests::suite::scenarios::{all, hold_state_with_a_parked_request, Target};
use dmabuf_guest_tests::suite::{RunArgs, Stop, Suite};

#[derive(Debug, Default)]
struct Args {
    host_link: Option<PathBuf>,
    guests: usize,
    expect_shm: bool,
    modes: Vec<String>,
    hold_and_hang: bool,
    rest: Vec<String>,
}

const MODES: &[&str] = &["full", "no-event-idx", "split"];

fn parse_args() -> Result<Args, String> {
    let mut out = Args {
        guests: 1,
        modes: MODES.iter().map(|m| m.to_string()).collect(),
        ..Args::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--host-link" => out.host_link = Some(value("--host-link")?.into()),
            "--guests" => {
                out.guests = value("--guests")?
                    .parse()
                    .map_err(|e| format!("--guests: {e}"))?
            }
            "--expect-shm" => out.expect_shm = true,
            "--modes" => {
                out.modes = value("--modes")?.split(',').map(str::to_string).collect();
                if let Some(bad) = out.modes.iter().find(|m| !MODES.contains(&m.as_str())) {
                    return Err(format!("unknown mode {bad}; modes are {MODES:?}"));
                }
            }
            "--hold-and-hang" => out.hold_and_hang = true,
            _ => out.rest.push(a),
        }
    }
    Ok(out)
}

fn adjust(t: &mut Target, mode: &str) {
    match mode {
        "no-event-idx" => {
            t.options.event_idx = false;
            t.options.indirect = false;
        }
        "split" => {
            t.options.chain_layout = ChainLayout {
                max_desc_len: Some(61),
                first_desc_len: Some(5),
                indirect: false,
            }
        }
        _ => {}
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dmabuf-guest-runner: {e}");
            return ExitCode::from(2);
        }
    };
    let front_end = match PciFrontEnd::discover(&PciOptions {
        guests: args.guests,
        expect_shm: args.expect_shm,
        ..PciOptions::default()
    }) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("dmabuf-guest-runner: {e}");
            println!("0 passed, 1 failed, 0 skipped");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "front-end: {}",
        dmabuf_guest_tests::session::FrontEnd::describe(&front_end)
    );
    let host: Option<Arc<dyn HostControl>> = match &args.host_link {
        None => None,
        Some(path) => match LineHost::serial(path) {
            Ok(h) => Some(Arc::new(h)),
            Err(e) => {
                eprintln!("dmabuf-guest-runner: host link {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let mut base = Target::on(front_end);
    base.host = host;
    // A TCG guest is slow: give completions room without changing what
    // any scenario checks.
    base.options.timeout = Duration::from_secs(20);

    if args.hold_and_hang {
        return match hold_state_with_a_parked_request(&base) {
            Ok(session) => {
                // Never released: the device keeps everything until the
                // VMM dies under it.
                std::mem::forget(session);
                println!("E2E-HOLDING");
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            Err(Stop::Fail(why) | Stop::Skip(why)) => {
                eprintln!("dmabuf-guest-runner: could not build the state: {why}");
                ExitCode::FAILURE
            }
        };
    }

    let run_args = RunArgs::parse(args.rest);
    if run_args.list {
        for mode in &args.modes {
            for (name, _) in all() {
                let full = format!("{mode}/{name}");
                if run_args.selects(&full) {
                    println!("{full}: test");
                }
            }
        }
        return ExitCode::SUCCESS;
    }
    let mut suite = Suite::new().with_args(run_args).verbose(true);
    for mode in &args.modes {
        let mut t = base.clone();
        adjust(&mut t, mode);
        for (name, scenario) in all() {
            suite.run(&format!("{mode}/{name}"), || scenario(&t));
        }
    }
    if suite.finish().failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
