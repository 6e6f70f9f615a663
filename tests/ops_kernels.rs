//! The fast CPU kernels (`diffuse::ops::{conv, norm, elementwise, resample, attention}`) against
//! candle's stock composition (`diffuse::ops::reference`): values and gradients.
//!
//! Gradients: every input is a `Var`; the loss is `sum(out * R)` with a fixed random `R`, so
//! `dloss/dout = R` exercises every output element with a different weight, and the gradients
//! of every input are compared.
//!
//! Tolerance: `|fast - ref| <= 1e-4 * (|ref| + rms(ref))` per element. Both sides are f32 and
//! sum the same terms in different orders (GEMM blocking, 16-lane reductions, a polynomial
//! `exp` within 1e-6 of libm), which moves results by a few ulp times sqrt(number of terms),
//! about 1e-6 relative at these sizes (the worst entry over all cases below is 1.1e-6, 1% of the
//! tolerance); the rms floor covers entries that cancel to near zero.
//! Any formula error (a wrong index, a dropped padding term, a missing Jacobian term) changes
//! entries by O(rms), 4 orders of magnitude above the tolerance. Checked by breaking the code:
//! scaling one term of the group-norm backward by 0.999, or halving the strided col2im adds,
//! fails three tests each.
//!
//! The functions are called directly, not through the process-wide switch, so tests running in
//! parallel cannot disturb each other.

use candle_core::{Device, Tensor, Var};
use diffuse::ops::{attention, block, conv, elementwise, norm, reference, resample};
use diffuse::ops::{ConvAdd, GroupNormSilu};
use diffuse::rng::Rng;

const TOL: f64 = 1e-4;

/// Runs `check` twice: with the kernels this CPU uses by default (the AVX-512 direct
/// convolutions where the CPU has them, else the staged and im2col + GEMM paths), then inside
/// `with_portable_kernels`, where every fused op built on the direct convolutions (ResNet
/// block, conv block, stride-2 and upsampling convolutions) takes its fused path on any CPU.
/// `check(true)` asserts that it did: the fused paths are tested on every machine, never
/// skipped because of the CPU.
fn on_every_kernel_set(check: impl Fn(bool)) {
    if !diffuse::ops::avx512_kernels() {
        eprintln!(
            "note: this CPU has no AVX-512 (or DIFFUSE_DIRECT_CONV=0): the AVX-512 kernels are not \
             tested here; the fused ops are tested with the portable kernels"
        );
    }
    check(false);
    diffuse::ops::with_portable_kernels(|| check(true));
}

/// Whether a fused op's `applies` answer is the one this kernel set must give: always with the
/// portable kernels, and exactly when the CPU has the AVX-512 kernels otherwise.
fn assert_fused_path(what: &str, applies: bool, portable: bool) {
    let expected = portable || diffuse::ops::avx512_kernels();
    assert_eq!(
        applies,
        expected,
        "{what}: the fused path {} (portable kernels: {portable}, AVX-512: {})",
        if applies { "ran" } else { "did not run" },
        diffuse::ops::avx512_kernels()
    );
}

fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    rng.randn(shape, &Device::Cpu).unwrap()
}

fn var(rng: &mut Rng, shape: &[usize]) -> Var {
    Var::from_tensor(&randn(rng, shape)).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Asserts `got` equals `want` (same shape, every element within the tolerance above).
fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (flat(got), flat(want));
    let rms = (w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / w.len().max(1) as f64).sqrt();
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        let err = (a as f64 - b as f64).abs();
        let bound = TOL * ((b as f64).abs() + rms) + 1e-30;
        assert!(
            err <= bound,
            "{what}: element {i}: fast {a}, reference {b}, |diff| {err:e} > {bound:e} (rms {rms:e})"
        );
    }
}

