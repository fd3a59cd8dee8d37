//! Tensor plumbing below the models: fused linear combinations and other updates on candle
//! tensors ([`ops`]), per-sample noise streams ([`rng`]), and replicas of a run on several
//! devices that exchange tensors ([`data_parallel`]).

pub mod data_parallel;
pub mod ops;
pub mod rng;
