// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `ctl` subcommand: one request per connection to the control
//! socket, its answer printed as a table or (`--json`) as one JSON object.
//!
//! [`request`] is the whole exchange and returns the daemon's response;
//! [`execute`] adds argument handling and output, and [`run_ctl`] prints.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{send, sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde_json::Value;

use super::table;
use super::wire::{Request, DEFAULT_EVICT_TIMEOUT_MS};
use crate::exporter::GuestId;

/// Longest response line the client reads (a `list` of many objects).
const MAX_RESPONSE: u64 = 64 << 20;
/// How long to wait for an answer beyond an eviction's own timeout (the
/// mover may still wait for fences, which time out on their own).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// `ctl` arguments (contract section 11).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct CtlArgs {
    /// The daemon's control socket (its `--control-socket`).
    #[arg(long, value_name = "PATH")]
    pub control_socket: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The `ctl` commands.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum CtlCommand {
    /// Every object, like the kernel's dma-buf bufinfo.
    List,
    /// Requests by opcode and status, host syncs by flags.
    Stats,
    /// Register a host buffer under NAME for guests to OPEN.
    Export {
        /// Export name (1 to 31 bytes).
        name: String,
        /// The buffer: opened read-write (read-only with --read-only) and
        /// its fd handed to the daemon.
        #[arg(long, value_name = "PATH")]
        fd_from: PathBuf,
        /// Dynamic exporter: the host may move it while nothing pins it.
        #[arg(long)]
        dynamic: bool,
        /// Guests may only read it.
        #[arg(long)]
        read_only: bool,
        /// Guests (socket indices) allowed to OPEN it; default: every guest.
        #[arg(long, value_name = "0,1", value_delimiter = ',')]
        guests: Option<Vec<GuestId>>,
    },
    /// Withdraw an export; guests holding it get REVOKED.
    Revoke {
        /// Export name.
        name: String,
    },
    /// Move a dynamic object to new memory (importers get MOVE_NOTIFY).
    Evict {
        /// The object's UUID, as `list` shows it.
        uuid: uuid::Uuid,
        /// Give up when the reservation lock is not free within this.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_EVICT_TIMEOUT_MS)]
        timeout_ms: u64,
    },
}

impl CtlCommand {
    /// The request line this command sends.
    pub fn to_request(&self) -> Request {
        match self {
            CtlCommand::List => Request::List {},
            CtlCommand::Stats => Request::Stats {},
            CtlCommand::Export {
                name,
                dynamic,
                read_only,
                guests,
                ..
            } => Request::Export {
                name: name.clone(),
                dynamic: *dynamic,
                read_only: *read_only,
                guests: guests.clone(),
            },
            CtlCommand::Revoke { name } => Request::Revoke { name: name.clone() },
            CtlCommand::Evict { uuid, timeout_ms } => Request::Evict {
                uuid: *uuid,
                timeout_ms: *timeout_ms,
            },
        }
    }
}

/// Why a `ctl` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot connect to the control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Io(#[from] io::Error),
    #[error("no answer from the daemon within {0:?}")]
    Timeout(Duration),
    #[error("the daemon closed the connection without answering")]
    NoResponse,
    #[error("the daemon's answer is not a response: {0}")]
    BadResponse(String),
    /// The daemon answered `{"ok": false, "error": ...}`.
    #[error("{0}")]
    Refused(String),
}

/// Sends `request` (with `fd` attached for `export`) and returns the
/// daemon's response object, `{"ok": false, ...}` included.
pub fn request(
    path: &Path,
    request: &Request,
    fd: Option<BorrowedFd<'_>>,
) -> Result<Value, CtlError> {
    let stream = UnixStream::connect(path).map_err(|source| CtlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let timeout = match request {
        Request::Evict { timeout_ms, .. } => {
            REPLY_TIMEOUT.saturating_add(Duration::from_millis(*timeout_ms))
        }
        _ => REPLY_TIMEOUT,
    };
    stream.set_read_timeout(Some(timeout))?;
    send_line(&stream, &request.to_line(), fd)?;
    let mut line = Vec::new();
    let read = BufReader::new(&stream)
        .take(MAX_RESPONSE)
        .read_until(b'\n', &mut line);
    match read {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(CtlError::Timeout(timeout));
        }
        Err(e) => return Err(e.into()),
    }
    if line.is_empty() {
        return Err(CtlError::NoResponse);
    }
    if line.last() != Some(&b'\n') {
        return Err(CtlError::BadResponse("truncated line".into()));
    }
    let response: Value =
        serde_json::from_slice(&line).map_err(|e| CtlError::BadResponse(e.to_string()))?;
    if !response.get("ok").is_some_and(Value::is_boolean) {
        return Err(CtlError::BadResponse(format!("no \"ok\" in {response}")));
    }
    Ok(response)
}

