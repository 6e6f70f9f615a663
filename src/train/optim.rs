//! AdamW with linear warm-up and gradient clipping by global norm, with its whole state (moments
//! and step) exposed for checkpoints (candle-nn's `AdamW` keeps its moments private).
//!
//! One update, for step `t = 1, 2, ...` (Loshchilov & Hutter 2019, Algorithm 2, with the
//! learning rate folded into the decay as in PyTorch's `torch.optim.AdamW`):
//!
//! ```text
//! g       = grad * c                            c = min(1, max_norm / (||grad|| + 1e-6))
//! m_t     = beta1 * m_{t-1} + (1 - beta1) * g
//! v_t     = beta2 * v_{t-1} + (1 - beta2) * g^2
//! m_hat   = m_t / (1 - beta1^t)
//! v_hat   = v_t / (1 - beta2^t)
//! theta_t = theta_{t-1} * (1 - lr_t * lambda) - lr_t * m_hat / (sqrt(v_hat) + eps)
//! lr_t    = lr * min(1, t / warmup_steps)           (linear warm-up; lr when warmup_steps = 0)
//! ```
//!
//! `||grad||` is the global norm over all parameters, `sqrt(sum_p sum_i grad_{p,i}^2)`
//! (PyTorch's `clip_grad_norm_`, including its `1e-6`); it is reported before clipping.
//! The decoupled weight decay `lambda` applies to tensors of rank >= 2 only (matrices and
//! convolution kernels; biases and normalisation scales are not decayed, as in nanoGPT's
//! `configure_optimizers`). A parameter that received no gradient is updated with a zero
//! gradient (its moments decay). Parameters are visited in name order, so the global norm's
//! floating-point sum, and hence the whole run, is reproducible.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::{check_range, Error, Result};

/// The `+ 1e-6` in the clipping coefficient (PyTorch's `clip_grad_norm_`).
const CLIP_NORM_EPS: f64 = 1e-6;

/// AdamW's hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Peak learning rate (after warm-up).
    pub lr: f64,
    /// Decay of the first-moment average.
    pub beta1: f64,
    /// Decay of the second-moment average.
    pub beta2: f64,
    /// Added to `sqrt(v_hat)` in the denominator.
    pub eps: f64,
    /// Decoupled weight decay `lambda` (0 turns it off); applied to tensors of rank >= 2.
    pub weight_decay: f64,
    /// Number of steps over which the learning rate rises linearly from `lr / warmup_steps` to `lr`.
    pub warmup_steps: u64,
    /// Clip the gradient to this global L2 norm (`None`: no clipping).
    pub grad_clip: Option<f64>,
}

use crate::config::defaults;

impl Default for AdamWConfig {
    /// lr 1e-3 (field notes, section 3: short runs want 1e-3 rather than the DDPM paper's 2e-4),
    /// betas (0.9, 0.999), eps 1e-8 (Kingma & Ba 2015), no weight decay, 100 warm-up steps,
    /// clipping at norm 1 (the DDPM reference implementation's `grad_clip = 1.0`).
    fn default() -> Self {
        AdamWConfig {
            lr: defaults::LR,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: defaults::WEIGHT_DECAY,
            warmup_steps: defaults::WARMUP,
            grad_clip: Some(defaults::GRAD_CLIP),
        }
    }
}

impl AdamWConfig {
    /// Checks every field's range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        check_range("lr", self.lr, (0.0, false), (f64::INFINITY, false))?;
        check_range("beta1", self.beta1, (0.0, true), (1.0, false))?;
        check_range("beta2", self.beta2, (0.0, true), (1.0, false))?;
        check_range("eps", self.eps, (0.0, false), (f64::INFINITY, false))?;
        check_range(
            "weight_decay",
            self.weight_decay,
            (0.0, true),
            (f64::INFINITY, false),
        )?;
        if let Some(c) = self.grad_clip {
            check_range("grad_clip", c, (0.0, false), (f64::INFINITY, false))?;
        }
        Ok(())
    }

    /// `lr_t = lr * min(1, t / warmup_steps)` for update `t >= 1`.
    pub fn lr_at(&self, t: u64) -> f64 {
        if self.warmup_steps == 0 || t >= self.warmup_steps {
            self.lr
        } else {
            self.lr * t as f64 / self.warmup_steps as f64
        }
    }
}

