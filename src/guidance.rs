//! Class conditioning and classifier-free guidance (Ho & Salimans 2022; seed 003,
//! "Classifier-Free Guidance").
//!
//! A [`ClassConditional`] model takes one class per row, `Some(c)` or `None` for "no class"
//! (the null class: one network trained with label dropout is both the conditional model
//! `eps(x_t, c)` and the unconditional one `eps(x_t)`). [`Guided`] turns it into a plain
//! [`Denoiser`] for a batch of requested classes and a guidance scale `w`:
//!
//! ```text
//! out_guided = out(x_t, null) + w * (out(x_t, c) - out(x_t, null))       (Ho & Salimans 2022, eq. 6,
//!                                                                          in diffusers' convention)
//! ```
//!
//! `w = 1` is the conditional model, `w = 0` the unconditional one, `w > 1` guides past it.
//! (The paper writes `(1 + w') eps(c) - w' eps(null)`, i.e. `w = 1 + w'`.) Every sampler gets
//! guidance for free, since it sees only the `Denoiser`; for a network both halves come from ONE
//! forward of the doubled batch `[x_t; x_t]` with classes `[c; null]`.
//!
//! The combination is taken on the model's raw output, whatever it predicts: eps, x_0 and v are
//! affine images of one another at fixed `(x_t, alpha, sigma)` (`x_0 = (x_t - sigma eps)/alpha`,
//! `v = alpha eps - sigma x_0 = (eps - sigma x_t)/alpha`), and an affine map `A(y) = a y + b`
//! commutes with a combination whose weights sum to one:
//! `A(u + w (c - u)) = (1 - w) A(u) + w A(c)`, because the constant `b` appears with total
//! weight `(1 - w) + w = 1`. So guiding eps, x_0 or v gives the same guided sampler.

use candle_core::{DType, Tensor};

use crate::denoiser::{eps_from_v, eps_from_x0, x0_from_eps, x0_from_v, Denoiser, NoiseLevel, Prediction};
use crate::error::{Error, Result};

/// The guidance scale `diffuse sample` and the training grids use for a class-conditional image
/// model when none is given (measured on the default run: README, "Class-conditional sampling").
pub const DEFAULT_GUIDANCE_SCALE: f64 = 2.0;

/// A model of the reverse process conditioned on one class per row.
pub trait ClassConditional {
    /// The parameterisation of the output.
    fn prediction(&self) -> Prediction;

    /// The number of classes `K` (requests are `0..K`).
    fn num_classes(&self) -> usize;

    /// Whether the model has an unconditional mode (the null class), needed for any guidance
    /// scale other than 1 and for `None` requests.
    fn has_null_class(&self) -> bool;

    /// The raw output for a batch, one class per row (`None`: the null class).
    fn output_with_classes(
        &self,
        x_t: &Tensor,
        levels: &[NoiseLevel],
        classes: &[Option<usize>],
    ) -> Result<Tensor>;

    /// `(x_0, eps)` for a batch, one class per row (by default converted from the raw output;
    /// the exact mixture oracle computes both directly).
    fn x0_eps_with_classes(
        &self,
        x_t: &Tensor,
        levels: &[NoiseLevel],
        classes: &[Option<usize>],
    ) -> Result<(Tensor, Tensor)> {
        let out = self.output_with_classes(x_t, levels, classes)?;
        Ok(match self.prediction() {
            Prediction::Eps => (x0_from_eps(x_t, &out, levels)?, out),
            Prediction::X0 => (out.clone(), eps_from_x0(x_t, &out, levels)?),
            Prediction::V => (x0_from_v(x_t, &out, levels)?, eps_from_v(x_t, &out, levels)?),
        })
    }
}

