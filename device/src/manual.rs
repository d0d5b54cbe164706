// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The manual, made from the clap definitions (`args.rs`, and `ctl`'s in
//! `control/client.rs`) so it always says what `--help` says:
//!
//! - [`PROGRAM`]`(8)`, the daemon, with the sections clap knows nothing of
//!   (environment, signals, exit status, files, systemd);
//! - [`PROGRAM`]`-ctl(8)` and one page per `ctl` command
//!   ([`PROGRAM`]`-ctl-list(8)`, ...);
//! - bash and zsh completions.
//!
//! The `manual` example of this package (`cargo run --example manual --
//! DIR`) writes them;
//! the Debian package is built that way (`packaging/ci-package.sh`).

use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::roff::{bold, italic, roman, Roff};
use clap_mangen::Man;

use crate::args::Cli;

/// The program's name (the package's), for `concat!`.
macro_rules! program {
    () => {
        env!("CARGO_PKG_NAME")
    };
}

/// The manual section: system administration tools and daemons.
pub const SECTION: &str = "8";

/// The program, as the pages and completions name it.
pub const PROGRAM: &str = program!();

/// One man page: its file name ([`PROGRAM`]`-ctl.8`) and roff text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub file_name: String,
    pub roff: String,
}

/// The command line as clap sees it, built (subcommands named
/// [`PROGRAM`]`-ctl`, ...), without the `help` subcommands.
fn command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// Every page: the daemon's first, then `ctl` and each of its commands.
pub fn pages() -> Vec<Page> {
    let mut pages = Vec::new();
    collect(command(), &mut pages);
    pages
}

fn collect(cmd: clap::Command, pages: &mut Vec<Page>) {
    let subs: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    pages.push(render(cmd));
    for sub in subs {
        collect(sub, pages);
    }
}

fn render(cmd: clap::Command) -> Page {
    let name = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_owned();
    let extra = if name == PROGRAM {
        daemon_sections()
    } else {
        ctl_sections(&name)
    };
    let man = Man::new(cmd)
        .title(name.to_uppercase())
        .section(SECTION)
        .manual("System Administration");
    let file_name = man.get_filename();
    let mut bytes = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = man.render(&mut bytes);
    let mut roff = String::from_utf8_lossy(&bytes).into_owned();
    // The sections clap knows nothing of go before VERSION (or at the end).
    let extra = extra.to_roff();
    match roff.find("\n.SH VERSION") {
        Some(at) => roff.insert_str(at + 1, &extra),
        None => roff.push_str(&extra),
    }
    Page { file_name, roff }
}

/// `.TP` entries under a `.SH` heading.
fn section(roff: &mut Roff, heading: &str, entries: &[(&str, &str)]) {
    roff.control("SH", [heading]);
    for (term, text) in entries {
        roff.control("TP", []);
        roff.text([bold(*term)]);
        roff.text([roman(*text)]);
    }
}