/// What one update did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The learning rate used, `lr_t`.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the gradient was scaled down.
    pub clipped: bool,
}

struct Param {
    name: String,
    var: Var,
    /// First moment m.
    m: Tensor,
    /// Second moment v.
    v: Tensor,
    decay: bool,
}

/// AdamW over every variable of a [`VarMap`], in name order.
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Param>,
    /// The number of updates done (t of the last update).
    step: u64,
    /// Use the tensor-op path even where the in-place CPU path applies (tests compare them).
    tensor_path: bool,
}

/// Prefixes of the moment tensors in [`AdamW::state_tensors`].
pub const M_PREFIX: &str = "m.";
/// See [`M_PREFIX`].
pub const V_PREFIX: &str = "v.";

impl AdamW {
    /// An optimizer over all variables currently in `varmap`, moments zero, step 0.
    pub fn new(varmap: &VarMap, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let mut named: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| Error::Numerical("the VarMap's lock is poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if named.is_empty() {
            return Err(Error::param("model", "has no parameters to optimise"));
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params = named
            .into_iter()
            .map(|(name, var)| {
                let t = var.as_tensor();
                if t.dtype() != DType::F32 {
                    return Err(Error::param(
                        "model",
                        format!(
                            "parameter {name} is {:?}; AdamW here trains f32 parameters",
                            t.dtype()
                        ),
                    ));
                }
                Ok(Param {
                    m: t.zeros_like()?,
                    v: t.zeros_like()?,
                    decay: t.rank() >= 2,
                    name,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            config,
            params,
            step: 0,
            tensor_path: false,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The number of updates done so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Back-propagates `loss` and applies one update.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<StepStats> {
        let grads = {
            let _prof = crate::ops::profile::scope("backward");
            loss.backward()?
        };
        self.apply(&grads)
    }

    /// Applies one update from `grads` (missing gradients count as zero).
    pub fn apply(&mut self, grads: &GradStore) -> Result<StepStats> {
        let _prof = crate::ops::profile::scope("adamw");
        let c = &self.config;
        let grads: Vec<Option<&Tensor>> = self.params.iter().map(|p| grads.get(p.var.as_tensor())).collect();
        // In place on the CPU (f32, contiguous): one pass per moment and one for the weights.
        let fast = !self.tensor_path
            && self
                .params
                .iter()
                .zip(&grads)
                .all(|(p, g)| fused::applies(p.var.as_tensor(), &p.m, &p.v, *g));
        let sum_sq: f64 = if fast {
            grads
                .iter()
                .flatten()
                .map(|g| fused::sum_squares(g))
                .sum::<Result<f64>>()?
        } else {
            // per-parameter sums of squares on the device, one transfer, summed in f64 in name order
            let per_param: Vec<Tensor> = grads
                .iter()
                .flatten()
                .map(|g| Ok(g.sqr()?.sum_all()?.to_dtype(DType::F64)?))
                .collect::<Result<_>>()?;
            if per_param.is_empty() {
                0.0
            } else {
                Tensor::stack(&per_param, 0)?.to_vec1::<f64>()?.iter().sum()
            }
        };
        let grad_norm = sum_sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::Numerical(format!(
                "the gradient norm is {grad_norm} at step {}; no update was applied",
                self.step + 1
            )));
        }
        let clip_coef = match c.grad_clip {
            Some(max_norm) => (max_norm / (grad_norm + CLIP_NORM_EPS)).min(1.0),
            None => 1.0,
        };
        let clipped = clip_coef < 1.0;

        let t = self.step + 1;
        let lr = c.lr_at(t);
        let bias1 = 1.0 - c.beta1.powi(t.min(i32::MAX as u64) as i32);
        let bias2 = 1.0 - c.beta2.powi(t.min(i32::MAX as u64) as i32);
        if fast {
            for (p, g) in self.params.iter().zip(grads) {
                let decay = if p.decay { lr * c.weight_decay } else { 0.0 };
                fused::update(
                    p.var.as_tensor(),
                    &p.m,
                    &p.v,
                    g,
                    &fused::Coefficients {
                        beta1: c.beta1 as f32,
                        one_minus_beta1: (1.0 - c.beta1) as f32,
                        beta2: c.beta2 as f32,
                        one_minus_beta2: (1.0 - c.beta2) as f32,
                        clip: clip_coef as f32,
                        keep: (1.0 - decay) as f32,
                        step: (lr / bias1) as f32,
                        inv_bias2: (1.0 / bias2) as f32,
                        eps: c.eps as f32,
                    },
                )?;
            }
            self.step = t;
            return Ok(StepStats {
                lr,
                grad_norm,
                clipped,
            });
        }
        for (p, g) in self.params.iter_mut().zip(grads) {
            let theta = p.var.as_tensor();
            let (m, v) = match g {
                Some(g) => {
                    let g = if clipped {
                        g.affine(clip_coef, 0.0)?
                    } else {
                        g.clone()
                    };
                    let m = ((&p.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    let v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    (m, v)
                }
                None => ((&p.m * c.beta1)?, (&p.v * c.beta2)?),
            };
            // sqrt(v_hat) + eps, then the step lr * m_hat / (sqrt(v_hat) + eps)
            let denom = ((&v * (1.0 / bias2))?.sqrt()? + c.eps)?;
            let update = ((&m * (lr / bias1))? / denom)?;
            let decayed = if p.decay && c.weight_decay > 0.0 {
                theta.affine(1.0 - lr * c.weight_decay, 0.0)?
            } else {
                theta.clone()
            };
            p.var.set(&(decayed - update)?.detach())?;
            p.m = m.detach();
            p.v = v.detach();
        }
        self.step = t;
        Ok(StepStats {
            lr,
            grad_norm,
            clipped,
        })
    }

    /// The moments as named tensors: `m.<name>` and `v.<name>` for each parameter `<name>`
    /// (copies: the optimizer updates its own moments in place).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            for (prefix, t) in [(M_PREFIX, &p.m), (V_PREFIX, &p.v)] {
                let copy = t.copy().unwrap_or_else(|_| t.clone());
                out.push((format!("{prefix}{}", p.name), copy));
            }
        }
        out
    }

    /// Restores the moments (as written by [`AdamW::state_tensors`]) and the step count.
    /// Every parameter needs both moments with its own shape; `source` names the file in errors.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        step: u64,
        source: &std::path::Path,
    ) -> Result<()> {
        let expected = 2 * self.params.len();
        if tensors.len() != expected {
            let known: std::collections::HashSet<String> = self
                .params
                .iter()
                .flat_map(|p| [format!("{M_PREFIX}{}", p.name), format!("{V_PREFIX}{}", p.name)])
                .collect();
            let mut extra: Vec<&String> = tensors.keys().filter(|k| !known.contains(*k)).collect();
            extra.sort();
            return Err(Error::bad_input(
                source,
                format!(
                    "holds {} optimizer tensors, the model needs {expected}{}",
                    tensors.len(),
                    if extra.is_empty() {
                        String::new()
                    } else {
                        format!(" (unexpected: {})", join_first(&extra, 5))
                    }
                ),
            ));
        }
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let mut pair = Vec::with_capacity(2);
            for prefix in [M_PREFIX, V_PREFIX] {
                let key = format!("{prefix}{}", p.name);
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| Error::bad_input(source, format!("missing optimizer tensor '{key}'")))?;
                if t.dims() != p.m.dims() {
                    return Err(Error::bad_input(
                        source,
                        format!(
                            "'{key}' has shape {:?}, the parameter has {:?}",
                            t.dims(),
                            p.m.dims()
                        ),
                    ));
                }
                // a copy of its own: the moments are updated in place
                pair.push(t.to_dtype(DType::F32)?.to_device(p.m.device())?.copy()?);
            }
            restored.push(pair);
        }
        for (p, mut pair) in self.params.iter_mut().zip(restored) {
            p.v = pair.pop().unwrap_or_else(|| p.v.clone()); // two entries pushed above
            p.m = pair.pop().unwrap_or_else(|| p.m.clone());
        }
        self.step = step;
        Ok(())
    }
}

