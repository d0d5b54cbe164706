// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The conformance suite against the real daemon: `vhost_device_dmabuf`
//! started in-process on temporary Unix sockets, driven by the loopback VMM
//! exactly as a VMM and a guest would drive it.
//!
//! Modes (each a daemon or a front-end configuration):
//! - `full`: shared memory, shared objects (memfd exports allowed), two
//!   request queues, two guest sockets; the VMM acks everything it can.
//! - `no-event-idx`: the same daemon, a VMM without EVENT_IDX and indirect
//!   descriptors (flag-based notification suppression).
//! - `split`: every typed request cut into descriptors of 5 bytes, then
//!   61 (headers split, odd lengths everywhere).
//! - `no-shm-daemon`: a daemon started with `shm_size` 0 (SHMEM not
//!   offered): the shared-memory scenarios must skip, not pass, and the
//!   importer programs must carry their data through the copy path.
//! - `small-quotas`: a daemon with a handful of everything per guest: the
//!   quota and OVERFLOW scenarios.
//! - `short-fence-timeout`: a daemon with `--fence-timeout 200ms`.
//!
//! Arguments are read as libtest reads them (`RunArgs`): bare words filter
//! scenarios by substring, `--skip`, `--exact` and `--list` work, other
//! flags and their values are ignored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use dmabuf_guest_tests::driver::ChainLayout;
use dmabuf_guest_tests::host::{
    kernel_sync_required, ExportOptions, HostControl, HostFenceSource, HostObject, HostSync,
    REQUIRE_KERNEL_SYNC_ENV,
};
use dmabuf_guest_tests::host_link::{parse_host_fences, parse_objects, parse_syncs};
use dmabuf_guest_tests::session::Loopback;
use dmabuf_guest_tests::suite::scenarios::{
    all, with_short_fence_timeout, with_small_quotas, DaemonSettings, Quotas, Scenario, Target,
};
use dmabuf_guest_tests::suite::{RunArgs, Stop, Suite};
use serde_json::Value;
use vhost_device_dmabuf::control::{call, execute, CtlArgs, CtlCommand, Request};
use vhost_device_dmabuf::daemon::{start, Config, DaemonHandle};
use vhost_device_dmabuf::exporter::Limits;
use vhost_device_dmabuf::provider::ProviderChoice;

/// The daemon's control socket, through its own `ctl` client.
#[derive(Debug)]
struct Ctl(PathBuf);

impl Ctl {
    fn call(&self, req: &Request) -> Result<Value, String> {
        call(&self.0, req, None).map_err(|e| e.to_string())
    }
}

impl HostControl for Ctl {
    fn evict(&self, uuid: [u8; 16]) -> Result<(), String> {
        self.call(&Request::Evict {
            uuid: uuid::Uuid::from_bytes(uuid),
            timeout_ms: 1000,
        })
        .map(|_| ())
    }

    /// As `ctl export NAME --fd-from /proc/self/fd/N [--dynamic]
    /// [--read-only] [--guests ...]` does it: the path is opened again and
    /// that fd travels to the daemon.
    fn export(
        &self,
        name: &str,
        fd: BorrowedFd<'_>,
        options: &ExportOptions,
    ) -> Result<(), String> {
        let args = CtlArgs {
            control_socket: self.0.clone(),
            json: true,
            command: CtlCommand::Export {
                name: name.to_string(),
                fd_from: PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
                dynamic: options.dynamic,
                read_only: options.read_only,
                guests: options.guests.clone(),
            },
        };
        execute(&args).map(|_| ()).map_err(|e| e.to_string())
    }

    fn revoke(&self, name: &str) -> Result<(), String> {
        self.call(&Request::Revoke {
            name: name.to_string(),
        })
        .map(|_| ())
    }

    fn recent_syncs(&self) -> Result<Vec<HostSync>, String> {
        parse_syncs(&self.call(&Request::Stats {})?)
    }

    fn objects(&self) -> Result<Vec<HostObject>, String> {
        parse_objects(&self.call(&Request::List {})?)
    }

    fn host_fences(&self) -> Result<HostFenceSource, String> {
        parse_host_fences(&self.call(&Request::Stats {})?)
    }
}

fn target(d: &DaemonHandle, daemon: DaemonSettings) -> Target {
    Target {
        front_end: Arc::new(Loopback {
            sockets: d.socket_paths().to_vec(),
        }),
        options: Default::default(),
        host: d
            .control_socket()
            .map(|p| Arc::new(Ctl(p.to_path_buf())) as Arc<dyn HostControl>),
        daemon,
    }
}

/// The host memory every daemon of the run uses: `memfd` when unset, or
/// `udmabuf`, `dma-heap`, `auto` (the daemon's `--provider` names).
const PROVIDER_ENV: &str = "DMABUF_PROVIDER";

fn provider_choice() -> Result<ProviderChoice, String> {
    match std::env::var(PROVIDER_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(ProviderChoice::Memfd),
        Ok(name) => name.parse().map_err(|e| format!("{PROVIDER_ENV}: {e}")),
        Err(e) => Err(format!("{PROVIDER_ENV}: {e}")),
    }
}

fn daemon(
    dir: &Path,
    name: &str,
    provider: ProviderChoice,
    adjust: impl FnOnce(&mut Config),
) -> Result<DaemonHandle, String> {
    let mut cfg = Config::new(dir.join(format!("{name}-0.sock")));
    cfg.provider = provider;
    cfg.socket_paths.push(dir.join(format!("{name}-1.sock")));
    cfg.request_queues = 2;
    cfg.shm_size = 64 << 20;
    cfg.allow_memfd_shared_objects = true;
    cfg.control_socket = Some(dir.join(format!("{name}-ctl.sock")));
    adjust(&mut cfg);
    start(cfg).map_err(|e| format!("starting the daemon ({name}): {e}"))
}

