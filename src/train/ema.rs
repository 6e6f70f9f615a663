//! Exponential moving average of the weights, the weights samples are drawn from.
//!
//! After the k-th optimizer update (k = 1, 2, ...):
//!
//! ```text
//! decay_k    = min(decay, (1 + k) / (10 + k))      with warm-up (TensorFlow's
//!                                                  ExponentialMovingAverage num_updates rule,
//!                                                  latent-diffusion's LitEma)
//! decay_k    = decay                               without warm-up
//! shadow_k   = decay_k * shadow_{k-1} + (1 - decay_k) * theta_k,    shadow_0 = theta_0
//! ```
//!
//! The warm-up keeps the average from being dominated by the random initial weights in short
//! runs: after k updates the initial weights weigh about prod_j decay_j, which is
//! 9 * 10 / ((9 + k)(10 + k)) under warm-up (0.004 at k = 40) against decay^k without it
//! (0.96 at k = 40 for decay 0.999). Field notes, section 3: a minutes-long run wants a decay
//! near 0.995; the DDPM paper used 0.9999 over 800k steps.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::{check_range, Error, Result};

/// EMA settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    /// The target decay (0 copies the weights: the EMA equals the model).
    pub decay: f64,
    /// Ramp the decay up as `min(decay, (1 + k) / (10 + k))`.
    pub warmup: bool,
}

impl Default for EmaConfig {
    /// decay 0.999 with warm-up.
    fn default() -> Self {
        EmaConfig {
            decay: crate::config::defaults::EMA_DECAY,
            warmup: true,
        }
    }
}

impl EmaConfig {
    /// Checks `decay` is in [0, 1).
    pub fn validate(&self) -> Result<()> {
        check_range("ema decay", self.decay, (0.0, true), (1.0, false))?;
        Ok(())
    }

    /// The decay used by update number `k >= 1`.
    pub fn decay_at(&self, k: u64) -> f64 {
        if self.warmup {
            let k = k as f64;
            self.decay.min((1.0 + k) / (10.0 + k))
        } else {
            self.decay
        }
    }
}

struct Shadow {
    name: String,
    var: Var,
    value: Tensor,
}

/// The EMA of every variable of a [`VarMap`], in name order.
pub struct Ema {
    config: EmaConfig,
    shadows: Vec<Shadow>,
    updates: u64,
}

