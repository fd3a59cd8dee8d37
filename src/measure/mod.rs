//! Measurement, on top of sampling: reference solutions of the probability-flow ODE
//! ([`reference`]), error metrics ([`metrics`]), the error-vs-NFE bench ([`bench`]), sample
//! quality of a trained model ([`eval`]: FID, KID, precision/recall in a classifier's feature
//! space, [`feature_metrics`]), throughput ([`speed`]), parity with diffusers ([`parity`]) and plots ([`plot`]).

pub mod bench;
pub mod determinism;
pub mod eval;
pub mod feature_metrics;
pub mod metrics;
pub mod parity;
pub mod plot;
pub mod reference;
pub mod speed;
