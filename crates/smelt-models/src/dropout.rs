//! Dropout with counter-based masks: fast to generate on all cores, and reproducible from a
//! seed and the order of calls, so a resumed run draws the same masks as an uninterrupted
//! one.
//!
//! The training loop calls [`reseed`] before each micro-batch; every dropout call then takes
//! the next stream number and derives element `i`'s keep/drop decision from
//! `hash(seed, stream, i)`.

use burn::module::{Flag, Module, Param};
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

static SEED: AtomicU64 = AtomicU64::new(0);
static STREAM: AtomicU64 = AtomicU64::new(0);

/// Restarts mask generation from `seed`.
pub fn reseed(seed: u64) {
    SEED.store(seed, Ordering::SeqCst);
    STREAM.store(0, Ordering::SeqCst);
}

#[inline(always)]
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` values, each `0` with probability `prob` and `1 / (1 - prob)` otherwise.
fn mask_values(n: usize, prob: f64, key: u64) -> Vec<f32> {
    let threshold = (prob * 4_294_967_296.0) as u64;
    let scale = (1.0 / (1.0 - prob)) as f32;
    let mut out = vec![0.0f32; n];
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| mask_chunk(chunk, (c * CHUNK / 2) as u64, key, (threshold, scale)));
    out
}

vectorized! {
    /// One chunk of a mask: element pair `j` (elements `2j` and `2j + 1`) takes the two
    /// halves of `hash(key, base + j)`. Compiled per instruction set: the 64-bit multiplies
    /// of the hash vectorise only with AVX-512.
    fn mask_chunk(chunk: &mut [f32], base: u64, key: u64, (threshold, scale): (u64, f32)) {
        let pick = |draw: u64| if draw < threshold { 0.0 } else { scale };
        let mut pairs = chunk.chunks_exact_mut(2);
        let mut j = 0u64;
        for pair in &mut pairs {
            let h = splitmix64(key ^ (base + j).wrapping_mul(0xD6E8_FEB8_6659_FD93));
            pair[0] = pick(h & 0xFFFF_FFFF);
            pair[1] = pick(h >> 32);
            j += 1;
        }
        if let [last] = pairs.into_remainder() {
            let h = splitmix64(key ^ (base + j).wrapping_mul(0xD6E8_FEB8_6659_FD93));
            *last = pick(h & 0xFFFF_FFFF);
        }
    }
}

/// Zeroes elements with probability `prob` and scales the rest by `1 / (1 - prob)`, during
/// training only: when the module is in training mode and the input is tracked for
/// gradients. Otherwise it is the identity.
#[derive(Module, Debug)]
pub struct Dropout {
    pub prob: f64,
    pub training: Param<Flag>,
}

impl Dropout {
    /// A dropout layer; `prob` must be in `[0, 1)`.
    pub fn new(prob: f64) -> Result<Self, String> {
        if !(0.0..1.0).contains(&prob) {
            return Err(format!("dropout probability {prob} is not in [0, 1)"));
        }
        Ok(Self {
            prob,
            training: Param::from_bool(true),
        })
    }

    /// The mask [`Dropout::forward`] would multiply a tracked input of `n` elements by
    /// (taking the next stream number as it does), or `None` when it would be the identity.
    /// For fused kernels that apply the mask themselves.
    pub fn mask(&self, n: usize, tracked: bool) -> Option<Vec<f32>> {
        if self.prob == 0.0 || !self.training.is_enabled() || !tracked {
            return None;
        }
        let stream = STREAM.fetch_add(1, Ordering::SeqCst);
        let key = splitmix64(SEED.load(Ordering::SeqCst) ^ splitmix64(stream));
        Some(mask_values(n, self.prob, key))
    }

    /// Any shape in, the same shape out.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        if self.prob == 0.0 || !self.training.is_enabled() || !input.is_autodiff() {
            return input;
        }
        let stream = STREAM.fetch_add(1, Ordering::SeqCst);
        let key = splitmix64(SEED.load(Ordering::SeqCst) ^ splitmix64(stream));
        let shape = input.shape();
        let values = mask_values(shape.num_elements(), self.prob, key);
        let mask = Tensor::<D>::from_data(TensorData::new(values, shape), &input.device());
        input * mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask of every element follows its definition (pair `i / 2` of the whole mask,
    /// half `i % 2` of its hash), across chunk boundaries and with an odd length.
    #[test]
    fn masks_follow_their_definition() {
        let (n, prob, key) = (3 * (1 << 14) + 5, 0.3, 11);
        let mask = mask_values(n, prob, key);
        let threshold = (prob * 4_294_967_296.0) as u64;
        let scale = (1.0 / (1.0 - prob)) as f32;
        for (i, &v) in mask.iter().enumerate() {
            let pair = (i / 2) as u64;
            let h = splitmix64(key ^ pair.wrapping_mul(0xD6E8_FEB8_6659_FD93));
            let draw = (h >> (32 * (i % 2))) & 0xFFFF_FFFF;
            let want = if draw < threshold { 0.0 } else { scale };
            assert_eq!(v, want, "element {i}");
        }
    }

    #[test]
    fn masks_drop_the_expected_share_and_repeat_with_the_seed() {
        let a = mask_values(100_000, 0.1, 7);
        let dropped = a.iter().filter(|v| **v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped share {dropped}");
        let kept = a.iter().find(|v| **v != 0.0).copied().unwrap();
        assert!((kept - 1.0 / 0.9).abs() < 1e-6);
        assert_eq!(a, mask_values(100_000, 0.1, 7));
        assert_ne!(a, mask_values(100_000, 0.1, 8));
    }
}
