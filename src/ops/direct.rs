//! Direct convolution kernels for stride-1 convolutions that keep the image size (`k x k`
//! kernels with padding `(k - 1) / 2`: the 3x3 and 1x1 convolutions of a U-Net), on CPUs with
//! AVX-512. No im2col matrix is built: the kernel reads the input planes in place.
//!
//! Index a pixel of an `H x W` plane by `q = y W + x` (`P = H W` pixels). Kernel tap
//! `t = ky * k + kx` reads, for output pixel `q`, the input pixel `q + off_t` with
//! `off_t = (ky - pad) W + (kx - pad)` when `(y + ky - pad, x + kx - pad)` lies inside the image,
//! and the zero padding otherwise. With `m_t(q)` that validity (0 or 1):
//!
//! ```text
//! y[co, q]         = init[co] + sum_{t, ci} w[co, ci, t] * m_t(q) * x[ci, q + off_t] (+ r[co, q])
//! dx[ci, q]        = sum_{t, co} w[co, ci, t] * m'_t(q) * dy[co, q - off_t]
//! dw[co, ci, t]   += sum_q dy[co, q] * m_t(q) * x[ci, q + off_t]
//! ```
//!
//! The input gradient is the same kernel on `dy` with the taps reversed (`off_{T-1-t} = -off_t`
//! and `m_{T-1-t}(q)` says exactly that output pixel `q - off_t` read input pixel `q`).
//!
//! The micro-kernel keeps a tile of 3 vectors of 16 consecutive pixels by 8 output channels in
//! 24 registers and runs over every (tap, input channel) pair: 3 masked loads (the mask is
//! `m_t` on the tile's 48 pixels, which also stops reads past the plane), 8 broadcast weights, 24
//! fused multiply-adds. Masked-off lanes read nothing and count as zero, so neither padded copies
//! nor boundary cases are needed; the last tile of a plane is masked to the `P` real pixels.
//! Weights are packed once per call as `[channel tile][t][ci][8]` (zeros past the last channel).
//! The weight gradient keeps 4 output x 6 input channels of 16-lane partial sums over `q` and
//! adds their horizontal sums into `dw` once per image and tap.

//! The same formulas also run as portable Rust loops over the valid rectangle of each tap
//! (`Isa::Portable`), reading the same packed layouts: slower than either the AVX-512 kernels or
//! im2col + GEMM, so never chosen by default, but it lets [`with_portable_kernels`] run every
//! fused op built on these kernels on any CPU (the kernel tests do, on every machine).

// Without the intrinsics (a compiler before 1.89, or not x86-64) the AVX-512 kernels are left
// out and `available()` is false: only the portable kernels can run, inside
// `with_portable_kernels`.
#![cfg_attr(
    not(all(target_arch = "x86_64", diffuse_avx512)),
    allow(dead_code, unused_variables, unused_imports)
)]

use super::conv::Geometry;

/// Lanes per vector.
const L: usize = 16;
/// Output channels per forward tile.
const NR: usize = 8;
/// Vectors (of 16 pixels) per forward tile.
const MV: usize = 3;
/// Input channels per block of the forward kernel.
const CB: usize = 64;

/// The taps of one geometry: offsets and per-vector validity masks.
#[derive(Clone, Debug)]
pub(crate) struct Direct {
    /// Which kernels run: the AVX-512 ones, or portable Rust ([`with_portable_kernels`]).
    isa: Isa,
    /// Plane height and width.
    h: usize,
    w: usize,
    /// The taps `(dy, dx)`: tap `t` reads input pixel `(y + dy, x + dx)` for output `(y, x)`.
    taps: Vec<(isize, isize)>,
    /// `max |dy|, |dx|`: the zero border the weight gradient's padded copy needs.
    pad: usize,
    /// Pixels per plane, `H * W`.
    p: usize,
    /// Vectors per plane, `ceil(P / 16)`.
    nvec: usize,
    /// `off_t = dy W + dx` for each tap.
    off: Vec<isize>,
    /// `masks[t * nvec + v]`: bit `l` set when tap `t` reads inside the image for pixel
    /// `q = 16 v + l` (and `q < P`).
    masks: Vec<u16>,
    /// `store[v]`: bit `l` set when `16 v + l < P`.
    store: Vec<u16>,
}

impl Direct {
    /// The kernels for geometry `g`, when they apply: stride 1, square odd kernel with padding
    /// `(k - 1) / 2` (so the output has the input's size), on a CPU with AVX-512. Tap
    /// `t = ky k + kx` is `(ky - pad, kx - pad)`, the order of the weights' last two axes.
    pub(crate) fn new(g: &Geometry) -> Option<Self> {
        if g.stride != 1 || g.kh != g.kw || g.kh != 2 * g.padding + 1 {
            return None;
        }
        let (k, pad) = (g.kh, g.padding as isize);
        let taps: Vec<(isize, isize)> = (0..k * k)
            .map(|t| ((t / k) as isize - pad, (t % k) as isize - pad))
            .collect();
        Self::with_taps(g.h, g.w, &taps)
    }

    /// The kernels for an `h x w` plane and any set of taps (zero padding outside the plane),
    /// on a CPU with AVX-512.
    pub(crate) fn with_taps(h: usize, w: usize, taps: &[(isize, isize)]) -> Option<Self> {
        Self::with_isa(Isa::current()?, h, w, taps)
    }

    fn with_isa(isa: Isa, h: usize, w: usize, taps: &[(isize, isize)]) -> Option<Self> {
        if h == 0 || w == 0 || taps.is_empty() {
            return None;
        }
        let p = h * w;
        let nvec = p.div_ceil(L);
        let mut off = Vec::with_capacity(taps.len());
        let mut masks = vec![0u16; taps.len() * nvec];
        for (t, &(dy, dx)) in taps.iter().enumerate() {
            off.push(dy * w as isize + dx);
            for q in 0..p {
                let (y, x) = ((q / w) as isize + dy, (q % w) as isize + dx);
                if y >= 0 && y < h as isize && x >= 0 && x < w as isize {
                    masks[t * nvec + q / L] |= 1 << (q % L);
                }
            }
        }
        let store = (0..nvec)
            .map(|v| {
                let valid = p.saturating_sub(v * L).min(L);
                if valid == L {
                    u16::MAX
                } else {
                    (1u16 << valid) - 1
                }
            })
            .collect();
        let pad = taps
            .iter()
            .map(|&(dy, dx)| dy.unsigned_abs().max(dx.unsigned_abs()))
            .max()
            .unwrap_or(0);
        Some(Self {
            isa,
            h,
            w,
            taps: taps.to_vec(),
            pad,
            p,
            nvec,
            off,
            masks,
            store,
        })
    }

    /// The kernels of the transposed convolution (the input gradient): the same taps negated,
    /// in the same order. Use with weights packed by [`Direct::pack_transposed`].
    pub(crate) fn transposed(&self) -> Self {
        let taps: Vec<(isize, isize)> = self.taps.iter().map(|&(dy, dx)| (-dy, -dx)).collect();
        // `self` exists, so the taps are not empty; the same kernels as `self`.
        Self::with_isa(self.isa, self.h, self.w, &taps).unwrap_or_else(|| self.clone())
    }

    fn taps(&self) -> usize {
        self.off.len()
    }

    /// Packs `w [c_out, c_in, T]` for [`Direct::conv`] as `[c_out tile][t][ci][8]` (with the
    /// bf16 kernels `[c_out tile][t][ci pair][8]`, each slot a pair of bf16, see [`pair_rows`]).
    pub(crate) fn pack(&self, w: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
        let packed = self.pack_f32(w, c_out, c_in);
        self.pair_packed(packed, c_out, c_in)
    }

