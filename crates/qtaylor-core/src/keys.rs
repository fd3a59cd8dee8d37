//! Option keys: how the library names a setting in an error, so that each front end prints
//! it in its own spelling (`--qt-last` on the command line, `qt_last=` in Python).
//!
//! An [`OptionError`] is a message made of [`Piece`]s: text, a [`Key`], or a key with the
//! [`Value`] that was given. The library never writes a flag or a keyword; a front end
//! renders the error with its [`Spelling`] ([`render`] walks an `anyhow` chain and renders
//! every `OptionError` in it). Without a spelling (`Display`) the keys keep their neutral
//! names: `qt_last`, `eta=2`.
//!
//! ```
//! use qtaylor_core::keys::{self, Key};
//! let e = qtaylor_core::option_error!((keys::ETA, 2.0), ": expected a value in [0, 1]");
//! assert_eq!(e.to_string(), "eta=2: expected a value in [0, 1]");
//! ```

use std::fmt;

/// A setting's neutral name: snake_case, the Python keyword (`qt_last`, `sigma_min`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key(&'static str);

impl Key {
    /// The neutral name.
    pub const fn name(self) -> &'static str {
        self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

macro_rules! keys {
    ($($(#[$doc:meta])* $id:ident = $name:literal,)+) => {
        $($(#[$doc])* pub const $id: Key = Key($name);)+
        /// Every key the library can name in an error.
        pub const ALL: &[Key] = &[$($id),+];
    };
}

keys! {
    // What is sampled.
    /// A diffusers checkpoint folder.
    MODEL = "model",
    /// An exact-score problem.
    PROBLEM = "problem",
    // The schedule.
    SCHEDULE = "schedule",
    BETA_MIN = "beta_min",
    BETA_MAX = "beta_max",
    BETA_SCHEDULE = "beta_schedule",
    BETA_START = "beta_start",
    BETA_END = "beta_end",
    TRAIN_STEPS = "train_steps",
    /// A flow schedule's time shift s (diffusers' `shift`).
    SHIFT = "shift",
    /// A flow schedule's dynamic shift μ (diffusers' `mu`).
    MU = "mu",
    /// How μ shifts: exponential (s = e^μ) or linear (s = μ) (diffusers' `time_shift_type`).
    TIME_SHIFT = "time_shift",
    // The grid.
    STEPS = "steps",
    GRID = "grid",
    RHO = "rho",
    T_MIN = "t_min",
    T_MAX = "t_max",
    SIGMA_MIN = "sigma_min",
    SIGMA_MAX = "sigma_max",
    SPACING = "spacing",
    STEPS_OFFSET = "steps_offset",
    FINAL = "final",
    TIMESTEPS = "timesteps",
    SIGMAS = "sigmas",
    GRID_FILE = "grid_file",
    /// Explicit grid times (Python's `times=`).
    TIMES = "times",
    // The sampler and its options.
    SAMPLER = "sampler",
    ETA = "eta",
    EXPAND = "expand",
    QT_LAST = "qt_last",
    DDPM_VARIANCE = "ddpm_variance",
    RTOL = "rtol",
    ATOL = "atol",
    LOWER_ORDER_FINAL = "lower_order_final",
    UNIPC_VARIANT = "unipc_variant",
    /// UniPC's corrector, on by default (the command line's switch turns it off).
    UNIPC_CORRECTOR = "unipc_corrector",
    S_CHURN = "s_churn",
    S_TMIN = "s_tmin",
    S_TMAX = "s_tmax",
    S_NOISE = "s_noise",
    DENOISE_FINAL = "denoise_final",
    // Classes and guidance.
    CLASS = "class",
    CLASSES = "classes",
    GUIDANCE = "guidance",
    NULL_CLASS = "null_class",
    /// A discrete schedule's network prediction (epsilon, sample, v_prediction).
    PREDICTION_TYPE = "prediction_type",
    // The run.
    BATCH = "batch",
    SEED = "seed",
    DTYPE = "dtype",
    MODEL_DTYPE = "model_dtype",
    DEVICE = "device",
    DEVICES = "devices",
    IMAGE_SIZE = "image_size",
    /// Do not clip x̂0 (a checkpoint's clip_sample).
    NO_CLIP = "no_clip",
    SAVE_NPY = "save_npy",
    X_INIT = "x_init",
    INIT_IMAGE = "init_image",
    STRENGTH = "strength",
    OUT = "out",
    SHARD = "shard",
    // Training.
    LR = "lr",
    EMA = "ema",
    LIMIT = "limit",
    SAVE_EVERY = "save_every",
    LABEL_DROPOUT = "label_dropout",
    /// The training loss: eps (ε-prediction) or flow (flow matching); tune's objective: l2,
    /// kid or fd.
    OBJECTIVE = "objective",
    /// How a flow run draws σ: uniform or logit-normal.
    SIGMA_SAMPLING = "sigma_sampling",
    /// A network's config.json.
    CONFIG = "config",
    RESUME = "resume",
    // Bench, eval and tuning.
    TOLERANCES = "tolerances",
    GRIDS = "grids",
    GRID_DIR = "grid_dir",
    MAX_SECONDS = "max_seconds",
    SAMPLERS = "samplers",
    /// Eval's samples per row.
    N = "n",
    REPEATS = "repeats",
    /// A parity check's largest accepted relative error.
    TOL = "tol",
    NFE = "nfe",
    TEACHER = "teacher",
    SAMPLES = "samples",
    HOLDOUT = "holdout",
    CANDIDATES = "candidates",
    /// Tuning: sweeps of the refinement without a held-out improvement before it stops.
    PATIENCE = "patience",
    /// A feature classifier's folder (eval's FID space; tune's feature objectives).
    CLASSIFIER = "classifier",
}

/// A value as it was given, for an error to quote.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A name or other text (`taylor`): Python quotes it.
    Text(String),
    /// A number, written as Rust writes it (`0.5`, `12`).
    Number(String),
    /// A switch: on or off.
    Switch(bool),
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Switch(v)
    }
}
macro_rules! number_values {
    ($($t:ty),+) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::Number(v.to_string())
            }
        }
    )+};
}
number_values!(f64, f32, usize, u64, u32, i64, i32);

