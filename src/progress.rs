//! Progress bars for long commands: drawn only on a terminal, so logs and CI
//! output get plain lines instead of control characters.
//!
//! A worker of `run --devices` reports its progress as JSON lines on stdout
//! instead ([`report_as_lines`], [`Event`]); the parent reads every worker's
//! lines and draws one display for all of them ([`Aggregate`]).
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

static AS_LINES: AtomicBool = AtomicBool::new(false);

/// From now on, progress goes to stdout as [`Event`] JSON lines, for the
/// process that started this one (`run --worker`).
pub fn report_as_lines() {
    AS_LINES.store(true, Ordering::Relaxed);
}

/// One line of a worker's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "progress", rename_all = "snake_case")]
pub enum Event {
    /// A job starts on `total` units (what its runner has to do).
    Start { job: String, unit: String, total: usize },
    /// One unit done; `message` says what became of it.
    Step { message: String },
    Finish,
}

impl Event {
    fn emit(&self) {
        use std::io::Write;
        let line = serde_json::to_string(self).expect("events serialise");
        let mut out = std::io::stdout().lock();
        // A parent that is gone shows up at the next item's write (the runner
        // has nothing else to say to it); nothing to do about it here.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

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
    /// Reporting to a parent process ([`report_as_lines`]).
    lines: bool,
}

impl Progress {
    pub fn new(job: &'static str, unit: &'static str, total: usize) -> Self {
        let lines = AS_LINES.load(Ordering::Relaxed);
        if lines {
            Event::Start { job: job.into(), unit: unit.into(), total }.emit();
        }
        let template = format!("{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit}, ETA {{eta}} {{msg}}");
        let bar = if lines { None } else { terminal_bar(total as u64, &template) };
        Progress { bar, job, unit, total, finished: 0, started: std::time::Instant::now(), lines }
    }

    /// One more item done; `message` says what became of it.
    pub fn step(&mut self, message: String) {
        self.finished += 1;
        if self.lines {
            return Event::Step { message }.emit();
        }
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
        if self.lines {
            Event::Finish.emit();
        }
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// One display for the workers of `run --devices`: a bar over the sum of
/// their units on a terminal (each worker's count in its message), log lines
/// otherwise. Workers' other output goes through [`Aggregate::println`], above
/// the bar.
pub struct Aggregate {
    job: String,
    unit: String,
    workers: Vec<(String, usize, usize)>,
    bar: Option<indicatif::ProgressBar>,
    started: std::time::Instant,
}

impl Aggregate {
    /// `labels`: one per worker (its device).
    pub fn new(job: &str, labels: Vec<String>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {prefix}, ETA {eta} {msg}")
                    .expect("valid progress template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(job.to_string());
            bar
        });
        Aggregate {
            job: job.into(),
            unit: "items".into(),
            workers: labels.into_iter().map(|l| (l, 0, 0)).collect(),
            bar,
            started: std::time::Instant::now(),
        }
    }

    /// Units done and to do over every worker that has started.
    pub fn counts(&self) -> (usize, usize) {
        self.workers.iter().fold((0, 0), |(d, t), w| (d + w.2, t + w.1))
    }

    /// What worker `i` reported.
    pub fn event(&mut self, i: usize, event: Event) {
        let Some(w) = self.workers.get_mut(i) else { return };
        let message = match event {
            Event::Start { unit, total, job } => {
                w.1 += total;
                self.unit = unit;
                self.job = job;
                None
            }
            Event::Step { message } => {
                w.2 += 1;
                Some(format!("{}: {message}", w.0))
            }
            Event::Finish => None,
        };
        let (done, total) = self.counts();
        let per_worker: Vec<String> = self.workers.iter().map(|(l, t, d)| format!("{l} {d}/{t}")).collect();
        match &self.bar {
            Some(bar) => {
                bar.set_prefix(format!("{} {}", self.job, self.unit));
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message(per_worker.join(" · "));
            }
            None => {
                if let Some(m) = message {
                    let elapsed = self.started.elapsed().as_secs_f64();
                    let eta = elapsed / done.max(1) as f64 * total.saturating_sub(done) as f64;
                    tracing::info!(
                        "{}: {done}/{total} {} on {} workers ({}); {m}; ETA {eta:.0} s",
                        self.job,
                        self.unit,
                        self.workers.len(),
                        per_worker.join(", ")
                    );
                }
            }
        }
    }

    /// A line of a worker's own output, above the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_add_up_over_workers() {
        let start = Event::Start { job: "filter".into(), unit: "prompts".into(), total: 3 };
        let line = serde_json::to_string(&start).unwrap();
        assert_eq!(line, r#"{"progress":"start","job":"filter","unit":"prompts","total":3}"#);
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), start);
        assert!(serde_json::from_str::<Event>("not progress").is_err());
        let mut a = Aggregate::new("filter", vec!["cpu".into(), "cpu".into()]);
        a.event(0, start);
        a.event(1, Event::Start { job: "filter".into(), unit: "prompts".into(), total: 2 });
        a.event(1, Event::Step { message: "a: kept 1".into() });
        a.event(0, Event::Step { message: "b: kept 0".into() });
        a.event(0, Event::Step { message: "c: kept 0".into() });
        a.event(7, Event::Finish); // no such worker: ignored
        assert_eq!(a.counts(), (3, 5));
    }
}