/// Compares `fast(inputs)` with `reference(inputs)`: values, then the gradient of
/// `sum(out * R)` with respect to every input.
fn check_op(
    what: &str,
    rng: &mut Rng,
    inputs: &[Var],
    fast: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) {
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let y_fast = fast(&ts).unwrap();
    let y_ref = reference(&ts).unwrap();
    assert_close(&format!("{what}: value"), &y_fast, &y_ref);
    let r = randn(rng, y_ref.dims());
    let g_fast = (&y_fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (&y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let want = g_ref.get(v).expect("reference gradient exists");
        let got = g_fast
            .get(v)
            .unwrap_or_else(|| panic!("{what}: no fast gradient for input {i}"));
        assert_close(&format!("{what}: gradient of input {i}"), got, want);
    }
}

#[test]
fn conv2d_matches_reference_values_and_gradients() {
    on_every_kernel_set(conv2d_matches_reference_values_and_gradients_with);
}

fn conv2d_matches_reference_values_and_gradients_with(_portable: bool) {
    let mut rng = Rng::new(1);
    // (n, c_in, h, w, c_out, kh, kw, stride, padding): batch 1 (GEMMs parallel inside) and
    // batch >= 2 (images split over threads), odd sizes, 1x1 and 3x3, padding 0/1/2, stride 1/2,
    // a non-square kernel, and a padding larger than the kernel reach.
    let cases = [
        (1, 3, 7, 5, 4, 3, 3, 1, 1),
        (3, 5, 9, 8, 6, 3, 3, 1, 1),
        (2, 4, 9, 7, 3, 3, 3, 2, 1),
        (2, 4, 8, 8, 5, 3, 3, 2, 0),
        (1, 2, 6, 6, 3, 3, 3, 1, 0),
        (4, 6, 5, 5, 7, 1, 1, 1, 0),
        (1, 6, 5, 5, 7, 1, 1, 1, 0),
        (3, 6, 7, 7, 4, 1, 1, 2, 0),
        (2, 3, 5, 5, 2, 1, 1, 1, 1),
        (2, 3, 6, 7, 4, 2, 3, 1, 1),
        (2, 2, 4, 3, 3, 3, 3, 1, 2),
        (5, 16, 6, 6, 16, 3, 3, 1, 1),
        // Stride 2, padding 1, even sizes: the phase-split path (`ops::strided`), also with a
        // batch larger than the thread split and a 2x2 image.
        (2, 4, 8, 6, 5, 3, 3, 2, 1),
        (11, 3, 4, 4, 2, 3, 3, 2, 1),
        (1, 2, 2, 2, 3, 3, 3, 2, 1),
        // Degenerate: a 1x1 image under a 3x3 kernel (whole kernel rows fall in the padding),
        // a 1-pixel-wide image, and a kernel as large as the padded image.
        (2, 3, 1, 1, 2, 3, 3, 1, 1),
        (2, 2, 5, 1, 3, 3, 3, 1, 1),
        (1, 2, 3, 3, 2, 5, 5, 1, 1),
    ];
    for (n, ci, h, w, co, kh, kw, stride, padding) in cases {
        let what = format!("conv2d n{n} c{ci}->{co} {h}x{w} k{kh}x{kw} s{stride} p{padding}");
        let inputs = [
            var(&mut rng, &[n, ci, h, w]),
            var(&mut rng, &[co, ci, kh, kw]),
            var(&mut rng, &[co]),
        ];
        check_op(
            &what,
            &mut rng,
            &inputs,
            |t| conv::conv2d(&t[0], &t[1], Some(&t[2]), stride, padding),
            |t| reference::conv2d(&t[0], &t[1], Some(&t[2]), stride, padding),
        );
        check_op(
            &format!("{what} no bias"),
            &mut rng,
            &inputs[..2],
            |t| conv::conv2d(&t[0], &t[1], None, stride, padding),
            |t| reference::conv2d(&t[0], &t[1], None, stride, padding),
        );
    }
}

/// `conv(x, w, stride s) = conv(x, w, stride 1)[:, :, ::s, ::s]`, built from candle's stride-1
/// convolution and `index_select`: an independent reference for strided convolutions.
fn conv2d_by_subsampling(t: &[Tensor], stride: usize, padding: usize) -> candle_core::Result<Tensor> {
    let y = reference::conv2d(&t[0], &t[1], Some(&t[2]), 1, padding)?;
    let pick = |len: usize| {
        let idx: Vec<u32> = (0..len as u32).step_by(stride).collect();
        Tensor::new(idx.as_slice(), &Device::Cpu)
    };
    let (h, w) = (y.dim(2)?, y.dim(3)?);
    y.index_select(&pick(h)?, 2)?.index_select(&pick(w)?, 3)
}

#[test]
fn conv2d_stride_2_with_height_and_width_of_different_parity() {
    on_every_kernel_set(conv2d_stride_2_with_height_and_width_of_different_parity_with);
}

fn conv2d_stride_2_with_height_and_width_of_different_parity_with(_portable: bool) {
    // candle 0.11's own conv2d backward fails here ("shape mismatch in add"): it derives the
    // transposed convolution's output padding from the height and uses it for the width too.
    // The reference is therefore a stride-1 convolution subsampled by index_select.
    let mut rng = Rng::new(12);
    for (n, ci, h, w, co, k, padding) in [(3, 6, 7, 6, 4, 1, 0), (2, 3, 8, 7, 5, 3, 1)] {
        let inputs = [
            var(&mut rng, &[n, ci, h, w]),
            var(&mut rng, &[co, ci, k, k]),
            var(&mut rng, &[co]),
        ];
        check_op(
            &format!("conv2d s2 {h}x{w} k{k} p{padding}"),
            &mut rng,
            &inputs,
            |t| conv::conv2d(&t[0], &t[1], Some(&t[2]), 2, padding),
            |t| conv2d_by_subsampling(t, 2, padding),
        );
    }
}

#[test]
fn conv2d_input_that_needs_no_gradient_gets_none_and_weights_stay_right() {
    on_every_kernel_set(conv2d_input_that_needs_no_gradient_gets_none_and_weights_stay_right_with);
}

fn conv2d_input_that_needs_no_gradient_gets_none_and_weights_stay_right_with(_portable: bool) {
    // The network's first convolution sees data, not a Var: only dW and db are computed.
    let mut rng = Rng::new(2);
    let x = randn(&mut rng, &[3, 2, 6, 5]);
    let (w, b) = (var(&mut rng, &[4, 2, 3, 3]), var(&mut rng, &[4]));
    let r = randn(&mut rng, &[3, 4, 6, 5]);
    let fast = conv::conv2d(&x, &w, Some(&b), 1, 1).unwrap();
    let refr = reference::conv2d(&x, &w, Some(&b), 1, 1).unwrap();
    let g_fast = (&fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (&refr * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g_fast.get(&x).is_none());
    assert_close("dW", g_fast.get(&w).unwrap(), g_ref.get(&w).unwrap());
    assert_close("db", g_fast.get(&b).unwrap(), g_ref.get(&b).unwrap());
}

#[test]
fn conv2d_exact_small_case() {
    // x = [[1, 2], [3, 4]], w = ones(3x3), padding 1, b = 10: each output is 10 plus the sum of
    // the input pixels in its 3x3 neighbourhood, which on a 2x2 image is all of them: 10 + 10.
    let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
    let w = Tensor::ones((1, 1, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::new(&[10f32], &Device::Cpu).unwrap();
    let y = conv::conv2d(&x, &w, Some(&b), 1, 1).unwrap();
    assert_eq!(flat(&y), vec![20.0; 4]);
    // Stride 2, no padding, 1x1 kernel of weight 2: picks pixel (0, 0) only: 2 * 1 + 10.
    let w1 = (Tensor::ones((1, 1, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap() * 2.0).unwrap();
    let y = conv::conv2d(&x, &w1, Some(&b), 2, 0).unwrap();
    assert_eq!(flat(&y), vec![12.0]);
}

#[test]
fn conv2d_bad_shapes_are_errors() {
    let mut rng = Rng::new(3);
    let x = randn(&mut rng, &[1, 3, 4, 4]);
    let w = randn(&mut rng, &[2, 4, 3, 3]);
    let err = conv::conv2d(&x, &w, None, 1, 1).unwrap_err().to_string();
    assert!(err.contains("x has 3 channels but w expects 4"), "{err}");
    let w = randn(&mut rng, &[2, 3, 5, 5]);
    let err = conv::conv2d(&x, &w, None, 1, 0).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
}

#[test]
fn group_norm_family_matches_reference() {
    let mut rng = Rng::new(4);
    // (n, c, h, w, groups): batch 1, one group, one channel per group, odd pixel counts
    // (tails of the 16-lane loops), and a group larger than 16 values.
    let cases = [
        (2, 6, 5, 3, 3),
        (1, 8, 4, 4, 1),
        (3, 4, 7, 7, 4),
        (2, 16, 3, 5, 8),
        (1, 4, 1, 3, 2),
    ];
    let eps = 1e-5;
    for (n, c, h, w, groups) in cases {
        let what = format!("n{n} c{c} {h}x{w} g{groups}");
        // x with a non-zero mean and a scale far from 1, so the normalisation matters.
        let x = Var::from_tensor(&((randn(&mut rng, &[n, c, h, w]) * 3.0).unwrap() + 2.0).unwrap()).unwrap();
        let gamma = Var::from_tensor(&(randn(&mut rng, &[c]) + 1.0).unwrap()).unwrap();
        let beta = var(&mut rng, &[c]);
        let inputs = [x.clone(), gamma.clone(), beta.clone()];
        check_op(
            &format!("group_norm {what}"),
            &mut rng,
            &inputs,
            |t| norm::group_norm(&t[0], groups, &t[1], &t[2], eps),
            |t| reference::group_norm(&t[0], groups, &t[1], &t[2], eps),
        );
        check_op(
            &format!("group_norm_silu {what}"),
            &mut rng,
            &inputs,
            |t| norm::group_norm_silu(&t[0], groups, &t[1], &t[2], eps),
            |t| reference::group_norm_silu(&t[0], groups, &t[1], &t[2], eps),
        );
        let inputs = [
            x,
            gamma,
            beta,
            Var::from_tensor(&(randn(&mut rng, &[n, c]) * 0.5).unwrap()).unwrap(),
            var(&mut rng, &[n, c]),
        ];
        check_op(
            &format!("group_norm_scale_shift_silu {what}"),
            &mut rng,
            &inputs,
            |t| norm::group_norm_scale_shift_silu(&t[0], groups, &t[1], &t[2], &t[3], &t[4], eps),
            |t| reference::group_norm_scale_shift_silu(&t[0], groups, &t[1], &t[2], &t[3], &t[4], eps),
        );
    }
}

#[test]
fn group_norm_exact_small_case() {
    // One group of x = [1, 2, 3, 4]: mean 2.5, var 1.25, xhat = (x - 2.5) / sqrt(1.25 + eps).
    // With eps = 0, gamma = 2, beta = 1: y = 2 * [-1.5, -0.5, 0.5, 1.5] / sqrt(1.25) + 1.
    let x = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 2, 2))
        .unwrap();
    let gamma = Tensor::new(&[2f32], &Device::Cpu).unwrap();
    let beta = Tensor::new(&[1f32], &Device::Cpu).unwrap();
    let y = flat(&norm::group_norm(&x, 1, &gamma, &beta, 0.0).unwrap());
    let s = 1.25f32.sqrt();
    let want = [-1.5f32, -0.5, 0.5, 1.5].map(|d| 2.0 * d / s + 1.0);
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
    }
}

#[test]
fn uneven_groups_are_rejected_clearly() {
    let mut rng = Rng::new(5);
    let x = randn(&mut rng, &[2, 6, 3, 3]);
    let (gamma, beta) = (randn(&mut rng, &[6]), randn(&mut rng, &[6]));
    let (scale, shift) = (randn(&mut rng, &[2, 6]), randn(&mut rng, &[2, 6]));
    for groups in [4, 0] {
        let errors = [
            norm::group_norm(&x, groups, &gamma, &beta, 1e-5).unwrap_err(),
            norm::group_norm_silu(&x, groups, &gamma, &beta, 1e-5).unwrap_err(),
            norm::group_norm_scale_shift_silu(&x, groups, &gamma, &beta, &scale, &shift, 1e-5).unwrap_err(),
            diffuse::ops::group_norm(&x, groups, &gamma, &beta, 1e-5).unwrap_err(),
        ];
        for e in errors {
            assert!(
                e.to_string()
                    .contains(&format!("6 channels cannot be split into {groups} groups evenly")),
                "{e}"
            );
        }
    }
}

#[test]
fn silu_matches_reference_over_a_wide_range() {
    let mut rng = Rng::new(6);
    // Scaled by 30 so the inputs reach |x| ~ 100, where exp over- and underflows; plus odd length.
    let x = Var::from_tensor(&(randn(&mut rng, &[3, 5, 7, 11]) * 30.0).unwrap()).unwrap();
    check_op(
        "silu",
        &mut rng,
        &[x],
        |t| elementwise::silu(&t[0]),
        |t| reference::silu(&t[0]),
    );
    let x = var(&mut rng, &[1, 1, 1, 1]);
    check_op(
        "silu 1",
        &mut rng,
        &[x],
        |t| elementwise::silu(&t[0]),
        |t| reference::silu(&t[0]),
    );
}

#[test]
fn silu_exact_values() {
    // silu(0) = 0; silu(x) = x / (1 + e^-x): silu(1) = 0.7310586, silu(-1) = -0.2689414;
    // silu(-100) underflows to ~0, silu(100) = 100.
    let x = Tensor::new(&[0f32, 1., -1., -100., 100.], &Device::Cpu).unwrap();
    let y = flat(&elementwise::silu(&x).unwrap());
    let want = [0.0f32, 0.731_058_6, -0.268_941_4, 0.0, 100.0];
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{y:?} vs {want:?}");
    }
}

#[test]
fn add_channel_bias_matches_reference() {
    let mut rng = Rng::new(7);
    for (n, c, h, w) in [(2, 3, 5, 7), (1, 4, 1, 1), (3, 2, 9, 9)] {
        let inputs = [var(&mut rng, &[n, c, h, w]), var(&mut rng, &[n, c])];
        check_op(
            &format!("add_channel_bias {n}x{c}x{h}x{w}"),
            &mut rng,
            &inputs,
            |t| elementwise::add_channel_bias(&t[0], &t[1]),
            |t| reference::add_channel_bias(&t[0], &t[1]),
        );
    }
}

#[test]
fn resampling_matches_reference() {
    let mut rng = Rng::new(8);
    for (n, c, h, w) in [(2, 3, 4, 6), (1, 1, 1, 1), (3, 2, 7, 5)] {
        let x = var(&mut rng, &[n, c, h, w]);
        check_op(
            &format!("upsample_nearest2x {n}x{c}x{h}x{w}"),
            &mut rng,
            &[x],
            |t| resample::upsample_nearest2x(&t[0]),
            |t| reference::upsample_nearest2x(&t[0]),
        );
    }
    for (n, c, h, w) in [(2, 3, 4, 6), (1, 2, 2, 2), (2, 2, 8, 10)] {
        let x = var(&mut rng, &[n, c, h, w]);
        check_op(
            &format!("avg_pool2x {n}x{c}x{h}x{w}"),
            &mut rng,
            &[x],
            |t| resample::avg_pool2x(&t[0]),
            |t| reference::avg_pool2x(&t[0]),
        );
    }
}

#[test]
fn avg_pool_of_odd_sizes_is_rejected() {
    // candle floors odd sizes but sends the gradient to the wrong pixels; both paths refuse.
    let x = Tensor::zeros((1, 2, 7, 6), candle_core::DType::F32, &Device::Cpu).unwrap();
    for e in [
        resample::avg_pool2x(&x).unwrap_err(),
        reference::avg_pool2x(&x).unwrap_err(),
    ] {
        assert!(
            e.to_string().contains("height 7 and width 6 must both be even"),
            "{e}"
        );
    }
}

#[test]
fn resampling_exact_values() {
    // [[1, 2], [3, 4]] pools to (1 + 2 + 3 + 4) / 4 = 2.5 and upsamples to each value in a 2x2 block.
    let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
    assert_eq!(flat(&resample::avg_pool2x(&x).unwrap()), vec![2.5]);
    assert_eq!(
        flat(&resample::upsample_nearest2x(&x).unwrap()),
        vec![1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.]
    );
}

#[test]
fn attention_matches_reference() {
    let mut rng = Rng::new(9);
    // (b, lq, lk, d, dv): batch 1 and several, Lq != Lk, D != Dv, and L = 49 (a 7x7 map).
    for (b, lq, lk, d, dv) in [(1, 5, 5, 4, 4), (3, 7, 4, 5, 3), (2, 49, 49, 16, 16)] {
        let inputs = [
            var(&mut rng, &[b, lq, d]),
            var(&mut rng, &[b, lk, d]),
            var(&mut rng, &[b, lk, dv]),
        ];
        let scale = 1.0 / (d as f64).sqrt();
        check_op(
            &format!("attention b{b} {lq}x{lk} d{d} dv{dv}"),
            &mut rng,
            &inputs,
            |t| attention::attention(&t[0], &t[1], &t[2], scale),
            |t| reference::attention(&t[0], &t[1], &t[2], scale),
        );
    }
}

#[test]
fn non_contiguous_inputs_are_handled() {
    // A transposed view feeds every kernel through `contiguous()`; gradients flow back through it.
    let mut rng = Rng::new(10);
    let base = var(&mut rng, &[2, 4, 6, 5]);
    let w = var(&mut rng, &[3, 4, 3, 3]);
    let (gamma, beta) = (var(&mut rng, &[4]), var(&mut rng, &[4]));
    let inputs = [base, w, gamma, beta];
    let net = |conv_fn: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
               gn: &dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
               t: &[Tensor]| {
        let x = t[0].transpose(2, 3)?; // [2, 4, 5, 6], strided
        let h = gn(&x, &t[2], &t[3])?;
        conv_fn(&h, &t[1])
    };
    check_op(
        "transposed input through group_norm_silu and conv2d",
        &mut rng,
        &inputs,
        |t| {
            net(
                &|x, w| conv::conv2d(x, w, None, 1, 1),
                &|x, g, b| norm::group_norm_silu(x, 2, g, b, 1e-5),
                t,
            )
        },
        |t| {
            net(
                &|x, w| reference::conv2d(x, w, None, 1, 1),
                &|x, g, b| reference::group_norm_silu(x, 2, g, b, 1e-5),
                t,
            )
        },
    );
}

#[test]
fn dispatch_uses_the_fast_path_on_the_cpu_and_agrees_with_it() {
    // With the switch on (the default, never turned off in this file), the public ops give the
    // fast kernels' results bit for bit.
    assert!(diffuse::ops::fast_kernels());
    let mut rng = Rng::new(11);
    let x = randn(&mut rng, &[2, 4, 5, 5]);
    let w = randn(&mut rng, &[3, 4, 3, 3]);
    let a = flat(&diffuse::ops::conv2d(&x, &w, None, 1, 1).unwrap());
    let b = flat(&conv::conv2d(&x, &w, None, 1, 1).unwrap());
    assert_eq!(a, b);
    let (g, be) = (randn(&mut rng, &[4]), randn(&mut rng, &[4]));
    let a = flat(&diffuse::ops::group_norm_silu(&x, 2, &g, &be, 1e-5).unwrap());
    let b = flat(&norm::group_norm_silu(&x, 2, &g, &be, 1e-5).unwrap());
    assert_eq!(a, b);
}

/// Runs the fused block (`fast`) or its reference composition on `t`, whose layout is
/// `[x, w, b, gamma, beta, scale, shift, channel_bias, residual]` minus the absent ones.
#[allow(clippy::too_many_arguments)]
fn block_op(
    fast: bool,
    t: &[Tensor],
    norm: Option<(usize, bool)>,
    bias: bool,
    channel_bias: bool,
    residual: bool,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let mut it = t.iter();
    let (x, w) = (it.next().unwrap(), it.next().unwrap());
    let b = if bias { it.next() } else { None };
    let nm = norm.map(|(groups, ss)| {
        let (gamma, beta) = (it.next().unwrap(), it.next().unwrap());
        let scale_shift = if ss {
            Some((it.next().unwrap(), it.next().unwrap()))
        } else {
            None
        };
        GroupNormSilu {
            groups,
            gamma,
            beta,
            eps: 1e-5,
            scale_shift,
        }
    });
    let add = ConvAdd {
        channel_bias: if channel_bias { it.next() } else { None },
        residual: if residual { it.next() } else { None },
    };
    match (&nm, fast) {
        (Some(nm), true) => block::conv_block(x, Some(nm), w, b, stride, padding, &add),
        (None, true) => block::conv_block(x, None, w, b, stride, padding, &add),
        (Some(nm), false) => reference::group_norm_silu_conv2d(x, nm, w, b, stride, padding, &add),
        (None, false) => reference::conv2d_add(x, w, b, stride, padding, &add),
    }
}

#[test]
fn fused_conv_block_matches_reference() {
    on_every_kernel_set(fused_conv_block_matches_reference_with);
}

fn fused_conv_block_matches_reference_with(_portable: bool) {
    let mut rng = Rng::new(13);
    // (n, c_in, hw, c_out, k, stride, padding, norm (groups, scale-shift), bias, channel bias, residual)
    let cases = [
        (3, 4, 6, 5, 3, 1, 1, Some((2, false)), true, true, true),
        (1, 4, 5, 4, 3, 1, 1, Some((4, true)), true, false, true),
        (2, 6, 7, 3, 3, 2, 1, Some((3, true)), false, true, false),
        (3, 8, 4, 6, 1, 1, 0, Some((2, false)), true, false, false),
        (2, 4, 5, 4, 1, 1, 0, None, true, true, true),
        (1, 3, 6, 2, 3, 2, 1, None, false, false, false),
        (5, 16, 5, 16, 3, 1, 1, Some((8, true)), true, true, true),
    ];
    for (n, ci, hw, co, k, stride, padding, norm, bias, cb, res) in cases {
        let ho = (hw + 2 * padding - k) / stride + 1;
        let mut shapes = vec![vec![n, ci, hw, hw], vec![co, ci, k, k]];
        if bias {
            shapes.push(vec![co]);
        }
        if let Some((_, ss)) = norm {
            shapes.extend([vec![ci], vec![ci]]);
            if ss {
                shapes.extend([vec![n, ci], vec![n, ci]]);
            }
        }
        if cb {
            shapes.push(vec![n, co]);
        }
        if res {
            shapes.push(vec![n, co, ho, ho]);
        }
        let inputs: Vec<Var> = shapes.iter().map(|s| var(&mut rng, s)).collect();
        let what = format!(
            "conv block n{n} {ci}->{co} {hw}x{hw} k{k} s{stride} p{padding} norm {norm:?} bias {bias} cb {cb} res {res}"
        );
        check_op(
            &what,
            &mut rng,
            &inputs,
            |t| block_op(true, t, norm, bias, cb, res, stride, padding),
            |t| block_op(false, t, norm, bias, cb, res, stride, padding),
        );
    }
}

#[test]
fn fused_conv_block_with_data_input_gives_parameter_gradients() {
    on_every_kernel_set(fused_conv_block_with_data_input_gives_parameter_gradients_with);
}

fn fused_conv_block_with_data_input_gives_parameter_gradients_with(_portable: bool) {
    // x is data (no gradient): the parameters' gradients still need dh = col2im(W^T dy) for
    // the group-norm part, computed into scratch.
    let mut rng = Rng::new(14);
    let x = randn(&mut rng, &[2, 4, 5, 5]);
    let params: Vec<Var> = [vec![3, 4, 3, 3], vec![3], vec![4], vec![4]]
        .iter()
        .map(|s| var(&mut rng, s))
        .collect();
    let r = randn(&mut rng, &[2, 3, 5, 5]);
    let run = |fast: bool| {
        let t: Vec<Tensor> = std::iter::once(x.clone())
            .chain(params.iter().map(|v| v.as_tensor().clone()))
            .collect();
        let y = block_op(fast, &t, Some((2, false)), true, false, false, 1, 1).unwrap();
        (&y * &r).unwrap().sum_all().unwrap().backward().unwrap()
    };
    let (gf, gr) = (run(true), run(false));
    assert!(gf.get(&x).is_none());
    for (i, p) in params.iter().enumerate() {
        assert_close(&format!("param {i}"), gf.get(p).unwrap(), gr.get(p).unwrap());
    }
}

#[test]
fn fused_conv_block_rejects_bad_shapes() {
    let mut rng = Rng::new(15);
    let x = randn(&mut rng, &[2, 6, 4, 4]);
    let w = randn(&mut rng, &[3, 6, 3, 3]);
    let (g, b) = (randn(&mut rng, &[6]), randn(&mut rng, &[6]));
    let nm = GroupNormSilu {
        groups: 4,
        gamma: &g,
        beta: &b,
        eps: 1e-5,
        scale_shift: None,
    };
    let e = block::conv_block(&x, Some(&nm), &w, None, 1, 1, &ConvAdd::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("6 channels cannot be split into 4 groups evenly"),
        "{e}"
    );
    let wrong = randn(&mut rng, &[2, 3, 3, 3]);
    let add = ConvAdd {
        channel_bias: None,
        residual: Some(&wrong),
    };
    let e = block::conv_block(&x, None, &w, None, 1, 1, &add).unwrap_err();
    assert!(
        e.to_string()
            .contains("residual has shape [2, 3, 3, 3], expected [2, 3, 4, 4]"),
        "{e}"
    );
}

/// A small network that uses every fast op (conv, fused block with scale-shift, channel bias
/// and residual, pooling, attention, upsampling, SiLU, group norm), built from the fast kernels
/// or from the reference composition.
fn tiny_net(fast: bool, p: &[Var], x: &Tensor) -> candle_core::Result<Tensor> {
    let t: Vec<&Tensor> = p.iter().map(|v| v.as_tensor()).collect();
    let n = x.dim(0)?;
    let conv = |x: &Tensor, w: &Tensor, b: &Tensor| {
        if fast {
            conv::conv2d(x, w, Some(b), 1, 1)
        } else {
            reference::conv2d(x, w, Some(b), 1, 1)
        }
    };
    let h = conv(x, t[0], t[1])?; // [N, 8, 8, 8]
    let nm1 = GroupNormSilu {
        groups: 4,
        gamma: t[2],
        beta: t[3],
        eps: 1e-5,
        scale_shift: Some((t[4], t[5])),
    };
    let add1 = ConvAdd {
        channel_bias: Some(t[8]),
        residual: None,
    };
    let nm2 = GroupNormSilu {
        groups: 2,
        gamma: t[9],
        beta: t[10],
        eps: 1e-5,
        scale_shift: None,
    };
    let (h1, h2);
    if fast {
        h1 = block::conv_block(&h, Some(&nm1), t[6], Some(t[7]), 1, 1, &add1)?;
        let add2 = ConvAdd {
            channel_bias: None,
            residual: Some(&h),
        };
        h2 = block::conv_block(&h1, Some(&nm2), t[11], Some(t[12]), 1, 1, &add2)?;
    } else {
        h1 = reference::group_norm_silu_conv2d(&h, &nm1, t[6], Some(t[7]), 1, 1, &add1)?;
        let add2 = ConvAdd {
            channel_bias: None,
            residual: Some(&h),
        };
        h2 = reference::group_norm_silu_conv2d(&h1, &nm2, t[11], Some(t[12]), 1, 1, &add2)?;
    }
    let pooled = if fast {
        resample::avg_pool2x(&h2)?
    } else {
        reference::avg_pool2x(&h2)?
    }; // [N, 8, 4, 4]
    let seq = pooled.reshape((n, 8, 16))?.transpose(1, 2)?.contiguous()?; // [N, 16, 8]
    let att = if fast {
        attention::attention(&seq, &seq, &seq, 0.35)?
    } else {
        reference::attention(&seq, &seq, &seq, 0.35)?
    };
    let back = att.transpose(1, 2)?.reshape((n, 8, 4, 4))?;
    let up = if fast {
        elementwise::silu(&resample::upsample_nearest2x(&back)?)?
    } else {
        reference::silu(&reference::upsample_nearest2x(&back)?)?
    };
    let up = (up + &h2)?;
    let up = if fast {
        norm::group_norm(&up, 2, t[13], t[14], 1e-5)?
    } else {
        reference::group_norm(&up, 2, t[13], t[14], 1e-5)?
    };
    conv(&up, t[15], t[16])
}

#[test]
fn sgd_training_follows_the_reference_loss_curve() {
    on_every_kernel_set(sgd_training_follows_the_reference_loss_curve_with);
}

fn sgd_training_follows_the_reference_loss_curve_with(_portable: bool) {
    // Same initial weights, same data, 15 plain SGD steps with each implementation: the losses
    // must agree step by step (they agree to ~1e-7; 1e-4 leaves room for rounding differences
    // to compound). This checks the ops compose inside candle's autodiff and optimizer (a
    // dropped, duplicated or misrouted gradient moves the curve by percents); small errors in
    // one gradient are the per-op tests' job: scaling attention's dK by 0.99 fails
    // `attention_matches_reference` but not this test.
    use candle_nn::Optimizer;
    let mut rng = Rng::new(16);
    let n = 3;
    let shapes: Vec<Vec<usize>> = vec![
        vec![8, 2, 3, 3],
        vec![8],
        vec![8],
        vec![8],
        vec![n, 8],
        vec![n, 8],
        vec![8, 8, 3, 3],
        vec![8],
        vec![n, 8],
        vec![8],
        vec![8],
        vec![8, 8, 3, 3],
        vec![8],
        vec![8],
        vec![8],
        vec![2, 8, 3, 3],
        vec![2],
    ];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|s| (randn(&mut rng, s) * 0.3).unwrap())
        .collect();
    let x = randn(&mut rng, &[n, 2, 8, 8]);
    let target = randn(&mut rng, &[n, 2, 8, 8]);
    let mut curves = Vec::new();
    for fast in [true, false] {
        let vars: Vec<Var> = init.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let mut opt = candle_nn::SGD::new(vars.clone(), 0.05).unwrap();
        let mut losses = Vec::new();
        for _ in 0..15 {
            let y = tiny_net(fast, &vars, &x).unwrap();
            let loss = (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            opt.backward_step(&loss).unwrap();
        }
        curves.push(losses);
    }
    let (fast, refr) = (&curves[0], &curves[1]);
    assert!(refr[14] < 0.9 * refr[0], "the net should learn: {refr:?}");
    for (i, (a, b)) in fast.iter().zip(refr).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "step {i}: fast loss {a}, reference loss {b}\nfast {fast:?}\nref  {refr:?}"
        );
    }
}

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn glibc_accepts_the_allocator_settings() {
    // mallopt returns 1 on success; a threshold above glibc's maximum would return 0.
    assert!(diffuse::ops::tune_allocator());
}

