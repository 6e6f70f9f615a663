//! Stride-2 3x3 convolutions with padding 1 (the U-Net's downsampling) on the direct kernels of
//! [`super::direct`], by splitting the input into its four pixel phases.
//!
//! With `x_ab[ci, i, j] = x[ci, 2i + a, 2j + b]` (`H`, `W` even), output pixel `(i, j)` reads,
//! through kernel row `ky`, input row `2i + ky - 1 = 2(i + dy) + a` with `a = (ky - 1) mod 2`,
//! `dy = floor((ky - 1) / 2)`: `ky = 0` is phase 1 at `dy = -1`, `ky = 1` phase 0 at `dy = 0`,
//! `ky = 2` phase 1 at `dy = 0` (likewise for columns), and the zero padding of `x` is the
//! zero padding of the phases. So the convolution is a stride-1 convolution of the four phases
//! stacked as `4 C_in` channels (`x'[(2a + b) C_in + ci] = x_ab[ci]`) on the `H/2 x W/2` grid
//! with the four taps `(dy, dx) in {-1, 0}^2`, whose weights `w'[co, (2a + b) C_in + ci, t]` are
//! `w[co, ci, ky, kx]` for the `(ky, kx)` that maps to phase `(a, b)` and tap `t`, and 0 for the
//! 7 of 16 combinations no kernel entry maps to (16 multiply-adds per output pixel and channel
//! pair instead of 9, at the direct kernels' speed). The gradients follow: `dx` is the transposed
//! convolution of `dy` merged back from the phases, `dw` is read off the phase weights' gradient.

use super::conv::Geometry;
use super::direct::{Direct, WeightGrad};

/// `(phase bit, offset)` of kernel row or column `k` (0, 1, 2).
fn phase_of(k: usize) -> (usize, isize) {
    let s = k as isize - 1;
    (s.rem_euclid(2) as usize, s.div_euclid(2))
}

/// Tap index of offsets `(dy, dx)` in `{-1, 0}^2`.
fn tap(dy: isize, dx: isize) -> usize {
    ((dy + 1) * 2 + (dx + 1)) as usize
}

/// The phase-split convolution of one geometry.
pub(crate) struct Stride2 {
    d: Direct,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
}

impl Stride2 {
    /// When it applies: stride 2, a 3x3 kernel, padding 1, even height and width, AVX-512.
    pub(crate) fn new(g: &Geometry) -> Option<Self> {
        if g.stride != 2 || g.kh != 3 || g.kw != 3 || g.padding != 1 || g.h % 2 != 0 || g.w % 2 != 0 {
            return None;
        }
        let taps = [(-1, -1), (-1, 0), (0, -1), (0, 0)];
        Some(Self {
            d: Direct::with_taps(g.h / 2, g.w / 2, &taps)?,
            c_in: g.c_in,
            c_out: g.c_out,
            h: g.h,
            w: g.w,
        })
    }

    /// Pixels of one phase (= of the output).
    fn q(&self) -> usize {
        (self.h / 2) * (self.w / 2)
    }

