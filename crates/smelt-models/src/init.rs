//! Seeded, backend-independent parameter initialisation (values drawn on the host).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded host random generator for weight initialisation.
pub struct HostInit {
    rng: ChaCha8Rng,
}

impl HostInit {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// `n` values from N(0, std²) (Box-Muller).
    pub fn normal(&mut self, n: usize, std: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1: f32 = self.rng.random::<f32>().max(f32::MIN_POSITIVE);
            let u2: f32 = self.rng.random::<f32>();
            let radius = (-2.0 * u1.ln()).sqrt() * std;
            let angle = 2.0 * std::f32::consts::PI * u2;
            out.push(radius * angle.cos());
            out.push(radius * angle.sin());
        }
        out.truncate(n);
        out
    }
}
