// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A small scenario runner for end-to-end suites: each scenario passes,
//! fails with a reason, or is skipped with a reason (a mode the target
//! cannot run is never reported as passed). A panic inside a scenario is a
//! failure of that scenario, not of the run. [`Suite::finish`] prints one
//! line per scenario and the summary line `N passed, M failed, K skipped`.

pub mod scenarios;

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// Why a scenario stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The contract was not met.
    Fail(String),
    /// The scenario cannot run here (a capability is not live, a feature
    /// was not negotiated); says why.
    Skip(String),
}

impl<E: std::error::Error> From<E> for Stop {
    fn from(e: E) -> Self {
        let mut msg = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        Stop::Fail(msg)
    }
}

/// What one scenario returns.
pub type Check = Result<(), Stop>;

/// Fails the scenario unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr) => {
        if !$cond {
            return Err($crate::suite::Stop::Fail(format!(
                "{}:{}: {}", file!(), line!(), stringify!($cond)
            )));
        }
    };
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::suite::Stop::Fail(format!(
                "{}:{}: {}", file!(), line!(), format!($($fmt)+)
            )));
        }
    };
}

/// Fails the scenario unless both sides are equal; shows both.
#[macro_export]
macro_rules! ensure_eq {
    ($left:expr, $right:expr $(,)?) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err($crate::suite::Stop::Fail(format!(
                "{}:{}: {} = {:?}, expected {:?}", file!(), line!(), stringify!($left), l, r
            )));
        }
    }};
    ($left:expr, $right:expr, $($fmt:tt)+) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err($crate::suite::Stop::Fail(format!(
                "{}:{}: {} = {:?}, expected {:?} ({})", file!(), line!(), stringify!($left), l, r,
                format!($($fmt)+)
            )));
        }
    }};
}

/// Skips the scenario with a reason.
#[macro_export]
macro_rules! skip {
    ($($fmt:tt)+) => {
        return Err($crate::suite::Stop::Skip(format!($($fmt)+)))
    };
}

/// How one scenario ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
    Skip(String),
}

/// One scenario's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub verdict: Verdict,
    pub elapsed: Duration,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.elapsed.as_millis();
        match &self.verdict {
            Verdict::Pass => write!(f, "PASS {} ({ms} ms)", self.name),
            Verdict::Fail(why) => write!(f, "FAIL {} ({ms} ms): {why}", self.name),
            Verdict::Skip(why) => write!(f, "SKIP {}: {why}", self.name),
        }
    }
}

/// Counts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// The suite binary's command line, read the way libtest reads a test
/// binary's, so `cargo test -- ARGS` means the same here: bare words are
/// name filters (substrings), `--skip NAME` leaves scenarios out, `--exact`
/// matches whole names, `--list` names the scenarios without running them.
/// Every other flag is accepted and ignored, and the value of a flag that
/// takes one (`--test-threads 2`, `--color never`, ...) is never taken for
/// a filter. `--ignored` runs nothing: no scenario is ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunArgs {
    pub filters: Vec<String>,
    pub skip: Vec<String>,
    pub exact: bool,
    pub list: bool,
    pub ignored_only: bool,
}

/// libtest options that take a value as the next argument.
const FLAGS_WITH_VALUE: &[&str] = &[
    "--test-threads",
    "--skip",
    "--color",
    "--format",
    "--logfile",
    "--shuffle-seed",
    "-Z",
];

impl RunArgs {
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Self {
        let mut out = RunArgs::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if !arg.starts_with('-') {
                out.filters.push(arg);
                continue;
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let value = if FLAGS_WITH_VALUE.contains(&flag.as_str()) {
                inline.or_else(|| args.next())
            } else {
                None
            };
            match flag.as_str() {
                "--skip" => out.skip.extend(value),
                "--exact" => out.exact = true,
                "--list" => out.list = true,
                "--ignored" => out.ignored_only = true,
                _ => {}
            }
        }
        out
    }

    /// Whether the scenario called `name` runs.
    pub fn selects(&self, name: &str) -> bool {
        if self.ignored_only {
            return false;
        }
        let hit = |f: &String| {
            if self.exact {
                name == f
            } else {
                name.contains(f.as_str())
            }
        };
        (self.filters.is_empty() || self.filters.iter().any(hit)) && !self.skip.iter().any(hit)
    }
}

/// Runs scenarios and keeps their results.
#[derive(Debug, Default)]
pub struct Suite {
    records: Vec<Record>,
    /// Which scenarios run.
    args: RunArgs,
    /// Print each record as it completes.
    verbose: bool,
}

