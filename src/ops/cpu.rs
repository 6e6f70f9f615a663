//! Shared plumbing for the fast CPU kernels: reading a tensor's f32 data, building result
//! tensors, runtime SIMD dispatch, a vectorisable `exp`, and the thread split.
//!
//! Threading: every kernel runs on rayon's global pool, the same pool candle's own CPU ops and
//! the `gemm` crate use, so kernels never add threads of their own. A batch is split into a few
//! contiguous ranges per thread ([`for_batch`]); a GEMM inside a parallel range runs single-threaded
//! (`gemm::Parallelism::None`), and a GEMM outside any parallel range (batch smaller than the
//! thread count) gets the whole pool (`gemm::Parallelism::Rayon`). The thread count is rayon's:
//! `RAYON_NUM_THREADS`, or one per logical CPU.

use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Storage, StorageRef, Tensor};

/// True when `t` can take the fast path: an f32 tensor on the CPU.
pub(crate) fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The f32 data of a contiguous CPU storage, as handed to `CustomOp::cpu_fwd`.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let (start, end) = match l.contiguous_offsets() {
        Some(r) => r,
        None => bail!("{op}: the fast kernel needs contiguous inputs"),
    };
    match s {
        CpuStorage::F32(v) => match v.get(start..end) {
            Some(v) => Ok(v),
            None => bail!("{op}: layout {start}..{end} outside a storage of {}", v.len()),
        },
        _ => bail!("{op}: the fast kernel needs f32 data"),
    }
}

/// Read access to a CPU f32 tensor's data (used in the backward passes, which see tensors).
pub(crate) struct Read<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> Read<'a> {
    /// Locks `t`'s storage for reading; `t` must be a contiguous f32 CPU tensor.
    pub(crate) fn new(t: &'a Tensor, op: &str) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = match layout.contiguous_offsets() {
            Some(r) => r,
            None => bail!("{op}: the fast kernel needs contiguous tensors"),
        };
        match &*guard {
            Storage::Cpu(CpuStorage::F32(v)) if end <= v.len() => {}
            _ => bail!("{op}: the fast kernel needs an f32 CPU tensor"),
        }
        Ok(Self { guard, start, end })
    }

    /// The data, in the tensor's (contiguous) order.
    pub(crate) fn as_slice(&self) -> &[f32] {
        match &*self.guard {
            // `new` checked the variant and the range.
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.end],
            _ => &[],
        }
    }
}

/// A CPU tensor holding `data` with `shape`.
pub(crate) fn tensor<S: Into<Shape>>(data: Vec<f32>, shape: S) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// `n` zeros, written in parallel for large `n`: a kernel's output buffer. (A plain `vec![0; n]`
/// is one thread's memset, which for a 12.8 MB activation costs as much as a fused kernel.)
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const PAR_MIN: usize = 1 << 16;
    if n < PAR_MIN || threads() == 1 {
        return vec![0f32; n];
    }
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n].par_chunks_mut(PAR_MIN).for_each(|c| {
        c.iter_mut().for_each(|x| {
            x.write(0.0);
        })
    });
    // SAFETY: the loop above initialised all n elements of the spare capacity.
    unsafe { v.set_len(n) };
    v
}

thread_local! {
    /// Per-thread scratch buffers, reused across calls (see [`Scratch`]).
    static SCRATCH_POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Most buffers a thread keeps for reuse.
const SCRATCH_POOL_MAX: usize = 8;

/// A scratch buffer of `len` floats taken from the current thread's pool (grown if needed) and
/// given back when dropped, so that per-image im2col / activation buffers are neither
/// allocated nor zeroed on every call. Its contents are left over from earlier use: every user
/// overwrites the whole buffer before reading it.
pub(crate) struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

impl Scratch {
    pub(crate) fn new(len: usize) -> Self {
        let mut buf = SCRATCH_POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        Self { buf, len }
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        SCRATCH_POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < SCRATCH_POOL_MAX {
                p.push(buf);
            }
        });
    }
}

/// The number of threads the kernels split work over (rayon's global pool).
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Splits `0..n` into at most `parts` contiguous, nearly equal ranges (none empty).
pub(crate) fn ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    (0..parts)
        .map(|i| (i * n / parts)..((i + 1) * n / parts))
        .filter(|r| !r.is_empty())
        .collect()
}

/// Runs `f(range of batch items, parallel GEMMs?)` over `0..n`: in parallel over
/// [`BATCH_SPLIT`] ranges per thread (several per thread so that a thread slowed down by other
/// work on the machine does not hold up the rest), or, for a single item, one range whose GEMMs
/// use the whole pool.
pub(crate) fn for_batch(n: usize, f: impl Fn(std::ops::Range<usize>, bool) + Sync) {
    map_batch(n, f);
}

