//! Fast CPU fused convolution block, with its own backward:
//!
//! ```text
//! h = silu(group_norm(x) * (1 + scale) + shift)    (optional; scale = shift = 0 without time conditioning)
//! y = conv(h, w) + b + channel_bias[n, :, None, None] + residual      (both adds optional)
//! ```
//!
//! This is a ResBlock stage in one op. Compared with the same ops one by one it never
//! materialises `h` (each image's `h_n` lives in a per-thread scratch buffer, recomputed in the
//! backward pass), and candle's autodiff sees one node instead of up to four: every node costs
//! candle a fresh output, a zero-filled gradient buffer and an add in the backward pass, which
//! for a `[64, 64, 28, 28]` map is about as much as the convolution's own im2col work.
//!
//! Per image `n` (see [`super::conv`] and [`super::norm`] for the pieces):
//! - forward: `h_n` by the group-norm kernel; `y_n = W im2col(h_n) + (b + cb_n) 1^T + r_n`;
//! - backward: recompute `h_n`; `dW += dy_n im2col(h_n)^T`, `db += dy_n 1`, `dcb_n = dy_n 1`,
//!   `dr_n = dy_n`; `dh_n = col2im(W^T dy_n)`; then the group-norm + SiLU backward of `dh_n`
//!   gives `dx_n` and the per-sample affine gradients.
//!
//! The small inputs (weights, bias, the per-channel affine `a = gamma (1 + scale)`,
//! `b' = beta (1 + scale) + shift`, the channel bias) travel packed in one 1-D tensor (candle
//! custom ops take at most three tensors); `Tensor::cat` routes their gradients back.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::conv::{col2im, im2col, Geometry};
use super::cpu::{self, Read, Scratch, SyncPtr};
use super::direct::{Direct, WeightGrad};
use super::norm::{check_groups, group_forward, image_backward, GroupIo};
use super::packed::{self, Builder, Grads};
use super::{ConvAdd, GroupNormSilu};

packed::pieces! {
    /// The packed small inputs, in packing order (the one definition of that order).
    enum Part {
        /// The weight, `[C_out, C_in, kh, kw]`.
        W,
        /// The bias, `[C_out]` (zeros when the convolution has none).
        B,
        /// `a = gamma (1 + scale)`, `[C_in]` or `[N, C_in]` (absent without normalisation).
        A,
        /// `b' = beta (1 + scale) + shift`, as `a`.
        Bb,
        /// The channel bias, `[N, C_out]` (absent without one).
        Cb,
    }
}

type Pack = packed::Layout<Part>;

/// A gradient, when asked for.
type Grad = Option<Vec<f32>>;

/// The fused op. Applied as `CustomOp2(x, pack)` or `CustomOp3(x, pack, residual)`.
struct ConvBlock {
    w_dims: [usize; 4],
    stride: usize,
    padding: usize,
    /// `(groups, eps)` of the group norm, if any.
    norm: Option<(usize, f64)>,
    /// Whether `a`, `b'` are `[N, C_in]` (else `[C_in]`).
    per_sample: bool,
    pack: Pack,
}

/// Which gradients the backward pass computes.
#[derive(Clone, Copy)]
struct Want {
    x: bool,
    pack: bool,
}

impl ConvBlock {
    fn geometry(&self, x_dims: &[usize]) -> Result<Geometry> {
        Geometry::new(x_dims, &self.w_dims, self.stride, self.padding)
    }

