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

/// Progress of a counted run: a bar when stderr is a terminal, otherwise (logs, pipes,
/// CI) a plain line every few seconds with the position, elapsed time and ETA:
///
/// ```text
/// [sample 12.0 s] step 4/10 (t = 0.5000), ETA 18.0 s
/// ```
///
/// `QTAYLOR_PROGRESS=lines|bar|off` forces one form; `QTAYLOR_PROGRESS_EVERY` sets the
/// seconds between lines (default 5).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    lines: bool,
    name: String,
    unit: String,
    total: u64,
    start: Instant,
    every: Duration,
    state: std::sync::Mutex<(u64, String, Instant)>,
}

impl Progress {
    /// `unit` names what is counted ("step", "sampler", "batch"); `template` is the
    /// terminal bar's indicatif template.
    pub fn new(name: &str, unit: &str, total: u64, template: &str) -> Progress {
        use std::io::IsTerminal;
        let mode = std::env::var("QTAYLOR_PROGRESS").unwrap_or_default();
        let terminal = std::io::stderr().is_terminal();
        let (bar, lines) = match mode.as_str() {
            "off" => (false, false),
            "lines" => (false, true),
            "bar" => (true, false),
            _ => (terminal, !terminal),
        };
        let every = std::env::var("QTAYLOR_PROGRESS_EVERY")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| *v >= 0.0 && v.is_finite())
            .unwrap_or(5.0);
        let bar = bar.then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        let now = Instant::now();
        Progress {
            bar,
            lines,
            name: name.to_string(),
            unit: unit.to_string(),
            total,
            start: now,
            every: Duration::from_secs_f64(every),
            state: std::sync::Mutex::new((0, String::new(), now)),
        }
    }

    /// No output at all.
    pub fn hidden() -> Progress {
        let now = Instant::now();
        Progress {
            bar: None,
            lines: false,
            name: String::new(),
            unit: String::new(),
            total: 0,
            start: now,
            every: Duration::from_secs(5),
            state: std::sync::Mutex::new((0, String::new(), now)),
        }
    }

    pub fn set_position(&self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
        self.update(|s| s.0 = pos);
    }

    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        self.update(|s| s.0 += n);
    }

    pub fn set_message(&self, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg.clone());
        }
        if self.lines {
            self.state.lock().expect("progress lock").1 = msg;
        }
    }

    /// Clears the bar (a log keeps its lines).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    fn update(&self, f: impl FnOnce(&mut (u64, String, Instant))) {
        if !self.lines {
            return;
        }
        let mut s = self.state.lock().expect("progress lock");
        f(&mut s);
        let now = Instant::now();
        if now - s.2 < self.every {
            return;
        }
        s.2 = now;
        let elapsed = (now - self.start).as_secs_f64();
        let eta = if s.0 > 0 && s.0 < self.total {
            format!(
                ", ETA {:.1} s",
                elapsed / s.0 as f64 * (self.total - s.0) as f64
            )
        } else {
            String::new()
        };
        let msg = if s.1.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.1)
        };
        eprintln!(
            "[{} {elapsed:.1} s] {} {}/{}{msg}{eta}",
            self.name, self.unit, s.0, self.total
        );
    }
}