/// The whole ResNet block op (`ops::resnet::resnet_block`) against the reference composition,
/// over every option: a concatenated skip input, a shortcut convolution or the identity, time
/// conditioning by bias or scale-shift, a dropout mask, an output scale factor, odd sizes.
#[test]
fn fused_resnet_block_matches_reference() {
    on_every_kernel_set(fused_resnet_block_matches_reference_with);
}

fn fused_resnet_block_matches_reference_with(portable: bool) {
    use diffuse::ops::{resnet, ResnetBlockParams, TimeCondition};
    let mut rng = Rng::new(21);
    // (n, c_x, c_skip, c_out, h, w, groups, scale_shift, dropout, output_scale_factor); at least
    // two channels per group of norm2, else conv1's bias has an exactly zero gradient (a constant
    // added to a one-channel group is normalised away) and both sides compare rounding noise
    let cases = [
        (2, 8, 4, 4, 5, 7, 2, false, false, 1.0),
        (19, 4, 0, 4, 6, 6, 2, false, false, 1.0),
        (1, 6, 0, 4, 4, 9, 2, true, false, 2.0),
        (2, 4, 4, 8, 3, 3, 4, true, true, 1.0),
        (4, 8, 0, 8, 7, 7, 4, false, true, 1.0 / 1.5),
    ];
    for (n, cx, cs, co, h, w, groups, ss, drop, osf) in cases {
        let ci = cx + cs;
        let mut shapes = vec![vec![n, cx, h, w]];
        if cs > 0 {
            shapes.push(vec![n, cs, h, w]);
        }
        shapes.extend([vec![ci], vec![ci], vec![co, ci, 3, 3], vec![co]]);
        if ss {
            shapes.extend([vec![n, co], vec![n, co]]);
        } else {
            shapes.push(vec![n, co]);
        }
        shapes.extend([vec![co], vec![co], vec![co, co, 3, 3], vec![co]]);
        if ci != co {
            shapes.extend([vec![co, ci, 1, 1], vec![co]]);
        }
        let inputs: Vec<Var> = shapes.iter().map(|s| var(&mut rng, s)).collect();
        // keep-or-drop mask with entries 0 or 1 / (1 - 0.3)
        let mask = drop.then(|| diffuse::ops::DropoutMask::draw(n * co * h * w, 0.3, &mut rng));
        let run = |fast: bool, t: &[Tensor]| {
            let mut it = t.iter();
            let x = it.next().unwrap();
            let skip = if cs > 0 { it.next() } else { None };
            let (g1, b1, w1, bias1) = (
                it.next().unwrap(),
                it.next().unwrap(),
                it.next().unwrap(),
                it.next().unwrap(),
            );
            let time = if ss {
                TimeCondition::ScaleShift(it.next().unwrap(), it.next().unwrap())
            } else {
                TimeCondition::Bias(it.next().unwrap())
            };
            let (g2, b2, w2, bias2) = (
                it.next().unwrap(),
                it.next().unwrap(),
                it.next().unwrap(),
                it.next().unwrap(),
            );
            let shortcut = if ci != co {
                Some((it.next().unwrap(), it.next().unwrap()))
            } else {
                None
            };
            let p = ResnetBlockParams {
                groups,
                eps: 1e-5,
                norm1: (g1, b1),
                conv1: (w1, bias1),
                time,
                norm2: (g2, b2),
                conv2: (w2, bias2),
                shortcut,
                dropout_mask: mask.as_ref(),
                output_scale_factor: osf,
            };
            if !fast {
                return reference::resnet_block(x, skip, &p);
            }
            let fused = resnet::applies(x, &p);
            assert_fused_path("resnet block", fused, portable);
            if fused {
                resnet::resnet_block(x, skip, &p)
            } else {
                // the staged path, what the public op runs on this CPU
                diffuse::ops::resnet_block(x, skip, &p)
            }
        };
        let what =
            format!("resnet block n{n} {cx}+{cs}->{co} {h}x{w} g{groups} ss {ss} drop {drop} osf {osf}");
        check_op(&what, &mut rng, &inputs, |t| run(true, t), |t| run(false, t));
    }
}

