//! The GPU below the models, in the order its files use each other: the CUDA device and its
//! memory pool ([`device`]), the per-operation timer `QTAYLOR_PROFILE` ([`profile`]),
//! qtaylor's own kernels ([`kernels`]), cuDNN convolutions on cached plans ([`conv_cudnn`],
//! with `--features cudnn`), the convolution paths the models call ([`conv`]) and network
//! passes replayed from CUDA graphs ([`cuda_graph`]). On the CPU these fall back to candle's
//! own operations.

pub mod conv;
#[cfg(feature = "cudnn")]
pub mod conv_cudnn;
pub mod cuda_graph;
pub mod device;
pub mod kernels;
pub mod profile;