    /// `w' [c_out, 4 c_in, 4]` from `w [c_out, c_in, 3, 3]`.
    fn expand(&self, w: &[f32]) -> Vec<f32> {
        let (c_in, c_out) = (self.c_in, self.c_out);
        let mut out = vec![0f32; c_out * 4 * c_in * 4];
        for co in 0..c_out {
            for ci in 0..c_in {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let ((a, dy), (b, dx)) = (phase_of(ky), phase_of(kx));
                        let ch = (2 * a + b) * c_in + ci;
                        out[(co * 4 * c_in + ch) * 4 + tap(dy, dx)] = w[((co * c_in + ci) * 3 + ky) * 3 + kx];
                    }
                }
            }
        }
        out
    }

    /// `dw [c_out, c_in, 3, 3]` from the gradient of the expanded weights.
    fn fold(&self, dw4: &[f32]) -> Vec<f32> {
        let (c_in, c_out) = (self.c_in, self.c_out);
        let mut out = vec![0f32; c_out * c_in * 9];
        for co in 0..c_out {
            for ci in 0..c_in {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let ((a, dy), (b, dx)) = (phase_of(ky), phase_of(kx));
                        let ch = (2 * a + b) * c_in + ci;
                        out[((co * c_in + ci) * 3 + ky) * 3 + kx] =
                            dw4[(co * 4 * c_in + ch) * 4 + tap(dy, dx)];
                    }
                }
            }
        }
        out
    }

    /// `x' [4 c, H/2 W/2]` from one image `x [c, H, W]`.
    fn split(&self, x: &[f32], c: usize, out: &mut [f32]) {
        let (w, w2, q) = (self.w, self.w / 2, self.q());
        for ci in 0..c {
            let plane = &x[ci * self.h * w..(ci + 1) * self.h * w];
            for (i, rows) in plane.chunks_exact(2 * w).enumerate() {
                for a in 0..2 {
                    let row = &rows[a * w..(a + 1) * w];
                    let (p0, p1) = ((2 * a) * c + ci, (2 * a + 1) * c + ci);
                    for (j, pair) in row.chunks_exact(2).enumerate() {
                        out[p0 * q + i * w2 + j] = pair[0];
                        out[p1 * q + i * w2 + j] = pair[1];
                    }
                }
            }
        }
    }

    /// The adjoint of [`Stride2::split`]: one image `dx [c, H, W]` from `dx' [4 c, H/2 W/2]`.
    fn merge(&self, dxp: &[f32], c: usize, dx: &mut [f32]) {
        let (w, w2, q) = (self.w, self.w / 2, self.q());
        for ci in 0..c {
            let plane = &mut dx[ci * self.h * w..(ci + 1) * self.h * w];
            for (i, rows) in plane.chunks_exact_mut(2 * w).enumerate() {
                for a in 0..2 {
                    let row = &mut rows[a * w..(a + 1) * w];
                    let (p0, p1) = ((2 * a) * c + ci, (2 * a + 1) * c + ci);
                    for (j, pair) in row.chunks_exact_mut(2).enumerate() {
                        pair[0] = dxp[p0 * q + i * w2 + j];
                        pair[1] = dxp[p1 * q + i * w2 + j];
                    }
                }
            }
        }
    }
}

/// Packed forward weights for [`Stride2::conv`].
pub(crate) struct Forward {
    wp: Vec<f32>,
}

impl Stride2 {
    pub(crate) fn pack(&self, w: &[f32]) -> Forward {
        Forward {
            wp: self.d.pack(&self.expand(w), self.c_out, 4 * self.c_in),
        }
    }

    /// One image: `y [c_out, H/2 W/2] = conv(x [c_in, H, W]) + bias`, with `scratch` of
    /// `4 c_in H/2 W/2` values.
    pub(crate) fn conv(&self, f: &Forward, x: &[f32], bias: &[f32], y: &mut [f32], scratch: &mut [f32]) {
        self.split(x, self.c_in, scratch);
        self.d
            .conv(scratch, 4 * self.c_in, &f.wp, bias, None, y, self.c_out);
    }

    /// Packed transposed weights and kernels for [`Stride2::input_grad`].
    pub(crate) fn pack_transposed(&self, w: &[f32]) -> (Direct, Vec<f32>) {
        (
            self.d.transposed(),
            self.d.pack_transposed(&self.expand(w), self.c_out, 4 * self.c_in),
        )
    }

    /// One image: `dx [c_in, H, W]` from `dy [c_out, H/2 W/2]`, with `scratch` as in `conv`.
    pub(crate) fn input_grad(
        &self,
        t: &(Direct, Vec<f32>),
        dy: &[f32],
        dx: &mut [f32],
        scratch: &mut [f32],
        zeros: &[f32],
    ) {
        t.0.conv(dy, self.c_out, &t.1, zeros, None, scratch, 4 * self.c_in);
        self.merge(scratch, self.c_in, dx);
    }

    /// A weight-gradient accumulator over images (see [`Stride2::add_weight_grad`]).
    pub(crate) fn weight_grad(&self) -> WeightGrad<'_> {
        WeightGrad::new(&self.d, self.c_out, 4 * self.c_in)
    }

    /// Adds one image to `wg`: `dy [c_out, H/2 W/2]`, `x [c_in, H, W]`.
    pub(crate) fn add_weight_grad(
        &self,
        wg: &mut WeightGrad<'_>,
        dy: &[f32],
        x: &[f32],
        scratch: &mut [f32],
    ) {
        self.split(x, self.c_in, scratch);
        wg.add_image(dy, scratch);
    }

    /// `dw [c_out, c_in, 3, 3]` from an accumulator.
    pub(crate) fn finish_weight_grad(&self, wg: WeightGrad<'_>) -> Vec<f32> {
        self.fold(&wg.finish())
    }

    /// Scratch values per image.
    pub(crate) fn scratch_len(&self) -> usize {
        4 * self.c_in * self.q()
    }
}
