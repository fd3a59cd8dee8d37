//! numpy `.npy` arrays in and out, with every header checked before anything is allocated.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

use super::files::write_atomic_with;

/// Writes a tensor as `.npy` (its own dtype) atomically.
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    let t = t.to_device(&Device::Cpu)?;
    write_atomic_with(path, |tmp| Ok(t.write_npy(tmp)?))
}

/// The largest `.npy` input read, in bytes (a stated limit: a header that claims more is
/// refused before anything is allocated).
pub const MAX_NPY_BYTES: u64 = 8 << 30;

/// Reads a float32/float64 `.npy` array and checks its shape: `expected` gives each
/// dimension, `None` for "any". Errors name the file, what was found and what was expected.
pub fn read_npy(path: &Path, expected: &[Option<usize>]) -> Result<Tensor> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    let len = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot read it", path.display()))?
        .len();
    if len > MAX_NPY_BYTES + 65_536 {
        bail!(
            "{}: {len} bytes; .npy inputs are limited to {MAX_NPY_BYTES} bytes",
            path.display()
        );
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("{}: cannot read it", path.display()))?;
    parse_npy(&bytes, expected).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
}

/// The header of a `.npy` array: element size in bytes (4 or 8) and shape.
struct NpyHeader {
    itemsize: usize,
    shape: Vec<usize>,
    data_start: usize,
}

/// Parses the `.npy` header (format versions 1–3: magic, version, header length, then a
/// Python dict literal with `descr`, `fortran_order` and `shape`; numpy's
/// `numpy/lib/format.py`). Accepts little-endian float32/float64 in C order.
fn parse_npy_header(b: &[u8]) -> Result<NpyHeader> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        bail!("not a readable .npy array (no \\x93NUMPY magic string)");
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10usize),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => bail!("not a readable .npy array (format version {v}; expected 1, 2 or 3)"),
    };
    let end = start
        .checked_add(hlen)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "not a readable .npy array (the header claims {hlen} bytes, the file has {})",
                b.len() - start
            )
        })?;
    let h = std::str::from_utf8(&b[start..end])
        .map_err(|_| anyhow::anyhow!("not a readable .npy array (header is not text)"))?;
    let value = |key: &str| -> Result<&str> {
        let k = h
            .find(&format!("'{key}'"))
            .ok_or_else(|| anyhow::anyhow!("not a readable .npy array (header has no '{key}')"))?;
        let rest = h[k + key.len() + 2..].trim_start();
        let rest = rest
            .strip_prefix(':')
            .ok_or_else(|| anyhow::anyhow!("not a readable .npy array (header key '{key}')"))?;
        Ok(rest.trim_start())
    };
    let descr = value("descr")?;
    let itemsize = if descr.starts_with("'<f4'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        let d = descr.split([',', '}']).next().unwrap_or("").trim();
        bail!("dtype {d} is not supported; expected float32 or float64 ('<f4' or '<f8')");
    };
    let fortran = value("fortran_order")?;
    if fortran.starts_with("True") {
        bail!("fortran_order is True; expected a C-order array (np.ascontiguousarray)");
    } else if !fortran.starts_with("False") {
        bail!("not a readable .npy array (header key 'fortran_order')");
    }
    let shape = value("shape")?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split_once(')'))
        .map(|(i, _)| i)
        .ok_or_else(|| anyhow::anyhow!("not a readable .npy array (header key 'shape')"))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L').parse::<usize>().map_err(|_| {
                anyhow::anyhow!("not a readable .npy array (shape entry '{s}' is not a size)")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(NpyHeader {
        itemsize,
        shape,
        data_start: end,
    })
}

/// Reads `.npy` bytes (see [`read_npy`]). The data size the header claims is checked
/// against the bytes present before anything is allocated.
pub fn parse_npy(bytes: &[u8], expected: &[Option<usize>]) -> Result<Tensor> {
    let h = parse_npy_header(bytes)?;
    let data = &bytes[h.data_start..];
    let count = h
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|c| c.checked_mul(h.itemsize).is_some())
        .ok_or_else(|| anyhow::anyhow!("shape {:?} overflows the address space", h.shape))?;
    if count * h.itemsize != data.len() {
        bail!(
            "shape {:?} needs {} data bytes, the file has {} (truncated or corrupt?)",
            h.shape,
            count * h.itemsize,
            data.len()
        );
    }
    let want = expected
        .iter()
        .map(|d| d.map_or("*".to_string(), |d| d.to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    let ok = h.shape.len() == expected.len()
        && h.shape
            .iter()
            .zip(expected)
            .all(|(&d, e)| e.is_none_or(|e| e == d));
    if !ok {
        bail!("array of shape {:?}, expected shape ({want})", h.shape);
    }
    // A NaN or an infinity in an input is the file's fault: name it before any model runs.
    let row_len = (count / h.shape.first().copied().unwrap_or(1).max(1)).max(1);
    let bad = |i: usize, v: f64| {
        anyhow::anyhow!(
            "entry {i} (row {}) is {v}; expected finite values",
            i / row_len
        )
    };
    let t = if h.itemsize == 4 {
        let v: Vec<f32> = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(bad(i, v[i] as f64));
        }
        Tensor::from_vec(v, h.shape.as_slice(), &Device::Cpu)?
    } else {
        let v: Vec<f64> = data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(bad(i, v[i]));
        }
        Tensor::from_vec(v, h.shape.as_slice(), &Device::Cpu)?
    };
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

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
