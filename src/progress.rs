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