    /// The f32 packed weights (`[tile][t][ci][8]`, `tiles` tiles) as bf16 pairs over `ci` for
    /// the bf16 kernels; unchanged for the others.
    fn pair_packed(&self, packed: Vec<f32>, cy: usize, cx: usize) -> Vec<f32> {
        if self.isa != Isa::Avx512Bf16 {
            return packed;
        }
        let blocks = cy.div_ceil(NR) * self.taps();
        let mut out = vec![0f32; blocks * cx.div_ceil(2) * NR];
        for (src, dst) in packed
            .chunks_exact(cx * NR)
            .zip(out.chunks_exact_mut(cx.div_ceil(2) * NR))
            .take(blocks)
        {
            // src is [ci][8]: pairs of its rows, as the input's channel pairs
            pair_rows(src, cx, NR, dst);
        }
        out
    }

    fn pack_f32(&self, w: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
        let t_n = self.taps();
        let tiles = c_out.div_ceil(NR);
        let mut out = vec![0f32; tiles * t_n * c_in * NR];
        for co in 0..c_out {
            let (tile, j) = (co / NR, co % NR);
            for ci in 0..c_in {
                for t in 0..t_n {
                    out[((tile * t_n + t) * c_in + ci) * NR + j] = w[(co * c_in + ci) * t_n + t];
                }
            }
        }
        out
    }

    /// Packs `w [c_out, c_in, T]` for the input gradient: the kernel of the transposed
    /// convolution `w'[ci, co, t] = w[co, ci, t]`, packed as by [`Direct::pack`], for the
    /// kernels of [`Direct::transposed`].
    pub(crate) fn pack_transposed(&self, w: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
        let packed = self.pack_transposed_f32(w, c_out, c_in);
        self.pair_packed(packed, c_in, c_out)
    }

    fn pack_transposed_f32(&self, w: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
        let t_n = self.taps();
        let tiles = c_in.div_ceil(NR);
        let mut out = vec![0f32; tiles * t_n * c_out * NR];
        for ci in 0..c_in {
            let (tile, j) = (ci / NR, ci % NR);
            for co in 0..c_out {
                for t in 0..t_n {
                    out[((tile * t_n + t) * c_out + co) * NR + j] = w[(co * c_in + ci) * t_n + t];
                }
            }
        }
        out
    }

    /// One image: `y [cy, P] = init + conv(x [cx, P]) (+ residual)` with weights packed by
    /// [`Direct::pack`] (or [`Direct::pack_transposed`] for an input gradient). `init` has
    /// `cy` entries (bias plus channel bias; zeros for a gradient).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn conv(
        &self,
        x: &[f32],
        cx: usize,
        wp: &[f32],
        init: &[f32],
        residual: Option<&[f32]>,
        y: &mut [f32],
        cy: usize,
    ) {
        let p = self.p;
        assert!(
            x.len() >= cx * p && y.len() >= cy * p && init.len() >= cy,
            "direct conv: sizes"
        );
        let rows = if self.isa == Isa::Avx512Bf16 {
            cx.div_ceil(2)
        } else {
            cx
        };
        assert!(
            wp.len() >= cy.div_ceil(NR) * self.taps() * rows * NR,
            "direct conv: weights"
        );
        if let Some(r) = residual {
            assert!(r.len() >= cy * p, "direct conv: residual");
        }
        match self.isa {
            #[cfg(all(target_arch = "x86_64", diffuse_avx512))]
            // SAFETY: `Isa::Avx512` is only chosen when the CPU has AVX-512F (`available()`);
            // the asserts above keep every unmasked access inside the slices (see `tile`).
            Isa::Avx512 => unsafe { conv_image(self, x, cx, wp, init, residual, y, cy) },
            #[cfg(all(target_arch = "x86_64", diffuse_avx512))]
            Isa::Avx512Bf16 => {
                let mut xp = super::cpu::Scratch::new(cx.div_ceil(2) * p);
                pair_rows(x, cx, p, &mut xp);
                // SAFETY: `Isa::Avx512Bf16` is only chosen when the CPU has AVX-512F and
                // AVX512_BF16 (`has_bf16()`); sizes as for `conv_image`, with `xp` holding
                // ceil(cx / 2) planes of pairs and `wp` the pairs `pair_packed` built.
                unsafe { conv_image_bf16(self, &xp, cx.div_ceil(2), wp, init, residual, y, cy) }
            }
            _ => portable::conv_image(self, x, cx, wp, init, residual, y, cy),
        }
    }

    /// For each tap: the output rows it reads inside the image and the columns `x0 .. x1`
    /// of each such row whose input `(y + dy, x + dx)` is inside too.
    fn valid_rows(&self, t: usize) -> (std::ops::Range<usize>, usize, usize) {
        let (dy, dx) = self.taps[t];
        let (h, w) = (self.h as isize, self.w as isize);
        let y0 = (-dy).clamp(0, h) as usize;
        let y1 = (h - dy).clamp(0, h) as usize;
        let x0 = (-dx).clamp(0, w) as usize;
        let x1 = (w - dx).clamp(0, w) as usize;
        (y0..y1.max(y0), x0, x1.max(x0))
    }
}

/// Which direct kernels a [`Direct`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// The AVX-512 micro-kernels (the fast path).
    Avx512,
    /// The AVX-512 micro-kernels with bf16 operands and f32 accumulation (`vdpbf16ps`, CPUs
    /// with AVX512_BF16), under [`super::Precision::Bf16`]: the convolution and its input
    /// gradient; weight gradients stay f32.
    Avx512Bf16,
    /// Plain Rust loops over the same packed layouts: any CPU, for tests and for checking the
    /// fused ops on a machine without AVX-512 ([`with_portable_kernels`]).
    Portable,
}

thread_local! {
    static PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Isa {
    /// The kernels for a `Direct` built on this thread now: portable inside
    /// [`with_portable_kernels`], else AVX-512 when [`available`], else none (the callers then
    /// take their im2col + GEMM or staged paths).
    fn current() -> Option<Self> {
        if PORTABLE.with(|p| p.get()) {
            Some(Isa::Portable)
        } else if available() {
            Some(if super::precision() == super::Precision::Bf16 && has_bf16() {
                Isa::Avx512Bf16
            } else {
                Isa::Avx512
            })
        } else {
            None
        }
    }
}

/// Runs `f` with the direct convolution kernels (and so every fused op built on them: the
/// ResNet block, the conv block, the stride-2 and upsampling convolutions) in portable Rust
/// instead of AVX-512, on this thread: the fused ops then run on any CPU, to rounding the same
/// results. The kernels are chosen when an op starts (on the calling thread), so the op's
/// worker threads follow. For tests; slower than either fast path.
pub fn with_portable_kernels<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            PORTABLE.with(|p| p.set(self.0));
        }
    }
    let _reset = Reset(PORTABLE.with(|p| p.replace(true)));
    f()
}

/// Whether a `Direct` built on this thread now would run the portable kernels.
#[cfg(test)]
fn portable_now() -> bool {
    Isa::current() == Some(Isa::Portable)
}

/// The portable kernels: the formulas of the module's header as loops over the valid
/// rectangle of each tap, reading the same packed layouts as the AVX-512 kernels.
mod portable {
    use super::{Direct, NR};

