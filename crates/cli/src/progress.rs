//! Progress bars and spinners, shown only when stderr is a terminal and output is not JSON.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

fn visible(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

/// A byte-counting bar for a transfer of `total` bytes (unknown: a spinner with a counter).
pub fn transfer(json: bool, total: Option<u64>, what: &str) -> ProgressBar {
    if !visible(json) {
        return ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden());
    }
    let bar = match total {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
                .expect("valid template"),
        ),
    };
    bar.set_message(what.to_owned());
    bar
}

/// A spinner that shows a job's live state.
pub fn spinner(json: bool, message: &str) -> ProgressBar {
    if !visible(json) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template"),
    );
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}
