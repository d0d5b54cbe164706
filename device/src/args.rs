// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The command line: clap arguments, and the one place they are validated
//! ([`TryFrom<Args>`] for [`Config`]).

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::activation::{ListeningSocket, SocketFdError};
use crate::control::CtlArgs;
use crate::daemon::{Config, ExportConfig, ABOUT, LONG_ABOUT, MAX_REQUEST_QUEUES, MAX_SOCKETS};
use crate::exporter::{page_size, ExportSpec, Limits};
use crate::provider::ProviderChoice;

/// The whole command line: the daemon's options, or `ctl`.
#[derive(Debug, Parser)]
#[command(
    name = env!("CARGO_PKG_NAME"),
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub args: Args,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Talk to a running daemon's control socket (list, stats, export,
    /// revoke, evict).
    Ctl(CtlArgs),
}

/// The daemon's options.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Args {
    /// Socket to listen on for the VMM's front-end. With --socket-count N > 1, the
    /// sockets are PATH0 .. PATH{N-1} (guest i on PATHi); with 1 (the
    /// default) PATH is used as is. A socket handed over by systemd socket
    /// activation (LISTEN_FDS) that is bound to this path is served as it
    /// is instead of binding a new one.
    #[arg(long, value_name = "PATH", required_unless_present = "socket_fds")]
    pub socket_path: Option<PathBuf>,

    /// Serve on a listening Unix socket the daemon was started with instead
    /// of binding --socket-path: the number of an inherited file descriptor,
    /// already bound and listening. Repeatable, once per guest in guest
    /// order (guest i is the i-th --socket-fd). The daemon never removes
    /// such a socket's file; whoever created it does.
    #[arg(
        long = "socket-fd",
        value_name = "FD",
        conflicts_with_all = ["socket_path", "socket_count"]
    )]
    pub socket_fds: Vec<RawFd>,

    /// Number of guests, one socket each (1 to 64). Guests are fully
    /// isolated: each sees only its own objects and the exports it is
    /// allowed to open.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub socket_count: usize,

    /// Where host-placed objects come from: memfd (any Linux; syncs are
    /// emulated), udmabuf (/dev/udmabuf: real dma-bufs over sealed
    /// memfds), dma-heap (/dev/dma_heap/system) or auto (udmabuf, else
    /// dma-heap, else memfd).
    #[arg(long, value_name = "PROVIDER", default_value = "memfd")]
    pub provider: ProviderChoice,

    /// Size of shared memory region 0, the window host-placed objects are
    /// mapped into for zero-copy guest access (needs a front-end that
    /// acks the SHMEM protocol feature). K, M, G, T suffixes; a page multiple. 0
    /// disables the window (SHMEM is then not offered).
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_size)]
    pub shm_size: u64,

    /// Request queues (controlq, controlq2, ...), 1 to 63; the device has
    /// one more, the eventq. Requests on different queues complete
    /// independently.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u16,

    /// Serve each request queue past the first on a thread of its own
    /// (one thread serves controlq, the eventq and completions). Every
    /// request still takes the one model lock, so this pays off only with
    /// CPUs to spare: on 2 CPUs shared with the guest it measured slower
    /// when the threads share a CPU (docs/benchmarks.md).
    #[arg(long)]
    pub worker_per_queue: bool,

    /// Objects each guest may hold at once (ENOSPC beyond); above 0.
    /// Default 4096. Small memfd objects (up to 1 MiB) are extents of
    /// shared slabs and hold no open file, so this can be far above the
    /// open-file limit; objects with fds of their own are bounded by
    /// --max-fd-objects.
    #[arg(long, value_name = "N")]
    pub max_objects: Option<u32>,

    /// Objects with fds of their own each guest may have at once (ENOSPC
    /// beyond): memfd objects above 1 MiB, small ones placed in the
    /// shared-memory window or published as shared objects, every udmabuf
    /// and dma-heap object, shared objects opened by UUID; above 0.
    /// Default 4096, lowered at start when the open-file limit cannot hold
    /// every guest at it; a value given here is never lowered, and the
    /// daemon refuses to start when the limit cannot hold it.
    #[arg(long, value_name = "N")]
    pub max_fd_objects: Option<u32>,

    /// Bytes of host memory each guest's objects may use (ENOSPC beyond);
    /// also the largest memfd or dma-heap object. K, M, G, T suffixes;
    /// above 0.
    #[arg(long, value_name = "BYTES", default_value = "4G", value_parser = parse_size)]
    pub max_bytes: u64,

    /// A fence not signalled within this is signalled with ETIMEDOUT by the
    /// device. Milliseconds, or a number with ms, s or m; above 0.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub fence_timeout: Duration,

    /// Listen for host control commands here (the `ctl` subcommand):
    /// list, stats, export, revoke, evict.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Register a host buffer at start:
    /// NAME=PATH[,dynamic][,read-only][,guests=0:1]. NAME is 1 to 31
    /// bytes. PATH is opened (read-only with read-only): a dma-buf
    /// (or any mappable file, whose syncs are then emulated) whose size is
    /// a page multiple; dynamic lets the host move it; guests lists the
    /// socket indices allowed to OPEN it (default: every guest).
    /// Repeatable.
    #[arg(long = "export", value_name = "NAME=PATH[,OPTS]")]
    pub exports: Vec<String>,

    /// Tests only: allow EXPORT_UUID of memfd objects (the front-end then
    /// receives a memfd, not a dma-buf, for GET_SHARED_OBJECT).
    #[arg(long)]
    pub allow_memfd_shared_objects: bool,
}

