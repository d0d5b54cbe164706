// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Writes the man pages and shell completions, made from the clap
//! definitions, under a directory (the Debian package's are made this
//! way):
//!
//! ```text
//! cargo run -p vhost-device-dmabuf --example manual -- DIR
//! ```
//!
//! `DIR/man/*.8`, `DIR/completions/bash/vhost-device-dmabuf`,
//! `DIR/completions/zsh/_vhost-device-dmabuf`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: manual DIR");
        return ExitCode::from(2);
    };
    match vhost_device_dmabuf::manual::write_to(&dir) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("manual: writing under {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
