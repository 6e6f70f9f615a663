//! A whole ResNet block as one CPU op with its own backward (see [`crate::ops::resnet_block`]
//! for the formula). Per image `n`, with `x_n = [x_a; x_b]` (the concatenation, copied per image
//! into scratch), `P` pixels:
//!
//! ```text
//! u_n   = silu(a1 * norm(x_n) + b1)                      [C_in, P]   scratch
//! h_n   = W1 * u_n + bias1 + cb_n                         [C_out, P]  kept for the backward pass
//! g_n   = silu(a2_n * norm(h_n) + b2_n) * mask_n          [C_out, P]  scratch (mask: 0 or 1/(1-p))
//! r_n   = Ws x_n + bs   (or x_n)                          [C_out, P]  scratch
//! out_n = s (W2 * g_n + bias2 + r_n)                      s = 1 / output_scale_factor
//! ```
//!
//! (`*` a 3x3 convolution, by the direct kernels of [`super::direct`]; `a2`, `b2` are per
//! sample with scale-shift conditioning, `a2 = gamma2 (1 + scale)`, `b2 = beta2 (1 + scale) +
//! shift`, formed by candle ops outside.) Backward, given `dout_n`, with `dy = s dout_n`:
//!
//! ```text
//! dW2 += dy (x) g_n,  dbias2 += sum_pixels dy,  dg = mask_n (W2^T * dy)
//! dh_n, da2_n, db2_n  = group-norm + SiLU backward of dg at h_n       (super::norm)
//! dWs += dy (x) x_n,  dbs += sum_pixels dy,  dx_n = Ws^T dy   (or dx_n = dy)
//! dW1 += dh_n (x) u_n,  dbias1 += sum_pixels dh_n,  dcb_n = sum_pixels dh_n,  du = W1^T * dh_n
//! dx_n += group-norm + SiLU backward of du at x_n  (and da1, db1)
//! ```
//!
//! `u_n` and `g_n` are recomputed in the backward pass (one pass over memory each); `h` is kept
//! (the op holds it until its backward pass runs, or drops it with the graph). Without gradients
//! (sampling) nothing is kept: each image's `h_n` lives in scratch. Compared with the staged ops
//! candle's autodiff sees one node instead of five (cat, two conv blocks, the shortcut and their
//! edges), each of which costs a zero-filled gradient buffer and an add per input in candle's
//! backward pass.
//!
//! The small inputs travel packed in one tensor (candle custom ops take at most three), in the
//! order of [`Pack`]; `Tensor::cat` routes their gradients back.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::conv::Geometry;
use super::cpu::{self, Read, Scratch, SyncPtr};
use super::direct::{Direct, WeightGrad};
use super::norm::{check_groups, group_forward, image_backward, GroupIo};
use super::{ResnetBlockParams, TimeCondition};

/// Offsets and lengths of the packed small inputs.
#[derive(Clone, Copy, Debug, Default)]
struct Pack {
    a1: (usize, usize),
    b1: (usize, usize),
    w1: (usize, usize),
    bias1: (usize, usize),
    cb: (usize, usize),
    a2: (usize, usize),
    b2: (usize, usize),
    w2: (usize, usize),
    bias2: (usize, usize),
    ws: (usize, usize),
    bs: (usize, usize),
    len: usize,
}

impl Pack {
    fn new(lens: [usize; 11]) -> Self {
        let mut at = 0;
        let mut next = |len: usize| {
            let r = (at, len);
            at += len;
            r
        };
        let mut p = Pack {
            a1: next(lens[0]),
            b1: next(lens[1]),
            w1: next(lens[2]),
            bias1: next(lens[3]),
            cb: next(lens[4]),
            a2: next(lens[5]),
            b2: next(lens[6]),
            w2: next(lens[7]),
            bias2: next(lens[8]),
            ws: next(lens[9]),
            bs: next(lens[10]),
            len: 0,
        };
        p.len = at;
        p
    }
}

fn part(v: &[f32], (at, len): (usize, usize)) -> &[f32] {
    &v[at..at + len]
}

