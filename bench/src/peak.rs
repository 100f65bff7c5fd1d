//! The machine's peak single-precision throughput, measured: every core running independent
//! fused multiply-adds at the widest SIMD width it has. A row's GFLOP/s over this is how far it
//! is from what the hardware can do, whatever PyTorch manages.

use std::hint::black_box;
use std::time::Instant;

/// A kernel running its FMA loop for the given iterations, returning the operations done, and
/// the SIMD level it uses.
type Kernel = (fn(u64) -> f64, &'static str);

/// Peak GFLOP/s of f32 fused multiply-adds on all cores, and the SIMD level that reached it;
/// `None` off x86-64 or without AVX2/FMA.
pub fn fma_peak_gflops() -> Option<(f64, &'static str)> {
    let (per_call, level) = widest()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let iterations = 20_000_000u64;
    let start = Instant::now();
    let flops: f64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| scope.spawn(move || per_call(iterations)))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0.0)).sum()
    });
    Some((flops / start.elapsed().as_secs_f64() / 1e9, level))
}

#[cfg(target_arch = "x86_64")]
fn widest() -> Option<Kernel> {
    if is_x86_feature_detected!("avx512f") {
        Some((x86::avx512, "AVX-512"))
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Some((x86::avx2, "AVX2"))
    } else {
        None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn widest() -> Option<Kernel> {
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::black_box;
    use std::arch::x86_64::*;

    /// Independent accumulator chains: enough to cover the FMA latency on both ports.
    const CHAINS: usize = 12;

    /// `iterations` rounds of [`CHAINS`] 16-lane FMAs; returns the floating-point operations.
    pub(super) fn avx512(iterations: u64) -> f64 {
        // SAFETY: chosen only when the CPU reports AVX-512F (see `widest`).
        unsafe { avx512_chains(iterations) };
        (iterations as usize * CHAINS * 16 * 2) as f64
    }

    #[target_feature(enable = "avx512f")]
    fn avx512_chains(iterations: u64) {
        let a = _mm512_set1_ps(black_box(0.999_999));
        let b = _mm512_set1_ps(black_box(1e-7));
        let mut acc = [_mm512_set1_ps(black_box(1.0)); CHAINS];
        for _ in 0..iterations {
            for c in acc.iter_mut() {
                *c = _mm512_fmadd_ps(*c, a, b);
            }
        }
        black_box(acc);
    }

    /// `iterations` rounds of [`CHAINS`] 8-lane FMAs; returns the floating-point operations.
    pub(super) fn avx2(iterations: u64) -> f64 {
        // SAFETY: chosen only when the CPU reports AVX2 and FMA (see `widest`).
        unsafe { avx2_chains(iterations) };
        (iterations as usize * CHAINS * 8 * 2) as f64
    }

    #[target_feature(enable = "avx2,fma")]
    fn avx2_chains(iterations: u64) {
        let a = _mm256_set1_ps(black_box(0.999_999));
        let b = _mm256_set1_ps(black_box(1e-7));
        let mut acc = [_mm256_set1_ps(black_box(1.0)); CHAINS];
        for _ in 0..iterations {
            for c in acc.iter_mut() {
                *c = _mm256_fmadd_ps(*c, a, b);
            }
        }
        black_box(acc);
    }
}