/// Why the arguments do not make a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("--socket-path (or --socket-fd) is required: it is where front-ends connect")]
    NoSocketPath,
    #[error("--socket-count must be 1 to {MAX_SOCKETS}, not {0}")]
    SocketCount(usize),
    #[error("--socket-fd {0} is given twice; give each guest its own socket")]
    DuplicateSocketFd(RawFd),
    #[error("--socket-fd: {0}")]
    SocketFd(SocketFdError),
    #[error("--queues must be 1 to {MAX_REQUEST_QUEUES}, not {0}")]
    Queues(u16),
    #[error("--shm-size {0} is not a page multiple ({1}): use {up} or another multiple of {1}", up = round_up(*.0, *.1))]
    ShmSize(u64, u64),
    #[error("--{0} must be above 0")]
    Zero(&'static str),
    #[error("--export {0:?}: {1}")]
    Export(String, String),
    #[error("--export: the name {0:?} is used twice")]
    DuplicateExport(String),
}

impl TryFrom<Args> for Config {
    type Error = ArgsError;

    fn try_from(args: Args) -> Result<Config, ArgsError> {
        let (socket_paths, listen_sockets) = if args.socket_fds.is_empty() {
            (socket_paths(&args)?, Vec::new())
        } else {
            handed_sockets(&args.socket_fds)?
        };
        let guests = socket_paths.len();
        if args.queues == 0 || args.queues > MAX_REQUEST_QUEUES {
            return Err(ArgsError::Queues(args.queues));
        }
        let page = page_size();
        if !args.shm_size.is_multiple_of(page) {
            return Err(ArgsError::ShmSize(args.shm_size, page));
        }
        if args.fence_timeout.is_zero() {
            return Err(ArgsError::Zero("fence-timeout"));
        }
        if args.max_objects == Some(0) {
            return Err(ArgsError::Zero("max-objects"));
        }
        if args.max_fd_objects == Some(0) {
            return Err(ArgsError::Zero("max-fd-objects"));
        }
        if args.max_bytes == 0 {
            return Err(ArgsError::Zero("max-bytes"));
        }
        let limits = Limits {
            max_objects: args.max_objects.unwrap_or(Limits::default().max_objects),
            max_fd_objects: args
                .max_fd_objects
                .unwrap_or(Limits::default().max_fd_objects),
            max_bytes: args.max_bytes,
            ..Limits::default()
        };
        let mut exports: Vec<ExportConfig> = Vec::new();
        for text in &args.exports {
            let export =
                parse_export(text, guests).map_err(|why| ArgsError::Export(text.clone(), why))?;
            if exports.iter().any(|e| e.spec.name == export.spec.name) {
                return Err(ArgsError::DuplicateExport(export.spec.name));
            }
            exports.push(export);
        }
        let mut config = Config::new(PathBuf::new());
        config.socket_paths = socket_paths;
        config.listen_sockets = listen_sockets;
        config.provider = args.provider;
        config.shm_size = args.shm_size;
        config.request_queues = args.queues;
        config.worker_per_queue = args.worker_per_queue;
        config.max_object_size = limits.max_bytes;
        config.limits = limits;
        config.fence_timeout = args.fence_timeout;
        config.control_socket = args.control_socket;
        config.exports = exports;
        config.allow_memfd_shared_objects = args.allow_memfd_shared_objects;
        config.fit_max_fd_objects = args.max_fd_objects.is_none();
        Ok(config)
    }
}

