//! Data sets on disk: the IDX format of MNIST / Fashion-MNIST (optionally gzipped) and
//! `.npy` matrices. Errors name the file and what was expected.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::DType;

/// An IDX array of unsigned bytes: its dimensions and data (row-major).
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// The largest IDX data set read, in bytes after decompression (a stated limit: the MNIST
/// training images are 47 MB; a gzip stream that inflates past it is refused, not
/// buffered).
pub const MAX_IDX_BYTES: u64 = 1 << 30;

/// Reads an IDX file of type ubyte (`.gz` is decompressed). Checks the magic number, the
/// dimensions and the data length.
pub fn read_idx(path: &Path) -> Result<Idx> {
    let raw =
        std::fs::read(path).with_context(|| format!("cannot read IDX file {}", path.display()))?;
    let gz = path.extension().is_some_and(|e| e == "gz");
    idx_from_bytes(&raw, gz).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
}

/// Parses IDX bytes, gunzipping them first when `gz` (see [`read_idx`]).
pub fn idx_from_bytes(raw: &[u8], gz: bool) -> Result<Idx> {
    if !gz {
        return parse_idx(raw).context("malformed IDX file");
    }
    if raw.len() as u64 > MAX_IDX_BYTES {
        bail!(
            "{} bytes; IDX files are limited to {MAX_IDX_BYTES} bytes",
            raw.len()
        );
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(raw)
        .take(MAX_IDX_BYTES + 1)
        .read_to_end(&mut out)
        .context("not a valid gzip stream")?;
    if out.len() as u64 > MAX_IDX_BYTES {
        bail!("the gzip stream inflates past {MAX_IDX_BYTES} bytes, the limit for IDX data");
    }
    parse_idx(&out).context("malformed IDX file")
}

fn parse_idx(b: &[u8]) -> Result<Idx> {
    if b.len() < 4 {
        bail!(
            "{} bytes, too short for the 4-byte IDX magic number",
            b.len()
        );
    }
    if b[0] != 0 || b[1] != 0 {
        bail!(
            "magic number starts with {:#04x} {:#04x}, expected 0x00 0x00",
            b[0],
            b[1]
        );
    }
    if b[2] != 0x08 {
        bail!(
            "data type {:#04x} is not supported; expected 0x08 (unsigned byte)",
            b[2]
        );
    }
    let ndim = b[3] as usize;
    if ndim == 0 {
        bail!("zero dimensions");
    }
    let header = 4 + 4 * ndim;
    if b.len() < header {
        bail!("{} bytes, too short for {ndim} dimension sizes", b.len());
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(b[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| anyhow::anyhow!("dimensions {dims:?} overflow the address space"))?;
    if b.len() - header != count {
        bail!(
            "dimensions {dims:?} need {count} data bytes, the file has {}",
            b.len() - header
        );
    }
    Ok(Idx {
        dims,
        data: b[header..].to_vec(),
    })
}

/// Finds `name` or `name.gz` in a folder.
pub fn find_idx(dir: &Path, name: &str) -> Result<PathBuf> {
    for candidate in [dir.join(name), dir.join(format!("{name}.gz"))] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "{}: no {name} (or {name}.gz) in this folder; fetch MNIST with scripts/fetch-mnist.sh",
        dir.display()
    )
}

/// The two halves of an IDX image data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// `train-images-idx3-ubyte` + `train-labels-idx1-ubyte`
    Train,
    /// `t10k-images-idx3-ubyte` + `t10k-labels-idx1-ubyte`
    Test,
}

/// Labelled grey-scale images as stored in IDX files: `n` images of `h × w` bytes.
#[derive(Clone)]
pub struct ImageSet {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl ImageSet {
    /// Image `i` as floats in [−1, 1] (`b / 127.5 − 1`, the scaling the diffusion models use).
    pub fn image_f32(&self, i: usize) -> impl Iterator<Item = f32> + '_ {
        let d = self.h * self.w;
        self.images[i * d..(i + 1) * d]
            .iter()
            .map(|&b| b as f32 / 127.5 - 1.0)
    }
}

/// The folder of a named data set (`mnist` → `data/mnist`, `fashion-mnist` →
/// `data/fashion-mnist`) or the given path, with the script that fetches it.
pub fn dataset_dir(spec: &str) -> (PathBuf, Option<&'static str>) {
    match spec {
        "mnist" => (PathBuf::from("data/mnist"), Some("scripts/fetch-mnist.sh")),
        "fashion-mnist" => (
            PathBuf::from("data/fashion-mnist"),
            Some("scripts/fetch-fashion-mnist.sh"),
        ),
        other => (PathBuf::from(other), None),
    }
}

/// Loads one split of an IDX image data set (`mnist`, `fashion-mnist` or a folder holding
/// the four IDX files, `.gz` or not). Errors name the folder or file and what is wrong.
pub fn load_image_set(spec: &str, split: Split) -> Result<ImageSet> {
    let (dir, fetch) = dataset_dir(spec);
    let hint = fetch
        .map(|s| format!("; fetch it with {s}"))
        .unwrap_or_default();
    if !dir.is_dir() {
        bail!(
            "{}: no such folder (expected the IDX files of an image data set){hint}",
            dir.display()
        );
    }
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let find = |name: String| {
        find_idx(&dir, &name).map_err(|_| {
            anyhow::anyhow!(
                "{}: no {name} (or {name}.gz) in this folder, so it holds no IDX data set{hint}",
                dir.display()
            )
        })
    };
    let img_path = find(format!("{prefix}-images-idx3-ubyte"))?;
    let lab_path = find(format!("{prefix}-labels-idx1-ubyte"))?;
    let img = read_idx(&img_path)?;
    let lab = read_idx(&lab_path)?;
    if img.dims.len() != 3 {
        bail!(
            "{}: IDX array of shape {:?}, expected images (N, H, W)",
            img_path.display(),
            img.dims
        );
    }
    if lab.dims.len() != 1 || lab.dims[0] != img.dims[0] {
        bail!(
            "{}: labels of shape {:?}, expected ({}) to match {}",
            lab_path.display(),
            lab.dims,
            img.dims[0],
            img_path.display()
        );
    }
    if img.dims[0] == 0 {
        bail!("{}: holds no images", img_path.display());
    }
    Ok(ImageSet {
        n: img.dims[0],
        h: img.dims[1],
        w: img.dims[2],
        images: img.data,
        labels: lab.data,
    })
}

/// A data matrix: `rows` vectors of dimension `dim`, row-major f64.
pub struct Matrix {
    pub rows: usize,
    pub dim: usize,
    pub data: Vec<f64>,
}

/// Loads the first `limit` rows of a data set: a `.npy` array (N, d) of floats used as
/// given, an IDX image file, or a folder holding `train-images-idx3-ubyte[.gz]`
/// (`mnist` is `data/mnist`); IDX bytes are scaled to [−1, 1] and images flattened.
pub fn load_matrix(spec: &str, limit: Option<usize>) -> Result<Matrix> {
    let path = if spec == "mnist" {
        PathBuf::from("data/mnist")
    } else {
        PathBuf::from(spec)
    };
    if !path.exists() {
        if spec == "mnist" {
            bail!("data/mnist does not exist; fetch MNIST with scripts/fetch-mnist.sh");
        }
        bail!(
            "{}: no such file or folder (expected a .npy array, an IDX file or a folder with MNIST IDX files)",
            path.display()
        );
    }
    let m = if path.is_dir() {
        idx_matrix(&find_idx(&path, "train-images-idx3-ubyte")?)?
    } else if path.extension().is_some_and(|e| e == "npy") {
        let t = crate::io::read_npy(&path, &[None, None])?;
        let (rows, dim) = t.dims2()?;
        Matrix {
            rows,
            dim,
            data: t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?,
        }
    } else {
        idx_matrix(&path)?
    };
    let rows = match limit {
        Some(0) => bail!("{spec}: a data set of 0 rows was asked for"),
        Some(n) if n > m.rows => bail!("{spec}: {n} rows asked for, the data set has {}", m.rows),
        Some(n) => n,
        None => m.rows,
    };
    Ok(Matrix {
        rows,
        dim: m.dim,
        data: m.data[..rows * m.dim].to_vec(),
    })
}

fn idx_matrix(path: &Path) -> Result<Matrix> {
    let idx = read_idx(path)?;
    if idx.dims.len() < 2 {
        bail!(
            "{}: IDX array of shape {:?} holds labels, expected images (N, H, W)",
            path.display(),
            idx.dims
        );
    }
    let rows = idx.dims[0];
    let dim = idx.dims[1..].iter().product();
    Ok(Matrix {
        rows,
        dim,
        data: idx.data.iter().map(|&v| v as f64 / 127.5 - 1.0).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend(data);
        b
    }

    #[test]
    fn idx_round_trips_and_scales_to_minus_one_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train-images-idx3-ubyte");
        std::fs::write(
            &p,
            idx_bytes(&[3, 2, 2], &[0, 255, 128, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        )
        .unwrap();
        let m = load_matrix(dir.path().to_str().unwrap(), Some(2)).unwrap();
        assert_eq!((m.rows, m.dim), (2, 4));
        assert_eq!(m.data[0], -1.0);
        assert_eq!(m.data[1], 1.0);
        // gzip is read too
        let gz = dir.path().join("g.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &idx_bytes(&[1, 2], &[7, 9])).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert_eq!(read_idx(&gz).unwrap().data, vec![7, 9]);
    }

    #[test]
    fn image_sets_load_with_labels_and_missing_or_mismatched_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let spec = d.to_str().unwrap();
        let e = format!("{:#}", load_image_set(spec, Split::Train).err().unwrap());
        assert!(
            e.contains("train-images-idx3-ubyte") && e.contains("no IDX"),
            "{e}"
        );
        std::fs::write(
            d.join("train-images-idx3-ubyte"),
            idx_bytes(&[2, 1, 2], &[0, 255, 10, 20]),
        )
        .unwrap();
        std::fs::write(
            d.join("train-labels-idx1-ubyte"),
            idx_bytes(&[3], &[1, 2, 3]),
        )
        .unwrap();
        let e = format!("{:#}", load_image_set(spec, Split::Train).err().unwrap());
        assert!(
            e.contains("train-labels-idx1-ubyte") && e.contains("[3]"),
            "{e}"
        );
        std::fs::write(d.join("train-labels-idx1-ubyte"), idx_bytes(&[2], &[7, 9])).unwrap();
        let s = load_image_set(spec, Split::Train).unwrap();
        assert_eq!((s.n, s.h, s.w), (2, 1, 2));
        assert_eq!(s.labels, vec![7, 9]);
        assert_eq!(s.image_f32(0).collect::<Vec<_>>(), vec![-1.0, 1.0]);
        let e = format!("{:#}", load_image_set(spec, Split::Test).err().unwrap());
        assert!(e.contains("t10k-images-idx3-ubyte"), "{e}");
        let e = format!(
            "{:#}",
            load_image_set("/nonexistent/x", Split::Test).err().unwrap()
        );
        assert!(
            e.contains("/nonexistent/x") && e.contains("no such folder"),
            "{e}"
        );
    }

    #[test]
    fn malformed_idx_files_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad");
        for (bytes, needle) in [
            (vec![0u8, 0], "too short"),
            (vec![1, 0, 8, 1, 0, 0, 0, 0], "magic number"),
            (vec![0, 0, 0x0d, 1, 0, 0, 0, 0], "not supported"),
            (idx_bytes(&[4, 2], &[1, 2, 3]), "need 8 data bytes"),
        ] {
            std::fs::write(&p, bytes).unwrap();
            let e = format!("{:#}", read_idx(&p).err().unwrap());
            assert!(e.contains("bad") && e.contains(needle), "{e}");
        }
        let e = format!(
            "{:#}",
            load_matrix(dir.path().join("none.npy").to_str().unwrap(), None)
                .err()
                .unwrap()
        );
        assert!(e.contains("none.npy") && e.contains("no such file"), "{e}");
        let e = format!(
            "{:#}",
            load_matrix(dir.path().to_str().unwrap(), None)
                .err()
                .unwrap()
        );
        assert!(e.contains("train-images-idx3-ubyte"), "{e}");
        std::fs::write(&p, idx_bytes(&[4], &[1, 2, 3, 4])).unwrap();
        let e = format!(
            "{:#}",
            load_matrix(p.to_str().unwrap(), None).err().unwrap()
        );
        assert!(e.contains("labels"), "{e}");
    }

    #[test]
    fn idx_dimensions_that_overflow_or_a_gzip_bomb_are_refused_before_allocation() {
        let b = idx_bytes(&[u32::MAX, u32::MAX, u32::MAX], &[0; 16]);
        let e = format!("{:#}", idx_from_bytes(&b, false).err().unwrap());
        assert!(e.contains("overflow"), "{e}");
        let b = idx_bytes(&[1_000_000_000, 28, 28], &[0; 16]);
        let e = format!("{:#}", idx_from_bytes(&b, false).err().unwrap());
        assert!(e.contains("need 784000000000 data bytes"), "{e}");
        // 1 GiB + 1 of zeros compresses to about 1 MB: inflating stops at the limit.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(MAX_IDX_BYTES >> 20) + 1 {
            std::io::Write::write_all(&mut enc, &zeros).unwrap();
        }
        let gz = enc.finish().unwrap();
        let e = format!("{:#}", idx_from_bytes(&gz, true).err().unwrap());
        assert!(e.contains("inflates past 1073741824 bytes"), "{e}");
    }
}