    /// `y [cy, P] = init + sum_{t, ci} w[co, ci, t] m_t x[ci, q + off_t] (+ residual)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv_image(
        d: &Direct,
        x: &[f32],
        cx: usize,
        wp: &[f32],
        init: &[f32],
        residual: Option<&[f32]>,
        y: &mut [f32],
        cy: usize,
    ) {
        let (p, w, t_n) = (d.p, d.w, d.taps());
        for co in 0..cy {
            y[co * p..(co + 1) * p].fill(init[co]);
        }
        for t in 0..t_n {
            let (rows, x0, x1) = d.valid_rows(t);
            let off = d.off[t];
            for co in 0..cy {
                let (tile, j) = (co / NR, co % NR);
                let y_co = &mut y[co * p..(co + 1) * p];
                for ci in 0..cx {
                    let wv = wp[((tile * t_n + t) * cx + ci) * NR + j];
                    let x_ci = &x[ci * p..(ci + 1) * p];
                    for row in rows.clone() {
                        let q0 = row * w + x0;
                        let src = (q0 as isize + off) as usize;
                        let n = x1 - x0;
                        y_co[q0..q0 + n]
                            .iter_mut()
                            .zip(&x_ci[src..src + n])
                            .for_each(|(a, b)| *a += wv * b);
                    }
                }
            }
        }
        if let Some(r) = residual {
            y[..cy * p]
                .iter_mut()
                .zip(&r[..cy * p])
                .for_each(|(a, b)| *a += b);
        }
    }

    /// `dw[co, ci, t] += sum_q dy[co, q] m_t(q) x[ci, q + off_t]`, into `acc [(ci, t)][co_pad]`.
    pub(super) fn weight_grad(
        d: &Direct,
        dy: &[f32],
        c_out: usize,
        x: &[f32],
        c_in: usize,
        acc: &mut [f32],
        co_pad: usize,
    ) {
        let (p, w, t_n) = (d.p, d.w, d.taps());
        for t in 0..t_n {
            let (rows, x0, x1) = d.valid_rows(t);
            let off = d.off[t];
            for ci in 0..c_in {
                let x_ci = &x[ci * p..(ci + 1) * p];
                for co in 0..c_out {
                    let dy_co = &dy[co * p..(co + 1) * p];
                    let mut s = 0f32;
                    for row in rows.clone() {
                        let q0 = row * w + x0;
                        let src = (q0 as isize + off) as usize;
                        let n = x1 - x0;
                        s += dy_co[q0..q0 + n]
                            .iter()
                            .zip(&x_ci[src..src + n])
                            .map(|(a, b)| a * b)
                            .sum::<f32>();
                    }
                    acc[(ci * t_n + t) * co_pad + co] += s;
                }
            }
        }
    }
}

/// Whether the CPU runs these kernels (AVX-512F), and they are not switched off with
/// `DIFFUSE_DIRECT_CONV=0`.
pub(crate) fn available() -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", diffuse_avx512))]
        let cpu = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(all(target_arch = "x86_64", diffuse_avx512)))]
        let cpu = false;
        cpu && std::env::var("DIFFUSE_DIRECT_CONV").map_or(true, |v| v != "0")
    })
}

/// Whether the CPU has the AVX512_BF16 dot products (and the AVX-512 kernels are available).
pub(crate) fn has_bf16() -> bool {
    #[cfg(all(target_arch = "x86_64", diffuse_avx512))]
    {
        available() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(all(target_arch = "x86_64", diffuse_avx512)))]
    {
        false
    }
}

/// `x` rounded to bf16 (round to nearest, ties to even; NaN stays NaN): the upper 16 bits.
pub(crate) fn bf16_bits(x: f32) -> u32 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16
}

/// The f32 value of bf16 bits.
#[cfg(test)]
fn bf16_value(bits: u32) -> f32 {
    f32::from_bits(bits << 16)
}

/// Pairs of consecutive rows of `rows [r, len]` as bf16 pairs: `out[k][i]` holds
/// `bf16(rows[2k][i]) | bf16(rows[2k + 1][i]) << 16` (the second zero past the last row), in
/// f32 slots (their bits). `out` has `ceil(r / 2) * len` slots.
fn pair_rows(rows: &[f32], r: usize, len: usize, out: &mut [f32]) {
    for k in 0..r.div_ceil(2) {
        let lo = &rows[2 * k * len..(2 * k + 1) * len];
        let dst = &mut out[k * len..(k + 1) * len];
        if 2 * k + 1 < r {
            let hi = &rows[(2 * k + 1) * len..(2 * k + 2) * len];
            for ((d, a), b) in dst.iter_mut().zip(lo).zip(hi) {
                *d = f32::from_bits(bf16_bits(*a) | (bf16_bits(*b) << 16));
            }
        } else {
            for (d, a) in dst.iter_mut().zip(lo) {
                *d = f32::from_bits(bf16_bits(*a));
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", diffuse_avx512))]
use std::arch::x86_64::*;

/// # Safety
/// AVX-512F; sizes as asserted by [`Direct::conv`].
#[cfg(all(target_arch = "x86_64", diffuse_avx512))]
#[clippy::msrv = "1.89"]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_image(
    d: &Direct,
    x: &[f32],
    cx: usize,
    wp: &[f32],
    init: &[f32],
    residual: Option<&[f32]>,
    y: &mut [f32],
    cy: usize,
) {
    let (p, t_n) = (d.p, d.taps());
    let tile_len = t_n * cx * NR;
    // Input channels in blocks of CB, so that a tile's input rows (CB planes x 48 pixels plus
    // the taps' reach) stay in the L1 cache while every output-channel tile uses them; later
    // blocks add to the partial sums already stored in y.
    let mut ci0 = 0;
    while ci0 < cx {
        let ncb = (cx - ci0).min(CB);
        let (first, last) = (ci0 == 0, ci0 + ncb == cx);
        let mut v0 = 0;
        while v0 < d.nvec {
            let mv = (d.nvec - v0).min(MV);
            for tile in 0..cy.div_ceil(NR) {
                let co0 = tile * NR;
                let nr = (cy - co0).min(NR);
                let mut init8 = [0f32; NR];
                init8[..nr].copy_from_slice(&init[co0..co0 + nr]);
                let args = TileArgs {
                    cx,
                    ci0,
                    ncb,
                    accumulate: !first,
                    plane: p,
                    x: x.as_ptr().add(ci0 * p + v0 * L),
                    d,
                    v0,
                    wp: wp.as_ptr().add(tile * tile_len),
                    init: &init8,
                    y: y.as_mut_ptr().add(co0 * p + v0 * L),
                    residual: match residual {
                        Some(r) if last => r.as_ptr().add(co0 * p + v0 * L),
                        _ => std::ptr::null(),
                    },
                    nr,
                };
                match mv {
                    3 => tile_kernel::<3>(&args),
                    2 => tile_kernel::<2>(&args),
                    _ => tile_kernel::<1>(&args),
                }
            }
            v0 += mv;
        }
        ci0 += ncb;
    }
}

#[cfg(all(target_arch = "x86_64", diffuse_avx512))]
struct TileArgs<'a> {
    /// Input channels in all, and this call's block `ci0 .. ci0 + ncb`.
    cx: usize,
    ci0: usize,
    ncb: usize,
    /// Start from the partial sums in `y` (a later block) instead of `init`.
    accumulate: bool,
    plane: usize,
    /// Input channel `ci0` at the tile's first pixel.
    x: *const f32,
    d: &'a Direct,
    v0: usize,
    /// Packed weights of this channel tile, `[t][ci][8]`.
    wp: *const f32,
    init: &'a [f32; NR],
    /// Output channel `co0` at the tile's first pixel.
    y: *mut f32,
    /// Added at the end (the last block only), or null.
    residual: *const f32,
    nr: usize,
}

/// One tile: `V` vectors of pixels x 8 output channels.
///
/// # Safety
/// AVX-512F. Every load is masked by `m_t` (pixels inside the image) and every store by the
/// tile's `q < P` mask, so memory is touched only at `x[ci, q + off_t]` for valid pixels and at
/// `y[co, q]`, `residual[co, q]` for `q < P`, `co < co0 + nr`.
#[cfg(all(target_arch = "x86_64", diffuse_avx512))]
#[clippy::msrv = "1.89"]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // register blocking: acc[j][i] indexed on purpose
unsafe fn tile_kernel<const V: usize>(a: &TileArgs<'_>) {
    let d = a.d;
    let mut sm = [0u16; V];
    for (i, s) in sm.iter_mut().enumerate() {
        *s = d.store[a.v0 + i];
    }
    let mut acc = [[_mm512_setzero_ps(); V]; NR];
    for (j, row) in acc.iter_mut().enumerate() {
        if a.accumulate {
            if j < a.nr {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(sm[i], a.y.add(j * a.plane + i * L));
                }
            }
        } else {
            let b = _mm512_set1_ps(a.init[j]);
            for v in row.iter_mut() {
                *v = b;
            }
        }
    }
    for (t, &off) in d.off.iter().enumerate() {
        let mut m = [0u16; V];
        for (i, mi) in m.iter_mut().enumerate() {
            *mi = *d.masks.get_unchecked(t * d.nvec + a.v0 + i);
        }
        let xt = a.x.wrapping_offset(off);
        let mut w = a.wp.add((t * a.cx + a.ci0) * NR);
        let mut xp = xt;
        for _ in 0..a.ncb {
            let mut xv = [_mm512_setzero_ps(); V];
            for i in 0..V {
                xv[i] = _mm512_maskz_loadu_ps(m[i], xp.wrapping_add(i * L));
            }
            for j in 0..NR {
                let b = _mm512_set1_ps(*w.add(j));
                for i in 0..V {
                    acc[j][i] = _mm512_fmadd_ps(xv[i], b, acc[j][i]);
                }
            }
            xp = xp.wrapping_add(a.plane);
            w = w.add(NR);
        }
    }
    for (j, row) in acc.iter().enumerate().take(a.nr) {
        for i in 0..V {
            let mut v = row[i];
            let at = j * a.plane + i * L;
            if !a.residual.is_null() {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(sm[i], a.residual.add(at)));
            }
            _mm512_mask_storeu_ps(a.y.add(at), sm[i], v);
        }
    }
}

