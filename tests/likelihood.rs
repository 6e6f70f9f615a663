//! Likelihood terms against exact answers: the Gaussian KL (zero for equal arguments, a value by
//! hand), the discretized decoder (256 bin probabilities sum to one; single bins by hand), and
//! the assembled variational bound with a denoiser that returns the true x_0, where every term
//! has a closed form. The Gaussian-data test of the bound is in `tests/gaussian_bound.rs`.

use candle_core::{DType, Device, Tensor};
use diffuse::denoiser::{Denoiser, NoiseLevel, Prediction};
use diffuse::likelihood::{
    approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl, standard_normal_cdf,
    variational_bound, BoundConfig, Decoder,
};
use diffuse::posterior::ReverseVariance;
use diffuse::schedule::Schedule;

const DEV: Device = Device::Cpu;

fn scalar(v: f64) -> Tensor {
    Tensor::new(v, &DEV).unwrap()
}

fn vec1(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

#[test]
fn kl_of_a_gaussian_with_itself_is_zero_and_hand_values() {
    let means = Tensor::new(&[[0.3f64, -2.0], [5.0, 0.0]], &DEV).unwrap();
    let logvars = Tensor::new(&[[0.0f64, -9.0], [3.0, 1e-3]], &DEV).unwrap();
    let kl = normal_kl(&means, &logvars, &means, &logvars).unwrap();
    assert!(vec1(&kl).iter().all(|&v| v == 0.0), "{kl}");
    // KL(N(1, 1) || N(0, 4)) = 0.5 (-1 + ln 4 - 0 + 1/4 + 1/4) = 0.5 (ln 4 - 0.5)
    let kl = normal_kl(&scalar(1.0), &scalar(0.0), &scalar(0.0), &scalar(4f64.ln())).unwrap();
    assert!((kl.to_scalar::<f64>().unwrap() - 0.443_147_180_559_945_3).abs() < 1e-15);
    // and the other way round: KL(N(0, 4) || N(1, 1)) = 0.5 (-1 + 0 - ln 4 + 4 + 1) = 0.5 (4 - ln 4)
    let kl = normal_kl(&scalar(0.0), &scalar(4f64.ln()), &scalar(1.0), &scalar(0.0)).unwrap();
    assert!((kl.to_scalar::<f64>().unwrap() - 1.306_852_819_440_054_6).abs() < 1e-15);
    // broadcasting a per-sample [B, 1] log-variance, in f32 (rounding 1e-7 relative)
    let m1 = Tensor::new(&[[1f32, 1.0], [0.0, 0.0]], &DEV).unwrap();
    let lv1 = Tensor::new(&[[0f32], [4f32.ln()]], &DEV).unwrap();
    let m2 = Tensor::new(&[[0f32, 0.0], [1.0, 1.0]], &DEV).unwrap();
    let lv2 = Tensor::new(&[[4f32.ln()], [0f32]], &DEV).unwrap();
    let kl = vec1(&normal_kl(&m1, &lv1, &m2, &lv2).unwrap());
    for (k, want) in kl
        .iter()
        .zip([0.443_147_18, 0.443_147_18, 1.306_852_8, 1.306_852_8])
    {
        assert!((k - want).abs() < 1e-6, "{kl:?}");
    }
}

/// The 256 levels x = 2k/255 - 1 of 8-bit data scaled to [-1, 1].
fn levels() -> Vec<f64> {
    (0..256).map(|k| 2.0 * k as f64 / 255.0 - 1.0).collect()
}

/// Over the 256 bins the probabilities sum to one for any mean and scale: the interior bins
/// telescope and the edge bins are open-ended. Tolerance in f64: each of the 256 probabilities
/// is clamped to at least 1e-12 before the log (at most 2.6e-10 in all), and the levels
/// 2k/255 - 1 and edges x +- 1/255 carry rounding up to 2.2e-16, so the upper edge of one bin
/// and the lower edge of the next differ by that much; where the density is highest (scale 1e-7
/// with the mean on an edge: 1 / (1e-7 sqrt(2 pi)) = 4e6) this moves up to 9e-10 of mass: 2e-9.
/// In f32 each probability carries about one rounding of the CDF (6e-8) plus the log/exp round
/// trip, 256 * 2.4e-7 = 6e-5, so 1e-4.
#[test]
fn discretized_probabilities_sum_to_one() {
    let x = levels();
    let cases = [
        (0.0, 0.5),
        (0.3, 1e-4),    // tiny scale: all mass in one interior bin
        (0.0, 1e-7),    // tiny scale at a bin boundary (0 lies between levels 127 and 128)
        (-1.7, 0.2),    // mean below the data range
        (2.5, 0.01),    // mean above the data range, tiny scale: all mass in the top bin
        (-3.0, 10.0),   // very broad
        (0.999, 0.003), // near the upper edge
        (-1.0, 1.0 / 255.0),
    ];
    for dtype in [DType::F64, DType::F32] {
        let xs = Tensor::from_vec(x.clone(), 256, &DEV)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        for (mean, scale) in cases {
            let means = Tensor::full(mean, 256, &DEV).unwrap().to_dtype(dtype).unwrap();
            let log_scales = Tensor::full(f64::ln(scale), 256, &DEV)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let lp = discretized_gaussian_log_likelihood(&xs, &means, &log_scales).unwrap();
            let total: f64 = vec1(&lp).iter().map(|l| l.exp()).sum();
            let tol = if dtype == DType::F64 { 2e-9 } else { 1e-4 };
            assert!(
                (total - 1.0).abs() < tol,
                "{dtype:?} mean {mean} scale {scale}: sum {total}"
            );
        }
    }
}

#[test]
fn discretized_bins_by_hand() {
    let h = 1.0 / 255.0;
    let ll = |x: f64, mean: f64, scale: f64| {
        let t = |v: f64| Tensor::new(&[v], &DEV).unwrap();
        vec1(&discretized_gaussian_log_likelihood(&t(x), &t(mean), &t(scale.ln())).unwrap())[0]
    };
    // Interior bin [0, 2/255] with the mean at its centre 1/255 and scale 2/255: the bin is
    // +-0.5 standard deviations, p = Phi(0.5) - Phi(-0.5) = erf(0.5 / sqrt 2) = 0.38292492254802624.
    assert!((ll(h, h, 2.0 * h) - (-0.959_916_333_695_622_4)).abs() < 1e-13);
    // Bottom bin x = -1 is open below: p = Phi((x + 1/255 - mean) / scale) = Phi(1) with mean -1, scale 1/255.
    assert!((ll(-1.0, -1.0, h) - (-0.172_753_779_023_449_9)).abs() < 1e-13);
    // Top bin x = 1 is open above: p = 1 - Phi((x - 1/255 - mean) / scale) = 1 - Phi(-1) = Phi(1).
    assert!((ll(1.0, 1.0, h) - (-0.172_753_779_023_449_9)).abs() < 1e-13);
    // Edge bins with the mean on their inner edge: exactly half the mass. (The symmetric cases
    // above cannot tell the two edge formulas apart; these can: swapped, they give Phi(2) = 0.977.)
    assert!((ll(1.0, 1.0 - h, h) - 0.5f64.ln()).abs() < 1e-13);
    assert!((ll(-1.0, -1.0 + h, h) - 0.5f64.ln()).abs() < 1e-13);
    // A bin 40 standard deviations from the mean: probability clamped at 1e-12, ln = -27.631...
    assert!((ll(0.0, 0.4, 0.01) - 1e-12f64.ln()).abs() < 1e-12);
}

/// improved-diffusion's tanh approximation of the normal CDF has the error stated in its doc
/// comment: largest absolute error 1.79e-4 near |x| = 2.59 (on a grid of step 1e-3 over [-8, 8]).
#[test]
fn tanh_cdf_approximation_error_is_as_documented() {
    let x = Tensor::arange_step(-8.0f64, 8.0, 1e-3, &DEV).unwrap();
    let exact = vec1(&standard_normal_cdf(&x).unwrap());
    let approx = vec1(&approx_standard_normal_cdf(&x).unwrap());
    let xs = vec1(&x);
    let (worst, at) = exact
        .iter()
        .zip(&approx)
        .zip(&xs)
        .map(|((e, a), x)| ((e - a).abs(), *x))
        .fold((0.0, 0.0), |acc, v| if v.0 > acc.0 { v } else { acc });
    assert!((1.78e-4..1.80e-4).contains(&worst), "max error {worst} at {at}");
    assert!((at.abs() - 2.59).abs() < 0.01, "at {at}");
    // Phi(0) = 1/2 and Phi(1) = 0.8413447460685429 exactly (erf-based).
    let e = vec1(&standard_normal_cdf(&Tensor::new(&[0.0f64, 1.0], &DEV).unwrap()).unwrap());
    assert!(e[0] == 0.5 && (e[1] - 0.841_344_746_068_542_9).abs() < 1e-15);
}

/// A denoiser that returns the true x_0 of the batch, whatever x_t is: the model mean then
/// equals the posterior mean at every step, so each bound term has a closed form.
struct TrueX0(Tensor);

impl Denoiser for TrueX0 {
    fn prediction(&self) -> Prediction {
        Prediction::X0
    }
    fn output(&self, x_t: &Tensor, _levels: &[NoiseLevel]) -> diffuse::Result<Tensor> {
        Ok(self.0.to_dtype(x_t.dtype())?)
    }
}

/// A noise-dependent denoiser: x0_pred = x_t / 2.
struct Half;

impl Denoiser for Half {
    fn prediction(&self) -> Prediction {
        Prediction::X0
    }
    fn output(&self, x_t: &Tensor, _levels: &[NoiseLevel]) -> diffuse::Result<Tensor> {
        Ok(x_t.affine(0.5, 0.0)?)
    }
}

/// Three 1 x 2 x 2 images on the 8-bit grid; image 0 has two edge values (-1 and 1).
fn images() -> (Tensor, Vec<[usize; 4]>) {
    let ks = vec![[0, 255, 100, 17], [128, 127, 3, 250], [64, 64, 200, 201]];
    let v: Vec<f64> = ks
        .iter()
        .flatten()
        .map(|&k| 2.0 * k as f64 / 255.0 - 1.0)
        .collect();
    (Tensor::from_vec(v, (3, 1, 2, 2), &DEV).unwrap(), ks)
}

/// The bound assembled with the true x_0, linear schedule, T = 1000. Expected values computed
/// in float64 with Python's math.erf from the published formulas:
/// - L_T = sum_d 0.5 (-1 - ln(1 - alpha_bar_T) + (1 - alpha_bar_T) + alpha_bar_T x_d^2)
///   (KL(N(sqrt(alpha_bar_T) x, 1 - alpha_bar_T) || N(0, 1)) per value);
/// - fixed small: every L_{t-1} = 0 (same mean, same variance);
///   fixed large: L_{t-1} = D * 0.5 (-1 + ln beta_t - ln beta~_t + beta~_t / beta_t), whose sum
///   over t = 2..1000 is 0.33716011787519518 per value;
/// - L_0 with mean x_0 and sigma_1^2 = beta~_2 = 5.4531876613021935e-05 (both choices):
///   interior values -ln erf((1/255) / (sigma_1 sqrt 2)) = 0.90481884151855774 nats,
///   edge values -ln Phi((1/255) / sigma_1) = 0.35338380999827601 nats.
///
/// Tolerance 1e-9 relative: the Rust and Python erf and logs agree to ~1e-15, the sums over
/// 1000 steps to ~1e-13.
#[test]
fn bound_with_the_true_x0_has_closed_form_terms() {
    let s = Schedule::named("linear", 1000).unwrap();
    let (x0, ks) = images();
    let ab_t = s.alpha_bar[999];
    for dtype in [DType::F64, DType::F32] {
        let x0 = x0.to_dtype(dtype).unwrap();
        let oracle = TrueX0(x0.clone());
        for variance in [ReverseVariance::Small, ReverseVariance::Large] {
            let config = BoundConfig {
                variance,
                seed: 5,
                ..BoundConfig::default()
            };
            let mut calls = Vec::new();
            let vb = variational_bound(&oracle, &s, &x0, &config, &mut |t| calls.push(t)).unwrap();
            assert_eq!(
                calls,
                (1..=1000).rev().collect::<Vec<_>>(),
                "progress called once per t, T..1"
            );
            assert_eq!(vb.dims, 4);
            let xs = vec1(&x0);
            for (j, img) in vb.images.iter().enumerate() {
                let l_t: f64 = xs[4 * j..4 * j + 4]
                    .iter()
                    .map(|x| 0.5 * (-1.0 - (1.0 - ab_t).ln() + (1.0 - ab_t) + ab_t * x * x))
                    .sum();
                let l_sum = match variance {
                    ReverseVariance::Small => 0.0,
                    ReverseVariance::Large => 4.0 * 0.337_160_117_875_195_2,
                };
                let edges = ks[j].iter().filter(|&&k| k == 0 || k == 255).count() as f64;
                let l_0 = edges * 0.353_383_809_998_276 + (4.0 - edges) * 0.904_818_841_518_557_7;
                let ctx = format!("{dtype:?} {variance:?} image {j}");
                let close = |got: f64, want: f64| (got - want).abs() <= 1e-9 * want.abs().max(1.0);
                assert!(close(img.nats.l_t, l_t), "{ctx}: L_T {} vs {l_t}", img.nats.l_t);
                assert!(
                    close(img.nats.l_sum, l_sum),
                    "{ctx}: sum L_t-1 {} vs {l_sum}",
                    img.nats.l_sum
                );
                assert!(close(img.nats.l_0, l_0), "{ctx}: L_0 {} vs {l_0}", img.nats.l_0);
                assert!(close(img.nats.total, l_t + l_sum + l_0), "{ctx}: total");
                // bits per dimension: nats / (D ln 2) with D = 4
                assert!(close(
                    img.bits_per_dim.total,
                    img.nats.total / (4.0 * std::f64::consts::LN_2)
                ));
                assert_eq!(img.per_step_nats.len(), 1000);
                assert_eq!(img.per_step_nats[0], img.nats.l_0);
            }
        }
    }
}

/// Image j of a batch draws its noise from stream first_index + j: its bound is the same when
/// it is evaluated alone (with a denoiser whose output depends on the noise).
#[test]
fn per_image_bound_does_not_depend_on_the_batch() {
    let s = Schedule::named("cosine", 50).unwrap();
    let (x0, _) = images();
    let config = |first_index| BoundConfig {
        seed: 9,
        first_index,
        ..BoundConfig::default()
    };
    let all = variational_bound(&Half, &s, &x0, &config(10), &mut |_| {}).unwrap();
    let one = variational_bound(&Half, &s, &x0.narrow(0, 1, 1).unwrap(), &config(11), &mut |_| {}).unwrap();
    assert_eq!(all.images[1], one.images[0]);
    assert_ne!(all.images[0].nats.l_sum, all.images[1].nats.l_sum);
    let other_seed = variational_bound(
        &Half,
        &s,
        &x0,
        &BoundConfig {
            seed: 8,
            ..config(10)
        },
        &mut |_| {},
    )
    .unwrap();
    assert_ne!(other_seed.images[1].nats.l_sum, all.images[1].nats.l_sum);
}

struct NanDenoiser;

impl Denoiser for NanDenoiser {
    fn prediction(&self) -> Prediction {
        Prediction::Eps
    }
    fn output(&self, x_t: &Tensor, _levels: &[NoiseLevel]) -> diffuse::Result<Tensor> {
        Ok(x_t.affine(f64::NAN, 0.0)?)
    }
}

#[test]
fn bad_data_and_diverged_denoisers_are_clear_errors() {
    let s = Schedule::named("linear", 10).unwrap();
    // 0.5 is not one of the levels 2k/255 - 1: the discretized decoder refuses it ...
    let x = Tensor::new(&[[0.5f32, 0.0]], &DEV).unwrap();
    let e = variational_bound(&Half, &s, &x, &BoundConfig::default(), &mut |_| {}).unwrap_err();
    assert!(
        e.is_user_error() && e.to_string().contains("8-bit data scaled to [-1, 1]"),
        "{e}"
    );
    // ... data in [0, 2] is out of range ...
    let x = Tensor::new(&[[2.0f64, 0.0]], &DEV).unwrap();
    assert!(variational_bound(&Half, &s, &x, &BoundConfig::default(), &mut |_| {}).is_err());
    // ... the continuous decoder accepts any data.
    let gauss = BoundConfig {
        decoder: Decoder::Gaussian,
        ..BoundConfig::default()
    };
    let x = Tensor::new(&[[0.5f32, 3.0]], &DEV).unwrap();
    assert!(variational_bound(&Half, &s, &x, &gauss, &mut |_| {}).is_ok());
    // a batch of scalars [B] works too; an empty batch is an error
    let v = Tensor::new(&[0.5f64, 3.0], &DEV).unwrap();
    assert_eq!(
        variational_bound(&Half, &s, &v, &gauss, &mut |_| {})
            .unwrap()
            .images
            .len(),
        2
    );
    let empty = Tensor::zeros((0, 3), DType::F64, &DEV).unwrap();
    assert!(variational_bound(&Half, &s, &empty, &gauss, &mut |_| {}).is_err());
    let e = variational_bound(&NanDenoiser, &s, &x, &gauss, &mut |_| {}).unwrap_err();
    // the first step (t = T = 10) already fails, naming the step and the image
    assert!(e.to_string().contains("t = 10 of image 0 is NaN"), "{e}");
}
