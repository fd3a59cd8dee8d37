//! The command line's commands: each file holds one command's flags (clap) and the few lines
//! that parse them into the library's settings and print what the library returns.

pub mod args;
pub mod bench;
pub mod eval;
pub mod merge;
pub mod misc;
pub mod sample;
pub mod shards;
pub mod spelling;
pub mod train;
pub mod tune;
