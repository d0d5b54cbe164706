// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The input of the `control_line` target: one byte of settings, then the
//! bytes a control client sends.
//!
//! ```text
//! u8 settings   bits 0-2: chunk size (1, 2, 4, 16, 64, 256, 1024, all),
//!               bit 3: the client hangs up instead of half-closing,
//!               bit 4: a memfd goes with each chunk holding "export",
//!               bit 5: that memfd is open read-only,
//!               bit 6: the first line is padded with spaces past MAX_LINE
//! then          the stream
//! ```

/// The decoded settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    pub chunk: usize,
    pub hang_up: bool,
    pub fds: bool,
    pub read_only_fds: bool,
    pub pad_first_line: bool,
}

const CHUNKS: [usize; 8] = [1, 2, 4, 16, 64, 256, 1024, usize::MAX];

impl Settings {
    pub fn decode(b: u8) -> Settings {
        Settings {
            chunk: CHUNKS[usize::from(b & 7)],
            hang_up: b & 8 != 0,
            fds: b & 16 != 0,
            read_only_fds: b & 32 != 0,
            pad_first_line: b & 64 != 0,
        }
    }

    pub fn encode(&self) -> u8 {
        let chunk = CHUNKS.iter().position(|c| *c == self.chunk).unwrap_or(7) as u8;
        chunk
            | (u8::from(self.hang_up) << 3)
            | (u8::from(self.fds) << 4)
            | (u8::from(self.read_only_fds) << 5)
            | (u8::from(self.pad_first_line) << 6)
    }
}

/// The input for `settings` and the stream `text`.
pub fn control_input(settings: Settings, text: &[u8]) -> Vec<u8> {
    let mut out = vec![settings.encode()];
    out.extend_from_slice(text);
    out
}
