// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The vhost-user relay's message parser (`backend/relay.rs`): a front-end
//! byte stream, written in segments with fds on some of them, carried to
//! the back-end side by the relay's reading loop. Checked against a small
//! model of the framing (a 12-byte header whose third word is the body
//! size, at most `MAX_MSG_SIZE`):
//!
//! - exactly the whole messages before the first bad one are forwarded,
//!   unchanged, with the fds that came with them;
//! - the loop ends cleanly only at a message boundary, with `InvalidData`
//!   at an oversized header or a message with more fds than vhost-user
//!   allows (`MAX_ATTACHED_FD_ENTRIES`), and with an error at a cut-off
//!   message;
//! - the acked protocol features and the kept back-end channel socket are
//!   those of the last `SET_PROTOCOL_FEATURES` (8-byte body; `RESET_OWNER`
//!   clears them) and `SET_BACKEND_REQ_FD` (exactly one fd);
//! - no fd is left open afterwards.
#![no_main]

use std::io::ErrorKind;

use libfuzzer_sys::fuzz_target;
use vhost_device_dmabuf::fuzzing::{
    known_protocol_features, open_fds, relay_stream, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
    RELAY_STREAM_MAX,
};
use vhost_device_dmabuf_fuzz::relay::{
    decode, HEADER_SIZE, RESET_OWNER, SET_BACKEND_REQ_FD, SET_PROTOCOL_FEATURES,
};

/// What the relay should make of the stream.
#[derive(Debug, Default)]
struct Expect {
    end: Option<ErrorKind>,
    forwarded: usize,
    forwarded_fds: usize,
    messages: u64,
    features: u64,
    channel: bool,
}

fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn model(stream: &[u8], fds_at: &[(usize, usize)]) -> Expect {
    let mut e = Expect::default();
    let mut pos = 0;
    loop {
        let left = stream.len() - pos;
        if left == 0 {
            return e;
        }
        if left < HEADER_SIZE {
            e.end = Some(ErrorKind::UnexpectedEof);
            return e;
        }
        let size = word(stream, pos + 8) as usize;
        if size > MAX_MSG_SIZE {
            e.end = Some(ErrorKind::InvalidData);
            return e;
        }
        if left - HEADER_SIZE < size {
            e.end = Some(ErrorKind::UnexpectedEof);
            return e;
        }
        let end = pos + HEADER_SIZE + size;
        let fds: usize = fds_at
            .iter()
            .filter(|(at, _)| (pos..end).contains(at))
            .map(|(_, n)| n)
            .sum();
        if fds > MAX_ATTACHED_FD_ENTRIES {
            e.end = Some(ErrorKind::InvalidData);
            return e;
        }
        let request = word(stream, pos);
        let body = &stream[pos + HEADER_SIZE..end];
        e.messages += 1;
        if request == SET_PROTOCOL_FEATURES {
            if let Ok(b) = <[u8; 8]>::try_from(body) {
                e.features = known_protocol_features(u64::from_ne_bytes(b));
            }
        } else if request == RESET_OWNER {
            e.features = 0;
        } else if request == SET_BACKEND_REQ_FD {
            e.channel = fds == 1;
        }
        e.forwarded = end;
        e.forwarded_fds += fds;
        pos = end;
    }
}

fuzz_target!(|data: &[u8]| {
    let segments = decode(data);
    let mut stream = Vec::new();
    let mut fds_at = Vec::new();
    for s in &segments {
        if s.fds > 0 && !s.bytes.is_empty() {
            fds_at.push((stream.len(), s.fds));
        }
        stream.extend_from_slice(&s.bytes);
    }
    if stream.len() > RELAY_STREAM_MAX {
        return;
    }
    let fds_before = open_fds().expect("/proc/self/fd");
    let parts: Vec<(&[u8], usize)> = segments
        .iter()
        .map(|s| (s.bytes.as_slice(), s.fds))
        .collect();
    let seen = relay_stream(&parts).expect("relay");
    let want = model(&stream, &fds_at);

    match (&seen.result, want.end) {
        (Ok(()), None) => {}
        (Err(e), Some(kind)) if e.kind() == kind => {}
        (got, end) => {
            panic!("the relay ended with {got:?}, expected {end:?}: saw {seen:?}, model {want:?}")
        }
    }
    assert_eq!(seen.forwarded, stream[..want.forwarded], "forwarded bytes");
    assert_eq!(seen.forwarded_fds, want.forwarded_fds, "forwarded fds");
    assert_eq!(seen.messages, want.messages, "messages counted");
    assert_eq!(
        seen.acked_protocol_features, want.features,
        "acked features"
    );
    assert_eq!(seen.channel_socket, want.channel, "channel socket kept");
    drop(seen);
    assert_eq!(open_fds().expect("/proc/self/fd"), fds_before, "fds leaked");
});
