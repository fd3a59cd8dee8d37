//! Plain progress lines for long runs: `[name 12.3 s] message`, at most one every two
//! seconds (the first always), on stderr, so that logs show progress where no terminal
//! draws a bar.

use std::time::{Duration, Instant};

/// A throttled progress log.
pub struct Log {
    name: String,
    start: Instant,
    last: Option<Instant>,
    every: Duration,
}

impl Log {
    pub fn new(name: &str) -> Log {
        Log {
            name: name.to_string(),
            start: Instant::now(),
            last: None,
            every: Duration::from_secs(2),
        }
    }

    /// Prints `message` unless a line was printed less than two seconds ago.
    pub fn line(&mut self, message: &str) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < self.every) {
            return;
        }
        self.last = Some(now);
        eprintln!(
            "[{} {:.1} s] {message}",
            self.name,
            (now - self.start).as_secs_f64()
        );
    }
}
