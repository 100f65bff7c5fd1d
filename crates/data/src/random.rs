//! Seeded random numbers: candle's CPU generator cannot be seeded, so every draw vulnmap makes
//! (initial weights, noise vectors, SmoothGrad samples) comes from here, on the host, and is
//! identical across runs and devices for the same seed.

use candle_core::{Device, Result, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// The generator behind every seeded draw.
pub type SeededRng = ChaCha8Rng;

/// A generator for `seed` and a named stream, so that independent draws (say, two tensors'
/// initial values) do not depend on the order in which they are made.
pub fn rng(seed: u64, stream: &str) -> SeededRng {
    // FNV-1a over the stream name, mixed with the seed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in stream.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ChaCha8Rng::seed_from_u64(seed ^ h.rotate_left(17))
}

/// `n` draws from N(mean, std), by the Box-Muller transform (stable across crate versions).
///
/// Chunks of pairs are drawn on all threads, each from its own copy of `rng` moved to the
/// chunk's place in the stream, so the draws, and `rng`'s position afterwards, are exactly
/// those of drawing every pair in order.
pub fn normal_vec(rng: &mut SeededRng, n: usize, mean: f64, std: f64) -> Vec<f32> {
    let pairs = n.div_ceil(2);
    let start = rng.get_word_pos();
    let words_before = |pair: usize| start + (pair * WORDS_PER_PAIR) as u128;
    let base = rng.clone();
    let mut out = vec![0f32; 2 * pairs];
    out.par_chunks_mut(2 * PAIRS_PER_CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let mut rng = base.clone();
            rng.set_word_pos(words_before(chunk * PAIRS_PER_CHUNK));
            for pair in values.chunks_exact_mut(2) {
                // u1 in (0, 1] so that ln(u1) is finite.
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random::<f64>();
                let r = (-2.0 * u1.ln()).sqrt();
                let theta = std::f64::consts::TAU * u2;
                pair[0] = (mean + std * r * theta.cos()) as f32;
                pair[1] = (mean + std * r * theta.sin()) as f32;
            }
        });
    rng.set_word_pos(words_before(pairs));
    out.truncate(n);
    out
}

/// The generator's 32-bit words one Box-Muller pair uses: two `f64`s of one `u64` each.
const WORDS_PER_PAIR: usize = 4;

/// Pairs per parallel chunk: enough that moving a generator copy to its chunk costs nothing.
const PAIRS_PER_CHUNK: usize = 1 << 14;

/// `n` draws from U[lo, hi).
pub fn uniform_vec(rng: &mut SeededRng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n)
        .map(|_| (lo + (hi - lo) * rng.random::<f64>()) as f32)
        .collect()
}

/// An f32 tensor of standard normal draws.
pub fn randn(rng: &mut SeededRng, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    Tensor::from_vec(normal_vec(rng, shape.elem_count(), 0.0, 1.0), shape, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_stream_give_the_same_draws_and_others_differ() {
        let a = normal_vec(&mut rng(7, "z"), 5, 0.0, 1.0);
        assert_eq!(a, normal_vec(&mut rng(7, "z"), 5, 0.0, 1.0));
        assert_ne!(a, normal_vec(&mut rng(8, "z"), 5, 0.0, 1.0));
        assert_ne!(a, normal_vec(&mut rng(7, "w"), 5, 0.0, 1.0));
    }

    /// The Box-Muller pairs drawn one after another from one generator, as the reference.
    fn normal_vec_in_order(rng: &mut SeededRng, n: usize, mean: f64, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let theta = std::f64::consts::TAU * u2;
            out.push((mean + std * r * theta.cos()) as f32);
            out.push((mean + std * r * theta.sin()) as f32);
        }
        out.truncate(n);
        out
    }

    #[test]
    fn parallel_draws_and_the_generator_after_them_equal_drawing_in_order() {
        // Odd and even lengths, one chunk and several, and a generator already part-way in.
        for n in [0, 1, 7, 2 * PAIRS_PER_CHUNK, 5 * PAIRS_PER_CHUNK + 3] {
            let mut ours = rng(3, "order");
            let mut reference = rng(3, "order");
            let _: u32 = ours.random();
            let _: u32 = reference.random();
            assert_eq!(
                normal_vec(&mut ours, n, 0.5, 2.0),
                normal_vec_in_order(&mut reference, n, 0.5, 2.0),
                "n = {n}"
            );
            assert_eq!(ours, reference, "the generator after {n} draws");
            assert_eq!(ours.random::<u64>(), reference.random::<u64>());
        }
    }

    #[test]
    fn normal_draws_have_the_asked_moments() {
        let v = normal_vec(&mut rng(1, "moments"), 100_000, 2.0, 3.0);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!((mean - 2.0).abs() < 0.05, "mean {mean}");
        assert!((var.sqrt() - 3.0).abs() < 0.05, "std {}", var.sqrt());
    }
}