/// Checks requested classes against a model: every `Some(c)` below `num_classes`, `None` and a
/// scale other than 1 only with a null class, the scale finite and non-negative.
pub fn check_request(model: &dyn ClassConditional, classes: &[Option<usize>], scale: f64) -> Result<()> {
    if !(scale.is_finite() && scale >= 0.0) {
        return Err(Error::param(
            "guidance-scale",
            format!(
                "got {scale}, expected a finite number >= 0 (1 = the conditional model, 0 = unconditional)"
            ),
        ));
    }
    let k = model.num_classes();
    if let Some(c) = classes.iter().flatten().find(|&&c| c >= k) {
        return Err(Error::param(
            "class",
            format!(
                "class {c} is out of range: the model has {k} classes (0..{})",
                k.saturating_sub(1)
            ),
        ));
    }
    if !model.has_null_class() {
        if classes.iter().any(Option::is_none) {
            return Err(Error::param(
                "class",
                "the model has no null class (it was not trained with label dropout), so it cannot sample unconditionally",
            ));
        }
        if scale != 1.0 {
            return Err(Error::param(
                "guidance-scale",
                format!("got {scale}, but the model has no null class to guide against; only 1 (plain conditional) works"),
            ));
        }
    }
    Ok(())
}

/// The guided denoiser of a class-conditional model for one batch of requested classes.
pub struct Guided<'a> {
    model: &'a dyn ClassConditional,
    classes: Vec<Option<usize>>,
    scale: f64,
}

impl<'a> Guided<'a> {
    /// Guidance at scale `w` towards `classes` (one per row of every batch it will see).
    pub fn new(model: &'a dyn ClassConditional, classes: Vec<Option<usize>>, scale: f64) -> Result<Self> {
        check_request(model, &classes, scale)?;
        Ok(Guided {
            model,
            classes,
            scale,
        })
    }

    /// The guidance scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    fn check_batch(&self, x_t: &Tensor) -> Result<usize> {
        let b = x_t.dim(0)?;
        if b != self.classes.len() {
            return Err(Error::param(
                "classes",
                format!("{} classes for a batch of {b}", self.classes.len()),
            ));
        }
        Ok(b)
    }

    /// Whether the step needs both halves (some row has a class and the scale is neither 1,
    /// the conditional half alone, nor 0, the unconditional half alone).
    fn needs_both(&self) -> bool {
        self.scale != 1.0 && self.scale != 0.0 && self.classes.iter().any(Option::is_some)
    }

    /// The classes of the one forward that computes the step: `[c; null]` when both halves are
    /// needed, else the classes themselves (w = 1) or all null (w = 0).
    fn doubled(&self) -> Vec<Option<usize>> {
        let mut c = self.classes.clone();
        c.extend(std::iter::repeat_n(None, self.classes.len()));
        c
    }

    /// `u + w (c - u)` of the two halves of `both` (`[2B, ...]`).
    fn combine(&self, both: &Tensor, b: usize) -> Result<Tensor> {
        let cond = both.narrow(0, 0, b)?;
        let uncond = both.narrow(0, b, b)?;
        Ok((&uncond + (cond - &uncond)?.affine(self.scale, 0.0)?)?)
    }

    fn single_classes(&self) -> Vec<Option<usize>> {
        if self.scale == 0.0 {
            vec![None; self.classes.len()]
        } else {
            self.classes.clone()
        }
    }
}

fn doubled_input(x_t: &Tensor, levels: &[NoiseLevel]) -> Result<(Tensor, Vec<NoiseLevel>)> {
    let x2 = Tensor::cat(&[x_t, x_t], 0)?;
    let mut l2 = levels.to_vec();
    l2.extend_from_slice(levels);
    Ok((x2, l2))
}

