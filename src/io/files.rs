//! Atomic writes (a temporary file in the target folder, then a rename), so a failed run
//! never leaves a half-written output, and the check that an output's folder exists.

use std::path::Path;

use anyhow::{Context, Result, bail};
use qtaylor_core::bail_option;
use qtaylor_core::keys::Key;

/// The folder an output file goes to (`.` for a bare name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Why the folder of `path` cannot take a file, if it cannot.
fn missing_dir(path: &Path) -> Option<String> {
    let dir = dir_of(path);
    (!dir.is_dir()).then(|| format!("the folder {} does not exist", dir.display()))
}

/// Checks, before any work, that the folder an output file goes to exists; `key` names
/// the option that gave the path (e.g. `out`).
pub fn check_out_dir(key: Key, path: &Path) -> Result<()> {
    let given = (key, path.display().to_string());
    if let Some(why) = missing_dir(path) {
        bail_option!(given, format!(": {why} (create it first)"));
    }
    if path.is_dir() {
        bail_option!(given, ": is a folder; expected a file name");
    }
    Ok(())
}

fn temp_in_dir_of(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = dir_of(path);
    if let Some(why) = missing_dir(path) {
        bail!("cannot write {}: {why}", path.display());
    }
    let tmp = tempfile::Builder::new()
        .prefix(".qtaylor-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file next to {}", path.display()))?;
    // tempfile creates 0600; outputs are ordinary files (0644).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set permissions next to {}", path.display()))?;
    }
    Ok(tmp)
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| Ok(std::fs::write(tmp, bytes)?))
}

/// Writes `path` atomically through a writer that fills a temporary path next to it.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_in_dir_of(path)?;
    fill(tmp.path()).with_context(|| format!("cannot write {}", path.display()))?;
    // A writer may have replaced the temporary file (safetensors does): permissions again.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set permissions next to {}", path.display()))?;
    }
    tmp.persist(path).with_context(|| {
        format!(
            "cannot move the finished file into place at {}",
            path.display()
        )
    })?;
    Ok(())
}