/// The block's shapes and settings.
#[derive(Clone, Debug)]
struct Dims {
    n: usize,
    c_a: usize,
    c_b: usize,
    c_out: usize,
    h: usize,
    w: usize,
    groups: usize,
    eps: f64,
    /// `a2`, `b2` are `[N, C_out]` (scale-shift).
    per_sample2: bool,
    shortcut: bool,
    /// `1 / output_scale_factor`.
    scale: f32,
}

impl Dims {
    fn c_in(&self) -> usize {
        self.c_a + self.c_b
    }
    fn p(&self) -> usize {
        self.h * self.w
    }
}

/// The op: `CustomOp2(x, pack)` or `CustomOp3(x, skip, pack)`.
struct ResnetOp {
    d: Dims,
    pack: Pack,
    /// Dropout mask over `[N, C_out, P]`, if any.
    mask: Option<super::DropoutMask>,
    /// Keep `h` for the backward pass.
    keep: bool,
    kept: Mutex<Option<Vec<f32>>>,
}

/// `(dx_a, dx_b, dpack)`, each when asked for.
type InputGrads = (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>);

/// Which gradients to compute.
#[derive(Clone, Copy)]
struct Want {
    a: bool,
    b: bool,
    pack: bool,
}

/// The kernels and packed weights of one call.
struct Kernels {
    d3: Direct,
    d1: Option<Direct>,
    wp1: Vec<f32>,
    wp2: Vec<f32>,
    wps: Vec<f32>,
}

impl ResnetOp {
    fn kernels(&self, pack: &[f32], transposed: bool) -> Result<Kernels> {
        let d = &self.d;
        let geo =
            |c_in: usize, k: usize| Geometry::new(&[1, c_in, d.h, d.w], &[d.c_out, c_in, k, k], 1, k / 2);
        let Some(d3) = Direct::new(&geo(d.c_in(), 3)?) else {
            bail!("resnet block: the fused op needs the direct convolution kernels (AVX-512)")
        };
        let d1 = if d.shortcut {
            Direct::new(&geo(d.c_in(), 1)?)
        } else {
            None
        };
        let (c_in, c_out) = (d.c_in(), d.c_out);
        let (w1, w2) = (part(pack, self.pack.w1), part(pack, self.pack.w2));
        let (wp1, wp2, wps) = if transposed {
            (
                d3.pack_transposed(w1, c_out, c_in),
                d3.pack_transposed(w2, c_out, c_out),
                d1.as_ref().map_or(Vec::new(), |d1| {
                    d1.pack_transposed(part(pack, self.pack.ws), c_out, c_in)
                }),
            )
        } else {
            (
                d3.pack(w1, c_out, c_in),
                d3.pack(w2, c_out, c_out),
                d1.as_ref()
                    .map_or(Vec::new(), |d1| d1.pack(part(pack, self.pack.ws), c_out, c_in)),
            )
        };
        let (d3, d1) = if transposed {
            (d3.transposed(), d1.map(|d| d.transposed()))
        } else {
            (d3, d1)
        };
        Ok(Kernels {
            d3,
            d1,
            wp1,
            wp2,
            wps,
        })
    }