impl Denoiser for Guided<'_> {
    fn prediction(&self) -> Prediction {
        self.model.prediction()
    }

    fn output(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
        let b = self.check_batch(x_t)?;
        if !self.needs_both() {
            return self
                .model
                .output_with_classes(x_t, levels, &self.single_classes());
        }
        let (x2, l2) = doubled_input(x_t, levels)?;
        let both = self.model.output_with_classes(&x2, &l2, &self.doubled())?;
        self.combine(&both, b)
    }

    fn predict_x0_eps(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<(Tensor, Tensor)> {
        let b = self.check_batch(x_t)?;
        if !self.needs_both() {
            return self
                .model
                .x0_eps_with_classes(x_t, levels, &self.single_classes());
        }
        let (x2, l2) = doubled_input(x_t, levels)?;
        let (x0, eps) = self.model.x0_eps_with_classes(&x2, &l2, &self.doubled())?;
        Ok((self.combine(&x0, b)?, self.combine(&eps, b)?))
    }

    fn predict_x0(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
        Ok(self.predict_x0_eps(x_t, levels)?.0)
    }

    fn predict_eps(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
        Ok(self.predict_x0_eps(x_t, levels)?.1)
    }
}

/// Runs `f` on the rows of each class separately and reassembles the batch: `f(class, rows,
/// x_rows, levels_rows)` returns tensors shaped like `x_rows` (as many as `outputs`).
pub fn by_class(
    x_t: &Tensor,
    levels: &[NoiseLevel],
    classes: &[Option<usize>],
    outputs: usize,
    mut f: impl FnMut(Option<usize>, &Tensor, &[NoiseLevel]) -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    let b = x_t.dim(0)?;
    if classes.len() != b || levels.len() != b {
        return Err(Error::param(
            "classes",
            format!(
                "{} classes and {} levels for a batch of {b}",
                classes.len(),
                levels.len()
            ),
        ));
    }
    let mut groups: Vec<(Option<usize>, Vec<u32>)> = Vec::new();
    for (i, c) in classes.iter().enumerate() {
        match groups.iter_mut().find(|(g, _)| g == c) {
            Some((_, rows)) => rows.push(i as u32),
            None => groups.push((*c, vec![i as u32])),
        }
    }
    if groups.len() == 1 {
        return f(classes[0], x_t, levels);
    }
    let mut parts: Vec<Vec<Tensor>> = vec![Vec::new(); outputs];
    let mut order: Vec<u32> = Vec::with_capacity(b);
    for (c, rows) in &groups {
        let idx = Tensor::from_vec(rows.clone(), rows.len(), x_t.device())?;
        let xs = x_t.index_select(&idx, 0)?;
        let ls: Vec<NoiseLevel> = rows.iter().map(|&i| levels[i as usize]).collect();
        let outs = f(*c, &xs, &ls)?;
        if outs.len() != outputs {
            return Err(Error::Numerical("internal error: by_class output count".into()));
        }
        for (p, o) in parts.iter_mut().zip(outs) {
            p.push(o);
        }
        order.extend(rows);
    }
    // position of each original row in the concatenation
    let mut inverse = vec![0u32; b];
    for (pos, &row) in order.iter().enumerate() {
        inverse[row as usize] = pos as u32;
    }
    let inv = Tensor::from_vec(inverse, b, x_t.device())?;
    parts
        .into_iter()
        .map(|p| Ok(Tensor::cat(&p, 0)?.index_select(&inv, 0)?))
        .collect()
}

/// The labels tensor (`[B]` u32) of requested classes for a network whose null class is row
/// `null` of its class-embedding table.
pub fn label_tensor(
    classes: &[Option<usize>],
    null: Option<usize>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let ids: Vec<u32> = classes
        .iter()
        .map(|c| match (c, null) {
            (Some(c), _) => Ok(*c as u32),
            (None, Some(n)) => Ok(n as u32),
            (None, None) => Err(Error::param(
                "class",
                "the model has no null class, so it cannot sample unconditionally",
            )),
        })
        .collect::<Result<_>>()?;
    Ok(Tensor::from_vec(ids, classes.len(), device)?.to_dtype(DType::U32)?)
}

