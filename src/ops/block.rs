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
use super::{ConvAdd, GroupNormSilu};

/// Where each small input sits in the packed tensor: `[w | b | a | b' | cb]`.
#[derive(Clone, Copy, Debug)]
struct Pack {
    w: usize,
    b: usize,
    /// Length of `a` and of `b'` (0 without normalisation; `C_in` or `N * C_in`).
    a: usize,
    cb: usize,
}

impl Pack {
    fn len(&self) -> usize {
        self.w + self.b + 2 * self.a + self.cb
    }

    /// The pieces of `p`.
    fn split<'a>(&self, p: &'a [f32]) -> Parts<'a> {
        let (w, rest) = p.split_at(self.w);
        let (b, rest) = rest.split_at(self.b);
        let (a, rest) = rest.split_at(self.a);
        let (bb, cb) = rest.split_at(self.a);
        Parts { w, b, a, bb, cb }
    }
}

/// The packed small inputs, unpacked.
struct Parts<'a> {
    w: &'a [f32],
    b: &'a [f32],
    a: &'a [f32],
    bb: &'a [f32],
    cb: &'a [f32],
}

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
        let Parts { w, b, a, bb, cb } = self.pack.split(pack);
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

    /// `(dx, dpack)`, each only if asked for.
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
        let (x_len, y_len) = (g.c_in * g.h * g.w, g.c_out * p);
        let Parts { w, a, bb, .. } = self.pack.split(pack);
        let norm = self.norm.is_some();
        let need_dw = want.pack;
        let need_dh = want.x || (norm && want.pack);
        let gemms = need_dw as usize + need_dh as usize;
        super::profile::add_flops("conv_block.bwd", 2.0 * (gemms * g.n * g.c_out * k * p) as f64);
        let mut dx = cpu::zeros(if want.x { g.n * x_len } else { 0 });
        // Per-sample gradients of a, b' ([N, C_in]) and of the channel bias ([N, C_out]).
        let affine_len = if norm && want.pack { g.n * g.c_in } else { 0 };
        let (mut da, mut dbb) = (vec![0f32; affine_len], vec![0f32; affine_len]);
        let mut dcb = vec![
            0f32;
            if want.pack && self.pack.cb > 0 {
                g.n * g.c_out
            } else {
                0
            }
        ];
        let (dx_out, da_out, dbb_out, dcb_out) = (
            SyncPtr::new(&mut dx),
            SyncPtr::new(&mut da),
            SyncPtr::new(&mut dbb),
            SyncPtr::new(&mut dcb),
        );
        let scratch_hw = if norm { x_len } else { 0 };
        let direct = Direct::new(&g);
        let (wt, direct_t) = match &direct {
            Some(d) if need_dh => (d.pack_transposed(w, g.c_out, g.c_in), Some(d.transposed())),
            _ => (Vec::new(), None),
        };
        let zero_init = vec![0f32; g.c_in];
        let scratch_kp = if g.pointwise() || direct.is_some() {
            0
        } else {
            k * p
        };
        let s = g.h * g.w;

        let run = |images: std::ops::Range<usize>, parallel: bool| -> (Vec<f32>, Vec<f32>) {
            let mut dw = vec![0f32; if need_dw { g.c_out * k } else { 0 }];
            let mut db = vec![0f32; if want.pack { g.c_out } else { 0 }];
            let mut h = Scratch::new(if need_dw { scratch_hw } else { 0 });
            let mut col = Scratch::new(if need_dw { scratch_kp } else { 0 });
            let mut dcol = Scratch::new(if need_dh { scratch_kp } else { 0 });
            let mut dh = Scratch::new(if need_dh { scratch_hw } else { 0 });
            let mut dx_scratch = Scratch::new(if need_dh && norm && !want.x { x_len } else { 0 });
            let mut wgrad = match &direct {
                Some(d) if need_dw => Some(WeightGrad::new(d, g.c_out, g.c_in)),
                _ => None,
            };
            for n in images {
                let x_n = &x[n * x_len..(n + 1) * x_len];
                let dy_n = &dy[n * y_len..(n + 1) * y_len];
                let (a_n, bb_n) = (self.affine_row(a, n, g.c_in), self.affine_row(bb, n, g.c_in));
                if let Some(wg) = &mut wgrad {
                    wg.add_image(dy_n, self.activation(&g, x_n, a_n, bb_n, &mut h));
                } else if need_dw {
                    let h_n = self.activation(&g, x_n, a_n, bb_n, &mut h);
                    let col: &[f32] = if g.pointwise() {
                        h_n
                    } else {
                        im2col(&g, h_n, &mut col);
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
                if want.pack {
                    for (co, row) in dy_n.chunks_exact(p).enumerate() {
                        let sum = cpu_sum(row) as f32;
                        db[co] += sum;
                        if self.pack.cb > 0 {
                            // SAFETY: image n owns row n of dcb; ranges are disjoint.
                            unsafe { dcb_out.slice(n * g.c_out + co, 1)[0] = sum };
                        }
                    }
                }
                if !need_dh {
                    continue;
                }
                // SAFETY (all `slice` calls below): image n owns its rows of dx, da, db'.
                let dx_n: &mut [f32] = if want.x {
                    unsafe { dx_out.slice(n * x_len, x_len) }
                } else {
                    &mut dx_scratch
                };
                // dh_n = col2im(W^T dy_n); without normalisation h = x, so straight into dx_n.
                let target: &mut [f32] = if norm { &mut dh } else { &mut *dx_n };
                if let Some(dt) = &direct_t {
                    dt.conv(dy_n, g.c_out, &wt, &zero_init, None, target, g.c_in);
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
                        &mut dcol,
                        false,
                        w,
                        (1, k),
                        dy_n,
                        (p, 1),
                        1.0,
                        parallel,
                    );
                    target.fill(0.0);
                    col2im(&g, &mut dcol, target);
                }
                if let Some((groups, eps)) = self.norm {
                    let mut da_local = vec![0f32; g.c_in];
                    let mut dbb_local = vec![0f32; g.c_in];
                    image_backward(
                        GroupIo {
                            x: x_n,
                            dy: &dh,
                            dx: dx_n,
                            da: &mut da_local,
                            db: &mut dbb_local,
                        },
                        s,
                        groups,
                        &a_n[..g.c_in],
                        &bb_n[..g.c_in],
                        eps,
                        true,
                    );
                    if want.pack {
                        unsafe {
                            da_out.slice(n * g.c_in, g.c_in).copy_from_slice(&da_local);
                            dbb_out.slice(n * g.c_in, g.c_in).copy_from_slice(&dbb_local);
                        }
                    }
                }
            }
            if let Some(wg) = wgrad {
                dw = wg.finish();
            }
            (dw, db)
        };
        let partials = cpu::map_batch(g.n, run);
        if !want.pack {
            return Ok((want.x.then_some(dx), None));
        }
        let mut partials = partials.into_iter();
        let (mut dw, mut db) = partials
            .next()
            .unwrap_or_else(|| (vec![0f32; g.c_out * k], vec![0f32; g.c_out]));
        for (pw, pb) in partials {
            dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
        }
        let mut dpack = Vec::with_capacity(self.pack.len());
        dpack.extend_from_slice(&dw);
        dpack.extend_from_slice(&db);
        if norm {
            if self.per_sample {
                dpack.extend_from_slice(&da);
                dpack.extend_from_slice(&dbb);
            } else {
                for v in [&da, &dbb] {
                    let mut sum = vec![0f32; g.c_in];
                    for row in v.chunks_exact(g.c_in.max(1)) {
                        sum.iter_mut().zip(row).for_each(|(s, r)| *s += r);
                    }
                    dpack.extend_from_slice(&sum);
                }
            }
        }
        dpack.extend_from_slice(&dcb);
        if dpack.len() != self.pack.len() {
            bail!(
                "conv block: internal error, gradient pack {} != {}",
                dpack.len(),
                self.pack.len()
            );
        }
        Ok((want.x.then_some(dx), Some(dpack)))
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
    let mut parts = vec![w.flatten_all()?];
    parts.push(match b {
        Some(b) if b.dims() == [g.c_out] => b.clone(),
        Some(b) => bail!("conv2d: bias has shape {:?}, expected [{}]", b.dims(), g.c_out),
        None => Tensor::zeros(g.c_out, x.dtype(), x.device())?,
    });
    let mut a_len = 0;
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
        a_len = a.elem_count();
        parts.push(a.flatten_all()?);
        parts.push(bb.flatten_all()?);
    }
    let mut cb_len = 0;
    if let Some(cb) = add.channel_bias {
        if cb.dims() != [g.n, g.c_out] {
            bail!(
                "conv2d: channel bias has shape {:?}, expected [{}, {}]",
                cb.dims(),
                g.n,
                g.c_out
            );
        }
        cb_len = cb.elem_count();
        parts.push(cb.flatten_all()?);
    }
    let pack = Tensor::cat(&parts, 0)?;
    let op = ConvBlock {
        w_dims,
        stride,
        padding,
        norm: norm.map(|nm| (nm.groups, nm.eps)),
        per_sample,
        pack: Pack {
            w: w.elem_count(),
            b: g.c_out,
            a: a_len,
            cb: cb_len,
        },
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