    /// `x_n` (the concatenation of image `n` of both inputs) into `buf`, or `x_a`'s image itself.
    fn image<'a>(&self, xa: &'a [f32], xb: Option<&[f32]>, n: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let p = self.d.p();
        let la = self.d.c_a * p;
        let xa_n = &xa[n * la..(n + 1) * la];
        match xb {
            None => xa_n,
            Some(xb) => {
                let lb = self.d.c_b * p;
                buf[..la].copy_from_slice(xa_n);
                buf[la..la + lb].copy_from_slice(&xb[n * lb..(n + 1) * lb]);
                &buf[..la + lb]
            }
        }
    }

    /// `out = silu(a * norm(x) + b)` for one image of `c` channels (per-channel `a`, `b`).
    fn norm_silu(&self, x: &[f32], c: usize, a: &[f32], b: &[f32], out: &mut [f32]) {
        let (p, groups) = (self.d.p(), self.d.groups);
        let cg = c / groups;
        for g in 0..groups {
            let r = g * cg * p..(g + 1) * cg * p;
            let ch = g * cg..(g + 1) * cg;
            group_forward(
                &x[r.clone()],
                &mut out[r],
                p,
                &a[ch.clone()],
                &b[ch],
                self.d.eps,
                true,
            );
        }
    }

    /// Rows `n` of the norm2 affine (`a2`, `b2`).
    fn affine2<'a>(&self, pack: &'a [f32], n: usize) -> (&'a [f32], &'a [f32]) {
        let (a2, b2) = (part(pack, self.pack.a2), part(pack, self.pack.b2));
        let c = self.d.c_out;
        if self.d.per_sample2 {
            (&a2[n * c..(n + 1) * c], &b2[n * c..(n + 1) * c])
        } else {
            (a2, b2)
        }
    }

    /// `h_n = W1 * u_n + bias1 + cb_n` (with `u_n` computed into `u`).
    #[allow(clippy::too_many_arguments)]
    fn stage1(
        &self,
        k: &Kernels,
        pack: &[f32],
        x_n: &[f32],
        n: usize,
        u: &mut [f32],
        init: &mut [f32],
        h_n: &mut [f32],
    ) {
        let d = &self.d;
        let c_in = d.c_in();
        self.norm_silu(x_n, c_in, part(pack, self.pack.a1), part(pack, self.pack.b1), u);
        init.copy_from_slice(part(pack, self.pack.bias1));
        if self.pack.cb.1 > 0 {
            let cb = &part(pack, self.pack.cb)[n * d.c_out..(n + 1) * d.c_out];
            init.iter_mut().zip(cb).for_each(|(i, c)| *i += c);
        }
        k.d3.conv(u, c_in, &k.wp1, init, None, h_n, d.c_out);
    }

    /// `g_n = silu(a2 norm(h_n) + b2) * mask_n`.
    fn activation2(&self, pack: &[f32], h_n: &[f32], n: usize, g: &mut [f32]) {
        let (a2, b2) = self.affine2(pack, n);
        self.norm_silu(h_n, self.d.c_out, a2, b2, g);
        if let Some(mask) = &self.mask {
            mask.apply(n * self.d.c_out * self.d.p(), g);
        }
    }

    fn forward(&self, xa: &[f32], xb: Option<&[f32]>, pack: &[f32]) -> Result<Vec<f32>> {
        let d = &self.d;
        if pack.len() != self.pack.len {
            bail!(
                "resnet block: {} packed values, expected {}",
                pack.len(),
                self.pack.len
            );
        }
        let k = self.kernels(pack, false)?;
        let (p, c_in, c_out) = (d.p(), d.c_in(), d.c_out);
        super::profile::add_flops(
            "resnet.fwd",
            2.0 * (d.n * c_out * p * (9 * c_in + 9 * c_out + if d.shortcut { c_in } else { 0 })) as f64,
        );
        let out_len = c_out * p;
        let mut out = cpu::zeros(d.n * out_len);
        let mut kept = if self.keep {
            cpu::zeros(d.n * out_len)
        } else {
            Vec::new()
        };
        let (out_ptr, kept_ptr) = (SyncPtr::new(&mut out), SyncPtr::new(&mut kept));
        cpu::for_batch(d.n, |images, _| {
            let mut xcat = Scratch::new(if d.c_b > 0 { c_in * p } else { 0 });
            let mut u = Scratch::new(c_in * p);
            let mut g = Scratch::new(out_len);
            let mut h_scratch = Scratch::new(if self.keep { 0 } else { out_len });
            let mut r = Scratch::new(if d.shortcut { out_len } else { 0 });
            let mut init = vec![0f32; c_out];
            for n in images {
                let _s = super::profile::scope("resnet.fwd/cat");
                let x_n = self.image(xa, xb, n, &mut xcat);
                drop(_s);
                // SAFETY: image n owns its rows of `kept` and `out`; ranges are disjoint.
                let h_n: &mut [f32] = if self.keep {
                    unsafe { kept_ptr.slice(n * out_len, out_len) }
                } else {
                    &mut h_scratch
                };
                let _s = super::profile::scope("resnet.fwd/stage1");
                self.stage1(&k, pack, x_n, n, &mut u, &mut init, h_n);
                drop(_s);
                let _s = super::profile::scope("resnet.fwd/act2");
                self.activation2(pack, h_n, n, &mut g);
                drop(_s);
                let _s = super::profile::scope("resnet.fwd/shortcut+conv2");
                let residual: &[f32] = match &k.d1 {
                    Some(d1) => {
                        d1.conv(x_n, c_in, &k.wps, part(pack, self.pack.bs), None, &mut r, c_out);
                        &r
                    }
                    None => x_n,
                };
                let out_n = unsafe { out_ptr.slice(n * out_len, out_len) };
                k.d3.conv(
                    &g,
                    c_out,
                    &k.wp2,
                    part(pack, self.pack.bias2),
                    Some(residual),
                    out_n,
                    c_out,
                );
                if d.scale != 1.0 {
                    out_n.iter_mut().for_each(|v| *v *= d.scale);
                }
            }
        });
        if self.keep {
            if let Ok(mut slot) = self.kept.lock() {
                *slot = Some(kept);
            }
        }
        Ok(out)
    }

    /// `(dx_a, dx_b, dpack)`, each only if asked for.
    fn backward(
        &self,
        xa: &[f32],
        xb: Option<&[f32]>,
        pack: &[f32],
        dout: &[f32],
        want: Want,
    ) -> Result<InputGrads> {
        let d = &self.d;
        let k = self.kernels(pack, true)?;
        let (p, c_in, c_out, n_img) = (d.p(), d.c_in(), d.c_out, d.n);
        super::profile::add_flops(
            "resnet.bwd",
            4.0 * (n_img * c_out * p * (9 * c_in + 9 * c_out + if d.shortcut { c_in } else { 0 })) as f64,
        );
        let out_len = c_out * p;
        let kept = self.kept.lock().ok().and_then(|mut s| s.take());
        let kept = match kept {
            Some(v) if v.len() == n_img * out_len => Some(v),
            _ => None,
        };
        let want_x = want.a || want.b;
        let (la, lb) = (d.c_a * p, d.c_b * p);
        let mut dxa = cpu::zeros(if want.a { n_img * la } else { 0 });
        let mut dxb = cpu::zeros(if want.b { n_img * lb } else { 0 });
        // per-sample gradients: channel bias [N, C_out]; a2, b2 [N, C_out] (summed later unless
        // per sample); a1, b1 [N, C_in] (summed later)
        let per_n = if want.pack { n_img } else { 0 };
        let mut dcb = vec![0f32; if self.pack.cb.1 > 0 { per_n * c_out } else { 0 }];
        let (mut da2, mut db2) = (vec![0f32; per_n * c_out], vec![0f32; per_n * c_out]);
        let (mut da1, mut db1) = (vec![0f32; per_n * c_in], vec![0f32; per_n * c_in]);
        let ptrs = [
            SyncPtr::new(&mut dxa),
            SyncPtr::new(&mut dxb),
            SyncPtr::new(&mut dcb),
            SyncPtr::new(&mut da2),
            SyncPtr::new(&mut db2),
            SyncPtr::new(&mut da1),
            SyncPtr::new(&mut db1),
        ];
        // forward kernels: for the weight gradients' activations, or to recompute h
        let wk = if want.pack || kept.is_none() {
            Some(self.kernels(pack, false)?)
        } else {
            None
        };
        let run = |images: std::ops::Range<usize>, _: bool| -> [Vec<f32>; 6] {
            let mut xcat = Scratch::new(if d.c_b > 0 { c_in * p } else { 0 });
            let mut u = Scratch::new(c_in * p);
            let mut g = Scratch::new(out_len);
            let mut h_scratch = Scratch::new(if kept.is_some() { 0 } else { out_len });
            let mut dy_s = Scratch::new(if d.scale != 1.0 { out_len } else { 0 });
            let mut dg = Scratch::new(out_len);
            let mut dh = Scratch::new(out_len);
            let mut dx = Scratch::new(c_in * p);
            let mut du = Scratch::new(c_in * p);
            let mut dxg = Scratch::new(c_in * p);
            let mut init = vec![0f32; c_out];
            let mut sums_n = vec![0f32; c_out];
            let zeros = vec![0f32; c_in.max(c_out)];
            // weight gradients with the forward taps (`wk` exists when they are wanted)
            let fwd = wk.as_ref().filter(|_| want.pack);
            let mut wg1 = fwd.map(|f| WeightGrad::new(&f.d3, c_out, c_in));
            let mut wg2 = fwd.map(|f| WeightGrad::new(&f.d3, c_out, c_out));
            let mut wgs = fwd
                .and_then(|f| f.d1.as_ref())
                .map(|d1| WeightGrad::new(d1, c_out, c_in));
            let (mut dbias1, mut dbias2, mut dbs) = (vec![0f32; c_out], vec![0f32; c_out], vec![0f32; c_out]);
            let (mut da1_l, mut db1_l) = (vec![0f32; c_in], vec![0f32; c_in]);
            let (mut da2_l, mut db2_l) = (vec![0f32; c_out], vec![0f32; c_out]);
            for n in images {
                let x_n = self.image(xa, xb, n, &mut xcat);
                let dout_n = &dout[n * out_len..(n + 1) * out_len];
                let dy: &[f32] = if d.scale != 1.0 {
                    dy_s.iter_mut().zip(dout_n).for_each(|(a, b)| *a = b * d.scale);
                    &dy_s
                } else {
                    dout_n
                };
                // h_n: kept, or recomputed (then u_n comes with it)
                let h_n: &[f32] = match &kept {
                    Some(v) => &v[n * out_len..(n + 1) * out_len],
                    None => {
                        // nothing kept (a second backward pass): recompute h_n (and u_n)
                        if let Some(kf) = &wk {
                            self.stage1(kf, pack, x_n, n, &mut u, &mut init, &mut h_scratch);
                        }
                        &h_scratch
                    }
                };
                // second stage
                if let Some(wg) = &mut wg2 {
                    let _s = super::profile::scope("resnet.bwd/act2");
                    self.activation2(pack, h_n, n, &mut g);
                    drop(_s);
                    let _s = super::profile::scope("resnet.bwd/wgrad2");
                    wg.add_image(dy, &g);
                    add_row_sums(dy, p, &mut dbias2);
                }
                let _s = super::profile::scope("resnet.bwd/dconv2");
                k.d3.conv(dy, c_out, &k.wp2, &zeros[..c_out], None, &mut dg, c_out);
                drop(_s);
                if let Some(mask) = &self.mask {
                    mask.apply(n * out_len, &mut dg);
                }
                let (a2, b2) = self.affine2(pack, n);
                let _s = super::profile::scope("resnet.bwd/gn2");
                self.norm_silu_backward(h_n, &dg, c_out, a2, b2, &mut dh, &mut da2_l, &mut db2_l);
                drop(_s);
                // shortcut
                let _s = super::profile::scope("resnet.bwd/shortcut");
                if want_x {
                    match &k.d1 {
                        Some(d1) => d1.conv(dy, c_out, &k.wps, &zeros[..c_in], None, &mut dx, c_in),
                        None => dx.copy_from_slice(dy),
                    }
                }
                if let Some(wg) = &mut wgs {
                    wg.add_image(dy, x_n);
                    add_row_sums(dy, p, &mut dbs);
                }
                drop(_s);
                // first stage
                if let Some(wg) = &mut wg1 {
                    let _s = super::profile::scope("resnet.bwd/act1");
                    if kept.is_some() {
                        self.norm_silu(
                            x_n,
                            c_in,
                            part(pack, self.pack.a1),
                            part(pack, self.pack.b1),
                            &mut u,
                        );
                    }
                    drop(_s);
                    let _s = super::profile::scope("resnet.bwd/wgrad1");
                    wg.add_image(&dh, &u);
                    sums_n.fill(0.0);
                    add_row_sums(&dh, p, &mut sums_n);
                    dbias1.iter_mut().zip(&sums_n).for_each(|(a, b)| *a += b);
                    if self.pack.cb.1 > 0 {
                        // SAFETY: image n owns row n of dcb.
                        unsafe { ptrs[2].slice(n * c_out, c_out) }.copy_from_slice(&sums_n);
                    }
                }
                let _s = super::profile::scope("resnet.bwd/dconv1");
                k.d3.conv(&dh, c_out, &k.wp1, &zeros[..c_in], None, &mut du, c_in);
                drop(_s);
                let _s = super::profile::scope("resnet.bwd/gn1");
                self.norm_silu_backward(
                    x_n,
                    &du,
                    c_in,
                    part(pack, self.pack.a1),
                    part(pack, self.pack.b1),
                    &mut dxg,
                    &mut da1_l,
                    &mut db1_l,
                );
                drop(_s);
                let _s = super::profile::scope("resnet.bwd/copy");
                if want.pack {
                    // SAFETY: image n owns rows n of da2, db2, da1, db1.
                    unsafe {
                        ptrs[3].slice(n * c_out, c_out).copy_from_slice(&da2_l);
                        ptrs[4].slice(n * c_out, c_out).copy_from_slice(&db2_l);
                        ptrs[5].slice(n * c_in, c_in).copy_from_slice(&da1_l);
                        ptrs[6].slice(n * c_in, c_in).copy_from_slice(&db1_l);
                    }
                }
                if want_x {
                    dx.iter_mut().zip(dxg.iter()).for_each(|(a, b)| *a += b);
                    // SAFETY: image n owns its rows of dxa, dxb.
                    if want.a {
                        unsafe { ptrs[0].slice(n * la, la) }.copy_from_slice(&dx[..la]);
                    }
                    if want.b {
                        unsafe { ptrs[1].slice(n * lb, lb) }.copy_from_slice(&dx[la..la + lb]);
                    }
                }
            }
            [
                wg1.map_or(Vec::new(), WeightGrad::finish),
                dbias1,
                wg2.map_or(Vec::new(), WeightGrad::finish),
                dbias2,
                wgs.map_or(Vec::new(), WeightGrad::finish),
                dbs,
            ]
        };
        let partials = cpu::map_batch(n_img, run);
        let dpack = if want.pack {
            let mut sums: [Vec<f32>; 6] = Default::default();
            for part_n in partials {
                for (s, v) in sums.iter_mut().zip(part_n) {
                    if s.is_empty() {
                        *s = v;
                    } else {
                        s.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
                    }
                }
            }
            let [dw1, dbias1, dw2, dbias2, dws, dbs] = sums;
            let sum_rows = |v: &[f32], c: usize| -> Vec<f32> {
                let mut out = vec![0f32; c];
                for row in v.chunks_exact(c.max(1)) {
                    out.iter_mut().zip(row).for_each(|(o, r)| *o += r);
                }
                out
            };
            let mut dp = Vec::with_capacity(self.pack.len);
            dp.extend(sum_rows(&da1, c_in));
            dp.extend(sum_rows(&db1, c_in));
            dp.extend(dw1);
            dp.extend(dbias1);
            dp.extend(dcb);
            if d.per_sample2 {
                dp.extend(da2);
                dp.extend(db2);
            } else {
                dp.extend(sum_rows(&da2, c_out));
                dp.extend(sum_rows(&db2, c_out));
            }
            dp.extend(dw2);
            dp.extend(dbias2);
            if d.shortcut {
                dp.extend(dws);
                dp.extend(dbs);
            }
            if dp.len() != self.pack.len {
                bail!(
                    "resnet block: internal error, gradient pack {} != {}",
                    dp.len(),
                    self.pack.len
                );
            }
            Some(dp)
        } else {
            None
        };
        Ok((want.a.then_some(dxa), want.b.then_some(dxb), dpack))
    }

    /// Group-norm + SiLU backward of one image of `c` channels: `dx`, and the per-channel
    /// `da`, `db` of the affine map.
    #[allow(clippy::too_many_arguments)]
    fn norm_silu_backward(
        &self,
        x: &[f32],
        dy: &[f32],
        c: usize,
        a: &[f32],
        b: &[f32],
        dx: &mut [f32],
        da: &mut [f32],
        db: &mut [f32],
    ) {
        image_backward(
            GroupIo { x, dy, dx, da, db },
            self.d.p(),
            self.d.groups,
            &a[..c],
            &b[..c],
            self.d.eps,
            true,
        );
    }

    fn bwd_tensors(
        &self,
        xa: &Tensor,
        xb: Option<&Tensor>,
        pack: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::scope("resnet.bwd");
        let dout = dout.contiguous()?;
        let want = Want {
            a: xa.track_op(),
            b: xb.is_some_and(|t| t.track_op()),
            pack: pack.track_op(),
        };
        let (ga, gb, gp) = {
            let ra = Read::new(xa, "resnet block")?;
            let rb = xb.map(|t| Read::new(t, "resnet block")).transpose()?;
            let rp = Read::new(pack, "resnet block")?;
            let rd = Read::new(&dout, "resnet block")?;
            self.backward(
                ra.as_slice(),
                rb.as_ref().map(|r| r.as_slice()),
                rp.as_slice(),
                rd.as_slice(),
                want,
            )?
        };
        Ok((
            ga.map(|v| cpu::tensor(v, xa.shape())).transpose()?,
            match (gb, xb) {
                (Some(v), Some(t)) => Some(cpu::tensor(v, t.shape())?),
                _ => None,
            },
            gp.map(|v| cpu::tensor(v, pack.shape())).transpose()?,
        ))
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.d.n, self.d.c_out, self.d.h, self.d.w))
    }
}

