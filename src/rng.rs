//! The seeded random number generator: the only source of randomness in `diffuse`.
//!
//! [`Rng`] is xoshiro256++ (Blackman & Vigna 2019) seeded through SplitMix64. Its whole state
//! is four `u64`s plus a cached normal deviate, so it serialises into a checkpoint and a resumed
//! run continues the exact same stream.
//!
//! [`NoiseStreams`] gives every sample of a batch its own stream, derived from `(seed, sample
//! index)`: sample `i` drawn with seed `s` is the same whatever the batch size or the order of
//! batches (field notes, bug 9: results that depend on the batch size).

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// SplitMix64 step (Steele, Lea & Flood 2014): used to expand a seed into generator state.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded xoshiro256++ generator with standard-normal draws (Box–Muller).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rng {
    s: [u64; 4],
    /// The second deviate of the last Box–Muller pair, if not yet used.
    spare_normal: Option<f64>,
    /// Per-row draws (dropout masks) made with this generator are for rows `first_row ..` of a
    /// larger batch (see [`Rng::for_rows`]); 0 for an ordinary generator, and then not saved.
    #[serde(default, skip_serializing_if = "is_zero")]
    first_row: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Rng {
            s,
            spare_normal: None,
            first_row: 0,
        }
    }

    /// This generator, for a batch that is rows `first_row ..` of a larger one: a draw made row
    /// by row over a tensor `[n, ...]` ([`crate::ops::DropoutMask`] through
    /// [`crate::nets::layers::Dropout`]) then gives exactly the rows `first_row .. first_row + n`
    /// that the same draw over the whole batch gives (data-parallel training: each rank computes
    /// its share of the global batch with the masks the single process would use).
    pub fn for_rows(mut self, first_row: u64) -> Self {
        self.first_row = first_row;
        self
    }

    /// The global index of the first row (see [`Rng::for_rows`]; 0 by default).
    pub fn first_row(&self) -> u64 {
        self.first_row
    }

    /// Stream number `stream` of seed `seed`: independent of every other stream of the same
    /// seed for practical purposes (distinct SplitMix64-expanded states).
    pub fn stream(seed: u64, stream: u64) -> Self {
        let mut sm = seed ^ 0x5851_F42D_4C95_7F2D;
        let a = splitmix64(&mut sm);
        let mut sm2 = a ^ stream.wrapping_mul(0xD129_0FA9_4E1B_2C73);
        Rng::new(splitmix64(&mut sm2))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n` (`n > 0`), by Lemire's multiply-shift (bias below 2^-64 * n).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// A standard normal deviate (Box–Muller; the pair's second value is cached).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        // u1 in (0, 1] so that ln(u1) is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        self.spare_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// A Rademacher deviate: +1 or -1 with equal probability.
    pub fn rademacher(&mut self) -> f64 {
        if self.next_u64() >> 63 == 0 {
            1.0
        } else {
            -1.0
        }
    }

    /// `n` standard normal deviates as f32.
    pub fn normal_vec_f32(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }

    /// `n` standard normal deviates as f64.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.normal()).collect()
    }

    /// A tensor of standard normal deviates (f32) of the given shape.
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.normal_vec_f32(n), shape, device)?)
    }

    /// Fisher–Yates shuffle of `items`.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// One generator per sample: row `i` of every noise tensor comes from stream `first_index + i`
/// of the seed, so a sample does not depend on the batch it was drawn in.
///
/// [`NoiseStreams::replay`] instead hands out recorded deviates (to drive a sampler with the
/// noise another implementation used, e.g. diffusers' recorded `variance_noise`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NoiseStreams {
    streams: Vec<Rng>,
    /// Recorded deviates per row, handed out in order instead of drawing (replay mode).
    #[serde(skip)]
    recorded: Option<Vec<std::collections::VecDeque<f64>>>,
}

impl NoiseStreams {
    /// Streams for samples `first_index .. first_index + batch` of `seed`.
    pub fn new(seed: u64, first_index: u64, batch: usize) -> Self {
        NoiseStreams {
            streams: (0..batch as u64)
                .map(|i| Rng::stream(seed, first_index + i))
                .collect(),
            recorded: None,
        }
    }

    /// Replay mode: row `i` of every noise tensor drawn through [`NoiseStreams::randn`] or
    /// [`NoiseStreams::normal_rows`] takes the next values of `rows[i]`, in order. Once a row's
    /// recording is used up it yields NaN, which the samplers' finiteness check reports (never
    /// silently different noise). [`NoiseStreams::row`] still returns seeded generators (seed 0).
    pub fn replay(rows: Vec<Vec<f64>>) -> Self {
        NoiseStreams {
            streams: (0..rows.len() as u64).map(|i| Rng::stream(0, i)).collect(),
            recorded: Some(rows.into_iter().map(Into::into).collect()),
        }
    }

    /// The next deviate of row `i`: recorded (replay mode) or drawn.
    fn next_normal(&mut self, i: usize) -> f64 {
        match &mut self.recorded {
            Some(rows) => rows.get_mut(i).and_then(|r| r.pop_front()).unwrap_or(f64::NAN),
            None => self.streams[i].normal(),
        }
    }

    /// The number of samples (rows).
    pub fn batch(&self) -> usize {
        self.streams.len()
    }

    /// The generator of row `i`.
    pub fn row(&mut self, i: usize) -> &mut Rng {
        &mut self.streams[i]
    }

    /// Standard normal noise of shape `[batch, sample_shape...]` (f32), row `i` from stream `i`.
    pub fn randn(&mut self, sample_shape: &[usize], device: &Device) -> Result<Tensor> {
        let per: usize = sample_shape.iter().product();
        let mut data = Vec::with_capacity(per * self.streams.len());
        for i in 0..self.streams.len() {
            data.extend((0..per).map(|_| self.next_normal(i) as f32));
        }
        let mut shape = vec![self.streams.len()];
        shape.extend_from_slice(sample_shape);
        Ok(Tensor::from_vec(data, shape, device)?)
    }

    /// Standard normal noise as f64 rows: `batch * per_sample` values, row-major.
    pub fn normal_rows(&mut self, per_sample: usize) -> Vec<f64> {
        let mut data = Vec::with_capacity(per_sample * self.streams.len());
        for i in 0..self.streams.len() {
            data.extend((0..per_sample).map(|_| self.next_normal(i)));
        }
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let mut c = Rng::new(8);
        let xa: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let xb: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let xc: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    #[test]
    fn normal_moments() {
        // n = 200k draws: the standard error of the mean is 1/sqrt(n) = 0.0022, of the variance
        // sqrt(2/n) = 0.0032; 5 standard errors are allowed.
        let mut rng = Rng::new(1);
        let n = 200_000;
        let xs = rng.normal_vec(n);
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt = xs.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64 / var.powi(2);
        assert!(mean.abs() < 0.011, "mean {mean}");
        assert!((var - 1.0).abs() < 0.016, "var {var}");
        // kurtosis of a normal is 3; its standard error is sqrt(24/n) = 0.011.
        assert!((kurt - 3.0).abs() < 0.06, "kurtosis {kurt}");
    }

    #[test]
    fn uniform_and_below_in_range() {
        let mut rng = Rng::new(3);
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            let u = rng.uniform();
            assert!((0.0..1.0).contains(&u));
            counts[rng.below(5) as usize] += 1;
        }
        // each count ~ Binomial(50000, 0.2): mean 10000, sd 89.
        for c in counts {
            assert!((c as i64 - 10_000).abs() < 450, "{counts:?}");
        }
    }

    #[test]
    fn noise_rows_do_not_depend_on_batch_size() {
        let dev = Device::Cpu;
        let mut big = NoiseStreams::new(42, 0, 6);
        let mut small = NoiseStreams::new(42, 4, 2);
        let a = big.randn(&[3], &dev).unwrap().to_vec2::<f32>().unwrap();
        let b = small.randn(&[3], &dev).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a[4], b[0]);
        assert_eq!(a[5], b[1]);
        assert_ne!(a[0], a[1]);
    }

    #[test]
    fn replay_hands_out_the_recording_row_by_row_then_nan() {
        let mut r = NoiseStreams::replay(vec![vec![1.0, 2.0, 3.0], vec![-1.0, -2.0, -3.0]]);
        assert_eq!(r.batch(), 2);
        assert_eq!(r.normal_rows(2), vec![1.0, 2.0, -1.0, -2.0]);
        let t = r.randn(&[1], &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(t, vec![vec![3.0], vec![-3.0]]);
        assert!(r.normal_rows(1).iter().all(|v| v.is_nan()));
    }

    #[test]
    fn row_offset_is_kept_apart_from_the_stream_and_not_saved_when_zero() {
        let mut a = Rng::new(4);
        let mut b = Rng::new(4).for_rows(12);
        assert_eq!((a.first_row(), b.first_row()), (0, 12));
        assert_eq!(a.next_u64(), b.next_u64());
        let json = serde_json::to_string(&a).unwrap();
        assert!(!json.contains("first_row"), "{json}");
        let back: Rng = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut rng = Rng::new(9);
        rng.normal(); // leaves a spare normal cached
        let json = serde_json::to_string(&rng).unwrap();
        let mut back: Rng = serde_json::from_str(&json).unwrap();
        assert_eq!(rng.normal(), back.normal());
        assert_eq!(rng.next_u64(), back.next_u64());
    }
}
