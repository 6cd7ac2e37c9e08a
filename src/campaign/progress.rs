//! The live progress bar of a send (indicatif, on standard error): recipients final out of the
//! total, with delivered, deferred and bounced counts, the rate and the time left.
//!
//! It is drawn only when asked for and when standard error is a terminal (indicatif hides it
//! otherwise), at most a few times a second. It must not print anything else: warnings and
//! the summary are the caller's.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// Counts shown on the bar.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counts {
    pub delivered: u64,
    /// Recipients waiting for a retry now.
    pub deferred: u64,
    pub bounced: u64,
    pub expired: u64,
    pub failed: u64,
}

pub(crate) struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new(total: u64, visible: bool) -> Progress {
        let target = if visible {
            ProgressDrawTarget::stderr_with_hz(4)
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} {msg} {rate} ETA {eta}",
            )
            .expect("a valid template")
            .with_key(
                "rate",
                |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0}/s", state.per_sec());
                },
            )
            .progress_chars("=> "),
        );
        Progress { bar }
    }

    pub fn update(&self, counts: &Counts) {
        let done = counts.delivered + counts.bounced + counts.expired + counts.failed;
        self.bar.set_position(done);
        self.bar.set_message(format!(
            "sent {} deferred {} bounced {}",
            counts.delivered,
            counts.deferred,
            counts.bounced + counts.expired + counts.failed
        ));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