/// `--socket-path` with `--socket-count`: `PATH`, or `PATH0` .. `PATH{N-1}`.
fn socket_paths(args: &Args) -> Result<Vec<PathBuf>, ArgsError> {
    let path = args.socket_path.clone().ok_or(ArgsError::NoSocketPath)?;
    if args.socket_count == 0 || args.socket_count > MAX_SOCKETS {
        return Err(ArgsError::SocketCount(args.socket_count));
    }
    if args.socket_count == 1 {
        return Ok(vec![path]);
    }
    Ok((0..args.socket_count)
        .map(|i| {
            let mut p = path.clone().into_os_string();
            p.push(i.to_string());
            PathBuf::from(p)
        })
        .collect())
}

/// `--socket-fd`: each a listening Unix stream socket (duplicated), guest
/// `i` on the `i`-th; its path is the one it is bound to (empty if none).
fn handed_sockets(
    fds: &[RawFd],
) -> Result<(Vec<PathBuf>, Vec<Option<ListeningSocket>>), ArgsError> {
    if fds.len() > MAX_SOCKETS {
        return Err(ArgsError::SocketCount(fds.len()));
    }
    let mut paths = Vec::with_capacity(fds.len());
    let mut sockets = Vec::with_capacity(fds.len());
    for (i, &fd) in fds.iter().enumerate() {
        if fds[..i].contains(&fd) {
            return Err(ArgsError::DuplicateSocketFd(fd));
        }
        let socket = ListeningSocket::from_fd_number(fd).map_err(ArgsError::SocketFd)?;
        paths.push(socket.path().map(PathBuf::from).unwrap_or_default());
        sockets.push(Some(socket));
    }
    Ok((paths, sockets))
}

/// The smallest multiple of `page` at or above `size` (`size` itself when
/// that overflows).
fn round_up(size: u64, page: u64) -> u64 {
    size.div_ceil(page.max(1))
        .checked_mul(page.max(1))
        .unwrap_or(size)
}

/// `NAME=PATH[,dynamic][,read-only][,guests=0:1]`.
pub fn parse_export(text: &str, guests: usize) -> Result<ExportConfig, String> {
    let mut parts = text.split(',');
    let first = parts.next().unwrap_or_default();
    let (name, path) = first
        .split_once('=')
        .ok_or_else(|| "expected NAME=PATH[,dynamic][,read-only][,guests=0:1]".to_owned())?;
    if name.is_empty() || name.len() >= virtio_dmabuf_protocol::NAME_LEN || name.contains('\0') {
        return Err(format!(
            "the name {name:?} is {} bytes; a name is 1 to {} bytes, without NUL",
            name.len(),
            virtio_dmabuf_protocol::NAME_LEN - 1
        ));
    }
    if path.is_empty() {
        return Err(format!("no path after {name}="));
    }
    let mut spec = ExportSpec {
        name: name.to_owned(),
        dynamic: false,
        read_only: false,
        guests: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "dynamic" => spec.dynamic = true,
            None if opt == "read-only" => spec.read_only = true,
            Some(("guests", list)) => {
                let mut allowed = Vec::new();
                for g in list.split(':') {
                    let g: usize = g.parse().map_err(|_| {
                        format!(
                            "guest {g:?} is not a socket index (guests=0:1 lists guests 0 and 1)"
                        )
                    })?;
                    if g >= guests {
                        return Err(format!(
                            "guest {g} does not exist: with {guests} socket(s) the guests are 0 to {}",
                            guests.saturating_sub(1)
                        ));
                    }
                    if !allowed.contains(&g) {
                        allowed.push(g);
                    }
                }
                spec.guests = Some(allowed);
            }
            _ => {
                return Err(format!(
                    "unknown option {opt:?} (the options are dynamic, read-only and guests=0:1)"
                ))
            }
        }
    }
    Ok(ExportConfig {
        spec,
        path: PathBuf::from(path),
    })
}