cpu::simd_fn! {
    /// `sums[c] += sum of row c` for rows of length `p`.
    fn add_row_sums(v: &[f32], p: usize, sums: &mut [f32]) {
        for (s, row) in sums.iter_mut().zip(v.chunks_exact(p.max(1))) {
            *s += cpu::sum_lanes(row) as f32;
        }
    }
}

impl CustomOp2 for ResnetOp {
    fn name(&self) -> &'static str {
        "fast-resnet-block"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _prof = super::profile::scope("resnet.fwd");
        let xa = cpu::slice(xs, xl, "resnet block")?;
        let p = cpu::slice(ps, pl, "resnet block")?;
        Ok((CpuStorage::F32(self.forward(xa, None, p)?), self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        pack: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (ga, _, gp) = self.bwd_tensors(x, None, pack, dy)?;
        Ok((ga, gp))
    }
}

impl CustomOp3 for ResnetOp {
    fn name(&self) -> &'static str {
        "fast-resnet-block-cat"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _prof = super::profile::scope("resnet.fwd");
        let xa = cpu::slice(xs, xl, "resnet block")?;
        let xb = cpu::slice(ss, sl, "resnet block")?;
        let p = cpu::slice(ps, pl, "resnet block")?;
        Ok((CpuStorage::F32(self.forward(xa, Some(xb), p)?), self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        skip: &Tensor,
        pack: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.bwd_tensors(x, Some(skip), pack, dy)
    }
}

/// Whether the fused op can run this block: 3x3 convolutions on a CPU with the direct kernels
/// (AVX-512).
pub fn applies(x: &Tensor, p: &ResnetBlockParams<'_>) -> bool {
    match (x.dims(), p.conv1.0.dims()) {
        ([_, _, h, w], [_, c_in, 3, 3]) => Geometry::new(&[1, *c_in, *h, *w], &[1, *c_in, 3, 3], 1, 1)
            .is_ok_and(|g| Direct::new(&g).is_some()),
        _ => false,
    }
}

/// `shape` must equal `want`, else an error naming `what`.
fn expect(what: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        bail!("resnet block: {what} has shape {got:?}, expected {want:?}");
    }
    Ok(())
}

/// The fused block (see [`crate::ops::resnet_block`]).
pub fn resnet_block(x: &Tensor, skip: Option<&Tensor>, p: &ResnetBlockParams<'_>) -> Result<Tensor> {
    let (n, c_a, h, w) = x.dims4()?;
    let c_b = match skip {
        Some(s) => {
            let (sn, sc, sh, sw) = s.dims4()?;
            if (sn, sh, sw) != (n, h, w) {
                bail!(
                    "resnet block: skip {:?} does not match x {:?}",
                    s.dims(),
                    x.dims()
                );
            }
            sc
        }
        None => 0,
    };
    let c_in = c_a + c_b;
    let c_out = p.conv1.0.dim(0)?;
    expect("conv1 weight", p.conv1.0.dims(), &[c_out, c_in, 3, 3])?;
    expect("conv1 bias", p.conv1.1.dims(), &[c_out])?;
    expect("conv2 weight", p.conv2.0.dims(), &[c_out, c_out, 3, 3])?;
    expect("conv2 bias", p.conv2.1.dims(), &[c_out])?;
    expect("norm1 gamma", p.norm1.0.dims(), &[c_in])?;
    expect("norm1 beta", p.norm1.1.dims(), &[c_in])?;
    expect("norm2 gamma", p.norm2.0.dims(), &[c_out])?;
    expect("norm2 beta", p.norm2.1.dims(), &[c_out])?;
    check_groups(c_in, p.groups)?;
    check_groups(c_out, p.groups)?;
    match p.shortcut {
        Some((ws, bs)) => {
            expect("shortcut weight", ws.dims(), &[c_out, c_in, 1, 1])?;
            expect("shortcut bias", bs.dims(), &[c_out])?;
        }
        None if c_in != c_out => {
            bail!("resnet block: {c_in} -> {c_out} channels needs a shortcut convolution")
        }
        None => {}
    }
    let mut parts: Vec<Tensor> = vec![
        p.norm1.0.clone(),
        p.norm1.1.clone(),
        p.conv1.0.flatten_all()?,
        p.conv1.1.clone(),
    ];
    let mut lens = [
        c_in,
        c_in,
        c_out * c_in * 9,
        c_out,
        0,
        c_out,
        c_out,
        c_out * c_out * 9,
        c_out,
        0,
        0,
    ];
    let per_sample2 = match p.time {
        TimeCondition::Bias(t) => {
            expect("time bias", t.dims(), &[n, c_out])?;
            parts.push(t.flatten_all()?);
            lens[4] = n * c_out;
            parts.push(p.norm2.0.clone());
            parts.push(p.norm2.1.clone());
            false
        }
        TimeCondition::ScaleShift(scale, shift) => {
            expect("scale", scale.dims(), &[n, c_out])?;
            expect("shift", shift.dims(), &[n, c_out])?;
            let one_plus = (scale + 1.0)?;
            parts.push(one_plus.broadcast_mul(p.norm2.0)?.flatten_all()?);
            parts.push(one_plus.broadcast_mul(p.norm2.1)?.add(shift)?.flatten_all()?);
            lens[5] = n * c_out;
            lens[6] = n * c_out;
            true
        }
    };
    parts.push(p.conv2.0.flatten_all()?);
    parts.push(p.conv2.1.clone());
    if let Some((ws, bs)) = p.shortcut {
        parts.push(ws.flatten_all()?);
        parts.push(bs.clone());
        lens[9] = c_out * c_in;
        lens[10] = c_out;
    }
    let pack = Tensor::cat(&parts, 0)?;
    let mask = match p.dropout_mask {
        Some(m) if m.len() != n * c_out * h * w => {
            bail!(
                "resnet block: dropout mask over {} elements, expected {}",
                m.len(),
                n * c_out * h * w
            )
        }
        Some(m) => Some(m.clone()),
        None => None,
    };
    let skip_c = skip.map(|s| s.contiguous()).transpose()?;
    let keep = x.track_op() || skip.is_some_and(|s| s.track_op()) || pack.track_op();
    let op = ResnetOp {
        d: Dims {
            n,
            c_a,
            c_b,
            c_out,
            h,
            w,
            groups: p.groups,
            eps: p.eps,
            per_sample2,
            shortcut: p.shortcut.is_some(),
            scale: (1.0 / p.output_scale_factor) as f32,
        },
        pack: Pack::new(lens),
        mask,
        keep,
        kept: Mutex::new(None),
    };
    let x = x.contiguous()?;
    match skip_c {
        Some(s) => x.apply_op3(&s, &pack, op),
        None => x.apply_op2(&pack, op),
    }
}
