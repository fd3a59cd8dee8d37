//! The GPU below the models, in the order its files use each other: the CUDA device and its
//! memory pool ([`device`]), the deterministic mode's switch ([`determinism`]), the
//! per-operation timer `QTAYLOR_PROFILE` and the per-operation trace ([`profile`]),
//! qtaylor's own kernels ([`kernels`]), cuDNN convolutions on cached plans ([`conv_cudnn`],
//! with `--features cudnn`), the convolution paths the models call ([`conv`]), the matrix
//! products they call ([`matmul`]) and network
//! passes replayed from CUDA graphs ([`cuda_graph`]). On the CPU these fall back to candle's
//! own operations.

pub mod conv;
#[cfg(feature = "cudnn")]
pub mod conv_cudnn;
pub mod cuda_graph;
pub mod determinism;
pub mod device;
pub mod kernels;
pub mod matmul;
pub mod profile;