    /// Row of `a` / `b'` for sample `n`.
    fn affine_row<'a>(&self, v: &'a [f32], n: usize, c_in: usize) -> &'a [f32] {
        if self.per_sample {
            &v[n * c_in..(n + 1) * c_in]
        } else {
            v
        }
    }

    /// `h_n = silu(a * norm(x_n) + b')` into `h`, or `x_n` itself without normalisation.
    fn activation<'a>(
        &self,
        g: &Geometry,
        x_n: &'a [f32],
        a: &[f32],
        bb: &[f32],
        h: &'a mut [f32],
    ) -> &'a [f32] {
        let Some((groups, eps)) = self.norm else {
            return x_n;
        };
        let s = g.h * g.w;
        let cg = g.c_in / groups;
        for grp in 0..groups {
            let r = grp * cg * s..(grp + 1) * cg * s;
            let ch = grp * cg..(grp + 1) * cg;
            group_forward(&x_n[r.clone()], &mut h[r], s, &a[ch.clone()], &bb[ch], eps, true);
        }
        h
    }

    fn forward(
        &self,
        x: &[f32],
        x_dims: &[usize],
        pack: &[f32],
        residual: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Shape)> {
        let g = self.geometry(x_dims)?;
        if pack.len() != self.pack.len() {
            bail!(
                "conv block: packed parameters have {} values, expected {}",
                pack.len(),
                self.pack.len()
            );
        }
        let (k, p) = (g.k(), g.p());
        super::profile::add_flops("conv_block.fwd", 2.0 * (g.n * g.c_out * k * p) as f64);
        let (x_len, y_len) = (g.c_in * g.h * g.w, g.c_out * p);
        if let Some(r) = residual {
            if r.len() != g.n * y_len {
                bail!(
                    "conv block: residual has {} values, expected {}",
                    r.len(),
                    g.n * y_len
                );
            }
        }
        let [w, b, a, bb, cb] =
            [Part::W, Part::B, Part::A, Part::Bb, Part::Cb].map(|q| self.pack.get(pack, q));
        let mut y = cpu::zeros(g.n * y_len);
        let out = SyncPtr::new(&mut y);
        let direct = Direct::new(&g);
        let wp = direct.as_ref().map_or(Vec::new(), |d| d.pack(w, g.c_out, g.c_in));
        let h_len = if self.norm.is_some() { x_len } else { 0 };
        let col_len = if g.pointwise() || direct.is_some() {
            0
        } else {
            k * p
        };
        let run = |images: std::ops::Range<usize>, parallel: bool| {
            let (mut h, mut col) = (Scratch::new(h_len), Scratch::new(col_len));
            for n in images {
                let x_n = &x[n * x_len..(n + 1) * x_len];
                let h_n = self.activation(
                    &g,
                    x_n,
                    self.affine_row(a, n, g.c_in),
                    self.affine_row(bb, n, g.c_in),
                    &mut h,
                );
                // SAFETY: image n owns y[n * y_len ..][.. y_len]; ranges are disjoint.
                let y_n = unsafe { out.slice(n * y_len, y_len) };
                if let Some(d) = &direct {
                    let mut init = b.to_vec();
                    if !cb.is_empty() {
                        init.iter_mut()
                            .zip(&cb[n * g.c_out..(n + 1) * g.c_out])
                            .for_each(|(i, c)| *i += c);
                    }
                    let r_n = residual.map(|r| &r[n * y_len..(n + 1) * y_len]);
                    d.conv(h_n, g.c_in, &wp, &init, r_n, y_n, g.c_out);
                    continue;
                }
                let col: &[f32] = if g.pointwise() {
                    h_n
                } else {
                    im2col(&g, h_n, &mut col);
                    &col
                };
                for (co, row) in y_n.chunks_exact_mut(p).enumerate() {
                    let base = b[co] + if cb.is_empty() { 0.0 } else { cb[n * g.c_out + co] };
                    match residual {
                        Some(r) => {
                            let r_row = &r[n * y_len + co * p..n * y_len + (co + 1) * p];
                            row.iter_mut().zip(r_row).for_each(|(y, r)| *y = r + base);
                        }
                        None => row.fill(base),
                    }
                }
                cpu::gemm((g.c_out, p, k), y_n, true, w, (k, 1), col, (p, 1), 1.0, parallel);
            }
        };
        cpu::for_batch(g.n, run);
        Ok((y, Shape::from((g.n, g.c_out, g.h_out, g.w_out))))
    }

    /// `(dx, dpack)`, each only if asked for. Per image ([`BlockBackward`]): the weight
    /// gradient ([`BlockBackward::weight_grad`]), the bias sums ([`BlockBackward::bias_grads`]),
    /// `dh_n = col2im(W^T dy_n)` ([`BlockBackward::input_grad`]) and the group-norm + SiLU
    /// backward of `dh_n` ([`BlockBackward::norm_backward`]); then the threads' sums are packed
    /// ([`BlockBackward::gradient_pack`]).
    fn backward(
        &self,
        x: &[f32],
        x_dims: &[usize],
        pack: &[f32],
        dy: &[f32],
        want: Want,
    ) -> Result<(Grad, Grad)> {
        let g = self.geometry(x_dims)?;
        let (k, p) = (g.k(), g.p());
        let x_len = g.c_in * g.h * g.w;
        let norm = self.norm.is_some();
        let need_dh = want.x || (norm && want.pack);
        let gemms = want.pack as usize + need_dh as usize;
        super::profile::add_flops("conv_block.bwd", 2.0 * (gemms * g.n * g.c_out * k * p) as f64);
        let mut dx = cpu::zeros(if want.x { g.n * x_len } else { 0 });
        // Per-sample gradients of a, b' ([N, C_in]) and of the channel bias ([N, C_out]).
        let affine_len = if norm && want.pack { g.n * g.c_in } else { 0 };
        let (mut da, mut dbb) = (vec![0f32; affine_len], vec![0f32; affine_len]);
        let cb_len = if want.pack { self.pack.len_of(Part::Cb) } else { 0 };
        let mut dcb = vec![0f32; cb_len];
        let direct = Direct::new(&g);
        let (wt, direct_t) = match &direct {
            Some(d) if need_dh => (
                d.pack_transposed(self.pack.get(pack, Part::W), g.c_out, g.c_in),
                Some(d.transposed()),
            ),
            _ => (Vec::new(), None),
        };
        let bw = BlockBackward {
            op: self,
            g: &g,
            x,
            pack,
            dy,
            want,
            need_dh,
            direct: direct.as_ref(),
            direct_t,
            wt,
            zeros: vec![0f32; g.c_in],
            out: [
                SyncPtr::new(&mut dx),
                SyncPtr::new(&mut da),
                SyncPtr::new(&mut dbb),
                SyncPtr::new(&mut dcb),
            ],
        };
        let partials = cpu::map_batch(g.n, |images, parallel| {
            let mut t = BlockThread::new(&bw);
            for n in images {
                bw.weight_grad(n, &mut t, parallel);
                bw.bias_grads(n, &mut t);
                if need_dh {
                    bw.input_grad(n, &mut t, parallel);
                    bw.norm_backward(n, &mut t);
                }
            }
            t.sums()
        });
        let dpack = if want.pack {
            Some(bw.gradient_pack(partials, da, dbb, dcb)?)
        } else {
            None
        };
        Ok((want.x.then_some(dx), dpack))
    }

    fn bwd_common(&self, x: &Tensor, pack: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let want = Want {
            x: x.track_op(),
            pack: pack.track_op(),
        };
        let (dx, dpack) = {
            let (xr, pr, dyr) = (
                Read::new(x, "conv block")?,
                Read::new(pack, "conv block")?,
                Read::new(&dy, "conv block")?,
            );
            self.backward(xr.as_slice(), x.dims(), pr.as_slice(), dyr.as_slice(), want)?
        };
        Ok((
            dx.map(|v| cpu::tensor(v, x.shape())).transpose()?,
            dpack.map(|v| cpu::tensor(v, pack.shape())).transpose()?,
        ))
    }
}

