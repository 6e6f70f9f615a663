//! Timestep subsequences for DDIM and respaced DDPM: which K of the T training steps a sampler
//! visits. Indices are 0-based (index i is t = i + 1, diffusers' timestep i), returned in
//! **descending** order, exactly K of them, all distinct and in `0..T`.
//!
//! | spacing | indices (before reversing) | source |
//! | --- | --- | --- |
//! | `linspace` | `round(i (T-1)/(K-1))`, i = 0..K (ties to even, as numpy) | diffusers `timestep_spacing="linspace"`; improved-diffusion's evenly strided respacing |
//! | `leading` | `i * (T div K)` | diffusers `"leading"` (its default) |
//! | `trailing` | `round(T - i T/K) - 1` | diffusers `"trailing"` (Lin et al. 2024, table 2) |
//! | `quadratic` | `floor((i sqrt(0.8 T)/(K-1))^2)`, then made strictly increasing | DDIM (Song et al. 2021, appendix D.2 and their code's `"quad"`) |
//!
//! Known traps (field notes, bugs 1 and 2): `leading` never reaches T - 1 (with K = 50, T = 1000
//! it starts at 980); the DDIM code's `quad` repeats small indices (for K = 50, T = 1000 the
//! first two are both 0), which we replace by the next free index; `trailing`'s float `arange`
//! can produce K + 1 entries ending at -1 in numpy, we produce exactly K. The previous timestep
//! of a step is the next entry of this list, looked up, never recomputed as `t - T/K`.
//!
//! The default spacing is `linspace`: it starts at T - 1 (so x_T ~ N(0, I) is the right prior)
//! and ends at index 0 (so the last DDIM step, to alpha_bar = 1, starts from the least noise).

use crate::error::{Error, Result};

/// How K of T timesteps are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    /// Evenly spaced from T - 1 to 0, rounded.
    Linspace,
    /// Multiples of T div K from 0.
    Leading,
    /// Evenly spaced down from T - 1 by T/K.
    Trailing,
    /// Quadratically spaced up to 0.8 T (DDIM's CIFAR-10 choice).
    Quadratic,
}

impl Spacing {
    /// The names the CLI accepts.
    pub const NAMES: [&'static str; 4] = ["linspace", "leading", "trailing", "quadratic"];

    /// Parses a spacing name.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "linspace" => Ok(Spacing::Linspace),
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "quadratic" | "quad" => Ok(Spacing::Quadratic),
            other => Err(Error::param(
                "spacing",
                format!(
                    "unknown spacing '{other}', expected one of: {}",
                    Self::NAMES.join(", ")
                ),
            )),
        }
    }

    /// The canonical name.
    pub fn name(&self) -> &'static str {
        match self {
            Spacing::Linspace => "linspace",
            Spacing::Leading => "leading",
            Spacing::Trailing => "trailing",
            Spacing::Quadratic => "quadratic",
        }
    }
}