/// [`conv_image`] with bf16 operands: `xp` holds `cp` planes of input-channel pairs and `wp`
/// the weights as pairs (see [`Direct::pack`]); each `vdpbf16ps` adds both channels of a pair
/// into the f32 accumulators.
///
/// # Safety
/// AVX-512F and AVX512_BF16; sizes as asserted by [`Direct::conv`].
#[cfg(all(target_arch = "x86_64", diffuse_avx512))]
#[clippy::msrv = "1.89"]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_image_bf16(
    d: &Direct,
    xp: &[f32],
    cp: usize,
    wp: &[f32],
    init: &[f32],
    residual: Option<&[f32]>,
    y: &mut [f32],
    cy: usize,
) {
    let (p, t_n) = (d.p, d.taps());
    let tile_len = t_n * cp * NR;
    // blocks of CB / 2 pairs: the same bytes of input per block as the f32 kernel's CB channels
    let block = CB / 2;
    let mut c0 = 0;
    while c0 < cp {
        let ncb = (cp - c0).min(block);
        let (first, last) = (c0 == 0, c0 + ncb == cp);
        let mut v0 = 0;
        while v0 < d.nvec {
            let mv = (d.nvec - v0).min(MV);
            for tile in 0..cy.div_ceil(NR) {
                let co0 = tile * NR;
                let nr = (cy - co0).min(NR);
                let mut init8 = [0f32; NR];
                init8[..nr].copy_from_slice(&init[co0..co0 + nr]);
                let args = TileArgs {
                    cx: cp,
                    ci0: c0,
                    ncb,
                    accumulate: !first,
                    plane: p,
                    x: xp.as_ptr().add(c0 * p + v0 * L),
                    d,
                    v0,
                    wp: wp.as_ptr().add(tile * tile_len),
                    init: &init8,
                    y: y.as_mut_ptr().add(co0 * p + v0 * L),
                    residual: match residual {
                        Some(r) if last => r.as_ptr().add(co0 * p + v0 * L),
                        _ => std::ptr::null(),
                    },
                    nr,
                };
                match mv {
                    3 => tile_kernel_bf16::<3>(&args),
                    2 => tile_kernel_bf16::<2>(&args),
                    _ => tile_kernel_bf16::<1>(&args),
                }
            }
            v0 += mv;
        }
        c0 += ncb;
    }
}

/// [`tile_kernel`] over channel pairs: `args.cx`, `ci0`, `ncb` count pairs, `x` points at pair
/// planes and `wp` at pair weights.
///
/// # Safety
/// AVX-512F and AVX512_BF16; memory as for [`tile_kernel`] (a pair is one 32-bit lane).
#[cfg(all(target_arch = "x86_64", diffuse_avx512))]
#[clippy::msrv = "1.89"]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::needless_range_loop)] // register blocking: acc[j][i] indexed on purpose
unsafe fn tile_kernel_bf16<const V: usize>(a: &TileArgs<'_>) {
    let d = a.d;
    let mut sm = [0u16; V];
    for (i, s) in sm.iter_mut().enumerate() {
        *s = d.store[a.v0 + i];
    }
    let mut acc = [[_mm512_setzero_ps(); V]; NR];
    for (j, row) in acc.iter_mut().enumerate() {
        if a.accumulate {
            if j < a.nr {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(sm[i], a.y.add(j * a.plane + i * L));
                }
            }
        } else {
            let b = _mm512_set1_ps(a.init[j]);
            for v in row.iter_mut() {
                *v = b;
            }
        }
    }
    for (t, &off) in d.off.iter().enumerate() {
        let mut m = [0u16; V];
        for (i, mi) in m.iter_mut().enumerate() {
            *mi = *d.masks.get_unchecked(t * d.nvec + a.v0 + i);
        }
        let xt = a.x.wrapping_offset(off) as *const i32;
        let mut w = a.wp.add((t * a.cx + a.ci0) * NR) as *const i32;
        let mut xp = xt;
        for _ in 0..a.ncb {
            let mut xv = [_mm512_setzero_si512(); V];
            for i in 0..V {
                xv[i] = _mm512_maskz_loadu_epi32(m[i], xp.wrapping_add(i * L));
            }
            for j in 0..NR {
                let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(*w.add(j)));
                for i in 0..V {
                    let x: __m512bh = std::mem::transmute(xv[i]);
                    acc[j][i] = _mm512_dpbf16_ps(acc[j][i], x, b);
                }
            }
            xp = xp.wrapping_add(a.plane);
            w = w.add(NR);
        }
    }
    for (j, row) in acc.iter().enumerate().take(a.nr) {
        for i in 0..V {
            let mut v = row[i];
            let at = j * a.plane + i * L;
            if !a.residual.is_null() {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(sm[i], a.residual.add(at)));
            }
            _mm512_mask_storeu_ps(a.y.add(at), sm[i], v);
        }
    }
}

