//! The model interface: a map `(x, t) → prediction` in a declared parameterization,
//! and the exact conversions between parameterizations (DESIGN §2).

use anyhow::Result;
use candle_core::Tensor;

use crate::schedule::Schedule;
use crate::tensor::ops::{Coef, lincomb_rows};

pub use qtaylor_core::exec::Parameterization;

/// A denoising model on continuous VP time.
pub trait Model: Send + Sync {
    /// The quantity [`Model::predict`] returns.
    fn parameterization(&self) -> Parameterization;

    /// The prediction at `(x, t)`. `x` has shape `(B, …)`; `t` holds one time per row, or a
    /// single time shared by all rows.
    fn predict(&self, x: &Tensor, t: &[f64]) -> Result<Tensor>;
}

/// A model output converted to both the noise and the data prediction.
#[derive(Clone, Debug)]
pub struct Denoised {
    pub eps: Tensor,
    pub x0: Tensor,
}

fn coef(values: Vec<f64>) -> Coef {
    if values.len() == 1 {
        Coef::All(values[0])
    } else {
        Coef::Rows(values)
    }
}

/// Converts a prediction made at `(x, t)` into `(ε̂, x̂0)` with the core's exact
/// conversion ([`qtaylor_core::exec::conversion`]: from ε̂, x̂0, v̂ or the flow velocity).
pub fn to_eps_x0(
    p: Parameterization,
    pred: &Tensor,
    x: &Tensor,
    t: &[f64],
    schedule: &dyn Schedule,
) -> Result<Denoised> {
    let c: Vec<_> = t
        .iter()
        .map(|&t| qtaylor_core::exec::conversion(p, schedule.alpha(t), schedule.sigma(t)))
        .collect();
    let map = |f: &dyn Fn(&qtaylor_core::exec::Conversion) -> f64| coef(c.iter().map(f).collect());
    let (eps, x0) = match p {
        Parameterization::Eps => (pred.clone(), None),
        _ => (
            lincomb_rows(&[(map(&|c| c.0[0]), x), (map(&|c| c.0[1]), pred)])?,
            (p == Parameterization::X0).then(|| pred.clone()),
        ),
    };
    let x0 = match x0 {
        Some(x0) => x0,
        None => lincomb_rows(&[(map(&|c| c.1[0]), x), (map(&|c| c.1[1]), pred)])?,
    };
    Ok(Denoised { eps, x0 })
}

/// Converts `(ε̂, x̂0)` at `(x, t)` into the prediction of parameterization `p`
/// (`v̂ = α ε̂ − σ x̂0`; the flow velocity `ε̂ − x̂0`).
pub fn from_eps_x0(
    p: Parameterization,
    d: &Denoised,
    t: &[f64],
    schedule: &dyn Schedule,
) -> Result<Tensor> {
    Ok(match p {
        Parameterization::Eps => d.eps.clone(),
        Parameterization::X0 => d.x0.clone(),
        Parameterization::V => {
            let a = coef(t.iter().map(|&t| schedule.alpha(t)).collect());
            let s = coef(t.iter().map(|&t| -schedule.sigma(t)).collect());
            lincomb_rows(&[(a, &d.eps), (s, &d.x0)])?
        }
        Parameterization::Flow => {
            lincomb_rows(&[(Coef::All(1.0), &d.eps), (Coef::All(-1.0), &d.x0)])?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::VpLinear;
    use crate::tensor::ops::rows_f64;
    use candle_core::Device;

    #[test]
    fn conversions_between_parameterizations_are_exact_inverses() {
        let s = VpLinear::default();
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[0.3f64, -0.7, 1.1], [0.0, 0.5, -0.2]], &dev).unwrap();
        let eps = Tensor::new(&[[1.2f64, 0.4, -0.9], [-0.3, 0.8, 2.0]], &dev).unwrap();
        let t = [0.37, 0.81];
        let (a, g) = (
            vec![s.alpha(t[0]), s.alpha(t[1])],
            vec![s.sigma(t[0]), s.sigma(t[1])],
        );
        let x = lincomb_rows(&[(Coef::Rows(a), &x0), (Coef::Rows(g), &eps)]).unwrap();
        let truth = Denoised {
            eps: eps.clone(),
            x0: x0.clone(),
        };
        for p in [
            Parameterization::Eps,
            Parameterization::X0,
            Parameterization::V,
            Parameterization::Flow,
        ] {
            let pred = from_eps_x0(p, &truth, &t, &s).unwrap();
            let back = to_eps_x0(p, &pred, &x, &t, &s).unwrap();
            for (u, v) in [(&back.eps, &eps), (&back.x0, &x0)] {
                let (u, v) = (rows_f64(u).unwrap(), rows_f64(v).unwrap());
                for (ru, rv) in u.iter().zip(&v) {
                    for (a, b) in ru.iter().zip(rv) {
                        assert!((a - b).abs() < 1e-12, "{p}: {a} vs {b}");
                    }
                }
            }
        }
    }
}
