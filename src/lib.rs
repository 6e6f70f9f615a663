//! # diffuse
//!
//! Denoising diffusion probabilistic models in Rust: the forward noising process and its
//! schedules, the reverse process and its samplers, the variational bound, and the networks
//! and training loop that learn it.
//!
//! ```
//! use diffuse::schedule::Schedule;
//!
//! // The DDPM paper's linear schedule, T = 1000 (Ho et al. 2020).
//! let s = Schedule::named("linear", 1000).unwrap();
//! // alpha_bar_T = prod (1 - beta_t) is about 4e-5: x_T is almost pure noise.
//! assert!((s.alpha_bar[999] - 4.04e-5).abs() < 1e-6);
//! ```
//!
//! Module map (one concept per module; see `shared/STYLE.md`):
//! - [`schedule`]: beta schedules and their derived tables (f64).
//! - [`forward`]: the forward process q(x_t | x_{t-1}) and q(x_t | x_0) on batches.
//! - [`posterior`]: q(x_{t-1} | x_t, x_0), x_0 / eps predictions, the reverse step's variance.
//! - [`likelihood`]: Gaussian KL, the discretized decoder, the variational bound in bits/dim.
//! - [`rng`]: the seeded generator, the only source of randomness.
//! - [`io`]: atomic file output and `.npy`.
//! - [`plot`]: PNG charts.
//! - [`denoiser`]: the `Denoiser` trait samplers call; eps / x_0 / v / score conversions.
//! - [`data`]: image datasets (IDX, CIFAR-10, image folders, bundled `mnist5k`) and the training order.
//! - [`image_out`]: sample grids, per-image PNGs, trajectory strips and GIFs.
//! - [`nets`]: the U-Net (diffusers' `UNet2DModel` layout), its presets and diffusers interop.
//! - [`ops`]: network building blocks (conv, GroupNorm, attention) with fast CPU kernels.
//! - [`data`]: datasets (2-D toy sets, point files).
//! - [`nets`]: networks behind the `Denoiser` trait (the toy MLP).
//! - [`train`]: the training loop, AdamW, EMA, checkpoints and exact resume.

pub mod data;
pub mod denoiser;
pub mod error;
pub mod forward;
pub mod image_out;
pub mod io;
pub mod likelihood;
pub mod nets;
pub mod ops;
pub mod plot;
pub mod posterior;
pub mod rng;
pub mod schedule;
pub mod train;

pub use error::{Error, Result};
