//! A whole self-attention block (see [`crate::ops::attention_block`]) as one CPU op with its own
//! backward. Per image, with the `L = H W` positions as columns (the input's own layout, so no
//! transposes), `I = heads * d` inner channels:
//!
//! ```text
//! h   = group_norm(x)  (or x)                    [C, L]
//! Q   = Wq h + bq,  K = Wk h + bk,  V = Wv h + bv  [I, L]
//! P_j = softmax_rows(s Q_j^T K_j)                  [L, L]   head j (rows j d .. (j + 1) d), s = 1/sqrt(d)
//! O_j = V_j P_j^T                                  [d, L]
//! out = r (Wo O + bo + x)                          r = 1 / rescale_output_factor
//! ```
//!
//! Backward, given `dout`, with `dy = r dout`: `dWo += dy O^T`, `dbo += sum_l dy`, `dO = Wo^T dy`;
//! per head `dV_j = dO_j P_j`, `dP_j = dO_j^T V_j`, `dS_j = P_j * (dP_j - rowsum(dP_j * P_j))`
//! (Vaswani et al. 2017, the softmax Jacobian), `dQ_j = s K_j dS_j^T`, `dK_j = s Q_j dS_j`; then
//! `dW* += d* h^T`, `db* += sum_l d*`, `dh = Wq^T dQ + Wk^T dK + Wv^T dV`, and the group-norm
//! backward of `dh` plus the residual `dy` gives `dx`. Q, K, V and P are recomputed per image
//! in the backward pass; nothing is kept. The GEMMs are small (`[I, C] x [C, L]`, `[L, d] x [d, L]`)
//! and run single-threaded per image, images in parallel.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::cpu::{self, Read, Scratch, SyncPtr};
use super::norm::{check_groups, group_forward, image_backward, GroupIo};
use super::AttentionBlockParams;

/// Offsets of the packed parameters: `[gamma | beta | Wq | bq | Wk | bk | Wv | bv | Wo | bo]`.
#[derive(Clone, Copy, Debug)]
struct Pack {
    norm: usize,
    c: usize,
    i: usize,
}

impl Pack {
    fn len(&self) -> usize {
        2 * self.norm + 3 * (self.i * self.c + self.i) + self.c * self.i + self.c
    }
    fn gamma(&self) -> (usize, usize) {
        (0, self.norm)
    }
    fn beta(&self) -> (usize, usize) {
        (self.norm, self.norm)
    }
    /// Weight and bias of projection `k` (0 q, 1 k, 2 v).
    fn proj(&self, k: usize) -> ((usize, usize), (usize, usize)) {
        let at = 2 * self.norm + k * (self.i * self.c + self.i);
        ((at, self.i * self.c), (at + self.i * self.c, self.i))
    }
    fn out(&self) -> ((usize, usize), (usize, usize)) {
        let at = 2 * self.norm + 3 * (self.i * self.c + self.i);
        ((at, self.c * self.i), (at + self.c * self.i, self.c))
    }
}

fn part(v: &[f32], (at, len): (usize, usize)) -> &[f32] {
    &v[at..at + len]
}

struct AttnOp {
    n: usize,
    c: usize,
    l: usize,
    heads: usize,
    d: usize,
    /// `(groups, eps)` of the norm, if any.
    norm: Option<(usize, f64)>,
    /// `1 / rescale_output_factor`.
    r: f32,
    pack: Pack,
}

/// `dst [m, n] (+)= alpha lhs [m, k] rhs [k, n]` (row-major dst; operands by strides), one thread.
#[allow(clippy::too_many_arguments)]
fn mm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    acc: bool,
    lhs: &[f32],
    ls: (usize, usize),
    rhs: &[f32],
    rs: (usize, usize),
    alpha: f32,
) {
    cpu::gemm((m, n, k), dst, acc, lhs, ls, rhs, rs, alpha, false);
}

/// Per-image scratch.
struct Work {
    h: Scratch,
    qkv: Scratch,
    p: Scratch,
    o: Scratch,
}

impl AttnOp {
    fn i(&self) -> usize {
        self.heads * self.d
    }

    /// `h = norm(x_n)` (or a copy of `x_n`).
    fn normalise(&self, pack: &[f32], x_n: &[f32], h: &mut [f32]) {
        let Some((groups, eps)) = self.norm else {
            h.copy_from_slice(x_n);
            return;
        };
        let (gamma, beta) = (part(pack, self.pack.gamma()), part(pack, self.pack.beta()));
        let cg = self.c / groups;
        for g in 0..groups {
            let r = g * cg * self.l..(g + 1) * cg * self.l;
            let ch = g * cg..(g + 1) * cg;
            group_forward(
                &x_n[r.clone()],
                &mut h[r],
                self.l,
                &gamma[ch.clone()],
                &beta[ch],
                eps,
                false,
            );
        }
    }

