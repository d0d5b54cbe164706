// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the daemon says to, and takes from, whoever started it: listening
//! sockets handed over (`--socket-fd N`, systemd socket activation) and
//! readiness (`sd_notify`), spoken directly over the documented
//! environment protocols rather than through libsystemd:
//!
//! - socket activation (sd_listen_fds(3)): when `LISTEN_PID` is this
//!   process, `LISTEN_FDS` sockets start at fd 3 (`LISTEN_FDNAMES` names
//!   them, colon-separated);
//! - readiness (sd_notify(3)): one datagram with `READY=1` (or
//!   `STOPPING=1`, `STATUS=...`) to the Unix socket `NOTIFY_SOCKET` names, a
//!   path or, with a leading `@`, an abstract name.
//!
//! A handed socket is duplicated, never taken over: the number the daemon
//! was given stays open and belongs to whoever owned it, and the daemon
//! never removes the socket file (its creator, systemd or the parent,
//! does). The duplicate must be a listening Unix stream socket.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::net::{sockopt, AddressFamily, SocketType};

/// The first fd of socket activation (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Why a file descriptor cannot serve as a guest's listening socket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketFdError {
    #[error("file descriptor {0} is not open")]
    NotOpen(RawFd),
    #[error("file descriptor {0} is not a socket")]
    NotSocket(RawFd),
    #[error("file descriptor {0} is not a Unix socket (AF_UNIX)")]
    NotUnix(RawFd),
    #[error("file descriptor {0} is a Unix socket but not a stream socket (SOCK_STREAM)")]
    NotStream(RawFd),
    #[error("file descriptor {0} is a Unix stream socket that is not listening (bind and listen on it first)")]
    NotListening(RawFd),
    #[error("file descriptor {fd}: {why}")]
    Host { fd: RawFd, why: String },
}

/// A listening Unix stream socket the daemon was handed, duplicated (the
/// original fd number stays its owner's). Cheap to clone: clones share
/// the duplicate.
#[derive(Debug, Clone)]
pub struct ListeningSocket {
    fd: Arc<OwnedFd>,
    /// The fd number it was handed as.
    handed_as: RawFd,
    path: Option<PathBuf>,
}

impl PartialEq for ListeningSocket {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.fd, &other.fd)
    }
}

impl Eq for ListeningSocket {}

impl ListeningSocket {
    /// Duplicates fd `fd` of this process and checks that it is a listening
    /// Unix stream socket. The original is left as it was.
    pub fn from_fd_number(fd: RawFd) -> Result<ListeningSocket, SocketFdError> {
        if fd < 0 {
            return Err(SocketFdError::NotOpen(fd));
        }
        // SAFETY: F_DUPFD_CLOEXEC reads and writes no memory of ours; a
        // number that is not open fails with EBADF. The original is only
        // duplicated, never closed, so whoever owns it is unaffected.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, LISTEN_FDS_START) };
        if dup < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBADF) => SocketFdError::NotOpen(fd),
                _ => SocketFdError::Host {
                    fd,
                    why: e.to_string(),
                },
            });
        }
        // SAFETY: `dup` was just returned by fcntl: an open fd that nothing
        // else in the process knows of, so this is its only owner.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        Self::check(owned, fd)
    }

    /// A listener of this process, e.g. one a test bound.
    pub fn from_listener(listener: UnixListener) -> Result<ListeningSocket, SocketFdError> {
        let fd = listener.as_raw_fd();
        Self::check(OwnedFd::from(listener), fd)
    }

    fn check(owned: OwnedFd, handed_as: RawFd) -> Result<ListeningSocket, SocketFdError> {
        let host = |e: rustix::io::Errno| SocketFdError::Host {
            fd: handed_as,
            why: io::Error::from(e).to_string(),
        };
        match sockopt::socket_domain(&owned) {
            Ok(AddressFamily::UNIX) => {}
            Ok(_) => return Err(SocketFdError::NotUnix(handed_as)),
            Err(rustix::io::Errno::NOTSOCK) => return Err(SocketFdError::NotSocket(handed_as)),
            Err(e) => return Err(host(e)),
        }
        if sockopt::socket_type(&owned).map_err(host)? != SocketType::STREAM {
            return Err(SocketFdError::NotStream(handed_as));
        }
        if !sockopt::socket_acceptconn(&owned).map_err(host)? {
            return Err(SocketFdError::NotListening(handed_as));
        }
        let listener = UnixListener::from(owned);
        let path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf));
        Ok(ListeningSocket {
            fd: Arc::new(OwnedFd::from(listener)),
            handed_as,
            path,
        })
    }

    /// The path the socket is bound to; none for an unnamed or abstract one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The fd number the daemon was handed.
    pub fn handed_as(&self) -> RawFd {
        self.handed_as
    }

    /// A new listener on the same socket (another duplicate), to accept on.
    pub fn listener(&self) -> io::Result<UnixListener> {
        Ok(UnixListener::from(self.fd.as_fd().try_clone_to_owned()?))
    }
}

/// Why the socket activation environment cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of file descriptors")]
    BadCount(String),
    #[error("socket {name:?} handed over by systemd: {source}")]
    Socket {
        name: String,
        #[source]
        source: SocketFdError,
    },
}

