// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One client connection served by the real [`Connection`] without the
//! event loop, for the `control_line` fuzz target (cargo feature
//! `fuzzing`, `docs/fuzzing.md`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;

use super::{Connection, Read, Shared};
use crate::fuzzing::{read_available, send_all};
use crate::state::DeviceState;

/// How a [`fuzz_session`] client ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It shuts down its sending side and reads every answer.
    HalfClose,
    /// It closes the socket at once (the daemon carries out what was sent
    /// and answers nobody).
    HangUp,
}

/// Sends `chunks` (bytes, and fds to send with them) on a control
/// connection to `state`, one `sendmsg` each (split when the socket is
/// full), and returns every byte the daemon answered. Between chunks the
/// connection reads, handles complete lines and writes its answers, as
/// its event loop would on each readiness.
pub fn fuzz_session(
    state: Arc<DeviceState>,
    chunks: Vec<(Vec<u8>, Vec<OwnedFd>)>,
    ending: Ending,
) -> io::Result<Vec<u8>> {
    let (ours, peer) = UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    let shared = Rc::new(RefCell::new(Shared {
        accepted: Vec::new(),
        closed: Vec::new(),
        finished: Vec::new(),
        waiting: HashMap::new(),
        next_op: 1,
        clients: 1,
        listener_paused: false,
        stop: false,
    }));
    let mut conn = Connection::new(ours, state, shared);
    let mut answers = Vec::new();
    for (bytes, fds) in chunks {
        let mut fds = Some(fds);
        // Small pieces, so a full socket never blocks this thread: the
        // connection drains what was sent after each.
        for piece in bytes.chunks(32 << 10) {
            if conn.closed {
                break;
            }
            send_all(&peer, piece, &fds.take().unwrap_or_default())?;
            serve(&mut conn, &peer, &mut answers)?;
        }
    }
    match ending {
        Ending::HalfClose => {
            peer.shutdown(Shutdown::Write)?;
            while !conn.closed {
                let before = (conn.input.len(), conn.output.len());
                serve(&mut conn, &peer, &mut answers)?;
                if conn.eof && (conn.input.len(), conn.output.len()) == before {
                    break;
                }
            }
            read_available(&peer, &mut answers)?;
        }
        Ending::HangUp => {
            drop(peer);
            conn.drain_after_hang_up();
        }
    }
    Ok(answers)
}

/// One turn of the event loop for the connection: read what arrived,
/// handle lines, write answers (the client reads them as they come).
fn serve(conn: &mut Connection, peer: &UnixStream, answers: &mut Vec<u8>) -> io::Result<()> {
    loop {
        if !conn.output.is_empty() {
            conn.flush();
        }
        let read = if conn.waiting.is_none() && conn.output.is_empty() && !conn.eof {
            conn.read()
        } else {
            Read::Again
        };
        conn.advance();
        read_available(peer, answers)?;
        conn.flush();
        if conn.closed || (read != Read::Data && conn.output.is_empty()) {
            return Ok(());
        }
    }
}