/// The weight gradient of a [`Direct`] convolution, accumulated image by image on one thread:
/// `dw[co, ci, t] = sum_images sum_q dy[co, q] m_t(q) x[ci, q + off_t]`.
///
/// Per image the input is copied into zero-padded planes of width `Wp = W + 2 pad` and the
/// output gradient is transposed to `dyT [q', co]` over the padded pixel index
/// `q' = y Wp + x` (zero in the `2 pad` extra columns and past the last channel), so that every
/// tap is a plain shifted read: `dw^T[(ci, t), co] += sum_q' x_pad[ci, q' + (dy + pad) Wp + dx + pad] dyT[q', co]`.
/// The micro-kernel keeps `K` (input channel, tap) rows x `C` vectors of 16 output channels in
/// 24 registers (`C x K` = 4 x 6, 3 x 8, 2 x 12 or 1 x 16, by the padded channel count): per
/// pixel `C` vector loads of `dyT`, `K` broadcasts of `x_pad`, 24 fused multiply-adds. Pixels go
/// in blocks of [`QB`] so that the block of `dyT` stays in the L1 cache across all the rows.
/// The rows are padded to a multiple of `K` with rows that read a plane of zeros.
pub(crate) struct WeightGrad<'a> {
    d: &'a Direct,
    c_out: usize,
    c_in: usize,
    /// `c_out` rounded up to whole vectors.
    co_pad: usize,
    /// Padded width, padded plane length.
    wp: usize,
    plane: usize,
    /// Tile shape: vectors of output channels, rows.
    tc: usize,
    tk: usize,
    /// `c_in * T` rounded up to a multiple of `tk`.
    rows: usize,
    /// Offset of each row's first pixel in `x_pad`.
    offsets: Vec<usize>,
    /// `c_in` padded planes and one plane of zeros.
    x_pad: super::cpu::Scratch,
    dyt: super::cpu::Scratch,
    /// `[row][co_pad]`.
    acc: Vec<f32>,
}

/// Pixels per block of the weight gradient.
const QB: usize = 192;

impl<'a> WeightGrad<'a> {
    pub(crate) fn new(d: &'a Direct, c_out: usize, c_in: usize) -> Self {
        let (wp, pad) = (d.w + 2 * d.pad, d.pad);
        // rows of padding above and below, and 2 pad more so that the last rows' taps stay inside
        let plane = (d.h + 2 * pad) * wp + 2 * pad;
        let co_pad = c_out.div_ceil(L) * L;
        let (tc, tk) = match co_pad / L {
            1 => (1, 16),
            2 => (2, 12),
            3 => (3, 8),
            _ => (4, 6),
        };
        let t_n = d.taps();
        let real = c_in * t_n;
        let rows = real.div_ceil(tk) * tk;
        let offsets = (0..rows)
            .map(|kk| {
                if kk >= real {
                    return c_in * plane;
                }
                let (ci, t) = (kk / t_n, kk % t_n);
                let (dy, dx) = d.taps[t];
                ci * plane + (dy + pad as isize) as usize * wp + (dx + pad as isize) as usize
            })
            .collect();
        // Only what `add_image` never writes must be zeroed: the borders of the padded planes
        // and the zero plane; the extra columns' rows of dyT (the gather writes every column of
        // the other rows, zeros past the last channel).
        let mut x_pad = super::cpu::Scratch::new((c_in + 1) * plane);
        let (h, w) = (d.h, d.w);
        for plane_data in x_pad[..c_in * plane].chunks_exact_mut(plane) {
            plane_data[..pad * wp + pad].fill(0.0);
            for y in 0..h {
                let row_end = (y + pad) * wp + pad + w;
                plane_data[row_end..row_end + 2 * pad].fill(0.0);
            }
            plane_data[(h + pad) * wp + pad..].fill(0.0);
        }
        x_pad[c_in * plane..].fill(0.0);
        let mut dyt = super::cpu::Scratch::new(h * wp * co_pad);
        for y in 0..h {
            dyt[(y * wp + w) * co_pad..(y + 1) * wp * co_pad].fill(0.0);
        }
        if d.isa == Isa::Avx512Bf16 {
            // the bf16 views write only the image's pixels: everything else stays zero
            x_pad.fill(0.0);
            dyt.fill(0.0);
        }
        Self {
            d,
            c_out,
            c_in,
            co_pad,
            wp,
            plane,
            tc,
            tk,
            rows,
            offsets,
            x_pad,
            dyt,
            acc: vec![0f32; rows * co_pad],
        }
    }

    /// Adds one image: `dy [c_out, P]`, `x [c_in, P]`.
    pub(crate) fn add_image(&mut self, dy: &[f32], x: &[f32]) {
        let d = self.d;
        let (h, w, pad, wp, p) = (d.h, d.w, d.pad, self.wp, d.p);
        assert!(
            dy.len() >= self.c_out * p && x.len() >= self.c_in * p,
            "direct conv: sizes"
        );
        if d.isa == Isa::Portable {
            portable::weight_grad(d, dy, self.c_out, x, self.c_in, &mut self.acc, self.co_pad);
            return;
        }
        #[cfg(all(target_arch = "x86_64", diffuse_avx512))]
        if d.isa == Isa::Avx512Bf16 {
            self.add_image_bf16(dy, x);
            return;
        }
        // x_pad[ci, (y + pad) Wp + x + pad] = x[ci, y W + x]; the rest stays zero
        for ci in 0..self.c_in {
            let dst = &mut self.x_pad[ci * self.plane..(ci + 1) * self.plane];
            for y in 0..h {
                let at = (y + pad) * wp + pad;
                dst[at..at + w].copy_from_slice(&x[ci * p + y * w..ci * p + (y + 1) * w]);
            }
        }
        // dyT[y Wp + x, co] = dy[co, y W + x]
        let ld = self.co_pad;
        #[cfg(all(target_arch = "x86_64", diffuse_avx512))]
        // SAFETY: AVX-512F (Direct exists); reads dy[co, q] for co < c_out, q < P and writes
        // dyT rows y Wp + x < h Wp, columns < co_pad (see `transpose`).
        unsafe {
            transpose(dy, self.c_out, p, w, wp, &mut self.dyt, ld)
        };
        let nq = h * wp;
        let (tc, tk) = (self.tc, self.tk);
        let mut q0 = 0;
        while q0 < nq {
            let q1 = (q0 + QB).min(nq);
            let mut k0 = 0;
            while k0 < self.rows {
                let offs = &self.offsets[k0..k0 + tk];
                let mut c0 = 0;
                while c0 < self.co_pad {
                    let nc = ((self.co_pad - c0) / L).min(tc);
                    #[cfg(all(target_arch = "x86_64", diffuse_avx512))]
                    {
                        let args = GradArgs {
                            nq: q1 - q0,
                            dyt: self.dyt[q0 * ld + c0..].as_ptr(),
                            ld,
                            x: self.x_pad[q0..].as_ptr(),
                            offs,
                            out: self.acc[k0 * ld + c0..].as_mut_ptr(),
                        };
                        // SAFETY: AVX-512F (Direct exists). The kernel reads dyT[q, c0 .. c0 + 16 nc]
                        // for q0 <= q < q1 <= h Wp (inside dyt), x_pad[offs[j] + q] with
                        // offs[j] + q <= ci plane + 2 pad Wp + 2 pad + h Wp - 1 < (ci + 1) plane (or
                        // inside the zero plane), and writes acc[(k0 + j) ld + c0 ..][.. 16 nc].
                        unsafe { grad_dispatch(nc, tk, &args) };
                    }
                    c0 += nc * L;
                }
                k0 += tk;
            }
            q0 = q1;
        }
    }