    /// Q, K, V (`[3][I, L]`) from `h`, and per head `P_j` (`[heads][L, L]`) and `O` (`[I, L]`).
    fn attend(&self, pack: &[f32], w: &mut Work) {
        let (c, l, i, d) = (self.c, self.l, self.i(), self.d);
        for k in 0..3 {
            let (wk, bk) = self.pack.proj(k);
            let (wk, bk) = (part(pack, wk), part(pack, bk));
            let dst = &mut w.qkv[k * i * l..(k + 1) * i * l];
            for (row, &b) in dst.chunks_exact_mut(l).zip(bk) {
                row.fill(b);
            }
            mm((i, l, c), dst, true, wk, (c, 1), &w.h, (l, 1), 1.0);
        }
        let s = 1.0 / (d as f32).sqrt();
        for j in 0..self.heads {
            let q = &w.qkv[j * d * l..(j + 1) * d * l];
            let kk = &w.qkv[(i + j * d) * l..(i + (j + 1) * d) * l];
            let v = &w.qkv[(2 * i + j * d) * l..(2 * i + (j + 1) * d) * l];
            let p = &mut w.p[j * l * l..(j + 1) * l * l];
            // S [L, L] = s Q_j^T K_j
            mm((l, l, d), p, false, q, (1, l), kk, (l, 1), s);
            softmax_rows(p, l);
            // O_j [d, L] = V_j P_j^T
            mm(
                (d, l, l),
                &mut w.o[j * d * l..(j + 1) * d * l],
                false,
                v,
                (l, 1),
                p,
                (1, l),
                1.0,
            );
        }
    }

    fn forward(&self, x: &[f32], pack: &[f32]) -> Result<Vec<f32>> {
        if pack.len() != self.pack.len() {
            bail!(
                "attention block: {} packed values, expected {}",
                pack.len(),
                self.pack.len()
            );
        }
        let (c, l, i) = (self.c, self.l, self.i());
        super::profile::add_flops(
            "attn_block.fwd",
            2.0 * (self.n * l * (4 * i * c + 2 * l * i)) as f64,
        );
        let len = c * l;
        let mut out = cpu::zeros(self.n * len);
        let out_ptr = SyncPtr::new(&mut out);
        let ((wo, bo), _) = (self.pack.out(), ());
        let (wo, bo) = (part(pack, wo), part(pack, bo));
        cpu::for_batch(self.n, |images, _| {
            let mut w = self.work();
            for n in images {
                let x_n = &x[n * len..(n + 1) * len];
                self.normalise(pack, x_n, &mut w.h);
                self.attend(pack, &mut w);
                // SAFETY: image n owns out[n * len ..][.. len]; ranges are disjoint.
                let y = unsafe { out_ptr.slice(n * len, len) };
                for ((row, &b), xr) in y.chunks_exact_mut(l).zip(bo).zip(x_n.chunks_exact(l)) {
                    row.iter_mut().zip(xr).for_each(|(y, x)| *y = x + b);
                }
                mm((c, l, i), y, true, wo, (i, 1), &w.o, (l, 1), 1.0);
                if self.r != 1.0 {
                    y.iter_mut().for_each(|v| *v *= self.r);
                }
            }
        });
        Ok(out)
    }

    fn work(&self) -> Work {
        let (c, l, i) = (self.c, self.l, self.i());
        Work {
            h: Scratch::new(c * l),
            qkv: Scratch::new(3 * i * l),
            p: Scratch::new(self.heads * l * l),
            o: Scratch::new(i * l),
        }
    }

