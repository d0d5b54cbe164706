// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The control socket's request lines (`control/server/`): a client's
//! byte stream, in chunks, with memfds on some of them, read, split into
//! lines and handled by the real connection over a socket pair. Checked
//! (section 11, `docs/control.md`):
//!
//! - a client that half-closes gets exactly one answer line per request
//!   line (blank lines get none; a line longer than `MAX_LINE` gets one,
//!   however long), each a JSON object with a boolean `ok`; without fds,
//!   `list` and `stats` succeed;
//! - every request that parses prints (`Request::to_line`) to a line that
//!   parses back to it;
//! - nothing panics, and after the connection every fd it received is
//!   closed (the model is dropped with its exports).
#![no_main]

use std::os::fd::OwnedFd;

use libfuzzer_sys::fuzz_target;
use rustix::fs::{memfd_create, MemfdFlags};
use vhost_device_dmabuf::control::{Request, MAX_LINE};
use vhost_device_dmabuf::exporter::Limits;
use vhost_device_dmabuf::fuzzing::{control_session, memfd_exporter, open_fds, Ending};
use vhost_device_dmabuf::state::DeviceState;
use vhost_device_dmabuf_fuzz::control::Settings;

fn memfd(read_only: bool) -> OwnedFd {
    let fd = memfd_create("fuzz-export", MemfdFlags::CLOEXEC).expect("memfd");
    rustix::fs::ftruncate(&fd, 4096).expect("ftruncate");
    if !read_only {
        return fd;
    }
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    std::fs::File::open(path).expect("reopen read-only").into()
}

/// What the daemon must answer for `stream`: per request line, whether it
/// is `list`/`stats` (answered `ok`) and whether it parsed at all.
fn expected(stream: &[u8]) -> Vec<Option<Request>> {
    let mut lines: Vec<&[u8]> = stream.split(|b| *b == b'\n').collect();
    if stream.last() == Some(&b'\n') {
        lines.pop();
    }
    lines
        .into_iter()
        .filter(|l| l.len() > MAX_LINE || !l.trim_ascii().is_empty())
        .map(|l| {
            if l.len() > MAX_LINE {
                None
            } else {
                serde_json::from_slice::<Request>(l.trim_ascii()).ok()
            }
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&settings, text)) = data.split_first() else {
        return;
    };
    let settings = Settings::decode(settings);
    let mut stream = text.to_vec();
    if settings.pad_first_line {
        let end = stream
            .iter()
            .position(|b| *b == b'\n')
            .unwrap_or(stream.len());
        stream.splice(end..end, std::iter::repeat_n(b' ', MAX_LINE + 1));
    }

    // Printing a parsed request gives a line that parses back to it.
    for line in stream.split(|b| *b == b'\n') {
        if let Ok(request) = serde_json::from_slice::<Request>(line.trim_ascii()) {
            let again: Request = serde_json::from_slice(&request.to_line()).expect("reparses");
            assert_eq!(again, request);
        }
    }

    let fds_before = open_fds().expect("/proc/self/fd");
    let mut any_fd = false;
    let most = if settings.pad_first_line { 8 } else { 64 };
    let chunks: Vec<(Vec<u8>, Vec<OwnedFd>)> = stream
        // At most 64 writes, 8 with a padded line: every read rescans the
        // line so far, so a padded line in small writes takes long and
        // tests nothing more.
        .chunks(settings.chunk.max(stream.len().div_ceil(most)).max(1))
        .map(|chunk| {
            let with_fd = settings.fds && chunk.windows(6).any(|w| w == b"export");
            any_fd |= with_fd;
            let fds = if with_fd {
                vec![memfd(settings.read_only_fds)]
            } else {
                Vec::new()
            };
            (chunk.to_vec(), fds)
        })
        .collect();
    let state = DeviceState::new(memfd_exporter(2, Limits::default())).expect("state");
    let ending = if settings.hang_up {
        Ending::HangUp
    } else {
        Ending::HalfClose
    };
    let answers = control_session(state, chunks, ending).expect("session");

    if ending == Ending::HalfClose {
        let want = expected(&stream);
        let mut got: Vec<&[u8]> = answers.split(|b| *b == b'\n').collect();
        assert_eq!(got.pop(), Some(&b""[..]), "answers end with a newline");
        assert_eq!(got.len(), want.len(), "one answer per request line");
        for (answer, request) in got.iter().zip(&want) {
            let value: serde_json::Value = serde_json::from_slice(answer).expect("JSON answer");
            let ok = value
                .get("ok")
                .and_then(|v| v.as_bool())
                .expect("`ok` flag");
            let listing = matches!(request, Some(Request::List {} | Request::Stats {}));
            if listing && !any_fd {
                assert!(ok, "{request:?} answered {value}");
            }
            if request.is_none() {
                assert!(!ok, "a malformed line answered {value}");
            }
        }
    } else {
        assert!(answers.is_empty() || answers.ends_with(b"\n"));
    }
    assert_eq!(open_fds().expect("/proc/self/fd"), fds_before, "fds leaked");
});