fn daemon_sections() -> Roff {
    let mut r = Roff::new();
    section(
        &mut r,
        "ENVIRONMENT",
        &[
            (
                "RUST_LOG",
                "The log level: error, warn, info (the default), debug or trace, or an \
                 env_logger filter. At debug, every message from the front-end and every guest request \
                 with its status is logged, and each connection ends with a summary.",
            ),
            (
                "LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES",
                concat!("systemd socket activation. When LISTEN_PID is the daemon, each socket handed \
                 over must be bound to one of the --socket-path paths; that guest is served on \
                 it instead of a socket the daemon binds. See ", program!(), "@.socket."),
            ),
            (
                "NOTIFY_SOCKET",
                "Readiness for Type=notify: READY=1 once every guest socket listens, \
                 STOPPING=1 when a signal stops the daemon.",
            ),
            (
                "TMPDIR",
                "Where each connection's private relay endpoint is made (a directory of mode \
                 0700, removed at once); the directory of the guest socket is used when this \
                 one cannot be written.",
            ),
        ],
    );
    section(
        &mut r,
        "SIGNALS",
        &[(
            "SIGINT, SIGTERM",
            "Hang up every front-end (releasing what its guest held), remove the sockets the \
             daemon bound, and exit with status 0.",
        )],
    );
    section(
        &mut r,
        "EXIT STATUS",
        &[
            ("0", "Stopped by SIGINT or SIGTERM."),
            (
                "1",
                "Could not start (a provider, an --export, a socket) or failed while running; \
                 the log says what to change.",
            ),
            (
                "2",
                "The arguments are wrong; the message names the option.",
            ),
        ],
    );
    section(
        &mut r,
        "FILES",
        &[
            (
                concat!("/usr/lib/systemd/system/", program!(), "@.service"),
                concat!(
                    "One daemon per VM: the instance name chooses the socket, \
                 /run/",
                    program!(),
                    "/INSTANCE.sock, and the control socket, \
                 /run/",
                    program!(),
                    "/INSTANCE.ctl."
                ),
            ),
            (
                concat!("/usr/lib/systemd/system/", program!(), "@.socket"),
                "The same socket, created by systemd (socket activation).",
            ),
            (
                concat!("/etc/default/", program!()),
                concat!(
                    "DAEMON_ARGS for every instance; \
                 /etc/default/",
                    program!(),
                    "-INSTANCE overrides it for one."
                ),
            ),
            (
                "/dev/udmabuf, /dev/dma_heap/system",
                "Host memory for --provider udmabuf and dma-heap; /dev/udmabuf also turns \
                 sealed guest RAM into real dma-bufs.",
            ),
        ],
    );
    r.control("SH", ["EXAMPLES"]);
    r.text([roman("One guest on the default memfd provider:")]);
    example(
        &mut r,
        concat!(program!(), " --socket-path /tmp/dmabuf.sock"),
    );
    r.text([roman(
        "Two guests, with a host camera buffer only guest 1 may open, and the control socket:",
    )]);
    example(
        &mut r,
        concat!(
            program!(),
            " --socket-path /run/dmabuf.sock --socket-count 2 \
         --control-socket /run/dmabuf.ctl --export cam0=/dev/shm/frame,read-only,guests=1"
        ),
    );
    r.text([roman("Under systemd, one instance per VM:")]);
    example(
        &mut r,
        concat!("systemctl start ", program!(), "@vm1.service"),
    );
    see_also(
        &mut r,
        &[
            concat!(program!(), "-ctl(8)"),
            "systemd.socket(5)",
            "systemd.exec(5)",
            "sd_notify(3)",
            "sd_listen_fds(3)",
            "qemu-system-x86_64(1)",
        ],
    );
    r
}

fn ctl_sections(name: &str) -> Roff {
    let mut r = Roff::new();
    section(
        &mut r,
        "EXIT STATUS",
        &[
            ("0", "The daemon did what was asked."),
            (
                "1",
                "The daemon refused (its reason is printed as ctl: ...), is not there, or a \
                 path could not be opened.",
            ),
            ("2", "The arguments are wrong."),
        ],
    );
    let mut also = vec![concat!(program!(), "(8)")];
    if name != concat!(program!(), "-ctl") {
        also.push(concat!(program!(), "-ctl(8)"));
    }
    see_also(&mut r, &also);
    r
}

fn example(r: &mut Roff, line: &str) {
    r.control("PP", []);
    r.control("RS", ["4"]);
    r.text([italic(line)]);
    r.control("RE", []);
}

fn see_also(r: &mut Roff, pages: &[&str]) {
    r.control("SH", ["SEE ALSO"]);
    r.text([roman(pages.join(", "))]);
}

/// The completion script for `shell`.
pub fn completion(shell: Shell) -> Vec<u8> {
    let mut cmd = command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, PROGRAM, &mut out);
    out
}

