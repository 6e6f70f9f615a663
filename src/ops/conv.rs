//! Fast CPU 2-D convolution: im2col + GEMM per image, bias fused, with its own backward.
//!
//! For image `n`, with `K = C_in * kh * kw` and `P = H_out * W_out`:
//! - `col_n [K, P]` holds the input patches (im2col; zero padding written as zeros), so
//!   `y_n = W col_n + b 1^T`, `W` viewed as `[C_out, K]` (one GEMM).
//! - Backward, given `dy_n [C_out, P]`:
//!   `dW += dy_n col_n^T` (GEMM, accumulated over the batch),
//!   `db += dy_n 1` (row sums),
//!   `dx_n = col2im(W^T dy_n)` (GEMM, then each patch entry added back to the pixel it came from).
//!
//! A 1x1 convolution with stride 1 and no padding skips im2col: `col_n` is `x_n` itself.
//! Images are split in contiguous ranges (`cpu::for_batch`), each with one scratch `col` buffer
//! of `K * P` floats (never the whole batch's); the weight gradient is accumulated per range and
//! the ranges' sums added in a fixed order, so results do not depend on scheduling.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu::{self, Read, Scratch, SyncPtr};
use super::direct::{Direct, WeightGrad};
use super::strided::Stride2;

/// Geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub h_out: usize,
    pub w_out: usize,
}

impl Geometry {
    /// Checks the shapes of `x` `[N, C_in, H, W]` and `w` `[C_out, C_in, kh, kw]`;
    /// `H_out = (H + 2 padding - kh) / stride + 1` (floor), likewise `W_out`.
    pub(crate) fn new(x: &[usize], w: &[usize], stride: usize, padding: usize) -> Result<Self> {
        let (&[n, c_in, h, wd], &[c_out, c_in_w, kh, kw]) = (x, w) else {
            bail!("conv2d: expected x [N, C_in, H, W] and w [C_out, C_in, kh, kw], got {x:?} and {w:?}")
        };
        if c_in != c_in_w {
            bail!("conv2d: x has {c_in} channels but w expects {c_in_w} (x {x:?}, w {w:?})");
        }
        if stride == 0 {
            bail!("conv2d: stride must be at least 1");
        }
        if kh == 0 || kw == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
            bail!("conv2d: kernel {kh}x{kw} does not fit the padded input {h}x{wd} (padding {padding})");
        }
        Ok(Self {
            n,
            c_in,
            h,
            w: wd,
            c_out,
            kh,
            kw,
            stride,
            padding,
            h_out: (h + 2 * padding - kh) / stride + 1,
            w_out: (wd + 2 * padding - kw) / stride + 1,
        })
    }

    /// Rows of the im2col matrix: `C_in * kh * kw`.
    pub(crate) fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Output pixels per channel: `H_out * W_out`.
    pub(crate) fn p(&self) -> usize {
        self.h_out * self.w_out
    }

    /// A 1x1, stride 1, unpadded convolution: the input already is the im2col matrix.
    pub(crate) fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// Stride 1 and `W_out = W` (e.g. a 3x3 kernel with padding 1): each kernel tap's im2col row
    /// is one shifted copy of the input plane.
    fn same_width(&self) -> bool {
        self.stride == 1 && self.w_out == self.w
    }

    /// For kernel column `kx`, the output columns whose input column `ox * stride + kx - padding`
    /// lies inside `[0, W)`, as a half-open range `lo..hi`.
    fn valid_cols(&self, kx: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = if kx < self.padding {
            (self.padding - kx).div_ceil(s)
        } else {
            0
        };
        let hi = if self.w + self.padding > kx {
            (self.w - 1 + self.padding - kx) / s + 1
        } else {
            0
        };
        let hi = hi.min(self.w_out);
        (lo.min(hi), hi)
    }

    /// The input row of output row `oy` and kernel row `ky`, if inside the image.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.padding)
            .filter(|&iy| iy < self.h)
    }
}

