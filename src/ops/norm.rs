//! Fast CPU group normalisation (Wu & He 2018), fused with a per-channel (or per-sample,
//! per-channel) affine map and optionally SiLU, with its own backward.
//!
//! One kernel covers the three public variants. For sample `n`, group `g` (channels
//! `g * C/G .. (g + 1) * C/G`, all `S` pixels, `M = S * C / G` values):
//!
//! ```text
//! mean = sum(x) / M,   var = sum((x - mean)^2) / M,   rstd = 1 / sqrt(var + eps)
//! xhat = (x - mean) * rstd
//! z    = a[n, c] * xhat + b[n, c]
//! y    = silu(z) = z * sigmoid(z)      (or y = z without the activation)
//! ```
//!
//! - `group_norm`:                  `a = gamma`, `b = beta` (`[C]`, the same for every sample);
//! - `group_norm_silu`:             the same with SiLU;
//! - `group_norm_scale_shift_silu`: `a = gamma * (1 + scale)`, `b = beta * (1 + scale) + shift`
//!   (`[N, C]`), since `(xhat * gamma + beta) * (1 + scale) + shift = a xhat + b`. `a` and `b`
//!   are formed by candle ops on `[N, C]` tensors, so their gradients reach gamma, beta, scale
//!   and shift through candle's autodiff.
//!
//! Backward, given `dy`: `dz = dy * silu'(z)`, `silu'(z) = s (1 + z (1 - s))`, `s = sigmoid(z)`;
//! `da[n, c] = sum_pixels dz * xhat`, `db[n, c] = sum_pixels dz`, and with `dxhat = a dz`,
//! `dx = rstd * (dxhat - mean_group(dxhat) - xhat * mean_group(dxhat * xhat))`
//! where the group means come from the per-channel sums already formed for `da`, `db`.
//! The statistics are recomputed from `x` in the backward pass (the group is then in cache
//! for the two passes that follow), so the op saves nothing besides its inputs.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, Read};

/// Geometry of one normalisation: `x` viewed as `[N, C, S]`, `G` groups of `C / G` channels.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    n: usize,
    c: usize,
    s: usize,
    groups: usize,
    /// Whether `a`, `b` are `[N, C]` (else `[C]`).
    per_sample: bool,
}

impl Geometry {
    fn new(x: &[usize], groups: usize, a: &[usize], b: &[usize]) -> Result<Self> {
        let (n, c) = match x {
            [n, c, ..] => (*n, *c),
            _ => bail!("group_norm: expected x [N, C, ...], got {x:?}"),
        };
        check_groups(c, groups)?;
        let per_sample = match a {
            [ac] if *ac == c => false,
            [an, ac] if *an == n && *ac == c => true,
            _ => bail!("group_norm: scale has shape {a:?}, expected [{c}] or [{n}, {c}]"),
        };
        if a != b {
            bail!("group_norm: scale {a:?} and shift {b:?} must have the same shape");
        }
        Ok(Self {
            n,
            c,
            s: x[2..].iter().product(),
            groups,
            per_sample,
        })
    }

    /// Channels per group.
    fn cg(&self) -> usize {
        self.c / self.groups
    }

    /// Index of channel `c` of sample `n` in `a` / `b`.
    fn ab_index(&self, n: usize, c: usize) -> usize {
        if self.per_sample {
            n * self.c + c
        } else {
            c
        }
    }
}

/// `C % groups != 0` (or no groups) is an error naming both numbers.
pub(crate) fn check_groups(c: usize, groups: usize) -> Result<()> {
    if groups == 0 || c % groups != 0 {
        bail!("group_norm: {c} channels cannot be split into {groups} groups evenly");
    }
    Ok(())
}

cpu::simd_fn! {
    /// `(mean, rstd)` of one group, two passes (the second over the centred values, as the
    /// reference does, so no catastrophic cancellation).
    fn group_stats(x: &[f32], eps: f64) -> (f32, f32) {
        let m = x.len().max(1) as f64;
        let mean = (cpu::sum_lanes(x) / m) as f32;
        let mut acc = [0f32; 16];
        let chunks = x.chunks_exact(16);
        let tail = chunks.remainder();
        for ch in chunks {
            for i in 0..16 {
                let d = ch[i] - mean;
                acc[i] += d * d;
            }
        }
        let mut var = acc.iter().map(|&v| v as f64).sum::<f64>();
        var += tail.iter().map(|&v| ((v - mean) as f64).powi(2)).sum::<f64>();
        let var = var / m;
        (mean, (1.0 / (var + eps).sqrt()) as f32)
    }
}

