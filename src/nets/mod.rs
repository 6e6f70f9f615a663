//! Neural networks: the time-conditioned U-Net for images, built exactly as diffusers'
//! `UNet2DModel` so that one code path serves our presets and diffusers checkpoints.
//!
//! - [`config`]: [`UNetConfig`], diffusers' config format, and the presets `demo`, `mnist`,
//!   `cifar10`, `bench`.
//! - [`embedding`]: the sinusoidal timestep embedding and its MLP.
//! - [`layers`]: convolution, linear, GroupNorm, dropout (forward passes through [`crate::ops`]).
//! - [`blocks`]: ResNet, attention, down/up-sampling, down/mid/up blocks.
//! - [`unet`]: [`UNet`], parameter lists and counts, seeded initialisation, summaries.
//! - [`diffusers`]: diffusers model folders in and out (load, check, export).
//! - [`scheduler_config`]: diffusers' DDPM/DDIM scheduler configs and the [`crate::schedule::Schedule`] they describe.
//! - [`adapter`]: [`UNetDenoiser`], the U-Net behind the samplers' `Denoiser` trait.
//! - [`mlp`]: a residual MLP for low-dimensional (toy) data, usable with every process.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use diffuse::nets::{unet, UNetConfig};
//!
//! let cfg = UNetConfig::preset("demo", 1, 28).unwrap(); // 1 x 28 x 28 images
//! let (net, _varmap) = unet::init_params(&cfg, 0, &Device::Cpu).unwrap();
//! let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
//! let t = Tensor::new(&[10f32, 999.0], &Device::Cpu).unwrap();
//! assert_eq!(net.forward(&x, &t).unwrap().dims(), &[2, 1, 28, 28]);
//! ```

pub mod adapter;
pub mod blocks;
pub mod config;
pub mod diffusers;
pub mod embedding;
pub mod layers;
pub mod mlp;
pub mod scheduler_config;
pub mod unet;

pub use adapter::UNetDenoiser;
pub use config::UNetConfig;
pub use unet::UNet;