/// One daemon configuration and the front-end variants run against it.
struct Mode {
    daemon: &'static str,
    configure: fn(&mut Config),
    settings: DaemonSettings,
    runs: Vec<Run>,
}

/// One mode: a front-end variant against a mode's daemon.
struct Run {
    name: &'static str,
    /// How the front-end differs from the default.
    adjust: fn(&mut Target),
    scenarios: Vec<Scenario>,
}

impl Run {
    fn new(name: &'static str, adjust: fn(&mut Target), scenarios: Vec<Scenario>) -> Self {
        Run {
            name,
            adjust,
            scenarios,
        }
    }
}

/// `max(host page size, 4096)`, as the daemon's page size.
fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system; no memory is involved.
    let host = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(host).unwrap_or(4096).max(4096)
}

const FENCE_TIMEOUT: Duration = Duration::from_millis(200);

fn small_limits() -> Limits {
    Limits {
        max_objects: 2,
        max_bytes: 8 * page_size(),
        max_attachments: 4,
        max_contexts: 1,
        max_fences: 1,
        max_waiting: 1,
        max_pending_events: 2,
        ..Limits::default()
    }
}

fn quotas(l: &Limits) -> Quotas {
    Quotas {
        max_objects: l.max_objects,
        max_bytes: l.max_bytes,
        max_attachments: l.max_attachments,
        max_contexts: l.max_contexts,
        max_fences: l.max_fences,
        max_waiting: l.max_waiting,
        max_pending_events: l.max_pending_events,
    }
}

fn modes() -> Vec<Mode> {
    let no_shm_subset = all()
        .into_iter()
        .filter(|(name, _)| {
            name.starts_with("importer_")
                || ["shm", "config", "reset"].iter().any(|k| name.contains(k))
        })
        .collect();
    vec![
        Mode {
            daemon: "full",
            configure: |_| {},
            settings: DaemonSettings::default(),
            runs: vec![
                Run::new("full", |_| {}, all()),
                Run::new(
                    "no-event-idx",
                    |t| {
                        t.options.event_idx = false;
                        t.options.indirect = false;
                    },
                    all(),
                ),
                Run::new(
                    "split",
                    |t| {
                        t.options.chain_layout = ChainLayout {
                            max_desc_len: Some(61),
                            first_desc_len: Some(5),
                            indirect: false,
                        }
                    },
                    all(),
                ),
            ],
        },
        Mode {
            daemon: "workers",
            configure: |c| c.worker_per_queue = true,
            settings: DaemonSettings::default(),
            runs: vec![Run::new("worker-per-queue", |_| {}, all())],
        },
        Mode {
            daemon: "noshm",
            configure: |c| c.shm_size = 0,
            settings: DaemonSettings::default(),
            runs: vec![Run::new("no-shm-daemon", |_| {}, no_shm_subset)],
        },
        Mode {
            daemon: "quotas",
            configure: |c| c.limits = small_limits(),
            settings: DaemonSettings {
                quotas: Some(quotas(&small_limits())),
                ..DaemonSettings::default()
            },
            runs: vec![Run::new("small-quotas", |_| {}, with_small_quotas())],
        },
        Mode {
            daemon: "fences",
            configure: |c| c.fence_timeout = FENCE_TIMEOUT,
            settings: DaemonSettings {
                fence_timeout: Some(FENCE_TIMEOUT),
                ..DaemonSettings::default()
            },
            runs: vec![Run::new(
                "short-fence-timeout",
                |_| {},
                with_short_fence_timeout(),
            )],
        },
    ]
}

fn main() -> ExitCode {
    // RUST_LOG=debug shows the daemon's side of each scenario.
    let _ = env_logger::builder().is_test(true).try_init();
    let args = RunArgs::parse(std::env::args().skip(1));
    let modes = modes();
    if args.list {
        for mode in &modes {
            for run in &mode.runs {
                for (name, _) in &run.scenarios {
                    let full = format!("{}/{name}", run.name);
                    if args.selects(&full) {
                        println!("{full}: test");
                    }
                }
            }
        }
        return ExitCode::SUCCESS;
    }
    let provider = match provider_choice() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("conformance: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "conformance: provider {provider} ({PROVIDER_ENV}), emulated host syncs {} ({REQUIRE_KERNEL_SYNC_ENV})",
        if kernel_sync_required() {
            "fail"
        } else {
            "allowed"
        }
    );
    let mut suite = Suite::new().with_args(args).verbose(true);
    let dir = tempfile::tempdir().expect("temporary directory");

    for mode in modes {
        let selected = mode.runs.iter().any(|run| {
            run.scenarios
                .iter()
                .any(|(name, _)| suite.selects(&format!("{}/{name}", run.name)))
        });
        if !selected {
            continue;
        }
        let d = match daemon(dir.path(), mode.daemon, provider, mode.configure) {
            Ok(d) => d,
            Err(e) => {
                let first = mode.runs.first().map_or(mode.daemon, |r| r.name);
                suite.run(&format!("{first}/daemon_starts"), || Err(Stop::Fail(e)));
                continue;
            }
        };
        for run in &mode.runs {
            let mut t = target(&d, mode.settings.clone());
            (run.adjust)(&mut t);
            for (name, scenario) in &run.scenarios {
                suite.run(&format!("{}/{name}", run.name), || scenario(&t));
            }
        }
        d.stop();
    }

    let summary = suite.finish();
    if summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