/// A byte count: digits with an optional K, M, G or T suffix (powers of
/// 1024; `KiB`-style and lower case accepted).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{text:?}: unknown size suffix {suffix:?}")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A duration: milliseconds, or a number with `ms`, `s` or `m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration"))?;
    let ms = match unit {
        "" | "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" | "min" => n.checked_mul(60_000),
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m)")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::{DEFAULT_FENCE_TIMEOUT, DEFAULT_SHM_SIZE};
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once(env!("CARGO_PKG_NAME")).chain(args.iter().copied()))
    }

    fn config(args: &[&str]) -> Result<Config, ArgsError> {
        Config::try_from(parse(args).expect("clap accepts these").args)
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn socket_path_alone_gives_the_documented_defaults() {
        let c = config(&["--socket-path", "/tmp/dmabuf.sock"]).expect("valid");
        assert_eq!(c.socket_paths, [PathBuf::from("/tmp/dmabuf.sock")]);
        assert_eq!(c.provider, ProviderChoice::Memfd);
        assert_eq!(c.shm_size, 256 << 20);
        assert_eq!(c.request_queues, 1);
        assert_eq!(c.fence_timeout, Duration::from_secs(10));
        assert_eq!(c.limits, Limits::default());
        assert!(c.control_socket.is_none());
        assert!(c.exports.is_empty());
        assert!(!c.allow_memfd_shared_objects);
        assert_eq!(
            (DEFAULT_SHM_SIZE, DEFAULT_FENCE_TIMEOUT),
            (c.shm_size, c.fence_timeout)
        );
    }

    #[test]
    fn socket_path_is_required_for_the_daemon_but_not_for_ctl() {
        assert!(parse(&[]).is_err());
        let cli = parse(&["ctl", "--control-socket", "/tmp/c", "list"]).expect("ctl");
        assert!(matches!(cli.command, Some(Command::Ctl(_))));
        assert!(parse(&[
            "--socket-path",
            "/tmp/s",
            "ctl",
            "--control-socket",
            "/c",
            "list"
        ])
        .is_err());
    }

    #[test]
    fn socket_count_numbers_the_sockets() {
        let c = config(&["--socket-path", "/tmp/vm", "--socket-count", "3"]).expect("valid");
        assert_eq!(
            c.socket_paths,
            ["/tmp/vm0", "/tmp/vm1", "/tmp/vm2"].map(PathBuf::from)
        );
        assert_eq!(
            config(&["--socket-path", "/tmp/vm", "--socket-count", "0"]),
            Err(ArgsError::SocketCount(0))
        );
        assert_eq!(
            config(&["--socket-path", "/tmp/vm", "--socket-count", "65"]),
            Err(ArgsError::SocketCount(65))
        );
    }

    #[test]
    fn options_are_converted_and_checked() {
        let c = config(&[
            "--socket-path",
            "/s",
            "--provider",
            "auto",
            "--shm-size",
            "1G",
            "--queues",
            "4",
            "--max-objects",
            "10",
            "--max-fd-objects",
            "7",
            "--max-bytes",
            "64M",
            "--fence-timeout",
            "250ms",
            "--control-socket",
            "/c",
            "--allow-memfd-shared-objects",
        ])
        .expect("valid");
        assert_eq!(c.provider, ProviderChoice::Auto);
        assert_eq!(c.shm_size, 1 << 30);
        assert_eq!(c.request_queues, 4);
        assert_eq!(c.limits.max_objects, 10);
        assert_eq!(c.limits.max_fd_objects, 7);
        assert!(!c.fit_max_fd_objects, "a quota given is never lowered");
        assert!(
            config(&["--socket-path", "/s"]).is_ok_and(|c| c.fit_max_fd_objects),
            "the default quota is fitted to the open-file limit"
        );
        assert_eq!(c.limits.max_bytes, 64 << 20);
        assert_eq!(c.max_object_size, 64 << 20);
        assert_eq!(c.fence_timeout, Duration::from_millis(250));
        assert_eq!(c.control_socket, Some(PathBuf::from("/c")));
        assert!(c.allow_memfd_shared_objects);

        assert_eq!(
            config(&["--socket-path", "/s", "--queues", "0"]),
            Err(ArgsError::Queues(0))
        );
        assert_eq!(
            config(&["--socket-path", "/s", "--queues", "64"]),
            Err(ArgsError::Queues(64))
        );
        assert!(matches!(
            config(&["--socket-path", "/s", "--shm-size", "1000"]),
            Err(ArgsError::ShmSize(1000, _))
        ));
        assert_eq!(
            config(&["--socket-path", "/s", "--shm-size", "0"]).map(|c| c.shm_size),
            Ok(0)
        );
        assert_eq!(
            config(&["--socket-path", "/s", "--fence-timeout", "0"]),
            Err(ArgsError::Zero("fence-timeout"))
        );
        assert_eq!(
            config(&["--socket-path", "/s", "--max-objects", "0"]),
            Err(ArgsError::Zero("max-objects"))
        );
        assert_eq!(
            config(&["--socket-path", "/s", "--max-bytes", "0"]),
            Err(ArgsError::Zero("max-bytes"))
        );
        assert!(parse(&["--socket-path", "/s", "--provider", "gpu"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--shm-size", "12X"]).is_err());
    }

    #[test]
    fn exports_are_parsed_with_their_options() {
        let c = config(&[
            "--socket-path",
            "/s",
            "--socket-count",
            "2",
            "--export",
            "cam=/dev/fd/5,dynamic,read-only,guests=1",
            "--export",
            "gpu=/tmp/buf",
        ])
        .expect("valid");
        assert_eq!(c.exports.len(), 2);
        assert_eq!(
            c.exports[0],
            ExportConfig {
                spec: ExportSpec {
                    name: "cam".into(),
                    dynamic: true,
                    read_only: true,
                    guests: Some(vec![1]),
                },
                path: PathBuf::from("/dev/fd/5"),
            }
        );
        assert_eq!(c.exports[1].spec.guests, None);
        assert!(!c.exports[1].spec.dynamic);

        let bad = |e: &str| config(&["--socket-path", "/s", "--export", e]);
        assert!(matches!(bad("nopath"), Err(ArgsError::Export(..))));
        assert!(matches!(bad("=/x"), Err(ArgsError::Export(..))));
        assert!(matches!(bad("a=/x,guests=1"), Err(ArgsError::Export(..))));
        assert!(matches!(
            bad("a=/x,guests=zero"),
            Err(ArgsError::Export(..))
        ));
        assert!(matches!(bad("a=/x,fast"), Err(ArgsError::Export(..))));
        assert!(matches!(
            bad(&format!("{}=/x", "n".repeat(32))),
            Err(ArgsError::Export(..))
        ));
        assert_eq!(
            config(&[
                "--socket-path",
                "/s",
                "--export",
                "a=/x",
                "--export",
                "a=/y"
            ]),
            Err(ArgsError::DuplicateExport("a".into()))
        );
    }

    /// Every check of `TryFrom<Args>`, each on otherwise valid arguments.
    #[test]
    fn every_validation_has_its_error() {
        let valid = parse(&["--socket-path", "/s"]).expect("clap").args;
        assert!(Config::try_from(valid.clone()).is_ok());
        let with = |f: &dyn Fn(&mut Args)| {
            let mut a = valid.clone();
            f(&mut a);
            Config::try_from(a)
        };
        assert_eq!(
            with(&|a| a.socket_path = None),
            Err(ArgsError::NoSocketPath)
        );
        assert_eq!(
            with(&|a| a.socket_count = 0),
            Err(ArgsError::SocketCount(0))
        );
        assert_eq!(
            with(&|a| a.socket_count = MAX_SOCKETS + 1),
            Err(ArgsError::SocketCount(MAX_SOCKETS + 1))
        );
        assert!(with(&|a| a.socket_count = MAX_SOCKETS).is_ok());
        assert_eq!(with(&|a| a.queues = 0), Err(ArgsError::Queues(0)));
        assert_eq!(
            with(&|a| a.queues = MAX_REQUEST_QUEUES + 1),
            Err(ArgsError::Queues(MAX_REQUEST_QUEUES + 1))
        );
        assert!(with(&|a| a.queues = MAX_REQUEST_QUEUES).is_ok());
        let page = page_size();
        assert_eq!(
            with(&|a| a.shm_size = page + 1),
            Err(ArgsError::ShmSize(page + 1, page))
        );
        assert_eq!(
            with(&|a| a.fence_timeout = Duration::ZERO),
            Err(ArgsError::Zero("fence-timeout"))
        );
        assert_eq!(
            with(&|a| a.max_objects = Some(0)),
            Err(ArgsError::Zero("max-objects"))
        );
        assert_eq!(
            with(&|a| a.max_fd_objects = Some(0)),
            Err(ArgsError::Zero("max-fd-objects"))
        );
        assert_eq!(
            with(&|a| a.max_bytes = 0),
            Err(ArgsError::Zero("max-bytes"))
        );
        let export =
            |text: &'static str| with(&move |a: &mut Args| a.exports = vec![text.to_owned()]);
        for bad in [
            "nopath",
            "=/x",
            "a=",
            "a\0b=/x",
            "a=/x,guests=1",
            "a=/x,guests=",
            "a=/x,guests=zero",
            "a=/x,fast",
            "a=/x,dynamic=1",
        ] {
            let got = with(&|a| a.exports = vec![bad.to_owned()]);
            assert!(
                matches!(got, Err(ArgsError::Export(..))),
                "{bad:?}: {got:?}"
            );
        }
        assert!(matches!(
            export("a=/x,guests=0:0"),
            Ok(c) if c.exports[0].spec.guests == Some(vec![0])
        ));
        assert_eq!(
            with(&|a| a.exports = vec!["a=/x".into(), "a=/y".into()]),
            Err(ArgsError::DuplicateExport("a".into()))
        );
    }

    #[test]
    fn socket_fd_serves_handed_listening_sockets_in_guest_order() {
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixListener;
        let dir = tempfile::tempdir().expect("tempdir");
        let a = UnixListener::bind(dir.path().join("a")).expect("bind");
        let b = UnixListener::bind(dir.path().join("b")).expect("bind");
        let (fa, fb) = (a.as_raw_fd().to_string(), b.as_raw_fd().to_string());
        let c = config(&[
            "--socket-fd",
            &fa,
            "--socket-fd",
            &fb,
            "--export",
            "cam=/x,guests=1",
        ])
        .expect("valid");
        assert_eq!(c.socket_paths, [dir.path().join("a"), dir.path().join("b")]);
        assert_eq!(c.listen_sockets.len(), 2);
        assert_eq!(
            c.listen_sockets[1].as_ref().map(ListeningSocket::handed_as),
            Some(b.as_raw_fd())
        );
        assert!(matches!(
            config(&["--socket-fd", &fa, "--export", "cam=/x,guests=1"]),
            Err(ArgsError::Export(..))
        ));
        assert!(parse(&["--socket-fd", &fa, "--socket-path", "/s"]).is_err());
        assert!(parse(&["--socket-fd", &fa, "--socket-count", "2"]).is_err());
        assert_eq!(
            config(&["--socket-fd", &fa, "--socket-fd", &fa]),
            Err(ArgsError::DuplicateSocketFd(a.as_raw_fd()))
        );
        let file = std::fs::File::create(dir.path().join("f")).expect("file");
        let ff = file.as_raw_fd();
        assert_eq!(
            config(&["--socket-fd", &ff.to_string()]),
            Err(ArgsError::SocketFd(SocketFdError::NotSocket(ff)))
        );
        assert_eq!(
            ArgsError::SocketFd(SocketFdError::NotSocket(9)).to_string(),
            "--socket-fd: file descriptor 9 is not a socket"
        );
    }

    /// What an operator reads, and what to change, for each mistake.
    #[test]
    fn refusals_say_what_was_wrong_and_what_to_change() {
        assert_eq!(
            ArgsError::ShmSize(5, 4096).to_string(),
            "--shm-size 5 is not a page multiple (4096): use 4096 or another multiple of 4096"
        );
        assert_eq!(
            ArgsError::ShmSize(10000, 4096).to_string(),
            "--shm-size 10000 is not a page multiple (4096): use 12288 or another multiple of 4096"
        );
        let why = |text: &str, guests| parse_export(text, guests).expect_err("refused");
        assert_eq!(
            why("cam=/x,fast", 1),
            "unknown option \"fast\" (the options are dynamic, read-only and guests=0:1)"
        );
        assert_eq!(
            why("cam=/x,guests=2", 2),
            "guest 2 does not exist: with 2 socket(s) the guests are 0 to 1"
        );
        assert!(why("cam", 1).contains("NAME=PATH"));
        assert!(why(&format!("{}=/x", "n".repeat(32)), 1).contains("is 32 bytes"));
        assert_eq!(why("cam=", 1), "no path after cam=");
        assert!(ArgsError::NoSocketPath.to_string().contains("--socket-fd"));
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1500"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn help_explains_every_option() {
        let help = Cli::command().render_long_help().to_string();
        for default in [
            "Default 4096, lowered",
            "[default: 4G]",
            "1 to 64",
            "1 to 63",
        ] {
            assert!(help.contains(default), "--help lacks {default}");
        }
        for opt in [
            "--socket-path",
            "--socket-count",
            "--provider",
            "--shm-size",
            "--queues",
            "--max-objects",
            "--max-bytes",
            "--fence-timeout",
            "--control-socket",
            "--export",
            "--allow-memfd-shared-objects",
            "--socket-fd",
            "LISTEN_FDS",
            "RUST_LOG",
            "ctl",
        ] {
            assert!(help.contains(opt), "--help lacks {opt}");
        }
    }
}
