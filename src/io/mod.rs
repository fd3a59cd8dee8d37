//! Files in and out, below everything else: atomic writes ([`files`]), `.npy` arrays
//! ([`npy`]), images ([`image`]), IDX data sets such as MNIST ([`idx`]) and progress lines
//! for long runs ([`progress`]).

pub mod files;
pub mod idx;
pub mod image;
pub mod npy;
pub mod progress;

pub use files::{check_out_dir, write_atomic, write_atomic_with};
pub use image::{read_image, write_png_grid};
pub use npy::{MAX_NPY_BYTES, parse_npy, read_npy, write_npy};
