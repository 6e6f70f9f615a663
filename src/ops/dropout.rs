//! Dropout masks (Srivastava et al. 2014, inverted dropout): element `i` of a tensor is kept and
//! scaled by `1 / (1 - p)` or dropped (set to 0) with probability `p`, so that the expectation is
//! unchanged. The mask is a bit set (one bit per element, 1 = kept), which the fused ResNet
//! block applies in place ([`DropoutMask::apply`]) and the reference path turns into a tensor
//! ([`DropoutMask::to_tensor`]).
//!
//! Drawing: one `u64` from the caller's generator seeds the mask; element `i` belongs to chunk
//! `c = i / CHUNK`, whose elements come from [`Rng::stream`]`(seed, c)`, two per 64-bit draw (the
//! low then the high 32 bits `u`), dropped when `u < round(p 2^32)` (a drop probability within
//! 2^-33 of `p`). Chunks are drawn in parallel; the mask depends only on the seed, never on the
//! thread count.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use crate::rng::Rng;

/// Elements per independently seeded chunk (a multiple of 64, so chunks own whole words).
const CHUNK: usize = 1 << 16;

/// A drawn dropout mask over `len` elements.
#[derive(Clone, Debug, PartialEq)]
pub struct DropoutMask {
    /// Bit `i % 64` of word `i / 64`: element `i` is kept.
    bits: Vec<u64>,
    len: usize,
    /// `1 / (1 - p)`.
    scale: f32,
}

impl DropoutMask {
    /// Draws a mask over `len` elements with drop probability `p` in `[0, 1)`, consuming one
    /// draw of `rng` (see the module docs).
    pub fn draw(len: usize, p: f64, rng: &mut Rng) -> Self {
        Self::draw_at(0, len, p, rng)
    }