/// One backward call of the block: its inputs, kernels and outputs (rows written per image
/// through `out`).
struct BlockBackward<'a> {
    op: &'a ConvBlock,
    g: &'a Geometry,
    x: &'a [f32],
    pack: &'a [f32],
    dy: &'a [f32],
    want: Want,
    /// Whether `dh = col2im(W^T dy)` is needed (for `dx`, or for the norm's parameters).
    need_dh: bool,
    /// The direct kernels, when they apply (else im2col + GEMM).
    direct: Option<&'a Direct>,
    /// The transposed direct kernels and weights, for `dh`.
    direct_t: Option<Direct>,
    wt: Vec<f32>,
    /// `C_in` zeros (the transposed convolution's bias).
    zeros: Vec<f32>,
    /// `dx [N, C_in, H, W]`, `da`, `db'` `[N, C_in]`, `dcb [N, C_out]`.
    out: [SyncPtr; 4],
}

/// One thread's scratch and partial sums (`dW`, `db`) in the block's backward pass.
struct BlockThread<'k> {
    dw: Vec<f32>,
    db: Vec<f32>,
    /// The activation `h_n`, its im2col matrix, the im2col-shaped `W^T dy_n`, `dh_n`.
    h: Scratch,
    col: Scratch,
    dcol: Scratch,
    dh: Scratch,
    /// `dx_n` when `dx` itself is not wanted (the norm's parameter gradients still need it).
    dx: Scratch,
    wgrad: Option<WeightGrad<'k>>,
}

