//! The bundled digit classifier: a LeNet-sized network over 28x28 greyscale digits, the
//! feature network of sample-quality figures for the bundled data (issue 15's item 4) and the
//! judge of class-conditional samples ("does the image show the digit that was asked for?").
//!
//! Architecture (LeNet-5-like, 79,226 parameters, ReLU, max pooling):
//! `conv 5x5 1->16 -> relu -> pool 2 -> conv 5x5 16->32 -> relu -> pool 2 -> flatten 512 ->
//! linear 512->128 -> relu (the features) -> linear 128->10 (the logits)`. Input: images in
//! [0, 1] (what `diffuse sample` writes), scaled to [-1, 1] as the training data is.
//!
//! The weights (`assets/digit_classifier.safetensors`, 317 KB, compiled into the binary) come
//! from `cargo run --release --example train_digit_classifier`, which retrains them bit for bit
//! (one thread, seeded); `assets/DIGIT-CLASSIFIER-PROVENANCE.md` records how and the accuracy.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

use crate::error::{Error, Result};

/// The weights trained by `examples/train_digit_classifier.rs`.
pub const BUNDLED_WEIGHTS: &[u8] = include_bytes!("../../assets/digit_classifier.safetensors");

/// What every output names as the feature network.
pub const NAME: &str = "bundled digit classifier (LeNet-sized, assets/digit_classifier.safetensors)";

/// Width of the feature layer.
pub const FEATURES: usize = 128;

/// The image side the network reads.
pub const SIZE: usize = 28;

/// The classifier.
pub struct DigitClassifier {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
}

impl DigitClassifier {
    /// The network over the variables of `vb` (names `conv1`, `conv2`, `fc1`, `fc2`, each with
    /// `weight` and `bias`).
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig::default();
        Ok(DigitClassifier {
            conv1: candle_nn::conv2d(1, 16, 5, cfg, vb.pp("conv1"))?,
            conv2: candle_nn::conv2d(16, 32, 5, cfg, vb.pp("conv2"))?,
            fc1: candle_nn::linear(512, FEATURES, vb.pp("fc1"))?,
            fc2: candle_nn::linear(FEATURES, 10, vb.pp("fc2"))?,
        })
    }

    /// The bundled network.
    pub fn bundled(device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load_buffer(BUNDLED_WEIGHTS, device)?;
        Self::new(VarBuilder::from_tensors(tensors, DType::F32, device))
    }

    /// Features `[N, 128]` of `x` `[N, 1, 28, 28]` already in [-1, 1].
    pub fn features_of_scaled(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(x)?.relu()?.max_pool2d(2)?;
        let h = self.conv2.forward(&h)?.relu()?.max_pool2d(2)?;
        let h = h.flatten_from(1)?;
        Ok(self.fc1.forward(&h)?.relu()?)
    }

    /// Logits `[N, 10]` of `x` `[N, 1, 28, 28]` in [-1, 1].
    pub fn logits_of_scaled(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.fc2.forward(&self.features_of_scaled(x)?)?)
    }

    /// Features and predicted classes of `n` images in [0, 1] (`values`, `[n, 1, h, w]`
    /// row-major; sides other than 28 are resized with the data loader's resize), in batches.
    pub fn describe(
        &self,
        values: &[f64],
        shape: [usize; 3],
        device: &Device,
    ) -> Result<(Vec<f64>, Vec<usize>)> {
        let [c, h, w] = shape;
        if c != 1 {
            return Err(Error::param(
                "images",
                format!("the digit classifier reads greyscale images, got {c} channels"),
            ));
        }
        let per = h * w;
        if per == 0 || values.len() % per != 0 {
            return Err(Error::param("images", "the values do not form whole images"));
        }
        let n = values.len() / per;
        let mut features = Vec::with_capacity(n * FEATURES);
        let mut classes = Vec::with_capacity(n);
        const BATCH: usize = 500;
        for first in (0..n).step_by(BATCH) {
            let count = BATCH.min(n - first);
            let mut pixels = Vec::with_capacity(count * SIZE * SIZE);
            for i in first..first + count {
                let img: Vec<f32> = values[i * per..(i + 1) * per]
                    .iter()
                    .map(|&v| (2.0 * v - 1.0) as f32)
                    .collect();
                if h == SIZE && w == SIZE {
                    pixels.extend(img);
                } else {
                    pixels.extend(crate::data::resize::resize_and_crop(&img, 1, h, w, SIZE)?);
                }
            }
            let x = Tensor::from_vec(pixels, (count, 1, SIZE, SIZE), device)?;
            let f = self.features_of_scaled(&x)?;
            let logits = self.fc2.forward(&f)?;
            features.extend(f.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
            classes.extend(
                logits
                    .argmax(1)?
                    .to_dtype(DType::U32)?
                    .to_vec1::<u32>()?
                    .into_iter()
                    .map(|k| k as usize),
            );
        }
        Ok((features, classes))
    }
}

/// How the classifier's predictions spread over the 10 classes: counts, and the entropy of the
/// histogram in nats (ln 10 = 2.303 for a uniform spread; 0 when every image is one class).
pub fn class_histogram(classes: &[usize]) -> (Vec<usize>, f64) {
    let mut counts = vec![0usize; 10];
    for &k in classes {
        if k < 10 {
            counts[k] += 1;
        }
    }
    let n = classes.len().max(1) as f64;
    let entropy = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum();
    (counts, entropy)
}

/// Agreement of the predictions with the requested classes (`None`: unconditional image, not
/// counted): overall fraction and, per requested class, (agreeing, asked).
pub fn agreement(predicted: &[usize], requested: &[Option<usize>]) -> (Option<f64>, Vec<(usize, usize)>) {
    let mut per = vec![(0usize, 0usize); 10];
    for (&p, r) in predicted.iter().zip(requested) {
        if let Some(k) = *r {
            if k < 10 {
                per[k].1 += 1;
                if p == k {
                    per[k].0 += 1;
                }
            }
        }
    }
    let (hit, asked) = per.iter().fold((0, 0), |(h, a), &(x, y)| (h + x, a + y));
    ((asked > 0).then(|| hit as f64 / asked as f64), per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_entropy_and_agreement() {
        let (counts, h) = class_histogram(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(counts, vec![1; 10]);
        assert!((h - 10f64.ln()).abs() < 1e-12);
        let (_, h) = class_histogram(&[3, 3, 3]);
        assert_eq!(h, 0.0);
        let (all, per) = agreement(&[1, 2, 2, 5], &[Some(1), Some(1), None, Some(5)]);
        assert!((all.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(per[1], (1, 2));
        assert_eq!(per[5], (1, 1));
        assert_eq!(agreement(&[1], &[None]).0, None);
    }
}