    /// Elements `offset .. offset + len` of the mask [`DropoutMask::draw`] would draw over a
    /// longer tensor with the same generator, as a mask of `len` elements (one draw of `rng`).
    /// A rank of data-parallel training holding rows `r ..` of the global batch draws with
    /// `offset = r * row length` and gets the single process's mask for those rows.
    pub fn draw_at(offset: usize, len: usize, p: f64, rng: &mut Rng) -> Self {
        let seed = rng.next_u64();
        let threshold = (p.clamp(0.0, 1.0) * 4_294_967_296.0).round() as u64;
        let mut bits = vec![0u64; len.div_ceil(64)];
        if offset % CHUNK == 0 {
            // whole chunks, one word at a time (the common case: offset 0)
            let base = (offset / CHUNK) as u64;
            bits.par_chunks_mut(CHUNK / 64)
                .enumerate()
                .for_each(|(c, words)| {
                    let mut r = Rng::stream(seed, base + c as u64);
                    let first = c * CHUNK;
                    for (w, word) in words.iter_mut().enumerate() {
                        let mut v = 0u64;
                        for pair in 0..32 {
                            let u = r.next_u64();
                            let keep_lo = (u & 0xFFFF_FFFF) >= threshold;
                            let keep_hi = (u >> 32) >= threshold;
                            v |= (keep_lo as u64) << (2 * pair) | (keep_hi as u64) << (2 * pair + 1);
                        }
                        // bits past `len` stay clear
                        let start = first + 64 * w;
                        if start + 64 > len {
                            let valid = len.saturating_sub(start);
                            v &= if valid == 0 { 0 } else { u64::MAX >> (64 - valid) };
                        }
                        *word = v;
                    }
                });
        } else {
            // a range starting inside a chunk: element flags chunk by chunk, then packed
            let mut keep = vec![false; len];
            let head = (CHUNK - offset % CHUNK).min(len);
            let (first, rest) = keep.split_at_mut(head);
            let chunk0 = offset / CHUNK;
            keep_flags(seed, chunk0 as u64, offset % CHUNK, threshold, first);
            rest.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(c, flags)| keep_flags(seed, (chunk0 + 1 + c) as u64, 0, threshold, flags));
            bits.par_iter_mut().enumerate().for_each(|(w, word)| {
                for (b, &k) in keep[64 * w..(64 * w + 64).min(len)].iter().enumerate() {
                    *word |= (k as u64) << b;
                }
            });
        }
        Self {
            bits,
            len,
            scale: (1.0 / (1.0 - p)) as f32,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mask covers no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The factor kept elements are multiplied by, `1 / (1 - p)`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Whether element `i` is kept.
    pub fn keep(&self, i: usize) -> bool {
        i < self.len && (self.bits[i / 64] >> (i % 64)) & 1 == 1
    }

    /// `data[j] *= mask value of element start + j` (0 or `scale`).
    pub fn apply(&self, start: usize, data: &mut [f32]) {
        assert!(
            start + data.len() <= self.len,
            "dropout mask: range outside the mask"
        );
        for (j, v) in data.iter_mut().enumerate() {
            let i = start + j;
            let kept = (self.bits[i / 64] >> (i % 64)) & 1 == 1;
            *v = if kept { *v * self.scale } else { 0.0 };
        }
    }

    /// The mask as an f32 tensor of `shape` (entries 0 or `scale`).
    pub fn to_tensor(&self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let values: Vec<f32> = (0..self.len)
            .map(|i| if self.keep(i) { self.scale } else { 0.0 })
            .collect();
        Tensor::from_vec(values, shape, device)
    }
}

/// Keep flags of elements `start ..` of chunk `chunk` (drawn from `Rng::stream(seed, chunk)`,
/// two elements per draw: element `e` is the low (even `e`) or high half of draw `e / 2`).
fn keep_flags(seed: u64, chunk: u64, start: usize, threshold: u64, out: &mut [bool]) {
    let mut r = Rng::stream(seed, chunk);
    for _ in 0..start / 2 {
        r.next_u64();
    }
    let mut u = if start % 2 == 1 { r.next_u64() } else { 0 };
    for (j, flag) in out.iter_mut().enumerate() {
        let e = start + j;
        *flag = if e % 2 == 0 {
            u = r.next_u64();
            (u & 0xFFFF_FFFF) >= threshold
        } else {
            (u >> 32) >= threshold
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_rate_seeding_and_application() {
        let n = 3 * CHUNK + 77;
        let m = DropoutMask::draw(n, 0.25, &mut Rng::new(7));
        let dropped = (0..n).filter(|&i| !m.keep(i)).count() as f64 / n as f64;
        // Binomial(n, 0.25): std of the fraction = sqrt(0.25 * 0.75 / n) = 0.0017; 5 sigma.
        assert!((dropped - 0.25).abs() < 0.0085, "{dropped}");
        assert!(
            !m.keep(n) && m.bits.last().unwrap() >> 13 == 0,
            "bits past the end are clear"
        );
        assert_eq!(m, DropoutMask::draw(n, 0.25, &mut Rng::new(7)));
        assert_ne!(m, DropoutMask::draw(n, 0.25, &mut Rng::new(8)));
        // apply at an offset that is not a word boundary = multiplying by the tensor
        let mut data: Vec<f32> = (0..200).map(|i| i as f32 - 50.0).collect();
        m.apply(CHUNK - 37, &mut data);
        for (j, v) in data.iter().enumerate() {
            let want = (j as f32 - 50.0) * if m.keep(CHUNK - 37 + j) { 4.0 / 3.0 } else { 0.0 };
            assert_eq!(*v, want);
        }
        let t = m.to_tensor(&[n], &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        assert!(t
            .iter()
            .enumerate()
            .all(|(i, &v)| v == if m.keep(i) { 4.0 / 3.0 } else { 0.0 }));
        // a range of the mask drawn on its own is that range of the whole mask (data-parallel
        // ranks draw their rows so): chunk-aligned, inside a chunk, odd starts, across chunks
        for (offset, len) in [
            (0, 1000),
            (CHUNK, CHUNK + 70),
            (37, 200),
            (CHUNK - 3, 10),
            (2 * CHUNK + 1, CHUNK - 1),
            (5, n - 5),
        ] {
            let part = DropoutMask::draw_at(offset, len, 0.25, &mut Rng::new(7));
            assert_eq!(part.len(), len);
            assert!(
                (0..len).all(|i| part.keep(i) == m.keep(offset + i)),
                "offset {offset}, len {len}"
            );
            assert!(!part.keep(len) && part.bits.len() == len.div_ceil(64));
            if len % 64 != 0 {
                assert_eq!(
                    part.bits.last().unwrap() >> (len % 64),
                    0,
                    "bits past the end are clear"
                );
            }
        }
        // p = 0 keeps everything with scale 1
        let all = DropoutMask::draw(100, 0.0, &mut Rng::new(1));
        assert!((0..100).all(|i| all.keep(i)) && all.scale() == 1.0);
    }
}
