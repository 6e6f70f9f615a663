//! Fast CPU element-wise ops with their own backward: SiLU and the per-sample channel bias.
//!
//! - `silu(x) = x * s`, `s = sigmoid(x) = 1 / (1 + exp(-x))` (Elfwing et al. 2018);
//!   `silu'(x) = s * (1 + x * (1 - s))`.
//! - `y[n, c, ...] = x[n, c, ...] + bias[n, c]`; `dx = dy`, `dbias[n, c] = sum_pixels dy[n, c, ...]`.
//!
//! Work is split in blocks over the threads; each block is a SIMD loop (`cpu::simd_fn`).

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, Read};

/// Elements per parallel block: large enough to amortise a task, small enough to balance.
const BLOCK: usize = 1 << 15;

cpu::simd_fn! {
    /// `y = x * sigmoid(x)`.
    fn silu_slice(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * cpu::sigmoid(x);
        }
    }
}

cpu::simd_fn! {
    /// `dx = dy * s * (1 + x * (1 - s))`, `s = sigmoid(x)`.
    fn silu_grad_slice(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let s = cpu::sigmoid(x);
            *dx = dy * (s * (1.0 + x * (1.0 - s)));
        }
    }
}

cpu::simd_fn! {
    /// `y = x + c`.
    fn add_scalar(x: &[f32], y: &mut [f32], c: f32) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x + c;
        }
    }
}

struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "fast-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _prof = super::profile::scope("silu.fwd");
        let x = cpu::slice(s, l, "silu")?;
        let mut y = cpu::zeros(x.len());
        y.par_chunks_mut(BLOCK)
            .zip(x.par_chunks(BLOCK))
            .for_each(|(y, x)| silu_slice(x, y));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let _prof = super::profile::scope("silu.bwd");
        let dy = dy.contiguous()?;
        let dx = {
            let (xr, dyr) = (Read::new(x, "silu")?, Read::new(&dy, "silu")?);
            let (x, dy) = (xr.as_slice(), dyr.as_slice());
            let mut dx = cpu::zeros(x.len());
            dx.par_chunks_mut(BLOCK)
                .zip(x.par_chunks(BLOCK).zip(dy.par_chunks(BLOCK)))
                .for_each(|(dx, (x, dy))| silu_grad_slice(x, dy, dx));
            dx
        };
        Ok(Some(cpu::tensor(dx, x.shape())?))
    }
}

/// Fast `silu` (see [`crate::ops::silu`]).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Silu)
}

struct AddChannelBias;

/// `(N, C, pixels per channel)` of `x` `[N, C, ...]` with `bias` `[N, C]`.
fn bias_dims(x: &[usize], bias: &[usize]) -> Result<(usize, usize, usize)> {
    match (x, bias) {
        ([n, c, rest @ ..], [bn, bc]) if n == bn && c == bc => Ok((*n, *c, rest.iter().product())),
        _ => bail!("add_channel_bias: x {x:?} and bias {bias:?}: expected x [N, C, ...] and bias [N, C]"),
    }
}

impl CustomOp2 for AddChannelBias {
    fn name(&self) -> &'static str {
        "fast-add-channel-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _prof = super::profile::scope("channel_bias.fwd");
        let (_, _, s) = bias_dims(xl.dims(), bl.dims())?;
        let x = cpu::slice(xs, xl, "add_channel_bias")?;
        let bias = cpu::slice(bs, bl, "add_channel_bias")?;
        let mut y = cpu::zeros(x.len());
        if let Some(planes) = BLOCK.checked_div(s) {
            let planes = planes.max(1);
            y.par_chunks_mut(planes * s)
                .zip(x.par_chunks(planes * s))
                .enumerate()
                .for_each(|(i, (y, x))| {
                    for (j, (y, x)) in y.chunks_exact_mut(s).zip(x.chunks_exact(s)).enumerate() {
                        add_scalar(x, y, bias[i * planes + j]);
                    }
                });
        }
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::scope("channel_bias.bwd");
        let (_, _, s) = bias_dims(x.dims(), bias.dims())?;
        let dbias = if bias.track_op() && s > 0 {
            let dy = dy.contiguous()?;
            let sums = {
                let dyr = Read::new(&dy, "add_channel_bias")?;
                dyr.as_slice()
                    .par_chunks(s)
                    .map(|plane| sum_plane(plane) as f32)
                    .collect::<Vec<f32>>()
            };
            Some(cpu::tensor(sums, bias.shape())?)
        } else if bias.track_op() {
            Some(bias.zeros_like()?)
        } else {
            None
        };
        let dx = x.track_op().then(|| dy.clone());
        Ok((dx, dbias))
    }
}

cpu::simd_fn! {
    fn sum_plane(x: &[f32]) -> f64 {
        cpu::sum_lanes(x)
    }
}

/// Fast `add_channel_bias` (see [`crate::ops::add_channel_bias`]).
pub fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&bias.contiguous()?, AddChannelBias)
}