/// One piece of an [`OptionError`].
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Text(String),
    /// A key named alone (`--qt-last`, `qt_last`).
    Key(Key),
    /// A key with the value given (`--qt-last taylor`, `qt_last='taylor'`).
    Set(Key, Value),
}

impl From<&str> for Piece {
    fn from(v: &str) -> Self {
        Piece::Text(v.to_string())
    }
}
impl From<String> for Piece {
    fn from(v: String) -> Self {
        Piece::Text(v)
    }
}
impl From<Key> for Piece {
    fn from(k: Key) -> Self {
        Piece::Key(k)
    }
}
impl<V: Into<Value>> From<(Key, V)> for Piece {
    fn from((k, v): (Key, V)) -> Self {
        Piece::Set(k, v.into())
    }
}

/// How a front end writes keys.
pub trait Spelling {
    /// A key named alone.
    fn key(&self, key: Key) -> String;
    /// A key with a value.
    fn set(&self, key: Key, value: &Value) -> String;
}

/// The neutral names: `qt_last`, `qt_last=taylor` (an error's `Display`).
pub struct Neutral;

impl Spelling for Neutral {
    fn key(&self, key: Key) -> String {
        key.name().to_string()
    }
    fn set(&self, key: Key, value: &Value) -> String {
        match value {
            Value::Text(v) | Value::Number(v) => format!("{key}={v}"),
            Value::Switch(on) => format!("{key}={on}"),
        }
    }
}

/// A message that names settings (an error, or a note or warning a run returns for its front
/// end to print): pieces, rendered by a [`Spelling`].
pub type Message = OptionError;