/// [`request`], with `{"ok": false}` turned into [`CtlError::Refused`];
/// returns the payload (the response without `ok`).
pub fn call(path: &Path, req: &Request, fd: Option<BorrowedFd<'_>>) -> Result<Value, CtlError> {
    let mut response = request(path, req, fd)?;
    if response.get("ok").and_then(Value::as_bool) != Some(true) {
        let message = response
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("the daemon refused the request without saying why");
        return Err(CtlError::Refused(message.to_owned()));
    }
    if let Some(fields) = response.as_object_mut() {
        fields.remove("ok");
    }
    Ok(response)
}

/// Runs one `ctl` command and returns what it prints on stdout.
pub fn execute(args: &CtlArgs) -> Result<String, CtlError> {
    let req = args.command.to_request();
    let file = match &args.command {
        CtlCommand::Export {
            fd_from, read_only, ..
        } => Some(open_buffer(fd_from, *read_only)?),
        _ => None,
    };
    let payload = call(&args.control_socket, &req, file.as_ref().map(File::as_fd))?;
    // The daemon holds its own reference now.
    drop(file);
    Ok(render(&args.command, payload, args.json))
}

/// The `ctl` subcommand: prints the answer, or the error on
/// stderr with a failing exit code.
pub fn run_ctl(args: CtlArgs) -> ExitCode {
    let out = match execute(&args) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("ctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ctl: writing the output: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Opens the buffer to send: read-write, or read-only with `--read-only`.
///
/// A kernel dma-buf cannot be opened again through its `/proc/self/fd/N`
/// link (its inode has no open: `ENXIO`), and that is the way a program
/// hands its dma-buf to `ctl` (an inherited fd N). For that path, and
/// `/dev/fd/N`, an `ENXIO` makes `ctl` send a duplicate of fd N itself,
/// whose access mode must allow what was asked.
fn open_buffer(path: &Path, read_only: bool) -> Result<File, CtlError> {
    let open_error = |source| CtlError::Open {
        path: path.to_owned(),
        source,
    };
    match OpenOptions::new().read(true).write(!read_only).open(path) {
        Ok(file) => Ok(file),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => match own_fd_number(path) {
            Some(n) => duplicate_own_fd(n, read_only).map_err(open_error),
            None => Err(open_error(e)),
        },
        Err(e) => Err(open_error(e)),
    }
}

/// N of `/proc/self/fd/N`, `/proc/<this process>/fd/N` or `/dev/fd/N`.
fn own_fd_number(path: &Path) -> Option<i32> {
    let text = path.to_str()?;
    let own = format!("/proc/{}/fd/", std::process::id());
    ["/proc/self/fd/", "/dev/fd/", own.as_str()]
        .iter()
        .find_map(|prefix| text.strip_prefix(prefix))
        .and_then(|n| n.parse().ok())
}

/// A close-on-exec duplicate of this process's fd `n`, refused with
/// `EACCES` when `n` is not open for writing and a writable export was
/// asked for.
fn duplicate_own_fd(n: i32, read_only: bool) -> io::Result<File> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the fd table; a number that is
    // not an open fd is EBADF, and no memory of ours is involved.
    let dup = unsafe { libc::fcntl(n, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a new fd nobody else owns; it is wrapped once, here.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(dup) };
    let mode = rustix::fs::fcntl_getfl(&file)?;
    if !read_only && mode & rustix::fs::OFlags::RWMODE != rustix::fs::OFlags::RDWR {
        return Err(io::Error::from_raw_os_error(libc::EACCES));
    }
    Ok(file)
}

/// Writes the request line; the fd rides on the `sendmsg` of its first
/// byte, which is how the daemon ties it to this line.
fn send_line(stream: &UnixStream, line: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut sent = 0;
    if let Some(fd) = fd {
        let fds = [fd];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other(
                "no room for the fd in the control message",
            ));
        }
        sent = loop {
            match sendmsg(
                stream,
                &[IoSlice::new(line)],
                &mut control,
                SendFlags::NOSIGNAL,
            ) {
                Ok(n) => break n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        };
    }
    while sent < line.len() {
        match send(stream, &line[sent..], SendFlags::NOSIGNAL) {
            Ok(n) => sent += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What `ctl` prints for a successful `command` whose payload (the
/// response without `ok`) is `payload`.
fn render(command: &CtlCommand, payload: Value, json: bool) -> String {
    if json {
        // list: {"objects": [...]}; stats: the stats object; the rest
        // keep the whole response, {"ok": true, ...}.
        let out = match command {
            CtlCommand::List | CtlCommand::Stats => payload,
            _ => super::wire::ok(payload),
        };
        return format!("{out}\n");
    }
    let text = |key: &str| {
        payload
            .get(key)
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .unwrap_or_default()
    };
    match command {
        CtlCommand::List => table::list(&payload),
        CtlCommand::Stats => table::stats(&payload),
        CtlCommand::Export { name, .. } => format!(
            "exported {name:?} as {} ({} bytes)\n",
            text("uuid"),
            text("size")
        ),
        CtlCommand::Revoke { name } => format!("revoked {name:?}\n"),
        CtlCommand::Evict { uuid, .. } => format!("evicted {uuid}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_output_of_list_and_stats_is_the_payload_and_of_the_rest_the_response() {
        let objects = json!({"objects": []});
        assert_eq!(
            render(&CtlCommand::List, objects.clone(), true),
            "{\"objects\":[]}\n"
        );
        let revoke = CtlCommand::Revoke { name: "a".into() };
        let out = render(&revoke, json!({"name": "a"}), true);
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v, json!({"ok": true, "name": "a"}));
    }

    #[test]
    fn export_of_a_missing_path_fails_before_connecting() {
        let args = CtlArgs {
            control_socket: "/nonexistent/ctl.sock".into(),
            json: false,
            command: CtlCommand::Export {
                name: "x".into(),
                fd_from: "/nonexistent/buffer".into(),
                dynamic: false,
                read_only: false,
                guests: None,
            },
        };
        assert!(matches!(execute(&args), Err(CtlError::Open { .. })));
    }

    #[test]
    fn own_fd_paths_are_recognised() {
        let own = format!("/proc/{}/fd/7", std::process::id());
        for (path, n) in [
            ("/proc/self/fd/7", Some(7)),
            ("/dev/fd/12", Some(12)),
            (own.as_str(), Some(7)),
            ("/proc/1/fd/7", None),
            ("/proc/self/fd/x", None),
            ("/dev/shm/frame", None),
        ] {
            assert_eq!(own_fd_number(Path::new(path)), n, "{path}");
        }
    }

    #[test]
    fn a_real_dmabuf_goes_through_proc_self_fd() {
        use crate::provider::{open_provider, page_size, ProviderChoice};
        let Ok(p) = open_provider(ProviderChoice::Auto, 1 << 20) else {
            return;
        };
        if !p.makes_real_dmabufs() {
            println!("ctl export of a real dma-buf skipped: no udmabuf or dma-heap on this host");
            return;
        }
        let b = p.allocate(page_size()).expect("allocate");
        let path = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&b.fd().expect("own fd"))
        ));
        let again = OpenOptions::new().read(true).write(true).open(&path);
        assert_eq!(
            again.map(|_| ()).map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENXIO)),
            "a dma-buf has no open of its own"
        );
        let sent = open_buffer(&path, false).expect("fd N itself");
        let ino = |fd: BorrowedFd<'_>| rustix::fs::fstat(fd).expect("fstat").st_ino;
        assert_eq!(ino(sent.as_fd()), ino(b.fd().expect("own fd")));
        assert!(open_buffer(&path, true).is_ok());
    }

    #[test]
    fn a_read_only_fd_is_not_sent_for_a_writable_export() {
        let file = tempfile::tempfile().expect("temp file");
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
        let ro = File::open(&path).expect("reopen read-only");
        let n = std::os::fd::AsRawFd::as_raw_fd(&ro);
        let err = duplicate_own_fd(n, false).expect_err("read-only fd");
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        assert!(duplicate_own_fd(n, true).is_ok());
    }
}
