//! Nearest 2x upsampling followed by a 3x3 convolution (padding 1), computed on the small
//! image by sub-pixel phases, with its own backward (CPU, AVX-512: [`super::direct`]).
//!
//! With `up[2i + a, 2j + b] = x[i, j]`, output pixel `(2i + a, 2j + b)` of
//! `y = conv3x3(up(x)) + bias` reads, through kernel row `ky`, upsampled row `2i + a + ky - 1`,
//! which is row `i + dy` of `x` with `dy = floor((a + ky - 1) / 2)`: for `a = 0`, `ky = 0` gives
//! `dy = -1` and `ky = 1, 2` give `dy = 0`; for `a = 1`, `ky = 0, 1` give `dy = 0` and `ky = 2`
//! gives `dy = 1` (and the zero padding of `up(x)` is the zero padding of `x`). So each of the
//! four output phases `(a, b)` is a 2x2 convolution of `x` itself,
//!
//! ```text
//! y[co, 2i + a, 2j + b] = bias[co] + sum_{ci, dy in D_a, dx in D_b} w_ab[co, ci, dy, dx] x[ci, i + dy, j + dx]
//! w_ab[co, ci, dy, dx]  = sum_{ky in S_a(dy), kx in S_b(dx)} w[co, ci, ky, kx]
//! D_0 = {-1, 0}, S_0(-1) = {0}, S_0(0) = {1, 2};   D_1 = {0, 1}, S_1(0) = {0, 1}, S_1(1) = {2}
//! ```
//!
//! 16 multiply-adds per input pixel and channel pair instead of the 36 of convolving the
//! upsampled image (a 2.25x smaller convolution, same result up to rounding). Backward: the
//! output gradient is split into its four phases `dy_ab`; `dw_ab += dy_ab (x) x` (per phase)
//! folds back as `dw[ky, kx] = sum over the phases whose S sets hold ky and kx`;
//! `dx = sum_ab conv_ab^T(dy_ab)`; `dbias = sum_pixels dy`.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu::{self, Read, Scratch, SyncPtr};
use super::direct::{Direct, WeightGrad};