cpu::simd_fn! {
    /// `y = silu(x * coef + offset)` or `y = x * coef + offset`.
    fn affine_act(x: &[f32], y: &mut [f32], coef: f32, offset: f32, silu: bool) {
        if silu {
            for (y, &x) in y.iter_mut().zip(x) {
                let z = x * coef + offset;
                *y = z * cpu::sigmoid(z);
            }
        } else {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * coef + offset;
            }
        }
    }
}

cpu::simd_fn! {
    /// First backward pass over one channel: writes `dz` into `dz_out` and returns
    /// `(sum dz, sum dz * xhat)`, with `z = x * coef + offset`, `xhat = (x - mean) * rstd`.
    #[allow(clippy::too_many_arguments)]
    fn channel_dz(
        x: &[f32],
        dy: &[f32],
        dz_out: &mut [f32],
        coef: f32,
        offset: f32,
        mean: f32,
        rstd: f32,
        silu: bool,
    ) -> (f64, f64) {
        let mut s_dz = [0f32; 16];
        let mut s_dzx = [0f32; 16];
        let len = x.len();
        let full = len / 16 * 16;
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        fn one(x: f32, dy: f32, coef: f32, offset: f32, mean: f32, rstd: f32, silu: bool) -> (f32, f32) {
            let dz = if silu {
                let z = x * coef + offset;
                let s = cpu::sigmoid(z);
                dy * (s * (1.0 + z * (1.0 - s)))
            } else {
                dy
            };
            (dz, dz * ((x - mean) * rstd))
        }
        for base in (0..full).step_by(16) {
            let (xc, dyc) = (&x[base..base + 16], &dy[base..base + 16]);
            let out = &mut dz_out[base..base + 16];
            for i in 0..16 {
                let (dz, dzx) = one(xc[i], dyc[i], coef, offset, mean, rstd, silu);
                out[i] = dz;
                s_dz[i] += dz;
                s_dzx[i] += dzx;
            }
        }
        let (mut t_dz, mut t_dzx) = (0f64, 0f64);
        for i in full..len {
            let (dz, dzx) = one(x[i], dy[i], coef, offset, mean, rstd, silu);
            dz_out[i] = dz;
            t_dz += dz as f64;
            t_dzx += dzx as f64;
        }
        (
            s_dz.iter().map(|&v| v as f64).sum::<f64>() + t_dz,
            s_dzx.iter().map(|&v| v as f64).sum::<f64>() + t_dzx,
        )
    }
}

cpu::simd_fn! {
    /// Second backward pass, in place: `dx = p * dz + q * x + r` (the expanded form of
    /// `rstd * (a dz - m1 - xhat m2)`).
    fn channel_dx(x: &[f32], dz_dx: &mut [f32], p: f32, q: f32, r: f32) {
        for (d, &x) in dz_dx.iter_mut().zip(x) {
            *d = p * *d + q * x + r;
        }
    }
}

/// Forward of one group (`cg` channels of `s` pixels): `y = act(a_c * xhat + b_c)`, with
/// `a_g`, `b_g` the group's `cg` coefficients.
pub(crate) fn group_forward(
    xg: &[f32],
    yg: &mut [f32],
    s: usize,
    a_g: &[f32],
    b_g: &[f32],
    eps: f64,
    silu: bool,
) {
    let (mean, rstd) = group_stats(xg, eps);
    for (c, (&a, &b)) in a_g.iter().zip(b_g).enumerate() {
        let coef = a * rstd;
        let offset = b - mean * coef;
        let range = c * s..(c + 1) * s;
        affine_act(&xg[range.clone()], &mut yg[range], coef, offset, silu);
    }
}

