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
//! order of `Part` (one definition, `ops::packed`); `Tensor::cat` routes their gradients back.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::conv::Geometry;
use super::cpu::{self, Read, Scratch, SyncPtr};
use super::direct::{Direct, WeightGrad};
use super::norm::{check_groups, group_forward, image_backward, GroupIo};
use super::packed::{self, Builder, Grads};
use super::{ResnetBlockParams, TimeCondition};

packed::pieces! {
    /// The packed small inputs, in packing order (the one definition of that order: the
    /// forward pass reads them and the backward pass assembles their gradient through it).
    enum Part {
        /// `a1 = gamma1`, `[C_in]`.
        A1,
        /// `b1 = beta1`, `[C_in]`.
        B1,
        /// `W1`, `[C_out, C_in, 3, 3]`.
        W1,
        /// `bias1`, `[C_out]`.
        Bias1,
        /// The time embedding's channel bias `cb`, `[N, C_out]` (absent with scale-shift).
        Cb,
        /// `a2`, `[C_out]` or `[N, C_out]` (scale-shift).
        A2,
        /// `b2`, as `a2`.
        B2,
        /// `W2`, `[C_out, C_out, 3, 3]`.
        W2,
        /// `bias2`, `[C_out]`.
        Bias2,
        /// The shortcut's `Ws`, `[C_out, C_in]` (absent without a shortcut).
        Ws,
        /// The shortcut's `bs`, `[C_out]`.
        Bs,
    }
}