    /// [`WeightGrad::add_image`] with bf16 operands: `x_pad` as bf16 values and `dyT` as bf16
    /// pairs of consecutive padded pixels, `dyT2[k][co] = (dy[co, 2k], dy[co, 2k + 1])`; each
    /// `vdpbf16ps` adds two pixels' products into the f32 sums. Both live in the f32 scratch
    /// buffers (half their size is used).
    #[cfg(all(target_arch = "x86_64", diffuse_avx512))]
    fn add_image_bf16(&mut self, dy: &[f32], x: &[f32]) {
        let d = self.d;
        let (h, w, pad, wp, p) = (d.h, d.w, d.pad, self.wp, d.p);
        let ld = self.co_pad;
        let npair = (h * wp).div_ceil(2);
        assert!(
            2 * self.x_pad.len() >= (self.c_in + 1) * self.plane && self.dyt.len() >= npair * ld,
            "direct conv: bf16 scratch"
        );
        // SAFETY: the u16 views cover the first halves of the f32 buffers (the assert above),
        // which nothing else borrows while they live.
        let xb: &mut [u16] = unsafe {
            std::slice::from_raw_parts_mut(self.x_pad.as_mut_ptr() as *mut u16, (self.c_in + 1) * self.plane)
        };
        for ci in 0..self.c_in {
            for y in 0..h {
                let at = ci * self.plane + (y + pad) * wp + pad;
                let src = &x[ci * p + y * w..ci * p + (y + 1) * w];
                for (dst, v) in xb[at..at + w].iter_mut().zip(src) {
                    *dst = bf16_bits(*v) as u16;
                }
            }
        }
        // SAFETY: as above.
        let db: &mut [u16] =
            unsafe { std::slice::from_raw_parts_mut(self.dyt.as_mut_ptr() as *mut u16, npair * ld * 2) };
        for co in 0..self.c_out {
            for y in 0..h {
                for xx in 0..w {
                    let q = y * wp + xx;
                    db[((q / 2) * ld + co) * 2 + (q & 1)] = bf16_bits(dy[co * p + y * w + xx]) as u16;
                }
            }
        }
        let (tc, tk) = (self.tc, self.tk);
        let xb = self.x_pad.as_ptr() as *const u16;
        let mut k0p = 0;
        while k0p < npair {
            let k1p = (k0p + QB / 2).min(npair);
            let mut k0 = 0;
            while k0 < self.rows {
                let offs = &self.offsets[k0..k0 + tk];
                let mut c0 = 0;
                while c0 < self.co_pad {
                    let nc = ((self.co_pad - c0) / L).min(tc);
                    let args = GradArgs {
                        nq: k1p - k0p,
                        dyt: self.dyt[k0p * ld + c0..].as_ptr(),
                        ld,
                        // the pair k0p's first pixel in x_pad's u16 view
                        x: xb.wrapping_add(2 * k0p) as *const f32,
                        offs,
                        out: self.acc[k0 * ld + c0..].as_mut_ptr(),
                    };
                    // SAFETY: AVX-512F + AVX512_BF16 (the bf16 kernels exist only then). The
                    // kernel reads dyT2[k, c0 .. c0 + 16 nc] for k0p <= k < k1p <= npair (inside
                    // dyt), the u16 pairs at offs[j] + 2k, 2k + 1 <= ci plane + plane (the
                    // next plane's first value, or the zero plane's; times a zero half of dy
                    // when h Wp is odd), and writes acc[(k0 + j) ld + c0 ..][.. 16 nc].
                    unsafe { grad_dispatch_bf16(nc, tk, &args) };
                    c0 += nc * L;
                }
                k0 += tk;
            }
            k0p = k1p;
        }
    }

    /// The accumulated `dw [c_out, c_in, T]`.
    pub(crate) fn finish(self) -> Vec<f32> {
        let t_n = self.d.taps();
        let mut dw = vec![0f32; self.c_out * self.c_in * t_n];
        for co in 0..self.c_out {
            for kk in 0..self.c_in * t_n {
                dw[co * self.c_in * t_n + kk] = self.acc[kk * self.co_pad + co];
            }
        }
        dw
    }
}

/// `dyT[(y Wp + x) ld + co] = dy[co P + y W + x]` for `co < c`, one gather of 16 channels per
/// pixel (lanes past `c` masked off; those columns stay zero).
///
/// # Safety
/// AVX-512F; `dy` holds `c` planes of `p` values, `dyt` holds `(p / w) wp` rows of `ld >= 16
/// ceil(c / 16)` values.
#[cfg(all(target_arch = "x86_64", diffuse_avx512))]
#[clippy::msrv = "1.89"]
#[target_feature(enable = "avx512f")]
unsafe fn transpose(dy: &[f32], c: usize, p: usize, w: usize, wp: usize, dyt: &mut [f32], ld: usize) {
    assert!(dy.len() >= c * p && dyt.len() >= (p / w.max(1)) * wp * ld && ld >= c.div_ceil(L) * L);
    let lanes = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(p as i32),
    );
    let mut c0 = 0;
    while c0 < c {
        let valid = (c - c0).min(L);
        let mask: u16 = if valid == L { u16::MAX } else { (1u16 << valid) - 1 };
        let base = dy.as_ptr().add(c0 * p);
        for q in 0..p {
            let (y, x) = (q / w, q % w);
            let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, lanes, base.add(q));
            _mm512_storeu_ps(dyt.as_mut_ptr().add((y * wp + x) * ld + c0), v);
        }
        c0 += L;
    }
}

#[cfg(all(target_arch = "x86_64", diffuse_avx512))]
struct GradArgs<'a> {
    nq: usize,
    /// `dyT` at the block's first pixel and the tile's first output channel; rows `ld` apart.
    dyt: *const f32,
    ld: usize,
    /// `x_pad` at the block's first pixel.
    x: *const f32,
    /// The tile's rows: offsets in `x_pad`.
    offs: &'a [usize],
    /// `acc` at the tile's first row and output channel; rows `ld` apart.
    out: *mut f32,
}

/// # Safety
/// AVX-512F; see [`WeightGrad::add_image`].
#[cfg(all(target_arch = "x86_64", diffuse_avx512))]
#[clippy::msrv = "1.89"]
#[target_feature(enable = "avx512f")]
unsafe fn grad_dispatch(nc: usize, nk: usize, a: &GradArgs<'_>) {
    macro_rules! run {
        ($($nc:literal, $nk:literal);*) => {
            match (nc, nk) {
                $(($nc, $nk) => grad_kernel::<$nc, $nk>(a),)*
                _ => unreachable!("weight-gradient tile {nc} x {nk}"),
            }
        };
    }
    run!(4, 6; 3, 6; 2, 6; 1, 6; 3, 8; 2, 8; 1, 8; 2, 12; 1, 12; 1, 16);
}

/// # Safety
/// AVX-512F and AVX512_BF16; see [`WeightGrad::add_image_bf16`].
#[cfg(all(target_arch = "x86_64", diffuse_avx512))]
#[clippy::msrv = "1.89"]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn grad_dispatch_bf16(nc: usize, nk: usize, a: &GradArgs<'_>) {
    macro_rules! run {
        ($($nc:literal, $nk:literal);*) => {
            match (nc, nk) {
                $(($nc, $nk) => grad_kernel_bf16::<$nc, $nk>(a),)*
                _ => unreachable!("weight-gradient tile {nc} x {nk}"),
            }
        };
    }
    run!(4, 6; 3, 6; 2, 6; 1, 6; 3, 8; 2, 8; 1, 8; 2, 12; 1, 12; 1, 16);
}

