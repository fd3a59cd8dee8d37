//! Files in and out: numpy `.npy` arrays, and atomic writes (temp file in the target
//! folder, then rename), so a failed run never leaves a half-written output.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

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

/// Checks, before any work, that the folder an output file goes to exists; `flag` names
/// the option that gave the path (e.g. `--out`).
pub fn check_out_dir(flag: &str, path: &Path) -> Result<()> {
    if let Some(why) = missing_dir(path) {
        bail!("{flag} {}: {why} (create it first)", path.display());
    }
    if path.is_dir() {
        bail!(
            "{flag} {}: is a folder; expected a file name",
            path.display()
        );
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

/// Writes a tensor as `.npy` (its own dtype) atomically.
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    let t = t.to_device(&Device::Cpu)?;
    write_atomic_with(path, |tmp| Ok(t.write_npy(tmp)?))
}

/// Reads a float32/float64 `.npy` array and checks its shape: `expected` gives each
/// dimension, `None` for "any". Errors name the file, what was found and what was expected.
pub fn read_npy(path: &Path, expected: &[Option<usize>]) -> Result<Tensor> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    let t = Tensor::read_npy(path)
        .map_err(|e| anyhow::anyhow!("{}: not a readable .npy array ({e})", path.display()))?;
    if !matches!(t.dtype(), DType::F32 | DType::F64) {
        bail!(
            "{}: dtype {:?} is not supported; expected float32 or float64",
            path.display(),
            t.dtype()
        );
    }
    let want = expected
        .iter()
        .map(|d| d.map_or("*".to_string(), |d| d.to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    let ok = t.rank() == expected.len()
        && t.dims()
            .iter()
            .zip(expected)
            .all(|(&d, e)| e.is_none_or(|e| e == d));
    if !ok {
        bail!(
            "{}: array of shape {:?}, expected shape ({want})",
            path.display(),
            t.dims()
        );
    }
    // A NaN or an infinity in an input is the file's fault: name it before any model runs.
    let flat = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if let Some(i) = flat.iter().position(|v| !v.is_finite()) {
        let row_len = (flat.len() / t.dims()[0].max(1)).max(1);
        bail!(
            "{}: entry {i} (row {}) is {}; expected finite values",
            path.display(),
            i / row_len,
            flat[i]
        );
    }
    Ok(t)
}

/// Writes a batch of images `(B, C, H, W)` with values in [−1, 1] (C = 1 or 3) as one PNG
/// grid, ⌈√B⌉ columns with a 2-pixel gap, atomically. Values outside [−1, 1] are clipped.
pub fn write_png_grid(path: &Path, images: &Tensor) -> Result<()> {
    let (b, c, h, w) = images.dims4().map_err(|_| {
        anyhow::anyhow!(
            "{}: images of shape {:?}, expected (B, C, H, W)",
            path.display(),
            images.dims()
        )
    })?;
    if c != 1 && c != 3 {
        bail!(
            "{}: {c} channels, expected 1 (grey) or 3 (RGB)",
            path.display()
        );
    }
    let data: Vec<f32> = images
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let cols = (b as f64).sqrt().ceil() as usize;
    let rows = b.div_ceil(cols);
    let gap = 2;
    let (gw, gh) = (cols * (w + gap) + gap, rows * (h + gap) + gap);
    let mut img = image::RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([255, 255, 255]));
    let to_u8 = |v: f32| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
    for i in 0..b {
        let (ox, oy) = (gap + (i % cols) * (w + gap), gap + (i / cols) * (h + gap));
        for y in 0..h {
            for x in 0..w {
                let px = |ch: usize| to_u8(data[((i * c + ch) * h + y) * w + x]);
                let rgb = if c == 1 {
                    [px(0); 3]
                } else {
                    [px(0), px(1), px(2)]
                };
                img.put_pixel((ox + x) as u32, (oy + y) as u32, image::Rgb(rgb));
            }
        }
    }
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    write_atomic(path, &png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trips_in_f32_and_f64() {
        let dir = tempfile::tempdir().unwrap();
        for dt in [DType::F32, DType::F64] {
            let t = Tensor::arange(0f64, 6.0, &Device::Cpu)
                .unwrap()
                .reshape((2, 3))
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let p = dir.path().join(format!("a-{dt:?}.npy"));
            write_npy(&p, &t).unwrap();
            let back = read_npy(&p, &[None, Some(3)]).unwrap();
            assert_eq!(back.dtype(), dt);
            assert_eq!(
                back.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(),
                vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0]]
            );
        }
    }

    #[test]
    fn npy_of_wrong_shape_or_dtype_or_garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        write_npy(
            &p,
            &Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let e = read_npy(&p, &[None, Some(4)]).unwrap_err().to_string();
        assert!(
            e.contains("x.npy") && e.contains("[2, 3]") && e.contains("(*, 4)"),
            "{e}"
        );
        let p = dir.path().join("i.npy");
        write_npy(
            &p,
            &Tensor::zeros((2, 3), DType::I64, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let e = read_npy(&p, &[None, Some(3)]).unwrap_err().to_string();
        assert!(
            e.contains("i.npy") && e.contains("float32 or float64"),
            "{e}"
        );
        let p = dir.path().join("g.npy");
        std::fs::write(&p, b"not an array").unwrap();
        let e = read_npy(&p, &[None, Some(3)]).unwrap_err().to_string();
        assert!(
            e.contains("g.npy") && e.contains("not a readable .npy"),
            "{e}"
        );
        let e = read_npy(&dir.path().join("missing.npy"), &[None])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.npy: no such file"), "{e}");
    }
}