    /// `(dx, dpack)`, each only if asked for.
    fn backward(
        &self,
        x: &[f32],
        pack: &[f32],
        dout: &[f32],
        want_x: bool,
        want_p: bool,
    ) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        let (c, l, i, d) = (self.c, self.l, self.i(), self.d);
        super::profile::add_flops(
            "attn_block.bwd",
            2.0 * (self.n * l * (8 * i * c + 5 * l * i)) as f64,
        );
        let len = c * l;
        let s = 1.0 / (d as f32).sqrt();
        let mut dx = cpu::zeros(if want_x { self.n * len } else { 0 });
        let dx_ptr = SyncPtr::new(&mut dx);
        let ((wo_r, _), _) = (self.pack.out(), ());
        let wo = part(pack, wo_r);
        let partials = cpu::map_batch(self.n, |images, _| {
            let mut w = self.work();
            let mut dy = Scratch::new(len);
            let mut d_o = Scratch::new(i * l);
            let mut dqkv = Scratch::new(3 * i * l);
            let mut dp = Scratch::new(l * l);
            let mut dh = Scratch::new(len);
            let mut dxn = Scratch::new(len);
            let mut g = if want_p {
                vec![0f32; self.pack.len()]
            } else {
                Vec::new()
            };
            let (mut dgamma, mut dbeta) = (vec![0f32; c], vec![0f32; c]);
            for n in images {
                let x_n = &x[n * len..(n + 1) * len];
                dy.iter_mut()
                    .zip(&dout[n * len..(n + 1) * len])
                    .for_each(|(a, b)| *a = b * self.r);
                self.normalise(pack, x_n, &mut w.h);
                self.attend(pack, &mut w);
                if want_p {
                    let ((wo_r, bo_r), _) = (self.pack.out(), ());
                    // dWo [C, I] += dy [C, L] O^T [L, I]
                    mm(
                        (c, i, l),
                        &mut g[wo_r.0..wo_r.0 + wo_r.1],
                        true,
                        &dy,
                        (l, 1),
                        &w.o,
                        (1, l),
                        1.0,
                    );
                    add_row_sums(&dy, l, &mut g[bo_r.0..bo_r.0 + bo_r.1]);
                }
                // dO [I, L] = Wo^T [I, C] dy [C, L]
                mm((i, l, c), &mut d_o, false, wo, (1, i), &dy, (l, 1), 1.0);
                for j in 0..self.heads {
                    let rows = |k: usize| (k * i + j * d) * l..(k * i + (j + 1) * d) * l;
                    let (q, kk, v) = (&w.qkv[rows(0)], &w.qkv[rows(1)], &w.qkv[rows(2)]);
                    let p = &w.p[j * l * l..(j + 1) * l * l];
                    let doj = &d_o[j * d * l..(j + 1) * d * l];
                    // dV_j [d, L] = dO_j [d, L] P_j [L, L]
                    mm((d, l, l), &mut dqkv[rows(2)], false, doj, (l, 1), p, (l, 1), 1.0);
                    // dP [L, L] = dO_j^T [L, d] V_j [d, L]
                    mm((l, l, d), &mut dp, false, doj, (1, l), v, (l, 1), 1.0);
                    softmax_grad_rows(p, &mut dp, l);
                    // dQ_j [d, L] = s K_j [d, L] dS^T [L, L]
                    mm((d, l, l), &mut dqkv[rows(0)], false, kk, (l, 1), &dp, (1, l), s);
                    // dK_j [d, L] = s Q_j [d, L] dS [L, L]
                    mm((d, l, l), &mut dqkv[rows(1)], false, q, (l, 1), &dp, (l, 1), s);
                }
                // dh [C, L] = sum_k Wk^T [C, I] dk [I, L]; dWk += dk h^T, dbk += sum_l dk
                for k in 0..3 {
                    let (wk_r, bk_r) = self.pack.proj(k);
                    let dk = &dqkv[k * i * l..(k + 1) * i * l];
                    mm(
                        (c, l, i),
                        &mut dh,
                        k > 0,
                        part(pack, wk_r),
                        (1, c),
                        dk,
                        (l, 1),
                        1.0,
                    );
                    if want_p {
                        mm(
                            (i, c, l),
                            &mut g[wk_r.0..wk_r.0 + wk_r.1],
                            true,
                            dk,
                            (l, 1),
                            &w.h,
                            (1, l),
                            1.0,
                        );
                        add_row_sums(dk, l, &mut g[bk_r.0..bk_r.0 + bk_r.1]);
                    }
                }
                // norm backward (or dx = dh), plus the residual dy
                match self.norm {
                    Some((groups, eps)) => {
                        let (gamma, beta) = (part(pack, self.pack.gamma()), part(pack, self.pack.beta()));
                        let (mut da, mut db) = (vec![0f32; c], vec![0f32; c]);
                        image_backward(
                            GroupIo {
                                x: x_n,
                                dy: &dh,
                                dx: &mut dxn,
                                da: &mut da,
                                db: &mut db,
                            },
                            l,
                            groups,
                            &gamma[..c],
                            &beta[..c],
                            eps,
                            false,
                        );
                        dgamma.iter_mut().zip(&da).for_each(|(a, b)| *a += b);
                        dbeta.iter_mut().zip(&db).for_each(|(a, b)| *a += b);
                    }
                    None => dxn.copy_from_slice(&dh),
                }
                if want_x {
                    // SAFETY: image n owns dx[n * len ..][.. len]; ranges are disjoint.
                    let dst = unsafe { dx_ptr.slice(n * len, len) };
                    for ((o, a), b) in dst.iter_mut().zip(dxn.iter()).zip(dy.iter()) {
                        *o = a + b;
                    }
                }
            }
            if want_p && self.pack.norm > 0 {
                g[..c].copy_from_slice(&dgamma);
                g[c..2 * c].copy_from_slice(&dbeta);
            }
            g
        });
        let dpack = want_p.then(|| {
            let mut it = partials.into_iter();
            let mut sum = it.next().unwrap_or_else(|| vec![0f32; self.pack.len()]);
            for p in it {
                sum.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
            }
            sum
        });
        (want_x.then_some(dx), dpack)
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

cpu::simd_fn! {
    /// `sums[c] += sum of row c` for rows of length `l`.
    fn add_row_sums(v: &[f32], l: usize, sums: &mut [f32]) {
        for (s, row) in sums.iter_mut().zip(v.chunks_exact(l.max(1))) {
            *s += cpu::sum_lanes(row) as f32;
        }
    }
}

impl CustomOp2 for AttnOp {
    fn name(&self) -> &'static str {
        "fast-attention-block"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _prof = super::profile::scope("attn_block.fwd");
        let x = cpu::slice(xs, xl, "attention block")?;
        let p = cpu::slice(ps, pl, "attention block")?;
        Ok((CpuStorage::F32(self.forward(x, p)?), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        pack: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::scope("attn_block.bwd");
        let dy = dy.contiguous()?;
        let (dx, dp) = {
            let (xr, pr, dr) = (
                Read::new(x, "attention block")?,
                Read::new(pack, "attention block")?,
                Read::new(&dy, "attention block")?,
            );
            self.backward(
                xr.as_slice(),
                pr.as_slice(),
                dr.as_slice(),
                x.track_op(),
                pack.track_op(),
            )
        };
        Ok((
            dx.map(|v| cpu::tensor(v, x.shape())).transpose()?,
            dp.map(|v| cpu::tensor(v, pack.shape())).transpose()?,
        ))
    }
}

/// The fused block (see [`crate::ops::attention_block`]).
pub fn attention_block(x: &Tensor, p: &AttentionBlockParams<'_>) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let inner = p.q.0.dim(0)?;
    if p.heads == 0 || inner % p.heads != 0 {
        bail!(
            "attention block: {inner} inner channels cannot be split into {} heads",
            p.heads
        );
    }
    for (what, (wt, b), (rows, cols)) in [
        ("to_q", p.q, (inner, c)),
        ("to_k", p.k, (inner, c)),
        ("to_v", p.v, (inner, c)),
        ("to_out", p.out, (c, inner)),
    ] {
        if wt.dims() != [rows, cols] || b.dims() != [rows] {
            bail!(
                "attention block: {what} has weight {:?} and bias {:?}, expected [{rows}, {cols}] and [{rows}]",
                wt.dims(),
                b.dims()
            );
        }
    }
    let mut parts = Vec::new();
    let norm = match p.norm {
        Some((groups, eps, gamma, beta)) => {
            check_groups(c, groups)?;
            if gamma.dims() != [c] || beta.dims() != [c] {
                bail!(
                    "attention block: norm scale {:?} and shift {:?}, expected [{c}]",
                    gamma.dims(),
                    beta.dims()
                );
            }
            parts.extend([gamma.clone(), beta.clone()]);
            Some((groups, eps))
        }
        None => None,
    };
    for (wt, b) in [p.q, p.k, p.v, p.out] {
        parts.push(wt.flatten_all()?);
        parts.push(b.clone());
    }
    let pack = Tensor::cat(&parts, 0)?;
    let op = AttnOp {
        n,
        c,
        l: h * w,
        heads: p.heads,
        d: inner / p.heads,
        norm,
        r: (1.0 / p.rescale_output_factor) as f32,
        pack: Pack {
            norm: if norm.is_some() { c } else { 0 },
            c,
            i: inner,
        },
    };
    x.contiguous()?.apply_op2(&pack, op)
}