/// The fd numbers (with their `LISTEN_FDNAMES` names) that socket
/// activation hands to process `me`, from the values of `LISTEN_PID`,
/// `LISTEN_FDS` and `LISTEN_FDNAMES`. None at all unless `LISTEN_PID` is
/// `me` (the variables were meant for another process, or are stale).
pub fn activation_fds(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
    me: u32,
) -> Result<Vec<(RawFd, String)>, ActivationError> {
    let Some(pid) = listen_pid.and_then(|p| p.trim().parse::<u32>().ok()) else {
        return Ok(Vec::new());
    };
    if pid != me {
        return Ok(Vec::new());
    }
    let text = listen_fds.unwrap_or("0");
    let count: RawFd = text
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=1024).contains(n))
        .ok_or_else(|| ActivationError::BadCount(text.to_owned()))?;
    let mut names = names.unwrap_or("").split(':');
    Ok((0..count)
        .map(|i| {
            let name = names
                .next()
                .filter(|n| !n.is_empty())
                .map_or_else(|| format!("fd {}", LISTEN_FDS_START + i), str::to_owned);
            (LISTEN_FDS_START + i, name)
        })
        .collect())
}

/// The listening sockets systemd handed to this process, in `LISTEN_FDS`
/// order, each checked; none when the process was not socket-activated.
pub fn systemd_sockets() -> Result<Vec<(ListeningSocket, String)>, ActivationError> {
    let var = |name| std::env::var(name).ok();
    let fds = activation_fds(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )?;
    fds.into_iter()
        .map(|(fd, name)| match ListeningSocket::from_fd_number(fd) {
            Ok(socket) => Ok((socket, name)),
            Err(source) => Err(ActivationError::Socket { name, source }),
        })
        .collect()
}

/// Tells the service manager `state` (`READY=1`, `STOPPING=1`,
/// `STATUS=...`, one per line) when `NOTIFY_SOCKET` names one. False when
/// it does not (the daemon was not started by a manager that asked).
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(addr) if !addr.is_empty() => notify_to(&addr, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` as one datagram to the notification socket `addr`: a
/// path, or `@name` for an abstract socket.
pub fn notify_to(addr: &OsStr, state: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let bytes = addr.as_bytes();
    let sent = match bytes.first() {
        Some(b'/') => socket.send_to(state.as_bytes(), Path::new(addr))?,
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            let name = std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?;
            socket.send_to_addr(state.as_bytes(), &name)?
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET {addr:?} is neither a path nor an @abstract name"),
            ))
        }
    };
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the notification was cut short",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(dir: &Path, name: &str) -> UnixListener {
        UnixListener::bind(dir.join(name)).expect("bind")
    }

    #[test]
    fn a_listening_unix_stream_socket_is_taken_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = bound(dir.path(), "vm.sock");
        let socket = ListeningSocket::from_fd_number(listener.as_raw_fd()).expect("listening");
        assert_eq!(socket.path(), Some(dir.path().join("vm.sock").as_path()));
        assert_eq!(socket.handed_as(), listener.as_raw_fd());
        // The duplicate accepts what connects to the original's path.
        let accept = socket.listener().expect("listener");
        let _client =
            std::os::unix::net::UnixStream::connect(dir.path().join("vm.sock")).expect("connect");
        accept.accept().expect("accepted on the duplicate");
        drop(socket);
        drop(accept);
        // The original is still open and still listening.
        assert!(ListeningSocket::from_fd_number(listener.as_raw_fd()).is_ok());
    }

    #[test]
    fn other_fds_are_refused_with_what_they_are() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = std::fs::File::create(dir.path().join("f")).expect("file");
        assert_eq!(
            ListeningSocket::from_fd_number(file.as_raw_fd()),
            Err(SocketFdError::NotSocket(file.as_raw_fd()))
        );
        let (a, _b) = UnixDatagram::pair().expect("pair");
        assert_eq!(
            ListeningSocket::from_fd_number(a.as_raw_fd()),
            Err(SocketFdError::NotStream(a.as_raw_fd()))
        );
        let (s, _t) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert_eq!(
            ListeningSocket::from_fd_number(s.as_raw_fd()),
            Err(SocketFdError::NotListening(s.as_raw_fd()))
        );
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
        assert_eq!(
            ListeningSocket::from_fd_number(tcp.as_raw_fd()),
            Err(SocketFdError::NotUnix(tcp.as_raw_fd()))
        );
        assert_eq!(
            ListeningSocket::from_fd_number(-1),
            Err(SocketFdError::NotOpen(-1))
        );
        assert!(SocketFdError::NotListening(7)
            .to_string()
            .contains("bind and listen"));
    }

    #[test]
    fn activation_fds_follow_listen_pid_and_count() {
        let me = 4242;
        assert_eq!(activation_fds(None, Some("2"), None, me), Ok(vec![]));
        assert_eq!(
            activation_fds(Some("1"), Some("2"), None, me),
            Ok(vec![]),
            "meant for another process"
        );
        assert_eq!(
            activation_fds(Some("4242"), Some("2"), Some("vm0:vm1"), me),
            Ok(vec![(3, "vm0".into()), (4, "vm1".into())])
        );
        assert_eq!(
            activation_fds(Some("4242"), Some("2"), None, me),
            Ok(vec![(3, "fd 3".into()), (4, "fd 4".into())])
        );
        assert_eq!(activation_fds(Some("4242"), None, None, me), Ok(vec![]));
        assert_eq!(
            activation_fds(Some("4242"), Some("x"), None, me),
            Err(ActivationError::BadCount("x".into()))
        );
        assert_eq!(
            activation_fds(Some("4242"), Some("-1"), None, me),
            Err(ActivationError::BadCount("-1".into()))
        );
    }

    #[test]
    fn notify_sends_one_datagram_to_a_path_or_an_abstract_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).expect("bind");
        notify_to(path.as_os_str(), "READY=1\nSTATUS=listening").expect("sent");
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=listening");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("dmabuf-activation-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract");
        let manager = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1").expect("sent");
        let n = manager.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(notify_to(OsStr::new("relative"), "READY=1").is_err());
        assert!(notify_to(dir.path().join("nobody").as_os_str(), "READY=1").is_err());
    }
}