/// The update on CPU f32 tensors, in place: with `g = clip * grad`,
/// `m = beta1 m + (1 - beta1) g`, `v = beta2 v + (1 - beta2) g^2` (one pass), then
/// `theta = keep * theta - step * m / (sqrt(v * inv_bias2) + eps)` (one pass), where
/// `keep = 1 - lr_t lambda` (1 without decay) and `step = lr_t / (1 - beta1^t)`,
/// `inv_bias2 = 1 / (1 - beta2^t)`: the formula of the module docs, with the same f32
/// operations and constants (computed in f64, then rounded, as candle's scalar ops do) as the
/// tensor path. (`1 - beta2` formed in f32 instead would be off by 5e-5 relative for 0.999.)
mod fused {
    use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor};
    use rayon::prelude::*;

    use crate::error::Result;

    /// Elements per parallel chunk.
    const CHUNK: usize = 1 << 14;

    /// Whether the in-place path applies: every tensor an f32, contiguous CPU tensor.
    pub(super) fn applies(theta: &Tensor, m: &Tensor, v: &Tensor, g: Option<&Tensor>) -> bool {
        let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
        ok(theta) && ok(m) && ok(v) && g.is_some_and(ok)
    }

    /// `sum g^2` in f64 (f32 partial sums over 16 lanes per chunk, chunks added in order).
    pub(super) fn sum_squares(g: &Tensor) -> Result<f64> {
        let (storage, layout) = g.storage_and_layout();
        let data = match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
            _ => return Ok(g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?),
        };
        let partial: Vec<f64> = data
            .par_chunks(CHUNK)
            .map(|c| {
                let mut acc = [0f32; 16];
                let chunks = c.chunks_exact(16);
                let tail: f64 = chunks.remainder().iter().map(|&x| (x as f64) * (x as f64)).sum();
                for ch in chunks {
                    for i in 0..16 {
                        acc[i] += ch[i] * ch[i];
                    }
                }
                acc.iter().map(|&a| a as f64).sum::<f64>() + tail
            })
            .collect();
        Ok(partial.iter().sum())
    }

    /// The scalars of one update.
    pub(super) struct Coefficients {
        pub beta1: f32,
        pub one_minus_beta1: f32,
        pub beta2: f32,
        pub one_minus_beta2: f32,
        pub clip: f32,
        pub keep: f32,
        pub step: f32,
        pub inv_bias2: f32,
        pub eps: f32,
    }

    fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
            _ => bail!("adamw: contiguous f32 tensors expected"),
        }
    }

    fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
            _ => bail!("adamw: contiguous f32 tensors expected"),
        }
    }

    /// `m = beta1 m + (1 - beta1) clip g`.
    struct FirstMoment<'a>(&'a Coefficients);
    /// `v = beta2 v + (1 - beta2) (clip g)^2`.
    struct SecondMoment<'a>(&'a Coefficients);
    /// `theta = keep theta - step m / (sqrt(v inv_bias2) + eps)`.
    struct Step<'a>(&'a Coefficients);

    impl InplaceOp2 for FirstMoment<'_> {
        fn name(&self) -> &'static str {
            "adamw-m"
        }
        fn cpu_fwd(
            &self,
            dst: &mut CpuStorage,
            dl: &Layout,
            g: &CpuStorage,
            gl: &Layout,
        ) -> candle_core::Result<()> {
            let (m, g) = (slice_mut(dst, dl)?, slice(g, gl)?);
            let c = self.0;
            m.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .for_each(|(m, g)| {
                    for (m, &g) in m.iter_mut().zip(g) {
                        *m = *m * c.beta1 + (c.clip * g) * c.one_minus_beta1;
                    }
                });
            Ok(())
        }
    }

    impl InplaceOp2 for SecondMoment<'_> {
        fn name(&self) -> &'static str {
            "adamw-v"
        }
        fn cpu_fwd(
            &self,
            dst: &mut CpuStorage,
            dl: &Layout,
            g: &CpuStorage,
            gl: &Layout,
        ) -> candle_core::Result<()> {
            let (v, g) = (slice_mut(dst, dl)?, slice(g, gl)?);
            let c = self.0;
            v.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .for_each(|(v, g)| {
                    for (v, &g) in v.iter_mut().zip(g) {
                        let g = c.clip * g;
                        *v = *v * c.beta2 + (g * g) * c.one_minus_beta2;
                    }
                });
            Ok(())
        }
    }

    impl InplaceOp3 for Step<'_> {
        fn name(&self) -> &'static str {
            "adamw-step"
        }
        fn cpu_fwd(
            &self,
            dst: &mut CpuStorage,
            dl: &Layout,
            m: &CpuStorage,
            ml: &Layout,
            v: &CpuStorage,
            vl: &Layout,
        ) -> candle_core::Result<()> {
            let (theta, m, v) = (slice_mut(dst, dl)?, slice(m, ml)?, slice(v, vl)?);
            let c = self.0;
            theta
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
                .for_each(|(theta, (m, v))| {
                    for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
                        let denom = (v * c.inv_bias2).sqrt() + c.eps;
                        *t = *t * c.keep - (m * c.step) / denom;
                    }
                });
            Ok(())
        }
    }

    /// One update of `theta`, `m`, `v` in place from `g` (see the module docs).
    pub(super) fn update(
        theta: &Tensor,
        m: &Tensor,
        v: &Tensor,
        g: Option<&Tensor>,
        c: &Coefficients,
    ) -> Result<()> {
        let Some(g) = g else {
            return Err(crate::error::Error::Numerical(
                "adamw: the in-place update needs a gradient".into(),
            ));
        };
        m.inplace_op2(g, &FirstMoment(c))?;
        v.inplace_op2(g, &SecondMoment(c))?;
        theta.inplace_op3(m, v, &Step(c))?;
        Ok(())
    }
}

