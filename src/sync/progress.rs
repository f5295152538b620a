//! Progress bars for a sync on a terminal: one bar per table with rows, bytes and rate.
//!
//! Drawn on stderr only when it is a terminal, so `--json` output on stdout and logs piped to
//! files stay clean.

use std::collections::HashMap;
use std::sync::Mutex;

use indicatif::{
    HumanBytes, HumanCount, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle,
};

use super::Observer;
use super::copy::CopyStats;
use crate::pg::ident::QualifiedName;

/// Progress bars when stderr is a terminal (and `wanted`), otherwise nothing.
pub fn on_stderr(wanted: bool) -> std::sync::Arc<dyn Observer> {
    if wanted && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        std::sync::Arc::new(TerminalProgress::new())
    } else {
        std::sync::Arc::new(super::Quiet)
    }
}

/// An [`super::Observer`] that draws indicatif bars.
pub struct TerminalProgress {
    multi: MultiProgress,
    bars: Mutex<HashMap<QualifiedName, ProgressBar>>,
    style: ProgressStyle,
    phase: ProgressBar,
}

impl TerminalProgress {
    /// Bars on stderr.
    pub fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix:>24.bold} [{bar:30.cyan/blue}] {human_pos:>10}/{human_len} rows {msg}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        let phase = multi.add(ProgressBar::new_spinner());
        phase.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
        phase.enable_steady_tick(std::time::Duration::from_millis(120));
        Self {
            multi,
            bars: Mutex::new(HashMap::new()),
            style,
            phase,
        }
    }
}

impl Default for TerminalProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TerminalProgress {
    fn drop(&mut self) {
        self.phase.finish_and_clear();
    }
}

impl Observer for TerminalProgress {
    fn phase(&self, what: &str) {
        self.phase.set_message(what.to_string());
    }

    fn table_started(&self, table: &QualifiedName, estimated_rows: u64) {
        let bar = self.multi.add(ProgressBar::new(estimated_rows.max(1)));
        bar.set_style(self.style.clone());
        bar.set_prefix(table.to_string());
        self.bars
            .lock()
            .expect("progress lock")
            .insert(table.clone(), bar);
    }

    fn table_progress(&self, table: &QualifiedName, stats: CopyStats) {
        if let Some(bar) = self.bars.lock().expect("progress lock").get(table) {
            if stats.rows > bar.length().unwrap_or(0) {
                bar.set_length(stats.rows);
            }
            bar.set_position(stats.rows);
            let secs = bar.elapsed().as_secs_f64().max(0.001);
            bar.set_message(format!(
                "{} at {}/s",
                HumanBytes(stats.bytes),
                HumanBytes((stats.bytes as f64 / secs) as u64)
            ));
        }
    }

    fn table_loaded(&self, table: &QualifiedName, stats: CopyStats) {
        if let Some(bar) = self.bars.lock().expect("progress lock").get(table) {
            bar.set_length(stats.rows.max(1));
            bar.set_position(stats.rows.max(1));
            bar.set_message(format!(
                "{} copied; building indexes",
                HumanBytes(stats.bytes)
            ));
        }
    }

    fn interrupted(&self) {
        // The bars are taken off the terminal and nothing is drawn after (a tick must not draw
        // over the message that follows, nor over the shell's prompt); what each table had
        // reached stays as plain lines.
        let bars = self.bars.lock().expect("progress lock");
        let mut lines: Vec<String> = bars
            .values()
            .map(|bar| {
                let state = if bar.is_finished() {
                    "built, not swapped in".to_string()
                } else {
                    format!("stopped after {} rows", HumanCount(bar.position()))
                };
                format!("{:>24} {state}", bar.prefix())
            })
            .collect();
        lines.sort();
        self.phase.finish_and_clear();
        let _ = self.multi.clear();
        self.multi.set_draw_target(ProgressDrawTarget::hidden());
        for line in lines {
            eprintln!("{line}");
        }
    }

    fn table_finished(&self, table: &QualifiedName, stats: CopyStats) {
        if let Some(bar) = self.bars.lock().expect("progress lock").get(table) {
            bar.set_length(stats.rows.max(1));
            bar.set_position(stats.rows.max(1));
            bar.finish_with_message(format!(
                "{} in {:.1}s",
                HumanBytes(stats.bytes),
                bar.elapsed().as_secs_f64()
            ));
        }
    }
}
