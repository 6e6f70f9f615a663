//! Fast CPU resampling with its own backward: nearest 2x upsampling and 2x2 average pooling.
//!
//! On each `[H, W]` plane:
//! - `up[2i + a, 2j + b] = x[i, j]` (a, b in {0, 1}); backward `dx[i, j] = sum_{a,b} dup[2i + a, 2j + b]`.
//! - `pool[i, j] = (x[2i, 2j] + x[2i, 2j+1] + x[2i+1, 2j] + x[2i+1, 2j+1]) / 4`, `H` and `W`
//!   even (odd sizes are an error); backward spreads `dpool[i, j] / 4` over the window.
//!
//! Planes are processed in parallel blocks.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, Read};

/// `(planes, H, W)` of a `[N, C, H, W]` tensor.
fn planes(dims: &[usize], op: &str) -> Result<(usize, usize, usize)> {
    match dims {
        [n, c, h, w] => Ok((n * c, *h, *w)),
        _ => bail!("{op}: expected [N, C, H, W], got {dims:?}"),
    }
}

/// `H` and `W` of a `[N, C, H, W]` tensor must be even for 2x2 pooling.
pub(crate) fn check_even(dims: &[usize], op: &str) -> Result<()> {
    match dims {
        [_, _, h, w] if h % 2 == 0 && w % 2 == 0 => Ok(()),
        [_, _, h, w] => bail!("{op}: height {h} and width {w} must both be even"),
        _ => bail!("{op}: expected [N, C, H, W], got {dims:?}"),
    }
}

/// Runs `f(input plane, output plane)` over all planes in parallel.
fn per_plane(
    input: &[f32],
    in_plane: usize,
    output: &mut [f32],
    out_plane: usize,
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) {
    if in_plane == 0 || out_plane == 0 {
        return;
    }
    let per_task = ((1 << 14) / out_plane.max(in_plane)).max(1);
    output
        .par_chunks_mut(out_plane * per_task)
        .zip(input.par_chunks(in_plane * per_task))
        .for_each(|(o, i)| {
            for (o, i) in o.chunks_exact_mut(out_plane).zip(i.chunks_exact(in_plane)) {
                f(i, o);
            }
        });
}

/// `up [2H, 2W]` from `x [H, W]`.
fn upsample_plane(x: &[f32], up: &mut [f32], w: usize) {
    for (row, up_rows) in x.chunks_exact(w).zip(up.chunks_exact_mut(4 * w)) {
        let (top, bottom) = up_rows.split_at_mut(2 * w);
        for (pair, &v) in top.chunks_exact_mut(2).zip(row) {
            pair[0] = v;
            pair[1] = v;
        }
        bottom.copy_from_slice(top);
    }
}

/// `dx [H, W]` from `dup [2H, 2W]`: the sum of each 2x2 block.
fn upsample_grad_plane(dup: &[f32], dx: &mut [f32], w: usize) {
    for (dx_row, rows) in dx.chunks_exact_mut(w).zip(dup.chunks_exact(4 * w)) {
        let (top, bottom) = rows.split_at(2 * w);
        for ((d, t), b) in dx_row
            .iter_mut()
            .zip(top.chunks_exact(2))
            .zip(bottom.chunks_exact(2))
        {
            *d = (t[0] + t[1]) + (b[0] + b[1]);
        }
    }
}

/// `pool [H/2, W/2]` from `x [H, W]`.
fn pool_plane(x: &[f32], pool: &mut [f32], h: usize, w: usize) {
    let (ho, wo) = (h / 2, w / 2);
    for i in 0..ho {
        let top = &x[2 * i * w..2 * i * w + 2 * wo];
        let bottom = &x[(2 * i + 1) * w..(2 * i + 1) * w + 2 * wo];
        for ((p, t), b) in pool[i * wo..(i + 1) * wo]
            .iter_mut()
            .zip(top.chunks_exact(2))
            .zip(bottom.chunks_exact(2))
        {
            *p = ((t[0] + t[1]) + (b[0] + b[1])) * 0.25;
        }
    }
}

/// `dx [H, W]` from `dpool [H/2, W/2]`.
fn pool_grad_plane(dpool: &[f32], dx: &mut [f32], h: usize, w: usize) {
    let (ho, wo) = (h / 2, w / 2);
    dx.fill(0.0);
    for i in 0..ho {
        for a in 0..2 {
            let row = &mut dx[(2 * i + a) * w..(2 * i + a) * w + 2 * wo];
            for (pair, &d) in row.chunks_exact_mut(2).zip(&dpool[i * wo..(i + 1) * wo]) {
                pair[0] = d * 0.25;
                pair[1] = d * 0.25;
            }
        }
    }
}

struct Upsample2x;

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "fast-upsample-nearest2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _prof = super::profile::scope("upsample.fwd");
        let (p, h, w) = planes(l.dims(), "upsample_nearest2x")?;
        let x = cpu::slice(s, l, "upsample_nearest2x")?;
        let mut y = cpu::zeros(4 * p * h * w);
        per_plane(x, h * w, &mut y, 4 * h * w, |x, y| upsample_plane(x, y, w));
        let d = l.dims();
        Ok((CpuStorage::F32(y), Shape::from((d[0], d[1], 2 * h, 2 * w))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let _prof = super::profile::scope("upsample.bwd");
        let (p, h, w) = planes(x.dims(), "upsample_nearest2x")?;
        let dy = dy.contiguous()?;
        let mut dx = cpu::zeros(p * h * w);
        {
            let dyr = Read::new(&dy, "upsample_nearest2x")?;
            per_plane(dyr.as_slice(), 4 * h * w, &mut dx, h * w, |dy, dx| {
                upsample_grad_plane(dy, dx, w)
            });
        }
        Ok(Some(cpu::tensor(dx, x.shape())?))
    }
}

struct AvgPool2x;

impl CustomOp1 for AvgPool2x {
    fn name(&self) -> &'static str {
        "fast-avg-pool2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _prof = super::profile::scope("avg_pool.fwd");
        let (p, h, w) = planes(l.dims(), "avg_pool2x")?;
        let x = cpu::slice(s, l, "avg_pool2x")?;
        let (ho, wo) = (h / 2, w / 2);
        let mut y = cpu::zeros(p * ho * wo);
        per_plane(x, h * w, &mut y, ho * wo, |x, y| pool_plane(x, y, h, w));
        let d = l.dims();
        Ok((CpuStorage::F32(y), Shape::from((d[0], d[1], ho, wo))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let _prof = super::profile::scope("avg_pool.bwd");
        let (p, h, w) = planes(x.dims(), "avg_pool2x")?;
        let dy = dy.contiguous()?;
        let mut dx = cpu::zeros(p * h * w);
        {
            let dyr = Read::new(&dy, "avg_pool2x")?;
            per_plane(dyr.as_slice(), (h / 2) * (w / 2), &mut dx, h * w, |dy, dx| {
                pool_grad_plane(dy, dx, h, w)
            });
        }
        Ok(Some(cpu::tensor(dx, x.shape())?))
    }
}

/// Fast `upsample_nearest2x` (see [`crate::ops::upsample_nearest2x`]).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Upsample2x)
}

/// Fast `avg_pool2x` (see [`crate::ops::avg_pool2x`]).
pub fn avg_pool2x(x: &Tensor) -> Result<Tensor> {
    check_even(x.dims(), "avg_pool2x")?;
    x.contiguous()?.apply_op1(AvgPool2x)
}