/// Up to `n` names joined by ", ", with "..." when there are more.
pub(crate) fn join_first(names: &[&String], n: usize) -> String {
    let mut s = names
        .iter()
        .take(n)
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > n {
        s.push_str(", ...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn one_param(values: &[f32], shape: &[usize]) -> (VarMap, Var) {
        let varmap = VarMap::new();
        let var = Var::from_tensor(&Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()).unwrap();
        varmap.data().lock().unwrap().insert("w".into(), var.clone());
        (varmap, var)
    }

    fn values(var: &Var) -> Vec<f32> {
        var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// With a linear loss `L = sum_i c_i theta_i` the gradient is the constant `c`, so after
    /// t steps m_hat = c and v_hat = c^2 exactly (bias correction undoes the zero start), and
    /// each step moves theta_i by `lr_t * c_i / (|c_i| + eps)`; with decay lambda,
    /// `theta_t = theta_{t-1} * (1 - lr_t * lambda) - lr_t * c / (|c| + eps)`.
    #[test]
    fn constant_gradient_steps_match_the_closed_form() {
        let theta0 = [0.5f32, -1.0, 2.0, 0.25];
        let c = [2.0f32, -0.5, 1e-3, -3.0];
        let (varmap, var) = one_param(&theta0, &[2, 2]);
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            warmup_steps: 4,
            grad_clip: None,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(&varmap, cfg.clone()).unwrap();
        let ct = Tensor::from_vec(c.to_vec(), (2, 2), &Device::Cpu).unwrap();
        let mut expect: Vec<f64> = theta0.iter().map(|&v| v as f64).collect();
        for t in 1..=6u64 {
            let loss = (var.as_tensor() * &ct).unwrap().sum_all().unwrap();
            let stats = opt.backward_step(&loss).unwrap();
            // warm-up: lr_t = 0.1 * t / 4 for t < 4, then 0.1
            let lr = 0.1 * (t as f64 / 4.0).min(1.0);
            assert!((stats.lr - lr).abs() < 1e-15);
            // ||c|| = sqrt(4 + 0.25 + 1e-6 + 9)
            assert!((stats.grad_norm - (13.25f64 + 1e-6).sqrt()).abs() < 1e-5);
            for (e, &ci) in expect.iter_mut().zip(&c) {
                let ci = ci as f64;
                *e = *e * (1.0 - lr * 0.5) - lr * ci / (ci.abs() + 1e-8);
            }
            // f32 arithmetic over 6 steps of size <= 0.1 on values of size ~2: 1e-5 is
            // ~100 f32 ulps, far below any formula error (a wrong bias correction or decay
            // changes the result by > 1e-3).
            for (got, want) in values(&var).iter().zip(&expect) {
                assert!((*got as f64 - want).abs() < 1e-5, "t = {t}: {got} vs {want}");
            }
        }
        assert_eq!(opt.step(), 6);
    }

    /// Two steps with different gradients g1, g2 (loss 0.5 * theta^2 gives g = theta):
    /// m_hat_2 = (beta1 g1 + g2) / (1 + beta1), v_hat_2 = (beta2 g1^2 + g2^2) / (1 + beta2).
    #[test]
    fn second_step_uses_bias_corrected_moments() {
        let (varmap, var) = one_param(&[1.0], &[1]);
        let cfg = AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            warmup_steps: 0,
            grad_clip: None,
            weight_decay: 0.3, // rank-1 tensors are not decayed
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(&varmap, cfg).unwrap();
        for _ in 0..2 {
            let loss = (var.as_tensor().sqr().unwrap() * 0.5).unwrap().sum_all().unwrap();
            opt.backward_step(&loss).unwrap();
        }
        // step 1: g1 = 1, theta_1 = 1 - 0.1 * 1 / (1 + 1e-8) = 0.9 (no decay: rank 1)
        let g1 = 1.0f64;
        let theta1 = 1.0 - 0.1 * g1 / (g1 + 1e-8);
        let g2 = theta1;
        let m_hat = (0.9 * g1 + g2) / 1.9;
        let v_hat = (0.99 * g1 * g1 + g2 * g2) / 1.99;
        let theta2 = theta1 - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!(
            (values(&var)[0] as f64 - theta2).abs() < 1e-6,
            "{:?} vs {theta2}",
            values(&var)
        );
    }

    /// Clipping scales the gradient by max_norm / (norm + 1e-6); the reported norm is the
    /// unclipped one. With Adam the first step is invariant to gradient scale, so compare m.
    #[test]
    fn clipping_scales_by_global_norm_and_reports_the_raw_norm() {
        let (varmap, var) = one_param(&[0.0, 0.0], &[2]);
        let cfg = AdamWConfig {
            grad_clip: Some(1.0),
            warmup_steps: 0,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(&varmap, cfg).unwrap();
        let c = Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let loss = (var.as_tensor() * &c).unwrap().sum_all().unwrap();
        let stats = opt.backward_step(&loss).unwrap();
        assert!((stats.grad_norm - 5.0).abs() < 1e-6); // sqrt(9 + 16)
        assert!(stats.clipped);
        let state = opt.state_tensors();
        let m = state[0].1.to_vec1::<f32>().unwrap();
        // m_1 = (1 - beta1) * g * 1 / (5 + 1e-6) = 0.1 * (0.6, 0.8)
        assert!((m[0] - 0.06).abs() < 1e-7 && (m[1] - 0.08).abs() < 1e-7, "{m:?}");
        assert_eq!(state[0].0, "m.w");
        assert_eq!(state[1].0, "v.w");
    }

    #[test]
    fn non_finite_gradient_is_an_error_and_leaves_weights_alone() {
        let (varmap, var) = one_param(&[1.0, 2.0], &[2]);
        let mut opt = AdamW::new(&varmap, AdamWConfig::default()).unwrap();
        let c = Tensor::new(&[f32::NAN, 1.0], &Device::Cpu).unwrap();
        let loss = (var.as_tensor() * &c).unwrap().sum_all().unwrap();
        let err = opt.backward_step(&loss).unwrap_err().to_string();
        assert!(err.contains("gradient norm is NaN at step 1"), "{err}");
        assert_eq!(values(&var), vec![1.0, 2.0]);
        assert_eq!(opt.step(), 0);
    }

    /// The in-place CPU path and the tensor-op path (used on other devices) are the same
    /// arithmetic: equal to f32 rounding after several clipped, decayed, warming-up steps.
    #[test]
    fn in_place_and_tensor_paths_agree() {
        let cfg = AdamWConfig {
            lr: 0.05,
            weight_decay: 0.1,
            warmup_steps: 3,
            grad_clip: Some(0.5),
            ..AdamWConfig::default()
        };
        let theta0: Vec<f32> = (0..40).map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5).collect();
        let c = Tensor::from_vec(
            (0..40).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<_>>(),
            (5, 8),
            &Device::Cpu,
        )
        .unwrap();
        let run = |tensor_path: bool| {
            let (varmap, var) = one_param(&theta0, &[5, 8]);
            let mut opt = AdamW::new(&varmap, cfg.clone()).unwrap();
            opt.tensor_path = tensor_path;
            for _ in 0..6 {
                // a gradient that changes with theta: d/dtheta of sum(c theta + theta^2)
                let t = var.as_tensor();
                let loss = ((t * &c).unwrap() + t.sqr().unwrap()).unwrap().sum_all().unwrap();
                opt.backward_step(&loss).unwrap();
            }
            (values(&var), opt.state_tensors())
        };
        let ((a, sa), (b, sb)) = (run(false), run(true));
        // 6 steps of size <= 0.05 on values ~1: both sides round the same operations, so the
        // difference is a few ulp; a changed constant (1 - beta2 formed in f32) gives 1e-6.
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 2e-7, "{a:?} vs {b:?}");
        }
        for ((na, ta), (nb, tb)) in sa.iter().zip(&sb) {
            assert_eq!(na, nb);
            let (ta, tb) = (
                ta.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                tb.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            for (x, y) in ta.iter().zip(&tb) {
                assert!(
                    (x - y).abs() <= 1e-6 * y.abs().max(1e-3),
                    "{na}: {ta:?} vs {tb:?}"
                );
            }
        }
    }

    #[test]
    fn config_validation_names_the_field() {
        let bad = AdamWConfig {
            beta2: 1.0,
            ..AdamWConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("beta2"));
        let bad = AdamWConfig {
            lr: -1.0,
            ..AdamWConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("lr"));
    }

    #[test]
    fn state_round_trips_and_mismatches_are_named() {
        let (varmap, var) = one_param(&[1.0, -1.0], &[2]);
        let mut a = AdamW::new(&varmap, AdamWConfig::default()).unwrap();
        let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
        a.backward_step(&loss).unwrap();
        let saved: HashMap<String, Tensor> = a.state_tensors().into_iter().collect();
        let mut b = AdamW::new(&varmap, AdamWConfig::default()).unwrap();
        b.load_state(&saved, a.step(), std::path::Path::new("opt.safetensors"))
            .unwrap();
        assert_eq!(b.step(), 1);
        for ((_, x), (_, y)) in a.state_tensors().iter().zip(b.state_tensors().iter()) {
            assert_eq!(x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
        }
        let mut wrong = saved.clone();
        wrong.insert("v.w".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
        let e = b
            .load_state(&wrong, 1, std::path::Path::new("opt.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'v.w' has shape [3]"), "{e}");
        let mut extra = saved;
        extra.insert(
            "m.other".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = b
            .load_state(&extra, 1, std::path::Path::new("opt.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unexpected: m.other"), "{e}");
    }
}