/// Writes `DIR/man/*.8` and the completions `DIR/completions/bash/PROGRAM`
/// and `DIR/completions/zsh/_PROGRAM` (the names bash-completion and zsh
/// look for, [`PROGRAM`] being the program's name); returns the files.
pub fn write_to(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    for page in pages() {
        let path = man.join(&page.file_name);
        std::fs::write(&path, page.roff)?;
        written.push(path);
    }
    for (shell, sub, file) in [
        (Shell::Bash, "bash", PROGRAM.to_owned()),
        (Shell::Zsh, "zsh", format!("_{PROGRAM}")),
    ] {
        let d = dir.join("completions").join(sub);
        std::fs::create_dir_all(&d)?;
        let path = d.join(file);
        std::fs::write(&path, completion(shell))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page text with roff's escaped hyphens made plain.
    fn plain(page: &Page) -> String {
        page.roff.replace("\\-", "-").replace("\\*(Aq", "'")
    }

    /// Every command of the command line and its page.
    fn commands_and_pages() -> Vec<(clap::Command, Page)> {
        fn walk(cmd: &clap::Command, out: &mut Vec<clap::Command>) {
            out.push(cmd.clone());
            for sub in cmd.get_subcommands() {
                walk(sub, out);
            }
        }
        let mut cmds = Vec::new();
        walk(&command(), &mut cmds);
        let pages = pages();
        assert_eq!(cmds.len(), pages.len(), "one page per command");
        cmds.into_iter().zip(pages).collect()
    }

    #[test]
    fn there_is_a_page_for_the_daemon_ctl_and_each_ctl_command() {
        let names: Vec<String> = pages().into_iter().map(|p| p.file_name).collect();
        for expected in [
            concat!(program!(), ".8"),
            concat!(program!(), "-ctl.8"),
            concat!(program!(), "-ctl-list.8"),
            concat!(program!(), "-ctl-stats.8"),
            concat!(program!(), "-ctl-export.8"),
            concat!(program!(), "-ctl-revoke.8"),
            concat!(program!(), "-ctl-evict.8"),
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
    }

    /// The rule the pages exist for: every option and argument `--help`
    /// shows is in its command's page, with its help text.
    #[test]
    fn every_option_appears_in_its_page() {
        for (cmd, page) in commands_and_pages() {
            let text = plain(&page);
            assert!(
                text.starts_with(".ie") || text.contains(".TH"),
                "{}: a roff page",
                page.file_name
            );
            for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                let shown = match (arg.get_long(), arg.get_value_names()) {
                    (Some(long), _) => format!("--{long}"),
                    (None, Some(names)) => names[0].to_string(),
                    (None, None) => arg.get_id().to_string().to_uppercase(),
                };
                assert!(
                    text.contains(&shown),
                    "{}: {shown} is missing",
                    page.file_name
                );
                if let Some(help) = arg.get_help() {
                    let first: String = help
                        .to_string()
                        .split_whitespace()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" ");
                    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
                    assert!(
                        flat.contains(&first),
                        "{}: the help of {shown} ({first:?}) is missing",
                        page.file_name
                    );
                }
            }
            for sub in cmd.get_subcommands() {
                assert!(
                    text.contains(sub.get_name()),
                    "{}: subcommand {} is missing",
                    page.file_name,
                    sub.get_name()
                );
            }
        }
    }

    #[test]
    fn the_daemon_page_has_what_clap_does_not_know() {
        let page = &pages()[0];
        assert_eq!(page.file_name, concat!(program!(), ".8"));
        let text = plain(page);
        for heading in [
            ".SH NAME",
            ".SH SYNOPSIS",
            ".SH OPTIONS",
            ".SH ENVIRONMENT",
            ".SH SIGNALS",
            ".SH \"EXIT STATUS\"",
            ".SH FILES",
            ".SH EXAMPLES",
            ".SH \"SEE ALSO\"",
        ] {
            assert!(text.contains(heading), "{heading}");
        }
        for word in [
            "LISTEN_FDS",
            "NOTIFY_SOCKET",
            "RUST_LOG",
            concat!(program!(), "@.service"),
        ] {
            assert!(text.contains(word), "{word}");
        }
        let version = text.find(".SH VERSION").expect("VERSION");
        assert!(text.find(".SH ENVIRONMENT").expect("ENVIRONMENT") < version);
    }

    #[test]
    fn completions_know_the_options_and_ctl() {
        let bash = String::from_utf8(completion(Shell::Bash)).expect("utf-8");
        for word in ["--socket-path", "--socket-fd", "--export", "ctl", "evict"] {
            assert!(bash.contains(word), "bash: {word}");
        }
        let zsh = String::from_utf8(completion(Shell::Zsh)).expect("utf-8");
        assert!(zsh.starts_with(concat!("#compdef ", program!())));
        assert!(zsh.contains("--control-socket"));
    }

    #[test]
    fn write_to_lays_out_man_and_completions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = write_to(dir.path()).expect("written");
        assert!(dir.path().join(concat!("man/", program!(), ".8")).is_file());
        assert!(dir
            .path()
            .join(concat!("completions/bash/", program!()))
            .is_file());
        assert!(dir
            .path()
            .join(concat!("completions/zsh/_", program!()))
            .is_file());
        assert_eq!(files.len(), pages().len() + 2);
    }
}