impl<'k> BlockThread<'k> {
    fn new(bw: &'k BlockBackward<'_>) -> Self {
        let (g, want) = (bw.g, bw.want);
        let norm = bw.op.norm.is_some();
        let (k, x_len) = (g.k(), g.c_in * g.h * g.w);
        let hw = if norm { x_len } else { 0 };
        let kp = if g.pointwise() || bw.direct.is_some() {
            0
        } else {
            k * g.p()
        };
        let need_dw = want.pack;
        Self {
            dw: vec![0f32; if need_dw { g.c_out * k } else { 0 }],
            db: vec![0f32; if want.pack { g.c_out } else { 0 }],
            h: Scratch::new(if need_dw { hw } else { 0 }),
            col: Scratch::new(if need_dw { kp } else { 0 }),
            dcol: Scratch::new(if bw.need_dh { kp } else { 0 }),
            dh: Scratch::new(if bw.need_dh { hw } else { 0 }),
            dx: Scratch::new(if bw.need_dh && norm && !want.x { x_len } else { 0 }),
            wgrad: match bw.direct {
                Some(d) if need_dw => Some(WeightGrad::new(d, g.c_out, g.c_in)),
                _ => None,
            },
        }
    }

    /// `(dW, db)` over the thread's images.
    fn sums(self) -> (Vec<f32>, Vec<f32>) {
        match self.wgrad {
            Some(wg) => (wg.finish(), self.db),
            None => (self.dw, self.db),
        }
    }
}