/// [`grad_kernel`] over pixel pairs: `a.nq` pairs, `a.dyt` the pairs `dyT2[k][co]`, `a.x` the
/// u16 bf16 values of `x_pad` (read two at a time, unaligned).
///
/// # Safety
/// AVX-512F and AVX512_BF16; see [`WeightGrad::add_image_bf16`].
#[cfg(all(target_arch = "x86_64", diffuse_avx512))]
#[clippy::msrv = "1.89"]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::needless_range_loop)] // register blocking: acc[j][c] indexed on purpose
unsafe fn grad_kernel_bf16<const C: usize, const K: usize>(a: &GradArgs<'_>) {
    let mut acc = [[_mm512_setzero_ps(); C]; K];
    let xb = a.x as *const u16;
    let mut xs = [std::ptr::null::<u16>(); K];
    for (j, x) in xs.iter_mut().enumerate() {
        *x = xb.add(a.offs[j]);
    }
    let mut dy = a.dyt;
    for k in 0..a.nq {
        let mut dv = [_mm512_setzero_si512(); C];
        for (c, v) in dv.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(dy.add(c * L) as *const _);
        }
        for j in 0..K {
            let pair = std::ptr::read_unaligned(xs[j].add(2 * k) as *const i32);
            let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            for c in 0..C {
                let d: __m512bh = std::mem::transmute(dv[c]);
                acc[j][c] = _mm512_dpbf16_ps(acc[j][c], d, b);
            }
        }
        dy = dy.add(a.ld);
    }
    for (j, row) in acc.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            let o = a.out.add(j * a.ld + c * L);
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), *v));
        }
    }
}

