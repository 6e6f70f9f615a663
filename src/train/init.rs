//! Seeded weight initialisation: a `VarBuilder` backend that creates missing variables in a
//! [`VarMap`] with values drawn from [`crate::rng::Rng`] instead of candle's unseeded generator,
//! so that the same seed gives bitwise the same initial network.
//!
//! It honours candle-nn's init hints (`Init::Const`, `Randn`, `Uniform`, `Kaiming`, the same
//! formulas as `candle_nn::Init::var`: Kaiming std = gain / sqrt(fan), uniform bound =
//! sqrt(3) * std), so layers built with `candle_nn::linear`, `conv2d`, ... get their usual
//! initialisation. Variables are drawn in the order the model asks for them.

use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};

use crate::rng::Rng;

/// A [`VarMap`] whose new variables are initialised from a seeded [`Rng`].
pub struct SeededVarMap {
    varmap: VarMap,
    rng: Mutex<Rng>,
}

impl SeededVarMap {
    /// Wraps `varmap`; new variables draw from `Rng::new(seed)`.
    pub fn new(varmap: &VarMap, seed: u64) -> Self {
        SeededVarMap {
            varmap: varmap.clone(),
            rng: Mutex::new(Rng::new(seed)),
        }
    }

    fn draw(&self, init: Init, shape: &Shape) -> candle_core::Result<Vec<f64>> {
        let n = shape.elem_count();
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| candle_core::Error::Msg("the init generator's lock is poisoned".into()))?;
        let uniform = |rng: &mut Rng, lo: f64, up: f64| lo + (up - lo) * rng.uniform();
        Ok(match init {
            Init::Const(c) => vec![c; n],
            Init::Randn { mean, stdev } => (0..n).map(|_| mean + stdev * rng.normal()).collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| uniform(&mut rng, lo, up)).collect(),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => (0..n).map(|_| std * rng.normal()).collect(),
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        (0..n).map(|_| uniform(&mut rng, -bound, bound)).collect()
                    }
                }
            }
        })
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the VarMap's lock is poisoned".into()))?;
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "shape mismatch on {name}: asked for {s:?}, the variable has {:?}",
                    var.shape()
                )
            }
            return Ok(var.as_tensor().clone());
        }
        let values = self.draw(h, &s)?;
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the VarMap's lock is poisoned".into()))?;
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

/// A `VarBuilder` over `varmap` whose new variables are seeded from `seed` (f32 weights).
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededVarMap::new(varmap, seed)),
        DType::F32,
        device.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(seed: u64) -> (VarMap, Vec<f32>, Vec<f32>) {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, &Device::Cpu);
        let lin = candle_nn::linear(400, 300, vb.pp("layer")).unwrap();
        let w = lin.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = lin.bias().unwrap().to_vec1::<f32>().unwrap();
        (varmap, w, b)
    }

    #[test]
    fn same_seed_same_weights_with_the_hinted_distribution() {
        let (varmap, w, b) = build(5);
        let (_, w2, b2) = build(5);
        let (_, w3, _) = build(6);
        assert_eq!(w, w2);
        assert_eq!(b, b2);
        assert_ne!(w, w3);
        let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        assert_eq!(names, vec!["layer.bias", "layer.weight"]);
        // candle_nn::linear: weight Kaiming normal, std = sqrt(2) / sqrt(fan_in = 400) = 0.0707;
        // 120k draws give the std to ~0.2 % (1 / sqrt(2n)); 2 % allows 10 standard errors.
        let n = w.len() as f64;
        let var = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n;
        let want = 2f64.sqrt() / 20.0;
        assert!((var.sqrt() - want).abs() / want < 0.02, "std {}", var.sqrt());
        // bias uniform in +-1 / sqrt(400) = +-0.05
        assert!(b.iter().all(|&x| x.abs() <= 0.05));
        assert!(b.iter().any(|&x| x.abs() > 0.04));
    }

    #[test]
    fn asking_twice_returns_the_same_variable_and_checks_shape() {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 1, &Device::Cpu);
        let a = vb.get_with_hints(3, "x", Init::Const(2.0)).unwrap();
        let b = vb.get_with_hints(3, "x", Init::Const(7.0)).unwrap();
        assert_eq!(a.to_vec1::<f32>().unwrap(), vec![2.0; 3]);
        assert_eq!(b.to_vec1::<f32>().unwrap(), vec![2.0; 3]);
        assert!(vb.get_with_hints(4, "x", Init::Const(0.0)).is_err());
    }
}