impl BlockBackward<'_> {
    fn x_n(&self, n: usize) -> &[f32] {
        let x_len = self.g.c_in * self.g.h * self.g.w;
        &self.x[n * x_len..(n + 1) * x_len]
    }

    fn dy_n(&self, n: usize) -> &[f32] {
        let y_len = self.g.c_out * self.g.p();
        &self.dy[n * y_len..(n + 1) * y_len]
    }

    /// Rows `n` of `a` and `b'`.
    fn affine_n(&self, n: usize) -> (&[f32], &[f32]) {
        let c_in = self.g.c_in;
        let (a, bb) = (
            self.op.pack.get(self.pack, Part::A),
            self.op.pack.get(self.pack, Part::Bb),
        );
        (self.op.affine_row(a, n, c_in), self.op.affine_row(bb, n, c_in))
    }

    /// `dW += dy_n h_n^T` (direct kernels) or `dy_n im2col(h_n)^T` (GEMM), `h_n` recomputed.
    fn weight_grad(&self, n: usize, t: &mut BlockThread<'_>, parallel: bool) {
        if !self.want.pack {
            return;
        }
        let (g, x_n, dy_n) = (self.g, self.x_n(n), self.dy_n(n));
        let (a_n, bb_n) = self.affine_n(n);
        let h_n = self.op.activation(g, x_n, a_n, bb_n, &mut t.h);
        if let Some(wg) = &mut t.wgrad {
            wg.add_image(dy_n, h_n);
            return;
        }
        let col: &[f32] = if g.pointwise() {
            h_n
        } else {
            im2col(g, h_n, &mut t.col);
            &t.col
        };
        let (k, p) = (g.k(), g.p());
        // dW [C_out, K] += dy_n [C_out, P] col_n^T [P, K]
        cpu::gemm(
            (g.c_out, k, p),
            &mut t.dw,
            true,
            dy_n,
            (p, 1),
            col,
            (1, p),
            1.0,
            parallel,
        );
    }

    /// `db += dy_n 1` and row `n` of the channel bias's gradient, `dcb_n = dy_n 1`.
    fn bias_grads(&self, n: usize, t: &mut BlockThread<'_>) {
        if !self.want.pack {
            return;
        }
        let (g, dy_n) = (self.g, self.dy_n(n));
        let has_cb = self.op.pack.len_of(Part::Cb) > 0;
        for (co, row) in dy_n.chunks_exact(g.p()).enumerate() {
            let sum = cpu_sum(row) as f32;
            t.db[co] += sum;
            if has_cb {
                // SAFETY: image n owns row n of dcb; the rows of different images are disjoint.
                unsafe { self.out[3].slice(n * g.c_out + co, 1)[0] = sum };
            }
        }
    }

    /// `dx_n`, the output of this image's input gradient: `dx`'s row, or scratch.
    #[allow(clippy::mut_from_ref)] // rows owned by image n (see the SAFETY notes)
    fn dx_row<'t>(&'t self, n: usize, scratch: &'t mut Scratch) -> &'t mut [f32] {
        let x_len = self.g.c_in * self.g.h * self.g.w;
        if self.want.x {
            // SAFETY: image n owns its row of dx; the rows of different images are disjoint.
            unsafe { self.out[0].slice(n * x_len, x_len) }
        } else {
            scratch
        }
    }

    /// `dh_n = col2im(W^T dy_n)` (into `t.dh`); without normalisation `h = x`, so straight
    /// into `dx_n`.
    fn input_grad(&self, n: usize, t: &mut BlockThread<'_>, parallel: bool) {
        let (g, dy_n) = (self.g, self.dy_n(n));
        let w = self.op.pack.get(self.pack, Part::W);
        let (k, p) = (g.k(), g.p());
        let norm = self.op.norm.is_some();
        let target: &mut [f32] = if norm {
            &mut t.dh
        } else {
            self.dx_row(n, &mut t.dx)
        };
        if let Some(dt) = &self.direct_t {
            dt.conv(dy_n, g.c_out, &self.wt, &self.zeros, None, target, g.c_in);
        } else if g.pointwise() {
            cpu::gemm(
                (k, p, g.c_out),
                target,
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
                &mut t.dcol,
                false,
                w,
                (1, k),
                dy_n,
                (p, 1),
                1.0,
                parallel,
            );
            target.fill(0.0);
            col2im(g, &mut t.dcol, target);
        }
    }

    /// The group-norm + SiLU backward of `dh_n` at `x_n`: `dx_n` and row `n` of `da`, `db'`.
    fn norm_backward(&self, n: usize, t: &mut BlockThread<'_>) {
        let Some((groups, eps)) = self.op.norm else {
            return;
        };
        let (g, x_n) = (self.g, self.x_n(n));
        let (a_n, bb_n) = self.affine_n(n);
        let mut da_n = vec![0f32; g.c_in];
        let mut dbb_n = vec![0f32; g.c_in];
        image_backward(
            GroupIo {
                x: x_n,
                dy: &t.dh,
                dx: self.dx_row(n, &mut t.dx),
                da: &mut da_n,
                db: &mut dbb_n,
            },
            g.h * g.w,
            groups,
            &a_n[..g.c_in],
            &bb_n[..g.c_in],
            eps,
            true,
        );
        if self.want.pack {
            // SAFETY: image n owns rows n of da and db'; the rows of different images are disjoint.
            unsafe {
                self.out[1].slice(n * g.c_in, g.c_in).copy_from_slice(&da_n);
                self.out[2].slice(n * g.c_in, g.c_in).copy_from_slice(&dbb_n);
            }
        }
    }

    /// The packed gradient: the threads' `(dW, db)` added, the per-sample affine rows summed
    /// over the batch unless the affine map is per sample, in [`Part`] order.
    fn gradient_pack(
        &self,
        partials: Vec<(Vec<f32>, Vec<f32>)>,
        da: Vec<f32>,
        dbb: Vec<f32>,
        dcb: Vec<f32>,
    ) -> Result<Vec<f32>> {
        let g = self.g;
        let mut partials = partials.into_iter();
        let (mut dw, mut db) = partials
            .next()
            .unwrap_or_else(|| (vec![0f32; g.c_out * g.k()], vec![0f32; g.c_out]));
        for (pw, pb) in partials {
            dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
        }
        let mut grads = Grads::new();
        grads.set(Part::W, dw);
        grads.set(Part::B, db);
        if self.op.norm.is_some() {
            let sum_rows = |v: Vec<f32>| {
                if self.op.per_sample {
                    return v;
                }
                let mut sum = vec![0f32; g.c_in];
                for row in v.chunks_exact(g.c_in.max(1)) {
                    sum.iter_mut().zip(row).for_each(|(s, r)| *s += r);
                }
                sum
            };
            grads.set(Part::A, sum_rows(da));
            grads.set(Part::Bb, sum_rows(dbb));
        }
        grads.set(Part::Cb, dcb);
        self.op.pack.assemble(grads, "conv block")
    }
}

cpu::simd_fn! {
    fn cpu_sum(x: &[f32]) -> f64 {
        cpu::sum_lanes(x)
    }
}

