// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The daemon's binary: parse the command line, set up logging, run the
//! daemon (or the `ctl` client).

use std::process::ExitCode;

use clap::Parser;
use vhost_device_dmabuf::args::{Cli, Command};
use vhost_device_dmabuf::control::run_ctl;
use vhost_device_dmabuf::daemon::{self, Config};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Ctl(ctl)) = cli.command {
        return run_ctl(ctl);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = match Config::try_from(cli.args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: {e}", env!("CARGO_BIN_NAME"));
            return ExitCode::from(2);
        }
    };
    match daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
