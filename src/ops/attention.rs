//! Fast CPU scaled dot-product attention with its own backward (Vaswani et al. 2017, eq. 1):
//!
//! ```text
//! S = scale * Q K^T        [L_q, L_k]
//! P = softmax_rows(S)
//! O = P V                  [L_q, D_v]
//! ```
//!
//! Backward, given `dO`: `dV = P^T dO`, `dP = dO V^T`,
//! `dS = P * (dP - rowsum(dP * P))` (softmax Jacobian, `*` element-wise),
//! `dQ = scale * dS K`, `dK = scale * dS^T Q`.
//!
//! Batch items run in parallel, each with `[L_q, L_k]` scratch; `P` is recomputed in the backward
//! pass (one GEMM) rather than stored, so the op keeps nothing beyond its inputs.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu::{self, Read, Scratch, SyncPtr};

#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
}

impl Geometry {
    fn new(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        match (q, k, v) {
            ([b, lq, d], [bk, lk, dk], [bv, lv, dv]) if b == bk && b == bv && d == dk && lk == lv => {
                Ok(Self {
                    b: *b,
                    lq: *lq,
                    lk: *lk,
                    d: *d,
                    dv: *dv,
                })
            }
            _ => bail!(
                "attention: expected q [B, Lq, D], k [B, Lk, D], v [B, Lk, Dv], got {q:?}, {k:?}, {v:?}"
            ),
        }
    }
}