/// Parses a `--class` request: `7`, `0,3,9` (cycled over the samples), `all` (each class in turn,
/// `n / K` rows each, grouped), `none` (unconditional). Returns one class per sample.
pub fn parse_classes(spec: &str, n: usize, num_classes: usize) -> Result<Vec<Option<usize>>> {
    let spec = spec.trim();
    match spec {
        "none" => Ok(vec![None; n]),
        "all" => {
            if num_classes == 0 {
                return Err(Error::param("class", "the model has no classes"));
            }
            // grouped: rows 0..n/K class 0, then class 1, ... (a grid with one row per class)
            let per = n.div_ceil(num_classes);
            Ok((0..n).map(|i| Some((i / per).min(num_classes - 1))).collect())
        }
        _ => {
            let list: Vec<usize> = spec
                .split(',')
                .map(|s| {
                    s.trim().parse::<usize>().map_err(|_| {
                        Error::param(
                            "class",
                            format!("'{s}' is not a class id: expected an integer, a comma-separated list, all or none"),
                        )
                    })
                })
                .collect::<Result<_>>()?;
            if let Some(c) = list.iter().find(|&&c| c >= num_classes) {
                return Err(Error::param(
                    "class",
                    format!(
                        "class {c} is out of range: the model has {num_classes} classes (0..{})",
                        num_classes.saturating_sub(1)
                    ),
                ));
            }
            Ok((0..n).map(|i| Some(list[i % list.len()])).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// out(x, c) = x * (c + 1) for a class, x * 0.5 for the null class; counts forwards.
    struct Toy {
        calls: std::cell::Cell<usize>,
        rows: std::cell::Cell<usize>,
    }

    impl ClassConditional for Toy {
        fn prediction(&self) -> Prediction {
            Prediction::Eps
        }
        fn num_classes(&self) -> usize {
            3
        }
        fn has_null_class(&self) -> bool {
            true
        }
        fn output_with_classes(
            &self,
            x: &Tensor,
            levels: &[NoiseLevel],
            classes: &[Option<usize>],
        ) -> Result<Tensor> {
            self.calls.set(self.calls.get() + 1);
            self.rows.set(self.rows.get() + x.dim(0)?);
            let out = by_class(x, levels, classes, 1, |c, xs, _| {
                let k = c.map_or(0.5, |c| c as f64 + 1.0);
                Ok(vec![xs.affine(k, 0.0)?])
            })?;
            Ok(out.into_iter().next().unwrap())
        }
    }

    #[test]
    fn guided_output_is_the_combination_in_one_doubled_forward() {
        let toy = Toy {
            calls: 0.into(),
            rows: 0.into(),
        };
        let x = Tensor::new(&[[1.0f64, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu).unwrap();
        let levels = vec![NoiseLevel::from_alpha_bar(0.5); 3];
        let classes = vec![Some(2), None, Some(0)];
        let g = Guided::new(&toy, classes, 3.0).unwrap();
        let out = g.output(&x, &levels).unwrap().to_vec2::<f64>().unwrap();
        // row 0: u = 0.5 x, c = 3 x -> 0.5 x + 3 (2.5 x) = 8 x; row 1: null -> 0.5 x;
        // row 2: c = x -> 0.5 x + 3 (0.5 x) = 2 x
        assert_eq!(out, vec![vec![8.0, 16.0], vec![1.5, 2.0], vec![10.0, 12.0]]);
        assert_eq!((toy.calls.get(), toy.rows.get()), (1, 6));
        // w = 1 and w = 0 take one forward of the plain batch
        let g1 = Guided::new(&toy, vec![Some(2), None, Some(0)], 1.0).unwrap();
        let o1 = g1.output(&x, &levels).unwrap().to_vec2::<f64>().unwrap();
        assert_eq!(o1, vec![vec![3.0, 6.0], vec![1.5, 2.0], vec![5.0, 6.0]]);
        let g0 = Guided::new(&toy, vec![Some(2), None, Some(0)], 0.0).unwrap();
        let o0 = g0.output(&x, &levels).unwrap().to_vec2::<f64>().unwrap();
        assert_eq!(o0, vec![vec![0.5, 1.0], vec![1.5, 2.0], vec![2.5, 3.0]]);
        assert_eq!((toy.calls.get(), toy.rows.get()), (3, 12));
    }

    #[test]
    fn guiding_eps_x0_or_v_is_the_same_sampler() {
        // the same model in three parameterisations gives the same guided x_0 and eps
        struct As(Prediction);
        impl ClassConditional for As {
            fn prediction(&self) -> Prediction {
                self.0
            }
            fn num_classes(&self) -> usize {
                2
            }
            fn has_null_class(&self) -> bool {
                true
            }
            fn output_with_classes(
                &self,
                x: &Tensor,
                levels: &[NoiseLevel],
                classes: &[Option<usize>],
            ) -> Result<Tensor> {
                // eps(x, c) = tanh(x) * (1 + c) / 3 (null: c = -0.5), expressed in self.0
                let out = by_class(x, levels, classes, 1, |c, xs, ls| {
                    let k = c.map_or(0.5, |c| c as f64 + 1.0) / 3.0;
                    let eps = xs.tanh()?.affine(k, 0.0)?;
                    let x0 = x0_from_eps(xs, &eps, ls)?;
                    Ok(vec![match self.0 {
                        Prediction::Eps => eps,
                        Prediction::X0 => x0,
                        Prediction::V => crate::denoiser::v_from_eps_x0(&eps, &x0, ls)?,
                    }])
                })?;
                Ok(out.into_iter().next().unwrap())
            }
        }
        let x = Tensor::new(&[[0.3f64, -1.2], [2.0, 0.5]], &Device::Cpu).unwrap();
        let levels = vec![NoiseLevel::from_alpha_bar(0.3), NoiseLevel::new(1.0, 2.5)];
        type Rows = Vec<Vec<f64>>;
        let runs: Vec<(Rows, Rows)> = [Prediction::Eps, Prediction::X0, Prediction::V]
            .iter()
            .map(|p| {
                let m = As(*p);
                let g = Guided::new(&m, vec![Some(1), Some(0)], 4.5).unwrap();
                let (x0, eps) = g.predict_x0_eps(&x, &levels).unwrap();
                (x0.to_vec2().unwrap(), eps.to_vec2().unwrap())
            })
            .collect();
        for r in &runs[1..] {
            for (a, b) in r.0.iter().flatten().zip(runs[0].0.iter().flatten()) {
                assert!((a - b).abs() < 1e-12, "{a} {b}");
            }
            for (a, b) in r.1.iter().flatten().zip(runs[0].1.iter().flatten()) {
                assert!((a - b).abs() < 1e-12, "{a} {b}");
            }
        }
    }

    #[test]
    fn requests_are_checked() {
        let toy = Toy {
            calls: 0.into(),
            rows: 0.into(),
        };
        assert!(Guided::new(&toy, vec![Some(3)], 1.0).is_err());
        assert!(Guided::new(&toy, vec![Some(1)], -1.0).is_err());
        assert!(Guided::new(&toy, vec![Some(1)], f64::NAN).is_err());
        assert_eq!(
            parse_classes("1,2", 5, 3).unwrap(),
            vec![Some(1), Some(2), Some(1), Some(2), Some(1)]
        );
        assert_eq!(
            parse_classes("all", 6, 3).unwrap(),
            vec![Some(0), Some(0), Some(1), Some(1), Some(2), Some(2)]
        );
        assert_eq!(parse_classes("none", 2, 3).unwrap(), vec![None, None]);
        assert!(parse_classes("12", 2, 10)
            .unwrap_err()
            .to_string()
            .contains("class 12 is out of range"));
        assert!(parse_classes("x", 2, 10).is_err());
    }
}
