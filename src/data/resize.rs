//! Resizing images held as f32 planes `[C, H, W]`: shorter side to `size`, then a centre crop.
//!
//! The filter is the triangle ("bilinear") filter, widened when shrinking so that every source
//! pixel contributes (antialiasing), exactly as Pillow's `Image.resize(.., BILINEAR)` and
//! torchvision's `Resize(antialias=True)` compute it:
//!
//! ```text
//! scale        = in_len / out_len
//! filter_scale = max(scale, 1)
//! center_i     = (i + 0.5) * scale                       (output pixel i, in source coordinates)
//! w_ij         = max(0, 1 - |j + 0.5 - center_i| / filter_scale)
//! out_i        = sum_j w_ij * in_j / sum_j w_ij          (j over source pixels 0..in_len)
//! ```
//!
//! Rows are filtered first, then columns (the filter is separable). Near the border the taps
//! that fall outside the image are dropped and the remaining weights renormalised. The weights
//! are non-negative, so the output stays inside the input's range ([-1, 1] stays [-1, 1]).

use crate::error::{Error, Result};

/// The taps of one output pixel: the first source index and the normalised weights from there.
#[derive(Clone, Debug, PartialEq)]
struct Taps {
    start: usize,
    weights: Vec<f64>,
}

/// The taps of output pixels `first .. first + count` of a resize from `in_len` to `out_len`.
fn axis_taps(in_len: usize, out_len: usize, first: usize, count: usize) -> Vec<Taps> {
    let scale = in_len as f64 / out_len as f64;
    let filter_scale = scale.max(1.0);
    // The triangle filter has support 1, widened to filter_scale source pixels.
    let support = filter_scale;
    (first..first + count)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = (center - support).floor().max(0.0) as usize;
            let hi = ((center + support).ceil() as usize).min(in_len);
            let mut weights: Vec<f64> = (lo..hi)
                .map(|j| (1.0 - ((j as f64 + 0.5 - center) / filter_scale).abs()).max(0.0))
                .collect();
            let total: f64 = weights.iter().sum();
            // total > 0: the source pixel containing `center` has |j + 0.5 - center| <= 0.5 <
            // filter_scale, so its weight is positive.
            for w in &mut weights {
                *w /= total;
            }
            Taps { start: lo, weights }
        })
        .collect()
}

/// The size `(h, w)` an `in_h x in_w` image takes when its shorter side is resized to `size`
/// (the longer side rounded to the nearest pixel, and never below `size`).
pub fn shorter_side_size(in_h: usize, in_w: usize, size: usize) -> (usize, usize) {
    let short = in_h.min(in_w) as f64;
    let scaled = |len: usize| ((len as f64 * size as f64 / short).round() as usize).max(size);
    if in_h <= in_w {
        (size, scaled(in_w))
    } else {
        (scaled(in_h), size)
    }
}

/// Resizes `planes` (`channels` planes of `in_h x in_w`, row-major) so the shorter side is
/// `size`, then crops the centre `size x size` (offset `(resized - size) / 2`, rounded down).
/// Returns `channels` planes of `size x size`. An image already `size x size` is returned as is.
pub fn resize_and_crop(
    planes: &[f32],
    channels: usize,
    in_h: usize,
    in_w: usize,
    size: usize,
) -> Result<Vec<f32>> {
    if size == 0 {
        return Err(Error::param(
            "image_size",
            "got 0, expected a positive number of pixels",
        ));
    }
    if in_h == 0 || in_w == 0 || planes.len() != channels * in_h * in_w {
        return Err(Error::param(
            "image",
            format!(
                "{} values do not form {channels} planes of {in_h}x{in_w} pixels",
                planes.len()
            ),
        ));
    }
    if in_h == size && in_w == size {
        return Ok(planes.to_vec());
    }
    let (out_h, out_w) = shorter_side_size(in_h, in_w, size);
    let rows = axis_taps(in_h, out_h, (out_h - size) / 2, size);
    let cols = axis_taps(in_w, out_w, (out_w - size) / 2, size);

    let mut out = Vec::with_capacity(channels * size * size);
    let mut horizontal = vec![0f64; in_h * size];
    for plane in planes.chunks_exact(in_h * in_w) {
        // Rows: [in_h, in_w] -> [in_h, size].
        for (y, row) in plane.chunks_exact(in_w).enumerate() {
            for (x, tap) in cols.iter().enumerate() {
                horizontal[y * size + x] = tap
                    .weights
                    .iter()
                    .zip(&row[tap.start..])
                    .map(|(w, &v)| w * v as f64)
                    .sum();
            }
        }
        // Columns: [in_h, size] -> [size, size].
        for tap in &rows {
            for x in 0..size {
                let v: f64 = tap
                    .weights
                    .iter()
                    .enumerate()
                    .map(|(k, w)| w * horizontal[(tap.start + k) * size + x])
                    .sum();
                out.push(v as f32);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_weights_match_the_triangle_filter() {
        // 4 -> 2: scale 2, filter support 2. Output 0 has center 1.0; source centres 0.5, 1.5,
        // 2.5 are at distances 0.5, 0.5, 1.5 -> weights 0.75, 0.75, 0.25 (source -0.5 lies
        // outside and is dropped) -> normalised 3/7, 3/7, 1/7.
        let taps = axis_taps(4, 2, 0, 2);
        assert_eq!(taps[0].start, 0);
        let want = [3.0 / 7.0, 3.0 / 7.0, 1.0 / 7.0];
        for (g, w) in taps[0].weights.iter().zip(want) {
            assert!((g - w).abs() < 1e-15, "{:?}", taps[0]);
        }
        // Output 1 is the mirror image: 1/7, 3/7, 3/7 on sources 1, 2, 3.
        let nonzero: Vec<(usize, f64)> = taps[1]
            .weights
            .iter()
            .enumerate()
            .filter(|(_, &w)| w > 0.0)
            .map(|(k, &w)| (taps[1].start + k, w))
            .collect();
        assert_eq!(nonzero.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!((nonzero[0].1 - 1.0 / 7.0).abs() < 1e-15);
    }

    #[test]
    fn same_size_is_identity_and_shorter_side_rule() {
        let t = axis_taps(5, 5, 0, 5);
        for (i, tap) in t.iter().enumerate() {
            let nz: Vec<_> = tap
                .weights
                .iter()
                .enumerate()
                .filter(|(_, &w)| w > 0.0)
                .map(|(k, &w)| (tap.start + k, w))
                .collect();
            assert_eq!(nz, vec![(i, 1.0)]);
        }
        assert_eq!(shorter_side_size(28, 28, 16), (16, 16));
        assert_eq!(shorter_side_size(30, 60, 16), (16, 32));
        assert_eq!(shorter_side_size(61, 20, 10), (31, 10)); // 30.5 rounds to 31
        assert_eq!(shorter_side_size(20, 21, 10), (10, 11)); // 10.5 rounds to 11
    }
}
