//! The one place that decides what goes where: results on stdout, progress
//! bars, warnings and errors on stderr.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tensormerge::engine::{EngineError, Progress};
use tensormerge::methods::MethodError;

use crate::cli::{ColorChoice, GlobalArgs};

/// Output settings from the global flags.
#[derive(Debug)]
pub struct Printer {
    quiet: bool,
    verbose: u8,
    color: bool,
    bars: bool,
    bar: Mutex<Option<ProgressBar>>,
    tensors: AtomicU64,
    total_tensors: AtomicU64,
}

impl Printer {
    pub fn new(g: &GlobalArgs) -> Self {
        let tty = std::io::stderr().is_terminal();
        let color = match g.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        };
        Printer {
            quiet: g.quiet,
            verbose: g.verbose,
            color,
            bars: !g.quiet && !g.no_progress && tty,
            bar: Mutex::new(None),
            tensors: AtomicU64::new(0),
            total_tensors: AtomicU64::new(0),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// Runs `f` with any progress bar hidden, so that lines are not torn.
    pub(crate) fn suspend(&self, f: impl FnOnce()) {
        let bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match bar.as_ref() {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }

    /// `warning: ...` on stderr, unless quiet.
    pub fn warn(&self, text: &str) {
        if !self.quiet {
            let w = self.paint("1;33", "warning:");
            self.suspend(|| eprintln!("{w} {text}"));
        }
    }

    /// A detail on stderr, only with `-v`.
    pub fn info(&self, text: &str) {
        if self.verbose > 0 {
            self.suspend(|| eprintln!("{text}"));
        }
    }

    /// Renders an error: `error:`, each cause on its own `Caused by:` line,
    /// then a `hint:` where one helps.
    pub fn error(&self, e: &anyhow::Error) {
        eprint!("{}", self.render_error(e));
    }

    pub fn render_error(&self, e: &anyhow::Error) -> String {
        let mut out = String::new();
        let mut chain = e.chain();
        let top = chain.next().map(|c| c.to_string()).unwrap_or_default();
        out.push_str(&format!("{} {top}\n", self.paint("1;31", "error:")));
        let mut last = top;
        for cause in chain {
            let text = cause.to_string();
            // thiserror messages often embed their source already.
            if last.contains(&text) {
                continue;
            }
            let label = self.paint("1", "Caused by:");
            for (i, line) in text.lines().enumerate() {
                if i == 0 {
                    out.push_str(&format!("  {label} {line}\n"));
                } else {
                    out.push_str(&format!("  {line}\n"));
                }
            }
            last = text;
        }
        if let Some(h) = hint(e) {
            out.push_str(&format!("{} {h}\n", self.paint("1;36", "hint:")));
        }
        out
    }
}

/// A hint for the first error in the chain that has one.
fn hint(e: &anyhow::Error) -> Option<String> {
    for c in e.chain() {
        if let Some(ee) = c.downcast_ref::<EngineError>()
            && let Some(h) = ee.hint()
        {
            return Some(h);
        }
        if let Some(MethodError::UnknownMethod { .. }) = c.downcast_ref::<MethodError>() {
            return Some("`tensormerge methods list` shows the available methods".into());
        }
    }
    None
}

/// Exit code: 1 for bad input, 2 for usage and I/O errors.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for c in e.chain() {
        if let Some(ee) = c.downcast_ref::<EngineError>() {
            if matches!(ee, EngineError::Cancelled) {
                return 130;
            }
            return if ee.is_bad_input() { 1 } else { 2 };
        }
        if c.downcast_ref::<MethodError>().is_some() {
            return 1;
        }
        if let Some(u) = c.downcast_ref::<Usage>() {
            return u.code();
        }
        if let Some(n) = c.downcast_ref::<tensormerge::nn::NnError>() {
            return if n.is_bad_input() { 1 } else { 2 };
        }
    }
    2
}

/// A usage error raised by the command line itself (exit code 2).
#[derive(Debug)]
pub enum Usage {
    /// A bad argument.
    Arg(String),
}

impl Usage {
    fn code(&self) -> u8 {
        2
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Usage::Arg(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for Usage {}

impl Progress for Printer {
    fn start(&self, phase: &str, total_bytes: u64, total_tensors: u64) {
        self.tensors.store(0, Ordering::Relaxed);
        self.total_tensors.store(total_tensors, Ordering::Relaxed);
        if !self.bars {
            self.info(&format!(
                "{phase}: {total_bytes} bytes, {total_tensors} tensors"
            ));
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix:>10.bold} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(phase.to_string());
        if total_tensors > 0 {
            bar.set_message(format!("0/{total_tensors} tensors"));
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar);
    }

    fn advance(&self, bytes: u64, tensors: u64) {
        let n = self.tensors.fetch_add(tensors, Ordering::Relaxed) + tensors;
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            b.inc(bytes);
            if tensors > 0 {
                b.set_message(format!(
                    "{n}/{} tensors",
                    self.total_tensors.load(Ordering::Relaxed)
                ));
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
    }

    fn message(&self, text: &str) {
        self.info(text);
    }

    fn warning(&self, text: &str) {
        self.warn(text);
    }
}

impl tensormerge_demo::DemoProgress for Printer {
    fn phase(&self, name: &str, total: u64) {
        self.finish();
        if !self.bars {
            self.info(&format!("{name}: {total} steps"));
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style =
            ProgressStyle::with_template("{prefix:>10.bold} [{bar:30}] {pos}/{len} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(name.to_string());
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar);
    }

    fn advance(&self, steps: u64) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            b.inc(steps);
        }
    }

    fn message(&self, text: &str) {
        self.info(text);
    }
}
