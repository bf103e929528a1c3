//! Shows the engine's [`Progress`] to the operator: on a terminal a bar per
//! phase (indicatif: steps done, rate, time left); otherwise (a journal, a
//! pipe, CI) an INFO line when a phase starts, every
//! [`LINE_EVERY`] while it runs, and when it ends.
//!
//! It never blocks the work it shows: a step costs a lock and a counter.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use branchsync_engine::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// How often a phase reports without a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(5);

struct Phase {
    name: String,
    total: u64,
    done: u64,
    started: Instant,
    last_line: Instant,
    bar: Option<ProgressBar>,
}

/// Progress shown on stderr's terminal, or logged.
pub struct Shown {
    /// The command, for the log lines (`init`).
    command: &'static str,
    terminal: bool,
    phase: Mutex<Option<Phase>>,
}

impl Shown {
    /// Progress of `command`, drawn as bars when stderr is a terminal.
    pub fn new(command: &'static str) -> Shown {
        Shown { command, terminal: std::io::stderr().is_terminal(), phase: Mutex::new(None) }
    }

    fn end(&self, p: Phase) {
        let secs = p.started.elapsed().as_secs_f64();
        match p.bar {
            Some(bar) => bar.finish(),
            None => tracing::info!(command = self.command, phase = %p.name, done = p.done, total = p.total, secs = format!("{secs:.1}"), "{}: {} of {} done in {secs:.1} s", p.name, p.done, p.total),
        }
    }
}

impl Progress for Shown {
    fn phase(&self, name: &str, total: u64) {
        let mut g = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = g.take() {
            self.end(p);
        }
        let bar = self.terminal.then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template("{msg:>20} [{bar:30}] {pos}/{len} ({per_sec}, {eta} left)") {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(name.to_string());
            bar
        });
        if bar.is_none() {
            tracing::info!(command = self.command, phase = %name, total, "{name}: 0 of {total}");
        }
        let now = Instant::now();
        *g = Some(Phase { name: name.to_string(), total, done: 0, started: now, last_line: now, bar });
    }

    fn advance(&self, n: u64) {
        let mut g = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = g.as_mut() else { return };
        p.done += n;
        if let Some(bar) = &p.bar {
            bar.inc(n);
        } else if p.last_line.elapsed() >= LINE_EVERY {
            p.last_line = Instant::now();
            let secs = p.started.elapsed().as_secs_f64().max(0.001);
            let rate = p.done as f64 / secs;
            let left = if rate > 0.0 { p.total.saturating_sub(p.done) as f64 / rate } else { 0.0 };
            tracing::info!(command = self.command, phase = %p.name, done = p.done, total = p.total, "{}: {} of {} ({rate:.0}/s, about {left:.0} s left)", p.name, p.done, p.total);
        }
    }

    fn finish(&self) {
        let mut g = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = g.take() {
            self.end(p);
        }
    }
}
