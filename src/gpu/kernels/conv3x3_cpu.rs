//! The CPU's 3×3 convolution: im2col in tiles and one matrix product per tile.

use candle_core::{DType, Result, Tensor};

/// A 3×3, stride 1, padding 1 convolution of a contiguous f32 CPU input `(B, C, H, W)` with
/// weights `w2 = (Cout, C·9)` (the PyTorch weight reshaped) and bias `(Cout,)`. Images are
/// taken in tiles of about 2 M im2col entries (so the buffer stays in cache-friendly sizes and
/// is reused): per tile an im2col matrix `(C·9, tile·H·W)` built row by row from shifted,
/// zero-padded copies, one matrix product (N = tile·H·W stays large at the 4×4 level), and
/// the `(Cout, tile, H·W)` result written back as `(B, Cout, H, W)` with the bias added.
pub fn conv3x3_cpu_f32(x: &Tensor, w2: &Tensor, bias: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (b, c, h, w) = x.dims4()?;
    let cout = w2.dim(0)?;
    let hw = h * w;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("conv3x3_cpu_f32 on a non-CPU tensor");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("conv3x3_cpu_f32: non-contiguous input".into()))?;
    let xs = &cpu.as_slice::<f32>()?[start..end];
    let bias: Vec<f32> = bias.to_vec1()?;
    // Tiles of a fixed number of images (from the layer's shape, not the batch); a last,
    // partial tile is padded (its spare columns hold stale values and are discarded). Every
    // image thus goes through a product of the same shape at the same column offset whatever
    // the batch, so its result does not depend on the batch (a matrix product's rounding can
    // depend on its column count).
    let tile = (2_000_000 / (c * 9 * hw)).max(1);
    let n = tile * hw;
    let mut col = vec![0f32; c * 9 * n];
    let mut out = vec![0f32; b * cout * hw];
    for b0 in (0..b).step_by(tile) {
        let nb = tile.min(b - b0);
        fill_im2col(xs, (c, h, w), b0, nb, n, &mut col);
        let colt = Tensor::from_slice(&col, (c * 9, n), &candle_core::Device::Cpu)?;
        let prod = w2.matmul(&colt)?; // (Cout, tile·HW)
        let (ps, pl) = prod.storage_and_layout();
        let candle_core::Storage::Cpu(pc) = &*ps else {
            candle_core::bail!("conv3x3_cpu_f32: product not on the CPU");
        };
        let (pa, pz) = pl
            .contiguous_offsets()
            .expect("a fresh product is contiguous");
        let prod = &pc.as_slice::<f32>()?[pa..pz];
        out[b0 * cout * hw..(b0 + nb) * cout * hw]
            .par_chunks_mut(hw)
            .enumerate()
            .for_each(|(i, dst)| {
                let (bi, co) = (i / cout, i % cout);
                let src = &prod[co * n + bi * hw..co * n + (bi + 1) * hw];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = s + bias[co];
                }
            });
    }
    drop(storage);
    Tensor::from_vec(out, (b, cout, h, w), &candle_core::Device::Cpu)
}

/// Fills `dst` (`C·9` rows of `stride ≥ nb·H·W` entries) with the im2col matrix of images
/// `b0 .. b0 + nb` of a contiguous f32 batch `xs` of shape `(·, C, H, W)`: row
/// `c·9 + ky·3 + kx`, column `bi·H·W + y·W + x` holds `x[b0 + bi, c, y + ky − 1, x + kx − 1]`
/// (zero outside); columns from `nb·H·W` on are left as they are.
fn fill_im2col(
    xs: &[f32],
    (c, h, w): (usize, usize, usize),
    b0: usize,
    nb: usize,
    stride: usize,
    dst: &mut [f32],
) {
    use rayon::prelude::*;
    let hw = h * w;
    debug_assert!(stride >= nb * hw);
    dst[..c * 9 * stride]
        .par_chunks_mut(stride)
        .enumerate()
        .for_each(|(row, dst)| {
            let (ci, k) = (row / 9, row % 9);
            let (dy, dx) = (k as isize / 3 - 1, k as isize % 3 - 1);
            let (x0, x1) = (
                (-dx).max(0) as usize,
                (w as isize - dx).min(w as isize) as usize,
            );
            for bi in 0..nb {
                let src = &xs[((b0 + bi) * c + ci) * hw..((b0 + bi) * c + ci + 1) * hw];
                let o = &mut dst[bi * hw..(bi + 1) * hw];
                for y in 0..h {
                    let sy = y as isize + dy;
                    let row_out = &mut o[y * w..(y + 1) * w];
                    if sy < 0 || sy >= h as isize {
                        row_out.fill(0.0);
                        continue;
                    }
                    let s0 = sy as usize * w;
                    row_out[..x0].fill(0.0);
                    row_out[x1..].fill(0.0);
                    let (a, z) = ((x0 as isize + dx) as usize, (x1 as isize + dx) as usize);
                    row_out[x0..x1].copy_from_slice(&src[s0 + a..s0 + z]);
                }
            }
        });
}

/// The im2col matrix `(C·9, B·H·W)` of a batch `(B, C, H, W)` (3×3 window, padding 1; the
/// row and column order of [`fill_im2col`]).
pub(crate) fn im2col3x3(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("im2col3x3: CPU tensor expected");
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("im2col3x3: non-contiguous".into()))?;
        let mut col = vec![0f32; c * 9 * b * h * w];
        fill_im2col(
            &cpu.as_slice::<f32>()?[start..end],
            (c, h, w),
            0,
            b,
            b * h * w,
            &mut col,
        );
        drop(storage);
        return Tensor::from_vec(col, (c * 9, b * h * w), x.device());
    }
    let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let mut views = Vec::with_capacity(9);
    for ky in 0..3 {
        for kx in 0..3 {
            views.push(xp.narrow(2, ky, h)?.narrow(3, kx, w)?);
        }
    }
    // (B, C, 9, H, W) → (C, 9, B, H, W)
    Tensor::stack(&views, 2)?
        .permute((1, 2, 0, 3, 4))?
        .contiguous()?
        .reshape((c * 9, b * h * w))
}
