//! Exact-score problems: ground truth without a network (DESIGN §8).

pub mod empirical;
pub mod gmm;

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;

use crate::models::model::Model;
use crate::schedule::Schedule;
use gmm::{Gmm, GmmModel};

/// Seed of the built-in `gmm-demo` mixture.
pub const GMM_DEMO_SEED: u64 = 20211227;

/// A data distribution whose exact model output is known.
pub trait Problem: Send + Sync {
    /// Name as given on the command line.
    fn name(&self) -> String;
    /// Shape of one sample (without the batch dimension).
    fn item_shape(&self) -> Vec<usize>;
    /// The exact model.
    fn model(&self) -> &dyn Model;
    /// `n` exact samples of the marginal `p_t` (rows), determined by `seed`.
    fn exact_samples(&self, t: f64, n: usize, seed: u64) -> Vec<Vec<f64>>;
    /// For data sets of points: per row of `x` at time t, the index of the nearest scaled
    /// data point `α y_n` and the RMS distance to it.
    fn nearest(&self, _x: &Tensor, _t: f64) -> Option<Result<(Vec<usize>, Vec<f64>)>> {
        None
    }
}

/// A Gaussian mixture problem.
pub struct GmmProblem {
    name: String,
    model: GmmModel,
}

impl GmmProblem {
    pub fn new(name: &str, gmm: Gmm, schedule: Arc<dyn Schedule>, device: &Device) -> Result<Self> {
        Ok(GmmProblem {
            name: name.to_string(),
            model: GmmModel::new(Arc::new(gmm), schedule, device)?,
        })
    }

    pub fn gmm(&self) -> &Gmm {
        &self.model.gmm
    }
}

impl Problem for GmmProblem {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn item_shape(&self) -> Vec<usize> {
        vec![self.model.gmm.dim]
    }
    fn model(&self) -> &dyn Model {
        &self.model
    }
    fn exact_samples(&self, t: f64, n: usize, seed: u64) -> Vec<Vec<f64>> {
        let s = &self.model.schedule;
        let mut rng = ChaCha12Rng::seed_from_u64(seed);
        self.model.gmm.sample(n, s.alpha(t), s.sigma(t), &mut rng).0
    }
}

/// Loads `--problem`: `gmm-demo`, a mixture JSON file, or `empirical:PATH[:N]` (a `.npy`
/// (N, d) array, an IDX image file, a folder of MNIST IDX files, or `mnist` for
/// `data/mnist`; the optional N keeps the first N rows).
pub fn load_problem(
    spec: &str,
    schedule: Arc<dyn Schedule>,
    device: &Device,
) -> Result<Box<dyn Problem>> {
    if let Some(rest) = spec.strip_prefix("empirical:") {
        let (path, limit) = match rest.rsplit_once(':') {
            Some((p, n)) if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => {
                (p, Some(n.parse::<usize>()?))
            }
            _ => (rest, None),
        };
        let m = crate::io::idx::load_matrix(path, limit)?;
        return Ok(Box::new(empirical::EmpiricalProblem::new(
            spec, &m, schedule, device,
        )?));
    }
    if spec == "gmm-demo" {
        return Ok(Box::new(GmmProblem::new(
            spec,
            Gmm::demo(GMM_DEMO_SEED),
            schedule,
            device,
        )?));
    }
    if spec.ends_with(".json") {
        let gmm = Gmm::from_json_file(Path::new(spec))?;
        return Ok(Box::new(GmmProblem::new(spec, gmm, schedule, device)?));
    }
    bail!(
        "unknown problem '{spec}'; expected gmm-demo, a mixture file FILE.json or empirical:PATH[:N]"
    )
}