/// Writes image `x_n` `[C_in, H, W]` as the patch matrix `col [K, P]`: row
/// `(ci * kh + ky) * kw + kx`, column `oy * W_out + ox` holds
/// `x_n[ci, oy * stride + ky - padding, ox * stride + kx - padding]`, or 0 outside the image.
pub(crate) fn im2col(g: &Geometry, x_n: &[f32], col: &mut [f32]) {
    let (p, wo) = (g.p(), g.w_out);
    for ci in 0..g.c_in {
        let plane = &x_n[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let r = (ci * g.kh + ky) * g.kw + kx;
                let row = &mut col[r * p..(r + 1) * p];
                if g.same_width() {
                    im2col_shifted(g, plane, row, ky, kx);
                    continue;
                }
                let (lo, hi) = g.valid_cols(kx);
                for oy in 0..g.h_out {
                    let dst = &mut row[oy * wo..(oy + 1) * wo];
                    let Some(iy) = g.input_row(oy, ky) else {
                        dst.fill(0.0);
                        continue;
                    };
                    let src = &plane[iy * g.w..(iy + 1) * g.w];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if g.stride == 1 {
                        let ix = lo + kx - g.padding;
                        dst[lo..hi].copy_from_slice(&src[ix..ix + (hi - lo)]);
                    } else {
                        for (ox, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                            *d = src[ox * g.stride + kx - g.padding];
                        }
                    }
                }
            }
        }
    }
}

/// The rows of output row block `oy0..oy1` whose input rows lie inside the image, and the
/// offset (in the input plane, possibly negative) of the block's first element, for kernel
/// tap `(ky, kx)` of a stride-1 convolution with `W_out = W`: output element `j` of the block
/// reads plane element `offset + j` (its columns `ox < lo` or `ox >= hi` wrap around to the
/// neighbouring row and must be treated as padding).
fn shifted_block(g: &Geometry, ky: usize, kx: usize) -> (usize, usize, isize) {
    let oy0 = g.padding.saturating_sub(ky).min(g.h_out);
    let oy1 = (g.h + g.padding).saturating_sub(ky).min(g.h_out).max(oy0);
    let iy0 = (oy0 + ky) as isize - g.padding as isize;
    let offset = iy0 * g.w as isize + kx as isize - g.padding as isize;
    (oy0, oy1, offset)
}

/// The part `lo..hi` of a block of `len` elements starting at plane offset `offset` that lies
/// inside a plane of `plane_len` elements.
fn inside(offset: isize, len: usize, plane_len: usize) -> (usize, usize) {
    let lo = (-offset).clamp(0, len as isize) as usize;
    let hi = (plane_len as isize - offset).clamp(lo as isize, len as isize) as usize;
    (lo, hi)
}

/// [`im2col`] for one kernel tap of a stride-1 convolution with `W_out = W`: the valid output
/// rows form one contiguous shifted copy of the plane (one copy instead of one per row), after
/// which the wrapped-around edge columns are set to the padding value 0.
fn im2col_shifted(g: &Geometry, plane: &[f32], row: &mut [f32], ky: usize, kx: usize) {
    let w = g.w;
    let (oy0, oy1, offset) = shifted_block(g, ky, kx);
    row[..oy0 * w].fill(0.0);
    row[oy1 * w..].fill(0.0);
    let block = &mut row[oy0 * w..oy1 * w];
    let (lo, hi) = inside(offset, block.len(), plane.len());
    block[..lo].fill(0.0);
    block[hi..].fill(0.0);
    if hi > lo {
        // offset + lo >= 0 by construction of `inside`.
        let src = (offset + lo as isize) as usize;
        block[lo..hi].copy_from_slice(&plane[src..src + (hi - lo)]);
    }
    zero_edge_columns(block, w, g.valid_cols(kx));
}

/// Sets columns `ox < lo` and `ox >= hi` of each `w`-wide row of `block` to 0, column by
/// column (a handful of strided stores, instead of a tiny `memset` call per row).
fn zero_edge_columns(block: &mut [f32], w: usize, (lo, hi): (usize, usize)) {
    let rows = block.len() / w.max(1);
    for c in (0..lo).chain(hi..w) {
        for r in 0..rows {
            block[r * w + c] = 0.0;
        }
    }
}