cpu::simd_fn! {
    /// Row-wise softmax in place: `p_ij = exp(s_ij - max_j s_ij) / sum_j exp(s_ij - max_j s_ij)`.
    fn softmax_rows(s: &mut [f32], cols: usize) {
        for row in s.chunks_exact_mut(cols) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = cpu::exp(*v - max);
                sum += *v;
            }
            let inv = 1.0 / sum;
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

cpu::simd_fn! {
    /// `dS = P * (dP - rowsum(dP * P))`, in place in `dp`.
    fn softmax_grad_rows(p: &[f32], dp: &mut [f32], cols: usize) {
        for (prow, drow) in p.chunks_exact(cols).zip(dp.chunks_exact_mut(cols)) {
            let dot: f32 = prow.iter().zip(drow.iter()).map(|(p, d)| p * d).sum();
            for (d, &p) in drow.iter_mut().zip(prow) {
                *d = p * (*d - dot);
            }
        }
    }
}

/// `P = softmax(scale * q k^T)` for one batch item, into `p [Lq, Lk]`.
fn probabilities(g: &Geometry, q: &[f32], k: &[f32], scale: f32, p: &mut [f32], par: bool) {
    // S [Lq, Lk] = scale * q [Lq, D] k^T [D, Lk]
    cpu::gemm((g.lq, g.lk, g.d), p, false, q, (g.d, 1), k, (1, g.d), scale, par);
    if g.lk > 0 {
        softmax_rows(p, g.lk);
    }
}

struct Attention {
    scale: f32,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fast-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _prof = super::profile::scope("attention.fwd");
        let g = Geometry::new(ql.dims(), kl.dims(), vl.dims())?;
        let (q, k, v) = (
            cpu::slice(qs, ql, "attention")?,
            cpu::slice(ks, kl, "attention")?,
            cpu::slice(vs, vl, "attention")?,
        );
        super::profile::add_flops("attention.fwd", 2.0 * (g.b * g.lq * g.lk * (g.d + g.dv)) as f64);
        let mut o = cpu::zeros(g.b * g.lq * g.dv);
        let out = SyncPtr::new(&mut o);
        let item = |i: usize, p: &mut [f32], par: bool| {
            let qi = &q[i * g.lq * g.d..(i + 1) * g.lq * g.d];
            let ki = &k[i * g.lk * g.d..(i + 1) * g.lk * g.d];
            let vi = &v[i * g.lk * g.dv..(i + 1) * g.lk * g.dv];
            probabilities(&g, qi, ki, self.scale, p, par);
            // SAFETY: item i owns o[i * Lq * Dv ..][.. Lq * Dv]; items are disjoint.
            let oi = unsafe { out.slice(i * g.lq * g.dv, g.lq * g.dv) };
            // O [Lq, Dv] = P [Lq, Lk] V [Lk, Dv]
            cpu::gemm(
                (g.lq, g.dv, g.lk),
                oi,
                false,
                p,
                (g.lk, 1),
                vi,
                (g.dv, 1),
                1.0,
                par,
            );
        };
        cpu::for_batch(g.b, |items, par| {
            let mut p = Scratch::new(g.lq * g.lk);
            for i in items {
                item(i, &mut p, par);
            }
        });
        Ok((CpuStorage::F32(o), Shape::from((g.b, g.lq, g.dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        d_o: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::scope("attention.bwd");
        let g = Geometry::new(q.dims(), k.dims(), v.dims())?;
        let d_o = d_o.contiguous()?;
        super::profile::add_flops(
            "attention.bwd",
            2.0 * (g.b * g.lq * g.lk * (3 * g.d + 2 * g.dv)) as f64,
        );
        let mut dq = cpu::zeros(g.b * g.lq * g.d);
        let mut dk = cpu::zeros(g.b * g.lk * g.d);
        let mut dv = cpu::zeros(g.b * g.lk * g.dv);
        {
            let (qr, kr, vr, dor) = (
                Read::new(q, "attention")?,
                Read::new(k, "attention")?,
                Read::new(v, "attention")?,
                Read::new(&d_o, "attention")?,
            );
            let (q, k, v, d_o) = (qr.as_slice(), kr.as_slice(), vr.as_slice(), dor.as_slice());
            let (dq_out, dk_out, dv_out) = (
                SyncPtr::new(&mut dq),
                SyncPtr::new(&mut dk),
                SyncPtr::new(&mut dv),
            );
            let scale = self.scale;
            let item = |i: usize, p: &mut [f32], dp: &mut [f32], par: bool| {
                let qi = &q[i * g.lq * g.d..(i + 1) * g.lq * g.d];
                let ki = &k[i * g.lk * g.d..(i + 1) * g.lk * g.d];
                let vi = &v[i * g.lk * g.dv..(i + 1) * g.lk * g.dv];
                let doi = &d_o[i * g.lq * g.dv..(i + 1) * g.lq * g.dv];
                // SAFETY: item i owns its slices of dq, dk, dv; items are disjoint.
                let (dqi, dki, dvi) = unsafe {
                    (
                        dq_out.slice(i * g.lq * g.d, g.lq * g.d),
                        dk_out.slice(i * g.lk * g.d, g.lk * g.d),
                        dv_out.slice(i * g.lk * g.dv, g.lk * g.dv),
                    )
                };
                probabilities(&g, qi, ki, scale, p, par);
                // dV [Lk, Dv] = P^T [Lk, Lq] dO [Lq, Dv]
                cpu::gemm(
                    (g.lk, g.dv, g.lq),
                    dvi,
                    false,
                    p,
                    (1, g.lk),
                    doi,
                    (g.dv, 1),
                    1.0,
                    par,
                );
                // dP [Lq, Lk] = dO [Lq, Dv] V^T [Dv, Lk]
                cpu::gemm(
                    (g.lq, g.lk, g.dv),
                    dp,
                    false,
                    doi,
                    (g.dv, 1),
                    vi,
                    (1, g.dv),
                    1.0,
                    par,
                );
                if g.lk > 0 {
                    softmax_grad_rows(p, dp, g.lk);
                }
                // dQ [Lq, D] = scale * dS [Lq, Lk] K [Lk, D]
                cpu::gemm(
                    (g.lq, g.d, g.lk),
                    dqi,
                    false,
                    dp,
                    (g.lk, 1),
                    ki,
                    (g.d, 1),
                    scale,
                    par,
                );
                // dK [Lk, D] = scale * dS^T [Lk, Lq] Q [Lq, D]
                cpu::gemm(
                    (g.lk, g.d, g.lq),
                    dki,
                    false,
                    dp,
                    (1, g.lk),
                    qi,
                    (g.d, 1),
                    scale,
                    par,
                );
            };
            cpu::for_batch(g.b, |items, par| {
                let mut p = Scratch::new(g.lq * g.lk);
                let mut dp = Scratch::new(g.lq * g.lk);
                for i in items {
                    item(i, &mut p, &mut dp, par);
                }
            });
        }
        let dq = q.track_op().then(|| cpu::tensor(dq, q.shape())).transpose()?;
        let dk = k.track_op().then(|| cpu::tensor(dk, k.shape())).transpose()?;
        let dv = v.track_op().then(|| cpu::tensor(dv, v.shape())).transpose()?;
        Ok((dq, dk, dv))
    }
}

/// Fast `attention` (see [`crate::ops::attention()`]).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention { scale: scale as f32 },
    )
}
