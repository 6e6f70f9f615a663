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
//! Module map (one concept per module; see `docs/STYLE.md`):
//! - [`schedule`]: beta schedules and their derived tables (f64).
//! - [`forward`]: the forward process q(x_t | x_{t-1}) and q(x_t | x_0) on batches.
//! - [`posterior`]: q(x_{t-1} | x_t, x_0), x_0 / eps predictions, the reverse step's variance.
//! - [`likelihood`]: Gaussian KL, the discretized decoder, the variational bound in bits/dim.
//! - [`process`]: forward processes: the discrete DDPM chain and the continuous SDE families.
//! - [`denoiser`]: the `Denoiser` trait samplers call; eps / x_0 / v / score conversions.
//! - [`gmm`], [`oracle`]: Gaussian mixtures and their exact (class-conditional) denoiser.
//! - [`guidance`]: class-conditional models and classifier-free guidance, a `Denoiser` wrapper.
//! - [`samplers`]: every sampler behind one trait, and the name -> sampler registry.
//! - [`ode_likelihood`]: log p(x) by the probability-flow ODE.
//! - [`eval`]: sample-quality distances (energy distance, MMD, null band).
//! - [`nets`]: the U-Net (diffusers' `UNet2DModel` layout), the toy MLP, diffusers interop.
//! - [`ops`]: network building blocks (conv, GroupNorm, attention) with fast CPU kernels.
//! - [`data`]: image datasets (IDX, CIFAR-10, folders, bundled `mnist5k`), 2-D toy data, training order.
//! - [`pipeline`]: a trained image model (our checkpoint or a diffusers folder) ready to sample or measure.
//! - [`train`]: the training loop, AdamW, EMA, checkpoints and exact resume, data-parallel
//!   training over MPI; toy and image tasks.
//! - [`rng`]: the seeded generator, the only source of randomness.
//! - [`io`]: atomic file output and `.npy`.
//! - [`plot`], [`plot2d`], [`image_out`]: PNG charts, 2-D scatter/trajectory/score figures, image grids.
//! - [`bench`]: timing the U-Net's training and sampling steps, FLOP counts, peak memory.

pub mod bench;
pub mod config;
pub mod data;
pub mod denoiser;
pub mod error;
pub mod eval;
pub mod forward;
pub mod gmm;
pub mod guidance;
pub mod image_out;
pub mod io;
pub mod likelihood;
pub mod nets;
pub mod ode_likelihood;
pub mod ops;
pub mod oracle;
pub mod pipeline;
pub mod plot;
pub mod plot2d;
pub mod posterior;
pub mod process;
pub mod pth;
pub mod rng;
pub mod samplers;
pub mod schedule;
pub mod train;

pub use error::{Error, Result};