/// K of T timestep indices, descending. Errors for K = 0 or K > T.
pub fn timesteps(timesteps: usize, steps: usize, spacing: Spacing) -> Result<Vec<usize>> {
    let (t, k) = (timesteps, steps);
    if k == 0 || k > t {
        return Err(Error::param(
            "steps",
            format!("got {k}, expected 1 <= steps <= timesteps = {t}"),
        ));
    }
    let mut asc: Vec<usize> = match spacing {
        Spacing::Linspace => {
            if k == 1 {
                // numpy.linspace(0, T-1, 1) is [0]: one step from pure noise at t = 1 makes no
                // sense, so a single step starts at T - 1 (as trailing does).
                vec![t - 1]
            } else {
                // numpy.linspace: start + i * step, with the last point exactly at the stop.
                let step = (t - 1) as f64 / (k - 1) as f64;
                (0..k)
                    .map(|i| {
                        if i == k - 1 {
                            t - 1
                        } else {
                            (i as f64 * step).round_ties_even() as usize
                        }
                    })
                    .collect()
            }
        }
        Spacing::Leading => {
            let ratio = t / k;
            (0..k).map(|i| i * ratio).collect()
        }
        Spacing::Trailing => {
            let ratio = t as f64 / k as f64;
            (0..k)
                .rev()
                .map(|i| (t as f64 - i as f64 * ratio).round_ties_even() as usize - 1)
                .collect()
        }
        Spacing::Quadratic => {
            let top = (0.8 * t as f64).sqrt();
            let mut out = Vec::with_capacity(k);
            for i in 0..k {
                let frac = if k == 1 { 0.0 } else { i as f64 / (k - 1) as f64 };
                let q = (frac * top).powi(2).floor() as usize;
                let next = match out.last() {
                    Some(&prev) if q <= prev => prev + 1,
                    _ => q,
                };
                out.push(next);
            }
            out
        }
    };
    // Invariants the constructions above guarantee for 1 <= K <= T (checked, not assumed).
    if asc.len() != k || asc.windows(2).any(|w| w[1] <= w[0]) || asc.last().is_some_and(|&l| l >= t) {
        return Err(Error::Numerical(format!(
            "internal error: {} spacing for K = {k}, T = {t} gave {asc:?}",
            spacing.name()
        )));
    }
    asc.reverse();
    Ok(asc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_cases_by_hand() {
        // linspace(0, 9, 4) = 0, 3, 6, 9
        assert_eq!(timesteps(10, 4, Spacing::Linspace).unwrap(), vec![9, 6, 3, 0]);
        // linspace(0, 9, 3) = 0, 4.5, 9: 4.5 rounds to even (4), as numpy does
        assert_eq!(timesteps(10, 3, Spacing::Linspace).unwrap(), vec![9, 4, 0]);
        // leading: 10 div 3 = 3 -> 0, 3, 6 (never reaches 9)
        assert_eq!(timesteps(10, 3, Spacing::Leading).unwrap(), vec![6, 3, 0]);
        // trailing: round(10 - i * 10/3) - 1 = 9, round(6.67) - 1 = 6, round(3.33) - 1 = 2
        assert_eq!(timesteps(10, 3, Spacing::Trailing).unwrap(), vec![9, 6, 2]);
        // quadratic: floor((i sqrt(8) / 2)^2) = 0, 2, 8 (T = 10, K = 3)
        assert_eq!(timesteps(10, 3, Spacing::Quadratic).unwrap(), vec![8, 2, 0]);
        // quadratic, T = 1000, K = 50: the DDIM code gives 0, 0, 1, 2, 5, ...; we bump the repeats:
        // floor of 0, 0.33, 1.33, 2.999, 5.33 -> 0, 1, 2, 3, 5
        let q = timesteps(1000, 50, Spacing::Quadratic).unwrap();
        assert_eq!(&q[46..], &[3, 2, 1, 0]);
        assert_eq!(q[0], 800);
    }

    #[test]
    fn every_spacing_gives_exactly_k_distinct_indices_in_range() {
        for t in [2usize, 7, 10, 150, 1000] {
            for k in 1..=t.min(200) {
                for s in [
                    Spacing::Linspace,
                    Spacing::Leading,
                    Spacing::Trailing,
                    Spacing::Quadratic,
                ] {
                    let ts = timesteps(t, k, s).unwrap();
                    assert_eq!(ts.len(), k, "{} T={t} K={k}", s.name());
                    assert!(ts.windows(2).all(|w| w[0] > w[1]));
                    assert!(ts[0] < t);
                    if s == Spacing::Trailing || s == Spacing::Linspace {
                        assert_eq!(ts[0], t - 1, "{} starts at T-1", s.name());
                    }
                }
            }
        }
        // K = T is the full chain for every spacing
        for s in [
            Spacing::Linspace,
            Spacing::Leading,
            Spacing::Trailing,
            Spacing::Quadratic,
        ] {
            assert_eq!(timesteps(50, 50, s).unwrap(), (0..50).rev().collect::<Vec<_>>());
        }
    }

    #[test]
    fn zero_or_too_many_steps_is_an_error() {
        assert!(timesteps(1000, 0, Spacing::Linspace).is_err());
        let e = timesteps(1000, 1001, Spacing::Trailing).unwrap_err().to_string();
        assert!(e.contains("steps") && e.contains("1001"), "{e}");
        assert!(Spacing::from_name("evenly").is_err());
    }
}
