//! Training defaults, each defined once: the CLI's `default_value_t`s and help texts, the
//! library's `Default` impls and a resumed run's fall-backs all read these constants.
//!
//! [`image`] is `diffuse train` (the U-Net on images), [`toy`] is `diffuse toy train` (the MLP
//! on low-dimensional data). Where the two differ, the reason is given.

/// `diffuse train`: the U-Net on images.
pub mod image {
    /// The run's total steps when neither `--steps` nor `--minutes` is given. A step budget,
    /// not a time budget: the default model is the same on every machine (a slower one takes
    /// longer and the progress bar shows the ETA); see the README's "The default run, measured".
    pub const STEPS: u64 = 2400;
    /// `--fid-every` on digit-shaped data: three measurements in the default run.
    pub const FID_EVERY: u64 = STEPS / 3;
    /// Images per step.
    pub const BATCH: usize = 64;
    /// Diffusion steps T (the DDPM paper's).
    pub const TIMESTEPS: usize = 1000;
    /// The noise schedule (the DDPM paper's).
    pub const SCHEDULE: &str = "linear";
    /// Peak AdamW learning rate: 1e-3, measured for short CPU runs (the DDPM paper used 2e-4).
    pub const LR: f64 = super::LR;
    /// Linear learning-rate warm-up, in steps.
    pub const WARMUP: u64 = super::WARMUP;
    /// Decoupled weight decay.
    pub const WEIGHT_DECAY: f64 = super::WEIGHT_DECAY;
    /// Global L2 norm the gradient is clipped to.
    pub const GRAD_CLIP: f64 = super::GRAD_CLIP;
    /// EMA decay of the weights: 0.995, shorter than the toy runs' 0.999 because an image run
    /// of minutes has few steps (field notes, section 3).
    pub const EMA_DECAY: f64 = 0.995;
    /// The seed of everything random.
    pub const SEED: u64 = 0;
    /// Probability that a training label is replaced by the null class (classifier-free
    /// guidance's label dropout; Ho & Salimans 2022 use 0.1 to 0.2).
    pub const COND_DROP: f64 = super::COND_DROP;
    /// A checkpoint every this many steps.
    pub const CHECKPOINT_EVERY: u64 = 250;
    /// A sample grid every this many steps.
    pub const SAMPLE_EVERY: u64 = 500;
    /// Samples per FD measurement (more than 128: the features' covariance must be full rank).
    pub const FID_SAMPLES: usize = 200;
    /// The sampler of the measured samples.
    pub const FID_SAMPLER: &str = "dpmpp-2m";
    /// Its steps.
    pub const FID_STEPS: usize = 20;
    /// Images in the sample grid.
    pub const GRID_SIZE: usize = 36;
    /// Sampling steps of the sample grid.
    pub const GRID_STEPS: usize = 100;
}

/// `diffuse toy train`: the MLP on low-dimensional data.
pub mod toy {
    /// Steps when neither `--steps` nor `--minutes` is given.
    pub const STEPS: u64 = 3000;
    /// Points drawn from a synthetic dataset when `--n-data` is not given.
    pub const N_DATA: usize = 10_000;
    /// Points per step (2-D points are cheap: a larger batch than images').
    pub const BATCH: usize = 256;
    /// Peak AdamW learning rate.
    pub const LR: f64 = super::LR;
    /// Linear learning-rate warm-up, in steps.
    pub const WARMUP: u64 = super::WARMUP;
    /// Decoupled weight decay.
    pub const WEIGHT_DECAY: f64 = super::WEIGHT_DECAY;
    /// Global L2 norm the gradient is clipped to.
    pub const GRAD_CLIP: f64 = super::GRAD_CLIP;
    /// EMA decay of the weights (the library's default, [`crate::train::EmaConfig`]).
    pub const EMA_DECAY: f64 = super::EMA_DECAY;
    /// The seed of everything random.
    pub const SEED: u64 = 0;
    /// Label dropout of class-conditional runs.
    pub const COND_DROP: f64 = super::COND_DROP;
    /// A checkpoint every this many steps (the library's [`crate::train::LoopOptions`] default).
    pub const CHECKPOINT_EVERY: u64 = super::CHECKPOINT_EVERY;
    /// Hidden width of the MLP.
    pub const HIDDEN: usize = 128;
    /// Residual blocks of the MLP.
    pub const LAYERS: usize = 3;
    /// Size of the sinusoidal log-SNR embedding.
    pub const EMBED_DIM: usize = 32;
    /// Training distribution of the log-SNR.
    pub const LOG_SNR_SAMPLING: &str = "cosine";
    /// Lower end of the training log-SNR range.
    pub const LOG_SNR_MIN: f64 = -12.0;
    /// Upper end of the training log-SNR range.
    pub const LOG_SNR_MAX: f64 = 12.0;
}