/// `acc[j, c] += sum_q x[offs[j] + q] dyT[q, c]` for `K` rows and `C` vectors of channels.
///
/// # Safety
/// AVX-512F; see [`WeightGrad::add_image`].
#[cfg(all(target_arch = "x86_64", diffuse_avx512))]
#[clippy::msrv = "1.89"]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // register blocking: acc[j][c] indexed on purpose
unsafe fn grad_kernel<const C: usize, const K: usize>(a: &GradArgs<'_>) {
    let mut acc = [[_mm512_setzero_ps(); C]; K];
    let mut xs = [std::ptr::null::<f32>(); K];
    for (j, x) in xs.iter_mut().enumerate() {
        *x = a.x.add(a.offs[j]);
    }
    let mut dy = a.dyt;
    for q in 0..a.nq {
        let mut dv = [_mm512_setzero_ps(); C];
        for (c, v) in dv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(dy.add(c * L));
        }
        for j in 0..K {
            let b = _mm512_set1_ps(*xs[j].add(q));
            for c in 0..C {
                acc[j][c] = _mm512_fmadd_ps(dv[c], b, acc[j][c]);
            }
        }
        dy = dy.add(a.ld);
    }
    for (j, row) in acc.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            let o = a.out.add(j * a.ld + c * L);
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), *v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `y[co, q] = init[co] + sum_{t, ci} w[co, ci, t] x[ci, q + off_t]` over valid pixels, and
    /// `dw[co, ci, t] = sum_q dy[co, q] x[ci, q + off_t]`, straight from the definition.
    fn naive(
        d: &Direct,
        x: &[f32],
        w: &[f32],
        init: &[f32],
        dy: &[f32],
        cx: usize,
        cy: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (h, wd, t_n) = (d.h as isize, d.w as isize, d.taps.len());
        let p = d.p;
        let mut y = vec![0f32; cy * p];
        let mut dw = vec![0f32; cy * cx * t_n];
        for co in 0..cy {
            for q in 0..p {
                let (qy, qx) = ((q / d.w) as isize, (q % d.w) as isize);
                let mut acc = init[co] as f64;
                for (t, &(dy_t, dx_t)) in d.taps.iter().enumerate() {
                    let (iy, ix) = (qy + dy_t, qx + dx_t);
                    if iy < 0 || iy >= h || ix < 0 || ix >= wd {
                        continue;
                    }
                    let src = (iy * wd + ix) as usize;
                    for ci in 0..cx {
                        acc += (w[(co * cx + ci) * t_n + t] * x[ci * p + src]) as f64;
                        dw[(co * cx + ci) * t_n + t] += dy[co * p + q] * x[ci * p + src];
                    }
                }
                y[co * p + q] = acc as f32;
            }
        }
        (y, dw)
    }

    fn close(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1.0);
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= 1e-5 * scale, "{what}: element {i}: {a} vs {b}");
        }
    }

    /// Every kernel set this CPU has (the portable one always; AVX-512 where present) against
    /// the definition: 3x3 and 1x1 taps, the stride-2 phase taps, odd planes, channel counts
    /// that leave partial tiles, a residual, the weight gradient.
    #[test]
    fn every_kernel_set_matches_the_definition() {
        let mut isas = vec![Isa::Portable];
        if available() {
            isas.push(Isa::Avx512);
        }
        let t3: Vec<(isize, isize)> = (0..9).map(|t| (t / 3 - 1, t % 3 - 1)).collect();
        let phase = vec![(-1, -1), (-1, 0), (0, -1), (0, 0)];
        type Case<'a> = (usize, usize, usize, usize, &'a [(isize, isize)]);
        let cases: [Case; 5] = [
            (5, 7, 3, 9, &t3),
            (4, 4, 17, 8, &t3),
            (1, 1, 2, 3, &t3),
            (6, 5, 8, 20, &[(0, 0)]),
            (3, 6, 5, 7, &phase),
        ];
        let mut seed = 1u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (h, w, cx, cy, taps) in cases {
            let p = h * w;
            let t_n = taps.len();
            let x: Vec<f32> = (0..cx * p).map(|_| next()).collect();
            let wt: Vec<f32> = (0..cy * cx * t_n).map(|_| next()).collect();
            let init: Vec<f32> = (0..cy).map(|_| next()).collect();
            let dy: Vec<f32> = (0..cy * p).map(|_| next()).collect();
            let r: Vec<f32> = (0..cy * p).map(|_| next()).collect();
            for &isa in &isas {
                let what = format!("{isa:?} {h}x{w} {cx}->{cy} taps {t_n}");
                let d = Direct::with_isa(isa, h, w, taps).unwrap();
                let (y_ref, dw_ref) = naive(&d, &x, &wt, &init, &dy, cx, cy);
                let mut y = vec![0f32; cy * p];
                d.conv(&x, cx, &d.pack(&wt, cy, cx), &init, None, &mut y, cy);
                close(&format!("{what}: y"), &y, &y_ref);
                d.conv(&x, cx, &d.pack(&wt, cy, cx), &init, Some(&r), &mut y, cy);
                let y_res: Vec<f32> = y_ref.iter().zip(&r).map(|(a, b)| a + b).collect();
                close(&format!("{what}: y + residual"), &y, &y_res);
                let mut wg = WeightGrad::new(&d, cy, cx);
                wg.add_image(&dy, &x);
                wg.add_image(&dy, &x);
                let dw2: Vec<f32> = dw_ref.iter().map(|v| 2.0 * v).collect();
                close(&format!("{what}: dw over two images"), &wg.finish(), &dw2);
                // the input gradient: the transposed kernels on dy give
                // dx[ci, q] = sum_{t, co} w[co, ci, t] dy[co, q - off_t]; check it as the
                // adjoint of the forward map: <dx, x> = <dy, y - init>
                let dt = d.transposed();
                let mut dx = vec![0f32; cx * p];
                dt.conv(
                    &dy,
                    cy,
                    &d.pack_transposed(&wt, cy, cx),
                    &vec![0f32; cx],
                    None,
                    &mut dx,
                    cx,
                );
                let lhs: f64 = dx.iter().zip(&x).map(|(a, b)| (a * b) as f64).sum();
                let rhs: f64 = (0..cy * p)
                    .map(|i| (dy[i] * (y_ref[i] - init[i / p])) as f64)
                    .sum();
                assert!(
                    (lhs - rhs).abs() <= 1e-4 * rhs.abs().max(1.0),
                    "{what}: adjoint {lhs} vs {rhs}"
                );
                assert_eq!(dt.isa, isa, "{what}: the transposed kernels keep the kernel set");
            }
        }
    }

    /// The bf16 kernels (where the CPU has them) against the f32 kernels, within bf16's error
    /// bound: both operands rounded to 8 significant bits (relative error <= 2^-9 each), so
    /// `|y_bf16 - y_f32| <= 2^-8 sum |w| |x|` (+ f32 rounding), the sum computed by the f32
    /// kernels on `|w|` and `|x|`. The convolution, with a residual, and the input gradient
    /// (the transposed kernels); odd channel counts leave a half pair.
    #[test]
    fn bf16_kernels_are_within_the_bf16_bound_of_f32() {
        if !has_bf16() {
            eprintln!("note: no AVX512_BF16 on this CPU: the bf16 kernels are not tested here");
            return;
        }
        let t3: Vec<(isize, isize)> = (0..9).map(|t| (t / 3 - 1, t % 3 - 1)).collect();
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (h, w, cx, cy, taps) in [
            (7, 7, 64, 64, &t3[..]),
            (5, 9, 3, 17, &t3[..]),
            (4, 4, 131, 9, &t3[..]),
            (6, 6, 9, 10, &[(0, 0)][..]),
        ] {
            let p = h * w;
            let x: Vec<f32> = (0..cx * p).map(|_| next()).collect();
            let wt: Vec<f32> = (0..cy * cx * taps.len()).map(|_| next()).collect();
            let init: Vec<f32> = (0..cy).map(|_| next()).collect();
            let r: Vec<f32> = (0..cy * p).map(|_| next()).collect();
            let dy: Vec<f32> = (0..cy * p).map(|_| next()).collect();
            let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<f32>>();
            let f = Direct::with_isa(Isa::Avx512, h, w, taps).unwrap();
            let b = Direct::with_isa(Isa::Avx512Bf16, h, w, taps).unwrap();
            let run = |d: &Direct, x: &[f32], wt: &[f32], init: &[f32], r: Option<&[f32]>| {
                let mut y = vec![0f32; cy * p];
                d.conv(x, cx, &d.pack(wt, cy, cx), init, r, &mut y, cy);
                y
            };
            let run_t = |d: &Direct, dy: &[f32], wt: &[f32]| {
                let mut dx = vec![0f32; cx * p];
                d.transposed().conv(
                    dy,
                    cy,
                    &d.pack_transposed(wt, cy, cx),
                    &vec![0f32; cx],
                    None,
                    &mut dx,
                    cx,
                );
                dx
            };
            let check = |what: &str, got: &[f32], want: &[f32], sum_abs: &[f32]| {
                let mut worst = 0f32;
                for i in 0..want.len() {
                    let bound = sum_abs[i] / 256.0 + 1e-5 * (1.0 + want[i].abs());
                    let err = (got[i] - want[i]).abs();
                    assert!(
                        err <= bound,
                        "{what} {h}x{w} {cx}->{cy}: element {i}: {} vs {}, bound {bound}",
                        got[i],
                        want[i]
                    );
                    worst = worst.max(err / bound);
                }
                // not exact f32 either: the operands really were rounded
                assert!(worst > 1e-3, "{what}: the bf16 kernel gave f32 results");
            };
            let zeros = vec![0f32; cy];
            let sum_abs = run(&f, &abs(&x), &abs(&wt), &zeros, None);
            check(
                "conv",
                &run(&b, &x, &wt, &init, Some(&r)),
                &run(&f, &x, &wt, &init, Some(&r)),
                &sum_abs,
            );
            let sum_abs_t = run_t(&f, &abs(&dy), &abs(&wt));
            check(
                "input gradient",
                &run_t(&b, &dy, &wt),
                &run_t(&f, &dy, &wt),
                &sum_abs_t,
            );
            let run_w = |d: &Direct, dy: &[f32], x: &[f32]| {
                let mut wg = WeightGrad::new(d, cy, cx);
                wg.add_image(dy, x);
                wg.add_image(dy, x);
                wg.finish()
            };
            let sum_abs_w = run_w(&f, &abs(&dy), &abs(&x));
            check(
                "weight gradient",
                &run_w(&b, &dy, &x),
                &run_w(&f, &dy, &x),
                &sum_abs_w,
            );
        }
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(bf16_value(bf16_bits(1.0)), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1)
        assert_eq!(bf16_value(bf16_bits(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6)
        assert_eq!(bf16_value(bf16_bits(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        assert_eq!(bf16_value(bf16_bits(-3.0)), -3.0);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_value(bf16_bits(f32::INFINITY)), f32::INFINITY);
    }

    #[test]
    fn portable_kernels_are_chosen_on_this_thread_only_inside_the_scope() {
        let t3: Vec<(isize, isize)> = vec![(0, 0)];
        let outside = Direct::with_taps(2, 2, &t3).map(|d| d.isa);
        assert_eq!(outside, available().then_some(Isa::Avx512));
        let inside = with_portable_kernels(|| {
            // another thread is not affected
            let other = std::thread::spawn(move || Direct::with_taps(2, 2, &[(0, 0)]).map(|d| d.isa))
                .join()
                .unwrap();
            assert_eq!(other, available().then_some(Isa::Avx512));
            (portable_now(), Direct::with_taps(2, 2, &t3).map(|d| d.isa))
        });
        assert_eq!(inside, (true, Some(Isa::Portable)));
        assert!(!portable_now());
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    #[test]
    #[ignore]
    fn bench_direct_single_thread() {
        for (c_in, c_out, hw, k) in [
            (64, 64, 28, 3),
            (128, 128, 14, 3),
            (128, 128, 7, 3),
            (96, 32, 28, 3),
            (32, 32, 28, 3),
            (192, 64, 28, 3),
            (128, 64, 28, 1),
        ] {
            let g = Geometry::new(&[1, c_in, hw, hw], &[c_out, c_in, k, k], 1, k / 2).unwrap();
            let d = Direct::new(&g).unwrap();
            let p = hw * hw;
            let x: Vec<f32> = (0..c_in * p).map(|i| (i % 7) as f32 * 0.1).collect();
            let w: Vec<f32> = (0..c_out * c_in * k * k).map(|i| (i % 5) as f32 * 0.1).collect();
            let wp = d.pack(&w, c_out, c_in);
            let init = vec![0f32; c_out];
            let mut y = vec![0f32; c_out * p];
            let reps = 200;
            let t0 = super::super::profile::process_cpu_seconds();
            for _ in 0..reps {
                d.conv(&x, c_in, &wp, &init, None, &mut y, c_out);
            }
            let s = super::super::profile::process_cpu_seconds() - t0;
            let flops = 2.0 * (c_out * c_in * k * k * p) as f64 * reps as f64;
            let mut wg = WeightGrad::new(&d, c_out, c_in);
            let t0 = super::super::profile::process_cpu_seconds();
            for _ in 0..reps {
                wg.add_image(&y, &x);
            }
            let s2 = super::super::profile::process_cpu_seconds() - t0;
            let _ = wg.finish();
            eprintln!(
                "{k}x{k} {c_in}->{c_out} @{hw}: fwd {:.1} GFLOP/s, dw {:.1} GFLOP/s",
                flops / s / 1e9,
                flops / s2 / 1e9
            );
        }
    }
}
