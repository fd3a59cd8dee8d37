//! What a tuned grid is judged by ([`Objective`]) and the feature space its distribution
//! distances are taken in ([`Features`]).
//!
//! Every objective compares the student's end points (the tuned sampler on the trial grid)
//! with the teacher's from the same start noises:
//!
//! - `l2`: the mean over samples of the per-sample RMS distance between the two end points
//!   (GITS, arXiv 2405.11326, and LD3's pointwise loss, arXiv 2412.09785). Where the student
//!   is far from the teacher (4–6 NFE on the MNIST model) its L2 optimum is an average of the
//!   end points the teacher could reach, which looks blurred: closer in L2, worse in FID
//!   (BENCHMARKS §6.2).
//! - `kid`: a distribution distance, the unbiased MMD² with the cubic polynomial kernel
//!   `k(x, y) = (xᵀy/d + 1)³` between the two sets of features (KID, Bińkowski et al. 2018,
//!   over whole sets, no subsets). Watson et al. (DDSS, arXiv 2202.05830) optimise a
//!   KID-like loss through the sampler by gradients; here the compass search of
//!   [`qtaylor_core::tune::refine`] minimises it by evaluations.
//! - `fd`: the Fréchet distance of Gaussians fitted to the two sets of features (FID's
//!   formula, Heusel et al. 2017).
//!
//! The distribution objectives do not pair sample i with sample i: a grid whose end points
//! are sharp but land elsewhere than the teacher's scores as well as one that matches them.
//! The features: the project's MNIST classifier's (eval's FID space, [`ClassifierFeatures`])
//! for 28×28 images, the state itself ([`StateFeatures`]) for exact-score problems.

use std::fmt;
use std::str::FromStr;

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::keys;
use crate::measure::feature_metrics;
use crate::models::classifier::{Classifier, quantise};

/// The tuner's objective (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// Mean per-sample RMS distance to the teacher's end points.
    L2,
    /// Unbiased MMD² with KID's cubic kernel, in a feature space.
    Kid,
    /// Fréchet distance of fitted Gaussians, in a feature space.
    Fd,
}

impl Objective {
    pub const NAMES: [&'static str; 3] = ["l2", "kid", "fd"];

    /// Whether it compares sets of features (otherwise pairs of end points).
    pub fn uses_features(self) -> bool {
        !matches!(self, Objective::L2)
    }

    /// The distance between a student's and the teacher's feature sets.
    pub fn distance(self, student: &[Vec<f64>], teacher: &[Vec<f64>]) -> Result<f64> {
        match self {
            Objective::L2 => anyhow::bail!("the l2 objective compares end points, not features"),
            Objective::Kid => feature_metrics::mmd2_cubic(student, teacher),
            Objective::Fd => feature_metrics::fid(student, teacher),
        }
    }

    /// What it measures, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Objective::L2 => "end-point RMSE vs teacher",
            Objective::Kid => "KID (unbiased MMD², cubic kernel) vs teacher",
            Objective::Fd => "Fréchet distance vs teacher",
        }
    }
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Objective::L2 => "l2",
            Objective::Kid => "kid",
            Objective::Fd => "fd",
        })
    }
}

impl FromStr for Objective {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "l2" => Ok(Objective::L2),
            "kid" => Ok(Objective::Kid),
            "fd" => Ok(Objective::Fd),
            _ => crate::bail_option!(
                (keys::OBJECTIVE, s),
                format!(": expected one of {}", Objective::NAMES.join(", "))
            ),
        }
    }
}

/// A feature map: one row of f64 per sample, each sample computed on its own (so a row does
/// not depend on the batch or the replica it came from).
pub trait Features: Sync {
    fn rows(&self, x: &Tensor) -> Result<Vec<Vec<f64>>>;
    fn describe(&self) -> String;
}

/// The state itself, flattened (exact-score problems).
pub struct StateFeatures;

impl Features for StateFeatures {
    fn rows(&self, x: &Tensor) -> Result<Vec<Vec<f64>>> {
        let rows = x.dim(0)?;
        Ok(x.to_dtype(DType::F64)?
            .reshape((rows, ()))?
            .to_vec2::<f64>()?)
    }
    fn describe(&self) -> String {
        "the state".into()
    }
}

/// eval's FID features: the sample quantised to 8-bit grey levels, then the classifier's
/// 128 penultimate activations. Unlike eval, which computes them one image at a time, the
/// tuner takes the batch in one call (hundreds of objective evaluations; on CUDA one image at
/// a time costs a dozen kernel launches each): a row may round differently in another batch.
pub struct ClassifierFeatures<'a> {
    pub classifier: &'a Classifier,
    pub name: String,
}

impl Features for ClassifierFeatures<'_> {
    fn rows(&self, x: &Tensor) -> Result<Vec<Vec<f64>>> {
        let f = self.classifier.features(&quantise(x)?)?;
        Ok(f.to_dtype(DType::F64)?.to_vec2::<f64>()?)
    }
    fn describe(&self) -> String {
        format!("the features of classifier {}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objective_names_round_trip_and_a_wrong_one_is_named() {
        for n in Objective::NAMES {
            assert_eq!(n.parse::<Objective>().unwrap().to_string(), n);
        }
        let e = "mmd".parse::<Objective>().unwrap_err().to_string();
        assert!(
            e.contains("objective") && e.contains("mmd") && e.contains("kid"),
            "{e}"
        );
    }

    #[test]
    fn the_distribution_distances_ignore_the_pairing_and_l2_refuses_features() {
        // A set and the same set in another order: as distributions they are equal.
        let a: Vec<Vec<f64>> = (0..40)
            .map(|i| vec![(i as f64 * 0.37).sin(), (i as f64 * 0.11).cos()])
            .collect();
        let mut b = a.clone();
        b.reverse();
        for o in [Objective::Kid, Objective::Fd] {
            let same = o.distance(&a, &b).unwrap();
            let shifted: Vec<Vec<f64>> = a.iter().map(|r| vec![r[0] + 0.5, r[1]]).collect();
            let far = o.distance(&shifted, &b).unwrap();
            assert!(
                same.abs() < 1e-9 * far.abs().max(1.0) || same < far / 100.0,
                "{o}"
            );
            assert!(far > 0.0, "{o}: {far}");
        }
        assert!(Objective::L2.distance(&a, &b).is_err());
    }
}