impl Suite {
    pub fn new() -> Self {
        Suite::default()
    }

    /// The command line after `cargo test --`, as [`RunArgs::parse`] reads it.
    pub fn with_filters<I: IntoIterator<Item = String>>(self, args: I) -> Self {
        self.with_args(RunArgs::parse(args))
    }

    pub fn with_args(mut self, args: RunArgs) -> Self {
        self.args = args;
        self
    }

    /// Whether `run(name, ..)` would run the scenario.
    pub fn selects(&self, name: &str) -> bool {
        self.args.selects(name)
    }

    pub fn verbose(mut self, on: bool) -> Self {
        self.verbose = on;
        self
    }

    /// Runs one scenario (unless filtered out).
    pub fn run(&mut self, name: &str, scenario: impl FnOnce() -> Check) {
        if !self.selects(name) {
            return;
        }
        let start = Instant::now();
        let verdict = match catch_unwind(AssertUnwindSafe(scenario)) {
            Ok(Ok(())) => Verdict::Pass,
            Ok(Err(Stop::Fail(why))) => Verdict::Fail(why),
            Ok(Err(Stop::Skip(why))) => Verdict::Skip(why),
            Err(panic) => Verdict::Fail(format!("panicked: {}", panic_message(&*panic))),
        };
        let record = Record {
            name: name.to_string(),
            verdict,
            elapsed: start.elapsed(),
        };
        if self.verbose {
            println!("{record}");
        }
        self.records.push(record);
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for r in &self.records {
            match r.verdict {
                Verdict::Pass => s.passed += 1,
                Verdict::Fail(_) => s.failed += 1,
                Verdict::Skip(_) => s.skipped += 1,
            }
        }
        s
    }

    /// Prints the records (unless already printed) and the summary line;
    /// returns the summary.
    pub fn finish(&self) -> Summary {
        if !self.verbose {
            for r in &self.records {
                println!("{r}");
            }
        }
        let s = self.summary();
        println!("{s}");
        s
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_dmabuf_protocol::Status;

    #[test]
    fn verdicts_and_summary() {
        let mut s = Suite::new();
        s.run("passes", || Ok(()));
        s.run("fails", || {
            ensure_eq!(1 + 1, 3, "arithmetic");
            Ok(())
        });
        s.run("skips", || skip!("no shared memory"));
        s.run("status error fails", || {
            let r: Result<(), Status> = Err(Status::Busy);
            r?;
            Ok(())
        });
        s.run("panics", || panic!("boom"));
        assert_eq!(
            s.summary(),
            Summary {
                passed: 1,
                failed: 3,
                skipped: 1
            }
        );
        assert_eq!(s.summary().to_string(), "1 passed, 3 failed, 1 skipped");
        assert!(matches!(&s.records()[3].verdict, Verdict::Fail(w) if w == "EBUSY"));
        assert!(matches!(&s.records()[4].verdict, Verdict::Fail(w) if w.contains("boom")));
        let mut f = Suite::new().with_filters(["skip".to_string(), "--nocapture".to_string()]);
        f.run("passes", || Ok(()));
        f.run("skips", || skip!("x"));
        assert_eq!(f.records().len(), 1);
    }

    fn args(line: &str) -> RunArgs {
        RunArgs::parse(line.split_whitespace().map(str::to_string))
    }

    #[test]
    fn values_of_libtest_flags_are_not_filters() {
        let a = args("--test-threads 2 --nocapture --color never -q --format=terse");
        assert!(a.filters.is_empty(), "{a:?}");
        assert!(a.selects("full/anything"));
        let a = args("--test-threads=2 lock -Z unstable-options --show-output");
        assert_eq!(a.filters, vec!["lock".to_string()]);
        assert!(a.selects("full/lock_contention"));
        assert!(!a.selects("full/framing"));
    }

    #[test]
    fn skip_exact_list_and_ignored() {
        let a = args("lock --skip wait_die --skip=split/");
        assert!(a.selects("full/lock_contention"));
        assert!(!a.selects("full/lock_wait_die_three"));
        assert!(!a.selects("split/lock_contention"));
        let a = args("--exact full/lock");
        assert!(a.selects("full/lock"));
        assert!(!a.selects("full/lock_contention"));
        let a = args("--list");
        assert!(a.list && a.selects("x"));
        assert!(!args("--ignored").selects("x"));
        let mut s = Suite::new().with_filters(["--test-threads", "1"].map(String::from));
        s.run("runs", || Ok(()));
        assert_eq!(s.summary().passed, 1);
    }
}