/// As [`for_batch`], collecting each range's result in range order (a fixed order for a given
/// batch size and thread count, so reductions over the ranges are reproducible).
pub(crate) fn map_batch<R: Send>(n: usize, f: impl Fn(std::ops::Range<usize>, bool) -> R + Sync) -> Vec<R> {
    use rayon::prelude::*;
    let parts = ranges(n, threads() * BATCH_SPLIT);
    if parts.len() > 1 {
        parts.into_par_iter().map(|r| f(r, false)).collect()
    } else if n > 0 {
        vec![f(0..n, true)]
    } else {
        Vec::new()
    }
}

/// Ranges of the batch per thread in [`for_batch`].
pub(crate) const BATCH_SPLIT: usize = 4;

/// A raw pointer to an output buffer that parallel tasks write in disjoint pieces.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(*mut f32);

// SAFETY: the pointer is only turned into slices by `SyncPtr::slice`, whose callers guarantee
// that concurrently used slices do not overlap and that the buffer outlives the tasks.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    pub(crate) fn new(v: &mut [f32]) -> Self {
        Self(v.as_mut_ptr())
    }

    /// # Safety
    /// `offset + len` lies inside the buffer, and no other live slice overlaps this one.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, offset: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }
}

/// `dst = beta * lhs * rhs + (if accumulate { dst } else { 0 })` for row-major `dst` `[m, n]`;
/// `lhs` is `[m, k]` and `rhs` `[k, n]`, each given with its (row, column) strides so that
/// transposed operands need no copy.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: dst = 0 (or unchanged when accumulating).
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // The bounds the raw-pointer GEMM relies on; callers construct them, a failure is a bug.
    assert!(dst.len() >= m * n, "gemm: dst too small");
    assert!(
        lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs,
        "gemm: lhs too small"
    );
    assert!(
        rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs,
        "gemm: rhs too small"
    );
    let parallelism = if parallel && threads() > 1 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every element the GEMM touches inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Defines a function whose body is compiled three times (AVX-512, AVX2+FMA, baseline) and
/// picks the best one the CPU supports at run time. Helpers the body calls must be
/// `#[inline(always)]` so that they are compiled with the same features.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi2")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma,bmi2")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if $crate::ops::cpu::has_avx512() {
                    // SAFETY: the CPU supports every feature `v4` is compiled with.
                    return unsafe { v4($($arg),*) };
                }
                if $crate::ops::cpu::has_avx2() {
                    // SAFETY: the CPU supports every feature `v3` is compiled with.
                    return unsafe { v3($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// AVX-512 (F, VL, BW, DQ) with AVX2, FMA and BMI2, detected once.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    use std::sync::OnceLock;
    static YES: OnceLock<bool> = OnceLock::new();
    *YES.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && has_avx2()
    })
}

/// AVX2 with FMA and BMI2, detected once.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static YES: OnceLock<bool> = OnceLock::new();
    *YES.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("bmi2")
    })
}

/// `exp(x)` in f32, branch-free so that loops over it vectorise (Cephes `expf`):
/// `exp(x) = 2^n * exp(r)`, `n = round(x / ln 2)`, `r = x - n ln 2` (ln 2 split in a high and a
/// low part for exactness), `exp(r)` by its degree-7 Taylor-like minimax polynomial on
/// `|r| <= ln(2) / 2`. Relative error about 2e-7 (a few ulp). The input is clamped to
/// `[-87.3, 88.3]` so that `2^n` stays a normal float: `exp` underflows to about 1.2e-38
/// instead of 0 and saturates at about 2.1e38 instead of infinity; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    // Cephes' 5.0000001201e-1 rounds to 0.5 in f32.
    let p = p * r + 0.5;
    let er = p * (r * r) + r + 1.0;
    // 2^n with n in [-126, 127]: the exponent field is n + 127.
    let two_n = f32::from_bits(((ni + 127) as u32) << 23);
    er * two_n
}

/// `sigmoid(z) = 1 / (1 + exp(-z))`.
#[inline(always)]
pub(crate) fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp(-z))
}

/// Sums `x` with 16 independent accumulators (vectorisable; the order differs from a serial sum
/// by rounding only), finished in f64.
#[inline(always)]
pub(crate) fn sum_lanes(x: &[f32]) -> f64 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail.iter().map(|&a| a as f64).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        // Over the whole clamped range and around 0 the polynomial must agree with libm's
        // correctly rounded exp to 1e-6 relative (the documented ~2e-7 plus margin).
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        // Clamped at -87.3: exp(-87.3) = 1.22e-38, the smallest value returned.
        assert!(exp(-1000.0) > 1.2e-38 && exp(-1000.0) < 1.25e-38);
        assert!(exp(1000.0).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn ranges_cover_without_overlap() {
        for n in [0, 1, 2, 5, 64, 65] {
            for parts in [1, 2, 3, 8, 100] {
                let r = ranges(n, parts);
                let covered: Vec<usize> = r.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(covered, (0..n).collect::<Vec<_>>());
                assert!(r.len() <= parts.max(1));
            }
        }
    }
}
