//! Progress bars with rate and ETA (indicatif), hidden when quiet; the library creates them so that long
//! work (features, epochs, fine-tuning steps) shows progress, and they draw on stderr only on a terminal.

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar with rate and ETA (hidden when `quiet` or not a terminal).
pub fn progress(len: u64, label: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(label.to_string());
    pb
}
