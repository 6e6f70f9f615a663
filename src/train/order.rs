//! A seeded, resumable data order: each epoch visits every example once in a fresh random
//! permutation; batches run across epoch boundaries.
//!
//! The permutation of epoch `e` is a Fisher–Yates shuffle driven by `Rng::stream(seed, e)`, so
//! the state that resumes the order exactly is just `(seed, n, epoch, position)` ([`OrderState`]),
//! small enough for `state.json` whatever the dataset size.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Where an [`EpochOrder`] stands: enough to rebuild it exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderState {
    /// The seed of the permutations.
    pub seed: u64,
    /// The number of examples.
    pub n: usize,
    /// The current epoch (0-based).
    pub epoch: u64,
    /// Examples of the current epoch already handed out.
    pub position: usize,
}

/// Shuffled epochs over `0..n`.
#[derive(Clone, Debug)]
pub struct EpochOrder {
    state: OrderState,
    permutation: Vec<usize>,
}

impl EpochOrder {
    /// The order of `n >= 1` examples under `seed`, at the start of epoch 0.
    pub fn new(n: usize, seed: u64) -> Result<Self> {
        Self::from_state(OrderState {
            seed,
            n,
            epoch: 0,
            position: 0,
        })
    }

    /// Rebuilds an order from its state.
    pub fn from_state(state: OrderState) -> Result<Self> {
        if state.n == 0 {
            return Err(Error::param("data", "the dataset is empty"));
        }
        if state.position > state.n {
            return Err(Error::param(
                "data order",
                format!(
                    "position {} is past the {} examples of an epoch",
                    state.position, state.n
                ),
            ));
        }
        let permutation = Self::permutation(state.seed, state.epoch, state.n);
        Ok(EpochOrder { state, permutation })
    }

    fn permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        Rng::stream(seed, epoch).shuffle(&mut p);
        p
    }

    /// The state to save.
    pub fn state(&self) -> &OrderState {
        &self.state
    }

    /// The next `batch` example indices.
    pub fn next_batch(&mut self, batch: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch);
        while out.len() < batch {
            if self.state.position == self.state.n {
                self.state.epoch += 1;
                self.state.position = 0;
                self.permutation = Self::permutation(self.state.seed, self.state.epoch, self.state.n);
            }
            let take = (batch - out.len()).min(self.state.n - self.state.position);
            out.extend_from_slice(&self.permutation[self.state.position..self.state.position + take]);
            self.state.position += take;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_is_a_permutation_and_resume_continues_exactly() {
        let mut a = EpochOrder::new(10, 4).unwrap();
        let first: Vec<usize> = (0..5).flat_map(|_| a.next_batch(4)).collect(); // 20 = two epochs
        let mut e0 = first[..10].to_vec();
        e0.sort();
        assert_eq!(e0, (0..10).collect::<Vec<_>>());
        let mut e1 = first[10..].to_vec();
        e1.sort();
        assert_eq!(e1, (0..10).collect::<Vec<_>>());
        assert_ne!(first[..10], first[10..]); // a new shuffle each epoch
                                              // stop mid-epoch, save, rebuild: the continuation is identical
        let mut b = EpochOrder::new(10, 4).unwrap();
        b.next_batch(7);
        let saved = serde_json::to_value(b.state()).unwrap();
        let cont: Vec<usize> = (0..4).flat_map(|_| b.next_batch(3)).collect();
        let mut c = EpochOrder::from_state(serde_json::from_value(saved).unwrap()).unwrap();
        let cont2: Vec<usize> = (0..4).flat_map(|_| c.next_batch(3)).collect();
        assert_eq!(cont, cont2);
        assert_eq!(cont[..3], first[7..10]);
        assert!(EpochOrder::new(0, 1).is_err());
    }
}