/// Nearest 2x upsampling + 3x3 convolution by sub-pixel phases against upsampling then
/// convolving; odd and non-square sizes, one channel, a batch larger than the thread split.
#[test]
fn upsample_conv_matches_reference() {
    on_every_kernel_set(upsample_conv_matches_reference_with);
}

fn upsample_conv_matches_reference_with(portable: bool) {
    use diffuse::ops::upconv;
    let mut rng = Rng::new(22);
    for (n, ci, co, h, w) in [
        (2, 3, 5, 4, 4),
        (1, 1, 1, 3, 5),
        (11, 8, 16, 7, 7),
        (2, 17, 9, 1, 2),
    ] {
        let inputs: Vec<Var> = [vec![n, ci, h, w], vec![co, ci, 3, 3], vec![co]]
            .iter()
            .map(|s| var(&mut rng, s))
            .collect();
        let fast = |t: &[Tensor]| {
            assert_fused_path("upsample conv", upconv::applies(&t[0]), portable);
            if upconv::applies(&t[0]) {
                upconv::upsample_conv2d(&t[0], &t[1], &t[2])
            } else {
                diffuse::ops::upsample_conv2d(&t[0], &t[1], &t[2])
            }
        };
        check_op(
            &format!("upsample conv n{n} {ci}->{co} {h}x{w}"),
            &mut rng,
            &inputs,
            fast,
            |t| reference::upsample_conv2d(&t[0], &t[1], &t[2]),
        );
    }
}

