//! Images in and out: an `--init-image` (PNG or `.npy`) and a batch written as one PNG grid.

use std::path::Path;

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};

use super::files::write_atomic;
use super::npy::read_npy;

/// Reads one input image for `sample --init-image`: a PNG (grey or RGB, converted to `c`
/// channels; 8-bit values mapped to [−1, 1] as `b / 127.5 − 1`) or a `.npy` array
/// `(C, H, W)` or `(B, C, H, W)` of values in [−1, 1]. Returns `(B, C, H, W)` (B = 1 for a
/// PNG); the size must be `h × w` (no resizing).
pub fn read_image(path: &Path, c: usize, h: usize, w: usize) -> Result<Tensor> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext == "npy" {
        let t = match read_npy(path, &[Some(c), Some(h), Some(w)]) {
            Ok(t) => t.unsqueeze(0)?,
            Err(_) => read_npy(path, &[None, Some(c), Some(h), Some(w)])?,
        };
        return Ok(t.to_dtype(DType::F32)?);
    }
    if ext != "png" {
        bail!("{}: expected a .png or .npy image", path.display());
    }
    let img = image::open(path)
        .map_err(|e| anyhow::anyhow!("{}: not a readable PNG ({e})", path.display()))?;
    if (img.width() as usize, img.height() as usize) != (w, h) {
        bail!(
            "{}: {}x{} pixels, the model takes {w}x{h} (resize it first)",
            path.display(),
            img.width(),
            img.height()
        );
    }
    let data: Vec<f32> = match c {
        1 => img
            .to_luma8()
            .into_raw()
            .iter()
            .map(|&b| b as f32 / 127.5 - 1.0)
            .collect(),
        3 => {
            let rgb = img.to_rgb8();
            (0..3)
                .flat_map(|ch| rgb.pixels().map(move |p| p.0[ch] as f32 / 127.5 - 1.0))
                .collect()
        }
        _ => bail!(
            "{}: the model takes {c} channels; a PNG gives 1 (grey) or 3 (RGB): pass a .npy",
            path.display()
        ),
    };
    Ok(Tensor::from_vec(data, (1, c, h, w), &Device::Cpu)?)
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
