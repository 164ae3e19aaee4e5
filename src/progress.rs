//! Progress bars for long commands: drawn only on a terminal, so logs and CI
//! output get plain lines instead of control characters.
use std::io::IsTerminal;

/// A bar of `total` units with `template` (indicatif's syntax), or `None` when
/// stderr is not a terminal (the caller then logs progress lines).
pub fn terminal_bar(total: u64, template: &str) -> Option<indicatif::ProgressBar> {
    (std::io::stderr().is_terminal() && total > 0).then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(template)
                .expect("valid progress template")
                .progress_chars("=> "),
        );
        bar
    })
}

/// Progress of a job over `total` items: a bar with ETA on a terminal, plain
/// log lines (with the ETA) otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    job: &'static str,
    unit: &'static str,
    total: usize,
    finished: usize,
    started: std::time::Instant,
}

impl Progress {
    pub fn new(job: &'static str, unit: &'static str, total: usize) -> Self {
        let template = format!("{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit}, ETA {{eta}} {{msg}}");
        Progress { bar: terminal_bar(total as u64, &template), job, unit, total, finished: 0, started: std::time::Instant::now() }
    }

    /// One more item done; `message` says what became of it.
    pub fn step(&mut self, message: String) {
        self.finished += 1;
        match &self.bar {
            Some(bar) => {
                bar.set_message(format!("last: {message}"));
                bar.inc(1);
            }
            None => {
                let elapsed = self.started.elapsed().as_secs_f64();
                let eta = elapsed / self.finished as f64 * self.total.saturating_sub(self.finished) as f64;
                tracing::info!("{}: {}/{} {}; {message}; ETA {eta:.0} s", self.job, self.finished, self.total, self.unit);
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