/// AdamW's learning rate, the library default ([`crate::train::AdamWConfig`]): 1e-3 (field
/// notes, section 3: short runs want 1e-3 rather than the DDPM paper's 2e-4).
pub const LR: f64 = 1e-3;
/// Linear learning-rate warm-up, in steps.
pub const WARMUP: u64 = 100;
/// Decoupled weight decay (none).
pub const WEIGHT_DECAY: f64 = 0.0;
/// Gradient clipping at global norm 1 (the DDPM reference implementation's `grad_clip = 1.0`).
pub const GRAD_CLIP: f64 = 1.0;
/// The library's EMA decay ([`crate::train::EmaConfig`]).
pub const EMA_DECAY: f64 = 0.999;
/// Label dropout of class-conditional runs.
pub const COND_DROP: f64 = 0.1;
/// The library's checkpoint interval ([`crate::train::LoopOptions`]).
pub const CHECKPOINT_EVERY: u64 = 1000;

// Checked when compiling: the FD features' covariance (128-dimensional) must be full rank, and
// the log-SNR range must not be empty.
const _: () = {
    assert!(image::FID_SAMPLES > 128);
    assert!(toy::LOG_SNR_MIN < toy::LOG_SNR_MAX);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_defaults_are_these_constants() {
        let o = crate::train::AdamWConfig::default();
        assert_eq!(
            (o.lr, o.warmup_steps, o.weight_decay, o.grad_clip),
            (LR, WARMUP, WEIGHT_DECAY, Some(GRAD_CLIP))
        );
        assert_eq!(crate::train::EmaConfig::default().decay, EMA_DECAY);
        assert_eq!(
            crate::train::LoopOptions::default().checkpoint_every,
            CHECKPOINT_EVERY
        );
        let m = crate::nets::mlp::MlpConfig::new(2);
        assert_eq!(
            (m.hidden, m.layers, m.embed_dim),
            (toy::HIDDEN, toy::LAYERS, toy::EMBED_DIM)
        );
        assert_eq!(
            crate::train::toy::LogSnrSampling::default(),
            crate::train::toy::LogSnrSampling::from_name(
                toy::LOG_SNR_SAMPLING,
                toy::LOG_SNR_MIN,
                toy::LOG_SNR_MAX
            )
            .unwrap()
        );
        assert_eq!(crate::train::image::DEFAULT_COND_DROP, image::COND_DROP);
        assert_eq!(crate::train::toy::DEFAULT_COND_DROP, toy::COND_DROP);
    }

    #[test]
    fn the_defaults_are_consistent() {
        // three FD measurements in the default image run
        assert_eq!(image::STEPS / image::FID_EVERY, 3);
        assert!(crate::samplers::SamplerKind::from_name(image::FID_SAMPLER).is_ok());
        crate::schedule::BetaSchedule::from_name(image::SCHEDULE).unwrap();
        assert!((0.0..1.0).contains(&image::COND_DROP) && (0.0..1.0).contains(&image::EMA_DECAY));
    }
}
