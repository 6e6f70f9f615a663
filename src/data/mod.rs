//! Datasets.
//!
//! - [`toy2d`]: the standard 2-D toy distributions and points from `.npy` / CSV files.

pub mod toy2d;
