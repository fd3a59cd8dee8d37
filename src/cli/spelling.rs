//! How the command line spells the library's option keys: `--qt-last`, `--qt-last taylor`,
//! `--lower-order-final` (a switch), `--no-corrector` (the switch that turns UniPC's
//! corrector off).

use qtaylor::keys::{self, Key, Message, Spelling, Value};

/// The command line's spelling.
pub struct Flags;

/// The flag of `key`.
pub fn flag(key: Key) -> String {
    match key {
        keys::UNIPC_CORRECTOR => "--no-corrector".into(),
        k => format!("--{}", k.name().replace('_', "-")),
    }
}

impl Spelling for Flags {
    fn key(&self, key: Key) -> String {
        flag(key)
    }
    fn set(&self, key: Key, value: &Value) -> String {
        match value {
            Value::Text(v) | Value::Number(v) => format!("{} {v}", flag(key)),
            Value::Switch(_) => flag(key),
        }
    }
}

/// An error as the command line prints it: its chain, with every key spelled as a flag.
pub fn render(e: &anyhow::Error) -> String {
    keys::render(e, &Flags)
}

/// A note or warning as the command line prints it.
pub fn render_message(m: &Message) -> String {
    m.render(&Flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Keys only the Python package has: explicit `times=`, and a scheduler config's
    /// `prediction_type` (a checkpoint brings its own on the command line).
    const PYTHON_ONLY: &[Key] = &[keys::TIMES, keys::PREDICTION_TYPE];

    #[test]
    fn every_key_the_library_names_is_a_flag_of_the_command_line() {
        let cmd = crate::Cli::command();
        let flags: Vec<String> = cmd
            .get_subcommands()
            .flat_map(|s| {
                s.get_arguments()
                    .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            })
            .collect();
        for k in keys::ALL.iter().filter(|k| !PYTHON_ONLY.contains(k)) {
            assert!(
                flags.contains(&flag(*k)),
                "key {k}: no flag {} on the command line",
                flag(*k)
            );
        }
    }

    #[test]
    fn a_switch_is_written_as_its_flag_and_a_value_after_it() {
        let e = qtaylor::option_error!(
            (keys::UNIPC_CORRECTOR, false),
            " and ",
            (keys::LOWER_ORDER_FINAL, true),
            " and ",
            (keys::QT_LAST, "taylor")
        );
        assert_eq!(
            e.render(&Flags),
            "--no-corrector and --lower-order-final and --qt-last taylor"
        );
    }
}