impl CustomOp2 for ConvBlock {
    fn name(&self) -> &'static str {
        "fast-conv-block"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _prof = super::profile::scope("conv_block.fwd");
        let x = cpu::slice(xs, xl, "conv block")?;
        let p = cpu::slice(ps, pl, "conv block")?;
        let (y, shape) = self.forward(x, xl.dims(), p, None)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        pack: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::scope("conv_block.bwd");
        self.bwd_common(x, pack, dy)
    }
}

impl CustomOp3 for ConvBlock {
    fn name(&self) -> &'static str {
        "fast-conv-block-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _prof = super::profile::scope("conv_block.fwd");
        let x = cpu::slice(xs, xl, "conv block")?;
        let p = cpu::slice(ps, pl, "conv block")?;
        let r = cpu::slice(rs, rl, "conv block")?;
        let (y, shape) = self.forward(x, xl.dims(), p, Some(r))?;
        if rl.dims() != shape.dims() {
            bail!(
                "conv block: residual has shape {:?}, expected {:?}",
                rl.dims(),
                shape.dims()
            );
        }
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        pack: &Tensor,
        residual: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::scope("conv_block.bwd");
        let (dx, dpack) = self.bwd_common(x, pack, dy)?;
        // d residual = dy.
        Ok((dx, dpack, residual.track_op().then(|| dy.clone())))
    }
}

/// The fast fused block: `y = conv(silu(gn(x)), w) + b + channel_bias + residual` (the norm
/// optional). See [`crate::ops::group_norm_silu_conv2d`] and [`crate::ops::conv2d_add`].
#[allow(clippy::too_many_arguments)]
pub fn conv_block(
    x: &Tensor,
    norm: Option<&GroupNormSilu<'_>>,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
    add: &ConvAdd<'_>,
) -> Result<Tensor> {
    let g = Geometry::new(x.dims(), w.dims(), stride, padding)?;
    let w_dims = [g.c_out, g.c_in, g.kh, g.kw];
    let mut parts = Builder::new();
    parts.set(Part::W, w)?;
    parts.set(
        Part::B,
        &match b {
            Some(b) if b.dims() == [g.c_out] => b.clone(),
            Some(b) => bail!("conv2d: bias has shape {:?}, expected [{}]", b.dims(), g.c_out),
            None => Tensor::zeros(g.c_out, x.dtype(), x.device())?,
        },
    )?;
    let mut per_sample = false;
    if let Some(nm) = norm {
        check_groups(g.c_in, nm.groups)?;
        for (name, t) in [("gamma", nm.gamma), ("beta", nm.beta)] {
            if t.dims() != [g.c_in] {
                bail!(
                    "group_norm: {name} has shape {:?}, expected [{}]",
                    t.dims(),
                    g.c_in
                );
            }
        }
        let (a, bb) = match nm.scale_shift {
            None => (nm.gamma.clone(), nm.beta.clone()),
            Some((scale, shift)) => {
                if scale.dims() != [g.n, g.c_in] || shift.dims() != [g.n, g.c_in] {
                    bail!(
                        "group_norm: scale {:?} and shift {:?} must be [{}, {}]",
                        scale.dims(),
                        shift.dims(),
                        g.n,
                        g.c_in
                    );
                }
                per_sample = true;
                let one_plus_scale = (scale + 1.0)?;
                (
                    one_plus_scale.broadcast_mul(nm.gamma)?,
                    one_plus_scale.broadcast_mul(nm.beta)?.add(shift)?,
                )
            }
        };
        parts.set(Part::A, &a)?;
        parts.set(Part::Bb, &bb)?;
    }
    if let Some(cb) = add.channel_bias {
        if cb.dims() != [g.n, g.c_out] {
            bail!(
                "conv2d: channel bias has shape {:?}, expected [{}, {}]",
                cb.dims(),
                g.n,
                g.c_out
            );
        }
        parts.set(Part::Cb, cb)?;
    }
    let (pack, layout) = parts.finish()?;
    let op = ConvBlock {
        w_dims,
        stride,
        padding,
        norm: norm.map(|nm| (nm.groups, nm.eps)),
        per_sample,
        pack: layout,
    };
    let x = x.contiguous()?;
    match add.residual {
        Some(r) => {
            let want = [g.n, g.c_out, g.h_out, g.w_out];
            if r.dims() != want {
                bail!("conv2d: residual has shape {:?}, expected {want:?}", r.dims());
            }
            x.apply_op3(&pack, &r.contiguous()?, op)
        }
        None => x.apply_op2(&pack, op),
    }
}
