//! Networks that implement the [`crate::denoiser::Denoiser`] interface.
//!
//! - [`mlp`]: a residual MLP for low-dimensional (toy) data, usable with every process.

pub mod mlp;