/// The slices one group's backward pass reads and writes: `x`, `dy`, `dx` (`cg * s` values)
/// and the group's `cg` entries of `da`, `db`.
pub(crate) struct GroupIo<'a> {
    pub x: &'a [f32],
    pub dy: &'a [f32],
    pub dx: &'a mut [f32],
    pub da: &'a mut [f32],
    pub db: &'a mut [f32],
}

/// Backward of all `groups` groups of one image (`a.len()` channels of `s` pixels each, group by
/// group through [`group_backward`]): `io` holds the whole image's `x`, `dy`, `dx` and the
/// per-channel `da`, `db`.
pub(crate) fn image_backward(
    io: GroupIo<'_>,
    s: usize,
    groups: usize,
    a: &[f32],
    b: &[f32],
    eps: f64,
    silu: bool,
) {
    let GroupIo { x, dy, dx, da, db } = io;
    let cg = a.len() / groups;
    for g in 0..groups {
        let r = g * cg * s..(g + 1) * cg * s;
        let ch = g * cg..(g + 1) * cg;
        group_backward(
            GroupIo {
                x: &x[r.clone()],
                dy: &dy[r.clone()],
                dx: &mut dx[r],
                da: &mut da[ch.clone()],
                db: &mut db[ch.clone()],
            },
            s,
            &a[ch.clone()],
            &b[ch],
            eps,
            silu,
        );
    }
}

/// Backward of one group (see the module docs): writes `dx`, and `da[c] = sum dz * xhat`,
/// `db[c] = sum dz` for the group's channels.
pub(crate) fn group_backward(io: GroupIo<'_>, s: usize, a_g: &[f32], b_g: &[f32], eps: f64, silu: bool) {
    let GroupIo { x, dy, dx, da, db } = io;
    let m = x.len().max(1) as f64;
    let (mean, rstd) = group_stats(x, eps);
    // Pass 1: dz (into dx), per-channel sums; group sums of dxhat and dxhat * xhat.
    let (mut sum_dxhat, mut sum_dxhat_xhat) = (0f64, 0f64);
    for c in 0..a_g.len() {
        let coef = a_g[c] * rstd;
        let offset = b_g[c] - mean * coef;
        let r = c * s..(c + 1) * s;
        let (s_dz, s_dzx) = channel_dz(
            &x[r.clone()],
            &dy[r.clone()],
            &mut dx[r],
            coef,
            offset,
            mean,
            rstd,
            silu,
        );
        db[c] = s_dz as f32;
        da[c] = s_dzx as f32;
        sum_dxhat += a_g[c] as f64 * s_dz;
        sum_dxhat_xhat += a_g[c] as f64 * s_dzx;
    }
    // Pass 2: dx = rstd * (a dz - m1 - xhat m2) = p dz + q x + r, with
    // p = rstd a, q = -rstd^2 m2, r = rstd (rstd m2 mean - m1).
    let (m1, m2) = (sum_dxhat / m, sum_dxhat_xhat / m);
    let rs = rstd as f64;
    let q = -rs * rs * m2;
    let r = rs * (rs * m2 * mean as f64 - m1);
    for (c, &a) in a_g.iter().enumerate() {
        let range = c * s..(c + 1) * s;
        channel_dx(&x[range.clone()], &mut dx[range], rstd * a, q as f32, r as f32);
    }
}

