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
//!   offered): the shared-memory scenarios must skip, not pass.
//!
//! Arguments other than flags filter scenarios by substring.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use dmabuf_guest_tests::driver::ChainLayout;
use dmabuf_guest_tests::suite::scenarios::{all, HostControl, Target};
use dmabuf_guest_tests::suite::{Stop, Suite};
use vhost_device_dmabuf::control::{call, Request};
use vhost_device_dmabuf::daemon::{start, Config, DaemonHandle};

/// The daemon's control socket, through its own `ctl` client.
#[derive(Debug)]
struct Ctl(PathBuf);

impl Ctl {
    fn call(&self, req: &Request, fd: Option<BorrowedFd<'_>>) -> Result<(), String> {
        call(&self.0, req, fd)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

impl HostControl for Ctl {
    fn evict(&self, uuid: [u8; 16]) -> Result<(), String> {
        self.call(
            &Request::Evict {
                uuid: uuid::Uuid::from_bytes(uuid),
                timeout_ms: 1000,
            },
            None,
        )
    }

    fn export(
        &self,
        name: &str,
        fd: BorrowedFd<'_>,
        dynamic: bool,
        read_only: bool,
    ) -> Result<(), String> {
        let req = Request::Export {
            name: name.to_string(),
            dynamic,
            read_only,
            guests: None,
        };
        self.call(&req, Some(fd))
    }

    fn revoke(&self, name: &str) -> Result<(), String> {
        self.call(
            &Request::Revoke {
                name: name.to_string(),
            },
            None,
        )
    }
}

fn target(d: &DaemonHandle) -> Target {
    Target {
        sockets: d.socket_paths().to_vec(),
        options: Default::default(),
        host: d
            .control_socket()
            .map(|p| Arc::new(Ctl(p.to_path_buf())) as Arc<dyn HostControl>),
    }
}

fn daemon(
    dir: &Path,
    name: &str,
    adjust: impl FnOnce(&mut Config),
) -> Result<DaemonHandle, String> {
    let mut cfg = Config::new(dir.join(format!("{name}-0.sock")));
    cfg.socket_paths.push(dir.join(format!("{name}-1.sock")));
    cfg.request_queues = 2;
    cfg.shm_size = 64 << 20;
    cfg.allow_memfd_shared_objects = true;
    cfg.control_socket = Some(dir.join(format!("{name}-ctl.sock")));
    adjust(&mut cfg);
    start(cfg).map_err(|e| format!("starting the daemon ({name}): {e}"))
}

fn run_mode(suite: &mut Suite, mode: &str, target: &Target) {
    for (name, scenario) in all() {
        suite.run(&format!("{mode}/{name}"), || scenario(target));
    }
}

fn main() -> ExitCode {
    // RUST_LOG=debug shows the daemon's side of each scenario.
    let _ = env_logger::builder().is_test(true).try_init();
    let filters: Vec<String> = std::env::args().skip(1).collect();
    let mut suite = Suite::new().with_filters(filters).verbose(true);
    let dir = tempfile::tempdir().expect("temporary directory");

    match daemon(dir.path(), "full", |_| {}) {
        Ok(d) => {
            let target = target(&d);
            run_mode(&mut suite, "full", &target);
            let mut legacy = target.clone();
            legacy.options.event_idx = false;
            legacy.options.indirect = false;
            run_mode(&mut suite, "no-event-idx", &legacy);
            let split = ChainLayout {
                max_desc_len: Some(61),
                first_desc_len: Some(5),
                indirect: false,
            };
            let mut cut = target.clone();
            cut.options.chain_layout = split;
            run_mode(&mut suite, "split", &cut);
            d.stop();
        }
        Err(e) => suite.run("full/daemon_starts", || Err(Stop::Fail(e))),
    }

    match daemon(dir.path(), "noshm", |c| c.shm_size = 0) {
        Ok(d) => {
            let target = target(&d);
            for (name, scenario) in all() {
                if name.contains("shm") || name.contains("config") || name.contains("reset") {
                    suite.run(&format!("no-shm-daemon/{name}"), || scenario(&target));
                }
            }
            d.stop();
        }
        Err(e) => suite.run("no-shm-daemon/daemon_starts", || Err(Stop::Fail(e))),
    }

    let summary = suite.finish();
    if summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
