//! BENCH-ONLY PLACEHOLDER: a minimal AdamW so that the benchmark's training step has the same
//! shape as PyTorch's (forward + MSE + backward + AdamW). When the training module lands
//! (`crate::train`, with checkpointable optimizer state), `run_workload` should call its
//! optimizer instead and this file should be deleted.
//!
//! AdamW (Loshchilov & Hutter 2019, Algorithm 2; `torch.optim.AdamW`), step `t = 1, 2, ...`:
//!
//! ```text
//! theta <- theta * (1 - lr * weight_decay)            (decoupled weight decay)
//! m     <- beta1 * m + (1 - beta1) * g
//! v     <- beta2 * v + (1 - beta2) * g^2
//! m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)
//! theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)
//! ```
//!
//! Moments start at zero and are allocated at the first step (as PyTorch's state is), so a
//! benchmark's peak memory sees them inside the workload on both sides.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;

/// A minimal AdamW over a fixed list of variables (see the module docs; bench-only).
pub struct MinimalAdamW {
    vars: Vec<Var>,
    moments: Vec<Option<(Tensor, Tensor)>>,
    step: i32,
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay (0.9).
    pub beta1: f64,
    /// Second-moment decay (0.999).
    pub beta2: f64,
    /// Denominator guard (1e-8).
    pub eps: f64,
    /// Decoupled weight decay (PyTorch's default is 0.01; the benchmark uses 0).
    pub weight_decay: f64,
}

impl MinimalAdamW {
    /// AdamW over `vars` with PyTorch's betas (0.9, 0.999) and eps 1e-8.
    pub fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Self {
        let n = vars.len();
        MinimalAdamW {
            vars,
            moments: vec![None; n],
            step: 0,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    /// One update from the gradients in `grads` (variables without a gradient are skipped).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bias1 = 1.0 - b1.powi(self.step);
        let bias2 = 1.0 - b2.powi(self.step);
        for (var, state) in self.vars.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // candle's gradients can carry a backprop graph that reaches back into the forward
            // pass (the weight gradient of a conv is computed from its input); keeping one in
            // the moments would keep every step's activations alive.
            let g = g.detach();
            let g = &g;
            let (m, v) = match state.take() {
                Some(mv) => mv,
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let m = ((m * b1)? + (g * (1.0 - b1))?)?;
            let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&m / bias1)?;
            let v_hat = (&v / bias2)?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let theta = var.as_tensor();
            let theta = if self.weight_decay != 0.0 {
                (theta * (1.0 - self.lr * self.weight_decay))?
            } else {
                theta.clone()
            };
            var.set(&(theta - (update * self.lr)?)?)?;
            *state = Some((m, v));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `loss = c * theta` has gradient `c`: two steps with c = 2 then c = -1, by hand.
    #[test]
    fn two_steps_by_hand() {
        let theta = Var::new(&[1f32], &Device::Cpu).unwrap();
        let mut opt = MinimalAdamW::new(vec![theta.clone()], 0.1, 0.0);
        for c in [2f32, -1.0] {
            let loss = (theta.as_tensor() * c as f64).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        // Step 1: m = 0.2, v = 0.004, m_hat = 0.2/0.1 = 2, v_hat = 0.004/0.001 = 4,
        //         theta = 1 - 0.1 * 2 / (2 + 1e-8) = 0.9.
        // Step 2: m = 0.9*0.2 + 0.1*(-1) = 0.08, v = 0.999*0.004 + 0.001*1 = 0.004996,
        //         m_hat = 0.08 / (1 - 0.81), v_hat = 0.004996 / (1 - 0.998001),
        //         theta = 0.9 - 0.1 * m_hat / (sqrt(v_hat) + 1e-8).
        let m_hat = 0.08 / 0.19;
        let v_hat: f64 = 0.004996 / (1.0 - 0.999f64 * 0.999);
        let want = 0.9 - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        let got = theta.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        // f32 arithmetic on values of order 1: a few ulps (1e-7 each).
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert!((want - 0.873366).abs() < 1e-6); // the hand value, 0.9 - 0.026634
    }

    /// The moments hold values, not graphs: a gradient computed from an intermediate of the
    /// forward pass must not keep that pass alive (this leaked 640 MiB per step at batch 16).
    #[test]
    fn moments_carry_no_backprop_graph() {
        let w = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let x = Var::new(&[[0.5f32, -1.0]], &Device::Cpu).unwrap();
        // L = sum(x w w): dL/dw is computed from h = x w, an intermediate that tracks ops.
        let h = x.as_tensor().matmul(w.as_tensor()).unwrap();
        let loss = h.matmul(w.as_tensor()).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(
            grads.get(w.as_tensor()).unwrap().track_op(),
            "premise: candle's grad tracks ops"
        );
        let mut opt = MinimalAdamW::new(vec![w.clone()], 0.1, 0.0);
        opt.step(&grads).unwrap();
        let (m, v) = opt.moments[0].as_ref().unwrap();
        assert!(!m.track_op() && !v.track_op());
    }

    #[test]
    fn decoupled_weight_decay_by_hand() {
        let theta = Var::new(&[1f32], &Device::Cpu).unwrap();
        let mut opt = MinimalAdamW::new(vec![theta.clone()], 0.1, 0.5);
        let loss = (theta.as_tensor() * 3.0).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        // theta * (1 - 0.1 * 0.5) - 0.1 * sign(g) = 0.95 - 0.1 = 0.85.
        let got = theta.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((got - 0.85).abs() < 1e-6, "{got}");
    }
}