/// The whole attention block op (`ops::attn_block`) against the reference composition: with
/// and without the group norm, one or several heads, fewer inner channels than channels, an
/// output rescale, odd sizes, a batch larger than the thread split.
#[test]
fn fused_attention_block_matches_reference() {
    use diffuse::ops::{attn_block, AttentionBlockParams};
    let mut rng = Rng::new(23);
    // (n, c, inner, heads, h, w, norm groups, rescale)
    let cases = [
        (2, 8, 8, 1, 3, 3, Some(4), 1.0),
        (11, 6, 4, 2, 2, 5, Some(3), 1.0),
        (3, 8, 8, 4, 4, 4, None, 2.0),
        (1, 4, 4, 1, 1, 1, Some(2), 1.0),
    ];
    for (n, c, inner, heads, h, w, groups, rescale) in cases {
        let mut shapes = vec![vec![n, c, h, w]];
        if groups.is_some() {
            shapes.extend([vec![c], vec![c]]);
        }
        // the key bias is a constant: its exact gradient is 0 (it adds q . b_k to a whole row
        // of scores, which the softmax ignores), so both sides would compare rounding noise
        shapes.extend([
            vec![inner, c],
            vec![inner],
            vec![inner, c],
            vec![inner, c],
            vec![inner],
        ]);
        shapes.extend([vec![c, inner], vec![c]]);
        let inputs: Vec<Var> = shapes.iter().map(|s| var(&mut rng, s)).collect();
        let key_bias = randn(&mut rng, &[inner]);
        let run = |fast: bool, t: &[Tensor]| {
            let mut it = t.iter();
            let x = it.next().unwrap();
            let norm = groups.map(|g| (g, 1e-5, it.next().unwrap(), it.next().unwrap()));
            let mut pair = || (it.next().unwrap(), it.next().unwrap());
            let q = pair();
            let k = (it.next().unwrap(), &key_bias);
            let mut pair = || (it.next().unwrap(), it.next().unwrap());
            let (v, out) = (pair(), pair());
            let p = AttentionBlockParams {
                norm,
                q,
                k,
                v,
                out,
                heads,
                rescale_output_factor: rescale,
            };
            if fast {
                attn_block::attention_block(x, &p)
            } else {
                reference::attention_block(x, &p)
            }
        };
        let what = format!(
            "attention block n{n} c{c} inner{inner} heads{heads} {h}x{w} norm {groups:?} rescale {rescale}"
        );
        check_op(&what, &mut rng, &inputs, |t| run(true, t), |t| run(false, t));
    }
}