/// The adjoint of [`im2col`]: adds every entry of `col [K, P]` to the input pixel it was read
/// from (entries that came from the zero padding are dropped). `dx_n` must start at zero.
/// `col` is scratch: entries that correspond to padding may be overwritten with zeros.
pub(crate) fn col2im(g: &Geometry, col: &mut [f32], dx_n: &mut [f32]) {
    let (p, wo) = (g.p(), g.w_out);
    for ci in 0..g.c_in {
        let plane = &mut dx_n[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let r = (ci * g.kh + ky) * g.kw + kx;
                let row = &mut col[r * p..(r + 1) * p];
                if g.same_width() {
                    col2im_shifted(g, row, plane, ky, kx);
                    continue;
                }
                let (lo, hi) = g.valid_cols(kx);
                for oy in 0..g.h_out {
                    let Some(iy) = g.input_row(oy, ky) else {
                        continue;
                    };
                    let src = &row[oy * wo..(oy + 1) * wo];
                    let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
                    if g.stride == 1 {
                        let ix = lo + kx - g.padding;
                        add_assign(&mut dst[ix..ix + (hi - lo)], &src[lo..hi]);
                    } else {
                        for (ox, s) in src.iter().enumerate().take(hi).skip(lo) {
                            dst[ox * g.stride + kx - g.padding] += s;
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col_shifted`]: zero the block's wrapped-around edge columns (they
/// belong to the padding), then add the block to the plane in one shifted pass.
fn col2im_shifted(g: &Geometry, row: &mut [f32], plane: &mut [f32], ky: usize, kx: usize) {
    let w = g.w;
    let (oy0, oy1, offset) = shifted_block(g, ky, kx);
    let block = &mut row[oy0 * w..oy1 * w];
    zero_edge_columns(block, w, g.valid_cols(kx));
    let (lo, hi) = inside(offset, block.len(), plane.len());
    if hi > lo {
        // offset + lo >= 0 by construction of `inside`.
        let dst = (offset + lo as isize) as usize;
        add_assign(&mut plane[dst..dst + (hi - lo)], &block[lo..hi]);
    }
}

cpu::simd_fn! {
    /// `dst += src`, element-wise.
    fn add_assign(dst: &mut [f32], src: &[f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

/// The fused op: `conv(x, w) + b`, as a candle custom op with its own backward.
struct Conv2d {
    stride: usize,
    padding: usize,
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "fast-conv2d"
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
        let _prof = super::profile::scope("conv2d.fwd");
        let g = Geometry::new(xl.dims(), wl.dims(), self.stride, self.padding)?;
        if bl.dims() != [g.c_out] {
            bail!("conv2d: bias has shape {:?}, expected [{}]", bl.dims(), g.c_out);
        }
        let x = cpu::slice(xs, xl, "conv2d")?;
        let w = cpu::slice(ws, wl, "conv2d")?;
        let b = cpu::slice(bs, bl, "conv2d")?;
        let y = forward(&g, x, w, b);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.c_out, g.h_out, g.w_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::scope("conv2d.bwd");
        let g = Geometry::new(x.dims(), w.dims(), self.stride, self.padding)?;
        let dy = dy.contiguous()?;
        let want = Grads {
            x: x.track_op(),
            w: w.track_op(),
            b: b.track_op(),
        };
        let (dx, dw, db) = {
            let (xr, wr, dyr) = (
                Read::new(x, "conv2d")?,
                Read::new(w, "conv2d")?,
                Read::new(&dy, "conv2d")?,
            );
            backward(&g, xr.as_slice(), wr.as_slice(), dyr.as_slice(), want)
        };
        let dx = dx.map(|v| cpu::tensor(v, x.shape())).transpose()?;
        let dw = dw.map(|v| cpu::tensor(v, w.shape())).transpose()?;
        let db = db.map(|v| cpu::tensor(v, b.shape())).transpose()?;
        Ok((dx, dw, db))
    }
}

/// A gradient, when asked for.
type Grad = Option<Vec<f32>>;

/// Which gradients the backward pass computes.
#[derive(Clone, Copy)]
struct Grads {
    x: bool,
    w: bool,
    b: bool,
}

/// `y [N, C_out, P]`: per image, `y_n = W col_n + b`. With im2col the bias rides in the GEMM
/// as one more column of `W` against a row of ones under `col_n` (`[W | b] [col_n; 1]`), so the
/// output is written once; a pointwise convolution (no im2col buffer) starts from the bias.
fn forward(g: &Geometry, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let (k, p) = (g.k(), g.p());
    super::profile::add_flops("conv2d.fwd", 2.0 * (g.n * g.c_out * k * p) as f64);
    let (x_len, y_len) = (g.c_in * g.h * g.w, g.c_out * p);
    let mut y = cpu::zeros(g.n * y_len);
    if let Some(s2) = Stride2::new(g) {
        let f = s2.pack(w);
        let out = SyncPtr::new(&mut y);
        cpu::for_batch(g.n, |images, _| {
            let mut scratch = Scratch::new(s2.scratch_len());
            for n in images {
                // SAFETY: image n owns y[n * y_len .. (n + 1) * y_len]; ranges are disjoint.
                let y_n = unsafe { out.slice(n * y_len, y_len) };
                s2.conv(&f, &x[n * x_len..(n + 1) * x_len], b, y_n, &mut scratch);
            }
        });
        return y;
    }
    if let Some(d) = Direct::new(g) {
        let wp = d.pack(w, g.c_out, g.c_in);
        let out = SyncPtr::new(&mut y);
        cpu::for_batch(g.n, |images, _| {
            for n in images {
                // SAFETY: image n owns y[n * y_len .. (n + 1) * y_len]; ranges are disjoint.
                let y_n = unsafe { out.slice(n * y_len, y_len) };
                d.conv(&x[n * x_len..(n + 1) * x_len], g.c_in, &wp, b, None, y_n, g.c_out);
            }
        });
        return y;
    }
    let pointwise = g.pointwise();
    // [W | b]: C_out rows of K + 1.
    let w_ext: Vec<f32> = if pointwise {
        Vec::new()
    } else {
        w.chunks_exact(k.max(1))
            .zip(b)
            .flat_map(|(row, &bias)| row.iter().copied().chain(std::iter::once(bias)))
            .collect()
    };
    let image = |n: usize, y_n: &mut [f32], col: &mut [f32], parallel: bool| {
        let x_n = &x[n * x_len..(n + 1) * x_len];
        if pointwise {
            for (row, &bias) in y_n.chunks_exact_mut(p).zip(b) {
                row.fill(bias);
            }
            cpu::gemm((g.c_out, p, k), y_n, true, w, (k, 1), x_n, (p, 1), 1.0, parallel);
        } else {
            let (patches, ones) = col.split_at_mut(k * p);
            im2col(g, x_n, patches);
            ones.fill(1.0);
            cpu::gemm(
                (g.c_out, p, k + 1),
                y_n,
                false,
                &w_ext,
                (k + 1, 1),
                col,
                (p, 1),
                1.0,
                parallel,
            );
        }
    };
    let col_len = if pointwise { 0 } else { (k + 1) * p };
    let out = SyncPtr::new(&mut y);
    cpu::for_batch(g.n, |images, parallel| {
        let mut col = Scratch::new(col_len);
        for n in images {
            // SAFETY: image n owns y[n * y_len .. (n + 1) * y_len]; ranges are disjoint.
            let y_n = unsafe { out.slice(n * y_len, y_len) };
            image(n, y_n, &mut col, parallel);
        }
    });
    y
}

/// Gradients of `y = conv(x, w) + b` given `dy`: `(dx, dW, db)`, each only if asked for.
fn backward(g: &Geometry, x: &[f32], w: &[f32], dy: &[f32], want: Grads) -> (Grad, Grad, Grad) {
    let (k, p) = (g.k(), g.p());
    let gemms = want.w as usize + want.x as usize;
    super::profile::add_flops("conv2d.bwd", 2.0 * (gemms * g.n * g.c_out * k * p) as f64);
    let (x_len, y_len) = (g.c_in * g.h * g.w, g.c_out * p);
    let mut dx = if want.x {
        cpu::zeros(g.n * x_len)
    } else {
        Vec::new()
    };
    let dx_out = SyncPtr::new(&mut dx);
    if let Some(s2) = Stride2::new(g) {
        return backward_stride2(&s2, g, x, w, dy, want, dx, dx_out);
    }
    let pointwise = g.pointwise();
    let direct = Direct::new(g);
    let (wt, direct_t) = match &direct {
        Some(d) if want.x => (d.pack_transposed(w, g.c_out, g.c_in), Some(d.transposed())),
        _ => (Vec::new(), None),
    };
    let zero_init = vec![0f32; g.c_in];

    // One range of images: returns its (dW, db) partial sums.
    let range = |images: std::ops::Range<usize>, parallel: bool| -> (Vec<f32>, Vec<f32>) {
        let mut dw = vec![0f32; if want.w { g.c_out * k } else { 0 }];
        let mut db = vec![0f32; if want.b { g.c_out } else { 0 }];
        let scratch = if pointwise || direct.is_some() { 0 } else { k * p };
        let mut col = Scratch::new(if want.w { scratch } else { 0 });
        let mut dcol = Scratch::new(if want.x { scratch } else { 0 });
        let mut wgrad = match &direct {
            Some(d) if want.w => Some(WeightGrad::new(d, g.c_out, g.c_in)),
            _ => None,
        };
        for n in images {
            let x_n = &x[n * x_len..(n + 1) * x_len];
            let dy_n = &dy[n * y_len..(n + 1) * y_len];
            if let Some(wg) = &mut wgrad {
                wg.add_image(dy_n, x_n);
            } else if want.w {
                let col: &[f32] = if pointwise {
                    x_n
                } else {
                    im2col(g, x_n, &mut col);
                    &col
                };
                // dW [C_out, K] += dy_n [C_out, P] col_n^T [P, K]
                cpu::gemm(
                    (g.c_out, k, p),
                    &mut dw,
                    true,
                    dy_n,
                    (p, 1),
                    col,
                    (1, p),
                    1.0,
                    parallel,
                );
            }
            if want.b {
                for (d, row) in db.iter_mut().zip(dy_n.chunks_exact(p)) {
                    *d += cpu::sum_lanes(row) as f32;
                }
            }
            if want.x {
                // SAFETY: image n owns dx[n * x_len .. (n + 1) * x_len]; ranges are disjoint.
                let dx_n = unsafe { dx_out.slice(n * x_len, x_len) };
                // dcol [K, P] = W^T [K, C_out] dy_n [C_out, P]
                if let Some(dt) = &direct_t {
                    dt.conv(dy_n, g.c_out, &wt, &zero_init, None, dx_n, g.c_in);
                } else if pointwise {
                    cpu::gemm(
                        (k, p, g.c_out),
                        dx_n,
                        false,
                        w,
                        (1, k),
                        dy_n,
                        (p, 1),
                        1.0,
                        parallel,
                    );
                } else {
                    cpu::gemm(
                        (k, p, g.c_out),
                        &mut dcol,
                        false,
                        w,
                        (1, k),
                        dy_n,
                        (p, 1),
                        1.0,
                        parallel,
                    );
                    col2im(g, &mut dcol, dx_n);
                }
            }
        }
        if let Some(wg) = wgrad {
            dw = wg.finish();
        }
        (dw, db)
    };

    let partials = cpu::map_batch(g.n, range);
    let mut partials = partials.into_iter();
    let (mut dw, mut db) = partials.next().unwrap_or_default();
    for (pw, pb) in partials {
        dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
    }
    (want.x.then_some(dx), want.w.then_some(dw), want.b.then_some(db))
}

/// [`backward`] of a stride-2 convolution by pixel phases ([`Stride2`]).
#[allow(clippy::too_many_arguments)]
fn backward_stride2(
    s2: &Stride2,
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    want: Grads,
    dx: Vec<f32>,
    dx_out: SyncPtr,
) -> (Grad, Grad, Grad) {
    let (x_len, y_len, p) = (g.c_in * g.h * g.w, g.c_out * g.p(), g.p());
    let t = want.x.then(|| s2.pack_transposed(w));
    let zeros = vec![0f32; 4 * g.c_in];
    let partials = cpu::map_batch(g.n, |images, _| {
        let mut scratch = Scratch::new(s2.scratch_len());
        let mut wg = want.w.then(|| s2.weight_grad());
        let mut db = vec![0f32; if want.b { g.c_out } else { 0 }];
        for n in images {
            let (x_n, dy_n) = (&x[n * x_len..(n + 1) * x_len], &dy[n * y_len..(n + 1) * y_len]);
            if let Some(wg) = &mut wg {
                s2.add_weight_grad(wg, dy_n, x_n, &mut scratch);
            }
            for (d, row) in db.iter_mut().zip(dy_n.chunks_exact(p)) {
                *d += cpu::sum_lanes(row) as f32;
            }
            if let Some(t) = &t {
                // SAFETY: image n owns dx[n * x_len .. (n + 1) * x_len]; ranges are disjoint.
                let dx_n = unsafe { dx_out.slice(n * x_len, x_len) };
                s2.input_grad(t, dy_n, dx_n, &mut scratch, &zeros);
            }
        }
        (wg.map_or(Vec::new(), |wg| s2.finish_weight_grad(wg)), db)
    });
    let mut partials = partials.into_iter();
    let (mut dw, mut db) = partials.next().unwrap_or_default();
    for (pw, pb) in partials {
        dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
    }
    (want.x.then_some(dx), want.w.then_some(dw), want.b.then_some(db))
}

/// `conv(x, w) + b` on the fast path: x `[N, C_in, H, W]`, w `[C_out, C_in, kh, kw]`,
/// b `[C_out]` (zeros when `None`), f32 CPU tensors. Differentiable in all three.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let g = Geometry::new(x.dims(), w.dims(), stride, padding)?;
    let zeros;
    let b = match b {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(g.c_out, x.dtype(), x.device())?;
            &zeros
        }
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Conv2d { stride, padding })
}