/// An error that names settings: the message as pieces, rendered by a [`Spelling`], and
/// optionally the error it wraps (its `source`, shown after it as `{:#}` shows a chain).
#[derive(Debug)]
pub struct OptionError {
    pieces: Vec<Piece>,
    source: Option<anyhow::Error>,
}

impl OptionError {
    pub fn new(pieces: Vec<Piece>) -> Self {
        OptionError {
            pieces,
            source: None,
        }
    }

    /// This message as the context of `cause` (which [`render`] then renders in turn).
    pub fn caused_by(mut self, cause: anyhow::Error) -> anyhow::Error {
        self.source = Some(cause);
        anyhow::Error::new(self)
    }

    /// The pieces of the message.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The keys this error names, in order.
    pub fn keys(&self) -> Vec<Key> {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Key(k) | Piece::Set(k, _) => Some(*k),
                Piece::Text(_) => None,
            })
            .collect()
    }

    /// The message in `spelling`.
    pub fn render(&self, spelling: &dyn Spelling) -> String {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.clone(),
                Piece::Key(k) => spelling.key(*k),
                Piece::Set(k, v) => spelling.set(*k, v),
            })
            .collect()
    }
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(&Neutral))
    }
}

impl std::error::Error for OptionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// An error's whole chain as `{:#}` writes it (causes joined by ": "), with every
/// [`OptionError`] in it written in `spelling`.
pub fn render(e: &anyhow::Error, spelling: &dyn Spelling) -> String {
    e.chain()
        .map(|c| match c.downcast_ref::<OptionError>() {
            Some(o) => o.render(spelling),
            None => c.to_string(),
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// An [`OptionError`] from pieces: text (`&str`, `String`), a [`Key`], or `(Key, value)`.
#[macro_export]
macro_rules! option_error {
    ($($piece:expr),+ $(,)?) => {
        $crate::keys::OptionError::new(vec![$($crate::keys::Piece::from($piece)),+])
    };
}

/// Returns an [`OptionError`] made of the pieces (see [`option_error!`]).
#[macro_export]
macro_rules! bail_option {
    ($($piece:expr),+ $(,)?) => {
        return Err($crate::option_error!($($piece),+).into())
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Cli;
    impl Spelling for Cli {
        fn key(&self, k: Key) -> String {
            format!("--{}", k.name().replace('_', "-"))
        }
        fn set(&self, k: Key, v: &Value) -> String {
            match v {
                Value::Text(v) | Value::Number(v) => format!("{} {v}", self.key(k)),
                Value::Switch(_) => self.key(k),
            }
        }
    }

    #[test]
    fn an_option_error_is_written_in_the_spelling_of_the_front_end_that_renders_it() {
        let e = crate::option_error!("give ", SIGMA_MIN, " or ", (T_MIN, 0.5), ", not both");
        assert_eq!(e.to_string(), "give sigma_min or t_min=0.5, not both");
        assert_eq!(e.render(&Cli), "give --sigma-min or --t-min 0.5, not both");
        assert_eq!(e.keys(), vec![SIGMA_MIN, T_MIN]);
        let chained = anyhow::Error::new(e).context("grid file g.json");
        assert_eq!(
            render(&chained, &Cli),
            "grid file g.json: give --sigma-min or --t-min 0.5, not both"
        );
        let wrapped = crate::option_error!((DEVICES, "cuda:0,cuda:9"))
            .caused_by(crate::option_error!((DEVICE, "cuda:9"), ": no GPU 9").into());
        assert_eq!(
            render(&wrapped, &Cli),
            "--devices cuda:0,cuda:9: --device cuda:9: no GPU 9"
        );
        assert_eq!(
            format!("{wrapped:#}"),
            "devices=cuda:0,cuda:9: device=cuda:9: no GPU 9"
        );
    }

    #[test]
    fn every_key_has_one_snake_case_name() {
        let mut names: Vec<&str> = ALL.iter().map(|k| k.name()).collect();
        assert!(
            names
                .iter()
                .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        );
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "a key name appears twice");
    }
}