/// The fused op `y = act(a * group_norm(x) + b)`.
struct GroupNormAffine {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for GroupNormAffine {
    fn name(&self) -> &'static str {
        "fast-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _prof = super::profile::scope("group_norm.fwd");
        let g = Geometry::new(xl.dims(), self.groups, al.dims(), bl.dims())?;
        let x = cpu::slice(xs, xl, "group_norm")?;
        let a = cpu::slice(as_, al, "group_norm")?;
        let b = cpu::slice(bs, bl, "group_norm")?;
        let mut y = cpu::zeros(x.len());
        let (cg, s) = (g.cg(), g.s);
        let group_len = cg * s;
        if group_len > 0 {
            y.par_chunks_mut(group_len)
                .zip(x.par_chunks(group_len))
                .enumerate()
                .for_each(|(i, (yg, xg))| {
                    let (n, grp) = (i / g.groups, i % g.groups);
                    let ch = g.ab_index(n, grp * cg)..g.ab_index(n, grp * cg) + cg;
                    group_forward(xg, yg, s, &a[ch.clone()], &b[ch], self.eps, self.silu);
                });
        }
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::scope("group_norm.bwd");
        let g = Geometry::new(x.dims(), self.groups, a.dims(), b.dims())?;
        let dy = dy.contiguous()?;
        let (dx, da, db) = {
            let (xr, ar, br, dyr) = (
                Read::new(x, "group_norm")?,
                Read::new(a, "group_norm")?,
                Read::new(b, "group_norm")?,
                Read::new(&dy, "group_norm")?,
            );
            self.backward(&g, xr.as_slice(), ar.as_slice(), br.as_slice(), dyr.as_slice())
        };
        // da, db come per (sample, channel); a [C] gets the sum over samples.
        let reduce = |v: Vec<f32>| -> Vec<f32> {
            if g.per_sample {
                v
            } else {
                let mut out = vec![0f32; g.c];
                for row in v.chunks_exact(g.c.max(1)) {
                    out.iter_mut().zip(row).for_each(|(o, r)| *o += r);
                }
                out
            }
        };
        let dx = x.track_op().then(|| cpu::tensor(dx, x.shape())).transpose()?;
        let da = a
            .track_op()
            .then(|| cpu::tensor(reduce(da), a.shape()))
            .transpose()?;
        let db = b
            .track_op()
            .then(|| cpu::tensor(reduce(db), b.shape()))
            .transpose()?;
        Ok((dx, da, db))
    }
}

impl GroupNormAffine {
    /// `(dx [N, C, S], da [N, C], db [N, C])`.
    fn backward(
        &self,
        g: &Geometry,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        dy: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (cg, s) = (g.cg(), g.s);
        let group_len = cg * s;
        let mut dx = cpu::zeros(x.len());
        let mut da = vec![0f32; g.n * g.c];
        let mut db = vec![0f32; g.n * g.c];
        if group_len == 0 || cg == 0 {
            return (dx, da, db);
        }
        dx.par_chunks_mut(group_len)
            .zip(da.par_chunks_mut(cg).zip(db.par_chunks_mut(cg)))
            .enumerate()
            .for_each(|(i, (dxg, (dag, dbg)))| {
                let (n, grp) = (i / g.groups, i % g.groups);
                let base = i * group_len;
                let ch = g.ab_index(n, grp * cg)..g.ab_index(n, grp * cg) + cg;
                group_backward(
                    GroupIo {
                        x: &x[base..base + group_len],
                        dy: &dy[base..base + group_len],
                        dx: dxg,
                        da: dag,
                        db: dbg,
                    },
                    s,
                    &a[ch.clone()],
                    &b[ch],
                    self.eps,
                    self.silu,
                );
            });
        (dx, da, db)
    }
}

fn apply(x: &Tensor, groups: usize, a: &Tensor, b: &Tensor, eps: f64, silu: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        GroupNormAffine { groups, eps, silu },
    )
}

/// Fast `group_norm` (see [`crate::ops::group_norm`]).
pub fn group_norm(x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    apply(x, groups, gamma, beta, eps, false)
}

/// Fast `silu(group_norm(x))` (see [`crate::ops::group_norm_silu`]).
pub fn group_norm_silu(x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    apply(x, groups, gamma, beta, eps, true)
}

/// Fast `silu(group_norm(x) * (1 + scale) + shift)` (see
/// [`crate::ops::group_norm_scale_shift_silu`]): `a = gamma (1 + scale)`,
/// `b = beta (1 + scale) + shift`, then the fused kernel.
pub fn group_norm_scale_shift_silu(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    check_groups(c, groups)?;
    if scale.dims() != [n, c] || shift.dims() != [n, c] {
        bail!(
            "group_norm_scale_shift_silu: scale {:?} and shift {:?} must be [{n}, {c}]",
            scale.dims(),
            shift.dims()
        );
    }
    let one_plus_scale = (scale + 1.0)?;
    let a = one_plus_scale.broadcast_mul(gamma)?;
    let b = one_plus_scale.broadcast_mul(beta)?.add(shift)?;
    apply(x, groups, &a, &b, eps, true)
}