impl Ema {
    /// An average initialised to the current weights (`shadow_0 = theta_0`), no updates yet.
    pub fn new(varmap: &VarMap, config: EmaConfig) -> Result<Self> {
        config.validate()?;
        let mut named: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| Error::Numerical("the VarMap's lock is poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let shadows = named
            .into_iter()
            .map(|(name, var)| {
                // a copy, not a view: the shadow must not follow later in-place updates
                let value = var.as_tensor().detach().copy()?;
                Ok(Shadow { name, var, value })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Ema {
            config,
            shadows,
            updates: 0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &EmaConfig {
        &self.config
    }

    /// The number of updates so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// One update from the variables' current values: `shadow = d * shadow + (1 - d) * theta`.
    pub fn update(&mut self) -> Result<()> {
        let k = self.updates + 1;
        let d = self.config.decay_at(k);
        for s in &mut self.shadows {
            let theta = s.var.as_tensor().detach();
            if in_place::applies(&s.value, &theta) {
                s.value.inplace_op2(
                    &theta,
                    &in_place::Average {
                        d: d as f32,
                        one_minus_d: (1.0 - d) as f32,
                    },
                )?;
            } else {
                s.value = ((&s.value * d)? + (theta * (1.0 - d))?)?;
            }
        }
        self.updates = k;
        Ok(())
    }

    /// The averaged weights by variable name (copies: the averages are updated in place).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.shadows
            .iter()
            .map(|s| (s.name.clone(), s.value.copy().unwrap_or_else(|_| s.value.clone())))
            .collect()
    }

    /// The averaged weights as a map (for `VarBuilder::from_tensors`).
    pub fn tensor_map(&self) -> HashMap<String, Tensor> {
        self.tensors().into_iter().collect()
    }

    /// Restores the averages (one per variable, same shapes) and the update count.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        updates: u64,
        source: &std::path::Path,
    ) -> Result<()> {
        let mut values = Vec::with_capacity(self.shadows.len());
        for s in &self.shadows {
            let t = tensors
                .get(&s.name)
                .ok_or_else(|| Error::bad_input(source, format!("missing EMA tensor '{}'", s.name)))?;
            if t.dims() != s.value.dims() {
                return Err(Error::bad_input(
                    source,
                    format!(
                        "EMA tensor '{}' has shape {:?}, the model has {:?}",
                        s.name,
                        t.dims(),
                        s.value.dims()
                    ),
                ));
            }
            // a copy of its own: the averages are updated in place
            values.push(t.to_dtype(DType::F32)?.to_device(s.value.device())?.copy()?);
        }
        if tensors.len() != self.shadows.len() {
            let known: std::collections::HashSet<&str> =
                self.shadows.iter().map(|s| s.name.as_str()).collect();
            let mut extra: Vec<&String> = tensors.keys().filter(|k| !known.contains(k.as_str())).collect();
            extra.sort();
            return Err(Error::bad_input(
                source,
                format!("unexpected EMA tensors: {}", super::optim::join_first(&extra, 5)),
            ));
        }
        for (s, v) in self.shadows.iter_mut().zip(values) {
            s.value = v;
        }
        self.updates = updates;
        Ok(())
    }

    /// Writes the averaged weights into the variables (e.g. to sample with a model built on
    /// the same `VarMap`; keep a copy of the raw weights first if training continues).
    pub fn copy_into_vars(&self) -> Result<()> {
        for s in &self.shadows {
            s.var.set(&s.value)?;
        }
        Ok(())
    }
}

/// The update on CPU f32 tensors in place, `shadow = d shadow + (1 - d) theta` in one pass,
/// with the tensor path's f32 operations and constants.
mod in_place {
    use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Tensor};
    use rayon::prelude::*;

    pub(super) fn applies(value: &Tensor, theta: &Tensor) -> bool {
        let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
        ok(value) && ok(theta)
    }

    pub(super) struct Average {
        pub d: f32,
        pub one_minus_d: f32,
    }

    impl InplaceOp2 for Average {
        fn name(&self) -> &'static str {
            "ema-average"
        }

        fn cpu_fwd(
            &self,
            s: &mut CpuStorage,
            sl: &Layout,
            t: &CpuStorage,
            tl: &Layout,
        ) -> candle_core::Result<()> {
            let (shadow, theta) = match (s, sl.contiguous_offsets(), t, tl.contiguous_offsets()) {
                (CpuStorage::F32(s), Some((a, b)), CpuStorage::F32(t), Some((c, e))) => {
                    (&mut s[a..b], &t[c..e])
                }
                _ => bail!("ema: contiguous f32 tensors expected"),
            };
            shadow
                .par_chunks_mut(1 << 14)
                .zip(theta.par_chunks(1 << 14))
                .for_each(|(s, t)| {
                    for (s, &t) in s.iter_mut().zip(t) {
                        *s = *s * self.d + t * self.one_minus_d;
                    }
                });
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn warmup_decay_values() {
        let c = EmaConfig {
            decay: 0.995,
            warmup: true,
        };
        // (1 + k) / (10 + k): 2/11, 3/12, ...; equals 0.995 at k = 1790, the cap after that
        assert!((c.decay_at(1) - 2.0 / 11.0).abs() < 1e-15);
        assert!((c.decay_at(2) - 0.25).abs() < 1e-15);
        assert!((c.decay_at(1000) - 1001.0 / 1010.0).abs() < 1e-15);
        assert_eq!(c.decay_at(2000), 0.995);
        let flat = EmaConfig {
            decay: 0.9,
            warmup: false,
        };
        assert_eq!(flat.decay_at(1), 0.9);
        assert!(EmaConfig {
            decay: 1.0,
            warmup: true
        }
        .validate()
        .is_err());
    }

    /// theta_0 = 0, then the weights are set to 1, 2, 3 before updates 1, 2, 3 with warm-up
    /// (decays 2/11, 3/12, 4/13): shadow_1 = 9/11 * 1 = 0.8181..,
    /// shadow_2 = 0.25 * 9/11 + 0.75 * 2 = 1.7045..,
    /// shadow_3 = 4/13 * shadow_2 + 9/13 * 3 = 2.6014...
    #[test]
    fn shadow_follows_the_recursion() {
        let varmap = VarMap::new();
        let var = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
        varmap.data().lock().unwrap().insert("w".into(), var.clone());
        let mut ema = Ema::new(
            &varmap,
            EmaConfig {
                decay: 0.999,
                warmup: true,
            },
        )
        .unwrap();
        let mut expect = 0.0f64;
        for k in 1..=3u64 {
            var.set(&Tensor::new(&[k as f32, -(k as f32)], &Device::Cpu).unwrap())
                .unwrap();
            ema.update().unwrap();
            let d = (1.0 + k as f64) / (10.0 + k as f64);
            expect = d * expect + (1.0 - d) * k as f64;
        }
        assert!((expect - (4.0 / 13.0 * (0.25 * 9.0 / 11.0 + 1.5) + 27.0 / 13.0)).abs() < 1e-12);
        let got = ema.tensors()[0].1.to_vec1::<f32>().unwrap();
        // f32 arithmetic on numbers of size ~3: 1e-6 is a few ulps
        assert!(
            (got[0] as f64 - expect).abs() < 1e-6 && (got[1] as f64 + expect).abs() < 1e-6,
            "{got:?}"
        );
        assert_eq!(ema.updates(), 3);
        // the raw weights are untouched until copy_into_vars
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), vec![3.0, -3.0]);
        ema.copy_into_vars().unwrap();
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), got);
    }

    #[test]
    fn load_state_checks_names_and_shapes() {
        let varmap = VarMap::new();
        let var = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
        varmap.data().lock().unwrap().insert("w".into(), var);
        let mut ema = Ema::new(&varmap, EmaConfig::default()).unwrap();
        let p = std::path::Path::new("ema.safetensors");
        let mut m = HashMap::new();
        let e = ema.load_state(&m, 1, p).unwrap_err().to_string();
        assert!(e.contains("missing EMA tensor 'w'"), "{e}");
        m.insert("w".to_string(), Tensor::new(&[5f32, 6.0], &Device::Cpu).unwrap());
        ema.load_state(&m, 7, p).unwrap();
        assert_eq!(ema.updates(), 7);
        assert_eq!(ema.tensors()[0].1.to_vec1::<f32>().unwrap(), vec![5.0, 6.0]);
        m.insert("x".to_string(), Tensor::new(&[5f32], &Device::Cpu).unwrap());
        assert!(ema
            .load_state(&m, 7, p)
            .unwrap_err()
            .to_string()
            .contains("unexpected EMA tensors: x"));
    }
}
