//! The training data order: a fresh seeded permutation of the dataset every epoch, resumable.
//!
//! Epoch `e` visits the indices `0 .. len` in the order of a Fisher–Yates shuffle drawn from
//! `Rng::stream(seed, e)`, so the order of any epoch depends only on `(seed, e)`. The whole
//! state is `(seed, len, epoch, position)`: it serialises into a checkpoint, and a sampler
//! restored from it continues with exactly the indices the uninterrupted run would have drawn.
//!
//! Batches run across epoch boundaries: a batch that starts near the end of epoch `e` is
//! completed from the start of epoch `e + 1`, so every batch has the requested size and every
//! index is visited exactly once per epoch.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// The serialisable state of an [`EpochSampler`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    /// The seed of every epoch's permutation.
    pub seed: u64,
    /// The number of items (dataset size).
    pub len: usize,
    /// The current epoch (0-based).
    pub epoch: u64,
    /// How many items of the current epoch have been handed out.
    pub position: usize,
}

/// Deterministic, resumable shuffled data order (see the module docs).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "SamplerState", into = "SamplerState")]
pub struct EpochSampler {
    state: SamplerState,
    /// The permutation of the current epoch (derived from the state, never serialised).
    order: Vec<usize>,
}

/// The permutation of epoch `epoch`: a Fisher–Yates shuffle of `0 .. len` drawn from stream
/// `epoch` of `seed`.
fn permutation(seed: u64, epoch: u64, len: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    Rng::stream(seed, epoch).shuffle(&mut order);
    order
}

impl EpochSampler {
    /// A sampler over `len` items starting at epoch 0, position 0. `len` must be positive.
    pub fn new(seed: u64, len: usize) -> Result<Self> {
        Self::from_state(SamplerState {
            seed,
            len,
            epoch: 0,
            position: 0,
        })
    }

    /// Restores a sampler from a saved state; checks `len > 0` and `position < len`.
    pub fn from_state(state: SamplerState) -> Result<Self> {
        if state.len == 0 {
            return Err(Error::param("sampler len", "got 0, expected a non-empty dataset"));
        }
        if state.position >= state.len {
            return Err(Error::param(
                "sampler position",
                format!(
                    "got {}, expected a position below the dataset size {}",
                    state.position, state.len
                ),
            ));
        }
        Ok(EpochSampler {
            order: permutation(state.seed, state.epoch, state.len),
            state,
        })
    }

    /// The state to save (and to pass to [`EpochSampler::from_state`] to resume).
    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// The current epoch (0-based).
    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    /// Items of the current epoch already handed out.
    pub fn position(&self) -> usize {
        self.state.position
    }

    /// The number of items the sampler permutes (the dataset size it was made for).
    pub fn len(&self) -> usize {
        self.state.len
    }

    /// Always false: a sampler is never empty (checked on construction).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The next `batch_size` indices, continuing into the next epoch's permutation when the
    /// current one runs out.
    pub fn next_batch(&mut self, batch_size: usize) -> Vec<usize> {
        let mut batch = Vec::with_capacity(batch_size);
        while batch.len() < batch_size {
            let take = (batch_size - batch.len()).min(self.state.len - self.state.position);
            batch.extend_from_slice(&self.order[self.state.position..self.state.position + take]);
            self.state.position += take;
            if self.state.position == self.state.len {
                self.state.epoch += 1;
                self.state.position = 0;
                self.order = permutation(self.state.seed, self.state.epoch, self.state.len);
            }
        }
        batch
    }
}

impl EpochSampler {
    /// [`EpochSampler::from_state`] for a dataset of `len` items: a saved state of another
    /// length is an error (checked before the permutation is built, so a damaged state cannot
    /// ask for a huge one).
    pub fn restore(state: SamplerState, len: usize) -> Result<Self> {
        if state.len != len {
            return Err(Error::param(
                "data order",
                format!("the saved order covers {} items, the data has {len}", state.len),
            ));
        }
        Self::from_state(state)
    }
}

impl TryFrom<SamplerState> for EpochSampler {
    type Error = Error;
    fn try_from(state: SamplerState) -> Result<Self> {
        EpochSampler::from_state(state)
    }
}

impl From<EpochSampler> for SamplerState {
    fn from(sampler: EpochSampler) -> Self {
        sampler.state
    }
}