/// `D_a` (the row or column offsets of phase `a`) and, per offset, `S_a` (the kernel rows it sums).
fn phase_taps(a: usize) -> [(isize, &'static [usize]); 2] {
    if a == 0 {
        [(-1, &[0]), (0, &[1, 2])]
    } else {
        [(0, &[0, 1]), (1, &[2])]
    }
}

/// The four phases' kernels, forward and transposed; phase `(a, b)` is index `2 a + b`, its tap
/// `2 i + j` is `(D_a[i], D_b[j])`.
struct Phases {
    fwd: Vec<Direct>,
    bwd: Vec<Direct>,
}

impl Phases {
    fn new(h: usize, w: usize) -> Option<Self> {
        let mut fwd = Vec::with_capacity(4);
        for ab in 0..4 {
            let (ta, tb) = (phase_taps(ab / 2), phase_taps(ab % 2));
            let taps: Vec<(isize, isize)> = (0..4).map(|t| (ta[t / 2].0, tb[t % 2].0)).collect();
            fwd.push(Direct::with_taps(h, w, &taps)?);
        }
        let bwd = fwd.iter().map(Direct::transposed).collect();
        Some(Self { fwd, bwd })
    }
}

/// `w_ab [c_out, c_in, 4]` from `w [c_out, c_in, 3, 3]` for phase `ab`.
fn phase_weights(w: &[f32], c_out: usize, c_in: usize, ab: usize) -> Vec<f32> {
    let (ta, tb) = (phase_taps(ab / 2), phase_taps(ab % 2));
    let mut out = vec![0f32; c_out * c_in * 4];
    for (pair, o) in out.chunks_exact_mut(4).enumerate() {
        let k = &w[pair * 9..(pair + 1) * 9];
        for (t, v) in o.iter_mut().enumerate() {
            for &ky in ta[t / 2].1 {
                for &kx in tb[t % 2].1 {
                    *v += k[ky * 3 + kx];
                }
            }
        }
    }
    out
}

/// Adds `dw_ab [c_out, c_in, 4]` into `dw [c_out, c_in, 3, 3]` (the adjoint of [`phase_weights`]).
fn fold_weight_grad(dw_ab: &[f32], ab: usize, dw: &mut [f32]) {
    let (ta, tb) = (phase_taps(ab / 2), phase_taps(ab % 2));
    for (pair, g) in dw_ab.chunks_exact(4).enumerate() {
        let k = &mut dw[pair * 9..(pair + 1) * 9];
        for (t, &v) in g.iter().enumerate() {
            for &ky in ta[t / 2].1 {
                for &kx in tb[t % 2].1 {
                    k[ky * 3 + kx] += v;
                }
            }
        }
    }
}

/// The op `conv3x3(up2x(x), w) + b`.
struct UpConv;

/// `(n, c_in, h, w, c_out)` after checking the shapes.
fn dims(x: &[usize], w: &[usize], b: &[usize]) -> Result<(usize, usize, usize, usize, usize)> {
    match (x, w, b) {
        ([n, c_in, h, wd], [c_out, c_in_w, 3, 3], [c_b]) if c_in == c_in_w && c_b == c_out => {
            Ok((*n, *c_in, *h, *wd, *c_out))
        }
        _ => bail!("upsample_conv2d: expected x [N, C_in, H, W], w [C_out, C_in, 3, 3], b [C_out], got {x:?}, {w:?}, {b:?}"),
    }
}

impl CustomOp3 for UpConv {
    fn name(&self) -> &'static str {
        "fast-upsample-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _prof = super::profile::scope("upconv.fwd");
        let (n, c_in, h, wd, c_out) = dims(xl.dims(), wl.dims(), bl.dims())?;
        let (x, w, b) = (
            cpu::slice(xs, xl, "upsample_conv2d")?,
            cpu::slice(ws, wl, "upsample_conv2d")?,
            cpu::slice(bs, bl, "upsample_conv2d")?,
        );
        let Some(ph) = Phases::new(h, wd) else {
            bail!("upsample_conv2d: the fast kernel needs AVX-512")
        };
        let p = h * wd;
        // the network's FLOPs (a 3x3 convolution of the 2H x 2W image), not the 16 / 36 done here
        super::profile::add_flops("upconv.fwd", 2.0 * (n * c_out * c_in * 36 * p) as f64);
        let packed: Vec<Vec<f32>> = (0..4)
            .map(|ab| ph.fwd[ab].pack(&phase_weights(w, c_out, c_in, ab), c_out, c_in))
            .collect();
        let (x_len, y_len) = (c_in * p, c_out * 4 * p);
        let mut y = cpu::zeros(n * y_len);
        let out = SyncPtr::new(&mut y);
        cpu::for_batch(n, |images, _| {
            let mut phases = Scratch::new(4 * c_out * p);
            for i in images {
                let x_n = &x[i * x_len..(i + 1) * x_len];
                for ab in 0..4 {
                    let dst = &mut phases[ab * c_out * p..(ab + 1) * c_out * p];
                    ph.fwd[ab].conv(x_n, c_in, &packed[ab], b, None, dst, c_out);
                }
                // SAFETY: image i owns y[i * y_len ..][.. y_len]; ranges are disjoint.
                let y_n = unsafe { out.slice(i * y_len, y_len) };
                interleave(&phases, y_n, c_out, h, wd);
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((n, c_out, 2 * h, 2 * wd))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::scope("upconv.bwd");
        let (n, c_in, h, wd, c_out) = dims(x.dims(), w.dims(), b.dims())?;
        let Some(ph) = Phases::new(h, wd) else {
            bail!("upsample_conv2d: the fast kernel needs AVX-512")
        };
        let p = h * wd;
        let (want_x, want_w, want_b) = (x.track_op(), w.track_op(), b.track_op());
        let gemms = want_x as usize + want_w as usize;
        super::profile::add_flops("upconv.bwd", 2.0 * (gemms * n * c_out * c_in * 36 * p) as f64);
        let dy = dy.contiguous()?;
        let (xr, wr, dyr) = (
            Read::new(x, "upsample_conv2d")?,
            Read::new(w, "upsample_conv2d")?,
            Read::new(&dy, "upsample_conv2d")?,
        );
        let (xv, wv, dyv) = (xr.as_slice(), wr.as_slice(), dyr.as_slice());
        let packed: Vec<Vec<f32>> = if want_x {
            (0..4)
                .map(|ab| ph.fwd[ab].pack_transposed(&phase_weights(wv, c_out, c_in, ab), c_out, c_in))
                .collect()
        } else {
            Vec::new()
        };
        let (x_len, y_len) = (c_in * p, c_out * 4 * p);
        let mut dx = cpu::zeros(if want_x { n * x_len } else { 0 });
        let dx_out = SyncPtr::new(&mut dx);
        let zeros = vec![0f32; c_in];
        let partials = cpu::map_batch(n, |images, _| {
            let mut phases = Scratch::new(4 * c_out * p);
            let (mut acc_a, mut acc_b) = (Scratch::new(x_len), Scratch::new(x_len));
            let mut wgs: Vec<WeightGrad> = if want_w {
                ph.fwd.iter().map(|d| WeightGrad::new(d, c_out, c_in)).collect()
            } else {
                Vec::new()
            };
            let mut db = vec![0f32; c_out];
            for i in images {
                let dy_n = &dyv[i * y_len..(i + 1) * y_len];
                deinterleave(dy_n, &mut phases, c_out, h, wd);
                if want_b {
                    for (d, row) in db.iter_mut().zip(dy_n.chunks_exact(4 * p)) {
                        *d += cpu::sum_lanes(row) as f32;
                    }
                }
                let x_n = &xv[i * x_len..(i + 1) * x_len];
                for (ab, wg) in wgs.iter_mut().enumerate() {
                    wg.add_image(&phases[ab * c_out * p..(ab + 1) * c_out * p], x_n);
                }
                if want_x {
                    // SAFETY: image i owns dx[i * x_len ..][.. x_len]; ranges are disjoint.
                    let dx_n = unsafe { dx_out.slice(i * x_len, x_len) };
                    let dy_ab = |ab: usize| &phases[ab * c_out * p..(ab + 1) * c_out * p];
                    ph.bwd[0].conv(dy_ab(0), c_out, &packed[0], &zeros, None, &mut acc_a, c_in);
                    ph.bwd[1].conv(
                        dy_ab(1),
                        c_out,
                        &packed[1],
                        &zeros,
                        Some(&acc_a),
                        &mut acc_b,
                        c_in,
                    );
                    ph.bwd[2].conv(
                        dy_ab(2),
                        c_out,
                        &packed[2],
                        &zeros,
                        Some(&acc_b),
                        &mut acc_a,
                        c_in,
                    );
                    ph.bwd[3].conv(dy_ab(3), c_out, &packed[3], &zeros, Some(&acc_a), dx_n, c_in);
                }
            }
            let mut dw = vec![0f32; if want_w { c_out * c_in * 9 } else { 0 }];
            for (ab, wg) in wgs.into_iter().enumerate() {
                fold_weight_grad(&wg.finish(), ab, &mut dw);
            }
            (dw, db)
        });
        let mut partials = partials.into_iter();
        let (mut dw, mut db) = partials.next().unwrap_or_default();
        for (pw, pb) in partials {
            dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
        }
        Ok((
            want_x.then(|| cpu::tensor(dx, x.shape())).transpose()?,
            want_w.then(|| cpu::tensor(dw, w.shape())).transpose()?,
            want_b.then(|| cpu::tensor(db, b.shape())).transpose()?,
        ))
    }
}

/// `y [c, 2h, 2w]` from the phases `[4][c][h, w]`: `y[c, 2i + a, 2j + b] = phase_ab[c, i, j]`.
fn interleave(phases: &[f32], y: &mut [f32], c: usize, h: usize, w: usize) {
    let p = h * w;
    for ch in 0..c {
        for i in 0..h {
            for a in 0..2 {
                let row = &mut y[(ch * 2 * h + 2 * i + a) * 2 * w..][..2 * w];
                let s0 = &phases[((2 * a) * c + ch) * p + i * w..][..w];
                let s1 = &phases[((2 * a + 1) * c + ch) * p + i * w..][..w];
                for ((pair, &v0), &v1) in row.chunks_exact_mut(2).zip(s0).zip(s1) {
                    pair[0] = v0;
                    pair[1] = v1;
                }
            }
        }
    }
}

/// The adjoint split of [`interleave`]: `phase_ab[c, i, j] = dy[c, 2i + a, 2j + b]`.
fn deinterleave(dy: &[f32], phases: &mut [f32], c: usize, h: usize, w: usize) {
    let p = h * w;
    for ch in 0..c {
        for i in 0..h {
            for a in 0..2 {
                let row = &dy[(ch * 2 * h + 2 * i + a) * 2 * w..][..2 * w];
                for (j, pair) in row.chunks_exact(2).enumerate() {
                    phases[((2 * a) * c + ch) * p + i * w + j] = pair[0];
                    phases[((2 * a + 1) * c + ch) * p + i * w + j] = pair[1];
                }
            }
        }
    }
}

/// Whether the fast op runs on a CPU with these kernels (AVX-512).
pub fn applies(x: &Tensor) -> bool {
    match x.dims() {
        [_, _, h, w] => Phases::new(*h, *w).is_some(),
        _ => false,
    }
}

/// Fast `conv3x3(upsample_nearest2x(x), w) + b` (see [`crate::ops::upsample_conv2d`]).
pub fn upsample_conv2d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    dims(x.dims(), w.dims(), b.dims())?;
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, UpConv)
}
