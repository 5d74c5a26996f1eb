//! Progress of long commands (`render`, `diff`, `snapshot`, `synth` on big fleets) on stderr,
//! only when stderr is a terminal: pipes, files and tests see nothing of it. One line, rewritten
//! in place and cleared when the work is done (or the value dropped).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Progress {
    label: &'static str,
    on: bool,
    /// For `tick`: steps done so far.
    done: AtomicUsize,
}

impl Progress {
    /// Progress of `label` on stderr, if stderr is a terminal.
    pub fn stderr(label: &'static str) -> Progress {
        Progress { label, on: std::io::stderr().is_terminal(), done: AtomicUsize::new(0) }
    }

    /// Shows what is being done now.
    pub fn say(&self, what: impl std::fmt::Display) {
        if self.on {
            let mut err = std::io::stderr().lock();
            // Carriage return and erase the line: the new state replaces the old.
            let _ = write!(err, "\r\x1b[K{}: {what}", self.label);
            let _ = err.flush();
        }
    }

    /// One more of `total` steps of `what` is done (from any thread).
    pub fn tick(&self, total: usize, what: &str) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        self.say(format_args!("{done}/{total} {what}"));
    }

    /// Clears the line: the work is over.
    pub fn finish(&self) {
        if self.on {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