type Pack = packed::Layout<Part>;

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
        let (w1, w2) = (self.pack.get(pack, Part::W1), self.pack.get(pack, Part::W2));
        let (wp1, wp2, wps) = if transposed {
            (
                d3.pack_transposed(w1, c_out, c_in),
                d3.pack_transposed(w2, c_out, c_out),
                d1.as_ref().map_or(Vec::new(), |d1| {
                    d1.pack_transposed(self.pack.get(pack, Part::Ws), c_out, c_in)
                }),
            )
        } else {
            (
                d3.pack(w1, c_out, c_in),
                d3.pack(w2, c_out, c_out),
                d1.as_ref().map_or(Vec::new(), |d1| {
                    d1.pack(self.pack.get(pack, Part::Ws), c_out, c_in)
                }),
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
        let (a2, b2) = (self.pack.get(pack, Part::A2), self.pack.get(pack, Part::B2));
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
        self.norm_silu(
            x_n,
            c_in,
            self.pack.get(pack, Part::A1),
            self.pack.get(pack, Part::B1),
            u,
        );
        init.copy_from_slice(self.pack.get(pack, Part::Bias1));
        if self.pack.len_of(Part::Cb) > 0 {
            let cb = &self.pack.get(pack, Part::Cb)[n * d.c_out..(n + 1) * d.c_out];
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
        if pack.len() != self.pack.len() {
            bail!(
                "resnet block: {} packed values, expected {}",
                pack.len(),
                self.pack.len()
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
                        d1.conv(
                            x_n,
                            c_in,
                            &k.wps,
                            self.pack.get(pack, Part::Bs),
                            None,
                            &mut r,
                            c_out,
                        );
                        &r
                    }
                    None => x_n,
                };
                let out_n = unsafe { out_ptr.slice(n * out_len, out_len) };
                k.d3.conv(
                    &g,
                    c_out,
                    &k.wp2,
                    self.pack.get(pack, Part::Bias2),
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

    /// `(dx_a, dx_b, dpack)`, each only if asked for. Per image, in the order of the module's
    /// formulas: [`Backward::inputs`] (`x_n`, `h_n`, `dy`), [`Backward::stage2`],
    /// [`Backward::shortcut`], [`Backward::stage1`], [`Backward::store`]; then the threads'
    /// partial sums are reduced and packed ([`Backward::gradient_pack`]).
    fn backward(
        &self,
        xa: &[f32],
        xb: Option<&[f32]>,
        pack: &[f32],
        dout: &[f32],
        want: Want,
    ) -> Result<InputGrads> {
        let d = &self.d;
        let (p, c_in, c_out, n_img) = (d.p(), d.c_in(), d.c_out, d.n);
        super::profile::add_flops(
            "resnet.bwd",
            4.0 * (n_img * c_out * p * (9 * c_in + 9 * c_out + if d.shortcut { c_in } else { 0 })) as f64,
        );
        let out_len = c_out * p;
        let kept = self.kept.lock().ok().and_then(|mut s| s.take());
        let kept = kept.filter(|v| v.len() == n_img * out_len);
        let (la, lb) = (d.c_a * p, d.c_b * p);
        let mut dxa = cpu::zeros(if want.a { n_img * la } else { 0 });
        let mut dxb = cpu::zeros(if want.b { n_img * lb } else { 0 });
        // per-sample gradients: channel bias [N, C_out]; a2, b2 [N, C_out] (summed later unless
        // per sample); a1, b1 [N, C_in] (summed later)
        let per_n = if want.pack { n_img } else { 0 };
        let mut rows = PerSample {
            cb: vec![
                0f32;
                if self.pack.len_of(Part::Cb) > 0 {
                    per_n * c_out
                } else {
                    0
                }
            ],
            a2: vec![0f32; per_n * c_out],
            b2: vec![0f32; per_n * c_out],
            a1: vec![0f32; per_n * c_in],
            b1: vec![0f32; per_n * c_in],
        };
        let bw = Backward {
            op: self,
            pack,
            xa,
            xb,
            dout,
            want,
            kept: kept.as_deref(),
            k: self.kernels(pack, true)?,
            // forward kernels: for the weight gradients' activations, or to recompute h
            fwd: if want.pack || kept.is_none() {
                Some(self.kernels(pack, false)?)
            } else {
                None
            },
            out: [
                SyncPtr::new(&mut dxa),
                SyncPtr::new(&mut dxb),
                SyncPtr::new(&mut rows.cb),
                SyncPtr::new(&mut rows.a2),
                SyncPtr::new(&mut rows.b2),
                SyncPtr::new(&mut rows.a1),
                SyncPtr::new(&mut rows.b1),
            ],
        };
        let partials = cpu::map_batch(n_img, |images, _| {
            let mut inputs = ImageInputs::new(d, kept.is_some());
            let mut t = Thread::new(&bw);
            for n in images {
                let (x_n, h_n, dy) = bw.inputs(n, &mut inputs, &mut t);
                bw.stage2(n, h_n, dy, &mut t);
                bw.shortcut(x_n, dy, &mut t);
                bw.stage1(x_n, &mut t);
                bw.store(n, &mut t);
            }
            t.sums()
        });
        let dpack = if want.pack {
            Some(bw.gradient_pack(partials, rows)?)
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

/// The per-sample rows of the backward pass, `[N, C]` each (summed over the batch for the
/// per-channel pieces).
struct PerSample {
    cb: Vec<f32>,
    a2: Vec<f32>,
    b2: Vec<f32>,
    a1: Vec<f32>,
    b1: Vec<f32>,
}

/// One backward call: its inputs, kernels and outputs (written per image through `out`).
struct Backward<'a> {
    op: &'a ResnetOp,
    pack: &'a [f32],
    xa: &'a [f32],
    xb: Option<&'a [f32]>,
    dout: &'a [f32],
    want: Want,
    /// `h` kept by the forward pass, `[N, C_out, P]`.
    kept: Option<&'a [f32]>,
    /// The transposed kernels (input gradients).
    k: Kernels,
    /// The forward kernels (weight gradients, recomputing `h`).
    fwd: Option<Kernels>,
    /// `dx_a, dx_b, dcb, da2, db2, da1, db1`, rows owned by image.
    out: [SyncPtr; 7],
}

/// One image's inputs to the backward pass, built in per-thread scratch when needed.
struct ImageInputs {
    /// `x_n = [x_a; x_b]`, when there is a skip input.
    xcat: Scratch,
    /// `h_n`, recomputed when the forward pass kept nothing.
    h: Scratch,
    /// `dy = s dout_n` when `s != 1`.
    dy: Scratch,
}

impl ImageInputs {
    fn new(d: &Dims, kept: bool) -> Self {
        let out_len = d.c_out * d.p();
        Self {
            xcat: Scratch::new(if d.c_b > 0 { d.c_in() * d.p() } else { 0 }),
            h: Scratch::new(if kept { 0 } else { out_len }),
            dy: Scratch::new(if d.scale != 1.0 { out_len } else { 0 }),
        }
    }
}

/// One thread's scratch, per-image results and partial sums over its images.
struct Thread<'k> {
    /// `u_n = silu(a1 norm(x_n) + b1)`, `g_n` (stage 2's activation).
    u: Scratch,
    g: Scratch,
    /// `dg = mask (W2^T * dy)`, `dh_n`, `du = W1^T * dh_n`.
    dg: Scratch,
    dh: Scratch,
    du: Scratch,
    /// The shortcut's and the first norm's parts of `dx_n`.
    dx: Scratch,
    dxg: Scratch,
    init: Vec<f32>,
    zeros: Vec<f32>,
    /// This image's `dcb_n = sum_pixels dh_n` and affine gradients.
    dcb: Vec<f32>,
    da1: Vec<f32>,
    db1: Vec<f32>,
    da2: Vec<f32>,
    db2: Vec<f32>,
    /// Sums over the thread's images.
    wg1: Option<WeightGrad<'k>>,
    wg2: Option<WeightGrad<'k>>,
    wgs: Option<WeightGrad<'k>>,
    dbias1: Vec<f32>,
    dbias2: Vec<f32>,
    dbs: Vec<f32>,
}

/// A thread's sums: `dW1, dbias1, dW2, dbias2, dWs, dbs`.
type Sums = [Vec<f32>; 6];

impl<'k> Thread<'k> {
    fn new(bw: &'k Backward<'_>) -> Self {
        let d = &bw.op.d;
        let (c_in, c_out, p) = (d.c_in(), d.c_out, d.p());
        // weight gradients with the forward taps (`fwd` exists when they are wanted)
        let fwd = bw.fwd.as_ref().filter(|_| bw.want.pack);
        Self {
            u: Scratch::new(c_in * p),
            g: Scratch::new(c_out * p),
            dg: Scratch::new(c_out * p),
            dh: Scratch::new(c_out * p),
            du: Scratch::new(c_in * p),
            dx: Scratch::new(c_in * p),
            dxg: Scratch::new(c_in * p),
            init: vec![0f32; c_out],
            zeros: vec![0f32; c_in.max(c_out)],
            dcb: vec![0f32; c_out],
            da1: vec![0f32; c_in],
            db1: vec![0f32; c_in],
            da2: vec![0f32; c_out],
            db2: vec![0f32; c_out],
            wg1: fwd.map(|f| WeightGrad::new(&f.d3, c_out, c_in)),
            wg2: fwd.map(|f| WeightGrad::new(&f.d3, c_out, c_out)),
            wgs: fwd
                .and_then(|f| f.d1.as_ref())
                .map(|d1| WeightGrad::new(d1, c_out, c_in)),
            dbias1: vec![0f32; c_out],
            dbias2: vec![0f32; c_out],
            dbs: vec![0f32; c_out],
        }
    }

    fn sums(self) -> Sums {
        [
            self.wg1.map_or(Vec::new(), WeightGrad::finish),
            self.dbias1,
            self.wg2.map_or(Vec::new(), WeightGrad::finish),
            self.dbias2,
            self.wgs.map_or(Vec::new(), WeightGrad::finish),
            self.dbs,
        ]
    }
}

impl Backward<'_> {
    fn d(&self) -> &Dims {
        &self.op.d
    }

    fn part(&self, piece: Part) -> &[f32] {
        self.op.pack.get(self.pack, piece)
    }

    /// `x_n`, `h_n` (kept, or recomputed with `u_n` into `t.u`) and `dy = s dout_n`.
    fn inputs<'b>(
        &'b self,
        n: usize,
        io: &'b mut ImageInputs,
        t: &mut Thread<'_>,
    ) -> (&'b [f32], &'b [f32], &'b [f32]) {
        let ImageInputs { xcat, h, dy } = io;
        let d = self.d();
        let out_len = d.c_out * d.p();
        let x_n = self.op.image(self.xa, self.xb, n, xcat);
        let h_n: &[f32] = match self.kept {
            Some(v) => &v[n * out_len..(n + 1) * out_len],
            None => {
                // nothing kept (a second backward pass): recompute h_n (and u_n)
                if let Some(kf) = &self.fwd {
                    self.op.stage1(kf, self.pack, x_n, n, &mut t.u, &mut t.init, h);
                }
                h
            }
        };
        let dout_n = &self.dout[n * out_len..(n + 1) * out_len];
        let dy: &[f32] = if d.scale != 1.0 {
            dy.iter_mut().zip(dout_n).for_each(|(a, b)| *a = b * d.scale);
            dy
        } else {
            dout_n
        };
        (x_n, h_n, dy)
    }

    /// `dW2 += dy (x) g_n`, `dbias2 += sum dy`; `dg = mask (W2^T * dy)`; then the group-norm +
    /// SiLU backward at `h_n`: `dh_n`, `da2_n`, `db2_n`.
    fn stage2(&self, n: usize, h_n: &[f32], dy: &[f32], t: &mut Thread<'_>) {
        let d = self.d();
        let (p, c_out) = (d.p(), d.c_out);
        if let Some(wg) = &mut t.wg2 {
            let _s = super::profile::scope("resnet.bwd/act2");
            self.op.activation2(self.pack, h_n, n, &mut t.g);
            drop(_s);
            let _s = super::profile::scope("resnet.bwd/wgrad2");
            wg.add_image(dy, &t.g);
            add_row_sums(dy, p, &mut t.dbias2);
        }
        let _s = super::profile::scope("resnet.bwd/dconv2");
        self.k
            .d3
            .conv(dy, c_out, &self.k.wp2, &t.zeros[..c_out], None, &mut t.dg, c_out);
        drop(_s);
        if let Some(mask) = &self.op.mask {
            mask.apply(n * c_out * p, &mut t.dg);
        }
        let (a2, b2) = self.op.affine2(self.pack, n);
        let _s = super::profile::scope("resnet.bwd/gn2");
        self.op
            .norm_silu_backward(h_n, &t.dg, c_out, a2, b2, &mut t.dh, &mut t.da2, &mut t.db2);
    }

    /// The residual branch: `dx_n = Ws^T dy` (or `dy`), `dWs += dy (x) x_n`, `dbs += sum dy`.
    fn shortcut(&self, x_n: &[f32], dy: &[f32], t: &mut Thread<'_>) {
        let _s = super::profile::scope("resnet.bwd/shortcut");
        let d = self.d();
        let (c_in, c_out) = (d.c_in(), d.c_out);
        if self.want.a || self.want.b {
            match &self.k.d1 {
                Some(d1) => d1.conv(dy, c_out, &self.k.wps, &t.zeros[..c_in], None, &mut t.dx, c_in),
                None => t.dx.copy_from_slice(dy),
            }
        }
        if let Some(wg) = &mut t.wgs {
            wg.add_image(dy, x_n);
            add_row_sums(dy, d.p(), &mut t.dbs);
        }
    }

    /// `dW1 += dh_n (x) u_n`, `dbias1 += sum dh_n`, `dcb_n = sum dh_n`; `du = W1^T * dh_n`;
    /// then the group-norm + SiLU backward at `x_n`: `dxg`, `da1_n`, `db1_n`.
    fn stage1(&self, x_n: &[f32], t: &mut Thread<'_>) {
        let d = self.d();
        let (p, c_in, c_out) = (d.p(), d.c_in(), d.c_out);
        if let Some(wg) = &mut t.wg1 {
            let _s = super::profile::scope("resnet.bwd/act1");
            if self.kept.is_some() {
                // (without `kept`, `inputs` recomputed u_n with h_n)
                self.op
                    .norm_silu(x_n, c_in, self.part(Part::A1), self.part(Part::B1), &mut t.u);
            }
            drop(_s);
            let _s = super::profile::scope("resnet.bwd/wgrad1");
            wg.add_image(&t.dh, &t.u);
            t.dcb.fill(0.0);
            add_row_sums(&t.dh, p, &mut t.dcb);
            t.dbias1.iter_mut().zip(&t.dcb).for_each(|(a, b)| *a += b);
        }
        let _s = super::profile::scope("resnet.bwd/dconv1");
        self.k
            .d3
            .conv(&t.dh, c_out, &self.k.wp1, &t.zeros[..c_in], None, &mut t.du, c_in);
        drop(_s);
        let _s = super::profile::scope("resnet.bwd/gn1");
        self.op.norm_silu_backward(
            x_n,
            &t.du,
            c_in,
            self.part(Part::A1),
            self.part(Part::B1),
            &mut t.dxg,
            &mut t.da1,
            &mut t.db1,
        );
    }

    /// Image `n`'s rows of the outputs: the per-sample gradients and `dx_n = shortcut + dxg`,
    /// split into its `x_a` and `x_b` parts.
    fn store(&self, n: usize, t: &mut Thread<'_>) {
        let _s = super::profile::scope("resnet.bwd/copy");
        let d = self.d();
        let (p, c_in, c_out) = (d.p(), d.c_in(), d.c_out);
        let [dxa, dxb, dcb, da2, db2, da1, db1] = &self.out;
        // SAFETY (every `slice` below): image n owns rows n of these outputs; the ranges of
        // different images are disjoint.
        if self.want.pack {
            unsafe {
                if self.op.pack.len_of(Part::Cb) > 0 {
                    dcb.slice(n * c_out, c_out).copy_from_slice(&t.dcb);
                }
                da2.slice(n * c_out, c_out).copy_from_slice(&t.da2);
                db2.slice(n * c_out, c_out).copy_from_slice(&t.db2);
                da1.slice(n * c_in, c_in).copy_from_slice(&t.da1);
                db1.slice(n * c_in, c_in).copy_from_slice(&t.db1);
            }
        }
        if self.want.a || self.want.b {
            t.dx.iter_mut().zip(t.dxg.iter()).for_each(|(a, b)| *a += b);
            let (la, lb) = (d.c_a * p, d.c_b * p);
            if self.want.a {
                unsafe { dxa.slice(n * la, la) }.copy_from_slice(&t.dx[..la]);
            }
            if self.want.b {
                unsafe { dxb.slice(n * lb, lb) }.copy_from_slice(&t.dx[la..la + lb]);
            }
        }
    }

    /// The packed gradient: the threads' sums added, the per-sample rows summed over the batch
    /// where the piece is per channel, in [`Part`] order.
    fn gradient_pack(&self, partials: Vec<Sums>, rows: PerSample) -> Result<Vec<f32>> {
        let d = self.d();
        let mut sums: Sums = Default::default();
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
        let mut g = Grads::new();
        g.set(Part::A1, sum_rows(&rows.a1, d.c_in()));
        g.set(Part::B1, sum_rows(&rows.b1, d.c_in()));
        g.set(Part::W1, dw1);
        g.set(Part::Bias1, dbias1);
        g.set(Part::Cb, rows.cb);
        if d.per_sample2 {
            g.set(Part::A2, rows.a2);
            g.set(Part::B2, rows.b2);
        } else {
            g.set(Part::A2, sum_rows(&rows.a2, d.c_out));
            g.set(Part::B2, sum_rows(&rows.b2, d.c_out));
        }
        g.set(Part::W2, dw2);
        g.set(Part::Bias2, dbias2);
        if d.shortcut {
            g.set(Part::Ws, dws);
            g.set(Part::Bs, dbs);
        }
        self.op.pack.assemble(g, "resnet block")
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
    let mut parts = Builder::new();
    parts.set(Part::A1, p.norm1.0)?;
    parts.set(Part::B1, p.norm1.1)?;
    parts.set(Part::W1, p.conv1.0)?;
    parts.set(Part::Bias1, p.conv1.1)?;
    let per_sample2 = match p.time {
        TimeCondition::Bias(t) => {
            expect("time bias", t.dims(), &[n, c_out])?;
            parts.set(Part::Cb, t)?;
            parts.set(Part::A2, p.norm2.0)?;
            parts.set(Part::B2, p.norm2.1)?;
            false
        }
        TimeCondition::ScaleShift(scale, shift) => {
            expect("scale", scale.dims(), &[n, c_out])?;
            expect("shift", shift.dims(), &[n, c_out])?;
            let one_plus = (scale + 1.0)?;
            parts.set(Part::A2, &one_plus.broadcast_mul(p.norm2.0)?)?;
            parts.set(Part::B2, &one_plus.broadcast_mul(p.norm2.1)?.add(shift)?)?;
            true
        }
    };
    parts.set(Part::W2, p.conv2.0)?;
    parts.set(Part::Bias2, p.conv2.1)?;
    if let Some((ws, bs)) = p.shortcut {
        parts.set(Part::Ws, ws)?;
        parts.set(Part::Bs, bs)?;
    }
    let (pack, layout) = parts.finish()?;
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
        pack: layout,
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
